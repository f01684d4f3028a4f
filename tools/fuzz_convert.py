#!/usr/bin/env python
"""Structure-aware fuzzing of ``convert`` (Hugging Face folder -> ``.zmoe``).

    python tools/fuzz_convert.py [--count 2000] [--seconds S] [--seed 1] [--workers N]
                                 [--timeout 60] [--memory-mb 3072] [--cache DIR] [--json OUT]
                                 [--keep DIR]
    python tools/fuzz_convert.py --replay FOLDER ...

Each input is one of three tiny real checkpoints written by transformers' ``save_pretrained``
(tests/tiny_models.py: Mixtral and Qwen3-MoE in one ``model.safetensors``, Qwen2-MoE in shards
with a ``model.safetensors.index.json``; each with a generation_config.json, a
tokenizer_config.json and a tokenizer.json), built once into ``--cache`` (needs torch and
transformers; later runs only read them), with 1 to 3 mutations:

- safetensors: the header length lying (0, past the end, 2**63, off by one, unpadded); the
  header JSON changed at any node, malformed, deeply nested, with 5000-digit integers, NaN,
  duplicate keys or bad UTF-8; a tensor's ``data_offsets`` past the end, reversed, overlapping
  another's, or not matching shape x dtype; its ``shape`` negative, NaN, fractional, a string,
  huge or with a product that overflows int64 (offsets kept consistent with the wrapped size);
  its ``dtype`` unknown or changed; its name changed (layer / expert numbers huge, negative,
  with leading zeros or non-ASCII digits; the name empty or huge); ``__metadata__`` odd; the
  file truncated or extended; a tensor copied into another shard;
- model.safetensors.index.json: ``weight_map`` entries pointing to missing files, outside the
  folder (``../x``, absolute paths) or to the wrong shard, entries added or removed, and the
  JSON mutations above;
- config.json: absurd values of the fields the converter reads (expert count 0 or 10**12, top-k
  above it, negative or non-dividing sizes, NaN / Inf, wrong types, missing or unknown
  ``architectures``, unknown RoPE types, deep nesting) and the JSON mutations above;
- generation_config.json, tokenizer_config.json, tokenizer.json: garbage stop ids, tokens and
  templates, non-object documents, the JSON mutations above;
- a file deleted.

Each input goes through :func:`zipmoe_rt.convert.converter.convert` (what ``zipmoe-rt convert``
calls, verification on) in a worker process limited to ``--memory-mb`` of address space and
``--timeout`` seconds, and, when it converts, the result is loaded by the runtime and runs a
forward pass. Outcomes (tools/fuzz_common.py): ``refused`` is a ``ConversionError`` whose
message names the input folder (every file in it is named by a path under it; refusals are
counted by the file named); any other exception (a load or forward failure of a converted file
included), a MemoryError, a crash or a hang fails the campaign (exit status 1). ``--keep`` saves those inputs (folders) and their
mutations; ``--replay`` examines saved folders, each in a fresh worker. The inputs of a seed do
not depend on ``--workers``. A long unattended campaign on a 16-core machine (needs only the
repository and its test environment; the bases are built on the first run):

    python tools/fuzz_convert.py --count 100000 --workers 16 --json out.json

tests/test_fuzz_convert.py runs a short hypothesis-driven version.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import struct
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import fuzz_common as fc  # noqa: E402

try:
    import zipmoe_rt  # noqa: F401  (on the path already?)
except ImportError:
    sys.path[:0] = [str(ROOT), str(ROOT / "format")]

#: base name -> (tests/tiny_models.py spec, sharded)
BASES = {"mixtral": ("mixtral", False), "qwen2_moe_sharded": ("qwen2_moe", True),
         "qwen3_moe": ("qwen3_moe", False)}
#: bump when the bases change, so an old cache is not used
BASE_VERSION = 1
TOKENS = ["<unk>", "<s>", "</s>", "<|im_end|>"] + [f"t{i}" for i in range(252)]


def default_cache() -> Path:
    """``$XDG_CACHE_HOME/zipmoe-rt/fuzz-convert-v<BASE_VERSION>`` (``~/.cache`` by default)."""
    base = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    return base / "zipmoe-rt" / f"fuzz-convert-v{BASE_VERSION}"


def _aux_files(folder: Path) -> None:
    """A generation_config.json (when save_pretrained wrote none), a tokenizer_config.json with
    an EOS token and a chat template, and a word-level tokenizer.json over :data:`TOKENS`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(TOKENS)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.add_special_tokens(["<s>", "</s>", "<|im_end|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "bos_token": "<s>", "eos_token": {"content": "<|im_end|>"}, "unk_token": "<unk>",
        "model_max_length": 512, "chat_template": "{% for m in messages %}{{ m['content'] }}"
                                                  "<|im_end|>{% endfor %}"}, indent=1))
    gen = folder / "generation_config.json"
    if not gen.exists():
        gen.write_text(json.dumps({"bos_token_id": 1, "eos_token_id": [2, 3]}, indent=1))


