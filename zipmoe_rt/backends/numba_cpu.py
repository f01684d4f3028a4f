"""The default backend: numpy arrays on the host and the Numba CPU kernels of
:mod:`zipmoe_rt.kernels` (BF16 weights read in place, float32 accumulation).

Each op calls the kernel the model called directly before the backend seam existed, with the
same arguments, so outputs are bit-identical to that code path. See :class:`Backend
<zipmoe_rt.backends.base.Backend>` for the contract of every op.
"""
from __future__ import annotations

import numpy as np

from ..kernels import attention as _att
from ..kernels import gated_delta as _gdn
from ..kernels import heads as _heads
from ..kernels import norm as _norm
from ..kernels import routing as _routing
from ..kernels import sparsemixer as _sparsemixer
from ..kernels import packed as _packed
from ..kernels import swiglu as _swiglu
from ..kernels import clamped_swiglu as _clamped
from ..kernels import sinks as _sinks
from ..kernels.embed import bf16_rows
from ..kernels.linear import linear_into
from ..models.packed import PackedMatrix, as_weights, is_packed
from .base import (Backend, HostArrays, check_act, check_biased_expert, check_cap,
                   check_choice_bias, check_gated_delta, check_qk_norm, check_route, check_sinks,
                   to_f32)


#: row index 0, the one row of a token
_ROW0 = np.zeros(1, np.int64)

#: the Numba backends of other dense forms (:meth:`NumbaBackend.with_dense_form`)
_BY_FORM: dict = {}


