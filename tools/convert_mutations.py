"""The mutations of tools/fuzz_convert.py: one random change to a copy of a tiny Hugging Face
checkpoint folder (safetensors headers, offsets, shapes and dtypes, the shard index, config.json
fields, the tokenizer and generation files, whole-file replacements), as JSON-able dicts so that
an input can be saved and replayed (``random_op``, ``apply_ops``, ``write_input``).
"""
from __future__ import annotations

import json
import random
import re
import shutil
import struct
from pathlib import Path

import fuzz_common as fc

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
