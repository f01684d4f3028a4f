"""Hostile Hugging Face folders: each test makes one mutation of a tiny transformers checkpoint
(the inputs ``tools/fuzz_convert.py`` found mishandled) and checks that ``convert`` refuses it
with a ConversionError naming the file and the tensor / key / field: never another exception,
a MemoryError, a hang, a file outside the folder read, or a converted file the runtime cannot
run."""
from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import make_tiny  # noqa: E402

from zipmoe_rt.convert.converter import ConversionError, convert  # noqa: E402
from zipmoe_rt.convert.safetensors_io import SafetensorsFile  # noqa: E402


@pytest.fixture(scope="module")
def bases(tmp_path_factory):
    """{"single": a Mixtral in one model.safetensors, "sharded": a Qwen2-MoE in shards}."""
    root = tmp_path_factory.mktemp("hostile")
    return {"single": make_tiny("mixtral", root / "single"),
            "sharded": make_tiny("qwen2_moe", root / "sharded", sharded=True)}


def _copy(bases, which, tmp_path) -> Path:
    dst = tmp_path / "ckpt"
    shutil.copytree(bases[which], dst)
    return dst


def _st(folder: Path) -> Path:
    return sorted(folder.glob("*.safetensors"))[0]


def _edit_header(path: Path, fn, raw_text=None, pad=True):
    """Rewrite the JSON header of safetensors ``path``: ``fn(header)`` edits it in place (or
    ``raw_text(text) -> text`` edits the serialised text); the data section is kept."""
    b = path.read_bytes()
    (n,) = struct.unpack_from("<Q", b)
    header, data = json.loads(b[8:8 + n]), b[8 + n:]
    if fn:
        fn(header)
    text = json.dumps(header).encode()
    if raw_text:
        text = raw_text(text)
    if pad:
        text += b" " * (-len(text) % 8)
    path.write_bytes(struct.pack("<Q", len(text)) + text + data)


def _first(header) -> str:
    return sorted(k for k in header if k != "__metadata__")[0]


def _refused(folder: Path, tmp_path, *words):
    with pytest.raises(ConversionError) as ei:
        convert(folder, tmp_path / "out.zmoe", progress=False, threads=1)
    msg = str(ei.value)
    assert str(folder) in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert not (tmp_path / "out.zmoe").exists()
    return msg


# -- safetensors headers --------------------------------------------------------------------------
def _set(field, value):
    def fn(h):
        h[_first(h)][field] = value
    return fn


def _wrap_shape(h):   # a product that wraps to 0 in int64, with offsets that agree with it
    t = h[_first(h)]
    t["shape"], t["data_offsets"] = [2**62, 4], [t["data_offsets"][0]] * 2


def _overlap(h):
    names = sorted(k for k in h if k != "__metadata__")
    h[names[1]]["data_offsets"] = list(h[names[0]]["data_offsets"])
    h[names[1]]["shape"], h[names[1]]["dtype"] = h[names[0]]["shape"], h[names[0]]["dtype"]


@pytest.mark.parametrize("edit, words", [
    (_set("shape", 5), ["shape", "not a list of non-negative integers"]),
    (_set("shape", None), ["shape"]),
    (_set("shape", [-1, 64]), ["shape"]),
    (_set("shape", [2.5, 64]), ["shape"]),
    (_set("shape", ["4", 64]), ["shape"]),
    (_set("data_offsets", None), ["data_offsets"]),
    (_set("data_offsets", [10, 2]), ["data_offsets"]),
    (_set("data_offsets", [0.5, 4]), ["data_offsets"]),
    (_set("dtype", ["BF16"]), ["unknown dtype"]),
    (_wrap_shape, ["bytes, expected"]),
    (_overlap, ["overlaps"]),
    (lambda h: h.update({"__metadata__": {"format": 5}}), ["__metadata__"]),
    (lambda h: h.update({"__metadata__": "x"}), ["__metadata__"]),
    (lambda h: h.update({"x": 5}), ["'x'", "not an object"]),
])
def test_bad_safetensors_header_entry_is_named(bases, tmp_path, edit, words):
    folder = _copy(bases, "single", tmp_path)
    _edit_header(_st(folder), edit)
    msg = _refused(folder, tmp_path, "model.safetensors", *words)
    if edit is not _overlap and words[0] not in ("__metadata__", "'x'"):   # the tensor named
        assert repr(_first(SafetensorsFile(_st(bases["single"])).tensors)) in msg


@pytest.mark.parametrize("raw, words", [
    (lambda t: b"[" * 100_000 + b"]" * 100_000, ["nested too deeply"]),
    (lambda t: t.replace(b'"shape": [', b'"shape": [NaN, ', 1), ["NaN"]),
    (lambda t: t[:1] + b'"a": 1, "a": 2, ' + t[1:], ["'a' appears twice"]),
    (lambda t: t[:1] + b'"\xff": 1, ' + t[1:], ["not UTF-8"]),
    (lambda t: b"[]", ["not a JSON object"]),
])
def test_malformed_safetensors_header_json_is_named(bases, tmp_path, raw, words):
    folder = _copy(bases, "single", tmp_path)
    _edit_header(_st(folder), None, raw)
    _refused(folder, tmp_path, "model.safetensors", "header", *words)


