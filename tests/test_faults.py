"""Faults while in use: the model file truncated, rewritten or replaced under a running model, read
errors (EIO) in expert reads, ``convert`` killed outright (SIGKILL) and its stale temporary file,
and a full disk in the middle of ``convert`` and ``export``.

Every child process runs with a hard time limit. Disk-full tests mount a small tmpfs (root
only) and skip where mounting is not permitted.
"""
from __future__ import annotations

import errno
import hashlib
import os
import queue
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

import zmoe
import zipmoe_rt
from zipmoe_rt.convert.atomic import StaleTemporaryWarning, WriteError, remove_stale_temporaries
from zipmoe_rt.convert.converter import convert
from zipmoe_rt.convert.export import export
from zipmoe_rt.engine.io import ModelFileError

from cli_runner import cli
from test_api import tiny_src, tiny_zmoe  # noqa: F401  (module-scoped fixtures)

ROOT = Path(__file__).resolve().parent.parent
#: seconds any child process may run
CHILD_TIMEOUT = 180


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "ZIPMOE_RT_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "format"), str(ROOT / "tests")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    env["PYTHONUNBUFFERED"] = "1"
    return env


def one_error_line(stderr: str, *needles) -> str:
    """The only line of ``stderr`` that is not a warning or the memory banner (``zipmoe-rt:
    ...``, printed at load with a budget): ``error: ...``, no traceback."""
    assert "Traceback" not in stderr, stderr
    lines = [l for l in stderr.splitlines() if l.strip() and not l.startswith("zipmoe-rt: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    for n in needles:
        assert str(n) in lines[0], (n, lines[0])
    return lines[0]


def sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def folder_digest(folder: Path) -> dict:
    return {p.name: sha(p) for p in sorted(folder.iterdir()) if p.is_file()}


# -- the model file changed under a running model --------------------------------------------------
class Chat:
    """``zipmoe-rt chat MODEL`` with piped stdin/stdout; replies are read line by line."""

    def __init__(self, model: Path, *args):
        self.p = subprocess.Popen([sys.executable, "-m", "zipmoe_rt.cli", "chat", str(model),
                                   "-n", "12", *args], stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                                  env=child_env())
        self.lines: queue.Queue = queue.Queue()
        threading.Thread(target=self._pump, daemon=True).start()

    def _pump(self):
        for line in self.p.stdout:
            self.lines.put(line)
        self.lines.put(None)

    def say(self, text: str) -> str | None:
        """Send one turn; its reply line (None if the process ended without one)."""
        self.p.stdin.write(text + "\n")
        self.p.stdin.flush()
        return self.lines.get(timeout=CHILD_TIMEOUT)

    def finish(self) -> tuple[int, str]:
        """Close stdin; (exit status, stderr)."""
        try:
            self.p.stdin.close()
        except BrokenPipeError:
            pass
        try:   # wait first (bounded), then read what is left: a read alone could block for ever
            rc = self.p.wait(timeout=CHILD_TIMEOUT)
            err = self.p.stderr.read()
        except subprocess.TimeoutExpired:
            self.p.kill()
            self.p.wait()
            raise
        return rc, err

    def kill(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def _overwrite_middle(path: Path):
    """Flip every byte of the file's middle third, in place (same inode, same size)."""
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.seek(size // 3)
        data = f.read(size // 3)
        f.seek(size // 3)
        f.write(bytes(b ^ 0xFF for b in data))


@pytest.mark.parametrize("change", ["truncate", "overwrite"])
def test_chat_under_a_budget_reports_a_file_changed_in_place(tiny_zmoe, tmp_path, change):
    """Budgeted chat (the smallest budget: experts are read at every token): the file truncated
    (or rewritten in place) after the first reply makes the next reply fail with one error line
    naming the file and what happened; never a crash (before: truncation gave 'short read at
    ...', an in-place rewrite 'fails its CRC-32 (corrupt file)')."""
    model = tmp_path / "m.zmoe"
    shutil.copy(tiny_zmoe, model)
    chat = Chat(model, "--memory-budget", "350KB")
    try:
        assert chat.say("hello world")
        if change == "truncate":
            os.truncate(model, 4096)
        else:
            _overwrite_middle(model)
        chat.say("tell me a story")
        rc, err = chat.finish()
    finally:
        chat.kill()
    assert rc == 1, err
    what = "truncated to 4096 bytes" if change == "truncate" else "rewritten in place"
    one_error_line(err, model, what, "while in use")


def test_unbudgeted_chat_survives_truncation_without_sigbus(tiny_zmoe, tmp_path):
    """Unbudgeted chat: nothing is memory-mapped any more, so a file truncated to its first page
    after the first reply cannot kill the process with SIGBUS (before: exit by signal 7 at the
    next token). Weights already in memory keep working; a read that is still needed reports
    the change (one line)."""
    model = tmp_path / "m.zmoe"
    shutil.copy(tiny_zmoe, model)
    chat = Chat(model)
    try:
        first = chat.say("hello world")
        assert first
        os.truncate(model, 4096)
        second = chat.say("tell me a story")
        rc, err = chat.finish()
    finally:
        chat.kill()
    assert rc >= 0, f"killed by signal {-rc}: {err}"
    if rc == 0:
        assert second and err == ""
    else:
        one_error_line(err, model, "truncated to 4096 bytes")


_API_CHILD = """
import os, shutil, sys
import zipmoe_rt
from zipmoe_rt.engine.io import ModelFileError
path, change, budget = sys.argv[1], sys.argv[2], (sys.argv[3] if len(sys.argv) > 3 else None)
m = zipmoe_rt.load(path, memory_budget=budget)     # dense weights read; no expert yet
if change == "truncate":
    os.truncate(path, 4096)
elif change == "overwrite":
    size = os.path.getsize(path)
    with open(path, "r+b") as f:
        f.seek(size - 8192); f.write(b"x" * 100)
elif change == "rename":
    shutil.copy(path, path + ".new")
    with open(path + ".new", "r+b") as f:
        f.write(b"junk")                           # a different (broken) file takes the name
    os.replace(path + ".new", path)
elif change == "delete":
    os.unlink(path)
try:
    print("OK", m.generate("hello world", max_tokens=8), flush=True)
except ModelFileError as e:
    print("ERR", e, flush=True)
"""


@pytest.mark.parametrize("budget", [None, "350KB"], ids=["unbudgeted", "budgeted"])
@pytest.mark.parametrize("change", ["truncate", "overwrite", "rename", "delete"])
def test_api_file_changes_after_load(tiny_zmoe, tmp_path, change, budget):
    """Changes right after load(), before any expert was read: in place (truncated, rewritten)
    the first expert read raises ModelFileError naming the file; replaced by rename or deleted,
    the open file is still read and the text is the same as without the change."""
    want = None
    with zipmoe_rt.load(tiny_zmoe) as ref:
        want = ref.generate("hello world", max_tokens=8)
    model = tmp_path / "m.zmoe"
    shutil.copy(tiny_zmoe, model)
    r = subprocess.run([sys.executable, "-c", _API_CHILD, str(model), change]
                       + ([budget] if budget else []), capture_output=True, text=True,
                       env=child_env(), timeout=CHILD_TIMEOUT)
    assert r.returncode == 0, r.stderr
    out = r.stdout.rstrip("\n")
    if change in ("rename", "delete"):
        assert out == f"OK {want}"
    else:
        what = "truncated to 4096 bytes" if change == "truncate" else "rewritten in place"
        assert out.startswith(f"ERR {model}: the file was {what}"), out


def test_region_reader_names_the_file_for_changes_and_read_errors(tmp_path, monkeypatch):
    from zipmoe_rt.engine.io import RegionReader
    f = tmp_path / "blob"
    f.write_bytes(bytes(range(256)) * 64)
    rr = RegionReader(f)
    try:
        assert rr.read(256, 256).tobytes() == bytes(range(256))
        real = os.preadv

        def eio(fd, bufs, offset, *a):
            if fd == rr.fd:
                raise OSError(errno.EIO, os.strerror(errno.EIO))
            return real(fd, bufs, offset, *a)
        monkeypatch.setattr(os, "preadv", eio)
        with pytest.raises(ModelFileError) as e:
            rr.read(512, 100)
        assert str(e.value) == f"{f}: read error at byte 512 (100 bytes): Input/output error"
        assert e.value.errno == errno.EIO
        monkeypatch.setattr(os, "preadv", real)
        with open(f, "ab") as g:
            g.write(b"more")
        with pytest.raises(ModelFileError, match=r"extended to 16388 bytes \(it had 16384\)"):
            rr.read(0, 10)
    finally:
        rr.close()


# -- read errors in expert reads -------------------------------------------------------------------
@pytest.mark.parametrize("budget", [None, "350KB"], ids=["unbudgeted", "budgeted"])
def test_read_error_in_expert_reads_is_one_cli_line(tiny_zmoe, monkeypatch, budget):
    """EIO from every read at or past the first expert region (dense weights load fine): `run`
    exits 1 with one line naming the file, the offset and the system's reason; no traceback."""
    with zmoe.ZmoeReader(tiny_zmoe) as r:
        first = min(b["sm"][0] for b in r.experts.values())
    real = os.preadv
    failed = []

    def eio(fd, bufs, offset, *a):
        if offset >= first and os.path.samefile(f"/proc/self/fd/{fd}", tiny_zmoe):
            failed.append(offset)
            raise OSError(errno.EIO, os.strerror(errno.EIO))
        return real(fd, bufs, offset, *a)
    monkeypatch.setattr(os, "preadv", eio)
    args = ["run", tiny_zmoe, "-p", "hello", "-n", "5"] + (["-m", budget] if budget else [])
    r = cli(*args)
    assert failed and r.exit_code == 1, (r.exit_code, r.stderr)
    one_error_line(r.stderr, tiny_zmoe, "read error at byte", "Input/output error")


# -- convert killed outright, stale temporaries ----------------------------------------------------
_KILLED_CONVERT = """
import os, signal, sys
import zmoe
from zipmoe_rt.convert.converter import convert
write = zmoe.ZmoeWriter.write_expert
done = [0]
def write_then_die(self, enc):
    write(self, enc)
    done[0] += 1
    if done[0] == 3:                      # mid-convert: some experts written, more to come
        self.f.flush()
        os.kill(os.getpid(), signal.SIGKILL)
zmoe.ZmoeWriter.write_expert = write_then_die
convert(sys.argv[1], sys.argv[2], progress=False)
"""


@pytest.mark.parametrize("existing", [False, True], ids=["fresh", "existing-output"])
def test_convert_killed_leaves_only_its_temp_file_and_the_next_convert_removes_it(
        tiny_src, tmp_path, existing):
    out_dir = tmp_path / "out"
    out_dir.mkdir()
    out = out_dir / "model.zmoe"
    if existing:
        out.write_bytes(b"previous contents")
    before = folder_digest(tiny_src)
    p = subprocess.run([sys.executable, "-c", _KILLED_CONVERT, str(tiny_src), str(out)],
                       capture_output=True, text=True, env=child_env(), timeout=CHILD_TIMEOUT)
    assert p.returncode == -signal.SIGKILL, p.stderr
    left = sorted(x.name for x in out_dir.iterdir())
    assert len(left) == 1 + existing and left[-1].startswith("model.zmoe.tmp-"), left
    stale = out_dir / left[-1]
    assert stale.stat().st_size > 4096                 # it was killed mid-write
    if existing:
        assert out.read_bytes() == b"previous contents"
    assert folder_digest(tiny_src) == before
    # a temporary of a process that still runs (our parent) is left alone
    alive = out_dir / f"model.zmoe.tmp-{os.getppid()}"
    alive.write_bytes(b"someone else's conversion in progress")
    r = cli("convert", tiny_src, "-o", out, "-q", "--force")
    assert r.exit_code == 0, r.stderr
    warnings_ = [l for l in r.stderr.splitlines() if l.strip()]
    assert warnings_[-1] == (f"zipmoe-rt: warning: removed {stale}: left by an interrupted run "
                             f"whose process no longer runs"), r.stderr
    assert sorted(x.name for x in out_dir.iterdir()) == sorted(["model.zmoe", alive.name])
    with zmoe.ZmoeReader(out) as z:
        z.verify()
    assert folder_digest(tiny_src) == before


def test_remove_stale_temporaries_keeps_live_and_unrelated_names(tmp_path):
    target = tmp_path / "m.zmoe"
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=CHILD_TIMEOUT)
    names = [f"m.zmoe.tmp-{dead.pid}", f"m.zmoe.tmp-{os.getppid()}", "m.zmoe.tmp-x1",
             "m.zmoe.tmp-", "other.zmoe.tmp-1", f"m.zmoe.tmp-{os.getpid()}"]
    for n in names:
        (tmp_path / n).write_bytes(b"x")
    (tmp_path / f"m.zmoe.tmp-{dead.pid}0").mkdir()    # a folder (export) of another dead pid?
    removed = remove_stale_temporaries(target)
    left = sorted(p.name for p in tmp_path.iterdir())
    assert f"m.zmoe.tmp-{dead.pid}" not in left and f"m.zmoe.tmp-{os.getpid()}" not in left
    assert {f"m.zmoe.tmp-{os.getppid()}", "m.zmoe.tmp-x1", "m.zmoe.tmp-",
            "other.zmoe.tmp-1"} <= set(left)
    assert all(p.parent == tmp_path and p.name.startswith("m.zmoe.tmp-") for p in removed)
    assert remove_stale_temporaries(tmp_path / "missing-dir" / "m.zmoe") == []


def test_temporary_of_an_exited_unreaped_process_is_stale(tmp_path):
    """A run killed while its parent has not reaped it yet (``timeout -s KILL``) is a zombie:
    ``pid_running`` says it does not run, and its temporary is removed."""
    from zipmoe_rt.convert.atomic import pid_running
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    try:
        stat = Path(f"/proc/{child.pid}/stat")
        deadline = time.monotonic() + CHILD_TIMEOUT   # the child exits; it is left unreaped
        while stat.read_text().rsplit(")", 1)[1].split()[0] != "Z":
            assert time.monotonic() < deadline, "the child did not exit"
            time.sleep(0.01)
        assert child.returncode is None               # not reaped: the pid still exists
        assert pid_running(child.pid) is False
        assert pid_running(os.getpid()) is True
        tmp = tmp_path / f"m.zmoe.tmp-{child.pid}"
        tmp.write_bytes(b"x")
        assert remove_stale_temporaries(tmp_path / "m.zmoe") == [tmp]
        assert not tmp.exists()
    finally:
        child.wait(timeout=CHILD_TIMEOUT)


# -- disk full -------------------------------------------------------------------------------------
@pytest.fixture
def small_fs(tmp_path):
    """A 256 KiB tmpfs mounted on a new folder (root only; skips where mounting is refused)."""
    d = tmp_path / "small"
    d.mkdir()
    try:
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(d)],
                           capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as e:
        pytest.skip(f"cannot mount a tmpfs: {e}")
    if r.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs: {r.stderr.strip()}")
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], capture_output=True, timeout=30)


def test_disk_full_during_convert_is_a_clear_error_with_nothing_left(tiny_src, small_fs):
    """The output on a full file system: WriteError naming the output and 'No space left on
    device', no temporary file left, the source untouched; the CLI shows it as one line."""
    before = folder_digest(tiny_src)
    out = small_fs / "model.zmoe"
    with pytest.raises(WriteError) as e:
        convert(tiny_src, out, progress=False)
    assert str(e.value).startswith(f"{out}: No space left on device; nothing was written")
    assert e.value.errno == errno.ENOSPC
    assert list(small_fs.iterdir()) == []
    r = cli("convert", tiny_src, "-o", out, "-q")
    assert r.exit_code == 1
    one_error_line(r.stderr, out, "No space left on device", "source is untouched")
    assert list(small_fs.iterdir()) == []
    assert folder_digest(tiny_src) == before


def test_disk_full_during_export_is_a_clear_error_with_nothing_left(tiny_zmoe, small_fs):
    before = sha(tiny_zmoe)
    out = small_fs / "exported"
    with pytest.raises(WriteError) as e:
        export(tiny_zmoe, out, progress=False)
    assert str(e.value).startswith(f"{out}: No space left on device; nothing was written")
    assert list(small_fs.iterdir()) == []
    r = cli("export", tiny_zmoe, "-o", out, "-q")
    assert r.exit_code == 1
    one_error_line(r.stderr, out, "No space left on device")
    assert list(small_fs.iterdir()) == []
    assert sha(tiny_zmoe) == before


def test_export_removes_stale_temporary_folder(tiny_zmoe, tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait(timeout=CHILD_TIMEOUT)
    stale = tmp_path / f"exported.tmp-{dead.pid}"
    stale.mkdir()
    (stale / "model.safetensors").write_bytes(b"half")
    with pytest.warns(StaleTemporaryWarning, match="removed .*exported.tmp-"):
        export(tiny_zmoe, tmp_path / "exported", progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["exported"]
