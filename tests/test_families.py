"""The family registry (zipmoe_rt/families): tensor specs against what transformers creates,
hyper-parameter defaults against transformers' config classes, config.json round trips, the
converter's expert patterns, the runtime's family table and the error messages.

The transformers checks build each tiny spec of tests/tiny_models.py (and each family's default
config class) with transformers and compare names and shapes exactly.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from zipmoe_rt import families
from zipmoe_rt.families import (FUSED, HUB, ConfigError, UnknownFamilyError,
                                UnsupportedArchitectureError, get_architecture, get_family)
from tiny_models import SPECS, hf_classes

ROOT = Path(__file__).resolve().parent.parent


def _hf_config(name: str) -> tuple:
    """(family class, transformers config object, config.json dict) of tiny spec ``name``."""
    transformers = pytest.importorskip("transformers")
    fam = get_family(SPECS[name][0])
    cfg_cls, model_cls = hf_classes(name)
    cfg = getattr(transformers, cfg_cls)(**SPECS[name][1])
    d = json.loads(cfg.to_json_string(use_diff=True))
    d["architectures"] = [model_cls]
    return fam, cfg, d


def _state_dict_shapes(cfg, model_cls: str, towers=()) -> dict:
    """Names and shapes of transformers' state_dict, less the tensors of the ``towers`` (name
    prefixes) a family does not run (a vision tower)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = getattr(transformers, model_cls)(cfg)
    return {k: tuple(v.shape) for k, v in model.state_dict().items()
            if not k.startswith(tuple(towers))}


# ---------------------------------------------------------------------------------------------
# tensor specs == what transformers creates


@pytest.mark.parametrize("name", list(SPECS))
def test_fused_specs_equal_transformers_state_dict(name):
    """transformers 5 builds the experts stacked (FUSED layout); its state_dict also lists a
    tied lm_head under its own name."""
    fam, cfg, d = _hf_config(name)
    hp = get_architecture(d).typed_hparams()
    specs = fam.tensor_specs(hp, FUSED)
    got = {s.name: tuple(s.shape) for s in specs}
    assert len(got) == len(specs)                                   # no name twice
    assert got == _state_dict_shapes(cfg, d["architectures"][0], getattr(fam, "other_towers", ()))
    tied = [s.name for s in specs if s.tied]
    assert tied == (["lm_head.weight"] if SPECS[name][1]["tie_word_embeddings"] else [])


@pytest.mark.parametrize("name", list(SPECS))
def test_hub_specs_equal_saved_checkpoint(tiny_moe_dir, name):
    """save_pretrained writes the Hub layout (one tensor per expert, tied head left out)."""
    from zipmoe_rt.convert.safetensors_io import Checkpoint

    folder = tiny_moe_dir(name)
    config = json.loads((folder / "config.json").read_text())
    arch = get_architecture(config)
    specs = [s for s in arch.tensor_specs(arch.typed_hparams(), HUB) if not s.tied]
    ckpt = Checkpoint(folder)
    try:
        saved = {t.name: tuple(t.shape) for t in ckpt
                 if not t.name.startswith(getattr(arch, "other_towers", ()))}
    finally:
        ckpt.close()
    assert {s.name: tuple(s.shape) for s in specs} == saved


def test_spec_details_qwen2_moe():
    """Per-layer structure of the Qwen2-MoE tiny spec (mlp_only_layers=[1], shared expert)."""
    fam, _, d = _hf_config("qwen2_moe")
    specs = {s.name: s for s in fam.tensor_specs(get_architecture(d).typed_hparams(), HUB)}
    assert len(specs) == 91
    s = specs["model.layers.2.mlp.experts.7.down_proj.weight"]
    assert (s.shape, s.layer, s.expert, s.role, s.key) == ((64, 48), 2, 7, "down", "expert_down")
    assert specs["model.layers.1.mlp.gate_proj.weight"].shape == (128, 64)     # dense layer
    assert not any(n.startswith("model.layers.1.mlp.experts.") for n in specs)
    assert specs["model.layers.0.mlp.shared_expert_gate.weight"].shape == (1, 64)
    assert specs["model.layers.0.self_attn.k_proj.bias"].shape == (32,)
    assert "model.layers.0.self_attn.o_proj.bias" not in specs                # no o bias
    order = [s.key for s in fam.tensor_specs(get_architecture(d).typed_hparams()) if s.layer == 0]
    assert order[:3] == ["attn_norm", "attn_q", "attn_q_bias"]
    assert order[-4:] == ["shared_gate", "shared_up", "shared_down", "shared_expert_gate"]
    fused = fam.tensor_specs(get_architecture(d).typed_hparams(), FUSED)
    st = next(s for s in fused if s.name == "model.layers.0.mlp.experts.gate_up_proj")
    assert (st.shape, st.stacked, st.role, st.expert) == ((8, 96, 64), True, "gate_up", None)


