"""The CUDA backend: CuPy device arrays and the RawKernels of :mod:`zipmoe_rt.kernels.cuda_src`
(BF16 weights held as ``uint16`` bit patterns on the GPU, float32 accumulation).

Imported only when ``get_backend("cuda")`` (``--device cuda`` / ``auto``) asks for it: this
module and its helper :mod:`~zipmoe_rt.backends.cuda_planes` are the only ones of the package
that import CuPy, so a CPU-only install never does.

Where each op runs:

* one to :data:`GEMV_MAX_T` - 1 tokens (decode): a warp-per-row BF16 GEMV kernel (fused gate/up
  for SwiGLU; one token's k experts in two launches, :data:`FUSED_EXPERTS`), the weights read in
  place;
* more tokens (prefill): the BF16 weight is widened to float32 on the GPU, :data:`WIDEN_BYTES`
  at a time, and multiplied with cuBLAS (``cupy.matmul``, FP32, no TF32);
* RMSNorm, q/k norms, RoPE (full or partial rotary) + KV-cache write, causal GQA attention
  (online softmax, head sizes up to :data:`ATT_MAX_HD`, MLA's latent queries included) and
  softmax top-k routing: kernels of their own; routing results go to the host (the executor
  decides there which experts to fetch);
* the other routers (sigmoid / grouped / biased / scaled :meth:`CupyBackend.route`, PhiMoE's
  sparsemixer, ERNIE's choice bias): the [T, E] logits are copied to the host and routed by
  the NumPy reference backend (the decisions go to the host anyway);
* LayerNorm, :meth:`CupyBackend.scale_` and the per-head products of MLA
  (:meth:`CupyBackend.heads_linear`): CuPy array code and the linear path above;
* float16 / float32 weights: widened with CuPy and multiplied with cuBLAS;
* bit planes: the plane merge and the Huffman exponent decoder of
  :mod:`~zipmoe_rt.backends.cuda_planes` (:meth:`CupyBackend.merge_planes`,
  :meth:`CupyBackend.decode_exponents`, :meth:`CupyBackend.decode_merge`).

Expert weights handed over as host arrays (the budgeted engine's decoded experts) are uploaded
on every use; :meth:`CupyBackend.resident_experts` wraps a weight source so that each expert is
uploaded once and stays on the GPU (unbudgeted runs). See :class:`Backend
<zipmoe_rt.backends.base.Backend>` for the contract of every op.
"""
from __future__ import annotations

import numpy as np

import cupy as cp

from ..kernels import cuda_src
from . import cuda_packed, cuda_planes
from .cuda_reads import HostReads
from .cuda_uploads import HostUploads
from .base import Backend, check_act, check_biased_expert, check_qk_norm, check_route
from .cuda_family_ops import CudaFamilyOps
from .numpy_ref import NumpyBackend

#: token counts from this on go through widened weights and cuBLAS instead of the GEMV kernel
GEMV_MAX_T = 8
#: bytes of float32 weight rows widened at a time on the cuBLAS path
WIDEN_BYTES = 64 << 20
#: one token's k BF16 experts in two launches (gate/up of all, then the down projections
#: summed in registers) instead of two per expert
FUSED_EXPERTS = True
#: the widest head the attention kernel takes (ATT_MAXE = 20 elements per lane of a warp)
ATT_MAX_HD = 640
_ROWS_PER_BLOCK = 8          # warps (output rows) per block of the GEMV kernels
_F32 = np.float32
_NP = NumpyBackend()                 # host routing of the routers without a kernel here


def _unpacked(be, e):
    """A packed expert (``--resident compressed``, or a compressed GPU tier) decoded to device
    BF16 :class:`~zipmoe_rt.models.weights.ExpertWeights` for the activations the packed
    kernels do not compute (GELU-tanh); anything else as it is."""
    if cuda_packed.is_packed_any(e):
        return cuda_packed.unpack_expert(be, cuda_packed.on_device(e))
    return e


def _i32(v) -> np.int32:
    return np.int32(v)


def _i64(v) -> np.int64:
    return np.int64(v)


