"""Structural validation of a ``.zmoe`` container before any of its data is decoded
(format/SPEC.md §9).

The CRC-32s prove only that the header and the index are the bytes their writer wrote. A crafted
or buggy writer can still write an index that lies: a shape that does not match its planes, an
exponent chunk listed twice, a size of 1 TiB, a range past the end of the file, a string where a
number belongs. The decoding kernels (:mod:`zmoe._huffjit`, ``zipmoe_rt.kernels.planes``) run
without bounds checks, so every length, offset and count they are handed is proven consistent
here first, in pure Python over the parsed index: O(number of stored pieces) plus one sort, and
no tensor byte is read.

* :func:`check_header`: the header's fields against each other and the file (before the index
  is read, so a claimed index size is never allocated);
* :func:`parse_index`: the index bytes as strict JSON (UTF-8, no NaN/Infinity, no duplicate
  keys; errors name the JSON path);
* :func:`check_index`: every metadata entry, tensor record and expert block (SPEC §3-§6).

:class:`zmoe.ZmoeReader` runs all three when it opens a file, so any reader that opened without
error holds an index with the invariants of SPEC §9, which the kernels' preconditions rely on.
What needs the data itself (CRC-32s, chunks that decode to exactly ``raw_size`` exponents) is
checked when a piece is read, and for the whole file by :meth:`zmoe.ZmoeReader.verify`.

The checks live by concern in :mod:`zmoe.validate_json` (strict JSON, SPEC §2) and
:mod:`zmoe.validate_tensors` (metadata, tensor records, pieces, expert blocks and overlaps,
SPEC §3-§6); this module holds the three entry points and re-exports their limits.

Every error is a :class:`~zmoe.errors.ZmoeError` whose message names the file, the record
(tensor, expert block or metadata key) and the field.
"""
from __future__ import annotations
import json

from .constants import HEADER_SIZE
from .errors import CorruptIndexError
from .validate_json import MAX_JSON_DEPTH, json_kind, locate, reject_constant, unique_pairs
from .validate_tensors import HUFFMAN_HEADER_BYTES, INT64_MAX, MAX_NDIM, IndexChecker

__all__ = ["check_header", "parse_index", "check_index", "MAX_INDEX_BYTES", "MAX_JSON_DEPTH",
           "MAX_NDIM", "INT64_MAX", "HUFFMAN_HEADER_BYTES"]

#: Largest index this reader reads (SPEC §9). An index holds ~0.5 KB per tensor plus the
#: tokenizer: ~60 MB for a model of 45,000 expert tensors; a header claiming more is refused
#: before anything is allocated.
MAX_INDEX_BYTES = 256 << 20


# -- header (SPEC §1) ---------------------------------------------------------------------------
def check_header(path, header) -> None:
    """Check the header's fields against each other (SPEC §1, §9), before the index is read.

    ``header.file_size`` must already equal the size on disk (the reader checks that first, as
    a truncated or a too-long file). Checked here: ``alignment`` is a power of two ≥ 64;
    ``data_offset`` is a multiple of it and ≥ 64; ``index_offset ≥ data_offset``; the index
    ends the file (``index_offset + index_size == file_size``), so it is bounded by the file's
    real size; ``index_size ≤`` :data:`MAX_INDEX_BYTES`.

    Raises:
        CorruptIndexError: naming the file and the header field.
    """
    h = header

    def bad(field, msg):
        raise CorruptIndexError(f"{path}: header field {field}: {msg} (SPEC §1)")

    if h.alignment < HEADER_SIZE or h.alignment & (h.alignment - 1):
        bad("alignment", f"{h.alignment} is not a power of two >= {HEADER_SIZE}")
    if h.data_offset < HEADER_SIZE or h.data_offset % h.alignment:
        bad("data_offset", f"{h.data_offset} is not a multiple of the alignment {h.alignment} "
                           f"past the {HEADER_SIZE}-byte header")
    if h.index_offset < h.data_offset:
        bad("index_offset", f"{h.index_offset} lies before data_offset {h.data_offset}")
    if h.index_offset + h.index_size != h.file_size:
        bad("index_size", f"the index [{h.index_offset}, {h.index_offset + h.index_size}) does "
                          f"not end at file_size {h.file_size} (the index is the end of the file)")
    if h.index_size > MAX_INDEX_BYTES:
        bad("index_size", f"{h.index_size} bytes, above this reader's limit of "
                          f"{MAX_INDEX_BYTES} bytes")


