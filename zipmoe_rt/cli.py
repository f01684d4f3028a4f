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

from . import __version__
from .cli_harmony import harmony_reply
from .cli_stats import session_stats as _session_stats
from .cli_stats import stats_line as _stats_line
from .cli_types import (FLOAT32_MAX, FloatRange, IntRange, lenient_stdin, max_tokens_for,
                        max_tokens_option, need_stdin, utf8_text)


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
        except BrokenPipeError:
            # the reader went away (`zipmoe-rt run ... | head`): stop quietly, as a program
            # killed by SIGPIPE does (status 128 + 13); nothing more is written to the pipe
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            sys.exit(141)
        except FileNotFoundError as e:
            if os.environ.get("ZIPMOE_RT_DEBUG"):
                raise
            raise CliError(f"{e.filename}: no such file" if e.filename else str(e)) from None
        except Exception as e:  # noqa: BLE001 - the CLI's job is to report, not crash
            if os.environ.get("ZIPMOE_RT_DEBUG"):
                raise
            msg = str(e) if not isinstance(e, KeyError) else str(e.args[0] if e.args else e)
            raise CliError((msg or type(e).__name__) + _hint(e)) from None
    return wrapper


def _hint(e: Exception) -> str:
    """What to do about a file that is not a ``.zmoe`` (a GGUF, safetensors, ...): convert."""
    from zmoe.errors import NotZmoeError
    if not isinstance(e, NotZmoeError):
        return ""
    what = "GGUF files are not run directly; " if "GGUF" in str(e) else ""
    return (f"; {what}convert the Hugging Face checkpoint folder (config.json + safetensors) "
            f"first: zipmoe-rt convert HF_DIR -o model.zmoe")


def progress_wanted(quiet: bool = False) -> bool:
    """Progress bars only on a terminal (standard error), and not with ``--quiet``."""
    return not quiet and sys.stderr.isatty()


def default_model_if_none(model):
    """MODEL, or the bundled default model (built on first use) when MODEL is left out."""
    if model is not None:
        return model
    from .default_model import ensure_default_model
    return ensure_default_model(progress=progress_wanted())


class OneLineUsageErrors(click.Command):
    """Usage errors (bad option value, missing argument) as one ``error: ...`` line, status 1."""

    def make_context(self, info_name, args, parent=None, **extra):
        from .cli_types import split_percent
        if (msg := split_percent(self.params, args)) is not None:
            raise CliError(msg)
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
    :class:`~zipmoe_rt.backends.DeviceWarning`,
    :class:`~zipmoe_rt.engine.precompile.KernelCompileWarning`,
    :class:`~zipmoe_rt.kernels.KernelCacheWarning` (issued once, when the kernels are first
    imported) or
    :class:`~zipmoe_rt.convert.atomic.StaleTemporaryWarning` or
    :class:`~zipmoe_rt.engine.prefetch.PrefetchWarning` as one ``zipmoe-rt: warning: ...``
    line on stderr (not Python's ``file:line: Category:`` form); other warnings as before."""
    import sys
    import warnings

    if getattr(warnings.showwarning, "_zipmoe_rt", False):
        return
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        # (issued while the kernels package is being imported: nothing else is imported here)
        kernels = sys.modules.get(f"{__package__}.kernels")
        if kernels is not None and issubclass(category, getattr(kernels, "KernelCacheWarning",
                                                                ())):
            click.echo(f"zipmoe-rt: warning: {message}", err=True)
            return
        from .convert.atomic import StaleTemporaryWarning
        from .convert.converter import ConversionWarning
        from .backends import DeviceWarning
        from .engine.precompile import KernelCompileWarning
        from .engine.prefetch import PrefetchWarning
        from .engine.profile import CalibrationWarning
        if issubclass(category, (CalibrationWarning, ConversionWarning, StaleTemporaryWarning,
                                 DeviceWarning, KernelCompileWarning, PrefetchWarning)):
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
                      "model's activation trace (zipmoe-rt profile); auto = with a trace, per "
                      "MoE layer an LRU pool of full experts, tiers or a mix, whichever the "
                      "planner predicts fastest; else zip-lru"),
    click.option("--eviction", type=click.Choice(["lru", "lfu", "tlfu"]), default="lru",
                 show_default=True, help="eviction of full (F) experts; tlfu = token-weighted LFU. "
                      "zipmoe's F pools: with lru, recency with frequency-aware admission (planned "
                      "from the trace's token sequences); lfu/tlfu use trace-seeded scores"),
    click.option("--workers", type=IntRange(min=1), default=None,
                 help="decode workers [default: all cores]"),
    click.option("--direct", is_flag=True, help="read experts with O_DIRECT (bypass the page cache)"),
    click.option("--io-depth", type=IntRange(min=1), default=None,
                 help="expert reads in flight at once [default: 4; 1 = one I/O thread]"),
    click.option("--resident", type=click.Choice(["full", "compressed"]), default="full",
                 show_default=True,
                 help="without a budget: keep experts decoded (full) or all in a compressed "
                      "compute form (~75% of BF16), computed in place, same outputs; under a "
                      "budget: the form of the experts the policy caches; compressed also "
                      "holds the dense linears in that form"),
    click.option("--c-tier", type=click.Choice(["packed", "planes"]), default="packed",
                 show_default=True,
                 help="under a budget, policy zipmoe: its C slots hold the compute form, "
                      "computed in place (packed), or the storage form, decoded at every use "
                      "(planes)"),
    # cross-layer prefetch (engine/prefetch.py)
    click.option("--prefetch", type=click.Choice(["on", "off"]), default=None,
                 help="under a budget: while a layer computes, load the experts the next "
                      "layer's router predicts (same outputs) [default: off]"),
]

