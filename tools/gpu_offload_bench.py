"""Experts larger than the GPU budget: decode tokens/s of ``zipmoe`` / ``zip-lru`` (compressed
experts over PCIe, decoded on the GPU) against ``raw-lru`` (BF16 experts over PCIe) and against
transformers with accelerate's CPU offload (``device_map`` with ``max_memory``), all in one run,
as ratios.

The model has the Qwen3-30B-A3B layer shape (hidden 2048, 128 experts of 768, top-8, 32/4 heads
of 128, q/k RMSNorm) at reduced depth, with weight values drawn as
``tools/make_synthetic_checkpoint.py`` draws them (i.i.d. from pools of the real SmolLM2-135M
weights of each kind, fan-in scaled, per-tensor jitter; its ``Sampler``), so the experts have
real exponent statistics. Routers and the vocabulary differ: routers are random (no fitted skew
or locality: near-uniform routing, the hard case for a cache), the vocabulary is a small
synthetic one. Decode steps are fed a fixed random token stream (teacher forcing), so routing
does not collapse onto a repeated token.

Two steps, because the value pools come from a GGUF file the GPU machine does not have:

    python tools/gpu_offload_bench.py pools POOLS.npz        # here: ~6 MB of pooled values
    python tools/gpu_offload_bench.py run POOLS.npz --work DIR [--layers 2] [--budget 25%]
        [--host-budget 100%] [--tokens 32] [--hf-tokens 6] [--routing both]
        [--one-step-segments] [--json OUT.json]

``run`` writes the checkpoint, calibrates its routers (:func:`calibrate_routers`), converts it
twice (bit-planes; raw experts for raw-lru), times the two segment decode kernels on one expert,
then for each routing (the model's routers, and/or :func:`uniform_routing`) records an
activation trace for zipmoe (teacher-forced tokens, unbudgeted GPU run) and times each
configuration after a warm-up; last transformers + accelerate; it prints a table with the
ratios. Every figure comes from this one run on this machine.
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
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
            net.forward(_stream(CALIB_TOKENS, seed=100 + i), net.new_cache(), last_only=True)
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


def _stream(n, seed=5):
    """``n`` token ids: a fixed first token (a BOS, as real prompts start), then random ids.
    The first token's value vector reaches every later position through attention, so a
    random first token would give each sequence a fixed part of its own in the router inputs
    (and experts of its own)."""
    ids = np.random.default_rng(seed).integers(0, VOCAB - 1, n)
    ids[0] = 0
    return ids


DEVICE = "cuda"


def time_zipmoe(path, tokens, warm, **load_kw) -> dict:
    """Teacher-forced decode tokens/s after a 16-token prefill and ``warm`` steps."""
    import zipmoe_rt
    if DEVICE != "cuda":
        load_kw.pop("host_budget", None)
    m = zipmoe_rt.load(path, device=DEVICE, progress=False, **load_kw)
    try:
        net = m.net
        held = getattr(net.executor, "source", None)
        if m.engine is None and hasattr(held, "load_all"):
            held.load_all()     # unbudgeted: every expert on the GPU before timing
        ids = _stream(16 + warm + tokens)
        cache = net.new_cache(capacity=16 + warm + tokens + 1)
        net.forward(ids[:16], cache)
        for t in ids[16:16 + warm]:
            net.forward(np.array([t]), cache)
        if m.engine is not None:
            m.engine.stats.reset()
        net.backend.synchronize()
        t0 = time.perf_counter()
        logits = [net.forward(np.array([t]), cache) for t in ids[16 + warm:]]
        net.backend.synchronize()
        dt = time.perf_counter() - t0
        r = {"tps": tokens / dt, "memory": m.memory_report(), "logits": logits}
        if m.engine is not None and hasattr(m.engine, "gpu_report"):
            st = m.engine.stats.as_dict()
            tot = max(1, sum(st["hits"].values()))
            r.update(hits={k: v / tot for k, v in st["hits"].items()},
                     pcie_MB_per_token=st["pcie_bytes"] / tokens / 1e6,
                     decode_kernel_ms_per_token=1e3 * st["gpu_decode_s"] / tokens,
                     gpu_decodes=st["gpu_decodes"], uploads=st["uploads"],
                     gpu=m.engine.gpu_report()["device"])
            full = max(l.full_bytes for l in m.engine.layouts.values())
            if st["gpu_decode_s"] > 0:
                r["decode_GBps_bf16_out"] = st["gpu_decodes"] * full / st["gpu_decode_s"] / 1e9
        return r
    finally:
        m.close()


def experts_on_cpu_map(layers: int) -> dict:
    """A ``device_map`` with every layer's routed experts in CPU memory (accelerate runs them on
    the GPU, copying their weights in for each forward) and everything else on GPU 0."""
    m = {"model.embed_tokens": 0, "model.norm": 0, "lm_head": 0}
    for i in range(layers):
        p = f"model.layers.{i}"
        m.update({f"{p}.self_attn": 0, f"{p}.input_layernorm": 0,
                  f"{p}.post_attention_layernorm": 0, f"{p}.mlp.gate": 0,
                  f"{p}.mlp.experts": "cpu"})
    return m


def time_accelerate(hf, budget_bytes, tokens, warm, device_map="auto") -> dict:
    """transformers (bf16, eager) with accelerate's CPU offload: ``device_map`` (``"auto"``
    with ``max_memory={0: budget, "cpu": ...}``, or a map) ; teacher-forced decode tokens/s.
    Errors are returned, not raised (``{"error": ...}``)."""
    try:
        return _time_accelerate(hf, budget_bytes, tokens, warm, device_map)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported as such
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def _time_accelerate(hf, budget_bytes, tokens, warm, device_map) -> dict:
    try:
        import accelerate
    except ImportError:
        return {"error": "accelerate is not installed"}
    import torch
    if not torch.cuda.is_available():
        return {"error": "no CUDA device for torch"}
    from transformers import AutoModelForCausalLM
    kw = {"max_memory": {0: int(budget_bytes), "cpu": 200 * 2**30}} if device_map == "auto" \
        else {}
    model = AutoModelForCausalLM.from_pretrained(
        hf, dtype=torch.bfloat16, device_map=device_map, attn_implementation="eager", **kw)
    placed = {}
    for dev in getattr(model, "hf_device_map", {}).values():
        placed[str(dev)] = placed.get(str(dev), 0) + 1
    on_gpu = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
    hooks = {str(getattr(getattr(m, "_hf_hook", None), "execution_device", None))
             for m in model.modules() if hasattr(m, "_hf_hook")}
    w = model.get_input_embeddings().weight
    dev = w.device if w.device.type != "meta" else torch.device("cuda", 0)
    ids = torch.tensor(_stream(16 + warm + tokens)).to(dev)
    with torch.no_grad():
        out = model(input_ids=ids[None, :16], use_cache=True)
        pkv = out.past_key_values
        for i in range(16, 16 + warm):
            pkv = model(input_ids=ids[None, i:i + 1], past_key_values=pkv,
                        use_cache=True).past_key_values
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(16 + warm, 16 + warm + tokens):
            pkv = model(input_ids=ids[None, i:i + 1], past_key_values=pkv,
                        use_cache=True).past_key_values
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return {"tps": tokens / dt, "accelerate": accelerate.__version__, "device_map": placed,
            "gpu_param_bytes": on_gpu, "hook_execution_devices": sorted(hooks)}


def uniform_routing(on: bool) -> None:
    """Switch every sparse block's choice of experts to (``on``) or back from uniform random
    routing: each token's k experts drawn uniformly without replacement, seeded by its router
    logits' bytes and the layer (so every configuration of the run, whose logits are equal bit
    for bit, routes alike), weighted by the softmax of their logits as the block's rule weighs
    its own top k (renormalised with ``norm_topk_prob``). No locality, no skew: the hard case
    for an expert cache, whatever the model's own routers do."""
    from zipmoe_rt.models import moe
    cls = moe.SparseMoeBlock
    if "_model_select" not in cls.__dict__:
        cls._model_select = cls.select
    if not on:
        cls.select = cls._model_select
        return

    def select(self, logits):
        lg = np.asarray(self.backend.to_host(logits), np.float32)
        T, E = lg.shape
        idx = np.empty((T, self.top_k), np.int64)
        for t in range(T):
            rng = np.random.default_rng([zlib.crc32(lg[t].tobytes()), self.layer])
            pick = rng.choice(E, self.top_k, replace=False)
            idx[t] = pick[np.argsort(-lg[t, pick], kind="stable")]
        p = np.exp(lg - lg.max(axis=1, keepdims=True))
        w = np.take_along_axis(p, idx, axis=1)
        w /= (w.sum(axis=1, keepdims=True) if self.renorm else p.sum(axis=1, keepdims=True))
        return idx, w.astype(np.float32)
    cls.select = select


