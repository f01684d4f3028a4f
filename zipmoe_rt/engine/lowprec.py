"""Low-precision experts and dense tensors of a ``.zmoe`` file: FP8 E4M3 with per-block
``weight_scale_inv`` (DeepSeek-V3's release format; format/SPEC.md §5.1), and MXFP4 experts
(gpt-oss's release format: ``*_blocks`` and their e8m0 ``*_scales``; SPEC §5.4).

Where the dequantisation happens: an FP8 expert is decoded from its bit-planes into its E4M3
bytes (:func:`decode_f8_chunks`, the decode workers' job, like a BF16 expert's), then dequantised
**per expert into float32** when it is finished (:func:`dequantize_roles`, called by
:func:`zipmoe_rt.engine.layout.finish_expert`): the weights the kernels compute with are the
exact products ``e4m3 * scale_inv`` that transformers' ``Fp8Dequantize`` computes (float32, one
rounding). A dense FP8 tensor is dequantised the same way when it is read
(:func:`dequantize_dense`). An MXFP4 expert's blocks are read as they are stored and its
entropy-coded scales decoded (:func:`decode_byte_chunks`), then dequantised per expert into
float32 the same way (exact: an E2M1 value times a power of two). The CUDA backend does not take
these files (:func:`refuse_device`).
"""
from __future__ import annotations

import numpy as np

import zmoe
from zmoe import codec
from zmoe.constants import ENC_MXFP4, EXP_HUFFMAN, EXPONENT_ONLY_DTYPES, NIBBLE_PLANE_DTYPES, Keys
from zmoe.huffman import DECODE_STATUS, table_cache

from ..kernels.lowprec import (EXPONENT_TOO_LARGE, decode_merge_f8_chunks, dequant_fp8,
                               dequant_mxfp4, merge_f8)

#: expert role of a projection's block scales: ``gate`` -> ``gate_scale`` (SPEC §4 roles)
SCALE_SUFFIX = "_scale"
#: suffix of the scale tensor of an FP8 ``...weight`` (DeepSeek-V3's ``weight_scale_inv``)
SCALE_NAME_SUFFIX = "_scale_inv"
FP8 = "F8_E4M3"
TOO_LARGE = "an exponent above 15 in an F8_E4M3 plane"


def fp8_block(metadata: dict) -> tuple | None:
    """``hparams.fp8_block_size`` of a container as ``(rows, cols)``, or None (no FP8)."""
    v = metadata.get(Keys.HParams.FP8_BLOCK_SIZE)
    return None if v is None else (int(v[0]), int(v[1]))


def is_f8(dtype: str) -> bool:
    """Whether a stored dtype is decoded by this module (F8_E4M3)."""
    return dtype in NIBBLE_PLANE_DTYPES


#: roles of an MXFP4 projection: ``<proj>_blocks`` U8 [rows, groups, 16] and ``<proj>_scales``
#: U8 [rows, groups]; dequantised into ``<proj>_cols`` (the [in, out] slice the BF16 layout of
#: gpt-oss stores, :func:`zipmoe_rt.models.weights.assemble_expert`)
BLOCKS, SCALES, COLS = "_blocks", "_scales", "_cols"


def decoded_bytes(p) -> int:
    """Bytes a piece takes once its expert is decoded and dequantised: float32 for an FP8
    projection (4 per weight) and an MXFP4 one (2 weights of 4 bytes per block byte), nothing
    for block scales; -1 for other pieces (their stored dtype's size applies)."""
    if p.role.endswith(SCALE_SUFFIX) or p.role.endswith(SCALES):
        return 0
    if is_f8(p.dtype):
        return 4 * p.elements
    if p.role.endswith(BLOCKS):
        return 8 * p.elements
    return -1


def decode_byte_chunks(path, p, c0: int, c1: int, exp: np.ndarray, out: np.ndarray, dctx,
                       out_of_bounds):
    """Decode chunks ``c0..c1-1`` of an exponent-only U8 piece (MXFP4 scales, SPEC §5.1) into
    their range of ``out`` (uint8): the decoded bytes are the tensor's bytes.

    Raises:
        zmoe.ChecksumError: a chunk does not decode.  zmoe.CorruptIndexError: from
            ``out_of_bounds`` when a chunk or its output range lies outside its buffer.
    """
    offs, sizes, raws, starts = p.chunk_arrays
    for ci in range(c0, c1):
        o, z, n, st = int(offs[ci]), int(sizes[ci]), int(raws[ci]), int(starts[ci])
        if not (0 <= o and o + z <= exp.size and n >= 0 and 0 <= st and st + n <= out.size):
            raise out_of_bounds(path, p, f"exponent chunk {ci}")
        try:
            codec.decompress_chunk(exp[o:o + z], n, p.codec, dctx, out[st:st + n])
        except ValueError as err:
            raise zmoe.ChecksumError(f"{path}: tensor {p.name!r}: exponent chunk {ci} does not "
                                     f"decode ({err})") from None


