"""The embedding API (zipmoe_rt.load / Model / ChatSession) on a tiny random Mixtral with a small
byte-level BPE tokenizer and chat template written at test time; greedy output is checked against
the token loop, the tokenizer and transformers (fp32) on the same checkpoint."""
from __future__ import annotations

import json
import random
import shutil
from pathlib import Path

import pytest

import zmoe
import zipmoe_rt

#: A newline-free chat template (so a reply is always one line of text: see test_cli.py).
TEMPLATE = ("{% for m in messages %}<|im_start|>{{ m['role'] }}: {{ m['content'] }}<|im_end|>"
            "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant: {% endif %}")
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
WORDS = ("hello world the quick brown fox jumps over lazy dog what is capital of france paris tell "
         "me story about a cat and then again please thanks yes no maybe reset system be brief "
         "answer question").split()


def _tokenizer_json(vocab_size: int, specials=SPECIALS, more_alphabet=()) -> str:
    """A byte-level BPE over printable ASCII (no newline; ``more_alphabet``: more characters of
    the byte-level alphabet) with exactly ``vocab_size`` ids, so every id the random model can
    sample decodes to text; ``specials`` its special tokens."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tk = Tokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    alphabet = [chr(c) for c in range(0x21, 0x7F)] + ["\u0120", *more_alphabet]  # '!'..'~', space
    rng = random.Random(0)
    text = " ".join(rng.choice(WORDS) for _ in range(3000))
    tk.train_from_iterator([text], trainer=trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(specials), initial_alphabet=alphabet,
        limit_alphabet=len(alphabet), show_progress=False))
    n = tk.get_vocab_size()
    tk.add_tokens([f"<x{i}>" for i in range(vocab_size - n)])
    assert tk.get_vocab_size() == vocab_size
    return tk.to_str()


def make_chat_model(src: Path, dest: Path, generation_config: dict | None = None) -> Path:
    """Copy checkpoint ``src`` to ``dest``, add tokenizer.json + tokenizer_config.json (chat template,
    EOS ``<|im_end|>``) and optionally generation_config.json, convert; return ``dest``.zmoe."""
    from zipmoe_rt.convert.converter import convert

    dest.mkdir(parents=True)
    for f in src.iterdir():
        shutil.copy(f, dest / f.name)
    cfg = json.loads((src / "config.json").read_text())
    vocab = cfg.get("text_config", cfg)["vocab_size"]       # a VL config nests its text model
    (dest / "tokenizer.json").write_text(_tokenizer_json(vocab))
    (dest / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": "<|endoftext|>", "eos_token": "<|im_end|>", "chat_template": TEMPLATE}))
    if generation_config is not None:
        (dest / "generation_config.json").write_text(json.dumps(generation_config))
    return convert(dest, dest.with_suffix(".zmoe"), progress=False)


@pytest.fixture(scope="module")
def tiny_src(tiny_moe_dir) -> Path:
    return tiny_moe_dir("mixtral")


@pytest.fixture(scope="module")
def tiny_zmoe(tiny_src, tmp_path_factory) -> Path:
    return make_chat_model(tiny_src, tmp_path_factory.mktemp("api") / "tiny-chat")


@pytest.fixture(scope="module")
def model(tiny_zmoe):
    m = zipmoe_rt.load(tiny_zmoe)
    yield m
    m.close()


def _greedy_ids(model, prompt_ids, n):
    """Greedy ids from the low-level token loop (zipmoe_rt.generate), stop ids honoured."""
    from zipmoe_rt.generate import SamplingParams, generate
    return generate(model.net, prompt_ids, SamplingParams(max_tokens=n), model.stop_ids).collect()


def _hf_greedy_ids(folder, prompt_ids, n, stop_ids):
    """Greedy ids from transformers (fp32, full forward each step): the oracle."""
    torch = pytest.importorskip("torch")
    from tiny_models import load_hf
    hf = load_hf(folder)
    ids = list(prompt_ids)
    out = []
    with torch.no_grad():
        for _ in range(n):
            t = int(hf(torch.tensor([ids])).logits[0, -1].argmax())
            if t in stop_ids:
                break
            out.append(t)
            ids.append(t)
    return out


# -- load ---------------------------------------------------------------------------------------
def test_load_exposes_model_facts(model, tiny_zmoe):
    assert model.path == tiny_zmoe
    assert model.name == "tiny-chat"
    assert model.hparams["architecture"] == "MixtralForCausalLM"
    assert model.hparams["num_experts"] == 4 and model.hparams["num_experts_per_tok"] == 2
    im_end = model.tokenizer.token_to_id("<|im_end|>")
    assert model.tokenizer.eos_token_id == im_end
    # config.json's eos_token_id (2) and the tokenizer's EOS; here the same id
    assert model.stop_ids == frozenset({2, im_end})
    assert model.last_stats is None


def test_budgeted_load_keeps_no_duplicate_weights_and_same_output(model, tiny_zmoe):
    """Under a memory budget the source keeps no dense copies of its own (q/k/v live only
    concatenated in the model), the tokenizer JSON is released from the metadata (the model's
    tokenizer is unaffected), a short run allocates only the KV positions it needs, and the
    text is the same."""
    budget = model.source.dense_bytes() + sum(l.full_bytes for l in model.source.layouts.values())
    with zipmoe_rt.load(tiny_zmoe, memory_budget=budget, policy="zip-lru") as m:
        assert m.source._dense == {}
        assert "tokenizer.json" not in m.source.metadata
        assert m.tokenizer.encode("hello world") == model.tokenizer.encode("hello world")
        assert m.net.new_cache(max_tokens=5).capacity == 5
        assert m.net.new_cache(max_tokens=10_000).capacity == m.net.new_cache().capacity
        for prompt in ("hello world, the quick brown fox", "tell me a story"):
            assert m.generate(prompt, max_tokens=12) == model.generate(prompt, max_tokens=12)


def test_load_non_zmoe_file_raises_not_zmoe(tmp_path):
    p = tmp_path / "notes.zmoe"
    p.write_text("just some text, not a container\n")
    with pytest.raises(zmoe.NotZmoeError, match="not a .zmoe file"):
        zipmoe_rt.load(p)


def test_load_folder_raises_value_error_with_convert_hint(tiny_src):
    with pytest.raises(ValueError, match=r"is a folder.*zipmoe-rt convert"):
        zipmoe_rt.load(tiny_src)


def test_load_missing_file(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.zmoe"):
        zipmoe_rt.load(tmp_path / "nope.zmoe")


def test_load_zmoe_without_tokenizer_raises(tiny_src, tmp_path):
    from zipmoe_rt.convert.converter import convert
    p = convert(tiny_src, tmp_path / "notok.zmoe", progress=False)
    with pytest.raises(ValueError, match="has no tokenizer"):
        zipmoe_rt.load(p)


# -- generate / stream --------------------------------------------------------------------------
def test_generate_equals_transformers_greedy(model, tiny_zmoe):
    prompt = "hello world, the quick brown fox"
    ids = model.tokenizer.encode(prompt)
    text = model.generate(prompt, max_tokens=12)
    hf_ids = _hf_greedy_ids(tiny_zmoe.with_suffix(""), ids, 12, model.stop_ids)
    assert len(hf_ids) == 12
    assert text == model.tokenizer.decode(hf_ids, skip_special_tokens=True)
    assert text and not text.startswith(prompt)
    st = model.last_stats
    assert (st.prompt_tokens, st.cached_tokens) == (len(ids), 0)
    assert (st.generated_tokens, st.output_tokens) == (12, 12)
    assert st.finish_reason == "length" and st.stop_token_id is None
    assert st.ttft_s > 0 and st.prefill_tokens_per_s == pytest.approx(len(ids) / st.ttft_s)
    assert st.decode_s > 0 and st.decode_tokens_per_s == pytest.approx(11 / st.decode_s)
    assert st.tpot_s == pytest.approx(st.decode_s / 11)


def test_generate_accepts_token_ids(model):
    ids = model.tokenizer.encode("tell me a story")
    assert model.generate(ids, max_tokens=7) == model.generate("tell me a story", max_tokens=7)
    assert model.generate(ids, max_tokens=7) == model.tokenizer.decode(
        _greedy_ids(model, ids, 7), skip_special_tokens=True)


def test_stream_pieces_concatenate_to_generate(model):
    prompt = "once upon a time"
    pieces = list(model.stream(prompt, max_tokens=20))
    assert len(pieces) > 1 and all(isinstance(p, str) and p for p in pieces)
    full = model.generate(prompt, max_tokens=20)
    assert "".join(pieces) == full
    # sampled: the same seed gives the same pieces, and they still join to generate's text
    kw = dict(max_tokens=20, temperature=0.9, top_k=40, top_p=0.95, seed=7)
    sampled = list(model.stream(prompt, **kw))
    assert "".join(sampled) == model.generate(prompt, **kw)
    assert model.last_stats.output_tokens == 20


def test_seed_reproducible_and_seeds_differ(model):
    kw = dict(max_tokens=24, temperature=1.5)
    a = model.generate("the lazy dog", seed=1, **kw)
    b = model.generate("the lazy dog", seed=1, **kw)
    c = model.generate("the lazy dog", seed=2, **kw)
    assert a == b
    assert a != c


def test_top_p_zero_keeps_only_the_most_likely_token(model):
    # generate.py documents top_p in [0, 1] and "always keeping the most likely token"
    greedy = model.generate("what is the capital", max_tokens=10)
    assert model.generate("what is the capital", max_tokens=10, temperature=1.0, top_p=0.0,
                          seed=3) == greedy


def test_stream_closed_early_is_cancelled(model):
    it = model.stream("hello", max_tokens=50)
    got = [next(it), next(it)]
    it.close()
    st = model.last_stats
    assert st.finish_reason == "cancelled"
    assert st.output_tokens == 2 and st.generated_tokens == 2
    assert "".join(got) == model.generate("hello", max_tokens=2)


@pytest.mark.parametrize("kw, name", [
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=1.5), "top_p"),
    (dict(top_p=-0.1), "top_p"),
    (dict(top_k=-1), "top_k"),
    (dict(top_k=2.5), "top_k"),
    (dict(min_p=1.2), "min_p"),
    (dict(repetition_penalty=0.0), "repetition_penalty"),
    (dict(seed=-3), "seed"),
    (dict(max_tokens=0), "max_tokens"),
])
def test_sampling_validation_names_the_option(model, kw, name):
    model.last_stats = None
    msgs = [{"role": "user", "content": "hi"}]
    with pytest.raises(ValueError, match=rf"^{name}:"):
        model.generate("hi", **kw)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        model.stream("hi", **kw)          # raised at the call, before iterating
    with pytest.raises(ValueError, match=rf"^{name}:"):
        model.chat(msgs, **kw)
    with pytest.raises(ValueError, match=rf"^{name}:"):
        model.chat(msgs, stream=True, **kw)
    assert model.last_stats is None       # nothing ran
    session = model.chat_session()
    with pytest.raises(ValueError, match=rf"^{name}:"):
        list(session.send("hi", **kw))
    assert session.messages == []          # a rejected turn leaves the conversation as it was


def test_unknown_sampling_option_is_a_type_error(model):
    with pytest.raises(TypeError, match="top_q"):
        model.generate("hi", top_q=0.5)


def test_empty_prompt_rejected(model):
    with pytest.raises(ValueError, match="prompt"):
        model.generate("")


# -- chat -------------------------------------------------------------------------------------------
def test_chat_applies_template_and_matches_generate(model):
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": "what is the capital of france"}]
    assert model.tokenizer.apply_chat_template(msgs) == (
        "<|im_start|>system: be brief<|im_end|><|im_start|>user: what is the capital of france"
        "<|im_end|><|im_start|>assistant: ")
    ids = model.tokenizer.encode_chat(msgs)
    reply = model.chat(msgs, max_tokens=10)
    assert reply == model.tokenizer.decode(_greedy_ids(model, ids, 10), skip_special_tokens=True)
    assert model.last_stats.prompt_tokens == len(ids)
    assert model.last_stats.output_tokens == 10 and model.last_stats.finish_reason == "length"
    assert reply == model.generate(ids, max_tokens=10)
    pieces = list(model.chat(msgs, max_tokens=10, stream=True))
    assert len(pieces) > 1 and "".join(pieces) == reply


def test_chat_default_max_tokens_is_512(model):
    model.chat([{"role": "user", "content": "what is the capital of france"}])
    st = model.last_stats
    assert st.finish_reason == "length" and st.output_tokens == st.generated_tokens == 512


def test_finish_reason_stop_on_eos(tiny_src, model, tmp_path):
    msgs = [{"role": "user", "content": "hello world"}]
    ids = model.tokenizer.encode_chat(msgs)
    toks = _greedy_ids(model, ids, 12)
    k = next(i for i in range(2, len(toks)) if toks[i] not in toks[:i])
    # the same weights, with generation_config naming the k-th greedy token as EOS
    p = make_chat_model(tiny_src, tmp_path / "eos", generation_config={"eos_token_id": toks[k]})
    with zipmoe_rt.load(p) as m2:
        assert toks[k] in m2.stop_ids
        reply = m2.chat(msgs, max_tokens=50)
        st = m2.last_stats
        assert reply == m2.tokenizer.decode(toks[:k], skip_special_tokens=True)
        assert st.finish_reason == "stop" and st.stop_token_id == toks[k]
        assert (st.output_tokens, st.generated_tokens) == (k, k + 1)
        # streaming stops at the same place
        assert "".join(m2.chat(msgs, max_tokens=50, stream=True)) == reply
        # and max_tokens below the stop position gives "length"
        m2.chat(msgs, max_tokens=k)
        assert m2.last_stats.finish_reason == "length" and m2.last_stats.output_tokens == k


@pytest.mark.parametrize("msgs, match", [
    ([{"content": "hi"}], r"messages\[0\]: missing 'role'"),
    ([{"role": "user", "content": "a"}, {"role": "user"}], r"messages\[1\]: missing 'content'"),
    ([{"role": 3, "content": "hi"}], r"messages\[0\]\['role'\]"),
    ([], "empty"),
])
def test_bad_messages_raise_value_error(model, msgs, match):
    with pytest.raises(ValueError, match=match):
        model.chat(msgs)
    with pytest.raises(ValueError, match=match):
        model.chat(msgs, stream=True)


def test_bad_message_in_session_leaves_conversation_unchanged(model):
    s = model.chat_session()
    with pytest.raises(ValueError, match="content"):
        list(s.send(None))
    assert s.messages == []
    reply = "".join(s.send("hello", max_tokens=5))
    assert reply == model.chat([{"role": "user", "content": "hello"}], max_tokens=5)


# -- chat sessions ---------------------------------------------------------------------------------
def test_session_reuses_kv_cache_and_matches_fresh_chat(model):
    s = model.chat_session(system="be brief")
    sys_msg = {"role": "system", "content": "be brief"}
    r1 = "".join(s.send("hello world", max_tokens=8))
    st1 = model.last_stats
    assert st1.cached_tokens == 0
    assert r1 == model.chat([sys_msg, {"role": "user", "content": "hello world"}], max_tokens=8)

    r2 = "".join(s.send("what is the capital of france", max_tokens=8))
    st2 = s.last_stats
    assert s.messages == [{"role": "user", "content": "hello world"},
                          {"role": "assistant", "content": r1},
                          {"role": "user", "content": "what is the capital of france"},
                          {"role": "assistant", "content": r2}]
    full_ids = model.tokenizer.encode_chat([sys_msg] + s.messages[:3])
    first_prompt = model.tokenizer.encode_chat(
        [sys_msg, {"role": "user", "content": "hello world"}])
    assert st2.cached_tokens >= len(first_prompt)          # at least the whole first prompt reused
    assert st2.cached_tokens + st2.prompt_tokens == len(full_ids)
    assert st2.output_tokens == 8
    fresh = model.chat([sys_msg] + s.messages[:3], max_tokens=8)
    assert r2 == fresh


def test_session_reset_and_system(model):
    s = model.chat_session()
    "".join(s.send("hello world", max_tokens=4))
    s.reset(system="be brief")
    assert s.messages == [] and s.system == "be brief"
    r = "".join(s.send("tell me a story", max_tokens=6))
    assert model.last_stats.cached_tokens == 0
    assert r == model.chat([{"role": "system", "content": "be brief"},
                            {"role": "user", "content": "tell me a story"}], max_tokens=6)
    s.reset()  # keeps the system prompt
    assert s.system == "be brief" and s.messages == []


def test_interrupted_stream_then_new_turn(model):
    s = model.chat_session()
    got = []
    for piece in s.send("hello world", max_tokens=60):
        got.append(piece)
        if len(got) == 2:
            break
    assert model.last_stats.finish_reason == "cancelled"
    assert model.last_stats.output_tokens == 2
    partial = "".join(got)
    assert s.messages == [{"role": "user", "content": "hello world"},
                          {"role": "assistant", "content": partial}]
    r2 = "".join(s.send("tell me a story", max_tokens=8))
    assert model.last_stats.finish_reason == "length" and model.last_stats.cached_tokens > 0
    transcript = [{"role": "user", "content": "hello world"},
                  {"role": "assistant", "content": partial},
                  {"role": "user", "content": "tell me a story"}]
    assert r2 == model.chat(transcript, max_tokens=8)
    assert s.messages == transcript + [{"role": "assistant", "content": r2}]


def test_session_sampling_reproducible(model):
    kw = dict(max_tokens=10, temperature=0.8, seed=5)
    a = "".join(model.chat_session().send("hello world", **kw))
    b = "".join(model.chat_session().send("hello world", **kw))
    assert a == b == model.chat([{"role": "user", "content": "hello world"}], **kw)


def test_package_exports_what_api_all_lists():
    import zipmoe_rt
    from zipmoe_rt import api
    for name in api.__all__:
        assert getattr(zipmoe_rt, name) is getattr(api, name)


# -- threads ------------------------------------------------------------------------------------
THREAD_PROMPTS = ["hello world, the quick brown fox", "tell me a story about a cat"]


def _run_threads(fns, timeout=120):
    """Run each callable in its own thread; return their results (re-raising the first error)."""
    import threading
    out, errors = [None] * len(fns), []

    def call(i):
        try:
            out[i] = fns[i]()
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    ts = [threading.Thread(target=call, args=(i,), daemon=True) for i in range(len(fns))]
    for t in ts:
        t.start()
    for t in ts:
        t.join(timeout)
    assert not any(t.is_alive() for t in ts), "a thread is stuck"
    if errors:
        raise errors[0]
    return out


@pytest.mark.parametrize("budgeted", [False, True], ids=["unbudgeted", "budgeted"])
def test_two_threads_sharing_a_model_get_the_sequential_greedy_outputs(tiny_zmoe, budgeted):
    """Two threads generate on one Model at once (started together, and forced to alternate
    token by token with both streams open): each gets exactly the text of the same call made
    alone; forward passes are serialised by the model's lock, so nothing waits forever."""
    import threading
    kw = {"memory_budget": "60%", "policy": "zip-lru"} if budgeted else {}
    with zipmoe_rt.load(tiny_zmoe, **kw) as m:
        want = [m.generate(p, max_tokens=20) for p in THREAD_PROMPTS]
        assert want[0] != want[1]
        barrier = threading.Barrier(2)

        def together(p):
            def run():
                barrier.wait(timeout=60)
                return m.generate(p, max_tokens=20)
            return run
        assert _run_threads([together(p) for p in THREAD_PROMPTS]) == want

        turn = threading.Condition()
        state = {"next": 0, "done": [False, False]}

        def alternating(i):
            def run():
                pieces = []
                it = m.stream(THREAD_PROMPTS[i], max_tokens=20)
                while True:
                    with turn:   # wait for our turn (or for the other stream to have ended)
                        assert turn.wait_for(lambda: state["next"] == i or state["done"][1 - i],
                                             timeout=60)
                    piece = next(it, None)
                    with turn:
                        state["next"] = 1 - i
                        if piece is None:
                            state["done"][i] = True
                        turn.notify_all()
                    if piece is None:
                        return "".join(pieces)
                    pieces.append(piece)
            return run
        assert _run_threads([alternating(0), alternating(1)]) == want


