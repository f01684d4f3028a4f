"""Stored hyper-parameters that lie about the stored tensors' shapes (issue case: hparams
``num_attention_heads`` 4 -> 8 made the attention kernels index past their arrays while
``verify`` and ``export`` said OK): refused at load and by ``verify``, naming the file, the
tensor and the hyper-parameters."""
from __future__ import annotations

import subprocess
import sys

import pytest
import zmoe

from test_hostile import CHILD_TIMEOUT, edited, tiny  # noqa: F401  (fixture)
from zipmoe_rt.engine.store import ZmoeSource
from zipmoe_rt.families.check import check_stored_tensors


def _set_hparam(key, value):
    def fn(index, _b):
        index["metadata"][f"hparams.{key}"]["value"] = value
    return fn


def _drop_tensor(name):
    def fn(index, _b):
        index["tensors"] = [t for t in index["tensors"] if t["name"] != name]
    return fn


def _load_error(path) -> str:
    with pytest.raises(zmoe.CorruptIndexError) as ei:
        ZmoeSource(path).reader.close()
    return str(ei.value)


def _shapes(path) -> tuple[dict, dict]:
    src = ZmoeSource(path)
    try:
        return dict(src.hparams), {n: t["shape"] for n, t in src.reader.tensors.items()}
    finally:
        src.reader.close()


def test_honest_file_passes_and_gives_typed_hparams(tiny):
    hp, shapes = _shapes(tiny["huffman"])
    typed = check_stored_tensors(hp, shapes, "f")
    assert typed.num_attention_heads == hp["num_attention_heads"] == 4
    assert typed.num_experts == hp["num_experts"]


@pytest.mark.parametrize("key,value,needles", [
    ("num_attention_heads", 8, ["self_attn.", "num_attention_heads", "[64, 64]"]),
    ("hidden_size", 32, ["hidden_size"]),
    ("moe_intermediate_size", 40, ["moe_intermediate_size", ".experts."]),
    ("vocab_size", 300, ["vocab_size", "[256, 64]"]),
])
def test_hparams_lying_about_shapes_are_refused_at_load(tiny, tmp_path, key, value, needles):
    bad = edited(tiny["huffman"], tmp_path / "bad.zmoe", _set_hparam(key, value))
    msg = _load_error(bad)
    assert str(bad) in msg
    for n in needles:
        assert n in msg, msg


@pytest.mark.parametrize("key,value,needle", [
    ("num_hidden_layers", 10 ** 9, "num_hidden_layers"),
    ("num_experts", 10 ** 6, "num_experts"),
    ("num_attention_heads", "4", "num_attention_heads"),
    ("head_dim", -16, "head_dim"),
    ("num_key_value_heads", True, "num_key_value_heads"),
    ("family", "llama9", "family"),
])
def test_absurd_hparams_are_refused_quickly(tiny, tmp_path, key, value, needle):
    bad = edited(tiny["huffman"], tmp_path / "bad.zmoe", _set_hparam(key, value))
    msg = _load_error(bad)
    assert needle in msg and str(bad) in msg, msg


def test_more_experts_than_stored_is_refused(tiny, tmp_path):
    hp, _ = _shapes(tiny["huffman"])
    bad = edited(tiny["huffman"], tmp_path / "bad.zmoe",
                 _set_hparam("num_experts", hp["num_experts"] + 1))
    msg = _load_error(bad)
    # the router's shape says how many experts there are
    assert "block_sparse_moe.gate.weight" in msg and "num_experts" in msg, msg


def test_missing_dense_tensor_is_named(tiny, tmp_path):
    name = "model.layers.1.post_attention_layernorm.weight"
    hp, shapes = _shapes(tiny["huffman"])
    shapes.pop(name)
    with pytest.raises(zmoe.CorruptIndexError, match=r"no tensor 'model\.layers\.1\."
                                                     r"post_attention_layernorm\.weight'"):
        check_stored_tensors(hp, shapes, "f")


