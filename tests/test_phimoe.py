"""PhiMoE (``PhimoeForCausalLM``, transformers ``models/phimoe/``): the shared ops it added
(LayerNorm with weight and bias, the sparsemixer router, PhiMoE's LongRoPE) against
transformers / torch on both backends, its config rules, and the bug-report case of prompts
shorter and longer than ``original_max_position_embeddings``."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from zipmoe_rt.backends import get_backend  # noqa: E402

BACKENDS = ["numba", "numpy"]


# ------------------------------------------------------------------ LayerNorm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,n,eps", [(1, 64, 1e-5), (7, 300, 1e-6), (3, 4096, 1e-5)])
def test_layer_norm_matches_torch(backend, T, n, eps):
    g = np.random.default_rng(T * n)
    x = (g.standard_normal((T, n)) * 3 + 1.5).astype(np.float32)
    w = (1 + 0.3 * g.standard_normal(n)).astype(np.float32)
    b = (0.2 * g.standard_normal(n)).astype(np.float32)
    ln = torch.nn.LayerNorm(n, eps=eps)
    with torch.no_grad():
        ln.weight.copy_(torch.from_numpy(w))
        ln.bias.copy_(torch.from_numpy(b))
        want = ln(torch.from_numpy(x)).numpy()
    be = get_backend(backend)
    got = be.layer_norm(x, w, b, eps)
    assert got.dtype == np.float32 and got.shape == (T, n)
    assert np.abs(got - want).max() <= 2e-5 * max(1.0, np.abs(want).max())
    out = np.full_like(x, np.nan)
    assert be.layer_norm(x, w, b, eps, out=out) is out
    assert np.array_equal(out, got)
    # the bias and the mean matter: a wrong one would be far off
    assert np.abs(be.layer_norm(x, w, np.zeros_like(b), eps) - want).max() > 0.1


# ------------------------------------------------------------------ sparsemixer router


def _hf_sparsemixer(logits: np.ndarray, eps: float):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    w, idx = sparsemixer(torch.from_numpy(logits), jitter_eps=eps, training=False)
    return idx.numpy(), w.numpy()


def _router_logits(T, E, seed, spread):
    """Logits around a common level so that several experts fall within the masks."""
    g = np.random.default_rng(seed)
    level = g.standard_normal((T, 1)) * 2
    return (level + spread * g.standard_normal((T, E))).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,eps,spread", [(2, 0.01, 0.03), (8, 0.01, 0.05), (16, 0.01, 0.02),
                                          (8, 0.2, 0.5), (6, 0.5, 1.0)])
def test_sparsemixer_matches_transformers(backend, E, eps, spread):
    logits = _router_logits(257, E, E, spread)
    logits[0] = 0.0                       # all equal: 0/0 in the mask (not masked), ties
    logits[1, :] = -1.0
    logits[1, E - 1] = 0.0                # max 0, the rest negative: factor |s|
    want_idx, want_w = _hf_sparsemixer(logits, eps)
    idx, w = get_backend(backend).route_sparsemixer(logits, eps)
    assert idx.dtype == np.int64 and w.dtype == np.float32 and idx.shape == (257, 2)
    assert np.array_equal(idx, want_idx)
    assert np.abs(w - want_w).max() <= 1e-6
    # the masks really act: some weights are 1 (one expert within the threshold), many not
    assert (w < 0.9).mean() > 0.2 and (w == 1).any()


def test_sparsemixer_backends_agree_and_refuse_one_expert():
    logits = _router_logits(100, 8, 3, 0.03)
    a = get_backend("numba").route_sparsemixer(logits, 0.01)
    b = get_backend("numpy").route_sparsemixer(logits, 0.01)
    assert np.array_equal(a[0], b[0]) and np.abs(a[1] - b[1]).max() <= 1e-7
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="at least 2 experts"):
            get_backend(backend).route_sparsemixer(np.zeros((3, 1), np.float32), 0.01)


# ------------------------------------------------------------------ LongRoPE


def _longrope_cfg(**over):
    import transformers

    rs = dict(type="longrope", original_max_position_embeddings=16,
              short_factor=[1.0 + 0.1 * i for i in range(8)],
              long_factor=[2.0 + 0.5 * i for i in range(8)], short_mscale=1.1, long_mscale=1.3)
    rs.update(over.pop("rope_scaling", {}))
    kw = dict(vocab_size=64, hidden_size=64, num_attention_heads=4, num_key_value_heads=2,
              num_hidden_layers=1, max_position_embeddings=64, rope_theta=10000.0,
              rope_scaling=rs)
    kw.update(over)
    return transformers.PhimoeConfig(**kw)


def _args(cfg):
    from zipmoe_rt.families import get_architecture

    d = dict(cfg.to_dict(), architectures=["PhimoeForCausalLM"])
    return get_architecture(d).typed_hparams()


@pytest.mark.parametrize("seq_len", [None, 1, 16, 17, 40])
@pytest.mark.parametrize("over", [{}, {"rope_scaling": {"factor": 3.0}},
                                  {"rope_scaling": {"attention_factor": 0.7}}])
def test_longrope_inv_freq_matches_transformers(seq_len, over):
    """rope_inv_freq = transformers' longrope init function: the long factors past
    original_max_position_embeddings, the short ones up to it or without a length."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from zipmoe_rt.models.rope import rope_inv_freq

    cfg = _longrope_cfg(**over)
    ref, ref_scale = ROPE_INIT_FUNCTIONS["longrope"](cfg, seq_len=seq_len)
    inv, scale = rope_inv_freq(_args(cfg), seq_len)
    np.testing.assert_allclose(inv, ref.numpy(), rtol=2e-7)
    assert scale == pytest.approx(ref_scale, rel=1e-12)
    short, _ = rope_inv_freq(_args(cfg), None)
    assert np.array_equal(inv, short) == (not seq_len or seq_len <= 16)


