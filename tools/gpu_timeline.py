"""Where a decode token's time goes on the budgeted GPU path: a timeline of the host and of
the compute, copy and decode streams for a few steady-state tokens, per configuration, on the
model of ``tools/gpu_offload_bench.py`` (Qwen3-30B-A3B layer shape, ``tools/offload_model.py``).

    python tools/gpu_timeline.py run POOLS.npz --work DIR [--layers 4] [--budget 25%]
        [--host-budget 100%] [--routing predictable] [--tokens 64] [--timeline 8]
        [--configs raw-lru:on,zip-lru:off,zip-lru:on] [--ab copy_wait=off ...]
        [--ab-configs zip-lru:on] [--interleave N] [--gantt 2] [--profile N] [--json OUT.json]
        [--device cpu --tiny]

For the unbudgeted model (every expert on the GPU) and each budgeted configuration
(``policy:prefetch``), in one process: a 16-token prefill and 8 warm-up steps, then
``--tokens`` teacher-forced decode steps timed plainly (no instrumentation: ms/token), then
``--timeline`` steps recorded (``tools/timeline_hooks.py``: host spans and waits, CUDA events on
every stream's work and cross-stream waits) and aggregated (``tools/timeline_report.py``): per
token and per layer the host's launching and waiting time (and on what), each stream's busy and
idle time, the critical path, and a text Gantt of the first ``--gantt`` recorded tokens. The
unbudgeted row says whether the step is host-bound (host launching time >= compute-stream busy
time). Every row's logits are compared bit for bit with the unbudgeted run's (same steps).

``--ab NAME=VALUE[,NAME=VALUE]`` (repeatable) adds, for each configuration of ``--ab-configs``,
a row run with those module switches flipped (:data:`AB_SWITCHES`), restored afterwards; its
plain ms/token is printed as a ratio against the same configuration without the switches,
measured in the same process.

``--interleave N`` times each ``--ab`` row inside one load instead: ``--tokens`` steps in
blocks of ``N`` alternating (ABBA) between the defaults and the switches, the median ratio
and its range over pairs of blocks printed (``tools/timeline_ab.py``; rows timed one after
the other, each with its own load, differ by more than the switches do on some hosts).

``--profile N`` runs N more decode steps of each row under :mod:`cProfile` after the plain
timing (:func:`host_profile`): the host's milliseconds per token by function, own and
cumulative (the profiler slows the host, so compare functions within a row).

The checkpoint and the two converted files are kept in ``--work`` and reused when present
(``--fresh`` rewrites them). ``--device cpu`` runs the same rows on the CPU with the GPU engine
over :class:`~zipmoe_rt.engine.gpu_ops.HostOps` (a smoke test of the tool: every operation is
synchronous there, so the figures say nothing about a GPU).
"""
from __future__ import annotations

import argparse
import contextlib
import importlib
import json
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tools"), str(ROOT), str(ROOT / "format")]

import offload_model  # noqa: E402
import timeline_ab  # noqa: E402
import timeline_hooks as TH  # noqa: E402
import timeline_report as TR  # noqa: E402

#: ``--ab`` switches: name -> (module, attribute, kind)
AB_SWITCHES = {
    "copy_wait": ("zipmoe_rt.engine.gpu_batch", "COPY_WAITS_COMPUTE", bool),
    "lookahead_scores": ("zipmoe_rt.engine.prefetch", "LOOKAHEAD_SCORES", bool),
    "lookahead_async": ("zipmoe_rt.engine.prefetch", "LOOKAHEAD_ASYNC", bool),
    "batched": ("zipmoe_rt.engine.gpu_batch", "BATCHED", bool),
    "max_batch": ("zipmoe_rt.engine.gpu_batch", "MAX_BATCH", int),
    "streamed": ("zipmoe_rt.engine.gpu_batch", "STREAMED", bool),
    "uploads": ("zipmoe_rt.backends.cuda_uploads", "ENABLED", bool),
}
WARM = 8
PREFILL = 16


