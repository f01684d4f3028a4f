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
float32 the same way (exact: an E2M1 value times a power of two).

On the GPU (``--device cuda``) the same float32 values are held in a compute form the CUDA
backend's ops take (:func:`compute_form`, :func:`expert_compute_form`): BF16 words where every
value of the tensor round-trips through BF16 exactly (MXFP4 experts: an E2M1 value times a
power of two), float32 otherwise (FP8 with F32 block scales, generally). The source applies it
when asked (``ZmoeSource(lowprec_form="compact")``); :func:`refuse_device` refuses the
combinations that do not run.
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


def decoded_bytes(p, mxfp4_bf16: bool = False) -> int:
    """Bytes a piece takes once its expert is decoded and dequantised: float32 for an FP8
    projection (4 per weight) and an MXFP4 one (2 weights of 4 bytes per block byte; with
    ``mxfp4_bf16``, the compact form's BF16 words, 2 weights of 2 bytes: :func:`compute_form`
    of an E2M1 value times a power of two is always BF16), nothing for block scales; -1 for
    other pieces (their stored dtype's size applies)."""
    if p.role.endswith(SCALE_SUFFIX) or p.role.endswith(SCALES):
        return 0
    if is_f8(p.dtype):
        return 4 * p.elements
    if p.role.endswith(BLOCKS):
        return (4 if mxfp4_bf16 else 8) * p.elements
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


#: the forms :class:`~zipmoe_rt.engine.store.ZmoeSource` holds FP8 / MXFP4 weights in:
#: ``float32`` (the CPU kernels) or ``compact`` (BF16 words where exact, else float32: the GPU)
LOWPREC_FORMS = ("float32", "compact")


def bf16_exact(a: np.ndarray) -> bool:
    """Whether every value of the float32 array ``a`` round-trips through BF16 bit for bit:
    the low 16 bits of every word are zero (judged on the bits, so NaN payloads, infinities,
    -0.0 and subnormals are judged exactly). False for any other dtype."""
    return a.dtype == np.float32 and not (a.view(np.uint32) & 0xFFFF).any()


def compute_form(a: np.ndarray) -> np.ndarray:
    """A dequantised weight in the form the GPU holds it: when :func:`bf16_exact`, its BF16
    words (uint16, the high half of each float32 word, same shape, C-contiguous: 2 bytes per
    weight, computed by the BF16 kernels), else ``a`` itself (float32, 4 bytes per weight).
    Either way the float32 value of every weight is the one the CPU path multiplies with."""
    if bf16_exact(a):
        return (np.ascontiguousarray(a).view(np.uint32) >> 16).astype(np.uint16)
    return a


def expert_compute_form(w):
    """An expert (:class:`~zipmoe_rt.models.weights.ExpertWeights`) of dequantised weights in
    the GPU's form: gate, up and down as BF16 words when all three are :func:`bf16_exact`
    (the fused expert kernels take one dtype per expert), else unchanged; biases (stored
    BF16 in gpt-oss's release) are kept as they are."""
    from ..models.weights import ExpertWeights
    mats = (w.gate, w.up, w.down)
    if not all(bf16_exact(a) for a in mats):
        return w
    return ExpertWeights(*(compute_form(a) for a in mats), w.gate_bias, w.up_bias, w.down_bias)


def is_lowprec_expert(lay) -> bool:
    """Whether an expert layout holds FP8 projections or MXFP4 blocks (dequantised at decode)."""
    return any(is_f8(p.dtype) or p.role.endswith(BLOCKS) for p in lay.pieces)


#: backends that run FP8 and MXFP4 weights (the CPU ones with float32 weights, CUDA with
#: :func:`compute_form`)
LOWPREC_BACKENDS = ("cpu", "numba", "numpy", "cuda")


def refuse_device(reader, device: str, resident: str = "full") -> None:
    """Refuse a file with FP8 or MXFP4 tensors on a backend that does not run them: any other
    than :data:`LOWPREC_BACKENDS`, and ``cuda`` with ``resident="compressed"`` (the packed
    compute form holds BF16 bit-planes only).

    Args:
        reader: the file's :class:`zmoe.ZmoeReader`.  device: the backend's name (``numba``,
            ``numpy``, ``cuda``) or ``cpu``.  resident: the ``resident`` option.
    Raises:
        ValueError: naming the file, the encoding, the first such tensor and the option.
    """
    if device in LOWPREC_BACKENDS and not (device == "cuda" and resident == "compressed"):
        return
    for name, t in reader.tensors.items():
        if is_f8(t["dtype"]) or t["encoding"] == ENC_MXFP4:
            what = f"{reader.path}: tensor {name!r} is {t['dtype']} ({t['encoding']} encoding)"
            if device == "cuda":
                raise ValueError(f"{what}: FP8 and MXFP4 weights on --device cuda are held "
                                 f"decoded (BF16 or float32), not with --resident compressed; "
                                 f"use --resident full")
            raise ValueError(f"{what}: FP8 and MXFP4 weights run on the CPU and CUDA only, "
                             f"not on --device {device}")
