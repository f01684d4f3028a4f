"""Publishing finished outputs in one step, so a reader never sees a half-written file or
folder; cleaning up what an interrupted writer left; reporting failed writes clearly.

Outputs are written as ``NAME.tmp-PID`` next to their final name and renamed when complete.
A process killed outright (SIGKILL, power loss) cannot remove its temporary file; the next run
to the same name removes it (:func:`remove_stale_temporaries`) once that PID no longer runs.
"""
from __future__ import annotations

import os
import re
import shutil
import tempfile
from pathlib import Path


class StaleTemporaryWarning(UserWarning):
    """Temporary outputs left by an interrupted run (its process no longer runs) were removed."""


class WriteError(OSError):
    """An output could not be written (disk full, quota, I/O error, permissions).

    The message names the output and the system's reason; ``errno`` is the system's error
    number. Nothing partial is left behind and the inputs are untouched.
    """

    def __init__(self, message: str, errno: int | None = None):
        super().__init__(message)
        self.errno = errno


def write_error(output: Path, e: OSError) -> WriteError:
    """A :class:`WriteError` for ``output`` from the ``OSError`` that writing it raised.

    The file named in ``e`` is named if there is one (e.g. a side file); otherwise ``output``
    (a failed ``write`` names no file).
    """
    reason = e.strerror or str(e) or type(e).__name__
    where = e.filename if getattr(e, "filename", None) else output
    return WriteError(f"{where}: {reason}; nothing was written to {output} and the source is "
                      f"untouched", e.errno)


def temporary_name(target: Path, pid: int | None = None) -> Path:
    """``TARGET.tmp-PID``: where a run of process ``pid`` (default: this one) writes ``target``."""
    target = Path(target)
    return target.with_name(f"{target.name}.tmp-{os.getpid() if pid is None else int(pid)}")


def pid_running(pid: int) -> bool:
    """True if a process ``pid`` runs on this machine (another user's included). A zombie
    (exited, not yet reaped by its parent: state ``Z`` in ``/proc/PID/stat``, e.g. a run
    killed by ``timeout -s KILL``) does not run."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:  # the process just went (or no /proc: not Linux)
        return not Path("/proc/self/stat").exists()
    except OSError:
        return True
    # "PID (COMM) STATE ...": COMM may hold spaces and parentheses; the state follows the last ")"
    return stat[stat.rfind(")") + 2:stat.rfind(")") + 3] != "Z"


def remove_stale_temporaries(target: Path) -> list[Path]:
    """Remove ``TARGET.tmp-PID`` files and folders next to ``target`` whose process no longer
    runs (left by a run killed with SIGKILL, or by a crash). One with this process's PID is
    stale too (PIDs are reused: this process has not written it yet). Temporaries of running
    processes are left alone.

    Returns:
        the paths removed, sorted.

    Raises:
        OSError: a stale temporary could not be removed (e.g. permissions).
    """
    target = Path(target)
    if not target.parent.is_dir():
        return []
    pat = re.compile(re.escape(target.name) + r"\.tmp-(\d+)")
    removed = []
    for p in sorted(target.parent.iterdir()):
        m = pat.fullmatch(p.name)
        if m is None:
            continue
        pid = int(m.group(1))
        if pid != os.getpid() and pid_running(pid):
            continue
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p)
        else:
            p.unlink()
        removed.append(p)
    return removed


def stale_message(removed: list[Path]) -> str:
    """One line saying which stale temporaries were removed."""
    names = ", ".join(str(p) for p in removed)
    return (f"removed {names}: left by an interrupted run whose process no longer runs"
            if len(removed) == 1 else
            f"removed {len(removed)} temporary outputs left by interrupted runs whose processes "
            f"no longer run: {names}")


def replace_dir(tmp: Path, out_dir: Path) -> Path:
    """Move the completed folder ``tmp`` to ``out_dir``, replacing an existing one.

    The old folder is first renamed aside (same file system), then ``tmp`` is renamed into place,
    then the old one is deleted: ``out_dir`` always names either the old or the new folder.
    """
    tmp, out_dir = Path(tmp), Path(out_dir)
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir
