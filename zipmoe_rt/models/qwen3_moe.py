"""Qwen3-MoE (transformers ``models/qwen3_moe/modeling_qwen3_moe.py``): RMSNorm over head_dim on
q and k (``q_norm`` / ``k_norm``, before RoPE), optional attention biases (``attention_bias``,
o_proj included), softmax top-k routing renormalised when ``norm_topk_prob`` (True in released
checkpoints), no shared expert; layers outside ``moe_layers`` have a dense ``Qwen3MoeMLP``.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import base


@dataclass
class ModelArgs(base.ModelArgs):
    """:class:`~zipmoe_rt.models.base.ModelArgs` for Qwen3-MoE (qk_norm always on)."""

    def validate(self):
        """Base checks; ``qk_norm`` forced True (Qwen3 always normalises q and k)."""
        super().validate()
        self.qk_norm = True


class Model(base.Model):
    """``Qwen3MoeForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.base.Model`."""

    args_class = ModelArgs

    def build_mlp(self, i):
        """Layer ``i``: dense :class:`~zipmoe_rt.models.base.MLP` outside ``moe_layers``, else a
        sparse block (no shared expert)."""
        a = self.args
        p = f"model.layers.{i}.mlp."
        if i not in self.moe_layers:
            return self.dense_mlp(p)
        return base.SparseMoeBlock(self, i, self.source.tensor(p + "gate.weight"),
                                   a.num_experts_per_tok, a.norm_topk_prob)