DEVICE_OPTION = click.option(
    "--device", type=click.Choice(["auto", "cpu", "cuda"]), default="cpu", show_default=True,
    help="where to compute: cuda = NVIDIA GPU through CuPy (pip install 'zipmoe-rt[cuda]'); "
         "auto = cuda when CuPy sees a GPU, else cpu")
ENGINE_OPTIONS.append(DEVICE_OPTION)
# GPU expert offloading (docs/gpu.md)
HOST_BUDGET_OPTION = click.option(
    "--host-budget", default=None, metavar="SIZE",
    help="with --device cuda and --memory-budget: pinned host RAM for experts kept in host "
         "memory in compressed form, e.g. 8GB or 50% (of the experts' stored bytes); the rest "
         "are read from the file [default: 0]")
ENGINE_OPTIONS.append(HOST_BUDGET_OPTION)


def engine_options(fn):
    for o in reversed(ENGINE_OPTIONS):
        fn = o(fn)
    return fn


def _nonempty_stops(ctx, param, value):
    """``--stop``: every stop string has at least one character (an empty one would match
    everywhere, or, as llama.cpp treats it, never: either way not what was meant)."""
    if any(v == "" for v in value):
        raise click.BadParameter("an empty stop string; give the text that ends the reply",
                                 ctx=ctx, param=param)
    return value


