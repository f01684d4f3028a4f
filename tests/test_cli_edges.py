"""What a new user meets at the edges of the command line and the server: the token counts of
``run`` / ``chat`` against ``serve``'s usage, the same config.json error from ``plan`` and
``convert``, one minimum weight budget behind ``--memory-budget`` and ``--memory-limit``.
Models: the tiny random Mixtral and Qwen2-MoE of tests/tiny_models.py, built at test time."""
from __future__ import annotations

import json
import os
import re
import shutil
import sys
import time

import pytest

import zipmoe_rt

from test_api import _greedy_ids, make_chat_model
from test_cli import assert_one_line_error, cli, stats_of, user
from test_cli import tiny_src, tiny_zmoe  # noqa: F401  (module-scoped fixtures)
from test_cli_repl import greedy_zmoe  # noqa: F401  (a module-scoped fixture)

MB = 10**6


# -- the stop token is counted alike by run/chat and serve ----------------------------------------
@pytest.fixture(scope="module")
def eos_zmoe(tiny_src, greedy_zmoe, tmp_path_factory):
    """The tiny model with its k-th greedy token as EOS: every greedy reply to "hello world"
    ends with that stop token after k tokens. Returns (path, k)."""
    msgs = [user("hello world")]
    with zipmoe_rt.load(greedy_zmoe) as m:
        toks = _greedy_ids(m, m.tokenizer.encode_chat(msgs), 12)
    k = next(i for i in range(2, len(toks)) if toks[i] not in toks[:i])
    path = make_chat_model(tiny_src, tmp_path_factory.mktemp("edges") / "tiny-eos",
                           generation_config={"do_sample": False, "eos_token_id": toks[k]})
    return path, k


def test_run_and_serve_count_the_stop_token_alike(eos_zmoe):
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    from test_server import HARD_LIMIT_S, _host, _wait_ready, running
    from zipmoe_rt.server.app import create_app

    path, k = eos_zmoe
    r = cli("run", path, "-p", "hello world", "-n", 50)
    assert r.exit_code == 0, r.stderr
    _, _, generated, why = stats_of(r.stderr)
    assert why == "stop"
    with zipmoe_rt.load(path) as m:
        m.chat([user("hello world")], max_tokens=50)
        st = m.last_stats
        assert (st.finish_reason, st.output_tokens, st.generated_tokens) == ("stop", k, k + 1)
        app = create_app(_host(m, queue_size=4))
        with running(app) as base:
            _wait_ready(base)
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused",
                                   timeout=HARD_LIMIT_S, max_retries=0)
            reply = client.chat.completions.create(model="tiny", messages=[user("hello world")],
                                                   max_tokens=50)
    assert reply.choices[0].finish_reason == "stop"
    # llama.cpp's server counts the EOS token in completion_tokens (n_decoded); so do both
    assert reply.usage.completion_tokens == generated == k + 1


