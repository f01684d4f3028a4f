"""The container verbs (``verify``, ``export``, ``inspect``) on a file truncated while they read
it: they read with ``pread`` (``ZmoeReader(use_mmap=False)``), so the truncation is one error
line naming the file, never a SIGBUS (a memory-mapped read past the new end of the file kills
the process). Each verb runs in a child process with a time limit; the file is truncated from
inside the reader, after the first pieces were read."""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest

import zmoe
from zipmoe_rt.convert.converter import convert

ROOT = Path(__file__).resolve().parent.parent

_CHILD = """
import os, sys
from zmoe.reader import ZmoeReader
from zipmoe_rt.cli import main
path, verb, out = sys.argv[1], sys.argv[2], sys.argv[3]
calls = [0]
read_part = ZmoeReader.read_part


def truncating_read_part(self, *a, **kw):
    calls[0] += 1
    if calls[0] == 3:                           # mid-pass: two pieces read, the rest not
        os.truncate(path, 4096)
    return read_part(self, *a, **kw)


ZmoeReader.read_part = truncating_read_part
args = {"verify": ["verify", path, "-q"], "export": ["export", path, "-o", out, "-q"]}[verb]
main(args, prog_name="zipmoe-rt")
"""


@pytest.fixture(scope="module")
def tiny(tiny_moe_dir, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("fmtfaults") / "m.zmoe"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(tiny_moe_dir("mixtral"), out, progress=False)


def _child(*args) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "ZIPMOE_RT_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "format")]
                                        + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return subprocess.run([sys.executable, "-c", _CHILD, *map(str, args)], env=env,
                          capture_output=True, text=True, timeout=300)


@pytest.mark.parametrize("verb", ["verify", "export"])
def test_file_truncated_mid_pass_is_one_error_line(tiny, tmp_path, verb):
    model = tmp_path / "m.zmoe"
    shutil.copy(tiny, model)
    size = model.stat().st_size
    r = _child(model, verb, tmp_path / "out")
    assert r.returncode == 1, f"exit {r.returncode} (a negative one is a signal): {r.stderr}"
    assert model.stat().st_size == 4096             # the truncation happened mid-pass
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1, r.stderr
    assert lines[0].startswith(f"error: {model}: truncated while being read"), lines[0]
    assert f"the header records {size}" in lines[0]
    assert not (tmp_path / "out").exists()          # export left nothing behind


def test_pread_reader_reads_what_the_memory_map_reads(tiny):
    """``use_mmap=False`` returns the same bytes (read-only arrays) for every tensor and expert."""
    with zmoe.ZmoeReader(tiny) as a, zmoe.ZmoeReader(tiny, use_mmap=False) as b:
        for name in a.tensors:
            x, y = a.read_tensor(name), b.read_tensor(name)
            assert x.dtype == y.dtype and np.array_equal(x.view(np.uint8), y.view(np.uint8))
            assert y.flags.writeable == x.flags.writeable   # raw pieces: read-only views
        for layer, e in a.experts:
            xa, xb = a.expert_tensors(layer, e), b.expert_tensors(layer, e)
            assert all(np.array_equal(xa[k].view(np.uint8), xb[k].view(np.uint8)) for k in xa)
        b.verify()


def test_pread_reader_names_the_file_on_truncation(tiny, tmp_path):
    model = tmp_path / "m.zmoe"
    shutil.copy(tiny, model)
    with zmoe.ZmoeReader(model, use_mmap=False) as r:
        last = list(r.tensors)[-1]
        os.truncate(model, 100)
        with pytest.raises(zmoe.TruncatedFileError, match=f"{model}: truncated while being read"):
            r.read_tensor(last)