@pytest.mark.parametrize("n", [10, 16, 17, 40])
def test_phimoe_rope_tables_match_phimoe_rotary_embedding(n):
    """PhimoeRotaryEmbedding (transformers 5.25) keeps the short factors at every length and
    switches short_mscale -> long_mscale past original_max_position_embeddings; the model's RoPE
    gives the same cos/sin for every position of a sequence of n tokens."""
    from transformers.models.phimoe.modeling_phimoe import PhimoeRotaryEmbedding
    from zipmoe_rt.models.rope import RoPE, rope_inv_freq

    cfg = _longrope_cfg()
    with torch.no_grad():
        cos, sin = PhimoeRotaryEmbedding(cfg)(torch.zeros(1, 4), torch.arange(n)[None])
    args = _args(cfg)
    rope = RoPE(args, switch_freqs=False, mscale=(1.1, 1.3))
    assert rope.regime(n) == int(n > 16)
    c, s = rope.cos_sin(0, n)
    np.testing.assert_allclose(c, cos[0, :, :8].numpy(), rtol=0, atol=2e-6)
    np.testing.assert_allclose(s, sin[0, :, :8].numpy(), rtol=0, atol=2e-6)
    # the last rows alone (a decode step) are the same rows
    c1, s1 = rope.cos_sin(n - 1, 1)
    np.testing.assert_allclose(c1, c[-1:], rtol=0, atol=1e-7)
    # the long factors (transformers' init function at this length) would give other angles
    # past 16: PhiMoE's rotary embedding never uses them
    inv, _ = rope_inv_freq(args, n)
    other = np.cos(np.arange(n, dtype=np.float32)[:, None] * inv) * (1.3 if n > 16 else 1.1)
    assert (np.abs(other - c).max() > 0.05) == (n > 16)


