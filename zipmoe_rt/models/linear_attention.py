"""The token mixers of the hybrid Qwen3-Next / Qwen3.5-MoE decoders (transformers
``models/qwen3_next/modeling_qwen3_next.py``, ``models/qwen3_5_moe/modeling_qwen3_5_moe.py``):

- :class:`GatedDeltaNet`, the linear-attention layer (``Qwen3NextGatedDeltaNet``): input
  projections, a causal depthwise conv1d with SiLU, the gated delta rule over a recurrent state,
  the gated RMSNorm and ``out_proj``; its state lives in a
  :class:`~zipmoe_rt.models.cache.RecurrentCache`, which does not grow with the sequence;
- :class:`GatedAttention`, grouped-query attention whose output is gated by
  ``sigmoid(gate)``, the gate taken from ``q_proj``'s doubled width (``Qwen3NextAttention``).

Every op runs through the backend (:mod:`zipmoe_rt.backends`).
"""
from __future__ import annotations

import numpy as np

from ..backends import get_backend, to_f32
from .attention import Attention
from .cache import RecurrentCache


def split_qkvz(w_qkvz, w_ba, nk: int, nv: int, dk: int, dv: int):
    """Qwen3-Next's fused projections in the Qwen3.5 layout, by a permutation of rows (exact).

    ``in_proj_qkvz`` holds per key head ``q (dk), k (dk), v (r*dv), z (r*dv)`` rows and
    ``in_proj_ba`` per key head ``b (r), a (r)``, ``r = nv / nk``
    (``Qwen3NextGatedDeltaNet.fix_query_key_value_ordering``); value head ``kh * r + j`` is the
    ``j``-th of key head ``kh``.

    Args:
        w_qkvz: [2 nk dk + 2 nv dv, H] (any dtype).  w_ba: [2 nv, H].
    Returns:
        (w_qkv [2 nk dk + nv dv, H]: all q heads, all k heads, all v heads;
        w_z [nv dv, H]; w_ba [2 nv, H]: all b rows, then all a rows), same dtype.
    Raises:
        ValueError: shapes that do not match the head counts.
    """
    w_qkvz, w_ba = np.asarray(w_qkvz), np.asarray(w_ba)
    r = nv // nk
    width = 2 * dk + 2 * r * dv
    if w_qkvz.shape[0] != nk * width or w_ba.shape[0] != 2 * nv:
        raise ValueError(f"in_proj_qkvz {w_qkvz.shape} / in_proj_ba {w_ba.shape} do not match "
                         f"{nk} key heads of {dk} and {nv} value heads of {dv}")
    g = w_qkvz.reshape(nk, width, -1)
    q, k = g[:, :dk], g[:, dk:2 * dk]
    v, z = g[:, 2 * dk:2 * dk + r * dv], g[:, 2 * dk + r * dv:]
    H = w_qkvz.shape[1]
    qkv = np.concatenate([q.reshape(-1, H), k.reshape(-1, H), v.reshape(-1, H)])
    ba = w_ba.reshape(nk, 2, r, H)
    return (np.ascontiguousarray(qkv), np.ascontiguousarray(z.reshape(-1, H)),
            np.ascontiguousarray(ba.transpose(1, 0, 2, 3).reshape(2 * nv, H)))


