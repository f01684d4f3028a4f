"""A chat turn stopped before its first reply token (Ctrl-C while its prompt is prefilled) is
withdrawn: the conversation and the KV cache are as they were before it, and the next turn
gives exactly the tokens of a session that never saw it. A reply stopped after its first token
is kept as far as it got. Each case is checked against a fresh session on the same tiny
model (greedy decoding), a KV-cache model (Mixtral) and a recurrent one (Qwen3-Next, whose
state can only go back to a marked position), with the prompt prefilled in batches so that the
interrupt lands after some of them were committed. Then the other places a Ctrl-C could
leave state that changes a later output: the budgeted expert engine, the cache's commit
between two layers, the calibration file."""
from __future__ import annotations

import numpy as np
import pytest

import zipmoe_rt
from zipmoe_rt.models import model as M

from test_api import make_chat_model

LONG = " ".join(["please tell me everything about the history of france"] * 4)
FIRST, LAST = "hello world", "what is the capital of france"
KW = dict(max_tokens=8, temperature=0)


@pytest.fixture(scope="module", params=["mixtral", "qwen3_next"])
def chat_zmoe(request, tiny_moe_dir, tmp_path_factory):
    return make_chat_model(tiny_moe_dir(request.param),
                           tmp_path_factory.mktemp("cancel") / request.param)


@pytest.fixture
def model(chat_zmoe, monkeypatch):
    monkeypatch.setattr(M, "PREFILL_UBATCH", 8)      # a long prompt: several batches
    m = zipmoe_rt.load(chat_zmoe)
    yield m
    m.close()


class InterruptAt:
    """``net.forward`` that raises KeyboardInterrupt on its ``n``-th call from now (counting
    each prefill batch: ``Model.forward`` runs them through ``self.forward``), once."""

    def __init__(self, net, n: int):
        self.net, self.n, self.calls = net, n, 0
        self.real = type(net).forward.__get__(net)
        net.forward = self

    def __call__(self, *a, **kw):
        self.calls += 1
        if self.calls == self.n:
            raise KeyboardInterrupt
        return self.real(*a, **kw)

    def remove(self):
        del self.net.forward


def _turn(session, text):
    return "".join(session.send(text, **KW))


def _fresh(model, *texts):
    """A session over ``texts`` (one turn each); returns it and its last reply."""
    s = model.chat_session(system="be brief")
    for t in texts:
        reply = _turn(s, t)
    return s, reply


def _same_session(a, b):
    assert a.messages == b.messages
    assert a.state.token_ids == b.state.token_ids
    assert a.state.cache.offset == len(a.state.token_ids)


@pytest.mark.parametrize("at", [1, 3])      # the first prefill batch, or after two committed
def test_ctrl_c_in_the_prefill_withdraws_the_turn(model, at):
    s = model.chat_session(system="be brief")
    _turn(s, FIRST)
    before = (list(s.messages), list(s.state.token_ids))
    hook = InterruptAt(model.net, at)
    try:
        with pytest.raises(KeyboardInterrupt):
            _turn(s, LONG)
    finally:
        hook.remove()
    assert hook.calls == at and s.withdrawn
    assert model.last_stats.finish_reason == "cancelled"
    assert model.last_stats.generated_tokens == 0
    assert (s.messages, s.state.token_ids) == before and s.state.valid
    assert s.state.cache.offset == len(before[1])
    reply = _turn(s, LAST)
    assert not s.withdrawn
    cached = model.last_stats.cached_tokens
    fresh, want = _fresh(model, FIRST, LAST)
    assert reply == want and model.last_stats.cached_tokens == cached > 0
    _same_session(s, fresh)


def test_ctrl_c_while_the_first_token_is_drawn_withdraws_the_turn(model, monkeypatch):
    """The prefill committed, then the interrupt landed in the sampling: the cache is cropped
    back to what it held before the turn."""
    from zipmoe_rt import generate as G
    s = model.chat_session(system="be brief")
    _turn(s, FIRST)
    before = list(s.state.token_ids)
    real = G.Sampler.sample

    def boom(self, logits, context_ids=None):
        monkeypatch.setattr(G.Sampler, "sample", real)
        raise KeyboardInterrupt
    monkeypatch.setattr(G.Sampler, "sample", boom)
    with pytest.raises(KeyboardInterrupt):
        _turn(s, LONG)
    assert s.withdrawn and s.state.token_ids == before
    assert s.state.cache.offset == len(before)
    reply = _turn(s, LAST)
    fresh, want = _fresh(model, FIRST, LAST)
    assert reply == want
    _same_session(s, fresh)