def parse_ab(text: str) -> list:
    """``"copy_wait=off,max_batch=2"`` -> ``[("copy_wait", False), ("max_batch", 2)]``.

    Raises:
        ValueError: an unknown switch or a value that is not on/off (bool) or an int.
    """
    out = []
    for part in (p for p in text.split(",") if p):
        name, _, val = part.partition("=")
        if name not in AB_SWITCHES:
            raise ValueError(f"--ab: unknown switch {name!r} (one of {', '.join(AB_SWITCHES)})")
        kind = AB_SWITCHES[name][2]
        if kind is bool:
            if val not in ("on", "off"):
                raise ValueError(f"--ab {name}: value must be on or off, got {val!r}")
            out.append((name, val == "on"))
        else:
            try:
                out.append((name, int(val)))
            except ValueError:
                raise ValueError(f"--ab {name}: value must be an integer, got {val!r}") from None
    if not out:
        raise ValueError(f"--ab: no switch in {text!r}")
    return out


def ab_arg(text: str) -> tuple:
    """``--ab`` as an argparse type: ``(text, parse_ab(text))``; its errors as argparse's."""
    try:
        return text, parse_ab(text)
    except ValueError as e:
        raise argparse.ArgumentTypeError(str(e)) from None


@contextlib.contextmanager
def switches(pairs):
    """Set the ``--ab`` switches ``pairs`` for the duration, then restore them."""
    saved = []
    try:
        for name, val in pairs:
            mod, attr, _ = AB_SWITCHES[name]
            m = importlib.import_module(mod)
            saved.append((m, attr, getattr(m, attr)))
            setattr(m, attr, val)
        yield
    finally:
        for m, attr, old in reversed(saved):
            setattr(m, attr, old)


def parse_config(text: str) -> tuple:
    """``"zip-lru:on"`` -> ``("zip-lru", True)``. Raises ValueError for another form."""
    pol, _, pf = text.partition(":")
    if pol not in ("raw-lru", "zip-lru", "zipmoe") or pf not in ("on", "off"):
        raise ValueError(f"configuration {text!r}: POLICY:on|off, POLICY one of raw-lru, "
                         f"zip-lru, zipmoe")
    return pol, pf == "on"


def setup(a) -> tuple:
    """The checkpoint in ``--work/hf`` and its two conversions (reused when present)."""
    from zipmoe_rt.convert.converter import convert
    work = Path(a.work)
    z, raw = work / "model.zmoe", work / "model.raw.zmoe"
    t0 = time.perf_counter()
    if not a.fresh and z.exists() and raw.exists():
        from zipmoe_rt.engine.store import ZmoeSource
        src = ZmoeSource(z)
        try:       # files of another depth or width (another run's --layers / --tiny)
            hp = src.hparams
            wide = model_hidden_size(a.tiny)
            a.fresh = (int(hp["num_hidden_layers"]) != a.layers
                       or int(hp["hidden_size"]) != wide)
        finally:
            src.close()
    if a.fresh or not (z.exists() and raw.exists()):
        hf = work / "hf"
        offload_model.write_checkpoint(a.pools, hf, a.layers, tiny=a.tiny)
        if a.routing == "model":
            offload_model.calibrate_routers(hf, a.device)
        z = convert(hf, z, progress=False)
        raw = convert(hf, raw, expert_encoding="raw", progress=False)
    print(f"model ready ({time.perf_counter() - t0:.0f} s): {z.stat().st_size / 1e9:.2f} GB "
          f"bit-planes, {raw.stat().st_size / 1e9:.2f} GB raw", flush=True)
    return z, raw


def model_hidden_size(tiny: bool) -> int:
    """The hidden size of the benchmark model (``--tiny`` or not)."""
    from make_synthetic_checkpoint import preset
    return int(preset("qwen3-moe", tiny).hidden_size)


