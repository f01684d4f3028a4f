"""Experts of the budgeted engine in the compute form (zipmoe_rt/engine/ctier.py): zipmoe's C
tier computed in place, and ``--resident compressed`` under a budget (the policies' caches
hold compute-form experts).

* Parity: on every tiny spec, every policy (raw-lru on the raw-expert file, zip-lru, zipmoe)
  with compressed caches, at the minimum, a middle and an all-experts budget, and zipmoe with
  each C form: the [T, vocab] prefill logits, every decode step's logits and the tokens equal
  the unbudgeted model's bit for bit, the resident bytes (counted from the arrays held) stay
  within the budget at every MoE call, and the caches hold compute-form experts.
* A C hit in the compute form runs no decode and no transcode, reads nothing, and is the
  slot's own PackedExpert; in the storage form (``c_form="planes"``) every C hit decodes.
* Compressed caches fit more experts than BF16 ones in the same bytes; an F pool bounded in
  bytes evicts until a newcomer fits; C slots whose escapes outgrow the plan drop to S.
* Planner: a C hit in the compute form is priced without a decode, with the packed matmul's
  extra time; the vectorised frontier equals the brute-force expectation for it.
* Options: ``c_tier`` / ``--c-tier`` checked by name; compressed with a budget on ``cuda`` is
  refused by name; the calibration measures the compute form's costs.
"""
from __future__ import annotations

import numpy as np
import pytest

import zipmoe_rt
from zipmoe_rt.engine import layout as L_
from zipmoe_rt.engine import resident as R
from zipmoe_rt.engine.ctier import ESCAPE_SHARE, compute_form_delay
from zipmoe_rt.engine.pipeline import ExpertEngine
from zipmoe_rt.engine.planner import (DelayModel, TierPlan, expected_layer_makespan,
                                      layer_frontier)
from zipmoe_rt.engine.store import ZmoeSource
from zipmoe_rt.engine.tiers import FullPool
from zipmoe_rt.models import build_model
from zipmoe_rt.models.packed import PackedExpert

from test_engine import (ARCHS, DECODE_STEPS, WORKERS, CallLog, assert_same_logits,  # noqa: F401
                         generate, resident_total, tiny_case)

#: (policy, budget, delay set or None, c_form)
CONFIGS = ([(p, b, None, "packed") for p in ("raw-lru", "zip-lru") for b in ("min", "mid", "all")]
           + [("zipmoe", b, "CE", "packed") for b in ("mid", "all")]
           + [("zipmoe", "mid", d, c) for d in ("S", "FE") for c in ("packed", "planes")])


def _engine(case, budget: int, policy: str, resident: str, c_form: str = "packed",
            delay: str | None = None, **kw):
    """(source, engine) over a fresh budgeted source; zipmoe plans from the case's trace with
    the C tier priced as :func:`compute_form_delay` prices it."""
    from zipmoe_rt.engine import profile as prof
    from zipmoe_rt.engine.pipeline import budget_split
    path = case.raw if policy == "raw-lru" else case.zmoe
    source = ZmoeSource(path, keep_experts=False, copy_dense=True)
    try:
        if policy == "zipmoe":
            d = case.delay(delay)
            if c_form == "planes" or not case.packable:
                d = DelayModel(**{**d.__dict__, "bytes_c_form": 0, "c_matmul_s": 0.0})
            calib = {"c_matmul_s": d.c_matmul_s or 2e-6, "escape_share": 0.0,
                     "transcode_s": d.decode_s}
            d, share = compute_form_delay(d, source, calib, resident, c_form)
            tr = prof.load_trace(case.trace_path, source)
            plan, ranks = prof.make_plan(tr, d, budget_split(source, budget)[2], case.k)
            engine = ExpertEngine(source, budget, "zipmoe", plan=plan.layers, ranks=ranks,
                                  workers=WORKERS, delay=d, resident=resident, c_form=c_form,
                                  escape_share=share, **kw)
        else:
            engine = ExpertEngine(source, budget, policy, workers=WORKERS, resident=resident,
                                  c_form=c_form, **kw)
    except BaseException:
        source.close()
        raise
    return source, engine


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("policy,budget,delay,c_form", CONFIGS,
                         ids=[f"{p}-{b}-{d or ''}-{c}" for p, b, d, c in CONFIGS])
