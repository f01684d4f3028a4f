"""Hugging Face checkpoint folder -> ``.zmoe`` (format/SPEC.md).

Streams tensor by tensor from memory-mapped safetensors, compresses expert blocks on all cores
(zstd releases the GIL), writes to a temporary file next to the output, verifies the result
bit for bit against the source, and only then renames it into place. On any error, or Ctrl-C,
the temporary file is removed and nothing else is touched.
"""
from __future__ import annotations

import json
import os
import warnings
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import zmoe
from zmoe.codec import zstd_parameters

from .. import __version__
from ..util import sha256_file
from .atomic import (StaleTemporaryWarning, WriteError, remove_stale_temporaries, stale_message,
                     temporary_name, write_error)
from .registry import ConfigError, UnsupportedArchitectureError, get_architecture
from .safetensors_io import Checkpoint, SafetensorsError


class ConversionError(ValueError):
    """The checkpoint cannot be converted; the message names the file, tensor or option."""


class ConversionWarning(UserWarning):
    """The conversion succeeds but the output lacks something a user will need (e.g. no
    tokenizer: ``run``/``chat`` cannot use the file)."""


def _read_json(path: Path, required: bool = False) -> dict | None:
    if not path.exists():
        if required:
            raise ConversionError(f"{path}: missing")
        return None
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None


def _eos_ids(gen: dict, config: dict, tok_cfg: dict, tokenizer_json: str | None) -> list[int]:
    for src in (gen, config):
        e = src.get("eos_token_id")
        if e is not None:
            return [int(x) for x in (e if isinstance(e, list) else [e])]
    tok = tok_cfg.get("eos_token")
    if isinstance(tok, dict):
        tok = tok.get("content")
    if tok and tokenizer_json:
        for t in json.loads(tokenizer_json).get("added_tokens", []):
            if t["content"] == tok:
                return [int(t["id"])]
    return []


def _expected_expert_shape(role: str, hp: dict, stacked: bool) -> tuple:
    h, i = hp["hidden_size"], hp["moe_intermediate_size"]
    shape = {"gate": (i, h), "up": (i, h), "down": (h, i), "gate_up": (2 * i, h)}[role]
    return (hp["num_experts"],) + shape if stacked else shape


def plan_conversion(folder: Path):
    """Read config, tokenizer files and the tensor list; check names and shapes.

    Returns:
        (arch, hparams, checkpoint, dense_names, experts) where experts maps
        (layer, expert) -> [(name, ExpertRef)].
    Raises:
        ConversionError: unsupported architecture, missing shard or config key, an expert tensor
            whose shape does not match the config, a missing expert tensor.
    """
    config = _read_json(folder / "config.json", required=True)
    try:
        arch = get_architecture(config)
        hp = arch.hparams()
    except (UnsupportedArchitectureError, ConfigError) as e:
        raise ConversionError(f"{folder / 'config.json'}: {e}") from None
    try:
        ckpt = Checkpoint(folder)
    except (FileNotFoundError, SafetensorsError) as e:
        raise ConversionError(str(e)) from None
    dense, experts = [], {}
    for t in ckpt:
        ref = arch.expert_tensor(t.name)
        if ref is None:
            dense.append(t.name)
            continue
        if ref.layer not in hp["moe_layers"]:
            raise ConversionError(f"{t.file}: tensor {t.name!r} is an expert of layer {ref.layer}, "
                                  f"which the config says is not a MoE layer")
        want = _expected_expert_shape(ref.role, hp, ref.expert is None)
        if tuple(t.shape) != want:
            raise ConversionError(f"{t.file}: tensor {t.name!r} has shape {list(t.shape)}, "
                                  f"expected {list(want)} from config.json")
        es = range(hp["num_experts"]) if ref.expert is None else [ref.expert]
        for e in es:
            if not 0 <= e < hp["num_experts"]:
                raise ConversionError(f"{t.file}: tensor {t.name!r}: expert index {e} out of range "
                                      f"(num_experts={hp['num_experts']})")
            experts.setdefault((ref.layer, e), []).append((t.name, ref))
    for layer in hp["moe_layers"]:
        for e in range(hp["num_experts"]):
            roles = {ref.role for _, ref in experts.get((layer, e), [])}
            if not ({"gate", "up", "down"} <= roles or {"gate_up", "down"} <= roles):
                raise ConversionError(f"{folder}: layer {layer} expert {e} lacks tensors "
                                      f"(has roles {sorted(roles) or 'none'})")
    embed = "model.embed_tokens.weight"
    if embed not in ckpt.tensors:
        raise ConversionError(f"{folder}: no tensor {embed!r}")
    if tuple(ckpt.tensors[embed].shape) != (hp["vocab_size"], hp["hidden_size"]):
        raise ConversionError(f"{ckpt.tensors[embed].file}: tensor {embed!r} has shape "
                              f"{list(ckpt.tensors[embed].shape)}, expected "
                              f"[{hp['vocab_size']}, {hp['hidden_size']}] from config.json")
    return arch, hp, ckpt, dense, experts


