"""The budgeted expert engine (zipmoe_rt/engine/pipeline.py) as the model's expert executor.

* Parity: under every policy (raw-lru on a raw-expert file, zip-lru, zipmoe with tier plans of
  all four tiers), budget (the minimum: dense + one expert, so a window of 1; a middle one; one
  holding every expert) and eviction (lru/lfu/tlfu), a 16-token prefill and 10 greedy decode
  steps give exactly (np.array_equal) the [T, vocab] and per-step logits, and the tokens, of the
  unbudgeted model, on every tiny architecture; the same on the default model at "25%".
* Errors: budgets below the minimum (API and CLI), unparseable budgets, missing / foreign /
  malformed traces, policies that do not fit the file's expert encoding.
* Accounting: memory_report() within the budget at every MoE call, hit counters = expert uses,
  a second pass with everything cached is all F hits with no reads, zipmoe tiers = the plan
  (F warm-started by trace popularity, static C/S/E slots on the plan's order).
* zipmoe's F pool: LRU eviction with frequency-aware admission over static slots (an evicted
  expert falls back to its slot), exactly what the planner's trace replay predicts; traces keep
  the token sequences and per-layer repeats, and malformed sequences are refused.
* Corruption: a flipped byte in an expert's region raises zmoe.ChecksumError naming the tensor.

"""
from __future__ import annotations

import json
import re
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pytest

import zmoe
import zipmoe_rt
from zipmoe_rt.api import parse_size
from zipmoe_rt.engine import layout as L_
from zipmoe_rt.engine.io import IO_DEPTH
from zipmoe_rt.engine import buffers
from zipmoe_rt.engine import calibration
from zipmoe_rt.engine import profile as prof
from zipmoe_rt.engine.pipeline import ExpertEngine, budget_split
from zipmoe_rt.engine.ctier import ESCAPE_SHARE
from zipmoe_rt.engine.planner import DelayModel
from zipmoe_rt.engine.resident import compute_form_bytes, packable
from zipmoe_rt.models.packed import PackedExpert
from zipmoe_rt.engine.profile import TraceError
from zipmoe_rt.engine.store import ZmoeSource
from zipmoe_rt.engine.tiers import BudgetError
from zipmoe_rt.models import build_model

from tiny_models import SPECS

ARCHS = list(SPECS)             # every tiny spec, every family
PROMPT_LEN = 16
DECODE_STEPS = 10
WORKERS = 2
EVICTIONS = ["lru", "lfu", "tlfu"]
BUDGETS = ["min", "mid", "all"]
#: planner delay constants (sm read, exponent read, decode; seconds) chosen so that, between
#: them, the middle budget's plans use every tier: C+E, S (+C/E), F+E.
DELAYS = {"CE": (1e-3, 1e-3, 1e-5), "S": (1e-3, 1e-5, 1e-4), "FE": (1e-5, 1e-3, 1e-4)}


# ------------------------------------------------------------------------------------------------
# helpers


def generate(net, ids, steps):
    """Prefill ``ids`` (all positions' logits), then ``steps`` greedy decode steps with the KV
    cache. Returns ([prefill [T, vocab], step 1 [vocab], ...], tokens)."""
    cache = net.new_cache()
    logits = [net.forward(np.asarray(ids, np.int64), cache, last_only=False)]
    tok = int(np.argmax(logits[0][-1]))
    tokens = [tok]
    for _ in range(steps):
        out = net.forward(np.array([tok], np.int64), cache)
        logits.append(out)
        tok = int(np.argmax(out))
        tokens.append(tok)
    return logits, tokens


def assert_same_logits(got, want):
    assert len(got) == len(want)
    assert got[0].shape == want[0].shape and got[0].ndim == 2
    for i, (a, b) in enumerate(zip(got, want)):
        assert a.dtype == b.dtype == np.float32
        assert np.array_equal(a, b), (
            f"step {i}: logits differ (max |diff| {np.abs(a - b).max():.3g})")


def resident_total(rep: dict) -> int:
    return (rep["dense"] + rep["F"] + rep["C"] + rep["S"] + rep["E"]
            + rep["working set (max)"])


def popularity_ranks(counts) -> list[list[int]]:
    """Expert ids of each layer by descending trace count, ties by ascending id."""
    return [sorted(range(len(c)), key=lambda e: (-int(c[e]), e)) for c in np.asarray(counts)]


class CallLog:
    """Route hook: per MoE call, the engine's memory report before the call (the state the
    previous call left) and the number of distinct experts the call uses."""

    def __init__(self, engine):
        self.engine = engine
        self.reports = []
        self.uses = 0

    def __call__(self, layer, x, logits, idx, w):
        self.reports.append(self.engine.memory_report())
        self.uses += len(np.unique(idx))


@dataclass
class Case:
    """A tiny architecture converted twice (bit-planes and raw experts), with the unbudgeted
    reference generation and an activation trace."""

    name: str
    zmoe: Path
    raw: Path
    folder: Path
    hp: dict
    layouts: dict
    dense: int
    bytes_F: int
    ids: np.ndarray
    ref_logits: list
    ref_tokens: list
    trace_path: Path
    counts: np.ndarray
    runs: dict = field(default_factory=dict)

    @property
    def k(self) -> int:
        return int(self.hp["num_experts_per_tok"])

    @property
    def n_total(self) -> int:
        return len(self.layouts)

    def budget(self, which: str) -> int:
        if which == "min":  # dense + the top-k working set of one token, no tiers
            return self.dense + self.k * self.bytes_F
        if which == "mid":
            return self.dense + self.k * self.bytes_F + self.n_total * self.bytes_F // 3
        return self.dense + (self.k + self.n_total) * self.bytes_F

    @property
    def packable(self) -> bool:
        """Every expert has a compute form (then C slots hold it, engine/ctier.py)."""
        return all(packable(l) for l in self.layouts.values())

    def delay(self, which: str) -> DelayModel:
        """The delay constants ``which``, with the C tier priced in the form the engine holds
        it (the compute form when every expert is packable, as build_engine does)."""
        sm_s, exp_s, dec_s = DELAYS[which]
        lays = self.layouts.values()
        c_form = max(compute_form_bytes(l, ESCAPE_SHARE) for l in lays) if self.packable else 0
        return DelayModel(sm_read_s=sm_s, exp_read_s=exp_s, decode_s=dec_s, matmul_s=1e-6,
                          workers=WORKERS, bytes_F=self.bytes_F,
                          bytes_sm=max(l.sm_region[1] for l in lays),
                          bytes_exp=max(l.exp_region[1] for l in lays),
                          chunks=max(1, max(sum(len(p.chunks) for p in l.pieces) for l in lays)),
                          # a C hit computed in place priced like a decode on one worker, so
                          # that the delay sets still favour the tiers they are named after
                          bytes_c_form=c_form, c_matmul_s=1e-6 + 2 * dec_s if c_form else 0.0)


def make_engine(case: Case, budget: int, policy: str, eviction: str = "lru", delay=None,
                path: Path | None = None, trace: str = "recorded", locality: bool = True,
                adapt: bool = True):
    """(source, engine, plan) over a fresh budgeted source; zipmoe plans from the case's trace
    (``recorded``: with token sequences; ``counts-only``: an older trace without them)."""
    path = path or (case.raw if policy == "raw-lru" else case.zmoe)
    source = ZmoeSource(path, keep_experts=False, copy_dense=True)
    plan = None
    try:
        if policy == "zipmoe":
            tr = prof.load_trace(case.folder / f"{trace}.trace.json", source)
            plan, ranks = prof.make_plan(tr, delay, budget_split(source, budget)[2], case.k,
                                         locality=locality)
            engine = ExpertEngine(source, budget, "zipmoe", eviction, plan=plan.layers,
                                  ranks=ranks, workers=WORKERS, delay=delay, adapt=adapt)
        else:
            engine = ExpertEngine(source, budget, policy, eviction, workers=WORKERS)
    except BaseException:
        source.close()
        raise
    return source, engine, plan


def budgeted_run(case: Case, policy: str, budget: str, eviction: str, delay: str | None):
    """Run the reference prompt through a budgeted engine once (cached per configuration)."""
    key = (policy, budget, eviction, delay)
    if key not in case.runs:
        b = case.budget(budget)
        source, engine, plan = make_engine(case, b, policy, eviction,
                                           case.delay(delay) if delay else None)
        try:
            net = build_model(source, executor=engine)
            log = CallLog(engine)
            net.route_hook = log
            logits, tokens = generate(net, case.ids, DECODE_STEPS)
            log.reports.append(engine.memory_report())
            case.runs[key] = dict(logits=logits, tokens=tokens, reports=log.reports,
                                  uses=log.uses, hits=dict(engine.stats.hits), budget=b,
                                  window=engine.window, plan=plan)
        finally:
            engine.close()
            source.close()
    return case.runs[key]


