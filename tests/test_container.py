"""The ``.zmoe`` container (format/SPEC.md §1-§4, §6-§8): writer/reader round trip, layout
invariants and corruption handling.

The header and index are parsed here by hand from the SPEC, so these tests check the file
against the contract rather than the reader against the writer.
"""
from __future__ import annotations

import json
import struct
import zlib
from pathlib import Path

import numpy as np
import pytest
import zstandard as zstd

import zmoe
from zmoe_edit import fix_header_crc, mutate, rewrite_index, set_version
from zmoe import (ChecksumError, CorruptIndexError, ExpertPiece, NotZmoeError, TruncatedFileError,
                  UnsupportedCodecError, UnsupportedVersionError, ZmoeError, ZmoeReader, ZmoeWriter,
                  encode_expert)

ALIGN = 4096
NP = {"BF16": np.uint16, "F16": np.uint16, "F32": np.uint32, "I64": np.int64, "BOOL": np.uint8,
      "I32": np.int32}
SIZE = {"BF16": 2, "F16": 2, "F32": 4, "I64": 8, "BOOL": 1, "I32": 4}

METADATA = {
    # key: (value, explicit type or None for inferred, expected type)
    "m.bool_t": (True, None, "bool"),
    "m.bool_f": (False, "bool", "bool"),
    "m.int": (30, None, "int"),
    "m.int_min": (-2**63, "int", "int"),
    "m.int_max": (2**63 - 1, "int", "int"),
    "m.float": (1e-6, None, "float"),
    "m.float_neg": (-123456.789, "float", "float"),
    "m.float_tiny": (5e-324, "float", "float"),
    "m.str": ("MixtralForCausalLM", None, "str"),
    "m.str_unicode": ("héllo \u4e16\u754c \U0001F600 \"q\" \\ \n\t\x00", "str", "str"),
    "m.str_empty": ("", "str", "str"),
    "m.int_arr": ([0, 1, 3, -7, 2**40], None, "int[]"),
    "m.float_arr": ([0.5, -1.25, 1e300], None, "float[]"),
    "m.str_arr": (["a", "", "ü"], None, "str[]"),
    "m.json_obj": ({"rope_type": "yarn", "factor": 4.0, "nested": {"x": [1, None]}}, "json", "json"),
    "m.json_mixed": ([1, "a", None, 2.5, True], None, "json"),
    "m.json_null": (None, "json", "json"),
    "m.json_empty_list": ([], "json", "json"),
}


def _rng_words(rng, dtype, shape):
    n = int(np.prod(shape, dtype=np.int64))
    if dtype == "BOOL":
        return rng.integers(0, 2, n).astype(np.uint8).reshape(shape)
    if dtype in ("I64", "I32"):
        return rng.integers(-2**31, 2**31, n).astype(NP[dtype]).reshape(shape)
    hi = 1 << (8 * SIZE[dtype])
    w = rng.integers(0, hi, n, dtype=np.uint64).astype(NP[dtype])
    return w.reshape(shape)


DENSE = [
    # name, dtype, shape, requested encoding, expected stored encoding
    ("model.embed_tokens.weight", "BF16", (11, 5), "raw", "raw"),
    ("model.norm.weight", "F16", (7,), "raw", "raw"),
    ("router.f32", "F32", (2, 3), "raw", "raw"),
    ("buffer.i64", "I64", (4,), "raw", "raw"),
    ("mask.bool", "BOOL", (5,), "raw", "raw"),
    ("empty.bf16", "BF16", (0, 4), "raw", "raw"),
    ("bp.bf16", "BF16", (300,), "bitplane", "bitplane"),
    ("bp.f16", "F16", (17, 3), "bitplane", "bitplane"),
    ("bp.f32", "F32", (50,), "bitplane", "bitplane"),
    ("bp.empty", "BF16", (0,), "bitplane", "bitplane"),
    ("bp.i64_falls_back", "I64", (3,), "bitplane", "raw"),
]
I, H = 48, 8
E0 = 3  # experts in layer 0
STACKED = "model.layers.0.mlp.experts.gate_up_proj"


def _expert_names(layer, e):
    p = f"model.layers.{layer}.block_sparse_moe.experts.{e}"
    return f"{p}.w1.weight", f"{p}.w3.weight", f"{p}.w2.weight"


