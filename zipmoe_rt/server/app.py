"""The ASGI application (Starlette): routes, authentication, body limit, JSON errors.

Endpoints (OpenAI API reference shapes): ``GET /health``, ``GET /v1/models``,
``POST /v1/chat/completions``, ``POST /v1/completions`` (streamed as server-sent events when
``stream`` is true), ``POST /tokenize``, ``POST /detokenize`` (llama-server's and vLLM's field
names) and the chat page at ``/``.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
import uuid
from importlib import resources

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from .schemas import APIError, parse_chat, parse_completion
from .streaming import sse_events, chat_response, completion_response
from .worker import Job, ModelHost

__all__ = ["create_app", "MAX_BODY_BYTES"]

#: the largest request body accepted (413 above it)
MAX_BODY_BYTES = 8 * 2**20
#: paths open without the API key
PUBLIC = ("/", "/health")


def _error(e: APIError) -> JSONResponse:
    headers = {"WWW-Authenticate": "Bearer"} if e.status == 401 else None
    return JSONResponse(e.body(), status_code=e.status, headers=headers)


async def _json_body(request: Request, limit: int):
    n = request.headers.get("content-length")
    if n is not None and n.isdigit() and int(n) > limit:
        raise APIError(413, f"the request body is {int(n)} bytes; the limit is {limit}",
                       type="invalid_request_error", code="body_too_large")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise APIError(413, f"the request body is over the limit of {limit} bytes",
                           code="body_too_large")
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    except RecursionError:
        raise APIError(400, "the request body nests arrays or objects too deeply") from None
    _check_unicode(body, "")
    return body


#: nesting a request needs (messages[i].content[j], tool schemas); deeper is refused
MAX_DEPTH = 64


def _check_unicode(v, path: str, depth: int = 0) -> None:
    """Refuse a string with a lone surrogate (JSON's ``"\\ud800"`` escapes decode to one, and
    no text encoding can hold it) or nesting deeper than :data:`MAX_DEPTH`, with a 400 naming
    the field (``messages[0].content``)."""
    if depth > MAX_DEPTH:
        raise APIError(400, f"{path or 'the request body'}: nested more than {MAX_DEPTH} "
                       f"levels deep", param=path or None)
    if isinstance(v, str):
        try:
            v.encode("utf-8")
        except UnicodeEncodeError as e:
            raise APIError(400, f"{path or 'the request body'}: not valid Unicode (a lone "
                           f"surrogate \\u{ord(v[e.start]):04x} at character {e.start})",
                           param=path or None) from None
    elif isinstance(v, dict):
        for k, x in v.items():
            _check_unicode(k, path or "the request body", depth + 1)
            _check_unicode(x, f"{path}.{k}" if path else str(k), depth + 1)
    elif isinstance(v, list):
        for i, x in enumerate(v):
            _check_unicode(x, f"{path}[{i}]", depth + 1)


def create_app(host: ModelHost, *, api_key: str | None = None, cors: bool = False,
               model_id: str | None = None, max_body: int = MAX_BODY_BYTES) -> Starlette:
    """The server's ASGI app around a :class:`~zipmoe_rt.server.worker.ModelHost`.

    Args:
        host: loads and runs the model (started by the app's startup).
        api_key: when set, every path but ``/`` and ``/health`` needs ``Authorization: Bearer
            KEY`` (401 otherwise).
        cors: allow cross-origin browser requests from any origin (off by default).
        model_id: the id listed by ``/v1/models`` (default: the model's name).
        max_body: the largest request body in bytes (413 above).

    Returns:
        a Starlette application; run it with uvicorn (:func:`zipmoe_rt.server.serve`).
    """

    def name() -> str:
        return model_id or (host.model.name if host.model else "zipmoe-rt")

    async def health(request: Request):
        if host.status == "ok":
            return JSONResponse({"status": "ok", "model": name(), "pending": host.pending,
                                 "served": host.served})
        body = {"status": host.status}
        if host.error:
            body["error"] = host.error
        return JSONResponse(body, status_code=503)

    async def models(request: Request):
        host.ready()
        return JSONResponse({"object": "list", "data": [{
            "id": name(), "object": "model", "created": int(time.time()), "owned_by": "zipmoe-rt",
            "max_model_len": host.context_length}]})

    async def page(request: Request):
        html = resources.files(__package__).joinpath("static/index.html").read_text("utf-8")
        return HTMLResponse(html)

    def _prompt_ids(req) -> list:
        """The prompt's token ids (a chat rendered by the model's template); run in a worker
        thread. Raises APIError 400 for a prompt or messages that do not render or encode."""
        tok = host.model.tokenizer
        try:
            if req.kind == "chat":
                ids = tok.encode_chat(req.messages, add_generation_prompt=True)
                if not req.tools:
                    return ids
                with_tools = tok.encode_chat(req.messages, add_generation_prompt=True,
                                             tools=req.tools)
                if with_tools == ids:     # the template ignored them: the model never sees them
                    raise APIError(400, "tools: this model's chat template does not use them (it "
                                   "renders the same prompt with and without tools); leave "
                                   "tools out, or serve a model whose template takes tools",
                                   param="tools")
                return with_tools
            if isinstance(req.prompt, str):
                return tok.encode(req.prompt)
            cfg = host.model.net.config
            vocab = (cfg.get("vocab_size") if isinstance(cfg, dict)
                     else getattr(cfg, "vocab_size", None)) or tok.vocab_size
            bad = [t for t in req.prompt if t >= vocab]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is out of range (vocabulary "
                               f"size {vocab})", param="prompt")
            return list(req.prompt)
        except (ValueError, TypeError) as e:
            raise APIError(400, str(e), param="messages" if req.kind == "chat" else "prompt") \
                from None

    async def generate(request: Request, kind: str):
        body = await _json_body(request, max_body)
        req = parse_chat(body) if kind == "chat" else parse_completion(body)
        host.ready()
        # a chat template renders (and a long prompt encodes) off the event loop: a slow one
        # must not hold the other requests; its errors come back here as they are raised
        ids = await asyncio.to_thread(_prompt_ids, req)
        if not ids:
            raise APIError(400, "prompt: empty", param="prompt")
        ctx = host.context_length
        if len(ids) >= ctx:
            raise APIError(400, f"the prompt is {len(ids)} tokens; the model's context is {ctx} "
                           f"tokens (prompt plus reply)", param="messages" if kind == "chat"
                           else "prompt", code="context_length_exceeded")
        room = ctx - len(ids)
        from zmoe.constants import Keys
        gen_cfg = host.model.source.metadata.get(Keys.Generation.CONFIG) or {}
        from ..sampling import GenerationConfigError, SamplingParams
        try:
            params = SamplingParams.from_generation_config(
                gen_cfg, where=str(host.model.path),
                max_tokens=min(req.max_tokens or room, room), **req.sampling)
        except GenerationConfigError as e:     # the model file's fault, not the request's
            import logging
            logging.getLogger("uvicorn.error").error("%s", e)
            raise APIError(500, str(e), type="server_error") from None
        except ValueError as e:
            raise APIError(400, str(e)) from None
        fmt = None
        if req.tools:
            from .textproc import tool_format
            fmt = tool_format(host.model.tokenizer.chat_template)
        if kind == "chat":          # gpt-oss: channels and tool calls split with or without tools
            from .harmony import is_harmony
            if is_harmony(host.model.tokenizer.chat_template):
                fmt = "harmony"
        loop = asyncio.get_running_loop()
        events: asyncio.Queue = asyncio.Queue()

        def emit(ev):
            try:
                loop.call_soon_threadsafe(events.put_nowait, ev)
            except RuntimeError:       # the loop is gone (server shutting down)
                pass

        meta = {"id": f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex[:24]}",
                "created": int(time.time()), "model": req.model or name()}
        job = Job(ids=ids, params=params, emit=emit, stops=req.stop, logprobs=req.logprobs,
                  tool_format=fmt, tools=req.tools, label=meta["id"])
        host.submit(job)
        if req.stream:
            async def gen():
                try:
                    async for chunk in sse_events(req, meta, events):
                        yield chunk
                        # let the event loop run between chunks: when the worker is ahead,
                        # the queued chunks would otherwise be written in one burst, past a
                        # connection the client has closed (asyncio then logs "socket.send()
                        # raised exception." for each), before its disconnect can be seen
                        await asyncio.sleep(0)
                finally:
                    job.cancel.set()     # finished, or the client went away: stop at once
            return StreamingResponse(gen(), media_type="text/event-stream",
                                     headers={"Cache-Control": "no-cache"})
        watch = asyncio.ensure_future(_watch_disconnect(request, job))
        try:
            pieces, lps = [], []
            while True:
                ev = await events.get()
                if ev[0] == "text":
                    pieces.append(ev[1])
                    lps.extend(ev[2] or ())
                elif ev[0] == "error":
                    raise ev[1]
                elif ev[0] == "cancelled":      # the client has gone: nobody reads this
                    return Response(status_code=499)
                else:
                    result = ev[1]
                    break
        finally:
            job.cancel.set()
            watch.cancel()
        build = chat_response if kind == "chat" else completion_response
        return JSONResponse(build(req, meta, result, lps))

    async def chat(request: Request):
        return await generate(request, "chat")

    async def completions(request: Request):
        return await generate(request, "completion")

    async def tokenize(request: Request):
        body = await _json_body(request, max_body)
        host.ready()
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object")
        tok = host.model.tokenizer
        if "messages" in body:
            req = parse_chat({"messages": body["messages"]})
            ids = await asyncio.to_thread(_prompt_ids, req)      # as for a generation
        else:
            text = body.get("content", body.get("prompt"))
            if not isinstance(text, str):
                raise APIError(400, "content: expected a string (or 'messages')", param="content")
            special = body.get("add_special", body.get("add_special_tokens", True))
            if not isinstance(special, bool):
                raise APIError(400, "add_special: expected true or false", param="add_special")
            ids = await asyncio.to_thread(tok.encode, text, add_special_tokens=special)
        return JSONResponse({"tokens": ids, "count": len(ids),
                             "max_model_len": host.context_length})

    async def detokenize(request: Request):
        body = await _json_body(request, max_body)
        host.ready()
        ids = body.get("tokens") if isinstance(body, dict) else None
        vocab = host.model.tokenizer.vocab_size
        if not isinstance(ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < vocab for t in ids):
            raise APIError(400, f"tokens: expected a list of token ids in [0, {vocab})",
                           param="tokens")
        return JSONResponse({"content": host.model.tokenizer.decode(ids)})

    async def on_api_error(request, exc: APIError):
        return _error(exc)

    async def on_http_error(request, exc: HTTPException):
        path = request.url.path
        if exc.status_code == 404 and path.rstrip("/") in NOT_SUPPORTED:
            # llama.cpp's server answers 501 to an embeddings request it was not started for
            return _error(APIError(501, f"{path}: {NOT_SUPPORTED[path.rstrip('/')]}; this "
                                   f"server serves {ENDPOINTS}", type="not_supported_error"))
        kind = {404: "not_found_error", 405: "invalid_request_error"}.get(
            exc.status_code, "invalid_request_error")
        msg = {404: f"{path}: no such endpoint (this server serves {ENDPOINTS})",
               405: f"{request.method} is not allowed on {path}"}.get(
            exc.status_code, str(exc.detail))
        return _error(APIError(exc.status_code, msg, type=kind))

    async def on_crash(request, exc: Exception):
        return _error(APIError(500, f"internal error: {type(exc).__name__}: {exc}",
                               type="server_error"))

    middleware = []
    if cors:
        middleware.append(Middleware(CORSMiddleware, allow_origins=["*"], allow_methods=["*"],
                                     allow_headers=["*"]))
    if api_key:
        middleware.append(Middleware(_KeyCheck, key=api_key))

    app = Starlette(routes=[
        Route("/", page, methods=["GET"]),
        Route("/health", health, methods=["GET"]),
        Route("/v1/models", models, methods=["GET"]),
        Route("/v1/chat/completions", chat, methods=["POST"]),
        Route("/v1/completions", completions, methods=["POST"]),
        Route("/tokenize", tokenize, methods=["POST"]),
        Route("/detokenize", detokenize, methods=["POST"]),
    ], middleware=middleware, exception_handlers={
        APIError: on_api_error, HTTPException: on_http_error, Exception: on_crash},
        lifespan=_lifespan(host))
    app.state.host = host
    return app


#: the endpoints, as the 404 and 501 errors list them
ENDPOINTS = ("GET /v1/models, POST /v1/chat/completions, POST /v1/completions, POST /tokenize, "
             "POST /detokenize, GET /health")
#: OpenAI endpoints a client may try that a text-generation server does not have: 501
NOT_SUPPORTED = {
    "/v1/embeddings": "embeddings are not supported (the model generates text)",
    "/embeddings": "embeddings are not supported (the model generates text)",
    "/embedding": "embeddings are not supported (the model generates text)",
    "/v1/responses": "the Responses API is not supported; use /v1/chat/completions",
}


def _lifespan(host: ModelHost):
    @contextlib.asynccontextmanager
    async def lifespan(app):
        host.start()
        try:
            yield
        finally:
            host.close()
    return lifespan


async def _watch_disconnect(request: Request, job: Job) -> None:
    """Set ``job.cancel`` when the client disconnects (the body is already read)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel.set()
            return


class _KeyCheck:
    """ASGI middleware: ``Authorization: Bearer KEY`` on every path but :data:`PUBLIC`
    (CORS preflight ``OPTIONS`` requests pass, as browsers send them without credentials)."""

    def __init__(self, app, key: str):
        self.app, self.key = app, key.encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] not in PUBLIC and scope["method"] != "OPTIONS":
            auth = dict(scope["headers"]).get(b"authorization", b"")
            scheme, _, given = auth.partition(b" ")
            if scheme.lower() != b"bearer" or not hmac.compare_digest(given.strip(), self.key):
                resp = _error(APIError(401, "missing or wrong API key (send 'Authorization: "
                                       "Bearer KEY')", type="authentication_error",
                                       code="invalid_api_key"))
                await resp(scope, receive, send)
                return
        await self.app(scope, receive, send)