@pytest.mark.parametrize("length", [2**63, 2**64 - 1, 0, 3])
def test_lying_header_length_is_refused(bases, tmp_path, length):
    folder = _copy(bases, "single", tmp_path)
    b = _st(folder).read_bytes()
    _st(folder).write_bytes(struct.pack("<Q", length) + b[8:])
    _refused(folder, tmp_path, "model.safetensors", "header")


def test_extra_bytes_after_the_tensors_are_refused(bases, tmp_path):
    """The byte ranges must tile the data section, as the safetensors reader requires."""
    folder = _copy(bases, "single", tmp_path)
    with open(_st(folder), "ab") as f:
        f.write(b"\0" * 16)
    _refused(folder, tmp_path, "model.safetensors", "truncated or extra bytes")


@pytest.mark.filterwarnings("ignore::UserWarning")
def test_unpadded_header_is_read(bases, tmp_path):
    """A header whose length is not a multiple of 8 is valid safetensors (only the writer pads)."""
    folder = _copy(bases, "single", tmp_path)
    _edit_header(_st(folder), lambda h: h.setdefault("__metadata__", {}).update(x="y"),
                 lambda t: t if len(t) % 8 else t + b" " * 3, pad=False)
    assert SafetensorsFile(_st(folder)).metadata["x"] == "y"
    convert(folder, tmp_path / "out.zmoe", progress=False, threads=1)


# -- the shard index ------------------------------------------------------------------------------
@pytest.mark.parametrize("target, words", [
    ("../model.safetensors", ["not a file in the checkpoint folder"]),
    ("/etc/passwd", ["not a file in the checkpoint folder"]),
    ("sub/model-00001-of-00004.safetensors", ["not a file in the checkpoint folder"]),
    ("..", ["not a file in the checkpoint folder"]),
    (5, ["not a file name"]),
])
def test_index_pointing_outside_the_folder_is_refused(bases, tmp_path, target, words):
    folder = _copy(bases, "sharded", tmp_path)
    idx = folder / "model.safetensors.index.json"
    doc = json.loads(idx.read_text())
    doc["weight_map"][sorted(doc["weight_map"])[0]] = target
    idx.write_text(json.dumps(doc))
    _refused(folder, tmp_path, "model.safetensors.index.json", *words)


@pytest.mark.parametrize("text", [b"[1]", b'{"weight_map": [1]}', b"{" * 50_000, b"\xff{}"])
def test_malformed_index_is_named(bases, tmp_path, text):
    folder = _copy(bases, "sharded", tmp_path)
    (folder / "model.safetensors.index.json").write_bytes(text)
    _refused(folder, tmp_path, "model.safetensors.index.json")


# -- config.json ----------------------------------------------------------------------------------
def _config(folder: Path, **kw):
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in kw.items():
        if v is ...:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg))


@pytest.mark.parametrize("which, kw, words", [
    ("single", {"num_hidden_layers": 2**31 - 1}, ["num_hidden_layers", "1..65536"]),
    ("single", {"num_hidden_layers": 2**32 + 1}, ["num_hidden_layers"]),
    ("single", {"sliding_window": "true"}, ["sliding_window", "integer"]),
    ("single", {"architectures": "MixtralForCausalLM"}, ["architectures", "list of names"]),
    ("single", {"architectures": [5]}, ["architectures"]),
    ("single", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}},
     ["llama3 needs", "low_freq_factor"]),
    ("single", {"rope_parameters": {"rope_type": "linear", "rope_theta": 1e4}},
     ["linear needs factor"]),
    ("single", {"rope_parameters": {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0,
                                    "low_freq_factor": 4.0, "high_freq_factor": 1.0,
                                    "original_max_position_embeddings": 64}},
     ["high_freq_factor > low_freq_factor"]),
    ("sharded", {"decoder_sparse_step": "x"}, ["decoder_sparse_step", "integer"]),
    ("sharded", {"decoder_sparse_step": -1}, ["decoder_sparse_step"]),
    ("sharded", {"mlp_only_layers": 5}, ["mlp_only_layers", "list"]),
    ("sharded", {"mlp_only_layers": [0.5]}, ["mlp_only_layers[0]"]),
    ("sharded", {"use_sliding_window": "yes"}, ["use_sliding_window", "true or false"]),
    ("sharded", {"layer_types": ["x", "y", "z"]}, ["layer_types", "'x'"]),
    ("sharded", {"layer_types": 7}, ["layer_types", "list"]),
    ("single", {"initializer_range": json.loads("[" * 70 + "]" * 70)}, ["nested deeper"]),
])
def test_bad_config_value_is_named(bases, tmp_path, which, kw, words):
    folder = _copy(bases, which, tmp_path)
    _config(folder, **kw)
    msg = _refused(folder, tmp_path, "config.json", *words)
    assert "config.json: config.json" not in msg, msg       # the file is named once


