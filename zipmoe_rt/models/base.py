"""Shared decoder blocks for the MoE families: arguments, RMSNorm, RoPE, grouped-query attention
over a growing KV cache, the sparse MoE block (router -> executor) and the model skeleton.

Everything runs on numpy + Numba (no torch). Activations are float32 ``[T, H]`` (T tokens of one
sequence); weight matrices stay as the :class:`~zipmoe_rt.models.weights.WeightSource` hands them
out (BF16 as uint16 bits, read in place by :mod:`zipmoe_rt.kernels.linear`). Only the small 1-D
vectors (norm weights, biases) are widened to float32.

The math follows transformers' ``models/mixtral/modeling_mixtral.py``,
``models/qwen2_moe/modeling_qwen2_moe.py`` and ``models/qwen3_moe/modeling_qwen3_moe.py`` in
float32, and ``modeling_rope_utils.py`` for the RoPE frequencies. The per-family files next to
this one (``mixtral.py``, ``qwen2_moe.py``, ``qwen3_moe.py``) choose the tensor names and the
feed-forward block of each layer.

Experts are never computed here: :class:`SparseMoeBlock` routes and hands the tokens to an
*executor* (``executor.run(layer, x, topk_idx, topk_w)``), so an engine can decide where expert
weights come from (cache tiers, decompression) and observe every routing decision.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field, fields
from typing import Callable, Protocol

import numpy as np
from numba import njit, prange

from ..kernels.linear import (bf16_rows, expert_accumulate, experts_decode, linear_into,
                              swiglu_hidden)

_PAR = dict(parallel=True, nogil=True, cache=True, fastmath=True)
_SER = dict(nogil=True, cache=True, fastmath=True)


# ---------------------------------------------------------------------------------------------
# arguments


@dataclass
class ModelArgs:
    """Hyper-parameters of a decoder, built from the registry's normalised ``hparams`` dict
    (:mod:`zipmoe_rt.convert.registry`). Unknown keys are ignored.

    Attributes (units: counts of elements unless noted):
        family: runtime family ("mixtral", "qwen2_moe", "qwen3_moe").
        vocab_size, hidden_size, num_hidden_layers, num_attention_heads, num_key_value_heads,
        head_dim: shapes.
        rms_norm_eps: epsilon added to the mean square.
        rope: {"rope_type", "rope_theta", ...} as in transformers' ``rope_parameters``.
        max_position_embeddings: used by yarn defaults only.
        tie_word_embeddings: lm_head shares the embedding matrix.
        sliding_window: attention window in tokens (key j visible from query i iff
            ``i - window < j <= i``); 0 = full attention.
        layer_types: optional per-layer "full_attention" / "sliding_attention" (transformers'
            ``config.layer_types``); when absent every layer uses ``sliding_window``.
        num_experts, num_experts_per_tok, moe_intermediate_size: sparse block.
        intermediate_size: dense MLP width (layers not in ``moe_layers``).
        norm_topk_prob: renormalise the top-k probabilities to sum 1.
        attention_bias: q/k/v (and, when present in the checkpoint, o) projection biases.
        qk_norm: RMSNorm over head_dim on q and k before RoPE (Qwen3).
        shared_expert_intermediate_size: >0 adds a sigmoid-gated shared expert (Qwen2-MoE).
        moe_layers: indices of layers with a sparse block.
    """

    family: str
    vocab_size: int
    hidden_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    rms_norm_eps: float = 1e-6
    rope: dict = field(default_factory=lambda: {"rope_type": "default", "rope_theta": 10000.0})
    max_position_embeddings: int = 4096
    tie_word_embeddings: bool = False
    sliding_window: int = 0
    layer_types: list | None = None
    num_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    intermediate_size: int = 0
    norm_topk_prob: bool = False
    attention_bias: bool = False
    qk_norm: bool = False
    shared_expert_intermediate_size: int = 0
    moe_layers: list = field(default_factory=list)

    @classmethod
    def from_hparams(cls, hp: dict) -> "ModelArgs":
        """Build from an ``hparams`` dict; keys that are not fields are ignored.

        Raises:
            ValueError: a required key is missing (message names it) or values are inconsistent.
        """
        names = {f.name for f in fields(cls)}
        kw = {k: v for k, v in hp.items() if k in names}
        try:
            args = cls(**kw)
        except TypeError as e:
            raise ValueError(f"hparams: {e}") from None
        args.validate()
        return args

    def validate(self):
        """Raise ValueError when values are inconsistent."""
        if self.num_attention_heads % self.num_key_value_heads:
            raise ValueError("num_attention_heads must be a multiple of num_key_value_heads")
        if self.head_dim % 2:
            raise ValueError(f"head_dim {self.head_dim} must be even (RoPE)")
        if self.moe_layers and not (0 < self.num_experts_per_tok <= self.num_experts):
            raise ValueError(f"num_experts_per_tok {self.num_experts_per_tok} not in "
                             f"1..num_experts {self.num_experts}")
        if self.layer_types is not None and len(self.layer_types) != self.num_hidden_layers:
            raise ValueError("layer_types must list one entry per layer")

    def window(self, layer: int) -> int:
        """Sliding window of ``layer`` in tokens, 0 for full attention."""
        if self.sliding_window <= 0:
            return 0
        if self.layer_types is not None and self.layer_types[layer] != "sliding_attention":
            return 0
        return int(self.sliding_window)


# ---------------------------------------------------------------------------------------------
# small kernels


def to_f32(a: np.ndarray) -> np.ndarray:
    """A weight vector/matrix as float32 (BF16 uint16 bits widened exactly). For small tensors."""
    a = np.asarray(a)
    if a.dtype == np.uint16:
        return (a.astype(np.uint32) << np.uint32(16)).view(np.float32)
    return np.ascontiguousarray(a, dtype=np.float32)


@njit(**_SER)
def _rmsnorm(x, w, eps, out):
    T, n = x.shape
    for t in range(T):
        s = np.float32(0.0)
        for j in range(n):
            s += x[t, j] * x[t, j]
        r = np.float32(1.0) / np.sqrt(s / np.float32(n) + eps)
        for j in range(n):
            out[t, j] = w[j] * (x[t, j] * r)


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    """RMSNorm as ``MixtralRMSNorm``: ``weight * x / sqrt(mean(x**2) + eps)`` in float32.

    Args:
        x: float32 [T, n].  weight: float32 [n].  eps: float.
    Returns:
        float32 [T, n] (new array).
    """
    out = np.empty_like(x)
    _rmsnorm(x, weight, np.float32(eps), out)
    return out


@njit(**_SER)
def _add_inplace(a, b):
    for t in range(a.shape[0]):
        for j in range(a.shape[1]):
            a[t, j] += b[t, j]


# ---------------------------------------------------------------------------------------------
# RoPE (modeling_rope_utils.py)


def rope_inv_freq(args: ModelArgs) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin scale, as transformers' ``ROPE_INIT_FUNCTIONS``.

    Supports rope_type ``default``, ``linear``, ``llama3`` and ``yarn`` (float32 arithmetic in
    the same order as ``modeling_rope_utils.py``).

    Args:
        args: uses ``rope`` (rope_theta, factor, ...), ``head_dim``, ``max_position_embeddings``.
    Returns:
        (inv_freq float32 [head_dim // 2] in radians per position, attention_scaling float).
    Raises:
        ValueError: an unsupported rope_type or partial_rotary_factor != 1, or missing keys.
    """
    rp = args.rope or {}
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
    base = float(rp.get("rope_theta", 10000.0))
    if float(rp.get("partial_rotary_factor", 1.0)) != 1.0:
        raise ValueError("partial_rotary_factor != 1 is not supported")
    dim = args.head_dim
    f32 = np.float32
    expo = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / f32(dim)
    pos_freqs = np.power(f32(base), expo, dtype=np.float32)
    inv = (f32(1.0) / pos_freqs).astype(np.float32)
    try:
        if rtype == "default":
            return inv, 1.0
        if rtype == "linear":
            return (inv / f32(rp["factor"])).astype(np.float32), 1.0
        if rtype == "llama3":
            factor = float(rp["factor"])
            lo, hi = float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
            old = float(rp["original_max_position_embeddings"])
            lo_wl, hi_wl = old / lo, old / hi
            wavelen = (f32(2 * math.pi) / inv).astype(np.float32)
            inv_l = np.where(wavelen > lo_wl, inv / f32(factor), inv).astype(np.float32)
            smooth = ((f32(old) / wavelen - f32(lo)) / f32(hi - lo)).astype(np.float32)
            smoothed = ((f32(1) - smooth) * inv_l / f32(factor) + smooth * inv_l).astype(np.float32)
            medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
            return np.where(medium, smoothed, inv_l).astype(np.float32), 1.0
        if rtype == "yarn":
            orig = float(rp.get("original_max_position_embeddings") or args.max_position_embeddings)
            factor = rp.get("factor")
            factor = float(factor) if factor is not None else args.max_position_embeddings / orig
            attn = rp.get("attention_factor")
            mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")

            def get_mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            if attn is None:
                if mscale and mscale_all:
                    attn = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all))
                else:
                    attn = get_mscale(factor)
            beta_fast = rp.get("beta_fast") or 32
            beta_slow = rp.get("beta_slow") or 1

            def corr_dim(rot):
                return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

            low, high = corr_dim(beta_fast), corr_dim(beta_slow)
            if rp.get("truncate", True):
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, dim - 1)
            if low == high:
                high += 0.001
            ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - f32(low)) / f32(high - low),
                           0, 1).astype(np.float32)
            extra = (f32(1) - ramp).astype(np.float32)
            inv_interp = (f32(1.0) / (f32(factor) * pos_freqs)).astype(np.float32)
            inv_y = (inv_interp * (f32(1) - extra) + inv * extra).astype(np.float32)
            return inv_y, float(attn)
    except KeyError as e:
        raise ValueError(f"rope_parameters: {rtype} needs {e.args[0]!r}") from None
    raise ValueError(f"rope_type {rtype!r} is not supported (default, linear, llama3, yarn)")