def record_trace(z):
    """zipmoe's activation trace: teacher-forced tokens through the unbudgeted model (with the
    routing in force), saved next to ``z``."""
    import zipmoe_rt
    from zipmoe_rt.engine import profile as prof
    m = zipmoe_rt.load(z, device=DEVICE, progress=False)
    rec = prof.TraceRecorder(m.source.hparams, decode_only=False)
    m.net.route_hook = rec
    ids = _stream(64, seed=11)
    cache = m.net.new_cache(capacity=65)
    for t in ids:
        m.net.forward(np.array([t]), cache)
    m.net.route_hook = None
    src = m.source
    trace = {"version": 1, "fingerprint": prof.fingerprint(src), "model": "bench",
             "moe_layers": rec.moe_layers, "num_experts": int(src.hparams["num_experts"]),
             "top_k": int(src.hparams["num_experts_per_tok"]), "tokens": rec.tokens,
             "prompts": 1, "locality": None, "counts": rec.counts.tolist(),
             "sequences": rec.sequences()}
    prof.save_trace(trace, prof.sidecar(z, prof.TRACE_SUFFIX))
    m.close()


def time_segment_kernels(z, reps: int = 20) -> dict:
    """GB/s of BF16 output of the engine's segment decode (:meth:`CudaOps.decode
    <zipmoe_rt.backends.cuda_experts.CudaOps.decode>`: the staged decoder, and the one-step
    kernel with ``STAGED`` off) on the largest expert of ``z``, one launch per decode, and of a
    device-to-device copy of the same bytes, from CUDA events over ``reps`` runs each; the two
    decoders' words compared."""
    import cupy as cp

    from zipmoe_rt.backends import cuda_experts
    from zipmoe_rt.engine.gpu_meta import build_meta
    from zipmoe_rt.engine.io import RegionReader
    from zipmoe_rt.engine.store import ZmoeSource
    src = ZmoeSource(z)
    lay = max(src.layouts.values(), key=lambda l: l.full_bytes)
    rd = RegionReader(z)
    sm, exp = rd.read(*lay.sm_region), rd.read(*lay.exp_region)
    rd.close()
    src.close()
    m = build_meta(lay, exp)
    ops = cuda_experts.CudaOps()
    dev = [cp.asarray(a) for a in (exp, sm, m.runs, m.bits, m.tabs)]
    res, words = {}, {}
    st = cp.cuda.get_current_stream()
    for name, staged in (("staged", True), ("one-step", False)):
        cuda_experts.STAGED = staged
        out = cp.zeros(m.words, cp.uint16)
        ops.decode(*dev, m.segment, out, st)
        a = ops.record(st, timing=True)
        for _ in range(reps):
            ops.decode(*dev, m.segment, out, st)
        b = ops.record(st, timing=True)
        b.synchronize()
        res[name] = 2 * m.words * reps / ops.elapsed(a, b) / 1e9
        words[name] = cp.asnumpy(out)
    cuda_experts.STAGED = True
    buf = cp.zeros(m.words, cp.uint16)
    dst = cp.empty_like(buf)
    a = ops.record(st, timing=True)
    for _ in range(reps):
        dst[...] = buf
    b = ops.record(st, timing=True)
    b.synchronize()
    res["device copy"] = 2 * m.words * reps / ops.elapsed(a, b) / 1e9
    res["same words"] = bool(np.array_equal(words["staged"], words["one-step"]))
    res["expert MB (BF16)"] = 2 * m.words / 1e6
    return res


