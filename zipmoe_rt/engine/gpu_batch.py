"""One copy stream pass and one decode launch for all the misses of one MoE layer call: the
batched miss path of :class:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine`.

The engine's :meth:`_prepare` starts every non-resident expert of a layer call (design note §4,
the scheduler's order); on the GPU path the experts whose bytes are at hand (pinned host cache,
C/S/E slots on the GPU, or a finished file read) are *queued* rather than launched one by one,
and :meth:`BatchedMisses._flush` then queues, for the whole group:

1. one wait of the copy stream for the compute stream's event (memory the compute stream freed
   may back the outputs) and for the last decode that read the staging arena it is about to
   overwrite (a ring of :data:`ARENAS` device arenas, each sized for ``k`` of the largest
   experts' blocks, allocated once);
2. one ``cudaMemcpyAsync`` per expert from its pinned host block (``[SM | exponent region |
   runs | segment bits | tables]``, :func:`~zipmoe_rt.engine.gpu_meta.block_layout`) into the
   arena, back to back at 256-byte offsets; the pinned blocks are already where the bytes are,
   so no host gather copy is made;
3. one launch of the multi-symbol table kernel and one of the segment decoder over every
   segment of every expert of the group (``sd_multi_batch`` / ``sd_decode_batch`` of
   :mod:`zipmoe_rt.kernels.cuda_segdec_src`, driven by a small descriptor of per-expert
   addresses; :meth:`~zipmoe_rt.backends.cuda_experts.CudaOps.decode_batch`), each expert's
   BF16 words written into its own output buffer (the buffer the F pool then admits);
4. one event that the compute stream waits for before the experts' matmuls.

No host synchronisation, no per-expert device arrays besides the output buffers. A group larger
than an arena (prefill windows) is cut into several batches. Raw experts (``raw-lru``: their
copied words *are* the weights) and experts the GPU kernel does not take keep the one-expert
path (:meth:`GpuExpertEngine._launch`). :data:`BATCHED` off restores one copy and one launch per
expert (same words).

Timers (:class:`GpuStageTimes`): host time spent queuing batches (``issue_s``), GPU time of the
copies (``h2d_s``) and of the decode launches (``gpu_decode_s``) from CUDA events, and the
compute stream's time in each MoE call after its last decode (``moe_compute_s``: the experts'
matmuls and whatever the call queues after them).
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from .gpu_meta import ALIGN, block_layout, gpu_decodable, meta_bound
from .stage_times import StageTimes

#: queue the misses of a layer call and launch them as one batch (False: one copy and one
#: decode launch per expert, as :meth:`GpuExpertEngine._launch` does)
BATCHED = True
#: device staging arenas used in turn (a batch's copies overlap the previous batch's decode)
ARENAS = 2


def _al(n: int) -> int:
    return -(-int(n) // ALIGN) * ALIGN


@dataclass
class GpuStageTimes(StageTimes):
    """:class:`~zipmoe_rt.engine.stage_times.StageTimes` plus the GPU path's counters: bytes sent
    over PCIe for experts, uploads, GPU decodes, decode batches, misses served from the pinned
    host cache and from the file; times in seconds: ``gpu_decode_s`` (decode kernels),
    ``h2d_s`` (the batches' copies) and ``moe_compute_s`` (compute stream after the last decode
    of each MoE call), all from CUDA events; ``issue_s`` the host's time queuing batches."""

    pcie_bytes: int = 0
    uploads: int = 0
    gpu_decodes: int = 0
    host_decodes: int = 0
    host_hits: int = 0
    file_misses: int = 0
    batches: int = 0
    gpu_decode_s: float = 0.0
    h2d_s: float = 0.0
    moe_compute_s: float = 0.0
    issue_s: float = 0.0
    ops: object = None
    events: list = field(default_factory=list)
    copy_events: list = field(default_factory=list)
    layer_events: list = field(default_factory=list)

    def reset(self):
        ops = self.ops
        self.__init__()
        self.ops = ops

    def fold(self):
        """Add the finished kernels' and copies' times (waits for them)."""
        ops = self.ops
        for a, b in self.events:
            ops.sync(b)
            self.gpu_decode_s += ops.elapsed(a, b)
        for a, b in self.copy_events:
            ops.sync(b)
            self.h2d_s += ops.elapsed(a, b)
        for a, d, b in self.layer_events:
            ops.sync(b)
            t = ops.elapsed(a, b)
            if d is not None:
                t = min(t, max(0.0, ops.elapsed(d, b)))
            self.moe_compute_s += t
        self.events.clear()
        self.copy_events.clear()
        self.layer_events.clear()

    def as_dict(self) -> dict:
        self.fold()
        d = super().as_dict()
        d.update(pcie_bytes=self.pcie_bytes, uploads=self.uploads, gpu_decodes=self.gpu_decodes,
                 host_decodes=self.host_decodes, host_hits=self.host_hits,
                 file_misses=self.file_misses, batches=self.batches,
                 gpu_decode_s=self.gpu_decode_s, h2d_s=self.h2d_s,
                 moe_compute_s=self.moe_compute_s, issue_s=self.issue_s)
        return d


