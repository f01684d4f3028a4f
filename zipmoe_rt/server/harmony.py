"""gpt-oss's reply format (OpenAI's harmony format, as gpt-oss's chat template renders it):
messages ``<|start|>ROLE[ to=RECIPIENT]<|channel|>CHANNEL[ to=RECIPIENT][ <|constrain|>json]
<|message|>BODY`` ended by ``<|end|>``, ``<|call|>`` (a tool call) or ``<|return|>`` (the last
message). The reply to a prompt ending in the generation prompt ``<|start|>assistant`` starts
at ``<|channel|>``. Channels: ``analysis`` (reasoning), ``commentary`` (tool calls, addressed
``to=functions.NAME`` with JSON arguments as the body), ``final`` (the answer).

:class:`HarmonySplitter` turns the streamed reply text (decoded with its special tokens) into
OpenAI fields: the ``final`` channel's text as ``content`` (streamed as it comes), each
``to=functions.NAME`` message as a ``tool_calls`` entry, the ``analysis`` text as
``reasoning_content``.
"""
from __future__ import annotations

import re
import uuid

from ..chat_template import is_harmony
from .textproc import held_tail

__all__ = ["HarmonySplitter", "is_harmony"]

_MESSAGE = "<|message|>"
_ENDS = ("<|end|>", "<|call|>", "<|return|>", "<|start|>")
_CHANNEL = re.compile(r"<\|channel\|>\s*([A-Za-z_]+)")
_RECIPIENT = re.compile(r"\bto=([^\s<]+)")


class HarmonySplitter:
    """Split a streamed harmony reply into content, tool calls and reasoning.

    ``push(piece) -> content_to_emit``: the text of ``final`` messages as it arrives (a tail
    that may be the start of an end marker is held back); ``flush() -> content`` at the end;
    then :meth:`finish` gives ``(tool_calls, rest)`` and :attr:`reasoning`. Text outside any
    message header (a reply that is not in the format) is content.

    Attributes:
        calls: OpenAI ``tool_calls`` entries (``{"id", "type": "function", "function":
            {"name", "arguments"}}``) of the messages addressed ``to=functions.NAME``.
        reasoning: the ``analysis`` messages' text, joined by newlines.
    """

    def __init__(self):
        self.buf = ""
        self.header: str | None = ""      # None: inside a message body
        self.channel = self.recipient = None
        self.body: list[str] = []
        self.calls: list[dict] = []
        self.analysis: list[str] = []
        self.calls_text = None            # the ToolCallSplitter interface: set once calls end
        self._reasoning_sent = 0          # characters of the reasoning take_reasoning gave

    @property
    def reasoning(self) -> str:
        return "\n".join(a for a in self.analysis if a)

    def take_reasoning(self) -> str:
        """The ``analysis`` text pushed since the last call (the open message's included), for
        a caller that shows the reasoning as it streams; the pieces joined are
        :attr:`reasoning`."""
        parts = list(self.analysis)
        if self.header is None and self.channel == "analysis" and not self.recipient:
            parts.append("".join(self.body))
        text = "\n".join(a for a in parts if a)
        sent, self._reasoning_sent = self._reasoning_sent, len(text)
        return text[sent:]

    def _open(self, header: str) -> None:
        m = _CHANNEL.search(header)
        r = _RECIPIENT.search(header)
        self.channel = m.group(1) if m else None
        self.recipient = r.group(1) if r else None
        self.header, self.body = None, []

    def _close(self) -> None:
        text = "".join(self.body)
        if self.recipient and self.recipient.startswith("functions."):
            self.calls.append({"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                               "function": {"name": self.recipient[len("functions."):],
                                            "arguments": text.strip()}})
        elif self.channel == "analysis":
            self.analysis.append(text)
        self.header, self.channel, self.recipient, self.body = "", None, None, []

    def _streams(self) -> bool:
        """Whether the open message is content (the final channel, no recipient)."""
        return self.channel == "final" and not self.recipient

    def push(self, piece: str) -> str:
        text, self.buf, out = self.buf + piece, "", []
        while text:
            if self.header is not None:                       # in a header
                h, text = self.header + text, ""
                i = h.find(_MESSAGE)
                if i >= 0:
                    self._open(h[:i])
                    text = h[i + len(_MESSAGE):]
                    continue
                if not self.header:     # no header begun: text before a marker is content
                    j = h.find("<|")
                    if j < 0:
                        keep = 1 if h.endswith("<") else 0
                        out.append(h[:len(h) - keep])
                        self.buf = h[len(h) - keep:]
                        break
                    out.append(h[:j])
                    h = h[j:]
                self.header = h
                break
            hits = [(j, m) for j, m in ((text.find(m), m) for m in _ENDS) if j >= 0]
            if hits:
                j, m = min(hits)
                self.body.append(text[:j])
                if self._streams():
                    out.append(text[:j])
                self._close()
                text = text[j + (0 if m == "<|start|>" else len(m)):]
                continue
            keep = held_tail(text, _ENDS)
            body = text[:len(text) - keep]
            self.body.append(body)
            if self._streams():
                out.append(body)
            self.buf = text[len(text) - keep:]
            text = ""
        return "".join(out)

    def flush(self) -> str:
        """The content held back at the end of the reply (an unterminated message is ended
        here)."""
        out = ""
        if self.header is None:
            if self.buf:
                self.body.append(self.buf)
                out = self.buf if self._streams() else ""
            self._close()
        elif self.header and "<|channel|>" not in self.header:
            out = self.header                                 # not the format: content
        self.buf, self.header = "", ""
        return out

    def finish(self) -> tuple[list[dict], str]:
        """``(tool_calls, rest)`` once the reply ended: the calls, and no leftover text."""
        return list(self.calls), ""
