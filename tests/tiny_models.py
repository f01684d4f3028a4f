"""Tiny random Hugging Face MoE checkpoints, built with transformers at test time (never
committed): Mixtral, Qwen2-MoE (shared expert, a dense-MLP layer) and Qwen3-MoE, saved in BF16
with ``save_pretrained`` (optionally sharded).

Import only from tests that have already done ``pytest.importorskip("torch")`` /
``("transformers")``. Seeds are fixed, so a spec always produces the same weights.
"""
from __future__ import annotations

from pathlib import Path

#: weight init std: larger than transformers' 0.02 so the random model's logits are peaked
#: enough for greedy decoding to be stable against float rounding.
INIT_STD = 0.1

COMMON = dict(vocab_size=256, hidden_size=64, num_hidden_layers=3, num_attention_heads=4,
              num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-6,
              initializer_range=INIT_STD, tie_word_embeddings=False)

#: name -> (family, config kwargs); the transformers config / model classes come from the
#: family's registry entry (:func:`hf_classes`).
SPECS = {
    "mixtral": ("mixtral", dict(
        COMMON, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
        rope_theta=10000.0)),
    "mixtral_tied_swa": ("mixtral", dict(
        COMMON, intermediate_size=96, num_local_experts=4, num_experts_per_tok=2,
        tie_word_embeddings=True, sliding_window=6, rope_theta=10000.0)),
    "qwen2_moe": ("qwen2_moe", dict(
        COMMON, intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
        num_experts=8, num_experts_per_tok=2, norm_topk_prob=False, decoder_sparse_step=1,
        mlp_only_layers=[1], qkv_bias=True, rope_theta=10000.0)),
    "qwen2_moe_step2": ("qwen2_moe", dict(
        COMMON, intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=2,
        mlp_only_layers=[], rope_theta=10000.0)),
    "qwen2_moe_swa": ("qwen2_moe", dict(
        COMMON, intermediate_size=128, moe_intermediate_size=48, shared_expert_intermediate_size=80,
        num_experts=4, num_experts_per_tok=2, norm_topk_prob=False, use_sliding_window=True,
        sliding_window=5, max_window_layers=2, rope_theta=10000.0)),
    "qwen3_moe": ("qwen3_moe", dict(
        COMMON, head_dim=32, intermediate_size=128, moe_intermediate_size=48, num_experts=8,
        num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1, mlp_only_layers=[],
        rope_theta=1000000.0)),
    "olmoe": ("olmoe", dict(
        COMMON, num_key_value_heads=4, intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        norm_topk_prob=False, rope_theta=10000.0)),
    "olmoe_clip": ("olmoe", dict(
        COMMON, intermediate_size=48, num_experts=4, num_experts_per_tok=2, norm_topk_prob=True,
        attention_bias=True, clip_qkv=1.0, rope_theta=10000.0)),
    # GLM-4-MoE: a dense first layer, shared experts, sigmoid router with a random F32
    # correction bias (make_tiny), partial rotary; renormalised and scaled (weights sum 2.5) or
    # not, one group or four groups of which two are kept, q/k norms
    "glm4_moe": ("glm4_moe", dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1, norm_topk_prob=True,
        routed_scaling_factor=2.5, attention_bias=True, partial_rotary_factor=0.5,
        rope_theta=10000.0)),
    "glm4_moe_groups": ("glm4_moe", dict(
        COMMON, head_dim=32, intermediate_size=96, moe_intermediate_size=32, n_routed_experts=8,
        num_experts_per_tok=3, n_shared_experts=2, first_k_dense_replace=1, n_group=4,
        topk_group=2, norm_topk_prob=False, routed_scaling_factor=1.5, use_qk_norm=True,
        partial_rotary_factor=0.25, rope_theta=1000000.0)),
    # PhiMoE: LayerNorms, biases on attention and head, the sparsemixer router with the released
    # jitter (0.01) and LongRoPE with distinct factors and mscales around a short original length
    # (prompts of 16 stay short, greedy decoding crosses it at 33 tokens); then a variant with a
    # jitter whose masks keep several experts (weights far from 1), a sliding window, no biases
    # and the default rope.
    "phimoe": ("phimoe", dict(
        COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
        attention_bias=True, lm_head_bias=True, router_jitter_noise=0.01, rope_theta=10000.0,
        rope_scaling=dict(type="longrope", original_max_position_embeddings=32,
                          short_factor=[1.0 + 0.15 * i for i in range(8)],
                          long_factor=[1.5 + 0.9 * i for i in range(8)],
                          short_mscale=1.15, long_mscale=1.4))),
    "phimoe_jitter_swa": ("phimoe", dict(
        COMMON, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2,
        router_jitter_noise=0.3, sliding_window=6, rope_theta=10000.0)),
    # DeepSeek-V2 (MLA): the V2-Lite shape (plain q_proj, greedy routing) and the V2 shape
    # (low-rank q, group-limited routing, YaRN with mscale, attention biases)
    "deepseek_v2_lite": ("deepseek_v2", dict(
        COMMON, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=24, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
        topk_method="greedy", routed_scaling_factor=1.0, rope_theta=10000.0)),
    "deepseek_v2": ("deepseek_v2", dict(
        COMMON, num_key_value_heads=4, q_lora_rank=32, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
        topk_method="group_limited_greedy", n_group=4, topk_group=2, routed_scaling_factor=2.5,
        attention_bias=True, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=0.707, mscale_all_dim=0.707,
            original_max_position_embeddings=128, beta_fast=32, beta_slow=1))),
    # DeepSeek-V3: noaux_tc router with a random F32 correction bias (make_tiny), interleaved
    # RoPE with YaRN and renormalised, scaled weights (sum 2.5); or half-split RoPE, a plain
    # q_proj, one group and weights not renormalised. GLM-4-MoE-Lite: its own layer pattern
    "deepseek_v3": ("deepseek_v3", dict(
        COMMON, num_key_value_heads=4, q_lora_rank=24, kv_lora_rank=32, qk_nope_head_dim=16,
        qk_rope_head_dim=8, v_head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=3, n_shared_experts=1, first_k_dense_replace=1,
        n_group=4, topk_group=2, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_interleave=True, rope_parameters=dict(
            rope_type="yarn", rope_theta=10000.0, factor=4.0, mscale=1.0, mscale_all_dim=1.0,
            original_max_position_embeddings=128, beta_fast=32, beta_slow=1))),
    "deepseek_v3_plain": ("deepseek_v3", dict(
        COMMON, num_key_value_heads=4, q_lora_rank=None, kv_lora_rank=32, qk_nope_head_dim=8,
        qk_rope_head_dim=16, v_head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=2,
        n_group=1, topk_group=1, norm_topk_prob=False, routed_scaling_factor=1.5,
        rope_interleave=False, attention_bias=True, rope_theta=10000.0)),
    "glm4_moe_lite": ("glm4_moe_lite", dict(
        COMMON, num_key_value_heads=4, rms_norm_eps=1e-5, q_lora_rank=24, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=24, intermediate_size=96,
        moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=1.8,
        mlp_layer_types=["dense", "sparse", "sparse"], rope_theta=1000000.0)),
    # Granite-MoE / Granite-MoE-Shared: every multiplier away from 1 (the attention scale 0.1
    # instead of head_dim**-0.5 = 0.25), the shared MLP, biases on q/k/v/o in one spec.
    "granitemoe": ("granitemoe", dict(
        COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
        embedding_multiplier=6.0, residual_multiplier=0.5, attention_multiplier=0.1,
        logits_scaling=3.0, rope_theta=10000.0)),
    "granitemoe_shared": ("granitemoeshared", dict(
        COMMON, intermediate_size=48, num_local_experts=8, num_experts_per_tok=2,
        shared_intermediate_size=40, embedding_multiplier=4.0, residual_multiplier=0.7,
        attention_multiplier=0.5, logits_scaling=0.5, attention_bias=True,
        rope_theta=10000.0)),
    # ERNIE 4.5 MoE: a dense first layer, two shared experts, the choice bias (random, F32),
    # interleaved RoPE; the second spec: sparse every other layer, no shared expert, tied head.
    "ernie4_5_moe": ("ernie4_5_moe", dict(
        COMMON, intermediate_size=96, moe_intermediate_size=32, moe_num_experts=8, moe_k=2,
        moe_num_shared_experts=2, moe_layer_start_index=1, moe_layer_end_index=-1,
        moe_layer_interval=1, rope_theta=500000.0)),
    "ernie4_5_moe_interval": ("ernie4_5_moe", dict(
        COMMON, num_hidden_layers=5, intermediate_size=96, moe_intermediate_size=32,
        moe_num_experts=4, moe_k=2, moe_num_shared_experts=0, moe_layer_start_index=0,
        moe_layer_end_index=3, moe_layer_interval=2, tie_word_embeddings=True,
        rope_theta=10000.0)),
    # Qwen3-Next / Qwen3.5-MoE: Gated DeltaNet layers (2 key heads, 4 value heads) mixed with
    # gated full attention (layer_types / full_attention_interval), zero-centred norms, partial
    # rotary, shared expert with its gate; a dense layer and q/k/v/o biases in the second
    "qwen3_next": ("qwen3_next", dict(
        COMMON, num_hidden_layers=4, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=3,
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4, full_attention_interval=2)),
    "qwen3_next_dense_bias": ("qwen3_next", dict(
        COMMON, num_hidden_layers=3, head_dim=16, intermediate_size=96, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=4, num_experts_per_tok=2,
        norm_topk_prob=False, mlp_only_layers=[0], attention_bias=True,
        linear_conv_kernel_dim=3, linear_key_head_dim=8, linear_value_head_dim=16,
        linear_num_key_heads=2, linear_num_value_heads=2,
        layer_types=["full_attention", "full_attention", "linear_attention"])),
    "qwen3_5_moe": ("qwen3_5_moe", dict(
        COMMON, num_hidden_layers=4, head_dim=16, moe_intermediate_size=32,
        shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2,
        linear_conv_kernel_dim=4, linear_key_head_dim=16, linear_value_head_dim=8,
        linear_num_key_heads=2, linear_num_value_heads=4,
        layer_types=["linear_attention", "full_attention", "linear_attention",
                     "full_attention"])),
    # the text model of Qwen3_5MoeForConditionalGeneration (a small vision tower, not run)
    "qwen3_5_moe_vl": ("qwen3_5_moe_vl", dict(
        tie_word_embeddings=False, text_config=dict(
            {k: v for k, v in COMMON.items() if k != "tie_word_embeddings"}, num_hidden_layers=4,
            head_dim=16, moe_intermediate_size=32, shared_expert_intermediate_size=48,
            num_experts=4, num_experts_per_tok=2, linear_conv_kernel_dim=4,
            linear_key_head_dim=16, linear_value_head_dim=8, linear_num_key_heads=2,
            linear_num_value_heads=4, full_attention_interval=2),
        vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2,
                           out_hidden_size=64, patch_size=4, temporal_patch_size=2,
                           spatial_merge_size=2, num_position_embeddings=16))),
    # Gemma 4 (26B-A4B's structure): sliding layers (head_dim 16, 2 kv heads, window 5) and
    # full layers (head 32, proportional RoPE) with one kv head whose values are the keys
    # (attention_k_eq_v), a soft cap that really bends the logits (3.0); then the default
    # pattern and RoPE of a 3-layer model (last layer full), v_proj everywhere, no cap, a tied
    # head. Router scales, layer scalars and every norm are random (make_tiny).
    "gemma4": ("gemma4_text", dict(
        COMMON, num_hidden_layers=4, head_dim=16, global_head_dim=32,
        num_global_key_value_heads=1, attention_k_eq_v=True, intermediate_size=48,
        enable_moe_block=True, num_experts=8, top_k_experts=2, moe_intermediate_size=32,
        hidden_size_per_layer_input=0, sliding_window=5, final_logit_softcapping=3.0,
        layer_types=["sliding_attention", "full_attention", "sliding_attention",
                     "full_attention"])),
    "gemma4_default_pattern": ("gemma4_text", dict(
        COMMON, head_dim=16, global_head_dim=32, intermediate_size=48, enable_moe_block=True,
        num_experts=4, top_k_experts=2, moe_intermediate_size=32, hidden_size_per_layer_input=0,
        sliding_window=6, tie_word_embeddings=True)),
    # the text model of Gemma4ForConditionalGeneration (no vision or audio tower here; a tower
    # is tested in test_gemma4.py): tensors under model.language_model., config in text_config
    "gemma4_vl": ("gemma4", dict(
        text_config=dict(
            COMMON, num_hidden_layers=2, head_dim=16, global_head_dim=32,
            num_global_key_value_heads=1, attention_k_eq_v=True, intermediate_size=48,
            enable_moe_block=True, num_experts=4, top_k_experts=2, moe_intermediate_size=32,
            hidden_size_per_layer_input=0, sliding_window=5, final_logit_softcapping=30.0),
        vision_config=None, audio_config=None, initializer_range=INIT_STD,
        tie_word_embeddings=False)),
    # gpt-oss: sliding (window 5) and full layers alternating, random sinks (std 1), router and
    # expert biases, YaRN; a SwiGLU limit low enough to clamp (about a third of the gate and
    # up pre-activations). The second: other sizes, MHA-like 4/4 heads, head_dim 32, top-3 of
    # 6, the layer pattern given explicitly, a window of 3, another alpha and limit.
    "gpt_oss": ("gpt_oss", dict(
        COMMON, num_hidden_layers=4, head_dim=16, intermediate_size=48, num_local_experts=8,
        num_experts_per_tok=2, sliding_window=5, swiglu_alpha=1.702, swiglu_limit=0.3,
        rope_parameters=dict(rope_type="yarn", rope_theta=150000.0, factor=4.0, beta_fast=32.0,
                             beta_slow=1.0, truncate=False,
                             original_max_position_embeddings=128))),
    "gpt_oss_sizes": ("gpt_oss", dict(
        COMMON, hidden_size=48, num_attention_heads=4, num_key_value_heads=4, head_dim=32,
        intermediate_size=40, num_local_experts=6, num_experts_per_tok=3, sliding_window=3,
        layer_types=["full_attention", "sliding_attention", "sliding_attention"],
        swiglu_alpha=1.2, swiglu_limit=0.5, rope_theta=10000.0,
        rope_parameters=dict(rope_type="default", rope_theta=10000.0))),
    # LFM2-MoE: short-convolution layers mixed with attention (layer_types), dense leading
    # layers, the sigmoid router with a random F32 expert_bias (make_tiny), tied embeddings as
    # released; then attention first, conv biases, a kernel of 4, no dense layer, no expert
    # bias, weights not renormalised and scaled (sum far from 1), an untied head
    "lfm2_moe": ("lfm2_moe", dict(
        {k: v for k, v in COMMON.items() if k != "rms_norm_eps"}, num_hidden_layers=4,
        norm_eps=1e-5, intermediate_size=96, moe_intermediate_size=32, num_experts=8,
        num_experts_per_tok=3, num_dense_layers=1, conv_L_cache=3, conv_bias=False,
        use_expert_bias=True, norm_topk_prob=True, tie_word_embeddings=True,
        layer_types=["conv", "full_attention", "conv", "conv"], rope_theta=1000000.0)),
    "lfm2_moe_bias": ("lfm2_moe", dict(
        {k: v for k, v in COMMON.items() if k != "rms_norm_eps"}, num_hidden_layers=4,
        norm_eps=1e-6, intermediate_size=96, moe_intermediate_size=32, num_experts=4,
        num_experts_per_tok=2, num_dense_layers=0, conv_L_cache=4, conv_bias=True,
        use_expert_bias=False, norm_topk_prob=False, routed_scaling_factor=2.5,
        layer_types=["full_attention", "full_attention", "conv", "conv"], rope_theta=10000.0)),
    # the released layout in small: two dense layers, conv layers around attention, top-4, a
    # kernel of 2, one kv head, expert bias, renormalised and scaled by 1.5
    "lfm2_moe_dense2": ("lfm2_moe", dict(
        {k: v for k, v in COMMON.items() if k != "rms_norm_eps"}, num_hidden_layers=5,
        num_key_value_heads=1, norm_eps=1e-5, intermediate_size=96, moe_intermediate_size=32,
        num_experts=8, num_experts_per_tok=4, num_dense_layers=2, conv_L_cache=2,
        use_expert_bias=True, norm_topk_prob=True, routed_scaling_factor=1.5,
        layer_types=["conv", "full_attention", "conv", "full_attention", "conv"])),
}


