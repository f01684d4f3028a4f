"""Gemma 4 MoE (transformers ``models/gemma4/configuration_gemma4.py``, ``modeling_gemma4.py``):
``Gemma4ForCausalLM`` and the text model of ``Gemma4ForConditionalGeneration`` (Gemma 4
26B-A4B).

What the text model does (``Gemma4TextDecoderLayer``): sandwich RMSNorms (plain ``w * x``, not
Gemma 1-3's ``1 + w``) around attention and the feed-forward block; embeddings times
``sqrt(hidden_size)``; attention with per-head q/k RMSNorms, a weightless RMSNorm on the values
and a softmax scale of 1; ``sliding_attention`` layers (``head_dim``, ``num_key_value_heads``,
default RoPE) and ``full_attention`` layers (``global_head_dim``, ``num_global_key_value_heads``
with ``attention_k_eq_v``, where the value is the key projection, and proportional RoPE); in
every layer of a MoE model a dense GELU-tanh MLP *and* the routed GELU-tanh experts, each with
its own norms, summed; a router on the un-normed residual (weightless RMSNorm times ``scale``
times ``hidden_size ** -0.5``, softmax over all experts, top-k renormalised, times
``per_expert_scale``); every layer's output times its ``layer_scalar``; logits soft-capped by
``final_logit_softcapping`` when set.

Not built, refused by the converter naming the config field: per-layer inputs
(``hidden_size_per_layer_input`` > 0, the E2B/E4B models), shared KV layers
(``num_kv_shared_layers``), the double-wide MLP, bidirectional attention (``"all"``), dense
models (``enable_moe_block`` false) and biases (``attention_bias``).

Hub checkpoints store the experts stacked (``experts.gate_up_proj`` [E, 2I, H], gate rows first,
and ``experts.down_proj`` [E, H, I]); the ConditionalGeneration checkpoint holds the text model
under ``model.language_model.`` (its vision and audio towers are not converted).
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, replace

from .base import Family, register
from .hparams import (ROPE_TYPES, ConfigError, HParams, config_bool, config_int, config_list,
                      config_value)

#: transformers' ``default_rope_params`` of ``Gemma4TextConfig.__post_init__``
DEFAULT_ROPE = {"sliding_attention": {"rope_type": "default", "rope_theta": 10000.0},
                "full_attention": {"rope_type": "proportional", "partial_rotary_factor": 0.25,
                                   "rope_theta": 1000000.0}}
#: ``sliding_window_pattern`` of the default ``layer_types`` (5 sliding : 1 full)
PATTERN = 6


def _names(p: str) -> dict:
    """The tensor table (Hub = in-memory names) under the text model prefix ``p``."""
    L = p + "layers.{i}."
    return {
        "embed": p + "embed_tokens.weight",
        "layer_scalar": L + "layer_scalar",
        "attn_q": L + "self_attn.q_proj.weight",
        "attn_q_norm": L + "self_attn.q_norm.weight",
        "attn_k_norm": L + "self_attn.k_norm.weight",
        "attn_k": L + "self_attn.k_proj.weight",
        "attn_v": L + "self_attn.v_proj.weight",
        "attn_o": L + "self_attn.o_proj.weight",
        "mlp_gate": L + "mlp.gate_proj.weight",
        "mlp_up": L + "mlp.up_proj.weight",
        "mlp_down": L + "mlp.down_proj.weight",
        "attn_norm": L + "input_layernorm.weight",
        "attn_post_norm": L + "post_attention_layernorm.weight",
        "ffn_norm": L + "pre_feedforward_layernorm.weight",
        "ffn_post_norm": L + "post_feedforward_layernorm.weight",
        "router_scale": L + "router.scale",
        "router_expert_scale": L + "router.per_expert_scale",
        "router": L + "router.proj.weight",
        "experts_gate_up": L + "experts.gate_up_proj",
        "experts_down": L + "experts.down_proj",
        "ffn_post_norm_1": L + "post_feedforward_layernorm_1.weight",
        "ffn_post_norm_2": L + "post_feedforward_layernorm_2.weight",
        "ffn_pre_norm_2": L + "pre_feedforward_layernorm_2.weight",
        "norm": p + "norm.weight",
        "lm_head": "lm_head.weight",
    }


def _rope(sub, key: str) -> dict:
    """One layer type's RoPE dict (``rope_parameters[key]``) with ``rope_type`` (default
    ``"default"``) and a float ``rope_theta`` (default 10000, ``default_theta``)."""
    if not isinstance(sub, dict):
        raise ConfigError(f"config.json: rope_parameters.{key} must be an object, not "
                          f"{str(sub)[:40]!r}")
    out = dict(sub)
    out["rope_type"] = out.get("rope_type") or out.pop("type", None) or "default"
    theta = out.get("rope_theta", 10000.0)
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"config.json: rope_parameters.{key}.rope_theta must be a number")
    out["rope_theta"] = float(theta)
    return out


@dataclass
class Gemma4HParams(HParams):
    """Gemma 4's text hyper-parameters; defaults are ``Gemma4TextConfig``'s.

    config.json (or its ``text_config``): ``top_k_experts`` experts per token,
    ``hidden_activation``; ``rope_parameters`` per layer type; the full-attention layers' head
    size and kv heads from ``global_head_dim`` / ``num_global_key_value_heads`` (the latter
    only with ``attention_k_eq_v``, as ``Gemma4TextConfig.__post_init__``) or from a saved
    ``per_layer_config``. ``layer_types`` absent: every sixth layer full, the last layer always
    full (transformers forces it).

    Attributes (besides :class:`~.hparams.HParams`'; ``rope`` is the sliding layers' RoPE):
        attention_bias, qk_norm, shared_expert_intermediate_size, moe_layers: fixed (no bias,
            q/k norms, no shared expert, every layer sparse).
        global_head_dim: head size of the full-attention layers.
        num_global_key_value_heads: their kv heads (resolved: ``num_key_value_heads`` unless
            ``attention_k_eq_v`` and config.json gives one).
        attention_k_eq_v: full-attention layers have no v_proj; the value is the key
            projection (before its norm and RoPE).
        global_rope: the full-attention layers' RoPE (``proportional`` by default).
        final_logit_softcapping: logits = tanh(logits / cap) * cap; None: none.
    """

    vocab_size: int = 262144
    hidden_size: int = 2304
    num_hidden_layers: int = 30
    num_attention_heads: int = 8
    num_key_value_heads: int = 4
    head_dim: int | None = 256
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    hidden_act: str = "gelu_pytorch_tanh"
    sliding_window: int = 512
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 9216
    intermediate_size: int = 9216
    norm_topk_prob: bool = True
    attention_bias: bool = False
    qk_norm: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: list | None = None
    global_head_dim: int = 512
    num_global_key_value_heads: int | None = None
    attention_k_eq_v: bool = False
    global_rope: dict | None = None
    final_logit_softcapping: float | None = None

    ACTIVATIONS = ("gelu_pytorch_tanh",)
    ROPE_TYPES = ROPE_TYPES + ("proportional",)
    CONFIG_KEYS = {"num_experts_per_tok": ("top_k_experts",),
                   "hidden_act": ("hidden_activation",)}
    REQUIRED = HParams.REQUIRED + ("moe_intermediate_size",)
    FIXED = HParams.FIXED + ("norm_topk_prob", "attention_bias", "qk_norm",
                             "shared_expert_intermediate_size", "global_head_dim",
                             "num_global_key_value_heads", "global_rope")
    OPTIONAL = HParams.OPTIONAL + ("final_logit_softcapping",)
    #: config.json fields of features the runtime does not build: (key, transformers'
    #: default, the value the runtime needs)
    UNSUPPORTED = (("enable_moe_block", False, True), ("hidden_size_per_layer_input", 256, 0),
                   ("num_kv_shared_layers", 0, 0), ("use_double_wide_mlp", False, False),
                   ("attention_bias", False, False))

    def __post_init__(self):
        super().__post_init__()
        if self.num_global_key_value_heads is None:
            self.num_global_key_value_heads = self.num_key_value_heads
        if self.global_rope is None:
            self.global_rope = copy.deepcopy(DEFAULT_ROPE["full_attention"])

    @classmethod
    def _derive(cls, config, kw):
        """Refuse the unbuilt features (named); the two RoPEs, the window, the layer pattern
        and the full-attention layers' head size and kv heads (``per_layer_config`` or
        ``global_head_dim`` / ``num_global_key_value_heads``)."""
        for key, default, need in cls.UNSUPPORTED:
            v = config.get(key, default)
            if v is None:
                v = default
            if v != need:
                raise ConfigError(f"config.json: {key} {v!r} is not supported (Gemma 4 runs "
                                  f"with {key} = {need!r}{'; absent means ' + repr(default) if default != need else ''})")
        bidi = config.get("use_bidirectional_attention")
        if bidi not in (None, "vision"):
            raise ConfigError(f"config.json: use_bidirectional_attention {bidi!r} is not "
                              f"supported (causal text attention only)")
        rp = config.get("rope_parameters")
        rp = DEFAULT_ROPE if rp is None else rp
        if not isinstance(rp, dict) or set(rp) - set(DEFAULT_ROPE):
            raise ConfigError("config.json: rope_parameters must map sliding_attention and "
                              "full_attention to their RoPE parameters")
        for t in DEFAULT_ROPE:
            if t not in rp:
                raise ConfigError(f"config.json: rope_parameters has no {t}")
        kw["rope"] = _rope(rp["sliding_attention"], "sliding_attention")
        kw["global_rope"] = _rope(rp["full_attention"], "full_attention")
        kw["sliding_window"] = (0 if "sliding_window" in config and config["sliding_window"]
                                is None else config_int(config, "sliding_window", 512))
        n = kw.get("num_hidden_layers", 30)
        types = config_list(config, "layer_types", "str")
        if types is None:
            types = ["sliding_attention" if (i + 1) % PATTERN else "full_attention"
                     for i in range(n)]
        if len(types) != n:     # before per_layer_config, which is keyed by these layers
            raise ConfigError(f"config.json: layer_types must list one entry per layer "
                              f"({n}), not {len(types)}")
        types[-1] = "full_attention"            # Gemma4TextConfig forces it (with a warning)
        kw["layer_types"] = types
        kw["moe_layers"] = list(range(n))
        k_eq_v = config_bool(config, "attention_k_eq_v", False)
        kv = kw.get("num_key_value_heads", 4)
        plc = config.get("per_layer_config")
        if plc is not None:     # keys as transformers reads them: layer numbers ("05" = 5)
            full = {i for i, t in enumerate(types) if t == "full_attention"}
            try:
                got = {int(k) for k in plc} if isinstance(plc, dict) else None
            except (TypeError, ValueError):
                got = None
            if got != full or not all(
                    isinstance(v, dict) and set(v) <= {"head_dim", "num_key_value_heads"}
                    and "head_dim" in v for v in plc.values()):
                raise ConfigError("config.json: per_layer_config must give head_dim (and "
                                  "num_key_value_heads) for exactly the full_attention layers")
            vals = {(v["head_dim"], v.get("num_key_value_heads", kv)) for v in plc.values()}
            if len(vals) != 1:
                raise ConfigError("config.json: per_layer_config gives the full_attention "
                                  "layers different shapes (not supported)")
            gh, gkv = vals.pop()
        else:
            gh = config_int(config, "global_head_dim", 512, lo=2)
            gkv = config.get("num_global_key_value_heads") if k_eq_v else None
            gkv = kv if gkv is None else gkv
        for name, v in (("global_head_dim", gh), ("num_global_key_value_heads", gkv)):
            if type(v) is not int or not 1 <= v < 2 ** 31:
                raise ConfigError(f"config.json: {name} {str(v)[:40]!r} is not a positive "
                                  f"integer")
        kw["global_head_dim"], kw["num_global_key_value_heads"] = gh, gkv

    def validate(self):
        """Base checks; the fixed choices (norm_topk_prob, qk_norm, every layer sparse); both
        RoPEs, the global head size (even) and kv heads (dividing the heads), the soft cap.

        Raises:
            ValueError: as the base, a bad global shape, RoPE or cap, or a sliding window below
                1 token (:meth:`~.hparams.HParams.require_window`) (named).
        """
        super().validate()
        self.require_window()
        self.norm_topk_prob, self.qk_norm = True, True
        if not self.moe_layers:
            self.moe_layers = list(range(self.num_hidden_layers))
        for name, v in (("global_head_dim", self.global_head_dim),
                        ("num_global_key_value_heads", self.num_global_key_value_heads)):
            if type(v) is not int or not 1 <= v < 2 ** 31:
                raise ValueError(f"{name}: {str(v)[:40]!r} is not a positive integer")
        if not isinstance(self.attention_k_eq_v, bool):
            raise ValueError(f"attention_k_eq_v: {str(self.attention_k_eq_v)[:40]!r} is not "
                             f"true or false")
        if self.global_head_dim % 2:
            raise ValueError(f"global_head_dim {self.global_head_dim} must be even (RoPE)")
        if self.num_attention_heads % self.num_global_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of "
                             "num_global_key_value_heads")
        rope, hd = self.rope, self.head_dim     # the full layers' RoPE, checked as the base does
        self.rope, self.head_dim = self.global_rope, self.global_head_dim
        try:
            self._check_values()
        except ValueError as e:
            raise ValueError(f"global_rope (full_attention): {e}") from None
        finally:
            self.rope, self.head_dim = rope, hd
        cap = self.final_logit_softcapping
        if cap is not None and (isinstance(cap, bool) or not isinstance(cap, (int, float))
                                or not (math.isfinite(cap) and cap > 0)):
            raise ValueError(f"final_logit_softcapping: {str(cap)[:40]!r} is not a positive "
                             f"finite number")
        if self.layer_types is None:
            raise ValueError("layer_types: Gemma 4 needs the layer pattern")

    @property
    def embedding_multiplier(self) -> float:
        """``sqrt(hidden_size)``: ``Gemma4TextScaledWordEmbedding``'s ``embed_scale`` (float32
        in a float32 run; transformers rounds it to the weights' dtype, so a BF16 run of
        transformers multiplies by its BF16 rounding)."""
        return float(self.hidden_size) ** 0.5

    def is_global(self, layer: int) -> bool:
        """Whether ``layer`` is a full-attention layer."""
        return self.layer_types[layer] == "full_attention"

    def layer_args(self, layer: int) -> "Gemma4HParams":
        """These hyper-parameters as ``layer``'s attention sees them: for a full-attention layer
        ``head_dim`` = ``global_head_dim``, ``num_key_value_heads`` =
        ``num_global_key_value_heads`` and ``rope`` = ``global_rope``; a sliding layer's are
        these."""
        if not self.is_global(layer):
            return self
        return replace(self, head_dim=self.global_head_dim, rope=self.global_rope,
                       num_key_value_heads=self.num_global_key_value_heads)

    # -- per-layer tensors (families/tensors.py hooks) -----------------------------------------

    def tensor_present_at(self, key: str, layer: int | None):
        """The dense MLP is in every layer (beside the experts); no v_proj in full-attention
        layers with ``attention_k_eq_v``; None: the shared rule."""
        if key in ("mlp_gate", "mlp_up", "mlp_down"):
            return layer is not None
        if key == "attn_v" and layer is not None:
            return not (self.attention_k_eq_v and self.is_global(layer))
        return None

    def tensor_shape_at(self, key: str, layer: int | None):
        """Attention shapes of a full-attention layer (its head size and kv heads); None: the
        shared shapes."""
        if layer is None or not self.is_global(layer) or not key.startswith("attn_"):
            return None
        gh, H = self.global_head_dim, self.hidden_size
        q, kv = self.num_attention_heads * gh, self.num_global_key_value_heads * gh
        return {"attn_q": (q, H), "attn_k": (kv, H), "attn_v": (kv, H), "attn_o": (H, q),
                "attn_q_norm": (gh,), "attn_k_norm": (gh,)}.get(key)

    def kv_values_per_token(self) -> int:
        """Keys and values per token over the layers, each layer with its own kv heads and head
        size (``2 * kv_heads * head_dim``)."""
        return sum(2 * a.num_key_value_heads * a.head_dim
                   for a in map(self.layer_args, range(self.num_hidden_layers)))

    def to_config(self) -> dict:
        """config.json keys transformers' ``Gemma4TextConfig`` reads into this model."""
        cfg = super().to_config()
        cfg.pop("rope_theta", None)
        cfg["rope_parameters"] = {"sliding_attention": dict(self.rope),
                                  "full_attention": dict(self.global_rope)}
        cfg["sliding_window"] = self.sliding_window
        cfg["layer_types"] = list(self.layer_types)
        cfg["global_head_dim"] = self.global_head_dim
        if self.attention_k_eq_v:
            cfg["num_global_key_value_heads"] = self.num_global_key_value_heads
        cfg.update(enable_moe_block=True, hidden_size_per_layer_input=0, num_kv_shared_layers=0,
                   use_double_wide_mlp=False)
        return cfg