def test_compressed_caches_are_bit_identical_and_within_budget(tiny_case, arch, policy, budget,
                                                               delay, c_form):
    case = tiny_case(arch)
    b = case.budget(budget)
    source, engine = _engine(case, b, policy, "compressed", c_form, delay)
    try:
        net = build_model(source, executor=engine)
        log = CallLog(engine)
        net.route_hook = log
        logits, tokens = generate(net, case.ids, DECODE_STEPS)
        log.reports.append(engine.memory_report())
        assert len(log.reports) > DECODE_STEPS
        for rep in log.reports:
            assert resident_total(rep) <= b, rep
        assert sum(engine.stats.hits.values()) == log.uses > 0
        packs = {k: R.packable(l, raw=policy == "raw-lru") for k, l in engine.layouts.items()}
        for pool in {id(p): p for p in engine.fpools.values()}.values():
            assert pool.nbytes <= (pool.max_bytes or pool.capacity * engine.bytes_F)
            for key, w in pool.slots.items():
                assert isinstance(w, PackedExpert) == packs[key]
        if budget == "min":
            assert engine.stats.hits["miss"] == log.uses
        if any(packs.values()) and any(p.capacity for p in engine.fpools.values()):
            assert engine.transcodes > 0       # what the F caches keep is transcoded
        for key, s in engine.slots.items():
            if s.tier == "C":
                assert (s.packed is not None) == (c_form == "packed" and packs[key])
    finally:
        engine.close()
        source.close()
    assert_same_logits(logits, case.ref_logits)
    assert tokens == case.ref_tokens


@pytest.mark.parametrize("c_form", ["packed", "planes"])
def test_a_c_hit_in_the_compute_form_decodes_nothing(tiny_case, monkeypatch, c_form):
    """Every expert in a C slot: in the compute form each use is the slot's own PackedExpert,
    with no decode job, no transcode and no read; in the storage form every use decodes."""
    c = tiny_case("mixtral")
    layers, N = c.hp["moe_layers"], int(c.hp["num_experts"])
    tp = TierPlan(0, N, 0, 0, 0.0, 0.0, order=tuple(range(N)))
    src = ZmoeSource(c.zmoe, keep_experts=False, copy_dense=True)
    engine = ExpertEngine(src, c.budget("all"), "zipmoe", plan=[tp] * len(layers),
                          ranks=[list(range(N))] * len(layers), workers=WORKERS, c_form=c_form)
    calls = {"decode": 0, "pack": 0}
    real_dec, real_pack = L_.decode_chunks, R.pack_piece

    def count(name, fn):
        def f(*a, **kw):
            calls[name] += 1
            return fn(*a, **kw)
        return f

    monkeypatch.setattr(L_, "decode_chunks", count("decode", real_dec))
    monkeypatch.setattr("zipmoe_rt.engine.ctier.pack_piece", count("pack", real_pack))
    seen = []
    real_tok = engine.backend.experts_token

    def spy(out, x, experts, weights, *a, **kw):
        seen.extend(experts)
        return real_tok(out, x, experts, weights, *a, **kw)

    monkeypatch.setattr(engine.backend, "experts_token", spy)
    try:
        assert engine.transcodes == (len(layers) * N if c_form == "packed" else 0)
        net = build_model(src, executor=engine)
        logits, tokens = generate(net, c.ids, DECODE_STEPS)
        uses = sum(engine.stats.hits.values())
        assert engine.stats.hits["C"] == uses > 0
        assert engine.stats.reads == 0 and engine.stats.bytes_read == 0
        slots = {id(s.packed) for s in engine.slots.values()}
        if c_form == "packed":
            assert calls == {"decode": 0, "pack": 0} and engine.stats.decode_s == 0.0
            assert all(isinstance(s.packed, PackedExpert) and s.exp is None
                       for s in engine.slots.values())
            assert seen and all(id(w) in slots for w in seen)
            assert all(len(p.slots) == 0 for p in engine.fpools.values())
        else:
            assert calls["decode"] >= uses and calls["pack"] == 0
            assert all(s.packed is None and s.exp is not None for s in engine.slots.values())
            assert seen and not any(isinstance(w, PackedExpert) for w in seen)
    finally:
        engine.close()
        src.close()
    assert_same_logits(logits, c.ref_logits)
    assert tokens == c.ref_tokens