def open_model(path, device, budget=None, policy=None, host_budget=None, prefetch=False):
    """``(net, engine or None, close)``: the unbudgeted model with every expert resident, or
    the budgeted one (on the CPU: the GPU engine over HostOps)."""
    import zipmoe_rt
    if budget is None:
        m = zipmoe_rt.load(path, device=device, progress=False)
        held = getattr(m.net.executor, "source", None)
        if hasattr(held, "load_all"):
            held.load_all()
        return m.net, None, m.close
    if device == "cuda":
        m = zipmoe_rt.load(path, device="cuda", progress=False, memory_budget=budget,
                           policy=policy, host_budget=host_budget,
                           prefetch="on" if prefetch else "off")
        return m.net, m.engine, m.close
    from zipmoe_rt.engine.gpu_engine import GpuExpertEngine
    from zipmoe_rt.engine.gpu_meta import parse_host_budget
    from zipmoe_rt.engine.gpu_ops import HostOps
    from zipmoe_rt.engine.prefetch import attach
    from zipmoe_rt.engine.store import ZmoeSource
    from zipmoe_rt.models import build_model
    source = ZmoeSource(path, keep_experts=False, copy_dense=True)
    hb = parse_host_budget(host_budget, source) if host_budget else 0
    eng = GpuExpertEngine(source, budget, policy, ops=HostOps(), host_budget=hb,
                          prefetch=prefetch, workers=2)
    net = build_model(source, executor=eng)
    attach(net, eng)

    def close():
        eng.close()
        source.close()
    return net, eng, close


def _err(e) -> str:
    """An exception and where it was raised, in one line."""
    import traceback
    tb = traceback.extract_tb(e.__traceback__)
    where = f" at {Path(tb[-1].filename).name}:{tb[-1].lineno}" if tb else ""
    return f"{type(e).__name__}: {e}"[:400] + where


def host_profile(net, cache, ids, step, top: int) -> dict:
    """Decode steps ``ids`` (one token each, from ``step``) under :mod:`cProfile`: the host's
    seconds per token by function (own time and cumulative), the ``top`` of each, printed
    and returned with the steps' logits (same values as untimed steps)."""
    import cProfile
    import io
    import pstats
    prof = cProfile.Profile()
    logits = []
    net.backend.synchronize()
    t0 = time.perf_counter()
    prof.enable()
    for t in ids:
        logits.append(offload_model.forward(net, np.array([t]), cache, step))
        step += 1
    net.backend.synchronize()
    prof.disable()
    wall = (time.perf_counter() - t0) / max(1, len(ids))
    st = pstats.Stats(prof)
    n = max(1, len(ids))
    rows = []
    for (file, line, fn), (cc, nc, tt, ct, _) in st.stats.items():
        rows.append({"fn": f"{Path(file).name}:{line}({fn})", "calls_per_token": nc / n,
                     "own_ms_per_token": 1e3 * tt / n, "cum_ms_per_token": 1e3 * ct / n})
    own = sorted(rows, key=lambda r: -r["own_ms_per_token"])[:top]
    cum = sorted(rows, key=lambda r: -r["cum_ms_per_token"])[:top]
    buf = io.StringIO()
    buf.write(f"host profile: {1e3 * wall:.3f} ms per token under cProfile, {len(ids)} tokens\n")
    for title, lst, key in (("own time", own, "own_ms_per_token"),
                            ("cumulative", cum, "cum_ms_per_token")):
        buf.write(f"  by {title} (ms/token, calls/token):\n")
        for r in lst:
            buf.write(f"    {r[key]:8.3f} {r['calls_per_token']:8.1f}  {r['fn']}\n")
    print(buf.getvalue(), flush=True)
    return {"wall_s": wall, "own": own, "cum": cum, "logits": logits}


def warmed(net, n: int) -> tuple:
    """``(ids, cache, step)``: the token stream of a row with ``n`` ids after the prefill and
    warm-up, the cache holding the ``PREFILL``-token prefill and ``WARM`` decode steps, and the
    next decode step's number."""
    ids = offload_model.token_stream(PREFILL + WARM + n)
    cache = net.new_cache(capacity=len(ids) + 1)
    offload_model.forward(net, ids[:PREFILL], cache, 0)
    step = 1
    for t in ids[PREFILL:PREFILL + WARM]:
        offload_model.forward(net, np.array([t]), cache, step)
        step += 1
    return ids, cache, step


