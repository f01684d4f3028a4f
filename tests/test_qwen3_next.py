"""Qwen3-Next / Qwen3.5-MoE: the Gated DeltaNet ops against transformers' eager fallbacks, the
recurrent cache's rules, the text model of the ConditionalGeneration checkpoint, config
errors, and ``plan`` on the published configs (prefill in one call against token by token and
cache reuse across chat turns: tests/test_recurrent_cache.py)."""
from __future__ import annotations

import json

import numpy as np
import pytest

from zipmoe_rt.backends import get_backend
from zipmoe_rt.families import ConfigError, get_architecture, get_family
from zipmoe_rt.models import build_model
from zipmoe_rt.models.cache import RecurrentCache
from zipmoe_rt.models.linear_attention import split_qkvz
from zipmoe_rt.models.weights import CheckpointSource

from family_checks import (assert_stored_hparam_refused, check_answered_cold,
                           check_cache_contents, check_chat_session_turns,
                           check_follow_up_reuses_the_state, check_interrupted_forward,
                           check_layer_caches, convert_quietly, serving)
from hf_parity import hf_logits

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")
from transformers.models.qwen3_next import modeling_qwen3_next as hf_next  # noqa: E402

SPECS = ("qwen3_next", "qwen3_next_dense_bias", "qwen3_5_moe", "qwen3_5_moe_vl")
PROMPT = np.random.default_rng(1).integers(0, 256, 16)
BACKENDS = ("numba", "numpy")


