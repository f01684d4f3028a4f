"""Byte-level edits of ``.zmoe`` files for the corruption and version tests (SPEC §1-§2)."""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path


def mutate(src: Path, dst: Path, fn) -> Path:
    """Write ``src``'s bytes to ``dst`` after ``fn(bytearray)`` edited them in place."""
    b = bytearray(src.read_bytes())
    fn(b)
    dst.write_bytes(bytes(b))
    return dst


def fix_header_crc(b: bytearray):
    """Recompute the header CRC (bytes 60-63) after editing header bytes 0-59."""
    b[60:64] = struct.pack("<I", zlib.crc32(bytes(b[:60])) & 0xFFFFFFFF)


def set_version(b: bytearray, version: int):
    """Write ``version`` into the header (bytes 4-7) and recompute the header CRC."""
    struct.pack_into("<I", b, 4, version)
    fix_header_crc(b)


def index_text(b: bytearray) -> bytes:
    """The index bytes of the file ``b`` (at the offset and of the size its header gives)."""
    _, _, ioff, isize = struct.unpack_from("<4sIQQ", b, 0)
    return bytes(b[ioff:ioff + isize])


def replace_index(b: bytearray, blob: bytes):
    """Put ``blob`` in place of the file's index (which ends the file), and fix sizes and both
    CRCs."""
    _, _, ioff, _ = struct.unpack_from("<4sIQQ", b, 0)
    del b[ioff:]
    b += blob
    struct.pack_into("<Q", b, 16, len(blob))
    struct.pack_into("<Q", b, 32, len(b))
    struct.pack_into("<I", b, 44, zlib.crc32(blob) & 0xFFFFFFFF)
    fix_header_crc(b)


def rewrite_index(b: bytearray, fn):
    """Apply fn to the parsed index, re-serialise it, and fix sizes and both CRCs."""
    index = json.loads(index_text(b))
    fn(index)
    replace_index(b, json.dumps(index, separators=(",", ":")).encode())
