"""``--resident compressed``: the compute form of BF16 experts (design note §6.5).

* The transcoder round-trips every BF16 pattern (NaN payloads, ±Inf, −0.0, subnormals, more
  than 15 distinct exponents, a single one) to the exact bits, in the packed kernels' decode
  and in the NumPy reference decode.
* The packed kernels give bit-identical outputs to the BF16 kernels on the same weights, for
  every path (one token and several, one expert and k fused, small and parallel sizes), with
  escapes present.
* A model loaded with ``resident="compressed"`` gives bit-identical logits at every prompt
  position and the same 20 greedy tokens as the default path, for every tiny spec and the
  default model, reads nothing after loading, and holds ≤ 78 % of the BF16 expert bytes.
* Bad option values are clear errors.
"""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.engine.resident import pack_bf16, pack_planes, packable
from zipmoe_rt.engine.store import ZmoeSource
from zipmoe_rt.kernels import linear as lin
from zipmoe_rt.kernels import packed as pk
from zipmoe_rt.kernels import swiglu as sw
from zipmoe_rt.kernels.rows import packed_source
from zipmoe_rt.models import build_model
from zipmoe_rt.models.packed import PackedExpert
from zipmoe_rt.models.weights import ExpertWeights

from test_engine import generate
from tiny_models import SPECS

DECODE_STEPS = 20


def _bf16(a: np.ndarray) -> np.ndarray:
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _weights(rng, shape, spread=1.0):
    """BF16 bits of normal weights times a log-normal factor: ``spread`` widens the exponent
    range so that some exponents fall outside the 15-wide window (escapes)."""
    a = rng.standard_normal(shape) * 0.05 * np.exp(spread * rng.standard_normal(shape))
    return _bf16(a)


SPECIALS = np.array([0x0000, 0x8000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC0, 0x7F81, 0x7FFF, 0xFFA5,
                     0x0001, 0x007F, 0x8001, 0x807F, 0x0080, 0x7F7F, 0xFF7F, 0x3F80], np.uint16)


def _cases():
    rng = np.random.default_rng(7)
    every = np.arange(1 << 16, dtype=np.uint16).reshape(256, 256)   # all patterns, 256 exps
    yield "every pattern", every
    yield "every pattern, odd width", every.reshape(-1)[:255 * 257].reshape(255, 257)
    yield "specials", np.resize(SPECIALS, (9, 13))
    w = _weights(rng, (37, 41), 0.5)
    w.reshape(-1)[rng.choice(w.size, 40, replace=False)] = np.resize(SPECIALS, 40)
    yield "weights with specials", w
    yield "one exponent", (0x3F00 | rng.integers(0, 1 << 8, (8, 24))).astype(np.uint16)
    yield "one exponent, zero", np.zeros((3, 5), np.uint16)
    yield "only NaN and Inf", np.resize(np.array([0x7F80, 0xFFC1, 0x7FFF], np.uint16), (4, 7))
    yield "only subnormals", rng.integers(0, 0x80, (5, 9)).astype(np.uint16) | np.uint16(0x8000)
    yield "one column", _weights(rng, (11, 1), 2.0)
    yield "one row", _weights(rng, (1, 33), 2.0)
    yield "empty", np.zeros((0, 6), np.uint16)


@pytest.mark.parametrize("name,w", list(_cases()), ids=[c[0] for c in _cases()])
def test_transcoder_round_trips_every_bit(name, w):
    P = pack_bf16(w)
    assert P.shape == w.shape
    got = pk.unpack_bf16(P)
    assert got.dtype == np.uint16 and np.array_equal(got, w)
    assert np.array_equal(P.bf16(), w)
    exps = (w >> 7) & 0xFF
    outside = ((exps < P.base) | (exps >= P.base + pk.WINDOW)).sum()
    assert P.n_escapes == outside
    if name.startswith("every pattern"):
        assert P.n_escapes == w.size - w.size * 15 // 256 or P.n_escapes > 0
    if name.startswith("one exponent"):
        assert P.n_escapes == 0


