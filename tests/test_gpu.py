"""The CUDA backend (zipmoe_rt/backends/cupy_cuda.py) and ``--device``.

Without CuPy or a GPU (CI) the GPU tests are skipped with the reason shown; what runs
everywhere: the device option's errors and notice (CuPy hidden), and that a CPU run never
imports CuPy. On a GPU: every backend op against the NumPy reference backend, and for every
tiny spec of tests/tiny_models.py the logits at every position within 1e-3 of transformers and
of the CPU path with the same 20 greedy tokens, unbudgeted and under a memory budget with each
policy. The bit-plane merge and the Huffman decoder: tests/test_gpu_planes.py.
"""
from __future__ import annotations

import os
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import zipmoe_rt
from zipmoe_rt.backends import (DeviceError, DeviceWarning, cuda_unavailable, get_backend,
                                resolve_device)
from zipmoe_rt.models.weights import ExpertWeights

from test_backends import _rope_case  # the op inputs of the CPU backend tests

WHY = cuda_unavailable()
gpu = pytest.mark.skipif(WHY is not None, reason=f"no CUDA backend here: {WHY}")
LOGITS_TOL = 1e-3
ROOT = Path(__file__).resolve().parents[1]


def _hide_cupy(monkeypatch):
    """Make ``import cupy`` fail in this process, as on a CPU-only install."""
    monkeypatch.setitem(sys.modules, "cupy", None)
    import zipmoe_rt.backends as B
    monkeypatch.delitem(B._made, "cuda", raising=False)


# ------------------------------------------------------------------ everywhere


def test_device_option_without_cupy(monkeypatch):
    _hide_cupy(monkeypatch)
    assert cuda_unavailable().startswith("CuPy is not installed")
    assert resolve_device("cpu") == "numba"
    with pytest.raises(DeviceError) as ei:
        resolve_device("cuda")
    msg = str(ei.value)
    assert msg.startswith("--device cuda: CuPy is not installed")
    assert "zipmoe-rt[cuda]" in msg and "zipmoe-rt[cuda13]" in msg and "--device cpu" in msg
    with pytest.warns(DeviceWarning, match="--device auto: CuPy is not installed.*running on "
                                           "the CPU"):
        assert resolve_device("auto") == "numba"
    with pytest.raises(ValueError, match="--device must be one of auto, cpu, cuda, got 'gpu'"):
        resolve_device("gpu")
    with pytest.raises(DeviceError, match=r"backend 'cuda' \(--device cuda\): CuPy is not "
                                          r"installed.*zipmoe-rt\[cuda\]"):
        get_backend("cuda")


def test_cli_device_cuda_without_cupy_is_one_line_error(monkeypatch, tmp_path):
    from click.testing import CliRunner

    from zipmoe_rt.cli import main
    _hide_cupy(monkeypatch)
    model = tmp_path / "m.zmoe"
    model.write_bytes(b"not read: the device is checked first")
    r = CliRunner().invoke(main, ["run", str(model), "-p", "hi", "--device", "cuda"])
    assert r.exit_code == 1
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: --device cuda: CuPy is not "
                                                   "installed")
    assert "zipmoe-rt[cuda]" in lines[0]
    r = CliRunner().invoke(main, ["run", str(model), "-p", "hi", "--device", "tpu"])
    assert r.exit_code == 1 and "'tpu' is not one of 'auto', 'cpu', 'cuda'" in r.output
    for verb in ("run", "chat", "bench", "profile", "calibrate"):
        r = CliRunner().invoke(main, [verb, "--help"])
        assert r.exit_code == 0 and "--device [auto|cpu|cuda]" in r.output, verb


def test_device_auto_without_cupy_runs_on_the_cpu_with_one_notice(monkeypatch, tiny_moe_dir,
                                                                    tmp_path):
    """``run --device auto`` without CuPy: one notice line on stderr, then the same completion
    as ``--device cpu``; ``load(device="auto")`` gives a CPU model and one DeviceWarning."""
    from click.testing import CliRunner
    from test_api import make_chat_model

    from zipmoe_rt.cli import main
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = make_chat_model(tiny_moe_dir("mixtral"), tmp_path / "m")
    _hide_cupy(monkeypatch)
    outs = {}
    for dev in ("cpu", "auto"):
        r = CliRunner().invoke(main, ["run", str(z), "-p", "hello", "--raw", "-n", "8",
                                      "--temp", "0", "--device", dev])
        assert r.exit_code == 0, r.output
        outs[dev] = r.stdout
        notes = [l for l in r.stderr.splitlines() if "warning" in l]
        if dev == "auto":
            assert notes == [f"zipmoe-rt: warning: --device auto: "
                             f"{cuda_unavailable()}; running on the CPU"]
        else:
            assert notes == []
    assert outs["auto"] == outs["cpu"] and outs["cpu"].strip()
    with pytest.warns(DeviceWarning) as rec:
        m = zipmoe_rt.load(z, device="auto")
    assert len(rec) == 1 and m.device == "cpu" and m.net.backend.name == "numba"
    m.close()


