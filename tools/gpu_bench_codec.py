"""GPU benchmarks of the codec and of compressed residency, each as a ratio against a baseline
measured in the same run (one NVIDIA GPU with CuPy, torch and transformers installed):

1. the bit-plane merge kernel's bandwidth against a device-to-device copy of the same bytes;
2. the two GPU Huffman exponent decoders, in GB/s of BF16 output, on the planes of experts of
   the model's shape drawn from the pools and coded as the converter codes them (4 chunks per
   tensor, 4 streams per chunk), beside a device-to-device copy of the output bytes: the
   self-synchronising decoder behind ``decode_exponents`` (no start table) and the engine's
   segment decode (:mod:`zipmoe_rt.engine.gpu_meta` start tables), each kernel variant checked
   word for word against the weights;
3. one token's k experts (``experts_token``): fused decode + GEMV on the packed form against the
   BF16 GEMV kernels on the same weights (bit-identical outputs checked);
4. batch-1 decode tokens/s and prefill tokens/s of a Qwen3-30B-A3B-shaped model at reduced
   depth (hidden 2048, 128 experts of 768, top-8, 32/4 heads of 128, vocab 151936): ours with
   ``resident="compressed"`` against ours in BF16 against transformers (bf16, eager attention)
   on the same weights.

The weights are real values: i.i.d. draws from the pools of SmolLM2-135M-Instruct's weights by
kind (as ``tools/make_synthetic_checkpoint.py`` draws them, fan-in scaled, rounded to BF16),
loaded from a small ``.npz`` made once on a machine with the GGUF (``--save-pools FILE``), so the
exponent statistics (what the codec and the 4-bit window see) are those of a real model. The
model is built in GPU memory (transformers' module, whose parameters our weight source reads:
the same weights for both), so nothing is written to disk.

Usage:
    python tools/gpu_bench_codec.py --save-pools pools.npz          # CPU, needs the GGUF
    python tools/gpu_bench_codec.py --pools pools.npz [--layers 4] [--tokens 32] [--prompt 512]
    python tools/gpu_bench_codec.py --pools pools.npz --codec-only [--experts 16]   # 1 and 2
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

POOL_KEEP = 1 << 18                  # values kept per kind in the .npz
SOURCE_FAN_IN = {"gate": 576, "up": 576, "down": 1536, "q": 576, "k": 576, "v": 576, "o": 576}


def save_pools(path):
    """Pools of real values (SmolLM2-135M-Instruct, tools/synthetic_pools.py) to ``path``."""
    from synthetic_pools import RealPools

    from zipmoe_rt.convert.smollm2 import locate_smollm2_gguf
    from zipmoe_rt.default_model import cache_dir
    pools = RealPools(locate_smollm2_gguf(cache_dir(), progress=True), 0)
    rng = np.random.default_rng(0)
    out = {k: (v if v.size <= POOL_KEEP else v[rng.integers(0, v.size, POOL_KEEP)])
           for k, v in pools.pools.items()}
    np.savez_compressed(path, **{k: v.astype(np.float32) for k, v in out.items()})
    print(f"saved {len(out)} pools to {path}")


def config(layers):
    """Qwen3-30B-A3B's config.json at ``layers`` layers."""
    return dict(architectures=["Qwen3MoeForCausalLM"], model_type="qwen3_moe",
                vocab_size=151936, hidden_size=2048, intermediate_size=6144,
                moe_intermediate_size=768, num_hidden_layers=layers, num_attention_heads=32,
                num_key_value_heads=4, head_dim=128, num_experts=128, num_experts_per_tok=8,
                norm_topk_prob=True, rms_norm_eps=1e-6, rope_theta=1e6,
                max_position_embeddings=4096, tie_word_embeddings=False, decoder_sparse_step=1,
                mlp_only_layers=[], hidden_act="silu", attention_bias=False)


def _kind(name):
    """(pool kind, fan-in) of a transformers Qwen3-MoE parameter name."""
    for tag, kind in (("q_proj", "q"), ("k_proj", "k"), ("v_proj", "v"), ("o_proj", "o"),
                      ("gate_up_proj", "gate"), ("experts.down_proj", "down"),
                      ("mlp.gate.", "gate"), ("embed_tokens", "embed"), ("lm_head", "embed"),
                      ("input_layernorm", "attn_norm"), ("q_norm", "attn_norm"),
                      ("k_norm", "attn_norm"), ("post_attention_layernorm", "ffn_norm"),
                      ("model.norm", "out_norm")):
        if tag in name:
            return kind
    raise KeyError(name)


