"""The container verbs on damaged files.

- ``verify``, ``export`` (and ``inspect``) on a file truncated while they read it: they read
  with ``pread`` (``ZmoeReader(use_mmap=False)``), so the truncation is one error line naming
  the file, never a SIGBUS (a memory-mapped read past the new end of the file kills the
  process). Each verb runs in a child process with a time limit; the file is truncated from
  inside the reader, after the first pieces were read.
- ``verify`` on a file whose stored tokenizer.json, chat template or tokenizer config does not
  load: one error line naming the metadata key (run / chat would fail on it).
"""
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
from click.testing import CliRunner
from zmoe_edit import mutate, rewrite_index

from zipmoe_rt.cli import main
from zipmoe_rt.convert.converter import convert

from test_api import make_chat_model

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


@pytest.fixture(scope="module")
def chat_zmoe(tiny_moe_dir, tmp_path_factory) -> Path:
    return make_chat_model(tiny_moe_dir("mixtral"), tmp_path_factory.mktemp("fmtchat") / "chat")


def _verify(path):
    return CliRunner().invoke(main, ["verify", str(path), "-q"], env={"ZIPMOE_RT_DEBUG": None},
                              prog_name="zipmoe-rt")


def _with_metadata(src: Path, dst: Path, key: str, value) -> Path:
    def fn(b):
        def edit(index):
            if value is None:
                del index["metadata"][key]
            else:
                index["metadata"][key]["value"] = value
        rewrite_index(b, edit)
    return mutate(src, dst, fn)


def test_verify_loads_the_stored_tokenizer(chat_zmoe, tmp_path):
    r = _verify(chat_zmoe)
    assert r.exit_code == 0 and r.stdout.strip().endswith(
        "all checksums match; tokenizer and chat template load)"), r.output
    no_template = _with_metadata(chat_zmoe, tmp_path / "t.zmoe", "tokenizer.chat_template", None)
    r = _verify(no_template)
    assert r.exit_code == 0 and r.stdout.strip().endswith("match; tokenizer loads)"), r.output


@pytest.mark.parametrize("key, value, words", [
    ("tokenizer.json", '{"model": 5}', "is not a tokenizer the tokenizers library loads"),
    ("tokenizer.json", "not json", "is not a tokenizer the tokenizers library loads"),
    ("tokenizer.chat_template", "{% for m in messages %}", "does not compile"),
    ("tokenizer.chat_template", "{{ x }", "does not compile"),
    ("tokenizer.config", {"eos_token": "<nope>"}, "does not fit the stored tokenizer"),
])
def test_verify_names_a_stored_tokenizer_that_does_not_load(chat_zmoe, tmp_path, key, value,
                                                           words):
    bad = _with_metadata(chat_zmoe, tmp_path / "bad.zmoe", key, value)
    r = _verify(bad)
    assert r.exit_code == 1, r.output
    lines = r.output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"error: {bad}: metadata {key!r} "), r.output
    assert words in lines[0], lines[0]
