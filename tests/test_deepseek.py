"""DeepSeek lineage: Multi-head Latent Attention against transformers' attention modules (q
low-rank or not, interleaved or half-split RoPE, YaRN with mscale, both backends, through the
latent cache), YaRN frequencies and score scale against transformers' rope functions, the latent
cache's size, the DeepSeek-V2 config rules, and the DeepSeek-V2-Lite shaped checkpoint with
random norms: every tensor read, none missing, logits as transformers'."""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zipmoe_rt.families import ConfigError, get_architecture, get_family  # noqa: E402
from zipmoe_rt.families.deepseek_v2 import DeepseekV2HParams  # noqa: E402
from zipmoe_rt.models import build_model  # noqa: E402
from zipmoe_rt.models.cache import LatentCache  # noqa: E402
from zipmoe_rt.models.mla import MLAttention  # noqa: E402
from zipmoe_rt.models.rope import interleaved_to_halves  # noqa: E402
from zipmoe_rt.models.rope import RoPE, rope_inv_freq, softmax_scale  # noqa: E402
from zipmoe_rt.models.weights import CheckpointSource  # noqa: E402

from tiny_models import SPECS, load_hf, make_tiny  # noqa: E402

YARN = dict(rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=0.707, mscale_all_dim=0.707,
            original_max_position_embeddings=128, beta_fast=32, beta_slow=1)
SHAPE = dict(hidden_size=64, num_attention_heads=4, num_key_value_heads=4, kv_lora_rank=24,
             qk_nope_head_dim=12, qk_rope_head_dim=8, v_head_dim=10, attention_bias=True,
             max_position_embeddings=512, num_experts_per_tok=2)


def _hf_attention(version, q_lora, interleave, rope):
    """A transformers DeepseekV{2,3}Attention with random weights and norms, its rotary
    embedding and config."""
    kw = dict(SHAPE, vocab_size=64, num_hidden_layers=1, q_lora_rank=q_lora, n_routed_experts=4)
    if rope is not None:
        kw["rope_parameters"] = dict(rope)
    if version == 3:
        kw["rope_interleave"] = interleave
        mod = transformers.models.deepseek_v3.modeling_deepseek_v3
        cfg = transformers.DeepseekV3Config(**kw)
        att_cls, rot_cls = mod.DeepseekV3Attention, mod.DeepseekV3RotaryEmbedding
    else:
        mod = transformers.models.deepseek_v2.modeling_deepseek_v2
        cfg = transformers.DeepseekV2Config(**kw)
        att_cls, rot_cls = mod.DeepseekV2Attention, mod.DeepseekV2RotaryEmbedding
    cfg._attn_implementation = "eager"
    torch.manual_seed(q_lora or 0)
    att = att_cls(cfg, 0).eval()
    with torch.no_grad():
        for n, p in att.named_parameters():
            p.copy_(0.5 + torch.rand(p.shape) if "norm" in n else 0.1 * torch.randn(p.shape))
    return att, rot_cls(cfg), cfg


@pytest.mark.parametrize("backend", ["numba", "numpy"])
@pytest.mark.parametrize("version,q_lora,interleave,yarn", [
    (2, 16, True, False), (2, None, True, True), (3, 16, True, True), (3, None, False, False),
    (3, 16, False, True)])