def test_generic_longrope_matches_dynamic_rope_update():
    """Without a family's options, longrope switches its frequencies on the sequence length as
    transformers' dynamic_rope_update does for Llama-style rotary embeddings."""
    import transformers
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
    from zipmoe_rt.families import HParams
    from zipmoe_rt.models.rope import RoPE

    rp = dict(rope_type="longrope", rope_theta=10000.0, original_max_position_embeddings=16,
              short_factor=[1.0 + 0.1 * i for i in range(8)],
              long_factor=[2.0 + 0.5 * i for i in range(8)], factor=4.0)
    cfg = transformers.LlamaConfig(hidden_size=64, num_attention_heads=4, head_dim=16,
                                   max_position_embeddings=64, rope_parameters=dict(rp))
    emb = LlamaRotaryEmbedding(cfg)
    args = HParams(family="x", vocab_size=8, hidden_size=64, num_hidden_layers=1,
                   num_attention_heads=4, num_key_value_heads=4, head_dim=16, rope=dict(rp),
                   max_position_embeddings=64)
    rope = RoPE(args)
    for n in (10, 40):
        with torch.no_grad():
            cos, _ = emb(torch.zeros(1, 4), torch.arange(n)[None])
        np.testing.assert_allclose(rope.cos_sin(0, n)[0], cos[0, :, :8].numpy(), rtol=0,
                                   atol=2e-6)


# ------------------------------------------------------------------ config rules


def _phimoe_config(**over):
    d = dict(architectures=["PhimoeForCausalLM"], model_type="phimoe", vocab_size=64,
             hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             intermediate_size=32, num_local_experts=4, num_experts_per_tok=2,
             max_position_embeddings=128, rope_theta=10000.0,
             rope_scaling=dict(type="longrope", original_max_position_embeddings=32,
                               short_factor=[1.0] * 8, long_factor=[2.0] * 8, short_mscale=1.1,
                               long_mscale=1.2))
    d.update(over)
    return d


def test_config_rules():
    from zipmoe_rt.families import ConfigError, get_architecture

    hp = get_architecture(_phimoe_config()).typed_hparams()
    assert hp.rope["rope_type"] == "longrope" and hp.rope["original_max_position_embeddings"] == 32
    assert (hp.router_jitter_noise, hp.lm_head_bias, hp.attention_bias) == (0.01, False, False)
    assert (hp.rms_norm_eps, hp.sliding_window, hp.norm_topk_prob, hp.qk_norm) == (
        1e-5, 0, False, False)
    # "su" is read as longrope; a top-level original_max_position_embeddings wins (as
    # standardize_rope_params); without either, max_position_embeddings
    rs = dict(_phimoe_config()["rope_scaling"], type="su")
    hp = get_architecture(_phimoe_config(rope_scaling=rs, original_max_position_embeddings=20)
                          ).typed_hparams()
    assert hp.rope["rope_type"] == "longrope" and hp.rope["original_max_position_embeddings"] == 20
    rs = {k: v for k, v in rs.items() if k != "original_max_position_embeddings"}
    hp = get_architecture(_phimoe_config(rope_scaling=rs)).typed_hparams()
    assert hp.rope["original_max_position_embeddings"] == 128
    # what transformers refuses or cannot run is named
    rs = {k: v for k, v in _phimoe_config()["rope_scaling"].items() if k != "long_mscale"}
    with pytest.raises(ConfigError, match="longrope needs long_mscale"):
        get_architecture(_phimoe_config(rope_scaling=rs)).hparams()
    rs = dict(_phimoe_config()["rope_scaling"], short_factor=[1.0] * 7)
    with pytest.raises(ConfigError, match=r"rope.short_factor: expected 8 positive numbers"):
        get_architecture(_phimoe_config(rope_scaling=rs)).hparams()
    with pytest.raises(ConfigError, match="selects exactly 2 experts"):
        get_architecture(_phimoe_config(num_experts_per_tok=4)).hparams()
    with pytest.raises(ConfigError, match="router_jitter_noise"):
        get_architecture(_phimoe_config(router_jitter_noise=-0.1)).hparams()
    with pytest.raises(ConfigError, match="rope_type: 'yarn' is not supported"):
        get_architecture(_phimoe_config(rope_scaling=dict(type="yarn", factor=2.0))).hparams()


