"""DeepSeek-V2 (transformers ``models/deepseek_v2/configuration_deepseek_v2.py``,
``modeling_deepseek_v2.py``): Multi-head Latent Attention (``q_lora_rank`` low-rank q or a plain
``q_proj``, ``kv_lora_rank`` latent, decoupled ``qk_nope_head_dim`` / ``qk_rope_head_dim`` /
``v_head_dim``, interleaved RoPE), dense ``DeepseekV2MLP`` layers below
``first_k_dense_replace``, then ``DeepseekV2Moe``: softmax routing ``greedy`` or
``group_limited_greedy`` (``n_group`` / ``topk_group``) times ``routed_scaling_factor``, plus
ungated shared experts of width ``n_shared_experts * moe_intermediate_size``.

:class:`MlaHParams` carries the MLA fields and rules the DeepSeek-V3 and GLM-4-MoE-Lite entries
reuse (:mod:`.deepseek_v3`, :mod:`.glm4_moe_lite`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, fields

from . import tensors as T
from .base import Family, register
from .hparams import ConfigError, HParams, layers_from
from .lowprec import fp8_block_size

#: Hub names of the MLA projections and the DeepSeek MoE block (``DeepseekV2Attention``,
#: ``DeepseekV2Moe.shared_experts``).
MLA_NAMES = dict(
    attn_q_a="model.layers.{i}.self_attn.q_a_proj.weight",
    attn_q_a_bias="model.layers.{i}.self_attn.q_a_proj.bias",
    attn_q_a_norm="model.layers.{i}.self_attn.q_a_layernorm.weight",
    attn_q_b="model.layers.{i}.self_attn.q_b_proj.weight",
    attn_kv_a="model.layers.{i}.self_attn.kv_a_proj_with_mqa.weight",
    attn_kv_a_bias="model.layers.{i}.self_attn.kv_a_proj_with_mqa.bias",
    attn_kv_a_norm="model.layers.{i}.self_attn.kv_a_layernorm.weight",
    attn_kv_b="model.layers.{i}.self_attn.kv_b_proj.weight",
    shared_gate="model.layers.{i}.mlp.shared_experts.gate_proj.weight",
    shared_up="model.layers.{i}.mlp.shared_experts.up_proj.weight",
    shared_down="model.layers.{i}.mlp.shared_experts.down_proj.weight",
)
#: Llama-style keys an MLA family never has.
NOT_MLA = ("attn_q_bias", "attn_k", "attn_k_bias", "attn_v", "attn_v_bias", "attn_q_norm",
           "attn_k_norm", "shared_expert_gate")


@dataclass
class MlaHParams(HParams):
    """The fields of Multi-head Latent Attention and the DeepSeek MoE block, with
    ``DeepseekV2Config``'s defaults; subclasses redeclare what their config class changes.

    ``q_lora_rank`` 0 stands for config.json's null (a plain ``q_proj``, DeepSeek-V2-Lite).
    ``head_dim`` is ``qk_rope_head_dim`` (the rotary width; transformers sets it so), the shared
    expert width ``n_shared_experts * moe_intermediate_size``, and ``moe_layers`` the layers from
    ``first_k_dense_replace`` on. ``num_key_value_heads`` is stored but unused: MLA has one
    latent per token and expands a key and a value for every head (DeepSeek's own code ignores
    the field; released configs set it to the head count).
    """

    vocab_size: int = 102400
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    max_position_embeddings: int = 2048
    num_experts: int = 64
    num_experts_per_tok: int | None = None
    moe_intermediate_size: int = 1407
    intermediate_size: int = 11008
    norm_topk_prob: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: list | None = None
    q_lora_rank: int = 1536
    kv_lora_rank: int = 512
    qk_nope_head_dim: int = 128
    qk_rope_head_dim: int = 64
    v_head_dim: int = 128
    n_shared_experts: int = 2
    first_k_dense_replace: int = 0
    routed_scaling_factor: float = 1.0
    topk_method: str = "greedy"
    n_group: int | None = None
    topk_group: int | None = None
    rope_interleave: bool = True

    CONFIG_KEYS = {"num_experts": ("n_routed_experts", "num_experts", "num_local_experts")}
    FIXED = HParams.FIXED + ("head_dim", "qk_norm", "shared_expert_intermediate_size",
                             "rope_interleave")
    OPTIONAL = HParams.OPTIONAL + ("n_group", "topk_group")
    #: routing methods of the family (``topk_method``).
    TOPK_METHODS = ("greedy", "group_limited_greedy")

    def __post_init__(self):
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if type(self.qk_rope_head_dim) is int:
            self.head_dim = self.qk_rope_head_dim
        if type(self.n_shared_experts) is int and type(self.moe_intermediate_size) is int:
            self.shared_expert_intermediate_size = self.n_shared_experts * self.moe_intermediate_size
        if self.moe_layers is None and type(self.first_k_dense_replace) is int:
            self.moe_layers = layers_from(self.first_k_dense_replace, self.num_hidden_layers)
        super().__post_init__()

    @classmethod
    def _derive(cls, config, kw):
        """Base rules, then: a ``quantization_config`` (FP8 releases) is refused; an explicit
        ``q_lora_rank: null`` is 0 (plain ``q_proj``);
        ``head_dim`` is ``qk_rope_head_dim``; sparse layers from ``first_k_dense_replace``
        (``moe_layer_freq`` other than 1 is refused: transformers ignores it, DeepSeek's
        original code does not)."""
        super()._derive(config, kw)
        quant = config.get("quantization_config")
        if quant is not None and "fp8_block_size" in {f.name for f in fields(cls)}:
            kw["fp8_block_size"] = fp8_block_size(config)     # DeepSeek-V3's FP8 releases
        elif quant is not None:
            method = quant.get("quant_method") if isinstance(quant, dict) else quant
            raise ConfigError(f"config.json: quantization_config ({str(method)[:40]}) is not "
                              f"supported: convert a BF16 checkpoint (the FP8 weights of the "
                              f"DeepSeek-V3 / R1 releases dequantised to BF16)")
        if "q_lora_rank" in config and config["q_lora_rank"] is None:
            kw["q_lora_rank"] = 0
        prf = config.get("partial_rotary_factor")
        if prf is not None and prf != 1:
            raise ConfigError(f"config.json: partial_rotary_factor {str(prf)[:40]!r} is not "
                              f"supported with MLA (the whole qk_rope_head_dim rotates)")
        freq = config.get("moe_layer_freq", 1)
        if freq != 1:
            raise ConfigError(f"config.json: moe_layer_freq {str(freq)[:40]!r} is not supported "
                              f"(only 1: transformers' DeepSeek models ignore it)")
        first = kw.get("first_k_dense_replace", cls.first_k_dense_replace)
        if type(first) is int:
            kw["moe_layers"] = layers_from(first, kw.get("num_hidden_layers", 0))

    def to_config(self):
        """:meth:`HParams.to_config` with ``q_lora_rank`` 0 written as null."""
        cfg = super().to_config()
        if not cfg.get("q_lora_rank"):
            cfg["q_lora_rank"] = None
        return cfg

    def validate(self):
        """Derived fields (``head_dim``, shared expert width), then the base checks and the MLA
        and routing ones. Raises ValueError naming the field."""
        for name in ("q_lora_rank", "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim",
                     "v_head_dim", "n_shared_experts", "first_k_dense_replace"):
            v = getattr(self, name)
            lo = 1 if name in ("kv_lora_rank", "v_head_dim") else 0
            if type(v) is not int or not lo <= v < 2 ** 31:
                raise ValueError(f"{name}: {str(v)[:40]!r} is not an integer in {lo}..2**31-1")
        if self.qk_rope_head_dim < 2 or self.qk_rope_head_dim % 2:
            raise ValueError(f"qk_rope_head_dim {self.qk_rope_head_dim} must be even and >= 2 "
                             f"(RoPE)")
        self.head_dim = self.qk_rope_head_dim
        if type(self.moe_intermediate_size) is int:
            self.shared_expert_intermediate_size = self.n_shared_experts * self.moe_intermediate_size
        self.qk_norm = False
        if self.num_experts_per_tok is None:
            raise ValueError("num_experts_per_tok is not set")
        super().validate()
        f = self.routed_scaling_factor
        if isinstance(f, bool) or not isinstance(f, (int, float)) or not (
                math.isfinite(f) and f > 0):
            raise ValueError(f"routed_scaling_factor: {str(f)[:40]!r} is not a positive finite "
                             f"number")
        prf = (self.rope or {}).get("partial_rotary_factor", 1.0)
        if prf != 1.0:
            raise ValueError(f"rope.partial_rotary_factor: {str(prf)[:40]!r} is not supported "
                             f"with MLA (the whole qk_rope_head_dim rotates)")
        if self.topk_method not in self.TOPK_METHODS:
            raise ValueError(f"topk_method: {str(self.topk_method)[:40]!r} is not supported "
                             f"({', '.join(self.TOPK_METHODS)})")
        if self.topk_method != "greedy":
            self._check_groups()

    def _check_groups(self):
        """``n_group`` divides the experts, ``topk_group`` is in 1..n_group, the kept groups
        hold at least top-k experts, and (``noaux_tc``, which scores a group by its two best)
        every group holds two or more."""
        g, k = self.n_group, self.topk_group
        if type(g) is not int or g < 1 or self.num_experts % g:
            raise ValueError(f"n_group: {str(g)[:40]!r} must be a positive divisor of "
                             f"num_experts {self.num_experts} ({self.topk_method})")
        if type(k) is not int or not 1 <= k <= g:
            raise ValueError(f"topk_group: {str(k)[:40]!r} is not in 1..n_group {g}")
        per = self.num_experts // g
        if self.moe_layers and self.num_experts_per_tok > k * per:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} exceeds the "
                             f"{k * per} experts of topk_group {k} groups")
        if self.topk_method == "noaux_tc" and per < 2:
            raise ValueError(f"n_group {g} leaves fewer than 2 experts per group (noaux_tc)")

    def kv_values_per_token(self) -> int:
        """Values the KV cache holds per token, summed over layers: the latent and the rotated
        key, ``num_hidden_layers * (kv_lora_rank + qk_rope_head_dim)`` (float32 each)."""
        return self.num_hidden_layers * (self.kv_lora_rank + self.qk_rope_head_dim)

    def tensor_shape(self, key: str):
        """Shape of the MLA tensors (and ``attn_q`` / ``attn_o``, whose widths MLA changes) for
        :func:`~.tensors.shape`; None for the other keys."""
        H, nh, r = self.hidden_size, self.num_attention_heads, self.kv_lora_rank
        qr, dr = self.q_lora_rank, self.qk_rope_head_dim
        qk = self.qk_nope_head_dim + dr
        return {"attn_q": (nh * qk, H), "attn_q_a": (qr, H), "attn_q_a_bias": (qr,),
                "attn_q_a_norm": (qr,), "attn_q_b": (nh * qk, qr), "attn_kv_a": (r + dr, H),
                "attn_kv_a_bias": (r + dr,), "attn_kv_a_norm": (r,),
                "attn_kv_b": (nh * (self.qk_nope_head_dim + self.v_head_dim), r),
                "attn_o": (H, nh * self.v_head_dim)}.get(key)

    def tensor_present(self, key: str):
        """Which q projections exist (``q_proj`` without ``q_lora_rank``, the low-rank pair and
        its norm with it) and the MLA biases (``attention_bias``), for
        :func:`~.tensors.present`; None for the other keys."""
        low = self.q_lora_rank > 0
        return {"attn_q": not low, "attn_q_a": low, "attn_q_a_norm": low, "attn_q_b": low,
                "attn_q_a_bias": low and bool(self.attention_bias),
                "attn_kv_a_bias": bool(self.attention_bias)}.get(key)


@dataclass
class DeepseekV2HParams(MlaHParams):
    """DeepSeek-V2's hyper-parameters (``DeepseekV2Config``'s defaults). transformers' router
    never renormalises the top-k weights (``norm_topk_prob`` is unused there), so a config that
    asks for it is refused rather than run either way."""

    def validate(self):
        """:meth:`MlaHParams.validate`; ``norm_topk_prob`` must be false."""
        super().validate()
        if self.norm_topk_prob:
            raise ValueError("norm_topk_prob: true is not supported for DeepSeek-V2 "
                             "(transformers' DeepseekV2TopkRouter does not renormalise)")


def mla_names(**names) -> dict:
    """The HUB name table of a DeepSeek-style family: Llama names less :data:`NOT_MLA`, with
    :data:`MLA_NAMES` and ``names`` (key=template) added or replacing."""
    return T.llama_names(without=NOT_MLA, **{**MLA_NAMES, **names})


@register("DeepseekV2ForCausalLM")
class DeepseekV2(Family):
    """DeepSeek-V2 family (DeepSeek-V2, -V2-Chat, -V2-Lite, -V2-Lite-Chat)."""

    family = "deepseek_v2"
    model_type = "deepseek_v2"
    hf_config_class = "DeepseekV2Config"
    model_module = "deepseek_v2"
    hparams_class = DeepseekV2HParams
    tensors = mla_names()
    fused_tensors = T.FUSED_EXPERT_NAMES
