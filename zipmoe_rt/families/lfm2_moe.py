"""LFM2-MoE (transformers ``models/lfm2_moe/configuration_lfm2_moe.py``,
``modeling_lfm2_moe.py``; LiquidAI/LFM2-8B-A1B): a hybrid of short-convolution layers
(``layer_types`` ``"conv"``: ``in_proj`` to B, C, x; ``C * conv(B * x)`` with a causal depthwise
convolution of ``conv_L_cache`` taps; ``out_proj``) and attention layers (per-head q/k RMSNorms
``q_layernorm`` / ``k_layernorm``, ``out_proj``); dense SwiGLU MLPs (``w1`` / ``w3`` / ``w2``) in
the first ``num_dense_layers`` layers, sparse blocks after them whose router
(``Lfm2MoeTopKRouter``) takes sigmoid scores, chooses the top-k of score + the F32
``expert_bias`` (with ``use_expert_bias``), renormalises the unbiased scores (with
``norm_topk_prob``) and scales them by ``routed_scaling_factor``. RMSNorm eps is config.json's
``norm_eps``; the final norm is ``embedding_norm``.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .hparams import ConfigError, HParams, config_int, config_list

_L = "model.layers.{i}."


@dataclass
class Lfm2MoeHParams(HParams):
    """LFM2-MoE's hyper-parameters; defaults are ``Lfm2MoeConfig``'s (LFM2-8B-A1B).

    config.json: ``norm_eps``; ``layer_types`` (``"conv"`` / ``"full_attention"`` per layer,
    required: the modeling code reads it); ``num_dense_layers`` leading dense layers
    (``moe_layers`` the rest); ``tie_embedding`` as an alias of ``tie_word_embeddings``.

    Attributes (besides :class:`~.hparams.HParams`'):
        attention_bias, qk_norm, shared_expert_intermediate_size: fixed (none, q/k norms, none).
        moe_layers: sparse layers.  conv_layers: short-convolution layers (the others attend).
        conv_kernel_size: taps of the causal convolution (config.json's ``conv_L_cache``).  conv_bias: biases on the convolution and
            on ``in_proj`` / ``out_proj``.
        use_expert_bias: the router's F32 ``expert_bias`` is added for the choice.
        routed_scaling_factor: the routing weights are multiplied by it.
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
    conv_layers: list | None = None
    conv_kernel_size: int = 3
    conv_bias: bool = False
    use_expert_bias: bool = True
    routed_scaling_factor: float = 1.0

    DEFAULT_ROPE_THETA = 1000000.0
    CONFIG_KEYS = {"rms_norm_eps": ("norm_eps",),
                   "tie_word_embeddings": ("tie_embedding", "tie_word_embeddings"),
                   "conv_kernel_size": ("conv_L_cache",)}
    FIXED = HParams.FIXED + ("attention_bias", "qk_norm", "shared_expert_intermediate_size",
                             "conv_layers")
    #: the layer types of ``Lfm2MoeDecoderLayer``
    KINDS = ("conv", "full_attention")

    @classmethod
    def _derive(cls, config, kw):
        """The base's rope; no window; ``conv_layers`` from ``layer_types`` (required: ConfigError
        when absent or with other kinds); ``moe_layers`` from ``num_dense_layers``."""
        super()._derive(config, kw)
        kw["sliding_window"] = 0
        n = kw.get("num_hidden_layers", 32)
        types = config_list(config, "layer_types", "str")
        if types is None or len(types) != n or set(types) - set(cls.KINDS):
            raise ConfigError(f"config.json: layer_types must give one of "
                              f"{', '.join(cls.KINDS)} for each of the {n} layers")
        kw["conv_layers"] = [i for i, t in enumerate(types) if t == "conv"]
        nd = config_int(config, "num_dense_layers", 2)
        kw["moe_layers"] = list(range(min(nd, n), n))

    def validate(self):
        """Base checks; the conv layers in range and at least 2 taps; the scale finite.

        Raises:
            ValueError: as the base, or a bad conv layer, tap count or scale (named).
        """
        super().validate()
        self.qk_norm = True
        cl = self.conv_layers if self.conv_layers is not None else []
        if not isinstance(cl, list) or not all(type(i) is int and 0 <= i < self.num_hidden_layers
                                               for i in cl):
            raise ValueError(f"conv_layers: {str(cl)[:40]!r} are not layer indices")
        self.conv_layers = cl
        k = self.conv_kernel_size
        if type(k) is not int or not 2 <= k <= 64:
            raise ValueError(f"conv_kernel_size (config.json's conv_L_cache): {str(k)[:40]!r} "
                             f"is not in 2..64")
        s = self.routed_scaling_factor
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not s == s or abs(s) == \
                float("inf"):
            raise ValueError(f"routed_scaling_factor: {str(s)[:40]!r} is not a finite number")
        for name in ("conv_bias", "use_expert_bias"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name}: {str(getattr(self, name))[:40]!r} is not true or "
                                 f"false")

    def is_conv(self, layer: int) -> bool:
        """Whether ``layer`` is a short-convolution layer."""
        return layer in self.conv_layers

    def tensor_present_at(self, key: str, layer: int | None):
        """Attention tensors in attention layers, convolution tensors in conv layers (their
        biases with ``conv_bias``), the router's expert bias with ``use_expert_bias``; None:
        the shared rule."""
        if layer is None:
            return None
        if key.startswith("attn_") and key != "attn_norm" and self.is_conv(layer):
            return False
        if key.startswith("conv_"):
            return self.is_conv(layer) and (self.conv_bias or not key.endswith("_bias"))
        if key == "router_bias":
            return layer in self.moe_layers and self.use_expert_bias
        return None

    def tensor_shape_at(self, key: str, layer: int | None):
        """The convolution tensors' shapes; None: the shared shapes."""
        H, L = self.hidden_size, self.conv_kernel_size
        return {"conv_weight": (H, 1, L), "conv_weight_bias": (H,), "conv_in": (3 * H, H),
                "conv_in_bias": (3 * H,), "conv_out": (H, H), "conv_out_bias": (H,)}.get(key)

    def kv_values_per_token(self) -> int:
        """Per token: a key and a value per kv head of every attention layer, and the
        convolution input (``hidden_size`` values) of every conv layer, which the runtime keeps
        for every position so that any prefix can be cropped back to
        (:class:`~zipmoe_rt.models.shortconv.ShortConv`)."""
        n_conv = len(self.conv_layers)
        return ((self.num_hidden_layers - n_conv) * 2 * self.num_key_value_heads * self.head_dim
                + n_conv * self.hidden_size)

    def to_config(self) -> dict:
        """config.json keys ``Lfm2MoeConfig`` reads into this model."""
        cfg = super().to_config()
        cfg["layer_types"] = ["conv" if self.is_conv(i) else "full_attention"
                              for i in range(self.num_hidden_layers)]
        cfg["num_dense_layers"] = self.num_hidden_layers - len(self.moe_layers)
        cfg.pop("sliding_window", None)
        return cfg


@register("Lfm2MoeForCausalLM")
class Lfm2Moe(Family):
    """LFM2-MoE family (LiquidAI/LFM2-8B-A1B). Hub checkpoints name the experts
    ``feed_forward.experts.{e}.w1`` (gate) / ``w3`` (up) / ``w2`` (down)."""

    family = "lfm2_moe"
    model_type = "lfm2_moe"
    hf_config_class = "Lfm2MoeConfig"
    model_module = "lfm2_moe"
    hparams_class = Lfm2MoeHParams
    tensors = {
        "embed": "model.embed_tokens.weight",
        "conv_weight": _L + "conv.conv.weight",
        "conv_weight_bias": _L + "conv.conv.bias",
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
        "mlp_gate": _L + "feed_forward.w1.weight",
        "mlp_up": _L + "feed_forward.w3.weight",
        "mlp_down": _L + "feed_forward.w2.weight",
        "router_bias": _L + "feed_forward.expert_bias",
        "expert_gate": _L + "feed_forward.experts.{e}.w1.weight",
        "expert_up": _L + "feed_forward.experts.{e}.w3.weight",
        "expert_down": _L + "feed_forward.experts.{e}.w2.weight",
        "router": _L + "feed_forward.gate.weight",
        "attn_norm": _L + "operator_norm.weight",
        "ffn_norm": _L + "ffn_norm.weight",
        "norm": "model.embedding_norm.weight",
        "lm_head": "lm_head.weight",
    }
    fused_tensors = {"experts_gate_up": _L + "feed_forward.experts.gate_up_proj",
                     "experts_down": _L + "feed_forward.experts.down_proj"}