def test_ctrl_c_before_the_generation_starts_withdraws_the_turn(model, monkeypatch):
    """The interrupt landed after the session took the message and before the generation
    could record its end (its ``on_finish`` never runs): the turn is withdrawn all the same."""
    s = model.chat_session(system="be brief")
    _turn(s, FIRST)
    before = (list(s.messages), list(s.state.token_ids))
    real = model._stream_ids

    def boom(*a, **k):
        monkeypatch.setattr(model, "_stream_ids", real)
        raise KeyboardInterrupt
    monkeypatch.setattr(model, "_stream_ids", boom)
    with pytest.raises(KeyboardInterrupt):
        _turn(s, LONG)
    assert s.withdrawn and (s.messages, s.state.token_ids) == before
    reply = _turn(s, LAST)
    fresh, want = _fresh(model, FIRST, LAST)
    assert reply == want
    _same_session(s, fresh)


def test_ctrl_c_after_the_first_token_keeps_the_reply_so_far(model):
    s = model.chat_session(system="be brief")
    _turn(s, FIRST)
    got = []
    it = s.send(LONG, max_tokens=30, temperature=0)
    for piece in it:
        got.append(piece)
        hook = InterruptAt(model.net, 1)       # the next decode step
        try:
            with pytest.raises(KeyboardInterrupt):
                next(it)
        finally:
            hook.remove()
        break
    assert not s.withdrawn and model.last_stats.generated_tokens == 1
    partial = "".join(got)
    assert s.messages[-2:] == [{"role": "user", "content": LONG},
                               {"role": "assistant", "content": partial}]
    reply = _turn(s, LAST)
    history = [{"role": "system", "content": "be brief"}] + s.messages[:-1]
    assert reply == model.chat(history, **KW)


def test_an_error_in_the_prefill_withdraws_the_turn_too(model):
    s = model.chat_session(system="be brief")
    _turn(s, FIRST)
    before = list(s.messages)

    def fail(*a, **kw):
        raise OSError("read failed")
    model.net.forward = fail
    try:
        with pytest.raises(OSError, match="read failed"):
            _turn(s, LONG)
    finally:
        del model.net.forward
    assert s.withdrawn and s.messages == before
    reply = _turn(s, LAST)
    fresh, want = _fresh(model, FIRST, LAST)
    assert reply == want
    _same_session(s, fresh)


def test_generate_marks_a_recurrent_state_before_a_prefill_it_may_roll_back(model):
    """The low-level loop: a prefill interrupted after some batches leaves the cache as it was
    (a recurrent state through the mark taken before the prefill) and the state valid."""
    from zipmoe_rt.generate import CacheState, SamplingParams, generate
    from zipmoe_rt.models.cache import RecurrentCache
    ids = model.tokenizer.encode(LONG)
    state = CacheState.new(model.net)
    generate(model.net, ids[:5], SamplingParams(max_tokens=3), cache=state).collect()
    held = list(state.token_ids)           # the prompt and two decoded tokens (past its mark)
    assert len(held) == 7
    rec = [lc for lc in state.cache.layers if isinstance(lc, RecurrentCache)]
    before = [(lc.conv.copy(), lc.state.copy()) for lc in rec]
    hook = InterruptAt(model.net, 3)
    try:
        with pytest.raises(KeyboardInterrupt):
            generate(model.net, ids[5:], SamplingParams(max_tokens=1), cache=state).collect()
    finally:
        hook.remove()
    assert hook.calls == 3 and len(ids) - 5 > 2 * M.PREFILL_UBATCH
    assert state.valid and state.token_ids == held and state.cache.offset == len(held)
    for lc, (conv, st) in zip(rec, before):
        assert lc.length == len(held)
        assert np.array_equal(lc.conv, conv) and np.array_equal(lc.state, st)


