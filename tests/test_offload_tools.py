"""The routings of tools/gpu_offload_bench.py (tools/offload_model.py) against cross-layer
prefetch: ``predictable`` routing is predicted exactly by the look-ahead (the bound the
benchmark measures), ``uniform`` routing is not; neither changes what the budgeted engine
computes (logits equal the unbudgeted run's under the same routing)."""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

from test_engine import WORKERS, tiny_case  # noqa: F401
from zipmoe_rt.engine.gpu_engine import GpuExpertEngine
from zipmoe_rt.engine.gpu_ops import HostOps
from zipmoe_rt.engine.prefetch import attach
from zipmoe_rt.engine.store import ZmoeSource
from zipmoe_rt.models import build_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tools"))
import offload_model  # noqa: E402


def _decode(net, ids, steps):
    """Prefill ``ids`` then ``steps`` teacher-forced tokens, the routing's step set before each
    forward pass as the benchmark sets it: the logits of every pass."""
    cache = net.new_cache()
    offload_model.ROUTE_STEP[0] = 0
    out = [net.forward(np.asarray(ids, np.int64), cache)]
    for i in range(steps):
        offload_model.ROUTE_STEP[0] = 1 + i
        out.append(net.forward(np.array([int(ids[i % len(ids)])], np.int64), cache))
    return out


@pytest.mark.parametrize("mode", ["predictable", "uniform"])
def test_predictable_routing_is_predicted_exactly(tiny_case, mode):
    case = tiny_case("mixtral")
    try:
        offload_model.uniform_routing(True, by_step=mode == "predictable")
        src0 = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
        ref = _decode(build_model(src0), case.ids, 8)
        src0.close()
        source = ZmoeSource(case.zmoe, keep_experts=False, copy_dense=True)
        eng = GpuExpertEngine(source, case.dense + 2 * case.k * case.bytes_F, "zip-lru",
                              workers=WORKERS, ops=HostOps(), prefetch=True)
        try:
            net = build_model(source, executor=eng)
            assert attach(net, eng) > 0
            got = _decode(net, case.ids, 8)
            assert all(np.array_equal(a, b) for a, b in zip(got, ref))
            rep = eng.prefetch_report()
            if mode == "predictable":
                assert rep["recall"] == 1.0 and rep["wasted_bytes"] == 0
                assert rep["used"] == rep["issued"] > 0
            else:
                assert rep["recall"] < 1.0
        finally:
            eng.close()
            source.close()
    finally:
        offload_model.uniform_routing(False)
        offload_model.ROUTE_STEP[0] = 0
