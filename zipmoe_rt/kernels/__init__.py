"""Numba CPU kernels, the only place of the package that defines any: :mod:`.linear` (BF16
GEMV/GEMM, embedding rows), :mod:`.swiglu` (fused SwiGLU experts), :mod:`.norm` (RMSNorm,
LayerNorm, residual add), :mod:`.attention` (q/k norm + RoPE + cache write, causal attention),
:mod:`.routing` (top-k softmax routing), :mod:`.sparsemixer` (PhiMoE's top-2 router),
:mod:`.sinks` (attention with gpt-oss's sinks), :mod:`.clamped_swiglu` (gpt-oss's expert
activation) and :mod:`.planes` (bit-plane merge after the host-side Huffman decode). Model code reaches them
through :mod:`zipmoe_rt.backends.numba_cpu`.
:mod:`.cuda_src` holds the CUDA C sources of the GPU backend (plain strings, compiled by
:mod:`zipmoe_rt.backends.cupy_cuda`).

Threading: the parallel kernels use Numba's default threading layer (OpenMP here) and must be
called from one thread only. How idle OpenMP workers wait matters a lot on 2 cores:

* spinning (``OMP_WAIT_POLICY=ACTIVE``, OpenMP's default): a parallel region costs ~2 us, but any
  other busy thread on the machine — another process, or the engine's own decode workers —
  steals the spinning worker's core and every region then waits for it: decode measured
  45 -> 0.6 tokens/s with one busy process on the second core.
* sleeping (``PASSIVE``): robust (~20 tokens/s in that case, the same as one thread), but waking
  a worker costs tens of microseconds per region in a VM (75 us measured here, ~30 us on the
  GPU host; a few us on bare metal): ~24-31 instead of ~45 tokens/s on an idle 2-core VM.

Importing this package selects ``PASSIVE`` unless ``OMP_WAIT_POLICY`` is already set;
``zipmoe_rt.load`` then picks ``ACTIVE`` for unbudgeted runs (no decode workers of ours compete;
fastest on an otherwise idle machine) and keeps ``PASSIVE`` under a memory budget, unless the
user set the variable.

``ACTIVE`` alone makes GNU OpenMP (libgomp) spin for 3e10 iterations, i.e. for ever: an idle
chat REPL waiting at its prompt kept a core busy. :func:`set_wait_policy` therefore bounds the
spin with ``GOMP_SPINCOUNT`` (:data:`ACTIVE_SPIN_COUNT`, a fraction of a second; far longer than
the microseconds between two parallel regions of a token step) unless the user set it, the
libgomp counterpart of ``KMP_BLOCKTIME`` for Intel's runtime (libgomp's manual, "GOMP_SPINCOUNT").
"""
from __future__ import annotations

import atexit
import hashlib
import os
import shutil
import tempfile
import warnings
from pathlib import Path

#: the user's own OMP_WAIT_POLICY, if any (then zipmoe-rt never changes it)
USER_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")
os.environ.setdefault("KMP_BLOCKTIME", "0")
#: the user's own GOMP_SPINCOUNT, if any (then zipmoe-rt never changes it)
USER_SPIN_COUNT = os.environ.get("GOMP_SPINCOUNT")
#: libgomp spin iterations before an idle worker sleeps under ``ACTIVE`` (~0.05-0.3 s)
ACTIVE_SPIN_COUNT = 10_000_000


def set_wait_policy(policy: str) -> bool:
    """Choose how idle OpenMP workers wait: "active" (spin) or "passive" (sleep), and with it
    the work from which products run in parallel
    (:data:`zipmoe_rt.kernels.linear.PAR_MIN_WORK`: lower when a region is cheap).

    Only effective before the first parallel kernel runs (the runtime reads the environment
    once, when Numba starts its threads).

    Args:
        policy: "active" or "passive" (case-insensitive).
    Returns:
        True when applied, False when Numba's threads are already running (nothing changed).
    Raises:
        ValueError: another policy name.
    """
    p = policy.upper()
    if p not in ("ACTIVE", "PASSIVE"):
        raise ValueError(f"wait policy must be 'active' or 'passive', not {policy!r}")
    from numba.np.ufunc import parallel

    if parallel._is_initialized:
        return False
    os.environ["OMP_WAIT_POLICY"] = p
    os.environ["KMP_BLOCKTIME"] = "200" if p == "ACTIVE" else "0"
    if USER_SPIN_COUNT is None:   # bounded spinning, then sleep (see the module docstring)
        os.environ["GOMP_SPINCOUNT"] = str(ACTIVE_SPIN_COUNT) if p == "ACTIVE" else "0"
    from . import linear          # the size from which products are split over the threads
    linear.PAR_MIN_WORK = linear.par_min_work(p)
    return True


#: the file beside Numba's cache entries of the kernels naming the sources they were built from
CACHE_STAMP = "zipmoe-kernels.sha1"


def sources_digest() -> str:
    """SHA-1 (hex) of every kernel source file of this package (names and bytes, sorted)."""
    h = hashlib.sha1()
    for f in sorted(Path(__file__).resolve().parent.glob("*.py")):
        h.update(f.name.encode())
        h.update(f.read_bytes())
    return h.hexdigest()


