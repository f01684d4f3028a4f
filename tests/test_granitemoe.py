"""Granite-MoE and Granite-MoE-Shared against transformers (``modeling_granitemoe.py``,
``modeling_granitemoeshared.py``) on the tiny specs ``granitemoe`` / ``granitemoe_shared``:
the router, each scalar multiplier, the shared MLP's gate/up split, the stacked expert tensors
sliced into expert blocks, the config rules, and the ``scale_`` op on both backends. (Logits,
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
from zipmoe_rt.models import build_model  # noqa: E402
from zipmoe_rt.models.weights import CheckpointSource  # noqa: E402

from family_checks import BACKENDS, assert_same_route, convert_quietly, routes_of  # noqa: E402
from hf_parity import hf_logits  # noqa: E402
from tiny_models import SPECS, load_hf  # noqa: E402

PROMPT = np.random.default_rng(3).integers(0, 256, 14)
TOL = 1e-3


@pytest.mark.parametrize("name", ["granitemoe", "granitemoe_shared"])
def test_router_matches_transformers(pair, name):
    """GraniteMoeTopKRouter (top-k logits, softmax over those k) picks transformers' experts
    with its weights on every layer; the softmax over all experts puts far less than 1 on the
    chosen k, so the renormalisation is exercised."""
    model, hf = pair(name)
    ours, theirs = routes_of(model, hf, PROMPT, {n: layer.block_sparse_moe.router
                                                 for n, layer in enumerate(hf.model.layers)})
    assert len(ours) == len(theirs) == 3
    for layer, (logits, w, idx) in theirs.items():
        assert_same_route(ours[layer], idx, w, logits)
        p = torch.softmax(logits, -1)
        mass = torch.gather(p, 1, idx).sum(-1)
        assert mass.max() < 0.95 and mass.min() < 0.6


@pytest.mark.parametrize("field", ["embedding_multiplier", "residual_multiplier",
                                   "attention_multiplier", "logits_scaling"])
def test_each_multiplier_matters_and_matches(tiny_moe_dir, pair, field):
    """Each multiplier of the spec (all away from 1) moves the logits far beyond the parity
    tolerance when reset to 1; transformers with the same reset agrees with us."""
    model, _ = pair("granitemoe")
    d = tiny_moe_dir("granitemoe")
    src = CheckpointSource(d)
    assert src.hparams[field] == SPECS["granitemoe"][1][field] != 1.0
    src.hparams = dict(src.hparams, **{field: 1.0})
    reset = build_model(src)
    a = model.forward(PROMPT, model.new_cache(), last_only=False)
    b = reset.forward(PROMPT, reset.new_cache(), last_only=False)
    assert np.abs(a - b).max() > 100 * TOL
    hf = load_hf(d)
    if field == "embedding_multiplier":
        hf.model.embedding_multiplier = 1.0
    elif field == "residual_multiplier":
        for layer in hf.model.layers:
            layer.residual_multiplier = 1.0
    elif field == "attention_multiplier":
        for layer in hf.model.layers:
            layer.self_attn.scaling = 1.0
    else:
        hf.config.logits_scaling = 1.0
    assert np.abs(b - hf_logits(hf, PROMPT)).max() <= TOL


def test_attention_scale_is_the_multiplier(pair):
    """The softmax scale is attention_multiplier, not head_dim**-0.5."""
    model, _ = pair("granitemoe")
    assert model.args.head_dim ** -0.5 == 0.25
    assert all(layer.attn.scale == np.float32(0.1) for layer in model.layers)


def test_shared_mlp_is_gate_rows_then_up_rows(pair):
    """shared_mlp.input_linear [2*SI, H] splits into gate (first SI rows) and up; our shared
    MLP gives transformers' GraniteMoeSharedMLP output on random inputs, on every layer."""
    model, hf = pair("granitemoe_shared")
    x = np.random.default_rng(0).standard_normal((5, 64)).astype(np.float32)
    for ours, theirs in zip(model.layers, hf.model.layers):
        assert ours.mlp.shared is not None and ours.mlp.shared_gate is None
        with torch.no_grad():
            ref = theirs.shared_mlp(torch.from_numpy(x)).numpy()
        np.testing.assert_allclose(ours.mlp.shared(x), ref, rtol=0, atol=1e-5)
    assert all(layer.mlp.shared is None for layer in pair("granitemoe")[0].layers)


