"""Numba CPU kernels for grouped-query self-attention over a KV cache: q/k RMSNorm (per head, or
over the whole q / k projection), optional q/k/v clipping and RoPE applied in place with the
cache write fused in, then causal (optionally sliding-window) softmax attention.

The math follows ``MixtralAttention`` / ``Qwen2MoeAttention`` / ``Qwen3MoeAttention`` /
``OlmoeAttention`` (transformers ``modeling_mixtral.py`` etc.) with ``eager_attention_forward``
and ``apply_rotary_pos_emb`` (``rotate_half`` pairs ``i`` and ``i + rot/2`` of the first ``rot``
dimensions of a head, ``rot`` = ``head_dim`` or less with a partial rotary factor), in float32.

Layouts: ``qkv`` float32 [T, (nq + 2 nkv) * hd] holds the q heads, then the k heads, then the v
heads of each token (one fused projection). The cache of a layer is ``kc``, ``vc`` float32
[nkv, capacity, hd]; token ``t`` of the call sits at position ``pos0 + t``.
"""
from __future__ import annotations

import numpy as np
from numba import njit, prange

__all__ = ["rope_qk_cache", "attention", "ATTN_PAR_MIN"]

_PAR = dict(parallel=True, nogil=True, cache=True, fastmath=True, error_model="numpy")
_SER = dict(nogil=True, cache=True, fastmath=True, error_model="numpy")

#: attention work (query heads x keys x head_dim) below which one thread is faster than a
#: parallel region.
ATTN_PAR_MIN = 1 << 18
#: round-robin chunks of (token, head) pairs in a parallel attention call (a multiple of any
#: thread count up to it keeps the threads' shares of a causal prompt equal)
ATTN_CHUNKS = 64


@njit(inline="always")
def _norm_rope_head(v, w, use_norm, eps, c, s, half):
    if use_norm:
        ss = np.float32(0.0)
        for d in range(v.shape[0]):
            ss += v[d] * v[d]
        r = np.float32(1.0) / np.sqrt(ss / np.float32(v.shape[0]) + eps)
        for d in range(v.shape[0]):
            v[d] = w[d] * (v[d] * r)
    for i in range(half):
        a = v[i]
        b = v[i + half]
        v[i] = a * c[i] - b * s[i]
        v[i + half] = b * c[i] + a * s[i]


@njit(**_SER)
def _qk_prepare(qkv, nq, nkv, hd, qn, kn, eps, cos, sin, kc, vc, pos0):
    """In place on qkv [T, (nq+2nkv)*hd] (q heads, k heads, v heads): q/k RMSNorm (when qn/kn
    are non-empty) and RoPE; then k, v written to the cache at positions pos0..pos0+T-1."""
    T = qkv.shape[0]
    half = cos.shape[1]
    koff = nq * hd
    voff = koff + nkv * hd
    use_qn = qn.size > 0
    use_kn = kn.size > 0
    for t in range(T):
        c = cos[t]
        s = sin[t]
        for h in range(nq):
            _norm_rope_head(qkv[t, h * hd:(h + 1) * hd], qn, use_qn, eps, c, s, half)
        for h in range(nkv):
            kv = qkv[t, koff + h * hd:koff + (h + 1) * hd]
            _norm_rope_head(kv, kn, use_kn, eps, c, s, half)
            kdst = kc[h, pos0 + t]
            vdst = vc[h, pos0 + t]
            for d in range(hd):
                kdst[d] = kv[d]
                vdst[d] = qkv[t, voff + h * hd + d]


@njit(inline="always")
def _rms_segment(v, w, eps):
    """``v = w * (v / sqrt(mean(v**2) + eps))`` in place (one RMSNorm row of ``w.size``)."""
    ss = np.float32(0.0)
    for d in range(v.shape[0]):
        ss += v[d] * v[d]
    r = np.float32(1.0) / np.sqrt(ss / np.float32(v.shape[0]) + eps)
    for d in range(v.shape[0]):
        v[d] = w[d] * (v[d] * r)


