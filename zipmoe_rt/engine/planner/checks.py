"""Argument checks shared by the planner's modules: integers, vectors, weights, ``k``, budgets.

Each returns the value in the form the mathematics needs (``int``, float64 array, ``float``) or
raises ``ValueError`` with a message that names the argument.
"""
from __future__ import annotations

import math
from numbers import Integral

import numpy as np


def check_int(k, name: str = "k") -> int:
    """``k`` as a Python ``int``.

    Args:
        k: any integral value (``int``, numpy integer); bools are refused.
        name: the argument's name for the error message.

    Raises:
        ValueError: ``k`` is a bool or not integral (floats included).
    """
    if isinstance(k, bool) or not isinstance(k, Integral):
        raise ValueError(f"{name} must be an integer, got {k!r}")
    return int(k)


def check_vector(x, name: str) -> np.ndarray:
    """``x`` as a float64 ``[N]`` array (a copy only where the conversion needs one).

    Raises:
        ValueError: ``x`` not 1-D, or containing NaN (``name`` in the message).
    """
    a = np.asarray(x, dtype=np.float64)
    if a.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {a.shape}")
    if np.isnan(a).any():
        raise ValueError(f"{name} contains NaN")
    return a


def check_weights(w, allow_inf: bool) -> np.ndarray:
    """Conditional-Poisson weights ``w`` as float64 ``[N]``, ``>= 0`` (ZipMoE §3.3).

    Args:
        w: array-like ``[N]``.
        allow_inf: accept ``inf`` (the "always selected" convention of :func:`cp_inclusion`).

    Raises:
        ValueError: not 1-D, NaN, a negative entry, or ``inf`` where not allowed.
    """
    a = check_vector(w, "w")
    if (a < 0).any():
        raise ValueError("w must be >= 0")
    if not allow_inf and np.isinf(a).any():
        raise ValueError("w must be finite")
    return a


def check_k(k, n: int) -> int:
    """The experts per token ``k`` of a layer of ``n`` experts, as an ``int`` in ``1..n``.

    Raises:
        ValueError: ``k`` not an integer or outside ``1..n``.
    """
    k = check_int(k)
    if not 1 <= k <= n:
        raise ValueError(f"k must be in 1..{n}, got {k}")
    return k


def check_budget(b, name: str) -> float:
    """A byte budget ``b`` as a ``float``, finite and ``>= 0``.

    Raises:
        ValueError: ``b`` negative, infinite or NaN (``name`` in the message).
    """
    b = float(b)
    if not math.isfinite(b) or b < 0:
        raise ValueError(f"{name} must be finite and >= 0, got {b!r}")
    return b