def decode_f8_chunks(path, p, c0: int, c1: int, sm: np.ndarray, exp: np.ndarray,
                     out: np.ndarray, scratch, dctx, out_of_bounds):
    """Decode exponent chunks ``c0..c1-1`` of the F8_E4M3 piece ``p`` and merge them with their
    nibbles into their range of ``out`` (uint8, the piece's whole tensor). Huffman chunks go
    through one Numba call (:func:`~zipmoe_rt.kernels.lowprec.decode_merge_f8_chunks`).

    Raises:
        zmoe.ChecksumError: a chunk does not decode (names file, tensor, chunk).
        zmoe.CorruptIndexError: from ``out_of_bounds(path, p, what)`` when a chunk, the SM
            bytes or the output range lie outside their buffers (checked before the kernel).
    """
    offs, sizes, raws, starts = p.chunk_arrays
    if not 0 <= c0 < c1 <= len(p.chunks):
        raise out_of_bounds(path, p, f"exponent chunks {c0}..{c1 - 1}")
    a, b = int(starts[c0]), int(starts[c1 - 1] + raws[c1 - 1])
    s0, sn = p.sm[0], p.sm[1]
    o, z, r = offs[c0:c1], sizes[c0:c1], raws[c0:c1]
    if not (0 <= a and 0 <= s0 and s0 + sn <= sm.size and (b + 1) // 2 <= sn and b <= out.size
            and (o >= 0).all() and (z >= 0).all() and (r >= 0).all()
            and (o + z <= exp.size).all() and int(r.sum()) == b - a):
        raise out_of_bounds(path, p, f"exponent chunks {c0}..{c1 - 1} (or their sign+mantissa "
                                     f"bytes)")
    plane = sm[s0:s0 + sn]
    if p.codec == EXP_HUFFMAN:
        tc = table_cache()
        bad, st = decode_merge_f8_chunks(exp, o, z, r, plane, a, out[a:b],
                                         scratch(int(r.max())), tc.keys, tc.ent, tc.len1, tc.state)
        if bad >= 0:
            why = (TOO_LARGE if st == EXPONENT_TOO_LARGE
                   else f"malformed Huffman chunk: {DECODE_STATUS[st]}")
            raise zmoe.ChecksumError(f"{path}: tensor {p.name!r}: exponent chunk {c0 + bad} does "
                                     f"not decode ({why})")
        return
    for ci in range(c0, c1):
        n, st = int(raws[ci]), int(starts[ci])
        try:
            e = codec.decompress_chunk(exp[offs[ci]:offs[ci] + sizes[ci]], n, p.codec, dctx)
        except ValueError as err:
            raise zmoe.ChecksumError(f"{path}: tensor {p.name!r}: exponent chunk {ci} does not "
                                     f"decode ({err})") from None
        if not merge_f8(e, plane, st, out[st:st + n]):
            raise zmoe.ChecksumError(f"{path}: tensor {p.name!r}: exponent chunk {ci} does not "
                                     f"decode ({TOO_LARGE})")


