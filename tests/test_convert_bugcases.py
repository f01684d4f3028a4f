"""Checkpoints that used to convert into a silently wrong model: each is built from a tiny
transformers checkpoint (``tiny_models.make_tiny``) edited the way published checkpoints were
found to be, converted, and compared with transformers (the oracle)."""
from __future__ import annotations

import json
import shutil
import warnings
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from tiny_models import load_hf, make_tiny  # noqa: E402
from zmoe_edit import mutate, rewrite_index  # noqa: E402
import zmoe  # noqa: E402
from zipmoe_rt.convert.converter import ConversionError, ConversionWarning, convert  # noqa: E402
from zipmoe_rt.convert.safetensors_io import SafetensorsFile, write_safetensors  # noqa: E402
from zipmoe_rt.engine.store import ZmoeSource  # noqa: E402
from zipmoe_rt.models import build_model  # noqa: E402

PROMPT = np.random.default_rng(7).integers(0, 256, 12)
TOL = 1e-3


# ------------------------------------------------------------------ helpers


def tiny(name: str, folder: Path, sharded: bool = False, seed: int = 0, **config) -> Path:
    """make_tiny(name) in ``folder``, then config.json keys set (value None: key deleted)."""
    make_tiny(name, folder, sharded=sharded, seed=seed)
    if config:
        edit_config(folder, **config)
    return folder


def edit_config(folder: Path, **config):
    """Set config.json keys (value None deletes the key)."""
    p = folder / "config.json"
    cfg = json.loads(p.read_text())
    for k, v in config.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    p.write_text(json.dumps(cfg, indent=2))


def edit_tensors(path: Path, fn):
    """Rewrite a safetensors file after ``fn(tensors)`` edited ``{name: np.ndarray}`` (float32
    arrays stay BF16 on disk, truncated)."""
    f = SafetensorsFile(path)
    ts = {}
    for name, t in f.tensors.items():
        a = f.array(name)
        ts[name] = (a.astype(np.uint32) << 16).view(np.float32) if t.dtype == "BF16" else a.copy()
    f.close()
    fn(ts)
    out = {}
    for name, a in ts.items():
        a = np.ascontiguousarray(a, np.float32)
        out[name] = ("BF16", a.shape, (a.view(np.uint32) >> 16).astype(np.uint16))
    write_safetensors(path, out, metadata={"format": "pt"})


def hf_logits(folder: Path) -> np.ndarray:
    with torch.no_grad():
        hf = load_hf(folder)
        return hf(torch.tensor(PROMPT, dtype=torch.long)[None]).logits[0].numpy()


def our_logits(path: Path) -> np.ndarray:
    model = build_model(ZmoeSource(path))
    return model.forward(PROMPT, model.new_cache(), last_only=False)


def convert_quiet(folder: Path, out: Path) -> Path:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConversionWarning)
        return convert(folder, out, progress=False)


def assert_parity(folder: Path, out: Path):
    convert_quiet(folder, out)
    ref, got = hf_logits(folder), our_logits(out)
    np.testing.assert_allclose(got, ref, atol=TOL * max(1.0, np.abs(ref).max()), rtol=0)
    return ref, got


# ------------------------------------------------------------------ 1. the output head


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_missing_untied_head_is_refused(tmp_path, name):
    """tie_word_embeddings false and no lm_head.weight: used to convert and run with the
    embedding as the head (|dlogit| ~ 4-5 against transformers); now a convert-time error."""
    folder = tiny(name, tmp_path / name)
    assert json.loads((folder / "config.json").read_text())["tie_word_embeddings"] is False
    edit_tensors(folder / "model.safetensors", lambda ts: ts.pop("lm_head.weight"))
    with pytest.raises(ConversionError) as ei:
        convert_quiet(folder, tmp_path / "out.zmoe")
    msg = str(ei.value)
    assert "lm_head.weight" in msg and "tie_word_embeddings" in msg
    assert not (tmp_path / "out.zmoe").exists()


@pytest.mark.parametrize("same", [False, True])
def test_tied_config_with_a_stored_head_follows_transformers(tmp_path, same):
    """tie_word_embeddings true and a stored lm_head.weight: transformers (tie_weights) ties
    the head to the embedding only when the stored head equals it; one of other values is kept
    as the head. The runtime uses what transformers uses (convert warns when they differ)."""
    folder = tiny("qwen3_moe", tmp_path / "m", tie_word_embeddings=True)
    if same:
        edit_tensors(folder / "model.safetensors", lambda ts: ts.__setitem__(
            "lm_head.weight", ts["model.embed_tokens.weight"].copy()))
    hf = load_hf(folder)
    tied = hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    assert tied == same
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        convert(folder, tmp_path / "m.zmoe", progress=False)
    differs = [w for w in rec if "differs from model.embed_tokens.weight" in str(w.message)]
    assert len(differs) == (0 if same else 1)
    ref, got = hf_logits(folder), our_logits(tmp_path / "m.zmoe")
    np.testing.assert_allclose(got, ref, atol=TOL * np.abs(ref).max(), rtol=0)


