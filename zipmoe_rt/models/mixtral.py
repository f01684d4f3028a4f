"""Mixtral (transformers ``models/mixtral/modeling_mixtral.py``): Llama-style attention without
biases, every layer a sparse MoE block whose top-k softmax weights are always renormalised to
sum 1 (``MixtralTopKRouter``), no shared expert.

Hyper-parameters and tensor names come from the registry entry
(:mod:`zipmoe_rt.families.mixtral`): the router is ``router`` (Hub name
``model.layers.{i}.block_sparse_moe.gate.weight``; transformers 5's in-memory
``model.layers.{i}.mlp.gate.weight`` also accepted); experts come from the weight source
(``w1`` = gate, ``w3`` = up, ``w2`` = down).
"""
from __future__ import annotations

from . import base


class Model(base.Model):
    """``MixtralForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_mlp(self, i):
        """Layer ``i``: :class:`~zipmoe_rt.models.moe.SparseMoeBlock` (router renormalised)."""
        gate = self._first(*self.fam.tensor_names("router", i))
        return base.SparseMoeBlock(self, i, gate, self.args.num_experts_per_tok, True)
