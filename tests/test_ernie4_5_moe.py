"""ERNIE 4.5 MoE against transformers (``modeling_ernie4_5_moe.py``) on the tiny specs
``ernie4_5_moe`` / ``ernie4_5_moe_interval``: the choice-biased router (op on both backends and
per layer in the model), the choice bias and interleaved RoPE each matter, the dense and sparse
layer placement, the F32 choice bias kept through convert, and the config rules. (Logits,
greedy decoding, export and budgeted runs are covered for every spec by the parametrised
tests.)"""
from __future__ import annotations

import json

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from zipmoe_rt.backends import get_backend  # noqa: E402
from zipmoe_rt.families import ConfigError, get_architecture  # noqa: E402
from zipmoe_rt.families.ernie4_5_moe import Ernie45MoeHParams  # noqa: E402
from zipmoe_rt.models import build_model  # noqa: E402
from zipmoe_rt.models.rope import interleaved_to_halves  # noqa: E402
from zipmoe_rt.models.moe import MLP, ChoiceBiasMoeBlock  # noqa: E402
from zipmoe_rt.models.weights import CheckpointSource  # noqa: E402

from family_checks import BACKENDS, assert_same_route, convert_quietly, routes_of  # noqa: E402
from hf_parity import hf_logits  # noqa: E402
from tiny_models import SPECS, load_hf  # noqa: E402

PROMPT = np.random.default_rng(5).integers(0, 256, 14)
TOL = 1e-3


def _torch_router(logits, bias, k, norm_min):
    """Ernie4_5_MoeTopKRouter.forward after its linear (the transformers code, float32)."""
    p = torch.softmax(logits, dim=1, dtype=torch.float)
    _, sel = torch.topk(p + bias, k, dim=-1)
    w = torch.gather(p, dim=-1, index=sel)
    return sel, w / torch.clamp(w.sum(dim=-1, keepdim=True), min=norm_min)


@pytest.mark.parametrize("norm_min", [1e-12, 0.9])
@pytest.mark.parametrize("E,k", [(8, 2), (64, 6), (5, 5)])
def test_route_choice_bias_op(E, k, norm_min):
    """Every backend here gives transformers' choice and weights; the bias changes the choice of
    some tokens; a norm_min above the sum clamps it (weights sum to sum / norm_min)."""
    rng = np.random.default_rng(E * 10 + k)
    logits = rng.standard_normal((40, E)).astype(np.float32)
    bias = (0.2 * rng.standard_normal(E)).astype(np.float32)
    sel, w = _torch_router(torch.from_numpy(logits), torch.from_numpy(bias), k, norm_min)
    plain = _torch_router(torch.from_numpy(logits), torch.zeros(E), k, norm_min)[0]
    if k < E:
        assert (np.sort(sel.numpy(), 1) != np.sort(plain.numpy(), 1)).any()
    for name in BACKENDS:
        be = get_backend(name)
        idx, got = be.route_choice_bias(be.from_host(logits), k, be.from_host(bias), norm_min)
        assert idx.dtype == np.int64 and got.dtype == np.float32 and idx.shape == (40, k)
        np.testing.assert_array_equal(np.sort(idx, 1), np.sort(sel.numpy(), 1))
        order = np.argsort(idx, 1)
        np.testing.assert_allclose(np.take_along_axis(got, order, 1),
                                   np.take_along_axis(w.numpy(), np.argsort(sel.numpy(), 1), 1),
                                   rtol=1e-6, atol=1e-7)
        if norm_min == 0.9 and k < E:       # the k of E always sum to 1
            assert (got.sum(1) < 0.99).any()
        else:
            np.testing.assert_allclose(got.sum(1), 1.0, atol=1e-6)
        with pytest.raises(ValueError, match="3 bias values for"):
            be.route_choice_bias(be.from_host(logits), k, be.from_host(bias[:3]), norm_min)