def test_both_row_decode_forms_give_every_bit():
    """The masked and the shifted row decode of kernels/rows.py (one compiled into the kernels
    by the CPU's vector width, rows.WIDE_VECTORS) give the same words, every case above's
    weights row by row, escapes included; unpack_row is the form WIDE_VECTORS names."""
    from numba import njit

    from zipmoe_rt.kernels import rows

    def decoder(form):
        @njit
        def run(nib, sm, b7, ep, ec, ev, out):
            for r in range(out.shape[0]):
                form(nib, sm, b7, ep, ec, ev, r, out[r])
        return run

    masked, shifted = decoder(rows.unpack_row_masked), decoder(rows.unpack_row_shifted)
    for name, w in _cases():
        if not w.size:
            continue
        nib, sm, b7, ep, ec, ev = packed_source(pack_bf16(w))
        a = np.full(w.shape, 0xDEAD, np.uint16)
        b = a.copy()
        masked(nib, sm, b7, ep, ec, ev, a)
        shifted(nib, sm, b7, ep, ec, ev, b)
        assert np.array_equal(a, w) and np.array_equal(b, w), name
    assert rows.unpack_row is (rows.unpack_row_masked if rows.WIDE_VECTORS
                               else rows.unpack_row_shifted)


def test_window_is_the_densest_and_escapes_are_in_row_order():
    exp = np.array([3, 3, 3, 40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50, 51, 52, 53, 54, 200],
                   np.uint8)
    base, nib, ptr, col, val = pk.pack_plane(exp, 1, exp.size)
    assert base == 40          # 15 exponents 40..54 beat the three 3s
    assert list(col) == [0, 1, 2, 18] and list(val) == [3, 3, 3, 200]
    assert list(ptr) == [0, 4]
    h = (exp.size + 1) // 2
    assert nib[0, 3] & 15 == 0 and nib[0, 0] & 15 == pk.ESCAPE  # column 3 = exponent 40
    assert nib[0, 18 - h] >> 4 == pk.ESCAPE
    with pytest.raises(ValueError, match="exponents for a"):
        pk.pack_plane(exp, 2, 5)
    with pytest.raises(ValueError, match="base 250"):
        pk.pack_plane(exp, 1, exp.size, base=250)
    with pytest.raises(ValueError, match="sign\\+mantissa plane"):
        pack_planes(exp, np.zeros(3, np.uint8), (1, exp.size))
    with pytest.raises(ValueError, match="uint16"):
        pack_bf16(np.zeros((2, 2), np.float32))


def _expert(rng, inter, hid, spread=1.5):
    g, u, d = (_weights(rng, s, spread) for s in ((inter, hid), (inter, hid), (hid, inter)))
    for m in (g, u, d):   # exponents far outside any window of the others: escapes
        m[0, 0], m[-1, -1] = 0x0001, 0x4300
    P = PackedExpert(pack_bf16(g), pack_bf16(u), pack_bf16(d))
    assert min(m.n_escapes for m in (P.gate, P.up, P.down)) > 0   # the escape path runs
    return ExpertWeights(g, u, d), P


# sizes on both sides of PAR_MIN_WORK and of the 4-row / 2-row blocks (odd, tails)
SHAPES = [(48, 64), (97, 130), (1025, 257), (1536, 576), (3, 5), (8, 3)]


@pytest.mark.parametrize("inter,hid", SHAPES)
@pytest.mark.parametrize("T", [1, 2, 3, 7])
def test_packed_expert_accumulate_is_bit_identical(inter, hid, T):
    rng = np.random.default_rng(inter * 31 + hid + T)
    E, P = _expert(rng, inter, hid)
    x = rng.standard_normal((T + 2, hid)).astype(np.float32)
    rows = np.sort(rng.choice(T + 2, T, replace=False)).astype(np.int64)
    w = rng.random(T).astype(np.float32)
    want = rng.standard_normal((T + 2, hid)).astype(np.float32)
    got = want.copy()
    sw.expert_accumulate(want, x, rows, w, E.gate, E.up, E.down)
    pk.packed_expert_accumulate(got, x, rows, w, P)
    assert np.array_equal(got, want)
    # the plain linear on each matrix, too (one and several tokens, serial and parallel)
    for W, PW in ((E.gate, P.gate), (E.down, P.down)):
        xs = rng.standard_normal((T, W.shape[1])).astype(np.float32)
        for par in (True, False):
            assert np.array_equal(pk.packed_linear(xs, PW, parallel=par),
                                  lin.linear(xs, W, parallel=par))


