"""Prefill and decode speed of the CUDA backend as a ratio against the CPU (Numba) path,
measured in the same run, on random BF16 weights of a Mixtral-shaped model (default: the layer
shape of Mixtral-8x7B, hidden 4096, 8 experts of 14336, top-2, 32 query / 8 kv heads, with few
layers). No checkpoint is written: the weights come from a synthetic weight source whose dense
tensors and experts share a few random arrays per shape (a device copy per expert on the GPU).

Usage: python tools/gpu_bench.py [--layers 2] [--hidden 4096] [--inter 14336] [--experts 8]
       [--prompt 64] [--tokens 16]
Prints tokens/s of both paths and their ratio; needs CuPy with a GPU.
"""
from __future__ import annotations

import argparse
import time

import numpy as np


class RandomSource:
    """A :class:`~zipmoe_rt.models.weights.WeightSource` of random BF16 weights (N(0, 0.02);
    norm weights near 1) with the tensors the family's registry lists for ``hp``."""

    def __init__(self, hp: dict):
        from zipmoe_rt.families import get_family
        self.hparams = hp
        specs = get_family(hp["family"]).tensor_specs(hp)
        self._shapes = {s.name: tuple(s.shape) for s in specs if not s.is_expert and not s.tied}
        self._rng = np.random.default_rng(0)
        self._pool: dict = {}

    def _rand(self, shape, norm=False):
        key = (tuple(shape), norm)
        if key not in self._pool:
            x = self._rng.standard_normal(shape, np.float32) * np.float32(0.02)
            if norm:
                x += np.float32(1.0)
            self._pool[key] = (x.view(np.uint32) >> 16).astype(np.uint16)
        return self._pool[key]

    def has(self, name):
        return name in self._shapes

    def tensor(self, name):
        return self._rand(self._shapes[name], name.endswith("norm.weight"))

    def expert(self, layer, e):
        from zipmoe_rt.models.weights import ExpertWeights
        H, inter = self.hparams["hidden_size"], self.hparams["intermediate_size"]
        return ExpertWeights(self._rand((inter, H)), self._rand((inter, H)), self._rand((H, inter)))


def hparams(layers, hidden, inter, experts):
    """Stored hyper-parameters of a Mixtral config of this shape (the converter's reading)."""
    from zipmoe_rt.convert.registry import get_architecture
    cfg = {"architectures": ["MixtralForCausalLM"], "model_type": "mixtral", "vocab_size": 32000,
           "hidden_size": hidden, "intermediate_size": inter, "num_hidden_layers": layers,
           "num_attention_heads": hidden // 128, "num_key_value_heads": max(1, hidden // 512),
           "num_local_experts": experts, "num_experts_per_tok": 2, "rms_norm_eps": 1e-5,
           "rope_theta": 1e6, "max_position_embeddings": 4096, "tie_word_embeddings": False}
    return get_architecture(cfg).hparams()


def speed(model, be, prompt, n):
    """(prefill tokens/s, decode tokens/s), the second of two passes."""
    for _ in range(2):
        cache = model.new_cache(max_tokens=len(prompt) + n + 1)
        t0 = time.perf_counter()
        logits = model.forward(prompt, cache)
        t1 = time.perf_counter()
        for _ in range(n):
            logits = model.forward(np.array([int(np.argmax(logits))]), cache)
        be.synchronize()
        t2 = time.perf_counter()
    return len(prompt) / (t1 - t0), n / (t2 - t1)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--hidden", type=int, default=4096)
    ap.add_argument("--inter", type=int, default=14336)
    ap.add_argument("--experts", type=int, default=8)
    ap.add_argument("--tokens", type=int, default=16)
    ap.add_argument("--prompt", type=int, default=64)
    a = ap.parse_args()
    from zipmoe_rt.backends import get_backend
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.moe import ExpertExecutor
    src = RandomSource(hparams(a.layers, a.hidden, a.inter, a.experts))
    prompt = np.random.default_rng(0).integers(0, 32000, a.prompt)
    cpu_be, gpu_be = get_backend("numba"), get_backend("cuda")
    cpu = build_model(src)
    gpu = build_model(src, executor=ExpertExecutor(gpu_be.resident_experts(src), gpu_be),
                      backend=gpu_be)
    from zipmoe_rt.backends import cupy_cuda
    pc, dc = speed(cpu, cpu_be, prompt, a.tokens)
    cupy_cuda.FUSED_EXPERTS = False
    _, du = speed(gpu, gpu_be, prompt, a.tokens)
    cupy_cuda.FUSED_EXPERTS = True
    pg, dg = speed(gpu, gpu_be, prompt, a.tokens)
    print(f"shape: {a.layers} layers, hidden {a.hidden}, {a.experts} experts of {a.inter}, "
          f"top-2, vocab 32000 (random BF16)")
    print(f"prefill {a.prompt} tokens: cpu {pc:.1f} t/s, gpu {pg:.1f} t/s, ratio {pg / pc:.1f}x")
    print(f"decode {a.tokens} tokens: cpu {dc:.2f} t/s, gpu {dg:.1f} t/s, ratio {dg / dc:.1f}x "
          f"(gpu with two launches per expert: {du:.1f} t/s, {du / dc:.1f}x)")


if __name__ == "__main__":
    main()
