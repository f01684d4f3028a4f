"""The benchmark model of ``tools/gpu_offload_bench.py``: a checkpoint of the Qwen3-30B-A3B
layer shape (hidden 2048, 128 experts of 768, top-8, 32/4 heads of 128, q/k RMSNorm) at reduced
depth, weight values drawn as ``tools/make_synthetic_checkpoint.py`` draws them (i.i.d. from
pools of the real SmolLM2-135M weights of each kind, fan-in scaled, per-tensor jitter; its
``Sampler``), a small synthetic vocabulary and tokenizer; its routers calibrated for little
locality (:func:`calibrate_routers`) or replaced by uniform random routing
(:func:`uniform_routing`), and the token streams the benchmark feeds it.
"""
from __future__ import annotations

import json
import math
import re
import sys
import zlib
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT), str(ROOT / "format")]

KINDS = ("gate", "up", "down", "q", "k", "v", "o", "embed", "embed_mean", "attn_norm",
         "ffn_norm", "out_norm")
POOL_VALUES = 1 << 17
VOCAB = 4096


def make_pools(out: Path):
    """Save :data:`POOL_VALUES` values of each kind of the SmolLM2 pools (``RealPools``)."""
    from make_synthetic_checkpoint import RealPools
    from zipmoe_rt.convert.smollm2 import locate_smollm2_gguf
    from zipmoe_rt.default_model import cache_dir
    p = RealPools(locate_smollm2_gguf(cache_dir(), progress=False), 0)
    rng = np.random.default_rng(0)
    keep = {k: (v if v.size <= POOL_VALUES else v[rng.integers(0, v.size, POOL_VALUES)])
            for k, v in p.pools.items() if k in KINDS}
    np.savez_compressed(out, **keep)
    print(f"wrote {out} ({out.stat().st_size / 1e6:.1f} MB): {sorted(keep)}")


class NpzPools:
    """The pools saved by :func:`make_pools`, with ``RealPools.sample``."""

    def __init__(self, path):
        from make_synthetic_checkpoint import RealPools
        z = np.load(path)
        self.pools = {k: np.ascontiguousarray(z[k], np.float32) for k in z.files}
        self._sample = RealPools.sample

    def sample(self, *a, **kw):
        return self._sample(self, *a, **kw)


TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")


def tokenizer_json(vocab_size: int) -> str:
    """A byte-level BPE over printable ASCII with exactly ``vocab_size`` ids (the model is
    synthetic: the tokenizer only has to cover its ids)."""
    import random

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    words = ("the of and to in is was for on that with as by at from his her it be are this "
             "which or had an not but they one all were their has there been more when will "
             "would who so if no out up what about into than them can only other new some time")
    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = [chr(c) for c in range(0x21, 0x7F)] + ["\u0120"]
    rng = random.Random(0)
    text = " ".join(rng.choice(words.split()) for _ in range(3000))
    tk.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=alphabet, limit_alphabet=len(alphabet), show_progress=False))
    tk.add_tokens([f"<x{i}>" for i in range(vocab_size - tk.get_vocab_size())])
    return tk.to_str()


