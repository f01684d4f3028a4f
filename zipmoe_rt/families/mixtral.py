"""Mixtral (transformers ``models/mixtral/configuration_mixtral.py``, ``modeling_mixtral.py``):
Llama-style attention without biases, every layer a sparse MoE block whose top-k softmax weights
are always renormalised (``MixtralTopKRouter``), no shared expert. Hub checkpoints name the
experts ``block_sparse_moe.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down).
"""
from __future__ import annotations

from dataclasses import dataclass

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
    tensors = {
        "embed": "model.embed_tokens.weight",
        "attn_norm": "model.layers.{i}.input_layernorm.weight",
        "attn_q": "model.layers.{i}.self_attn.q_proj.weight",
        "attn_k": "model.layers.{i}.self_attn.k_proj.weight",
        "attn_v": "model.layers.{i}.self_attn.v_proj.weight",
        "attn_o": "model.layers.{i}.self_attn.o_proj.weight",
        "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
        "router": "model.layers.{i}.block_sparse_moe.gate.weight",
        "expert_gate": "model.layers.{i}.block_sparse_moe.experts.{e}.w1.weight",
        "expert_up": "model.layers.{i}.block_sparse_moe.experts.{e}.w3.weight",
        "expert_down": "model.layers.{i}.block_sparse_moe.experts.{e}.w2.weight",
        "norm": "model.norm.weight",
        "lm_head": "lm_head.weight",
    }
    fused_tensors = {
        "router": "model.layers.{i}.mlp.gate.weight",
        "experts_gate_up": "model.layers.{i}.mlp.experts.gate_up_proj",
        "experts_down": "model.layers.{i}.mlp.experts.down_proj",
    }