def build(path: Path, alignment=ALIGN, seed=0, exp_codec=None):
    """Write the reference file; return the source: {name: (dtype, shape, array)}.
    ``exp_codec``: exponent-chunk codec of every bit-plane tensor (None: the writer's default)."""
    kw = {} if exp_codec is None else {"exp_codec": exp_codec}
    rng = np.random.default_rng(seed)
    src = {}
    w = ZmoeWriter(path, alignment=alignment) if alignment != ALIGN else ZmoeWriter(path)
    for k, (v, t, _) in METADATA.items():
        w.add_metadata(k, v, t) if t else w.add_metadata(k, v)
    for name, dtype, shape, enc, _ in DENSE:
        a = _rng_words(rng, dtype, shape)
        if dtype == "BF16" and a.size >= 4:
            a.reshape(-1)[:4] = [0x8000, 0x7F80, 0xFFC1, 0x0001]
        src[name] = (dtype, shape, a)
        # flat view: a multi-dimensional *empty* ndarray is not accepted (see
        # test_writer_accepts_empty_multidim_array)
        w.add_tensor(name, dtype, shape, a.reshape(-1), encoding=enc, chunks=3, min_chunk=64, **kw)
    stacked = _rng_words(rng, "BF16", (E0, 2 * 16, H))
    for e in range(E0):
        g, u, d = _expert_names(0, e)
        pieces = []
        for name, role, shape in ((g, "gate", (I, H)), (u, "up", (I, H)), (d, "down", (H, I))):
            a = _rng_words(rng, "BF16", shape)
            a.reshape(-1)[:3] = [0x8000, 0xFF80, 0x7F81]
            src[name] = ("BF16", shape, a)
            pieces.append(ExpertPiece(name, "BF16", shape, role, a))
        pieces.append(ExpertPiece(STACKED, "BF16", stacked.shape, "gate_up", stacked[e], part=e))
        src.setdefault(STACKED, ("BF16", stacked.shape, stacked))
        w.write_expert(encode_expert(0, e, pieces, chunks=3, min_chunk=64, **kw))
    for e in range(2):  # layer 1: F32, F16 and a raw (non-float) piece
        p = f"model.layers.1.mlp.experts.{e}"
        specs = [(f"{p}.gate_proj.weight", "F32", (6, H), "gate"),
                 (f"{p}.up_proj.weight", "F16", (6, H), "up"),
                 (f"{p}.down_proj.weight", "F32", (H, 6), "down"),
                 (f"{p}.scales", "I32", (3,), "scales")]
        pieces = []
        for name, dtype, shape, role in specs:
            a = _rng_words(rng, dtype, shape)
            src[name] = (dtype, shape, a)
            pieces.append(ExpertPiece(name, dtype, shape, role, a))
        w.write_expert(encode_expert(1, e, pieces, chunks=2, min_chunk=16, **kw))
    w.close()
    return src


@pytest.fixture(scope="module", params=["huffman", "zstd"])
def exp_codec(request):
    """The exponent-chunk codec (SPEC §5.2) the reference file is written with."""
    return request.param


@pytest.fixture(scope="module")
def good(tmp_path_factory, exp_codec):
    path = tmp_path_factory.mktemp("zmoe") / f"good-{exp_codec}.zmoe"
    src = build(path, exp_codec=exp_codec)
    return path, src


def parse(path: Path):
    """Header fields and the index, per SPEC §1-§2 (independent of the reader)."""
    b = path.read_bytes()
    magic, version, ioff, isize, doff, fsize, align, icrc = struct.unpack_from("<4sIQQQQII", b, 0)
    hcrc, = struct.unpack_from("<I", b, 60)
    index = json.loads(b[ioff:ioff + isize].decode("utf-8"))
    return dict(magic=magic, version=version, index_offset=ioff, index_size=isize,
                data_offset=doff, file_size=fsize, alignment=align, index_crc32=icrc,
                reserved=b[48:60], header_crc32=hcrc, raw=b), index


def as_bytes(a):
    return np.ascontiguousarray(a).reshape(-1).view(np.uint8).tobytes()


# ---------------------------------------------------------------------------------------------
# layout
# ---------------------------------------------------------------------------------------------
def test_header_fields(good):
    path, _ = good
    h, index = parse(path)
    b = h["raw"]
    assert h["magic"] == b"ZMOE"
    assert h["version"] == 2 == zmoe.VERSION
    assert h["file_size"] == len(b) == path.stat().st_size
    assert h["alignment"] == ALIGN
    assert h["data_offset"] == ALIGN and h["data_offset"] % h["alignment"] == 0
    assert h["index_offset"] + h["index_size"] == h["file_size"]
    assert h["index_offset"] >= h["data_offset"]
    assert h["index_crc32"] == zlib.crc32(b[h["index_offset"]:h["file_size"]]) & 0xFFFFFFFF
    assert h["reserved"] == b"\0" * 12
    assert h["header_crc32"] == zlib.crc32(b[:60]) & 0xFFFFFFFF
    assert b[64:ALIGN] == b"\0" * (ALIGN - 64)
    assert set(index) == {"metadata", "tensors", "experts"}
    with ZmoeReader(path) as r:
        assert (r.header.version, r.header.index_offset, r.header.index_size, r.header.data_offset,
                r.header.file_size, r.header.alignment, r.header.index_crc32) == (
            2, h["index_offset"], h["index_size"], h["data_offset"], h["file_size"], ALIGN,
            h["index_crc32"])


def _ranges(index):
    for t in index["tensors"]:
        for p in t["parts"]:
            for k in ("raw", "sm"):
                if k in p:
                    yield t["name"], k, p[k][0], p[k][1]
            for c in p.get("exp", ()):
                yield t["name"], "exp", c[0], c[1]


def test_every_range_inside_data_section_and_crcs_match(good, exp_codec):
    path, _ = good
    h, index = parse(path)
    b = h["raw"]
    n = 0
    for t in index["tensors"]:
        for p in t["parts"]:
            entries = [p["raw"]] if "raw" in p else [p["sm"]] + p["exp"]
            for ent in entries:
                off, size, crc = ent[0], ent[1], ent[-1]
                assert h["data_offset"] <= off and off + size <= h["index_offset"], t["name"]
                assert zlib.crc32(b[off:off + size]) & 0xFFFFFFFF == crc, t["name"]
                n += 1
            for off, size, raw, _ in p.get("exp", ()):   # SPEC §5.2: the codec's framing
                chunk = b[off:off + size]
                if exp_codec == "zstd":
                    assert zstd.frame_content_size(chunk) == raw, t["name"]
                else:  # §5.3: 128 bytes of code lengths, 4 u32 stream sizes adding up
                    assert size >= 144
                    assert 144 + sum(struct.unpack_from("<4I", chunk, 128)) == size, t["name"]
    for blk in index["experts"]:
        for k in ("sm", "exp"):
            off, size = blk[k]
            assert h["data_offset"] <= off and off + size <= h["index_offset"]
    assert n > 40


