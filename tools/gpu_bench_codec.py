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
from gpu_bench_decoders import SOURCE_FAN_IN, bench_huffman, bench_segments, draw_experts, timed  # noqa: E402,E501


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
