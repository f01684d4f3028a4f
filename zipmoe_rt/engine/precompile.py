"""Compiling the kernels in a short-lived child process, before a process under a memory bound
holds anything of its own (design.md §10, "memory limit").

Numba compiles a kernel at its first call for each type signature, through LLVM, in the calling
process, and keeps the machine code in its on-disk cache (``cache=True``), from which every
later process loads it. A compile costs more memory than a load: on the default model the
warm-up peaks at 228 MB compiling against 201 MB loading and leaves ~20 MB more heap (LLVM's
fragments, which ``malloc_trim`` cannot return), and a kernel compiled while the weights are
held brings LLVM's code pages (~70 MB, dropped after the warm-up) and its compile heap back
beside them. A run under ``--memory-limit 600MB`` that compiled one kernel signature of its
calibration on a cold cache was OOM-killed inside a 600 MB cgroup (docs/benchmarks.md §8).

:func:`ensure_kernels` therefore checks whether Numba's cache holds the kernels this model's
runs use (:func:`kernels_ready`: a marker the child writes, keyed by what selects the kernels'
signatures, :func:`warm_key`, naming the cache index files it left); if not, it runs
``python -m zipmoe_rt.engine.precompile MODEL`` (hard timeout :data:`COMPILE_TIMEOUT_S`, output
captured), which runs :func:`~zipmoe_rt.engine.footprint.warm_up` on the model (every kernel of
its family on tiny models, decoded and compute-form experts, serial and parallel, and one real
expert's decode and transcode) and :func:`~zipmoe_rt.engine.footprint.warm_up_calibration`
(the signatures a calibration at load adds), which fills the cache, writes the marker and
exits, giving its memory back. The parent then only loads compiled code. A child that fails or
times out costs a :class:`KernelCompileWarning`, and the kernels compile in the loading
process: the run goes on, with the same output.
"""
from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import time
import warnings
from pathlib import Path

__all__ = ["KernelCompileWarning", "COMPILE_TIMEOUT_S", "PLAIN_NOTICE", "warm_key",
           "kernel_cache_dirs", "marker_path", "kernels_ready", "write_marker", "precompile",
           "ensure_kernels"]

#: seconds the compiling child may take before it is killed (a cold compile of every kernel
#: took 60-90 s on a loaded 2-core VM)
COMPILE_TIMEOUT_S = 600
#: the marker's file name in the kernel cache folder: ``zipmoe-warm-<key>.json``
MARKER_PREFIX = "zipmoe-warm-"
#: the notice while the child compiles, where stderr is not a terminal (one line, no animation)
PLAIN_NOTICE = ("zipmoe-rt: compiling kernels for the first run (about a minute, cached "
                "afterwards)")


class KernelCompileWarning(UserWarning):
    """The kernel-compiling child process failed or timed out; the kernels are compiled in the
    loading process instead (the run goes on, with the same output, at a higher memory peak)."""


def _zmoe_folder() -> Path | None:
    """The folder of the container package ``zmoe``, whose Huffman decoder has Numba kernels."""
    try:
        import zmoe
        return Path(zmoe.__file__).resolve().parent
    except Exception:        # noqa: BLE001
        return None


def kernel_cache_dirs() -> dict:
    """The folders Numba caches the runtime's kernels in, by name: ``"kernels"``, this
    package's (:func:`zipmoe_rt.kernels.kernel_cache_dir`), and ``"zmoe"``, the container's
    Huffman decoder's (the ``zmoe`` package's folder); those Numba's locator cannot tell are
    left out."""
    from ..kernels import kernel_cache_dir
    out = {"kernels": kernel_cache_dir()}
    try:
        from numba.core.caching import FunctionCache
        from zmoe import huffman
        # Numba keeps one cache folder per source folder: a plain function of the package
        # locates the decoder kernels' folder
        out["zmoe"] = Path(FunctionCache(huffman.decode)._cache_path)
    except Exception:        # noqa: BLE001  (a Numba without this API)
        pass
    return {k: v for k, v in out.items() if v is not None}


