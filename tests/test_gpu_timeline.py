"""The decode-token timeline of ``tools/gpu_timeline.py``: its aggregation
(``tools/timeline_report.py``) on synthetic records, its ``--ab`` parsing, and its recording
hooks (``tools/timeline_hooks.py``) on the GPU engine over the host model of the device
operations (no GPU needed)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))

import timeline_report as TR  # noqa: E402
from test_engine import generate, tiny_case  # noqa: E402,F401


def _h(name, kind, t0, t1, layer=None, waits_on=None):
    s = {"name": name, "kind": kind, "layer": layer, "t0": t0, "t1": t1}
    if waits_on:
        s["waits_on"] = waits_on
    return s


def _g(stream, t0, t1, host_t, deps=(), name="x", layer=None):
    return {"stream": stream, "name": name, "layer": layer, "t0": t0, "t1": t1,
            "host_t": host_t, "deps": list(deps)}


def generate_recorded(rec, net, engine, ids, n: int) -> tuple:
    """``generate(net, ids, n)`` with the timeline hooks installed (``timeline_hooks.install``)
    and every forward pass (the prefill, then each decode step) recorded as one token of the
    :class:`timeline_hooks.Recorder` ``rec``; the hooks are uninstalled and ``net.forward``
    restored afterwards, also on an error. Returns generate's ``(logits, tokens)``."""
    import timeline_hooks as TH
    undo = TH.install(rec, net, engine)
    orig_forward = net.forward

    def forward(ids, cache, last_only=True):
        rec.begin()
        try:
            return orig_forward(ids, cache, last_only)
        finally:
            rec.end()
    net.forward = forward
    try:
        return generate(net, ids, n)
    finally:
        del net.forward
        TH.uninstall(undo)


def test_union_length_merges_and_clips():
    iv = [(0.0, 2.0), (1.0, 3.0), (5.0, 6.0)]
    assert TR.union_length(iv) == pytest.approx(4.0)
    assert TR.union_length(iv, 0.5, 5.5) == pytest.approx(3.0)
    assert TR.union_length([], 0, 1) == 0.0
    assert TR.union_length([(2.0, 1.0)]) == 0.0        # empty interval


def test_host_times_charge_the_innermost_span():
    tok = {"wall": 10.0, "gpu": [], "host": [
        _h("layer", "launch", 0.0, 8.0, layer=0),
        _h("attention", "launch", 1.0, 3.0, layer=0),
        _h("router", "launch", 3.5, 6.5, layer=0),
        _h("router", "wait", 4.0, 6.0, layer=0, waits_on="compute")]}
    h = TR.host_times(tok)
    assert h["wait"] == pytest.approx(2.0)
    assert h["busy"] == pytest.approx(8.0)           # wall less the waits
    assert h["by_name"]["layer"] == pytest.approx(8.0 - 2.0 - 3.0)
    assert h["by_name"]["attention"] == pytest.approx(2.0)
    assert h["by_name"]["router"] == pytest.approx(1.0)
    assert h["by_name"]["wait:router"] == pytest.approx(2.0)
    L = TR.host_times(tok, layer=0)
    assert L["busy"] == pytest.approx(6.0) and L["wait"] == pytest.approx(2.0)
    assert TR.host_times(tok, layer=1)["busy"] == 0.0


def test_stream_times_busy_and_idle_per_stream_and_window():
    tok = {"wall": 10.0, "host": [], "gpu": [
        _g("compute", 0.0, 2.0, 0.0), _g("compute", 1.5, 4.0, 1.0),
        _g("copy", 1.0, 6.0, 0.5), _g("decode", 6.0, 7.0, 0.5)]}
    st = TR.stream_times(tok)
    assert st["compute"] == pytest.approx({"busy": 4.0, "idle": 6.0})
    assert st["copy"] == pytest.approx({"busy": 5.0, "idle": 5.0})
    assert st["decode"] == pytest.approx({"busy": 1.0, "idle": 9.0})
    w = TR.stream_times(tok, 3.0, 6.5)
    assert w["compute"]["busy"] == pytest.approx(1.0)
    assert w["copy"]["busy"] == pytest.approx(3.0)
    assert w["decode"]["busy"] == pytest.approx(0.5)


