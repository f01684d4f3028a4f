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
        [--prefetch off,on] [--calibration FILE] [--skip-accelerate] [--one-step-segments]
        [--ab NAME=VALUE,...] [--json OUT.json]

``run`` writes the checkpoint, calibrates its routers (:func:`offload_model.calibrate_routers`),
converts it twice (bit-planes; raw experts for raw-lru), calibrates the machine once for every
zipmoe row (:func:`calibrate_once`; or ``--calibration FILE``) and plans once per trace
(``offload_model.plan_once``), times the two segment decode kernels on one expert and a routing
read (device to host) with and without host-to-device copies in flight
(:func:`time_reads_under_copies`). Then for each routing (the model's routers, and/or
:func:`offload_model.uniform_routing`; a third routing, ``predictable``, draws uniform experts
that the look-ahead predicts exactly: the bound of what prefetch can hide) it records an
activation trace for zipmoe (teacher-forced tokens, unbudgeted GPU run) and times each
configuration after a warm-up, with cross-layer prefetch off and/or on (``--prefetch``):
zip-lru also with one copy and one decode launch per miss (the engine's one-expert path,
``gpu_batch.BATCHED`` off); ``--batch-sizes N,...`` adds zip-lru and zipmoe rows with ``N``
experts per decode launch (``gpu_batch.MAX_BATCH``); ``--ab NAME=VALUE,...`` adds raw-lru,
zip-lru and zipmoe rows with module switches flipped (``tools/gpu_timeline.py``'s ``AB_SWITCHES``). Last come
transformers + accelerate (``tools/offload_accelerate.py``). It prints a table with the ratios
and, per budgeted row, where a token's time goes (:func:`breakdown`). Every figure comes from
this one run on this machine. The model and routing: ``tools/offload_model.py``.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT), str(ROOT / "format")]

from offload_accelerate import experts_on_cpu_map, time_accelerate  # noqa: E402
import offload_model  # noqa: E402
from gpu_timeline import ab_arg, switches  # noqa: E402
from offload_model import (CALIB_RUNS, CALIB_TOKENS, token_stream, calibrate_routers,  # noqa: E402
                           make_pools, plan_once, uniform_routing, write_checkpoint)

DEVICE = "cuda"


def time_zipmoe(path, tokens, warm, **load_kw) -> dict:
    """Teacher-forced decode tokens/s after a 16-token prefill and ``warm`` steps; with a
    budget, the engine's counters (hits, PCIe bytes, decode kernels, the breakdown, prefetch
    recall and wasted bytes)."""
    import zipmoe_rt
    if DEVICE != "cuda":
        load_kw.pop("host_budget", None)
    m = zipmoe_rt.load(path, device=DEVICE, progress=False, **load_kw)
    try:
        net = m.net
        held = getattr(net.executor, "source", None)
        if m.engine is None and hasattr(held, "load_all"):
            held.load_all()     # unbudgeted: every expert on the GPU before timing
        ids = token_stream(16 + warm + tokens)
        cache = net.new_cache(capacity=16 + warm + tokens + 1)
        offload_model.forward(net, ids[:16], cache, 0)
        for i, t in enumerate(ids[16:16 + warm]):
            offload_model.forward(net, np.array([t]), cache, 1 + i)
        if m.engine is not None:
            m.engine.stats.reset()
        net.backend.synchronize()
        t0 = time.perf_counter()
        logits = [offload_model.forward(net, np.array([t]), cache, 1 + warm + i)
                  for i, t in enumerate(ids[16 + warm:])]
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
            r["breakdown"] = breakdown(st, tokens, dt)
            pf = m.engine.prefetch_report()
            r["prefetch"] = {"on": pf["prefetch"], "recall": pf["recall"],
                             "loads_per_token": pf["issued"] / tokens,
                             "used_per_token": pf["used"] / tokens,
                             "wasted_MB_per_token": pf["wasted_bytes"] / tokens / 1e6}
            full = max(l.full_bytes for l in m.engine.layouts.values())
            if st["gpu_decode_s"] > 0:
                r["decode_GBps_bf16_out"] = st["gpu_decodes"] * full / st["gpu_decode_s"] / 1e9
        return r
    finally:
        m.close()