def test_no_overlapping_ranges(good):
    path, _ = good
    _, index = parse(path)
    rs = sorted((off, off + size, name) for name, _, off, size in _ranges(index) if size)
    for (a0, a1, an), (b0, b1, bn) in zip(rs, rs[1:]):
        assert a1 <= b0, (an, bn)


def test_tensor_records_in_write_order_with_spec_fields(good, exp_codec):
    path, src = good
    _, index = parse(path)
    names = [t["name"] for t in index["tensors"]]
    assert names == list(src)  # dense first, then experts in first-written order
    for t in index["tensors"]:
        dtype, shape, _ = src[t["name"]]
        assert t["dtype"] == dtype and t["shape"] == list(shape)
        assert t["encoding"] in ("raw", "bitplane")
        # SPEC §4: exp_codec on bit-plane records only (required from version 2)
        if t["encoding"] == "bitplane":
            assert t["exp_codec"] == exp_codec, t["name"]
        else:
            assert "exp_codec" not in t, t["name"]
        for p in t["parts"]:
            assert ("raw" in p) != ("sm" in p)
            if "raw" in p:
                assert len(p["raw"]) == 3 and "exp" not in p
            else:
                assert len(p["sm"]) == 3 and all(len(c) == 4 for c in p["exp"]) and p["exp"]
    with ZmoeReader(path) as r:
        assert list(r.tensors) == names


def test_metadata_roundtrip(good):
    path, _ = good
    _, index = parse(path)
    with ZmoeReader(path) as r:
        for k, (v, _, typ) in METADATA.items():
            assert index["metadata"][k] == {"type": typ, "value": v}, k
            assert r.metadata_types[k] == typ, k
            got = r.metadata[k]
            assert got == v and type(got) is type(v), k
        assert set(r.metadata) == set(METADATA)


def test_metadata_int_and_float_exact(good):
    path, _ = good
    with ZmoeReader(path) as r:
        assert r.metadata["m.int_min"] == -2**63 and r.metadata["m.int_max"] == 2**63 - 1
        assert r.metadata["m.float_tiny"] == 5e-324
        assert r.metadata["m.float_arr"] == [0.5, -1.25, 1e300]


def test_metadata_writer_rejects_bad_input(tmp_path):
    w = ZmoeWriter(tmp_path / "m.zmoe")
    w.add_metadata("a", 1)
    with pytest.raises(ValueError, match="'a'"):
        w.add_metadata("a", 2)
    with pytest.raises(ValueError):
        w.add_metadata("b", 1, "int128")
    w.abort()


def test_metadata_non_finite_float_rejected(tmp_path):
    """SPEC §3: float values are finite. The writer must refuse NaN (at add or at close)."""
    w = ZmoeWriter(tmp_path / "nan.zmoe")
    with pytest.raises(ValueError):
        w.add_metadata("x", float("nan"))
        w.close()
    w.abort()


@pytest.mark.parametrize("name,dtype,shape,_enc,stored", DENSE)
def test_dense_roundtrip(good, name, dtype, shape, _enc, stored):
    path, src = good
    _, _, a = src[name]
    with ZmoeReader(path) as r:
        rec = r.tensors[name]
        assert rec["encoding"] == stored
        assert "expert" not in rec and len(rec["parts"]) == 1
        got = r.read_tensor(name)
        assert got.shape == tuple(shape)
        assert got.dtype == zmoe.NUMPY_DTYPES[dtype]
        assert as_bytes(got) == as_bytes(a)
        p = rec["parts"][0]
        off = p["raw"][0] if "raw" in p else p["sm"][0]
        assert off % 64 == 0  # dense tensors start on 64-byte boundaries


def test_bitplane_dense_stored_as_planes(good):
    """The stored SM plane of a bit-plane dense tensor is exactly the SPEC §5.1 plane."""
    path, src = good
    h, index = parse(path)
    t = next(t for t in index["tensors"] if t["name"] == "bp.bf16")
    off, size, _ = t["parts"][0]["sm"]
    w = src["bp.bf16"][2].astype(np.uint32)
    sm = (((w >> 15) << 7) | (w & 0x7F)).astype(np.uint8)
    assert h["raw"][off:off + size] == sm.tobytes()
    # 300 exponents, K=3, min_chunk=64: k = min(3, 300 // 64) = 3 chunks of 100
    assert [c[2] for c in t["parts"][0]["exp"]] == [100, 100, 100]


# ---------------------------------------------------------------------------------------------
# experts
# ---------------------------------------------------------------------------------------------
def _block_names(layer, e):
    if layer == 0:
        return [*_expert_names(0, e), STACKED]
    p = f"model.layers.1.mlp.experts.{e}"
    return [f"{p}.gate_proj.weight", f"{p}.up_proj.weight", f"{p}.down_proj.weight", f"{p}.scales"]


