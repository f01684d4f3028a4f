"""Tests for zipmoe_rt.tokenizer against transformers (the oracle) on a byte-level BPE trained here."""
from __future__ import annotations

import functools
import json

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import decoders, models, pre_tokenizers, processors, trainers

from zipmoe_rt.convert.gguf_tokenizer import bytes_to_unicode
from zipmoe_rt.tokenizer import REPLACEMENT_CHAR, StreamDecoder, Tokenizer

SMOLLM2_TEMPLATE = (
    "{% for message in messages %}{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n' }}"
    "{% endif %}{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Exercises trim_blocks / lstrip_blocks, loop controls, namespace, tojson, tools, bos_token, a
# {% generation %} block, and reasoning aliasing.
FANCY_TEMPLATE = """{{ bos_token }}
{% set ns = namespace(n=0) %}
{% if tools %}
    <tools>{{ tools | tojson }}</tools>
{% endif %}
{% for message in messages %}
    {% if message['role'] == 'skip' %}{% continue %}{% endif %}
    {% set ns.n = ns.n + 1 %}
    <|im_start|>{{ message['role'] }}
    {% if message['role'] == 'assistant' %}
        {% generation %}{% if message.reasoning_content %}<think>{{ message.reasoning_content }}</think>{% endif %}{{ message['content'] }}{% endgeneration %}
    {% else %}
        {{ message['content'] }}
    {% endif %}
<|im_end|>
{% endfor %}
count={{ ns.n }} {{ {'é': 1, 'b': [1, 2]} | tojson }} {{ custom_var | default('none') }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

TRAIN_TEXT = (
    "Hello world! The quick brown fox jumps over the lazy dog. It's 12:30, isn't it?\n" * 30
    + "Grüße aus München, naïve café, résumé, piñata. Ελληνικά κείμενο. Русский текст тут.\n" * 15
    + "日本語のテキストです。中文文本在这里。한국어 텍스트. 😀🎉🚀 emoji party 👍🏽.\n" * 15
    + "def f(x):\n    return x * 2  # code\n\tTabs and  double  spaces.\n" * 10
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]


@functools.lru_cache(maxsize=None)
def tokenizer_json() -> str:
    """A byte-level BPE (GPT-2 / SmolLM style) trained on TRAIN_TEXT, as a tokenizer.json string."""
    tk = HFTokenizer(models.BPE())
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tk.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=600,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tk.train_from_iterator([TRAIN_TEXT], trainer=trainer)
    return tk.to_str()


@functools.lru_cache(maxsize=None)
def ours(template: str = SMOLLM2_TEMPLATE, **kw) -> Tokenizer:
    return Tokenizer(tokenizer_json(), template, bos_token="<|endoftext|>", eos_token="<|im_end|>", **kw)


def hf(template: str = SMOLLM2_TEMPLATE, **kw):
    transformers = pytest.importorskip("transformers")
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=HFTokenizer.from_str(tokenizer_json()),
        chat_template=template,
        bos_token="<|endoftext|>",
        eos_token="<|im_end|>",
        **kw,
    )


def _byte_token_ids() -> list[int]:
    """Ids of the 256 single-byte tokens, indexed by byte value."""
    b2u = pre_tokenizers.ByteLevel.alphabet()  # the 256 printable stand-ins
    tk = ours()
    table = bytes_to_unicode()                 # GPT-2's byte -> stand-in table
    assert set(table.values()) == set(b2u)
    return [tk.token_to_id(table[b]) for b in range(256)]


CONVERSATIONS = [
    [{"role": "user", "content": "Hello!"}],
    [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Grüße aus München 😀"},
        {"role": "assistant", "content": "Hallo! 日本語"},
        {"role": "user", "content": "  spaces  and\nnewlines\t"},
    ],
    [{"role": "user", "content": "<|im_start|> literal special token <|im_end|>"}],
    [{"role": "user", "content": ""}],
]

TEXTS = [
    "",
    "Hello world!",
    " leading space and trailing ",
    "Grüße aus München, naïve café 😀🎉 日本語のテキスト",
    "<|im_start|>user\nhi<|im_end|>\n",
    "unseen wörds: ÆØÅ ЖЩ 🦀 \x00\x07 tabs\tand\r\nCRLF",
]


# ------------------------------------------------------------------ encode / decode vs transformers


@pytest.mark.parametrize("text", TEXTS)
@pytest.mark.parametrize("add_special_tokens", [True, False])
def test_encode_decode_match_transformers(text, add_special_tokens):
    ref = hf()
    ids = ours().encode(text, add_special_tokens=add_special_tokens)
    assert ids == ref.encode(text, add_special_tokens=add_special_tokens)
    assert ours().decode(ids) == ref.decode(ids)
    assert ours().decode(ids, skip_special_tokens=True) == ref.decode(ids, skip_special_tokens=True)
    assert ours().decode(ids) == text  # byte-level BPE is lossless


def test_encode_refuses_text_that_is_not_unicode():
    """A lone surrogate has no UTF-8 form: a ValueError naming its index, not the tokenizers
    library's TypeError ("TextInputSequence must be str")."""
    with pytest.raises(ValueError, match=r"text: not valid Unicode: .* at index 1"):
        ours().encode("\x00\udcff")
    assert ours().encode("\x00\u00ff") == hf().encode("\x00\u00ff")


@pytest.mark.parametrize("add_bos,add_eos", [(True, False), (False, True), (True, True), (False, False)])
def test_explicit_add_bos_eos_matches_transformers(add_bos, add_eos):
    ref = hf(add_bos_token=add_bos, add_eos_token=add_eos)
    tk = Tokenizer(tokenizer_json(), SMOLLM2_TEMPLATE, bos_token="<|endoftext|>", eos_token="<|im_end|>",
                   add_bos_token=add_bos, add_eos_token=add_eos)
    for text in TEXTS:
        assert tk.encode(text) == ref.encode(text)
        assert tk.encode(text, add_special_tokens=False) == ref.encode(text, add_special_tokens=False)
    ids = tk.encode("hi")
    assert (ids[0] == tk.bos_token_id) == add_bos
    assert (ids[-1] == tk.eos_token_id) == add_eos


def test_special_token_ids_and_vocab():
    tk = ours()
    assert tk.bos_token_id == tk.token_to_id("<|endoftext|>") == 0
    assert tk.eos_token_id == tk.token_to_id("<|im_end|>")
    assert len(tk) == tk.vocab_size == len(hf())
    assert tk.id_to_token(tk.eos_token_id) == "<|im_end|>"


def test_from_hf_config():
    cfg = {
        "bos_token": {"content": "<|endoftext|>", "special": True},
        "eos_token": "<|im_end|>",
        "add_bos_token": True,
        "chat_template": [{"name": "default", "template": SMOLLM2_TEMPLATE}, {"name": "tool_use", "template": "x"}],
    }
    tk = Tokenizer.from_hf_config(tokenizer_json(), cfg)
    assert tk.encode("hi")[0] == tk.bos_token_id
    assert tk.chat_template == SMOLLM2_TEMPLATE
    tk2 = Tokenizer.from_hf_config(tokenizer_json(), cfg, chat_template="{{ 'jinja file wins' }}")
    assert tk2.apply_chat_template([{"role": "user", "content": "x"}]) == "jinja file wins"


def test_from_dir(tmp_path):
    (tmp_path / "tokenizer.json").write_text(tokenizer_json(), encoding="utf-8")
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<|im_end|>"}), encoding="utf-8")
    (tmp_path / "chat_template.jinja").write_text(SMOLLM2_TEMPLATE, encoding="utf-8")
    tk = Tokenizer.from_dir(tmp_path)
    assert tk.eos_token_id == ours().eos_token_id
    assert tk.encode_chat(CONVERSATIONS[0]) == ours().encode_chat(CONVERSATIONS[0])


# ------------------------------------------------------------------ chat template vs transformers


@pytest.mark.parametrize("conv", CONVERSATIONS)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(conv, add_generation_prompt):
    ref = hf()
    text = ours().apply_chat_template(conv, add_generation_prompt=add_generation_prompt)
    assert text == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt)
    ids = ours().encode_chat(conv, add_generation_prompt=add_generation_prompt)
    ref_ids = ref.apply_chat_template(conv, tokenize=True, add_generation_prompt=add_generation_prompt,
                                      return_dict=False)
    assert ids == list(ref_ids)


