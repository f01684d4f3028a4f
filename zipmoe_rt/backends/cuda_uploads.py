"""Small host-to-device uploads made on every decode step (RoPE tables, token ids, the expert
address lists of the fused expert kernels, rows and routing weights of the prefill expert
path): several host arrays in one ``cudaMemcpyAsync`` through a ring of pinned buffers.

``cupy.asarray`` of a small NumPy array stages it through CuPy's pinned memory pool and costs
about 60 µs of host time per call on the H100 host of docs/benchmarks.md §13 (cProfile of a
decode step: 7 calls per token, 0.43 ms of a 2.9 ms step). :meth:`HostUploads.upload` writes
the arrays into a pinned buffer of its own at 256-byte offsets, copies the buffer with one
asynchronous copy on the current stream into one fresh device allocation and returns views of
it. A buffer of the ring is rewritten only once its last copy has left (an event; long done,
as a rule, since the host waits for each layer's routing read). The device bytes are those of
the host arrays.

Imported only on ``device="cuda"`` (:class:`~zipmoe_rt.backends.cupy_cuda.CupyBackend`).
"""
from __future__ import annotations

import numpy as np

import cupy as cp

#: largest upload (bytes, all arrays together) through the ring; larger ones use
#: ``cupy.asarray`` (a pinned buffer of their size would be held for the process's life)
MAX_BYTES = 1 << 20
#: pinned buffers used in turn
RING = 8
#: False: each array through ``cupy.asarray`` (the same bytes; ``tools/gpu_timeline.py --ab
#: uploads=off`` compares the two)
ENABLED = True
_ALIGN = 256


class HostUploads:
    """Uploads of host arrays to the current device, several in one copy (module docstring).
    Not thread-safe: one per backend, used from the thread that runs the model."""

    def __init__(self):
        self._ring = [[None, None] for _ in range(RING)]    # [pinned uint8, event]
        self._i = 0
        self.copies = 0                  # copies made through the ring

    def upload(self, *arrays) -> list:
        """Device copies of host ``arrays``, queued on the current stream.

        Args:
            arrays: numpy arrays (any dtype and shape; copied C-contiguous).
        Returns:
            a list of CuPy arrays (same dtype and shape, C-contiguous; views of one device
            allocation at 256-byte offsets), one per argument.
        """
        arrays = [np.ascontiguousarray(a) for a in arrays]
        offs, n = [], 0
        for a in arrays:
            offs.append(n)
            n += -(-a.nbytes // _ALIGN) * _ALIGN
        if n > MAX_BYTES or n == 0 or not ENABLED:
            return [cp.asarray(a) for a in arrays]
        slot = self._ring[self._i]
        self._i = (self._i + 1) % RING
        if slot[1] is not None:
            slot[1].synchronize()
        buf = slot[0]
        if buf is None or buf.size < n:
            size = max(16 << 10, 1 << (n - 1).bit_length())
            buf = slot[0] = np.frombuffer(cp.cuda.alloc_pinned_memory(size), np.uint8, size)
        for a, off in zip(arrays, offs):
            buf[off:off + a.nbytes] = a.reshape(-1).view(np.uint8)
        dev = cp.empty(n, cp.uint8)
        s = cp.cuda.get_current_stream()
        cp.cuda.runtime.memcpyAsync(dev.data.ptr, buf.ctypes.data, n,
                                    cp.cuda.runtime.memcpyHostToDevice, s.ptr)
        ev = slot[1] = cp.cuda.Event(disable_timing=True)
        ev.record(s)
        self.copies += 1
        return [dev[off:off + a.nbytes].view(a.dtype).reshape(a.shape)
                for a, off in zip(arrays, offs)]