def test_stored_hparams_are_checked():
    """A container whose stored longrope fields lie is refused when the model is built."""
    from zipmoe_rt.families import get_architecture, get_family

    cls = get_family("phimoe").hparams_class
    hp = get_architecture(_phimoe_config()).hparams()
    assert cls.from_hparams(hp).rope == hp["rope"]
    for key, bad in (("long_factor", [1.0, -2.0]), ("short_mscale", 0),
                     ("original_max_position_embeddings", None)):
        with pytest.raises(ValueError, match=f"rope.{key}"):
            cls.from_hparams(dict(hp, rope=dict(hp["rope"], **{key: bad})))


# ------------------------------------------------------------------ whole model vs transformers

from hf_parity import checkpoint_logits, hf_logits, zmoe_logits  # noqa: E402
from tiny_models import SPECS  # noqa: E402

ORIGINAL = SPECS["phimoe"][1]["rope_scaling"]["original_max_position_embeddings"]
LOGITS_TOL = 1e-3


@pytest.fixture(scope="module")
def phimoe(tiny_moe_dir):
    """(folder, HF model in float32, {backend: our model}) of the ``phimoe`` spec."""
    from tiny_models import load_hf
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    d = tiny_moe_dir("phimoe")
    return d, load_hf(d), {b: build_model(CheckpointSource(d), backend=b) for b in BACKENDS}


def _hf_greedy(hf, prompt, n):
    """n greedy tokens of transformers with a full recompute each step (no cache), and the
    last-position logits of each step."""
    seq, steps = list(prompt), []
    for _ in range(n):
        steps.append(hf_logits(hf, seq)[-1])
        seq.append(int(np.argmax(steps[-1])))
    return seq[len(prompt):], steps


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [10, 20, 40])
def test_prompts_shorter_and_longer_than_the_original_length(phimoe, backend, n):
    """The bug-report case: LongRoPE with distinct short and long factors and mscales, prompts
    shorter (10, 20) and longer (40) than original_max_position_embeddings (32): the logits at
    every prompt position and at every one of 20 greedy steps through the KV cache equal
    transformers' (full recompute each step), and so do the tokens; from 20 tokens the
    decoding crosses the original length (the cache is recomputed at 33 tokens)."""
    _, hf, models = phimoe
    model = models[backend]
    assert ORIGINAL == 32 and model.rope.original == 32
    prompt = np.random.default_rng(n).integers(0, 256, n)
    ref = hf_logits(hf, prompt)
    cache = model.new_cache(capacity=8)
    ours = model.forward(prompt, cache, last_only=False)
    assert ours.shape == ref.shape
    assert np.abs(ours - ref).max() <= LOGITS_TOL
    assert cache.regime == int(n > ORIGINAL)
    ref_toks, ref_steps = _hf_greedy(hf, prompt, 20)
    toks, worst = [], 0.0
    for step in range(20):
        logits = ours[-1] if step == 0 else model.forward(np.array(toks[-1:]), cache)
        worst = max(worst, float(np.abs(logits - ref_steps[step]).max()))
        toks.append(int(np.argmax(logits)))
    assert worst <= LOGITS_TOL
    assert toks == ref_toks
    assert cache.offset == n + 19 and cache.token_ids[n:] == toks[:-1]
    assert cache.regime == int(n + 19 > ORIGINAL)


def test_the_regime_switch_needs_the_recompute(phimoe):
    """Keys cached with short_mscale are wrong once the sequence is longer than the original
    length: without the recompute the logits after the switch leave transformers' by far."""
    _, hf, models = phimoe
    model = models["numba"]
    prompt = np.random.default_rng(5).integers(0, 256, ORIGINAL + 1)
    ref = hf_logits(hf, prompt)[-1]
    cache = model.new_cache()
    model.forward(prompt[:-1], cache)
    assert cache.regime == 0
    good = model.forward(prompt[-1:], cache)                # recomputes all 33 positions
    assert np.abs(good - ref).max() <= LOGITS_TOL and cache.regime == 1
    cache = model.new_cache()
    model.forward(prompt[:-1], cache)
    cache.regime = 1                     # pretend the short-regime keys were long ones
    stale = model.forward(prompt[-1:], cache)
    assert np.abs(stale - ref).max() > 100 * LOGITS_TOL


