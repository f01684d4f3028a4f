"""The command line as a llama.cpp user expects it: sampling defaults from the model's
generation_config.json, ``-t/--threads``, ``-c/--ctx-size``, ``--stop``, ``--seed -1``, the
bundled model as every verb's default, clear errors for files that are not ``.zmoe``, and the
REPL under a real pseudo-terminal (idle CPU, Ctrl-C with SIGINT ignored at start, multi-line
paste, Ctrl-D, /reset, banner). Models: the tiny random Mixtral of test_cli.py."""
from __future__ import annotations

import os
import re
import shutil
import sys
import time
from pathlib import Path

import pytest

import zipmoe_rt
from zipmoe_rt import cli_repl
from zipmoe_rt.default_model import DEFAULT_MODEL_NAME

from test_api import make_chat_model
from cli_pty import cli_argv, driving, repl_env
from test_cli import assert_one_line_error, cli, stats_of, user
from test_cli import model, tiny_src, tiny_zmoe  # noqa: F401  (module-scoped fixtures)


@pytest.fixture(scope="module")
def greedy_zmoe(tiny_zmoe) -> Path:
    """The tiny chat model whose generation_config.json says ``do_sample: false`` (test_cli.py's
    ``tiny_zmoe``)."""
    return tiny_zmoe


@pytest.fixture(scope="module")
def plain_zmoe(tiny_src, tmp_path_factory) -> Path:
    """The same weights without generation_config.json (the model says nothing on sampling)."""
    return make_chat_model(tiny_src, tmp_path_factory.mktemp("clirepl") / "tiny-plain")


# -- sampling defaults (item 5) -----------------------------------------------------------------
def test_sampling_defaults_follow_generation_config():
    given = dict(temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                 seed=None)
    # the model asks for greedy decoding
    sp = cli_repl.resolve_sampling({"do_sample": False, "temperature": 0.7}, given, 9)
    assert sp["temperature"] == 0.0 and sp["max_tokens"] == 9 and sp["repetition_penalty"] == 1.0
    # the model asks for sampling: its values, transformers' defaults where unset
    sp = cli_repl.resolve_sampling({"do_sample": True, "temperature": 0.6, "top_p": 0.95,
                                    "repetition_penalty": 1.1}, given, 5)
    assert (sp["temperature"], sp["top_k"], sp["top_p"], sp["min_p"],
            sp["repetition_penalty"]) == (0.6, 50, 0.95, 0.0, 1.1)
    # the model says nothing: llama.cpp's defaults, the file's values where it has them
    sp = cli_repl.resolve_sampling({"eos_token_id": 2, "top_k": 20}, given, 5)
    assert (sp["temperature"], sp["top_k"], sp["top_p"], sp["min_p"]) == (0.8, 20, 0.95, 0.05)
    # options given win; --temp 0 is greedy; --seed -1 is random (None)
    sp = cli_repl.resolve_sampling({"do_sample": True}, dict(given, temperature=0.0, seed=-1), 5)
    assert sp["temperature"] == 0.0 and sp["seed"] is None
    sp = cli_repl.resolve_sampling(None, dict(given, top_k=3, seed=7), 5)
    assert sp["top_k"] == 3 and sp["seed"] == 7 and sp["temperature"] == 0.8


def test_a_model_without_sampling_advice_samples(plain_zmoe):
    with zipmoe_rt.load(plain_zmoe) as m:
        want = m.chat([user("hello")], max_tokens=16, temperature=0.8, top_k=40, top_p=0.95,
                      min_p=0.05, seed=3)
        greedy = m.chat([user("hello")], max_tokens=16)
    r = cli("run", plain_zmoe, "-p", "hello", "-n", 16, "--seed", 3)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == want + "\n"
    assert want != greedy
    g = cli("run", plain_zmoe, "-p", "hello", "-n", 16, "--temp", 0)
    assert g.stdout == greedy + "\n"


