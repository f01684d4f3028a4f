"""Option checks of ``zipmoe-rt run``/``chat``/``serve``/``perplexity``/``bench``: a context
beyond the trained length (one warning, as llama.cpp's ``n_ctx_train`` warning), an empty
``--stop`` string (an error naming the option), budget-only options (``--policy``,
``--eviction``, ``--prefetch``, ``--c-tier``) given without a memory budget (an error naming the
option, as ``--host-budget``), the sizes ``bench`` prints for budgets under 1 MB, and
``--c-tier`` under a budget (one warning where the policy has no C tier; ``C tier planes`` in the
banner's policy), progress bars off a terminal and ``bench``'s lines without a budgeted row.
In-process (click's CliRunner) on the tiny random Mixtral of test_cli.py (trained context 512
tokens)."""
from __future__ import annotations

import logging
import re
import time

import pytest

import zipmoe_rt
from zipmoe_rt.util import format_bytes

from cli_runner import cli
from test_cli import assert_one_line_error, tiny_src, tiny_zmoe  # noqa: F401 (fixtures)

TRAINED = 512          # tiny_models.COMMON's max_position_embeddings
WARNING = (f"zipmoe-rt: warning: -c/--ctx-size {{n}} is more than the {TRAINED} tokens the model "
           f"was trained on (n_ctx_train, its max_position_embeddings); output past that "
           f"position may degrade")


def _warnings(stderr: str) -> list[str]:
    return [l for l in stderr.splitlines() if l.startswith("zipmoe-rt: warning:")]


def test_tiny_model_has_the_trained_length_the_tests_assume(tiny_zmoe):
    m = zipmoe_rt.load(tiny_zmoe)
    try:
        assert int(m.hparams["max_position_embeddings"]) == TRAINED
    finally:
        m.close()


# -- 1. a context over the trained length -------------------------------------------------------
def test_run_ctx_size_over_the_trained_length_warns_once_and_runs(tiny_zmoe):
    plain = cli("run", tiny_zmoe, "-p", "hello there", "-n", 6)
    assert plain.exit_code == 0, plain.output
    assert _warnings(plain.stderr) == []
    for n in (TRAINED, 100):                       # within: no warning
        r = cli("run", tiny_zmoe, "-p", "hello there", "-n", 6, "-c", n)
        assert r.exit_code == 0 and _warnings(r.stderr) == [], r.stderr
    r = cli("run", tiny_zmoe, "-p", "hello there", "-n", 6, "--ctx-size", 4096)
    assert r.exit_code == 0, r.output
    assert _warnings(r.stderr) == [WARNING.format(n=4096)]
    assert r.stdout == plain.stdout                # allowed, and the same greedy reply


def test_chat_ctx_size_over_the_trained_length_warns_once(tiny_zmoe):
    r = cli("chat", tiny_zmoe, "-n", 4, "-c", TRAINED + 1, input="hi\nand again\n")
    assert r.exit_code == 0, r.output
    assert _warnings(r.stderr) == [WARNING.format(n=TRAINED + 1)]
    assert len(r.stdout.splitlines()) == 2         # both turns answered


def test_serve_ctx_size_over_the_trained_length_logs_one_warning(model, caplog):
    from zipmoe_rt.server.worker import ModelHost

    for ctx, want in ((TRAINED, []), (2048, [WARNING.format(n=2048)[len("zipmoe-rt: warning: "):]])):
        caplog.clear()
        host = ModelHost(lambda: model, close_model=False, ctx_size=ctx)
        with caplog.at_level(logging.INFO, logger="uvicorn.error"):
            host.start()
            deadline = time.monotonic() + 60
            while host.status == "loading" and time.monotonic() < deadline:
                time.sleep(0.01)
            host.close()
        assert host.status == "ok"
        got = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert got == want
        assert host.context_length == ctx          # allowed


@pytest.fixture(scope="module")
def model(tiny_zmoe):
    m = zipmoe_rt.load(tiny_zmoe)
    yield m
    m.close()


# -- 2. an empty stop string --------------------------------------------------------------------
@pytest.mark.parametrize("verb", ["run", "chat"])
@pytest.mark.parametrize("stops", [[""], ["ok", ""]])
def test_empty_stop_string_is_an_error_naming_the_option(tiny_zmoe, verb, stops):
    args = [a for s in stops for a in ("--stop", s)]
    extra = ("-p", "hello") if verb == "run" else ()
    r = cli(verb, tiny_zmoe, *extra, *args, input="hello\n")
    assert_one_line_error(r, "--stop", "empty stop string")
    assert r.stdout == ""


