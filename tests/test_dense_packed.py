"""``--resident compressed`` holds the dense linears in the compute form too (design note
§6.5): attention projections, dense and shared MLPs and the LM head (a tied one also serves
the embedding lookup, by decoded rows).

* every tiny spec: each packed matrix decodes to the BF16 weight the BF16 model holds at the
  same place, the logits are bit-identical to the BF16 model's at every prompt position and
  greedy step (the whole-model check is ``test_resident.py``'s, which builds the same
  models), and the dense bytes the model holds, measured from its arrays, shrink by what the
  packed matrices save;
* under a budget, the engine counts the dense bytes held, not the stored ones;
* the ops on a packed weight: linear with a bias, GEMM, SwiGLU with GELU-tanh, the embedding
  rows, each against the BF16 kernel; a bad token id is an IndexError.
"""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.backends import get_backend
from zipmoe_rt.engine.resident import pack_bf16
from zipmoe_rt.engine.store import ZmoeSource
from zipmoe_rt.engine.tiers import size_text
from zipmoe_rt.kernels import linear as lin
from zipmoe_rt.models import build_model
from zipmoe_rt.models.packed import (PackedMatrix, dense_saving, dense_saving_bound,
                                     packed_matrices)

from tiny_models import SPECS

SKIP = ("source", "executor", "backend", "route_hook")


def _walk(root, path="net"):
    """(path, object) of every array and PackedMatrix reachable from a model, each once."""
    seen, todo = set(), [(path, root)]
    while todo:
        p, o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, (np.ndarray, PackedMatrix)):
            yield p, o
        elif isinstance(o, (list, tuple)):
            todo.extend((f"{p}[{i}]", v) for i, v in enumerate(o))
        elif isinstance(o, dict):
            todo.extend((f"{p}[{k!r}]", v) for k, v in o.items())
        elif type(o).__module__.startswith("zipmoe_rt.models") and hasattr(o, "__dict__"):
            todo.extend((f"{p}.{k}", v) for k, v in vars(o).items() if k not in SKIP)


def _held(net) -> int:
    """Bytes of the dense weights a model holds, measured from its arrays."""
    return sum(o.nbytes for _, o in _walk(net))


def _at(net, path):
    o = net
    for part in path.replace("[", ".[").split(".")[1:]:
        o = o[int(part[1:-1])] if part.startswith("[") else getattr(o, part)
    return o


@pytest.fixture(scope="module")
def tiny_zmoe(tiny_zmoe_by_name):
    """The tiny specs' ``.zmoe`` files by name (conftest.py)."""
    return tiny_zmoe_by_name


@pytest.mark.parametrize("name", sorted(SPECS))
def test_dense_linears_in_the_compute_form(name, tiny_zmoe):
    z = tiny_zmoe(name)
    full, comp = ZmoeSource(z), ZmoeSource(z, resident="compressed", copy_dense=True)
    try:
        nf, nc = build_model(full), build_model(comp)
        packed = packed_matrices(nc)
        assert packed, "no dense weight in the compute form"
        assert not packed_matrices(nf)
        n = 0
        for path, o in _walk(nc):
            if isinstance(o, PackedMatrix):
                w = _at(nf, path)
                assert w.dtype == np.uint16 and np.array_equal(o.bf16(), w), path
                n += 1
        assert n == len(packed)
        # the attention projections of layer 0 are among them; the head too
        paths = {p for p, o in _walk(nc) if isinstance(o, PackedMatrix)}
        assert any(".attn" in p or ".self_attn" in p or "attn" in p for p in paths)
        assert isinstance(nc.lm_head, PackedMatrix)
        if nc.lm_head is not nc.embed:          # untied: the embedding stays BF16
            assert isinstance(nc.embed, np.ndarray) and nc.embed.dtype == np.uint16
        # measured bytes: what the compute form saves, and no more
        saving = dense_saving(nc)
        assert saving > 0
        # what a memory limit is first checked with, before the build, bounds it
        assert saving <= dense_saving_bound(comp)
        assert _held(nf) - _held(nc) == saving
        assert _held(nc) < _held(nf)
        # one prompt and 4 greedy steps, bit-identical (20 steps: test_resident.py)
        ids = np.random.default_rng(5).integers(0, int(full.hparams["vocab_size"]), 9)
        cf, cc = nf.new_cache(), nc.new_cache()
        a, b = (m.forward(ids, c, last_only=False) for m, c in ((nf, cf), (nc, cc)))
        assert np.array_equal(a, b)
        for _ in range(4):
            t = np.array([int(np.argmax(a[-1]))], np.int64)
            a, b = nf.forward(t, cf), nc.forward(t, cc)
            assert np.array_equal(a, b)
    finally:
        full.close()
        comp.close()


