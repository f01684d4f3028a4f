"""Qwen2-MoE / Qwen1.5-MoE (transformers ``models/qwen2_moe/modeling_qwen2_moe.py``): q/k/v
projection biases, softmax top-k routing renormalised only when ``norm_topk_prob``, a shared
expert ``Qwen2MoeMLP(shared_expert_intermediate_size)`` scaled by
``sigmoid(shared_expert_gate(x))`` and added to the routed output; layers outside
``moe_layers`` (``mlp_only_layers`` / ``decoder_sparse_step``) have a dense ``Qwen2MoeMLP``.

Sliding window (``use_sliding_window``): transformers applies it only to the layers marked
"sliding_attention" in ``config.layer_types``, by default the even-indexed layers below
``max_window_layers``. hparams may carry ``layer_types`` or ``max_window_layers`` (the registry's
:class:`~zipmoe_rt.families.qwen2_moe.Qwen2MoeHParams` derives one from the other); with
neither, a non-zero ``sliding_window`` applies to every layer.
"""
from __future__ import annotations

from . import base


class Model(base.Model):
    """``Qwen2MoeForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_mlp(self, i):
        """Layer ``i``: dense :class:`~zipmoe_rt.models.moe.MLP` outside ``moe_layers``, else a
        sparse block with the sigmoid-gated shared expert (when the checkpoint has one)."""
        a = self.args
        if i not in self.moe_layers:
            return self.dense_mlp(i)
        shared = shared_gate = None
        if a.shared_expert_intermediate_size > 0 or self.has_weight("shared_expert_gate", i):
            shared = self.dense_mlp(i, ("shared_gate", "shared_up", "shared_down"))
            shared_gate = self.weight("shared_expert_gate", i)
        return base.SparseMoeBlock(self, i, self.weight("router", i), a.num_experts_per_tok,
                                   a.norm_topk_prob, shared, shared_gate)
