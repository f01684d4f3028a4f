"""Text post-processing of a streamed reply: stop strings and tool calls.

* :class:`StopText`: cuts the reply at the first stop string, holding back any tail that could
  still grow into one, so a stop string is never sent, not even in part (OpenAI's ``stop``).
* :class:`ToolCallSplitter` and :func:`parse_tool_calls`: the tool calls a model writes in its
  chat template's syntax, returned as OpenAI ``tool_calls``. Supported: the Hermes / Qwen2.5 /
  Qwen3 form, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` (Qwen3's
  ``tokenizer_config.json`` chat template, which also renders the ``tools`` it is given).
"""
from __future__ import annotations

import json
import uuid

__all__ = ["StopText", "ToolCallSplitter", "parse_tool_calls", "tool_format"]

#: tool-call syntaxes: name -> (start tag, end tag), detected in the chat template's text
TOOL_FORMATS = {"hermes": ("<tool_call>", "</tool_call>")}


def _held_tail(text: str, needles) -> int:
    """Length of the longest suffix of ``text`` that is a proper prefix of one of ``needles``."""
    best = 0
    for s in needles:
        for k in range(min(len(s) - 1, len(text)), best, -1):
            if text.endswith(s[:k]):
                best = k
                break
    return best


class StopText:
    """Cut streamed text at the first of ``stops`` (strings, never emitted).

    ``push(piece) -> (text_to_emit, stopped)``; after ``stopped`` is True nothing more is
    emitted. ``flush()`` returns what was held back once the stream ends without a stop.
    """

    def __init__(self, stops):
        self.stops = [s for s in stops if s]
        self.buf = ""
        self.stopped = False

    def push(self, piece: str) -> tuple[str, bool]:
        if self.stopped:
            return "", True
        text = self.buf + piece
        if not self.stops:
            return text, False
        hits = [i for i in (text.find(s) for s in self.stops) if i >= 0]
        if hits:
            self.stopped, self.buf = True, ""
            return text[:min(hits)], True
        keep = _held_tail(text, self.stops)
        self.buf = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


def tool_format(chat_template: str | None) -> str | None:
    """The tool-call syntax a chat template uses (a key of :data:`TOOL_FORMATS`) or None."""
    if not chat_template:
        return None
    for name, (start, _) in TOOL_FORMATS.items():
        if start in chat_template:
            return name
    return None


class ToolCallSplitter:
    """Split streamed reply text into content (streamed at once) and tool-call text (held
    until the end, then parsed by :func:`parse_tool_calls`).

    ``push(piece) -> content_to_emit``; everything from the first start tag on is kept in
    :attr:`calls_text`; a tail that may be the start of the tag is held back.
    """

    def __init__(self, fmt: str):
        self.start = TOOL_FORMATS[fmt][0]
        self.fmt = fmt
        self.buf = ""
        self.calls_text = None

    def push(self, piece: str) -> str:
        if self.calls_text is not None:
            self.calls_text += piece
            return ""
        text = self.buf + piece
        i = text.find(self.start)
        if i >= 0:
            self.calls_text, self.buf = text[i:], ""
            return text[:i]
        keep = _held_tail(text, [self.start])
        self.buf = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def parse_tool_calls(text: str, fmt: str) -> tuple[list[dict], str]:
    """Parse the tool calls in ``text`` (format ``fmt`` of :data:`TOOL_FORMATS`).

    Returns:
        ``(tool_calls, rest)``: OpenAI ``tool_calls`` entries (``{"id", "type": "function",
        "function": {"name", "arguments": JSON string}}``) and the text outside the calls. A
        block that is not a JSON object with a string ``name`` is left in ``rest`` as text.
    """
    start, end = TOOL_FORMATS[fmt]
    calls, rest, pos = [], [], 0
    while True:
        i = text.find(start, pos)
        if i < 0:
            rest.append(text[pos:])
            break
        j = text.find(end, i + len(start))
        block_end = len(text) if j < 0 else j + len(end)
        raw = text[i + len(start):(len(text) if j < 0 else j)].strip()
        call = None
        try:
            obj = json.loads(raw)
            if isinstance(obj, dict) and isinstance(obj.get("name"), str):
                args = obj.get("arguments", obj.get("parameters", {}))
                call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                        "function": {"name": obj["name"],
                                     "arguments": args if isinstance(args, str)
                                     else json.dumps(args, ensure_ascii=False)}}
        except ValueError:
            pass
        rest.append(text[pos:i])
        if call is None:
            rest.append(text[i:block_end])
        else:
            calls.append(call)
        pos = block_end
    return calls, "".join(rest).strip()
