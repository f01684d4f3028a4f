"""One copy stream pass and one decode launch for all the misses of one MoE layer call: the
batched miss path of :class:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine`.

The engine's :meth:`_prepare` starts every non-resident expert of a layer call (design note §4,
the scheduler's order); on the GPU path each expert whose bytes are at hand (pinned host cache,
C/S/E slots on the GPU, or a finished file read) joins the *open batch* (:meth:`_queue`), and
:meth:`_flush` closes it once the call's experts are started:

1. when the batch's first copy is queued, the copy stream waits for the compute stream's event
   and for the last decode that read the staging arena the batch writes (a ring of device arenas allocated once, each sized for
   :data:`MAX_BATCH` of the largest experts' blocks, two calls' worth of them: ``2 k`` blocks in
   all);
2. each expert's pinned host block (``[SM | exponent region | runs | segment bits | tables]``,
   :func:`~zipmoe_rt.engine.gpu_meta.block_layout`) is copied into the arena by one
   ``cudaMemcpyAsync`` issued as soon as the expert joins, back to back at 256-byte offsets (the
   pinned blocks already hold the bytes, so no host gather copy is made, and the first copy
   runs while the host prepares the next expert);
3. once :data:`MAX_BATCH` experts have joined, or at :meth:`_flush`, one launch of the
   multi-symbol table kernel and one of the segment decoder over every segment of every expert
   of the batch, after the compute stream's work queued so far (each expert's output buffer is
   taken at the launch, from memory the compute stream may have freed) (``sd_multi_batch`` /
   ``sd_decode_batch`` of
   :mod:`zipmoe_rt.kernels.cuda_segdec_src`, driven by a small descriptor of per-expert
   addresses; :meth:`~zipmoe_rt.backends.cuda_experts.CudaOps.decode_batch`), each expert's
   BF16 words written into its own output buffer (the buffer the F pool then admits);
4. one event per batch that the compute stream waits for before the experts' matmuls.

With :data:`STREAMED` (off by default, see there) the decode launch does not wait for the
batch's copies: after each expert's copy the copy stream also copies that expert's sequence
number (from a fixed pinned table of numbers) into a 4-byte *landed* word on the device, and
each block of the decode kernel waits for the number of the last copied expert it reads
(``sd_decode_batch_wait`` of :mod:`zipmoe_rt.kernels.cuda_segdec_src`). Copies of one stream
land in order, so an expert is decoded while the next ones still cross PCIe, and a call's last
decode ends about one expert's decode after its last copy rather than the whole batch's decode
after it. The decode launch still waits for the compute stream's work queued so far, so the
kernel only ever waits on copies already queued behind nothing but copies and decodes issued
before it (no cycle).

With :data:`MAX_BATCH` = 0 (the default) all the misses of a call are one batch (one decode
launch after the last copy); with a few experts per batch, each batch's decode overlaps the
copies of the next.

No host synchronisation, no per-expert device arrays besides the output buffers. A group larger
than an arena (prefill windows) is cut into several batches too; a file miss joins when its read
has finished and is launched at once. Raw experts (``raw-lru``: their
copied words *are* the weights) and experts the GPU kernel does not take keep the one-expert
path (:meth:`GpuExpertEngine._launch`). :data:`BATCHED` off restores one copy and one launch per
expert (same words).

Timers (:class:`GpuStageTimes`): host time spent queuing batches (``issue_s``), GPU time of the
copies (``h2d_s``) and of the decode launches (``gpu_decode_s``) from CUDA events, and the
compute stream's time in each MoE call after its last decode (``moe_compute_s``: the experts'
matmuls and whatever the call queues after them).
"""
from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import numpy as np

from ..kernels.cuda_segdec_src import SEQ_MASK
from .gpu_meta import ALIGN, block_layout, gpu_decodable, meta_bound
from .stage_times import StageTimes

#: queue the misses of a layer call and launch them as one batch (False: one copy and one
#: decode launch per expert, as :meth:`GpuExpertEngine._launch` does)
BATCHED = True
#: experts per decode launch (0: all the misses of a call in one launch, the default). Launches
#: of a few experts decode while the next experts' bytes still cross PCIe, but each costs host
#: time and a launch of few segments decodes slowly: with 2 on one H100 the Qwen3-30B-A3B-shape
#: benchmark ran 13 % slower than with 0 (docs/benchmarks.md §13)
MAX_BATCH = 0
#: True: before a batch's first copy the copy stream waits for the compute stream's event taken
#: when the batch opened. False (the default): only before the first copy into an arena not used
#: before, whose memory came from the compute stream's pool; the arenas are allocated once and
#: never given back, and the copies write only into them, so a later batch needs only the wait
#: for the decode that last read its arena (the decode stream still waits for the compute
#: stream before writing its outputs), and its copies do not queue behind compute work queued
#: before the batch opened. Same bytes either way; timed inside one load on one H100 the two
#: differ by at most 1.5 % (docs/benchmarks.md §13, run 13);
#: ``tools/gpu_timeline.py --ab copy_wait=on --interleave 8`` compares the two in one process
COPY_WAITS_COMPUTE = False
#: decode a batch's experts as their copies land (module docstring) rather than after the
#: whole batch's copies; same words. Off by default: the budgeted engine with it has not passed
#: its GPU test (``tests/test_gpu_offload.py::test_cuda_streamed_decode_keeps_logits``); on one
#: H100 its kernel equals the host decoder while waiting for delayed copies and zip-lru runs
#: 1.07x faster with it (docs/benchmarks.md §13 run 14). ``tools/gpu_timeline.py --ab
#: streamed=on`` compares
STREAMED = False


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


