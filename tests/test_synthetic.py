"""Tests of tools/make_synthetic_checkpoint.py: synthetic checkpoints of the registry's families
(Qwen1.5-MoE, Qwen3-MoE, Mixtral shapes) with weights resampled from the real SmolLM2 weights and
a router calibrated for skew and locality on the runtime's own forward pass.

A tiny Qwen2-MoE shape (hidden 128, 16 experts, top-4, 2 layers, SmolLM2 vocabulary) is built once
per module; transformers must load it without missing or unexpected keys, and its routing on text
the calibration never saw must show the requested skew and locality.
"""
from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest

TOOL = Path(__file__).resolve().parent.parent / "tools" / "make_synthetic_checkpoint.py"
SKEW = 0.15       # top-1 share target; uniform routing over 16 experts gives 1/16
LOCALITY = 0.55   # P(selected at t+1 | selected at t); uniform top-4 of 16 gives 0.25
SHARD_BYTES = 8_000_000


def _quiet(*args, **kwargs):
    pass


@pytest.fixture(scope="module")
def msc():
    spec = importlib.util.spec_from_file_location("make_synthetic_checkpoint", TOOL)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # dataclasses need the module registered
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def pools(msc, smollm2_gguf):
    return msc.RealPools(smollm2_gguf)


def _tiny_spec(msc, arch="qwen1.5-moe"):
    return msc.preset(arch, tiny=True, vocab_size=msc.SMOLLM_VOCAB)


@pytest.fixture(scope="module")
def tiny(msc, pools, tmp_path_factory):
    out = tmp_path_factory.mktemp("synthetic") / "tiny-qwen2moe"
    summary = msc.build(out, _tiny_spec(msc), skew=SKEW, locality=LOCALITY, seed=0,
                        shard_bytes=SHARD_BYTES, pools=pools, log=_quiet)
    return out, summary


def _heldout_ids(msc, tokenizer_json: Path, vocab: int, seqs: int = 12, length: int = 128):
    """Token ids of the held-out books (never used for calibration), or random Zipf ids."""
    from tokenizers import Tokenizer

    files = [msc.DEFAULT_CORPUS / b for b in msc.HELDOUT_BOOKS]
    if not all(f.is_file() for f in files):
        files = None
    ids, _ = msc.calibration_ids(Tokenizer.from_file(str(tokenizer_json)), seqs, length, vocab,
                                 seed=123, corpus=None, files=files)
    return ids


def _load(folder):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    model, info = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, output_loading_info=True)
    return torch, model.eval(), info


# --------------------------------------------------------------------------------------------

def test_files_index_and_shards(tiny, msc):
    from zipmoe_rt.convert.safetensors_io import Checkpoint

    folder, summary = tiny
    names = {p.name for p in folder.iterdir()}
    assert {"config.json", "generation_config.json", "model.safetensors.index.json",
            "tokenizer.json", "tokenizer_config.json", "synthetic.json"} <= names
    assert not any(n.startswith(".") for n in names)
    assert not list(folder.parent.glob(f".{folder.name}.tmp-*"))   # temporary folder renamed
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    ckpt = Checkpoint(folder)
    try:
        assert set(index["weight_map"]) == set(ckpt.tensors)
        total = sum(t.nbytes for t in ckpt)
        assert index["metadata"]["total_size"] == total == summary["total_bytes"]
        assert {t.dtype for t in ckpt} == {"BF16"}
        shards = sorted(set(index["weight_map"].values()))
        assert len(shards) == summary["shards"] > 1
        for s in shards:   # a shard stays under the limit unless it holds a single bigger tensor
            held = [n for n, f in index["weight_map"].items() if f == s]
            assert len(held) == 1 or sum(ckpt.tensors[n].nbytes for n in held) <= SHARD_BYTES
        spec = summary["spec"]
        assert ckpt.tensors["model.layers.1.mlp.experts.15.down_proj.weight"].shape == \
            (spec["hidden_size"], spec["moe_intermediate_size"]) == (128, 64)
        gate = ckpt.tensors["model.layers.0.mlp.shared_expert_gate.weight"]
        assert gate.shape == (1, spec["hidden_size"])
        assert ckpt.tensors["model.layers.0.self_attn.q_proj.bias"].shape == (spec["hidden_size"],)
        emb = ckpt.array("model.embed_tokens.weight")
        assert emb.shape == (msc.SMOLLM_VOCAB, spec["hidden_size"])
        assert np.isfinite(msc.bf16_to_f32(np.asarray(emb))).all()
    finally:
        ckpt.close()
    gen = json.loads((folder / "generation_config.json").read_text())
    cfg = json.loads((folder / "config.json").read_text())
    assert gen["eos_token_id"] == cfg["eos_token_id"] == 2       # SmolLM2 <|im_end|>
    assert "im_start" in json.loads((folder / "tokenizer_config.json").read_text())["chat_template"]


