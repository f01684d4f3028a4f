"""LFM2-MoE against transformers (``models/lfm2_moe/modeling_lfm2_moe.py``) on the tiny specs
``lfm2_moe`` / ``lfm2_moe_bias``: the short convolution op on both CPU backends against torch's
causal conv1d, prefill in one call against token by token, a multi-turn conversation reusing
the cache against a fresh run, the router per layer, what the cache holds per token, the config
rules, and ``plan`` on the published LFM2-8B-A1B config. (Logits, greedy decoding, export and
budgeted runs are covered for every spec by the parametrised tests.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zipmoe_rt.backends import get_backend  # noqa: E402
from zipmoe_rt.families import ConfigError, get_architecture  # noqa: E402
from zipmoe_rt.families.lfm2_moe import Lfm2MoeHParams  # noqa: E402

from hf_parity import hf_logits, model_pair  # noqa: E402

PROMPT = np.random.default_rng(6).integers(0, 256, 16)
TOL = 1e-3

#: LiquidAI/LFM2-8B-A1B's config.json (published values)
LFM2_8B_A1B = {
    "architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe", "vocab_size": 65536,
    "hidden_size": 2048, "intermediate_size": 7168, "moe_intermediate_size": 1792,
    "num_hidden_layers": 24, "num_attention_heads": 32, "num_key_value_heads": 8,
    "max_position_embeddings": 128000, "norm_eps": 1e-05, "conv_bias": False, "conv_L_cache": 3,
    "rope_theta": 1000000.0, "num_dense_layers": 2, "num_experts": 32,
    "num_experts_per_tok": 4, "norm_topk_prob": True, "use_expert_bias": True,
    "routed_scaling_factor": 1.0, "bos_token_id": 1, "eos_token_id": 7, "pad_token_id": 0,
    "layer_types": ["full_attention" if i in (2, 6, 10, 14, 18, 21) else "conv"
                    for i in range(24)]}


@pytest.fixture(scope="module")
def pair(tiny_moe_dir):
    """name -> (our model on the checkpoint, transformers' model in float32)."""
    return model_pair(tiny_moe_dir)


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("L,bias", [(3, False), (4, True)])
def test_short_conv_op_matches_torch(backend, L, bias):
    """short_conv over a prompt in pieces (the history before each piece from the cache rows,
    zeros before position 0) is ``C * conv1d(B * x)`` of the whole prompt with causal padding."""
    be = get_backend(backend)
    rng = np.random.default_rng(L)
    T, H = 11, 24
    bcx = rng.standard_normal((T, 3 * H)).astype(np.float32)
    w = rng.standard_normal((H, L)).astype(np.float32)
    b = rng.standard_normal(H).astype(np.float32) if bias else None
    B, C, x = (torch.from_numpy(bcx[:, k * H:(k + 1) * H]).T[None] for k in range(3))
    conv = torch.nn.functional.conv1d(B * x, torch.from_numpy(w)[:, None], None if b is None
                                      else torch.from_numpy(b), padding=L - 1, groups=H)[..., :T]
    want = (C * conv)[0].T.numpy()
    hist = np.zeros((T, H), np.float32)
    got = np.concatenate([be.short_conv(bcx[a:c], w, b, hist, a)
                          for a, c in ((0, 1), (1, 5), (5, 6), (6, 11))])
    np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-5)
    np.testing.assert_array_equal(hist, bcx[:, :H] * bcx[:, 2 * H:])
    with pytest.raises(ValueError, match="short_conv"):
        be.short_conv(bcx, w, b, np.zeros((5, H), np.float32), 0)


@pytest.mark.parametrize("name", ["lfm2_moe", "lfm2_moe_bias"])
def test_prefill_token_by_token_and_chat_reuse(pair, name):
    """Prefill in one call equals prefill token by token; a second turn on the same cache, and
    one after cropping back to the first turn, equal fresh runs over the whole conversation and
    transformers'."""
    net, hf = pair(name)
    one = net.forward(PROMPT, net.new_cache(), last_only=False)
    cache = net.new_cache(capacity=2)
    steps = np.stack([net.forward(PROMPT[t:t + 1], cache) for t in range(len(PROMPT))])
    np.testing.assert_allclose(steps, one, rtol=0, atol=1e-5)
    turn2 = np.array([5, 77, 130, 9, 201])
    got = net.forward(turn2, cache, last_only=False)
    full = np.concatenate([PROMPT, turn2])
    np.testing.assert_allclose(got, net.forward(full, net.new_cache(), last_only=False)[16:],
                               rtol=0, atol=1e-5)
    np.testing.assert_allclose(got, hf_logits(hf, full)[16:], atol=TOL)
    cache.crop(16)
    other = np.array([33, 3, 250])
    again = net.forward(other, cache, last_only=False)
    np.testing.assert_allclose(again, hf_logits(hf, np.concatenate([PROMPT, other]))[16:],
                               atol=TOL)


