"""LFM2-MoE: the short convolution and the router against transformers' modules, the conv
state's cache rules, config rules and errors, and ``plan`` on the published LFM2-8B-A1B config
(prefill in one call against token by token and cache reuse across chat turns:
tests/test_recurrent_cache.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from zipmoe_rt.backends import cuda_unavailable, get_backend
from zipmoe_rt.families import ConfigError, get_architecture, get_family
from zipmoe_rt.generate import CacheState
from zipmoe_rt.models.cache import RecurrentCache
from zipmoe_rt.models.routing import Router, RoutingRule
from zipmoe_rt.models.short_conv import ShortConv

from family_checks import (assert_stored_hparam_refused, check_answered_cold,
                           check_cache_contents, check_chat_session_turns,
                           check_follow_up_reuses_the_state, check_interrupted_forward,
                           check_layer_caches, convert_quietly, serving)
from hf_parity import hf_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.lfm2_moe import modeling_lfm2_moe as hf_lfm2  # noqa: E402

SPECS = ("lfm2_moe", "lfm2_moe_bias", "lfm2_moe_dense2")
PROMPT = np.random.default_rng(1).integers(0, 256, 16)
BACKENDS = ("numba", "numpy")
#: the block tests also run on the CUDA backend where there is one (skipped otherwise)
WHY = cuda_unavailable()
ALL_BACKENDS = BACKENDS + (pytest.param("cuda", marks=pytest.mark.skipif(
    WHY is not None, reason=f"no CUDA backend here: {WHY}")),)


def _hf_config(**kw):
    base = dict(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                num_key_value_heads=2, intermediate_size=48, moe_intermediate_size=16,
                num_experts=8, num_experts_per_tok=3, num_dense_layers=0,
                layer_types=["conv", "full_attention"])
    return transformers.Lfm2MoeConfig(**{**base, **kw})


# -- blocks against transformers' modules ----------------------------------------------------

@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("bias, L", [(False, 3), (True, 4), (True, 1)])
def test_short_conv_matches_transformers(backend, bias, L):
    """:class:`ShortConv` against ``Lfm2MoeShortConv`` (random weights and biases): a prompt
    of 11 tokens in one call, then the same prompt in pieces of 4, 1 and 6 through the conv
    state, equal to transformers' output over the whole prompt."""
    torch.manual_seed(0)
    cfg = _hf_config(conv_bias=bias, conv_L_cache=L)
    hf = hf_lfm2.Lfm2MoeShortConv(cfg, 0).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.copy_(0.3 * torch.randn(p.shape))
        x = torch.randn(1, 11, 32)
        want = hf(x)[0].numpy()
    sd = {k: v.numpy() for k, v in hf.state_dict().items()}
    args = get_family("lfm2_moe").hparams_class(hidden_size=32, conv_l_cache=L, conv_bias=bias,
                                                num_hidden_layers=2, layer_types=["conv"] * 2)
    b = (sd["in_proj.bias"], sd["conv.bias"], sd["out_proj.bias"]) if bias else (None,) * 3
    be = get_backend(backend)
    sc = ShortConv(args, 0, sd["in_proj.weight"], sd["conv.weight"], sd["out_proj.weight"], *b,
                   backend=be)
    xs = x[0].numpy()
    cache = sc.new_cache()
    got = be.to_host(sc(be.from_host(xs), cache, 0))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5)
    cache = sc.new_cache()
    parts = []
    for a, e in ((0, 4), (4, 5), (5, 11)):
        parts.append(be.to_host(sc(be.from_host(np.ascontiguousarray(xs[a:e])), cache, a)))
        cache.commit(e - a)
    np.testing.assert_allclose(np.concatenate(parts), want, rtol=0, atol=2e-5)
    assert cache.conv.shape == (L - 1, 32) and sc.state_values() == (L - 1) * 32
    if bias:        # the biases change the output
        plain = ShortConv(args, 0, sd["in_proj.weight"], sd["conv.weight"],
                          sd["out_proj.weight"], backend=be)
        out = be.to_host(plain(be.from_host(xs), plain.new_cache(), 0))
        assert np.abs(out - want).max() > 1e-2