def build_bases(cache: Path) -> dict:
    """The base folders (name -> Path), built into ``cache`` when absent (with torch and
    transformers, through tests/tiny_models.py) and reused after."""
    out = {}
    for name, (spec, sharded) in BASES.items():
        folder = cache / name
        if not (folder / "config.json").exists():
            sys.path.insert(0, str(ROOT / "tests"))
            from tiny_models import make_tiny
            tmp = cache / f".{name}.tmp-{os.getpid()}"
            shutil.rmtree(tmp, ignore_errors=True)
            make_tiny(spec, tmp, sharded=sharded)
            _aux_files(tmp)
            shutil.rmtree(folder, ignore_errors=True)
            os.replace(tmp, folder)
        out[name] = folder
    return out


# -- mutations ------------------------------------------------------------------------------------
#: op -> weight in random inputs
OPS = {"st_len": 2, "st_json": 3, "st_rename": 3, "st_text": 2, "st_offsets": 3, "st_shape": 3,
       "st_dtype": 2, "st_meta": 1, "st_trunc": 1, "st_dup": 1, "index": 3, "index_json": 1,
       "index_text": 1, "config": 8, "config_json": 2, "config_text": 1, "aux": 3, "aux_json": 2,
       "aux_text": 1, "delete": 1}
AUX = ("generation_config.json", "tokenizer_config.json", "tokenizer.json")
BIG = [0, -1, 1, 2, 3, 7, 10**6, 10**12, 2**31 - 1, 2**31, 2**32 + 1, 2**63, 10**30, -2**63, 0.5,
       2.0, 1e308, float("nan"), float("inf"), -float("inf"), "8", "", True, False, None, [], {},
       [8], {"a": [1]}]
#: config.json field -> values beyond :data:`BIG`
CONFIG = {
    "num_local_experts": [], "num_experts": [], "num_experts_per_tok": [9, 64, 1000],
    "hidden_size": [63, 65, 66, 128], "intermediate_size": [95, 97, 192],
    "moe_intermediate_size": [47, 96], "shared_expert_intermediate_size": [79, 160],
    "num_attention_heads": [5, 6, 8, 64], "num_key_value_heads": [3, 4, 5],
    "head_dim": [15, 17, 33],
    "vocab_size": [255, 257, 512], "num_hidden_layers": [2, 4, 100, 2**31 - 1],
    "rms_norm_eps": [-1e-6, 1e-300, 1e30], "rope_theta": [-10000.0, 1e-300, 1e300],
    "rope_scaling": [{"rope_type": "nope"}, {"type": "yarn"}, {"rope_type": "yarn", "factor": -1},
                     {"rope_type": "dynamic", "factor": 2.0}, {"rope_type": "llama3"},
                     {"rope_type": "linear", "factor": float("nan")},
                     {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 0},
                     {"rope_type": "longrope", "short_factor": [1.0]}, "yarn"],
    "rope_parameters": [{"rope_type": "nope", "rope_theta": 1e4}, {"rope_theta": "x"},
                        {"rope_type": "yarn", "rope_theta": 1e4, "factor": 0},
                        {"rope_type": "llama3", "rope_theta": 1e4, "factor": 8.0}],
    "architectures": [["NopeForCausalLM"], "MixtralForCausalLM", [5], [None],
                      ["Qwen2MoeForCausalLM"], ["Qwen3MoeForCausalLM"], ["MixtralForCausalLM"],
                      ["OlmoeForCausalLM"], ["LlamaForCausalLM"]],
    "model_type": ["llama", "mixtral", "qwen2_moe"],
    "sliding_window": [4, 10**9], "use_sliding_window": [True], "max_window_layers": [1, 99],
    "layer_types": [["full_attention"], ["sliding_attention"] * 3, ["x", "y", "z"]],
    "tie_word_embeddings": [True], "norm_topk_prob": [True, "yes"],
    "max_position_embeddings": [4, 2**40], "hidden_act": ["gelu", "relu", 5],
    "decoder_sparse_step": [0, 2, 4, -1], "mlp_only_layers": [[0, 1, 2], [5], [-1], ["a"], [0.5]],
    "qkv_bias": [True], "attention_bias": [True], "clip_qkv": [0.0, -1.0, 1.0],
    "eos_token_id": [[2, "x"], 2**70, -5, [[2]]], "dtype": ["int8", "float16", 5],
    "torch_dtype": ["bfloat16", "int8"], "output_router_logits": [True],
    "router_aux_loss_coef": [float("nan")], "initializer_range": [float("nan")],
}
AUX_VALUES = {
    "eos_token_id": [[2, 3], 2**70, -5, "x", [2, "x"], [[2]], 1.5, {"a": 1}, True],
    "bos_token_id": [2**70, "x"], "pad_token_id": [-1, [1]],
    "eos_token": [5, {"content": 5}, {"content": "<nope>"}, "<nope>", ["</s>"], "", None],
    "chat_template": [5, ["x"], {"name": "x"}, "{% for %}", "{{ raise_exception('x') }}"],
    "added_tokens": [5, [{"id": "x", "content": "</s>"}], [{"content": "</s>"}],
                     [{"id": 2**70, "content": "<|im_end|>"}], [{"id": None}], None],
    "model": [5, {"vocab": 5}, {"vocab": {"<|im_end|>": "x"}}, {"vocab": [1]}, None],
}
WHOLE = [b"", b"[]", b"null", b"5", b'"x"', b"\xff\xfe{}", b"{" * 100_000, b"[" * 80 + b"]" * 80,
         b"{}", b'{"a": NaN}', b'{"eos_token_id": 1e999}']