def test_a_chat_session_takes_one_reply_at_a_time(model):
    """A second send() on a session whose reply is still streaming (another thread's, or this
    thread's own unfinished one) raises a clear RuntimeError and leaves the conversation as it
    was; once the first reply is closed, the session goes on as if nothing happened."""
    s = model.chat_session()
    first = s.send("hello world", max_tokens=8)
    assert next(first)
    with pytest.raises(RuntimeError, match="still being generated"):
        next(s.send("tell me a story", max_tokens=8))
    with pytest.raises(RuntimeError, match="still being generated"):
        _run_threads([lambda: next(s.send("tell me a story", max_tokens=8))])
    with pytest.raises(RuntimeError, match="still being generated"):
        s.reset()
    rest = "".join(first)
    assert [m["role"] for m in s.messages] == ["user", "assistant"]
    reply = "".join(s.send("tell me a story", max_tokens=8))
    fresh = model.chat([{"role": "user", "content": "hello world"},
                        {"role": "assistant", "content": s.messages[1]["content"]},
                        {"role": "user", "content": "tell me a story"}], max_tokens=8)
    assert reply == fresh and s.messages[1]["content"].endswith(rest)


def test_closed_model_refuses_new_work(tiny_zmoe):
    m = zipmoe_rt.load(tiny_zmoe)
    it = m.stream("hello world", max_tokens=5)
    m.close()
    m.close()   # twice is harmless
    with pytest.raises(RuntimeError, match="closed"):
        next(it)