def test_compressed_caches_hold_more_experts_in_the_same_bytes(tiny_case):
    """At the same budget zip-lru's compressed cache holds more experts than its BF16 one once
    warm, each in under 85 % of its BF16 bytes, and a second pass is all F hits with no reads
    (bit-identical)."""
    c = tiny_case("qwen2_moe")
    b = c.budget("mid")
    held = {}
    for resident in ("full", "compressed"):
        source, engine = _engine(c, b, "zip-lru", resident)
        try:
            net = build_model(source, executor=engine)
            for _ in range(2):
                generate(net, c.ids, DECODE_STEPS)
            pool = engine.fpools[c.hp["moe_layers"][0]]
            held[resident] = len(pool.slots)
            assert pool.nbytes <= engine.tier_budget
            if resident == "compressed":
                share = pool.nbytes / sum(w.bf16_nbytes for w in pool.slots.values())
        finally:
            engine.close()
            source.close()
    assert held["compressed"] > held["full"] > 0, held
    assert share < 0.85, share   # tiny random matrices: offsets and escapes weigh more (0.757 at scale)
    source, engine = _engine(c, c.budget("all"), "zip-lru", "compressed")
    try:
        net = build_model(source, executor=engine)
        generate(net, c.ids, DECODE_STEPS)
        engine.stats.reset()
        logits, tokens = generate(net, c.ids, DECODE_STEPS)
        assert engine.stats.hits["miss"] == 0 and engine.stats.reads == 0
        assert engine.stats.hits["F"] > 0
    finally:
        engine.close()
        source.close()
    assert_same_logits(logits, c.ref_logits)
    assert tokens == c.ref_tokens


class _Blob:
    def __init__(self, n):
        self.nbytes = n


def test_f_pool_bounded_in_bytes_evicts_until_a_newcomer_fits():
    pool = FullPool(10, "lru", max_bytes=100)
    for i, n in enumerate((40, 30, 20)):
        assert pool.admit(i, _Blob(n))
    assert pool.nbytes == 90
    assert pool.admit(3, _Blob(50))            # evicts 0 (40), the least recent: 30 + 20 + 50
    assert list(pool.slots) == [1, 2, 3] and pool.nbytes == 100
    assert pool.admit(4, _Blob(45))            # evicts 1 and 2
    assert list(pool.slots) == [3, 4] and pool.nbytes == 95
    assert not pool.admit(6, _Blob(10), in_use={3, 4})   # nothing evictable: refused
    assert list(pool.slots) == [3, 4]
    assert pool.admit(5, _Blob(100)) and list(pool.slots) == [5] and pool.nbytes == 100


@pytest.mark.parametrize("eviction,window", [("lru", 0), ("lru", 4), ("lfu", 0), ("tlfu", 0)])
def test_would_admit_is_what_admit_does(eviction, window):
    """The engine transcodes only what the F cache will keep: would_admit predicts admit."""
    rng = np.random.default_rng(len(eviction) + window)
    pool = FullPool(3, eviction, admit_window=window)
    said = set()
    for _ in range(400):
        key = int(rng.integers(8))
        pool.touch(key, int(rng.integers(1, 4)))
        want = pool.would_admit(key)
        said.add(want)
        assert pool.admit(key, _Blob(1)) == want
    assert said == {True, False} or eviction == "lru" and window == 0
    assert not FullPool(0).would_admit(1)


