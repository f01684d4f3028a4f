"""MXFP4 (OCP microscaling; gpt-oss's expert release format: ``*_blocks`` uint8 with two E2M1
codes per byte, low nibble first, and ``*_scales`` uint8 e8m0 per 32 values): the dequantising
kernels against a NumPy reference of the format and against transformers' own
``convert_moe_packed_tensors``, every code and scale exactly."""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.kernels.lowprec import E2M1_TO_F32, dequant_mxfp4, mxfp4_linear


def reference(blocks: np.ndarray, scales: np.ndarray) -> np.ndarray:
    """float64 NumPy reference: value of code c is (-1)^(c>>3) * {0, .5, 1, 1.5, 2, 3, 4, 6}[c&7],
    times 2^(scale - 127); codes in byte order, low nibble first."""
    mag = np.array([0, .5, 1, 1.5, 2, 3, 4, 6])
    codes = np.stack([blocks & 15, blocks >> 4], axis=-1).reshape(*blocks.shape[:-1], -1)
    v = np.where(codes >> 3, -1.0, 1.0) * mag[codes & 7]
    v = v * np.exp2(scales.astype(np.float64) - 127)[..., None]
    return v.reshape(blocks.shape[0], -1)


def test_value_table_is_e2m1():
    assert E2M1_TO_F32.tolist() == [0, .5, 1, 1.5, 2, 3, 4, 6, -0., -.5, -1, -1.5, -2, -3, -4, -6]
    assert np.signbit(E2M1_TO_F32[8])


def test_every_code_and_scale_is_exact():
    blocks = np.arange(256, dtype=np.uint8).reshape(16, 1, 16).repeat(254, axis=1)
    scales = np.tile(np.arange(1, 255, dtype=np.uint8), (16, 1))      # 2^-126 .. 2^127
    got = dequant_mxfp4(blocks, scales)
    want = reference(blocks, scales)
    assert got.shape == (16, 254 * 32) and got.dtype == np.float32
    fits = np.abs(want) <= np.finfo(np.float32).max
    assert np.array_equal(got[fits].astype(np.float64), want[fits])   # exact: no rounding
    assert np.isinf(got[~fits]).all() and (~fits).sum() > 0          # 2^127 * {2, 3, 4, 6}
    assert np.array_equal(np.signbit(got), np.signbit(want))          # -0.0 kept


def test_extreme_scales_follow_ldexp():
    blocks = np.full((1, 2, 16), 0x72, np.uint8)     # codes 2 (1.0) and 7 (6.0)
    got = dequant_mxfp4(blocks, np.array([[0, 255]], np.uint8))
    assert got[0, 0] == np.float32(2.0 ** -127) and got[0, 1] == np.float32(6 * 2.0 ** -127)
    assert np.isinf(got[0, 32]) and np.isinf(got[0, 33])        # 2^128 overflows float32


def test_matches_transformers_convert_moe_packed_tensors():
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.integrations.mxfp4 import convert_moe_packed_tensors

    rng = np.random.default_rng(0)
    E, rows, groups = 3, 8, 4
    blocks = rng.integers(0, 256, (E, rows, groups, 16)).astype(np.uint8)
    scales = rng.integers(110, 135, (E, rows, groups)).astype(np.uint8)
    ref = convert_moe_packed_tensors(torch.from_numpy(blocks), torch.from_numpy(scales),
                                     dtype=torch.float32).numpy()        # [E, in, out]
    for e in range(E):
        got = dequant_mxfp4(blocks[e], scales[e])                         # [out, in]
        assert got.T.tobytes() == np.ascontiguousarray(ref[e]).tobytes()


def test_linear_dequantises_inside_the_loop():
    rng = np.random.default_rng(1)
    blocks = rng.integers(0, 256, (24, 3, 16)).astype(np.uint8)
    scales = rng.integers(120, 130, (24, 3)).astype(np.uint8)
    x = rng.standard_normal((5, 96)).astype(np.float32)
    w = dequant_mxfp4(blocks, scales)
    got = mxfp4_linear(x, blocks, scales)
    assert got.shape == (5, 24) and got.dtype == np.float32
    np.testing.assert_allclose(got, x.astype(np.float64) @ w.T.astype(np.float64), rtol=1e-5,
                               atol=1e-5)
    # same products, summed in input order in float32
    want = np.zeros((5, 24), np.float32)
    for c in range(96):
        want += x[:, c:c + 1] * w[:, c]
    assert got.tobytes() == want.tobytes()


def test_shape_errors_name_the_shapes():
    with pytest.raises(ValueError, match=r"blocks \[4, 2, 16\] must be \[rows, groups, bytes\] "
                                         r"and scales \[4, 3\]"):
        dequant_mxfp4(np.zeros((4, 2, 16), np.uint8), np.zeros((4, 3), np.uint8))
    with pytest.raises(ValueError, match=r"x \[1, 32\], blocks \[4, 2, 16\]"):
        mxfp4_linear(np.zeros((1, 32), np.float32), np.zeros((4, 2, 16), np.uint8),
                     np.zeros((4, 2), np.uint8))
