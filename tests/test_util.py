"""Tests of zipmoe_rt.util: type checks, file hashing, /proc memory counters."""
from __future__ import annotations

import hashlib
import os
import sys

import numpy as np
import pytest

from zipmoe_rt import util


def test_is_int_and_is_real_refuse_bools():
    assert util.is_int(3) and util.is_int(np.int64(-2)) and util.is_int(np.uint8(7))
    assert not util.is_int(True) and not util.is_int(np.bool_(False))
    assert not util.is_int(3.0) and not util.is_int("3") and not util.is_int(None)
    assert util.is_real(3) and util.is_real(2.5) and util.is_real(np.float32(1)) \
        and util.is_real(np.int16(4))
    assert not util.is_real(True) and not util.is_real(np.bool_(True)) and not util.is_real("1")


@pytest.mark.parametrize("size, chunk", [(0, 4), (5, 4), (8, 4), (1000, 7), (1 << 20, 1 << 22)])
def test_sha256_file_matches_hashlib(tmp_path, size, chunk):
    data = np.random.default_rng(size).integers(0, 256, size, dtype=np.uint8).tobytes()
    f = tmp_path / "x.bin"
    f.write_bytes(data)
    assert util.sha256_file(f, chunk=chunk) == hashlib.sha256(data).hexdigest()
    assert util.sha256_file(str(f)) == hashlib.sha256(data).hexdigest()
    with pytest.raises(OSError):
        util.sha256_file(tmp_path / "missing")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/status is Linux's")
def test_memory_counters_read_proc_status():
    with open("/proc/self/status") as f:
        rss_line = next(line for line in f if line.startswith("VmRSS:"))
    assert rss_line.split()[2] == "kB"
    assert util.status_bytes("VmHWM") >= util.status_bytes("VmRSS") > 0
    assert util.status_bytes("VmHWM") % 1024 == 0
    assert util.status_bytes("NoSuchField") == 0
    # a 64 MiB array written page by page raises RSS and the peak by about its size
    a = np.ones(64 << 20, np.uint8)
    high = util.peak_rss()
    assert high == util.status_bytes("VmHWM") >= util.status_bytes("VmRSS") >= 60 << 20
    del a
    util.reset_peak_rss()
    if os.access("/proc/self/clear_refs", os.W_OK):
        # the peak is now the current RSS, without the freed array
        assert util.peak_rss() <= high - (32 << 20)
    assert util.peak_rss() >= util.status_bytes("VmRSS") > 0
