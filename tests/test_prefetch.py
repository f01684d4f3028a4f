"""Cross-layer prefetch (zipmoe_rt/engine/prefetch.py).

* Parity: generation under a budget is bit-identical with prefetch on and off, for every
  policy, at a budget with no tiers (only the second working set), a middle one and one that
  holds everything, on specs covering plain experts, dense layers before the MoE layers with a
  shared expert, MLA with a grouped router, and PhiMoE's sparsemixer; the reference is the
  unbudgeted executor (itself checked against transformers by test_model_parity).
* Prefetch really runs: predictions are made on every decode step of every MoE layer after
  the first, loads are started and claimed.
* Recall and wasted bytes on a constructed case: a prediction of {0, 1} against a use of {1, 2}
  is recall 1/2, and the unclaimed expert 0's two regions are the wasted bytes.
* Predicted loads only read: no decode work and no decoded arrays until the layer claims
  them; a wrong guess is never decoded, and its reads that had not begun when it was
  discarded are skipped (nothing read); the read queue serves the running layer's reads
  before the guesses'.
* Budget accounting: prefetch reserves a second working set of k experts (the host engine's
  predicted loads hold read buffers in it, no decoded arrays), and a budget without room for
  it runs without prefetch; ``--prefetch`` values are checked.
"""
from __future__ import annotations

import numpy as np
import pytest

import threading
import time

from zipmoe_rt.engine.io import ReadQueue
from zipmoe_rt.engine.pipeline import ExpertEngine, budget_split, read_buffer_cap
from zipmoe_rt.engine.prefetch import attach, check_prefetch
from zipmoe_rt.engine.store import ZmoeSource
from zipmoe_rt.engine.tiers import size_text
from zipmoe_rt.models import build_model

from test_engine import (DECODE_STEPS, WORKERS, assert_same_logits, generate,  # noqa: F401
                         make_engine, tiny_case)

SPECS_PF = ["mixtral", "deepseek_v2_lite", "glm4_moe_groups", "phimoe"]


def budget_of(case, which: str) -> int:
    """``pf-min``: the minimum plus a second working set (no tiers); ``mid``; ``all``."""
    if which == "pf-min":
        return case.dense + 2 * case.k * case.bytes_F
    return case.budget(which)


def run_prefetch(case, policy, which, prefetch: bool):
    b = budget_of(case, which)
    delay = case.delay("CE") if policy == "zipmoe" else None
    source, engine, _plan = make_engine(case, b, policy, "lru", delay)
    try:
        if prefetch:   # make_engine builds without prefetch: rebuild the same engine with it
            engine.close()
            source.close()
            source, engine = _with_prefetch(case, b, policy, delay)
        net = build_model(source, executor=engine)
        n = attach(net, engine)
        logits, tokens = generate(net, case.ids, DECODE_STEPS)
        return logits, tokens, engine.stats, n, engine
    finally:
        engine.close()
        source.close()


def _with_prefetch(case, b, policy, delay):
    from zipmoe_rt.engine import profile as prof
    path = case.raw if policy == "raw-lru" else case.zmoe
    source = ZmoeSource(path, keep_experts=False, copy_dense=True)
    if policy == "zipmoe":
        tr = prof.load_trace(case.trace_path, source)
        plan, ranks = prof.make_plan(tr, delay, budget_split(source, b, True)[2], case.k)
        engine = ExpertEngine(source, b, "zipmoe", "lru", plan=plan.layers, ranks=ranks,
                              workers=WORKERS, delay=delay, prefetch=True)
    else:
        engine = ExpertEngine(source, b, policy, "lru", workers=WORKERS, prefetch=True)
    return source, engine


MATRIX = [(s, p, b) for s in SPECS_PF for p in ("raw-lru", "zip-lru", "zipmoe")
          for b in ("pf-min", "mid", "all")]


@pytest.mark.parametrize("spec,policy,which", MATRIX,
                         ids=[f"{s}-{p}-{b}" for s, p, b in MATRIX])
