"""The ``zipmoe-rt serve`` verb: the OpenAI-compatible HTTP server of :mod:`zipmoe_rt.server`.
Registered on :func:`zipmoe_rt.cli.main`, which imports this module; the server package itself
(and Starlette/uvicorn) is imported only when the command runs."""
from __future__ import annotations

import functools
from pathlib import Path

import click

from .cli_types import ModelPath
from .cli import (CliError, check_budget_options, engine_options, friendly_errors,
                  load_from_options, main)


@main.command()
@click.argument("model", required=False, type=ModelPath(path_type=Path, dir_okay=False))
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to listen on (0.0.0.0 exposes the server to the network)")
@click.option("--port", type=click.IntRange(0, 65535), default=8080, show_default=True,
              help="port to listen on; 0: a free port the system chooses (printed)")
@click.option("--api-key", default=None, metavar="KEY", callback=lambda c, p, v: _api_key(v),
              help="require 'Authorization: Bearer KEY' on the API (default: no key)")
@click.option("--cors", is_flag=True, help="allow cross-origin requests from browsers (any origin)")
@click.option("--queue", "queue_size", type=click.IntRange(min=0), default=16, show_default=True,
              help="requests that may wait while one runs; more get HTTP 429")
@click.option("--model-id", default=None, help="model id reported by /v1/models "
              "[default: the model's name]")
@click.option("-c", "--ctx-size", "ctx_size", type=click.IntRange(min=1), default=None,
              help="tokens of prompt plus reply per request (a longer prompt gets HTTP 400) "
                   "[default: the model's max_position_embeddings]")
@click.option("--no-verify", is_flag=True,
              help="skip CRC checks of pieces read from the .zmoe (not recommended)")
@engine_options
@friendly_errors
def serve(model, host, port, api_key, cors, queue_size, model_id, ctx_size, **kw):
    """OpenAI-compatible HTTP server: /v1/chat/completions, /v1/completions, /v1/models,
    /health, /tokenize, /detokenize, and a chat page at /.

    Requests run one at a time (the rest wait in a queue of --queue); the KV cache of the
    previous request is reused for a shared prompt prefix. Needs the server extra: pip install
    'zipmoe-rt[server]'. MODEL: a .zmoe file (default: the bundled SmolLM2 MoE, built on first
    use).
    """
    from .server import require_server_extra, serve as run_server
    try:
        require_server_extra()
    except RuntimeError as e:
        raise CliError(str(e)) from None
    from . import kernels
    if kernels.USER_WAIT_POLICY is None:
        # a server idles between requests: its kernel threads must sleep, not spin, meanwhile
        kernels.USER_WAIT_POLICY = "PASSIVE"
        kernels.set_wait_policy("passive")
    check_budget_options(kw)          # here: the model loads in another thread
    check_memory_values(kw)
    if model is not None and not model.exists():
        raise CliError(f"{model}: no such file")
    sock = check_listen(host, port)
    try:
        if model is not None:            # a file that is not a model: one line, before starting
            from zmoe.reader import ZmoeReader
            with ZmoeReader(model, use_mmap=False) as reader:
                # a sampling value of the file out of range: refused now, not at each request
                check_generation_config(reader.metadata, model)
        port = sock.getsockname()[1]     # --port 0: the port the system chose
        shown = f"[{host}]" if ":" in host else host
        click.echo(f"zipmoe-rt serve: http://{shown}:{port}/ (loading "
                   f"{model or 'the default model'}; /health answers 503 until it is ready)",
                   err=True)
        from .server import ModelLoadError
        _sigterm_stops_quietly()
        try:
            run_server(functools.partial(load_and_check, model, kw, ctx_size), host=host,
                       port=port, api_key=api_key, cors=cors, queue_size=queue_size,
                       model_id=model_id, ctx_size=ctx_size, sock=sock)
        except ModelLoadError as e:
            raise CliError(str(e)) from None
    finally:
        sock.close()