def test_route_choice_bias_ties_lowest_index_first():
    logits = np.zeros((2, 6), np.float32)
    bias = np.array([0, 0.1, 0, 0.1, 0, 0], np.float32)
    for name in BACKENDS:
        be = get_backend(name)
        idx, w = be.route_choice_bias(be.from_host(logits), 3, be.from_host(bias), 1e-12)
        assert idx.tolist() == [[1, 3, 0], [1, 3, 0]]
        np.testing.assert_allclose(w, 1 / 3, rtol=1e-6)


@pytest.mark.parametrize("name", ["ernie4_5_moe", "ernie4_5_moe_interval"])
def test_router_matches_transformers(pair, name):
    """On every sparse layer our router picks transformers' experts with its weights; the
    bias changes some choices and the unnormalised top-k mass is far from 1."""
    model, hf = pair(name)
    ours, theirs = routes_of(model, hf, PROMPT, {
        n: layer.mlp.gate for n, layer in enumerate(hf.model.layers)
        if hasattr(layer.mlp, "gate") and not isinstance(layer.mlp.gate, torch.nn.Linear)})
    assert sorted(ours) == sorted(theirs) == model.args.moe_layers
    changed = False
    for layer, (logits, w, idx) in theirs.items():
        assert_same_route(ours[layer], idx, w)
        p = torch.softmax(logits, -1)
        assert torch.gather(p, 1, idx).sum(-1).max() < 0.9
        changed |= bool((torch.topk(p, idx.shape[1], -1)[1].sort(-1)[0]
                         != idx.sort(-1)[0]).any())
    assert changed


def test_choice_bias_matters_and_matches(tiny_moe_dir, pair):
    """Zeroing the choice bias moves the logits far beyond the tolerance; transformers with a
    zero bias agrees with us."""
    model, _ = pair("ernie4_5_moe")
    d = tiny_moe_dir("ernie4_5_moe")
    free = build_model(CheckpointSource(d))
    for i in free.args.moe_layers:
        free.layers[i].mlp.choice_bias = np.zeros(8, np.float32)
    a = model.forward(PROMPT, model.new_cache(), last_only=False)
    b = free.forward(PROMPT, free.new_cache(), last_only=False)
    assert np.abs(a - b).max() > 100 * TOL
    hf = load_hf(d)
    with torch.no_grad():
        for layer in hf.model.layers[1:]:
            layer.mlp.gate.moe_statics.e_score_correction_bias.zero_()
    assert np.abs(b - hf_logits(hf, PROMPT)).max() <= TOL


def test_interleaved_rope_matters(tiny_moe_dir, pair, monkeypatch):
    """ERNIE rotates pairs (2i, 2i+1): the half-split RoPE of the other families is far off
    transformers, the interleaved one (parity test) within the tolerance."""
    assert interleaved_to_halves(8).tolist() == [0, 2, 4, 6, 1, 3, 5, 7]
    model, hf = pair("ernie4_5_moe")
    ref = hf_logits(hf, PROMPT)
    assert np.abs(model.forward(PROMPT, model.new_cache(), last_only=False) - ref).max() <= TOL
    monkeypatch.setattr(Ernie45MoeHParams, "ROPE_INTERLEAVED", False)
    halves = build_model(CheckpointSource(tiny_moe_dir("ernie4_5_moe")))
    assert np.abs(halves.forward(PROMPT, halves.new_cache(), last_only=False) - ref).max() \
        > 100 * TOL


def test_layer_placement(pair):
    """moe_layer_start_index / end_index / interval: dense Ernie4_5_MoeMLP elsewhere; shared
    experts (2 x moe_intermediate_size) added ungated where configured."""
    model, hf = pair("ernie4_5_moe")
    kinds = [type(layer.mlp) for layer in model.layers]
    assert kinds == [MLP, ChoiceBiasMoeBlock, ChoiceBiasMoeBlock]
    assert model.layers[1].mlp.shared.gate.shape == (64, 64)
    assert model.layers[1].mlp.shared_gate is None
    model2, hf2 = pair("ernie4_5_moe_interval")
    assert model2.args.moe_layers == [1, 3]
    assert [type(layer.mlp) for layer in model2.layers] == [
        MLP, ChoiceBiasMoeBlock, MLP, ChoiceBiasMoeBlock, MLP]
    assert [type(layer.mlp).__name__ for layer in hf2.model.layers] == [
        "Ernie4_5_MoeMLP", "Ernie4_5_MoeSparseMoeBlock"] * 2 + ["Ernie4_5_MoeMLP"]
    assert all(layer.mlp.shared is None for layer in model2.layers[1::2])


