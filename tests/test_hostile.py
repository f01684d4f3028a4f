"""Crafted containers: files whose CRC-32s are all valid but whose index lies (format/SPEC.md §9).

Each test makes one mutation of the tiny random Mixtral (test_api.py's chat model: experts
[96, 64] / [64, 96] BF16, one exponent chunk per expert tensor, Huffman or zstd), recomputes every
CRC it touched so the mutation gets past the checksums, and checks that opening, ``verify`` and
the runtime's decode refuse it with a :class:`zmoe.ZmoeError` naming the file, the tensor (or
block / metadata key) and the field: never a crash, a hang, an out-of-bounds access or an
allocation of a size the file claims. Commands that used to crash or hang run in child
processes with a time limit.
"""
from __future__ import annotations

import os
import struct
import subprocess
import sys
import threading
import zlib
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from zmoe import ChecksumError, CorruptIndexError, ZmoeReader, huffman
from zmoe_edit import fix_header_crc, index_text, mutate, replace_index, rewrite_index

from zipmoe_rt.cli import main as cli_main
from zipmoe_rt.engine import layout as L_
from zipmoe_rt.engine.store import ZmoeSource

from test_api import make_chat_model

E0 = "model.layers.0.block_sparse_moe.experts.0"
W1, W2, W3 = f"{E0}.w1.weight", f"{E0}.w2.weight", f"{E0}.w3.weight"
#: seconds a child command may take (a hang is what some of these used to do)
CHILD_TIMEOUT = 300


@pytest.fixture(scope="module")
def tiny(tiny_moe_dir, tmp_path_factory) -> dict:
    """{"huffman": path, "zstd": path}: the tiny chat model with each exponent codec."""
    from zipmoe_rt.convert.converter import convert
    folder = tmp_path_factory.mktemp("hostile")
    huff = make_chat_model(tiny_moe_dir("mixtral"), folder / "tiny")
    zst = convert(folder / "tiny", folder / "tiny-zstd.zmoe", progress=False, exp_codec="zstd")
    return {"huffman": huff, "zstd": zst}


# -- editing helpers ----------------------------------------------------------------------------
def rec(index, name):
    return next(t for t in index["tensors"] if t["name"] == name)


def block(index, layer=0, expert=0):
    return next(b for b in index["experts"] if (b["layer"], b["expert"]) == (layer, expert))


def crc(b, off, size) -> int:
    return zlib.crc32(bytes(b[off:off + size])) & 0xFFFFFFFF


def edited(src: Path, dst: Path, fn) -> Path:
    """Copy ``src`` to ``dst`` with ``fn(index, b)`` applied (``b``: the file's bytearray, for
    data edits); sizes, the index CRC and the header CRC recomputed."""
    return mutate(src, dst, lambda b: rewrite_index(b, lambda index: fn(index, b)))


def with_index_text(src: Path, dst: Path, make_text) -> Path:
    """Copy ``src`` to ``dst`` with its index replaced by ``make_text(index text)`` verbatim
    (JSON that json.dumps cannot write), sizes and CRCs recomputed."""
    return mutate(src, dst, lambda b: replace_index(b, make_text(index_text(b).decode()).encode()))


def open_error(path: Path, cls=CorruptIndexError, *needles) -> str:
    """Opening ``path`` raises ``cls`` whose message names the file and every needle; ``verify``
    (the CLI) fails with the same one-line message."""
    with pytest.raises(cls) as ei:
        ZmoeReader(path)
    msg = str(ei.value)
    assert str(path) in msg, msg
    for n in needles:
        assert n in msg, (n, msg)
    r = CliRunner().invoke(cli_main, ["verify", "-q", str(path)], env={"ZIPMOE_RT_DEBUG": None})
    assert r.exit_code == 1 and r.stderr.strip() == f"error: {msg}", (r.exit_code, r.stderr)
    return msg


