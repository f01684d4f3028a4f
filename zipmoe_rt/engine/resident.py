"""Admission of experts into the compute form (``--resident compressed``; design note §6.5).

An expert is read in its storage form (Huffman-coded exponent chunks + raw sign+mantissa plane,
format/SPEC.md §5), its exponent chunks are decoded into a byte plane (never merged into BF16
words), and each BF16 tensor is transcoded into a
:class:`~zipmoe_rt.models.packed.PackedMatrix`: a 4-bit index into the window of 15 exponents
that holds most of the tensor, an escape list for the others, and the sign+mantissa plane as
read. Experts with pieces that are not BF16 bit-planes (F16, F32, raw) are decoded as usual and
kept as :class:`~zipmoe_rt.models.weights.ExpertWeights`.
"""
from __future__ import annotations

import math

import numpy as np
import zmoe
from zmoe import codec

from ..kernels.packed import pack_plane, unpack_bf16
from ..kernels.transcode import split_bf16_into
from ..models.packed import PackedExpert, PackedMatrix
from . import layout as L_

__all__ = ["RESIDENT_MODES", "check_resident", "pack_planes", "pack_bf16", "unpack_bf16",
           "pack_expert", "packable", "exponent_plane", "pack_piece", "compute_form_bytes"]

#: ``full``: experts kept as decoded weights (BF16); ``compressed``: kept in the compute form.
RESIDENT_MODES = ("full", "compressed")


def check_resident(value) -> str:
    """The resident mode named by ``value`` (``full`` or ``compressed``).

    Raises:
        ValueError: any other value, naming the option and the accepted values.
    """
    if value not in RESIDENT_MODES:
        raise ValueError(f"resident (--resident): {value!r} is not one of "
                         f"{', '.join(RESIDENT_MODES)}")
    return value


def pack_planes(exp: np.ndarray, sm: np.ndarray, shape, alloc=None) -> PackedMatrix:
    """A BF16 matrix's compute form from its two planes.

    Args:
        exp: uint8 [out * in] exponent plane.  sm: uint8 [out * in] sign+mantissa plane (kept
            as a view, not copied).  shape: ``(out, in)``.
        alloc: allocator of the index array (:func:`~zipmoe_rt.kernels.transcode.pack_plane`).
    Returns:
        :class:`~zipmoe_rt.models.packed.PackedMatrix`.
    Raises:
        ValueError: a plane of the wrong size.
    """
    rows, cols = (int(s) for s in shape)
    sm = np.asarray(sm, np.uint8).reshape(-1)
    if sm.size != rows * cols:
        raise ValueError(f"pack_planes: sign+mantissa plane of {sm.size} bytes for a "
                         f"[{rows}, {cols}] matrix")
    base, nib, ptr, col, val = pack_plane(exp, rows, cols, alloc=alloc)
    return PackedMatrix((rows, cols), base, nib, sm.reshape(rows, cols), ptr, col, val)


def pack_bf16(w: np.ndarray) -> PackedMatrix:
    """The compute form of BF16 bits ``w`` (uint16 ``[out, in]``), split into planes as the
    converter does (format/SPEC.md §5.1). For tests and tools.

    Raises:
        ValueError: ``w`` not a 2-D uint16 array.
    """
    if w.dtype != np.uint16 or w.ndim != 2:
        raise ValueError(f"pack_bf16: wants uint16 [out, in] BF16 bits, got {w.dtype} {w.shape}")
    exp, sm = codec.split_planes(np.ascontiguousarray(w).reshape(-1), "BF16")
    return pack_planes(exp, sm, w.shape)


#: the roles the compute form holds: [out, in] matrices without biases (gpt-oss's in x out
#: slices and biased experts are kept decoded)
PACKABLE_ROLES = ("gate", "up", "down", "gate_up")


def packable(lay: L_.ExpertLayout, raw: bool = False) -> bool:
    """Whether every piece of an expert is a BF16 bit-plane tensor of a role in
    :data:`PACKABLE_ROLES` (what the compute form holds); with ``raw``, raw BF16 pieces
    (``--expert-encoding raw`` files, split at admission) count too."""
    return all(p.dtype == "BF16" and (raw or not p.raw) and p.role in PACKABLE_ROLES
               for p in lay.pieces)


def exponent_plane(path, p: L_.Piece, exp: np.ndarray, dctx, plane=None) -> np.ndarray:
    """Piece ``p``'s exponent chunks decoded into one uint8 plane (never merged into BF16).

    Args:
        path: the model file (messages).  p: a bit-plane piece.  exp: its exponent region
            buffer.  dctx: a zstd decompressor (zstd-coded chunks).
        plane: uint8 [p.elements] to decode into (default: a new array).
    Raises:
        zmoe.ChecksumError: a chunk that does not decode to its recorded size.
        zmoe.CorruptIndexError: a chunk outside the exponent region.
    """
    if plane is None:
        plane = np.empty(p.elements, np.uint8)
    if plane.size != p.elements:
        raise ValueError(f"exponent_plane: {plane.size} bytes for {p.elements} exponents")
    pos = 0
    for i, (o, n, raw, _) in enumerate(p.chunks):
        if not (0 <= o <= o + n <= exp.size and 0 <= raw and pos + raw <= plane.size):
            raise zmoe.CorruptIndexError(f"{path}: tensor {p.name!r}: exponent chunk {i} lies "
                                         f"outside its region buffer (SPEC §9)")
        try:
            codec.decompress_chunk(exp[o:o + n], raw, p.codec, dctx, plane[pos:pos + raw])
        except ValueError as err:
            raise zmoe.ChecksumError(f"{path}: tensor {p.name!r}: exponent chunk {i} does not "
                                     f"decode ({err})") from None
        pos += raw
    if pos != plane.size:
        raise zmoe.CorruptIndexError(f"{path}: tensor {p.name!r}: exponent chunks hold {pos} of "
                                     f"{plane.size} exponents (SPEC §9)")
    return plane