class RoPE:
    """Rotary embedding tables for positions, as ``MixtralRotaryEmbedding.forward``:
    ``freqs = float32(pos) * inv_freq``; ``cos = cos(freqs) * attention_scaling`` (same for sin).
    Applied with ``rotate_half`` (pairs ``i`` and ``i + head_dim/2``).

    Args:
        args: :class:`ModelArgs`.
    Raises:
        ValueError: from :func:`rope_inv_freq`.
    """

    def __init__(self, args: ModelArgs):
        self.inv_freq, self.scaling = rope_inv_freq(args)

    def cos_sin(self, pos0: int, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Tables for positions ``pos0 .. pos0+T-1``: (cos, sin), each float32 [T, head_dim/2]."""
        pos = np.arange(pos0, pos0 + T, dtype=np.float32)
        freqs = pos[:, None] * self.inv_freq[None, :]
        cos, sin = np.cos(freqs), np.sin(freqs)
        if self.scaling != 1.0:
            cos *= np.float32(self.scaling)
            sin *= np.float32(self.scaling)
        return np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32)


# ---------------------------------------------------------------------------------------------
# KV cache + attention


class KVCache:
    """Keys and values of every layer for one sequence, float32, growing by doubling.

    Attributes:
        k, v: lists (one per layer) of float32 [num_kv_heads, capacity, head_dim]; positions
            ``0 .. offset-1`` are valid (keys stored after RoPE).
        offset: tokens stored. :meth:`Model.forward` advances it only after all layers ran, so
            an interrupted forward leaves the cache as it was (stale slots past ``offset`` are
            overwritten by the next call).

    Args:
        num_layers, num_kv_heads, head_dim: shapes.
        capacity: initial positions allocated (grows by doubling on demand).
    """

    def __init__(self, num_layers: int, num_kv_heads: int, head_dim: int, capacity: int = 256):
        self.num_layers, self.num_kv_heads, self.head_dim = num_layers, num_kv_heads, head_dim
        self.capacity = max(1, int(capacity))
        shape = (num_kv_heads, self.capacity, head_dim)
        self.k = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.v = [np.zeros(shape, np.float32) for _ in range(num_layers)]
        self.offset = 0

    def reserve(self, n: int) -> None:
        """Make room for ``n`` more tokens (doubling the capacity as needed)."""
        need = self.offset + n
        if need <= self.capacity:
            return
        cap = self.capacity
        while cap < need:
            cap *= 2
        for lst in (self.k, self.v):
            for i, a in enumerate(lst):
                b = np.zeros((self.num_kv_heads, cap, self.head_dim), np.float32)
                b[:, :self.offset] = a[:, :self.offset]
                lst[i] = b
        self.capacity = cap

    def get_seq_length(self) -> int:
        """Tokens stored (``offset``); transformers' ``Cache.get_seq_length`` spelling."""
        return self.offset

    def crop(self, length: int) -> None:
        """Forget tokens from position ``length`` on (e.g. to reuse a shared prompt prefix).

        Raises:
            ValueError: ``length`` not in 0..offset.
        """
        if not 0 <= length <= self.offset:
            raise ValueError(f"crop({length}): cache holds {self.offset} tokens")
        self.offset = int(length)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not offset)."""
        return sum(a.nbytes for a in self.k) + sum(a.nbytes for a in self.v)


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
    half = hd // 2
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
def _attend(th, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, out):
    """Causal (optionally windowed) softmax attention of one (token, head) pair ``th``."""
    group = nq // nkv
    t = th // nq
    h = th - t * nq
    kh = h // group
    p = pos0 + t
    start = 0
    if window > 0 and p - window + 1 > 0:
        start = p - window + 1
    n = p + 1 - start
    sc = np.empty(n, np.float32)
    q = qkv[t, h * hd:(h + 1) * hd]
    m = -np.inf
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
def _attention_par(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, out):
    for th in prange(qkv.shape[0] * nq):
        _attend(th, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, out)


@njit(**_SER)
def _attention_ser(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, out):
    for th in range(qkv.shape[0] * nq):
        _attend(th, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, out)


#: attention work (query heads x keys x head_dim) below which one thread is faster than a
#: parallel region.
_ATTN_PAR_MIN = 1 << 18


_EMPTY = np.zeros(0, np.float32)


class Attention:
    """Grouped-query self-attention with RoPE and a KV cache (``MixtralAttention``,
    ``Qwen2MoeAttention``, ``Qwen3MoeAttention``): q/k/v projections (optional bias), optional
    per-head q/k RMSNorm (Qwen3, before RoPE), softmax(q k^T * head_dim**-0.5 + causal mask) v,
    then o_proj.

    The q, k, v weights are concatenated once into one [(nq+2nkv)*hd, H] matrix of the source
    dtype (one GEMV per token instead of three).

    Args:
        args: :class:`ModelArgs`.  layer: index.
        wq, wk, wv: [heads*hd, H]; wo: [H, nq*hd] (BF16 bits, float16 or float32).
        bq, bk, bv, bo: optional biases (any float dtype / BF16 bits).
        q_norm, k_norm: optional [hd] weights (Qwen3).
    """

    def __init__(self, args: ModelArgs, layer: int, wq, wk, wv, wo, bq=None, bk=None, bv=None,
                 bo=None, q_norm=None, k_norm=None):
        self.layer = layer
        self.nq, self.nkv = args.num_attention_heads, args.num_key_value_heads
        self.hd = args.head_dim
        self.eps = np.float32(args.rms_norm_eps)
        self.window = args.window(layer)
        self.scale = np.float32(self.hd ** -0.5)
        mats = [np.asarray(w) for w in (wq, wk, wv)]
        if len({m.dtype for m in mats}) > 1:
            mats = [to_f32(m) for m in mats]
        self.wqkv = np.ascontiguousarray(np.concatenate(mats, axis=0))
        self.wo = np.ascontiguousarray(wo)
        if any(b is not None for b in (bq, bk, bv)):
            sizes = (self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd)
            self.bqkv = np.concatenate([to_f32(b) if b is not None else np.zeros(n, np.float32)
                                        for b, n in zip((bq, bk, bv), sizes)])
        else:
            self.bqkv = None
        self.bo = None if bo is None else to_f32(bo)
        self.q_norm = _EMPTY if q_norm is None else to_f32(q_norm)
        self.k_norm = _EMPTY if k_norm is None else to_f32(k_norm)

    def __call__(self, x: np.ndarray, cache: KVCache, pos0: int, cos: np.ndarray,
                 sin: np.ndarray) -> np.ndarray:
        """x float32 [T, H] at positions pos0.. -> float32 [T, H]; writes k/v into ``cache``
        (which must have room: :meth:`KVCache.reserve`)."""
        T = x.shape[0]
        qkv = np.empty((T, self.wqkv.shape[0]), np.float32)
        linear_into(x, self.wqkv, qkv, self.bqkv)
        att = np.empty((T, self.nq * self.hd), np.float32)
        kc, vc = cache.k[self.layer], cache.v[self.layer]
        _qk_prepare(qkv, self.nq, self.nkv, self.hd, self.q_norm, self.k_norm, self.eps, cos, sin,
                    kc, vc, pos0)
        keys = pos0 + T if self.window <= 0 else min(pos0 + T, self.window)
        attend = _attention_par if T * self.nq * keys * self.hd >= _ATTN_PAR_MIN else _attention_ser
        attend(qkv, self.nq, self.nkv, self.hd, kc, vc, pos0, self.window, self.scale, att)
        out = np.empty((T, self.wo.shape[0]), np.float32)
        return linear_into(att, self.wo, out, self.bo)


# ---------------------------------------------------------------------------------------------
# feed-forward blocks


class MLP:
    """Dense SwiGLU MLP ``down(silu(gate(x)) * up(x))`` (``Qwen2MoeMLP``; also the shared expert).

    Args:
        gate, up: [I, H]; down: [H, I] (BF16 bits, float16 or float32).
    """

    def __init__(self, gate, up, down):
        self.gate, self.up, self.down = (np.ascontiguousarray(a) for a in (gate, up, down))

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x float32 [T, H] -> float32 [T, H]."""
        h = swiglu_hidden(x, self.gate, self.up)
        out = np.empty((x.shape[0], self.down.shape[0]), np.float32)
        return linear_into(h, self.down, out)