def test_mla_matches_transformers_attention(backend, version, q_lora, interleave, yarn):
    """Outputs of MLAttention over a latent cache filled in three calls equal transformers'
    attention run over the whole sequence (causal mask), and the cache holds exactly the
    normalised latent and the rotated k_pe transformers caches."""
    att, rot, cfg = _hf_attention(version, q_lora, interleave, YARN if yarn else None)
    T = 9
    x = torch.randn(1, T, 64, generator=torch.Generator().manual_seed(5))
    pe = rot(x, torch.arange(T)[None])
    mask = torch.full((T, T), float("-inf")).triu(1)[None, None]
    cache = transformers.DynamicCache(config=cfg)
    with torch.no_grad():
        ref = att(x, position_embeddings=pe, attention_mask=mask, cache=cache)[0][0].numpy()
    hp = DeepseekV2HParams(**SHAPE, num_experts=4, q_lora_rank=q_lora or 0,
                           rope=dict(cfg.rope_parameters), rope_interleave=interleave)
    hp.validate()
    sd = {k: v.numpy() for k, v in att.state_dict().items()}
    w = dict(wkv_a=sd["kv_a_proj_with_mqa.weight"], kv_a_norm=sd["kv_a_layernorm.weight"],
             wkv_b=sd["kv_b_proj.weight"], wo=sd["o_proj.weight"],
             bkv_a=sd["kv_a_proj_with_mqa.bias"], bo=sd["o_proj.bias"])
    if q_lora:
        w.update(wq_a=sd["q_a_proj.weight"], q_a_norm=sd["q_a_layernorm.weight"],
                 wq_b=sd["q_b_proj.weight"], bq_a=sd["q_a_proj.bias"])
    else:
        w["wq"] = sd["q_proj.weight"]
    m = MLAttention(hp, 0, scale=softmax_scale(hp, 20), backend=backend, **w)
    assert np.float32(att.scaling) == m.scale
    rope, c = RoPE(hp), m.new_cache(2)
    xs, outs = x[0].numpy(), []
    for a, b in ((0, 4), (4, 5), (5, T)):
        c.reserve(b - a)
        outs.append(m(np.ascontiguousarray(xs[a:b]), c, a, *rope.cos_sin(a, b - a)))
        c.commit(b - a)
    got = np.concatenate(outs)
    assert np.abs(got - ref).max() < 1e-5 * max(1.0, np.abs(ref).max())
    # the cache: [latent, rope(k_pe)] per position; k_pe in rotate_half order
    lat, kpe = (t[0, 0].numpy() for t in (cache.layers[0].keys, cache.layers[0].values))
    perm = interleaved_to_halves(8) if interleave else np.arange(8)
    if version == 2:     # V2's complex product leaves the pairs interleaved (V3's
        kpe = kpe[:, perm]   # interleave function returns the two halves already)
    assert c.length == T and c.kv.shape[1] == 24 + 8
    np.testing.assert_allclose(c.kv[:T, :24], lat, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(c.kv[:T, 24:], kpe, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("kind", ["bf16", "f16", "f32"])
@pytest.mark.parametrize("nh,T,n_out,n_in", [(4, 1, 24, 12), (3, 5, 10, 24), (16, 2, 512, 128)])
def test_heads_linear_both_backends(kind, nh, T, n_out, n_in):
    """The per-head product of the absorbed kv_b_proj against a float64 reference on both
    backends (the last shape runs the parallel kernel), and its errors."""
    from zipmoe_rt.backends import get_backend

    rng = np.random.default_rng(nh * 100 + T)
    w = rng.standard_normal((nh, n_out, n_in)).astype(np.float32)
    if kind == "bf16":
        W = (w.view(np.uint32) >> 16).astype(np.uint16)
        wf = (W.astype(np.uint32) << 16).view(np.float32)
    else:
        W = w.astype(np.float16 if kind == "f16" else np.float32)
        wf = W.astype(np.float32)
    x = rng.standard_normal((nh, T, n_in)).astype(np.float32)
    ref = np.einsum("hti,hoi->hto", x.astype(np.float64), wf.astype(np.float64))
    for name in ("numba", "numpy"):
        be = get_backend(name)
        y = be.heads_linear(x, W)
        assert y.shape == (nh, T, n_out) and y.dtype == np.float32
        np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5 * np.abs(ref).max())
        out = np.full((nh, T, n_out), np.nan, np.float32)
        assert be.heads_linear(x, W, out) is out and np.array_equal(out, y)
        with pytest.raises(TypeError):
            be.heads_linear(x, W.astype(np.int32))
        with pytest.raises(ValueError, match="disagree"):
            be.heads_linear(x[:-1] if nh > 1 else x[:, :, :-1], W)


def test_mla_refuses_a_backend_without_its_ops():
    """A backend lacking heads_linear is refused by name at build time."""
    from zipmoe_rt.backends.base import Backend
    from zipmoe_rt.backends.numpy_ref import NumpyBackend

    class NoHeads(NumpyBackend):
        name = "noheads"
        heads_linear = Backend.heads_linear

    att, _, cfg = _hf_attention(2, None, True, None)
    hp = DeepseekV2HParams(**SHAPE, num_experts=4, q_lora_rank=0)
    hp.validate()
    sd = {k: v.numpy() for k, v in att.state_dict().items()}
    with pytest.raises(ValueError, match="backend 'noheads' cannot run Multi-head Latent"):
        MLAttention(hp, 0, sd["kv_a_proj_with_mqa.weight"], sd["kv_a_layernorm.weight"],
                    sd["kv_b_proj.weight"], sd["o_proj.weight"], 0.2, wq=sd["q_proj.weight"],
                    backend=NoHeads())


def test_yarn_frequencies_and_score_scale_match_transformers():
    """rope_inv_freq and softmax_scale against ROPE_INIT_FUNCTIONS["yarn"] and
    yarn_apply_mscale for DeepSeek-V2's and -V3's YaRN settings (tiny head sizes); mscale_all_dim
    changes the score scale, the default rope does not."""
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS, yarn_apply_mscale

    for rope, mpe in ((YARN, 512), (dict(YARN, factor=40.0, original_max_position_embeddings=4096,
                                          mscale=1.0, mscale_all_dim=1.0), 163840)):
        cfg = transformers.DeepseekV3Config(**dict(SHAPE, max_position_embeddings=mpe),
                                            rope_parameters=dict(rope))
        inv, attn = ROPE_INIT_FUNCTIONS["yarn"](cfg)
        hp = DeepseekV2HParams(**dict(SHAPE, max_position_embeddings=mpe), num_experts=4,
                               rope=dict(cfg.rope_parameters))
        hp.validate()
        got_inv, got_attn = rope_inv_freq(hp)
        np.testing.assert_array_equal(got_inv, inv.numpy())
        assert got_attn == pytest.approx(attn, rel=1e-12)
        want = yarn_apply_mscale(cfg.rope_parameters, 20 ** -0.5)
        assert softmax_scale(hp, 20) == pytest.approx(want, rel=1e-12)
        assert softmax_scale(hp, 20) > 1.05 * 20 ** -0.5
    assert softmax_scale(DeepseekV2HParams(num_experts_per_tok=2), 192) == 192 ** -0.5


@pytest.mark.parametrize("name", [n for n, (f, _) in SPECS.items() if f == "deepseek_v2"])
def test_latent_cache_holds_the_latent_only(tiny_moe_dir, name):
    """Every layer's cache is a LatentCache of kv_lora_rank + qk_rope_head_dim float32 values
    per position; Model.new_cache's nbytes says so; kv_values_per_token sums the layers."""
    net = build_model(CheckpointSource(tiny_moe_dir(name)))
    a = net.args
    width = a.kv_lora_rank + a.qk_rope_head_dim
    assert a.kv_values_per_token() == a.num_hidden_layers * width == 3 * 40
    cache = net.new_cache(capacity=16)
    assert all(type(lc) is LatentCache and lc.kv.shape == (16, width) for lc in cache.layers)
    assert cache.nbytes == 16 * a.kv_values_per_token() * 4
    net.forward(np.arange(20), cache)            # grows by doubling, still only the latent
    assert cache.offset == 20 and cache.nbytes == 32 * a.kv_values_per_token() * 4


class _Recording(CheckpointSource):
    """A CheckpointSource that records every tensor and expert asked for."""

    def __init__(self, folder):
        super().__init__(folder)
        self.asked, self.experts = [], set()

    def tensor(self, name):
        self.asked.append(name)
        return super().tensor(name)

    def expert(self, layer, expert):
        self.experts.add((layer, expert))
        return super().expert(layer, expert)


def test_v2_lite_shape_random_norms_reads_every_tensor(tmp_path):
    """DeepSeek-V2-Lite's shape (q_lora_rank null, kv_lora_rank, a dense first layer, two shared
    experts, greedy routing) with every RMSNorm weight uniform in [0.5, 1.5]: the runtime reads
    each tensor of the checkpoint (every expert used at least once over the prompt), asks for
    none that is absent, and its logits match transformers'."""
    folder = make_tiny("deepseek_v2_lite", tmp_path / "ck", seed=3)
    hf = load_hf(folder)
    g = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for n, p in hf.named_parameters():
            if n.endswith("norm.weight"):
                p.copy_((0.5 + torch.rand(p.shape, generator=g)).to(torch.bfloat16).float())
    hf.save_pretrained(folder)                      # float32 now: the norms exactly as set
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["q_lora_rank"] is None and cfg["first_k_dense_replace"] == 1
    src = _Recording(folder)
    assert src.hparams["q_lora_rank"] == 0
    net = build_model(src)
    ids = np.arange(0, 256, 5)
    ours = net.forward(ids, net.new_cache(), last_only=False)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-3
    names = set(src.ckpt.tensors)
    dense = {n for n in names if src.arch.expert_tensor(n) is None}
    assert set(src.asked) == dense                  # every dense tensor, nothing absent
    assert not [n for n in dense if "q_a_proj" in n or "q_b_proj" in n]
    norms = [n for n in dense if n.endswith("norm.weight")]
    assert len(norms) == 3 * 3 + 1                  # input, post-attention, kv_a; final
    assert src.experts == {(i, e) for i in (1, 2) for e in range(8)}


def _v2_config(**over):
    cfg = {"architectures": ["DeepseekV2ForCausalLM"], "model_type": "deepseek_v2",
           "vocab_size": 102400, "hidden_size": 2048, "num_hidden_layers": 27,
           "num_attention_heads": 16, "num_key_value_heads": 16, "intermediate_size": 10944,
           "moe_intermediate_size": 1408, "n_routed_experts": 64, "num_experts_per_tok": 6,
           "n_shared_experts": 2, "first_k_dense_replace": 1, "moe_layer_freq": 1,
           "q_lora_rank": None, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
           "qk_rope_head_dim": 64, "v_head_dim": 128, "topk_method": "greedy",
           "routed_scaling_factor": 1.0, "norm_topk_prob": False, "rms_norm_eps": 1e-6,
           "max_position_embeddings": 163840, "rope_theta": 10000,
           "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                            "mscale": 0.707, "mscale_all_dim": 0.707,
                            "original_max_position_embeddings": 4096}}
    cfg.update(over)
    return cfg