def _hf_routing(hf, ids):
    """[(selected experts int64 [T, 2], weights float32 [T, 2]) per layer] of transformers'
    PhimoeTopKRouter (eval mode) for ``ids``."""
    seen = []
    hooks = [layer.mlp.router.register_forward_hook(
        lambda mod, inp, out: seen.append((out[2].numpy(), out[1].numpy())))
        for layer in hf.model.layers]
    try:
        hf_logits(hf, ids)
    finally:
        for h in hooks:
            h.remove()
    return seen


@pytest.mark.parametrize("name", ["phimoe", "phimoe_jitter_swa"])
def test_routing_equals_transformers_router(tiny_moe_dir, name):
    """Every layer's experts and weights equal PhimoeTopKRouter's in eval mode (the same model,
    the same tokens); with a large jitter the masked softmaxes hold several experts, so the
    weights are far from 1 (a renormalisation or a plain top-2 softmax would show)."""
    from tiny_models import load_hf
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    d = tiny_moe_dir(name)
    hf = load_hf(d)
    ids = np.random.default_rng(7).integers(0, 256, 24)
    ref = _hf_routing(hf, ids)
    model = build_model(CheckpointSource(d))
    ours = []
    model.route_hook = lambda layer, x, logits, idx, w: ours.append((layer, idx.copy(), w.copy()))
    model.forward(ids, model.new_cache())
    assert [o[0] for o in ours] == [0, 1, 2] and len(ref) == 3
    for (_, idx, w), (ref_idx, ref_w) in zip(ours, ref):
        assert np.array_equal(idx, ref_idx)
        assert np.abs(w - ref_w).max() <= 1e-5
    w = np.concatenate([o[2] for o in ours])
    if name == "phimoe_jitter_swa":
        assert (w < 0.9).mean() > 0.3 and (np.abs(w.sum(axis=1) - 1) > 0.2).mean() > 0.5
    else:                                  # the released 0.01: mostly one expert per mask
        assert (w == 1).mean() > 0.5


@pytest.mark.parametrize("policy", ["zip-lru", "raw-lru", "zipmoe"])
def test_budgeted_engine_across_the_switch(tiny_moe_dir, tmp_path, policy):
    """Under a memory budget that evicts experts, with each policy, a prompt of 20 and 20 greedy
    steps (crossing the original length, so the sequence is recomputed through the engine) give
    the unbudgeted model's logits bit for bit."""
    import warnings

    from zipmoe_rt.bench import raw_companion
    from zipmoe_rt.convert.converter import convert
    from zipmoe_rt.engine import profile as prof
    from zipmoe_rt.engine.pipeline import ExpertEngine, budget_split
    from zipmoe_rt.engine.planner import DelayModel
    from zipmoe_rt.engine.store import ZmoeSource
    from zipmoe_rt.models import build_model

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # no tokenizer.json in the tiny folder
        path = convert(tiny_moe_dir("phimoe"), tmp_path / "m.zmoe", progress=False)
        if policy == "raw-lru":
            path = raw_companion(path)
    prompt = np.random.default_rng(20).integers(0, 256, 20)

    def run(model):
        cache = model.new_cache(capacity=4)
        out = [model.forward(prompt, cache, last_only=False)]
        for _ in range(20):
            out.append(model.forward(np.array([int(np.argmax(out[-1][-1]))]), cache,
                                     last_only=False))
        assert cache.regime == 1 and cache.offset == 40
        return out

    full = ZmoeSource(path)
    model = build_model(full)
    rec = prof.TraceRecorder(full.hparams, decode_only=False)    # for the zipmoe plan
    model.route_hook = rec
    plain = run(model)
    model.route_hook = None
    full.close()
    src = ZmoeSource(path, keep_experts=False, copy_dense=True)
    bytes_F = max(l.full_bytes for l in src.layouts.values())
    budget = src.dense_bytes() + 4 * bytes_F
    kw = {}
    if policy == "zipmoe":                 # static tiers planned from the counts, cheap decode
        lays = src.layouts.values()
        delay = DelayModel(sm_read_s=1e-3, exp_read_s=1e-3, decode_s=1e-5, matmul_s=1e-6,
                           workers=2, bytes_F=bytes_F,
                           bytes_sm=max(l.sm_region[1] for l in lays),
                           bytes_exp=max(l.exp_region[1] for l in lays),
                           chunks=max(1, max(sum(len(p.chunks) for p in l.pieces) for l in lays)))
        plan, ranks = prof.make_plan({"counts": rec.counts.tolist()}, delay,
                                     budget_split(src, budget)[2], 2, locality=False)
        kw = dict(plan=plan.layers, ranks=ranks, delay=delay)
    engine = ExpertEngine(src, budget, policy, workers=2, **kw)
    try:
        budgeted = run(build_model(src, executor=engine))
        hits = engine.stats.hits
        assert hits["miss"] > 0                # experts really were evicted and reloaded
        if policy == "zipmoe":
            assert hits["C"] + hits["S"] + hits["E"] > 0
    finally:
        engine.close()
        src.close()
    assert all(np.array_equal(a, b) for a, b in zip(budgeted, plain))


