"""A sentencepiece ``tokenizer.model`` (Mistral / Mixtral ``tokenizer.model.v1``) as a ``tokenizers.Tokenizer``.

Repositories of Mixtral-era models may ship only the sentencepiece model file. It is a protobuf
``ModelProto`` (``sentencepiece_model.proto`` of google/sentencepiece): repeated ``pieces``
(field 1: ``piece`` 1 string, ``score`` 2 float, ``type`` 3 enum, default NORMAL), a
``trainer_spec`` (field 2: ``model_type`` 3, default UNIGRAM = 1, BPE = 2; ``byte_fallback`` 35;
``unk_id`` 40, default 0) and a ``normalizer_spec`` (field 3: ``name`` 1;
``add_dummy_prefix`` 3 and ``remove_extra_whitespaces`` 4, both default true). This module reads
those fields with a minimal protobuf decoder (no ``protobuf`` / ``sentencepiece`` dependency) and
builds the tokenizer with :func:`.gguf_tokenizer.sentencepiece_bpe`, which is what the Hub's
``tokenizer.json`` of Mistral-7B / Mixtral-8x7B holds.
"""
from __future__ import annotations

import struct
from dataclasses import dataclass, field

__all__ = ["SentencePieceModel", "read_sentencepiece_model", "sentencepiece_model_tokenizer"]


@dataclass
class SentencePieceModel:
    """The fields of a ``ModelProto`` the tokenizer needs (defaults as in the .proto)."""

    pieces: list[str] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    types: list[int] = field(default_factory=list)
    model_type: int = 1
    byte_fallback: bool = False
    unk_id: int = 0
    normalizer: str = ""
    add_dummy_prefix: bool = True
    remove_extra_whitespaces: bool = True


def _fields(buf: bytes):
    """Yield ``(field_number, wire_type, value)`` of one protobuf message (varint -> int,
    64/32-bit -> raw bytes, length-delimited -> bytes)."""
    pos, end = 0, len(buf)

    def varint():
        nonlocal pos
        shift = result = 0
        while True:
            if pos >= end:
                raise ValueError("truncated varint")
            b = buf[pos]
            pos += 1
            result |= (b & 0x7F) << shift
            if not b & 0x80:
                return result
            shift += 7

    while pos < end:
        key = varint()
        num, wire = key >> 3, key & 7
        if wire == 0:
            yield num, wire, varint()
        elif wire in (1, 5):
            n = 8 if wire == 1 else 4
            if pos + n > end:
                raise ValueError("truncated fixed-size field")
            yield num, wire, buf[pos:pos + n]
            pos += n
        elif wire == 2:
            n = varint()
            if pos + n > end:
                raise ValueError("truncated length-delimited field")
            yield num, wire, buf[pos:pos + n]
            pos += n
        else:
            raise ValueError(f"unsupported protobuf wire type {wire}")


def read_sentencepiece_model(data: bytes, name: str = "tokenizer.model") -> SentencePieceModel:
    """Parse a sentencepiece ``ModelProto``.

    Args:
        data: the file's bytes.
        name: the file name, for error messages.

    Returns:
        A :class:`SentencePieceModel`.

    Raises:
        ValueError: not a well-formed model (names ``name``).
    """
    m = SentencePieceModel()
    try:
        for num, wire, val in _fields(data):
            if num == 1 and wire == 2:
                piece, score, ptype = None, 0.0, 1
                for n, w, v in _fields(val):
                    if n == 1 and w == 2:
                        piece = v.decode("utf-8")
                    elif n == 2 and w == 5:
                        score = struct.unpack("<f", v)[0]
                    elif n == 3 and w == 0:
                        ptype = v
                if piece is None:
                    raise ValueError(f"piece {len(m.pieces)} has no text")
                m.pieces.append(piece)
                m.scores.append(score)
                m.types.append(ptype)
            elif num == 2 and wire == 2:
                for n, w, v in _fields(val):
                    if n == 3 and w == 0:
                        m.model_type = v
                    elif n == 35 and w == 0:
                        m.byte_fallback = bool(v)
                    elif n == 40 and w == 0:
                        m.unk_id = v
            elif num == 3 and wire == 2:
                for n, w, v in _fields(val):
                    if n == 1 and w == 2:
                        m.normalizer = v.decode("utf-8")
                    elif n == 3 and w == 0:
                        m.add_dummy_prefix = bool(v)
                    elif n == 4 and w == 0:
                        m.remove_extra_whitespaces = bool(v)
    except (ValueError, UnicodeDecodeError) as e:
        raise ValueError(f"{name}: not a sentencepiece model ({e})") from e
    if not m.pieces:
        raise ValueError(f"{name}: not a sentencepiece model (no pieces)")
    return m


def sentencepiece_model_tokenizer(data: bytes, name: str = "tokenizer.model"):
    """The ``tokenizers.Tokenizer`` of a sentencepiece BPE model file.

    Args:
        data: the ``tokenizer.model`` bytes.
        name: the file name, for error messages.

    Returns:
        A ``tokenizers.Tokenizer`` (no BOS added by its post-processor).

    Raises:
        ValueError: not a sentencepiece model, or one this builder cannot reproduce exactly: a
            unigram model, no byte fallback, a normalizer other than ``identity`` or
            ``remove_extra_whitespaces`` set (the message names the field).
    """
    from .gguf_tokenizer import sentencepiece_bpe

    m = read_sentencepiece_model(data, name)
    if m.model_type != 2:
        raise ValueError(f"{name}: trainer_spec.model_type is {m.model_type}; only BPE (2) is supported")
    if not m.byte_fallback:
        raise ValueError(f"{name}: trainer_spec.byte_fallback is off; only byte-fallback BPE is supported")
    if m.normalizer not in ("identity", ""):
        raise ValueError(f"{name}: normalizer_spec.name is {m.normalizer!r}; only 'identity' is supported")
    if m.remove_extra_whitespaces:
        raise ValueError(f"{name}: normalizer_spec.remove_extra_whitespaces is set; not supported")
    return sentencepiece_bpe(m.pieces, m.scores, m.types, m.unk_id, m.add_dummy_prefix)