@pytest.mark.parametrize("name", ["lfm2_moe", "lfm2_moe_bias"])
def test_router_matches_transformers(pair, name):
    """Each sparse layer picks Lfm2MoeTopKRouter's experts (sigmoid scores, the F32 expert bias
    for the choice) with its weights (renormalised or not, scaled)."""
    net, hf = pair(name)
    x = np.random.default_rng(3).standard_normal((12, net.args.hidden_size)).astype(np.float32)
    for i in net.args.moe_layers:
        _, idx, w = net.layers[i].mlp.route(x)
        ff = hf.model.layers[i].feed_forward
        with torch.no_grad():
            _, tw, ti = ff.gate(torch.from_numpy(x), ff.expert_bias if ff.use_expert_bias
                                else None)
        o, to = np.argsort(idx, 1), np.argsort(ti.numpy(), 1)
        assert np.array_equal(np.take_along_axis(idx, o, 1), np.take_along_axis(ti.numpy(), to, 1))
        np.testing.assert_allclose(np.take_along_axis(w, o, 1),
                                   np.take_along_axis(tw.numpy(), to, 1), atol=1e-5)
    if name == "lfm2_moe":      # the bias is random and moves some choices
        ff = hf.model.layers[1].feed_forward
        assert ff.expert_bias.dtype == torch.float32 and ff.expert_bias.abs().max() > 0.05


def test_cache_holds_kv_values_per_token(pair):
    """The conv layers' caches hold hidden_size values per token, the attention layers' a key
    and a value per kv head: kv_values_per_token() in all."""
    net, _ = pair("lfm2_moe")
    cache = net.new_cache()
    net.forward(PROMPT[:7], cache)
    held = 0
    for lc in cache.layers:
        held += lc.kv[:lc.length].size if hasattr(lc, "kv") else (
            lc.k[:, :lc.length].size + lc.v[:, :lc.length].size)
    assert held == 7 * net.args.kv_values_per_token() == 7 * (3 * 64 + 2 * 2 * 16)


def _cfg(**kw):
    cfg = dict(LFM2_8B_A1B, **kw)
    return {k: v for k, v in cfg.items() if v is not ...}


def test_defaults_are_transformers_defaults():
    """Lfm2MoeConfig()'s defaults, with layer_types given, read back as the dataclass
    defaults."""
    types = ["conv", "full_attention"] * 16
    cfg = transformers.Lfm2MoeConfig(layer_types=types)
    d = dict(json.loads(cfg.to_json_string(use_diff=False)),
             architectures=["Lfm2MoeForCausalLM"])
    got = get_architecture(d).typed_hparams().to_hparams()
    want = Lfm2MoeHParams(architecture="Lfm2MoeForCausalLM", family="lfm2_moe",
                          conv_layers=list(range(0, 32, 2)),
                          moe_layers=list(range(2, 32))).to_hparams()
    assert got == want


@pytest.mark.parametrize("key,value,needle", [
    ("layer_types", ..., "layer_types must give one of conv, full_attention"),
    ("layer_types", ["conv", "sliding_attention"] * 12, "layer_types must give"),
    ("conv_L_cache", 1, "conv_L_cache\\): '1' is not in 2..64"),
    ("routed_scaling_factor", float("nan"), "routed_scaling_factor"),
])
def test_config_refusals_name_the_field(key, value, needle):
    with pytest.raises(ConfigError, match=needle):
        get_architecture(_cfg(**{key: value})).typed_hparams()


def test_plan_published_8b_a1b(tmp_path):
    """``plan`` on LFM2-8B-A1B's config.json: the parameters transformers creates for it (tied
    head once, the expert biases), 22 x 32 experts of 3 x 1792 x 2048 weights, and per token 6
    attention layers' keys and values plus 18 conv layers' inputs."""
    from zipmoe_rt.plan import size_plan

    (tmp_path / "config.json").write_text(json.dumps(LFM2_8B_A1B))
    p = size_plan(tmp_path)
    kw = {k: v for k, v in LFM2_8B_A1B.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        hf = transformers.Lfm2MoeForCausalLM(transformers.Lfm2MoeConfig(**kw))
    params = dict(hf.named_parameters())
    saved = hf.state_dict()
    params.update((n, b) for n, b in hf.named_buffers() if n in saved)
    total = sum(t.numel() for t in params.values())
    experts = sum(t.numel() for n, t in params.items() if ".experts." in n)
    assert p.params == total
    assert p.expert_params == experts == 22 * 32 * 3 * 1792 * 2048
    assert p.experts == 22 * 32
    assert p.kv_values_per_token == 6 * 2 * 8 * 64 + 18 * 2048
