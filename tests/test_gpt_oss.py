"""gpt-oss against transformers (``modeling_gpt_oss.py``) on the tiny specs ``gpt_oss`` /
``gpt_oss_sizes``: the biased router, the sinks, the clamped SwiGLU (each shown to matter),
the interleaved in x out expert tensors as the runtime assembles them, the two new ops on both
CPU backends against a float64 reading of transformers' code, the config rules, the MXFP4
release refused by tensor, and ``plan`` on gpt-oss-20b's published config. (Logits at every
position, 20 greedy tokens, export and budgeted runs are covered for every spec by the
parametrised tests.)"""
from __future__ import annotations

import json
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from zipmoe_rt.backends import get_backend  # noqa: E402
from zipmoe_rt.backends.base import ClampedSwiGLU  # noqa: E402
from zipmoe_rt.families import ConfigError, get_architecture, get_family  # noqa: E402
from zipmoe_rt.models import build_model  # noqa: E402
from zipmoe_rt.models.weights import CheckpointSource, ExpertWeights  # noqa: E402

from family_checks import BACKENDS, assert_same_route, routes_of  # noqa: E402
from hf_parity import hf_logits  # noqa: E402
from tiny_models import SPECS  # noqa: E402

PROMPT = np.random.default_rng(5).integers(0, 256, 14)
TOL = 1e-3


def _bf16(a: np.ndarray) -> np.ndarray:
    """float -> BF16 bits (uint16), round to nearest even."""
    b = np.ascontiguousarray(a, np.float32).view(np.uint32)
    return ((b + 0x7FFF + ((b >> 16) & 1)) >> 16).astype(np.uint16)


