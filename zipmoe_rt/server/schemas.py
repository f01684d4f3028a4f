"""Request validation for the OpenAI-compatible server: JSON bodies in, plain dataclasses out.

Follows the OpenAI API reference for ``POST /v1/chat/completions`` and ``POST /v1/completions``
(fields, ranges, defaults); every refusal is an :class:`APIError` whose message names the
field (``param``), never a traceback. No ASGI import here, so it is usable (and testable)
without the server extra.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

__all__ = ["APIError", "Request", "parse_chat", "parse_completion", "flatten_content"]

#: the most stop strings a request may give (OpenAI allows 4; llama-server and vLLM more)
MAX_STOP = 16
#: the most ``top_logprobs`` per token (the OpenAI limit)
MAX_TOP_LOGPROBS = 20
ROLES = ("system", "developer", "user", "assistant", "tool")


class APIError(Exception):
    """An error answered as OpenAI's JSON error object with an HTTP status.

    Attributes:
        status: HTTP status (400 bad parameter, 401, 404, 405, 413, 429, 503...).
        message: what was wrong, naming the field when there is one.
        param: the request field at fault, or None.
        type: OpenAI's error type (``invalid_request_error``, ``authentication_error``, ...).
        code: a short machine-readable code or None.
    """

    def __init__(self, status: int, message: str, param: str | None = None,
                 type: str = "invalid_request_error", code: str | None = None):  # noqa: A002
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = (
            status, message, param, type, code)

    def body(self) -> dict:
        """``{"error": {"message", "type", "param", "code"}}`` (OpenAI's error shape)."""
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


@dataclass
class Request:
    """A validated generation request (chat or completion).

    Attributes:
        kind: ``"chat"`` or ``"completion"``.
        messages: chat messages (content flattened to str), or None.
        prompt: completion prompt, a str or token ids, or None.
        tools: OpenAI tool definitions passed to the chat template, or None.
        stream: answer with server-sent events.
        include_usage: ``stream_options.include_usage``.
        max_tokens: the most tokens to generate, or None (the rest of the context).
        sampling: keyword arguments of :meth:`zipmoe_rt.api.Model.sampling` set by the request
            (absent ones take the model's generation_config defaults).
        stop: stop strings (never part of the returned text).
        logprobs: None (off) or the number of top alternatives per token (0..20).
        model: the ``model`` field as sent (echoed back).
    """

    kind: str
    messages: list | None = None
    prompt: Any = None
    tools: list | None = None
    stream: bool = False
    include_usage: bool = False
    max_tokens: int | None = None
    sampling: dict = field(default_factory=dict)
    stop: list = field(default_factory=list)
    logprobs: int | None = None
    model: str | None = None


def _shown(v) -> str:
    """A request value as its JSON spelling (``true``, ``"hot"``, ``null``), cut to 60
    characters; ``inf`` and ``nan`` as Python writes them (JSON has no spelling)."""
    try:
        text = json.dumps(v, allow_nan=False)
    except (TypeError, ValueError):
        text = repr(v)
    return text if len(text) <= 60 else text[:57] + "..."


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


def _number(body: dict, name: str, lo: float, hi: float, lo_open: bool = False):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise _bad(name, f"expected a number, got {_shown(v)}")
    if (v <= lo if lo_open else v < lo) or v > hi:
        raise _bad(name, f"must be in {'(' if lo_open else '['}{lo}, {hi}], got {_shown(v)}")
    return float(v)


def _int(body: dict, name: str, lo: int, hi: int | None = None):
    v = body.get(name)
    if v is None:
        return None
    if isinstance(v, bool) or not isinstance(v, int):
        raise _bad(name, f"expected an integer, got {_shown(v)}")
    if v < lo or (hi is not None and v > hi):
        raise _bad(name, f"must be >= {lo}" + (f" and <= {hi}" if hi is not None else "")
                   + f", got {v}")
    return v


def _bool(body: dict, name: str, where: str = "") -> bool:
    v = body.get(name, False)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise _bad(where + name, f"expected true or false, got {_shown(v)}")
    return v


def _common(body: Any, kind: str) -> Request:
    if not isinstance(body, dict):
        raise APIError(400, "the request body must be a JSON object")
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise _bad("model", f"expected a string, got {_shown(model)}")
    req = Request(kind=kind, model=model)
    req.stream = _bool(body, "stream")
    so = body.get("stream_options")
    if so is not None:
        if not isinstance(so, dict):
            raise _bad("stream_options", "expected an object")
        if not req.stream:
            raise _bad("stream_options", "only allowed with stream: true")
        req.include_usage = _bool(so, "include_usage", "stream_options.")
    n = _int(body, "n", 1)
    if n not in (None, 1):
        raise _bad("n", f"only 1 choice per request is supported, got {n}")
    mt = _int(body, "max_completion_tokens", 1)
    req.max_tokens = mt if mt is not None else _int(body, "max_tokens", 1)
    s = req.sampling
    for name, lo, hi, lo_open in (("temperature", 0.0, 2.0, False),   # OpenAI's range
                                  ("top_p", 0.0, 1.0, True),
                                  ("min_p", 0.0, 1.0, False),
                                  ("repetition_penalty", 0.0, math.inf, True)):
        v = _number(body, name, lo, hi, lo_open)
        if v is not None:
            s[name] = v
    tk = body.get("top_k")
    if tk == -1:                       # vLLM's "off"
        s["top_k"] = 0
    elif tk is not None:
        s["top_k"] = _int(body, "top_k", 0)
    seed = body.get("seed")
    if seed is not None:
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise _bad("seed", f"expected an integer, got {_shown(seed)}")
        s["seed"] = seed % 2**63 if seed < 0 else seed
    for name in ("frequency_penalty", "presence_penalty"):
        v = _number(body, name, -2.0, 2.0)
        if v:
            raise _bad(name, "not supported (use repetition_penalty); only 0 is accepted")
    lb = body.get("logit_bias")
    if lb is not None and lb != {}:     # applying it is not implemented: never ignore it
        raise _bad("logit_bias", "not supported by this server; leave logit_bias out (or {})")
    stop = body.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None:
        if (not isinstance(stop, list) or not all(isinstance(x, str) and x for x in stop)
                or len(stop) > MAX_STOP):
            raise _bad("stop", f"expected a non-empty string or a list of at most {MAX_STOP} "
                       f"non-empty strings, got {_shown(body.get('stop'))}")
        req.stop = list(stop)
    rf = body.get("response_format")
    if rf is not None and not (isinstance(rf, dict) and rf.get("type") == "text"):
        raise _bad("response_format", "structured output (json_object, json_schema) is not "
                   "supported by this server; leave response_format out")
    return req


def flatten_content(content: Any, where: str) -> Any:
    """A message's ``content`` as the chat template expects it: a str stays, a list of
    ``{"type": "text", "text": ...}`` parts is joined, None stays None.

    Raises:
        APIError: (400) a non-text part (image, audio, file) or another type; ``where`` names
            the message.
    """
    if content is None or isinstance(content, str):
        return content
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(
                    part.get("text"), str):
                raise _bad(f"{where}.content[{j}]", "only text parts ({\"type\": \"text\", "
                           "\"text\": ...}) are supported")
            texts.append(part["text"])
        return "".join(texts)
    raise _bad(f"{where}.content", f"expected a string or a list of text parts, got "
               f"{type(content).__name__}")


def parse_chat(body: Any) -> Request:
    """Validate a ``/v1/chat/completions`` body.

    Raises:
        APIError: (400) a missing or bad field, named in the message and ``param``.
    """
    req = _common(body, "chat")
    msgs = body.get("messages")
    if not isinstance(msgs, list) or not msgs:
        raise _bad("messages", "expected a non-empty list of messages")
    out = []
    for i, m in enumerate(msgs):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise _bad(where, "expected an object with 'role' and 'content'")
        role = m.get("role")
        if role not in ROLES:
            raise _bad(f"{where}.role",
                       f"expected one of {', '.join(ROLES)}, got {_shown(role)}")
        m = dict(m, content=flatten_content(m.get("content"), where))
        if m["content"] is None and not m.get("tool_calls"):
            raise _bad(f"{where}.content", "missing (only an assistant message with tool_calls "
                       "may leave it out)")
        if role == "developer":
            m["role"] = "system"
        if m.get("tool_calls") is not None:
            _check_tool_calls(m["tool_calls"], where)
        out.append(m)
    req.messages = out
    lp = body.get("logprobs")
    if lp is not None and not isinstance(lp, bool):
        raise _bad("logprobs", f"expected true or false, got {_shown(lp)}")
    top = _int(body, "top_logprobs", 0, MAX_TOP_LOGPROBS)
    if top is not None and not lp:
        raise _bad("top_logprobs", "needs logprobs: true")
    req.logprobs = (top or 0) if lp else None
    tools = body.get("tools")
    if tools is not None:
        if not isinstance(tools, list) or not all(
                isinstance(t, dict) and t.get("type") == "function" and isinstance(
                    t.get("function"), dict) and isinstance(t["function"].get("name"), str)
                for t in tools):
            raise _bad("tools", "expected a list of {\"type\": \"function\", \"function\": "
                       "{\"name\": ..., \"parameters\": ...}}")
    choice = body.get("tool_choice")
    if choice not in (None, "auto", "none"):
        raise _bad("tool_choice", f"only 'auto' and 'none' are supported, got {_shown(choice)}")
    req.tools = tools if tools and choice != "none" else None
    return req


def _check_tool_calls(calls: Any, where: str) -> None:
    if not isinstance(calls, list):
        raise _bad(f"{where}.tool_calls", "expected a list")
    for j, c in enumerate(calls):
        fn = c.get("function") if isinstance(c, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise _bad(f"{where}.tool_calls[{j}]", "expected {\"type\": \"function\", "
                       "\"function\": {\"name\": ..., \"arguments\": ...}}")


def parse_completion(body: Any) -> Request:
    """Validate a ``/v1/completions`` body (``prompt``: a string, a list of one string, or a
    list of token ids; legacy ``logprobs``: 0..5 alternatives).

    Raises:
        APIError: (400) a missing or bad field, named in the message and ``param``.
    """
    req = _common(body, "completion")
    p = body.get("prompt")
    if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
        p = p[0]                           # a batch of one
    ok = (isinstance(p, str) and p) or (isinstance(p, list) and p and all(
        isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in p))
    if not ok:
        raise _bad("prompt", "expected a non-empty string or a non-empty list of token ids "
                   "(one prompt per request)")
    req.prompt = p
    for name in ("echo",):
        if _bool(body, name):
            raise _bad(name, "not supported")
    if body.get("suffix"):
        raise _bad("suffix", "not supported")
    best = _int(body, "best_of", 1)
    if best not in (None, 1):
        raise _bad("best_of", "only 1 is supported")
    lp = _int(body, "logprobs", 0, 5)
    req.logprobs = lp
    return req