# -- 3. budget-only options without a budget ------------------------------------------------------
BUDGET_ONLY = [("--eviction", "lfu"), ("--policy", "zip-lru"), ("--prefetch", "on"),
               ("--prefetch", "off"), ("--eviction", "lru"), ("--c-tier", "planes"),
               ("--c-tier", "packed")]


@pytest.mark.parametrize("option, value", BUDGET_ONLY)
def test_budget_only_option_without_a_budget_is_an_error(tiny_zmoe, option, value):
    r = cli("run", tiny_zmoe, "-p", "hello", "-n", 3, option, value)
    line = assert_one_line_error(r, option, "--memory-budget", "--memory-limit")
    assert line.startswith(f"error: {option}: applies under a memory budget"), line
    assert_one_line_error(cli("chat", tiny_zmoe, option, value, input="hi\n"), option)


@pytest.mark.parametrize("option, value", BUDGET_ONLY)
def test_budget_only_option_with_a_budget_runs_as_without_it(tiny_zmoe, option, value):
    plain = cli("run", tiny_zmoe, "-p", "hello", "-n", 5)
    for budget in (("--memory-budget", "50%"), ("--memory-limit", "4GB")):
        r = cli("run", tiny_zmoe, "-p", "hello", "-n", 5, *budget, option, value)
        assert r.exit_code == 0, r.output
        assert r.stdout == plain.stdout            # bit-identical under a budget


def test_budget_only_option_errors_in_serve_perplexity_and_profile(tiny_zmoe, tmp_path,
                                                                    monkeypatch):
    import zipmoe_rt.server as server

    monkeypatch.setattr(server, "serve", lambda *a, **kw: pytest.fail("the server started"))
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    assert_one_line_error(cli("serve", tiny_zmoe, "--eviction", "tlfu"), "--eviction")
    text = tmp_path / "t.txt"
    text.write_text("the cat sat on the mat " * 8)
    assert_one_line_error(cli("perplexity", tiny_zmoe, text, "--policy", "zipmoe"), "--policy")
    prompts = tmp_path / "p.txt"
    prompts.write_text("hello\n")
    assert_one_line_error(cli("profile", tiny_zmoe, "--prompts", prompts, "-q", "--prefetch",
                              "on"), "--prefetch")


def test_bench_eviction_without_a_budgeted_row_is_an_error(tiny_zmoe, monkeypatch):
    from zipmoe_rt import bench as B

    monkeypatch.setattr(B, "run", lambda *a, **kw: pytest.fail("bench ran"))
    assert_one_line_error(cli("bench", tiny_zmoe, "-m", "none", "--eviction", "lfu"),
                          "--eviction")
    assert_one_line_error(cli("bench", tiny_zmoe, "-m", "none", "--c-tier", "planes"),
                          "--c-tier", "budgeted rows")


# -- 5. bench's budget sizes ------------------------------------------------------------------
@pytest.mark.parametrize("n, text", [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"),
                                     (196_608, "196.6 kB"), (999_949, "999.9 kB"),
                                     (1_000_000, "1 MB"), (600e6, "600 MB"),
                                     (12_345_678_901, "12346 MB")])
def test_format_bytes(n, text):
    assert format_bytes(n) == text


def test_bench_prints_a_budget_under_1_mb_with_its_unit(tiny_zmoe):
    from zipmoe_rt.engine.store import ZmoeSource
    from zipmoe_rt.loading import parse_size

    src = ZmoeSource(tiny_zmoe)
    try:
        nbytes = parse_size("25%", src)
    finally:
        src.close()
    assert 0 < nbytes < 1e6
    r = cli("bench", tiny_zmoe, "-m", "25%", "--policy", "zip-lru", "-p", 4, "-n", 2, "-r", 1)
    assert r.exit_code == 0, r.output
    want = f"25% ({nbytes / 1e3:.1f} kB)"
    rows = [l for l in r.stdout.splitlines() if l.startswith("| 25%")]
    assert len(rows) == 1 and rows[0].startswith(f"| {want} | zip-lru |"), r.stdout
    assert f"bench: budget {want}, policy zip-lru ..." in r.stderr.splitlines()
    assert "(0 MB)" not in r.stdout + r.stderr
    assert not re.search(r"\(0(\.0)? (MB|kB)\)", r.stdout)


# -- 6. --c-tier under a budget -----------------------------------------------------------------
@pytest.fixture(scope="module")
def traced_zmoe(tiny_zmoe, tmp_path_factory):
    """A copy of the tiny model with an activation trace beside it (policy zipmoe runs)."""
    import shutil
    own = tmp_path_factory.mktemp("traced") / "m.zmoe"
    shutil.copy(tiny_zmoe, own)
    prompts = own.with_name("prompts.txt")
    prompts.write_text("hello world\nthe cat sat on the mat\n")
    r = cli("profile", own, "--prompts", prompts, "-n", 4, "--raw", "-q")
    assert r.exit_code == 0, r.output
    return own


