"""Hostile config.json values for the families with per-layer shapes and RoPE variants
(Qwen3-Next, Qwen3.5-MoE, Gemma 4, gpt-oss, LFM2-MoE): ``convert`` refuses each with a
ConversionError naming config.json and the field, and writes nothing; a value the runtime
would refuse only when loading the file never reaches a container."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

pytest.importorskip("torch")
pytest.importorskip("transformers")

from zipmoe_rt.convert.converter import ConversionError, convert  # noqa: E402


def _edit(folder: Path, path: str, value):
    """Set the config.json entry at dotted ``path`` to ``value``."""
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    *head, last = path.split(".")
    d = cfg
    for k in head:
        d = d[k]
    d[last] = value
    p.write_text(json.dumps(cfg))


def _refused(src: Path, tmp_path: Path, path: str, value, *words) -> str:
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    _edit(folder, path, value)
    out = tmp_path / "out.zmoe"
    with pytest.raises(ConversionError) as ei:
        convert(folder, out, progress=False, threads=1)
    msg = str(ei.value)
    assert f"{folder}/config.json" in msg, msg
    for w in words:
        assert w in msg, (w, msg)
    assert not out.exists() and not list(tmp_path.glob("out.zmoe*"))
    return msg


@pytest.mark.parametrize("spec, path, value, words", [
    # partial_rotary_factor outside (0, 1] (or [0, 1] for Gemma 4's proportional RoPE), or
    # one that leaves no rotary dimension: convert used to accept these and `run` refused the
    # container afterwards, without naming the file
    ("qwen3_next", "rope_parameters.partial_rotary_factor", 0.0,
     ["rope.partial_rotary_factor", "'0.0'", "(0, 1]"]),
    ("qwen3_next", "rope_parameters.partial_rotary_factor", 1.5,
     ["rope.partial_rotary_factor", "'1.5'"]),
    ("qwen3_next", "rope_parameters.partial_rotary_factor", "half",
     ["partial_rotary_factor", "'half'"]),
    ("qwen3_next", "rope_parameters.partial_rotary_factor", 0.01,
     ["rope.partial_rotary_factor 0.01 gives no rotary dimension of head_dim 16"]),
    ("qwen3_5_moe", "rope_parameters.partial_rotary_factor", 2,
     ["rope.partial_rotary_factor", "'2'"]),
    ("gemma4", "rope_parameters.full_attention.partial_rotary_factor", 2.0,
     ["full_attention", "rope.partial_rotary_factor", "'2.0'", "[0, 1]"]),
])
def test_out_of_range_rope_is_refused_at_convert(tiny_moe_dir, tmp_path, spec, path, value,
                                                 words):
    _refused(tiny_moe_dir(spec), tmp_path, path, value, *words)


@pytest.mark.parametrize("spec, value", [
    ("gpt_oss", 0), ("gpt_oss", None), ("gemma4", 0), ("gemma4", None)])
def test_sliding_layers_without_a_window_are_refused(tiny_moe_dir, tmp_path, spec, value):
    """``sliding_window`` 0 or null beside ``sliding_attention`` layers: transformers cannot
    run such a model (its sliding mask and cache disagree, or its config refuses null), and
    the runtime used to run those layers as full attention, or (Gemma 4, null) with the class
    default window: a model nobody can check. Refused at convert, naming the field."""
    _refused(tiny_moe_dir(spec), tmp_path, "sliding_window", value, "sliding_window",
             "sliding_attention")


@pytest.mark.parametrize("spec", ["gpt_oss", "gemma4"])
def test_a_window_of_one_token_still_converts(tiny_moe_dir, tmp_path, spec):
    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_moe_dir(spec), folder)
    _edit(folder, "sliding_window", 1)
    with pytest.warns(UserWarning, match="no tokenizer.json"):
        convert(folder, tmp_path / "out.zmoe", progress=False, threads=1)
    from zmoe.reader import ZmoeReader
    with ZmoeReader(tmp_path / "out.zmoe") as r:
        assert r.metadata["hparams.sliding_window"] == 1


@pytest.mark.parametrize("path, value, words", [
    ("norm_eps", 0, ["config.json: norm_eps: '0.0' is not a positive finite number"]),
    ("conv_L_cache", 0, ["config.json: conv_L_cache: '0' is not an integer"]),
])
def test_lfm2_fields_are_named_as_config_json_spells_them(tiny_moe_dir, tmp_path, path, value,
                                                           words):
    """LFM2's config.json says ``norm_eps`` and ``conv_L_cache``: the error names those keys,
    not the runtime's field names (``rms_norm_eps``, ``conv_l_cache``) that the file lacks."""
    msg = _refused(tiny_moe_dir("lfm2_moe"), tmp_path, path, value, *words)
    assert "rms_norm_eps" not in msg and "conv_l_cache" not in msg, msg