def _chain_token():
    """Host queues a copy at 1 (it runs 1-5), a decode waiting for it (5-6), the matmuls
    waiting for the decode (6-7), then reads on the compute stream (waits 2-7.1) and works on
    to the token's end at 8."""
    return {"wall": 8.0,
            "host": [_h("layer", "launch", 0.0, 8.0, layer=0),
                     _h("router", "wait", 2.0, 7.1, layer=0, waits_on="compute")],
            "gpu": [_g("copy", 1.0, 5.0, 1.0, name="h2d", layer=0),
                    _g("decode", 5.0, 6.0, 1.5, deps=[(5.0, "copy")], name="decode", layer=0),
                    _g("compute", 6.0, 7.0, 2.0, deps=[(6.0, "decode")], name="experts",
                       layer=0)]}


def test_critical_path_follows_copy_decode_matmul_chain():
    tok = _chain_token()
    segs = TR.critical_path(tok)
    assert [s[2] for s in segs] == ["host", "sync", "compute", "decode", "copy", "host"]
    assert sum(b - a for a, b, _ in segs) == pytest.approx(8.0)     # tiles the token
    sh = TR.path_shares(segs)
    assert sh == pytest.approx({"host": 1.9, "sync": 0.1, "compute": 1.0, "decode": 1.0,
                                "copy": 4.0})
    assert TR.path_shares(segs, 4.0, 6.5) == pytest.approx({"copy": 1.0, "decode": 1.0,
                                                            "compute": 0.5})


def test_critical_path_of_a_starved_gpu_is_the_host():
    """Each kernel starts when the host queues it and the read finds the GPU done: the path is
    the host and the read's own latency, and the token is host-bound."""
    tok = {"wall": 3.0,
           "host": [_h("router", "wait", 2.5, 2.6, waits_on="compute")],
           "gpu": [_g("compute", 1.0, 1.2, 1.0), _g("compute", 2.0, 2.2, 2.0)]}
    sh = TR.path_shares(TR.critical_path(tok))
    assert sh == pytest.approx({"host": 2.9, "sync": 0.1})
    s = TR.summarize([tok])
    assert TR.verdict(s).startswith("host-bound: host launching 2900.000 ms vs compute stream "
                                    "busy 400.000 ms")


def test_critical_path_launch_latency_and_previous_item():
    """A kernel queued at 1.0 starts at 1.01 (launch latency), the next one queued early waits
    for it (previous item on its stream)."""
    tok = {"wall": 2.0, "host": [_h("x", "wait", 0.5, 1.6, waits_on="compute")],
           "gpu": [_g("compute", 1.01, 1.3, 1.0), _g("compute", 1.3, 1.5, 0.6)]}
    segs = TR.critical_path(tok)
    assert [s[2] for s in segs] == ["host", "sync", "compute", "compute", "launch latency",
                                    "host"]
    assert TR.path_shares(segs)["launch latency"] == pytest.approx(0.01)


def test_summarize_means_tokens_and_layers():
    a = _chain_token()
    b = _chain_token()
    b["wall"] = 10.0
    b["host"][0]["t1"] = 10.0
    s = TR.summarize([a, b])
    assert s["wall"] == pytest.approx(9.0)
    assert s["host"]["wait"] == pytest.approx(5.1)
    assert s["streams"]["copy"]["busy"] == pytest.approx(4.0)
    assert s["layers"][0]["window"] == pytest.approx(9.0)
    assert s["layers"][0]["streams"]["decode"]["busy"] == pytest.approx(1.0)
    text = TR.format_summary("row", s)
    assert "host waiting 5100.000 (router 5100.000)" in text
    assert "| 0 | 9000.000 | 3900.000 | 5100.000 (router 5100.000) | 1000.000 | 4000.000 | " \
        "1000.000 |" in text


