"""Tiny low-precision checkpoints built at test time from the BF16 ones of :mod:`tiny_models`:
DeepSeek-V3 with FP8 E4M3 weights and per-block ``weight_scale_inv`` (quantised by transformers'
own ``Fp8Quantize`` op, as its FP8 quantizer saves them), and the F32 reference the same
weights give through transformers' ``Fp8Dequantize`` op (what transformers computes with when
it loads an FP8 checkpoint dequantised); gpt-oss in the layout of its MXFP4 release. Also the
checks the FP8 and MXFP4 tests share: logits and greedy tokens against transformers, and
budgeted runs against the unbudgeted one.

Import only from tests that have already done ``pytest.importorskip("torch")`` /
``("transformers")``.
"""
from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

#: tensors transformers' FP8 quantizer leaves alone in DeepSeek-V3: embeddings, norms, the
#: output head and the router (``DeepseekV3TopkRouter`` is no ``nn.Linear``)
_KEEP = ("embed_tokens", "norm", "lm_head", "mlp.gate.weight", "e_score_correction_bias")


def _quantizer(block):
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize, Fp8Quantize

    hq = SimpleNamespace(quantization_config=FineGrainedFP8Config(weight_block_size=tuple(block)))
    return Fp8Quantize(hq), Fp8Dequantize(hq)


def fp8_quantization_config(block) -> dict:
    """The ``quantization_config`` of DeepSeek-V3's FP8 release, with block ``block``."""
    return {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
            "weight_block_size": list(block)}


def make_tiny_fp8(src: Path, folder: Path, block=(8, 8)) -> Path:
    """Quantise the BF16 checkpoint ``src`` (a DeepSeek-V3 spec of :mod:`tiny_models`) to FP8:
    every linear weight (attention, dense and shared MLPs, routed experts) becomes an F8_E4M3
    ``weight`` with an F32 ``weight_scale_inv`` per ``block`` (transformers' ``Fp8Quantize``);
    the other tensors stay BF16. Writes ``folder`` (config.json with the quantization_config,
    model.safetensors) and returns it."""
    import torch
    from safetensors.torch import load_file, save_file

    quant, _ = _quantizer(block)
    folder.mkdir(parents=True, exist_ok=True)
    out = {}
    for name, t in load_file(src / "model.safetensors").items():
        if t.ndim == 2 and name.endswith(".weight") and not any(k in name for k in _KEEP):
            out.update(quant._quantize_one(name, t.to(torch.float32)))
        else:
            out[name] = t
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = fp8_quantization_config(block)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    for extra in ("generation_config.json",):
        if (src / extra).exists():
            (folder / extra).write_text((src / extra).read_text())
    return folder


def dequantized_reference(fp8: Path, folder: Path) -> Path:
    """The FP8 checkpoint ``fp8`` dequantised by transformers' ``Fp8Dequantize`` into F32
    weights (the product of the FP8 value and its block's scale in float32), saved in ``folder``
    without a quantization_config: what transformers' dequantised forward computes with."""
    import torch
    from safetensors.torch import load_file, save_file

    cfg = json.loads((fp8 / "config.json").read_text())
    block = cfg.pop("quantization_config")["weight_block_size"]
    _, deq = _quantizer(block)
    src = load_file(fp8 / "model.safetensors")
    out = {}
    for name, t in src.items():
        if name.endswith("_scale_inv"):
            continue
        scale = src.get(name + "_scale_inv")
        out[name] = t if scale is None else deq._dequantize_one(t, scale, torch.float32)
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    return folder


