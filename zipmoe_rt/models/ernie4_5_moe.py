"""ERNIE 4.5 MoE (transformers ``models/ernie4_5_moe/modeling_ernie4_5_moe.py``,
``Ernie4_5_MoeForCausalLM``): the shared decoder with interleaved RoPE (the attention block
reorders each q/k head once, :attr:`~zipmoe_rt.families.hparams.HParams.ROPE_INTERLEAVED`);
dense ``Ernie4_5_MoeMLP`` layers outside ``moe_layers``; sparse layers with the choice-biased
router (``Ernie4_5_MoeTopKRouter``: :class:`~zipmoe_rt.models.moe.ChoiceBiasMoeBlock`) and the
ungated shared experts. Hyper-parameters and tensor names come from the registry entry
(:mod:`zipmoe_rt.families.ernie4_5_moe`).
"""
from __future__ import annotations

from . import base
from .moe import ChoiceBiasMoeBlock


class Model(base.Model):
    """``Ernie4_5_MoeForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_mlp(self, i):
        """Layer ``i``: a dense :class:`~zipmoe_rt.models.moe.MLP` outside ``moe_layers``, else
        a :class:`~zipmoe_rt.models.moe.ChoiceBiasMoeBlock` with the shared experts (when
        ``shared_expert_intermediate_size`` > 0)."""
        a = self.args
        if i not in self.moe_layers:
            return self.dense_mlp(i)
        shared = self.shared_mlp(i)
        bias = self._first(*self.fam.tensor_names("moe_statics", i))
        return ChoiceBiasMoeBlock(self, i, self._first(*self.fam.tensor_names("router", i)),
                                  a.num_experts_per_tok, bias, a.moe_norm_min, shared)