def breakdown(st: dict, tokens: int, wall_s: float) -> dict:
    """Where a decoded token's time goes, from the engine's statistics (``GpuStageTimes``): per
    token the wall time, the host's time queuing copies and decode launches (``issue``), and
    the GPU times from CUDA events of the batches' copies over PCIe (``h2d``), the decode
    launches (``decode``) and the compute stream in each MoE call after its last decode
    (``moe_compute``; where a call decodes nothing, as in raw-lru and on the one-expert path,
    its whole time on the compute stream, waits for copies included); misses and decode launches per token, and the host's queuing time per
    expert brought in (µs). Milliseconds unless named."""
    n = max(1, tokens)
    up = max(1, st["uploads"] or st["gpu_decodes"])
    return {"wall_ms": 1e3 * wall_s / n, "issue_ms": 1e3 * st["issue_s"] / n,
            "h2d_ms": 1e3 * st["h2d_s"] / n, "decode_ms": 1e3 * st["gpu_decode_s"] / n,
            "moe_compute_ms": 1e3 * st["moe_compute_s"] / n,
            "uploads_per_token": st["uploads"] / n, "decodes_per_token": st["gpu_decodes"] / n,
            "launches_per_token": st["batches"] / n,
            "issue_us_per_upload": 1e6 * st["issue_s"] / up,
            "h2d_GBps": st["pcie_bytes"] / st["h2d_s"] / 1e9 if st["h2d_s"] > 0 else None}


def record_trace(z):
    """zipmoe's activation trace: teacher-forced tokens through the unbudgeted model (with the
    routing in force), saved next to ``z``."""
    import zipmoe_rt
    from zipmoe_rt.engine import profile as prof
    m = zipmoe_rt.load(z, device=DEVICE, progress=False)
    rec = prof.TraceRecorder(m.source.hparams, decode_only=False)
    m.net.route_hook = rec
    ids = token_stream(64, seed=11)
    cache = m.net.new_cache(capacity=65)
    for i, t in enumerate(ids):
        offload_model.forward(m.net, np.array([t]), cache, 10_000 + i)
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


def time_reads_under_copies(mb: int = 64, reps: int = 20) -> dict:
    """How long the host waits for a small device-to-host read (128 float32, a router's logits,
    as the look-ahead and the router read them on the compute stream) alone and while ``mb`` MB
    of host-to-device copies from pinned memory run on a non-blocking stream (the engine's copy
    stream), read into pageable memory (``cupy.asnumpy``, as the routing does) and into pinned
    memory on the compute stream (``cudaMemcpyAsync`` + a stream synchronize), and as the CUDA
    backend reads routing (``backend``: two arrays in one read,
    :class:`~zipmoe_rt.backends.cuda_reads.HostReads`); and the copies' own time, all medians
    over ``reps`` in microseconds. A read that takes about as long as the copies waits for
    them."""
    import cupy as cp

    from zipmoe_rt.backends.cuda_reads import HostReads
    n = int(mb) << 20
    host = np.frombuffer(cp.cuda.alloc_pinned_memory(n), np.uint8, n)
    pin = np.frombuffer(cp.cuda.alloc_pinned_memory(512), np.float32, 128)
    dst = cp.empty(n, cp.uint8)
    small = cp.zeros(128, cp.float32)
    cs = cp.cuda.Stream(non_blocking=True)
    cur = cp.cuda.get_current_stream()
    rt = cp.cuda.runtime

    def pageable():
        cp.asnumpy(small)

    def pinned():
        rt.memcpyAsync(pin.ctypes.data, small.data.ptr, 512, rt.memcpyDeviceToHost, cur.ptr)
        cur.synchronize()

    reads = HostReads()

    def backend():
        reads.read(small, small[:8])

    def timed(f):
        t0 = time.perf_counter()
        f()
        return time.perf_counter() - t0

    res = {"copy_MB": n / 1e6}
    for name, f in (("pageable", pageable), ("pinned", pinned), ("backend", backend)):
        f()
        res[f"{name}_read_alone_us"] = 1e6 * float(np.median([timed(f) for _ in range(reps)]))
        under, whole = [], []
        for _ in range(reps):
            cp.cuda.Device().synchronize()
            t0 = time.perf_counter()
            rt.memcpyAsync(dst.data.ptr, host.ctypes.data, n, rt.memcpyHostToDevice, cs.ptr)
            under.append(timed(f))
            cs.synchronize()
            whole.append(time.perf_counter() - t0)
        res[f"{name}_read_during_copies_us"] = 1e6 * float(np.median(under))
        res["copies_us"] = 1e6 * float(np.median(whole))
    return res