def test_short_conv_refuses_wrong_shapes():
    args = get_family("lfm2_moe").hparams_class(hidden_size=32, conv_l_cache=3,
                                                num_hidden_layers=2, layer_types=["conv"] * 2)
    w = np.zeros((96, 32), np.float32)
    with pytest.raises(ValueError, match="layer 5: short conv conv has shape"):
        ShortConv(args, 5, w, np.zeros((32, 1, 4), np.float32), np.zeros((32, 32), np.float32))
    with pytest.raises(ValueError, match="in_proj has shape"):
        ShortConv(args, 0, w[:64], np.zeros((32, 1, 3), np.float32),
                  np.zeros((32, 32), np.float32))


@pytest.mark.parametrize("backend", ALL_BACKENDS)
@pytest.mark.parametrize("use_bias, renorm, scale", [(True, True, 1.0), (False, False, 2.5),
                                                     (True, False, 0.7), (False, True, 1.5)])
def test_router_matches_transformers(backend, use_bias, renorm, scale):
    """Our :class:`Router` with LFM2's rule against ``Lfm2MoeTopKRouter``: the same experts
    and weights (sigmoid scores, the choice by scores + ``expert_bias``, the renormalisation
    with ``sum + 1e-6``, the scaling); the bias changes the choice of some tokens."""
    torch.manual_seed(1)
    cfg = _hf_config(use_expert_bias=use_bias, norm_topk_prob=renorm,
                     routed_scaling_factor=scale)
    hf = hf_lfm2.Lfm2MoeTopKRouter(cfg)
    bias = 0.1 * torch.randn(8)
    with torch.no_grad():
        hf.weight.copy_(0.3 * torch.randn(8, 32))
        x = torch.randn(40, 32)
        _, w_want, idx_want = hf(x, bias if use_bias else None)
    rule = RoutingRule(3, renorm, scoring="sigmoid", scale=scale, renorm_eps=1e-6)
    router = Router(hf.weight.detach().numpy(), rule, bias.numpy() if use_bias else None,
                    get_backend(backend))
    be = get_backend(backend)
    _, idx, w = router(be.from_host(x.numpy()))
    assert np.array_equal(np.sort(idx, -1), np.sort(idx_want.numpy(), -1))
    order = np.argsort(idx, -1), np.argsort(idx_want.numpy(), -1)
    np.testing.assert_allclose(np.take_along_axis(w, order[0], -1),
                               np.take_along_axis(w_want.numpy(), order[1], -1),
                               rtol=0, atol=1e-6)
    if renorm:      # LFM2's epsilon: the weights sum to just under scale
        assert np.all(np.abs(w.sum(-1) - scale) < 1e-5) and np.all(w.sum(-1) < scale)
    else:           # sigmoid scores, not renormalised: their sum is far from 1
        assert np.abs(w.sum(-1) / scale - 1).min() > 0.1
    plain = Router(hf.weight.detach().numpy(), rule, None, get_backend(backend))
    assert (not use_bias) == np.array_equal(np.sort(plain(be.from_host(x.numpy()))[1], -1),
                                            np.sort(idx, -1))


# -- cache rules -------------------------------------------------------------------------------

@pytest.mark.parametrize("name", SPECS)
def test_layer_caches_follow_layer_types(pair, name):
    """KV caches only for attention layers, a conv state for the conv layers; the bytes are
    what the family's hyper-parameters say (plan, --memory-limit)."""
    model, _ = pair(name)
    kinds = check_layer_caches(model, "conv")
    assert model.state_values() == model.args.state_values() == (
        kinds.count("conv") * (model.args.conv_l_cache - 1) * model.args.hidden_size)


@pytest.mark.parametrize("name", SPECS)
def test_cache_contents_match_transformers(pair, name):
    """After a prompt, each attention layer holds transformers' values and each conv layer the
    conv state of its cache layer (transformers keeps one more, oldest, input column)."""
    model, hf = pair(name)
    check_cache_contents(model, hf, PROMPT[:7], state=False)


@pytest.mark.parametrize("name", SPECS)
def test_interrupted_forward_leaves_the_state(pair, name):
    """A forward call that fails half way leaves every conv state as it was."""
    model, _ = pair(name)
    check_interrupted_forward(model, PROMPT, lambda lc: (lc.conv,), atol=1e-5)