# -- the budgeted engine ----------------------------------------------------------------------
@pytest.fixture(scope="module")
def engine_zmoe(tiny_moe_dir, tmp_path_factory):
    """The tiny Mixtral chat model with an activation trace beside it (for ``zipmoe``)."""
    from zipmoe_rt.engine import trace as T
    z = make_chat_model(tiny_moe_dir("mixtral"), tmp_path_factory.mktemp("engine") / "m")
    with zipmoe_rt.load(z) as m:
        T.save_trace(T.record_trace(m, [FIRST, LAST, "tell me a story"], max_tokens=12,
                                    progress=False), T.sidecar(z, T.TRACE_SUFFIX))
    return z


def _interrupting(obj, name: str, n: int, after: bool):
    """Make ``obj.name`` raise KeyboardInterrupt at its ``n``-th call, before it runs or
    (``after``) once it has; returns the undo."""
    real, calls = getattr(obj, name), [0]

    def hooked(*a, **kw):
        calls[0] += 1
        if calls[0] == n and not after:
            raise KeyboardInterrupt
        out = real(*a, **kw)
        if calls[0] == n:
            raise KeyboardInterrupt
        return out
    setattr(obj, name, hooked)
    return lambda: delattr(obj, name)


@pytest.mark.parametrize("policy, prefetch", [("zip-lru", "on"), ("zipmoe", "on"),
                                              ("zipmoe", "off")])
def test_ctrl_c_inside_the_expert_engine_changes_no_later_reply(engine_zmoe, policy, prefetch):
    """Ctrl-C landing in the expert engine (loads in flight, predicted loads issued, slots
    being moved, a pool admission) leaves it serving the same bits: every later reply is that
    of the unbudgeted model."""
    with zipmoe_rt.load(engine_zmoe) as ref:
        want = ref.chat([{"role": "user", "content": LAST}], **KW)
    with zipmoe_rt.load(engine_zmoe, memory_budget="40%", policy=policy,
                        prefetch=prefetch) as m:
        eng, stopped = m.engine, 0
        assert m.policy == policy
        for name in ("_resolve", "_start", "_prepare", "_issue_prefetch", "_adapt_slots",
                     "_claim_prefetched", "_recycle"):
            if not hasattr(eng, name):
                continue
            for n, after in ((1, False), (3, True), (9, False), (20, True)):
                s = m.chat_session()
                undo = _interrupting(eng, name, n, after)
                try:
                    _turn(s, FIRST)
                except KeyboardInterrupt:
                    stopped += 1
                finally:
                    undo()
                assert _turn(m.chat_session(), LAST) == want, (name, n, after)
        assert stopped >= 15


def test_the_terminal_repl_says_the_turn_was_cancelled(engine_zmoe, monkeypatch, capsys):
    """The REPL's terminal branch (banner, prompt, stats lines): Ctrl-C while the second
    turn's prompt is prefilled prints the one notice line and no stats line; the third turn
    is answered as in a conversation without the second."""
    import builtins

    from zipmoe_rt import cli_repl
    from zipmoe_rt.cli_stats import session_stats, stats_line
    lines = iter([FIRST, LONG, LAST, "/stats"])

    def typed(prompt=""):
        try:
            return next(lines)
        except StopIteration:
            raise EOFError from None
    monkeypatch.setattr(builtins, "input", typed)
    monkeypatch.setattr(cli_repl, "_pending_input", lambda *a: False)
    with zipmoe_rt.load(engine_zmoe) as m:
        session = m.chat_session()
        prefills = []
        real = type(m.net).forward.__get__(m.net)

        def forward(ids, *a, **kw):
            if len(ids) > 1:
                prefills.append(len(ids))
                if len(prefills) == 2:
                    raise KeyboardInterrupt
            return real(ids, *a, **kw)
        m.net.forward = forward
        failed = cli_repl.repl(m, session, dict(KW), [], stats_line, session_stats, True,
                               "BANNER")
        del m.net.forward
        assert failed == 0 and len(prefills) == 3
        out, err = capsys.readouterr()
        fresh = m.chat_session()
        want = [_turn(fresh, FIRST), _turn(fresh, LAST)]
        assert out.splitlines() == want
        assert f"\r{cli_repl.CANCELLED_TURN}" in err.split("\n")          # once
        assert err.count(cli_repl.CANCELLED_TURN) == 1
        assert len([l for l in err.split("\n") if l.startswith("[")]) == 3   # 2 + /stats
        assert session.messages == fresh.messages
        assert session.state.token_ids == fresh.state.token_ids


