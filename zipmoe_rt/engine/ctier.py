"""Experts of the budgeted engine held and computed in the compute form (design note §2.1,
§6.5).

Two parts of :class:`~zipmoe_rt.engine.pipeline.ExpertEngine` use the form that
``--resident compressed`` keeps (:class:`~zipmoe_rt.models.packed.PackedExpert`: a 4-bit
exponent window index + escape list + the raw sign+mantissa plane, ~76 % of the BF16 bytes):

* **the C tier computed in place** (``c_form="packed"``, the default): a C slot of a packable
  expert (:func:`~zipmoe_rt.engine.resident.packable`) holds the expert's compute form,
  transcoded once when the slot is filled or moved; a C hit hands it to the expert kernels
  as it is, with no decode. ``c_form="planes"`` keeps the storage form (SM region + Huffman
  exponent region) and decodes it into BF16 at every use, as the paper's C tier does.
  Experts that are not packable always keep the storage form.
* **compressed caches** (``resident="compressed"``): every expert the engine prepares (misses
  and S/E hits) that its F cache would keep is read, its exponent chunks decoded into a byte
  plane and transcoded into the compute form, one decode job per tensor on the decode workers,
  instead of being merged into BF16 (one the cache would not keep is decoded as usual and
  dropped after use); the F caches (zip-lru's and raw-lru's shared LRU cache, zipmoe's per-layer F pools)
  then hold compute-form experts, so about 1.3x as many experts fit the same bytes. Raw-expert
  files (raw-lru) are split into planes at admission.

Bytes: a compute-form expert's size depends on its escapes, known once its exponents are
decoded; capacities are planned with :func:`~zipmoe_rt.engine.resident.compute_form_bytes` at
:attr:`CTierMixin.escape_share` (a bound), and what is held is counted from the arrays: each F
pool evicts until a newcomer fits its bytes (:attr:`~zipmoe_rt.engine.tiers.FullPool.
max_bytes`), and C slots that outgrow the tier budget at fill time drop to S.

It is a mixin: it works on the engine's ``layouts``, ``slots``, ``pool`` (decode workers),
``stats``, ``path``, ``verify``, ``tier_budget``, ``_dctx``, ``_decode_lock``.
"""
from __future__ import annotations

import mmap
import threading

import numpy as np

from ..models.packed import PackedExpert
from .io import anon_array
from .resident import compute_form_bytes, pack_expert, pack_piece, packable
from .tiers import FullPool, Slot

#: values of ``c_form``: ``packed`` computes C slots in place; ``planes`` decodes them at use
C_FORMS = ("packed", "planes")
#: escapes per weight assumed when sizing caches of compute-form experts before their
#: exponents are decoded (a bound: the default model's experts have 0.044 %; what is held is
#: always counted from the arrays)
ESCAPE_SHARE = 0.005

_tls = threading.local()


def _scratch(n: int) -> np.ndarray:
    """This thread's reusable uint8 buffer of at least ``n`` bytes (decoded exponents)."""
    buf = getattr(_tls, "plane", None)
    if buf is None or buf.size < n:
        buf = _tls.plane = np.empty(max(n, 1 << 20), np.uint8)
    return buf[:n]


def check_c_form(value) -> str:
    """``value`` if it is one of :data:`C_FORMS`.

    Raises:
        ValueError: naming the option and the accepted values.
    """
    if value not in C_FORMS:
        raise ValueError(f"c_tier (--c-tier): {value!r} is not one of {', '.join(C_FORMS)}")
    return value