def _metadata(folder: Path, arch, hp: dict, ckpt: Checkpoint, chunks: int,
              exp_codec: str = zmoe.DEFAULT_EXP_CODEC) -> list[tuple]:
    config = _read_json(folder / "config.json")
    tok_cfg = _read_json(folder / "tokenizer_config.json") or {}
    gen = _read_json(folder / "generation_config.json") or {}
    tj = folder / "tokenizer.json"
    tokenizer_json = tj.read_text(encoding="utf-8") if tj.exists() else None
    template = None
    if (folder / "chat_template.jinja").exists():
        template = (folder / "chat_template.jinja").read_text(encoding="utf-8")
    elif isinstance(tok_cfg.get("chat_template"), str):
        template = tok_cfg["chat_template"]
    elif (folder / "chat_template.json").exists():
        template = (_read_json(folder / "chat_template.json") or {}).get("chat_template")
    tok_cfg = {k: v for k, v in tok_cfg.items() if k != "chat_template"}
    files = sorted({t.file for t in ckpt} | {p for p in folder.iterdir() if p.suffix in (".json", ".jinja")})
    meta = [("general.architecture", arch.name, "str"), ("general.family", arch.family, "str"),
            ("general.name", folder.resolve().name, "str")]
    for k, v in hp.items():
        meta.append((f"hparams.{k}", v, "json" if isinstance(v, (dict, list)) and not
                     (isinstance(v, list) and v and all(isinstance(x, int) for x in v)) else None))
    meta += [("hf.config", config, "json"),
             ("tokenizer.config", tok_cfg, "json"),
             ("generation.config", gen, "json"),
             ("generation.eos_token_ids", _eos_ids(gen, config, tok_cfg, tokenizer_json), "int[]"),
             ("provenance.files", [{"name": p.name, "size": p.stat().st_size, "sha256": sha256_file(p)}
                                   for p in files], "json"),
             ("provenance.converter", f"zipmoe-rt {__version__}", "str"),
             ("encoding.chunks", int(chunks), "int"),
             ("encoding.exp_codec", exp_codec, "str")]
    if exp_codec == "zstd":
        meta.append(("encoding.zstd", {k: getattr(zstd_parameters(), k) for k in
                                       ("strategy", "window_log", "chain_log", "hash_log",
                                        "search_log", "min_match", "target_length")}, "json"))
    if tokenizer_json is not None:
        meta.append(("tokenizer.json", tokenizer_json, "str"))
    if template is not None:
        meta.append(("tokenizer.chat_template", template, "str"))
    return meta


def _expert_pieces(ckpt: Checkpoint, refs, expert: int) -> list:
    pieces = []
    for name, ref in refs:
        t = ckpt.tensors[name]
        raw = ckpt.raw(name)
        if ref.expert is None:  # stacked [E, ...]: this expert's contiguous slice
            n = raw.size // t.shape[0]
            pieces.append(zmoe.ExpertPiece(name, t.dtype, t.shape, ref.role,
                                           raw[expert * n:(expert + 1) * n], part=expert))
        else:
            pieces.append(zmoe.ExpertPiece(name, t.dtype, t.shape, ref.role, raw))
    return pieces


def verify_against(path: Path, ckpt: Checkpoint, progress: bool = False):
    """Decode every tensor of ``path`` and compare it byte for byte with the source checkpoint.

    Raises:
        ConversionError: a tensor missing or different (named).
    """
    with zmoe.ZmoeReader(path) as r:
        names = set(r.tensors)
        if names != set(ckpt.tensors):
            raise ConversionError(f"{path}: tensor set differs from the source "
                                  f"({sorted(set(ckpt.tensors) ^ names)[:5]})")
        for name in tqdm(list(r.tensors), desc="verify", unit="tensor", disable=not progress,
                         leave=False):
            got = r.read_tensor(name, verify=True).reshape(-1).view(np.uint8)
            if not np.array_equal(got, ckpt.raw(name)):
                raise ConversionError(f"{path}: tensor {name!r} does not round-trip (converter bug)")


