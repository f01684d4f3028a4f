"""A ``tokenizers.Tokenizer`` rebuilt from a GGUF file's ``tokenizer.ggml.*`` metadata.

A GGUF carries no ``tokenizer.json``: it stores the vocabulary (``tokenizer.ggml.tokens``), the
token types, the BPE merges or the sentencepiece scores, the special-token ids and the name of
the pre-tokenizer the vocabulary was trained with (``tokenizer.ggml.pre``, as llama.cpp's
``convert_hf_to_gguf.py`` names it). :func:`build_gguf_tokenizer` turns that back into the
tokenizer of the original Hugging Face repository:

* ``tokenizer.ggml.model == "gpt2"`` (byte-level BPE): the vocabulary respelled in GPT-2's byte
  alphabet where it is not already, the file's merges, a ``ByteLevel`` decoder and, from
  :data:`BPE_PRE_TOKENIZERS`, the normalizer, pre-tokenizer and ``ignore_merges`` flag of the
  original ``tokenizer.json`` for that ``pre`` name (Qwen2/Qwen3-MoE ``qwen2``, DeepSeek
  ``deepseek-llm`` / ``deepseek-coder`` / ``deepseek-v3``, Llama-3 ``llama-bpe``, ...). A name
  not in the table keeps GPT-2's own split (``ByteLevel(use_regex=True)``), which is what
  transformers' GGUF loader does for it (``integrations/gguf/gguf_tokenizer_mapping.py``).
* ``tokenizer.ggml.model == "llama"`` (sentencepiece BPE: Llama-2, Mistral/Mixtral, Phi-3): a
  byte-fallback BPE whose merges are recovered from the scores (the merge of two pieces ranks by
  the score of the piece it makes), with the ``Prepend("▁")`` + ``Replace(" ", "▁")`` normalizer
  and the ``Replace / ByteFallback / Fuse / Strip`` decoder of those repositories'
  ``tokenizer.json``.

CONTROL and UNKNOWN tokens (types 3, 2) become special added tokens and USER_DEFINED ones
(type 4) plain added tokens, as llama.cpp matches both whole in the text. The result is checked
against llama.cpp's test vectors (``models/ggml-vocab-*.gguf.inp/.out``, made with transformers'
``AutoTokenizer`` on the original repositories) in ``tests/test_gguf_vocab.py``, and against
original ``tokenizer.json`` files in ``tests/test_hf_tokenizer_files.py``.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

__all__ = ["BPE_PRE_TOKENIZERS", "build_gguf_tokenizer", "bytes_to_unicode", "read_gguf_metadata",
           "sentencepiece_bpe", "sentencepiece_merges"]

# llama.cpp token types (``llama_token_type``).
TOKEN_NORMAL, TOKEN_UNKNOWN, TOKEN_CONTROL, TOKEN_USER_DEFINED, TOKEN_UNUSED, TOKEN_BYTE = 1, 2, 3, 4, 5, 6

# -- split expressions of the original tokenizer.json files (tokenizers' Rust regex syntax) ------

_CONTRACTIONS = r"(?i:'s|'t|'re|'ve|'m|'ll|'d)"
#: Llama-3 / cl100k: letters with one leading non-letter, digits in runs of up to three.
_LLAMA3 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Qwen2 / Qwen3: as Llama-3 but every digit on its own.
_QWEN2 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
#: Qwen3.5: as Qwen2, combining marks kept with their letters.
_QWEN35 = (_CONTRACTIONS + r"|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*"
           r"|\s*[\r\n]+|\s+(?!\S)|\s+")
#: CJK ideographs, U+0800-U+4E00 and Hangul: DeepSeek-LLM/Coder's run of "wide" characters.
_CJK = "[\u4e00-\u9fa5\u0800-\u4e00\uac00-\ud7ff]+"
#: DeepSeek-LLM (and DeepSeek-V2): letters of the cased scripts, ASCII/full-width punctuation,
#: trailing whitespace, CJK runs and digit runs are split off one after the other.
_DEEPSEEK_LLM = (
    "[\r\n]",
    "\\s?[A-Za-z\u00b5\u00c0-\u00d6\u00d8-\u00f6\u00f8-\u01ba\u01bc-\u01bf\u01c4-\u0293\u0295-\u02af"
    "\u0370-\u0373\u0376\u0377\u037b-\u037d\u037f\u0386\u0388-\u038a\u038c\u038e-\u03a1"
    "\u03a3-\u03f5\u03f7-\u0481\u048a-\u052f\u0531-\u0556\u10a0-\u10c5\u13a0-\u13f5\u13f8-\u13fd"
    "\u1c90-\u1cba\u1cbd-\u1cbf\u1d00-\u1d2b\u1d6b-\u1d77\u1d79-\u1d9a\u1e00-\u1f15\u1f18-\u1f1d"
    "\u1f20-\u1f45\u1f48-\u1f4d\u1f50-\u1f57\u1f59\u1f5b\u1f5d\u1f5f-\u1f7d\u1f80-\u1fb4"
    "\u1fb6-\u1fbc\u1fbe\u1fc2-\u1fc4\u1fc6-\u1fcc\u1fd0-\u1fd3\u1fd6-\u1fdb\u1fe0-\u1fec"
    "\u1ff2-\u1ff4\u1ff6-\u1ffc\u2102\u2107\u210a-\u2113\u2115\u2119-\u211d\u2124\u2126\u2128"
    "\u212a-\u212d\u212f-\u2134\u2139\u213c-\u213f\u2145-\u2149\u214e\u2183\u2184\u2c00-\u2c7b"
    "\u2c7e-\u2ce4\u2ceb-\u2cee\u2cf2\u2cf3\ua640-\ua66d\ua680-\ua69b\ua722-\ua76f\ua771-\ua787"
    "\ua78b-\ua78e\uab70-\uabbf\ufb00-\ufb06\ufb13-\ufb17\uff21-\uff3a\uff41-\uff5a"
    "\U00010400-\U0001044f\U000104b0-\U000104d3\U000104d8-\U000104fb\U00010c80-\U00010cb2"
    "\U00010cc0-\U00010cf2\U000118a0-\U000118df\U0001e900-\U0001e943]+",
    "\\s?[!-/:-~\uff01-\uff0f\uff1a-\uff5e\u2018-\u201f\u3000-\u3002]+",
    "\\s+$",
    _CJK,
)
#: DeepSeek-Coder: letters, punctuation, CJK runs, then single digits.
_DEEPSEEK_CODER = ("[\r\n]", r"\s?\p{L}+", r"\s?\p{P}+", _CJK)
#: DeepSeek-V3 / R1: digit groups of up to three, CJK/kana runs, then a cl100k-like split.
_DEEPSEEK_V3 = (
    r"\p{N}{1,3}",
    "[\u4e00-\u9fa5\u3040-\u309f\u30a0-\u30ff]+",
    "[!\"#$%&'()*+,\\-./:;<=>?@\\[\\\\\\]^_`{|}~][A-Za-z]+|[^\r\n\\p{L}\\p{P}\\p{S}]?[\\p{L}\\p{M}]+"
    "| ?[\\p{P}\\p{S}]+[\r\n]*|\\s*[\r\n]+|\\s+(?!\\S)|\\s+",
)

# A pre-tokenizer recipe: (normalizer, steps, ignore_merges). Steps are
# ("split", regex) -- Split(Regex, "isolated") --, ("digits", individual) -- Digits --,
# ("punct",) -- Punctuation("contiguous") --, ("bytes", use_regex) -- ByteLevel(add_prefix_space=
# False, use_regex) --. Every recipe ends with ByteLevel; normalizer is None or "nfc".
_Recipe = tuple[str | None, tuple[tuple[Any, ...], ...], bool]


def _splits(*regexes: str) -> tuple[tuple[str, str], ...]:
    return tuple(("split", r) for r in regexes)


_GPT2: _Recipe = (None, (("bytes", True),), False)
_STARCODER: _Recipe = (None, (("digits", True), ("bytes", True)), False)

#: ``tokenizer.ggml.pre`` name -> how the original ``tokenizer.json`` normalizes and splits text.
#: Sources: each model's Hugging Face ``tokenizer.json``; the names are llama.cpp's
#: (``convert_hf_to_gguf_update.py``, ``src/llama-vocab.cpp``).
BPE_PRE_TOKENIZERS: dict[str, _Recipe] = {
    "gpt-2": _GPT2,
    "mpt": ("nfc", (("bytes", True),), False),            # GPT-NeoX vocabulary
    "olmo": ("nfc", (("bytes", True),), False),           # GPT-NeoX vocabulary (OLMo, OLMoE-0924)
    "starcoder": _STARCODER,
    "refact": _STARCODER,
    "command-r": ("nfc", (("digits", True), ("bytes", True)), False),
    "falcon": (None, (("punct",), ("bytes", True), ("digits", False),
                      ("split", "[0-9][0-9][0-9]")), False),
    "llama-bpe": (None, _splits(_LLAMA3) + (("bytes", False),), True),
    "llama3": (None, _splits(_LLAMA3) + (("bytes", False),), True),
    "llama-v3": (None, _splits(_LLAMA3) + (("bytes", False),), True),
    "dbrx": (None, _splits(_LLAMA3) + (("bytes", False),), False),   # cl100k, as OLMoE-0125 splits
    "glm4": (None, _splits(_LLAMA3) + (("bytes", False),), True),    # GLM-4.5
    "chatglm-bpe": (None, _splits(_LLAMA3) + (("bytes", False),), False),
    "qwen2": ("nfc", _splits(_QWEN2) + (("bytes", False),), False),
    "deepseek-r1-qwen": ("nfc", _splits(_QWEN2) + (("bytes", False),), False),
    "qwen35": (None, _splits(_QWEN35) + (("bytes", False),), False),   # no NFC since Qwen3.5
    "deepseek-llm": (None, _splits(*_DEEPSEEK_LLM) + (("digits", False), ("bytes", False)), False),
    "deepseek-coder": (None, _splits(*_DEEPSEEK_CODER) + (("digits", True), ("bytes", False)), False),
    "deepseek-v3": (None, _splits(*_DEEPSEEK_V3) + (("bytes", False),), False),
}


def bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> printable character table (byte-level BPE spells every token with it).

    Printable Latin-1 bytes map to themselves; the other 68 bytes to U+0100 upwards in order.
    """
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + \
        list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


