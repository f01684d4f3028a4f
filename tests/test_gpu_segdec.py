"""The staged segment decoder (zipmoe_rt/backends/cuda_segdec.py, kernels in
zipmoe_rt/kernels/cuda_segdec_src.py): every compile-time variant gives, word for word, the
weights and the host twin's words (zipmoe_rt/kernels/gpu_segments.py) for experts held as the
converter stores them (all 65,536 BF16 patterns, real-like values, a one-symbol plane, a tiny
matrix; segments from 4 to 2048 symbols; an exponent region at an odd address), and every
expert of a converted model; its multi-symbol tables hold the host table's codes; as the write
pass of ``decode_exponents`` it gives the former write pass's bytes and rejects what it rejects.
The host part (the in-memory expert + segment tables + host twin) runs everywhere; the GPU part
is skipped with the reason shown without CuPy or a GPU."""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from zipmoe_rt.backends import cuda_unavailable, get_backend
from zipmoe_rt.engine.gpu_meta import build_meta, pack_expert
from zipmoe_rt.kernels.gpu_segments import decode_segments

WHY = cuda_unavailable()
gpu = pytest.mark.skipif(WHY is not None, reason=f"no CUDA backend here: {WHY}")
SEGMENTS = [256, 37, 2048, 4]


def _bf16(a) -> np.ndarray:
    """float -> BF16 bits (truncation)."""
    return (np.asarray(a, np.float32).view(np.uint32) >> 16).astype(np.uint16)


def _experts():
    rng = np.random.default_rng(0)
    every = rng.permutation(np.arange(1 << 16, dtype=np.uint32)).astype(np.uint16)
    return [
        {"gate": _bf16(rng.standard_normal((96, 200)) * 0.02), "up": every.reshape(256, 256),
         "down": _bf16(rng.standard_normal((200, 96)) * 0.05
                       * np.exp(rng.standard_normal((200, 96))))},
        {"gate": np.full((40, 40), 0x3C00, np.uint16), "up": _bf16(rng.standard_normal((3, 5))),
         "down": _bf16(rng.standard_normal((64, 700)) * 0.3)},
    ]


def _check(out, m, mats):
    for role, w0, shape in m.outs:
        got = out[w0:w0 + int(np.prod(shape))].reshape(shape)
        assert np.array_equal(got, mats[role]), role


@pytest.mark.parametrize("seg", SEGMENTS)
def test_in_memory_expert_rebuilds_on_the_host(seg):
    """pack_expert + build_meta + the host twin give the weights back (every BF16 pattern)."""
    for mats in _experts():
        lay, sm, exp = pack_expert(mats, min_chunk=1000)
        assert max(len(p.chunks) for p in lay.pieces) == 4
        m = build_meta(lay, exp, segment=seg)
        out = np.zeros(m.words, np.uint16)
        decode_segments(exp, sm, m.runs, m.bits, m.tabs, seg, out)
        _check(out, m, mats)


@gpu
@pytest.mark.parametrize("variant", ["t128", "t256", "t128r128", "t512", "t64s"])
def test_staged_decode_every_variant(variant):
    import cupy as cp

    from zipmoe_rt.backends import cuda_segdec
    for mats in _experts():
        lay, sm, exp = pack_expert(mats, min_chunk=1000)
        for seg in SEGMENTS:
            m = build_meta(lay, exp, segment=seg)
            want = np.zeros(m.words, np.uint16)
            decode_segments(exp, sm, m.runs, m.bits, m.tabs, seg, want)
            ebuf = cp.zeros(exp.size + 8, cp.uint8)
            ebuf[1:1 + exp.size] = cp.asarray(exp)           # an odd address
            out = cp.zeros(m.words, cp.uint16)
            cuda_segdec.decode_runs(ebuf[1:], cp.asarray(sm), cp.asarray(m.runs),
                                    cp.asarray(m.bits), cp.asarray(m.tabs), seg, out,
                                    variant=variant)
            got = cp.asnumpy(out)
            _check(got, m, mats)
            assert np.array_equal(got, want), (variant, seg)