# -- plan and convert refuse decoder_sparse_step 0 the same way -----------------------------------
def test_plan_and_convert_refuse_decoder_sparse_step_zero(tiny_moe_dir, tmp_path):
    src = tmp_path / "qwen2-moe"
    shutil.copytree(tiny_moe_dir("qwen2_moe"), src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["decoder_sparse_step"] = 0
    (src / "config.json").write_text(json.dumps(cfg))
    planned = assert_one_line_error(cli("plan", src), "config.json", "decoder_sparse_step")
    converted = assert_one_line_error(cli("convert", src, "-o", tmp_path / "out.zmoe"),
                                      "config.json", "decoder_sparse_step")
    assert planned == converted
    assert f"{src / 'config.json'}: decoder_sparse_step must be at least 1" in planned
    assert not (tmp_path / "out.zmoe").exists()
    # the step that transformers' Qwen2MoeDecoderLayer reads: 2 makes layers 1, 3, ... sparse
    cfg.update(decoder_sparse_step=2, mlp_only_layers=[], num_hidden_layers=3)
    (src / "config.json").write_text(json.dumps(cfg))
    r = cli("plan", src)
    assert r.exit_code == 0 and "3 layers (1 MoE)" in r.stdout, r.output


# -- --memory-budget and --memory-limit state one minimum ------------------------------------------
def test_budget_and_limit_state_the_same_minimum(greedy_zmoe, tmp_path, monkeypatch):
    from zipmoe_rt.engine import limit as L
    from zipmoe_rt.engine import memparts as P
    from zipmoe_rt.engine.pipeline import budget_split
    from zipmoe_rt.engine.store import ZmoeSource
    from zipmoe_rt.engine.tiers import BudgetError, smallest_budget

    monkeypatch.setenv("ZIPMOE_RT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(L, "fixed_overhead", lambda path, measure=None, **kw: 50 * MB)
    monkeypatch.setattr(L, "warmup_peak", lambda path, measure=None, **kw: 0)   # not the point here

    def minimums(b, l):
        return (re.search(r"at least (\d+\.\d) MB is needed", b).group(1),
                re.search(r"smallest weight budget (\d+\.\d) MB", l).group(1))

    # on the command line
    rb = assert_one_line_error(cli("run", greedy_zmoe, "-p", "hi", "--memory-budget", "10kB"),
                               "--memory-budget 10000 bytes")
    rl = assert_one_line_error(cli("run", greedy_zmoe, "-p", "hi", "--memory-limit", "10kB"),
                               "--memory-limit 10000 bytes")
    b, l = minimums(rb, rl)
    assert b == l
    # the size printed is enough, 0.1 MB less is not
    r = cli("run", greedy_zmoe, "-p", "hi", "-n", 2, "--memory-budget", f"{b}MB")
    assert r.exit_code == 0, r.stderr
    assert_one_line_error(cli("run", greedy_zmoe, "-p", "hi", "--memory-budget",
                              f"{float(b) - 0.1:.1f}MB"), f"at least {b} MB")
    # a minimum that rounds down to the nearest 0.1 MB (120.54 MB) is stated rounded up by both
    src = ZmoeSource(greedy_zmoe)
    try:
        extra = 120_540_000 - smallest_budget(src)
        dense = src.dense_bytes()
        src.dense_bytes = lambda: dense + extra
        assert smallest_budget(src) == 120_540_000
        with pytest.raises(BudgetError) as eb:
            budget_split(src, MB)
        with pytest.raises(L.MemoryLimitError) as el:
            L.plan_memory(src, MB, context=64, overhead=50 * MB)
        assert minimums(str(eb.value), str(el.value)) == ("120.6", "120.6")
        need = 50 * MB + P.kv_bytes(src.hparams, 64) + P.read_buffer_bytes(src) + \
            P.activation_bytes(src.hparams, 64) + L.ENGINE_HEADROOM + 120_540_000
        at_least = re.search(r": at least (\d+\.\d) MB$", str(el.value)).group(1)
        assert float(at_least) * MB >= need > (float(at_least) - 0.1) * MB
        L.plan_memory(src, f"{at_least}MB", context=64, overhead=50 * MB)   # enough
        # a limit below the kernels' warm-up peak states the one minimum too: the larger of
        # the peak and the parts plus the smallest budget (a limit of the peak alone would
        # be refused next)
        for peak in (need - 20 * MB, need + 20 * MB):
            with pytest.raises(L.MemoryLimitError) as ep:
                L.plan_memory(src, MB, context=64, overhead=50 * MB, peak=peak)
            said = re.search(r"give at least (\d+\.\d) MB$", str(ep.value)).group(1)
            assert "smallest weight budget 120.6 MB" in str(ep.value)
            assert float(said) * MB >= max(peak, need) > (float(said) - 0.1) * MB
            L.plan_memory(src, f"{said}MB", context=64, overhead=50 * MB, peak=peak)
    finally:
        src.close()


# -- Ctrl-D while a reply streams -------------------------------------------------------------------
@pytest.mark.skipif(sys.platform != "linux", reason="needs a POSIX pty")
def test_ctrl_d_while_a_reply_streams_stops_it_and_leaves(greedy_zmoe):
    from cli_pty import cli_argv, driving, repl_env

    # -n and -c this large: the reply runs until Ctrl-D (the hard time limit guards a hang)
    argv = cli_argv() + ["chat", str(greedy_zmoe), "-n", "1000000", "-c", "1000000"]
    with driving(argv, repl_env(), limit_s=300) as proc:
        proc.expect(rb">>> ")
        proc.send(b"hello world\r")
        proc.expect(rb"hello world\r?\n")
        proc.read_at_least(200)
        proc.send(b"\x04")
        proc.expect(rb" \[stopped\]\r?\n")
        proc.expect(rb"\[\d+ prompt \+ 0 cached tokens, \d+ generated \(stopped\)")
        assert proc.wait() == 0
        assert b">>> " not in proc.buf[proc.pos:], proc.buf[-300:]


def test_eof_typed_tells_an_end_of_file_from_a_line_typed_ahead():
    import pty

    from zipmoe_rt.cli_repl import eof_typed
    main_fd, tty_fd = pty.openpty()
    try:
        assert not eof_typed(tty_fd)                    # nothing typed
        os.write(main_fd, b"next question\n")
        time.sleep(0.1)
        assert not eof_typed(tty_fd)                    # a line typed ahead: left for the prompt
        assert os.read(tty_fd, 100) == b"next question\n"
        os.write(main_fd, b"\x04")
        time.sleep(0.1)
        assert eof_typed(tty_fd)                        # Ctrl-D on an empty line, consumed
        assert not eof_typed(tty_fd)
        r, w = os.pipe()                                # not a terminal
        os.close(w)
        assert not eof_typed(r)
        os.close(r)
    finally:
        os.close(main_fd)
        os.close(tty_fd)


# -- odd option values ------------------------------------------------------------------------------
@pytest.mark.parametrize("opts, needles", [
    (["-n", "0"], ["'-n' / '--max-tokens'", "0: give at least 1 token, or -1 for no limit"]),
    (["-n", "-2"], ["'-n' / '--max-tokens'", "-2: give at least 1 token, or -1 for no limit"]),
    (["--seed", "abc"], ["'--seed'", "'abc' is not a valid integer."]),
    (["-t", "x"], ["'--threads'", "'x' is not a valid integer."]),
    (["--temp", "nan"], ["'--temp'", "'nan' is not a finite number"]),
    (["--temp", "inf"], ["'--temp'", "'inf' is not a finite number"]),
    (["--top-p", "nan"], ["'--top-p'", "'nan' is not a finite number"]),
    (["--repeat-penalty", "x"], ["'--repeat-penalty'", "'x' is not a valid number."]),
])
def test_odd_option_values_get_one_line_naming_the_option(greedy_zmoe, opts, needles):
    r = cli("run", greedy_zmoe, "-p", "hi", *opts)
    assert r.exit_code == 1 and "Traceback" not in r.output, r.output
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1, r.stderr
    for n in needles:
        assert n in err[0], (n, err[0])
    assert "integer range" not in r.stderr and "float range" not in r.stderr


def test_max_tokens_minus_one_runs_to_the_end_of_the_context(greedy_zmoe):
    """llama.cpp's ``-n -1``: no limit but a stop token and the context."""
    with zipmoe_rt.load(greedy_zmoe) as m:
        n_prompt = len(m.tokenizer.encode("hello", add_special_tokens=True))
        want = m.generate("hello", max_tokens=40 - n_prompt + 1)
        assert m.last_stats.finish_reason == "length"
    r = cli("run", greedy_zmoe, "-p", "hello", "--raw", "-n", -1, "-c", 40)
    assert r.exit_code == 0, r.stderr
    assert r.stdout == want + "\n"
    assert stats_of(r.stderr)[2:] == (40 - n_prompt + 1, "length")


# -- serve: endpoints it does not have, values echoed as the request spelled them -------------------
@pytest.fixture(scope="module")
def served(greedy_zmoe):
    pytest.importorskip("uvicorn")
    from test_server import _host, _wait_ready, running
    from zipmoe_rt.server.app import create_app

    with zipmoe_rt.load(greedy_zmoe) as m:
        with running(create_app(_host(m, queue_size=4))) as base:
            _wait_ready(base)
            yield base


@pytest.mark.parametrize("path", ["/v1/embeddings", "/embeddings", "/v1/responses"])
def test_endpoints_it_does_not_have_are_501_and_say_which_it_has(served, path):
    from test_server import _raw
    status, body = _raw(served, "POST", path, {"model": "x", "input": "hello"})
    assert status == 501, body
    assert body["error"]["type"] == "not_supported_error"
    msg = body["error"]["message"]
    assert msg.startswith(f"{path}: ") and "not supported" in msg
    assert "POST /v1/chat/completions" in msg
    status, body = _raw(served, "POST", "/v1/nope", {})
    assert status == 404 and "/v1/nope: no such endpoint" in body["error"]["message"]
    assert "GET /v1/models" in body["error"]["message"]


@pytest.mark.parametrize("field, value, shown", [
    ("max_tokens", True, "got true"), ("temperature", "hot", 'got "hot"'),
    ("logprobs", None, None), ("stream", "yes", 'got "yes"'), ("seed", [1], "got [1]"),
    ("model", {"a": 1}, 'got {"a": 1}'),
])
def test_bad_values_are_echoed_in_json_spelling(served, field, value, shown):
    from test_server import _raw
    body = {"messages": [user("hi")], "max_tokens": 2, field: value}
    status, resp = _raw(served, "POST", "/v1/chat/completions", body)
    if shown is None:                     # null: the field's default
        assert status == 200, resp
        return
    assert status == 400 and resp["error"]["param"] == field, resp
    assert resp["error"]["message"].endswith(shown), resp


# -- the Python API after close ---------------------------------------------------------------------
def test_a_closed_model_says_so_and_keeps_the_conversation(greedy_zmoe):
    m = zipmoe_rt.load(greedy_zmoe)
    session = m.chat_session(system="be brief")
    first = "".join(session.send("hello", max_tokens=4))
    assert first and len(session.messages) == 2
    m.close()
    m.close()                                            # twice: harmless
    closed = f"{greedy_zmoe}: the model was closed"
    with pytest.raises(RuntimeError, match=re.escape(closed)):
        "".join(session.send("again", max_tokens=2))
    with pytest.raises(RuntimeError, match=re.escape(closed)):
        session.reset()
    with pytest.raises(RuntimeError, match=re.escape(closed)):
        m.chat_session()
    with pytest.raises(RuntimeError, match=re.escape(closed)):
        m.chat([user("hi")], max_tokens=2)
    # nothing changed: the conversation is as it was, the system prompt kept
    assert [x["role"] for x in session.messages] == ["user", "assistant"]
    assert session.messages[1]["content"] == first and session.system == "be brief"


# -- the Python API: bad prompts and load options -----------------------------------------------------
def test_bad_prompts_and_load_options_are_named(greedy_zmoe):
    import numpy as np
    with zipmoe_rt.load(greedy_zmoe) as m:
        vocab = m.hparams["vocab_size"]
        with pytest.raises(TypeError, match="prompt: expected a str or a sequence of token "
                                            "ids, got NoneType"):
            m.generate(None)
        with pytest.raises(TypeError, match="prompt: token ids must be integers, got float"):
            m.generate([1, 2.5])
        for bad in (-5, vocab, 10**12):
            with pytest.raises(ValueError, match=f"prompt: token id {bad} is out of range "
                                                 f"\\(vocabulary size {vocab}\\)"):
                m.generate([1, bad], max_tokens=2)
        # numpy ids are ids
        assert m.generate(np.array([1, 2, 3]), max_tokens=3) == m.generate([1, 2, 3],
                                                                           max_tokens=3)
    for kw, msg in [(dict(policy="nope"), "policy (--policy): expected one of auto, "),
                    (dict(eviction="fifo"), "eviction (--eviction): expected one of lru, "),
                    (dict(context=0), "context: expected a number of tokens >= 1, got 0"),
                    # as the CLI's --workers (>= 1): 0 is not "all cores", nor -3 a raw
                    # ThreadPoolExecutor error, nor "x" a TypeError
                    (dict(workers=0), "workers (--workers): expected None (all cores) or an "
                                      "int >= 1, got 0"),
                    (dict(workers=-3), "workers (--workers): expected None (all cores) or an "
                                       "int >= 1, got -3"),
                    (dict(workers="x"), "workers (--workers): expected None (all cores) or an "
                                        "int >= 1, got 'x'"),
                    (dict(workers=True), "workers (--workers): expected None (all cores) or an "
                                         "int >= 1, got True"),
                    (dict(memory_budget=True), "memory_budget (--memory-budget): expected bytes "
                                               "(an int) or a size such as '2GB' or '25%', got "
                                               "True"),
                    (dict(memory_budget=1.5), "memory_budget (--memory-budget): 1.5 is not a "
                                              "whole number of bytes")]:
        with pytest.raises(ValueError, match=re.escape(msg)):
            zipmoe_rt.load(greedy_zmoe, **kw)


# -- serve on an address in use -----------------------------------------------------------------------
def test_serve_on_an_address_in_use_is_one_line_before_loading(greedy_zmoe, monkeypatch):
    pytest.importorskip("uvicorn")
    import socket

    import zipmoe_rt.cli as cli_mod
    loads = []
    monkeypatch.setattr(cli_mod, "load_from_options", lambda *a, **k: loads.append(a))
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen(1)
        port = busy.getsockname()[1]
        r = cli("serve", greedy_zmoe, "--port", port)
    assert_one_line_error(r, f"--host/--port: cannot listen on 127.0.0.1:{port}",
                          "in use")
    assert "zipmoe-rt serve: http" not in r.stderr and loads == []
    assert_one_line_error(cli("serve", greedy_zmoe, "--host", "999.1.1.1", "--port", port),
                          "--host 999.1.1.1: not an address or a host name")


# -- serve a file that is not a model, or a model that does not load --------------------------------
def test_serve_a_file_that_does_not_load_is_an_error_and_an_exit(tiny_src, tmp_path):
    pytest.importorskip("uvicorn")
    from test_server import _free_port
    from zipmoe_rt.convert.converter import convert

    text = tmp_path / "notes.zmoe"
    text.write_text("hello")
    r = cli("serve", text, "--port", _free_port())
    assert_one_line_error(r, f"{text}: not a .zmoe file")
    assert "zipmoe-rt serve: http" not in r.stderr
    # a valid container whose model does not load (no tokenizer): the server stops, status 1
    bare = convert(tiny_src, tmp_path / "no-tokenizer.zmoe", progress=False)
    r = cli("serve", bare, "--port", _free_port())
    assert r.exit_code == 1, r.output
    last = r.stderr.strip().splitlines()[-1]
    assert last.startswith("error: the model failed to load: ") and "tokenizer" in last, last
    assert "Traceback" not in r.output


# -- text that is not UTF-8 -----------------------------------------------------------------------
def test_text_that_is_not_utf8_is_named(greedy_zmoe):
    # Python hands undecodable bytes of argv over as lone surrogates (surrogateescape)
    assert_one_line_error(cli("run", greedy_zmoe, "-p", "ab\udcffc", "-n", 2),
                          "-p/--prompt: not valid UTF-8 (byte 0xff at character 2)")
    assert_one_line_error(cli("run", greedy_zmoe, "-p", "hi", "--system", "\udcfe", "-n", 2),
                          "--system: not valid UTF-8 (byte 0xfe at character 0)")
    # a scripted chat: the bad line is an error, the next turn is answered
    with zipmoe_rt.load(greedy_zmoe) as m:
        want = m.chat([user("hello")], max_tokens=3)
    r = cli("chat", greedy_zmoe, "-n", 3, input=b"ok \xff\nhello\n")
    assert r.exit_code == 1, r.output            # the refused turn is in the exit status
    assert "error: input: not valid UTF-8 (byte 0xff at character 3)" in r.stderr
    assert r.stdout == want + "\n"
    # a /system prompt that is not UTF-8 is refused; the conversation goes on without it
    r = cli("chat", greedy_zmoe, "-n", 3, input=b"/system be \xfe\nhello\n")
    assert r.exit_code == 1, r.output
    assert "error: /system: not valid UTF-8 (byte 0xfe at character 3)" in r.stderr
    assert r.stdout == want + "\n"
    assert_one_line_error(cli("run", greedy_zmoe, "-p", "-", "-n", 2, input=b"a\xffb"),
                          "-p - (standard input): not valid UTF-8 (byte 0xff at character 1)")


@pytest.mark.parametrize("path, raw, param, says", [
    ("/v1/chat/completions",
     b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}',
     "messages[0].content", "not valid Unicode (a lone surrogate \\ud800 at character 3)"),
    ("/v1/completions", b'{"prompt": "\\udcff", "max_tokens": 2}', "prompt",
     "not valid Unicode (a lone surrogate \\udcff at character 0)"),
    ("/tokenize", b'{"content": "a\\ud800"}', "content", "not valid Unicode"),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 100000 + b"]" * 100000 + b"}", None,
     "the request body nests arrays or objects too deeply"),
    ("/v1/chat/completions", b'{"messages": ' + b"[" * 100 + b"]" * 100 + b"}", None,
     "nested more than 64 levels deep"),
])
def test_hostile_json_is_a_400_naming_the_field(served, path, raw, param, says):
    from test_server import _raw
    status, body = _raw(served, "POST", path, raw_body=raw)
    assert status == 400, body
    assert says in body["error"]["message"] and body["error"]["type"] == "invalid_request_error"
    if param is not None:
        assert body["error"]["param"] == param
        assert body["error"]["message"].startswith(f"{param}: ")
    assert _raw(served, "GET", "/health")[0] == 200