def test_budget_counts_the_dense_bytes_held(tiny_moe_dir, tmp_path):
    from test_api import make_chat_model
    from zipmoe_rt import load
    z = make_chat_model(tiny_moe_dir("qwen2_moe"), tmp_path / "q")
    kw = dict(memory_budget="60%", policy="zip-lru")
    f = load(z, **kw)
    c = load(z, resident="compressed", **kw)
    m = load(z, resident="compressed")
    try:
        held_f, held_c = _held(f.net), _held(c.net)
        assert held_c < held_f
        assert f.memory_report()["dense"] == f.source.dense_bytes()
        # the engine's dense bytes are the stored ones less what the model's compute form saves
        assert c.memory_report()["dense"] == f.memory_report()["dense"] - (held_f - held_c)
        assert c.source.dense_saving == held_f - held_c > 0
        # unbudgeted too; and the source keeps no BF16 copy of its own
        assert m.memory_report()["dense"] == c.memory_report()["dense"]
        assert not m.source._dense
        want = f.generate("hello", max_tokens=10, temperature=0)
        assert c.generate("hello", max_tokens=10, temperature=0) == want
        assert m.generate("hello", max_tokens=10, temperature=0) == want
    finally:
        f.close()
        c.close()
        m.close()


def _bf16(rng, shape):
    a = (rng.standard_normal(shape) * 0.05).astype(np.float32)
    a[0, :3] = (1e-30, 300.0, -0.0)                    # escapes out of the window
    return (a.view(np.uint32) >> 16).astype(np.uint16)


@pytest.mark.parametrize("T", [1, 3, 40])
@pytest.mark.parametrize("zero_thresholds", [False, True])
def test_ops_on_a_packed_weight(T, zero_thresholds, monkeypatch):
    if zero_thresholds:                                # the parallel kernels at any size
        monkeypatch.setattr(lin, "PAR_MIN_WORK", 0)
    rng = np.random.default_rng(T)
    be = get_backend("numba").with_dense_form("compressed")
    assert be.name == "numba" and be is get_backend("numba").with_dense_form("compressed")
    assert be.with_dense_form("bf16") is get_backend("numba")
    W, G, U = _bf16(rng, (37, 24)), _bf16(rng, (20, 24)), _bf16(rng, (20, 24))
    P, PG, PU = (be.linear_weight(a) for a in (W, G, U))
    assert all(isinstance(p, PackedMatrix) for p in (P, PG, PU)) and P.n_escapes >= 2
    x = rng.standard_normal((T, 24)).astype(np.float32)
    bias = rng.standard_normal(37).astype(np.float32)
    ref = get_backend("numba")
    for b in (None, bias):
        assert np.array_equal(be.linear(x, P, b), ref.linear(x, W, b))
    for act in ("silu", "gelu_pytorch_tanh"):
        assert np.array_equal(be.swiglu(x, PG, PU, act), ref.swiglu(x, G, U, act))
    ids = np.array([0, 36, 5, 5], np.int64)
    assert np.array_equal(be.embed(P, ids), ref.embed(W, ids))
    with pytest.raises(IndexError, match=r"token id out of range \[0, 37\)"):
        be.embed(P, np.array([37], np.int64))
    with pytest.raises(ValueError, match="does not match"):
        be.linear(np.zeros((1, 5), np.float32), P)
    # what is not a 2-D BF16 weight is kept as it is
    f = np.ones((4, 3), np.float32)
    assert be.linear_weight(f) is f or np.array_equal(be.linear_weight(f), f)
    assert isinstance(get_backend("numba").linear_weight(W), np.ndarray)
    with pytest.raises(ValueError, match="not one of bf16, compressed"):
        be.with_dense_form("fp8")
    assert isinstance(pack_bf16(W), PackedMatrix)


def test_default_model_dense_bytes_shrink(default_zmoe):
    """The default model (tied 49152 x 576 head, 30 layers of attention): the dense linears
    held in the compute form, measured; its logits are checked in test_resident.py."""
    full = ZmoeSource(default_zmoe)
    comp = ZmoeSource(default_zmoe, resident="compressed", copy_dense=True)
    try:
        nf, nc = build_model(full), build_model(comp)
        packed = packed_matrices(nc)
        assert nc.lm_head is nc.embed and isinstance(nc.embed, PackedMatrix)
        assert len(packed) == 1 + 2 * len(nc.layers)          # head, qkv and o per layer
        bf16 = sum(P.bf16_nbytes for P in packed)
        held_f, held_c = _held(nf), _held(nc)
        assert held_f - held_c == dense_saving(nc) > 0.2 * bf16
        # the bound a limit is first checked with is within 10 % of it (27.1 against 25.1 MB)
        assert dense_saving(nc) <= dense_saving_bound(comp) < 1.1 * dense_saving(nc)
        ids = np.arange(5, 12, dtype=np.int64)
        assert np.array_equal(nc.embed_tokens(ids), nf.embed_tokens(ids))
    finally:
        full.close()
        comp.close()


