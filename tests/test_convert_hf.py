"""Real transformers checkpoints -> .zmoe -> HF folder, bit for bit.

Every tiny random model of tests/tiny_models.py (each family) is saved by transformers' own
``save_pretrained`` in BF16 (via the ``tiny_moe_dir`` fixture), single-file and sharded; source
and exported tensors are read with the ``safetensors`` package, not with zipmoe-rt's reader.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")
safetensors = pytest.importorskip("safetensors")
from safetensors import safe_open  # noqa: E402

import zmoe  # noqa: E402
from tiny_models import SPECS  # noqa: E402
from zipmoe_rt.convert.converter import convert  # noqa: E402
from zipmoe_rt.convert.export import export  # noqa: E402

#: hand-checked expectations per tests/tiny_models.py, name -> (family, num_experts, moe layers,
#: per-expert tensor suffixes); every spec is also checked against its registry entry's specs.
MODELS = {
    "mixtral": ("mixtral", 4, [0, 1, 2], ("w1", "w3", "w2")),
    "qwen2_moe": ("qwen2_moe", 8, [0, 2], ("gate_proj", "up_proj", "down_proj")),
    "qwen3_moe": ("qwen3_moe", 8, [0, 1, 2], ("gate_proj", "up_proj", "down_proj")),
    # tied embeddings (no lm_head.weight saved) + sliding window; MoE only every 2nd layer
    "mixtral_tied_swa": ("mixtral", 4, [0, 1, 2], ("w1", "w3", "w2")),
    "qwen2_moe_step2": ("qwen2_moe", 4, [1], ("gate_proj", "up_proj", "down_proj")),
    # Granite: the Hub stacks the experts per layer; each expert block holds its slices
    "granitemoe": ("granitemoe", 8, [0, 1, 2], ("input_linear", "output_linear")),
    # ERNIE 4.5: dense layer 0, sparse 1 and 2; the interval spec: sparse 1 and 3 only
    "ernie4_5_moe": ("ernie4_5_moe", 8, [1, 2], ("gate_proj", "up_proj", "down_proj")),
    "ernie4_5_moe_interval": ("ernie4_5_moe", 4, [1, 3], ("gate_proj", "up_proj", "down_proj")),
}
#: every tiny spec, single-file and sharded
CASES = [(n, s) for n in SPECS for s in (False, True)]


def expected_experts(folder: Path) -> dict:
    """{(layer, expert): sorted tensor names} of the Hub-layout expert tensors the family's
    registry entry lists for the checkpoint's config.json (a stacked tensor under every
    expert)."""
    from zipmoe_rt.families import HUB, get_architecture

    arch = get_architecture(json.loads((folder / "config.json").read_text()))
    hp = arch.typed_hparams()
    out: dict = {}
    for spec in arch.tensor_specs(hp, HUB):
        for e in range(hp.num_experts) if spec.stacked else [spec.expert]:
            if spec.is_expert:
                out.setdefault((spec.layer, e), []).append(spec.name)
    return {k: sorted(v) for k, v in out.items()}


def load_tensors(folder: Path) -> dict:
    """{name: (torch dtype, shape, bytes)} of every tensor of an HF folder, via safetensors."""
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        files = sorted(set(wm.values()))
    else:
        wm, files = None, ["model.safetensors"]
    out = {}
    for fname in files:
        with safe_open(str(folder / fname), framework="pt") as f:
            for k in f.keys():
                if wm is not None:
                    assert wm[k] == fname
                t = f.get_tensor(k)
                b = t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
                assert k not in out
                out[k] = (t.dtype, tuple(t.shape), b)
    if wm is not None:
        assert set(out) == set(wm)
    return out


@pytest.mark.parametrize("name,sharded", CASES,
                         ids=[f"{n}-{'sharded' if s else 'single'}" for n, s in CASES])
def test_hf_roundtrip_bit_exact(tiny_moe_dir, tmp_path, name, sharded):
    src_dir = tiny_moe_dir(name, sharded=sharded)
    assert (src_dir / "model.safetensors.index.json").exists() == sharded
    src = load_tensors(src_dir)
    # BF16, except the F32 router correction bias of DeepSeek-V3 / GLM-4-MoE / ERNIE 4.5 specs
    assert all(dt == (torch.float32 if n.endswith(("e_score_correction_bias", "expert_bias"))
                      else torch.bfloat16)
               for n, (dt, _, _) in src.items())

    out = convert(src_dir, tmp_path / f"{name}.zmoe", chunks=3, progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"{name}.zmoe"]

    experts = expected_experts(src_dir)
    moe_layers = sorted({layer for layer, _ in experts})
    if name in MODELS:
        family, n_exp, layers, suffixes = MODELS[name]
        assert family == SPECS[name][0]
        assert moe_layers == layers and len(experts) == len(layers) * n_exp
        assert all(sorted(t.rsplit(".", 2)[-2] for t in names) == sorted(suffixes)
                   for names in experts.values())
    with zmoe.ZmoeReader(out) as r:
        r.verify()
        assert r.metadata["general.family"] == SPECS[name][0]
        assert r.metadata["hparams.moe_layers"] == moe_layers
        assert sorted(r.experts) == sorted(experts)
        for (l, e), blk in r.experts.items():
            assert blk["sm"][0] % 4096 == 0 and blk["exp"][0] % 4096 == 0
            assert sorted(blk["tensors"]) == experts[(l, e)] and len(blk["tensors"]) in (2, 3, 4)
            assert all(f".experts.{e}." in t or r.tensors[t]["expert"].get("stacked")
                       for t in blk["tensors"])   # stacked: Granite, Gemma 4, gpt-oss (4: biases)
        routed = {n for names in experts.values() for n in names}
        for t in r.tensors.values():
            if t["name"] not in routed:
                assert "expert" not in t and t["encoding"] == "raw", t["name"]
            else:
                assert t["encoding"] == "bitplane" and t["dtype"] == "BF16", t["name"]
        assert set(r.tensors) == set(src)

    for shard_bytes, tag in ((None, "one"), (150_000, "many")):
        exp_dir = tmp_path / f"export_{tag}"
        kw = {} if shard_bytes is None else {"max_shard_bytes": shard_bytes}
        export(out, exp_dir, progress=False, **kw)
        assert (exp_dir / "model.safetensors.index.json").exists() == (shard_bytes is not None)
        got = load_tensors(exp_dir)
        assert set(got) == set(src)
        for k, (dt, shape, b) in src.items():
            assert got[k][0] == dt and got[k][1] == shape, k
            assert got[k][2] == b, k
        assert json.loads((exp_dir / "config.json").read_text()) == json.loads(
            (src_dir / "config.json").read_text())


def test_exported_folder_loads_in_transformers(tiny_moe_dir, tmp_path):
    """The exported folder is a working HF checkpoint with the same parameters."""
    import transformers

    src_dir = tiny_moe_dir("mixtral", sharded=True)
    out = convert(src_dir, tmp_path / "m.zmoe", progress=False)
    exp_dir = export(out, tmp_path / "exported", max_shard_bytes=100_000, progress=False)
    a = transformers.AutoModelForCausalLM.from_pretrained(src_dir, dtype=torch.bfloat16)
    b = transformers.AutoModelForCausalLM.from_pretrained(exp_dir, dtype=torch.bfloat16)
    sa, sb = a.state_dict(), b.state_dict()
    assert set(sa) == set(sb) and len(sa) > 20
    for k in sa:
        assert torch.equal(sa[k].view(torch.int16), sb[k].view(torch.int16)), k
