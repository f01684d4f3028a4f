"""Grouped-query self-attention with RoPE over a per-layer :class:`~zipmoe_rt.models.cache.KVCache`
(``MixtralAttention``, ``Qwen2MoeAttention``, ``Qwen3MoeAttention``, ``OlmoeAttention`` in
transformers' modeling files). The compute runs through the model's backend
(:mod:`zipmoe_rt.backends`).
"""
from __future__ import annotations

import numpy as np

from ..backends import get_backend, to_f32
from ..backends.base import check_qk_norm
from ..families.hparams import HParams
from .cache import KVCache
from .rope import interleaved_to_halves

_EMPTY = np.zeros(0, np.float32)


def _permute_heads(w, heads: int, perm: np.ndarray):
    """Rows of each of ``heads`` heads of ``w`` ([heads*hd, ...] weight or [heads*hd] bias)
    reordered by ``perm``; None stays None."""
    if w is None:
        return None
    w = np.asarray(w)
    hd = perm.size
    return np.ascontiguousarray(w.reshape(heads, hd, *w.shape[1:])[:, perm].reshape(w.shape))


class Attention:
    """Grouped-query self-attention with RoPE and a KV cache (``MixtralAttention``,
    ``Qwen2MoeAttention``, ``Qwen3MoeAttention``, ``OlmoeAttention``): q/k/v projections
    (optional bias), optional q/k RMSNorm (per head, Qwen3; or over the whole projection, OLMoE),
    optional clamping of q, k, v (OLMoE's ``clip_qkv``), RoPE,
    softmax(q k^T * head_dim**-0.5 + causal mask) v, then o_proj.

    The q, k, v weights are concatenated once into one [(nq+2nkv)*hd, H] matrix of the source
    dtype (one GEMV per token instead of three).

    Args:
        args: the family's :class:`~zipmoe_rt.families.HParams`.  layer: index.
        wq, wk, wv: [heads*hd, H]; wo: [H, nq*hd] (BF16 bits, float16 or float32).
        bq, bk, bv, bo: optional biases (any float dtype / BF16 bits).
        q_norm, k_norm: optional RMSNorm weights: [hd] each (per head, Qwen3), or [nq*hd] and
            [nkv*hd] (the whole q / k projection, OLMoE), as ``args.QK_NORM_SCOPE`` says.
        clip: None, or clamp q, k and v to [-clip, clip] after the norms (``clip_qkv``).
        backend: compute backend (:func:`~zipmoe_rt.backends.get_backend`; default numba).
        scale: the softmax scale; None = ``head_dim ** -0.5`` (Granite: ``attention_multiplier``;
            Gemma 4: 1).
        v_norm: RMSNorm each value head over ``head_dim`` without a weight before it is cached
            (``Gemma4TextAttention.v_norm``, ``with_scale=False``).
        sinks: None, or [nq] attention sink logits (gpt-oss's ``self_attn.sinks``; any float
            dtype / BF16 bits): each head's softmax has the sink in its denominator
            (``backend.attention_sinks``).

    With ``args.ROPE_INTERLEAVED`` (ERNIE 4.5: RoPE rotates the pairs ``(2i, 2i+1)`` of each
    head, ``modeling_ernie4_5.py``'s ``apply_rotary_pos_emb``), the rows of each q and k head
    (and their biases) are reordered once, even dimensions first
    (:func:`~.rope.interleaved_to_halves`): the usual half-split RoPE of the reordered head is the
    interleaved RoPE of the head, reordered the same way, and q·k is unchanged by a common
    reordering, so the backend ops stay as they are (the cached keys are in that order).
    Raises:
        ValueError: norm weights of another size than ``args.QK_NORM_SCOPE`` gives, or a
            negative ``clip``.
    """

    def __init__(self, args: HParams, layer: int, wq, wk, wv, wo, bq=None, bk=None, bv=None,
                 bo=None, q_norm=None, k_norm=None, clip: float | None = None, backend=None,
                 scale: float | None = None, v_norm: bool = False, sinks=None):
        be = self.backend = get_backend(backend)
        self.layer = layer
        self.nq, self.nkv = args.num_attention_heads, args.num_key_value_heads
        self.hd = args.head_dim
        self.eps = np.float32(args.rms_norm_eps)
        self.window = args.window(layer)
        self.scale = np.float32(self.hd ** -0.5 if scale is None else scale)
        if args.ROPE_INTERLEAVED:   # rotate pairs (2i, 2i+1): as halves after a row permutation
            perm = interleaved_to_halves(self.hd)
            wq, bq = _permute_heads(wq, self.nq, perm), _permute_heads(bq, self.nq, perm)
            wk, bk = _permute_heads(wk, self.nkv, perm), _permute_heads(bk, self.nkv, perm)
            q_norm, k_norm = (None if n is None else _permute_heads(n, np.size(n) // self.hd, perm)
                              for n in (q_norm, k_norm))
        mats = [np.asarray(w) for w in (wq, wk, wv)]
        if len({m.dtype for m in mats}) > 1:
            mats = [to_f32(m) for m in mats]
        self.wqkv = be.linear_weight(np.concatenate(mats, axis=0))
        self.wo = be.linear_weight(wo)
        if any(b is not None for b in (bq, bk, bv)):
            sizes = (self.nq * self.hd, self.nkv * self.hd, self.nkv * self.hd)
            self.bqkv = be.from_host(np.concatenate(
                [to_f32(b) if b is not None else np.zeros(n, np.float32)
                 for b, n in zip((bq, bk, bv), sizes)]))
        else:
            self.bqkv = None
        self.bo = None if bo is None else be.from_host(to_f32(bo))
        self.q_norm = be.from_host(_EMPTY if q_norm is None else to_f32(q_norm))
        self.k_norm = be.from_host(_EMPTY if k_norm is None else to_f32(k_norm))
        self.clip = None if clip is None else float(clip)
        self.v_norm = be.from_host(np.ones(self.hd, np.float32)) if v_norm else None
        self.sinks = None
        if sinks is not None:
            sk = to_f32(sinks).reshape(-1)
            if sk.size != self.nq:
                raise ValueError(f"layer {layer}: {sk.size} attention sinks for {self.nq} heads")
            self.sinks = be.from_host(np.ascontiguousarray(sk))
        check_qk_norm(self.q_norm.size, self.k_norm.size, self.nq, self.nkv, self.hd, self.clip)
        whole = args.QK_NORM_SCOPE == "projection"
        for name, w, heads in (("q_norm", self.q_norm, self.nq), ("k_norm", self.k_norm, self.nkv)):
            want = heads * self.hd if whole else self.hd
            if w.size and w.size != want:
                raise ValueError(f"layer {layer}: {name} has {w.size} weights, expected {want} "
                                 f"(QK_NORM_SCOPE {args.QK_NORM_SCOPE!r})")

    def new_cache(self, capacity: int = 256) -> KVCache:
        """An empty :class:`~zipmoe_rt.models.cache.KVCache` for this layer (nkv heads of hd
        keys and values, this layer's window) holding ``capacity`` positions before growing."""
        return KVCache(self.nkv, self.hd, self.hd, self.window, capacity, self.backend)

    def __call__(self, x, cache: KVCache, pos0: int, cos, sin):
        """x float32 [T, H] at positions pos0.. -> float32 [T, H]; writes k/v into this layer's
        ``cache`` at positions pos0.. (pending until the model commits; the cache must have
        room: :meth:`KVCache.reserve`). cos, sin: float32 [T, rot/2] backend arrays (``rot``
        rotary dimensions, ``hd`` unless the rope has a partial rotary factor)."""
        be = self.backend
        T = x.shape[0]
        qkv = be.linear(x, self.wqkv, self.bqkv)
        if self.v_norm is not None:     # weightless RMSNorm of each value head (Gemma 4)
            off = (self.nq + self.nkv) * self.hd
            v = qkv[:, off:].reshape(T * self.nkv, self.hd)
            qkv[:, off:] = be.rmsnorm(v, self.v_norm, self.eps).reshape(T, self.nkv * self.hd)
        att = be.empty((T, self.nq * self.hd))
        kc, vc = cache.k, cache.v
        be.rope_qk_cache(qkv, self.nq, self.nkv, self.hd, self.q_norm, self.k_norm, self.eps,
                         cos, sin, kc, vc, pos0, self.clip)
        if self.sinks is None:
            be.attention(qkv, self.nq, self.nkv, self.hd, kc, vc, pos0, self.window, self.scale,
                         att)
        else:
            be.attention_sinks(qkv, self.nq, self.nkv, self.hd, kc, vc, pos0, self.window,
                               self.scale, self.sinks, att)
        return be.linear(att, self.wo, self.bo)
