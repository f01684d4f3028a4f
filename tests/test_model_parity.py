"""Runtime models and kernels against transformers (float32) on tiny random MoE checkpoints:
logits parity, greedy decoding through the KV cache, prefill in pieces, RoPE variants, and the
BF16 ``linear`` kernel against a float64 numpy reference."""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.kernels.embed import bf16_rows
from zipmoe_rt.kernels.linear import linear
from zipmoe_rt.kernels.widen import widen_bf16
from zipmoe_rt.kernels.swiglu import expert_accumulate, swiglu_expert
from zipmoe_rt.models import build_model
from zipmoe_rt.families import HParams
from zipmoe_rt.models.base import ExpertExecutor, KVCache, rope_inv_freq
from zipmoe_rt.models.weights import CheckpointSource
from zipmoe_rt.models.cache import RecurrentCache

from hf_parity import hf_logits, model_pair
from tiny_models import SPECS

ARCHS = list(SPECS)             # every tiny spec, every family
LOGITS_TOL = 1e-3


def _bf16(a: np.ndarray) -> np.ndarray:
    """float -> BF16 bits (truncation; any BF16 value is fine for kernel tests)."""
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


# ------------------------------------------------------------------ kernels


@pytest.mark.parametrize("T", [1, 2, 5, 17])
@pytest.mark.parametrize("out_in", [(67, 33), (1, 1), (3, 8), (130, 64), (1536, 576)])
@pytest.mark.parametrize("kind", ["bf16", "f16", "f32"])
def test_linear_matches_float64(T, out_in, kind):
    rng = np.random.default_rng(T * 1000 + out_in[0])
    O, I = out_in
    W = _bf16(rng.standard_normal((O, I)))
    Wf = widen_bf16(W)
    if kind == "f16":  # keep the values representable in float16
        W = _bf16(widen_bf16(W).astype(np.float16).astype(np.float32))
        Wf = widen_bf16(W)
    Wk = {"bf16": W, "f16": Wf.astype(np.float16), "f32": Wf}[kind]
    x = rng.standard_normal((T, I)).astype(np.float32)
    b = rng.standard_normal(O).astype(np.float32)
    ref = x.astype(np.float64) @ Wf.astype(np.float64).T  # same values in all three dtypes
    scale = np.abs(ref).max()
    for par in (True, False):
        y = linear(x, Wk, parallel=par)
        assert y.shape == (T, O) and y.dtype == np.float32
        np.testing.assert_allclose(y, ref, rtol=1e-4, atol=1e-4 * scale)
        yb = linear(x, Wk, b, parallel=par)
        np.testing.assert_allclose(yb, ref + b, rtol=1e-4, atol=1e-4 * scale)
    y1 = linear(x[0], Wk)
    assert y1.shape == (O,)
    np.testing.assert_allclose(y1, ref[0], rtol=1e-4, atol=1e-4 * scale)


def test_linear_errors():
    W = np.zeros((4, 3), np.uint16)
    with pytest.raises(ValueError):
        linear(np.zeros((2, 4), np.float32), W)
    with pytest.raises(TypeError):
        linear(np.zeros((2, 3), np.float32), np.zeros((4, 3), np.int32))


def test_f16_widening_exact_all_values():
    h = np.arange(65536, dtype=np.uint16).view(np.float16).reshape(-1, 1)
    y = linear(np.ones((1, 1), np.float32), h)[0]
    ref = h[:, 0].astype(np.float32)
    assert np.array_equal(y, ref, equal_nan=True)


def test_bf16_rows_and_swiglu():
    rng = np.random.default_rng(3)
    E = _bf16(rng.standard_normal((50, 24)))
    ids = np.array([3, 0, 49, 3])
    np.testing.assert_array_equal(bf16_rows(E, ids), widen_bf16(E)[ids])
    with pytest.raises(IndexError):
        bf16_rows(E, np.array([50]))
    H, I = 40, 37
    g, u, d = (_bf16(rng.standard_normal(s)) for s in ((I, H), (I, H), (H, I)))
    gf, uf, df = (widen_bf16(a).astype(np.float64) for a in (g, u, d))
    for T in (1, 3):
        x = rng.standard_normal((T, H)).astype(np.float32)
        gg = x @ gf.T
        ref = (gg / (1 + np.exp(-gg)) * (x @ uf.T)) @ df.T
        np.testing.assert_allclose(swiglu_expert(x, g, u, d), ref, rtol=1e-4,
                                   atol=1e-4 * np.abs(ref).max())
        out = np.zeros((T, H), np.float32)
        rows = np.arange(T)[::-1].copy()
        w = np.linspace(0.2, 0.9, T).astype(np.float32)
        expert_accumulate(out, x, rows, w, g, u, d)
        np.testing.assert_allclose(out[rows], w[:, None] * ref[rows], rtol=1e-4,
                                   atol=1e-4 * np.abs(ref).max())