@njit(nogil=True, cache=True)  # no fastmath: the sum order must not depend on memory layout
def _route(logits, k, renorm, idx, w):
    """Softmax over all experts (float32), top-k (descending, lowest index first on ties),
    optional renormalisation of the k weights. Compiled without fastmath so that the same
    logits always give the same weights, bit for bit (LLVM otherwise picks a vector or scalar
    summation depending on whether the scratch array aliases the input)."""
    T, E = logits.shape
    p = np.empty(E, np.float32)
    for t in range(T):
        m = logits[t, 0]
        for e in range(1, E):
            if logits[t, e] > m:
                m = logits[t, e]
        tot = np.float32(0.0)
        for e in range(E):
            p[e] = np.exp(logits[t, e] - m)
            tot += p[e]
        for e in range(E):
            p[e] = p[e] / tot
        s = np.float32(0.0)
        for j in range(k):
            best = -1
            bv = np.float32(-1.0)
            for e in range(E):
                if p[e] > bv:
                    bv = p[e]
                    best = e
            idx[t, j] = best
            w[t, j] = bv
            s += bv
            p[best] = np.float32(-2.0)
        if renorm:
            for j in range(k):
                w[t, j] = w[t, j] / s


def route(logits: np.ndarray, k: int, renorm: bool) -> tuple[np.ndarray, np.ndarray]:
    """Top-k routing as ``MixtralTopKRouter`` / ``Qwen2MoeTopKRouter``: softmax of the router
    logits in float32 over all experts, ``topk``, then (if ``renorm``) divide by the k-sum.

    Args:
        logits: float32 [T, E] router logits.  k: experts per token.  renorm: norm_topk_prob.
    Returns:
        (topk_idx int64 [T, k] in descending probability, topk_w float32 [T, k]).
    """
    T = logits.shape[0]
    idx = np.empty((T, k), np.int64)
    w = np.empty((T, k), np.float32)
    _route(np.ascontiguousarray(logits, np.float32), k, renorm, idx, w)
    return idx, w