@pytest.mark.parametrize("inter,hid", SHAPES)
@pytest.mark.parametrize("k", [1, 2, 3])
def test_packed_experts_decode_is_bit_identical(inter, hid, k):
    rng = np.random.default_rng(inter * 7 + hid + k)
    pairs = [_expert(rng, inter, hid) for _ in range(k)]
    x = rng.standard_normal(hid).astype(np.float32)
    w = rng.random(k).astype(np.float32)
    want = rng.standard_normal(hid).astype(np.float32)
    got = want.copy()
    sw.experts_decode(want, x, [e for e, _ in pairs], w)
    pk.packed_experts_decode(got, x, [p for _, p in pairs], w)
    assert np.array_equal(got, want)
    # through the backend, also with a mix of packed and decoded experts
    from zipmoe_rt.backends import get_backend
    be = get_backend("numba")
    mixed = [p if i % 2 else e for i, (e, p) in enumerate(pairs)]
    got2 = np.zeros(hid, np.float32)
    want2 = np.zeros(hid, np.float32)
    be.experts_token(got2, x, mixed, w)
    sw.experts_decode(want2, x, [e for e, _ in pairs], w)
    assert np.array_equal(got2, want2)


def _exponent_cases():
    """BF16 matrices whose exponents stress the window and the escape list."""
    rng = np.random.default_rng(11)

    def build(exps, shape):
        sm = rng.integers(0, 256, shape).astype(np.uint16)
        return ((sm >> 7) << 15) | (np.asarray(exps, np.uint16) << 7) | (sm & 0x7F)

    shape = (37, 70)
    yield "random", _weights(rng, shape, 1.0)
    yield "no escapes", build(rng.integers(120, 135, shape), shape)
    # 16 exponents far apart: any window of 15 holds one, so nearly every weight escapes
    yield "all escapes", build(rng.choice(np.arange(0, 256, 16), shape), shape)
    yield "window at 0 (zeros, subnormals)", build(rng.integers(0, 15, shape), shape)
    yield "window at 241 (Inf, NaN)", build(rng.integers(241, 256, shape), shape)
    yield "exponents 0 and 255 around a window", build(
        rng.choice([0, 255, 120, 121, 122, 123], shape), shape)
    w = _weights(rng, shape, 0.5)
    w.reshape(-1)[rng.choice(w.size, 60, replace=False)] = np.resize(SPECIALS, 60)
    yield "NaN, Inf, subnormal, -0 among weights", w
    yield "every pattern", np.arange(1 << 16, dtype=np.uint16).reshape(128, 512)


def _same_bits(got, want):
    """Identical float32 bits, except that a NaN's payload may differ (the kernels are
    compiled with fast-math: which NaN operand of a sum survives is not fixed)."""
    gn, wn = np.isnan(got), np.isnan(want)
    return np.array_equal(gn, wn) and np.array_equal(got.view(np.uint32)[~gn],
                                                     want.view(np.uint32)[~wn])


@pytest.mark.parametrize("name,w", list(_exponent_cases()), ids=[c[0] for c in _exponent_cases()])
def test_packed_gemv_equals_bf16_gemv_bit_for_bit(name, w):
    """Every GEMV / GEMM kernel on the compute form gives the BF16 kernel's bits (NaN where it
    gives NaN), whatever the exponents: the window at either end, no escapes, all escapes."""
    P = pack_bf16(w)
    assert np.array_equal(pk.unpack_bf16(P), w)
    if name == "no escapes":
        assert P.n_escapes == 0
    if name == "all escapes":
        assert P.n_escapes >= 0.9 * w.size
    if name.startswith("window at"):
        assert P.base == (0 if "at 0" in name else 241) and P.n_escapes == 0
    rng = np.random.default_rng(len(name))
    nb = np.zeros(0, np.float32)
    for T in (1, 3):
        x = rng.standard_normal((T, w.shape[1])).astype(np.float32)
        for par in (False, True):
            want = lin.linear(x, w, parallel=par)
            got = pk.packed_linear(x, P, parallel=par)
            assert _same_bits(got, want), (T, par)
    # the one-token kernels themselves, serial and parallel, whatever the size threshold
    x = rng.standard_normal(w.shape[1]).astype(np.float32)
    want, got = np.empty(w.shape[0], np.float32), np.empty(w.shape[0], np.float32)
    lin.gemv_bf16_serial(x, w, want, nb)
    lin.gemv_bf16_serial(x, packed_source(P), got, nb)
    assert _same_bits(got, want)
    lin.gemv_bf16_par(x, packed_source(P), got, nb, 2)
    assert _same_bits(got, want)
    if not np.isnan(want).any():
        assert np.array_equal(got.view(np.uint32), want.view(np.uint32))


