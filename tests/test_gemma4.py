"""Gemma 4 MoE against transformers (``models/gemma4/modeling_gemma4.py``) on the tiny specs
``gemma4`` / ``gemma4_default_pattern`` / ``gemma4_vl``: the new shared ops (GELU-tanh gated MLPs
and experts, logit soft-capping, proportional RoPE) on both CPU backends, the router, what each
Gemma 4 feature changes, the config rules and refusals, a ConditionalGeneration checkpoint with
a vision tower, and ``plan`` on the published Gemma 4 26B-A4B config. (Logits, greedy decoding,
export and budgeted runs are covered for every spec by the parametrised tests.)"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zipmoe_rt.backends import get_backend  # noqa: E402
from zipmoe_rt.families import ConfigError, get_architecture, get_family  # noqa: E402
from zipmoe_rt.families.gemma4 import Gemma4HParams  # noqa: E402
from zipmoe_rt.models.rope import rope_inv_freq  # noqa: E402

from hf_parity import hf_logits  # noqa: E402
from tiny_models import INIT_STD, SPECS, load_hf  # noqa: E402

PROMPT = np.random.default_rng(4).integers(0, 256, 16)
TOL = 1e-3

#: the text_config of google/gemma-4-26B-A4B's config.json (published values; the vision
#: tower's config is left out: the runtime does not run it)
TEXT_26B_A4B = {
    "attention_bias": False, "attention_dropout": 0.0, "attention_k_eq_v": True,
    "bos_token_id": 2, "dtype": "bfloat16", "enable_moe_block": True, "eos_token_id": 1,
    "final_logit_softcapping": 30.0, "global_head_dim": 512, "head_dim": 256,
    "hidden_activation": "gelu_pytorch_tanh", "hidden_size": 2816,
    "hidden_size_per_layer_input": 0, "initializer_range": 0.02, "intermediate_size": 2112,
    "layer_types": (["sliding_attention"] * 5 + ["full_attention"]) * 5,
    "max_position_embeddings": 262144, "model_type": "gemma4_text",
    "moe_intermediate_size": 704, "num_attention_heads": 16, "num_experts": 128,
    "num_global_key_value_heads": 2, "num_hidden_layers": 30, "num_key_value_heads": 8,
    "num_kv_shared_layers": 0, "pad_token_id": 0, "rms_norm_eps": 1e-06,
    "rope_parameters": {
        "full_attention": {"partial_rotary_factor": 0.25, "rope_theta": 1000000.0,
                           "rope_type": "proportional"},
        "sliding_attention": {"rope_theta": 10000.0, "rope_type": "default"}},
    "sliding_window": 1024, "tie_word_embeddings": True, "top_k_experts": 8,
    "use_bidirectional_attention": "vision", "use_cache": True, "use_double_wide_mlp": False,
    "vocab_size": 262144, "vocab_size_per_layer_input": 262144}
CONFIG_26B_A4B = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4",
                  "text_config": TEXT_26B_A4B, "tie_word_embeddings": True}


def _bf16(a: np.ndarray) -> np.ndarray:
    """float32 -> BF16 bits (truncated), uint16."""
    return (np.ascontiguousarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _widen(b: np.ndarray) -> np.ndarray:
    return (b.astype(np.uint32) << 16).view(np.float32)


# -- the shared ops ---------------------------------------------------------------------------

@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("T,H,I", [(1, 64, 32), (5, 64, 32), (1, 512, 384), (7, 512, 384)])
def test_gelu_tanh_gated_ops_match_torch(backend, T, H, I):
    """swiglu / expert_accumulate / experts_token with act='gelu_pytorch_tanh' give torch's
    ``gelu(approximate='tanh')(x W_g^T) * x W_u^T`` (and its down projection), on both sides of
    the parallel kernels' size threshold; SiLU gives something else."""
    from zipmoe_rt.models.weights import ExpertWeights

    be = get_backend(backend)
    rng = np.random.default_rng(T * H)
    x = rng.standard_normal((T, H)).astype(np.float32)
    ex = [ExpertWeights(*(_bf16(0.1 * rng.standard_normal(s)) for s in ((I, H), (I, H), (H, I))))
          for _ in range(3)]
    act = torch.nn.GELU(approximate="tanh")

    def ref(e, xs):
        g, u, d = (torch.from_numpy(_widen(a)) for a in (e.gate, e.up, e.down))
        return (act(torch.from_numpy(xs) @ g.T) * (torch.from_numpy(xs) @ u.T)) @ d.T

    h = be.swiglu(x, ex[0].gate, ex[0].up, "gelu_pytorch_tanh")
    want = (act(torch.from_numpy(x) @ torch.from_numpy(_widen(ex[0].gate)).T)
            * (torch.from_numpy(x) @ torch.from_numpy(_widen(ex[0].up)).T)).numpy()
    np.testing.assert_allclose(h, want, atol=1e-5, rtol=1e-4)
    assert np.abs(be.swiglu(x, ex[0].gate, ex[0].up) - want).max() > 1e-3     # SiLU differs
    out = np.zeros((T, H), np.float32)
    rows = np.arange(0, T, 2, dtype=np.int64)
    w = np.linspace(0.3, 0.9, rows.size).astype(np.float32)
    be.expert_accumulate(out, x, rows, w, ex[1], act="gelu_pytorch_tanh")
    want = np.zeros((T, H), np.float32)
    want[rows] = w[:, None] * ref(ex[1], x[rows]).numpy()
    np.testing.assert_allclose(out, want, atol=1e-5, rtol=1e-4)
    o1 = np.zeros(H, np.float32)
    wk = np.array([0.5, 0.3, 0.2], np.float32)
    be.experts_token(o1, x[0], ex, wk, act="gelu_pytorch_tanh")
    want = sum(float(wk[j]) * ref(ex[j], x[:1]).numpy()[0] for j in range(3))
    np.testing.assert_allclose(o1, want, atol=1e-5, rtol=1e-4)
    with pytest.raises(ValueError, match="activation 'relu' is not supported"):
        be.swiglu(x, ex[0].gate, ex[0].up, "relu")


