"""Structural invariants of a parsed ``.zmoe`` index: metadata entries (format/SPEC.md §3),
tensor records and their stored pieces (§4, §5), expert blocks (§6), and that no two stored
pieces and no two expert regions share a byte (§9).

:class:`IndexChecker` is one pass over a parsed index, in pure Python: O(number of stored
pieces) plus one sort, and no tensor byte is read. :func:`zmoe.validate.check_index` drives it;
every error is a :class:`~zmoe.errors.ZmoeError` naming the file, the record and the field.
"""
from __future__ import annotations

import math

from .constants import (BITPLANE_DTYPES, DENSE_ALIGNMENT, DTYPE_SIZES, ENC_BITPLANE, ENC_MXFP4,
                        ENC_RAW, EXP_CODECS, EXP_HUFFMAN, EXP_ZSTD, EXPONENT_ONLY_DTYPES,
                        META_TYPES, NIBBLE_PLANE_DTYPES, VERSION_LOWPREC)
from .errors import CorruptIndexError, UnsupportedCodecError
from .fp8 import sm_bytes as nibble_sm_bytes
from .validate_json import MAX_JSON_DEPTH, json_kind, quote_name, show

#: Most dimensions of a tensor shape.
MAX_NDIM = 32
INT64_MAX = (1 << 63) - 1
#: Bytes before the streams of a Huffman exponent chunk (SPEC §5.3: code lengths, stream sizes).
HUFFMAN_HEADER_BYTES = 128 + 16
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
        return None if type(v) is bool else f"{show(v)} is not true/false"
    if t == "int":
        if type(v) is not int:
            return f"{show(v)} is not an integer"
        return None if -INT64_MAX - 1 <= v <= INT64_MAX else f"{show(v)} is outside 64 bits"
    if t == "float":
        if type(v) not in (int, float):
            return f"{show(v)} is not a number"
        try:
            return None if math.isfinite(v) else f"{show(v)} is not finite"
        except OverflowError:
            return f"{show(v)} is not a finite 64-bit float"
    if t == "str":
        return None if type(v) is str else f"{show(v)} is not a string"
    if t in ("int[]", "float[]", "str[]"):
        if type(v) is not list:
            return f"{show(v)} is not an array"
        for i, x in enumerate(v):
            err = _meta_value_ok(t[:-2], x)
            if err:
                return f"element {i}: {err}"
        return None
    return None   # json: any value


def _field(field) -> str:
    """A field name; ``(k, ci)`` is exponent chunk ``ci`` of part ``k``."""
    return field if type(field) is str else f"parts[{field[0]}].exp[{field[1]}]"


