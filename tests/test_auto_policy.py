"""Policy ``auto`` (per MoE layer an LRU pool of full experts, planned tiers or a mix, whichever
the delay model predicts fastest; zipmoe_rt/engine/planner/choice.py, engine/factory.py), the
delay model's engine terms (planner/delay.py) and their calibration (engine/overhead.py), and
bench's planner figures (bench_planner.py).

* choice: each plan's kind; the restricted splits; delay models built so that one kind must
  win, and ``plan_choices`` / ``auto`` pick it;
* engine terms: exact values of ``layer_makespan`` and of the frontiers with them (against
  enumeration); the calibration reproduces the engine calls it timed, and its scenarios are
  served from the tier they name;
* ``load(policy="auto")`` on every tiny spec: logits bit-identical to the unbudgeted model
  under budgets, with calibrations where LRU pools must win and where tiers must win;
  the banner line says what it chose.
"""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import zipmoe_rt
from zipmoe_rt import bench_planner
from zipmoe_rt.engine import overhead as O
from zipmoe_rt.engine import profile as prof
from zipmoe_rt.engine.factory import describe_auto
from zipmoe_rt.engine.planner import DelayModel, TierPlan, expected_layer_makespan
from zipmoe_rt.engine.planner import layer_frontier, layer_frontier_lru, lru_pool_model
from zipmoe_rt.engine.planner.choice import (choice_codes, choice_summary, layer_choice,
                                             plan_choices, restrict_front)
from zipmoe_rt.engine.planner.choice import shared_pool_layer_s as choice_shared
from zipmoe_rt.engine.store import ZmoeSource

from test_engine import (ARCHS, DECODE_STEPS, _calibrated_copy, _fitting_calibration,
                         assert_same_logits, generate)
from test_engine import tiny_case  # noqa: F401  (the fixture, shared with test_engine.py)
from test_planner import bf_lru_makespan, random_delay, small_trace

TERMS = dict(layer_fixed_s=2e-4, load_C_s=1e-4, load_S_s=3e-4, load_E_s=4e-4, load_miss_s=6e-4)


# ------------------------------------------------------------------------------------------------
# the engine terms of the delay model


def test_layer_makespan_with_engine_terms_hand_case():
    d = DelayModel(sm_read_s=2e-3, exp_read_s=1e-3, decode_s=3e-3, matmul_s=5e-4, workers=2,
                   bytes_F=16, bytes_sm=8, bytes_exp=3, **TERMS)
    # F 1, C 1, miss 1 (k = 3): reads 2 + 1 = 3 ms, + the last read's decode 3 ms -> io 6 ms;
    # compute: 2 decodes on 2 workers = 3 ms; matmul 0.5 ms x ceil(3/2) = 1 ms;
    # engine 0.2 + 0.1 (C) + 0.6 (miss) = 0.9 ms
    assert d.layer_makespan({"F": 1, "C": 1, "miss": 1}) == pytest.approx(7.9e-3, abs=1e-15)
    # all F (k = 2): matmul 0.5 ms + fixed 0.2 ms
    assert d.layer_makespan({"F": 2}) == pytest.approx(7e-4, abs=1e-15)
    # S 2: reads 2 x 1 ms + decode 3 ms = 5 ms; matmul 0.5 ms; engine 0.2 + 2 x 0.3 ms
    assert d.layer_makespan({"S": 2}) == pytest.approx(6.3e-3, abs=1e-15)
    assert float(d.engine_overhead_s(1, 2, 3, 4)) == pytest.approx(
        2e-4 + 1e-4 + 6e-4 + 12e-4 + 24e-4, abs=1e-15)
    # without terms: the base model; negative terms may not make a call cost less than 0
    base = dataclasses.replace(d, **{t: 0.0 for t in TERMS})
    assert base.layer_makespan({"F": 1, "C": 1, "miss": 1}) == pytest.approx(7e-3, abs=1e-15)
    neg = dataclasses.replace(d, layer_fixed_s=-1.0)
    assert neg.layer_makespan({"F": 2}) == 0.0
    with pytest.raises(ValueError, match="load_S_s must be finite"):
        dataclasses.replace(d, load_S_s=float("nan"))


