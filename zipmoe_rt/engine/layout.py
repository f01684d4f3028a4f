"""Where each expert's pieces sit inside its two regions (format/SPEC.md §4, §6), and the
decode of an expert from region buffers (the work of one decode task, ZipMoE §3.1).

Offsets are made relative to the region starts once, at load, so a task only slices the
buffers the I/O thread (or a resident tier) handed it.
"""
from __future__ import annotations

import math
import threading
import zlib
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import zstandard as zstd

import zmoe
from zmoe import codec
from zmoe.constants import EXP_HUFFMAN
from zmoe.huffman import DECODE_STATUS, table_cache
from zmoe.reader import NUMPY_DTYPES

from ..kernels.planes import MERGE, decode_merge_bf16_chunks
from ..families.expert_roles import EXPERT_ROLE_SETS, expert_shapes
from ..models.weights import ExpertWeights, assemble_expert
from . import lowprec


@dataclass(frozen=True)
class Piece:
    """One tensor (or stacked slice) of an expert.

    Attributes:
        name: tensor name (for error messages).  role: gate/up/down/gate_up.
        dtype: stored dtype.  shape: this expert's shape.
        sm: (offset in SM region, size, crc32); for a raw piece, its raw bytes.
        chunks: ((offset in exp region, size, raw_size, crc32), ...); empty for a raw piece.
        codec: exponent-chunk codec, ``huffman`` or ``zstd`` (SPEC §5.2); None for a raw piece.
    """

    name: str
    role: str
    dtype: str
    shape: tuple
    sm: tuple
    chunks: tuple
    codec: str | None = None

    @property
    def raw(self) -> bool:
        return not self.chunks

    @property
    def elements(self) -> int:
        return math.prod(map(int, self.shape))

    @cached_property
    def chunk_arrays(self) -> tuple:
        """int64 arrays ``(offsets, sizes, raw_sizes, starts)`` of the exponent chunks, for the
        multi-chunk kernel (``starts``: first element of each chunk in the tensor)."""
        a = np.array([c[:3] for c in self.chunks], np.int64).reshape(-1, 3)
        starts = np.concatenate(([0], np.cumsum(a[:, 2])[:-1])).astype(np.int64)
        return a[:, 0].copy(), a[:, 1].copy(), a[:, 2].copy(), starts


@dataclass(frozen=True)
class ExpertLayout:
    """An expert block: absolute region ranges and its pieces."""

    layer: int
    expert: int
    sm_region: tuple     # (offset, size)
    exp_region: tuple    # (offset, size)
    pieces: tuple
    fp8_block: tuple | None = None   # (rows, cols) of the FP8 block scales (engine/lowprec.py)
    #: MXFP4 projections held as BF16 words (the compact form of ``--device cuda``)
    mxfp4_bf16: bool = False

    @property
    def full_bytes(self) -> int:
        """Bytes of the decoded expert (tier F); FP8 and MXFP4 projections count as the float32
        weights they are dequantised into (MXFP4 ones as BF16 words with ``mxfp4_bf16``), their
        block scales as nothing."""
        return sum(lowprec.decoded_bytes(p, self.mxfp4_bf16)
                   if lowprec.decoded_bytes(p) >= 0
                   else p.elements * np.dtype(NUMPY_DTYPES[p.dtype]).itemsize
                   for p in self.pieces)

    @property
    def elements(self) -> int:
        return sum(p.elements for p in self.pieces)

    @cached_property
    def jobs(self) -> tuple:
        """The expert's decode jobs, :func:`decode_jobs` with the default size (computed once)."""
        return tuple(decode_jobs(self))

    @cached_property
    def shape_key(self) -> tuple:
        """(elements, dtype, raw) per piece: experts with equal keys decode into equal arrays."""
        return tuple((p.elements, p.dtype, p.raw) for p in self.pieces)