def test_invalid_sampling_values_of_the_file_are_named_and_overridable():
    given = dict(temperature=None, top_k=None, top_p=None, min_p=None, repetition_penalty=None,
                 seed=None)
    bad = {"do_sample": True, "temperature": -5, "top_p": 7}
    with pytest.raises(ValueError) as e:
        cli_repl.resolve_sampling(bad, given, 5, where="m.zmoe")
    assert str(e.value) == "m.zmoe: generation.config: temperature: must be in [0.0, inf], got -5"
    # the user's value of a field replaces the file's, which is then not checked
    with pytest.raises(ValueError) as e:
        cli_repl.resolve_sampling(bad, dict(given, temperature=0.7), 5, where="m.zmoe")
    assert str(e.value) == "m.zmoe: generation.config: top_p: must be in [0.0, 1.0], got 7"
    sp = cli_repl.resolve_sampling(bad, dict(given, temperature=0.7, top_p=0.9), 5, where="m.zmoe")
    assert (sp["temperature"], sp["top_k"], sp["top_p"]) == (0.7, 50, 0.9)
    # greedy (--temp 0) uses neither top_p nor top_k nor min_p: the file's are not checked
    sp = cli_repl.resolve_sampling(bad, dict(given, temperature=0.0), 5, where="m.zmoe")
    assert (sp["temperature"], sp["top_k"], sp["top_p"], sp["min_p"]) == (0.0, 0, 1.0, 0.0)
    # the server's defaults likewise
    from zipmoe_rt.sampling import SamplingParams
    with pytest.raises(ValueError, match=r"^m\.zmoe: generation\.config: temperature: "):
        SamplingParams.from_generation_config(bad, where="m.zmoe", max_tokens=4)
    assert SamplingParams.from_generation_config(bad, where="m.zmoe", temperature=0).greedy


def test_run_names_the_file_of_invalid_sampling_values(tiny_src, tmp_path):
    bad = make_chat_model(tiny_src, tmp_path / "badgen", generation_config={
        "do_sample": True, "temperature": -5, "top_p": 7})
    assert_one_line_error(cli("run", bad, "-p", "hello", "-n", 2),
                          f"{bad}: generation.config: temperature: must be in [0.0, inf], got -5")
    assert_one_line_error(cli("run", bad, "-p", "hello", "-n", 2, "--temp", 0.5),
                          f"{bad}: generation.config: top_p: must be in [0.0, 1.0], got 7")
    with zipmoe_rt.load(bad) as m:
        greedy = m.chat([user("hello")], max_tokens=4)
    r = cli("run", bad, "-p", "hello", "-n", 4, "--temp", 0)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == greedy + "\n"


# -- llama.cpp option names (item 6) --------------------------------------------------------------
def test_threads_option(model, greedy_zmoe):
    import numba
    want = model.chat([user("hello")], max_tokens=12) + "\n"
    before = numba.get_num_threads()
    try:
        for spelled in ("-t", "--threads"):
            r = cli("run", greedy_zmoe, "-p", "hello", "-n", 12, spelled, 1)
            assert r.exit_code == 0 and r.stdout == want, r.stderr
            assert numba.get_num_threads() == 1
    finally:
        numba.set_num_threads(before)
    most = numba.config.NUMBA_NUM_THREADS
    assert_one_line_error(cli("run", greedy_zmoe, "-p", "hi", "-t", most + 1), "--threads",
                          str(most + 1))


def test_seed_minus_one_is_random_and_below_is_refused(greedy_zmoe):
    r = cli("run", greedy_zmoe, "-p", "hello", "-n", 4, "--temp", 0.9, "--seed", -1)
    assert r.exit_code == 0, r.stderr
    assert_one_line_error(cli("run", greedy_zmoe, "-p", "hi", "--seed", -2), "--seed")


def test_stop_strings_end_the_reply_and_are_not_printed(model, greedy_zmoe):
    full = model.chat([user("tell me a story")], max_tokens=40)
    assert len(full) > 12, full
    stop = full[6:9]
    first = full.find(stop)
    r = cli("run", greedy_zmoe, "-p", "tell me a story", "-n", 40, "--stop", "@@never@@",
            "--stop", stop)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == full[:first] + "\n"
    assert stats_of(r.stderr)[3] == "stop"


