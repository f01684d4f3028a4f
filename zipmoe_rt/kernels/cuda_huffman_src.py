"""CUDA C source of the parallel Huffman exponent-stream decoder of the GPU backend (glue:
:mod:`zipmoe_rt.backends.cuda_huffman`), compiled at run time with NVRTC through
``cupy.RawModule``. A plain string: importing this module imports no GPU library.

The container's streams (format/SPEC.md §5.3: canonical codes of at most 12 bits, LSB first,
4 streams per chunk) carry no start table, so a stream is cut into segments of ``B`` bits and
decoded by one thread per segment using the self-synchronisation of Huffman codes (Klein &
Wiseman 2003; Weißenberger & Schmidt, "Massively Parallel Huffman Decoding on GPUs", ICPP 2018):

1. ``hf_segments`` (first pass): each segment is decoded from its first bit, which may lie
   inside a codeword, up to the first codeword start at or past its end; its end bit and its
   symbol count are recorded.
2. ``hf_segments`` (synchronisation passes): each segment restarts at the end found for the
   segment before it (the first one of a stream starts at bit 0, exactly); a pass changes
   nothing once every start is the true codeword boundary, which a decoding that started off a
   boundary reaches within a few codewords. Pass ``j`` makes segment ``j`` of every stream
   exact, so the passes end.
3. the write pass: with the symbols before each segment (a prefix sum), every segment decodes
   its symbols again and writes them to their place; the first ``count`` symbols of a stream
   are kept, and the end of symbol ``count - 1`` is checked as the host decoder checks it. By
   default the staged multi-symbol kernel ``sd_decode_streams`` of
   :mod:`zipmoe_rt.kernels.cuda_segdec_src` does it; ``hf_write`` below is the one-symbol form.

Bits past a stream's end read as 0, as in the host decoder's bounds-checked loop.
"""
from __future__ import annotations

#: names of the kernels in :data:`SOURCE`.
KERNELS = ("hf_segments", "hf_write")