def test_qwen3_attention_bias_includes_o_proj():
    fam = get_family("qwen3_moe")
    hp = fam.hparams_class(num_hidden_layers=1, attention_bias=True, head_dim=16)
    names = {s.name: s.shape for s in fam.tensor_specs(hp)}
    assert names["model.layers.0.self_attn.o_proj.bias"] == (2048,)
    assert names["model.layers.0.self_attn.q_norm.weight"] == (16,)
    assert len([n for n in names if ".experts." in n]) == 128 * 3


def test_qk_norm_scope_sets_the_norm_shapes():
    """QK_NORM_SCOPE "projection" (a norm over the whole q / k projection) gives q/k norm
    weights of heads * head_dim and kv_heads * head_dim; "head" (Qwen3) head_dim."""
    from dataclasses import dataclass

    fam = get_family("qwen3_moe")

    @dataclass
    class Whole(fam.hparams_class):
        QK_NORM_SCOPE = "projection"

    for cls, want in ((fam.hparams_class, ((16,), (16,))), (Whole, ((64,), (32,)))):
        hp = cls(num_hidden_layers=1, hidden_size=64, num_attention_heads=4,
                 num_key_value_heads=2, head_dim=16, num_experts=2)
        shapes = {s.key: s.shape for s in families.tensors.expand(fam.tensor_table(), hp)}
        assert (shapes["attn_q_norm"], shapes["attn_k_norm"]) == want
        assert shapes["attn_q"] == (64, 64) and shapes["attn_k"] == (32, 64)


# ---------------------------------------------------------------------------------------------
# hyper-parameters


