"""The ``zipmoe-rt`` command in a child process, as the CLI tests drive it: its argv, the
environment of a REPL child, and a pseudo-terminal driven like pexpect (:class:`Pty`,
:func:`driving`)."""
from __future__ import annotations

import os
import re
import select
import signal
import sys
import time
from contextlib import contextmanager
from pathlib import Path

import pytest


class Pty:
    """A child process whose controlling terminal is a pty we drive (like pexpect).

    ``limit_s`` is a hard limit on the whole conversation: any wait past it fails (and the
    caller kills the child), whatever the child prints meanwhile. ``ignore_sigint`` starts the
    child with SIGINT ignored, as ``nohup`` and a script's ``cmd &`` do."""

    def __init__(self, argv, env, limit_s: float = 600, ignore_sigint: bool = False):
        import pty
        pid, fd = pty.fork()
        if pid == 0:  # child: exec at once
            try:
                if ignore_sigint:
                    signal.signal(signal.SIGINT, signal.SIG_IGN)
                os.execve(argv[0], argv, env)
            finally:
                os._exit(127)
        self.pid, self.fd, self.buf, self.pos = pid, fd, b"", 0
        self.deadline = time.monotonic() + limit_s

    def _read(self, deadline_s):
        left = self.deadline - time.monotonic()
        if left <= 0:
            raise AssertionError(f"over the hard time limit; so far: {self.buf[-3000:]!r}")
        r, _, _ = select.select([self.fd], [], [], min(deadline_s, left))
        if not r:
            raise AssertionError(f"no output; so far: {self.buf[-3000:]!r}")
        try:
            data = os.read(self.fd, 1 << 16)
        except OSError:
            data = b""
        if not data:
            raise AssertionError(f"the REPL exited early; output: {self.buf[-3000:]!r}")
        self.buf += data

    def expect(self, pattern: bytes, guard_s: float = 120):
        """Wait for ``pattern`` (regex) after what was already matched; guard_s only stops a
        hang."""
        while True:
            m = re.compile(pattern).search(self.buf, self.pos)
            if m:
                self.pos = m.end()
                return m
            self._read(guard_s)

    def read_at_least(self, n: int, guard_s: float = 120) -> bytes:
        """Read until ``n`` bytes past what was already matched have come; return them all
        (they count as matched)."""
        start = self.pos
        while len(self.buf) - start < n:
            self._read(guard_s)
        self.pos = len(self.buf)
        return self.buf[start:]

    def send(self, data: bytes):
        """Type ``data`` on the terminal."""
        os.write(self.fd, data)

    def blocked_reading(self, guard_s: float = 120) -> bool:
        """Wait until the child's main thread sleeps in select/poll (waiting for a line); False
        if /proc cannot tell. (A SIGINT that lands just before readline enters select is only
        seen at the next key press: a CPython readline race, not the REPL's.)"""
        try:
            with open(f"/proc/{self.pid}/wchan") as f:
                f.read()
        except OSError:
            return False
        for _ in range(int(guard_s * 100)):
            if time.monotonic() > self.deadline:
                return False
            with open(f"/proc/{self.pid}/wchan") as f:
                if re.search("poll|select", f.read()):
                    return True
            select.select([], [], [], 0.01)
        return False

    def wait(self, guard_s: float = 120) -> int:
        """Exit code of the child, draining its output meanwhile; fails if it does not end."""
        for _ in range(int(guard_s * 10)):
            if time.monotonic() > self.deadline:
                break
            pid, status = os.waitpid(self.pid, os.WNOHANG)
            if pid:
                os.close(self.fd)
                return os.waitstatus_to_exitcode(status)
            try:  # drain so the child never blocks on a full pty
                if select.select([self.fd], [], [], 0.1)[0]:
                    self.buf += os.read(self.fd, 1 << 16)
            except OSError:
                select.select([], [], [], 0.1)
        raise AssertionError(f"the REPL did not exit; output: {self.buf[-3000:]!r}")

    def kill(self):
        """SIGKILL the child and reap it (nothing if it is gone)."""
        try:
            os.kill(self.pid, signal.SIGKILL)
            os.waitpid(self.pid, 0)
        except (ProcessLookupError, ChildProcessError):
            pass


def cli_argv() -> list:
    """The command that starts ``zipmoe-rt`` in a child process: the installed script beside
    this Python, else ``python -m zipmoe_rt.cli``."""
    exe = Path(sys.executable).with_name("zipmoe-rt")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "zipmoe_rt.cli"]


def repl_env() -> dict:
    """The environment of a REPL child: ours without ``ZIPMOE_RT_DEBUG`` and the OpenMP spin
    settings, on a dumb terminal, unbuffered."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("ZIPMOE_RT_DEBUG", "OMP_WAIT_POLICY", "GOMP_SPINCOUNT")}
    env.update(TERM="dumb", PYTHONUNBUFFERED="1")
    return env


@contextmanager
def driving(argv, env, **kw):
    """A :class:`Pty` running ``argv`` in ``env`` (``kw``: its ``limit_s``, ``ignore_sigint``)
    for the with-block: the test skips where no pty can be opened, and the child is killed when
    the block fails."""
    try:
        proc = Pty(argv, env, **kw)
    except OSError as e:
        pytest.skip(f"no pty: {e}")
    try:
        yield proc
    except BaseException:
        proc.kill()
        raise
