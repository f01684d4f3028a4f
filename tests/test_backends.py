"""The compute-backend seam (zipmoe_rt/backends): the plain-NumPy reference backend against the
Numba backend, op by op on random inputs and end to end on every tiny checkpoint family (also
under a memory budget through the expert engine); every Numba kernel lives under kernels/."""
from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np
import pytest

import zipmoe_rt
from zipmoe_rt.backends import BACKENDS, Backend, get_backend
from zipmoe_rt.models.weights import ExpertWeights

NB = get_backend("numba")
NP = get_backend("numpy")
LOGITS_TOL = 1e-4


def _bf16(a) -> np.ndarray:
    """float -> BF16 bits (truncation)."""
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _close(a, b, tol=1e-5):
    a, b = np.asarray(a), np.asarray(b)
    assert a.shape == b.shape and a.dtype == b.dtype == np.float32
    scale = max(float(np.abs(b).max()), 1e-30)
    np.testing.assert_allclose(a, b, rtol=tol, atol=tol * scale)


def _weight(rng, shape, kind):
    w = rng.standard_normal(shape).astype(np.float32) * 0.3
    if kind == "bf16":
        return _bf16(w)
    return w.astype(np.float16 if kind == "f16" else np.float32)


# ------------------------------------------------------------------ get_backend


def test_get_backend_names_and_errors():
    assert NB.name == "numba" and NP.name == "numpy"
    assert set(BACKENDS) == {"numba", "numpy", "cuda"}
    assert get_backend() is NB and get_backend("numba") is NB and get_backend(NP) is NP
    assert isinstance(NB, Backend) and isinstance(NP, Backend)
    with pytest.raises(ValueError, match="unknown backend 'cupy'; known: cuda, numba, numpy"):
        get_backend("cupy")
    with pytest.raises(TypeError):
        get_backend(3)
    with pytest.raises(NotImplementedError):
        Backend().linear(np.zeros((1, 1), np.float32), np.zeros((1, 1), np.float32))


def test_arrays():
    for be in (NB, NP):
        assert be.empty((2, 3)).shape == (2, 3) and be.empty((2, 3)).dtype == np.float32
        z = be.zeros((4,), np.int64)
        assert z.dtype == np.int64 and not z.any()
        a = np.arange(6, dtype=np.uint16).reshape(3, 2)
        d = be.from_host(a.T)
        assert d.flags.c_contiguous and np.array_equal(be.to_host(d), a.T)


# ------------------------------------------------------------------ ops, numpy vs numba


