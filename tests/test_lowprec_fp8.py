"""A DeepSeek-V3 checkpoint in FP8 E4M3 with 8x8 block scales (every linear weight quantised by
transformers' own ``Fp8Quantize``, as its FP8 quantizer saves them): it converts (experts as FP8
bit-planes, their scales in their expert blocks), exports byte-identically, matches the forward
of transformers on the same weights dequantised by its ``Fp8Dequantize`` (max |Δlogit| ≤ 1e-3
at every position, 20 identical greedy tokens), and runs bit-identically under memory budgets
with each policy. Also: the dequantisation kernel against a NumPy reference (ceil block grids,
all 256 patterns), and the converter's and loader's errors."""
from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

import zmoe
from zipmoe_rt.kernels.lowprec import dequant_fp8
from zmoe.fp8 import E4M3_TO_F32

from family_checks import convert_quietly
from lowprec_models import (BUDGETED_RUNS, check_budgeted_run, check_greedy_20_tokens,
                            check_plan_budget_is_loads,
                            check_logits_match)

LOGITS_TOL = 1e-3
PROMPT = np.random.default_rng(3).integers(0, 256, 16)


# ------------------------------------------------------------------ kernel


@pytest.mark.parametrize("shape,block", [((256, 8), (128, 128)), ((40, 64), (16, 16)),
                                         ((37, 70), (8, 32)), ((5, 3), (1, 1))])