def test_expert_blocks_index(good):
    path, _ = good
    _, index = parse(path)
    keys = [(b["layer"], b["expert"]) for b in index["experts"]]
    assert keys == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)]
    for b in index["experts"]:
        assert b["tensors"] == _block_names(b["layer"], b["expert"])
    recs = {t["name"]: t for t in index["tensors"]}
    for e in range(E0):
        for name, role in zip(_expert_names(0, e), ("gate", "up", "down")):
            assert recs[name]["expert"] == {"layer": 0, "expert": e, "role": role}
            assert recs[name]["encoding"] == "bitplane" and len(recs[name]["parts"]) == 1
            assert recs[name]["parts"][0]["expert"] == e
    st = recs[STACKED]
    assert st["expert"] == {"layer": 0, "role": "gate_up", "stacked": True}
    assert st["shape"] == [E0, 32, H] and st["encoding"] == "bitplane"
    assert [p["expert"] for p in st["parts"]] == list(range(E0))
    scales = recs["model.layers.1.mlp.experts.0.scales"]
    assert scales["encoding"] == "raw" and "raw" in scales["parts"][0]


def test_expert_regions_aligned_and_contiguous(good):
    path, _ = good
    h, index = parse(path)
    recs = {t["name"]: t for t in index["tensors"]}
    ends = []
    for b in index["experts"]:
        sm_off, sm_size = b["sm"]
        exp_off, exp_size = b["exp"]
        assert sm_off % ALIGN == 0 and exp_off % ALIGN == 0, b
        assert sm_off + sm_size <= exp_off
        # SM region: the blocks' SM planes (and raw pieces) back to back in `tensors` order
        pos = sm_off
        chunks = []
        for name in b["tensors"]:
            t = recs[name]
            p = t["parts"][b["expert"]] if t["expert"].get("stacked") else t["parts"][0]
            assert p["expert"] == b["expert"]
            ent = p["raw"] if "raw" in p else p["sm"]
            assert ent[0] == pos, name
            pos += ent[1]
            chunks += p.get("exp", [])
        assert pos == sm_off + sm_size
        # exponent region: all compressed chunks back to back
        pos = exp_off
        for c in chunks:
            assert c[0] == pos
            pos += c[1]
        assert pos == exp_off + exp_size
        ends.append((sm_off, exp_off + exp_size))
    # blocks end padded to alignment: the next one starts on the next boundary, padding is zero
    b = h["raw"]
    for (s0, e0), (s1, _) in zip(ends, ends[1:]):
        assert s1 == -(-e0 // ALIGN) * ALIGN
        assert b[e0:s1] == b"\0" * (s1 - e0)


def test_multiple_exponent_chunks_per_expert_tensor(good):
    path, _ = good
    _, index = parse(path)
    recs = {t["name"]: t for t in index["tensors"]}
    # 384 exponents, K=3, min_chunk=64 -> 3 chunks of 128
    assert [c[2] for c in recs[_expert_names(0, 1)[0]]["parts"][0]["exp"]] == [128, 128, 128]


def test_read_expert_tensor_whole(good):
    path, src = good
    with ZmoeReader(path) as r:
        for name in (*_expert_names(0, 1), STACKED, "model.layers.1.mlp.experts.1.up_proj.weight",
                     "model.layers.1.mlp.experts.0.scales"):
            dtype, shape, a = src[name]
            got = r.read_tensor(name)
            assert got.shape == tuple(shape) and got.dtype == zmoe.NUMPY_DTYPES[dtype]
            assert as_bytes(got) == as_bytes(a), name


@pytest.mark.parametrize("layer,e", [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1)])
def test_expert_tensors_exact(good, layer, e):
    path, src = good
    with ZmoeReader(path) as r:
        got = r.expert_tensors(layer, e)
        assert list(got) == _block_names(layer, e)
        for name, arr in got.items():
            dtype, shape, a = src[name]
            if name == STACKED:
                a, shape = a[e], shape[1:]
            assert arr.shape == tuple(shape), name
            assert arr.dtype == zmoe.NUMPY_DTYPES[dtype]
            assert as_bytes(arr) == as_bytes(a), name


def test_expert_tensors_unknown_block(good):
    path, _ = good
    with ZmoeReader(path) as r:
        with pytest.raises(KeyError):
            r.expert_tensors(0, 9)
        with pytest.raises(KeyError):
            r.expert_tensors(5, 0)


def test_reads_only_requested_expert_ranges(good, monkeypatch):
    path, _ = good
    with ZmoeReader(path) as r:
        blk = r.experts[(0, 1)]
        lo, hi = blk["sm"][0], blk["exp"][0] + blk["exp"][1]
        seen = []
        orig = r.view
        monkeypatch.setattr(r, "view", lambda off, size: (seen.append((off, size)), orig(off, size))[1])
        r.expert_tensors(0, 1)
        assert seen
        assert all(lo <= off and off + size <= hi for off, size in seen), (seen, lo, hi)