def test_expert_blocks_are_slices_of_the_stacked_tensors(tiny_moe_dir, tmp_path):
    """The container stores each expert's rows of input_linear [E, 2I, H] / output_linear
    [E, H, I] as its own block; decoded experts equal the checkpoint's slices bit for bit and
    the stored hyper-parameters check against the stored shapes (families.check)."""
    from safetensors.torch import load_file

    from zipmoe_rt.engine.store import ZmoeSource

    d = tiny_moe_dir("granitemoe_shared")
    out = convert_quietly(d, tmp_path / "g.zmoe")
    raw = load_file(str(d / "model.safetensors"))
    src = ZmoeSource(out)
    try:
        for layer in range(3):
            gu, dn = (raw[f"model.layers.{layer}.block_sparse_moe.{n}_linear.weight"]
                      .view(torch.int16).numpy().view(np.uint16) for n in ("input", "output"))
            assert gu.shape == (8, 96, 64) and dn.shape == (8, 64, 48)
            for e in range(8):
                w = src.expert(layer, e)
                np.testing.assert_array_equal(w.gate, gu[e, :48])
                np.testing.assert_array_equal(w.up, gu[e, 48:])
                np.testing.assert_array_equal(w.down, dn[e])
    finally:
        src.close()


def _config(name="granitemoe_shared"):
    import transformers

    fam = SPECS[name][0]
    cls = {"granitemoe": "GraniteMoe", "granitemoeshared": "GraniteMoeShared"}[fam]
    cfg = getattr(transformers, cls + "Config")(**SPECS[name][1])
    return dict(json.loads(cfg.to_json_string(use_diff=True)),
                architectures=[cls + "ForCausalLM"])


def test_config_rules():
    """Absent multipliers and kv heads take GraniteMoeConfig's defaults (stored resolved); an
    absent shared_intermediate_size means no shared MLP; bad values are named."""
    d = _config()
    for k in ("embedding_multiplier", "residual_multiplier", "attention_multiplier",
              "logits_scaling", "num_key_value_heads", "shared_intermediate_size"):
        d.pop(k, None)
    hp = get_architecture(d).hparams()
    assert [hp[k] for k in ("embedding_multiplier", "residual_multiplier",
                            "attention_multiplier", "logits_scaling")] == [1.0] * 4
    assert hp["num_key_value_heads"] == 4 and hp["shared_expert_intermediate_size"] == 0
    assert hp["norm_topk_prob"] is True and hp["moe_layers"] == [0, 1, 2]
    d = _config()
    assert get_architecture(d).hparams()["shared_expert_intermediate_size"] == 40
    assert get_architecture(dict(d, embedding_multiplier=12)).hparams()[
        "embedding_multiplier"] == 12.0
    with pytest.raises(ConfigError, match="embedding_multiplier must be a number"):
        get_architecture(dict(d, embedding_multiplier="12")).hparams()
    with pytest.raises(ConfigError, match="config.json: logits_scaling: '0.0' is not a finite non-zero"):
        get_architecture(dict(d, logits_scaling=0)).hparams()
    with pytest.raises(ConfigError, match="config.json: missing intermediate_size"):
        get_architecture({k: v for k, v in d.items() if k != "intermediate_size"}).hparams()
    g = _config("granitemoe")
    assert "shared_intermediate_size" not in g
    assert get_architecture(dict(g, shared_intermediate_size=40)).hparams()[
        "shared_expert_intermediate_size"] == 0          # GraniteMoe has no shared MLP


