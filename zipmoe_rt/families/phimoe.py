"""PhiMoE (transformers ``models/phimoe/configuration_phimoe.py``, ``modeling_phimoe.py``;
``microsoft/Phi-3.5-MoE-instruct``): LayerNorm with weight and bias for every norm (eps
``rms_norm_eps``), optional biases on q/k/v/o (``attention_bias``) and on the head
(``lm_head_bias``), the sparsemixer top-2 router (``router_jitter_noise`` sets its masks' relative
threshold), experts ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down),
every layer sparse, optional sliding window, and LongRoPE (``rope_scaling`` of type
``longrope``, or ``su`` as Phi-3 spells it) with ``short_mscale`` / ``long_mscale``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .hparams import ConfigError, HParams

#: rope_parameters keys PhiMoE's longrope needs besides rope_type and rope_theta.
LONGROPE_KEYS = ("short_factor", "long_factor", "short_mscale", "long_mscale",
                 "original_max_position_embeddings")


@dataclass
class PhimoeHParams(HParams):
    """PhiMoE's hyper-parameters; defaults are ``PhimoeConfig``'s (Phi-3.5-MoE's shape).

    config.json: ``num_local_experts`` (or ``num_experts``) experts of ``intermediate_size``
    (no dense MLP: ``moe_intermediate_size`` = ``intermediate_size``); ``num_key_value_heads``
    null means as many as heads; ``rope_scaling`` / ``rope_parameters`` of type ``longrope``
    (``su`` read as ``longrope``) must give ``short_factor``, ``long_factor`` (head_dim / 2
    numbers each), ``short_mscale`` and ``long_mscale`` (``PhimoeConfig.validate_rope``);
    ``original_max_position_embeddings`` is taken, as ``standardize_rope_params`` does, from the
    top level of config.json first, then from the rope dict, else ``max_position_embeddings``.
    Fixed: no q/k norm, no shared expert, every layer sparse, ``norm_topk_prob`` False (the
    sparsemixer weights are never renormalised), ``num_experts_per_tok`` 2 (the sparsemixer
    picks two experts whatever the config says, so another value is refused);
    ``default_theta`` 1e6. ``input_jitter_noise`` acts only in training and is not kept.

    Attributes (besides :class:`~.hparams.HParams`'):
        attention_bias: biases on q_proj, k_proj, v_proj and o_proj.
        qk_norm: always False.  shared_expert_intermediate_size: always 0.
        moe_layers: every layer.
        lm_head_bias: a bias on lm_head.
        router_jitter_noise: the sparsemixer's ``jitter_eps``: an expert stays in a masked
            softmax when ``(max - s) / max(|s|, max) <= 2 * router_jitter_noise``.
    """

    vocab_size: int = 32064
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096 * 32
    num_experts: int = 16
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 6400
    intermediate_size: int = 6400
    attention_bias: bool = False
    qk_norm: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: list | None = None
    lm_head_bias: bool = False
    router_jitter_noise: float = 0.01

    DEFAULT_ROPE_THETA = 1000000.0
    NORM = "layer"
    ROPE_TYPES = ("default", "longrope")
    CONFIG_KEYS = {"num_experts": ("num_local_experts", "num_experts"),
                   "moe_intermediate_size": ("intermediate_size",)}
    REQUIRED = HParams.REQUIRED + ("moe_intermediate_size",)
    FIXED = HParams.FIXED + ("norm_topk_prob", "qk_norm", "shared_expert_intermediate_size")

    def __post_init__(self):
        if self.num_key_value_heads is None:              # PhimoeConfig.__post_init__
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__()
        self.intermediate_size = self.moe_intermediate_size   # no dense MLP: one width

    @classmethod
    def _derive(cls, config, kw):
        """The base's rope (``su`` renamed ``longrope``, ``original_max_position_embeddings``
        resolved as transformers does), window and every layer sparse."""
        super()._derive(config, kw)
        rope = kw["rope"]
        if rope["rope_type"] == "su":
            rope["rope_type"] = "longrope"
        if rope["rope_type"] == "longrope":
            top = config.get("original_max_position_embeddings")
            if top is not None:
                rope["original_max_position_embeddings"] = top
            else:
                rope.setdefault("original_max_position_embeddings",
                                kw.get("max_position_embeddings", cls.max_position_embeddings))
            missing = [k for k in LONGROPE_KEYS if rope.get(k) is None]
            if missing:
                raise ConfigError(f"config.json: rope_scaling of type longrope needs "
                                  f"{', '.join(missing)}")

    def validate(self):
        """Base checks; the fixed choices (no renormalisation, no q/k norm, every layer sparse)
        and the longrope fields.

        Raises:
            ValueError: as the base; ``num_experts_per_tok`` not 2 or fewer than 2 experts;
                a ``router_jitter_noise`` that is not a finite number >= 0; longrope fields
                missing or malformed (factors not head_dim / 2 positive numbers, mscales or
                ``original_max_position_embeddings`` not positive).
        """
        super().validate()
        self.norm_topk_prob, self.qk_norm, self.shared_expert_intermediate_size = False, False, 0
        if not self.moe_layers:
            self.moe_layers = list(range(self.num_hidden_layers))
        if self.num_experts_per_tok != 2 or self.num_experts < 2:
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} with "
                             f"{self.num_experts} experts: PhiMoE's sparsemixer router selects "
                             f"exactly 2 experts of at least 2")
        eps = self.router_jitter_noise
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not (
                math.isfinite(eps) and eps >= 0):
            raise ValueError(f"router_jitter_noise: {str(eps)[:40]!r} is not a finite number >= 0")
        rope = self.rope
        if rope.get("rope_type") != "longrope":
            return
        for k in LONGROPE_KEYS:
            v = rope.get(k)
            if k.endswith("_factor"):
                ok = isinstance(v, list) and len(v) == self.head_dim // 2 and all(
                    not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x)
                    and x > 0 for x in v)
                want = f"{self.head_dim // 2} positive numbers (head_dim / 2)"
            else:
                ok = not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(
                    v) and v > 0
                want = "a positive number"
            if not ok:
                raise ValueError(f"rope.{k}: expected {want}, got {str(v)[:60]!r}")


@register("PhimoeForCausalLM", "PhiMoEForCausalLM")
class Phimoe(Family):
    """PhiMoE family: ``PhimoeForCausalLM`` as transformers names it, ``PhiMoEForCausalLM`` as
    the released config.json files do (written for the original remote code). transformers 5
    keeps the router as ``mlp.router`` and the stacked experts under ``mlp.experts`` in memory
    (``conversion_mapping.py``: ``phimoe``)."""

    family = "phimoe"
    model_type = "phimoe"
    hf_config_class = "PhimoeConfig"
    model_module = "phimoe"
    hparams_class = PhimoeHParams
    tensors = T.llama_names(
        without=("attn_q_norm", "attn_k_norm", "shared_gate", "shared_up", "shared_down",
                 "shared_expert_gate", "mlp_gate", "mlp_up", "mlp_down"),
        attn_norm_bias="model.layers.{i}.input_layernorm.bias",
        ffn_norm_bias="model.layers.{i}.post_attention_layernorm.bias",
        router="model.layers.{i}.block_sparse_moe.gate.weight",
        expert_gate="model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
        expert_up="model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
        expert_down="model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
        norm_bias="model.norm.bias",
        lm_head_bias="lm_head.bias")
    fused_tensors = dict(T.FUSED_EXPERT_NAMES, router="model.layers.{i}.mlp.router.weight")
