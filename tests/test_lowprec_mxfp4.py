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


# ------------------------------------------------------------------ container (SPEC §5.4)


def _mx_expert(rng, rows=64, groups=4):
    import zmoe
    blocks = rng.integers(0, 256, (rows, groups, 16)).astype(np.uint8)
    scales = (120 + rng.integers(0, 8, (rows, groups)) // 3).astype(np.uint8)   # few values
    return blocks, scales, [
        zmoe.ExpertPiece("x.blocks", "U8", blocks.shape, "down_blocks", blocks,
                         encoding="mxfp4"),
        zmoe.ExpertPiece("x.scales", "U8", scales.shape, "down_scales", scales,
                         encoding="bitplane")]


@pytest.mark.parametrize("exp_codec", ["huffman", "zstd"])
def test_blocks_keep_their_bytes_and_scales_are_entropy_coded(tmp_path, exp_codec):
    import zmoe
    rng = np.random.default_rng(2)
    blocks, scales, pieces = _mx_expert(rng, rows=512)
    p = tmp_path / "m.zmoe"
    with zmoe.ZmoeWriter(p) as w:
        w.write_expert(zmoe.encode_expert(0, 0, pieces, exp_codec=exp_codec))
    with zmoe.ZmoeReader(p) as r:
        assert r.header.version == 3
        b, s = r.tensors["x.blocks"], r.tensors["x.scales"]
        assert (b["encoding"], b["dtype"], s["encoding"], s["dtype"]) == (
            "mxfp4", "U8", "bitplane", "U8")
        assert b["parts"][0]["raw"][1] == blocks.size                 # the source bytes
        assert s["parts"][0]["sm"][1] == 0                             # exponents only
        stored = sum(c[1] for c in s["parts"][0]["exp"])
        assert stored < scales.size / 2                                # ~1.6 bits per scale
        assert r.read_tensor("x.blocks").tobytes() == blocks.tobytes()
        assert r.read_tensor("x.scales").tobytes() == scales.tobytes()
        r.verify()


def test_mxfp4_encoding_needs_u8_blocks_of_16_and_version_3(tmp_path):
    import zmoe
    from zmoe_edit import mutate, set_version
    with pytest.raises(ValueError, match="encoding 'mxfp4' of a BF16 tensor"):
        zmoe.encode_expert(0, 0, [zmoe.ExpertPiece("x", "BF16", (4,), "down", np.zeros(4, np.uint16),
                                                   encoding="mxfp4")])
    _, _, pieces = _mx_expert(np.random.default_rng(0))
    p = tmp_path / "m.zmoe"
    with zmoe.ZmoeWriter(p) as w:
        w.write_expert(zmoe.encode_expert(0, 0, pieces))
    mutate(p, p, lambda b: set_version(b, 2))
    with pytest.raises(zmoe.CorruptIndexError, match=r"tensor 'x.blocks'.*mxfp4 blocks are U8 "
                                                     r"\[..., 16\] from version 3"):
        zmoe.ZmoeReader(p)


def test_runtime_decodes_scales_and_dequantises_blocks(tmp_path):
    """The runtime's decode of an expert block with MXFP4 roles (engine/layout.py): the blocks
    come out as stored, the entropy-coded scales decode to their bytes, and the pair becomes the
    float32 [in, out] weight ``<proj>_cols`` (the layout gpt-oss's expert assembly takes)."""
    import zstandard as zstd

    import zmoe
    from zipmoe_rt.engine import layout as L_
    from zipmoe_rt.engine import lowprec

    rng = np.random.default_rng(4)
    blocks, scales, pieces = _mx_expert(rng, rows=96, groups=2)
    bf = [zmoe.ExpertPiece(f"x.{r}", "BF16", s, r, rng.integers(0, 1 << 15, s).astype(np.uint16))
          for r, s in (("gate", (4, 8)), ("up", (4, 8)), ("down", (8, 4)))]
    p = tmp_path / "m.zmoe"
    with zmoe.ZmoeWriter(p) as w:
        w.write_expert(zmoe.encode_expert(0, 0, bf + pieces))
    with zmoe.ZmoeReader(p) as r:
        lay = L_.expert_layouts(r)[(0, 0)]
        sm, exp = np.array(r.view(*lay.sm_region)), np.array(r.view(*lay.exp_region))
    assert lay.full_bytes == 3 * 32 * 2 + blocks.size * 8        # BF16, float32 blocks, no scales
    outs = L_.alloc_expert(lay)
    for pi, c0, c1 in lay.jobs:
        L_.decode_chunks(p, lay.pieces[pi], c0, c1, sm, exp, outs[pi], zstd.ZstdDecompressor())
    got = {}
    for piece, out in zip(lay.pieces, outs):
        if piece.raw:
            o, n, _ = piece.sm
            out[...] = sm[o:o + n].view(out.dtype)
        got[piece.role] = out.view(zmoe.NUMPY_DTYPES[piece.dtype]).reshape(piece.shape)
    assert got["down_blocks"].tobytes() == blocks.tobytes()
    assert got["down_scales"].tobytes() == scales.tobytes()
    roles = lowprec.dequantize_roles(p, "expert block 0/0", got, None)
    assert sorted(roles) == ["down", "down_cols", "gate", "up"]
    assert roles["down_cols"].shape == (64, 96)
    assert roles["down_cols"].T.tobytes() == dequant_mxfp4(blocks, scales).tobytes()


def test_blocks_without_their_scales_are_refused(tmp_path):
    import zmoe
    from zipmoe_rt.engine import layout as L_

    rng = np.random.default_rng(4)
    _, _, pieces = _mx_expert(rng)
    bf = [zmoe.ExpertPiece(f"x.{r}", "BF16", s, r, np.zeros(s, np.uint16))
          for r, s in (("gate", (4, 8)), ("up", (4, 8)), ("down", (8, 4)))]
    p = tmp_path / "m.zmoe"
    with zmoe.ZmoeWriter(p) as w:
        w.write_expert(zmoe.encode_expert(0, 0, bf + pieces[:1]))
    with zmoe.ZmoeReader(p) as r, pytest.raises(
            zmoe.CorruptIndexError, match=r"expert block 0/0: tensor 'x.blocks': MXFP4 "
                                          r"down_blocks U8 \[rows, groups, 16\] needs a U8 role "
                                          r"down_scales"):
        L_.expert_layouts(r)