@pytest.mark.parametrize("seed", range(6))
def test_frontiers_with_engine_terms_match_enumeration(seed):
    rng = np.random.default_rng(seed)
    n, k = int(rng.integers(3, 6)), int(rng.integers(1, 3))
    terms = {t: float(rng.uniform(-0.3, 0.5)) for t in TERMS}
    d = dataclasses.replace(random_delay(rng, chunks=int(rng.integers(1, 3))), **terms)
    w = rng.random(n) * 3 + 0.01
    f = layer_frontier(w, k, d)
    for c, em in zip(f.counts, f.makespan_s):
        assert em == pytest.approx(expected_layer_makespan(w, tuple(c), k, d), rel=1e-9,
                                   abs=1e-12)
    runs = [np.array([rng.choice(n, k, replace=False) for _ in range(6)]) for _ in range(2)]
    m = lru_pool_model(runs, n, k, warm=list(rng.permutation(n)))
    f, _ = layer_frontier_lru(m, k, d)
    for c, em in zip(f.counts, f.makespan_s):
        assert em == pytest.approx(bf_lru_makespan(m, c, k, d), rel=1e-9, abs=1e-12)


# ------------------------------------------------------------------------------------------------
# the choice per layer


def _tp(nF, nC, nS, nE):
    return TierPlan(nF, nC, nS, nE, 0.0, 0.0)


def test_layer_choice_kinds_codes_and_summary():
    plans = [_tp(3, 0, 0, 0), _tp(2, 1, 0, 0), _tp(0, 0, 2, 1), _tp(0, 0, 0, 0), _tp(1, 0, 0, 0)]
    assert [layer_choice(p) for p in plans] == ["lru", "mix", "tiers", "none", "lru"]
    assert choice_codes(plans) == "LMT-L"
    assert choice_summary(plans) == "lru 2, mix 1, tiers 1, none 1"
    assert choice_summary([]) == "no MoE layer"


def test_restrict_front_keeps_one_kind_and_the_empty_plan():
    from zipmoe_rt.engine.planner.frontier import LayerFrontier
    c = np.array([[0, 0, 0, 0], [1, 0, 0, 0], [0, 1, 0, 0], [1, 1, 0, 0], [2, 0, 0, 0],
                  [0, 0, 1, 1]])
    f = LayerFrontier(c, np.arange(6.0), np.arange(6.0)[::-1])
    assert restrict_front(f, "lru").counts.tolist() == [[0, 0, 0, 0], [1, 0, 0, 0], [2, 0, 0, 0]]
    assert restrict_front(f, "tiers").counts.tolist() == [[0, 0, 0, 0], [0, 1, 0, 0],
                                                          [0, 0, 1, 1]]
    assert restrict_front(f, "auto") is f
    with pytest.raises(ValueError, match="kind must be"):
        restrict_front(f, "mix")


def _sticky_models(counts, n, k, tokens=60):
    """Per layer: every token selects the layer's k most popular experts (an LRU pool of k
    always hits after the first token)."""
    return [lru_pool_model([np.tile(np.argsort(-c)[:k], (tokens, 1))], n, k) for c in counts]


def _memoryless_models(rng, counts, n, k, tokens=400):
    """Per layer: tokens drawn independently from the layer's popularity (no locality)."""
    out = []
    for c in counts:
        p = c / c.sum()
        seq = np.array([rng.choice(n, k, replace=False, p=p) for _ in range(tokens)])
        out.append(lru_pool_model([seq], n, k))
    return out