def test_crafted_container_without_untied_head_fails_at_load(tmp_path):
    """A .zmoe whose hparams say untied but which holds no lm_head.weight: a clear error when the
    file is loaded (and when a model is built from any source without it), never the embedding
    used as the head."""
    folder = tiny("mixtral", tmp_path / "m")
    good = convert_quiet(folder, tmp_path / "good.zmoe")

    def drop(index):
        index["tensors"] = [t for t in index["tensors"] if t["name"] != "lm_head.weight"]
    bad = mutate(good, tmp_path / "bad.zmoe", lambda b: rewrite_index(b, drop))
    with pytest.raises(zmoe.CorruptIndexError, match=r"lm_head\.weight.*tie_word_embeddings"):
        ZmoeSource(bad)
    src = ZmoeSource(good)
    src.has = lambda name, has=src.has: name != "lm_head.weight" and has(name)
    with pytest.raises(KeyError, match=r"lm_head\.weight.*tie_word_embeddings"):
        build_model(src)


# ------------------------------------------------------------------ 2. which safetensors are read


def test_unindexed_shards_are_refused(tmp_path):
    """A folder of shards without model.safetensors.index.json (transformers cannot load it)
    used to convert from every *.safetensors in it; now an error naming the missing index."""
    folder = tiny("qwen3_moe", tmp_path / "m", sharded=True)
    (folder / "model.safetensors.index.json").unlink()
    _stray(folder, ["model.embed_tokens.weight", "lm_head.weight"])
    with pytest.raises(ConversionError, match=r"model\.safetensors\.index\.json.*model-00001-of"):
        convert_quiet(folder, tmp_path / "m.zmoe")


def _stray(folder: Path, names: list[str]) -> Path:
    """zz-stray.safetensors with ``names`` (taken from the checkpoint) holding other values."""
    src = {}
    for p in sorted(folder.glob("model*.safetensors")):
        f = SafetensorsFile(p)
        for n in names:
            if n in f.tensors:
                src[n] = f.tensors[n].shape
        f.close()
    rng = np.random.default_rng(5)
    stray = folder / "zz-stray.safetensors"
    write_safetensors(stray, {n: ("BF16", s, (rng.standard_normal(s).astype(np.float32)
                                              .view(np.uint32) >> 16).astype(np.uint16))
                              for n, s in src.items()})
    return stray