# -- ops against transformers ----------------------------------------------------------------

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 3, 64, 70, 150])
@pytest.mark.parametrize("heads", [(2, 4, 16, 8), (3, 3, 8, 16)])
def test_gated_delta_rule_matches_transformers(backend, T, heads):
    """Chunked scan (several tokens) and recurrence (one) against
    ``torch_chunk_gated_delta_rule`` / ``torch_recurrent_gated_delta_rule`` from a non-zero
    state: outputs and the final state."""
    nk, nv, dk, dv = heads
    rng = np.random.default_rng(T)
    qkv = rng.standard_normal((T, 2 * nk * dk + nv * dv)).astype(np.float32)
    ba = rng.standard_normal((T, 2 * nv)).astype(np.float32)
    A_log = np.log(rng.uniform(0.01, 16, nv)).astype(np.float32)
    dt = rng.standard_normal(nv).astype(np.float32)
    st = (0.3 * rng.standard_normal((nv, dk, dv))).astype(np.float32)
    q = torch.tensor(qkv[:, :nk * dk]).reshape(1, T, nk, dk)
    k = torch.tensor(qkv[:, nk * dk:2 * nk * dk]).reshape(1, T, nk, dk)
    v = torch.tensor(qkv[:, 2 * nk * dk:]).reshape(1, T, nv, dv)
    b, a = torch.tensor(ba[:, :nv])[None], torch.tensor(ba[:, nv:])[None]
    g = -torch.tensor(A_log).exp() * torch.nn.functional.softplus(a + torch.tensor(dt))
    fn = hf_next.torch_recurrent_gated_delta_rule if T == 1 else \
        hf_next.torch_chunk_gated_delta_rule
    o, s = fn(q, k, v, g=g, beta=b.sigmoid(), initial_state=torch.tensor(st)[None],
              output_final_state=True, use_qk_l2norm_in_kernel=True)
    be = get_backend(backend)
    new = np.full_like(st, np.nan)
    out = be.gated_delta_rule(qkv, ba, A_log, dt, nk, nv, dk, dv, st, new)
    assert out.shape == (T, nv * dv) and out.dtype == np.float32
    np.testing.assert_allclose(out, o[0].reshape(T, -1).numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(new, s[0].numpy(), rtol=0, atol=2e-6)
    assert np.abs(new - st).max() > 0.01          # the state moved
    with pytest.raises(ValueError, match="qkv"):
        be.gated_delta_rule(qkv[:, 1:], ba, A_log, dt, nk, nv, dk, dv, st, new)
    with pytest.raises(ValueError, match="state"):
        be.gated_delta_rule(qkv, ba, A_log, dt, nk, nv, dk, dv, st[:, 1:], new)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T", [1, 2, 9])
def test_conv1d_and_gated_norm_match_transformers(backend, T):
    """``causal_conv1d_update`` (state carried, SiLU) and ``Qwen3NextRMSNormGated``."""
    rng = np.random.default_rng(T)
    C, K = 12, 4
    x = rng.standard_normal((T, C)).astype(np.float32)
    w = rng.standard_normal((C, K)).astype(np.float32)
    st = rng.standard_normal((K - 1, C)).astype(np.float32)
    ref_state = torch.tensor(np.concatenate([np.zeros((1, C), np.float32), st]).T[None].copy())
    from transformers.models.mamba.modeling_mamba import causal_conv1d_update
    ref = causal_conv1d_update(torch.tensor(x.T[None].copy()), ref_state, torch.tensor(w),
                               activation="silu")[0].T.numpy()
    be = get_backend(backend)
    new = np.empty_like(st)
    np.testing.assert_allclose(be.conv1d_silu(x, w, st, new), ref, rtol=0, atol=1e-6)
    np.testing.assert_array_equal(new, ref_state[0, :, 1:].T.numpy())
    z = rng.standard_normal((T, 8)).astype(np.float32)
    h = rng.standard_normal((T, 8)).astype(np.float32)
    nw = (1 + 0.3 * rng.standard_normal(8)).astype(np.float32)
    norm = hf_next.Qwen3NextRMSNormGated(8, eps=1e-6)
    with torch.no_grad():
        norm.weight.copy_(torch.tensor(nw))
        want = norm(torch.tensor(h), torch.tensor(z)).numpy()
    np.testing.assert_allclose(be.rmsnorm_gated(h, nw, z, 1e-6), want, rtol=0, atol=1e-6)
    y = rng.standard_normal((T, 8)).astype(np.float32)
    want = y * torch.sigmoid(torch.tensor(z)).numpy()
    np.testing.assert_allclose(be.sigmoid_mul_(y.copy(), z), want, rtol=0, atol=3e-7)


def test_split_qkvz_is_transformers_ordering():
    """Qwen3-Next's fused rows reordered as ``fix_query_key_value_ordering`` splits them."""
    cfg = transformers.Qwen3NextConfig(hidden_size=8, linear_num_key_heads=2,
                                       linear_num_value_heads=6, linear_key_head_dim=4,
                                       linear_value_head_dim=3, num_hidden_layers=1)
    net = hf_next.Qwen3NextGatedDeltaNet(cfg, 0)
    x = torch.randn(1, 5, 8)
    with torch.no_grad():
        q, k, v, z, b, a = net.fix_query_key_value_ordering(net.in_proj_qkvz(x),
                                                            net.in_proj_ba(x))
    wqkv, wz, wba = split_qkvz(net.in_proj_qkvz.weight.detach().numpy(),
                               net.in_proj_ba.weight.detach().numpy(), 2, 6, 4, 3)
    xs = x[0].numpy()
    want = np.concatenate([q.reshape(5, -1), k.reshape(5, -1), v.reshape(5, -1)], axis=1)
    np.testing.assert_allclose(xs @ wqkv.T, want, atol=1e-6)
    np.testing.assert_allclose(xs @ wz.T, z.reshape(5, -1), atol=1e-6)
    np.testing.assert_allclose(xs @ wba.T, torch.cat([b[0], a[0]], -1), atol=1e-6)
    with pytest.raises(ValueError, match="in_proj_qkvz"):
        split_qkvz(wqkv, wba, 2, 6, 4, 3)


# -- the recurrent cache -----------------------------------------------------------------------

def test_recurrent_cache_rules():
    c = RecurrentCache((3, 5), (2, 4, 4))
    assert c.nbytes == RecurrentCache.COPIES * 4 * (15 + 32) and c.crop_points() == [0]
    with pytest.raises(ValueError, match="no state was written"):
        c.commit(2)

    def step(n, value):
        conv, state = c.pending()
        conv[...] = value
        state[...] = value + 1
        assert not (c.state == value + 1).all()       # pending until commit
        c.commit(n)
    step(2, 1.0)
    assert c.length == 2 and (c.conv == 1).all() and (c.state == 2).all()
    assert c.can_crop(2) and c.can_crop(0) and not c.can_crop(1)
    with pytest.raises(ValueError, match="kept whole, reset to 0 or returned to its mark"):
        c.crop(1)
    c.mark()
    step(3, 5.0)
    assert c.crop_points() == [0, 2, 5] and not c.can_crop(4)
    c.crop(2)                           # back to the mark: its copy
    assert c.length == 2 and (c.conv == 1).all() and (c.state == 2).all()
    c.crop(2)
    assert c.length == 2 and (c.state == 2).all()
    c.crop(0)
    assert c.length == 0 and not c.state.any() and not c.conv.any() and c.crop_points() == [0]


@pytest.mark.parametrize("name", SPECS)
def test_layer_caches_follow_layer_types(pair, name):
    """KV caches only for full-attention layers, recurrent state for the linear ones; the
    bytes are what the family's hyper-parameters say."""
    model, _ = pair(name)
    check_layer_caches(model, "linear_attention")
    assert model.state_values() == model.args.state_values()


@pytest.mark.parametrize("name", SPECS)
def test_interrupted_forward_leaves_the_state(pair, name):
    """A forward call that fails half way leaves every layer's committed state as it was."""
    model, _ = pair(name)
    check_interrupted_forward(model, PROMPT, lambda lc: (lc.conv, lc.state), atol=1e-4)


# -- prefill, decode, chat turns -----------------------------------------------------------------

def test_model_cache_crop_is_all_or_nothing(pair):
    model, _ = pair("qwen3_next")
    cache = model.new_cache()
    model.forward(PROMPT, cache)
    kv = [lc.length for lc in cache.layers]
    with pytest.raises(ValueError, match="cannot crop"):
        cache.crop(8)
    assert cache.offset == 16 and [lc.length for lc in cache.layers] == kv
    cache.crop(0)
    assert cache.offset == 0 and all(lc.length == 0 for lc in cache.layers)
    np.testing.assert_array_equal(model.forward(PROMPT, cache),
                                  model.forward(PROMPT, model.new_cache()))


def test_zero_centred_norms_matter(tiny_moe_dir, pair):
    """The residual and q/k norms apply ``1 + w``: read as plain RMSNorm weights the logits
    move far outside the parity bar."""
    from zipmoe_rt.models import qwen3_next as mod
    from zipmoe_rt.models.model import Model, Norm
    model, hf = pair("qwen3_next")
    ref = hf_logits(hf, PROMPT)

    class Plain(mod.Model):
        def build_norm(self, key, layer=None):
            return Model.build_norm(self, key, layer)
    plain = Plain(CheckpointSource(tiny_moe_dir("qwen3_next")))
    assert isinstance(plain.final_norm, Norm)
    assert np.abs(plain.forward(PROMPT, plain.new_cache(), last_only=False) - ref).max() > 0.1


# -- the ConditionalGeneration checkpoint: its text model ------------------------------------

def test_conditional_generation_text_model(tiny_moe_dir, tmp_path):
    """The ConditionalGeneration checkpoint converts (the text model runs from
    ``model.language_model.*`` and ``lm_head``; the vision tower's tensors are listed as
    unused and kept as stored) and runs as transformers' text model; export gives every tensor
    of the checkpoint back byte for byte."""
    from zipmoe_rt.convert.converter import ConversionWarning, convert
    from zipmoe_rt.convert.export import export
    from zipmoe_rt.engine.store import ZmoeSource
    from safetensors.torch import load_file
    src = tiny_moe_dir("qwen3_5_moe_vl")
    cfg = json.loads((src / "config.json").read_text())
    fam = get_architecture(cfg)
    assert fam.family == "qwen3_5_moe_vl" and fam.typed_hparams().hidden_size == 64
    with pytest.warns(ConversionWarning, match="model.visual"):
        out = convert(src, tmp_path / "vl.zmoe", progress=False)
    hf = transformers.AutoModelForCausalLM.from_pretrained(
        src, dtype=torch.float32, attn_implementation="eager").eval()
    assert type(hf).__name__ == "Qwen3_5MoeForCausalLM"
    ref = hf_logits(hf, PROMPT)
    source = ZmoeSource(out)
    try:
        m = build_model(source)
        assert np.abs(m.forward(PROMPT, m.new_cache(), last_only=False) - ref).max() <= 1e-3
    finally:
        source.close()
    exp = export(out, tmp_path / "exp")
    got = {}
    for f in sorted(exp.glob("*.safetensors")) if exp.is_dir() else [exp]:
        got.update(load_file(f))
    want = load_file(src / "model.safetensors")
    assert any(n.startswith("model.visual.") for n in want) and set(got) == set(want)
    for n in want:
        assert got[n].dtype == want[n].dtype and got[n].shape == want[n].shape, n
        assert torch.equal(got[n].view(torch.uint8), want[n].view(torch.uint8)), n


# -- config.json -----------------------------------------------------------------------------

def _cfg(**kw):
    from tiny_models import SPECS as TINY
    cfg = transformers.Qwen3NextConfig(**TINY["qwen3_next"][1]).to_dict()
    cfg["architectures"] = ["Qwen3NextForCausalLM"]
    cfg.update(kw)
    return {k: v for k, v in cfg.items() if v is not None or k in kw}


@pytest.mark.parametrize("kw, match", [
    (dict(layer_types=["linear_attention", "sliding_attention", "linear_attention",
                       "full_attention"]), "layer_types"),
    (dict(layer_types=["full_attention"]), "layer_types"),
    (dict(layer_types=None, full_attention_interval=0), "full_attention_interval"),
    (dict(linear_num_value_heads=3), "linear_num_value_heads"),
    (dict(linear_key_head_dim=0), "linear_key_head_dim"),
    (dict(linear_conv_kernel_dim="4"), "linear_conv_kernel_dim"),
    (dict(partial_rotary_factor="x", rope_parameters=None), "partial_rotary_factor"),
])
def test_config_errors_name_the_field(kw, match):
    with pytest.raises(ConfigError, match=match):
        get_architecture(_cfg(**kw)).typed_hparams()


def test_config_defaults_when_keys_are_absent():
    """Absent keys take ``Qwen3NextConfig``'s defaults (layer_types from
    full_attention_interval 4, partial rotary 0.25) and are stored resolved."""
    cfg = {"architectures": ["Qwen3NextForCausalLM"], "vocab_size": 300, "hidden_size": 64,
           "num_hidden_layers": 8, "num_attention_heads": 4, "num_experts": 4,
           "num_experts_per_tok": 2, "intermediate_size": 96, "moe_intermediate_size": 32}
    hp = get_architecture(cfg).hparams()
    assert hp["layer_types"] == transformers.Qwen3NextConfig(num_hidden_layers=8).layer_types
    assert hp["rope"]["partial_rotary_factor"] == 0.25 and hp["head_dim"] == 256
    assert hp["linear_num_value_heads"] == 32 and hp["norm_topk_prob"] is True


# -- plan on the published configs -----------------------------------------------------------

#: config.json of Qwen/Qwen3-Next-80B-A3B-Instruct as published on the Hub (every field).
QWEN3_NEXT_80B = {
    "architectures": ["Qwen3NextForCausalLM"], "attention_bias": False,
    "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
    "eos_token_id": 151645, "full_attention_interval": 4, "head_dim": 256,
    "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
    "intermediate_size": 5120, "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128,
    "linear_num_key_heads": 16, "linear_num_value_heads": 32, "linear_value_head_dim": 128,
    "max_position_embeddings": 262144, "mlp_only_layers": [], "model_type": "qwen3_next",
    "moe_intermediate_size": 512, "norm_topk_prob": True, "num_attention_heads": 16,
    "num_experts": 512, "num_experts_per_tok": 10, "num_hidden_layers": 48,
    "num_key_value_heads": 2, "output_router_logits": False, "partial_rotary_factor": 0.25,
    "rms_norm_eps": 1e-06, "rope_scaling": None, "rope_theta": 10000000,
    "router_aux_loss_coef": 0.001, "shared_expert_intermediate_size": 512,
    "tie_word_embeddings": False, "torch_dtype": "bfloat16",
    "transformers_version": "4.57.0.dev0", "use_cache": True, "use_sliding_window": False,
    "vocab_size": 151936}

#: config.json of Qwen/Qwen3.5-35B-A3B as published on the Hub: ``text_config`` with every
#: field; the vision tower's config abbreviated to its sizes (it is not converted).
QWEN35_35B = {
    "architectures": ["Qwen3_5MoeForConditionalGeneration"], "model_type": "qwen3_5_moe",
    "image_token_id": 248056, "video_token_id": 248057, "vision_start_token_id": 248053,
    "vision_end_token_id": 248054, "tie_word_embeddings": False,
    "transformers_version": "4.57.0.dev0",
    "text_config": {
        "model_type": "qwen3_5_moe_text", "attention_bias": False, "attention_dropout": 0.0,
        "attn_output_gate": True, "bos_token_id": 248044, "eos_token_id": 248044,
        "dtype": "bfloat16", "full_attention_interval": 4, "head_dim": 256,
        "hidden_act": "silu", "hidden_size": 2048, "initializer_range": 0.02,
        "layer_types": ["linear_attention"] * 3 + ["full_attention"],
        "linear_conv_kernel_dim": 4, "linear_key_head_dim": 128, "linear_num_key_heads": 16,
        "linear_num_value_heads": 32, "linear_value_head_dim": 128,
        "max_position_embeddings": 262144, "moe_intermediate_size": 512,
        "mtp_num_hidden_layers": 1, "mtp_use_dedicated_embeddings": False,
        "num_attention_heads": 16, "num_experts": 256, "num_experts_per_tok": 8,
        "num_hidden_layers": 40, "num_key_value_heads": 2, "output_router_logits": False,
        "rms_norm_eps": 1e-06, "router_aux_loss_coef": 0.001,
        "rope_parameters": {"mrope_interleaved": True, "mrope_section": [11, 11, 10],
                            "rope_type": "default", "rope_theta": 10000000,
                            "partial_rotary_factor": 0.25},
        "shared_expert_intermediate_size": 512, "use_cache": True, "vocab_size": 248320},
    "vision_config": {"model_type": "qwen3_5_moe", "depth": 27, "hidden_size": 1152,
                      "intermediate_size": 4304, "num_heads": 16, "out_hidden_size": 2048,
                      "patch_size": 16, "spatial_merge_size": 2, "temporal_patch_size": 2},
}
QWEN35_35B["text_config"]["layer_types"] *= 10


def _hf_meta_text_model(cfg):
    """transformers' text model of ``cfg`` on the meta device."""
    if "text_config" in cfg:
        text = {k: v for k, v in cfg["text_config"].items()
                if k not in ("model_type", "attn_output_gate", "mtp_num_hidden_layers",
                             "mtp_use_dedicated_embeddings", "dtype")}
        conf = transformers.Qwen3_5MoeTextConfig(**text)
        cls = transformers.Qwen3_5MoeForCausalLM
    else:
        kw = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
        conf = transformers.AutoConfig.for_model(cfg["model_type"], **kw)
        cls = transformers.Qwen3NextForCausalLM
    with torch.device("meta"):
        return cls(conf)


@pytest.mark.parametrize("cfg, linear, full", [(QWEN3_NEXT_80B, 36, 12), (QWEN35_35B, 30, 10)],
                         ids=["Qwen3-Next-80B-A3B", "Qwen3.5-35B-A3B"])
def test_plan_published(tmp_path, cfg, linear, full):
    """``plan``: parameters as transformers creates them; the KV cache of the full-attention
    layers only (2 x 2 kv heads x 256 per layer and token); the fixed state of the linear
    layers (conv 3 x 8192 + recurrent 32 x 128 x 128 values each), float32, three copies."""
    from zipmoe_rt.plan import format_plan, size_plan
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = size_plan(tmp_path)
    hf = _hf_meta_text_model(cfg)
    params = dict(hf.named_parameters())
    total = sum(t.numel() for t in params.values())
    experts = sum(t.numel() for n, t in params.items() if ".experts." in n)
    assert p.params == total and p.expert_params == experts
    hp = p.hparams
    assert len(hp.linear_layers()) == linear
    assert p.kv_values_per_token == full * 2 * 2 * 256 and p.kv_bytes_per_token == 4 * full * 1024
    per_layer = 3 * (2 * 16 * 128 + 32 * 128) + 32 * 128 * 128
    assert p.state_values == linear * per_layer
    assert p.state_bytes == RecurrentCache.COPIES * 4 * linear * per_layer
    text = format_plan(p)
    assert "state" in text and f"{linear} linear-attention layers" in text
    if cfg is QWEN3_NEXT_80B:
        assert round(p.params / 1e9) == 80 and p.experts == 48 * 512     # "80B"
    else:
        assert hp.rope["mrope_section"] == [11, 11, 10] and p.experts == 40 * 256


def test_memory_limit_counts_the_state(tmp_path):
    """``--memory-limit``'s KV figure holds the fixed state of the linear layers."""
    from zipmoe_rt.engine.memparts import kv_bytes, state_bytes
    fam = get_architecture(QWEN3_NEXT_80B)
    hp = fam.hparams()
    typed = get_family("qwen3_next").hparams_class.from_hparams(hp)
    st = state_bytes(typed)
    assert st == RecurrentCache.COPIES * 4 * 36 * (3 * 8192 + 32 * 128 * 128)
    per_token = 4 * 12 * 1024
    assert kv_bytes(hp, 256) == per_token * 256 + (per_token // 48) * 128 + st


def test_chat_session_turns_equal_fresh_runs(tiny_moe_dir, tmp_path):
    """``ChatSession`` over three turns (its cache reused where the new prompt extends what it
    holds, rebuilt where it does not) replies as a fresh ``chat`` over the whole conversation."""
    check_chat_session_turns(tiny_moe_dir("qwen3_next"), tmp_path)


@pytest.mark.parametrize("name", SPECS)
def test_cache_contents_match_transformers(pair, name):
    """After a prompt, each full-attention layer holds the keys and values of transformers'
    ``DynamicLayer`` (per position, as many values) and each linear layer the conv and
    recurrent states of its ``LinearAttentionLayer`` (transformers' conv state keeps one more,
    oldest, input column)."""
    model, hf = pair(name)
    check_cache_contents(model, hf, PROMPT[:7], state=True)


def test_server_prompt_cache_reuses_only_a_prefix(tiny_moe_dir, tmp_path):
    """The server's prompt-prefix cache over a Qwen3-Next model: a follow-up turn reuses the
    held state (cached tokens reported) and answers as a cold run; the same prompt again, or a
    prompt that diverges from the held tokens, needs an earlier position the recurrent state
    cannot go back to: nothing is reported cached and the answers are the cold runs'."""
    with serving(tiny_moe_dir("qwen3_next"), tmp_path) as (model, ask):
        turn2 = check_follow_up_reuses_the_state(model, ask)
        for msgs in (turn2, [{"role": "user", "content": "tell me a story about a dog"}]):
            check_answered_cold(model, ask, msgs)


# -- a container whose metadata lies -----------------------------------------------------------

@pytest.fixture(scope="module")
def next_zmoe(tiny_moe_dir, tmp_path_factory):
    return convert_quietly(tiny_moe_dir("qwen3_next"), tmp_path_factory.mktemp("q3n") / "q.zmoe")


@pytest.mark.parametrize("key, value, needles", [
    ("linear_value_head_dim", 16, ["linear_attn.", "linear_value_head_dim"]),
    ("linear_num_key_heads", 4, ["linear_attn.", "linear_num_key_heads"]),
    ("linear_num_value_heads", 3, ["linear_num_value_heads", "multiple"]),
    ("linear_conv_kernel_dim", 0, ["linear_conv_kernel_dim"]),
    ("layer_types", ["full_attention"] * 4, ["self_attn.", "imply for layer 0"]),
    ("layer_types", ["linear_attention", "sliding_attention"] * 2, ["layer_types"]),
    ("layer_types", ["linear_attention"] * 3, ["layer_types"]),
])
def test_stored_hparams_lying_are_refused_at_load(next_zmoe, tmp_path, key, value, needles):
    """Stored linear-attention sizes or layer kinds that the stored tensors contradict, or that
    the model cannot run, are refused when the file is opened, naming the file and the field."""
    assert_stored_hparam_refused(next_zmoe, tmp_path / "bad.zmoe", key, value, needles)
