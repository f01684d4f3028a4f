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

Every error is a :class:`~zmoe.errors.ZmoeError` whose message names the file, the record
(tensor, expert block or metadata key) and the field.
"""
from __future__ import annotations

import json
import math
import re

from .constants import (BITPLANE_DTYPES, DENSE_ALIGNMENT, DTYPE_SIZES, ENC_BITPLANE, ENC_RAW,
                        EXP_CODECS, EXP_HUFFMAN, EXP_ZSTD, HEADER_SIZE, META_TYPES)
from .errors import CorruptIndexError, UnsupportedCodecError

#: Largest index this reader reads (SPEC §9). An index holds ~0.5 KB per tensor plus the
#: tokenizer: ~60 MB for a model of 45,000 expert tensors; a header claiming more is refused
#: before anything is allocated.
MAX_INDEX_BYTES = 256 << 20
#: Deepest nesting of JSON arrays/objects in the index (SPEC §9): enforced for metadata ``json``
#: values (all other schema fields have flat types) and when naming where a parse failed; the
#: schema itself needs 6.
MAX_JSON_DEPTH = 64
#: Most dimensions of a tensor shape.
MAX_NDIM = 32
INT64_MAX = (1 << 63) - 1
#: Bytes before the streams of a Huffman exponent chunk (SPEC §5.3: code lengths, stream sizes).
HUFFMAN_HEADER_BYTES = 128 + 16
#: Python refuses to parse JSON integers longer than this (``sys.get_int_max_str_digits``).
_INT_DIGITS = 4300


def _kind(v) -> str:
    """A JSON value's kind for messages."""
    if v is None:
        return "null"
    return {bool: "boolean", int: "integer", float: "number", str: "string", list: "array",
            dict: "object"}.get(type(v), type(v).__name__)


def _brief(v, depth: int = 3, items: int = 8) -> str:
    """JSON-like text of ``v`` that stays short whatever ``v`` is: at most ``items`` members per
    array/object, ``depth`` levels, 40 characters per string (never recursing deeper)."""
    if type(v) is list:
        if not depth:
            return "[...]" if v else "[]"
        more = ", ..." if len(v) > items else ""
        return "[" + ", ".join(_brief(x, depth - 1, items) for x in v[:items]) + more + "]"
    if type(v) is dict:
        if not depth:
            return "{...}" if v else "{}"
        kv = [f"{_brief(k)}: {_brief(x, depth - 1, items)}" for k, x in list(v.items())[:items]]
        return "{" + ", ".join(kv) + (", ..." if len(v) > items else "") + "}"
    if type(v) is str:
        return json.dumps(v[:40]) + ("..." if len(v) > 40 else "")
    if type(v) is int and v.bit_length() > 200:
        return f"an integer of {len(str(abs(v))) if v.bit_length() < 14000 else 'over 4000'} digits"
    try:
        return json.dumps(v)
    except (TypeError, ValueError):
        return repr(v)


def _show(v, limit: int = 60) -> str:
    """A short rendering of a JSON value for messages (long or deep values are cut, never
    printed whole: a hostile index may hold megabytes, or 900 levels, in one field)."""
    s = _brief(v)
    return s if len(s) <= limit else s[:limit] + f"... ({_kind(v)})"


def _q(s) -> str:
    """``repr`` of a name, cut to 200 characters (a hostile index may hold a huge one)."""
    return repr(s) if len(s) <= 200 else repr(s[:200]) + f"... ({len(s)} characters)"


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
class _JsonProblem(ValueError):
    """Raised by the parse hooks; the walk of :func:`_locate` then finds where."""


