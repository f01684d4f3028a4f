"""Step 1 of tools/compare_llamacpp.py: llama.cpp's set-up (cached): what is installed here, the
llama-cpp-python venv built from its PyPI sdist, the HF checkpoint of the default model, its BF16
GGUF (the sdist's converter) and llama.cpp's answer to the check question.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from llamacpp_common import LLAMA_VERSION, QUESTION, REPO, TOOL, Paths, child_env, log, sh


def find_llama(p, llama_python=None) -> dict:
    """What llama.cpp is installed here: ``llama-bench``/``llama-cli`` on PATH, and a Python
    that imports ``llama_cpp`` (``llama_python``, else the tool's own venv). Returns a dict:
    ``binaries`` (name -> path), ``python`` (path or None), ``version``, ``note`` (one line
    saying what was found)."""
    bins = {b: shutil.which(b) for b in ("llama-bench", "llama-cli")}
    bins = {k: v for k, v in bins.items() if v}
    py, version = None, None
    for cand in ([Path(llama_python)] if llama_python else [p.py]):
        if cand.exists():
            r = subprocess.run([str(cand), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                               capture_output=True, text=True, env=child_env())
            if r.returncode == 0:
                py, version = str(cand), r.stdout.strip()
    where = (", ".join(f"{k} at {v}" for k, v in bins.items()) or "no llama-bench or llama-cli "
             "on PATH")
    note = (f"llama.cpp: {where}; " + (f"llama-cpp-python {version} in {py}" if py else
            f"no Python with llama_cpp ({llama_python or p.py})"))
    return {"binaries": bins, "python": py, "version": version, "note": note}


# =============================================================================================
# 1. llama.cpp set-up (cached)
# =============================================================================================
def base_python() -> str:
    """A Python to create the llama.cpp venv with: the interpreter behind this venv."""
    return getattr(sys, "_base_executable", None) or shutil.which("python3") or sys.executable


def ensure_sdist(p: Paths) -> None:
    if not p.sdist.exists():
        p.sdist_dir.mkdir(parents=True, exist_ok=True)
        sh([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
            f"llama-cpp-python=={LLAMA_VERSION}", "-d", p.sdist_dir])
    if not (p.vendor / "convert_hf_to_gguf.py").exists():
        import tarfile
        log(f"unpacking {p.sdist.name}")
        tmp = p.cache / "src.tmp"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        with tarfile.open(p.sdist) as tf:
            tf.extractall(tmp, filter="data") if hasattr(tarfile, "data_filter") else tf.extractall(tmp)
        shutil.rmtree(p.cache / "src", ignore_errors=True)
        tmp.rename(p.cache / "src")


def llama_installed(p: Paths) -> bool:
    if not p.py.exists():
        return False
    r = subprocess.run([str(p.py), "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                       capture_output=True, text=True)
    return r.returncode == 0 and r.stdout.strip() == LLAMA_VERSION


def ensure_llama_venv(p: Paths, cmake_args: str) -> None:
    if llama_installed(p):
        log(f"llama-cpp-python {LLAMA_VERSION} already built in {p.venv}")
        return
    if not p.py.exists():
        sh([base_python(), "-m", "venv", p.venv])
    env = dict(os.environ, CMAKE_ARGS=cmake_args,
               CMAKE_BUILD_PARALLEL_LEVEL=str(os.cpu_count() or 2))
    logf = p.cache / "build.log"
    log(f"building llama-cpp-python {LLAMA_VERSION} from its sdist (CMAKE_ARGS={cmake_args!r}); "
        f"several minutes, log in {logf}")
    t0 = time.perf_counter()
    with open(logf, "w") as f:
        r = subprocess.run([str(p.py), "-m", "pip", "install", "-v", "--no-binary",
                            "llama-cpp-python", str(p.sdist)], env=env, stdout=f,
                           stderr=subprocess.STDOUT)
    if r.returncode != 0 or not llama_installed(p):
        tail = "\n".join(logf.read_text(errors="replace").splitlines()[-30:])
        raise RuntimeError(f"building llama-cpp-python failed (exit {r.returncode}); {logf}:\n{tail}")
    log(f"built in {time.perf_counter() - t0:.0f} s")


def ensure_llama(p: Paths, a) -> str:
    """A Python that runs llama.cpp (``--llama-python``, or the tool's venv, built when
    missing), and the sdist for its GGUF converter; says what is installed here first.

    Raises:
        RuntimeError: llama.cpp is not installed and cannot be built here (the message says
            what was looked for and why the build failed).
    """
    found = find_llama(p, a.llama_python)
    log(found["note"])
    if a.llama_python and not found["python"]:
        raise RuntimeError(f"--llama-python {a.llama_python}: cannot import llama_cpp with it")
    try:
        ensure_sdist(p)
        if not found["python"]:
            ensure_llama_venv(p, a.cmake_args)
    except RuntimeError as e:
        raise RuntimeError(f"llama.cpp is not installed here ({found['note']}), and building "
                           f"llama-cpp-python {LLAMA_VERSION} from its sdist failed (it needs "
                           f"network access, a C/C++ compiler and cmake); give a Python with "
                           f"llama_cpp with --llama-python, or run with --zipmoe-only. "
                           f"{str(e).splitlines()[0]}") from None
    return found["python"] or str(p.py)


def ensure_hf_checkpoint(p: Paths) -> None:
    if (p.hf / "model.safetensors").exists() and (p.hf / "config.json").exists():
        return
    p.work.mkdir(parents=True, exist_ok=True)
    sh([sys.executable, REPO / "tools" / "build_default_model.py", p.hf, "-q", "--overwrite"])


def ensure_gguf(p: Paths) -> None:
    if p.gguf.exists():
        return
    # The converter tries sentencepiece before the GPT-2 BPE vocabulary and dies on the import
    # when the module is missing, so give it one (in a side folder; the project venv is left
    # alone). torch, transformers and numpy come from this (project) venv; gguf from the sdist.
    if not (p.convert_deps / "sentencepiece").exists():
        sh([sys.executable, "-m", "pip", "install", "-q", "--target", p.convert_deps,
            "sentencepiece"])
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(
        [str(p.convert_deps)] + [x for x in [os.environ.get("PYTHONPATH")] if x]))
    env.pop("NO_LOCAL_GGUF", None)                 # use the sdist's gguf-py, not the venv's gguf
    tmp = p.gguf.with_suffix(".gguf.tmp")
    sh([sys.executable, p.vendor / "convert_hf_to_gguf.py", p.hf, "--outtype", "bf16",
        "--outfile", tmp], env=env, cwd=p.vendor)
    tmp.rename(p.gguf)


def llama_chat_check(p: Paths, py) -> str:
    r = sh([py, TOOL, "_llama-chat", "--model", p.gguf, "--threads", os.cpu_count() or 1],
           env=child_env())
    answer = json.loads(r.stdout.strip().splitlines()[-1])["answer"]
    if "paris" not in answer.lower():
        raise RuntimeError(f"llama.cpp's answer to {QUESTION!r} lacks Paris: {answer!r}")
    return answer