def random_op(rng: random.Random) -> dict:
    """One mutation (a JSON-able dict: every op has every key, each op reads those it needs)."""
    return {"op": rng.choices(list(OPS), weights=list(OPS.values()))[0],
            "target": rng.randrange(1 << 16), "pick": rng.randrange(1 << 16),
            "vpick": rng.randrange(64), "src": rng.randrange(1 << 16),
            "action": rng.choice(fc.JSON_ACTIONS), "kind": rng.choice(fc.TEXT_KINDS)}


def _read_st(path: Path):
    """(header dict | None, stated length, data bytes) of a safetensors file."""
    b = path.read_bytes()
    if len(b) < 8:
        return None, 0, b""
    (n,) = struct.unpack_from("<Q", b)
    try:
        h = json.loads(b[8:8 + n])
    except (ValueError, RecursionError):
        h = None
    return (h if isinstance(h, dict) else None), n, b[8 + n:]


def _write_st(path: Path, header, data: bytes, text_ops=(), pad=True) -> None:
    blob = fc.dumps(header, text_ops)
    if pad:
        blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data)


def _tensor(header: dict, pick: int):
    names = sorted(k for k, v in header.items() if k != "__metadata__" and isinstance(v, dict))
    return names[pick % len(names)] if names else None


def _st_op(path: Path, op: dict, shards: list) -> None:
    kind, pick, v = op["op"], op["pick"], op["vpick"]
    raw = path.read_bytes()
    header, n, data = _read_st(path)
    if kind == "st_len":
        size = len(raw)
        cands = [0, 1, 7, n - 1, n + 1, n + 3, size - 8, size - 7, size, size + 1, 2**63,
                 2**64 - 1, 2**32, 2 * n]
        c = cands[v % len(cands)] % 2**64
        if v % 16 == 15 and header is not None:   # a correct but unpadded header
            _write_st(path, header, data, pad=False)
            return
        path.write_bytes(struct.pack("<Q", c) + raw[8:])
        return
    if kind == "st_trunc":
        cut = [0, 4, 8, 9, 8 + n // 2, 8 + n, 8 + n + len(data) // 2, len(raw) - 1]
        if v % 9 == 8:
            path.write_bytes(raw + bytes(range(256)) * 4)
        else:
            path.write_bytes(raw[:max(0, cut[v % 8])])
        return
    if header is None:
        return
    if kind == "st_json":
        fc.json_op(header, op, _st_candidates)
        _write_st(path, header, data)
        return
    if kind == "st_text":
        _write_st(path, header, data, [op])
        return
    if kind == "st_meta":
        vals = ["x", [], 5, None, {"format": 5}, {"format": "tf"}, {"a": {"b": [1]}},
                {"format": "pt", "x" * 100: "y" * 100_000}, {}]
        header["__metadata__"] = vals[v % len(vals)]
        _write_st(path, header, data)
        return
    name = _tensor(header, op["target"])
    if name is None:
        return
    t = header[name]
    offs = t.get("data_offsets")
    b, e = (list(offs) + [0, 0])[:2] if isinstance(offs, list) else (0, 0)
    if kind == "st_offsets":
        other = header[_tensor(header, op["src"])].get("data_offsets")
        size = len(data)
        cands = [[b, size + 1], [b, e + 8], [e, b], list(other), [b - 1, e - 1], [0, e - b],
                 [b, b], [-1, e], [b, 2**63], [2**64, 2**64 + e - b], [b + 0.5, e], [str(b), e],
                 [b], [b, e, e], None, "x", [b + 2, e + 2], [size, size + e - b], [b, 2**64 - 1]]
        t["data_offsets"] = cands[v % len(cands)]
    elif kind == "st_shape":
        shape = list(t.get("shape") or [1])
        cands = [[-1] + shape[1:], [float("nan")] + shape[1:], [2.0] + shape[1:],
                 [2.5] + shape[1:], [str(shape[0])] + shape[1:], [2**40] + shape[1:],
                 [2**32, 2**32], shape[::-1], shape + [1], [1] + shape, [], [0], None, "x",
                 [True] + shape[1:], [2**64] + shape[1:], shape[:-1]]
        if v % 20 >= len(cands):   # a product that wraps to 0 in int64: offsets [b, b] agree
            t["shape"] = [2**62, 4]
            t["data_offsets"] = [b, b]
        else:
            t["shape"] = cands[v % len(cands)]
    elif kind == "st_rename":
        digits = [m.span() for m in re.finditer(r"\d+", name)]
        subs = ["99", "4294967296", "9" * 30, "-1", "01", "\u0663", "", "1e3", " 1", "1_0"]
        if digits and v % 16 < 12:
            a, z = digits[pick % len(digits)]
            new = name[:a] + subs[v % len(subs)] + name[z:]
        else:
            new = [name + "2", "x." + name, "", "a" * 100_000, name.replace(".", "/"),
                   name + "\u0000", name.upper(), "__metadata__"][v % 8]
        header[new] = header.pop(name)
    elif kind == "st_dtype":
        cands = ["Q4_K", "bf16", "F64", "F16", "I16", "U16", "F32", "U8", "BOOL", "I64",
                 "F8_E4M3", None, 5, ["BF16"], ""]
        t["dtype"] = cands[v % len(cands)]
    elif kind == "st_dup":
        others = [s for s in shards if s != path]
        if not others:   # one file: a duplicate key in its header
            _write_st(path, header, data, [{"kind": "dupkey", "pick": pick}])
            return
        oh, on, odata = _read_st(others[pick % len(others)])
        if oh is None:
            return
        header[name + ("" if v % 2 else ".copy")] = dict(t)
        oh[name] = dict(t)   # the same name in a second shard
        _write_st(others[pick % len(others)], oh, odata)
    _write_st(path, header, data)


def _st_candidates(v) -> list:
    c = fc.candidates(v)
    return c + [float("nan"), -5, 2**62] if type(v) is int else c


def _json_file_op(path: Path, op: dict, targeted) -> None:
    try:
        doc = json.loads(path.read_bytes())
    except (ValueError, RecursionError):
        return
    kind = op["op"].rsplit("_", 1)[-1]
    if kind == "json":
        fc.json_op(doc, op)
    elif kind == "text":
        path.write_bytes(fc.dumps(doc, [op], separators=(", ", ": ")))
        return
    else:
        doc = targeted(doc, op)
        if isinstance(doc, bytes):
            path.write_bytes(doc)
            return
    path.write_bytes(fc.dumps(doc, separators=(", ", ": ")))


def _config_op(doc, op):
    if not isinstance(doc, dict):
        return doc
    fields = list(CONFIG)
    key = fields[op["target"] % len(fields)]
    vals = CONFIG[key] + BIG + ["<delete>"]
    val = vals[op["vpick"] % len(vals)]
    if val == "<delete>":
        doc.pop(key, None)
    elif op["pick"] % 7 == 0:   # deep nesting where a value belongs
        doc[key] = json.loads("[" * 50 + "1" + "]" * 50)
    else:
        doc[key] = val
    return doc


def _index_op(doc, op):
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict) or not wm:
        return doc
    names = sorted(wm)
    name = names[op["target"] % len(names)]
    shards = sorted({str(s) for s in wm.values()})
    cands = ["missing.safetensors", "../model-00001-of-00002.safetensors", "/etc/passwd",
             "/dev/zero", "", ".", "..", "sub/x.safetensors", "config.json", 5, None,
             shards[op["src"] % len(shards)], "tokenizer.json", "model.safetensors.index.json",
             f"./{wm[name]}", "/proc/self/mem"]
    v = op["vpick"]
    if v % 20 == 19:
        doc["weight_map"] = [[k, s] for k, s in wm.items()]
    elif v % 20 == 18:
        wm["model.extra.weight"] = wm[name]
    elif v % 20 == 17:
        del wm[name]
    elif v % 20 == 16:   # every entry of one shard moved to an absolute path of the same file
        target = wm[name]
        for k in names:
            if wm[k] == target:
                wm[k] = "/" + target
    else:
        wm[name] = cands[v % len(cands)]
    return doc