def test_prefetch_on_is_bit_identical_and_runs(tiny_case, spec, policy, which):
    case = tiny_case(spec)
    logits, tokens, st, n_look, engine = run_prefetch(case, policy, which, True)
    assert engine.prefetch and engine.window == case.k and engine.read_window == 2 * case.k
    assert_same_logits(logits, case.ref_logits)
    assert tokens == case.ref_tokens
    moe = sorted(case.hp["moe_layers"])
    # every layer before the last MoE layer looks ahead (a dense one too); every MoE layer
    # after layer 0 is predicted on each of the DECODE_STEPS one-token calls (k experts each)
    assert n_look == moe[-1]
    predicted = [l for l in moe if l > 0]
    assert sorted(st.recall_used) == predicted
    assert all(st.recall_used[l] == DECODE_STEPS * case.k for l in predicted)
    assert all(0 <= st.recall_hits[l] <= st.recall_used[l] for l in predicted)
    if which == "pf-min":   # nothing resident: every prediction is a load, most are claimed
        assert st.prefetch_issued > 0 and st.prefetch_used > 0
    assert st.prefetch_used + st.prefetch_wasted <= st.prefetch_issued


@pytest.mark.parametrize("spec", ["mixtral", "deepseek_v2_lite"])
def test_prefetch_off_is_bit_identical(tiny_case, spec):
    case = tiny_case(spec)
    logits, tokens, st, n_look, engine = run_prefetch(case, "zip-lru", "pf-min", False)
    assert not engine.prefetch and n_look == 0 and st.prefetch_issued == 0
    assert_same_logits(logits, case.ref_logits)
    assert tokens == case.ref_tokens


def test_recall_and_wasted_bytes_on_a_constructed_case(tiny_case):
    case = tiny_case("mixtral")
    b = budget_of(case, "pf-min")            # no tiers: every expert is read and decoded
    source = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
    engine = ExpertEngine(source, b, "zip-lru", workers=WORKERS, prefetch=True)
    try:
        assert engine.tier_budget < engine.bytes_F   # no F pool
        layer = sorted(case.hp["moe_layers"])[1]
        H = int(case.hp["hidden_size"])
        x = np.random.default_rng(0).standard_normal((1, H)).astype(np.float32)
        w = np.array([[0.75, 0.25]], np.float32)
        assert case.k == 2 and int(case.hp["num_experts"]) >= 4
        engine.predict(layer, [3, 1, 0], issue_now=True)   # at most k loads alive: 3 waits
        assert engine.stats.prefetch_issued == 2 and engine.stats.prefetch_skipped == 1
        assert sorted(engine._inflight) == [(layer, 0), (layer, 1)]
        loads = dict(engine._inflight)
        _wait_reads(loads.values())
        # read, not decoded: no decode work, no output arrays, not done
        assert engine.stats.decode_s == 0.0
        assert all(p.outs is None and not p.done.is_set() for p in loads.values())
        engine.run(layer, x, np.array([[2, 1]], np.int64), w)
        wrong = loads[(layer, 0)]
        assert loads[(layer, 1)].done.is_set() and not wrong.done.is_set()
        st = engine.stats
        assert st.recall_hits == {layer: 1} and st.recall_used == {layer: 2}
        assert st.prefetch_used == 1
        engine._sweep_discarded(wait=True)
        assert not wrong.done.is_set() and wrong.outs is None    # a wrong guess: never decoded
        lay = case.layouts[(layer, 0)]
        assert st.prefetch_wasted == 1
        assert st.prefetch_wasted_bytes == lay.sm_region[1] + lay.exp_region[1]
        # the output equals the executor's without any prediction
        ref = ExpertEngine(source, b, "zip-lru", workers=WORKERS, prefetch=False)
        try:
            want = ref.run(layer, x, np.array([[2, 1]], np.int64), w)
        finally:
            ref.close()
        got = engine.run(layer, x, np.array([[2, 1]], np.int64), w)
        assert np.array_equal(got, want)
        # a call without a prediction counts nothing
        assert st.recall_used == {layer: 2}
    finally:
        engine.close()
        source.close()


def _wait_reads(loads, timeout=30.0):
    t0 = time.perf_counter()
    while not all(p.reads_done for p in loads):
        assert time.perf_counter() - t0 < timeout, "predicted reads did not end"
        time.sleep(0.001)