def test_v2_lite_config_reads_as_the_released_model():
    """DeepSeek-V2-Lite's config.json: the values the runtime stores and the derived ones."""
    hp = get_architecture(_v2_config()).typed_hparams()
    assert (hp.q_lora_rank, hp.head_dim, hp.shared_expert_intermediate_size) == (0, 64, 2816)
    assert hp.moe_layers == list(range(1, 27)) and hp.num_experts == 64
    assert hp.rope["rope_type"] == "yarn" and hp.rope["mscale_all_dim"] == 0.707
    assert hp.kv_values_per_token() == 27 * 576
    fam = get_family("deepseek_v2")
    assert fam.hf_config(hp)["q_lora_rank"] is None
    names = {s.name for s in fam.tensor_specs(hp)}
    assert "model.layers.0.self_attn.q_proj.weight" in names
    assert "model.layers.0.mlp.gate_proj.weight" in names
    assert "model.layers.1.mlp.shared_experts.up_proj.weight" in names
    assert not any("q_a_proj" in n or "k_proj" in n for n in names)
    full = get_architecture(_v2_config(q_lora_rank=1536, topk_method="group_limited_greedy",
                                       n_group=8, topk_group=3, num_experts_per_tok=6,
                                       n_routed_experts=160)).typed_hparams()
    assert (full.q_lora_rank, full.n_group, full.topk_group) == (1536, 8, 3)


