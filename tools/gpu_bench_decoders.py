"""GPU benchmarks of the two Huffman exponent decoders (run by ``tools/gpu_bench_codec.py``; ratios
against a device-to-device copy measured in the same run): the self-synchronising decoder behind
``decode_exponents`` (:mod:`zipmoe_rt.backends.cuda_huffman`) and the engine's segment decode
from its start tables (:mod:`zipmoe_rt.engine.gpu_meta`, :mod:`zipmoe_rt.backends.cuda_segdec`),
on experts of the Qwen3-30B-A3B shape whose weights are drawn from pools of real values and
coded as the converter codes them. Every output is checked against the weights.
"""
from __future__ import annotations

import math
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np

#: fan-in of the source model's tensors the pools come from (SmolLM2-135M), by kind
SOURCE_FAN_IN = {"gate": 576, "up": 576, "down": 1536, "q": 576, "k": 576, "v": 576, "o": 576}


def timed(fn, reps, sync):
    """Seconds per call of ``fn`` (one warm-up call, then the mean of ``reps``)."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def draw_experts(pools, n, hidden=2048, inter=768, seed=0):
    """``n`` experts of the model's shape (gate, up: [inter, hidden]; down: [hidden, inter]) as
    BF16 words, drawn from the pools as :func:`build_hf` draws them (round to nearest even)."""
    rng = np.random.default_rng(seed)

    def draw(kind, shape, fan_in):
        pool = pools[kind]
        v = pool[rng.integers(0, pool.size, shape)] * np.float32(
            math.sqrt(SOURCE_FAN_IN[kind] / fan_in))
        u = v.astype(np.float32).view(np.uint32)
        return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return [{"gate": draw("gate", (inter, hidden), hidden), "up": draw("gate", (inter, hidden),
                                                                     hidden),
             "down": draw("down", (hidden, inter), inter)} for _ in range(n)]


def _gpu_time(fn, reps=5):
    """Seconds per call of ``fn`` on the GPU (CUDA events; one warm-up; the best of ``reps``)."""
    import cupy as cp
    fn()
    best = float("inf")
    for _ in range(reps):
        a, b = cp.cuda.Event(), cp.cuda.Event()
        a.record()
        fn()
        b.record()
        b.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(a, b) / 1e3)
    return best


def _queued_time(fns, reps=3):
    """GPU seconds of the calls ``fns`` run back to back, queued behind a 4 GiB device copy so
    that the host's launch time is hidden (the best of ``reps``)."""
    import cupy as cp
    a, b = cp.zeros(1 << 32, cp.uint8), cp.empty(1 << 32, cp.uint8)
    best = float("inf")
    for _ in range(reps + 1):
        cp.copyto(b, a)
        e0, e1 = cp.cuda.Event(), cp.cuda.Event()
        e0.record()
        for f in fns:
            f()
        e1.record()
        e1.synchronize()
        best = min(best, cp.cuda.get_elapsed_time(e0, e1) / 1e3)
    return best


def bench_copy(nbytes):
    """Device-to-device copy of ``nbytes``: GB/s counting bytes read and written."""
    import cupy as cp
    a, b = cp.zeros(nbytes, cp.uint8), cp.empty(nbytes, cp.uint8)
    t = _gpu_time(lambda: cp.copyto(b, a), 10)
    return 2 * nbytes / t / 1e9