@pytest.mark.parametrize("family", families.family_names())
def test_hparams_defaults_are_transformers_defaults(family):
    """A config.json written from transformers' default config class reads back as the
    dataclass defaults (layer_types / max_window_layers are kept only when given)."""
    transformers = pytest.importorskip("transformers")
    if family in ("gemma4", "gemma4_text"):     # Gemma 4
        pytest.skip("Gemma4TextConfig() describes a dense model with per-layer inputs, which "
                    "the runtime refuses; tests/test_gemma4.py reads its defaults with MoE on")
    fam = get_family(family)
    cfg = getattr(transformers, fam.hf_config_class)()
    d = dict(json.loads(cfg.to_json_string(use_diff=False)), architectures=[fam.hf_names[0]])
    # DeepseekV2Config leaves num_experts_per_tok None (no runnable default): config.json must
    # give it, and the rest still reads back as the class defaults
    fill = {"num_experts_per_tok": 6} if d.get("num_experts_per_tok", 0) is None else {}
    # Lfm2MoeConfig leaves layer_types None (its model cannot be built without it)
    if family == "lfm2_moe" and d.get("layer_types") is None:
        fill["layer_types"] = ["conv", "full_attention"] * (d["num_hidden_layers"] // 2)
    for key in fill:
        with pytest.raises(ConfigError, match=key):
            fam(dict(d, **{k: v for k, v in fill.items() if k != key})).typed_hparams()
    got = fam(dict(d, **fill)).typed_hparams().to_hparams()
    want = fam.hparams_class(architecture=fam.hf_names[0], family=family, **fill).to_hparams()
    for k in ("layer_types", "max_window_layers"):
        if k not in want:       # kept where the family derives it (Qwen3-Next)
            got.pop(k, None)
    assert got == want
    assert type(got["rms_norm_eps"]) is float and type(got["vocab_size"]) is int
    assert got["rope"]["rope_theta"] == {"mixtral": 1e6, "phimoe": 1e6,
                                         "ernie4_5_moe": 5e5,
                                         "gpt_oss": 1.5e5, "lfm2_moe": 1e6}.get(family, 1e4)


def test_hparams_known_values():
    assert get_family("mixtral").hparams_class().max_position_embeddings == 131072
    q2 = get_family("qwen2_moe").hparams_class()
    assert (q2.num_experts, q2.num_experts_per_tok, q2.moe_intermediate_size,
            q2.shared_expert_intermediate_size, q2.attention_bias) == (60, 4, 1408, 5632, True)
    q3 = get_family("qwen3_moe").hparams_class()
    assert (q3.num_experts, q3.num_key_value_heads, q3.head_dim, q3.qk_norm) == (128, 4, 64, True)
    assert q3.moe_layers == list(range(24))


def test_olmoe_hparams_and_shapes():
    """OlmoeConfig's defaults (OLMoE-1B-7B's shape), kv heads defaulting to heads, the q/k norms
    over the whole projection, and the head_dim rule."""
    fam = get_family("olmoe")
    hp = fam.hparams_class()
    assert (hp.vocab_size, hp.hidden_size, hp.num_hidden_layers, hp.num_attention_heads,
            hp.num_key_value_heads, hp.head_dim) == (50304, 2048, 16, 16, 16, 128)
    assert (hp.num_experts, hp.num_experts_per_tok, hp.moe_intermediate_size,
            hp.intermediate_size) == (64, 8, 2048, 2048)
    assert (hp.norm_topk_prob, hp.attention_bias, hp.qk_norm, hp.clip_qkv, hp.rms_norm_eps,
            hp.shared_expert_intermediate_size) == (False, False, True, None, 1e-5, 0)
    assert hp.moe_layers == list(range(16)) and "clip_qkv" not in hp.to_hparams()
    assert fam.hparams_class(num_attention_heads=8).num_key_value_heads == 8
    specs = {s.name: s.shape for s in fam.tensor_specs(hp)}
    assert specs["model.layers.3.self_attn.q_norm.weight"] == (2048,)
    assert specs["model.layers.3.self_attn.k_norm.weight"] == (2048,)
    assert len(specs) == 3 + 16 * (9 + 64 * 3)      # 9: 2 norms, q k v o, q/k norm, router
    gqa = fam.hparams_class(num_key_value_heads=4, attention_bias=True, num_hidden_layers=1)
    specs = {s.name: s.shape for s in fam.tensor_specs(gqa)}
    assert specs["model.layers.0.self_attn.k_norm.weight"] == (512,)
    assert specs["model.layers.0.self_attn.o_proj.bias"] == (2048,)
    # config.json: a released config (intermediate_size 1024) and the head_dim rule
    cfg = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "vocab_size": 50304,
           "hidden_size": 2048, "intermediate_size": 1024, "num_hidden_layers": 16,
           "num_attention_heads": 16, "num_key_value_heads": 16, "num_experts": 64,
           "num_experts_per_tok": 8, "rope_theta": 10000.0, "clip_qkv": None,
           "norm_topk_prob": False, "sliding_window": 4096}
    got = get_architecture(cfg).typed_hparams()
    assert (got.moe_intermediate_size, got.intermediate_size, got.sliding_window) == (1024, 1024, 0)
    assert get_architecture(dict(cfg, clip_qkv=8)).hparams()["clip_qkv"] == 8.0
    with pytest.raises(ConfigError, match="head_dim 64 \\* num_attention_heads 16 != hidden_size"):
        get_architecture(dict(cfg, head_dim=64)).hparams()
    with pytest.raises(ValueError, match="head_dim 64 \\* num_attention_heads 16"):
        fam.hparams_class.from_hparams(dict(got.to_hparams(), head_dim=64))


@pytest.mark.parametrize("name", list(SPECS))
def test_config_roundtrip_and_transformers_loads_it(name):
    """hf_config(hp) reads back as hp, and transformers builds the same tensors from it."""
    fam, _, d = _hf_config(name)
    hp = get_architecture(d).typed_hparams()
    cfg2 = fam.hf_config(hp)
    assert cfg2["architectures"] == [fam.hf_names[0]] and cfg2["model_type"] == fam.model_type
    assert fam(json.loads(json.dumps(cfg2))).hparams() == hp.to_hparams()
    transformers = pytest.importorskip("transformers")
    cfg_cls, model_cls = hf_classes(name)
    kw = {k: v for k, v in cfg2.items() if k not in ("architectures", "model_type")}
    towers = getattr(fam, "other_towers", ())
    if towers:      # the towers' own config (not stored) as the spec gives it
        kw = {**SPECS[name][1], **kw}
    shapes = _state_dict_shapes(getattr(transformers, cfg_cls)(**kw), model_cls, towers)
    assert shapes == {s.name: tuple(s.shape) for s in fam.tensor_specs(hp, FUSED)}


