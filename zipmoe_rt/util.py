"""Small helpers shared by the runtime, the converter and the tools, each with no better home:
number type checks, file hashing, and this process's memory counters (``/proc/self/status``).

Standard library and numpy only, so that a benchmark child running under another interpreter
(``tools/compare_llamacpp.py``'s llama.cpp worker) can import it.
"""
from __future__ import annotations

import hashlib
from typing import Any

import numpy as np

__all__ = ["is_int", "is_real", "sha256_file", "status_bytes", "peak_rss", "reset_peak_rss"]


def is_int(x: Any) -> bool:
    """True for a Python or numpy integer; False for bools (``True`` is not a count)."""
    return isinstance(x, (int, np.integer)) and not isinstance(x, (bool, np.bool_))


def is_real(x: Any) -> bool:
    """True for a Python or numpy integer or float; False for bools."""
    return isinstance(x, (int, float, np.integer, np.floating)) and not isinstance(x, (bool, np.bool_))


def sha256_file(path, chunk: int = 1 << 22) -> str:
    """SHA-256 of a file's bytes as 64 lowercase hex digits, read ``chunk`` bytes at a time.

    Raises:
        OSError: the file cannot be opened or read.
    """
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for b in iter(lambda: f.read(chunk), b""):
            h.update(b)
    return h.hexdigest()


def status_bytes(field: str) -> int:
    """A ``kB`` field of ``/proc/self/status`` (e.g. ``"VmHWM"``, ``"RssAnon"``) in bytes, 0
    where unknown (no such field, no ``/proc``)."""
    prefix = field + ":"
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(prefix):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


def peak_rss() -> int:
    """Peak resident set size of this process in bytes (``VmHWM``), 0 where unknown."""
    return status_bytes("VmHWM")


def reset_peak_rss() -> None:
    """Reset this process's peak RSS (``VmHWM``) to its current RSS (Linux: ``5`` into
    ``/proc/self/clear_refs``); does nothing where that is refused or unavailable."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def format_bytes(n: int | float) -> str:
    """A size for a table or a log line, in decimal units: ``"512 B"`` under 1 kB, ``"196.6
    kB"`` under 1 MB, else whole megabytes (``"600 MB"``, as the bench table always printed).

    Args:
        n: bytes (int or float, >= 0).
    Returns:
        the size with its unit (B, kB or MB; 1 kB = 1000 bytes, 1 MB = 10**6 bytes).
    """
    if n < 1e3:
        return f"{n:.0f} B"
    if n < 1e6:
        return f"{n / 1e3:.1f} kB"
    return f"{n / 1e6:.0f} MB"
