"""Memory-budgeted expert residency: the cache tiers of ZipMoE (design note §2) and the
eviction policies of the baselines.

Per expert, the budget holds one of

* ``F``: full weights, ready to run (``bytes_F`` = BF16 bytes);
* ``C``: sign+mantissa planes + compressed exponents (decode only);
* ``S``: sign+mantissa planes only (read the compressed exponents, decode);
* ``E``: compressed exponents only (read the sign+mantissa planes, decode);
* nothing (``miss``: read both regions, decode).

Type-I work (an SM read from flash) comes from E and miss; Type-II (decode only, or a small
exponent read) from S and C (§2, §4). Dense weights are not managed here: they stay resident.
"""
from __future__ import annotations

import math
from collections import OrderedDict
from dataclasses import dataclass, field

import numpy as np

from ..models.weights import ExpertWeights

TIERS = ("F", "C", "S", "E")
POLICIES = ("raw-lru", "zip-lru", "zipmoe")
EVICTIONS = ("lru", "lfu", "tlfu")


class BudgetError(ValueError):
    """A memory budget that cannot run the model (the message gives the minimum)."""


def smallest_budget(source) -> int:
    """The smallest weight budget that runs ``source`` (a
    :class:`~zipmoe_rt.engine.store.ZmoeSource`), in bytes: the dense weights plus the
    ``num_experts_per_tok`` largest full experts one token needs at once. The one minimum
    behind ``--memory-budget`` (:func:`~zipmoe_rt.engine.pipeline.budget_split`) and
    ``--memory-limit`` (:func:`~zipmoe_rt.engine.limit.plan_memory`)."""
    bytes_F = max(l.full_bytes for l in source.layouts.values())
    return source.dense_bytes() + int(source.hparams["num_experts_per_tok"]) * bytes_F


def mb_at_least(n_bytes: int) -> str:
    """A minimum in the messages: ``n_bytes`` in MB (10**6 bytes) rounded *up* to 0.1 MB, so
    that the size printed is itself enough (``"120.6 MB"`` for 120,512,345 bytes)."""
    return f"{math.ceil(int(n_bytes) / 1e5) / 10:.1f} MB"


def size_text(n_bytes: int) -> str:
    """A budget in the messages: in MB (10**6 bytes) to 0.1 MB, or in bytes below 1 MB (where
    0.1 MB steps would print ``0.0 MB`` for a budget of a few bytes)."""
    n = int(n_bytes)
    if n >= 10**6:
        return f"{n / 1e6:.1f} MB"
    return "1 byte" if n == 1 else f"{n} bytes"


@dataclass
class Slot:
    """What is resident for one expert. Exactly the fields of its tier are set; a C slot
    computed in place (``packed``, design note §6.5) holds the compute form and, in ``sm``,
    the SM region its matrices are views of (counted once, in ``packed``), no exponents."""

    tier: str
    full: ExpertWeights | None = None
    sm: np.ndarray | None = None     # uint8, the expert's whole SM region
    exp: np.ndarray | None = None    # uint8, the expert's whole exponent region
    packed: object = None            # PackedExpert (C tier in the compute form)

    @property
    def nbytes(self) -> int:
        if self.packed is not None:
            return self.packed.nbytes
        n = 0
        if self.full is not None:
            n += self.full.nbytes
        if self.sm is not None:
            n += self.sm.nbytes
        if self.exp is not None:
            n += self.exp.nbytes
        return n


