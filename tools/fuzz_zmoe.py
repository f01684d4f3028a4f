#!/usr/bin/env python
"""Structure-aware fuzzing of ``.zmoe`` readers and the runtime's decode (format/SPEC.md §9).

    python tools/fuzz_zmoe.py [--count 2000] [--seconds 600] [--seed 1] [--base FILE ...]
                              [--timeout 30] [--memory-mb 3072] [--workers N] [--json OUT]
                              [--keep DIR]
    python tools/fuzz_zmoe.py --replay FILE ...

Each input is a real container (two tiny ones built here with the format library, one per
exponent codec, or the ``--base`` files) with 1 to 3 mutations: a header field, an index value
(set to an edge value, copied from elsewhere in the index, deleted, duplicated...), bytes of a
stored piece (Huffman code lengths and stream sizes included) or where it points (another
piece's bytes), or JSON the writer never emits (deep nesting, 5000-digit integers, NaN,
duplicate keys, bad UTF-8). Every CRC is recomputed after the mutation, so it reaches the
structural checks and the decoders instead of stopping at a checksum.

Inputs are examined one at a time in a worker process (``--workers N`` run side by side; the
inputs of a seed do not depend on N; the machinery is ``tools/fuzz_common.py``) limited to
``--memory-mb`` of address space and ``--timeout`` seconds per input: open, ``verify``, read
every tensor and expert block, the runtime's decode of every expert (with and without CRC
checks) and, where the expert shapes are the base's, the budgeted expert engine (I/O and decode
threads) over every MoE layer.
Outcomes, counted and printed at the end:

    ok       opened, verified and decoded (the mutation was harmless or undetectable)
    refused  a zmoe.ZmoeError naming the file (counted by class and stage)
    other    any other exception, or a ZmoeError not naming the file
    memory   MemoryError (an allocation of a size the file claims)
    crash    the worker died of a signal (SIGSEGV, SIGABRT...)
    hang     no answer within --timeout

Exit status 1 if any input ends other/memory/crash/hang; with ``--keep``, those inputs and
their mutations are saved there. One worker examines input after input, so heap damage done by
one input may only crash the worker on a later one: ``--replay FILE ...`` examines each file in
a fresh worker, to find the culprit. tests/test_fuzz_container.py runs the same mutations and
worker for a short hypothesis-driven campaign.
"""
from __future__ import annotations

import argparse
import json
import random
import struct
import sys
import tempfile
import zlib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tools"))
import fuzz_common as fc  # noqa: E402
try:
    import zmoe  # noqa: F401
except ImportError:
    sys.path[:0] = [str(ROOT), str(ROOT / "format")]

import numpy as np  # noqa: E402

import zmoe  # noqa: E402
from zmoe.writer import HEADER_STRUCT  # noqa: E402

# -- the base containers -------------------------------------------------------------------------
H, I, E = 32, 48, 3
#: hyper-parameters of the base model (the engine stage uses these, not the file's)
BASE_HPARAMS = {"family": "mixtral", "hidden_size": H, "num_experts": E, "num_experts_per_tok": 2,
                "moe_layers": [0, 1]}
#: expert shapes the engine stage needs (the base's); other shapes skip that stage
ENGINE_SHAPES = {"gate": [I, H], "up": [I, H], "down": [H, I], "gate_up": [E, 2 * I, H]}


