"""Checks the per-family test files share: a tiny checkpoint converted without its warnings, a
stored hyper-parameter edited into a lie and refused at load, a forward call interrupted half
way, the caches' contents against transformers', chat turns through ``ChatSession`` and the
server's prompt-prefix cache, and our router against transformers' on every layer.

Import only from tests that have already done ``pytest.importorskip("torch")`` /
``("transformers")`` where a check needs them (the router, cache and server checks do)."""
from __future__ import annotations

import warnings
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from zipmoe_rt.backends import cuda_unavailable

#: the backends of the op tests: the CPU ones, and the CUDA one where CuPy sees a GPU
BACKENDS = ["numba", "numpy"] + ([] if cuda_unavailable() else ["cuda"])


def convert_quietly(src: Path, dst: Path) -> Path:
    """``convert(src, dst)`` without a progress bar and with its warnings (a tiny checkpoint
    has no tokenizer) silenced; returns the container's path."""
    from zipmoe_rt.convert.converter import convert

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return convert(src, dst, progress=False)


def assert_stored_hparam_refused(zmoe_path: Path, dst: Path, key: str, value, needles) -> None:
    """A copy of the container at ``zmoe_path`` (written to ``dst``) whose stored
    ``hparams.<key>`` says ``value`` is refused with ``zmoe.CorruptIndexError`` when opened,
    the message naming the file and each of ``needles``."""
    import zmoe
    from test_hostile import edited
    from zipmoe_rt.engine.store import ZmoeSource

    def fn(index, _b):
        index["metadata"][f"hparams.{key}"]["value"] = value
    bad = edited(zmoe_path, dst, fn)
    with pytest.raises(zmoe.CorruptIndexError) as ei:
        ZmoeSource(bad).reader.close()
    msg = str(ei.value)
    assert str(bad) in msg
    for n in needles:
        assert n in msg, msg


def check_interrupted_forward(model, prompt, held, atol: float) -> None:
    """A forward call over ``prompt[5:9]`` that raises on the last layer leaves the cache at
    offset 5 and every recurrent layer's arrays (``held(layer_cache)``, a tuple) as they were;
    the same call again then gives a fresh run's logits within ``atol``."""
    from zipmoe_rt.models.cache import RecurrentCache

    cache = model.new_cache()
    model.forward(prompt[:5], cache)
    before = [tuple(a.copy() for a in held(lc)) for lc in cache.layers
              if isinstance(lc, RecurrentCache)]

    def boom(layer, *a):
        if layer == model.args.num_hidden_layers - 1:
            raise KeyboardInterrupt
    model.route_hook = boom
    try:
        with pytest.raises(KeyboardInterrupt):
            model.forward(prompt[5:9], cache)
    finally:
        model.route_hook = None
    after = [held(lc) for lc in cache.layers if isinstance(lc, RecurrentCache)]
    assert cache.offset == 5
    for b, a in zip(before, after):
        for x0, x1 in zip(b, a):
            np.testing.assert_array_equal(x0, x1)
    full = model.forward(prompt[:9], model.new_cache(), last_only=False)
    again = model.forward(prompt[5:9], cache, last_only=False)
    np.testing.assert_allclose(again, full[5:], rtol=0, atol=atol)


def check_layer_caches(model, kind: str) -> list:
    """A new cache of ``model`` holds a recurrent cache layer where ``layer_types`` says
    ``kind`` (at least one layer) and a KV cache elsewhere; the recurrent layers' bytes are
    ``memparts.state_bytes`` of the hyper-parameters, the copies of the model's state values
    in float32. Returns the layer kinds the cache shows."""
    from zipmoe_rt.engine.memparts import state_bytes
    from zipmoe_rt.models.cache import RecurrentCache

    cache = model.new_cache(capacity=8)
    kinds = [kind if isinstance(lc, RecurrentCache) else "full_attention"
             for lc in cache.layers]
    assert kinds == model.args.layer_types and kind in kinds
    rec = sum(lc.nbytes for lc in cache.layers if isinstance(lc, RecurrentCache))
    assert rec == state_bytes(model.args) == RecurrentCache.COPIES * 4 * model.state_values()
    return kinds


def check_cache_contents(model, hf, ids, state: bool) -> None:
    """After ``ids`` (7 tokens) each attention layer of our cache holds the values of
    transformers' cache layer (the values per token adding up to ``kv_values_per_token``) and
    each recurrent layer its conv state (transformers' keeps one more, oldest, input column)
    and, with ``state``, its recurrent state; all within 2e-5."""
    import torch

    from zipmoe_rt.models.cache import RecurrentCache

    cache = model.new_cache()
    model.forward(ids, cache)
    with torch.no_grad():
        hc = hf(torch.tensor(ids[None]), use_cache=True).past_key_values.layers
    per_token = 0
    for lc, hl in zip(cache.layers, hc):
        if isinstance(lc, RecurrentCache):
            conv = hl.conv_states[0][0].numpy()
            np.testing.assert_allclose(lc.conv, conv[:, 1:].T, rtol=2e-5, atol=2e-5)
            if state:
                rec = hl.recurrent_states[0][0].numpy()
                np.testing.assert_allclose(lc.state, rec, rtol=2e-5, atol=2e-5)
        else:
            per_token += (hl.keys.numel() + hl.values.numel()) // hl.keys.shape[-2]
            np.testing.assert_allclose(lc.v[:, :7], hl.values[0].numpy(), rtol=2e-5, atol=2e-5)
    assert per_token == model.args.kv_values_per_token()


