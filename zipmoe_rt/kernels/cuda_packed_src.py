"""CUDA C sources of the GPU kernels on the compute form of resident BF16 experts
(``--resident compressed --device cuda``; glue in :mod:`zipmoe_rt.backends.cuda_packed`),
compiled at run time with NVRTC through ``cupy.RawModule``. Plain strings: importing this
module imports no GPU library (:func:`gpu_layout`, the host side of the layout, uses NumPy).

The GPU layout of a packed BF16 matrix ``[out, in]`` (transcoded on the host from
:class:`~zipmoe_rt.models.packed.PackedMatrix` by
:func:`gpu_layout`):

* ``nib`` uint8 ``[out, (in + 1) // 2]``: byte ``j`` of a row holds the 4-bit index of column
  ``2j`` (low nibble) and ``2j + 1`` (high nibble), so the 8 indices of columns ``8i .. 8i + 7``
  are one 32-bit word (nibble ``k`` = column ``8i + k``);
* ``sm`` uint8 ``[out, in]``: the sign+mantissa plane as stored (format/SPEC.md §5.1);
* index ``v < 15``: exponent ``base + v``; ``15``: an escape, whose exponent is found in the
  row's sorted escape list ``ec[ep[r] .. ep[r + 1] - 1]`` (int32 columns) / ``ev`` (uint8
  exponents) by binary search.

A weight's float32 value is ``sign << 31 | exponent << 23 | mantissa << 16``: the BF16 bits
widened, never stored.

Bit-identical to the BF16 kernels of :mod:`zipmoe_rt.kernels.cuda_src`: every kernel here is the
BF16 kernel of the same name without ``pk_`` (``gemv_bf16``, ``swiglu_bf16``, ``swiglu_bf16_k``,
``down_bf16_k``) with its 16-byte weight load replaced by the decode of the same 8 weights from
12 bytes (a 32-bit index word and 8 sign+mantissa bytes): the same rows per warp, the same
columns per lane, the same float32 expression per 8 weights and the same warp reduction, so the
sums are the same bit for bit. ``pk_unpack`` writes BF16 bits to a scratch buffer for the
cuBLAS path (8 or more rows).
"""
from __future__ import annotations

import numpy as np

#: names of the kernels in :data:`SOURCE`.
KERNELS = ("pk_gemv", "pk_swiglu", "pk_swiglu_k", "pk_down_k", "pk_unpack")

