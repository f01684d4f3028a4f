"""CUDA C sources of the GPU backend (:mod:`zipmoe_rt.backends.cupy_cuda`), compiled at run
time with NVRTC through ``cupy.RawModule``. Plain strings: importing this module imports no
GPU library.

Conventions: activations are float32, weights BF16 as ``unsigned short`` bit patterns (CuPy
has no bfloat16; ``float bits = bf16 bits << 16`` widens exactly), accumulation in float32.
Strides (``ld*``) are in elements. Every kernel names the op of
:class:`~zipmoe_rt.backends.base.Backend` it implements; the math follows the same
transformers sources as the CPU kernels (:mod:`zipmoe_rt.kernels`).
"""
from __future__ import annotations

#: names of the kernels in :data:`SOURCE` (each looked up with ``RawModule.get_function``).
KERNELS = ("gemv_bf16", "swiglu_bf16", "swiglu_bf16_k", "down_bf16_k", "rmsnorm_rows",
           "rope_qk_cache", "attention", "route_topk", "merge_bf16", "merge_f16", "merge_f32",
           "huffman_streams")

SOURCE = r"""
extern "C" {

__device__ __forceinline__ float bf16f(unsigned int b) { return __uint_as_float(b << 16); }

__device__ __forceinline__ float warp_sum(float v) {
    for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
    return v;
}

// Partial dot product of one lane: x[0:n] . W_row[0:n] (BF16 bits). vec: 8 BF16 per 16-byte
// load (n % 8 == 0, row and x 16-byte aligned).
__device__ __forceinline__ float dot_bf16(const float* __restrict__ x,
                                          const unsigned short* __restrict__ w,
                                          int n, int lane, int vec) {
    float acc = 0.f;
    if (vec) {
        const uint4* w4 = reinterpret_cast<const uint4*>(w);
        const float4* x4 = reinterpret_cast<const float4*>(x);
        for (int i = lane; i < (n >> 3); i += 32) {
            uint4 q = w4[i];
            float4 a = x4[2 * i], b = x4[2 * i + 1];
            acc += a.x * __uint_as_float(q.x << 16) + a.y * __uint_as_float(q.x & 0xffff0000u)
                 + a.z * __uint_as_float(q.y << 16) + a.w * __uint_as_float(q.y & 0xffff0000u)
                 + b.x * __uint_as_float(q.z << 16) + b.y * __uint_as_float(q.z & 0xffff0000u)
                 + b.z * __uint_as_float(q.w << 16) + b.w * __uint_as_float(q.w & 0xffff0000u);
        }
    } else {
        for (int i = lane; i < n; i += 32) acc += x[i] * bf16f(w[i]);
    }
    return acc;
}

// Backend.linear / expert down projection: y[t, r] (+)= alpha * (x[t] . W[r]) + bias[r].
// One warp per output row r, blockIdx.y = token t.
__global__ void gemv_bf16(const float* __restrict__ x, const unsigned short* __restrict__ W,
                          const float* __restrict__ bias, float* __restrict__ y,
                          int n_out, int n_in, long long ldx, long long ldy, float alpha,
                          int has_bias, int accumulate, int vec) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= n_out) return;
    int t = blockIdx.y;
    float acc = warp_sum(dot_bf16(x + t * ldx, W + (long long)r * n_in, n_in, lane, vec));
    if (lane == 0) {
        float v = alpha * acc;
        if (has_bias) v += bias[r];
        float* yp = y + t * ldy + r;
        if (accumulate) *yp += v; else *yp = v;
    }
}

// Backend.swiglu: h[t, r] = silu(x[t] . gate[r]) * (x[t] . up[r]); one warp per row r.
__global__ void swiglu_bf16(const float* __restrict__ x, const unsigned short* __restrict__ G,
                            const unsigned short* __restrict__ U, float* __restrict__ h,
                            int n_out, int n_in, long long ldx, long long ldh, int vec) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= n_out) return;
    int t = blockIdx.y;
    const float* xt = x + t * ldx;
    float g = warp_sum(dot_bf16(xt, G + (long long)r * n_in, n_in, lane, vec));
    float u = warp_sum(dot_bf16(xt, U + (long long)r * n_in, n_in, lane, vec));
    if (lane == 0) h[t * ldh + r] = (g / (1.f + expf(-g))) * u;
}

// Backend.experts_token, gate/up of k experts in one launch: expert e = blockIdx.z; its
// weights at the device addresses ptr[e] (gate) and ptr[k + e] (up);
// h[e, r] = silu(x . gate_e[r]) * (x . up_e[r]). One warp per row r.
__global__ void swiglu_bf16_k(const float* __restrict__ x,
                              const unsigned long long* __restrict__ ptr, float* __restrict__ h,
                              int k, int n_out, int n_in, int vec) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= n_out) return;
    int e = blockIdx.z;
    const unsigned short* G = reinterpret_cast<const unsigned short*>(ptr[e]);
    const unsigned short* U = reinterpret_cast<const unsigned short*>(ptr[k + e]);
    float g = warp_sum(dot_bf16(x, G + (long long)r * n_in, n_in, lane, vec));
    float u = warp_sum(dot_bf16(x, U + (long long)r * n_in, n_in, lane, vec));
    if (lane == 0) h[(long long)e * n_out + r] = (g / (1.f + expf(-g))) * u;
}

// Backend.experts_token, down projections of k experts in one launch:
// y[r] += sum_e w[e] * (h[e] . down_e[r]), the experts summed in order e = 0..k-1 in registers;
// down_e at ptr[2k + e], the k float32 weights w right after the 3k addresses.
__global__ void down_bf16_k(const float* __restrict__ h,
                            const unsigned long long* __restrict__ ptr, float* y, int k,
                            int n_out, int n_in, int vec) {
    int r = blockIdx.x * (blockDim.x >> 5) + (threadIdx.x >> 5);
    int lane = threadIdx.x & 31;
    if (r >= n_out) return;
    const float* w = reinterpret_cast<const float*>(ptr + 3 * k);
    float total = 0.f;
    for (int e = 0; e < k; e++) {
        const unsigned short* D = reinterpret_cast<const unsigned short*>(ptr[2 * k + e]);
        float acc = warp_sum(dot_bf16(h + (long long)e * n_in, D + (long long)r * n_in, n_in,
                                      lane, vec));
        total += w[e] * acc;
    }
    if (lane == 0) y[r] += total;
}

__device__ float block_sum(float v, float* sh) {
    int lane = threadIdx.x & 31, wid = threadIdx.x >> 5, nw = (blockDim.x + 31) >> 5;
    v = warp_sum(v);
    if (lane == 0) sh[wid] = v;
    __syncthreads();
    float s = 0.f;
    for (int i = 0; i < nw; i++) s += sh[i];
    __syncthreads();
    return s;
}

// Backend.rmsnorm and the q/k norms of Backend.rope_qk_cache: row r = t * G + g of n elements
// at x + t * ldx + g * n; y[row] = w * (x / sqrt(mean(x^2) + eps)). y may alias x.
__global__ void rmsnorm_rows(const float* x, float* y, const float* __restrict__ w, int n,
                             int G, long long ldx, long long ldy, float eps) {
    __shared__ float sh[32];
    int t = blockIdx.x / G, g = blockIdx.x % G;
    const float* xr = x + t * ldx + (long long)g * n;
    float* yr = y + t * ldy + (long long)g * n;
    float s = 0.f;
    for (int i = threadIdx.x; i < n; i += blockDim.x) { float v = xr[i]; s += v * v; }
    s = block_sum(s, sh);
    float d = sqrtf(s / (float)n + eps);
    for (int i = threadIdx.x; i < n; i += blockDim.x) yr[i] = w[i] * (xr[i] / d);
}

// Backend.rope_qk_cache after the norms/clip: RoPE (x * cos + rotate_half(x) * sin) of the
// q and k heads of token t = blockIdx.x, head blockIdx.y in [0, nq + nkv), pairs i and
// i + half for i < half (half = width of the cos/sin tables; 2 * half < hd: partial rotary,
// the rest passes unchanged); k and v of the token to kc/vc[kv head, pos0 + t, :].
__global__ void rope_qk_cache(float* qkv, const float* __restrict__ cs,
                              const float* __restrict__ sn, float* kc, float* vc, int nq,
                              int nkv, int hd, long long ld, long long cap, int pos0,
                              int half) {
    int t = blockIdx.x, h = blockIdx.y;
    float* row = qkv + t * ld;
    float* xh = row + (long long)h * hd;
    const float* c = cs + (long long)t * half;
    const float* s = sn + (long long)t * half;
    int kh = h - nq;
    float* kd = kc + ((long long)(kh < 0 ? 0 : kh) * cap + pos0 + t) * hd;
    for (int i = threadIdx.x; i < half; i += blockDim.x) {
        float x1 = xh[i], x2 = xh[i + half];
        float o1 = x1 * c[i] - x2 * s[i];
        float o2 = x2 * c[i] + x1 * s[i];
        xh[i] = o1;
        xh[i + half] = o2;
        if (kh >= 0) { kd[i] = o1; kd[i + half] = o2; }
    }
    if (kh >= 0)                 // partial rotary: dimensions 2 * half .. hd pass unrotated
        for (int i = 2 * half + threadIdx.x; i < hd; i += blockDim.x) kd[i] = xh[i];
    if (kh >= 0) {
        const float* v = row + (long long)(nq + nkv) * hd + (long long)kh * hd;
        float* vd = vc + ((long long)kh * cap + pos0 + t) * hd;
        for (int i = threadIdx.x; i < hd; i += blockDim.x) vd[i] = v[i];
    }
}

#define ATT_MAXE 20  /* head_dim <= 640 (MLA: kv_lora_rank 512 + rope 64): 20 elements per lane */
#define NEG_INF __uint_as_float(0xff800000u)

// Backend.attention: query head h = blockIdx.y of token t = blockIdx.x attends to keys
// lo..p of kv head h / (nq / nkv); each warp of the block takes every NW-th key with an
// online softmax, the warps' partial (max, sum, acc) are combined at the end.
__global__ void attention(const float* __restrict__ qkv, const float* __restrict__ kc,
                          const float* __restrict__ vc, float* __restrict__ out, int nq,
                          int nkv, int hd, long long ld, long long cap, int pos0, int window,
                          float scale, long long ldo) {
    extern __shared__ float sh[];
    int t = blockIdx.x, h = blockIdx.y;
    int warp = threadIdx.x >> 5, lane = threadIdx.x & 31, NW = blockDim.x >> 5;
    int p = pos0 + t;
    int lo = window > 0 ? max(0, p - window + 1) : 0;
    int kh = h / (nq / nkv);
    const float* q = qkv + t * ld + (long long)h * hd;
    const float* K = kc + (long long)kh * cap * hd;
    const float* V = vc + (long long)kh * cap * hd;
    float qv[ATT_MAXE], acc[ATT_MAXE];
#pragma unroll
    for (int e = 0; e < ATT_MAXE; e++) {
        int i = lane + 32 * e;
        qv[e] = i < hd ? q[i] : 0.f;
        acc[e] = 0.f;
    }
    float m = NEG_INF, l = 0.f;
    for (int j = lo + warp; j <= p; j += NW) {
        const float* kj = K + (long long)j * hd;
        const float* vj = V + (long long)j * hd;
        float s = 0.f;
#pragma unroll
        for (int e = 0; e < ATT_MAXE; e++) {
            int i = lane + 32 * e;
            if (i < hd) s += qv[e] * kj[i];
        }
        s = warp_sum(s) * scale;
        float mn = fmaxf(m, s);
        float corr = expf(m - mn);
        float pj = expf(s - mn);
        l = l * corr + pj;
#pragma unroll
        for (int e = 0; e < ATT_MAXE; e++) {
            int i = lane + 32 * e;
            if (i < hd) acc[e] = acc[e] * corr + pj * vj[i];
        }
        m = mn;
    }
    float* sacc = sh;
    float* sm = sh + NW * hd;
    float* sl = sm + NW;
#pragma unroll
    for (int e = 0; e < ATT_MAXE; e++) {
        int i = lane + 32 * e;
        if (i < hd) sacc[warp * hd + i] = acc[e];
    }
    if (lane == 0) { sm[warp] = m; sl[warp] = l; }
    __syncthreads();
    float M = NEG_INF;
    for (int w = 0; w < NW; w++) M = fmaxf(M, sm[w]);
    float L = 0.f;
    for (int w = 0; w < NW; w++) if (sm[w] > NEG_INF) L += sl[w] * expf(sm[w] - M);
    for (int i = threadIdx.x; i < hd; i += blockDim.x) {
        float a = 0.f;
        for (int w = 0; w < NW; w++) if (sm[w] > NEG_INF) a += sacc[w * hd + i] * expf(sm[w] - M);
        out[t * ldo + (long long)h * hd + i] = a / L;
    }
}

// Backend.route: one thread per token: float32 softmax over E experts, the k largest in
// descending order (lowest index first on ties), renormalised by their sum when renorm.
// p: float32 [T, E] scratch.
__global__ void route_topk(const float* __restrict__ logits, float* p, long long* idx,
                           float* w, int T, int E, int k, int renorm) {
    int t = blockIdx.x * blockDim.x + threadIdx.x;
    if (t >= T) return;
    const float* lg = logits + (long long)t * E;
    float* pt = p + (long long)t * E;
    float m = lg[0];
    for (int e = 1; e < E; e++) if (lg[e] > m) m = lg[e];
    float tot = 0.f;
    for (int e = 0; e < E; e++) { pt[e] = expf(lg[e] - m); tot += pt[e]; }
    for (int e = 0; e < E; e++) pt[e] = pt[e] / tot;
    float s = 0.f;
    for (int j = 0; j < k; j++) {
        int best = -1;
        float bv = -1.f;
        for (int e = 0; e < E; e++) if (pt[e] > bv) { bv = pt[e]; best = e; }
        idx[(long long)t * k + j] = best;
        w[(long long)t * k + j] = bv;
        s += bv;
        pt[best] = -2.f;
    }
    if (renorm) for (int j = 0; j < k; j++) w[(long long)t * k + j] /= s;
}

// Bit-plane merges (format/SPEC.md 5.1), one word per thread (grid-stride).
__global__ void merge_bf16(const unsigned char* __restrict__ ex,
                           const unsigned char* __restrict__ sm, unsigned short* out,
                           long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned int s = sm[i];
        out[i] = (unsigned short)(((s & 0x80u) << 8) | ((unsigned int)ex[i] << 7) | (s & 0x7Fu));
    }
}

__global__ void merge_f16(const unsigned char* __restrict__ ex,
                          const unsigned char* __restrict__ sm, unsigned short* out,
                          long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned int v = (unsigned int)sm[2 * i] | ((unsigned int)sm[2 * i + 1] << 8);
        out[i] = (unsigned short)(((v & 0x400u) << 5) | ((unsigned int)ex[i] << 10)
                                  | (v & 0x3FFu));
    }
}

__global__ void merge_f32(const unsigned char* __restrict__ ex,
                          const unsigned char* __restrict__ sm, unsigned int* out,
                          long long n) {
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n;
         i += (long long)gridDim.x * blockDim.x) {
        unsigned int v = (unsigned int)sm[3 * i] | ((unsigned int)sm[3 * i + 1] << 8)
                       | ((unsigned int)sm[3 * i + 2] << 16);
        out[i] = ((v & 0x800000u) << 8) | ((unsigned int)ex[i] << 23) | (v & 0x7FFFFFu);
    }
}

// Huffman exponent streams (format/SPEC.md 5.3), one thread per stream: stream i is
// src[s_start[i] : s_start[i] + s_size[i]] and codes o_count[i] exponents written from
// out[o_start[i]]; tab[i] selects the 4096-entry tables (sym: first code's symbol, len: its
// bits) indexed by the next 12 bits, LSB first. status[i] = 0, or 3 when the stream does not
// decode to exactly its exponents within exactly its bytes (bits past the end read as 0, as
// the host decoder's bounds-checked loop).
__global__ void huffman_streams(const unsigned char* __restrict__ src,
                                const long long* __restrict__ s_start,
                                const long long* __restrict__ s_size,
                                const long long* __restrict__ o_start,
                                const long long* __restrict__ o_count,
                                const int* __restrict__ tab,
                                const unsigned char* __restrict__ sym,
                                const unsigned char* __restrict__ len,
                                unsigned char* out, int* status, int nstreams) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nstreams) return;
    const unsigned char* s = src + s_start[i];
    long long size = s_size[i], nbits = size * 8, cnt = o_count[i];
    unsigned char* o = out + o_start[i];
    const unsigned char* sy = sym + (long long)tab[i] * 4096;
    const unsigned char* ln = len + (long long)tab[i] * 4096;
    unsigned long long buf = 0;
    int have = 0;
    long long next = 0, bitpos = 0;
    for (long long k = 0; k < cnt; k++) {
        while (have <= 56 && next < size) {
            buf |= (unsigned long long)s[next++] << have;
            have += 8;
        }
        unsigned int idx = (unsigned int)(buf & 4095ull);
        int l = ln[idx];
        o[k] = sy[idx];
        buf >>= l;
        have -= l;
        bitpos += l;
        if (bitpos > nbits) { status[i] = 3; return; }
    }
    status[i] = ((bitpos + 7) >> 3) == size ? 0 : 3;
}

}  // extern "C"
"""
