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