SOURCE = r"""
extern "C" {

__device__ __forceinline__ float pk_warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// One packed matrix: nibbles, sign+mantissa plane, escape row pointers / columns / exponents,
// exponent of index 0. Rows are nib + r * nh (nh = (n + 1) / 2) and sm + r * n.
struct PM {
    const unsigned char* nib;
    const unsigned char* sm;
    const int* ep;
    const int* ec;
    const unsigned char* ev;
    unsigned int base;
};

// The descriptor table of the k-expert kernels: 6 words per matrix (nib, sm, ep, ec, ev, base),
// matrix (role, e) at word 6 * (role * k + e), roles gate 0, up 1, down 2; then k float32
// routing weights.
__device__ __forceinline__ PM pm_load(const unsigned long long* d) {
    PM m;
    m.nib = reinterpret_cast<const unsigned char*>(d[0]);
    m.sm = reinterpret_cast<const unsigned char*>(d[1]);
    m.ep = reinterpret_cast<const int*>(d[2]);
    m.ec = reinterpret_cast<const int*>(d[3]);
    m.ev = reinterpret_cast<const unsigned char*>(d[4]);
    m.base = (unsigned int)d[5];
    return m;
}

// Exponent of escaped column c of row r (present by construction: binary search).
__device__ __noinline__ unsigned int pk_escape(const PM& m, long long r, int c) {
    int lo = m.ep[r], hi = m.ep[r + 1] - 1;
    while (lo < hi) {
        int mid = (lo + hi) >> 1;
        if (m.ec[mid] < c) lo = mid + 1; else hi = mid;
    }
    return m.ev[lo];
}

// float32 bits of weight (r, c): exponent from its index (or escape), sign+mantissa byte s.
__device__ __forceinline__ float pk_one(const PM& m, long long r, int c, int n) {
    int nh = (n + 1) >> 1;
    unsigned int v = (m.nib[r * nh + (c >> 1)] >> ((c & 1) * 4)) & 15u;
    unsigned int s = m.sm[r * n + c];
    unsigned int e = v == 15u ? pk_escape(m, r, c) : m.base + v;
    return __uint_as_float(((s & 0x80u) << 24) | (e << 23) | ((s & 0x7Fu) << 16));
}

// The 8 weights of columns 8i .. 8i + 7 of row r as float32 (vec path: n % 8 == 0).
__device__ __forceinline__ void pk_eight(const PM& m, long long r, int i, int n, float* w) {
    unsigned int nb = reinterpret_cast<const unsigned int*>(m.nib + r * (n >> 1))[i];
    uint2 s2 = reinterpret_cast<const uint2*>(m.sm + r * n)[i];
    unsigned int b23 = m.base << 23;
    unsigned int sg[8], u[8];
#pragma unroll
    for (int k = 0; k < 8; k++) {
        unsigned int sw = k < 4 ? s2.x : s2.y;
        unsigned int sel = (unsigned int)(k & 3);
        // byte k of the plane into bytes 3 and 2: sign to bit 31, mantissa to bits 22..16
        sg[k] = __byte_perm(sw, 0u, (sel << 12) | (sel << 8) | 0x44u) & 0x807F0000u;
        u[k] = sg[k] | ((((nb >> (4 * k)) & 15u) << 23) + b23);
    }
    unsigned int esc = nb & (nb >> 1) & (nb >> 2) & (nb >> 3) & 0x11111111u;
    if (esc) {      // index 15 (base + 15 may wrap past bit 31: rebuilt from sg)
#pragma unroll
        for (int k = 0; k < 8; k++)
            if ((esc >> (4 * k)) & 1u) u[k] = sg[k] | (pk_escape(m, r, 8 * i + k) << 23);
    }
#pragma unroll
    for (int k = 0; k < 8; k++) w[k] = __uint_as_float(u[k]);
}

// Partial dot product of one lane, as dot_bf16 of cuda_src.py (same columns, same expression).
__device__ __forceinline__ float pk_dot(const float* __restrict__ x, const PM& m, long long r,
                                        int n, int lane, int vec) {
    float acc = 0.f;
    if (vec) {
        const float4* x4 = reinterpret_cast<const float4*>(x);
#pragma unroll 4
        for (int i = lane; i < (n >> 3); i += 32) {
            float w[8];
            pk_eight(m, r, i, n, w);
            float4 a = x4[2 * i], b = x4[2 * i + 1];
            acc += a.x * w[0] + a.y * w[1]
                 + a.z * w[2] + a.w * w[3]
                 + b.x * w[4] + b.y * w[5]
                 + b.z * w[6] + b.w * w[7];
        }
    } else {
        for (int i = lane; i < n; i += 32) acc += x[i] * pk_one(m, r, i, n);
    }
    return acc;
}

// gemv_bf16 without bias: y[t, r] (+)= alpha * (x[t] . W[r]); one warp per row, blockIdx.y = t.
__global__ void pk_gemv(const float* __restrict__ x, const unsigned char* nib,
                        const unsigned char* sm, const int* ep, const int* ec,
                        const unsigned char* ev, unsigned int base, float* __restrict__ y,
                        int n_out, int n_in, long long ldx, long long ldy, float alpha,
                        int accumulate, int vec) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= n_out) return;
    PM m = {nib, sm, ep, ec, ev, base};
    int t = blockIdx.y;
    float acc = pk_warp_sum(pk_dot(x + t * ldx, m, r, n_in, lane, vec));
    if (lane == 0) {
        float v = alpha * acc;
        float* yp = y + t * ldy + r;
        if (accumulate) *yp += v; else *yp = v;
    }
}

// swiglu_bf16: h[t, r] = silu(x[t] . gate[r]) * (x[t] . up[r]); gate and up at d[0:6], d[6:12].
__global__ void pk_swiglu(const float* __restrict__ x, const unsigned long long* __restrict__ d,
                          float* __restrict__ h, int n_out, int n_in, long long ldx,
                          long long ldh, int vec) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= n_out) return;
    PM G = pm_load(d), U = pm_load(d + 6);
    int t = blockIdx.y;
    const float* xt = x + t * ldx;
    float g = pk_warp_sum(pk_dot(xt, G, r, n_in, lane, vec));
    float u = pk_warp_sum(pk_dot(xt, U, r, n_in, lane, vec));
    if (lane == 0) h[t * ldh + r] = (g / (1.f + expf(-g))) * u;
}

// swiglu_bf16_k: gate/up of k experts in one launch, expert e = blockIdx.z.
__global__ void pk_swiglu_k(const float* __restrict__ x, const unsigned long long* __restrict__ d,
                            float* __restrict__ h, int k, int n_out, int n_in, int vec) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= n_out) return;
    int e = blockIdx.z;
    PM G = pm_load(d + 6 * e), U = pm_load(d + 6 * (k + e));
    float g = pk_warp_sum(pk_dot(x, G, r, n_in, lane, vec));
    float u = pk_warp_sum(pk_dot(x, U, r, n_in, lane, vec));
    if (lane == 0) h[(long long)e * n_out + r] = (g / (1.f + expf(-g))) * u;
}

// down_bf16_k: y[r] += sum_e w[e] * (h[e] . down_e[r]), experts summed in order in registers.
__global__ void pk_down_k(const float* __restrict__ h, const unsigned long long* __restrict__ d,
                          float* y, int k, int n_out, int n_in, int vec) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= n_out) return;
    const float* w = reinterpret_cast<const float*>(d + 18 * k);
    float total = 0.f;
    for (int e = 0; e < k; e++) {
        PM D = pm_load(d + 6 * (2 * k + e));
        float acc = pk_warp_sum(pk_dot(h + (long long)e * n_in, D, r, n_in, lane, vec));
        total += w[e] * acc;
    }
    if (lane == 0) y[r] += total;
}

// BF16 bits of a packed matrix into out [n_out, n_in] (the cuBLAS path's scratch); one thread
// per weight, grid-stride.
__global__ void pk_unpack(const unsigned char* nib, const unsigned char* sm, const int* ep,
                          const int* ec, const unsigned char* ev, unsigned int base,
                          unsigned short* out, int n_out, int n_in) {
    PM m = {nib, sm, ep, ec, ev, base};
    long long total = (long long)n_out * n_in;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < total;
         i += (long long)gridDim.x * blockDim.x) {
        long long r = i / n_in;
        int c = (int)(i - r * n_in);
        out[i] = (unsigned short)(__float_as_uint(pk_one(m, r, c, n_in)) >> 16);
    }
}

}  // extern "C"
"""