def test_chat_keeps_only_the_text_before_a_stop_string_for_the_next_turn(model, greedy_zmoe):
    """``chat --stop S``: the reply printed ends before S, and the conversation keeps exactly
    that text as the assistant's turn (as llama.cpp's server and OpenAI return it and a client
    sends it back), so the next reply is the one a fresh conversation of the printed messages
    gives."""
    from test_cli import assistant

    full = model.chat([user("tell me a story")], max_tokens=40)
    assert len(full) > 12 and "\n" not in full, full
    stop = full[6:9]
    shown = full[:full.find(stop)]
    r = cli("chat", greedy_zmoe, "-n", 40, "--stop", stop, input="tell me a story\nand then\n")
    assert r.exit_code == 0, r.stderr
    want = model.chat([user("tell me a story"), assistant(shown), user("and then")],
                      max_tokens=40)
    if stop in want:
        want = want[:want.find(stop)]
    assert r.stdout.splitlines() == [shown, want]


@pytest.mark.parametrize("stops, pieces, want", [
    (["END"], ["ab", "cE", "N", "Dxyz"], ["ab", "c"]),        # across pieces, held back
    (["END"], ["abEN", "d"], ["ab", "ENd"]),                   # a false start is released
    (["x", "yz"], ["aby", "zq"], ["ab"]),                      # the first one to appear
    ([], ["a", "b"], ["a", "b"]),
])
def test_stop_at(stops, pieces, want):
    closed = []

    def gen():
        try:
            yield from pieces
        finally:
            closed.append(True)
    assert list(cli_repl.stop_at(gen(), stops)) == want
    assert closed == [True]


def test_ctx_size(model, greedy_zmoe):
    n = len(model.tokenizer.encode_chat([user("tell me a story")], add_generation_prompt=True))
    r = cli("run", greedy_zmoe, "-p", "tell me a story", "-c", n)
    assert_one_line_error(r, f"{n} tokens", f"context of {n} tokens", "--ctx-size")
    # room for 4 more: 5 tokens are sampled (the last one is never fed)
    r = cli("run", greedy_zmoe, "-p", "tell me a story", "-n", 100, "--ctx-size", n + 4)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == model.chat([user("tell me a story")], max_tokens=5) + "\n"
    assert stats_of(r.stderr) == (n, 0, 5, "length")
    # the default: the model's trained context (capped by free memory)
    assert cli_repl.context_size(model, None) <= model.hparams["max_position_embeddings"]
    assert_one_line_error(cli("run", greedy_zmoe, "-p", "hi", "-c", 0), "--ctx-size")


def test_chat_turn_over_the_context_is_an_error_and_the_conversation_goes_on(greedy_zmoe):
    r = cli("chat", greedy_zmoe, "-n", 3, "-c", 60, input="hi\n" + "word " * 80 + "\nhi\n")
    assert r.exit_code == 1, r.stderr             # a scripted chat says a turn was refused
    assert re.search(r"error: prompt: \d+ tokens do not fit the context of 60 tokens", r.stderr)
    assert len(r.stdout.splitlines()) == 2      # the first and the last turn were answered


# -- default model, files, bench, convert, inspect (items 7, 9) ----------------------------------
@pytest.mark.parametrize("verb", ["inspect", "verify", "export"])
def test_verbs_default_to_the_bundled_model(verb, greedy_zmoe, tmp_path, monkeypatch):
    home = tmp_path / "home"
    home.mkdir()
    shutil.copy(greedy_zmoe, home / DEFAULT_MODEL_NAME)
    monkeypatch.setenv("ZIPMOE_RT_HOME", str(home))
    args = [verb] + (["-o", tmp_path / "out"] if verb == "export" else [])
    r = cli(*args)
    assert r.exit_code == 0, r.stderr
    if verb == "export":
        assert (tmp_path / "out" / "config.json").exists()
    else:
        assert str(home / DEFAULT_MODEL_NAME) in r.stdout


@pytest.mark.parametrize("verb", ["profile", "calibrate"])
def test_profile_and_calibrate_take_no_model_argument(verb):
    r = cli(verb, "--help")
    assert "MODEL: a .zmoe file (default: the bundled" in r.stdout
    assert "[MODEL]" in r.stdout


