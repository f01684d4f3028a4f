"""Tokenizers rebuilt from real GGUF vocabularies against llama.cpp's reference vectors.

llama.cpp ships, in the ``llama-cpp-python`` sdist, vocabulary-only GGUFs of real models
(``models/ggml-vocab-NAME.gguf``) with test vectors: ``.inp`` holds texts separated by
``\\n__ggml_vocab_test__\\n``, ``.out`` one line of ids per text, written by
``convert_hf_to_gguf_update.py`` with transformers' ``AutoTokenizer`` on the original Hugging
Face repository (``encode(text, add_special_tokens=False)``). Every line must match exactly.
The files come through :mod:`tests.pypi_data` (cached; skipped when offline).
"""
from __future__ import annotations

import unicodedata

import pytest

from zipmoe_rt.convert.gguf_tokenizer import (BPE_PRE_TOKENIZERS, build_gguf_tokenizer,
                                              read_gguf_metadata, sentencepiece_merges)
from zipmoe_rt.tokenizer import Tokenizer

from pypi_data import pypi_files

#: vocabulary -> (tokenizer.ggml.model, tokenizer.ggml.pre, normalizer of the original).
#: qwen2: Qwen2/Qwen2.5/Qwen3 (Qwen2-MoE, Qwen3-MoE); deepseek-llm: DeepSeek-LLM and -V2 (MoE);
#: llama-spm: Llama-2's sentencepiece vocabulary, the algorithm of Mixtral's; phi-3: Phi-3.5-MoE.
VOCABS = {
    "qwen2": ("gpt2", "qwen2", "NFC"),
    "qwen35": ("gpt2", "qwen35", None),
    "deepseek-llm": ("gpt2", "deepseek-llm", None),
    "deepseek-coder": ("gpt2", "deepseek-coder", None),
    "llama-bpe": ("gpt2", "llama-bpe", None),
    "llama-spm": ("llama", "default", None),
    "phi-3": ("llama", "default", None),
    "gpt-2": ("gpt2", "gpt-2", None),
    "mpt": ("gpt2", "mpt", "NFC"),
    "starcoder": ("gpt2", "starcoder", None),
    "refact": ("gpt2", "refact", None),
    "command-r": ("gpt2", "command-r", "NFC"),
    "falcon": ("gpt2", "falcon", None),
}
SEP = "\n__ggml_vocab_test__\n"


@pytest.fixture(scope="module")
def vocab_dir():
    return pypi_files("llama-cpp-python", ["models/ggml-vocab-*"]) / "models"


def _vectors(vocab_dir, name):
    raw = (vocab_dir / f"ggml-vocab-{name}.gguf.inp").read_bytes().decode("utf-8")
    texts = raw.split(SEP)
    if texts[-1] == "":       # the writer ends every text with the separator
        texts.pop()
    lines = (vocab_dir / f"ggml-vocab-{name}.gguf.out").read_text(encoding="utf-8").split("\n")
    assert lines[-1] == ""
    ids = [[int(x) for x in line.split()] for line in lines[:-1]]
    assert len(texts) == len(ids) >= 46
    return texts, ids


@pytest.mark.parametrize("name", sorted(VOCABS))
def test_gguf_vocab_matches_reference_vectors(vocab_dir, name):
    model, pre, norm = VOCABS[name]
    meta = read_gguf_metadata(vocab_dir / f"ggml-vocab-{name}.gguf", "tokenizer.")
    assert meta["tokenizer.ggml.model"] == model
    assert meta.get("tokenizer.ggml.pre", "default") == pre
    assert model == "llama" or pre in BPE_PRE_TOKENIZERS
    tok = build_gguf_tokenizer(meta)
    assert tok.get_vocab_size(with_added_tokens=True) == len(meta["tokenizer.ggml.tokens"])
    texts, expected = _vectors(vocab_dir, name)
    wrong = [(t, e, tok.encode(t, add_special_tokens=False).ids) for t, e in zip(texts, expected)
             if tok.encode(t, add_special_tokens=False).ids != e]
    assert not wrong, f"{name}: {len(wrong)}/{len(texts)} texts differ, first: {wrong[0]}"
    # decoding the reference ids gives the text back (after the original's normalizer)
    for t, e in zip(texts, expected):
        back = tok.decode(e, skip_special_tokens=False)
        assert back == (unicodedata.normalize(norm, t) if norm else t), (name, t)