def test_gantt_rows():
    tok = {"wall": 1.0,
           "host": [_h("layer", "launch", 0.0, 1.0, layer=3), _h("r", "wait", 0.5, 0.7)],
           "gpu": [_g("compute", 0.0, 0.3, 0.0), _g("copy", 0.2, 1.0, 0.1)]}
    rows = TR.gantt([tok], width=10).splitlines()
    assert rows[0] == "host    |#####ww###|"
    assert rows[1] == "layer   |3333333333|"
    assert rows[2] == "compute |CCC.......|"
    assert rows[3] == "copy    |..========|"
    assert rows[4] == "decode  |..........|"
    two = TR.gantt([tok, tok], width=20).splitlines()
    assert two[2] == "compute |CCC.......CCC.......|"
    assert "tokens start at 0.000, 1000.000 ms" in two[-1]


def test_ab_and_config_parsing_and_switches():
    import gpu_timeline as GT
    from zipmoe_rt.engine import gpu_batch, prefetch
    assert GT.parse_ab("copy_wait=off,max_batch=2") == [("copy_wait", False), ("max_batch", 2)]
    assert GT.parse_ab("lookahead_scores=on") == [("lookahead_scores", True)]
    for bad in ("nope=1", "copy_wait=2", "max_batch=x", ""):
        with pytest.raises(ValueError):
            GT.parse_ab(bad)
    assert GT.parse_config("zip-lru:on") == ("zip-lru", True)
    with pytest.raises(ValueError):
        GT.parse_config("zip-lru")
    assert gpu_batch.COPY_WAITS_COMPUTE is False and prefetch.LOOKAHEAD_SCORES is None
    with GT.switches([("copy_wait", True), ("lookahead_scores", False), ("max_batch", 3)]):
        assert gpu_batch.COPY_WAITS_COMPUTE is True and prefetch.LOOKAHEAD_SCORES is False
        assert gpu_batch.MAX_BATCH == 3
    assert gpu_batch.COPY_WAITS_COMPUTE is False and prefetch.LOOKAHEAD_SCORES is None
    assert gpu_batch.MAX_BATCH == 0


@pytest.mark.parametrize("streamed", [True, False])
def test_hooks_record_the_gpu_engine_and_leave_nothing_behind(tiny_case, monkeypatch, streamed):
    """On the host model: the recorded tokens hold every lane (copies, decodes: with
    ``gpu_batch.STREAMED`` off each waits for the copies' event, on none does (it waits for the
    landed word inside the kernel, written by a copy after each expert's), compute ops, host
    spans of the engine), the logits are those of the run without hooks, and uninstall
    restores every wrapped method."""
    import timeline_hooks as TH
    from zipmoe_rt.engine import gpu_batch
    monkeypatch.setattr(gpu_batch, "STREAMED", streamed)
    from test_gpu_offload import _pf_engine
    from zipmoe_rt.engine.prefetch import attach
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.model import DecoderLayer
    case = tiny_case("mixtral")
    budget = case.dense + 2 * case.k * case.bytes_F
    call = DecoderLayer.__call__
    source, eng = _pf_engine(case, "zip-lru", budget, 10**9, True)
    try:
        net = build_model(source, executor=eng)
        attach(net, eng)
        rec = TH.Recorder(TH.HostClock(), eng)
        logits, tokens = generate_recorded(rec, net, eng, case.ids, 4)
        assert tokens == case.ref_tokens[:len(tokens)]
        assert all(np.array_equal(x, y) for x, y in zip(logits, case.ref_logits))
        assert DecoderLayer.__call__ is call
        assert not any(n in vars(eng) for n in TH.ENGINE_SPANS)
        assert not any(n in vars(eng.ops) for n in ("h2d_at", "record", "wait", "decode_batch"))
        assert not any(n in vars(net.backend) for n in TH.COMPUTE_OPS)
        lanes = {g["stream"] for t in rec.tokens for g in t["gpu"]}
        assert lanes == {"compute", "copy", "decode"}
        dec = [g for t in rec.tokens for g in t["gpu"] if g["stream"] == "decode"]
        assert dec and all(any(ln == "copy" for _, ln in g["deps"]) != streamed for g in dec)
        if streamed:        # every batched copy was followed by its number's copy
            assert eng._seq > 0 and int(eng._landed.view(np.uint32)[0]) == eng._seq
        else:               # the word is there, no number was copied into it
            assert eng._seq == 0 and int(eng._landed.view(np.uint32)[0]) == 0
        names = {s["name"] for t in rec.tokens for s in t["host"]}
        assert {"layer", "attention", "lookahead", "router", "moe", "queue",
                "decode launch", "experts", "lm_head"} <= names
        assert all(0 <= g["t0"] <= g["t1"] <= t["wall"] for t in rec.tokens for g in t["gpu"])
        s = TR.summarize(rec.tokens[1:])
        assert s["streams"]["decode"]["busy"] > 0 and s["host"]["wait"] == 0.0
        assert sorted(s["layers"]) == list(range(len(net.layers)))
    finally:
        eng.close()
        source.close()