def make_case(z: Path, folder: Path, name: str, seed: int) -> Case:
    """A :class:`Case` over the container ``z``: its raw companion, its unbudgeted reference run
    over random ids (``PROMPT_LEN`` of them, then ``DECODE_STEPS`` greedy steps; generator
    seeded with ``seed``) and an activation trace recorded by hand over other random ids, saved
    in ``folder`` as ``recorded.trace.json`` and, as an older profile wrote it (counts and
    locality, no sequences), as ``counts-only.trace.json``."""
    from zipmoe_rt.bench import raw_companion

    raw = raw_companion(z)
    src = ZmoeSource(z)
    try:
        layouts = L_.expert_layouts(src.reader)
        net = build_model(src)
        vocab = int(src.hparams["vocab_size"])
        rng = np.random.default_rng(seed)
        ids = rng.integers(0, vocab, PROMPT_LEN)
        ref_logits, ref_tokens = generate(net, ids, DECODE_STEPS)
        # activation trace recorded by hand over random ids
        rec = prof.TraceRecorder(src.hparams, decode_only=False)
        net.route_hook = rec
        generate(net, rng.integers(0, vocab, PROMPT_LEN), 8)
        net.route_hook = None
        trace = {"version": 1, "fingerprint": prof.fingerprint(src), "model": name,
                 "moe_layers": rec.moe_layers, "num_experts": int(src.hparams["num_experts"]),
                 "top_k": int(src.hparams["num_experts_per_tok"]), "tokens": rec.tokens,
                 "prompts": 1, "locality": None, "counts": rec.counts.tolist(),
                 "sequences": rec.sequences()}
        assert len(trace["sequences"]) == 1 and len(trace["sequences"][0]) == 8
        trace_path = prof.save_trace(trace, folder / "recorded.trace.json")
        old = {k: v for k, v in trace.items() if k != "sequences"}
        old["locality"] = rec.repeats / rec.pairs
        prof.save_trace(old, folder / "counts-only.trace.json")
        return Case(name=name, zmoe=z, raw=raw, folder=folder, hp=dict(src.hparams),
                    layouts=layouts, dense=src.dense_bytes(),
                    bytes_F=max(l.full_bytes for l in layouts.values()), ids=ids,
                    ref_logits=ref_logits, ref_tokens=ref_tokens, trace_path=trace_path,
                    counts=rec.counts.copy())
    finally:
        src.close()


@pytest.fixture(scope="module")
def tiny_case(tiny_moe_dir, tmp_path_factory):
    """Factory ``tiny_case(name) -> Case`` (built once per module per architecture)."""
    from test_api import make_chat_model  # tiny checkpoint + a test-time tokenizer, converted

    made: dict = {}

    def get(name: str) -> Case:
        if name not in made:
            folder = tmp_path_factory.mktemp(f"engine_{name}")
            z = make_chat_model(tiny_moe_dir(name), folder / name)  # load() needs a tokenizer
            made[name] = make_case(z, folder, name, sum(map(ord, name)))
        return made[name]

    return get


@pytest.fixture(scope="module", params=ARCHS)
def case(request, tiny_case) -> Case:
    return tiny_case(request.param)


CONFIGS = ([("raw-lru", b, e, None) for b in BUDGETS for e in EVICTIONS]
           + [("zip-lru", b, e, None) for b in BUDGETS for e in EVICTIONS]
           + [("zipmoe", b, e, d) for b in BUDGETS for e in EVICTIONS for d in DELAYS])
CONFIG_IDS = [f"{p}-{b}-{e}" + (f"-{d}" if d else "") for p, b, e, d in CONFIGS]
#: specs that run the whole matrix above (plain experts, a shared expert with dense layers,
#: MLA with shared experts, the sparsemixer router); every other spec runs REDUCED: each policy
#: at each budget with LRU, and zipmoe with every delay set at the middle budget. Eviction
#: orders are the engine's own logic, the same for every family.
FULL_MATRIX_SPECS = ("mixtral", "qwen2_moe", "deepseek_v2_lite", "phimoe")
REDUCED = [c for c in CONFIGS if c[2] == "lru" and (c[0] != "zipmoe" or c[1] == "mid"
                                                     or c[3] == "CE")]
MATRIX = [(a, *c) for a in ARCHS for c in (CONFIGS if a in FULL_MATRIX_SPECS else REDUCED)]
MATRIX_IDS = [f"{a}-" + (f"{p}-{b}-{e}" + (f"-{d}" if d else "")) for a, p, b, e, d in MATRIX]


# ------------------------------------------------------------------------------------------------
# 1. parity on the tiny architectures


def test_raw_companion_is_the_same_model(case):
    """The raw-expert file (raw-lru's input) holds the same weights: same unbudgeted logits."""
    reader = zmoe.ZmoeReader(case.raw)
    layouts = L_.expert_layouts(reader)
    reader.close()
    assert all(p.raw for lay in layouts.values() for p in lay.pieces)
    assert not any(p.raw for lay in case.layouts.values() for p in lay.pieces)
    src = ZmoeSource(case.raw)
    try:
        logits, tokens = generate(build_model(src), case.ids, DECODE_STEPS)
    finally:
        src.close()
    assert_same_logits(logits, case.ref_logits)
    assert tokens == case.ref_tokens


@pytest.mark.parametrize("case,policy,budget,eviction,delay", MATRIX, ids=MATRIX_IDS,
                         indirect=["case"])
def test_budgeted_generation_is_bit_identical(case, policy, budget, eviction, delay):
    run = budgeted_run(case, policy, budget, eviction, delay)
    assert run["window"] == case.k
    assert_same_logits(run["logits"], case.ref_logits)
    assert run["tokens"] == case.ref_tokens
    # every step really went through the engine
    assert sum(run["hits"].values()) == run["uses"] > 0


def test_zipmoe_plans_cover_every_tier(case):
    """The parity matrix above runs zipmoe plans with F, C, S and E experts."""
    used = set()
    for d in DELAYS:
        for b in ("mid", "all"):
            plan = budgeted_run(case, "zipmoe", b, "lru", d)["plan"]
            for tp in plan.layers:
                used |= {t for t, n in zip("FCSE", (tp.nF, tp.nC, tp.nS, tp.nE)) if n}
    assert used == set("FCSE")


# ------------------------------------------------------------------------------------------------
# 4. accounting


@pytest.mark.parametrize("case,policy,budget,eviction,delay", MATRIX, ids=MATRIX_IDS,
                         indirect=["case"])
def test_memory_within_budget_and_hits_count_every_use(case, policy, budget, eviction, delay):
    run = budgeted_run(case, policy, budget, eviction, delay)
    b = run["budget"]
    assert len(run["reports"]) > DECODE_STEPS
    for rep in run["reports"]:
        assert rep["budget"] == b
        assert rep["dense"] == case.dense
        assert rep["working set (max)"] == run["window"] * case.bytes_F
        assert resident_total(rep) <= b, rep
    hits = run["hits"]
    assert set(hits) == {"F", "C", "S", "E", "miss"}
    assert sum(hits.values()) == run["uses"]
    if budget == "min":  # no room for any tier: everything is read and decoded every time
        assert hits["miss"] == run["uses"]
    if policy != "zipmoe":
        assert hits["C"] == hits["S"] == hits["E"] == 0


@pytest.mark.parametrize("budget", ["min", "mid", "all"])
def test_decode_working_set_within_budget(case, budget, monkeypatch):
    """What a decode step really holds: resident tiers + the decoded experts passed to the fused
    kernel that are not F-resident must fit the budget."""
    b = case.budget(budget)
    source, engine, _ = make_engine(case, b, "zip-lru")
    real = engine.backend.experts_token
    totals = []

    def spy(out, x, experts, weights, *a, **kw):
        in_f = {id(w) for pool in engine.fpools.values() for w in pool.slots.values()}
        transient = sum(1 for w in experts if id(w) not in in_f)
        rep = engine.memory_report()
        totals.append(rep["dense"] + rep["F"] + rep["C"] + rep["S"] + rep["E"]
                      + transient * engine.bytes_F)
        return real(out, x, experts, weights, *a, **kw)

    monkeypatch.setattr(engine.backend, "experts_token", spy)
    try:
        logits, tokens = generate(build_model(source, executor=engine), case.ids, DECODE_STEPS)
    finally:
        engine.close()
        source.close()
    assert tokens == case.ref_tokens
    assert len(totals) == DECODE_STEPS * len(case.hp["moe_layers"])
    assert max(totals) <= b, (max(totals), b)


@pytest.mark.parametrize("eviction", EVICTIONS)
def test_second_pass_with_everything_cached_is_all_F_hits(case, eviction):
    b = case.budget("all")
    source, engine, _ = make_engine(case, b, "zip-lru", eviction)
    try:
        assert engine.tier_budget // engine.bytes_F == case.n_total
        net = build_model(source, executor=engine)
        generate(net, case.ids, DECODE_STEPS)
        first = dict(engine.stats.hits)
        assert first["miss"] > 0 and first["C"] == first["S"] == first["E"] == 0
        engine.stats.reset()
        log = CallLog(engine)
        net.route_hook = log
        logits, tokens = generate(net, case.ids, DECODE_STEPS)
        assert engine.stats.hits == {"F": log.uses, "C": 0, "S": 0, "E": 0, "miss": 0}
        assert engine.stats.reads == 0 and engine.stats.bytes_read == 0
        rep = engine.memory_report()
        assert rep["F"] == first["miss"] * case.bytes_F   # each expert decoded once, all kept
        assert resident_total(rep) <= b
    finally:
        engine.close()
        source.close()
    assert_same_logits(logits, case.ref_logits)
    assert tokens == case.ref_tokens


TIER_TRACES = [("recorded", True), ("counts-only", True), ("recorded", False)]
TIER_TRACE_IDS = ["sequences", "counts-only", "static-plan"]
#: the full set for FULL_MATRIX_SPECS; the middle budget with recorded sequences elsewhere
TIER_MATRIX = [(a, b, d, tr, loc, tid) for a in ARCHS for b in ("mid", "all") for d in DELAYS
               for (tr, loc), tid in zip(TIER_TRACES, TIER_TRACE_IDS)
               if a in FULL_MATRIX_SPECS or (b == "mid" and tid == "sequences")]


@pytest.mark.parametrize("case,budget,delay,trace,locality", [m[:5] for m in TIER_MATRIX],
                         ids=[f"{a}-{b}-{d}-{t}" for a, b, d, _, _, t in TIER_MATRIX],
                         indirect=["case"])
