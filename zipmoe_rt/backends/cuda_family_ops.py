"""The CUDA backend's ops for single families (PhiMoE's LayerNorm and sparsemixer, MLA's
per-head products, Granite's scaling, Gemma 4's soft cap, ERNIE's choice-biased router,
Qwen3-Next's linear attention, LFM2's gates, gpt-oss's sinks and clamped experts), as a mixin of
:class:`~zipmoe_rt.backends.cupy_cuda.CupyBackend`: each op as the contract in
:mod:`zipmoe_rt.backends.base` documents it, in plain CuPy array code, through the backend's own
kernels, or on the host with the NumPy reference where the decision goes to the host anyway.

Imported by :mod:`zipmoe_rt.backends.cupy_cuda` only (it imports CuPy).
"""
from __future__ import annotations

import numpy as np

import cupy as cp

from . import cuda_gpt_oss
from . import linear_attn as _lin
from .checks import check_cap, check_choice_bias
from .numpy_ref import NumpyBackend

__all__ = ["CudaFamilyOps"]

_F32 = np.float32
_NP = NumpyBackend()                 # host routing of the routers without a kernel here


class CudaFamilyOps(_lin.LinearAttnOps):
    """Family-specific ops of the CUDA backend (mixed into ``CupyBackend``); Qwen3-Next's from
    :class:`~zipmoe_rt.backends.linear_attn.LinearAttnOps` over CuPy."""

    XP = cp

    # -- PhiMoE --------------------------------------------------------------------------------

    def layer_norm(self, x, w, b, eps, out=None):
        """``(x - mean) / sqrt(var + eps) * w + b`` per row with the biased variance (CuPy
        float32 reductions and elementwise ops, as ``nn.LayerNorm``)."""
        mean = cp.mean(x, axis=-1, keepdims=True, dtype=cp.float32)
        d = x - mean
        var = cp.mean(d * d, axis=-1, keepdims=True, dtype=cp.float32)
        y = d / cp.sqrt(var + _F32(eps)) * w + b
        if out is None:
            return y.astype(cp.float32, copy=False)
        out[...] = y
        return out

    def route_sparsemixer(self, logits, jitter_eps):
        """The [T, E] logits copied to the host and routed by :meth:`NumpyBackend.route_sparsemixer
        <zipmoe_rt.backends.numpy_ref.NumpyBackend.route_sparsemixer>` (ValueError for fewer
        than 2 experts)."""
        return _NP.route_sparsemixer(self.to_host(logits), jitter_eps)

    # -- Multi-head Latent Attention -------------------------------------------------------------

    def heads_linear(self, x, W, out=None):
        """``out[h] = x[h] @ W[h].T`` for each head with :meth:`linear` (GEMV kernel or
        cuBLAS). Raises ValueError when the shapes disagree, TypeError for another weight
        dtype."""
        if x.ndim != 3 or W.ndim != 3 or x.shape[0] != W.shape[0] or x.shape[2] != W.shape[2]:
            raise ValueError(f"heads_linear: x {tuple(x.shape)} and W {tuple(W.shape)} disagree "
                             f"(expected [nh, T, in] and [nh, out, in])")
        nh, T = x.shape[:2]
        if out is None:
            out = cp.empty((nh, T, W.shape[1]), cp.float32)
        elif tuple(out.shape) != (nh, T, W.shape[1]):
            raise ValueError(f"heads_linear: out {tuple(out.shape)}, expected "
                             f"{(nh, T, W.shape[1])}")
        for h in range(nh):
            out[h] = self.linear(x[h], W[h])
        return out

    # -- Granite-MoE ---------------------------------------------------------------------------

    def scale_(self, x, s, divide=False):
        """``x *= s`` or ``x /= s`` (CuPy elementwise, float32)."""
        if divide:
            x /= _F32(s)
        else:
            x *= _F32(s)
        return x

    # -- Gemma 4 -------------------------------------------------------------------------------

    def softcap_(self, x, cap):
        """``x = tanh(x / cap) * cap`` (CuPy elementwise, float32)."""
        c = check_cap(cap)
        x /= c
        cp.tanh(x, out=x)
        x *= c
        return x

    # -- ERNIE 4.5 MoE -------------------------------------------------------------------------

    def route_choice_bias(self, logits, k, bias, norm_min):
        """On the host with the NumPy reference (:class:`~zipmoe_rt.backends.numpy_ref.NumpyBackend`):
        the [T, E] logits are copied over, as the decisions go to the host anyway."""
        check_choice_bias(bias, logits.shape[1])
        return _NP.route_choice_bias(self.to_host(logits), k, self.to_host(bias), norm_min)

    # LFM2-MoE
    def mul(self, a, b):
        """``a * b`` (CuPy float32 elementwise, as torch)."""
        return cp.ascontiguousarray(a * b, dtype=cp.float32)


    # -- gpt-oss: attention sinks, the biased experts' clamped SwiGLU (cuda_gpt_oss) --------

    def attention_sinks(self, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out):
        """:func:`~zipmoe_rt.backends.cuda_gpt_oss.attention_sinks`."""
        return cuda_gpt_oss.attention_sinks(self, qkv, nq, nkv, hd, kc, vc, pos0, window, scale,
                                            sinks, out)

    def _clamped_expert(self, x, e, glu):
        """:func:`~zipmoe_rt.backends.cuda_gpt_oss.clamped_expert`: float32 [T, H]."""
        return cuda_gpt_oss.clamped_expert(self, x, e, glu)