@pytest.mark.parametrize("text, words", [
    (b'{"architectures": ["MixtralForCausalLM"], "rms_norm_eps": NaN}', ["NaN"]),
    (b"\xff\xfe{}", ["not UTF-8"]),
    (b"[1, 2]", ["not a JSON object"]),
    (b'{"architectures": ["MixtralForCausalLM"], "initializer_range": 1e999}', ["1e999"]),
])
def test_malformed_config_is_named(bases, tmp_path, text, words):
    folder = _copy(bases, "single", tmp_path)
    (folder / "config.json").write_bytes(text)
    _refused(folder, tmp_path, "config.json", *words)


def test_integer_weights_are_refused(bases, tmp_path):
    """An I16 weight (same size as BF16, so its bytes fit) is not a weight the kernels take."""
    folder = _copy(bases, "single", tmp_path)
    _edit_header(_st(folder), lambda h: h["model.embed_tokens.weight"].update(dtype="I16"))
    _refused(folder, tmp_path, "model.safetensors", "'model.embed_tokens.weight'", "dtype I16")


# -- generation / tokenizer files ------------------------------------------------------------------
def _tokenizer(folder: Path):
    from tokenizers import Tokenizer, models
    tok = Tokenizer(models.WordLevel({"<unk>": 0, "</s>": 1, "a": 2}, unk_token="<unk>"))
    tok.save(str(folder / "tokenizer.json"))


@pytest.mark.parametrize("name, doc, words", [
    ("generation_config.json", {"eos_token_id": [2, "x"]}, ["eos_token_id", "token id"]),
    ("generation_config.json", {"eos_token_id": 2**70}, ["eos_token_id"]),
    ("generation_config.json", {"eos_token_id": {"a": 1}}, ["eos_token_id"]),
    ("generation_config.json", 5, ["not a JSON object"]),
    ("tokenizer_config.json", {"eos_token": 5}, ["eos_token", "not a string"]),
    ("tokenizer_config.json", {"eos_token": {"content": ["x"]}}, ["eos_token"]),
    ("tokenizer_config.json", {"chat_template": "{% for %}"}, ["chat_template does not compile"]),
    ("tokenizer_config.json", [], ["not a JSON object"]),
    ("tokenizer.json", {"model": 5}, ["tokenizers library"]),
    ("generation_config.json", '{"eos_token_id": 1e999}', ["1e999", "invalid JSON"]),
])
def test_bad_generation_or_tokenizer_file_is_named(bases, tmp_path, name, doc, words):
    folder = _copy(bases, "single", tmp_path)
    _tokenizer(folder)
    (folder / name).write_text(doc if isinstance(doc, str) else json.dumps(doc))
    _refused(folder, tmp_path, name, *words)


def test_tokenizer_json_not_json_is_named(bases, tmp_path):
    folder = _copy(bases, "single", tmp_path)
    (folder / "tokenizer.json").write_bytes(b'{"a": \xff}')
    _refused(folder, tmp_path, "tokenizer.json", "invalid JSON", "utf-8")


def test_stop_ids_from_every_source_after_the_checks(bases, tmp_path):
    """The stop ids are generation_config.json's, config.json's (2) and the EOS token's id
    from tokenizer.json's added tokens; the file converts."""
    import zmoe
    folder = _copy(bases, "single", tmp_path)
    _tokenizer(folder)
    tj = json.loads((folder / "tokenizer.json").read_text())
    tj["added_tokens"] = [{"content": "</s>", "id": 1, "special": True, "single_word": False,
                           "lstrip": False, "rstrip": False, "normalized": False}]
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": 7}))
    out = convert(folder, tmp_path / "out.zmoe", progress=False, threads=1)
    with zmoe.ZmoeReader(out) as r:
        assert list(r.metadata["generation.eos_token_ids"]) == [7, 2, 1]


@pytest.mark.parametrize("spelling", ["01", "\u0661", "+1"])
def test_layer_number_spelled_otherwise_is_not_that_layer(bases, tmp_path, spelling):
    """transformers matches ``model.layers.1.`` literally: a tensor named ``layers.01`` (or with
    a non-ASCII digit) is not layer 1's, so layer 1 lacks that expert weight."""
    folder = _copy(bases, "single", tmp_path)
    old = "model.layers.1.block_sparse_moe.experts.0.w1.weight"
    new = old.replace("layers.1.", f"layers.{spelling}.")
    _edit_header(_st(folder), lambda h: h.__setitem__(new, h.pop(old)))
    _refused(folder, tmp_path, "layer 1 expert 0 lacks tensors")