C_TIER_WARNING = ("zipmoe-rt: warning: --c-tier: no effect: policy {p} has no C tier (only "
                  "zipmoe's tiers have C slots)")


@pytest.mark.parametrize("policy", ["zip-lru", "auto"])
def test_c_tier_with_a_policy_without_c_slots_warns_once(tiny_zmoe, policy):
    plain = cli("run", tiny_zmoe, "-p", "hello", "-n", 5)
    args = ("run", tiny_zmoe, "-p", "hello", "-n", 5, "-m", "50%", "--policy", policy)
    r = cli(*args, "--c-tier", "planes")       # no trace: auto runs zip-lru
    assert r.exit_code == 0, r.output
    assert _warnings(r.stderr) == [C_TIER_WARNING.format(p="zip-lru")]
    assert r.stdout == plain.stdout
    assert _warnings(cli(*args).stderr) == []  # not given: no warning


def test_c_tier_planes_under_zipmoe_is_in_the_banner(traced_zmoe, tmp_path):
    import json
    import shutil

    from zipmoe_rt.engine import profile as prof

    # a stored calibration where the C tier is cheap, so the plan at 50 % has C slots whatever
    # this machine's load (without one, the plan follows a calibration measured at load)
    own = tmp_path / "m.zmoe"
    shutil.copy(traced_zmoe, own)
    shutil.copy(prof.sidecar(traced_zmoe, prof.TRACE_SUFFIX), prof.sidecar(own, prof.TRACE_SUFFIX))
    traced_zmoe = own
    r = cli("calibrate", own)
    assert r.exit_code == 0, r.output
    cpath = prof.sidecar(own, prof.CALIB_SUFFIX)
    c = json.loads(cpath.read_text())
    cpath.write_text(json.dumps(dict(c, c_matmul_s=c["matmul_s"], load_C_s=0.0,
                                     decode_s=c["decode_s"] / 10, layer_fixed_s=0.0)))
    plain = cli("run", traced_zmoe, "-p", "hello", "-n", 5)
    lines = {}
    for c in ("packed", "planes"):
        r = cli("run", traced_zmoe, "-p", "hello", "-n", 5, "-m", "50%", "--policy", "zipmoe",
                "--c-tier", c)
        assert r.exit_code == 0, r.output
        assert _warnings(r.stderr) == [], r.stderr
        assert r.stdout == plain.stdout            # bit-identical in either form
        lines[c] = [l for l in r.stderr.splitlines() if "; policy " in l]
        assert len(lines[c]) == 1, r.stderr
    assert lines["planes"][0] == lines["packed"][0] + ", C tier planes (decoded at every use)"
    assert lines["packed"][0].endswith("policy zipmoe"), lines["packed"]


# -- 7. progress bars on a terminal only ----------------------------------------------------------
def test_bench_builds_the_default_model_without_bars_off_a_terminal(monkeypatch):
    import zipmoe_rt.default_model as D
    from zipmoe_rt.cli import CliError

    asked = []

    def fake(progress=True):
        asked.append(progress)
        raise CliError("stop here")
    monkeypatch.setattr(D, "ensure_default_model", fake)
    assert_one_line_error(cli("bench", "-p", 4, "-n", 2), "stop here")
    assert asked == [False]                    # stderr is captured: not a terminal


# -- 8. bench without a budgeted row ---------------------------------------------------------------
def test_bench_unbudgeted_rows_say_no_budget_and_skip_nothing(tiny_zmoe):
    r = cli("bench", tiny_zmoe, "-m", "none", "--resident", "full", "--resident", "compressed",
            "-p", 4, "-n", 2, "-r", 1)
    assert r.exit_code == 0, r.output
    progress = [l for l in r.stderr.splitlines() if l.startswith("bench: ")]
    assert progress == ["bench: no budget, policy in-memory ...",
                        "bench: no budget, policy in-memory compressed ..."], r.stderr
    assert "None" not in r.stdout + r.stderr
    # a budgeted zipmoe row without a trace is still skipped, saying why
    r = cli("bench", tiny_zmoe, "-m", "25%", "--policy", "zipmoe", "--policy", "zip-lru",
            "-p", 4, "-n", 2, "-r", 1)
    assert r.exit_code == 0, r.output
    assert any(l.startswith("bench: skipping policy zipmoe: ") and "trace" in l
               for l in r.stderr.splitlines()), r.stderr