def calibrate_once(z, stored=None) -> str:
    """The zipmoe rows' machine calibration, made once per run and stored next to ``z``
    (``MODEL.calib.json``, which every zipmoe load then reads instead of calibrating at load):
    ``stored`` (a ``zipmoe-rt calibrate`` file) copied there, else one measured now without
    the CPU engine's terms (:func:`~zipmoe_rt.engine.calibration.calibrate` with
    ``max_bytes=0``: the GPU engine's delay model sets them to zero anyway, so the plans equal
    those of a calibration at load). Returns a line saying which and how long it took."""
    import shutil

    from zipmoe_rt.engine import profile as prof
    from zipmoe_rt.engine.store import ZmoeSource
    out = prof.sidecar(z, prof.CALIB_SUFFIX)
    if stored is not None:
        shutil.copyfile(stored, out)
        return f"calibration {stored} copied to {out}"
    t0 = time.perf_counter()
    src = ZmoeSource(z)
    try:
        cal = prof.calibrate(src, max_bytes=0)
    finally:
        src.close()
    out.write_text(json.dumps(cal, indent=2))
    return f"calibrated once ({time.perf_counter() - t0:.0f} s), stored in {out}"


def run(a):
    import warnings

    from zipmoe_rt.convert.converter import convert
    from zipmoe_rt.engine import gpu_batch
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
        try:
            rd = time_reads_under_copies()
        except Exception as e:  # noqa: BLE001 - reported, the timing rows still run
            rd = {"error": f"{type(e).__name__}: {e}"[:300]}
        print(f"routing reads with host-to-device copies in flight: {json.dumps(rd)}",
              flush=True)
        cuda_experts.STAGED = not a.one_step_segments
    src = ZmoeSource(z)
    budget = parse_size(a.budget, src)
    experts = sum(l.full_bytes for l in src.layouts.values())
    src.close()
    print(f"GPU budget {a.budget}: {budget / 1e9:.2f} GB (experts {experts / 1e9:.2f} GB BF16)",
          flush=True)
    res = {"layers": a.layers, "budget": a.budget, "budget_bytes": budget,
           "host_budget": a.host_budget, "tokens": a.tokens, "rows": {}}
    modes = ("uniform", "model") if a.routing == "both" else tuple(a.routing.split(","))
    bad = [m for m in modes if m not in offload_model.ROUTINGS]
    if bad:
        raise SystemExit(f"--routing: unknown {', '.join(bad)} (one of both, "
                         f"{', '.join(offload_model.ROUTINGS)}, comma-separated)")
    res["prefetch"] = a.prefetch
    print(calibrate_once(z, a.calibration), flush=True)
    plan_once()                 # zipmoe rows of one routing share their plan
    t_start = time.perf_counter()
    for mode in modes:
        uniform_routing(mode != "model", by_step=mode == "predictable")
        record_trace(z)
        unb = time_zipmoe(z, a.tokens, 8)
        res["rows"][f"{mode} routing: zipmoe-rt, all experts on the GPU (no budget)"] = unb
        # (policy, file, experts per decode launch: None the default, 0 a call's misses in
        # one launch, "off" one copy and one launch per miss: the one-expert path)
        rows = [(pol, f, None, pf) for pf in a.prefetch
                for pol, f in (("raw-lru", raw), ("zip-lru", z), ("zipmoe", z))]
        rows += [(pol, f, None, pf, ab) for ab in a.ab for pf in a.prefetch
                 for pol, f in (("raw-lru", raw), ("zip-lru", z), ("zipmoe", z))]
        if DEVICE == "cuda":
            if not a.no_unbatched:
                rows.insert(2, ("zip-lru", z, "off", "off"))
            rows += [(pol, z, n, "off") for n in a.batch_sizes for pol in ("zip-lru", "zipmoe")]
        default = gpu_batch.MAX_BATCH
        for pol, path, per, pf, *ab in rows:
            gpu_batch.BATCHED = per != "off"
            gpu_batch.MAX_BATCH = default if per in (None, "off") else per
            with warnings.catch_warnings(), switches(ab[0][1] if ab else []):
                warnings.simplefilter("ignore")
                r = time_zipmoe(path, a.tokens, 8, memory_budget=budget, policy=pol,
                                host_budget=a.host_budget, prefetch=pf)
            pol += f", {ab[0][0]}" if ab else ""
            gpu_batch.BATCHED, gpu_batch.MAX_BATCH = True, default
            if per == "off":
                pol = f"{pol}, one launch per miss"
            elif per is not None:
                pol = f"{pol}, {per or 'all'} misses per launch"
            if pf == "on":
                pol = f"{pol}, prefetch on"
            r["bit_identical_to_unbudgeted"] = all(
                np.array_equal(x, y) for x, y in zip(r.pop("logits"), unb["logits"]))
            res["rows"][f"{mode} routing: {pol}"] = r
            print(f"[{time.perf_counter() - t_start:.0f} s] {mode} routing, {pol}: "
                  f"{r['tps']:.1f} tok/s  "
                  f"{json.dumps({k: v for k, v in r.items() if k != 'memory'})}", flush=True)
        unb.pop("logits", None)
    uniform_routing(False)
    if a.skip_accelerate:
        print_tables(res["rows"], None)
        if a.json:
            Path(a.json).write_text(json.dumps(res, indent=1, default=str))
        return res
    hfr = time_accelerate(hf, budget, a.hf_tokens, 2)
    res["rows"]["transformers + accelerate offload"] = hfr
    print(f"transformers + accelerate (device_map auto, max_memory): {json.dumps(hfr)}",
          flush=True)
    r2 = time_accelerate(hf, budget, a.hf_tokens, 2, experts_on_cpu_map(a.layers))
    res["rows"]["transformers + accelerate, experts offloaded to CPU"] = r2
    print(f"transformers + accelerate (experts on cpu): {json.dumps(r2)}", flush=True)
    # the faster of the two offload configurations is the baseline (the conservative ratio)
    acc = max((r.get("tps") or 0.0 for r in (hfr, r2)), default=0.0) or None
    print_tables(res["rows"], acc)
    if a.json:
        Path(a.json).write_text(json.dumps(res, indent=1, default=str))
    return res