def test_c_slots_that_outgrow_the_plan_drop_to_s(tiny_case):
    """A plan made with fewer escapes than the experts have (bytes too small) leaves the C
    slots that do not fit as S slots (their SM region kept): the budget holds."""
    c = tiny_case("mixtral")
    layers, N = c.hp["moe_layers"], int(c.hp["num_experts"])
    src = ZmoeSource(c.zmoe, keep_experts=False, copy_dense=True)
    lays = list(src.layouts.values())
    sm_exp = max(l.sm_region[1] + l.exp_region[1] for l in lays)
    # a budget with room for every expert's storage form but not every compute form
    budget = c.dense + c.k * c.bytes_F + len(lays) * sm_exp
    tp = TierPlan(0, N, 0, 0, 0.0, 0.0, order=tuple(range(N)))
    engine = ExpertEngine(src, budget, "zipmoe", plan=[tp] * len(layers),
                          ranks=[list(range(N))] * len(layers), workers=WORKERS)
    try:
        tiers = [s.tier for s in engine.slots.values()]
        assert "C" in tiers and "S" in tiers and set(tiers) == {"C", "S"}
        rep = engine.memory_report()
        assert rep["C"] + rep["S"] <= engine.tier_budget
        assert resident_total(rep) <= budget
        logits, tokens = generate(build_model(src, executor=engine), c.ids, DECODE_STEPS)
    finally:
        engine.close()
        src.close()
    assert_same_logits(logits, c.ref_logits)
    assert tokens == c.ref_tokens


# ------------------------------------------------------------------------------------------------
# planner


def _delay(c_form: bool) -> DelayModel:
    return DelayModel(sm_read_s=3e-3, exp_read_s=1e-3, decode_s=2e-3, matmul_s=4e-4, workers=2,
                      bytes_F=100, bytes_sm=50, bytes_exp=17, chunks=3,
                      bytes_c_form=76 if c_form else 0, c_matmul_s=5e-4 if c_form else 0.0)


def test_a_c_hit_in_the_compute_form_is_priced_without_a_decode():
    planes, packed = _delay(False), _delay(True)
    assert planes.bytes_C == 67 and packed.bytes_C == 76
    hits = {"F": 1, "C": 3}
    # storage form: 3 decodes of 3 chunks on 2 workers = 5 rounds of decode_s / 3
    assert planes.layer_makespan(hits) == pytest.approx(5 * 2e-3 / 3 + 4e-4 * 2)
    # compute form: no decode; each C hit computes 1e-4 s longer than an F hit
    assert packed.layer_makespan(hits) == pytest.approx(3 * 1e-4 + 4e-4 * 2)
    assert packed.layer_makespan({"F": 4}) == planes.layer_makespan({"F": 4})
    mixed = {"F": 1, "C": 2, "S": 1}      # compute-bound: the C decodes are what it waits for
    assert packed.layer_makespan(mixed) < planes.layer_makespan(mixed)
    with pytest.raises(ValueError, match="c_matmul_s"):
        DelayModel(1, 1, 1, 1, 1, 1, 1, 1, bytes_c_form=1, c_matmul_s=-1.0)


@pytest.mark.parametrize("c_form", [False, True])
def test_frontier_equals_the_brute_force_expectation_in_either_form(c_form):
    rng = np.random.default_rng(5)
    w = rng.gamma(0.7, size=7)
    d = _delay(c_form)
    f = layer_frontier(w, 2, d)
    for i in rng.choice(len(f.counts), 25, replace=False):
        nF, nC, nS, nE = (int(v) for v in f.counts[i])
        want = expected_layer_makespan(w, (nF, nC, nS, nE), 2, d)
        assert f.makespan_s[i] == pytest.approx(want, rel=1e-9)
        assert f.bytes[i] == nF * 100 + nC * d.bytes_C + nS * 50 + nE * 17


