"""The engine-term fit of a calibration (engine/overhead.py, design note §3.8): from the
scenario calls' times to the delay model's terms and read prices, and how a calibration of an
older version is handled."""
from __future__ import annotations

import dataclasses
import os
import platform

import numpy as np
import pytest

from zipmoe_rt.engine import calibration as prof
from zipmoe_rt.engine import overhead as O
from zipmoe_rt.engine.planner import DelayModel

K = 4
# the base model as a calibration gives it: one expert's regions 3 + 1 ms on the I/O channel
BASE = DelayModel(sm_read_s=3e-3, exp_read_s=1e-3, decode_s=2e-3, matmul_s=5e-4, workers=8,
                  bytes_F=16, bytes_sm=8, bytes_exp=3)


def timed(model: DelayModel, k: int = K) -> dict:
    """Scenario times as the engine would take them if ``model`` were the truth."""
    return {s: model.layer_makespan(O.scenario_hits(s, k)) for s in O.SCENARIOS}


def test_scenario_hits():
    assert O.scenario_hits("F", 4) == {"F": 4}
    assert O.scenario_hits("miss", 4) == {"miss": 4}
    assert O.scenario_hits("S1", 4) == {"F": 3, "S": 1}
    assert O.scenario_hits("miss1", 1) == {"miss": 1}
    with pytest.raises(ValueError, match="unknown scenario"):
        O.scenario_hits("X1", 4)


def test_the_fit_returns_the_terms_that_made_the_calls():
    # the engine's reads overlap 3x better than the base model says (a miss's regions 4/3 ms
    # beside another's), a call's first read waits 6 ms more; per-load costs per tier
    truth = dataclasses.replace(BASE, sm_read_s=1e-3, exp_read_s=1e-3 / 3, layer_fixed_s=3e-4,
                                read_first_s=6e-3, load_C_s=2e-4, load_S_s=5e-4,
                                load_E_s=7e-4)
    got = O.fit_engine_terms(timed(truth), BASE, K)
    want = {"layer_fixed_s": 3e-4, "read_first_s": 6e-3, "load_C_s": 2e-4, "load_S_s": 5e-4,
            "load_E_s": 7e-4, "load_miss_s": 0.0, "sm_read_s": 1e-3, "exp_read_s": 1e-3 / 3}
    assert set(got) == set(want)
    for key, v in want.items():
        assert got[key] == pytest.approx(v, abs=1e-12), key
    # the fitted model prices every scenario call as it was measured
    fitted = O.apply_engine_terms(dataclasses.replace(
        BASE, sm_read_s=got["sm_read_s"], exp_read_s=got["exp_read_s"]), got)
    for s, m in timed(truth).items():
        assert fitted.layer_makespan(O.scenario_hits(s, K)) == pytest.approx(m, abs=1e-12), s
    # a call that reads one exponent region (S) waits a third of the first-read latency
    assert fitted.layer_makespan({"F": 3, "S": 1}) == pytest.approx(
        3e-4 + 1e-3 / 3 + 2e-3 + 2e-3 + 5e-4 + 5e-4)
    # and a call with two misses, which no scenario timed, as the truth does: 1 + 2 x 4/3 ms
    # of reads (first one 6 ms later), the last one's decode, the matmul, the fixed term
    two = fitted.layer_makespan({"F": 2, "miss": 2})
    assert two == pytest.approx(truth.layer_makespan({"F": 2, "miss": 2}))
    assert two == pytest.approx(6e-3 + 2 * 4e-3 / 3 + 2e-3 + 5e-4 + 3e-4)


def test_a_per_miss_engine_cost_goes_into_the_read_price():
    # a miss's own engine cost (0.8 ms) and its reads are not told apart by the miss calls:
    # the fit puts it into the price of a further miss, and prices both miss calls as measured
    truth = dataclasses.replace(BASE, sm_read_s=1e-3, exp_read_s=1e-3 / 3, read_first_s=5e-3,
                                load_miss_s=8e-4)
    meas = timed(truth)
    got = O.fit_engine_terms(meas, BASE, K)
    assert got["sm_read_s"] + got["exp_read_s"] == pytest.approx(4e-3 / 3 + 8e-4)
    assert got["sm_read_s"] / got["exp_read_s"] == pytest.approx(3.0)   # in the base's ratio
    fitted = O.apply_engine_terms(dataclasses.replace(
        BASE, sm_read_s=got["sm_read_s"], exp_read_s=got["exp_read_s"]), got)
    for s in ("miss", "miss1"):
        assert fitted.layer_makespan(O.scenario_hits(s, K)) == pytest.approx(meas[s])