def _batch_jobs(xp, seg):
    """Decode jobs for several experts (``xp``: numpy or cupy): the first two experts' regions
    and tables at odd and 256-byte offsets of one shared arena (as the engine's batched miss
    path lays out copied blocks), the others in arrays of their own (as C/E slots hold them)."""
    items = [pack_expert(m, min_chunk=1000) for m in _experts() + _experts()[::-1]]
    metas = [build_meta(lay, exp, segment=seg) for lay, sm, exp in items]
    arena = xp.zeros(1 << 22, xp.uint8)
    off, jobs = 0, []
    for i, ((lay, sm, exp), m) in enumerate(zip(items, metas)):
        parts = [exp, sm, m.runs, m.bits, m.tabs]
        refs = []
        for j, a in enumerate(parts):
            raw = np.ascontiguousarray(a).reshape(-1).view(np.uint8)
            if i < 2:
                off += 1 if j == 0 else (-off) % 256      # exponent region at an odd address
                arena[off:off + raw.size] = xp.asarray(raw)
                refs.append((arena, off, raw.size))
                off += raw.size
            else:
                refs.append((xp.asarray(np.ascontiguousarray(a)), 0, raw.size))
        out = xp.zeros(m.words, xp.uint16)
        jobs.append((*refs, out, int(m.bits.size), int(m.runs.shape[0]), int(m.tabs.shape[0])))
    return items, metas, jobs


@pytest.mark.parametrize("seg", [256, 37])
def test_batch_decode_on_the_host(seg):
    """HostOps.decode_batch (the engine's batched miss path without a GPU) rebuilds every
    expert of a batch from arena offsets and arrays of their own."""
    from zipmoe_rt.engine.gpu_ops import HostOps
    items, metas, jobs = _batch_jobs(np, seg)
    HostOps().decode_batch(jobs, seg, None)
    for (lay, sm, exp), m, job, mats in zip(items, metas, jobs, _experts() + _experts()[::-1]):
        _check(job[5], m, mats)


def test_batch_decode_refuses_a_copy_not_landed_on_the_host():
    """HostOps.decode_batch with a landed word: experts whose copy number the word has reached
    (modulo SEQ_MASK + 1, wrapping) decode; one ahead of it is an engine error."""
    from zipmoe_rt.engine.gpu_ops import HostOps
    from zipmoe_rt.kernels.cuda_segdec_src import SEQ_MASK
    items, metas, jobs = _batch_jobs(np, 256)
    word = np.zeros(4, np.uint8)
    word.view(np.uint32)[0] = 3
    ok = [j + (s,) for j, s in zip(jobs, [-1, 2, 3, -1] + [-1] * len(jobs))]
    HostOps().decode_batch(ok, 256, None, landed=word)
    for m, job, mats in zip(metas, ok, _experts() + _experts()[::-1]):
        _check(job[5], m, mats)
    with pytest.raises(RuntimeError, match="copy 4 has not landed"):
        HostOps().decode_batch([jobs[0] + (4,)], 256, None, landed=word)
    word.view(np.uint32)[0] = 1                       # wrapped: SEQ_MASK landed before 1
    HostOps().decode_batch([jobs[0] + (SEQ_MASK,)], 256, None, landed=word)


@gpu
@pytest.mark.parametrize("seg", [256, 37, 2048])
def test_batch_decode_waiting_for_copies_equals_the_host(seg):
    """sd_decode_batch_wait (CudaOps.decode_batch with a landed word): launched before the
    bytes of the batch's two copied experts are back on the device (their arena spans zeroed,
    the copy stream held ~50 ms behind a busy kernel, then each span copied and its number
    copied into the word), it gives every expert word for word, the experts not copied (bytes
    already there) included; twice, the second time with numbers past the first's."""
    import cupy as cp

    from zipmoe_rt.backends.cuda_experts import CudaOps
    items, metas, jobs = _batch_jobs(cp, seg)
    ops = CudaOps()
    dec, cpy = cp.cuda.Stream(non_blocking=True), cp.cuda.Stream(non_blocking=True)
    numbers = ops.pinned(4 * 64).view(np.uint32)
    numbers[:] = np.arange(64, dtype=np.uint32)
    landed = cp.zeros(1, cp.uint32)
    arena = jobs[0][0][0]
    spans = []                          # the copied experts: their bytes in the arena
    for job in jobs[:2]:
        lo = min(ref[1] for ref in job[:5])
        hi = max(ref[1] + ref[2] for ref in job[:5])
        host = ops.pinned(hi - lo)
        host[:] = cp.asnumpy(arena[lo:hi])
        spans.append((lo, hi, host))
    for rep in range(2):
        seqs = [10 * rep + 1, 10 * rep + 2] + [-1] * (len(jobs) - 2)
        for job in jobs:
            job[5].fill(0)
        for lo, hi, _ in spans:
            arena[lo:hi] = 0
        cp.cuda.Device().synchronize()
        with cpy:
            _spin_ms(50)
        ops.decode_batch([j + (s,) for j, s in zip(jobs, seqs)], seg, dec, landed=landed)
        for (lo, hi, host), sq in zip(spans, seqs):
            cp.cuda.runtime.memcpyAsync(arena.data.ptr + lo, host.ctypes.data, hi - lo,
                                        cp.cuda.runtime.memcpyHostToDevice, cpy.ptr)
            cp.cuda.runtime.memcpyAsync(landed.data.ptr, numbers[sq:sq + 1].ctypes.data, 4,
                                        cp.cuda.runtime.memcpyHostToDevice, cpy.ptr)
        dec.synchronize()
        cpy.synchronize()
        for m, job, mats in zip(metas, jobs, _experts() + _experts()[::-1]):
            _check(cp.asnumpy(job[5]), m, mats)