def check_expert(path, lay: "ExpertLayout"):
    """An expert block holds what :func:`~zipmoe_rt.models.weights.assemble_expert` builds a
    SwiGLU expert from (SPEC §4 roles; the converter's own rule): ``down`` [H, I], and
    ``gate`` and ``up`` [I, H] each or ``gate_up`` [2I, H]. The index validator does not know
    roles (other tensors may ride along in a block); the runtime does.

    Raises:
        zmoe.CorruptIndexError: naming the file, the block and the tensor or role at fault.
    """
    roles = {p.role: p for p in lay.pieces}
    where = f"{path}: expert block {lay.layer}/{lay.expert}"
    if not any(want <= roles.keys() for want in EXPERT_ROLE_SETS):
        raise zmoe.CorruptIndexError(f"{where}: tensors: roles {sorted(roles)}: an expert needs "
                                     f"down, and gate and up or gate_up (SPEC §4)")
    try:
        want = expert_shapes({r: tuple(p.shape) for r, p in roles.items()})
    except ValueError as e:
        down = roles.get("down_cols", roles.get("down"))
        raise zmoe.CorruptIndexError(f"{where}: tensor {down.name!r}: shape: {e}") from None
    for role, shape in want.items():
        if tuple(roles[role].shape) != shape:
            raise zmoe.CorruptIndexError(
                f"{where}: tensor {roles[role].name!r}: shape: {role} {list(roles[role].shape)}, "
                f"but the down projection needs {list(shape)}")


def expert_layouts(reader: zmoe.ZmoeReader) -> dict:
    """``{(layer, expert): ExpertLayout}`` for every expert block of a file.

    Raises:
        zmoe.CorruptIndexError: a block that is not a SwiGLU expert (:func:`check_expert`).
    """
    out = {}
    block = lowprec.fp8_block(reader.metadata)
    for (layer, e), b in reader.experts.items():
        sm0, ex0 = b["sm"][0], b["exp"][0]
        pieces = []
        for name in b["tensors"]:
            t = reader.tensors[name]
            stacked = t["expert"].get("stacked", False)
            part = t["parts"][e] if stacked else t["parts"][0]
            shape = tuple(t["shape"][1:] if stacked else t["shape"])
            if "raw" in part:
                o, n, c = part["raw"]
                pieces.append(Piece(name, t["expert"]["role"], t["dtype"], shape, (o - sm0, n, c), ()))
            else:
                o, n, c = part["sm"]
                chunks = tuple((co - ex0, cn, raw, cc) for co, cn, raw, cc in part["exp"])
                pieces.append(Piece(name, t["expert"]["role"], t["dtype"], shape, (o - sm0, n, c), chunks,
                                    t["exp_codec"]))
        out[(layer, e)] = lay = ExpertLayout(layer, e, tuple(b["sm"]), tuple(b["exp"]),
                                             tuple(pieces), block)
        check_expert(reader.path, lay)
        lowprec.check_expert(reader.path, lay)
    return out


def check_regions(path, lay: ExpertLayout, sm: np.ndarray | None, exp: np.ndarray | None):
    """CRC-32 of every piece inside the given region buffers.

    Raises:
        zmoe.ChecksumError: naming the file, tensor and piece.
    """
    for p in lay.pieces:
        if sm is not None:
            o, n, c = p.sm
            if zlib.crc32(sm[o:o + n]) & 0xFFFFFFFF != c:
                what = "raw data" if p.raw else "sign+mantissa plane"
                raise zmoe.ChecksumError(f"{path}: tensor {p.name!r}: {what} fails its CRC-32 "
                                         f"(corrupt file)")
        if exp is not None:
            for i, (o, n, _, c) in enumerate(p.chunks):
                if zlib.crc32(exp[o:o + n]) & 0xFFFFFFFF != c:
                    raise zmoe.ChecksumError(f"{path}: tensor {p.name!r}: exponent chunk {i} "
                                             f"fails its CRC-32 (corrupt file)")


def alloc_expert(lay: ExpertLayout) -> list:
    """Empty output arrays (one per piece) for a decoded expert."""
    return [np.empty(p.elements, MERGE[p.dtype][2] if not p.raw and p.dtype in MERGE
                     else NUMPY_DTYPES[p.dtype])
            for p in lay.pieces]


