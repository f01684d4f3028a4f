"""gpt-oss in the layout of its MXFP4 release (expert weights as ``*_blocks`` / ``*_scales``,
quantised here with the OCP MX rule, :func:`lowprec_models.quantize_mxfp4`): the tiny checkpoint
converts (blocks in the ``mxfp4`` encoding, the source bytes; scales as U8 bit-planes), exports
byte-identically, matches transformers' forward with the checkpoint dequantised at load
(``Mxfp4Config(dequantize=True)``: max |Δlogit| ≤ 1e-3 at every position, 20 identical greedy
tokens) and runs bit-identically under memory budgets with each policy."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

import zmoe

from lowprec_models import (BUDGETED_RUNS, check_budgeted_run, check_greedy_20_tokens,
                            check_plan_budget_is_loads,
                            check_logits_match)

LOGITS_TOL = 1e-3
PROMPT = np.random.default_rng(7).integers(0, 256, 16)


@pytest.fixture(scope="module")
def mx_model(tmp_path_factory):
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lowprec_models import load_hf_mxfp4, make_tiny_mxfp4
    from test_api import make_chat_model

    root = tmp_path_factory.mktemp("mxfp4")
    src = make_tiny_mxfp4(root / "src")
    with warnings.catch_warnings():
        warnings.simplefilter("error")       # no tensor left unused, no other warning
        z = make_chat_model(src, root / "mx")
    return root / "mx", z, load_hf_mxfp4(src)


def test_converted_file_keeps_the_mxfp4_bytes(mx_model):
    _, z, _ = mx_model
    with zmoe.ZmoeReader(z) as r:
        assert r.header.version == 3
        b = r.tensors["model.layers.0.mlp.experts.gate_up_proj_blocks"]
        s = r.tensors["model.layers.0.mlp.experts.gate_up_proj_scales"]
        assert (b["encoding"], b["dtype"], b["expert"]["role"]) == ("mxfp4", "U8", "gate_up_blocks")
        assert (s["encoding"], s["dtype"], s["expert"]["role"]) == ("bitplane", "U8", "gate_up_scales")
        assert b["expert"]["stacked"] and len(b["parts"]) == 8
        blocks = sum(p["raw"][1] for p in b["parts"])
        scales = sum(sum(c[1] for c in p["exp"]) for p in s["parts"])
        assert blocks == 8 * 128 * 2 * 16 and scales < 8 * 128 * 2   # scales coded below 1 byte


def test_export_is_byte_identical(mx_model, tmp_path):
    from test_lowprec_fp8 import _tensor_bytes
    from zipmoe_rt.convert.export import export

    folder, z, _ = mx_model
    out = export(z, tmp_path / "hf", progress=False)
    a, b = _tensor_bytes(folder / "model.safetensors"), _tensor_bytes(out / "model.safetensors")
    assert a.keys() == b.keys() and all(a[k] == b[k] for k in a)
    assert sum(k.endswith("_blocks") for k in a) == 8


def test_logits_match_transformers_dequantised(mx_model):
    check_logits_match(mx_model[1], mx_model[2], PROMPT, LOGITS_TOL)


def test_greedy_20_tokens(mx_model):
    check_greedy_20_tokens(mx_model[1], mx_model[2], PROMPT)


@pytest.fixture(scope="module")
def mx_case(mx_model, tmp_path_factory):
    from test_lowprec_fp8 import engine_case
    return engine_case(mx_model[1], tmp_path_factory.mktemp("mx_engine"), "mxfp4")


@pytest.mark.parametrize("policy,budget,delay", BUDGETED_RUNS)
def test_budgeted_generation_is_bit_identical(mx_case, policy, budget, delay):
    check_budgeted_run(mx_case, policy, budget, delay)


def test_cuda_runs_it_but_not_compressed_naming_the_encoding(mx_model):
    from zipmoe_rt.engine.lowprec import refuse_device
    with zmoe.ZmoeReader(mx_model[1]) as r:
        refuse_device(r, "cuda")
        with pytest.raises(ValueError, match=r"is U8 \(mxfp4 encoding\): FP8 and MXFP4 weights "
                                             r"on --device cuda are held decoded \(BF16 or "
                                             r"float32\), not with --resident compressed; use "
                                             r"--resident full"):
            refuse_device(r, "cuda", "compressed")


def test_inspect_counts_the_weights_mxfp4_blocks_encode(mx_model):
    """``inspect`` (and ``convert``'s totals) count two weights per byte of an MXFP4 block
    tensor and none for its e8m0 scales: the expert weights equal the expert parameters
    ``plan`` counts from the config, at ~4.04 bits per block weight plus scale and bias
    overhead (each U8 byte was counted as one weight, 8 bits)."""
    from zipmoe_rt.convert.export import summarize, weight_totals
    from zipmoe_rt.plan import size_plan

    folder, z, _ = mx_model
    plan = size_plan(folder)
    with zmoe.ZmoeReader(z, use_mmap=False) as r:
        tot = weight_totals(r)
    assert tot["expert"]["weights"] == plan.expert_params == 399_360
    assert tot["dense"]["weights"] == plan.dense_params
    bits = 8 * tot["expert"]["stored"] / tot["expert"]["weights"]
    assert 4.0 <= bits <= 4.6, bits
    text = summarize(z)
    assert f"  expert  {plan.expert_params:>14,d} weights" in text, text
    blocks = [l for l in text.splitlines() if l.strip().startswith(
        "model.layers.0.mlp.experts.gate_up_proj_blocks ")]
    assert len(blocks) == 1 and blocks[0].endswith("  4.00"), blocks


def test_plan_budget_is_the_one_load_uses(mx_model):
    """``plan -m 50%`` on the MXFP4 release divides the budget ``load(memory_budget="50%")``
    uses: experts counted as the float32 weights they are decoded into (the runtime's own
    ``decoded_bytes``), not at BF16 (which gave 0.6 MB against the runtime's 1.0 MB)."""
    folder, z, _ = mx_model
    plan = check_plan_budget_is_loads(folder, z)
    # 4 bytes per weight of the projections, 2 per bias: 98,304 + 1,536 per layer of 8 experts
    assert plan.budget.expert_full == 4 * 98_304 // 8 + 2 * 1_536 // 8


def test_plan_expects_the_mxfp4_file_not_a_bf16_one(mx_model):
    """The expected ``.zmoe`` size comes from the release's encoding (FP4 blocks and e8m0
    scales stay ~4.04 bits per weight), so it is below the BF16 copy's expected size."""
    from zipmoe_rt.plan import EXPERT_STORED_RATIO, MXFP4_STORED_RATIO, size_plan

    p = size_plan(mx_model[0])
    blocks = 393_216                    # FP4 weights; the rest of the expert params are biases
    want = (p.dense_bytes + round((blocks // 2 + blocks // 32) * MXFP4_STORED_RATIO
                                  + 2 * (p.expert_params - blocks) * EXPERT_STORED_RATIO))
    assert abs(p.zmoe_bytes - want) <= 1, (p.zmoe_bytes, want)
    assert p.zmoe_bytes < p.dense_bytes + p.expert_bytes * EXPERT_STORED_RATIO / 2