def pack_piece(path, p: L_.Piece, sm: np.ndarray, exp: np.ndarray | None, dctx,
               scratch=None, alloc=None) -> dict:
    """One piece of an expert in the compute form: ``{role: PackedMatrix}`` (``gate_up``, the
    fused layout of transformers with gate rows first, gives ``gate`` and ``up``).

    A bit-plane piece decodes its exponent chunks from ``exp`` (:func:`exponent_plane`) and
    keeps a view of its sign+mantissa bytes in ``sm``; a raw BF16 piece (``exp`` unused) is
    split into planes first (a new sign+mantissa plane, from ``alloc``).

    Args:
        path: the model file (messages).  p: the piece (:func:`packable` with ``raw=True``).
        sm: the expert's SM region buffer.  exp: its exponent region buffer (bit-plane pieces).
        dctx: a zstd decompressor.  scratch: uint8 [>= p.elements] for the decoded exponents
            (default: a new array).  alloc: allocator of the arrays the result keeps (index,
            split sign+mantissa plane; default the C heap).
    Raises:
        zmoe.ChecksumError / zmoe.CorruptIndexError: as :func:`exponent_plane`, or the piece's
            bytes lying outside ``sm``.
    """
    o, n, _ = p.sm
    want = 2 * p.elements if p.raw else p.elements
    if not 0 <= o <= o + n <= sm.size or n != want:
        raise zmoe.CorruptIndexError(f"{path}: tensor {p.name!r}: "
                                     f"{'raw data' if p.raw else 'sign+mantissa plane'} lies "
                                     f"outside its region buffer (SPEC §9)")
    plane = scratch[:p.elements] if scratch is not None else np.empty(p.elements, np.uint8)
    if p.raw:
        s = np.empty(p.elements, np.uint8) if alloc is None else alloc(p.elements)
        split_bf16_into(sm[o:o + n].view(np.uint16), plane, s)
    else:
        exponent_plane(path, p, exp, dctx, plane)
        s = sm[o:o + n]
    if p.role == "gate_up":
        half, cols = p.shape[0] // 2, p.shape[1]
        k = half * cols
        return {"gate": pack_planes(plane[:k], s[:k], (half, cols), alloc),
                "up": pack_planes(plane[k:], s[k:], (half, cols), alloc)}
    return {p.role: pack_planes(plane, s, p.shape, alloc)}


def pack_expert(path, lay: L_.ExpertLayout, sm: np.ndarray, exp: np.ndarray, dctx):
    """One expert admitted from its region buffers into the compute form.

    Args:
        path: the model file (for messages).  lay: its layout.  sm, exp: its SM and exponent
            region buffers (CRC-checked by the caller if wanted); the packed matrices keep views
            of ``sm``.  dctx: a zstd decompressor (zstd-coded chunks).
    Returns:
        :class:`~zipmoe_rt.models.packed.PackedExpert`, or decoded
        :class:`~zipmoe_rt.models.weights.ExpertWeights` when :func:`packable` is False.
    Raises:
        zmoe.ChecksumError / zmoe.CorruptIndexError: as :func:`_exponent_plane`.
    """
    if not packable(lay):
        return L_.decode_expert(path, lay, sm, exp, dctx)
    roles = {}
    for p in lay.pieces:
        roles.update(pack_piece(path, p, sm, exp, dctx))
    return PackedExpert(roles["gate"], roles["up"], roles["down"])


def compute_form_bytes(lay: L_.ExpertLayout, escape_share: float) -> int:
    """Bytes of an expert in the compute form, from its shapes and a bound on the share of
    its weights that are escapes (:class:`~zipmoe_rt.models.packed.PackedMatrix`: per
    ``[out, in]`` matrix ``out·⌈in/2⌉`` index bytes, ``out·in`` sign+mantissa bytes,
    ``8·(out+1)`` row offsets, and 5 bytes per escape). The escape count is known only once
    the exponents are decoded, so this is an estimate for planning; what the engine holds is
    counted from the arrays themselves.

    Args:
        lay: the expert (its pieces' shapes; ``gate_up`` counts as two matrices).
        escape_share: escapes per weight assumed (``0 .. 1``).
    Returns:
        int bytes.
    """
    total = 0
    for p in lay.pieces:
        rows, cols = (int(v) for v in p.shape)
        mats = [(rows // 2, cols)] * 2 if p.role == "gate_up" else [(rows, cols)]
        for r, c in mats:
            total += r * ((c + 1) // 2) + r * c + 8 * (r + 1) + 5 * math.ceil(escape_share * r * c)
    return total