# -- prefill, decode, chat turns -----------------------------------------------------------------

def test_lfm25_template_turns_and_the_conv_state(pair):
    """LFM2.5's real chat template keeps the reasoning of the last assistant turn only: the
    second turn's prompt extends what the cache holds (first prompt + reply with ``<think>``)
    and reuses all of it; the third re-renders the first reply without its reasoning, so the
    prompt diverges inside it, before any position a conv state can return to, and is
    recomputed from scratch. Every turn's logits are those of a fresh run (and within 1e-3 of
    transformers')."""
    from pypi_data import pypi_files
    from test_api import SPECIALS as TEST_SPECIALS, _tokenizer_json
    from zipmoe_rt.tokenizer import Tokenizer
    root = pypi_files("llama-cpp-python", ["models/templates/*"]) / "models" / "templates"
    template = (root / "LFM2.5-Instruct.jinja").read_text(encoding="utf-8")
    tok = Tokenizer(_tokenizer_json(256), template, bos_token=TEST_SPECIALS[0],
                    eos_token="<|im_end|>")
    model, hf = pair("lfm2_moe")
    state = CacheState.new(model)
    messages = []
    for k, (user, reply, reused) in enumerate((("2+2?", "<think>two and two</think>4.", 0),
                                               ("and 3+3?", "<think>three</think>6.", -1),
                                               ("and 4+4?", None, 0))):
        messages.append({"role": "user", "content": user})
        prompt = tok.encode_chat(messages, add_generation_prompt=True)
        held = len(state.token_ids)
        new = state.sync_prefix(prompt, model)
        want = held if reused < 0 else reused
        assert state.cache.offset == want and new == prompt[want:], k
        logits = model.forward(np.array(new), state.cache, last_only=False)
        state.token_ids.extend(new)
        fresh = model.forward(np.array(prompt), model.new_cache(), last_only=False)
        np.testing.assert_allclose(logits, fresh[want:], rtol=0, atol=1e-5)
        assert np.abs(logits - hf_logits(hf, prompt)[want:]).max() <= 1e-3
        if reply is not None:
            state.cache.mark()                  # what generate does after a prefill
            ids = tok.encode(reply + "<|im_end|>\n", add_special_tokens=False)
            model.forward(np.array(ids), state.cache)
            state.token_ids.extend(ids)
            messages.append({"role": "assistant", "content": reply})


def test_chat_session_turns_equal_fresh_runs(tiny_moe_dir, tmp_path):
    """``ChatSession`` over three turns (its cache reused where the new prompt extends what it
    holds) replies as a fresh ``chat`` over the whole conversation."""
    check_chat_session_turns(tiny_moe_dir("lfm2_moe"), tmp_path)


def test_server_prompt_cache_reuses_only_a_prefix(tiny_moe_dir, tmp_path):
    """The server's prompt-prefix cache over an LFM2-MoE model: a follow-up turn reuses the
    held conv state (cached tokens reported) and answers as a cold run; a prompt that diverges
    from the held tokens before any position the state can return to reuses nothing and
    answers as a cold run."""
    with serving(tiny_moe_dir("lfm2_moe"), tmp_path) as (model, ask):
        check_follow_up_reuses_the_state(model, ask)
        check_answered_cold(model, ask, [{"role": "system", "content": "x"},
                                         {"role": "user", "content": "a dog"}])


# -- config rules --------------------------------------------------------------------------------

def _cfg(**kw):
    base = {"architectures": ["Lfm2MoeForCausalLM"], "model_type": "lfm2_moe",
            "vocab_size": 300, "hidden_size": 64, "num_hidden_layers": 4,
            "num_attention_heads": 4, "num_key_value_heads": 2, "num_experts": 4,
            "num_experts_per_tok": 2, "intermediate_size": 96, "moe_intermediate_size": 32,
            "layer_types": ["conv", "conv", "full_attention", "conv"]}
    base.update(kw)
    return {k: v for k, v in base.items() if v is not None}