def quantize_mxfp4(w):
    """OCP MX FP4 of ``w`` float32 [R, C] (C % 32 == 0): per 32 weights of a row the e8m0 scale
    ``2^(floor(log2 max|w|) - 2)`` (the OCP MX v1.0 rule: the largest E2M1 magnitude, 6, has
    exponent 2), values rounded to the nearest E2M1 (ties to even), clamped to ±6.
    Returns (blocks uint8 [R, C/32, 16], scales uint8 [R, C/32])."""
    import numpy as np

    grid = np.array([0, .5, 1, 1.5, 2, 3, 4, 6], np.float32)
    R, C = w.shape
    g = w.reshape(R, C // 32, 32)
    amax = np.abs(g).max(axis=2)
    e = np.where(amax > 0, np.floor(np.log2(np.where(amax > 0, amax, 1))) - 2, -127)
    e = np.clip(e, -127, 127).astype(np.int32)
    a = np.clip(np.abs(g) / np.ldexp(np.float32(1), e)[..., None], 0, 6)
    hi = np.clip(np.searchsorted(grid, a), 1, 7)
    lo = hi - 1
    up = (grid[hi] - a < a - grid[lo]) | ((grid[hi] - a == a - grid[lo]) & (hi % 2 == 0))
    code = np.where(up, hi, lo).astype(np.uint8) | (np.signbit(g).astype(np.uint8) << 3)
    return (code[..., 0::2] | (code[..., 1::2] << 4)).astype(np.uint8), (e + 127).astype(np.uint8)


def make_tiny_mxfp4(folder: Path, spec: str = "gpt_oss", intermediate_size: int = 64) -> Path:
    """A tiny gpt-oss checkpoint in the layout of the MXFP4 release: the BF16 model of spec
    ``spec`` (:mod:`tiny_models`, with ``intermediate_size`` a multiple of 32) saved by
    transformers, then each expert weight (``gate_up_proj`` [E, H, 2I], ``down_proj`` [E, I, H],
    in x out) quantised per 32 input weights of each output row (:func:`quantize_mxfp4`) into
    ``<name>_blocks`` U8 [E, out, in / 32, 16] and ``<name>_scales`` U8 [E, out, in / 32]; the
    biases and the other tensors stay BF16; config.json gets ``quantization_config``
    ``{"quant_method": "mxfp4"}``."""
    import numpy as np
    import torch
    import transformers
    from safetensors.torch import load_file, save_file

    import tiny_models as tm

    cfg_cls, model_cls = tm.hf_classes(spec)
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**dict(tm.SPECS[spec][1],
                                                intermediate_size=intermediate_size))
    model = getattr(transformers, model_cls)(cfg)
    tm._randomize_norms(model, torch, torch.Generator().manual_seed(1))
    tm._randomize_gpt_oss(model, torch, torch.Generator().manual_seed(3))
    src = folder.with_name(folder.name + "-bf16")
    model.to(torch.bfloat16).save_pretrained(src)
    out = {}
    for name, t in load_file(src / "model.safetensors").items():
        if name.endswith(("mlp.experts.gate_up_proj", "mlp.experts.down_proj")):
            w = t.to(torch.float32).numpy().transpose(0, 2, 1)          # [E, out, in]
            q = [quantize_mxfp4(np.ascontiguousarray(x)) for x in w]
            out[name + "_blocks"] = torch.from_numpy(np.stack([b for b, _ in q]))
            out[name + "_scales"] = torch.from_numpy(np.stack([s for _, s in q]))
        else:
            out[name] = t
    folder.mkdir(parents=True, exist_ok=True)
    save_file(out, folder / "model.safetensors", metadata={"format": "pt"})
    c = json.loads((src / "config.json").read_text())
    c["quantization_config"] = {"quant_method": "mxfp4",
                                "modules_to_not_convert": ["model.layers.*.self_attn",
                                                           "model.layers.*.mlp.router",
                                                           "model.embed_tokens", "lm_head"]}
    (folder / "config.json").write_text(json.dumps(c, indent=2))
    return folder


