"""FP8 (DeepSeek-V3's block-scaled E4M3) and MXFP4 (gpt-oss's release) files on ``--device cuda``.

The GPU holds the float32 values the CPU path multiplies with, in a compact form
(zipmoe_rt/engine/lowprec.py ``compute_form``): BF16 words where every value of a tensor (of an
expert's three projections) round-trips through BF16, float32 otherwise. What runs everywhere:
the choice itself on the tiny FP8 DeepSeek-V3 and MXFP4 gpt-oss checkpoints (every dense FP8
tensor and every expert: the form, widened back, equals the CPU's float32 weights bit for bit;
MXFP4 experts are BF16 words), the model built on that form with the CPU kernels against
transformers, the budgeted GPU engine on host arrays (HostOps) holding the same form, and the
byte counts. On a GPU (skipped here with the reason, as tests/test_gpu.py): ``load(device=
"cuda")`` against the CPU load and transformers, logits within 1e-3 at every position and 20
identical greedy tokens, the experts uploaded in the compact form, and budgeted GPU runs with
each policy (host cache empty and full) bit-identical to the unbudgeted GPU run.
"""
from __future__ import annotations

import re
import warnings

import numpy as np
import pytest

import zipmoe_rt
from zipmoe_rt.backends import get_backend
from zipmoe_rt.backends.checks import to_f32
from zipmoe_rt.engine import lowprec
from zipmoe_rt.engine.store import ZmoeSource

from test_gpu import _hf_run, _max_diff, _run, gpu, hf_glu_from_config

LOGITS_TOL = 1e-3
PROMPT = np.random.default_rng(1).integers(0, 256, 16)
KINDS = ["fp8", "mxfp4"]
#: on the GPU also an FP8 file whose scales are powers of two but two (BF16 words and float32)
GPU_KINDS = KINDS + ["fp8_pow2"]


