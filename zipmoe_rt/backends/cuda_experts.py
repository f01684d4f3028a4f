"""GPU side of the budgeted expert path (:mod:`zipmoe_rt.engine.gpu_engine`): pinned host
memory, CUDA streams and events, asynchronous host-to-device copies and the segment decode
kernel that rebuilds an expert's BF16 words from its compressed regions on the GPU.

The decode follows format/SPEC.md §5.1 (plane merge) and §5.3 (Huffman streams, LSB first,
12-bit windows): one thread per segment of :data:`~zipmoe_rt.engine.gpu_meta.SEGMENT` symbols
of a stream (its run found by a binary search over the expert's runs), starting at the bit the
segment table gives (:func:`~zipmoe_rt.engine.gpu_meta.build_meta`), writes
``(sm >> 7) << 15 | e << 7 | sm & 0x7F`` for each symbol. It runs the staged multi-symbol
kernel of :mod:`~zipmoe_rt.backends.cuda_segdec`; ``zx_decode_segments`` below (one symbol per
lookup, one word per thread and store) is kept for comparison (:data:`STAGED`). Its host twin is
:func:`zipmoe_rt.kernels.gpu_segments.decode_segments`. Imported only on ``device="cuda"``.
"""
from __future__ import annotations

import numpy as np

import cupy as cp

from . import cuda_segdec
from ..kernels.cuda_segdec_src import BATCH_FIELDS

SOURCE = r"""
extern "C" __global__ void zx_decode_segments(const unsigned char* __restrict__ exp,
        const unsigned char* __restrict__ sm, const int* __restrict__ runs, int nruns,
        const int* __restrict__ bits, const unsigned short* __restrict__ tabs, int seg,
        unsigned short* __restrict__ out, int nseg) {
    int j = blockIdx.x * blockDim.x + threadIdx.x;
    if (j >= nseg) return;
    int lo = 0, hi = nruns - 1;                 // the last run whose first segment <= j
    while (lo < hi) {
        int mid = (lo + hi + 1) >> 1;
        if (runs[6 * mid] <= j) lo = mid; else hi = mid - 1;
    }
    const int* r = runs + 6 * lo;
    long long k0 = (long long)(j - r[0]) * seg;
    int cnt = (int)min((long long)seg, (long long)r[4] - k0);
    long long bit = bits[j], end = r[1];
    unsigned short* o = out + r[2] + k0;
    const unsigned char* s = sm + r[3] + k0;
    const unsigned short* t = tabs + 4096LL * r[5];
    long long nxt = bit >> 3;
    unsigned long long buf = 0ull;
    int have = 0;
    while (have <= 56 && nxt < end) { buf |= (unsigned long long)exp[nxt++] << have; have += 8; }
    int skip = (int)(bit & 7);
    buf >>= skip;
    have -= skip;
    for (int k = 0; k < cnt; k++) {
        while (have <= 56 && nxt < end) { buf |= (unsigned long long)exp[nxt++] << have; have += 8; }
        unsigned int v = t[buf & 4095ull];
        unsigned int b = s[k];
        o[k] = (unsigned short)(((b >> 7) << 15) | ((v & 0xffu) << 7) | (b & 0x7fu));
        buf >>= (v >> 8);
        have -= (int)(v >> 8);
    }
}
"""
_THREADS = 128
#: pinned descriptor buffers of :meth:`CudaOps.decode_batch` used in turn
_DESC_RING = 8
#: :meth:`CudaOps.decode` runs the staged multi-symbol decoder of
#: :mod:`~zipmoe_rt.backends.cuda_segdec` (False: ``zx_decode_segments`` above, one symbol per
#: lookup and one word per thread and store; same words)
STAGED = True