@pytest.mark.parametrize("backend", ["numba", "numpy"])
def test_softcap_op(backend):
    """softcap_ is Gemma4ForCausalLM's ``tanh(logits / cap) * cap`` in float32; a bad cap is a
    ValueError naming it."""
    be = get_backend(backend)
    x = np.random.default_rng(1).standard_normal((3, 50)).astype(np.float32) * 40
    t = torch.from_numpy(x.copy())
    want = (torch.tanh(t / 30.0) * 30.0).numpy()
    got = be.softcap_(x, 30.0)
    np.testing.assert_allclose(got, want, atol=2e-6, rtol=1e-6)
    assert np.abs(got).max() < 30 and np.abs(want - t.numpy()).max() > 5
    for bad in (0.0, -1.0, float("inf"), True):
        with pytest.raises(ValueError, match="softcap: cap"):
            be.softcap_(x, bad)


@pytest.mark.parametrize("prf,factor,hd", [(0.25, None, 512), (0.25, None, 32), (1.0, 2.0, 64),
                                           (0.5, None, 16)])
def test_proportional_rope_equals_transformers(prf, factor, hd):
    """The proportional frequencies (first int(prf * hd // 2) turn, exponents over the whole
    head, the rest 0) are transformers' _compute_proportional_rope_parameters, bit for bit."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    rp = {"rope_type": "proportional", "rope_theta": 1e6, "partial_rotary_factor": prf}
    if factor is not None:
        rp["factor"] = factor
    cfg = transformers.Gemma4TextConfig(
        head_dim=hd, global_head_dim=hd, num_hidden_layers=1, layer_types=["full_attention"],
        rope_parameters={"full_attention": rp, "sliding_attention": {"rope_type": "default",
                                                                     "rope_theta": 1e4}})
    want, scale = ROPE_INIT_FUNCTIONS["proportional"](cfg, layer_type="full_attention")
    hp = Gemma4HParams(head_dim=hd, rope=dict(rp))
    got, s = rope_inv_freq(hp)
    assert s == scale == 1.0
    want = want.numpy()     # torch's float32 pow is not correctly rounded: 1 ulp apart
    assert got.dtype == np.float32 and got.shape == want.shape
    assert np.array_equal(got == 0, want == 0)
    np.testing.assert_allclose(got, want, rtol=2.4e-7, atol=0)
    assert (got == 0).sum() == hd // 2 - int(prf * hd // 2)


# -- the model against transformers ----------------------------------------------------------

@pytest.mark.parametrize("name", ["gemma4", "gemma4_default_pattern"])
def test_router_matches_transformers(pair, name):
    """Each layer's routing (un-normed residual in, scale and per-expert scale) picks
    Gemma4TextRouter's experts with its weights; the per-expert scales make the weights of a
    token sum to something other than 1."""
    net, hf = pair(name)
    x = np.random.default_rng(2).standard_normal((12, net.args.hidden_size)).astype(np.float32)
    for i, layer in enumerate(net.layers):
        _, idx, w = layer.mlp.route(x)
        with torch.no_grad():
            _, tw, ti = hf.model.layers[i].router(torch.from_numpy(x))
        o = np.argsort(idx, 1)
        to = np.argsort(ti.numpy(), 1)
        assert np.array_equal(np.take_along_axis(idx, o, 1), np.take_along_axis(ti.numpy(), to, 1))
        np.testing.assert_allclose(np.take_along_axis(w, o, 1),
                                   np.take_along_axis(tw.numpy(), to, 1), atol=1e-5)
        assert np.abs(w.sum(1) - 1).max() > 0.05


def _hf_variant(folder, **changes):
    """transformers' model of the checkpoint in ``folder`` with config changes."""
    cfg = transformers.AutoConfig.from_pretrained(folder)
    for k, v in changes.items():
        setattr(cfg, k, v)
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, config=cfg, dtype=torch.float32, attn_implementation="eager").eval()