def test_non_zmoe_files_get_a_hint_to_convert(tmp_path):
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF\x03\x00\x00\x00" + bytes(64))
    st = tmp_path / "model.safetensors"
    st.write_bytes(b"\x08\x00\x00\x00\x00\x00\x00\x00{}      " + bytes(32))
    for verb in ("run", "inspect"):
        args = [verb, gguf] + (["-p", "hi"] if verb == "run" else [])
        assert_one_line_error(cli(*args), str(gguf), "GGUF files are not run directly",
                              "zipmoe-rt convert HF_DIR -o model.zmoe")
    assert_one_line_error(cli("run", st, "-p", "hi"), str(st), "not a .zmoe",
                          "zipmoe-rt convert HF_DIR -o model.zmoe")


def test_bench_with_nothing_to_run_fails():
    assert_one_line_error(cli("bench", "-p", 0, "-n", 0), "nothing to run")


def test_convert_into_a_missing_folder_is_an_error(tiny_src, tmp_path):
    out = tmp_path / "no" / "such" / "m.zmoe"
    assert_one_line_error(cli("convert", tiny_src, "-o", out), str(out.parent), "--output",
                          "does not exist")
    assert not (tmp_path / "no").exists()


def test_inspect_columns_line_up(greedy_zmoe):
    r = cli("inspect", greedy_zmoe)
    lines = r.stdout.splitlines()
    meta = lines[lines.index("metadata:") + 1:]
    meta = meta[:next(i for i, l in enumerate(meta) if not l.startswith("  "))]
    assert len(meta) > 10
    # the type column starts at the same place on every row, past the longest key
    starts = {re.match(r"  (\S+) +", l).end() for l in meta}
    assert len(starts) == 1
    assert starts.pop() > max(len(l.split()[0]) for l in meta) + 2
    t = lines.index(next(l for l in lines if l.startswith("tensors:")))
    rows = [l for l in lines[t + 1:] if l.startswith("  ") and not l.startswith("  expert ")
            and not l.startswith("  dense ")][:40]
    assert len({re.match(r"  (\S+) +", l).end() for l in rows}) == 1


# -- the REPL in a pseudo-terminal (items 1, 2, 8) -------------------------------------------------
def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@pytest.mark.skipif(sys.platform != "linux", reason="needs a POSIX pty and /proc")
def test_repl_paste_reset_and_ctrl_d(greedy_zmoe):
    argv = cli_argv() + ["chat", str(greedy_zmoe), "-n", "8", "--system", "be brief"]
    with driving(argv, repl_env(), limit_s=400) as proc:
        proc.expect(rb"zipmoe-rt chat: tiny-chat \(MixtralForCausalLM, 4 experts, top-2\) on "
                    rb"cpu; context 512 tokens\r?\nno memory limit, no weight budget \(every "
                    rb"expert kept once decoded\); policy ")
        proc.expect(rb">>> ")
        # a paste of three lines arrives at once: one turn
        proc.send(b"first line\rsecond line\rthird line\r")
        proc.expect(rb"\[\d+ prompt \+ 0 cached tokens, \d+ generated")
        proc.expect(rb">>> ")
        proc.send(b"/stats\r")
        proc.expect(rb"conversation: 2 messages")
        proc.expect(rb">>> ")
        # a long prompt shows a line while it is prefilled (erased when the reply starts)
        proc.send(b"word " * 150 + b"\r")             # ~300 tokens of the tiny tokenizer
        m = proc.expect(rb"\(prefilling (\d+) tokens\.\.\.\)")
        assert int(m.group(1)) >= 256
        proc.expect(rb"\[(\d+) prompt \+ \d+ cached tokens")
        proc.expect(rb">>> ")
        proc.send(b"/reset\r")
        proc.expect(rb"\(conversation cleared; system prompt kept: 'be brief'\)")
        proc.expect(rb">>> ")
        proc.send(b"\x04")                           # Ctrl-D leaves on a fresh line
        proc.expect(rb"\r?\n")
        assert proc.wait() == 0
        assert proc.buf.endswith(b"\n"), proc.buf[-200:]