def test_reads_only_requested_expert_corruption(good, tmp_path):
    """Corrupting experts 0 and 2 (SM and exponent regions) leaves expert 1 readable."""
    path, src = good
    _, index = parse(path)
    blocks = {(b["layer"], b["expert"]): b for b in index["experts"]}

    def corrupt(b):
        o, s = blocks[(0, 0)]["sm"]
        b[o + s // 2] ^= 0xFF
        o, s = blocks[(0, 2)]["exp"]
        b[o + s // 2] ^= 0xFF
    bad = mutate(path, tmp_path / "other.zmoe", corrupt)
    with ZmoeReader(bad) as r:
        got = r.expert_tensors(0, 1)
        assert as_bytes(got[_expert_names(0, 1)[2]]) == as_bytes(src[_expert_names(0, 1)[2]][2])
        assert as_bytes(got[STACKED]) == as_bytes(src[STACKED][2][1])
        for e in (0, 2):
            with pytest.raises(ChecksumError):
                r.expert_tensors(0, e)


def test_stored_bytes_and_bits_per_weight(good):
    path, _ = good
    _, index = parse(path)
    with ZmoeReader(path) as r:
        for t in index["tensors"]:
            want = sum(p.get("raw", p.get("sm"))[1] + sum(c[1] for c in p.get("exp", ()))
                       for p in t["parts"])
            assert r.stored_bytes(t["name"]) == want
        assert zmoe.bits_per_weight(r, "model.embed_tokens.weight") == 16.0
        assert zmoe.bits_per_weight(r, "router.f32") == 32.0


# ---------------------------------------------------------------------------------------------
# writer behaviour
# ---------------------------------------------------------------------------------------------
def test_small_alignment(tmp_path):
    path = tmp_path / "a64.zmoe"
    src = build(path, alignment=64)
    h, index = parse(path)
    assert h["alignment"] == 64 and h["data_offset"] == 64
    starts = [b[k][0] for b in index["experts"] for k in ("sm", "exp")]
    assert all(s % 64 == 0 for s in starts)
    assert any(s % 4096 for s in starts)  # the 64-byte alignment is really used
    assert path.stat().st_size < 4096 * 10  # the 4096-aligned file needs >= 11 pages
    with ZmoeReader(path) as r:
        r.verify()
        assert as_bytes(r.read_tensor(STACKED)) == as_bytes(src[STACKED][2])


@pytest.mark.parametrize("alignment", [0, 32, 100, 4095])
def test_bad_alignment_rejected(tmp_path, alignment):
    with pytest.raises(ValueError):
        ZmoeWriter(tmp_path / "x.zmoe", alignment=alignment)


def test_writer_rejects_duplicates_and_bad_sizes(tmp_path):
    w = ZmoeWriter(tmp_path / "w.zmoe")
    w.add_tensor("a", "BF16", (2,), np.zeros(2, np.uint16))
    with pytest.raises(ValueError, match="'a'"):
        w.add_tensor("a", "BF16", (2,), np.zeros(2, np.uint16))
    with pytest.raises(ValueError, match="'b'"):
        w.add_tensor("b", "BF16", (3,), np.zeros(2, np.uint16))
    with pytest.raises(ValueError, match="'c'"):
        w.add_tensor("c", "Q4_K", (2,), np.zeros(2, np.uint16))
    w.abort()


@pytest.mark.parametrize("encoding", ["raw", "bitplane"])
def test_writer_accepts_empty_multidim_array(tmp_path, encoding):
    path = tmp_path / "e.zmoe"
    w = ZmoeWriter(path)
    w.add_tensor("e", "BF16", (0, 4), np.zeros((0, 4), np.uint16), encoding=encoding)
    w.close()
    with ZmoeReader(path) as r:
        assert r.read_tensor("e").shape == (0, 4)


def test_writer_stacked_tensor_missing_part(tmp_path):
    w = ZmoeWriter(tmp_path / "s.zmoe")
    a = np.zeros((2, 4, 4), np.uint16)
    w.write_expert(encode_expert(0, 0, [ExpertPiece("st", "BF16", a.shape, "gate_up", a[0], part=0)]))
    with pytest.raises(ValueError, match="'st'"):
        w.close()
    w.abort()


def test_writer_expert_piece_size_mismatch(tmp_path):
    w = ZmoeWriter(tmp_path / "p.zmoe")
    with pytest.raises(ValueError, match="'x'"):
        w.write_expert(encode_expert(0, 0, [ExpertPiece("x", "BF16", (4, 4), "gate",
                                                        np.zeros(15, np.uint16))]))
    w.abort()


# ---------------------------------------------------------------------------------------------
# corruption
# ---------------------------------------------------------------------------------------------
def _rec(index, name):
    return next(t for t in index["tensors"] if t["name"] == name)


def _flip_exp_chunk(index):
    c = _rec(index, _expert_names(0, 1)[0])["parts"][0]["exp"][1]
    return c[0] + c[1] // 2


def _flip_sm(index):
    o, s, _ = _rec(index, _expert_names(0, 2)[2])["parts"][0]["sm"]
    return o + s // 2


def _flip_stacked_sm(index):
    o, s, _ = _rec(index, STACKED)["parts"][1]["sm"]
    return o + 3


def _flip_raw(index):
    o, s, _ = _rec(index, "router.f32")["parts"][0]["raw"]
    return o + 5


def _flip_dense_exp(index):
    c = _rec(index, "bp.f32")["parts"][0]["exp"][0]
    return c[0] + c[1] - 1


DATA_CORRUPTIONS = {
    # id: (offset finder, tensor named in the error, what)
    "exp_chunk": (_flip_exp_chunk, _expert_names(0, 1)[0], "exponent"),
    "sm_plane": (_flip_sm, _expert_names(0, 2)[2], "sign+mantissa"),
    "stacked_sm": (_flip_stacked_sm, STACKED, "sign+mantissa"),
    "raw_dense": (_flip_raw, "router.f32", "raw"),
    "dense_exp_chunk": (_flip_dense_exp, "bp.f32", "exponent"),
}


def make_corruption(kind, good, tmp_path):
    path, src = good
    _, index = parse(path)
    find, name, what = DATA_CORRUPTIONS[kind]
    off = find(index)

    def flip(b):
        b[off] ^= 0x5A
    bad = mutate(path, tmp_path / f"{kind}.zmoe", flip)
    return bad, name, what, off, src


@pytest.mark.parametrize("kind", list(DATA_CORRUPTIONS))
def test_data_corruption_raises_checksum_error(kind, good, tmp_path):
    bad, name, what, off, _ = make_corruption(kind, good, tmp_path)
    with ZmoeReader(bad) as r:  # header and index are intact: opening works
        with pytest.raises(ChecksumError) as ei:
            r.read_tensor(name)
        msg = str(ei.value)
        assert str(bad) in msg and name in msg and what in msg
        with pytest.raises(ChecksumError) as ei:
            r.verify()
        assert str(bad) in str(ei.value) and name in str(ei.value)


@pytest.mark.parametrize("kind", ["exp_chunk", "sm_plane", "stacked_sm"])
def test_data_corruption_in_expert_tensors(kind, good, tmp_path):
    bad, name, _, off, _ = make_corruption(kind, good, tmp_path)
    with ZmoeReader(bad) as r:
        layer = r.tensors[name]["expert"]["layer"]
        hit = [k for k, b in r.experts.items() if k[0] == layer and name in b["tensors"]
               and b["sm"][0] <= off < b["exp"][0] + b["exp"][1]]
        assert len(hit) == 1
        with pytest.raises(ChecksumError, match=name.replace(".", r"\.")):
            r.expert_tensors(*hit[0])


@pytest.mark.parametrize("kind", ["sm_plane", "stacked_sm", "raw_dense"])
def test_verify_false_reads_without_check(kind, good, tmp_path):
    """verify=False skips the CRC: SM/raw corruption comes back as data (not raised), while the
    default path (verify=True) refuses it. (A corrupt exponent chunk may fail to decode even
    without CRC checks, so exponent chunks are not part of this test.)"""
    bad, name, what, off, src = make_corruption(kind, good, tmp_path)
    with ZmoeReader(bad) as r:
        got = as_bytes(r.read_tensor(name, verify=False))
        want = as_bytes(src[name][2])
        assert len(got) == len(want) and got != want
        diff = np.flatnonzero(np.frombuffer(got, np.uint8) != np.frombuffer(want, np.uint8))
        assert 1 <= diff.size <= 4  # one stored byte -> one element
        with pytest.raises(ChecksumError):
            r.read_tensor(name)


def test_verify_passes_on_good_file(good):
    path, _ = good
    seen = []
    with ZmoeReader(path) as r:
        assert r.verify() is None
        r.verify(progress=seen.append)
    assert len(seen) == len(parse(path)[1]["tensors"])


def test_truncated(good, tmp_path):
    path, _ = good
    b = path.read_bytes()
    h, _ = parse(path)
    for n in (len(b) - 1, h["index_offset"], h["index_offset"] - 7, ALIGN, 100, 64, 63, 10):
        bad = tmp_path / f"trunc{n}.zmoe"
        bad.write_bytes(b[:n])
        with pytest.raises(TruncatedFileError) as ei:
            ZmoeReader(bad)
        assert str(bad) in str(ei.value)


def test_empty_file(tmp_path):
    bad = tmp_path / "empty.zmoe"
    bad.write_bytes(b"")
    with pytest.raises(NotZmoeError) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value) and "the file is empty" in str(ei.value)


@pytest.mark.parametrize("magic", [b"ZMOF", b"GGUF", b"zmoe", b"\0\0\0\0"])
def test_wrong_magic(good, tmp_path, magic):
    path, _ = good

    def f(b):
        b[0:4] = magic
        fix_header_crc(b)
    bad = mutate(path, tmp_path / "magic.zmoe", f)
    with pytest.raises(NotZmoeError) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value)


