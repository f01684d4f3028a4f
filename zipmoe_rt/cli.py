"""``zipmoe-rt`` command line (click). Thin: parse options, call the library, print.

Errors are one line on stderr (``error: ...``) and exit status 1; set ``ZIPMOE_RT_DEBUG=1`` for
the traceback.
"""
from __future__ import annotations

import functools
import os
import sys
from pathlib import Path

import click
import numpy as np

from . import __version__


class CliError(click.ClickException):
    """An error shown as one line."""

    def show(self, file=None):
        click.echo(f"error: {self.format_message()}", err=True)


def friendly_errors(fn):
    """Turn library exceptions into one clear line and exit status 1."""
    @functools.wraps(fn)
    def wrapper(*a, **kw):
        try:
            return fn(*a, **kw)
        except (click.ClickException, click.exceptions.Exit, click.Abort):
            raise
        except KeyboardInterrupt:
            # a second Ctrl-C (or `timeout -s INT`, which signals the process group too) while
            # the worker threads shut down would print a traceback from threading._shutdown
            import signal
            signal.signal(signal.SIGINT, signal.SIG_IGN)
            click.echo("\ninterrupted", err=True)
            sys.exit(130)
        except FileNotFoundError as e:
            if os.environ.get("ZIPMOE_RT_DEBUG"):
                raise
            raise CliError(f"{e.filename}: no such file" if e.filename else str(e)) from None
        except Exception as e:  # noqa: BLE001 - the CLI's job is to report, not crash
            if os.environ.get("ZIPMOE_RT_DEBUG"):
                raise
            msg = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
            raise CliError(msg or type(e).__name__) from None
    return wrapper


class OneLineUsageErrors(click.Command):
    """Usage errors (bad option value, missing argument) as one ``error: ...`` line, status 1."""

    def make_context(self, info_name, args, parent=None, **extra):
        try:
            return super().make_context(info_name, args, parent=parent, **extra)
        except click.UsageError as e:
            raise CliError(e.format_message()) from None


class Group(click.Group):
    command_class = OneLineUsageErrors

    def resolve_command(self, ctx, args):
        try:
            return super().resolve_command(ctx, args)
        except click.UsageError as e:
            raise CliError(e.format_message()) from None


def _sigterm_as_interrupt():
    """SIGTERM (timeout, CI, docker stop) unwinds like Ctrl-C, so temporary files are removed."""
    import signal

    def handler(signum, frame):
        raise KeyboardInterrupt
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use)
        pass


def _plain_calibration_warnings():
    """Show a :class:`~zipmoe_rt.engine.profile.CalibrationWarning`,
    :class:`~zipmoe_rt.convert.converter.ConversionWarning`,
    :class:`~zipmoe_rt.backends.DeviceWarning` or
    :class:`~zipmoe_rt.convert.atomic.StaleTemporaryWarning` as one ``zipmoe-rt: warning: ...``
    line on stderr (not Python's ``file:line: Category:`` form); other warnings as before."""
    import warnings

    if getattr(warnings.showwarning, "_zipmoe_rt", False):
        return
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        from .convert.atomic import StaleTemporaryWarning
        from .convert.converter import ConversionWarning
        from .backends import DeviceWarning
        from .engine.profile import CalibrationWarning
        if issubclass(category, (CalibrationWarning, ConversionWarning, StaleTemporaryWarning,
                                 DeviceWarning)):
            click.echo(f"zipmoe-rt: warning: {message}", err=True)
        else:
            previous(message, category, filename, lineno, file, line)
    show._zipmoe_rt = True
    warnings.showwarning = show


@click.group(cls=Group, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, prog_name="zipmoe-rt")
def main():
    """zipmoe-rt: run Mixture-of-Experts models losslessly from compressed .zmoe files.

    Typical use: `zipmoe-rt chat` (bundled default model), or `zipmoe-rt convert HF_DIR -o
    model.zmoe` then `zipmoe-rt chat model.zmoe`.
    """
    _sigterm_as_interrupt()
    _plain_calibration_warnings()