def test_smollm2_rendering_literal():
    text = ours().apply_chat_template([{"role": "user", "content": "Hi"}])
    assert text == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = ours().encode_chat([{"role": "user", "content": "Hi"}])
    assert ids[0] == ours().token_to_id("<|im_start|>")  # no BOS added on top of the template
    assert ids.count(ours().token_to_id("<|im_end|>")) == 2


@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_fancy_template_matches_transformers(add_generation_prompt):
    conv = [
        {"role": "system", "content": "sys"},
        {"role": "skip", "content": "dropped by continue"},
        {"role": "user", "content": "q", "name": None},
        {"role": "assistant", "content": "a", "reasoning": "because"},
        {"role": "assistant", "content": "b", "thinking": "hmm"},
    ]
    tools = [{"type": "function", "function": {"name": "f", "description": "ünïcode <b>", "parameters": {}}}]
    kwargs = dict(tools=tools, custom_var="custom")
    ref = hf(FANCY_TEMPLATE)
    tk = ours(FANCY_TEMPLATE)
    for kw in (kwargs, {}):
        text = tk.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, **kw)
        assert text == ref.apply_chat_template(conv, tokenize=False, add_generation_prompt=add_generation_prompt, **kw)
        assert tk.encode_chat(conv, add_generation_prompt, **kw) == list(
            ref.apply_chat_template(conv, add_generation_prompt=add_generation_prompt, return_dict=False, **kw)
        )
    assert "<think>because</think>" in text and "<think>hmm</think>" in text