def sampling_options(fn):
    """Sampling, context and thread options shared by run and chat (llama.cpp's spellings).

    Sampling options left out take the model's generation_config.json defaults
    (:func:`zipmoe_rt.cli_repl.resolve_sampling`)."""
    opts = [
        click.option("-n", "--max-tokens", type=IntRange(shown="x>=1 or x=-1"), default=None,
                     callback=lambda ctx, param, v: max_tokens_option(v),
                     help="most tokens to generate per reply; -1 = until a stop token or the "
                          "full context [default: 256 for run, 512 for chat]"),
        click.option("--temperature", "--temp", type=FloatRange(min=0.0, most=FLOAT32_MAX),
                     default=None,
                     help="sampling temperature; 0 = greedy [default: the model's "
                          "generation_config.json, else 0.8]"),
        click.option("--top-k", type=IntRange(min=0), default=None,
                     help="keep the k most likely tokens; 0 = off [default: the model's, else 40]"),
        click.option("--top-p", type=FloatRange(0.0, 1.0, min_open=True), default=None,
                     help="nucleus sampling mass; 1 = off [default: the model's, else 0.95]"),
        click.option("--min-p", type=FloatRange(0.0, 1.0), default=None,
                     help="drop tokens below min_p x the top probability; 0 = off [default: the "
                          "model's, else 0.05]"),
        click.option("--repeat-penalty", type=FloatRange(min=0.0, min_open=True),
                     default=None, help="repetition penalty (transformers' semantics); 1 = off "
                                        "[default: the model's, else 1]"),
        click.option("--seed", type=IntRange(min=-1), default=None,
                     help="random seed for sampling; -1 = random [default: random]"),
        click.option("--stop", "stops", multiple=True, metavar="TEXT", callback=_nonempty_stops,
                     help="end the reply where TEXT appears (not printed); repeatable"),
        click.option("-c", "--ctx-size", type=int, default=None,
                     help="context size in tokens (prompt, earlier turns and reply) [default: "
                          "the model's max_position_embeddings, capped by free memory]"),
        click.option("-t", "--threads", type=IntRange(min=1), default=None,
                     help="threads of the compute kernels [default: all cores]"),
        click.option("--no-verify", is_flag=True,
                     help="skip CRC checks of pieces read from the .zmoe (not recommended)"),
        click.option("--show-reasoning", is_flag=True,
                     help="gpt-oss (harmony format): also print the analysis channel (the "
                          "reasoning) on stderr, dimmed on a terminal; by default only the "
                          "final channel is printed"),
    ] + ENGINE_OPTIONS
    for o in reversed(opts):
        fn = o(fn)
    return fn


def _prepare(model, kw, default_max, context=None, banner=True):
    """Load MODEL for run/chat: threads, context size, kernel warm-up; returns (model,
    sampling keyword arguments, context size). ``context``: tokens the run may hold, for
    ``--memory-limit``; ``banner``: print the memory line (see :func:`load_from_options`)."""
    from zmoe.constants import Keys

    from . import cli_repl
    cli_repl.set_threads(kw["threads"])
    if kw["ctx_size"] is not None and kw["ctx_size"] >= 1:   # -c bounds a limit's KV cache
        context = kw["ctx_size"] if context is None else min(context, kw["ctx_size"])
    m = load_from_options(model, kw, context=context, banner=banner)
    try:
        m.ctx_size = cli_repl.context_size(m, kw["ctx_size"])
        if m.memory_plan is not None:   # a limit holds a KV cache of the context it planned
            m.ctx_size = min(m.ctx_size, m.memory_plan.context)
        cli_repl.warm_up(m, notice=sys.stderr.isatty())   # (like the progress bars)
        opts = dict(kw, repetition_penalty=kw["repeat_penalty"])
        sp = cli_repl.resolve_sampling(m.source.metadata.get(Keys.Generation.CONFIG), opts,
                                       max_tokens_for(kw["max_tokens"], default_max, m.ctx_size),
                                       where=str(m.path))
    except BaseException:
        m.close()
        raise
    return m, sp, m.ctx_size


def _memory_asked(kw) -> bool:
    return kw.get("memory_limit") is not None or kw.get("memory_budget") is not None


#: options that act only under a memory budget or limit (an error without one, as for
#: ``--host-budget``); ``--c-tier`` also only under policy zipmoe (one warning otherwise:
#: :func:`warn_c_tier_unused`)
BUDGET_ONLY_OPTIONS = ("policy", "eviction", "prefetch", "c_tier")


