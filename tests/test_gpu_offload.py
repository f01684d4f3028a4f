"""The GPU expert engine (zipmoe_rt/engine/gpu_engine.py) on any machine, and ``--host-budget``.

The engine runs here on :class:`~zipmoe_rt.engine.gpu_ops.HostOps` (its device operations done
at once on host arrays, the segment decode by the Numba twin of the CUDA kernel) with the CPU
kernels, so its tiers, host cache, staging, segment tables and counters are checked without a
GPU: for every tiny spec and every policy, the logits equal the unbudgeted run's bit for bit and
experts are really evicted and brought back through uploads and segment decodes. The same engine
on CUDA (CudaOps): tests/test_gpu.py.
"""
from __future__ import annotations

import numpy as np
import pytest
import zstandard as zstd

import zmoe
from test_engine import ARCHS, DELAYS, WORKERS, assert_same_logits, generate, tiny_case  # noqa: F401
from zipmoe_rt.engine import layout as L_
from zipmoe_rt.engine import profile as prof
from zipmoe_rt.engine.gpu_engine import GpuExpertEngine
from zipmoe_rt.engine.gpu_meta import (block_layout, build_meta, meta_bound, pack_meta,
                                       parse_host_budget)
from zipmoe_rt.engine.gpu_ops import HostOps
from zipmoe_rt.engine.pipeline import budget_split
from zipmoe_rt.engine.store import ZmoeSource
from zipmoe_rt.kernels.gpu_segments import decode_segments
from zipmoe_rt.models import build_model


def _host_words(path, lay, sm, exp) -> dict:
    w = L_.decode_expert(path, lay, sm, exp, zstd.ZstdDecompressor())
    return {"gate": w.gate, "up": w.up, "down": w.down}


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe", "deepseek_v3", "phimoe"])
@pytest.mark.parametrize("segment", [2048, 37])
def test_segment_tables_rebuild_every_expert(tiny_case, name, segment):
    """build_meta + the segment decode give every expert's BF16 words exactly (the host decode's),
    with segments of many sizes (37: many per stream, some cut where gate/up/down begin)."""
    case = tiny_case(name)
    from zipmoe_rt.engine.io import RegionReader
    rd = RegionReader(case.zmoe)
    try:
        for lay in case.layouts.values():
            sm, exp = rd.read(*lay.sm_region), rd.read(*lay.exp_region)
            m = build_meta(lay, exp, segment=segment)
            assert m.runs.shape[1] == 6 and m.runs.shape[0] >= sum(
                4 * len(p.chunks) for p in lay.pieces)
            assert m.bits.size >= m.runs.shape[0] and m.segment == segment
            assert m.meta_bytes <= meta_bound(lay, segment)
            out = np.zeros(m.words, np.uint16)
            decode_segments(exp, sm, m.runs, m.bits, m.tabs, segment, out)
            want = _host_words(case.zmoe, lay, sm, exp)
            for role, w0, shape in m.outs:
                got = out[w0:w0 + int(np.prod(shape))].reshape(shape)
                assert np.array_equal(got, want[role]), (lay.layer, lay.expert, role)
            # the packed block holds the same runs, bits and tables at their offsets
            _, r0, b0, t0, end = block_layout(lay, m)
            blk = np.zeros(end, np.uint8)
            pack_meta(m, blk, lay)
            assert np.array_equal(blk[r0:r0 + m.runs.nbytes].view(np.int32).reshape(-1, 6),
                                  m.runs)
            assert np.array_equal(blk[b0:b0 + m.bits.nbytes].view(np.int32), m.bits)
            assert np.array_equal(blk[t0:end].view(np.uint16).reshape(-1, 4096), m.tabs)
    finally:
        rd.close()


def _engine(case, policy, budget, host_budget, delay=None, prefetch=False, ops=None):
    """The GPU engine on ``ops`` (default HostOps) over the case's file for ``policy``;
    zipmoe planned with ``delay`` within the budget left after one working set."""
    path = case.raw if policy == "raw-lru" else case.zmoe
    source = ZmoeSource(path, keep_experts=False, copy_dense=True)
    kw = dict(workers=WORKERS, ops=ops or HostOps(), host_budget=host_budget, prefetch=prefetch)
    if policy == "zipmoe":
        tr = prof.load_trace(case.trace_path, source)
        plan, ranks = prof.make_plan(tr, delay, budget_split(source, budget)[2], case.k)
        eng = GpuExpertEngine(source, budget, "zipmoe", plan=plan.layers, ranks=ranks,
                              delay=delay, **kw)
    else:
        eng = GpuExpertEngine(source, budget, policy, **kw)
    return source, eng


POLICIES = [("zip-lru", None), ("raw-lru", None)] + [("zipmoe", d) for d in DELAYS]


