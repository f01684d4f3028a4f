"""Kernels compiled in a child process before a load under a memory bound
(zipmoe_rt/engine/precompile.py): the child fills Numba's cache so that the loading process
compiles nothing; a stale kernel cache makes it run again and a filled one does not; a failing
child costs a warning, the kernels then compile in the loading process and the logits are the
same (and transformers').

Every check runs in a fresh interpreter with its own ``NUMBA_CACHE_DIR`` and cache folder, so
the shared kernel cache is never touched, and with a hard timeout.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from test_api import tiny_src, tiny_zmoe  # noqa: F401 - module fixtures

IDS = [1, 5, 9, 2, 7, 3]
TOL = 1e-3


def child(code: str, cache: Path, *args) -> dict:
    """Run ``code`` in a fresh interpreter whose Numba cache and zipmoe-rt cache folder are
    under ``cache`` (``args`` in ``sys.argv[1:]``); its last stdout line is JSON."""
    env = dict(os.environ, NUMBA_CACHE_DIR=str(cache / "numba"),
               ZIPMOE_RT_HOME=str(cache / "home"))
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(code), *map(str, args)],
                       capture_output=True, text=True, env=env, timeout=900)
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    out["stderr"] = r.stderr
    return out


# loads the model under a memory budget (no overhead-measuring children, which would fill the
# cache too: the loading process itself runs the kernels), counting the kernels this process
# compiles (Numba's "numba:compile" event: a kernel loaded from the cache sends none) and the
# cache hits, and prints the logits of IDS, then (with "ok") calibrates (counting its compiles
# apart); argv: model, ids (JSON), "fail" (the compiling child fails) or "ok"
LOAD = """
    import json, sys, warnings
    import numpy as np
    from numba.core import event
    from numba.core.registry import CPUDispatcher
    import zipmoe_rt
    from zipmoe_rt.engine import precompile as P

    path, ids, mode = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    compiled = []

    class Count(event.Listener):
        def on_start(self, ev):
            compiled.append(1)

        def on_end(self, ev):
            pass

    event.register("numba:compile", Count())
    calls = []
    real = P.precompile

    def run(p, timeout):
        calls.append(str(p))
        return (False, "exit status 3: boom") if mode == "fail" else real(p, timeout)
    P.precompile = run
    with warnings.catch_warnings(record=True) as w:
        warnings.simplefilter("always")
        m = zipmoe_rt.load(path, memory_budget="4GB", policy="zip-lru")
        logits = m.net.forward(np.asarray(ids, np.int64), m.net.new_cache(), last_only=False)
    in_load = len(compiled)
    if mode == "ok":    # a failed child's run is checked up to its logits: no calibration
        from zipmoe_rt.engine.calibration import calibrate
        from zipmoe_rt.engine.footprint import _parallel_thresholds
        with _parallel_thresholds(0):    # the parallel kernels, as a full-size model's calibration
            calibrate(m.source, samples=2)       # what a zipmoe run without MODEL.calib.json does
    hits = 0
    for name, mod in list(sys.modules.items()):
        if name.startswith(("zipmoe_rt", "zmoe")) and mod is not None:
            for v in list(vars(mod).values()):
                if isinstance(v, CPUDispatcher):
                    hits += sum(v.stats.cache_hits.values())
    print(json.dumps({"compiled": in_load, "calib_compiled": len(compiled) - in_load,
                      "hits": hits, "calls": calls,
                      "warnings": [f"{x.category.__name__}: {x.message}" for x in w],
                      "logits": np.asarray(logits, np.float64).tolist()}))
