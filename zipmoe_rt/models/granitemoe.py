"""Granite-MoE and Granite-MoE-Shared (transformers ``models/granitemoe/modeling_granitemoe.py``,
``models/granitemoeshared/modeling_granitemoeshared.py``): the shared decoder with its scalar
multipliers (embedding, residual, attention scale, logits; :class:`~zipmoe_rt.models.model.Model`
reads them from the registry's :class:`~zipmoe_rt.families.granitemoe.GraniteMoeHParams`), every
layer a sparse block whose router (``GraniteMoeTopKRouter``: softmax over the top-k logits) gives
the weights of a softmax over all experts renormalised over the k, and, for the shared variant,
an ungated shared SwiGLU MLP (``GraniteMoeSharedMLP``: ``input_linear`` gate rows, then up rows).
"""
from __future__ import annotations

from . import base


class Model(base.Model):
    """``GraniteMoeForCausalLM`` / ``GraniteMoeSharedForCausalLM`` over a weight source."""

    def shared_mlp(self, i):
        """The ungated shared MLP of layer ``i`` from the fused ``shared_gate_up`` ([2 * SI, H]:
        gate rows, then up rows) and ``shared_down``, or None when
        ``shared_expert_intermediate_size`` is 0."""
        if self.args.shared_expert_intermediate_size <= 0:
            return None
        gu = self.weight("shared_gate_up", i)
        si = gu.shape[0] // 2
        return base.MLP(gu[:si], gu[si:], self.weight("shared_down", i), self.backend)

    def build_mlp(self, i):
        """Layer ``i``: :class:`~zipmoe_rt.models.moe.SparseMoeBlock` with renormalised top-k
        weights, plus the ungated shared MLP (:meth:`shared_mlp`)."""
        return base.SparseMoeBlock(self, i, self._first(*self.fam.tensor_names("router", i)),
                                   self.args.num_experts_per_tok, True, self.shared_mlp(i))