def test_host_backends_keep_experts_where_they_are():
    """The device hooks of the host backends: the source itself (no wrapper, no copies) and a
    synchronize that returns at once."""
    class Source:
        hparams: dict = {}
    src = Source()
    for name in ("numba", "numpy"):
        be = get_backend(name)
        assert be.resident_experts(src) is src and be.synchronize() is None


def test_cpu_run_does_not_import_cupy(tiny_moe_dir):
    """Importing the package, the CLI and running a model on the CPU leave CuPy unimported
    (a CPU-only install never needs it), also with device="cpu" resolved."""
    folder = tiny_moe_dir("mixtral")
    code = (
        "import sys, numpy as np, zipmoe_rt, zipmoe_rt.api, zipmoe_rt.cli, zipmoe_rt.backends\n"
        "from zipmoe_rt.backends import resolve_device\n"
        "from zipmoe_rt.models import build_model\n"
        "from zipmoe_rt.models.weights import CheckpointSource\n"
        f"m = build_model(CheckpointSource({str(folder)!r}), backend=resolve_device('cpu'))\n"
        "c = m.new_cache()\n"
        "print(int(np.argmax(m.forward(np.arange(5), c))))\n"
        "print('cupy' in sys.modules)\n")
    path = [str(ROOT), str(ROOT / "format")] + [p for p in os.environ.get(
        "PYTHONPATH", "").split(os.pathsep) if p]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                       timeout=600)
    assert r.returncode == 0, r.stderr
    tok, imported = r.stdout.split()
    assert 0 <= int(tok) < 256 and imported == "False"


# ------------------------------------------------------------------ ops vs the NumPy reference


def _bf16(a) -> np.ndarray:
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _weight(rng, shape, kind):
    w = rng.standard_normal(shape).astype(np.float32) * 0.3
    if kind == "bf16":
        return _bf16(w)
    return w.astype(np.float16 if kind == "f16" else np.float32)


def _close(got, ref, tol=1e-5):
    got, ref = np.asarray(got), np.asarray(ref)
    assert got.shape == ref.shape and got.dtype == ref.dtype == np.float32
    scale = max(float(np.abs(ref).max()), 1e-30)
    np.testing.assert_allclose(got, ref, rtol=tol, atol=tol * scale)


@pytest.fixture(scope="module")
def be():
    if WHY is not None:
        pytest.skip(f"no CUDA backend here: {WHY}")
    return get_backend("cuda")


NP = get_backend("numpy")


def test_arrays(be):
    import cupy as cp
    a = np.arange(6, dtype=np.uint16).reshape(3, 2)
    d = be.from_host(a.T)
    assert isinstance(d, cp.ndarray) and d.flags.c_contiguous and d.dtype == np.uint16
    assert np.array_equal(be.to_host(d), a.T)
    assert be.empty((2, 3)).shape == (2, 3) and be.empty((2, 3)).dtype == np.float32
    z = be.zeros((4,), np.int64)
    assert z.dtype == np.int64 and not be.to_host(z).any()