def test_gemma4_features_matter(tiny_moe_dir, pair):
    """On spec ``gemma4`` the soft cap (3.0) bends the logits, and the layer scalars, router
    scales and sandwich norms are not ones (a model ignoring them would differ), while ours
    matches transformers at every position."""
    net, hf = pair("gemma4")
    ref = hf_logits(hf, PROMPT)
    ours = net.forward(PROMPT, net.new_cache(), last_only=False)
    assert np.abs(ours - ref).max() < TOL
    assert np.abs(ref).max() < 3.0
    uncapped = hf_logits(_hf_variant(tiny_moe_dir("gemma4"), final_logit_softcapping=None),
                         PROMPT)
    assert np.abs(uncapped - ref).max() > 0.05
    for i, layer in enumerate(net.layers):
        assert abs(layer.scalar - 1.0) > 1e-3
        assert np.abs(layer.mlp.expert_scale - 1).max() > 0.05
        assert np.abs(layer.post_mlp_norm.weight - 1).max() > 0.05
        hl = hf.model.layers[i]
        assert hl.self_attn.v_proj is None if net.args.is_global(i) else hl.self_attn.v_proj is not None


def test_layer_shapes_and_kv_cache(pair):
    """Full-attention layers have their own head size, kv heads and RoPE (proportional, a
    quarter of the pairs turning); sliding layers keep every position in the cache but attend
    within the window."""
    net, hf = pair("gemma4")
    a = net.args
    assert a.layer_types == ["sliding_attention", "full_attention"] * 2
    assert [(l.attn.hd, l.attn.nkv, l.attn.window) for l in net.layers] == [
        (16, 2, 5), (32, 1, 0), (16, 2, 5), (32, 1, 0)]
    assert (net.global_rope.inv_freq == 0).sum() == 12 and net.rope.inv_freq.size == 8
    assert a.kv_values_per_token() == 2 * (2 * 16 + 1 * 32) * 2


# -- config rules -------------------------------------------------------------------------------

def _text(**kw):
    cfg = dict(TEXT_26B_A4B, architectures=["Gemma4ForCausalLM"])
    cfg.update(kw)
    return {k: v for k, v in cfg.items() if v is not ...}


def test_defaults_are_transformers_defaults():
    """Gemma4TextConfig()'s defaults with the MoE fields set read back as the dataclass
    defaults (the default layer pattern: every sixth layer and the last one full)."""
    moe = dict(enable_moe_block=True, num_experts=16, top_k_experts=4, moe_intermediate_size=96,
               hidden_size_per_layer_input=0)
    cfg = transformers.Gemma4TextConfig(**moe)
    d = dict(json.loads(cfg.to_json_string(use_diff=False)), architectures=["Gemma4ForCausalLM"])
    got = get_architecture(d).typed_hparams()
    want = Gemma4HParams(architecture="Gemma4ForCausalLM", family="gemma4_text", num_experts=16,
                         num_experts_per_tok=4, moe_intermediate_size=96,
                         layer_types=list(cfg.layer_types), moe_layers=list(range(30)))
    assert got.to_hparams() == want.to_hparams()
    assert got.layer_types == ["full_attention" if (i + 1) % 6 == 0 or i == 29 else
                               "sliding_attention" for i in range(30)]
    plc = cfg.per_layer_config
    for i in range(30):
        la = got.layer_args(i)
        assert (la.head_dim, la.num_key_value_heads) == (
            plc[i].head_dim, plc[i].num_key_value_heads)