def build_hf(layers, pools):
    """transformers' Qwen3MoeForCausalLM in bf16 on the GPU, every parameter drawn from the
    pool of its kind (fan-in scaled); the router scaled so the top-k mass varies."""
    import torch
    from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM
    cfg = Qwen3MoeConfig(**{k: v for k, v in config(layers).items()
                            if k not in ("architectures", "model_type")})
    cfg._attn_implementation = "eager"
    torch.manual_seed(0)
    with torch.device("cuda"):
        hf = Qwen3MoeForCausalLM(cfg).to(torch.bfloat16).eval()
    gen = torch.Generator(device="cuda").manual_seed(0)
    dev = {k: torch.as_tensor(v, device="cuda") for k, v in pools.items()}
    with torch.no_grad():
        for name, p in hf.named_parameters():
            kind = _kind(name)
            pool = dev[kind]
            idx = torch.randint(0, pool.numel(), p.shape, generator=gen, device="cuda")
            scale = 1.0
            fan_in = p.shape[-1]
            if kind in SOURCE_FAN_IN:
                scale = math.sqrt(SOURCE_FAN_IN[kind] / fan_in)
            if "mlp.gate." in name:           # router: logits of std ~2 on unit-RMS inputs
                scale = 2.0 / (float(pool.float().std()) * math.sqrt(fan_in))
            v = pool[idx] * scale
            if kind == "embed" and "embed_tokens" in name:
                v = v + dev["embed_mean"][torch.randint(0, dev["embed_mean"].numel(),
                                                        (p.shape[-1],), generator=gen,
                                                        device="cuda")]
            p.copy_(v.to(torch.bfloat16))
    return hf


class HFSource:
    """A :class:`~zipmoe_rt.models.weights.WeightSource` over the parameters of the transformers
    model: dense tensors copied to the host as BF16 bits; experts as zero-copy device views
    (``packed=False``) or transcoded on the host into the compute form (``packed=True``,
    :func:`zipmoe_rt.engine.resident.pack_bf16`, all at construction, in threads)."""

    def __init__(self, hf, hp, packed=False, threads=16):
        import cupy as cp
        import torch
        self.hparams, self.hf = hp, hf
        self.params = dict(hf.named_parameters())
        L, E = hp["num_hidden_layers"], hp["num_experts"]
        self.layouts = {(l, e): None for l in range(L) for e in range(E)}
        I = hp["moe_intermediate_size"]
        self._dev = {}
        for l in range(L):
            gu = self.params[f"model.layers.{l}.mlp.experts.gate_up_proj"].detach()
            dn = self.params[f"model.layers.{l}.mlp.experts.down_proj"].detach()
            g = cp.from_dlpack(gu.view(torch.int16)).view(cp.uint16)
            d = cp.from_dlpack(dn.view(torch.int16)).view(cp.uint16)
            for e in range(E):
                self._dev[(l, e)] = (g[e, :I], g[e, I:], d[e])
        self.packed = None
        if packed:
            from zipmoe_rt.engine.resident import pack_bf16
            from zipmoe_rt.models.packed import PackedExpert

            def pack(key):
                return key, PackedExpert(*(pack_bf16(cp.asnumpy(a)) for a in self._dev[key]))
            with ThreadPoolExecutor(threads) as ex:
                self.packed = dict(ex.map(pack, self.layouts))

    def has(self, name):
        return name in self.params

    def tensor(self, name):
        import torch
        return self.params[name].detach().view(torch.int16).cpu().numpy().view(np.uint16)

    def expert(self, layer, e):
        from zipmoe_rt.models.weights import ExpertWeights
        if self.packed is not None:
            return self.packed[(layer, e)]
        return ExpertWeights(*self._dev[(layer, e)])


def timed(fn, reps, sync):
    """Seconds per call of ``fn`` (one warm-up call, then the mean of ``reps``)."""
    fn()
    sync()
    t0 = time.perf_counter()
    for _ in range(reps):
        fn()
    sync()
    return (time.perf_counter() - t0) / reps


