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