# -- an interrupt inside the cache's commit ---------------------------------------------------
@pytest.mark.parametrize("step", [0, 3])       # the prefill's commit, or a decode step's
def test_ctrl_c_between_two_layers_commits_leaves_every_layer_as_it_was(model, step):
    """``ModelCache.commit`` interrupted after some layers counted the new tokens (a Ctrl-C
    landing between two of its calls): every layer goes back to the tokens the cache holds,
    and going on gives the tokens of a run that stopped at the same place without it."""
    from zipmoe_rt.generate import CacheState, SamplingParams, generate
    ids = model.tokenizer.encode(FIRST)

    def run(interrupt: bool):
        state = CacheState.new(model.net)
        gen = generate(model.net, ids, SamplingParams(max_tokens=20), cache=state)
        for _ in range(step):
            next(gen)
        if interrupt:
            lc = state.cache.layers[1]
            real = lc.commit

            def boom(n):
                del lc.commit
                raise KeyboardInterrupt
            lc.commit = boom
            with pytest.raises(KeyboardInterrupt):
                next(gen)
            assert not hasattr(lc, "commit") or lc.commit == real
        gen.close()
        assert [lc.length for lc in state.cache.layers] == \
            [state.cache.offset] * len(state.cache.layers) == [len(state.token_ids)] * \
            len(state.cache.layers)
        more = generate(model.net, gen.pending_ids + model.tokenizer.encode(LAST),
                        SamplingParams(max_tokens=8), cache=state).collect()
        return state.token_ids, more
    assert run(True) == run(False)


# -- a file the next run reads ----------------------------------------------------------------
def test_ctrl_c_while_calibrate_writes_leaves_the_old_calibration(engine_zmoe, tmp_path,
                                                                   monkeypatch):
    """``calibrate`` replaces the calibration file whole: interrupted while writing it, the
    earlier file is left as it was (not a truncated one the next run refuses), with no
    temporary file beside it."""
    import json
    import os
    import shutil
    import signal

    from click.testing import CliRunner

    from zipmoe_rt.cli import main
    from zipmoe_rt.engine import profile as prof
    z = tmp_path / "m.zmoe"
    shutil.copy(engine_zmoe, z)
    cpath = prof.sidecar(z, prof.CALIB_SUFFIX)
    cpath.write_text('{"earlier": 1}')
    cal = {k: 0.001 for k in ("sm_read_s", "exp_read_s", "decode_s", "matmul_s")}
    cal.update(decode_Gweights_per_s=1.0, read_GBps=1.0)
    monkeypatch.setattr(prof, "calibrate", lambda *a, **kw: cal)
    real = os.replace

    def interrupted(*a, **kw):
        raise KeyboardInterrupt
    monkeypatch.setattr(os, "replace", interrupted)
    handler = signal.getsignal(signal.SIGINT)
    try:
        r = CliRunner().invoke(main, ["calibrate", str(z)], env={"ZIPMOE_RT_DEBUG": None})
    finally:
        signal.signal(signal.SIGINT, handler)     # (the CLI ignores a second Ctrl-C)
    assert r.exit_code == 130 and "interrupted" in r.stderr
    assert cpath.read_text() == '{"earlier": 1}'
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["m.zmoe", cpath.name])
    monkeypatch.setattr(os, "replace", real)
    r = CliRunner().invoke(main, ["calibrate", str(z)], env={"ZIPMOE_RT_DEBUG": None})
    assert r.exit_code == 0 and json.loads(cpath.read_text()) == cal


def test_stats_line_says_stopped_for_a_reply_cut_short_and_cancelled_for_a_withdrawn_turn():
    from types import SimpleNamespace

    from zipmoe_rt.cli_stats import stats_line

    def st(n, reason):
        return SimpleNamespace(prompt_tokens=5, cached_tokens=0, generated_tokens=n,
                               finish_reason=reason, ttft_s=None, prefill_tokens_per_s=None,
                               decode_tokens_per_s=None)
    assert "7 generated (stopped);" in stats_line(st(7, "cancelled"))
    assert "0 generated (cancelled);" in stats_line(st(0, "cancelled"))
    assert "7 generated (length);" in stats_line(st(7, "length"))