_GGUF_SCALARS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<?",
                 10: "<Q", 11: "<q", 12: "<d"}
_GGUF_STRING, _GGUF_ARRAY = 8, 9


def read_gguf_metadata(path, prefix: str = "") -> dict[str, Any]:
    """The metadata key/values of a GGUF file whose key starts with ``prefix``, read directly.

    Reads the header and the key/value section only (GGUF versions 2 and 3, little-endian; spec:
    ggml ``docs/gguf.md``), which is much faster than ``gguf.GGUFReader`` on large vocabularies.
    Strings come back as ``str``, numeric arrays as lists, string arrays as lists of ``str``.

    Args:
        path: the ``.gguf`` file.
        prefix: keep only keys starting with it (e.g. ``"tokenizer."``); others are skipped.

    Returns:
        ``{key: value}``.

    Raises:
        ValueError: not a GGUF file, an unsupported version or value type, or a truncated file;
            the message names the file.
    """
    import struct

    import numpy as np

    with open(path, "rb") as f:
        data = f.read()
    pos = 0

    def take(fmt):
        nonlocal pos
        v = struct.unpack_from(fmt, data, pos)[0]
        pos += struct.calcsize(fmt)
        return v

    def string():
        nonlocal pos
        n = take("<Q")
        if pos + n > len(data):
            raise struct.error("string past the end")
        s = data[pos:pos + n].decode("utf-8", errors="surrogateescape")
        pos += n
        return s

    def value(vtype, keep):
        nonlocal pos
        if vtype in _GGUF_SCALARS:
            return take(_GGUF_SCALARS[vtype])
        if vtype == _GGUF_STRING:
            return string()
        if vtype != _GGUF_ARRAY:
            raise ValueError(f"unknown value type {vtype}")
        itype, n = take("<I"), take("<Q")
        if itype in _GGUF_SCALARS:
            size = struct.calcsize(_GGUF_SCALARS[itype])
            arr = np.frombuffer(data, np.dtype(_GGUF_SCALARS[itype]), n, pos) if keep else None
            pos += size * n
            return None if arr is None else arr.tolist()
        return [value(itype, keep) for _ in range(n)]

    try:
        if data[:4] != b"GGUF":
            raise ValueError("not a GGUF file (bad magic)")
        pos = 4
        version = take("<I")
        if version not in (2, 3):
            raise ValueError(f"GGUF version {version} is not supported (2 or 3)")
        take("<Q")  # tensor count
        out = {}
        for _ in range(take("<Q")):
            key = string()
            keep = key.startswith(prefix)
            v = value(take("<I"), keep)
            if keep:
                out[key] = v
        return out
    except (struct.error, ValueError) as e:
        raise ValueError(f"{path}: {e}") from e