def test_packed_kernels_refuse_mismatched_shapes():
    rng = np.random.default_rng(1)
    _, P = _expert(rng, 16, 24)
    with pytest.raises(ValueError, match="disagree"):
        pk.packed_expert_accumulate(np.zeros((1, 20), np.float32), np.zeros((1, 20), np.float32),
                                    np.zeros(1, np.int64), np.ones(1, np.float32), P)
    with pytest.raises(ValueError, match="shapes disagree"):
        pk.packed_experts_decode(np.zeros(24, np.float32), np.zeros(24, np.float32), [P, P],
                                 np.ones(1, np.float32))
    with pytest.raises(ValueError, match="does not match"):
        pk.packed_linear(np.zeros((1, 5), np.float32), P.gate)


# ---------------------------------------------------------------------------------------------
# whole models


def _generate(net, ids, steps=DECODE_STEPS):
    """Prefill and ``steps`` greedy decode steps (test_engine.generate)."""
    return generate(net, ids, steps)


def _assert_identical(got, want):
    (lg, tg), (lw, tw) = got, want
    assert len(lg) == len(lw) == DECODE_STEPS + 1
    for i, (a, b) in enumerate(zip(lg, lw)):
        assert np.array_equal(a, b), f"step {i}: max |diff| {np.abs(a - b).max():.3g}"
    assert tg == tw and len(tg) == DECODE_STEPS + 1


@pytest.fixture(scope="module")
def tiny_zmoe(tiny_zmoe_by_name):
    """The tiny specs' ``.zmoe`` files by name (conftest.py)."""
    return tiny_zmoe_by_name


def _ids(src, n=12):
    rng = np.random.default_rng(3)
    return rng.integers(0, int(src.hparams["vocab_size"]), n)


def _no_reads(src):
    def refuse(*a, **k):
        raise AssertionError("a read after loading")
    src._rr.read = refuse


@pytest.mark.parametrize("name", sorted(SPECS))
def test_tiny_model_compressed_is_bit_identical(name, tiny_zmoe):
    z = tiny_zmoe(name)
    full = ZmoeSource(z)
    comp = ZmoeSource(z, resident="compressed")
    try:
        comp.admit_all()
        # every expert round-trips to the stored BF16 bits
        for (l, e) in sorted(comp.layouts):
            P, W = comp.expert(l, e), full.decode_expert(l, e)
            if not packable(comp.layouts[(l, e)]):   # gpt-oss's in x out slices: kept decoded
                assert SPECS[name][0] == "gpt_oss" and isinstance(P, ExpertWeights)
                assert all(np.array_equal(getattr(P, r), getattr(W, r)) for r in (
                    "gate", "up", "down", "gate_bias", "up_bias", "down_bias"))
                continue
            assert isinstance(P, PackedExpert)
            for role in ("gate", "up", "down"):
                assert np.array_equal(getattr(P, role).bf16(), getattr(W, role))
        net = build_model(comp)   # dense tensors are read here
        _no_reads(comp)
        ids = _ids(full)
        want = _generate(build_model(full), ids)
        _assert_identical(_generate(net, ids), want)
        # the NumPy reference backend decodes packed experts: same as on decoded ones
        ref = _generate(build_model(full, backend="numpy"), ids, 3)
        got = _generate(build_model(comp, backend="numpy"), ids, 3)
        assert all(np.array_equal(a, b) for a, b in zip(got[0], ref[0])) and got[1] == ref[1]
    finally:
        full.close()
        comp.close()


def test_default_model_compressed_is_bit_identical_and_smaller(default_zmoe):
    full = ZmoeSource(default_zmoe)
    comp = ZmoeSource(default_zmoe, resident="compressed")
    try:
        comp.admit_all()
        net = build_model(comp)
        _no_reads(comp)
        ids = _ids(full, 16)
        _assert_identical(_generate(net, ids), _generate(build_model(full), ids))
        b = comp.expert_bytes()
        assert b["bf16"] == sum(l.full_bytes for l in comp.layouts.values())
        assert b["held"] <= 0.78 * b["bf16"]
        rep = comp.memory_report()
        assert rep["experts"] == b["held"] and rep["experts_bf16"] == b["bf16"]
    finally:
        full.close()
        comp.close()