def test_limit_divides_with_the_dense_bytes_held(tiny_moe_dir, tmp_path, monkeypatch):
    """Under --memory-limit the smallest budget and the engine count the dense bytes the
    compressed model holds (the model is built before the limit is divided)."""
    from test_api import make_chat_model
    import zipmoe_rt
    from zipmoe_rt.engine import limit as L
    ov = 50 << 20
    monkeypatch.setenv("ZIPMOE_RT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(L, "fixed_overhead", lambda path, measure=None, **kw: ov)
    monkeypatch.setattr(L, "warmup_peak", lambda path, measure=None, **kw: ov)
    z = make_chat_model(tiny_moe_dir("mixtral"), tmp_path / "m")
    src = ZmoeSource(z)
    stored, minimum = src.dense_bytes(), L.plan_memory(src, 10**9, 128, overhead=ov).minimum
    src.close()
    with zipmoe_rt.load(z) as free:
        want = free.generate("hello there", max_tokens=12, temperature=0)
    with zipmoe_rt.load(z, memory_limit=10**9, context=128, policy="zip-lru",
                        resident="compressed") as m:
        saving = dense_saving(m.net)
        assert saving > 0 and m.source.dense_saving == saving
        assert m.engine.dense_bytes == m.source.dense_bytes() == stored - saving
        assert m.memory_plan.minimum == minimum - saving
        assert m.memory_report()["dense"] == stored - saving
        assert m.generate("hello there", max_tokens=12, temperature=0) == want


def test_a_limit_too_small_is_refused_before_the_dense_build(tiny_moe_dir, tmp_path,
                                                              monkeypatch):
    """With ``resident="compressed"`` a limit (or budget) too small for the model is refused
    before the dense linears are built into the compute form (and before the kernel warm-up),
    in the words of the exact check; one within the escapes' bytes of the exact minimum is
    still refused by the exact check after the build."""
    from click.testing import CliRunner
    from test_api import make_chat_model
    import zipmoe_rt
    from zipmoe_rt import loading
    from zipmoe_rt.cli import main
    from zipmoe_rt.engine import footprint as F
    from zipmoe_rt.engine import limit as L
    from zipmoe_rt.engine.tiers import BudgetError
    from zipmoe_rt.engine.tiers import mb_at_least
    ov = 50 << 20
    monkeypatch.setenv("ZIPMOE_RT_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(L, "fixed_overhead", lambda path, measure=None, **kw: ov)
    monkeypatch.setattr(L, "warmup_peak", lambda path, measure=None, **kw: ov)
    z = make_chat_model(tiny_moe_dir("mixtral"), tmp_path / "m")
    kw = dict(context=128, policy="zip-lru", resident="compressed")
    with zipmoe_rt.load(z, memory_limit=10**9, **kw) as m:
        p = m.memory_plan
        exact = p.overhead + p.kv + p.buffers + p.activations + p.engine + p.minimum
        smallest = p.minimum
    with pytest.raises(L.MemoryLimitError) as e:      # between the bound and the exact minimum
        zipmoe_rt.load(z, memory_limit=exact - 1, **kw)
    assert f"at least {mb_at_least(exact)}" in str(e.value)

    def never(*a, **k):
        raise AssertionError("should not be called")
    monkeypatch.setattr(loading, "_dense_first", never)
    monkeypatch.setattr(F, "warm_up", never)
    lim = exact - 100_000
    with pytest.raises(L.MemoryLimitError) as e:
        zipmoe_rt.load(z, memory_limit=lim, **kw)
    msg = str(e.value)
    assert msg.startswith(f"--memory-limit {size_text(lim)} (given) is too small for this "
                          f"model: it needs fixed overhead {ov / 1e6:.1f} MB + KV cache"), msg
    stated = float(msg.rsplit("at least ", 1)[1].split(" MB")[0]) * 1e6
    assert exact - 100_000 < stated <= float(mb_at_least(exact).split()[0]) * 1e6
    # the early minimum is a lower bound, and the message says by how much it may rise
    more = float(msg.split("is at most ")[1].split(" MB more")[0]) * 1e6
    from zipmoe_rt.engine.store import ZmoeSource
    src = ZmoeSource(z)
    try:
        assert more == pytest.approx(dense_saving_bound(src), abs=6e4)
    finally:
        src.close()
    assert stated + more >= exact - 100_000
    with pytest.raises(BudgetError, match=r"--memory-budget 1000 bytes is below the dense"):
        zipmoe_rt.load(z, memory_budget=1000, **kw)
    with pytest.raises(BudgetError, match="at least"):
        zipmoe_rt.load(z, memory_limit=10**9, memory_budget=smallest // 2, **kw)
    r = CliRunner().invoke(main, ["run", str(z), "-p", "hi", "--resident", "compressed",
                                  "--memory-limit", str(lim)], env={"ZIPMOE_RT_DEBUG": None})
    assert r.exit_code == 1 and len(r.stderr.splitlines()) == 1, r.output
    assert r.stderr.startswith("error: --memory-limit") and "at least" in r.stderr
