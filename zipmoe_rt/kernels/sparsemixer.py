"""Numba CPU kernel for PhiMoE's router at inference: the sparsemixer top-2 of
``sparsemixer(scores, jitter_eps, training=False)`` in transformers'
``models/phimoe/modeling_phimoe.py`` (``PhimoeTopKRouter``; Liu et al., "GRIN: GRadient-INformed
MoE", arXiv 2409.12136).

For each token, with router logits ``s`` and ``thr = 2 * jitter_eps``:

1. ``i1 = argmax(s)``, ``m1 = s[i1]``; expert ``j`` is masked when
   ``(m1 - s[j]) / max(|s[j]|, m1) > thr``; ``w1 = softmax(s, unmasked)[i1]``.
2. ``s[i1]`` set to ``-inf``; ``i2`` = the argmax of the rest, ``m2 = s[i2]``; expert ``j`` is
   masked when ``(m2 - s[j]) / max(|s[j]|, m2) > thr`` (the original ``s[j]``) or ``j = i1``;
   ``w2 = softmax(s, unmasked)[i2]``.

In eval mode no noise is drawn: ``router_jitter_noise`` only sets the relative threshold of the
masks (``input_jitter_noise`` is unused). The two weights are not renormalised: each is a
probability of its own masked softmax, in (0, 1].
"""
from __future__ import annotations

import numpy as np
from numba import njit

__all__ = ["sparsemixer_top2"]


@njit(nogil=True, cache=True, error_model="numpy")   # IEEE division (x/0, 0/0) as torch's
def _top2(logits, thr, idx, w):
    T, E = logits.shape
    for t in range(T):
        first = -1
        for r in range(2):
            best = -1
            m = -np.inf
            for e in range(E):
                if e != first and (best < 0 or logits[t, e] > m):
                    m = logits[t, e]
                    best = e
            tot = np.float32(0.0)
            for e in range(E):
                if e == first:
                    continue
                s = logits[t, e]
                f = max(abs(s), m)
                if not (m - s) / f > thr:
                    tot += np.exp(s - m)
            idx[t, r] = best
            w[t, r] = np.float32(1.0) / tot
            first = best


def sparsemixer_top2(logits: np.ndarray, jitter_eps: float) -> tuple[np.ndarray, np.ndarray]:
    """PhiMoE's inference routing (module docstring): two experts per token and their masked
    softmax weights.

    Args:
        logits: float32 [T, E] router logits, E >= 2.  jitter_eps: ``router_jitter_noise``
            (the masks' threshold is ``float32(2 * jitter_eps)``).
    Returns:
        (topk_idx int64 [T, 2]: the best expert, then the best of the rest (lowest index first
        on ties); topk_w float32 [T, 2]).
    Raises:
        ValueError: fewer than 2 experts.
    """
    logits = np.ascontiguousarray(logits, np.float32)
    T, E = logits.shape
    if E < 2:
        raise ValueError(f"sparsemixer routing needs at least 2 experts, got {E}")
    idx = np.empty((T, 2), np.int64)
    w = np.empty((T, 2), np.float32)
    _top2(logits, np.float32(2.0 * jitter_eps), idx, w)
    return idx, w
