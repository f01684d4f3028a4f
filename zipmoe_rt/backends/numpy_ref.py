"""A plain-NumPy float32 reference backend: every op written as the transformers modeling code
reads (matrix products, softmax over a masked score matrix), no Numba, no fused kernels.

Slow (weights are widened to float32 on every use) but short and readable; it exists to check
the fast backends and to serve as the template for a new one. Results match the Numba backend up
to float32 summation order (``tests/test_backends.py``: logits within 1e-4, same greedy tokens).
See :class:`Backend <zipmoe_rt.backends.base.Backend>` for the contract of every op.
"""
from __future__ import annotations

import numpy as np

from ..models.packed import as_weights
from . import linear_attn as _lin
from .base import (Backend, HostArrays, check_act, check_biased_expert, check_cap,
                   check_choice_bias, check_qk_norm, check_route, check_sinks,
                   to_f32)

_F32 = np.float32


def _silu(g: np.ndarray) -> np.ndarray:
    """``g * sigmoid(g)`` as ``nn.SiLU``, float32."""
    return g / (_F32(1.0) + np.exp(-g))


def _act(g: np.ndarray, act: str) -> np.ndarray:
    """The gate activation ``act``: SiLU, or GELU-tanh as ``nn.GELU(approximate="tanh")``
    (``0.5 g (1 + tanh(sqrt(2/pi) (g + 0.044715 g^3)))``), float32."""
    if check_act(act) == 1:
        inner = _F32(0.7978845608028654) * (g + _F32(0.044715) * (g * g * g))
        return (_F32(0.5) * g * (_F32(1.0) + np.tanh(inner))).astype(np.float32)
    return _silu(g)


def _rms(v: np.ndarray, w: np.ndarray, eps) -> np.ndarray:
    """RMSNorm over the last axis of ``v`` (``MixtralRMSNorm``), float32."""
    var = np.mean(v * v, axis=-1, keepdims=True, dtype=np.float32)
    return w * (v / np.sqrt(var + _F32(eps)))


def _rotate_half(v: np.ndarray) -> np.ndarray:
    """``cat(-v[..., d/2:], v[..., :d/2])`` (transformers' ``rotate_half``)."""
    half = v.shape[-1] // 2
    return np.concatenate([-v[..., half:], v[..., :half]], axis=-1)


