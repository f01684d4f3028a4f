"""``zipmoe-rt serve``: the OpenAI-compatible server, called over real HTTP on 127.0.0.1 with the
official ``openai`` client (and raw ``http.client`` for malformed requests).

The servers run uvicorn in a thread of the test process around a tiny random Mixtral converted at
test time (tokenizer and a Qwen3-style tool-calling chat template written here); replies are
compared with the embedding API (``zipmoe_rt.load``) on the same file, itself checked against
transformers in test_api.py. A tiny random model never writes a tool call, so the tool-call test
forces its output: the network is wrapped so that its logits pick a scripted token sequence (the
``<tool_call>`` JSON), while the prompt (with the tools rendered by the template) still runs
through the real model. Every server and subprocess has a hard time limit.
"""
from __future__ import annotations

import contextlib
import copy
import http.client
import json
import socket
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest

pytest.importorskip("starlette")
pytest.importorskip("uvicorn")
openai = pytest.importorskip("openai")

import zipmoe_rt  # noqa: E402
from zipmoe_rt.server.app import create_app  # noqa: E402
from zipmoe_rt.server.worker import ModelHost  # noqa: E402

from scripted import ScriptedNet  # noqa: E402

#: Newline-free, renders ``tools`` and assistant ``tool_calls`` in the Hermes / Qwen3 syntax.
TEMPLATE = (
    "{% if tools %}<|im_start|>system: tools: {% for t in tools %}{{ t | tojson }}{% endfor %} "
    "call one as <tool_call>{\"name\": N, \"arguments\": A}</tool_call><|im_end|>{% endif %}"
    "{% for m in messages %}<|im_start|>{{ m['role'] }}: {% if m['content'] %}{{ m['content'] }}"
    "{% endif %}{% if m['tool_calls'] %}{% for c in m['tool_calls'] %}<tool_call>{\"name\": "
    "\"{{ c['function']['name'] }}\", \"arguments\": {{ c['function']['arguments'] }}}"
    "</tool_call>{% endfor %}{% endif %}<|im_end|>{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
HARD_LIMIT_S = 60      # any one wait on a server in these tests
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "the weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                   "required": ["city"]}}}]
HI = [{"role": "user", "content": "hello what is the capital of france"}]


# --------------------------------------------------------------------------------------------
# fixtures: a tiny chat model, servers in threads
# --------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_zmoe(tiny_moe_dir, tmp_path_factory):
    import shutil

    from test_api import _tokenizer_json
    from zipmoe_rt.convert.converter import convert

    src = tiny_moe_dir("mixtral")
    dest = tmp_path_factory.mktemp("serve") / "tiny-serve"
    dest.mkdir()
    for f in src.iterdir():
        shutil.copy(f, dest / f.name)
    cfg = json.loads((src / "config.json").read_text())
    vocab = cfg.get("text_config", cfg)["vocab_size"]      # text_config: Gemma 4 (VL)
    (dest / "tokenizer.json").write_text(_tokenizer_json(vocab))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
    return convert(dest, dest.with_suffix(".zmoe"), progress=False)


@pytest.fixture(scope="module")
def model(tiny_zmoe):
    m = zipmoe_rt.load(tiny_zmoe)
    yield m
    m.close()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def running(app):
    """Run ``app`` with uvicorn in a thread on a free 127.0.0.1 port; yield its base URL."""
    import uvicorn

    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error",
                                           timeout_graceful_shutdown=2))
    th = threading.Thread(target=server.run, daemon=True)
    th.start()
    deadline = time.monotonic() + HARD_LIMIT_S
    while not server.started:
        assert time.monotonic() < deadline and th.is_alive(), "server did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        th.join(timeout=10)
        assert not th.is_alive(), "server did not stop"


def _host(model, **kw):
    return ModelHost(lambda: model, close_model=False, **kw)


def _wait_ready(base):
    deadline = time.monotonic() + HARD_LIMIT_S
    while True:
        status, _ = _raw(base, "GET", "/health")
        if status == 200:
            return
        assert time.monotonic() < deadline, "model never became ready"
        time.sleep(0.02)


@pytest.fixture(scope="module")
def server(model):
    app = create_app(_host(model, queue_size=16))
    with running(app) as base:
        _wait_ready(base)
        yield base, app.state.host


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[0] + "/v1", api_key="unused", timeout=HARD_LIMIT_S,
                         max_retries=0)