def decode_error(path: Path, *needles) -> str:
    """The file opens (its index is consistent), but reading the tensor, ``verify`` and the
    runtime's expert decode (the Numba kernels) all raise ChecksumError naming the needles."""
    with ZmoeReader(path) as r:
        for call in (lambda: r.read_tensor(W1), r.verify):
            with pytest.raises(ChecksumError) as ei:
                call()
            for n in (str(path),) + needles:
                assert n in str(ei.value), (n, str(ei.value))
    src = ZmoeSource(path)
    try:
        with pytest.raises(ChecksumError) as ei:
            src.decode_expert(0, 0)
        for n in (str(path),) + needles:
            assert n in str(ei.value), (n, str(ei.value))
    finally:
        src.close()
    return str(ei.value)


def child(*args, timeout=CHILD_TIMEOUT) -> subprocess.CompletedProcess:
    """``zipmoe-rt ARGS`` in a child process, killed after ``timeout`` seconds (fails the test)."""
    env = {k: v for k, v in os.environ.items() if k != "ZIPMOE_RT_DEBUG"}
    try:
        return subprocess.run([sys.executable, "-m", "zipmoe_rt.cli", *map(str, args)], env=env,
                              capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        pytest.fail(f"zipmoe-rt {' '.join(map(str, args))} did not finish in {timeout} s")


def assert_clean_refusal(r: subprocess.CompletedProcess, *needles):
    """Exit status 1 with one ``error:`` line (not a signal, not a traceback)."""
    assert r.returncode == 1, (r.returncode, r.stderr[-2000:])
    err = r.stderr.strip().splitlines()
    assert err and err[-1].startswith("error: ") and "Traceback" not in r.stderr, r.stderr[-2000:]
    for n in needles:
        assert n in err[-1], (n, err[-1])


# -- 1. a shape shrunk below what its chunks decode to ----------------------------------------------
@pytest.mark.parametrize("codec", ["huffman", "zstd"])
def test_expert_shape_shrunk_is_refused(tiny, tmp_path, codec):
    """[96, 64] -> [1, 64] with the chunk still coding 6144 exponents: was a heap overflow in the
    decode-and-merge kernel (SIGSEGV/SIGABRT in `run`), and `verify` said OK."""
    def shrink(index, b):
        assert rec(index, W1)["shape"] == [96, 64]
        rec(index, W1)["shape"] = [1, 64]
    bad = edited(tiny[codec], tmp_path / "shrunk.zmoe", shrink)
    msg = open_error(bad, CorruptIndexError, repr(W1), "parts[0].exp", "shape [1, 64]", "6144")
    assert "64 elements" in msg
    if codec == "huffman":   # the command that crashed, in a child process
        assert_clean_refusal(child("run", bad, "-p", "hi", "-n", "2"), repr(W1), "shape")


# -- 2. one exponent chunk listed twice -------------------------------------------------------------
def test_chunk_listed_twice_is_refused(tiny, tmp_path):
    """The chunk table of W1 lists its one chunk twice: `run` wrote past the output buffer."""
    def twice(index, b):
        p = rec(index, W1)["parts"][0]
        p["exp"].append(list(p["exp"][0]))
    bad = edited(tiny["huffman"], tmp_path / "twice.zmoe", twice)
    open_error(bad, CorruptIndexError, repr(W1), "parts[0].exp:", "12288 exponents",
               "6144 elements")


def test_chunk_listed_twice_with_consistent_sizes_overlaps(tiny, tmp_path):
    """The same, with the shape doubled and the SM plane stretched over the next tensor's (its
    CRC recomputed) so that every size agrees: the pieces share bytes, which is refused."""
    def twice(index, b):
        t = rec(index, W1)
        p = t["parts"][0]
        p["exp"].append(list(p["exp"][0]))
        t["shape"] = [192, 64]
        off, size, _ = p["sm"]
        p["sm"] = [off, 2 * size, crc(b, off, 2 * size)]
    bad = edited(tiny["huffman"], tmp_path / "twice2.zmoe", twice)
    open_error(bad, CorruptIndexError, "overlaps", "never share bytes")


# -- 3. a consistent chunk with the SM plane left at its old size ------------------------------------
def test_sm_plane_shorter_than_the_shape_is_refused(tiny, tmp_path):
    """W3 (the last chunk of its block's exponent region) re-encoded for [96, 65] and the
    region grown to hold it, shape made consistent, but the SM plane left at 6144 bytes: the
    merge read 96 bytes past the plane."""
    def grow(index, b):
        t = rec(index, W3)
        c = t["parts"][0]["exp"][0]
        exp = huffman.decode(bytes(b[c[0]:c[0] + c[1]]), c[2])
        new = np.concatenate([exp, exp[:96]])
        chunk = huffman.encode(new)
        blk = block(index)
        assert c[0] + c[1] == blk["exp"][0] + blk["exp"][1]          # last in the region
        assert c[0] + len(chunk) <= blk["exp"][0] + 4096 * -(-blk["exp"][1] // 4096)
        b[c[0]:c[0] + len(chunk)] = chunk
        t["shape"] = [96, 65]
        t["parts"][0]["exp"][0] = [c[0], len(chunk), new.size, zlib.crc32(chunk)]
        blk["exp"][1] = c[0] + len(chunk) - blk["exp"][0]
    bad = edited(tiny["huffman"], tmp_path / "sm.zmoe", grow)
    open_error(bad, CorruptIndexError, repr(W3), "parts[0].sm.size", "6144 bytes",
               "[96, 65]", "needs 6240")


# -- 4. shapes: overflow, negative, non-integer ----------------------------------------------------
@pytest.mark.parametrize("shape,field,needle", [
    ([2**32, 2**32], "shape:", "more than 2^63 bytes"),
    ([2**62, 2**62, 0], "shape:", "more than 2^63 bytes"),
    ([-96, -64], "shape[0]:", "-96 is negative"),
    ([96, -64], "shape[1]:", "-64 is negative"),
    ([96.0, 64], "shape[0]:", "96.0 is not an integer"),
    ([True, 64], "shape[0]:", "true is not an integer"),
    (["96", 64], "shape[0]:", '"96" is not an integer'),
    ([None, 64], "shape[0]:", "null is not an integer"),
    ({"rows": 96}, "shape:", "is not a list"),
    ([1] * 40, "shape:", "at most 32 dimensions"),
])
def test_bad_shapes_are_refused(tiny, tmp_path, shape, field, needle):
    """[2**32, 2**32] has a product that wraps to 0 in int64: an empty buffer the kernel
    overran; negative dims failed deep in numpy."""
    def f(index, b):
        rec(index, W1)["shape"] = shape
    bad = edited(tiny["huffman"], tmp_path / "shape.zmoe", f)
    open_error(bad, CorruptIndexError, repr(W1), field, needle)


# -- 5. raw_size not a number; a failed decode start reaches the caller ------------------------------
@pytest.mark.parametrize("value,shown", [(None, "null"), ("6144", '"6144"'), (6144.0, "6144.0"),
                                         (True, "true"), ([6144], "[6144]")])
def test_raw_size_not_an_integer_is_refused(tiny, tmp_path, value, shown):
    def f(index, b):
        rec(index, W1)["parts"][0]["exp"][0][2] = value
    bad = edited(tiny["huffman"], tmp_path / "raw.zmoe", f)
    open_error(bad, CorruptIndexError, repr(W1), "parts[0].exp[0].raw_size", shown,
               "is not an integer")


def test_raw_size_null_under_a_budget_does_not_hang(tiny, tmp_path):
    """`run --memory-budget 25%` waited forever on a decode that never completed."""
    def f(index, b):
        rec(index, W1)["parts"][0]["exp"][0][2] = None
    bad = edited(tiny["huffman"], tmp_path / "null.zmoe", f)
    r = child("run", bad, "-p", "hi", "-n", "2", "--memory-budget", "25%", timeout=CHILD_TIMEOUT)
    assert_clean_refusal(r, repr(W1), "raw_size")


def test_decode_that_cannot_start_reaches_the_caller(tiny, monkeypatch):
    """Past the validator: a decode whose jobs cannot even be listed (here decode_jobs raises,
    on the I/O thread that finished the expert's reads) is raised in the generating thread
    instead of leaving it waiting forever."""
    from zipmoe_rt.engine.pipeline import ExpertEngine, budget_split
    from zipmoe_rt.models import build_model

    def broken(lay, *a, **kw):
        raise TypeError("injected: decode jobs cannot be listed")
    monkeypatch.setattr(L_, "decode_jobs", broken)
    source = ZmoeSource(tiny["huffman"], keep_experts=False, copy_dense=True)
    bytes_F, k, _ = budget_split(source, 1 << 40)
    engine = ExpertEngine(source, source.dense_bytes() + k * bytes_F, "zip-lru", workers=2)
    outcome = {}

    def go():
        try:
            net = build_model(source, executor=engine)
            net.forward(np.arange(5), net.new_cache())
            outcome["result"] = "returned"
        except BaseException as e:  # noqa: BLE001 - what the test looks at
            outcome["result"] = e
    t = threading.Thread(target=go, daemon=True)
    try:
        t.start()
        t.join(120)
        assert not t.is_alive(), "the forward pass is still waiting for the expert"
        assert isinstance(outcome["result"], TypeError), outcome
        assert "injected" in str(outcome["result"])
    finally:
        if not t.is_alive():
            engine.close()
            source.close()


# -- 6. sizes claimed before any check ------------------------------------------------------------
def test_zstd_frame_declaring_a_tebibyte_is_refused_before_allocating(tiny, tmp_path):
    """W1's zstd frame replaced by one whose header declares 1 TiB of content (chunk size and
    CRC fixed): zstd would allocate the declared size; now the declared size is compared with
    raw_size first, in the reader and in the runtime's decode."""
    frame = struct.pack("<IB", 0xFD2FB528, 0b11100000) + struct.pack("<Q", 1 << 40) + b"\x01\0\0"

    def f(index, b):
        c = rec(index, W1)["parts"][0]["exp"][0]
        assert c[1] >= len(frame)
        b[c[0]:c[0] + len(frame)] = frame
        c[1], c[3] = len(frame), zlib.crc32(frame)
    bad = edited(tiny["zstd"], tmp_path / "tib.zmoe", f)
    decode_error(bad, repr(W1), "exponent chunk 0", "zstd frame declares 1099511627776 bytes",
                 "raw_size 6144")


def test_header_index_size_of_a_tebibyte_is_refused_before_reading(tiny, tmp_path):
    def f(b):
        struct.pack_into("<Q", b, 16, 1 << 40)
        fix_header_crc(b)
    bad = mutate(tiny["huffman"], tmp_path / "isize.zmoe", f)
    open_error(bad, CorruptIndexError, "header field index_size", "does not end at file_size")


def test_raw_size_of_8_gib_is_refused(tiny, tmp_path):
    def f(index, b):
        rec(index, W1)["parts"][0]["exp"][0][2] = 8 << 30
    bad = edited(tiny["huffman"], tmp_path / "8g.zmoe", f)
    open_error(bad, CorruptIndexError, repr(W1), "parts[0].exp[0].raw_size", "8589934592")
    bad = edited(tiny["zstd"], tmp_path / "8gz.zmoe", f)
    open_error(bad, CorruptIndexError, repr(W1), "parts[0].exp:", "8589934592 exponents",
               "6144 elements")


def test_header_claiming_a_500_mib_index_around_a_small_one_is_refused(tiny, tmp_path):
    """The ~30 KB index followed by 500 MiB of (sparse) padding, the header claiming all of it
    as the index: refused from the header alone, before anything is read or allocated."""
    bad = tmp_path / "big-index.zmoe"
    b = bytearray(tiny["huffman"].read_bytes())
    _, _, ioff, isize = struct.unpack_from("<4sIQQ", b, 0)
    claim = 500 << 20
    struct.pack_into("<Q", b, 16, claim)
    struct.pack_into("<Q", b, 32, ioff + claim)
    fix_header_crc(b)
    with open(bad, "wb") as f:
        f.write(b)
        f.truncate(ioff + claim)
    assert bad.stat().st_size == ioff + claim and isize < 100_000
    open_error(bad, CorruptIndexError, "header field index_size", f"{claim} bytes",
               "above this reader's limit")


# -- 7. JSON that Python parses badly or into unexpected types --------------------------------------
def test_deeply_nested_index_is_refused(tiny, tmp_path):
    """200,000 nested arrays in a metadata value: json.loads raised RecursionError."""
    def deep(text):
        return text.replace('"hf.config":{"type":"json","value":',
                            '"hf.config":{"type":"json","value":' + "[" * 200_000 + "]" * 200_000
                            + ',"was":', 1)
    bad = with_index_text(tiny["huffman"], tmp_path / "deep.zmoe", deep)
    open_error(bad, CorruptIndexError, "index: metadata['hf.config'].value", "nested deeper than 64")


def test_nesting_that_parses_but_exceeds_the_limit_is_refused(tiny, tmp_path):
    def f(index, b):
        v = []
        for _ in range(100):
            v = [v]
        index["metadata"]["hf.config"]["value"] = v
    bad = edited(tiny["huffman"], tmp_path / "deep100.zmoe", f)
    open_error(bad, CorruptIndexError, "metadata 'hf.config': value: nested deeper than 64")


def test_integer_of_5000_digits_is_refused(tiny, tmp_path):
    """Python refuses to parse it (ValueError from json.loads); the error names the field."""
    def huge(text):
        return text.replace(f'"name":"{W1}","dtype":"BF16","shape":[96,',
                            f'"name":"{W1}","dtype":"BF16","shape":[{"9" * 5000},', 1)
    bad = with_index_text(tiny["huffman"], tmp_path / "digits.zmoe", huge)
    open_error(bad, CorruptIndexError, f"tensor {W1!r}", "shape[0]", "an integer of 5000 digits")


@pytest.mark.parametrize("where,value,needles", [
    ("metadata", [], ("index: metadata:", "a JSON array")),
    ("tensors", {}, ("index: tensors:", "a JSON object")),
    ("experts", "none", ("index: experts:", "a JSON string")),
    ("part", [], (repr(W1), "parts[0]:", "is not an object")),
    ("parts", {"0": 1}, (repr(W1), "parts:", "is not a list of parts")),
    ("record", [W1], ("tensors[", "is not a tensor record")),
    ("block", [0, 0], ("index: experts[0]:", "is not an expert block")),
    ("expert", ["layer", 0], (repr(W1), "expert:", "is not an object")),
])
def test_list_where_an_object_belongs_and_the_reverse(tiny, tmp_path, where, value, needles):
    def f(index, b):
        if where in ("metadata", "tensors", "experts"):
            index[where] = value
        elif where == "part":
            rec(index, W1)["parts"][0] = value
        elif where == "parts":
            rec(index, W1)["parts"] = value
        elif where == "record":
            index["tensors"][index["tensors"].index(rec(index, W1))] = value
        elif where == "block":
            index["experts"][0] = value
        else:
            rec(index, W1)["expert"] = value
    bad = edited(tiny["huffman"], tmp_path / "kind.zmoe", f)
    open_error(bad, CorruptIndexError, *needles)


@pytest.mark.parametrize("field,edit,needles", [
    ("sm offset as a string",
     lambda t, i: t["parts"][0]["sm"].__setitem__(0, str(t["parts"][0]["sm"][0])),
     (repr(W1), "parts[0].sm.offset", "is not an integer")),
    ("dtype as an int", lambda t, i: t.__setitem__("dtype", 2), (repr(W1), "dtype:", "2 is not one of")),
    ("layer as a string", lambda t, i: t["expert"].__setitem__("layer", "0"),
     (repr(W1), "expert.layer:", '"0" is not an integer')),
    ("block layer as a string", lambda t, i: block(i).__setitem__("layer", "0"),
     ("experts[", "layer:", '"0" is not an integer')),
    ("metadata int as a string",
     lambda t, i: i["metadata"]["hparams.num_experts"].__setitem__("value", "4"),
     ("metadata 'hparams.num_experts': value:", '"4" is not an integer')),
    ("metadata int beyond 64 bits",
     lambda t, i: i["metadata"]["hparams.num_experts"].__setitem__("value", 2**70),
     ("metadata 'hparams.num_experts': value:", "outside 64 bits")),
    ("metadata int[] of strings",
     lambda t, i: i["metadata"]["hparams.moe_layers"].__setitem__("value", [0, "1", 2]),
     ("metadata 'hparams.moe_layers': value:", "element 1", "is not an integer")),
    ("metadata type unknown",
     lambda t, i: i["metadata"]["hparams.num_experts"].__setitem__("type", "u64"),
     ("metadata 'hparams.num_experts': type:", '"u64" is not one of')),
    ("crc beyond 32 bits", lambda t, i: t["parts"][0]["sm"].__setitem__(2, 1 << 32),
     (repr(W1), "parts[0].sm.crc32", "is not a 32-bit CRC")),
])
def test_mixed_types_name_the_field(tiny, tmp_path, field, edit, needles):
    bad = edited(tiny["huffman"], tmp_path / "types.zmoe", lambda index, b: edit(rec(index, W1), index))
    open_error(bad, CorruptIndexError, *needles)


def test_duplicate_key_and_nan_are_refused(tiny, tmp_path):
    """A key twice in one object (which json.loads would silently resolve to the last) and NaN
    (not JSON) name where they are."""
    def dup(text):
        return text.replace(f'"name":"{W1}","dtype":"BF16","shape":[96,64]',
                            f'"name":"{W1}","dtype":"BF16","shape":[96,64],"shape":[1,64]', 1)
    bad = with_index_text(tiny["huffman"], tmp_path / "dup.zmoe", dup)
    open_error(bad, CorruptIndexError, f"tensor {W1!r}", "shape", "appears twice")

    def nan(text):
        return text.replace('"hparams.rms_norm_eps":{"type":"float","value":1e-06}',
                            '"hparams.rms_norm_eps":{"type":"float","value":NaN}', 1)
    bad = with_index_text(tiny["huffman"], tmp_path / "nan.zmoe", nan)
    open_error(bad, CorruptIndexError, "metadata['hparams.rms_norm_eps'].value", "NaN is not JSON")


# -- 8. Huffman tables, streams, ranges, overlaps, dtype/encoding ----------------------------------
def _rewrite_chunk(fn):
    """An index edit that replaces W1's Huffman chunk by ``fn(chunk bytes)`` (same length) and
    fixes its CRC."""
    def f(index, b):
        c = rec(index, W1)["parts"][0]["exp"][0]
        new = bytearray(fn(bytearray(b[c[0]:c[0] + c[1]])))
        assert len(new) == c[1]
        b[c[0]:c[0] + c[1]] = new
        c[3] = zlib.crc32(new)
    return f


def _lengths_edit(kind):
    """A chunk edit of the 128 code-length bytes (SPEC §5.3)."""
    def fn(ch):
        ln = huffman.unpack_lengths(bytes(ch[:128])).copy()
        used = np.flatnonzero(ln)
        if kind == "over-subscribed":     # one more code of the shortest length
            ln[np.flatnonzero(ln == 0)[0]] = ln[used].min()
        elif kind == "incomplete":        # one code dropped
            ln[used[-1]] = 0
        else:                             # a 13-bit code (fits the nibble, above the limit)
            ln[used[0]] = 13
        ch[:128] = huffman.pack_lengths(ln)
        return ch
    return fn


@pytest.mark.parametrize("kind", ["over-subscribed", "incomplete", "too long"])
def test_huffman_lengths_that_are_not_a_prefix_code(tiny, tmp_path, kind):
    bad = edited(tiny["huffman"], tmp_path / "lengths.zmoe", _rewrite_chunk(_lengths_edit(kind)))
    decode_error(bad, repr(W1), "exponent chunk 0",
                 "code lengths above 12 bits or not a complete prefix code")


def test_huffman_stream_claiming_more_symbols_than_its_bytes(tiny, tmp_path):
    """Stream 0 made 8 bytes shorter (stream 1 longer; the sizes still add up to the chunk):
    stream 0 cannot hold its quarter of the exponents."""
    def fn(ch):
        sizes = list(struct.unpack_from("<4I", ch, 128))
        struct.pack_into("<4I", ch, 128, sizes[0] - 8, sizes[1] + 8, sizes[2], sizes[3])
        return ch
    bad = edited(tiny["huffman"], tmp_path / "stream.zmoe", _rewrite_chunk(fn))
    decode_error(bad, repr(W1), "exponent chunk 0", "does not decode to exactly its exponents")


def test_chunk_too_short_for_its_raw_size_is_refused_at_open(tiny, tmp_path):
    def f(index, b):
        c = rec(index, W1)["parts"][0]["exp"][0]
        c[1] = 200
        c[3] = crc(b, c[0], 200)
    bad = edited(tiny["huffman"], tmp_path / "short.zmoe", f)
    open_error(bad, CorruptIndexError, repr(W1), "parts[0].exp[0].raw_size",
               "6144 exponents cannot be coded in a Huffman chunk of 200 bytes")


@pytest.mark.parametrize("what", ["sm past the end", "chunk past the end", "raw before data",
                                  "region past the end"])
def test_offsets_past_the_end_of_the_file(tiny, tmp_path, what):
    size = tiny["huffman"].stat().st_size

    def f(index, b):
        if what == "sm past the end":
            rec(index, W1)["parts"][0]["sm"][0] = size + 100
        elif what == "chunk past the end":
            rec(index, W1)["parts"][0]["exp"][0][0] = 2**62
        elif what == "raw before data":
            rec(index, "lm_head.weight")["parts"][0]["raw"][0] = 64
        else:
            block(index)["sm"][0] = size + 4096
    bad = edited(tiny["huffman"], tmp_path / "past.zmoe", f)
    open_error(bad, CorruptIndexError, "outside the data section")


def test_overlapping_dense_tensors_are_refused(tiny, tmp_path):
    """lm_head.weight pointed at embed_tokens' bytes (its CRC recomputed): every size agrees,
    and the model would silently run with tied weights."""
    def f(index, b):
        src = rec(index, "model.embed_tokens.weight")["parts"][0]["raw"]
        rec(index, "lm_head.weight")["parts"][0]["raw"] = list(src)
    bad = edited(tiny["huffman"], tmp_path / "alias.zmoe", f)
    open_error(bad, CorruptIndexError, "model.embed_tokens.weight", "lm_head.weight", "overlaps")


def test_piece_outside_its_expert_region_is_refused(tiny, tmp_path):
    """Block 0/0's SM region moved onto block 0/1's (no piece moved): its pieces no longer lie
    in the region the runtime reads for it."""
    def f(index, b):
        block(index, 0, 0)["sm"] = list(block(index, 0, 1)["sm"])
    bad = edited(tiny["huffman"], tmp_path / "region.zmoe", f)
    open_error(bad, CorruptIndexError, repr(W1), "lies outside the sm region", "expert block 0/0")


@pytest.mark.parametrize("dtype,needles", [
    ("F32", ("parts[0].sm.size", "6144 bytes", "needs 18432", "3 per element")),
    ("F16", ("parts[0].sm.size", "needs 12288")),
    ("I16", ("encoding:", "bit-plane encoding of a I16 tensor")),
    ("Q4", ("dtype:", '"Q4" is not one of')),
])
def test_dtype_that_does_not_match_the_planes(tiny, tmp_path, dtype, needles):
    """BF16 planes declared F32 (or F16...): the merge would read 3 (2) SM bytes per element."""
    def f(index, b):
        rec(index, W1)["dtype"] = dtype
    bad = edited(tiny["huffman"], tmp_path / "dtype.zmoe", f)
    open_error(bad, CorruptIndexError, repr(W1), *needles)


def test_block_and_record_disagreements(tiny, tmp_path):
    cases = {
        "tensor in two blocks": (lambda i: block(i, 0, 1)["tensors"].append(W1),
                                 ("expert block 0/1", "is of expert 0")),
        "tensor twice in a block": (lambda i: block(i)["tensors"].append(W1),
                                    ("expert block 0/0", "listed by another block or twice")),
        "block listed twice": (lambda i: i["experts"].append(dict(block(i))),
                               ("expert block 0/0", "listed twice")),
        "tensor in no block": (lambda i: block(i)["tensors"].remove(W1),
                               (repr(W1), "in no expert block")),
        "unknown tensor": (lambda i: block(i)["tensors"].__setitem__(0, "nope"),
                           ("expert block 0/0", '"nope" is not a tensor of the index')),
        "role twice": (lambda i: rec(i, W3)["expert"].__setitem__("role", "gate"),
                       ("expert block 0/0", "role 'gate'")),
        "unaligned region": (lambda i: block(i)["sm"].__setitem__(0, block(i)["sm"][0] + 8),
                             ("expert block 0/0", "sm.offset", "multiple of the alignment")),
        "tensor name twice": (lambda i: rec(i, W2).__setitem__("name", W1),
                              (repr(W1), "name:", "listed twice")),
    }
    for k, (edit, needles) in cases.items():
        bad = edited(tiny["huffman"], tmp_path / f"{k.replace(' ', '-')}.zmoe",
                     lambda index, b, edit=edit: edit(index))
        open_error(bad, CorruptIndexError, *needles)


@pytest.mark.parametrize("edit,needles", [
    (lambda i: rec(i, W2)["expert"].__setitem__("role", "down_proj"),
     ("expert block 0/0: tensors: roles", "an expert needs down")),
    (lambda i: rec(i, W3).__setitem__("shape", [64, 96]),
     # the stored hyper-parameters already imply another shape (zipmoe_rt.families.check)
     (repr(W3), "shape [64, 96]", "imply [96, 64]", "moe_intermediate_size")),
])
def test_expert_block_the_runtime_cannot_build(tiny, tmp_path, edit, needles):
    """A block without a down projection (roles are the runtime's business: the index is
    otherwise valid) or with gate/up/down shapes that do not fit together: `run` raised a
    KeyError or a shape error deep in the model; the runtime and `verify` now refuse it."""
    bad = edited(tiny["huffman"], tmp_path / "roles.zmoe", lambda index, b: edit(index))
    ZmoeReader(bad).close()     # the index itself is consistent
    with pytest.raises(CorruptIndexError) as ei:
        ZmoeSource(bad).layouts
    for n in (str(bad),) + needles:
        assert n in str(ei.value), (n, str(ei.value))
    r = CliRunner().invoke(cli_main, ["verify", "-q", str(bad)], env={"ZIPMOE_RT_DEBUG": None})
    assert r.exit_code == 1 and r.stderr.strip() == f"error: {ei.value}", r.stderr


def test_good_files_open_verify_and_decode(tiny):
    """The unmodified files pass every check (no false positive)."""
    for path in tiny.values():
        r = CliRunner().invoke(cli_main, ["verify", "-q", str(path)])
        assert r.exit_code == 0 and "OK" in r.stdout, r.output
        src = ZmoeSource(path)
        try:
            for layer, e in src.layouts:
                w = src.decode_expert(layer, e)
                assert w.gate.shape == (96, 64) and w.down.shape == (64, 96)
        finally:
            src.close()


# -- the runtime's own guard in front of the kernels -------------------------------------------------
@pytest.mark.parametrize("codec", ["huffman", "zstd"])
def test_layout_refuses_kernel_arguments_outside_their_buffers(tiny, codec):
    """A Piece built around the validator (as a bug elsewhere could) whose chunk or SM range
    leaves the region buffers is refused before any kernel runs."""
    import dataclasses
    import zstandard as zstd
    src = ZmoeSource(tiny[codec])
    try:
        lay = src.layout(0, 0)
        sm = src.reader.view(*lay.sm_region)
        exp = src.reader.view(*lay.exp_region)
        p = lay.pieces[0]
        o, n, raw, c = p.chunks[0]
        bad_pieces = {
            "chunk past the exponent region": dataclasses.replace(p, chunks=((o + exp.size, n, raw, c),)),
            "SM past the SM region": dataclasses.replace(p, sm=(sm.size - 10,) + p.sm[1:]),
            "more exponents than the output": dataclasses.replace(p, chunks=((o, n, raw + 4096, c),)),
        }
        for what, bp in bad_pieces.items():
            out = np.empty(p.elements, np.uint16)
            with pytest.raises(CorruptIndexError, match="lies outside its region buffer"):
                L_.decode_chunks(src.path, bp, 0, 1, sm, exp, out, zstd.ZstdDecompressor())
        # and the real piece decodes
        out = np.empty(p.elements, np.uint16)
        L_.decode_chunks(src.path, p, 0, 1, sm, exp, out, zstd.ZstdDecompressor())
        assert np.array_equal(out.view(np.uint16).reshape(p.shape),
                              src.reader.read_tensor(p.name))
    finally:
        src.close()

