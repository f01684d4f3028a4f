"""``zipmoe-rt serve`` from start to stop: a model whose weights fail their CRC-32 ends the
command at load with one ``error:`` line (as ``run`` refuses it), a request that fails logs one
line, and SIGTERM / SIGINT while a stream is open end that stream with an error event and
``[DONE]``, log that the server is shutting down, and print no traceback. Servers run in a
thread (as in test_server.py) or as a ``zipmoe-rt serve`` process; every wait has a hard
limit."""
from __future__ import annotations

import copy
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from zipmoe_rt.server.worker import ModelHost  # noqa: E402

from test_cli import _flip_layer0  # noqa: E402
from test_serve_disconnect import GatedNet, Records, _start_stream, logged_server  # noqa: E402
from test_server import (HARD_LIMIT_S, HI, _free_port, _raw, model, tiny_zmoe,  # noqa: E402,F401
                         wait_healthy)

PROCESS_LIMIT_S = 240     # a whole `zipmoe-rt serve` process, from start to exit


def _serve(*args) -> subprocess.Popen:
    """``zipmoe-rt serve ARGS`` as a process, stdout and stderr together."""
    return subprocess.Popen([sys.executable, "-m", "zipmoe_rt.cli", "serve", *map(str, args)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen) -> tuple[int, str]:
    """(exit status, output) of a serve process, killed if it outlives the hard limit."""
    try:
        out, _ = proc.communicate(timeout=PROCESS_LIMIT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        out, _ = proc.communicate(timeout=10)
        pytest.fail(f"serve did not exit: {out}")
    return proc.returncode, out


def test_serve_refuses_a_model_that_fails_its_crc_as_run_does(tiny_zmoe, tmp_path):
    bad = tmp_path / "flipped.zmoe"
    _flip_layer0(tiny_zmoe, bad, "sm")      # caught by the CRC only
    rc, out = _finish(_serve(bad, "--port", _free_port()))
    assert rc == 1, out
    last = out.strip().splitlines()[-1]
    assert last.startswith("error: the model failed to load: "), out
    assert str(bad) in last and "CRC-32" in last and "ChecksumError" not in last, last
    # the words run prints for the same file (without the exception's class name)
    from cli_runner import cli
    ran = cli("run", bad, "-p", "hi", "-n", "2")
    assert ran.exit_code == 1 and ran.stderr.startswith("error: "), ran.stderr
    assert last == "error: the model failed to load: " + ran.stderr.strip()[len("error: "):], \
        (last, ran.stderr)
    assert "loaded: ready" not in out and "Traceback" not in out, out


@pytest.mark.parametrize("option, value, needle", [
    ("--memory-limit", "abc", "--memory-limit: cannot read 'abc'"),
    ("--memory-limit", "0", "--memory-limit: must be positive"),
    ("--memory-budget", "1e30", "--memory-budget): '1e30' is more than 1 PB"),
    ("--memory-budget", "-5", "--memory-budget: must be positive"),
])
def test_serve_reads_memory_values_before_it_listens(tiny_zmoe, option, value, needle):
    """A --memory-limit / --memory-budget value that cannot be read is one error line before
    the server says where it listens (it said so, then failed at load)."""
    from cli_runner import cli
    r = cli("serve", tiny_zmoe, "--port", "0", option, value)
    assert r.exit_code == 1 and r.stderr.startswith("error: ") and needle in r.stderr, r.stderr
    assert "http://" not in r.stderr and "Traceback" not in r.stderr, r.stderr


@pytest.fixture(scope="module")
def badgen_zmoe(tiny_moe_dir, tmp_path_factory):
    """The tiny model whose file's generation config samples at temperature -5."""
    from test_api import make_chat_model
    return make_chat_model(tiny_moe_dir("mixtral"), tmp_path_factory.mktemp("badgen") / "badgen",
                           generation_config={"do_sample": True, "temperature": -5})


BADGEN = "generation.config: temperature: must be in [0.0, inf], got -5"


def test_serve_refuses_a_model_whose_generation_config_is_out_of_range(badgen_zmoe):
    """As ``run`` refuses it without --temp: one line naming the file and the field, before the
    server starts (not an HTTP error at each request)."""
    rc, out = _finish(_serve(badgen_zmoe, "--port", _free_port()))
    assert rc == 1, out
    assert out.strip().splitlines() == [
        f"error: {badgen_zmoe}: {BADGEN} (every request that does not set this field would "
        f"fail; fix the model file)"], out
    # the loader checks it too (the default model, which has no reader opened first)
    from zipmoe_rt.cli_serve import check_generation_config
    from zipmoe_rt.sampling import GenerationConfigError
    from zmoe.constants import Keys
    with pytest.raises(GenerationConfigError, match=r"^m\.zmoe: generation\.config: top_p: "):
        check_generation_config({Keys.Generation.CONFIG: {"do_sample": True, "top_p": 7}},
                                "m.zmoe")
    check_generation_config({Keys.Generation.CONFIG: {"do_sample": False, "top_p": 7}}, "m.zmoe")
    check_generation_config({}, "m.zmoe")


def test_a_request_meeting_a_bad_generation_config_is_a_server_error(badgen_zmoe):
    """Served anyway (the Python API), a request that uses the file's bad value gets HTTP 500
    naming the file and the field (the fault is the model's, not the client's) and one log
    line; a request that sets the field is served."""
    import zipmoe_rt
    with zipmoe_rt.load(badgen_zmoe) as m:
        with logged_server(ModelHost(lambda: m, close_model=False)) as (base, rec):
            status, body = _raw(base, "POST", "/v1/chat/completions",
                                {"messages": HI, "max_tokens": 3})
            assert status == 500, body
            assert body["error"]["type"] == "server_error"
            assert body["error"]["message"] == f"{badgen_zmoe}: {BADGEN}"
            assert rec.lines("uvicorn.error", logging.ERROR) == [f"{badgen_zmoe}: {BADGEN}"]
            status, body = _raw(base, "POST", "/v1/chat/completions",
                                {"messages": HI, "max_tokens": 3, "temperature": 0.5})
            assert status == 200, body


class GatedTokenizer:
    """The tokenizer, whose chat template render waits for :attr:`release` (a slow template),
    then renders, or fails as a template past its render budget does (``fail``)."""

    def __init__(self, tok, fail: bool = False):
        self._tok, self.fail = tok, fail
        self.started, self.release = threading.Event(), threading.Event()

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def encode_chat(self, *a, **kw):
        self.started.set()
        assert self.release.wait(HARD_LIMIT_S), "never released"
        if self.fail:
            raise ValueError("chat_template: rendering stopped: too many steps")
        return self._tok.encode_chat(*a, **kw)


def _get(base: str, path: str, timeout_s: float = 10) -> int:
    """The HTTP status of ``GET path``, failing the test past ``timeout_s``."""
    import http.client
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=timeout_s)
    try:
        conn.request("GET", path)
        r = conn.getresponse()
        r.read()
        return r.status
    finally:
        conn.close()


@pytest.mark.parametrize("fail", [False, True])
def test_a_slow_chat_template_render_holds_no_other_request(model, fail):
    """While one request's chat template renders, /health and /v1/models are answered (the
    render runs off the event loop); the request then gets its reply, or the 400 naming
    ``messages`` that a failed render gets."""
    slow = copy.copy(model)
    slow.tokenizer = GatedTokenizer(model.tokenizer, fail)
    with logged_server(ModelHost(lambda: slow, close_model=False)) as (base, rec):
        first: dict = {}

        def request():
            first["got"] = _raw(base, "POST", "/v1/chat/completions",
                                {"messages": HI, "max_tokens": 3})
        th = threading.Thread(target=request, daemon=True)
        th.start()
        try:
            assert slow.tokenizer.started.wait(HARD_LIMIT_S), "the render never started"
            assert _get(base, "/health") == 200
            assert _get(base, "/v1/models") == 200
            assert th.is_alive() and not first      # the first request is still rendering
        finally:
            slow.tokenizer.release.set()
            th.join(HARD_LIMIT_S)
        assert not th.is_alive()
        status, body = first["got"]
        if fail:
            assert status == 400, body
            assert body["error"]["param"] == "messages"
            assert body["error"]["message"] == "chat_template: rendering stopped: too many steps"
        else:
            assert status == 200, body
            assert body["choices"][0]["finish_reason"] in ("length", "stop"), body


class BrokenNet:
    """The network, whose forward pass fails as a corrupt piece read mid-request does."""

    def __init__(self, net):
        self._net = net

    def __getattr__(self, name):
        return getattr(self._net, name)

    def forward(self, *a, **kw):
        raise RuntimeError("piece 7 does not decode")


def test_a_failed_request_is_logged_as_one_line(model):
    broken = copy.copy(model)
    broken.net = BrokenNet(model.net)
    host = ModelHost(lambda: broken, close_model=False)
    with logged_server(host) as (base, rec):
        status, body = _raw(base, "POST", "/v1/chat/completions",
                            {"messages": HI, "max_tokens": 3})
        assert status == 500
        want = "generation failed: RuntimeError: piece 7 does not decode"
        assert body["error"]["message"] == want
        lines = rec.lines("uvicorn.error", logging.ERROR)
        assert len(lines) == 1 and lines[0].startswith("chatcmpl-"), lines
        assert lines[0].endswith(": " + want), lines
        assert not any(r.exc_info for r in rec.records), "a traceback was logged"


def _read_to_close(s: socket.socket) -> bytes:
    got = b""
    while piece := s.recv(4096):
        got += piece
    s.close()
    return got


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_ends_an_open_stream_with_an_error_event_and_done(model, sig):
    """The real signal path of :func:`zipmoe_rt.server.serve` (uvicorn's handlers, then the
    process's own, taken after the event loop is gone), in this process: a test handler
    stands in for SIGTERM's exit 0, and SIGINT comes out as KeyboardInterrupt (status 130)."""
    from zipmoe_rt.server import serve

    gated = copy.copy(model)
    gated.net = GatedNet(model.net)        # the reply stays in mid-stream until released
    gated.close = lambda: None              # (the module's model stays open)
    port = _free_port()
    base = f"http://127.0.0.1:{port}"
    rec = Records()
    result: dict = {}

    def client():
        try:
            wait_healthy(base, HARD_LIMIT_S, poll_s=0.02)
            logging.getLogger("uvicorn.error").addHandler(rec)
            s = _start_stream(base, max_tokens=400)
            os.kill(os.getpid(), sig)
            result["body"] = _read_to_close(s)
        except BaseException as e:  # noqa: BLE001 - reported by the test
            result["error"] = e
        finally:
            gated.net.go.set()

    taken: list = []
    previous = signal.signal(signal.SIGTERM, lambda s, f: taken.append(s))
    th = threading.Thread(target=client, daemon=True)
    th.start()
    try:
        if sig == signal.SIGINT:
            with pytest.raises(KeyboardInterrupt):
                serve(lambda: gated, port=port)
        else:
            serve(lambda: gated, port=port)
            assert taken == [signal.SIGTERM]     # the exit status 0 of `zipmoe-rt serve`
    finally:
        signal.signal(signal.SIGTERM, previous)
        gated.net.go.set()
        th.join(timeout=HARD_LIMIT_S)
        logging.getLogger("uvicorn.error").removeHandler(rec)
    assert not th.is_alive() and "error" not in result, result
    events = [e.strip() for e in result["body"].split(b"\n") if e.startswith(b"data: ")]
    assert events[-1] == b"data: [DONE]", result["body"][-300:]
    err = json.loads(events[-2][6:])["error"]
    assert err["code"] == "server_shutting_down" and err["type"] == "service_unavailable"
    assert result["body"].endswith(b"0\r\n\r\n"), "the chunked reply did not end"
    lines = rec.lines("uvicorn.error")
    cut = [l for l in lines if "the server is shutting down" in l]
    assert len(cut) == 1 and cut[0].startswith("chatcmpl-"), lines
    assert "after 3 generated tokens" in cut[0], cut
    assert not any("disconnected" in l for l in lines), lines
    assert not [r for r in rec.records if r.exc_info or r.levelno >= logging.ERROR], lines


def test_port_0_prints_and_serves_the_port_the_system_chose(tiny_zmoe):
    import re
    import select

    proc = _serve(tiny_zmoe, "--port", 0)
    try:
        ready, _, _ = select.select([proc.stdout], [], [], PROCESS_LIMIT_S)
        assert ready, "serve printed nothing"
        first = proc.stdout.readline()
        m = re.match(r"zipmoe-rt serve: http://127\.0\.0\.1:(\d+)/ \(loading ", first)
        assert m and int(m.group(1)) > 0, first
        base = f"http://127.0.0.1:{m.group(1)}"
        wait_healthy(base, PROCESS_LIMIT_S, proc)
        proc.terminate()
    finally:
        rc, out = _finish(proc)
    assert rc == 0, out
    assert f"Uvicorn running on {base} " in out and "Traceback" not in out, out