class IndexChecker:
    """One validation pass over a parsed index (see :func:`zmoe.validate.check_index`, which
    calls :meth:`metadata`, :meth:`tensor` per record, :meth:`blocks`, then :meth:`disjoint`
    over :attr:`ranges`)."""

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
                self.fail(where, field, f"{show(e)} is not [{', '.join(names)}]")
            for x, nm in zip(e, names):
                if type(x) is not int:
                    self.fail(where, f"{field}.{nm}", f"{show(x)} is not an integer")
        off, size = e[0], e[1]
        if size < 0:
            self.fail(where, f"{field}.size", f"{size} is negative")
        if off < self.lo or off + size > self.hi:
            self.fail(where, field, f"byte range [{off}, {off + size}) outside the data section "
                                    f"[{self.lo}, {self.hi}) (SPEC §2)")
        if not 0 <= e[-1] <= 0xFFFFFFFF:
            self.fail(where, f"{field}.crc32", f"{show(e[-1])} is not a 32-bit CRC")
        self.fail(where, f"{field}.raw_size", f"{e[2]} is negative")

    # -- metadata (SPEC §3) ---------------------------------------------------------------------
    def metadata(self, md):
        if type(md) is not dict:
            self.fail("index", "metadata", f"a JSON {json_kind(md)}, expected an object (SPEC §3)")
        for key, entry in md.items():
            where = f"metadata {quote_name(key)}"
            if type(entry) is not dict or "type" not in entry or "value" not in entry:
                self.fail(where, "entry", f"{show(entry)} is not {{\"type\": T, \"value\": V}} "
                                          f"(SPEC §3)")
            t, v = entry["type"], entry["value"]
            if type(t) is not str or t not in META_TYPES:
                self.fail(where, "type", f"{show(t)} is not one of {', '.join(META_TYPES)} "
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
            self.fail("index", f"tensors[{i}]", f"{show(t)} is not a tensor record (SPEC §4)")
        name = t.get("name")
        if type(name) is not str:
            self.fail(f"tensors[{i}]", "name", f"{show(name)} is not a string")
        where = f"tensor {quote_name(name)}"
        if name in names:
            self.fail(where, "name", f"listed twice (tensors[{names[name]}] and tensors[{i}])")
        names[name] = i
        dtype = t.get("dtype")
        if type(dtype) is not str or dtype not in DTYPE_SIZES:
            self.fail(where, "dtype", f"{show(dtype)} is not one of {', '.join(DTYPE_SIZES)}")
        size = DTYPE_SIZES[dtype]
        shape = t.get("shape")
        if type(shape) is not list or len(shape) > MAX_NDIM:
            self.fail(where, "shape", f"{show(shape)} is not a list of at most {MAX_NDIM} "
                                      f"dimensions")
        n = nonzero = 1
        for j, d in enumerate(shape):
            if type(d) is not int:
                self.fail(where, f"shape[{j}]", f"{show(d)} is not an integer")
            if d < 0:
                self.fail(where, f"shape[{j}]", f"{d} is negative")
            n *= d
            nonzero *= d or 1
            if nonzero * size > INT64_MAX:
                self.fail(where, "shape", f"{show(shape)} of {dtype} is more than 2^63 bytes")
        enc = t.get("encoding")
        if type(enc) is not str or enc not in (ENC_RAW, ENC_BITPLANE, ENC_MXFP4):
            self.fail(where, "encoding", f"{show(enc)} is not {ENC_RAW!r}, {ENC_BITPLANE!r} or "
                                         f"{ENC_MXFP4!r}")
        if enc == ENC_MXFP4 and (dtype != "U8" or not shape or shape[-1] != 16
                                 or self.version < VERSION_LOWPREC):
            self.fail(where, "encoding", f"mxfp4 blocks are U8 [..., 16] from version "
                                         f"{VERSION_LOWPREC} (SPEC §5.4), not {dtype} "
                                         f"{show(shape)} in a version-{self.version} file")
        codec = None
        planes = (*BITPLANE_DTYPES, *NIBBLE_PLANE_DTYPES, *EXPONENT_ONLY_DTYPES)
        if enc == ENC_BITPLANE:
            if dtype not in planes:
                self.fail(where, "encoding", f"bit-plane encoding of a {dtype} tensor (only "
                                             f"{', '.join(planes)}, SPEC §5.1)")
            if dtype not in BITPLANE_DTYPES and self.version < VERSION_LOWPREC:
                self.fail(where, "encoding", f"bit-plane encoding of a {dtype} tensor in a "
                                             f"version-{self.version} file (from version "
                                             f"{VERSION_LOWPREC}, SPEC §8)")
            codec = t.get("exp_codec", EXP_ZSTD if self.version == 1 else None)
            if codec is None:
                self.fail(where, "exp_codec", "missing: a bit-plane tensor names its exponent "
                                              "codec (SPEC §4)")
            if type(codec) is not str:
                self.fail(where, "exp_codec", f"{show(codec)} is not a string")
            if self.version == 1 and codec != EXP_ZSTD:
                self.fail(where, "exp_codec", f"a version-1 file holds only zstd exponent "
                                              f"chunks, not {quote_name(codec)} (SPEC §5.2)")
            if codec not in EXP_CODECS:
                self.fail(where, "exp_codec", f"exponent codec {quote_name(codec)} unknown to this "
                                              f"reader (known: {', '.join(EXP_CODECS)}; a newer "
                                              f"zipmoe-rt may read it)", UnsupportedCodecError)
        ex = t.get("expert")
        stacked = False
        if "expert" in t:
            if type(ex) is not dict:
                self.fail(where, "expert", f"{show(ex)} is not an object (SPEC §4)")
            for k in ("layer",) + (() if ex.get("stacked") is True else ("expert",)):
                v = ex.get(k)
                if type(v) is not int or not 0 <= v <= INT64_MAX:
                    self.fail(where, f"expert.{k}", f"{show(v)} is not an integer >= 0")
            if type(ex.get("role")) is not str:
                self.fail(where, "expert.role", f"{show(ex.get('role'))} is not a string")
            stacked = ex.get("stacked", False)
            if type(stacked) is not bool:
                self.fail(where, "expert.stacked", f"{show(stacked)} is not true/false")
        if stacked:
            if not shape or shape[0] < 1:
                self.fail(where, "shape", f"{show(shape)}: a stacked tensor's first dimension "
                                          f"counts its experts, at least 1 (SPEC §4)")
            nparts, per = shape[0], n // shape[0]
        else:
            nparts, per = 1, n
        parts = t.get("parts")
        if type(parts) is not list:
            self.fail(where, "parts", f"{show(parts)} is not a list of parts (SPEC §4)")
        if len(parts) != nparts:
            self.fail(where, "parts", f"{len(parts)} parts, expected {nparts}"
                                      + (f" (one per expert: shape[0] of {show(shape)})"
                                         if stacked else ""))
        for k, p in enumerate(parts):
            self.part(where, k, p, dtype, shape, enc, codec, per, ex if "expert" in t else None,
                      stacked)

    def part(self, where, k, p, dtype, shape, enc, codec, per, ex, stacked):
        f = f"parts[{k}]"
        if type(p) is not dict:
            self.fail(where, f, f"{show(p)} is not an object (SPEC §4)")
        if "expert" in p:
            want = None if ex is None else k if stacked else ex.get("expert")
            if type(p["expert"]) is not int or p["expert"] != want:
                self.fail(where, f"{f}.expert", f"{show(p['expert'])}, expected {want} "
                                                + ("(a dense tensor)" if ex is None else ""))

        def what():
            return f"shape {show(shape)} ({per} elements{' per part' if stacked else ''})"
        if enc in (ENC_RAW, ENC_MXFP4):
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
            need_sm = nibble_sm_bytes(per) if dtype in NIBBLE_PLANE_DTYPES \
                else 0 if dtype in EXPONENT_ONLY_DTYPES else per * BITPLANE_DTYPES[dtype][3]
            chunks = p.get("exp")
            if type(chunks) is not list or not chunks:
                self.fail(where, f"{f}.exp", f"{show(chunks)} is not a non-empty list of "
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
            if size != need_sm:
                per_el = "two per byte" if dtype in NIBBLE_PLANE_DTYPES \
                    else "none: exponents only" if dtype in EXPONENT_ONLY_DTYPES \
                    else f"{BITPLANE_DTYPES[dtype][3]} per element"
                self.fail(where, f"{f}.sm.size", f"sign+mantissa plane of {size} bytes, but "
                                                  f"{dtype} {what()} needs {need_sm} "
                                                  f"({per_el}, SPEC §5.1)")
            first = off
        if ex is None and k == 0 and first % DENSE_ALIGNMENT:
            self.fail(where, f"{f}.{'sm' if enc == ENC_BITPLANE else 'raw'}.offset",
                      f"{first} is not a multiple of {DENSE_ALIGNMENT} (dense tensors start "
                      f"aligned, SPEC §6)")

    # -- expert blocks (SPEC §6) ----------------------------------------------------------------
    def region(self, where, field, r):
        if not (type(r) is list and len(r) == 2 and all(type(x) is int for x in r)):
            self.fail(where, field, f"{show(r)} is not [offset, size]")
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
            self.fail("index", "experts",
                      f"a JSON {json_kind(experts)}, expected an array (SPEC §6)")
        seen, covered, regions = {}, set(), []
        for i, b in enumerate(experts):
            if type(b) is not dict:
                self.fail("index", f"experts[{i}]", f"{show(b)} is not an expert block (SPEC §6)")
            for k in ("layer", "expert"):
                if type(b.get(k)) is not int or not 0 <= b[k] <= INT64_MAX:
                    self.fail(f"experts[{i}]", k, f"{show(b.get(k))} is not an integer >= 0")
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
                self.fail(where, "tensors", f"{show(names)} is not a non-empty list of tensor "
                                            f"names")
            roles = {}
            for j, name in enumerate(names):
                t = records.get(name) if type(name) is str else None
                if t is None:
                    self.fail(where, f"tensors[{j}]", f"{show(name)} is not a tensor of the index")
                ex = t.get("expert")
                if ex is None:
                    self.fail(where, f"tensors[{j}]",
                              f"tensor {quote_name(name)} is dense (no expert field)")
                if ex["layer"] != layer:
                    self.fail(where, f"tensors[{j}]",
                              f"tensor {quote_name(name)} is of layer {ex['layer']}")
                if ex.get("stacked") is True:
                    k = e
                    if k >= len(t["parts"]):
                        self.fail(where, f"tensors[{j}]", f"stacked tensor {quote_name(name)} has "
                                                          f"{len(t['parts'])} parts, none for "
                                                          f"expert {e}")
                else:
                    k = 0
                    if ex["expert"] != e:
                        self.fail(where, f"tensors[{j}]", f"tensor {quote_name(name)} is of expert "
                                                          f"{ex['expert']}")
                if (name, k) in covered:
                    self.fail(where, f"tensors[{j}]",
                              f"tensor {quote_name(name)} part {k} is listed "
                              f"by another block or twice in this one")
                covered.add((name, k))
                if ex["role"] in roles:
                    self.fail(where, f"tensors[{j}]",
                              f"role {quote_name(ex['role'])} of tensor {quote_name(name)} "
                              f"is also that of {quote_name(roles[ex['role']])}")
                roles[ex["role"]] = name
                p = t["parts"][k]
                tw = f"tensor {quote_name(name)}"
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
                        self.fail(f"tensor {quote_name(name)}", f"parts[{k}]",
                                  "in no expert block (SPEC §6)")
        self.disjoint(regions, "expert regions")

    def disjoint(self, ranges, what):
        ranges = sorted((r for r in ranges if r[1] > r[0]), key=lambda r: r[:2])
        for a, b in zip(ranges, ranges[1:]):
            if b[0] < a[1]:
                self.fail(b[2], b[3], f"[{b[0]}, {b[1]}) overlaps {a[2]} {_field(a[3])} "
                                      f"[{a[0]}, {a[1]}) "
                                      f"({what} never share bytes, SPEC §9)")