@register("Gemma4ForCausalLM")
class Gemma4Text(Family):
    """Gemma 4 text model (``Gemma4ForCausalLM``, model_type ``gemma4_text``)."""

    family = "gemma4_text"
    model_type = "gemma4_text"
    hf_config_class = "Gemma4TextConfig"
    model_module = "gemma4"
    hparams_class = Gemma4HParams
    tensors = _names("model.")
    fused_tensors: dict = {}


@register("Gemma4ForConditionalGeneration")
class Gemma4(Family):
    """The text model of ``Gemma4ForConditionalGeneration`` (google/gemma-4-26B-A4B(-it)):
    hyper-parameters from config.json's ``text_config`` (``tie_word_embeddings`` from the top
    level when given there), tensors under ``model.language_model.``; the vision and audio
    towers (``model.vision_tower.*``, ``model.embed_vision.*``, ``model.audio_tower.*``,
    ``model.embed_audio.*``) are not converted."""

    family = "gemma4"
    model_type = "gemma4"
    hf_config_class = "Gemma4Config"
    model_module = "gemma4"
    hparams_class = Gemma4HParams
    tensors = _names("model.language_model.")
    fused_tensors: dict = {}

    def typed_hparams(self) -> HParams:
        """:meth:`Family.typed_hparams` of ``text_config``.

        Raises:
            ConfigError: no ``text_config`` object, or as the text model's reading.
        """
        tc = self.config.get("text_config")
        if not isinstance(tc, dict):
            raise ConfigError("config.json: Gemma4ForConditionalGeneration needs a text_config "
                              "object")
        tc = dict(tc)
        if self.config.get("tie_word_embeddings") is not None:
            tc["tie_word_embeddings"] = self.config["tie_word_embeddings"]
        return self.hparams_class.from_config(tc, self.name, self.family)

    @classmethod
    def hf_config(cls, hp) -> dict:
        """config.json of a ``Gemma4ForConditionalGeneration`` without vision or audio tower,
        the text model in ``text_config``."""
        hp = cls.as_hparams(hp)
        text = dict(model_type="gemma4_text", **hp.to_config())
        return {"architectures": [cls.hf_names[0]], "model_type": cls.model_type,
                "text_config": text, "vision_config": None, "audio_config": None,
                "tie_word_embeddings": hp.tie_word_embeddings}


__all__ = ["Gemma4HParams", "Gemma4Text", "Gemma4", "config_value"]