def test_dequant_fp8_is_the_block_product(shape, block):
    rng = np.random.default_rng(shape[0])
    q = rng.integers(0, 256, shape).astype(np.uint8)
    q.reshape(-1)[:256] = np.arange(256)[:q.size]      # every pattern (NaN, ±0, subnormals)
    grid = (-(-shape[0] // block[0]), -(-shape[1] // block[1]))
    s = (rng.random(grid) * 1e-2 + 1e-4).astype(np.float32)
    want = E4M3_TO_F32[q] * np.repeat(np.repeat(s, block[0], 0), block[1], 1)[:shape[0], :shape[1]]
    got = dequant_fp8(q, s, block)
    assert got.dtype == np.float32
    assert np.array_equal(got.view(np.uint32)[~np.isnan(want)], want.view(np.uint32)[~np.isnan(want)])
    assert np.array_equal(np.isnan(got), np.isnan(want))


def test_dequant_fp8_matches_transformers():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from lowprec_models import _quantizer

    _, deq = _quantizer((8, 8))
    rng = np.random.default_rng(0)
    q = rng.integers(0, 256, (32, 48)).astype(np.uint8)
    q[q & 0x7F == 0x7F] = 0                       # transformers' product keeps NaN anyway
    s = rng.random((4, 6)).astype(np.float32)
    ref = deq._dequantize_one(torch.from_numpy(q).view(torch.float8_e4m3fn), torch.from_numpy(s),
                              torch.float32).numpy()
    assert dequant_fp8(q, s, (8, 8)).view(np.uint32).tolist() == ref.view(np.uint32).tolist()


def test_dequant_fp8_refuses_a_scale_of_the_wrong_grid():
    with pytest.raises(ValueError, match=r"scale shape \[1, 1\], but a \[40, 64\] weight in "
                                         r"blocks of \[32, 32\] needs \[2, 2\]"):
        dequant_fp8(np.zeros((40, 64), np.uint8), np.ones((1, 1), np.float32), (32, 32))


# ------------------------------------------------------------------ the tiny FP8 model


@pytest.fixture(scope="module")
def fp8_model(tiny_moe_dir, tmp_path_factory):
    """(FP8 checkpoint folder, its .zmoe, transformers' model on the dequantised weights)."""
    from lowprec_models import dequantized_reference, make_tiny_fp8
    from test_api import make_chat_model
    from tiny_models import load_hf

    root = tmp_path_factory.mktemp("fp8")
    src = make_tiny_fp8(tiny_moe_dir("deepseek_v3"), root / "src")
    z = make_chat_model(src, root / "fp8")
    hf = load_hf(dequantized_reference(src, root / "ref"))
    return root / "fp8", z, hf


def test_converted_file_holds_fp8_bitplanes(fp8_model):
    folder, z, _ = fp8_model
    with zmoe.ZmoeReader(z) as r:
        assert r.header.version == 3
        assert r.metadata["hparams.fp8_block_size"] == [8, 8]
        gate = r.tensors["model.layers.1.mlp.experts.0.gate_proj.weight"]
        assert (gate["dtype"], gate["encoding"]) == ("F8_E4M3", "bitplane")
        scale = r.tensors["model.layers.1.mlp.experts.0.gate_proj.weight_scale_inv"]
        assert scale["expert"] == {"layer": 1, "expert": 0, "role": "gate_scale"}
        assert r.tensors["model.layers.0.self_attn.o_proj.weight"]["dtype"] == "F8_E4M3"
        assert "expert" not in r.tensors["model.layers.0.self_attn.o_proj.weight_scale_inv"]
        block = r.experts[(1, 0)]
        assert sorted(block["tensors"]) == sorted(
            f"model.layers.1.mlp.experts.0.{p}_proj.{w}" for p in ("gate", "up", "down")
            for w in ("weight", "weight_scale_inv"))


def test_export_is_byte_identical(fp8_model, tmp_path):
    from safetensors import safe_open
    from zipmoe_rt.convert.export import export

    folder, z, _ = fp8_model
    out = export(z, tmp_path / "hf", progress=False)
    with safe_open(folder / "model.safetensors", "np") as a, \
            safe_open(out / "model.safetensors", "np") as b:
        assert list(a.keys()) == list(b.keys())
    raw_a = _tensor_bytes(folder / "model.safetensors")
    raw_b = _tensor_bytes(out / "model.safetensors")
    assert raw_a.keys() == raw_b.keys() and all(raw_a[k] == raw_b[k] for k in raw_a)
    assert any(v[0] == "F8_E4M3" for v in raw_a.values())


def _tensor_bytes(path: Path) -> dict:
    """name -> (dtype, shape, bytes) read from the safetensors header (no dtype conversion)."""
    import struct
    b = path.read_bytes()
    (n,) = struct.unpack("<Q", b[:8])
    head = json.loads(b[8:8 + n])
    head.pop("__metadata__", None)
    return {k: (v["dtype"], tuple(v["shape"]), b[8 + n + v["data_offsets"][0]:
                                                 8 + n + v["data_offsets"][1]])
            for k, v in head.items()}


def test_logits_match_transformers_dequantised(fp8_model):
    check_logits_match(fp8_model[1], fp8_model[2], PROMPT, LOGITS_TOL)


def test_checkpoint_folder_source_dequantises_too(fp8_model):
    """Building the model straight from the FP8 folder (CheckpointSource) gives the logits of
    the converted file, bit for bit."""
    from hf_parity import checkpoint_logits, zmoe_logits

    folder, z, _ = fp8_model
    assert checkpoint_logits(folder, PROMPT).tobytes() == zmoe_logits(z, PROMPT).tobytes()


def test_greedy_20_tokens(fp8_model):
    check_greedy_20_tokens(fp8_model[1], fp8_model[2], PROMPT)


def test_experts_are_float32_products(fp8_model):
    from zipmoe_rt.engine.store import ZmoeSource

    folder, z, _ = fp8_model
    raw = _tensor_bytes(folder / "model.safetensors")
    src = ZmoeSource(z)
    try:
        w = src.expert(2, 5)
        name = "model.layers.2.mlp.experts.5.down_proj.weight"
        q = np.frombuffer(raw[name][2], np.uint8).reshape(raw[name][1])
        s = np.frombuffer(raw[name + "_scale_inv"][2], np.float32).reshape(raw[name + "_scale_inv"][1])
        assert w.down.dtype == np.float32
        assert w.down.tobytes() == dequant_fp8(q, s, (8, 8)).tobytes()
        assert src.tensor("model.layers.0.self_attn.o_proj.weight").dtype == np.float32
    finally:
        src.close()


# ------------------------------------------------------------------ budgets


def engine_case(z, folder, name):
    """A test_engine Case over the container ``z``: its unbudgeted reference run (prompt and
    greedy steps of test_engine) and a recorded activation trace in ``folder``."""
    import test_engine as te

    return te.make_case(z, folder, name, 5)


@pytest.fixture(scope="module")
def fp8_case(fp8_model, tmp_path_factory):
    """A test_engine Case over the FP8 file."""
    return engine_case(fp8_model[1], tmp_path_factory.mktemp("fp8_engine"), "fp8")


def test_raw_companion_keeps_fp8(fp8_case):
    with zmoe.ZmoeReader(fp8_case.raw) as r:
        t = r.tensors["model.layers.1.mlp.experts.0.up_proj.weight"]
        assert (t["dtype"], t["encoding"]) == ("F8_E4M3", "raw")


@pytest.mark.parametrize("policy,budget,delay", BUDGETED_RUNS)
def test_budgeted_generation_is_bit_identical(fp8_case, policy, budget, delay):
    check_budgeted_run(fp8_case, policy, budget, delay)


def test_full_bytes_count_the_float32_form(fp8_case):
    lay = fp8_case.layouts[(1, 0)]
    assert lay.full_bytes == 3 * 32 * 64 * 4          # three projections in float32, no scales


# ------------------------------------------------------------------ errors


def _copy(folder: Path, dest: Path) -> Path:
    shutil.copytree(folder, dest)
    return dest


def _edit_tensors(folder: Path, edit):
    from safetensors.torch import load_file, save_file
    t = load_file(folder / "model.safetensors")
    edit(t)
    save_file(t, folder / "model.safetensors", metadata={"format": "pt"})


def _convert(folder: Path):
    return convert_quietly(folder, folder.with_suffix(".zmoe"))


def test_fp8_weight_without_its_scale_is_refused(fp8_model, tmp_path):
    from zipmoe_rt.convert.errors import ConversionError
    d = _copy(fp8_model[0], tmp_path / "m")
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    _edit_tensors(d, lambda t: t.pop(name + "_scale_inv"))
    with pytest.raises(ConversionError, match=rf"tensor '{name}' is F8_E4M3 but the checkpoint "
                                              rf"has no F32 '{name}_scale_inv'"):
        _convert(d)


def test_scale_of_the_wrong_grid_is_refused(fp8_model, tmp_path):
    import torch
    from zipmoe_rt.convert.errors import ConversionError
    d = _copy(fp8_model[0], tmp_path / "m")
    name = "model.layers.0.self_attn.o_proj.weight_scale_inv"
    _edit_tensors(d, lambda t: t.__setitem__(name, torch.ones(1, 8)))
    with pytest.raises(ConversionError, match=rf"'{name}' has shape \[1, 8\], but .* in blocks "
                                              rf"of \[8, 8\] needs \[8, 8\]"):
        _convert(d)


def test_fp8_tensors_without_quantization_config_are_refused(fp8_model, tmp_path):
    from zipmoe_rt.convert.errors import ConversionError
    d = _copy(fp8_model[0], tmp_path / "m")
    cfg = json.loads((d / "config.json").read_text())
    del cfg["quantization_config"]
    (d / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(ConversionError, match="has dtype F8_E4M3; .* quantization_config of "
                                              "quant_method fp8"):
        _convert(d)


@pytest.mark.parametrize("over,needle", [
    ({"quant_method": "mxfp4"}, r"quant_method 'mxfp4' is not supported"),
    ({"activation_scheme": "static"}, r"activation_scheme 'static' is not supported"),
    ({"scale_fmt": "ue8m0"}, r"scale_fmt 'ue8m0' is not supported"),
    ({"weight_block_size": [128]}, r"weight_block_size \[128\] is not two integers"),
    ({"weight_block_size": [0, 128]}, r"weight_block_size \[0, 128\] is not two integers")])
def test_quantization_config_errors_name_the_field(over, needle):
    from zipmoe_rt.families.hparams import ConfigError
    from zipmoe_rt.families.lowprec import fp8_block_size
    q = {"quant_method": "fp8", "weight_block_size": [128, 128], **over}
    with pytest.raises(ConfigError, match="config.json: quantization_config." + needle):
        fp8_block_size({"quantization_config": q})


def test_block_size_defaults_to_transformers_128():
    from zipmoe_rt.families.lowprec import fp8_block_size
    assert fp8_block_size({"quantization_config": {"quant_method": "fp8"}}) == [128, 128]
    assert fp8_block_size({}) is None


def test_cuda_runs_it_but_not_compressed_naming_the_encoding(fp8_model):
    """The CPU backends and CUDA take the file; CUDA with ``--resident compressed`` and any
    other backend are refused, naming the file, the tensor and its encoding."""
    from zipmoe_rt.engine.lowprec import refuse_device
    with zmoe.ZmoeReader(fp8_model[1]) as r:
        for dev in ("cpu", "numba", "numpy", "cuda"):
            refuse_device(r, dev)
        refuse_device(r, "numba", "compressed")
        with pytest.raises(ValueError, match=re.escape(f"{r.path}: tensor '") + r".*' is F8_E4M3 "
                                             r"\((raw|bitplane) encoding\): FP8 and MXFP4 weights "
                                             r"on --device cuda are held decoded \(BF16 or "
                                             r"float32\), not with --resident compressed"):
            refuse_device(r, "cuda", "compressed")
        with pytest.raises(ValueError, match=r"is F8_E4M3 .*: FP8 and MXFP4 weights run on the "
                                             r"CPU and CUDA only, not on --device rocm"):
            refuse_device(r, "rocm")


def test_plan_of_the_v3_fp8_release(tmp_path):
    """``plan`` on DeepSeek-V3's FP8 config.json: the FP8 line (source bytes with the 128x128
    scales, the stored estimate, float32 in memory) after the BF16 figures."""
    from zipmoe_rt.plan import FP8_STORED_RATIO, format_plan, size_plan

    v3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
          "vocab_size": 129280, "hidden_size": 7168, "num_hidden_layers": 61,
          "num_attention_heads": 128, "num_key_value_heads": 128, "intermediate_size": 18432,
          "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8,
          "n_shared_experts": 1, "first_k_dense_replace": 3, "q_lora_rank": 1536,
          "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
          "v_head_dim": 128, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
          "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
          "rope_theta": 10000, "max_position_embeddings": 163840,
          "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3",
                                  "quant_method": "fp8", "weight_block_size": [128, 128]}}
    (tmp_path / "config.json").write_text(json.dumps(v3))
    p = size_plan(tmp_path)
    assert p.hparams.fp8_block_size == [128, 128]
    assert p.expert_params == 58 * 256 * 3 * 7168 * 2048
    src = p.expert_params * (1 + 4 / 128 ** 2)
    line = format_plan(p).splitlines()[-1]
    assert line.startswith(f"FP8 source  {src / 1e9:>14,.2f} GB  experts as F8_E4M3 + F32 scales "
                           f"per 128x128 block; stored at ~83.7 % "
                           f"({src * FP8_STORED_RATIO / 1e9:,.2f} GB)")
    v3.pop("quantization_config")
    (tmp_path / "config.json").write_text(json.dumps(v3))
    assert "FP8" not in format_plan(size_plan(tmp_path))


def test_inspect_counts_fp8_scales_as_overhead(fp8_model):
    """The F32 block scales of an FP8 file are overhead, not weights: ``inspect``'s expert and
    dense weight counts equal the parameters ``plan`` counts from the config."""
    from zipmoe_rt.convert.export import weight_totals
    from zipmoe_rt.plan import size_plan

    src, z, _ = fp8_model
    plan = size_plan(src)
    with zmoe.ZmoeReader(z, use_mmap=False) as r:
        tot = weight_totals(r)
    assert tot["expert"]["weights"] == plan.expert_params
    assert tot["dense"]["weights"] == plan.dense_params
    assert 6.0 < 8 * tot["expert"]["stored"] / tot["expert"]["weights"] < 8.5


def test_plan_budget_is_the_one_load_uses(fp8_model):
    """``plan -m 50%`` on the FP8 release divides the budget ``load(memory_budget="50%")``
    uses: FP8 weights, experts and dense, counted as the float32 they are held in, the block
    scales as nothing (it gave 0.3 MB against the runtime's 0.6 MB)."""
    src, z, _ = fp8_model
    plan = check_plan_budget_is_loads(src, z)
    assert plan.budget.expert_full == 4 * plan.expert_params // 16      # 16 experts, float32