def _pairs(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        raise _JsonProblem("duplicate key")
    return d


def _constant(name):
    raise _JsonProblem(f"{name} is not JSON")


_TOKEN = re.compile(r'\s*(?:("[^"\\]*(?:\\.[^"\\]*)*")|([{}\[\]:,])|(-?[0-9][0-9.eE+-]*)'
                    r'|(true|false|null|NaN|-?Infinity))', re.S)
_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def _path(stack) -> str:
    out = ""
    for is_obj, key, _ in stack:
        if key is None:
            continue
        if is_obj:
            out += f".{key}" if _IDENT.match(key) else f"[{_q(key)}]"
        else:
            out += f"[{key}]"
    out = out.lstrip(".") or "top level"
    return out if len(out) <= 160 else out[:100] + "..." + out[-40:]


def _locate(text: str, stop: int | None = None) -> tuple[str, str | None]:
    """Walk the index text to name where a parse failed: ``(where, problem)`` of the first
    duplicate key, nesting deeper than :data:`MAX_JSON_DEPTH`, integer too long to parse or
    NaN/Infinity; or where byte ``stop`` lies, with problem None. ``where`` is a JSON path
    (``tensors[3].shape[0]``), with the tensor's name when the walk has passed it. Slow (Python
    per token): run only on a failed parse."""
    stack = []      # frames [is_object, current key or index, keys seen]
    want_key = False
    name = None     # "name" of the tensor record being walked

    def where(frames):
        p = _path(frames)
        if name is not None and len(frames) >= 3 and frames[0][1] == "tensors":
            return f"tensor {_q(name)} ({p})"
        return p

    for m in _TOKEN.finditer(text):
        if stop is not None and m.end() > stop:
            break
        s, punct, num, lit = m.groups()
        if punct in ("{", "["):
            stack.append([punct == "{", None if punct == "{" else 0, set()])
            want_key = punct == "{"
            if len(stack) == 3:
                name = None
            if len(stack) > MAX_JSON_DEPTH:
                return where(stack[:-1]), f"nested deeper than {MAX_JSON_DEPTH} levels"
        elif punct in ("}", "]"):
            if stack:
                stack.pop()
            want_key = False
        elif punct == ",":
            if stack and stack[-1][0]:
                want_key = True
            elif stack:
                stack[-1][1] += 1
        elif punct == ":":
            want_key = False
        elif s is not None and stack and stack[-1][0]:
            try:
                v = json.loads(s)
            except ValueError:
                v = s
            frame = stack[-1]
            if want_key:
                frame[1] = v
                if v in frame[2]:
                    return where(stack), "the key appears twice in its object"
                frame[2].add(v)
            elif len(stack) == 3 and frame[1] == "name" and stack[0][1] == "tensors":
                name = v
        elif num is not None and num.lstrip("-").isdigit() and len(num.lstrip("-")) > _INT_DIGITS:
            return where(stack), f"an integer of {len(num.lstrip('-'))} digits"
        elif lit is not None and lit.lstrip("-") in ("NaN", "Infinity"):
            return where(stack), f"{lit} is not JSON"
    return where(stack), None


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
        index = json.loads(text, object_pairs_hook=_pairs, parse_constant=_constant)
    except (ValueError, RecursionError) as e:   # json.JSONDecodeError is a ValueError
        pos = getattr(e, "pos", None)
        where, problem = _locate(text, pos)
        if problem is None:
            problem = (getattr(e, "msg", None) or str(e))[:200]
            problem = f"{problem} (byte {pos})" if pos is not None else problem
        raise CorruptIndexError(f"{path}: index: {where}: {problem} (SPEC §2)") from None
    if type(index) is not dict:
        raise CorruptIndexError(f"{path}: index: top level: a JSON {_kind(index)}, expected an "
                                f"object with metadata, tensors and experts (SPEC §2)")
    return index


# -- index contents (SPEC §3-§6) ----------------------------------------------------------------
_ENTRY_FIELDS = {3: ("offset", "size", "crc32"), 4: ("offset", "size", "raw_size", "crc32")}


def _too_deep(v, limit: int) -> bool:
    """Whether a parsed JSON value nests more than ``limit`` arrays/objects (iterative)."""
    stack = [(v, 1)]
    while stack:
        x, d = stack.pop()
        kids = x.values() if type(x) is dict else x
        if d > limit:
            return True
        stack.extend((c, d + 1) for c in kids if type(c) in (dict, list))
    return False


def _meta_value_ok(t: str, v) -> str | None:
    """None if ``v`` is a valid value of SPEC §3 type ``t``, else what is wrong."""
    if t == "bool":
        return None if type(v) is bool else f"{_show(v)} is not true/false"
    if t == "int":
        if type(v) is not int:
            return f"{_show(v)} is not an integer"
        return None if -INT64_MAX - 1 <= v <= INT64_MAX else f"{_show(v)} is outside 64 bits"
    if t == "float":
        if type(v) not in (int, float):
            return f"{_show(v)} is not a number"
        try:
            return None if math.isfinite(v) else f"{_show(v)} is not finite"
        except OverflowError:
            return f"{_show(v)} is not a finite 64-bit float"
    if t == "str":
        return None if type(v) is str else f"{_show(v)} is not a string"
    if t in ("int[]", "float[]", "str[]"):
        if type(v) is not list:
            return f"{_show(v)} is not an array"
        for i, x in enumerate(v):
            err = _meta_value_ok(t[:-2], x)
            if err:
                return f"element {i}: {err}"
        return None
    return None   # json: any value


def _field(field) -> str:
    """A field name; ``(k, ci)`` is exponent chunk ``ci`` of part ``k``."""
    return field if type(field) is str else f"parts[{field[0]}].exp[{field[1]}]"


class _Checker:
    """One validation pass over a parsed index (see :func:`check_index`)."""

    def __init__(self, path, header):
        self.path = path
        self.lo, self.hi = header.data_offset, header.index_offset
        self.alignment = header.alignment
        self.version = header.version
        self.ranges = []     # (start, end, record, field) of every stored piece with bytes

    def fail(self, where, field, msg, cls=CorruptIndexError):
        raise cls(f"{self.path}: {where}: {_field(field)}: {msg}")

    # -- stored pieces ------------------------------------------------------------------------
    def entry(self, where, field, e, n):
        """A piece's ``[offset, size, (raw_size,) crc32]``: n integers, offset and size inside
        the data section, crc32 in 32 bits, raw_size >= 0. Returns it; records the range for the
        overlap check. ``field``: a name, or ``(part, chunk)`` for an exponent chunk (formatted
        only for a message: this runs once per stored piece)."""
        if type(e) is list and len(e) == n:
            off, size, crc = e[0], e[1], e[n - 1]
            if (type(off) is int and type(size) is int and type(crc) is int
                    and self.lo <= off and 0 <= size and off + size <= self.hi
                    and 0 <= crc <= 0xFFFFFFFF and (n == 3 or (type(e[2]) is int and e[2] >= 0))):
                if size:
                    self.ranges.append((off, off + size, where, field))
                return e
        self._bad_entry(where, _field(field), e, n)

    def _bad_entry(self, where, field, e, n):
        """Raise the precise error for an entry that failed :meth:`entry`'s test."""
        if not (type(e) is list and len(e) == n and all(type(x) is int for x in e)):
            names = _ENTRY_FIELDS[n]
            if type(e) is not list or len(e) != n:
                self.fail(where, field, f"{_show(e)} is not [{', '.join(names)}]")
            for x, nm in zip(e, names):
                if type(x) is not int:
                    self.fail(where, f"{field}.{nm}", f"{_show(x)} is not an integer")
        off, size = e[0], e[1]
        if size < 0:
            self.fail(where, f"{field}.size", f"{size} is negative")
        if off < self.lo or off + size > self.hi:
            self.fail(where, field, f"byte range [{off}, {off + size}) outside the data section "
                                    f"[{self.lo}, {self.hi}) (SPEC §2)")
        if not 0 <= e[-1] <= 0xFFFFFFFF:
            self.fail(where, f"{field}.crc32", f"{_show(e[-1])} is not a 32-bit CRC")
        self.fail(where, f"{field}.raw_size", f"{e[2]} is negative")

    # -- metadata (SPEC §3) ---------------------------------------------------------------------
    def metadata(self, md):
        if type(md) is not dict:
            self.fail("index", "metadata", f"a JSON {_kind(md)}, expected an object (SPEC §3)")
        for key, entry in md.items():
            where = f"metadata {_q(key)}"
            if type(entry) is not dict or "type" not in entry or "value" not in entry:
                self.fail(where, "entry", f"{_show(entry)} is not {{\"type\": T, \"value\": V}} "
                                          f"(SPEC §3)")
            t, v = entry["type"], entry["value"]
            if type(t) is not str or t not in META_TYPES:
                self.fail(where, "type", f"{_show(t)} is not one of {', '.join(META_TYPES)} "
                                         f"(SPEC §3)")
            err = _meta_value_ok(t, v)
            if err is None and t == "json" and type(v) in (dict, list) \
                    and _too_deep(v, MAX_JSON_DEPTH - 3):
                err = f"nested deeper than {MAX_JSON_DEPTH} levels"
            if err:
                self.fail(where, "value", f"{err} (type {t}, SPEC §3)")

    # -- tensor records (SPEC §4, §5) -----------------------------------------------------------
    def tensor(self, i, t, names):
        if type(t) is not dict:
            self.fail("index", f"tensors[{i}]", f"{_show(t)} is not a tensor record (SPEC §4)")
        name = t.get("name")
        if type(name) is not str:
            self.fail(f"tensors[{i}]", "name", f"{_show(name)} is not a string")
        where = f"tensor {_q(name)}"
        if name in names:
            self.fail(where, "name", f"listed twice (tensors[{names[name]}] and tensors[{i}])")
        names[name] = i
        dtype = t.get("dtype")
        if type(dtype) is not str or dtype not in DTYPE_SIZES:
            self.fail(where, "dtype", f"{_show(dtype)} is not one of {', '.join(DTYPE_SIZES)}")
        size = DTYPE_SIZES[dtype]
        shape = t.get("shape")
        if type(shape) is not list or len(shape) > MAX_NDIM:
            self.fail(where, "shape", f"{_show(shape)} is not a list of at most {MAX_NDIM} "
                                      f"dimensions")
        n = nonzero = 1
        for j, d in enumerate(shape):
            if type(d) is not int:
                self.fail(where, f"shape[{j}]", f"{_show(d)} is not an integer")
            if d < 0:
                self.fail(where, f"shape[{j}]", f"{d} is negative")
            n *= d
            nonzero *= d or 1
            if nonzero * size > INT64_MAX:
                self.fail(where, "shape", f"{_show(shape)} of {dtype} is more than 2^63 bytes")
        enc = t.get("encoding")
        if type(enc) is not str or enc not in (ENC_RAW, ENC_BITPLANE):
            self.fail(where, "encoding", f"{_show(enc)} is not {ENC_RAW!r} or {ENC_BITPLANE!r}")
        codec = None
        if enc == ENC_BITPLANE:
            if dtype not in BITPLANE_DTYPES:
                self.fail(where, "encoding", f"bit-plane encoding of a {dtype} tensor (only "
                                             f"{', '.join(BITPLANE_DTYPES)}, SPEC §5.1)")
            codec = t.get("exp_codec", EXP_ZSTD if self.version == 1 else None)
            if codec is None:
                self.fail(where, "exp_codec", "missing: a bit-plane tensor names its exponent "
                                              "codec (SPEC §4)")
            if type(codec) is not str:
                self.fail(where, "exp_codec", f"{_show(codec)} is not a string")
            if self.version == 1 and codec != EXP_ZSTD:
                self.fail(where, "exp_codec", f"a version-1 file holds only zstd exponent "
                                              f"chunks, not {_q(codec)} (SPEC §5.2)")
            if codec not in EXP_CODECS:
                self.fail(where, "exp_codec", f"exponent codec {_q(codec)} unknown to this reader "
                                              f"(known: {', '.join(EXP_CODECS)}; a newer zipmoe-rt "
                                              f"may read it)", UnsupportedCodecError)
        ex = t.get("expert")
        stacked = False
        if "expert" in t:
            if type(ex) is not dict:
                self.fail(where, "expert", f"{_show(ex)} is not an object (SPEC §4)")
            for k in ("layer",) + (() if ex.get("stacked") is True else ("expert",)):
                v = ex.get(k)
                if type(v) is not int or not 0 <= v <= INT64_MAX:
                    self.fail(where, f"expert.{k}", f"{_show(v)} is not an integer >= 0")
            if type(ex.get("role")) is not str:
                self.fail(where, "expert.role", f"{_show(ex.get('role'))} is not a string")
            stacked = ex.get("stacked", False)
            if type(stacked) is not bool:
                self.fail(where, "expert.stacked", f"{_show(stacked)} is not true/false")
        if stacked:
            if not shape or shape[0] < 1:
                self.fail(where, "shape", f"{_show(shape)}: a stacked tensor's first dimension "
                                          f"counts its experts, at least 1 (SPEC §4)")
            nparts, per = shape[0], n // shape[0]
        else:
            nparts, per = 1, n
        parts = t.get("parts")
        if type(parts) is not list:
            self.fail(where, "parts", f"{_show(parts)} is not a list of parts (SPEC §4)")
        if len(parts) != nparts:
            self.fail(where, "parts", f"{len(parts)} parts, expected {nparts}"
                                      + (f" (one per expert: shape[0] of {_show(shape)})"
                                         if stacked else ""))
        for k, p in enumerate(parts):
            self.part(where, k, p, dtype, shape, enc, codec, per, ex if "expert" in t else None,
                      stacked)

    def part(self, where, k, p, dtype, shape, enc, codec, per, ex, stacked):
        f = f"parts[{k}]"
        if type(p) is not dict:
            self.fail(where, f, f"{_show(p)} is not an object (SPEC §4)")
        if "expert" in p:
            want = None if ex is None else k if stacked else ex.get("expert")
            if type(p["expert"]) is not int or p["expert"] != want:
                self.fail(where, f"{f}.expert", f"{_show(p['expert'])}, expected {want} "
                                                + ("(a dense tensor)" if ex is None else ""))

        def what():
            return f"shape {_show(shape)} ({per} elements{' per part' if stacked else ''})"
        if enc == ENC_RAW:
            if "sm" in p or "exp" in p:
                self.fail(where, f, "a raw tensor's part holds bit-planes (sm/exp) (SPEC §4)")
            off, size, _ = self.entry(where, f"{f}.raw", p.get("raw"), 3)
            need = per * DTYPE_SIZES[dtype]
            if size != need:
                self.fail(where, f"{f}.raw.size",
                          f"{size} bytes, but {dtype} {what()} needs {need}")
            first = off
        else:
            if "raw" in p:
                self.fail(where, f, "a bit-plane tensor's part holds raw data (SPEC §4)")
            off, size, _ = self.entry(where, f"{f}.sm", p.get("sm"), 3)
            sb = BITPLANE_DTYPES[dtype][3]
            chunks = p.get("exp")
            if type(chunks) is not list or not chunks:
                self.fail(where, f"{f}.exp", f"{_show(chunks)} is not a non-empty list of "
                                             f"exponent chunks (SPEC §5.2)")
            total = 0
            huff = codec == EXP_HUFFMAN
            for ci, c in enumerate(chunks):
                self.entry(where, (k, ci), c, 4)
                raw = c[2]
                if raw == 0 and per:
                    self.fail(where, f"{f}.exp[{ci}].raw_size",
                              "0: every chunk of a non-empty plane holds exponents (SPEC §5.2)")
                if huff and (c[1] < HUFFMAN_HEADER_BYTES
                             or raw > 8 * (c[1] - HUFFMAN_HEADER_BYTES)):
                    self.fail(where, f"{f}.exp[{ci}].raw_size",
                              f"{raw} exponents cannot be coded in a Huffman chunk of {c[1]} bytes "
                              f"({HUFFMAN_HEADER_BYTES}-byte header, then at least 1 bit each, "
                              f"SPEC §5.3)")
                total += raw
            if total != per:
                self.fail(where, f"{f}.exp", f"exponent chunks hold {total} exponents (sum of "
                                             f"raw_size), but {what()}")
            if not per and len(chunks) != 1:
                self.fail(where, f"{f}.exp", f"{len(chunks)} chunks for 0 exponents (one empty "
                                             f"chunk, SPEC §5.2)")
            if size != per * sb:
                self.fail(where, f"{f}.sm.size", f"sign+mantissa plane of {size} bytes, but "
                                                  f"{dtype} {what()} needs {per * sb} "
                                                  f"({sb} per element, SPEC §5.1)")
            first = off
        if ex is None and k == 0 and first % DENSE_ALIGNMENT:
            self.fail(where, f"{f}.{'raw' if enc == ENC_RAW else 'sm'}.offset",
                      f"{first} is not a multiple of {DENSE_ALIGNMENT} (dense tensors start "
                      f"aligned, SPEC §6)")

    # -- expert blocks (SPEC §6) ----------------------------------------------------------------
    def region(self, where, field, r):
        if not (type(r) is list and len(r) == 2 and all(type(x) is int for x in r)):
            self.fail(where, field, f"{_show(r)} is not [offset, size]")
        off, size = r
        if off < self.lo or size < 0 or off + size > self.hi:
            self.fail(where, field, f"byte range [{off}, {off + size}) outside the data section "
                                    f"[{self.lo}, {self.hi}) (SPEC §2)")
        if off % self.alignment:
            self.fail(where, f"{field}.offset", f"{off} is not a multiple of the alignment "
                                                f"{self.alignment} (SPEC §6)")
        return off, off + size

    def blocks(self, experts, records):
        if type(experts) is not list:
            self.fail("index", "experts", f"a JSON {_kind(experts)}, expected an array (SPEC §6)")
        seen, covered, regions = {}, set(), []
        for i, b in enumerate(experts):
            if type(b) is not dict:
                self.fail("index", f"experts[{i}]", f"{_show(b)} is not an expert block (SPEC §6)")
            for k in ("layer", "expert"):
                if type(b.get(k)) is not int or not 0 <= b[k] <= INT64_MAX:
                    self.fail(f"experts[{i}]", k, f"{_show(b.get(k))} is not an integer >= 0")
            layer, e = b["layer"], b["expert"]
            where = f"expert block {layer}/{e}"
            if (layer, e) in seen:
                self.fail(where, "layer/expert", f"listed twice (experts[{seen[(layer, e)]}] and "
                                                 f"experts[{i}])")
            seen[(layer, e)] = i
            sm = self.region(where, "sm", b.get("sm"))
            exp = self.region(where, "exp", b.get("exp"))
            regions += [(sm[0], sm[1], where, "sm"), (exp[0], exp[1], where, "exp")]
            names = b.get("tensors")
            if type(names) is not list or not names:
                self.fail(where, "tensors", f"{_show(names)} is not a non-empty list of tensor "
                                            f"names")
            roles = {}
            for j, name in enumerate(names):
                t = records.get(name) if type(name) is str else None
                if t is None:
                    self.fail(where, f"tensors[{j}]", f"{_show(name)} is not a tensor of the index")
                ex = t.get("expert")
                if ex is None:
                    self.fail(where, f"tensors[{j}]",
                              f"tensor {_q(name)} is dense (no expert field)")
                if ex["layer"] != layer:
                    self.fail(where, f"tensors[{j}]",
                              f"tensor {_q(name)} is of layer {ex['layer']}")
                if ex.get("stacked") is True:
                    k = e
                    if k >= len(t["parts"]):
                        self.fail(where, f"tensors[{j}]", f"stacked tensor {_q(name)} has "
                                                          f"{len(t['parts'])} parts, none for "
                                                          f"expert {e}")
                else:
                    k = 0
                    if ex["expert"] != e:
                        self.fail(where, f"tensors[{j}]", f"tensor {_q(name)} is of expert "
                                                          f"{ex['expert']}")
                if (name, k) in covered:
                    self.fail(where, f"tensors[{j}]", f"tensor {_q(name)} part {k} is listed by "
                                                      f"another block or twice in this one")
                covered.add((name, k))
                if ex["role"] in roles:
                    self.fail(where, f"tensors[{j}]", f"role {_q(ex['role'])} of tensor {_q(name)} "
                                                      f"is also that of {_q(roles[ex['role']])}")
                roles[ex["role"]] = name
                p = t["parts"][k]
                tw = f"tensor {_q(name)}"
                for key in ("raw", "sm"):
                    if key in p:
                        o, s = p[key][0], p[key][1]
                        if o < sm[0] or o + s > sm[1]:
                            self.fail(tw, f"parts[{k}].{key}",
                                      f"[{o}, {o + s}) lies outside the sm region "
                                      f"[{sm[0]}, {sm[1]}) of {where} (SPEC §6)")
                for ci, c in enumerate(p.get("exp", ())):
                    if c[0] < exp[0] or c[0] + c[1] > exp[1]:
                        self.fail(tw, f"parts[{k}].exp[{ci}]",
                                  f"[{c[0]}, {c[0] + c[1]}) lies outside the exp region "
                                  f"[{exp[0]}, {exp[1]}) of {where} (SPEC §6)")
        for name, t in records.items():
            if "expert" in t:
                for k in range(len(t["parts"])):
                    if (name, k) not in covered:
                        self.fail(f"tensor {_q(name)}", f"parts[{k}]",
                                  "in no expert block (SPEC §6)")
        self.disjoint(regions, "expert regions")

    def disjoint(self, ranges, what):
        ranges = sorted((r for r in ranges if r[1] > r[0]), key=lambda r: r[:2])
        for a, b in zip(ranges, ranges[1:]):
            if b[0] < a[1]:
                self.fail(b[2], b[3], f"[{b[0]}, {b[1]}) overlaps {a[2]} {_field(a[3])} "
                                      f"[{a[0]}, {a[1]}) "
                                      f"({what} never share bytes, SPEC §9)")


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
    c = _Checker(path, header)
    for key in ("metadata", "tensors", "experts"):
        if key not in index:
            c.fail("index", key, "missing (SPEC §2)")
    c.metadata(index["metadata"])
    tensors = index["tensors"]
    if type(tensors) is not list:
        c.fail("index", "tensors", f"a JSON {_kind(tensors)}, expected an array (SPEC §4)")
    names = {}
    for i, t in enumerate(tensors):
        c.tensor(i, t, names)
    c.blocks(index["experts"], {t["name"]: t for t in tensors})
    c.disjoint(c.ranges, "stored pieces")