def _field(reader, key: str, default=None):
    if isinstance(reader, Mapping):
        return reader.get(key, default)
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _pre_tokenizer(recipe: _Recipe):
    from tokenizers import Regex, normalizers, pre_tokenizers

    norm, steps, _ = recipe
    out = []
    for step in steps:
        kind = step[0]
        if kind == "split":
            out.append(pre_tokenizers.Split(Regex(step[1]), behavior="isolated", invert=False))
        elif kind == "digits":
            out.append(pre_tokenizers.Digits(individual_digits=step[1]))
        elif kind == "punct":
            out.append(pre_tokenizers.Punctuation(behavior="contiguous"))
        else:
            out.append(pre_tokenizers.ByteLevel(add_prefix_space=False, trim_offsets=True,
                                                use_regex=step[1]))
    pre = out[0] if len(out) == 1 else pre_tokenizers.Sequence(out)
    return (normalizers.NFC() if norm == "nfc" else None), pre


def _byte_level(reader, tokens: list[str], types: list[int], pre_name: str | None):
    from tokenizers import Tokenizer, decoders, processors
    from tokenizers.models import BPE

    merges = _field(reader, "tokenizer.ggml.merges")
    if merges is None:
        raise ValueError("tokenizer.ggml.merges: missing (a 'gpt2' vocabulary needs its merges)")
    spelling = bytes_to_unicode()
    alphabet = set(spelling.values())
    # A token outside the byte alphabet is respelled in it (files from other converters store
    # text), except a USER_DEFINED one -- an added token, which the original vocabulary keeps raw
    # (GPT-NeoX's runs of spaces: "  " at 50276 next to the merged "ĠĠ" at 245) -- and one whose
    # respelling is another token of the file (Command-R keeps "™" at 268 and "âĦ¢" at 33572).
    present = set(tokens)
    vocab = {}
    for i, t in enumerate(tokens):
        if not set(t) <= alphabet and not (types and types[i] == TOKEN_USER_DEFINED):
            respelled = "".join(spelling[b] for b in t.encode("utf-8"))
            t = t if respelled in present else respelled
        vocab[t] = i
    if len(vocab) != len(tokens):
        raise ValueError(f"tokenizer.ggml.tokens: {len(tokens) - len(vocab)} duplicate tokens")
    recipe = BPE_PRE_TOKENIZERS.get(pre_name or "", _GPT2)
    tok = Tokenizer(BPE(vocab=vocab, merges=[tuple(m.split(" ")) for m in merges], dropout=None,
                        continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False,
                        ignore_merges=recipe[2]))
    tok.normalizer, tok.pre_tokenizer = _pre_tokenizer(recipe)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A:0", pair="$A:0 $B:1",
                                                       special_tokens=[])
    return tok, (lambda t: set(t) <= alphabet), vocab


