"""``zipmoe-rt bench``: prefill and decode speed under memory budgets, every policy in one run.

Like llama-bench: ``pp N`` prefills N tokens in one forward pass, ``tg N`` decodes N tokens one at
a time (greedy, EOS ignored); each is repeated and reported as mean ± sd tokens/s. The model
file's pages are evicted from the page cache (posix_fadvise DONTNEED) after the model is loaded
and before every timed run, so expert reads come from the disk. Per run it also reports TTFT,
TPOT, and over the decode steps only (the tg prompt's prefill excluded) hits per tier, bytes
read per decode step and time per pipeline stage per decode step; and the peak RSS of the run
(VmHWM, reset before each run). Ratios between rows of one run are the meaningful figures on a
shared machine.
"""
from __future__ import annotations

import dataclasses

import gc
import json
import os
import platform
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

import numpy as np
from zmoe.constants import Keys

from . import bench_planner
from .engine.footprint import steady_footprint
from .engine.io import evict_page_cache
from .generate import SamplingParams, generate
from .util import format_bytes, peak_rss, reset_peak_rss

_FILLER = ("It was a bright cold day in April, and the clocks were striking thirteen. "
           "The quick brown fox jumps over the lazy dog while the old sailor mends his nets "
           "by the harbour and children run along the shore collecting shells. ")


def prompt_ids(tokenizer, n: int) -> list[int]:
    """``n`` token ids of real text (the shared Gutenberg corpus when present, else filler)."""
    text = _FILLER * 40
    corpus = Path(__file__).resolve().parents[2] / "shared" / "corpora" / "gutenberg" / "austen-emma.txt"
    if corpus.exists():
        text = corpus.read_text(encoding="utf-8", errors="replace")[5000:5000 + 40 * n]
    ids = tokenizer.encode(text, add_special_tokens=False)
    while len(ids) < n:
        ids = ids + ids
    return ids[:n]


def raw_companion(model_path, progress: bool = False) -> Path:
    """The same model with raw (uncompressed) experts, for ``raw-lru``; built once next to the
    model as ``NAME.raw.zmoe`` (export + convert --expert-encoding raw)."""
    from .convert.converter import convert
    from .convert.export import export
    p = Path(model_path)
    out = p.with_name(p.stem + ".raw.zmoe")
    if out.exists():
        return out
    with tempfile.TemporaryDirectory(dir=p.parent) as d:
        hf = export(p, Path(d) / "hf", progress=progress)
        convert(hf, out, expert_encoding="raw", progress=progress)
    return out