def test_safetensors_file_is_not_zmoe(tmp_path):
    bad = tmp_path / "model.safetensors"
    bad.write_bytes(struct.pack("<Q", 2) + b"{}")
    with pytest.raises(NotZmoeError):
        ZmoeReader(bad)


@pytest.mark.parametrize("version", [4, 0, 0xFFFFFFFF])
def test_unsupported_version(good, tmp_path, version):
    path, _ = good

    bad = mutate(path, tmp_path / "v.zmoe", lambda b: set_version(b, version))  # only that
    with pytest.raises(UnsupportedVersionError) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value) and str(version) in str(ei.value)


def test_header_crc_mismatch(good, tmp_path):
    path, _ = good

    def f(b):
        b[50] ^= 1  # a reserved byte; CRC not fixed
    bad = mutate(path, tmp_path / "hcrc.zmoe", f)
    with pytest.raises(CorruptIndexError) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value) and "header" in str(ei.value)


@pytest.mark.parametrize("where", [0, 1, "mid", -1])
def test_corrupt_index_byte(good, tmp_path, where):
    path, _ = good
    h, _ = parse(path)

    def f(b):
        off = {0: 0, 1: 1, "mid": h["index_size"] // 2, -1: h["index_size"] - 1}[where]
        b[h["index_offset"] + off] ^= 0x20
    bad = mutate(path, tmp_path / "idx.zmoe", f)
    with pytest.raises(CorruptIndexError) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value)


def test_index_not_json_with_valid_crcs(good, tmp_path):
    path, _ = good
    h, _ = parse(path)

    def f(b):
        b[h["index_offset"]] = ord("[")
        struct.pack_into("<I", b, 44, zlib.crc32(bytes(b[h["index_offset"]:])) & 0xFFFFFFFF)
        fix_header_crc(b)
    bad = mutate(path, tmp_path / "json.zmoe", f)
    with pytest.raises(CorruptIndexError) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value)