def make_base(path, exp_codec: str = "huffman", seed: int = 0) -> Path:
    """A tiny container exercising every structure of SPEC §4-§6: raw and bit-plane dense
    tensors of several dtypes (an empty one too), per-expert BF16 experts with 2 exponent
    chunks per tensor (layer 0), an expert-stacked gate_up tensor (layer 1), F32/F16 experts
    with a raw I32 piece (layer 2), and the metadata the runtime reads."""
    rng = np.random.default_rng(seed)

    def bf16(*shape):   # trained-weight-like BF16 bit patterns (normal values, few exponents)
        f = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        return (f.view(np.uint32) >> 16).astype(np.uint16)

    w = zmoe.ZmoeWriter(path)
    w.add_metadata("general.family", "mixtral")
    for k, v in BASE_HPARAMS.items():
        w.add_metadata(f"hparams.{k}", v)
    w.add_metadata("hf.config", {"rope_scaling": {"type": "yarn", "factor": 2.0}}, "json")
    w.add_metadata("hparams.rms_norm_eps", 1e-6)
    kw = dict(chunks=2, min_chunk=256, exp_codec=exp_codec)
    w.add_tensor("model.embed_tokens.weight", "BF16", (64, H), bf16(64, H))
    w.add_tensor("model.norm.weight", "BF16", (H,), bf16(H), encoding="bitplane", **kw)
    w.add_tensor("router.f32", "F32", (E, H), rng.standard_normal((E, H)).astype(np.float32))
    w.add_tensor("buffer.i64", "I64", (4,), np.arange(4, dtype=np.int64))
    w.add_tensor("bp.f16", "F16", (20, 30), rng.standard_normal((20, 30)).astype(np.float16),
                 encoding="bitplane", **kw)
    w.add_tensor("bp.f32", "F32", (700,), rng.standard_normal(700).astype(np.float32),
                 encoding="bitplane", **kw)
    w.add_tensor("empty.bf16", "BF16", (0, 4), np.zeros(0, np.uint16))
    w.add_tensor("bp.empty", "BF16", (0,), np.zeros(0, np.uint16), encoding="bitplane", **kw)
    stacked = bf16(E, 2 * I, H)
    for e in range(E):
        p = f"model.layers.0.block_sparse_moe.experts.{e}"
        w.write_expert(zmoe.encode_expert(0, e, [
            zmoe.ExpertPiece(f"{p}.w1.weight", "BF16", (I, H), "gate", bf16(I, H)),
            zmoe.ExpertPiece(f"{p}.w3.weight", "BF16", (I, H), "up", bf16(I, H)),
            zmoe.ExpertPiece(f"{p}.w2.weight", "BF16", (H, I), "down", bf16(H, I))], **kw))
        w.write_expert(zmoe.encode_expert(1, e, [
            zmoe.ExpertPiece("model.layers.1.mlp.experts.gate_up_proj", "BF16", stacked.shape,
                             "gate_up", stacked[e], part=e),
            zmoe.ExpertPiece(f"model.layers.1.mlp.experts.{e}.down_proj.weight", "BF16", (H, I),
                             "down", bf16(H, I))], **kw))
        q = f"model.layers.2.mlp.experts.{e}"
        w.write_expert(zmoe.encode_expert(2, e, [
            zmoe.ExpertPiece(f"{q}.gate_proj.weight", "F32", (6, H), "gate",
                             rng.standard_normal((6, H)).astype(np.float32)),
            zmoe.ExpertPiece(f"{q}.up_proj.weight", "F16", (6, H), "up",
                             rng.standard_normal((6, H)).astype(np.float16)),
            zmoe.ExpertPiece(f"{q}.down_proj.weight", "F32", (H, 6), "down",
                             rng.standard_normal((H, 6)).astype(np.float32)),
            zmoe.ExpertPiece(f"{q}.scales", "I32", (3,), "scales", np.arange(3, dtype=np.int32))],
            chunks=2, min_chunk=64, exp_codec=exp_codec))
    w.close()
    return Path(path)


# -- mutations ------------------------------------------------------------------------------------
HEADER_FIELDS = {"version": 32, "index_offset": 64, "index_size": 64, "data_offset": 64,
                 "file_size": 64, "alignment": 32}
INDEX_ACTIONS = fc.JSON_ACTIONS
BYTE_KINDS = ("xor", "set", "lengths", "streams", "alias")
TEXT_KINDS = fc.TEXT_KINDS


def _list(v) -> list:
    return v if isinstance(v, list) else []


def _pieces(index):
    """[(tensor record, entry, is a chunk)] of every stored piece (raw data, SM planes, exponent
    chunks) that an earlier mutation left recognisable."""
    out = []
    for t in _list(index.get("tensors")) if isinstance(index, dict) else []:
        for p in _list(t.get("parts")) if isinstance(t, dict) else []:
            if not isinstance(p, dict):
                continue
            for key in ("raw", "sm"):
                if isinstance(p.get(key), list):
                    out.append((t, p[key], False))
            for c in _list(p.get("exp")):
                if isinstance(c, list):
                    out.append((t, c, True))
    return [x for x in out if len(x[1]) >= 3 and all(type(v) is int for v in x[1])]