def sentencepiece_merges(pieces: Sequence[str], scores: Sequence[float],
                         keep: Callable[[int], bool] | None = None) -> list[tuple[str, str]]:
    """BPE merges implied by a sentencepiece vocabulary, best first.

    Sentencepiece BPE stores no merges: at each step it joins the adjacent pair whose joined piece
    has the highest score. So every split ``(left, right)`` of a piece whose halves are both in
    the vocabulary is a merge ranked by the piece's score (higher first; ties keep vocabulary
    order, and within one piece the split with the smaller ``(id(left), id(right))`` first).

    Args:
        pieces: the vocabulary, ``pieces[i]`` the piece of id ``i``.
        scores: ``scores[i]`` the score of piece ``i`` (float).
        keep: optional predicate on an id; pieces for which it is false (control, byte, unused
            tokens) make no merges.

    Returns:
        ``[(left, right), ...]``.
    """
    ids = {p: i for i, p in enumerate(pieces)}
    ranked = []
    for i, piece in enumerate(pieces):
        if keep is not None and not keep(i):
            continue
        splits = [(ids[piece[:k]], ids[piece[k:]]) for k in range(1, len(piece))
                  if piece[:k] in ids and piece[k:] in ids]
        for a, b in sorted(splits):
            ranked.append((-float(scores[i]), i, pieces[a], pieces[b]))
    ranked.sort(key=lambda r: (r[0], r[1]))
    return [(a, b) for _, _, a, b in ranked]


