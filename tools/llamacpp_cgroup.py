"""Step 3 of tools/compare_llamacpp.py: dropping the page cache and running one benchmark child in
a fresh memory cgroup (v1) under a limit, with its peak usage, anonymous memory and OOM kills.
"""
from __future__ import annotations

import os
import re
import signal
import subprocess
import threading
import time
from pathlib import Path

from llamacpp_common import CG_ROOT, log


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