def test_zipmoe_tiers_follow_the_plan(case, budget, delay, trace, locality):
    """F starts with the nF most popular experts (LRU order: the most popular the most recent);
    C/S/E slots sit on the plan's static order (recency plans) or on the popularity ranks after
    F (static plans); they stay put while F changes (``adapt=False``; by default slots follow
    the running text, see the test above), and bytes are what the plan says."""
    b = case.budget(budget)
    source, engine, plan = make_engine(case, b, "zipmoe", "lru", case.delay(delay), trace=trace,
                                       locality=locality, adapt=False)
    try:
        ranks = popularity_ranks(case.counts)
        N = int(case.hp["num_experts"])
        want_bytes = {"F": 0, "C": 0, "S": 0, "E": 0}
        static = {}
        for layer, tp, order in zip(case.hp["moe_layers"], plan.layers, ranks):
            pool = engine.fpools[layer]
            assert pool.capacity == tp.nF and pool.eviction == "lru"
            assert list(pool.slots) == [(layer, e) for e in reversed(order[:tp.nF])]
            if locality:
                assert sorted(tp.order) == list(range(N))
                slot_order = list(tp.order)
            else:
                assert tp.order is None
                assert [engine.tier_of(layer, e) for e in order] == tp.tier_of_rank(N)
                slot_order = order[tp.nF:]
            tiers = ["C"] * tp.nC + ["S"] * tp.nS + ["E"] * tp.nE
            for e, t in zip(slot_order, tiers):
                static[(layer, e)] = t
                lay = case.layouts[(layer, e)]
                if t == "C" and case.packable:   # the compute form, computed in place
                    held = engine.slots[(layer, e)].packed
                    assert isinstance(held, PackedExpert)
                    want_bytes[t] += held.nbytes
                    continue
                want_bytes[t] += {"C": lay.sm_region[1] + lay.exp_region[1],
                                  "S": lay.sm_region[1], "E": lay.exp_region[1]}[t]
            want_bytes["F"] += sum(case.layouts[(layer, e)].full_bytes for e in order[:tp.nF])
            for e in range(N):
                want = "F" if e in order[:tp.nF] else static.get((layer, e), "miss")
                assert engine.tier_of(layer, e) == want
        assert {k: s.tier for k, s in engine.slots.items()} == static
        rep = engine.memory_report()
        assert {t: rep[t] for t in "FCSE"} == want_bytes
        assert sum(want_bytes.values()) <= plan.bytes <= engine.tier_budget
        assert resident_total(rep) <= b
        # C/S/E slots are static: after a run they are still there (an expert may also be in
        # F), and their bytes are unchanged; F holds at most nF experts per layer
        net = build_model(source, executor=engine)
        logits, tokens = generate(net, case.ids, DECODE_STEPS)
        assert {k: s.tier for k, s in engine.slots.items()} == static
        after = engine.memory_report()
        assert {t: after[t] for t in "CSE"} == {t: want_bytes[t] for t in "CSE"}
        for layer, tp in zip(case.hp["moe_layers"], plan.layers):
            assert len(engine.fpools[layer].slots) <= tp.nF
        assert after["F"] <= sum(tp.nF for tp in plan.layers) * case.bytes_F
        assert resident_total(after) <= b
    finally:
        engine.close()
        source.close()
    assert_same_logits(logits, case.ref_logits)
    assert tokens == case.ref_tokens


def test_zipmoe_f_pool_is_recency_and_evicted_expert_keeps_its_slot(tiny_case):
    """zipmoe's F pool is an LRU on top of the static slots: an expert it has to rebuild is
    admitted, the least recently used one is evicted and falls back to its C/S/E slot (or to a
    miss); outputs stay those of the unbudgeted executor. (C in the storage form, which is
    rebuilt like S/E; a C slot in the compute form is computed in place and never enters F:
    test_ctier.py.)"""
    from zipmoe_rt.engine.planner import TierPlan
    from zipmoe_rt.models.base import ExpertExecutor

    c = tiny_case("mixtral")
    assert (int(c.hp["num_experts"]), c.k) == (4, 2)
    layers = c.hp["moe_layers"]
    # every layer: F = LRU of 2 experts; expert 0 also has a C slot, expert 3 an S slot
    tp = TierPlan(2, 1, 1, 0, 0.0, 0.0, order=(0, 3, 1, 2))
    src = ZmoeSource(c.zmoe, keep_experts=False, copy_dense=True)
    ref_src = ZmoeSource(c.zmoe)
    engine = ExpertEngine(src, c.budget("all"), "zipmoe", plan=[tp] * len(layers),
                          ranks=[[0, 1, 2, 3]] * len(layers), workers=WORKERS,
                          adapt=False,   # the slots stay where the plan put them
                          c_form="planes")
    try:
        ref = ExpertExecutor(ref_src)
        layer = layers[0]
        pool = engine.fpools[layer]
        rng = np.random.default_rng(0)

        def step(experts):
            x = rng.standard_normal((1, int(c.hp["hidden_size"]))).astype(np.float32)
            idx = np.array([experts], dtype=np.int64)
            w = np.array([[0.625, 0.375]], np.float32)
            before = dict(engine.stats.hits)
            out = engine.run(layer, x, idx, w)
            assert np.array_equal(out, ref.run(layer, x, idx, w))
            assert resident_total(engine.memory_report()) <= engine.budget
            return {t: n - before[t] for t, n in engine.stats.hits.items() if n != before[t]}

        def tiers():
            return [engine.tier_of(layer, e) for e in range(4)]

        reads0 = engine.stats.reads
        # warm start: the two most popular, 0 the most recently used
        assert list(pool.slots) == [(layer, 1), (layer, 0)]
        assert tiers() == ["F", "F", "miss", "S"]
        # 2 (miss) and 3 (S) are rebuilt and admitted, evicting 1 then 0: 0 falls back to C
        assert step([3, 2]) == {"S": 1, "miss": 1}
        assert list(pool.slots) == [(layer, 2), (layer, 3)]
        assert tiers() == ["C", "miss", "F", "F"]
        # 2 hits F and becomes the most recent; 0 is rebuilt from its C slot and evicts 3
        # (the least recently used), which falls back to its S slot
        assert step([0, 2]) == {"F": 1, "C": 1}
        assert list(pool.slots) == [(layer, 2), (layer, 0)]
        assert tiers() == ["F", "miss", "F", "S"]
        assert step([2, 0]) == {"F": 2}
        assert list(pool.slots) == [(layer, 0), (layer, 2)]   # order of use within a token: by id
        # frequency-aware admission: recent uses 0: 2, 1: 0, 2: 3, 3: 1 -> 1 (used once now)
        # may not push out 0 (twice), 3 (twice now) may
        assert step([1, 3]) == {"miss": 1, "S": 1}
        assert list(pool.slots) == [(layer, 2), (layer, 3)]
        assert tiers() == ["C", "miss", "F", "F"]
        assert {k: s.tier for k, s in engine.slots.items()} == {
            **{(l, 0): "C" for l in layers}, **{(l, 3): "S" for l in layers}}
        # flash reads: 2's and 1's exponents and SM planes (miss), 3's exponents twice (S); none
        # for 0 (C)
        assert engine.stats.reads - reads0 == 6
    finally:
        engine.close()
        src.close()
        ref_src.close()


@pytest.mark.parametrize("nF", [1, 2, 3])
def test_zipmoe_f_pool_is_what_the_planner_replays(tiny_case, nF):
    """The planner's trace replay (lru_pool_model with admission) predicts the engine's F hits
    token by token: same recency order, same admission counts and halvings."""
    from zipmoe_rt.engine.planner import TierPlan, lru_pool_model

    c = tiny_case("mixtral")
    layers = c.hp["moe_layers"]
    rng = np.random.default_rng(nF)
    seq = [sorted(rng.choice(4, 2, replace=False, p=[.4, .3, .2, .1]).tolist())
           for _ in range(80)]                       # 160 touches: the counts halve (window 16·nF·2)
    src = ZmoeSource(c.zmoe, keep_experts=False, copy_dense=True)
    engine = ExpertEngine(src, c.budget("all"), "zipmoe",
                          plan=[TierPlan(nF, 0, 0, 0, 0.0, 0.0, order=(0, 1, 2, 3))] * len(layers),
                          ranks=[[2, 0, 3, 1]] * len(layers), workers=WORKERS)
    try:
        x = np.ones((1, int(c.hp["hidden_size"])), np.float32)
        got = np.zeros(3)
        for sel in seq:
            before = engine.stats.hits["F"]
            engine.run(layers[0], x, np.array([sel[::-1]], np.int64),
                       np.array([[.5, .5]], np.float32))
            got[engine.stats.hits["F"] - before] += 1
    finally:
        engine.close()
        src.close()
    model = lru_pool_model([np.array(seq)], 4, 2, warm=[2, 0, 3, 1], admission=True)
    assert np.array_equal(model.hit_pmf[nF] * len(seq), got)
    plain = lru_pool_model([np.array(seq)], 4, 2, warm=[2, 0, 3, 1])
    assert model.expected_hits()[nF] >= plain.expected_hits()[nF]


def test_budget_split_values(case):
    """The minimum gives the top-k working set and no tier bytes; more goes to the tiers."""
    src = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
    try:
        assert budget_split(src, case.budget("min")) == (case.bytes_F, case.k, 0)
        extra = case.bytes_F // 2
        assert budget_split(src, case.dense + case.k * case.bytes_F + extra) == \
            (case.bytes_F, case.k, extra)
        assert budget_split(src, case.budget("all")) == \
            (case.bytes_F, case.k, case.n_total * case.bytes_F)
        with pytest.raises(BudgetError):
            budget_split(src, case.budget("min") - 1)
        # "25%" = dense + a quarter of the experts' BF16 bytes
        full = sum(l.full_bytes for l in case.layouts.values())
        assert parse_size("25%", src) == int(case.dense + 0.25 * full)
        assert parse_size("100%", src) == case.dense + full
    finally:
        src.close()


# ------------------------------------------------------------------------------------------------
# 3. errors