def run_config(model_path, budget, policy, pp, tg, reps, workers, direct, eviction, trace,
               io_depth=None, device="cpu", memory_limit=None, resident="full", host_budget=None,
               prefetch=None, c_tier="packed"):
    """One benchmark configuration in this process: load the model with these options, warm the
    JIT up, then ``reps`` timed runs, each after evicting the model file from the page cache and
    resetting the peak RSS.

    Args:
        model_path: the ``.zmoe`` file.
        budget: memory budget in bytes, or None (unbudgeted).
        policy, workers, direct, eviction, trace, io_depth, device: as for
            :func:`zipmoe_rt.api.load`.
        memory_limit: as for :func:`zipmoe_rt.api.load` (then ``budget`` is None, or a
            budget that must fit it), with the KV cache sized for the longer of the two runs.
        pp: prompt tokens of the prefill run (one forward pass); 0 skips it.
        tg: tokens of the decode run (greedy, EOS ignored); 0 skips it.
        reps: timed repetitions.
        resident: as for :func:`zipmoe_rt.api.load`; an unbudgeted run loads every expert
            before the timed runs in either mode.
        host_budget: as for :func:`zipmoe_rt.api.load` (budgeted ``cuda`` rows only).
        prefetch: as for :func:`zipmoe_rt.api.load` (None: its default).
        c_tier: as for :func:`zipmoe_rt.api.load`.

    Returns:
        ``(runs, memory)``: per repetition a dict (``pp_s``; ``ttft_s``, ``decode_tps``,
        ``tpot_s``, ``decoded``, ``engine`` stats; ``peak_rss`` in bytes; ``load_peak_rss``: the
        peak of loading and the warm-up, before the runs), and the model's
        :meth:`~zipmoe_rt.api.Model.memory_report` after the runs.
    """
    from .api import load
    m = load(model_path, memory_budget=budget, policy=policy, workers=workers, direct=direct,
             io_depth=io_depth, device=device, memory_limit=memory_limit,
             context=max(pp, 16 + tg) if memory_limit is not None else None,
             eviction=eviction, trace=trace, progress=False, resident=resident,
             host_budget=host_budget if budget is not None and device == "cuda" else None,
             prefetch=prefetch, c_tier=c_tier)
    net, eng = m.net, m.engine
    if budget is None:
        m.source.admit_all()               # steady state: no expert decoded in a timed run
    ids_pp = prompt_ids(m.tokenizer, pp)
    ids_tg = prompt_ids(m.tokenizer, 16)
    warm = net.new_cache()                 # JIT warm-up outside the timed runs
    net.forward(np.array(ids_tg[:4], np.int64), warm)
    net.forward(np.array(ids_tg[4:5], np.int64), warm)
    del warm
    load_peak = peak_rss()                 # loading and the warm-up, before the first reset
    runs = []
    for _ in range(reps):
        gc.collect()
        evict_page_cache(m.path)
        reset_peak_rss()
        r = {}
        if pp:
            if eng:
                eng.stats.reset()
            c = net.new_cache()
            t0 = time.perf_counter()
            net.forward(np.array(ids_pp, np.int64), c)
            r["pp_s"] = time.perf_counter() - t0
            del c
            evict_page_cache(m.path)
        if tg:
            if eng:
                eng.stats.reset()
            params = SamplingParams(temperature=0.0, max_tokens=tg)
            gen = generate(net, ids_tg, params, stop_ids=())
            for i, _step in enumerate(gen):
                if i == 0 and eng:         # the engine's figures count the decode steps only,
                    eng.stats.reset()      # not the prompt's prefill
            st = gen.stats
            r.update(ttft_s=st.ttft_s, decode_tps=st.decode_tokens_per_s, tpot_s=st.tpot_s,
                     decoded=st.generated_tokens, decode_steps=max(st.generated_tokens - 1, 0))
            if eng:
                r["engine"] = eng.stats.as_dict()
                if hasattr(eng, "gpu_report"):
                    r["gpu"] = eng.gpu_report()["device"]
                if eng.predicted_layer_s() is not None:
                    r["engine"]["predicted_layer_s"] = eng.predicted_layer_s()
                if getattr(eng, "delay", None) is not None:   # what the engine planned with
                    r["engine"]["delay"] = dataclasses.asdict(eng.delay)
                if getattr(eng, "auto_choice", None) is not None:
                    r["engine"]["auto_choice"] = eng.auto_choice
        r["peak_rss"] = peak_rss()
        r["load_peak_rss"] = load_peak
        runs.append(r)
    mem = m.memory_report()
    if m.memory_plan is not None:
        mem["limit plan"] = m.memory_plan.as_dict()
    m.close()
    del m, net, eng
    gc.collect()
    return runs, mem


def _in_subprocess(*args):
    """Run :func:`run_config` in a fresh interpreter, so each row's peak RSS is its own."""
    import sys
    r = subprocess.run([sys.executable, "-m", "zipmoe_rt.bench", json.dumps(args)],
                       capture_output=True, text=True)
    if r.returncode != 0:
        msg = (r.stderr.strip().splitlines() or ["(no output)"])[-1]
        budget = "none" if args[1] is None else format_bytes(args[1])
        if len(args) > 12 and args[12] is not None:
            budget = f"memory limit {args[12]}"
        raise RuntimeError(f"bench run {args[2]} at budget {budget} failed: "
                           f"{msg.split(': ', 1)[-1]}")
    runs, mem = json.loads(r.stdout.strip().splitlines()[-1])
    return runs, mem


def baseline_footprint(model_path) -> dict:
    """The runtime's own memory for ``model_path``, measured in a fresh interpreter that imports
    the runtime, reads the model's index and tokenizer and warms every CPU kernel up on tiny
    models of the same family and one real expert, holding none of the weights
    (:func:`zipmoe_rt.engine.footprint.steady_footprint`).

    Returns:
        bytes: ``peak`` (VmHWM, the warm-up's peak), ``steady`` (VmRSS after the heap trim and
        the drop of LLVM's pages), ``anon``, ``dropped``; an empty dict when the child failed.
    """
    import sys
    r = subprocess.run([sys.executable, "-m", "zipmoe_rt.bench",
                        json.dumps(["baseline", str(model_path)])], capture_output=True, text=True)
    if r.returncode != 0:
        return {}
    return json.loads(r.stdout.strip().splitlines()[-1])