@dataclass
class FullPool:
    """A pool of F-tier slots of one layer (or the whole model) with an eviction policy.

    ``lru``: least recently used; ``lfu``: fewest uses; ``tlfu``: token-weighted LFU (fewest
    tokens routed, ZipMoE's prototype). Experts in use by the running layer are never evicted.

    With ``admit_window > 0`` (``lru`` only; zipmoe's per-layer pools) admission is
    frequency-aware (TinyLFU-style): each :meth:`touch` adds 1 to the expert's use count, all
    counts are halved (integer) every ``admit_window`` touches, and a newcomer enters a full
    pool only if its count is at least that of the LRU victim. The planner replays exactly this
    policy (:func:`~zipmoe_rt.engine.planner.lru_pool_model` with ``admission=True``).

    Attributes:
        capacity: number of experts the pool holds (0 = none).
        admit_window: touches between halvings of the use counts; 0 = admit every newcomer.
    """

    capacity: int
    eviction: str = "lru"
    slots: "OrderedDict" = field(default_factory=OrderedDict)   # key -> ExpertWeights
    score: dict = field(default_factory=dict)                   # key -> uses or tokens
    admit_window: int = 0
    freq: dict = field(default_factory=dict)                    # key -> recent uses (admission)
    uses: int = 0
    # bytes the pool may hold (0: no bound beyond ``capacity``); pools of compute-form experts,
    # whose sizes differ by their escapes, evict until a newcomer fits
    max_bytes: int = 0

    def get(self, key):
        w = self.slots.get(key)
        if w is not None:
            self.slots.move_to_end(key)
        return w

    def touch(self, key, tokens: int):
        """Record a use (LFU: +1, token-weighted LFU: +tokens); call for hits and misses."""
        if self.eviction != "lru":   # LRU evicts by recency alone: no score to keep
            self.score[key] = self.score.get(key, 0) + (tokens if self.eviction == "tlfu" else 1)
        if self.admit_window > 0:
            self.freq[key] = self.freq.get(key, 0) + 1
            self.uses += 1
            if self.uses % self.admit_window == 0:
                self.freq = {k: f >> 1 for k, f in self.freq.items()}

    def admit(self, key, weights: ExpertWeights, in_use=()) -> bool:
        """Insert ``weights`` if the pool has room or a victim outside ``in_use`` is worse.

        Returns:
            True if ``key`` is in the pool afterwards."""
        if self.capacity <= 0:
            return False
        if key in self.slots:
            self.slots.move_to_end(key)
            return True
        if len(self.slots) >= self.capacity:
            cands = [k for k in self.slots if k not in in_use]
            if not cands:
                return False
            if self.eviction == "lru":
                victim = cands[0]
                if self.admit_window > 0 and self.freq.get(key, 0) < self.freq.get(victim, 0):
                    return False  # used less often lately than the expert it would push out
            else:
                victim = min(cands, key=lambda k: (self.score.get(k, 0), list(self.slots).index(k)))
                if self.score.get(victim, 0) > self.score.get(key, 0):
                    return False  # the newcomer is colder than everything resident
            del self.slots[victim]
        if self.max_bytes and not self._make_room(weights.nbytes, in_use):
            return False
        self.slots[key] = weights
        return True

    def would_admit(self, key) -> bool:
        """Whether :meth:`admit` of ``key`` now would keep it (experts in use aside): the same
        capacity, admission and victim rules, nothing changed. The engine asks it before a
        load, to make the compute form only of experts a compressed cache will keep."""
        if self.capacity <= 0:
            return False
        if key in self.slots or len(self.slots) < self.capacity:
            return True
        if self.eviction == "lru":
            victim = next(iter(self.slots))
            return not (self.admit_window > 0
                        and self.freq.get(key, 0) < self.freq.get(victim, 0))
        victim = min(self.slots, key=lambda k: (self.score.get(k, 0), list(self.slots).index(k)))
        return self.score.get(victim, 0) <= self.score.get(key, 0)

    def _make_room(self, need: int, in_use) -> bool:
        """Evict least recently admitted/used experts outside ``in_use`` until ``need`` more
        bytes fit :attr:`max_bytes`; False (nothing evicted beyond what fits) if they cannot."""
        have = self.nbytes
        while have + need > self.max_bytes:
            cands = [k for k in self.slots if k not in in_use]
            if not cands:
                return False
            have -= self.slots.pop(cands[0]).nbytes
        return True

    @property
    def nbytes(self) -> int:
        return sum(w.nbytes for w in self.slots.values())


def budget_split(source, budget_bytes: int, prefetch: bool = False) -> tuple[int, int, int]:
    """How a budget divides: ``(bytes of one full expert, working-set experts, tier bytes)``.

    The budget holds the dense weights, the working set of one token (its top-k experts
    decoded, which the fused decode kernel needs together) and the cache tiers. With
    ``prefetch`` the working set is ``2k`` experts when the budget leaves room for them, else
    ``k`` (the engine then runs without prefetch): the next layer's predicted loads
    (engine/prefetch.py) hold up to ``k`` more experts, decoded (the GPU engine) or as the read
    buffers of their two regions, which are smaller (the host engine, whose predicted loads
    only read).

    Raises:
        BudgetError: below dense weights + top-k experts (the message gives the minimum).
    """
    bytes_F = max(l.full_bytes for l in source.layouts.values())
    dense = source.dense_bytes()
    k = int(source.hparams["num_experts_per_tok"])
    free = int(budget_bytes) - smallest_budget(source)
    if free < 0:
        raise BudgetError(
            f"--memory-budget {size_text(budget_bytes)} is below the dense weights "
            f"({dense / 1e6:.1f} MB) plus the {k} experts one token uses ({k} x "
            f"{bytes_F / 1e6:.1f} MB): at least {mb_at_least(smallest_budget(source))} is needed")
    if prefetch and free >= k * bytes_F:
        return bytes_F, 2 * k, free - k * bytes_F
    return bytes_F, k, free