def warm_key(source) -> str:
    """What selects the kernels (and their type signatures) runs of ``source`` use, as 16 hex
    digits: the runtime's kernel sources (:func:`zipmoe_rt.kernels.sources_digest`) and the
    ``zmoe`` package's files (size, modification time), the Python and Numba versions, the
    family and the hyper-parameters that are not sizes (strings and flags: activations, layer
    kinds), the (dtype, encoding) of every tensor and the (dtype, codec) of every expert
    piece. Sizes are left out: Numba specialises on types, not sizes, and the warm-up takes
    the parallel paths too.

    Args:
        source: a :class:`~zipmoe_rt.engine.store.ZmoeSource`.
    """
    import numba

    from ..kernels import sources_digest
    hp = source.hparams
    flags = {k: (sorted({str(x) for x in v}) if isinstance(v, (list, tuple)) else v)
             for k, v in sorted(hp.items())
             if isinstance(v, (str, bool)) or (isinstance(v, (list, tuple)) and v
                                               and all(isinstance(x, str) for x in v))}
    zf = _zmoe_folder()
    try:
        huff_id = sorted([f.name, f.stat().st_size, f.stat().st_mtime_ns]
                         for f in zf.glob("*.py")) if zf else None
    except OSError:
        huff_id = None
    tensors = sorted({(str(t.get("dtype")), str(t.get("encoding")))
                      for t in source.reader.tensors.values()})
    pieces = sorted({(p.dtype, str(p.codec), p.raw) for lay in source.layouts.values()
                     for p in lay.pieces})
    blob = json.dumps([sources_digest(), huff_id, sys.version.split()[0], numba.__version__,
                       hp.get("family"), flags, tensors, pieces], sort_keys=True, default=str)
    return hashlib.sha1(blob.encode()).hexdigest()[:16]


def marker_path(key: str) -> Path | None:
    """The marker of ``key`` in the kernel cache folder; None where Numba's folder is unknown."""
    from ..kernels import kernel_cache_dir
    d = kernel_cache_dir()
    return None if d is None else d / f"{MARKER_PREFIX}{key}.json"


def _index_files() -> list:
    """Every Numba cache index (``*.nbi``) in :func:`kernel_cache_dirs`, as ``[folder name,
    file name]`` pairs."""
    out = []
    for role, d in kernel_cache_dirs().items():
        try:
            out += [[role, f.name] for f in sorted(d.glob("*.nbi"))]
        except OSError:
            pass
    return out