def _query_heads(qkv, nq: int, nkv: int, hd: int, kc, vc, pos0: int, window: int):
    """The mask [T, pos0 + T] of the positions each query of ``qkv`` may see (itself and
    earlier ones, the last ``window`` when ``window`` > 0) and, per query head ``h``,
    ``(h, its queries [T, hd], the keys and the values [pos0 + T, hd] of its KV head)``."""
    T = qkv.shape[0]
    n = pos0 + T
    q = qkv[:, :nq * hd].reshape(T, nq, hd)
    qpos = np.arange(pos0, n)[:, None]
    kpos = np.arange(n)[None, :]
    visible = kpos <= qpos
    if window > 0:
        visible &= kpos > qpos - window
    group = nq // nkv
    return visible, [(h, q[:, h], kc[h // group, :n], vc[h // group, :n]) for h in range(nq)]


class NumpyBackend(_lin.LinearAttnOps, HostArrays, Backend):
    """Reference ops in NumPy float32 (``get_backend("numpy")``)."""

    name = "numpy"

    def embed(self, W, ids):
        """``W[ids]`` widened to float32."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= W.shape[0]):
            raise IndexError(f"token id out of range [0, {W.shape[0]})")
        return to_f32(W[ids])

    def linear(self, x, W, bias=None, out=None):
        """``x @ W.T + bias`` with the weight widened to float32."""
        if W.dtype not in (np.uint16, np.float16, np.float32):
            raise TypeError(f"weight dtype {W.dtype} is not supported")
        y = x @ to_f32(W).T
        if bias is not None:
            y = y + bias
        if out is None:
            return np.ascontiguousarray(y, np.float32)
        out[...] = y
        return out

    def heads_linear(self, x, W, out=None):
        """``x @ W.transpose(0, 2, 1)`` per head with the weights widened to float32."""
        if W.dtype not in (np.uint16, np.float16, np.float32):
            raise TypeError(f"weight dtype {W.dtype} is not supported")
        if W.ndim != 3 or W.shape[0] != x.shape[0] or W.shape[2] != x.shape[2]:
            raise ValueError(f"heads_linear: x {x.shape} and W {W.shape} disagree")
        y = np.matmul(x, to_f32(W).transpose(0, 2, 1))
        if out is None:
            return np.ascontiguousarray(y, np.float32)
        out[...] = y
        return out

    def swiglu(self, x, gate, up, act="silu"):
        """``act(x @ gate.T) * (x @ up.T)`` (SiLU by default)."""
        return _act(self.linear(x, gate), act) * self.linear(x, up)

    def _expert(self, x, e, act="silu"):
        """``down(act(gate(x)) * up(x))`` of one expert, float32 [T, H]."""
        return self.linear(self.swiglu(x, e.gate, e.up, act), e.down)

    def expert_accumulate(self, out, x, rows, weights, expert, act="silu", glu=None):
        """``out[rows] += weights[:, None] * expert(x[rows])`` (a packed expert is decoded
        first, :func:`~zipmoe_rt.models.packed.as_weights`); with ``glu``, gpt-oss's
        ``out[rows] += expert(x[rows]) * weights[:, None]``."""
        if glu is not None:
            check_biased_expert("expert_accumulate", x.shape[1], expert)
            out[rows] += self._clamped_expert(x[rows], expert, glu) * np.asarray(
                weights, np.float32)[:, None]
            return
        expert = as_weights(expert)
        if expert.down.shape != expert.gate.shape[::-1] or x.shape[1] != expert.gate.shape[1]:
            raise ValueError(f"expert_accumulate: x {x.shape}, gate {expert.gate.shape}, "
                             f"down {expert.down.shape} disagree")
        out[rows] += np.asarray(weights, np.float32)[:, None] * self._expert(x[rows], expert,
                                                                             act)

    def experts_token(self, out, x, experts, weights, act="silu", glu=None):
        """One :meth:`expert_accumulate`-like sum per expert, in order."""
        if glu is not None:
            for w, e in zip(np.asarray(weights, np.float32), experts):
                check_biased_expert("experts_token", x.shape[-1], e)
                out += self._clamped_expert(x[None, :], e, glu)[0] * w
            return
        for w, e in zip(np.asarray(weights, np.float32), experts):
            out += w * self._expert(x[None, :], as_weights(e), act)[0]

    def rmsnorm(self, x, w, eps, out=None):
        """``w * x / sqrt(mean(x**2) + eps)``."""
        y = _rms(x, w, eps)
        if out is None:
            return y.astype(np.float32)
        out[...] = y
        return out

    def add_(self, a, b):
        """``a += b``."""
        a += b
        return a

    def sigmoid_gate_add_(self, y, g, s):
        """``y += sigmoid(g) * s``."""
        y += (_F32(1.0) / (_F32(1.0) + np.exp(-g))) * s
        return y

    def rope_qk_cache(self, qkv, nq, nkv, hd, q_norm, k_norm, eps, cos, sin, kc, vc, pos0,
                      clip=None):
        """RMSNorm over rows of ``w.size`` (a head, or the whole q / k projection), ``np.clip``
        of q, k, v, then per head ``x * cos + rotate_half(x) * sin`` on the first ``rot`` dimensions
        (the tables' width; the rest pass, as ``apply_rotary_pos_emb`` of GLM-4-MoE), cache
        slices."""
        check_qk_norm(q_norm.size, k_norm.size, nq, nkv, hd, clip, cos.shape[1])
        T = qkv.shape[0]
        q = qkv[:, :nq * hd].reshape(T, nq, hd)                 # views into qkv
        k = qkv[:, nq * hd:(nq + nkv) * hd].reshape(T, nkv, hd)
        v = qkv[:, (nq + nkv) * hd:].reshape(T, nkv, hd)
        for heads, w in ((q, q_norm), (k, k_norm)):
            if w.size:              # rows of w.size: [T, heads, hd] or [T, 1, heads * hd]
                heads[...] = _rms(heads.reshape(T, -1, w.size), w, eps).reshape(heads.shape)
        if clip is not None:
            np.clip(qkv, -_F32(clip), _F32(clip), out=qkv)
        c = np.concatenate([cos, cos], axis=-1)[:, None, :]    # [T, 1, rot]
        s = np.concatenate([sin, sin], axis=-1)[:, None, :]
        rot = c.shape[-1]                                       # partial rotary: rot < hd
        for heads in (q, k):
            r = heads[..., :rot]
            r[...] = r * c + _rotate_half(r) * s
        kc[:, pos0:pos0 + T] = k.transpose(1, 0, 2)
        vc[:, pos0:pos0 + T] = v.transpose(1, 0, 2)

    def attention(self, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, out):
        """Per query head: masked score matrix, softmax, times the values."""
        visible, heads = _query_heads(qkv, nq, nkv, hd, kc, vc, pos0, window)
        for h, qh, K, V in heads:
            scores = (qh @ K.T) * _F32(scale)
            scores = np.where(visible, scores, -np.inf)
            p = np.exp(scores - scores.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
            out[:, h * hd:(h + 1) * hd] = p.astype(np.float32) @ V
        return out

    def route(self, logits, k, renorm, scoring="softmax", method="greedy", n_group=1,
              topk_group=1, bias=None, scale=1.0):
        """As ``DeepseekV3TopkRouter.forward`` reads: scores, choice scores (+ bias), group
        scores (max, or sum of the top two), the kept groups, a stable descending argsort of the
        masked choice scores, the first k, their scores (renormalised, scaled)."""
        logits = np.asarray(logits, np.float32)
        T, E = logits.shape
        check_route(E, k, scoring, method, n_group, topk_group, bias, scale)
        if scoring == "sigmoid":
            p = _F32(1.0) / (_F32(1.0) + np.exp(-logits))
        else:
            p = np.exp(logits - logits.max(axis=-1, keepdims=True))
            p /= p.sum(axis=-1, keepdims=True)
        choice = p if bias is None else p + np.asarray(bias, np.float32)
        if method != "greedy" and n_group > 1:
            grouped = np.sort(choice.reshape(T, n_group, E // n_group), axis=-1)
            gs = grouped[..., -1] if method == "group_limited_greedy" else (
                grouped[..., -1] + grouped[..., -2])
            kept = np.argsort(-gs, axis=-1, kind="stable")[:, :topk_group]
            mask = np.zeros((T, n_group), bool)
            np.put_along_axis(mask, kept, True, axis=-1)
            choice = np.where(np.repeat(mask, E // n_group, axis=-1), choice, -np.inf)
        idx = np.argsort(-choice, axis=-1, kind="stable")[:, :k].astype(np.int64)
        w = np.take_along_axis(p, idx, axis=-1).astype(np.float32)
        if renorm:
            eps = _F32(1e-20 if scoring == "sigmoid" else 0.0)
            w /= w.sum(axis=-1, keepdims=True) + eps
        if scale != 1.0:
            w *= _F32(scale)
        return idx, w

    # -- PhiMoE ----------------------------------------------------------------------------------

    def layer_norm(self, x, w, b, eps, out=None):
        """``(x - mean) / sqrt(var + eps) * w + b`` (``nn.LayerNorm``, biased variance)."""
        mean = np.mean(x, axis=-1, keepdims=True, dtype=np.float32)
        var = np.mean((x - mean) ** 2, axis=-1, keepdims=True, dtype=np.float32)
        y = (x - mean) / np.sqrt(var + _F32(eps)) * w + b
        if out is None:
            return y.astype(np.float32)
        out[...] = y
        return out

    def route_sparsemixer(self, logits, jitter_eps):
        """``sparsemixer`` at eval, as ``modeling_phimoe.py`` reads: mask, masked softmax,
        gather; the first expert set to -inf; again."""
        s = np.asarray(logits, np.float32)
        if s.ndim != 2 or s.shape[1] < 2:
            raise ValueError(f"sparsemixer routing needs at least 2 experts, got {s.shape}")
        thr = _F32(2.0 * jitter_eps)
        rows = np.arange(s.shape[0])
        scores, idx, w = s, [], []
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            for _ in range(2):
                best = np.argmax(scores, axis=-1)
                m = scores[rows, best][:, None]
                mask = ((m - s) / np.maximum(np.abs(s), m)) > thr
                gates = np.where(mask, -np.inf, scores)
                p = np.exp(gates - m)
                p /= p.sum(axis=-1, keepdims=True)
                idx.append(best)
                w.append(p[rows, best])
                scores = scores.copy()
                scores[rows, best] = -np.inf
        return (np.stack(idx, axis=1).astype(np.int64),
                np.stack(w, axis=1).astype(np.float32))

    # Granite-MoE
    def scale_(self, x, s, divide=False):
        """``x *= s`` or ``x /= s`` in float32."""
        if divide:
            x /= _F32(s)
        else:
            x *= _F32(s)
        return x

    # ERNIE 4.5 MoE
    def route_choice_bias(self, logits, k, bias, norm_min):
        """Softmax, stable descending argsort of ``p + bias``, the first k of ``p``, divided by
        the clamped sum."""
        logits = np.asarray(logits, np.float32)
        bias = np.asarray(bias, np.float32).reshape(-1)
        check_choice_bias(bias, logits.shape[1])
        p = np.exp(logits - logits.max(axis=-1, keepdims=True))
        p /= p.sum(axis=-1, keepdims=True)
        idx = np.argsort(-(p + bias), axis=-1, kind="stable")[:, :k].astype(np.int64)
        w = np.take_along_axis(p, idx, axis=-1).astype(np.float32)
        w /= np.maximum(w.sum(axis=-1, keepdims=True), _F32(norm_min))
        return idx, w

    # Gemma 4
    def softcap_(self, x, cap):
        """``x = tanh(x / cap) * cap`` (``Gemma4ForCausalLM.forward``)."""
        c = check_cap(cap)
        x[...] = np.tanh(x / c) * c
        return x

    # gpt-oss
    def attention_sinks(self, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out):
        """Per query head: masked scores with the sink as one more column, a softmax over
        both after subtracting the row maximum, the sink's column dropped, times the values."""
        check_sinks(sinks, nq)
        T = qkv.shape[0]
        visible, heads = _query_heads(qkv, nq, nkv, hd, kc, vc, pos0, window)
        for h, qh, K, V in heads:
            scores = np.where(visible, (qh @ K.T) * _F32(scale), -np.inf)
            combined = np.concatenate([scores, np.full((T, 1), sinks[h], np.float32)], axis=-1)
            combined = combined - combined.max(axis=-1, keepdims=True)
            p = np.exp(combined)
            p /= p.sum(axis=-1, keepdims=True)
            out[:, h * hd:(h + 1) * hd] = p[:, :-1].astype(np.float32) @ V
        return out

    def _clamped_expert(self, x, e, glu):
        """``GptOssExperts`` for one expert: gate/up with biases, ``_apply_gate``, down with
        its bias, float32 [T, H]."""
        g = np.minimum(self.linear(x, e.gate, to_f32(e.gate_bias)), _F32(glu.limit))
        u = np.clip(self.linear(x, e.up, to_f32(e.up_bias)), -_F32(glu.limit), _F32(glu.limit))
        h = (u + _F32(1.0)) * (g * (_F32(1.0) / (_F32(1.0) + np.exp(-(g * _F32(glu.alpha))))))
        return self.linear(h.astype(np.float32), e.down, to_f32(e.down_bias))

    # LFM2-MoE
    def mul(self, a, b):
        """``a * b`` (NumPy float32 elementwise, as torch)."""
        return np.ascontiguousarray(a * b, dtype=np.float32)