def _widen(bits: np.ndarray) -> np.ndarray:
    return (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


# -- against transformers' modules --------------------------------------------------------------

@pytest.mark.parametrize("name", ["gpt_oss", "gpt_oss_sizes"])
def test_router_matches_transformers(pair, name):
    """GptOssTopKRouter (logits with the bias, top-k, softmax over those k): the same experts,
    weights and logits on every layer."""
    model, hf = pair(name)
    ours, theirs = routes_of(model, hf, PROMPT, {n: layer.mlp.router
                                                 for n, layer in enumerate(hf.model.layers)})
    assert len(ours) == len(theirs) == SPECS[name][1]["num_hidden_layers"]
    for layer, (logits, w, idx) in theirs.items():
        assert_same_route(ours[layer], idx, w, logits)
        bias = hf.model.layers[layer].mlp.router.bias.detach().numpy()
        assert np.abs(bias).max() > 0.05          # the router's bias is random, not zero


def test_clamp_bites(pair):
    """The spec's swiglu_limit clamps a good share of the gate and up pre-activations in
    transformers' own forward (so the parity tests exercise the clamp)."""
    _, hf = pair("gpt_oss")
    seen = []
    experts = [layer.mlp.experts for layer in hf.model.layers]
    originals = [e._apply_gate for e in experts]
    for e, orig in zip(experts, originals):
        e._apply_gate = lambda gu, orig=orig: (seen.append(gu.detach().clone()), orig(gu))[1]
    try:
        with torch.no_grad():
            hf(torch.tensor(PROMPT)[None])
    finally:
        for e in experts:
            del e._apply_gate
    gu = torch.cat([s.reshape(-1, s.shape[-1]) for s in seen])
    limit = SPECS["gpt_oss"][1]["swiglu_limit"]
    gate, up = gu[:, ::2], gu[:, 1::2]
    assert (gate > limit).float().mean() > 0.1
    assert (up.abs() > limit).float().mean() > 0.2
    assert (up.abs() <= limit).float().mean() > 0.2     # and not everything


@pytest.mark.parametrize("what", ["sinks", "router_bias", "clamp", "expert_biases"])
def test_each_feature_matters(tiny_moe_dir, pair, what):
    """Each of gpt-oss's additions moves the logits far beyond the parity tolerance when
    taken out: the sinks, the router's bias, the clamp (limit raised far away), the experts'
    biases (zeroed)."""
    model, hf = pair("gpt_oss")
    ref = hf_logits(hf, PROMPT)
    src = CheckpointSource(tiny_moe_dir("gpt_oss"))
    if what == "clamp":
        src.hparams = dict(src.hparams, swiglu_limit=1e9)
    if what == "expert_biases":
        real = src.expert

        def no_bias(layer, e):
            w = real(layer, e)
            z = np.zeros_like
            return ExpertWeights(w.gate, w.up, w.down, z(w.gate_bias), z(w.up_bias),
                                 z(w.down_bias))
        src.expert = no_bias
    other = build_model(src)
    for layer in other.layers:
        if what == "sinks":
            layer.attn.sinks = None
        if what == "router_bias":
            layer.mlp.router.logit_bias = None
    ours = model.forward(PROMPT, model.new_cache(), last_only=False)
    changed = other.forward(PROMPT, other.new_cache(), last_only=False)
    assert np.abs(ours - ref).max() <= TOL
    assert np.abs(changed - ref).max() > 100 * TOL


def test_experts_are_transformers_slices(tiny_moe_dir, pair):
    """An expert as the runtime assembles it from the stacked in x out tensors is transformers'
    ``gate_up_proj[e][:, ::2].T`` (gate), ``[:, 1::2].T`` (up), ``down_proj[e].T`` and the
    biases split the same way, bit for bit."""
    _, hf = pair("gpt_oss")
    src = CheckpointSource(tiny_moe_dir("gpt_oss"))
    for layer in (0, 3):
        ex = hf.model.layers[layer].mlp.experts
        for e in (0, 5):
            w = src.expert(layer, e)
            gu = ex.gate_up_proj[e].detach().numpy()
            b = ex.gate_up_proj_bias[e].detach().numpy()
            np.testing.assert_array_equal(_widen(w.gate), gu[:, ::2].T)
            np.testing.assert_array_equal(_widen(w.up), gu[:, 1::2].T)
            np.testing.assert_array_equal(_widen(w.down), ex.down_proj[e].detach().numpy().T)
            np.testing.assert_array_equal(_widen(w.gate_bias), b[::2])
            np.testing.assert_array_equal(_widen(w.up_bias), b[1::2])
            np.testing.assert_array_equal(_widen(w.down_bias),
                                          ex.down_proj_bias[e].detach().numpy())


def test_sliding_layers_follow_layer_types(pair):
    """Windows per layer as transformers' attention modules have them."""
    for name in ("gpt_oss", "gpt_oss_sizes"):
        model, hf = pair(name)
        want = [m.self_attn.sliding_window or 0 for m in hf.model.layers]
        assert [layer.attn.window for layer in model.layers] == want
        assert 0 in want and any(want)


# -- the ops, both CPU backends, against a float64 reading of transformers' code -----------------

def _attention_sinks_ref(q, K, V, sinks, pos0, window, scale, group):
    """eager_attention_forward with s_aux, float64: scores, mask, the sink column, softmax
    after the row max, the sink dropped. q [T, nq, hd]; K, V [nkv, n, hd]."""
    T, nq, hd = q.shape
    n = pos0 + T
    out = np.zeros((T, nq * hd))
    qpos, kpos = np.arange(pos0, n)[:, None], np.arange(n)[None, :]
    visible = (kpos <= qpos) & ((kpos > qpos - window) if window > 0 else True)
    for h in range(nq):
        s = q[:, h] @ K[h // group, :n].T * scale
        s = np.where(visible, s, -np.inf)
        c = np.concatenate([s, np.full((T, 1), sinks[h])], axis=1)
        p = np.exp(c - c.max(axis=1, keepdims=True))
        p = p / p.sum(axis=1, keepdims=True)
        out[:, h * hd:(h + 1) * hd] = p[:, :-1] @ V[h // group, :n]
    return out


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,pos0,window,nq,nkv", [(1, 9, 0, 4, 2), (7, 0, 3, 4, 4),
                                                   (5, 6, 4, 8, 2), (64, 0, 0, 8, 2)])
def test_attention_sinks_op(backend, T, pos0, window, nq, nkv):
    """``attention_sinks`` on every backend here against the float64 reference (GQA, windows,
    a cache offset, one token and a parallel-sized prefill), and sinks that dominate some
    heads; a wrong number of sinks is a ValueError."""
    be = get_backend(backend)
    rng = np.random.default_rng(T + pos0)
    hd = 16
    n = pos0 + T
    qkv = rng.standard_normal((T, (nq + 2 * nkv) * hd)).astype(np.float32)
    kc = rng.standard_normal((nkv, n + 3, hd)).astype(np.float32)
    vc = rng.standard_normal((nkv, n + 3, hd)).astype(np.float32)
    sinks = (rng.standard_normal(nq) * 2).astype(np.float32)
    sinks[0] = 8.0                                  # a head the sink nearly silences
    scale = np.float32(hd ** -0.5)
    d_qkv, d_kc, d_vc, d_sinks = (be.from_host(a) for a in (qkv, kc, vc, sinks))
    d_out = be.empty((T, nq * hd))
    be.attention_sinks(d_qkv, nq, nkv, hd, d_kc, d_vc, pos0, window, scale, d_sinks, d_out)
    out = be.to_host(d_out)
    ref = _attention_sinks_ref(qkv[:, :nq * hd].reshape(T, nq, hd).astype(np.float64),
                               kc.astype(np.float64), vc.astype(np.float64),
                               sinks.astype(np.float64), pos0, window, float(scale), nq // nkv)
    np.testing.assert_allclose(out, ref, rtol=0, atol=2e-6)
    plain = be.empty((T, nq * hd))
    be.attention(d_qkv, nq, nkv, hd, d_kc, d_vc, pos0, window, scale, plain)
    assert np.abs(be.to_host(plain) - out).max() > 0.1     # the sinks change the result
    with pytest.raises(ValueError, match="sinks"):
        be.attention_sinks(d_qkv, nq, nkv, hd, d_kc, d_vc, pos0, window, scale,
                           be.from_host(sinks[:-1]), d_out)


def _expert_ref(x, w: ExpertWeights, glu):
    """GptOssExperts for one expert in float64 (the weights' BF16 values)."""
    g = x @ _widen(w.gate).T + _widen(w.gate_bias)
    u = x @ _widen(w.up).T + _widen(w.up_bias)
    g = np.minimum(g, glu.limit)
    u = np.clip(u, -glu.limit, glu.limit)
    h = (u + 1) * (g / (1 + np.exp(-glu.alpha * g)))
    return h @ _widen(w.down).T + _widen(w.down_bias)


def _random_expert(rng, H, I):
    return ExpertWeights(*(_bf16(rng.standard_normal(s) * 0.3) for s in
                           ((I, H), (I, H), (H, I), (I,), (I,), (H,))))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,H,I", [(1, 32, 24), (6, 64, 40), (40, 128, 96)])
def test_clamped_expert_ops(backend, T, H, I):
    """``expert_accumulate`` and ``experts_token`` with ``glu`` on every backend here against
    the float64 reference of ``GptOssExperts`` (weights and biases BF16); an expert without
    biases is refused."""
    be = get_backend(backend)
    rng = np.random.default_rng(T * H)
    glu = ClampedSwiGLU(1.702, 0.6)
    x = rng.standard_normal((T, H)).astype(np.float32)
    e = _random_expert(rng, H, I)
    rows = np.arange(0, T, 2, dtype=np.int64)
    w = rng.random(rows.size).astype(np.float32)
    out = rng.standard_normal((T, H)).astype(np.float32)
    want = out.astype(np.float64)
    want[rows] += _expert_ref(x[rows].astype(np.float64), e, glu) * w[:, None]
    d_out, d_x = be.from_host(out), be.from_host(x)
    be.expert_accumulate(d_out, d_x, rows, w, e, glu=glu)
    np.testing.assert_allclose(be.to_host(d_out), want, rtol=0,
                               atol=2e-4 * np.abs(want).max())
    experts = [e, _random_expert(rng, H, I), _random_expert(rng, H, I)]
    ws = rng.random(3).astype(np.float32)
    o1 = be.zeros((1, H))
    be.experts_token(o1[0], d_x[0], experts, ws, glu=glu)
    want1 = sum(wi * _expert_ref(x[:1].astype(np.float64), ei, glu)[0]
                for wi, ei in zip(ws, experts))
    np.testing.assert_allclose(be.to_host(o1)[0], want1, rtol=0,
                               atol=2e-4 * np.abs(want1).max())
    bare = ExpertWeights(e.gate, e.up, e.down)
    with pytest.raises(ValueError, match="no biases"):
        be.expert_accumulate(d_out, d_x, rows, w, bare, glu=glu)
    with pytest.raises(ValueError, match="no biases"):
        be.experts_token(o1[0], d_x[0], [bare], ws[:1], glu=glu)


# -- config rules ---------------------------------------------------------------------------------

def _config(**kw):
    cfg = dict(architectures=["GptOssForCausalLM"], model_type="gpt_oss", vocab_size=256,
               hidden_size=64, num_hidden_layers=4, num_attention_heads=4,
               num_key_value_heads=2, head_dim=16, intermediate_size=48, num_local_experts=8,
               num_experts_per_tok=2)
    cfg.update(kw)
    return {k: v for k, v in cfg.items() if v is not ...}


def test_config_defaults_are_transformers():
    """Absent keys take GptOssConfig's values: YaRN (factor 32 over 4096, theta 150000),
    window 128, sliding and full layers alternating, alpha 1.702 and limit 7; the runtime's
    windows per layer are transformers' attention windows for the same config."""
    import transformers

    cfg = _config()
    hp = get_architecture(cfg).typed_hparams()
    hf = transformers.GptOssConfig(**{k: v for k, v in cfg.items()
                                      if k not in ("architectures", "model_type")})
    assert hp.rope == {**hf.rope_parameters, "rope_theta": 150000.0}
    assert hp.layer_types == hf.layer_types == ["sliding_attention", "full_attention"] * 2
    assert hp.sliding_window == hf.sliding_window == 128
    assert (hp.swiglu_alpha, hp.swiglu_limit) == (hf.swiglu_alpha, hf.swiglu_limit)
    assert [hp.window(i) for i in range(4)] == [128, 0, 128, 0]
    assert hp.norm_topk_prob and hp.attention_bias and not hp.qk_norm


def test_config_rules():
    """A null window is refused beside sliding layers (transformers cannot run them without
    one) and no window with full-attention layers only; given layer_types are kept; values
    gpt-oss cannot run are refused naming the key."""
    with pytest.raises(ConfigError, match="sliding_window: 0 or null is not a window"):
        get_architecture(_config(sliding_window=None)).typed_hparams()
    hp = get_architecture(_config(sliding_window=None, layer_types=["full_attention"] * 4)
                          ).typed_hparams()
    assert [hp.window(i) for i in range(4)] == [0, 0, 0, 0]
    hp = get_architecture(_config(layer_types=["full_attention"] * 3 + ["sliding_attention"],
                                  sliding_window=9)).typed_hparams()
    assert [hp.window(i) for i in range(4)] == [0, 0, 0, 9]
    for bad, needle in ((dict(attention_bias=False), "attention_bias"),
                        (dict(swiglu_limit=-1.0), "swiglu_limit"),
                        (dict(swiglu_alpha="x"), "swiglu_alpha"),
                        (dict(layer_types=["full_attention"]), "layer_types"),
                        (dict(num_local_experts=None), "num_local_experts")):
        with pytest.raises(ConfigError, match=needle):
            get_architecture(_config(**bad)).typed_hparams()


# -- the MXFP4 release ------------------------------------------------------------------------

def test_mxfp4_checkpoint_of_unfit_widths_is_refused(tiny_moe_dir, tmp_path):
    """A checkpoint laid out as the MXFP4 release whose projections' input width is not a
    multiple of 32 (this spec's intermediate_size 48) is refused naming the tensor and the
    shape it would need, by the API and by the CLI (one line, no traceback), and nothing is
    written. (MXFP4 checkpoints that fit convert and run: tests/test_lowprec_gptoss.py.)"""
    from safetensors.torch import load_file, save_file

    from cli_runner import cli
    from zipmoe_rt.convert.converter import ConversionError, convert

    src = tiny_moe_dir("gpt_oss")
    folder = tmp_path / "mxfp4"
    folder.mkdir()
    cfg = json.loads((src / "config.json").read_text())
    cfg["quantization_config"] = {"quant_method": "mxfp4",
                                  "modules_to_not_convert": ["model.layers.*.self_attn"]}
    (folder / "config.json").write_text(json.dumps(cfg))
    tensors = {}
    for name, a in load_file(str(src / "model.safetensors")).items():
        if name.endswith(("experts.gate_up_proj", "experts.down_proj")):
            E, n_in, n_out = a.shape
            tensors[name + "_blocks"] = torch.zeros((E, n_out, n_in // 32, 16), dtype=torch.uint8)
            tensors[name + "_scales"] = torch.full((E, n_out, n_in // 32), 127,
                                                   dtype=torch.uint8)
        else:
            tensors[name] = a
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    out = tmp_path / "m.zmoe"
    with warnings.catch_warnings(), pytest.raises(ConversionError) as e:
        warnings.simplefilter("ignore")
        convert(folder, out, progress=False)
    msg = str(e.value)
    assert "model.layers.0.mlp.experts.down_proj_blocks" in msg and "model.safetensors" in msg
    assert "MXFP4 blocks of a [64, 48] projection are U8 [8, 64, 1, 16]" in msg
    assert not out.exists()
    r = cli("convert", folder, "-o", out)
    assert r.exit_code == 1 and "Traceback" not in r.output
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "MXFP4" in lines[0] and "_blocks" in lines[0]


def test_mxfp4_names_come_from_the_expert_table():
    """Blocks and scales of the expert tensors (the one table the MXFP4 storage maps) must be
    U8; the biases or any other name are not MXFP4 tensors."""
    fam = get_family("gpt_oss")
    for base in ("gate_up_proj", "down_proj"):
        for suffix in ("_blocks", "_scales"):
            name = f"model.layers.11.mlp.experts.{base}{suffix}"
            assert fam.unsupported_tensor(name, "U8") is None
            assert "is BF16: MXFP4 expert blocks and scales are U8" in \
                fam.unsupported_tensor(name, "BF16")
    for name in ("model.layers.0.mlp.experts.gate_up_proj",
                 "model.layers.0.mlp.experts.down_proj_bias",
                 "model.layers.0.mlp.experts.gate_up_proj_bias_blocks",
                 "model.layers.01.mlp.experts.down_proj_blocks",
                 "model.layers.0.self_attn.sinks"):
        assert fam.unsupported_tensor(name, "BF16") is None


# -- plan on the published gpt-oss-20b config -------------------------------------------------

#: openai/gpt-oss-20b's config.json as published on the Hub (the MXFP4 release).
GPT_OSS_20B = {
    "architectures": ["GptOssForCausalLM"], "attention_bias": True, "attention_dropout": 0.0,
    "eos_token_id": 200002, "experts_per_token": 4, "head_dim": 64, "hidden_act": "silu",
    "hidden_size": 2880, "initial_context_length": 4096, "initializer_range": 0.02,
    "intermediate_size": 2880,
    "layer_types": ["sliding_attention", "full_attention"] * 12,
    "max_position_embeddings": 131072, "model_type": "gpt_oss", "num_attention_heads": 64,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
    "num_local_experts": 32, "output_router_logits": False, "pad_token_id": 199999,
    "quantization_config": {"modules_to_not_convert": [
        "model.layers.*.self_attn", "model.layers.*.mlp.router", "model.embed_tokens",
        "lm_head"], "quant_method": "mxfp4"},
    "rms_norm_eps": 1e-05,
    "rope_scaling": {"beta_fast": 32.0, "beta_slow": 1.0, "factor": 32.0,
                     "original_max_position_embeddings": 4096, "rope_type": "yarn",
                     "truncate": False},
    "rope_theta": 150000, "router_aux_loss_coef": 0.9, "sliding_window": 128,
    "swiglu_limit": 7.0, "tie_word_embeddings": False, "transformers_version": "4.55.0.dev0",
    "use_cache": True, "vocab_size": 201088}


def test_plan_gpt_oss_20b(tmp_path):
    """plan's figures for gpt-oss-20b: 20,914,757,184 parameters (the model card's 21B),
    19,116,933,120 of them in the 24 x 32 experts (weights and biases), 3.6B active per token
    (the card's figure: all but the input embedding, with 4 of 32 experts), 2 x 24 x 8 x 64 KV
    values per token; the
    same totals as the tensors transformers creates for this config."""
    from test_plan import _hf_meta_model, write_config
    from zipmoe_rt.plan import size_plan

    p = size_plan(write_config(tmp_path / "m", GPT_OSS_20B))
    H, I, E, L, V = 2880, 2880, 32, 24, 201088
    expert = H * 2 * I + 2 * I + I * H + H
    attn = (H * 64 * 64 + 64 * 64) + 2 * (H * 8 * 64 + 8 * 64) + (64 * 64 * H + H) + 64
    dense = 2 * V * H + H + L * (attn + 2 * H + E * H + E)
    assert p.expert_params == L * E * expert == 19_116_933_120
    assert p.params == dense + L * E * expert == 20_914_757_184
    assert round((dense - V * H + L * 4 * expert) / 1e9, 2) == 3.61
    assert p.kv_values_per_token == 2 * 24 * 8 * 64
    assert p.experts == L * E
    hp = p.hparams
    assert hp.rope["rope_type"] == "yarn" and hp.rope["factor"] == 32.0
    assert [hp.window(i) for i in range(2)] == [128, 0] and hp.num_experts_per_tok == 4
    from zipmoe_rt.plan import format_plan
    assert p.quantized == "mxfp4" and p.as_dict()["quantized"] == "mxfp4"
    text = format_plan(p)       # the MXFP4 line of zipmoe_rt/plan.py after the BF16 figures
    assert "MXFP4 source" in text and "stored at ~95.1 %" in text and "BF16 copy" in text
    bf16 = size_plan(write_config(tmp_path / "b", {k: v for k, v in GPT_OSS_20B.items()
                                                   if k != "quantization_config"}))
    assert bf16.quantized is None and "MXFP4" not in format_plan(bf16)
    hf = _hf_meta_model({k: v for k, v in GPT_OSS_20B.items() if k != "quantization_config"})
    total = sum(t.numel() for t in hf.parameters())
    assert p.params == total
    assert p.expert_params == sum(t.numel() for n, t in hf.named_parameters()
                                  if ".experts." in n)


# -- the chat template (harmony) and the reply splitter ------------------------------------------

def _harmony_template():
    from pypi_data import pypi_files

    root = pypi_files("llama-cpp-python", ["models/templates/openai-gpt-oss-120b.jinja"])
    return (root / "models" / "templates" / "openai-gpt-oss-120b.jinja").read_text("utf-8")


HARMONY_TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city",
    "parameters": {"type": "object", "required": ["city"], "properties": {
        "city": {"type": "string", "description": "The city"}}}}}]
HARMONY_TURNS = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": "", "thinking": "I need the tool.", "tool_calls": [
        {"type": "function", "function": {"name": "get_weather",
                                          "arguments": {"city": "Paris"}}}]},
    {"role": "tool", "content": '{"temperature": 21}'},
    {"role": "assistant", "content": "It is 21 C in Paris.", "thinking": "Done."},
    {"role": "user", "content": "Thanks"}]