"""


def hf_reference(folder: Path) -> np.ndarray:
    from hf_parity import hf_logits
    from tiny_models import load_hf
    return hf_logits(load_hf(folder), IDS)


@pytest.fixture(scope="module")
def filled(tiny_zmoe, tmp_path_factory):
    """A cache folder a first load (cold: the compiling child ran) left, and that load's
    output."""
    cache = tmp_path_factory.mktemp("filled")
    return cache, child(LOAD, cache, tiny_zmoe, json.dumps(IDS), "ok")


def test_child_fills_the_cache_and_the_load_compiles_nothing(filled, tiny_zmoe, tiny_src):
    """On a cold cache the load runs the compiling child once; the loading process then loads
    every kernel it runs, and those of a calibration, from the cache (no compile, cache hits)
    and its logits are transformers'; a second load finds the cache filled and starts no
    child."""
    cache, got = filled
    assert got["calls"] == [str(tiny_zmoe.resolve())], got["calls"]
    assert got["compiled"] == 0 and got["calib_compiled"] == 0, got
    assert got["hits"] >= 10, got["hits"]
    assert not got["warnings"], got["warnings"]
    numba_dir = cache / "numba"
    assert len(list(numba_dir.rglob("*.nbi"))) >= 10
    markers = list(numba_dir.rglob("zipmoe-warm-*.json"))
    assert len(markers) == 1
    files = json.loads(markers[0].read_text())["index_files"]
    assert len(files) >= 10 and all(n.endswith(".nbi") for _, n in files)
    assert {r for r, _ in files} == {"kernels", "zmoe"}     # the container's decoder too
    again = child(LOAD, cache, tiny_zmoe, json.dumps(IDS), "ok")
    assert again["calls"] == [] and again["compiled"] == 0 and again["calib_compiled"] == 0
    assert np.asarray(again["logits"]).tobytes() == np.asarray(got["logits"]).tobytes()
    assert np.abs(np.asarray(got["logits"]) - hf_reference(tiny_src)).max() <= TOL


def test_failing_child_warns_and_the_run_compiles_in_process(filled, tiny_zmoe, tiny_src,
                                                            tmp_path):
    """A child that fails: one KernelCompileWarning naming why and the model, the kernels
    compile in the loading process, and the logits equal those of a load after a successful
    child (bit for bit) and transformers'."""
    bad = child(LOAD, tmp_path, tiny_zmoe, json.dumps(IDS), "fail")
    assert len(bad["calls"]) == 1 and bad["compiled"] > 0, bad
    warned = [w for w in bad["warnings"] if w.startswith("KernelCompileWarning")]
    assert len(warned) == 1 and "boom" in warned[0] and str(tiny_zmoe.resolve()) in warned[0]
    good = filled[1]
    assert np.asarray(bad["logits"]).tobytes() == np.asarray(good["logits"]).tobytes()
    assert np.abs(np.asarray(bad["logits"]) - hf_reference(tiny_src)).max() <= TOL


STALE = """
    import json, sys
    from zipmoe_rt import kernels
    from zipmoe_rt.engine import precompile as P
    from zipmoe_rt.engine.store import ZmoeSource

    src = ZmoeSource(sys.argv[1])
    calls = []

    def run(p, timeout):
        calls.append(str(p))
        return True, ""
    fresh = P.ensure_kernels(src, notice=False, run=run)
    stamp = kernels.kernel_cache_dir() / kernels.CACHE_STAMP
    stamp.write_text("0" * 40 + "\\n")                  # kernels built from other sources
    dropped = kernels.drop_stale_cache()
    ready = P.kernels_ready(P.warm_key(src))
    stale = P.ensure_kernels(src, notice=False, run=run)
    print(json.dumps({"fresh": fresh, "dropped": dropped, "ready": ready, "stale": stale,
                      "calls": calls}))
"""


def test_stale_stamp_runs_the_child_and_a_fresh_cache_does_not(filled, tiny_zmoe, tmp_path):
    """A filled cache starts no child; once its stamp names other kernel sources, its entries
    are dropped and the marker no longer counts: the child runs again (here a stand-in that
    compiles nothing, so the cache stays cold and the load is told so with a warning)."""
    shutil.copytree(filled[0], tmp_path / "c")
    got = child(STALE, tmp_path / "c", tiny_zmoe)
    assert got["fresh"] == "ready" and got["dropped"] >= 10 and got["ready"] is False
    assert got["stale"] == "failed" and got["calls"] == [str(tiny_zmoe.resolve())]
    assert "KernelCompileWarning" in got["stderr"] and "no complete kernel cache" in got["stderr"]


def test_marker_lists_missing_files_or_other_key_is_not_ready(tmp_path, monkeypatch):
    """kernels_ready: a marker naming a deleted index file, another key or unreadable JSON is
    not ready (checked on folders of this test's own, not Numba's)."""
    from zipmoe_rt.engine import precompile as P
    monkeypatch.setattr(P, "marker_path", lambda key: tmp_path / f"zipmoe-warm-{key}.json")
    monkeypatch.setattr(P, "kernel_cache_dirs", lambda: {"kernels": tmp_path})
    f = tmp_path / "k.nbi"
    f.write_bytes(b"x")
    (tmp_path / "zipmoe-warm-abc.json").write_text(json.dumps(
        {"key": "abc", "index_files": [["kernels", "k.nbi"]]}))
    assert P.kernels_ready("abc") is True
    assert P.kernels_ready("def") is False                   # no marker
    (tmp_path / "zipmoe-warm-def.json").write_text(json.dumps(
        {"key": "abc", "index_files": [["kernels", "k.nbi"]]}))
    assert P.kernels_ready("def") is False                   # a marker of another key
    (tmp_path / "zipmoe-warm-zz.json").write_text(json.dumps(
        {"key": "zz", "index_files": [["zmoe", "k.nbi"]]}))
    assert P.kernels_ready("zz") is False                    # a folder Numba did not name
    (tmp_path / "zipmoe-warm-bad.json").write_text("{not json")
    assert P.kernels_ready("bad") is False
    f.unlink()
    assert P.kernels_ready("abc") is False