@pytest.fixture(scope="module")
def lowprec_models(tiny_moe_dir, tmp_path_factory):
    """kind -> (zmoe path with a tokenizer, raw-expert companion, trace path, transformers'
    float32 model of the same dequantised weights), each built once."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    made = {}

    def get(kind):
        if kind not in made:
            from lowprec_models import (dequantized_reference, load_hf_mxfp4, make_tiny_fp8,
                                        make_tiny_mxfp4)
            from test_api import make_chat_model
            from tiny_models import load_hf
            from zipmoe_rt.bench import raw_companion
            from zipmoe_rt.engine import profile as prof

            root = tmp_path_factory.mktemp(kind)
            if kind.startswith("fp8"):
                src = make_tiny_fp8(tiny_moe_dir("deepseek_v3"), root / "src")
                if kind == "fp8_pow2":          # most tensors BF16-exact (pow2_scales)
                    pow2_scales(src)
                hf = load_hf(dequantized_reference(src, root / "ref"))
            else:
                src = make_tiny_mxfp4(root / "src")
                hf = load_hf_mxfp4(src)
            hf_glu_from_config(hf)          # gpt-oss on an older transformers (test_gpu.py)
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                z = make_chat_model(src, root / kind)
            m = zipmoe_rt.load(z)
            tr = prof.record_trace(m, ["hello world", "the cat sat"], max_tokens=8, chat=False,
                                   progress=False)
            m.close()
            made[kind] = (z, raw_companion(z), prof.save_trace(tr, z.with_suffix(".trace.json")),
                          hf)
        return made[kind]

    return get


# ------------------------------------------------------------------ the form (everywhere)


def test_compute_form_keeps_every_bit():
    """BF16 words exactly when every float32 word has zero low 16 bits (±0, ±inf, NaN with a
    BF16 payload, BF16 subnormals, the largest BF16); otherwise the array itself."""
    words = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7FC10000, 0x00010000,
                      0x7F7F0000, 0x3F800000, 0xC0C00000], np.uint32)
    a = words.view(np.float32).reshape(3, 3)
    assert lowprec.bf16_exact(a)
    f = lowprec.compute_form(a)
    assert f.dtype == np.uint16 and f.shape == (3, 3) and f.flags.c_contiguous
    assert f.reshape(-1).tolist() == (words >> 16).tolist()
    assert to_f32(f).view(np.uint32).tolist() == a.view(np.uint32).tolist()
    assert lowprec.compute_form(a.T).tolist() == f.T.tolist()          # strided input
    for low in (1, 0x8000, 0xFFFF):                        # one word with a low bit: float32
        b = a.copy()
        b.view(np.uint32)[1, 2] |= low
        assert not lowprec.bf16_exact(b) and lowprec.compute_form(b) is b
    bf16 = np.array([1, 2], np.uint16)
    assert not lowprec.bf16_exact(bf16) and lowprec.compute_form(bf16) is bf16


def _both(z):
    """(the CPU's source, the GPU's compact-form source) over ``z``."""
    return ZmoeSource(z), ZmoeSource(z, lowprec_form="compact")


def _same_values(compact, f32):
    """``compact`` (the GPU's form) widened is ``f32`` bit for bit; it is BF16 words exactly
    when ``f32`` is BF16-exact. Returns its dtype."""
    assert f32.dtype == np.float32 and compact.shape == f32.shape
    assert compact.dtype == (np.uint16 if lowprec.bf16_exact(f32) else np.float32)
    assert to_f32(compact).tobytes() == np.ascontiguousarray(f32).tobytes()
    return compact.dtype


@pytest.mark.parametrize("kind", KINDS)
def test_compact_form_is_the_cpu_weights_bit_for_bit(lowprec_models, kind):
    """Every dense FP8 tensor and every expert of the tiny checkpoints: the form uploaded to the
    GPU, widened to float32, equals the CPU path's dequantised weights bit for bit; MXFP4 experts
    are all BF16 words (2 bytes per weight), FP8 ones float32 unless BF16-exact; biases and
    tensors that are not low-precision are returned as they are."""
    z = lowprec_models(kind)[0]
    cpu, dev = _both(z)
    try:
        dense = [n for n, t in cpu.reader.tensors.items()
                 if "expert" not in t and lowprec.is_f8(t["dtype"])]
        assert bool(dense) == (kind == "fp8")
        forms = {_same_values(dev.tensor(n), cpu.tensor(n)) for n in dense}
        for n, t in cpu.reader.tensors.items():
            if "expert" not in t and n not in dense and not n.endswith("_scale_inv"):
                assert dev.tensor(n).tobytes() == cpu.tensor(n).tobytes()
                assert dev.tensor(n).dtype == cpu.tensor(n).dtype
        for layer, e in sorted(cpu.layouts):
            wc, wd = cpu.expert(layer, e), dev.expert(layer, e)
            exact = all(lowprec.bf16_exact(a) for a in (wc.gate, wc.up, wc.down))
            for a, b in ((wd.gate, wc.gate), (wd.up, wc.up), (wd.down, wc.down)):
                assert a.dtype == (np.uint16 if exact else np.float32)
                assert to_f32(a).tobytes() == b.tobytes()
                forms.add(a.dtype)
            for a, b in ((wd.gate_bias, wc.gate_bias), (wd.down_bias, wc.down_bias)):
                assert (a is None and b is None) or a.tobytes() == b.tobytes()
            # the budget's count of the expert: its bytes as held (FP8 at most float32's)
            assert cpu.layouts[(layer, e)].full_bytes == wc.nbytes
            assert dev.layouts[(layer, e)].full_bytes >= wd.nbytes
            if kind == "mxfp4":
                assert exact and 2 * wd.nbytes - wc.nbytes == sum(
                    b.nbytes for b in (wd.gate_bias, wd.up_bias, wd.down_bias))
                assert dev.layouts[(layer, e)].full_bytes == wd.nbytes
        if kind == "fp8":
            assert np.dtype(np.float32) in forms      # block-scaled products: float32
        else:
            assert forms == {np.dtype(np.uint16)}
    finally:
        cpu.close()
        dev.close()


#: block scales :func:`pow2_scales` leaves as transformers' quantizer wrote them
KEEP_SCALES = frozenset({"model.layers.0.self_attn.o_proj.weight_scale_inv",
                         "model.layers.1.mlp.experts.3.down_proj.weight_scale_inv"})


def pow2_scales(folder, keep=KEEP_SCALES):
    """Round every ``weight_scale_inv`` of the FP8 checkpoint ``folder`` but those in ``keep`` to
    the nearest power of two (in place): their products with E4M3 values are BF16-exact."""
    import torch
    from safetensors.torch import load_file, save_file
    t = load_file(folder / "model.safetensors")
    for n in t:
        if n.endswith("_scale_inv") and n not in keep:
            t[n] = torch.exp2(torch.round(torch.log2(t[n])))
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})


def test_fp8_with_power_of_two_scales_is_held_as_bf16(tiny_moe_dir, tmp_path):
    """The choice is made per tensor on the values: an FP8 checkpoint whose block scales are
    powers of two (E4M3 times 2^k is BF16-exact) gives BF16 words for those tensors, float32
    for the two whose scales were left as transformers' quantizer wrote them; either way the
    words widen to the CPU's float32 weights, and the model gives the float32 path's logits
    within 1e-3 and its greedy tokens."""
    pytest.importorskip("torch")
    from family_checks import convert_quietly
    from lowprec_models import make_tiny_fp8

    src = make_tiny_fp8(tiny_moe_dir("deepseek_v3"), tmp_path / "src")
    pow2_scales(src, KEEP_SCALES)
    keep = KEEP_SCALES
    z = convert_quietly(src, tmp_path / "p2.zmoe")
    cpu, dev = _both(z)
    try:
        dense = [n for n, t in cpu.reader.tensors.items()
                 if "expert" not in t and lowprec.is_f8(t["dtype"])]
        for n in dense:
            want = np.float32 if n + "_scale_inv" in keep else np.uint16
            assert _same_values(dev.tensor(n), cpu.tensor(n)) == want, n
        for layer, e in sorted(cpu.layouts):
            wc, wd = cpu.expert(layer, e), dev.expert(layer, e)
            want = np.float32 if (layer, e) == (1, 3) else np.uint16       # per expert
            for a, b in ((wd.gate, wc.gate), (wd.up, wc.up), (wd.down, wc.down)):
                assert a.dtype == want and to_f32(a).tobytes() == b.tobytes(), (layer, e)
        # the model on BF16 FP8 tensors (MLA's projections as BF16 words) and on float32 ones
        from zipmoe_rt.models import build_model
        (lc, tc), (ld, td) = _run(build_model(cpu)), _run(build_model(dev))
        assert _max_diff(ld, lc) <= LOGITS_TOL and td == tc
    finally:
        cpu.close()
        dev.close()


def test_lowprec_form_is_checked():
    with pytest.raises(ValueError, match="lowprec_form: expected one of float32, compact, got "
                                         "'bf16'"):
        ZmoeSource("unused.zmoe", lowprec_form="bf16")


@pytest.mark.parametrize("kind", KINDS)
def test_model_on_the_compact_form_matches_transformers(lowprec_models, kind):
    """The model built on the GPU's form (CPU kernels standing in for the GPU's: BF16 words and
    float32 weights) against transformers and the float32 CPU path: logits within 1e-3 at every
    position, the same 20 greedy tokens; ``load`` on the CPU gives the float32 path's logits."""
    from zipmoe_rt.models import build_model
    z, _, _, hf = lowprec_models(kind)
    cpu, dev = _both(z)
    try:
        (lc, tc), (ld, td) = _run(build_model(cpu)), _run(build_model(dev))
    finally:
        cpu.close()
        dev.close()
    hf_first, hf_tokens = _hf_run(hf)
    print(f"{kind}: compact form vs transformers {np.abs(ld[0] - hf_first).max():.2e}, "
          f"vs float32 CPU path {_max_diff(ld, lc):.2e}")
    assert ld[0].shape == (16, 256)
    assert np.abs(ld[0] - hf_first).max() <= LOGITS_TOL and _max_diff(ld, lc) <= LOGITS_TOL
    assert td == tc == hf_tokens and len(td) == 20
    m = zipmoe_rt.load(z, device="cpu")
    try:
        assert np.array_equal(_run(m.net)[0][0], lc[0])
    finally:
        m.close()