def test_chat_with_a_lone_surrogate_names_the_message_and_character(model):
    """A lone surrogate in a message: the error names the message field and the character in
    it (as the server does), not a position in the rendered prompt."""
    with pytest.raises(ValueError) as e:
        model.chat([{"role": "user", "content": "\ud800"}], max_tokens=1)
    assert str(e.value) == ("messages[0].content: not valid Unicode (a lone surrogate \\ud800 "
                            "at character 0)")
    msgs = [{"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "ab\udcff"}]}]
    with pytest.raises(ValueError, match=r"^messages\[1\]\.content\[0\]\.text: not valid "
                                         r"Unicode \(a lone surrogate \\udcff at character 2\)$"):
        model.tokenizer.apply_chat_template(msgs)
    s = model.chat_session()
    with pytest.raises(ValueError, match=r"^messages\[0\]\.content: .* at character 3\)$"):
        s.send("abc\ud800")
    assert s.messages == []


def _stop_within(text: str) -> tuple[str, str]:
    """A stop string taken from the middle of ``text`` and the text before its first
    occurrence."""
    assert len(text) >= 8, text
    stop = text[4:7]
    return stop, text[:text.find(stop)]


def test_stop_strings_in_generate_chat_and_session(model):
    """``stop=`` as the CLI's --stop and the server's ``stop``: the text before the first stop
    string, generation ended there (``finish_reason="stop"``); a session keeps exactly the
    text returned as the assistant's turn."""
    prompt = "tell me a story about a cat"
    full = model.generate(prompt, max_tokens=24)
    stop, want = _stop_within(full)
    assert model.generate(prompt, max_tokens=24, stop=[stop, "\x01never"]) == want
    assert model.last_stats.finish_reason == "stop" and model.last_stats.output_tokens < 24
    assert "".join(model.stream(prompt, max_tokens=24, stop=stop)) == want

    msgs = [{"role": "user", "content": prompt}]
    reply = model.chat(msgs, max_tokens=24)
    stop, want = _stop_within(reply)
    assert model.chat(msgs, max_tokens=24, stop=stop) == want
    assert model.last_stats.finish_reason == "stop"
    assert "".join(model.chat(msgs, max_tokens=24, stream=True, stop=[stop])) == want

    s = model.chat_session()
    got = "".join(s.send(prompt, max_tokens=24, stop=[stop]))
    assert got == want
    assert s.messages == [{"role": "user", "content": prompt},
                          {"role": "assistant", "content": want}]
    assert model.last_stats.finish_reason == "stop"
    # the next turn renders the kept text: the same as a fresh chat of that conversation
    nxt = "".join(s.send("thanks", max_tokens=6))
    assert nxt == model.chat(s.messages[:-1], max_tokens=6)

    with pytest.raises(TypeError, match=r"^stop: expected a str or a list of str"):
        model.generate(prompt, stop=5)
    with pytest.raises(ValueError, match=r"^stop: a stop string must have at least one"):
        model.chat(msgs, stop=[""])


def test_unknown_keyword_names_the_public_method(model):
    with pytest.raises(TypeError) as e:
        model.chat([{"role": "user", "content": "hi"}], stops=["x"])
    assert str(e.value) == (
        "Model.chat() got an unexpected keyword argument 'stops'; it takes messages, max_tokens, "
        "stream, skip_special_tokens, stop, temperature, top_k, top_p, min_p, "
        "repetition_penalty, seed")
    with pytest.raises(TypeError, match=r"^Model\.generate\(\) got an unexpected keyword "
                                        r"argument 'n'"):
        model.generate("hi", n=2)
    with pytest.raises(TypeError, match=r"^ChatSession\.send\(\) got an unexpected keyword "):
        model.chat_session().send("hi", logprobs=True)


def test_max_tokens_minus_one_runs_to_the_end_of_the_context(model):
    """``max_tokens=-1`` as the CLI's ``-n -1``: until a stop token or the context is full."""
    prompt = "tell me a story"
    n = len(model.tokenizer.encode(prompt))
    maxpos = model.hparams["max_position_embeddings"]
    assert model.fit_context(n, -1) == maxpos - n + 1
    try:
        model.ctx_size = n + 5
        assert model.fit_context(n, -1) == 6
        text = model.generate(prompt, max_tokens=-1)
        assert text == model.generate(prompt, max_tokens=6)
        assert model.last_stats.output_tokens <= 6
        msgs = [{"role": "user", "content": "hi"}]
        m = len(model.tokenizer.encode_chat(msgs, add_generation_prompt=True))
        model.ctx_size = m + 3
        assert model.chat(msgs, max_tokens=-1) == model.chat(msgs, max_tokens=4)
    finally:
        model.ctx_size = None
    for bad in (-2, 0):
        with pytest.raises(ValueError, match="max_tokens"):
            model.generate(prompt, max_tokens=bad)


def test_past_the_trained_context_without_ctx_size_warns(model):
    """No ``ctx_size``: a prompt longer than ``max_position_embeddings`` runs but warns once
    (ContextWarning naming both sizes), as llama.cpp warns past ``n_ctx_train``; one that fits
    does not warn, whatever ``max_tokens`` asks (a reply may stop early); with ``ctx_size`` the
    limit refuses instead."""
    import warnings

    from zipmoe_rt.api_args import ContextWarning
    maxpos = model.hparams["max_position_embeddings"]
    assert model.ctx_size is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert model.fit_context(maxpos, 40) == 40
        assert model.fit_context(10, 8) == 8
    with pytest.warns(ContextWarning) as got:
        assert model.fit_context(maxpos + 1, 5) == 5
    assert len(got) == 1
    assert str(got[0].message) == (
        f"prompt: {maxpos + 1} tokens are more than the {maxpos} positions the model was "
        f"trained for (max_position_embeddings); output past that position may degrade (set "
        f"Model.ctx_size to refuse such prompts)")
    ids = [1] * (maxpos + 2)
    with pytest.warns(ContextWarning, match=f"prompt: {maxpos + 2} tokens are more than"):
        model.generate(ids, max_tokens=1)
    try:
        model.ctx_size = maxpos
        with warnings.catch_warnings():
            warnings.simplefilter("error")
            with pytest.raises(ValueError, match="do not fit the context"):
                model.fit_context(maxpos + 1, 1)
    finally:
        model.ctx_size = None