@pytest.mark.parametrize("over,needle", [
    (dict(moe_layer_freq=2), "moe_layer_freq"),
    (dict(norm_topk_prob=True), "norm_topk_prob"),
    (dict(topk_method="noaux_tc"), "topk_method"),
    (dict(topk_method="group_limited_greedy"), "n_group"),
    (dict(topk_method="group_limited_greedy", n_group=5, topk_group=2), "n_group"),
    (dict(topk_method="group_limited_greedy", n_group=8, topk_group=9), "topk_group"),
    (dict(qk_rope_head_dim=63), "qk_rope_head_dim"),
    (dict(kv_lora_rank=0), "kv_lora_rank"),
    (dict(q_lora_rank="1536"), "q_lora_rank"),
    (dict(routed_scaling_factor=0), "routed_scaling_factor"),
    (dict(num_experts_per_tok=None), "num_experts_per_tok"),
])
def test_v2_config_errors_name_the_field(over, needle):
    with pytest.raises(ConfigError, match=needle):
        get_architecture(_v2_config(**over)).typed_hparams()


def test_stored_hparams_that_lie_about_mla_shapes_are_refused():
    """A container whose kv_lora_rank disagrees with its MLA tensors is refused naming the
    tensor and the field."""
    import zmoe

    from zipmoe_rt.families.check import check_stored_tensors

    hp = get_architecture(_v2_config(num_hidden_layers=2)).typed_hparams()
    fam = get_family("deepseek_v2")
    shapes = {s.name: list(s.shape) for s in fam.tensor_specs(hp)}
    check_stored_tensors(hp.to_hparams(), shapes, "x.zmoe")
    with pytest.raises(zmoe.CorruptIndexError, match="kv_a_proj_with_mqa.*hparams kv_lora_rank"):
        check_stored_tensors(dict(hp.to_hparams(), kv_lora_rank=256), shapes, "x.zmoe")