class NumbaBackend(HostArrays, Backend):
    """Numba CPU kernels over numpy arrays (``get_backend("numba")``, the default).

    Parallel kernels run on Numba's threading layer and must be called from one thread (the
    model's); see :mod:`zipmoe_rt.kernels` for the OpenMP wait policy.
    """

    name = "numba"
    #: the form :meth:`linear_weight` holds dense weights in (:meth:`with_dense_form`)
    dense_form = "bf16"

    def with_dense_form(self, form):
        """A Numba backend whose :meth:`linear_weight` holds BF16 dense weights in ``form``
        (``"compressed"``: the compute form, design note §6.5; one shared instance per form).

        Raises:
            ValueError: ``form`` neither ``"bf16"`` nor ``"compressed"``.
        """
        Backend.with_dense_form(self, form)
        if form == self.dense_form:
            return self
        if form == "bf16":
            from . import get_backend
            return get_backend(self.name)
        be = _BY_FORM.get(form)
        if be is None:
            be = _BY_FORM[form] = type(self)()
            be.dense_form = form
        return be

    def linear_weight(self, a):
        """``a`` as it is (C-contiguous); with the dense form ``"compressed"`` a 2-D BF16 weight
        becomes a :class:`~zipmoe_rt.models.packed.PackedMatrix` that :meth:`linear`,
        :meth:`swiglu` and :meth:`embed` compute from, bit-identical."""
        a = np.ascontiguousarray(a)
        if self.dense_form == "compressed" and a.dtype == np.uint16 and a.ndim == 2 and a.size:
            from ..engine.resident import pack_bf16
            return pack_bf16(a)
        return a

    def embed(self, W, ids):
        """:func:`~zipmoe_rt.kernels.embed.bf16_rows`; a packed table (a tied head in the
        compute form) through :func:`~zipmoe_rt.kernels.packed.packed_rows`."""
        if isinstance(W, PackedMatrix):
            return _packed.packed_rows(W, ids)
        return bf16_rows(W, ids)

    def linear(self, x, W, bias=None, out=None):
        """:func:`~zipmoe_rt.kernels.linear.linear_into` (GEMV for one token, blocked GEMM else);
        a packed weight through :func:`~zipmoe_rt.kernels.packed.packed_linear_into` (the same
        kernels on its decoded rows, bit-identical)."""
        if out is None:
            out = np.empty((x.shape[0], W.shape[0]), np.float32)
        if isinstance(W, PackedMatrix):
            if x.shape[1] != W.shape[1]:
                raise ValueError(f"linear: x {x.shape} does not match W {W.shape} ([out, in])")
            if x.shape[0]:
                _packed.packed_linear_into(np.ascontiguousarray(x, dtype=np.float32), W, out,
                                           bias=bias)
            return out
        return linear_into(x, W, out, bias)

    def heads_linear(self, x, W, out=None):
        """:func:`~zipmoe_rt.kernels.heads.heads_linear`."""
        return _heads.heads_linear(x, W, out)

    def swiglu(self, x, gate, up, act="silu"):
        """:func:`~zipmoe_rt.kernels.swiglu.swiglu_hidden` (fused gate/up for BF16)."""
        if isinstance(gate, PackedMatrix) and isinstance(up, PackedMatrix):
            return _packed.packed_swiglu_hidden(np.ascontiguousarray(x, dtype=np.float32),
                                                gate, up, check_act(act))
        return _swiglu.swiglu_hidden(x, gate, up, check_act(act))

    def expert_accumulate(self, out, x, rows, weights, expert, act="silu", glu=None):
        """:func:`~zipmoe_rt.kernels.swiglu.expert_accumulate`; a packed expert (compute form,
        :mod:`zipmoe_rt.models.packed`) through
        :func:`~zipmoe_rt.kernels.packed.packed_expert_accumulate`, bit-identical (SiLU; with
        another activation the packed expert is decoded first). With ``glu`` (gpt-oss):
        :meth:`_clamped_accumulate`."""
        if glu is not None:
            self._clamped_accumulate(out, x, rows, weights, expert, glu)
            return
        a = check_act(act)
        if is_packed(expert):
            if a == 0:
                _packed.packed_expert_accumulate(out, x, rows, weights, expert)
                return
            expert = as_weights(expert)
        _swiglu.expert_accumulate(out, x, rows, weights, expert.gate, expert.up, expert.down, a)

    def experts_token(self, out, x, experts, weights, act="silu", glu=None):
        """:func:`~zipmoe_rt.kernels.swiglu.experts_decode` (k experts, two parallel regions);
        any packed expert through :func:`~zipmoe_rt.kernels.packed.packed_experts_decode`, which
        computes a mix of packed and BF16 experts in the same kernels (bit-identical; with an
        activation other than SiLU the packed ones are decoded first). With ``glu`` (gpt-oss):
        :meth:`_clamped_accumulate` of each expert in order on the row."""
        if glu is not None:
            x2, o2 = np.ascontiguousarray(x.reshape(1, -1)), out.reshape(1, -1)
            for w, e in zip(np.asarray(weights, np.float32), experts):
                self._clamped_accumulate(o2, x2, _ROW0, np.full(1, w, np.float32), e, glu)
            return
        a = check_act(act)
        if any(map(is_packed, experts)):
            if a == 0:
                _packed.packed_experts_decode(out, x, experts, weights)
                return
            experts = [as_weights(e) for e in experts]
        _swiglu.experts_decode(out, x, experts, weights, a)

    def rmsnorm(self, x, w, eps, out=None):
        """:func:`~zipmoe_rt.kernels.norm.rms_norm_into`."""
        if out is None:
            out = np.empty_like(x)
        return _norm.rms_norm_into(x, w, eps, out)

    def add_(self, a, b):
        """:func:`~zipmoe_rt.kernels.norm.add_inplace`."""
        return _norm.add_inplace(a, b)

    def sigmoid_gate_add_(self, y, g, s):
        """NumPy float32 expression (as the model computed it before the seam)."""
        y += (np.float32(1.0) / (np.float32(1.0) + np.exp(-g))) * s
        return y

    def rope_qk_cache(self, qkv, nq, nkv, hd, q_norm, k_norm, eps, cos, sin, kc, vc, pos0,
                      clip=None):
        """:func:`~zipmoe_rt.kernels.attention.rope_qk_cache` (per-head norms without ``clip``:
        the one-pass kernel; whole-projection norms or ``clip``: the grouped one)."""
        check_qk_norm(q_norm.size, k_norm.size, nq, nkv, hd, clip, cos.shape[1])
        _att.rope_qk_cache(qkv, nq, nkv, hd, q_norm, k_norm, eps, cos, sin, kc, vc, pos0, clip)

    def attention(self, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, out):
        """:func:`~zipmoe_rt.kernels.attention.attention` (parallel over (token, head) if large)."""
        return _att.attention(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, out)

    def route(self, logits, k, renorm, scoring="softmax", method="greedy", n_group=1,
              topk_group=1, bias=None, scale=1.0):
        """:func:`~zipmoe_rt.kernels.routing.route` for softmax top-k without bias or scale
        (the kernel every family before the DeepSeek / GLM lineage ran), else
        :func:`~zipmoe_rt.kernels.routing.route_grouped`."""
        check_route(logits.shape[1], k, scoring, method, n_group, topk_group, bias, scale)
        if scoring == "softmax" and method == "greedy" and bias is None and scale == 1.0:
            return _routing.route(logits, k, renorm)
        return _routing.route_grouped(logits, k, renorm, scoring, method, n_group, topk_group,
                                      bias, scale)

    # -- PhiMoE ----------------------------------------------------------------------------------

    def layer_norm(self, x, w, b, eps, out=None):
        """:func:`~zipmoe_rt.kernels.norm.layer_norm_into`."""
        if out is None:
            out = np.empty_like(x)
        return _norm.layer_norm_into(x, w, b, eps, out)

    def route_sparsemixer(self, logits, jitter_eps):
        """:func:`~zipmoe_rt.kernels.sparsemixer.sparsemixer_top2`."""
        return _sparsemixer.sparsemixer_top2(logits, jitter_eps)

    # Granite-MoE
    def scale_(self, x, s, divide=False):
        """NumPy float32 in-place expression (one rounding per element, as torch)."""
        if divide:
            x /= np.float32(s)
        else:
            x *= np.float32(s)
        return x

    # ERNIE 4.5 MoE
    def route_choice_bias(self, logits, k, bias, norm_min):
        """:func:`~zipmoe_rt.kernels.routing.route_choice_bias`."""
        check_choice_bias(bias, logits.shape[1])
        return _routing.route_choice_bias(logits, k, bias, norm_min)

    # Qwen3-Next / Qwen3.5-MoE
    def sigmoid_mul_(self, x, g):
        """NumPy float32 in-place expression (``x * sigmoid(g)``, as torch)."""
        x *= np.float32(1.0) / (np.float32(1.0) + np.exp(-g))
        return x

    def conv1d_silu(self, x, w, state, new_state, silu=True, bias=None):
        """:func:`~zipmoe_rt.kernels.gated_delta.conv1d_silu`."""
        return _gdn.conv1d_silu(x, w, state, new_state, silu, bias)

    def gated_delta_rule(self, qkv, ba, A_log, dt_bias, nk, nv, dk, dv, state, new_state):
        """:func:`~zipmoe_rt.kernels.gated_delta.gated_delta_rule` (parallel over value heads)."""
        check_gated_delta(qkv, ba, state, nk, nv, dk, dv)
        return _gdn.gated_delta_rule(qkv, ba, A_log, dt_bias, nk, nv, dk, dv, state, new_state)

    def rmsnorm_gated(self, x, w, z, eps, out=None):
        """:func:`~zipmoe_rt.kernels.gated_delta.rmsnorm_gated`."""
        return _gdn.rmsnorm_gated(x, w, z, eps, out)
    # Gemma 4
    def softcap_(self, x, cap):
        """NumPy float32 in-place expression: ``x /= cap``, ``tanh``, ``x *= cap``."""
        c = check_cap(cap)
        x /= c
        np.tanh(x, out=x)
        x *= c
        return x
    # gpt-oss
    def attention_sinks(self, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out):
        """:func:`~zipmoe_rt.kernels.sinks.attention_sinks`."""
        check_sinks(sinks, nq)
        return _sinks.attention_sinks(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, sinks, out)

    def _clamped_expert(self, x, e, glu):
        """``down(glu(gate(x) + bg, up(x) + bu)) + bd`` of one expert, float32 [n, H]."""
        g = self.linear(x, e.gate, to_f32(e.gate_bias))
        u = self.linear(x, e.up, to_f32(e.up_bias))
        return self.linear(_clamped.clamped_swiglu(g, u, glu.alpha, glu.limit), e.down,
                           to_f32(e.down_bias))

    def _clamped_accumulate(self, out, x, rows, weights, expert, glu):
        """gpt-oss's biased expert with the clamped SwiGLU: the rows through :meth:`linear`
        (biases in the kernels), :func:`~zipmoe_rt.kernels.clamped_swiglu.clamped_swiglu` and
        :func:`~zipmoe_rt.kernels.clamped_swiglu.scatter_add_weighted`."""
        check_biased_expert("expert_accumulate", x.shape[1], expert)
        xs = np.ascontiguousarray(x[rows])
        _clamped.scatter_add_weighted(out, rows, weights, self._clamped_expert(xs, expert, glu))

    # LFM2-MoE
    def mul(self, a, b):
        """``a * b`` (NumPy float32 elementwise, as torch)."""
        return np.ascontiguousarray(a * b, dtype=np.float32)