def test_budget_below_dense_plus_working_set(tiny_case):
    c = tiny_case("mixtral")
    import math
    minimum = c.dense + c.k * c.bytes_F
    shown = math.ceil(minimum / 1e5) / 10      # rounded up: the figure shown is enough
    assert shown * 1e6 >= minimum
    for budget in (minimum - 1, c.dense, 1):   # 0 and below: "must be positive"
        with pytest.raises(BudgetError) as ei:
            zipmoe_rt.load(c.zmoe, memory_budget=budget, policy="zip-lru")
        assert isinstance(ei.value, ValueError)
        msg = str(ei.value)
        assert f"at least {shown:.1f} MB" in msg
        assert f"dense weights ({c.dense / 1e6:.1f} MB)" in msg
        assert f"the {c.k} experts one token uses ({c.k} x {c.bytes_F / 1e6:.1f} MB)" in msg
    src = ZmoeSource(c.zmoe, keep_experts=False, copy_dense=True)
    try:
        with pytest.raises(BudgetError, match=re.escape(f"{shown:.1f} MB is needed")):
            ExpertEngine(src, minimum - 1, "zip-lru", workers=1)
        ExpertEngine(src, minimum, "zip-lru", workers=1).close()   # the minimum itself runs
    finally:
        src.close()


@pytest.mark.parametrize("option,stated,hint", [("100KB", "100000 bytes", False),
                                                 ("1", "1 byte", True)])
def test_cli_budget_too_small_is_one_line_error(tiny_case, option, stated, hint):
    """A budget below the minimum: one error line stating the budget (below 1 MB in bytes) and
    the minimum; a bare number (bytes) adds the unit hint, a size with a unit does not."""
    import math

    from click.testing import CliRunner

    from zipmoe_rt.cli import main

    c = tiny_case("mixtral")
    r = CliRunner().invoke(main, ["run", str(c.zmoe), "-p", "x", "--memory-budget", option],
                           env={"ZIPMOE_RT_DEBUG": None}, prog_name="zipmoe-rt")
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: --memory-budget {stated} is below the dense weights")
    assert f"at least {math.ceil((c.dense + c.k * c.bytes_F) / 1e5) / 10:.1f} MB" in lines[0]
    assert lines[0].endswith(" (a number without a unit is bytes: did you mean 1GB or 1%?)") \
        == hint
    assert r.stdout == ""


@pytest.mark.parametrize("text", ["abc", "12XB", "", "MB", "1.2.3GB"])
def test_unparseable_budget_names_the_option(tiny_case, text):
    c = tiny_case("mixtral")
    with pytest.raises(ValueError, match="^--memory-budget: cannot read"):
        zipmoe_rt.load(c.zmoe, memory_budget=text, policy="zip-lru")
    with pytest.raises(ValueError, match="--memory-budget"):
        parse_size(text)


@pytest.mark.parametrize("text", ["1e30", "2000000000000GB", 10**16, 1e30])
def test_budget_over_one_petabyte_is_refused(text):
    """A budget past --memory-limit's largest figure (1 PB) is a typo: refused naming the
    option, as --memory-limit refuses it (it printed a 24-digit weight budget and ran)."""
    with pytest.raises(ValueError, match=r"memory_budget \(--memory-budget\): .* more than 1 PB"):
        parse_size(text)
    assert parse_size("1000000GB") == 10**15


@pytest.mark.parametrize("value,needle", [(0, "must be positive"), (-1, "must be positive"),
                                          (-1.5, "not a whole number of bytes"), ("0", "must be positive"),
                                          ("-5MB", "must be positive"), ("0%", r"in \(0, 100\]"),
                                          ("-5%", r"in \(0, 100\]"), ("101%", r"in \(0, 100\]")])
def test_budget_must_be_positive(tiny_case, value, needle):
    c = tiny_case("mixtral")
    src = ZmoeSource(c.zmoe)
    try:
        with pytest.raises(ValueError, match=needle):
            parse_size(value, src)
        assert parse_size("100%", src) == src.dense_bytes() + sum(
            l.full_bytes for l in src.layouts.values())
    finally:
        src.close()


def test_parse_size_units():
    assert parse_size("600MB") == 600_000_000
    assert parse_size("1.5GiB") == 3 * 2**29
    assert parse_size("750000000") == 750_000_000
    assert parse_size("64 KiB") == 65536
    assert parse_size(12345) == 12345
    with pytest.raises(ValueError, match="--memory-budget: a percentage needs the model"):
        parse_size("25%")
    for bad in ("inf", "-inf", "1e400", "infGB", "1e400MB", "nan", "abc"):
        with pytest.raises(ValueError, match=f"^--memory-budget: cannot read '{bad}' "):
            parse_size(bad)
    with pytest.raises(ValueError, match="not a whole number|expected bytes"):
        parse_size(float("inf"))


def test_zipmoe_without_a_trace_says_to_profile(tiny_case, tmp_path):
    c = tiny_case("mixtral")
    z = tmp_path / "copy.zmoe"
    shutil.copy(c.zmoe, z)  # no MODEL.trace.json next to it
    with pytest.raises(TraceError, match="run `zipmoe-rt profile") as ei:
        zipmoe_rt.load(z, memory_budget=c.budget("mid"), policy="zipmoe")
    assert str(z) in str(ei.value)
    with pytest.raises(TraceError, match="zipmoe-rt profile"):
        zipmoe_rt.load(z, memory_budget=c.budget("mid"), policy="zipmoe",
                       trace=tmp_path / "missing.trace.json")
    src = ZmoeSource(z, keep_experts=False, copy_dense=True)
    try:
        with pytest.raises(ValueError, match="zipmoe-rt profile"):
            ExpertEngine(src, c.budget("mid"), "zipmoe", workers=1)
    finally:
        src.close()


def test_trace_of_another_model_is_refused(tiny_case):
    mixtral, qwen3 = tiny_case("mixtral"), tiny_case("qwen3_moe")
    with pytest.raises(TraceError, match="trace of another model") as ei:
        zipmoe_rt.load(qwen3.zmoe, memory_budget=qwen3.budget("mid"), policy="zipmoe",
                       trace=mixtral.trace_path)
    assert "'mixtral'" in str(ei.value) and "profile this model again" in str(ei.value)
    src = ZmoeSource(qwen3.zmoe)
    try:
        with pytest.raises(TraceError, match="trace of another model"):
            prof.load_trace(mixtral.trace_path, src)
        assert prof.load_trace(qwen3.trace_path, src)["counts"].shape == qwen3.counts.shape
    finally:
        src.close()


@pytest.mark.parametrize("content,needle", [
    ("{not json", "not a valid trace"),
    ("[1, 2, 3]", "not a valid trace"),
    ("null", "not a valid trace"),
    ('{"fingerprint": "x"}', "not a valid trace"),            # no counts
    ('{"counts": [[1, 2], [3]]}', "not a valid trace"),        # ragged
    ("WRONG_SHAPE", "counts have shape"),
    ("EMPTY_LAYER", "an empty layer"),
])
def test_malformed_trace_files(tiny_case, tmp_path, content, needle):
    c = tiny_case("mixtral")
    t = json.loads(c.trace_path.read_text())
    if content == "WRONG_SHAPE":
        t["counts"] = [row[:-1] for row in t["counts"]]
        content = json.dumps(t)
    elif content == "EMPTY_LAYER":
        t["counts"][1] = [0] * len(t["counts"][1])
        content = json.dumps(t)
    p = tmp_path / "bad.trace.json"
    p.write_text(content)
    with pytest.raises(TraceError, match=re.escape(needle)) as ei:
        zipmoe_rt.load(c.zmoe, memory_budget=c.budget("mid"), policy="zipmoe", trace=p)
    assert str(p) in str(ei.value)


@pytest.mark.parametrize("mangle,needle", [
    (lambda seq: [[row[:-1] for row in run] for run in seq], "a sequence has shape"),
    (lambda seq: [[[[99] + ids[1:] for ids in row] for row in run] for run in seq],
     "expert ids outside"),
    (lambda seq: [[[[ids[0]] * len(ids) for ids in row] for row in run] for run in seq],
     "the same expert twice"),
    (lambda seq: "abc", "sequences are not"),
])
def test_trace_sequences_are_checked(tiny_case, tmp_path, mangle, needle):
    c = tiny_case("mixtral")
    t = json.loads(c.trace_path.read_text())
    t["sequences"] = mangle(t["sequences"])
    p = tmp_path / "bad.trace.json"
    p.write_text(json.dumps(t))
    with pytest.raises(TraceError, match=re.escape(needle)) as ei:
        zipmoe_rt.load(c.zmoe, memory_budget=c.budget("mid"), policy="zipmoe", trace=p)
    assert str(p) in str(ei.value)


def test_trace_recorder_keeps_token_sequences_and_repeats():
    """Decode tokens are kept per run (new_sequence between prompts), layer by layer; repeats
    count the experts the previous token of the same run also selected, per layer, and match
    the planner's repeat_probability on the recorded sequences."""
    from zipmoe_rt.engine.planner import repeat_probability

    rec = prof.TraceRecorder({"moe_layers": [1, 3], "num_experts": 4})
    tok = lambda *ids: np.array([ids], np.int64)   # noqa: E731  one token's top-k
    for l1, l3 in [((0, 1), (2, 3)), ((1, 2), (3, 2)), ((2, 1), (0, 1))]:
        rec(1, None, None, tok(*l1), None)
        rec(3, None, None, tok(*l3), None)
    rec(1, None, None, np.array([[0, 1], [2, 3]]), None)    # a prefill call: not recorded
    rec.new_sequence()
    for l1, l3 in [((3, 0), (0, 1)), ((0, 3), (1, 2))]:
        rec(1, None, None, tok(*l1), None)
        rec(3, None, None, tok(*l3), None)
    rec.new_sequence()
    seqs = rec.sequences()
    assert seqs == [[[[0, 1], [2, 3]], [[1, 2], [2, 3]], [[1, 2], [0, 1]]],
                    [[[0, 3], [0, 1]], [[0, 3], [1, 2]]]]
    # layer 1: run 1: {1,2}∩{0,1} = 1, {1,2}∩{1,2} = 2; run 2: {0,3}∩{0,3} = 2 -> 5 of 6
    # layer 3: run 1: {2,3}∩{2,3} = 2, {0,1}∩{2,3} = 0; run 2: {1,2}∩{0,1} = 1 -> 3 of 6
    assert rec.layer_repeats.tolist() == [5, 3] and rec.layer_pairs.tolist() == [6, 6]
    assert (rec.repeats, rec.pairs, rec.tokens) == (8, 12, 5)
    assert repeat_probability(seqs).tolist() == [5 / 6, 3 / 6]
    assert rec.counts.tolist() == [[3, 3, 2, 2], [2, 3, 3, 2]]   # decode tokens only