def test_lru_pools_win_where_decodes_are_dear_and_tokens_repeat():
    rng = np.random.default_rng(3)
    L, n, k = 4, 8, 2
    counts = small_trace(rng, L, n, k)
    # a decode costs 10 ms, reads almost nothing: only an F hit saves time, and the text repeats
    # its experts, so a pool of k full experts serves every token after the first
    d = DelayModel(sm_read_s=1e-6, exp_read_s=1e-6, decode_s=1e-2, matmul_s=1e-4, workers=2,
                   bytes_F=16, bytes_sm=8, bytes_exp=3, load_C_s=1e-3, load_S_s=1e-3,
                   load_E_s=1e-3)
    ch = plan_choices(counts, k, L * k * 16, d, fpool=_sticky_models(counts, n, k))
    assert choice_codes(ch["auto"].layers) == "L" * L
    assert [(p.nF, p.nC, p.nS, p.nE) for p in ch["auto"].layers] == [(k, 0, 0, 0)] * L
    assert ch["auto"].predicted_makespan_s == pytest.approx(ch["lru"].predicted_makespan_s)
    # tiers only: the same bytes hold 3 C experts per layer, each still a 10 ms decode
    assert ch["tiers"].predicted_makespan_s > 5 * ch["auto"].predicted_makespan_s
    for kind in ("auto", "lru", "tiers"):
        assert ch[kind].bytes <= L * k * 16


def test_tiers_win_where_reads_are_dear_and_decodes_cheap():
    rng = np.random.default_rng(4)
    L, n, k = 4, 8, 2
    counts = small_trace(rng, L, n, k)
    # reads cost 10 ms, decodes almost nothing: a C expert (8 + 3 bytes) saves as much per use as
    # an F expert (16 bytes), so C slots win at every budget below all experts in C
    d = DelayModel(sm_read_s=1e-2, exp_read_s=1e-2, decode_s=1e-7, matmul_s=1e-4, workers=2,
                   bytes_F=16, bytes_sm=8, bytes_exp=3)
    models = _memoryless_models(rng, counts, n, k)
    for budget in (L * 11 * 2, L * 11 * 5):
        ch = plan_choices(counts, k, budget, d, fpool=models)
        assert set(choice_codes(ch["auto"].layers)) == {"T"}
        assert ch["auto"].predicted_makespan_s == pytest.approx(ch["tiers"].predicted_makespan_s)
        assert ch["lru"].predicted_makespan_s > 1.2 * ch["auto"].predicted_makespan_s


@pytest.mark.parametrize("seed", range(4))
def test_auto_is_never_predicted_slower_than_one_kind(seed):
    rng = np.random.default_rng(seed)
    L, n, k = 3, 6, 2
    counts = small_trace(rng, L, n, k)
    d = random_delay(rng, workers=2, chunks=2)
    models = _memoryless_models(rng, counts, n, k, tokens=100)
    for frac in (0.1, 0.3, 0.6):
        budget = frac * L * n * d.bytes_F
        ch = plan_choices(counts, k, budget, d, fpool=models)
        best = min(ch["lru"].predicted_makespan_s, ch["tiers"].predicted_makespan_s)
        assert ch["auto"].predicted_makespan_s <= best * (1 + 1e-9)
        assert all(mp.bytes <= budget for mp in ch.values())
        # what plan_model plans is auto's plan
        pm = prof.plan_model(counts, k, budget, d, fpool=models)
        assert pm.predicted_makespan_s == pytest.approx(ch["auto"].predicted_makespan_s)


def test_shared_pool_replay_hand_case():
    d = DelayModel(sm_read_s=2e-3, exp_read_s=1e-3, decode_s=3e-3, matmul_s=5e-4, workers=2,
                   bytes_F=16, bytes_sm=8, bytes_exp=3)
    hit, miss = d.layer_makespan({"F": 1}), d.layer_makespan({"miss": 1})
    assert (hit, miss) == (pytest.approx(5e-4), pytest.approx(2e-3 + 1e-3 + 3e-3 + 5e-4))
    # two layers, k = 1; layer 0 always uses expert 0, layer 1 alternates 1 and 2
    run = np.array([[[0], [1]], [[0], [2]], [[0], [1]], [[0], [2]]])
    # capacity 1: each layer evicts the other's expert -> every use a miss
    assert np.allclose(choice_shared([run], 3, 1, 1, d), [miss, miss])
    # capacity 2, after the warming pass: layer 0's (0,0) stays (it is used every token),
    # layer 1's expert evicts the other one of layer 1 each token -> layer 0 hits, layer 1 misses
    assert np.allclose(choice_shared([run], 3, 1, 2, d), [hit, miss])
    # capacity 3: the warming pass loads all three; the counted pass hits every use (a pool
    # replayed from empty would count each first use as a miss: (miss + 3 hit) / 4 for layer 0)
    assert np.allclose(choice_shared([run], 3, 1, 3, d), [hit, hit])
    assert np.allclose(choice_shared([run, run], 3, 1, 3, d), [hit, hit])
    # the pool carries over from one run to the next: layer 1 of the second run starts with
    # the first run's (1,2) and (1,1) in a pool of 3 shared with (0,0)
    other = np.array([[[0], [2]], [[0], [1]]])
    assert np.allclose(choice_shared([run, other], 3, 1, 3, d), [hit, hit])
    assert np.allclose(choice_shared([run], 3, 1, 0, d), [miss, miss])
    with pytest.raises(ValueError, match="no tokens"):
        choice_shared([], 3, 1, 1, d)


