"""Multi-head Latent Attention (MLA) over a cache of the compressed latent: the attention of
DeepSeek-V2, DeepSeek-V3 and GLM-4-MoE-Lite (transformers ``DeepseekV2Attention``,
``DeepseekV3Attention``, ``Glm4MoeLiteAttention``; DeepSeek-V2 paper, arXiv 2405.04434 §2.1).

Per token, with ``r = kv_lora_rank``, ``dn = qk_nope_head_dim``, ``dr = qk_rope_head_dim``,
``dv = v_head_dim`` and ``nh`` heads:

* ``q = q_proj(x)``, or ``q_b_proj(q_a_layernorm(q_a_proj(x)))`` when ``q_lora_rank`` is set;
  each head splits into ``q_nope`` [dn] and ``q_pe`` [dr];
* ``kv_a_proj_with_mqa(x)`` splits into the latent ``c = kv_a_layernorm(.[:r])`` and one
  shared ``k_pe`` [dr]; RoPE rotates ``q_pe`` and ``k_pe``;
* transformers then expands ``kv_b_proj(c)`` into per-head ``k_nope`` [dn] and ``v`` [dv].

The cache holds only ``[c, rope(k_pe)]`` per position (:class:`~.cache.LatentCache`, ``r + dr``
values), as transformers' cache does. The attention never expands keys and values: ``kv_b_proj``
is absorbed, ``q_nope . (W_k c) = (W_k^T q_nope) . c`` and ``softmax . (W_v c) = W_v (softmax .
c)``, so each head is one query of width ``r + dr`` against the shared latent (multi-query
attention over the cache), and the heads' latent outputs go through ``W_v`` before ``o_proj``
(both absorbed products are the backend's ``heads_linear``).
The scores get the scale ``qk_head_dim ** -0.5`` with YaRN's ``mscale_all_dim`` correction
(:func:`~.rope.softmax_scale`).

RoPE layout: DeepSeek's checkpoints rotate interleaved pairs ``(x0, x1), (x2, x3), ...``
(DeepSeek-V2's complex product, DeepSeek-V3's ``apply_rotary_pos_emb_interleave``); with
``rope_interleave`` the rows of the ``q_pe`` and ``k_pe`` projections are permuted once, evens
then odds, so that the backend's ``rotate_half`` RoPE computes the same rotations (dot products
of q and k are unchanged by the common permutation). Without it (DeepSeek-V3's
``rope_interleave: false``) ``rotate_half`` applies as is.
"""
from __future__ import annotations

import numpy as np

from ..backends import get_backend, to_f32
from ..backends.base import Backend
from .cache import LatentCache
from .rope import interleaved_to_halves

_EMPTY = np.zeros(0, np.float32)
#: epsilon of ``q_a_layernorm`` and ``kv_a_layernorm``: transformers builds them with the
#: RMSNorm default (``DeepseekV2RMSNorm(q_lora_rank)``), not ``rms_norm_eps``.
LATENT_NORM_EPS = 1e-6


