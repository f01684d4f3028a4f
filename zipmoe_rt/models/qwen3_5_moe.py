"""Qwen3.5-MoE text model (transformers ``models/qwen3_5_moe/modeling_qwen3_5_moe.py``,
``Qwen3_5MoeForCausalLM`` and the language model of ``Qwen3_5MoeForConditionalGeneration``):
Qwen3-Next's blocks (:mod:`zipmoe_rt.models.qwen3_next`) with the linear-attention input
projections stored apart (``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``), every
layer sparse and the top-k weights renormalised. For text the multimodal RoPE of
``Qwen3_5MoeTextRotaryEmbedding`` is the plain (partial) RoPE: its three position rows are equal.
"""
from __future__ import annotations

import numpy as np

from . import qwen3_next


class Model(qwen3_next.Model):
    """``Qwen3_5MoeForCausalLM`` over a weight source. See
    :class:`~zipmoe_rt.models.qwen3_next.Model`."""

    def linear_projections(self, i: int):
        """(``in_proj_qkv``, ``in_proj_z``, ``in_proj_b`` stacked over ``in_proj_a``) of linear
        layer ``i``."""
        t = self.weight
        b, a = np.asarray(t("lin_b", i)), np.asarray(t("lin_a", i))
        if b.dtype != a.dtype:
            raise ValueError(f"layer {i}: in_proj_b ({b.dtype}) and in_proj_a ({a.dtype}) "
                             f"differ in dtype")
        return t("lin_qkv", i), t("lin_z", i), np.concatenate([b, a])
