"""An expert load of the budgeted engine in flight (:class:`PendingLoad`), and the size of the
engine's pooled read buffers (:func:`read_buffer_cap`); used by
:class:`~zipmoe_rt.engine.pipeline.ExpertEngine` and its prefetch
(:mod:`~zipmoe_rt.engine.prefetch`)."""
from __future__ import annotations

import mmap
import threading


class PendingLoad:
    """An expert being prepared: resolves to ExpertWeights (or the compute form) when all its
    reads and decode jobs are done; ``done`` is set then. ``lay``: its
    :class:`~zipmoe_rt.engine.layout.ExpertLayout`. Fields are written by the I/O threads and
    decode workers under ``lock`` where several may write at once."""

    __slots__ = ("lay", "sm", "exp", "outs", "left", "reads_left", "done", "error", "weights",
                 "lock", "bufs", "packing", "parts", "held", "deferred", "reads_done",
                 "cancelled", "nread")

    def __init__(self, lay):
        self.lay = lay
        self.sm = self.exp = None
        self.outs = None
        self.left = 0
        self.reads_left = 0
        self.bufs = {}      # region -> pooled read buffer (whole), for regions read from flash
        self.done = threading.Event()
        self.error = None
        self.weights = None
        self.lock = threading.Lock()
        # compute form (engine/ctier.py): ends in it; its parts by role; a C slot's own weights
        self.packing, self.parts, self.held = False, None, False
        # a read-only load (engine/prefetch.py): its decode waits for :meth:`ExpertEngine.
        # _release`; reads_done: all its reads ended (set under ``lock``)
        self.deferred, self.reads_done = False, False
        # a discarded read-only load: reads not begun yet are skipped; bytes read so far
        self.cancelled, self.nread = False, 0


def read_buffer_cap(source) -> dict:
    """Bytes of one pooled read buffer per region kind (``{"sm": n, "exp": n}``): the largest
    such region of any expert, rounded up to pages, plus a page for O_DIRECT rounding
    (:meth:`~zipmoe_rt.engine.buffers.BufferPools._take_read_buf`)."""
    biggest = {r: max(getattr(l, f"{r}_region")[1] for l in source.layouts.values())
               for r in ("sm", "exp")}
    return {r: (-(-n // mmap.PAGESIZE) + 1) * mmap.PAGESIZE for r, n in biggest.items()}
