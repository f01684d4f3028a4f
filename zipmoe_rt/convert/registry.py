"""Architecture registry of the converter: each supported Hugging Face ``architectures[0]`` maps
to a class that knows its tensor names and its config spellings (llama.cpp's conversion style).

A class turns an HF ``config.json`` into the normalised hyper-parameters the runtime reads
(:meth:`Architecture.hparams`) and tells which checkpoint tensors belong to experts
(:meth:`Architecture.expert_tensor`). Sources: transformers ``models/mixtral/modeling_mixtral.py``,
``models/qwen2_moe/modeling_qwen2_moe.py``, ``models/qwen3_moe/modeling_qwen3_moe.py`` and the
name conventions in ../shared/design/ZIPMOE.md §8.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

ARCHITECTURES: dict[str, type["Architecture"]] = {}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's ``architectures[0]`` is not registered."""


class ConfigError(ValueError):
    """config.json lacks a required key or has an invalid value (the message names it)."""


def register(*names: str):
    """Class decorator: register an :class:`Architecture` under HF ``architectures`` names."""
    def deco(cls):
        for n in names:
            ARCHITECTURES[n] = cls
        cls.hf_names = names
        return cls
    return deco


def get_architecture(config: dict) -> "Architecture":
    """The registered architecture for an HF config dict.

    Raises:
        UnsupportedArchitectureError: unknown or missing ``architectures`` (lists supported ones).
    """
    archs = config.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError("config.json has no 'architectures' entry")
    cls = ARCHITECTURES.get(archs[0])
    if cls is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {archs[0]!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return cls(config)


@dataclass(frozen=True)
class ExpertRef:
    """Where a checkpoint tensor sits among the experts.

    Attributes:
        layer: decoder layer index.
        expert: expert index, or None for an expert-stacked tensor ([E, ...], axis 0 = expert).
        role: "gate", "up", "down" (SwiGLU projections) or "gate_up" (gate rows then up rows).
    """

    layer: int
    expert: int | None
    role: str


def _get(config: dict, *keys, default=..., required=True):
    for k in keys:
        if k in config and config[k] is not None:
            return config[k]
    if default is not ...:
        return default
    if required:
        raise ConfigError(f"config.json: missing {' / '.join(keys)}")
    return None


def rope_parameters(config: dict) -> dict:
    """RoPE settings from either spelling: ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling``. Returns a dict with at least ``rope_type`` and ``rope_theta``."""
    rp = config.get("rope_parameters")
    if isinstance(rp, dict) and "rope_theta" in rp:
        out = dict(rp)
    else:
        out = dict(config.get("rope_scaling") or {})
        out["rope_theta"] = float(_get(config, "rope_theta", default=10000.0))
    t = out.pop("type", None)
    out["rope_type"] = out.get("rope_type") or t or "default"
    out["rope_theta"] = float(out["rope_theta"])
    return out


class Architecture:
    """Base class. Subclasses override :attr:`expert_patterns` and :meth:`hparams`."""

    hf_names: tuple = ()
    #: runtime model family (module under zipmoe_rt/models/).
    family: str = ""
    #: (regex over the tensor name, role); regex groups: layer, expert (optional).
    expert_patterns: tuple = ()

    def __init__(self, config: dict):
        self.config = config
        self.name = config["architectures"][0]

    def expert_tensor(self, name: str) -> ExpertRef | None:
        """The :class:`ExpertRef` of a checkpoint tensor, or None for a dense tensor."""
        for pat, role in self._compiled():
            m = pat.fullmatch(name)
            if m:
                g = m.groupdict()
                e = g.get("expert")
                return ExpertRef(int(g["layer"]), int(e) if e is not None else None, role)
        return None

    @classmethod
    def _compiled(cls):
        if "_re" not in cls.__dict__:
            cls._re = [(re.compile(p), r) for p, r in cls.expert_patterns]
        return cls._re

    def common_hparams(self) -> dict:
        c = self.config
        heads = int(_get(c, "num_attention_heads"))
        hidden = int(_get(c, "hidden_size"))
        hp = {
            "architecture": self.name,
            "family": self.family,
            "vocab_size": int(_get(c, "vocab_size")),
            "hidden_size": hidden,
            "num_hidden_layers": int(_get(c, "num_hidden_layers")),
            "num_attention_heads": heads,
            "num_key_value_heads": int(_get(c, "num_key_value_heads", default=heads)),
            "head_dim": int(_get(c, "head_dim", default=hidden // heads)),
            "rms_norm_eps": float(_get(c, "rms_norm_eps", default=1e-6)),
            "max_position_embeddings": int(_get(c, "max_position_embeddings", default=4096)),
            "tie_word_embeddings": bool(_get(c, "tie_word_embeddings", default=False)),
            "rope": rope_parameters(c),
            "hidden_act": str(_get(c, "hidden_act", default="silu")),
            "sliding_window": int(_get(c, "sliding_window", default=0) or 0),
        }
        if hp["hidden_act"] != "silu":
            raise ConfigError(f"config.json: hidden_act {hp['hidden_act']!r} is not supported (silu only)")
        if hp["num_attention_heads"] % hp["num_key_value_heads"]:
            raise ConfigError("config.json: num_attention_heads must be a multiple of num_key_value_heads")
        return hp

    def hparams(self) -> dict:
        """Normalised hyper-parameters for the runtime (stored as ``hparams`` metadata)."""
        raise NotImplementedError

    def moe_layers(self, hp: dict) -> list[int]:
        """Indices of decoder layers with a sparse MoE block (others have a dense MLP)."""
        return list(range(hp["num_hidden_layers"]))


_QWEN_EXPERTS = (
    (r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.gate_proj\.weight", "gate"),
    (r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.up_proj\.weight", "up"),
    (r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.(?P<expert>\d+)\.down_proj\.weight", "down"),
    # transformers 5.x fused storage: [E, 2I, H] (gate rows first) and [E, H, I]
    (r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.gate_up_proj", "gate_up"),
    (r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.down_proj", "down"),
)


@register("MixtralForCausalLM")
class Mixtral(Architecture):
    """Mixtral: softmax router over all experts, top-k, weights renormalised to sum 1."""

    family = "mixtral"
    expert_patterns = (
        (r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.w1\.weight", "gate"),
        (r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.w3\.weight", "up"),
        (r"model\.layers\.(?P<layer>\d+)\.block_sparse_moe\.experts\.(?P<expert>\d+)\.w2\.weight", "down"),
        (r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.gate_up_proj", "gate_up"),
        (r"model\.layers\.(?P<layer>\d+)\.mlp\.experts\.down_proj", "down"),
    )

    def hparams(self):
        c = self.config
        hp = self.common_hparams()
        hp.update(
            num_experts=int(_get(c, "num_local_experts", "num_experts")),
            num_experts_per_tok=int(_get(c, "num_experts_per_tok")),
            moe_intermediate_size=int(_get(c, "intermediate_size")),
            intermediate_size=int(_get(c, "intermediate_size")),
            norm_topk_prob=True,
            attention_bias=False,
            qk_norm=False,
            shared_expert_intermediate_size=0,
        )
        hp["moe_layers"] = self.moe_layers(hp)
        return hp


class _QwenMoe(Architecture):
    expert_patterns = _QWEN_EXPERTS

    def moe_layers(self, hp):
        c = self.config
        step = int(_get(c, "decoder_sparse_step", default=1))
        only_mlp = set(_get(c, "mlp_only_layers", default=[]) or [])
        return [i for i in range(hp["num_hidden_layers"])
                if i not in only_mlp and hp["num_experts"] > 0 and step > 0 and (i + 1) % step == 0]

    def _moe_hparams(self):
        c = self.config
        hp = self.common_hparams()
        hp.update(
            num_experts=int(_get(c, "num_experts", "num_local_experts")),
            num_experts_per_tok=int(_get(c, "num_experts_per_tok")),
            moe_intermediate_size=int(_get(c, "moe_intermediate_size")),
            intermediate_size=int(_get(c, "intermediate_size")),
            norm_topk_prob=bool(_get(c, "norm_topk_prob", default=False)),
        )
        if not c.get("use_sliding_window", False):
            hp["sliding_window"] = 0
        if c.get("layer_types"):       # which layers use the sliding window (transformers 5)
            hp["layer_types"] = [str(t) for t in c["layer_types"]]
        if c.get("max_window_layers") is not None:
            hp["max_window_layers"] = int(c["max_window_layers"])
        hp["moe_layers"] = self.moe_layers(hp)
        return hp


@register("Qwen2MoeForCausalLM")
class Qwen2Moe(_QwenMoe):
    """Qwen2-MoE / Qwen1.5-MoE: q/k/v bias, softmax top-k (optionally renormalised), a shared
    expert gated by ``sigmoid(shared_expert_gate(x))``."""

    family = "qwen2_moe"

    def hparams(self):
        hp = self._moe_hparams()
        hp.update(attention_bias=bool(self.config.get("qkv_bias", True)), qk_norm=False,
                  shared_expert_intermediate_size=int(
                      _get(self.config, "shared_expert_intermediate_size", default=0)))
        return hp


@register("Qwen3MoeForCausalLM")
class Qwen3Moe(_QwenMoe):
    """Qwen3-MoE: RMSNorm on q and k per head before RoPE, no shared expert."""

    family = "qwen3_moe"

    def hparams(self):
        hp = self._moe_hparams()
        hp.update(attention_bias=bool(self.config.get("attention_bias", False)), qk_norm=True,
                  shared_expert_intermediate_size=0)
        return hp