# ------------------------------------------------------------------ RoPE


@pytest.mark.parametrize("rope", [
    {"rope_type": "default", "rope_theta": 10000.0},
    {"rope_type": "linear", "rope_theta": 10000.0, "factor": 2.0},
    {"rope_type": "llama3", "rope_theta": 500000.0, "factor": 8.0, "low_freq_factor": 1.0,
     "high_freq_factor": 4.0, "original_max_position_embeddings": 1024},
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
     "original_max_position_embeddings": 1024},
])
def test_rope_inv_freq_matches_transformers(rope):
    pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS

    cfg = transformers.LlamaConfig(hidden_size=256, num_attention_heads=4, head_dim=64,
                                   max_position_embeddings=4096, rope_parameters=dict(rope))
    if rope["rope_type"] == "default":
        from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding
        ref, ref_scale = LlamaRotaryEmbedding.compute_default_rope_parameters(cfg)
    else:
        ref, ref_scale = ROPE_INIT_FUNCTIONS[rope["rope_type"]](cfg)
    args = HParams(family="x", vocab_size=8, hidden_size=256, num_hidden_layers=1,
                     num_attention_heads=4, num_key_value_heads=4, head_dim=64, rope=dict(rope),
                     max_position_embeddings=4096)
    inv, scale = rope_inv_freq(args)
    np.testing.assert_allclose(inv, ref.numpy(), rtol=2e-6)
    assert scale == pytest.approx(ref_scale, rel=1e-12)


def test_rope_unknown_type():
    args = HParams(family="x", vocab_size=8, hidden_size=8, num_hidden_layers=1,
                     num_attention_heads=1, num_key_value_heads=1, head_dim=8,
                     rope={"rope_type": "longrope", "rope_theta": 1.0})
    with pytest.raises(ValueError, match="longrope"):
        rope_inv_freq(args)


# ------------------------------------------------------------------ models vs transformers


@pytest.fixture(scope="module")
def loaded(tiny_moe_dir):
    """name -> (our model, HF model in float32); mixtral from a sharded checkpoint."""
    return model_pair(tiny_moe_dir, sharded=("mixtral",))


PROMPT = np.random.default_rng(1).integers(0, 256, 16)


@pytest.mark.parametrize("name", ARCHS)
def test_logits_parity(loaded, name):
    model, hf = loaded(name)
    ref = hf_logits(hf, PROMPT)
    ours = model.forward(PROMPT, model.new_cache(), last_only=False)
    assert ours.shape == (16, model.config.vocab_size) and ours.dtype == np.float32
    assert np.abs(ours - ref).max() <= LOGITS_TOL
    last = model.forward(PROMPT, model.new_cache())
    assert last.shape == (model.config.vocab_size,)
    np.testing.assert_allclose(last, ours[-1], rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ARCHS)
def test_greedy_20_tokens(loaded, name):
    model, hf = loaded(name)
    # reference: transformers, full recompute each step (no cache involved)
    seq = list(PROMPT)
    for _ in range(20):
        seq.append(int(np.argmax(hf_logits(hf, seq)[-1])))
    ref_tokens = seq[16:]
    # ours: prefill, then one token at a time through the KV cache
    cache = model.new_cache(capacity=8)  # forces growth by doubling
    logits = model.forward(PROMPT, cache)
    ours = []
    for _ in range(20):
        tok = int(np.argmax(logits))
        ours.append(tok)
        logits = model.forward(np.array([tok]), cache)
    assert cache.offset == 36 and cache.get_seq_length() == 36
    assert ours == ref_tokens


@pytest.mark.parametrize("name", ARCHS)
def test_prefill_in_pieces(loaded, name):
    model, _ = loaded(name)
    full = model.forward(PROMPT, model.new_cache(), last_only=False)
    cache = model.new_cache(capacity=4)
    parts = [model.forward(PROMPT[a:b], cache, last_only=False)
             for a, b in ((0, 7), (7, 8), (8, 13), (13, 16))]
    # a recurrent state (Qwen3-Next) is stored in float32 between calls: its rounding shows
    recurrent = any(isinstance(lc, RecurrentCache) for lc in cache.layers)
    np.testing.assert_allclose(np.concatenate(parts), full, rtol=0,
                               atol=1e-4 if recurrent else 1e-5)
    if not cache.can_crop(8):       # a recurrent state (Qwen3-Next) cannot go back: refused
        with pytest.raises(ValueError, match="cannot crop"):
            cache.crop(8)
        assert cache.offset == 16
        return
    # crop and redo the tail: same logits
    cache.crop(8)
    again = model.forward(PROMPT[8:], cache, last_only=False)
    np.testing.assert_allclose(again, full[8:], rtol=0, atol=1e-5)