def check_budget_options(kw) -> None:
    """Refuse ``--policy``, ``--eviction``, ``--prefetch`` or ``--c-tier`` given on the command
    line without ``--memory-budget`` or ``--memory-limit``: unbudgeted, every expert is kept
    once decoded, so there is no expert cache for them to act on (``--host-budget`` is refused
    likewise, by :func:`zipmoe_rt.load`). Call it in the verb's own thread (it reads click's context).

    Raises:
        CliError: naming the first such option.
    """
    if _memory_asked(kw):
        return
    ctx = click.get_current_context(silent=True)
    if ctx is None:
        return
    from click.core import ParameterSource
    for name in BUDGET_ONLY_OPTIONS:
        if name in ctx.params and ctx.get_parameter_source(name) not in (
                ParameterSource.DEFAULT, ParameterSource.DEFAULT_MAP):
            raise CliError(f"{_option(name)}: applies under a memory budget (--memory-budget "
                           f"or --memory-limit); without one every expert is kept once decoded "
                           f"and there is no expert cache to {_BUDGET_ONLY_ROLE[name]}")


_BUDGET_ONLY_ROLE = {"policy": "choose a policy for", "eviction": "evict from",
                     "prefetch": "prefetch into", "c_tier": "give a C tier"}


def _option(name: str) -> str:
    """The command-line spelling of click parameter ``name`` (``c_tier`` -> ``--c-tier``)."""
    return "--" + name.replace("_", "-")


def _given(name: str) -> bool:
    """Whether option ``name`` was given on the command line (not left at its default)."""
    ctx = click.get_current_context(silent=True)
    if ctx is None or name not in ctx.params:
        return False
    from click.core import ParameterSource
    return ctx.get_parameter_source(name) not in (ParameterSource.DEFAULT,
                                                  ParameterSource.DEFAULT_MAP)


def warn_c_tier_unused(m) -> None:
    """One warning line when ``--c-tier`` was given but the loaded model's policy
    (``m.policy``, ``auto`` resolved) is not ``zipmoe``: only zipmoe's tiers have C slots, so
    the option has no effect."""
    from .engine.factory import has_c_slots
    if _given("c_tier") and m.policy != "zipmoe":
        click.echo(f"zipmoe-rt: warning: --c-tier: no effect: policy {m.policy} has no C "
                   f"tier (only zipmoe's tiers have C slots)", err=True)
    elif _given("c_tier") and not has_c_slots(m.engine):
        click.echo("zipmoe-rt: warning: --c-tier: no effect: the plan has no C slot in any "
                   "MoE layer", err=True)