@pytest.mark.parametrize("key,value,needle", [
    ("hidden_size_per_layer_input", 256, "hidden_size_per_layer_input 256 is not supported"),
    ("hidden_size_per_layer_input", ..., "absent means 256"),
    ("enable_moe_block", False, "enable_moe_block False is not supported"),
    ("num_kv_shared_layers", 4, "num_kv_shared_layers 4"),
    ("use_double_wide_mlp", True, "use_double_wide_mlp True"),
    ("attention_bias", True, "attention_bias True"),
    ("use_bidirectional_attention", "all", "use_bidirectional_attention 'all'"),
    ("hidden_activation", "silu", "hidden_activation 'silu' is not supported"),
    ("top_k_experts", ..., "missing top_k_experts"),
    ("rope_parameters", {"sliding_attention": {"rope_theta": 1e4}}, "has no full_attention"),
    ("per_layer_config", {"0": {"head_dim": 64}}, "per_layer_config must give head_dim"),
    ("num_global_key_value_heads", 3, "multiple of num_global_key_value_heads"),
    ("final_logit_softcapping", -1.0, "final_logit_softcapping"),
    ("rope_parameters", {"sliding_attention": {"rope_theta": 1e4},
                         "full_attention": {"rope_type": "dynamic", "rope_theta": 1e6}},
     "global_rope \\(full_attention\\): rope.rope_type: 'dynamic' is not supported"),
])
def test_config_refusals_name_the_field(key, value, needle):
    """Features the runtime does not build, and bad values, are refused naming the field."""
    with pytest.raises(ConfigError, match=needle):
        get_architecture(_text(**{key: value})).typed_hparams()


def test_global_shapes_from_either_spelling():
    """global_head_dim / num_global_key_value_heads (as released) and a saved per_layer_config
    (transformers 5.25's save_pretrained) read the same; without attention_k_eq_v the full
    layers keep num_key_value_heads, as Gemma4TextConfig does."""
    a = get_architecture(_text()).typed_hparams()
    plc = {str(i): {"head_dim": 512, "num_key_value_heads": 2} for i in range(5, 30, 6)}
    b = get_architecture(_text(per_layer_config=plc, global_head_dim=...,
                               num_global_key_value_heads=...)).typed_hparams()
    assert a.to_hparams() == b.to_hparams()
    assert (a.global_head_dim, a.num_global_key_value_heads) == (512, 2)
    c = get_architecture(_text(attention_k_eq_v=False)).typed_hparams()
    tc = transformers.Gemma4TextConfig(**{k: v for k, v in _text(attention_k_eq_v=False).items()
                                          if k not in ("architectures", "model_type")})
    assert c.num_global_key_value_heads == tc.per_layer_config[5].num_key_value_heads == 8
    d = get_architecture(_text(layer_types=["sliding_attention"] * 30)).typed_hparams()
    assert d.layer_types[-1] == "full_attention"         # forced, as transformers does


# -- ConditionalGeneration with a vision tower -------------------------------------------------

def test_conditional_generation_with_a_vision_tower(tmp_path):
    """A Gemma4ForConditionalGeneration checkpoint with a vision tower converts: the tower's
    tensors are named in one warning and stored as they are (export gives the checkpoint back
    byte for byte), and the text model's logits of a text prompt are transformers'."""
    from zipmoe_rt.convert.converter import ConversionWarning, convert
    from zipmoe_rt.convert.export import export
    from tiny_models import _randomize_gemma4, _randomize_norms
    from hf_parity import zmoe_logits

    kw = dict(SPECS["gemma4_vl"][1])
    kw["vision_config"] = dict(hidden_size=32, intermediate_size=48, num_hidden_layers=1,
                               num_attention_heads=2, num_key_value_heads=2, head_dim=16,
                               patch_size=4, pooling_kernel_size=1, position_embedding_size=64)
    torch.manual_seed(0)
    model = transformers.Gemma4ForConditionalGeneration(transformers.Gemma4Config(**kw))
    _randomize_norms(model, torch, torch.Generator().manual_seed(1))
    _randomize_gemma4(model, torch, torch.Generator().manual_seed(3))
    src = tmp_path / "vl"
    model.to(torch.bfloat16).save_pretrained(src)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", ConversionWarning)
        out = convert(src, tmp_path / "vl.zmoe", progress=False)
    unused = [str(w.message) for w in caught if "not used" in str(w.message)]
    assert len(unused) == 1 and "model.vision_tower." in unused[0]
    assert "model.language_model." not in unused[0]
    hf = load_hf(src)
    np.testing.assert_allclose(zmoe_logits(out, PROMPT), hf_logits(hf, PROMPT), atol=TOL)
    exp = export(out, tmp_path / "exported", progress=False)
    from safetensors.torch import load_file
    a, b = load_file(str(src / "model.safetensors")), load_file(str(exp / "model.safetensors"))
    assert set(a) == set(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k])
                                    for k in a)
    assert any(k.startswith("model.vision_tower.") for k in a)