def kernel_cache_dir() -> Path | None:
    """The folder Numba caches this package's kernels in (``__pycache__`` beside the sources,
    ``NUMBA_CACHE_DIR`` or its user-wide fallback), as Numba's own locator picks it; None where
    it cannot tell."""
    try:
        from numba.core.caching import FunctionCache
        return Path(FunctionCache(kernel_cache_dir)._cache_path)
    except Exception:        # noqa: BLE001  (a Numba without this API: no check)
        return None


def drop_stale_cache(folder: Path | None = None, digest: str | None = None) -> int:
    """Delete Numba's cache entries (``*.nbi`` / ``*.nbc``) in ``folder`` (default
    :func:`kernel_cache_dir`) unless its :data:`CACHE_STAMP` names ``digest`` (default
    :func:`sources_digest`), then write the stamp. Kernels compiled from other sources are then
    compiled again at their first call. Never raises (an unwritable folder: nothing done).

    Returns:
        the number of files deleted.
    """
    try:
        folder = kernel_cache_dir() if folder is None else Path(folder)
        if folder is None:
            return 0
        digest = sources_digest() if digest is None else digest
        stamp = folder / CACHE_STAMP
        try:
            if stamp.read_text().strip() == digest:
                return 0
        except OSError:
            pass
        gone = 0
        for f in [*folder.glob("*.nbi"), *folder.glob("*.nbc")]:
            try:
                f.unlink()
                gone += 1
            except OSError:
                pass
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f"{CACHE_STAMP}.{os.getpid()}.tmp"
        tmp.write_text(digest + "\n")
        os.replace(tmp, stamp)
        return gone
    except OSError:
        return 0


class KernelCacheWarning(UserWarning):
    """Numba cannot keep the compiled kernels where it was asked to: ``NUMBA_CACHE_DIR`` cannot
    be written (Numba then caches them elsewhere), or no cache folder can be (the kernels are
    then compiled again at every run, tens of seconds). The message names the folder and the
    fix (set ``NUMBA_CACHE_DIR`` to a writable folder); the CLI prints it as one
    ``zipmoe-rt: warning:`` line."""


def check_cache_dir() -> str | None:
    """Check where Numba will cache the kernels, as its own locators pick the folder (a user
    ``NUMBA_CACHE_DIR``, else ``__pycache__`` beside the sources, else the user-wide cache
    folder; each used only if a file can be created in it).

    Where none can be written, Numba would refuse to define a cached kernel (``RuntimeError:
    cannot cache function ...: no locator available``, at import): ``NUMBA_CACHE_DIR`` (Numba's
    ``config.CACHE_DIR`` and the environment, so child processes share it) is then pointed at a
    new temporary folder, removed when the process exits, so the kernels compile at every run
    but the run goes on.

    Returns:
        None when the kernels are cached where asked, else the notice: the folder that cannot
        be written, where the kernels go instead, and the fix.
    Raises:
        RuntimeError: no folder can be written, not even a temporary one (the message names
            the folders and ``NUMBA_CACHE_DIR``).
    """
    try:
        from numba.core import config
        from numba.core.caching import FunctionCache
    except ImportError:        # a Numba without this API: no check
        return None
    user = config.CACHE_DIR
    fix = "set NUMBA_CACHE_DIR to a writable folder"
    try:
        where = Path(FunctionCache(check_cache_dir)._cache_path)
    except RuntimeError:       # no locator: no folder can be written
        where = None
    except Exception:  # noqa: BLE001  (a Numba whose locators differ: no check)
        return None
    if where is not None:
        if user and Path(user).resolve() not in where.resolve().parents:
            return (f"Numba's kernel cache folder {user} (NUMBA_CACHE_DIR) cannot be written; "
                    f"the kernels are cached in {where} instead; {fix}")
        return None
    from numba.misc.appdirs import AppDirs
    tried = ([f"{user} (NUMBA_CACHE_DIR)"] if user else []) + [
        str(Path(__file__).resolve().parent / "__pycache__"),
        AppDirs(appname="numba", appauthor=False).user_cache_dir]
    tried = ", ".join(tried)
    try:
        tmp = tempfile.mkdtemp(prefix="zipmoe-rt-numba-")
    except OSError as e:
        raise RuntimeError(f"no Numba kernel cache folder can be written ({tried}), nor a "
                           f"temporary folder ({e}); {fix}") from None
    atexit.register(shutil.rmtree, tmp, True)
    config.CACHE_DIR = os.environ["NUMBA_CACHE_DIR"] = tmp
    return (f"no Numba kernel cache folder can be written ({tried}), so the kernels are "
            f"compiled again at every run (tens of seconds; this run keeps them in {tmp}, "
            f"removed at exit); {fix}")


_cache_notice = check_cache_dir()
if _cache_notice:                 # once per process: at the package's first import
    warnings.warn(_cache_notice, KernelCacheWarning)
drop_stale_cache()