def test_missing_expert_tensor_is_named(tiny):
    hp, shapes = _shapes(tiny["huffman"])
    name = "model.layers.2.block_sparse_moe.experts.3.w2.weight"
    assert name in shapes
    shapes.pop(name)
    with pytest.raises(zmoe.CorruptIndexError, match="routed expert tensor"):
        check_stored_tensors(hp, shapes, "f")


def test_verify_refuses_hparams_lying_about_shapes(tiny, tmp_path):
    bad = edited(tiny["huffman"], tmp_path / "bad.zmoe", _set_hparam("num_attention_heads", 8))
    r = subprocess.run([sys.executable, "-m", "zipmoe_rt.cli", "verify", "-q", str(bad)],
                       capture_output=True, text=True, timeout=CHILD_TIMEOUT)
    assert r.returncode != 0
    assert "Traceback" not in r.stderr
    assert "num_attention_heads" in r.stderr and "self_attn." in r.stderr, r.stderr


@pytest.mark.parametrize("key,value,needle", [
    ("rms_norm_eps", -1.0, "rms_norm_eps"),
    ("rms_norm_eps", "x", "rms_norm_eps"),
    ("rope", {"rope_type": "default", "rope_theta": 0.0}, "rope.rope_theta"),
    ("rope", {"rope_type": "weird", "rope_theta": 1e4}, "rope.rope_type"),
    ("rope", [1, 2], "rope"),
    ("hidden_act", "relu", "hidden_act"),
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
])
def test_stored_values_the_model_cannot_use_are_refused(tiny, tmp_path, key, value, needle):
    """Values that made `run` fail with 'division by zero' or compute SiLU for another
    activation: refused on load naming the file and the field."""
    bad = edited(tiny["huffman"], tmp_path / "bad.zmoe", _set_hparam(key, value))
    msg = _load_error(bad)
    assert needle in msg and str(bad) in msg, msg


@pytest.mark.parametrize("key,value,needle", [
    ("num_experts_per_tok", 9, "num_experts_per_tok"),
    ("rms_norm_eps", -1.0, "rms_norm_eps"),
    ("rms_norm_eps", "tiny", "rms_norm_eps"),
    ("rope_theta", 0, "rope_theta"),
    ("rope_theta", "big", "rope_theta"),
    ("hidden_size", 64.5, "hidden_size"),
    ("num_attention_heads", "four", "num_attention_heads"),
    ("num_hidden_layers", True, "num_hidden_layers"),
    ("num_hidden_layers", -2, "num_hidden_layers"),
    ("num_key_value_heads", 0, "num_key_value_heads"),
])
def test_convert_refuses_config_values_the_runtime_would_refuse(tiny_moe_dir, tmp_path, key,
                                                                value, needle):
    """convert used to accept these and write a file `run` then refused (or read 64.5 as 64,
    true as 1 layer): now a ConversionError naming config.json and the key, nothing written."""
    import json
    import shutil

    from zipmoe_rt.convert.converter import ConversionError, convert
    folder = tmp_path / "hf"
    shutil.copytree(tiny_moe_dir("mixtral"), folder)
    cfg = json.loads((folder / "config.json").read_text())
    if key == "rope_theta" and isinstance(cfg.get("rope_parameters"), dict):
        cfg["rope_parameters"][key] = value        # transformers 5 spelling
    else:
        cfg[key] = value
    (folder / "config.json").write_text(json.dumps(cfg))
    out = tmp_path / "m.zmoe"
    with pytest.raises(ConversionError) as ei:
        convert(folder, out, progress=False)
    assert "config.json" in str(ei.value) and needle in str(ei.value), str(ei.value)
    assert not out.exists() and not list(tmp_path.glob("m.zmoe.tmp*"))


def test_layer_count_beyond_the_file_is_refused_before_layers_are_listed(tiny):
    """moe_layers empty lets a family list every layer: a claimed 2**31-1 layers must be
    refused from the tensor count first, not expanded."""
    hp, shapes = _shapes(tiny["huffman"])
    hp.update(num_hidden_layers=2 ** 31 - 1, moe_layers=[])
    with pytest.raises(zmoe.CorruptIndexError, match="num_hidden_layers: 2147483647 layers"):
        check_stored_tensors(hp, shapes, "f")