def load_and_check(model, kw, ctx_size):
    """``serve``'s loader: the model as ``run`` and ``chat`` load it, then one short forward on
    a scratch cache (:func:`~zipmoe_rt.cli_repl.warm_up`), so that a file whose weights fail
    their CRC-32 (or do not decode) fails the load, and ``serve`` ends with one ``error:`` line,
    instead of saying it is ready and failing every request. The forward also compiles (or
    loads) the kernels, so the first request does not wait for them.

    Raises:
        whatever :func:`~zipmoe_rt.cli.load_from_options`, :func:`check_generation_config` (the
        default model's; a file given is checked before the server starts) or the forward raises (e.g. ``zmoe.ChecksumError``); the model is closed then.
    """
    from .cli_repl import warm_up
    m = load_from_options(model, kw, context=ctx_size)
    try:
        if model is None:     # a file given was checked before the server started
            check_generation_config(m.source.metadata, m.path)
        plan = m.memory_plan         # the warm-up prefill fits the context, as for run/chat
        m.ctx_size = min(x for x in (ctx_size, plan and plan.context, 2**31 - 1) if x)
        try:
            warm_up(m, notice=False)
        finally:
            m.ctx_size = None        # each request's context is the server's (serve -c)
    except BaseException:
        m.close()
        raise
    return m


def check_memory_values(kw) -> None:
    """Read ``--memory-limit`` and ``--memory-budget`` (``kw``) before the server listens, as
    ``run`` reads them before it loads: a value that cannot be read, is not positive or passes
    1 PB is one ``error:`` line now, not after "listening" (whether a readable value fits the
    model is decided when it loads; a budget in % needs the model too).

    Raises:
        CliError: naming the option and the value.
    """
    from .engine.limit import parse_limit
    from .loading import parse_size
    try:
        if kw.get("memory_limit") is not None:
            parse_limit(kw["memory_limit"])
        budget = kw.get("memory_budget")
        if budget is not None and not str(budget).strip().endswith("%"):
            parse_size(budget)
    except ValueError as e:
        raise CliError(str(e)) from None


def check_generation_config(metadata: dict, path) -> None:
    """Refuse a model whose file's ``generation.config`` has a sampling value out of range
    that a request uses when it does not set that field, as ``run`` refuses it without the
    option (:meth:`~zipmoe_rt.sampling.SamplingParams.from_generation_config`): otherwise the
    server would start and answer such requests with an error.

    Args:
        metadata: the file's metadata (``ZmoeReader.metadata``, ``Model.source.metadata``).
        path: the model file, named in the error.
    Raises:
        GenerationConfigError: naming the file, ``generation.config`` and the field, and that
            requests would fail (``"m.zmoe: generation.config: top_p: must be in [0.0, 1.0],
            got 7 (...)"``).
    """
    from zmoe.constants import Keys

    from .sampling import GenerationConfigError, SamplingParams
    try:
        SamplingParams.from_generation_config(metadata.get(Keys.Generation.CONFIG) or {},
                                              where=str(path))
    except GenerationConfigError as e:
        raise GenerationConfigError(f"{e} (every request that does not set this field would "
                                    f"fail; fix the model file)") from None


def check_listen(host: str, port: int):
    """Bind ``host``:``port`` (with ``SO_REUSEADDR``, as uvicorn binds) before anything
    loads, so that an address in use or a host that does not resolve is one ``error:`` line
    (llama.cpp's server: "couldn't bind HTTP server socket") rather than a log of the server
    starting and stopping. The server then listens on this socket: with port 0 its port is
    the one the system chose, which ``serve`` prints.

    Returns:
        the bound socket (not listening yet); the caller closes it.

    Raises:
        CliError: the host does not resolve, or the address cannot be bound (in use, not
            this machine's, a port below 1024 without the right); the message names
            ``--host`` / ``--port``.
    """
    import socket
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port,
                                                          type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise CliError(f"--host {host}: not an address or a host name this machine resolves "
                       f"({getattr(e, 'strerror', None) or e})") from None
    s = socket.socket(family, kind, proto)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        s.bind(addr)
    except OSError as e:
        s.close()
        raise CliError(f"--host/--port: cannot listen on {host}:{port}: "
                       f"{e.strerror or e}") from None
    return s


def _api_key(key: str | None) -> str | None:
    """``--api-key``: a key of at least one visible character. An empty or blank one (an
    unset shell variable, ``--api-key "$KEY"``) would leave the API open without a word.

    Raises:
        click.BadParameter: empty or only white space.
    """
    if key is not None and not key.strip():
        raise click.BadParameter("empty; give the key clients must send, or leave the "
                                 "option out for a server without a key")
    return key


def _sigterm_stops_quietly() -> None:
    """SIGTERM (``kill``, ``docker stop``, a service manager) is a normal stop for a server:
    uvicorn shuts down gracefully and raises the signal again, which then ends the process with
    status 0 instead of the ``interrupted`` / 130 of Ctrl-C."""
    import signal

    def handler(signum, frame):
        raise SystemExit(0)
    try:
        signal.signal(signal.SIGTERM, handler)
    except ValueError:  # not the main thread (embedded use)
        pass