def test_export_onto_a_file_names_the_option(greedy_zmoe, tmp_path):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    r = cli("export", greedy_zmoe, "-o", f)
    assert r.exit_code != 0 and "Traceback" not in r.output
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "'-o' / '--output'" in err[0] and "is a file" in err[0], r.stderr
    assert "Errno" not in r.stderr and f.read_text() == "keep me"


@pytest.mark.parametrize("key", ["", "  "])
def test_serve_refuses_an_empty_api_key(greedy_zmoe, key):
    pytest.importorskip("uvicorn")
    r = cli("serve", greedy_zmoe, "--api-key", key)
    assert r.exit_code != 0 and "Traceback" not in r.output
    err = [l for l in r.stderr.splitlines() if l.startswith("error:")]
    assert len(err) == 1 and "'--api-key': empty" in err[0], r.stderr
    assert "zipmoe-rt serve: http" not in r.stderr


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX shell")
@pytest.mark.parametrize("args, what", [
    (["chat"], "chat (the turns are read from it)"),
    (["run", "-p", "-"], "-p - (the prompt from standard input)"),
])
def test_closed_standard_input_is_one_line(greedy_zmoe, args, what):
    import subprocess
    from cli_pty import cli_argv
    argv = cli_argv() + [args[0], str(greedy_zmoe), *args[1:]]
    env = {k: v for k, v in os.environ.items() if k != "ZIPMOE_RT_DEBUG"}
    r = subprocess.run(["bash", "-c", 'exec "$@" <&-', "_", *argv], capture_output=True,
                       text=True, timeout=300, env=env)
    assert r.returncode == 1, r.stderr
    assert r.stderr == f"error: {what}: standard input is closed\n"