@pytest.mark.parametrize("field", ["raw_before_data", "sm_past_index", "exp_past_index"])
def test_index_range_outside_data_section(good, tmp_path, field):
    path, _ = good
    h, _ = parse(path)

    def edit(index):
        if field == "raw_before_data":
            _rec(index, "router.f32")["parts"][0]["raw"][0] = 10
        elif field == "sm_past_index":
            _rec(index, _expert_names(0, 0)[0])["parts"][0]["sm"][0] = h["index_offset"] - 4
        else:
            _rec(index, "bp.bf16")["parts"][0]["exp"][0][0] = h["file_size"] + 100
    bad = mutate(path, tmp_path / "range.zmoe", lambda b: rewrite_index(b, edit))
    with pytest.raises(CorruptIndexError) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value)


def test_two_pieces_of_one_tensor_on_the_same_bytes(good, tmp_path):
    """SPEC §9: a bit-plane tensor whose exponent chunk is pointed at its own SM plane (same
    offset and size, CRC and raw_size consistent) is refused as overlapping pieces."""
    path, _ = good

    def edit(index):
        p = _rec(index, "bp.bf16")["parts"][0]
        off, size, crc = p["sm"]
        p["exp"] = [[off, size, 300, crc]]
    bad = mutate(path, tmp_path / "same.zmoe", lambda b: rewrite_index(b, edit))
    with pytest.raises(CorruptIndexError) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value) and "'bp.bf16'" in str(ei.value)
    assert "overlaps" in str(ei.value)


@pytest.mark.parametrize("delta", [1, -1])
def test_wrong_raw_size_is_corruption(good, tmp_path, delta):
    """SPEC §5.2: a chunk that does not decode to exactly raw_size bytes is corruption.

    A raw_size that no longer sums to the shape's elements is refused when the file is opened
    (SPEC §9). One moved between two chunks keeps the sum and shows only at decode: a zstd frame
    records its size; a Huffman chunk does not, and raw_size +- 1 shows when a stream cannot
    decode that many exponents within exactly its bytes (SPEC §5.3). This tensor's random words
    spread the exponents over ~all 256 values, so its codes are ~8 bits long and there is not
    enough padding to hide an exponent more or less; test_huffman.py checks the general case
    against a SPEC decoder."""
    path, _ = good
    name = _expert_names(0, 0)[1]
    assert len(_rec(parse(path)[1], name)["parts"][0]["exp"]) >= 2

    def one(index):
        _rec(index, name)["parts"][0]["exp"][0][2] += delta

    def moved(index):
        one(index)
        _rec(index, name)["parts"][0]["exp"][1][2] -= delta
    bad = mutate(path, tmp_path / "rawsize.zmoe", lambda b: rewrite_index(b, one))
    with pytest.raises(CorruptIndexError) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value) and name in str(ei.value) and "parts[0].exp" in str(ei.value)
    bad = mutate(path, tmp_path / "moved.zmoe", lambda b: rewrite_index(b, moved))
    with ZmoeReader(bad) as r:
        with pytest.raises(ChecksumError) as ei:
            r.read_tensor(name)
        assert str(bad) in str(ei.value) and name in str(ei.value)
        with pytest.raises(ChecksumError):
            r.verify()


def test_trailing_garbage(good, tmp_path):
    path, _ = good
    bad = tmp_path / "trail.zmoe"
    bad.write_bytes(path.read_bytes() + b"\0garbage")
    with pytest.raises(ZmoeError) as ei:
        ZmoeReader(bad)
    assert not isinstance(ei.value, (TruncatedFileError, NotZmoeError, UnsupportedVersionError))
    assert str(bad) in str(ei.value) and "trailing" in str(ei.value)


def test_unclosed_writer(tmp_path):
    path = tmp_path / "unclosed.zmoe"
    w = ZmoeWriter(path)
    w.add_metadata("a", 1)
    w.add_tensor("t", "BF16", (4,), np.arange(4, dtype=np.uint16))
    w.abort()  # stop without writing the index and header, as an interrupted write does
    assert path.stat().st_size > ALIGN
    assert path.read_bytes()[:64] == b"\0" * 64
    with pytest.raises(NotZmoeError) as ei:
        ZmoeReader(path)
    assert str(path) in str(ei.value)


def test_writer_context_manager_aborts_on_error(tmp_path):
    path = tmp_path / "ctx.zmoe"
    with pytest.raises(RuntimeError):
        with ZmoeWriter(path) as w:
            w.add_tensor("t", "BF16", (4,), np.arange(4, dtype=np.uint16))
            raise RuntimeError("boom")
    with pytest.raises(NotZmoeError):
        ZmoeReader(path)
    with ZmoeWriter(tmp_path / "ok.zmoe") as w:
        w.add_tensor("t", "BF16", (4,), np.arange(4, dtype=np.uint16))
    with ZmoeReader(tmp_path / "ok.zmoe") as r:
        assert r.read_tensor("t").tolist() == [0, 1, 2, 3]


def test_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError):
        ZmoeReader(tmp_path / "nope.zmoe")


def test_unknown_tensor(good):
    path, _ = good
    with ZmoeReader(path) as r:
        with pytest.raises(KeyError):
            r.read_tensor("nope")