def test_policy_must_match_the_expert_encoding(tiny_case):
    c = tiny_case("qwen2_moe")
    b = c.budget("mid")
    with pytest.raises(ValueError, match=r"raw-lru needs a file with raw BF16 experts "
                                         r"\(convert with --expert-encoding raw; from a \.zmoe: "
                                         r"`zipmoe-rt export FILE -o DIR`, then `zipmoe-rt "
                                         r"convert DIR --expert-encoding raw`\)$"):
        zipmoe_rt.load(c.zmoe, memory_budget=b, policy="raw-lru")
    with pytest.raises(ValueError, match="experts are stored raw; use --policy raw-lru"):
        zipmoe_rt.load(c.raw, memory_budget=b, policy="zip-lru")
    src = ZmoeSource(c.raw, keep_experts=False, copy_dense=True)
    try:
        with pytest.raises(ValueError, match="use --policy raw-lru"):
            ExpertEngine(src, b, "zipmoe", plan=[], ranks=[], workers=1)
        with pytest.raises(ValueError, match="--policy must be one of"):
            ExpertEngine(src, b, "mru", workers=1)
        with pytest.raises(ValueError, match="--eviction must be one of"):
            ExpertEngine(src, b, "raw-lru", "fifo", workers=1)
    finally:
        src.close()


def test_build_engine_resolves_the_policy(tiny_case, tmp_path, monkeypatch):
    from zipmoe_rt.engine.factory import build_engine

    c = tiny_case("qwen3_moe")
    z = tmp_path / "m.zmoe"
    shutil.copy(c.zmoe, z)
    lay = next(iter(c.layouts.values()))
    prof.sidecar(z, prof.CALIB_SUFFIX).write_text(json.dumps(
        {"version": prof.CALIB_VERSION, "sm_read_s": 1e-3, "exp_read_s": 1e-3, "decode_s": 1e-3,
         "matmul_s": 1e-6, "bytes_F": lay.full_bytes, "bytes_sm": lay.sm_region[1],
         "bytes_exp": lay.exp_region[1], "chunks": sum(len(p.chunks) for p in lay.pieces)}))
    budget = c.budget("mid")
    for path, trace, want in ((z, c.trace_path, "zipmoe"), (z, tmp_path / "none.json", "zip-lru"),
                              (c.raw, c.trace_path, "raw-lru")):
        src = ZmoeSource(path, keep_experts=False, copy_dense=True)
        try:
            eng = build_engine(src, budget, "auto", "lru", WORKERS, False, trace, True)
            try:
                assert eng.policy == want
                assert (eng.plan is not None) == (want == "zipmoe")
            finally:
                eng.close()
            # too small a budget fails before any calibration
            monkeypatch.setattr(prof, "calibrate", lambda *a, **kw: pytest.fail("calibrated"))
            with pytest.raises(BudgetError):
                build_engine(src, c.dense, "zipmoe", "lru", WORKERS, False, trace, True)
            monkeypatch.undo()
        finally:
            src.close()


def test_api_plan_fits_when_calibrated_expert_is_small(tiny_case, tmp_path):
    """A calibration measures one sample expert's region sizes; the plan must still fit the
    budget when other experts' compressed exponents are larger (they differ per expert)."""
    from zipmoe_rt.engine.factory import build_engine

    c = tiny_case("qwen3_moe")
    z = tmp_path / "m.zmoe"
    shutil.copy(c.zmoe, z)
    lays = list(c.layouts.values())
    smallest = min(lays, key=lambda l: l.exp_region[1])
    assert smallest.exp_region[1] < max(l.exp_region[1] for l in lays)
    calib = {"version": prof.CALIB_VERSION, "sm_read_s": 1e-3, "exp_read_s": 1e-3, "decode_s": 1e-3,
             "matmul_s": 1e-6, "bytes_F": smallest.full_bytes,
             "bytes_sm": smallest.sm_region[1], "bytes_exp": smallest.exp_region[1],
             "chunks": sum(len(p.chunks) for p in smallest.pieces)}
    prof.sidecar(z, prof.CALIB_SUFFIX).write_text(json.dumps(calib))
    src = ZmoeSource(z, keep_experts=False, copy_dense=True)
    built = 0
    extras = range(0, c.n_total * c.bytes_F // 2, 2317)  # before the fix, 5 of these failed
    try:
        lo = c.dense + c.k * c.bytes_F
        for extra in extras:
            eng = build_engine(src, lo + extra, "zipmoe", "lru", WORKERS, False, c.trace_path, True)
            try:
                assert resident_total(eng.memory_report()) <= lo + extra
                built += 1
            finally:
                eng.close()
    finally:
        src.close()
    assert built == len(extras)


# ------------------------------------------------------------------------------------------------
# 5. corruption under the engine


def _first_used_expert(case: Case) -> tuple[int, int]:
    """(layer, expert) that the first MoE layer uses for the first prompt token."""
    src = ZmoeSource(case.zmoe)
    seen = []
    try:
        net = build_model(src)
        net.route_hook = lambda layer, x, logits, idx, w: seen.append((layer, int(idx[0, 0])))
        net.forward(case.ids, net.new_cache())
    finally:
        src.close()
    return seen[0]


def _flip(path: Path, offset: int):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0x10]))


@pytest.mark.parametrize("policy,region", [("zip-lru", "sm"), ("zip-lru", "exp"),
                                           ("raw-lru", "sm"), ("zipmoe", "sm")])
def test_corrupt_expert_raises_checksum_error_naming_the_tensor(tiny_case, tmp_path, policy,
                                                                region):
    c = tiny_case("mixtral")
    layer, e = _first_used_expert(c)
    src_path = c.raw if policy == "raw-lru" else c.zmoe
    bad = tmp_path / src_path.name
    shutil.copy(src_path, bad)
    lay = L_.expert_layouts(zmoe.ZmoeReader(bad))[(layer, e)]
    piece = lay.pieces[1]
    if region == "sm":
        _flip(bad, lay.sm_region[0] + piece.sm[0] + 5)
        what = "raw data" if policy == "raw-lru" else "sign+mantissa plane"
    else:
        _flip(bad, lay.exp_region[0] + piece.chunks[0][0] + 3)
        what = "exponent chunk 0"
    pattern = re.escape(f"{bad}: tensor {piece.name!r}: {what}")
    # zipmoe with a roomy budget preloads the expert's planes (or the decoded expert) into its
    # tier when the engine is built; the LRU policies at the minimum read it on first use
    budget = c.budget("all" if policy == "zipmoe" else "min")
    with pytest.raises(zmoe.ChecksumError, match=pattern):
        source, engine, _ = make_engine(c, budget, policy, "lru",
                                        c.delay("CE") if policy == "zipmoe" else None, path=bad)
        try:
            generate(build_model(source, executor=engine), c.ids, DECODE_STEPS)
        finally:
            engine.close()
            source.close()


def test_corrupt_unused_expert_is_harmless_and_used_one_is_caught_mid_decode(tiny_case, tmp_path):
    """Flip a byte in an expert the prefill does not need but a later decode step does: the
    prefill logits are the reference's, then the step that needs it raises."""
    c = tiny_case("qwen3_moe")
    src = ZmoeSource(c.zmoe)
    prefill, decode = set(), []
    try:
        net = build_model(src)
        net.route_hook = lambda layer, x, lg, idx, w: (
            prefill.update((layer, int(e)) for e in idx.ravel()) if idx.shape[0] > 1
            else decode.append({(layer, int(e)) for e in idx[0]}))
        generate(net, c.ids[:2], DECODE_STEPS)
    finally:
        src.close()
    later = [(i, k) for i, s in enumerate(decode) for k in sorted(s) if k not in prefill]
    if not later:
        pytest.skip("every decoded expert is already used by the 2-token prefill")
    layer, e = later[0][1]
    bad = tmp_path / "m.zmoe"
    shutil.copy(c.zmoe, bad)
    lay = L_.expert_layouts(zmoe.ZmoeReader(bad))[(layer, e)]
    _flip(bad, lay.sm_region[0] + lay.pieces[0].sm[0])
    source, engine, _ = make_engine(c, c.budget("min"), "zip-lru", path=bad)
    ref_src = ZmoeSource(c.zmoe)
    try:
        net = build_model(source, executor=engine)
        cache = net.new_cache()
        ref_net = build_model(ref_src)
        ref_cache = ref_net.new_cache()
        got = net.forward(c.ids[:2], cache, last_only=False)
        want = ref_net.forward(c.ids[:2], ref_cache, last_only=False)
        assert np.array_equal(got, want)
        tok = int(np.argmax(want[-1]))
        with pytest.raises(zmoe.ChecksumError, match=re.escape(repr(lay.pieces[0].name))):
            for _ in range(DECODE_STEPS):
                out = net.forward(np.array([tok]), cache)
                ref = ref_net.forward(np.array([tok]), ref_cache)
                assert np.array_equal(out, ref)   # never a wrong step before the error
                tok = int(np.argmax(ref))
    finally:
        ref_src.close()
        engine.close()
        source.close()