@njit(**_SER)
def _qk_prepare_groups(qkv, nq, nkv, hd, qn, kn, eps, clip, cos, sin, kc, vc, pos0):
    """:func:`_qk_prepare` with q/k RMSNorm over groups of ``qn.size`` / ``kn.size`` elements
    (``hd``: per head; ``nq * hd`` / ``nkv * hd``: the whole projection, OLMoE) and, when
    ``clip >= 0``, q, k and v clamped to [-clip, clip] after the norms; then RoPE and the
    cache write."""
    T = qkv.shape[0]
    half = cos.shape[1]
    koff = nq * hd
    voff = koff + nkv * hd
    gq = qn.size
    gk = kn.size
    empty = qn[:0]
    for t in range(T):
        row = qkv[t]
        if gq > 0:
            for g in range(koff // gq):
                _rms_segment(row[g * gq:(g + 1) * gq], qn, eps)
        if gk > 0:
            for g in range(nkv * hd // gk):
                _rms_segment(row[koff + g * gk:koff + (g + 1) * gk], kn, eps)
        if clip >= 0:
            for d in range(row.shape[0]):
                if row[d] > clip:
                    row[d] = clip
                elif row[d] < -clip:
                    row[d] = -clip
        c = cos[t]
        s = sin[t]
        for h in range(nq):
            _norm_rope_head(row[h * hd:(h + 1) * hd], empty, False, eps, c, s, half)
        for h in range(nkv):
            kv = row[koff + h * hd:koff + (h + 1) * hd]
            _norm_rope_head(kv, empty, False, eps, c, s, half)
            kdst = kc[h, pos0 + t]
            vdst = vc[h, pos0 + t]
            for d in range(hd):
                kdst[d] = kv[d]
                vdst[d] = row[voff + h * hd + d]


@njit(inline="always")
def _attend(th, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out, scores):
    """Causal (optionally windowed) softmax attention of one (token, head) pair ``th``; with
    ``sinks`` (float32 [nq], empty for none) the head's sink logit joins the maximum and the
    denominator (gpt-oss, :mod:`zipmoe_rt.kernels.sinks`). ``scores``: float32 scratch of at
    least ``pos0 + T`` values (one per visible key), reused from pair to pair."""
    group = nq // nkv
    t = th // nq
    h = th - t * nq
    kh = h // group
    p = pos0 + t
    start = 0
    if window > 0 and p - window + 1 > 0:
        start = p - window + 1
    n = p + 1 - start
    sc = scores[:n]
    q = qkv[t, h * hd:(h + 1) * hd]
    has_sink = sinks.shape[0] > 0
    m = -np.inf
    if has_sink:
        m = sinks[h]
    for j in range(n):
        kr = kc[kh, start + j]
        acc = np.float32(0.0)
        for d in range(hd):
            acc += q[d] * kr[d]
        acc *= scale
        sc[j] = acc
        if acc > m:
            m = acc
    tot = np.float32(0.0)
    for j in range(n):
        e = np.exp(sc[j] - m)
        sc[j] = e
        tot += e
    if has_sink:
        tot += np.exp(sinks[h] - m)
    inv = np.float32(1.0) / tot
    o = out[t, h * hd:(h + 1) * hd]
    for d in range(hd):
        o[d] = 0.0
    for j in range(n):
        wj = sc[j] * inv
        vr = vc[kh, start + j]
        for d in range(hd):
            o[d] += wj * vr[d]


@njit(**_PAR)
def attention_par(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out):
    """:func:`_attend` over every (token, head) pair, in parallel. Pairs are dealt out
    round-robin (``th = c, c + n, c + 2n, ...`` for chunk ``c`` of ``n``): a causal token's work
    grows with its position, so contiguous chunks would give the last chunk the most keys
    (3x the first one's with two threads over a prompt). Each pair is computed as on one
    thread, so the results do not depend on the split."""
    pairs = qkv.shape[0] * nq
    nch = max(1, min(pairs, ATTN_CHUNKS))
    for c in prange(nch):
        scores = np.empty(pos0 + qkv.shape[0], np.float32)
        for th in range(c, pairs, nch):
            _attend(th, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out, scores)


@njit(**_SER)
def attention_ser(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out):
    """:func:`_attend` over every (token, head) pair, one thread."""
    scores = np.empty(pos0 + qkv.shape[0], np.float32)
    for th in range(qkv.shape[0] * nq):
        _attend(th, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out, scores)


#: the ``sinks`` argument of the kernels when the attention has none
NO_SINKS = np.zeros(0, np.float32)


def rope_qk_cache(qkv: np.ndarray, nq: int, nkv: int, hd: int, q_norm: np.ndarray,
                  k_norm: np.ndarray, eps: np.float32, cos: np.ndarray, sin: np.ndarray,
                  kc: np.ndarray, vc: np.ndarray, pos0: int, clip: float | None = None) -> None:
    """In place on ``qkv``: RMSNorm of q (``q_norm`` non-empty) and k (``k_norm`` non-empty),
    optional clamping of q, k and v, RoPE on q and k; then k and v of token ``t`` are written to
    ``kc[:, pos0 + t]``, ``vc[:, pos0 + t]``.

    The norm weight's size says what is normalised: ``hd`` elements, every head on its own
    (``Qwen3MoeAttention``'s ``q_norm`` / ``k_norm``), or the whole projection, ``nq * hd`` for
    q and ``nkv * hd`` for k (``OlmoeAttention``: ``q_norm(q_proj(x))`` before the split into
    heads). ``clip`` clamps q, k and v to ``[-clip, clip]`` after the norms, before RoPE
    (``OlmoeAttention``'s ``clip_qkv``). Per-head norms without ``clip`` run the original
    one-pass kernel (``_qk_prepare``).

    Args:
        qkv: float32 [T, (nq + 2 nkv) * hd], C-contiguous.  nq, nkv, hd: heads and head size.
        q_norm: float32 [hd] or [nq * hd] weights, or empty float32 [0] for none.
        k_norm: float32 [hd] or [nkv * hd] weights, or empty float32 [0] for none.
        eps: np.float32 RMSNorm epsilon.
        cos, sin: float32 [T, rot / 2] (:meth:`zipmoe_rt.models.rope.RoPE.cos_sin`): RoPE turns
            the first ``rot <= hd`` dimensions of each head, pairs ``i`` and ``i + rot/2``
            (``rot < hd``: partial rotary, ``modeling_glm4_moe.apply_rotary_pos_emb``).
        kc, vc: float32 [nkv, capacity, hd] with ``capacity >= pos0 + T``.  pos0: position of
            the first token.
        clip: None (no clamping) or a float >= 0.
    The sizes and ``clip`` are not checked here
    (:func:`zipmoe_rt.backends.base.check_qk_norm` does, in the backend op).
    """
    if clip is None and q_norm.size in (0, hd) and k_norm.size in (0, hd):
        _qk_prepare(qkv, nq, nkv, hd, q_norm, k_norm, eps, cos, sin, kc, vc, pos0)
    else:
        _qk_prepare_groups(qkv, nq, nkv, hd, q_norm, k_norm, eps,
                           np.float32(-1.0 if clip is None else clip), cos, sin, kc, vc, pos0)


def attention(qkv: np.ndarray, nq: int, nkv: int, hd: int, kc: np.ndarray, vc: np.ndarray,
              pos0: int, window: int, scale: np.float32, out: np.ndarray) -> np.ndarray:
    """``out[t, h] = softmax(q[t, h] . k[j] * scale) v[j]`` over the visible keys of query
    position ``p = pos0 + t``: ``j <= p``, and ``j > p - window`` when ``window > 0``. Query head
    ``h`` reads kv head ``h // (nq // nkv)`` (grouped-query). One thread below
    :data:`ATTN_PAR_MIN` units of work, else a parallel region over (token, head) pairs (same
    results either way).

    Args:
        qkv: float32 [T, (nq + 2 nkv) * hd] after :func:`rope_qk_cache` (only q is read).
        kc, vc: float32 [nkv, capacity, hd], positions ``0 .. pos0 + T - 1`` valid.
        pos0: position of the first token.  window: sliding window in tokens, 0 = full.
        scale: np.float32 score scale (``head_dim ** -0.5``).
        out: float32 [T, nq * hd], overwritten.
    Returns:
        ``out``.
    """
    T = qkv.shape[0]
    keys = pos0 + T if window <= 0 else min(pos0 + T, window)
    attend = attention_par if T * nq * keys * hd >= ATTN_PAR_MIN else attention_ser
    attend(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, NO_SINKS, out)
    return out
