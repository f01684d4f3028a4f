"""Decode and prefill speed of the CUDA backend as a ratio against the CPU (Numba) path, measured
in the same run on one random Mixtral-shaped checkpoint built here with transformers (BF16).

Usage: python tools/gpu_bench.py [--layers 4] [--hidden 1024] [--inter 2048] [--experts 8]
       [--tokens 32]. Prints tokens/s of both paths and their ratio; needs torch, transformers
and CuPy with a GPU.
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np


def build(folder, layers, hidden, inter, experts):
    import torch
    import transformers
    torch.manual_seed(0)
    cfg = transformers.MixtralConfig(vocab_size=32000, hidden_size=hidden, intermediate_size=inter,
                                     num_hidden_layers=layers, num_attention_heads=hidden // 64,
                                     num_key_value_heads=max(1, hidden // 256),
                                     num_local_experts=experts, num_experts_per_tok=2,
                                     max_position_embeddings=4096, tie_word_embeddings=False)
    transformers.MixtralForCausalLM(cfg).to(torch.bfloat16).save_pretrained(folder)
    return folder


def speed(model, prompt, n):
    """(prefill tokens/s, decode tokens/s) after one warm-up pass."""
    for rep in range(2):
        cache = model.new_cache(max_tokens=len(prompt) + n + 1)
        t0 = time.perf_counter()
        logits = model.forward(prompt, cache)
        t1 = time.perf_counter()
        for _ in range(n):
            logits = model.forward(np.array([int(np.argmax(logits))]), cache)
        t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n / (t2 - t1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--inter", type=int, default=2048)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=32)
    ap.add_argument("--prompt", type=int, default=128)
    a = ap.parse_args()
    from zipmoe_rt.backends import get_backend
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.moe import ExpertExecutor
    from zipmoe_rt.models.weights import CheckpointSource
    with tempfile.TemporaryDirectory() as d:
        build(d, a.layers, a.hidden, a.inter, a.experts)
        prompt = np.random.default_rng(0).integers(0, 32000, a.prompt)
        src = CheckpointSource(d)
        cpu = build_model(src)
        be = get_backend("cuda")
        gpu = build_model(src, executor=ExpertExecutor(be.resident_experts(src), be),
                          backend=be)
        pc, dc = speed(cpu, prompt, a.tokens)
        pg, dg = speed(gpu, prompt, a.tokens)
    print(f"shape: {a.layers} layers, hidden {a.hidden}, expert intermediate {a.inter}, "
          f"{a.experts} experts top-2, vocab 32000")
    print(f"prefill {a.prompt} tokens: cpu {pc:.1f} t/s, gpu {pg:.1f} t/s, ratio {pg / pc:.1f}x")
    print(f"decode {a.tokens} tokens: cpu {dc:.1f} t/s, gpu {dg:.1f} t/s, ratio {dg / dc:.1f}x")


if __name__ == "__main__":
    main()
