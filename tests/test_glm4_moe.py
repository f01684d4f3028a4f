"""GLM-4-MoE (Glm4MoeForCausalLM) beyond the parametrised parity tests: the router of every
sparse layer against transformers' ``Glm4MoeTopkRouter`` inside the model, ``norm_topk_prob``
true / false / absent (the family default, true), a mutated correction bias changing the
experts chosen (transformers agreeing), the config.json rules against ``Glm4MoeConfig``, the
F32 bias kept bit for bit through the container, and bad input named."""
from __future__ import annotations

import json
import shutil
import warnings

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from zipmoe_rt.families import ConfigError, get_architecture  # noqa: E402
from zipmoe_rt.models import build_model  # noqa: E402
from zipmoe_rt.models.weights import CheckpointSource  # noqa: E402

from hf_parity import checkpoint_logits, zmoe_logits  # noqa: E402
from tiny_models import SPECS, load_hf  # noqa: E402

PROMPT = np.random.default_rng(1).integers(0, 256, 16)
BIAS = "model.layers.{i}.mlp.gate.e_score_correction_bias"


def _variant(src, dst, config=None, tensors=None):
    """A copy of checkpoint folder ``src`` in ``dst`` with ``config(dict)`` applied to its
    config.json and ``tensors(dict)`` to its tensors (one safetensors file)."""
    shutil.copytree(src, dst)
    if config is not None:
        cfg = json.loads((dst / "config.json").read_text())
        config(cfg)
        (dst / "config.json").write_text(json.dumps(cfg))
    if tensors is not None:
        from safetensors.torch import load_file, save_file
        t = load_file(dst / "model.safetensors")
        tensors(t)
        save_file(t, dst / "model.safetensors", metadata={"format": "pt"})
    return dst


def _run_both(folder):
    """(our logits [16, V], our routes {layer: (idx, w)}, HF logits, HF routes)."""
    model = build_model(CheckpointSource(folder))
    ours = {}
    model.route_hook = lambda layer, x, logits, idx, w: ours.setdefault(layer, (idx, w))
    logits = model.forward(PROMPT, model.new_cache(), last_only=False)
    hf = load_hf(folder)
    theirs = {}

    def keep(i):
        def hook(mod, inp, out):      # out: (router_logits, topk_weights, topk_indices)
            theirs.setdefault(i, (out[2].numpy().astype(np.int64), out[1].numpy()))
        return hook

    hooks = [layer.mlp.gate.register_forward_hook(keep(i))
             for i, layer in enumerate(hf.model.layers) if hasattr(layer.mlp, "gate")]
    with torch.no_grad():
        ref = hf(torch.tensor(PROMPT)[None]).logits[0].numpy()
    for h in hooks:
        h.remove()
    return logits, ours, ref, theirs