def test_reference_vectors_are_discriminating(vocab_dir):
    """The vectors tell the pre-tokenizers apart: GPT-2's split on the Qwen2 and DeepSeek
    vocabularies gets lines wrong (transformers' GGUF loader has no split for deepseek-*)."""
    from tokenizers import pre_tokenizers

    for name in ("qwen2", "deepseek-llm", "deepseek-coder", "llama-bpe"):
        tok = build_gguf_tokenizer(read_gguf_metadata(vocab_dir / f"ggml-vocab-{name}.gguf", "tokenizer."))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
        texts, expected = _vectors(vocab_dir, name)
        assert sum(tok.encode(t, add_special_tokens=False).ids != e
                   for t, e in zip(texts, expected)) >= 1, name


def test_gguf_metadata_reader_matches_gguf_package(vocab_dir):
    gguf = pytest.importorskip("gguf")
    path = vocab_dir / "ggml-vocab-deepseek-coder.gguf"
    ours = read_gguf_metadata(path)
    r = gguf.GGUFReader(path)
    assert set(ours) == {k for k in r.fields if not k.startswith("GGUF.")}
    for key, field in r.fields.items():
        if key.startswith("GGUF."):
            continue
        assert ours[key] == field.contents(), key


def test_gguf_metadata_reader_errors(tmp_path, vocab_dir):
    bad = tmp_path / "bad.gguf"
    bad.write_bytes(b"GGML" + bytes(20))
    with pytest.raises(ValueError, match="bad.gguf: not a GGUF file"):
        read_gguf_metadata(bad)
    bad.write_bytes(b"GGUF" + (7).to_bytes(4, "little") + bytes(16))
    with pytest.raises(ValueError, match="GGUF version 7"):
        read_gguf_metadata(bad)
    data = (vocab_dir / "ggml-vocab-deepseek-coder.gguf").read_bytes()
    bad.write_bytes(data[:5000])
    with pytest.raises(ValueError, match="bad.gguf"):
        read_gguf_metadata(bad)


def test_build_errors_name_the_field():
    base = {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.tokens": ["a", "b", "ab"],
            "tokenizer.ggml.merges": ["a b"]}
    assert build_gguf_tokenizer(base).encode("abba").ids == [2, 1, 0]
    with pytest.raises(ValueError, match="tokenizer.ggml.model is 'bert'"):
        build_gguf_tokenizer({**base, "tokenizer.ggml.model": "bert"})
    with pytest.raises(ValueError, match="tokenizer.ggml.merges: missing"):
        build_gguf_tokenizer({k: v for k, v in base.items() if k != "tokenizer.ggml.merges"})
    with pytest.raises(ValueError, match="tokenizer.ggml.tokens: missing"):
        build_gguf_tokenizer({"tokenizer.ggml.model": "gpt2"})
    with pytest.raises(ValueError, match="tokenizer.ggml.token_type: 2 entries for 3 tokens"):
        build_gguf_tokenizer({**base, "tokenizer.ggml.token_type": [1, 1]})
    with pytest.raises(ValueError, match="tokenizer.ggml.scores: missing"):
        build_gguf_tokenizer({**base, "tokenizer.ggml.model": "llama"})


def test_sentencepiece_merges_rank_by_score():
    pieces = ["<unk>", "a", "b", "c", "ab", "bc", "abc"]
    scores = [0.0, -1.0, -1.0, -1.0, -3.0, -2.0, -4.0]
    merges = sentencepiece_merges(pieces, scores, keep=lambda i: i != 0)
    # "bc" (score -2) before "ab" (-3); "abc" splits as a+bc and ab+c, ordered by piece ids
    assert merges == [("b", "c"), ("a", "b"), ("a", "bc"), ("ab", "c")]


def test_gguf_tokenizer_through_runtime_tokenizer(vocab_dir):
    """The rebuilt Qwen2 tokenizer serialises to a tokenizer.json the runtime loads, with
    ChatML specials whole and special-token skipping on decode."""
    meta = read_gguf_metadata(vocab_dir / "ggml-vocab-qwen2.gguf", "tokenizer.")
    tk = Tokenizer(build_gguf_tokenizer(meta).to_str(), meta.get("tokenizer.chat_template"),
                   eos_token="<|im_end|>")
    ids = tk.encode_chat([{"role": "user", "content": "Hi 123"}])
    assert ids[0] == tk.token_to_id("<|im_start|>") == 151644
    assert tk.decode(ids, skip_special_tokens=True) == "system\nYou are a helpful assistant\nuser\nHi 123\nassistant\n"
    assert tk.encode("1234") == [16, 17, 18, 19]     # Qwen2 splits every digit