@pytest.mark.parametrize("sharded", [False, True])
def test_stray_safetensors_file_is_not_read(tmp_path, sharded):
    """A stray file with the same tensor names and other values: only the files transformers
    loads are read (a warning names the stray one) and the output matches transformers."""
    folder = tiny("qwen2_moe", tmp_path / "m", sharded=sharded)
    _stray(folder, ["model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                    "model.layers.0.mlp.experts.0.up_proj.weight", "lm_head.weight"])
    with pytest.warns(ConversionWarning, match="zz-stray.safetensors"):
        convert(folder, tmp_path / "m.zmoe", progress=False)
    ref, got = hf_logits(folder), our_logits(tmp_path / "m.zmoe")
    np.testing.assert_allclose(got, ref, atol=TOL * np.abs(ref).max(), rtol=0)


def test_tensor_in_two_listed_shards_is_an_error(tmp_path):
    """A tensor name in two of the files read is an error naming both files."""
    folder = tiny("qwen3_moe", tmp_path / "m", sharded=True)
    index = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    name = "model.layers.0.self_attn.q_proj.weight"
    other = next(s for s in sorted(set(index.values())) if s != index[name])
    q = {}
    f = SafetensorsFile(folder / index[name])
    q[name] = f.array(name).copy()
    f.close()
    edit_tensors(folder / other, lambda ts: ts.__setitem__(name, (q[name].astype(np.uint32) << 16)
                                                           .view(np.float32) * 2))
    with pytest.raises(ConversionError) as ei:
        convert_quiet(folder, tmp_path / "m.zmoe")
    msg = str(ei.value)
    assert name in msg and index[name] in msg and other in msg


# ------------------------------------------------------------------ 3. stop ids


def _hf_greedy(folder: Path, prompt: list[int], n: int) -> list[int]:
    hf = load_hf(folder)
    with torch.no_grad():
        out = hf.generate(torch.tensor([prompt]), max_new_tokens=n, do_sample=False,
                          eos_token_id=None, pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_stop_ids_are_the_union_of_config_generation_config_and_tokenizer(tmp_path):
    """config.json eos_token_id = the chat end token, generation_config.json's = [<|endoftext|>],
    the tokenizer's EOS <|endoftext|>: the model's own end token used to be ignored (generation
    ran to the length limit); now all three stop it, the container stores them and `inspect`
    shows them with their text."""
    from click.testing import CliRunner
    from test_tokenizer import tokenizer_json

    import zmoe
    import zipmoe_rt
    from zipmoe_rt.cli import main
    from zmoe.constants import Keys

    folder = tiny("qwen3_moe", tmp_path / "m")
    prompt = [5, 9, 100, 42]
    greedy = _hf_greedy(folder, prompt, 12)
    k = 3
    im_end = greedy[k]                     # the token the model says at step k plays <|im_end|>
    k = greedy.index(im_end)
    assert im_end not in (0, 1, 2) and k > 0
    tj = json.loads(tokenizer_json())
    # give that id the <|im_end|> special token (swap it with the trained id 2)
    inv = {v: t for t, v in tj["model"]["vocab"].items()}
    tj["model"]["vocab"][inv[im_end]], tj["model"]["vocab"]["<|im_end|>"] = 2, im_end
    for t in tj["added_tokens"]:
        if t["content"] == "<|im_end|>":
            t["id"] = im_end
    (folder / "tokenizer.json").write_text(json.dumps(tj))
    (folder / "tokenizer_config.json").write_text(json.dumps(
        {"eos_token": "<|endoftext|>", "bos_token": "<|endoftext|>"}))
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [0]}))
    edit_config(folder, eos_token_id=im_end)

    out = convert_quiet(folder, tmp_path / "m.zmoe")
    with zmoe.ZmoeReader(out) as r:
        assert r.metadata[Keys.Generation.EOS_TOKEN_IDS] == [0, im_end]
    m = zipmoe_rt.load(out)
    try:
        assert m.stop_ids == {0, im_end}
        text = "".join(m.stream(prompt, max_tokens=12))
        stats = m.last_stats
        assert stats.finish_reason == "stop" and stats.stop_token_id == im_end
        assert stats.output_tokens == k
        assert text == m.tokenizer.decode(greedy[:k])
    finally:
        m.close()
    r = CliRunner().invoke(main, ["inspect", str(out), "--no-tensors"])
    assert r.exit_code == 0, r.output
    lines = [l for l in r.output.splitlines() if l.startswith("stop tokens:")]
    assert lines == [f'stop tokens: 0 "<|endoftext|>", {im_end} "<|im_end|>"']


# ------------------------------------------------------------------ 4. norm_topk_prob


def _transformers_default(family: str, field: str):
    import transformers

    from zipmoe_rt.families import get_family
    return getattr(getattr(transformers, get_family(family).hf_config_class)(), field)


@pytest.mark.parametrize("name", ["qwen2_moe", "qwen3_moe"])
def test_norm_topk_prob_true_false_and_absent_match_transformers(tmp_path, name):
    """True, False and the key deleted (the family's transformers default) all match
    transformers, and the flag changes the output (so each case tests something)."""
    results = {}
    for value in (True, False, None):
        folder = tiny(name, tmp_path / str(value), norm_topk_prob=value)
        assert ("norm_topk_prob" in json.loads((folder / "config.json").read_text())) == \
            (value is not None)
        out = tmp_path / f"{value}.zmoe"
        ref, got = assert_parity(folder, out)
        want = _transformers_default(name, "norm_topk_prob") if value is None else value
        assert load_hf(folder).config.norm_topk_prob == want
        assert ZmoeSource(out).hparams["norm_topk_prob"] == want
        results[value] = got
    assert np.abs(results[True] - results[False]).max() > 10 * TOL


# ------------------------------------------------------------------ 5. shared-expert gate


class _ZeroTensor:
    """A weight source with one dense tensor zeroed (delegates the rest)."""

    def __init__(self, source, name):
        self._source, self._name = source, name

    def __getattr__(self, attr):
        return getattr(self._source, attr)

    def tensor(self, name):
        t = self._source.tensor(name)
        return np.zeros_like(t) if name == self._name else t