def bench_huffman(be, experts):
    """The self-synchronising decoder (``decode_exponents``) on the experts' exponent planes."""
    import cupy as cp
    from zmoe import codec
    from zmoe.constants import DEFAULT_CHUNKS
    mats = [a for e in experts for a in e.values()]

    def code(a):
        exp, _ = codec.split_planes(a.reshape(-1), "BF16")
        return codec.compress_chunks(exp, DEFAULT_CHUNKS), exp
    with ThreadPoolExecutor(16) as ex:
        coded = list(ex.map(code, mats))
    chunks = [c for cs, _ in coded for c in cs]
    want = np.concatenate([e for _, e in coded])
    buf = np.frombuffer(b"".join(c for c, _ in chunks), np.uint8)
    sizes = np.array([len(c) for c, _ in chunks], np.int64)
    offs = np.concatenate([[0], np.cumsum(sizes)[:-1]])
    raws = np.array([r for _, r in chunks], np.int64)
    dev = cp.asarray(buf)
    n = int(raws.sum())
    from zipmoe_rt.backends import cuda_huffman
    res = {}
    for parallel in (False, True):
        cuda_huffman.PARALLEL = parallel
        got = be.decode_exponents(dev, offs, sizes, raws)
        res[parallel] = (timed(lambda: be.decode_exponents(dev, offs, sizes, raws), 3,
                               be.synchronize), np.array_equal(cp.asnumpy(got), want))
    # the kernels alone (headers parsed and tables built once, as decode_exponents does)
    from zmoe import huffman

    from zipmoe_rt.backends.cuda_planes import decode_tables
    starts = np.concatenate([[0], np.cumsum(raws)])
    keys, syms, lens, rows = {}, [], [], []
    for i in range(len(chunks)):
        c = buf[offs[i]:offs[i] + sizes[i]]
        lengths, spans = huffman.parse_header(c, int(raws[i]))
        key = c[:huffman.LENGTHS_BYTES].tobytes()
        if key not in keys:
            keys[key] = len(syms)
            a, b = decode_tables(lengths)
            syms.append(a)
            lens.append(b)
        for (so, sz), (x0, x1) in zip(spans, huffman.stream_ranges(int(raws[i]))):
            rows.append((offs[i] + so, sz, starts[i] + x0, x1 - x0, keys[key]))
    rows = np.array(rows, np.int64)
    sy, ln = cp.asarray(np.concatenate(syms)), cp.asarray(np.concatenate(lens))
    out = cp.empty(n, cp.uint8)
    for staged in (False, True):
        cuda_huffman.STAGED = staged
        for seg in (512, 1024, 2048, 4096):
            out.fill(0)
            tk = timed(lambda: cuda_huffman.decode_streams(dev, rows, sy, ln, out, seg), 5,
                       be.synchronize)
            print(f"self-synchronising decode, kernels alone ({seg}-bit segments, write pass "
                  f"{'staged multi-symbol' if staged else 'hf_write'}): "
                  f"{2 * n / tk / 1e9:.1f} GB/s of BF16 output ({tk * 1e3:.2f} ms); equal: "
                  f"{np.array_equal(cp.asnumpy(out), want)}")
    ts, tp = res[False][0], res[True][0]
    print(f"decode_exponents: {len(mats)} tensors, {len(chunks)} chunks "
          f"({4 * len(chunks)} streams), {n / 1e6:.0f} M exponents at "
          f"{8 * buf.size / n:.2f} bits: segments of {cuda_huffman.SEG_BITS} bits "
          f"{2 * n / tp / 1e9:.1f} GB/s of BF16 output ({tp * 1e3:.1f} ms, host preparation "
          f"included; equal: {res[True][1]}), one thread per stream {2 * n / ts / 1e9:.1f} GB/s "
          f"({ts * 1e3:.1f} ms; equal: {res[False][1]})")
    return n


