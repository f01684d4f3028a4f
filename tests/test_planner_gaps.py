"""Planner and ``auto`` details: calibration versions, the shared pool's size in the form the
cache holds, the F-pool replay with compute-form C slots, and what the banner says about the
C tier (zipmoe_rt/engine/calibration.py, engine/factory.py, engine/planner/)."""
from __future__ import annotations

import os
import platform

from zipmoe_rt.engine import profile as prof


def test_a_version_4_calibration_is_flagged_for_remeasuring():
    # version 4 could time the C tier's engine load on compute-form C slots; a run warns and
    # names the command that re-measures it
    ok = {"version": prof.CALIB_VERSION, "direct": False, "cpus": os.cpu_count(),
          "machine": platform.node()}
    assert prof.calibration_mismatch(ok, direct=False) == []
    [why] = prof.calibration_mismatch(dict(ok, version=4), direct=False)
    assert why == ("it was written by an older zipmoe-rt (calibration version 4, current "
                   f"{prof.CALIB_VERSION}), which may have timed the C tier's engine load on "
                   "compute-form C slots")