def _aux_op(doc, op):
    v = op["vpick"]
    if v % 4 == 3:
        return WHOLE[op["pick"] % len(WHOLE)]
    if not isinstance(doc, dict):
        return doc
    keys = list(AUX_VALUES)
    key = keys[op["target"] % len(keys)]
    vals = AUX_VALUES[key] + ["<delete>"]
    val = vals[op["pick"] % len(vals)]
    if val == "<delete>":
        doc.pop(key, None)
    else:
        doc[key] = val
    return doc


def apply_ops(folder: Path, ops: list) -> None:
    """Mutate the checkpoint ``folder`` in place with ``ops`` (see :func:`random_op`). An op
    that does not apply to what earlier ops left (a header no longer an object...) is skipped."""
    for op in ops:
        try:
            _apply(folder, op)
        except (TypeError, ValueError, KeyError, IndexError, AttributeError, RecursionError,
                OverflowError):
            pass


def _apply(folder: Path, op: dict) -> None:
    shards = sorted(folder.glob("*.safetensors"))
    kind = op["op"]
    if kind.startswith("st_"):
        if shards:
            _st_op(shards[op["src"] % len(shards)] if kind == "st_dup" else
                   shards[op["pick"] % len(shards)], op, shards)
    elif kind.startswith("index"):
        p = folder / "model.safetensors.index.json"
        if p.exists():
            _json_file_op(p, op, _index_op)
    elif kind.startswith("config"):
        if (folder / "config.json").exists():
            _json_file_op(folder / "config.json", op, _config_op)
    elif kind.startswith("aux"):
        p = folder / AUX[op["target"] % len(AUX)]
        if p.exists():
            _json_file_op(p, op, _aux_op)
    elif kind == "delete":
        files = sorted(folder.iterdir())
        if files:
            files[op["target"] % len(files)].unlink()


