"""Resident compressed experts on the GPU (``load(device="cuda", resident="compressed")``,
``--resident compressed --device cuda``): each expert is transcoded on the host into the compute
form (:mod:`zipmoe_rt.engine.resident`, design note §6.5), uploaded once in the GPU layout of
:mod:`zipmoe_rt.kernels.cuda_packed_src` (~12 bits per weight) and computed in place by the
fused decode + GEMV kernels there; BF16 weights are never written to GPU memory for 1 to
:data:`~zipmoe_rt.backends.cupy_cuda.GEMV_MAX_T` - 1 rows of an expert. From
``GEMV_MAX_T`` rows on (prefill), the expert is unpacked into a BF16 scratch buffer and goes
through the BF16 cuBLAS path.

The outputs equal the BF16 GPU path's bit for bit: the kernels decode exactly the weights the
BF16 kernels load and sum them in the same order (see the kernel module), and the glue below
makes the same launch decisions (token threshold, vector loads, fused k experts) as
:class:`~zipmoe_rt.backends.cupy_cuda.CupyBackend` does for the decoded expert.

Imported by :mod:`zipmoe_rt.backends.cupy_cuda` only (it imports CuPy).
"""
from __future__ import annotations

import numpy as np

import cupy as cp

from ..kernels import cuda_packed_src
from ..kernels.cuda_packed_src import gpu_layout
from ..models.packed import PackedExpert, PackedMatrix
from ..models.weights import ExpertWeights

_ROWS = 8                 # warps (output rows) per block, as the BF16 kernels
_ALIGN = 16
_F32 = np.float32