def test_missing_required_keys_are_all_named():
    _, _, d = _hf_config("mixtral")
    for k in ("num_experts_per_tok", "num_local_experts", "hidden_size"):
        d.pop(k)
    with pytest.raises(ConfigError) as ei:
        get_architecture(d).hparams()
    msg = str(ei.value)
    assert msg.startswith("config.json: missing ")
    for needle in ("hidden_size", "num_local_experts / num_experts", "num_experts_per_tok"):
        assert needle in msg


def test_config_rules():
    """Optional keys take transformers' defaults; null KV heads means as many as heads; the
    Qwen window needs use_sliding_window (default 4096); unsupported values are named."""
    _, _, d = _hf_config("mixtral")
    for k in ("rms_norm_eps", "max_position_embeddings", "rope_parameters", "rope_theta"):
        d.pop(k, None)
    hp = get_architecture(d).typed_hparams()
    assert (hp.rms_norm_eps, hp.max_position_embeddings) == (1e-5, 131072)
    assert hp.rope == {"rope_type": "default", "rope_theta": 1e6}
    d["num_key_value_heads"] = None
    assert get_architecture(d).typed_hparams().num_key_value_heads == 4
    with pytest.raises(ConfigError, match="hidden_act 'gelu'"):
        get_architecture(dict(d, hidden_act="gelu")).hparams()
    with pytest.raises(ConfigError, match="multiple of num_key_value_heads"):
        get_architecture(dict(d, num_key_value_heads=3)).hparams()
    _, _, q = _hf_config("qwen2_moe_swa")
    assert get_architecture(q).typed_hparams().sliding_window == 5
    q = dict(q, use_sliding_window=False)
    assert get_architecture(q).typed_hparams().sliding_window == 0
    q = {k: v for k, v in q.items() if k != "sliding_window"}
    assert get_architecture(dict(q, use_sliding_window=True)).typed_hparams().sliding_window == 4096


@pytest.mark.parametrize("name,norm_topk,qk_norm,windows,moe_layers", [
    ("mixtral", True, False, [0, 0, 0], [0, 1, 2]),
    ("qwen2_moe", False, False, [0, 0, 0], [0, 2]),
    ("qwen2_moe_swa", False, False, [5, 0, 0], [0, 1, 2]),
    ("qwen3_moe", True, True, [0, 0, 0], [0, 1, 2]),
])
def test_hparams_class_serves_as_model_args(name, norm_topk, qk_norm, windows, moe_layers):
    """The runtime model's arguments are its family's hparams_class (from_hparams + validate,
    with the family's fixed choices), also when the Qwen2 window layers must be derived from
    max_window_layers."""
    fam, _, d = _hf_config(name)
    hp = get_architecture(d).hparams()
    if name == "qwen2_moe_swa":
        hp.pop("layer_types")
    got = fam.hparams_class.from_hparams(hp)
    assert type(got) is fam.hparams_class
    assert (got.norm_topk_prob, got.qk_norm, got.moe_layers) == (norm_topk, qk_norm, moe_layers)
    assert (got.num_attention_heads, got.num_key_value_heads, got.head_dim) == (
        (4, 2, 32) if name == "qwen3_moe" else (4, 2, 16))
    assert [got.window(i) for i in range(3)] == windows
    with pytest.raises(ValueError, match="hparams: missing hidden_size"):
        fam.hparams_class.from_hparams({k: v for k, v in hp.items() if k != "hidden_size"})