def _raw(base, method, path, body=None, headers=None, raw_body=None):
    """(status, parsed JSON body or text) of one request over http.client."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HARD_LIMIT_S)
    data = raw_body if raw_body is not None else (None if body is None else json.dumps(body))
    conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                   **(headers or {})})
    r = conn.getresponse()
    text = r.read().decode()
    conn.close()
    try:
        return r.status, json.loads(text)
    except ValueError:
        return r.status, text


def wait_healthy(base: str, limit_s: float, proc=None, poll_s: float = 0.1) -> None:
    """Poll ``base``'s ``/health`` until it answers 200; fails after ``limit_s`` seconds or
    when ``proc`` (a serve child, if given) has exited (its output in the message)."""
    deadline = time.monotonic() + limit_s
    while True:
        if proc is not None:
            assert proc.poll() is None, proc.stdout.read()
        try:
            if _raw(base, "GET", "/health")[0] == 200:
                return
        except OSError:
            pass
        assert time.monotonic() < deadline, "serve did not become ready"
        time.sleep(poll_s)


def _chat(client, messages, **kw):
    kw.setdefault("max_tokens", 16)
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="tiny", messages=messages, **kw)


def _stream_text(stream):
    text, chunks = [], []
    for ch in stream:
        chunks.append(ch)
        if ch.choices and ch.choices[0].delta.content:
            text.append(ch.choices[0].delta.content)
    return "".join(text), chunks


# --------------------------------------------------------------------------------------------
# chat, completions, sampling options
# --------------------------------------------------------------------------------------------

def test_chat_matches_api_and_counts_usage(client, model):
    r = _chat(client, HI, max_tokens=20)
    want = model.chat(HI, max_tokens=20)
    assert r.choices[0].message.content == want and want
    assert r.choices[0].message.role == "assistant"
    st = model.last_stats
    assert r.choices[0].finish_reason == {"length": "length", "stop": "stop"}[st.finish_reason]
    n_prompt = len(model.tokenizer.encode_chat(HI))
    assert r.usage.prompt_tokens == n_prompt
    assert r.usage.completion_tokens == st.generated_tokens
    assert r.usage.total_tokens == n_prompt + st.generated_tokens
    assert r.object == "chat.completion" and r.id.startswith("chatcmpl-")


def test_chat_stream_equals_non_stream_and_reports_usage(client):
    full = _chat(client, HI, max_tokens=20)
    text, chunks = _stream_text(_chat(client, HI, max_tokens=20, stream=True,
                                      stream_options={"include_usage": True}))
    assert text == full.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-2].choices[0].finish_reason == full.choices[0].finish_reason
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == \
        full.usage.completion_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_sse_wire_format_ends_with_done(server):
    host, port = server[0].removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=HARD_LIMIT_S)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"prompt": "hello", "max_tokens": 5, "stream": True, "temperature": 0}),
        headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    assert r.status == 200 and r.getheader("content-type").startswith("text/event-stream")
    events = [e for e in r.read().decode().split("\n\n") if e]
    assert all(e.startswith("data: ") for e in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_completions_match_api(client, model):
    prompt = "the quick brown fox"
    want = model.generate(prompt, max_tokens=12)
    r = client.completions.create(model="tiny", prompt=prompt, max_tokens=12, temperature=0)
    assert r.choices[0].text == want and r.object == "text_completion"
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(prompt))
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model="tiny", prompt=prompt, max_tokens=12, temperature=0, stream=True) if c.choices)
    assert streamed == want
    ids = model.tokenizer.encode(prompt)
    by_ids = client.completions.create(model="tiny", prompt=ids, max_tokens=12, temperature=0)
    assert by_ids.choices[0].text == want


def test_greedy_20_and_logprobs_match_transformers(client, model, tiny_zmoe):
    """20 greedy tokens from the server equal transformers' (fp32, full forward per step), and
    each token's log-probability is within 1e-3 of transformers' log_softmax."""
    torch = pytest.importorskip("torch")
    from tiny_models import load_hf

    prompt = "the quick brown fox jumps over"
    ids = model.tokenizer.encode(prompt)
    hf = load_hf(tiny_zmoe.with_suffix(""))
    seq, want, want_lp = list(ids), [], []
    with torch.no_grad():
        for _ in range(20):
            lsm = torch.log_softmax(hf(torch.tensor([seq])).logits[0, -1].double(), -1)
            t = int(lsm.argmax())
            if t in model.stop_ids:
                break
            want.append(t)
            want_lp.append(float(lsm[t]))
            seq.append(t)
    r = client.completions.create(model="tiny", prompt=ids, max_tokens=20, temperature=0,
                                  logprobs=1)
    assert r.choices[0].text == model.tokenizer.decode(want, skip_special_tokens=True)
    assert r.usage.completion_tokens == len(want) + (len(want) < 20)   # + the stop token
    got_lp = r.choices[0].logprobs.token_logprobs[:len(want)]
    assert len(got_lp) == len(want) >= 1
    assert max(abs(a - b) for a, b in zip(got_lp, want_lp)) <= 1e-3


def test_budgeted_model_serves_the_same_replies(model, tiny_zmoe):
    """Under --memory-budget (zip-lru: experts streamed through a small cache) the served
    greedy replies, streamed or not, are those of the unbudgeted model."""
    budgeted = zipmoe_rt.load(tiny_zmoe, memory_budget="30%", policy="zip-lru")
    try:
        with running(create_app(_host(budgeted))) as base:
            _wait_ready(base)
            cl = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0,
                               timeout=HARD_LIMIT_S)
            for msgs in (HI, [{"role": "user", "content": "tell me a story about a cat"}]):
                want = model.chat(msgs, max_tokens=20)
                assert _chat(cl, msgs, max_tokens=20).choices[0].message.content == want
                assert _stream_text(_chat(cl, msgs, max_tokens=20, stream=True))[0] == want
    finally:
        budgeted.close()


def test_stop_strings_are_cut_and_never_sent(client, model):
    base = model.chat(HI, max_tokens=30)
    assert len(base) > 12
    stop = base[6:9]
    cut = base[:base.find(stop)]
    r = _chat(client, HI, max_tokens=30, stop=stop)
    assert r.choices[0].message.content == cut and r.choices[0].finish_reason == "stop"
    text, chunks = _stream_text(_chat(client, HI, max_tokens=30, stop=[stop, "zzzz"],
                                      stream=True))
    assert text == cut and chunks[-1].choices[0].finish_reason == "stop"


def test_the_turn_after_a_stop_string_is_that_of_a_fresh_server(client, model):
    """The prefix cache holds the tokens of the stop string (and any generated with it) after a
    reply cut there; the next request, whose messages hold the text returned (what a client
    sends back), gets the reply of a cold run (the embedding API, no cache), reusing the
    shared prefix."""
    base = model.chat(HI, max_tokens=30)
    stop = base[6:9]
    r = _chat(client, HI, max_tokens=30, stop=stop)
    cut = r.choices[0].message.content
    assert cut == base[:base.find(stop)] and r.choices[0].finish_reason == "stop"
    follow = HI + [{"role": "assistant", "content": cut},
                   {"role": "user", "content": "and what about germany"}]
    got = _chat(client, follow, max_tokens=20)
    assert got.choices[0].message.content == model.chat(follow, max_tokens=20)
    assert got.usage.prompt_tokens_details.cached_tokens > 0


def test_seed_makes_sampling_reproducible(client):
    kw = dict(max_tokens=16, temperature=1.5)
    a = [_chat(client, HI, seed=s, **kw).choices[0].message.content for s in (1, 1, 2, 3)]
    assert a[0] == a[1]
    assert len({a[0], a[2], a[3]}) > 1


def test_sampling_options_are_passed(client, model):
    # top_k=1 with any temperature is greedy; min_p=1 keeps only the top token too
    greedy = _chat(client, HI, max_tokens=12).choices[0].message.content
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12, temperature=2.0,
                                       seed=5, extra_body={"top_k": 1})
    assert r.choices[0].message.content == greedy
    r = client.chat.completions.create(model="tiny", messages=HI, max_completion_tokens=12,
                                       temperature=2.0, seed=5, extra_body={"min_p": 1.0})
    assert r.choices[0].message.content == greedy
    r = _chat(client, HI, max_tokens=3)
    assert r.usage.completion_tokens == 3 and r.choices[0].finish_reason == "length"
    # no sampling fields: the model's generation_config defaults (none here: greedy)
    r = client.chat.completions.create(model="tiny", messages=HI, max_tokens=12)
    assert r.choices[0].message.content == greedy


def test_logprobs(client, model):
    r = _chat(client, HI, max_tokens=6, logprobs=True, top_logprobs=3)
    lps = r.choices[0].logprobs.content
    assert len(lps) == r.usage.completion_tokens
    for e in lps:
        tops = e.top_logprobs
        assert len(tops) == 3 and all(t.logprob <= 0 for t in tops)
        assert [t.logprob for t in tops] == sorted((t.logprob for t in tops), reverse=True)
        assert e.token == tops[0].token and e.logprob == pytest.approx(tops[0].logprob)  # greedy
    assert "".join(e.token for e in lps) == r.choices[0].message.content
    # the first token's log-probability is log_softmax of the model's own logits
    from zipmoe_rt.generate import CacheState
    ids = model.tokenizer.encode_chat(HI)
    logits = np.asarray(model.net.forward(np.asarray(ids), CacheState.new(model.net).cache,
                                          last_only=True), np.float64)
    lsm = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
    assert lps[0].logprob == pytest.approx(lsm.max(), abs=1e-6)
    c = client.completions.create(model="tiny", prompt="hello", max_tokens=4, temperature=0,
                                  logprobs=2)
    assert len(c.choices[0].logprobs.tokens) == 4
    assert all(len(t) == 2 for t in c.choices[0].logprobs.top_logprobs)


# --------------------------------------------------------------------------------------------
# tool calls (scripted output, see the module docstring)
# --------------------------------------------------------------------------------------------

def _scripted_model(model, text):
    m = copy.copy(model)
    eos = model.tokenizer.token_to_id("<|im_end|>")
    m.net = ScriptedNet(model.net, model.tokenizer.encode(text, add_special_tokens=False), eos)
    return m


def test_tool_call_round_trip(model):
    call = 'Let me check. <tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}</tool_call>'
    for stream in (False, True):
        scripted = _scripted_model(model, call)
        with running(create_app(ModelHost(lambda: scripted, close_model=False))) as base:
            _wait_ready(base)
            cl = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0,
                               timeout=HARD_LIMIT_S)
            r = cl.chat.completions.create(model="tiny", messages=HI, tools=TOOLS,
                                           temperature=0, max_tokens=80, stream=stream)
            if stream:
                content, chunks = _stream_text(r)
                calls = [tc for c in chunks if c.choices and c.choices[0].delta.tool_calls
                         for tc in c.choices[0].delta.tool_calls]
                finish = [c.choices[0].finish_reason for c in chunks if c.choices][-1]
            else:
                msg = r.choices[0].message
                content, calls, finish = msg.content, msg.tool_calls, r.choices[0].finish_reason
                # the tools reached the template: the prompt is the one rendered with them
                assert r.usage.prompt_tokens == len(model.tokenizer.encode_chat(HI, tools=TOOLS))
                assert r.usage.prompt_tokens > len(model.tokenizer.encode_chat(HI))
            assert content.strip() == "Let me check."
            assert finish == "tool_calls" and len(calls) == 1
            assert calls[0].function.name == "get_weather"
            assert json.loads(calls[0].function.arguments) == {"city": "Paris"}
            assert calls[0].id.startswith("call_") and calls[0].type == "function"
    # second leg: the call and its result go back; the template renders them, the model answers
    back = HI + [{"role": "assistant", "content": None, "tool_calls": [
        {"id": calls[0].id, "type": "function", "function": {
            "name": "get_weather", "arguments": calls[0].function.arguments}}]},
        {"role": "tool", "tool_call_id": calls[0].id, "content": "sunny, 21 C"}]
    scripted = _scripted_model(model, "It is sunny in Paris.")
    with running(create_app(ModelHost(lambda: scripted, close_model=False))) as base:
        _wait_ready(base)
        cl = openai.OpenAI(base_url=base + "/v1", api_key="x", max_retries=0, timeout=HARD_LIMIT_S)
        r = cl.chat.completions.create(model="tiny", messages=back, tools=TOOLS, temperature=0,
                                       max_tokens=80)
    assert r.choices[0].message.content == "It is sunny in Paris."
    assert r.choices[0].finish_reason == "stop" and not r.choices[0].message.tool_calls
    rendered = model.tokenizer.apply_chat_template(back, tools=TOOLS)
    assert '<tool_call>{"name": "get_weather", "arguments": {"city": "Paris"}}' in rendered
    assert "tool: sunny, 21 C" in rendered
    assert r.usage.prompt_tokens == len(model.tokenizer.encode(rendered, add_special_tokens=False))


# --------------------------------------------------------------------------------------------
# queueing, concurrency, cancellation, prefix cache
# --------------------------------------------------------------------------------------------

def test_concurrent_clients_get_their_solo_answers(client):
    prompts = [[{"role": "user", "content": f"tell me a story about a {w} please"}]
               for w in ("cat", "dog", "fox", "paris", "world")]
    solo = [_chat(client, p, max_tokens=8 + i).choices[0].message.content
            for i, p in enumerate(prompts)]

    def one_client(k):
        cl = openai.OpenAI(base_url=client.base_url, api_key="x", max_retries=0,
                           timeout=HARD_LIMIT_S)
        out = []
        for j in range(5):
            i = (j + k) % 5
            if (j + k) % 2:
                text, _ = _stream_text(_chat(cl, prompts[i], max_tokens=8 + i, stream=True))
            else:
                text = _chat(cl, prompts[i], max_tokens=8 + i).choices[0].message.content
            out.append((i, text))
        return out

    with ThreadPoolExecutor(8) as pool:
        results = [r for f in [pool.submit(one_client, k) for k in range(8)]
                   for r in f.result(timeout=HARD_LIMIT_S)]
    assert len(results) == 40
    for i, text in results:
        assert text == solo[i]


class SlowNet:
    """The network with a pause before every forward pass (a slow model, for timing-free
    tests of queueing and cancellation)."""

    def __init__(self, net, pause_s):
        self._net, self._pause = net, pause_s
        self.calls = 0

    def __getattr__(self, name):
        return getattr(self._net, name)

    def forward(self, *a, **kw):
        self.calls += 1
        time.sleep(self._pause)
        return self._net.forward(*a, **kw)


def test_disconnect_stops_generation_and_queue_full_is_429(model):
    slow = copy.copy(model)
    slow.net = SlowNet(model.net, 0.02)
    host = ModelHost(lambda: slow, queue_size=0, close_model=False)
    with running(create_app(host)) as base:
        _wait_ready(base)
        h, port = base.removeprefix("http://").split(":")
        conn = http.client.HTTPConnection(h, int(port), timeout=HARD_LIMIT_S)
        conn.request("POST", "/v1/chat/completions", body=json.dumps(
            {"messages": HI, "stream": True, "max_tokens": 400, "temperature": 0}),
            headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        assert r.status == 200
        assert r.read(6) == b"data: "      # streaming has begun
        # one request runs and --queue 0 lets none wait: the next is refused at once
        status, body = _raw(base, "POST", "/v1/chat/completions", {"messages": HI})
        assert status == 429 and body["error"]["code"] == "queue_full"
        conn.sock.shutdown(socket.SHUT_RDWR)
        conn.close()
        deadline = time.monotonic() + HARD_LIMIT_S
        while host.pending:
            assert time.monotonic() < deadline, "generation went on after the client left"
            time.sleep(0.01)
        assert host.last_result["finish_reason"] == "cancelled"
        assert host.last_result["completion_tokens"] < 200
        # a non-streamed request whose client leaves is stopped too
        sock = socket.create_connection((h, int(port)), timeout=HARD_LIMIT_S)
        body = json.dumps({"messages": HI, "max_tokens": 400, "temperature": 0}).encode()
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body)
        while not host.pending:
            assert time.monotonic() < deadline
            time.sleep(0.01)
        calls = slow.net.calls
        while slow.net.calls < calls + 3:           # it is generating
            assert time.monotonic() < deadline
            time.sleep(0.01)
        sock.close()
        while host.pending:
            assert time.monotonic() < deadline, "generation went on after the client left"
            time.sleep(0.01)
        assert host.last_result["finish_reason"] == "cancelled"
        assert host.last_result["completion_tokens"] < 200
        # the server is free: a new request runs
        status, body = _raw(base, "POST", "/v1/chat/completions",
                            {"messages": HI, "max_tokens": 3, "temperature": 0})
        assert status == 200 and body["usage"]["completion_tokens"] == 3


def test_prefix_cache_reports_cached_tokens_and_matches_cold_run(client, model, server):
    turn1 = [{"role": "user", "content": "tell me a story about a cat"}]
    r1 = _chat(client, turn1, max_tokens=10)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "and then again please"}]
    r2 = _chat(client, turn2, max_tokens=10)
    ids1 = model.tokenizer.encode_chat(turn1)
    ids2 = model.tokenizer.encode_chat(turn2)
    from zipmoe_rt.generate import common_prefix_len
    assert r2.usage.prompt_tokens == len(ids2)
    assert r2.usage.prompt_tokens_details.cached_tokens == common_prefix_len(ids1, ids2) > 0
    assert r2.choices[0].message.content == model.chat(turn2, max_tokens=10)   # cold run
    again = _chat(client, turn2, max_tokens=10)
    assert again.usage.prompt_tokens_details.cached_tokens == len(ids2) - 1
    assert again.choices[0].message.content == r2.choices[0].message.content


# --------------------------------------------------------------------------------------------
# errors, auth, health, other endpoints
# --------------------------------------------------------------------------------------------

LONG = " ".join(["hello world"] * 400)
BAD = [  # (method, path, body, status, param)
    ("POST", "/v1/chat/completions", {}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400,
     "messages[0].role"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user"}]}, 400, "messages[0].content"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": "x"}}]}]}, 400, "messages[0].content[0]"),
    ("POST", "/v1/chat/completions", {"messages": HI, "temperature": -1}, 400, "temperature"),
    ("POST", "/v1/chat/completions", {"messages": HI, "temperature": "hot"}, 400, "temperature"),
    ("POST", "/v1/chat/completions", {"messages": HI, "top_p": 2}, 400, "top_p"),
    ("POST", "/v1/chat/completions", {"messages": HI, "top_k": -3}, 400, "top_k"),
    ("POST", "/v1/chat/completions", {"messages": HI, "min_p": 1.5}, 400, "min_p"),
    ("POST", "/v1/chat/completions", {"messages": HI, "seed": "x"}, 400, "seed"),
    ("POST", "/v1/chat/completions", {"messages": HI, "max_tokens": 0}, 400, "max_tokens"),
    ("POST", "/v1/chat/completions", {"messages": HI, "n": 2}, 400, "n"),
    ("POST", "/v1/chat/completions", {"messages": HI, "stop": [1, 2]}, 400, "stop"),
    ("POST", "/v1/chat/completions", {"messages": HI, "stream": "yes"}, 400, "stream"),
    ("POST", "/v1/chat/completions", {"messages": HI, "stream_options": {"include_usage": True}},
     400, "stream_options"),
    ("POST", "/v1/chat/completions", {"messages": HI, "stream": True,
                                      "stream_options": {"include_usage": "yes"}}, 400,
     "stream_options.include_usage"),
    ("POST", "/v1/chat/completions", {"messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ("POST", "/v1/chat/completions", {"messages": HI, "logprobs": True, "top_logprobs": 50}, 400,
     "top_logprobs"),
    ("POST", "/v1/chat/completions", {"messages": HI, "response_format": {"type": "json_object"}},
     400, "response_format"),
    ("POST", "/v1/chat/completions", {"messages": HI, "tools": [{"type": "function"}]}, 400,
     "tools"),
    ("POST", "/v1/chat/completions", {"messages": HI, "tool_choice": "required"}, 400,
     "tool_choice"),
    ("POST", "/v1/chat/completions", {"messages": HI, "presence_penalty": 1.0}, 400,
     "presence_penalty"),
    ("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": LONG}]}, 400,
     "messages"),
    ("POST", "/v1/completions", {"prompt": ""}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": ["a", "b"]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": [1, 99999]}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": LONG}, 400, "prompt"),
    ("POST", "/v1/completions", {"prompt": "x", "echo": True}, 400, "echo"),
    ("POST", "/v1/completions", {"prompt": "x", "logprobs": 9}, 400, "logprobs"),
    ("POST", "/v1/completions", [1, 2], 400, None),
    ("POST", "/detokenize", {"tokens": [-1]}, 400, "tokens"),
    ("POST", "/tokenize", {"content": 5}, 400, "content"),
    ("GET", "/v1/nope", None, 404, None),
    ("GET", "/v1/chat/completions", None, 405, None),
    ("DELETE", "/health", None, 405, None),
    # logit_bias is not applied: refused rather than ignored (an empty object is accepted)
    ("POST", "/v1/chat/completions", {"messages": HI, "logit_bias": {"5": 100}}, 400,
     "logit_bias"),
    ("POST", "/v1/completions", {"prompt": "x", "logit_bias": {"99999": -100}}, 400,
     "logit_bias"),
]


@pytest.mark.parametrize("method,path,body,status,param", BAD,
                         ids=[f"{b[1]}-{b[4] or b[3]}-{i}" for i, b in enumerate(BAD)])
def test_bad_requests_get_status_and_json_error(server, method, path, body, status, param):
    got, resp = _raw(server[0], method, path, body)
    assert got == status, resp
    assert isinstance(resp, dict) and isinstance(resp["error"]["message"], str)
    assert resp["error"]["message"] and resp["error"]["type"]
    assert resp["error"]["param"] == param
    # the server is still answering
    assert _raw(server[0], "GET", "/health")[0] == 200


def test_context_overflow_and_invalid_json(server):
    status, body = _raw(server[0], "POST", "/v1/completions", {"prompt": LONG})
    assert status == 400 and body["error"]["code"] == "context_length_exceeded"
    assert "512" in body["error"]["message"]
    status, body = _raw(server[0], "POST", "/v1/chat/completions", raw_body="{not json")
    assert status == 400 and "not valid JSON" in body["error"]["message"]
    # max_tokens past the context is fitted to what is left, not an error
    status, body = _raw(server[0], "POST", "/v1/completions",
                        {"prompt": "hello", "max_tokens": 10**6, "temperature": 0})
    assert status == 200 and body["usage"]["total_tokens"] <= 512


def test_api_key_body_limit_and_cors(model):
    app = create_app(_host(model), api_key="sekret", max_body=4096)
    with running(app) as base:
        _wait_ready(base)           # /health needs no key
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sekret"}):
            status, body = _raw(base, "GET", "/v1/models", headers=headers)
            assert status == 401 and body["error"]["type"] == "authentication_error"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=base + "/v1", api_key="wrong", max_retries=0).models.list()
        ok = openai.OpenAI(base_url=base + "/v1", api_key="sekret", max_retries=0)
        assert [m.id for m in ok.models.list().data] == [model.name]
        big = {"messages": [{"role": "user", "content": "x" * 5000}]}
        status, body = _raw(base, "POST", "/v1/chat/completions", big,
                            headers={"Authorization": "Bearer sekret"})
        assert status == 413 and body["error"]["code"] == "body_too_large"
        pre = {"Origin": "http://example.com", "Access-Control-Request-Method": "POST"}
        assert "access-control-allow-origin" not in _headers(base, "OPTIONS", "/v1/models", pre)
    with running(create_app(_host(model), cors=True)) as base:
        h = _headers(base, "OPTIONS", "/v1/chat/completions", pre)
        assert h.get("access-control-allow-origin") in ("*", "http://example.com")


def _headers(base, method, path, headers):
    h, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(h, int(port), timeout=HARD_LIMIT_S)
    conn.request(method, path, headers=headers)
    r = conn.getresponse()
    r.read()
    conn.close()
    return {k.lower(): v for k, v in r.getheaders()}


def test_health_is_503_while_loading(model):
    release = threading.Event()

    def slow_load():
        assert release.wait(HARD_LIMIT_S)
        return model

    failed = ModelHost(lambda: (_ for _ in ()).throw(ValueError("bad.zmoe: not a .zmoe")))
    with running(create_app(ModelHost(slow_load, close_model=False))) as base:
        status, body = _raw(base, "GET", "/health")
        assert status == 503 and body == {"status": "loading"}
        status, body = _raw(base, "POST", "/v1/chat/completions", {"messages": HI})
        assert status == 503 and body["error"]["code"] == "model_loading"
        release.set()
        _wait_ready(base)
        status, body = _raw(base, "GET", "/health")
        assert status == 200 and body["status"] == "ok" and body["model"] == model.name
    with running(create_app(failed)) as base:
        deadline = time.monotonic() + HARD_LIMIT_S
        while failed.status == "loading":
            assert time.monotonic() < deadline
            time.sleep(0.01)
        status, body = _raw(base, "GET", "/health")
        assert status == 503 and body["status"] == "error" and "not a .zmoe" in body["error"]


def test_models_tokenize_detokenize_and_page(server, model, client):
    models = client.models.list().data
    assert [m.id for m in models] == [model.name]
    status, body = _raw(server[0], "POST", "/tokenize", {"content": "hello world"})
    assert status == 200 and body["tokens"] == model.tokenizer.encode("hello world")
    assert body["max_model_len"] == 512
    status, back = _raw(server[0], "POST", "/detokenize", {"tokens": body["tokens"]})
    assert status == 200 and back["content"] == model.tokenizer.decode(body["tokens"])
    status, body = _raw(server[0], "POST", "/tokenize", {"messages": HI})
    assert body["tokens"] == model.tokenizer.encode_chat(HI)
    status, html = _raw(server[0], "GET", "/")
    assert status == 200 and "v1/chat/completions" in html and "tokens/s" in html


def _chromium_eval(exe, url, expression, timeout=90):
    """Open ``url`` in headless chromium and return the value of ``expression`` (a promise is
    awaited), over the DevTools protocol on a pipe (``--remote-debugging-pipe``: JSON messages
    ending in NUL on file descriptors 3 and 4)."""
    import os
    import select

    to_r, to_w = os.pipe()
    from_r, from_w = os.pipe()

    def fds():
        os.dup2(to_r, 3)
        os.dup2(from_w, 4)
    proc = subprocess.Popen([exe, "--headless", "--no-sandbox", "--disable-gpu",
                             "--remote-debugging-pipe", "about:blank"], preexec_fn=fds,
                            close_fds=False,     # else 3 and 4 are closed after preexec_fn
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    os.close(to_r)
    os.close(from_w)
    buf, deadline = b"", time.monotonic() + timeout

    def call(id_, method, params, session=None):
        nonlocal buf
        msg = {"id": id_, "method": method, "params": params}
        if session:
            msg["sessionId"] = session
        os.write(to_w, json.dumps(msg).encode() + b"\0")
        while True:
            while b"\0" in buf:
                raw, buf = buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == id_:
                    return reply
            left = deadline - time.monotonic()
            assert left > 0, "chromium did not answer in time"
            if select.select([from_r], [], [], left)[0]:
                chunk = os.read(from_r, 65536)
                assert chunk, "chromium closed the pipe"
                buf += chunk

    try:
        target = call(1, "Target.createTarget", {"url": url})["result"]["targetId"]
        session = call(2, "Target.attachToTarget", {"targetId": target, "flatten": True})[
            "result"]["sessionId"]
        for n in range(3, 100):    # until it runs in the page (not the blank one it replaced)
            res = call(n, "Runtime.evaluate", {"expression": expression, "awaitPromise": True,
                                               "returnByValue": True}, session)
            if "error" not in res:
                return res["result"]["result"].get("value")
            assert "context was destroyed" in res["error"]["message"], res
    finally:
        os.close(to_w)
        os.close(from_r)
        proc.kill()
        proc.wait(timeout=20)


def test_chat_page_streams_a_reply_in_headless_chromium(server, model):
    """The page at / sends ?q=..., streams the reply into the log and prints tokens/s
    (checked in Debian's chromium when installed, skipped otherwise)."""
    import shutil
    import urllib.parse

    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed")
    url = f"{server[0]}/?q={urllib.parse.quote(HI[0]['content'])}&max_tokens=12"
    got = _chromium_eval(exe, url, """new Promise(resolve => {
        const wait = () => window.done ? window.done.then(() => resolve([
            [...document.querySelectorAll('#log .assistant')].map(d => d.textContent),
            document.querySelector('#log .stats').textContent])) : setTimeout(wait, 20);
        wait(); })""")
    replies, stats = got
    assert replies == [model.chat(HI, max_tokens=12)]
    assert "12 generated" in stats and "tokens/s" in stats


# --------------------------------------------------------------------------------------------
# the command line
# --------------------------------------------------------------------------------------------

def test_serve_without_the_extra_names_the_install(monkeypatch, tiny_zmoe):
    from click.testing import CliRunner

    from zipmoe_rt.cli import main
    monkeypatch.setitem(sys.modules, "uvicorn", None)
    r = CliRunner().invoke(main, ["serve", str(tiny_zmoe)])
    assert r.exit_code == 1
    assert "pip install 'zipmoe-rt[server]'" in r.output and "uvicorn" in r.output


def test_core_runtime_never_imports_the_server(tiny_zmoe):
    code = ("import sys, zipmoe_rt\n"
            "from click.testing import CliRunner\n"
            "from zipmoe_rt.cli import main\n"
            f"r = CliRunner().invoke(main, ['chat', {str(tiny_zmoe)!r}, '-n', '3'], input='hi\\n')\n"
            "assert r.exit_code == 0, r.output\n"
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('starlette', 'uvicorn')"
            " or m.startswith('zipmoe_rt.server')))\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=240)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"


def test_serve_command_end_to_end(tiny_zmoe, model):
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "zipmoe_rt.cli", "serve", str(tiny_zmoe),
                             "--port", str(port), "--api-key", "k"],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        base = f"http://127.0.0.1:{port}"
        wait_healthy(base, 240, proc)
        cl = openai.OpenAI(base_url=base + "/v1", api_key="k", max_retries=0, timeout=120)
        r = _chat(cl, HI, max_tokens=8)
        assert r.choices[0].message.content == model.chat(HI, max_tokens=8)
        # SIGTERM (kill, docker stop) is a normal stop: graceful, status 0, no "interrupted"
        proc.terminate()
        assert proc.wait(timeout=60) == 0
        out = proc.stdout.read()
        assert "Shutting down" in out and "interrupted" not in out, out
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


def test_empty_logit_bias_is_accepted(server):
    """Clients that always send ``logit_bias`` (null or {}) are served as without it."""
    want = _raw(server[0], "POST", "/v1/completions",
                {"prompt": "hello", "max_tokens": 4, "temperature": 0})
    for lb in (None, {}):
        got = _raw(server[0], "POST", "/v1/completions",
                   {"prompt": "hello", "max_tokens": 4, "temperature": 0, "logit_bias": lb})
        assert got[0] == want[0] == 200, got
        assert got[1]["choices"][0]["text"] == want[1]["choices"][0]["text"]


def test_ctx_size_bounds_each_request(model):
    """``serve -c N``: /v1/models reports N, a prompt of N tokens or more is a 400
    context_length_exceeded naming N, and max_tokens is fitted to what is left of N."""
    app = create_app(_host(model, ctx_size=24))
    with running(app) as base:
        _wait_ready(base)
        status, body = _raw(base, "GET", "/v1/models")
        assert status == 200 and body["data"][0]["max_model_len"] == 24
        status, body = _raw(base, "POST", "/v1/completions", {"prompt": list(range(1, 25))})
        assert status == 400 and body["error"]["code"] == "context_length_exceeded"
        assert "the model's context is 24 tokens" in body["error"]["message"]
        status, body = _raw(base, "POST", "/v1/completions",
                            {"prompt": list(range(1, 21)), "max_tokens": 100, "temperature": 0})
        assert status == 200 and body["usage"]["prompt_tokens"] == 20
        assert body["usage"]["completion_tokens"] <= 4
    with pytest.raises(ValueError, match="ctx_size"):
        _host(model, ctx_size=0)


def test_serve_ctx_size_option_is_refused_below_one():
    from cli_runner import cli

    r = cli("serve", "--ctx-size", "0")
    assert r.exit_code != 0 and "--ctx-size" in r.stderr


def test_context_under_a_memory_limit_is_the_one_it_planned():
    """``serve --memory-limit``: requests get at most the context the limit sized the KV cache
    for (``Model.memory_plan.context``; -c lowers it), not the model's trained length."""
    from types import SimpleNamespace

    from zipmoe_rt.server.worker import ModelHost

    plan = SimpleNamespace(context=40)
    for ctx, want in ((None, 40), (24, 24), (100, 40)):
        h = ModelHost(lambda: None, ctx_size=ctx)
        h.model = SimpleNamespace(hparams={"max_position_embeddings": 512}, memory_plan=plan)
        assert h.context_length == want, ctx
    h = ModelHost(lambda: None)
    h.model = SimpleNamespace(hparams={"max_position_embeddings": 512}, memory_plan=None)
    assert h.context_length == 512


@pytest.mark.parametrize("stop,shown", [("", '""'), ([""], '[""]'), (["a", 3], '["a", 3]')])
def test_bad_stop_error_shows_the_value_as_sent(stop, shown):
    from zipmoe_rt.server.schemas import APIError, parse_chat
    with pytest.raises(APIError) as e:
        parse_chat({"messages": HI, "stop": stop})
    assert e.value.param == "stop" and e.value.message.endswith(f"got {shown}")



def test_tools_on_a_template_that_ignores_them_are_refused(tiny_moe_dir, tmp_path):
    """A model whose template renders no tools: a request with tools gets a 400 naming
    ``tools`` (as llama.cpp refuses tools without a tool-capable template), not a reply that
    silently never saw them; with ``tool_choice: "none"`` (no tools sent) it is answered."""
    from test_api import make_chat_model
    zm = make_chat_model(tiny_moe_dir("mixtral"), tmp_path / "plain")
    with zipmoe_rt.load(zm, progress=False) as m:
        assert m.tokenizer.encode_chat(HI, tools=TOOLS) == m.tokenizer.encode_chat(HI)
        with running(create_app(_host(m, queue_size=4))) as base:
            _wait_ready(base)
            status, body = _raw(base, "POST", "/v1/chat/completions",
                                {"messages": HI, "tools": TOOLS, "max_tokens": 1})
            assert status == 400, body
            assert body["error"]["param"] == "tools"
            assert body["error"]["type"] == "invalid_request_error"
            assert body["error"]["message"] == (
                "tools: this model's chat template does not use them (it renders the same prompt "
                "with and without tools); leave tools out, or serve a model whose template takes "
                "tools")
            status, body = _raw(base, "POST", "/v1/chat/completions",
                                {"messages": HI, "tools": TOOLS, "tool_choice": "none",
                                 "max_tokens": 1})
            assert status == 200, body