class GpuPackedMatrix:
    """A packed BF16 matrix in one GPU buffer (nibbles, sign+mantissa plane, escape pointers,
    columns and exponents, each 16-byte aligned).

    Attributes:
        shape: ``(out, in)``.  base: exponent of index 0.  buf: device uint8 buffer.
        desc: host uint64 [6]: device addresses of nib, sm, ep, ec, ev, then ``base`` (the
            kernels' descriptor).  nbytes: bytes of ``buf``.  n_escapes: escaped weights.
    """

    dtype = np.dtype(np.uint16)      # the BF16 bits it stands for

    def __init__(self, P: PackedMatrix):
        nib, ep, ec, ev = gpu_layout(P)
        parts = [nib.reshape(-1), np.ascontiguousarray(P.sm, np.uint8).reshape(-1),
                 ep.view(np.uint8), ec.view(np.uint8), ev]
        offs, pos = [], 0
        for p in parts:
            offs.append(pos)
            pos += -(-p.size // _ALIGN) * _ALIGN
        host = np.zeros(max(pos, _ALIGN), np.uint8)
        for o, p in zip(offs, parts):
            host[o:o + p.size] = p
        self.shape, self.base, self.n_escapes = tuple(P.shape), int(P.base), int(ec.size)
        self.buf = cp.asarray(host)
        ptr = self.buf.data.ptr
        self.desc = np.array([ptr + o for o in offs] + [self.base], np.uint64)

    @property
    def nbytes(self) -> int:
        return int(self.buf.nbytes)

    @property
    def bf16_nbytes(self) -> int:
        return 2 * self.shape[0] * self.shape[1]

    def args(self):
        """The pointer arguments of ``pk_gemv`` / ``pk_unpack`` (nib, sm, ep, ec, ev, base)."""
        d = self.desc
        return (*(np.uint64(v) for v in d[:5]), np.uint32(self.base))


class GpuPackedExpert:
    """A SwiGLU expert held packed on the GPU: gate, up ``[I, H]`` and down ``[H, I]``
    :class:`GpuPackedMatrix` (the roles of :class:`~zipmoe_rt.models.weights.ExpertWeights`).

    Attributes:
        desc: host uint64 [3, 6]: the three matrices' descriptors (gate, up, down).
    """

    def __init__(self, E: PackedExpert):
        self.gate, self.up, self.down = (GpuPackedMatrix(m) for m in (E.gate, E.up, E.down))
        self.desc = np.stack([self.gate.desc, self.up.desc, self.down.desc])

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    @property
    def bf16_nbytes(self) -> int:
        return self.gate.bf16_nbytes + self.up.bf16_nbytes + self.down.bf16_nbytes


def upload(E) -> GpuPackedExpert:
    """A host :class:`~zipmoe_rt.models.packed.PackedExpert` uploaded in the GPU layout."""
    return GpuPackedExpert(E)


def is_gpu_packed(e) -> bool:
    """Whether ``e`` is a :class:`GpuPackedExpert`."""
    return isinstance(e, GpuPackedExpert)


class PackedKernels:
    """The compiled kernels of :mod:`zipmoe_rt.kernels.cuda_packed_src` (one per backend)."""

    def __init__(self):
        mod = cp.RawModule(code=cuda_packed_src.SOURCE, options=("-std=c++14",))
        self.k = {n: mod.get_function(n) for n in cuda_packed_src.KERNELS}


def _kernels(be) -> dict:
    pk = getattr(be, "_packed_kernels", None)
    if pk is None:
        pk = be._packed_kernels = PackedKernels()
    return pk.k


def unpack(be, M: GpuPackedMatrix):
    """The BF16 bits of a packed matrix as a new device uint16 ``[out, in]`` array."""
    out = cp.empty(M.shape, cp.uint16)
    n = M.shape[0] * M.shape[1]
    if n:
        _kernels(be)["pk_unpack"]((min(4096, (n + 255) // 256),), (256,),
                                  (*M.args(), out, np.int32(M.shape[0]), np.int32(M.shape[1])))
    return out


def unpack_expert(be, E: GpuPackedExpert) -> ExpertWeights:
    """The decoded expert on the GPU (device uint16 arrays)."""
    return ExpertWeights(unpack(be, E.gate), unpack(be, E.up), unpack(be, E.down))


def _check(H, E, op):
    I_, H_ = E.gate.shape
    if E.up.shape != (I_, H_) or E.down.shape != (H_, I_) or H != H_:
        raise ValueError(f"{op}: x has {H} features, gate {E.gate.shape}, up {E.up.shape}, "
                         f"down {E.down.shape} disagree")


def _swiglu(be, x2, ldx, E: GpuPackedExpert):
    """``swiglu_bf16`` on a packed gate/up: h float32 [T, I] (vector loads decided as
    :meth:`CupyBackend.swiglu` decides them for the BF16 weights)."""
    T, (n_out, n_in) = x2.shape[0], E.gate.shape
    h = cp.empty((T, n_out), cp.float32)
    vec = int(n_in % 8 == 0 and ldx % 4 == 0 and x2.data.ptr % 16 == 0)
    d = be.upload(np.concatenate([E.gate.desc, E.up.desc]))[0]
    _kernels(be)["pk_swiglu"]((-(-n_out // _ROWS), T), (32 * _ROWS,),
                              (x2, d, h, np.int32(n_out), np.int32(n_in), np.int64(ldx),
                               np.int64(n_out), np.int32(vec)))
    return h


def _gemv(be, x, M: GpuPackedMatrix, y, alpha=1.0, accumulate=False):
    """``gemv_bf16`` (no bias) on a packed matrix: y[t] (+)= alpha * M @ x[t]."""
    x, ldx = be.rows_view(x, M.shape[1])
    T, n_out = x.shape[0], M.shape[0]
    ldy = y.strides[0] // 4 if y.ndim == 2 else n_out
    vec = int(M.shape[1] % 8 == 0 and ldx % 4 == 0 and x.data.ptr % 16 == 0)
    _kernels(be)["pk_gemv"]((-(-n_out // _ROWS), T), (32 * _ROWS,),
                            (x, *M.args(), y, np.int32(n_out), np.int32(M.shape[1]),
                             np.int64(ldx), np.int64(ldy), _F32(alpha), np.int32(accumulate),
                             np.int32(vec)))
    return y


def expert_accumulate(be, out, x, rows, weights, E: GpuPackedExpert) -> None:
    """``out[rows] += weights[:, None] * down(swiglu(x[rows]))`` for a packed expert, as
    :meth:`CupyBackend.expert_accumulate` on its BF16 weights, bit for bit: fused decode + GEMV
    kernels below ``GEMV_MAX_T`` rows, else the expert unpacked into BF16 scratch and the BF16
    path. Raises ValueError when the shapes disagree."""
    from .cupy_cuda import GEMV_MAX_T
    _check(x.shape[1], E, "expert_accumulate")
    r, w = be.upload(np.asarray(rows, np.int64), np.asarray(weights, np.float32))
    xs = x[r]
    if xs.shape[0] >= GEMV_MAX_T:
        d = unpack_expert(be, E)
        y = be.linear(be.swiglu(xs, d.gate, d.up), d.down)
    else:
        x2, ldx = be.rows_view(xs, E.gate.shape[1])
        h = _swiglu(be, x2, ldx, E)
        y = _gemv(be, h, E.down, cp.empty((h.shape[0], E.down.shape[0]), cp.float32))
    out[r] += w[:, None] * y


def experts_token(be, out, x, experts, weights) -> None:
    """``out += sum_e weights[e] * expert_e(x)`` for one token, as
    :meth:`CupyBackend.experts_token` on the decoded experts, bit for bit.

    Packed experts of one shape with :data:`~zipmoe_rt.backends.cupy_cuda.FUSED_EXPERTS`: two
    launches (gate/up of all k, then the down rows summed over the experts in order), the k
    descriptors and routing weights in one small upload; without it, per expert the gate/up
    kernel and the down GEMV adding ``weights[e]`` times its output. A mix with decoded experts:
    the packed ones are unpacked and the BF16 path runs.

    Args:
        out: float32 [H] device row.  x: float32 [H].  experts: GpuPackedExpert /
            ExpertWeights.  weights: float32 [k].
    Raises:
        ValueError: shapes disagree.
    """
    from . import cupy_cuda
    weights = np.asarray(weights, np.float32)
    H = x.shape[-1]
    if not all(map(is_gpu_packed, experts)):
        be.experts_token(out, x, [unpack_expert(be, e) if is_gpu_packed(e) else e
                                  for e in experts], weights)
        return
    for E in experts:
        _check(H, E, "experts_token")
    o2 = out.reshape(1, -1)
    if cupy_cuda.FUSED_EXPERTS and experts and len({E.gate.shape for E in experts}) == 1:
        k = len(experts)
        n_int = experts[0].gate.shape[0]
        x2, _ = be.rows_view(x, H)
        if x2.data.ptr % 16:
            x2 = x2.copy()
        desc = np.stack([E.desc for E in experts], axis=1)    # [3, k, 6]
        meta = np.concatenate([desc.reshape(-1), np.zeros((k + 1) // 2, np.uint64)])
        meta[18 * k:].view(np.float32)[:k] = weights
        d = be.upload(meta)[0]
        vec = int(H % 8 == 0 and n_int % 8 == 0)
        h = cp.empty((k, n_int), cp.float32)
        kk = _kernels(be)
        kk["pk_swiglu_k"]((-(-n_int // _ROWS), 1, k), (32 * _ROWS,),
                          (x2, d, h, np.int32(k), np.int32(n_int), np.int32(H), np.int32(vec)))
        kk["pk_down_k"]((-(-H // _ROWS),), (32 * _ROWS,),
                        (h, d, o2, np.int32(k), np.int32(H), np.int32(n_int), np.int32(vec)))
        return
    for w, E in zip(weights, experts):
        x2, ldx = be.rows_view(x, H)
        h = _swiglu(be, x2, ldx, E)
        _gemv(be, h, E.down, o2, alpha=float(w), accumulate=True)


def is_packed_any(e) -> bool:
    """Whether ``e`` is a packed expert, on the host
    (:class:`~zipmoe_rt.models.packed.PackedExpert`) or on the GPU (:class:`GpuPackedExpert`)."""
    return isinstance(e, (GpuPackedExpert, PackedExpert))


def on_device(e):
    """``e`` with a host :class:`~zipmoe_rt.models.packed.PackedExpert` uploaded
    (:func:`upload`); anything else as it is."""
    return upload(e) if isinstance(e, PackedExpert) else e