def bench_segments(experts):
    """The engine's segment decode (start tables of :mod:`zipmoe_rt.engine.gpu_meta`): the
    one-symbol kernel and each staged variant, per expert as the engine calls it and in one
    launch over all experts; every output checked word for word."""
    import cupy as cp

    from zipmoe_rt.backends import cuda_experts, cuda_segdec
    from zipmoe_rt.engine.gpu_meta import build_meta, pack_expert

    def prep(mats):
        lay, sm, exp = pack_expert(mats)
        return sm, exp, build_meta(lay, exp)
    with ThreadPoolExecutor(16) as ex:
        packed = list(ex.map(prep, experts))
    ops = cuda_experts.CudaOps()
    # one expert per call (device buffers as the engine holds them) and all in one buffer
    dev, cat, off = [], {k: [] for k in ("sm", "exp", "runs", "bits", "tabs")}, [0, 0, 0, 0, 0]
    for sm, exp, m in packed:
        dev.append((cp.asarray(exp), cp.asarray(sm), cp.asarray(m.runs), cp.asarray(m.bits),
                    cp.asarray(m.tabs), m.segment, cp.empty(m.words, cp.uint16)))
        # runs: first segment, end byte, first word, first SM byte, symbols, table
        cat["runs"].append(m.runs.astype(np.int64) + np.array([off[0], off[1], off[2], off[3],
                                                                0, off[4]]))
        cat["bits"].append(m.bits.astype(np.int64) + 8 * off[1])
        cat["sm"].append(sm)
        cat["exp"].append(exp)
        cat["tabs"].append(m.tabs)
        off = [off[0] + m.bits.size, off[1] + exp.size, off[2] + m.words, off[3] + sm.size,
               off[4] + m.tabs.shape[0]]
    big = (cp.asarray(np.concatenate(cat["exp"])), cp.asarray(np.concatenate(cat["sm"])),
           cp.asarray(np.concatenate(cat["runs"]).astype(np.int32)),
           cp.asarray(np.concatenate(cat["bits"]).astype(np.int32)),
           cp.asarray(np.concatenate(cat["tabs"])), packed[0][2].segment,
           cp.empty(off[2], cp.uint16))
    n = sum(a.size for e in experts for a in e.values())
    firsts = np.cumsum([0] + [m.words for _, _, m in packed[:-1]])

    def good(outs):      # every expert's words equal the weights
        return all(np.array_equal(cp.asnumpy(o[w0:w0 + int(np.prod(shape))]),
                                  mats[role].reshape(-1))
                   for o, (_, _, m), mats in zip(outs, packed, experts)
                   for role, w0, shape in m.outs)

    def unstaged(d):
        cuda_experts.STAGED = False
        ops.decode(*d, cp.cuda.get_current_stream())
        cuda_experts.STAGED = True
    kinds = [("one symbol per lookup, one word per thread and store (zx_decode_segments)",
              unstaged)]
    for v, (t, rnd, smt) in cuda_segdec.VARIANTS.items():
        kinds.append((f"staged multi-symbol {v} ({t} threads, {rnd}-symbol rounds, table in "
                      f"{'shared' if smt else 'global'} memory)",
                      lambda d, v=v: cuda_segdec.decode_runs(*d, variant=v)))
    gc = bench_copy(2 * n)
    print(f"segment decode: {len(packed)} experts of {n // len(packed) / 1e6:.2f} M weights "
          f"({sum(e.size for _, e, _ in packed) * 8 / n:.2f} exponent bits each), "
          f"{packed[0][2].segment} symbols per thread; device-to-device copy of the {2 * n / 1e6:.0f} MB "
          f"output: {gc:.0f} GB/s (read + written)")
    for name, fn in kinds:
        for d in dev:
            d[-1].fill(0)
        t1 = _gpu_time(lambda: [fn(d) for d in dev])
        tq = _queued_time([lambda d=d: fn(d) for d in dev])
        ok1 = good([d[-1] for d in dev])
        big[-1].fill(0)
        ta = _gpu_time(lambda: fn(big))
        oka = good([big[-1][a:] for a in firsts])
        print(f"  {name}: one launch for all {2 * n / ta / 1e9:.0f} GB/s of BF16 output "
              f"({ta * 1e3:.3f} ms, {2 * n / ta / 1e9 / gc:.0%} of the copy's GB/s; equal: {oka}); "
              f"per expert as the engine calls it {2 * n / t1 / 1e9:.0f} GB/s "
              f"({t1 / len(dev) * 1e6:.1f} us per expert, host launch time included; equal: "
              f"{ok1}), on the GPU alone {2 * n / tq / 1e9:.0f} GB/s ({tq / len(dev) * 1e6:.1f} "
              f"us per expert)")
