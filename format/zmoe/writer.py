"""Streaming writer of ``.zmoe`` files (format/SPEC.md). Symmetrical to :mod:`zmoe.reader`.

Data is written as it comes; the index goes at the end and the header is filled in last, so a
file that was not closed has an all-zero header and is rejected by the reader.

Typical use::

    w = ZmoeWriter(path)
    w.add_metadata(Keys.General.ARCHITECTURE, "MixtralForCausalLM")   # zmoe.Keys
    w.add_tensor("model.norm.weight", "BF16", (576,), data)
    w.write_expert(encode_expert(layer, expert, pieces, chunks=4))
    w.close()
"""
from __future__ import annotations

import json
import struct
import zlib
from dataclasses import dataclass, field

import numpy as np
import zstandard as zstd

from . import codec
from .constants import (ALIGNMENT, DEFAULT_CHUNKS, DEFAULT_EXP_CODEC, DENSE_ALIGNMENT, DTYPE_SIZES,
                        ENC_BITPLANE, ENC_MXFP4, ENC_RAW, EXP_ZSTD, EXPONENT_ONLY_DTYPES,
                        HEADER_SIZE, MAGIC, META_TYPES, MIN_CHUNK, NIBBLE_PLANE_DTYPES, VERSION,
                        VERSION_LOWPREC)

HEADER_STRUCT = struct.Struct("<4sIQQQQI I 12x")  # 60 bytes, then header crc32 (u32)
assert HEADER_STRUCT.size == 60


def infer_meta_type(value) -> str:
    """The SPEC §3 type name for a Python value (bool, int, float, str, lists of those, else json)."""
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, np.integer)):
        return "int"
    if isinstance(value, (float, np.floating)):
        return "float"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)) and value:
        for t, ty in (("int[]", int), ("float[]", float), ("str[]", str)):
            if all(isinstance(v, ty) and not isinstance(v, bool) for v in value):
                return t
    return "json"


@dataclass
class ExpertPiece:
    """One tensor (or one expert's slice of an expert-stacked tensor) to store in an expert block.

    Attributes:
        name: tensor name in the checkpoint.
        dtype: safetensors dtype name.
        shape: shape of the whole tensor (for a stacked tensor, [E, ...]).
        role: "gate", "up", "down", "gate_up", ... (what the runtime uses it for).
        data: bytes-like of this expert's elements (C order).
        part: index of this slice along axis 0 for a stacked tensor, None for a whole tensor.
        encoding: None (bit-planes for BF16 / F16 / F32 / F8_E4M3, raw otherwise), or one to
            force: ``raw``, ``bitplane`` (also the exponent-only U8 of MXFP4 scales) or
            ``mxfp4`` (U8 MXFP4 blocks, stored as they are; SPEC §5.4).
    """

    name: str
    dtype: str
    shape: tuple
    role: str
    data: object
    part: int | None = None
    encoding: str | None = None


@dataclass
class EncodedExpert:
    """An expert block ready to write: produced by :func:`encode_expert` (thread-safe, no I/O)."""

    layer: int
    expert: int
    sm: list = field(default_factory=list)        # per piece: bytes of SM plane (or raw bytes)
    chunks: list = field(default_factory=list)    # per piece: [(chunk, raw_size)] or None for raw
    pieces: list = field(default_factory=list)
    exp_codec: str = DEFAULT_EXP_CODEC             # codec of the exponent chunks (SPEC §5.2)
    encodings: list = field(default_factory=list)  # per piece: its record's encoding (SPEC §4)


_tls_compressors = {}


def _compressor() -> zstd.ZstdCompressor:
    import threading
    key = threading.get_ident()
    c = _tls_compressors.get(key)
    if c is None:
        c = _tls_compressors[key] = zstd.ZstdCompressor(compression_params=codec.zstd_parameters())
    return c