def baseline_rss(model_path) -> int:
    """Fixed overhead in bytes: the figure ``--memory-limit`` counts,
    :func:`zipmoe_rt.engine.limit.fixed_overhead` (the steady RSS of
    :func:`baseline_footprint` in a child that loads the kernels from Numba's cache, measured
    once per model file and runtime and remembered), so that a first run on a cold cache reports
    what every later run does; 0 when the measuring child failed."""
    from .engine.limit import MemoryLimitError, fixed_overhead
    try:
        return int(fixed_overhead(model_path))
    except MemoryLimitError:
        return 0


def _ms(a):
    return f"{statistics.mean(a):.2f} ± {statistics.stdev(a) if len(a) > 1 else 0:.2f}"


def run(model_path, budgets, policies, pp: int = 512, tg: int = 64, reps: int = 3,
        workers: int | None = None, direct: bool = False, eviction: str = "lru",
        raw_model=None, trace=None, log=print, io_depth: int | None = None,
        device: str = "cpu", limits=(), residents=("full",), host_budget=None,
        prefetches=(None,), c_tiers=("packed",)) -> dict:
    """Benchmark every (budget, policy) pair; returns the JSON-able result (rows + environment).
    ``device``: ``cpu`` or ``cuda`` (as for :func:`zipmoe_rt.api.load`).

    ``limits``: ``--memory-limit`` values (``600MB``, ``auto``, ...; see
    :func:`zipmoe_rt.engine.limit.parse_limit`), each run with every policy as
    ``load(memory_limit=...)``: the row's budget is the one the limit gives, and its
    ``peak_rss`` (VmHWM of the child process, the interpreter's start included) is set beside
    the limit (``limit_bytes``).

    ``budgets``: sizes as accepted by :func:`zipmoe_rt.api.parse_size` (``None`` = unbudgeted,
    every expert in memory). ``policies``: ``zipmoe``, ``zip-lru``, ``raw-lru``, ``auto``.
    ``residents``: how rows hold the experts, one row each: ``full`` (decoded, policy
    ``in-memory``) and/or ``compressed`` (the compute form, policy ``in-memory compressed``;
    budgeted rows: the policy's caches in the compute form, policy ``POLICY compressed``).
    ``c_tiers``: ``packed``/``planes`` per budgeted ``zipmoe`` row (a row each; ``planes``
    rows are named ``zipmoe C-planes``): the form of its C slots (:func:`zipmoe_rt.api.load`). ``host_budget``: pinned host memory of the budgeted ``cuda``
    rows (:func:`zipmoe_rt.api.load`).
    ``prefetches``: ``on``/``off``/None (the default) per budgeted row (a row each): the
    row's ``prefetch`` is what the engine ran (off when the budget has no room for it), with
    its ``prefetch_recall`` per MoE layer and ``wasted_bytes_per_token``.
    """
    from .engine.resident import check_resident
    for r in residents:
        check_resident(r)
    if host_budget is not None and device != "cuda":
        raise ValueError("host_budget (--host-budget): applies to --device cuda with "
                         "--memory-budget")
    from .engine.ctier import check_c_form
    for c in c_tiers:
        check_c_form(c)
    from .api import parse_size
    from .engine.store import ZmoeSource
    from .engine import profile as prof
    from .engine.io import check_io_depth
    src = ZmoeSource(model_path)
    hp = src.hparams
    rows = []
    policies = list(policies)
    tpath = Path(trace) if trace else prof.sidecar(model_path, prof.TRACE_SUFFIX)
    if "zipmoe" in policies and (limits or any(b is not None for b in budgets)):
        try:
            prof.load_trace(tpath, src)
        except prof.TraceError as e:
            policies.remove("zipmoe")
            log(f"bench: skipping policy zipmoe: {e}")
    from .engine.limit import resolve_limit
    cases = [(b, None) for b in budgets] + [(None, lim) for lim in limits]
    for b, lim in cases:
        nbytes = parse_size(b, src) if b is not None else None
        lim_bytes = None
        if lim is not None:
            lim_bytes = resolve_limit(lim)[0]       # auto: resolved once, here, for all rows
        unbudgeted = [("in-memory" if r == "full" else f"in-memory {r}") for r in residents]
        budgeted = b is not None or lim is not None
        combos = ([(p + ("" if r == "full" else f" {r}") + ("" if c == "packed" else " C-planes"),
                    p, f, r, c) for p in policies for r in residents
                   for c in (c_tiers if p == "zipmoe" else ("packed",)) for f in prefetches]
                  if budgeted else [(p, p, None, "compressed" if p.endswith("compressed")
                                     else "full", "packed") for p in unbudgeted])
        for label, pol, pf, res_mode, c_tier in combos:
            path = model_path
            if pol == "raw-lru":
                if raw_model is None and not Path(model_path).with_name(
                        Path(model_path).stem + ".raw.zmoe").exists():
                    log("bench: building the raw-expert copy for raw-lru once (NAME.raw.zmoe)")
                path = raw_model or raw_companion(model_path)
            what = (f"memory limit {lim} ({format_bytes(lim_bytes)})" if lim is not None
                    else f"budget {b} ({format_bytes(nbytes)})" if b is not None
                    else "no budget")
            log(f"bench: {what}, policy {label}" + (f", prefetch {pf}" if pf else "") + " ...")
            runs, mem = _in_subprocess(str(path), nbytes,
                                       pol if (b is not None or lim is not None) else "auto", pp,
                                       tg, reps, workers, direct, eviction,
                                       str(trace) if trace else None, io_depth, device,
                                       lim_bytes, res_mode, host_budget, pf, c_tier)
            row = {"budget": b, "budget_bytes": nbytes, "policy": label, "runs": runs,
                   "memory": mem, "resident": res_mode, "c_tier": c_tier}
            if lim is not None:
                row.update(budget=f"limit {lim}", budget_bytes=mem["budget"], limit=lim,
                           limit_bytes=lim_bytes)
            if pp:
                row["pp_tps"] = [pp / r["pp_s"] for r in runs]
            if tg:
                row["tg_tps"] = [r["decode_tps"] for r in runs]
                row["ttft_s"] = [r["ttft_s"] for r in runs]
                row["tpot_s"] = [r["tpot_s"] for r in runs]
            row["peak_rss"] = max(r["peak_rss"] for r in runs)
            row["load_peak_rss"] = max(r.get("load_peak_rss", 0) for r in runs)
            if tg and runs[0].get("engine"):
                e = [r["engine"] for r in runs]
                n = max(1, sum(r["decode_steps"] for r in runs))   # engine figures: decode only
                hits = {k: sum(x["hits"][k] for x in e) for k in e[0]["hits"]}
                tot = max(1, sum(hits.values()))
                row["hit_rate"] = {k: v / tot for k, v in hits.items()}
                row["bytes_read_per_token"] = sum(x["bytes_read"] for x in e) / n
                row["stage_ms_per_token"] = {k: 1e3 * sum(x[k] for x in e) / n
                                             for k in ("io_s", "decode_s", "wait_s", "compute_s", "layer_s")}
                calls = sum(x.get("decode_layer_calls", 0) for x in e)
                if calls:
                    row["measured_layer_ms"] = 1e3 * sum(x["decode_layer_s"] for x in e) / calls
                if "pcie_bytes" in e[0]:                 # budgeted GPU rows
                    row["pcie_bytes_per_token"] = sum(x["pcie_bytes"] for x in e) / n
                    row["gpu_decode_ms_per_token"] = 1e3 * sum(x["gpu_decode_s"] for x in e) / n
                    row["gpu"] = runs[0].get("gpu")
                row.update(bench_planner.row_fields(row, e, model_path, workers))
                row.update(prefetch_summary(e, n))
            rows.append(row)
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True,
                                text=True, cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = ""
    env = {"model": str(model_path), "baseline_rss": baseline_rss(model_path), "name": src.metadata.get(Keys.General.NAME),
           "experts": hp["num_experts"], "top_k": hp["num_experts_per_tok"],
           "cpus": os.cpu_count(), "workers": workers or os.cpu_count(), "direct": direct,
           "io_depth": check_io_depth(io_depth), "device": device,
           "eviction": eviction, "pp": pp, "tg": tg, "reps": reps, "machine": platform.node(),
           "date": time.strftime("%Y-%m-%d %H:%M:%S"), "commit": commit,
           "file_bytes": Path(model_path).stat().st_size}
    src.close()
    return {"env": env, "rows": rows}


