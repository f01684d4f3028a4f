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

    def build_mlp(self, i):
        """Layer ``i``: :class:`~zipmoe_rt.models.moe.SparseMoeBlock` with renormalised top-k
        weights, plus the ungated shared MLP when ``shared_expert_intermediate_size`` > 0."""
        a = self.args
        shared = None
        if a.shared_expert_intermediate_size > 0:
            gu = self.weight("shared_gate_up", i)       # [2 * SI, H]: gate rows, then up rows
            si = gu.shape[0] // 2
            shared = base.MLP(gu[:si], gu[si:], self.weight("shared_down", i), self.backend)
        return base.SparseMoeBlock(self, i, self._first(*self.fam.tensor_names("router", i)),
                                   a.num_experts_per_tok, True, shared)