class Executor(Protocol):
    """What :class:`SparseMoeBlock` calls to compute the routed experts."""

    def run(self, layer: int, x: np.ndarray, topk_idx: np.ndarray,
            topk_w: np.ndarray) -> np.ndarray:
        """``out[t] = sum_j topk_w[t, j] * expert_{topk_idx[t, j]}(x[t])``.

        Args:
            layer: decoder layer index.  x: float32 [T, H] (post-attention-norm hidden states).
            topk_idx: int64 [T, k].  topk_w: float32 [T, k].
        Returns:
            float32 [T, H].
        """


class ExpertExecutor:
    """The default :class:`Executor`: for each distinct selected expert (ascending index, as
    ``MixtralExperts.forward`` loops), fetch ``source.expert(layer, e)`` and add its weighted
    output to the rows routed to it (one token: all k experts in one fused call,
    :func:`~zipmoe_rt.kernels.linear.experts_decode`). No caching of its own: the source
    decides.

    Args:
        source: a :class:`~zipmoe_rt.models.weights.WeightSource`.
    Attributes:
        calls: number of ``source.expert`` fetches so far (statistics).
    """

    def __init__(self, source):
        self.source = source
        self.calls = 0

    def run(self, layer, x, topk_idx, topk_w):
        """See :meth:`Executor.run`. Raises KeyError when the source lacks an expert."""
        T, k = topk_idx.shape
        out = np.zeros((T, x.shape[1]), np.float32)
        if T == 1:
            order = np.argsort(topk_idx[0], kind="stable")
            experts = [self.source.expert(layer, int(topk_idx[0, j])) for j in order]
            self.calls += k
            experts_decode(out[0], x[0], experts, topk_w[0, order])
            return out
        for e in np.unique(topk_idx):
            rows, slots = np.nonzero(topk_idx == e)
            ew = self.source.expert(layer, int(e))
            self.calls += 1
            expert_accumulate(out, x, rows.astype(np.int64), topk_w[rows, slots], ew.gate, ew.up,
                              ew.down)
        return out