@pytest.mark.skipif(sys.platform != "linux", reason="POSIX pipes")
@pytest.mark.parametrize("verb, extra", [("run", ["-p", "hello"]), ("chat", [])])
def test_a_reader_that_goes_away_stops_the_reply_quietly(greedy_zmoe, verb, extra):
    """``zipmoe-rt run ... | head -c 5``: no "Broken pipe" error, status 141 as for SIGPIPE."""
    import subprocess
    from cli_pty import cli_argv
    argv = cli_argv() + [verb, str(greedy_zmoe), "-n", "1000", "-c", "2000", *extra]
    env = {k: v for k, v in os.environ.items() if k != "ZIPMOE_RT_DEBUG"}
    p = subprocess.Popen(argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, env=env)
    try:
        if verb == "chat":
            p.stdin.write(b"hello\n")
        p.stdin.close()
        assert len(p.stdout.read(5)) == 5
        p.stdout.close()                                   # the reader goes away
        assert p.wait(timeout=300) == 141
        err = p.stderr.read().decode()
        assert "Broken pipe" not in err and "error" not in err and "Traceback" not in err, err
    finally:
        if p.poll() is None:
            p.kill()
        p.stderr.close()


def test_lines_typed_ahead_and_a_ctrl_d_after_them_are_read_in_order():
    import pty

    from zipmoe_rt.cli_repl import typed_ahead
    main_fd, tty_fd = pty.openpty()
    try:
        assert typed_ahead(tty_fd) == (None, False)
        os.write(main_fd, b"first\nsecond\n")
        time.sleep(0.1)
        assert typed_ahead(tty_fd) == ("first\nsecond", False)
        os.write(main_fd, b"last words\n\x04")
        time.sleep(0.1)
        assert typed_ahead(tty_fd) == ("last words", True)   # the turn, then leave
        os.write(main_fd, b"\x04")
        time.sleep(0.1)
        assert typed_ahead(tty_fd) == (None, True)
        os.write(main_fd, b"half a li")                          # no Enter: left to readline
        time.sleep(0.1)
        assert typed_ahead(tty_fd) == (None, False)
    finally:
        os.close(main_fd)
        os.close(tty_fd)


