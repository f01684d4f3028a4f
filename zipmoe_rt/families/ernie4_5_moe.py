"""ERNIE 4.5 MoE (transformers ``models/ernie4_5_moe/configuration_ernie4_5_moe.py``,
``modeling_ernie4_5_moe.py``): Llama-style attention whose RoPE rotates the pairs ``(2i, 2i+1)``
of each head (``modeling_ernie4_5.py``'s ``apply_rotary_pos_emb``); sparse layers from
``moe_layer_start_index`` to ``moe_layer_end_index`` every ``moe_layer_interval`` (dense
``Ernie4_5_MoeMLP`` elsewhere); a router (``Ernie4_5_MoeTopKRouter``) that takes a float32
softmax over all experts, chooses the top-k of the probabilities plus
``moe_statics.e_score_correction_bias`` (F32, [1, E]) and weights the chosen experts by their
unbiased probabilities divided by ``max(sum, moe_norm_min)``; ``moe_num_shared_experts`` shared
experts as one ungated SwiGLU MLP of ``moe_num_shared_experts * moe_intermediate_size``.

Hub checkpoints (baidu/ERNIE-4.5-21B-A3B-PT, ERNIE-4.5-300B-A47B-PT) name the experts
``mlp.experts.{e}.gate_proj`` / ``up_proj`` / ``down_proj`` and the bias
``mlp.moe_statics.e_score_correction_bias`` (``mlp.gate.moe_statics....`` in memory).
``use_bias`` (biases on every projection and the head) is not supported.
"""
from __future__ import annotations

from dataclasses import dataclass

from . import tensors as T
from .base import Family, register
from .hparams import ConfigError, HParams, config_int


