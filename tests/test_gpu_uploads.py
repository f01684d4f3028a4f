"""Per-step uploads (``Backend.upload``): the CPU backends' default and the CUDA backend's
pinned ring (:mod:`zipmoe_rt.backends.cuda_uploads`)."""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.backends import cuda_unavailable

WHY = cuda_unavailable()
gpu = pytest.mark.skipif(WHY is not None, reason=f"no CUDA backend here: {WHY}")


def _arrays(rng):
    return [rng.integers(-5, 10**6, 7).astype(np.int64),
            rng.standard_normal((3, 5)).astype(np.float32),
            np.zeros(0, np.float32),
            rng.standard_normal((2, 3, 4)).astype(np.float32)[:, ::2],    # not contiguous
            np.array([2**63 - 1, 17], np.uint64)]


@pytest.mark.parametrize("name", ["numpy", "numba"])
def test_cpu_backends_upload_each_array_as_from_host(name):
    from zipmoe_rt.backends import get_backend
    be = get_backend(name)
    arrays = _arrays(np.random.default_rng(0))
    got = be.upload(*arrays)
    assert len(got) == len(arrays)
    for a, g in zip(arrays, got):
        g = be.to_host(g)
        assert g.dtype == a.dtype and g.shape == a.shape and np.array_equal(g, a)


@gpu
def test_cuda_uploads_equal_the_host_arrays_through_the_ring():
    """Every array comes back with its dtype, shape and bytes, C-contiguous and 256-byte
    aligned, through more calls than the ring has buffers (each rewritten after its copy left)
    with the host arrays changed between calls; an upload past MAX_BYTES goes through
    cupy.asarray; one copy per call through the ring."""
    import cupy as cp

    from zipmoe_rt.backends import cuda_uploads
    from zipmoe_rt.backends.cupy_cuda import CupyBackend
    be = CupyBackend()
    rng = np.random.default_rng(1)
    held = []
    for i in range(3 * cuda_uploads.RING):
        arrays = _arrays(rng)
        got = be.upload(*arrays)
        held.append((arrays, got))
        for a in arrays:                         # the host arrays may change at once
            if a.size:
                a[...] = 0
    cp.cuda.get_current_stream().synchronize()
    rng = np.random.default_rng(1)
    for arrays, got in held:
        want = _arrays(rng)
        for w, g in zip(want, got):
            assert isinstance(g, cp.ndarray) and g.flags.c_contiguous
            assert g.dtype == w.dtype and g.shape == w.shape
            assert np.array_equal(cp.asnumpy(g), w)
            assert g.size == 0 or g.data.ptr % 256 == 0
    assert be.uploads.copies == 3 * cuda_uploads.RING
    big = np.arange(cuda_uploads.MAX_BYTES // 4 + 1, dtype=np.float32)
    (g,) = be.upload(big)
    assert np.array_equal(cp.asnumpy(g), big) and be.uploads.copies == 3 * cuda_uploads.RING
