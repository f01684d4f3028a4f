"""Qwen2-MoE / Qwen1.5-MoE (transformers ``models/qwen2_moe/modeling_qwen2_moe.py``): q/k/v
projection biases, softmax top-k routing renormalised only when ``norm_topk_prob``, a shared
expert ``Qwen2MoeMLP(shared_expert_intermediate_size)`` scaled by
``sigmoid(shared_expert_gate(x))`` and added to the routed output; layers outside
``moe_layers`` (``mlp_only_layers`` / ``decoder_sparse_step``) have a dense ``Qwen2MoeMLP``.

Sliding window (``use_sliding_window``): transformers applies it only to the layers marked
"sliding_attention" in ``config.layer_types``, by default the even-indexed layers below
``max_window_layers``. hparams may carry ``layer_types`` or ``max_window_layers``; with neither,
a non-zero ``sliding_window`` applies to every layer.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import base


@dataclass
class ModelArgs(base.ModelArgs):
    """:class:`~zipmoe_rt.models.base.ModelArgs` for Qwen2-MoE, plus ``max_window_layers``."""

    max_window_layers: int | None = None

    def validate(self):
        """Derive ``layer_types`` from ``max_window_layers`` as ``Qwen2MoeConfig`` does, then
        the base checks. Raises ValueError like :meth:`base.ModelArgs.validate`."""
        if (self.layer_types is None and self.sliding_window > 0
                and self.max_window_layers is not None):
            # Qwen2MoeConfig.__post_init__
            self.layer_types = ["sliding_attention" if (i + 1) % 2 and i < self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
        super().validate()


class Model(base.Model):
    """``Qwen2MoeForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.base.Model`."""

    args_class = ModelArgs

    def build_mlp(self, i):
        """Layer ``i``: dense :class:`~zipmoe_rt.models.base.MLP` outside ``moe_layers``, else a
        sparse block with the sigmoid-gated shared expert (when the checkpoint has one)."""
        a = self.args
        p = f"model.layers.{i}.mlp."
        if i not in self.moe_layers:
            return self.dense_mlp(p)
        shared = shared_gate = None
        if (a.shared_expert_intermediate_size > 0
                or self.source.has(p + "shared_expert_gate.weight")):
            shared = self.dense_mlp(p + "shared_expert.")
            shared_gate = self.source.tensor(p + "shared_expert_gate.weight")
        return base.SparseMoeBlock(self, i, self.source.tensor(p + "gate.weight"),
                                   a.num_experts_per_tok, a.norm_topk_prob, shared, shared_gate)
