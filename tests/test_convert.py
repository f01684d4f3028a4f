"""HF checkpoint folder -> .zmoe -> HF folder, without torch.

Checkpoints are built here with numpy and ``write_safetensors``; the exported safetensors are
parsed by an independent minimal reader (8-byte header length, JSON header, data), so the round
trip is checked byte for byte against what was written, not against the converter's own reader.
"""
from __future__ import annotations

import hashlib
import json
import re
import struct
from pathlib import Path

import numpy as np
import pytest

import zmoe
from zipmoe_rt.convert import converter as converter_mod
from zipmoe_rt.convert.converter import ConversionError, convert
from zipmoe_rt.convert.export import export, summarize
from zipmoe_rt.convert.safetensors_io import write_safetensors

WORD = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "I64": np.int64}
SPECIALS = {
    "BF16": [0x8000, 0x0000, 0x7F80, 0xFF80, 0x7FC0, 0xFFC1, 0x7F81, 0x0001, 0x807F],
    "F16": [0x8000, 0x0000, 0x7C00, 0xFC00, 0x7E00, 0xFE01, 0x7C01, 0x0001, 0x83FF],
    "F32": [0x80000000, 0, 0x7F800000, 0xFF800000, 0x7FC00000, 0xFFC12345, 0x7F800001, 1],
}


# ---------------------------------------------------------------------------------------------
# independent safetensors parsing
# ---------------------------------------------------------------------------------------------
def st_read(path: Path) -> dict:
    """{name: (dtype, shape, bytes)} in header order."""
    b = path.read_bytes()
    n, = struct.unpack_from("<Q", b, 0)
    header = json.loads(b[8:8 + n])
    header.pop("__metadata__", None)
    base = 8 + n
    return {k: (v["dtype"], list(v["shape"]), b[base + v["data_offsets"][0]:base + v["data_offsets"][1]])
            for k, v in header.items()}


def folder_tensors(folder: Path) -> dict:
    """All tensors of an HF folder, in checkpoint order (shard by shard, header order)."""
    idx = folder / "model.safetensors.index.json"
    if idx.exists():
        wm = json.loads(idx.read_text())["weight_map"]
        out = {}
        for shard in sorted(set(wm.values())):
            t = st_read(folder / shard)
            assert {k for k, v in wm.items() if v == shard} == set(t)
            out.update(t)
        assert set(out) == set(wm)
        return out
    files = sorted(folder.glob("*.safetensors"))
    assert [f.name for f in files] == ["model.safetensors"]
    return st_read(files[0])


# ---------------------------------------------------------------------------------------------
# checkpoint builders
# ---------------------------------------------------------------------------------------------
def bits(rng, dtype, shape, mode="random"):
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "I64":
        return rng.integers(-2**40, 2**40, n).astype(np.int64).reshape(shape)
    if mode == "normal":
        v = (rng.standard_normal(n) * 0.02).astype(np.float32)
        if dtype == "BF16":
            return (v.view(np.uint32) >> 16).astype(np.uint16).reshape(shape)
        return v.astype(np.float16 if dtype == "F16" else np.float32).view(WORD[dtype]).reshape(shape)
    hi = 1 << (16 if WORD[dtype] == np.uint16 else 32)
    w = rng.integers(0, hi, n, dtype=np.uint64).astype(WORD[dtype])
    sp = SPECIALS[dtype][:n]
    w[:len(sp)] = sp
    return w.reshape(shape)


def _add_attention(add, p, H, heads, kv, hd, qk_norm=False):
    """``add`` (name, shape) the input norm and attention projections of layer prefix ``p``,
    in HF order, with the q/k norms when ``qk_norm``."""
    add(f"{p}.input_layernorm.weight", (H,))
    add(f"{p}.self_attn.q_proj.weight", (heads * hd, H))
    add(f"{p}.self_attn.k_proj.weight", (kv * hd, H))
    add(f"{p}.self_attn.v_proj.weight", (kv * hd, H))
    add(f"{p}.self_attn.o_proj.weight", (H, heads * hd))
    if qk_norm:
        add(f"{p}.self_attn.q_norm.weight", (hd,))
        add(f"{p}.self_attn.k_norm.weight", (hd,))