def test_released_architecture_name_and_layout(tiny_moe_dir, tmp_path):
    """The released config.json files name the architecture ``PhiMoEForCausalLM``: such a
    checkpoint, with the Hub names (``block_sparse_moe.gate``, experts ``w1/w3/w2``, LayerNorm
    and head biases), converts and runs as PhiMoE."""
    import json
    import shutil
    import warnings

    from safetensors import safe_open

    from zipmoe_rt.convert.converter import convert
    from zipmoe_rt.families import family_for_architecture, get_family

    assert family_for_architecture("PhiMoEForCausalLM") is get_family("phimoe")
    src = tiny_moe_dir("phimoe")
    d = shutil.copytree(src, tmp_path / "released")
    with safe_open(str(d / "model.safetensors"), "np") as f:
        names = set(f.keys())
    assert {"model.layers.0.block_sparse_moe.gate.weight", "model.norm.bias", "lm_head.bias",
            "model.layers.2.input_layernorm.bias", "model.layers.0.self_attn.o_proj.bias",
            "model.layers.1.block_sparse_moe.experts.7.w3.weight"} <= names
    cfg = json.loads((d / "config.json").read_text())
    (d / "config.json").write_text(json.dumps(dict(cfg, architectures=["PhiMoEForCausalLM"])))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # no tokenizer.json in the tiny folder
        path = convert(d, tmp_path / "r.zmoe", progress=False)
    ids = np.random.default_rng(3).integers(0, 256, 12)

    def check(z):
        assert z.hparams["family"] == "phimoe" and z.hparams["lm_head_bias"] is True
        assert z.hparams["router_jitter_noise"] == 0.01
    assert np.array_equal(zmoe_logits(path, ids, check), checkpoint_logits(src, ids))


@pytest.mark.parametrize("change", ["drop", "shape"])
@pytest.mark.parametrize("tensor", ["model.norm.bias", "model.layers.1.input_layernorm.bias",
                                    "lm_head.bias"])