@pytest.mark.skipif(sys.platform != "linux", reason="needs a POSIX pty and /proc")
def test_idle_repl_leaves_the_cores_alone(default_zmoe):
    """Unbudgeted runs let OpenMP workers spin between parallel regions (fast decode); once
    a reply is done they must go to sleep: the REPL waiting at its prompt used 60-100 % of a
    core. The default model (unlike the tiny one) is large enough for the parallel kernels."""
    argv = cli_argv() + ["chat", str(default_zmoe), "-n", "4", "--temp", "0"]
    with driving(argv, repl_env(), limit_s=500) as proc:
        proc.expect(rb">>> ", guard_s=400)
        proc.send(b"hello\r")
        proc.expect(rb"\[\d+ prompt \+ 0 cached tokens, 4 generated", guard_s=300)
        proc.expect(rb">>> ")
        assert proc.blocked_reading()
        time.sleep(1.5)                              # the bounded spin after the last token ends
        c0 = _cpu_seconds(proc.pid)
        time.sleep(3.0)
        used = _cpu_seconds(proc.pid) - c0
        assert used < 0.3, f"the idle REPL used {used:.2f} CPU seconds in 3 s"
        proc.send(b"/quit\r")
        assert proc.wait() == 0


@pytest.mark.skipif(sys.platform != "linux", reason="needs a POSIX pty and /proc")
def test_repl_ctrl_c_works_when_started_with_sigint_ignored(greedy_zmoe):
    # -n and -c this large: the reply runs until Ctrl-C (the hard time limit guards a hang)
    argv = cli_argv() + ["chat", str(greedy_zmoe), "-n", "1000000", "-c", "1000000"]
    with driving(argv, repl_env(), limit_s=300, ignore_sigint=True) as proc:
        proc.expect(rb">>> ")
        proc.send(b"hello world\r")
        proc.expect(rb"hello world\r?\n")
        proc.read_at_least(200)
        proc.send(b"\x03")
        proc.expect(rb" \[stopped\]\r?\n")
        proc.expect(rb"\(stopped\)")
        proc.expect(rb">>> ")
        proc.send(b"/quit\r")
        assert proc.wait() == 0


# -- the kernel warm-up (item 4) ---------------------------------------------------------------------
def test_warm_up_says_when_kernels_compile_and_runs_them_before_the_prompt(capsys):
    """The notice comes from Numba's compile event: shown while a kernel compiles, not when
    it is already compiled (or loaded from Numba's on-disk cache, which sends no event)."""
    from types import SimpleNamespace

    import numba
    import numpy as np

    @numba.njit
    def kernel(ids):   # a fresh function: compiled on its first call
        return ids.sum() + 1

    calls = []

    class Net:
        def new_cache(self, max_tokens=None):
            return []

        def forward(self, ids, cache, last_only=True):
            calls.append((ids.tolist(), kernel(ids)))
            return np.zeros(4, np.float32)

    m = SimpleNamespace(device="cpu", net=Net(), ctx_size=3,
                        tokenizer=SimpleNamespace(bos_token_id=5, eos_token_id=7))
    cli_repl.warm_up(m, notice=True)
    err = capsys.readouterr().err
    assert "compiling kernels (first run only)..." in err
    assert re.search(r"kernels compiled in \d+ s", err)
    assert calls == [([5, 7], 13), ([5], 6)]        # a prefill of two ids, then a decode step
    cli_repl.warm_up(m, notice=True)
    assert capsys.readouterr().err == ""
    assert len(calls) == 4


def test_warm_up_prefill_reaches_the_parallel_attention_kernel(model):
    from zipmoe_rt.kernels.attention import ATTN_PAR_MIN
    h = model.hparams
    n = cli_repl.warm_up_tokens(model)
    hd = h.get("head_dim") or h["hidden_size"] // h["num_attention_heads"]
    assert n * n * h["num_attention_heads"] * hd >= ATTN_PAR_MIN or n == 256
    assert n >= 2