def test_auto_runs_the_shared_pool_where_it_is_predicted_faster(tiny_case, tmp_path,
                                                                monkeypatch):
    from zipmoe_rt.engine import factory
    c = tiny_case("qwen2_moe")
    z, _ = _calibrated_copy(c, tmp_path, _fitting_calibration(c))
    for shared, engine in ((0.0, "zip-lru"), (1e9, "zipmoe")):
        monkeypatch.setattr(factory, "_shared_pool_s", lambda *a, _s=shared: _s)
        m = zipmoe_rt.load(z, memory_budget=c.budget("mid"), policy="auto", progress=False)
        try:
            assert m.engine.policy == engine and m.engine.auto_choice["engine"] == engine
            assert ("pool shared by all layers" in bench_planner.lines([{
                "policy": "auto", "budget": "x", "measured_layer_ms": 1.0,
                "auto_choice": m.engine.auto_choice}])[0]) == (engine == "zip-lru")
            logits, tokens = generate(m.net, c.ids, DECODE_STEPS)
            assert tokens == c.ref_tokens
            assert_same_logits(logits, c.ref_logits)
        finally:
            m.close()


# ------------------------------------------------------------------------------------------------
# calibration of the engine terms


def test_scenario_engines_serve_every_call_from_their_tiers(tiny_case):
    c = tiny_case("mixtral")
    src = ZmoeSource(c.zmoe, keep_experts=False)
    try:
        d = c.delay("CE")
        layers = [int(l) for l in src.hparams["moe_layers"]]
        n = int(src.hparams["num_experts"])
        used = O.scenario_layers(src)
        assert used == len(layers)          # tiny experts: every MoE layer fits
        x = np.ones((1, int(src.hparams["hidden_size"])), np.float32)
        rng = np.random.default_rng(0)
        for name in O.SCENARIOS:
            eng, (fixed, choices) = O._scenario_engine(src, name, d, 2, False, None, used)
            try:
                calls = 4
                for sweep in range(calls):
                    if sweep == 1:          # after one sweep (as time_scenarios' untimed one)
                        settled = dict(eng.stats.call_hits)    # the F pool holds its experts
                    for layer in layers:
                        drawn = rng.choice(choices, c.k - len(fixed), replace=False)
                        idx = np.sort(np.concatenate([fixed, drawn])).astype(np.int64)[None, :]
                        eng.run(layer, eng.backend.from_host(x), idx,
                                np.full((1, c.k), 1.0 / c.k, np.float32))
                want = O.scenario_hits(name, c.k)
                code = ",".join(str(want.get(t, 0)) for t in ("F", "C", "S", "E", "miss"))
                later = {h: v - settled.get(h, 0) for h, v in eng.stats.call_hits.items()}
                assert {h: v for h, v in later.items() if v} == {code: 3 * len(layers)}, name
                if name == "C1":   # the storage form, which the base delay model prices
                    slots = [sl for sl in eng.slots.values() if sl.tier == "C"]
                    assert slots and all(sl.sm is not None and sl.exp is not None
                                         and sl.packed is None for sl in slots)
                ones = {"F": (0, list(range(min(n, 2 * c.k)))), "miss": (0, list(range(n))),
                        "miss1": (c.k - 1, list(range(c.k - 1, n)))}
                held = min(c.k, n - c.k + 1)
                nf, pool = ones.get(name, (c.k - 1, list(range(c.k - 1, c.k - 1 + held))))
                assert list(fixed) == list(range(nf)) and list(choices) == pool, name
            finally:
                eng.close()
    finally:
        src.close()