# ------------------------------------------------------------------------------------------------
# 2. the default model


DEFAULT_TEXT = ("It was a bright cold day in April, and the clocks were striking thirteen. "
                "The quick brown fox jumps over the lazy dog.")


@pytest.fixture(scope="module")
def default_case(default_zmoe, tmp_path_factory):
    """Unbudgeted reference (16-token prefill, 8 greedy steps) and a trace recorded by hand on
    the default model; the model is used through a symlink so sidecar files stay out of the
    shared fixture's folder."""
    folder = tmp_path_factory.mktemp("engine_default")
    link = folder / "default.zmoe"
    link.symlink_to(default_zmoe)
    m = zipmoe_rt.load(link)
    try:
        ids = np.array(m.tokenizer.encode(DEFAULT_TEXT, add_special_tokens=False)[:PROMPT_LEN])
        assert len(ids) == PROMPT_LEN
        logits, tokens = generate(m.net, ids, 8)
        rec = prof.TraceRecorder(m.hparams, decode_only=False)
        m.net.route_hook = rec
        generate(m.net, ids[::-1].copy(), 8)
        m.net.route_hook = None
        trace = {"version": 1, "fingerprint": prof.fingerprint(m.source), "model": m.name,
                 "counts": rec.counts.tolist()}
        trace_path = prof.save_trace(trace, folder / "recorded.trace.json")
    finally:
        m.close()
    return dict(path=link, ids=ids, logits=logits, tokens=tokens, trace=trace_path)


@pytest.mark.parametrize("policy,resident,c_tier", [
    ("zipmoe", "full", "packed"), ("zipmoe", "full", "planes"), ("zipmoe", "compressed", "packed"),
    ("zip-lru", "full", "packed"), ("zip-lru", "compressed", "packed")])
def test_default_model_budgeted_is_bit_identical(default_case, policy, resident, c_tier):
    """At 25 %, every policy, with the caches in BF16 or in the compute form and zipmoe's C
    slots in either form: the unbudgeted logits and tokens, bit for bit."""
    m = zipmoe_rt.load(default_case["path"], memory_budget="25%", policy=policy,
                       trace=default_case["trace"], workers=WORKERS, progress=False,
                       resident=resident, c_tier=c_tier)
    try:
        assert m.engine is not None and m.engine.policy == policy
        assert (m.engine.resident, m.engine.c_form) == (resident, c_tier)
        log = CallLog(m.engine)
        m.net.route_hook = log
        logits, tokens = generate(m.net, default_case["ids"], 8)
        rep = m.memory_report()
        full = sum(l.full_bytes for l in m.engine.layouts.values())
        assert rep["budget"] == int(rep["dense"] + 0.25 * full)
        for r in log.reports + [rep]:
            assert resident_total(r) <= rep["budget"]
        assert sum(m.engine.stats.hits.values()) == log.uses
        f_held = [w for pool in m.engine.fpools.values() for w in pool.slots.values()]
        assert all(isinstance(w, PackedExpert) == (resident == "compressed") for w in f_held)
        c_slots = [s for s in m.engine.slots.values() if s.tier == "C"]
        assert all((s.packed is not None) == (c_tier == "packed") for s in c_slots)
        assert f_held or c_slots
    finally:
        m.close()
    assert_same_logits(logits, default_case["logits"])
    assert tokens == default_case["tokens"]


# -- region reads --------------------------------------------------------------------------------
@pytest.mark.parametrize("keep_cache", [False, True])
def test_region_reads_drop_their_pages_unless_asked(tmp_path, monkeypatch, keep_cache):
    """Buffered reads return the exact bytes and, by default, drop exactly the range they read
    from the page cache (posix_fadvise DONTNEED), so the OS cache is not a hidden expert tier."""
    import os

    from zipmoe_rt.engine import io as io_
    data = np.random.default_rng(3).integers(0, 256, 3 * 4096 + 77, dtype=np.uint8)
    f = tmp_path / "blob.bin"
    f.write_bytes(data.tobytes())
    calls = []
    real = os.posix_fadvise
    monkeypatch.setattr(io_.os, "posix_fadvise", lambda fd, off, n, adv: (calls.append((off, n, adv)),
                                                                        real(fd, off, n, adv))[1])
    rr = io_.RegionReader(f, keep_cache=keep_cache)
    try:
        got = rr.read(4096, 5000)
        np.testing.assert_array_equal(got, data[4096:9096])
        got = rr.read(10, 100)
        np.testing.assert_array_equal(got, data[10:110])
    finally:
        rr.close()
    assert calls == ([] if keep_cache else [(4096, 5000, os.POSIX_FADV_DONTNEED),
                                            (10, 100, os.POSIX_FADV_DONTNEED)])
    assert rr.bytes_read == 5100 and rr.reads == 2


# ------------------------------------------------------------------------------------------------
# 7. multi-chunk decode jobs


def test_decode_jobs_cover_every_chunk_once_and_respect_the_size():
    lay = L_.ExpertLayout(0, 0, (0, 0), (0, 0), (
        L_.Piece("g", "gate", "BF16", (4, 10), (0, 40, 0), tuple((0, 1, 10, 0) for _ in range(4)),
                 "huffman"),
        L_.Piece("r", "up", "BF16", (4, 10), (40, 80, 0), ()),
        L_.Piece("d", "down", "BF16", (7,), (120, 14, 0), ((0, 1, 3, 0), (0, 1, 4, 0)), "huffman")))
    assert L_.decode_jobs(lay, 20) == [(0, 0, 2), (0, 2, 4), (2, 0, 2)]
    assert L_.decode_jobs(lay, 25) == [(0, 0, 2), (0, 2, 4), (2, 0, 2)]
    assert L_.decode_jobs(lay, 5) == [(0, 0, 1), (0, 1, 2), (0, 2, 3), (0, 3, 4), (2, 0, 1), (2, 1, 2)]
    assert L_.decode_jobs(lay, 1 << 20) == [(0, 0, 4), (2, 0, 2)]


def test_multi_chunk_decode_equals_chunk_by_chunk_and_names_a_bad_chunk(default_zmoe):
    """The one-call multi-chunk kernel gives the same words as the per-chunk path for every
    grouping, and a malformed chunk in the middle of a group is reported by its own index."""
    import zstandard as zstd
    from zipmoe_rt.engine.io import RegionReader
    r = zmoe.ZmoeReader(default_zmoe)
    lay = L_.expert_layouts(r)[(3, 1)]
    rr = RegionReader(default_zmoe)
    try:
        sm, exp = rr.read(*lay.sm_region), rr.read(*lay.exp_region)
    finally:
        rr.close()
    d = zstd.ZstdDecompressor()
    ref = L_.alloc_expert(lay)
    for p, out in zip(lay.pieces, ref):
        for ci, start in enumerate(p.chunk_arrays[3]):
            L_.decode_chunk(default_zmoe, p, ci, sm, exp, out, int(start), d)
    p = lay.pieces[0]
    assert len(p.chunks) >= 3 and p.codec == "huffman" and p.dtype == "BF16"
    for size in (1, p.chunks[0][2] + 1, 1 << 30):
        outs = L_.alloc_expert(lay)
        jobs = L_.decode_jobs(lay, size)
        for pi, c0, c1 in jobs[::-1]:      # any order: each job writes only its own range
            L_.decode_chunks(default_zmoe, lay.pieces[pi], c0, c1, sm, exp, outs[pi], d)
        for a, b in zip(outs, ref):
            assert np.array_equal(a, b)
    bad = exp.copy()
    o = p.chunks[2][0]
    bad[o + 128] ^= 0x01          # chunk 2's first stream size no longer adds up
    with pytest.raises(zmoe.ChecksumError, match=re.escape(f"{p.name!r}: exponent chunk 2 does not")):
        L_.decode_chunks(default_zmoe, p, 0, len(p.chunks), sm, bad, L_.alloc_expert(lay)[0], d)


def test_long_lived_slot_buffers_live_in_their_own_memory_maps(tmp_path):
    """Slot buffers that move between experts are kept out of the C heap: a heap buffer is
    copied into an anonymous map, one already mapped is kept as is; a read can go straight
    into such a map, page-aligned, with the file's bytes."""
    from zipmoe_rt.engine.io import PAGE, RegionReader, aligned_empty, anon_array
    from zipmoe_rt.engine.slots import _long_lived
    data = bytes(range(256)) * 40
    f = tmp_path / "blob"
    f.write_bytes(data)
    rr = RegionReader(f)
    try:
        a = rr.read(4096, 5000, alloc=anon_array)
    finally:
        rr.close()
    assert a.tobytes() == data[4096:9096] and a.ctypes.data % PAGE == 0
    assert _long_lived(a) is a
    h = aligned_empty(5000)
    h[:] = a
    m = _long_lived(h)
    assert m is not h and m.tobytes() == h.tobytes() and _long_lived(m) is m
    # a region at the start of a much bigger map (a pooled read buffer sized for the largest
    # region) is copied, so a slot never holds more than it counts; two pages of slack are kept
    big = anon_array(64 * PAGE)
    big[:5000] = a
    small = _long_lived(big[:5000])
    assert not np.may_share_memory(small, big) and small.tobytes() == a.tobytes()
    assert np.may_share_memory(_long_lived(big[:62 * PAGE]), big)


