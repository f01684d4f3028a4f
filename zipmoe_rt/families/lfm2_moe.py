"""LFM2-MoE (transformers ``models/lfm2_moe/configuration_lfm2_moe.py``,
``modeling_lfm2_moe.py``; LiquidAI LFM2-8B-A1B): a hybrid decoder whose ``layer_types`` mix
gated short-convolution layers (``"conv"``: ``Lfm2MoeShortConv``) with grouped-query attention
layers (``"full_attention"``: ``Lfm2MoeAttention``, per-head RMSNorms on q and k); the first
``num_dense_layers`` layers have a dense SwiGLU MLP (``w1``, ``w3``, ``w2``), the rest a sparse
block whose router scores experts by a sigmoid, picks the top-k of the scores plus a float32
``expert_bias`` (``use_expert_bias``), renormalises the unbiased scores (``norm_topk_prob``,
sum + 1e-6) and scales them by ``routed_scaling_factor``. The final norm is
``model.embedding_norm``; embeddings are tied by default.
"""
from __future__ import annotations

from dataclasses import dataclass

from .base import Family, register
from .hparams import ConfigError, HParams, config_list, layers_from, validate_layer_kinds

CONV = "conv"
FULL = "full_attention"
#: LFM2's renormalisation epsilon (``Lfm2MoeTopKRouter``: ``sum + 1e-6``).
RENORM_EPS = 1e-6


@dataclass
class Lfm2MoeHParams(HParams):
    """LFM2-MoE's hyper-parameters; defaults are ``Lfm2MoeConfig``'s.

    config.json: ``norm_eps`` (the RMSNorm epsilon), ``tie_embedding`` (takes precedence over
    ``tie_word_embeddings``, as ``Lfm2MoeConfig.__post_init__`` reads it), ``conv_L_cache``,
    ``layer_types`` (required: ``Lfm2MoeConfig`` has no rule for its absence, and its model
    cannot be built without it), ``num_dense_layers`` (layers ``0 .. n - 1`` dense).

    Attributes (besides :class:`~.hparams.HParams`'):
        attention_bias, qk_norm, shared_expert_intermediate_size: fixed (False, True, 0).
        moe_layers: ``num_dense_layers .. num_hidden_layers - 1``.
        conv_bias: biases on the conv layers' ``in_proj``, ``conv`` and ``out_proj``.
        conv_l_cache: kernel size L of the depthwise causal convolution (``conv_L_cache``).
        num_dense_layers: leading layers with a dense MLP.
        use_expert_bias: the router's choice adds ``expert_bias``.
        routed_scaling_factor: factor on the routing weights, after renormalisation.
    """

    vocab_size: int = 65536
    hidden_size: int = 2048
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 128000
    tie_word_embeddings: bool = True
    num_experts: int = 32
    num_experts_per_tok: int = 4
    moe_intermediate_size: int = 1792
    intermediate_size: int = 7168
    norm_topk_prob: bool = True
    attention_bias: bool = False
    qk_norm: bool = True
    shared_expert_intermediate_size: int = 0
    moe_layers: list | None = None
    conv_bias: bool = False
    conv_l_cache: int = 3
    num_dense_layers: int = 2
    use_expert_bias: bool = True
    routed_scaling_factor: float = 1.0

    DEFAULT_ROPE_THETA = 1000000.0
    #: what the fixed per-sequence state is (``plan``'s state line; ``{n}``: conv layers).
    STATE_OF = "the conv state of {n} short-convolution layers"
    CONFIG_KEYS = {"rms_norm_eps": ("norm_eps",),
                   "tie_word_embeddings": ("tie_embedding", "tie_word_embeddings"),
                   "conv_l_cache": ("conv_L_cache",)}
    REQUIRED = HParams.REQUIRED + ("moe_intermediate_size",)
    FIXED = HParams.FIXED + ("attention_bias", "qk_norm", "shared_expert_intermediate_size")

    def __post_init__(self):
        if (self.moe_layers is None and type(self.num_dense_layers) is int
                and type(self.num_hidden_layers) is int):
            self.moe_layers = layers_from(self.num_dense_layers, self.num_hidden_layers)
        super().__post_init__()

    @classmethod
    def _derive(cls, config, kw):
        """The base rope (``default_theta`` 1e6), no window, ``layer_types`` as given and the
        sparse layers from ``num_dense_layers``.

        Raises:
            ConfigError: ``layer_types`` absent or not a list of names.
        """
        super()._derive(config, kw)
        kw["sliding_window"] = 0
        types = config_list(config, "layer_types", "str")
        if types is None:
            raise ConfigError("config.json: layer_types is missing (Lfm2MoeConfig has no default"
                              f": list {CONV!r} or {FULL!r} for each layer)")
        kw["layer_types"] = types
        n = kw.get("num_hidden_layers", cls.num_hidden_layers)
        kw["moe_layers"] = layers_from(kw.get("num_dense_layers", cls.num_dense_layers), n)

    def to_config(self):
        """config.json keys (``Lfm2MoeConfig``'s names) with ``layer_types``, without the
        window."""
        cfg = super().to_config()
        for k in ("sliding_window", "attention_bias", "qk_norm",
                  "shared_expert_intermediate_size"):
            cfg.pop(k, None)
        cfg["layer_types"] = list(self.layer_types)
        return cfg

    def validate(self):
        """The base checks (``layer_types`` aside), then: ``layer_types`` ``conv`` or
        ``full_attention`` per layer, ``conv_l_cache`` in 1..2**31-1, ``num_dense_layers`` >= 0,
        a finite ``routed_scaling_factor``; ``qk_norm`` True, no attention bias or shared expert,
        ``moe_layers`` from ``num_dense_layers``.

        Raises:
            ValueError: naming the field.
        """
        validate_layer_kinds(self, super().validate, (CONV, FULL))
        for name, lo in (("conv_l_cache", 1), ("num_dense_layers", 0)):
            v = getattr(self, name)
            if type(v) is not int or not lo <= v < 2 ** 31:
                raise ValueError(f"{name}: {str(v)[:40]!r} is not an integer in {lo}..2**31-1")
        s = self.routed_scaling_factor
        if isinstance(s, bool) or not isinstance(s, (int, float)) or s != s or abs(s) == float(
                "inf"):
            raise ValueError(f"routed_scaling_factor: {str(s)[:40]!r} is not a finite number")
        for name in ("conv_bias", "use_expert_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: {str(getattr(self, name))[:40]!r} is not true or false")
        self.qk_norm, self.attention_bias, self.shared_expert_intermediate_size = True, False, 0
        self.moe_layers = layers_from(self.num_dense_layers, self.num_hidden_layers)

    # -- layers, cache sizes -------------------------------------------------------------------

    def linear_layers(self) -> list[int]:
        """Indices of the short-convolution layers (a fixed state each, no KV cache)."""
        return [i for i, t in enumerate(self.layer_types) if t == CONV]

    def window(self, layer: int) -> int:
        """0: attention layers see every position."""
        return 0

    def kv_values_per_token(self) -> int:
        """Keys and values of the attention layers only (``2 * num_key_value_heads *
        head_dim`` each)."""
        full = self.num_hidden_layers - len(self.linear_layers())
        return full * 2 * self.num_key_value_heads * self.head_dim

    def state_values(self) -> int:
        """Values of the fixed per-sequence state of all conv layers, one copy: the last
        ``conv_L_cache - 1`` inputs of the convolution, ``hidden_size`` each (transformers keeps
        ``conv_L_cache`` of them in its cache; the oldest never enters another output)."""
        return len(self.linear_layers()) * (self.conv_l_cache - 1) * self.hidden_size

    # -- tensors -------------------------------------------------------------------------------

    def tensor_shape(self, key: str):
        """Shapes of the short-convolution tensors, for :func:`~.tensors.shape`; None for the
        other keys."""
        H = self.hidden_size
        return {"conv_in": (3 * H, H), "conv_in_bias": (3 * H,),
                "conv_kernel": (H, 1, self.conv_l_cache), "conv_kernel_bias": (H,),
                "conv_out": (H, H), "conv_out_bias": (H,)}.get(key)

    def tensor_present_at(self, key: str, layer: int | None):
        """Conv tensors only in conv layers (their biases with ``conv_bias``), attention tensors
        only in attention layers, ``expert_bias`` with ``use_expert_bias`` (for
        :func:`~.tensors.present`); None (the usual rules) otherwise and outside a layer."""
        if layer is None:
            return None
        conv = self.layer_types[layer] == CONV
        if key.startswith("conv_"):
            return conv and (self.conv_bias or not key.endswith("_bias"))
        if key.startswith("attn_") and key != "attn_norm":
            return False if conv else None
        if key == "router_bias":
            return self.use_expert_bias and layer >= self.num_dense_layers   # moe_layers
        return None