@pytest.mark.parametrize("name", ARCHS)
def test_gpu_engine_bit_identical_and_really_reloads(tiny_case, name):
    """For every spec and policy, host cache empty and full: logits equal the unbudgeted run's
    bit for bit; misses go through uploads (PCIe bytes counted) and, for compressed files, the
    segment decode; the host cache serves every miss when it holds every expert."""
    case = tiny_case(name)
    for policy, delay in POLICIES:
        budget = case.budget("min") if policy != "zipmoe" else case.budget("mid")
        for hb in (0, "100%"):
            source, eng = _engine(case, policy, budget, 0, case.delay(delay) if delay else None)
            if hb:
                eng.close()
                source.close()
                source = ZmoeSource(case.raw if policy == "raw-lru" else case.zmoe,
                                    keep_experts=False, copy_dense=True)
                hbytes = parse_host_budget(hb, source)
                source.close()
                source, eng = _engine(case, policy, budget, hbytes,
                                      case.delay(delay) if delay else None)
            try:
                net = build_model(source, executor=eng)
                logits, tokens = generate(net, case.ids, 10)
                assert tokens == case.ref_tokens, (policy, delay, hb)
                assert_same_logits(logits, case.ref_logits)
                st = eng.stats
                where = (policy, delay, hb)
                # uses that cross PCIe (S, E, miss) and that decode on the GPU (C too); zipmoe's
                # plan may hold every expert the prompt uses in F (the plan follows the trace)
                pcie = sum(st.hits[t] for t in ("S", "E", "miss"))
                decoded = pcie + st.hits["C"]
                if policy != "zipmoe":
                    assert st.hits["miss"] > 0, where           # evicted and brought back
                assert (st.uploads > 0 and st.pcie_bytes > 0) == (pcie > 0), where
                if policy != "raw-lru":        # gpt-oss's slices too (rearranged on the GPU)
                    assert (st.gpu_decodes > 0) == (decoded > 0), where
                    assert st.host_decodes == 0, where
                else:
                    assert st.gpu_decodes == 0, where          # raw words cross as they are
                if hb:
                    assert st.file_misses == 0 and (st.host_hits > 0) == (pcie > 0), where
                    assert eng.memory_report()["host pinned"] > 0
                else:
                    assert st.host_hits == 0 and (st.file_misses > 0) == (pcie > 0), where
                rep = eng.memory_report()
                assert rep["host budget"] == eng.host_budget
                assert rep["host pinned"] <= eng.host_budget
                g = eng.gpu_report()
                assert g["pcie_bytes"] == st.pcie_bytes and g["device"]
            finally:
                eng.close()
                source.close()


