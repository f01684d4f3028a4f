"""The sizing and evaluation verbs of the ``zipmoe-rt`` command line: ``plan`` (a model's sizes
from its config.json, :mod:`zipmoe_rt.plan`) and ``perplexity`` (sliding-window perplexity of a
``.zmoe`` on a text file, :mod:`zipmoe_rt.perplexity`). Registered on
:func:`zipmoe_rt.cli.main`, which imports this module."""
from __future__ import annotations

import json
from pathlib import Path

import click

from .cli_types import ModelPath, TextPath
from .cli import (CliError, check_budget_options, engine_options, friendly_errors, main,
                  progress_wanted, warn_c_tier_unused)

#: window length of ``perplexity`` when --ctx is not given (capped at the model's context).
DEFAULT_CTX = 512


@main.command()
@click.argument("config", metavar="CONFIG_OR_DIR", type=click.Path(path_type=Path))
@click.option("--memory-budget", "-m", default=None, metavar="SIZE",
              help="also show how this budget divides, as `run --memory-budget` would: e.g. "
                   "24GB, 1.5GiB, or 25% (= dense + 25% of the experts' BF16 bytes)")
@click.option("--json", "as_json", is_flag=True, help="print the figures as one JSON object")
@friendly_errors
def plan(config, memory_budget, as_json):
    """Size a model from its config.json alone (a file, a folder holding one, or a .zmoe,
    whose stored config.json is read).

    Prints parameters and BF16 bytes of the experts and of the dense tensors, the expected
    .zmoe size, the KV cache's bytes per token and, with --memory-budget, how the budget is
    divided (dense, one token's working set, expert tiers). No weights are needed.
    """
    from .plan import format_plan, size_plan
    try:
        p = size_plan(config, memory_budget)
    except RecursionError:     # json's decoder recursing on arrays/objects nested too deeply
        where = config / "config.json" if config.is_dir() else config
        raise CliError(f"{where}: not a JSON config (nested too deeply to read)") from None
    click.echo(json.dumps(p.as_dict(), indent=2) if as_json else format_plan(p))


@main.command()
@click.argument("model", type=ModelPath(path_type=Path, dir_okay=False))
@click.argument("file", type=TextPath(path_type=Path, dir_okay=False))
@click.option("--ctx", type=int, default=None,
              help=f"window length in tokens [default: {DEFAULT_CTX}, at most the model's "
                   f"context]")
@click.option("--stride", type=int, default=None,
              help="tokens between window starts; only tokens no earlier window scored are "
                   "scored [default: half of --ctx]")
@click.option("--no-verify", is_flag=True,
              help="skip CRC checks of pieces read from the .zmoe (not recommended)")
@click.option("-q", "--quiet", is_flag=True,
              help="no progress bar (it is drawn only when stderr is a terminal)")
@engine_options
@friendly_errors
def perplexity(model, file, ctx, stride, no_verify, quiet, **kw):
    """Perplexity of MODEL (a .zmoe) on the text FILE, by sliding windows.

    The file (UTF-8) is tokenised as a raw prompt (the tokenizer's special tokens, no chat
    template) and cut into windows of --ctx tokens whose starts move by --stride; each window
    is run from position 0 and scores only the tokens no earlier window scored, so the first
    token of the file is never scored (transformers' "perplexity of fixed-length models"
    recipe). Prints the tokens scored, the mean negative log-likelihood and the perplexity.
    """
    from tqdm.auto import tqdm

    from .api import load
    from .perplexity import check_windows, perplexity as measure
    if not file.exists():
        raise CliError(f"{file}: no such file")
    import stat
    if not (file.is_file() or stat.S_ISFIFO(file.stat().st_mode)):     # /dev/zero: endless
        raise CliError(f"{file}: not a regular file or a pipe")
    try:                    # a regular file, or a pipe (/dev/stdin, <(...))
        text = file.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        raise CliError(f"{file}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except OSError as e:
        raise CliError(f"{file}: cannot be read ({e.strerror or e})") from None
    if ctx is not None:     # bad options fail before the model loads
        check_windows(2, ctx, stride if stride is not None else max(1, ctx // 2))
    check_budget_options(kw)
    m = load(model, verify=not no_verify, **kw)     # kw: the engine options, as `run` takes
    try:
        if kw.get("memory_budget") is not None or kw.get("memory_limit") is not None:
            warn_c_tier_unused(m)
        max_ctx = int(m.hparams["max_position_embeddings"])
        ctx = min(DEFAULT_CTX, max_ctx) if ctx is None else ctx
        stride = max(1, ctx // 2) if stride is None else stride
        ids = m.tokenizer.encode(text, add_special_tokens=True)
        check_windows(len(ids), ctx, stride, max_ctx, where=str(file))
        with tqdm(total=0, unit="window", desc="perplexity",
                  disable=not progress_wanted(quiet)) as bar:
            def progress(done, total):
                bar.total = total
                bar.update(done - bar.n)
            r = measure(m.net, ids, ctx, stride, max_ctx, progress=progress)
    finally:
        m.close()
    click.echo(f"{file}: {r.tokens:,d} tokens, ctx {r.ctx}, stride {r.stride}, {r.windows} "
               f"window{'s' if r.windows != 1 else ''}")
    click.echo(f"tokens scored {r.scored:,d}")
    click.echo(f"mean NLL      {r.mean_nll:.6f} nats/token")
    click.echo(f"PPL           {r.ppl:.6g}")