def test_template_globals():
    tk = Tokenizer(tokenizer_json(), "{{ strftime_now('%Y') | length }}|{{ dict(a=1).a }}|{{ [1,'é'] | tojson }}")
    assert tk.apply_chat_template([{"role": "user", "content": ""}]) == '4|1|[1, "é"]'


# ------------------------------------------------------------------ errors


def test_bad_template_raises_value_error():
    with pytest.raises(ValueError, match="chat_template.*line 1"):
        Tokenizer(tokenizer_json(), "{% for m in messages %}{{ m }")
    with pytest.raises(ValueError, match="chat_template"):
        Tokenizer(tokenizer_json(), None).apply_chat_template([{"role": "user", "content": "x"}])


def test_template_raise_exception_becomes_value_error():
    tpl = "{% if messages[0]['role'] != 'user' %}{{ raise_exception('Conversation must start with user') }}{% endif %}ok"
    tk = Tokenizer(tokenizer_json(), tpl)
    assert tk.apply_chat_template([{"role": "user", "content": "x"}]) == "ok"
    with pytest.raises(ValueError, match="chat_template: Conversation must start with user"):
        tk.apply_chat_template([{"role": "assistant", "content": "x"}])


def test_sandbox_blocks_escapes():
    tk = Tokenizer(tokenizer_json(), "{{ messages.__class__.__mro__ }}")
    with pytest.raises(ValueError, match="chat_template"):
        tk.apply_chat_template([{"role": "user", "content": "x"}])
    tk = Tokenizer(tokenizer_json(), "{% set ns = namespace() %}{% set ns._x = 1 %}")
    with pytest.raises(ValueError, match="chat_template"):
        tk.apply_chat_template([{"role": "user", "content": "x"}])


