"""Memory the expert engine reuses instead of allocating per expert: decode output arrays and
region read buffers.

:class:`BufferPools` is the part of :class:`~zipmoe_rt.engine.pipeline.ExpertEngine` that hands
out and takes back (1) the output arrays an expert decodes into, kept for the next expert of the
same shapes, and (2) the buffers a region is read into from flash, one pool per region kind
(``sm``/``exp``), each buffer in its own memory map (:func:`~zipmoe_rt.engine.io.anon_array`)
and big enough for that region of any expert. Both pools are bounded by the engine's
``window`` (the decoded working set the budget counts), so they keep the C heap from
fragmenting without holding memory the budget does not count.

It is a mixin: it works on the engine's ``_spare``, ``_done_with``, ``_read_pool``,
``_read_cap``, ``window`` and ``read_window``, set up by the engine's constructor. Main thread only.
"""
from __future__ import annotations

from collections import deque

import numpy as np

from . import layout as L_
from .io import anon_array


class BufferPools:
    """Pools of decode output arrays and region read buffers of the expert engine (a mixin of
    :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`; see the module docstring)."""

    def _take_outs(self, lay) -> list:
        """Output arrays for decoding ``lay``: a set an earlier expert of the same shapes left
        (:meth:`_recycle`), else new ones. Reusing them keeps the C heap from fragmenting:
        freshly allocated multi-MB arrays, freed a layer later, left ~20 MB of free but
        resident heap behind on the default model (what a memory cgroup counts)."""
        q = self._spare.get(lay.shape_key)
        if q:
            try:
                return q.pop()
            except IndexError:
                pass
        return L_.alloc_expert(lay)

    def _recycle(self):
        """Keep the arrays of experts just computed and not kept in F for the next decodes, at
        most :attr:`window` sets (the decoded working set the budget already counts)."""
        while self._done_with:
            lay, bufs = self._done_with.pop()
            q = self._spare.setdefault(lay.shape_key, deque())
            if sum(len(v) for v in self._spare.values()) < self.window:
                q.append(bufs)

    def _take_read_buf(self, which: str) -> np.ndarray:
        """A read buffer for region ``which`` (``sm``/``exp``) of any expert: one a finished
        read left (:meth:`_give_read_buf`), else a new one in its own memory map. Reused, the
        buffers take no page faults per read; in memory maps, (1) the several I/O threads do
        not grow per-thread malloc arenas that keep freed memory resident (zip-lru measured
        1.2-1.5x its budget with 4 reads in flight from the C heap), and (2) a buffer that a
        moving slot adopts is kept as is (:func:`_long_lived`, no copy). Main thread only."""
        q = self._read_pool[which]
        return q.pop() if q else anon_array(self._read_cap[which])

    def _give_read_buf(self, which: str, buf: np.ndarray):
        """Keep ``buf`` for later reads, at most :attr:`read_window` per region kind (the reads
        of one layer call, and of the predicted loads with prefetch); more are unmapped."""
        q = self._read_pool[which]
        if len(q) < self.read_window:
            q.append(buf)