@pytest.mark.parametrize("kw, match", [
    (dict(layer_types=None), "layer_types is missing"),
    (dict(layer_types=["conv", "sliding_attention", "conv", "conv"]), "layer_types must list"),
    (dict(layer_types=["conv"] * 3), "layer_types must list"),
    (dict(layer_types="conv"), "layer_types must be a list"),
    (dict(conv_L_cache=0), "conv_L_cache: .0. is not an integer"),
    (dict(conv_L_cache="3"), "conv_L_cache must be an integer"),
    (dict(num_dense_layers=-1), "num_dense_layers"),
    (dict(use_expert_bias="yes"), "use_expert_bias must be true or false"),
    (dict(routed_scaling_factor=float("inf")), "routed_scaling_factor"),
    (dict(moe_intermediate_size=None), "moe_intermediate_size"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        get_architecture(_cfg(**kw)).typed_hparams()


def test_config_defaults_when_keys_are_absent():
    """Absent keys take ``Lfm2MoeConfig``'s defaults and are stored resolved; ``norm_eps``,
    ``conv_L_cache`` and ``tie_embedding`` (over ``tie_word_embeddings``, as
    ``Lfm2MoeConfig.__post_init__`` reads it) are read under their own names."""
    hp = get_architecture(_cfg()).hparams()
    want = transformers.Lfm2MoeConfig(layer_types=_cfg()["layer_types"], num_hidden_layers=4)
    assert hp["rms_norm_eps"] == want.norm_eps == 1e-5
    assert hp["conv_l_cache"] == want.conv_L_cache == 3
    assert hp["num_dense_layers"] == want.num_dense_layers == 2 and hp["moe_layers"] == [2, 3]
    assert hp["use_expert_bias"] is want.use_expert_bias is True
    assert hp["routed_scaling_factor"] == want.routed_scaling_factor == 1.0
    assert hp["tie_word_embeddings"] is want.tie_word_embeddings is True
    assert hp["rope"]["rope_theta"] == want.rope_parameters["rope_theta"] == 1e6
    assert hp["conv_bias"] is False and hp["norm_topk_prob"] is True and hp["qk_norm"] is True
    got = get_architecture(_cfg(norm_eps=1e-6, conv_L_cache=4, tie_embedding=False,
                                tie_word_embeddings=True)).hparams()
    tied = transformers.Lfm2MoeConfig(tie_embedding=False, tie_word_embeddings=True)
    assert got["rms_norm_eps"] == 1e-6 and got["conv_l_cache"] == 4
    assert got["tie_word_embeddings"] is tied.tie_word_embeddings is False


def test_conv_layers_have_no_attention_tensors():
    fam = get_family("lfm2_moe")
    hp = get_architecture(_cfg(conv_bias=True, num_dense_layers=1)).typed_hparams()
    names = {s.name for s in fam.tensor_specs(hp)}
    assert "model.layers.0.conv.in_proj.bias" in names
    assert "model.layers.2.self_attn.q_layernorm.weight" in names
    assert not any(n.startswith("model.layers.2.conv.") for n in names)
    assert not any(n.startswith("model.layers.0.self_attn.") for n in names)
    assert "model.layers.0.feed_forward.w1.weight" in names
    assert "model.layers.1.feed_forward.expert_bias" in names
    hp = get_architecture(_cfg(use_expert_bias=False)).typed_hparams()
    assert not any(s.name.endswith("expert_bias") for s in fam.tensor_specs(hp))


# -- plan on the published config --------------------------------------------------------------

#: config.json of LiquidAI/LFM2-8B-A1B as published on the Hub.
LFM2_8B_A1B = {
    "architectures": ["Lfm2MoeForCausalLM"], "bos_token_id": 1, "conv_L_cache": 3,
    "conv_bias": False, "dtype": "bfloat16", "eos_token_id": 7, "hidden_size": 2048,
    "initializer_range": 0.02, "intermediate_size": 7168,
    "layer_types": ["conv", "conv", "full_attention", "conv", "conv", "conv",
                    "full_attention", "conv", "conv", "conv", "full_attention", "conv",
                    "conv", "conv", "full_attention", "conv", "conv", "conv",
                    "full_attention", "conv", "conv", "full_attention", "conv", "conv"],
    "max_position_embeddings": 128000, "model_type": "lfm2_moe",
    "moe_intermediate_size": 1792, "norm_eps": 1e-05, "norm_topk_prob": True,
    "num_attention_heads": 32, "num_dense_layers": 2, "num_experts": 32,
    "num_experts_per_tok": 4, "num_hidden_layers": 24, "num_key_value_heads": 8,
    "pad_token_id": 0, "rope_theta": 1000000.0, "routed_scaling_factor": 1.0,
    "tie_embedding": True, "transformers_version": "4.57.0.dev0", "use_cache": True,
    "use_expert_bias": True, "vocab_size": 65536}


def test_plan_published(tmp_path):
    """``plan`` on LFM2-8B-A1B: parameters as transformers creates them (8.3B, 22 x 32 experts;
    the tied head counted once); the KV cache of the 6 attention layers only (2 x 8 kv heads x
    64 per layer and token); the conv state of the 18 conv layers (2 x 2048 values each),
    float32, in the cache's copies; ``--memory-limit``'s KV figure holds it."""
    from zipmoe_rt.engine.memparts import kv_bytes, state_bytes
    from zipmoe_rt.plan import format_plan, size_plan
    (tmp_path / "config.json").write_text(json.dumps(LFM2_8B_A1B))
    p = size_plan(tmp_path)
    kw = {k: v for k, v in LFM2_8B_A1B.items() if k not in ("architectures", "model_type")}
    with torch.device("meta"):
        hf = transformers.Lfm2MoeForCausalLM(transformers.Lfm2MoeConfig(**kw))
    params = dict(hf.named_parameters())        # the tied head listed once
    bias = sum(t.numel() for n, t in hf.named_buffers() if n.endswith("expert_bias"))
    assert bias == 22 * 32      # a buffer in transformers, a stored tensor of the checkpoint
    assert p.params == sum(t.numel() for t in params.values()) + bias
    assert p.expert_params == sum(t.numel() for n, t in params.items() if ".experts." in n)
    assert round(p.params / 1e8) == 83 and p.experts == 22 * 32
    hp = p.hparams
    assert len(hp.linear_layers()) == 18 and hp.moe_layers == list(range(2, 24))
    assert p.kv_values_per_token == 6 * 2 * 8 * 64 and p.kv_bytes_per_token == 4 * 6144
    assert p.state_values == 18 * 2 * 2048
    assert p.state_bytes == RecurrentCache.COPIES * 4 * 18 * 2 * 2048
    assert "the conv state of 18 short-convolution layers (73,728 values" in format_plan(p)
    typed = get_family("lfm2_moe").hparams_class.from_hparams(
        get_architecture(LFM2_8B_A1B).hparams())
    assert state_bytes(typed) == p.state_bytes
    assert kv_bytes(typed.to_hparams(), 256) - p.state_bytes >= 256 * p.kv_bytes_per_token


# -- a container whose metadata lies -----------------------------------------------------------

@pytest.fixture(scope="module")
def lfm2_zmoe(tiny_moe_dir, tmp_path_factory):
    return convert_quietly(tiny_moe_dir("lfm2_moe_bias"),
                           tmp_path_factory.mktemp("lfm2") / "l.zmoe")


@pytest.mark.parametrize("key, value, needles", [
    ("conv_l_cache", 3, ["conv.conv.weight", "conv_l_cache"]),
    ("conv_l_cache", 0, ["conv_l_cache"]),
    ("num_dense_layers", 1, ["feed_forward.w1.weight"]),
    ("use_expert_bias", "yes", ["use_expert_bias"]),
    ("layer_types", ["conv"] * 4, ["conv.", "imply for layer 0"]),
    ("layer_types", ["conv", "linear_attention"] * 2, ["layer_types"]),
])
def test_stored_hparams_lying_are_refused_at_load(lfm2_zmoe, tmp_path, key, value, needles):
    """Stored conv sizes, dense layers or layer kinds that the stored tensors contradict, or
    that the model cannot run, are refused when the file is opened, naming the file and the
    field or tensor."""
    assert_stored_hparam_refused(lfm2_zmoe, tmp_path / "bad.zmoe", key, value, needles)
