"""Typed hyper-parameters of a model family and how ``config.json`` maps to them.

:class:`HParams` is the base dataclass. Each family subclasses it with transformers' class
defaults (``models/<family>/configuration_<family>.py``) and says only what differs: config key
aliases (:attr:`HParams.CONFIG_KEYS`), keys config.json must give (:attr:`HParams.REQUIRED`),
values the family fixes (:attr:`HParams.FIXED`) and derived values (:meth:`HParams._derive`).

One instance is, at once:

- what the converter stores as ``hparams.*`` metadata (:meth:`HParams.to_hparams`; field order
  is the stored key order, so files stay byte-identical),
- the runtime model's arguments (``Model.args``, :mod:`zipmoe_rt.models.model`:
  :meth:`HParams.from_hparams`, :meth:`HParams.validate`, :meth:`HParams.window`),
- the source of a ``config.json`` transformers can load (:meth:`HParams.to_config`).

Importable without torch and Numba.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, fields
from typing import ClassVar

from .config_read import (ConfigError, cast_value, config_bool,  # noqa: F401 (re-exported)
                          config_int, config_list, config_value, layers_from,
                          resolve_partial_rotary, rope_parameters)

#: integer fields and the smallest value each may take.
_COUNTS = {"vocab_size": 1, "hidden_size": 1, "num_hidden_layers": 1, "num_attention_heads": 1,
           "num_key_value_heads": 1, "head_dim": 2, "max_position_embeddings": 1,
           "sliding_window": 0, "num_experts": 0, "num_experts_per_tok": 0,
           "moe_intermediate_size": 0, "intermediate_size": 0,
           "shared_expert_intermediate_size": 0, "max_window_layers": 0}
#: the most layers a config.json may give (per-layer lists are built from it before any
#: tensor is read; the largest released models have ~100)
MAX_LAYERS = 1 << 16
#: RoPE types the runtime implements (models/rope.py).
ROPE_TYPES = ("default", "linear", "llama3", "yarn")
#: scaling fields each RoPE type needs (transformers' modeling_rope_utils ``_validate_*``)
ROPE_REQUIRED = {"linear": ("factor",), "yarn": ("factor",),
                 "llama3": ("factor", "low_freq_factor", "high_freq_factor",
                            "original_max_position_embeddings")}
#: attention kinds of ``layer_types`` the runtime implements
LAYER_TYPES = ("full_attention", "sliding_attention")


@dataclass
class HParams:
    """Normalised hyper-parameters shared by the MoE families (units: element counts unless
    noted). Subclasses redeclare fields with their transformers defaults (a redeclared field
    keeps its place in the order) and append their own.

    Attributes:
        architecture: HF ``architectures[0]``.  family: runtime family name.
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads:
            shapes.
        head_dim: per-head width; None resolves to ``hidden_size // num_attention_heads``.
        rms_norm_eps: epsilon added to the mean square in every RMSNorm.
        max_position_embeddings: trained context length (tokens; yarn defaults only).
        tie_word_embeddings: lm_head is the embedding matrix (no ``lm_head.weight`` in files).
        rope: ``{"rope_type", "rope_theta", scaling fields}``; None resolves to the default
            rope with :attr:`DEFAULT_ROPE_THETA`.
        hidden_act: MLP activation (only ``"silu"`` is supported).
        sliding_window: attention window in tokens (0 = full attention).
        num_experts, num_experts_per_tok (top-k), moe_intermediate_size: the sparse block.
        intermediate_size: dense MLP width (layers outside ``moe_layers``).
        norm_topk_prob: renormalise the top-k router probabilities to sum 1.
        layer_types: per layer ``"full_attention"`` / ``"sliding_attention"``, or None (absent:
            every layer uses ``sliding_window``; not stored).

    Families append ``attention_bias``, ``qk_norm``, ``shared_expert_intermediate_size`` and
    ``moe_layers`` (indices of sparse layers), in their stored order.
    """

    architecture: str = ""
    family: str = ""
    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 32
    head_dim: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    rope: dict | None = None
    hidden_act: str = "silu"
    sliding_window: int = 0
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 14336
    intermediate_size: int = 14336
    norm_topk_prob: bool = False
    layer_types: list | None = None

    #: transformers' ``default_theta`` of the family's config class.
    DEFAULT_ROPE_THETA: ClassVar[float] = 10000.0
    #: what the q/k RMSNorm (``qk_norm``) normalises: ``"head"``, each head over head_dim
    #: (Qwen3: weights [head_dim]), or ``"projection"``, the token's whole q / k projection
    #: before the split into heads (OLMoE: weights [heads * head_dim], [kv_heads * head_dim]).
    QK_NORM_SCOPE: ClassVar[str] = "head"
    #: the decoder norms: ``"rms"`` (RMSNorm, weight only) or ``"layer"`` (LayerNorm with weight
    #: and bias, PhiMoE: ``attn_norm_bias``, ``ffn_norm_bias``, ``norm_bias`` tensors).
    NORM: ClassVar[str] = "rms"
    #: RoPE types the family runs (``rope.rope_type`` outside them is refused).
    ROPE_TYPES: ClassVar[tuple] = ROPE_TYPES
    #: the gate activations the family's MLPs and experts may use (``hidden_act``; names of
    #: :data:`zipmoe_rt.backends.base.ACTIVATIONS`).
    ACTIVATIONS: ClassVar[tuple] = ("silu",)
    #: RoPE rotates the pairs (2i, 2i+1) of each head instead of (i, i + head_dim/2)
    #: (ERNIE 4.5's ``apply_rotary_pos_emb``; models/attention.py).
    ROPE_INTERLEAVED: ClassVar[bool] = False
    #: field -> config.json keys tried in order (default: the field's own name).
    CONFIG_KEYS: ClassVar[dict] = {}
    #: fields config.json must give (the shapes): ConfigError when absent.
    REQUIRED: ClassVar[tuple] = ("vocab_size", "hidden_size", "num_hidden_layers",
                                 "num_attention_heads", "num_experts", "num_experts_per_tok",
                                 "intermediate_size")
    #: fields not read from config.json: fixed by the family (their class default) or set by
    #: :meth:`_derive`.
    FIXED: ClassVar[tuple] = ("architecture", "family", "rope", "sliding_window", "layer_types",
                              "moe_layers")
    #: fields left out of :meth:`to_hparams` while None.
    OPTIONAL: ClassVar[tuple] = ("layer_types", "max_window_layers")
    #: keys an ``hparams`` dict must give to :meth:`from_hparams`.
    REQUIRED_HPARAMS: ClassVar[tuple] = ("family", "vocab_size", "hidden_size",
                                         "num_hidden_layers", "num_attention_heads",
                                         "num_key_value_heads", "head_dim")

    def __post_init__(self):
        if (self.head_dim is None and type(self.num_attention_heads) is int
                and self.num_attention_heads > 0 and type(self.hidden_size) is int):
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.rope is None:
            self.rope = {"rope_type": "default", "rope_theta": float(self.DEFAULT_ROPE_THETA)}
        if getattr(self, "moe_layers", ()) is None:
            self.moe_layers = list(range(self.num_hidden_layers))

    # -- config.json --------------------------------------------------------------------------

    @classmethod
    def from_config(cls, config: dict, architecture: str = "", family: str = "") -> "HParams":
        """Hyper-parameters of an HF config.json: the family's keys, with transformers' class
        defaults for the optional ones.

        Args:
            config: parsed config.json.  architecture, family: stored as given.
        Raises:
            ConfigError: a required key is missing (all of them are named), ``hidden_act`` is
                not silu, or the head counts do not divide.
        """
        kw = {"architecture": architecture, "family": family}
        missing = []
        for f in fields(cls):
            if f.name in cls.FIXED or f.name in kw:
                continue
            keys = cls.CONFIG_KEYS.get(f.name, (f.name,))
            v = config_value(config, keys, None)
            if v is None:
                if f.name in cls.REQUIRED and " / ".join(keys) not in missing:
                    missing.append(" / ".join(keys))
                continue
            kw[f.name] = cast_value(f.name, keys[0], str(f.type).split(" |")[0], v)
        if missing:
            raise ConfigError(f"config.json: missing {', '.join(missing)}")
        for name, lo in _COUNTS.items():    # before _derive sizes lists from them
            v = kw.get(name)
            hi = MAX_LAYERS if name == "num_hidden_layers" else 2 ** 31 - 1
            if v is not None and not lo <= v <= hi:
                key = cls.CONFIG_KEYS.get(name, (name,))[0]
                raise ConfigError(f"config.json: {key} {v} is not in {lo}..{hi}")
        if "num_key_value_heads" in config and config["num_key_value_heads"] is None:
            kw["num_key_value_heads"] = kw["num_attention_heads"]    # transformers' rule
        try:
            cls._derive(config, kw)
        except ConfigError:
            raise
        except (TypeError, ValueError, OverflowError, KeyError) as e:  # a family's own reading
            raise ConfigError(f"config.json: {type(e).__name__}: {e}") from None
        hp = cls(**kw)
        if hp.hidden_act not in cls.ACTIVATIONS:
            key = cls.CONFIG_KEYS.get("hidden_act", ("hidden_act",))[0]
            raise ConfigError(f"config.json: {key} {hp.hidden_act!r} is not supported "
                              f"({', '.join(cls.ACTIVATIONS)} only)")
        try:    # every check the runtime makes on load, on a copy (validate fills fields in)
            copy.deepcopy(hp).validate()
        except (ValueError, TypeError) as e:
            msg = str(e)    # a field is named as config.json spells it (LFM2's norm_eps)
            for name, keys in cls.CONFIG_KEYS.items():
                if keys[0] != name and msg.startswith((f"{name}:", f"{name} ")):
                    msg = keys[0] + msg[len(name):]
                    break
            raise ConfigError(f"config.json: {msg}") from None
        if hp.num_attention_heads % hp.num_key_value_heads:
            raise ConfigError("config.json: num_attention_heads must be a multiple of "
                              "num_key_value_heads")
        return hp

    @classmethod
    def _derive(cls, config: dict, kw: dict) -> None:
        """Set the :attr:`FIXED` fields that come from config.json in a family-specific way
        (base: ``rope``, ``sliding_window``, and every layer sparse)."""
        kw["rope"] = rope_parameters(config, cls.DEFAULT_ROPE_THETA)
        kw["sliding_window"] = config_int(config, "sliding_window", 0) \
            if config.get("sliding_window") is not False else 0
        kw["moe_layers"] = list(range(kw.get("num_hidden_layers", 0)))

    def to_config(self) -> dict:
        """config.json keys for these values (the inverse of :meth:`from_config`; without
        ``architectures`` / ``model_type``, which the family adds).

        Raises:
            ValueError: two fields stored under one config key disagree.
        """
        cfg: dict = {}
        for f in fields(self):
            if f.name in self.FIXED:
                continue
            key = self.CONFIG_KEYS.get(f.name, (f.name,))[0]
            v = copy.deepcopy(getattr(self, f.name))
            if key in cfg and cfg[key] != v:
                raise ValueError(f"{f.name}={v!r} and another field both map to config key "
                                 f"{key!r} ({cfg[key]!r})")
            cfg[key] = v
        cfg["rope_theta"] = float(self.rope["rope_theta"])
        cfg["rope_parameters"] = dict(self.rope)
        cfg["sliding_window"] = self.sliding_window or None
        return cfg

    # -- stored hparams (runtime) -------------------------------------------------------------

    def to_hparams(self) -> dict:
        """The ``hparams`` dict the converter stores (field order; :attr:`OPTIONAL` fields
        left out while None; values copied)."""
        out = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None and f.name in self.OPTIONAL:
                continue
            out[f.name] = copy.deepcopy(v)
        return out

    @classmethod
    def from_hparams(cls, hp: dict) -> "HParams":
        """Model arguments from a stored ``hparams`` dict (unknown keys ignored), normalised
        and checked by :meth:`validate`.

        Raises:
            ValueError: a key of :attr:`REQUIRED_HPARAMS` is missing (named) or values are
                inconsistent.
        """
        missing = [k for k in cls.REQUIRED_HPARAMS if k not in hp]
        if missing:
            raise ValueError(f"hparams: missing {', '.join(missing)}")
        names = {f.name for f in fields(cls)}
        args = cls(**{k: copy.deepcopy(v) for k, v in hp.items() if k in names})
        args.validate()
        return args

    def validate(self) -> None:
        """Check consistency; families also apply their fixed choices here (Mixtral's
        ``norm_topk_prob``, Qwen3's ``qk_norm``, Qwen2's ``layer_types`` derived from
        ``max_window_layers``).

        Raises:
            ValueError: heads not a multiple of KV heads, odd head_dim (RoPE), top-k outside
                1..num_experts with sparse layers, or ``layer_types`` of the wrong length.
        """
        self._check_values()
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE)")
        if self.moe_layers and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} not in "
                             f"1..num_experts {self.num_experts}")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must list one entry per layer")
        if self.layer_types is not None and not all(
                isinstance(t, str) and t in LAYER_TYPES for t in self.layer_types):
            odd = sorted({str(t) for t in self.layer_types} - set(LAYER_TYPES))
            raise ValueError(f"layer_types: only {', '.join(LAYER_TYPES)} are supported, not "
                             f"{str(odd)[:60]}")

    def _check_values(self) -> None:
        """Types and ranges of every value the kernels and tables are sized or computed from
        (a file or config from a stranger may hold anything). Raises ValueError naming the
        field."""
        for name, lo in _COUNTS.items():
            v = getattr(self, name, None)
            if v is None:
                continue
            if type(v) is not int or not lo <= v < 2 ** 31:
                raise ValueError(f"{name}: {str(v)[:40]!r} is not an integer in {lo}..2**31-1")
        eps = self.rms_norm_eps
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
                math.isfinite(eps) and eps > 0):
            raise ValueError(f"rms_norm_eps: {str(eps)[:40]!r} is not a positive finite number")
        if self.hidden_act not in self.ACTIVATIONS:
            raise ValueError(f"hidden_act: {str(self.hidden_act)[:40]!r} is not supported "
                             f"({', '.join(self.ACTIVATIONS)} only)")
        rope = self.rope if self.rope is not None else {}
        if not isinstance(rope, dict):
            raise ValueError(f"rope: {str(rope)[:40]!r} is not an object")
        theta = rope.get("rope_theta", self.DEFAULT_ROPE_THETA)
        if isinstance(theta, bool) or not isinstance(theta, (int, float)) or not (
                math.isfinite(theta) and theta > 0):
            raise ValueError(f"rope.rope_theta: {str(theta)[:40]!r} is not a positive finite "
                             f"number")
        rtype = rope.get("rope_type", rope.get("type", "default")) or "default"
        if rtype not in self.ROPE_TYPES:
            raise ValueError(f"rope.rope_type: {str(rtype)[:40]!r} is not supported "
                             f"({', '.join(self.ROPE_TYPES)})")
        missing = [k for k in ROPE_REQUIRED.get(rtype, ()) if rope.get(k) is None]
        if missing:
            raise ValueError(f"rope: type {rtype} needs {', '.join(missing)}")
        for k in ("factor", "attention_factor", "original_max_position_embeddings",
                  "low_freq_factor", "high_freq_factor", "beta_fast", "beta_slow", "mscale",
                  "mscale_all_dim"):
            v = rope.get(k)
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float))
                                  or not (math.isfinite(v) and v > 0)):
                raise ValueError(f"rope.{k}: {str(v)[:40]!r} is not a positive finite number")
        if rtype == "llama3" and not rope["high_freq_factor"] > rope["low_freq_factor"]:
            raise ValueError("rope: llama3 needs high_freq_factor > low_freq_factor")
        prf = rope.get("partial_rotary_factor")
        if prf is not None:     # models/rope.py's rotary_dim / proportional_inv_freq ranges
            prop = rtype == "proportional"
            if isinstance(prf, bool) or not isinstance(prf, (int, float)) or not (
                    math.isfinite(prf) and (0 <= prf <= 1 if prop else 0 < prf <= 1)):
                raise ValueError(f"rope.partial_rotary_factor: {str(prf)[:40]!r} is not a "
                                 f"number in {'[0, 1]' if prop else '(0, 1]'}")
            hd = self.head_dim
            if not prop and type(hd) is int and hd > 0 and int(hd * float(prf)) < 1:
                raise ValueError(f"rope.partial_rotary_factor {prf} gives no rotary dimension "
                                 f"of head_dim {hd}")
        clip = getattr(self, "clip_qkv", None)
        if clip is not None and (isinstance(clip, bool) or not isinstance(clip, (int, float))
                                 or not (math.isfinite(clip) and clip > 0)):
            raise ValueError(f"clip_qkv: {str(clip)[:40]!r} is not a positive finite number")

    def kv_values_per_token(self) -> int:
        """Values the KV cache holds per token, summed over the decoder layers: a key and a
        value of ``head_dim`` for each of the ``num_key_value_heads`` heads of every layer,
        ``2 * num_key_value_heads * head_dim`` per layer (transformers' ``DynamicLayer``
        caches ``key_states`` and ``value_states`` of shape [batch, kv_heads, T, head_dim]).
        Sliding-window layers cost the same per token: the runtime's cache keeps every position
        (:class:`~zipmoe_rt.models.cache.KVCache`). Families whose attention caches something
        else (multi-head latent attention: a compressed latent per token) override it.

        Multiply by the KV cache's element size
        (:data:`~zipmoe_rt.models.cache.KV_DTYPE`) for bytes.
        """
        return self.num_hidden_layers * 2 * self.num_key_value_heads * self.head_dim

    def require_window(self) -> None:
        """For families whose ``sliding_attention`` layers always take ``sliding_window``
        (gpt-oss, Gemma 4): a positive window when ``layer_types`` has such a layer.
        transformers cannot run one with a window of 0 or null (its mask and the cache's
        shapes disagree), so such a config is refused rather than run as full attention.

        Raises:
            ValueError: a sliding layer and a window below 1 (named).
        """
        if (self.layer_types is not None and "sliding_attention" in self.layer_types
                and not self.sliding_window > 0):
            raise ValueError("sliding_window: 0 or null is not a window of at least 1 token, "
                             "which the sliding_attention layers of layer_types need")

    def window(self, layer: int) -> int:
        """Sliding window of ``layer`` in tokens, 0 for full attention."""
        if self.sliding_window <= 0:
            return 0
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return 0
        return int(self.sliding_window)


def validate_layer_kinds(hp: HParams, validate_rest, kinds: tuple[str, str]) -> None:
    """For families with layers other than attention ones (Qwen3-Next's linear attention,
    LFM2-MoE's short convolutions): ``validate_rest()`` (the family's base checks) with
    ``hp.layer_types`` set aside, then ``layer_types`` one of ``kinds`` per layer.

    Raises:
        ValueError: from ``validate_rest``, or ``layer_types`` not such a list (named).
    """
    types, hp.layer_types = hp.layer_types, None
    try:
        validate_rest()
    finally:
        hp.layer_types = types
    if (not isinstance(types, list) or len(types) != hp.num_hidden_layers
            or not all(t in kinds for t in types)):
        raise ValueError(f"layer_types must list {kinds[0]!r} or {kinds[1]!r} for each of the "
                         f"{hp.num_hidden_layers} layers, not {str(types)[:60]}")
