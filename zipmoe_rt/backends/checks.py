"""Argument checks and small shared values of the backend ops (:mod:`zipmoe_rt.backends.base`):
each op of every backend validates its arguments with these before a kernel touches them, so
the messages are the same whichever backend runs; the gate activations and gpt-oss's
clamped-SwiGLU constants the ops take.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

__all__ = ["ACTIVATIONS", "check_act", "to_f32", "check_choice_bias", "check_qk_norm",
           "ROUTE_METHODS", "ROUTE_SCORINGS", "check_route", "check_gated_delta", "check_cap",
           "ClampedSwiGLU", "check_biased_expert", "check_sinks"]

#: activations of the gated MLPs and experts (``act`` of :meth:`Backend.swiglu`,
#: :meth:`Backend.expert_accumulate`, :meth:`Backend.experts_token`), as transformers'
#: ``ACT2FN`` names them: ``silu`` (``nn.SiLU``) and ``gelu_pytorch_tanh`` (``nn.GELU(
#: approximate="tanh")``: ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``, Gemma 4).
ACTIVATIONS = ("silu", "gelu_pytorch_tanh")


def check_act(act: str) -> int:
    """The index of activation ``act`` in :data:`ACTIVATIONS` (what the kernels take).

    Raises:
        ValueError: an activation the backends do not implement (named, with the known ones).
    """
    if act not in ACTIVATIONS:
        raise ValueError(f"activation {str(act)[:40]!r} is not supported "
                         f"({', '.join(ACTIVATIONS)})")
    return ACTIVATIONS.index(act)


def to_f32(a) -> np.ndarray:
    """A host weight vector/matrix as float32: BF16 ``uint16`` bits widened exactly
    (``float32 bits = bf16 bits << 16``), float16/float32 converted. For small tensors (norm
    weights, biases) and the NumPy reference backend.

    Args:
        a: array-like, uint16 (BF16 bits), float16 or float32.
    Returns:
        float32 array of the same shape (a new array, or ``a`` itself when already contiguous
        float32).
    """
    a = np.asarray(a)
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.ascontiguousarray(a, dtype=np.float32)


def check_choice_bias(bias, E: int) -> None:
    """Check the ``bias`` given to :meth:`Backend.route_choice_bias` for E experts.

    Raises:
        ValueError: not E values.
    """
    n = int(bias.size) if hasattr(bias, "size") else np.size(bias)    # device arrays too
    if n != E:
        raise ValueError(f"route_choice_bias: {n} bias values for {E} experts")


def check_qk_norm(q_size: int, k_size: int, nq: int, nkv: int, hd: int, clip=None,
                  half: int | None = None) -> None:
    """Check the q/k norm weight sizes, ``clip`` and the RoPE tables' width given to
    :meth:`Backend.rope_qk_cache`.

    Args:
        q_size, k_size: number of q / k norm weights (0 = no norm).  nq, nkv, hd: heads and
            head size.  clip: None or the clamp bound.  half: None, or the width of the cos /
            sin tables (half the rotary dimensions).
    Raises:
        ValueError: ``q_size`` not 0, ``hd`` or ``nq * hd``; ``k_size`` not 0, ``hd`` or
            ``nkv * hd``; ``clip`` negative or NaN; ``half`` not in 1..hd/2.
    """
    if half is not None and not 0 < half <= hd // 2:
        raise ValueError(f"RoPE tables of width {half}: expected 1..{hd // 2} (half the rotary "
                         f"dimensions of head_dim {hd})")
    if q_size not in (0, hd, nq * hd):
        raise ValueError(f"q_norm has {q_size} weights: expected {hd} (per head) or {nq * hd} "
                         f"(whole projection)")
    if k_size not in (0, hd, nkv * hd):
        raise ValueError(f"k_norm has {k_size} weights: expected {hd} (per head) or "
                         f"{nkv * hd} (whole projection)")
    if clip is not None and not clip >= 0:
        raise ValueError(f"clip must be >= 0 or None, not {clip!r}")


#: router selection methods (transformers' ``topk_method``; :meth:`Backend.route`).
ROUTE_METHODS = ("greedy", "group_limited_greedy", "noaux_tc")
#: router scoring functions (:meth:`Backend.route`).
ROUTE_SCORINGS = ("softmax", "sigmoid")


def check_route(E: int, k: int, scoring: str = "softmax", method: str = "greedy",
                n_group: int = 1, topk_group: int = 1, bias=None, scale: float = 1.0) -> None:
    """Check the routing arguments of :meth:`Backend.route` for ``E`` experts.

    Raises:
        ValueError: ``k`` outside 1..E; an unknown ``scoring`` / ``method``; ``n_group`` not a
            divisor of ``E``; ``topk_group`` outside 1..n_group; fewer than ``k`` experts in the
            ``topk_group`` kept groups; ``noaux_tc`` with groups of one expert (its group score
            sums the top two); a ``bias`` that is not ``E`` values; a non-finite ``scale``.
    """
    if not 0 < k <= E:
        raise ValueError(f"route: top-k {k} not in 1..{E} experts")
    if scoring not in ROUTE_SCORINGS:
        raise ValueError(f"route: scoring {scoring!r} is not one of {', '.join(ROUTE_SCORINGS)}")
    if method not in ROUTE_METHODS:
        raise ValueError(f"route: method {method!r} is not one of {', '.join(ROUTE_METHODS)}")
    if type(n_group) is not int or n_group < 1 or E % n_group:
        raise ValueError(f"route: n_group {n_group!r} does not divide {E} experts")
    if type(topk_group) is not int or not 1 <= topk_group <= n_group:
        raise ValueError(f"route: topk_group {topk_group!r} not in 1..n_group {n_group}")
    if method != "greedy" and k > topk_group * (E // n_group):
        raise ValueError(f"route: top-k {k} exceeds the {topk_group * (E // n_group)} experts "
                         f"of the {topk_group} kept groups")
    if method == "noaux_tc" and E // n_group < 2:
        raise ValueError(f"route: noaux_tc needs at least 2 experts per group, not "
                         f"{E // n_group}")
    if bias is not None and np.shape(bias) != (E,):
        raise ValueError(f"route: bias has shape {np.shape(bias)}, expected ({E},)")
    if not np.isfinite(scale):
        raise ValueError(f"route: scale {scale!r} is not finite")


def check_gated_delta(qkv, ba, state, nk: int, nv: int, dk: int, dv: int) -> None:
    """Shapes of :meth:`Backend.gated_delta_rule`. Raises ValueError naming the one that
    disagrees."""
    if nk < 1 or nv % nk:
        raise ValueError(f"gated_delta_rule: {nv} value heads are not a multiple of {nk} key "
                         f"heads")
    T = qkv.shape[0]
    if tuple(qkv.shape) != (T, 2 * nk * dk + nv * dv):
        raise ValueError(f"gated_delta_rule: qkv {tuple(qkv.shape)}, expected "
                         f"({T}, {2 * nk * dk + nv * dv})")
    if tuple(ba.shape) != (T, 2 * nv):
        raise ValueError(f"gated_delta_rule: ba {tuple(ba.shape)}, expected ({T}, {2 * nv})")
    if tuple(state.shape) != (nv, dk, dv):
        raise ValueError(f"gated_delta_rule: state {tuple(state.shape)}, expected "
                         f"({nv}, {dk}, {dv})")


def check_cap(cap) -> np.float32:
    """``cap`` of :meth:`Backend.softcap_` as float32. Raises ValueError unless it is a
    positive finite number."""
    if isinstance(cap, bool) or not isinstance(cap, (int, float, np.floating)) or not (
            np.isfinite(cap) and cap > 0):
        raise ValueError(f"softcap: cap {cap!r} is not a positive finite number")
    return np.float32(cap)

    # -- gpt-oss: attention sinks -----------------------------------------------------------

    def attention_sinks(self, qkv, nq: int, nkv: int, hd: int, kc, vc, pos0: int, window: int,
                        scale, sinks, out):
        """:meth:`attention` with a learned sink logit per query head in the softmax
        denominator (``GptOssAttention``'s ``sinks`` in ``eager_attention_forward``: the sink is
        concatenated to the scores, the softmax taken over both, the sink's column dropped):
        ``out[t, h] = sum_j p_j v_j`` with ``p_j = exp(s_j - m) / (sum_i exp(s_i - m) +
        exp(sinks[h] - m))``, ``m`` the largest of the scores and the sink.

        Args:
            qkv, nq, nkv, hd, kc, vc, pos0, window, scale, out: as :meth:`attention`.
            sinks: float32 [nq] backend array.
        Returns:
            ``out``.
        Raises:
            ValueError: ``sinks`` not of ``nq`` values.
        """
        raise NotImplementedError


@dataclass(frozen=True)
class ClampedSwiGLU:
    """gpt-oss's expert activation (``GptOssExperts._apply_gate``, ``modeling_gpt_oss.py``):
    ``g = min(g, limit)``, ``u = clamp(u, -limit, limit)``, ``(u + 1) * g * sigmoid(alpha * g)``,
    in float32.

    Attributes:
        alpha: the sigmoid gain (``swiglu_alpha``).  limit: the clamp (``swiglu_limit``).
    """

    alpha: float
    limit: float


def check_biased_expert(op: str, H: int, e) -> None:
    """The shapes of a biased expert (:meth:`Backend.expert_accumulate` with ``glu``): gate, up [I, H],
    down [H, I], gate_bias, up_bias [I], down_bias [H].

    Raises:
        ValueError: naming ``op`` and the shapes, or an expert without biases.
    """
    if getattr(e, "down_bias", None) is None:
        raise ValueError(f"{op}: the expert has no biases (gpt-oss experts have them)")
    I = e.gate.shape[0]
    if (tuple(e.gate.shape) != (I, H) or tuple(e.up.shape) != (I, H)
            or tuple(e.down.shape) != (H, I) or tuple(e.gate_bias.shape) != (I,)
            or tuple(e.up_bias.shape) != (I,) or tuple(e.down_bias.shape) != (H,)):
        raise ValueError(f"{op}: x has {H} features; gate {tuple(e.gate.shape)}, up "
                         f"{tuple(e.up.shape)}, down {tuple(e.down.shape)}, biases "
                         f"{tuple(e.gate_bias.shape)}, {tuple(e.up_bias.shape)}, "
                         f"{tuple(e.down_bias.shape)} disagree")


def check_sinks(sinks, nq: int) -> None:
    """Raise ValueError unless ``sinks`` holds one value per query head."""
    if tuple(sinks.shape) != (nq,):
        raise ValueError(f"attention sinks: {tuple(sinks.shape)} values for {nq} query heads")