@pytest.mark.parametrize("kind", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("T,out_in", [(1, (37, 29)), (3, (64, 48)), (1, (1024, 1100)),
                                      (16, (512, 1024)), (7, (300, 64))])
def test_linear(be, kind, T, out_in):
    rng = np.random.default_rng(T + out_in[0])
    W = _weight(rng, out_in, kind)
    x = rng.standard_normal((T, out_in[1])).astype(np.float32)
    b = rng.standard_normal(out_in[0]).astype(np.float32)
    Wd, xd = be.from_host(W), be.from_host(x)
    _close(be.to_host(be.linear(xd, Wd)), NP.linear(x, W))
    out = be.from_host(np.full((T, out_in[0]), np.nan, np.float32))
    assert be.linear(xd, Wd, be.from_host(b), out=out) is out
    _close(be.to_host(out), NP.linear(x, W, b))
    # a row view of a larger array (the model's last-position logits)
    _close(be.to_host(be.linear(xd[T - 1:], Wd)), NP.linear(x[T - 1:], W))
    with pytest.raises(TypeError):
        be.linear(xd, be.from_host(W.astype(np.int32)))


@pytest.mark.parametrize("T,H,I", [(1, 40, 37), (4, 40, 37), (1, 512, 1024), (9, 256, 512)])
def test_swiglu_and_expert_accumulate(be, T, H, I):
    rng = np.random.default_rng(H + T)
    g, u = _weight(rng, (I, H), "bf16"), _weight(rng, (I, H), "bf16")
    d = _weight(rng, (H, I), "bf16")
    x = rng.standard_normal((T, H)).astype(np.float32)
    xd = be.from_host(x)
    _close(be.to_host(be.swiglu(xd, be.from_host(g), be.from_host(u))), NP.swiglu(x, g, u))
    rows = np.arange(T, dtype=np.int64)[::2][::-1].copy()
    w = np.linspace(0.3, 0.9, rows.size).astype(np.float32)
    ref = np.ones((T, H), np.float32)
    NP.expert_accumulate(ref, x, rows, w, ExpertWeights(g, u, d))
    for expert in (ExpertWeights(g, u, d),                                   # host: uploaded
                   ExpertWeights(*(be.from_host(a) for a in (g, u, d)))):  # resident
        out = be.from_host(np.ones((T, H), np.float32))
        be.expert_accumulate(out, xd, rows, w, expert)
        got = be.to_host(out)
        untouched = np.setdiff1d(np.arange(T), rows)
        assert (got[untouched] == 1.0).all()
        _close(got, ref)
    with pytest.raises(ValueError):
        be.expert_accumulate(be.zeros((T, H)), xd, rows, w, ExpertWeights(g, u, g))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("k,H,I", [(1, 40, 37), (3, 40, 37), (2, 320, 640), (8, 64, 48)])
def test_experts_token(be, k, H, I, fused, monkeypatch):
    from zipmoe_rt.backends import cupy_cuda
    monkeypatch.setattr(cupy_cuda, "FUSED_EXPERTS", fused)
    rng = np.random.default_rng(k * H)
    experts = [ExpertWeights(_weight(rng, (I, H), "bf16"), _weight(rng, (I, H), "bf16"),
                             _weight(rng, (H, I), "bf16")) for _ in range(k)]
    x = rng.standard_normal(H).astype(np.float32)
    w = rng.random(k).astype(np.float32)
    ref = np.full(H, 0.5, np.float32)
    NP.experts_token(ref, x, experts, w)
    xs = be.from_host(x[None])
    for ex in (experts, [ExpertWeights(*(be.from_host(a) for a in (e.gate, e.up, e.down)))
                         for e in experts]):              # host (uploaded) and resident
        out = be.from_host(np.full((1, H), 0.5, np.float32))
        be.experts_token(out[0], xs[0], ex, w)
        _close(be.to_host(out)[0] - 0.5, ref - 0.5, tol=1e-4)
    with pytest.raises(ValueError):
        be.experts_token(out[0], xs[0], [ExpertWeights(experts[0].gate, experts[0].up,
                                                       experts[0].gate)], w[:1])


def test_rmsnorm_add_sigmoid_gate(be):
    rng = np.random.default_rng(0)
    for n in (48, 2048, 5000):
        x = rng.standard_normal((5, n)).astype(np.float32) * 3
        w = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
        _close(be.to_host(be.rmsnorm(be.from_host(x), be.from_host(w), 1e-6)),
               NP.rmsnorm(x, w, 1e-6), tol=1e-6)
    out = be.empty(x.shape)
    assert be.rmsnorm(be.from_host(x), be.from_host(w), 1e-6, out=out) is out
    b = rng.standard_normal(x.shape).astype(np.float32)
    a = be.from_host(x)
    assert be.add_(a, be.from_host(b)) is a and np.array_equal(be.to_host(a), x + b)
    g = rng.standard_normal((5, 1)).astype(np.float32)
    y = be.from_host(x)
    be.sigmoid_gate_add_(y, be.from_host(g), be.from_host(b))
    ref = x.copy()
    NP.sigmoid_gate_add_(ref, g, b)
    _close(be.to_host(y), ref, tol=1e-6)


@pytest.mark.parametrize("norm", ["none", "head", "projection"])
@pytest.mark.parametrize("clip", [None, 0.8])
@pytest.mark.parametrize("nq,nkv,hd", [(4, 4, 16), (4, 2, 16), (6, 1, 8), (8, 2, 128)])
def test_rope_qk_cache(be, norm, clip, nq, nkv, hd):
    rng = np.random.default_rng(nq * 10 + nkv + hd)
    T, pos0 = 3, 5
    qkv, cos, sin, kc, vc = _rope_case(rng, T, nq, nkv, hd, pos0, 12)
    sizes = {"none": (0, 0), "head": (hd, hd), "projection": (nq * hd, nkv * hd)}[norm]
    qn, kn = ((1 + 0.2 * rng.standard_normal(n)).astype(np.float32) for n in sizes)
    a, kk, vv = qkv.copy(), kc.copy(), vc.copy()
    NP.rope_qk_cache(a, nq, nkv, hd, qn, kn, np.float32(1e-6), cos, sin, kk, vv, pos0, clip)
    d = [be.from_host(v) for v in (qkv, kc, vc)]
    be.rope_qk_cache(d[0], nq, nkv, hd, be.from_host(qn), be.from_host(kn), np.float32(1e-6),
                     be.from_host(cos), be.from_host(sin), d[1], d[2], pos0, clip)
    for got, ref in zip(d, (a, kk, vv)):
        _close(be.to_host(got), ref, tol=1e-6)
    assert np.array_equal(be.to_host(d[1])[:, :pos0], kc[:, :pos0])     # untouched slots
    assert np.array_equal(be.to_host(d[2])[:, pos0:pos0 + T], vv[:, pos0:pos0 + T])
    with pytest.raises(ValueError, match="clip must be >= 0"):
        be.rope_qk_cache(d[0], nq, nkv, hd, be.from_host(qn), be.from_host(kn),
                         np.float32(1e-6), be.from_host(cos), be.from_host(sin), d[1], d[2],
                         pos0, -1.0)


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("T,pos0,nq,nkv,hd", [(1, 9, 4, 2, 16), (5, 0, 4, 2, 16),
                                              (4, 6, 6, 3, 8), (16, 48, 8, 2, 64),
                                              (2, 300, 4, 1, 128), (1, 40, 2, 2, 256)])
def test_attention(be, window, T, pos0, nq, nkv, hd):
    rng = np.random.default_rng(T * 100 + pos0 + window)
    qkv, _, _, kc, vc = _rope_case(rng, T, nq, nkv, hd, pos0, pos0 + T + 3)
    scale = np.float32(hd ** -0.5)
    ref = NP.attention(qkv, nq, nkv, hd, kc, vc, pos0, window, scale,
                       np.full((T, nq * hd), np.nan, np.float32))
    kd, vd = be.from_host(kc), be.from_host(vc)
    out = be.from_host(np.full((T, nq * hd), np.nan, np.float32))
    assert be.attention(be.from_host(qkv), nq, nkv, hd, kd, vd, pos0, window, scale, out) is out
    _close(be.to_host(out), ref, tol=1e-5)
    kd[:, pos0 + T:] = 1e6                   # stale slots past the visible range do not matter
    again = be.attention(be.from_host(qkv), nq, nkv, hd, kd, vd, pos0, window, scale,
                         be.empty((T, nq * hd)))
    assert np.array_equal(be.to_host(again), be.to_host(out))


@pytest.mark.parametrize("renorm", [False, True])
@pytest.mark.parametrize("T,E,k", [(7, 8, 3), (1, 64, 8), (40, 128, 2)])
def test_route(be, renorm, T, E, k):
    rng = np.random.default_rng(int(renorm) + E)
    logits = (rng.standard_normal((T, E)) * 2).astype(np.float32)
    logits[0] = 0.5           # all tied: experts 0, 1, 2 ... in that order
    i1, w1 = be.route(be.from_host(logits), k, renorm)
    i2, w2 = NP.route(logits, k, renorm)
    assert isinstance(i1, np.ndarray) and i1.dtype == np.int64 and w1.dtype == np.float32
    assert np.array_equal(i1, i2) and list(i1[0]) == list(range(k))
    _close(w1, w2, tol=1e-6)


@pytest.mark.parametrize("nq,nkv,hd,half", [(4, 2, 16, 4), (6, 1, 12, 3), (2, 2, 64, 16)])
def test_rope_qk_cache_partial_rotary(be, nq, nkv, hd, half):
    """Tables narrower than half the head (partial rotary, GLM-4-MoE): pairs i, i + half
    rotate, the last hd - 2 * half dimensions of q and k pass unchanged (also into the cache)."""
    rng = np.random.default_rng(hd + half)
    T, pos0 = 3, 2
    qkv, cos, sin, kc, vc = _rope_case(rng, T, nq, nkv, hd, pos0, 8)
    cos, sin = np.ascontiguousarray(cos[:, :half]), np.ascontiguousarray(sin[:, :half])
    e = np.zeros(0, np.float32)
    a, kk, vv = qkv.copy(), kc.copy(), vc.copy()
    NP.rope_qk_cache(a, nq, nkv, hd, e, e, np.float32(1e-6), cos, sin, kk, vv, pos0)
    assert np.array_equal(a.reshape(T, -1, hd)[:, :nq + nkv, 2 * half:],
                          qkv.reshape(T, -1, hd)[:, :nq + nkv, 2 * half:])
    d = [be.from_host(v) for v in (qkv, kc, vc)]
    be.rope_qk_cache(d[0], nq, nkv, hd, be.from_host(e), be.from_host(e), np.float32(1e-6),
                     be.from_host(cos), be.from_host(sin), d[1], d[2], pos0)
    for got, ref in zip(d, (a, kk, vv)):
        _close(be.to_host(got), ref, tol=1e-6)
    with pytest.raises(ValueError, match="RoPE tables of width"):
        wide = be.from_host(np.ones((T, hd // 2 + 1), np.float32))
        be.rope_qk_cache(d[0], nq, nkv, hd, be.from_host(e), be.from_host(e), np.float32(1e-6),
                         wide, wide, d[1], d[2], pos0)


@pytest.mark.parametrize("T,pos0,nq,hd", [(5, 0, 4, 96), (1, 20, 8, 576), (3, 7, 2, 640)])
def test_attention_wide_heads(be, T, pos0, nq, hd):
    """MLA's latent queries: one kv head of width kv_lora_rank + qk_rope_head_dim (up to 640),
    k and v the same cache; wider heads are refused by name."""
    rng = np.random.default_rng(hd + T)
    qkv, _, _, kc, _ = _rope_case(rng, T, nq, 1, hd, pos0, pos0 + T)
    q = np.ascontiguousarray(qkv[:, :nq * hd])
    scale = np.float32(0.1)
    ref = NP.attention(q, nq, 1, hd, kc, kc, pos0, 0, scale, np.empty((T, nq * hd), np.float32))
    kd = be.from_host(kc)
    got = be.attention(be.from_host(q), nq, 1, hd, kd, kd, pos0, 0, scale, be.empty((T, nq * hd)))
    _close(be.to_host(got), ref, tol=1e-5)
    with pytest.raises(ValueError, match="head_dim 648 > 640"):
        be.attention(be.zeros((1, 648)), 1, 1, 648, be.zeros((1, 2, 648)), be.zeros((1, 2, 648)),
                     0, 0, scale, be.empty((1, 648)))


@pytest.mark.parametrize("kind", ["bf16", "f32"])
@pytest.mark.parametrize("nh,T,n_out,n_in", [(3, 1, 24, 16), (4, 9, 16, 40), (2, 5, 128, 64)])
def test_heads_linear(be, kind, nh, T, n_out, n_in):
    rng = np.random.default_rng(nh * T + n_out)
    W = _weight(rng, (nh, n_out, n_in), kind)
    x = rng.standard_normal((nh, T, n_in)).astype(np.float32)
    ref = NP.heads_linear(x, W)
    got = be.heads_linear(be.from_host(x), be.from_host(W))
    _close(be.to_host(got), ref)
    out = be.from_host(np.full((nh, T, n_out), np.nan, np.float32))
    assert be.heads_linear(be.from_host(x), be.from_host(W), out) is out
    _close(be.to_host(out), ref)
    with pytest.raises(ValueError, match="heads_linear"):
        be.heads_linear(be.from_host(x[:, :, :-1]), be.from_host(W))


def test_layer_norm_and_scale(be):
    rng = np.random.default_rng(5)
    for n in (24, 3000):
        x = (rng.standard_normal((4, n)) * 3 + 1).astype(np.float32)
        w = (1 + 0.2 * rng.standard_normal(n)).astype(np.float32)
        b = (0.1 * rng.standard_normal(n)).astype(np.float32)
        ref = NP.layer_norm(x, w, b, 1e-5)
        _close(be.to_host(be.layer_norm(be.from_host(x), be.from_host(w), be.from_host(b), 1e-5)),
               ref, tol=1e-5)
        out = be.empty(x.shape)
        assert be.layer_norm(be.from_host(x), be.from_host(w), be.from_host(b), 1e-5,
                             out=out) is out
        _close(be.to_host(out), ref, tol=1e-5)
    for divide in (False, True):
        d = be.from_host(x.copy())
        assert be.scale_(d, 0.37, divide) is d
        assert np.array_equal(be.to_host(d), NP.scale_(x.copy(), 0.37, divide))


@pytest.mark.parametrize("scoring,method,n_group,topk_group,biased,scale", [
    ("sigmoid", "noaux_tc", 4, 2, True, 2.5), ("softmax", "group_limited_greedy", 4, 2, False,
                                                16.0), ("sigmoid", "greedy", 1, 1, True, 1.0)])
def test_route_grouped_biased_scaled(be, scoring, method, n_group, topk_group, biased, scale):
    rng = np.random.default_rng(n_group + int(biased))
    T, E, k = 9, 16, 4
    logits = (rng.standard_normal((T, E)) * 2).astype(np.float32)
    bias = (0.3 * rng.standard_normal(E)).astype(np.float32) if biased else None
    for renorm in (False, True):
        i1, w1 = be.route(be.from_host(logits), k, renorm, scoring, method, n_group, topk_group,
                          bias, scale)
        i2, w2 = NP.route(logits, k, renorm, scoring, method, n_group, topk_group, bias, scale)
        assert np.array_equal(i1, i2) and w1.dtype == np.float32
        _close(w1, w2, tol=1e-6)
    with pytest.raises(ValueError, match="n_group 3 does not divide"):
        be.route(be.from_host(logits), k, True, scoring, method, 3, 1, bias, scale)


def test_route_sparsemixer_and_choice_bias(be):
    rng = np.random.default_rng(11)
    logits = (rng.standard_normal((7, 8)) * 2).astype(np.float32)
    for eps in (0.01, 0.5):
        i1, w1 = be.route_sparsemixer(be.from_host(logits), eps)
        i2, w2 = NP.route_sparsemixer(logits, eps)
        assert np.array_equal(i1, i2) and np.array_equal(w1, w2)
    bias = (0.5 * rng.standard_normal(8)).astype(np.float32)
    i1, w1 = be.route_choice_bias(be.from_host(logits), 3, be.from_host(bias), 1e-12)
    i2, w2 = NP.route_choice_bias(logits, 3, bias, 1e-12)
    assert np.array_equal(i1, i2) and np.array_equal(w1, w2)
    with pytest.raises(ValueError, match="3 bias values for 8 experts"):
        be.route_choice_bias(be.from_host(logits), 3, be.from_host(bias[:3]), 1e-12)


@pytest.mark.parametrize("kind", ["bf16", "f16", "f32"])
def test_embed(be, kind):
    rng = np.random.default_rng(2)
    W = _weight(rng, (50, 24), kind)
    ids = np.array([3, 0, 49, 3])
    got = be.to_host(be.embed(be.from_host(W), ids))
    assert got.dtype == np.float32 and np.array_equal(got, NP.embed(W, ids))
    for bad in (50, -1):
        with pytest.raises(IndexError):
            be.embed(be.from_host(W), np.array([bad]))


# ------------------------------------------------------------------ whole models (GPU)

from tiny_models import SPECS  # noqa: E402 - after the op tests

#: families whose model the CUDA backend refuses, with the reason (none at present)
CUDA_REFUSED: dict[str, str] = {}
GPU_SPECS = [pytest.param(n, marks=pytest.mark.skip(reason=CUDA_REFUSED[SPECS[n][0]]))
             if SPECS[n][0] in CUDA_REFUSED else n for n in SPECS]

PROMPT = np.random.default_rng(1).integers(0, 256, 16)
STEPS = 20


def _run(model, prompt=PROMPT, steps=STEPS):
    """Every prompt position's logits, then ``steps`` greedy tokens through the cache (which
    starts small so it grows): (list of [T, vocab] host logits, tokens)."""
    cache = model.new_cache(capacity=4)
    logits = [model.forward(prompt, cache, last_only=False)]
    toks = []
    for _ in range(steps):
        toks.append(int(np.argmax(logits[-1][-1])))
        logits.append(model.forward(np.array(toks[-1:]), cache, last_only=False))
    return logits, toks


def _hf_run(hf, prompt=PROMPT, steps=STEPS):
    """transformers: prompt logits and ``steps`` greedy tokens, full recompute each step."""
    import torch
    seq = list(prompt)
    with torch.no_grad():
        first = hf(torch.tensor(np.asarray(seq))[None]).logits[0].numpy()
        for _ in range(steps):
            lg = hf(torch.tensor(np.asarray(seq))[None]).logits[0, -1].numpy()
            seq.append(int(np.argmax(lg)))
    return first, seq[len(prompt):]


def hf_glu_from_config(hf) -> bool:
    """Give a gpt-oss model of an older transformers the config's ``swiglu_alpha`` /
    ``swiglu_limit``: transformers up to 5.17 fixes ``GptOssExperts.alpha = 1.702`` and
    ``limit = 7.0`` and ignores config.json's values, which later releases read
    (``modeling_gpt_oss.py``); the tiny specs set other values so that the clamp bites. A no-op
    on other models and where the experts already hold the config's values.

    Returns:
        whether any module was changed.
    """
    cfg = hf.config
    alpha, limit = getattr(cfg, "swiglu_alpha", None), getattr(cfg, "swiglu_limit", None)
    if alpha is None or limit is None:
        return False
    changed = False
    for mod in hf.modules():
        if type(mod).__name__ == "GptOssExperts" and (mod.alpha, mod.limit) != (alpha, limit):
            mod.alpha, mod.limit = alpha, limit
            changed = True
    return changed


def _load_hf(folder):
    """transformers' float32 model of ``folder`` (tiny_models.load_hf), gpt-oss's clamp
    parameters from its config (:func:`hf_glu_from_config`)."""
    from tiny_models import load_hf
    hf = load_hf(folder)
    if hf_glu_from_config(hf):
        import transformers
        print(f"transformers {transformers.__version__}: GptOssExperts given the config's "
              f"swiglu_alpha / swiglu_limit")
    return hf


def _max_diff(a, b) -> float:
    return max(float(np.abs(x - y).max()) for x, y in zip(a, b))


def test_hf_glu_from_config_sets_the_clamp_of_older_transformers(tiny_moe_dir):
    """The parity reference on a machine with an older transformers (5.17 fixes gpt-oss's
    clamp at alpha 1.702, limit 7.0): hf_glu_from_config gives the experts the config's values
    (here those of the spec, 0.3 and 1.702), once; other families are left alone."""
    from tiny_models import load_hf
    hf = load_hf(tiny_moe_dir("gpt_oss_sizes"))
    experts = [m for m in hf.modules() if type(m).__name__ == "GptOssExperts"]
    assert len(experts) == SPECS["gpt_oss_sizes"][1]["num_hidden_layers"]
    for m in experts:                   # as transformers 5.17 builds them
        m.alpha, m.limit = 1.702, 7.0
    assert hf_glu_from_config(hf)
    assert {(m.alpha, m.limit) for m in experts} == {(1.2, 0.5)}
    assert not hf_glu_from_config(hf)
    assert not hf_glu_from_config(load_hf(tiny_moe_dir("mixtral")))


@gpu
@pytest.mark.parametrize("name", GPU_SPECS)
def test_model_on_gpu_matches_transformers_and_cpu(tiny_moe_dir, name):
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource
    folder = tiny_moe_dir(name)
    cpu = build_model(CheckpointSource(folder))
    be = get_backend("cuda")
    src = CheckpointSource(folder)
    dev = build_model(src, executor=_resident_executor(src, be), backend="cuda")
    assert dev.backend is be and dev.executor.backend is be
    (lg, tg), (lc, tc) = _run(dev), _run(cpu)
    hf_first, hf_tokens = _hf_run(_load_hf(folder))
    d_hf = float(np.abs(lg[0] - hf_first).max())
    d_cpu = _max_diff(lg, lc)
    print(f"{name}: max|dlogit| GPU vs transformers {d_hf:.2e}, GPU vs CPU {d_cpu:.2e}")
    assert lg[0].shape == (16, cpu.config.vocab_size) and lg[0].dtype == np.float32
    assert d_hf <= LOGITS_TOL and d_cpu <= LOGITS_TOL
    assert tg == tc == hf_tokens and len(tg) == STEPS
    # prefill in pieces (GEMV path for 3 tokens, cuBLAS for 13) gives the same logits
    cache = dev.new_cache(capacity=2)
    a = dev.forward(PROMPT[:3], cache, last_only=False)
    b = dev.forward(PROMPT[3:], cache, last_only=False)
    assert np.abs(np.concatenate([a, b]) - lg[0]).max() <= 1e-4


def _resident_executor(source, be):
    from zipmoe_rt.models.moe import ExpertExecutor
    return ExpertExecutor(be.resident_experts(source), be)


@pytest.fixture(scope="module")
def chat_models(tiny_moe_dir, tmp_path_factory):
    """name -> (zmoe path with a tokenizer, raw-expert companion, trace path)."""
    from test_api import make_chat_model

    from zipmoe_rt.bench import raw_companion
    from zipmoe_rt.engine import profile as prof
    made = {}

    def get(name):
        if name not in made:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                z = make_chat_model(tiny_moe_dir(name), tmp_path_factory.mktemp("gpu") / name)
            raw = raw_companion(z)
            m = zipmoe_rt.load(z)
            tr = prof.record_trace(m, ["hello world", "the cat sat"], max_tokens=8, chat=False,
                                   progress=False)
            m.close()
            made[name] = (z, raw, prof.save_trace(tr, z.with_suffix(".trace.json")))
        return made[name]

    return get


@gpu
@pytest.mark.parametrize("name", GPU_SPECS)
def test_load_device_cuda_with_and_without_budget(chat_models, name):
    """zipmoe_rt.load(device="cuda"): unbudgeted (experts resident on the GPU) and under a
    memory budget with each policy (tiers in GPU memory, misses decoded on the GPU): the
    same tokens as the CPU load, logits within 1e-3; budgeted GPU runs equal the unbudgeted GPU
    run bit for bit (same kernels, same summation order)."""
    z, raw, trace = chat_models(name)
    ids = np.random.default_rng(3).integers(0, 256, 12)
    cpu = zipmoe_rt.load(z, device="cpu")
    ref_l, ref_t = _run(cpu.net, ids)
    cpu.close()
    m = zipmoe_rt.load(z, device="cuda")
    assert m.device == "cuda" and m.net.backend.name == "cuda"
    gl, gt = _run(m.net, ids)
    assert m.memory_report()["experts"] > 0                    # held on the GPU
    m.close()
    print(f"{name}: load(device='cuda') max|dlogit| vs device='cpu' {_max_diff(gl, ref_l):.2e}, "
          f"greedy {STEPS} tokens identical: {gt == ref_t}")
    assert gt == ref_t and _max_diff(gl, ref_l) <= LOGITS_TOL
    for policy, path in (("zip-lru", z), ("raw-lru", raw), ("zipmoe", z)):
        from zipmoe_rt.engine.store import ZmoeSource
        src = ZmoeSource(path)
        k, full = int(src.hparams["num_experts_per_tok"]), max(
            l.full_bytes for l in src.layouts.values())
        budget = src.dense_bytes() + (k + 1) * full
        if policy == "zipmoe":      # room for the planned tiers beyond the working set
            budget = src.dense_bytes() + max((k + 1) * full, sum(
                l.full_bytes for l in src.layouts.values()) // 2)
        src.close()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")               # calibration notes (zipmoe)
            b = zipmoe_rt.load(path, device="cuda", memory_budget=budget, policy=policy,
                               trace=trace, workers=2)
        try:
            assert b.engine.backend.name == "cuda" and b.engine.policy == policy
            bl, bt = _run(b.net, ids)
            assert bt == gt, policy
            assert all(np.array_equal(x, y) for x, y in zip(bl, gl)), policy
            if policy != "zipmoe":
                assert b.engine.stats.hits["miss"] > 0     # evicted and reloaded
        finally:
            b.close()


@gpu
def test_device_auto_picks_cuda():
    assert resolve_device("auto") == "cuda" and resolve_device("cuda") == "cuda"
    assert get_backend("cuda").name == "cuda"


@gpu
def test_cli_run_on_gpu(chat_models):
    """``zipmoe-rt run --device cuda`` prints the same completion as ``--device cpu``."""
    from click.testing import CliRunner

    from zipmoe_rt.cli import main
    z = chat_models("qwen2_moe")[0]
    outs = {}
    for dev in ("cpu", "cuda"):
        r = CliRunner().invoke(main, ["run", str(z), "-p", "hello", "--raw", "-n", "12",
                                      "--temp", "0", "--device", dev])
        assert r.exit_code == 0, r.output
        outs[dev] = r.stdout
    assert outs["cpu"] == outs["cuda"] and outs["cpu"].strip()


# ------------------------------------------------------------------ experts beyond the GPU budget
# (zipmoe_rt/engine/gpu_engine.py; the same engine on host arrays: tests/test_gpu_offload.py)


@gpu
@pytest.mark.parametrize("name", GPU_SPECS)
def test_gpu_budget_reloads_through_pcie_and_gpu_decode(chat_models, name):
    """Under a GPU budget, each policy, host cache empty (misses read from the file into pinned
    staging) and full (--host-budget 100%): logits bit-identical to the unbudgeted GPU run with
    the same 20 greedy tokens; experts really evicted and brought back over PCIe, compressed
    ones decoded by the GPU segment kernel."""
    from zipmoe_rt.engine.gpu_engine import GpuExpertEngine
    from zipmoe_rt.engine.gpu_meta import gpu_decodable
    from zipmoe_rt.engine.store import ZmoeSource
    z, raw, trace = chat_models(name)
    ids = np.random.default_rng(3).integers(0, 256, 12)
    m = zipmoe_rt.load(z, device="cuda")
    gl, gt = _run(m.net, ids)
    m.close()
    for policy, path in (("zip-lru", z), ("raw-lru", raw), ("zipmoe", z)):
        src = ZmoeSource(path)
        # experts the GPU segment decoder does not take are decoded on the host and uploaded
        # (gpu_meta.gpu_decodable: F16/F32 pieces, zstd-coded exponents)
        on_gpu = all(gpu_decodable(l) for l in src.layouts.values())
        k, full = int(src.hparams["num_experts_per_tok"]), max(
            l.full_bytes for l in src.layouts.values())
        budget = src.dense_bytes() + (k + 1) * full
        if policy == "zipmoe":
            budget = src.dense_bytes() + max((k + 1) * full, sum(
                l.full_bytes for l in src.layouts.values()) // 2)
        src.close()
        for hb in (None, "100%"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                b = zipmoe_rt.load(path, device="cuda", memory_budget=budget, policy=policy,
                                   trace=trace, workers=2, host_budget=hb)
            try:
                eng = b.engine
                assert isinstance(eng, GpuExpertEngine) and eng.ops.name == "cuda"
                bl, bt = _run(b.net, ids)
                where = (policy, hb)
                assert bt == gt, where
                assert all(np.array_equal(x, y) for x, y in zip(bl, gl)), where
                st = eng.stats
                # uses that cross PCIe (S, E, miss) and that are decoded (C too); zipmoe may
                # hold every expert the prompt uses in its planned tiers; the LRU pools must
                # miss and reload
                pcie = sum(st.hits[t] for t in ("S", "E", "miss"))
                decoded = pcie + st.hits["C"] > 0
                assert (st.uploads > 0 and st.pcie_bytes > 0) == (pcie > 0), where
                if policy != "zipmoe":
                    assert st.hits["miss"] > 0, where
                assert (st.gpu_decodes > 0) == (policy != "raw-lru" and decoded and on_gpu), where
                assert (st.host_decodes > 0) == (decoded and not on_gpu), where
                assert (st.file_misses == 0) if hb else (st.host_hits == 0), where
                # a call's misses at hand (host cache) are decoded in one launch per call
                assert st.batches <= st.gpu_decodes, where
                if hb and policy == "zip-lru" and on_gpu and k > 1:
                    assert 0 < st.batches < st.gpu_decodes, where
                g = eng.gpu_report()
                assert g["gpu_decode_s"] >= 0 and g["device"]
                print(f"{name} {policy} host {hb}: {st.uploads} uploads, "
                      f"{st.pcie_bytes / 1e3:.0f} kB over PCIe, {st.gpu_decodes} GPU decodes "
                      f"in {st.batches} launches")
            finally:
                b.close()
            if hb and policy == "zip-lru":      # one launch per miss: the same words
                from zipmoe_rt.engine import gpu_batch
                gpu_batch.BATCHED = False
                try:
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        b = zipmoe_rt.load(path, device="cuda", memory_budget=budget,
                                           policy=policy, workers=2, host_budget=hb)
                    ul, ut = _run(b.net, ids)
                    assert ut == gt and b.engine.stats.batches == 0
                    assert all(np.array_equal(x, y) for x, y in zip(ul, gl))
                finally:
                    gpu_batch.BATCHED = True
                    b.close()