def run(a):
    import warnings

    from zipmoe_rt.convert.converter import convert
    from zipmoe_rt.engine.store import ZmoeSource
    from zipmoe_rt.loading import parse_size
    work = Path(a.work)
    t0 = time.perf_counter()
    hf = work / "hf"
    global DEVICE
    DEVICE = a.device
    write_checkpoint(a.pools, hf, a.layers, tiny=a.tiny)
    distinct = calibrate_routers(hf, DEVICE)
    print(f"checkpoint written ({time.perf_counter() - t0:.0f} s); routers calibrated: "
          f"{distinct} distinct experts per layer over {CALIB_RUNS * CALIB_TOKENS} tokens",
          flush=True)
    z = convert(hf, work / "model.zmoe", progress=False)
    raw = convert(hf, work / "model.raw.zmoe", expert_encoding="raw", progress=False)
    print(f"converted ({time.perf_counter() - t0:.0f} s): {z.stat().st_size / 1e9:.2f} GB "
          f"bit-planes, {raw.stat().st_size / 1e9:.2f} GB raw", flush=True)
    if DEVICE == "cuda":
        from zipmoe_rt.backends import cuda_experts
        try:
            kt = time_segment_kernels(z)
        except Exception as e:  # noqa: BLE001 - reported, the timing rows still run
            kt = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"segment decode kernels, GB/s of BF16 output: {json.dumps(kt)}", flush=True)
        cuda_experts.STAGED = not a.one_step_segments
    src = ZmoeSource(z)
    budget = parse_size(a.budget, src)
    experts = sum(l.full_bytes for l in src.layouts.values())
    src.close()
    print(f"GPU budget {a.budget}: {budget / 1e9:.2f} GB (experts {experts / 1e9:.2f} GB BF16)",
          flush=True)
    res = {"layers": a.layers, "budget": a.budget, "budget_bytes": budget,
           "host_budget": a.host_budget, "tokens": a.tokens, "rows": {}}
    modes = ("uniform", "model") if a.routing == "both" else (a.routing,)
    for mode in modes:
        uniform_routing(mode == "uniform")
        record_trace(z)
        unb = time_zipmoe(z, a.tokens, 8)
        res["rows"][f"{mode} routing: zipmoe-rt, all experts on the GPU (no budget)"] = unb
        for pol, path in (("raw-lru", raw), ("zip-lru", z), ("zipmoe", z)):
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                r = time_zipmoe(path, a.tokens, 8, memory_budget=budget, policy=pol,
                                host_budget=a.host_budget)
            r["bit_identical_to_unbudgeted"] = all(
                np.array_equal(x, y) for x, y in zip(r.pop("logits"), unb["logits"]))
            res["rows"][f"{mode} routing: {pol}"] = r
            print(f"{mode} routing, {pol}: {r['tps']:.1f} tok/s  "
                  f"{json.dumps({k: v for k, v in r.items() if k != 'memory'})}", flush=True)
        unb.pop("logits", None)
    uniform_routing(False)
    hfr = time_accelerate(hf, budget, a.hf_tokens, 2)
    res["rows"]["transformers + accelerate offload"] = hfr
    print(f"transformers + accelerate (device_map auto, max_memory): {json.dumps(hfr)}",
          flush=True)
    r2 = time_accelerate(hf, budget, a.hf_tokens, 2, experts_on_cpu_map(a.layers))
    res["rows"]["transformers + accelerate, experts offloaded to CPU"] = r2
    print(f"transformers + accelerate (experts on cpu): {json.dumps(r2)}", flush=True)
    # the faster of the two offload configurations is the baseline (the conservative ratio)
    acc = max((r.get("tps") or 0.0 for r in (hfr, r2)), default=0.0) or None
    print("\n| configuration | decode tok/s | x raw-lru (same routing) | x transformers+accelerate "
          "(faster) | PCIe MB/token | decode kernels ms/token | hits F/C/S/E/miss % |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in res["rows"].items():
        if "tps" not in r:
            print(f"| {name} | {r.get('error')} | | | | | |")
            continue
        mode = name.split(" routing")[0]
        base = res["rows"].get(f"{mode} routing: raw-lru", {}).get("tps")
        hits = "/".join(f"{100 * r['hits'][k]:.0f}" for k in ("F", "C", "S", "E", "miss")) \
            if "hits" in r else "-"
        print(f"| {name} | {r['tps']:.2f} | {(r['tps'] / base) if base else float('nan'):.2f} | "
              f"{(r['tps'] / acc) if acc else float('nan'):.1f} | "
              f"{r.get('pcie_MB_per_token', float('nan')):.1f} | "
              f"{r.get('decode_kernel_ms_per_token', float('nan')):.3f} | {hits} |")
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pools")
    p.add_argument("out", type=Path)
    r = sub.add_parser("run")
    r.add_argument("pools", type=Path)
    r.add_argument("--work", type=Path, required=True)
    r.add_argument("--layers", type=int, default=2)
    r.add_argument("--budget", default="25%")
    r.add_argument("--host-budget", default="100%")
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--hf-tokens", type=int, default=6)
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
    r.add_argument("--tiny", action="store_true", help="the --tiny shape (smoke test)")
    r.add_argument("--one-step-segments", action="store_true",
                   help="the one-step segment decode kernel in the engine (cuda_experts.STAGED off)")
    r.add_argument("--routing", choices=("model", "uniform", "both"), default="both",
                   help="the model's routers, uniform random routing (uniform_routing), or both")
    a = ap.parse_args(argv)
    if a.cmd == "pools":
        make_pools(a.out)
    else:
        run(a)


if __name__ == "__main__":
    main()