def test_budget_without_room_for_a_second_working_set_runs_without_prefetch(tiny_case):
    case = tiny_case("mixtral")
    src = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
    try:
        b = case.budget("min")
        assert budget_split(src, b, True) == (case.bytes_F, case.k, 0)
        assert budget_split(src, b + case.k * case.bytes_F, True) == (case.bytes_F, 2 * case.k, 0)
        extra = 5 * case.bytes_F
        assert budget_split(src, b + extra, True) == (case.bytes_F, 2 * case.k,
                                                      extra - case.k * case.bytes_F)
        cap = read_buffer_cap(src)
        big = max(lay.sm_region[1] for lay in case.layouts.values())
        assert cap["sm"] % 4096 == 0 and big + 4096 <= cap["sm"] < big + 2 * 4096
        for budget, on in ((b + case.k * case.bytes_F - 1, False), (b + case.k * case.bytes_F,
                                                                     True)):
            eng = ExpertEngine(src, budget, "zip-lru", workers=WORKERS, prefetch=True)
            try:
                # decoded arrays: one layer's; read buffers: its and the predicted loads'
                assert eng.prefetch is on and eng.window == case.k
                assert eng.read_window == case.k * (2 if on else 1)
                assert eng.memory_report()["working set (max)"] == eng.read_window * case.bytes_F
            finally:
                eng.close()
    finally:
        src.close()


def test_a_discarded_guess_whose_reads_had_not_begun_reads_nothing(tiny_case):
    case = tiny_case("mixtral")
    b = budget_of(case, "pf-min")
    source = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
    engine = ExpertEngine(source, b, "zip-lru", workers=WORKERS, prefetch=True, io_depth=1)
    gate = threading.Event()
    try:
        layer = sorted(case.hp["moe_layers"])[1]
        engine.io.submit(gate.wait)                  # the one read thread is busy
        engine.predict(layer, [0, 1], issue_now=True)
        assert engine.stats.prefetch_issued == 2
        loads = list(engine._inflight.values())
        engine._end_prefetch(layer, np.array([[2, 3]], np.int64))   # layer used neither
        gate.set()
        engine._sweep_discarded(wait=True)
        st = engine.stats
        assert st.prefetch_wasted == 2 and st.prefetch_wasted_bytes == 0
        assert st.reads == 0 and st.bytes_read == 0 and st.decode_s == 0.0
        assert all(p.outs is None and not p.done.is_set() for p in loads)
        assert engine._read_pool["sm"] and engine._read_pool["exp"]   # buffers given back
    finally:
        gate.set()
        engine.close()
        source.close()


def test_read_queue_runs_the_more_urgent_reads_first():
    q = ReadQueue(1, "test-io")
    gate, order = threading.Event(), []
    try:
        first = q.submit(gate.wait)
        futs = [q.submit(order.append, f"guess{i}", priority=1) for i in range(2)]
        futs += [q.submit(order.append, f"demand{i}", priority=0) for i in range(2)]
        gate.set()
        assert first.result(10) is True
        for f in futs:
            f.result(10)
        assert order == ["demand0", "demand1", "guess0", "guess1"]
        bad = q.submit(lambda: 1 / 0)
        with pytest.raises(ZeroDivisionError):
            bad.result(10)
    finally:
        gate.set()
        q.shutdown(wait=True)


def test_check_prefetch_values():
    assert check_prefetch("on") is True and check_prefetch("off") is False
    assert check_prefetch(True) is True and check_prefetch(False) is False
    with pytest.raises(ValueError, match=r"prefetch \(--prefetch\) must be one of on, off, "
                                         r"got 'yes'"):
        check_prefetch("yes")


def test_bench_prefetch_summary_sums_runs_per_layer():
    from zipmoe_rt.bench import prefetch_summary
    runs = [dict(recall_hits={"1": 3, "2": 4}, recall_used={"1": 4, "2": 4}, prefetch_issued=5,
                 prefetch_used=4, prefetch_wasted=1, prefetch_wasted_bytes=1000),
            dict(recall_hits={"1": 1, "2": 4}, recall_used={"1": 4, "2": 4}, prefetch_issued=3,
                 prefetch_used=3, prefetch_wasted=0, prefetch_wasted_bytes=0)]
    s = prefetch_summary(runs, tokens=4)
    assert s["prefetch"] == "on"
    assert s["prefetch_recall"] == {"1": 0.5, "2": 1.0}
    assert s["prefetch_recall_min"] == 0.5 and s["prefetch_recall_mean"] == 12 / 16
    assert s["wasted_bytes_per_token"] == 250.0 and s["prefetch_loads_per_token"] == 2.0
    off = [dict(recall_hits={}, recall_used={}, prefetch_issued=0, prefetch_used=0,
                prefetch_wasted=0, prefetch_wasted_bytes=0)]
    assert prefetch_summary(off, tokens=4) == {"prefetch": "off"}
    assert prefetch_summary([{"hits": {}}], tokens=4) == {}