# ---------------------------------------------------------------------------------------------
# DeepSeek-V3 and GLM-4-MoE-Lite


def test_v3_and_glm_lite_configs():
    """DeepSeek-V3's released config.json (BF16) and GLM-4.7-Flash's read as the models are;
    a quantisation other than FP8 blocks (tests/test_lowprec_fp8.py), another router or scoring
    function, or a partial rotary factor are refused naming the key."""
    v3 = {"architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
          "vocab_size": 129280, "hidden_size": 7168, "num_hidden_layers": 61,
          "num_attention_heads": 128, "num_key_value_heads": 128, "intermediate_size": 18432,
          "moe_intermediate_size": 2048, "n_routed_experts": 256, "num_experts_per_tok": 8,
          "n_shared_experts": 1, "first_k_dense_replace": 3, "q_lora_rank": 1536,
          "kv_lora_rank": 512, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
          "v_head_dim": 128, "n_group": 8, "topk_group": 4, "topk_method": "noaux_tc",
          "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
          "num_nextn_predict_layers": 1, "rope_theta": 10000,
          "rope_scaling": {"type": "yarn", "factor": 40, "beta_fast": 32, "beta_slow": 1,
                           "mscale": 1.0, "mscale_all_dim": 1.0,
                           "original_max_position_embeddings": 4096},
          "max_position_embeddings": 163840}
    hp = get_architecture(v3).typed_hparams()
    assert (hp.topk_method, hp.norm_topk_prob, hp.rope_interleave, hp.n_group) == (
        "noaux_tc", True, True, 8)
    assert hp.moe_layers == list(range(3, 61)) and hp.shared_expert_intermediate_size == 2048
    assert hp.kv_values_per_token() == 61 * 576
    assert softmax_scale(hp, 192) == pytest.approx(192 ** -0.5 * (0.1 * np.log(40) + 1) ** 2)
    names = {s.name for s in get_family("deepseek_v3").tensor_specs(hp)}
    assert "model.layers.3.mlp.gate.e_score_correction_bias" in names
    assert "model.layers.2.mlp.gate.e_score_correction_bias" not in names
    for over, needle in ((dict(quantization_config={"quant_method": "awq"}),
                          "quantization_config.quant_method 'awq' is not supported"),
                         (dict(topk_method="greedy"), "topk_method"),
                         (dict(scoring_func="softmax"), "scoring_func"),
                         (dict(n_group=7), "n_group"),
                         (dict(n_group=256, topk_group=256), "fewer than 2 experts"),
                         (dict(rope_scaling=None, rope_parameters={
                             "rope_type": "default", "rope_theta": 1e4,
                             "partial_rotary_factor": 0.5}), "partial_rotary_factor"),
                         (dict(partial_rotary_factor=0.5), "partial_rotary_factor")):
        with pytest.raises(ConfigError, match=needle):
            get_architecture(dict(v3, **over)).typed_hparams()
    glm = {"architectures": ["Glm4MoeLiteForCausalLM"], "model_type": "glm4_moe_lite",
           "vocab_size": 154880, "hidden_size": 2048, "num_hidden_layers": 47,
           "num_attention_heads": 20, "num_key_value_heads": 20, "intermediate_size": 10240,
           "moe_intermediate_size": 1536, "n_routed_experts": 64, "num_experts_per_tok": 4,
           "q_lora_rank": 768, "kv_lora_rank": 512, "qk_nope_head_dim": 192,
           "qk_rope_head_dim": 64, "v_head_dim": 256, "rope_theta": 1000000}
    g = get_architecture(glm).typed_hparams()
    assert (g.moe_layers, g.first_k_dense_replace) == (list(range(1, 47)), 1)
    assert (g.routed_scaling_factor, g.norm_topk_prob, g.rms_norm_eps) == (1.8, True, 1e-5)
    types = ["dense", "sparse", "dense"] + ["sparse"] * 44
    g2 = get_architecture(dict(glm, mlp_layer_types=types)).typed_hparams()
    assert g2.moe_layers == [1] + list(range(3, 47))
    assert get_family("glm4_moe_lite").hf_config(g2)["mlp_layer_types"] == types
    with pytest.raises(ConfigError, match="mlp_layer_types"):
        get_architecture(dict(glm, mlp_layer_types=["dense"] * 3)).typed_hparams()