@pytest.mark.parametrize("kind", KINDS)
def test_dense_bytes_count_the_dequantised_form(lowprec_models, kind):
    """dense_bytes() is the bytes of the dense tensors the model holds: FP8 ones at float32
    (the most their GPU form takes), their scales not at all."""
    z = lowprec_models(kind)[0]
    cpu, dev = _both(z)
    try:
        names = [n for n, t in cpu.reader.tensors.items()
                 if "expert" not in t and not n.endswith("_scale_inv")]
        assert cpu.dense_bytes() == sum(cpu.tensor(n).nbytes for n in names)
        assert dev.dense_bytes() == cpu.dense_bytes() >= sum(dev.tensor(n).nbytes for n in names)
    finally:
        cpu.close()
        dev.close()


@pytest.mark.parametrize("kind", KINDS)
def test_gpu_engine_on_host_ops_uploads_the_compact_form(lowprec_models, kind, tmp_path):
    """The budgeted GPU engine (its device operations on host arrays, HostOps) over the compact
    source, each policy: logits and tokens equal the unbudgeted run on the same form bit for bit;
    FP8 / MXFP4 experts are decoded and dequantised on the host (never by the GPU segment
    decoder), uploaded in the compact form (PCIe bytes = its bytes per upload), evicted and
    brought back."""
    import test_engine as te
    from zipmoe_rt.engine import profile as prof
    from zipmoe_rt.engine.gpu_engine import GpuExpertEngine
    from zipmoe_rt.engine.gpu_ops import HostOps
    from zipmoe_rt.engine.pipeline import budget_split
    from zipmoe_rt.models import build_model

    z = lowprec_models(kind)[0]
    case = te.make_case(z, tmp_path, kind, 5)
    ref = ZmoeSource(z, lowprec_form="compact")
    try:
        ref_logits, ref_tokens = te.generate(build_model(ref), case.ids, te.DECODE_STEPS)
        per = {key: ref.expert(*key).nbytes for key in ref.layouts}
        forms = {key: ref.expert(*key).gate.dtype for key in ref.layouts}
    finally:
        ref.close()
    for policy, budget, delay in (("zip-lru", "min", None), ("raw-lru", "min", None),
                                  ("zipmoe", "mid", "CE"), ("zipmoe", "mid", "FE")):
        path = case.raw if policy == "raw-lru" else case.zmoe
        source = ZmoeSource(path, keep_experts=False, copy_dense=True, lowprec_form="compact")
        # test_engine's budgets, with the experts counted as this engine counts them
        full = max(l.full_bytes for l in source.layouts.values())
        b = source.dense_bytes() + case.k * full + (
            case.n_total * full // 3 if budget == "mid" else 0)
        ops, seen = HostOps(), []
        up = ops.to_device
        ops.to_device = lambda a: (seen.append(a.dtype), up(a))[1]      # the uploaded forms
        kw = dict(workers=te.WORKERS, ops=ops)
        if policy == "zipmoe":
            d = case.delay(delay)
            tr = prof.load_trace(case.trace_path, source)
            plan, ranks = prof.make_plan(tr, d, budget_split(source, b)[2], case.k)
            eng = GpuExpertEngine(source, b, "zipmoe", plan=plan.layers, ranks=ranks, delay=d,
                                  **kw)
        else:
            eng = GpuExpertEngine(source, b, policy, **kw)
        try:
            logits, tokens = te.generate(build_model(source, executor=eng), case.ids,
                                         te.DECODE_STEPS)
            where = (policy, delay)
            assert tokens == ref_tokens, where
            te.assert_same_logits(logits, ref_logits)
            st = eng.stats
            assert st.gpu_decodes == 0 and st.host_decodes > 0, where
            if policy != "zipmoe":
                assert st.hits["miss"] > 0, where
                assert st.uploads == st.host_decodes, where
                assert len(set(per.values())) == 1                  # experts of one shape
                assert st.pcie_bytes == st.host_decodes * max(per.values()), where
                # MXFP4: BF16 words (the BF16 biases too); FP8: the forms of the unbudgeted run
                assert set(seen) == ({np.dtype(np.uint16)} if kind == "mxfp4"
                                     else set(forms.values())), where
        finally:
            eng.close()
            source.close()


def _fake_cuda(monkeypatch):
    """``--device cuda`` resolved to a stand-in backend named ``cuda`` (no CuPy needed): what
    ``load`` decides before the backend computes anything."""
    import zipmoe_rt.backends as B
    from zipmoe_rt.backends.numpy_ref import NumpyBackend

    class FakeCuda(NumpyBackend):
        name = "cuda"
    monkeypatch.setattr(B, "resolve_device", lambda device, option="--device": device)
    monkeypatch.setattr(B, "get_backend", lambda name=None: FakeCuda())


@pytest.mark.parametrize("kind", KINDS)
def test_resident_compressed_on_cuda_is_one_clear_line(lowprec_models, kind, monkeypatch):
    """``load(device="cuda", resident="compressed")`` and ``run --device cuda --resident
    compressed`` of an FP8 / MXFP4 file: refused naming the file, a tensor, its encoding and the
    option (the CLI in one line, exit status 1)."""
    from click.testing import CliRunner

    from zipmoe_rt.cli import main
    z = lowprec_models(kind)[0]
    _fake_cuda(monkeypatch)
    enc = r"F8_E4M3 \((raw|bitplane)" if kind == "fp8" else r"U8 \(mxfp4"
    msg = (rf"tensor '[^']+' is {enc} encoding\): FP8 and MXFP4 weights on --device cuda are "
           rf"held decoded \(BF16 or float32\), not with --resident compressed; use --resident "
           rf"full")
    with pytest.raises(ValueError, match=msg):
        zipmoe_rt.load(z, device="cuda", resident="compressed")
    r = CliRunner().invoke(main, ["run", str(z), "-p", "hi", "--raw", "-n", "2", "--device",
                                  "cuda", "--resident", "compressed"])
    lines = r.output.strip().splitlines()
    assert r.exit_code == 1 and len(lines) == 1, r.output
    assert lines[0].startswith(f"error: {z}: ") and re.search(msg, lines[0])


@pytest.mark.parametrize("kind", KINDS)
def test_load_on_cuda_holds_the_compact_form(lowprec_models, kind, monkeypatch):
    """``load(device="cuda")`` (a stand-in backend named ``cuda`` computing with NumPy) reads the
    file in the compact form: the experts it uses are BF16 words for MXFP4 and the FP8 forms of
    the compact source; the logits are within 1e-3 of the CPU load's with the same tokens."""
    z = lowprec_models(kind)[0]
    cpu = zipmoe_rt.load(z, device="cpu")
    try:
        lc, tc = _run(cpu.net)
    finally:
        cpu.close()
    _fake_cuda(monkeypatch)
    m = zipmoe_rt.load(z, device="cuda")
    try:
        assert m.net.backend.name == "cuda" and m.source.lowprec_form == "compact"
        lg, tg = _run(m.net)
        ref = ZmoeSource(z, lowprec_form="compact")
        try:
            for key in sorted(ref.layouts)[:4]:
                got, want = m.source.expert(*key), ref.expert(*key)
                assert got.gate.dtype == want.gate.dtype
                assert got.down.tobytes() == want.down.tobytes()
                assert kind == "fp8" or got.gate.dtype == np.uint16
        finally:
            ref.close()
    finally:
        m.close()
    assert _max_diff(lg, lc) <= LOGITS_TOL and tg == tc


# ------------------------------------------------------------------ on a GPU


def _budgets(path):
    """{policy: budget} as tests/test_gpu.py sizes them, counting experts as the GPU engine
    does (the compact form's bytes): dense + (k + 1) experts for the LRU pools, dense + half
    the experts (at least that) for zipmoe."""
    src = ZmoeSource(path, lowprec_form="compact")
    try:
        k = int(src.hparams["num_experts_per_tok"])
        full = max(l.full_bytes for l in src.layouts.values())
        total = sum(l.full_bytes for l in src.layouts.values())
        lru = src.dense_bytes() + (k + 1) * full
        return {"zip-lru": lru, "raw-lru": lru,
                "zipmoe": src.dense_bytes() + max((k + 1) * full, total // 2)}
    finally:
        src.close()


def _check_expert_ops(be, forms):
    """experts_token and expert_accumulate of backend ``be`` on experts in the forms an FP8 /
    MXFP4 layer holds (``forms``: per expert ``bf16``, BF16 words, or ``f32``, float32) within
    1e-4 of the NumPy reference backend."""
    from zipmoe_rt.models.weights import ExpertWeights
    ref_be = get_backend("numpy")
    H, I, T = 64, 48, 5
    rng = np.random.default_rng(len(forms))

    def weight(shape, kind):
        w = rng.standard_normal(shape).astype(np.float32) * 0.3
        if kind == "bf16":
            w = (w.view(np.uint32) & 0xFFFF0000).view(np.float32)     # BF16-exact values
        return lowprec.compute_form(w)         # BF16 words where exact, float32 otherwise
    experts = [ExpertWeights(weight((I, H), k), weight((I, H), k), weight((H, I), k))
               for k in forms]
    assert [e.down.dtype for e in experts] == [np.uint16 if k == "bf16" else np.float32
                                               for k in forms]
    x = rng.standard_normal((T, H)).astype(np.float32)
    w = rng.random(len(forms)).astype(np.float32)
    ref = np.full(H, 0.5, np.float32)
    ref_be.experts_token(ref, x[0], experts, w)
    out = be.from_host(np.full((1, H), 0.5, np.float32))
    be.experts_token(out[0], be.from_host(x[:1])[0], [e.map(be.from_host) for e in experts], w)
    np.testing.assert_allclose(be.to_host(out)[0], ref, rtol=1e-4, atol=1e-4)
    rows, rw = np.array([4, 1, 2], np.int64), np.array([0.3, 0.6, 0.9], np.float32)
    for e in experts:
        ref = np.ones((T, H), np.float32)
        ref_be.expert_accumulate(ref, x, rows, rw, e)
        got = be.from_host(np.ones((T, H), np.float32))
        be.expert_accumulate(got, be.from_host(x), rows, rw, e.map(be.from_host))
        got = be.to_host(got)
        assert (got[[0, 3]] == 1.0).all()
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4)


FORMS = [("f32", "f32"), ("bf16", "f32", "bf16"), ("f32",)]


@pytest.mark.parametrize("forms", FORMS)
def test_cpu_expert_ops_take_the_same_forms(forms):
    _check_expert_ops(get_backend("numba"), forms)


@gpu
@pytest.mark.parametrize("fused", [True, False])
@pytest.mark.parametrize("forms", FORMS)
def test_cuda_expert_ops_take_float32_experts(forms, fused, monkeypatch):
    """The CUDA expert ops on float32 experts, and BF16 and float32 experts in one call (FP8
    experts whose products are BF16-exact beside others), with the fused k-expert kernels on
    and off (:func:`_check_expert_ops`)."""
    from zipmoe_rt.backends import cupy_cuda
    monkeypatch.setattr(cupy_cuda, "FUSED_EXPERTS", fused)
    _check_expert_ops(get_backend("cuda"), forms)


@gpu
@pytest.mark.parametrize("kind", GPU_KINDS)
def test_load_on_cuda_matches_cpu_and_transformers(lowprec_models, kind):
    """``load(device="cuda")`` of the FP8 / MXFP4 file: logits within 1e-3 of the CPU load and
    of transformers at every prompt position (and of the CPU load at every greedy step), the
    same 20 greedy tokens; every expert held on the GPU is the compact form, bit for bit."""
    z, _, _, hf = lowprec_models(kind)
    cpu = zipmoe_rt.load(z, device="cpu")
    try:
        lc, tc = _run(cpu.net)
    finally:
        cpu.close()
    m = zipmoe_rt.load(z, device="cuda")
    try:
        assert m.device == "cuda" and m.net.backend.name == "cuda"
        lg, tg = _run(m.net)
        held = m.net.executor.source._experts          # ResidentExperts: device arrays
        assert held and m.memory_report()["experts"] == sum(w.nbytes for w in held.values())
        host = ZmoeSource(z, lowprec_form="compact")
        try:
            for key, w in held.items():
                want = host.expert(*key)
                for a, b in ((w.gate, want.gate), (w.up, want.up), (w.down, want.down)):
                    assert a.dtype == b.dtype
                    assert m.net.backend.to_host(a).tobytes() == b.tobytes()
                if kind != "fp8":
                    assert w.gate.dtype == np.uint16 or key == (1, 3)
        finally:
            host.close()
    finally:
        m.close()
    hf_first, hf_tokens = _hf_run(hf)
    d_hf, d_cpu = float(np.abs(lg[0] - hf_first).max()), _max_diff(lg, lc)
    print(f"{kind}: load(device='cuda') max|dlogit| vs transformers {d_hf:.2e}, vs CPU "
          f"{d_cpu:.2e}, greedy {len(tg)} tokens identical: {tg == tc == hf_tokens}")
    assert lg[0].shape == (16, 256) and lg[0].dtype == np.float32
    assert d_hf <= LOGITS_TOL and d_cpu <= LOGITS_TOL
    assert tg == tc == hf_tokens and len(tg) == 20


@gpu
@pytest.mark.parametrize("kind", GPU_KINDS)
def test_cuda_budget_each_policy_equals_unbudgeted(lowprec_models, kind):
    """Under a GPU budget, each policy, host cache empty and full: logits bit-identical to the
    unbudgeted GPU run with the same 20 greedy tokens; the experts are decoded and dequantised
    on the host and uploaded (no GPU segment decode), the LRU pools evicting and reloading."""
    from zipmoe_rt.engine.gpu_engine import GpuExpertEngine
    z, raw, trace, _ = lowprec_models(kind)
    m = zipmoe_rt.load(z, device="cuda")
    try:
        gl, gt = _run(m.net)
    finally:
        m.close()
    for policy, path in (("zip-lru", z), ("raw-lru", raw), ("zipmoe", z)):
        budget = _budgets(path)[policy]
        for hb in (None, "100%"):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")               # calibration notes (zipmoe)
                b = zipmoe_rt.load(path, device="cuda", memory_budget=budget, policy=policy,
                                   trace=trace, workers=2, host_budget=hb)
            try:
                eng = b.engine
                where = (kind, policy, hb)
                assert isinstance(eng, GpuExpertEngine) and eng.ops.name == "cuda", where
                bl, bt = _run(b.net)
                assert bt == gt, where
                assert all(np.array_equal(x, y) for x, y in zip(bl, gl)), where
                st = eng.stats
                assert st.gpu_decodes == 0, where
                if policy != "zipmoe":
                    assert st.hits["miss"] > 0 and st.host_decodes > 0, where
                    assert st.uploads > 0 and st.pcie_bytes > 0, where
                print(f"{kind} {policy} host {hb}: {st.host_decodes} host decodes, "
                      f"{st.uploads} uploads, {st.pcie_bytes / 1e3:.0f} kB over PCIe")
            finally:
                b.close()


@gpu
def test_cuda_resident_compressed_is_refused(lowprec_models):
    z = lowprec_models("fp8")[0]
    with pytest.raises(ValueError, match=r"is F8_E4M3 .*: FP8 and MXFP4 weights on --device "
                                         r"cuda are held decoded \(BF16 or float32\), not with "
                                         r"--resident compressed; use --resident full"):
        zipmoe_rt.load(z, device="cuda", resident="compressed")

