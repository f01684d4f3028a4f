"""Mixtral (transformers ``models/mixtral/modeling_mixtral.py``): Llama-style attention without
biases, every layer a sparse MoE block whose top-k softmax weights are always renormalised to
sum 1 (``MixtralTopKRouter``), no shared expert.

Tensor names: ``model.layers.{i}.block_sparse_moe.gate.weight`` for the router (transformers 5
in-memory spelling ``model.layers.{i}.mlp.gate.weight`` also accepted); experts come from the
weight source (``w1`` = gate, ``w3`` = up, ``w2`` = down).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import base


@dataclass
class ModelArgs(base.ModelArgs):
    """:class:`~zipmoe_rt.models.base.ModelArgs` with Mixtral's fixed choices."""

    def validate(self):
        """Base checks; ``norm_topk_prob`` forced True and every layer sparse (Mixtral)."""
        super().validate()
        self.norm_topk_prob = True  # MixtralTopKRouter always renormalises
        if not self.moe_layers:
            self.moe_layers = list(range(self.num_hidden_layers))


class Model(base.Model):
    """``MixtralForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.base.Model`."""

    args_class = ModelArgs

    def build_mlp(self, i):
        """Layer ``i``: :class:`~zipmoe_rt.models.base.SparseMoeBlock` (router renormalised)."""
        a = self.args
        gate = self._first(f"model.layers.{i}.block_sparse_moe.gate.weight",
                           f"model.layers.{i}.mlp.gate.weight")
        return base.SparseMoeBlock(self, i, gate, a.num_experts_per_tok, True)
