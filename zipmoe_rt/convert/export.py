"""``.zmoe`` -> Hugging Face folder (safetensors + config + tokenizer files), and a text summary.

Exported tensors are byte-identical to the converter's source (format/SPEC.md §4-§5); config.json,
tokenizer.json, tokenizer_config.json (with the chat template) and generation_config.json are
written back from the metadata.
"""
from __future__ import annotations

import json
import os
import shutil
import warnings
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

import zmoe
from zmoe.constants import Keys
from zmoe.reader import element_count

from .atomic import (StaleTemporaryWarning, WriteError, remove_stale_temporaries, stale_message,
                     temporary_name, write_error)
from .safetensors_io import DTYPE_SIZES, write_safetensors

#: Shards are cut at this many bytes (transformers' default max_shard_size is 5 GB).
MAX_SHARD_BYTES = 5 * 10**9


def export(path, out_dir, max_shard_bytes: int = MAX_SHARD_BYTES, progress: bool = True) -> Path:
    """Write the model in ``path`` as an HF checkpoint folder ``out_dir``.

    Tensors keep their source names, order, dtypes and bytes. More than ``max_shard_bytes`` of
    tensors are split into ``model-0000i-of-0000n.safetensors`` with ``model.safetensors.index.json``.
    The folder is written under a temporary name and renamed when complete.

    Raises:
        zmoe.ZmoeError: corrupt input (checksums are verified while exporting).
        FileExistsError: ``out_dir`` exists and is not empty.
        zipmoe_rt.convert.atomic.WriteError: the folder cannot be written (disk full, I/O
            error: the output and the reason named); the temporary folder is removed and
            ``path`` is untouched.
    Warns:
        StaleTemporaryWarning: ``out_dir.tmp-<pid>`` folders of earlier exports killed outright,
            whose process no longer runs, were found and removed.
    """
    out_dir = Path(out_dir)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir}: exists and is not empty")
    removed = remove_stale_temporaries(out_dir)
    if removed:
        warnings.warn(stale_message(removed), StaleTemporaryWarning, stacklevel=2)
    tmp = temporary_name(out_dir)
    try:
        tmp.mkdir(parents=True, exist_ok=False)
    except OSError as e:
        raise write_error(out_dir, e) from None
    try:
        with zmoe.ZmoeReader(path, use_mmap=False) as r:   # truncation: an error, not SIGBUS
            shards, cur, size = [], [], 0
            for name, t in r.tensors.items():
                n = element_count(t) * DTYPE_SIZES[t["dtype"]]
                if cur and size + n > max_shard_bytes:
                    shards.append(cur)
                    cur, size = [], 0
                cur.append(name)
                size += n
            shards.append(cur)
            bar = tqdm(total=sum(element_count(t) * DTYPE_SIZES[t["dtype"]] for t in r.tensors.values()),
                       unit="B", unit_scale=True, desc="export", disable=not progress)

            def getter(name):
                def get():
                    a = r.read_tensor(name, verify=True)
                    bar.update(a.nbytes)
                    return np.ascontiguousarray(a).reshape(-1).view(np.uint8)
                return get

            weight_map = {}
            for i, names in enumerate(shards):
                fname = ("model.safetensors" if len(shards) == 1
                         else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors")
                write_safetensors(tmp / fname, {n: (r.tensors[n]["dtype"], r.tensors[n]["shape"],
                                                    getter(n)) for n in names},
                                  metadata={"format": "pt"})
                weight_map.update({n: fname for n in names})
            bar.close()
            if len(shards) > 1:
                total = sum(element_count(t) * DTYPE_SIZES[t["dtype"]] for t in r.tensors.values())
                (tmp / "model.safetensors.index.json").write_text(json.dumps(
                    {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
            _write_side_files(r.metadata, tmp)
        if out_dir.exists():
            out_dir.rmdir()
        os.replace(tmp, out_dir)
    except FileNotFoundError as e:
        if e.filename is None:   # not the model file (reported as missing): a write failed
            raise write_error(out_dir, e) from None
        raise
    except OSError as e:
        if isinstance(e, WriteError):
            raise
        raise write_error(out_dir, e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp)
    return out_dir


def _write_side_files(meta: dict, folder: Path):
    def dump(name, obj):
        (folder / name).write_text(json.dumps(obj, indent=2, ensure_ascii=False) + "\n", encoding="utf-8")
    if Keys.HF.CONFIG in meta:
        dump("config.json", meta[Keys.HF.CONFIG])
    if meta.get(Keys.Generation.CONFIG):
        dump("generation_config.json", meta[Keys.Generation.CONFIG])
    if Keys.Tokenizer.JSON in meta:
        (folder / "tokenizer.json").write_text(meta[Keys.Tokenizer.JSON], encoding="utf-8")
    tok_cfg = dict(meta.get(Keys.Tokenizer.CONFIG) or {})
    if Keys.Tokenizer.CHAT_TEMPLATE in meta:
        tok_cfg["chat_template"] = meta[Keys.Tokenizer.CHAT_TEMPLATE]
    if tok_cfg:
        dump("tokenizer_config.json", tok_cfg)


def _token_text(tokenizer_json: str | None, token_id: int) -> str:
    """The token's text, JSON-quoted (``"<|im_end|>"``), or ``?`` without a tokenizer or
    when the id is outside the vocabulary."""
    if not tokenizer_json:
        return "?"
    from tokenizers import Tokenizer as _HFTokenizer

    tok = _HFTokenizer.from_str(tokenizer_json).id_to_token(int(token_id))
    return "?" if tok is None else json.dumps(tok, ensure_ascii=False)


def tensor_weights(record: dict) -> int:
    """Weights a tensor of a ``.zmoe`` index encodes: its elements, but two per byte of an MXFP4
    ``*_blocks`` tensor (FP4 pairs in U8 bytes) and none for the block scales of an MXFP4 or
    FP8 expert (``*_scales`` / ``*_scale`` roles) or FP8 dense tensor (``*.weight_scale_inv``):
    overhead that dequantises the weights."""
    n = element_count(record)
    role = (record.get("expert") or {}).get("role") or ""
    if role.endswith(("_scale", "_scales")) or record.get("name", "").endswith(".weight_scale_inv"):
        return 0
    if record.get("encoding") == "mxfp4" or role.endswith("_blocks"):
        return 2 * n
    return n


def weight_totals(reader) -> dict:
    """Per group (``"expert"``, ``"dense"``) of an open :class:`zmoe.ZmoeReader`: ``weights``
    (:func:`tensor_weights`), ``stored`` bytes and ``source`` bytes (the tensors as the
    checkpoint held them), as ``inspect`` and ``convert`` total them."""
    groups = {g: {"weights": 0, "stored": 0, "source": 0} for g in ("expert", "dense")}
    for name, t in reader.tensors.items():
        g = groups["expert" if "expert" in t else "dense"]
        g["weights"] += tensor_weights(t)
        g["stored"] += reader.stored_bytes(name)
        g["source"] += element_count(t) * DTYPE_SIZES[t["dtype"]]
    return groups


def summarize(path, show_tensors: bool = True, max_value: int = 80) -> str:
    """Human-readable summary of a ``.zmoe`` file: metadata, the stop tokens (ids and text), the
    tensor table, bits per weight for expert and dense tensors. Does not decode anything."""
    lines = []
    with zmoe.ZmoeReader(path, use_mmap=False) as r:
        size = r.header.file_size
        lines.append(f"{path}: .zmoe v{r.header.version}, {size / 1e6:.1f} MB, "
                     f"{len(r.tensors)} tensors, {len(r.experts)} expert blocks, "
                     f"alignment {r.header.alignment}")
        lines.append("metadata:")
        kw = max((len(k) for k in r.metadata), default=0)     # columns line up for any key
        tw = max((len(r.metadata_types[k]) for k in r.metadata), default=0)
        for k, v in r.metadata.items():
            s = json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v
            s = s.replace("\n", "\\n")
            if len(s) > max_value:
                s = s[:max_value - 3] + f"... ({len(s)} chars)"
            lines.append(f"  {k:<{kw}} {r.metadata_types[k]:<{tw}} {s}")
        stops = r.metadata.get(Keys.Generation.EOS_TOKEN_IDS)
        if stops is not None:
            lines.append("stop tokens: " + (", ".join(
                f"{i} {_token_text(r.metadata.get(Keys.Tokenizer.JSON), i)}" for i in stops)
                or "none"))
        codecs = {"expert": set(), "dense": set()}
        rows = []
        nw = max([len("name")] + [len(n) for n in r.tensors])
        sw = max([len("shape")] + [len(str(t["shape"])) for t in r.tensors.values()])
        for name, t in r.tensors.items():
            if "exp_codec" in t:
                codecs["expert" if "expert" in t else "dense"].add(t["exp_codec"])
            n = tensor_weights(t) or element_count(t)      # block scales: bits per scale
            stored = r.stored_bytes(name)
            rows.append(f"  {name:<{nw}} {t['dtype']:<5} {str(t['shape']):<{sw}} {t['encoding']:<8} "
                        f"{stored:>12,d} {8 * stored / max(n, 1):6.2f}")
        if show_tensors:
            lines.append(f"tensors:\n  {'name':<{nw}} {'dtype':<5} {'shape':<{sw}} {'encoding':<8} "
                         f"{'stored bytes':>12} {'bits/w':>6}")
            lines += rows
        lines.append("totals:")
        for g, tot in weight_totals(r).items():
            n, stored, src = tot["weights"], tot["stored"], tot["source"]
            if n:
                lines.append(f"  {g:<7} {n:>14,d} weights  {stored / 1e6:10.1f} MB stored  "
                             f"{8 * stored / n:6.2f} bits/weight  {100 * stored / src:5.1f} % of source"
                             + (f"  (exponents: {', '.join(sorted(codecs[g]))})" if codecs[g] else ""))
    return "\n".join(lines)