def test_source_refuses_an_unknown_mode(tiny_zmoe):
    with pytest.raises(ValueError, match=r"resident \(--resident\): 'bf17' is not one of "
                                         r"full, compressed"):
        ZmoeSource(tiny_zmoe("mixtral"), resident="bf17")


def test_api_and_cli_options(tiny_moe_dir, tmp_path):
    from click.testing import CliRunner
    from test_api import make_chat_model
    from zipmoe_rt import load
    from zipmoe_rt.cli import main
    z = make_chat_model(tiny_moe_dir("qwen2_moe"), tmp_path / "q")
    with pytest.raises(ValueError, match="not one of full, compressed"):
        load(z, resident="yes")
    m = load(z, resident="compressed")
    f = load(z)
    mb = load(z, resident="compressed", memory_budget="50%", policy="zip-lru")
    try:
        assert all(isinstance(w, PackedExpert) for w in m.source._experts.values())
        assert len(m.source._experts) == len(m.source.layouts)
        a = m.generate("hello", max_tokens=8, temperature=0)
        b = f.generate("hello", max_tokens=8, temperature=0)
        assert a == b
        # under a budget: the LRU cache holds the compute form (test_ctier.py for the rest)
        assert mb.generate("hello", max_tokens=8, temperature=0) == b
        held = list(mb.engine.fpools[mb.hparams["moe_layers"][0]].slots.values())
        assert held and all(isinstance(w, PackedExpert) for w in held)
        assert mb.memory_line().endswith("policy zip-lru (experts cached in the compute form)")
        assert f.memory_line().endswith("policy in-memory")
    finally:
        m.close()
        f.close()
        mb.close()
    r = CliRunner().invoke(main, ["run", str(z), "-p", "hi", "--resident", "bogus"])
    assert r.exit_code != 0 and "--resident" in r.output and "bogus" in r.output
    r1 = CliRunner().invoke(main, ["run", str(z), "-p", "hi", "-n", "6", "--raw", "--temp", "0",
                                   "--resident", "compressed"])
    r2 = CliRunner().invoke(main, ["run", str(z), "-p", "hi", "-n", "6", "--raw", "--temp", "0"])
    r3 = CliRunner().invoke(main, ["run", str(z), "-p", "hi", "-n", "6", "--raw", "--temp", "0",
                                   "--resident", "compressed", "--memory-budget", "50%"])
    assert r1.exit_code == r2.exit_code == r3.exit_code == 0, r1.output + r2.output + r3.output
    assert r1.stdout == r2.stdout == r3.stdout and r1.stdout.strip()
    r = CliRunner().invoke(main, ["run", str(z), "-p", "hi", "--c-tier", "bf16"])
    assert r.exit_code != 0 and "--c-tier" in r.output and "bf16" in r.output
    with pytest.raises(ValueError, match=r"c_tier \(--c-tier\): 'bf16' is not one of packed, "
                                         r"planes"):
        load(z, memory_budget="50%", c_tier="bf16")


def test_bench_rows_for_each_resident_mode(tiny_moe_dir, tmp_path):
    from test_api import make_chat_model
    from zipmoe_rt import bench as B
    z = make_chat_model(tiny_moe_dir("mixtral"), tmp_path / "m")
    res = B.run(z, [None], [], pp=4, tg=3, reps=1, residents=("full", "compressed"),
                log=lambda s: None)
    rows = {r["policy"]: r for r in res["rows"]}
    assert sorted(rows) == ["in-memory", "in-memory compressed"]
    full, comp = rows["in-memory"]["memory"], rows["in-memory compressed"]["memory"]
    assert comp["experts_bf16"] == full["experts"] > comp["experts"] > 0
    assert all(len(r["tg_tps"]) == 1 and r["tg_tps"][0] > 0 for r in rows.values())
    assert "in-memory compressed" in B.table(res)
    with pytest.raises(ValueError, match="--resident"):
        B.run(z, [None], [], residents=("half",), log=lambda s: None)
    with pytest.raises(ValueError, match="--c-tier"):
        B.run(z, ["50%"], ["zipmoe"], c_tiers=("bf16",), log=lambda s: None)