def test_conditional_generation_config_errors():
    """No text_config object: the error names it."""
    cfg = {"architectures": ["Gemma4ForConditionalGeneration"], "model_type": "gemma4"}
    with pytest.raises(ConfigError, match="needs a text_config object"):
        get_architecture(cfg).typed_hparams()


# -- plan on the published 26B-A4B config ------------------------------------------------------

def test_plan_published_26b_a4b(tmp_path):
    """``plan`` on Gemma 4 26B-A4B's config.json: the text model's parameters are the ones
    transformers' Gemma4ForCausalLM creates from its text_config (tied head once, layer
    scalars), 30 x 128 experts of 3 x 704 x 2816 weights, and 112,640 cached values per token
    (25 sliding layers of 8 kv heads x 256, 5 full layers of 2 x 512)."""
    from zipmoe_rt.plan import size_plan

    (tmp_path / "config.json").write_text(json.dumps(CONFIG_26B_A4B))
    p = size_plan(tmp_path)
    kw = {k: v for k, v in TEXT_26B_A4B.items() if k not in ("model_type", "dtype")}
    with torch.device("meta"):
        hf = transformers.Gemma4ForCausalLM(transformers.Gemma4TextConfig(**kw))
    params = dict(hf.named_parameters())
    saved = hf.state_dict()
    params.update((n, b) for n, b in hf.named_buffers() if n in saved)
    total = sum(t.numel() for t in params.values())
    experts = sum(t.numel() for n, t in params.items() if ".experts." in n)
    assert p.params == total
    assert p.expert_params == experts == 30 * 128 * 3 * 704 * 2816
    assert p.experts == 30 * 128
    assert p.kv_values_per_token == 25 * 2 * 8 * 256 + 5 * 2 * 2 * 512 == 112640
    hp = p.hparams
    assert (hp.global_head_dim, hp.num_global_key_value_heads, hp.sliding_window) == (512, 2, 1024)
    assert hp.global_rope["rope_type"] == "proportional" and hp.final_logit_softcapping == 30.0
    # the published values agree with what Gemma4TextConfig resolves from them
    tc = hf.config
    assert [tc.per_layer_config[i].head_dim for i in range(30)] == [
        hp.layer_args(i).head_dim for i in range(30)]
    assert tc.hidden_activation == hp.hidden_act and tc.rms_norm_eps == hp.rms_norm_eps
    # the stacked Hub tensors count as 128 experts a layer, each of its own size
    from zipmoe_rt.plan import ConfigSource
    src = ConfigSource(hp, get_family("gemma4").tensor_specs(hp))
    assert len(src.layouts) == 3840
    assert {lay.full_bytes for lay in src.layouts.values()} == {3 * 704 * 2816 * 2}
    b = size_plan(tmp_path, memory_budget="25%").budget
    assert b.expert_full == 3 * 704 * 2816 * 2 and b.working_set == 8 * b.expert_full


@pytest.mark.parametrize("field,value,needle", [
    ("global_rope", "x", "global_rope \\(full_attention\\): rope: 'x' is not an object"),
    ("num_global_key_value_heads", 0, "num_global_key_value_heads: '0' is not a positive"),
    ("global_head_dim", 33, "global_head_dim 33 must be even"),
    ("attention_k_eq_v", "yes", "attention_k_eq_v: 'yes'"),
    ("final_logit_softcapping", "30", "final_logit_softcapping: '30'"),
    ("layer_types", None, "Gemma 4 needs the layer pattern"),
])
def test_stored_hparams_are_checked_on_load(field, value, needle):
    """A container whose Gemma 4 hyper-parameters lie is refused on load, naming the field."""
    hp = get_architecture(_text()).hparams()
    hp[field] = value
    with pytest.raises(ValueError, match=needle):
        Gemma4HParams.from_hparams(hp)