class CudaOps:
    """The device operations of :class:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine` on the
    current CUDA device (the interface of :class:`~zipmoe_rt.engine.gpu_ops.HostOps`)."""

    name = "cuda"

    def __init__(self):
        self._k = cp.RawModule(code=SOURCE, options=("-std=c++14",)).get_function(
            "zx_decode_segments")
        self._desc = [[None, None] for _ in range(_DESC_RING)]   # [pinned int64, event]
        self._desc_i = 0
        self._scratch: dict = {}        # (stream, name) -> device array, grown as needed

    def pinned(self, nbytes: int) -> np.ndarray:
        """uint8 [nbytes] in page-locked host memory (``cupy.cuda.alloc_pinned_memory``)."""
        mem = cp.cuda.alloc_pinned_memory(int(nbytes))
        return np.frombuffer(mem, np.uint8, int(nbytes))

    def empty(self, n: int, dtype=np.uint8):
        """``cupy.empty`` (allocated for the compute stream)."""
        return cp.empty(int(n), dtype)

    def to_device(self, host):
        """A device copy (synchronous)."""
        return cp.asarray(np.ascontiguousarray(host))

    def to_host(self, dev):
        """A host copy (synchronous)."""
        return cp.asnumpy(dev)

    def stream(self):
        """A new non-blocking CUDA stream."""
        return cp.cuda.Stream(non_blocking=True)

    def current(self):
        """The stream the model computes on (CuPy's current stream)."""
        return cp.cuda.get_current_stream()

    def record(self, stream, timing: bool = False):
        """A CUDA event recorded on ``stream``."""
        ev = cp.cuda.Event(disable_timing=not timing)
        ev.record(stream)
        return ev

    def on(self, stream):
        """A context in which CuPy array operations are queued on ``stream`` (the stream
        itself)."""
        return stream

    def wait(self, stream, event):
        """``cudaStreamWaitEvent``."""
        stream.wait_event(event)

    def sync(self, event):
        """``cudaEventSynchronize``."""
        event.synchronize()

    def elapsed(self, start, end) -> float:
        """Seconds between two timing events (both finished)."""
        return cp.cuda.get_elapsed_time(start, end) / 1e3

    def h2d(self, dst, src: np.ndarray, stream):
        """``cudaMemcpyAsync`` of pinned ``src`` into ``dst`` on ``stream``."""
        if src.nbytes != dst.nbytes:
            raise ValueError(f"h2d: {src.nbytes} host bytes into {dst.nbytes} device bytes")
        cp.cuda.runtime.memcpyAsync(dst.data.ptr, src.ctypes.data, src.nbytes,
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)

    def decode(self, exp, sm, runs, bits, tabs, seg, out, stream):
        """The segment decode on ``stream`` (one thread per segment, ``bits.size``): the staged
        decoder (:func:`~zipmoe_rt.backends.cuda_segdec.decode_runs`) or, with
        :data:`STAGED` off, ``zx_decode_segments``."""
        n = int(bits.shape[0])
        if n and STAGED:
            with stream:
                cuda_segdec.decode_runs(exp, sm, runs, bits, tabs, seg, out)
        elif n:
            with stream:
                self._k(((n + _THREADS - 1) // _THREADS,), (_THREADS,),
                        (exp, sm, runs, np.int32(runs.shape[0]), bits, tabs, np.int32(seg), out,
                         np.int32(n)))

    def h2d_at(self, dst, off: int, src: np.ndarray, stream):
        """``cudaMemcpyAsync`` of pinned ``src`` into device ``dst`` at byte ``off``.

        Raises:
            ValueError: ``src`` does not fit.
        """
        if off + src.nbytes > dst.nbytes:
            raise ValueError(f"h2d_at: {src.nbytes} bytes at {off} into {dst.nbytes}")
        cp.cuda.runtime.memcpyAsync(dst.data.ptr + off, src.ctypes.data, src.nbytes,
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)

    def _scratch_on(self, stream, name: str, n: int, dtype):
        """A device array of at least ``n`` elements kept for ``stream`` (allocated from that
        stream's pool, so a replaced one is reused only in its order)."""
        key = (stream.ptr, name)
        a = self._scratch.get(key)
        if a is None or a.size < n:
            with stream:
                a = self._scratch[key] = cp.empty(max(int(n), 1 << 12), dtype)
        return a

    def decode_batch(self, jobs, seg, stream, landed=None):
        """The segment decode of several experts in one launch on ``stream``
        (:func:`~zipmoe_rt.backends.cuda_segdec.decode_batch`): jobs and ``landed`` as for
        :meth:`~zipmoe_rt.engine.gpu_ops.HostOps.decode_batch`. Their addresses go into a pinned
        descriptor (a ring of :data:`_DESC_RING`; a buffer is rewritten only once its last copy
        has left) copied on ``stream`` before the kernels. With ``landed`` the kernel waits for
        each copied expert's bytes block by block instead of the stream waiting for them all."""
        rows, sf, tf = [], 0, 0
        for job in jobs:
            exp, sm, runs, bits, tabs, out, nseg, nruns, ntab = job[:9]
            seq = job[9] if landed is not None and len(job) > 9 else -1
            rows += [sf, exp[0].data.ptr + exp[1], sm[0].data.ptr + sm[1],
                     runs[0].data.ptr + runs[1], nruns, bits[0].data.ptr + bits[1],
                     tabs[0].data.ptr + tabs[1], tf, out.data.ptr, seq]
            sf += nseg
            tf += ntab if seq < 0 else 0
        rows += [sf, 0, 0, 0, 0, 0, 0, tf, 0, 0]
        if not sf:
            return
        slot = self._desc[self._desc_i]
        self._desc_i = (self._desc_i + 1) % _DESC_RING
        if slot[1] is not None:
            slot[1].synchronize()         # its last copy has left (long ago, as a rule)
        if slot[0] is None or slot[0].size < len(rows):
            n = max(len(rows), 64 * BATCH_FIELDS)
            slot[0] = np.frombuffer(cp.cuda.alloc_pinned_memory(8 * n), np.int64, n)
        host = slot[0]
        host[:len(rows)] = rows
        dev = self._scratch_on(stream, "desc", len(rows), cp.int64)
        multi = self._scratch_on(stream, "multi", tf * 4096, cp.uint64)
        cp.cuda.runtime.memcpyAsync(dev.data.ptr, host.ctypes.data, 8 * len(rows),
                                    cp.cuda.runtime.memcpyHostToDevice, stream.ptr)
        slot[1] = self.record(stream)
        with stream:
            cuda_segdec.decode_batch(dev, len(jobs), sf, tf, seg, multi, landed=landed)

    def copy(self, a, stream):
        """A contiguous copy of device array ``a`` made on ``stream`` (memory from the compute
        stream's pool)."""
        out = cp.empty(a.shape, a.dtype)
        cp.cuda.runtime.memcpyAsync(out.data.ptr, a.data.ptr, a.nbytes,
                                    cp.cuda.runtime.memcpyDeviceToDevice, stream.ptr)
        return out

    def device_name(self) -> str:
        """The GPU's name."""
        dev = cp.cuda.Device()
        return cp.cuda.runtime.getDeviceProperties(dev.id)["name"].decode()
