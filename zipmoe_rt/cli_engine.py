"""The engine-tuning verbs of the ``zipmoe-rt`` command line: ``profile`` (the activation trace
the zipmoe policy plans from), ``calibrate`` (the planner's machine constants) and ``bench``
(tokens/s under memory budgets, :mod:`zipmoe_rt.bench`). Registered on
:func:`zipmoe_rt.cli.main`, which imports this module."""
from __future__ import annotations

from pathlib import Path

import click
import numpy as np

from .cli_types import ModelPath
from .cli import (DEVICE_OPTION, HOST_BUDGET_OPTION, CliError, default_model_if_none,
                  engine_options, friendly_errors, load_from_options, main,
                  progress_wanted)


@main.command()
@click.argument("model", required=False, type=ModelPath(path_type=Path, dir_okay=False))
@click.option("--prompts", type=click.Path(path_type=Path, dir_okay=False, exists=True),
              required=True, help="text file, one prompt per line")
@click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=32, show_default=True,
              help="tokens generated per prompt (greedy)")
@click.option("--raw", is_flag=True, help="prompts as raw text, not chat turns")
@click.option("-o", "--output", type=click.Path(path_type=Path), default=None,
              help="trace file [default: MODEL.trace.json next to the model]")
@click.option("-q", "--quiet", is_flag=True)
@engine_options
@friendly_errors
def profile(model, prompts, max_tokens, raw, output, quiet, **kw):
    """Record an activation trace (decode tokens: layer x expert counts) for the planner.

    MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use)."""
    from .engine import profile as prof
    model = default_model_if_none(model)
    lines = [l.strip() for l in prompts.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not lines:
        raise CliError(f"{prompts}: no prompts (one per line)")
    m = load_from_options(model, kw)
    tr = prof.record_trace(m, lines, max_tokens=max_tokens, chat=not raw,
                           progress=progress_wanted(quiet))
    out = prof.save_trace(tr, output or prof.sidecar(model, prof.TRACE_SUFFIX))
    c = np.asarray(tr["counts"], float)
    top = (np.sort(c, axis=1)[:, ::-1] / c.sum(axis=1, keepdims=True))[:, 0]
    click.echo(f"wrote {out}: {tr['tokens']} decode tokens over {tr['prompts']} prompts; top-1 "
               f"expert share per layer {top.mean():.3f} (mean), locality "
               f"{tr['locality'] if tr['locality'] is not None else float('nan'):.3f}")


@main.command()
@click.argument("model", required=False, type=ModelPath(path_type=Path, dir_okay=False))
@click.option("--samples", type=click.IntRange(min=1), default=12, show_default=True,
              help="experts to time")
@click.option("--direct", is_flag=True, help="time O_DIRECT reads")
@click.option("--io-depth", type=click.IntRange(min=1), default=None,
              help="reads in flight, as the runs that use it [default: 4]")
@DEVICE_OPTION
@friendly_errors
def calibrate(model, samples, direct, io_depth, device):
    """Measure this machine's planner constants on MODEL (cold SM/exponent reads, decode, matmul).

    MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use)."""
    import json
    model = default_model_if_none(model)

    from .engine import profile as prof
    from .engine.store import ZmoeSource
    src = ZmoeSource(model)
    from .backends import get_backend, resolve_device
    backend = get_backend(resolve_device(device))
    cal = prof.calibrate(src, samples=samples, direct=direct, io_depth=io_depth, backend=backend)
    out = prof.sidecar(model, prof.CALIB_SUFFIX)
    _write_whole(out, json.dumps(cal, indent=2))
    click.echo(f"wrote {out}")
    click.echo(f"  SM read {cal['sm_read_s'] * 1e3:.2f} ms, exponent read {cal['exp_read_s'] * 1e3:.2f} ms, "
               f"decode {cal['decode_s'] * 1e3:.2f} ms ({cal['decode_Gweights_per_s']:.2f} G weights/s "
               f"per core), matmul {cal['matmul_s'] * 1e3:.2f} ms per expert; reads "
               f"{cal['read_GBps']:.2f} GB/s")


def _write_whole(path: Path, text: str) -> None:
    """Write ``path`` through a temporary file renamed over it: a Ctrl-C (or a full disk) on
    the way leaves the file as it was, never a truncated one, and no temporary file."""
    import os
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


@main.command()
@click.argument("model", required=False, type=ModelPath(path_type=Path, dir_okay=False))
@click.option("--memory-budget", "-m", "budgets", multiple=True, metavar="SIZE",
              help="budget(s) to test (repeatable), e.g. 10% 25% 50% 100% or 600MB "
                   "[default: 25%]; 'none' adds an unbudgeted in-memory row")
@click.option("--memory-limit", "limits", multiple=True, metavar="SIZE|auto",
              help="memory limit(s) of the whole process to test (repeatable), e.g. 600MB or "
                   "auto: each row's budget is the one the limit gives, and its peak RSS is "
                   "shown beside the limit")
@click.option("--policy", "policies", multiple=True,
              type=click.Choice(["zipmoe", "zip-lru", "raw-lru", "auto"]),
              help="policies to compare (repeatable) [default: raw-lru, zip-lru, zipmoe]; "
                   "auto: a row of the default policy (per MoE layer an LRU pool, tiers or a "
                   "mix, as the planner predicts fastest)")
@click.option("-p", "--n-prompt", type=click.IntRange(min=0), default=512, show_default=True,
              help="prefill length (pp); 0 skips")
@click.option("-n", "--n-gen", type=click.IntRange(min=0), default=64, show_default=True,
              help="decode length (tg); 0 skips")
@click.option("-r", "--repetitions", type=click.IntRange(min=1), default=3, show_default=True)
@click.option("--eviction", type=click.Choice(["lru", "lfu", "tlfu"]), default="lru",
              show_default=True, help="eviction of full (F) experts (see `run --help`)")
@click.option("--workers", type=click.IntRange(min=1), default=None,
              help="decode workers [default: all cores]")
@click.option("--direct", is_flag=True, help="O_DIRECT reads")
@click.option("--io-depth", type=click.IntRange(min=1), default=None,
              help="expert reads in flight at once [default: 4]")
@click.option("--raw-model", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="raw-expert file for raw-lru [default: built once as NAME.raw.zmoe]")
@click.option("--trace", type=click.Path(path_type=Path, dir_okay=False), default=None,
              help="activation trace for zipmoe [default: MODEL.trace.json]")
@click.option("--json", "json_out", type=click.Path(path_type=Path), default=None,
              help="write the full results as JSON here")
@DEVICE_OPTION
@click.option("--resident", "residents", multiple=True,
              type=click.Choice(["full", "compressed"]),
              help="how rows hold experts (repeatable: a row each; budgeted rows: the "
                   "policy's caches) [default: full]")
@click.option("--c-tier", "c_tiers", multiple=True, type=click.Choice(["packed", "planes"]),
              help="form of zipmoe's C slots (repeatable: a row each) [default: packed]")
@HOST_BUDGET_OPTION
@click.option("--prefetch", "prefetches", multiple=True, type=click.Choice(["on", "off"]),
              help="cross-layer prefetch of the budgeted rows (repeatable: a row each) "
                   "[default: off]")
@friendly_errors
def bench(model, budgets, limits, policies, n_prompt, n_gen, repetitions, eviction, workers, direct,
          io_depth, raw_model, trace, json_out, device, residents, host_budget, prefetches,
          c_tiers):
    """Benchmark prefill/decode tokens/s under memory budgets, all policies in one run.

    Prints a llama-bench-style table (mean ± sd over repetitions, TTFT, TPOT, hits per tier,
    bytes read per token, time per pipeline stage, peak RSS); the page cache is evicted before
    every run. MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use).
    """
    if n_prompt == 0 and n_gen == 0:
        raise CliError("nothing to run: --n-prompt and --n-gen are both 0")
    from . import bench as B
    from .backends import resolve_device
    device = "cuda" if resolve_device(device) == "cuda" else "cpu"   # once, here (one notice)
    model = default_model_if_none(model)   # (progress bars on a terminal only)
    bl = [None if b.lower() == "none" else b
          for b in (budgets or (() if limits else ("25%",)))]
    from click.core import ParameterSource
    ctx = click.get_current_context()
    for name in ("eviction", "c_tiers"):
        if (all(b is None for b in bl) and not limits
                and ctx.get_parameter_source(name) != ParameterSource.DEFAULT):
            opt = "--c-tier" if name == "c_tiers" else "--eviction"
            raise CliError(f"{opt}: applies to budgeted rows (--memory-budget SIZE or "
                           f"--memory-limit); the 'none' rows keep every expert once decoded")
    policies = list(policies or ("raw-lru", "zip-lru", "zipmoe"))
    from .engine import profile as prof
    if (("zipmoe" in policies or "auto" in policies) and (any(b is not None for b in bl) or limits)
            and (trace or prof.sidecar(model, prof.TRACE_SUFFIX)).exists()):
        # each row runs in a subprocess whose stderr is not shown: warn about the calibration here
        prof.load_checked_calibration(model, direct, io_depth=io_depth)
    res = B.run(model, bl, policies, pp=n_prompt,
                tg=n_gen, reps=repetitions, workers=workers, direct=direct, eviction=eviction,
                raw_model=raw_model, trace=trace, log=lambda s: click.echo(s, err=True),
                io_depth=io_depth, device=device, limits=limits,
                residents=residents or ("full",), host_budget=host_budget,
                prefetches=prefetches or (None,), c_tiers=c_tiers or ("packed",))
    click.echo(B.table(res))
    if json_out:
        B.save(res, json_out)
        click.echo(f"wrote {json_out}", err=True)