#: route hook signature: (layer, x [T,H], router_logits [T,E], topk_idx [T,k], topk_w [T,k]).
RouteHook = Callable[[int, np.ndarray, np.ndarray, np.ndarray, np.ndarray], None]


class SparseMoeBlock:
    """Sparse MoE feed-forward (``MixtralSparseMoeBlock`` / ``Qwen2MoeSparseMoeBlock`` /
    ``Qwen3MoeSparseMoeBlock``): float32 router logits ``x @ gate.T``, :func:`route`, the routed
    experts through ``model.executor``, plus an optional shared expert scaled by
    ``sigmoid(x @ shared_expert_gate.T)`` (Qwen2-MoE).

    Args:
        model: the owning :class:`Model` (its ``executor`` and ``route_hook`` are read per call,
            so they can be swapped after construction).
        layer: index.  gate: router weight [E, H].  top_k: experts per token.
        renorm: norm_topk_prob.  shared: optional :class:`MLP`.  shared_gate: optional [1, H].
    """

    def __init__(self, model, layer, gate, top_k, renorm, shared=None, shared_gate=None):
        self.model, self.layer = model, layer
        self.gate = np.ascontiguousarray(gate)
        self.top_k, self.renorm = int(top_k), bool(renorm)
        self.shared = shared
        self.shared_gate = None if shared_gate is None else np.ascontiguousarray(shared_gate)

    def router_logits(self, x: np.ndarray) -> np.ndarray:
        """float32 [T, E] router logits for x float32 [T, H] (usable for look-ahead)."""
        logits = np.empty((x.shape[0], self.gate.shape[0]), np.float32)
        return linear_into(x, self.gate, logits)

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """x float32 [T, H] -> float32 [T, H]."""
        logits = self.router_logits(x)
        idx, w = route(logits, self.top_k, self.renorm)
        hook = self.model.route_hook
        if hook is not None:
            hook(self.layer, x, logits, idx, w)
        y = self.model.executor.run(self.layer, x, idx, w)
        if self.shared is not None:
            s = self.shared(x)
            g = np.empty((x.shape[0], 1), np.float32)
            linear_into(x, self.shared_gate, g)
            y += (np.float32(1.0) / (np.float32(1.0) + np.exp(-g))) * s
        return y


