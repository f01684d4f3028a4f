"""Planner and ``auto`` details: calibration versions, the shared pool's size in the form the
cache holds, the F-pool replay with compute-form C slots, and what the banner says about the
C tier (zipmoe_rt/engine/calibration.py, engine/factory.py, engine/planner/)."""
from __future__ import annotations

import os
import platform

import zipmoe_rt
from zipmoe_rt.engine import profile as prof
from zipmoe_rt.engine.store import ZmoeSource

from test_engine import (DECODE_STEPS, _calibrated_copy, _fitting_calibration,
                         assert_same_logits, generate)
from test_engine import tiny_case  # noqa: F401  (the fixture, shared with test_engine.py)


def test_a_version_4_calibration_is_flagged_for_remeasuring():
    # version 4 could time the C tier's engine load on compute-form C slots; a run warns and
    # names the command that re-measures it
    ok = {"version": prof.CALIB_VERSION, "direct": False, "cpus": os.cpu_count(),
          "machine": platform.node()}
    assert prof.calibration_mismatch(ok, direct=False) == []
    [why] = prof.calibration_mismatch(dict(ok, version=4), direct=False)
    assert why == ("it was written by an older zipmoe-rt (calibration version 4, current "
                   f"{prof.CALIB_VERSION}), which may have timed the C tier's engine load on "
                   "compute-form C slots")


# -- the shared pool of ``auto`` is sized in the form the cache holds ----------------------------
def test_auto_sizes_the_shared_pool_in_the_form_it_holds(tiny_case, tmp_path, monkeypatch):
    from zipmoe_rt.engine import factory
    from zipmoe_rt.engine.planner import choice
    c = tiny_case("qwen2_moe")
    assert c.packable
    z, _ = _calibrated_copy(c, tmp_path, _fitting_calibration(c))
    seen = []
    real = choice.shared_pool_layer_s

    def spy(runs, n, k, capacity, delay):
        seen.append(capacity)
        return real(runs, n, k, capacity, delay) * 0.0     # predicted fastest: auto runs it
    monkeypatch.setattr(choice, "shared_pool_layer_s", spy)
    caps = {}
    for resident in ("full", "compressed"):
        m = zipmoe_rt.load(z, memory_budget=c.budget("mid"), policy="auto", resident=resident,
                           progress=False)
        try:
            assert m.engine.policy == "zip-lru" and m.engine.auto_choice["engine"] == "zip-lru"
            pool = m.engine.fpools[c.hp["moe_layers"][0]]
            # the replay priced the pool the engine runs: as many experts as it holds
            assert seen[-1] == pool.capacity
            caps[resident] = pool.capacity
            logits, tokens = generate(m.net, c.ids, DECODE_STEPS)
            assert tokens == c.ref_tokens
            assert_same_logits(logits, c.ref_logits)
        finally:
            m.close()
    # the compute form is smaller than BF16, so the compressed pool holds more experts
    assert caps["compressed"] > caps["full"] > 0
    tier = c.budget("mid") - c.dense - c.k * c.bytes_F
    assert factory.shared_pool_capacity(ZmoeSource(c.zmoe, keep_experts=False), tier) \
        == caps["full"]


# -- --c-tier says nothing of a C tier the plan does not have --------------------------------------
def test_c_tier_planes_is_not_in_the_banner_of_an_auto_plan_without_c_slots(tiny_case, tmp_path):
    from cli_runner import cli
    from test_auto_policy import WINNERS
    c = tiny_case("mixtral")
    z, _ = _calibrated_copy(c, tmp_path, _fitting_calibration(c, **WINNERS["lru"]))
    r = cli("run", z, "-p", "hello", "-n", 3, "-m", "50%", "--policy", "auto",
            "--c-tier", "planes")
    assert r.exit_code == 0, r.output
    [banner] = [l for l in r.stderr.splitlines() if "; policy " in l]
    assert "policy zipmoe (auto: lru " in banner and "C tier planes" not in banner, banner
    assert [l for l in r.stderr.splitlines() if "warning" in l] == [
        "zipmoe-rt: warning: --c-tier: no effect: the plan has no C slot in any MoE layer"]
    # where the plan has C slots, the banner says which form they take, without a warning
    z2, _ = _calibrated_copy(c, tmp_path / "t", _fitting_calibration(c, **WINNERS["tiers"])) \
        if (tmp_path / "t").mkdir() is None else None
    r = cli("run", z2, "-p", "hello", "-n", 3, "-m", "50%", "--policy", "auto",
            "--c-tier", "planes")
    assert r.exit_code == 0, r.output
    [banner] = [l for l in r.stderr.splitlines() if "; policy " in l]
    assert banner.endswith(", C tier planes (decoded at every use)"), banner
    assert [l for l in r.stderr.splitlines() if "warning" in l] == []