def test_shared_expert_gate_from_a_normal_draw(tmp_path):
    """A shared_expert_gate drawn from N(0,1) (zeros would give a constant 0.5 and hide a
    missing sigmoid): parity with transformers; zeroing it in the converted weights changes the
    output (the gate is used)."""
    folder = tiny("qwen2_moe", tmp_path / "m")
    rng = np.random.default_rng(11)

    def gates(ts):
        for n in ts:
            if n.endswith("mlp.shared_expert_gate.weight"):
                ts[n] = rng.standard_normal(ts[n].shape).astype(np.float32)
    edit_tensors(folder / "model.safetensors", gates)
    ref, got = assert_parity(folder, tmp_path / "m.zmoe")
    name = "model.layers.0.mlp.shared_expert_gate.weight"
    model = build_model(_ZeroTensor(ZmoeSource(tmp_path / "m.zmoe"), name))
    zeroed = model.forward(PROMPT, model.new_cache(), last_only=False)
    assert np.abs(zeroed - ref).max() > 100 * TOL * max(1.0, np.abs(ref).max())


# ------------------------------------------------------------------ 6. widths from the right keys


WIDTHS = dict(intermediate_size=96, moe_intermediate_size=40, shared_expert_intermediate_size=72)


@pytest.fixture
def widths_folder(tmp_path, monkeypatch):
    """A Qwen2-MoE (dense layer 1, top-2) whose three widths are unrelated."""
    import tiny_models

    fam, kw = tiny_models.SPECS["qwen2_moe"]
    monkeypatch.setitem(tiny_models.SPECS, "qwen2_moe_widths",
                        (fam, dict(kw, num_experts_per_tok=2, **WIDTHS)))
    return tiny("qwen2_moe_widths", tmp_path / "m")


def test_unrelated_widths_match_transformers(widths_folder, tmp_path):
    hp = ZmoeSource(convert_quiet(widths_folder, tmp_path / "w.zmoe")).hparams
    assert {k: hp[k] for k in WIDTHS} == WIDTHS
    assert_parity(widths_folder, tmp_path / "w2.zmoe")


@pytest.mark.parametrize("field, prefix, lie", [
    ("intermediate_size", "model.layers.1.mlp.", 128),
    ("moe_intermediate_size", "model.layers.0.mlp.experts.", 48),
    ("shared_expert_intermediate_size", "model.layers.0.mlp.shared_expert.", 80),
])
def test_config_lying_about_a_width_is_refused(widths_folder, tmp_path, field, prefix, lie):
    """The tensors keep their true shape; the error names the tensor and both shapes."""
    import re

    true = WIDTHS[field]
    edit_config(widths_folder, **{field: lie})
    with pytest.raises(ConversionError) as ei:
        convert_quiet(widths_folder, tmp_path / "w.zmoe")
    msg = str(ei.value)
    m = re.search(r"tensor '([^']+)' has shape \[(\d+), (\d+)\], (?:expected|but config\.json "
                  r"implies) \[(\d+), (\d+)\]", msg)
    assert m and m.group(1).startswith(prefix), msg
    got, want = {int(m.group(2)), int(m.group(3))}, {int(m.group(4)), int(m.group(5))}
    assert got == {true, 64} and want == {lie, 64}, msg
    assert f"{field}={lie}" in msg


# ------------------------------------------------------------------ 7. unused and missing tensors


EXTRA = "model.layers.0.mlp.extra_proj.weight"


@pytest.mark.parametrize("name", ["mixtral", "qwen2_moe", "qwen3_moe"])
def test_unused_tensors_are_reported_in_one_warning(tmp_path, name):
    folder = tiny(name, tmp_path / name)
    (folder / "tokenizer.json").write_text(json.dumps(   # silence the no-tokenizer warning
        {"version": "1.0", "model": {"type": "BPE", "vocab": {}, "merges": []}}))

    def add(ts):
        ts[EXTRA] = np.ones((4, 64), np.float32)
        ts["model.layers.1.self_attn.rotary.inv_freq"] = np.ones(8, np.float32)
    edit_tensors(folder / "model.safetensors", add)
    with warnings.catch_warnings(record=True) as rec:
        warnings.simplefilter("always")
        convert(folder, tmp_path / "m.zmoe", progress=False, verify=False)
    msgs = [str(w.message) for w in rec if issubclass(w.category, ConversionWarning)]
    assert len(msgs) == 1, msgs
    assert EXTRA in msgs[0] and "model.layers.1.self_attn.rotary.inv_freq" in msgs[0]
    assert "2 checkpoint tensor(s) not used" in msgs[0]


