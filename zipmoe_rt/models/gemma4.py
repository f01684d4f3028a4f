"""Gemma 4 MoE (transformers ``models/gemma4/modeling_gemma4.py``: ``Gemma4ForCausalLM``, the
text model of ``Gemma4ForConditionalGeneration``) on the shared blocks: sandwich RMSNorms,
``sqrt(hidden_size)``-scaled embeddings (:attr:`Gemma4HParams.embedding_multiplier
<zipmoe_rt.families.gemma4.Gemma4HParams.embedding_multiplier>`), attention with q/k/v norms and
a softmax scale of 1 whose head size, kv heads and RoPE depend on the layer type, a dense
GELU-tanh MLP plus the routed experts in every layer
(:class:`~zipmoe_rt.models.moe.ScaledRouterMoeBlock`), the layer scalar and the logit
soft-cap (:meth:`~zipmoe_rt.models.model.Model.logits`). Hyper-parameters and names come from
the registry entry (:mod:`zipmoe_rt.families.gemma4`).
"""
from __future__ import annotations

from ..backends import to_f32
from . import base
from .moe import ScaledRouterMoeBlock


class DecoderLayer:
    """``Gemma4TextDecoderLayer.forward``: ``x += post_attn_norm(attn(input_norm(x)))``; then
    ``m = post_ffn_norm_1(mlp(pre_ffn_norm(x))) + moe(x)`` (the MoE block routes on ``x`` and
    norms its experts' input and output itself); ``x += post_ffn_norm(m)``; ``x *=
    layer_scalar``.

    Args:
        model: the owning :class:`Model` (weights, backend, the full-attention RoPE tables).
        i: layer index.
    Raises:
        KeyError: a tensor of the layer is missing.
    """

    def __init__(self, model: "Model", i: int):
        be = self.backend = model.backend
        a = model.args
        self.model, self.layer, self.is_global = model, i, a.is_global(i)
        norm = model.build_norm
        self.input_layernorm, self.post_attention_layernorm = norm("attn_norm", i), norm(
            "attn_post_norm", i)
        self.pre_feedforward_layernorm, self.post_feedforward_layernorm = norm(
            "ffn_norm", i), norm("ffn_post_norm", i)
        self.attn = model.build_attention(i)
        self.dense = base.MLP(*(model.weight(k, i) for k in ("mlp_gate", "mlp_up", "mlp_down")),
                              be, act=a.hidden_act)
        self.post_mlp_norm = norm("ffn_post_norm_1", i)
        self.mlp = ScaledRouterMoeBlock(
            model, i, model.weight("router", i), a.num_experts_per_tok,
            model.weight("router_scale", i), model.weight("router_expert_scale", i),
            norm("ffn_pre_norm_2", i), norm("ffn_post_norm_2", i), a.rms_norm_eps)
        self.scalar = float(to_f32(model.weight("layer_scalar", i)).reshape(-1)[0])

    def __call__(self, x, cache, pos0, cos, sin):
        """x float32 [T, H], updated in place and returned; ``cos``/``sin`` are the sliding
        layers' tables (a full-attention layer takes its own from the model)."""
        be = self.backend
        if self.is_global:
            cos, sin = self.model.global_tables(pos0, x.shape[0])
        a = self.attn(self.input_layernorm(x), cache, pos0, cos, sin)
        be.add_(x, self.post_attention_layernorm(a))
        m = self.post_mlp_norm(self.dense(self.pre_feedforward_layernorm(x)))
        be.add_(m, self.mlp(x))
        be.add_(x, self.post_feedforward_layernorm(m))
        if self.scalar != 1.0:
            be.scale_(x, self.scalar)
        return x


class Model(base.Model):
    """``Gemma4ForCausalLM`` (or the text model of ``Gemma4ForConditionalGeneration``) over a
    weight source. See :class:`~zipmoe_rt.models.model.Model`; ``self.rope`` is the sliding
    layers' RoPE, :attr:`global_rope` the full-attention layers' (proportional by default)."""

    def __init__(self, source, executor=None, backend=None):
        self._tables = (None, None)
        self.global_rope = None
        super().__init__(source, executor, backend)

    def build_attention(self, i, **options):
        """Attention of layer ``i`` with its layer type's shapes
        (:meth:`~zipmoe_rt.families.gemma4.Gemma4HParams.layer_args`), per-head q/k norms, the
        weightless value norm, softmax scale 1; with ``attention_k_eq_v`` a full-attention
        layer's values are its key projection."""
        a = self.args
        la = a.layer_args(i)
        if la is not a and self.global_rope is None:
            self.global_rope = base.RoPE(la)
        wk = self.weight("attn_k", i)
        wv = self.weight("attn_v", i) if a.tensor_present_at("attn_v", i) else wk
        return base.Attention(la, i, self.weight("attn_q", i), wk, wv, self.weight("attn_o", i),
                              q_norm=self.weight("attn_q_norm", i),
                              k_norm=self.weight("attn_k_norm", i), backend=self.backend,
                              scale=1.0, v_norm=True, **options)

    def build_layer(self, i):
        """:class:`DecoderLayer` ``i``."""
        return DecoderLayer(self, i)

    def global_tables(self, pos0: int, T: int):
        """The full-attention layers' (cos, sin) backend tables for positions pos0..pos0+T-1,
        computed once per forward step and shared by those layers."""
        key, tabs = self._tables
        if key != (pos0, T):
            tabs = tuple(self.backend.upload(*self.global_rope.cos_sin(pos0, T)))
            self._tables = ((pos0, T), tabs)
        return tabs
