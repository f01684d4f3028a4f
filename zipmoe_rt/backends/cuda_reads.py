"""Small device-to-host reads of the host's routing decisions (top-k ids and weights, router
logits), read on every MoE layer: several arrays in one read, into pinned memory.

:class:`HostReads` issues one ``cudaMemcpyAsync`` per array on the current (compute) stream into
a pinned host buffer and synchronises that stream once for all the arrays of a read (the
routing kernel's ids and weights: one host synchronisation instead of two). Such a read
waits for the compute stream's work only: on one H100 a 512-byte read took 8 µs alone and
14 µs while 64 MB of host-to-device copies ran on a non-blocking stream (into pageable memory
with ``cupy.asnumpy``: 11 and 19 µs; on a stream of its own after an event: 21 and 36 µs for
two arrays), docs/benchmarks.md §13. The bytes are the device arrays' bytes, copied out of the
pinned buffer into fresh host arrays (the buffer is reused by the next read).

Imported only on ``device="cuda"`` (:class:`~zipmoe_rt.backends.cupy_cuda.CupyBackend`).
"""
from __future__ import annotations

import numpy as np

import cupy as cp

#: largest read (bytes, all arrays together) through the pinned buffer; larger ones use
#: ``cupy.asnumpy`` (a pinned buffer of their size would be held for the process's life)
MAX_BYTES = 4 << 20
_ALIGN = 256


class HostReads:
    """Reads of device arrays into host memory, several in one synchronisation (module
    docstring). Not thread-safe: one reader per backend, used from the thread that runs the
    model."""

    def __init__(self):
        self._buf = None                 # uint8 pinned host buffer, grown as needed
        self.reads = 0                   # host synchronisations made (one per read)
        self._later = [None, None]       # pinned buffers of :meth:`read_later`, used in turn
        self._later_i = 0

    @staticmethod
    def _pinned(buf, nbytes: int) -> np.ndarray:
        """``buf`` if it holds ``nbytes``, else a new pinned buffer of the next power of two."""
        if buf is None or buf.size < nbytes:
            n = max(64 << 10, 1 << (int(nbytes) - 1).bit_length())
            buf = np.frombuffer(cp.cuda.alloc_pinned_memory(n), np.uint8, n)
        return buf

    @staticmethod
    def _layout(arrays):
        """C-contiguous ``arrays``, their byte offsets at :data:`_ALIGN`, and the total."""
        arrays = [cp.ascontiguousarray(a) for a in arrays]
        offs, n = [], 0
        for a in arrays:
            offs.append(n)
            n += -(-a.nbytes // _ALIGN) * _ALIGN
        return arrays, offs, n

    @staticmethod
    def _queue(buf, arrays, offs, stream) -> None:
        """Device-to-host copies of ``arrays`` into ``buf`` at ``offs`` on ``stream``."""
        rt = cp.cuda.runtime
        for a, off in zip(arrays, offs):
            if a.nbytes:
                rt.memcpyAsync(buf.ctypes.data + off, a.data.ptr, a.nbytes,
                               rt.memcpyDeviceToHost, stream.ptr)

    @staticmethod
    def _unpack(buf, arrays, offs) -> list:
        """Host copies of ``arrays`` (same dtype and shape) out of ``buf``."""
        return [buf[off:off + a.nbytes].view(a.dtype).reshape(a.shape).copy()
                for a, off in zip(arrays, offs)]

    def read_later(self, *arrays):
        """Queue the copies of device ``arrays`` into pinned host memory on the current stream
        without waiting (a buffer of their own, two used in turn, not :meth:`read`'s).

        Returns:
            a callable that waits for the copies (an event synchronise; none if the stream has
            passed them) and returns host copies as :meth:`read` does. Call it before the
            next-but-one ``read_later``.
        """
        arrays, offs, n = self._layout(arrays)
        if n > MAX_BYTES:
            host = [cp.asnumpy(a) for a in arrays]
            return lambda: host
        i, self._later_i = self._later_i, 1 - self._later_i
        buf = self._later[i] = self._pinned(self._later[i], n)
        s = cp.cuda.get_current_stream()
        self._queue(buf, arrays, offs, s)
        ev = cp.cuda.Event(disable_timing=True)
        ev.record(s)

        def done() -> list:
            ev.synchronize()
            return self._unpack(buf, arrays, offs)
        return done

    def read(self, *arrays) -> list:
        """Host copies (numpy, same dtype and shape) of the device ``arrays`` as the current
        stream writes them, with one host synchronisation for all.

        Args:
            arrays: CuPy arrays (any dtype and shape; made C-contiguous on the current stream
                where they are not).
        Returns:
            a list of numpy arrays, one per argument, owning their memory.
        """
        arrays, offs, n = self._layout(arrays)
        if n > MAX_BYTES:
            return [cp.asnumpy(a) for a in arrays]
        buf = self._buf = self._pinned(self._buf, n)
        s = cp.cuda.get_current_stream()
        self._queue(buf, arrays, offs, s)
        s.synchronize()
        self.reads += 1
        return self._unpack(buf, arrays, offs)