def test_converter_accepts_config(tiny):
    from zipmoe_rt.convert.converter import plan_conversion

    folder, summary = tiny
    arch, hp, ckpt, dense, experts = plan_conversion(folder)
    try:
        assert arch.name == "Qwen2MoeForCausalLM"
        assert hp["num_experts"] == 16 and hp["num_experts_per_tok"] == 4
        assert hp["moe_layers"] == [0, 1] and hp["norm_topk_prob"] is False
        assert hp["shared_expert_intermediate_size"] == 128
        assert summary["spec"]["shared_expert_intermediate_size"] == 128
        assert hp["attention_bias"] is True and hp["rope"]["rope_theta"] == 1e6
        assert len(experts) == 2 * 16
    finally:
        ckpt.close()


def test_exponent_entropy_is_realistic(tiny):
    _, summary = tiny
    ent = summary["exponent_entropy"]
    real = np.mean([ent["real_smollm2"][k] for k in ("gate", "up", "down")])
    assert 2.5 <= real <= 2.7
    experts = {k: v for k, v in ent["synthetic"].items() if ".expert" in k}
    assert len(experts) >= 6
    for k, v in experts.items():
        assert abs(v - real) < 0.1, (k, v, real)


def test_sampler_is_deterministic_and_draws_pool_values(msc, pools):
    a = pools.sample("gate", (64, 96), key=7, scale=1.0)
    assert np.array_equal(a, pools.sample("gate", (64, 96), key=7, scale=1.0))
    assert not np.array_equal(a, pools.sample("gate", (64, 96), key=8, scale=1.0))
    # BF16-exact pool: every drawn value must be one of the pool's values, unchanged
    from zipmoe_rt.convert.smollm2 import float32_to_bf16_bits

    pool = msc.bf16_to_f32(float32_to_bf16_bits(pools.pools["down"][:4096]))
    out = np.empty(20000, np.uint16)
    msc.pool_kernels()(pool, out, np.uint64(3), np.float32(1.0), np.zeros(1, np.float32))
    assert np.isin(out, float32_to_bf16_bits(pool)).all()
    assert len(np.unique(out)) > 1000