def bench_merge(be, n=1 << 28):
    import cupy as cp
    rng = cp.random.default_rng(0)
    exp = rng.integers(0, 256, n, dtype=cp.uint8)
    sm = rng.integers(0, 256, n, dtype=cp.uint8)
    out = cp.empty(n, cp.uint16)
    src = cp.empty(n, cp.uint16)
    sync = be.synchronize
    t_merge = timed(lambda: be.merge_planes(exp, sm, "BF16"), 10, sync)
    t_copy = timed(lambda: cp.copyto(out, src), 10, sync)
    # both read 2 bytes and write 2 bytes per element
    gm, gc = 4 * n / t_merge / 1e9, 4 * n / t_copy / 1e9
    print(f"merge kernel: {n >> 20} Mi BF16 words: {gm:.0f} GB/s (read + written), "
          f"device-to-device copy {gc:.0f} GB/s: {gm / gc:.0%} of the copy")


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
                  f"{'staged, multi-symbol first pass' if staged else 'hf_write'}): "
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


def bench_experts(be, src, srcp, reps=200):
    """One token's k experts of layer 0: BF16 kernels vs the fused packed kernels."""
    import cupy as cp

    from zipmoe_rt.backends import cuda_packed
    from zipmoe_rt.models.weights import ExpertWeights
    hp = src.hparams
    k, H = hp["num_experts_per_tok"], hp["hidden_size"]
    ids = list(range(0, 8 * k, 8))
    bf = [ExpertWeights(*src._dev[(0, e)]) for e in ids]
    pk = [cuda_packed.upload(srcp.packed[(0, e)]) for e in ids]
    x = cp.asarray(np.random.default_rng(0).standard_normal(H).astype(np.float32) * 0.3)
    w = np.full(k, 1.0 / k, np.float32)
    outs = []
    for ex in (bf, pk):
        o = cp.zeros(H, cp.float32)
        be.experts_token(o, x, ex, w)
        outs.append(cp.asnumpy(o))
    same = np.array_equal(*outs)
    o = cp.zeros(H, cp.float32)
    tb = timed(lambda: be.experts_token(o, x, bf, w), reps, be.synchronize)
    tp = timed(lambda: be.experts_token(o, x, pk, w), reps, be.synchronize)
    nb = sum(2 * a.size for e in bf for a in (e.gate, e.up, e.down))
    npk = sum(e.nbytes for e in pk)
    print(f"experts_token (k={k}, {H}x{hp['moe_intermediate_size']}): BF16 {tb * 1e6:.1f} us "
          f"({nb / tb / 1e9:.0f} GB/s), packed {tp * 1e6:.1f} us ({npk / tp / 1e9:.0f} GB/s of "
          f"{npk / nb:.3f}x the bytes): packed/BF16 speed {tb / tp:.2f}x; outputs bit-identical: "
          f"{same}")


def ours_speed(model, prompt, n, sync):
    """(prefill tokens/s, decode tokens/s, tokens, logits list), the better of two passes."""
    best = (0.0, 0.0)
    for _ in range(2):
        cache = model.new_cache(max_tokens=len(prompt) + n + 1)
        sync()
        t0 = time.perf_counter()
        lg = model.forward(prompt, cache)
        sync()
        t1 = time.perf_counter()
        toks, logs = [], [lg]
        for _ in range(n):
            toks.append(int(np.argmax(lg)))
            lg = model.forward(np.array(toks[-1:]), cache)
            logs.append(lg)
        sync()
        t2 = time.perf_counter()
        best = max(best[0], len(prompt) / (t1 - t0)), max(best[1], n / (t2 - t1))
    return best[0], best[1], toks, logs


def hf_speed(hf, prompt, n):
    import torch
    best = (0.0, 0.0)
    ids = torch.as_tensor(prompt, device="cuda")[None]
    with torch.no_grad():
        for _ in range(2):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            out = hf(input_ids=ids, use_cache=True)
            torch.cuda.synchronize()
            t1 = time.perf_counter()
            toks = []
            for _ in range(n):
                toks.append(int(out.logits[0, -1].float().argmax()))
                out = hf(input_ids=torch.tensor([[toks[-1]]], device="cuda"),
                         past_key_values=out.past_key_values, use_cache=True)
            torch.cuda.synchronize()
            t2 = time.perf_counter()
            best = max(best[0], len(prompt) / (t1 - t0)), max(best[1], n / (t2 - t1))
    return best[0], best[1], toks