class CupyBackend(CudaFamilyOps, Backend):
    """Ops on CuPy arrays of the current CUDA device (``get_backend("cuda")``).

    Raises (on construction):
        ImportError: CuPy is not installed.
        cupy.cuda.runtime.CUDARuntimeError: no usable GPU.
    """

    name = "cuda"

    def __init__(self):
        self.module = cp.RawModule(code=cuda_src.SOURCE, options=("-std=c++14",))
        self.k = {n: self.module.get_function(n) for n in cuda_src.KERNELS}
        self._dummy = cp.zeros(1, cp.float32)
        self.reads = HostReads()     # routing reads: pinned, several arrays in one read
        self.uploads = HostUploads()  # per-step uploads: pinned, several arrays in one copy

    # -- arrays --------------------------------------------------------------------------------

    def empty(self, shape, dtype=np.float32):
        """``cupy.empty``."""
        return cp.empty(shape, dtype)

    def zeros(self, shape, dtype=np.float32):
        """``cupy.zeros``."""
        return cp.zeros(shape, dtype)

    def from_host(self, a):
        """A C-contiguous device copy of host array ``a`` (a device array is returned as is
        when already contiguous)."""
        if isinstance(a, cp.ndarray):
            return cp.ascontiguousarray(a)
        return cp.asarray(np.ascontiguousarray(a))

    def upload(self, *arrays) -> list:
        """Device copies of small host ``arrays`` in one copy on the current stream
        (:class:`~zipmoe_rt.backends.cuda_uploads.HostUploads`)."""
        return self.uploads.upload(*arrays)

    def to_host(self, a):
        """A host copy of device array ``a`` through a pinned buffer, once the current stream
        has written it (:class:`~zipmoe_rt.backends.cuda_reads.HostReads`); host arrays pass
        through, anything else goes through ``cupy.asnumpy``."""
        if isinstance(a, np.ndarray):
            return a
        return self.reads.read(a)[0] if isinstance(a, cp.ndarray) else cp.asnumpy(a)

    def read_later(self, *arrays):
        """Host copies of device ``arrays`` queued without a host wait: a callable returning
        them once copied (:meth:`HostReads.read_later
        <zipmoe_rt.backends.cuda_reads.HostReads.read_later>`; the look-ahead's routing with
        ``prefetch.LOOKAHEAD_ASYNC``)."""
        return self.reads.read_later(*arrays)

    def synchronize(self):
        """Wait for the GPU's queued work (for timing)."""
        cp.cuda.get_current_stream().synchronize()

    def resident_experts(self, source):
        """``source`` with each expert uploaded once and kept on the GPU
        (:class:`~zipmoe_rt.backends.cuda_resident.ResidentExperts`)."""
        from .cuda_resident import ResidentExperts
        return ResidentExperts(source, self)

    # -- helpers -------------------------------------------------------------------------------

    @staticmethod
    def rows_view(x, n):
        """x as [T, n] float32 rows with unit element stride; (array, row stride)."""
        if x.ndim == 1:
            x = x.reshape(1, -1)
        if x.dtype != cp.float32 or x.strides[1] != 4 or x.strides[0] % 4:
            x = cp.ascontiguousarray(x, cp.float32)
        if x.shape[1] != n:
            raise ValueError(f"input has {x.shape[1]} features, the weight takes {n}")
        return x, x.strides[0] // 4

    @staticmethod
    def _vec(x, ldx, W):
        """Whether the 16-byte loads of the GEMV kernels are aligned."""
        return int(W.shape[1] % 8 == 0 and ldx % 4 == 0 and x.data.ptr % 16 == 0
                   and W.data.ptr % 16 == 0)

    def _widened(self, W, r0, r1):
        """Rows r0:r1 of a weight as float32 (BF16 bits shifted, other dtypes cast)."""
        w = W[r0:r1]
        if w.dtype == cp.uint16:
            return (w.astype(cp.uint32) << 16).view(cp.float32)
        return w.astype(cp.float32, copy=False)

    def _gemv(self, x, W, y, bias=None, alpha=1.0, accumulate=False):
        """y[t] (+)= alpha * W @ x[t] (+ bias) with the BF16 GEMV kernel; y [T, out] rows."""
        x, ldx = self.rows_view(x, W.shape[1])
        T, n_out = x.shape[0], W.shape[0]
        ldy = y.strides[0] // 4 if y.ndim == 2 else n_out
        grid = ((n_out + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK, T)
        self.k["gemv_bf16"](grid, (32 * _ROWS_PER_BLOCK,),
                            (x, W, bias if bias is not None else self._dummy, y,
                             _i32(n_out), _i32(W.shape[1]), _i64(ldx), _i64(ldy), _F32(alpha),
                             _i32(bias is not None), _i32(accumulate), _i32(self._vec(x, ldx, W))))
        return y

    # -- dense algebra -------------------------------------------------------------------------

    def embed(self, W, ids):
        """``W[ids]`` widened to float32 on the GPU. Raises IndexError for an id outside
        [0, V)."""
        ids = np.asarray(ids, np.int64).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= W.shape[0]):
            raise IndexError(f"token id out of range [0, {W.shape[0]})")
        rows = W[self.uploads.upload(ids)[0]]
        if rows.dtype == cp.uint16:
            return (rows.astype(cp.uint32) << 16).view(cp.float32)
        return cp.ascontiguousarray(rows, cp.float32)

    def linear(self, x, W, bias=None, out=None):
        """BF16: the GEMV kernel below :data:`GEMV_MAX_T` tokens, else widened rows and cuBLAS;
        float16/float32: cuBLAS on the float32 weight."""
        if W.dtype not in (cp.uint16, cp.float16, cp.float32):
            raise TypeError(f"weight dtype {W.dtype} is not supported")
        x2, _ = self.rows_view(x, W.shape[1])
        T, n_out = x2.shape[0], W.shape[0]
        if out is None:
            out = cp.empty((T, n_out), cp.float32)
        if W.dtype == cp.uint16 and T < GEMV_MAX_T and out.strides[-1] == 4:
            return self._gemv(x2, W, out, bias)
        step = max(1, WIDEN_BYTES // (4 * max(1, W.shape[1])))
        for r0 in range(0, n_out, step):
            r1 = min(n_out, r0 + step)
            y = cp.matmul(x2, self._widened(W, r0, r1).T)
            if bias is not None:
                y += bias[r0:r1]
            out[:, r0:r1] = y
        return out

    def swiglu(self, x, gate, up, act="silu"):
        """``silu(x @ gate.T) * (x @ up.T)``: one fused kernel for BF16 and few tokens; another
        activation (GELU-tanh) as plain CuPy float32 expressions over :meth:`linear`."""
        x2, ldx = self.rows_view(x, gate.shape[1])
        T, n_out = x2.shape[0], gate.shape[0]
        if check_act(act):
            g = self.linear(x2, gate)
            inner = _F32(0.7978845608028654) * (g + _F32(0.044715) * (g * g * g))
            return (_F32(0.5) * g * (_F32(1.0) + cp.tanh(inner))) * self.linear(x2, up)
        if gate.dtype == up.dtype == cp.uint16 and T < GEMV_MAX_T:
            h = cp.empty((T, n_out), cp.float32)
            grid = ((n_out + _ROWS_PER_BLOCK - 1) // _ROWS_PER_BLOCK, T)
            vec = self._vec(x2, ldx, gate) and up.data.ptr % 16 == 0
            self.k["swiglu_bf16"](grid, (32 * _ROWS_PER_BLOCK,),
                                  (x2, gate, up, h, _i32(n_out), _i32(gate.shape[1]),
                                   _i64(ldx), _i64(n_out), _i32(vec)))
            return h
        g = self.linear(x2, gate)
        return (g / (_F32(1.0) + cp.exp(-g))) * self.linear(x2, up)

    @staticmethod
    def _dev_expert(e):
        """An expert's three weights as device arrays (host arrays uploaded)."""
        return tuple(a if isinstance(a, cp.ndarray) else cp.asarray(np.ascontiguousarray(a))
                     for a in (e.gate, e.up, e.down))

    @staticmethod
    def _check_expert(H, gate, up, down, op):
        if tuple(down.shape) != tuple(gate.shape[::-1]) or tuple(up.shape) != tuple(gate.shape) \
                or H != gate.shape[1]:
            raise ValueError(f"{op}: x has {H} features, gate {tuple(gate.shape)}, up "
                             f"{tuple(up.shape)}, down {tuple(down.shape)} disagree")

    def expert_accumulate(self, out, x, rows, weights, expert, act="silu", glu=None):
        """``out[rows] += weights[:, None] * down(swiglu(x[rows]))`` (rows distinct); a packed
        expert (compute form) through :func:`~zipmoe_rt.backends.cuda_packed.expert_accumulate`,
        bit-identical (SiLU; for another activation it is decoded first, :func:`_unpacked`);
        with ``glu``, gpt-oss's ``out[rows] += expert(x[rows]) * weights[:, None]``
        (:meth:`_clamped_expert`)."""
        if glu is not None:
            check_biased_expert("expert_accumulate", x.shape[1], expert)
            r, w = self.uploads.upload(np.asarray(rows, np.int64),
                                       np.asarray(weights, np.float32))
            out[r] += self._clamped_expert(x[r], expert, glu) * w[:, None]
            return
        if cuda_packed.is_packed_any(expert) and check_act(act):   # GELU-tanh: decoded
            expert = _unpacked(self, expert)
        if cuda_packed.is_packed_any(expert):      # compressed experts (cuda_packed)
            return cuda_packed.expert_accumulate(self, out, x, rows, weights,
                                                 cuda_packed.on_device(expert))
        gate, up, down = self._dev_expert(expert)
        self._check_expert(x.shape[1], gate, up, down, "expert_accumulate")
        r, w = self.uploads.upload(np.asarray(rows, np.int64), np.asarray(weights, np.float32))
        y = self.linear(self.swiglu(x[r], gate, up, act), down)
        out[r] += w[:, None] * y

    def experts_token(self, out, x, experts, weights, act="silu", glu=None):
        """With ``glu`` (gpt-oss): each expert's :meth:`_clamped_expert` output times its weight
        added to the row, in order. Else: BF16 experts of one shape (:data:`FUSED_EXPERTS`): one
        launch for the gate/up rows of all k experts, one for the down rows adding ``sum_e weights[e] * down_e(h_e)`` (experts
        summed in order in registers) to ``out``; the weights' addresses and the routing weights
        go up in one small copy. Otherwise, for each expert in order: the gate/up kernel, then
        the down GEMV adding ``weights[e]`` times its output (one stream: a fixed order)."""
        # -- compressed experts (cuda_packed): fused decode + GEMV kernels, bit-identical --
        if check_act(act):                          # GELU-tanh: packed experts decoded
            experts = [_unpacked(self, e) for e in experts]
        if any(map(cuda_packed.is_packed_any, experts)):
            return cuda_packed.experts_token(self, out, x, list(map(cuda_packed.on_device,
                                                                    experts)), weights)
        weights = np.asarray(weights, np.float32)
        H = x.shape[-1]
        o2 = out.reshape(1, -1)
        if glu is not None:
            for w, e in zip(weights, experts):
                check_biased_expert("experts_token", H, e)
                o2 += self._clamped_expert(x.reshape(1, -1), e, glu) * _F32(w)
            return
        devs = [self._dev_expert(e) for e in experts]
        for gate, up, down in devs:
            self._check_expert(H, gate, up, down, "experts_token")
        if FUSED_EXPERTS and devs and len({d[0].shape for d in devs}) == 1 \
                and all(a.dtype == cp.uint16 for d in devs for a in d) and not check_act(act):
            self._experts_fused(o2, x, devs, weights)
            return
        for w, (gate, up, down) in zip(weights, devs):
            h = self.swiglu(x, gate, up, act)
            if down.dtype == cp.uint16:
                self._gemv(h, down, o2, alpha=float(w), accumulate=True)
            else:
                o2 += _F32(w) * self.linear(h, down)

    def _experts_fused(self, o2, x, devs, weights):
        """:meth:`experts_token` for k BF16 experts of one shape in two launches."""
        k = len(devs)
        n_int, H = devs[0][0].shape
        x2, _ = self.rows_view(x, H)
        if x2.data.ptr % 16:
            x2 = x2.copy()
        meta = np.zeros(3 * k + (k + 1) // 2, np.uint64)
        for j in range(3):                     # gate, up, down addresses
            meta[j * k:(j + 1) * k] = [d[j].data.ptr for d in devs]
        meta[3 * k:].view(np.float32)[:k] = weights
        ptrs = self.uploads.upload(meta)[0]
        vec = int(H % 8 == 0 and n_int % 8 == 0 and all(int(p) % 16 == 0 for p in meta[:3 * k]))
        h = cp.empty((k, n_int), cp.float32)
        rows = _ROWS_PER_BLOCK
        self.k["swiglu_bf16_k"](((n_int + rows - 1) // rows, 1, k), (32 * rows,),
                                (x2, ptrs, h, _i32(k), _i32(n_int), _i32(H), _i32(vec)))
        self.k["down_bf16_k"](((H + rows - 1) // rows,), (32 * rows,),
                              (h, ptrs, o2, _i32(k), _i32(H), _i32(n_int), _i32(vec)))

    # -- normalisation, elementwise ------------------------------------------------------------

    def _norm_rows(self, x, ldx, y, ldy, w, n, G, T, eps):
        threads = min(1024, max(32, 1 << (int(n) - 1).bit_length()))
        self.k["rmsnorm_rows"]((T * G,), (threads,),
                               (x, y, w, _i32(n), _i32(G), _i64(ldx), _i64(ldy), _F32(eps)))

    def rmsnorm(self, x, w, eps, out=None):
        """The RMSNorm kernel, one block per row."""
        x2, ldx = self.rows_view(x, w.shape[0])
        if out is None:
            out = cp.empty(x2.shape, cp.float32)
        self._norm_rows(x2, ldx, out, out.strides[0] // 4 if out.ndim == 2 else w.shape[0],
                        w, w.shape[0], 1, x2.shape[0], eps)
        return out

    def add_(self, a, b):
        """``a += b`` (CuPy elementwise)."""
        a += b
        return a

    def sigmoid_gate_add_(self, y, g, s):
        """``y += sigmoid(g) * s`` (CuPy elementwise)."""
        y += (_F32(1.0) / (_F32(1.0) + cp.exp(-g))) * s
        return y

    # -- attention -----------------------------------------------------------------------------

    def rope_qk_cache(self, qkv, nq, nkv, hd, q_norm, k_norm, eps, cos, sin, kc, vc, pos0,
                      clip=None):
        """Norm kernel over rows of ``w.size`` (a head or the whole projection) in place,
        ``cupy.clip``, then the RoPE + cache-write kernel (one block per token and q/k head)."""
        check_qk_norm(q_norm.size, k_norm.size, nq, nkv, hd, clip, cos.shape[1])
        half = int(cos.shape[1])
        T, ld = qkv.shape[0], qkv.strides[0] // 4
        for w, base, heads in ((q_norm, 0, nq), (k_norm, nq * hd, nkv)):
            if w.size:
                part = qkv[:, base:]
                self._norm_rows(part, ld, part, ld, w, w.size, heads * hd // w.size, T, eps)
        if clip is not None:
            cp.clip(qkv, -_F32(clip), _F32(clip), out=qkv)
        cos = cp.ascontiguousarray(cos, cp.float32)
        sin = cp.ascontiguousarray(sin, cp.float32)
        self.k["rope_qk_cache"]((T, nq + nkv), (min(128, max(32, hd // 2)),),
                                (qkv, cos, sin, kc, vc, _i32(nq), _i32(nkv), _i32(hd),
                                 _i64(ld), _i64(kc.shape[1]), _i32(pos0), _i32(half)))

    def attention(self, qkv, nq, nkv, hd, kc, vc, pos0, window, scale, out):
        """The attention kernel: one block of 4 warps per (token, query head), keys split
        between the warps (online softmax), partial results combined in shared memory."""
        if hd > ATT_MAX_HD:
            raise ValueError(f"head_dim {hd} > {ATT_MAX_HD} is not supported by the CUDA "
                             f"attention kernel")
        T = qkv.shape[0]
        nw = 4
        shared = 4 * nw * (hd + 2)
        self.k["attention"]((T, nq), (32 * nw,),
                            (qkv, kc, vc, out, _i32(nq), _i32(nkv), _i32(hd),
                             _i64(qkv.strides[0] // 4), _i64(kc.shape[1]), _i32(pos0),
                             _i32(window), _F32(scale), _i64(out.strides[0] // 4)),
                            shared_mem=shared)
        return out

    # -- routing -------------------------------------------------------------------------------

    def route(self, logits, k, renorm, scoring="softmax", method="greedy", n_group=1,
              topk_group=1, bias=None, scale=1.0):
        """Softmax top-k without bias or scale: the routing kernel (one thread per token) on
        the GPU, the [T, k] ids and weights copied to the host in one read
        (:class:`~zipmoe_rt.backends.cuda_reads.HostReads`). Any other router (sigmoid scoring,
        grouped selection, a score-correction bias, a scale): the logits copied to the host and
        routed by :meth:`NumpyBackend.route <zipmoe_rt.backends.numpy_ref.NumpyBackend.route>`.
        Raises ValueError from :func:`~zipmoe_rt.backends.base.check_route`."""
        T, E = logits.shape
        check_route(E, k, scoring, method, n_group, topk_group, bias, scale)
        if not (scoring == "softmax" and method == "greedy" and bias is None and scale == 1.0):
            return _NP.route(self.to_host(logits), k, renorm, scoring, method, n_group,
                             topk_group, None if bias is None else self.to_host(bias), scale)
        logits = cp.ascontiguousarray(logits, cp.float32)
        p = cp.empty((T, E), cp.float32)
        idx = cp.empty((T, k), cp.int64)
        w = cp.empty((T, k), cp.float32)
        self.k["route_topk"](((T + 127) // 128,), (128,),
                             (logits, p, idx, w, _i32(T), _i32(E), _i32(k), _i32(bool(renorm))))
        idx, w = self.reads.read(idx, w)
        return idx, w

    # -- bit planes ----------------------------------------------------------------------------

    def merge_planes(self, exp, sm, dtype: str):
        """Words from an exponent plane and a sign+mantissa plane on the GPU, bit for bit as
        :func:`zmoe.codec.merge_planes` (format/SPEC.md §5.1); see
        :func:`~zipmoe_rt.backends.cuda_planes.merge_planes` (device words; ValueError for
        another dtype or plane sizes that disagree)."""
        return cuda_planes.merge_planes(self.k, exp, sm, dtype)

    def decode_exponents(self, exp, offs, sizes, raws):
        """Huffman exponent chunks decoded on the GPU, byte for byte as
        :func:`zmoe.huffman.decode` (format/SPEC.md §5.3); see
        :func:`~zipmoe_rt.backends.cuda_planes.decode_exponents` (device uint8 [Σ raws];
        HuffmanError naming a malformed chunk)."""
        return cuda_planes.decode_exponents(self.k, exp, offs, sizes, raws)

    def decode_merge(self, exp, offs, sizes, raws, sm, dtype: str):
        """One tensor's words from its Huffman exponent chunks and its sign+mantissa plane,
        decoded and merged on the GPU (:meth:`decode_exponents`, then :meth:`merge_planes`).

        Args:
            exp: buffer holding the chunks.  offs, sizes, raws: the chunks' offsets, sizes and
                exponent counts (int [m]).  sm: uint8 sign+mantissa plane of Σ raws elements.
            dtype: ``"BF16"``, ``"F16"`` or ``"F32"``.
        Returns:
            device words (uint16 or uint32) [Σ raws].
        Raises:
            zmoe.huffman.HuffmanError: a malformed chunk.  ValueError: sizes that disagree.
        """
        return self.merge_planes(self.decode_exponents(exp, offs, sizes, raws), sm, dtype)
