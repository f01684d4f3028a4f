"""OLMoE (transformers ``models/olmoe/configuration_olmoe.py``, ``modeling_olmoe.py``): RMSNorm
over the whole q and k projections (``q_norm`` of ``hidden_size`` = heads * head_dim weights,
``k_norm`` of kv_heads * head_dim, before the split into heads and RoPE), optional clamping of
q, k and v (``clip_qkv``), optional biases on q/k/v/o (``attention_bias``), softmax top-k
routing renormalised only with ``norm_topk_prob``, no shared expert, every layer sparse.
Checkpoints on the Hub (``allenai/OLMoE-1B-7B-0924`` and its variants) name the experts
``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj``.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .hparams import ConfigError, HParams


@dataclass
class OlmoeHParams(HParams):
    """OLMoE's hyper-parameters; defaults are ``OlmoeConfig``'s (OLMoE-1B-7B's shape, except
    ``intermediate_size``: 2048 in the class, 1024 in the released config.json).

    config.json: ``num_experts`` (or ``num_local_experts``) experts of ``intermediate_size``
    (``moe_intermediate_size`` = ``intermediate_size``: there is no dense MLP);
    ``num_key_value_heads`` null or absent means as many as heads; ``clip_qkv`` null means no
    clamping. Fixed: ``qk_norm`` (always, over the whole projection: :attr:`QK_NORM_SCOPE`), no
    shared expert, every layer sparse, no sliding window (``OlmoeModel``'s causal mask has
    none); ``default_theta`` 1e4.

    Attributes (besides :class:`~.hparams.HParams`'):
        attention_bias: biases on q_proj, k_proj, v_proj and o_proj.
        qk_norm: always True.  shared_expert_intermediate_size: always 0.
        moe_layers: every layer.
        clip_qkv: None, or the bound q, k and v are clamped to after the norms (not stored
            while None).
    """

    vocab_size: int = 50304
    hidden_size: int = 2048
    num_hidden_layers: int = 16
    num_attention_heads: int = 16
    num_key_value_heads: int | None = None
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 4096
    num_experts: int = 64
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 2048
    intermediate_size: int = 2048
    norm_topk_prob: bool = False
    attention_bias: bool = False
    qk_norm: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: list | None = None
    clip_qkv: float | None = None

    QK_NORM_SCOPE = "projection"
    CONFIG_KEYS = {"num_experts": ("num_experts", "num_local_experts"),
                   "moe_intermediate_size": ("intermediate_size",)}
    REQUIRED = HParams.REQUIRED + ("moe_intermediate_size",)
    FIXED = HParams.FIXED + ("qk_norm", "shared_expert_intermediate_size")
    OPTIONAL = HParams.OPTIONAL + ("clip_qkv",)

    def __post_init__(self):
        if self.num_key_value_heads is None:              # OlmoeConfig.__post_init__
            self.num_key_value_heads = self.num_attention_heads
        super().__post_init__()
        self.intermediate_size = self.moe_intermediate_size   # no dense MLP: one width

    @classmethod
    def _derive(cls, config, kw):
        """The base's rope and every layer sparse; no sliding window. head_dim (when
        config.json gives one) must be hidden_size / heads: ``q_norm`` has hidden_size weights.

        Raises:
            ConfigError: a head_dim that does not fit hidden_size.
        """
        super()._derive(config, kw)
        kw["sliding_window"] = 0
        H, n = kw.get("hidden_size", cls.hidden_size), kw.get("num_attention_heads",
                                                               cls.num_attention_heads)
        hd = kw.get("head_dim")
        if hd is not None and hd * n != H:
            raise ConfigError(f"config.json: head_dim {hd} * num_attention_heads {n} != "
                              f"hidden_size {H} (OLMoE's q_norm normalises hidden_size values)")

    def validate(self):
        """Base checks; ``qk_norm`` forced True, every layer sparse when none is listed.

        Raises:
            ValueError: as the base, or head_dim * heads != hidden_size.
        """
        super().validate()
        if self.head_dim * self.num_attention_heads != self.hidden_size:
            raise ValueError(f"head_dim {self.head_dim} * num_attention_heads "
                             f"{self.num_attention_heads} != hidden_size {self.hidden_size}")
        self.qk_norm = True
        if not self.moe_layers:
            self.moe_layers = list(range(self.num_hidden_layers))


@register("OlmoeForCausalLM")
class Olmoe(Family):
    """OLMoE family (the Hub layout is transformers 5's too, experts aside)."""

    family = "olmoe"
    model_type = "olmoe"
    hf_config_class = "OlmoeConfig"
    model_module = "olmoe"
    hparams_class = OlmoeHParams
    tensors = T.llama_names(without=("shared_gate", "shared_up", "shared_down",
                                     "shared_expert_gate", "mlp_gate", "mlp_up", "mlp_down"))
    fused_tensors = T.FUSED_EXPERT_NAMES
