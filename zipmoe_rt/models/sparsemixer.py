"""The sparsemixer router variant of the sparse MoE block (PhiMoE: ``PhimoeTopKRouter`` and
``sparsemixer`` of transformers' ``models/phimoe/modeling_phimoe.py``, at inference; Liu et al.,
"GRIN: GRadient-INformed MoE", arXiv 2409.12136).
"""
from __future__ import annotations

import numpy as np

from .moe import SparseMoeBlock


class SparsemixerMoeBlock(SparseMoeBlock):
    """:class:`~zipmoe_rt.models.moe.SparseMoeBlock` whose router is the sparsemixer's top-2 in
    eval mode (``backend.route_sparsemixer``): the best expert weighted by its softmax over the
    experts within a relative ``2 * jitter_eps`` of it, then the best of the rest, weighted the
    same way around it; the weights are not renormalised. Experts, hook and executor as the
    base block; no shared expert.

    Args:
        model: the owning :class:`~zipmoe_rt.models.model.Model`.  layer: index.
        gate: router weight [E, H] (E >= 2).  jitter_eps: ``router_jitter_noise`` (>= 0).
    """

    def __init__(self, model, layer, gate, jitter_eps: float):
        super().__init__(model, layer, gate, 2, False)
        self.jitter_eps = float(jitter_eps)

    def select(self, logits) -> tuple[np.ndarray, np.ndarray]:
        """host (topk_idx int64 [T, 2], topk_w float32 [T, 2]) of float32 [T, E] logits."""
        return self.backend.route_sparsemixer(logits, self.jitter_eps)
