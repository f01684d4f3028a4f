"""Granite-MoE (transformers ``models/granitemoe/configuration_granitemoe.py``,
``modeling_granitemoe.py``) and Granite-MoE-Shared (``models/granitemoeshared/``): Llama-style
attention (biases on q/k/v/o with ``attention_bias``) whose softmax scale is
``attention_multiplier``; embeddings times ``embedding_multiplier``; each residual branch times
``residual_multiplier``; logits divided by ``logits_scaling``; every layer a sparse block whose
router (``GraniteMoeTopKRouter``) takes the top-k logits and a softmax over those k (the same
weights as a softmax over all experts renormalised over the k); Granite-MoE-Shared adds an
ungated shared SwiGLU MLP (``shared_mlp``, width ``shared_intermediate_size``).

Hub checkpoints store the experts stacked per layer: ``block_sparse_moe.input_linear.weight``
[E, 2I, H] (gate rows, then up rows: ``chunk(2)``) and ``output_linear.weight`` [E, H, I]; the
router is ``block_sparse_moe.router.layer.weight`` (transformers 5 renames them to
``experts.gate_up_proj`` / ``down_proj`` / ``router.weight`` in memory). The shared MLP's
``shared_mlp.input_linear.weight`` is [2 * shared_intermediate_size, H], gate rows first.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .hparams import HParams

_MOE = "model.layers.{i}.block_sparse_moe."
#: the tensor names both Granite MoE classes share (Hub layout).
_NAMES = T.llama_names(
    without=("attn_q_norm", "attn_k_norm", "router", "expert_gate", "expert_up", "expert_down",
             "shared_gate", "shared_up", "shared_down", "shared_expert_gate",
             "mlp_gate", "mlp_up", "mlp_down"),
    router=_MOE + "router.layer.weight",
    experts_gate_up=_MOE + "input_linear.weight",
    experts_down=_MOE + "output_linear.weight")
_FUSED = {"router": _MOE + "router.weight",
          "experts_gate_up": _MOE + "experts.gate_up_proj",
          "experts_down": _MOE + "experts.down_proj"}


@dataclass
class GraniteMoeHParams(HParams):
    """Granite-MoE's hyper-parameters; defaults are ``GraniteMoeConfig``'s.

    config.json: ``num_local_experts`` experts of ``intermediate_size`` (there is no dense MLP:
    ``intermediate_size`` = ``moe_intermediate_size``); ``num_key_value_heads`` null or absent
    means as many as heads. Fixed: the top-k weights always sum to 1 (``norm_topk_prob``), no
    q/k norm, every layer sparse, no sliding window (``GraniteMoeModel``'s causal mask has none).

    Attributes (besides :class:`~.hparams.HParams`'):
        attention_bias: biases on q_proj, k_proj, v_proj and o_proj.
        shared_expert_intermediate_size: 0 (Granite-MoE-Shared: ``shared_intermediate_size``).
        embedding_multiplier: embeddings are multiplied by it.
        residual_multiplier: each attention / MoE output is multiplied by it before the residual
            add.
        attention_multiplier: the attention softmax scale (instead of ``head_dim ** -0.5``).
        logits_scaling: the logits are divided by it.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-6
    max_position_embeddings: int = 2048
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 11008
    intermediate_size: int = 11008
    norm_topk_prob: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: list | None = None
    embedding_multiplier: float = 1.0
    residual_multiplier: float = 1.0
    attention_multiplier: float = 1.0
    logits_scaling: float = 1.0

    CONFIG_KEYS = {"num_experts": ("num_local_experts", "num_experts"),
                   "moe_intermediate_size": ("intermediate_size",)}
    REQUIRED = HParams.REQUIRED + ("moe_intermediate_size",)
    FIXED = HParams.FIXED + ("norm_topk_prob", "qk_norm", "shared_expert_intermediate_size")
    #: the multipliers: finite, and non-zero where the runtime divides or scales by them.
    MULTIPLIERS = ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
                   "logits_scaling")

    def __post_init__(self):
        if self.num_key_value_heads is None:          # GraniteMoeConfig.__post_init__
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__()
        self.intermediate_size = self.moe_intermediate_size   # no dense MLP: one width

    @classmethod
    def _derive(cls, config, kw):
        """The base's rope and every layer sparse; no sliding window."""
        super()._derive(config, kw)
        kw["sliding_window"] = 0

    def validate(self):
        """Base checks; the multipliers finite numbers (``logits_scaling`` non-zero); the top-k
        weights always renormalised, every layer sparse when none is listed.

        Raises:
            ValueError: as the base, or a multiplier that is not a finite number (named).
        """
        super().validate()
        for name in self.MULTIPLIERS:
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or (name == "logits_scaling" and v == 0):
                raise ValueError(f"{name}: {str(v)[:40]!r} is not a finite"
                                 f"{' non-zero' if name == 'logits_scaling' else ''} number")
            setattr(self, name, float(v))
        self.norm_topk_prob = True      # softmax over the top-k logits: weights sum to 1
        if not self.moe_layers:
            self.moe_layers = list(range(self.num_hidden_layers))


@dataclass
class GraniteMoeSharedHParams(GraniteMoeHParams):
    """Granite-MoE-Shared's hyper-parameters (``GraniteMoeSharedConfig``): Granite-MoE's plus
    the shared MLP's width, config.json's ``shared_intermediate_size`` (0: no shared MLP)."""

    CONFIG_KEYS = {**GraniteMoeHParams.CONFIG_KEYS,
                   "shared_expert_intermediate_size": ("shared_intermediate_size",)}
    FIXED = tuple(f for f in GraniteMoeHParams.FIXED if f != "shared_expert_intermediate_size")


@register("GraniteMoeForCausalLM")
class GraniteMoe(Family):
    """Granite-MoE family (ibm-granite/granite-3.0-1b-a400m, -3b-a800m, granite-3.1 MoE)."""

    family = "granitemoe"
    model_type = "granitemoe"
    hf_config_class = "GraniteMoeConfig"
    model_module = "granitemoe"
    hparams_class = GraniteMoeHParams
    tensors = _NAMES
    fused_tensors = _FUSED


@register("GraniteMoeSharedForCausalLM")
class GraniteMoeShared(Family):
    """Granite-MoE-Shared family: Granite-MoE plus ``shared_mlp.input_linear`` /
    ``output_linear`` per layer."""

    family = "granitemoeshared"
    model_type = "granitemoeshared"
    hf_config_class = "GraniteMoeSharedConfig"
    model_module = "granitemoe"
    hparams_class = GraniteMoeSharedHParams
    tensors = {**{k: v for k, v in _NAMES.items() if k not in ("norm", "lm_head")},
               "shared_gate_up": "model.layers.{i}.shared_mlp.input_linear.weight",
               "shared_down": "model.layers.{i}.shared_mlp.output_linear.weight",
               "norm": _NAMES["norm"], "lm_head": _NAMES["lm_head"]}
    fused_tensors = _FUSED