def _bytes_op(data: bytearray, index, op):
    pieces = _pieces(index)
    if not pieces:
        return
    t, entry, is_chunk = pieces[op["piece"] % len(pieces)]
    off, size = entry[0], entry[1]
    if size <= 0 or off < 0 or off + size > len(data):
        return
    kind = op["kind"]
    if kind == "alias":   # point the piece at another piece's bytes (overlaps that CRCs accept)
        other = pieces[op["where"] % len(pieces)][1]
        entry[0], entry[1] = other[0], other[1]
        off, size = entry[0], entry[1]
        if 0 <= off and size >= 0 and off + size <= len(data):
            entry[-1] = zlib.crc32(bytes(data[off:off + size])) & 0xFFFFFFFF
        return
    huff = is_chunk and isinstance(t, dict) and t.get("exp_codec") == "huffman" and size >= 144
    if kind == "lengths" and huff:        # one code length nibble of a Huffman chunk
        i = off + op["where"] % 128
        data[i] = (data[i] & 0xF0) | (op["value"] & 15) if op["value"] & 16 else \
            (data[i] & 0x0F) | ((op["value"] & 15) << 4)
    elif kind == "streams" and huff:      # move bytes between two stream sizes (sum kept)
        sizes = list(struct.unpack_from("<4I", data, off + 128))
        a, b = op["where"] % 4, (op["where"] // 4) % 4
        d = 1 + op["value"] % 16
        if a != b and sizes[a] >= d:
            sizes[a] -= d
            sizes[b] += d
            struct.pack_into("<4I", data, off + 128, *sizes)
    elif kind == "set":
        data[off + op["where"] % size] = op["value"]
    else:
        data[off + op["where"] % size] ^= op["value"] or 1
    entry[-1] = zlib.crc32(bytes(data[off:off + size])) & 0xFFFFFFFF   # the mutation gets past it


def build(base: bytes, ops: list) -> bytes:
    """``base`` with ``ops`` applied (see :func:`random_op`); the index, both CRCs and every
    stored piece's CRC recomputed, so the mutations reach the checks behind the checksums."""
    _, version, ioff, isize, doff, fsize, align, _ = HEADER_STRUCT.unpack_from(base, 0)
    data = bytearray(base[:ioff])
    index = json.loads(base[ioff:ioff + isize])
    header_ops, replace, raw_text = [], [], []
    for op in ops:
        kind = op["op"]
        if kind == "index":
            fc.json_op(index, op)
        elif kind == "bytes":
            _bytes_op(data, index, op)
        elif kind == "header":
            header_ops.append(op)
        elif op["kind"] in ("badutf8", "syntax"):
            raw_text.append(op)
        else:
            r = fc.text_op(index, op)
            if r:
                replace.append(r)
    text = json.dumps(index, separators=(",", ":"), ensure_ascii=False)
    for sentinel, new in replace:
        text = text.replace(sentinel, new)
    blob = bytearray(text.encode("utf-8"))
    for op in raw_text:
        if blob:
            i = op["pick"] % len(blob)
            blob[i] = 0xFF if op["kind"] == "badutf8" else ord("}]:,\"["[op["pick"] % 6])
    fields = {"version": version, "index_offset": len(data), "index_size": len(blob),
              "data_offset": doff, "file_size": len(data) + len(blob), "alignment": align}
    for op in header_ops:
        v = fields[op["field"]]
        bits = HEADER_FIELDS[op["field"]]
        cands = [0, 1, v - 1, v + 1, 2 * v, v // 2, v + 4096, 2**32 - 1, 2**40, 2**63,
                 2**bits - 1, 64, 500 << 20]
        fields[op["field"]] = cands[op["vpick"] % len(cands)] % 2**bits
    head = HEADER_STRUCT.pack(zmoe.MAGIC, fields["version"], fields["index_offset"],
                              fields["index_size"], fields["data_offset"], fields["file_size"],
                              fields["alignment"], zlib.crc32(blob) & 0xFFFFFFFF)
    head += struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)
    return head + bytes(data[len(head):]) + bytes(blob)


