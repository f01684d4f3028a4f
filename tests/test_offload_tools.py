"""The routings of tools/gpu_offload_bench.py (tools/offload_model.py) against cross-layer
prefetch: ``predictable`` routing is predicted exactly by the look-ahead (the bound the
benchmark measures), ``uniform`` routing is not; neither changes what the budgeted engine
computes (logits equal the unbudgeted run's under the same routing); the benchmark's plan
cache (``offload_model.plan_once``) returns the plan of equal inputs."""
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


def test_plan_once_reuses_the_plan_of_equal_inputs(monkeypatch):
    """offload_model.plan_once: make_plan returns the plan made before for an equal trace,
    delay model, tier bytes and top-k (the very object), and plans anew when one differs."""
    from zipmoe_rt.engine import profile as prof
    from zipmoe_rt.engine.planner import DelayModel
    monkeypatch.setattr(prof, "make_plan", prof.make_plan)     # undone after the test
    rng = np.random.default_rng(0)
    L, N, k = 2, 8, 2
    run = [[rng.choice(N, k, replace=False).tolist() for _ in range(L)] for _ in range(24)]
    counts = np.zeros((L, N), np.int64)
    for row in run:
        for i in range(L):
            counts[i, row[i]] += 1
    trace = {"counts": counts, "sequences": [np.asarray(run)]}
    d = DelayModel(sm_read_s=2e-3, exp_read_s=1e-3, decode_s=5e-3, matmul_s=1e-3, workers=2,
                   bytes_F=1000, bytes_sm=500, bytes_exp=300)
    offload_model.plan_once()
    offload_model.plan_once()                                   # idempotent
    a = prof.make_plan(trace, d, 4000, k)
    b = prof.make_plan({"counts": counts.tolist(), "sequences": [run]}, d, 4000, k)
    assert a is b
    c = prof.make_plan(trace, d, 3000, k)
    assert c is not a and c[1] == a[1]


def test_check_cuda_sources_reads_the_sources_without_importing_cupy():
    """tools/check_cuda_sources.py takes each SOURCE and the decoder's variants from the files
    as literals (the same strings the modules hold), so it runs where CuPy is absent."""
    import check_cuda_sources as C
    from zipmoe_rt.kernels import cuda_segdec_src, cuda_src
    seg = str(C.ROOT / "zipmoe_rt" / "kernels" / "cuda_segdec_src.py")
    assert C.module_constant(seg, "SOURCE") == cuda_segdec_src.SOURCE
    assert C.module_constant(seg, "KERNELS") == cuda_segdec_src.KERNELS
    assert C.module_constant(str(C.ROOT / "zipmoe_rt" / "kernels" / "cuda_src.py"),
                             "SOURCE") == cuda_src.SOURCE
    defs = C.segdec_defines()
    assert defs["t128"] == ["-DSD_T=128", "-DSD_ROUND=256", "-DSD_SMEM_TAB=0"]
    assert defs["t64s"][-1] == "-DSD_SMEM_TAB=1"
    assert len(C.SOURCES) == 5 and all(Path(p).is_file() for p in C.SOURCES)
    with pytest.raises(KeyError, match="NOPE"):
        C.module_constant(seg, "NOPE")


def test_check_cuda_sources_compiles_and_reports_a_broken_kernel():
    """With NVRTC installed (the nvidia-cuda-nvrtc wheel): every source compiles, and a broken
    kernel is reported with the compiler's log."""
    nvrtc = pytest.importorskip("nvidia.cuda_nvrtc", reason="NVRTC wheel not installed")
    del nvrtc
    import check_cuda_sources as C
    lib = C.find_nvrtc(None)
    ok, log = C.compile_source(lib, 'extern "C" __global__ void k(int* x) { x[0] = y; }',
                               ["-arch=compute_90"])
    assert not ok and "identifier \"y\" is undefined" in log
    assert C.main(["--arch", "compute_90"]) == 0