# -- generation verbs ---------------------------------------------------------------------------
ENGINE_OPTIONS = [
    click.option("--memory-budget", "-m", default=None, metavar="SIZE",
                 help="bytes for all weights, e.g. 600MB, 1.5GiB, or 25% (= dense + 25% of the "
                      "experts' BF16 bytes); default: no limit, experts kept once decoded"),
    click.option("--memory-limit", default=None, metavar="SIZE|auto",
                 help="bound on the whole process (runtime, KV cache, buffers and weights), "
                      "e.g. 600MB, 80% of the memory, or auto (the memory cgroup's limit, else "
                      "the available memory, less 5% / at least 32 MiB); the weight budget is "
                      "what is left. With --memory-budget, that budget must fit the limit"),
    click.option("--policy", type=click.Choice(["auto", "zipmoe", "zip-lru", "raw-lru"]),
                 default="auto", show_default=True,
                 help="expert cache policy under a budget: zipmoe = tiers planned from the "
                      "model's activation trace (zipmoe-rt profile); auto = zipmoe if a trace "
                      "exists, else zip-lru"),
    click.option("--eviction", type=click.Choice(["lru", "lfu", "tlfu"]), default="lru",
                 show_default=True, help="eviction of full (F) experts; tlfu = token-weighted LFU. "
                      "zipmoe's F pools: with lru, recency with frequency-aware admission (planned "
                      "from the trace's token sequences); lfu/tlfu use trace-seeded scores"),
    click.option("--workers", type=click.IntRange(min=1), default=None,
                 help="decode workers [default: all cores]"),
    click.option("--direct", is_flag=True, help="read experts with O_DIRECT (bypass the page cache)"),
    click.option("--io-depth", type=click.IntRange(min=1), default=None,
                 help="expert reads in flight at once [default: 4; 1 = one I/O thread]"),
    click.option("--resident", type=click.Choice(["full", "compressed"]), default="full",
                 show_default=True,
                 help="without a budget: keep experts decoded (full) or all in a compressed "
                      "compute form (~75% of BF16), computed in place, same outputs"),
]

DEVICE_OPTION = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
    help="where to compute: cuda = NVIDIA GPU through CuPy (pip install 'zipmoe-rt[cuda]'); "
         "auto = cuda when CuPy sees a GPU, else cpu")
ENGINE_OPTIONS.append(DEVICE_OPTION)


def engine_options(fn):
    for o in reversed(ENGINE_OPTIONS):
        fn = o(fn)
    return fn


def sampling_options(fn):
    """--temperature/--top-k/--top-p/--min-p/--repeat-penalty/--seed/-n, shared by run and chat."""
    opts = [
        click.option("-n", "--max-tokens", type=click.IntRange(min=1), default=None,
                     help="most tokens to generate per reply [default: 256 for run, 512 for chat]"),
        click.option("--temperature", "-t", type=click.FloatRange(min=0.0), default=0.0,
                     show_default=True, help="sampling temperature; 0 = greedy"),
        click.option("--top-k", type=click.IntRange(min=0), default=0, show_default=True,
                     help="keep the k most likely tokens; 0 = off"),
        click.option("--top-p", type=click.FloatRange(0.0, 1.0, min_open=True), default=1.0,
                     show_default=True, help="nucleus sampling mass; 1 = off"),
        click.option("--min-p", type=click.FloatRange(0.0, 1.0), default=0.0, show_default=True,
                     help="drop tokens below min_p x the top probability; 0 = off"),
        click.option("--repeat-penalty", type=click.FloatRange(min=0.0, min_open=True), default=1.0,
                     show_default=True, help="repetition penalty (transformers' semantics); 1 = off"),
        click.option("--seed", type=int, default=None, help="random seed for sampling"),
        click.option("--no-verify", is_flag=True,
                     help="skip CRC checks of pieces read from the .zmoe (not recommended)"),
    ] + ENGINE_OPTIONS
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _sampling(kw, default_max):
    return dict(max_tokens=kw["max_tokens"] or default_max, temperature=kw["temperature"],
                top_k=kw["top_k"], top_p=kw["top_p"], min_p=kw["min_p"],
                repetition_penalty=kw["repeat_penalty"], seed=kw["seed"])