class BatchedMisses:
    """Mixin of :class:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine`: the batched miss path
    (module docstring). Uses the engine's ``ops``, ``_copy_s``, ``_dec_s``, ``_meta``,
    ``_dmeta``, ``layouts``, ``k``, ``stats``, ``_launch`` and ``_give_staging``."""

    def _batch_setup(self, sized: bool):
        """Empty queue and arenas; with ``sized`` (the layouts known) the arena size."""
        self._queued: list = []
        self._arenas: list = []          # [device uint8 buffer, event of its last decode]
        self._arena_i = 0
        self._last_dec = None
        self._arena_cap = 0
        if not sized:
            return
        sizes = [block_layout(l, None)[1] + meta_bound(l) for l in self.layouts.values()
                 if gpu_decodable(l) and not all(p.raw for p in l.pieces)]
        self._arena_cap = self.k * _al(max(sizes)) if sizes else 0

    def _batchable(self, p) -> bool:
        lay = p.lay
        return (BATCHED and self._arena_cap > 0 and gpu_decodable(lay)
                and not all(q.raw for q in lay.pieces) and p.key in self._meta)

    def _queue(self, p):
        """Queue ``p`` for the next :meth:`_flush` (or launch it alone if it cannot batch)."""
        if self._batchable(p):
            self._queued.append(p)
        else:
            self._launch(p)

    def _flush(self):
        """Launch every queued expert, in batches that fit an arena."""
        if not self._queued:
            return
        t0 = time.perf_counter()
        q, self._queued = self._queued, []
        group, used = [], 0
        for p in q:
            n = self._copy_bytes(p)
            if group and used + n > self._arena_cap:
                self._launch_batch(group)
                group, used = [], 0
            group.append(p)
            used += n
        self._launch_batch(group)
        self.stats.issue_s += time.perf_counter() - t0

    def _span(self, p):
        """``(lo, hi, block layout)``: the bytes of ``p``'s block that cross PCIe."""
        lay = p.lay
        bl = block_layout(lay, self._meta[p.key])
        lo = 0 if p.need_sm else bl[0]
        hi = bl[4] if p.need_exp else lay.sm_region[1]
        return lo, hi, bl

    def _copy_bytes(self, p) -> int:
        if not (p.need_sm or p.need_exp):
            return 0
        lo, hi, _ = self._span(p)
        return _al(hi - lo)

    def _arena(self):
        if not self._arenas:
            self._arenas = [[self.ops.empty(self._arena_cap), None] for _ in range(ARENAS)]
        a = self._arenas[self._arena_i]
        self._arena_i = (self._arena_i + 1) % ARENAS
        return a

    def _launch_batch(self, group):
        """One pass of copies, one decode launch and one event for ``group`` (module
        docstring)."""
        from .gpu_engine import assemble
        ops, st, cs, ds = self.ops, self.stats, self._copy_s, self._dec_s
        slot = self._arena()
        arena = slot[0]
        ev_c = ops.record(ops.current())       # memory the compute stream freed is reusable
        copies = any(p.need_sm or p.need_exp for p in group)
        if copies:
            ops.wait(cs, ev_c)
            if slot[1] is not None:
                ops.wait(cs, slot[1])          # the decode that last read this arena is done
            a_c = ops.record(cs, timing=True)
        off, jobs, staged = 0, [], []
        for p in group:
            lay, m = p.lay, self._meta[p.key]
            sm_n, exp_n = lay.sm_region[1], lay.exp_region[1]
            if p.need_sm or p.need_exp:
                lo, hi, (e0, r0, b0, t0, end) = self._span(p)
                ops.h2d_at(arena, off, p.block[lo:hi], cs)
                base = off - lo                 # arena offset of the block's byte 0
                off += _al(hi - lo)
                st.pcie_bytes += hi - lo
                st.uploads += 1
                if p.staging:
                    staged.append(p.block)
            else:
                e0, r0, b0, t0, end = block_layout(lay, m)
                base = 0
            sm = (arena, base, sm_n) if p.need_sm else (p.slot.sm, 0, sm_n)
            if p.need_exp:
                exp, runs, bits, tabs = ((arena, base + e0, exp_n),
                                         (arena, base + r0, m.runs.nbytes),
                                         (arena, base + b0, m.bits.nbytes),
                                         (arena, base + t0, m.tabs.nbytes))
            else:
                exp = (p.slot.exp, 0, exp_n)
                runs, bits, tabs = ((d, 0, d.nbytes) for d in self._dmeta[p.key])
            out = ops.empty(m.words, np.uint16)
            jobs.append((exp, sm, runs, bits, tabs, out, int(m.bits.size),
                         int(m.runs.shape[0]), int(m.tabs.shape[0])))
        if copies:
            b_c = ops.record(cs, timing=True)
            st.copy_events.append((a_c, b_c))
            for blk in staged:
                self._give_staging(blk, b_c)
            ops.wait(ds, b_c)
        else:
            ops.wait(ds, ev_c)
        a = ops.record(ds, timing=True)
        ops.decode_batch(jobs, self._meta[group[0].key].segment, ds)
        b = ops.record(ds, timing=True)
        st.events.append((a, b))
        st.gpu_decodes += len(group)
        st.batches += 1
        rearranged = False
        for p, job in zip(group, jobs):
            out = job[5]
            roles = {role: out[w0:w0 + int(np.prod(shape))].reshape(shape)
                     for role, w0, shape in self._meta[p.key].outs}
            rearranged |= "gate_up_cols" in roles
            p.weights = assemble(ops, roles, ds)
        ev = ops.record(ds, timing=True) if rearranged else b
        for p in group:
            p.event, p.keep = ev, None
        slot[1] = ev
        self._last_dec = b
        if len(st.events) > 4096:
            st.fold()

    def _note_layer(self, a):
        """Record the end of an MoE call on the compute stream (``a``: its start event)."""
        ops = self.ops
        self.stats.layer_events.append((a, self._last_dec, ops.record(ops.current(),
                                                                       timing=True)))
        self._last_dec = None
        if len(self.stats.layer_events) > 4096:
            self.stats.fold()