@pytest.mark.parametrize("effort", [None, "high"])
def test_harmony_template_renders_as_transformers(effort):
    """gpt-oss's template (llama.cpp's copy of openai/gpt-oss-120b's) renders a conversation
    with a system turn, analysis, a tool call to=functions.NAME, its result and a final answer
    exactly as transformers' apply_chat_template does, with the harmony channels in place."""
    from test_chat_templates_real import _pair

    ours, ref = _pair("openai-gpt-oss-120b", _harmony_template())
    kw = {"tools": HARMONY_TOOLS, **({"reasoning_effort": effort} if effort else {})}
    got = ours.apply_chat_template(HARMONY_TURNS, add_generation_prompt=True, **kw)
    want = ref.apply_chat_template(HARMONY_TURNS, add_generation_prompt=True, tokenize=False,
                                   **kw)
    assert got == want
    assert f"Reasoning: {effort or 'medium'}" in got
    assert ("<|start|>assistant to=functions.get_weather<|channel|>commentary json<|message|>"
            '{"city": "Paris"}<|call|>') in got
    assert "<|start|>functions.get_weather to=assistant<|channel|>commentary<|message|>" in got
    assert "<|start|>assistant<|channel|>final<|message|>It is 21 C in Paris.<|end|>" in got
    assert got.endswith("<|start|>user<|message|>Thanks<|end|><|start|>assistant")
    assert "type get_weather = (_: {" in got