def mixtral(H=16, I=24, L=2, E=4, V=64, dtype="BF16", mode="random", seed=0, extra_dense=True):
    """(config, [(name, dtype, shape, array)]) in HF order."""
    rng = np.random.default_rng(seed)
    heads, kv, hd = 4, 2, H // 4
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": V,
           "hidden_size": H, "intermediate_size": I, "num_hidden_layers": L,
           "num_attention_heads": heads, "num_key_value_heads": kv, "num_local_experts": E,
           "num_experts_per_tok": 2, "rms_norm_eps": 1e-5, "rope_theta": 1e6,
           "max_position_embeddings": 256, "tie_word_embeddings": False, "hidden_act": "silu",
           "torch_dtype": {"BF16": "bfloat16", "F16": "float16", "F32": "float32"}[dtype],
           "bos_token_id": 1, "eos_token_id": 2}
    T = []

    def add(name, shape, dt=dtype, m=mode):
        T.append((name, dt, tuple(shape), bits(rng, dt, shape, m)))
    add("model.embed_tokens.weight", (V, H))
    for l in range(L):
        p = f"model.layers.{l}"
        _add_attention(add, p, H, heads, kv, hd)
        add(f"{p}.post_attention_layernorm.weight", (H,))
        add(f"{p}.block_sparse_moe.gate.weight", (E, H))
        for e in range(E):
            q = f"{p}.block_sparse_moe.experts.{e}"
            add(f"{q}.w1.weight", (I, H))
            add(f"{q}.w2.weight", (H, I))
            add(f"{q}.w3.weight", (I, H))
    add("model.norm.weight", (H,))
    add("lm_head.weight", (V, H))
    if extra_dense:  # non-floating and other-dtype dense tensors stay raw and exact
        add("model.rotary_emb.position_ids", (1, 8), "I64")
        if dtype != "F32":
            add("model.layers.0.block_sparse_moe.router_bias_f32", (E,), "F32")
    return cfg, T


def qwen3_fused(H=16, I=12, L=2, E=4, V=64, seed=1, mlp_only_layers=()):
    """Qwen3-MoE with transformers-5 fused experts: gate_up_proj [E, 2I, H], down_proj [E, H, I]."""
    rng = np.random.default_rng(seed)
    heads, kv, hd = 4, 2, 8
    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe", "vocab_size": V,
           "hidden_size": H, "intermediate_size": 20, "moe_intermediate_size": I,
           "num_hidden_layers": L, "num_attention_heads": heads, "num_key_value_heads": kv,
           "head_dim": hd, "num_experts": E, "num_experts_per_tok": 2, "decoder_sparse_step": 1,
           "mlp_only_layers": list(mlp_only_layers), "norm_topk_prob": True, "rms_norm_eps": 1e-6,
           "rope_theta": 1e6, "max_position_embeddings": 256, "tie_word_embeddings": False,
           "hidden_act": "silu", "attention_bias": False, "torch_dtype": "bfloat16",
           "eos_token_id": 3}
    T = []

    def add(name, shape, dt="BF16"):
        T.append((name, dt, tuple(shape), bits(rng, dt, shape)))
    add("model.embed_tokens.weight", (V, H))
    for l in range(L):
        p = f"model.layers.{l}"
        _add_attention(add, p, H, heads, kv, hd, qk_norm=True)
        add(f"{p}.post_attention_layernorm.weight", (H,))
        if l in mlp_only_layers:
            add(f"{p}.mlp.gate_proj.weight", (20, H))
            add(f"{p}.mlp.up_proj.weight", (20, H))
            add(f"{p}.mlp.down_proj.weight", (H, 20))
        else:
            add(f"{p}.mlp.gate.weight", (E, H))
            add(f"{p}.mlp.experts.gate_up_proj", (E, 2 * I, H))
            add(f"{p}.mlp.experts.down_proj", (E, H, I))
    add("model.norm.weight", (H,))
    add("lm_head.weight", (V, H))
    return cfg, T


