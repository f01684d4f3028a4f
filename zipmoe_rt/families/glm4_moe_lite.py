"""GLM-4-MoE-Lite (GLM-4.7-Flash; transformers ``models/glm4_moe_lite/
configuration_glm4_moe_lite.py``, ``modeling_glm4_moe_lite.py``): DeepSeek-V3's Multi-head
Latent Attention (``Glm4MoeLiteAttention`` is ``DeepseekV3Attention``) and router (``noaux_tc``,
sigmoid scores with the F32 ``e_score_correction_bias``), GLM-4-MoE's sparse block with ungated
shared experts; which layers are sparse comes from ``mlp_layer_types`` (default: the first
dense, the rest sparse).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .deepseek_v2 import mla_names
from .deepseek_v3 import DeepseekV3HParams
from .hparams import ConfigError


@dataclass
class Glm4MoeLiteHParams(DeepseekV3HParams):
    """GLM-4-MoE-Lite's hyper-parameters (``Glm4MoeLiteConfig``'s defaults). ``moe_layers``
    are the ``"sparse"`` entries of ``mlp_layer_types``; ``first_k_dense_replace`` (not a
    GLM-4-MoE-Lite config key) is stored as the number of leading dense layers."""

    vocab_size: int = 154880
    hidden_size: int = 2048
    num_hidden_layers: int = 47
    num_attention_heads: int = 20
    num_key_value_heads: int | None = 20
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 202752
    num_experts: int = 64
    num_experts_per_tok: int | None = 4
    moe_intermediate_size: int = 1536
    intermediate_size: int = 10240
    q_lora_rank: int = 768
    qk_nope_head_dim: int = 192
    v_head_dim: int = 256
    first_k_dense_replace: int = 1
    routed_scaling_factor: float = 1.8
    n_group: int | None = 1
    topk_group: int | None = 1

    FIXED = DeepseekV3HParams.FIXED + ("first_k_dense_replace",)

    @classmethod
    def _derive(cls, config, kw):
        """:meth:`DeepseekV3HParams._derive`, then ``moe_layers`` from ``mlp_layer_types``
        (``Glm4MoeLiteDecoderLayer``; absent: the first layer dense, the rest sparse).

        Raises:
            ConfigError: ``mlp_layer_types`` not a list of ``"dense"`` / ``"sparse"``, one per
                layer.
        """
        super()._derive(config, kw)
        L = kw.get("num_hidden_layers", cls.num_hidden_layers)
        types = config.get("mlp_layer_types")
        if types is None:
            types = ["dense"] + ["sparse"] * (L - 1)
        if (not isinstance(types, list) or len(types) != L
                or any(t not in ("dense", "sparse") for t in types)):
            raise ConfigError(f"config.json: mlp_layer_types must list 'dense' or 'sparse' for "
                              f"each of the {L} layers, not {str(types)[:60]}")
        kw["moe_layers"] = [i for i, t in enumerate(types) if t == "sparse"]
        kw["first_k_dense_replace"] = next(
            (i for i, t in enumerate(types) if t == "sparse"), L)

    def to_config(self):
        """:meth:`MlaHParams.to_config` with ``mlp_layer_types`` from ``moe_layers``."""
        cfg = super().to_config()
        moe = set(self.moe_layers)
        cfg["mlp_layer_types"] = ["sparse" if i in moe else "dense"
                                  for i in range(self.num_hidden_layers)]
        return cfg


@register("Glm4MoeLiteForCausalLM")
class Glm4MoeLite(Family):
    """GLM-4-MoE-Lite family (GLM-4.7-Flash)."""

    family = "glm4_moe_lite"
    model_type = "glm4_moe_lite"
    hf_config_class = "Glm4MoeLiteConfig"
    model_module = "glm4_moe_lite"
    hparams_class = Glm4MoeLiteHParams
    tensors = mla_names(router_bias="model.layers.{i}.mlp.gate.e_score_correction_bias")
    fused_tensors = T.FUSED_EXPERT_NAMES
