"""Where the ``zipmoe`` policy keeps partial experts, and how that follows the running text.

:class:`SlotTiers` is the part of :class:`~zipmoe_rt.engine.pipeline.ExpertEngine` that fills
the tiers from the planner's :class:`~zipmoe_rt.engine.planner.TierPlan` (per layer an F pool of
full experts on top of C/S/E slots holding both, the SM or the exponent region of an expert;
design note ``ZIPMOE.md`` §3), keeps a recency-weighted heat of every expert, and moves a C/S/E
slot to an expert that became hotter (:meth:`SlotTiers._adapt_slots`) without any extra read.

It is a mixin: it works on the engine's state (``hp``, ``k``, ``layouts``, ``reader``,
``verify``, ``path``, ``eviction``, ``bytes_F``, ``tier_budget``, ``fpools``, ``slots``,
``heat``, ``slot_moves``) and loads F experts through the engine's ``_load_now``.
"""
from __future__ import annotations

import mmap

import numpy as np

from . import layout as L_
from .io import anon_array
from .planner import admission_window
from .tiers import BudgetError, FullPool, Slot


def _long_lived(buf: np.ndarray) -> np.ndarray:
    """``buf`` in its own memory map (:func:`~zipmoe_rt.engine.io.anon_array`), unless it
    already is one of about its size: slot buffers come and go one by one, and from the C heap
    they would leave resident holes."""
    b = buf
    while isinstance(b, np.ndarray):
        b = b.base
    # kept as is only if the map is about the region's size: a pooled read buffer is sized for
    # the largest region of its kind, and a slot must not hold (uncounted) more than a page or
    # two beyond the bytes it reports
    if isinstance(b, memoryview) and isinstance(b.obj, mmap.mmap) \
            and len(b.obj) - buf.nbytes <= 2 * mmap.PAGESIZE:
        return buf
    out = anon_array(buf.nbytes)
    out[:] = buf
    return out


