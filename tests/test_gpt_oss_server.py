"""``zipmoe-rt serve`` with gpt-oss's chat template (the harmony format): a reply's final
channel is the message content, its analysis channel ``reasoning_content``, a commentary
message ``to=functions.NAME`` a ``tool_calls`` entry, streamed and not, over real HTTP with the
``openai`` client. As in test_server.py, the tiny random model's logits are scripted so that
greedy decoding writes a given reply while the prompt (rendered by the real template) runs
through the real network. The tiny model's 512-token context cannot hold the template's tool
preamble (with a tool: 419 tokens of this test tokenizer) and the scripted call, so the call is
requested without ``tools``: the reply is split the same way with or without them (the
template's rendering of tools is checked against transformers in test_gpt_oss.py)."""
from __future__ import annotations

import copy
import json

import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

from zipmoe_rt.server.app import create_app  # noqa: E402
from zipmoe_rt.server.worker import ModelHost  # noqa: E402

from test_server import (HARD_LIMIT_S, ScriptedNet, _stream_text, _wait_ready,  # noqa: E402,F401
                         model, running, tiny_zmoe)
from test_gpt_oss import REPLY_CALL, REPLY_FINAL, _harmony_template  # noqa: E402

ASK = [{"role": "user", "content": "Weather in Paris?"}]


def _harmony_model(model, reply):
    """``model`` with gpt-oss's chat template and a network scripted to write ``reply``."""
    m = copy.copy(model)
    m.tokenizer = copy.copy(model.tokenizer)
    m.tokenizer.chat_template = _harmony_template()
    from zipmoe_rt.chat_template import compile_chat_template
    m.tokenizer._compiled_template = compile_chat_template(m.tokenizer.chat_template)
    eos = model.tokenizer.token_to_id("<|im_end|>")
    m.net = ScriptedNet(model.net, model.tokenizer.encode(reply, add_special_tokens=False), eos)
    return m


def _ask(m, stream, tools=None):
    with running(create_app(ModelHost(lambda: m, close_model=False))) as base:
        _wait_ready(base)
        cl = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0,
                           timeout=HARD_LIMIT_S)
        kw = {"tools": tools} if tools else {}
        r = cl.chat.completions.create(model="tiny", messages=ASK, temperature=0,
                                       max_tokens=200, stream=stream, **kw)
        if not stream:
            msg = r.choices[0].message
            return (msg.content, msg.tool_calls or [], getattr(msg, "reasoning_content", None),
                    r.choices[0].finish_reason)
        content, chunks = _stream_text(r)
        calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls
                 for tc in c.choices[0].delta.tool_calls]
        reasoning = "".join(getattr(c.choices[0].delta, "reasoning_content", None) or ""
                            for c in chunks if c.choices)
        finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
        return content, calls, reasoning, finish


@pytest.mark.parametrize("stream", [False, True])
def test_harmony_final_channel_is_the_content(model, stream):
    content, calls, reasoning, finish = _ask(_harmony_model(model, REPLY_FINAL), stream)
    assert content == "Paris is the capital <|of| France."
    assert not calls and reasoning == "Simple." and finish == "stop"


@pytest.mark.parametrize("stream", [False, True])
def test_harmony_tool_call(model, stream):
    content, calls, reasoning, finish = _ask(_harmony_model(model, REPLY_CALL), stream)
    assert not content and reasoning == "Need the weather." and finish == "tool_calls"
    assert len(calls) == 1 and calls[0].function.name == "get_weather"
    assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
    assert calls[0].id.startswith("call_") and calls[0].type == "function"
