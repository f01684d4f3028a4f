"""gpt-oss (transformers ``models/gpt_oss/modeling_gpt_oss.py``, ``GptOssForCausalLM``): the
shared attention with q/k/v/o biases and a sink logit per head in the softmax denominator
(``GptOssAttention``), sliding-window and full layers as ``layer_types`` says, YaRN RoPE; every
layer a sparse block whose router adds a bias to its logits and weighs the top k by a softmax
over them (``GptOssTopKRouter``: the same weights as a softmax over all experts renormalised
over the k), and whose experts have biases and a clamped SwiGLU (``GptOssExperts``), computed
by the executor. Hyper-parameters and tensor names come from the registry entry
(:mod:`zipmoe_rt.families.gpt_oss`).
"""
from __future__ import annotations

from ..backends.base import ClampedSwiGLU
from . import base


class Model(base.Model):
    """``GptOssForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_attention(self, i, **options):
        """The shared attention of layer ``i`` (its window from ``layer_types``) with the
        layer's sinks (``attn_sinks``)."""
        return super().build_attention(i, sinks=self.weight("attn_sinks", i), **options)

    def build_mlp(self, i):
        """Layer ``i``: :class:`~zipmoe_rt.models.moe.SparseMoeBlock` with the router's logit
        bias, renormalised top-k weights and the clamped SwiGLU of ``swiglu_alpha`` /
        ``swiglu_limit``."""
        a = self.args
        return base.SparseMoeBlock(self, i, self.weight("router", i), a.num_experts_per_tok,
                                   True, logit_bias=self.weight("router_logit_bias", i),
                                   glu=ClampedSwiGLU(a.swiglu_alpha, a.swiglu_limit))
