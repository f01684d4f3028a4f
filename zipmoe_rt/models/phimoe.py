"""PhiMoE (transformers ``models/phimoe/modeling_phimoe.py``, ``PhimoeForCausalLM``): LayerNorm
with weight and bias around attention and the sparse block and before the head
(``PhimoeDecoderLayer``, ``PhimoeModel.norm``; the shared :class:`~zipmoe_rt.models.model.Norm`
through the registry's ``HParams.NORM``), Llama attention with optional q/k/v/o biases, a head
with an optional bias, the sparsemixer top-2 router
(:class:`~zipmoe_rt.models.sparsemixer.SparsemixerMoeBlock`) and PhiMoE's LongRoPE.

``PhimoeRotaryEmbedding.forward`` (transformers 5.25) computes the frequencies with
``rope_init_fn(config)`` and no sequence length, so the *short* factors serve at every length
(the long factors are never used), and scales cos and sin by ``long_mscale`` when the sequence
(``max(position_ids) + 1``) is longer than ``original_max_position_embeddings``, else by
``short_mscale``. Hyper-parameters and tensor names come from the registry entry
(:mod:`zipmoe_rt.families.phimoe`).
"""
from __future__ import annotations

from . import base
from .sparsemixer import SparsemixerMoeBlock


class Model(base.Model):
    """``PhimoeForCausalLM`` over a weight source. See :class:`~zipmoe_rt.models.model.Model`."""

    def build_rope(self):
        """LongRoPE as ``PhimoeRotaryEmbedding``: short factors always, ``short_mscale`` /
        ``long_mscale`` on either side of ``original_max_position_embeddings``."""
        rp = self.args.rope
        if rp.get("rope_type") != "longrope":
            return base.RoPE(self.args)
        return base.RoPE(self.args, switch_freqs=False,
                         mscale=(rp["short_mscale"], rp["long_mscale"]))

    def build_mlp(self, i):
        """Layer ``i``: :class:`~zipmoe_rt.models.sparsemixer.SparsemixerMoeBlock` (router
        ``block_sparse_moe.gate``, or transformers 5's ``mlp.router``)."""
        gate = self._first(*self.fam.tensor_names("router", i))
        return SparsemixerMoeBlock(self, i, gate, self.args.router_jitter_noise)