def _spin_ms(ms):
    """A kernel on the current stream that busy-waits about ``ms`` milliseconds."""
    import cupy as cp
    k = cp.RawKernel(r"""extern "C" __global__ void spin(long long cycles) {
        long long t0 = clock64(); while (clock64() - t0 < cycles) {} }""", "spin")
    rate = cp.cuda.runtime.getDeviceProperties(cp.cuda.Device().id)["clockRate"]   # kHz
    k((1,), (1,), (np.int64(rate * ms),))


@gpu
@pytest.mark.parametrize("seg", [256, 37, 2048])
def test_batch_decode_one_launch_equals_the_host(seg):
    """CudaOps.decode_batch (sd_multi_batch + sd_decode_batch over a descriptor of addresses)
    gives every expert of the batch word for word, twice in a row (the descriptor ring)."""
    import cupy as cp

    from zipmoe_rt.backends.cuda_experts import CudaOps
    items, metas, jobs = _batch_jobs(cp, seg)
    ops = CudaOps()
    st = cp.cuda.Stream(non_blocking=True)
    for rep in range(2):
        for job in jobs:
            job[5].fill(0)
        cp.cuda.Device().synchronize()       # the inputs and zeroed outputs are in place
        ops.decode_batch(jobs, seg, st)
        st.synchronize()
        for m, job, mats in zip(metas, jobs, _experts() + _experts()[::-1]):
            _check(cp.asnumpy(job[5]), m, mats)


@gpu
def test_multi_symbol_tables_hold_the_host_codes():
    """Each entry: the first (up to 4) whole codes of its 12-bit window, as
    zmoe.huffman.decode_table finds them (its 6-code entries cut to 4)."""
    import cupy as cp
    from zmoe import huffman

    from zipmoe_rt.backends import cuda_segdec
    lay, sm, exp = pack_expert(_experts()[0], min_chunk=1000)
    m = build_meta(lay, exp)
    multi = cp.asnumpy(cuda_segdec.multi_tables(cp.asarray(m.tabs)))
    checked = 0
    for p in lay.pieces:
        o, n, raw, _ = p.chunks[0]
        lengths, _ = huffman.parse_header(exp[o:o + n], raw)
        ent, _ = huffman.decode_table(lengths)
        ti = next(i for i in range(m.tabs.shape[0])
                  if np.array_equal(m.tabs[i] >> 8, huffman.decode_table(lengths)[1]))
        for idx in range(4096):
            e = int(ent[idx])
            k, bits = (e >> 48) & 15, e >> 52
            syms = [(e >> (8 * i)) & 255 for i in range(k)]
            if k > 4:                   # the host's entry holds more: keep the first 4 codes
                sym_len = m.tabs[ti] >> 8
                bits, w = 0, idx
                for _ in range(4):
                    bits += int(sym_len[w & 4095])
                    w = idx >> bits
                k, syms = 4, syms[:4]
            want = sum(s << (8 * i) for i, s in enumerate(syms)) | (k << 48) | (bits << 52)
            assert int(multi[ti * 4096 + idx]) == want, (ti, idx)
            checked += 1
    assert checked == 4096 * len(lay.pieces)