SOURCE = r"""
extern "C" {

// Bit reader over one stream of `size` bytes from bit `pos` (bits past the end read as 0).
struct BitReader {
    const unsigned char* s;
    long long size, next;
    unsigned long long buf;
    int have;
    __device__ void start(const unsigned char* src, long long sz, long long pos) {
        s = src; size = sz; next = pos >> 3; buf = 0; have = 0;
        fill();
        int drop = (int)(pos & 7);
        buf >>= drop;
        have -= drop;
    }
    __device__ __forceinline__ void fill() {
        while (have <= 56) {
            unsigned long long b = next < size ? (unsigned long long)s[next] : 0ull;
            buf |= b << have;
            have += 8;
            next++;
        }
    }
};

// Segment t's stream: the s with seg_first[s] <= t < seg_first[s + 1] (binary search over the
// n + 1 prefix sums of the streams' segment counts).
__device__ __forceinline__ int seg_stream(const long long* __restrict__ seg_first, int n,
                                          long long t) {
    int a = 0, b = n - 1;
    while (a < b) {
        int m = (a + b + 1) >> 1;
        if (seg_first[m] <= t) a = m; else b = m - 1;
    }
    return a;
}

// One segment per thread (segments of B bits; per stream s: s_src[s] byte offset in src,
// s_size[s] bytes, table tab[s]). Pass 0: decode from the segment's first bit lo while the bit
// position is below hi (the segment's end, or the stream's); start[t] = lo, end_new[t] = the
// position reached, cnt[t] = symbols. Later passes: the segment restarts at st = the end of
// segment t - 1 (end_old[t - 1]; 0 for a stream's first segment); if st moved, the new and the
// old decodings are walked in step (the one behind advances) until they meet at a codeword
// start, from which on they agree: the end stays and the count changes by the symbols before
// the meeting point; if they do not meet below hi, the new decoding's end and count are taken
// and changed = 1.
__global__ void hf_segments(const unsigned char* __restrict__ src,
                            const long long* __restrict__ s_src,
                            const long long* __restrict__ s_size, const int* __restrict__ tab,
                            const long long* __restrict__ seg_first, int n, long long B,
                            const unsigned char* __restrict__ len, long long* start,
                            const long long* __restrict__ end_old, long long* end_new,
                            int* cnt, int* changed, long long nseg, int pass0) {
    long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (t >= nseg) return;
    int q = seg_stream(seg_first, n, t);
    long long local = t - seg_first[q];
    const unsigned char* ln = len + (long long)tab[q] * 4096;
    const unsigned char* s = src + s_src[q];
    long long size = s_size[q], lo = local * B;
    long long h = lo + B < 8 * size ? lo + B : 8 * size;
    if (pass0) {
        long long pos = lo;
        BitReader r;
        r.start(s, size, pos);
        int c = 0;
        while (pos < h) {
            if (r.have < 12) r.fill();
            int l = ln[(unsigned int)(r.buf & 4095ull)];
            r.buf >>= l;
            r.have -= l;
            pos += l;
            c++;
        }
        start[t] = lo;
        end_new[t] = pos;
        cnt[t] = c;
        return;
    }
    long long a = local == 0 ? 0 : end_old[t - 1], b = start[t];
    if (a == b) { end_new[t] = end_old[t]; return; }
    start[t] = a;
    BitReader ra, rb;
    ra.start(s, size, a);
    rb.start(s, size, b);
    int ca = 0, cb = 0;
    while (a != b && a < h) {
        if (a < b) {
            if (ra.have < 12) ra.fill();
            int l = ln[(unsigned int)(ra.buf & 4095ull)];
            ra.buf >>= l; ra.have -= l; a += l; ca++;
        } else {
            if (rb.have < 12) rb.fill();
            int l = ln[(unsigned int)(rb.buf & 4095ull)];
            rb.buf >>= l; rb.have -= l; b += l; cb++;
        }
    }
    if (a == b) {                      // met: the rest of the old decoding stands
        end_new[t] = end_old[t];
        cnt[t] = cnt[t] - cb + ca;
    } else {
        end_new[t] = a;
        cnt[t] = ca;
        if (a != end_old[t]) *changed = 1;
    }
}

// Decode segment t's cnt[t] symbols from start[t] into out[o_base[s] + before + j] for
// before + j < o_count[s] (before: the symbols of the stream's earlier segments, from the
// inclusive prefix sums incl of cnt); the thread holding symbol o_count[s] - 1 checks its end
// bit: within the stream's 8 * size bits and in its last byte (status[s] = 3 otherwise).
__global__ void hf_write(const unsigned char* __restrict__ src,
                         const long long* __restrict__ s_src,
                         const long long* __restrict__ s_size, const int* __restrict__ tab,
                         const long long* __restrict__ seg_first, int n,
                         const unsigned char* __restrict__ sym,
                         const unsigned char* __restrict__ len,
                         const long long* __restrict__ start, const int* __restrict__ cnt,
                         const long long* __restrict__ incl,
                         const long long* __restrict__ o_base,
                         const long long* __restrict__ o_count, unsigned char* out,
                         int* status, long long nseg) {
    long long t = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (t >= nseg) return;
    int q = seg_stream(seg_first, n, t);
    long long f = seg_first[q];
    long long b = (incl[t] - cnt[t]) - (incl[f] - cnt[f]), want = o_count[q];
    if (b >= want) return;
    const unsigned char* sy = sym + (long long)tab[q] * 4096;
    const unsigned char* ln = len + (long long)tab[q] * 4096;
    long long size = s_size[q], pos = start[t];
    BitReader r;
    r.start(src + s_src[q], size, pos);
    unsigned char* o = out + o_base[q];
    int c = cnt[t];
    for (int j = 0; j < c && b + j < want; j++) {
        if (r.have < 12) r.fill();
        unsigned int idx = (unsigned int)(r.buf & 4095ull);
        int l = ln[idx];
        o[b + j] = sy[idx];
        r.buf >>= l;
        r.have -= l;
        pos += l;
        if (b + j == want - 1 && (pos > 8 * size || ((pos + 7) >> 3) != size)) status[q] = 3;
    }
}

}  // extern "C"
"""
