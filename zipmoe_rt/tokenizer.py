"""Text side of the runtime: tokenizer, chat template, incremental detokenizer.

This module holds :class:`Tokenizer` and re-exports :func:`compile_chat_template` (from
:mod:`zipmoe_rt.chat_template`) and :class:`StreamDecoder` / :data:`REPLACEMENT_CHAR` (from
:mod:`zipmoe_rt.detokenizer`), so the old import paths keep working. Mirrors what Hugging Face
``transformers`` does for a fast tokenizer, without importing ``transformers`` (it is only the
test oracle):

* :class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` built from a ``tokenizer.json`` string, the
  way ``transformers.TokenizersBackend`` / ``PreTrainedTokenizerFast``
  (``transformers/tokenization_utils_tokenizers.py``) does, including its handling of an explicit
  ``add_bos_token`` / ``add_eos_token`` flag (``update_post_processor``).
* :meth:`Tokenizer.apply_chat_template` renders a Jinja2 chat template
  (:mod:`zipmoe_rt.chat_template`) in the same sandboxed environment as
  ``transformers/utils/chat_template_utils.py``. The named special tokens (``bos_token``,
  ``eos_token``, ...) are passed as template variables, as
  ``PreTrainedTokenizerBase.apply_chat_template`` does.
* :class:`StreamDecoder` (:mod:`zipmoe_rt.detokenizer`) is an incremental detokenizer that never
  emits text ending in an incomplete UTF-8 sequence.

Token ids are Python ``int`` (vocabulary indices, ``0 <= id < vocab size``); texts are ``str``.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import processors as _processors

from .chat_template import SPECIAL_TOKEN_NAMES, compile_chat_template, render_chat_template
from .detokenizer import REPLACEMENT_CHAR, StreamDecoder

__all__ = ["Tokenizer", "StreamDecoder", "compile_chat_template", "REPLACEMENT_CHAR",
           "SPECIAL_TOKEN_NAMES"]


def _token_content(value: Any, field: str) -> str | None:
    """A special token as stored in tokenizer_config.json: a string or an AddedToken dict."""
    if value is None:
        return None
    if isinstance(value, str):
        return value
    if isinstance(value, Mapping) and isinstance(value.get("content"), str):
        return value["content"]
    raise ValueError(f"{field}: expected a token string or {{'content': ...}}, got {value!r}")


class Tokenizer:
    """A fast (``tokenizers``) tokenizer plus chat template, behaving like transformers' one.

    Mirrors ``PreTrainedTokenizerFast`` / ``TokenizersBackend``
    (``transformers/tokenization_utils_tokenizers.py``) for ``encode`` / ``decode``, and
    ``PreTrainedTokenizerBase.apply_chat_template`` (``transformers/tokenization_utils_base.py``)
    for chat formatting.

    Args:
        tokenizer_json: the contents of ``tokenizer.json`` (a JSON string).
        chat_template: Jinja2 chat template source, or ``None`` if the model has none (then the
            chat methods raise ``ValueError``).
        bos_token, eos_token, unk_token, pad_token: special token strings (e.g. ``"<|im_end|>"``),
            or ``None``. Each given one must be in the vocabulary. They are exposed to the chat
            template as variables of the same name, like transformers' ``special_tokens_map``.
        add_bos_token, add_eos_token: ``None`` (default) keeps the ``post_processor`` of
            ``tokenizer.json``, which decides what ``encode(..., add_special_tokens=True)`` adds.
            A bool replaces it with ``TemplateProcessing`` adding ``bos_token`` before / ``eos_token``
            after the text when set — what transformers does when ``tokenizer_config.json`` has
            ``add_bos_token`` / ``add_eos_token`` (``update_post_processor``).

    Raises:
        ValueError: ``tokenizer_json`` does not load, ``chat_template`` does not parse, a special
            token is not in the vocabulary, or ``add_bos_token`` is set without ``bos_token``
            (likewise for eos). Messages name the offending field.
    """

    def __init__(
        self,
        tokenizer_json: str,
        chat_template: str | None = None,
        *,
        bos_token: str | None = None,
        eos_token: str | None = None,
        unk_token: str | None = None,
        pad_token: str | None = None,
        add_bos_token: bool | None = None,
        add_eos_token: bool | None = None,
    ):
        if not isinstance(tokenizer_json, str):
            raise TypeError(f"tokenizer_json: expected a JSON str, got {type(tokenizer_json).__name__}")
        try:
            self._tk = _HFTokenizer.from_str(tokenizer_json)
        except Exception as e:  # tokenizers raises a bare Exception
            raise ValueError(f"tokenizer_json: could not load tokenizer: {e}") from e
        # transformers never pads or truncates behind the caller's back in encode().
        self._tk.no_padding()
        self._tk.no_truncation()

        self.special_tokens_map: dict[str, str] = {}
        self._special_ids: dict[str, int] = {}
        for name, tok in (("bos_token", bos_token), ("eos_token", eos_token),
                          ("unk_token", unk_token), ("pad_token", pad_token)):
            if tok is None:
                continue
            if not isinstance(tok, str):
                raise TypeError(f"{name}: expected a str, got {type(tok).__name__}")
            tid = self._tk.token_to_id(tok)
            if tid is None:
                raise ValueError(f"{name}: {tok!r} is not in the tokenizer's vocabulary")
            self.special_tokens_map[name] = tok
            self._special_ids[name] = tid

        for flag, name, value in (("add_bos_token", "bos_token", add_bos_token),
                                  ("add_eos_token", "eos_token", add_eos_token)):
            if value is not None and not isinstance(value, bool):
                raise TypeError(f"{flag}: expected a bool or None, got {type(value).__name__}")
            if value and name not in self.special_tokens_map:
                raise ValueError(f"{flag}: set but {name} is not given")
        if add_bos_token is not None or add_eos_token is not None:
            self._set_template_post_processor(bool(add_bos_token), bool(add_eos_token))

        self.chat_template = chat_template
        self._compiled_template = None if chat_template is None else compile_chat_template(chat_template)

    # -- construction helpers ----------------------------------------------------------------

    @classmethod
    def from_hf_config(
        cls,
        tokenizer_json: str,
        tokenizer_config: Mapping[str, Any] | None = None,
        chat_template: str | None = None,
    ) -> "Tokenizer":
        """Build from the files of a Hugging Face model repository (already read into memory).

        Args:
            tokenizer_json: contents of ``tokenizer.json``.
            tokenizer_config: parsed ``tokenizer_config.json`` (or ``None``). Used keys:
                ``bos_token``, ``eos_token``, ``unk_token``, ``pad_token`` (strings or AddedToken
                dicts), ``add_bos_token``, ``add_eos_token`` (bools; absent = keep
                ``tokenizer.json``'s post-processor), ``chat_template`` (a string, or a list of
                ``{"name", "template"}`` of which ``"default"`` is used).
            chat_template: contents of ``chat_template.jinja``; takes precedence over the config's
                ``chat_template``, as in transformers 5.

        Returns:
            A :class:`Tokenizer`.

        Raises:
            ValueError: as for :class:`Tokenizer`, or a malformed ``tokenizer_config`` field.
        """
        cfg = dict(tokenizer_config or {})
        template = chat_template if chat_template is not None else cfg.get("chat_template")
        if isinstance(template, list):
            named = {t.get("name"): t.get("template") for t in template if isinstance(t, Mapping)}
            if "default" not in named:
                raise ValueError("tokenizer_config.chat_template: a list of templates without a 'default' one")
            template = named["default"]
        kwargs = {}
        for name in ("bos_token", "eos_token", "unk_token", "pad_token"):
            tok = _token_content(cfg.get(name), f"tokenizer_config.{name}")
            if tok is not None:
                kwargs[name] = tok
        for flag in ("add_bos_token", "add_eos_token"):
            if flag in cfg and cfg[flag] is not None:
                kwargs[flag] = bool(cfg[flag])
        return cls(tokenizer_json, template, **kwargs)

    @classmethod
    def from_dir(cls, path: str | Path) -> "Tokenizer":
        """Build from a Hugging Face model directory.

        Reads ``tokenizer.json`` (required), ``tokenizer_config.json`` and ``chat_template.jinja``
        (both optional) and calls :meth:`from_hf_config`.

        Raises:
            FileNotFoundError: no ``tokenizer.json`` in ``path``.
            ValueError: as for :meth:`from_hf_config`.
        """
        path = Path(path)
        tokenizer_json = (path / "tokenizer.json").read_text(encoding="utf-8")
        cfg_path = path / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text(encoding="utf-8")) if cfg_path.exists() else None
        tpl_path = path / "chat_template.jinja"
        tpl = tpl_path.read_text(encoding="utf-8") if tpl_path.exists() else None
        return cls.from_hf_config(tokenizer_json, cfg, tpl)

    def _set_template_post_processor(self, add_bos: bool, add_eos: bool) -> None:
        # transformers/tokenization_utils_tokenizers.py: TokenizersBackend.update_post_processor
        bos = self.special_tokens_map.get("bos_token")
        eos = self.special_tokens_map.get("eos_token")
        single = f"{(bos + ':0 ') if add_bos else ''}$A:0{(' ' + eos + ':0') if add_eos else ''}"
        pair = f"{single}{(' ' + bos + ':1') if add_bos else ''} $B:1{(' ' + eos + ':1') if add_eos else ''}"
        special = []
        if add_bos:
            special.append((bos, self._special_ids["bos_token"]))
        if add_eos:
            special.append((eos, self._special_ids["eos_token"]))
        self._tk.post_processor = _processors.TemplateProcessing(single=single, pair=pair, special_tokens=special)

    # -- vocabulary --------------------------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (``len(tokenizer)`` in transformers)."""
        return self._tk.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    @property
    def bos_token_id(self) -> int | None:
        """Id of ``bos_token``, or ``None`` if not given."""
        return self._special_ids.get("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        """Id of ``eos_token``, or ``None`` if not given."""
        return self._special_ids.get("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """Id of ``pad_token``, or ``None`` if not given."""
        return self._special_ids.get("pad_token")

    def token_to_id(self, token: str) -> int | None:
        """Id of a token string (e.g. ``"<|im_end|>"``), or ``None`` if not in the vocabulary."""
        return self._tk.token_to_id(token)

    def id_to_token(self, token_id: int) -> str | None:
        """Token string of an id (byte-level tokens in their mapped form), or ``None`` if unknown."""
        return self._tk.id_to_token(int(token_id))

    @property
    def backend(self) -> _HFTokenizer:
        """The underlying ``tokenizers.Tokenizer`` (do not mutate)."""
        return self._tk

    # -- encode / decode ---------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Tokenize ``text``.

        Same ids as transformers' ``tokenizer.encode(text, add_special_tokens=...)``: added tokens
        in the text (e.g. ``"<|im_start|>"``) are matched as such, and with
        ``add_special_tokens=True`` the post-processor adds its tokens (e.g. BOS).

        Args:
            text: the text.
            add_special_tokens: apply the post-processor's special tokens.

        Returns:
            Token ids, ``list[int]``.

        Raises:
            TypeError: ``text`` is not a ``str``.
            ValueError: ``text`` is not valid Unicode (a lone surrogate such as ``"\\udcff"``,
                which has no UTF-8 form; the message gives its index).
        """
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
        try:
            text.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"text: not valid Unicode: {e.reason} at index {e.start} "
                             f"({text[e.start]!r})") from None
        return self._tk.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Iterable[int], skip_special_tokens: bool = False) -> str:
        """Detokenize ``ids`` to text.

        Same as transformers' ``tokenizer.decode(ids, skip_special_tokens=...)`` with its default
        ``clean_up_tokenization_spaces=False``. Invalid or incomplete UTF-8 byte sequences (from
        byte-level tokens) come out as U+FFFD.

        Args:
            ids: token ids (any iterable of ints, e.g. a list or an int64 numpy array).
            skip_special_tokens: drop special tokens from the text.

        Returns:
            The text.
        """
        return self._tk.decode([int(i) for i in ids], skip_special_tokens=skip_special_tokens)

    # -- chat --------------------------------------------------------------------------------

    def apply_chat_template(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool | None = None,
        *,
        tools: list[dict] | None = None,
        documents: list[dict] | None = None,
        **kwargs: Any,
    ) -> str:
        """Render a conversation to the prompt text the model was trained on.

        Renders like ``apply_chat_template(messages, tokenize=False, ...)`` of transformers
        (``render_jinja_template`` in ``transformers/utils/chat_template_utils.py``): the template
        sees ``messages``, ``tools``, ``documents``, ``add_generation_prompt``, the special tokens
        (``bos_token``, ``eos_token``, ...) and ``kwargs`` (which override the special tokens).
        Keys whose value is ``None`` are dropped from messages, and reasoning given as
        ``reasoning_content``, ``thinking`` or ``reasoning`` is exposed under the first two.
        Unlike transformers, ``add_generation_prompt`` defaults to ``True`` (to ``False`` with
        ``continue_final_message``).

        Args:
            messages: ``[{"role": str, "content": str | list, ...}, ...]``, at least one message.
                ``content`` may be absent only when the message has ``tool_calls``.
            add_generation_prompt: append the header that starts an assistant turn; ``None``
                (default) means ``True`` unless ``continue_final_message`` is given.
            tools: JSON-schema tool descriptions for templates that support tools.
            documents: retrieval documents for templates that support them.
            **kwargs: extra template variables (e.g. ``enable_thinking=False``), and
                ``continue_final_message`` (``True`` or a field name such as
                ``"reasoning_content"``): leave the final message open so that generation
                continues it, as transformers does (:func:`~zipmoe_rt.chat_template.render_chat_template`).

        Returns:
            The rendered prompt text (special tokens as text, e.g. ``"<|im_start|>"``).

        Raises:
            ValueError: no chat template; a message lacks ``role`` / ``content`` (the message names
                ``messages[i]``); the template raised (``raise_exception``) or failed to render;
                ``continue_final_message`` with ``add_generation_prompt=True`` or on a final
                message the template does not render whole.
            TypeError: ``messages`` is not a list of dicts.
        """
        if self._compiled_template is None:
            raise ValueError("chat_template: this tokenizer has no chat template")
        cont = kwargs.pop("continue_final_message", False)
        if add_generation_prompt is None:
            add_generation_prompt = not cont
        return render_chat_template(
            self._compiled_template, messages, add_generation_prompt=bool(add_generation_prompt),
            tools=tools, documents=documents, variables={**self.special_tokens_map, **kwargs},
            continue_final_message=cont, source=self.chat_template)

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool | None = None,
        **kwargs: Any,
    ) -> list[int]:
        """Render a conversation with :meth:`apply_chat_template` and tokenize it.

        The rendered text is encoded with ``add_special_tokens=False``, because the template already
        writes the special tokens (e.g. BOS) itself — as transformers' ``apply_chat_template(...,
        tokenize=True)`` does.

        Args:
            messages, add_generation_prompt, **kwargs: as for :meth:`apply_chat_template`.

        Returns:
            Prompt token ids, ``list[int]``.

        Raises:
            ValueError, TypeError: as for :meth:`apply_chat_template`.
        """
        text = self.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)
        return self.encode(text, add_special_tokens=False)

    def stream_decoder(self, skip_special_tokens: bool = False, context_ids: Sequence[int] = ()) -> "StreamDecoder":
        """A new :class:`StreamDecoder` over this tokenizer (see there for the arguments)."""
        return StreamDecoder(self, skip_special_tokens=skip_special_tokens, context_ids=context_ids)