def write_input(base: Path, ops: list, folder: Path) -> Path:
    """A copy of the base folder with ``ops`` applied, written under ``folder``; returns it."""
    dst = folder / "ckpt"
    shutil.copytree(base, dst)
    apply_ops(dst, ops)
    return dst


# -- the worker: examine one input -------------------------------------------------------------
def examine(folder: str) -> dict:
    """Convert ``folder`` (verification on, one thread) and, when it converts, load the result
    with the runtime and run a forward pass. Returns ``{"stages": {stage: "ok" | error class},
    "other": None | "Type: message"}``; stops at the first exception that is not a
    ConversionError naming the folder."""
    import warnings

    import numpy as np

    from zipmoe_rt.convert.converter import ConversionError, convert
    from zipmoe_rt.engine.store import ZmoeSource
    from zipmoe_rt.models import build_model

    folder = Path(folder)
    out = folder.parent / "out.zmoe"
    stages: dict = {}
    try:
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                convert(folder, out, threads=1, progress=False)
            stages["convert"] = "ok"
        except ConversionError as e:
            if str(folder) not in str(e):
                raise RuntimeError(f"ConversionError not naming the folder: {e}") from None
            m = re.search(re.escape(str(folder)) + r"/([^\s:'\"]+)", str(e))
            named = m.group(1) if m else "the folder"
            if named.endswith(".safetensors"):
                named = "a .safetensors file"
            stages["convert"] = f"{type(e).__name__} naming {named}"
            return {"stages": stages, "other": None}
        src = ZmoeSource(out)
        try:
            model = build_model(src)
            stages["load"] = "ok"
            ids = np.arange(5) % int(src.hparams["vocab_size"])
            logits = model.forward(ids, model.new_cache(16), last_only=False)
            if logits.shape != (5, int(src.hparams["vocab_size"])):
                raise RuntimeError(f"forward: logits of shape {logits.shape}")
            stages["forward"] = "ok"
        finally:
            src.close()
        return {"stages": stages, "other": None}
    except MemoryError as e:
        return {"stages": stages, "other": f"MemoryError: {e}"[:500], "memory": True}
    except Exception as e:  # noqa: BLE001 - what the campaign looks for
        import traceback
        return {"stages": stages, "other": f"{type(e).__name__}: {e}"[:500],
                "where": traceback.format_exc(limit=-3)[-1500:]}
    finally:
        if out.exists():
            out.unlink()


