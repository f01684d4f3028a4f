"""gpt-oss (transformers ``models/gpt_oss/configuration_gpt_oss.py``, ``modeling_gpt_oss.py``;
openai/gpt-oss-20b, gpt-oss-120b): grouped-query attention with biases on q/k/v/o and a learned
per-head *sink* logit in the softmax denominator (``GptOssAttention.sinks``,
``eager_attention_forward``), sliding-window and full-attention layers alternating
(``layer_types``), YaRN RoPE; every layer a sparse block whose router has a bias
(``GptOssTopKRouter``: top-k of ``x W^T + b``, softmax over those k) and whose experts have
biases and a clamped SwiGLU (``GptOssExperts._apply_gate``: gate clamped above at ``limit``,
up clamped to ``[-limit, limit]``, ``(up + 1) * gate * sigmoid(alpha * gate)``).

Checkpoints (the BF16 release and transformers' ``save_pretrained``) store the experts stacked
per layer in the in x out orientation: ``mlp.experts.gate_up_proj`` [E, H, 2I] (gate and up
interleaved column by column), ``gate_up_proj_bias`` [E, 2I], ``down_proj`` [E, I, H],
``down_proj_bias`` [E, H]. The container keeps each expert's slice as the source bytes (export
gives the tensors back byte for byte); :func:`zipmoe_rt.models.weights.assemble_expert` turns
a slice into the runtime's [out, in] gate, up and down matrices and float32 biases.

The MXFP4 release stores ``gate_up_proj_blocks`` / ``_scales`` and ``down_proj_blocks`` /
``_scales`` instead of the two weights (``quantization_config.quant_method`` ``mxfp4``): the
converter stores them in the expert blocks as they are (roles ``<proj>_blocks`` / ``_scales``,
zipmoe_rt/convert/lowprec.py; format/SPEC.md §5.4) and the runtime dequantises each expert
(zipmoe_rt/engine/lowprec.py); a blocks or scales tensor that is not U8 is refused
(:meth:`GptOss.unsupported_tensor`). :data:`EXPERT_NAMES` is the one table of the expert
tensors' names.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .hparams import HParams, config_int, config_list, rope_parameters

_L = "model.layers.{i}."
#: the expert tensors of a layer, logical key -> name (BF16 layout). The MXFP4 release replaces
#: the two weights by ``<name>_blocks`` (uint8 [E, out, in / 32, 16]: two FP4 values a byte) and
#: ``<name>_scales`` (uint8 [E, out, in / 32]: power-of-two exponents biased by 127).
EXPERT_NAMES = {
    "experts_gate_up_cols": _L + "mlp.experts.gate_up_proj",
    "experts_gate_up_bias": _L + "mlp.experts.gate_up_proj_bias",
    "experts_down_cols": _L + "mlp.experts.down_proj",
    "experts_down_bias": _L + "mlp.experts.down_proj_bias",
}
#: suffixes of the MXFP4 release's expert tensors (``integrations/mxfp4.py``).
MXFP4_SUFFIXES = ("_blocks", "_scales")
#: the expert tensors the MXFP4 release quantises (the biases stay BF16).
MXFP4_KEYS = ("experts_gate_up_cols", "experts_down_cols")

_NAMES = T.llama_names(
    without=("attn_q_norm", "attn_k_norm", "router", "expert_gate", "expert_up", "expert_down",
             "shared_gate", "shared_up", "shared_down", "shared_expert_gate",
             "mlp_gate", "mlp_up", "mlp_down", "norm", "lm_head"),
    attn_sinks=_L + "self_attn.sinks",
    router=_L + "mlp.router.weight",
    router_logit_bias=_L + "mlp.router.bias",
    **EXPERT_NAMES,
)
_NAMES.update(norm=T.LLAMA_NAMES["norm"], lm_head=T.LLAMA_NAMES["lm_head"])

#: ``GptOssConfig.__post_init__``'s rope when config.json gives none.
DEFAULT_ROPE = {"rope_type": "yarn", "factor": 32.0, "beta_fast": 32.0, "beta_slow": 1.0,
                "truncate": False, "original_max_position_embeddings": 4096}


def alternating_layers(n: int) -> list[str]:
    """``GptOssConfig``'s default ``layer_types``: sliding attention on even layers, full on
    odd ones."""
    return ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n)]


@dataclass
class GptOssHParams(HParams):
    """gpt-oss's hyper-parameters; defaults are ``GptOssConfig``'s (gpt-oss-120b's shape).

    config.json: ``num_local_experts`` experts of width ``intermediate_size`` (no dense MLP:
    ``intermediate_size`` = ``moe_intermediate_size``); ``layer_types`` absent means sliding
    and full attention alternating, sliding first; ``sliding_window`` absent means 128 (null
    or 0 is refused: transformers cannot run sliding layers without a window); no rope given means YaRN with factor 32 over 4096 positions (``__post_init__``).
    Fixed: q/k/v/o biases, no q/k norm, no shared expert, every layer sparse, the k weights sum
    to 1 (a softmax over the top-k logits).

    Attributes (besides :class:`~.hparams.HParams`'):
        attention_bias: True (``attention_bias``; biases on q, k, v and o).
        swiglu_alpha: the sigmoid gain of the clamped SwiGLU (1.702).
        swiglu_limit: the clamp of gate (above) and up (both sides) (7.0).
    """

    vocab_size: int = 201088
    hidden_size: int = 2880
    num_hidden_layers: int = 36
    num_attention_heads: int = 64
    num_key_value_heads: int = 8
    head_dim: int | None = 64
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    sliding_window: int = 128
    num_experts: int = 128
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 2880
    intermediate_size: int = 2880
    norm_topk_prob: bool = True
    attention_bias: bool = True
    qk_norm: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: list | None = None
    swiglu_alpha: float = 1.702
    swiglu_limit: float = 7.0

    DEFAULT_ROPE_THETA = 150000.0
    CONFIG_KEYS = {"num_experts": ("num_local_experts", "num_experts"),
                   "moe_intermediate_size": ("intermediate_size",)}
    REQUIRED = HParams.REQUIRED + ("moe_intermediate_size",)
    FIXED = HParams.FIXED + ("norm_topk_prob", "qk_norm", "shared_expert_intermediate_size")

    def __post_init__(self):
        if self.rope is None:                                   # GptOssConfig.__post_init__
            self.rope = {**DEFAULT_ROPE, "rope_theta": self.DEFAULT_ROPE_THETA}
        super().__post_init__()
        self.intermediate_size = self.moe_intermediate_size     # no dense MLP: one width

    @classmethod
    def _derive(cls, config, kw):
        """rope (``GptOssConfig``'s YaRN when none is given), window (128 when absent; null is
        kept as 0, which :meth:`validate` refuses), ``layer_types`` (alternating when absent), every layer sparse."""
        if config.get("rope_parameters") is None and config.get("rope_scaling") is None:
            kw["rope"] = {**DEFAULT_ROPE, "rope_theta": rope_parameters(
                config, cls.DEFAULT_ROPE_THETA)["rope_theta"]}
        else:
            kw["rope"] = rope_parameters(config, cls.DEFAULT_ROPE_THETA)
        explicit_null = "sliding_window" in config and config["sliding_window"] is None
        kw["sliding_window"] = 0 if explicit_null else config_int(config, "sliding_window", 128)
        n = kw.get("num_hidden_layers", 0)
        types = config_list(config, "layer_types", "str")
        kw["layer_types"] = types if types is not None else alternating_layers(n)
        kw["moe_layers"] = list(range(n))

    def to_config(self):
        """The base keys plus ``layer_types``; ``num_local_experts`` and ``intermediate_size``
        for the experts."""
        cfg = super().to_config()
        cfg["layer_types"] = list(self.layer_types)
        return cfg

    def validate(self):
        """``layer_types`` alternating when None; base checks; ``swiglu_alpha`` and
        ``swiglu_limit`` positive finite numbers; the fixed choices (q/k/v/o biases, the k weights renormalised, every layer sparse, no shared
        expert).

        Raises:
            ValueError: as the base, a SwiGLU constant that is not a positive finite number, or
                a sliding window below 1 token (:meth:`~.hparams.HParams.require_window`)
                (named).
        """
        if self.layer_types is None:        # GptOssConfig.__post_init__'s pattern
            self.layer_types = alternating_layers(self.num_hidden_layers)
        super().validate()
        self.require_window()
        for name in ("swiglu_alpha", "swiglu_limit"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not (
                    math.isfinite(v) and v > 0):
                raise ValueError(f"{name}: {str(v)[:40]!r} is not a positive finite number")
            setattr(self, name, float(v))
        if not self.attention_bias:
            raise ValueError("attention_bias: gpt-oss has biases on q, k, v and o "
                             "(attention_bias false is not supported)")
        self.norm_topk_prob = True
        self.qk_norm = False
        self.shared_expert_intermediate_size = 0
        if not self.moe_layers:
            self.moe_layers = list(range(self.num_hidden_layers))


@register("GptOssForCausalLM")
class GptOss(Family):
    """gpt-oss family (openai/gpt-oss-20b, openai/gpt-oss-120b: the MXFP4 release and BF16
    copies)."""

    family = "gpt_oss"
    model_type = "gpt_oss"
    hf_config_class = "GptOssConfig"
    model_module = "gpt_oss"
    hparams_class = GptOssHParams
    tensors = _NAMES
    fused_tensors = {}

    @classmethod
    def tensor_names(cls, key: str, layer: int | None = None) -> tuple[str, ...]:
        """:meth:`Family.tensor_names`, and for the two expert weights the MXFP4 release's
        ``<name>_blocks`` (which stands for the weight with its ``_scales``)."""
        names = super().tensor_names(key, layer)
        return names + tuple(n + "_blocks" for n in names) if key in MXFP4_KEYS else names

    @classmethod
    def unsupported_tensor(cls, name: str, dtype: str) -> str | None:
        """Why a checkpoint tensor cannot be converted, or None: an MXFP4 expert tensor
        (``<expert tensor>_blocks`` / ``_scales``) that is not U8."""
        for template in (EXPERT_NAMES[k] for k in MXFP4_KEYS):
            for suffix in MXFP4_SUFFIXES:
                if re.fullmatch(T.template_regex(template + suffix), name) and dtype != "U8":
                    return (f"tensor {name!r} is {dtype}: MXFP4 expert blocks and scales are "
                            f"U8 (two FP4 values a byte; e8m0 exponents)")
        return None


__all__ = ["GptOss", "GptOssHParams", "EXPERT_NAMES", "MXFP4_KEYS", "MXFP4_SUFFIXES"]