class CancelAtLayer:
    """A decoder layer that counts the calls of every layer sharing ``calls`` and sets
    ``event`` during call number ``at`` (as a server's disconnect watcher would, from another
    thread, while that layer runs)."""

    def __init__(self, layer, calls: list, at: int, event):
        self.layer, self.calls, self.at, self.event = layer, calls, at, event

    def __getattr__(self, name):
        return getattr(self.layer, name)

    def __call__(self, *a, **kw):
        self.calls.append(1)
        if len(self.calls) == self.at:
            self.event.set()
        return self.layer(*a, **kw)


@pytest.mark.parametrize("batch", [0, 2])      # the first prefill batch, or after two committed
def test_a_cancel_event_stops_the_prefill_within_one_layer(model, monkeypatch, batch):
    """``token_steps(..., cancel=event)``: an event set while a layer of the prefill runs stops
    it before the next layer (no later layer or batch runs), the run ends with
    ``finish_reason="cancelled"`` and no token, the state holds what it held before the prefill
    (batches already committed are cropped back), and the next request on it gives the tokens
    of a state that never saw the cancelled one."""
    import threading

    from zipmoe_rt.generate import CacheState

    tok = model.tokenizer
    chat = lambda *texts: tok.encode_chat(      # noqa: E731
        [{"role": "user", "content": t} for t in texts], add_generation_prompt=True)
    params = model.sampling(**KW)

    def run(state, ids, cancel=None):
        new = state.sync_prefix(ids, model.net)
        return [s.token_id for s in model.token_steps(new, params, state, cancel=cancel)]

    state = CacheState.new(model.net)
    run(state, chat(FIRST))
    held = list(state.token_ids)
    n_layers = len(model.net.layers)
    at = batch * n_layers + 1                   # the first layer of that batch
    calls, event = [], threading.Event()
    layers = model.net.layers
    monkeypatch.setattr(model.net, "layers",
                        [CancelAtLayer(layer, calls, at, event) for layer in layers])
    long_ids = chat(FIRST, LONG)
    new = state.sync_prefix(long_ids, model.net)
    assert len(new) > (batch + 1) * M.PREFILL_UBATCH      # the prompt has later batches
    start = list(state.token_ids)
    steps = list(model.token_steps(new, params, state, cancel=event))
    assert len(calls) == at                               # no layer after the one running
    assert [s.token_id for s in steps] == [None]
    assert steps[0].stats.finish_reason == "cancelled" and steps[0].stats.generated_tokens == 0
    assert state.valid and state.token_ids == start and state.cache.offset == len(start)
    assert held[:len(start)] == start
    monkeypatch.setattr(model.net, "layers", layers)
    got = run(state, chat(FIRST, LAST))
    fresh = CacheState.new(model.net)
    run(fresh, chat(FIRST))
    assert got == run(fresh, chat(FIRST, LAST)) and len(got) > 0
    assert state.token_ids == fresh.token_ids


@pytest.mark.parametrize("policy, prefetch", [("zip-lru", "on"), ("zipmoe", "on")])
def test_a_cancel_event_in_the_expert_engine_changes_no_later_reply(engine_zmoe, monkeypatch,
                                                                    policy, prefetch):
    """A cancel event seen before any layer of a prefill on a budgeted engine (expert loads
    and predicted loads in flight for the layer that does not run) leaves it serving the same
    bits: the next reply is that of the unbudgeted model."""
    import threading

    with zipmoe_rt.load(engine_zmoe) as ref:
        want = ref.chat([{"role": "user", "content": LAST}], **KW)
    with zipmoe_rt.load(engine_zmoe, memory_budget="40%", policy=policy,
                        prefetch=prefetch) as m:
        layers = m.net.layers
        ids = m.tokenizer.encode_chat([{"role": "user", "content": LONG}],
                                      add_generation_prompt=True)
        for at in range(1, len(layers)):         # set while a layer before the last runs
            calls, event = [], threading.Event()
            monkeypatch.setattr(m.net, "layers",
                                [CancelAtLayer(layer, calls, at, event) for layer in layers])
            steps = list(m.token_steps(ids, m.sampling(**KW), cancel=event))
            monkeypatch.setattr(m.net, "layers", layers)
            assert len(calls) == at and steps[-1].stats.finish_reason == "cancelled"
            assert m.chat([{"role": "user", "content": LAST}], **KW) == want, at