def prefetch_summary(engines: list, tokens: int) -> dict:
    """A row's prefetch figures from its runs' engine stats (``StageTimes.as_dict``): whether
    prefetch ran (``prefetch``: on/off), ``prefetch_recall`` per MoE layer (str -> share of
    the experts used by decode steps that were predicted), ``prefetch_recall_min``, and
    ``wasted_bytes_per_token`` (bytes read for predicted experts nobody used, per decoded
    token) and ``prefetch_predicted_per_used`` per MoE layer (experts predicted per expert
    used, ``(k + m_l) / k``: the extra candidates of engine/prefetch.py). Empty when the
    stats have no prefetch fields."""
    if not engines or "recall_used" not in engines[0]:
        return {}
    hits, used, pred = {}, {}, {}
    for x in engines:
        for l, v in x["recall_used"].items():
            used[l] = used.get(l, 0) + v
            hits[l] = hits.get(l, 0) + x["recall_hits"].get(l, 0)
            pred[l] = pred.get(l, 0) + x.get("predicted", {}).get(l, 0)
    issued = sum(x["prefetch_issued"] for x in engines)
    out = {"prefetch": "on" if used or issued else "off"}
    if used:
        rec = {l: hits[l] / used[l] for l in sorted(used, key=int) if used[l]}
        out.update(prefetch_recall=rec, prefetch_recall_min=min(rec.values()),
                   prefetch_recall_mean=sum(hits.values()) / max(1, sum(used.values())),
                   wasted_bytes_per_token=sum(x["prefetch_wasted_bytes"] for x in engines)
                   / max(1, tokens),
                   prefetch_loads_per_token=issued / max(1, tokens))
        if any(pred.values()):   # experts predicted per expert used: (k + m_l) / k
            out["prefetch_predicted_per_used"] = {l: pred[l] / used[l] for l in rec}
    return out