def write_checkpoint(pools_path, out: Path, layers: int, seed: int = 0, tiny: bool = False):
    """The HF folder: config.json, safetensors, a synthetic tokenizer; returns hparams."""
    from make_synthetic_checkpoint import CONFIG_EXTRA, Sampler, preset
    from zipmoe_rt.convert.safetensors_io import write_safetensors
    from zipmoe_rt.families import get_family
    hp = preset("qwen3-moe", tiny, num_hidden_layers=layers, vocab_size=VOCAB)
    fam = get_family(hp.family)
    sampler = Sampler(hp, NpzPools(pools_path), seed, 0.05)
    out.mkdir(parents=True, exist_ok=True)

    def make(s):
        if s.key == "router":        # provisional; replaced by calibrate_routers
            return np.zeros(s.shape, np.uint16)
        if s.key == "lm_head":
            return sampler.draw(s.name, "embed", s.shape, scale=math.sqrt(576 / s.shape[1]))
        return sampler(s)

    specs = [s for s in fam.tensor_specs(hp) if not s.tied]
    per_layer: dict = {}
    for s in specs:     # one shard per layer; the routers in a small shard of their own
        per_layer.setdefault("routers" if s.key == "router" else
                             (s.layer if s.layer is not None else -1), []).append(s)
    wm = {}
    for i, (layer, group) in enumerate(sorted(per_layer.items(), key=lambda kv: str(kv[0]))):
        fname = "routers.safetensors" if layer == "routers" else f"model-{i + 1:05d}.safetensors"
        write_safetensors(out / fname, {s.name: ("BF16", s.shape, (lambda s=s: make(s)))
                                        for s in group}, metadata={"format": "pt"})
        wm.update({s.name: fname for s in group})
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {},
                                                                  "weight_map": wm}))
    cfg = {**fam.hf_config(hp), **CONFIG_EXTRA, "bos_token_id": None, "eos_token_id": VOCAB - 1,
           "pad_token_id": None}
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    (out / "tokenizer.json").write_text(tokenizer_json(VOCAB))
    (out / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
    return hp


#: calibration: runs of random tokens (each a prefill of CALIB_TOKENS), the leading positions
#: of each left out of the statistics, and the directions of the router inputs the routers are
#: drawn over
CALIB_RUNS, CALIB_TOKENS, CALIB_SKIP, CALIB_DIRECTIONS = 16, 48, 8, 16


def calibrate_routers(folder: Path, device: str, sigma: float = 2.0, seed: int = 0) -> list:
    """Replace the routers of ``folder``, one layer at a time (a layer's inputs follow the
    routers before it), by random rows over the directions in which that layer's router inputs
    change most from one token to the next relative to how much they vary along a sequence
    (measured on :data:`CALIB_RUNS` runs of random tokens): with ``Cd`` the covariance of the
    differences of consecutive inputs and ``Cl`` that of the inputs (each run's mean removed),
    the :data:`CALIB_DIRECTIONS` leading solutions of ``Cd v = lambda Cl v``; the router is ``R
    V.T`` with ``R`` Gaussian, scaled so that each logit varies with standard deviation
    ``sigma`` from token to token, blind to the span of the runs' means. The experts of a token then depend on the token rather than
    on what drifts slowly along its sequence: near-uniform routing with little locality, the
    hard case for a cache (``make_synthetic_checkpoint.py``'s fitted skew and locality are left
    out). Rows drawn over the raw inputs follow the slow part, and a few dozen experts take
    most of a sequence's tokens. Returns the distinct experts per layer selected over the
    calibration tokens afterwards."""
    from zipmoe_rt.convert.safetensors_io import write_safetensors
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    def run():
        src = CheckpointSource(folder)
        if device == "cuda":
            from zipmoe_rt.backends import get_backend
            from zipmoe_rt.models.moe import ExpertExecutor
            be = get_backend("cuda")
            net = build_model(src, executor=ExpertExecutor(be.resident_experts(src), be),
                              backend="cuda")
        else:
            net = build_model(src)
        xs, used = {}, {}

        def hook(layer, x, logits, idx, w):
            x = np.asarray(net.backend.to_host(x), np.float32)
            xs.setdefault(layer, []).append(x[CALIB_SKIP:])     # one run's [T, H]
            used.setdefault(layer, set()).update(np.asarray(idx).reshape(-1).tolist())
        net.route_hook = hook
        for i in range(CALIB_RUNS):
            net.forward(token_stream(CALIB_TOKENS, seed=100 + i), net.new_cache(), last_only=True)
        return xs, used

    E = int(json.loads((folder / "config.json").read_text())["num_experts"])
    rng = np.random.default_rng(seed + 7)
    idx = json.loads((folder / "model.safetensors.index.json").read_text())["weight_map"]
    names = {int(re.search(r"layers\.(\d+)\.", n).group(1)): n
             for n, f in idx.items() if f == "routers.safetensors"}
    routers: dict = {}
    for layer in sorted(names):     # one layer at a time: its inputs follow the routers before it
        runs = [a.astype(np.float64) for a in run()[0][layer]]
        lv = np.concatenate([a - a.mean(0) for a in runs])
        df = np.concatenate([np.diff(a, axis=0) for a in runs])
        H = lv.shape[1]
        cl, cd = lv.T @ lv / len(lv), df.T @ df / len(df)
        d, q = np.linalg.eigh(cl + np.eye(H) * (1e-3 * np.trace(cl) / H))
        wh = (q / np.sqrt(d)) @ q.T                       # Cl^(-1/2) (regularised)
        lam, u = np.linalg.eigh(wh @ cd @ wh)
        v = wh @ u[:, ::-1][:, :CALIB_DIRECTIONS]         # fastest directions first
        q = np.linalg.qr(np.stack([a.mean(0) for a in runs]).T)[0]
        v -= q @ (q.T @ v)              # blind to the runs' means: no fixed preference
        w = rng.standard_normal((E, v.shape[1])) @ v.T
        w *= sigma / float(np.std(lv @ w.T))
        routers[layer] = (w.astype(np.float32).view(np.uint32) >> 16).astype(np.uint16)
        H = w.shape[1]
        write_safetensors(folder / "routers.safetensors", {
            n: ("BF16", (E, H), (lambda a=routers.get(i, np.zeros((E, H), np.uint16)): a))
            for i, n in names.items()}, metadata={"format": "pt"})
    _, used = run()
    return [len(used[k]) for k in sorted(used)]


def token_stream(n, seed=5):
    """``n`` token ids: a fixed first token (a BOS, as real prompts start), then random ids.
    The first token's value vector reaches every later position through attention, so a
    random first token would give each sequence a fixed part of its own in the router inputs
    (and experts of its own)."""
    ids = np.random.default_rng(seed).integers(0, VOCAB - 1, n)
    ids[0] = 0
    return ids


#: the decode step the model is at (:func:`uniform_routing` with ``by_step``; set by the
#: benchmark before each forward pass)
ROUTE_STEP = [0]
#: the routings of the tools' ``--routing``: the model's routers, uniform random experts, and
#: uniform experts seeded by the decode step (:func:`uniform_routing`)
ROUTINGS = ("uniform", "model", "predictable")


def forward(net, ids, cache, step):
    """One forward pass of ``net`` over the token ids ``ids`` (int64, 1-D) into ``cache``, the
    routing's step (:data:`ROUTE_STEP`) set to ``step`` first; returns the forward's logits."""
    ROUTE_STEP[0] = step
    return net.forward(ids, cache)


def add_model_args(r, layers: int) -> None:
    """The options of the benchmark model that ``tools/gpu_offload_bench.py run`` and
    ``tools/gpu_timeline.py run`` share (the pools file, ``--work``, ``--layers`` defaulting to
    ``layers``, ``--budget``, ``--host-budget``, ``--tiny``), added to the argparse parser
    ``r``."""
    r.add_argument("pools", type=Path)
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--layers", type=int, default=layers)
    r.add_argument("--budget", default="25%")
    r.add_argument("--host-budget", default="100%")
    r.add_argument("--tiny", action="store_true", help="the --tiny shape (smoke test)")


def uniform_routing(on: bool, by_step: bool = False) -> None:
    """Switch every sparse block's choice of experts to (``on``) or back from uniform random
    routing: each token's k experts drawn uniformly without replacement, seeded by its router
    logits' bytes and the layer (so every configuration of the run, whose logits are equal bit
    for bit, routes alike), weighted by the softmax of their logits as the block's rule weighs
    its own top k (renormalised with ``norm_topk_prob``). No locality, no skew: the hard case
    for an expert cache, whatever the model's own routers do.

    With ``by_step`` the draw is seeded by the decode step (:data:`ROUTE_STEP`, which the
    benchmark sets before each forward pass), the token's row and the layer instead of the
    logits: still uniform and without locality, but the next layer's router applied a layer
    early (the prefetch look-ahead) draws the very experts that layer will use, a perfect
    predictor: the bound of what cross-layer prefetch can hide, with nothing to cache.

    The draws are kept by seed for the process (the look-ahead's and the layer's own, and
    every timed configuration's, are the same draws), so the generator's host time is paid
    once per seed rather than in every timed step."""
    from zipmoe_rt.models import moe
    cls = moe.SparseMoeBlock
    if "_model_select" not in cls.__dict__:
        cls._model_select = cls.select
    if not on:
        cls.select = cls._model_select
        return

    drawn = {}      # seed -> the k experts drawn: every row of a run draws the same seeds

    def select(self, logits):
        lg = np.asarray(self.backend.to_host(logits), np.float32)
        T, E = lg.shape
        idx = np.empty((T, self.top_k), np.int64)
        for t in range(T):
            seed = ((ROUTE_STEP[0], t, self.layer) if by_step else
                    (zlib.crc32(lg[t].tobytes()), self.layer))
            pick = drawn.get((seed, E, self.top_k))
            if pick is None:
                pick = drawn[seed, E, self.top_k] = np.random.default_rng(list(seed)).choice(
                    E, self.top_k, replace=False)
            idx[t] = pick[np.argsort(-lg[t, pick], kind="stable")]
        p = np.exp(lg - lg.max(axis=1, keepdims=True))
        w = np.take_along_axis(p, idx, axis=1)
        w /= (w.sum(axis=1, keepdims=True) if self.renorm else p.sum(axis=1, keepdims=True))
        return idx, w.astype(np.float32)
    cls.select = select


def plan_once() -> None:
    """Make :func:`zipmoe_rt.engine.profile.make_plan` (which the engine factory calls at every
    zipmoe load) remember its plans for this process: a load with the same trace, delay model,
    tier bytes and top-k reuses the plan made before (the planner's search takes about 85 s on
    the 4-layer benchmark model on one H100 host, 6 minutes on a 2-core VM). The plans are the
    same objects the planner returned, so the engines are those of uncached loads."""
    import hashlib

    from zipmoe_rt.engine import profile as prof
    if getattr(prof.make_plan, "cached", False):
        return
    make, memo = prof.make_plan, {}

    def cached(trace, delay, tier_budget, top_k, locality=True):
        h = hashlib.sha256(np.asarray(trace["counts"], np.int64).tobytes())
        for run in trace.get("sequences") or []:
            h.update(np.asarray(run, np.int64).tobytes())
        key = (h.hexdigest(), repr(delay), int(tier_budget), int(top_k), bool(locality))
        if key not in memo:
            memo[key] = make(trace, delay, tier_budget, top_k, locality)
        return memo[key]
    cached.cached = True
    prof.make_plan = cached