# ---------------------------------------------------------------------------------------------
# versions and exponent codecs (SPEC §5.2, §8)
# ---------------------------------------------------------------------------------------------
def as_version_1(b: bytearray):
    """Make a version-2 file a version-1 file: version field 1, no exp_codec in the index."""
    def drop(index):
        for t in index["tensors"]:
            t.pop("exp_codec", None)
    rewrite_index(b, drop)
    set_version(b, 1)


@pytest.fixture(scope="module")
def v1(tmp_path_factory):
    """A version-1 file: the reference file written with zstd chunks, header and index as v1."""
    d = tmp_path_factory.mktemp("zmoe_v1")
    src = build(d / "v2.zmoe", exp_codec="zstd")
    return mutate(d / "v2.zmoe", d / "v1.zmoe", as_version_1), src


def test_version_1_file_readable(v1):
    path, src = v1
    h, index = parse(path)
    assert h["version"] == 1
    assert not any("exp_codec" in t for t in index["tensors"])
    assert sum(t["encoding"] == "bitplane" for t in index["tensors"]) > 10
    with ZmoeReader(path) as r:
        assert r.header.version == 1
        r.verify()
        for name, (dtype, shape, a) in src.items():
            got = r.read_tensor(name)
            assert got.shape == tuple(shape) and got.dtype == zmoe.NUMPY_DTYPES[dtype]
            assert as_bytes(got) == as_bytes(a), name
            if r.tensors[name]["encoding"] == "bitplane":   # version 1: every chunk is zstd
                assert r.tensors[name]["exp_codec"] == "zstd"
        for (layer, e) in r.experts:
            for name, arr in r.expert_tensors(layer, e).items():
                want = src[name][2][e] if name == STACKED else src[name][2]
                assert as_bytes(arr) == as_bytes(want), name


def test_version_1_chunks_are_zstd(tmp_path):
    """A version-1 file has only zstd chunks: Huffman chunks there are corrupt data."""
    path = tmp_path / "h.zmoe"
    build(path, exp_codec="huffman")
    bad = mutate(path, tmp_path / "h1.zmoe", as_version_1)
    name = _expert_names(0, 1)[0]
    with ZmoeReader(bad) as r:
        assert r.tensors[name]["exp_codec"] == "zstd"
        assert as_bytes(r.read_tensor("model.embed_tokens.weight")) != b""   # raw still reads
        with pytest.raises(ChecksumError) as ei:
            r.read_tensor(name)
        assert name in str(ei.value)


def test_version_1_with_a_huffman_record_is_corrupt(tmp_path):
    """A version-1 header whose index names a non-zstd codec contradicts SPEC §5.2."""
    path = tmp_path / "h.zmoe"
    build(path, exp_codec="huffman")

    bad = mutate(path, tmp_path / "h1.zmoe", lambda b: set_version(b, 1))   # the codec kept
    with pytest.raises(CorruptIndexError, match="version-1 file holds only zstd"):
        ZmoeReader(bad)


@pytest.mark.parametrize("codec", ["lz4", "Huffman", "", None])
def test_unknown_exp_codec(good, tmp_path, codec):
    path, _ = good
    name = _expert_names(0, 2)[1]

    def edit(index):
        _rec(index, name)["exp_codec"] = codec
    bad = mutate(path, tmp_path / "codec.zmoe", lambda b: rewrite_index(b, edit))
    err = CorruptIndexError if codec is None else UnsupportedCodecError
    with pytest.raises(err) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value) and name in str(ei.value)


@pytest.mark.parametrize("name", ["bp.f16", STACKED])
def test_version_2_bitplane_tensor_needs_exp_codec(good, tmp_path, name):
    path, _ = good

    def edit(index):
        del _rec(index, name)["exp_codec"]
    bad = mutate(path, tmp_path / "nocodec.zmoe", lambda b: rewrite_index(b, edit))
    with pytest.raises(CorruptIndexError) as ei:
        ZmoeReader(bad)
    assert str(bad) in str(ei.value) and name in str(ei.value)


def test_writer_rejects_unknown_codec_and_mixed_codecs_in_one_tensor(tmp_path):
    w = ZmoeWriter(tmp_path / "c.zmoe")
    a = np.arange(2 * 64, dtype=np.uint16).reshape(2, 8, 8)
    with pytest.raises(ValueError, match="lz4"):
        w.add_tensor("d", "BF16", (8, 8), a[0], encoding="bitplane", exp_codec="lz4")
    with pytest.raises(ValueError, match="lz4"):
        encode_expert(0, 0, [ExpertPiece("x", "BF16", (8, 8), "gate", a[0])], exp_codec="lz4")
    w.write_expert(encode_expert(0, 0, [ExpertPiece("st", "BF16", a.shape, "gate_up", a[0], part=0)],
                                 exp_codec="huffman"))
    with pytest.raises(ValueError, match="'st'"):   # one tensor, one exp_codec (SPEC §4)
        w.write_expert(encode_expert(0, 1, [ExpertPiece("st", "BF16", a.shape, "gate_up", a[1],
                                                        part=1)], exp_codec="zstd"))
    w.abort()


def test_file_version(good, tmp_path):
    path, _ = good
    assert zmoe.file_version(path) == zmoe.VERSION == 2
    v1 = mutate(path, tmp_path / "v1.zmoe", lambda b: struct.pack_into("<I", b, 4, 1))
    assert zmoe.file_version(v1) == 1
    other = tmp_path / "x.bin"
    other.write_bytes(b"GGUF" + bytes(60))
    assert zmoe.file_version(other) == 0
    assert zmoe.file_version(tmp_path / "missing.zmoe") == 0
