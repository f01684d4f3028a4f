"""The budgeted expert engine: tiers + cache-affinity pipeline, as the model's expert executor.

For each MoE layer call it looks up every selected expert's tier, turns the non-resident ones into
tasks (Type-I: an SM read from flash, tiers E/miss; Type-II: SM resident, tiers S/C), orders them
with the cache-affinity scheduler (design note §4), and runs them on an I/O stage (one ``pread``
per region, optionally O_DIRECT, ``io_depth`` in flight in the scheduler's order; 1 is the
paper's single I/O thread) and L decode workers (zstd + the Numba merge, both without the GIL). The
main thread computes each expert as soon as its weights are ready, through the same routine as
the unbudgeted path (:func:`~zipmoe_rt.models.moe.accumulate_experts` on the model's backend), so
logits are identical bit for bit:

* one token (decode): the k experts go through one fused ``backend.experts_token`` call once
  all k are ready (their loads overlap);
* several tokens (prefill): experts are accumulated in ascending index order, each as soon as it
  is ready, while later ones are still loading (a bounded prefetch window keeps memory flat).

Policies (``policy``): ``raw-lru`` (a file with raw BF16 experts, F cache with eviction; what
users run today), ``zip-lru`` (compressed file + this pipeline, F cache with eviction),
``zipmoe`` (F/C/S/E pools per layer sized by the planner from an activation trace: F is a
recency pool of full experts on top of C/S/E slots, so that an expert used by one token
is still F for the next; see :meth:`ExpertEngine._fill_tiers`). The slots start on the plan's
experts and, with ``adapt`` (default), move to the experts the running text uses
(:meth:`ExpertEngine._adapt_slots`).

This module holds the engine, its reads in flight and decode jobs, the scheduling and ``run``;
the tier filling, heat and adaptive slots are :class:`~zipmoe_rt.engine.slots.SlotTiers`, the
pools of output arrays and read buffers :class:`~zipmoe_rt.engine.buffers.BufferPools`.
"""
from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import zstandard as zstd

from ..backends import get_backend
from ..models.moe import accumulate_experts, expert_act
from . import layout as L_
from .buffers import BufferPools
from .ctier import CTierMixin
from .io import ReadQueue, RegionReader, check_io_depth
from .pending import PendingLoad, read_buffer_cap  # noqa: F401  (read_buffer_cap: the engine's name)
from .prefetch import PrefetchMixin
from .scheduler import Task, execution_order, schedule
from .slots import SlotTiers
from .stage_times import StageTimes
from .tiers import EVICTIONS, POLICIES, Slot, budget_split


