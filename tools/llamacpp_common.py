"""What tools/compare_llamacpp.py and its helper modules share: the environment the tool was
launched with (every benchmark child gets it), the OpenMP wait variables, paths and constants,
logging, running a command, byte sizes.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


#: this process's environment before anything imported zipmoe_rt (which sets OMP_WAIT_POLICY
#: and KMP_BLOCKTIME): what every benchmark child gets, so each program runs with its defaults
LAUNCH_ENV = dict(os.environ)
#: the variables that decide how a program's OpenMP threads wait, printed for both programs
OMP_VARS = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")

REPO = Path(__file__).resolve().parent.parent
#: the tool itself, which its children run (``compare_llamacpp.py _llama-chat`` ...)
TOOL = Path(__file__).resolve().parent / "compare_llamacpp.py"
LLAMA_VERSION = "0.3.36"
CG_ROOT = Path("/sys/fs/cgroup/memory")
QUESTION = "What is the capital of France?"


def log(msg: str) -> None:
    print(f"[compare] {msg}", file=sys.stderr, flush=True)


def parse_bytes(text: str) -> int:
    t = str(text).strip().upper()
    for u, mul in (("GIB", 2**30), ("MIB", 2**20), ("KIB", 2**10), ("GB", 10**9), ("MB", 10**6),
                   ("KB", 10**3), ("B", 1)):
        if t.endswith(u):
            return int(float(t[:-len(u)]) * mul)
    return int(float(t))


def sh(cmd, **kw) -> subprocess.CompletedProcess:
    """Run ``cmd`` (list), echoing it; raise with the tail of its output when it fails."""
    log("$ " + " ".join(str(c) for c in cmd))
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    r = subprocess.run([str(c) for c in cmd], **kw)
    if r.returncode != 0:
        tail = "\n".join(((r.stdout or "") + (r.stderr or "")).strip().splitlines()[-25:])
        raise RuntimeError(f"command failed (exit {r.returncode}): {' '.join(map(str, cmd))}\n{tail}")
    return r


def child_env(**extra) -> dict:
    """The environment of a benchmark child: :data:`LAUNCH_ENV` (not this process's, which
    importing zipmoe_rt changed), plus ``extra``."""
    env = dict(LAUNCH_ENV)
    env.update({k: str(v) for k, v in extra.items()})
    return env


def omp_settings(env: dict) -> str:
    """How ``env`` sets the OpenMP wait variables, e.g. ``OMP_WAIT_POLICY unset (OpenMP
    default: ACTIVE), KMP_BLOCKTIME unset``."""
    out = []
    for k in OMP_VARS:
        v = env.get(k)
        if v is not None:
            out.append(f"{k}={v}")
        elif k == "OMP_WAIT_POLICY":
            out.append(f"{k} unset (OpenMP default)")
    return ", ".join(out) + ("" if len(out) > 1 else "; others unset")


class Paths:
    def __init__(self, cache: Path):
        self.cache = cache
        self.venv = cache / "venv"
        self.py = self.venv / "bin" / "python"
        self.sdist_dir = cache / "sdist"
        self.sdist = self.sdist_dir / f"llama_cpp_python-{LLAMA_VERSION}.tar.gz"
        self.src = cache / "src" / f"llama_cpp_python-{LLAMA_VERSION}"
        self.vendor = self.src / "vendor" / "llama.cpp"
        self.convert_deps = cache / "convert-deps"
        self.work = cache / "work"
        self.hf = self.work / "hf"
        self.gguf = self.work / "model-bf16.gguf"
        self.zmoe = self.work / "model.zmoe"
        self.results = cache / "results"
