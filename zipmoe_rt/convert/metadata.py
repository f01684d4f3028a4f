"""A checkpoint folder's JSON and tokenizer files as ``.zmoe`` metadata (format/SPEC.md §3):
config.json, generation_config.json, tokenizer_config.json, tokenizer.json and the chat
template, read strictly (:func:`read_json`), checked (the tokenizer loads, the template
compiles), and the stop ids as the union of every source (:func:`_eos_ids`).
"""
from __future__ import annotations

import json
from pathlib import Path

import zmoe
from zmoe.codec import zstd_parameters
from zmoe.constants import Keys, hparam_key
from zmoe.validate_json import MAX_JSON_DEPTH

from .. import __version__
from ..util import sha256_file
from .errors import ConversionError
from .safetensors_io import Checkpoint, strict_json

__all__ = ["read_json", "container_metadata"]


def read_json(path: Path, required: bool = False) -> dict | None:
    """The JSON object in ``path`` (None when absent and not ``required``).

    Raises:
        ConversionError: missing (when required), not JSON (as strict as transformers' Rust
            readers: no NaN, no key twice, UTF-8) or not an object; the file named.
    """
    if not path.exists():
        if required:
            raise ConversionError(f"{path}: missing")
        return None
    try:
        doc = strict_json(path.read_bytes())
    except ValueError as e:
        raise ConversionError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(doc, dict):
        raise ConversionError(f"{path}: not a JSON object")
    stack = [(doc, 1)]   # stored as a json metadata value 3 levels into the index (SPEC §3)
    while stack:
        x, d = stack.pop()
        if d > MAX_JSON_DEPTH - 3:
            raise ConversionError(f"{path}: nested deeper than {MAX_JSON_DEPTH - 3} levels")
        stack.extend((c, d + 1) for c in (x.values() if isinstance(x, dict) else x)
                     if isinstance(c, (dict, list)))
    return doc


def _token_ids(v, where: str) -> list[int]:
    """An ``eos_token_id`` value (an int or a list of ints) as a list; ConversionError naming
    ``where`` (file and key) otherwise."""
    ids = v if isinstance(v, list) else [v]
    if not all(type(x) is int and 0 <= x < 2**31 for x in ids):
        raise ConversionError(f"{where}: {str(v)[:60]!r} is not a token id or a list of token "
                              f"ids (integers in 0..2**31-1)")
    return ids


def _eos_ids(gen: dict, config: dict, tok_cfg: dict, tokenizer_json: str | None,
             folder: Path = Path(".")) -> list[int]:
    """Stop token ids: the union of generation_config.json's and config.json's
    ``eos_token_id`` (an int or a list) and the tokenizer's EOS token (tokenizer_config.json's
    ``eos_token``, looked up in tokenizer.json), in that order, without repeats. Sources often
    disagree (a chat model whose config says ``<|im_end|>`` and whose generation config says
    ``<|endoftext|>``): stopping on any of them is what the model needs.

    Raises:
        ConversionError: an ``eos_token_id`` that is not a token id or a list of them, or an
            ``eos_token`` that is not a string (or ``{"content": str}``); file and key named.
    """
    ids: list[int] = []
    for src, fname in ((gen, "generation_config.json"), (config, "config.json")):
        e = src.get("eos_token_id")
        if e is not None:
            ids += _token_ids(e, f"{folder / fname}: eos_token_id")
    tok = tok_cfg.get("eos_token")
    if isinstance(tok, dict):
        tok = tok.get("content")
    if tok is not None and not isinstance(tok, str):
        raise ConversionError(f"{folder / 'tokenizer_config.json'}: eos_token {str(tok)[:40]!r} "
                              f"is not a string")
    if tok and tokenizer_json:
        tj = json.loads(tokenizer_json)
        added = tj.get("added_tokens")
        found = [t["id"] for t in added if isinstance(t, dict) and t.get("content") == tok
                 and type(t.get("id")) is int and 0 <= t["id"] < 2**31] \
            if isinstance(added, list) else []
        model = tj.get("model")
        vocab = model.get("vocab") if isinstance(model, dict) else None
        if not found and isinstance(vocab, dict) and type(vocab.get(tok)) is int \
                and 0 <= vocab[tok] < 2**31:
            found = [vocab[tok]]
        ids += found[:1]
    return list(dict.fromkeys(ids))


