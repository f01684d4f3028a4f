"""``zipmoe-rt serve``: a client that disconnects in the middle of a streamed reply (a real
socket closed with a TCP reset, as a killed client leaves it). The server stops generating for
that request, frees its slot (the next request runs), logs exactly one line naming the request,
and asyncio logs nothing (no "socket.send() raised exception." per chunk still queued). The
server is uvicorn in a thread, as in test_server.py; every wait has a hard limit."""
from __future__ import annotations

import contextlib
import copy
import json
import logging
import socket
import struct
import threading
import time

import pytest

pytest.importorskip("starlette")
uvicorn = pytest.importorskip("uvicorn")

from zipmoe_rt.server.app import create_app  # noqa: E402
from zipmoe_rt.server.worker import ModelHost  # noqa: E402

from test_server import HARD_LIMIT_S, HI, _free_port, _raw, _wait_ready, model, tiny_zmoe  # noqa: E402,F401

DISCONNECT = "the client disconnected"
ROUNDS = 12        # resets while the worker is ahead (each may or may not meet a burst)


class Records(logging.Handler):
    """Collects the records of the loggers it is attached to."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)

    def lines(self, logger: str, level: int = logging.INFO) -> list[str]:
        return [r.getMessage() for r in self.records if r.name == logger and r.levelno >= level]


@contextlib.contextmanager
def logged_server(host: ModelHost):
    """uvicorn serving ``host``'s app on a free port with the server's own log level (info),
    its ``uvicorn.error`` and ``asyncio`` log records collected; yields (base URL, records)."""
    rec = Records()
    loggers = [logging.getLogger(n) for n in ("uvicorn.error", "asyncio")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(rec)
    logging.getLogger("asyncio").setLevel(logging.INFO)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(create_app(host), host="127.0.0.1", port=port,
                                           log_config=None, log_level="info",
                                           timeout_graceful_shutdown=2))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    try:
        deadline = time.monotonic() + HARD_LIMIT_S
        while not server.started:
            assert time.monotonic() < deadline and th.is_alive(), "server did not start"
            time.sleep(0.01)
        base = f"http://127.0.0.1:{port}"
        _wait_ready(base)
        yield base, rec
    finally:
        server.should_exit = True
        th.join(timeout=10)
        for lg, level in zip(loggers, levels):
            lg.removeHandler(rec)
            lg.setLevel(level)
        assert not th.is_alive(), "server did not stop"


def _post(base: str, messages, stream: bool, max_tokens: int = 50) -> socket.socket:
    """A greedy chat request on a raw socket (its reply not read)."""
    h, port = base.removeprefix("http://").split(":")
    s = socket.create_connection((h, int(port)), timeout=HARD_LIMIT_S)
    body = json.dumps({"messages": messages, "stream": stream, "max_tokens": max_tokens,
                       "temperature": 0}).encode()
    s.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
              b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
    return s


def _start_stream(base: str, max_tokens: int) -> socket.socket:
    """A streamed chat request on a raw socket; returns once the first text chunk (after the
    role chunk) arrived: the worker is generating."""
    s = _post(base, HI, True, max_tokens)
    got = b""
    while b"\r\n\r\n" not in got or got.split(b"\r\n\r\n", 1)[1].count(b"data: ") < 2:
        piece = s.recv(4096)
        assert piece, "the server closed the stream"
        got += piece
    assert got.startswith(b"HTTP/1.1 200"), got[:100]
    return s


def _reset(s: socket.socket) -> None:
    """Close with a TCP reset (SO_LINGER 0), as a killed client's socket is closed."""
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()


def _wait_idle(host: ModelHost) -> None:
    deadline = time.monotonic() + HARD_LIMIT_S
    while host.pending:
        assert time.monotonic() < deadline, "generation went on after the client left"
        time.sleep(0.01)


class GatedNet:
    """The network, paused before its fourth forward pass until :attr:`go` is set: the reply
    is in mid-stream when the client leaves."""

    def __init__(self, net):
        self._net = net
        self.go = threading.Event()
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._net, name)

    def forward(self, *a, **kw):
        self.calls += 1
        if self.calls == 4:
            assert self.go.wait(HARD_LIMIT_S), "the test never released the network"
        return self._net.forward(*a, **kw)