def test_precompile_reports_a_failing_or_slow_child(tmp_path):
    """precompile: a model the child cannot open is a failure naming the child's exit status
    and its last error line; the timeout kills it and says so."""
    from zipmoe_rt.engine.precompile import precompile
    missing = tmp_path / "none.zmoe"
    ok, why = precompile(missing, timeout=300)
    assert ok is False and "exited with status 1" in why and "none.zmoe" in why, why
    ok, why = precompile(missing, timeout=0.01)
    assert ok is False and "did not finish within 0.01 s" in why


def test_unwritable_cache_folder_warns_and_starts_no_child(tmp_path, monkeypatch):
    """A kernel cache folder that cannot be written (``_writable`` False: this test may run
    as root, who writes anywhere): no child (it could not cache either), one
    KernelCompileWarning naming the folder and NUMBA_CACHE_DIR. A folder not made yet under a
    writable one counts as writable."""
    from types import SimpleNamespace

    from zipmoe_rt.engine import precompile as P
    assert P._writable(tmp_path / "not" / "yet") is True
    monkeypatch.setattr(P, "warm_key", lambda source: "k")
    monkeypatch.setattr(P, "marker_path", lambda key: tmp_path / "nb" / f"zipmoe-warm-{key}.json")
    monkeypatch.setattr(P, "_writable", lambda folder: False)
    calls = []
    with pytest.warns(P.KernelCompileWarning, match="NUMBA_CACHE_DIR") as w:
        got = P.ensure_kernels(SimpleNamespace(path="m.zmoe"), notice=False,
                               run=lambda p, t: calls.append(p) or (True, ""))
    assert got == "failed" and calls == [] and str(tmp_path / "nb") in str(w[0].message)


def _cold(monkeypatch, tmp_path, P):
    """A kernel cache that stays cold (no marker ever counts), in a folder of the test's own."""
    monkeypatch.setattr(P, "warm_key", lambda source: "k")
    monkeypatch.setattr(P, "marker_path", lambda key: tmp_path / "nb" / f"zipmoe-warm-{key}.json")
    monkeypatch.setattr(P, "kernels_ready", lambda key: False)


@pytest.mark.parametrize("terminal", [False, True])
def test_the_compile_notice_is_one_plain_line_where_stderr_is_not_a_terminal(
        tmp_path, monkeypatch, capsys, terminal):
    """While the child compiles: stderr piped or a file gets the one line PLAIN_NOTICE (a minute
    without output would look like a hang); a terminal the start and end lines; no notice when
    not asked for."""
    from types import SimpleNamespace

    from zipmoe_rt.engine import precompile as P
    _cold(monkeypatch, tmp_path, P)
    monkeypatch.setattr(sys.stderr, "isatty", lambda: terminal)     # (capsys' stream)
    ran: list = []
    monkeypatch.setattr(P, "kernels_ready", lambda key: bool(ran))   # filled once it ran
    src = SimpleNamespace(path="m.zmoe")

    def run(p, timeout):
        ran.append(p)
        return True, ""
    assert P.ensure_kernels(src, notice=True, run=run) == "compiled"
    err = capsys.readouterr().err.splitlines()
    if terminal:
        assert len(err) == 2 and err[0].startswith("compiling kernels once after install")
        assert re.fullmatch(r"kernels compiled in \d+ s", err[1]), err
    else:
        assert err == ["zipmoe-rt: compiling kernels for the first run (about a minute, cached "
                       "afterwards)"]
    monkeypatch.setattr(P, "kernels_ready", lambda key: False)
    with pytest.warns(P.KernelCompileWarning):
        assert P.ensure_kernels(src, notice=False, run=lambda p, t: (True, "")) == "failed"
    assert capsys.readouterr().err == ""


def test_a_piped_budgeted_run_says_the_kernels_compile(tiny_zmoe, tmp_path, monkeypatch):
    """``run --memory-budget`` with stderr not a terminal (no progress bars) on a cold kernel
    cache prints the plain notice line once while the child runs (here a stand-in that fails at
    once, so the kernels the test process already holds are used: no real compile)."""
    from cli_runner import cli
    from zipmoe_rt.engine import precompile as P
    _cold(monkeypatch, tmp_path, P)
    monkeypatch.setattr(P, "precompile", lambda path, timeout: (False, "a stand-in"))
    r = cli("run", tiny_zmoe, "-p", "hi", "-n", 2, "--memory-budget", "4GB")
    assert r.exit_code == 0, r.stderr
    assert r.stderr.splitlines().count("zipmoe-rt: compiling kernels for the first run (about "
                                       "a minute, cached afterwards)") == 1, r.stderr
    assert "kernels compiled in" not in r.stderr