def test_engine_terms_reproduce_the_timed_calls(tiny_case):
    c = tiny_case("qwen2_moe")
    src = ZmoeSource(c.zmoe, keep_experts=False)
    try:
        d = c.delay("S")
        terms = O.measure_engine_terms(src, d, workers=2, reps=3)
    finally:
        src.close()
    assert set(O.TERM_KEYS) <= set(terms) and terms["engine_workers"] == 2
    assert set(terms["engine_layer_s"]) == set(O.SCENARIOS)
    assert all(terms[t] >= 0 for t in O.TERM_KEYS if t != "layer_fixed_s")
    full = O.apply_engine_terms(dataclasses.replace(
        d, sm_read_s=terms["sm_read_s"], exp_read_s=terms["exp_read_s"]), terms)
    base = dataclasses.replace(full, load_C_s=0.0, load_S_s=0.0, load_E_s=0.0, load_miss_s=0.0)
    meas = terms["engine_layer_s"]
    assert full.layer_makespan(O.scenario_hits("F", c.k)) == pytest.approx(max(0.0, meas["F"]))
    for t in ("C", "S", "E", "miss"):   # a one-load call: as measured, or the base price above it
        hits = O.scenario_hits(f"{t}1", c.k)
        want = max(meas[f"{t}1"], base.layer_makespan(hits))
        assert full.layer_makespan(hits) == pytest.approx(want, rel=1e-9, abs=1e-12), t
    # a calibration without the terms leaves the model as it is
    assert O.apply_engine_terms(d, {"sm_read_s": 1.0}) is d


# ------------------------------------------------------------------------------------------------
# bench's figures


def test_modelled_layer_time_prices_each_call(tmp_path):
    z = tmp_path / "m.zmoe"
    calib = {"sm_read_s": 2e-3, "exp_read_s": 1e-3, "decode_s": 3e-3, "matmul_s": 5e-4,
             "bytes_F": 16, "bytes_sm": 8, "bytes_exp": 3, "chunks": 1, **TERMS}
    prof.sidecar(z, prof.CALIB_SUFFIX).write_text(json.dumps(calib))
    hits = [{"1,1,0,0,1": 3}, {"0,0,2,0,0": 1}]       # two runs: 7.9 ms x 3 and (k = 2) 6.3 ms
    got = bench_planner.modelled_layer_ms(hits, z, workers=2)
    assert got == pytest.approx((3 * 7.9 + 6.3) / 4, rel=1e-12)
    assert bench_planner.modelled_layer_ms([{}], z, workers=2) is None
    assert bench_planner.modelled_layer_ms(hits, tmp_path / "other.zmoe", 2) is None


def test_bench_lines_say_what_auto_chose():
    row = {"policy": "auto", "budget": "25%", "measured_layer_ms": 2.2, "predicted_layer_ms": 2.0,
           "modelled_layer_ms": 2.2,
           "auto_choice": {"codes": "LLM", "summary": "lru 2, mix 1",
                           "predicted_layer_ms": {"auto": 2.0, "lru": 2.5, "tiers": 3.0}}}
    assert bench_planner.lines([row]) == [
        "planner (auto, budget 25%): measured 2.20 ms per MoE layer per decode token; "
        "predicted 2.00 ms (1.10x), modelled at its hits 2.20 ms (1.00x)",
        "auto (budget 25%): lru 2, mix 1 (per MoE layer LLM); predicted ms per layer: "
        "per-layer plan 2.000, LRU pools only 2.500, tiers only 3.000"]
    row["auto_choice"] = dict(row["auto_choice"], engine="zip-lru",
                              predicted_layer_ms={"auto": 2.0, "lru": 2.5, "tiers": 3.0,
                                                  "shared": 1.5})
    assert bench_planner.lines([row])[1] == (
        "auto (budget 25%): zip-lru, one LRU pool shared by all layers; predicted ms per layer: "
        "per-layer plan 2.000, LRU pools only 2.500, tiers only 3.000, one shared LRU pool 1.500")
    assert describe_auto(row["auto_choice"], "zip-lru") == \
        "zip-lru (auto: one LRU pool for all layers, predicted no slower)"
    assert describe_auto(dict(row["auto_choice"], engine="zipmoe"), "zipmoe") == \
        "zipmoe (auto: lru 2, mix 1; per MoE layer LLM)"
    assert describe_auto({"fallback": "zip-lru", "why": "no activation trace"}, "zip-lru") == \
        "zip-lru (auto: no activation trace)"
    assert describe_auto(None, "zip-lru") == "zip-lru"


