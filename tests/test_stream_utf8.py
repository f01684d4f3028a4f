"""Streaming detokenization with a byte-level BPE: every character is returned with the token
that completes it (a token holding a space and the first bytes of an emoji returns the space),
and the pieces always add up to the full decode."""
from __future__ import annotations

import codecs

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from test_tokenizer import _byte_token_ids, _stream, ours
from zipmoe_rt.tokenizer import REPLACEMENT_CHAR, StreamDecoder


def _token_bytes(tk, token_id: int) -> bytes:
    """The bytes a byte-level BPE token stands for (inverse of the GPT-2 byte table)."""
    table = _byte_token_ids()
    char_to_byte = {tk.id_to_token(table[b]): b for b in range(256)}
    return bytes(char_to_byte[c] for c in tk.id_to_token(token_id))


def _complete_text(data: bytes) -> str:
    """The characters of ``data`` that are complete: an incomplete UTF-8 sequence at the end is
    left out (invalid bytes become U+FFFD)."""
    return codecs.getincrementaldecoder("utf-8")("replace").decode(data, final=False)


def _check_every_step(tk, ids: list[int]) -> list[str]:
    dec = StreamDecoder(tk)
    pieces, data = [], b""
    for k, i in enumerate(ids):
        pieces.append(dec.push(i))
        data += _token_bytes(tk, i)
        got = "".join(pieces)
        assert tk.decode(ids[:k + 1]).startswith(got)
        want = _complete_text(data)
        # nothing complete is held back; a trailing U+FFFD of an invalid byte may wait one token
        # (the decoder cannot tell it from an incomplete sequence's)
        assert got == want or (want.endswith(REPLACEMENT_CHAR) and got == want[:-1]), (k, pieces)
    pieces.append(dec.flush())
    assert "".join(pieces) == tk.decode(ids)
    return pieces


def test_space_then_emoji_space_arrives_with_its_token():
    tk = ours()
    ids = tk.encode("Hi 😀", add_special_tokens=False)
    tokens = [tk.id_to_token(i) for i in ids]
    assert tokens == ["H", "i", "ĠðŁ", "ĺ", "Ģ"]       # the space shares a token with emoji bytes
    assert _check_every_step(tk, ids) == ["H", "i", " ", "", "😀", ""]


def test_cjk_characters_arrive_with_the_token_that_completes_them():
    tk = ours()
    ids = tk.encode("日本語のテキスト", add_special_tokens=False)
    assert len(ids) > 1
    pieces = _check_every_step(tk, ids)
    assert pieces[0] != "" and pieces[0] == _complete_text(_token_bytes(tk, ids[0]))


def test_combining_mark_and_emoji_modifier():
    tk = ours()
    for text in ["Grüße e\u0301 naïve", "👍🏽 ok", "a\u0301\u0323 日本 😀🎉🚀 x"]:
        _check_every_step(tk, tk.encode(text, add_special_tokens=False))


@pytest.mark.parametrize("text", ["Hi 😀", "日本語のテキスト", "e\u0301😀 中文"])
def test_byte_by_byte(text):
    tk = ours()
    table = _byte_token_ids()
    _check_every_step(tk, [table[b] for b in text.encode("utf-8")])


@settings(max_examples=150, deadline=None)
@given(text=st.text(alphabet=st.sampled_from(list("ab ,.\n") + ["😀", "🎉", "日", "本", "語", "é",
                                                                   "\u0301", "\u0323", "👍", "🏽",
                                                                   "Ж", "한"]), max_size=24))
def test_every_step_random_multibyte_text(text):
    tk = ours()
    _check_every_step(tk, tk.encode(text, add_special_tokens=False))


@settings(max_examples=150, deadline=None)
@given(data=st.lists(st.sampled_from([0xE2, 0x82, 0xAC, 0xF0, 0x9F, 0x98, 0x80, 0xFF, 0xC3,
                                      0xA9, 0x41, 0x20]), max_size=40))
def test_every_step_broken_bytes(data):
    tk = ours()
    table = _byte_token_ids()
    _check_every_step(tk, [table[b] for b in data])


def test_pieces_with_context_and_long_invalid_runs():
    tk = ours()
    table = _byte_token_ids()
    ids = [table[0xFF]] * 40 + tk.encode(" 😀 日本", add_special_tokens=False)
    dec = StreamDecoder(tk, max_hold=4)
    pieces = []
    for i in ids:
        pieces.append(dec.push(i))
        assert dec.pending_tokens <= 5
    pieces.append(dec.flush())
    assert "".join(pieces) == tk.decode(ids)
    assert _stream(tk, ids) == _stream(tk, ids)