def sentencepiece_bpe(pieces: Sequence[str], scores: Sequence[float], types: Sequence[int],
                      unk_id: int | None, add_dummy_prefix: bool = True):
    """A ``tokenizers.Tokenizer`` equal to a sentencepiece BPE model (Llama-2, Mistral, Mixtral).

    As the ``tokenizer.json`` of those repositories: a byte-fallback BPE (merges from
    :func:`sentencepiece_merges`, unknown pieces fused), normalizer ``Prepend("▁")`` (when
    ``add_dummy_prefix``) + ``Replace(" ", "▁")``, no pre-tokenizer, decoder ``Replace("▁", " ")``
    + ``ByteFallback`` + ``Fuse`` (+ ``Strip`` of the dummy prefix). CONTROL and UNKNOWN pieces
    are special added tokens, USER_DEFINED ones plain added tokens.

    Args:
        pieces, scores, types: the vocabulary (``str``), scores (``float``) and sentencepiece /
            llama.cpp piece types (``int``, 1 normal ... 6 byte; empty means all normal).
        unk_id: id of the unknown piece, or ``None``.
        add_dummy_prefix: sentencepiece's ``normalizer_spec.add_dummy_prefix``.

    Raises:
        ValueError: lengths differ.
    """
    from tokenizers import Tokenizer, decoders, normalizers
    from tokenizers.models import BPE

    if len(scores) != len(pieces) or (types and len(types) != len(pieces)):
        raise ValueError(f"{len(pieces)} pieces, {len(scores)} scores, {len(types)} types")
    vocab = {t: i for i, t in enumerate(pieces)}
    normal = {TOKEN_NORMAL, TOKEN_USER_DEFINED}
    merges = sentencepiece_merges(pieces, scores, keep=lambda i: not types or types[i] in normal)
    tok = Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, fuse_unk=True, byte_fallback=True,
                        unk_token=None if unk_id is None else pieces[int(unk_id)]))
    steps = [normalizers.Replace(" ", "\u2581")]
    if add_dummy_prefix:
        steps.insert(0, normalizers.Prepend("\u2581"))
    tok.normalizer = normalizers.Sequence(steps)
    tok.pre_tokenizer = None
    dec = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
    if add_dummy_prefix:
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    _add_tokens(tok, pieces, types, lambda t: True, vocab)
    return tok


def _add_tokens(tok, tokens, types, spelled, vocab) -> None:
    from tokenizers import AddedToken

    # A CONTROL token outside the byte alphabet is a mislabelled one (llama.cpp converter);
    # adding it would grow the vocabulary past the model's.
    control = [AddedToken(t, normalized=False, special=True)
               for t, ty in zip(tokens, types) if ty in (TOKEN_CONTROL, TOKEN_UNKNOWN) and spelled(t)]
    if control:
        tok.add_special_tokens(control)
    user = [AddedToken(t, normalized=False, special=False)
            for t, ty in zip(tokens, types) if ty == TOKEN_USER_DEFINED and t in vocab]
    if user:
        tok.add_tokens(user)


def build_gguf_tokenizer(reader):
    """The ``tokenizers.Tokenizer`` of a GGUF's vocabulary.

    Args:
        reader: a ``gguf.GGUFReader``, or the ``{key: value}`` of :func:`read_gguf_metadata`
            (only the ``tokenizer.ggml.*`` keys are read).

    Returns:
        A ``tokenizers.Tokenizer``: its ``encode(text, add_special_tokens=False)`` gives the ids
        of the original repository's tokenizer; its post-processor adds nothing (BOS/EOS are the
        caller's, from ``tokenizer.ggml.add_bos_token`` / ``add_eos_token``).

    Raises:
        ValueError: ``tokenizer.ggml.model`` is neither ``"gpt2"`` nor ``"llama"``, or a field the
            model needs (``tokenizer.ggml.tokens``, ``merges`` or ``scores``) is missing; the
            message names the field.
    """
    model = _field(reader, "tokenizer.ggml.model")
    tokens = _field(reader, "tokenizer.ggml.tokens")
    if tokens is None:
        raise ValueError("tokenizer.ggml.tokens: missing")
    tokens = list(tokens)
    types = list(_field(reader, "tokenizer.ggml.token_type", []) or [])
    if types and len(types) != len(tokens):
        raise ValueError(f"tokenizer.ggml.token_type: {len(types)} entries for {len(tokens)} tokens")
    if model == "llama":
        scores = _field(reader, "tokenizer.ggml.scores")
        if scores is None:
            raise ValueError("tokenizer.ggml.scores: missing (a 'llama' vocabulary needs its scores)")
        return sentencepiece_bpe(tokens, scores, types, _field(reader, "tokenizer.ggml.unknown_token_id"),
                                 bool(_field(reader, "tokenizer.ggml.add_space_prefix", True)))
    if model != "gpt2":
        raise ValueError(f"tokenizer.ggml.model is {model!r}; supported: 'gpt2' (byte-level BPE), "
                         "'llama' (sentencepiece BPE)")
    tok, spelled, vocab = _byte_level(reader, tokens, types, _field(reader, "tokenizer.ggml.pre"))
    _add_tokens(tok, tokens, types, spelled, vocab)
    return tok