@gpu
def test_engine_decode_equals_the_one_symbol_kernel(tiny_moe_dir, tmp_path, monkeypatch):
    """Every expert of a converted model through CudaOps.decode (staged) and the former kernel:
    the same words, equal to the engine's host decode."""
    import cupy as cp

    from zipmoe_rt.backends import cuda_experts
    from zipmoe_rt.convert.converter import convert
    from zipmoe_rt.engine import layout as L_
    from zipmoe_rt.engine.io import RegionReader
    from zipmoe_rt.engine.store import ZmoeSource
    import zstandard as zstd
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")            # no tokenizer.json in the tiny folder
        path = convert(tiny_moe_dir("qwen3_moe"), tmp_path / "m.zmoe", progress=False)
    src = ZmoeSource(path, keep_experts=False)
    rr = RegionReader(path)
    ops = cuda_experts.CudaOps()
    n = 0
    try:
        for lay in src.layouts.values():
            sm, exp = rr.read(*lay.sm_region), rr.read(*lay.exp_region)
            m = build_meta(lay, exp)
            w = L_.decode_expert(path, lay, sm, exp, zstd.ZstdDecompressor())
            outs = []
            for staged in (True, False):
                monkeypatch.setattr(cuda_experts, "STAGED", staged)
                out = cp.zeros(m.words, cp.uint16)
                ops.decode(cp.asarray(exp), cp.asarray(sm), cp.asarray(m.runs),
                           cp.asarray(m.bits), cp.asarray(m.tabs), m.segment, out,
                           cp.cuda.get_current_stream())
                outs.append(cp.asnumpy(out))
            assert np.array_equal(outs[0], outs[1])
            _check(outs[0], m, {"gate": w.gate, "up": w.up, "down": w.down})
            n += 1
    finally:
        rr.close()
        src.close()
    assert n == len(src.layouts) > 0


@gpu
@pytest.mark.parametrize("variant", ["t128", "t256", "t64s"])
@pytest.mark.parametrize("seg_bits", [16, 512, 2048, 1 << 20])
def test_staged_write_pass_of_decode_exponents(monkeypatch, variant, seg_bits):
    """decode_exponents with the staged write pass and with hf_write: the host decoder's bytes,
    and the same acceptance of corrupt chunks (flipped bytes, a count one too high, a stream
    one byte short)."""
    from zmoe import codec, huffman

    from zipmoe_rt.backends import cuda_huffman, cuda_segdec
    be = get_backend("cuda")
    monkeypatch.setattr(cuda_huffman, "SEG_BITS", seg_bits)
    monkeypatch.setattr(cuda_segdec, "DEFAULT", variant)
    rng = np.random.default_rng(seg_bits)
    w = _bf16(rng.standard_normal(200_001) * 0.02 * np.exp(0.5 * rng.standard_normal(200_001)))
    exp, _ = codec.split_planes(w, "BF16")
    chunks = codec.compress_chunks(exp, 4, min_chunk=1 << 14)
    sizes = np.array([len(c) for c, _ in chunks])
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    raws = np.array([r for _, r in chunks])
    buf = np.frombuffer(b"".join(c for c, _ in chunks), np.uint8).copy()
    cases = [(buf, raws, sizes)]
    for i in range(3):
        b = buf.copy()
        b[offs[i] + huffman.HEADER_BYTES + 11 + 97 * i] ^= 0x5A
        cases.append((b, raws, sizes))
    r2 = raws.copy()
    r2[2] += 1
    cases.append((buf, r2, sizes))
    s2 = sizes.copy()
    s2[1] -= 1
    cases.append((buf, raws, s2))
    rejected = 0
    for b, r, sz in cases:
        res = []
        for staged in (True, False):
            monkeypatch.setattr(cuda_huffman, "STAGED", staged)
            try:
                res.append(be.to_host(be.decode_exponents(b, offs, sz, r)))
            except huffman.HuffmanError as e:
                res.append(str(e))
        host = None
        for i, (o, z, n) in enumerate(zip(offs, sz, r)):
            try:
                huffman.decode(b[o:o + z], int(n))
            except huffman.HuffmanError:
                host = i
                break
        if host is None:
            assert isinstance(res[0], np.ndarray) and np.array_equal(res[0], res[1])
            assert np.array_equal(res[0], np.concatenate(
                [huffman.decode(b[o:o + z], int(n)) for o, z, n in zip(offs, sz, r)]))
        else:
            assert isinstance(res[0], str) and res[0] == res[1]
            assert res[0].startswith(f"exponent chunk {host}:")
            rejected += 1
    assert np.array_equal(be.to_host(be.decode_exponents(buf, offs, sizes, raws)), exp)
    assert rejected >= 1
