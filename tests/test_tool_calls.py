"""Tool-call syntaxes of the server (zipmoe_rt/server/textproc.py).

Unit cases for each syntax (Hermes JSON, GLM ``arg_key``/``arg_value``, Qwen3-Coder / Qwen3.5
``function=``/``parameter=``), malformed blocks kept as text, and a round trip through the real
chat templates of llama.cpp's sources (the ``llama-cpp-python`` 0.3.36 sdist, fetched by
:mod:`tests.pypi_data`): an assistant message with ``tool_calls`` is rendered by the template,
the call block it writes is parsed back, and the name and arguments must be the ones given.
"""
from __future__ import annotations

import json

import pytest

from zipmoe_rt.server.textproc import ToolCallSplitter, parse_tool_calls, tool_format
from zipmoe_rt.tokenizer import Tokenizer

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather forecast",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string"}, "days": {"type": "integer"}, "metric": {"type": "boolean"},
        "tags": {"type": "array", "items": {"type": "string"}}, "zip": {"type": "string"}}}}}]
ARGS = {"city": "Paris", "days": 3, "metric": True, "tags": ["a", "b c"], "zip": "75001"}


def _args(call):
    return json.loads(call["function"]["arguments"])


def test_hermes():
    text = ('<tool_call>{"name": "get_weather", "arguments": {"city": "Paris", "days": 3}}</tool_call>'
            ' tail')
    calls, rest = parse_tool_calls(text, "hermes")
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert _args(calls[0]) == {"city": "Paris", "days": 3} and rest == "tail"


def test_glm_typed_by_schema():
    text = ("<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Paris</arg_value>\n"
            "<arg_key>days</arg_key>\n<arg_value>3</arg_value>\n"
            "<arg_key>zip</arg_key>\n<arg_value>75001</arg_value>\n</tool_call>"
            "<tool_call>get_weather\n<arg_key>city</arg_key>\n<arg_value>Rome</arg_value>\n</tool_call>")
    calls, rest = parse_tool_calls(text, "glm", TOOLS)
    assert len(calls) == 2 and rest == ""
    # "75001" stays a string (the schema says so); 3 is read as JSON (integer)
    assert _args(calls[0]) == {"city": "Paris", "days": 3, "zip": "75001"}
    assert _args(calls[1]) == {"city": "Rome"}
    # without the schema a JSON-looking value is read as JSON, other text stays text
    calls, _ = parse_tool_calls(text, "glm")
    assert _args(calls[0])["zip"] == 75001 and _args(calls[0])["city"] == "Paris"


def test_qwen3_xml_multiline():
    text = ("I will call it.\n<tool_call>\n<function=get_weather>\n<parameter=city>\nNew\nYork\n"
            "</parameter>\n<parameter=metric>\ntrue\n</parameter>\n</function>\n</tool_call>")
    calls, rest = parse_tool_calls(text, "qwen3_xml", TOOLS)
    assert _args(calls[0]) == {"city": "New\nYork", "metric": True}
    assert rest == "I will call it."


@pytest.mark.parametrize("fmt,text", [
    ("hermes", "<tool_call>{not json}</tool_call>"),
    ("hermes", '<tool_call>{"arguments": {}}</tool_call>'),
    ("glm", "<tool_call>\n<arg_key>city</arg_key><arg_value>x</arg_value></tool_call>"),
    ("glm", "<tool_call>get_weather\n<arg_key>city</arg_key> junk</tool_call>"),
    ("qwen3_xml", "<tool_call>\n<function=get_weather>\n<parameter=city>\nx\n</parameter>\n</tool_call>"),
    ("qwen3_xml", "<tool_call>\n<function=f>\nstray text\n</function>\n</tool_call>"),
])
def test_malformed_block_stays_text(fmt, text):
    calls, rest = parse_tool_calls(text, fmt, TOOLS)
    assert calls == [] and rest == text


def test_splitter_holds_call_text():
    sp = ToolCallSplitter("glm")
    out = sp.push("Sure. <tool") + sp.push("_call>get_weather\n<arg_key>city")
    assert out == "Sure. " and sp.calls_text.startswith("<tool_call>get_weather")


@pytest.mark.parametrize("template", [None, "", "{{ messages }}"])
def test_no_syntax(template):
    assert tool_format(template) is None


# --- real templates ---------------------------------------------------------------------------
#: template file -> the syntax it must be recognised as
REAL = {"Qwen-Qwen3-0.6B": "hermes", "Qwen-Qwen2.5-7B-Instruct": "hermes", "GLM-4.6": "glm",
        "GLM-4.7-Flash": "glm", "Qwen3-Coder": "qwen3_xml", "Qwen3.5-4B": "qwen3_xml"}


@pytest.fixture(scope="module")
def real_templates():
    from pypi_data import pypi_files
    root = pypi_files("llama-cpp-python", ["models/templates/*"]) / "models" / "templates"
    return {name: (root / f"{name}.jinja").read_text(encoding="utf-8") for name in REAL}


@pytest.mark.parametrize("name", sorted(REAL))
def test_real_template_round_trip(real_templates, name):
    from tokenizers import Tokenizer as Backend
    from tokenizers.models import WordLevel

    template = real_templates[name]
    fmt = tool_format(template)
    assert fmt == REAL[name]
    tok = Tokenizer(Backend(WordLevel({"<unk>": 0, "<s>": 1, "</s>": 2}, unk_token="<unk>")).to_str(),
                    template,
                    bos_token="<s>", eos_token="</s>")
    msgs = [{"role": "user", "content": "Weather?"},
            {"role": "assistant", "content": "", "tool_calls": [
                {"type": "function", "id": "call1",
                 "function": {"name": "get_weather", "arguments": ARGS}}]}]
    text = tok.apply_chat_template(msgs, tools=TOOLS)
    i = text.rindex("<tool_call>")
    j = text.index("</tool_call>", i) + len("</tool_call>")
    calls, rest = parse_tool_calls(text[i:j], fmt, TOOLS)
    assert rest == "" and len(calls) == 1
    assert calls[0]["function"]["name"] == "get_weather"
    assert _args(calls[0]) == ARGS
