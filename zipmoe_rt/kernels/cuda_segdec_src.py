"""CUDA C source of the staged segment decoder: Huffman exponent streams (format/SPEC.md §5.3:
canonical codes of at most 12 bits, LSB first) decoded from known symbol-aligned start bits,
several symbols per table lookup, staged in shared memory and written coalesced, fused with the
sign+mantissa plane (§5.1) into BF16 words or written as exponent bytes. Compiled at run time
with NVRTC through ``cupy.RawModule`` (glue: :mod:`zipmoe_rt.backends.cuda_segdec`). A plain
string: importing this module imports no GPU library.

One thread per *segment* (a run of consecutive symbols of one stream whose first bit is known).
A block of ``SD_T`` threads works in rounds of ``SD_ROUND`` symbols per segment:

1. every thread decodes exactly the next ``SD_ROUND`` symbols of its segment (fewer in its last
   round) into its row of a shared-memory staging area: while at least ``SD_MAXK`` symbols are
   left, one lookup of the next 12 bits in a *multi-symbol table* (4096 x uint64 per code: up to
   ``SD_MAXK`` whole codes in bits 0-31, their count in bits 48-51, their bits in bits 52-55, the
   layout of :func:`zmoe.huffman.decode_table`) gives several symbols at once; the last symbols
   of a round go one lookup each through the single-symbol table (``symbol | length << 8``), so
   a round ends exactly on the boundary of its last code and the next round (or the end check)
   starts at the true bit. The stream is read as aligned 32-bit words; bytes at or past the
   stream's end byte read as 0 (the host decoder's rule).
2. after a barrier, each warp takes the staged segments of the block in turn and its 32 lanes
   write 32 consecutive outputs at a time (coalesced), merging each exponent with its
   sign+mantissa byte: ``(sm >> 7) << 15 | e << 7 | sm & 0x7F``.

Kernels:

- ``sd_multi_tables``: the multi-symbol tables from the single-symbol tables (one thread per
  entry).
- ``sd_decode_runs``: the engine's expert decode (:mod:`zipmoe_rt.engine.gpu_meta`: per segment
  of ``seg`` symbols its first bit, the run holding it found by a binary search over the runs),
  merged into BF16 words.
- ``sd_multi_batch`` / ``sd_decode_batch``: the same for a batch of experts in one launch each
  (the misses of one MoE layer), each expert's arrays found through a descriptor row
  (:data:`BATCH_FIELDS`); a thread finds its expert by a binary search over the rows' first
  segments, then its run as ``sd_decode_runs`` does. Same words as one launch per expert.
- ``sd_decode_batch_wait``: ``sd_decode_batch`` launched before the batch's copies have landed:
  after each expert's copy the copy stream writes that copy's sequence number into a 4-byte
  *landed* word on the device (copies of one stream land in order), and each block first waits
  (thread 0 polls the word with ``__nanosleep`` between reads, then a fence and a barrier) until
  the word has reached the copy of the last copied expert it reads, so an expert is decoded
  while the next ones still cross PCIe. Experts that were copied are decoded with the
  single-symbol tables (their multi-symbol tables would need every table of the batch on the
  device first); the others as ``sd_decode_batch``. Same words.
- ``sd_decode_streams``: the write pass of the self-synchronising decoder of
  :mod:`zipmoe_rt.kernels.cuda_huffman_src` (segments of ``B`` bits, their exact start bits and
  symbol counts found by its synchronisation passes), exponent bytes out, each stream's end
  checked as the host decoder checks it.

Compile-time options (``-D``): ``SD_T`` threads per block (multiple of 32), ``SD_ROUND``
symbols per round (multiple of 4), ``SD_SMEM_TAB`` 1 to copy the block's multi-symbol table
into shared memory (segments of another table read theirs from global memory).
"""
from __future__ import annotations

#: names of the kernels in :data:`SOURCE`.
KERNELS = ("sd_multi_tables", "sd_decode_runs", "sd_decode_streams", "sd_multi_batch",
           "sd_decode_batch", "sd_decode_batch_wait")
