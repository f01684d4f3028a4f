"""The budgeted expert engine on a GPU: ``--memory-budget`` counts GPU memory, experts cross
PCIe compressed and are decoded on the GPU.

The tiers, policies, plan and cache-affinity order are those of
:class:`~zipmoe_rt.engine.pipeline.ExpertEngine` (design note §2-§5); what changes is where the
bytes live and who decodes them:

* **F** experts are BF16 words in GPU memory (the F pools, with the engine's eviction);
* **C** experts are their SM region + exponent region in GPU memory (+ their segment tables,
  :mod:`~zipmoe_rt.engine.gpu_meta`), decoded on the GPU when used; **S** / **E** hold one
  region on the GPU and fetch the other;
* a **miss** comes from the pinned host cache (``--host-budget``: experts kept in host RAM in
  compressed form, most popular first) or is read from the file (``pread`` on an I/O thread into
  a pinned staging block, CRC-checked); either way one ``cudaMemcpyAsync`` on the copy stream
  moves the expert's compressed bytes (and its segment tables) into a device staging arena,
  after the other misses of the same MoE call; the decode stream waits for the copies' event
  and decodes all of them in one launch, each into a fresh BF16 buffer, and the compute stream
  waits for that launch's event: no host synchronisation
  (:mod:`~zipmoe_rt.engine.gpu_batch`; :meth:`_launch` is the one-expert path, for raw
  experts, host-decoded ones and ``gpu_batch.BATCHED`` off);
* ``raw-lru`` keeps its meaning: raw BF16 experts cross PCIe as they are (no decode);
* with ``prefetch`` the next MoE layer's predicted misses are started while a layer computes
  (:mod:`~zipmoe_rt.engine.gpu_prefetch`);
* the host reads routing decisions into pinned memory, several arrays in one read
  (:mod:`~zipmoe_rt.backends.cuda_reads`).

The model's kernels see the same BF16 words in the same order as without a budget, so logits
are bit-identical to the unbudgeted GPU run. Adaptive slot moves (``adapt``) are not done on the
GPU (the slots stay where the plan put them). Experts whose pieces are not all BF16 with Huffman
exponents (F16/F32 tensors, zstd-coded v1 files) are decoded on the host and uploaded. gpt-oss's
experts (in x out slices of the stacked tensors, with biases) are decoded on the GPU like the
others and rearranged there into [out, in] matrices (:func:`assemble`).

The device operations come from an ``ops`` object: :class:`~zipmoe_rt.backends.cuda_experts.
CudaOps` on the GPU, :class:`~zipmoe_rt.engine.gpu_ops.HostOps` (the same engine on host arrays)
in the tests of machines without a GPU.
"""
from __future__ import annotations

import math
import time

import numpy as np

from . import layout as L_
from . import lowprec
from .gpu_batch import BatchedMisses, GpuStageTimes
from .gpu_meta import block_layout, build_meta, gpu_decodable, meta_bound, pack_meta
from .gpu_prefetch import GpuPrefetch
from .pipeline import ExpertEngine
from .tiers import Slot
from ..models.weights import ExpertWeights


def assemble(ops, roles: dict, stream) -> ExpertWeights:
    """An expert's device weights from its decoded roles (device arrays of BF16 words): gate,
    up and down as they are, or gpt-oss's ``gate_up_cols`` [H, 2I] (gate the even columns, up
    the odd), ``down_cols`` [I, H] and biases rearranged as
    :func:`~zipmoe_rt.models.weights.assemble_expert` does on the host: gate and up [I, H],
    down [H, I], the biases split the same way, each copied on ``stream`` into memory taken
    for the compute stream (``ops.empty``).

    Raises:
        KeyError: a role is missing.
    """
    if "gate_up_cols" not in roles:
        return ExpertWeights(roles["gate"], roles["up"], roles["down"])
    gu, dc, gub, db = (roles[k] for k in ("gate_up_cols", "down_cols", "gate_up_bias",
                                           "down_bias"))
    H, I = gu.shape[0], gu.shape[1] // 2

    def new(*shape):
        return ops.empty(math.prod(map(int, shape)), np.uint16).reshape(shape)
    w = ExpertWeights(new(I, H), new(I, H), new(H, I), new(I), new(I), new(H))
    with ops.on(stream):
        w.gate[...] = gu[:, 0::2].T
        w.up[...] = gu[:, 1::2].T
        w.down[...] = dc.T
        w.gate_bias[...] = gub[0::2]
        w.up_bias[...] = gub[1::2]
        w.down_bias[...] = db
    return w