@pytest.mark.parametrize("divide", [False, True])
def test_scale_op_both_backends(divide):
    """Backend.scale_ on every backend here: one float32 multiplication (division) per
    element, as torch's."""
    x = np.random.default_rng(2).standard_normal((7, 33)).astype(np.float32)
    s = 0.22
    want = (torch.from_numpy(x) / s if divide else torch.from_numpy(x) * s).numpy()
    for name in BACKENDS:
        be = get_backend(name)
        y = be.from_host(x.copy())
        assert be.scale_(y, s, divide=divide) is y
        np.testing.assert_array_equal(be.to_host(y), want)


def test_stored_hparams_are_checked_against_the_stacked_shapes(tiny_moe_dir, tmp_path):
    """families.check reads a Granite container's stacked Hub names: stored hyper-parameters
    that disagree with them, or a missing stacked tensor, are refused naming the tensor."""
    import zmoe

    from zipmoe_rt.families.check import check_stored_tensors, stored_hparams

    out = convert_quietly(tiny_moe_dir("granitemoe"), tmp_path / "g.zmoe")
    with zmoe.ZmoeReader(out) as r:
        hp = stored_hparams(r.metadata)
        shapes = {n: t["shape"] for n, t in r.tensors.items()}
    assert check_stored_tensors(hp, shapes, "g.zmoe").moe_layers == [0, 1, 2]
    name = "model.layers.0.block_sparse_moe.input_linear.weight"
    with pytest.raises(zmoe.CorruptIndexError,
                       match=rf"tensor '{name}' has shape \[8, 96, 64\], but the stored "
                             r"hyper-parameters imply \[8, 80, 64\]"):
        check_stored_tensors(dict(hp, moe_intermediate_size=40, intermediate_size=40), shapes,
                             "g.zmoe")
    down = "model.layers.2.block_sparse_moe.output_linear.weight"
    with pytest.raises(zmoe.CorruptIndexError, match=f"no routed expert tensor '{down}'"):
        check_stored_tensors(hp, {n: s for n, s in shapes.items() if n != down}, "g.zmoe")


def test_transformers5_names_convert_and_run(tiny_moe_dir, tmp_path):
    """A Granite checkpoint under transformers 5's in-memory names (``experts.gate_up_proj``,
    ``experts.down_proj``, ``router.weight``) converts, exports byte-identically and gives the
    Hub-named checkpoint's logits bit for bit."""
    import shutil

    from safetensors.torch import load_file, save_file

    from zipmoe_rt.convert.export import export
    from zipmoe_rt.engine.store import ZmoeSource

    src = tiny_moe_dir("granitemoe")
    dst = tmp_path / "fused"
    dst.mkdir()
    shutil.copy(src / "config.json", dst / "config.json")
    ren = {".block_sparse_moe.input_linear.weight": ".block_sparse_moe.experts.gate_up_proj",
           ".block_sparse_moe.output_linear.weight": ".block_sparse_moe.experts.down_proj",
           ".block_sparse_moe.router.layer.weight": ".block_sparse_moe.router.weight"}
    tensors = {}
    for n, t in load_file(str(src / "model.safetensors")).items():
        for a, b in ren.items():
            n = n.replace(a, b)
        tensors[n] = t
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})
    logits = []
    for folder in (src, dst):
        out = convert_quietly(folder, tmp_path / f"{folder.name}.zmoe")
        s = ZmoeSource(out)
        try:
            m = build_model(s)
            logits.append(m.forward(PROMPT, m.new_cache(), last_only=False))
        finally:
            s.close()
    np.testing.assert_array_equal(logits[0], logits[1])
    back = load_file(str(export(tmp_path / "fused.zmoe", tmp_path / "exp", progress=False)
                         / "model.safetensors"))
    assert set(back) == set(tensors)
    assert all(torch.equal(back[n].view(torch.int16), tensors[n].view(torch.int16))
               for n in tensors)
