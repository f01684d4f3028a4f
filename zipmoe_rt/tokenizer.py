"""Text side of the runtime: tokenizer, chat template, incremental detokenizer.

This module mirrors what Hugging Face ``transformers`` does for a fast tokenizer, without importing
``transformers`` (it is only the test oracle):

* :class:`Tokenizer` wraps a ``tokenizers.Tokenizer`` built from a ``tokenizer.json`` string, the
  way ``transformers.TokenizersBackend`` / ``PreTrainedTokenizerFast``
  (``transformers/tokenization_utils_tokenizers.py``) does, including its handling of an explicit
  ``add_bos_token`` / ``add_eos_token`` flag (``update_post_processor``).
* :meth:`Tokenizer.apply_chat_template` renders a Jinja2 chat template in the same sandboxed
  environment as ``transformers/utils/chat_template_utils.py`` (``_cached_compile_jinja_template``
  and ``render_jinja_template``): ``ImmutableSandboxedEnvironment(trim_blocks=True,
  lstrip_blocks=True)`` with the ``loopcontrols`` extension, a ``{% generation %}`` block tag, the
  ``tojson`` filter override, and the ``raise_exception``, ``strftime_now``, ``dict`` and
  ``namespace`` globals. The named special tokens (``bos_token``, ``eos_token``, ...) are passed as
  template variables, as ``PreTrainedTokenizerBase.apply_chat_template`` does.
* :class:`StreamDecoder` is an incremental detokenizer (prefix-offset / read-offset windows, as in
  Hugging Face text-generation-inference's ``decode_token`` and vLLM's incremental
  detokenization) that never emits text ending in an incomplete UTF-8 sequence.

Token ids are Python ``int`` (vocabulary indices, ``0 <= id < vocab size``); texts are ``str``.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Iterable, Mapping, Sequence

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils
from jinja2.sandbox import ImmutableSandboxedEnvironment
from tokenizers import Tokenizer as _HFTokenizer
from tokenizers import processors as _processors

__all__ = ["Tokenizer", "StreamDecoder", "compile_chat_template", "REPLACEMENT_CHAR"]

#: U+FFFD, what a lossy UTF-8 decode puts in place of an invalid or incomplete byte sequence.
REPLACEMENT_CHAR = "\ufffd"

#: The named special-token attributes that ``transformers`` passes to chat templates
#: (``PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Names a message's reasoning is passed under; the first is the one chat templates read
# (transformers/utils/chat_template_utils.py: _REASONING_FIELDS).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


# --------------------------------------------------------------------------------------------
# Chat template environment (transformers/utils/chat_template_utils.py)
# --------------------------------------------------------------------------------------------


class _GenerationBlock(jinja2.ext.Extension):
    """``{% generation %}...{% endgeneration %}``: renders its body unchanged.

    transformers' ``AssistantTracker`` uses this tag to record assistant-token spans; the runtime
    does not need the spans, but templates that use the tag must still compile and render alike.
    """

    tags = {"generation"}

    def parse(self, parser):  # noqa: D102 - jinja2 extension hook
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(["name:endgeneration"], drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_render"), [], [], body).set_lineno(lineno)

    def _render(self, caller):
        return caller()


def _raise_exception(message):
    raise jinja2.exceptions.TemplateError(message)


def _tojson(x, ensure_ascii=False, indent=None, separators=None, sort_keys=False):
    # transformers overrides jinja's tojson: no HTML escaping, and exposes json.dumps options.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format):  # noqa: A002 - name used by templates
    return datetime.now().strftime(format)


class _TemplateDict:
    """``dict`` global: builds plain dicts without exposing the ``dict`` type to the sandbox."""

    def __call__(self, *args, **kwargs):
        return dict(*args, **kwargs)

    def fromkeys(self, *args, **kwargs):
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    """``namespace`` global that rejects underscore-prefixed attribute names (sandbox hardening)."""

    def __init__(*args, **kwargs):  # same signature trick as jinja2.utils.Namespace
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name, value):
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name):
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(
                f"Chat templates cannot store underscore-prefixed attributes on a namespace, but got {name!r}."
            )


def compile_chat_template(chat_template: str) -> jinja2.Template:
    """Compile a chat template in the environment transformers renders chat templates in.

    Mirrors ``_cached_compile_jinja_template`` in ``transformers/utils/chat_template_utils.py``.

    Args:
        chat_template: Jinja2 source of the template.

    Returns:
        The compiled ``jinja2.Template``.

    Raises:
        TypeError: ``chat_template`` is not a ``str``.
        ValueError: the template does not parse; the message names ``chat_template`` and the line.
    """
    if not isinstance(chat_template, str):
        raise TypeError(f"chat_template: expected a str, got {type(chat_template).__name__}")
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    try:
        return env.from_string(chat_template)
    except jinja2.exceptions.TemplateSyntaxError as e:
        raise ValueError(f"chat_template: Jinja syntax error at line {e.lineno}: {e.message}") from e


def _plain_template_data(value: Any) -> Any:
    """Rebuild ``value`` from plain JSON types, as transformers does before rendering.

    Mirrors ``_plain_template_data`` (transformers/utils/chat_template_utils.py): exact scalars pass,
    subclasses are cut back to the base type, mappings/lists/tuples are copied recursively, numpy
    scalars become Python scalars, anything else becomes the placeholder ``"<TypeName>"``.
    """
    if value is None or type(value) in (str, int, float, bool):
        return value
    if isinstance(value, str):
        return str.__str__(value)
    if isinstance(value, bool):
        return bool(value)
    if isinstance(value, int):
        return int.__int__(value)
    if isinstance(value, float):
        return float.__float__(value)
    if isinstance(value, Mapping):
        return {_plain_template_data(k): _plain_template_data(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_plain_template_data(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_plain_template_data(v) for v in value)
    item = getattr(value, "item", None)  # numpy scalars, without importing numpy here
    if type(value).__module__ == "numpy" and callable(item):
        return _plain_template_data(item())
    return f"<{type(value).__name__}>"


def _normalize_messages(messages: Any) -> list[dict]:
    """Validate chat messages and convert them to what the template sees.

    Keys whose value is ``None`` are dropped and reasoning is aliased to ``reasoning_content`` and
    ``thinking`` (transformers: ``_normalize_chat_messages`` and ``_alias_reasoning_fields``).
    """
    if not isinstance(messages, (list, tuple)):
        raise TypeError(f"messages: expected a list of dicts, got {type(messages).__name__}")
    if len(messages) == 0:
        raise ValueError("messages: the conversation is empty; provide at least one message")
    out = []
    for i, message in enumerate(messages):
        if not isinstance(message, Mapping):
            raise TypeError(f"messages[{i}]: expected a dict with 'role' and 'content', got {type(message).__name__}")
        message = {k: v for k, v in message.items() if v is not None}
        if "role" not in message:
            raise ValueError(f"messages[{i}]: missing 'role'")
        if not isinstance(message["role"], str):
            raise ValueError(f"messages[{i}]['role']: expected a str, got {type(message['role']).__name__}")
        if "content" not in message and "tool_calls" not in message:
            raise ValueError(f"messages[{i}]: missing 'content' (role {message['role']!r})")
        if "content" in message and not isinstance(message["content"], (str, list, tuple)):
            raise ValueError(
                f"messages[{i}]['content']: expected a str or a list of content blocks, "
                f"got {type(message['content']).__name__}"
            )
        message = _plain_template_data(message)
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


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
        """
        if not isinstance(text, str):
            raise TypeError(f"text: expected a str, got {type(text).__name__}")
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
        add_generation_prompt: bool = True,
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
        Unlike transformers, ``add_generation_prompt`` defaults to ``True`` and
        ``continue_final_message`` is not supported.

        Args:
            messages: ``[{"role": str, "content": str | list, ...}, ...]``, at least one message.
                ``content`` may be absent only when the message has ``tool_calls``.
            add_generation_prompt: append the header that starts an assistant turn.
            tools: JSON-schema tool descriptions for templates that support tools.
            documents: retrieval documents for templates that support them.
            **kwargs: extra template variables (e.g. ``enable_thinking=False``).

        Returns:
            The rendered prompt text (special tokens as text, e.g. ``"<|im_start|>"``).

        Raises:
            ValueError: no chat template; a message lacks ``role`` / ``content`` (the message names
                ``messages[i]``); the template raised (``raise_exception``) or failed to render.
            TypeError: ``messages`` is not a list of dicts.
        """
        if self._compiled_template is None:
            raise ValueError("chat_template: this tokenizer has no chat template")
        if "continue_final_message" in kwargs:
            raise ValueError("continue_final_message: not supported")
        chat = _normalize_messages(messages)
        if tools is not None and not all(isinstance(t, Mapping) for t in tools):
            raise TypeError("tools: expected a list of JSON-schema dicts")
        if documents is not None and not all(isinstance(d, Mapping) for d in documents):
            raise TypeError("documents: expected a list of dicts with 'title' and 'text' keys")
        variables = {**self.special_tokens_map, **_plain_template_data(kwargs)}
        try:
            return self._compiled_template.render(
                messages=chat,
                tools=_plain_template_data(tools),
                documents=_plain_template_data(documents),
                add_generation_prompt=bool(add_generation_prompt),
                **variables,
            )
        except jinja2.exceptions.TemplateError as e:
            raise ValueError(f"chat_template: {e}") from e
        except (TypeError, KeyError, AttributeError, IndexError) as e:
            raise ValueError(f"chat_template: rendering failed: {type(e).__name__}: {e}") from e

    def encode_chat(
        self,
        messages: Sequence[Mapping[str, Any]],
        add_generation_prompt: bool = True,
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


# --------------------------------------------------------------------------------------------
# Incremental detokenization
# --------------------------------------------------------------------------------------------


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