_tls = threading.local()


def _scratch(n: int) -> np.ndarray:
    """This thread's reusable uint8 buffer of at least ``n`` bytes (decoded exponents)."""
    buf = getattr(_tls, "exp", None)
    if buf is None or buf.size < n:
        buf = _tls.exp = np.empty(max(n, 1 << 20), np.uint8)
    return buf[:n]


def _out_of_bounds(path, p: Piece, what: str):
    """The error for kernel arguments that would leave their buffers: the index that
    :func:`zmoe.validate.check_index` accepted cannot produce them, so a Piece or region
    buffer was built around it (or the validator has a gap); never hand them to a kernel."""
    return zmoe.CorruptIndexError(f"{path}: tensor {p.name!r}: {what} lies outside its region "
                                  f"buffer (refused before decoding; SPEC §9)")


def decode_chunk(path, p: Piece, i: int, sm: np.ndarray, exp: np.ndarray, out: np.ndarray,
                 start: int, dctx: zstd.ZstdDecompressor):
    """Decode exponent chunk ``i`` of piece ``p`` (:func:`zmoe.codec.decompress_chunk`: Huffman
    chunks in a Numba kernel into a per-thread buffer, zstd chunks with ``dctx``) and merge it
    with its SM bytes into ``out[start:start+raw_size]``. Decode and merge release the GIL.

    Raises:
        zmoe.ChecksumError: the chunk does not decode to its recorded size.
        zmoe.CorruptIndexError: the chunk, its SM bytes or its output range lie outside ``exp``,
            ``sm`` or ``out`` (the merge kernel's preconditions, checked before the call).
    """
    o, n, raw, _ = p.chunks[i]
    merge, smb, _ = MERGE[p.dtype]
    s0 = p.sm[0] + start * smb
    if not (0 <= o <= o + n <= exp.size and raw >= 0 and 0 <= s0 and s0 + raw * smb <= sm.size
            and 0 <= start and start + raw <= out.size):
        raise _out_of_bounds(path, p, f"exponent chunk {i} (or its sign+mantissa bytes)")
    try:
        e = codec.decompress_chunk(exp[o:o + n], raw, p.codec, dctx,
                                   _scratch(raw) if p.codec == EXP_HUFFMAN else None)
    except ValueError as err:
        raise zmoe.ChecksumError(f"{path}: tensor {p.name!r}: exponent chunk {i} does not "
                                 f"decode ({err})") from None
    if e.size != raw:   # decompress_chunk guarantees it; the kernel reads e.size exponents
        raise _out_of_bounds(path, p, f"exponent chunk {i}'s decoded exponents")
    merge(e, sm[s0:s0 + raw * smb], out[start:start + raw])


#: a decode job covers consecutive chunks of one tensor up to about this many weights, so that
#: the Python work of a job (queueing, slicing, timing) stays small beside its decode
JOB_ELEMENTS = 1 << 20


def decode_jobs(lay: ExpertLayout, job_elements: int = JOB_ELEMENTS):
    """[(piece index, first chunk, end chunk)] covering every exponent chunk of an expert: runs
    of consecutive chunks of one tensor, each with at most ``job_elements`` weights unless a
    single chunk is larger (the decode workers' unit of work, ZipMoE §3.1 / §4)."""
    jobs = []
    for pi, p in enumerate(lay.pieces):
        c0, acc = 0, 0
        for ci, (_, _, raw, _) in enumerate(p.chunks):
            if ci > c0 and acc + raw > job_elements:
                jobs.append((pi, c0, ci))
                c0, acc = ci, 0
            acc += raw
        if p.chunks:
            jobs.append((pi, c0, len(p.chunks)))
    return jobs