def print_tables(rows: dict, acc) -> None:
    """The results table (ratios against raw-lru of the same routing, with prefetch off, and
    against the faster transformers + accelerate row, ``acc`` tok/s or None), the prefetch
    table and the breakdown table."""
    print("\n| configuration | decode tok/s | x raw-lru (same routing) | x transformers+accelerate "
          "(faster) | PCIe MB/token | decode kernels ms/token | hits F/C/S/E/miss % |")
    print("|---|---:|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        if "tps" not in r:
            print(f"| {name} | {r.get('error')} | | | | | |")
            continue
        mode = name.split(" routing")[0]
        base = rows.get(f"{mode} routing: raw-lru", {}).get("tps")
        hits = "/".join(f"{100 * r['hits'][k]:.0f}" for k in ("F", "C", "S", "E", "miss")) \
            if "hits" in r else "-"
        print(f"| {name} | {r['tps']:.2f} | {(r['tps'] / base) if base else float('nan'):.2f} | "
              f"{(r['tps'] / acc) if acc else float('nan'):.1f} | "
              f"{r.get('pcie_MB_per_token', float('nan')):.1f} | "
              f"{r.get('decode_kernel_ms_per_token', float('nan')):.3f} | {hits} |")
    print_prefetch(rows)
    print_breakdown(rows)


def print_prefetch(rows: dict) -> None:
    """Per row with prefetch on: tok/s against the same policy with prefetch off and against
    raw-lru with prefetch on (same routing), recall, loads started and used per token and the
    bytes fetched for experts nobody used."""
    on = {n: r for n, r in rows.items() if r.get("prefetch", {}).get("on")}
    if not on:
        return
    print("\n| configuration (prefetch on) | decode tok/s | x prefetch off | x raw-lru, prefetch on "
          "| recall % | loads/token | used/token | wasted MB/token |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in on.items():
        off = rows.get(name.replace(", prefetch on", ""), {}).get("tps")
        mode = name.split(" routing")[0]
        raw = rows.get(f"{mode} routing: raw-lru, prefetch on", {}).get("tps")
        p = r["prefetch"]
        rec = "-" if p["recall"] is None else f"{100 * p['recall']:.1f}"
        print(f"| {name} | {r['tps']:.2f} | {r['tps'] / off if off else float('nan'):.2f} | "
              f"{r['tps'] / raw if raw else float('nan'):.2f} | {rec} | "
              f"{p['loads_per_token']:.1f} | {p['used_per_token']:.1f} | "
              f"{p['wasted_MB_per_token']:.1f} |")


def print_breakdown(rows: dict) -> None:
    """The per-token breakdown of each budgeted row (:func:`breakdown`) as a table."""
    print("\n| configuration | ms/token | host queuing ms | H2D ms (GB/s) | decode ms | "
          "MoE compute ms | uploads/token | decode launches/token | host µs/upload |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, r in rows.items():
        b = r.get("breakdown")
        if not b:
            continue
        gbs = f" ({b['h2d_GBps']:.1f})" if b["h2d_GBps"] else ""
        print(f"| {name} | {b['wall_ms']:.2f} | {b['issue_ms']:.3f} | {b['h2d_ms']:.3f}{gbs} | "
              f"{b['decode_ms']:.3f} | {b['moe_compute_ms']:.3f} | {b['uploads_per_token']:.1f} "
              f"| {b['launches_per_token']:.1f} | {b['issue_us_per_upload']:.0f} |")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("pools")
    p.add_argument("out", type=Path)
    r = sub.add_parser("run")
    offload_model.add_model_args(r, layers=2)
    r.add_argument("--tokens", type=int, default=32)
    r.add_argument("--hf-tokens", type=int, default=6)
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--device", default="cuda", help="cpu: a smoke test of the script")
    r.add_argument("--one-step-segments", action="store_true",
                   help="the one-step segment decode kernel in the engine (cuda_experts.STAGED off)")
    r.add_argument("--no-unbatched", action="store_true",
                   help="skip the zip-lru row with one copy and one decode launch per miss")
    r.add_argument("--batch-sizes", type=lambda t: [int(x) for x in t.split(",") if x],
                   default=[], help="extra zip-lru and zipmoe rows with N experts per decode "
                   "launch (comma-separated; 0 = all of a call's misses in one launch)")
    r.add_argument("--routing", default="both",
                   help="comma-separated: model (the model's routers), uniform (uniform random "
                   "routing, offload_model.uniform_routing), predictable (uniform, seeded by "
                   "the step: a perfect cross-layer predictor); both = uniform,model")
    r.add_argument("--prefetch", type=lambda t: [x for x in t.split(",") if x], default=["off"],
                   help="budgeted rows with prefetch off and/or on (comma-separated: off,on)")
    r.add_argument("--calibration", type=Path, default=None,
                   help="a stored machine calibration (zipmoe-rt calibrate) for the zipmoe "
                   "rows (default: measured once at the start of the run)")
    r.add_argument("--skip-accelerate", action="store_true",
                   help="no transformers + accelerate rows")
    r.add_argument("--ab", action="append", default=[], type=ab_arg,
                   help="a raw-lru, zip-lru and zipmoe row per "
                   "--prefetch mode with module switches flipped, NAME=VALUE,... (gpu_timeline.AB_SWITCHES)")
    a = ap.parse_args(argv)
    if a.cmd == "pools":
        make_pools(a.out)
    else:
        run(a)


if __name__ == "__main__":
    main()