def _same_routes(ours, theirs):
    assert sorted(ours) == sorted(theirs)
    for layer in ours:
        (i1, w1), (i2, w2) = ours[layer], theirs[layer]
        o1, o2 = np.argsort(i1, 1), np.argsort(i2, 1)
        assert np.array_equal(np.take_along_axis(i1, o1, 1), np.take_along_axis(i2, o2, 1))
        np.testing.assert_allclose(np.take_along_axis(w1, o1, 1), np.take_along_axis(w2, o2, 1),
                                   rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("name", ["glm4_moe", "glm4_moe_groups"])
def test_every_router_matches_transformers(tiny_moe_dir, name):
    """Layer 0 is dense (first_k_dense_replace 1), layers 1-2 route as transformers does:
    the same experts and weights; renormalised weights sum to routed_scaling_factor."""
    logits, ours, ref, theirs = _run_both(tiny_moe_dir(name))
    assert sorted(ours) == [1, 2]
    _same_routes(ours, theirs)
    assert np.abs(logits - ref).max() <= 1e-3
    cfg = SPECS[name][1]
    sums = np.concatenate([w.sum(1) for _, w in ours.values()])
    if cfg["norm_topk_prob"]:
        np.testing.assert_allclose(sums, cfg["routed_scaling_factor"], rtol=1e-5)
    else:
        assert np.abs(sums - 1).min() > 0.2
    if name == "glm4_moe_groups":      # 4 groups of 2 experts, 2 groups kept
        assert all(len(set((row // 2).tolist())) <= 2 for idx, _ in ours.values() for row in idx)


def test_norm_topk_prob_true_false_absent(tiny_moe_dir, tmp_path):
    """norm_topk_prob true, false, and deleted from config.json (Glm4MoeConfig's default, true):
    each matches transformers on the same file; absent is exactly true; false differs."""
    src = tiny_moe_dir("glm4_moe")
    out = {}
    for tag, val in (("true", True), ("false", False), ("absent", None)):
        def edit(cfg, val=val):
            cfg.pop("norm_topk_prob", None)
            if val is not None:
                cfg["norm_topk_prob"] = val
        folder = _variant(src, tmp_path / tag, config=edit)
        cfg = json.loads((folder / "config.json").read_text())
        assert get_architecture(cfg).typed_hparams().norm_topk_prob == (val is not False)
        logits, ours, ref, theirs = _run_both(folder)
        _same_routes(ours, theirs)
        assert np.abs(logits - ref).max() <= 1e-3
        out[tag] = logits
    assert np.array_equal(out["absent"], out["true"])
    assert np.abs(out["true"] - out["false"]).max() > 1e-2


def test_correction_bias_changes_the_experts(tiny_moe_dir, tmp_path):
    """Mutation check: another e_score_correction_bias (still F32) changes which experts the
    tokens go to, and transformers makes the same new choice and the same logits."""
    src = tiny_moe_dir("glm4_moe")
    _, before, _, _ = _run_both(src)

    def mutate(t):
        for i in (1, 2):
            b = t[BIAS.format(i=i)]
            assert b.dtype == torch.float32
            t[BIAS.format(i=i)] = -3 * b

    folder = _variant(src, tmp_path / "mutated", tensors=mutate)
    logits, after, ref, theirs = _run_both(folder)
    _same_routes(after, theirs)
    assert np.abs(logits - ref).max() <= 1e-3
    moved = np.concatenate([(np.sort(before[i][0], 1) != np.sort(after[i][0], 1)).any(1)
                            for i in (1, 2)])
    assert moved.mean() > 0.25


def _cfg(**kw):
    d = json.loads(transformers.Glm4MoeConfig(**SPECS["glm4_moe"][1]).to_json_string(
        use_diff=True))
    d["architectures"] = ["Glm4MoeForCausalLM"]
    d.update(kw)
    return {k: v for k, v in d.items() if v is not ...}


@pytest.mark.parametrize("kw", [
    dict(rope_parameters=..., partial_rotary_factor=0.25, rope_theta=500.0),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 7.0},
         partial_rotary_factor=0.25),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 7.0,
                          "partial_rotary_factor": 0.75}, partial_rotary_factor=0.25),
    dict(rope_parameters={"rope_type": "default", "rope_theta": 7.0}),
    dict(first_k_dense_replace=2, n_shared_experts=3, use_qk_norm=True),
    # as GLM-4.5's config.json spells it (transformers 4 keys, head_dim given)
    dict(rope_parameters=..., rope_theta=1000000, rope_scaling=None, partial_rotary_factor=0.5,
         head_dim=128, num_hidden_layers=5, first_k_dense_replace=3, n_routed_experts=16,
         num_experts_per_tok=8, routed_scaling_factor=2.5, use_qk_norm=True,
         num_nextn_predict_layers=1, torch_dtype="bfloat16"),
    dict(first_k_dense_replace=..., n_shared_experts=..., n_group=..., topk_group=...,
         routed_scaling_factor=..., norm_topk_prob=...),
])
def test_config_rules_match_transformers(kw):
    """partial_rotary_factor from rope_parameters, else the top-level key, else 0.5; sparse
    layers from first_k_dense_replace; shared width from n_shared_experts; absent keys take
    Glm4MoeConfig's defaults — each as transformers reads the same config.json."""
    d = _cfg(**kw)
    hp = get_architecture(d).typed_hparams()
    c = transformers.Glm4MoeConfig(**{k: v for k, v in d.items() if k != "architectures"})
    assert hp.rope["partial_rotary_factor"] == c.rope_parameters["partial_rotary_factor"]
    assert hp.rope["rope_theta"] == c.rope_parameters["rope_theta"]
    assert hp.moe_layers == list(range(c.first_k_dense_replace, c.num_hidden_layers))
    assert hp.shared_expert_intermediate_size == c.moe_intermediate_size * c.n_shared_experts
    assert (hp.qk_norm, hp.norm_topk_prob, hp.n_group, hp.topk_group,
            hp.routed_scaling_factor, hp.num_experts) == (
        c.use_qk_norm, c.norm_topk_prob, c.n_group, c.topk_group, c.routed_scaling_factor,
        c.n_routed_experts)


@pytest.mark.parametrize("kw, msg", [
    (dict(n_group=3), "n_group 3 / topk_group 1 do not fit num_experts 8"),
    (dict(n_group=4, topk_group=1, num_experts_per_tok=3), "num_experts_per_tok 3 exceeds"),
    (dict(n_group=8, topk_group=8), "fewer than 2 experts per group"),
    (dict(first_k_dense_replace="one"), "first_k_dense_replace must be a non-negative"),
    (dict(n_shared_experts=-1), "n_shared_experts must be a non-negative"),
    (dict(partial_rotary_factor="half", rope_parameters=...), "partial_rotary_factor must be a"),
    (dict(partial_rotary_factor=0.05, rope_parameters=...), "partial_rotary_factor 0.05 gives no rotary dimension of head_dim 16"),
    (dict(routed_scaling_factor="x"), "routed_scaling_factor must be a number"),
])
def test_bad_config_is_named(kw, msg):
    with pytest.raises(ConfigError, match=msg):
        get_architecture(_cfg(**kw)).hparams()


def test_container_keeps_the_f32_bias_and_runs_the_same(tiny_moe_dir, tmp_path):
    """Converted: hparams.* hold the router settings and the partial rotary factor; the bias
    stays an F32 raw tensor, byte for byte; the model from the container gives the checkpoint
    model's logits bit for bit."""
    import zmoe
    from safetensors import safe_open
    from zipmoe_rt.convert.converter import convert

    src = tiny_moe_dir("glm4_moe")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = convert(src, tmp_path / "g.zmoe", progress=False)
    from test_metadata_keys import spec_table

    with zmoe.ZmoeReader(out) as r:
        meta = r.metadata
        table = spec_table()
        assert {k: r.metadata_types[k] for k in meta} == {k: table[k] for k in meta}
        rec = r.tensors[BIAS.format(i=1)]
        stored = np.array(r.read_tensor(BIAS.format(i=1)))
    assert (meta["hparams.routed_scaling_factor"], meta["hparams.n_group"],
            meta["hparams.topk_group"], meta["hparams.norm_topk_prob"]) == (2.5, 1, 1, True)
    assert meta["hparams.rope"]["partial_rotary_factor"] == 0.5
    assert meta["hparams.moe_layers"] == [1, 2]
    assert meta["hparams.shared_expert_intermediate_size"] == 32
    assert rec["dtype"] == "F32" and rec["encoding"] == "raw"
    with safe_open(str(src / "model.safetensors"), "np") as f:
        want = f.get_tensor(BIAS.format(i=1))

    def check(source):
        got = np.asarray(source.tensor(BIAS.format(i=1)))
        assert got.dtype == np.float32 and got.tobytes() == want.tobytes()
        assert stored.tobytes() == want.tobytes()
    a = zmoe_logits(out, PROMPT, check)
    assert np.array_equal(a, checkpoint_logits(src, PROMPT))


def test_missing_correction_bias_is_named(tiny_moe_dir, tmp_path):
    from zipmoe_rt.convert.converter import ConversionError, convert

    folder = _variant(tiny_moe_dir("glm4_moe"), tmp_path / "nobias",
                      tensors=lambda t: t.pop(BIAS.format(i=2)))
    with pytest.raises(ConversionError, match=r"model\.layers\.2\.mlp\.gate\.e_score_correction"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            convert(folder, tmp_path / "x.zmoe", progress=False)


def test_multi_token_prediction_layer_is_stored_and_skipped(tiny_moe_dir, tmp_path):
    """Released GLM-4.5 files carry a multi-token-prediction layer past the decoder
    (``model.layers.{num_hidden_layers}.*``, experts included), which transformers skips: the
    converter keeps it as unused tensors (one warning naming them, byte-identical export) and
    the model is the same."""
    from zipmoe_rt.convert.converter import ConversionWarning, convert
    from zipmoe_rt.convert.export import export

    def add_mtp(t):
        for name in [n for n in t if n.startswith("model.layers.2.")]:
            t[name.replace("model.layers.2.", "model.layers.3.")] = t[name].clone()
        t["model.layers.3.eh_proj.weight"] = torch.zeros(64, 128, dtype=torch.bfloat16)

    src = tiny_moe_dir("glm4_moe")
    folder = _variant(src, tmp_path / "mtp", config=lambda c: c.update(num_nextn_predict_layers=1),
                      tensors=add_mtp)
    with pytest.warns(ConversionWarning, match=r"not used .*model\.layers\.3\.eh_proj\.weight"):
        out = convert(folder, tmp_path / "mtp.zmoe", progress=False)
    assert np.array_equal(zmoe_logits(out, PROMPT), checkpoint_logits(src, PROMPT))
    export(out, tmp_path / "exported", progress=False)
    assert ((tmp_path / "exported" / "model.safetensors").read_bytes()
            == (folder / "model.safetensors").read_bytes())