@pytest.mark.parametrize("name, missing", [
    ("mixtral", "model.layers.2.post_attention_layernorm.weight"),
    ("mixtral", "model.layers.1.block_sparse_moe.gate.weight"),
    ("qwen2_moe", "model.layers.1.mlp.down_proj.weight"),
    ("qwen2_moe", "model.layers.0.mlp.shared_expert_gate.weight"),
    ("qwen2_moe", "model.layers.2.self_attn.k_proj.bias"),
    ("qwen3_moe", "model.layers.0.self_attn.q_norm.weight"),
    ("qwen3_moe", "model.norm.weight"),
])
def test_missing_tensor_is_named(tmp_path, name, missing):
    folder = tiny(name, tmp_path / name)
    edit_tensors(folder / "model.safetensors", lambda ts: ts.pop(missing))
    with pytest.raises(ConversionError, match=missing.replace(".", r"\.")):
        convert_quiet(folder, tmp_path / "m.zmoe")


def test_an_expert_width_error_names_the_familys_config_key(tmp_path):
    """Mixtral gives its experts' width as config.json's ``intermediate_size``: the error names
    that key, not the stored field ``moe_intermediate_size``."""
    folder = tiny("mixtral", tmp_path / "m")
    cfg = json.loads((folder / "config.json").read_text())
    edit_config(folder, intermediate_size=cfg["intermediate_size"] + 8)
    with pytest.raises(ConversionError) as ei:
        convert_quiet(folder, tmp_path / "m.zmoe")
    msg = str(ei.value)
    assert f"(intermediate_size={cfg['intermediate_size'] + 8}, " in msg, msg
    assert "moe_intermediate_size" not in msg, msg


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_tensors_of_layers_past_the_config_are_refused(tmp_path, name):
    """A config.json that gives fewer layers than the weights have (num_hidden_layers cut
    down) is refused, naming a tensor of a missing layer and the config field, rather than
    stored with those layers unused as a model that computes something else."""
    folder = tiny(name, tmp_path / name, num_hidden_layers=1)
    with pytest.raises(ConversionError) as ei:
        convert_quiet(folder, tmp_path / "m.zmoe")
    msg = str(ei.value)
    assert msg.startswith(f"{folder / 'model.safetensors'}: tensor 'model.layers.1."), msg
    assert ("' belongs to layer 1, but config.json says num_hidden_layers=1 (layers 0-0): the "
            "config and the weights disagree on the number of layers") in msg, msg
    assert not (tmp_path / "m.zmoe").exists()


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_a_config_with_more_layers_than_the_weights_names_num_hidden_layers(tmp_path, name):
    """num_hidden_layers larger than the checkpoint's layers: the error names that field, not
    the expert count."""
    folder = tiny(name, tmp_path / name)
    n = json.loads((folder / "config.json").read_text())["num_hidden_layers"]
    edit_config(folder, num_hidden_layers=n + 3)
    with pytest.raises(ConversionError) as ei:
        convert_quiet(folder, tmp_path / "m.zmoe")
    msg = str(ei.value)
    assert (f"the checkpoint has no tensors of layer {n} at all, but config.json says "
            f"num_hidden_layers={n + 3}") in msg, msg
    assert not (tmp_path / "m.zmoe").exists()


def test_a_config_of_65536_layers_over_a_small_checkpoint_is_refused_at_once(tmp_path):
    """num_hidden_layers 65536 (the most the validator accepts) over a 3-layer checkpoint: the
    layer-count mismatch is found before anything is listed layer by layer (the tensor-name
    checks expanded every name of every layer, then looked up each layer in a list), so the
    error comes without work in proportion to the configured layers. Counted, not timed: the
    per-layer name listing is never asked for."""
    from zipmoe_rt.families import tensors as T

    folder = tiny("qwen3_moe", tmp_path / "q", num_hidden_layers=65536)
    calls = []
    real = T.expand
    T.expand = lambda table, hp: calls.append(hp.num_hidden_layers) or real(table, hp)
    try:
        with pytest.raises(ConversionError) as ei:
            convert_quiet(folder, tmp_path / "m.zmoe")
    finally:
        T.expand = real
    msg = str(ei.value)
    assert msg.startswith(f"{folder}: the checkpoint has no tensors of layer "), msg
    assert "but config.json says num_hidden_layers=65536: the config and the weights disagree " \
           "on the number of layers" in msg, msg
    assert 65536 not in calls, calls
    assert not (tmp_path / "m.zmoe").exists()
