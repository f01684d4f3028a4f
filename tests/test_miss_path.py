"""The miss path of the budgeted engine (zipmoe_rt/engine/pipeline.py): what a miss costs
besides its read and decode.

* CRC-32: every region read from the file is checked the first time the engine reads it, not
  at every later read of the same region (the file stays open and each read checks that it
  did not change), and outputs stay those of the unbudgeted model; a region that fails is
  still caught at its first read (tests/test_engine.py's corruption tests).
* tools/limit_ab.py (the miss path's benchmark under a memory cgroup): its ``--row`` values.
"""
from __future__ import annotations

import sys
from pathlib import Path

import pytest

from zipmoe_rt.engine import layout as L_
from zipmoe_rt.models import build_model

from test_engine import (DECODE_STEPS, assert_same_logits, generate, make_engine,  # noqa: F401
                         tiny_case)


def test_each_region_is_crc_checked_once_however_often_it_is_read(tiny_case, monkeypatch):
    case = tiny_case("mixtral")
    checked = []
    real = L_.check_regions

    def counting(path, lay, sm, exp):
        checked.append((lay.layer, lay.expert, "sm" if sm is not None else "exp"))
        return real(path, lay, sm, exp)

    monkeypatch.setattr(L_, "check_regions", counting)
    source, engine, _ = make_engine(case, case.budget("min"), "zip-lru")   # every use a miss
    try:
        logits, tokens = generate(build_model(source, executor=engine), case.ids, DECODE_STEPS)
        st = engine.stats
        assert_same_logits(logits, case.ref_logits)
        assert tokens == case.ref_tokens
        assert len(checked) == len(set(checked)) == len(engine._verified)
        n_regions = 2 * len(case.layouts)
        assert 0 < len(checked) <= n_regions
        assert st.reads > len(checked)          # regions were read again, not checked again
        assert st.verify_s > 0.0
        # reverify(): every region read from then on is checked again, once
        first = len(checked)
        engine.reverify()
        logits, tokens = generate(build_model(source, executor=engine), case.ids, DECODE_STEPS)
        assert tokens == case.ref_tokens
        again = checked[first:]
        assert 0 < len(again) == len(set(again)) <= n_regions
    finally:
        engine.close()
        source.close()


def test_limit_ab_rows_parse_and_bad_rows_name_the_option():
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
    import limit_ab
    name, where, opts = limit_ab.parse_row("on=--prefetch on")
    assert (name, where, opts) == ("on", limit_ab.REPO, ["--prefetch", "on"])
    name, where, opts = limit_ab.parse_row("before@/tmp/x=--prefetch off --io-depth 2")
    assert (name, where, opts) == ("before", Path("/tmp/x"), ["--prefetch", "off", "--io-depth",
                                                              "2"])
    for bad in ("on", "=--prefetch on"):
        with pytest.raises(SystemExit, match=r"--row .*NAME=OPTIONS"):
            limit_ab.parse_row(bad)