class _SlowReads:
    """Wraps a RegionReader: each read sleeps, and the most reads seen in flight at once is kept."""

    def __init__(self, reader, fail_on_size=None):
        import threading
        self.reader, self.fail_on_size = reader, fail_on_size
        self.now = self.most = self.calls = 0
        self.lock = threading.Lock()

    def read(self, offset, size, **kw):
        import time
        with self.lock:
            self.now += 1
            self.calls += 1
            self.most = max(self.most, self.now)
        try:
            time.sleep(0.01)
            if size == self.fail_on_size:
                raise OSError(f"injected read error at {offset}")
            return self.reader.read(offset, size, **kw)
        finally:
            with self.lock:
                self.now -= 1

    def close(self):
        self.reader.close()


@pytest.mark.parametrize("io_depth", [1, 4])
def test_io_depth_bounds_reads_in_flight_and_keeps_results(tiny_case, io_depth):
    """Reads of missing experts run ``io_depth`` at a time (both regions of a miss, and the
    misses of one layer, overlap), and generation stays bit-identical to the unbudgeted run."""
    case = tiny_case("mixtral")
    source = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
    engine = ExpertEngine(source, case.budget("min"), "zip-lru", workers=WORKERS, io_depth=io_depth)
    try:
        assert engine.io_depth == io_depth
        engine.reader = slow = _SlowReads(engine.reader)
        logits, tokens = generate(build_model(source, executor=engine), case.ids, DECODE_STEPS)
    finally:
        engine.close()
        source.close()
    assert_same_logits(logits, case.ref_logits)
    assert tokens == case.ref_tokens
    assert slow.calls >= 2 * engine.stats.hits["miss"] > 0   # exponent + SM region per miss
    if io_depth == 1:
        assert slow.most == 1
    else:
        assert 2 <= slow.most <= io_depth


def test_failed_region_read_reaches_the_caller_without_hanging(tiny_case):
    """One region read of a miss fails while the other succeeds: the error is raised in the
    generating thread (no deadlock waiting for the expert), and the engine closes."""
    case = tiny_case("mixtral")
    source = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
    engine = ExpertEngine(source, case.budget("min"), "zip-lru", workers=WORKERS, io_depth=4)
    lay = next(iter(case.layouts.values()))
    try:
        engine.reader = _SlowReads(engine.reader, fail_on_size=lay.sm_region[1])
        with pytest.raises(OSError, match="injected read error"):
            generate(build_model(source, executor=engine), case.ids, DECODE_STEPS)
    finally:
        engine.close()
        source.close()


def test_io_depth_below_one_is_refused(tiny_case):
    case = tiny_case("mixtral")
    source = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
    try:
        with pytest.raises(ValueError, match="--io-depth"):
            ExpertEngine(source, case.budget("min"), "zip-lru", workers=WORKERS, io_depth=0)
    finally:
        source.close()


# ------------------------------------------------------------------------------------------------
# stale or mismatched machine calibration (MODEL.zmoe.calib.json)


def _fitting_calibration(case: Case, **changes) -> dict:
    """A calibration dict that fits a buffered-read run on this machine, with ``changes``."""
    import os
    import platform

    lay = max(case.layouts.values(), key=lambda l: l.exp_region[1])
    calib = {"version": prof.CALIB_VERSION, "direct": False, "cpus": os.cpu_count(),
             "machine": platform.node(), "io_depth": IO_DEPTH,
             "sm_read_s": 1e-3, "exp_read_s": 1e-3,
             "decode_s": 1e-3, "matmul_s": 1e-6, "bytes_F": lay.full_bytes,
             "bytes_sm": lay.sm_region[1], "bytes_exp": lay.exp_region[1],
             "chunks": sum(len(p.chunks) for p in lay.pieces)}
    calib.update(changes)
    return calib


def _calibrated_copy(case: Case, folder: Path, calib: dict) -> tuple[Path, Path]:
    """(model, calibration file): a copy of the case's model with its trace and ``calib`` next
    to it."""
    z = folder / "m.zmoe"
    shutil.copy(case.zmoe, z)
    shutil.copy(case.trace_path, prof.sidecar(z, prof.TRACE_SUFFIX))
    cpath = prof.sidecar(z, prof.CALIB_SUFFIX)
    cpath.write_text(json.dumps(calib))
    return z, cpath


def test_calibration_mismatch_reasons(tmp_path):
    import os
    import platform

    assert prof.CALIB_VERSION == 6
    ok = {"version": prof.CALIB_VERSION, "direct": False, "cpus": os.cpu_count(),
          "machine": platform.node()}
    assert prof.calibration_mismatch(ok, direct=False) == []
    assert prof.calibration_mismatch(dict(ok, direct=True), direct=True) == []
    assert prof.calibration_mismatch({k: v for k, v in ok.items() if k != "machine"}, False) == []
    [why] = prof.calibration_mismatch(dict(ok, version=1), direct=False)
    assert "version 1" in why and "2-5x too cheap" in why
    [why] = prof.calibration_mismatch(dict(ok, version=3), direct=False)
    assert "version 3" in why and "per-layer and per-load overheads" in why
    [why] = prof.calibration_mismatch({k: v for k, v in ok.items() if k != "version"}, False)
    assert why == f"it has no version (current {prof.CALIB_VERSION}): an older zipmoe-rt wrote it"
    [why] = prof.calibration_mismatch(dict(ok, version=prof.CALIB_VERSION + 1), direct=False)
    assert "newer zipmoe-rt" in why and f"version {prof.CALIB_VERSION + 1}" in why
    # a version that is not an integer never gets this far: load_calibration refuses it
    f = tmp_path / "m.zmoe.calib.json"
    f.write_text(json.dumps(dict(ok, version="3", sm_read_s=1, exp_read_s=1, decode_s=1,
                                 matmul_s=1, bytes_F=1, bytes_sm=1, bytes_exp=1)))
    with pytest.raises(TraceError, match="'version' must be an integer, got '3'"):
        prof.load_calibration(f)
    [why] = prof.calibration_mismatch(ok, direct=True)
    assert why == "it timed buffered (page-cache) reads, this run uses O_DIRECT reads"
    [why] = prof.calibration_mismatch(dict(ok, direct=True), direct=False)
    assert why == "it timed O_DIRECT reads, this run uses buffered (page-cache) reads"
    [why] = prof.calibration_mismatch(dict(ok, cpus=os.cpu_count() + 3), direct=False)
    assert why == f"it was measured with {os.cpu_count() + 3} CPUs, this machine has {os.cpu_count()}"
    [why] = prof.calibration_mismatch(dict(ok, machine="elsewhere"), direct=False)
    assert "'elsewhere'" in why
    # an old file without direct/cpus/machine: buffered, cpus and machine unknown
    assert len(prof.calibration_mismatch({"version": 1}, direct=True)) == 2
    [why] = prof.calibration_mismatch(dict(ok, version=2), direct=False)
    assert "version 2" in why and "one at a time" in why and "2-5x" not in why
    # reads in flight: compared when the calibration records them
    d = IO_DEPTH
    assert prof.calibration_mismatch(dict(ok, io_depth=d), direct=False) == []
    assert prof.calibration_mismatch(dict(ok, io_depth=2), direct=False, io_depth=2) == []
    [why] = prof.calibration_mismatch(dict(ok, io_depth=1), direct=False)
    assert why == f"it timed reads 1 at a time, this run keeps {d} in flight"


def test_calibration_prices_reads_at_the_io_depth_throughput(tiny_case, monkeypatch):
    """calibrate() times every sample's reads one at a time, then io_depth at a time (really
    concurrent), and prices the planner's reads at the faster throughput."""
    from zipmoe_rt.engine import io as io_mod

    c = tiny_case("mixtral")
    made = []   # calibrate() opens one reader per call: each wrapped to count reads in flight

    def slow_reader(*a, **kw):   # a disk whose reads overlap perfectly
        made.append(_SlowReads(io_mod.RegionReader(*a, **kw)))
        return made[-1]

    monkeypatch.setattr(calibration, "RegionReader", slow_reader)
    src = ZmoeSource(c.zmoe, keep_experts=False)
    try:
        cal = prof.calibrate(src, samples=6, io_depth=3)
        n = min(6, len(src.layouts))
        assert len(made) == 1 and made[0].calls == 4 * n and made[0].most == 3
        assert cal["version"] == prof.CALIB_VERSION and cal["io_depth"] == 3
        assert cal["io_speedup_reads"] > 1.0   # overlapped reads faster (no timing bound)
        # the read prices: the engine's k-miss calls' (overhead.fit_engine_terms), in the
        # one-at-a-time reads' ratio and never above them
        assert cal["io_speedup"] >= 1.0
        assert cal["sm_read_s"] == pytest.approx(cal["sm_read_qd1_s"] / cal["io_speedup"])
        assert cal["exp_read_s"] == pytest.approx(cal["exp_read_qd1_s"] / cal["io_speedup"])
        one = prof.calibrate(src, samples=6, io_depth=1)
        assert made[1].calls == 2 * n and made[1].most == 1 and one["io_speedup_reads"] == 1.0
        with pytest.raises(ValueError, match="--io-depth"):
            prof.calibrate(src, samples=2, io_depth=0)
    finally:
        src.close()


def test_stale_calibration_warns_once_and_is_used(tiny_case, tmp_path):
    """A calibration timed in the other read mode: load() warns once (naming the file and the
    fix) and plans with it; a fitting one: no warning."""
    import warnings

    c = tiny_case("mixtral")
    z, cpath = _calibrated_copy(c, tmp_path, _fitting_calibration(c, direct=True))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        m = zipmoe_rt.load(z, memory_budget=c.budget("mid"), policy="zipmoe")
        m.close()
    cw = [w for w in got if issubclass(w.category, prof.CalibrationWarning)]
    assert len(cw) == 1, [str(w.message) for w in got]
    msg = str(cw[0].message)
    assert msg.startswith(f"{cpath}: ") and "it timed O_DIRECT reads" in msg
    assert "uses it anyway" in msg and msg.endswith(f"run: zipmoe-rt calibrate {z}")
    assert cw[0].filename == __file__    # attributed to the caller of load()
    assert issubclass(prof.CalibrationWarning, UserWarning)

    cpath.write_text(json.dumps(_fitting_calibration(c)))
    with warnings.catch_warnings(record=True) as got:
        warnings.simplefilter("always")
        zipmoe_rt.load(z, memory_budget=c.budget("mid"), policy="zipmoe").close()
    assert not [w for w in got if issubclass(w.category, prof.CalibrationWarning)]

    # an O_DIRECT run's fix calibrates with --direct; no calibration file: no warning
    cpath.write_text(json.dumps(_fitting_calibration(c, version=1)))
    with pytest.warns(prof.CalibrationWarning, match="version 1") as rec:
        assert prof.load_checked_calibration(z, direct=True)["version"] == 1
    assert str(rec[0].message).endswith(f"zipmoe-rt calibrate {z} --direct")
    cpath.unlink()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert prof.load_checked_calibration(z, direct=False) is None