class SlotTiers:
    """Tier filling, expert heat and adaptive C/S/E slots of the expert engine (a mixin of
    :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`; see the module docstring)."""

    def _fill_tiers(self, plan, ranks):
        """Load the C/S/E slots and the initial F pools of every layer (``zipmoe``).

        F is a pool of ``nF`` full experts per layer with the engine's eviction: ``lru`` (the
        default) is the recency pool the planner models (§3.6: LRU eviction, frequency-aware
        admission, see :class:`~zipmoe_rt.engine.tiers.FullPool`), ``lfu``/``tlfu`` count uses /
        tokens with scores seeded by the trace ranks. It starts with the ``nF`` most popular
        experts (the most popular the most recent) and is offered every expert it has to
        rebuild.
        C/S/E slots are static: a recency plan (``TierPlan.order`` set) puts them on
        ``order[:nC]``, ``order[nC:nC+nS]``, ``order[nC+nS:nC+nS+nE]``; a static plan on the
        popularity ranks after the ``nF`` F experts. An expert evicted from F falls back to its
        slot (or to a miss)."""
        used = 0
        filled = []
        compressed = self.resident == "compressed"
        for layer, tp, order in zip(self.hp["moe_layers"], plan, ranks):
            order = [int(e) for e in order]
            nF, nC, nS, nE = tp.nF, tp.nC, tp.nS, tp.nE
            pool = FullPool(nF, self.eviction,
                            admit_window=admission_window(nF, self.k) if self.eviction == "lru" else 0,
                            max_bytes=nF * self.bytes_P if compressed else 0)
            if self.eviction != "lru":
                for r, e in enumerate(order):
                    pool.score[(layer, e)] = len(order) - r   # seed scores with the trace's ranks
            self.fpools[layer] = pool
            for e in reversed(order[:nF]):
                w = self._load_now(self.layouts[(layer, e)])
                if compressed and pool.nbytes + w.nbytes > pool.max_bytes:
                    continue    # more escapes than planned: the pool starts one short
                pool.slots[(layer, e)] = w
                used += w.nbytes if compressed else self.bytes_F
            static = [int(e) for e in tp.order] if tp.order is not None else order[nF:]
            for r, e in enumerate(static):
                key, lay = (layer, e), self.layouts[(layer, e)]
                tier = "C" if r < nC else "S" if r < nC + nS else "E" if r < nC + nS + nE else None
                if tier is None:
                    break
                sm = self.reader.read(*lay.sm_region, alloc=anon_array) if tier in ("C", "S") else None
                exp = self.reader.read(*lay.exp_region, alloc=anon_array) if tier in ("C", "E") else None
                if self.verify:
                    L_.check_regions(self.path, lay, sm, exp)
                self.slots[key] = slot = (self._c_slot(lay, sm, exp) if tier == "C"
                                          else Slot(tier, sm=sm, exp=exp))
                used += slot.nbytes
                filled.append(key)
        used = self._shrink_c_slots(used, filled)
        if used > self.tier_budget:
            raise BudgetError(f"the tier plan needs {used / 1e6:.1f} MB but only "
                              f"{self.tier_budget / 1e6:.1f} MB of the budget is left for experts")
        self.reader.bytes_read = 0
        self.reader.reads = 0

    #: per-token decay of :attr:`heat` (half-life ~16 tokens)
    HEAT_DECAY = 0.957

    def _seed_heat(self, ranks):
        """Start every layer's heat from the trace's popularity order: linearly decreasing with
        the rank, scaled to the steady state of k uses per token (k / (1 - decay) in all)."""
        N = int(self.hp["num_experts"])
        for layer, order in zip(self.hp["moe_layers"], ranks):
            h = np.zeros(N)
            # rank-proportional prior (the trace's order, not its counts): the workload decides
            h[np.asarray(order, np.int64)] = np.linspace(1.0, 0.0, len(order), endpoint=False)
            self.heat[layer] = h * (self.k / max(h.sum(), 1e-12)) / (1.0 - self.HEAT_DECAY)

    def _note_use(self, layer, topk_idx):
        """Decay the layer's heat by one step per token and add this call's selections."""
        h = self.heat[layer]
        h *= self.HEAT_DECAY ** topk_idx.shape[0]
        np.add.at(h, topk_idx.reshape(-1), 1.0)

    #: the regions each slot tier holds, best tier first (a slot is better the more it holds)
    _HOLDS = {"C": ("sm", "exp"), "S": ("sm",), "E": ("exp",), "miss": ()}
    _RANK = {t: -i for i, t in enumerate(_HOLDS)}
    #: a slot moves only to an expert hotter by at least this many recent uses (hysteresis:
    #: with a few equally popular experts, slots would otherwise swap back and forth, and each
    #: move copies the regions into new memory)
    MOVE_MARGIN = 1.0

    def _adapt_slots(self, layer: int, e: int, sm: np.ndarray, exp: np.ndarray, weights=None):
        """Move a resident C/S/E slot to expert ``e`` of ``layer`` if ``e`` is now hotter.

        ``sm``, ``exp``: both regions of ``e``, just used for its decode (read from flash or
        already in its slot), so a move costs no I/O; ``weights``: what the decode made (a
        compute form of it becomes a compute-form C slot as it is, else the C slot is
        transcoded from the regions, engine/ctier.py). A compute-form C slot hands on only its
        SM region, so it can drop to S or out, not to E. ``e`` takes the tier of the coldest slot
        ``z`` of the layer that is better than its own and holds every region ``e``'s old tier
        holds (C > S > E > miss), if ``z`` is colder than ``e`` by :attr:`MOVE_MARGIN`; ``z``
        drops to ``e``'s old tier, keeping those regions. Resident bytes stay within the tier
        budget (experts of a layer differ only by a few KB of compressed exponents). The plan's
        C/S/E tiers thereby follow the running text's experts instead of the trace's (ZipMoE §3
        sizes the tiers; which experts fill them is recency-weighted).
        """
        h = self.heat[layer]
        cur = self.slots.get((layer, e))
        t_old = cur.tier if cur is not None else "miss"
        if t_old == "C":
            return            # already in the best slot tier (the common case: no search)
        need = set(self._HOLDS[t_old])
        best = None
        for z in range(h.shape[0]):
            sz = self.slots.get((layer, z))
            if (sz is None or z == e or self._RANK[sz.tier] <= self._RANK[t_old]
                    or not need <= set(self._holds(sz))):
                continue
            if h[z] + self.MOVE_MARGIN <= h[e] and (best is None or h[z] < h[best]):
                best = z
        if best is None:
            return
        sz = self.slots[(layer, best)]
        regions = {"sm": sm, "exp": exp}
        if sz.tier == "C":
            new_e = self._c_slot(self.layouts[(layer, e)], _long_lived(sm), exp, weights)
        else:
            new_e = Slot(sz.tier, **{r: _long_lived(regions[r]) for r in self._HOLDS[sz.tier]})
        new_z = Slot(t_old, **{r: getattr(sz, r) for r in need}) if need else None
        delta = new_e.nbytes + (new_z.nbytes if new_z else 0) - sz.nbytes - (cur.nbytes if cur else 0)
        resident = sum(sl.nbytes for sl in self.slots.values())
        if resident + delta > self.tier_budget - self._fpool_reserved():
            return
        self.slots[(layer, e)] = new_e
        if new_z is None:
            del self.slots[(layer, best)]
        else:
            self.slots[(layer, best)] = new_z
        self.slot_moves += 1

    def _fpool_reserved(self) -> int:
        """Bytes the F pools may hold at capacity (planned, not current)."""
        return sum(p.max_bytes or p.capacity * self.bytes_F for p in self.fpools.values())
