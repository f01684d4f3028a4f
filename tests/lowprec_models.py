"""Tiny low-precision checkpoints built at test time from the BF16 ones of :mod:`tiny_models`:
DeepSeek-V3 with FP8 E4M3 weights and per-block ``weight_scale_inv`` (quantised by transformers'
own ``Fp8Quantize`` op, as its FP8 quantizer saves them), and the F32 reference the same
weights give through transformers' ``Fp8Dequantize`` op (what transformers computes with when
it loads an FP8 checkpoint dequantised).

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