# ------------------------------------------------------------------------------------------------
# load(policy="auto") on every tiny spec


#: calibrations whose delay model makes one kind win: LRU pools (decodes dear, static slots
#: dearer still, and a C hit computed from the compute form dearer than a decode) or tiers
#: (reads dear, decodes free)
WINNERS = {"lru": dict(sm_read_s=1e-6, exp_read_s=1e-6, decode_s=1e-2, load_C_s=1e-3,
                       load_S_s=1e-3, load_E_s=1e-3, c_matmul_s=1e-1, transcode_s=1e-2,
                       escape_share=1e-3),
           "tiers": dict(sm_read_s=1e-2, exp_read_s=1e-2, decode_s=1e-7)}


@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("winner", list(WINNERS))
def test_auto_is_bit_identical_and_follows_the_delay_model(tiny_case, tmp_path, arch, winner,
                                                           monkeypatch):
    from zipmoe_rt.engine import factory
    # the per-layer plans (where the shared pool is predicted no slower, auto runs it:
    # test_auto_runs_the_shared_pool_where_it_is_predicted_faster and test_planner_gaps.py)
    monkeypatch.setattr(factory, "_shared_pool_s", lambda *a: None)
    c = tiny_case(arch)
    z, _ = _calibrated_copy(c, tmp_path, _fitting_calibration(c, **WINNERS[winner]))
    m = zipmoe_rt.load(z, memory_budget=c.budget("mid"), policy="auto", workers=2,
                       progress=False)
    try:
        ac = m.engine.auto_choice
        codes = ac["codes"]
        assert len(codes) == len(c.hp["moe_layers"])
        if winner == "lru":
            assert set(codes) <= {"L", "-"} and "L" in codes, codes
            assert ac["predicted_layer_ms"]["auto"] == pytest.approx(
                ac["predicted_layer_ms"]["lru"])
        else:
            assert set(codes) <= {"T", "-"} and "T" in codes, codes
            assert ac["predicted_layer_ms"]["auto"] == pytest.approx(
                ac["predicted_layer_ms"]["tiers"])
        assert [layer_choice(p) for p in m.engine.plan] == [
            {"L": "lru", "T": "tiers", "M": "mix", "-": "none"}[x] for x in codes]
        assert m.memory_line().endswith(
            f"policy zipmoe (auto: {ac['summary']}; per MoE layer {codes})")
        logits, tokens = generate(m.net, c.ids, DECODE_STEPS)
        assert tokens == c.ref_tokens
        assert_same_logits(logits, c.ref_logits)
    finally:
        m.close()


def test_auto_without_a_trace_falls_back_to_zip_lru(tiny_case, tmp_path):
    import shutil
    c = tiny_case("mixtral")
    z = tmp_path / "m.zmoe"
    shutil.copy(c.zmoe, z)
    m = zipmoe_rt.load(z, memory_budget=c.budget("mid"), policy="auto", progress=False)
    try:
        assert m.engine.policy == "zip-lru"
        assert m.memory_line().endswith("policy zip-lru (auto: no activation trace)")
        logits, tokens = generate(m.net, c.ids, DECODE_STEPS)
        assert tokens == c.ref_tokens
        assert_same_logits(logits, c.ref_logits)
    finally:
        m.close()