_L = "model.layers.{i}."
_FF = _L + "feed_forward."


@register("Lfm2MoeForCausalLM")
class Lfm2Moe(Family):
    """LFM2-MoE family (LFM2-8B-A1B)."""

    family = "lfm2_moe"
    model_type = "lfm2_moe"
    hf_config_class = "Lfm2MoeConfig"
    model_module = "lfm2_moe"
    hparams_class = Lfm2MoeHParams
    tensors = {
        "embed": "model.embed_tokens.weight",
        "conv_kernel": _L + "conv.conv.weight",
        "conv_kernel_bias": _L + "conv.conv.bias",
        "conv_in": _L + "conv.in_proj.weight",
        "conv_in_bias": _L + "conv.in_proj.bias",
        "conv_out": _L + "conv.out_proj.weight",
        "conv_out_bias": _L + "conv.out_proj.bias",
        "attn_q": _L + "self_attn.q_proj.weight",
        "attn_k": _L + "self_attn.k_proj.weight",
        "attn_v": _L + "self_attn.v_proj.weight",
        "attn_o": _L + "self_attn.out_proj.weight",
        "attn_q_norm": _L + "self_attn.q_layernorm.weight",
        "attn_k_norm": _L + "self_attn.k_layernorm.weight",
        "mlp_gate": _FF + "w1.weight",
        "mlp_up": _FF + "w3.weight",
        "mlp_down": _FF + "w2.weight",
        "router_bias": _FF + "expert_bias",
        "expert_gate": _FF + "experts.{e}.w1.weight",
        "expert_up": _FF + "experts.{e}.w3.weight",
        "expert_down": _FF + "experts.{e}.w2.weight",
        "router": _FF + "gate.weight",
        "attn_norm": _L + "operator_norm.weight",
        "ffn_norm": _L + "ffn_norm.weight",
        "norm": "model.embedding_norm.weight",
        "lm_head": "lm_head.weight",
    }
    fused_tensors = {"experts_gate_up": _FF + "experts.gate_up_proj",
                     "experts_down": _FF + "experts.down_proj"}

