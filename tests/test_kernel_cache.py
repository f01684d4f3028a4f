"""Numba's cache of the kernels is dropped when the kernel sources change (zipmoe_rt.kernels):
Numba keys a kernel on its own file only, and kernels inline helpers of other modules."""
from __future__ import annotations

from zipmoe_rt import kernels as K


def _fill(folder):
    names = ["linear.gemv_bf16_par-1.py311.nbi", "linear.gemv_bf16_par-1.py311.1.nbc",
             "rows.row_of-9.py311.nbi", "linear.cpython-311.pyc"]
    for n in names:
        (folder / n).write_bytes(b"x")
    return names


def test_entries_compiled_from_other_sources_are_dropped(tmp_path):
    _fill(tmp_path)
    (tmp_path / K.CACHE_STAMP).write_text("0" * 40 + "\n")
    assert K.drop_stale_cache(tmp_path, "a" * 40) == 3
    # only Numba's entries go; Python's own bytecode and the stamp stay
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["linear.cpython-311.pyc", K.CACHE_STAMP])
    assert (tmp_path / K.CACHE_STAMP).read_text().strip() == "a" * 40


def test_entries_of_the_same_sources_are_kept(tmp_path):
    names = _fill(tmp_path)
    assert K.drop_stale_cache(tmp_path, "b" * 40) == 3      # no stamp yet: built from unknown sources
    _fill(tmp_path)
    assert K.drop_stale_cache(tmp_path, "b" * 40) == 0
    assert set(names) <= {p.name for p in tmp_path.iterdir()}


def test_the_folder_is_numba_own_and_the_digest_covers_every_kernel_source():
    from zipmoe_rt.kernels.linear import gemv_bf16_par
    assert str(K.kernel_cache_dir()) == gemv_bf16_par._cache._cache_path
    d = K.sources_digest()
    assert len(d) == 40 and d == K.sources_digest()
    assert (K.kernel_cache_dir() / K.CACHE_STAMP).read_text().strip() == d


def test_an_unwritable_folder_is_left_alone(tmp_path):
    f = tmp_path / "file"
    f.write_text("not a folder")
    assert K.drop_stale_cache(f, "c" * 40) == 0


# -- a kernel cache folder that cannot be written ------------------------------------------------
# Each case runs a fresh interpreter (the check runs once, when the kernels are first imported)
# with a hard time limit.
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

import pytest  # noqa: E402

from test_api import tiny_src, tiny_zmoe  # noqa: E402,F401 - module fixtures

CHILD_LIMIT_S = 600
FIX = "set NUMBA_CACHE_DIR to a writable folder"
# imports the kernels with every warning recorded; prints the KernelCacheWarning messages and
# the NUMBA_CACHE_DIR the process ends with
IMPORT = """
import json, os, warnings
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    from zipmoe_rt.kernels import norm
import numpy as np
x = np.ones((2, 8), np.float32)
y = norm.rms_norm(x, np.ones(8, np.float32), 1e-6)       # compiles (and caches) a kernel
print(json.dumps({"warnings": [str(m.message) for m in w
                               if m.category.__name__ == "KernelCacheWarning"],
                  "cache": os.environ.get("NUMBA_CACHE_DIR"), "y": float(y.sum())}))
"""


def _unwritable(tmp_path: Path, how: str) -> Path:
    """A NUMBA_CACHE_DIR that cannot be written: a folder under a plain file (even root cannot
    make it), or a read-only folder (mode 0o500; root writes there anyway)."""
    if how == "under-a-file":
        (tmp_path / "file").write_text("not a folder")
        return tmp_path / "file" / "numba"
    if os.geteuid() == 0:
        pytest.skip("running as root: a read-only mode does not stop root from writing")
    d = tmp_path / "read-only"
    d.mkdir()
    d.chmod(0o500)
    return d


def _child(args, env: dict, **kw) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True,
                       env={**os.environ, **env}, timeout=CHILD_LIMIT_S, **kw)
    assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.mark.parametrize("how", ["under-a-file", "read-only"])
def test_an_unwritable_numba_cache_dir_warns_once_through_the_api(tmp_path, how):
    bad = _unwritable(tmp_path, how)
    out = json.loads(_child(["-c", IMPORT], {"NUMBA_CACHE_DIR": str(bad)}).stdout
                     .splitlines()[-1])
    assert len(out["warnings"]) == 1, out
    assert str(bad) in out["warnings"][0] and FIX in out["warnings"][0]
    assert out["y"] == pytest.approx(16.0, rel=1e-6)


def test_the_cli_says_so_in_one_line(tiny_zmoe, tmp_path):
    bad = _unwritable(tmp_path, "under-a-file")
    r = _child(["-m", "zipmoe_rt.cli", "run", str(tiny_zmoe), "-p", "hello", "-n", "3",
                "--temperature", "0"], {"NUMBA_CACHE_DIR": str(bad)}, stdin=subprocess.DEVNULL)
    notices = [ln for ln in r.stderr.splitlines() if "NUMBA_CACHE_DIR" in ln]
    assert len(notices) == 1, r.stderr
    assert notices[0].startswith("zipmoe-rt: warning: ") and str(bad) in notices[0]
    assert notices[0].endswith(FIX) and "Traceback" not in r.stderr
    assert r.stdout.strip()                                  # the reply was generated


@pytest.mark.skipif(not hasattr(os, "geteuid") or os.geteuid() != 0
                    or shutil.which("setpriv") is None,
                    reason="needs root and setpriv to run a process as a user who cannot "
                           "write the package's own folder")
def test_no_writable_cache_folder_at_all_compiles_in_a_temporary_one(tmp_path):
    """As user nobody (home /nonexistent), no folder Numba tries can be written (a read-only
    NUMBA_CACHE_DIR, the package's __pycache__, the user cache folder): Numba alone would
    refuse to define the kernels; the run goes on with one warning and a temporary cache
    folder, removed at exit."""
    ro = Path(tempfile.mkdtemp(prefix="zipmoe-rt-ro-"))     # world-readable, root's own
    try:
        ro.chmod(0o555)
        env = {"NUMBA_CACHE_DIR": str(ro), "HOME": "/nonexistent"}
        r = subprocess.run(["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups",
                            sys.executable, "-c", IMPORT], capture_output=True, text=True,
                           cwd="/", env={**os.environ, **env}, timeout=CHILD_LIMIT_S)
        assert r.returncode == 0, r.stderr[-3000:]
        out = json.loads(r.stdout.splitlines()[-1])
    finally:
        shutil.rmtree(ro)
    assert len(out["warnings"]) == 1, out
    msg = out["warnings"][0]
    assert msg.startswith("no Numba kernel cache folder can be written") and str(ro) in msg
    assert "compiled again at every run" in msg and msg.endswith(FIX)
    assert out["cache"] != str(ro) and out["cache"] in msg
    assert not Path(out["cache"]).exists()                    # removed at exit
    assert out["y"] == pytest.approx(16.0, rel=1e-6)
