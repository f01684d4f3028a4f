"""Qwen3-Next and Qwen3.5-MoE (transformers ``models/qwen3_next/configuration_qwen3_next.py``,
``modeling_qwen3_next.py``; ``models/qwen3_5_moe/configuration_qwen3_5_moe.py``,
``modeling_qwen3_5_moe.py``): hybrid decoders whose ``layer_types`` mix Gated DeltaNet
linear-attention layers (``"linear_attention"``) with gated full-attention layers
(``"full_attention"``, by default every ``full_attention_interval`` = 4th layer); zero-centred
RMSNorms (weight applied as ``1 + w``) on the residual stream and on q/k; partial rotary
(``partial_rotary_factor`` 0.25); softmax top-k routing over many small experts plus a shared
expert scaled by ``sigmoid(shared_expert_gate(x))``.

Three architectures: ``Qwen3NextForCausalLM`` (fused ``in_proj_qkvz`` / ``in_proj_ba``; dense
``Qwen3NextMLP`` layers outside ``moe_layers``), ``Qwen3_5MoeForCausalLM`` (separate
``in_proj_qkv``, ``in_proj_z``, ``in_proj_b``, ``in_proj_a``; every layer sparse, the top-k
always renormalised) and the text model of ``Qwen3_5MoeForConditionalGeneration`` (the same
under ``model.language_model.``, hyper-parameters under ``text_config``; the vision tower and the
multi-token-prediction head are not converted).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .hparams import (ConfigError, config_int, config_list, resolve_partial_rotary,
                      validate_layer_kinds)
from .qwen2_moe import QwenMoeHParams

LINEAR = "linear_attention"
FULL = "full_attention"
#: the linear-attention sizes (config.json keys, all positive integers).
LINEAR_DIMS = ("linear_conv_kernel_dim", "linear_key_head_dim", "linear_value_head_dim",
               "linear_num_key_heads", "linear_num_value_heads")


@dataclass
class Qwen3NextHParams(QwenMoeHParams):
    """Qwen3-Next's hyper-parameters; defaults are ``Qwen3NextConfig``'s.

    config.json: ``layer_types`` (else ``full_attention_interval``, default 4: layer ``i`` is
    full attention when ``(i + 1) % interval == 0``), ``partial_rotary_factor`` (in
    ``rope_parameters`` or top level; default 0.25), sparse layers as Qwen2-MoE
    (``decoder_sparse_step``, ``mlp_only_layers``). ``qk_norm`` is always True.

    Attributes (besides :class:`~.qwen2_moe.QwenMoeHParams`'):
        linear_conv_kernel_dim: K of the causal conv1d.
        linear_key_head_dim, linear_value_head_dim: dk, dv.
        linear_num_key_heads, linear_num_value_heads: nk, nv (nv a multiple of nk).
    """

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 48
    num_attention_heads: int = 16
    num_key_value_heads: int = 2
    head_dim: int | None = 256
    num_experts: int = 512
    num_experts_per_tok: int = 10
    moe_intermediate_size: int = 512
    intermediate_size: int = 5632
    norm_topk_prob: bool = True
    qk_norm: bool = True
    shared_expert_intermediate_size: int = 512
    linear_conv_kernel_dim: int = 4
    linear_key_head_dim: int = 128
    linear_value_head_dim: int = 128
    linear_num_key_heads: int = 16
    linear_num_value_heads: int = 32

    PARTIAL_ROTARY_FACTOR = 0.25
    FULL_ATTENTION_INTERVAL = 4

    def __post_init__(self):
        if self.rope is None:
            self.rope = {"rope_type": "default", "rope_theta": float(self.DEFAULT_ROPE_THETA),
                         "partial_rotary_factor": self.PARTIAL_ROTARY_FACTOR}
        if self.layer_types is None and type(self.num_hidden_layers) is int:
            self.layer_types = self.default_layer_types(self.num_hidden_layers,
                                                        self.FULL_ATTENTION_INTERVAL)
        super().__post_init__()

    @staticmethod
    def default_layer_types(n: int, interval: int) -> list[str]:
        """``Qwen3NextConfig.__post_init__``'s rule: full attention where ``(i + 1) % interval
        == 0``, linear attention elsewhere."""
        return [LINEAR if (i + 1) % interval else FULL for i in range(n)]

    @classmethod
    def _derive(cls, config, kw):
        """Qwen2-MoE's rules (rope, sparse layers), no window, ``partial_rotary_factor``
        (``rope_parameters``' own, else top level, else 0.25) and ``layer_types`` (given, else
        from ``full_attention_interval``).

        Raises:
            ConfigError: ``full_attention_interval`` not a positive integer, ``layer_types``
                not a list of names, or ``partial_rotary_factor`` not a number.
        """
        super()._derive(config, kw)
        kw["sliding_window"] = 0
        resolve_partial_rotary(kw["rope"], config, cls.PARTIAL_ROTARY_FACTOR)
        n = kw.get("num_hidden_layers", cls.num_hidden_layers)
        types = config_list(config, "layer_types", "str")
        if types is None:
            interval = config_int(config, "full_attention_interval", cls.FULL_ATTENTION_INTERVAL)
            if interval < 1:
                raise ConfigError("config.json: full_attention_interval must be at least 1")
            types = cls.default_layer_types(n, interval)
        kw["layer_types"] = types

    def to_config(self):
        """Qwen2-MoE's keys with ``layer_types``, without the window keys."""
        cfg = super().to_config()
        for k in ("use_sliding_window", "sliding_window", "max_window_layers"):
            cfg.pop(k, None)
        cfg["layer_types"] = list(self.layer_types)
        return cfg

    def validate(self):
        """The base checks (``layer_types`` aside), then: ``layer_types`` one of
        ``linear_attention`` / ``full_attention`` per layer, the linear sizes positive integers
        with ``linear_num_value_heads`` a multiple of ``linear_num_key_heads``; ``qk_norm``
        forced True.

        Raises:
            ValueError: naming the field.
        """
        validate_layer_kinds(self, super().validate, (LINEAR, FULL))
        self.qk_norm = True
        for name in LINEAR_DIMS:
            v = getattr(self, name)
            if type(v) is not int or not 1 <= v < 2 ** 31:
                raise ValueError(f"{name}: {str(v)[:40]!r} is not an integer in 1..2**31-1")
        if self.linear_num_value_heads % self.linear_num_key_heads:
            raise ValueError(f"linear_num_value_heads {self.linear_num_value_heads} must be a "
                             f"multiple of linear_num_key_heads {self.linear_num_key_heads}")

    # -- layers, cache sizes -------------------------------------------------------------------

    def linear_layers(self) -> list[int]:
        """Indices of the linear-attention layers."""
        return [i for i, t in enumerate(self.layer_types) if t == LINEAR]

    def window(self, layer: int) -> int:
        """0: full-attention layers see every position."""
        return 0

    def kv_values_per_token(self) -> int:
        """Keys and values of the full-attention layers only (``2 * num_key_value_heads *
        head_dim`` each); the linear layers hold a fixed state instead
        (:meth:`state_values`)."""
        full = self.num_hidden_layers - len(self.linear_layers())
        return full * 2 * self.num_key_value_heads * self.head_dim

    def conv_dim(self) -> int:
        """Channels of the conv1d: ``2 * nk * dk + nv * dv``."""
        return (2 * self.linear_num_key_heads * self.linear_key_head_dim
                + self.linear_num_value_heads * self.linear_value_head_dim)

    def state_values(self) -> int:
        """Values of the fixed per-sequence state of all linear layers, one copy each: the conv
        state ``(K - 1) * conv_dim`` and the recurrent state ``nv * dk * dv`` per layer
        (transformers' ``conv_states`` and ``recurrent_states``). The runtime's
        :class:`~zipmoe_rt.models.cache.RecurrentCache` holds three copies (committed, pending
        and marked)."""
        per = ((self.linear_conv_kernel_dim - 1) * self.conv_dim()
               + self.linear_num_value_heads * self.linear_key_head_dim
               * self.linear_value_head_dim)
        return len(self.linear_layers()) * per

    # -- tensors -------------------------------------------------------------------------------

    def tensor_shape(self, key: str):
        """The gated ``q_proj`` (twice as wide) and the linear-attention tensors, for
        :func:`~.tensors.shape`; None for the other keys."""
        H, q2 = self.hidden_size, 2 * self.num_attention_heads * self.head_dim
        nk, nv = self.linear_num_key_heads, self.linear_num_value_heads
        dk, dv = self.linear_key_head_dim, self.linear_value_head_dim
        C = self.conv_dim()
        return {"attn_q": (q2, H), "attn_q_bias": (q2,),
                "lin_qkvz": (2 * nk * dk + 2 * nv * dv, H), "lin_ba": (2 * nv, H),
                "lin_qkv": (C, H), "lin_z": (nv * dv, H), "lin_b": (nv, H), "lin_a": (nv, H),
                "lin_conv": (C, 1, self.linear_conv_kernel_dim), "lin_dt_bias": (nv,),
                "lin_A_log": (nv,), "lin_norm": (dv,), "lin_out": (H, nv * dv)}.get(key)

    def tensor_present_at(self, key: str, layer: int | None):
        """Attention tensors only in full-attention layers, ``lin_*`` only in linear ones (for
        :func:`~.tensors.present`); None (the usual rules) otherwise and outside a layer."""
        if layer is None:
            return None
        linear = self.layer_types[layer] == LINEAR
        if key.startswith("lin_"):
            return linear
        if key.startswith("attn_") and key not in ("attn_norm", "attn_norm_bias") and linear:
            return False
        return None


@dataclass
class Qwen3_5MoeHParams(Qwen3NextHParams):
    """Qwen3.5-MoE's text hyper-parameters; defaults are ``Qwen3_5MoeTextConfig``'s. Every
    layer is sparse and the top-k weights are always renormalised (the config has no
    ``intermediate_size``, ``decoder_sparse_step``, ``mlp_only_layers`` or
    ``norm_topk_prob``)."""

    vocab_size: int = 248320
    num_hidden_layers: int = 40
    num_experts: int = 256
    num_experts_per_tok: int = 8
    intermediate_size: int = 0

    REQUIRED = tuple(k for k in QwenMoeHParams.REQUIRED if k != "intermediate_size")
    FIXED = QwenMoeHParams.FIXED + ("intermediate_size", "norm_topk_prob")

    @classmethod
    def _derive(cls, config, kw):
        """Qwen3-Next's rules, every layer sparse."""
        super()._derive(config, kw)
        kw["moe_layers"] = list(range(kw.get("num_hidden_layers", cls.num_hidden_layers)))

    def to_config(self):
        """Qwen3-Next's keys less those the Qwen3.5 text config does not have."""
        cfg = super().to_config()
        for k in ("intermediate_size", "decoder_sparse_step", "mlp_only_layers",
                  "norm_topk_prob"):
            cfg.pop(k, None)
        return cfg

    def validate(self):
        """Qwen3-Next's checks; ``norm_topk_prob`` True and every layer sparse."""
        super().validate()
        self.norm_topk_prob = True
        self.moe_layers = list(range(self.num_hidden_layers))


@dataclass
class Qwen3_5MoeVLHParams(Qwen3_5MoeHParams):
    """The text model of ``Qwen3_5MoeForConditionalGeneration``: the hyper-parameters are
    read from config.json's ``text_config`` (``tie_word_embeddings`` from the top level, as
    ``Qwen3_5MoeConfig`` keeps it there)."""

    @classmethod
    def from_config(cls, config, architecture="", family=""):
        """:meth:`Qwen3_5MoeHParams.from_config` of ``config["text_config"]``.

        Raises:
            ConfigError: no ``text_config`` object, or as the base.
        """
        text = config.get("text_config")
        if not isinstance(text, dict):
            raise ConfigError("config.json: text_config must be an object holding the text "
                              "model's hyper-parameters")
        merged = dict(text)
        if "tie_word_embeddings" in config:
            merged["tie_word_embeddings"] = config["tie_word_embeddings"]
        return super().from_config(merged, architecture, family)


def _names(prefix: str, linear: dict, without=()) -> dict:
    """The Llama-style table with the linear-attention keys after the q/k norms, ``model.``
    replaced by ``prefix``."""
    out = {}
    for k, v in T.llama_names(without=without).items():
        out[k] = v.replace("model.", prefix, 1)
        if k == "attn_k_norm":
            out.update((lk, lv.replace("model.", prefix, 1)) for lk, lv in linear.items())
    return out


_LIN = "model.layers.{i}.linear_attn."
_COMMON_LIN = {"lin_conv": _LIN + "conv1d.weight", "lin_dt_bias": _LIN + "dt_bias",
               "lin_A_log": _LIN + "A_log", "lin_norm": _LIN + "norm.weight",
               "lin_out": _LIN + "out_proj.weight"}
_NEXT_LIN = {"lin_qkvz": _LIN + "in_proj_qkvz.weight", "lin_ba": _LIN + "in_proj_ba.weight",
             **_COMMON_LIN}
_QWEN35_LIN = {"lin_qkv": _LIN + "in_proj_qkv.weight", "lin_z": _LIN + "in_proj_z.weight",
               "lin_b": _LIN + "in_proj_b.weight", "lin_a": _LIN + "in_proj_a.weight",
               **_COMMON_LIN}


@register("Qwen3NextForCausalLM")
class Qwen3Next(Family):
    """Qwen3-Next family."""

    family = "qwen3_next"
    model_type = "qwen3_next"
    hf_config_class = "Qwen3NextConfig"
    model_module = "qwen3_next"
    hparams_class = Qwen3NextHParams
    tensors = _names("model.", _NEXT_LIN)
    fused_tensors = T.FUSED_EXPERT_NAMES


@register("Qwen3_5MoeForCausalLM")
class Qwen3_5Moe(Family):
    """Qwen3.5-MoE text family (``Qwen3_5MoeForCausalLM``)."""

    family = "qwen3_5_moe"
    model_type = "qwen3_5_moe_text"
    hf_config_class = "Qwen3_5MoeTextConfig"
    model_module = "qwen3_5_moe"
    hparams_class = Qwen3_5MoeHParams
    tensors = _names("model.", _QWEN35_LIN, without=("mlp_gate", "mlp_up", "mlp_down"))
    fused_tensors = T.FUSED_EXPERT_NAMES


@register("Qwen3_5MoeForConditionalGeneration")
class Qwen3_5MoeVL(Family):
    """The text model of ``Qwen3_5MoeForConditionalGeneration`` (tensors under
    ``model.language_model.``; ``model.visual.*`` and ``mtp.*`` are left out)."""

    family = "qwen3_5_moe_vl"
    model_type = "qwen3_5_moe"
    hf_config_class = "Qwen3_5MoeConfig"
    model_module = "qwen3_5_moe"
    hparams_class = Qwen3_5MoeVLHParams
    tensors = _names("model.language_model.", _QWEN35_LIN,
                     without=("mlp_gate", "mlp_up", "mlp_down"))
    fused_tensors = {k: v.replace("model.", "model.language_model.", 1)
                     for k, v in T.FUSED_EXPERT_NAMES.items()}
    #: name prefixes of the checkpoint's tensors that belong to towers this family does not
    #: run (stored as unused tensors, exported as they came).
    other_towers = ("model.visual.",)

    @classmethod
    def hf_config(cls, hp) -> dict:
        """A ``Qwen3_5MoeConfig`` config.json: the text keys under ``text_config``."""
        hp = cls.as_hparams(hp)
        text = {"model_type": Qwen3_5Moe.model_type, **hp.to_config()}
        return {"architectures": [cls.hf_names[0]], "model_type": cls.model_type,
                "tie_word_embeddings": text.pop("tie_word_embeddings"), "text_config": text}