def run_row(a, path, budget=None, policy=None, prefetch=False) -> dict:
    """One configuration: plain ms/token over ``--tokens`` steps, then ``--timeline`` recorded
    steps; their logits, records and summary."""
    net, eng, close = open_model(path, a.device, budget, policy, a.host_budget, prefetch)
    try:
        ids, cache, step = warmed(net, a.tokens + a.profile + a.timeline * len(a.detail))
        net.backend.synchronize()
        t0 = time.perf_counter()
        logits = []
        for t in ids[PREFILL + WARM:PREFILL + WARM + a.tokens]:
            logits.append(offload_model.forward(net, np.array([t]), cache, step))
            step += 1
        net.backend.synchronize()
        plain = (time.perf_counter() - t0) / max(1, a.tokens)
        clock = TH.CudaClock() if a.device == "cuda" else TH.HostClock()
        out = {"plain_s": plain, "logits": logits}
        if a.profile:
            out["profile"] = host_profile(net, cache, ids[PREFILL + WARM + a.tokens:]
                                          [:a.profile], step, a.profile_top)
            logits += out["profile"].pop("logits")
            step += a.profile
        first_step = step
        out["details"] = {}
        for detail in a.detail:
            rec = TH.Recorder(clock, eng)
            try:
                undo = TH.install(rec, net, eng, detail)
                try:
                    k = PREFILL + WARM + a.tokens + a.profile + (step - first_step)
                    for t in ids[k:k + a.timeline]:
                        rec.begin()
                        logits.append(offload_model.forward(net, np.array([t]), cache, step))
                        rec.end()
                        step += 1
                finally:
                    TH.uninstall(undo)
                out["details"][detail] = {"tokens": rec.tokens,
                                          "summary": TR.summarize(rec.tokens)}
            except Exception as e:  # noqa: BLE001 - reported; the plain timing stands
                out.setdefault("errors", []).append(f"timeline {detail}: {_err(e)}")
                break                # the cache may be half-written: no more steps
        first = next(iter(out["details"].values()), {"tokens": [], "summary": None})
        out["tokens"], out["summary"] = first["tokens"], first["summary"]
        out["timeline_s"] = first["summary"]["wall"] if first["summary"] else float("nan")
        if eng is not None:
            out["prefetch"] = bool(eng.prefetch)
        return out
    finally:
        close()


def run_interleaved(a, pairs, path, budget, policy, prefetch) -> dict:
    """One ``--ab`` row with ``--interleave N``: the configuration loaded once, ``--tokens``
    decode steps timed in blocks of ``N`` that alternate between the defaults and the
    switches ``pairs`` (:func:`timeline_ab.interleaved`); no timeline, no profile."""
    net, _eng, close = open_model(path, a.device, budget, policy, a.host_budget, prefetch)
    try:
        ids, cache, first = warmed(net, a.tokens)
        step = [first]

        def one(t):
            out = offload_model.forward(net, np.array([t]), cache, step[0])
            step[0] += 1
            return out
        return timeline_ab.interleaved(one, net.backend.synchronize, ids[PREFILL + WARM:],
                                       a.interleave, lambda: switches(pairs))
    finally:
        close()