def main():
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--save-pools", type=Path)
    ap.add_argument("--pools", type=Path)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=512)
    ap.add_argument("--codec-only", action="store_true",
                    help="the merge and the two Huffman decoders only (no model)")
    ap.add_argument("--experts", type=int, default=16,
                    help="experts drawn for the Huffman decoders")
    ap.add_argument("--skip", nargs="*", default=[], choices=["merge", "huffman", "experts",
                                                             "model", "hf"])
    a = ap.parse_args()
    if a.save_pools:
        save_pools(a.save_pools)
        return
    if a.pools is None:
        ap.error("--pools FILE is needed (make it with --save-pools FILE)")
    import cupy as cp

    from zipmoe_rt.backends import get_backend
    from zipmoe_rt.convert.registry import get_architecture
    be = get_backend("cuda")
    dev = cp.cuda.runtime.getDeviceProperties(0)
    print(f"device: {dev['name'].decode()}, CuPy {cp.__version__}")
    if "merge" not in a.skip:
        bench_merge(be)
    pools = dict(np.load(a.pools))
    if "huffman" not in a.skip:
        experts = draw_experts(pools, a.experts)
        bench_huffman(be, experts)
        bench_segments(experts)
        del experts
    if a.codec_only:
        return
    t0 = time.perf_counter()
    hf = build_hf(a.layers, pools)
    hp = get_architecture(config(a.layers)).hparams()
    src = HFSource(hf, hp)
    srcp = HFSource(hf, hp, packed=True)
    print(f"model: Qwen3-30B-A3B shape, {a.layers} layers, built and transcoded in "
          f"{time.perf_counter() - t0:.0f} s")
    if "experts" not in a.skip:
        bench_experts(be, src, srcp)
    if "model" in a.skip:
        return
    from zipmoe_rt.backends.cuda_resident import ResidentExperts
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.moe import ExpertExecutor
    prompt = np.random.default_rng(0).integers(0, hp["vocab_size"], a.prompt)
    res = {}
    for name, s in (("bf16", src), ("compressed", srcp)):
        held = ResidentExperts(s, be)
        held.load_all()
        if name == "compressed":
            srcp.packed = None                         # the host copies: no longer needed
            print(f"experts held on the GPU: {held.nbytes / 2**30:.2f} GiB packed, "
                  f"{held.bf16_nbytes / 2**30:.2f} GiB in BF16 ({held.nbytes / held.bf16_nbytes:.3f}x)")
        model = build_model(s, executor=ExpertExecutor(held, be), backend=be)
        res[name] = ours_speed(model, prompt, a.tokens, be.synchronize)
        del model, held
    same = all(np.array_equal(x, y) for x, y in zip(res["bf16"][3], res["compressed"][3]))
    print(f"compressed vs BF16: logits bit-identical at every step: {same}, greedy tokens "
          f"identical: {res['bf16'][2] == res['compressed'][2]}")
    line = (f"ours BF16: prefill {res['bf16'][0]:.0f} t/s, decode {res['bf16'][1]:.1f} t/s; "
            f"ours compressed: prefill {res['compressed'][0]:.0f} t/s, decode "
            f"{res['compressed'][1]:.1f} t/s (decode {res['compressed'][1] / res['bf16'][1]:.2f}x "
            f"BF16)")
    print(line)
    if "hf" in a.skip:
        return
    hp_, hd, htoks = hf_speed(hf, prompt, a.tokens)
    agree = sum(x == y for x, y in zip(htoks, res["bf16"][2]))
    print(f"transformers bf16 eager: prefill {hp_:.0f} t/s, decode {hd:.1f} t/s; "
          f"ours BF16 / transformers: prefill {res['bf16'][0] / hp_:.2f}x, decode "
          f"{res['bf16'][1] / hd:.2f}x; ours compressed / transformers: decode "
          f"{res['compressed'][1] / hd:.2f}x (greedy tokens agreeing with ours: "
          f"{agree}/{a.tokens}; transformers computes in bf16)")


if __name__ == "__main__":
    main()