def encode_expert(layer: int, expert: int, pieces: list[ExpertPiece], chunks: int = DEFAULT_CHUNKS,
                  min_chunk: int = MIN_CHUNK, raw: bool = False,
                  exp_codec: str = DEFAULT_EXP_CODEC) -> EncodedExpert:
    """Bit-plane split and compress every piece of one expert (CPU only, safe to run in threads:
    zstd and the Numba Huffman encoder release the GIL). Pieces of non-floating dtypes, or all
    pieces if ``raw``, are kept raw (in the SM region, SPEC §6). ``exp_codec``: ``huffman``
    (default, SPEC §5.3) or ``zstd``.

    Raises:
        ValueError: an unknown ``exp_codec``.
    """
    codec._check_codec(exp_codec)
    enc = EncodedExpert(layer, expert, pieces=pieces, exp_codec=exp_codec)
    for p in pieces:
        buf = as_bytes(p.data)
        name = p.encoding or (ENC_BITPLANE if codec.is_bitplane_dtype(p.dtype) and not raw
                              else ENC_RAW)
        if raw and name == ENC_BITPLANE:    # ``raw``: every piece's bytes as they are
            name = ENC_RAW
        if name not in (ENC_RAW, ENC_BITPLANE, ENC_MXFP4) or (
                name == ENC_BITPLANE and not codec.has_planes(p.dtype)) or (
                name == ENC_MXFP4 and p.dtype != "U8"):
            raise ValueError(f"tensor {p.name!r}: encoding {name!r} of a {p.dtype} tensor")
        enc.encodings.append(name)
        if name == ENC_BITPLANE:
            sm, parts = codec.split_compress(buf, p.dtype, chunks, min_chunk,
                                             _compressor() if exp_codec == EXP_ZSTD else None,
                                             exp_codec)
            enc.sm.append(sm)
            enc.chunks.append(parts)
        else:
            enc.sm.append(buf)
            enc.chunks.append(None)
    return enc


def as_bytes(data) -> np.ndarray:
    """A flat uint8 view of a bytes-like object or numpy array (C order; empty arrays allowed)."""
    if isinstance(data, np.ndarray):
        return np.ascontiguousarray(data).reshape(-1).view(np.uint8)
    mv = memoryview(data)
    return np.frombuffer(mv.cast("B"), np.uint8) if mv.nbytes else np.zeros(0, np.uint8)


def _crc(b) -> int:
    return zlib.crc32(as_bytes(b)) & 0xFFFFFFFF