class _GPending:
    """An expert on its way to the GPU: read (future), then uploaded and decoded (event)."""

    __slots__ = ("lay", "key", "slot", "block", "staging", "future", "need_sm", "need_exp",
                 "weights", "event", "keep")

    def __init__(self, lay, slot):
        self.lay, self.key, self.slot = lay, (lay.layer, lay.expert), slot
        self.block = self.future = self.weights = self.event = self.keep = None
        self.staging = False


class GpuExpertEngine(GpuPrefetch, BatchedMisses, ExpertEngine):
    """:class:`~zipmoe_rt.engine.pipeline.ExpertEngine` whose tiers live in GPU memory (see the
    module docstring).

    Args:
        source, budget_bytes, policy, eviction, plan, ranks, workers, direct, verify, delay,
            io_depth, backend: as for :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`
            (``budget_bytes`` counts GPU memory: dense weights, one token's decoded experts and
            the tiers).
        ops: the device operations (:class:`~zipmoe_rt.backends.cuda_experts.CudaOps`).
        host_budget: bytes of pinned host memory for experts kept in host RAM (compressed
            regions + segment tables; raw regions for ``raw-lru``); 0 = every miss is read
            from the file.
        prefetch: cross-layer prefetch (:mod:`~zipmoe_rt.engine.gpu_prefetch`: the next MoE
            layer's predicted misses cross PCIe while a layer computes and are decoded once its
            matmuls are queued); compressed experts need no second working set, raw ones do
            and run without prefetch where the budget has no room for it, as on the host.

    Raises:
        as :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`; zmoe.ChecksumError for a corrupt
        expert met while filling the host cache.
    """

    def __init__(self, source, budget_bytes: int, policy: str = "zip-lru", eviction: str = "lru",
                 plan=None, ranks=None, workers: int | None = None, direct: bool = False,
                 verify: bool = True, delay=None, io_depth: int | None = None, backend=None,
                 ops=None, host_budget: int = 0, prefetch: bool = False):
        if ops is None:
            raise ValueError("GpuExpertEngine needs device operations (ops)")
        self.ops = ops
        self._copy_s, self._dec_s = ops.stream(), ops.stream()
        self._meta: dict = {}        # key -> ExpertMeta (host)
        self._dmeta: dict = {}       # key -> (runs, bits, tabs) on the device, C/E slots
        self._host: dict = {}        # key -> pinned block (host cache)
        self._staging: list = []     # free pinned staging blocks: (block, event of last copy)
        self.host_budget = int(host_budget)
        self._host_regions = 0       # bytes of expert regions in the host cache
        self._batch_setup(False)
        self._in_call = False        # an MoE call is running (GpuPrefetch defers its decode)
        super().__init__(source, budget_bytes, policy, eviction, plan=plan, ranks=ranks,
                         workers=workers, direct=direct, verify=verify, delay=delay, adapt=False,
                         io_depth=io_depth, backend=backend, prefetch=prefetch,
                         c_form="planes")   # C slots: both regions, decoded on the GPU per use
        self._slots_to_device()
        self._fill_host(ranks)
        self._batch_setup(True)
        self.stats = GpuStageTimes(ops=ops)

    @property
    def stats(self) -> GpuStageTimes:
        """The engine's :class:`GpuStageTimes` (a plain ``StageTimes`` assigned by the base
        class becomes one)."""
        return self._gstats

    @stats.setter
    def stats(self, v):
        self._gstats = v if isinstance(v, GpuStageTimes) else GpuStageTimes(ops=self.ops)

    # -- filling ------------------------------------------------------------------------------
    def _meta_of(self, lay, exp):
        key = (lay.layer, lay.expert)
        m = self._meta.get(key)
        if m is None and gpu_decodable(lay):
            m = self._meta[key] = build_meta(lay, exp)
        return m

    def _slots_to_device(self):
        """Move the C/S/E slots the plan filled (host arrays) into GPU memory, with the segment
        tables of those holding the exponent region."""
        ops = self.ops
        for key, s in list(self.slots.items()):
            lay = self.layouts[key]
            if not gpu_decodable(lay):
                continue                         # decoded on the host: stays there
            if s.exp is not None:
                m = self._meta_of(lay, s.exp)
                if not m.raw:
                    self._dmeta[key] = tuple(ops.to_device(a) for a in (m.runs, m.bits, m.tabs))
            self.slots[key] = Slot(s.tier, sm=None if s.sm is None else ops.to_device(s.sm),
                                   exp=None if s.exp is None else ops.to_device(s.exp))

    def _fill_host(self, ranks):
        """Keep experts in pinned host memory, within :attr:`host_budget` (counting their
        regions; their segment tables, about 1 % more, ride along): by popularity rank (the
        trace's, else expert index), one rank across all layers at a time; experts held whole
        on the GPU (C slots) are skipped."""
        if self.host_budget <= 0:
            return
        layers = list(self.hp["moe_layers"])
        n = int(self.hp["num_experts"])
        used = 0
        for r in range(n):
            for li, layer in enumerate(layers):
                if ranks is not None and r >= len(ranks[li]):
                    continue
                e = int(ranks[li][r]) if ranks is not None else r
                key = (layer, e)
                s = self.slots.get(key)
                if key not in self.layouts or (s is not None and s.tier == "C"):
                    continue
                lay = self.layouts[key]
                comp = any(p.chunks for p in lay.pieces)
                need = lay.sm_region[1] + (lay.exp_region[1] if comp else 0)
                if used + need > self.host_budget:
                    return
                blk = self.ops.pinned(block_layout(lay, None)[1] + meta_bound(lay))
                self._read_regions(lay, blk, True, comp)
                self._host[key] = blk[:block_layout(lay, self._meta.get(key))[4]]
                self._host_regions += need
                used += need
        self.reader.bytes_read = 0
        self.reader.reads = 0

    def _read_regions(self, lay, blk, need_sm: bool, need_exp: bool):
        """Read the needed regions of ``lay`` into their places in block ``blk``, check their
        CRCs, and (with the exponent region) build and pack the segment tables."""
        e0 = block_layout(lay, None)[0]
        sm = exp = None
        for which, need, at in (("sm", need_sm, 0), ("exp", need_exp, e0)):
            if not need:
                continue
            off, n = lay.sm_region if which == "sm" else lay.exp_region
            if self.reader.direct:
                buf = self.reader.read(off, n)
                blk[at:at + n] = buf
            else:
                self.reader.read(off, n, alloc=lambda k, at=at: blk[at:at + k])
            if which == "sm":
                sm = blk[:n]
            else:
                exp = blk[at:at + n]
        if self.verify:
            L_.check_regions(self.path, lay, sm, exp)
        if exp is not None:
            m = self._meta_of(lay, exp)
            if m is not None:
                pack_meta(m, blk, lay)
        return sm, exp

    # -- staging ------------------------------------------------------------------------------
    def _take_staging(self, nbytes: int) -> np.ndarray:
        for i, (blk, ev) in enumerate(self._staging):
            if blk.size >= nbytes:
                del self._staging[i]
                if ev is not None:
                    self.ops.sync(ev)            # its last copy has left
                return blk
        return self.ops.pinned(max(nbytes, 1 << 20))

    def _give_staging(self, blk, ev):
        self._staging.append((blk, ev))

    # -- tasks --------------------------------------------------------------------------------
    def _start(self, lay, slot):
        """Begin bringing one expert to the GPU: from its C slot at once, from the host cache
        at once, or through a file read into a staging block (on an I/O thread)."""
        p = _GPending(lay, slot)
        raw = all(q.raw for q in lay.pieces)
        p.need_sm = slot is None or slot.sm is None
        p.need_exp = not raw and (slot is None or slot.exp is None)
        if p.need_sm or p.need_exp:
            host = self._host.get(p.key)
            if host is not None:
                p.block = host
                self.stats.host_hits += 1
            else:
                p.block = self._take_staging(block_layout(lay, None)[1] + meta_bound(lay))
                p.staging = True
                self.stats.file_misses += 1
                p.future = self.io.submit(self._read_task_gpu, p)
                return p
        self._queue(p)                  # launched by _flush with the layer's other misses
        return p

    def _read_task_gpu(self, p):
        t0 = time.perf_counter()
        self._read_regions(p.lay, p.block, p.need_sm, p.need_exp)
        n = (p.lay.sm_region[1] if p.need_sm else 0) + (p.lay.exp_region[1] if p.need_exp else 0)
        with self._lock:
            self.stats.io_s += time.perf_counter() - t0
            self.stats.bytes_read += n
            self.stats.reads += int(p.need_sm) + int(p.need_exp)

    def _host_decode(self, p):
        """Experts the GPU kernel does not take: decode on the host, upload the words."""
        lay, s = p.lay, p.slot
        e0 = block_layout(lay, None)[0]
        sm = p.block[:lay.sm_region[1]] if p.need_sm else self.ops.to_host(s.sm)
        exp = (p.block[e0:e0 + lay.exp_region[1]] if p.need_exp else
               (self.ops.to_host(s.exp) if s is not None and s.exp is not None else None))
        w = L_.decode_expert(self.path, lay, sm, exp if exp is not None else np.zeros(0, np.uint8),
                             self._dctx())
        if p.staging:
            self._give_staging(p.block, None)
        # FP8 / MXFP4: the form the unbudgeted GPU run holds (BF16 words where exact)
        if lowprec.is_lowprec_expert(lay):
            w = lowprec.expert_compute_form(w)
        self.stats.host_decodes += 1
        p.weights = w.map(self.ops.to_device)      # biases too (gpt-oss)
        self.stats.uploads += 1
        self.stats.pcie_bytes += w.nbytes

    def _launch(self, p):
        """Queue the upload (copy stream) and the decode (decode stream) of a ready expert."""
        lay, ops = p.lay, self.ops
        if not gpu_decodable(lay):
            self._host_decode(p)
            return
        m = self._meta.get(p.key)
        if m is None:       # raw experts (no exponents); compressed ones got theirs when read
            raw = all(q.raw for q in lay.pieces)
            m = self._meta_of(lay, None if raw else ops.to_host(p.slot.exp))
        e0, r0, b0, t0, end = block_layout(lay, m)
        sm_n, exp_n = lay.sm_region[1], lay.exp_region[1]
        ev_c = ops.record(ops.current())         # memory the compute stream freed is reusable
        dbuf, lo = None, 0
        if p.need_sm or p.need_exp:
            lo = 0 if p.need_sm else e0
            hi = end if p.need_exp else sm_n
            dbuf = ops.empty(hi - lo)
            ops.wait(self._copy_s, ev_c)
            ops.h2d(dbuf, p.block[lo:hi], self._copy_s)
            ev_up = ops.record(self._copy_s)
            if p.staging:
                self._give_staging(p.block, ev_up)
            self.stats.pcie_bytes += hi - lo
            self.stats.uploads += 1
            ops.wait(self._dec_s, ev_up)
        else:
            ops.wait(self._dec_s, ev_c)
        sm = dbuf[0:sm_n] if p.need_sm else p.slot.sm
        roles = {}
        if m.raw:           # views of the copied words; a copy only where one is misaligned
            words = sm.view(np.uint16)          # for the 16-byte loads of the GEMV kernels
            for role, w0, shape in m.outs:
                v = words[w0:w0 + math.prod(map(int, shape))]
                roles[role] = (v if (2 * w0) % 16 == 0 else ops.copy(v, self._dec_s)).reshape(shape)
        else:
            if p.need_exp:
                exp = dbuf[e0 - lo:e0 - lo + exp_n]
                runs = dbuf[r0 - lo:r0 - lo + m.runs.nbytes].view(np.int32).reshape(-1, 6)
                bits = dbuf[b0 - lo:b0 - lo + m.bits.nbytes].view(np.int32)
                tabs = dbuf[t0 - lo:end - lo].view(np.uint16).reshape(-1, 4096)
            else:
                exp = p.slot.exp
                runs, bits, tabs = self._dmeta[p.key]
            out = ops.empty(m.words, np.uint16)
            a = ops.record(self._dec_s, timing=True)
            ops.decode(exp, sm, runs, bits, tabs, m.segment, out, self._dec_s)
            b = ops.record(self._dec_s, timing=True)
            self.stats.events.append((a, b))
            self.stats.gpu_decodes += 1
            for role, w0, shape in m.outs:
                roles[role] = out[w0:w0 + math.prod(map(int, shape))].reshape(shape)
        p.weights = assemble(ops, roles, self._dec_s)
        p.event = ops.record(self._dec_s)
        p.keep = (dbuf, out) if not m.raw else dbuf     # read by the decode stream until then
        if len(self.stats.events) > 4096:
            self.stats.fold()

    def _wait_gpu(self, p):
        """The expert's weights, with the compute stream made to wait for their decode."""
        if p.future is not None:
            t0 = time.perf_counter()
            p.future.result()
            self.stats.wait_s += time.perf_counter() - t0
            p.future = None
            self._queue(p)
            self._flush()
        elif p.event is None and p.weights is None:
            self._flush()                       # still in the open batch
        if p.event is not None:
            self.ops.wait(self.ops.current(), p.event)
        w, p.weights, p.keep, p.block = p.weights, None, None, None
        return w

    def _load_now(self, lay):
        return self._wait_gpu(self._start(lay, None))

    def _prepare(self, layer: int, experts: list, work: dict) -> dict:
        ready = super()._prepare(layer, experts, work)
        self._flush()                   # the call's misses: one batch of copies and decodes
        return ready

    def run(self, layer, x, topk_idx, topk_w, glu=None):
        """:meth:`ExpertEngine.run <zipmoe_rt.engine.pipeline.ExpertEngine.run>`, with the
        call's compute-stream time recorded (:class:`GpuStageTimes`)."""
        a = self.ops.record(self.ops.current(), timing=True)
        self._in_call = True
        try:
            out = super().run(layer, x, topk_idx, topk_w, glu)
            self._note_layer(a)
        finally:
            self._end_call()
        return out

    def _resolve(self, layer: int, e: int, item):
        if isinstance(item, _GPending):
            w = self._wait_gpu(item)
            self.fpools[layer].admit((layer, e), w, in_use=())
            return w
        return item

    def _recycle(self):
        """Nothing to recycle: decoded buffers come from the device's memory pool."""

    # -- reports ------------------------------------------------------------------------------
    def memory_report(self) -> dict:
        """Bytes held: on the GPU the dense weights, tiers F/C/S/E (C and E with their segment
        tables) and the budget; in host memory the pinned host cache and staging blocks."""
        rep = super().memory_report()
        tables = sum(sum(a.nbytes for a in d) for d in self._dmeta.values())
        rep["tables (C/E)"] = tables
        rep["host pinned"] = self._host_regions
        rep["host tables"] = sum(b.nbytes for b in self._host.values()) - self._host_regions
        rep["host budget"] = self.host_budget
        rep["host staging"] = sum(b.nbytes for b, _ in self._staging)
        return rep

    def gpu_report(self) -> dict:
        """The device, and the counters of the GPU path since the last stats reset (with
        ``prefetch``: :meth:`~zipmoe_rt.engine.gpu_prefetch.GpuPrefetch.prefetch_report`)."""
        d = self.stats.as_dict()
        return {"device": self.ops.device_name(), "pcie_bytes": d["pcie_bytes"],
                "uploads": d["uploads"], "gpu_decodes": d["gpu_decodes"],
                "host_decodes": d["host_decodes"], "host_hits": d["host_hits"],
                "file_misses": d["file_misses"], "gpu_decode_s": d["gpu_decode_s"],
                "batches": d["batches"], "h2d_s": d["h2d_s"], "issue_s": d["issue_s"],
                "moe_compute_s": d["moe_compute_s"], "prefetch": self.prefetch_report()}

    def close(self):
        """Stop the I/O threads and drop every buffer the engine holds on the GPU and in pinned
        host memory (they go back to CuPy's pools)."""
        super().close()
        self.slots.clear()
        self._dmeta.clear()
        self._host.clear()
        self._staging.clear()
        self._batch = None
        self._arenas.clear()
        for pool in {id(p): p for p in self.fpools.values()}.values():
            pool.slots.clear()
