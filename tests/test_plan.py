"""``zipmoe-rt plan``: a model's sizes from its config.json alone (zipmoe_rt/plan.py), against
transformers (the parameters it creates for the same config, built on the meta device), against
the engine's own budget sizing and file totals on the default model, and its errors; and
``HParams.kv_values_per_token`` against the KV caches of the runtime and of transformers."""
from __future__ import annotations

import json
import re

import numpy as np
import pytest
from click.testing import CliRunner

from zipmoe_rt.cli import main
from zipmoe_rt.families import ARCHITECTURES, family_for_architecture
from zipmoe_rt.plan import EXPERT_STORED_RATIO, PlanError, size_plan

from cli_runner import cli
from tiny_models import SPECS

#: config.json of released checkpoints, as published on the Hugging Face Hub (every field).
PUBLISHED = {
    "mistralai/Mixtral-8x7B-v0.1": {
        "architectures": ["MixtralForCausalLM"], "attention_dropout": 0.0, "bos_token_id": 1,
        "eos_token_id": 2, "hidden_act": "silu", "hidden_size": 4096, "initializer_range": 0.02,
        "intermediate_size": 14336, "max_position_embeddings": 32768, "model_type": "mixtral",
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_local_experts": 8, "output_router_logits": False,
        "rms_norm_eps": 1e-05, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.02,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.36.0.dev0", "use_cache": True, "vocab_size": 32000},
    "Qwen/Qwen3-30B-A3B": {
        "architectures": ["Qwen3MoeForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "bos_token_id": 151643, "decoder_sparse_step": 1,
        "eos_token_id": 151645, "head_dim": 128, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 6144, "max_position_embeddings": 40960,
        "max_window_layers": 48, "mlp_only_layers": [], "model_type": "qwen3_moe",
        "moe_intermediate_size": 768, "norm_topk_prob": True, "num_attention_heads": 32,
        "num_experts": 128, "num_experts_per_tok": 8, "num_hidden_layers": 48,
        "num_key_value_heads": 4, "output_router_logits": False, "rms_norm_eps": 1e-06,
        "rope_scaling": None, "rope_theta": 1000000.0, "router_aux_loss_coef": 0.001,
        "sliding_window": None, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.51.0", "use_cache": True, "use_sliding_window": False,
        "vocab_size": 151936},
    "allenai/OLMoE-1B-7B-0924": {
        "architectures": ["OlmoeForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
        "clip_qkv": None, "eos_token_id": 50279, "hidden_act": "silu", "hidden_size": 2048,
        "initializer_range": 0.02, "intermediate_size": 1024, "max_position_embeddings": 4096,
        "model_type": "olmoe", "norm_topk_prob": False, "num_attention_heads": 16,
        "num_experts": 64, "num_experts_per_tok": 8, "num_hidden_layers": 16,
        "num_key_value_heads": 16, "output_router_logits": False, "pad_token_id": 1,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 10000.0,
        "router_aux_loss_coef": 0.01, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.0.dev0", "use_cache": True, "vocab_size": 50304},
    "deepseek-ai/DeepSeek-V2-Lite": {
        "architectures": ["DeepseekV2ForCausalLM"], "attention_bias": False,
        "attention_dropout": 0.0, "aux_loss_alpha": 0.001, "bos_token_id": 100000,
        "eos_token_id": 100001, "first_k_dense_replace": 1, "hidden_act": "silu",
        "hidden_size": 2048, "initializer_range": 0.02, "intermediate_size": 10944,
        "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v2",
        "moe_intermediate_size": 1408, "moe_layer_freq": 1, "n_group": 1,
        "n_routed_experts": 64, "n_shared_experts": 2, "norm_topk_prob": False,
        "num_attention_heads": 16, "num_experts_per_tok": 6, "num_hidden_layers": 27,
        "num_key_value_heads": 16, "pretraining_tp": 1, "q_lora_rank": None,
        "qk_nope_head_dim": 128, "qk_rope_head_dim": 64, "rms_norm_eps": 1e-06,
        "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 0.707,
                         "mscale_all_dim": 0.707, "original_max_position_embeddings": 4096,
                         "type": "yarn"},
        "rope_theta": 10000, "routed_scaling_factor": 1.0, "scoring_func": "softmax",
        "seq_aux": True, "tie_word_embeddings": False, "topk_group": 1, "topk_method": "greedy",
        "torch_dtype": "bfloat16", "transformers_version": "4.33.1", "use_cache": True,
        "v_head_dim": 128, "vocab_size": 102400},
    "zai-org/GLM-4.5-Air": {
        "architectures": ["Glm4MoeForCausalLM"], "attention_bias": True,
        "attention_dropout": 0.0, "pad_token_id": 151329,
        "eos_token_id": [151329, 151336, 151338], "head_dim": 128, "hidden_act": "silu",
        "hidden_size": 4096, "partial_rotary_factor": 0.5, "initializer_range": 0.02,
        "intermediate_size": 10944, "max_position_embeddings": 131072,
        "model_type": "glm4_moe", "moe_intermediate_size": 1408, "norm_topk_prob": True,
        "num_attention_heads": 96, "n_group": 1, "topk_group": 1, "n_routed_experts": 128,
        "n_shared_experts": 1, "routed_scaling_factor": 1.0, "num_experts_per_tok": 8,
        "first_k_dense_replace": 1, "num_hidden_layers": 46, "num_key_value_heads": 8,
        "rms_norm_eps": 1e-05, "rope_scaling": None, "rope_theta": 1000000,
        "num_nextn_predict_layers": 1, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.54.0", "use_cache": True, "use_qk_norm": False,
        "vocab_size": 151552},
    # the published rope_scaling has 64-entry long_factor / short_factor lists (one per
    # rotary frequency); they set no tensor shape and stand here as 1.0 each
    "microsoft/Phi-3.5-MoE-instruct": {
        "architectures": ["PhiMoEForCausalLM"], "attention_bias": True,
        "attention_dropout": 0.0, "bos_token_id": 1, "eos_token_id": 32000,
        "hidden_act": "silu", "hidden_dropout": 0.0, "hidden_size": 4096,
        "initializer_range": 0.02, "input_jitter_noise": 0.01, "intermediate_size": 6400,
        "lm_head_bias": True, "max_position_embeddings": 131072, "model_type": "phimoe",
        "num_attention_heads": 32, "num_experts_per_tok": 2, "num_hidden_layers": 32,
        "num_key_value_heads": 8, "num_local_experts": 16,
        "original_max_position_embeddings": 4096, "output_router_logits": False,
        "rms_norm_eps": 1e-05,
        "rope_scaling": {"long_factor": [1.0] * 64, "long_mscale": 1.243163121016122,
                         "original_max_position_embeddings": 4096, "short_factor": [1.0] * 64,
                         "short_mscale": 1.243163121016122, "type": "longrope"},
        "rope_theta": 10000.0, "router_aux_loss_coef": 0.0, "router_jitter_noise": 0.01,
        "sliding_window": 131072, "tie_word_embeddings": False, "torch_dtype": "bfloat16",
        "transformers_version": "4.43.3", "use_cache": True, "vocab_size": 32064},
}


def one_line_error(r, *needles):
    assert r.exit_code == 1, (r.exit_code, r.stdout, r.stderr)
    lines = r.stderr.splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.output
    for n in needles:
        assert n in lines[0], (n, lines[0])
    return lines[0]


def write_config(folder, cfg) -> object:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(cfg))
    return folder


def _registered(hub_id):
    arch = PUBLISHED[hub_id]["architectures"][0]
    if arch not in ARCHITECTURES:
        pytest.skip("family not registered")
    return family_for_architecture(arch)


def _hf_meta_model(cfg):
    """transformers' model for ``cfg``, built on the meta device (no memory, no init)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    kw = {k: v for k, v in cfg.items() if k not in ("architectures", "model_type")}
    conf = transformers.AutoConfig.for_model(cfg["model_type"], **kw)
    with torch.device("meta"):     # the class transformers maps the model_type to
        return transformers.AutoModelForCausalLM.from_config(conf)


# -- published configs against transformers --------------------------------------------------
@pytest.mark.parametrize("hub_id", list(PUBLISHED))
def test_parameters_equal_transformers(hub_id, tmp_path):
    """plan's parameter count is the sum of the tensors transformers creates for the same
    config.json and saves (parameters, a tied head counted once, and persistent buffers such as
    a router's score-correction bias), and its expert share is transformers' experts."""
    _registered(hub_id)
    cfg = PUBLISHED[hub_id]
    p = size_plan(write_config(tmp_path / "m", cfg))
    hf = _hf_meta_model(cfg)
    params = dict(hf.named_parameters())          # shared (tied) tensors appear once
    saved = hf.state_dict()
    params.update((n, b) for n, b in hf.named_buffers() if n in saved)   # not inv_freq
    total = sum(t.numel() for t in params.values())
    experts = sum(t.numel() for n, t in params.items() if ".experts." in n)
    assert p.params == total
    assert p.expert_params == experts and p.dense_params == total - experts
    assert p.expert_bytes == 2 * experts and p.dense_bytes == 2 * (total - experts)
    # the routers' score-correction biases are F32 in checkpoints: 4 bytes where BF16 has 2
    f32 = sum(t.numel() for n, t in params.items() if n.endswith("e_score_correction_bias"))
    assert p.source_dense_bytes == p.dense_bytes + 2 * f32
    assert p.zmoe_bytes == p.source_dense_bytes + round(2 * experts * EXPERT_STORED_RATIO)
    hp = p.hparams
    assert p.experts == len(hp.moe_layers) * hp.num_experts
    # ordinary attention caches a key and a value of head_dim per kv head and layer
    # (multi-head latent attention caches its latent instead: its family says how much)
    if "kv_lora_rank" not in cfg:
        c = hf.config
        hd = getattr(c, "head_dim", None) or c.hidden_size // c.num_attention_heads
        assert p.kv_values_per_token == 2 * c.num_hidden_layers * c.num_key_value_heads * hd
    assert p.kv_bytes_per_token == 4 * p.kv_values_per_token


def test_mixtral_published_figures(tmp_path):
    """Mixtral-8x7B: 46,702,792,704 parameters (the total its model card rounds to 46.7B),
    32 layers x 8 experts x 3 x 14336 x 4096 of them in experts; 32 x 2 x 8 x 128 KV values
    per token."""
    p = size_plan(write_config(tmp_path / "m", PUBLISHED["mistralai/Mixtral-8x7B-v0.1"]))
    assert p.params == 46_702_792_704
    assert p.expert_params == 32 * 8 * 3 * 14336 * 4096
    assert p.kv_values_per_token == 65536 and p.kv_bytes_per_token == 262144


def test_sliding_window_does_not_change_kv_per_token(tmp_path):
    cfg = dict(PUBLISHED["mistralai/Mixtral-8x7B-v0.1"])
    full = size_plan(write_config(tmp_path / "a", cfg))
    cfg["sliding_window"] = 4096
    swa = size_plan(write_config(tmp_path / "b", cfg))
    assert swa.hparams.sliding_window == 4096
    assert swa.kv_values_per_token == full.kv_values_per_token


# -- the default model: the file's totals and the engine's budget split ------------------------
@pytest.fixture(scope="module")
def default_source(default_zmoe):
    from zipmoe_rt.engine.store import ZmoeSource
    src = ZmoeSource(default_zmoe)
    yield src
    src.close()


def test_default_model_matches_its_file(default_hf_dir, default_zmoe, default_source):
    """From the default model's config.json alone: the dense bytes and expert blocks of its
    .zmoe, and the file's tensor data within 1 % of the expected size."""
    import zmoe
    p = size_plan(default_hf_dir)
    src = default_source
    assert p.dense_bytes == src.dense_bytes()
    assert p.expert_bytes == sum(l.full_bytes for l in src.layouts.values())
    assert p.experts == len(src.layouts)
    with zmoe.ZmoeReader(default_zmoe) as r:
        h = r.header
        data = h.index_offset - h.data_offset
        assert abs(p.zmoe_bytes - data) < 0.01 * data
        assert p.zmoe_bytes <= data     # padding comes on top
    assert p.kv_values_per_token == 30 * 2 * 3 * 64


@pytest.mark.parametrize("budget", ["25%", "100%", "300MB"])
def test_budget_split_is_the_engines(default_hf_dir, default_source, budget):
    """The budget divides as the engine divides it for the real file (parse_size, then
    budget_split on the loaded ZmoeSource)."""
    from zipmoe_rt.api import parse_size
    from zipmoe_rt.engine.pipeline import budget_split
    b = size_plan(default_hf_dir, budget).budget
    total = parse_size(budget, default_source)
    full, k, tiers = budget_split(default_source, total)
    assert (b.budget, b.expert_full, b.working_set, b.tiers) == (total, full, k * full, tiers)
    assert b.dense + b.working_set + b.tiers == b.budget
    assert b.full_experts == min(tiers // full, len(default_source.layouts))
    if budget == "100%":    # every expert fits decoded, less the working set
        assert b.full_experts == len(default_source.layouts) - k


def test_budget_below_minimum_is_refused(default_hf_dir, default_source):
    r = cli("plan", default_hf_dir, "--memory-budget", "100MB")
    line = one_line_error(r, "--memory-budget 100.0 MB is below the dense weights")
    need = (default_source.dense_bytes()
            + 2 * max(l.full_bytes for l in default_source.layouts.values()))
    assert f"at least {np.ceil(need / 1e5) / 10:.1f} MB" in line
    assert "without a unit" not in line
    # a bare number is bytes: stated in bytes below 1 MB, with the unit hint
    line = one_line_error(cli("plan", default_hf_dir, "--memory-budget", "2"),
                          "--memory-budget 2 bytes is below the dense weights")
    assert line.endswith(" (a number without a unit is bytes: did you mean 2GB or 2%?)"), line


# -- the command -------------------------------------------------------------------------------
def test_plan_command_text_and_json(tmp_path):
    d = write_config(tmp_path / "qwen3", PUBLISHED["Qwen/Qwen3-30B-A3B"])
    p = size_plan(d, "25%")
    r = cli("plan", d, "-m", "25%")
    assert r.exit_code == 0, r.output
    out = r.stdout
    assert f"parameters  {p.params:>17,d}" in out
    assert ("Qwen3MoeForCausalLM (qwen3_moe), 48 layers (48 MoE), 128 experts per MoE layer, "
            "top-8") in out
    assert "196,608 B/token" in out                         # 48 x 2 x 4 x 128 x 4 bytes
    assert re.search(r"expert tiers .* (\d[\d,]*) of 6,144 experts decoded", out)
    j = json.loads(cli("plan", d / "config.json", "--json", "-m", "25%").stdout)
    assert j == json.loads(json.dumps(p.as_dict()))
    assert j["params"] == p.params and j["budget"]["tiers"] == p.budget.tiers
    assert j["kv_bytes_per_token"] == 196608
    assert "budget" not in json.loads(cli("plan", d, "--json").stdout)


@pytest.mark.parametrize("case,needles", [
    ("missing", ("no such file",)),
    ("folder", ("config.json", "no such file")),
    ("garbage", ("config.json: not a JSON config",)),
    ("list", ("not a JSON object",)),
    ("unknown", ("unsupported architecture 'LlamaForCausalLM'", "MixtralForCausalLM")),
    ("no_arch", ("no 'architectures' entry",)),
    ("arch_str", ("architectures must be a list of class names",)),
    ("no_hidden", ("config.json: missing hidden_size",)),
    ("bad_type", ("num_hidden_layers must be an integer",)),
])
def test_plan_errors_are_one_line(tmp_path, case, needles):
    cfg = dict(PUBLISHED["mistralai/Mixtral-8x7B-v0.1"])
    target = tmp_path / "m"
    if case == "missing":
        target = tmp_path / "nothing-here"
    elif case == "folder":
        target.mkdir()
    elif case == "garbage":
        target.mkdir()
        (target / "config.json").write_bytes(b"{\x00\xff not json")
    elif case == "list":
        target.mkdir()
        (target / "config.json").write_text("[1, 2]")
    else:
        if case == "unknown":
            cfg["architectures"] = ["LlamaForCausalLM"]
        elif case == "no_arch":
            del cfg["architectures"]
        elif case == "arch_str":
            cfg["architectures"] = "MixtralForCausalLM"
        elif case == "no_hidden":
            del cfg["hidden_size"]
        elif case == "bad_type":
            cfg["num_hidden_layers"] = "32"
        write_config(target, cfg)
    line = one_line_error(cli("plan", target), *needles)
    assert str(target) in line


def test_plan_bad_budget_text(tmp_path):
    d = write_config(tmp_path / "m", PUBLISHED["mistralai/Mixtral-8x7B-v0.1"])
    one_line_error(cli("plan", d, "-m", "lots"), "--memory-budget: cannot read 'lots'")
    one_line_error(cli("plan", d, "-m", "0%"), "--memory-budget: a share must be in (0, 100] %")
    one_line_error(cli("plan", d, "-m", "101%"), "--memory-budget: a share must be in (0, 100] %")


def test_plan_error_type(tmp_path):
    (tmp_path / "config.json").write_text("nope")
    with pytest.raises(PlanError, match="not a JSON config"):
        size_plan(tmp_path)


# -- kv_values_per_token against the caches it describes ---------------------------------------
@pytest.mark.parametrize("name", list(SPECS))
def test_kv_values_per_token_equal_the_caches(tiny_moe_dir, name):
    """After a forward of T tokens, the runtime's cache holds kv_values_per_token values per
    token, and transformers' DynamicCache as many per position it holds."""
    torch = pytest.importorskip("torch")
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.cache import KVCache
    from zipmoe_rt.models.weights import CheckpointSource
    from tiny_models import load_hf

    d = tiny_moe_dir(name)
    net = build_model(CheckpointSource(d))
    T = 7
    ids = np.arange(3, 3 + T) % net.args.vocab_size
    cache = net.new_cache()
    net.forward(ids, cache)
    per_token = net.args.kv_values_per_token()
    if all(isinstance(lc, KVCache) for lc in cache.layers):
        held = sum(lc.k[:, :lc.length].size + lc.v[:, :lc.length].size for lc in cache.layers)
        assert held == per_token * T
        hf = load_hf(d)
        with torch.no_grad():
            out = hf(torch.tensor(ids[None]), use_cache=True)
        # a sliding-window layer of transformers keeps only its window (the runtime keeps
        # every position): count values per position held
        layers = out.past_key_values.layers
        assert len(layers) == len(cache.layers)
        assert sum((l.keys.numel() + l.values.numel()) // l.keys.shape[-2] for l in layers) \
            == per_token
    else:
        pytest.skip("layer caches other than KVCache: their family's test checks them")


# -- /stats of the chat REPL -------------------------------------------------------------------
KV_RE = re.compile(r"^KV cache: ([\d,]+) bytes per token, (\d+) tokens = ([\d.]+) MB in use, "
                   r"([\d.]+) MB allocated$", re.M)


def test_chat_stats_show_kv_bytes(tiny_moe_dir, tmp_path):
    """/stats gives the KV cache's bytes per token and its bytes in use and allocated, equal to
    the buffers of the same conversation's cache run through the API."""
    import zipmoe_rt
    from test_api import make_chat_model

    zm = make_chat_model(tiny_moe_dir("mixtral"), tmp_path / "chat")
    r = CliRunner().invoke(main, ["chat", str(zm), "-n", "5", "--temp", "0"],
                           input="/stats\nhello world\n/stats\nagain\n/stats\n")
    assert r.exit_code == 0, r.output
    rows = [(int(a.replace(",", "")), int(t), float(u), float(al))
            for a, t, u, al in KV_RE.findall(r.stderr)]
    assert len(rows) == 3
    with zipmoe_rt.load(zm) as m:
        per_token = 4 * m.net.args.kv_values_per_token()
        assert per_token == 4 * 3 * 2 * 2 * 16            # layers x (k, v) x kv heads x head_dim
        s = m.chat_session()
        assert rows[0] == (per_token, 0, 0.0, pytest.approx(s.state.cache.nbytes / 1e6, abs=5e-4))
        for row, text in zip(rows[1:], ("hello world", "again")):
            "".join(s.send(text, max_tokens=5))
            cache = s.state.cache
            held = sum(lc.k[:, :lc.length].nbytes + lc.v[:, :lc.length].nbytes
                       for lc in cache.layers)
            assert row[0] == per_token and row[1] == cache.offset > 0
            assert held == cache.offset * per_token
            assert row[2] == pytest.approx(held / 1e6, abs=5e-4)
            assert row[3] == pytest.approx(cache.nbytes / 1e6, abs=5e-4) and cache.nbytes >= held


def test_a_config_with_too_many_experts_is_refused_without_listing_them(tmp_path):
    """A config.json whose values are each in range but describe millions of experts is refused
    at once (the planner lists every expert tensor), naming the file and the count."""
    from zipmoe_rt.plan import MAX_EXPERTS, PlanError, size_plan

    cfg = {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
           "vocab_size": 1000, "hidden_size": 64, "intermediate_size": 128,
           "moe_intermediate_size": 32, "num_hidden_layers": 64, "num_attention_heads": 4,
           "num_key_value_heads": 2, "head_dim": 16, "num_experts": 65536,
           "num_experts_per_tok": 2}
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PlanError, match=r"config\.json: 64 MoE layers x 65536 experts") as e:
        size_plan(tmp_path)
    assert f"{MAX_EXPERTS:,}" in str(e.value)
    assert str(e.value).startswith(f"{tmp_path / 'config.json'}: 64 MoE layers"), e.value
    assert str(e.value).count("config.json") == 1, e.value         # the file named once


def test_a_device_file_is_not_a_config():
    from zipmoe_rt.plan import PlanError, size_plan

    with pytest.raises(PlanError, match="/dev/zero: not a regular file"):
        size_plan("/dev/zero")


def test_qwen3_moe_dense_width_takes_the_class_default(tmp_path):
    """Qwen3-MoE configs may leave out ``intermediate_size`` (no dense layer uses it):
    transformers' ``Qwen3MoeConfig`` default applies, and the plan is the one with it given."""
    transformers = pytest.importorskip("transformers")
    cfg = dict(PUBLISHED["Qwen/Qwen3-30B-A3B"])
    del cfg["intermediate_size"]
    given = size_plan(write_config(tmp_path / "given", PUBLISHED["Qwen/Qwen3-30B-A3B"]), None)
    absent = size_plan(write_config(tmp_path / "absent", cfg), None)
    assert transformers.Qwen3MoeConfig().intermediate_size == 6144
    a, g = absent.as_dict(), given.as_dict()
    assert a.pop("config") != g.pop("config")
    assert a == g
    # still required where the family has no such default (Mixtral's is its MLP width)
    mix = dict(PUBLISHED["mistralai/Mixtral-8x7B-v0.1"])
    del mix["intermediate_size"]
    r = cli("plan", write_config(tmp_path / "mix", mix))
    assert r.exit_code != 0 and "missing intermediate_size" in r.output


# -- plan of a .zmoe: the config.json the container stores ------------------------------------
@pytest.mark.filterwarnings("ignore:.*no tokenizer.json")
@pytest.mark.parametrize("name", ["gpt_oss", "lfm2_moe"])
def test_plan_of_a_container_is_the_plan_of_its_source(tiny_moe_dir, tmp_path, name):
    """``plan MODEL.zmoe`` (as every other verb takes a model) sizes the config.json stored in
    the container: the same figures as ``plan`` of the source folder, not a "not a JSON config"
    error. A file that starts like a container but is cut short is one named error line."""
    from zipmoe_rt.convert.converter import convert

    src = tiny_moe_dir(name)
    out = convert(src, tmp_path / "m.zmoe", progress=False, threads=1)
    from_src, from_file = size_plan(src, "50%").as_dict(), size_plan(out, "50%").as_dict()
    assert from_src.pop("config") == str(src / "config.json")
    assert from_file.pop("config") == str(out)
    assert from_file == from_src
    r = cli("plan", out, "-m", "50%")
    assert r.exit_code == 0, r.output
    assert r.stdout == cli("plan", src, "-m", "50%").stdout.replace(str(src / "config.json"),
                                                                    str(out))
    cut = tmp_path / "cut.zmoe"
    cut.write_bytes(out.read_bytes()[:100])
    r = cli("plan", cut)
    assert f"{cut}: {cut}" not in r.stderr, r.stderr            # the file is named once
    assert r.exit_code != 0 and r.stderr.startswith(f"error: {cut}: ") and len(
        r.stderr.strip().splitlines()) == 1, r.stderr


def _qwen3_30b_a3b(layers: int) -> dict:
    """Qwen3-30B-A3B's config with ``layers`` decoder layers of 4 experts, top-2."""
    return {"architectures": ["Qwen3MoeForCausalLM"], "model_type": "qwen3_moe",
            "hidden_size": 2048, "intermediate_size": 6144, "moe_intermediate_size": 768,
            "num_attention_heads": 32, "num_key_value_heads": 4, "head_dim": 128,
            "num_hidden_layers": layers, "num_experts": 4, "num_experts_per_tok": 2,
            "vocab_size": 151936, "max_position_embeddings": 40960, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": False, "decoder_sparse_step": 1, "mlp_only_layers": []}


def test_plan_of_65536_layers_finishes_and_scales_with_the_layers(tmp_path):
    """A config with the most layers the validator accepts (65536) is sized, and its figures
    are the global ones plus 65536 x those of one layer (read off 2048- and 4096-layer plans).
    The 65536-layer plan runs in a child process with a time limit as a guard against work
    growing with the square of the layers (it looked up each layer in a list)."""
    import subprocess
    import sys

    small = {n: size_plan(write_config(tmp_path / str(n), _qwen3_30b_a3b(n)), "50%")
             for n in (2048, 4096)}
    per = {k: (getattr(small[4096], k) - getattr(small[2048], k)) // 2048
           for k in ("expert_params", "dense_params", "experts", "kv_values_per_token")}
    glob = {k: getattr(small[2048], k) - 2048 * v for k, v in per.items()}
    assert per["experts"] == 4 and glob["expert_params"] == 0 and glob["experts"] == 0
    write_config(tmp_path / "big", _qwen3_30b_a3b(65536))
    code = ("import json, sys; from zipmoe_rt.plan import size_plan; "
            "print(json.dumps(size_plan(sys.argv[1], '50%').as_dict()))")
    r = subprocess.run([sys.executable, "-c", code, str(tmp_path / "big")], capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    big = json.loads(r.stdout)
    assert big["layers"] == 65536 and big["moe_layers"] == 65536
    for k, v in per.items():
        assert big[k] == glob[k] + 65536 * v, (k, big[k], glob[k], v)
    assert big["expert_params"] == 32 * small[2048].expert_params
    assert big["budget"]["expert_full"] == small[2048].budget.expert_full


def test_present_looks_up_layers_in_a_set():
    """expand() asks present() about every key of every layer with the MoE layers as a set
    (an O(1) question), not hp.moe_layers (a list scanned per question)."""
    from zipmoe_rt.families import tensors as T
    from zipmoe_rt.families import get_architecture

    hp = get_architecture(_qwen3_30b_a3b(16)).typed_hparams()
    seen = []
    real = T.present

    def spy(key, hp_, layer, moe_layers=None):
        seen.append((layer, moe_layers))
        return real(key, hp_, layer, moe_layers)

    T.present = spy
    try:
        specs = T.expand(get_architecture(_qwen3_30b_a3b(16)).tensor_table(), hp)
    finally:
        T.present = real
    per_layer = [m for layer, m in seen if layer is not None]
    assert per_layer and all(isinstance(m, (set, frozenset)) for m in per_layer)
    assert sum(s.layer == 15 and s.is_expert for s in specs) == 4 * 3
