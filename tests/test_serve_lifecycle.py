"""``zipmoe-rt serve`` from start to stop: a model whose weights fail their CRC-32 ends the
command at load with one ``error:`` line (as ``run`` refuses it), a request that fails logs one
line, and SIGTERM / SIGINT while a stream is open end that stream with an error event and
``[DONE]``, log that the server is shutting down, and print no traceback. Servers run in a
thread (as in test_server.py) or as a ``zipmoe-rt serve`` process; every wait has a hard
limit."""
from __future__ import annotations

import copy
import logging
import signal
import subprocess
import sys

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")

from zipmoe_rt.server.worker import ModelHost  # noqa: E402

from test_cli import _flip_layer0  # noqa: E402
from test_serve_disconnect import logged_server  # noqa: E402
from test_server import HI, _free_port, _raw, model, tiny_zmoe  # noqa: E402,F401

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
    assert last.startswith("error: the model failed to load: ChecksumError: "), out
    assert str(bad) in last and "CRC-32" in last, last
    assert "loaded: ready" not in out and "Traceback" not in out, out


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