def convert(folder, output, chunks: int = zmoe.DEFAULT_CHUNKS, dense_encoding: str = "raw",
            threads: int | None = None, verify: bool = True, progress: bool = True,
            overwrite: bool = True, expert_encoding: str = "bitplane",
            exp_codec: str = zmoe.DEFAULT_EXP_CODEC) -> Path:
    """Convert an HF checkpoint folder to a ``.zmoe`` file.

    Args:
        folder: folder with config.json, safetensors (single or sharded + index), and optionally
            tokenizer.json, tokenizer_config.json / chat_template.jinja, generation_config.json.
        output: target path; written as ``output.tmp-<pid>`` and renamed when complete.
        chunks: K, exponent chunks per expert tensor (>= 1).
        dense_encoding: "raw" or "bitplane" for non-expert tensors.
        expert_encoding: "bitplane" (the point of the format) or "raw" (uncompressed experts,
            still in expert blocks: the baseline of the benchmarks).
        exp_codec: exponent-chunk codec of bit-plane tensors: "huffman" (default; SPEC §5.3,
            decodes ~2x faster than zstd at the same size) or "zstd".
        threads: compression threads (default: all cores).
        verify: decode the written file and compare every tensor with the source before renaming.
        progress: show a tqdm progress bar (bytes of the source).
        overwrite: replace an existing output.

    Returns: the output path.
    Raises:
        ConversionError: any problem with the input or the options (file/tensor/option named).
        zipmoe_rt.convert.atomic.WriteError: the output cannot be written (disk full, I/O error:
            the output and the reason named); the temporary file is removed, an existing
            output and the source are untouched.
    Warns:
        ConversionWarning: the folder has no tokenizer.json (the file is written all the same).
        StaleTemporaryWarning: ``output.tmp-<pid>`` files of earlier conversions killed
            outright (SIGKILL, a crash), whose process no longer runs, were found and removed.
    """
    folder, output = Path(folder), Path(output)
    if not folder.is_dir():
        raise ConversionError(f"{folder}: not a folder")
    if chunks < 1:
        raise ConversionError(f"--chunks must be >= 1, got {chunks}")
    if dense_encoding not in (zmoe.ENC_RAW, zmoe.ENC_BITPLANE):
        raise ConversionError(f"--dense-encoding must be raw or bitplane, got {dense_encoding!r}")
    if expert_encoding not in (zmoe.ENC_RAW, zmoe.ENC_BITPLANE):
        raise ConversionError(f"--expert-encoding must be raw or bitplane, got {expert_encoding!r}")
    if exp_codec not in zmoe.EXP_CODECS:
        raise ConversionError(f"--exp-codec must be one of {', '.join(zmoe.EXP_CODECS)}, "
                              f"got {exp_codec!r}")
    if output.is_dir():
        raise ConversionError(f"{output}: is a folder; give a file name like model.zmoe")
    if output.exists() and not overwrite:
        raise ConversionError(f"{output}: exists (pass --force to replace it)")
    arch, hp, ckpt, dense, experts = plan_conversion(folder)
    if not (folder / "tokenizer.json").exists():
        warnings.warn(f"{folder}: no tokenizer.json: {output} will hold the weights but "
                      f"`zipmoe-rt run/chat` and zipmoe_rt.load() need a tokenizer; copy the "
                      f"model's tokenizer.json (and tokenizer_config.json) into the folder and "
                      f"convert again", ConversionWarning, stacklevel=2)
    output.parent.mkdir(parents=True, exist_ok=True)
    removed = remove_stale_temporaries(output)
    if removed:
        warnings.warn(stale_message(removed), StaleTemporaryWarning, stacklevel=2)
    tmp = temporary_name(output)
    threads = threads or os.cpu_count() or 1
    total = sum(t.nbytes for t in ckpt)
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"convert {folder.name}",
               disable=not progress)
    try:
        w = zmoe.ZmoeWriter(tmp)
        try:
            for key, value, typ in _metadata(folder, arch, hp, ckpt, chunks, exp_codec):
                w.add_metadata(key, value, typ)
            for name in dense:
                t = ckpt.tensors[name]
                w.add_tensor(name, t.dtype, t.shape, ckpt.raw(name), encoding=dense_encoding,
                             chunks=chunks, exp_codec=exp_codec)
                bar.update(t.nbytes)
            with ThreadPoolExecutor(threads) as pool:
                window: deque = deque()
                for (layer, e) in sorted(experts):
                    pieces = _expert_pieces(ckpt, experts[(layer, e)], e)
                    window.append(pool.submit(zmoe.encode_expert, layer, e, pieces, chunks,
                                              raw=expert_encoding == zmoe.ENC_RAW,
                                              exp_codec=exp_codec))
                    while len(window) > 2 * threads:
                        enc = window.popleft().result()
                        w.write_expert(enc)
                        bar.update(sum(memoryview(p.data).nbytes for p in enc.pieces))
                while window:
                    enc = window.popleft().result()
                    w.write_expert(enc)
                    bar.update(sum(memoryview(p.data).nbytes for p in enc.pieces))
            w.set_order(t.name for t in ckpt)  # SPEC §2: index records in the source's order
            w.close()
        except BaseException:
            w.abort()
            raise
        bar.close()
        if verify:
            verify_against(tmp, ckpt, progress)
        os.replace(tmp, output)
    except ValueError as e:
        raise ConversionError(str(e)) from None
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise write_error(output, e) from None
    finally:
        bar.close()
        ckpt.close()
        if tmp.exists():
            tmp.unlink()
    return output