class _Batch:
    """The open batch: its arena slot, the compute stream's event at its start, whether its
    decode is streamed (:data:`STREAMED` when it opened, kept for the batch's copies and its
    launch alike), the experts queued, their decode jobs, the arena bytes used, the staging
    blocks to give back."""

    __slots__ = ("slot", "arena", "ev_c", "streamed", "group", "jobs", "used", "staged",
                 "copies", "a_c")

    def __init__(self, slot, ev_c):
        self.slot, self.arena, self.ev_c, self.streamed = slot, slot[0], ev_c, STREAMED
        self.group, self.jobs, self.staged = [], [], []
        self.used, self.copies, self.a_c = 0, False, None


class BatchedMisses:
    """Mixin of :class:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine`: the batched miss path
    (module docstring). Uses the engine's ``ops``, ``_copy_s``, ``_dec_s``, ``_meta``,
    ``_dmeta``, ``layouts``, ``k``, ``stats``, ``_launch`` and ``_give_staging``."""

    def _batch_setup(self, sized: bool):
        """No open batch, no arenas; with ``sized`` (the layouts known) the arena size."""
        self._batch = None               # the open batch: _Batch
        self._landed = None              # device uint32: the last landed copy's number
        self._seq_src = None             # pinned uint32 [SEQ_MASK + 1]: 0, 1, 2, ...
        self._seq = 0                    # the last copy's number
        self._arenas: list = []          # [device uint8 buffer, event of its last decode]
        self._arena_i = 0
        self._last_dec = None
        self._arena_cap = 0
        self._n_arenas = 0
        if not sized:
            return
        sizes = [block_layout(l, None)[1] + meta_bound(l) for l in self.layouts.values()
                 if gpu_decodable(l) and not all(p.raw for p in l.pieces)]
        per = min(self.k, MAX_BATCH) if MAX_BATCH > 0 else self.k
        self._arena_cap = per * _al(max(sizes)) if sizes else 0
        self._n_arenas = 2 * -(-self.k // per)     # two calls' worth of launches in flight
        if self._arena_cap:
            self._new_landed()           # at load: no compute work can still use its memory

    def _batchable(self, p) -> bool:
        lay = p.lay
        return (BATCHED and self._arena_cap > 0 and gpu_decodable(lay)
                and not all(q.raw for q in lay.pieces) and p.key in self._meta)

    def _queue(self, p):
        """Add ``p`` to the open batch, its copy issued at once (or launch it alone if it
        cannot batch); the decode waits for :meth:`_flush`."""
        if not self._batchable(p):
            self._launch(p)
            return
        t0 = time.perf_counter()
        lay, m = p.lay, self._meta[p.key]
        bl = block_layout(lay, m)
        lo = 0 if p.need_sm else bl[0]
        hi = bl[4] if p.need_exp else lay.sm_region[1]
        n = _al(hi - lo) if (p.need_sm or p.need_exp) else 0
        b = self._batch
        if b is not None and b.used + n > self._arena_cap:
            self._close_batch()
            b = None
        if b is None:
            b = self._batch = self._open_batch()
        ops, st = self.ops, self.stats
        if n:
            if not b.copies:
                self._start_copies(b)
            ops.h2d_at(b.arena, b.used, p.block[lo:hi], self._copy_s)
            base = b.used - lo                   # arena offset of the block's byte 0
            b.used += n
            st.pcie_bytes += hi - lo
            st.uploads += 1
            if p.staging:
                b.staged.append(p.block)
            seq = self._landed_after_copy() if b.streamed else -1
        else:
            seq = -1
        e0, r0, b0, t0_, _ = bl
        sm_n, exp_n = lay.sm_region[1], lay.exp_region[1]
        arena = b.arena
        sm = (arena, base, sm_n) if p.need_sm else (p.slot.sm, 0, sm_n)
        if p.need_exp:
            exp, runs, bits, tabs = ((arena, base + e0, exp_n), (arena, base + r0, m.runs.nbytes),
                                     (arena, base + b0, m.bits.nbytes),
                                     (arena, base + t0_, m.tabs.nbytes))
        else:
            exp = (p.slot.exp, 0, exp_n)
            runs, bits, tabs = ((d, 0, d.nbytes) for d in self._dmeta[p.key])
        b.jobs.append((exp, sm, runs, bits, tabs, int(m.words), int(m.bits.size),
                       int(m.runs.shape[0]), int(m.tabs.shape[0]), seq))
        b.group.append(p)
        if 0 < MAX_BATCH <= len(b.group):
            self._close_batch()          # decodes while the next experts' copies run
        st.issue_s += time.perf_counter() - t0

    def _new_landed(self):
        """The landed word, zeroed by a copy on the copy stream (so before any number is
        copied there), and the pinned table of numbers it is copied from."""
        ops = self.ops
        self._seq_src = ops.pinned(4 * (SEQ_MASK + 1)).view(np.uint32)
        self._seq_src[:] = np.arange(SEQ_MASK + 1, dtype=np.uint32)
        self._landed = ops.empty(4)
        ops.h2d_at(self._landed, 0, self._seq_src[0:1].view(np.uint8), self._copy_s)

    def _landed_after_copy(self) -> int:
        """Queue, behind the copy just issued, the copy of its sequence number into the landed
        word and return that number."""
        ops = self.ops
        self._seq = seq = (self._seq + 1) & SEQ_MASK
        ops.h2d_at(self._landed, 0, self._seq_src[seq:seq + 1].view(np.uint8), self._copy_s)
        return seq

    def _flush(self):
        """Launch the open batch's decode (:meth:`_close_batch`)."""
        if self._batch is not None:
            t0 = time.perf_counter()
            self._close_batch()
            self.stats.issue_s += time.perf_counter() - t0

    def _open_batch(self):
        if not self._arenas:
            self._arenas = [[self.ops.empty(self._arena_cap), None]
                            for _ in range(self._n_arenas)]
        slot = self._arenas[self._arena_i]
        self._arena_i = (self._arena_i + 1) % len(self._arenas)
        # memory the compute stream freed may back the outputs: both streams wait for it
        return _Batch(slot, self.ops.record(self.ops.current()))

    def _start_copies(self, b):
        ops, cs = self.ops, self._copy_s
        if COPY_WAITS_COMPUTE or b.slot[1] is None:
            ops.wait(cs, b.ev_c)
        if b.slot[1] is not None:
            ops.wait(cs, b.slot[1])             # the decode that last read this arena is done
        b.a_c = ops.record(cs, timing=True)
        b.copies = True

    def _close_batch(self):
        """One decode launch and one event for the open batch (module docstring)."""
        from .gpu_engine import assemble
        b, self._batch = self._batch, None
        ops, st, ds = self.ops, self.stats, self._dec_s
        streamed = b.copies and b.streamed
        if b.copies:
            b_c = ops.record(self._copy_s, timing=True)
            st.copy_events.append((b.a_c, b_c))
            for blk in b.staged:
                self._give_staging(blk, b_c)
            if not streamed:
                ops.wait(ds, b_c)
        else:
            ops.wait(ds, b.ev_c)
        # the outputs are taken now, from memory the compute stream may have freed since the
        # batch opened (the running layer's experts, once its matmuls are queued): the decode
        # waits for the compute stream's work so far
        ops.wait(ds, ops.record(ops.current()))
        b.jobs = [j[:5] + (ops.empty(j[5], np.uint16),) + j[6:] for j in b.jobs]
        a = ops.record(ds, timing=True)
        if streamed:
            ops.decode_batch(b.jobs, self._meta[b.group[0].key].segment, ds,
                             landed=self._landed)
        else:
            ops.decode_batch(b.jobs, self._meta[b.group[0].key].segment, ds)
        e = ops.record(ds, timing=True)
        st.events.append((a, e))
        st.gpu_decodes += len(b.group)
        st.batches += 1
        rearranged = False
        for p, job in zip(b.group, b.jobs):
            out = job[5]
            roles = {role: out[w0:w0 + math.prod(map(int, shape))].reshape(shape)
                     for role, w0, shape in self._meta[p.key].outs}
            rearranged |= "gate_up_cols" in roles
            p.weights = assemble(ops, roles, ds)
        ev = ops.record(ds, timing=True) if rearranged else e
        for p, job in zip(b.group, b.jobs):
            # the decoded words stay referenced until the compute stream has waited for ``ev``:
            # where they were rearranged (gpt-oss) nothing else holds them, and memory given
            # back to the pool earlier could be handed to the compute stream while the decode
            # stream still writes or reads it
            p.event, p.keep = ev, job[5]
        b.slot[1] = ev
        self._last_dec = e
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