# -- the planner's error, term by term ---------------------------------------------------------
def test_term_breakdown_hand_case():
    import pytest
    from zipmoe_rt import bench_planner
    from zipmoe_rt.engine.planner import DelayModel
    d = DelayModel(sm_read_s=2e-3, exp_read_s=1e-3, decode_s=3e-3, matmul_s=5e-4, workers=2,
                   bytes_F=16, bytes_sm=8, bytes_exp=3, layer_fixed_s=2e-4, load_C_s=1e-4,
                   load_S_s=3e-4, load_E_s=4e-4, load_miss_s=6e-4)
    # call A: 2 F hits; call B: 1 S + 1 miss (reads 2 + 2 x 1 ms, the last one's decode 3 ms:
    # io 7 ms > 2 decodes on 2 workers 3 ms; engine 0.2 + 0.3 + 0.6 ms)
    stats = {"decode_layer_s": 0.010, "decode_layer_calls": 2, "compute_s": 0.002,
             "wait_s": 0.006, "io_s": 0.005, "decode_s": 0.007,
             "call_hits": {"2,0,0,0,0": 1, "0,0,1,0,1": 1}}
    t = bench_planner.term_breakdown(stats, d, 2)
    want = {"layer": (5.0, (0.7 + 8.6) / 2), "matmul": (1.0, 0.5), "wait": (3.0, 7.0 / 2),
            "rest": (1.0, (0.2 + 1.1) / 2), "reads": (2.5, 4.0 / 2), "decode": (3.5, 6.0 / 2)}
    assert set(t) == set(want)
    for term, (m, p) in want.items():
        assert t[term] == (pytest.approx(m), pytest.approx(p)), term
    line = bench_planner.breakdown_line(t)
    assert line.startswith("layer 5.000/4.650 (1.08x), rest 1.000/0.650 (1.54x)"), line
    assert bench_planner.term_breakdown({"decode_layer_calls": 0}, d, 2) == {}


# -- the F-pool replay and compute-form C slots ----------------------------------------------------
def test_no_plan_of_a_pool_and_compute_form_c_slots():
    """The engine never admits a compute-form C hit to the layer's LRU pool; the replay admits
    every use outside the pool, so plans of both are left out; storage-form C keeps them, and
    the plans left are priced as before."""
    import dataclasses
    import numpy as np
    from zipmoe_rt.engine.planner import layer_frontier_lru, lru_pool_model
    from test_planner import random_delay
    rng = np.random.default_rng(3)
    n, k = 6, 2
    runs = [np.stack([rng.choice(n, k, replace=False) for _ in range(40)])]
    model = lru_pool_model(runs, n, k, admission=True)
    d = random_delay(rng)
    packed = dataclasses.replace(d, bytes_c_form=d.bytes_sm, c_matmul_s=d.matmul_s * 2)
    for pareto in (False, True):
        f_st, _ = layer_frontier_lru(model, k, d, pareto=pareto)
        f_pk, _ = layer_frontier_lru(model, k, packed, pareto=pareto)
        both = lambda f: (f.counts[:, 0] > 0) & (f.counts[:, 1] > 0)
        assert not both(f_pk).any()
        if not pareto:
            assert both(f_st).any()
            # the other plans of the compute-form frontier: all of them, priced as before
            full, _ = layer_frontier_lru(model, k, packed, pareto=False)
            assert len(full.counts) == (~both(f_st)).sum()
        assert np.isfinite(f_pk.makespan_s).all() and (f_pk.counts[:, 1] > 0).any()