@pytest.mark.parametrize(
    "messages,match",
    [
        ([{"content": "x"}], r"messages\[0\]: missing 'role'"),
        ([{"role": "user", "content": "x"}, {"role": "user"}], r"messages\[1\]: missing 'content'"),
        ([{"role": "user", "content": None}], r"messages\[0\]: missing 'content'"),
        ([{"role": 3, "content": "x"}], r"messages\[0\]\['role'\]"),
        ([{"role": "user", "content": 3}], r"messages\[0\]\['content'\]"),
        ([], "messages: the conversation is empty"),
    ],
)
def test_bad_messages_raise_value_error(messages, match):
    with pytest.raises(ValueError, match=match):
        ours().apply_chat_template(messages)
    with pytest.raises(ValueError, match=match):
        ours().encode_chat(messages)


def test_bad_message_type_raises_type_error():
    with pytest.raises(TypeError, match=r"messages\[0\]"):
        ours().apply_chat_template(["hello"])


def test_tool_call_message_without_content_is_allowed():
    tpl = "{% for m in messages %}{{ m.role }}:{{ m.content | default('-') }};{% endfor %}"
    tk = Tokenizer(tokenizer_json(), tpl)
    out = tk.apply_chat_template([{"role": "assistant", "tool_calls": [{"name": "f"}], "content": None}])
    assert out == "assistant:-;"


def test_bad_construction_errors():
    with pytest.raises(ValueError, match="tokenizer_json"):
        Tokenizer("{not json")
    with pytest.raises(ValueError, match="eos_token"):
        Tokenizer(tokenizer_json(), eos_token="<|not_in_vocab|>")
    with pytest.raises(ValueError, match="add_bos_token"):
        Tokenizer(tokenizer_json(), add_bos_token=True)


# ------------------------------------------------------------------ streaming detokenization


def _stream(tk: Tokenizer, ids: list[int], **kw) -> list[str]:
    dec = StreamDecoder(tk, **kw)
    pieces = [dec.push(i) for i in ids]
    pieces.append(dec.flush())
    return pieces


def _check_stream(tk: Tokenizer, ids: list[int], skip_special_tokens: bool = False) -> None:
    pieces = _stream(tk, ids, skip_special_tokens=skip_special_tokens)
    full = tk.decode(ids, skip_special_tokens=skip_special_tokens)
    assert "".join(pieces) == full
    # Each piece sits at a fixed place of the full text; a U+FFFD in a piece must be there too.
    pos = 0
    for piece in pieces:
        assert full[pos:pos + len(piece)] == piece
        pos += len(piece)
    # Pieces before the flush never end in a replacement char that the full text does not have
    # (i.e. an incomplete UTF-8 sequence is never released early).
    for piece in pieces[:-1]:
        assert REPLACEMENT_CHAR not in piece or REPLACEMENT_CHAR in full


@functools.lru_cache(maxsize=None)
def _id_pool() -> tuple[int, ...]:
    """Ids to draw from: all single-byte tokens (incl. UTF-8 lead / continuation bytes), specials, merges."""
    tk = ours()
    return tuple(range(tk.vocab_size))


def _utf8_byte_ids(text: str) -> list[int]:
    table = _byte_token_ids()
    return [table[b] for b in text.encode("utf-8")]


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(ids=st.lists(st.sampled_from(_id_pool()), max_size=40), skip=st.booleans())
def test_stream_random_ids(ids, skip):
    _check_stream(ours(), ids, skip_special_tokens=skip)


@settings(max_examples=300, deadline=None)
@given(text=st.text(max_size=30), split_bytes=st.booleans())
def test_stream_text_byte_by_byte_never_leaks_broken_utf8(text, split_bytes):
    tk = ours()
    ids = _utf8_byte_ids(text) if split_bytes else tk.encode(text, add_special_tokens=False)
    pieces = _stream(tk, ids)
    assert "".join(pieces) == text
    if REPLACEMENT_CHAR not in text:
        assert all(REPLACEMENT_CHAR not in p for p in pieces)