@dataclass
class Ernie45MoeHParams(HParams):
    """ERNIE 4.5 MoE's hyper-parameters; defaults are ``Ernie4_5_MoeConfig``'s
    (ERNIE-4.5-21B-A3B's shape).

    config.json: ``moe_num_experts`` experts of ``moe_intermediate_size``, top ``moe_k``;
    ``intermediate_size`` the dense MLP's width; the shared experts' width is
    ``moe_num_shared_experts * moe_intermediate_size``; sparse layers ``i`` are those with
    ``moe_layer_start_index <= i <= moe_layer_end_index`` (-1: the last layer) and
    ``(i + 1) % moe_layer_interval == 0``. Fixed: renormalised top-k weights, no q/k norm, no
    biases (``use_bias`` true is refused), interleaved RoPE (:attr:`ROPE_INTERLEAVED`),
    ``default_theta`` 5e5.

    Attributes (besides :class:`~.hparams.HParams`'):
        attention_bias: always False.  qk_norm: always False.
        shared_expert_intermediate_size: the shared experts' total width (0: none).
        moe_layers: indices of the sparse layers.
        moe_norm_min: the clamp of the routing weights' sum.
    """

    vocab_size: int = 103424
    hidden_size: int = 2560
    num_hidden_layers: int = 28
    num_attention_heads: int = 20
    num_key_value_heads: int = 4
    rms_norm_eps: float = 1e-5
    max_position_embeddings: int = 131072
    tie_word_embeddings: bool = True
    num_experts: int = 64
    num_experts_per_tok: int = 6
    moe_intermediate_size: int = 1536
    intermediate_size: int = 12288
    norm_topk_prob: bool = True
    attention_bias: bool = False
    qk_norm: bool = False
    shared_expert_intermediate_size: int = 3072
    moe_layers: list | None = None
    moe_norm_min: float = 1e-12

    DEFAULT_ROPE_THETA = 500000.0
    ROPE_INTERLEAVED = True
    CONFIG_KEYS = {"num_experts": ("moe_num_experts", "num_experts"),
                   "num_experts_per_tok": ("moe_k", "num_experts_per_tok")}
    REQUIRED = HParams.REQUIRED + ("moe_intermediate_size",)
    FIXED = HParams.FIXED + ("norm_topk_prob", "attention_bias", "qk_norm",
                             "shared_expert_intermediate_size")
    #: ``Ernie4_5_MoeConfig`` defaults of the keys that place the sparse layers and size the
    #: shared experts.
    LAYER_KEYS = {"moe_layer_start_index": 1, "moe_layer_end_index": -1,
                  "moe_layer_interval": 1, "moe_num_shared_experts": 2}

    def __post_init__(self):
        if self.moe_layers is None:     # the class defaults: layers 1 .. last
            self.moe_layers = list(range(1, self.num_hidden_layers))
        super().__post_init__()

    @classmethod
    def _derive(cls, config, kw):
        """rope (default theta 5e5), no window, the shared experts' width and the sparse layers
        (``Ernie4_5_MoeDecoderLayer``).

        Raises:
            ConfigError: ``use_bias`` true, or a layer key that is not an integer (or an interval
                below 1, a negative shared-expert count).
        """
        super()._derive(config, kw)
        kw["sliding_window"] = 0
        if config.get("use_bias"):
            raise ConfigError("config.json: use_bias true (biases on every projection and "
                              "the head) is not supported")
        v = {k: config_int(config, k, d, lo=None) for k, d in cls.LAYER_KEYS.items()}
        if v["moe_layer_interval"] < 1 or v["moe_num_shared_experts"] < 0:
            bad = "moe_layer_interval" if v["moe_layer_interval"] < 1 else "moe_num_shared_experts"
            raise ConfigError(f"config.json: {bad} {v[bad]} is out of range")
        L = kw.get("num_hidden_layers", cls.num_hidden_layers)
        end = L - 1 if v["moe_layer_end_index"] == -1 else v["moe_layer_end_index"]
        kw["moe_layers"] = [i for i in range(L) if (i + 1) % v["moe_layer_interval"] == 0
                            and v["moe_layer_start_index"] <= i <= end]
        kw["shared_expert_intermediate_size"] = (
            v["moe_num_shared_experts"] * kw.get("moe_intermediate_size", cls.moe_intermediate_size))

    def to_config(self):
        """The base keys plus ``use_bias`` false, the shared-expert count and start / end /
        interval giving ``moe_layers`` (an arithmetic progression, as :meth:`_derive` makes).

        Raises:
            ValueError: ``moe_layers`` not an arithmetic progression, or a shared width not a
                multiple of ``moe_intermediate_size``.
        """
        cfg = {k: v for k, v in super().to_config().items() if v is not None}
        m = list(self.moe_layers)
        step = m[1] - m[0] if len(m) > 1 else 1
        if m and (step < 1 or m != list(range(m[0], m[-1] + 1, step))):
            raise ValueError(f"moe_layers {m} is not start..end every interval")
        if self.moe_intermediate_size and self.shared_expert_intermediate_size % \
                self.moe_intermediate_size:
            raise ValueError("shared_expert_intermediate_size is not a multiple of "
                             "moe_intermediate_size")
        cfg.update(use_bias=False,
                   moe_num_shared_experts=(self.shared_expert_intermediate_size
                                           // max(self.moe_intermediate_size, 1)),
                   moe_layer_start_index=m[0] if m else self.num_hidden_layers,
                   moe_layer_end_index=m[-1] if m else self.num_hidden_layers - 1,
                   moe_layer_interval=step)
        return cfg

    def validate(self):
        """Base checks; ``moe_norm_min`` a finite number >= 0; the fixed choices applied.

        Raises:
            ValueError: as the base, a bad ``moe_norm_min``, or a partial rotary factor (the
                interleaved RoPE turns whole heads).
        """
        super().validate()
        v = self.moe_norm_min
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0 <= v < float("inf"):
            raise ValueError(f"moe_norm_min: {str(v)[:40]!r} is not a finite number >= 0")
        self.moe_norm_min = float(v)
        prf = (self.rope or {}).get("partial_rotary_factor", 1.0)
        if prf not in (None, 1.0):      # the interleaved reorder (models/attention.py) is whole-head
            raise ValueError(f"rope.partial_rotary_factor {prf} is not supported with "
                             f"interleaved RoPE")
        self.norm_topk_prob, self.attention_bias, self.qk_norm = True, False, False


@register("Ernie4_5_MoeForCausalLM")
class Ernie45Moe(Family):
    """ERNIE 4.5 MoE family."""

    family = "ernie4_5_moe"
    model_type = "ernie4_5_moe"
    hf_config_class = "Ernie4_5_MoeConfig"
    model_module = "ernie4_5_moe"
    hparams_class = Ernie45MoeHParams
    tensors = T.llama_names(
        without=("attn_q_bias", "attn_k_bias", "attn_v_bias", "attn_o_bias", "attn_q_norm",
                 "attn_k_norm", "shared_expert_gate"),
        shared_gate="model.layers.{i}.mlp.shared_experts.gate_proj.weight",
        shared_up="model.layers.{i}.mlp.shared_experts.up_proj.weight",
        shared_down="model.layers.{i}.mlp.shared_experts.down_proj.weight",
        moe_statics="model.layers.{i}.mlp.moe_statics.e_score_correction_bias")
    fused_tensors = dict(
        T.FUSED_EXPERT_NAMES,
        moe_statics="model.layers.{i}.mlp.gate.moe_statics.e_score_correction_bias")