def test_bench_rows_with_prefetch_off_and_on(tiny_case):
    """`bench --prefetch off --prefetch on`: a row each, the same tokens decoded, recall per
    predicted layer in [0, 1] on the "on" row only, and the prefetch line under the table."""
    import json
    import re

    from zipmoe_rt import bench as B

    c = tiny_case("mixtral")
    res = B.run(c.zmoe, [budget_of(c, "pf-min")], ["zip-lru"], pp=0, tg=4, reps=1,
                workers=WORKERS, log=lambda s: None, prefetches=("off", "on"))
    rows = {r["prefetch"]: r for r in res["rows"]}
    assert set(rows) == {"off", "on"}
    assert "prefetch_recall" not in rows["off"]
    rec = rows["on"]["prefetch_recall"]
    assert sorted(rec, key=int) == [str(l) for l in sorted(c.hp["moe_layers"])[1:]]
    assert all(0.0 <= v <= 1.0 for v in rec.values())
    assert rows["on"]["wasted_bytes_per_token"] >= 0
    table = B.table(res)
    assert re.search(r"prefetch \(zip-lru, budget \d+\): recall per MoE layer [\d ]+ % \(min "
                     r"\d+ %, mean \d+ %\); \d+\.\d loads started, \d+\.\d\d MB wasted per "
                     r"token", table), table
    json.dumps(res)


def test_family_with_its_own_decoder_layer_runs_unpredicted(tiny_case):
    """Gemma 4's decoder layer is its own: prefetch installs no look-ahead there and the
    budgeted run stays bit-identical."""
    case = tiny_case("gemma4")
    logits, tokens, st, n_look, engine = run_prefetch(case, "zip-lru", "pf-min", True)
    assert engine.prefetch and n_look == 0 and st.prefetch_issued == 0
    assert_same_logits(logits, case.ref_logits)
    assert tokens == case.ref_tokens


def test_extra_candidates_follow_the_ranks_the_layer_used(tiny_case):
    """A layer whose router's top-k on the earlier state keeps missing the expert ranked just
    after it predicts one more candidate once its warm-up calls are counted, and its recall
    reaches 1; loads start in rank order; the extra candidates stop at MAX_EXTRA · k."""
    from zipmoe_rt.engine import prefetch as P
    case = tiny_case("mixtral")
    b = budget_of(case, "pf-min")            # no tiers: every prediction is a load
    source = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
    engine = ExpertEngine(source, b, "zip-lru", workers=WORKERS, prefetch=True)
    try:
        n, k = int(case.hp["num_experts"]), case.k
        assert k == 2 and n >= 4 and P.MAX_EXTRA * k >= 2
        layer = sorted(case.hp["moe_layers"])[1]
        H = int(case.hp["hidden_size"])
        x = np.random.default_rng(1).standard_normal((1, H)).astype(np.float32)
        w = np.array([[0.5, 0.5]], np.float32)
        sc = np.zeros(n)
        sc[[2, 1, 3]] = [3.0, 2.0, 1.0]          # ranking 2, 1, 3, then the rest by id
        st = engine.stats
        for call in range(P.EXTRA_WARMUP + 1):
            assert engine.extra_candidates(layer) == (0 if call < P.EXTRA_WARMUP else 1)
            engine._sweep_discarded(wait=True)   # the last call's unused load 1 has ended
            engine.predict(layer, [1, 2], issue_now=True, scores=sc)
            # the likeliest first: 2 (rank 0) before 1 (rank 1)
            assert list(engine._inflight) == [(layer, 2), (layer, 1)]
            engine.run(layer, x, np.array([[2, 3]], np.int64), w)   # ranks 0 and 2
        W = P.EXTRA_WARMUP
        # top-k alone found one of the two experts used; with 3 (rank 2) predicted, both
        assert st.recall_hits == {layer: W + 2} and st.recall_used == {layer: 2 * W + 2}
        assert st.predicted == {layer: 2 * W + 3}
        # every rank past k used by every call: the extra candidates stop at MAX_EXTRA · k
        h = engine._rank_hist[layer]
        h[:] = 10
        assert engine.extra_candidates(layer) == min(P.MAX_EXTRA * k, n - k)
        # 10 calls: rank 0 always used, the second expert at rank 1, 2 or 3 in 4, 3, 3 calls:
        # recall 0.7 at k, 0.85 at k + 1, 1 at k + 2; the extras' unused loads per call are
        # 0.7 for one and 1.4 for two, within WASTE_BOUND · k = 1.5: two extras
        assert (n, k, P.WASTE_BOUND, P.RECALL_TARGET) == (4, 2, 0.75, 0.9)
        h[:] = [10, 4, 3, 3]
        assert engine.extra_candidates(layer) == 2
        # ranks 1, 2, 3 in 6, 1, 3 calls: recall 0.8 at k, 0.85 at k + 1 (0.9 unused), and
        # a second extra would leave 1.6 unused per call, over 1.5: one extra
        h[:] = [10, 6, 1, 3]
        assert engine.extra_candidates(layer) == 1
        h[:] = [10, 10, 0, 0]   # top-k always right: none
        assert engine.extra_candidates(layer) == 0
        # logits that are not one score per expert: top-k alone, by id
        engine.predict(layer, [3, 0], issue_now=False, scores=np.zeros(n + 1))
        assert engine._next == (layer, [0, 3], None)
    finally:
        engine.close()
        source.close()


