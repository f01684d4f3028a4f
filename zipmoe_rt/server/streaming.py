"""Response bodies: OpenAI's ``chat.completion`` / ``text_completion`` objects and their
streamed form (server-sent events: ``data: {chunk}`` lines, then ``data: [DONE]``).

Shapes follow the OpenAI API reference (chat completion object, chat completion chunk object,
completions object), including ``usage.prompt_tokens_details.cached_tokens`` and, with
``stream_options.include_usage``, a last chunk with empty ``choices`` and the usage.
"""
from __future__ import annotations

import asyncio
import json

__all__ = ["sse_events", "chat_response", "completion_response", "usage"]


def usage(result: dict) -> dict:
    """OpenAI's ``usage`` object from a worker result (prompt tokens count the cached ones)."""
    p, c = result["prompt_tokens"], result["completion_tokens"]
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c,
            "prompt_tokens_details": {"cached_tokens": result["cached_tokens"]}}


def _legacy_logprobs(entries: list, offset0: int = 0) -> dict | None:
    """The completions API's ``logprobs`` (``tokens``, ``token_logprobs``, ``top_logprobs``,
    ``text_offset``) from chat-style entries."""
    if entries is None:
        return None
    out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    pos = offset0
    for e in entries:
        out["tokens"].append(e["token"])
        out["token_logprobs"].append(e["logprob"])
        out["top_logprobs"].append({t["token"]: t["logprob"] for t in e["top_logprobs"]})
        out["text_offset"].append(pos)
        pos += len(e["token"])
    return out


def chat_response(req, meta: dict, result: dict, lps: list) -> dict:
    """A ``chat.completion`` object."""
    msg = {"role": "assistant", "content": result["text"]}
    if result.get("reasoning"):         # gpt-oss's analysis channel
        msg["reasoning_content"] = result["reasoning"]
    if result.get("tool_calls"):
        msg["tool_calls"] = result["tool_calls"]
        msg["content"] = result["text"] or None
    return {"id": meta["id"], "object": "chat.completion", "created": meta["created"],
            "model": meta["model"], "choices": [{
                "index": 0, "message": msg, "finish_reason": result["finish_reason"],
                "logprobs": {"content": lps} if req.logprobs is not None else None}],
            "usage": usage(result)}


def completion_response(req, meta: dict, result: dict, lps: list) -> dict:
    """A ``text_completion`` object."""
    return {"id": meta["id"], "object": "text_completion", "created": meta["created"],
            "model": meta["model"], "choices": [{
                "index": 0, "text": result["text"], "finish_reason": result["finish_reason"],
                "logprobs": _legacy_logprobs(lps) if req.logprobs is not None else None}],
            "usage": usage(result)}


def _sse(obj) -> bytes:
    return b"data: " + json.dumps(obj, ensure_ascii=False).encode("utf-8") + b"\n\n"


async def sse_events(req, meta: dict, events: asyncio.Queue):
    """Yield the SSE byte chunks of a streamed reply from the worker's ``events`` queue.

    A worker error after the stream started is sent as a ``data: {"error": ...}`` event
    (the status line has gone already), then ``data: [DONE]``.
    """
    chat = req.kind == "chat"
    base = {"id": meta["id"], "object": "chat.completion.chunk" if chat else "text_completion",
            "created": meta["created"], "model": meta["model"]}
    extra = {"usage": None} if req.include_usage else {}
    offset = 0

    def chunk(delta_or_text, finish=None, lps=None):
        nonlocal offset
        if chat:
            choice = {"index": 0, "delta": delta_or_text, "finish_reason": finish,
                      "logprobs": {"content": lps} if lps is not None else None}
        else:
            choice = {"index": 0, "text": delta_or_text, "finish_reason": finish,
                      "logprobs": _legacy_logprobs(lps, offset) if lps is not None else None}
            offset += len(delta_or_text)
        return _sse({**base, "choices": [choice], **extra})

    if chat:
        yield chunk({"role": "assistant", "content": ""})
    while True:
        ev = await events.get()
        if ev[0] == "text":
            text, lps = ev[1], ev[2]
            if chat:
                yield chunk({"content": text}, lps=lps)
            else:
                yield chunk(text, lps=lps)
        elif ev[0] == "error":
            yield _sse(ev[1].body())
            break
        elif ev[0] == "cancelled":
            return
        else:
            result = ev[1]
            if chat and result.get("reasoning"):
                yield chunk({"reasoning_content": result["reasoning"]})
            if chat and result.get("tool_calls"):
                calls = [dict(c, index=i) for i, c in enumerate(result["tool_calls"])]
                yield chunk({"tool_calls": calls})
            if result.get("extra_text"):
                yield chunk({"content": result["extra_text"]} if chat else result["extra_text"])
            yield chunk({} if chat else "", finish=result["finish_reason"])
            if req.include_usage:
                yield _sse({**base, "choices": [], "usage": usage(result)})
            break
    yield b"data: [DONE]\n\n"
