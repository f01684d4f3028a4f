"""DeepSeek-V3 (transformers ``models/deepseek_v3/configuration_deepseek_v3.py``,
``modeling_deepseek_v3.py``; DeepSeek-V3, -V3-Base, -V3-0324, -V3.1, R1, and the same
structure in Kimi-K2): DeepSeek-V2's Multi-head Latent Attention, with ``rope_interleave``
(default true) choosing interleaved or half-split RoPE, and ``DeepseekV3TopkRouter``
(``noaux_tc``): sigmoid scores, the F32 ``e_score_correction_bias`` added for the choice only,
groups ranked by the sum of their two best scores, the unbiased scores of the chosen experts
renormalised (``norm_topk_prob``, default true) and times ``routed_scaling_factor``.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .deepseek_v2 import MlaHParams, mla_names
from .hparams import ConfigError
from .lowprec import check_fp8_block_size


@dataclass
class DeepseekV3HParams(MlaHParams):
    """DeepSeek-V3's hyper-parameters (``DeepseekV3Config``'s defaults). ``topk_method`` is
    always ``noaux_tc`` (transformers' router has no other; a config.json naming another method
    or a ``scoring_func`` other than sigmoid is refused)."""

    vocab_size: int = 129280
    hidden_size: int = 7168
    num_hidden_layers: int = 61
    num_attention_heads: int = 128
    num_key_value_heads: int | None = 128
    max_position_embeddings: int = 4096
    num_experts: int = 256
    num_experts_per_tok: int | None = 8
    moe_intermediate_size: int = 2048
    intermediate_size: int = 18432
    norm_topk_prob: bool = True
    n_shared_experts: int = 1
    first_k_dense_replace: int = 3
    routed_scaling_factor: float = 2.5
    topk_method: str = "noaux_tc"
    n_group: int | None = 8
    topk_group: int | None = 4
    #: FP8 releases: ``quantization_config.weight_block_size`` (families/lowprec.py); None for
    #: a BF16 checkpoint (not stored)
    fp8_block_size: list | None = None

    FIXED = tuple(f for f in MlaHParams.FIXED if f != "rope_interleave") + ("topk_method",
                                                                            "fp8_block_size")
    OPTIONAL = MlaHParams.OPTIONAL + ("fp8_block_size",)
    TOPK_METHODS = ("noaux_tc",)

    @classmethod
    def _derive(cls, config, kw):
        """:meth:`MlaHParams._derive`; ``topk_method`` / ``scoring_func`` when given must be
        ``noaux_tc`` / ``sigmoid`` (what transformers runs)."""
        super()._derive(config, kw)
        for key, want in (("topk_method", "noaux_tc"), ("scoring_func", "sigmoid")):
            if config.get(key, want) != want:
                raise ConfigError(f"config.json: {key} {str(config[key])[:40]!r} is not "
                                  f"supported ({want} only)")

    def validate(self):
        """:meth:`MlaHParams.validate`, and a stored ``fp8_block_size`` is two positive
        integers. Raises ValueError naming the field."""
        check_fp8_block_size(self.fp8_block_size)
        super().validate()


@register("DeepseekV3ForCausalLM")
class DeepseekV3(Family):
    """DeepSeek-V3 family (DeepSeek-V3, -V3.1, R1; Kimi-K2's structure)."""

    family = "deepseek_v3"
    model_type = "deepseek_v3"
    hf_config_class = "DeepseekV3Config"
    model_module = "deepseek_v3"
    hparams_class = DeepseekV3HParams
    tensors = mla_names(router_bias="model.layers.{i}.mlp.gate.e_score_correction_bias")
    fused_tensors = T.FUSED_EXPERT_NAMES