def load_hf_mxfp4(folder):
    """transformers' model of an MXFP4 checkpoint, dequantised at load (``Mxfp4Config(
    dequantize=True)``: ``convert_moe_packed_tensors``), float32, eager attention.

    transformers up to at least 5.17 keeps the dequantised experts in BF16 whatever ``dtype``
    asks (its expert matmuls then round the activations to BF16: ~5e-3 on the logits of the
    tiny model); every MXFP4 weight times its power-of-two scale is exact in BF16, so widening
    the model to float32 afterwards gives the same weights in the precision the comparison
    needs, on every version. The experts get the config's ``swiglu_alpha`` / ``swiglu_limit``
    where the installed transformers ignores them (``test_gpu.hf_glu_from_config``)."""
    import torch
    import transformers

    from test_gpu import hf_glu_from_config

    m = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager",
        quantization_config=transformers.Mxfp4Config(dequantize=True))
    m = m.float().eval()
    hf_glu_from_config(m)
    return m


#: the budgeted runs of the low-precision tests: (policy, budget, delay)
BUDGETED_RUNS = [
    ("raw-lru", "min", None), ("raw-lru", "mid", None), ("zip-lru", "min", None),
    ("zip-lru", "mid", None), ("zip-lru", "all", None), ("zipmoe", "mid", "CE"),
    ("zipmoe", "mid", "S"), ("zipmoe", "mid", "FE"), ("zipmoe", "all", "CE")]


def check_logits_match(z: Path, hf, prompt, tol: float) -> None:
    """The container ``z``'s logits at every position of ``prompt`` (16 ids) are within
    ``tol`` of transformers' model ``hf``'s."""
    import numpy as np

    from hf_parity import hf_logits, zmoe_logits

    ref = hf_logits(hf, prompt)
    ours = zmoe_logits(z, prompt)
    assert ours.shape == ref.shape == (16, 256)
    assert np.abs(ours - ref).max() <= tol


def check_greedy_20_tokens(z: Path, hf, prompt) -> None:
    """20 greedy tokens after ``prompt`` (16 ids) from the container ``z`` with its KV cache
    are those of transformers' model ``hf`` (each step a forward pass over the whole
    sequence)."""
    import numpy as np

    from hf_parity import hf_logits
    from zipmoe_rt.engine.store import ZmoeSource
    from zipmoe_rt.models import build_model

    seq = list(prompt)
    for _ in range(20):
        seq.append(int(np.argmax(hf_logits(hf, seq)[-1])))
    src = ZmoeSource(z)
    try:
        net = build_model(src)
        cache = net.new_cache()
        logits = net.forward(prompt, cache)
        ours = []
        for _ in range(20):
            ours.append(int(np.argmax(logits)))
            logits = net.forward(np.array([ours[-1]]), cache)
    finally:
        src.close()
    assert ours == seq[16:]


def check_budgeted_run(case, policy: str, budget: str, delay) -> None:
    """A budgeted run of the test_engine Case ``case`` (LRU eviction) gives its reference
    logits and tokens bit for bit, every expert use a hit of some tier."""
    import test_engine as te

    run = te.budgeted_run(case, policy, budget, "lru", delay)
    te.assert_same_logits(run["logits"], case.ref_logits)
    assert run["tokens"] == case.ref_tokens
    assert sum(run["hits"].values()) == run["uses"] > 0


def check_plan_budget_is_loads(source, z, budget: str = "50%"):
    """``plan -m budget`` on checkpoint ``source`` divides the budget as
    ``load(z, memory_budget=budget)`` does: the same weight budget, dense bytes and largest
    expert. Returns the plan (:class:`zipmoe_rt.plan.SizePlan`)."""
    from zipmoe_rt.api import load
    from zipmoe_rt.plan import size_plan

    plan = size_plan(source, budget)
    m = load(z, memory_budget=budget, progress=False)
    try:
        assert plan.budget.budget == m.engine.budget
        assert plan.budget.dense == m.source.dense_bytes()
        assert plan.budget.expert_full == max(l.full_bytes for l in m.source.layouts.values())
    finally:
        m.close()
    return plan