class MLAttention:
    """Multi-head Latent Attention with a latent KV cache (see the module docstring).

    Args:
        args: an MLA family's :class:`~zipmoe_rt.families.HParams` (``num_attention_heads``,
            ``q_lora_rank``, ``kv_lora_rank``, ``qk_nope_head_dim``, ``qk_rope_head_dim``,
            ``v_head_dim``, ``rope_interleave``); :meth:`~.rope.softmax_scale` of its rope.
        layer: index.
        wkv_a: ``kv_a_proj_with_mqa`` [r + dr, H].  kv_a_norm: ``kv_a_layernorm`` [r].
        wkv_b: ``kv_b_proj`` [nh * (dn + dv), r].  wo: ``o_proj`` [H, nh * dv].
        wq: ``q_proj`` [nh * (dn + dr), H] (``q_lora_rank`` null), or None with
        wq_a: ``q_a_proj`` [q_lora_rank, H], q_a_norm [q_lora_rank], wq_b [nh * (dn + dr),
            q_lora_rank].
        bq_a, bkv_a, bo: optional biases (``attention_bias``).
        scale: the score scale (:func:`~.rope.softmax_scale`).
        backend: compute backend (default numba).
        Weights are BF16 bits (uint16), float16 or float32 ``[out, in]``.
    Raises:
        ValueError: a weight whose shape disagrees with ``args`` (named), neither / both of
            ``wq`` and ``wq_a``, or a backend without the ``heads_linear`` op.
    """

    def __init__(self, args, layer: int, wkv_a, kv_a_norm, wkv_b, wo, scale: float, wq=None,
                 wq_a=None, q_a_norm=None, wq_b=None, bq_a=None, bkv_a=None, bo=None,
                 backend=None):
        be = self.backend = get_backend(backend)
        if type(be).heads_linear is Backend.heads_linear:
            raise ValueError(f"backend {be.name!r} cannot run Multi-head Latent Attention "
                             f"(it has no heads_linear op)")
        self.layer = layer
        nh, r = args.num_attention_heads, args.kv_lora_rank
        dn, dr, dv = args.qk_nope_head_dim, args.qk_rope_head_dim, args.v_head_dim
        self.nh, self.r, self.dn, self.dr, self.dv = nh, r, dn, dr, dv
        self.scale = np.float32(scale)
        self.eps = np.float32(LATENT_NORM_EPS)
        if (wq is None) == (wq_a is None):
            raise ValueError(f"layer {layer}: give q_proj or q_a_proj/q_b_proj, not "
                             f"{'both' if wq is not None else 'neither'}")
        H = np.asarray(wkv_a).shape[1]
        qr = None if wq_a is None else np.asarray(wq_a).shape[0]
        want = {"kv_a_proj_with_mqa": ((r + dr, H), wkv_a), "kv_a_layernorm": ((r,), kv_a_norm),
                "kv_b_proj": ((nh * (dn + dv), r), wkv_b), "o_proj": ((H, nh * dv), wo)}
        if wq is not None:
            want["q_proj"] = ((nh * (dn + dr), H), wq)
        else:
            want.update(q_a_layernorm=((qr,), q_a_norm), q_b_proj=((nh * (dn + dr), qr), wq_b))
        for name, (shape, w) in want.items():
            if w is None or tuple(np.shape(w)) != shape:
                raise ValueError(f"layer {layer}: {name} has shape "
                                 f"{None if w is None else list(np.shape(w))}, expected "
                                 f"{list(shape)}")
        perm = interleaved_to_halves(dr) if args.rope_interleave else np.arange(dr)
        qw = np.asarray(wq if wq is not None else wq_b)
        qw = qw.reshape(nh, dn + dr, qw.shape[1])
        host = np.ascontiguousarray
        self.wq_nope = be.linear_weight(qw[:, :dn].reshape(nh * dn, -1))
        self.wq_pe = be.linear_weight(qw[:, dn:][:, perm].reshape(nh * dr, -1))
        self.wq_a = None if wq_a is None else be.linear_weight(wq_a)
        self.bq_a = None if bq_a is None else be.from_host(to_f32(bq_a))
        self.q_a_norm = None if q_a_norm is None else be.from_host(to_f32(q_a_norm))
        wkv_a = np.asarray(wkv_a)
        self.w_lat = be.linear_weight(wkv_a[:r])
        self.w_kpe = be.linear_weight(wkv_a[r:][perm])
        b = None if bkv_a is None else to_f32(bkv_a)
        self.b_lat = None if b is None else be.from_host(host(b[:r]))
        self.b_kpe = None if b is None else be.from_host(host(b[r:][perm]))
        self.kv_a_norm = be.from_host(to_f32(kv_a_norm))
        kvb = np.asarray(wkv_b).reshape(nh, dn + dv, r)
        if kvb.dtype == np.float16:     # heads_linear's fast paths are BF16 and F32
            kvb = kvb.astype(np.float32)
        # absorbed per-head matrices: W_k^T [nh, r, dn] (q_nope -> latent), W_v [nh, dv, r]
        self.w_kT = be.from_host(host(kvb[:, :dn].transpose(0, 2, 1)))
        self.w_v = be.from_host(host(kvb[:, dn:]))
        self.wo = be.linear_weight(wo)
        self.bo = None if bo is None else be.from_host(to_f32(bo))

    def new_cache(self, capacity: int = 256) -> LatentCache:
        """An empty :class:`~.cache.LatentCache` of ``kv_lora_rank + qk_rope_head_dim`` values
        per position, ``capacity`` positions before growing."""
        return LatentCache(self.r + self.dr, capacity, self.backend)

    def __call__(self, x, cache: LatentCache, pos0: int, cos, sin):
        """x float32 [T, H] at positions pos0.. -> float32 [T, H]; writes the latent and the
        rotated ``k_pe`` of each token into ``cache.kv[pos0 + t]`` (pending until the model
        commits; room reserved by :meth:`LatentCache.reserve`). cos, sin: float32 [T, dr / 2]
        backend arrays (the model's RoPE over ``qk_rope_head_dim``)."""
        be = self.backend
        T = x.shape[0]
        nh, r, dn, dr, dv = self.nh, self.r, self.dn, self.dr, self.dv
        qin = x
        if self.wq_a is not None:
            qin = be.rmsnorm(be.linear(x, self.wq_a, self.bq_a), self.q_a_norm, self.eps)
        q_nope = be.linear(qin, self.wq_nope)
        lat = be.rmsnorm(be.linear(x, self.w_lat, self.b_lat), self.kv_a_norm, self.eps)
        # RoPE on q_pe (nh heads) and k_pe (one head) with the shared op: [q heads | k | v]
        rot = be.empty((T, (nh + 2) * dr))
        rot[:, :nh * dr] = be.linear(qin, self.wq_pe)
        k_pe = be.linear(x, self.w_kpe, self.b_kpe)
        rot[:, nh * dr:(nh + 1) * dr] = k_pe
        rot[:, (nh + 1) * dr:] = k_pe
        k_rot, v_tmp = be.empty((1, T, dr)), be.empty((1, T, dr))
        be.rope_qk_cache(rot, nh, 1, dr, _EMPTY, _EMPTY, self.eps, cos, sin, k_rot, v_tmp, 0)
        kv = cache.kv
        kv[pos0:pos0 + T, :r] = lat
        kv[pos0:pos0 + T, r:] = k_rot[0]
        # one query of width r + dr per head: [W_k^T q_nope, rope(q_pe)]
        w = r + dr
        qa = be.empty((T, nh * w))
        qa3 = qa.reshape(T, nh, w)
        qn = be.from_host(q_nope.reshape(T, nh, dn).transpose(1, 0, 2))    # contiguous copy
        qa3[:, :, :r] = be.heads_linear(qn, self.w_kT).transpose(1, 0, 2)
        qa3[:, :, r:] = rot[:, :nh * dr].reshape(T, nh, dr)
        lat_out = be.empty((T, nh * w))
        cv = kv.reshape(1, kv.shape[0], w)
        be.attention(qa, nh, 1, w, cv, cv, pos0, 0, self.scale, lat_out)
        lo = be.from_host(lat_out.reshape(T, nh, w)[:, :, :r].transpose(1, 0, 2))
        att = be.from_host(be.heads_linear(lo, self.w_v).transpose(1, 0, 2))
        return be.linear(att.reshape(T, nh * dv), self.wo, self.bo)


