"""UTF-8-safe streaming detokenization: token ids in, complete text pieces out.

:class:`StreamDecoder` is an incremental detokenizer (prefix-offset / read-offset windows, as in
Hugging Face text-generation-inference's ``decode_token`` and vLLM's incremental detokenization)
that never emits text ending in an incomplete UTF-8 sequence. It works over any object with
``decode(ids, skip_special_tokens)``, e.g. :class:`~zipmoe_rt.tokenizer.Tokenizer`.
"""
from __future__ import annotations

from typing import Any, Sequence

__all__ = ["StreamDecoder", "REPLACEMENT_CHAR"]

#: U+FFFD, what a lossy UTF-8 decode puts in place of an invalid or incomplete byte sequence.
REPLACEMENT_CHAR = "\ufffd"


class StreamDecoder:
    """Incremental detokenizer: turns a stream of token ids into text pieces.

    Each :meth:`push` decodes a small window of recent ids and returns only the newly completed
    text. When the window's decode ends in U+FFFD, which is what an incomplete UTF-8 byte
    sequence (e.g. the first bytes of an emoji in a byte-level BPE vocabulary) decodes to, only
    that last character is held back: every character before it is complete and is returned with
    the token that completed it (a token ``" \xf0\x9f"`` returns ``" "``), and the held
    character is released once a later token completes it.

    The algorithm is that of Hugging Face text-generation-inference (``decode_token``) and vLLM's
    incremental detokenization: ``prefix_offset`` and ``read_offset`` index the ids; the text
    returned is ``decode(ids[prefix_offset:])[len(decode(ids[prefix_offset:read_offset])):]``.
    Decoding from ``prefix_offset`` (one already-emitted chunk before the new tokens) rather than
    from the new tokens alone keeps context-dependent decoders right (e.g. SentencePiece's
    ``Metaspace`` decoder, which drops the leading space of the first token it sees). Only the ids
    from ``prefix_offset`` on are kept, so a push costs O(window), not O(sequence).

    Guarantees (tested for byte-level BPE): with no ``context_ids``, the concatenation of every
    :meth:`push` result and the final :meth:`flush` equals ``tokenizer.decode(all_ids,
    skip_special_tokens)``; a piece contains U+FFFD only where that full decode has it. If more
    than ``max_hold`` tokens are held back (a stream of invalid bytes, or the model writing U+FFFD
    itself), the decoder releases the part that can no longer change, so work per token stays
    bounded.

    Args:
        tokenizer: a :class:`Tokenizer` (or anything with ``decode(ids, skip_special_tokens)``).
        skip_special_tokens: passed to ``decode``.
        context_ids: ids that precede the stream (e.g. the end of the prompt), used as decoding
            context only, never emitted. With them, the concatenation equals
            ``decode(context_ids + ids)[len(decode(context_ids)):]`` (what vLLM streams).
        max_hold: the number of held-back tokens after which the stable part is released.
    """

    def __init__(self, tokenizer: Any, skip_special_tokens: bool = False, context_ids: Sequence[int] = (),
                 max_hold: int = 16):
        if max_hold < 4:
            raise ValueError(f"max_hold: must be >= 4 (an incomplete UTF-8 sequence spans up to 3 bytes), got {max_hold}")
        self._tokenizer = tokenizer
        self._skip = skip_special_tokens
        self._max_hold = max_hold
        self._context = [int(i) for i in context_ids]
        self._reset()

    def _reset(self) -> None:
        self._ids: list[int] = list(self._context)  # ids[prefix_offset:] of the stream
        self._read = len(self._ids)                  # read_offset, relative to self._ids
        self._prefix_text = self._decode(self._ids)  # decode(ids[prefix_offset:read_offset])
        self._sent = 0  # characters past prefix_text already returned (complete characters
        #                 of tokens after read_offset whose decode ends in an incomplete one)

    def _decode(self, ids: list[int]) -> str:
        return self._tokenizer.decode(ids, skip_special_tokens=self._skip) if ids else ""

    def _advance(self, new_read: int, new_text: str) -> str:
        """Emit ``new_text`` (the decode of ``ids[:new_read]``) past what was already returned
        and move the window to ``[read, new_read)``. Characters already returned beyond
        ``new_text`` (complete characters of later tokens) stay counted in ``_sent``."""
        done = len(self._prefix_text) + self._sent
        piece = new_text[done:]
        del self._ids[: self._read]
        self._prefix_text = self._decode(self._ids[: new_read - self._read])
        self._read = new_read - self._read
        self._sent = max(0, done - len(new_text))
        return piece

    def _emit_complete(self, new_text: str) -> str:
        """``new_text`` ends in U+FFFD (an incomplete UTF-8 sequence, or an invalid byte): return
        the characters before that last one not yet returned, keeping the window as it is."""
        done = len(self._prefix_text) + self._sent
        stable = new_text[:-1]
        if len(stable) > done and stable.startswith(self._prefix_text):
            self._sent = len(stable) - len(self._prefix_text)
            return stable[done:]
        return ""

    def push(self, token_id: int) -> str:
        """Add one token id; return the text it completes (often ``""`` or one token's text).

        Args:
            token_id: the next token id (``int`` or numpy integer).

        Returns:
            New text, never ending in an incomplete UTF-8 sequence; ``""`` while held back.
        """
        self._ids.append(int(token_id))
        new_text = self._decode(self._ids)
        if len(new_text) > len(self._prefix_text) and not new_text.endswith(REPLACEMENT_CHAR):
            return self._advance(len(self._ids), new_text)
        piece = self._emit_complete(new_text) if new_text.endswith(REPLACEMENT_CHAR) else ""
        if len(self._ids) - self._read > self._max_hold:
            return piece + self._release_stable(new_text)
        return piece

    def _release_stable(self, new_text: str) -> str:
        # Held back for long: find the latest split point j, at least 4 tokens before the end (an
        # incomplete UTF-8 sequence is completed or broken within 3 more bytes), where decoding
        # is additive, decode(ids[:j]) + decode(ids[j:]) == decode(ids), so nothing after j can
        # still change the text before it.
        n = len(self._ids)
        for j in range(n - 4, self._read, -1):
            head = self._decode(self._ids[:j])
            if (len(head) > len(self._prefix_text) and head.startswith(self._prefix_text)
                    and head + self._decode(self._ids[j:]) == new_text):
                return self._advance(j, head)
        return ""

    def flush(self) -> str:
        """End the stream: return all text still held back (may end in U+FFFD), and reset.

        After ``flush`` the decoder starts a new stream (with the same ``context_ids``).
        """
        new_text = self._decode(self._ids)
        piece = new_text[len(self._prefix_text) + self._sent:]
        self._reset()
        return piece

    @property
    def pending_tokens(self) -> int:
        """Number of pushed tokens whose text has not been returned yet."""
        return len(self._ids) - self._read