def check_chat_session_turns(folder: Path, tmp_path: Path) -> None:
    """A chat model built on the checkpoint ``folder``: ``ChatSession`` over three turns
    reuses its state from the second turn on and replies as a fresh ``chat`` over the whole
    conversation, its cache holding every token of the session."""
    import zipmoe_rt
    from test_api import make_chat_model

    model = zipmoe_rt.load(make_chat_model(folder, tmp_path / "chat"))
    try:
        session = model.chat_session(system="be brief")
        history = [{"role": "system", "content": "be brief"}]
        for i, text in enumerate(("hello world", "tell me a story",
                                   "what is the capital of france")):
            reply = "".join(session.send(text, max_tokens=8, temperature=0))
            assert (model.last_stats.cached_tokens > 0) == (i > 0)      # the state was reused
            history.append({"role": "user", "content": text})
            assert reply == model.chat(history, max_tokens=8, temperature=0)
            history.append({"role": "assistant", "content": reply})
            assert len(session.state.token_ids) == session.state.cache.offset
    finally:
        model.close()


@contextmanager
def serving(folder: Path, tmp_path: Path):
    """The server (queue of 4) over a chat model built on the checkpoint ``folder``; yields
    ``(model, ask)``, ``ask(messages)`` a greedy chat completion of at most 8 tokens through
    the OpenAI client. Skips without starlette, uvicorn or openai."""
    pytest.importorskip("starlette")
    pytest.importorskip("uvicorn")
    openai = pytest.importorskip("openai")
    import zipmoe_rt
    from test_api import make_chat_model
    from test_server import _chat, _host, _wait_ready, running
    from zipmoe_rt.server.app import create_app

    model = zipmoe_rt.load(make_chat_model(folder, tmp_path / "serve"))
    try:
        with running(create_app(_host(model, queue_size=4))) as base:
            _wait_ready(base)
            client = openai.OpenAI(base_url=base + "/v1", api_key="unused", timeout=120,
                                   max_retries=0)
            yield model, lambda messages: _chat(client, messages, max_tokens=8)
    finally:
        model.close()


def check_follow_up_reuses_the_state(model, ask) -> list:
    """A follow-up turn (a first turn, its reply, a new user message) reports cached tokens
    and answers as a cold run; returns its messages."""
    turn1 = [{"role": "user", "content": "tell me a story about a cat"}]
    r1 = ask(turn1)
    turn2 = turn1 + [{"role": "assistant", "content": r1.choices[0].message.content},
                     {"role": "user", "content": "and then again please"}]
    r2 = ask(turn2)
    assert r2.usage.prompt_tokens_details.cached_tokens > 0
    assert r2.choices[0].message.content == model.chat(turn2, max_tokens=8, temperature=0)
    return turn2


def check_answered_cold(model, ask, messages) -> None:
    """``messages`` reuse no cached token and answer as a cold run."""
    r = ask(messages)
    assert r.usage.prompt_tokens_details.cached_tokens == 0
    assert r.choices[0].message.content == model.chat(messages, max_tokens=8, temperature=0)


def routes_of(model, hf, prompt, routers):
    """Our model and transformers' model ``hf`` over ``prompt``, each router seen per layer:
    returns ``(ours, theirs)``, ``ours[layer] = (idx, w, logits)`` from our route hook and
    ``theirs[layer]`` the output of the module ``routers[layer]`` (a dict layer -> torch
    module)."""
    import torch

    ours, theirs = {}, {}
    model.route_hook = lambda layer, x, logits, idx, w: ours.setdefault(
        layer, (idx.copy(), w.copy(), logits.copy()))
    hooks = [m.register_forward_hook(lambda m, i, out, n=n: theirs.setdefault(n, out))
             for n, m in routers.items()]
    try:
        model.forward(prompt, model.new_cache())
        with torch.no_grad():
            hf(torch.tensor(prompt)[None])
    finally:
        model.route_hook = None
        for h in hooks:
            h.remove()
    return ours, theirs


def assert_same_route(ours, idx, w, logits=None) -> None:
    """One layer's route of ours (``(idx, w, logits)``) is transformers' (``idx``, ``w`` and,
    when given, ``logits`` tensors): the same experts, weights within 1e-6 and logits within
    1e-5."""
    np.testing.assert_array_equal(ours[0], idx.numpy())
    np.testing.assert_allclose(ours[1], w.numpy(), rtol=0, atol=1e-6)
    if logits is not None:
        np.testing.assert_allclose(ours[2], logits.numpy(), rtol=0, atol=1e-5)