def test_auto_runs_the_shared_pool_where_it_ties_with_the_per_layer_plans(tiny_case, tmp_path,
                                                                          monkeypatch):
    from zipmoe_rt.engine import factory
    c = tiny_case("qwen2_moe")
    z, _ = _calibrated_copy(c, tmp_path, _fitting_calibration(c))
    real, box = prof.make_plan_choices, {}

    def choices(*a, **kw):
        ch, ranks = real(*a, **kw)
        box["s"] = ch["auto"].predicted_makespan_s
        return ch, ranks
    monkeypatch.setattr(prof, "make_plan_choices", choices)
    for extra, engine in ((0.0, "zip-lru"), (1e-9, "zipmoe")):
        monkeypatch.setattr(factory, "_shared_pool_s", lambda *a, _x=extra: box["s"] + _x)
        m = zipmoe_rt.load(z, memory_budget=c.budget("mid"), policy="auto", progress=False)
        try:
            assert m.engine.policy == engine and m.engine.auto_choice["engine"] == engine
        finally:
            m.close()


# -- the calibration times F calls where the other tiers' loads have faded ------------------------
def test_f_calls_are_timed_after_more_settling_sweeps(tiny_case, monkeypatch):
    import numpy as np
    from zipmoe_rt.engine import overhead as O
    c = tiny_case("mixtral")
    src = ZmoeSource(c.zmoe, keep_experts=False)
    calls, timed = {}, {}
    real_engine = O._scenario_engine

    def counting(source, tier, *a, **kw):
        eng, pool = real_engine(source, tier, *a, **kw)
        run = eng.run

        def counted(*ra, **rk):
            calls[tier] = calls.get(tier, 0) + 1
            return run(*ra, **rk)
        eng.run = counted
        return eng, pool
    monkeypatch.setattr(O, "_scenario_engine", counting)
    try:
        times = O.time_scenarios(src, c.delay("CE"), workers=2, reps=1)
    finally:
        src.close()
    layers = O.scenario_layers(ZmoeSource(c.zmoe, keep_experts=False))
    block = max(O.BLOCK, 2 * layers)
    rounds = 2                                # a warming round and one timed block (reps = 1)
    assert O.F_SETTLE_SWEEPS == 4
    for t in O.SCENARIOS:
        settle = layers * (O.F_SETTLE_SWEEPS if t == "F" else 1)
        assert calls[t] == rounds * (settle + block), t
        assert np.isfinite(times[t]) and times[t] > 0


def test_modelled_layer_time_with_the_engines_delay_model(tmp_path):
    import dataclasses
    import pytest
    from zipmoe_rt import bench_planner
    from zipmoe_rt.engine.planner import DelayModel
    d = DelayModel(sm_read_s=2e-3, exp_read_s=1e-3, decode_s=3e-3, matmul_s=5e-4, workers=2,
                   bytes_F=16, bytes_sm=8, bytes_exp=3)
    hits = [{"0,2,0,0,0": 1}]      # two C hits: decoded in the storage form
    got = bench_planner.modelled_layer_ms(hits, tmp_path / "none.zmoe", 2, delay=d)
    assert got == pytest.approx(1e3 * (3e-3 + 5e-4))      # 2 decodes on 2 workers + matmul
    packed = dataclasses.replace(d, bytes_c_form=8, c_matmul_s=7e-4)
    got = bench_planner.modelled_layer_ms(hits, tmp_path / "none.zmoe", 2, delay=packed)
    assert got == pytest.approx(1e3 * (2 * 2e-4 + 5e-4))   # computed in place, no decode
    assert bench_planner.modelled_layer_ms(hits, tmp_path / "none.zmoe", 2) is None


