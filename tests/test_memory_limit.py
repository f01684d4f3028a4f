"""``--memory-limit`` (zipmoe_rt/engine/limit.py): parsing, cgroup v1/v2 and MemAvailable
detection from fixture files, how a limit divides into overhead, KV cache, buffers and weight
budget, the errors, the CLI and API plumbing, and bench's peak RSS under a limit (a child
process, VmHWM) against the limit.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import zipmoe_rt
from zipmoe_rt.engine import limit as L
from zipmoe_rt.engine import memparts as P
from zipmoe_rt.engine.store import ZmoeSource

from test_api import make_chat_model

MB = 10**6


# -- parsing ------------------------------------------------------------------------------------
@pytest.mark.parametrize("text, want", [
    ("600MB", 600 * MB), ("600mb", 600 * MB), (" 1.5 GiB ", int(1.5 * 2**30)),
    ("750000000", 750000000), ("512MiB", 512 * 2**20), ("2G", 2 * 10**9), ("100kB", 100_000),
    (123456789, 123456789), ("auto", "auto"), ("AUTO", "auto"), ("80%", 0.8), ("100%", 1.0),
    ("12.5%", 0.125)])
def test_parse_limit(text, want):
    assert L.parse_limit(text) == want


@pytest.mark.parametrize("text", ["lots", "-5MB", "0", "0MB", "150%", "0%", "-1%", "nan",
                                  "infGB", "", "MB", "5 XB", True, -3, 0.0])
def test_parse_limit_bad_values_are_named(text):
    with pytest.raises(L.MemoryLimitError) as e:
        L.parse_limit(text)
    assert "--memory-limit" in str(e.value)
    if text != "":
        assert str(text) in str(e.value)
    assert isinstance(e.value, ValueError)


@pytest.mark.parametrize("text, why", [("inf", "finite size"), ("infGB", "finite size"),
                                       ("nan", "finite size"), ("1e30GB", "more than any machine"),
                                       ("2000TB", "more than any machine"),
                                       (10**16, "more than any machine"), ("-5MB", "positive")])
def test_parse_limit_says_why_a_value_is_refused(text, why):
    with pytest.raises(L.MemoryLimitError, match=why):
        L.parse_limit(text)
    assert L.parse_limit("1000TB") == 10**15


# -- cgroup and MemAvailable detection from fixture files -----------------------------------------
def write(p: Path, text: str) -> Path:
    p.parent.mkdir(parents=True, exist_ok=True)
    p.write_text(text)
    return p


def test_cgroup_v2_smallest_limit_along_the_path(tmp_path):
    proc = write(tmp_path / "cgroup", "0::/user.slice/bench\n")
    root = tmp_path / "fs"
    write(root / "user.slice" / "bench" / "memory.max", "max\n")
    write(root / "user.slice" / "memory.max", "600000000\n")
    assert L.cgroup_limit(proc, root) == (600000000, str(root / "user.slice" / "memory.max"))
    write(root / "user.slice" / "bench" / "memory.max", "400000000\n")
    assert L.cgroup_limit(proc, root) == (400000000,
                                          str(root / "user.slice" / "bench" / "memory.max"))


def test_cgroup_v2_max_means_unlimited(tmp_path):
    proc = write(tmp_path / "cgroup", "0::/a\n")
    root = tmp_path / "fs"
    write(root / "a" / "memory.max", "max\n")
    assert L.cgroup_limit(proc, root) == (None, None)


def test_cgroup_v2_namespace_root_and_hybrid_mount(tmp_path):
    # inside a cgroup namespace the process's cgroup is "/", the mount's root
    proc = write(tmp_path / "cgroup", "0::/\n")
    root = tmp_path / "fs"
    write(root / "memory.max", "314572800\n")
    assert L.cgroup_limit(proc, root)[0] == 314572800
    # hybrid: cgroup2 mounted at root/unified
    root2 = tmp_path / "fs2"
    write(root2 / "unified" / "memory.max", "271000000\n")
    assert L.cgroup_limit(proc, root2) == (271000000, str(root2 / "unified" / "memory.max"))


def test_cgroup_v1(tmp_path):
    proc = write(tmp_path / "cgroup", "9:name=systemd:/\n4:memory:/docker/abc\n1:cpu:/\n0::/\n")
    root = tmp_path / "fs"
    unlimited = "9223372036854771712\n"
    write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", unlimited)
    write(root / "memory" / "docker" / "memory.limit_in_bytes", unlimited)
    write(root / "memory" / "memory.limit_in_bytes", unlimited)
    assert L.cgroup_limit(proc, root) == (None, None)       # the v1 "no limit" value
    f = write(root / "memory" / "docker" / "abc" / "memory.limit_in_bytes", "524288000\n")
    assert L.cgroup_limit(proc, root) == (524288000, str(f))
    # the controller may share its hierarchy with others ("cpuacct,memory")
    proc2 = write(tmp_path / "cgroup2", "3:cpuacct,memory:/docker/abc\n")
    assert L.cgroup_limit(proc2, root) == (524288000, str(f))


def test_cgroup_absent(tmp_path):
    assert L.cgroup_limit(tmp_path / "nope", tmp_path) == (None, None)
    proc = write(tmp_path / "cgroup", "1:cpu:/\n")          # no memory controller
    assert L.cgroup_limit(proc, tmp_path) == (None, None)


def fixture_machine(tmp_path, cgroup_bytes=None, avail_kb=8_000_000):
    proc = write(tmp_path / "cgroup", "0::/job\n")
    root = tmp_path / "fs"
    write(root / "job" / "memory.max", "max\n" if cgroup_bytes is None else f"{cgroup_bytes}\n")
    meminfo = write(tmp_path / "meminfo", f"MemTotal: 16000000 kB\nMemFree: 1000 kB\n"
                                          f"MemAvailable: {avail_kb} kB\n")
    return dict(proc_cgroup=proc, root=root, meminfo=meminfo)


def test_detect_memory(tmp_path, monkeypatch):
    monkeypatch.setattr("zipmoe_rt.util.status_bytes", lambda f: 50 * MB if f == "VmRSS" else 0)
    kw = fixture_machine(tmp_path, cgroup_bytes=600 * MB)
    got, how = L.detect_memory(**kw)
    assert got == 600 * MB and "cgroup limit 600.0 MB" in how and "memory.max" in how
    # no cgroup limit: MemAvailable plus this process's own RSS
    kw = fixture_machine(tmp_path / "b", cgroup_bytes=None, avail_kb=1_000_000)
    got, how = L.detect_memory(**kw)
    assert got == 1_000_000 * 1024 + 50 * MB and "MemAvailable" in how
    # a cgroup limit above what is available: the available memory binds
    kw = fixture_machine(tmp_path / "c", cgroup_bytes=10**12, avail_kb=1_000_000)
    assert L.detect_memory(**kw)[0] == 1_000_000 * 1024 + 50 * MB
    with pytest.raises(L.MemoryLimitError, match="MemAvailable"):
        L.detect_memory(tmp_path / "x", tmp_path / "x", tmp_path / "x")


def test_resolve_limit_auto_margin_and_share(tmp_path, monkeypatch):
    monkeypatch.setattr("zipmoe_rt.util.status_bytes", lambda f: 0)
    kw = fixture_machine(tmp_path, cgroup_bytes=600 * MB)
    got, how = L.resolve_limit("auto", **kw)
    assert got == 600 * MB - L.MARGIN_MIN          # 5 % of 600 MB is below the 32 MiB floor
    assert "margin 33.6 MB" in how
    kw = fixture_machine(tmp_path / "b", cgroup_bytes=4 * 10**9)
    assert L.resolve_limit("auto", **kw)[0] == 4 * 10**9 - 200 * MB          # 5 %
    assert L.resolve_limit("50%", **kw)[0] == 2 * 10**9
    assert L.resolve_limit("700MB", **kw) == (700 * MB, "given")
    kw = fixture_machine(tmp_path / "c", cgroup_bytes=30 * MB)
    with pytest.raises(L.MemoryLimitError, match="nothing after the margin"):
        L.resolve_limit("auto", **kw)


# -- dividing a limit ------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tiny_zmoe(tiny_moe_dir, tmp_path_factory) -> Path:
    return make_chat_model(tiny_moe_dir("mixtral"), tmp_path_factory.mktemp("memlimit") / "tiny")


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A cache folder of the test's own (overhead.json)."""
    monkeypatch.setenv("ZIPMOE_RT_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


OVERHEAD = 50 * MB


def parts(src, context):
    return (P.kv_bytes(src.hparams, context),
            P.read_buffer_bytes(src) + P.activation_bytes(src.hparams, context)
            + L.ENGINE_HEADROOM)


def test_kv_bytes_follows_the_cache_growth(tiny_zmoe):
    from zipmoe_rt.api import load
    m = load(tiny_zmoe)
    try:
        for n in (1, 256, 257, 700):
            c = m.net.new_cache()
            for lc in c.layers:
                lc.reserve(n)
            # every layer at the capacity n needs, plus one layer's old copy while it grows
            assert P.kv_bytes(m.hparams, n) == c.nbytes + c.nbytes // len(c.layers) // 2
    finally:
        m.close()


def test_plan_memory_divides_the_limit_and_names_both_numbers(tiny_zmoe, home):
    src = ZmoeSource(tiny_zmoe)
    try:
        kv, buf = parts(src, 300)
        plan0 = L.plan_memory(src, 10**9, context=300, overhead=OVERHEAD)
        minimum = plan0.minimum
        assert plan0.budget == 10**9 - OVERHEAD - kv - buf
        assert plan0.overhead + plan0.kv + plan0.buffers + plan0.activations + plan0.engine \
            + plan0.budget == plan0.limit
        assert plan0.kv == kv > 0 and plan0.buffers + plan0.activations + plan0.engine == buf
        assert plan0.engine == L.ENGINE_HEADROOM > 0
        assert plan0.activations > 0 and plan0.context == 300
        # exactly enough: the smallest budget
        need = OVERHEAD + kv + buf + minimum
        assert L.plan_memory(src, need, context=300, overhead=OVERHEAD).budget == minimum
        with pytest.raises(L.MemoryLimitError) as e:
            L.plan_memory(src, need - 1, context=300, overhead=OVERHEAD)
        msg = str(e.value)
        assert f"{(need - 1) / 1e6:.1f} MB" in msg                        # the limit
        # minimums are rounded up to 0.1 MB (the size printed is enough)
        from zipmoe_rt.engine.tiers import mb_at_least
        assert f"at least {mb_at_least(need)}" in msg                      # what is needed
        assert f"fixed overhead {OVERHEAD / 1e6:.1f} MB" in msg
        assert f"smallest weight budget {mb_at_least(minimum)}" in msg
        # with --memory-budget: it must fit
        plan = L.plan_memory(src, 10**9, context=300, overhead=OVERHEAD, budget=minimum + 1000)
        assert plan.budget == minimum + 1000
        with pytest.raises(L.MemoryLimitError, match="does not fit --memory-limit"):
            L.plan_memory(src, need, context=300, overhead=OVERHEAD, budget=minimum + 1)
        from zipmoe_rt.engine.tiers import BudgetError
        with pytest.raises(BudgetError, match="at least"):
            L.plan_memory(src, 10**9, context=300, overhead=OVERHEAD, budget=minimum - 1)
    finally:
        src.close()


def test_fixed_overhead_is_measured_once_per_file(tiny_zmoe, home):
    calls = []

    def measure(p):
        calls.append(p)
        return 123 * MB
    assert L.fixed_overhead(tiny_zmoe, measure) == 123 * MB
    assert L.fixed_overhead(tiny_zmoe, measure) == 123 * MB
    # once per file: a child that fills Numba's cache, then the one that measures
    assert len(calls) == 2 and (home / "overhead.json").exists()
    with pytest.raises(L.MemoryLimitError, match="could not measure"):
        L.fixed_overhead(Path(__file__), lambda p: 0)


def test_footprint_skips_the_cache_filling_child_after_the_kernel_compiling_one(tiny_zmoe, home):
    # ensure_kernels' child has filled Numba's cache with the same warm-up: one child measures
    calls = []

    def measure(p):
        calls.append(p)
        return {"steady": 120 * MB, "peak": 200 * MB}
    assert L.footprint(tiny_zmoe, measure, cache_filled=True) == {"steady": 120 * MB,
                                                                  "peak": 200 * MB}
    assert len(calls) == 1
    assert L.fixed_overhead(tiny_zmoe, measure, cache_filled=True) == 120 * MB
    assert L.warmup_peak(tiny_zmoe, measure) == 200 * MB and len(calls) == 1   # remembered


def test_a_limited_load_passes_on_whether_the_kernel_cache_is_filled(tiny_zmoe, home, monkeypatch):
    import zipmoe_rt
    from zipmoe_rt.engine import precompile
    seen = []
    for state in ("ready", "failed"):
        monkeypatch.setattr(precompile, "ensure_kernels", lambda src, notice=True, s=state: s)
        monkeypatch.setattr(L, "fixed_overhead",
                            lambda path, measure=None, cache_filled=False:
                            seen.append(cache_filled) or 50 * MB)
        monkeypatch.setattr(L, "warmup_peak", lambda path, measure=None, cache_filled=False: 0)
        with zipmoe_rt.load(tiny_zmoe, memory_limit="2GB") as m:
            assert m is not None
    assert seen == [True, False]


def test_footprint_is_that_of_a_process_whose_kernels_are_cached(tiny_zmoe, home):
    # the first child compiles the kernels (a cold Numba cache holds more heap); the figure
    # kept is the second child's, which loads them as every later process does
    got = iter([{"steady": 146 * MB, "peak": 228 * MB}, {"steady": 126 * MB, "peak": 202 * MB}])
    assert L.footprint(tiny_zmoe, lambda p: next(got)) == {"steady": 126 * MB, "peak": 202 * MB}


def test_bench_reports_the_overhead_the_limit_counts(tiny_zmoe, home, monkeypatch):
    # bench's "fixed overhead" line is footprint()'s figure: the second child's, remembered,
    # not that of one child compiling on a cold Numba cache
    from zipmoe_rt import bench
    got = iter([{"steady": 248 * MB, "peak": 300 * MB}, {"steady": 126 * MB, "peak": 202 * MB}])
    monkeypatch.setattr(bench, "baseline_footprint", lambda p: next(got))
    assert bench.baseline_rss(tiny_zmoe) == 126 * MB
    assert bench.baseline_rss(tiny_zmoe) == 126 * MB == L.fixed_overhead(tiny_zmoe)
    monkeypatch.setattr(L, "OVERHEAD_METHOD", "other")         # a child that fails: 0
    monkeypatch.setattr(bench, "baseline_footprint", lambda p: {})
    assert bench.baseline_rss(tiny_zmoe) == 0


def test_footprint_keeps_steady_and_peak_and_is_remeasured_by_method(tiny_zmoe, home,
                                                                     monkeypatch):
    calls = []

    def measure(p):
        calls.append(p)
        return {"steady": 110 * MB, "peak": 190 * MB, "anon": 1, "dropped": 2}
    assert L.footprint(tiny_zmoe, measure) == {"steady": 110 * MB, "peak": 190 * MB}
    assert L.fixed_overhead(tiny_zmoe, measure) == 110 * MB
    assert L.warmup_peak(tiny_zmoe, measure) == 190 * MB
    assert len(calls) == 2
    # an entry of another measuring method (e.g. the former peak-RSS one) is not reused
    monkeypatch.setattr(L, "OVERHEAD_METHOD", "other")
    assert L.fixed_overhead(tiny_zmoe, lambda p: 205 * MB) == 205 * MB
    assert L.warmup_peak(tiny_zmoe, measure) == 205 * MB and len(calls) == 2
    with pytest.raises(L.MemoryLimitError, match="could not measure"):
        L.footprint(Path(__file__), lambda p: {"steady": 5 * MB, "peak": 0})


def test_footprint_is_measured_again_once_numba_cache_is_deleted(tiny_zmoe, home, monkeypatch):
    # a process that compiles its kernels holds more heap than the figure measured with the
    # cache filled: deleting the cache must not leave that smaller figure in use
    from zipmoe_rt.engine import footprint as F
    state = {"stamp": "cached"}
    monkeypatch.setattr(F, "kernel_cache_stamp", lambda: state["stamp"])
    calls = []

    def measure(p):
        calls.append(p)
        return {"steady": (100 + len(calls)) * MB, "peak": 200 * MB}
    assert L.fixed_overhead(tiny_zmoe, measure) == 102 * MB and len(calls) == 2
    assert L.fixed_overhead(tiny_zmoe, measure) == 102 * MB and len(calls) == 2
    state["stamp"] = "empty"              # the cache deleted: measured again (and refilled)
    assert L.fixed_overhead(tiny_zmoe, measure) == 104 * MB and len(calls) == 4


def test_kernel_cache_stamp_reads_numba_own_folder(tmp_path, monkeypatch):
    from zipmoe_rt import kernels
    from zipmoe_rt.engine.footprint import kernel_cache_stamp
    monkeypatch.setattr(kernels, "kernel_cache_dir", lambda: tmp_path)
    assert kernel_cache_stamp() == "empty"
    (tmp_path / "linear.gemv_bf16_par-1.py312.nbi").write_bytes(b"x")
    assert kernel_cache_stamp() == "cached"
    monkeypatch.setattr(kernels, "kernel_cache_dir", lambda: tmp_path / "missing")
    assert kernel_cache_stamp() == "empty"
    monkeypatch.setattr(kernels, "kernel_cache_dir", lambda: None)
    assert kernel_cache_stamp() == "unknown"


def test_plan_memory_refuses_a_limit_below_the_warm_up_peak(tiny_zmoe, home):
    src = ZmoeSource(tiny_zmoe)
    try:
        kv, buf = parts(src, 64)
        minimum = L.plan_memory(src, 10**9, context=64, overhead=OVERHEAD).minimum
        need = OVERHEAD + kv + buf + minimum
        peak = need + 5 * MB
        plan = L.plan_memory(src, peak, context=64, overhead=OVERHEAD, peak=peak)
        assert plan.warmup_peak == peak and plan.budget == peak - (need - minimum)
        assert "kernel warm-up peak" in plan.describe()
        with pytest.raises(L.MemoryLimitError) as e:
            L.plan_memory(src, peak - 1, context=64, overhead=OVERHEAD, peak=peak)
        msg = str(e.value)
        from zipmoe_rt.engine.tiers import mb_at_least
        assert f"{(peak - 1) / 1e6:.1f} MB" in msg and f"at least {mb_at_least(peak)}" in msg
        assert f"keeps {OVERHEAD / 1e6:.1f} MB" in msg
    finally:
        src.close()


def test_a_limit_below_one_mb_is_stated_in_bytes(tiny_zmoe, home):
    """A limit (and a budget) below 1 MB is stated in bytes, as --memory-budget states its own,
    not as "0.0 MB"; from 1 MB on, in MB."""
    src = ZmoeSource(tiny_zmoe)
    try:
        for lim, stated in ((10_000, "--memory-limit 10000 bytes (given)"),
                            (1, "--memory-limit 1 byte (given)"),
                            (2 * MB, "--memory-limit 2.0 MB (given)")):
            with pytest.raises(L.MemoryLimitError) as e:
                L.plan_memory(src, lim, context=64, overhead=OVERHEAD, peak=OVERHEAD)
            assert str(e.value).startswith(stated), str(e.value)
        with pytest.raises(L.MemoryLimitError) as e:
            L.plan_memory(src, 10**9, context=64, overhead=OVERHEAD, budget=10**9)
        assert str(e.value).startswith("--memory-budget 1000.0 MB does not fit --memory-limit "
                                       "1000.0 MB (given)"), str(e.value)
        plan = L.plan_memory(src, 10**9, context=64, overhead=OVERHEAD)
        small = L.MemoryPlan(**{**plan.as_dict(), "budget": 900_000})
        assert small.describe().startswith("memory limit 1000.0 MB (given) = ")
        assert "weight budget 900000 bytes" in small.describe()
        assert "weight budget 900000 bytes;" in L.memory_line(None, 900_000, "zip-lru")
    finally:
        src.close()


# -- API and CLI -----------------------------------------------------------------------------------
@pytest.fixture
def fixed(monkeypatch, home):
    monkeypatch.setattr(L, "fixed_overhead", lambda path, measure=None, **kw: OVERHEAD)
    monkeypatch.setattr(L, "warmup_peak", lambda path, measure=None, **kw: OVERHEAD)


def test_load_under_a_limit_gives_the_same_tokens(tiny_zmoe, fixed):
    free = zipmoe_rt.load(tiny_zmoe)
    want = free.generate("hello there", max_tokens=20)
    assert free.memory_plan is None and free.policy == "in-memory"
    free.close()
    src = ZmoeSource(tiny_zmoe)
    kv, buf = parts(src, 128)
    minimum = L.plan_memory(src, 10**9, context=128, overhead=OVERHEAD).minimum
    src.close()
    lim = OVERHEAD + kv + buf + minimum + 3 * 4096     # a few KB above the smallest budget
    with zipmoe_rt.load(tiny_zmoe, memory_limit=lim, context=128, policy="zip-lru") as m:
        assert m.memory_plan.budget == m.engine.budget == minimum + 3 * 4096
        assert m.generate("hello there", max_tokens=20) == want
        line = m.memory_line()
        assert f"memory limit {lim / 1e6:.1f} MB" in line and "policy zip-lru" in line
        # a weight budget below 1 MB in bytes, as --memory-budget states it
        assert f"weight budget {m.engine.budget} bytes" in line


def cli(*args, input=None):
    from zipmoe_rt.cli import main
    return CliRunner().invoke(main, [str(a) for a in args], input=input,
                              env={"ZIPMOE_RT_DEBUG": None}, prog_name="zipmoe-rt")


def test_cli_banner_stats_and_errors(tiny_zmoe, fixed):
    r = cli("run", tiny_zmoe, "-p", "hi", "-n", 3, "--memory-limit", "1GB")
    assert r.exit_code == 0, r.output
    banner = r.stderr.splitlines()[0]
    assert banner.startswith("zipmoe-rt: memory limit 1000.0 MB (given) = fixed overhead "
                             "50.0 MB"), banner
    assert "weight budget" in banner and "policy zip-lru" in banner
    r = cli("chat", tiny_zmoe, "--memory-limit", "1GB", input="/stats\n")
    assert r.exit_code == 0, r.output
    assert sum("memory limit 1000.0 MB" in l and "weight budget" in l and "policy" in l
               for l in r.stderr.splitlines()) == 1          # /stats; piped chat: no banner
    assert not any(l.startswith("zipmoe-rt: memory limit") for l in r.stderr.splitlines())
    for bad in ("lots", "0", "150%"):
        r = cli("run", tiny_zmoe, "-p", "hi", "--memory-limit", bad)
        assert r.exit_code == 1 and r.stderr.startswith("error: --memory-limit"), r.stderr
        assert bad in r.stderr and "Traceback" not in r.stderr
    r = cli("run", tiny_zmoe, "-p", "hi", "--memory-limit", "50.2MB")
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1, r.stderr
    assert "--memory-limit 50.2 MB (given) is too small" in r.stderr and "at least" in r.stderr
    r = cli("run", tiny_zmoe, "-p", "hi", "--memory-limit", "60MB", "--memory-budget", "9GB")
    assert r.exit_code == 1 and "does not fit --memory-limit" in r.stderr, r.stderr


def test_banner_states_the_part_a_smaller_budget_leaves_and_prefetch(tiny_zmoe, fixed):
    from zipmoe_rt.engine.tiers import size_text
    src = ZmoeSource(tiny_zmoe)
    minimum = L.plan_memory(src, 10**9, context=128, overhead=OVERHEAD).minimum
    src.close()
    budget = minimum + 64 * 4096
    for prefetch in ("on", "off"):
        with zipmoe_rt.load(tiny_zmoe, memory_limit="1GB", memory_budget=budget, context=128,
                            policy="zip-lru", prefetch=prefetch) as m:
            p, line = m.memory_plan, m.memory_line()
            unused = 10**9 - (p.overhead + p.kv + p.buffers + p.activations + p.engine + budget)
            assert p.budget == budget and unused > 0
            assert (f"weight budget {size_text(budget)} + unused {unused / 1e6:.1f} MB "
                    f"(--memory-budget is smaller)") in line, line
            assert line.endswith(f"; prefetch {prefetch}; policy zip-lru"), line
    with zipmoe_rt.load(tiny_zmoe, memory_limit="1GB", context=128, policy="zip-lru") as m:
        line = m.memory_line()              # the limit's whole weight share: nothing unused
        assert "unused" not in line and f"weight budget {m.memory_plan.budget / 1e6:.1f} MB" \
            in line, line
    with zipmoe_rt.load(tiny_zmoe) as m:    # no budget: no expert cache to prefetch into
        assert "prefetch" not in m.memory_line()


# -- bench: peak RSS of a child process under a limit ---------------------------------------------
def test_bench_peak_rss_stays_within_the_limit(tiny_zmoe, home):
    """A real limit: the measured overhead, the KV cache and buffers plus 16 MB of weights; the
    child's VmHWM (from its start) must not pass it."""
    from zipmoe_rt import bench as B
    src = ZmoeSource(tiny_zmoe)
    fp = L.footprint(tiny_zmoe)                      # measured in a child process
    ov = fp["steady"]
    assert 0 < ov < fp["peak"]
    kv, buf = parts(src, max(8, 16 + 4))
    minimum = L.plan_memory(src, 10**9, context=20, overhead=ov).minimum
    src.close()
    # the tiny model's weights are small: the warm-up's peak, not the weights, may set the limit
    lim = max(ov + kv + buf + minimum + 16 * MB, fp["peak"] + 8 * MB)
    res = B.run(tiny_zmoe, [], ["zip-lru"], pp=8, tg=4, reps=1, limits=[str(lim)],
                log=lambda s: None)
    (row,) = res["rows"]
    assert row["limit_bytes"] == lim and row["budget_bytes"] == lim - ov - kv - buf
    assert row["memory"]["limit plan"]["warmup_peak"] == fp["peak"]
    assert 0 < row["peak_rss"] <= lim, (row["peak_rss"], lim)
    assert 0 < row["load_peak_rss"] <= lim, (row["load_peak_rss"], lim)
    assert f"/ {lim / 1e6:.0f} MB, load {row['load_peak_rss'] / 1e6:.0f} (within)" in B.table(res)


def test_activation_bytes_counts_one_prefill_batch():
    from zipmoe_rt.models.model import PREFILL_UBATCH
    hp = {"hidden_size": 576, "moe_intermediate_size": 1536, "intermediate_size": 1536,
          "num_experts_per_tok": 2}
    # 4 hidden-size rows + gate and up rows of top-k + 1 experts, float32, per token
    assert PREFILL_UBATCH == 512
    assert P.activation_bytes(hp) == 4 * 512 * (4 * 576 + 2 * 3 * 1536) == 23_592_960
    assert P.activation_bytes(dict(hp, shared_expert_intermediate_size=5632)) == \
        4 * 512 * (4 * 576 + 2 * 3 * 5632)
    # a limit sized for a shorter context holds a prefill batch of that many tokens
    assert P.activation_bytes(hp, 80) == 4 * 80 * (4 * 576 + 2 * 3 * 1536)
    assert P.activation_bytes(hp, 2048) == P.activation_bytes(hp, 512) == P.activation_bytes(hp)


def test_long_prompt_runs_in_prefill_batches(tiny_zmoe, monkeypatch):
    """A prompt over PREFILL_UBATCH tokens runs in batches of at most that many (what the
    limit's activation term assumes), with the logits of one call within float32 rounding."""
    from zipmoe_rt.api import load
    from zipmoe_rt.models import model as M
    monkeypatch.setattr(M, "PREFILL_UBATCH", 64)
    m = load(tiny_zmoe)
    try:
        ids = (np.arange(150, dtype=np.int64) * 7) % 50 + 3
        whole = m.net.forward(ids, m.net.new_cache(), last_only=False)[-1]
        seen = []
        real = m.net.embed_tokens
        monkeypatch.setattr(m.net, "embed_tokens", lambda t: (seen.append(len(t)), real(t))[1])
        c = m.net.new_cache()
        last = m.net.forward(ids, c, last_only=True)
        assert seen == [64, 64, 22] and c.offset == 150
        np.testing.assert_allclose(last, whole, atol=1e-4, rtol=0)
        assert int(np.argmax(last)) == int(np.argmax(whole))
    finally:
        m.close()