def test_prefetch_asked_for_and_turned_off_says_why(tiny_case):
    """``prefetch="on"`` under a budget without room for the second working set warns once,
    naming the budget, the working set and the budget that runs with prefetch; with room, or
    with prefetch not asked for, nothing is said."""
    import warnings

    import zipmoe_rt
    from zipmoe_rt.engine.prefetch import PrefetchWarning
    case = tiny_case("mixtral")
    b = case.budget("min")
    with pytest.warns(PrefetchWarning) as got:
        with zipmoe_rt.load(case.zmoe, memory_budget=b, prefetch="on", policy="zip-lru",
                            progress=False) as m:
            assert m.engine.prefetch is False
    msgs = [str(w.message) for w in got if w.category is PrefetchWarning]
    assert len(msgs) == 1
    need = (b + case.k * case.bytes_F) / 1e6
    assert msgs[0].startswith(f"prefetch off: --memory-budget {size_text(b)} has no room "
                              f"for the second working set of {case.k} experts")
    assert "that --prefetch on takes" in msgs[0]
    assert (f"a weight budget of at least {need:.1f} MB runs with prefetch" in msgs[0]
            or f"a weight budget of at least {need + 0.1:.1f} MB runs with prefetch" in msgs[0])
    for budget, pf in ((b + case.k * case.bytes_F, "on"), (b, "off")):
        with warnings.catch_warnings():
            warnings.simplefilter("error", PrefetchWarning)
            with zipmoe_rt.load(case.zmoe, memory_budget=budget, prefetch=pf,
                                policy="zip-lru", progress=False) as m:
                assert m.engine.prefetch is (pf == "on")


def test_prefetch_turned_off_is_one_warning_line_of_run(tiny_case):
    """On the command line the same notice is one ``zipmoe-rt: warning:`` line, before the
    banner's ``prefetch off``."""
    from cli_runner import cli
    case = tiny_case("mixtral")
    r = cli("run", case.zmoe, "--memory-budget", case.budget("min"), "--prefetch", "on",
            "--policy", "zip-lru", "-p", "hello", "-n", 2)
    assert r.exit_code == 0, r.stderr
    lines = [ln for ln in r.stderr.splitlines() if "prefetch" in ln]
    assert len(lines) == 2, r.stderr
    assert lines[0].startswith("zipmoe-rt: warning: prefetch off: --memory-budget ")
    assert "has no room for the second working set" in lines[0]
    assert "prefetch off; policy zip-lru" in lines[1]