def test_critical_path_tiles_the_token_when_clocks_disagree_by_microseconds():
    """GPU event times a few microseconds past the host wait they explain (the two clocks agree
    only to a few µs): the path still tiles [0, wall] exactly and follows the GPU chain."""
    ms = 1e-3
    tok = {"wall": 8 * ms,
           "host": [_h("router", "wait", 2 * ms, 7 * ms, waits_on="compute")],
           "gpu": [_g("copy", 1 * ms, 5 * ms + 3e-6, 1 * ms),
                   _g("decode", 5 * ms, 6 * ms + 2e-6, 1.5 * ms, deps=[(5 * ms, "copy")]),
                   _g("compute", 6 * ms, 7 * ms + 3e-6, 2 * ms, deps=[(6 * ms, "decode")])]}
    segs = TR.critical_path(tok)
    assert sum(b - a for a, b, _ in segs) == pytest.approx(8 * ms, abs=1e-12)
    assert all(a <= b for a, b, _ in segs)
    assert all(segs[i][0] == pytest.approx(segs[i + 1][1], abs=1e-12)
               for i in range(len(segs) - 1))
    assert [s[2] for s in segs] == ["host", "compute", "decode", "copy", "host"]


def test_hooks_sections_detail_records_only_the_sections(tiny_case):
    """``detail="sections"``: the compute-stream items are the launch sections alone (each
    section's kernels, no read inside), copies and decodes as with every op; an unknown detail
    is refused."""
    import timeline_hooks as TH
    from test_gpu_offload import _pf_engine
    from zipmoe_rt.engine.prefetch import attach
    from zipmoe_rt.models import build_model
    case = tiny_case("mixtral")
    source, eng = _pf_engine(case, "zip-lru", case.dense + 2 * case.k * case.bytes_F, 10**9,
                             True)
    try:
        net = build_model(source, executor=eng)
        attach(net, eng)
        rec = TH.Recorder(TH.HostClock(), eng)
        with pytest.raises(ValueError):
            TH.install(rec, net, eng, "kernels")
        undo = TH.install(rec, net, eng, "sections")
        try:
            cache = net.new_cache()
            net.forward(np.asarray(case.ids, np.int64), cache)
            for t in case.ref_tokens[:3]:
                rec.begin()
                net.forward(np.asarray([t], np.int64), cache)
                rec.end()
        finally:
            TH.uninstall(undo)
        assert "router_logits" not in vars(net.layers[0].mlp)
        names = {g["name"] for t in rec.tokens for g in t["gpu"] if g["stream"] == "compute"}
        assert names == set(TH.SECTION_ITEMS)
        assert {g["stream"] for t in rec.tokens for g in t["gpu"]} == {"compute", "copy",
                                                                       "decode"}
    finally:
        eng.close()
        source.close()


