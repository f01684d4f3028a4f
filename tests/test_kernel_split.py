"""How the CPU kernels split work over threads never changes a bit of their results: the
parallel attention kernel (its (token, head) pairs dealt out round-robin) against the one-thread
kernel, and the BF16 GEMV on both sides of the parallel threshold, which follows the OpenMP wait
policy (zipmoe_rt/kernels/linear.py ``par_min_work``)."""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.kernels import attention as att
from zipmoe_rt.kernels import linear as lin
from zipmoe_rt.kernels import sinks as snk
from zipmoe_rt.kernels.widen import widen_bf16


def _qkv_cache(T, pos0, nq, nkv, hd, seed):
    rng = np.random.default_rng(seed)
    qkv = rng.standard_normal((T, (nq + 2 * nkv) * hd)).astype(np.float32)
    kc = rng.standard_normal((nkv, pos0 + T, hd)).astype(np.float32)
    vc = rng.standard_normal((nkv, pos0 + T, hd)).astype(np.float32)
    return qkv, kc, vc


@pytest.mark.parametrize("T,pos0,window", [(37, 0, 0), (64, 5, 0), (33, 3, 8), (1, 20, 0),
                                           (130, 0, 16)])
def test_parallel_attention_bits_equal_one_thread(T, pos0, window):
    nq, nkv, hd = 6, 2, 16
    qkv, kc, vc = _qkv_cache(T, pos0, nq, nkv, hd, T + pos0)
    scale = np.float32(hd ** -0.5)
    par = np.full((T, nq * hd), np.nan, np.float32)
    ser = np.full((T, nq * hd), np.nan, np.float32)
    att.attention_par(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, att.NO_SINKS, par)
    att.attention_ser(qkv, nq, nkv, hd, kc, vc, pos0, window, scale, att.NO_SINKS, ser)
    assert not np.isnan(par).any()
    assert np.array_equal(par.view(np.uint32), ser.view(np.uint32))
    # against a float64 reference of the same softmax attention (the kernels compute it at all)
    ref = np.empty_like(par, dtype=np.float64)
    for t in range(T):
        p = pos0 + t
        lo = 0 if window <= 0 else max(0, p - window + 1)
        for h in range(nq):
            kh = h // (nq // nkv)
            q = qkv[t, h * hd:(h + 1) * hd].astype(np.float64)
            s = kc[kh, lo:p + 1].astype(np.float64) @ q * float(scale)
            w = np.exp(s - s.max())
            ref[t, h * hd:(h + 1) * hd] = (w / w.sum()) @ vc[kh, lo:p + 1].astype(np.float64)
    assert np.abs(par - ref).max() < 1e-5


def test_parallel_attention_with_sinks_bits_equal_one_thread():
    T, pos0, nq, nkv, hd = 45, 2, 4, 2, 8
    qkv, kc, vc = _qkv_cache(T, pos0, nq, nkv, hd, 7)
    sinks = np.linspace(-1.0, 2.0, nq).astype(np.float32)
    scale = np.float32(hd ** -0.5)
    par = np.empty((T, nq * hd), np.float32)
    ser = np.empty((T, nq * hd), np.float32)
    att.attention_par(qkv, nq, nkv, hd, kc, vc, pos0, 0, scale, sinks, par)
    att.attention_ser(qkv, nq, nkv, hd, kc, vc, pos0, 0, scale, sinks, ser)
    assert np.array_equal(par.view(np.uint32), ser.view(np.uint32))
    out = np.empty_like(par)     # the public entry point takes the same kernels
    snk.attention_sinks(qkv, nq, nkv, hd, kc, vc, pos0, 0, scale, sinks, out)
    assert np.array_equal(out.view(np.uint32), ser.view(np.uint32))


def test_par_min_work_follows_the_wait_policy(monkeypatch):
    monkeypatch.delenv("ZIPMOE_PAR_MIN_WORK", raising=False)
    assert lin.par_min_work("ACTIVE") == 1 << 17
    assert lin.par_min_work("passive") == 1 << 20
    monkeypatch.setenv("OMP_WAIT_POLICY", "ACTIVE")
    assert lin.par_min_work() == 1 << 17
    monkeypatch.setenv("ZIPMOE_PAR_MIN_WORK", "12345")
    assert lin.par_min_work("ACTIVE") == 12345 and lin.par_min_work("PASSIVE") == 12345


def test_set_wait_policy_moves_the_threshold(monkeypatch):
    """Before Numba's threads start, set_wait_policy sets PAR_MIN_WORK with the policy; after,
    nothing changes (the policy cannot change any more)."""
    from numba.np.ufunc import parallel

    from zipmoe_rt import kernels
    monkeypatch.delenv("ZIPMOE_PAR_MIN_WORK", raising=False)
    for name in ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "GOMP_SPINCOUNT"):
        monkeypatch.setenv(name, __import__("os").environ.get(name, ""))
    monkeypatch.setattr(lin, "PAR_MIN_WORK", 777)
    started = parallel._is_initialized
    applied = kernels.set_wait_policy("active")
    assert applied == (not started)
    assert lin.PAR_MIN_WORK == (1 << 17 if applied else 777)


@pytest.mark.parametrize("out_rows", [8, 37, 256])
def test_gemv_bits_equal_on_both_sides_of_the_threshold(out_rows, monkeypatch):
    rng = np.random.default_rng(out_rows)
    W = (rng.standard_normal((out_rows, 96)).astype(np.float32).view(np.uint32)
         >> 16).astype(np.uint16)
    x = rng.standard_normal((1, 96)).astype(np.float32)
    ys = []
    for thr in (1, 1 << 40):             # parallel GEMV, then the one-thread GEMV
        monkeypatch.setattr(lin, "PAR_MIN_WORK", thr)
        y = np.empty((1, out_rows), np.float32)
        lin.linear_into(x, W, y)
        ys.append(y)
    assert np.array_equal(ys[0].view(np.uint32), ys[1].view(np.uint32))
    ref = x.astype(np.float64) @ widen_bf16(W).astype(np.float64).T
    assert np.abs(ys[0] - ref).max() < 1e-4
