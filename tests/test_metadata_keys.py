"""Metadata keys: format/SPEC.md §3 lists exactly the constants of ``zmoe.constants.Keys``, every
family hyper-parameter has one, and what the converter writes uses them with the types the
table gives."""
from __future__ import annotations

import re
import warnings
from dataclasses import fields
from pathlib import Path

import pytest

import zmoe
from zmoe.constants import Keys, hparam_key, metadata_keys
from zipmoe_rt.families import all_families

SPEC = Path(__file__).resolve().parent.parent / "format" / "SPEC.md"


def spec_table() -> dict:
    """{key: type} of the key table in SPEC.md §3."""
    text = SPEC.read_text(encoding="utf-8")
    section = text[text.index("## 3. Metadata"):text.index("## 4. Tensor records")]
    section = section[section.index("| key | type | content |"):]
    return dict(re.findall(r"^\| `([a-z0-9_.]+)` \| ([a-z\[\]]+) \|", section, re.M))


def test_spec_lists_exactly_the_constants():
    table = spec_table()
    assert len(table) == 59 + 5 + 5 + 2 + 4 + 1  # 45 + MLA / DeepSeek MoE 9 + Granite-MoE 4
    #    + ERNIE 4.5 1 + Gated DeltaNet 5 + Gemma 4 5 + gpt-oss 2 + LFM2-MoE 4 + low-precision 1
    assert sorted(table) == list(metadata_keys())
    assert Keys.General.ARCHITECTURE == "general.architecture"
    assert Keys.HParams.MOE_LAYERS == hparam_key("moe_layers") == "hparams.moe_layers"
    assert zmoe.Keys is Keys


def test_every_family_hparam_has_a_constant():
    names = {f.name for fam in all_families() for f in fields(fam.hparams_class)}
    keys = {k[len(Keys.HParams.PREFIX):] for k in metadata_keys()
            if k.startswith(Keys.HParams.PREFIX)}
    assert names == keys


def _convert(tmp_path, name, cfg, T, **kw):
    from test_convert import write_folder
    from zipmoe_rt.convert.converter import ConversionWarning, convert

    folder = write_folder(tmp_path / name, cfg, T)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)        # no tokenizer.json here
        out = convert(folder, tmp_path / f"{name}.zmoe", progress=False, **kw)
    with zmoe.ZmoeReader(out) as r:
        return r.metadata, r.metadata_types


@pytest.mark.parametrize("which", ["mixtral-zstd", "qwen3-huffman"])
def test_converted_keys_and_types_are_the_spec_table(tmp_path, which):
    from test_convert import mixtral, qwen3_fused

    cfg, T = mixtral() if which.startswith("mixtral") else qwen3_fused(mlp_only_layers=(1,))
    meta, types = _convert(tmp_path, which, cfg, T, exp_codec=which.split("-")[1])
    table = spec_table()
    assert set(meta) <= set(table)
    assert {k: types[k] for k in meta} == {k: table[k] for k in meta}
    assert meta[Keys.General.FAMILY] == meta[Keys.HParams.FAMILY] == cfg["model_type"]
    assert meta[Keys.Encoding.EXP_CODEC] == which.split("-")[1]
    assert (Keys.Encoding.ZSTD in meta) == which.startswith("mixtral")
    assert Keys.Tokenizer.JSON not in meta


def test_qwen2_window_keys_have_the_spec_types(tiny_moe_dir, tmp_path):
    """layer_types / max_window_layers (written for Qwen2-MoE configs that carry them)."""
    from zipmoe_rt.convert.converter import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert(tiny_moe_dir("qwen2_moe_swa"), tmp_path / "q.zmoe", progress=False)
    with zmoe.ZmoeReader(out) as r:
        meta, types = r.metadata, r.metadata_types
    table = spec_table()
    for k in (Keys.HParams.LAYER_TYPES, Keys.HParams.MAX_WINDOW_LAYERS, Keys.HParams.MOE_LAYERS):
        assert types[k] == table[k]
    assert meta[Keys.HParams.LAYER_TYPES] == ["sliding_attention", "full_attention",
                                              "full_attention"]
    assert meta[Keys.HParams.MAX_WINDOW_LAYERS] == 2


def test_olmoe_clip_qkv_is_stored_only_when_set(tiny_moe_dir, tmp_path):
    """hparams.clip_qkv (float) is written for a config.json that sets clip_qkv, left out for
    one that has null (the released OLMoE checkpoints)."""
    from zipmoe_rt.convert.converter import convert

    got = {}
    for name in ("olmoe", "olmoe_clip"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            out = convert(tiny_moe_dir(name), tmp_path / f"{name}.zmoe", progress=False)
        with zmoe.ZmoeReader(out) as r:
            got[name] = (r.metadata.get("hparams.clip_qkv"),
                         r.metadata_types.get("hparams.clip_qkv"),
                         r.metadata[Keys.HParams.QK_NORM], r.metadata[Keys.General.FAMILY])
    assert got == {"olmoe": (None, None, True, "olmoe"),
                   "olmoe_clip": (1.0, "float", True, "olmoe")}