def test_interleaved_blocks_alternate_abba_and_the_ratio_follows_the_flipped_speed():
    """tools/timeline_ab.py: blocks alternate A B B A ...; each block runs with the switch as
    set by ``flip`` (a flag the fake step reads, as the engine reads its module switches),
    steps and logits stay in order, and a side that takes twice as long per step gives a
    median ratio near 2 (time-based, so only loose bounds are asserted); too few tokens for two
    blocks is a ValueError naming --interleave."""
    import contextlib
    import time

    import timeline_ab as TAB
    state = {"on": False}
    seen = []

    @contextlib.contextmanager
    def flip():
        state["on"] = True
        try:
            yield
        finally:
            state["on"] = False

    def step(t):
        seen.append((t, state["on"]))
        time.sleep(0.002 if state["on"] else 0.004)      # flipped: twice as fast
        return np.array([t], np.float32)

    r = TAB.interleaved(step, lambda: None, list(range(16)), 2, flip)
    assert [f for f, _ in r["blocks"]] == [False, True, True, False] * 2
    assert [t for t, _ in seen] == list(range(16))
    assert [on for _, on in seen] == [on for on in (False, True, True, False) * 2
                                      for _ in range(2)]
    assert [int(x[0]) for x in r["logits"]] == list(range(16))
    assert state["on"] is False
    assert 1.3 < r["ratio"] < 3.0 and r["ratio_min"] <= r["ratio"] <= r["ratio_max"]
    assert r["flipped_s"] < r["plain_s"]
    with pytest.raises(ValueError, match="--interleave"):
        TAB.interleaved(step, lambda: None, list(range(3)), 2, flip)
    with pytest.raises(ValueError, match="--interleave"):
        TAB.interleaved(step, lambda: None, list(range(8)), 0, flip)


def test_interleaved_row_keeps_the_logits_and_restores_the_switch(tiny_case, monkeypatch):
    """``gpu_timeline.run_interleaved`` (``--interleave``) on the GPU engine over the host
    model of the device operations: zip-lru with prefetch, copy_wait flipped in every other
    pair of blocks; the steps' logits equal those of the same steps with the defaults
    throughout (bit for bit) and the switch is back at its default afterwards."""
    import argparse

    import gpu_timeline as GT
    import offload_model
    from zipmoe_rt.engine import gpu_batch
    case = tiny_case("mixtral")
    monkeypatch.setattr(offload_model, "VOCAB", 256)          # the tiny model's vocabulary
    budget = case.dense + 2 * case.k * case.bytes_F
    a = argparse.Namespace(device="cpu", host_budget=None, tokens=8, interleave=2)
    r = GT.run_interleaved(a, [("copy_wait", True)], case.zmoe, budget, "zip-lru", True)
    assert gpu_batch.COPY_WAITS_COMPUTE is False
    assert [f for f, _ in r["blocks"]] == [False, True, True, False]
    net, _eng, close = GT.open_model(case.zmoe, "cpu", budget, "zip-lru", None, True)
    try:
        ids = offload_model.token_stream(GT.PREFILL + GT.WARM + a.tokens)
        cache = net.new_cache(capacity=len(ids) + 1)
        offload_model.forward(net, ids[:GT.PREFILL], cache, 0)
        ref, step = [], 1
        for t in ids[GT.PREFILL:]:
            out = offload_model.forward(net, np.array([t]), cache, step)
            if step > GT.WARM:
                ref.append(out)
            step += 1
    finally:
        close()
    assert len(r["logits"]) == len(ref) == 8
    assert all(np.array_equal(x, y) for x, y in zip(r["logits"], ref))
