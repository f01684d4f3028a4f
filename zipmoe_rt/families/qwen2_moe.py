"""Qwen2-MoE / Qwen1.5-MoE (transformers ``models/qwen2_moe/configuration_qwen2_moe.py``,
``modeling_qwen2_moe.py``): q/k/v projection biases (``qkv_bias``), softmax top-k routing
renormalised when ``norm_topk_prob``, a shared expert scaled by ``sigmoid(shared_expert_gate(x))``,
dense ``Qwen2MoeMLP`` layers outside ``moe_layers`` (``mlp_only_layers`` /
``decoder_sparse_step``). :class:`QwenMoeHParams` holds the rules Qwen3-MoE shares.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .hparams import (ConfigError, HParams, config_bool, config_int, config_list,
                      rope_parameters)


@dataclass
class QwenMoeHParams(HParams):
    """Rules shared by Qwen2-MoE and Qwen3-MoE.

    config.json: ``num_experts`` (or ``num_local_experts``); sparse layers are those not in
    ``mlp_only_layers`` with ``(i + 1) % decoder_sparse_step == 0``; the window applies only
    with ``use_sliding_window``; ``layer_types`` and ``max_window_layers`` are kept when given.

    Attributes (besides :class:`~.hparams.HParams`'):
        max_window_layers: layers below it use the window (``Qwen2MoeConfig``); None = absent.
        moe_layers, attention_bias, qk_norm, shared_expert_intermediate_size: see the base.
    """

    vocab_size: int = 151936
    hidden_size: int = 2048
    num_hidden_layers: int = 24
    max_position_embeddings: int = 32768
    rms_norm_eps: float = 1e-6
    norm_topk_prob: bool = False
    max_window_layers: int | None = None
    moe_layers: list | None = None
    attention_bias: bool = False
    qk_norm: bool = False
    shared_expert_intermediate_size: int = 0

    CONFIG_KEYS = {"num_experts": ("num_experts", "num_local_experts")}
    REQUIRED = HParams.REQUIRED + ("moe_intermediate_size",)
    FIXED = HParams.FIXED + ("qk_norm",)
    #: transformers' window when ``use_sliding_window`` is set without ``sliding_window``.
    DEFAULT_WINDOW = 4096

    @classmethod
    def _derive(cls, config, kw):
        """rope; window only with ``use_sliding_window``; ``layer_types`` when given;
        ``moe_layers`` from ``decoder_sparse_step`` / ``mlp_only_layers``
        (``Qwen2MoeDecoderLayer``)."""
        kw["rope"] = rope_parameters(config, cls.DEFAULT_ROPE_THETA)
        kw["sliding_window"] = 0
        if config_bool(config, "use_sliding_window", False):
            kw["sliding_window"] = config_int(   # an explicit null: no window, as transformers
                config, "sliding_window", 0 if "sliding_window" in config else cls.DEFAULT_WINDOW)
        if config.get("layer_types"):
            kw["layer_types"] = config_list(config, "layer_types", "str")
        step = config_int(config, "decoder_sparse_step", 1, lo=None)
        if step < 1:    # Qwen2MoeDecoderLayer divides by it: every step-th layer is sparse
            raise ConfigError(f"config.json: decoder_sparse_step must be at least 1 (every "
                              f"n-th layer is a MoE layer), got {step}")
        only = set(config_list(config, "mlp_only_layers", "int") or [])
        kw["moe_layers"] = [i for i in range(kw["num_hidden_layers"])
                            if i not in only and kw["num_experts"] > 0 and step > 0
                            and (i + 1) % step == 0]

    def to_config(self):
        """The base keys plus ``use_sliding_window``, ``decoder_sparse_step`` 1 and
        ``mlp_only_layers`` (the layers outside ``moe_layers``); None values left out."""
        cfg = {k: v for k, v in super().to_config().items() if v is not None}
        cfg["use_sliding_window"] = self.sliding_window > 0
        if self.sliding_window > 0:
            cfg["sliding_window"] = self.sliding_window
        if self.layer_types is not None:
            cfg["layer_types"] = list(self.layer_types)
        cfg["decoder_sparse_step"] = 1
        moe = set(self.moe_layers)
        cfg["mlp_only_layers"] = [i for i in range(self.num_hidden_layers) if i not in moe]
        return cfg


@dataclass
class Qwen2MoeHParams(QwenMoeHParams):
    """Qwen2-MoE's hyper-parameters; defaults are ``Qwen2MoeConfig``'s (Qwen1.5-MoE-A2.7B,
    with rope_theta 1e4). ``attention_bias`` is config.json's ``qkv_bias``."""

    num_attention_heads: int = 16
    num_key_value_heads: int = 16
    num_experts: int = 60
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1408
    intermediate_size: int = 5632
    attention_bias: bool = True
    shared_expert_intermediate_size: int = 5632

    CONFIG_KEYS = {**QwenMoeHParams.CONFIG_KEYS, "attention_bias": ("qkv_bias",)}

    def validate(self):
        """Derive ``layer_types`` from ``max_window_layers`` as ``Qwen2MoeConfig`` does (when
        a window is set and no ``layer_types`` is given), then the base checks."""
        if (self.layer_types is None and self.sliding_window > 0
                and self.max_window_layers is not None):
            self.layer_types = ["sliding_attention" if (i + 1) % 2 and i < self.max_window_layers
                                else "full_attention" for i in range(self.num_hidden_layers)]
        super().validate()


@register("Qwen2MoeForCausalLM")
class Qwen2Moe(Family):
    """Qwen2-MoE family (the Hub layout is transformers 5's too, experts aside)."""

    family = "qwen2_moe"
    model_type = "qwen2_moe"
    hf_config_class = "Qwen2MoeConfig"
    model_module = "qwen2_moe"
    hparams_class = Qwen2MoeHParams
    tensors = T.llama_names(without=("attn_o_bias", "attn_q_norm", "attn_k_norm"))
    fused_tensors = T.FUSED_EXPERT_NAMES