class ExpertEngine(SlotTiers, BufferPools, PrefetchMixin, CTierMixin):
    """Expert executor under a memory budget (``Executor`` protocol of models/moe.py).

    Args:
        source: :class:`~zipmoe_rt.engine.store.ZmoeSource` of the model (dense weights, layout).
        budget_bytes: bytes for all weights (dense + experts + the working set of one layer).
        policy: one of ``raw-lru``, ``zip-lru``, ``zipmoe``.
        eviction: ``lru``, ``lfu`` or ``tlfu`` (token-weighted LFU) for F caches (``zipmoe``:
            per-layer F pools; the planner models ``lru``).
        plan: per-layer :class:`~zipmoe_rt.engine.planner.TierPlan` list (``zipmoe``), aligned
            with ``hparams["moe_layers"]``.
        ranks: per MoE layer, expert ids by descending popularity (from the trace) for ``zipmoe``.
        workers: L decode workers (default: cores).
        io_depth: reads in flight at once (threads issuing ``pread``; default
            :data:`~zipmoe_rt.engine.io.IO_DEPTH`). 1 is the paper's single I/O thread; more lets the device overlap
            the two region reads of a miss and the reads of different experts (SSDs and
            virtual disks serve small reads faster with several queued).
        direct: O_DIRECT reads.
        verify: CRC-check every piece loaded, and every region read from the file the first
            time this engine reads it (:meth:`_read`).
        adapt: ``zipmoe`` only: let C/S/E slots move to hotter experts while running
            (:meth:`_adapt_slots`); False keeps them where the plan put them.
        backend: compute backend of the experts (:func:`~zipmoe_rt.backends.get_backend`;
            default numba); the model using this engine must use the same one. Decoding
            (Huffman + plane merge) always runs on the host.
        prefetch: start the loads of the next MoE layer's predicted experts while a layer
            computes (engine/prefetch.py; the model's look-ahead is installed by
            :func:`~zipmoe_rt.engine.prefetch.attach`). Off when the budget has no room for a
            second working set (:func:`budget_split`); :attr:`prefetch` says which.
        resident, c_form, escape_share: the form of cached experts (``full``/``compressed``),
            of C slots (``packed``/``planes``) and the escape bound that sizes compute-form
            caches (:class:`~zipmoe_rt.engine.ctier.CTierMixin`).

    Raises:
        BudgetError: a budget below dense weights + one expert.
        ValueError: unknown policy/eviction, ``zipmoe`` without a plan, ``raw-lru`` on a file
            whose experts are bit-planes (or the reverse for the others).
    """

    def __init__(self, source, budget_bytes: int, policy: str = "zip-lru", eviction: str = "lru",
                 plan=None, ranks=None, workers: int | None = None, direct: bool = False,
                 verify: bool = True, delay=None, adapt: bool = True, io_depth: int | None = None,
                 backend=None, prefetch: bool = False, resident: str = "full",
                 c_form: str = "packed", escape_share: float | None = None):
        import os
        if policy not in POLICIES:
            raise ValueError(f"--policy must be one of {', '.join(POLICIES)}, got {policy!r}")
        if eviction not in EVICTIONS:
            raise ValueError(f"--eviction must be one of {', '.join(EVICTIONS)}, got {eviction!r}")
        self.source, self.policy, self.eviction, self.verify = source, policy, eviction, verify
        self._verified: set = set()         # (layer, expert, region) whose CRC-32 passed
        self.backend = get_backend(backend)
        self.path = source.path
        self.hp = source.hparams
        self.act = expert_act(source)
        self.k = int(self.hp["num_experts_per_tok"])
        self.layouts = source.layouts
        raw_experts = all(p.raw for lay in self.layouts.values() for p in lay.pieces)
        self._setup_compute_form(resident, c_form, escape_share, raw_experts)
        if policy == "raw-lru" and not raw_experts:
            raise ValueError(f"{self.path}: policy raw-lru needs a file with raw BF16 experts "
                             f"(convert with --expert-encoding raw; from a .zmoe: `zipmoe-rt "
                             f"export FILE -o DIR`, then `zipmoe-rt convert DIR "
                             f"--expert-encoding raw`)")
        if policy != "raw-lru" and raw_experts:
            raise ValueError(f"{self.path}: experts are stored raw; use --policy raw-lru")
        second = self.prefetch_second_set(self.layouts, prefetch)
        self.bytes_F, window, self.tier_budget = budget_split(source, budget_bytes, second)
        self._prefetch_setup(window > self.k or (bool(prefetch) and not second))
        # read buffers kept: the running layer's and the predicted loads' (the second working
        # set); decoded arrays: one layer's, and the predicted loads' where decoded at once
        self.read_window = window
        self.window = self.k if self.PREFETCH_READS_ONLY else window
        self.dense_bytes = source.dense_bytes()
        self.budget = int(budget_bytes)
        self.workers = int(workers or os.cpu_count() or 1)
        self.delay = delay
        self.reader = RegionReader(self.path, direct=direct)
        self.io_depth = check_io_depth(io_depth)
        self.io = ReadQueue(self.io_depth, "zipmoe-io")     # demand reads before guesses
        self.pool = ThreadPoolExecutor(self.workers, thread_name_prefix="zipmoe-decode")
        self._tls = threading.local()
        self.stats = StageTimes()
        self._lock = threading.Lock()
        self._spare: dict = {}              # piece shapes -> deque of reusable output arrays
        # reusable read buffers per region kind, each big enough for that region of any expert
        # (+ a page for O_DIRECT rounding); see :meth:`_take_read_buf`
        self._read_cap = read_buffer_cap(source)
        self._read_pool = {"sm": [], "exp": []}
        self._done_with: list = []          # (layout, arrays) computed and not kept in F
        self.slots: dict = {}               # (layer, e) -> Slot for C/S/E (and static F)
        self.plan = plan
        self.adapt = bool(adapt) and policy == "zipmoe"
        self.slot_moves = 0
        self.heat: dict = {}                # layer -> float64 [N] recency-weighted use counts
        if policy == "zipmoe":
            if plan is None or ranks is None:
                raise ValueError("policy zipmoe needs a plan from an activation trace: run "
                                 "`zipmoe-rt profile MODEL --prompts FILE` first")
            self.fpools = {}
            self._fill_tiers(plan, ranks)
            self._seed_heat(ranks)
            # slots adapt only where the plan has static slots (a layer planned as an LRU pool
            # alone has none to move: no heat to keep per call)
            self._adapting = {layer for layer, tp in zip(self.hp["moe_layers"], plan)
                              if tp.nC + tp.nS + tp.nE > 0}
        else:
            shared = self._shared_pool(eviction)
            self.fpools = {layer: shared for layer in self.hp["moe_layers"]}

    @classmethod
    def prefetch_second_set(cls, layouts: dict, prefetch: bool) -> bool:
        """Whether ``prefetch`` takes a second working set of ``k`` decoded experts from the
        budget (:func:`budget_split`): here always (the predicted loads' read buffers, then
        their decodes once claimed); the GPU engine's compressed experts do not
        (:meth:`~zipmoe_rt.engine.gpu_prefetch.GpuPrefetch.prefetch_second_set`)."""
        return bool(prefetch)

    # -- tiers -------------------------------------------------------------------------------
    def _load_now(self, lay):
        p = self._start(lay, None)
        p.done.wait()
        if p.error:
            raise p.error
        return p.weights

    def predicted_layer_s(self) -> float | None:
        """The planner's expected makespan of one MoE layer for one decode token (seconds; the
        mean of the layers' ``TierPlan.predicted_makespan_s``, design note §3), to set beside
        the measured ``stats.decode_layer_s / stats.decode_layer_calls``; None without a plan
        (policies other than ``zipmoe``)."""
        if not self.plan:
            return None
        return float(np.mean([tp.predicted_makespan_s for tp in self.plan]))

    def tier_of(self, layer: int, e: int) -> str:
        """Current tier of an expert: F, C, S, E or miss."""
        key = (layer, e)
        if key in self.fpools[layer].slots:
            return "F"
        s = self.slots.get(key)
        return s.tier if s is not None else "miss"

    def reverify(self) -> None:
        """Forget which expert regions passed their CRC-32 check, so that each is checked again
        at its next read (``verify``; a region is otherwise checked at its first read only)."""
        with self._lock:
            self._verified.clear()

    def memory_report(self) -> dict:
        """Resident bytes: dense, and experts per tier, plus the budget and working set."""
        rep = {"dense": self.dense_bytes, "F": 0, "C": 0, "S": 0, "E": 0}
        seen = set()
        for pool in self.fpools.values():
            if id(pool) not in seen:
                seen.add(id(pool))
                rep["F"] += pool.nbytes
        for s in self.slots.values():
            rep[s.tier] += s.nbytes
        rep["working set (max)"] = self.read_window * self.bytes_F
        rep["budget"] = self.budget
        return rep

    # -- tasks -------------------------------------------------------------------------------
    def _dctx(self):
        d = getattr(self._tls, "d", None)
        if d is None:
            d = self._tls.d = zstd.ZstdDecompressor()
        return d

    def _read(self, pend: PendingLoad, which: str):
        """Read region ``which`` (``sm``/``exp``) of ``pend``'s expert (an I/O thread); with
        :attr:`verify` its pieces' CRC-32 are checked at the engine's first read of the region
        only (every read checks that the open file did not change, :class:`~zipmoe_rt.engine.
        io.RegionReader`; the check costs more than the decode, docs/benchmarks.md §20).
        Raises zmoe.ChecksumError (naming file and tensor) or ModelFileError."""
        t0 = time.perf_counter()
        lay = pend.lay
        whole = pend.bufs[which] if which in pend.bufs else pend.sm   # pend.sm: a region map
        buf = self.reader.read(*(lay.sm_region if which == "sm" else lay.exp_region),
                               alloc=lambda n: whole[:n])
        dt_crc = 0.0
        key = (lay.layer, lay.expert, which)
        if self.verify and key not in self._verified:
            t1 = time.perf_counter()
            L_.check_regions(self.path, lay, buf if which == "sm" else None,
                             buf if which == "exp" else None)
            dt_crc = time.perf_counter() - t1
            with self._lock:
                self._verified.add(key)
        dt = time.perf_counter() - t0
        with self._lock:
            self.stats.verify_s += dt_crc
            self.stats.io_s += dt
            self.stats.bytes_read += buf.nbytes
            self.stats.reads += 1
        return buf

    def _worker_job(self, pend: PendingLoad, work, finish):
        """One of a load's decode-worker jobs: ``work()`` unless the load already failed (an
        exception is kept in ``pend.error`` for the waiting main thread), its time added to the
        decode statistics; the load's last job calls ``finish(pend)``."""
        t0 = time.perf_counter()
        try:
            if pend.error is None:
                work()
        except BaseException as e:  # noqa: BLE001 - handed to the waiting main thread
            pend.error = e
        dt = time.perf_counter() - t0
        with pend.lock:
            pend.left -= 1
            last = pend.left == 0
        with self._lock:
            self.stats.decode_s += dt
        if last:
            finish(pend)

    def _decode_job(self, pend: PendingLoad, pi: int, c0: int, c1: int):
        p = pend.lay.pieces[pi]
        self._worker_job(pend, lambda: L_.decode_chunks(self.path, p, c0, c1, pend.sm, pend.exp,
                                                        pend.outs[pi], self._dctx()),
                         self._finish)

    def _finish(self, pend: PendingLoad):
        try:
            if pend.error is None:
                pend.weights = L_.finish_expert(pend.lay, pend.outs, pend.sm)
        except BaseException as e:  # noqa: BLE001
            pend.error = e
        pend.done.set()   # its regions and arrays are released by :meth:`_resolve`

    def _decode(self, pend: PendingLoad):
        """Submit the expert's chunk decodes to the workers (or finish a raw expert); a load
        into the compute form runs one decode + transcode job per tensor instead."""
        if pend.packing:
            self._pack_jobs(pend)
            return
        jobs = pend.lay.jobs
        if not jobs:
            self._finish(pend)
            return
        pend.left = len(jobs)
        for pi, c0, c1 in jobs:
            self.pool.submit(self._decode_job, pend, pi, c0, c1)

    def _start(self, lay, slot: Slot | None, read_only: bool = False) -> PendingLoad:
        """Begin preparing one expert from its slot (C/S/E) or from flash (miss): its missing
        regions are read in parallel (one ``pread`` each, up to :attr:`io_depth` in flight
        over all experts, in submission order), and its decode starts when the last arrives.
        ``read_only``: only the reads start; the decode waits for :meth:`_release` (a
        predicted load, engine/prefetch.py: no decode work and no decoded arrays for a wrong
        guess)."""
        pend = PendingLoad(lay)
        if slot is not None and slot.packed is not None:   # C in the compute form: ready
            pend.weights, pend.held = slot.packed, True
            pend.done.set()
            return pend
        pend.packing = self._packing(lay)
        pend.deferred = bool(read_only)
        # output arrays are taken here, on the main thread: allocated on the I/O threads they
        # would come from per-thread malloc arenas that keep freed memory resident (a
        # read-only load takes them in :meth:`_release`, also on the main thread)
        pend.outs = None if pend.packing or read_only else self._take_outs(lay)
        need_sm = slot is None or slot.sm is None
        need_exp = (slot is None or slot.exp is None) and any(p.chunks for p in lay.pieces)
        if slot is not None:
            pend.sm, pend.exp = slot.sm, slot.exp
        reads = [w for w, need in (("exp", need_exp), ("sm", need_sm)) if need]
        if not reads:
            if read_only:
                pend.reads_done = True
            else:
                self._decode(pend)
            return pend
        pend.reads_left = len(reads)
        pend.bufs = {which: self._take_read_buf(which) for which in reads
                     if not (which == "sm" and self._own_sm(pend))}
        for which in reads:
            self.io.submit(self._read_task, pend, which, priority=int(read_only))
        return pend

    def _read_task(self, pend: PendingLoad, which: str):
        """One region read of ``pend`` on an I/O thread; the last of its reads starts the
        decode (or, after an error, wakes the waiting main thread)."""
        try:
            if pend.error is None and not pend.cancelled:
                buf = self._read(pend, which)
                setattr(pend, which, buf)
                with pend.lock:
                    pend.nread += buf.nbytes
        except BaseException as e:  # noqa: BLE001 - handed to the waiting main thread
            pend.error = e
        with pend.lock:
            pend.reads_left -= 1
            last = pend.reads_left == 0
            if last and pend.deferred:       # a read-only load: :meth:`_release` decodes it
                pend.reads_done = True
                return
        if not last:
            return
        self._after_reads(pend)

    def _after_reads(self, pend: PendingLoad):
        """All of ``pend``'s reads ended: start its decode, or wake the main thread after an
        error."""
        if pend.error is None:
            try:
                self._decode(pend)
                return
            except BaseException as e:  # noqa: BLE001 - a decode that cannot start (say, bad
                pend.error = e          # decode jobs) must wake the main thread, not vanish here
        pend.done.set()

    def _release(self, pend: PendingLoad):
        """Let a read-only load (``_start(..., read_only=True)``) go on to its decode: at once
        if its reads have ended, else when the last one does. Main thread (takes its output
        arrays)."""
        if not pend.deferred:
            return
        if not pend.packing and pend.outs is None:
            pend.outs = self._take_outs(pend.lay)
        with pend.lock:
            pend.deferred = False
            ended = pend.reads_done
        if ended:
            self._after_reads(pend)

    def _task(self, key, tier: str, work: int) -> Task:
        lay = self.layouts[key]
        d = self.delay
        if d is not None:
            io = (d.sm_read_s if tier in ("E", "miss") else 0.0) + \
                 (d.exp_read_s if tier in ("S", "miss") else 0.0)
            comp = d.decode_s
        else:  # rough constants: 1.5 GB/s flash, 1.5 G weights/s per worker
            io = ((lay.sm_region[1] if tier in ("E", "miss") else 0) +
                  (lay.exp_region[1] if tier in ("S", "miss") else 0)) / 1.5e9
            comp = lay.elements / 1.5e9
        return Task(key[1], "I" if tier in ("E", "miss") else "II", float(work), io, comp)

    def _prepare(self, layer: int, experts: list, work: dict) -> dict:
        """Start every non-resident expert of ``experts`` in scheduler order; {e: weights|pending}."""
        pool = self.fpools[layer]
        ready, tasks, tiers = {}, [], {}
        for e in experts:
            key = (layer, e)
            pool.touch(key, work[e])
            w = pool.get(key)
            c = self._c_hit(key) if w is None else None
            early = (self._claim_prefetched(key, w is not None or c is not None)
                     if self.prefetch else None)
            if w is not None or c is not None:    # F, or C in the compute form: no decode
                ready[e] = w if w is not None else c
                self.stats.hits["F" if w is not None else "C"] += 1
                continue
            tier = self.slots[key].tier if key in self.slots else "miss"
            self.stats.hits[tier] += 1
            tiers[e] = tier
            if early is not None:      # started by the previous layer's prediction
                ready[e] = early
                continue
            tasks.append(self._task(key, tier, work[e]))
        if tasks:
            for t in execution_order(schedule(tasks, self.workers)):
                key = (layer, t.expert)
                ready[t.expert] = self._start(self.layouts[key], self.slots.get(key))
        return ready

    def _resolve(self, layer: int, e: int, item):
        if isinstance(item, PendingLoad):
            t0 = time.perf_counter()
            item.done.wait()
            self.stats.wait_s += time.perf_counter() - t0
            if item.error is not None:
                raise item.error
            w, sm, exp, outs = item.weights, item.sm, item.exp, item.outs
            item.weights = item.sm = item.exp = item.outs = None
            if item.held:                 # a C slot's compute form: nothing to admit
                return w
            if not (self._admits((layer, e), w) and self.fpools[layer].admit((layer, e), w,
                                                                            in_use=())) \
                    and outs is not None:
                self._done_with.append((item.lay, outs))   # reusable once computed
            if self.adapt and layer in self._adapting and sm is not None and exp is not None:
                self._adapt_slots(layer, e, sm, exp, w)
            slot = self.slots.get((layer, e))
            for which, buf in item.bufs.items():   # back to the pool unless a slot adopted it
                held = getattr(slot, which, None)
                if held is None or not np.may_share_memory(held, buf):
                    self._give_read_buf(which, buf)
            item.bufs = {}
            return w
        return item

    # -- Executor protocol -------------------------------------------------------------------
    def run(self, layer, x, topk_idx, topk_w, glu=None):
        """``out[t] = sum_j topk_w[t, j] * expert_{topk_idx[t, j]}(x[t])`` (the ``Executor``
        protocol of :mod:`zipmoe_rt.models.moe`), through
        :func:`~zipmoe_rt.models.moe.accumulate_experts`: the non-resident experts of each group
        (all of one token's; :attr:`window` at a time for several tokens) are started in
        scheduler order, then each is waited for and computed in ascending index order.
        ``glu``: gpt-oss's clamped SwiGLU, or None."""
        t_start = time.perf_counter()
        T = topk_idx.shape[0]
        h0 = tuple(self.stats.hits.values()) if T == 1 else None
        if self.adapt and layer in self._adapting:
            self._note_use(layer, topk_idx)
        started = {}

        def prepare(group, work):
            started.update(self._prepare(layer, group, work))
            if self.prefetch:
                self._issue_prefetch()   # the next layer's predicted experts, queued behind

        def fetch(e):
            return self._resolve(layer, e, started.pop(e))

        def computed(dt):
            self.stats.compute_s += dt
            self._recycle()

        out = accumulate_experts(self.backend, x, topk_idx, topk_w, fetch, prepare, self.window,
                                 computed, self.act, glu)
        if self.prefetch:
            self._end_prefetch(layer, topk_idx)
        dt = time.perf_counter() - t_start
        self.stats.layer_s += dt
        self.stats.layer_calls += 1
        if T == 1:
            self.stats.decode_layer_s += dt
            self.stats.decode_layer_calls += 1
            key = ",".join(str(b - a) for a, b in zip(h0, self.stats.hits.values()))
            self.stats.call_hits[key] = self.stats.call_hits.get(key, 0) + 1
        return out

    def close(self):
        if self.prefetch:
            self._drop_prefetch()
        self.io.shutdown(wait=True)
        self.pool.shutdown(wait=True)
        self.reader.close()