def _route_choices(net, ids):
    seen = {}
    net.route_hook = lambda layer, x, logits, idx, w: seen.setdefault(layer, idx.copy())
    logits = net.forward(ids, net.new_cache(), last_only=False)
    net.route_hook = None
    return logits, seen


def test_v3_correction_bias_is_read_f32_and_steers_the_choice(tiny_moe_dir, tmp_path):
    """The F32 e_score_correction_bias reaches the router bit for bit; raising it for three
    experts of one group changes which experts are chosen (and the output), and transformers
    agrees on the changed model."""
    import shutil

    from safetensors.torch import load_file, save_file

    folder = tiny_moe_dir("deepseek_v3")
    src = CheckpointSource(folder)
    net = build_model(src)
    name = "model.layers.1.mlp.gate.e_score_correction_bias"
    stored = src.tensor(name)
    assert stored.dtype == np.float32 and np.abs(stored).max() > 0
    assert np.array_equal(net.layers[1].mlp.router.bias, stored)
    ids = np.arange(3, 200, 9)
    before, chosen = _route_choices(net, ids)
    moved = tmp_path / "moved"
    shutil.copytree(folder, moved)
    tensors = load_file(moved / "model.safetensors")
    tensors[name] = tensors[name] + (torch.arange(8) >= 5).float()
    save_file(tensors, moved / "model.safetensors", metadata={"format": "pt"})
    net2 = build_model(CheckpointSource(moved))
    after, chosen2 = _route_choices(net2, ids)
    assert set(chosen2[1].ravel()) >= {5, 6, 7} and not np.array_equal(chosen[1], chosen2[1])
    assert np.abs(after - before).max() > 1e-2
    hf = load_hf(moved)
    with torch.no_grad():
        ref = hf(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(after - ref).max() <= 1e-3


def test_glm_lite_dense_layers_follow_mlp_layer_types(tmp_path):
    """A GLM-4-MoE-Lite checkpoint whose middle layer is dense (mlp_layer_types) matches
    transformers, with the dense MLP in layer 1 and routed experts in layers 0 and 2."""
    SPECS["_glm_lite_mid_dense"] = ("glm4_moe_lite", dict(
        SPECS["glm4_moe_lite"][1], mlp_layer_types=["sparse", "dense", "sparse"]))
    try:
        folder = make_tiny("_glm_lite_mid_dense", tmp_path / "ck")
    finally:
        del SPECS["_glm_lite_mid_dense"]
    src = CheckpointSource(folder)
    assert src.hparams["moe_layers"] == [0, 2] and src.hparams["first_k_dense_replace"] == 0
    net = build_model(src)
    ids = np.arange(1, 250, 7)
    ours = net.forward(ids, net.new_cache(), last_only=False)
    with torch.no_grad():
        ref = load_hf(folder)(torch.from_numpy(ids)[None]).logits[0].numpy()
    assert np.abs(ours - ref).max() <= 1e-3
    assert hasattr(net.layers[1].mlp, "down") and hasattr(net.layers[2].mlp, "router")


def test_size_plan_of_a_v2_lite_config_counts_the_latent_cache(tmp_path):
    """`zipmoe-rt plan` on DeepSeek-V2-Lite's config.json: the KV cache per token is the latent
    (27 layers x 576 float32 values), the parameter counts those of the released model."""
    from zipmoe_rt.plan import size_plan

    (tmp_path / "config.json").write_text(json.dumps(_v2_config()))
    p = size_plan(tmp_path)
    assert (p.kv_values_per_token, p.kv_bytes_per_token) == (27 * 576, 27 * 576 * 4)
    assert p.family == "deepseek_v2" and p.experts == 26 * 64
    total = p.expert_params + p.dense_params
    assert 15.6e9 < total < 15.8e9            # DeepSeek-V2-Lite: 15.7 B parameters


@pytest.mark.parametrize("config,billions,kv", [
    (dict(architectures=["DeepseekV3ForCausalLM"], vocab_size=129280, hidden_size=7168,
          num_hidden_layers=61, num_attention_heads=128, num_key_value_heads=128,
          intermediate_size=18432, moe_intermediate_size=2048, n_routed_experts=256,
          num_experts_per_tok=8, n_shared_experts=1, first_k_dense_replace=3, q_lora_rank=1536,
          kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128,
          n_group=8, topk_group=4), 671.0, 61 * 576),
    (dict(architectures=["Glm4MoeLiteForCausalLM"], vocab_size=154880, hidden_size=2048,
          num_hidden_layers=47, num_attention_heads=20, num_key_value_heads=20,
          intermediate_size=10240, moe_intermediate_size=1536, n_routed_experts=64,
          num_experts_per_tok=4, q_lora_rank=768, kv_lora_rank=512, qk_nope_head_dim=192,
          qk_rope_head_dim=64, v_head_dim=256), 29.9, 47 * 576),
])
def test_size_plan_of_v3_and_glm_flash_shapes(tmp_path, config, billions, kv):
    """The registry's tensor shapes add up to the released models' sizes (DeepSeek-V3: 671 B
    without the multi-token-prediction layer; GLM-4.7-Flash: about 30 B), with the latent cache."""
    from zipmoe_rt.plan import size_plan

    (tmp_path / "config.json").write_text(json.dumps(config))
    p = size_plan(tmp_path)
    assert (p.expert_params + p.dense_params) / 1e9 == pytest.approx(billions, abs=0.05)
    assert p.kv_values_per_token == kv