@settings(max_examples=200, deadline=None)
@given(chunks=st.lists(st.one_of(
    st.text(max_size=4).map(lambda t: ("text", t)),
    st.sampled_from([0xF0, 0x9F, 0x98, 0x80, 0xE2, 0x82, 0xAC, 0xC3, 0xFF, 0xBF]).map(lambda b: ("byte", b)),
    st.sampled_from(SPECIALS).map(lambda s: ("special", s)),
), max_size=30))
def test_stream_mixed_partial_bytes(chunks):
    tk = ours()
    table = _byte_token_ids()
    ids: list[int] = []
    for kind, v in chunks:
        if kind == "text":
            ids += _utf8_byte_ids(v)
        elif kind == "byte":
            ids.append(table[v])
        else:
            ids.append(tk.token_to_id(v))
    _check_stream(tk, ids)
    _check_stream(tk, ids, skip_special_tokens=True)


@settings(max_examples=300, deadline=None)
@given(data=st.lists(st.sampled_from([0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0xFF, 0xC3, 0xA9, 0x41]),
                     max_size=60),
       max_hold=st.sampled_from([4, 5, 8]))
def test_stream_release_of_long_holds_is_exact(data, max_hold):
    """Mostly broken UTF-8 with a tiny max_hold: releases must split only at true boundaries."""
    tk = ours()
    table = _byte_token_ids()
    ids = [table[b] for b in data]
    dec = StreamDecoder(tk, max_hold=max_hold)
    pieces = [dec.push(i) for i in ids] + [dec.flush()]
    full = tk.decode(ids)
    assert "".join(pieces) == full == bytes(data).decode("utf-8", errors="replace")


def test_stream_holds_partial_emoji():
    tk = ours()
    ids = _utf8_byte_ids("a😀b")
    dec = StreamDecoder(tk)
    out = [dec.push(i) for i in ids]
    assert out == ["a", "", "", "", "😀", "b"]
    assert dec.flush() == ""


def test_stream_long_run_of_invalid_bytes_is_released_and_bounded():
    tk = ours()
    table = _byte_token_ids()
    ids = [table[0xFF]] * 100 + _utf8_byte_ids("x")
    dec = StreamDecoder(tk, max_hold=16)
    pieces = []
    for i in ids[:-1]:
        pieces.append(dec.push(i))
        assert dec.pending_tokens <= 17
    assert "".join(pieces) != ""  # released before the end
    pieces += [dec.push(ids[-1]), dec.flush()]
    assert "".join(pieces) == tk.decode(ids) == REPLACEMENT_CHAR * 100 + "x"


def test_stream_window_stays_small():
    tk = ours()
    ids = tk.encode(TRAIN_TEXT[:3000], add_special_tokens=False)
    dec = StreamDecoder(tk)
    out = []
    for i in ids:
        out.append(dec.push(i))
        assert len(dec._ids) <= 8  # prefix window, not the whole sequence
    out.append(dec.flush())
    assert "".join(out) == TRAIN_TEXT[:3000]


def test_stream_context_ids():
    tk = ours()
    prompt = tk.encode("Hello", add_special_tokens=False)
    gen = tk.encode(" world 😀!", add_special_tokens=False)
    dec = tk.stream_decoder(context_ids=prompt)
    text = "".join(dec.push(i) for i in gen) + dec.flush()
    assert text == tk.decode(prompt + gen)[len(tk.decode(prompt)):] == " world 😀!"


def test_stream_matches_metaspace_decoder():
    """A SentencePiece-style decoder (Metaspace drops the first token's leading space)."""
    tk_ = HFTokenizer(models.BPE(unk_token="<unk>"))
    tk_.pre_tokenizer = pre_tokenizers.Metaspace()
    tk_.decoder = decoders.Metaspace()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<unk>", "<s>", "</s>"], show_progress=False)
    tk_.train_from_iterator([TRAIN_TEXT[:2000]], trainer=trainer)
    tk = Tokenizer(tk_.to_str(), bos_token="<s>", eos_token="</s>")
    ids = tk.encode("Hello world, the quick brown fox.", add_special_tokens=False)
    pieces = _stream(tk, ids)
    assert "".join(pieces) == tk.decode(ids) == "Hello world, the quick brown fox."