def decode_chunks(path, p: Piece, c0: int, c1: int, sm: np.ndarray, exp: np.ndarray,
                  out: np.ndarray, dctx: zstd.ZstdDecompressor):
    """Decode exponent chunks ``c0..c1-1`` of piece ``p`` and merge them with their SM bytes
    into their range of ``out`` (the piece's whole decoded tensor, flat). BF16 Huffman chunks
    go through one Numba call for all of them (:func:`~zipmoe_rt.kernels.planes.
    decode_merge_bf16_chunks`, no Python between chunks); others chunk by chunk
    (:func:`decode_chunk`). Releases the GIL while decoding.

    Raises:
        zmoe.ChecksumError: a chunk does not decode to its recorded size (names file, tensor,
            chunk).
        zmoe.CorruptIndexError: a chunk, the SM bytes or the output range lie outside ``exp``,
            ``sm`` or ``out`` (the kernels' preconditions, checked before the call).
    """
    if lowprec.is_f8(p.dtype):
        return lowprec.decode_f8_chunks(path, p, c0, c1, sm, exp, out, _scratch, dctx,
                                        _out_of_bounds)
    if p.dtype in lowprec.EXPONENT_ONLY_DTYPES:
        return lowprec.decode_byte_chunks(path, p, c0, c1, exp, out, dctx, _out_of_bounds)
    offs, sizes, raws, starts = p.chunk_arrays
    if p.codec != EXP_HUFFMAN or p.dtype != "BF16":
        for ci in range(c0, c1):
            decode_chunk(path, p, ci, sm, exp, out, int(starts[ci]), dctx)
        return
    if not 0 <= c0 < c1 <= len(p.chunks):
        raise _out_of_bounds(path, p, f"exponent chunks {c0}..{c1 - 1}")
    a = int(starts[c0])
    b = int(starts[c1 - 1] + raws[c1 - 1])
    tc = table_cache()
    s0 = p.sm[0]
    # decode_merge_bf16_chunks's preconditions (kernels/planes.py): every chunk inside exp, the
    # raws >= 0 and consecutive, and sm / out holding exactly their sum from a
    o, z, r = offs[c0:c1], sizes[c0:c1], raws[c0:c1]
    if not (0 <= a and 0 <= s0 and s0 + b <= sm.size and b <= out.size and (o >= 0).all()
            and (z >= 0).all() and (r >= 0).all() and (o + z <= exp.size).all()
            and int(r.sum()) == b - a):
        raise _out_of_bounds(path, p, f"exponent chunks {c0}..{c1 - 1} (or their sign+mantissa "
                                      f"bytes)")
    bad, st = decode_merge_bf16_chunks(exp, offs[c0:c1], sizes[c0:c1], raws[c0:c1],
                                       sm[s0 + a:s0 + b], out[a:b], _scratch(int(raws[c0:c1].max())),
                                       tc.keys, tc.ent, tc.len1, tc.state)
    if bad >= 0:
        raise zmoe.ChecksumError(f"{path}: tensor {p.name!r}: exponent chunk {c0 + bad} does not "
                                 f"decode (malformed Huffman chunk: {DECODE_STATUS[st]})")


def decode_expert(path, lay: ExpertLayout, sm: np.ndarray, exp: np.ndarray,
                  dctx: zstd.ZstdDecompressor) -> ExpertWeights:
    """Rebuild a whole expert on this thread from its region buffers (every chunk in order).

    Raises:
        zmoe.ChecksumError: a chunk does not decode to its recorded size.
    """
    outs = alloc_expert(lay)
    for pi, c0, c1 in lay.jobs:
        decode_chunks(path, lay.pieces[pi], c0, c1, sm, exp, outs[pi], dctx)
    return finish_expert(lay, outs, sm)


def finish_expert(lay: ExpertLayout, outs: list, sm: np.ndarray) -> ExpertWeights:
    """Shape decoded outputs (raw pieces are copied out of the SM buffer) into weights."""
    roles = {}
    for p, out in zip(lay.pieces, outs):
        if p.raw:
            o, n, _ = p.sm
            out[...] = sm[o:o + n].view(out.dtype)
        roles[p.role] = out.view(NUMPY_DTYPES[p.dtype]).reshape(p.shape)
    roles = lowprec.dequantize_roles("", f"expert block {lay.layer}/{lay.expert}", roles,
                                     lay.fp8_block)
    return assemble_expert(roles)