#: int64 fields per expert of a batch descriptor (``sd_multi_batch``, ``sd_decode_batch``):
#: first segment, exponent region, SM region, runs, run count, segment bits, single-symbol
#: tables, first table, output words (addresses as integers), and the sequence number of the
#: expert's copy (``sd_decode_batch_wait``; -1: not copied, its bytes already on the device); a
#: last row holds the totals (segments, tables) in fields 0 and 7
BATCH_FIELDS = 10
#: sequence numbers of the copies ``sd_decode_batch_wait`` waits for are taken modulo
#: ``SEQ_MASK + 1``; a block is ready once ``(landed - need) & SEQ_MASK <= SEQ_MASK / 2``
SEQ_MASK = (1 << 16) - 1
#: ``sd_decode_batch_wait`` stops the kernel with ``__trap()`` (a CUDA error on the host's next
#: call, not a hang) after this many polls of the landed word (each after a sleep of up to
#: ~4 µs: half a minute or more; a batch's copies take milliseconds)
WAIT_POLLS = 1 << 24
#: symbols per multi-symbol table entry (at most 4: one staged word per lookup)
MAXK = 4

SOURCE = r"""
#ifndef SD_T
#define SD_T 128
#endif
#ifndef SD_ROUND
#define SD_ROUND 256
#endif
#ifndef SD_SMEM_TAB
#define SD_SMEM_TAB 0
#endif
#define SD_MAXK 4
#define SD_ROW (SD_ROUND / 4 + 1)     /* staged words per thread: odd, no bank conflicts */
#define SD_WARPS (SD_T / 32)

typedef unsigned long long u64;
typedef unsigned int u32;

// Bit reader over one stream, from aligned 32-bit words; bytes at or past `endb` read as 0.
struct SdReader {
    const u32* w;
    long long endb, nw;
    u64 buf;
    int have;
    __device__ __forceinline__ u32 word(long long i) const {
        long long b = 4 * i;
        if (b + 4 <= endb) return __ldg(w + i);
        if (b >= endb) return 0u;
        return __ldg(w + i) & ((1u << (8 * (int)(endb - b))) - 1u);
    }
    __device__ __forceinline__ void start(const u32* base, long long end, long long bit) {
        w = base;
        endb = end;
        nw = bit >> 5;
        u64 lo = word(nw), hi = word(nw + 1);
        nw += 2;
        int off = (int)(bit & 31);
        buf = (lo | (hi << 32)) >> off;
        have = 64 - off;
    }
    __device__ __forceinline__ void refill() {
        if (have <= 32) {
            buf |= (u64)word(nw) << have;
            nw++;
            have += 32;
        }
    }
    // bits consumed from the aligned base
    __device__ __forceinline__ long long pos() const { return 32 * nw - have; }
};

#if SD_SMEM_TAB
#define SD_MT(p) (*(p))
#else
#define SD_MT(p) __ldg(p)
#endif

// Decode exactly `need` symbols (need >= 0) into `row` (4 per word, the first in the low byte).
__device__ __forceinline__ void sd_round(SdReader& r, const u64* mt,
                                         const unsigned short* __restrict__ st, int need,
                                         u32* row) {
    u64 acc = 0ull;
    int na = 0, got = 0, wq = 0;
    while (mt != 0 && need - got >= SD_MAXK) {      // mt 0: single-symbol lookups only
        r.refill();
        u64 e = SD_MT(mt + (u32)(r.buf & 4095ull));
        int k = (int)(e >> 48) & 15, used = (int)(e >> 52) & 15;
        if (k == 0) break;                       // not a complete code (never for a valid one)
        r.buf >>= used;
        r.have -= used;
        acc |= (e & 0xFFFFFFFFull) << (8 * na);
        na += k;
        got += k;
        if (na >= 4) {
            row[wq++] = (u32)acc;
            acc >>= 32;
            na -= 4;
        }
    }
    while (got < need) {
        r.refill();
        u32 e = __ldg(st + (u32)(r.buf & 4095ull));
        int ln = (int)(e >> 8);
        if (ln == 0) break;
        r.buf >>= ln;
        r.have -= ln;
        acc |= (u64)(e & 255u) << (8 * na);
        na++;
        got++;
        if (na == 4) {
            row[wq++] = (u32)acc;
            acc = 0ull;
            na = 0;
        }
    }
    if (na) row[wq] = (u32)acc;
}

// The rounds of a staged decode, called by every thread of the block: in round q this thread
// decodes its next min(SD_ROUND, cnt - q * SD_ROUND) symbols (none once cnt is reached) into
// its row of the staging area `rows`; after a barrier each warp takes the block's staged
// segments in turn and its 32 lanes write 32 consecutive outputs at a time, from o + q *
// SD_ROUND: BF16 words with `merge` (o unsigned short*, each exponent merged with its
// sign+mantissa byte from p + q * SD_ROUND), else the exponent bytes (o unsigned char*).
// s_o, s_p, s_n: shared arrays of SD_T entries.
__device__ __forceinline__ void sd_stage(SdReader& rd, const u64* mt,
                                         const unsigned short* __restrict__ st, int cnt,
                                         int rounds, void* o, const unsigned char* p, bool merge,
                                         u32* rows, void** s_o, const unsigned char** s_p,
                                         int* s_n) {
    int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
    u32* row = rows + tid * SD_ROW;
    int esz = merge ? 2 : 1;
    for (int q = 0; q < rounds; q++) {
        int need = min(SD_ROUND, cnt - q * SD_ROUND);
        if (need < 0) need = 0;
        if (need) sd_round(rd, mt, st, need, row);
        s_n[tid] = need;
        s_o[tid] = (unsigned char*)o + (long long)esz * q * SD_ROUND;
        s_p[tid] = p ? p + (long long)q * SD_ROUND : p;
        __syncthreads();
        for (int s = warp; s < SD_T; s += SD_WARPS) {
            int n = s_n[s];
            const unsigned char* eb = (const unsigned char*)(rows + s * SD_ROW);
            if (merge) {
                unsigned short* ow = (unsigned short*)s_o[s];
                const unsigned char* ps = s_p[s];
                for (int k = lane; k < n; k += 32) {
                    u32 b = ps[k], e = eb[k];
                    ow[k] = (unsigned short)(((b >> 7) << 15) | (e << 7) | (b & 0x7fu));
                }
            } else {
                unsigned char* ob = (unsigned char*)s_o[s];
                for (int k = lane; k < n; k += 32) ob[k] = eb[k];
            }
        }
        __syncthreads();
    }
}

__device__ __forceinline__ int sd_find_run(const int* __restrict__ runs, int nruns, int j) {
    int lo = 0, hi = nruns - 1;                 // the last run whose first segment <= j
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (runs[6 * mid] <= j) lo = mid; else hi = mid - 1;
    }
    return lo;
}

extern "C" {

// multi[i] for i < ntab * 4096: the whole codes (up to SD_MAXK) at the start of the 12-bit
// window i % 4096 of table i / 4096 (tabs: symbol | length << 8 of the first code).
__global__ void sd_multi_tables(const unsigned short* __restrict__ tabs, u64* __restrict__ multi,
                                int ntab) {
    int i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= ntab * 4096) return;
    const unsigned short* t = tabs + (i & ~4095);
    int idx = i & 4095;
    u64 v = 0ull;
    int k = 0, used = 0;
    while (k < SD_MAXK) {
        u32 e = t[(idx >> used) & 4095];
        int ln = (int)(e >> 8);
        if (ln == 0 || used + ln > 12) break;
        v |= (u64)(e & 255u) << (8 * k);
        k++;
        used += ln;
    }
    multi[i] = v | ((u64)k << 48) | ((u64)used << 52);
}

// The engine's expert decode. Segment j (< nseg) belongs to the last run r with
// runs[r][0] <= j; runs[r] = (first segment, end byte of its stream in exp, first output word,
// first SM byte, symbols, table). It holds min(seg, symbols - (j - first) * seg) symbols from
// bit bits[j] of exp, written as BF16 words to out.
__global__ void __launch_bounds__(SD_T) sd_decode_runs(
        const unsigned char* __restrict__ exp, const unsigned char* __restrict__ sm,
        const int* __restrict__ runs, int nruns, const int* __restrict__ bits,
        const unsigned short* __restrict__ tabs, const u64* __restrict__ multi, int seg,
        unsigned short* __restrict__ out, int nseg) {
    __shared__ u32 rows[SD_T * SD_ROW];
    __shared__ void* s_o[SD_T];
    __shared__ const unsigned char* s_p[SD_T];
    __shared__ int s_n[SD_T];
#if SD_SMEM_TAB
    __shared__ u64 s_tab[4096];
    int tab0 = runs[6 * sd_find_run(runs, nruns, blockIdx.x * SD_T) + 5];
    for (int i = threadIdx.x; i < 4096; i += SD_T) s_tab[i] = __ldg(multi + 4096LL * tab0 + i);
    __syncthreads();
#endif
    int tid = threadIdx.x;
    int j = blockIdx.x * SD_T + tid;
    size_t mis = (size_t)exp & 3;
    const u32* base = (const u32*)(exp - mis);
    int cnt = 0;
    long long w0 = 0, s0 = 0;
    SdReader rd;
    const u64* mt = multi;
    const unsigned short* st = tabs;
    if (j < nseg) {
        const int* r = runs + 6 * sd_find_run(runs, nruns, j);
        long long k0 = (long long)(j - r[0]) * seg;
        cnt = (int)min((long long)seg, (long long)r[4] - k0);
        w0 = r[2] + k0;
        s0 = r[3] + k0;
#if SD_SMEM_TAB
        mt = r[5] == tab0 ? (const u64*)s_tab : multi + 4096LL * r[5];
#else
        mt = multi + 4096LL * r[5];
#endif
        st = tabs + 4096LL * r[5];
        rd.start(base, (long long)r[1] + (long long)mis, (long long)bits[j] + 8LL * (long long)mis);
    }
    sd_stage(rd, mt, st, cnt, (seg + SD_ROUND - 1) / SD_ROUND, out + w0, sm + s0, true, rows,
             s_o, s_p, s_n);
}

// The write pass of the self-synchronising stream decoder (cuda_huffman_src.py): segment t
// (< nseg) of stream q = sq[t] starts exactly at bit start[t] of its stream and holds cnt[t]
// symbols, before[t] of the stream's symbols lie in its earlier segments; the first
// o_count[q] symbols of the stream go to out[o_base[q] + ...] as bytes. The segment holding
// symbol o_count[q] - 1 checks where that symbol ends: within the stream's 8 * size bits and in
// its last byte (status[q] = 3 otherwise). rounds: ceil(max cnt / SD_ROUND).
__global__ void __launch_bounds__(SD_T) sd_decode_streams(
        const unsigned char* __restrict__ src, const long long* __restrict__ s_src,
        const long long* __restrict__ s_size, const int* __restrict__ tab,
        const int* __restrict__ sq, const long long* __restrict__ start,
        const int* __restrict__ cnt_in, const long long* __restrict__ before,
        const long long* __restrict__ o_base, const long long* __restrict__ o_count,
        const unsigned short* __restrict__ tabs, const u64* __restrict__ multi,
        unsigned char* __restrict__ out, int* __restrict__ status, long long nseg, int rounds) {
    __shared__ u32 rows[SD_T * SD_ROW];
    __shared__ void* s_o[SD_T];
    __shared__ const unsigned char* s_p[SD_T];
    __shared__ int s_n[SD_T];
    int tid = threadIdx.x;
    long long t = blockIdx.x * (long long)SD_T + tid;
    int cnt = 0, q = 0;
    long long w0 = 0, size = 0, off = 0;
    bool check = false;
    SdReader rd;
    const u64* mt = multi;
    const unsigned short* st = tabs;
    if (t < nseg) {
        q = sq[t];
        long long b = before[t], want = o_count[q];
        if (b < want) {
            long long c = cnt_in[t];
            if (b + c >= want) {
                c = want - b;
                check = true;
            }
            cnt = (int)c;
            w0 = o_base[q] + b;
            size = s_size[q];
            const unsigned char* s = src + s_src[q];
            size_t mis = (size_t)s & 3;
            off = 8LL * (long long)mis;
            mt = multi + 4096LL * tab[q];
            st = tabs + 4096LL * tab[q];
            rd.start((const u32*)(s - mis), size + (long long)mis, start[t] + off);
        }
    }
    sd_stage(rd, mt, st, cnt, rounds, out + w0, 0, false, rows, s_o, s_p, s_n);
    if (check && cnt > 0) {
        long long pos = rd.pos() - off;
        if (pos > 8 * size || ((pos + 7) >> 3) != size) status[q] = 3;
    }
}

// Row of the batch descriptor holding item j (rows sorted by `field`): the last e < n with
// desc[e][field] <= j.
__device__ __forceinline__ int sd_find_row(const long long* __restrict__ desc, int n, int field,
                                           long long j) {
    int lo = 0, hi = n - 1;
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (desc[10 * mid + field] <= j) lo = mid; else hi = mid - 1;
    }
    return lo;
}

// The multi-symbol tables of a batch: entry i < desc[n][7] * 4096 of `multi` from table
// i / 4096 - desc[e][7] of expert e's single-symbol tables (desc[e][6]).
__global__ void sd_multi_batch(const long long* __restrict__ desc, int n, u64* __restrict__ multi) {
    long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
    if (i >= desc[10 * n + 7] * 4096LL) return;
    int e = sd_find_row(desc, n, 7, i >> 12);
    const unsigned short* t = (const unsigned short*)desc[10 * e + 6] +
                              4096LL * ((i >> 12) - desc[10 * e + 7]);
    int idx = (int)(i & 4095);
    u64 v = 0ull;
    int k = 0, used = 0;
    while (k < SD_MAXK) {
        u32 x = t[(idx >> used) & 4095];
        int ln = (int)(x >> 8);
        if (ln == 0 || used + ln > 12) break;
        v |= (u64)(x & 255u) << (8 * k);
        k++;
        used += ln;
    }
    multi[i] = v | ((u64)k << 48) | ((u64)used << 52);
}

// The segment of thread blockIdx.x * SD_T + threadIdx.x of a batch (global segment j <
// desc[n][0] is segment j - desc[e][0] of expert e, the last row with desc[e][0] <= j), decoded
// from that expert's regions, runs, bits and tables (multi: sd_multi_batch's output) into its
// output words; with `single_if_copied`, an expert copied in the batch (field 9 >= 0) with the
// single-symbol tables only.
__device__ __forceinline__ void sd_batch_segment(const long long* __restrict__ desc, int n,
                                                 const u64* __restrict__ multi, int seg,
                                                 bool single_if_copied) {
    __shared__ u32 rows[SD_T * SD_ROW];
    __shared__ void* s_o[SD_T];
    __shared__ const unsigned char* s_p[SD_T];
    __shared__ int s_n[SD_T];
    long long j = blockIdx.x * (long long)SD_T + threadIdx.x;
    int cnt = 0;
    unsigned short* o0 = 0;
    const unsigned char* p0 = 0;
    SdReader rd;
    const u64* mt = multi;
    const unsigned short* st = 0;
    if (j < desc[10 * n]) {
        const long long* d = desc + 10 * sd_find_row(desc, n, 0, j);
        const unsigned char* exp = (const unsigned char*)d[1];
        const int* runs = (const int*)d[3];
        int jl = (int)(j - d[0]);
        const int* r = runs + 6 * sd_find_run(runs, (int)d[4], jl);
        long long k0 = (long long)(jl - r[0]) * seg;
        cnt = (int)min((long long)seg, (long long)r[4] - k0);
        o0 = (unsigned short*)d[8] + r[2] + k0;
        p0 = (const unsigned char*)d[2] + r[3] + k0;
        mt = single_if_copied && d[9] >= 0 ? (const u64*)0 : multi + 4096LL * (d[7] + r[5]);
        st = (const unsigned short*)d[6] + 4096LL * r[5];
        size_t mis = (size_t)exp & 3;
        rd.start((const u32*)(exp - mis), (long long)r[1] + (long long)mis,
                 (long long)((const int*)d[5])[jl] + 8LL * (long long)mis);
    }
    sd_stage(rd, mt, st, cnt, (seg + SD_ROUND - 1) / SD_ROUND, o0, p0, true, rows, s_o, s_p,
             s_n);
}

// sd_decode_runs over a batch of experts, every expert's bytes already on the device.
__global__ void __launch_bounds__(SD_T) sd_decode_batch(
        const long long* __restrict__ desc, int n, const u64* __restrict__ multi, int seg) {
    sd_batch_segment(desc, n, multi, seg, false);
}

// sd_decode_batch for a batch whose copies may still be in flight (module docstring): thread 0
// of each block finds the last copied expert at or before the block's last segment (field 9 >=
// 0: its copy's sequence number) and polls `landed` until that copy has landed (modulo
// SEQ_MASK + 1); copied experts decode with the single-symbol tables only.
__global__ void __launch_bounds__(SD_T) sd_decode_batch_wait(
        const long long* __restrict__ desc, int n, const u64* __restrict__ multi, int seg,
        const volatile unsigned int* landed, unsigned int mask, long long polls) {
    if (threadIdx.x == 0) {
        long long last = min((long long)(blockIdx.x + 1) * SD_T, desc[10 * n]) - 1;
        long long need = -1;
        for (int e = sd_find_row(desc, n, 0, last); e >= 0; e--)
            if (desc[10 * e + 9] >= 0) { need = desc[10 * e + 9]; break; }
        if (need >= 0) {
            long long it = 0;
            while (((*landed - (unsigned int)need) & mask) > (mask >> 1)) {
#if __CUDA_ARCH__ >= 700
                __nanosleep(2000);
#endif
                if (++it > polls) __trap();
            }
        }
        __threadfence();
    }
    __syncthreads();
    sd_batch_segment(desc, n, multi, seg, true);
}

}  // extern "C"
"""