def random_op(rng: random.Random) -> dict:
    """One mutation (a JSON-able dict, so that an input can be rebuilt from its ops)."""
    kind = rng.choices(["index", "bytes", "header", "text"], weights=[6, 3, 1, 1])[0]
    if kind == "index":
        return {"op": "index", "pick": rng.randrange(1 << 16), "action": rng.choice(INDEX_ACTIONS),
                "vpick": rng.randrange(64), "src": rng.randrange(1 << 16)}
    if kind == "bytes":
        return {"op": "bytes", "piece": rng.randrange(1 << 16), "where": rng.randrange(1 << 20),
                "kind": rng.choice(BYTE_KINDS), "value": rng.randrange(256)}
    if kind == "header":
        return {"op": "header", "field": rng.choice(list(HEADER_FIELDS)),
                "vpick": rng.randrange(64)}
    return {"op": "text", "pick": rng.randrange(1 << 16), "kind": rng.choice(TEXT_KINDS)}


# -- the worker: examine one input -------------------------------------------------------------
def examine(path: str) -> dict:
    """Open, verify and decode ``path`` every way the runtime does. Returns ``{"stages":
    {stage: "ok" | "skipped" | ZmoeError class}, "other": None | "Type: message"}``; stops at
    the first exception that is not a ZmoeError naming the file."""
    from zmoe import ZmoeError
    from zipmoe_rt.engine.store import ZmoeSource
    stages = {}

    def stage(name, fn):
        try:
            stages[name] = fn() or "ok"
            return True
        except ZmoeError as e:
            if str(path) not in str(e):
                raise RuntimeError(f"ZmoeError without the file's name: {e}") from None
            if "index is not valid (" in str(e):   # the reader's catch-all around validation
                raise RuntimeError(f"an index error that names no field: {e}") from None
            stages[name] = type(e).__name__
            return False

    def read_all():
        with zmoe.ZmoeReader(path) as r:
            for name in r.tensors:
                r.read_tensor(name)
            for layer, e in r.experts:
                r.expert_tensors(layer, e)

    def runtime(verify):
        src = ZmoeSource(path, verify=verify, check_model=False)   # a partial model
        try:
            for name, t in src.reader.tensors.items():
                if "expert" not in t:
                    src.tensor(name)
            for layer, e in src.layouts:
                src.decode_expert(layer, e)
        finally:
            src.close()

    try:
        if stage("open", lambda: zmoe.ZmoeReader(path).close()):
            stage("verify", lambda: zmoe.ZmoeReader(path).verify())
            stage("read", read_all)
            stage("runtime", lambda: runtime(True))
            stage("runtime-no-verify", lambda: runtime(False))
            stage("engine", lambda: _engine(path))
        return {"stages": stages, "other": None}
    except MemoryError as e:
        return {"stages": stages, "other": f"MemoryError: {e}"[:500], "memory": True}
    except Exception as e:  # noqa: BLE001 - what the campaign looks for
        import traceback
        return {"stages": stages, "other": f"{type(e).__name__}: {e}"[:500],
                "where": traceback.format_exc(limit=-3)[-1500:]}


def _engine(path):
    """The budgeted expert engine (I/O + decode threads, minimum budget: every expert read
    and decoded per use) over both BF16 MoE layers, prefill and decode, when the file's expert
    shapes are the base's (matching weights to hyper-parameters is the model's business)."""
    from zipmoe_rt.engine.pipeline import ExpertEngine, budget_split
    from zipmoe_rt.engine.store import ZmoeSource
    src = ZmoeSource(path, keep_experts=False, copy_dense=True, check_model=False)
    try:
        src.hparams.update(BASE_HPARAMS)
        lays = src.layouts
        if set(lays) != {(layer, e) for layer in range(3) for e in range(E)} or any(
                ENGINE_SHAPES.get(p.role) != src.reader.tensors[p.name]["shape"]
                for layer in BASE_HPARAMS["moe_layers"] for e in range(E)
                for p in lays[(layer, e)].pieces):
            return "skipped"
        bytes_F, k, _ = budget_split(src, 1 << 40)
        eng = ExpertEngine(src, src.dense_bytes() + k * bytes_F, "zip-lru", workers=2)
        try:
            x = np.random.default_rng(0).standard_normal((3, H)).astype(np.float32)
            topk = np.array([[0, 1], [1, 2], [2, 0]])
            wts = np.full((3, 2), 0.5, np.float32)
            for layer in BASE_HPARAMS["moe_layers"]:
                eng.run(layer, x, topk, wts)
                eng.run(layer, x[:1], topk[:1], wts[:1])
        finally:
            eng.close()
    finally:
        src.close()