REPLY_CALL = ("<|channel|>analysis<|message|>Need the weather.<|end|>"
              "<|start|>assistant<|channel|>commentary to=functions.get_weather <|constrain|>json"
              '<|message|>{"city": "Paris"}<|call|>')
REPLY_FINAL = ("<|channel|>analysis<|message|>Simple.<|end|><|start|>assistant<|channel|>final"
               "<|message|>Paris is the capital <|of| France.<|return|>")


@pytest.mark.parametrize("step", [1, 3, 7, 1000])
def test_harmony_splitter(step):
    """Streamed in pieces of any size: the final channel is the content (a '<|' inside it is
    text), the analysis the reasoning, a commentary message to=functions.NAME a tool call
    (recipient in the channel header or in the role header); text outside the format is
    content."""
    from zipmoe_rt.server.harmony import HarmonySplitter

    def run(text):
        s = HarmonySplitter()
        out = "".join(s.push(text[i:i + step]) for i in range(0, len(text), step)) + s.flush()
        return out, s.finish()[0], s.reasoning

    content, calls, reasoning = run(REPLY_FINAL)
    assert content == "Paris is the capital <|of| France." and calls == []
    assert reasoning == "Simple."
    for reply in (REPLY_CALL, REPLY_CALL.replace(
            "<|start|>assistant<|channel|>commentary to=functions.get_weather",
            "<|start|>assistant to=functions.get_weather<|channel|>commentary")):
        content, calls, reasoning = run(reply)
        assert content == "" and reasoning == "Need the weather."
        assert [(c["function"]["name"], json.loads(c["function"]["arguments"]))
                for c in calls] == [("get_weather", {"city": "Paris"})]
        assert calls[0]["type"] == "function" and calls[0]["id"].startswith("call_")
    assert run("no channels here")[0] == "no channels here"
    content, _, _ = run("<|channel|>final<|message|>cut off mid-answer")   # max_tokens reached
    assert content == "cut off mid-answer"


@pytest.mark.parametrize("shape,parts", [((1, 2), 2), ((130, 2 * 257), 2), ((300, 129), 1),
                                         ((5, 7), 1)])
def test_transposed_parts_is_the_strided_transpose(shape, parts):
    """The tiled copy equals ``src[:, p::parts].T`` bit for bit on shapes that are not tile
    multiples (NaN payloads included: uint16 bits), C-contiguous; odd splits are refused."""
    from zipmoe_rt.models.weights import transposed_parts

    src = np.random.default_rng(1).integers(0, 1 << 16, shape, dtype=np.uint16)
    out = transposed_parts(src, parts)
    assert out.flags.c_contiguous and out.dtype == np.uint16
    for p in range(parts):
        np.testing.assert_array_equal(out[p], src[:, p::parts].T)
    with pytest.raises(ValueError, match="not"):
        transposed_parts(np.zeros((4, 3), np.uint16), 2)