def run(a) -> dict:
    """The rows of ``run`` (module docstring), printed and returned (and saved to
    ``--json``)."""
    import warnings

    from zipmoe_rt.engine.store import ZmoeSource
    from zipmoe_rt.loading import parse_size
    z, raw = setup(a)
    offload_model.uniform_routing(a.routing != "model", by_step=a.routing == "predictable")
    src = ZmoeSource(z)
    budget = parse_size(a.budget, src)
    src.close()
    configs = [parse_config(c) for c in a.configs.split(",") if c]
    ab_on = [parse_config(c) for c in a.ab_configs.split(",") if c]
    rows: dict = {}
    t_start = time.perf_counter()

    def show(name, r, base=None):
        r["bit_identical_to_unbudgeted"] = None if ref is None else all(
            np.array_equal(x, y) for x, y in zip(r["logits"], ref))
        extra = ""
        if base is not None:
            extra = f"; x{base['plain_s'] / r['plain_s']:.3f} the speed of the same row without"
        print(f"\n[{time.perf_counter() - t_start:.0f} s] {name}: {1e3 * r['plain_s']:.3f} "
              f"ms/token plain ({1 / r['plain_s']:.1f} tok/s), {1e3 * r['timeline_s']:.3f} with "
              f"the timeline hooks (x{r['timeline_s'] / r['plain_s']:.2f}){extra}; logits "
              f"bit-identical to the unbudgeted run: {r['bit_identical_to_unbudgeted']}"
              + ("" if r.get("prefetch", True) or ":off" in name else "; PREFETCH OFF (budget)"),
              flush=True)
        for err in r.get("errors", ()):
            print(f"ERROR {err}", flush=True)
        print("recorded token walls ms: " + " ".join(f"{1e3 * t['wall']:.3f}"
                                                      for d in r["details"].values()
                                                      for t in d["tokens"]))
        for detail, d in r["details"].items():
            print(TR.format_summary(f"{name} [{detail}: {1e3 * d['summary']['wall']:.3f} ms per "
                                    f"recorded token]", d["summary"]))
            print(TR.gantt(d["tokens"][:a.gantt]))
        rows[name] = r

    def interleaved_row(name, pairs, *args):
        try:
            r = run_interleaved(a, pairs, *args)
        except Exception as e:  # noqa: BLE001 - reported; the other rows still run
            rows[name] = {"error": _err(e)}
            print(f"\n[{time.perf_counter() - t_start:.0f} s] {name}: ERROR {_err(e)}",
                  flush=True)
            return
        same = None if ref is None else all(np.array_equal(x, y)
                                            for x, y in zip(r.pop("logits"), ref))
        print(f"\n[{time.perf_counter() - t_start:.0f} s] {name}: {1e3 * r['flipped_s']:.3f} "
              f"ms/token against {1e3 * r['plain_s']:.3f} with the defaults in the same "
              f"process (blocks of {a.interleave} tokens, ABBA): x{r['ratio']:.3f} the speed "
              f"(pairs of blocks {r['ratio_min']:.3f}-{r['ratio_max']:.3f}); logits "
              f"bit-identical to the unbudgeted run: {same}", flush=True)
        rows[name] = {"plain_s": r["flipped_s"], "defaults_s": r["plain_s"],
                      "ratio": r["ratio"], "ratio_min": r["ratio_min"],
                      "ratio_max": r["ratio_max"], "blocks": r["blocks"],
                      "bit_identical_to_unbudgeted": same}

    def row(name, *args, base=None, pairs=()):
        try:
            with switches(pairs):
                r = run_row(a, *args)
        except Exception as e:  # noqa: BLE001 - reported; the other rows still run
            rows[name] = {"error": _err(e)}
            print(f"\n[{time.perf_counter() - t_start:.0f} s] {name}: ERROR {_err(e)}",
                  flush=True)
            return None
        show(name, r, base)
        return r

    ref = None
    r = row("unbudgeted (every expert on the GPU)", z)
    if r is not None:
        ref = r["logits"]
        if r["summary"]:
            print(TR.verdict(r["summary"], r["plain_s"]), flush=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for pol, pf in configs + [c for c in ab_on if c not in configs]:
            row(f"{pol}, prefetch {'on' if pf else 'off'}", raw if pol == "raw-lru" else z,
                budget, pol, pf)
        for text, pairs in a.ab:
            for pol, pf in ab_on:
                base = f"{pol}, prefetch {'on' if pf else 'off'}"
                path = raw if pol == "raw-lru" else z
                if a.interleave:
                    interleaved_row(f"{base}, {text} (interleaved)", pairs, path, budget, pol,
                                    pf)
                    continue
                b = rows.get(base)
                row(f"{base}, {text}", path, budget, pol, pf,
                    base=b if b and "plain_s" in b else None, pairs=pairs)
    print("\n| row | ms/token plain | with timeline | x raw-lru (same prefetch) | host launch ms "
          "| host wait ms | compute busy ms | copy busy ms | decode busy ms | bit-identical |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---|")
    for name, r in rows.items():
        s = r.get("summary")
        rl = rows.get("raw-lru, prefetch " + ("on" if "prefetch on" in name else "off"))
        x = f"{rl['plain_s'] / r['plain_s']:.3f}" if rl and "plain_s" in rl and \
            "plain_s" in r else "-"
        if not s:
            plain = f"{1e3 * r['plain_s']:.3f}" if "plain_s" in r else "-"
            what = (f"interleaved: x{r['ratio']:.3f} the defaults' speed (pairs "
                    f"{r['ratio_min']:.3f}-{r['ratio_max']:.3f})" if "ratio" in r
                    else r.get("error") or r.get("errors"))
            print(f"| {name} | {plain} | {what} | {x} | | | | | | "
                  f"{r.get('bit_identical_to_unbudgeted')} |")
            continue
        print(f"| {name} | {1e3 * r['plain_s']:.3f} | {1e3 * r['timeline_s']:.3f} | {x} | "
              f"{1e3 * s['host']['busy']:.3f} | {1e3 * s['host']['wait']:.3f} | "
              f"{1e3 * s['streams']['compute']['busy']:.3f} | "
              f"{1e3 * s['streams']['copy']['busy']:.3f} | "
              f"{1e3 * s['streams']['decode']['busy']:.3f} | "
              f"{r['bit_identical_to_unbudgeted']} |")
    out = Path(a.json) if a.json else Path(a.work) / "timeline.json"
    out.write_text(json.dumps({"args": {k: str(v) for k, v in vars(a).items()},
                               "rows": {n: {k: v for k, v in r.items()
                                            if k not in ("logits", "tokens", "summary")}
                                        for n, r in rows.items()}}, default=str))
    print(f"\nraw records and summaries: {out}")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    r = sub.add_parser("run")
    offload_model.add_model_args(r, layers=4)
    r.add_argument("--routing", default="predictable", choices=offload_model.ROUTINGS)
    r.add_argument("--tokens", type=int, default=64, help="plainly timed decode steps per row")
    r.add_argument("--timeline", type=int, default=8, help="recorded decode steps per row")
    r.add_argument("--configs", default="raw-lru:on,zip-lru:off,zip-lru:on",
                   help="budgeted rows, POLICY:on|off (prefetch), comma-separated")
    r.add_argument("--ab", action="append", default=[], type=ab_arg,
                   help=f"a row per --ab-configs entry with switches flipped, NAME=VALUE,... "
                   f"(names: {', '.join(AB_SWITCHES)}); repeatable")
    r.add_argument("--ab-configs", default="zip-lru:on")
    r.add_argument("--interleave", type=int, default=0, metavar="N",
                   help="time each --ab row inside one load: --tokens steps in blocks of N "
                   "alternating (ABBA) between the defaults and the switches (tools/"
                   "timeline_ab.py); 0: a row of its own, compared with the plain row")
    r.add_argument("--gantt", type=int, default=2, help="recorded tokens in each Gantt")
    r.add_argument("--detail", type=lambda t: [x for x in t.split(",") if x],
                   default=["ops"], help="comma-separated, each recorded --timeline steps: ops "
                   "(every compute op an item) and/or sections (a few launch sections: fewer "
                   "events, less of the hooks' own host time)")
    r.add_argument("--profile", type=int, default=0,
                   help="decode steps per row run under cProfile (host time by function)")
    r.add_argument("--profile-top", type=int, default=30)
    r.add_argument("--json", type=Path, default=None)
    r.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    r.add_argument("--fresh", action="store_true", help="rewrite the model files in --work")
    a = ap.parse_args(argv)
    try:
        for c in (a.configs + "," + a.ab_configs).split(","):
            if c:
                parse_config(c)
    except ValueError as e:
        ap.error(str(e))
    if a.timeline < 1:
        ap.error("--timeline must be at least 1")
    if not a.detail or set(a.detail) - set(TH.DETAILS):
        ap.error(f"--detail: one or more of {', '.join(TH.DETAILS)}")
    return run(a)


if __name__ == "__main__":
    main()