# -- index JSON (SPEC §2) -----------------------------------------------------------------------
def parse_index(path, blob) -> dict:
    """The index bytes as a JSON object (SPEC §2), strictly: UTF-8; no NaN/Infinity; no key
    twice in one object; nesting bounded. Costs one ``json.loads``; the slow walk that names the
    JSON path of a problem runs only when parsing failed.

    Raises:
        CorruptIndexError: naming the file and the JSON path (e.g. ``tensors[3].shape[0]``).
    """
    try:
        text = bytes(blob).decode("utf-8")
    except UnicodeDecodeError as e:
        raise CorruptIndexError(f"{path}: index: byte {e.start} is not UTF-8 (SPEC §2)") from None
    try:
        index = json.loads(text, object_pairs_hook=unique_pairs, parse_constant=reject_constant)
    except (ValueError, RecursionError) as e:   # json.JSONDecodeError is a ValueError
        pos = getattr(e, "pos", None)
        where, problem = locate(text, pos)
        if problem is None:
            problem = (getattr(e, "msg", None) or str(e))[:200]
            problem = f"{problem} (byte {pos})" if pos is not None else problem
        raise CorruptIndexError(f"{path}: index: {where}: {problem} (SPEC §2)") from None
    if type(index) is not dict:
        raise CorruptIndexError(f"{path}: index: top level: a JSON {json_kind(index)}, expected "
                                f"an object with metadata, tensors and experts (SPEC §2)")
    return index


# -- index contents (SPEC §3-§6) ----------------------------------------------------------------
def check_index(path, header, index: dict) -> None:
    """Validate a parsed index against its header (SPEC §2-§6, §9) without reading any data.

    Checked: the three members; every metadata entry's type and value (SPEC §3: 64-bit ints,
    typed arrays, bounded nesting); every tensor record (SPEC §4): a unique string name, a known
    dtype, a shape of non-negative integers whose byte size fits in 63 bits, an encoding its
    dtype supports and a known exponent codec, ``expert`` info, one part (or one per expert of a
    stacked tensor) of the record's encoding; every stored piece: integers, inside
    ``[data_offset, index_offset)``, a 32-bit CRC; sizes implied by the shape: raw bytes =
    elements x dtype size, SM plane = elements x SM bytes, the exponent chunks' ``raw_size``
    sum to the elements (each ≥ 1, Huffman chunks long enough to hold them); expert blocks
    (SPEC §6): unique (layer, expert), aligned regions inside the data section, tensors of that
    layer and expert whose pieces lie inside the block's regions, each expert tensor part in
    exactly one block, one tensor per role; no two stored pieces, and no two expert regions,
    share a byte.

    Args:
        path: the file (for messages).  header: its :class:`~zmoe.reader.Header`.
        index: from :func:`parse_index`; not modified.

    Raises:
        CorruptIndexError: naming the file, the record and the field.
        UnsupportedCodecError: a bit-plane tensor's exponent codec is unknown (SPEC §5.2).
    """
    c = IndexChecker(path, header)
    for key in ("metadata", "tensors", "experts"):
        if key not in index:
            c.fail("index", key, "missing (SPEC §2)")
    c.metadata(index["metadata"])
    tensors = index["tensors"]
    if type(tensors) is not list:
        c.fail("index", "tensors", f"a JSON {json_kind(tensors)}, expected an array (SPEC §4)")
    names = {}
    for i, t in enumerate(tensors):
        c.tensor(i, t, names)
    c.blocks(index["experts"], {t["name"]: t for t in tensors})
    c.disjoint(c.ranges, "stored pieces")
