"""What ``zipmoe-rt run`` and ``chat`` do around the library: sampling defaults from the model's
``generation_config.json``, ``--threads``, ``--ctx-size``, ``--stop`` strings, the kernel
warm-up (with a "compiling kernels" notice on a cold Numba cache), and the chat REPL itself.

Option names follow llama.cpp's ``llama-cli`` (``-t/--threads``, ``-c/--ctx-size``, ``--temp``,
``--stop``, ``--seed -1``).
"""
from __future__ import annotations

import os
import select
import signal
import sys
from typing import Iterator, Sequence

import click
import numpy as np

from .cli_types import lenient_stdin, utf8_text
from .stops import stop_at  # noqa: F401 - the REPL's and `run`'s stop strings

#: what the CLI samples with when ``generation_config.json`` says nothing about sampling:
#: llama.cpp's ``common_params_sampling`` defaults (repetition penalty off)
FALLBACK_SAMPLING = {"temperature": 0.8, "top_k": 40, "top_p": 0.95, "min_p": 0.05}
#: a prefill of at least this many new tokens prints a line on a terminal while it runs
PREFILL_NOTICE_TOKENS = 256

_KEYS = ("temperature", "top_k", "top_p", "min_p", "repetition_penalty")


def resolve_sampling(generation_config: dict | None, options: dict, max_tokens: int,
                     where: str | None = None) -> dict:
    """The keyword arguments of :meth:`~zipmoe_rt.api.Model.chat` / ``stream`` for one run.

    Defaults come from the model's ``generation_config.json`` (stored as ``generation.config``,
    format/SPEC.md §3), read as transformers' ``GenerationConfig`` does: ``do_sample: false`` is
    greedy; ``do_sample: true`` samples with the file's ``temperature``/``top_k``/``top_p``/
    ``min_p`` (transformers' defaults 1.0/50/1.0/off where unset). A file that does not say
    (no ``do_sample``) samples with its own values where it has them and llama.cpp's defaults
    (:data:`FALLBACK_SAMPLING`) elsewhere: greedy decoding of a chat model loops. The file's
    ``repetition_penalty`` applies in every case. Options given on the command line (not None)
    win, and the file's value of such an option is not used or checked; ``temperature=0`` is
    greedy (the file's ``top_k``/``top_p``/``min_p`` then unused and unchecked,
    :func:`~zipmoe_rt.sampling.file_sampling`).

    Args:
        generation_config: the parsed ``generation_config.json`` (``{}`` or None: none).
        options: ``temperature``, ``top_k``, ``top_p``, ``min_p``, ``repetition_penalty``,
            ``seed`` as given (None = not given; ``seed=-1`` = random, like None).
        where: the model file, named in the error for a value of its file out of range.
    Returns:
        dict of ``max_tokens``, the five sampling keys and ``seed``.
    Raises:
        ValueError: a value of the file that is used is out of range (``"FILE:
            generation.config: temperature: must be in [0.0, inf], got -5"``).
    """
    gen = {k: v for k, v in (generation_config or {}).items() if v is not None}
    if gen.get("do_sample") is False:
        out = {"temperature": 0.0}
    elif gen.get("do_sample") is True:
        out = {"temperature": gen.get("temperature", 1.0), "top_k": gen.get("top_k", 50),
               "top_p": gen.get("top_p", 1.0), "min_p": gen.get("min_p", 0.0)}
    else:
        out = {k: gen.get(k, v) for k, v in FALLBACK_SAMPLING.items()}
    out["repetition_penalty"] = gen.get("repetition_penalty", 1.0)
    from .sampling import file_sampling
    out = file_sampling(out, {k: options.get(k) for k in _KEYS}, where)
    seed = options.get("seed")
    out["seed"] = None if seed is None or seed == -1 else seed
    out["max_tokens"] = max_tokens
    return out


