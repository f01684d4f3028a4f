"""Qwen3-MoE (transformers ``models/qwen3_moe/modeling_qwen3_moe.py``): RMSNorm over head_dim on
q and k (``q_norm`` / ``k_norm``, before RoPE), optional attention biases (``attention_bias``,
o_proj included), softmax top-k routing renormalised when ``norm_topk_prob`` (True in released
checkpoints), no shared expert; layers outside ``moe_layers`` have a dense ``Qwen3MoeMLP``.
Hyper-parameters and tensor names come from the registry entry
(:mod:`zipmoe_rt.families.qwen3_moe`).
"""
from __future__ import annotations

from . import base


class Model(base.Model):
    """``Qwen3MoeForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_mlp(self, i):
        """Layer ``i``: dense :class:`~zipmoe_rt.models.moe.MLP` outside ``moe_layers``, else a
        sparse block (no shared expert)."""
        a = self.args
        if i not in self.moe_layers:
            return self.dense_mlp(i)
        return base.SparseMoeBlock(self, i, self.weight("router", i), a.num_experts_per_tok,
                                   a.norm_topk_prob)