# -- a memory limit holds the KV cache of the context it planned ----------------------------------
def test_chat_under_a_memory_limit_stops_at_the_planned_context(greedy_zmoe, tmp_path, monkeypatch):
    """Without -c, ``chat --memory-limit`` plans the KV cache for DEFAULT_CONTEXT tokens; a reply
    with -n -1 ends when that context is full, not at the model's trained length (the tiny
    model's 512 positions), which the limit never counted."""
    from zipmoe_rt.engine import limit as L

    monkeypatch.setenv("ZIPMOE_RT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(L, "fixed_overhead", lambda path, measure=None, **kw: 50 * MB)
    monkeypatch.setattr(L, "warmup_peak", lambda path, measure=None, **kw: 0)
    monkeypatch.setattr(L, "DEFAULT_CONTEXT", 40)
    r = cli("chat", greedy_zmoe, "-n", -1, "--memory-limit", "4GB", input="hello world\n/stats\n")
    assert r.exit_code == 0, r.output
    assert "KV cache 0.2 MB (40 tokens)" in r.stderr, r.stderr
    prompt, _, generated, why = stats_of(r.stderr)
    assert why == "length" and prompt + generated == 41, r.stderr   # the last token is not fed
    assert re.search(r"\b40 tokens in the KV cache", r.stderr), r.stderr


# -- a file of another kind is named as such -----------------------------------------------------
def test_files_of_other_kinds_are_named(tmp_path):
    from zipmoe_rt.convert.safetensors_io import write_safetensors
    import numpy as np

    st = tmp_path / "model.safetensors"
    write_safetensors(st, {"w": ("F32", (2, 2), np.zeros((2, 2), np.float32).tobytes())})
    gguf = tmp_path / "model.gguf"
    gguf.write_bytes(b"GGUF" + bytes(60))
    for f, kind in ((st, "a safetensors file"), (gguf, "a GGUF file")):
        line = assert_one_line_error(cli("run", f, "-p", "hi"), str(f), "not a .zmoe file")
        assert f"it looks like {kind}" in line, line
        line = assert_one_line_error(cli("plan", f), str(f), "not a JSON config")
        assert f"it is {kind}" in line, line
    bad = tmp_path / "config.json"
    bad.write_text('{"architectures": [')
    line = assert_one_line_error(cli("plan", bad), "not a JSON config")
    assert "it is" not in line, line


def test_plan_of_a_bad_zmoe_says_what_run_says(tmp_path):
    """A file named .zmoe that is empty or text: plan gives the container reader's error, the
    same words as run (not "not a JSON config")."""
    empty = tmp_path / "empty.zmoe"
    empty.write_bytes(b"")
    text = tmp_path / "text.zmoe"
    text.write_text("hello world\n")
    for f, why in ((empty, "(the file is empty)"), (text, "(magic b'hell', expected b'ZMOE')")):
        r = cli("plan", f)
        line = assert_one_line_error(r, f"{f}: not a .zmoe file {why}")
        assert "JSON" not in line, line
        # run says the same, then how to convert a checkpoint
        assert cli("run", f, "-p", "hi").stderr.startswith(r.stderr.rstrip("\n") + ";")


# -- a scripted chat says when turns failed --------------------------------------------------------
def test_piped_chat_exits_1_when_a_turn_is_refused(greedy_zmoe):
    """Each turn over the context is one error: line (with the /reset hint), the others are
    answered, and the exit status is 1 so a script can tell; all turns fine: status 0."""
    ok = cli("chat", greedy_zmoe, "-n", 4, input="hi\nhello\n")
    assert ok.exit_code == 0, ok.output
    long = "tell me a long story about a dragon and a knight " * 3
    r = cli("chat", greedy_zmoe, "-c", 40, "-n", 4, input=f"hi\n{long}\n/reset\nhello\n")
    assert r.exit_code == 1, r.output
    errs = [l for l in r.stderr.splitlines() if l.startswith("error: ")]
    assert len(errs) == 2, r.stderr
    assert "do not fit the context of 40 tokens" in errs[0] and "/reset" in errs[0], errs
    assert errs[1] == "error: 1 of the input's turns failed (the error: lines above)"
    assert len(r.stdout.splitlines()) == 2          # "hi" and, after /reset, "hello" answered


def test_unbudgeted_compressed_residency_is_named_in_the_memory_line(greedy_zmoe):
    with zipmoe_rt.load(greedy_zmoe, resident="compressed") as m:
        line = m.memory_line()
    assert "no weight budget (every expert kept in the compute form, computed in place)" in line
    with zipmoe_rt.load(greedy_zmoe) as m:
        assert "no weight budget (every expert kept once decoded)" in m.memory_line()


def test_plan_on_json_nested_too_deeply_names_the_file(tmp_path):
    """A config.json nested past the JSON decoder's recursion limit: one line naming the file
    (the folder's config.json when a folder is given), not Python's recursion message alone."""
    from cli_runner import cli
    cfg = tmp_path / "config.json"
    cfg.write_text("[" * 100000 + "]" * 100000)
    for arg in (cfg, tmp_path):
        r = cli("plan", arg)
        assert r.exit_code == 1
        assert r.stderr == f"error: {cfg}: not a JSON config (nested too deeply to read)\n"


@pytest.mark.parametrize("args,shown,meant", [
    (["run", "--memory-budget", "25", "%", "-p", "hi"], "--memory-budget 25", "--memory-budget 25%"),
    (["run", "-m", "12.5", "%"], "-m 12.5", "-m 12.5%"),
    (["run", "--memory-budget=25", "%"], "--memory-budget=25", "--memory-budget 25%"),
    (["serve", "--memory-limit", "40", "%"], "--memory-limit 40", "--memory-limit 40%"),
    (["bench", "-m", "30", "%"], "-m 30", "-m 30%"),
    (["plan", "cfg.json", "-m", "25", "%"], "-m 25", "-m 25%"),
])
def test_a_size_split_from_its_percent_sign_is_named(args, shown, meant):
    """`--memory-budget 25 %` (the shell splits it): one line naming the option and what was
    meant, not "%: no such file" (the '%' taken as MODEL)."""
    from cli_runner import cli
    r = cli(*args)
    assert r.exit_code == 1
    assert r.stderr == (f"error: {shown}: followed by a lone '%' (a space splits the size in "
                        f"two); did you mean {meant}?\n")


def test_a_percent_sign_as_prompt_is_not_taken_for_a_split_size():
    from zipmoe_rt.cli import main
    from zipmoe_rt.cli_types import split_percent
    run = main.commands["run"]
    assert split_percent(run.params, ["-p", "%", "-m", "25%"]) is None
    assert split_percent(run.params, ["-m", "2GB", "%"]) is None   # not a number: no % meant


def test_run_and_chat_on_a_model_without_chat_template_point_to_raw(tiny_moe_dir, tmp_path):
    """No chat template: `run` says so and that --raw sends the prompt as it is; with --raw
    it completes the prompt. `chat` refuses before its first turn and points to `run --raw`."""
    from cli_runner import cli
    from test_api import _tokenizer_json
    from zipmoe_rt.convert.converter import convert
    src = tiny_moe_dir("mixtral")
    dest = tmp_path / "plain"
    dest.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dest / f.name)
    vocab = json.loads((src / "config.json").read_text())["vocab_size"]
    (dest / "tokenizer.json").write_text(_tokenizer_json(vocab))
    (dest / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}))
    zm = convert(dest, tmp_path / "plain.zmoe", progress=False)
    r = cli("run", zm, "-p", "hi", "-n", 2)
    assert r.exit_code == 1
    assert r.stderr == ("error: chat_template: this model's tokenizer has no chat template; "
                        "add --raw to send the prompt as it is\n")
    r = cli("chat", zm, input="hi\n")
    assert r.exit_code == 1
    assert r.stderr.endswith("error: chat_template: this model's tokenizer has no chat "
                             "template, so it cannot hold a conversation; complete a prompt "
                             "as it is with `zipmoe-rt run MODEL --raw -p TEXT`\n")
    r = cli("run", zm, "-p", "hi", "-n", 2, "--raw", "--temp", 0)
    assert r.exit_code == 0, r.stderr
