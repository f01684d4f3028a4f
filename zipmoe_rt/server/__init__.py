"""``zipmoe-rt serve``: an OpenAI-compatible HTTP server (optional extra ``server``).

Modules: :mod:`.app` (Starlette routes, auth, errors), :mod:`.schemas` (request validation),
:mod:`.worker` (model loading, the one-at-a-time request queue, prompt-prefix KV reuse),
:mod:`.streaming` (response objects and server-sent events), :mod:`.textproc` (stop strings,
tool calls), ``static/index.html`` (the chat page at ``/``).

The core runtime never imports this package; it needs ``pip install 'zipmoe-rt[server]'``
(Starlette and uvicorn).
"""
from __future__ import annotations

import signal

__all__ = ["require_server_extra", "serve", "EXTRA_HINT", "ModelLoadError"]

EXTRA_HINT = ("pip install 'zipmoe-rt[server]' (from a source checkout: pip install -e "
              "'.[server]')")


def require_server_extra() -> None:
    """Check that the server's packages import.

    Raises:
        RuntimeError: Starlette or uvicorn is missing; the message says what to install.
    """
    missing = []
    for mod in ("starlette", "uvicorn"):
        try:
            __import__(mod)
        except ImportError:
            missing.append(mod)
    if missing:
        raise RuntimeError(f"zipmoe-rt serve needs {' and '.join(missing)}, which are not "
                           f"installed: {EXTRA_HINT}")


def serve(loader, *, host: str = "127.0.0.1", port: int = 8080, api_key: str | None = None,
          cors: bool = False, queue_size: int = 16, model_id: str | None = None,
          log_level: str = "info", ctx_size: int | None = None, sock=None) -> None:
    """Run the server until interrupted (blocking). The model is loaded in the background
    while the server already answers (``/health`` is 503 until it is ready).

    Args:
        loader: a callable returning a :class:`~zipmoe_rt.api.Model` (e.g. a
            ``functools.partial`` of :func:`zipmoe_rt.load`).
        host, port: where to listen (default 127.0.0.1:8080, this machine only).
        api_key: require ``Authorization: Bearer KEY`` (see :func:`.app.create_app`).
        cors: allow cross-origin browser requests.
        queue_size: requests that may wait behind the running one (429 above).
        model_id: the model id to report (default: the model's name).
        ctx_size: tokens of prompt plus reply per request (default: the model's
            ``max_position_embeddings``).
        sock: a socket already bound to the address (``serve`` binds it first, to report an
            address in use, or the port the system chose for port 0), else uvicorn binds
            ``host``:``port``.

    Raises:
        RuntimeError: the server extra is not installed.
        OSError: the address is in use or cannot be bound.
        ModelLoadError: the model failed to load (the server stopped; llama.cpp's server
            exits likewise); the message is the loader's error.
    """
    require_server_extra()
    import uvicorn

    from .app import create_app
    from .worker import ModelHost

    failed: list[str] = []

    def stop(message: str) -> None:
        failed.append(message)
        server.should_exit = True

    model_host = ModelHost(loader, queue_size=queue_size, ctx_size=ctx_size, on_load_error=stop)
    app = create_app(model_host, api_key=api_key, cors=cors, model_id=model_id)

    class Server(uvicorn.Server):
        async def startup(self, sockets=None):
            await super().startup(sockets)
            log_started = getattr(self, "_log_started_message", None)
            if sockets is not None and self.started and log_started is not None:
                log_started(sockets)     # "Uvicorn running on ..." as when uvicorn binds

        async def shutdown(self, sockets=None):
            # end the open replies first (an error event, then [DONE]) so that the
            # connections close now rather than being cancelled mid-stream
            model_host.shut_down()
            await super().shutdown(sockets)

    server = Server(uvicorn.Config(app, host=host, port=port, log_level=log_level,
                                   timeout_graceful_shutdown=3))
    caught = _run_catching_signals(server, None if sock is None else [sock])
    if failed:
        raise ModelLoadError(f"the model failed to load: {failed[0]}")
    for sig in caught[:1]:       # as the process would have taken it, now the loop is gone
        signal.raise_signal(sig)


def _run_catching_signals(server, sockets=None) -> list:
    """``server.run(sockets)``; a SIGINT or SIGTERM that stops it is returned rather than taken
    inside the event loop (uvicorn raises it again as it finishes, which would end the loop
    with an exception in the middle of its cleanup and print tracebacks)."""
    import threading

    caught: list = []
    if threading.current_thread() is not threading.main_thread():
        server.run(sockets)
        return caught

    def record(sig, frame):
        caught.append(sig)
        server.should_exit = True

    signals = (signal.SIGINT, signal.SIGTERM)
    previous = {sig: signal.signal(sig, record) for sig in signals}
    try:
        server.run(sockets)
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return caught


class ModelLoadError(RuntimeError):
    """``serve``: the model did not load; the server stopped."""
