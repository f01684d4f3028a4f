"""Text post-processing of a streamed reply: stop strings and tool calls.

* :class:`StopText`: cuts the reply at the first stop string, holding back any tail that could
  still grow into one, so a stop string is never sent, not even in part (OpenAI's ``stop``).
* :class:`ToolCallSplitter` and :func:`parse_tool_calls`: the tool calls a model writes in its
  chat template's syntax, returned as OpenAI ``tool_calls``. Supported (the syntax is read from
  the chat template's text, :func:`tool_format`):

  - ``hermes``: Hermes / Qwen2.5 / Qwen3, ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>``
    (Qwen3's ``tokenizer_config.json`` chat template);
  - ``glm``: GLM-4.5 / 4.6 / 4.7, ``<tool_call>NAME\n<arg_key>K</arg_key>\n<arg_value>V</arg_value>
    ...</tool_call>`` (the GLM-4.6 template of the llama.cpp sources);
  - ``qwen3_xml``: Qwen3-Coder / Qwen3.5, ``<tool_call>\n<function=NAME>\n<parameter=K>\nV\n
    </parameter>\n</function>\n</tool_call>``.

  In the two XML forms a value is text; it is kept as a string when the request's tool schema
  says the parameter is a string (or the text is not JSON), a schema ``boolean`` also accepts
  ``True`` / ``False`` (as Qwen3-Coder's template writes Python booleans), anything else is read
  as JSON, as those templates render non-string arguments with ``tojson``.
"""
from __future__ import annotations

import json
import re
import uuid

__all__ = ["held_tail", "StopText", "ToolCallSplitter", "parse_tool_calls", "tool_format"]

#: tool-call syntaxes: name -> (start tag, end tag), detected in the chat template's text
TOOL_FORMATS = {"hermes": ("<tool_call>", "</tool_call>"),
                "glm": ("<tool_call>", "</tool_call>"),
                "qwen3_xml": ("<tool_call>", "</tool_call>")}

#: how a template is recognised, most specific first: (marker in the template text, format)
_TEMPLATE_MARKERS = (("<arg_key>", "glm"), ("<function=", "qwen3_xml"), ("<tool_call>", "hermes"))


def held_tail(text: str, needles) -> int:
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
        keep = held_tail(text, self.stops)
        self.buf = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep], False

    def flush(self) -> str:
        out, self.buf = ("" if self.stopped else self.buf), ""
        return out


def tool_format(chat_template: str | None) -> str | None:
    """The tool-call syntax a chat template uses (a key of :data:`TOOL_FORMATS`) or None."""
    if not chat_template:
        return None
    for marker, name in _TEMPLATE_MARKERS:
        if marker in chat_template:
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
        keep = held_tail(text, [self.start])
        self.buf = text[len(text) - keep:] if keep else ""
        return text[:len(text) - keep]

    def flush(self) -> str:
        out, self.buf = self.buf, ""
        return out


def _param_types(tools) -> dict:
    """``{function name: {parameter: JSON-schema type}}`` from a request's ``tools``."""
    out = {}
    for t in tools or ():
        fn = t.get("function") if isinstance(t, dict) else None
        if isinstance(fn, dict) and isinstance(fn.get("name"), str):
            props = (fn.get("parameters") or {}).get("properties") or {}
            out[fn["name"]] = {k: (v.get("type") if isinstance(v, dict) else None)
                               for k, v in props.items()} if isinstance(props, dict) else {}
    return out


def _xml_value(text: str, typ):
    """A parameter value written as text in an XML-style call (see the module docstring)."""
    if typ == "string":
        return text
    if typ == "boolean" and text.strip().lower() in ("true", "false"):
        return text.strip().lower() == "true"      # Qwen3-Coder's template writes True/False
    try:
        return json.loads(text)
    except ValueError:
        return text


_GLM_ARG = re.compile(r"<arg_key>(.*?)</arg_key>\s*<arg_value>(.*?)</arg_value>", re.S)
_XML_FN = re.compile(r"^<function=([^>\n]+)>(.*?)</function>$", re.S)
_XML_PARAM = re.compile(r"<parameter=([^>\n]+)>\n?(.*?)\n?</parameter>", re.S)


def _parse_body(raw: str, fmt: str, types: dict):
    """``(name, arguments)`` of one call's text between the tags, or None if it is malformed."""
    if fmt == "hermes":
        try:
            obj = json.loads(raw)
        except ValueError:
            return None
        if not (isinstance(obj, dict) and isinstance(obj.get("name"), str)):
            return None
        return obj["name"], obj.get("arguments", obj.get("parameters", {}))
    if fmt == "glm":
        name, _, rest = raw.partition("<arg_key>")
        name = name.strip()
        rest = "<arg_key>" + rest if _ else ""
        if not name or "\n" in name or "<" in name:
            return None
        args = {}
        for k, v in _GLM_ARG.findall(rest):
            args[k.strip()] = _xml_value(v, types.get(name, {}).get(k.strip()))
        if _GLM_ARG.sub("", rest).strip():
            return None
        return name, args
    m = _XML_FN.match(raw)                                    # qwen3_xml
    if m is None:
        return None
    name, inner = m.group(1).strip(), m.group(2)
    args = {k.strip(): _xml_value(v, types.get(name, {}).get(k.strip()))
            for k, v in _XML_PARAM.findall(inner)}
    if _XML_PARAM.sub("", inner).strip():
        return None
    return name, args


def parse_tool_calls(text: str, fmt: str, tools=None) -> tuple[list[dict], str]:
    """Parse the tool calls in ``text`` (format ``fmt`` of :data:`TOOL_FORMATS`).

    Args:
        text: the reply from the first start tag on.
        fmt: ``hermes``, ``glm`` or ``qwen3_xml``.
        tools: the request's OpenAI ``tools`` (used by the XML forms for parameter types).
    Returns:
        ``(tool_calls, rest)``: OpenAI ``tool_calls`` entries (``{"id", "type": "function",
        "function": {"name", "arguments": JSON string}}``) and the text outside the calls. A
        block that does not parse as a call of its format is left in ``rest`` as text.
    """
    start, end = TOOL_FORMATS[fmt]
    types = _param_types(tools)
    calls, rest, pos = [], [], 0
    while True:
        i = text.find(start, pos)
        if i < 0:
            rest.append(text[pos:])
            break
        j = text.find(end, i + len(start))
        block_end = len(text) if j < 0 else j + len(end)
        raw = text[i + len(start):(len(text) if j < 0 else j)].strip()
        parsed = _parse_body(raw, fmt, types)
        call = None
        if parsed is not None:
            name, args = parsed
            call = {"id": f"call_{uuid.uuid4().hex[:24]}", "type": "function",
                    "function": {"name": name,
                                 "arguments": args if isinstance(args, str)
                                 else json.dumps(args, ensure_ascii=False)}}
        rest.append(text[pos:i])
        if call is None:
            rest.append(text[i:block_end])
        else:
            calls.append(call)
        pos = block_end
    return calls, "".join(rest).strip()