def load_from_options(model, kw, context=None, banner=True):
    """``zipmoe_rt.load`` with the engine options a verb took (``kw``), then the memory banner
    on stderr when a limit or budget was given and ``banner`` (piped ``chat`` prints none);
    a warning about the options is printed either way."""
    from .api import load
    check_budget_options(kw)
    m = load(model, progress=progress_wanted(), verify=not kw.get("no_verify", False), memory_budget=kw["memory_budget"],
             policy=kw["policy"], eviction=kw["eviction"], workers=kw["workers"],
             direct=kw["direct"], io_depth=kw["io_depth"], device=kw["device"],
             memory_limit=kw.get("memory_limit"), context=context,
             resident=kw.get("resident", "full"), host_budget=kw.get("host_budget"),
             prefetch=kw.get("prefetch"), c_tier=kw.get("c_tier", "packed"))
    if _memory_asked(kw):      # the banner's memory line: a limit or a budget was given
        from .engine.factory import has_c_slots
        planes = kw.get("c_tier") == "planes" and has_c_slots(m.engine)
        if banner:
            click.echo(f"zipmoe-rt: {m.memory_line()}" + (", C tier planes (decoded at every "
                                                          "use)" if planes else ""), err=True)
        warn_c_tier_unused(m)
    return m


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("-p", "--prompt", required=True, help="the prompt; '-' reads it from standard input")
@click.option("--raw", is_flag=True, help="complete the prompt as is, without the chat template")
@click.option("--system", default=None, help="system prompt (chat template only)")
@sampling_options
@friendly_errors
def run(model, prompt, raw, system, show_reasoning, **kw):
    """One-shot generation: the completion goes to stdout, timings to stderr.

    The prompt is wrapped in the model's chat template as one user turn, unless --raw.
    MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use).
    """
    from .cli_repl import prefill_notice, stop_at
    if prompt == "-":
        need_stdin("-p - (the prompt from standard input)")
        lenient_stdin()
        prompt = utf8_text(sys.stdin.read().rstrip("\n"), "-p - (standard input)")
    prompt, system = utf8_text(prompt, "-p/--prompt"), utf8_text(system, "--system")
    # a token covers at least one byte of text; 64 tokens for the chat template's markup
    text_bytes = len(prompt.encode("utf-8")) + len((system or "").encode("utf-8"))
    m, sp, _ = _prepare(model, kw, 256, context=text_bytes + 64 + max_tokens_for(
        kw["max_tokens"], 256, kw["ctx_size"] or 2048))
    harmony = harmony_reply(m, show_reasoning, raw)
    if raw:
        n = len(m.tokenizer.encode(prompt))
        pieces = m.stream(prompt, **sp)
    else:
        if not m.tokenizer.chat_template:
            raise CliError("chat_template: this model's tokenizer has no chat template; add "
                           "--raw to send the prompt as it is")
        msgs = ([{"role": "system", "content": system}] if system else []) + \
               [{"role": "user", "content": prompt}]
        n = len(m.tokenizer.encode_chat(msgs, add_generation_prompt=True))
        pieces = m.chat(msgs, stream=True, skip_special_tokens=harmony is None, **sp)
        if harmony is not None:
            pieces = harmony.filter(pieces)
    pieces = stop_at(prefill_notice(pieces, n), kw["stops"], m)
    try:
        for piece in pieces:
            click.echo(piece, nl=False)
    finally:
        pieces.close()
        click.echo("")
    click.echo(_stats_line(m.last_stats), err=True)


@main.command()
@click.argument("model", required=False, type=click.Path(path_type=Path))
@click.option("--system", default=None, help="system prompt")
@sampling_options
@friendly_errors
def chat(model, system, show_reasoning, **kw):
    """Interactive chat REPL that streams replies and keeps the conversation.

    With standard input not a terminal, each input line is one user turn and each reply is
    printed on its own line, so it can be scripted; the exit status is 1 when a turn was
    refused (an error: line names each).
    MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first use).
    """
    from . import cli_repl
    system = utf8_text(system, "--system")
    need_stdin("chat (the turns are read from it)")
    interactive = sys.stdin.isatty()
    m, sp, ctx = _prepare(model, kw, 512, banner=interactive)   # piped: the replies only
    if not m.tokenizer.chat_template:
        raise CliError("chat_template: this model's tokenizer has no chat template, so it "
                       "cannot hold a conversation; complete a prompt as it is with "
                       "`zipmoe-rt run MODEL --raw -p TEXT`")
    session = m.chat_session(system)
    memory = None if _memory_asked(kw) else m.memory_line()   # else load_from_options said it
    harmony = harmony_reply(m, show_reasoning, False)
    failed = cli_repl.repl(m, session, sp, kw["stops"], _stats_line, _session_stats,
                           interactive, cli_repl.banner(m, ctx, memory),
                           harmony=None if harmony is None else harmony.show_reasoning)
    if failed and not interactive:      # a script learns that some of its turns were refused
        raise CliError(f"{failed} of the input's turns failed (the error: lines above)")


from . import cli_engine  # noqa: E402,F401  (registers profile, calibrate, bench on main)
from . import cli_format  # noqa: E402,F401  (registers convert, export, verify, inspect on main)
from . import cli_eval  # noqa: E402,F401  (registers plan, perplexity on main)
from . import cli_serve  # noqa: E402,F401  (registers serve on main)

if __name__ == "__main__":   # python -m zipmoe_rt.cli: the group the verb modules registered on
    from zipmoe_rt.cli import main as registered_main
    registered_main()