def hf_classes(name: str) -> tuple[str, str]:
    """(transformers config class name, model class name) of spec ``name``, from the registry.

    Raises:
        KeyError: unknown name.
    """
    from zipmoe_rt.families import get_family

    fam = get_family(SPECS[name][0])
    return fam.hf_config_class, fam.hf_names[0]


def _randomize_norms(model, torch, gen):
    """Give RMSNorm weights (and biases) non-trivial values so the tests exercise them."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("norm.weight"):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".bias"):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith(".dt_bias"):     # Gated DeltaNet (Qwen3-Next, Qwen3.5-MoE)
                p.copy_(0.5 * torch.randn(p.shape, generator=gen))


def _randomize_correction_bias(model, torch, gen):
    """Router ``e_score_correction_bias`` buffers (DeepSeek-V3 / GLM-4-MoE) and parameters (ERNIE
    4.5's ``moe_statics``): random values of the scale of the scores' spread, kept F32 as
    released checkpoints store them."""
    for mod in model.modules():
        b = getattr(mod, "e_score_correction_bias", None)
        if isinstance(b, torch.nn.Parameter):       # ERNIE 4.5's moe_statics
            mod.e_score_correction_bias = torch.nn.Parameter(
                0.1 * torch.randn(b.shape, generator=gen), requires_grad=False)
        elif isinstance(b, torch.Tensor):
            mod.e_score_correction_bias = 0.1 * torch.randn(b.shape, generator=gen)
        b = getattr(mod, "expert_bias", None)       # LFM2-MoE's router bias (a buffer)
        if isinstance(b, torch.Tensor) and not isinstance(b, torch.nn.Parameter):
            mod.expert_bias = 0.1 * torch.randn(b.shape, generator=gen)


def _randomize_gemma4(model, torch, gen):
    """Gemma 4's router ``scale`` and ``per_expert_scale`` (in 0.5..1.5), ``layer_scalar``
    buffers and the numbered sandwich norms (``*_layernorm_1`` / ``_2``), which are ones at
    init: random values so that a model ignoring them differs."""
    with torch.no_grad():
        for name, p in list(model.named_parameters()) + list(model.named_buffers()):
            if name.endswith(("router.scale", "layer_scalar")) or name.endswith(
                    ("layernorm_1.weight", "layernorm_2.weight")):
                p.copy_(1.0 + 0.2 * torch.randn(p.shape, generator=gen))
            elif name.endswith("router.per_expert_scale"):
                p.copy_(0.5 + torch.rand(p.shape, generator=gen))


def _randomize_gpt_oss(model, torch, gen):
    """gpt-oss: expert biases (``gate_up_proj_bias``, ``down_proj_bias``, zero at init) random
    like the other biases, and the attention sinks with std 1 (the scale of the scores) so that
    they take a visible share of each softmax."""
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("gate_up_proj_bias", "down_proj_bias")):
                p.copy_(0.1 * torch.randn(p.shape, generator=gen))
            elif name.endswith("self_attn.sinks"):
                p.copy_(torch.randn(p.shape, generator=gen))


def make_tiny(name: str, folder, sharded: bool = False, seed: int = 0) -> Path:
    """Create tiny checkpoint ``name`` (a key of :data:`SPECS`) in ``folder`` (BF16 safetensors,
    ``config.json``); with ``sharded`` the weights are split over several shards with an index.

    Returns:
        the folder as a Path.
    Raises:
        KeyError: unknown name.
    """
    import torch
    import transformers

    cfg_cls, model_cls = hf_classes(name)
    kw = SPECS[name][1]
    folder = Path(folder)
    torch.manual_seed(seed)
    cfg = getattr(transformers, cfg_cls)(**kw)
    model = getattr(transformers, model_cls)(cfg)
    _randomize_norms(model, torch, torch.Generator().manual_seed(seed + 1))
    _randomize_gemma4(model, torch, torch.Generator().manual_seed(seed + 3))  # Gemma 4
    if SPECS[name][0] == "gpt_oss":
        _randomize_gpt_oss(model, torch, torch.Generator().manual_seed(seed + 3))
    model = model.to(torch.bfloat16)
    _randomize_correction_bias(model, torch, torch.Generator().manual_seed(seed + 2))
    model.save_pretrained(folder, max_shard_size="200KB" if sharded else "2GB")
    return folder


def load_hf(folder):
    """The checkpoint loaded with transformers in float32, eval mode, eager attention."""
    import torch
    import transformers

    m = transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager")
    return m.eval()