def test_the_old_fit_went_negative_where_the_new_one_does_not():
    # the calls of the brief's 16-core case in small: 4 misses 2.5x overlapped, one miss at
    # its one-at-a-time read time. Fitting loads on the 4-miss call (version 5) gave a negative
    # per-miss term; the new fit keeps every load >= 0 and prices the one-miss call as timed.
    truth = dataclasses.replace(BASE, sm_read_s=1.2e-3, exp_read_s=0.4e-3, read_first_s=2.4e-3)
    meas = timed(truth)
    old_load_miss = (meas["miss"] - BASE.layer_makespan({"miss": K})
                     - (meas["F"] - BASE.layer_makespan({"F": K}))) / K
    assert old_load_miss < -1e-3
    got = O.fit_engine_terms(meas, BASE, K)
    assert min(got[t] for t in O.TERM_KEYS) >= 0
    fitted = O.apply_engine_terms(dataclasses.replace(
        BASE, sm_read_s=got["sm_read_s"], exp_read_s=got["exp_read_s"]), got)
    assert fitted.layer_makespan({"F": 3, "miss": 1}) == pytest.approx(meas["miss1"])


def test_a_load_cheaper_than_its_base_price_is_not_negative():
    meas = timed(BASE)
    meas["S1"] -= 1e-3        # one S load timed 1 ms under what the base model prices it
    got = O.fit_engine_terms(meas, BASE, K)
    assert got["load_S_s"] == 0.0
    assert got["load_C_s"] == 0.0 and got["load_E_s"] == 0.0


def test_the_read_price_is_kept_without_an_overlap_to_fit_and_bounded_above():
    meas = timed(BASE)
    meas["miss"] = meas["miss1"]            # a further miss measured free: overlap unknown
    got = O.fit_engine_terms(meas, BASE, K)
    assert (got["sm_read_s"], got["exp_read_s"]) == (BASE.sm_read_s, BASE.exp_read_s)
    one = timed(BASE, k=1)                  # top-1: no call with two misses
    got = O.fit_engine_terms(one, BASE, 1)
    assert (got["sm_read_s"], got["exp_read_s"]) == (BASE.sm_read_s, BASE.exp_read_s)
    slow = dataclasses.replace(BASE, sm_read_s=6e-3, exp_read_s=2e-3)   # 8 ms per miss
    got = O.fit_engine_terms(timed(slow), BASE, K, max_read_s=5e-3)
    assert got["sm_read_s"] + got["exp_read_s"] == pytest.approx(5e-3)


def test_read_first_is_on_the_io_side_of_calls_that_read():
    d = dataclasses.replace(BASE, read_first_s=4e-3)
    io, comp = d.io_and_compute(np.array([0, 1, 1]), np.array([0, 1, 0]), np.array([0, 1, 1]))
    io0, _ = BASE.io_and_compute(np.array([0, 1, 1]), np.array([0, 1, 0]), np.array([0, 1, 1]))
    # nothing read: none; an SM region read: all of it; exponent regions only: in proportion
    # to the exponent read (1 of 3 ms)
    assert list(io - io0) == pytest.approx([0.0, 4e-3, 4e-3 / 3])
    assert d.layer_makespan({"F": 4}) == BASE.layer_makespan({"F": 4})
    with pytest.raises(ValueError, match="read_first_s"):
        dataclasses.replace(BASE, read_first_s=-1e-3)


def _calib(version):
    return {"version": version, "sm_read_s": 3e-3, "exp_read_s": 1e-3, "decode_s": 2e-3,
            "matmul_s": 5e-4, "bytes_F": 16, "bytes_sm": 8, "bytes_exp": 3,
            "layer_fixed_s": 3e-4, "load_miss_s": -6e-3, "load_S_s": -4e-3,
            "read_first_s": 2e-3, "direct": False, "cpus": os.cpu_count(),
            "machine": platform.node()}


def test_a_version_5_calibration_keeps_its_base_constants_and_drops_its_engine_terms():
    old = prof.delay_model(_calib(5), 2)
    assert (old.sm_read_s, old.exp_read_s, old.decode_s) == (3e-3, 1e-3, 2e-3)
    assert all(getattr(old, t) == 0.0 for t in O.TERM_KEYS)
    [why] = prof.calibration_mismatch(_calib(5), direct=False)
    assert why == ("it was written by an older zipmoe-rt (calibration version 5, current 6), "
                   "which fitted the engine's load terms on calls whose k experts all load, "
                   "which prices a call loading one expert too cheaply (its engine terms are "
                   "ignored)")
    new = prof.delay_model(_calib(6), 2)
    assert (new.layer_fixed_s, new.load_miss_s, new.read_first_s) == (3e-4, -6e-3, 2e-3)
    assert prof.calibration_mismatch(_calib(6), direct=False) == []