def table(result: dict) -> str:
    """llama-bench-style markdown table of :func:`run`'s result, with ratios to raw-lru."""
    env, rows = result["env"], result["rows"]
    pp, tg = env["pp"], env["tg"]
    head = ["budget", "policy", "prefetch", f"pp{pp} t/s", f"tg{tg} t/s", "× raw-lru", "TTFT s", "TPOT ms",
            "hits F/C/S/E/miss %", "MB read/tok", "io/dec/wait/mm ms/tok", "peak RSS MB", "(RSS−base)/budget",
            "peak RSS / limit"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    base = {}
    for r in rows:   # the first raw-lru row of each budget (prefetch off if there is one)
        if r["policy"] == "raw-lru" and r.get("tg_tps") and (
                r["budget"] not in base or r.get("prefetch") == "off"):
            base[r["budget"]] = statistics.mean(r["tg_tps"])
    for r in rows:
        bud = "none" if r["budget"] is None else f"{r['budget']} ({format_bytes(r['budget_bytes'])})"
        tgm = statistics.mean(r["tg_tps"]) if r.get("tg_tps") else None
        ratio = f"{tgm / base[r['budget']]:.2f}" if tgm and r["budget"] in base else "-"
        hits = "/".join(f"{100 * r['hit_rate'][k]:.0f}" for k in ("F", "C", "S", "E", "miss")) \
            if "hit_rate" in r else "-"
        st = r.get("stage_ms_per_token")
        stages = "/".join(f"{st[k]:.1f}" for k in ("io_s", "decode_s", "wait_s", "compute_s")) if st else "-"
        lines.append("| " + " | ".join([
            bud, r["policy"], r.get("prefetch", "-"),
            _ms(r["pp_tps"]) if r.get("pp_tps") else "-",
            _ms(r["tg_tps"]) if tgm else "-", ratio,
            f"{statistics.mean(r['ttft_s']):.3f}" if r.get("ttft_s") else "-",
            f"{1e3 * statistics.mean(r['tpot_s']):.1f}" if r.get("tpot_s") else "-",
            hits, f"{r['bytes_read_per_token'] / 1e6:.1f}" if "bytes_read_per_token" in r else "-",
            stages, f"{r['peak_rss'] / 1e6:.0f}",
            f"{(r['peak_rss'] - env.get('baseline_rss', 0)) / r['budget_bytes']:.2f}"
            if r["budget_bytes"] else "-",
            (f"{r['peak_rss'] / 1e6:.0f} / {r['limit_bytes'] / 1e6:.0f} MB, load "
             f"{r.get('load_peak_rss', 0) / 1e6:.0f} ("
             f"{'within' if max(r['peak_rss'], r.get('load_peak_rss', 0)) <= r['limit_bytes'] else 'OVER'})")
            if r.get("limit_bytes") else "-"]) + " |")
    planner = bench_planner.lines(rows)
    if planner:
        lines.append("\n" + "\n".join(planner))
    gpu = [gpu_row_line(r) for r in rows if "pcie_bytes_per_token" in r]
    if gpu:
        lines.append("\n" + "\n".join(gpu))
    pf = [f"prefetch ({r['policy']}, budget {r['budget']}): recall per MoE layer "
          + " ".join(f"{100 * v:.0f}" for v in r["prefetch_recall"].values())
          + f" % (min {100 * r['prefetch_recall_min']:.0f} %, mean "
          f"{100 * r['prefetch_recall_mean']:.0f} %); {r['prefetch_loads_per_token']:.1f} loads "
          f"started, {r['wasted_bytes_per_token'] / 1e6:.2f} MB wasted per token"
          + ("; predicted per used expert " + " ".join(
              f"{v:.2f}" for v in r["prefetch_predicted_per_used"].values())
             if r.get("prefetch_predicted_per_used") else "")
          for r in rows if r.get("prefetch_recall")]
    if pf:
        lines.append("\n" + "\n".join(pf))
    lines.append(f"\n{env['name']}: {env['experts']} experts, top-{env['top_k']}; {env['cpus']} "
                 f"CPUs, {env['workers']} decode workers, {env.get('io_depth', 1)} reads in flight, "
                 f"O_DIRECT {env['direct']}; fixed overhead "
                 f"(runtime + tokenizer + JIT, no weights) {env.get('baseline_rss', 0) / 1e6:.0f} MB; "
                 f"page cache evicted before every run; commit {env['commit']}, {env['date']}")
    return "\n".join(lines)


def gpu_row_line(r: dict) -> str:
    """One budgeted GPU row's device, GPU memory per tier, PCIe bytes and decode-kernel time
    per decoded token (:class:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine`)."""
    mem = r.get("memory", {})
    tiers = "/".join(f"{mem.get(k, 0) / 1e6:.0f}" for k in ("dense", "F", "C", "S", "E"))
    return (f"gpu ({r['policy']}, budget {r['budget']}) on {r.get('gpu')}: GPU MB dense/F/C/S/E "
            f"{tiers}, host pinned {mem.get('host pinned', 0) / 1e6:.0f} MB; "
            f"{r['pcie_bytes_per_token'] / 1e6:.2f} MB over PCIe and "
            f"{r['gpu_decode_ms_per_token']:.3f} ms of decode kernels per token")


def gpu_line(rep: dict) -> str:
    """``/stats``' GPU line: the device and the GPU expert path's counters since loading
    (:meth:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine.gpu_report`), and with prefetch on its
    recall, loads started and used, and the bytes fetched for experts nobody used."""
    line = (f"GPU {rep['device']}: {rep['uploads']} expert uploads, "
            f"{rep['pcie_bytes'] / 1e6:.1f} MB over PCIe, {rep['gpu_decodes']} GPU decodes "
            f"({1e3 * rep['gpu_decode_s']:.2f} ms in kernels), {rep['host_hits']} from host "
            f"memory, {rep['file_misses']} read from the file")
    pf = rep.get("prefetch")
    if pf and pf.get("prefetch"):       # engine/gpu_prefetch.py
        rec = "-" if pf["recall"] is None else f"{100 * pf['recall']:.0f} %"
        line += (f"; prefetch: recall {rec}, {pf['issued']} loads started, {pf['used']} used, "
                 f"{pf['wasted_bytes'] / 1e6:.1f} MB wasted")
    return line


def save(result: dict, path) -> Path:
    path = Path(path)
    path.write_text(json.dumps(result, indent=1))
    return path


if __name__ == "__main__":  # worker of _in_subprocess
    import sys
    a = json.loads(sys.argv[1])
    print(json.dumps(steady_footprint(a[1]) if a[0] == "baseline" else run_config(*a)))