def _load(model, kw, context=None):
    from .api import load
    m = load(model, verify=not kw.get("no_verify", False), memory_budget=kw["memory_budget"],
             policy=kw["policy"], eviction=kw["eviction"], workers=kw["workers"],
             direct=kw["direct"], io_depth=kw["io_depth"], device=kw["device"],
             memory_limit=kw.get("memory_limit"), context=context,
             resident=kw.get("resident", "full"))
    if kw.get("memory_limit") is not None:      # the banner's memory line
        click.echo(f"zipmoe-rt: {m.memory_line()}", err=True)
    return m


#: ``load_from_options(model, kw)``: the model loaded with the parsed engine options (``serve``)
load_from_options = _load


def _stats_line(st) -> str:
    if st is None:
        return ""

    def num(x, fmt):  # timings are None when there was nothing to time (no token, one token)
        return "-" if x is None else format(x, fmt)
    return (f"[{st.prompt_tokens} prompt + {st.cached_tokens} cached tokens, {st.output_tokens} "
            f"generated ({st.finish_reason}); TTFT {num(st.ttft_s, '.3f')} s, prefill "
            f"{num(st.prefill_tokens_per_s, '.1f')} tokens/s, decode "
            f"{num(st.decode_tokens_per_s, '.1f')} tokens/s]")


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="the prompt; '-' reads it from standard input")
@click.option("--raw", is_flag=True, help="complete the prompt as is, without the chat template")
@click.option("--system", default=None, help="system prompt (chat template only)")
@sampling_options
@friendly_errors
def run(model, prompt, raw, system, **kw):
    """One-shot generation: the completion goes to stdout, timings to stderr.

    The prompt is wrapped in the model's chat template as one user turn, unless --raw.
    MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use).
    """
    if prompt == "-":
        prompt = sys.stdin.read().rstrip("\n")
    sp = _sampling(kw, 256)
    # a token covers at least one byte of text; 64 tokens for the chat template's markup
    text_bytes = len(prompt.encode("utf-8")) + len((system or "").encode("utf-8"))
    m = _load(model, kw, context=text_bytes + 64 + sp["max_tokens"])
    if raw:
        pieces = m.stream(prompt, **sp)
    else:
        msgs = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": "user", "content": prompt}]
        pieces = m.chat(msgs, stream=True, **sp)
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
    finally:
        pieces.close()
        click.echo("")
    click.echo(_stats_line(m.last_stats), err=True)