def write_folder(folder: Path, cfg, T, shards: int = 1, side_files: bool = True) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    if shards == 1:
        write_safetensors(folder / "model.safetensors", {n: (d, s, a) for n, d, s, a in T},
                          metadata={"format": "pt"})
    else:
        per = -(-len(T) // shards)
        wm = {}
        for i in range(shards):
            fname = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            part = T[i * per:(i + 1) * per]
            write_safetensors(folder / fname, {n: (d, s, a) for n, d, s, a in part},
                              metadata={"format": "pt"})
            wm.update({n: fname for n, *_ in part})
        total = sum(a.nbytes for *_, a in T)
        (folder / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": wm}, indent=2))
    if side_files:
        (folder / "tokenizer_config.json").write_text(json.dumps(
            {"eos_token": "</s>", "model_max_length": 256, "chat_template": "{{ messages }}"}))
        (folder / "generation_config.json").write_text(json.dumps(
            {"eos_token_id": [2, 5], "temperature": 0.7}))
    return folder


def expected(T) -> dict:
    return {n: (d, list(s), np.ascontiguousarray(a).tobytes()) for n, d, s, a in T}


def leftovers(d: Path, keep=()):
    return sorted(p.name for p in d.iterdir() if p.name not in keep)


def roundtrip(tmp_path, folder, **kw) -> tuple[Path, dict]:
    out = tmp_path / "out" / "model.zmoe"
    assert convert(folder, out, progress=False, **kw) == out
    assert leftovers(out.parent) == ["model.zmoe"]  # no temp file left next to it
    exp_dir = tmp_path / "exported"
    export(out, exp_dir, progress=False)
    return out, folder_tensors(exp_dir)


# ---------------------------------------------------------------------------------------------
# round trips
# ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("exp_codec", ["huffman", "zstd"])
@pytest.mark.parametrize("shards", [1, 3])
def test_mixtral_roundtrip_bit_exact(tmp_path, shards, exp_codec):
    cfg, T = mixtral()
    folder = write_folder(tmp_path / "mixtral", cfg, T, shards=shards)
    out, got = roundtrip(tmp_path, folder, exp_codec=exp_codec)
    want = expected(T)
    assert set(got) == set(want)
    for name, (d, s, b) in want.items():
        assert got[name][0] == d and got[name][1] == s, name
        assert got[name][2] == b, name
    with zmoe.ZmoeReader(out) as r:
        r.verify()
        assert len(r.experts) == 2 * 4
        recs = r.tensors
        for l in range(2):
            for e in range(4):
                for w, role in (("w1", "gate"), ("w3", "up"), ("w2", "down")):
                    rec = recs[f"model.layers.{l}.block_sparse_moe.experts.{e}.{w}.weight"]
                    assert rec["expert"] == {"layer": l, "expert": e, "role": role}
                    assert rec["encoding"] == "bitplane" and rec["dtype"] == "BF16"
                    assert rec["exp_codec"] == exp_codec
        assert recs["model.embed_tokens.weight"]["encoding"] == "raw"
        assert "exp_codec" not in recs["model.embed_tokens.weight"]
        assert "expert" not in recs["model.layers.0.block_sparse_moe.gate.weight"]


@pytest.mark.parametrize("shards", [1, 3])
def test_record_and_export_order_is_source_order(tmp_path, shards):
    """SPEC §2: tensor records appear in the source checkpoint's order; export keeps it."""
    cfg, T = mixtral(L=1, E=2, extra_dense=False)
    folder = write_folder(tmp_path / "m", cfg, T, shards=shards)
    out, got = roundtrip(tmp_path, folder)
    src_order = list(folder_tensors(folder))
    with zmoe.ZmoeReader(out) as r:
        assert list(r.tensors) == src_order
    assert list(got) == src_order


def test_sharded_export(tmp_path):
    cfg, T = mixtral(L=1)
    folder = write_folder(tmp_path / "m", cfg, T)
    out = convert(folder, tmp_path / "m.zmoe", progress=False)
    exp_dir = export(out, tmp_path / "exp", max_shard_bytes=2000, progress=False)
    idx = json.loads((exp_dir / "model.safetensors.index.json").read_text())
    assert len(set(idx["weight_map"].values())) > 2
    assert idx["metadata"]["total_size"] == sum(a.nbytes for *_, a in T)
    got = folder_tensors(exp_dir)
    assert {k: v for k, v in got.items()} == expected(T)


def test_export_side_files(tmp_path):
    cfg, T = mixtral(L=1, E=2)
    folder = write_folder(tmp_path / "m", cfg, T)
    out, _ = roundtrip(tmp_path, folder)
    exp = tmp_path / "exported"
    assert json.loads((exp / "config.json").read_text()) == cfg
    assert json.loads((exp / "generation_config.json").read_text()) == {"eos_token_id": [2, 5],
                                                                         "temperature": 0.7}
    assert json.loads((exp / "tokenizer_config.json").read_text()) == json.loads(
        (folder / "tokenizer_config.json").read_text())


def test_export_refuses_non_empty_dir(tmp_path):
    cfg, T = mixtral(L=1, E=2)
    out = convert(write_folder(tmp_path / "m", cfg, T), tmp_path / "m.zmoe", progress=False)
    d = tmp_path / "full"
    d.mkdir()
    (d / "keep.txt").write_text("x")
    with pytest.raises(FileExistsError):
        export(out, d, progress=False)
    assert leftovers(d) == ["keep.txt"]


@pytest.mark.parametrize("exp_codec", [None, "huffman", "zstd"])
def test_metadata(tmp_path, exp_codec):
    cfg, T = mixtral(L=2, E=4)
    folder = write_folder(tmp_path / "mix-tiny", cfg, T)
    kw = {} if exp_codec is None else {"exp_codec": exp_codec}
    out = convert(folder, tmp_path / "m.zmoe", chunks=3, progress=False, **kw)
    with zmoe.ZmoeReader(out) as r:
        m, ty = r.metadata, r.metadata_types
    assert m["general.architecture"] == "MixtralForCausalLM" and ty["general.architecture"] == "str"
    assert m["general.family"] == "mixtral"
    assert m["general.name"] == "mix-tiny"
    assert m["hf.config"] == cfg and ty["hf.config"] == "json"
    hp = {k[len("hparams."):]: v for k, v in m.items() if k.startswith("hparams.")}
    assert hp["vocab_size"] == 64 and hp["hidden_size"] == 16 and hp["num_hidden_layers"] == 2
    assert hp["num_attention_heads"] == 4 and hp["num_key_value_heads"] == 2 and hp["head_dim"] == 4
    assert hp["num_experts"] == 4 and hp["num_experts_per_tok"] == 2
    assert hp["moe_intermediate_size"] == 24 and hp["shared_expert_intermediate_size"] == 0
    assert hp["moe_layers"] == [0, 1] and ty["hparams.moe_layers"] == "int[]"
    assert hp["rope"]["rope_theta"] == 1e6 and ty["hparams.rope"] == "json"
    assert hp["sliding_window"] == 0 and hp["tie_word_embeddings"] is False
    assert m["encoding.chunks"] == 3 and ty["encoding.chunks"] == "int"
    codec = exp_codec or "huffman"   # the default (SPEC §5.2)
    assert m["encoding.exp_codec"] == codec and ty["encoding.exp_codec"] == "str"
    if codec == "zstd":   # the zstd parameters used (SPEC §3, §5.2)
        assert m["encoding.zstd"]["min_match"] == 7 and m["encoding.zstd"]["hash_log"] == 6
        assert m["encoding.zstd"]["target_length"] == 0 and ty["encoding.zstd"] == "json"
    else:
        assert "encoding.zstd" not in m
    assert m["generation.eos_token_ids"] == [2, 5] and ty["generation.eos_token_ids"] == "int[]"
    assert m["generation.config"] == {"eos_token_id": [2, 5], "temperature": 0.7}
    assert m["tokenizer.chat_template"] == "{{ messages }}"
    assert m["tokenizer.config"] == {"eos_token": "</s>", "model_max_length": 256}
    files = {f["name"]: f for f in m["provenance.files"]}
    st = folder / "model.safetensors"
    assert files["model.safetensors"]["size"] == st.stat().st_size
    assert files["model.safetensors"]["sha256"] == hashlib.sha256(st.read_bytes()).hexdigest()
    assert "config.json" in files
    assert m["provenance.converter"].startswith("zipmoe-rt ")


def test_generation_config_absent(tmp_path):
    cfg, T = mixtral(L=1, E=2)
    folder = write_folder(tmp_path / "m", cfg, T, side_files=False)
    out = convert(folder, tmp_path / "m.zmoe", progress=False)
    with zmoe.ZmoeReader(out) as r:
        assert r.metadata["generation.config"] == {}
        assert r.metadata["generation.eos_token_ids"] == [2]  # from config.json


@pytest.mark.parametrize("dtype", ["F16", "F32"])
def test_float_sources_not_downcast(tmp_path, dtype):
    cfg, T = mixtral(L=1, E=3, dtype=dtype)
    folder = write_folder(tmp_path / dtype, cfg, T)
    out, got = roundtrip(tmp_path, folder)
    assert got == expected(T)
    assert {v[0] for v in got.values()} == {dtype, "I64", "F32"}  # F32 router bias too
    with zmoe.ZmoeReader(out) as r:
        rec = r.tensors["model.layers.0.block_sparse_moe.experts.2.w2.weight"]
        assert rec["dtype"] == dtype and rec["encoding"] == "bitplane"
        arr = r.read_tensor("model.layers.0.block_sparse_moe.experts.2.w2.weight")
        assert arr.dtype == (np.float16 if dtype == "F16" else np.float32)
        sm_bytes = rec["parts"][0]["sm"][1]
        assert sm_bytes == arr.size * (2 if dtype == "F16" else 3)


def test_qwen3_fused_experts(tmp_path):
    cfg, T = qwen3_fused()
    folder = write_folder(tmp_path / "q3", cfg, T, shards=2)
    out, got = roundtrip(tmp_path, folder)
    assert got == expected(T)
    src = {n: a for n, _, _, a in T}
    with zmoe.ZmoeReader(out) as r:
        assert r.metadata["general.family"] == "qwen3_moe"
        assert r.metadata["hparams.qk_norm"] is True
        for l in range(2):
            gu = r.tensors[f"model.layers.{l}.mlp.experts.gate_up_proj"]
            dn = r.tensors[f"model.layers.{l}.mlp.experts.down_proj"]
            assert gu["expert"] == {"layer": l, "role": "gate_up", "stacked": True}
            assert dn["expert"] == {"layer": l, "role": "down", "stacked": True}
            assert len(gu["parts"]) == len(dn["parts"]) == 4
            for e in range(4):
                blk = r.experts[(l, e)]
                assert blk["sm"][0] % 4096 == 0 and blk["exp"][0] % 4096 == 0
                ex = r.expert_tensors(l, e)
                assert set(ex) == {f"model.layers.{l}.mlp.experts.gate_up_proj",
                                   f"model.layers.{l}.mlp.experts.down_proj"}
                for name, a in ex.items():
                    assert a.shape == src[name].shape[1:]
                    assert a.tobytes() == src[name][e].tobytes()


def test_qwen3_dense_mlp_layer(tmp_path):
    cfg, T = qwen3_fused(L=3, mlp_only_layers=(1,))
    folder = write_folder(tmp_path / "q3", cfg, T)
    out, got = roundtrip(tmp_path, folder)
    assert got == expected(T)
    with zmoe.ZmoeReader(out) as r:
        assert r.metadata["hparams.moe_layers"] == [0, 2]
        assert sorted(r.experts) == [(l, e) for l in (0, 2) for e in range(4)]
        assert "expert" not in r.tensors["model.layers.1.mlp.gate_proj.weight"]


@pytest.mark.parametrize("chunks,exp_codec", [(1, "huffman"), (7, "huffman"), (7, "zstd")])
def test_chunks_option(tmp_path, chunks, exp_codec):
    # one expert tensor of 7 * 65536 exponents, so K = 7 really yields 7 chunks (SPEC §5.2)
    cfg, T = mixtral(H=256, I=1792, L=1, E=2, V=8, mode="normal", extra_dense=False)
    folder = write_folder(tmp_path / "big", cfg, T)
    out, got = roundtrip(tmp_path, folder, chunks=chunks, exp_codec=exp_codec)
    assert got == expected(T)
    with zmoe.ZmoeReader(out) as r:
        assert r.metadata["encoding.chunks"] == chunks
        for e in range(2):
            for w in ("w1", "w2", "w3"):
                rec = r.tensors[f"model.layers.0.block_sparse_moe.experts.{e}.{w}.weight"]
                assert rec["exp_codec"] == exp_codec
                sizes = [c[2] for c in rec["parts"][0]["exp"]]
                assert len(sizes) == chunks and sum(sizes) == 256 * 1792
                if chunks == 7:
                    assert sizes == [65536] * 7
                # normal weights: the exponents take ~2.6 bits, under 3.2 with any codec
                stored = sum(c[1] for c in rec["parts"][0]["exp"])
                assert 8 * stored / (256 * 1792) < 3.2


@pytest.mark.parametrize("exp_codec", ["huffman", "zstd"])
def test_dense_bitplane(tmp_path, exp_codec):
    cfg, T = mixtral(L=1, E=2)
    folder = write_folder(tmp_path / "m", cfg, T)
    out, got = roundtrip(tmp_path, folder, dense_encoding="bitplane", exp_codec=exp_codec)
    assert got == expected(T)
    with zmoe.ZmoeReader(out) as r:
        assert r.tensors["model.embed_tokens.weight"]["encoding"] == "bitplane"
        assert r.tensors["model.embed_tokens.weight"]["exp_codec"] == exp_codec
        assert r.tensors["model.layers.0.block_sparse_moe.router_bias_f32"]["encoding"] == "bitplane"
        assert r.tensors["model.rotary_emb.position_ids"]["encoding"] == "raw"


def test_convert_without_verify(tmp_path):
    cfg, T = mixtral(L=1, E=2)
    folder = write_folder(tmp_path / "m", cfg, T)
    out, got = roundtrip(tmp_path, folder, verify=False)
    assert got == expected(T)


def test_convert_overwrites_existing_output(tmp_path):
    cfg, T = mixtral(L=1, E=2)
    folder = write_folder(tmp_path / "m", cfg, T)
    out = tmp_path / "m.zmoe"
    out.write_bytes(b"old")
    convert(folder, out, progress=False)
    with zmoe.ZmoeReader(out) as r:
        r.verify()


def test_summarize_bits_per_weight(tmp_path):
    cfg, T = mixtral(H=64, I=128, L=1, E=4, V=64, mode="normal", extra_dense=False)
    folder = write_folder(tmp_path / "m", cfg, T)
    out = convert(folder, tmp_path / "m.zmoe", progress=False)
    text = summarize(out)
    totals = dict(re.findall(r"^\s*(expert|dense)\s+[\d,]+ weights.*?([\d.]+) bits/weight", text, re.M))
    assert set(totals) == {"expert", "dense"}, text
    assert 8.0 < float(totals["expert"]) < 11.0, text
    assert totals["dense"] == "16.00", text
    # per-tensor rows carry bits/w too
    row = next(l for l in text.splitlines() if "experts.3.w2.weight" in l)
    assert 8.0 < float(row.split()[-1]) < 11.0
    row = next(l for l in text.splitlines() if l.strip().startswith("model.embed_tokens.weight"))
    assert row.split()[-1] == "16.00"
    assert "MixtralForCausalLM" in text


# ---------------------------------------------------------------------------------------------
# errors: ConversionError naming the culprit, nothing left behind
# ---------------------------------------------------------------------------------------------
def _write_raw_safetensors(path: Path, header: dict, data: bytes):
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def case_unsupported_arch(root):
    cfg, T = mixtral(L=1, E=2)
    cfg["architectures"] = ["LlamaForCausalLM"]
    return write_folder(root, cfg, T), ["LlamaForCausalLM", "config.json"]


def case_missing_shard(root):
    cfg, T = mixtral(L=1, E=2)
    f = write_folder(root, cfg, T, shards=3)
    (f / "model-00002-of-00003.safetensors").unlink()
    return f, ["model-00002-of-00003.safetensors"]


def case_wrong_expert_shape(root):
    cfg, T = mixtral(L=2, E=2)
    name = "model.layers.1.block_sparse_moe.experts.1.w3.weight"
    T = [(n, d, (s[0] + 1, s[1]), bits(np.random.default_rng(0), d, (s[0] + 1, s[1])))
         if n == name else (n, d, s, a) for n, d, s, a in T]
    return write_folder(root, cfg, T), [name]


def case_wrong_stacked_shape(root):
    cfg, T = qwen3_fused(L=1)
    name = "model.layers.0.mlp.experts.gate_up_proj"
    T = [(n, d, (s[0], s[1] // 2, s[2]), a.reshape(s)[:, :s[1] // 2].copy()) if n == name
         else (n, d, s, a) for n, d, s, a in T]
    return write_folder(root, cfg, T), [name]


def case_unknown_dtype(root):
    cfg, T = mixtral(L=1, E=2)
    f = write_folder(root, cfg, T)
    st = f / "model.safetensors"
    n, = struct.unpack_from("<Q", st.read_bytes(), 0)
    raw = st.read_bytes()
    header = json.loads(raw[8:8 + n])
    header["model.layers.0.self_attn.k_proj.weight"]["dtype"] = "Q4_0"
    _write_raw_safetensors(st, header, raw[8 + n:])
    return f, ["model.layers.0.self_attn.k_proj.weight", "Q4_0"]


def case_missing_config(root):
    cfg, T = mixtral(L=1, E=2)
    f = write_folder(root, cfg, T)
    (f / "config.json").unlink()
    return f, ["config.json"]


def case_missing_expert_tensor(root):
    cfg, T = mixtral(L=2, E=3)
    T = [t for t in T if t[0] != "model.layers.1.block_sparse_moe.experts.2.w3.weight"]
    return write_folder(root, cfg, T), ["layer 1", "expert 2"]


def case_expert_index_out_of_range(root):
    cfg, T = mixtral(L=1, E=2)
    T = T + [(n.replace("experts.1.", "experts.7."), d, s, a) for n, d, s, a in T
             if "experts.1." in n]
    return write_folder(root, cfg, T), ["experts.7."]


def case_expert_in_dense_layer(root):
    cfg, T = qwen3_fused(L=2, mlp_only_layers=(1,))
    _, T2 = qwen3_fused(L=2)
    T += [t for t in T2 if t[0] == "model.layers.1.mlp.experts.down_proj"]
    return write_folder(root, cfg, T), ["model.layers.1.mlp.experts.down_proj"]


def case_truncated_shard(root):
    cfg, T = mixtral(L=1, E=2)
    f = write_folder(root, cfg, T, shards=2)
    p = f / "model-00002-of-00002.safetensors"
    p.write_bytes(p.read_bytes()[:-10])
    return f, ["model-00002-of-00002.safetensors"]


def case_bad_config_json(root):
    cfg, T = mixtral(L=1, E=2)
    f = write_folder(root, cfg, T)
    (f / "config.json").write_text("{not json")
    return f, ["config.json"]


def case_missing_config_key(root):
    cfg, T = mixtral(L=1, E=2)
    del cfg["num_experts_per_tok"]
    return write_folder(root, cfg, T), ["num_experts_per_tok"]


ERROR_CASES = {f.__name__[5:]: f for f in [
    case_unsupported_arch, case_missing_shard, case_wrong_expert_shape, case_wrong_stacked_shape,
    case_unknown_dtype, case_missing_config, case_missing_expert_tensor,
    case_expert_index_out_of_range, case_expert_in_dense_layer, case_truncated_shard,
    case_bad_config_json, case_missing_config_key]}


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing-output"])
@pytest.mark.parametrize("case", list(ERROR_CASES))
def test_conversion_errors(tmp_path, case, existing):
    folder, needles = ERROR_CASES[case](tmp_path / "src")
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "model.zmoe"
    if existing:
        out.write_bytes(b"previous contents")
    with pytest.raises(ConversionError) as ei:
        convert(folder, out, progress=False)
    msg = str(ei.value)
    for n in needles:
        assert n in msg, (n, msg)
    if existing:
        assert leftovers(outdir) == ["model.zmoe"]
        assert out.read_bytes() == b"previous contents"
    else:
        assert leftovers(outdir) == []
    assert not list(tmp_path.rglob("*.tmp-*"))


@pytest.mark.parametrize("kw,needle", [({"chunks": 0}, "chunks"),
                                       ({"dense_encoding": "zstd"}, "zstd"),
                                       ({"exp_codec": "lz4"}, "lz4")])
def test_bad_options(tmp_path, kw, needle):
    cfg, T = mixtral(L=1, E=2)
    folder = write_folder(tmp_path / "m", cfg, T)
    with pytest.raises(ConversionError, match=needle):
        convert(folder, tmp_path / "o" / "m.zmoe", progress=False, **kw)
    assert not (tmp_path / "o").exists() or leftovers(tmp_path / "o") == []


def test_not_a_folder(tmp_path):
    with pytest.raises(ConversionError, match="nope"):
        convert(tmp_path / "nope", tmp_path / "m.zmoe", progress=False)
    assert leftovers(tmp_path) == []


def _raiser(exc):
    def f(*a, **k):
        raise exc
    return f


@pytest.mark.parametrize("where", ["write_expert", "add_tensor", "close", "verify"])
@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing-output"])
def test_interrupt_leaves_no_temp_file(tmp_path, monkeypatch, where, existing):
    cfg, T = mixtral(L=1, E=2)
    folder = write_folder(tmp_path / "m", cfg, T)
    outdir = tmp_path / "out"
    outdir.mkdir()
    out = outdir / "model.zmoe"
    if existing:
        out.write_bytes(b"previous contents")
    seen_tmp = []

    def interrupt(*a, **k):
        seen_tmp.extend(p.name for p in outdir.glob("*.tmp-*"))
        raise KeyboardInterrupt
    if where == "verify":
        monkeypatch.setattr(converter_mod, "verify_against", interrupt)
    else:
        monkeypatch.setattr(zmoe.ZmoeWriter, where, interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert(folder, out, progress=False)
    assert seen_tmp, "the interrupt hit before any temporary file existed"
    if existing:
        assert leftovers(outdir) == ["model.zmoe"]
        assert out.read_bytes() == b"previous contents"
    else:
        assert leftovers(outdir) == []


def test_os_error_during_write_leaves_no_temp_file(tmp_path, monkeypatch):
    cfg, T = mixtral(L=1, E=2)
    folder = write_folder(tmp_path / "m", cfg, T)
    out = tmp_path / "out" / "model.zmoe"
    monkeypatch.setattr(zmoe.ZmoeWriter, "write_expert", _raiser(OSError(28, "No space left")))
    with pytest.raises(OSError):
        convert(folder, out, progress=False)
    assert leftovers(out.parent) == []


def test_verify_mismatch_is_conversion_error(tmp_path, monkeypatch):
    """If the written file does not decode to the source (a codec bug), conversion fails with the
    tensor named and no output."""
    cfg, T = mixtral(L=1, E=2)
    folder = write_folder(tmp_path / "m", cfg, T)
    out = tmp_path / "out" / "model.zmoe"
    real = zmoe.codec.merge_planes

    def broken(exp, sm, dtype, out=None):
        w = real(exp, sm, dtype, out=out)
        if w.size:
            w[0] ^= 1
        return w
    monkeypatch.setattr(zmoe.codec, "merge_planes", broken)
    with pytest.raises(ConversionError, match="round-trip"):
        convert(folder, out, progress=False)
    assert leftovers(out.parent) == []


def test_convert_without_tokenizer_warns_once_and_writes_the_file(tmp_path):
    """No tokenizer.json: the weights convert (and round-trip), with one ConversionWarning that
    names the folder and says what is missing; the CLI shows it as one plain line. With a
    tokenizer.json present: no warning."""
    import warnings

    from click.testing import CliRunner

    from zipmoe_rt.cli import main
    from zipmoe_rt.convert.converter import ConversionWarning

    cfg, T = mixtral(L=1, E=2)
    # only the tensors a Mixtral uses (extra ones get a warning of their own)
    T = [t for t in T if not t[0].endswith(("position_ids", "router_bias_f32"))]
    folder = write_folder(tmp_path / "m", cfg, T)
    out = tmp_path / "a.zmoe"
    with pytest.warns(ConversionWarning) as rec:
        convert(folder, out, progress=False)
    assert len(rec) == 1
    msg = str(rec[0].message)
    assert msg.startswith(f"{folder}: no tokenizer.json: {out} will hold the weights")
    export(out, tmp_path / "exp", progress=False)
    assert folder_tensors(tmp_path / "exp") == expected(T)

    r = CliRunner().invoke(main, ["convert", str(folder), "-o", str(tmp_path / "b.zmoe"), "-q"],
                           env={"ZIPMOE_RT_DEBUG": None})
    assert r.exit_code == 0, r.stderr
    warn = [l for l in r.stderr.splitlines() if "warning" in l.lower()]
    assert warn == [f"zipmoe-rt: warning: {folder}: no tokenizer.json: {tmp_path / 'b.zmoe'} "
                    f"will hold the weights but `zipmoe-rt run/chat` and zipmoe_rt.load() need a "
                    f"tokenizer; copy the model's tokenizer.json (and tokenizer_config.json) into "
                    f"the folder and convert again"], r.stderr

    (folder / "tokenizer.json").write_text(json.dumps({"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}))
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConversionWarning)
        convert(folder, tmp_path / "c.zmoe", progress=False)