def test_partial_host_cache_serves_some_misses(tiny_case):
    """A host budget of 40 % keeps the first expert ranks of every layer in host memory within
    the budget; the other misses are read from the file; the logits do not change."""
    case = tiny_case("mixtral")
    src = ZmoeSource(case.zmoe)
    hb = parse_host_budget("40%", src)
    src.close()
    source, eng = _engine(case, "zip-lru", case.budget("min"), hb)
    try:
        held = set(eng._host)
        n_layers = len(eng.hp["moe_layers"])
        assert 0 < len(held) < len(eng.layouts)
        assert all((layer, 0) in held for layer in eng.hp["moe_layers"])   # rank 0 first
        assert len({e for _, e in held}) <= -(-len(held) // n_layers)     # whole ranks
        assert eng.memory_report()["host pinned"] <= hb
        net = build_model(source, executor=eng)
        logits, tokens = generate(net, case.ids, 10)
        assert tokens == case.ref_tokens
        assert_same_logits(logits, case.ref_logits)
        assert eng.stats.host_hits > 0 and eng.stats.file_misses > 0
    finally:
        eng.close()
        source.close()


@pytest.mark.parametrize("name", ["qwen3_moe", "gpt_oss"])
def test_misses_of_a_call_share_one_decode_launch(tiny_case, name, monkeypatch):
    """With every expert in the host cache, the misses of one MoE call are copied into one
    arena and decoded by one launch (fewer launches than decodes); with the batched path off each miss is its own launch; the logits are the same."""
    from zipmoe_rt.engine import gpu_batch
    case = tiny_case(name)
    res = {}
    for batched, per in ((True, 2), (True, 0), (False, 2)):
        monkeypatch.setattr(gpu_batch, "BATCHED", batched)
        monkeypatch.setattr(gpu_batch, "MAX_BATCH", per)
        source, eng = _engine(case, "zip-lru", case.budget("min"), 10**9)
        try:
            net = build_model(source, executor=eng)
            logits, tokens = generate(net, case.ids, 6)
            assert tokens == case.ref_tokens[:len(tokens)]
            st = eng.stats
            assert st.gpu_decodes > 0 and st.file_misses == 0
            if batched:
                assert 0 < st.batches < st.gpu_decodes
                d = st.as_dict()
                assert d["issue_s"] > 0 and d["h2d_s"] >= 0 and d["moe_compute_s"] > 0
            else:
                assert st.batches == 0
            if batched and per:
                assert st.batches >= -(-st.gpu_decodes // per)
            res[batched, per] = logits
        finally:
            eng.close()
            source.close()
    for key in res:
        assert all(np.array_equal(a, b) for a, b in zip(res[key], res[False, 2]))


def test_pcie_bytes_are_the_compressed_regions(tiny_case):
    """A miss of a compressed expert sends its two regions and its tables (less than its BF16
    bytes for real-size experts; here the tables of a tiny expert weigh more), a raw miss its
    BF16 bytes."""
    case = tiny_case("mixtral")
    for policy in ("zip-lru", "raw-lru"):
        source, eng = _engine(case, policy, case.budget("min"), 0)
        try:
            net = build_model(source, executor=eng)
            generate(net, case.ids, 3)
            st = eng.stats
            lay = next(iter(eng.layouts.values()))
            if policy == "raw-lru":
                assert st.pcie_bytes == st.uploads * lay.sm_region[1]
            else:
                m = eng._meta[(lay.layer, lay.expert)]
                per = block_layout(lay, m)[4]
                assert st.uploads * lay.full_bytes // 2 < st.pcie_bytes <= st.uploads * per + \
                    st.uploads * 4096 * 3   # tables of a few KB per expert
        finally:
            eng.close()
            source.close()


def test_corrupt_expert_in_host_cache_is_named(tiny_case, tmp_path):
    """Filling the host cache checks each expert's CRCs: a flipped byte names the file."""
    case = tiny_case("mixtral")
    bad = tmp_path / "bad.zmoe"
    data = bytearray(case.zmoe.read_bytes())
    lay = next(iter(case.layouts.values()))
    data[lay.sm_region[0] + 3] ^= 0xFF
    bad.write_bytes(bytes(data))
    source = ZmoeSource(bad, keep_experts=False, copy_dense=True, verify=False)
    try:
        with pytest.raises(zmoe.ChecksumError, match="bad.zmoe"):
            GpuExpertEngine(source, case.budget("min"), "zip-lru", workers=WORKERS,
                            ops=HostOps(), host_budget=10**9)
    finally:
        source.close()


# ------------------------------------------------------------------ --host-budget


def test_parse_host_budget(tiny_case):
    case = tiny_case("mixtral")
    src = ZmoeSource(case.zmoe)
    try:
        stored = sum(l.sm_region[1] + l.exp_region[1] for l in src.layouts.values())
        assert parse_host_budget("100%", src) == stored
        assert parse_host_budget("50%", src) == int(0.5 * stored)
        assert parse_host_budget("0", src) == 0 and parse_host_budget("0%", src) == 0
        assert parse_host_budget("2GB", src) == 2 * 10**9
        assert parse_host_budget("1.5GiB", src) == int(1.5 * 2**30)
        assert parse_host_budget(12345, src) == 12345
        for text, needle in (("lots", "cannot read"), ("-5", "must be positive"),
                             ("150%", r"\[0, 100\] %"), ("x%", "cannot read"), (-1, "0 or more"),
                             (True, "expected a size")):
            with pytest.raises(ValueError, match=needle) as ei:
                parse_host_budget(text, src)
            assert "--host-budget" in str(ei.value) and "--memory-budget" not in str(ei.value)
    finally:
        src.close()


def test_host_budget_needs_cuda_and_a_budget(tiny_case):
    import zipmoe_rt
    case = tiny_case("mixtral")
    for kw in ({"memory_budget": "50%"}, {}):
        with pytest.raises(ValueError, match=r"host_budget \(--host-budget\): applies to "
                                             r"--device cuda with --memory-budget"):
            zipmoe_rt.load(case.zmoe, host_budget="1GB", **kw)


def test_cli_host_budget_on_cpu_is_one_line_error(tiny_case):
    from click.testing import CliRunner

    from zipmoe_rt.cli import main
    case = tiny_case("mixtral")
    r = CliRunner().invoke(main, ["run", str(case.zmoe), "-p", "hi", "--raw", "-n", "2",
                                  "--memory-budget", "50%", "--host-budget", "1GB"])
    assert r.exit_code != 0
    msg = r.output.strip().splitlines()
    assert len(msg) == 1 and "--host-budget" in msg[0] and "Traceback" not in r.output


def test_bench_host_budget_needs_cuda(tiny_case):
    from zipmoe_rt import bench
    with pytest.raises(ValueError, match=r"host_budget \(--host-budget\): applies to --device cuda"):
        bench.run(tiny_case("mixtral").zmoe, ["50%"], ["zip-lru"], host_budget="1GB")


def test_gpu_report_lines():
    """bench's per-row GPU line and /stats' GPU line state the device, tiers, PCIe bytes and
    kernel time they are given."""
    from zipmoe_rt.bench import gpu_line, gpu_row_line
    row = {"policy": "zipmoe", "budget": "25%", "gpu": "NVIDIA H100",
           "memory": {"dense": 110e6, "F": 300e6, "C": 50e6, "S": 0, "E": 2e6,
                      "host pinned": 1.6e9},
           "pcie_bytes_per_token": 12.5e6, "gpu_decode_ms_per_token": 0.25}
    line = gpu_row_line(row)
    assert "NVIDIA H100" in line and "110/300/50/0/2" in line and "1600 MB" in line
    assert "12.50 MB over PCIe" in line and "0.250 ms of decode kernels" in line
    rep = {"device": "NVIDIA H100", "uploads": 7, "pcie_bytes": 3.5e6, "gpu_decodes": 5,
           "gpu_decode_s": 0.0012, "host_hits": 4, "file_misses": 3}
    s = gpu_line(rep)
    assert s == ("GPU NVIDIA H100: 7 expert uploads, 3.5 MB over PCIe, 5 GPU decodes (1.20 ms "
                 "in kernels), 4 from host memory, 3 read from the file")


# -- cross-layer prefetch on the GPU engine (engine/gpu_prefetch.py) -----------------------------

def _pf_engine(case, policy, budget, host_budget, prefetch, ops=None):
    """:func:`_engine` with ``prefetch``, zipmoe planned with the case's ``"CE"`` delay
    (compressed experts prefetch into the staging arena: no second working set)."""
    return _engine(case, policy, budget, host_budget, case.delay("CE"), prefetch, ops)


PF_CASES = [(s, p, hb) for s in ("mixtral", "deepseek_v2_lite", "gpt_oss")
            for p in ("zip-lru", "raw-lru", "zipmoe") for hb in (0, 10**9)]


@pytest.mark.parametrize("spec,policy,hb", PF_CASES,
                         ids=[f"{s}-{p}-host{int(bool(h))}" for s, p, h in PF_CASES])
def test_gpu_prefetch_on_is_bit_identical_and_runs(tiny_case, spec, policy, hb):
    """Prefetch on the GPU engine (host model): at a budget of the minimum plus a second working
    set (nothing resident), with the host cache empty and full, the logits and tokens equal the
    unbudgeted run's; every MoE layer after the first is predicted on each one-token call,
    loads are started, claimed and counted, and gpu_report states the recall."""
    from zipmoe_rt.engine.prefetch import attach
    case = tiny_case(spec)
    budget = case.dense + 2 * case.k * case.bytes_F
    source, eng = _pf_engine(case, policy, budget, hb, True)
    try:
        # raw experts are decoded as they arrive: a second working set; compressed ones wait
        # in the staging arena, so the tiers keep the budget they have without prefetch
        assert eng.prefetch and eng.window == (2 if policy == "raw-lru" else 1) * case.k
        assert eng.tier_budget == budget_split(source, budget, policy == "raw-lru")[2]
        net = build_model(source, executor=eng)
        n_look = attach(net, eng)
        logits, tokens = generate(net, case.ids, 10)
        assert tokens == case.ref_tokens
        assert_same_logits(logits, case.ref_logits)
        st = eng.stats
        moe = sorted(case.hp["moe_layers"])
        assert n_look == moe[-1]
        predicted = [l for l in moe if l > 0]
        assert sorted(st.recall_used) == predicted
        assert all(st.recall_used[l] == 10 * case.k for l in predicted)
        assert st.prefetch_issued > 0 and st.prefetch_used > 0
        assert st.prefetch_used + st.prefetch_wasted <= st.prefetch_issued
        assert st.uploads > 0 and (st.host_hits > 0) == bool(hb)
        rep = eng.gpu_report()["prefetch"]
        hits = sum(st.recall_hits.values())
        assert rep["prefetch"] and rep["recall"] == hits / (10 * case.k * len(predicted))
        assert rep["issued"] == st.prefetch_issued and rep["used"] == st.prefetch_used
    finally:
        eng.close()
        source.close()


class _WaitLog(HostOps):
    """HostOps that records the events the compute stream (None) is made to wait for."""

    def __init__(self):
        self.compute_waits = []

    def wait(self, stream, event):
        if stream is None:
            self.compute_waits.append(event)


@pytest.mark.parametrize("hb", [0, 10**9])
def test_gpu_prefetch_recall_and_wasted_bytes_on_a_constructed_case(tiny_case, hb):
    """A prediction of {3, 1, 0} (at most k = 2 loads alive: 3 is skipped) against a use of
    {2, 1}: recall 1/2, one load used; the unclaimed expert 0 is discarded with its two
    compressed regions counted as wasted, after the compute stream was made to wait for its
    decode; the output equals the engine's without prefetch."""
    case = tiny_case("mixtral")
    budget = case.dense + 2 * case.k * case.bytes_F
    ops = _WaitLog()
    source, eng = _pf_engine(case, "zip-lru", budget, hb, True, ops)
    try:
        layer = sorted(case.hp["moe_layers"])[1]
        H = int(case.hp["hidden_size"])
        x = np.random.default_rng(0).standard_normal((1, H)).astype(np.float32)
        w = np.array([[0.75, 0.25]], np.float32)
        idx = np.array([[2, 1]], np.int64)
        assert case.k == 2 and int(case.hp["num_experts"]) >= 4
        eng.predict(layer, [3, 1, 0], issue_now=True)
        st = eng.stats
        assert st.prefetch_issued == 2 and st.prefetch_skipped == 1
        assert sorted(eng._inflight) == [(layer, 0), (layer, 1)]
        p0 = eng._inflight[(layer, 0)]
        got = eng.run(layer, x, idx, w)
        eng._sweep_discarded(wait=True)
        assert st.recall_hits == {layer: 1} and st.recall_used == {layer: 2}
        assert st.prefetch_used == 1 and st.prefetch_wasted == 1 and not eng._discard
        lay = case.layouts[(layer, 0)]
        assert st.prefetch_wasted_bytes == lay.sm_region[1] + lay.exp_region[1]
        assert p0.weights is None and p0.block is None
        if hb:      # copied and decoded at once: the compute stream waited for its decode
            assert ops.compute_waits and ops.compute_waits[-1] is not None
        src2, ref = _pf_engine(case, "zip-lru", budget, hb, False)
        try:
            assert not ref.prefetch
            assert np.array_equal(got, ref.run(layer, x, idx, w))
        finally:
            ref.close()
            src2.close()
        rep = eng.gpu_report()["prefetch"]
        assert rep == {"prefetch": True, "recall": 0.5, "issued": 2, "used": 1, "wasted": 1,
                       "wasted_bytes": lay.sm_region[1] + lay.exp_region[1]}
    finally:
        eng.close()
        source.close()


def test_gpu_prefetch_through_the_factory_and_its_line(tiny_case):
    """build_engine passes prefetch to the GPU engine: compressed experts prefetch at every
    budget (no second working set), raw experts only where the budget has room for a second
    working set, as on the host; /stats' GPU line adds the prefetch figures when prefetch runs
    and only then."""
    from zipmoe_rt.bench import gpu_line
    from zipmoe_rt.engine.factory import build_engine
    case = tiny_case("mixtral")
    source = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
    try:
        for budget, on in ((case.dense + 2 * case.k * case.bytes_F, True),
                           (case.budget("min"), True)):
            eng = build_engine(source, budget, "zip-lru", "lru", WORKERS, False, None, True,
                               gpu_ops=HostOps(), prefetch=True)
            try:
                assert isinstance(eng, GpuExpertEngine) and eng.prefetch == on
                assert eng.window == case.k
            finally:
                eng.close()
    finally:
        source.close()
    raw = ZmoeSource(case.raw, keep_experts=False, copy_dense=True)
    try:
        for budget, on in ((case.dense + 2 * case.k * case.bytes_F, True),
                           (case.budget("min"), False)):
            eng = build_engine(raw, budget, "raw-lru", "lru", WORKERS, False, None, True,
                               gpu_ops=HostOps(), prefetch=True)
            try:
                assert eng.prefetch == on and eng.window == (2 if on else 1) * case.k
            finally:
                eng.close()
    finally:
        raw.close()
    rep = {"device": "NVIDIA H100", "uploads": 7, "pcie_bytes": 3.5e6, "gpu_decodes": 5,
           "gpu_decode_s": 0.0012, "host_hits": 4, "file_misses": 3,
           "prefetch": {"prefetch": True, "recall": 0.625, "issued": 9, "used": 6, "wasted": 3,
                        "wasted_bytes": 2.5e6}}
    assert gpu_line(rep).endswith("3 read from the file; prefetch: recall 62 %, 9 loads "
                                  "started, 6 used, 2.5 MB wasted")
    rep["prefetch"]["prefetch"] = False
    assert gpu_line(rep).endswith("3 read from the file")


def _cuda_why():
    from zipmoe_rt.backends import cuda_unavailable
    return cuda_unavailable()


def _cuda_unbudgeted(case, n: int) -> tuple:
    """``generate``'s ``(logits, tokens)`` over ``n`` steps of ``case``'s model on the GPU
    with every expert resident (no budget): the reference of the budgeted GPU runs."""
    import zipmoe_rt
    m = zipmoe_rt.load(case.zmoe, device="cuda", progress=False)
    try:
        return generate(m.net, case.ids, n)
    finally:
        m.close()


@pytest.mark.skipif(_cuda_why() is not None, reason=f"no CUDA backend here: {_cuda_why()}")
@pytest.mark.parametrize("spec", ["mixtral", "deepseek_v2_lite", "qwen3_moe", "gpt_oss"])
def test_cuda_prefetch_on_equals_off_and_unbudgeted(tiny_case, spec):
    """On the GPU, each policy, host cache empty and full: prefetch on and off give the
    unbudgeted GPU run's logits bit for bit and its tokens; with prefetch on, predicted loads
    are started and claimed."""
    import warnings

    import zipmoe_rt
    case = tiny_case(spec)
    ref_logits, ref_tokens = _cuda_unbudgeted(case, 10)
    budget = case.dense + 2 * case.k * case.bytes_F
    for policy in ("zip-lru", "raw-lru", "zipmoe"):
        path = case.raw if policy == "raw-lru" else case.zmoe
        for hb in (None, "100%"):
            for pf in ("off", "on"):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    b = zipmoe_rt.load(path, device="cuda", memory_budget=budget, policy=policy,
                                       trace=case.trace_path, workers=2, host_budget=hb,
                                       prefetch=pf, progress=False)
                try:
                    where = (policy, hb, pf)
                    assert b.engine.prefetch == (pf == "on"), where
                    logits, tokens = generate(b.net, case.ids, 10)
                    assert tokens == ref_tokens, where
                    assert all(np.array_equal(x, y) for x, y in zip(logits, ref_logits)), where
                    st = b.engine.stats
                    if pf == "on":
                        assert st.prefetch_issued > 0 and st.prefetch_used > 0, where
                    else:
                        assert st.prefetch_issued == 0, where
                finally:
                    b.close()


def test_gpu_prefetch_during_a_call_waits_compressed_until_the_call_ends(tiny_case):
    """Predicted loads issued while an MoE call runs are copied into the open batch at once
    and decoded only when the call ends (their outputs taken then, from the memory the call's
    experts give back, which stay held until the compute stream waits for them); wrong guesses
    still in the open batch are released only after its decode is launched; issued outside a
    call, predicted loads are decoded at once."""
    case = tiny_case("mixtral")
    budget = case.budget("min")
    source, eng = _pf_engine(case, "zip-lru", budget, 10**9, True)
    try:
        assert eng.prefetch and eng.window == case.k
        layer = sorted(case.hp["moe_layers"])[1]
        eng._in_call = True
        eng.predict(layer, [0, 1], issue_now=True)
        loads = list(eng._inflight.values())
        assert len(loads) == 2 and eng._batch is not None
        assert all(p.event is None and p.weights is None for p in loads)
        assert all(isinstance(j[5], int) for j in eng._batch.jobs)    # no output taken yet
        eng._end_call()
        assert eng._batch is None and not eng._in_call
        assert all(p.event is not None and p.weights is not None for p in loads)
        assert all(p.keep is not None for p in loads)      # the decoded words, held
        # wrong guesses still in the open batch stay until its decode is launched
        other = sorted(case.hp["moe_layers"])[2]
        eng._drop_prefetch()                                # 0 and 1: wasted
        assert eng.stats.prefetch_wasted == 2
        eng._in_call = True
        eng.predict(layer, [2, 3], issue_now=True)
        eng.predict(other, [0], issue_now=True)             # discards 2 and 3, unlaunched
        assert len(eng._discard) == 2 and eng.stats.prefetch_wasted == 2
        eng._end_call()
        eng._sweep_discarded()
        assert not eng._discard and eng.stats.prefetch_wasted == 4
        eng.predict(other, [2, 3], issue_now=True)
        assert eng._batch is None
        assert all(p.event is not None for k, p in eng._inflight.items() if k[0] == other)
    finally:
        eng.close()
        source.close()


# -- the module switches tools/gpu_timeline.py flips (--ab) -----------------------------------

class _CopyWaitLog(HostOps):
    """HostOps that counts the copy stream's waits for events of the compute stream (None)."""

    def __init__(self):
        self.compute_events, self.copy_waits, self.copy_stream = set(), 0, None

    def record(self, stream, timing=False):
        ev = super().record(stream, timing)
        if stream is None:
            self.compute_events.add(ev)
        return ev

    def wait(self, stream, event):
        if stream is not None and stream is self.copy_stream and event in self.compute_events:
            self.copy_waits += 1


@pytest.mark.parametrize("on", [True, False])
def test_copy_stream_waits_for_compute_per_batch_or_per_new_arena(tiny_case, monkeypatch, on):
    """``gpu_batch.COPY_WAITS_COMPUTE``: on, each batch's copies wait for the compute
    stream's event taken when the batch opened; off (the default), only the first batch of each
    arena does (its memory came from the compute stream's pool). Logits and tokens equal the
    unbudgeted run's either way."""
    from zipmoe_rt.engine import gpu_batch
    monkeypatch.setattr(gpu_batch, "COPY_WAITS_COMPUTE", on)
    case = tiny_case("mixtral")
    ops = _CopyWaitLog()
    source, eng = _engine(case, "zip-lru", case.budget("min"), 10**9, ops=ops)
    ops.copy_stream = eng._copy_s
    try:
        net = build_model(source, executor=eng)
        logits, tokens = generate(net, case.ids, 10)
        assert tokens == case.ref_tokens
        assert_same_logits(logits, case.ref_logits)
        batches = eng.stats.batches
        assert batches > len(eng._arenas) == 2
        assert ops.copy_waits == (batches if on else 2)
    finally:
        eng.close()
        source.close()


@pytest.mark.parametrize("scores, device_reads, ranked", [
    (True, False, True), (False, False, False), (None, False, True), (None, True, False),
    (True, True, True)])
def test_lookahead_without_scores_predicts_the_top_k_alone(tiny_case, monkeypatch, scores,
                                                           device_reads, ranked):
    """``prefetch.LOOKAHEAD_SCORES`` off: the look-ahead makes no second read for the ranking
    (no rank histogram, no extra candidates); None (the default) reads the scores only where
    the backend has no ``read_later`` (a host backend: the read is free), not on a backend that
    reads from a device (given here a ``read_later`` attribute that the look-ahead must not
    call). Predicted loads are still started and claimed and the logits equal the unbudgeted
    run's."""
    from zipmoe_rt.engine import prefetch
    from zipmoe_rt.engine.prefetch import attach
    monkeypatch.setattr(prefetch, "LOOKAHEAD_SCORES", scores)
    case = tiny_case("mixtral")
    budget = case.dense + 2 * case.k * case.bytes_F
    source, eng = _pf_engine(case, "zip-lru", budget, 10**9, True)
    try:
        net = build_model(source, executor=eng)
        if device_reads:
            def read_later(*arrays):
                raise AssertionError("the look-ahead deferred a read with LOOKAHEAD_ASYNC off")
            for i in case.hp["moe_layers"]:
                monkeypatch.setattr(net.layers[i].mlp.backend, "read_later", read_later,
                                    raising=False)
        attach(net, eng)
        logits, tokens = generate(net, case.ids, 10)
        assert tokens == case.ref_tokens
        assert_same_logits(logits, case.ref_logits)
        st = eng.stats
        assert st.prefetch_issued > 0 and st.prefetch_used > 0
        predicted = [l for l in sorted(case.hp["moe_layers"]) if l > 0]
        assert sorted(eng._rank_hist) == (predicted if ranked else [])
    finally:
        eng.close()
        source.close()


@pytest.mark.skipif(_cuda_why() is not None, reason=f"no CUDA backend here: {_cuda_why()}")
@pytest.mark.parametrize("spec", ["mixtral", "qwen3_moe"])
def test_cuda_copy_wait_and_lookahead_switches_keep_logits(tiny_case, monkeypatch, spec):
    """On the GPU, zip-lru with prefetch, host cache empty and full: with
    ``gpu_batch.COPY_WAITS_COMPUTE`` and/or ``prefetch.LOOKAHEAD_SCORES`` off, and with
    ``prefetch.LOOKAHEAD_ASYNC`` on (the look-ahead's read deferred), the logits equal the
    unbudgeted GPU run's bit for bit, and predicted loads are still used."""
    import warnings

    import zipmoe_rt
    from zipmoe_rt.engine import gpu_batch, prefetch
    case = tiny_case(spec)
    ref_logits, ref_tokens = _cuda_unbudgeted(case, 10)
    budget = case.dense + 2 * case.k * case.bytes_F
    for copy_wait, scores, early in ((False, True, False), (True, False, False),
                                     (True, True, True), (False, False, True)):
        monkeypatch.setattr(gpu_batch, "COPY_WAITS_COMPUTE", copy_wait)
        monkeypatch.setattr(prefetch, "LOOKAHEAD_SCORES", scores)
        monkeypatch.setattr(prefetch, "LOOKAHEAD_ASYNC", early)
        for hb in (None, "100%"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b = zipmoe_rt.load(case.zmoe, device="cuda", memory_budget=budget,
                                   policy="zip-lru", workers=2, host_budget=hb, prefetch="on",
                                   progress=False)
            try:
                where = (copy_wait, scores, early, hb)
                logits, tokens = generate(b.net, case.ids, 10)
                assert tokens == ref_tokens, where
                assert all(np.array_equal(x, y) for x, y in zip(logits, ref_logits)), where
                assert b.engine.stats.prefetch_used > 0, where
            finally:
                b.close()


@pytest.mark.skipif(_cuda_why() is not None, reason=f"no CUDA backend here: {_cuda_why()}")
@pytest.mark.parametrize("spec", ["mixtral", "qwen3_moe", "gpt_oss"])
def test_cuda_streamed_decode_keeps_logits(tiny_case, monkeypatch, spec):
    """On the GPU with ``gpu_batch.STREAMED`` (each batch's decode launched before its copies
    land, its blocks waiting for the landed word): zip-lru and raw-lru, prefetch off and on,
    the copy wait on and off, host cache empty and full: the logits equal the unbudgeted GPU
    run's bit for bit, and numbers were copied into the word (the decodes really waited on
    it)."""
    import warnings

    import zipmoe_rt
    from zipmoe_rt.engine import gpu_batch
    case = tiny_case(spec)
    ref_logits, ref_tokens = _cuda_unbudgeted(case, 10)
    budget = case.dense + 2 * case.k * case.bytes_F
    monkeypatch.setattr(gpu_batch, "STREAMED", True)
    for policy, pf, copy_wait, hb in (("zip-lru", "off", False, None),
                                      ("zip-lru", "off", True, "100%"),
                                      ("zip-lru", "on", False, "100%"),
                                      ("zip-lru", "on", True, None),
                                      ("raw-lru", "off", False, "100%")):
        monkeypatch.setattr(gpu_batch, "COPY_WAITS_COMPUTE", copy_wait)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            b = zipmoe_rt.load(case.zmoe, device="cuda", memory_budget=budget, policy=policy,
                               workers=2, host_budget=hb, prefetch=pf, progress=False)
        try:
            where = (policy, pf, copy_wait, hb)
            logits, tokens = generate(b.net, case.ids, 10)
            assert tokens == ref_tokens, where
            assert all(np.array_equal(x, y) for x, y in zip(logits, ref_logits)), where
            assert (b.engine._seq > 0) == (policy == "zip-lru"), where
        finally:
            b.close()


@pytest.mark.skipif(_cuda_why() is not None, reason=f"no CUDA backend here: {_cuda_why()}")
def test_cuda_timeline_hooks_record_every_stream(tiny_case):
    """tools/timeline_hooks.py on the GPU (zip-lru, prefetch on, host cache full): the recorded
    tokens hold compute, copy and decode items with CUDA event times inside the token, decodes
    that waited for copies, host waits for the routing reads; the critical path tiles each
    token; the logits equal the unbudgeted run's; uninstall leaves nothing wrapped."""
    import sys
    import warnings
    from pathlib import Path

    import zipmoe_rt
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import timeline_hooks as TH
    import timeline_report as TR
    from test_gpu_timeline import generate_recorded
    case = tiny_case("mixtral")
    ref_logits, _ = _cuda_unbudgeted(case, 4)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        b = zipmoe_rt.load(case.zmoe, device="cuda", progress=False, policy="zip-lru",
                           memory_budget=case.dense + 2 * case.k * case.bytes_F,
                           host_budget="100%", prefetch="on", workers=2)
    try:
        net, eng = b.net, b.engine
        rec = TH.Recorder(TH.CudaClock(), eng)
        logits, _ = generate_recorded(rec, net, eng, case.ids, 4)
        assert all(np.array_equal(x, y) for x, y in zip(logits, ref_logits))
        assert not any(n in vars(eng.ops) for n in ("h2d_at", "record", "wait", "decode_batch"))
        toks = rec.tokens[1:]                       # the decode steps
        assert {g["stream"] for t in toks for g in t["gpu"]} == {"compute", "copy", "decode"}
        dec = [g for t in toks for g in t["gpu"] if g["stream"] == "decode"]
        assert dec and all(any(ln == "copy" for _, ln in g["deps"]) for g in dec)
        assert all(any(s["kind"] == "wait" and s["what"] == "read" for s in t["host"])
                   for t in toks)
        for t in toks:
            assert all(-1e-4 <= g["t0"] <= g["t1"] <= t["wall"] + 1e-4 for g in t["gpu"])
            segs = TR.critical_path(t)
            assert sum(b_ - a_ for a_, b_, _ in segs) == pytest.approx(t["wall"], rel=1e-6)
    finally:
        b.close()


def test_lookahead_async_predicts_the_same_from_a_deferred_read(tiny_case, monkeypatch):
    """``prefetch.LOOKAHEAD_ASYNC`` on a backend with ``read_later`` (here its host model): the
    look-ahead queues its read and the prediction is made when the running layer issues its
    prefetch; predictions, recall, loads and logits equal those of the look-ahead that reads
    at once with the scores (``LOOKAHEAD_SCORES`` on: the deferred read carries them)."""
    from zipmoe_rt.engine import prefetch
    from zipmoe_rt.engine.prefetch import attach
    monkeypatch.setattr(prefetch, "LOOKAHEAD_SCORES", True)
    case = tiny_case("mixtral")
    budget = case.dense + 2 * case.k * case.bytes_F
    res = {}
    for on in (False, True):
        monkeypatch.setattr(prefetch, "LOOKAHEAD_ASYNC", on)
        source, eng = _pf_engine(case, "zip-lru", budget, 10**9, True)
        try:
            net = build_model(source, executor=eng)
            attach(net, eng)
            calls = []

            def later(*arrays):       # a queued device-to-host read, on host arrays
                calls.append(len(arrays))
                host = [np.array(a, copy=True) for a in arrays]
                return lambda: host
            monkeypatch.setattr(net.backend, "read_later", later, raising=False)
            logits, tokens = generate(net, case.ids, 10)
            assert tokens == case.ref_tokens
            assert_same_logits(logits, case.ref_logits)
            st = eng.stats
            res[on] = (dict(st.recall_hits), dict(st.recall_used), st.prefetch_issued,
                       st.prefetch_used, {k: v.tolist() for k, v in eng._rank_hist.items()},
                       len(calls))
        finally:
            eng.close()
            source.close()
    assert res[True][:5] == res[False][:5]
    assert res[False][2] > 0 and res[False][3] > 0
    assert res[False][5] == 0 and res[True][5] > 0


@pytest.mark.skipif(_cuda_why() is not None, reason=f"no CUDA backend here: {_cuda_why()}")
def test_cuda_read_later_returns_the_arrays_it_queued():
    """``CupyBackend.read_later``: two reads queued before either is taken each return their
    own arrays (dtype, shape, values), as ``to_host`` does; a read above the pinned size goes
    through cupy.asnumpy."""
    import cupy as cp

    from zipmoe_rt.backends import get_backend
    be = get_backend("cuda")
    a = cp.arange(128, dtype=cp.float32).reshape(1, 128)
    b = cp.arange(8, dtype=cp.int64).reshape(1, 8) * 3
    first = be.read_later(a, b)
    a2 = a * 2
    second = be.read_later(a2)
    x, y = first()
    (z,) = second()
    assert x.dtype == np.float32 and x.shape == (1, 128)
    assert np.array_equal(x, np.arange(128, dtype=np.float32).reshape(1, 128))
    assert y.dtype == np.int64 and np.array_equal(y, np.arange(8).reshape(1, 8) * 3)
    assert np.array_equal(z, 2 * x) and np.array_equal(be.to_host(a2), z)
    big = cp.ones(5 << 20, cp.uint8)
    assert be.read_later(big)()[0].sum() == 5 << 20