def _check_tokenizer(folder: Path, tokenizer_json: str | None, template: str | None,
                     template_file: str) -> None:
    """tokenizer.json loads with ``tokenizers`` and the chat template compiles (as
    transformers compiles it), so a converted file never holds a tokenizer or template that
    ``run`` / ``chat`` cannot use.

    Raises:
        ConversionError: naming tokenizer.json or the file the template came from.
    """
    if tokenizer_json is not None:
        from tokenizers import Tokenizer
        try:
            Tokenizer.from_str(tokenizer_json)
        except Exception as e:  # noqa: BLE001 - tokenizers raises a bare Exception
            raise ConversionError(f"{folder / 'tokenizer.json'}: not a tokenizer the "
                                  f"tokenizers library loads ({str(e)[:200]})") from None
    if template is not None:
        from ..chat_template import compile_chat_template
        if not isinstance(template, str):
            raise ConversionError(f"{folder / template_file}: chat_template is not a string")
        try:
            compile_chat_template(template)
        except (TypeError, ValueError) as e:
            raise ConversionError(f"{folder / template_file}: chat_template does not compile "
                                  f"({str(e)[:200]})") from None


def container_metadata(folder: Path, arch, hp: dict, ckpt: Checkpoint, chunks: int,
              exp_codec: str = zmoe.DEFAULT_EXP_CODEC) -> list[tuple]:
    config = read_json(folder / "config.json")
    tok_cfg = read_json(folder / "tokenizer_config.json") or {}
    gen = read_json(folder / "generation_config.json") or {}
    tj = folder / "tokenizer.json"
    tokenizer_json = None
    if tj.exists():
        try:
            tokenizer_json = tj.read_bytes().decode("utf-8")
            strict_json(tokenizer_json)
        except ValueError as e:
            raise ConversionError(f"{tj}: invalid JSON ({e})") from None
    template, template_file = None, None
    if (folder / "chat_template.jinja").exists():
        template_file = "chat_template.jinja"
        try:
            template = (folder / template_file).read_bytes().decode("utf-8")
        except UnicodeDecodeError as e:
            raise ConversionError(f"{folder / template_file}: not UTF-8 ({e.reason} at byte "
                                  f"{e.start})") from None
    elif isinstance(tok_cfg.get("chat_template"), str):
        template, template_file = tok_cfg["chat_template"], "tokenizer_config.json"
    elif (folder / "chat_template.json").exists():
        template = (read_json(folder / "chat_template.json") or {}).get("chat_template")
        template_file = "chat_template.json"
    _check_tokenizer(folder, tokenizer_json, template, template_file)
    tok_cfg = {k: v for k, v in tok_cfg.items() if k != "chat_template"}
    files = sorted({t.file for t in ckpt} | {p for p in folder.iterdir() if p.suffix in (".json", ".jinja")})
    meta = [(Keys.General.ARCHITECTURE, arch.name, "str"),
            (Keys.General.FAMILY, arch.family, "str"),
            (Keys.General.NAME, folder.resolve().name, "str")]
    for k, v in hp.items():
        meta.append((hparam_key(k), v, "json" if isinstance(v, (dict, list)) and not
                     (isinstance(v, list) and v and all(isinstance(x, int) for x in v)) else None))
    meta += [(Keys.HF.CONFIG, config, "json"),
             (Keys.Tokenizer.CONFIG, tok_cfg, "json"),
             (Keys.Generation.CONFIG, gen, "json"),
             (Keys.Generation.EOS_TOKEN_IDS,
              _eos_ids(gen, config, tok_cfg, tokenizer_json, folder),
              "int[]"),
             (Keys.Provenance.FILES, [{"name": p.name, "size": p.stat().st_size,
                                       "sha256": sha256_file(p)} for p in files], "json"),
             (Keys.Provenance.CONVERTER, f"zipmoe-rt {__version__}", "str"),
             (Keys.Encoding.CHUNKS, int(chunks), "int"),
             (Keys.Encoding.EXP_CODEC, exp_codec, "str")]
    if exp_codec == "zstd":
        meta.append((Keys.Encoding.ZSTD, {k: getattr(zstd_parameters(), k) for k in
                                       ("strategy", "window_log", "chain_log", "hash_log",
                                        "search_log", "min_match", "target_length")}, "json"))
    if tokenizer_json is not None:
        meta.append((Keys.Tokenizer.JSON, tokenizer_json, "str"))
    if template is not None:
        meta.append((Keys.Tokenizer.CHAT_TEMPLATE, template, "str"))
    return meta