def test_loads_in_transformers_and_routes_with_skew_and_locality(tiny, msc):
    folder, summary = tiny
    torch, model, info = _load(folder)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    spec = summary["spec"]
    E, k = spec["num_experts"], spec["num_experts_per_tok"]
    ids = _heldout_ids(msc, folder / "tokenizer.json", spec["vocab_size"])
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_router_logits=True)
    assert torch.isfinite(out.logits).all()
    shares, repeats = [], []
    for rl in out.router_logits:
        st = msc.routing_stats(rl.float().numpy(), k, ids.shape[0])
        shares.append(st["top1_share"])
        repeats.append(st["repeat"])
        assert abs(st["top1_share"] - SKEW) < 0.05, st["top1_share"]
        assert st["repeat"] > k / E + 0.1, st["repeat"]
        ranked = st["share_by_rank"]
        assert ranked[0] > 1.5 / E and ranked[E // 2] < 1.0 / E   # skewed, not uniform
    assert abs(np.mean(shares) - SKEW) < 0.04
    assert abs(np.mean(repeats) - LOCALITY) < 0.1


def test_runtime_calibration_matches_transformers(tiny, msc):
    """The runtime's forward pass (which the router was fitted on, layer by layer) routes like
    transformers on the calibration tokens."""
    from tokenizers import Tokenizer

    folder, summary = tiny
    torch, model, _ = _load(folder)
    c, spec = summary["calibration"], summary["spec"]
    ids, _ = msc.calibration_ids(Tokenizer.from_file(str(folder / "tokenizer.json")), c["seqs"],
                                 c["len"], spec["vocab_size"], summary["seed"], msc.DEFAULT_CORPUS)
    with torch.no_grad():
        out = model(torch.from_numpy(ids), output_router_logits=True)
    for layer, rl in zip(summary["layers"], out.router_logits):
        k = spec["num_experts_per_tok"]
        counts = msc.routing_stats(rl.float().numpy(), k, c["seqs"])["counts"]
        diff = np.abs(counts - np.asarray(layer["calibration_counts"])).sum()
        assert diff <= 0.01 * counts.sum(), (layer["layer"], diff)


def test_proxy_simulation_hits_targets(msc):
    r = msc.simulate(experts=60, top_k=4, hidden=256, skew=0.08, locality=0.30, seed=0)
    held = r["heldout"]
    assert abs(held["top1_share"] - 0.08) < 0.02
    assert abs(held["repeat"] - 0.30) < 0.05
    assert held["share_by_rank"][0] > held["share_by_rank"][5] > held["share_by_rank"][30]


@pytest.mark.parametrize("arch,model_cls", [("qwen3-moe", "Qwen3MoeForCausalLM"),
                                            ("mixtral", "MixtralForCausalLM")])
def test_other_family_tiny_loads(msc, pools, tmp_path, arch, model_cls):
    """Every registry family's preset gives a checkpoint transformers loads without missing or
    unexpected keys, and the converter reads its config as the preset's hyper-parameters."""
    from zipmoe_rt.convert.converter import plan_conversion

    out = tmp_path / f"tiny-{arch}"
    summary = msc.build(out, _tiny_spec(msc, arch), skew=SKEW, locality=None, seed=1,
                        pools=pools, log=_quiet)
    torch, model, info = _load(out)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    assert type(model).__name__ == model_cls
    with torch.no_grad():
        logits = model(torch.arange(40).reshape(2, 20) * 97).logits
    assert torch.isfinite(logits).all()
    _, hp, ckpt, _, experts = plan_conversion(out)
    ckpt.close()
    assert hp == summary["spec"] and len(experts) == 2 * 16


def test_presets_are_registry_hparams(msc):
    """Presets are their family's typed hparams (transformers defaults + the released model's
    values); --tiny and the CLI overrides (None = not given) apply on top, fixed fields stay."""
    q = msc.preset("qwen1.5-moe")
    assert type(q).__name__ == "Qwen2MoeHParams" and q.architecture == "Qwen2MoeForCausalLM"
    assert (q.hidden_size, q.num_experts, q.num_experts_per_tok, q.moe_intermediate_size,
            q.shared_expert_intermediate_size, q.num_hidden_layers) == (2048, 60, 4, 1408, 5632, 24)
    assert q.rope["rope_theta"] == 1e6 and q.attention_bias is True and q.norm_topk_prob is False
    t = msc.preset("mixtral", tiny=True, num_hidden_layers=None, hidden_size=None)
    assert (t.hidden_size, t.num_hidden_layers, t.head_dim, t.num_experts) == (128, 2, 32, 16)
    assert t.shared_expert_intermediate_size == 0 and t.intermediate_size == 64
    q3 = msc.preset("qwen3-moe", num_hidden_layers=6)
    assert (q3.num_hidden_layers, q3.head_dim, q3.num_experts, q3.qk_norm) == (6, 128, 128, True)
    assert msc.preset("qwen3-moe", num_attention_heads=16).head_dim == 128   # 2048 / 16


def test_cli_rejects_bad_knobs_and_documents_them(msc, tmp_path, capsys):
    out = tmp_path / "never"
    assert msc.main([str(out), "--tiny", "--skew", "0.5"]) == 1   # > 1/top_k
    assert not out.exists()
    with pytest.raises(SystemExit) as e:
        msc.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for knob in ("--skew", "--locality", "--seed", "--layers", "--vocab", "--zipf"):
        assert knob in text


def test_default_skew_fits_every_shape(msc):
    """Without --skew the preset's value is used where it is valid for the shape, else the middle
    of (1/experts, 1/top_k]: --tiny builds for every preset need no --skew."""
    assert msc.default_skew("qwen1.5-moe", 60, 4) == 0.08          # the released shape
    assert msc.default_skew("qwen3-moe", 128, 8) == 0.04
    assert msc.default_skew("qwen3-moe", 16, 4) == pytest.approx((1 / 16 + 1 / 4) / 2, abs=1e-4)
    assert msc.default_skew("qwen1.5-moe", 8, 4) == pytest.approx((1 / 8 + 1 / 4) / 2, abs=1e-4)
    for arch in msc.PRESETS:
        hp = msc.preset(arch, tiny=True)
        s = msc.default_skew(arch, hp.num_experts, hp.num_experts_per_tok)
        assert 1 / hp.num_experts < s <= 1 / hp.num_experts_per_tok


def test_cli_tiny_needs_no_skew(msc, smollm2_gguf, tmp_path, capsys):
    """`--tiny` alone builds (qwen3-moe's preset skew 0.04 is below 1/16 for the tiny shape) and
    the router meets the default target."""
    out = tmp_path / "tiny-q3"
    assert msc.main([str(out), "--tiny", "--arch", "qwen3-moe", "--gguf", str(smollm2_gguf),
                     "--calib-seqs", "4", "-q"]) == 0
    summary = json.loads((out / "synthetic.json").read_text())
    assert summary["knobs"]["skew"] == pytest.approx(0.1562, abs=1e-4)
    assert abs(summary["mean_top1_share"] - 0.1562) < 0.05
    assert "wrote" in capsys.readouterr().out


def test_reduced_gguf_keeps_metadata_and_real_values(msc, smollm2_gguf, tmp_path):
    """tools/make_synthetic_checkpoint_gguf.py: the reduced file keeps every metadata field (the
    tokenizer encodes alike), the blocks of every 3rd layer byte for byte, 8192 embedding rows;
    the generator's pools load from it."""
    import gguf

    spec = importlib.util.spec_from_file_location(
        "make_synthetic_checkpoint_gguf", TOOL.with_name("make_synthetic_checkpoint_gguf.py"))
    red = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(red)
    dest = tmp_path / "reduced.gguf"
    info = red.reduce_gguf(smollm2_gguf, dest, every=3, embed_rows=8192)
    assert info["layers"] == list(range(0, 30, 3)) and info["embed_rows"] == 8192
    assert info["bytes"] < 40e6
    full, small = gguf.GGUFReader(smollm2_gguf), gguf.GGUFReader(dest)
    names = lambda r: {f for f in r.fields if not f.startswith("GGUF.")}  # noqa: E731
    assert names(full) == names(small)
    ft = {t.name: t for t in full.tensors}
    st = {t.name: t for t in small.tensors}
    assert set(st) == {n for n in ft if not n.startswith("blk.") or int(n.split(".")[1]) % 3 == 0}
    for n in ("blk.27.ffn_down.weight", "blk.0.attn_q.weight", "output_norm.weight"):
        assert st[n].tensor_type == ft[n].tensor_type
        assert np.array_equal(np.asarray(st[n].data), np.asarray(ft[n].data))
    emb_full = np.asarray(ft["token_embd.weight"].data)
    emb = np.asarray(st["token_embd.weight"].data)
    assert emb.shape == (8192, emb_full.shape[1])
    rows = {r.tobytes() for r in emb_full}
    assert all(r.tobytes() in rows for r in emb[:50])
    from zipmoe_rt.convert.smollm2 import build_tokenizer
    text = "It is a truth universally acknowledged"
    assert (build_tokenizer(small).encode(text).ids == build_tokenizer(full).encode(text).ids)
    pools = msc.RealPools(dest)
    assert pools.pools["down"].size > 1_000_000 and np.isfinite(pools.pools["embed"]).all()
    assert red.main([str(tmp_path / "x.gguf"), "--source", str(tmp_path / "missing.gguf")]) == 1
