"""Qwen3-MoE (transformers ``models/qwen3_moe/configuration_qwen3_moe.py``,
``modeling_qwen3_moe.py``): RMSNorm over head_dim on q and k (``q_norm`` / ``k_norm``, before
RoPE), optional attention biases (``attention_bias``, o_proj included), softmax top-k
renormalised when ``norm_topk_prob``, no shared expert, dense ``Qwen3MoeMLP`` layers outside
``moe_layers``. config.json rules are Qwen2-MoE's (:class:`~.qwen2_moe.QwenMoeHParams`).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .qwen2_moe import QwenMoeHParams


@dataclass
class Qwen3MoeHParams(QwenMoeHParams):
    """Qwen3-MoE's hyper-parameters; defaults are ``Qwen3MoeConfig``'s (``head_dim`` absent
    there: hidden_size // num_attention_heads, as the modeling code's fallback). ``qk_norm`` is
    always True and there is no shared expert."""

    num_attention_heads: int = 32
    num_key_value_heads: int = 4
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 768
    intermediate_size: int = 6144
    qk_norm: bool = True

    FIXED = QwenMoeHParams.FIXED + ("shared_expert_intermediate_size",)
    #: ``intermediate_size`` (the dense layers' width) may be absent: the published
    #: Qwen3-MoE configs have no dense layer and ``Qwen3MoeConfig`` defaults it to 6144.
    REQUIRED = tuple(f for f in QwenMoeHParams.REQUIRED if f != "intermediate_size")

    def validate(self):
        """Base checks; ``qk_norm`` forced True (Qwen3 always normalises q and k)."""
        super().validate()
        self.qk_norm = True


@register("Qwen3MoeForCausalLM")
class Qwen3Moe(Family):
    """Qwen3-MoE family."""

    family = "qwen3_moe"
    model_type = "qwen3_moe"
    hf_config_class = "Qwen3MoeConfig"
    model_module = "qwen3_moe"
    hparams_class = Qwen3MoeHParams
    tensors = T.llama_names(without=("shared_gate", "shared_up", "shared_down",
                                     "shared_expert_gate"))
    fused_tensors = T.FUSED_EXPERT_NAMES
