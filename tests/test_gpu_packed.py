"""Compressed experts computed in place on the GPU (``load(device="cuda", resident="compressed")``;
zipmoe_rt/backends/cuda_packed.py, zipmoe_rt/kernels/cuda_packed_src.py).

Everywhere: the GPU layout of the compute form decoded with the kernels' bit formula (emulated
in NumPy) gives back every BF16 pattern, escapes and the base + 15 wrap included; without CuPy
``device="cuda", resident="compressed"`` is the device error, not a refusal of the mode.
On a GPU: the fused decode + GEMV kernels equal the BF16 GPU kernels bit for bit on the same
weights (one token's k experts fused and one by one, 1 to 7 rows, the unpacked cuBLAS path from
8 rows, vector and scalar loads, escapes present); for every tiny spec of tests/tiny_models.py a
model loaded with ``resident="compressed"`` on the GPU gives the BF16 GPU load's logits bit for
bit at every position and the same 20 greedy tokens, holding ≤ 78 % of the BF16 expert bytes.
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import zmoe
from zipmoe_rt.backends import DeviceError, cuda_unavailable, get_backend
from zipmoe_rt.engine.resident import pack_bf16
from zipmoe_rt.kernels.cuda_packed_src import gpu_layout
from zipmoe_rt.models.packed import PackedExpert
from zipmoe_rt.models.weights import ExpertWeights

from tiny_models import SPECS
from test_gpu import GPU_SPECS

WHY = cuda_unavailable()
gpu = pytest.mark.skipif(WHY is not None, reason=f"no CUDA backend here: {WHY}")
STEPS = 20


def _bf16(a) -> np.ndarray:
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _weights(rng, shape, spread=1.0):
    """BF16 bits of normal weights times a log-normal factor (``spread`` > 0: escapes)."""
    return _bf16(rng.standard_normal(shape) * 0.05 * np.exp(spread * rng.standard_normal(shape)))


def _emulate(P) -> np.ndarray:
    """BF16 bits of a packed matrix decoded from its GPU layout with the kernels' formula:
    index nibble k of byte j >> 1, exponent ``(v << 23) + (base << 23)`` (uint32, wrapping) OR'd
    to the sign+mantissa bits, escapes rebuilt from the sign+mantissa bits alone."""
    nib, ep, ec, ev = gpu_layout(P)
    rows, cols = P.shape
    c = np.arange(cols)
    v = ((nib[:, c >> 1] >> ((c & 1) * 4)) & 15).astype(np.uint32)
    s = P.sm.astype(np.uint32)
    sg = ((s & 0x80) << 24) | ((s & 0x7F) << 16)
    u = sg | ((v << 23) + (np.uint32(P.base) << 23))
    r = np.repeat(np.arange(rows), np.diff(ep))
    assert (v[r, ec] == 15).all() and (v == 15).sum() == ec.size
    u[r, ec] = sg[r, ec] | (ev.astype(np.uint32) << 23)
    return (u >> 16).astype(np.uint16)


@pytest.mark.parametrize("case", ["every pattern", "odd width", "escapes", "top window"])
def test_gpu_layout_decodes_every_pattern(case):
    rng = np.random.default_rng(3)
    every = np.arange(1 << 16, dtype=np.uint16)
    w = {"every pattern": every.reshape(256, 256),
         "odd width": every[:255 * 257].reshape(255, 257),
         "escapes": _weights(rng, (37, 41), 1.5),
         # exponents 241..255 and a few below: base 241, base + 15 wraps past bit 31
         "top window": ((rng.integers(241, 256, (16, 24)) << 7)
                        | rng.integers(0, 128, (16, 24))).astype(np.uint16)}[case]
    if case == "top window":
        w[0, :3] = [0x3F80, 0xBF80, 0x0001]
    P = pack_bf16(w)
    nib, ep, ec, ev = gpu_layout(P)
    assert nib.shape == (w.shape[0], (w.shape[1] + 1) // 2) and nib.dtype == np.uint8
    assert ep.dtype == ec.dtype == np.int32 and ep[-1] == ec.size == P.n_escapes
    assert np.array_equal(_emulate(P), w)
    if case in ("escapes", "top window"):
        assert P.n_escapes > 0
    if case == "top window":
        assert P.base == 241


def test_cuda_compressed_without_cupy_is_the_device_error(monkeypatch, tmp_path):
    """The mode is accepted on cuda: without CuPy the device error comes (the options are
    checked before the file is read); with a budget on the CPU the options are accepted and the
    file is read (and refused here)."""
    import sys

    import zipmoe_rt
    import zipmoe_rt.backends as B
    monkeypatch.setitem(sys.modules, "cupy", None)
    monkeypatch.delitem(B._made, "cuda", raising=False)
    z = tmp_path / "m.zmoe"
    z.write_bytes(b"not read: the options are checked first")
    with pytest.raises(DeviceError, match="CuPy is not installed"):
        zipmoe_rt.load(z, device="cuda", resident="compressed")
    with pytest.raises(zmoe.ZmoeError):
        zipmoe_rt.load(z, device="cpu", resident="compressed", memory_budget="50%")


# ------------------------------------------------------------------ kernels (GPU)


@pytest.fixture(scope="module")
def be():
    if WHY is not None:
        pytest.skip(f"no CUDA backend here: {WHY}")
    return get_backend("cuda")


def _experts(rng, k, H, I, spread):
    bf = [ExpertWeights(_weights(rng, (I, H), spread), _weights(rng, (I, H), spread),
                        _weights(rng, (H, I), spread)) for _ in range(k)]
    packed = [PackedExpert(*(pack_bf16(a) for a in (e.gate, e.up, e.down))) for e in bf]
    return bf, packed


def _dev(be, e):
    return ExpertWeights(*(be.from_host(a) for a in (e.gate, e.up, e.down)))


@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("k,H,I,spread", [(1, 40, 37, 1.0), (3, 64, 48, 1.5), (8, 256, 512, 0.7),
                                          (2, 1024, 768, 0.3)])
def test_experts_token_bit_identical(be, monkeypatch, fused, k, H, I, spread):
    from zipmoe_rt.backends import cuda_packed, cupy_cuda
    monkeypatch.setattr(cupy_cuda, "FUSED_EXPERTS", fused)
    rng = np.random.default_rng(k * H + I)
    bf, packed = _experts(rng, k, H, I, spread)
    assert sum(p.gate.n_escapes + p.down.n_escapes for p in packed) > 0
    x = be.from_host(rng.standard_normal((1, H)).astype(np.float32))
    w = rng.random(k).astype(np.float32)
    ref = be.from_host(np.full((1, H), 0.25, np.float32))
    be.experts_token(ref[0], x[0], [_dev(be, e) for e in bf], w)
    gp = [cuda_packed.upload(p) for p in packed]
    for ex in (gp, packed, [gp[0]] + [_dev(be, e) for e in bf[1:]]):  # device, host, a mix
        out = be.from_host(np.full((1, H), 0.25, np.float32))
        be.experts_token(out[0], x[0], ex, w)
        assert np.array_equal(be.to_host(out), be.to_host(ref))
    if H >= 256:       # small matrices: the escape list and the alignment weigh more
        assert gp[0].nbytes < 0.8 * gp[0].bf16_nbytes


@pytest.mark.parametrize("T,H,I", [(1, 40, 37), (5, 64, 48), (7, 256, 512), (8, 256, 512),
                                   (20, 96, 40)])
def test_expert_accumulate_bit_identical(be, T, H, I):
    from zipmoe_rt.backends import cuda_packed
    rng = np.random.default_rng(T + H)
    (bf,), (packed,) = _experts(rng, 1, H, I, 1.0)
    x = be.from_host(rng.standard_normal((T + 3, H)).astype(np.float32))
    rows = rng.permutation(T + 3)[:T].astype(np.int64)
    w = rng.random(T).astype(np.float32)
    ref = be.from_host(np.ones((T + 3, H), np.float32))
    be.expert_accumulate(ref, x, rows, w, _dev(be, bf))
    out = be.from_host(np.ones((T + 3, H), np.float32))
    be.expert_accumulate(out, x, rows, w, cuda_packed.upload(packed))
    got, want = be.to_host(out), be.to_host(ref)
    assert np.array_equal(got, want) and not np.array_equal(got, np.ones_like(got))
    d = cuda_packed.unpack_expert(be, cuda_packed.upload(packed))
    for a, b in zip((d.gate, d.up, d.down), (bf.gate, bf.up, bf.down)):
        assert np.array_equal(be.to_host(a), b)
    with pytest.raises(ValueError, match="expert_accumulate"):
        be.expert_accumulate(out, x[:, :-1], rows, w, cuda_packed.upload(packed))


# ------------------------------------------------------------------ whole models (GPU)


def _run(model, prompt, steps=STEPS):
    cache = model.new_cache(capacity=4)
    logits = [model.forward(prompt, cache, last_only=False)]
    toks = []
    for _ in range(steps):
        toks.append(int(np.argmax(logits[-1][-1])))
        logits.append(model.forward(np.array(toks[-1:]), cache, last_only=False))
    return logits, toks


@gpu
@pytest.mark.parametrize("name", GPU_SPECS)
def test_load_cuda_compressed_equals_bf16_gpu(tiny_moe_dir, tmp_path, name):
    """``load(device="cuda", resident="compressed")`` against ``load(device="cuda")``: logits
    equal bit for bit at every prompt position (prefill through the unpacked path and the
    fused kernels for the experts with fewer rows) and every decode step, same 20 tokens."""
    import zipmoe_rt
    from test_api import make_chat_model

    from zipmoe_rt.engine.resident import packable
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = make_chat_model(tiny_moe_dir(name), tmp_path / name)
    ids = np.random.default_rng(5).integers(0, 256, 16)
    full = zipmoe_rt.load(z, device="cuda")
    fl, ft = _run(full.net, ids)
    full.close()
    m = zipmoe_rt.load(z, device="cuda", resident="compressed")
    try:
        held = m.net.executor.source
        assert len(held._experts) == len(m.source.layouts)          # all uploaded at load
        rep = m.memory_report()
        packed = [packable(lay) for lay in m.source.layouts.values()]
        if all(packed):
            assert 0 < rep["experts"] <= 0.78 * rep["experts_bf16"] + 4096 * len(held._experts)
        else:   # gpt-oss's in x out slices and biased experts stay decoded (engine/resident.py)
            assert not any(packed) and rep["experts"] == rep["experts_bf16"] > 0
        cl, ct = _run(m.net, ids)
    finally:
        m.close()
    same = all(np.array_equal(a, b) for a, b in zip(cl, fl))
    print(f"{name}: compressed vs BF16 GPU logits bit-identical: {same}, max|dlogit| "
          f"{max(float(np.abs(a - b).max()) for a, b in zip(cl, fl)):.1e}, "
          f"tokens identical: {ct == ft}, experts {rep['experts']} B vs BF16 "
          f"{rep['experts_bf16']} B ({rep['experts'] / rep['experts_bf16']:.3f})")
    assert ct == ft and same


@gpu
def test_cli_run_cuda_compressed(tiny_moe_dir, tmp_path):
    """``zipmoe-rt run --device cuda --resident compressed`` prints the completion of
    ``--device cuda``."""
    from click.testing import CliRunner
    from test_api import make_chat_model

    from zipmoe_rt.cli import main
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        z = make_chat_model(tiny_moe_dir("qwen2_moe"), tmp_path / "q")
    outs = []
    for extra in ([], ["--resident", "compressed"]):
        r = CliRunner().invoke(main, ["run", str(z), "-p", "hello", "--raw", "-n", "12",
                                      "--temp", "0", "--device", "cuda", *extra])
        assert r.exit_code == 0, r.output
        outs.append(r.stdout)
    assert outs[0] == outs[1] and outs[0].strip()