class DecoderLayer:
    """Pre-norm residual layer (``MixtralDecoderLayer``):
    ``x += attn(input_layernorm(x)); x += mlp(post_attention_layernorm(x))``.

    Args:
        attn: :class:`Attention`.  mlp: :class:`SparseMoeBlock` or :class:`MLP` (any callable
            float32 [T, H] -> [T, H]).  input_norm, post_norm: [H] RMSNorm weights.
        eps: RMSNorm epsilon.
    """

    def __init__(self, attn: Attention, mlp, input_norm, post_norm, eps: float):
        self.attn, self.mlp = attn, mlp
        self.input_norm, self.post_norm = to_f32(input_norm), to_f32(post_norm)
        self.eps = np.float32(eps)

    def __call__(self, x, cache, pos0, cos, sin):
        """x float32 [T, H], updated in place and returned."""
        h = np.empty_like(x)
        _rmsnorm(x, self.input_norm, self.eps, h)
        _add_inplace(x, self.attn(h, cache, pos0, cos, sin))
        _rmsnorm(x, self.post_norm, self.eps, h)
        _add_inplace(x, self.mlp(h))
        return x


# ---------------------------------------------------------------------------------------------
# model skeleton


class Model:
    """A decoder-only MoE language model over a weight source (the ``*ForCausalLM`` classes).

    Subclasses (one per family) set the tensor names and build each layer's feed-forward block
    in :meth:`build_mlp`. Dense weights are fetched from the source once, here; expert weights
    are fetched by the executor on every use.

    Args:
        source: a :class:`~zipmoe_rt.models.weights.WeightSource`.
        executor: an :class:`Executor`; default :class:`ExpertExecutor` over ``source``.
    Attributes:
        args / config: :class:`ModelArgs` (``config.vocab_size`` etc.).
        hparams: the source's dict.
        executor: swappable.
        route_hook: None or ``f(layer, x, logits, topk_idx, topk_w)`` called before experts run.
        layers: list of :class:`DecoderLayer` (``layers[i].mlp`` is a :class:`SparseMoeBlock`
            for MoE layers, whose ``router_logits`` an engine may use for prefetching).
    Raises:
        KeyError: a dense tensor is missing.  ValueError: inconsistent hparams.
    """

    args_class = ModelArgs

    def __init__(self, source, executor=None):
        self.source = source
        self.hparams = dict(source.hparams)
        self.args = self.args_class.from_hparams(self.hparams)
        self.config = self.args
        self.executor = executor if executor is not None else ExpertExecutor(source)
        self.route_hook: RouteHook | None = None
        a = self.args
        self.rope = RoPE(a)
        self.embed = np.ascontiguousarray(source.tensor("model.embed_tokens.weight"))
        if source.has("lm_head.weight"):
            self.lm_head = np.ascontiguousarray(source.tensor("lm_head.weight"))
        else:
            self.lm_head = self.embed
        self.norm = to_f32(source.tensor("model.norm.weight"))
        self.moe_layers = set(a.moe_layers)
        self.layers = [self.build_layer(i) for i in range(a.num_hidden_layers)]

    # -- weights -------------------------------------------------------------------------------

    def _opt(self, name):
        return self.source.tensor(name) if self.source.has(name) else None

    def _first(self, *names):
        for n in names:
            if self.source.has(n):
                return self.source.tensor(n)
        raise KeyError(f"none of {names} in the weight source")

    def build_attention(self, i: int) -> Attention:
        """Attention of layer ``i`` from ``model.layers.{i}.self_attn.*``."""
        p = f"model.layers.{i}.self_attn."
        t = self.source.tensor
        kw = {}
        if self.args.attention_bias or self.source.has(p + "q_proj.bias"):
            kw.update(bq=self._opt(p + "q_proj.bias"), bk=self._opt(p + "k_proj.bias"),
                      bv=self._opt(p + "v_proj.bias"))
        kw["bo"] = self._opt(p + "o_proj.bias")
        if self.args.qk_norm:
            kw.update(q_norm=t(p + "q_norm.weight"), k_norm=t(p + "k_norm.weight"))
        return Attention(self.args, i, t(p + "q_proj.weight"), t(p + "k_proj.weight"),
                         t(p + "v_proj.weight"), t(p + "o_proj.weight"), **kw)

    def build_mlp(self, i: int):
        """The feed-forward block of layer ``i`` (family specific)."""
        raise NotImplementedError

    def build_layer(self, i: int) -> DecoderLayer:
        """Decoder layer ``i`` (attention, feed-forward block, both norms)."""
        p = f"model.layers.{i}."
        return DecoderLayer(self.build_attention(i), self.build_mlp(i),
                            self.source.tensor(p + "input_layernorm.weight"),
                            self.source.tensor(p + "post_attention_layernorm.weight"),
                            self.args.rms_norm_eps)

    def dense_mlp(self, prefix: str) -> MLP:
        """:class:`MLP` from ``{prefix}gate_proj/up_proj/down_proj.weight``."""
        t = self.source.tensor
        return MLP(t(prefix + "gate_proj.weight"), t(prefix + "up_proj.weight"),
                   t(prefix + "down_proj.weight"))

    # -- inference -----------------------------------------------------------------------------

    def new_cache(self, capacity: int = 256, max_tokens: int | None = None) -> KVCache:
        """An empty :class:`KVCache` for this model.

        Args:
            capacity: positions allocated up front (the cache grows by doubling past it).
            max_tokens: the most positions the caller will store, if known: the initial
                allocation is then ``min(capacity, max_tokens)`` (a short run does not hold
                ``capacity`` positions of every layer: 12 MB for the default model).
        """
        if max_tokens is not None:
            capacity = max(1, min(capacity, int(max_tokens)))
        a = self.args
        return KVCache(a.num_hidden_layers, a.num_key_value_heads, a.head_dim, capacity)

    def embed_tokens(self, ids: np.ndarray) -> np.ndarray:
        """float32 [T, H] embedding rows (BF16 rows widened on the fly).

        Raises:
            IndexError: an id outside the vocabulary.
        """
        return bf16_rows(self.embed, ids)

    def logits(self, h: np.ndarray) -> np.ndarray:
        """Final norm + lm_head: float32 [T, H] -> float32 [T, vocab]."""
        hn = np.empty_like(h)
        _rmsnorm(h, self.norm, np.float32(self.args.rms_norm_eps), hn)
        out = np.empty((h.shape[0], self.lm_head.shape[0]), np.float32)
        return linear_into(hn, self.lm_head, out)

    def forward(self, ids, cache: KVCache, last_only: bool = True) -> np.ndarray:
        """Run tokens ``ids`` after the ``cache.offset`` tokens already in ``cache`` and append
        their keys/values (``cache.offset += T``).

        Args:
            ids: int [T] token ids (T >= 1).
            cache: from :meth:`new_cache`.
            last_only: return only the last position's logits.
        Returns:
            float32 [vocab] (last_only) or [T, vocab] logits.
        Raises:
            ValueError: empty ``ids``.  IndexError: an id outside the vocabulary.
        """
        ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
        T = ids.shape[0]
        if T == 0:
            raise ValueError("forward: no tokens")
        x = self.embed_tokens(ids)
        pos0 = cache.offset
        cache.reserve(T)
        cos, sin = self.rope.cos_sin(pos0, T)
        for layer in self.layers:
            layer(x, cache, pos0, cos, sin)
        cache.offset = pos0 + T
        if last_only:
            return self.logits(x[T - 1:])[0]
        return self.logits(x)

    __call__ = forward