def gpu_layout(P: PackedMatrix):
    """The GPU layout's host arrays of a packed matrix (index nibbles of columns ``2j`` and
    ``2j + 1`` in byte ``j``; see :mod:`zipmoe_rt.kernels.cuda_packed_src`).

    Args:
        P: a :class:`~zipmoe_rt.models.packed.PackedMatrix` (CPU layout: byte ``j`` holds
            columns ``j`` and ``(in + 1) // 2 + j``).
    Returns:
        ``(nib uint8 [out, (in + 1) // 2], ep int32 [out + 1], ec int32 [n_esc],
        ev uint8 [n_esc])``.
    Raises:
        ValueError: more than 2^31 - 1 escapes (not representable in int32).
    """
    rows, cols = P.shape
    h = (cols + 1) // 2
    idx = np.zeros((rows, 2 * h), np.uint8)
    idx[:, :h] = P.nib & 15
    idx[:, h:cols] = P.nib[:, :cols - h] >> 4
    nib = idx[:, 0::2] | (idx[:, 1::2] << 4)
    if P.esc_ptr[-1] >= 1 << 31:
        raise ValueError(f"packed matrix {P.shape}: {int(P.esc_ptr[-1])} escapes exceed int32")
    return (np.ascontiguousarray(nib), P.esc_ptr.astype(np.int32),
            np.ascontiguousarray(P.esc_col, np.int32), np.ascontiguousarray(P.esc_val, np.uint8))