def test_qwen2_sliding_window_layer_types(tiny_moe_dir):
    """Qwen2-MoE slides only on transformers' ``layer_types`` layers (even layers below
    ``max_window_layers``). The converter's hparams carry neither key yet, so they are added
    here; without them the window would apply to every layer."""
    from tiny_models import load_hf

    d = tiny_moe_dir("qwen2_moe_swa")
    hf = load_hf(d)
    layer_types = list(hf.config.layer_types)
    assert layer_types == ["sliding_attention", "full_attention", "full_attention"]
    ref = hf_logits(hf, PROMPT)
    for extra in ({"layer_types": layer_types}, {"max_window_layers": 2}):
        src = CheckpointSource(d)
        assert src.hparams["sliding_window"] == 5
        src.hparams = dict(src.hparams, **extra)
        model = build_model(src)
        assert [model.args.window(i) for i in range(3)] == [5, 0, 0]
        ours = model.forward(PROMPT, model.new_cache(), last_only=False)
        assert np.abs(ours - ref).max() <= LOGITS_TOL


def test_executor_and_route_hook(loaded):
    model, _ = loaded("qwen2_moe")
    ref = model.forward(PROMPT, model.new_cache(), last_only=False)

    class Recording(ExpertExecutor):
        def __init__(self, source):
            super().__init__(source)
            self.seen = []

        def run(self, layer, x, topk_idx, topk_w):
            assert x.dtype == np.float32 and x.shape[1] == model.config.hidden_size
            assert topk_idx.dtype == np.int64 and topk_idx.shape == (x.shape[0], 2)
            assert topk_w.dtype == np.float32 and topk_w.shape == topk_idx.shape
            self.seen.append((layer, x.shape[0]))
            return super().run(layer, x, topk_idx, topk_w)

    hooked = []
    old_exec = model.executor
    rec = Recording(model.source)
    try:
        model.executor = rec
        model.route_hook = lambda layer, x, logits, idx, w: hooked.append((layer, logits.shape))
        out = model.forward(PROMPT, model.new_cache(), last_only=False)
    finally:
        model.executor, model.route_hook = old_exec, None
    np.testing.assert_array_equal(out, ref)
    moe = model.hparams["moe_layers"]
    assert rec.seen == [(i, 16) for i in moe]
    assert hooked == [(i, (16, 8)) for i in moe]


def _routes_and_router_logits(model, hf):
    """Over ``PROMPT``: our ``(idx, w)`` per layer (route hook) and transformers' router
    logits per layer (``output_router_logits``)."""
    import torch

    ours = {}
    model.route_hook = lambda layer, x, logits, idx, w: ours.setdefault(layer, (idx.copy(),
                                                                                w.copy()))
    try:
        model.forward(PROMPT, model.new_cache())
    finally:
        model.route_hook = None
    with torch.no_grad():
        out = hf(torch.tensor(PROMPT)[None], output_router_logits=True)
    return ours, out.router_logits


def test_routing_matches_transformers(loaded):
    """Top-k experts chosen per token equal transformers' router (Qwen3, norm_topk_prob)."""
    import torch

    model, hf = loaded("qwen3_moe")
    ours, router_logits = _routes_and_router_logits(model, hf)
    for layer, logits in enumerate(router_logits):
        probs = torch.softmax(logits.float(), dim=-1)
        w, idx = torch.topk(probs, 2, dim=-1)
        w = w / w.sum(-1, keepdim=True)
        np.testing.assert_array_equal(np.sort(ours[layer][0], 1), np.sort(idx.numpy(), 1))
        np.testing.assert_allclose(np.sort(ours[layer][1], 1), np.sort(w.numpy(), 1), atol=1e-5)


@pytest.mark.parametrize("name", ["olmoe", "olmoe_clip"])
def test_olmoe_routing_matches_transformers(loaded, name):
    """OLMoE's router (softmax top-k, renormalised only with norm_topk_prob) picks transformers'
    experts with transformers' weights, on every layer."""
    import torch

    model, hf = loaded(name)
    renorm = bool(hf.config.norm_topk_prob)
    assert renorm == (name == "olmoe_clip") and model.args.norm_topk_prob == renorm
    ours, router_logits = _routes_and_router_logits(model, hf)
    assert len(router_logits) == len(ours) == 3
    for layer, logits in enumerate(router_logits):
        w, idx = torch.topk(torch.softmax(logits.float(), dim=-1), 2, dim=-1)
        if renorm:
            w = w / w.sum(-1, keepdim=True)
        np.testing.assert_array_equal(np.sort(ours[layer][0], 1), np.sort(idx.numpy(), 1))
        np.testing.assert_allclose(np.sort(ours[layer][1], 1), np.sort(w.numpy(), 1), atol=1e-5)
        assert (ours[layer][1].sum(1) < 0.999).any() != renorm


