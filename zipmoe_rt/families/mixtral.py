"""Mixtral (transformers ``models/mixtral/configuration_mixtral.py``, ``modeling_mixtral.py``):
Llama-style attention without biases, every layer a sparse MoE block whose top-k softmax weights
are always renormalised (``MixtralTopKRouter``), no shared expert. Hub checkpoints name the
experts ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .hparams import HParams


@dataclass
class MixtralHParams(HParams):
    """Mixtral's hyper-parameters; defaults are ``MixtralConfig``'s (Mixtral-8x7B).

    config.json: ``num_local_experts`` (or ``num_experts``) experts of ``intermediate_size``
    (``intermediate_size`` always equals ``moe_intermediate_size``: Mixtral has no dense MLP,
    config.json one width); ``norm_topk_prob`` is always True,
    no biases, no q/k norm, no shared expert, every layer sparse; ``default_theta`` 1e6.
    """

    vocab_size: int = 32000
    hidden_size: int = 4096
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096 * 32
    num_experts: int = 8
    num_experts_per_tok: int = 2
    moe_intermediate_size: int = 14336
    intermediate_size: int = 14336
    norm_topk_prob: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: list | None = None

    DEFAULT_ROPE_THETA = 1000000.0
    CONFIG_KEYS = {"num_experts": ("num_local_experts", "num_experts"),
                   "moe_intermediate_size": ("intermediate_size",)}
    REQUIRED = HParams.REQUIRED + ("moe_intermediate_size",)
    FIXED = HParams.FIXED + ("norm_topk_prob", "attention_bias", "qk_norm",
                             "shared_expert_intermediate_size")

    def __post_init__(self):
        super().__post_init__()
        self.intermediate_size = self.moe_intermediate_size   # no dense MLP: one width

    def validate(self):
        """Base checks; then ``norm_topk_prob`` forced True and, when empty, every layer
        sparse (Mixtral has no dense layers). Raises ValueError like the base."""
        super().validate()
        self.norm_topk_prob = True  # MixtralTopKRouter always renormalises
        if not self.moe_layers:
            self.moe_layers = list(range(self.num_hidden_layers))


@register("MixtralForCausalLM")
class Mixtral(Family):
    """Mixtral family. transformers 5 keeps the router and fused experts under ``mlp.`` in
    memory (``mlp.gate``, ``mlp.experts.gate_up_proj`` / ``down_proj``)."""

    family = "mixtral"
    model_type = "mixtral"
    hf_config_class = "MixtralConfig"
    model_module = "mixtral"
    hparams_class = MixtralHParams
    tensors = T.llama_names(
        without=("attn_q_bias", "attn_k_bias", "attn_v_bias", "attn_o_bias", "attn_q_norm",
                 "attn_k_norm", "shared_gate", "shared_up", "shared_down", "shared_expert_gate",
                 "mlp_gate", "mlp_up", "mlp_down"),
        router="model.layers.{i}.block_sparse_moe.gate.weight",
        expert_gate="model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
        expert_up="model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
        expert_down="model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight")
    fused_tensors = dict(T.FUSED_EXPERT_NAMES, router="model.layers.{i}.mlp.gate.weight")