def test_bench_rows_price_the_modelled_time_with_the_engines_delay_model(tmp_path):
    import dataclasses
    import json
    import pytest
    from zipmoe_rt import bench_planner
    from zipmoe_rt.engine.planner import DelayModel
    z = tmp_path / "m.zmoe"
    calib = {"sm_read_s": 2e-3, "exp_read_s": 1e-3, "decode_s": 3e-3, "matmul_s": 5e-4,
             "bytes_F": 16, "bytes_sm": 8, "bytes_exp": 3, "chunks": 1}
    prof.sidecar(z, prof.CALIB_SUFFIX).write_text(json.dumps(calib))
    packed = DelayModel(sm_read_s=2e-3, exp_read_s=1e-3, decode_s=3e-3, matmul_s=5e-4,
                        workers=2, bytes_F=16, bytes_sm=8, bytes_exp=3, bytes_c_form=8,
                        c_matmul_s=7e-4)
    eng = {"call_hits": {"0,2,0,0,0": 4}, "delay": json.loads(json.dumps(
        dataclasses.asdict(packed)))}                     # as a bench row's JSON carries it
    row = {"policy": "zipmoe", "budget": "x"}
    got = bench_planner.row_fields(row, [eng], z, 2)["modelled_layer_ms"]
    assert got == pytest.approx(1e3 * (2 * 2e-4 + 5e-4))   # C hits computed in place
    eng.pop("delay")                                       # the calibration's: decoded
    got = bench_planner.row_fields(row, [eng], z, 2)["modelled_layer_ms"]
    assert got == pytest.approx(1e3 * (3e-3 + 5e-4))


# -- a calibration inside a budgeted run holds its scenarios within the budget -------------------
def test_scenario_engines_stay_within_max_bytes(tiny_case, monkeypatch):
    import numpy as np
    from zipmoe_rt.engine import overhead as O
    c = tiny_case("mixtral")
    src = ZmoeSource(c.zmoe, keep_experts=False)
    try:
        full = O.scenario_layers(src)
        assert full >= 2                       # the tiny model's layers all fit SCENARIO_BYTES
        assert O.scenario_layers(src, 1 << 40) == full
        assert O.scenario_layers(src, 0) == 0
        assert O.measure_engine_terms(src, c.delay("CE"), workers=2, max_bytes=0) == {}
        # the bytes of one layer's scenarios: what the engines hold for one layer
        held = []
        real_engine = O._scenario_engine

        def recording(source, tier, *a, **kw):
            eng, pool = real_engine(source, tier, *a, **kw)
            rep = eng.memory_report()
            held.append(sum(rep[t] for t in ("F", "C", "S", "E")) + rep["working set (max)"])
            return eng, pool
        monkeypatch.setattr(O, "_scenario_engine", recording)
        O.time_scenarios(src, c.delay("CE"), workers=2, reps=1)
        unbounded = sum(held)
        one = next(b for b in range(0, unbounded + 1, 1024) if O.scenario_layers(src, b) == 1)
        held.clear()
        times = O.time_scenarios(src, c.delay("CE"), workers=2, reps=1, max_bytes=one)
        assert sum(held) <= one < unbounded
        assert all(np.isfinite(v) and v > 0 for v in times.values())
    finally:
        src.close()


def test_a_calibration_at_load_is_bounded_by_the_budget(tiny_case, tmp_path, monkeypatch):
    # no stored calibration: the run calibrates at load with the budget's experts' share
    import shutil
    from zipmoe_rt.engine import calibration as cal
    from zipmoe_rt.engine.pipeline import budget_split
    c = tiny_case("mixtral")
    z = tmp_path / "m.zmoe"
    shutil.copy(c.zmoe, z)
    shutil.copy(c.trace_path, prof.sidecar(z, prof.TRACE_SUFFIX))
    seen = []
    real = cal.calibrate

    def spy(source, *a, **kw):
        seen.append(kw.get("max_bytes"))
        return real(source, *a, **kw)
    monkeypatch.setattr(prof, "calibrate", spy)
    # what the measurement freed and the library pages it touched go back before the tiers
    # fill (a memory limit counts them until then): one release, after the calibration
    from zipmoe_rt.engine import footprint
    monkeypatch.setattr(footprint, "release", lambda: seen.append("release") or 0)
    budget = c.budget("mid")
    with zipmoe_rt.load(z, memory_budget=budget, policy="zipmoe") as m:
        want = budget_split(m.source, m.engine.budget)[2]
    assert seen == [want // 2, "release"] and want > 0   # half the tier budget (factory.py)