def test_f32_choice_bias_through_convert(tiny_moe_dir, tmp_path):
    """The choice bias is F32 in the checkpoint (as released checkpoints store it) and comes out
    of the container as the same float32 values, beside the BF16 router."""
    from safetensors.torch import load_file

    from zipmoe_rt.engine.store import ZmoeSource

    d = tiny_moe_dir("ernie4_5_moe")
    out = convert_quietly(d, tmp_path / "e.zmoe")
    raw = load_file(str(d / "model.safetensors"))
    src = ZmoeSource(out)
    try:
        assert raw["model.layers.1.mlp.gate.weight"].dtype == torch.bfloat16
        for n in ("model.layers.1.mlp.moe_statics.e_score_correction_bias",
                  "model.layers.2.mlp.moe_statics.e_score_correction_bias"):
            assert raw[n].dtype == torch.float32
            got = src.tensor(n)
            assert got.dtype == np.float32
            np.testing.assert_array_equal(got.view(np.uint32), raw[n].numpy().view(np.uint32))
        assert raw["model.layers.1.mlp.moe_statics.e_score_correction_bias"].shape == (1, 8)
        assert np.abs(src.tensor("model.layers.1.mlp.moe_statics.e_score_correction_bias")
                      ).max() > 0.05
    finally:
        src.close()


def _config(name="ernie4_5_moe"):
    import transformers

    cfg = transformers.Ernie4_5_MoeConfig(**SPECS[name][1])
    return dict(json.loads(cfg.to_json_string(use_diff=True)),
                architectures=["Ernie4_5_MoeForCausalLM"])


def test_config_rules():
    """Absent keys take Ernie4_5_MoeConfig's defaults (stored resolved); end index -1 is the
    last layer; use_bias true and bad layer keys are refused naming the key."""
    d = {k: v for k, v in _config().items() if k not in (
        "moe_layer_start_index", "moe_layer_end_index", "moe_layer_interval",
        "moe_num_shared_experts", "moe_norm_min", "rope_parameters", "rope_theta",
        "tie_word_embeddings")}
    hp = get_architecture(d).hparams()
    assert hp["moe_layers"] == [1, 2] and hp["shared_expert_intermediate_size"] == 64
    assert hp["moe_norm_min"] == 1e-12 and hp["rope"]["rope_theta"] == 5e5
    assert hp["tie_word_embeddings"] is True
    assert get_architecture(dict(d, moe_layer_end_index=-1, moe_layer_start_index=0)
                            ).hparams()["moe_layers"] == [0, 1, 2]
    with pytest.raises(ConfigError, match="moe_k 2 not in 1..num_experts 0"):
        get_architecture(dict(d, moe_num_experts=0)).hparams()
    with pytest.raises(ConfigError, match="use_bias true"):
        get_architecture(dict(d, use_bias=True)).hparams()
    with pytest.raises(ConfigError, match="moe_layer_interval 0 is out of range"):
        get_architecture(dict(d, moe_layer_interval=0)).hparams()
    with pytest.raises(ConfigError, match="moe_layer_start_index must be an integer"):
        get_architecture(dict(d, moe_layer_start_index="1")).hparams()
    with pytest.raises(ConfigError, match="moe_norm_min must be a number"):
        get_architecture(dict(d, moe_norm_min="x")).hparams()
    with pytest.raises(ConfigError, match="partial_rotary_factor 0.5 is not supported"):
        get_architecture(dict(d, rope_parameters={"rope_type": "default", "rope_theta": 1e4,
                                                  "partial_rotary_factor": 0.5})).hparams()