def build_mla(model, i: int) -> MLAttention:
    """The :class:`MLAttention` of layer ``i`` of ``model`` (a
    :class:`~zipmoe_rt.models.model.Model` of an MLA family), its weights by the registry's
    logical keys: ``attn_q`` (``q_lora_rank`` 0 / null) or ``attn_q_a`` / ``attn_q_a_norm`` /
    ``attn_q_b``, ``attn_kv_a``, ``attn_kv_a_norm``, ``attn_kv_b``, ``attn_o``, and with
    ``attention_bias`` ``attn_q_a_bias``, ``attn_kv_a_bias``, ``attn_o_bias``.

    Raises:
        KeyError: a tensor the hyper-parameters imply is missing (named).
        ValueError: from :class:`MLAttention`.
    """
    from .rope import softmax_scale

    a, t = model.args, model.weight
    kw = {}
    if not a.q_lora_rank:
        kw["wq"] = t("attn_q", i)
    else:
        kw.update(wq_a=t("attn_q_a", i), q_a_norm=t("attn_q_a_norm", i), wq_b=t("attn_q_b", i))
    if a.attention_bias:
        kw.update(bkv_a=t("attn_kv_a_bias", i), bo=t("attn_o_bias", i))
        if a.q_lora_rank:
            kw["bq_a"] = t("attn_q_a_bias", i)
    scale = softmax_scale(a, a.qk_nope_head_dim + a.qk_rope_head_dim)
    return MLAttention(a, i, t("attn_kv_a", i), t("attn_kv_a_norm", i), t("attn_kv_b", i),
                       t("attn_o", i), scale, backend=model.backend, **kw)