def write_marker(key: str) -> Path | None:
    """After a warm-up: record that the cache holds the kernels of ``key``, with the index files
    present now (a later deletion of any of them, e.g. by
    :func:`zipmoe_rt.kernels.drop_stale_cache` after a kernel source changed, makes the cache
    cold again). Returns the marker's path; None where it cannot be written."""
    m = marker_path(key)
    files = _index_files()
    if m is None or not files:
        return None
    try:
        m.parent.mkdir(parents=True, exist_ok=True)
        tmp = m.with_name(f"{m.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps({"key": key, "index_files": files}))
        os.replace(tmp, m)
        return m
    except OSError:
        return None


def kernels_ready(key: str) -> bool:
    """Whether Numba's cache holds the kernels of ``key``: its marker exists, is readable and
    every index file it names is still there. Never raises (an unreadable marker: False)."""
    m = marker_path(key)
    if m is None:
        return False
    try:
        d = json.loads(m.read_text())
        files, dirs = d["index_files"], kernel_cache_dirs()
        return d.get("key") == key and bool(files) and all(
            (dirs[role] / name).is_file() for role, name in files)
    except (OSError, ValueError, KeyError, TypeError):
        return False


def precompile(model_path, timeout: float = COMPILE_TIMEOUT_S) -> tuple[bool, str]:
    """Run ``python -m zipmoe_rt.engine.precompile MODEL`` (output captured, killed after
    ``timeout`` seconds), which compiles the kernels of ``model_path`` into Numba's cache.

    Returns:
        ``(True, "")`` when the child succeeded, else ``(False, why)``: its exit status and the
        last line of its error output, or the timeout.
    """
    cmd = [sys.executable, "-m", "zipmoe_rt.engine.precompile", str(model_path)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, errors="replace",
                           timeout=timeout, stdin=subprocess.DEVNULL)
    except subprocess.TimeoutExpired:
        return False, f"it did not finish within {timeout:g} s"
    except OSError as e:
        return False, f"it could not start ({e})"
    if r.returncode != 0:
        tail = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        return False, (f"it exited with status {r.returncode}"
                       + (f": {tail[-1].strip()}" if tail else ""))
    return True, ""


def _stderr_is_terminal() -> bool:
    """Whether standard error is a terminal (False where it has no ``isatty`` or is closed)."""
    try:
        return bool(sys.stderr.isatty())
    except (AttributeError, ValueError):
        return False


def _writable(folder: Path) -> bool:
    """Whether ``folder``, or the nearest folder above it that exists, can be written."""
    for d in (folder, *folder.parents):
        if d.exists():
            return os.access(d, os.W_OK | os.X_OK)
    return False


def ensure_kernels(source, notice: bool = True, timeout: float = COMPILE_TIMEOUT_S,
                   run=None) -> str:
    """Make sure Numba's cache holds the kernels runs of ``source`` use, compiling them in a
    child process (:func:`precompile`) when it does not (:func:`kernels_ready`).

    Args:
        source: a :class:`~zipmoe_rt.engine.store.ZmoeSource` (its path and index).
        notice: say on stderr that the kernels compile while the child runs: on a terminal
            "compiling kernels once after install..." and "kernels compiled in N s" when done;
            elsewhere (stderr piped or sent to a file) the one plain line
            :data:`PLAIN_NOTICE`, so that a minute without output is not taken for a hang.
        timeout: seconds the child may take.
        run: the child runner, ``run(path, timeout) -> (ok, why)`` (default :func:`precompile`).
    Returns:
        ``"ready"`` (nothing to do), ``"compiled"`` (the child filled the cache) or ``"failed"``
        (the child failed or timed out, or left the cache without the marker, or the cache
        folder cannot be written and no child ran: the kernels then compile in this process).
    Warns:
        KernelCompileWarning: the child failed, timed out or could not fill the cache, or the
            cache folder cannot be written (naming why); the load goes on.
    """
    key = warm_key(source)
    if kernels_ready(key):
        return "ready"
    m = marker_path(key)
    if m is not None and not _writable(m.parent):
        # Numba cannot cache here either: every process compiles, and a child would only
        # compile the same kernels once more
        warnings.warn(f"{source.path}: Numba's kernel cache folder {m.parent} cannot be "
                      f"written, so the kernels compile in this process at every run (a higher "
                      f"memory peak while they compile); set NUMBA_CACHE_DIR to a writable "
                      f"folder", KernelCompileWarning, stacklevel=3)
        return "failed"
    on_terminal = notice and _stderr_is_terminal()
    if on_terminal:
        print("compiling kernels once after install (a child process; tens of seconds)...",
              file=sys.stderr, flush=True)
    elif notice:
        print(PLAIN_NOTICE, file=sys.stderr, flush=True)
    t0 = time.perf_counter()
    ok, why = (run or precompile)(source.path, timeout)
    if ok and not kernels_ready(key):
        ok, why = False, (f"it left no complete kernel cache in "
                          f"{marker_path(key).parent if marker_path(key) else 'Numba cache'} "
                          f"(a read-only folder?)")
    if not ok:
        warnings.warn(f"{source.path}: compiling the kernels in a child process failed ({why}); "
                      f"compiling them in this process instead (same output, a higher memory "
                      f"peak while they compile)", KernelCompileWarning, stacklevel=3)
        return "failed"
    if on_terminal:
        print(f"kernels compiled in {time.perf_counter() - t0:.0f} s", file=sys.stderr,
              flush=True)
    return "compiled"


def _main(argv) -> int:
    """``python -m zipmoe_rt.engine.precompile MODEL``: warm the kernels of MODEL up (filling
    Numba's cache), write the marker and print ``{"key": ..., "marker": ..., "s": ...}``."""
    if len(argv) != 1:
        print("usage: python -m zipmoe_rt.engine.precompile MODEL.zmoe", file=sys.stderr)
        return 2
    from .footprint import warm_up, warm_up_calibration
    from .store import ZmoeSource
    t0 = time.perf_counter()
    src = ZmoeSource(argv[0], keep_experts=False, copy_dense=True)
    try:
        warm_up(src)
        warm_up_calibration(src)
        key = warm_key(src)
    finally:
        src.close()
    m = write_marker(key)
    print(json.dumps({"key": key, "marker": str(m) if m else None,
                      "s": round(time.perf_counter() - t0, 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