@pytest.mark.parametrize("kind", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("T,out_in", [(1, (37, 29)), (5, (64, 48)), (1, (1024, 1100)),
                                      (3, (512, 1024))])  # the last two: parallel kernels
def test_linear(kind, T, out_in):
    rng = np.random.default_rng(T + out_in[0])
    W = _weight(rng, out_in, kind)
    x = rng.standard_normal((T, out_in[1])).astype(np.float32)
    b = rng.standard_normal(out_in[0]).astype(np.float32)
    _close(NP.linear(x, W), NB.linear(x, W))
    out = np.full((T, out_in[0]), np.nan, np.float32)
    assert NP.linear(x, W, b, out=out) is out
    _close(out, NB.linear(x, W, b))
    for be in (NB, NP):
        with pytest.raises(TypeError):
            be.linear(x, W.astype(np.int32))


@pytest.mark.parametrize("T,H,I", [(1, 40, 37), (4, 40, 37), (1, 512, 1024), (6, 256, 512)])
def test_swiglu_and_expert_accumulate(T, H, I):
    rng = np.random.default_rng(H + T)
    g, u = _weight(rng, (I, H), "bf16"), _weight(rng, (I, H), "bf16")
    d = _weight(rng, (H, I), "bf16")
    x = rng.standard_normal((T, H)).astype(np.float32)
    _close(NP.swiglu(x, g, u), NB.swiglu(x, g, u))
    rows = np.arange(T, dtype=np.int64)[::2][::-1].copy()
    w = np.linspace(0.3, 0.9, rows.size).astype(np.float32)
    outs = []
    for be in (NB, NP):
        out = np.ones((T, H), np.float32)
        be.expert_accumulate(out, x, rows, w, ExpertWeights(g, u, d))
        untouched = np.setdiff1d(np.arange(T), rows)
        assert (out[untouched] == 1.0).all() and not (out[rows] == 1.0).all()
        outs.append(out)
    _close(outs[1], outs[0])
    for be in (NB, NP):
        with pytest.raises(ValueError):
            be.expert_accumulate(np.zeros((T, H), np.float32), x, rows, w, ExpertWeights(g, u, g))


@pytest.mark.parametrize("k,H,I", [(1, 40, 37), (3, 40, 37), (2, 320, 640)])
def test_experts_token(k, H, I):
    rng = np.random.default_rng(k * H)
    experts = [ExpertWeights(_weight(rng, (I, H), "bf16"), _weight(rng, (I, H), "bf16"),
                             _weight(rng, (H, I), "bf16")) for _ in range(k)]
    x = rng.standard_normal(H).astype(np.float32)
    w = rng.random(k).astype(np.float32)
    outs = []
    for be in (NB, NP):
        out = np.full(H, 0.5, np.float32)
        be.experts_token(out, x, experts, w)
        outs.append(out)
    _close(outs[1] - 0.5, outs[0] - 0.5, tol=1e-4)
    # the sum of k single-expert calls, each through expert_accumulate
    ref = np.zeros((1, H), np.float32)
    for wi, e in zip(w, experts):
        NP.expert_accumulate(ref, x[None], np.zeros(1, np.int64), np.array([wi]), e)
    _close(outs[1] - 0.5, ref[0], tol=1e-4)


def test_rmsnorm_add_sigmoid_gate():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((5, 48)).astype(np.float32) * 3
    w = (1 + 0.2 * rng.standard_normal(48)).astype(np.float32)
    _close(NP.rmsnorm(x, w, 1e-6), NB.rmsnorm(x, w, 1e-6), tol=1e-6)
    ref = w * x / np.sqrt((x.astype(np.float64) ** 2).mean(1, keepdims=True) + 1e-6)
    _close(NB.rmsnorm(x, w, 1e-6), ref.astype(np.float32), tol=1e-6)
    out = np.empty_like(x)
    assert NB.rmsnorm(x, w, 1e-6, out=out) is out and NP.rmsnorm(x, w, 1e-6, out=out) is out
    b = rng.standard_normal(x.shape).astype(np.float32)
    a1, a2 = x.copy(), x.copy()
    assert NB.add_(a1, b) is a1 and NP.add_(a2, b) is a2
    assert np.array_equal(a1, x + b) and np.array_equal(a2, x + b)
    g = rng.standard_normal((5, 1)).astype(np.float32)
    y1, y2 = x.copy(), x.copy()
    NB.sigmoid_gate_add_(y1, g, b)
    NP.sigmoid_gate_add_(y2, g, b)
    assert np.array_equal(y1, y2)
    _close(y1, (x + b / (1 + np.exp(-g.astype(np.float64)))).astype(np.float32), tol=1e-6)


def _rope_case(rng, T, nq, nkv, hd, pos0, cap):
    qkv = rng.standard_normal((T, (nq + 2 * nkv) * hd)).astype(np.float32)
    ang = (np.arange(pos0, pos0 + T)[:, None] * 0.37 ** np.arange(hd // 2)).astype(np.float32)
    kc = rng.standard_normal((nkv, cap, hd)).astype(np.float32)
    vc = rng.standard_normal((nkv, cap, hd)).astype(np.float32)
    return qkv, np.cos(ang), np.sin(ang), kc, vc


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("nq,nkv", [(4, 4), (4, 2), (6, 1)])   # MHA, GQA, MQA
def test_rope_qk_cache(qk_norm, nq, nkv):
    rng = np.random.default_rng(nq * 10 + nkv + qk_norm)
    T, hd, pos0 = 3, 16, 5
    qkv, cos, sin, kc, vc = _rope_case(rng, T, nq, nkv, hd, pos0, 12)
    qn = (1 + 0.2 * rng.standard_normal(hd)).astype(np.float32) if qk_norm \
        else np.zeros(0, np.float32)
    kn = (1 + 0.2 * rng.standard_normal(hd)).astype(np.float32) if qk_norm \
        else np.zeros(0, np.float32)
    got = []
    for be in (NB, NP):
        a, kk, vv = qkv.copy(), kc.copy(), vc.copy()
        be.rope_qk_cache(a, nq, nkv, hd, qn, kn, np.float32(1e-6), cos, sin, kk, vv, pos0)
        got.append((a, kk, vv))
    for x, y in zip(got[0], got[1]):
        _close(y, x, tol=1e-6)
    a, kk, vv = got[1]
    # untouched cache slots; v copied as is; k of the cache == k in qkv after RoPE
    assert np.array_equal(kk[:, :pos0], kc[:, :pos0]) and np.array_equal(kk[:, pos0 + T:],
                                                                          kc[:, pos0 + T:])
    v_in = qkv[:, (nq + nkv) * hd:].reshape(T, nkv, hd).transpose(1, 0, 2)
    assert np.array_equal(vv[:, pos0:pos0 + T], v_in)
    k_out = a[:, nq * hd:(nq + nkv) * hd].reshape(T, nkv, hd).transpose(1, 0, 2)
    assert np.array_equal(kk[:, pos0:pos0 + T], k_out)
    # RoPE keeps the norm of each (i, i + hd/2) pair (cos^2 + sin^2 = 1), before any q/k norm
    if not qk_norm:
        q0 = qkv[:, :hd]
        q1 = a[:, :hd]
        n0 = q0[:, :hd // 2] ** 2 + q0[:, hd // 2:] ** 2
        n1 = q1[:, :hd // 2] ** 2 + q1[:, hd // 2:] ** 2
        np.testing.assert_allclose(n1, n0, rtol=1e-5)


def _rope64(x, cos, sin):
    """float64 ``x * cos + rotate_half(x) * sin`` over the last axis (head_dim)."""
    c = np.concatenate([cos, cos], -1).astype(np.float64)[:, None, :]
    s = np.concatenate([sin, sin], -1).astype(np.float64)[:, None, :]
    half = x.shape[-1] // 2
    return x * c + np.concatenate([-x[..., half:], x[..., :half]], -1) * s


@pytest.mark.parametrize("clip", [None, 0.8])
@pytest.mark.parametrize("nq,nkv", [(4, 4), (4, 2), (6, 1)])   # MHA, GQA, MQA
def test_rope_qk_cache_whole_projection_norm(clip, nq, nkv):
    """q/k RMSNorm over the whole projection (OLMoE: weights [nq*hd], [nkv*hd]) and clip_qkv,
    against a float64 reference of ``OlmoeAttention``: norm, clamp q/k/v, split, RoPE."""
    rng = np.random.default_rng(nq * 10 + nkv + (clip is not None))
    T, hd, pos0, eps = 3, 16, 5, 1e-6
    qkv, cos, sin, kc, vc = _rope_case(rng, T, nq, nkv, hd, pos0, 12)
    qn = (1 + 0.2 * rng.standard_normal(nq * hd)).astype(np.float32)
    kn = (1 + 0.2 * rng.standard_normal(nkv * hd)).astype(np.float32)
    x = qkv.astype(np.float64)
    q, k, v = x[:, :nq * hd], x[:, nq * hd:(nq + nkv) * hd], x[:, (nq + nkv) * hd:]
    q = qn * q / np.sqrt((q * q).mean(-1, keepdims=True) + eps)
    k = kn * k / np.sqrt((k * k).mean(-1, keepdims=True) + eps)
    if clip is not None:
        q, k, v = (np.clip(a, -clip, clip) for a in (q, k, v))
    q_ref = _rope64(q.reshape(T, nq, hd), cos, sin).reshape(T, -1)
    k_ref = _rope64(k.reshape(T, nkv, hd), cos, sin)
    for be in (NB, NP):
        a, kk, vv = qkv.copy(), kc.copy(), vc.copy()
        be.rope_qk_cache(a, nq, nkv, hd, qn, kn, np.float32(eps), cos, sin, kk, vv, pos0, clip)
        np.testing.assert_allclose(a[:, :nq * hd], q_ref, rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(kk[:, pos0:pos0 + T], k_ref.transpose(1, 0, 2), rtol=1e-5,
                                   atol=1e-5)
        assert np.array_equal(vv[:, pos0:pos0 + T],
                              v.reshape(T, nkv, hd).transpose(1, 0, 2).astype(np.float32))
        assert np.array_equal(kk[:, :pos0], kc[:, :pos0])
    if clip is not None:                   # the bound really cut values of q, k and v
        assert (np.abs(x) > clip).sum() > 10 and (np.abs(v) == clip).any()
        assert (np.abs(q) == clip).any() and (np.abs(k) == clip).any()


def test_rope_qk_cache_per_head_norm_with_clip_and_errors():
    """Per-head norms with a clip (the grouped kernel) agree across backends; norm weights of
    another size and a negative clip are refused by both."""
    rng = np.random.default_rng(7)
    T, nq, nkv, hd, pos0 = 2, 4, 2, 8, 3
    qkv, cos, sin, kc, vc = _rope_case(rng, T, nq, nkv, hd, pos0, 8)
    qn, kn = (1 + 0.2 * rng.standard_normal((2, hd))).astype(np.float32)
    got = []
    for be in (NB, NP):
        a, kk, vv = qkv.copy(), kc.copy(), vc.copy()
        be.rope_qk_cache(a, nq, nkv, hd, qn, kn, np.float32(1e-6), cos, sin, kk, vv, pos0, 0.5)
        got.append((a, kk, vv))
        assert np.abs(vv[:, pos0:pos0 + T]).max() == np.float32(0.5)
    for x, y in zip(*got):
        _close(y, x, tol=1e-6)
    bad = [((np.ones(2 * hd, np.float32), kn, None), "q_norm has 16 weights: expected 8 "
            "(per head) or 32 (whole projection)"),
           ((qn, np.ones(3, np.float32), None), "k_norm has 3 weights"),
           ((qn, kn, -1.0), "clip must be >= 0")]
    for be in (NB, NP):
        for (q_w, k_w, clip), msg in bad:
            with pytest.raises(ValueError, match=re.escape(msg)):
                be.rope_qk_cache(qkv.copy(), nq, nkv, hd, q_w, k_w, np.float32(1e-6), cos, sin,
                                 kc.copy(), vc.copy(), pos0, clip)


def test_attention_checks_the_norm_scope():
    """Attention refuses q/k norm weights of the size the family's QK_NORM_SCOPE does not give."""
    from dataclasses import dataclass

    from zipmoe_rt.families import HParams
    from zipmoe_rt.models.attention import Attention

    @dataclass
    class Whole(HParams):
        QK_NORM_SCOPE = "projection"

    w = [np.zeros((n, 32), np.float32) for n in (32, 16, 16)] + [np.zeros((32, 32), np.float32)]
    kw = dict(hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=8)
    head, whole = np.ones(8, np.float32), (np.ones(32, np.float32), np.ones(16, np.float32))
    Attention(HParams(**kw), 0, *w, q_norm=head, k_norm=head, backend="numpy")
    Attention(Whole(**kw), 0, *w, q_norm=whole[0], k_norm=whole[1], clip=2.0, backend="numpy")
    with pytest.raises(ValueError, match=r"layer 0: q_norm has 32 weights, expected 8"):
        Attention(HParams(**kw), 0, *w, q_norm=whole[0], k_norm=whole[1], backend="numpy")
    with pytest.raises(ValueError, match=r"layer 3: k_norm has 8 weights, expected 16"):
        Attention(Whole(**kw), 3, *w, q_norm=whole[0], k_norm=head, backend="numpy")


@pytest.mark.parametrize("window", [0, 3])
@pytest.mark.parametrize("T,pos0,nq,nkv,hd", [(1, 9, 4, 2, 16), (5, 0, 4, 2, 16),
                                              (4, 6, 6, 3, 8), (16, 48, 8, 2, 64)])
def test_attention(window, T, pos0, nq, nkv, hd):
    rng = np.random.default_rng(T * 100 + pos0 + window)
    qkv, _, _, kc, vc = _rope_case(rng, T, nq, nkv, hd, pos0, pos0 + T + 3)
    scale = np.float32(hd ** -0.5)
    outs = [be.attention(qkv, nq, nkv, hd, kc, vc, pos0, window, scale,
                         np.full((T, nq * hd), np.nan, np.float32)) for be in (NB, NP)]
    _close(outs[1], outs[0], tol=1e-5)
    # float64 reference of one (token, head): the last token, the last head
    t, h = T - 1, nq - 1
    p = pos0 + t
    lo = max(0, p - window + 1) if window else 0
    kh = h // (nq // nkv)
    s = kc[kh, lo:p + 1].astype(np.float64) @ qkv[t, h * hd:(h + 1) * hd] * hd ** -0.5
    e = np.exp(s - s.max())
    ref = (e / e.sum()) @ vc[kh, lo:p + 1]
    np.testing.assert_allclose(outs[0][t, h * hd:(h + 1) * hd], ref, rtol=1e-4, atol=1e-5)
    # keys past the visible range (stale cache slots) must not matter
    kc2 = kc.copy()
    kc2[:, pos0 + T:] = 1e6
    if window:
        kc2[:, :max(0, pos0 - window + 1)] = 1e6
    for be, ref_out in zip((NB, NP), outs):
        again = be.attention(qkv, nq, nkv, hd, kc2, vc, pos0, window, scale,
                             np.empty((T, nq * hd), np.float32))
        assert np.array_equal(again, ref_out)


@pytest.mark.parametrize("renorm", [False, True])
def test_route(renorm):
    rng = np.random.default_rng(int(renorm))
    logits = rng.standard_normal((7, 8)).astype(np.float32)
    logits[3] = 0.5           # all tied: experts 0, 1, 2 in that order
    (i1, w1), (i2, w2) = (be.route(logits, 3, renorm) for be in (NB, NP))
    assert i1.dtype == i2.dtype == np.int64 and w1.dtype == w2.dtype == np.float32
    assert np.array_equal(i1, i2) and list(i1[3]) == [0, 1, 2]
    _close(w2, w1, tol=1e-6)
    if renorm:
        np.testing.assert_allclose(w1.sum(1), 1.0, rtol=1e-6)
    else:
        np.testing.assert_allclose(w1[3], 1 / 8, rtol=1e-6)
    assert (np.diff(w1, axis=1) <= 0).all()


@pytest.mark.parametrize("kind", ["bf16", "f16", "f32"])
def test_embed(kind):
    rng = np.random.default_rng(2)
    W = _weight(rng, (50, 24), kind)
    ids = np.array([3, 0, 49, 3])
    a, b = NB.embed(W, ids), NP.embed(W, ids)
    assert a.dtype == b.dtype == np.float32 and np.array_equal(a, b)
    ref = (W.astype(np.uint32) << 16).view(np.float32) if kind == "bf16" else W.astype(np.float32)
    assert np.array_equal(a, ref[ids])
    for be in (NB, NP):
        with pytest.raises(IndexError):
            be.embed(W, np.array([50]))
        with pytest.raises(IndexError):
            be.embed(W, np.array([-1]))


# ------------------------------------------------------------------ whole models

from tiny_models import SPECS  # noqa: E402 - after the op tests, which need no torch

PROMPT = np.random.default_rng(1).integers(0, 256, 16)


def _run(model, steps=20):
    """Prefill PROMPT (every position's logits), then ``steps`` greedy tokens through the cache
    (which starts small so it grows)."""
    cache = model.new_cache(capacity=4)
    logits = [model.forward(PROMPT, cache, last_only=False)]
    toks = []
    for _ in range(steps):
        toks.append(int(np.argmax(logits[-1][-1])))
        logits.append(model.forward(np.array(toks[-1:]), cache, last_only=False))
    assert cache.get_seq_length() == len(PROMPT) + steps
    return logits, toks


@pytest.mark.parametrize("name", list(SPECS))
def test_numpy_backend_matches_numba(tiny_moe_dir, name):
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    folder = tiny_moe_dir(name)
    ref = build_model(CheckpointSource(folder))
    ours = build_model(CheckpointSource(folder), backend="numpy")
    assert ref.backend is NB and ours.backend is NP and ours.executor.backend is NP
    (la, ta), (lb, tb) = _run(ref), _run(ours)
    assert la[0].shape == (16, ref.config.vocab_size)
    # Gated DeltaNet layers (Qwen3-Next) normalise each head's output (the gated RMSNorm): where
    # one is small, the float32 rounding of the two backends' different summation orders in it
    # is magnified (measured up to 1.4e-4 at one step of one spec, 1e-5 elsewhere)
    recurrent = "linear_attention" in (getattr(ref.args, "layer_types", None) or ())
    for a, b in zip(la, lb):
        assert a.dtype == b.dtype == np.float32
        assert np.abs(a - b).max(axis=-1).max() <= (5e-4 if recurrent else LOGITS_TOL)
    assert ta == tb and len(ta) == 20


def test_numpy_backend_under_a_budget(tiny_moe_dir, tmp_path):
    """The budgeted engine on the NumPy backend gives the unbudgeted NumPy model's logits bit for
    bit (the same accumulation routine and order), and the Numba model's within LOGITS_TOL."""
    from zipmoe_rt.convert.converter import convert
    from zipmoe_rt.engine.pipeline import ExpertEngine
    from zipmoe_rt.engine.store import ZmoeSource
    from zipmoe_rt.models import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # no tokenizer.json in the tiny folder
        path = convert(tiny_moe_dir("qwen2_moe"), tmp_path / "m.zmoe", progress=False)
    full = ZmoeSource(path)
    src = ZmoeSource(path, keep_experts=False, copy_dense=True)
    k, bytes_F = 2, max(l.full_bytes for l in src.layouts.values())
    engine = ExpertEngine(src, src.dense_bytes() + (k + 2) * bytes_F, "zip-lru", workers=2,
                          backend="numpy")
    try:
        with pytest.raises(ValueError, match="backend 'numpy'"):
            build_model(src, executor=engine)          # a numba model over a numpy engine
        budgeted = _run(build_model(src, executor=engine, backend="numpy"), steps=8)
        assert engine.stats.hits["miss"] > 0          # experts really were evicted and reloaded
    finally:
        engine.close()
        src.close()
    plain = _run(build_model(full, backend="numpy"), steps=8)
    fast = _run(build_model(full), steps=8)
    full.close()
    assert budgeted[1] == plain[1] == fast[1]
    for a, b, c in zip(budgeted[0], plain[0], fast[0]):
        assert np.array_equal(a, b)
        assert np.abs(a - c).max() <= LOGITS_TOL


# ------------------------------------------------------------------ where kernels live


def test_numba_kernels_only_under_kernels():
    """Every ``@njit`` of the package is defined under zipmoe_rt/kernels/, and model code never
    imports a kernel module (it calls its backend)."""
    root = Path(zipmoe_rt.__file__).parent
    jit = re.compile(r"^\s*@(nb\.|numba\.)?njit\b", re.M)
    with_jit = sorted(str(p.relative_to(root)) for p in root.rglob("*.py")
                      if jit.search(p.read_text()))
    assert with_jit and all(p.startswith("kernels/") for p in with_jit), with_jit
    for p in (root / "models").glob("*.py"):
        if p.name != "base.py":    # base.py re-exports rms_norm and route for old imports
            assert "kernels" not in p.read_text(), p.name


def test_numpy_backend_runs_without_numba(tiny_moe_dir):
    """A model on the NumPy backend never imports Numba (nor any kernels/ module)."""
    import os
    import subprocess
    import sys

    folder = tiny_moe_dir("qwen3_moe")
    code = (
        "import sys, numpy as np\n"
        "from zipmoe_rt.models import build_model\n"
        "from zipmoe_rt.models.weights import CheckpointSource\n"
        f"m = build_model(CheckpointSource({str(folder)!r}), backend='numpy')\n"
        "out = m.forward(np.arange(5), m.new_cache())\n"
        "assert out.shape == (256,) and np.isfinite(out).all()\n"
        "print(sorted(k for k in sys.modules if k.startswith('numba') or '.kernels' in k))\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "[]"
