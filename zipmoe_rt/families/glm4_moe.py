"""GLM-4-MoE (GLM-4.5, GLM-4.5-Air, GLM-4.6, GLM-4.7; transformers
``models/glm4_moe/configuration_glm4_moe.py``, ``modeling_glm4_moe.py``): grouped-query
attention with q/k/v biases (``attention_bias``; o_proj has none), optional per-head q/k
RMSNorm (``use_qk_norm``), partial rotary embeddings (``partial_rotary_factor``, default 0.5:
the first half of each head turns, in ``rotate_half`` layout), dense ``Glm4MoeMLP`` layers below
``first_k_dense_replace``, then sparse blocks with ``n_shared_experts`` shared experts added
without a gate and the ``DeepseekV3TopkRouter`` rule (``noaux_tc``: sigmoid scores, the F32
``e_score_correction_bias`` for the choice only, ``n_group`` / ``topk_group``,
``norm_topk_prob``, ``routed_scaling_factor``). The router weight and the correction bias are
F32 in released checkpoints (``_keep_in_fp32_modules_strict``).
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .hparams import ConfigError, HParams, layers_from, resolve_partial_rotary


@dataclass
class Glm4MoeHParams(HParams):
    """GLM-4-MoE's hyper-parameters; defaults are ``Glm4MoeConfig``'s.

    config.json: ``n_routed_experts`` (or ``num_local_experts``) experts of
    ``moe_intermediate_size``; ``use_qk_norm`` is :attr:`qk_norm`; sparse layers are those from
    ``first_k_dense_replace`` on (:attr:`moe_layers`); the shared experts are one MLP of
    ``moe_intermediate_size * n_shared_experts`` (:attr:`shared_expert_intermediate_size`);
    ``partial_rotary_factor`` (top level, or in ``rope_parameters``, which wins; default 0.5)
    is kept in :attr:`rope`. No sliding window.

    Attributes (besides :class:`~.hparams.HParams`'):
        attention_bias: biases on q_proj, k_proj and v_proj.
        qk_norm: per-head RMSNorm of q and k (``use_qk_norm``).
        shared_expert_intermediate_size: width of the shared experts' MLP (0 = none).
        moe_layers: the sparse layers (``first_k_dense_replace`` .. last).
        routed_scaling_factor: factor on the routing weights (after renormalisation).
        n_group, topk_group: expert groups of the router and the groups each token may use.
    """

    vocab_size: int = 151552
    hidden_size: int = 4096
    num_hidden_layers: int = 46
    num_attention_heads: int = 96
    num_key_value_heads: int = 8
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    num_experts: int = 128
    num_experts_per_tok: int = 8
    moe_intermediate_size: int = 1408
    intermediate_size: int = 10944
    norm_topk_prob: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    shared_expert_intermediate_size: int | None = None
    moe_layers: list | None = None
    routed_scaling_factor: float = 1.0
    n_group: int = 1
    topk_group: int = 1

    #: transformers' ``Glm4MoeConfig`` defaults that are not stored as such.
    FIRST_K_DENSE_REPLACE = 1
    N_SHARED_EXPERTS = 1
    PARTIAL_ROTARY_FACTOR = 0.5

    CONFIG_KEYS = {"num_experts": ("n_routed_experts", "num_local_experts"),
                   "qk_norm": ("use_qk_norm",)}
    REQUIRED = HParams.REQUIRED + ("moe_intermediate_size",)
    FIXED = HParams.FIXED + ("shared_expert_intermediate_size",)

    def __post_init__(self):
        if self.rope is None:
            self.rope = {"rope_type": "default", "rope_theta": float(self.DEFAULT_ROPE_THETA),
                         "partial_rotary_factor": self.PARTIAL_ROTARY_FACTOR}
        if self.moe_layers is None:
            self.moe_layers = layers_from(self.FIRST_K_DENSE_REPLACE, self.num_hidden_layers)
        if self.shared_expert_intermediate_size is None:
            self.shared_expert_intermediate_size = self.moe_intermediate_size * self.N_SHARED_EXPERTS
        super().__post_init__()

    @classmethod
    def _derive(cls, config, kw):
        """The base's rope with ``partial_rotary_factor`` (``rope_parameters``' own, else the
        top-level key, else 0.5; a top-level null means none, as ``Glm4MoeConfig`` reads it),
        no window, ``moe_layers`` from ``first_k_dense_replace`` and the shared experts' width
        from ``n_shared_experts`` (``Glm4MoeDecoderLayer``, ``Glm4MoeMoE``).

        Raises:
            ConfigError: ``first_k_dense_replace`` / ``n_shared_experts`` not a non-negative
                integer, or ``partial_rotary_factor`` not a number.
        """
        super()._derive(config, kw)
        kw["sliding_window"] = 0
        resolve_partial_rotary(kw["rope"], config, cls.PARTIAL_ROTARY_FACTOR)
        counts = {}
        for key, default in (("first_k_dense_replace", cls.FIRST_K_DENSE_REPLACE),
                             ("n_shared_experts", cls.N_SHARED_EXPERTS)):
            v = config.get(key)
            v = default if v is None else v
            if isinstance(v, float) and v.is_integer():
                v = int(v)
            if type(v) is not int or v < 0:
                raise ConfigError(f"config.json: {key} must be a non-negative integer, not "
                                  f"{str(v)[:40]!r}")
            counts[key] = v
        L = kw.get("num_hidden_layers", cls.num_hidden_layers)
        kw["moe_layers"] = layers_from(counts["first_k_dense_replace"], L)
        kw["shared_expert_intermediate_size"] = (
            kw.get("moe_intermediate_size", cls.moe_intermediate_size)
            * counts["n_shared_experts"])

    def to_config(self):
        """The base keys plus ``first_k_dense_replace``, ``n_shared_experts`` and
        ``partial_rotary_factor`` (also in ``rope_parameters``)."""
        cfg = super().to_config()
        cfg.pop("sliding_window", None)
        cfg["first_k_dense_replace"] = (self.moe_layers[0] if self.moe_layers
                                        else self.num_hidden_layers)
        cfg["n_shared_experts"] = self.shared_expert_intermediate_size // self.moe_intermediate_size
        cfg["partial_rotary_factor"] = self.rope.get("partial_rotary_factor", 1.0)
        return cfg

    def validate(self):
        """Base checks, and what GLM-4-MoE's config can express: sparse layers a contiguous
        run to the last layer, shared experts a whole number of experts wide, a partial rotary
        factor that turns some dimensions, a group structure the router can use.

        Raises:
            ValueError: any of these broken (the field is named).
        """
        super().validate()
        L = self.num_hidden_layers
        if list(self.moe_layers) != list(range(L - len(self.moe_layers), L)):
            raise ValueError(f"moe_layers {str(self.moe_layers)[:60]}: GLM-4-MoE's sparse layers "
                             f"run from first_k_dense_replace to the last layer")
        for name in ("n_group", "topk_group"):
            v = getattr(self, name)
            if type(v) is not int or not 1 <= v < 2 ** 31:
                raise ValueError(f"{name}: {str(v)[:40]!r} is not a positive integer")
        si = self.shared_expert_intermediate_size
        if type(si) is not int or si < 0 or (
                si and (not self.moe_intermediate_size or si % self.moe_intermediate_size)):
            raise ValueError(f"shared_expert_intermediate_size {si!r} is not a whole number "
                             f"(n_shared_experts) of moe_intermediate_size "
                             f"{self.moe_intermediate_size}")
        rsf = self.routed_scaling_factor
        if isinstance(rsf, bool) or not isinstance(rsf, (int, float)) or not abs(rsf) < float("inf"):
            raise ValueError(f"routed_scaling_factor: {str(rsf)[:40]!r} is not a finite number")
        if self.moe_layers:
            E = self.num_experts
            if E % self.n_group or self.topk_group > self.n_group:
                raise ValueError(f"n_group {self.n_group} / topk_group {self.topk_group} do not "
                                 f"fit num_experts {E}")
            if self.num_experts_per_tok > self.topk_group * (E // self.n_group):
                raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} exceeds the "
                                 f"experts of topk_group {self.topk_group} groups")
            if E // self.n_group < 2:
                raise ValueError(f"n_group {self.n_group} leaves fewer than 2 experts per group")


@register("Glm4MoeForCausalLM")
class Glm4Moe(Family):
    """GLM-4-MoE family (the Hub layout is transformers 5's too, experts aside)."""

    family = "glm4_moe"
    model_type = "glm4_moe"
    hf_config_class = "Glm4MoeConfig"
    model_module = "glm4_moe"
    hparams_class = Glm4MoeHParams
    tensors = T.llama_names(
        without=("attn_o_bias", "shared_expert_gate"),
        shared_gate="model.layers.{i}.mlp.shared_experts.gate_proj.weight",
        shared_up="model.layers.{i}.mlp.shared_experts.up_proj.weight",
        shared_down="model.layers.{i}.mlp.shared_experts.down_proj.weight",
        router_bias="model.layers.{i}.mlp.gate.e_score_correction_bias")
    fused_tensors = T.FUSED_EXPERT_NAMES