class ZmoeWriter:
    """Write a ``.zmoe`` file, streaming (memory: one expert block at a time).

    Args:
        path: output path (the caller renames it when complete; see the converter).
        alignment: alignment of the data section and expert regions in bytes (power of two,
            >= 512 for O_DIRECT).

    Raises:
        ValueError: a duplicate tensor name or metadata key, a size that does not match
            dtype x shape, an unknown metadata type.
    """

    def __init__(self, path, alignment: int = ALIGNMENT):
        if alignment < HEADER_SIZE or alignment & (alignment - 1):
            raise ValueError(f"alignment must be a power of two >= {HEADER_SIZE}, got {alignment}")
        self.path = path
        self.alignment = alignment
        self.f = open(path, "wb")
        self.f.write(b"\0" * alignment)
        self.pos = alignment
        self.metadata: dict = {}
        self.tensors: dict = {}
        self.order: list = []
        self.experts: list = []
        self.closed = False

    # -- low level ---------------------------------------------------------------------------
    def _pad(self, align: int):
        n = -self.pos % align
        if n:
            self.f.write(b"\0" * n)
            self.pos += n

    def _write(self, data) -> tuple[int, int]:
        mv = as_bytes(data)
        off = self.pos
        self.f.write(mv)
        self.pos += mv.nbytes
        return off, mv.nbytes

    # -- metadata ----------------------------------------------------------------------------
    def add_metadata(self, key: str, value, type: str | None = None):
        """Add one typed key/value (SPEC §3). ``type`` is inferred when omitted."""
        if key in self.metadata:
            raise ValueError(f"metadata key {key!r} added twice")
        t = type or infer_meta_type(value)
        if t not in META_TYPES:
            raise ValueError(f"metadata key {key!r}: unknown type {t!r}")
        if isinstance(value, tuple):
            value = list(value)
        if isinstance(value, np.generic):
            value = value.item()
        self.metadata[key] = {"type": t, "value": value}

    # -- tensors -----------------------------------------------------------------------------
    def _record(self, name, dtype, shape, encoding, expert=None, nparts=1):
        if name in self.tensors:
            raise ValueError(f"tensor {name!r} added twice")
        if dtype not in DTYPE_SIZES:
            raise ValueError(f"tensor {name!r}: unknown dtype {dtype!r}")
        rec = {"name": name, "dtype": dtype, "shape": [int(s) for s in shape],
               "encoding": encoding, "parts": [None] * nparts}
        if expert is not None:
            rec["expert"] = expert
        self.tensors[name] = rec
        self.order.append(name)
        return rec

    def _encode_part(self, dtype, data, chunks, min_chunk, exp_codec):
        # memory: the two planes while the SM plane is written, then the exponent plane and one
        # compressed chunk at a time (each chunk is written before the next is made)
        buf = as_bytes(data)
        exp, sm = codec.split_planes(buf, dtype)
        off, size = self._write(sm)
        part = {"sm": [off, size, _crc(sm)], "exp": []}
        del sm
        zc = _compressor() if exp_codec == EXP_ZSTD else None
        for frame, raw in codec.iter_compress_chunks(exp, chunks, min_chunk, zc, exp_codec):
            o, s = self._write(frame)
            part["exp"].append([o, s, raw, _crc(frame)])
            del frame
        return part

    def add_tensor(self, name: str, dtype: str, shape, data, encoding: str = ENC_RAW,
                   chunks: int = DEFAULT_CHUNKS, min_chunk: int = MIN_CHUNK,
                   exp_codec: str = DEFAULT_EXP_CODEC):
        """Add a dense (non-expert) tensor, raw or as bit-planes (SPEC §4) with exponent chunks
        in ``exp_codec`` (``huffman`` or ``zstd``)."""
        nbytes = as_bytes(data).nbytes
        expect = DTYPE_SIZES.get(dtype, 0) * int(np.prod(shape, dtype=np.int64))
        rec = self._record(name, dtype, shape, encoding)
        if nbytes != expect:
            raise ValueError(f"tensor {name!r}: {nbytes} bytes given, {expect} expected for "
                             f"{dtype}{list(shape)}")
        if encoding == ENC_BITPLANE and not codec.is_bitplane_dtype(dtype):
            rec["encoding"] = encoding = ENC_RAW
        self._pad(DENSE_ALIGNMENT)
        if encoding == ENC_RAW:
            off, size = self._write(data)
            rec["parts"][0] = {"raw": [off, size, _crc(data)]}
        elif encoding == ENC_BITPLANE:
            codec._check_codec(exp_codec)
            rec["exp_codec"] = exp_codec
            rec["parts"][0] = self._encode_part(dtype, data, chunks, min_chunk, exp_codec)
        else:
            raise ValueError(f"tensor {name!r}: unknown encoding {encoding!r}")

    def write_expert(self, enc: EncodedExpert):
        """Write one expert block: its SM region then its exponent region, each aligned (SPEC §6)."""
        key = (enc.layer, enc.expert)
        self._pad(self.alignment)
        block = {"layer": enc.layer, "expert": enc.expert, "tensors": []}
        parts = []
        sm_start = self.pos
        for p, sm, ch in zip(enc.pieces, enc.sm, enc.chunks):
            off, size = self._write(sm)
            parts.append({"sm": [off, size, _crc(sm)]} if ch is not None
                         else {"raw": [off, size, _crc(sm)]})
        block["sm"] = [sm_start, self.pos - sm_start]
        self._pad(self.alignment)
        exp_start = self.pos
        for part, ch in zip(parts, enc.chunks):
            if ch is None:
                continue
            part["exp"] = []
            for frame, raw in ch:
                o, s = self._write(frame)
                part["exp"].append([o, s, raw, _crc(frame)])
        block["exp"] = [exp_start, self.pos - exp_start]
        for p, part in zip(enc.pieces, parts):
            n_elem = int(np.prod(p.shape[1:] if p.part is not None else p.shape, dtype=np.int64))
            if as_bytes(p.data).nbytes != n_elem * DTYPE_SIZES[p.dtype]:
                raise ValueError(f"tensor {p.name!r} (expert {key}): {as_bytes(p.data).nbytes} "
                                 f"bytes, expected {n_elem * DTYPE_SIZES[p.dtype]}")
            rec = self.tensors.get(p.name)
            if rec is None:
                enc_name = enc.encodings[len(block["tensors"])] if enc.encodings \
                    else ENC_BITPLANE if "exp" in part else ENC_RAW
                if p.part is None:
                    exp_info = {"layer": enc.layer, "expert": enc.expert, "role": p.role}
                    rec = self._record(p.name, p.dtype, p.shape, enc_name, exp_info, 1)
                else:
                    exp_info = {"layer": enc.layer, "role": p.role, "stacked": True}
                    rec = self._record(p.name, p.dtype, p.shape, enc_name, exp_info, int(p.shape[0]))
                if "exp" in part:
                    rec["exp_codec"] = enc.exp_codec
            if "exp" in part and rec.get("exp_codec") != enc.exp_codec:
                raise ValueError(f"tensor {p.name!r}: expert parts written with exponent codecs "
                                 f"{rec.get('exp_codec')!r} and {enc.exp_codec!r}")
            idx = 0 if p.part is None else p.part
            if rec["parts"][idx] is not None:
                raise ValueError(f"tensor {p.name!r}: part {idx} written twice")
            part["expert"] = enc.expert
            rec["parts"][idx] = part
            block["tensors"].append(p.name)
        self.experts.append(block)

    def set_order(self, names):
        """Order the index's tensor records (SPEC §2: the source checkpoint's order).

        Raises:
            ValueError: ``names`` is not a permutation of the tensors added.
        """
        names = list(names)
        if sorted(names) != sorted(self.order):
            raise ValueError("set_order: names must be exactly the tensors added")
        self.order = names

    # -- finish ------------------------------------------------------------------------------
    def close(self):
        """Write the index and the header. Raises ValueError if a stacked tensor misses parts."""
        if self.closed:
            return
        for name in self.order:
            rec = self.tensors[name]
            if any(p is None for p in rec["parts"]):
                missing = [i for i, p in enumerate(rec["parts"]) if p is None]
                raise ValueError(f"tensor {name!r}: expert parts {missing} were never written")
        self._pad(DENSE_ALIGNMENT)
        index = {"metadata": self.metadata, "tensors": [self.tensors[n] for n in self.order],
                 "experts": self.experts}
        blob = json.dumps(index, separators=(",", ":"), ensure_ascii=False,
                          allow_nan=False).encode("utf-8")
        index_off, index_size = self._write(blob)
        file_size = self.pos
        # version 3 only where a tensor needs it, so other files stay readable by version-2
        # readers (SPEC §8)
        version = VERSION_LOWPREC if any(
            t["encoding"] == ENC_MXFP4 or (t["encoding"] == ENC_BITPLANE and (
                t["dtype"] in NIBBLE_PLANE_DTYPES or t["dtype"] in EXPONENT_ONLY_DTYPES))
            for t in self.tensors.values()) else VERSION
        head = HEADER_STRUCT.pack(MAGIC, version, index_off, index_size, self.alignment,
                                  file_size, self.alignment, _crc(blob))
        head += struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)
        self.f.flush()
        self.f.seek(0)
        self.f.write(head)
        self.f.flush()
        import os
        os.fsync(self.f.fileno())
        self.f.close()
        self.closed = True

    def abort(self):
        """Close the file without writing the index (the caller deletes it). Never raises for
        the file itself: a flush that fails (disk full) while giving up is ignored."""
        if not self.closed:
            self.closed = True
            try:
                self.f.close()
            except OSError:
                pass

    def __enter__(self):
        return self

    def __exit__(self, exc_type, *a):
        if exc_type is None:
            self.close()
        else:
            self.abort()