def test_olmoe_clip_qkv_matters(tiny_moe_dir):
    """olmoe_clip's clip_qkv (1.0) really cuts: without it the logits move by far more than the
    parity tolerance, and transformers without it agrees with us without it."""
    from tiny_models import load_hf

    d = tiny_moe_dir("olmoe_clip")
    src = CheckpointSource(d)
    assert src.hparams["clip_qkv"] == 1.0
    clipped = build_model(src)
    assert all(layer.attn.clip == 1.0 for layer in clipped.layers)
    src.hparams = {k: v for k, v in src.hparams.items() if k != "clip_qkv"}
    free = build_model(src)
    assert all(layer.attn.clip is None for layer in free.layers)
    a = clipped.forward(PROMPT, clipped.new_cache(), last_only=False)
    b = free.forward(PROMPT, free.new_cache(), last_only=False)
    assert np.abs(a - b).max() > 100 * LOGITS_TOL
    hf = load_hf(d)
    hf.config.clip_qkv = None
    assert np.abs(b - hf_logits(hf, PROMPT)).max() <= LOGITS_TOL


def test_kvcache_growth_and_crop():
    c = KVCache(3, 4, capacity=2)   # one layer: 3 kv heads of 4 keys / values
    c.k[:, :2] = 1.0
    c.commit(2)
    c.reserve(5)
    assert c.capacity == 8 and c.k.shape == (3, 8, 4) and c.v.shape == (3, 8, 4)
    assert (c.k[:, :2] == 1.0).all()
    with pytest.raises(ValueError):
        c.crop(3)
    c.crop(1)
    assert c.length == 1


def test_build_model_unknown_family():
    class Src:
        hparams = {"family": "gpt2"}

    with pytest.raises(ValueError, match="unsupported model family 'gpt2'"):
        build_model(Src())


def test_forward_rejects_bad_ids(loaded):
    model, _ = loaded("mixtral")
    with pytest.raises(ValueError):
        model.forward(np.array([], np.int64), model.new_cache())
    cache = model.new_cache()
    with pytest.raises(IndexError):
        model.forward(np.array([1, 256]), cache)
    assert cache.offset == 0


@pytest.mark.parametrize("k", [1, 2, 3])
def test_experts_decode_matches_per_expert(k):
    from zipmoe_rt.kernels.swiglu import experts_decode
    from zipmoe_rt.models.weights import ExpertWeights

    rng = np.random.default_rng(k)
    H, I = 94, 257  # odd I and H not a multiple of 4 exercise the tails
    experts = [ExpertWeights(_bf16(rng.standard_normal((I, H)) * 0.2),
                             _bf16(rng.standard_normal((I, H)) * 0.2),
                             _bf16(rng.standard_normal((H, I)) * 0.2)) for _ in range(k)]
    x = rng.standard_normal(H).astype(np.float32)
    w = rng.random(k).astype(np.float32)
    ref = np.zeros(H, np.float64)
    for wi, e in zip(w, experts):
        gg = x @ widen_bf16(e.gate).astype(np.float64).T
        hh = gg / (1 + np.exp(-gg)) * (x @ widen_bf16(e.up).astype(np.float64).T)
        ref += wi * (hh @ widen_bf16(e.down).astype(np.float64).T)
    out = np.ones(H, np.float32)
    experts_decode(out, x, experts, w)
    np.testing.assert_allclose(out - 1.0, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_default_model_parity(default_hf_dir):
    """The bundled default model (SmolLM2-135M upcycled to Mixtral, 30 layers) vs transformers
    float32: logits of a 16-token prompt and 8 greedy tokens through the KV cache."""
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from tiny_models import load_hf

    model = build_model(CheckpointSource(default_hf_dir))
    hf = load_hf(default_hf_dir)
    ids = np.random.default_rng(5).integers(0, model.config.vocab_size, 16)
    ref = hf_logits(hf, ids)
    cache = model.new_cache()
    ours = model.forward(ids, cache, last_only=False)
    assert np.abs(ours - ref).max() <= LOGITS_TOL
    seq, toks = list(ids), []
    logits = ours[-1]
    for _ in range(8):
        toks.append(int(np.argmax(logits)))
        logits = model.forward(np.array(toks[-1:]), cache)
    for t in toks:
        seq.append(int(np.argmax(hf_logits(hf, seq)[-1])))
    assert toks == seq[16:]
