"""Hyper-parameters of a decoder (:class:`ModelArgs`), shared by every family module."""
from __future__ import annotations

from dataclasses import dataclass, field, fields


# ---------------------------------------------------------------------------------------------
# arguments


@dataclass
class ModelArgs:
    """Hyper-parameters of a decoder, built from the registry's normalised ``hparams`` dict
    (:mod:`zipmoe_rt.convert.registry`). Unknown keys are ignored.

    Attributes (units: counts of elements unless noted):
        family: runtime family ("mixtral", "qwen2_moe", "qwen3_moe").
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        head_dim: shapes.
        rms_norm_eps: epsilon added to the mean square.
        rope: {"rope_type", "rope_theta", ...} as in transformers' ``rope_parameters``.
        max_position_embeddings: used by yarn defaults only.
        tie_word_embeddings: lm_head shares the embedding matrix.
        sliding_window: attention window in tokens (key j visible from query i iff
            ``i - window < j <= i``); 0 = full attention.
        layer_types: optional per-layer "full_attention" / "sliding_attention" (transformers'
            ``config.layer_types``); when absent every layer uses ``sliding_window``.
        num_experts, num_experts_per_tok, moe_intermediate_size: sparse block.
        intermediate_size: dense MLP width (layers not in ``moe_layers``).
        norm_topk_prob: renormalise the top-k probabilities to sum 1.
        attention_bias: q/k/v (and, when present in the checkpoint, o) projection biases.
        qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
        shared_expert_intermediate_size: >0 adds a sigmoid-gated shared expert (Qwen2-MoE).
        moe_layers: indices of layers with a sparse block.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int = 0
    layer_types: list | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    intermediate_size: int = 0
    norm_topk_prob: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: list = field(default_factory=list)

    @classmethod
    def from_hparams(cls, hp: dict) -> "ModelArgs":
        """Build from an ``hparams`` dict; keys that are not fields are ignored.

        Raises:
            ValueError: a required key is missing (message names it) or values are inconsistent.
        """
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hp.items() if k in names}
        try:
            args = cls(**kw)
        except TypeError as e:
            raise ValueError(f"hparams: {e}") from None
        args.validate()
        return args

    def validate(self):
        """Raise ValueError when values are inconsistent."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE)")
        if self.moe_layers and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} not in "
                             f"1..num_experts {self.num_experts}")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must list one entry per layer")

    def window(self, layer: int) -> int:
        """Sliding window of ``layer`` in tokens, 0 for full attention."""
        if self.sliding_window <= 0:
            return 0
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return 0
        return int(self.sliding_window)
