"""The device operations the GPU expert engine (:mod:`zipmoe_rt.engine.gpu_engine`) needs, and
their host model.

:class:`HostOps` performs each operation at once on NumPy arrays (streams and events are
tokens, copies are plain copies, the segment decode is the Numba twin of the CUDA kernel), so
the engine's tiers, host cache, staging and accounting run and are tested on any machine with
the CPU backend. :class:`~zipmoe_rt.backends.cuda_experts.CudaOps` is the same interface on
CuPy: pinned host memory, CUDA streams and events, ``cudaMemcpyAsync`` and the segment kernel.
"""
from __future__ import annotations

import contextlib
import time

import numpy as np

from ..kernels.cuda_segdec_src import SEQ_MASK
from ..kernels.gpu_segments import decode_segments


class HostOps:
    """Device operations done at once on host memory (the interface of
    :class:`~zipmoe_rt.backends.cuda_experts.CudaOps`; see the module docstring)."""

    name = "host"

    def pinned(self, nbytes: int) -> np.ndarray:
        """uint8 [nbytes] host staging memory (pinned on a GPU)."""
        return np.empty(nbytes, np.uint8)

    def empty(self, n: int, dtype=np.uint8):
        """A device array of ``n`` elements."""
        return np.empty(n, dtype)

    def to_device(self, host: np.ndarray):
        """A device copy of a host array (synchronous; tier filling)."""
        return np.array(host, copy=True)

    def to_host(self, dev) -> np.ndarray:
        """A host copy of a device array (synchronous)."""
        return np.array(dev, copy=True)

    def stream(self):
        """A new stream (a token here)."""
        return object()

    def current(self):
        """The stream the model computes on."""
        return None

    def record(self, stream, timing: bool = False):
        """An event marking the work queued on ``stream`` so far."""
        return time.perf_counter()

    def on(self, stream):
        """A context in which array operations are queued on ``stream`` (nothing here)."""
        return contextlib.nullcontext()

    def wait(self, stream, event):
        """Make ``stream`` wait for ``event`` (no host wait)."""

    def sync(self, event):
        """Block the host until ``event`` has happened."""

    def elapsed(self, start, end) -> float:
        """Seconds between two timing events."""
        return max(0.0, end - start)

    def h2d(self, dst, src: np.ndarray, stream):
        """Copy host ``src`` into device ``dst`` (same byte size) on ``stream``."""
        dst[...] = src

    def decode(self, exp, sm, runs, bits, tabs, seg, out, stream):
        """The segment decode (:func:`~zipmoe_rt.kernels.gpu_segments.decode_segments`) on
        ``stream``: runs int32 [r, 6], bits int32 [n], tabs uint16 [t, 4096], out uint16."""
        decode_segments(exp, sm, runs, bits, tabs, seg, out)

    def h2d_at(self, dst, off: int, src: np.ndarray, stream):
        """Copy host ``src`` into device uint8 ``dst`` at byte ``off`` on ``stream``."""
        dst[off:off + src.nbytes] = src.reshape(-1).view(np.uint8)

    def decode_batch(self, jobs, seg, stream, landed=None):
        """The segment decode of several experts on ``stream`` (one launch on a GPU): each job
        ``(exp, sm, runs, bits, tabs, out, nseg, nruns, ntab[, seq])``, the first five as
        ``(device array, byte offset, bytes)`` (uint8 exponent and SM regions, int32 runs
        [nruns, 6], int32 bits [nseg], uint16 tables [ntab, 4096]), ``out`` uint16 words,
        ``seq`` the sequence number of the expert's copy (-1: not copied).

        ``landed``: None, or the device uint32 word (here uint8 [4]) the copy stream writes
        each copy's sequence number into after its bytes: the GPU kernel waits for it block by
        block; here every copy has already happened, so a copied expert whose number the word
        has not reached (modulo ``SEQ_MASK + 1``) is an engine error.

        Raises:
            RuntimeError: with ``landed``, a copied expert's sequence number not landed.
        """
        if landed is not None:
            now = int(np.asarray(landed).reshape(-1).view(np.uint32)[0])
            for job in jobs:
                seq = job[9] if len(job) > 9 else -1
                if seq >= 0 and ((now - seq) & SEQ_MASK) > (SEQ_MASK >> 1):
                    raise RuntimeError(f"decode_batch: copy {seq} has not landed (word {now})")
        for job in jobs:
            exp, sm, runs, bits, tabs, out = job[:6]
            v = [a.reshape(-1).view(np.uint8)[o:o + n] for a, o, n in (exp, sm, runs, bits, tabs)]
            decode_segments(v[0], v[1], v[2].view(np.int32).reshape(-1, 6), v[3].view(np.int32),
                            v[4].view(np.uint16).reshape(-1, 4096), seg, out)

    def copy(self, a, stream):
        """A contiguous device copy of ``a`` made on ``stream``."""
        return np.array(a, copy=True)

    def device_name(self) -> str:
        return "host model (no GPU)"