def test_a_missing_expert_projection_is_named(tiny_moe_dir, tmp_path):
    """One expert's down projection deleted: the error says which role is missing."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "ckpt"
    shutil.copytree(tiny_moe_dir("qwen3_next"), folder)
    st = folder / "model.safetensors"
    tensors = load_file(st)
    del tensors["model.layers.2.mlp.experts.5.down_proj.weight"]
    save_file(tensors, st, metadata={"format": "pt"})
    with pytest.raises(ConversionError) as ei:
        convert(folder, tmp_path / "out.zmoe", progress=False, threads=1)
    assert str(ei.value) == (f"{folder}: layer 2 expert 5 lacks tensors: no down "
                             f"(has roles ['gate', 'up'])")


def test_a_dense_layer_the_config_calls_sparse_is_named(tiny_moe_dir, tmp_path):
    """LFM2 with ``num_dense_layers`` 0 while layer 0 of the checkpoint is dense: the error
    says config.json makes it a MoE layer, not that the expert "has roles none"."""
    msg = _refused_folder(tiny_moe_dir("lfm2_moe"), tmp_path, "num_dense_layers", 0)
    assert "no tensors of layer 0 expert 0, which config.json makes a MoE layer" in msg, msg


def _refused_folder(src: Path, tmp_path: Path, path: str, value) -> str:
    folder = tmp_path / "ckpt"
    shutil.copytree(src, folder)
    _edit(folder, path, value)
    with pytest.raises(ConversionError) as ei:
        convert(folder, tmp_path / "out.zmoe", progress=False, threads=1)
    assert str(folder) in str(ei.value)
    assert not (tmp_path / "out.zmoe").exists()
    return str(ei.value)


@pytest.mark.parametrize("value", [[], ["sliding_attention"], ["sliding_attention"] * 5])
def test_gemma4_layer_types_of_the_wrong_length_are_named(tiny_moe_dir, tmp_path, value):
    """The error is about layer_types, not per_layer_config (keyed by those layers)."""
    _refused(tiny_moe_dir("gemma4"), tmp_path, "layer_types", value,
             f"layer_types must list one entry per layer (4), not {len(value)}")


def test_tokenizer_with_more_ids_than_the_model_warns(tiny_moe_dir, tmp_path):
    """A tokenizer.json of 400 ids beside a model of 256: convert warns naming the file and
    both sizes (a prompt with an id past the embedding is refused at run time, so the likely
    cause, a tokenizer of another model, is reported when the file is made); the model's own
    size of tokenizer gives no such warning."""
    from test_api import _tokenizer_json

    from zipmoe_rt.convert.converter import ConversionWarning

    for n, warns in ((400, True), (256, False)):
        folder = tmp_path / f"ckpt{n}"
        shutil.copytree(tiny_moe_dir("lfm2_moe"), folder)
        (folder / "tokenizer.json").write_text(_tokenizer_json(n))
        with pytest.warns(ConversionWarning) as rec:
            import warnings
            warnings.warn("sentinel", ConversionWarning)     # pytest.warns needs one
            convert(folder, tmp_path / f"out{n}.zmoe", progress=False, threads=1)
        msgs = [str(w.message) for w in rec if "token ids" in str(w.message)]
        if warns:
            assert msgs == [f"{folder}/tokenizer.json: 400 token ids, more than the model's "
                            f"vocab_size 256 (config.json): a prompt holding an id of 256 or "
                            f"more is refused at run time; is this the model's own tokenizer?"]
        else:
            assert msgs == []