REPL_HELP = """commands: /reset  forget the conversation
          /system TEXT  set the system prompt (and reset)
          /stats  timings of the last reply and memory in use
          /quit  leave (also Ctrl-D); Ctrl-C stops a reply"""


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--system", default=None, help="system prompt")
@sampling_options
@friendly_errors
def chat(model, system, **kw):
    """Interactive chat REPL that streams replies and keeps the conversation.

    With standard input not a terminal, each input line is one user turn and each reply is
    printed on its own line, so it can be scripted.
    MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use).
    """
    m = _load(model, kw)
    sp = _sampling(kw, 512)
    session = m.chat_session(system)
    interactive = sys.stdin.isatty()
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        click.echo(f"zipmoe-rt chat: {m.name} ({m.hparams['architecture']}, "
                   f"{m.hparams['num_experts']} experts, top-{m.hparams['num_experts_per_tok']})",
                   err=True)
        if kw.get("memory_limit") is None:
            click.echo(m.memory_line(), err=True)
        click.echo(REPL_HELP, err=True)
    while True:
        try:
            line = input(">>> ") if interactive else sys.stdin.readline()
        except EOFError:
            break
        except KeyboardInterrupt:
            click.echo("\n(use /quit or Ctrl-D to leave)", err=True)
            continue
        if not interactive and line == "":
            break
        line = line.rstrip("\n")
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            cmd, _, arg = text.partition(" ")
            if cmd in ("/quit", "/exit", "/bye"):
                break
            if cmd == "/reset":
                session.reset()
                click.echo("(conversation cleared)", err=True)
            elif cmd == "/system":
                session.reset(system=arg.strip() or None)
                click.echo(f"(system prompt {'set' if arg.strip() else 'cleared'}; conversation "
                           f"cleared)", err=True)
            elif cmd == "/stats":
                click.echo(_session_stats(m, session), err=True)
            elif cmd in ("/help", "/?"):
                click.echo(REPL_HELP, err=True)
            else:
                click.echo(f"unknown command {cmd}; /help lists them", err=True)
            continue
        try:
            for piece in session.send(line, **sp):
                click.echo(piece, nl=False)
        except KeyboardInterrupt:
            click.echo(" [stopped]", nl=False)
        click.echo("")
        if interactive:
            click.secho(_stats_line(m.last_stats), err=True, dim=True)


def _session_stats(m, session) -> str:
    lines = [_stats_line(m.last_stats) or "(no reply yet)",
             f"conversation: {len(session.messages)} messages, {len(session.state.token_ids)} "
             f"tokens in the KV cache"]
    lines.append(m.memory_line())
    mem = m.memory_report()
    lines.append("memory: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in mem.items()))
    lines.append(_kv_stats(m, session.state.cache))
    return "\n".join(lines)


def _kv_stats(m, cache) -> str:
    """The KV cache line of ``/stats``: bytes per token (the family's
    ``HParams.kv_values_per_token`` values of :data:`~zipmoe_rt.models.cache.KV_DTYPE`), the
    bytes its tokens use and the bytes it has allocated."""
    from .models.cache import KV_DTYPE
    per_token = m.net.args.kv_values_per_token() * np.dtype(KV_DTYPE).itemsize
    return (f"KV cache: {per_token:,d} bytes per token, {cache.offset} tokens = "
            f"{cache.offset * per_token / 1e6:.3f} MB in use, {cache.nbytes / 1e6:.3f} MB "
            f"allocated")


@main.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
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
    """Record an activation trace (decode tokens: layer x expert counts) for the planner."""
    from .engine import profile as prof
    lines = [l.strip() for l in prompts.read_text(encoding="utf-8").splitlines() if l.strip()]
    if not lines:
        raise CliError(f"{prompts}: no prompts (one per line)")
    m = _load(model, kw)
    tr = prof.record_trace(m, lines, max_tokens=max_tokens, chat=not raw, progress=not quiet)
    out = prof.save_trace(tr, output or prof.sidecar(model, prof.TRACE_SUFFIX))
    c = np.asarray(tr["counts"], float)
    top = (np.sort(c, axis=1)[:, ::-1] / c.sum(axis=1, keepdims=True))[:, 0]
    click.echo(f"wrote {out}: {tr['tokens']} decode tokens over {tr['prompts']} prompts; top-1 "
               f"expert share per layer {top.mean():.3f} (mean), locality "
               f"{tr['locality'] if tr['locality'] is not None else float('nan'):.3f}")


@main.command()
@click.argument("model", type=click.Path(path_type=Path, dir_okay=False))
@click.option("--samples", type=click.IntRange(min=1), default=12, show_default=True,
              help="experts to time")
@click.option("--direct", is_flag=True, help="time O_DIRECT reads")
@click.option("--io-depth", type=click.IntRange(min=1), default=None,
              help="reads in flight, as the runs that use it [default: 4]")
@DEVICE_OPTION
@friendly_errors
def calibrate(model, samples, direct, io_depth, device):
    """Measure this machine's planner constants on MODEL (cold SM/exponent reads, decode, matmul)."""
    import json

    from .engine import profile as prof
    from .engine.store import ZmoeSource
    src = ZmoeSource(model)
    from .backends import get_backend, resolve_device
    backend = get_backend(resolve_device(device))
    cal = prof.calibrate(src, samples=samples, direct=direct, io_depth=io_depth, backend=backend)
    out = prof.sidecar(model, prof.CALIB_SUFFIX)
    out.write_text(json.dumps(cal, indent=2))
    click.echo(f"wrote {out}")
    click.echo(f"  SM read {cal['sm_read_s'] * 1e3:.2f} ms, exponent read {cal['exp_read_s'] * 1e3:.2f} ms, "
               f"decode {cal['decode_s'] * 1e3:.2f} ms ({cal['decode_Gweights_per_s']:.2f} G weights/s "
               f"per core), matmul {cal['matmul_s'] * 1e3:.2f} ms per expert; reads "
               f"{cal['read_GBps']:.2f} GB/s")


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path, dir_okay=False))
@click.option("--memory-budget", "-m", "budgets", multiple=True, metavar="SIZE",
              help="budget(s) to test (repeatable), e.g. 10% 25% 50% 100% or 600MB "
                   "[default: 25%]; 'none' adds an unbudgeted in-memory row")
