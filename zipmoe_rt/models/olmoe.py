"""OLMoE (transformers ``models/olmoe/modeling_olmoe.py``, ``OlmoeForCausalLM``): attention
with RMSNorm over the whole q and k projections before the split into heads and RoPE
(``OlmoeAttention``: ``q_norm(q_proj(x))``), then q, k, v clamped to ``[-clip_qkv, clip_qkv]``
when set; every layer a sparse block with softmax top-k routing renormalised only when
``norm_topk_prob`` (``OlmoeTopKRouter``), no shared expert. Hyper-parameters and tensor names
come from the registry entry (:mod:`zipmoe_rt.families.olmoe`).
"""
from __future__ import annotations

from . import base


class Model(base.Model):
    """``OlmoeForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_attention(self, i, **options):
        """The shared attention (its whole-projection q/k norms are [heads*hd], [kv_heads*hd])
        with ``clip_qkv``."""
        return super().build_attention(i, clip=self.args.clip_qkv, **options)

    def build_mlp(self, i):
        """Layer ``i``: :class:`~zipmoe_rt.models.moe.SparseMoeBlock` (no shared expert)."""
        a = self.args
        return base.SparseMoeBlock(self, i, self.weight("router", i), a.num_experts_per_tok,
                                   a.norm_topk_prob)