def test_model_takes_its_args_and_names_from_the_registry(tiny_moe_dir):
    """build_model picks the family's module; the model's args are the family's hparams_class
    and its dense weights are the checkpoint tensors the registry names."""
    import numpy as np

    from zipmoe_rt.backends import to_f32
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    src = CheckpointSource(tiny_moe_dir("qwen2_moe"))
    net = build_model(src)
    fam = get_family("qwen2_moe")
    assert net.fam is fam and type(net.args) is fam.hparams_class
    assert type(net).__module__ == f"zipmoe_rt.models.{fam.model_module}"
    assert net.tensor_name("attn_k_bias", 2) == "model.layers.2.self_attn.k_proj.bias"
    assert np.array_equal(net.norm, to_f32(src.tensor("model.norm.weight")))
    assert np.array_equal(net.layers[0].post_norm, to_f32(
        src.tensor("model.layers.0.post_attention_layernorm.weight")))
    assert np.array_equal(net.layers[2].mlp.gate, src.tensor("model.layers.2.mlp.gate.weight"))
    assert np.array_equal(net.layers[1].mlp.down, src.tensor("model.layers.1.mlp.down_proj.weight"))
    assert net.has_weight("shared_expert_gate", 0) and not net.has_weight("attn_o_bias", 0)
    with pytest.raises(KeyError, match="qwen2_moe: no tensor 'attn_q_norm'"):
        net.weight("attn_q_norm", 0)


# ---------------------------------------------------------------------------------------------
# converter patterns, runtime table, lookups


@pytest.mark.parametrize("name", list(SPECS))
@pytest.mark.parametrize("layout", [HUB, FUSED])
def test_expert_tensor_classifies_every_spec(name, layout):
    fam, _, d = _hf_config(name)
    arch = get_architecture(d)
    for s in arch.tensor_specs(arch.typed_hparams(), layout):
        ref = arch.expert_tensor(s.name)
        if s.is_expert:
            assert (ref.layer, ref.expert, ref.role) == (s.layer, s.expert, s.role), s.name
        else:
            assert ref is None, s.name


def test_expert_patterns_as_before():
    """The converter's patterns are derived from the name tables; same set as the literal
    patterns the converter used to list (numbers spelled as ``str(int)`` writes them)."""
    num = "0|[1-9][0-9]*"
    layer = rf"model\.layers\.(?P<layer>{num})\."
    e = rf"(?P<expert>{num})"
    assert get_family("mixtral").expert_patterns() == (
        (layer + rf"block_sparse_moe\.experts\.{e}\.w1\.weight", "gate"),
        (layer + rf"block_sparse_moe\.experts\.{e}\.w3\.weight", "up"),
        (layer + rf"block_sparse_moe\.experts\.{e}\.w2\.weight", "down"),
        (layer + r"mlp\.experts\.gate_up_proj", "gate_up"),
        (layer + r"mlp\.experts\.down_proj", "down"))
    for f in ("qwen2_moe", "qwen3_moe"):
        assert get_family(f).expert_patterns() == (
            (layer + rf"mlp\.experts\.{e}\.gate_proj\.weight", "gate"),
            (layer + rf"mlp\.experts\.{e}\.up_proj\.weight", "up"),
            (layer + rf"mlp\.experts\.{e}\.down_proj\.weight", "down"),
            (layer + r"mlp\.experts\.gate_up_proj", "gate_up"),
            (layer + r"mlp\.experts\.down_proj", "down"))


def test_tensor_names_for_the_runtime():
    mix, q2 = get_family("mixtral"), get_family("qwen2_moe")
    assert mix.tensor_names("router", 3) == ("model.layers.3.block_sparse_moe.gate.weight",
                                             "model.layers.3.mlp.gate.weight")
    assert q2.tensor_names("router", 3) == ("model.layers.3.mlp.gate.weight",)
    assert q2.tensor_name("attn_q_bias", 5) == "model.layers.5.self_attn.q_proj.bias"
    assert mix.tensor_name("expert_down", 1, 2) == "model.layers.1.block_sparse_moe.experts.2.w2.weight"
    with pytest.raises(KeyError, match="mixtral: no tensor 'attn_q_norm'"):
        mix.tensor_name("attn_q_norm", 0)


