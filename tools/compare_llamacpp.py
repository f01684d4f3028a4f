#!/usr/bin/env python
"""zipmoe-rt against llama.cpp on the bundled default model, under the same memory cgroup.

    .venv/bin/python tools/compare_llamacpp.py [--limit 600MB] [--zipmoe-limit auto] [--reps 3]   # as root

End to end, every step cached under ``~/.cache/zipmoe-rt/llamacpp/`` (``--cache`` to move it):

1. A separate venv with ``llama-cpp-python==0.3.36`` compiled from its PyPI sdist (CPU, native);
   the sdist itself, unpacked, for ``vendor/llama.cpp/convert_hf_to_gguf.py`` + its ``gguf-py``.
   ``tools/build_default_model.py`` writes the HF checkpoint (SmolLM2-135M-Instruct upcycled to a
   4-expert top-2 Mixtral, BF16); the sdist's converter turns it into a BF16 GGUF, which must
   answer "What is the capital of France?" with Paris under llama.cpp (greedy, chat template).
2. ``zipmoe-rt convert`` of the same checkpoint, ``zipmoe-rt profile`` (activation trace over
   tools/prompts.txt) and ``zipmoe-rt calibrate``.
3. tg64 decode benchmarks, each program as one child process in a fresh memory cgroup v1
   (``/sys/fs/cgroup/memory/zipmoe-bench-<name>``, ``memory.limit_in_bytes`` and
   ``memory.memsw.limit_in_bytes`` = the limit) after ``sync; echo 3 > drop_caches``: llama.cpp
   (llama-cpp-python, n_threads=2, mmap, the same 16 prompt token ids, greedy, EOS ignored) and
   zipmoe-rt (the exact per-configuration code of ``zipmoe-rt bench``, policies zipmoe and
   zip-lru, under ``--memory-limit`` = ``--zipmoe-limit``, by default ``auto``: inside its
   cgroup the child reads the cgroup's limit and leaves its stated margin, and the weight budget
   is what the runtime's measured fixed overhead, KV cache and read buffers leave
   (zipmoe_rt/engine/limit.py)); both also without a limit, for reference. Decode tokens/s are
   (64 - 1) / time of the 63 single-token forward passes after the prompt, as ``zipmoe-rt bench``
   defines them; each is repeated ``--reps`` times in the child, with the model file's pages
   dropped from the page cache (posix_fadvise DONTNEED) before every repetition.
4. A table: program, limit, tg64 tokens/s (median of reps), ratio against llama.cpp under the
   same limit, cgroup peak usage (memory.max_usage_in_bytes, page cache included), peak anonymous
   memory (memory.stat ``rss``, polled), failcnt, VmHWM of the child (file-mapped pages included).
   An OOM kill inside a cgroup (memory.oom_control ``oom_kill``) is reported as such. Note: on the
   6.x kernel here ``memory.failcnt`` stays 0 even when the limit is hit or the OOM killer fires;
   ``oom_kill`` and usage == limit are what tell.
   Also checks that llama.cpp's 64 greedy tokens equal zipmoe-rt's (unbudgeted) for the prompt.
   Every setting of both programs is printed under the table.

Each program runs with its own defaults: importing ``zipmoe_rt`` sets ``OMP_WAIT_POLICY=PASSIVE``
and ``KMP_BLOCKTIME=0`` in this process's environment (zipmoe_rt/kernels/__init__.py), which a
child would inherit (llama.cpp's OpenMP threads then sleep between ops, measured 15.1 against
39.0 tokens/s). Every child therefore gets the environment as it was when this script started
(:data:`LAUNCH_ENV`; a variable the user set there is kept, and printed).

llama.cpp: a ``llama-bench``/``llama-cli`` on PATH is reported but not used (the tool needs
llama.cpp's Python binding to feed the same token ids); ``--llama-python PY`` uses a Python that
imports ``llama_cpp``, else the tool builds its own venv as in step 1. Where none is installed
and the build cannot run (no network, no compiler), it stops with an error saying so.

Needs root (cgroups, drop_caches), a C/C++ compiler and cmake (first run only, ~10 min on 2 cores).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

#: this process's environment before anything imported zipmoe_rt (which sets OMP_WAIT_POLICY
#: and KMP_BLOCKTIME): what every benchmark child gets, so each program runs with its defaults
LAUNCH_ENV = dict(os.environ)
#: the variables that decide how a program's OpenMP threads wait, printed for both programs
OMP_VARS = ("OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "GOMP_SPINCOUNT")

REPO = Path(__file__).resolve().parent.parent
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
    r = sh([py, __file__, "_llama-chat", "--model", p.gguf, "--threads", os.cpu_count() or 1],
           env=child_env())
    answer = json.loads(r.stdout.strip().splitlines()[-1])["answer"]
    if "paris" not in answer.lower():
        raise RuntimeError(f"llama.cpp's answer to {QUESTION!r} lacks Paris: {answer!r}")
    return answer


# =============================================================================================
# 2. zipmoe-rt model, trace, calibration
# =============================================================================================
def zipmoe_cli(*args) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "zipmoe_rt.cli", *args], cwd=REPO, env=child_env())


def ensure_zmoe(p: Paths, recalibrate: bool, direct: bool = False) -> None:
    """Convert, profile and calibrate the model once (cached). The calibration is redone when
    asked, or when it does not fit the run (``calibration_mismatch``: an older calibration
    version, reads timed in another mode than the run's ``--direct``, another machine)."""
    import zmoe
    trace = p.zmoe.with_name(p.zmoe.name + ".trace.json")
    calib = p.zmoe.with_name(p.zmoe.name + ".calib.json")
    if p.zmoe.exists() and zmoe.file_version(p.zmoe) < zmoe.VERSION:
        log(f"{p.zmoe}: older .zmoe format; reconverting (and re-profiling, recalibrating)")
        for f in (p.zmoe, trace, calib):
            f.unlink(missing_ok=True)
    if not p.zmoe.exists():
        zipmoe_cli("convert", p.hf, "-o", p.zmoe, "-q")
    if not trace.exists():
        zipmoe_cli("profile", p.zmoe, "--prompts", REPO / "tools" / "prompts.txt", "-q")
    if not recalibrate and calib.exists():
        sys.path.insert(0, str(REPO))
        from zipmoe_rt.engine.profile import TraceError, calibration_mismatch, load_calibration
        try:
            why = calibration_mismatch(load_calibration(calib), direct)
        except (OSError, TraceError) as e:
            why = [f"unreadable: {e}"]
        if why:
            log(f"{calib}: recalibrating ({'; '.join(why)})")
            recalibrate = True
    if recalibrate or not calib.exists():
        log(zipmoe_cli("calibrate", p.zmoe, *(["--direct"] if direct else []))
            .stdout.strip().replace("\n", " |"))


def zipmoe_chat_check(p: Paths) -> str:
    r = zipmoe_cli("run", p.zmoe, "-p", QUESTION, "-n", "32", "--temp", "0")   # greedy, as llama.cpp
    if "paris" not in r.stdout.lower():
        raise RuntimeError(f"zipmoe-rt's answer to {QUESTION!r} lacks Paris: {r.stdout!r}")
    return r.stdout.strip()


def bench_prompt(p: Paths, n: int) -> tuple[list[int], str]:
    """The prompt of ``zipmoe-rt bench``'s tg runs: its ``prompt_ids(tokenizer, n)``."""
    from zipmoe_rt.api import tokenizer_from_source
    from zipmoe_rt.bench import prompt_ids
    from zipmoe_rt.engine.store import ZmoeSource
    src = ZmoeSource(p.zmoe)
    tok = tokenizer_from_source(src)
    ids = [int(i) for i in prompt_ids(tok, n)]
    text = tok.decode(ids)
    src.close()
    return ids, text


def zipmoe_greedy_tokens(p: Paths, ids, n: int) -> list[int]:
    """zipmoe-rt's greedy continuation of ``ids`` (no budget, EOS ignored), to compare the
    tokens both programs decode."""
    from zipmoe_rt.api import load
    from zipmoe_rt.generate import SamplingParams, generate
    m = load(p.zmoe, progress=False)
    try:
        return [int(t) for t in generate(m.net, ids, SamplingParams(temperature=0.0, max_tokens=n),
                                         stop_ids=()).collect()]
    finally:
        m.close()


# =============================================================================================
# 3. cgroup runner
# =============================================================================================
def drop_page_cache(files=()) -> str:
    """``sync; echo 3 > /proc/sys/vm/drop_caches``; where that is refused, fadvise DONTNEED
    (:func:`zipmoe_rt.engine.io.evict_page_cache`) on each of ``files``."""
    os.sync()
    try:
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3")
        return "drop_caches"
    except OSError:
        from zipmoe_rt.engine.io import evict_page_cache
        for fn in files:
            evict_page_cache(fn)
        return "fadvise"


def _cg_read(cg: Path, name: str):
    try:
        return (cg / name).read_text().strip()
    except OSError:
        return None


def run_in_cgroup(name: str, cmd: list, limit_bytes: int | None, timeout: float | None = None,
                  env: dict | None = None, cwd=None) -> dict:
    """Run ``cmd`` as a child in a fresh memory cgroup v1 ``zipmoe-bench-<name>``.

    The cgroup gets ``memory.limit_in_bytes`` (and ``memory.memsw.limit_in_bytes``, where the
    kernel has swap accounting) = ``limit_bytes`` (None: no limit); the child joins it between
    fork and exec (``preexec_fn`` writes its pid to ``cgroup.procs``), so everything it allocates
    or reads through the page cache is charged there. Afterwards the cgroup's peak usage, failcnt
    and OOM-kill count are read and the cgroup is removed.

    Returns a dict: returncode, stdout, stderr, wall_s, timed_out, oom_killed, signal,
    max_usage, memsw_max_usage, failcnt, memsw_failcnt, oom_kill, limit, memsw_limit, and
    stat_peaks: the largest ``rss`` (anonymous), ``cache`` and ``mapped_file`` of the cgroup's
    memory.stat, polled every 0.1 s.
    """
    if not CG_ROOT.is_dir():
        raise RuntimeError(f"{CG_ROOT}: no cgroup v1 memory controller mounted")
    cg = CG_ROOT / f"zipmoe-bench-{name}"
    if cg.exists():
        _remove_cgroup(cg)
    cg.mkdir()
    out: dict = {"cgroup": str(cg)}
    try:
        if limit_bytes is not None:
            (cg / "memory.limit_in_bytes").write_text(str(int(limit_bytes)))
            if (cg / "memory.memsw.limit_in_bytes").exists():
                try:
                    (cg / "memory.memsw.limit_in_bytes").write_text(str(int(limit_bytes)))
                except OSError as e:
                    out["memsw_error"] = str(e)
        out["limit"] = int(_cg_read(cg, "memory.limit_in_bytes") or -1)
        out["memsw_limit"] = int(_cg_read(cg, "memory.memsw.limit_in_bytes") or -1)
        procs = str(cg / "cgroup.procs")

        def join_cgroup():          # runs in the child, after fork, before exec
            with open(procs, "w") as f:
                f.write(str(os.getpid()))

        peaks = {"rss": 0, "cache": 0, "mapped_file": 0}
        done = threading.Event()

        def sample():               # memory.stat has no peaks of its own: poll it
            while not done.wait(0.1):
                txt = _cg_read(cg, "memory.stat") or ""
                for line in txt.splitlines():
                    k, _, v = line.partition(" ")
                    if k in peaks:
                        peaks[k] = max(peaks[k], int(v))

        sampler = threading.Thread(target=sample, daemon=True)
        t0 = time.perf_counter()
        sampler.start()
        proc = subprocess.Popen([str(c) for c in cmd], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True, errors="replace", env=env, cwd=cwd,
                                preexec_fn=join_cgroup)
        try:
            so, se = proc.communicate(timeout=timeout)
            out["timed_out"] = False
        except subprocess.TimeoutExpired:
            _kill_cgroup_tasks(cg)
            so, se = proc.communicate()
            out["timed_out"] = True
        out["wall_s"] = time.perf_counter() - t0
        done.set()
        sampler.join()
        out["stat_peaks"] = peaks
        out.update(returncode=proc.returncode, stdout=so, stderr=se)
        out["max_usage"] = int(_cg_read(cg, "memory.max_usage_in_bytes") or 0)
        out["memsw_max_usage"] = int(_cg_read(cg, "memory.memsw.max_usage_in_bytes") or 0)
        out["failcnt"] = int(_cg_read(cg, "memory.failcnt") or 0)
        out["memsw_failcnt"] = int(_cg_read(cg, "memory.memsw.failcnt") or 0)
        oc = _cg_read(cg, "memory.oom_control") or ""
        m = re.search(r"oom_kill (\d+)", oc)
        out["oom_kill"] = int(m.group(1)) if m else None
        out["signal"] = -proc.returncode if proc.returncode < 0 else None
        out["oom_killed"] = bool(out["oom_kill"]) or (
            proc.returncode == -signal.SIGKILL and not out["timed_out"]
            and out["failcnt"] + out["memsw_failcnt"] > 0)
    finally:
        _remove_cgroup(cg)
    return out


def _kill_cgroup_tasks(cg: Path) -> None:
    """SIGKILL the processes in our own benchmark cgroup (all started by this script)."""
    for pid in (_cg_read(cg, "cgroup.procs") or "").split():
        try:
            os.kill(int(pid), signal.SIGKILL)
        except (ProcessLookupError, ValueError):
            pass


def _remove_cgroup(cg: Path) -> None:
    for _ in range(50):
        if not (_cg_read(cg, "cgroup.procs") or "").split():
            break
        _kill_cgroup_tasks(cg)
        time.sleep(0.1)
    try:
        cg.rmdir()
    except OSError as e:
        log(f"warning: could not remove {cg}: {e}")


# =============================================================================================
# workers (run as children; the llama one under the llama.cpp venv's Python)
# =============================================================================================
#: the llama.cpp settings of every run (printed with the table); n_threads from --threads
LLAMA_SETTINGS = {"n_ctx": 512, "n_batch": 512, "use_mmap": True, "use_mlock": False,
                  "type_k/type_v": "f16 (default)", "flash_attn": "default"}


def _open_llama(model: str, n_threads: int):
    from llama_cpp import Llama
    st = LLAMA_SETTINGS
    return Llama(model_path=model, n_ctx=st["n_ctx"], n_batch=st["n_batch"], n_threads=n_threads,
                 n_threads_batch=n_threads, use_mmap=st["use_mmap"], use_mlock=st["use_mlock"],
                 verbose=False, seed=0)


def llama_chat_worker(a) -> None:
    llm = _open_llama(a.model, a.threads)
    r = llm.create_chat_completion(messages=[{"role": "user", "content": QUESTION}],
                                   temperature=0.0, top_k=1, max_tokens=32, seed=0)
    print(json.dumps({"answer": r["choices"][0]["message"]["content"]}))


def llama_bench_worker(a) -> None:
    """tg benchmark: eval the prompt ids, then n_gen - 1 single-token evals, greedy, no EOS stop."""
    import numpy as np
    sys.path.insert(0, str(REPO))     # this venv has numpy, not zipmoe-rt: the repository's copy
    from zipmoe_rt.engine.io import evict_page_cache
    from zipmoe_rt.util import peak_rss, reset_peak_rss
    ids = [int(x) for x in a.prompt_ids.split(",")]
    omp = {k: os.environ.get(k) for k in OMP_VARS}    # as llama.cpp's OpenMP runtime reads them
    t_load = time.perf_counter()
    llm = _open_llama(a.model, a.threads)
    load_s = time.perf_counter() - t_load
    same_tokens = None
    if a.prompt_text is not None:
        got = llm.tokenize(a.prompt_text.encode("utf-8"), add_bos=False, special=False)
        same_tokens = list(got) == ids or list(got)

    n_vocab = llm.n_vocab()

    def greedy() -> int:        # argmax of the last position's logits (Llama.eval keeps none)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    llm.reset()                                   # warm-up, like zipmoe-rt bench's JIT warm-up
    llm.eval(ids[:4])
    llm.eval([greedy()])
    runs = []
    for _ in range(a.reps):
        evict_page_cache(a.model)                 # cold reads: drop the file's unmapped pages
        reset_peak_rss()
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        out = [greedy()]
        t1 = time.perf_counter()
        for _ in range(a.n_gen - 1):
            llm.eval([out[-1]])
            out.append(greedy())
        t2 = time.perf_counter()
        runs.append({"ttft_s": t1 - t0, "decode_s": t2 - t1,
                     "decode_tps": (a.n_gen - 1) / (t2 - t1) if a.n_gen > 1 else None,
                     "decoded": len(out), "peak_rss": peak_rss(), "tokens": out})
    print(json.dumps({"load_s": load_s, "prompt_tokens_match": same_tokens, "runs": runs,
                      "omp": omp, "settings": dict(LLAMA_SETTINGS, n_threads=a.threads,
                                                   n_threads_batch=a.threads)}))


def zipmoe_bench_worker(a) -> None:
    """One configuration exactly as ``zipmoe-rt bench`` runs it (zipmoe_rt.bench.run_config),
    under ``--memory-limit`` = ``a.limit`` (``none``: unbudgeted, in memory); prints the runs,
    the memory report (with the limit's division), the OpenMP variables the runtime ran with
    and its settings."""
    sys.path.insert(0, str(REPO))
    from zipmoe_rt import bench as B
    limit = None if a.limit == "none" else a.limit
    policy = a.policy if limit is not None else "auto"
    direct = bool(a.direct) and limit is not None
    runs, mem = B.run_config(a.model, None, policy, 0, a.n_gen, a.reps, None, direct, "lru",
                             None, memory_limit=limit, resident=a.resident)
    settings = {"memory_limit": a.limit, "policy": policy, "resident": a.resident,
                "workers": os.cpu_count(),
                "io_depth": "default (4)", "direct": direct, "eviction": "lru",
                "budget": mem.get("budget")}
    print(json.dumps({"runs": runs, "memory": mem, "settings": settings,
                      "omp": {k: os.environ.get(k) for k in OMP_VARS}}))


# =============================================================================================
# 4. the comparison
# =============================================================================================
def fmt_mb(x) -> str:
    return "-" if not x else f"{x / 1e6:.0f}"


def run_case(p: Paths, a, program: str, policy: str | None, limit: int | None, ids, text,
             resident: str = "full") -> dict:
    lim = "none" if limit is None else f"{limit / 1e6:.0f}MB"
    name = f"{program}-{policy or 'mmap'}-{lim}" + ("-compressed" if resident == "compressed"
                                                    else "")
    if program == "llama.cpp":
        cmd = [a.llama_py, __file__, "_llama-bench", "--model", p.gguf, "--threads", a.threads,
               "--prompt-ids", ",".join(map(str, ids)), "--prompt-text", text,
               "--n-gen", a.n_gen, "--reps", a.reps]
        files = [p.gguf]
    else:
        zlim = "none" if limit is None else a.zipmoe_limit
        cmd = [sys.executable, __file__, "_zipmoe-bench", "--model", p.zmoe, "--limit", zlim,
               "--policy", policy, "--n-gen", a.n_gen, "--reps", a.reps,
               "--resident", resident] + (["--direct"] if a.direct else [])
        files = [p.zmoe]
    how = drop_page_cache(files)
    log(f"run {name} (cache dropped via {how}) ...")
    load0 = os.getloadavg()[0]
    r = run_in_cgroup(name, cmd, limit, timeout=a.timeout, cwd=REPO, env=child_env())
    load1 = os.getloadavg()[0]
    shown = policy and policy + (" --resident compressed" if resident == "compressed" else "")
    row = {"program": program, "policy": shown, "resident": resident, "limit": limit, "name": name,
           "budget": None,
           "cgroup": {k: r.get(k) for k in ("max_usage", "memsw_max_usage", "failcnt",
                                            "memsw_failcnt", "oom_kill", "stat_peaks",
                                            "limit", "memsw_limit", "memsw_error")},
           "wall_s": r["wall_s"], "returncode": r["returncode"], "drop": how,
           "loadavg_1min": [load0, load1]}
    if r["timed_out"]:
        row["error"] = f"timed out after {a.timeout} s (killed)"
    elif r["oom_killed"]:
        row["error"] = (f"OOM-killed inside the cgroup (signal {r['signal']}, failcnt "
                        f"{r['failcnt']}, oom_kill {r['oom_kill']})")
    elif r["returncode"] != 0:
        tail = (r["stderr"] or r["stdout"] or "").strip().splitlines()[-3:]
        row["error"] = f"exit {r['returncode']}: " + " | ".join(tail)
    else:
        try:
            res = json.loads(r["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            row["error"] = f"no result on stdout: {r['stdout'][-300:]!r} {r['stderr'][-300:]!r}"
            res = None
        if res:
            row["runs"] = res["runs"]
            row["tg_tps"] = [x["decode_tps"] for x in res["runs"]]
            row["tg_median"] = statistics.median(row["tg_tps"])
            row["peak_rss"] = max(x.get("peak_rss", 0) for x in res["runs"])
            for k in ("memory", "prompt_tokens_match", "load_s", "omp", "settings"):
                if k in res:
                    row[k] = res[k]
            if program == "zipmoe-rt" and limit is not None:
                row["budget"] = (res.get("memory") or {}).get("budget")
            if "engine" in res["runs"][0]:
                e = [x["engine"] for x in res["runs"]]
                hits = {k: sum(x["hits"][k] for x in e) for k in e[0]["hits"]}
                tot = max(1, sum(hits.values()))
                row["hit_rate"] = {k: v / tot for k, v in hits.items()}
                n = sum(x["decoded"] for x in res["runs"])
                row["mb_read_per_token"] = sum(x["bytes_read"] for x in e) / n / 1e6
    msg = row.get("error") or (f"tg{a.n_gen} {', '.join(f'{x:.2f}' for x in row['tg_tps'])} "
                              f"tokens/s (median {row['tg_median']:.2f})")
    log(f"  {name}: {msg}; cgroup peak {fmt_mb(row['cgroup']['max_usage'])} MB, failcnt "
        f"{row['cgroup']['failcnt']}, wall {row['wall_s']:.0f} s, load {load0:.1f} -> {load1:.1f}")
    return row


def table(rows, n_gen) -> str:
    head = ["program", "limit", f"tg{n_gen} tokens/s (median)", "runs", "× llama.cpp (same limit)",
            "cgroup peak MB", "anon peak MB", "failcnt", "VmHWM MB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = {r["limit"]: r["tg_median"] for r in rows if r["program"] == "llama.cpp" and "tg_median" in r}
    for r in rows:
        prog = r["program"] + (f" {r['policy']}" if r["policy"] else "")
        if r["program"] == "zipmoe-rt" and r["budget"]:
            prog += f" (budget {r['budget'] / 1e6:.0f} MB)"
        lim = "none" if r["limit"] is None else f"{r['limit'] / 1e6:.0f} MB"
        med = f"{r['tg_median']:.2f}" if "tg_median" in r else "-"
        runs = ", ".join(f"{x:.2f}" for x in r.get("tg_tps", [])) or "-"
        ratio = (f"{r['tg_median'] / ref[r['limit']]:.2f}" if "tg_median" in r and ref.get(r["limit"])
                 else "-")
        note = r.get("error", "")
        if not note and "hit_rate" in r:
            note = ("hits F/C/S/E/miss " + "/".join(f"{100 * r['hit_rate'][k]:.0f}"
                                                   for k in ("F", "C", "S", "E", "miss")) + " %, "
                    f"{r['mb_read_per_token']:.1f} MB read/token")
        cg = r["cgroup"]
        fails = str(cg["failcnt"]) + (f" (memsw {cg['memsw_failcnt']})" if cg.get("memsw_failcnt")
                                      else "")
        lines.append("| " + " | ".join([prog, lim, med, runs, ratio, fmt_mb(cg["max_usage"]),
                                        fmt_mb((cg.get("stat_peaks") or {}).get("rss")), fails,
                                        fmt_mb(r.get("peak_rss")), note]) + " |")
    return "\n".join(lines)


def settings_text(rows, a) -> str:
    """Every setting of both programs, as the children reported them (one line per row)."""
    out = ["settings (each program with its own defaults; the children get this script's "
           f"environment at its start: {omp_settings(LAUNCH_ENV)}):"]
    for r in rows:
        st = r.get("settings")
        if not st:
            continue
        omp = r.get("omp") or {}
        out.append(f"  {r['name']}: " + ", ".join(f"{k}={v}" for k, v in st.items())
                   + "; " + omp_settings({k: v for k, v in omp.items() if v is not None}))
    if not getattr(a, "zipmoe_only", False):
        out.append(f"  llama.cpp build: llama-cpp-python {LLAMA_VERSION}, CMAKE_ARGS "
                   f"{a.cmake_args!r}, GGUF BF16, prompt evaluated in one call, greedy argmax")
    return "\n".join(out)


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0].startswith("_"):
        return _worker(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "zipmoe-rt" / "llamacpp",
                    help="where the venv, sdist, checkpoint, GGUF, .zmoe and results live")
    ap.add_argument("--limit", default="600MB", help="cgroup memory limit (default 600MB = 600e6 B)")
    ap.add_argument("--zipmoe-limit", default="auto",
                    help="zipmoe-rt's --memory-limit inside the cgroup (default auto: the "
                         "cgroup's limit less the runtime's stated margin; or a size)")
    ap.add_argument("--llama-python", default=None,
                    help="a Python that imports llama_cpp (default: the tool's own venv, built "
                         "from the sdist on first use)")
    ap.add_argument("--policy", action="append", choices=["zipmoe", "zip-lru", "raw-lru"],
                    help="zipmoe-rt policies under the limit (repeatable; default zipmoe, zip-lru)")
    ap.add_argument("--resident", action="append", choices=["full", "compressed"],
                    help="how zipmoe-rt's limited rows hold cached experts (repeatable: rows "
                         "for each; default full)")
    ap.add_argument("--n-prompt", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--n-gen", type=int, default=64, help="tokens generated (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument("--direct", action="store_true",
                    help="zipmoe-rt reads experts with O_DIRECT (no page cache: under a memory "
                         "limit, expert reads then do not push the runtime's own pages out)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="llama.cpp threads (default: all cores, as llama-bench and llama-cli "
                         "use; llama-cpp-python's own default is half of them)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child (default 1800)")
    ap.add_argument("--no-unlimited", action="store_true", help="skip the unlimited reference rows")
    ap.add_argument("--zipmoe-only", action="store_true",
                    help="no llama.cpp (neither built nor run): zipmoe-rt rows under the limit "
                         "only, e.g. to check a budget quickly")
    ap.add_argument("--setup-only", action="store_true", help="build and check, run no benchmark")
    ap.add_argument("--recalibrate", action="store_true", help="re-run zipmoe-rt calibrate")
    ap.add_argument("--cmake-args", default="-DGGML_NATIVE=ON",
                    help="CMAKE_ARGS for the llama-cpp-python build (default -DGGML_NATIVE=ON)")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    a = ap.parse_args(argv)
    policies = a.policy or ["zipmoe", "zip-lru"]
    p = Paths(a.cache.expanduser())
    p.cache.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 and not a.setup_only:
        print("error: run as root (memory cgroups and drop_caches)", file=sys.stderr)
        return 1
    try:
        if not a.zipmoe_only:
            a.llama_py = ensure_llama(p, a)
        ensure_hf_checkpoint(p)
        if not a.zipmoe_only:
            ensure_gguf(p)
        ensure_zmoe(p, a.recalibrate, a.direct)
        answers = {} if a.zipmoe_only else {"llama.cpp": llama_chat_check(p, a.llama_py)}
        answers["zipmoe-rt"] = zipmoe_chat_check(p)
        for k, v in answers.items():
            log(f"{k} answers {QUESTION!r}: {v!r}")
        if a.setup_only:
            return 0
        ids, text = bench_prompt(p, a.n_prompt)
        log(f"prompt ({len(ids)} tokens): {text!r}")
        limit = parse_bytes(a.limit)
        swap_on = any(l.strip() for l in open("/proc/swaps").read().splitlines()[1:])
        cases = [("llama.cpp", None, limit, "full")] + [
            ("zipmoe-rt", pol, limit, res) for res in (a.resident or ["full"]) for pol in policies]
        if not a.no_unlimited:
            cases += [("llama.cpp", None, None, "full"), ("zipmoe-rt", None, None, "full")]
        if a.zipmoe_only:
            cases = [c for c in cases if c[0] == "zipmoe-rt" and c[2] is not None]
        t0 = time.strftime("%Y-%m-%d %H:%M:%S")
        rows = [run_case(p, a, prog, pol, lim, ids, text, res) for prog, pol, lim, res in cases]
        ref_tokens = [] if a.zipmoe_only else zipmoe_greedy_tokens(p, ids, a.n_gen)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in rows:
        if r["program"] == "llama.cpp" and r.get("runs"):
            toks = r["runs"][0]["tokens"]
            r["tokens_equal_zipmoe"] = sum(x == y for x, y in zip(toks, ref_tokens))
            log(f"{r['name']}: {r['tokens_equal_zipmoe']} of {len(toks)} greedy tokens equal "
                f"zipmoe-rt's")
    result = {"date": t0, "limit": limit, "zipmoe_limit": a.zipmoe_limit,
              "launch_env_omp": {k: LAUNCH_ENV.get(k) for k in OMP_VARS}, "n_prompt": len(ids),
              "n_gen": a.n_gen, "reps": a.reps, "threads": a.threads, "prompt_text": text,
              "prompt_ids": ids, "swap_on": swap_on, "answers": answers,
              "zipmoe_tokens": ref_tokens,
              "gguf": str(p.gguf), "gguf_bytes": p.gguf.stat().st_size if p.gguf.exists() else None,
              "zmoe": str(p.zmoe),
              "zmoe_bytes": p.zmoe.stat().st_size, "rows": rows}
    print(table(rows, a.n_gen))
    print(f"\nprompt {len(ids)} tokens, tg{a.n_gen}, {a.reps} repetitions, medians; cgroup v1 "
          f"memory limit {limit / 1e6:.0f} MB (memsw the same; swap {'on' if swap_on else 'off'}); "
          f"page cache dropped before each child and the model file's pages before each "
          f"repetition; GGUF {p.gguf.stat().st_size / 1e6 if p.gguf.exists() else 0:.0f} MB BF16, .zmoe "
          f"{p.zmoe.stat().st_size / 1e6:.0f} MB; {t0}")
    print(settings_text(rows, a))
    lt = {r["limit"]: r for r in rows if r["program"] == "llama.cpp"}
    best = max((r for r in rows if r["program"] == "zipmoe-rt" and r["limit"] == limit
                and "tg_median" in r), key=lambda r: r["tg_median"], default=None)
    if best and "tg_median" in lt.get(limit, {}):
        x = best["tg_median"] / lt[limit]["tg_median"]
        print(f"under {limit / 1e6:.0f} MB: zipmoe-rt {best['policy']} / llama.cpp = {x:.2f}x "
              f"(goal >= 10x: {'met' if x >= 10 else 'NOT met'})")
    p.results.mkdir(exist_ok=True)
    out = a.json or p.results / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    log(f"wrote {out}")
    return 0


def _worker(argv) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("verb", choices=["_llama-chat", "_llama-bench", "_zipmoe-bench"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-ids", default="")
    ap.add_argument("--prompt-text", default=None)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", default="none")
    ap.add_argument("--policy", default="zipmoe")
    ap.add_argument("--resident", default="full")
    ap.add_argument("--direct", action="store_true")
    a = ap.parse_args(argv)
    {"_llama-chat": llama_chat_worker, "_llama-bench": llama_bench_worker,
     "_zipmoe-bench": zipmoe_bench_worker}[a.verb](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