def test_bad_bias_tensors_are_named(tiny_moe_dir, tmp_path, change, tensor):
    """A checkpoint missing a LayerNorm or head bias its config implies, or holding one of the
    wrong shape, is refused by the converter with the tensor's name."""
    import shutil
    import warnings

    from safetensors.torch import load_file, save_file

    from zipmoe_rt.convert.converter import convert

    d = shutil.copytree(tiny_moe_dir("phimoe"), tmp_path / "bad")
    tensors = load_file(str(d / "model.safetensors"))
    if change == "drop":
        del tensors[tensor]
    else:
        tensors[tensor] = tensors[tensor][:-1].clone()
    save_file(tensors, str(d / "model.safetensors"), metadata={"format": "pt"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with pytest.raises(Exception, match=tensor.replace(".", r"\.")) as ei:
            convert(d, tmp_path / "bad.zmoe", progress=False)
    assert "Traceback" not in str(ei.value)
    assert not (tmp_path / "bad.zmoe").exists()


def test_crop_back_below_the_original_length(phimoe):
    """A cache that held a long sequence (long_mscale keys), cropped to a shared prefix and fed
    a suffix that ends below the original length (a chat turn that restarts), is recomputed in
    the short regime: the logits are transformers' for the new sequence."""
    _, hf, models = phimoe
    model = models["numba"]
    long_ids = np.random.default_rng(11).integers(0, 256, 40)
    cache = model.new_cache()
    model.forward(long_ids, cache)
    assert cache.regime == 1
    cache.crop(20)
    assert cache.token_ids == [int(t) for t in long_ids[:20]] and cache.regime == 1
    suffix = np.random.default_rng(12).integers(0, 256, 5)
    ours = model.forward(suffix, cache, last_only=False)
    ref = hf_logits(hf, np.concatenate([long_ids[:20], suffix]))
    assert ours.shape == (5, 256) and cache.regime == 0 and cache.offset == 25
    assert np.abs(ours - ref[20:]).max() <= LOGITS_TOL


def test_model_cache_keeps_token_ids():
    """ModelCache records the ids of each commit (what a recompute at a RoPE switch needs),
    trims them on crop, forgets them after a commit without ids, and adopt takes another
    cache's contents."""
    from zipmoe_rt.models.cache import KVCache, ModelCache

    def new():
        return ModelCache(KVCache(1, 4, 4, 0, 2) for _ in range(2))

    c = new()
    for ids in ([5, 6, 7], [8]):
        c.reserve(len(ids))
        c.commit(len(ids), np.array(ids))
    assert c.token_ids == [5, 6, 7, 8] and c.offset == 4 and c.regime == 0
    c.crop(2)
    assert c.token_ids == [5, 6]
    c.reserve(1)
    c.commit(1)
    assert c.token_ids is None and c.offset == 3
    c.crop(0)
    assert c.token_ids == []
    other = new()
    other.reserve(2)
    other.commit(2, [1, 2])
    other.regime = 1
    c.adopt(other)
    assert (c.offset, c.token_ids, c.regime, c.layers) == (2, [1, 2], 1, other.layers)


def test_head_dim_wider_than_hidden_over_heads(tmp_path):
    """A config.json head_dim other than hidden_size / heads (as Phi-tiny-MoE's 128 with hidden
    4096 and 16 heads), with LongRoPE factors of head_dim / 2: logits equal transformers'."""
    import transformers
    from tiny_models import COMMON, _randomize_norms, load_hf
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    torch.manual_seed(0)
    rs = dict(type="longrope", original_max_position_embeddings=8, short_mscale=1.2,
              long_mscale=1.3, short_factor=[1.0 + 0.1 * i for i in range(16)],
              long_factor=[2.0 + 0.2 * i for i in range(16)])
    cfg = transformers.PhimoeConfig(**dict(COMMON, intermediate_size=48, num_local_experts=4,
                                           head_dim=32, attention_bias=True, rope_scaling=rs,
                                           rope_theta=10000.0))
    hf = transformers.PhimoeForCausalLM(cfg)
    _randomize_norms(hf, torch, torch.Generator().manual_seed(1))
    hf.to(torch.bfloat16).save_pretrained(tmp_path)
    assert hf.model.layers[0].self_attn.q_proj.weight.shape == (4 * 32, 64)
    ref_model = load_hf(tmp_path)
    model = build_model(CheckpointSource(tmp_path))
    assert model.args.head_dim == 32
    ids = np.random.default_rng(2).integers(0, 256, 12)
    ours = model.forward(ids, model.new_cache(), last_only=False)
    assert np.abs(ours - hf_logits(ref_model, ids)).max() <= LOGITS_TOL