def test_runtime_families_and_converter_registry_agree():
    import importlib

    import transformers

    from zipmoe_rt.convert import registry
    from zipmoe_rt.models import FAMILIES

    assert FAMILIES == {f.family: f.model_module for f in families.all_families()}
    assert {"mixtral": "mixtral", "qwen2_moe": "qwen2_moe",
            "qwen3_moe": "qwen3_moe"}.items() <= FAMILIES.items()
    archs = {a: c.family for a, c in registry.ARCHITECTURES.items()}
    assert {"MixtralForCausalLM": "mixtral", "Qwen2MoeForCausalLM": "qwen2_moe",
            "Qwen3MoeForCausalLM": "qwen3_moe"}.items() <= archs.items()
    assert archs == {n: f.family for f in families.all_families() for n in f.hf_names}
    for fam in families.all_families():
        assert FAMILIES[fam.family] == fam.model_module
        assert hasattr(importlib.import_module(f"zipmoe_rt.models.{fam.model_module}"), "Model")
        assert getattr(transformers, fam.hf_config_class).model_type == fam.model_type
        # the first name is transformers' class; PhiMoE adds its released configs' spelling
        assert hasattr(transformers, fam.hf_names[0])
        assert set(fam.hf_names[1:]) <= {"PhiMoEForCausalLM"}
    assert {f for f, _ in SPECS.values()} == set(families.family_names())   # each one tested


def test_unknown_names_list_the_supported_ones():
    with pytest.raises(UnknownFamilyError) as ei:
        get_family("gpt2")
    assert str(ei.value) == ("unsupported model family 'gpt2'; supported: "
                             + ", ".join(families.family_names()))
    assert {"mixtral", "qwen2_moe", "qwen3_moe"} <= set(families.family_names())
    with pytest.raises(UnsupportedArchitectureError) as ei:
        get_architecture({"architectures": ["LlamaForCausalLM"]})
    assert str(ei.value) == ("unsupported architecture 'LlamaForCausalLM'; supported: "
                             + ", ".join(sorted(families.ARCHITECTURES)))
    assert {"MixtralForCausalLM", "Qwen2MoeForCausalLM",
            "Qwen3MoeForCausalLM"} <= set(families.ARCHITECTURES)
    with pytest.raises(UnsupportedArchitectureError, match="no 'architectures' entry"):
        get_architecture({})
    with pytest.raises(ValueError, match="already registered"):
        families.register("MixtralForCausalLM")(type("X", (families.Family,), {"family": "x"}))


def test_importable_without_torch_and_numba():
    code = ("import sys\n"
            "for m in ('torch', 'numba', 'transformers'): sys.modules[m] = None\n"
            "import zipmoe_rt.families, zipmoe_rt.convert.registry\n"
            "from zipmoe_rt.families import get_family\n"
            "print(len(get_family('qwen2_moe').tensor_specs(get_family('qwen2_moe').hparams_class())))\n")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT,
                       env={"PYTHONPATH": f"{ROOT}:{ROOT / 'format'}", "PATH": "/usr/bin:/bin"},
                       timeout=600)
    assert r.returncode == 0, r.stderr
    # 24 layers x (10 dense + 60 experts x 3 + 4 shared) + embed + norm + lm_head
    assert int(r.stdout) == 24 * (10 + 180 + 4) + 3


@pytest.mark.parametrize("name", list(SPECS))
def test_bench_warmup_source_builds_from_the_specs(name):
    """bench's JIT warm-up model has exactly its family's tensors at the tiny shape, and builds
    and runs also when the hparams carry layer_types (transformers-5 Qwen2-MoE configs)."""
    import numpy as np

    from zipmoe_rt.engine.footprint import TinySource
    from zipmoe_rt.models import build_model

    fam, _, d = _hf_config(name)
    hp = get_architecture(d).typed_hparams()
    src = TinySource(hp.to_hparams())
    specs = [s for s in fam.tensor_specs(src.hparams) if not s.is_expert and not s.tied]
    assert {n: src.tensor(n).shape for n in src._shapes} == {s.name: s.shape for s in specs}
    if "attn_kv_a" in fam.tensor_table():      # MLA: the biases are on kv_a_proj_with_mqa
        assert src.has(fam.tensor_name("attn_kv_a_bias", 0)) == hp.attention_bias
    else:
        assert src.has("model.layers.0.self_attn.q_proj.bias") == hp.attention_bias
    assert ("attn_k_norm" in fam.tensor_table()
            and src.has(fam.tensor_name("attn_k_norm", 1))) == hp.qk_norm
    assert src.has("lm_head.weight") != SPECS[name][1]["tie_word_embeddings"]
    net = build_model(src)
    logits = net.forward(np.arange(8), net.new_cache())
    assert logits.shape == (128,) and np.isfinite(logits).all()
