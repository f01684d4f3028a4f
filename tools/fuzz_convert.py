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
transformers; later runs only read them), with 1 to 3 mutations (``convert_mutations.py``):

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
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import fuzz_common as fc  # noqa: E402
from convert_mutations import (AUX, AUX_VALUES, BIG, CONFIG, OPS, WHOLE, apply_ops,  # noqa: E402,F401
                               random_op, write_input)

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