def set_threads(n: int | None) -> None:
    """``--threads``: the Numba kernels' threads (``numba.set_num_threads``).

    Raises:
        ValueError: more threads than Numba started (``NUMBA_NUM_THREADS``, all cores); the
            message names the option.
    """
    if n is None:
        return
    import numba
    most = numba.config.NUMBA_NUM_THREADS
    if n > most:
        raise ValueError(f"-t/--threads: {n} is more than the {most} threads available (the "
                         f"cores; NUMBA_NUM_THREADS)")
    numba.set_num_threads(n)


def context_size(model, requested: int | None) -> int:
    """``--ctx-size``: the context of a run, in tokens.

    Default: the model's ``hparams.max_position_embeddings``, capped so that the KV cache
    fits half of the memory available now (``MemAvailable`` of ``/proc/meminfo`` where there
    is one). A request over the trained length is allowed, as llama.cpp allows it (RoPE
    scaling may cover it), with one warning line on stderr (:func:`over_trained_context`);
    one over the memory cap too (the user asked for it).

    Raises:
        ValueError: ``requested`` below 1 (the message names the option).
    """
    if requested is not None:
        if requested < 1:
            raise ValueError(f"-c/--ctx-size: must be at least 1, got {requested}")
        warning = over_trained_context(requested, model.hparams.get("max_position_embeddings"))
        if warning:
            click.echo(f"zipmoe-rt: warning: {warning}", err=True)
        return requested
    from .models.cache import KV_DTYPE
    n = int(model.hparams.get("max_position_embeddings") or 0) or 1 << 20
    per_token = model.net.args.kv_values_per_token() * np.dtype(KV_DTYPE).itemsize
    avail = _mem_available()
    if avail and per_token:
        n = min(n, max(256, avail // 2 // per_token))
    return n


def over_trained_context(requested: int, trained, option: str = "-c/--ctx-size") -> str | None:
    """The warning for a context longer than the model was trained for (llama.cpp's
    ``n_ctx > n_ctx_train`` warning), or None when it fits or the trained length is unknown.

    Args:
        requested: the context asked for, in tokens.  trained: the model's
            ``max_position_embeddings`` (None or 0: unknown).  option: named in the text.
    """
    if not trained or requested <= int(trained):
        return None
    return (f"{option} {requested} is more than the {int(trained)} tokens the model was "
            f"trained on (n_ctx_train, its max_position_embeddings); output past that position "
            f"may degrade")


def _mem_available() -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def warm_up(model, notice: bool) -> None:
    """Run the kernels once (a short prefill and one decode step on a scratch cache) so that
    Numba's compilation, or loading its on-disk cache (``cache=True``: ``__pycache__`` next
    to the kernels, or ``NUMBA_CACHE_DIR``), is not counted in the first reply's TTFT and
    tokens/s. The prefill is :func:`warm_up_tokens` long, so the parallel attention kernel
    compiles too. When ``notice`` and a kernel really compiles (Numba's ``numba:compile``
    event, which a cache hit does not send), "compiling kernels (first run only)..." is
    printed on stderr as it starts, and "kernels compiled in N s" at the end."""
    import time

    from numba.core import event

    started: list[float] = []

    class Notice(event.Listener):
        def on_start(self, ev):
            if not started:
                started.append(time.perf_counter())
                click.echo("compiling kernels (first run only)...", err=True)

        def on_end(self, ev):
            pass

    listener = Notice()
    if notice:
        event.register("numba:compile", listener)
    try:
        ids = [t for t in (model.tokenizer.bos_token_id, model.tokenizer.eos_token_id)
               if t is not None] or [0]
        n = warm_up_tokens(model)
        ids = (ids * n)[:n]
        cache = model.net.new_cache(max_tokens=n + 1)   # (before any reply: no other thread)
        model.net.forward(np.asarray(ids, np.int64), cache, last_only=True)
        model.net.forward(np.asarray(ids[:1], np.int64), cache, last_only=True)
    finally:
        if notice:
            event.unregister("numba:compile", listener)
    if started:
        click.echo(f"kernels compiled in {time.perf_counter() - started[0]:.0f} s", err=True)


def warm_up_tokens(model) -> int:
    """The warm-up prefill's length: 2, or enough tokens for causal attention over them to
    take the parallel kernel (``T * T * heads * head_dim >= ATTN_PAR_MIN``,
    :mod:`zipmoe_rt.kernels.attention`), at most 256 and less than ``model.ctx_size``."""
    from .kernels.attention import ATTN_PAR_MIN
    h = getattr(model, "hparams", None) or {}
    heads = int(h.get("num_attention_heads") or 1)
    head_dim = int(h.get("head_dim") or (h.get("hidden_size") or 64) // heads)
    n = int(np.ceil(np.sqrt(ATTN_PAR_MIN / max(heads * head_dim, 1))))
    ctx = getattr(model, "ctx_size", None) or n + 1
    return max(2, min(n, 256, ctx - 1))


# -- the REPL ------------------------------------------------------------------------------------
REPL_HELP = """commands: /reset  forget the conversation (the system prompt is kept)
          /system TEXT  set the system prompt (and reset); /system alone clears it
          /stats  timings of the last reply and memory in use
          /help  this list
          /quit  leave (also Ctrl-D, at the prompt or during a reply)
          Ctrl-C  stop a reply (kept as far as it got); before it begins, cancel the turn
          a multi-line paste is one turn; end a line with \\ to continue it"""


#: the line a turn stopped before its first reply token prints (Ctrl-C during the prefill)
CANCELLED_TURN = "(turn cancelled before the reply began; it is not in the conversation)"


def banner(model, ctx: int, memory: str | None) -> str:
    """The REPL's first lines: model, architecture, device and context size; then ``memory``
    (:meth:`~zipmoe_rt.api.Model.memory_line`: limit or weight budget, and the policy) if
    given."""
    h = model.hparams
    first = (f"zipmoe-rt chat: {model.name} ({h['architecture']}, {h['num_experts']} experts, "
             f"top-{h['num_experts_per_tok']}) on {model.device}; context {ctx} tokens")
    return first if memory is None else f"{first}\n{memory}"


def _pending_input(timeout_s: float = 0.05) -> bool:
    """Whether more typed or pasted input is already waiting on standard input."""
    try:
        return bool(select.select([sys.stdin], [], [], timeout_s)[0])
    except (OSError, ValueError):
        return False


def eof_typed(fd: int | None = None) -> bool:
    """Whether a terminal's input starts with an end of file: Ctrl-D typed on an empty line
    while the terminal is in its line mode (a reply streaming), which a read would return as
    0 bytes. The terminal then says there is input (``select``) but no byte of it
    (``FIONREAD`` 0; a line typed ahead counts its bytes and is left for the next prompt).
    When it does, the end of file is read (taken off the queue, so that the shell does not
    read it after ``chat`` exits) and True returned. False off a terminal or when it cannot
    tell (not POSIX).

    Args:
        fd: the descriptor to look at (default: standard input's).
    """
    try:
        import fcntl
        import struct
        import termios
        fd = sys.stdin.fileno() if fd is None else fd
        if not os.isatty(fd) or not select.select([fd], [], [], 0)[0]:
            return False
        waiting = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
        if waiting:
            return False
        os.read(fd, 1)         # returns b"": the end of file, consumed
        return True
    except (ImportError, OSError, ValueError, AttributeError):
        return False


def typed_ahead(fd: int | None = None) -> tuple[str | None, bool]:
    """What was typed on the terminal while a reply streamed, read in the terminal's line mode
    before ``readline`` switches it to raw mode (where a Ctrl-D among it would arrive as a NUL
    byte and be lost).

    Args:
        fd: the descriptor (default: standard input's).
    Returns:
        ``(text, eof)``: the complete lines typed, joined by newlines (one turn, as a paste
        is), or None; and whether an end of file (Ctrl-D on an empty line) followed them,
        which is then read. ``(None, False)`` off a terminal or when it cannot tell.
    """
    lines, eof = [], False
    try:
        import fcntl
        import struct
        import termios
        fd = sys.stdin.fileno() if fd is None else fd
        if not os.isatty(fd):
            return None, False
        while select.select([fd], [], [], 0)[0]:
            n = struct.unpack("i", fcntl.ioctl(fd, termios.FIONREAD, b"\0\0\0\0"))[0]
            data = os.read(fd, max(n, 1))      # line mode: one line per read
            if not data:
                eof = True
                break
            lines.append(data.decode("utf-8", "surrogateescape").rstrip("\n"))
    except (ImportError, OSError, ValueError, AttributeError):
        pass
    return ("\n".join(lines) if lines else None), eof


def read_turn(interactive: bool) -> str | None:
    """One user turn; None at end of input. Lines ended by a backslash join the next line
    into one turn (on a terminal and in scripted input); on a terminal, so do the lines of a
    paste (input that arrived together)."""
    if not interactive:
        line = sys.stdin.readline()
        if line == "":
            return None
        lines = [line.rstrip("\n")]
        while lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            more = sys.stdin.readline()
            if more == "":
                break
            lines.append(more.rstrip("\n"))
        return "\n".join(lines)
    lines = [input(">>> ")]
    while True:
        if lines[-1].endswith("\\"):
            lines[-1] = lines[-1][:-1]
            lines.append(input("... "))
        elif _pending_input():
            lines.append(input(""))
        else:
            return "\n".join(lines)


def repl(model, session, sampling: dict, stops: Sequence[str], stats_line, session_stats,
         interactive: bool, banner_text: str, harmony: bool | None = None) -> int:
    """The ``chat`` loop: read a turn, stream the reply, print the stats line (terminal only).
    Returns the number of turns refused with an ``error:`` line (a prompt over the context, a
    line that is not UTF-8, ...): a scripted chat exits with status 1 when some were.
    With ``stops``, each reply ends before the first stop string and the conversation keeps
    the text printed (neither the stop string nor what was generated with or after it).

    ``harmony``: None for a model whose replies are plain text; for gpt-oss's harmony format,
    whether to show the reasoning: each reply is split by
    :class:`~zipmoe_rt.cli_harmony.HarmonyReply` (the final channel printed) and kept in the
    conversation as its final text with the reasoning as ``thinking``.

    SIGINT is restored to Python's handler first: a shell starts background jobs (``cmd &``,
    ``nohup``) with SIGINT ignored, which a child inherits, and Ctrl-C would then do nothing.
    """
    try:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    except ValueError:   # not the main thread (embedded use)
        pass
    lenient_stdin()                  # a line that is not UTF-8: an error, then the next turn
    if interactive:
        try:
            import readline  # noqa: F401 - line editing and history for input()
        except ImportError:
            pass
        click.echo(banner_text, err=True)
        click.echo(REPL_HELP, err=True)
    eof_next = False                 # a Ctrl-D typed after lines typed ahead of the prompt
    failed = 0
    while True:
        try:
            ahead, eof = typed_ahead() if interactive and not eof_next else (None, False)
            if eof_next or (eof and ahead is None):
                raise EOFError
            eof_next = eof
            if ahead is not None:            # typed while the last reply streamed
                click.echo(f">>> {ahead}")
                line = ahead
            else:
                line = read_turn(interactive)
        except EOFError:
            click.echo("", err=True)          # Ctrl-D: leave the shell's prompt on a new line
            break
        except KeyboardInterrupt:
            click.echo("\n(use /quit or Ctrl-D to leave)", err=True)
            continue
        if line is None:
            break
        text = line.strip()
        if not text:
            continue
        if text.startswith("/") and "\n" not in text:
            cmd, _, arg = text.partition(" ")
            if cmd in ("/quit", "/exit", "/bye"):
                break
            if cmd == "/reset":
                session.reset()
                model.last_stats = None      # /stats speaks of replies in this conversation
                kept = (f"system prompt kept: {session.system!r}" if session.system
                        else "no system prompt")
                click.echo(f"(conversation cleared; {kept})", err=True)
            elif cmd == "/system":
                try:
                    utf8_text(arg, "/system")
                except ValueError as e:            # the prompt and conversation are kept
                    click.echo(f"error: {e}", err=True)
                    failed += 1
                    continue
                session.reset(system=arg.strip() or None)
                model.last_stats = None
                click.echo(f"(system prompt {'set' if arg.strip() else 'cleared'}; conversation "
                           f"cleared)", err=True)
            elif cmd == "/stats":
                click.echo(session_stats(model, session), err=True)
            elif cmd in ("/help", "/?"):
                click.echo(REPL_HELP, err=True)
            else:
                click.echo(f"unknown command {cmd}; /help lists them", err=True)
            continue
        reply = None
        if harmony is not None:
            from .cli_harmony import HarmonyReply
            reply = HarmonyReply(harmony)
        held = len(session.messages)
        streamed, eof, stopped, shown = None, False, False, []
        try:
            try:
                utf8_text(line, "input")
                pieces = session.send(line, skip_special_tokens=reply is None, **sampling)
            except ValueError as e:           # e.g. the conversation no longer fits the context
                hint = ("; /reset clears the conversation"
                        if "start a new conversation" in str(e) else "")
                click.echo(f"error: {e}{hint}", err=True)
                failed += 1
                continue
            if reply is not None:
                pieces = reply.filter(pieces)
            n_new = 0
            if interactive:
                msgs = ([{"role": "system", "content": session.system}] if session.system
                        else []) + session.messages + [{"role": "user", "content": line}]
                n_new = len(model.tokenizer.encode_chat(msgs, add_generation_prompt=True)) - \
                    len(session.state.token_ids)
            streamed = stop_at(prefill_notice(pieces, n_new), stops, model)
            for piece in streamed:
                click.echo(piece, nl=False)
                shown.append(piece)
                if interactive and eof_typed():      # Ctrl-D while the reply streams
                    eof = True                       # stopped as for Ctrl-C (finally)
                    click.echo(" [stopped]", nl=False)
                    break
        except KeyboardInterrupt:
            stopped = True
        finally:
            if streamed is not None:
                streamed.close()  # the generation records its statistics (cancelled) now
        if len(session.messages) == held:
            # Ctrl-C before the first reply token (the prompt was being prefilled): the
            # session withdrew the turn, so the conversation and its KV cache are as before
            click.echo(("\r" if interactive else "") + CANCELLED_TURN, err=True)
            continue
        if stopped:
            click.echo(" [stopped]", nl=False)
        if session.messages[-1].get("role") == "assistant":
            kept = reply.message() if reply is not None else session.messages[-1]
            if stops:     # the text printed: not a stop string, nor what came with or after it
                kept["content"] = "".join(shown)
            session.messages[-1] = kept                # (harmony: the final text, not markup)
        click.echo("")
        if interactive:
            click.secho(stats_line(model.last_stats), err=True, dim=True)
        if eof:
            break
    return failed


def prefill_notice(pieces: Iterator[str], n_new: int) -> Iterator[str]:
    """Pass ``pieces`` through; when standard error is a terminal and ``n_new`` (the tokens to
    prefill) is :data:`PREFILL_NOTICE_TOKENS` or more, show "(prefilling N tokens...)" until
    the first piece arrives, then erase it."""
    shown = n_new >= PREFILL_NOTICE_TOKENS and sys.stderr.isatty()
    if shown:
        click.echo(f"(prefilling {n_new} tokens...)", nl=False, err=True)
    try:
        for piece in pieces:
            if shown:
                click.echo("\r\033[K", nl=False, err=True)
                shown = False
            yield piece
    finally:
        if shown:
            click.echo("\r\033[K", nl=False, err=True)
        pieces.close()
