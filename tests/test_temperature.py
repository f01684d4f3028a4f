"""Huge and tiny temperatures: ``--temp`` and the library refuse one above the largest float32
(naming the option), the server keeps OpenAI's range [0, 2] (a 400 naming ``temperature``),
and a positive temperature so small that the logits divided by it overflow samples the argmax,
its limit; none of them prints a NumPy warning."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from zipmoe_rt.sampling import TEMPERATURE_MAX, Sampler, SamplingParams

from cli_runner import cli

try:
    import starlette  # noqa: F401
    import uvicorn  # noqa: F401
except ImportError:
    HAVE_SERVER = False
else:
    HAVE_SERVER = True
    from test_server import model, server, tiny_zmoe  # noqa: F401


def _logits() -> np.ndarray:
    x = np.random.default_rng(3).standard_normal(500).astype(np.float32) * 8
    x[17] = -np.inf                     # a masked token stays masked
    return x


@pytest.mark.parametrize("t", [1e39, 1e308])
def test_a_temperature_above_the_largest_float32_is_refused(t):
    with pytest.raises(ValueError, match=r"^temperature: must be at most 3\.40282e\+38 "):
        SamplingParams(temperature=t)


@pytest.mark.parametrize("t", [1e-300, 1e-45, 1e-40])
def test_a_tiny_temperature_samples_the_argmax_without_a_warning(t):
    x = _logits()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ids, scores = Sampler(SamplingParams(temperature=t, seed=0)).candidates(x, [])
        got = [Sampler(SamplingParams(temperature=t, seed=s)).sample(x, []) for s in range(5)]
    assert ids.tolist() == [int(np.argmax(x))] and scores.tolist() == [x.max()]
    assert got == [int(np.argmax(x))] * 5


def test_the_largest_temperature_samples_uniformly_without_a_warning():
    x = _logits()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        sampler = Sampler(SamplingParams(temperature=TEMPERATURE_MAX, seed=0))
        probs = sampler.probs(x, [])
    assert probs[17] == 0
    keep = np.arange(500) != 17
    np.testing.assert_allclose(probs[keep], 1 / 499, rtol=1e-6)


@pytest.mark.parametrize("value", ["1e308", "inf", "-0.5"])
def test_cli_temp_out_of_range_is_one_error_line_naming_the_option(value):
    r = cli("run", "-p", "hi", "--temp", value)
    assert r.exit_code == 1, r.output
    assert r.stderr.splitlines() == [r.stderr.strip()], r.stderr        # one line
    assert r.stderr.startswith("error: Invalid value for '--temperature' / '--temp': ")
    assert "RuntimeWarning" not in r.output


@pytest.mark.skipif(not HAVE_SERVER, reason="needs the server extra")
def test_server_temperature_is_openai_range(server):
    from test_server import HI, _raw
    base = server[0]
    for t in (1e308, 2.5, -1):
        status, body = _raw(base, "POST", "/v1/chat/completions",
                            {"messages": HI, "max_tokens": 2, "temperature": t})
        assert status == 400 and body["error"]["param"] == "temperature", body
        assert body["error"]["message"].startswith("temperature: must be in [0.0, 2.0], got ")
    status, body = _raw(base, "POST", "/v1/chat/completions",
                        {"messages": HI, "max_tokens": 2, "temperature": 2, "seed": 1})
    assert status == 200 and body["usage"]["completion_tokens"] == 2, body