def check_expert(path, lay) -> None:
    """An expert block with FP8 pieces is one :func:`dequantize_roles` can dequantise: every
    F8_E4M3 projection has its F32 ``<role>_scale`` of the block grid's shape, every scale its
    F8_E4M3 projection, and the file gives the block size.

    Raises:
        zmoe.CorruptIndexError: naming the file, the expert block and the role at fault.
    """
    roles = {p.role: p for p in lay.pieces}
    where = f"{path}: expert block {lay.layer}/{lay.expert}"
    for r, p in roles.items():      # MXFP4: blocks [rows, groups, 16] with scales [rows, groups]
        if r.endswith(BLOCKS):
            s = roles.get(r[:-len(BLOCKS)] + SCALES)
            if (s is None or p.dtype != "U8" or s.dtype != "U8" or len(p.shape) != 3
                    or p.shape[2] != 16 or tuple(s.shape) != tuple(p.shape[:2])):
                raise zmoe.CorruptIndexError(
                    f"{where}: tensor {p.name!r}: MXFP4 {r} U8 [rows, groups, 16] needs a U8 "
                    f"role {r[:-len(BLOCKS)]}{SCALES} [rows, groups]"
                    + (f", not {list(s.shape)}" if s is not None else ""))
        elif r.endswith(SCALES) and r[:-len(SCALES)] + BLOCKS not in roles:
            raise zmoe.CorruptIndexError(f"{where}: tensor {p.name!r}: role {r} without a role "
                                         f"{r[:-len(SCALES)]}{BLOCKS}")
    f8 = [r for r, p in roles.items() if is_f8(p.dtype)]
    sc = [r for r in roles if r.endswith(SCALE_SUFFIX)]
    if not f8 and not sc:
        return
    if lay.fp8_block is None:
        raise zmoe.CorruptIndexError(f"{where}: FP8 projections or block scales, but no "
                                     f"{Keys.HParams.FP8_BLOCK_SIZE} in the metadata")
    bm, bn = lay.fp8_block
    for r in f8:
        s = roles.get(r + SCALE_SUFFIX)
        p = roles[r]
        if s is None or s.dtype != "F32" or len(p.shape) != 2:
            raise zmoe.CorruptIndexError(f"{where}: tensor {p.name!r}: an F8_E4M3 {r} "
                                         f"[rows, cols] needs an F32 role {r}{SCALE_SUFFIX}")
        want = (-(-p.shape[0] // bm), -(-p.shape[1] // bn))
        if tuple(s.shape) != want:
            raise zmoe.CorruptIndexError(f"{where}: tensor {s.name!r}: shape {list(s.shape)}, but "
                                         f"{r} {list(p.shape)} in blocks of {[bm, bn]} needs "
                                         f"{list(want)}")
    for r in sc:
        if r[:-len(SCALE_SUFFIX)] not in f8:
            raise zmoe.CorruptIndexError(f"{where}: tensor {roles[r].name!r}: role {r} without "
                                         f"an F8_E4M3 role {r[:-len(SCALE_SUFFIX)]}")


def dequantize_roles(path, where: str, roles: dict, block) -> dict:
    """Replace each FP8 projection of an expert (``{role: array}``, E4M3 bytes as uint8) that
    has a ``<role>_scale`` companion by its float32 dequantisation
    (:func:`~zipmoe_rt.kernels.lowprec.dequant_fp8`); the scale roles are dropped.

    Raises:
        zmoe.CorruptIndexError: a scale without its projection, or a block size missing or not
            fitting the shapes (names the file and the expert block).
    """
    roles = _dequantize_mxfp4(roles)
    scales = {r[:-len(SCALE_SUFFIX)]: roles[r] for r in roles if r.endswith(SCALE_SUFFIX)}
    if not scales:
        return roles
    if block is None:
        raise zmoe.CorruptIndexError(f"{path}: {where}: FP8 block scales, but no "
                                     f"{Keys.HParams.FP8_BLOCK_SIZE} in the metadata")
    out = {r: a for r, a in roles.items() if not r.endswith(SCALE_SUFFIX)}
    for role, s in scales.items():
        q = out.get(role)
        if q is None:
            raise zmoe.CorruptIndexError(f"{path}: {where}: role {role}{SCALE_SUFFIX} without "
                                         f"role {role}")
        try:
            out[role] = dequant_fp8(q.view(np.uint8), s.view(np.float32), block)
        except ValueError as e:
            raise zmoe.CorruptIndexError(f"{path}: {where}: role {role}: {e}") from None
    return out


def _dequantize_mxfp4(roles: dict) -> dict:
    """Each ``<proj>_blocks`` / ``<proj>_scales`` pair of roles replaced by ``<proj>_cols``, the
    float32 dequantised weight [rows, 32 groups] transposed to [in, out] (a view)."""
    if not any(r.endswith(BLOCKS) for r in roles):
        return roles
    out = {r: a for r, a in roles.items() if not (r.endswith(BLOCKS) or r.endswith(SCALES))}
    for r, b in roles.items():
        if r.endswith(BLOCKS):
            base = r[:-len(BLOCKS)]
            out[base + COLS] = dequant_mxfp4(b.view(np.uint8), roles[base + SCALES].view(np.uint8)).T
    return out


def dequantize_dense(path, name: str, q: np.ndarray, scale: np.ndarray, block) -> np.ndarray:
    """A dense F8_E4M3 tensor ``name`` times its ``weight_scale_inv``, float32 (as experts).

    Raises:
        zmoe.CorruptIndexError: no block size in the file, or shapes that do not fit.
    """
    if block is None:
        raise zmoe.CorruptIndexError(f"{path}: tensor {name!r}: FP8 with block scales, but no "
                                     f"{Keys.HParams.FP8_BLOCK_SIZE} in the metadata")
    try:
        return dequant_fp8(q.view(np.uint8), scale.view(np.float32), block)
    except ValueError as e:
        raise zmoe.CorruptIndexError(f"{path}: tensor {name!r}: {e}") from None


def refuse_device(reader, device: str) -> None:
    """Refuse a file with FP8 tensors on a device other than the CPU.

    Raises:
        ValueError: naming the file, the encoding and the first such tensor.
    """
    if device == "cpu":
        return
    for name, t in reader.tensors.items():
        if is_f8(t["dtype"]) or t["encoding"] == ENC_MXFP4:
            raise ValueError(f"{reader.path}: tensor {name!r} is {t['dtype']} "
                             f"({t['encoding']} encoding): FP8 and MXFP4 weights run on the CPU "
                             f"only, not on --device {device}")