def _warm(cache: Path):
    """Examine every base once (warms the JIT; SystemExit if one is not clean)."""
    with tempfile.TemporaryDirectory() as d:
        for name in BASES:
            sub = Path(d) / name
            sub.mkdir()
            res = examine(str(write_input(cache / name, [], sub)))
            if res["other"] or set(res["stages"].values()) != {"ok"}:
                raise SystemExit(f"base {name} does not examine cleanly: {res}")


def Worker(cache: Path, memory_mb: int = 3072, start_timeout: float = 900) -> fc.Worker:
    """A worker process of this tool (:class:`fuzz_common.Worker`) serving :func:`examine`,
    warmed on the bases in ``cache``."""
    return fc.Worker(__file__, memory_mb, start_timeout, args=[cache], threads=1)


def campaign(cache: Path, count: int, seconds: float, seed: int, timeout: float = 60,
             memory_mb: int = 3072, keep: Path | None = None, workers: int = 1,
             out=sys.stdout) -> dict:
    """Run up to ``count`` inputs or ``seconds``, whichever ends first, over ``workers`` worker
    processes; print and return the figures (:func:`fuzz_common.campaign`)."""
    bases = build_bases(cache)
    names = list(bases)
    rng = random.Random(seed)

    def make_input(n):
        return {"base": names[rng.randrange(len(names))],
                "ops": [random_op(rng) for _ in range(rng.randint(1, 3))]}

    res = fc.campaign(make_input, lambda spec, d: write_input(bases[spec["base"]], spec["ops"], d),
                      lambda: Worker(cache, memory_mb), count, seconds, timeout, workers, keep,
                      out, progress_every=500)
    res["seed"] = seed
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000, help="most inputs (default 2000)")
    ap.add_argument("--seconds", type=float, default=0,
                    help="most wall time (default 0: no limit, run --count inputs)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--workers", type=int, default=1,
                    help="worker processes examining inputs at once (default 1)")
    ap.add_argument("--timeout", type=float, default=60, help="seconds per input (default 60)")
    ap.add_argument("--memory-mb", type=int, default=3072,
                    help="worker address-space limit in MiB (default 3072)")
    ap.add_argument("--cache", type=Path, default=None,
                    help=f"where the base checkpoints are built once (default {default_cache()})")
    ap.add_argument("--json", type=Path, help="write the figures here (JSON)")
    ap.add_argument("--keep", type=Path, help="save failing inputs (folders) and their mutations")
    ap.add_argument("--replay", type=Path, nargs="+",
                    help="examine these folders, each in a fresh worker, and print the outcomes")
    ap.add_argument("--worker", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        fc.serve(examine, lambda: _warm(a.worker))
        return 0
    cache = (a.cache or default_cache()).resolve()
    cache.mkdir(parents=True, exist_ok=True)
    if a.replay:
        build_bases(cache)
        bad = 0
        for f in a.replay:
            w = Worker(cache, a.memory_mb)
            try:
                with tempfile.TemporaryDirectory() as d:
                    res = w.examine(write_input(f.resolve(), [], Path(d)), a.timeout)
            finally:
                w.close()
            bad += res["outcome"] in fc.BAD
            print(f"{f}: {json.dumps(res)}")
        return 1 if bad else 0
    res = campaign(cache, a.count, a.seconds or float("inf"), a.seed, a.timeout, a.memory_mb,
                   a.keep, a.workers)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 1 if any(res["outcomes"][o] for o in fc.BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