# -- progress bars and the first build (items 7, 9) ----------------------------------------------------
def test_no_progress_bars_off_a_terminal(tiny_src, greedy_zmoe, tmp_path):
    """Without -q, standard error not a terminal (CliRunner's): no tqdm bar (``%|``, ``it/s``)."""
    r = cli("convert", tiny_src, "-o", tmp_path / "m.zmoe", "--chunks", 2)
    assert r.exit_code == 0, r.stderr
    v = cli("verify", greedy_zmoe)
    assert v.exit_code == 0 and "OK" in v.stdout
    for err in (r.stderr, v.stderr):
        assert "%|" not in err and "it/s" not in err and "tensor/s" not in err, err


def test_first_build_of_the_default_model_says_where_it_went(greedy_zmoe, tmp_path,
                                                              monkeypatch, capsys):
    import zipmoe_rt.convert.converter as converter
    import zipmoe_rt.convert.smollm2 as smollm2
    from zipmoe_rt import default_model

    monkeypatch.setenv("ZIPMOE_RT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(smollm2, "locate_smollm2_gguf", lambda d, progress: d / "x.gguf")
    monkeypatch.setattr(smollm2, "build_upcycled_checkpoint", lambda gguf, out, progress: out)
    monkeypatch.setattr(converter, "convert",
                        lambda hf, path, progress: shutil.copy(greedy_zmoe, path))
    path = default_model.ensure_default_model(progress=False)
    assert path == tmp_path / "home" / DEFAULT_MODEL_NAME and path.exists()
    assert f"default model written to {path}" in capsys.readouterr().err
    assert default_model.ensure_default_model(progress=False) == path    # built: nothing said
    assert capsys.readouterr().err == ""


def test_scripted_backslash_continues_the_turn(model, greedy_zmoe):
    """``echo -e 'hello \\\\\\nworld' | zipmoe-rt chat``: a line ending in a backslash continues
    on the next in scripted input too, as on a terminal: one turn "hello \\nworld" (the reply
    of that one message), not two turns, the first ending in a backslash."""
    r = cli("chat", greedy_zmoe, "-n", 3, input="hello \\\nworld\n")
    assert r.exit_code == 0, r.stderr
    want = model.chat([{"role": "user", "content": "hello \nworld"}], max_tokens=3)
    assert r.stdout.splitlines() == [want]
    # a backslash on the last line of input ends the turn there
    r = cli("chat", greedy_zmoe, "-n", 3, input="hello\\")
    assert r.exit_code == 0, r.stderr
    assert r.stdout.splitlines() == [model.chat([{"role": "user", "content": "hello"}],
                                                max_tokens=3)]


@pytest.mark.skipif(sys.platform != "linux", reason="needs a POSIX pty")
def test_repl_ctrl_c_during_a_long_prefill_cancels_the_turn(model, greedy_zmoe):
    """A real Ctrl-C while the first turn's long prompt (a long system prompt) is prefilled:
    one notice line, nothing in the conversation or the KV cache, and the next turn's reply is
    that of a conversation that never had the cancelled turn."""
    system = "once upon a time " * 250          # ~3,300 tokens: seconds of prefill here
    want = model.chat([{"role": "system", "content": system}, user("hello world")],
                      max_tokens=3)
    argv = cli_argv() + ["chat", str(greedy_zmoe), "-n", "3", "-c", "100000",
                         "--system", system]
    with driving(argv, repl_env(), limit_s=300) as proc:
        proc.expect(rb">>> ")
        proc.send(b"hi\r")
        proc.expect(rb"\(prefilling \d+ tokens\.\.\.\)")
        proc.send(b"\x03")                       # Ctrl-C: SIGINT to the foreground group
        proc.expect(re.escape(cli_repl.CANCELLED_TURN.encode()))
        proc.expect(rb">>> ")
        proc.send(b"/stats\r")
        proc.expect(rb"conversation: 0 messages, 0 tokens in the KV cache")
        proc.expect(rb">>> ")
        proc.send(b"hello world\r")
        proc.expect(rb"hello world\r?\n")
        proc.expect(re.escape(want.replace("\n", "\r\n").encode()) +
                    rb"\r?\n(?:\x1b\[2m)?\[\d+ prompt \+ 0 cached tokens, 3 generated \(length\)")
        proc.expect(rb">>> ")
        proc.send(b"/quit\r")
        assert proc.wait() == 0
    assert b"[stopped]" not in proc.buf and b"Traceback" not in proc.buf