def test_compute_form_delay_prices_what_the_engine_holds(tiny_case):
    c = tiny_case("mixtral")
    src = ZmoeSource(c.zmoe, keep_experts=False, copy_dense=True)
    try:
        base = c.delay("CE")
        base = DelayModel(**{**base.__dict__, "bytes_c_form": 0, "c_matmul_s": 0.0,
                             "load_C_s": 2e-4})
        calib = {"c_matmul_s": 3e-6, "transcode_s": 7e-4, "escape_share": 0.02}
        d, share = compute_form_delay(base, src, calib, "full", "packed")
        assert share == 0.04
        want = max(R.compute_form_bytes(l, 0.04) for l in src.layouts.values())
        assert d.bytes_C == d.bytes_c_form == want and d.c_matmul_s == 3e-6
        assert d.bytes_F == base.bytes_F and d.matmul_s == base.matmul_s
        assert d.load_C_s == 0.0      # a compute-form C hit loads nothing
        d, share = compute_form_delay(base, src, {**calib, "escape_share": 0.0}, "compressed",
                                      "packed")
        assert share == ESCAPE_SHARE
        want = max(R.compute_form_bytes(l, ESCAPE_SHARE) for l in src.layouts.values())
        assert d.bytes_F == d.bytes_C == want and d.matmul_s == d.c_matmul_s == 3e-6
        assert d.decode_s == 7e-4
        d, _ = compute_form_delay(base, src, calib, "full", "planes")
        assert d == base
        # bounds: the estimate at the share is at least what each expert holds
        for key in list(src.layouts)[:4]:
            P = src.pack_expert(*key)
            assert P.nbytes <= R.compute_form_bytes(src.layouts[key], ESCAPE_SHARE)
            assert P.nbytes >= R.compute_form_bytes(src.layouts[key], 0.0)
    finally:
        src.close()


def test_calibration_measures_the_compute_form(tiny_case):
    from zipmoe_rt.engine import calibration
    c = tiny_case("mixtral")
    src = ZmoeSource(c.zmoe, keep_experts=False, copy_dense=True)
    try:
        cal = calibration.calibrate(src, samples=3)
    finally:
        src.close()
    assert cal["c_matmul_s"] > 0 and cal["transcode_s"] > 0 and 0 <= cal["escape_share"] < 1


# ------------------------------------------------------------------------------------------------
# options


def test_compressed_with_a_budget_on_cuda_is_refused_by_name(monkeypatch, tmp_path):
    import zipmoe_rt.backends as B

    class _Cuda:
        name = "cuda"

    monkeypatch.setattr(B, "resolve_device", lambda device, what: "cuda")
    monkeypatch.setattr(B, "get_backend", lambda name=None: _Cuda())
    z = tmp_path / "m.zmoe"
    z.write_bytes(b"not read: the options are checked first")
    with pytest.raises(ValueError, match=r"resident \(--resident\): 'compressed' with a memory "
                                         r"budget .* runs on the CPU engine only"):
        zipmoe_rt.load(z, device="cuda", resident="compressed", memory_budget="50%")


def test_calibration_in_a_budgeted_load_holds_its_samples_within_its_bound(tiny_case,
                                                                          monkeypatch):
    # a load without a stored calibration calibrates within half the tier budget
    # (engine/factory.py); with --resident compressed the dense compute form is already held
    # then, so sample regions held beyond that bound (12 samples' regions, and a second copy of
    # each from the io_depth read pass) took the load past a memory limit
    import threading
    import weakref

    from zipmoe_rt.engine import calibration
    from zipmoe_rt.engine.io import IO_DEPTH, RegionReader

    lock, live, peak = threading.Lock(), [0], [0]

    def drop(n):
        with lock:
            live[0] -= n

    class Counting(RegionReader):
        def read(self, offset, size, *a, **k):
            buf = super().read(offset, size, *a, **k)
            with lock:
                live[0] += buf.nbytes
                peak[0] = max(peak[0], live[0])
            weakref.finalize(buf, drop, buf.nbytes)
            return buf

    monkeypatch.setattr(calibration, "RegionReader", Counting)
    c = tiny_case("mixtral")
    src = ZmoeSource(c.zmoe, keep_experts=False, copy_dense=True)
    try:
        lays = list(src.layouts.values())
        pair = max(l.sm_region[1] + l.exp_region[1] for l in lays)
        assert len(lays) >= 12
        # room for three samples' regions beside the reads in flight: twelve do not fit
        bound = 3 * pair + IO_DEPTH * pair
        cal = calibration.calibrate(src, max_bytes=bound, io_depth=IO_DEPTH)
        assert 0 < peak[0] <= bound
        assert cal["decode_s"] > 0 and cal["c_matmul_s"] > 0
        # unbounded (`zipmoe-rt calibrate`): all twelve samples, as before
        peak[0] = 0
        calibration.calibrate(src, io_depth=IO_DEPTH)
        assert peak[0] >= 12 * min(l.sm_region[1] + l.exp_region[1] for l in lays)
    finally:
        src.close()