def _warm():
    """Examine a fresh base container (warms the JIT; SystemExit if it is not clean)."""
    with tempfile.TemporaryDirectory() as d:
        base = make_base(Path(d) / "warm.zmoe")
        res = examine(str(base))
        if res["other"] or set(res["stages"].values()) != {"ok"}:
            raise SystemExit(f"the base container does not examine cleanly: {res}")


def Worker(memory_mb: int = 3072, start_timeout: float = 600) -> fc.Worker:
    """A worker process of this tool (:class:`fuzz_common.Worker`) serving :func:`examine`."""
    return fc.Worker(__file__, memory_mb, start_timeout)


BAD = fc.BAD


def campaign(bases: list, count: int, seconds: float, seed: int, timeout: float,
             memory_mb: int, keep: Path | None, out=sys.stdout, workers: int = 1) -> dict:
    """Run up to ``count`` inputs or ``seconds``, whichever ends first, over ``workers``
    worker processes; print and return the figures (:func:`fuzz_common.campaign`)."""
    rng = random.Random(seed)
    blobs = [Path(b).read_bytes() for b in bases]

    def make_input(n):
        bi = rng.randrange(len(blobs))
        return {"base": str(bases[bi]), "bi": bi,
                "ops": [random_op(rng) for _ in range(rng.randint(1, 3))]}

    def write_input(spec, folder):
        path = folder / "in.zmoe"
        path.write_bytes(build(blobs[spec["bi"]], spec["ops"]))
        return path

    res = fc.campaign(make_input, write_input, lambda: Worker(memory_mb), count, seconds,
                      timeout, workers, keep, out)
    res["seed"] = seed
    return res


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--count", type=int, default=2000, help="most inputs (default 2000)")
    ap.add_argument("--seconds", type=float, default=600, help="most wall time (default 600)")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--base", type=Path, nargs="*", help=".zmoe files to mutate (default: two "
                                                         "tiny ones built here)")
    ap.add_argument("--timeout", type=float, default=30, help="seconds per input (default 30)")
    ap.add_argument("--memory-mb", type=int, default=3072,
                    help="worker address-space limit in MiB (default 3072)")
    ap.add_argument("--workers", type=int, default=1,
                    help="worker processes examining inputs at once (default 1)")
    ap.add_argument("--json", type=Path, help="write the figures here (JSON)")
    ap.add_argument("--keep", type=Path, help="save failing inputs and their mutations here")
    ap.add_argument("--replay", type=Path, nargs="+",
                    help="examine these files, each in a fresh worker, and print the outcomes")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        fc.serve(examine, _warm)
        return 0
    if a.replay:
        bad = 0
        for f in a.replay:
            w = Worker(a.memory_mb)
            try:
                res = w.examine(f.resolve(), a.timeout)
            finally:
                w.close()
            bad += res["outcome"] in BAD
            print(f"{f}: {json.dumps(res)}")
        return 1 if bad else 0
    with tempfile.TemporaryDirectory() as d:
        bases = a.base or [make_base(Path(d) / f"base-{c}.zmoe", c) for c in ("huffman", "zstd")]
        res = campaign(bases, a.count, a.seconds, a.seed, a.timeout, a.memory_mb, a.keep,
                       workers=a.workers)
    if a.json:
        a.json.write_text(json.dumps(res, indent=1))
    return 1 if any(res["outcomes"][o] for o in BAD) else 0


if __name__ == "__main__":
    sys.exit(main())
