"""Memory-mapped reader of ``.zmoe`` files (format/SPEC.md). Symmetrical to :mod:`zmoe.writer`.

Opening a file reads only the header and the index; tensor and expert data are read from the
memory map on demand, so fetching one expert touches only that expert's pages.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import zstandard as zstd

from . import codec, validate
from .constants import EXP_CODECS, EXP_ZSTD, HEADER_SIZE, MAGIC, READABLE_VERSIONS
from .errors import (ChecksumError, CorruptIndexError, NotZmoeError, TruncatedFileError,
                     UnsupportedCodecError, UnsupportedVersionError, ZmoeError)
from .writer import HEADER_STRUCT

#: numpy dtype that a stored dtype is returned as (BF16 as its uint16 bit pattern).
NUMPY_DTYPES = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
    "I16": np.int16, "U16": np.uint16, "F16": np.float16, "BF16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "F32": np.float32,
    "I64": np.int64, "U64": np.uint64, "F64": np.float64,
}


@dataclass(frozen=True)
class Header:
    """The fixed 64-byte header (SPEC §1)."""

    version: int
    index_offset: int
    index_size: int
    data_offset: int
    file_size: int
    alignment: int
    index_crc32: int


class ZmoeReader:
    """Open a ``.zmoe`` file.

    Attributes:
        path: the file.
        header: :class:`Header`.
        metadata: ``{key: value}`` with values typed per SPEC §3; ``metadata_types`` gives types.
        tensors: ``{name: record}`` index records (SPEC §4), in file order.
        experts: ``{(layer, expert): block}`` expert blocks (SPEC §6).

    Opening validates the header and the whole index (:mod:`zmoe.validate`, SPEC §9) before
    any piece is read: every size a decoder is handed is then one the file's shape implies.

    Args:
        path: the file.
        use_mmap: read pieces through a memory map of the file (zero-copy views; default).
            False reads each piece with ``pread`` into new memory: a file truncated while it
            is read then raises :class:`TruncatedFileError` naming it, where a memory map
            kills the process with SIGBUS (what whole-file passes such as verify and export
            use).

    Raises:
        FileNotFoundError: no such file.
        NotZmoeError: wrong magic.  UnsupportedVersionError: a version other than 1 or 2.
        UnsupportedCodecError: an exponent codec this reader does not know.
        TruncatedFileError: shorter than recorded.  CorruptIndexError: header/index CRC or JSON
            bad, or an index that breaks SPEC §9 (the message names the tensor and field).
    """

    def __init__(self, path: str | os.PathLike, use_mmap: bool = True):
        self.path = Path(path)
        self._fd = None
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(HEADER_SIZE)
            if not head:
                raise NotZmoeError(f"{self.path}: not a .zmoe file (the file is empty)")
            if len(head) < 4 or head[:4] != MAGIC:
                kind = sniff_kind(head)
                raise NotZmoeError(f"{self.path}: not a .zmoe file (magic {head[:4]!r}, "
                                   f"expected {MAGIC!r}"
                                   + (f"; it looks like {kind})" if kind else ")"))
            if len(head) < HEADER_SIZE:
                raise TruncatedFileError(f"{self.path}: truncated header ({len(head)} bytes)")
            (version,) = struct.unpack_from("<I", head, 4)
            if version not in READABLE_VERSIONS:
                raise UnsupportedVersionError(
                    f"{self.path}: .zmoe format version {version}; this reader supports versions "
                    f"{', '.join(map(str, READABLE_VERSIONS))}"
                    + (" (file written by a newer zipmoe-rt: upgrade)"
                       if version > max(READABLE_VERSIONS) else ""))
            (hcrc,) = struct.unpack_from("<I", head, 60)
            if zlib.crc32(head[:60]) & 0xFFFFFFFF != hcrc:
                raise CorruptIndexError(f"{self.path}: header checksum mismatch (corrupt header)")
            _, _, ioff, isize, doff, fsize, align, icrc = HEADER_STRUCT.unpack(head[:60])
            self.header = Header(version, ioff, isize, doff, fsize, align, icrc)
            if size < fsize:
                raise TruncatedFileError(f"{self.path}: truncated: {size} bytes on disk, header "
                                         f"records {fsize}")
            if size > fsize:
                raise CorruptIndexError(f"{self.path}: {size - fsize} trailing bytes after the "
                                        f"recorded end ({fsize})")
            validate.check_header(self.path, self.header)   # bounds the index before reading it
            f.seek(ioff)
            blob = f.read(isize)
        if zlib.crc32(blob) & 0xFFFFFFFF != icrc:
            raise CorruptIndexError(f"{self.path}: index checksum mismatch (corrupt index)")
        try:
            index = validate.parse_index(self.path, blob)
            validate.check_index(self.path, self.header, index)   # SPEC §9, before any decode
            self.metadata_types = {k: v["type"] for k, v in index["metadata"].items()}
            self.metadata = {k: v["value"] for k, v in index["metadata"].items()}
            self.tensors = {t["name"]: t for t in index["tensors"]}
            self.experts = {(b["layer"], b["expert"]): b for b in index["experts"]}
        except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError) as e:
            raise CorruptIndexError(f"{self.path}: index is not valid ({type(e).__name__}: {e})") from None
        self._check_ranges(fsize)
        self._check_codecs(version)
        self._mm = None
        self._dctx = zstd.ZstdDecompressor()
        if not use_mmap:
            self._fd = os.open(self.path, os.O_RDONLY)

    def _check_codecs(self, version):
        """Every bit-plane tensor gets ``exp_codec`` (version 1 files: always zstd, SPEC §5.2)."""
        for name, t in self.tensors.items():
            if t.get("encoding") != "bitplane":
                continue
            if version == 1:
                if t.setdefault("exp_codec", EXP_ZSTD) != EXP_ZSTD:
                    raise CorruptIndexError(f"{self.path}: tensor {name!r}: a version-1 file "
                                            f"holds only zstd exponent chunks, not "
                                            f"{t['exp_codec']!r} (SPEC §5.2)")
            c = t.get("exp_codec")
            if c is None:
                raise CorruptIndexError(f"{self.path}: tensor {name!r}: bit-plane tensor without "
                                        f"an exp_codec")
            if c not in EXP_CODECS:
                raise UnsupportedCodecError(f"{self.path}: tensor {name!r}: exponent codec {c!r} "
                                            f"unknown to this reader (known: {', '.join(EXP_CODECS)}; "
                                            f"a newer zipmoe-rt may read it)")

    def _check_ranges(self, fsize):
        def chk(name, off, n):
            if off < self.header.data_offset or off + n > self.header.index_offset:
                raise CorruptIndexError(f"{self.path}: tensor {name!r}: byte range "
                                        f"[{off}, {off + n}) outside the data section")
        for name, t in self.tensors.items():
            for p in t["parts"]:
                for key in ("raw", "sm"):
                    if key in p:
                        chk(name, p[key][0], p[key][1])
                for c in p.get("exp", ()):
                    chk(name, c[0], c[1])
        for (layer, e), b in self.experts.items():
            for key in ("sm", "exp"):
                chk(f"expert block {layer}/{e} {key} region", b[key][0], b[key][1])

    # -- raw access --------------------------------------------------------------------------
    @property
    def buffer(self):
        """The read-only memory map of the whole file."""
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
        return self._mm

    def view(self, offset: int, size: int) -> np.ndarray:
        """uint8 [size] read-only view of the file at ``offset`` (no copy; with
        ``use_mmap=False`` a ``pread`` into new memory).

        Raises:
            TruncatedFileError: (``use_mmap=False``) the file ends before ``offset + size``:
                it was truncated after it was opened.
        """
        if self._fd is None:
            return np.frombuffer(self.buffer, np.uint8, size, offset)
        out = np.empty(size, np.uint8)
        got = 0
        while got < size:
            k = os.preadv(self._fd, [out[got:]], offset + got)
            if k <= 0:
                raise TruncatedFileError(
                    f"{self.path}: truncated while being read: {got} of {size} bytes at byte "
                    f"{offset} (now {os.fstat(self._fd).st_size} bytes; the header records "
                    f"{self.header.file_size}): was the file changed while in use?")
            got += k
        out.flags.writeable = False
        return out

    def _checked(self, name, what, entry, verify):
        off, size, crc = entry[0], entry[1], entry[-1]
        v = self.view(off, size)
        if verify and zlib.crc32(v) & 0xFFFFFFFF != crc:
            raise ChecksumError(f"{self.path}: tensor {name!r}: {what} at byte {off} fails its "
                                f"CRC-32 (corrupt file)")
        return v

    def part_planes(self, name: str, part: dict, verify: bool = True):
        """Checked stored pieces of one part: ``(sm_view, [(chunk_view, raw_size)])``."""
        sm = self._checked(name, "sign+mantissa plane", part["sm"], verify)
        chunks = [(self._checked(name, f"exponent chunk {i}", c, verify), c[2])
                  for i, c in enumerate(part["exp"])]
        return sm, chunks

    def read_part(self, name: str, part: dict, verify: bool = True) -> np.ndarray:
        """Decode one stored part of tensor ``name`` to its raw little-endian bytes (uint8)."""
        t = self.tensors[name]
        if "raw" in part:
            return self._checked(name, "raw data", part["raw"], verify)
        sm, chunks = self.part_planes(name, part, verify)
        try:   # chunk by chunk: memory is the words plus one chunk's exponents
            words = codec.merge_chunks([c for c, _ in chunks], [n for _, n in chunks], sm,
                                       t["dtype"], t["exp_codec"], self._dctx)
        except ValueError as e:
            raise ChecksumError(f"{self.path}: tensor {name!r}: {e}") from None
        return words.view(np.uint8)

    # -- tensors -----------------------------------------------------------------------------
    def read_tensor(self, name: str, verify: bool = True) -> np.ndarray:
        """Tensor ``name`` as a numpy array of :data:`NUMPY_DTYPES` [dtype], shaped.

        Raw tensors are zero-copy views of the map; bit-plane tensors are decoded.

        Raises:
            KeyError: no such tensor (message lists the file).  ChecksumError: corrupt data.
        """
        t = self.tensors.get(name)
        if t is None:
            raise KeyError(f"{self.path}: no tensor named {name!r}")
        parts = [self.read_part(name, p, verify) for p in t["parts"]]
        raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return raw.view(NUMPY_DTYPES[t["dtype"]]).reshape(t["shape"])

    def expert_tensors(self, layer: int, expert: int, verify: bool = True) -> dict:
        """All tensors of one expert: ``{name: array}``; a stacked tensor gives this expert's slice.

        Raises:
            KeyError: no such expert block.
        """
        block = self.experts.get((layer, expert))
        if block is None:
            raise KeyError(f"{self.path}: no expert block for layer {layer}, expert {expert}")
        out = {}
        for name in block["tensors"]:
            t = self.tensors[name]
            stacked = t["expert"].get("stacked", False)
            part = t["parts"][expert] if stacked else t["parts"][0]
            shape = t["shape"][1:] if stacked else t["shape"]
            out[name] = self.read_part(name, part, verify).view(NUMPY_DTYPES[t["dtype"]]).reshape(shape)
        return out

    def verify(self, progress=None, keep_going: bool = False):
        """Check every CRC-32 in the file and that every exponent chunk decodes to its size (the
        index itself was validated when the file was opened, SPEC §9).

        Args:
            progress: optional callable(tensor_name) called after each tensor.
            keep_going: check every tensor and return the failures instead of raising at the
                first.

        Returns:
            with ``keep_going``: ``[(tensor name, ZmoeError)]``, the first failure of each
            corrupt tensor (empty when the file is intact); otherwise None.
        Raises:
            ChecksumError: (without ``keep_going``) the first corrupt piece, named.
        """
        bad = []
        for name, t in self.tensors.items():
            try:
                for p in t["parts"]:
                    self.read_part(name, p, verify=True)
            except ZmoeError as e:
                if not keep_going:
                    raise
                bad.append((name, e))
            if progress:
                progress(name)
        return bad if keep_going else None

    def stored_bytes(self, name: str) -> int:
        """Bytes tensor ``name`` occupies in the file (planes and chunks, no padding)."""
        n = 0
        for p in self.tensors[name]["parts"]:
            n += p.get("raw", p.get("sm", [0, 0]))[1] + sum(c[1] for c in p.get("exp", ()))
        return n

    def close(self):
        if self._fd is not None:
            os.close(self._fd)
            self._fd = None
        if self._mm is not None:
            try:
                self._mm.close()
            except BufferError:  # views still alive; the map closes when they are collected
                pass
            self._mm = None

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()


def file_version(path) -> int:
    """The format version in a file's header (SPEC §1) without reading anything else; 0 for a
    file that is missing, unreadable or not a ``.zmoe`` (no magic)."""
    try:
        with open(path, "rb") as f:
            head = f.read(8)
    except OSError:
        return 0
    return struct.unpack_from("<I", head, 4)[0] if len(head) == 8 and head[:4] == MAGIC else 0


def element_count(record: dict) -> int:
    """Number of elements of an index record's tensor."""
    return int(np.prod(record["shape"], dtype=np.int64))


def bits_per_weight(reader: ZmoeReader, name: str) -> float:
    """Stored bits per element of tensor ``name`` (16 for raw BF16, ~10.6 for bit-plane BF16)."""
    n = element_count(reader.tensors[name])
    return 8.0 * reader.stored_bytes(name) / n if n else 0.0


def sniff_kind(head: bytes) -> str | None:
    """What a file that is not a ``.zmoe`` looks like from its first bytes (at least 9), for
    error messages: ``"a GGUF file"`` (magic ``GGUF``, the GGUF spec), ``"a safetensors file"``
    (an 8-byte little-endian header length then ``{``, the safetensors format), ``"a ZIP archive
    (a PyTorch .bin/.pt checkpoint?)"``, ``"JSON text"``; ``None`` when none fits."""
    if head[:4] == b"GGUF":
        return "a GGUF file"
    if len(head) >= 9 and head[8:9] == b"{" and 0 < struct.unpack_from("<Q", head)[0] < 1 << 32:
        return "a safetensors file"
    if head[:4] == b"PK\x03\x04":
        return "a ZIP archive (a PyTorch .bin/.pt checkpoint?)"
    if head.lstrip()[:1] in (b"{", b"["):
        return "JSON text"
    return None