class GatedDeltaNet:
    """Linear attention with the gated delta rule (``Qwen3NextGatedDeltaNet`` /
    ``Qwen3_5MoeGatedDeltaNet``): ``mixed = x W_qkv``, ``conv1d + SiLU`` over it (state: the
    last ``K - 1`` inputs), the gated delta rule with ``beta = sigmoid(b)`` and
    ``g = -exp(A_log) softplus(a + dt_bias)`` over the recurrent state (a chunked scan for a
    prompt, the recurrence for one token), ``rmsnorm(o) * w * silu(z)`` per value head, then
    ``out_proj``.

    Args:
        args: the family's HParams (``linear_num_key_heads``, ``linear_num_value_heads``,
            ``linear_key_head_dim``, ``linear_value_head_dim``, ``linear_conv_kernel_dim``,
            ``rms_norm_eps``).  layer: index.
        w_qkv: [2 nk dk + nv dv, H].  w_z: [nv dv, H].  w_ba: [2 nv, H] (b rows, then a rows):
            the Qwen3.5 layout (:func:`split_qkvz` turns Qwen3-Next's into it).
        conv: [C, 1, K] or [C, K].  A_log, dt_bias: [nv].  norm: [dv] (applied as is, not as
            ``1 + w``).  w_out: [H, nv dv].  backend: compute backend.
    Raises:
        ValueError: a weight of another shape than the hyper-parameters give (named).
    """

    def __init__(self, args, layer: int, w_qkv, w_z, w_ba, conv, A_log, dt_bias, norm, w_out,
                 backend=None):
        be = self.backend = get_backend(backend)
        self.layer = layer
        self.nk, self.nv = args.linear_num_key_heads, args.linear_num_value_heads
        self.dk, self.dv = args.linear_key_head_dim, args.linear_value_head_dim
        self.K = args.linear_conv_kernel_dim
        self.C = 2 * self.nk * self.dk + self.nv * self.dv
        self.eps = np.float32(args.rms_norm_eps)
        H = args.hidden_size
        conv = to_f32(conv).reshape(np.shape(conv)[0], -1)
        want = {"in_proj_qkv": ((self.C, H), w_qkv), "in_proj_z": ((self.nv * self.dv, H), w_z),
                "in_proj_ba": ((2 * self.nv, H), w_ba), "conv1d": ((self.C, self.K), conv),
                "A_log": ((self.nv,), A_log), "dt_bias": ((self.nv,), dt_bias),
                "norm": ((self.dv,), norm), "out_proj": ((H, self.nv * self.dv), w_out)}
        for name, (shape, w) in want.items():
            if tuple(np.shape(w)) != shape:
                raise ValueError(f"layer {layer}: linear_attn {name} has shape "
                                 f"{tuple(np.shape(w))}, expected {shape}")
        self.w_qkv, self.w_z, self.w_ba, self.w_out = (
            be.linear_weight(w) for w in (w_qkv, w_z, w_ba, w_out))
        self.conv = be.from_host(conv)
        self.A_log, self.dt_bias, self.norm = (be.from_host(to_f32(w))
                                               for w in (A_log, dt_bias, norm))

    def new_cache(self, capacity: int = 256) -> RecurrentCache:
        """An empty :class:`~zipmoe_rt.models.cache.RecurrentCache` (conv state [K - 1, C],
        recurrent state [nv, dk, dv]); ``capacity`` is ignored (the state does not grow)."""
        return RecurrentCache((self.K - 1, self.C), (self.nv, self.dk, self.dv), self.backend)

    def state_values(self) -> int:
        """Values one copy of this layer's state holds: ``(K - 1) C + nv dk dv``."""
        return (self.K - 1) * self.C + self.nv * self.dk * self.dv

    def __call__(self, x, cache: RecurrentCache, pos0: int, cos=None, sin=None):
        """x float32 [T, H] -> float32 [T, H]; reads ``cache``'s committed state and writes the
        state after these tokens into its pending buffers (the model commits). ``pos0``,
        ``cos``, ``sin`` are unused (no positions in a recurrence)."""
        be = self.backend
        T = x.shape[0]
        mixed = be.linear(x, self.w_qkv)
        z = be.linear(x, self.w_z)
        ba = be.linear(x, self.w_ba)
        conv_next, state_next = cache.pending()
        mixed = be.conv1d_silu(mixed, self.conv, cache.conv, conv_next)
        core = be.gated_delta_rule(mixed, ba, self.A_log, self.dt_bias, self.nk, self.nv,
                                   self.dk, self.dv, cache.state, state_next)
        o = be.rmsnorm_gated(core.reshape(T * self.nv, self.dv), self.norm,
                             z.reshape(T * self.nv, self.dv), self.eps)
        return be.linear(o.reshape(T, self.nv * self.dv), self.w_out)


class GatedAttention(Attention):
    """:class:`~zipmoe_rt.models.attention.Attention` with an output gate
    (``Qwen3NextAttention``): ``q_proj`` is twice as wide, each head's query rows followed by
    its gate rows; ``o_proj(attn * sigmoid(gate))``.

    Args:
        as :class:`~zipmoe_rt.models.attention.Attention`, with ``wq`` [2 nq hd, H] and ``bq``
        [2 nq hd] (when biased) in ``q_proj``'s layout.
    Raises:
        ValueError: ``wq`` not of ``2 nq hd`` rows, or as the base class.
    """

    def __init__(self, args, layer, wq, wk, wv, wo, bq=None, **kw):
        nq, hd = args.num_attention_heads, args.head_dim
        wq = np.asarray(wq)
        if wq.shape[0] != 2 * nq * hd:
            raise ValueError(f"layer {layer}: gated q_proj has {wq.shape[0]} rows, expected "
                             f"{2 * nq * hd} (heads x head_dim x 2)")
        g = wq.reshape(nq, 2, hd, -1)
        wgate = np.ascontiguousarray(g[:, 1].reshape(nq * hd, -1))
        bgate = None
        if bq is not None:
            b = to_f32(bq).reshape(nq, 2, hd)
            bq, bgate = b[:, 0].reshape(-1), b[:, 1].reshape(-1)
        super().__init__(args, layer, np.ascontiguousarray(g[:, 0].reshape(nq * hd, -1)), wk, wv,
                         wo, bq=bq, **kw)
        be = self.backend
        self.wgate = be.linear_weight(wgate)
        self.bgate = None if bgate is None else be.from_host(np.ascontiguousarray(bgate))

    def __call__(self, x, cache, pos0: int, cos, sin):
        """As :meth:`Attention.__call__ <zipmoe_rt.models.attention.Attention.__call__>`, the
        attention output multiplied by ``sigmoid(gate)`` before ``o_proj``."""
        be = self.backend
        T = x.shape[0]
        qkv = be.linear(x, self.wqkv, self.bqkv)
        gate = be.linear(x, self.wgate, self.bgate)
        att = be.empty((T, self.nq * self.hd))
        kc, vc = cache.k, cache.v
        be.rope_qk_cache(qkv, self.nq, self.nkv, self.hd, self.q_norm, self.k_norm, self.eps,
                         cos, sin, kc, vc, pos0, self.clip)
        be.attention(qkv, self.nq, self.nkv, self.hd, kc, vc, pos0, self.window, self.scale, att)
        be.sigmoid_mul_(att, gate)
        return be.linear(att, self.wo, self.bo)