def test_cli_shows_a_stale_calibration_as_one_warning_line(tiny_case, tmp_path, monkeypatch):
    from click.testing import CliRunner

    from zipmoe_rt import bench as B
    from zipmoe_rt.cli import main

    c = tiny_case("mixtral")
    z, cpath = _calibrated_copy(c, tmp_path, _fitting_calibration(c, version=1))
    want = (f"zipmoe-rt: warning: {cpath}: this calibration does not fit the run: it was written "
            f"by an older zipmoe-rt (calibration version 1, current {prof.CALIB_VERSION}), "
            f"which timed exponent reads 2-5x too cheap. The plan uses it anyway; to fix, run: zipmoe-rt calibrate {z}")

    def invoke(*args):
        return CliRunner().invoke(main, [str(a) for a in args], env={"ZIPMOE_RT_DEBUG": None},
                                  prog_name="zipmoe-rt")

    r = invoke("run", z, "-p", "hello", "-n", 2, "--memory-budget", c.budget("mid"),
               "--policy", "zipmoe")
    assert r.exit_code == 0, (r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert lines.count(want) == 1, r.stderr
    assert lines[0] == want and "Warning" not in r.stderr
    # bench's rows run in subprocesses whose stderr is not shown: it warns before them
    monkeypatch.setattr(B, "run", lambda *a, **kw: (_ for _ in ()).throw(RuntimeError("stop")))
    r = invoke("bench", z, "-m", c.budget("mid"), "--policy", "zipmoe")
    assert r.stderr.splitlines() == [want, "error: stop"], r.stderr


def test_read_buffers_are_reused_and_never_shared_with_a_slot(tiny_case, monkeypatch):
    """Misses read into pooled buffers: over many misses only a few buffers are ever mapped
    (no page faults or heap growth per read), outputs stay bit-identical, and no buffer that a
    moving zipmoe slot adopted is handed to a later read."""
    case = tiny_case("mixtral")
    made = []
    real = buffers.anon_array

    def counting(nbytes):
        made.append(nbytes)
        return real(nbytes)

    monkeypatch.setattr(buffers, "anon_array", counting)
    source = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
    engine = ExpertEngine(source, case.budget("min"), "zip-lru", workers=WORKERS, io_depth=4)
    try:
        logits, tokens = generate(build_model(source, executor=engine), case.ids, DECODE_STEPS)
        misses = engine.stats.hits["miss"]
        pooled = {w: len(q) for w, q in engine._read_pool.items()}
    finally:
        engine.close()
        source.close()
    assert_same_logits(logits, case.ref_logits)
    assert tokens == case.ref_tokens
    caps = set(engine._read_cap.values())
    reads = [n for n in made if n in caps]
    assert misses > 4 * engine.window
    # the prefill's window of experts plus the decode steps' k: a few buffers per region kind
    assert 0 < len(reads) <= 2 * 2 * engine.window, (len(reads), misses)
    assert all(0 < n <= engine.window for n in pooled.values())

    # zipmoe with moving slots: every slot region is a distinct buffer from any pooled one
    delay = case.delay("CE")
    src2, eng2, _ = make_engine(case, case.budget("mid"), "zipmoe", delay=delay)
    try:
        logits2, _ = generate(build_model(src2, executor=eng2), case.ids, DECODE_STEPS)
        moves = eng2.slot_moves
        pool = [b for q in eng2._read_pool.values() for b in q]
        held = [a for sl in eng2.slots.values() for a in (sl.sm, sl.exp) if a is not None]
        assert not any(np.may_share_memory(a, b) for a in held for b in pool)
    finally:
        eng2.close()
        src2.close()
    assert_same_logits(logits2, case.ref_logits)
    assert moves > 0   # slots did adopt read buffers


@pytest.mark.parametrize("content,needle", [
    ("[1, 2]", "expected a JSON object, got list"),
    ("null", "expected a JSON object, got NoneType"),
    ('{"exp_read_s": 1}', "'sm_read_s' must be a positive number, got None"),
    ("CALIB:sm_read_s=fast", "'sm_read_s' must be a positive number, got 'fast'"),
    ("CALIB:io_depth=four", "'io_depth' must be an integer, got 'four'"),
    ("CALIB:version=3.0", "'version' must be an integer, got 3.0"),
    ("CALIB:decode_speedup=[1]", "'decode_speedup' must map worker counts"),
    (b"\xff\xfe{", "codec can't decode"),
])
def test_malformed_calibration_names_the_file(tiny_case, tmp_path, content, needle):
    """A calibration that is JSON but not a calibration (or not UTF-8) is refused with an error
    that names the file and the fix, from load() and from the CLI."""
    from click.testing import CliRunner

    from zipmoe_rt.cli import main

    c = tiny_case("mixtral")
    if isinstance(content, str) and content.startswith("CALIB:"):
        key, value = content[6:].split("=")
        content = json.dumps(_fitting_calibration(c, **{key: json.loads(value) if value[0] in "[0123456789" else value}))
    z, cpath = _calibrated_copy(c, tmp_path, {})
    (cpath.write_bytes if isinstance(content, bytes) else cpath.write_text)(content)
    with pytest.raises(TraceError) as ei:
        zipmoe_rt.load(z, memory_budget=c.budget("mid"), policy="zipmoe")
    msg = str(ei.value)
    assert msg.startswith(f"{cpath}: not a valid calibration file (") and needle in msg, msg
    assert msg.endswith("re-run `zipmoe-rt calibrate` on the model")
    r = CliRunner().invoke(main, ["run", str(z), "-p", "x", "-n", "1", "-m", str(c.budget("mid")),
                                  "--policy", "zipmoe"], env={"ZIPMOE_RT_DEBUG": None})
    assert r.exit_code == 1 and r.stderr.strip() == f"error: {msg}", r.stderr


def test_io_depth_must_be_a_whole_number_even_unbudgeted(tiny_case):
    c = tiny_case("mixtral")
    for bad in (0, 1.5, True, "abc"):
        for budget in (None, c.budget("mid")):
            with pytest.raises(ValueError, match=r"io_depth \(--io-depth\) must be an integer"):
                zipmoe_rt.load(c.zmoe, memory_budget=budget, policy="zip-lru", io_depth=bad)


def test_bench_rows_and_planner_prediction_beside_measurement(tiny_case):
    """`zipmoe-rt bench` end to end on a tiny model: one row per policy with real rates, hit
    rates over every use, and for zipmoe the planner's predicted layer makespan beside the
    measured one (also printed under the table)."""
    from zipmoe_rt import bench as B

    c = tiny_case("mixtral")
    res = B.run(c.zmoe, [c.budget("mid")], ["raw-lru", "zip-lru", "zipmoe"], pp=8, tg=4,
                reps=1, workers=WORKERS, raw_model=c.raw, trace=c.trace_path, log=lambda s: None)
    rows = {r["policy"]: r for r in res["rows"]}
    assert set(rows) == {"raw-lru", "zip-lru", "zipmoe"}
    for r in rows.values():
        assert r["tg_tps"][0] > 0 and r["pp_tps"][0] > 0
        assert sum(r["hit_rate"].values()) == pytest.approx(1.0)
        assert r["measured_layer_ms"] > 0
    assert "predicted_layer_ms" not in rows["zip-lru"] and "predicted_layer_ms" not in rows["raw-lru"]
    z = rows["zipmoe"]
    # the prediction is the plan's (the mean of its layers' expected makespans) under a
    # calibration measured afresh at each load, so only its presence and sign are checked here;
    # tests/test_planner.py checks the makespan arithmetic on fixed calibrations
    assert np.isfinite(z["predicted_layer_ms"]) and z["predicted_layer_ms"] > 0
    table = B.table(res)
    assert re.search(r"planner \(zipmoe, budget \d+\): measured \d+\.\d\d ms per MoE layer per "
                     r"decode token; predicted \d+\.\d\d ms \(\d+\.\d\dx\)", table), table
    json.dumps(res)


def test_bench_engine_figures_count_the_decode_steps_only(tiny_case):
    """The tg runs' engine figures (hits, bytes read, stage times per token) cover the decode
    steps, not the prefill of the tg prompt: one MoE call per MoE layer per decode step."""
    from zipmoe_rt import bench as B
    from zipmoe_rt.api import parse_size
    from zipmoe_rt.engine.store import ZmoeSource

    c = tiny_case("mixtral")
    src = ZmoeSource(c.zmoe)
    nbytes, moe_layers = parse_size(c.budget("mid"), src), len(src.hparams["moe_layers"])
    src.close()
    runs, _mem = B.run_config(str(c.zmoe), nbytes, "zip-lru", 0, 5, 1, WORKERS, False, "lru",
                              None)
    r = runs[0]
    assert r["decoded"] == 5 and r["decode_steps"] == 4
    assert r["engine"]["layer_calls"] == 4 * moe_layers
    assert sum(r["engine"]["hits"].values()) == 4 * moe_layers * src.hparams["num_experts_per_tok"]