class CTierMixin:
    """Compute-form C slots and compressed caches of the expert engine (see the module
    docstring)."""

    def _setup_compute_form(self, resident: str, c_form: str, escape_share: float | None,
                            raw_file: bool) -> None:
        from .resident import check_resident
        self.resident = check_resident(resident)
        self.c_form = check_c_form(c_form)
        self.escape_share = float(ESCAPE_SHARE if escape_share is None else escape_share)
        if not 0 <= self.escape_share <= 1:
            raise ValueError(f"escape_share must be in [0, 1], got {escape_share!r}")
        self._raw_file = raw_file
        lays = self.layouts.values()
        self._packs = {key: packable(lay, raw=raw_file) for key, lay in self.layouts.items()}
        #: bytes planned for one compute-form expert (the largest; BF16 bytes when unpackable)
        self.bytes_P = max((compute_form_bytes(l, self.escape_share) if self._packs[(l.layer, l.expert)]
                            else l.full_bytes) for l in lays)
        self.transcodes = 0          # experts transcoded into the compute form (counter)

    # -- which experts use the compute form ----------------------------------------------------
    @property
    def packed_c(self) -> bool:
        """Whether C slots of packable experts hold the compute form."""
        return self.c_form == "packed"

    def _packing(self, lay) -> bool:
        """Whether a load of ``lay`` ends in the compute form: ``resident="compressed"``, a
        packable expert, and its layer's F cache would keep it (:meth:`~zipmoe_rt.engine.
        tiers.FullPool.would_admit`). An expert the cache would not keep is decoded into BF16
        (1.3 ms on the default model's experts against 3.5 ms for the transcode) and not
        admitted (:meth:`_admits`)."""
        key = (lay.layer, lay.expert)
        return (self.resident == "compressed" and self._packs[key]
                and self.fpools[lay.layer].would_admit(key))

    def _admits(self, key, weights) -> bool:
        """Whether ``weights`` may enter ``key``'s F cache: with ``resident="compressed"`` only
        the compute form of a packable expert (a BF16 one was decoded because the cache would
        not keep it)."""
        return not (self.resident == "compressed" and self._packs[key]
                    and not isinstance(weights, PackedExpert))

    def _c_hit(self, key):
        """The compute form held by ``key``'s C slot, or None (no slot, or a storage-form
        slot that decodes at use)."""
        s = self.slots.get(key)
        return s.packed if s is not None else None

    # -- loads into the compute form -------------------------------------------------------
    def _shared_pool(self, eviction: str):
        """zip-lru's / raw-lru's one F cache for all layers, as many experts as the tier budget
        holds in their form (compressed: by the planned bytes, bounded by the real ones)."""
        if self.resident == "compressed":
            return FullPool(int(self.tier_budget // self.bytes_P), eviction,
                            max_bytes=int(self.tier_budget))
        return FullPool(int(self.tier_budget // self.bytes_F), eviction)

    def _own_sm(self, pend) -> bool:
        """Whether a load reads its SM region into its own memory map of the region's size
        (``pend.sm``, set here): a packing load of a bit-plane expert, whose compute form keeps
        views of it; other loads (and raw experts, split into new planes) use a pooled read
        buffer."""
        if not pend.packing or self._raw_file:
            return False
        pend.sm = anon_array(pend.lay.sm_region[1] + (mmap.PAGESIZE if self.reader.direct else 0))
        return True

    def _pack_jobs(self, pend) -> None:
        """Submit one job per tensor: decode its exponent chunks, transcode (runs on the
        decode workers, without the GIL in the kernels)."""
        pend.parts = {}
        pend.left = len(pend.lay.pieces)
        for pi in range(len(pend.lay.pieces)):
            self.pool.submit(self._pack_job, pend, pi)

    def _pack_job(self, pend, pi: int) -> None:
        p = pend.lay.pieces[pi]

        def work():
            part = pack_piece(self.path, p, pend.sm, pend.exp, self._dctx(),
                              _scratch(p.elements), anon_array)
            with pend.lock:
                pend.parts.update(part)
        self._worker_job(pend, work, self._pack_finish)

    def _pack_finish(self, pend) -> None:
        """The last tensor of a load into the compute form is packed: its expert."""
        if pend.error is None:
            r = pend.parts
            pend.weights = PackedExpert(r["gate"], r["up"], r["down"])
            with self._lock:
                self.transcodes += 1
        pend.parts = None
        pend.done.set()

    # -- C slots -----------------------------------------------------------------------------
    def _c_slot(self, lay, sm: np.ndarray, exp: np.ndarray, weights=None) -> Slot:
        """A C slot for ``lay`` from its two regions (``sm`` long-lived: the compute form keeps
        views of it): the compute form when :attr:`packed_c` and the expert is packable
        (``weights``, a compute form of it already made, is taken as it is), else both regions.
        """
        key = (lay.layer, lay.expert)
        if not (self.packed_c and self._packs[key]) or self._raw_file:
            return Slot("C", sm=sm, exp=exp)
        if not isinstance(weights, PackedExpert):
            weights = pack_expert(self.path, lay, sm, exp, self._dctx())
            self.transcodes += 1
        return Slot("C", sm=sm, packed=weights)

    def _shrink_c_slots(self, used: int, order: list) -> int:
        """Drop compute-form C slots to S (their SM region kept, index and escapes freed),
        last filled first, until ``used`` bytes fit :attr:`tier_budget`; the bytes then used.
        Only when the escapes exceed the planned bound (:attr:`escape_share`)."""
        for key in reversed(order):
            if used <= self.tier_budget:
                break
            s = self.slots.get(key)
            if s is not None and s.packed is not None:
                new = Slot("S", sm=s.sm)
                used -= s.nbytes - new.nbytes
                self.slots[key] = new
        return used

    def _holds(self, slot: Slot) -> tuple:
        """The regions a slot can hand to another tier: a compute-form C slot has only its
        SM region (its exponents live in the index)."""
        return ("sm",) if slot.packed is not None else self._HOLDS[slot.tier]


def compute_form_delay(delay, source, calib: dict, resident: str, c_form: str, backend=None):
    """The planner's C-tier terms (and, with ``resident="compressed"``, its F-tier terms) for
    experts held in the compute form: ``(delay, escape_share)``.

    * C-tier bytes (``bytes_c_form``): :func:`~zipmoe_rt.engine.resident.compute_form_bytes`
      of the largest expert at ``escape_share``, a bound: twice the largest share of escapes
      the calibration saw, at least :data:`ESCAPE_SHARE`.
    * C-hit time (``c_matmul_s``, and no engine load term ``load_C_s``, which
      ``calibrate`` measures on storage-form C slots): the packed matmul of the calibration
      (:func:`~zipmoe_rt.engine.calibration.compute_form_costs`; a calibration without it,
      from an older zipmoe-rt, gets it measured now on two sample experts, not saved).
    * ``resident="compressed"``: F holds the compute form too (``bytes_F``), every expert is
      computed from it (``matmul_s``) and a decode is a transcode (``decode_s``).

    ``c_form="planes"``, or a file with an expert that is not packable (its C slot keeps the
    storage form, so the C tier is priced as such), returns ``delay`` with its storage-form
    C tier.

    Args:
        delay: the storage-form :class:`~zipmoe_rt.engine.planner.DelayModel` of the run.
        source: the model's :class:`~zipmoe_rt.engine.store.ZmoeSource`.
        calib: the calibration dict in use (read, not changed).
        resident, c_form: the engine's options.
        backend: the compute backend (for a measurement).
    """
    import dataclasses
    lays = list(source.layouts.values())
    if not all(packable(l) for l in lays):
        return delay, ESCAPE_SHARE
    costs = calib if "c_matmul_s" in calib else _measure(source, calib, backend)
    share = max(ESCAPE_SHARE, 2.0 * float(costs.get("escape_share", 0.0)))
    if not costs.get("c_matmul_s"):
        return delay, share
    bytes_P = max(compute_form_bytes(l, share) for l in lays)
    c_mm = float(costs["c_matmul_s"])
    if resident == "compressed":
        delay = dataclasses.replace(delay, bytes_F=bytes_P, matmul_s=c_mm,
                                    decode_s=float(costs.get("transcode_s", delay.decode_s)),
                                    chunks=max(1, len(lays[0].pieces)))
    if c_form == "packed":   # a C hit loads nothing: no engine load term (engine/overhead.py)
        delay = dataclasses.replace(delay, bytes_c_form=bytes_P, c_matmul_s=c_mm, load_C_s=0.0)
    return delay, share


def _measure(source, calib: dict, backend=None) -> dict:
    """:func:`~zipmoe_rt.engine.calibration.compute_form_costs` on two sample experts (the
    first and the last of the file), for a calibration that lacks them."""
    from ..backends import get_backend
    from .calibration import compute_form_costs
    from .io import RegionReader
    keys = sorted(source.layouts)
    rr = RegionReader(source.path)
    try:
        bufs = [(source.layouts[k], rr.read(*source.layouts[k].sm_region),
                 rr.read(*source.layouts[k].exp_region)) for k in (keys[0], keys[-1])]
    finally:
        rr.close()
    return compute_form_costs(source, bufs, get_backend(backend), float(calib["matmul_s"]))