@click.option("--memory-limit", "limits", multiple=True, metavar="SIZE|auto",
              help="memory limit(s) of the whole process to test (repeatable), e.g. 600MB or "
                   "auto: each row's budget is the one the limit gives, and its peak RSS is "
                   "shown beside the limit")
@click.option("--policy", "policies", multiple=True,
              type=click.Choice(["zipmoe", "zip-lru", "raw-lru"]),
              help="policies to compare (repeatable) [default: all three]")
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
              help="how the unbudgeted rows hold experts (repeatable: a row each) [default: full]")
@friendly_errors
def bench(model, budgets, limits, policies, n_prompt, n_gen, repetitions, eviction, workers, direct,
          io_depth, raw_model, trace, json_out, device, residents):
    """Benchmark prefill/decode tokens/s under memory budgets, all policies in one run.

    Prints a llama-bench-style table (mean ± sd over repetitions, TTFT, TPOT, hits per tier,
    bytes read per token, time per pipeline stage, peak RSS); the page cache is evicted before
    every run. MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use).
    """
    from . import bench as B
    from .default_model import ensure_default_model
    from .backends import resolve_device
    device = "cuda" if resolve_device(device) == "cuda" else "cpu"   # once, here (one notice)
    model = model or ensure_default_model()
    bl = [None if b.lower() == "none" else b
          for b in (budgets or (() if limits else ("25%",)))]
    policies = list(policies or ("raw-lru", "zip-lru", "zipmoe"))
    from .engine import profile as prof
    if ("zipmoe" in policies and (any(b is not None for b in bl) or limits)
            and (trace or prof.sidecar(model, prof.TRACE_SUFFIX)).exists()):
        # each row runs in a subprocess whose stderr is not shown: warn about the calibration here
        prof.load_checked_calibration(model, direct, io_depth=io_depth)
    res = B.run(model, bl, policies, pp=n_prompt,
                tg=n_gen, reps=repetitions, workers=workers, direct=direct, eviction=eviction,
                raw_model=raw_model, trace=trace, log=lambda s: click.echo(s, err=True),
                io_depth=io_depth, device=device, limits=limits,
                residents=residents or ("full",))
    click.echo(B.table(res))
    if json_out:
        B.save(res, json_out)
        click.echo(f"wrote {json_out}", err=True)


from . import cli_format  # noqa: E402,F401  (registers convert, export, verify, inspect on main)
from . import cli_eval  # noqa: E402,F401  (registers plan, perplexity on main)
from . import cli_serve  # noqa: E402,F401  (registers serve on main)

if __name__ == "__main__":   # python -m zipmoe_rt.cli: the group the verb modules registered on
    from zipmoe_rt.cli import main as registered_main
    registered_main()
