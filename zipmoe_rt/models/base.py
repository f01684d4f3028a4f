"""Shared decoder blocks for the MoE families, re-exported from the modules that hold them:

* :mod:`.rope`: :func:`rope_inv_freq`, :class:`RoPE` (regimes for longrope);
* :mod:`.cache`: :class:`LayerCache` (contract), :class:`KVCache` (one layer), :class:`ModelCache`;
* :mod:`.attention`: :class:`Attention`;
* :mod:`.moe`: :class:`MLP`, :class:`SparseMoeBlock`, :class:`Executor`,
  :class:`ExpertExecutor`, :func:`accumulate_experts`;
* :mod:`.routing`: :class:`Router`, :class:`RoutingRule` (softmax / sigmoid scoring, grouped
  selection, correction bias, scaling);
* :mod:`.sparsemixer`: :class:`SparsemixerMoeBlock` (PhiMoE's router);
* :mod:`.model`: :class:`Norm` (RMSNorm / LayerNorm), :class:`DecoderLayer`, :class:`Model`.

Everything runs on a compute backend (:mod:`zipmoe_rt.backends`; Numba CPU kernels by default,
no torch). Activations are float32 ``[T, H]`` (T tokens of one sequence); weight matrices stay as
the :class:`~zipmoe_rt.models.weights.WeightSource` hands them out (BF16 as uint16 bits, read in
place by the kernels). Only the small 1-D vectors (norm weights, biases) are widened to float32.

The math follows transformers' ``models/mixtral/modeling_mixtral.py``,
``models/qwen2_moe/modeling_qwen2_moe.py``, ``models/qwen3_moe/modeling_qwen3_moe.py``,
``models/olmoe/modeling_olmoe.py`` and ``models/phimoe/modeling_phimoe.py`` in float32, and
``modeling_rope_utils.py`` for the RoPE frequencies. Hyper-parameters (an
:class:`~zipmoe_rt.families.HParams` subclass) and tensor names come from the family's registry
entry (:mod:`zipmoe_rt.families`); the per-family files next to this one (``mixtral.py``,
``qwen2_moe.py``, ``qwen3_moe.py``, ``olmoe.py``, ``phimoe.py``) build the feed-forward block of
each layer.

Experts are never computed by the blocks themselves: :class:`SparseMoeBlock` routes and hands
the tokens to an *executor* (``executor.run(layer, x, topk_idx, topk_w)``), so an engine can
decide where expert weights come from (cache tiers, decompression) and observe every routing
decision.
"""
from __future__ import annotations

from ..backends import to_f32
from .attention import Attention
from .cache import KVCache, LayerCache, ModelCache
from .model import DecoderLayer, Model, Norm
from .moe import MLP, Executor, ExpertExecutor, RouteHook, SparseMoeBlock, accumulate_experts
from .rope import RoPE, rope_inv_freq
from .routing import Router, RoutingRule
from .sparsemixer import SparsemixerMoeBlock

__all__ = [
    "to_f32", "rms_norm", "rope_inv_freq", "RoPE", "LayerCache", "KVCache",
    "ModelCache", "Attention", "MLP", "route", "Executor", "ExpertExecutor", "accumulate_experts",
    "RouteHook", "SparseMoeBlock", "DecoderLayer", "Model", "Router", "RoutingRule", "Norm",
    "SparsemixerMoeBlock",
]


def __getattr__(name):
    """``rms_norm`` and ``route`` (Numba kernels' wrappers, :mod:`zipmoe_rt.kernels`) on first
    use, so that importing the model code does not import Numba (the NumPy backend needs none)."""
    if name == "rms_norm":
        from ..kernels.norm import rms_norm
        return rms_norm
    if name == "route":
        from ..kernels.routing import route
        return route
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