def test_client_reset_mid_stream_stops_the_request_and_logs_one_line(model):
    gated = copy.copy(model)
    gated.net = GatedNet(model.net)
    host = ModelHost(lambda: gated, close_model=False)
    with logged_server(host) as (base, rec):
        s = _start_stream(base, max_tokens=400)
        _reset(s)
        time.sleep(0.05)   # (not a timing assertion: the outcome is the same if the reset
        gated.net.go.set()  # is seen before or after the network goes on)
        _wait_idle(host)
        assert host.last_result["finish_reason"] == "cancelled"
        assert host.last_result["completion_tokens"] < 400
        lines = [l for l in rec.lines("uvicorn.error") if DISCONNECT in l]
        assert len(lines) == 1, rec.lines("uvicorn.error")
        assert lines[0].startswith("chatcmpl-") and "generation stopped" in lines[0]
        assert rec.lines("asyncio") == []
        # the slot is free: the next request runs to the end
        status, body = _raw(base, "POST", "/v1/chat/completions",
                            {"messages": HI, "max_tokens": 3, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_clients_reset_while_the_worker_is_ahead_log_no_socket_errors(model):
    """A fast model: the worker queues chunks faster than they are written, so the reset
    arrives while queued chunks are still being sent."""
    host = ModelHost(lambda: model, close_model=False)
    with logged_server(host) as (base, rec):
        for _ in range(ROUNDS):
            s = _start_stream(base, max_tokens=450)
            _reset(s)
            _wait_idle(host)
        assert rec.lines("asyncio") == [], rec.lines("asyncio")[:3]
        stopped = [l for l in rec.lines("uvicorn.error") if DISCONNECT in l]
        assert len(stopped) <= ROUNDS
        assert all(l.startswith("chatcmpl-") for l in stopped)
        status, body = _raw(base, "POST", "/v1/chat/completions",
                            {"messages": HI, "max_tokens": 3, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 3


class PrefillGate:
    """The network, holding its next prefill (a forward pass over more than one token) once
    :attr:`armed` until the request in progress is cancelled (its client gone)."""

    def __init__(self, net):
        self._net = net
        self.host: ModelHost | None = None
        self.armed = False
        self.held = threading.Event()

    def __getattr__(self, name):
        return getattr(self._net, name)

    def forward(self, ids, *a, **kw):
        if self.armed and len(ids) > 1:
            self.armed = False
            self.held.set()
            assert self.host._current.cancel.wait(HARD_LIMIT_S), "the client never left"
        return self._net.forward(ids, *a, **kw)


def _ask(base: str, messages) -> list:
    """The choices (text and log-probabilities) of a greedy chat completion."""
    status, body = _raw(base, "POST", "/v1/chat/completions",
                        {"messages": messages, "max_tokens": 6, "temperature": 0,
                         "logprobs": True, "top_logprobs": 3})
    assert status == 200, body
    return body["choices"]


def _leave_during_prefill(model, host, gate, stream, check) -> None:
    """On a server over ``host``: one greedy turn, then a client that posts a long follow-up
    and leaves once ``gate`` holds its prefill (``gate.armed`` / ``gate.held``); ``check()``
    runs once the server is idle again. Then the request ended with one log line, and the next
    requests (a follow-up sharing the conversation, the same prompt again) get the text and
    log-probabilities of a fresh server over ``model``."""
    from test_server import _host, running
    from zipmoe_rt.server.app import create_app

    story = "tell me a very long story about the kings and queens of france " * 3
    with logged_server(host) as (base, rec):
        first = _ask(base, HI)
        convo = HI + [{"role": "assistant", "content": first[0]["message"]["content"]}]
        gone = convo + [{"role": "user", "content": story}]
        follow = convo + [{"role": "user", "content": "and what about germany"}]
        gate.armed = True
        s = _post(base, gone, stream)
        assert gate.held.wait(HARD_LIMIT_S), "the prefill never started"
        _reset(s)
        _wait_idle(host)
        check()
        lines = [l for l in rec.lines("uvicorn.error") if DISCONNECT in l]
        assert len(lines) == 1 and "generation stopped" in lines[0], lines
        got = [_ask(base, follow), _ask(base, gone)]
    with running(create_app(_host(model))) as fresh:
        _wait_ready(fresh)
        assert _ask(fresh, HI) == first
        want = [_ask(fresh, follow), _ask(fresh, gone)]
    assert got == want


@pytest.mark.parametrize("stream", [True, False])
def test_client_gone_during_the_prefill_leaves_nothing_for_the_next_request(model, stream):
    """A client that leaves while its prompt is prefilled: the request ends (one log line),
    and the next requests (a follow-up sharing the conversation, the same prompt again) get
    the text and log-probabilities of a server that never saw it."""
    gated = copy.copy(model)
    gated.net = PrefillGate(model.net)
    host = ModelHost(lambda: gated, close_model=False)
    gated.net.host = host

    def cancelled():
        assert host.last_result["finish_reason"] == "cancelled"

    _leave_during_prefill(model, host, gated.net, stream, cancelled)


class LayerGate:
    """A decoder layer that counts the calls of every layer of a prefill (more than one
    token) once :attr:`Layers.armed`; the first such call waits until the request in progress
    is cancelled (its client gone), then runs."""

    def __init__(self, layer, layers: "Layers"):
        self._layer, self._layers = layer, layers

    def __getattr__(self, name):
        return getattr(self._layer, name)

    def __call__(self, x, *a, **kw):
        g = self._layers
        if g.armed and x.shape[0] > 1:
            g.prefill_calls += 1
            if g.prefill_calls == 1:
                g.held.set()
                assert g.host._current.cancel.wait(HARD_LIMIT_S), "the client never left"
        return self._layer(x, *a, **kw)


class Layers:
    """The shared counters of a network's :class:`LayerGate` s."""

    def __init__(self):
        self.host: ModelHost | None = None
        self.armed = False
        self.prefill_calls = 0
        self.held = threading.Event()


@pytest.mark.parametrize("stream", [True, False])
def test_client_gone_during_the_prefill_stops_it_within_one_layer(model, stream):
    """A client that leaves while the first layer of its prompt's prefill runs: no later layer
    of that prefill runs (the cancel is seen before the next layer), the request ends as
    cancelled with one log line, and the next requests get the text and log-probabilities of
    a fresh server (the prefix cache was left as before the request)."""
    gates = Layers()
    gated = copy.copy(model)
    gated.net = copy.copy(model.net)            # the module's model keeps its own layers
    gated.net.layers = [LayerGate(layer, gates) for layer in model.net.layers]
    assert len(gated.net.layers) >= 2
    host = ModelHost(lambda: gated, close_model=False)
    gates.host = host

    def stopped_within_one_layer():
        gates.armed = False
        assert gates.prefill_calls == 1, (gates.prefill_calls, len(gated.net.layers))
        assert host.last_result == {"finish_reason": "cancelled", "completion_tokens": 0}

    _leave_during_prefill(model, host, gates, stream, stopped_within_one_layer)
