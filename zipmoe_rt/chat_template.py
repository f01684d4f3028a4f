"""Chat-template rendering, as Hugging Face ``transformers`` renders chat templates.

:func:`compile_chat_template` compiles a Jinja2 chat template in the same sandboxed environment as
``transformers/utils/chat_template_utils.py`` (``_cached_compile_jinja_template``):
``ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True)`` with the
``loopcontrols`` extension, a ``{% generation %}`` block tag, the ``tojson`` filter override, and
the ``raise_exception``, ``strftime_now``, ``dict`` and ``namespace`` globals.
:func:`render_chat_template` validates and normalises a conversation and renders it
(``render_jinja_template``); :class:`~zipmoe_rt.tokenizer.Tokenizer` passes its named special
tokens (``bos_token``, ``eos_token``, ...) as template variables, as
``PreTrainedTokenizerBase.apply_chat_template`` does.
"""
from __future__ import annotations

import json
from datetime import datetime
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.exceptions
import jinja2.ext
import jinja2.nodes
import jinja2.utils

from .chat_template_limits import BoundedEnvironment

__all__ = ["compile_chat_template", "render_chat_template", "SPECIAL_TOKEN_NAMES", "is_harmony"]

#: The named special-token attributes that ``transformers`` passes to chat templates
#: (``PreTrainedTokenizerBase.SPECIAL_TOKENS_ATTRIBUTES``).
SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")

# Names a message's reasoning is passed under; the first is the one chat templates read
# (transformers/utils/chat_template_utils.py: _REASONING_FIELDS).
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")


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

    Mirrors ``_cached_compile_jinja_template`` in ``transformers/utils/chat_template_utils.py``,
    in a sandbox that also bounds every render of the template in work and size
    (:mod:`zipmoe_rt.chat_template_limits`): a template that loops or builds without end stops
    with ``RenderLimitError`` (a ``TemplateError``) instead of hanging.

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
    env = BoundedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationBlock, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.bound_filters()
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


def _check_unicode(value: Any, path: str, depth: int = 0) -> None:
    """Refuse a string holding a lone surrogate (``"\\ud800"``: no text encoding can hold it)
    anywhere in ``value``, naming where as the server does (``messages[0].content: ... at
    character 0``), not as a position in the rendered prompt."""
    if depth > 64:          # deeper still: the prompt's own encoding refuses it
        return
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as e:
            raise ValueError(f"{path}: not valid Unicode (a lone surrogate "
                             f"\\u{ord(value[e.start]):04x} at character {e.start})") from None
    elif isinstance(value, Mapping):
        for k, v in value.items():
            _check_unicode(v, f"{path}.{k}", depth + 1)
    elif isinstance(value, (list, tuple)):
        for j, v in enumerate(value):
            _check_unicode(v, f"{path}[{j}]", depth + 1)


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
        _check_unicode(message, f"messages[{i}]")
        message = _plain_template_data(message)
        reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
        if reasoning is not None:
            message = {"thinking": reasoning, **message, "reasoning_content": reasoning}
        out.append(message)
    return out



_CONTINUE_TAG = "CONTINUE_FINAL_MESSAGE_TAG "


def _tag_final_message(chat: list[dict], field: str, source: str) -> str:
    """Append the continuation tag to the final message's ``field`` (every reasoning alias of it,
    or the last text block of list content); return the text being continued."""
    final = chat[-1].get(field)
    if final is None:
        raise ValueError(f'continue_final_message: the final message has no "{field}" to continue')
    fields = [field]
    if field in _REASONING_FIELDS:   # reasoning is present under several names: tag every copy
        fields = [f for f in _REASONING_FIELDS if chat[-1].get(f) == final]
    if not any(f in source for f in fields):
        raise ValueError(f'continue_final_message: the chat template never reads "{field}"')
    if isinstance(final, (list, tuple)):
        for block in reversed(final):
            if isinstance(block, dict) and "text" in block:
                final, block["text"] = block["text"], block["text"] + _CONTINUE_TAG
                return final
        raise ValueError("continue_final_message: the final message has no text block to continue")
    for f in fields:
        chat[-1][f] = chat[-1][f] + _CONTINUE_TAG
    return final


def _cut_at_tag(rendered: str, final: str) -> str:
    """The rendered prompt up to where the continued text ends (before the end-of-turn markup)."""
    tag = _CONTINUE_TAG.strip()
    if final.strip() not in rendered or tag not in rendered:
        raise ValueError("continue_final_message: the chat template drops part of the final message, "
                         "so it cannot be continued")
    at = rendered.rindex(tag)
    if rendered[at:at + len(_CONTINUE_TAG)] == _CONTINUE_TAG:
        return rendered[:at]
    return rendered[:at].rstrip()   # the template trimmed the message's trailing space


def render_chat_template(
    template: jinja2.Template,
    messages: Sequence[Mapping[str, Any]],
    *,
    add_generation_prompt: bool,
    tools: list[dict] | None,
    documents: list[dict] | None,
    variables: Mapping[str, Any],
    continue_final_message: bool | str = False,
    source: str | None = None,
) -> str:
    """Render a conversation with a :func:`compile_chat_template` template.

    Mirrors ``render_jinja_template`` (transformers/utils/chat_template_utils.py): the template
    sees ``messages`` (normalised: keys whose value is ``None`` dropped, reasoning exposed as
    ``reasoning_content`` and ``thinking``), ``tools``, ``documents``, ``add_generation_prompt``
    and ``variables`` (e.g. the special tokens and the caller's extra keyword arguments), all
    rebuilt from plain JSON types.

    ``continue_final_message`` (``True`` for ``"content"``, or the name of the field, e.g.
    ``"reasoning_content"``) renders the final message open, so that generation continues it: a
    tag is appended to that field, the conversation rendered, and the text cut where the tag
    begins (what follows it is the template's end-of-turn markup). ``source`` is the template's
    text, which must read that field.

    Raises:
        ValueError: a message lacks ``role`` / ``content`` (the message names ``messages[i]``);
            the template raised (``raise_exception``) or failed to render; the render passed a
            budget of :mod:`~zipmoe_rt.chat_template_limits` (``chat_template: rendering
            stopped: ...``, naming the limit); ``continue_final_message``
            with ``add_generation_prompt``, or a final message / template that cannot be continued.
        TypeError: ``messages`` is not a list of dicts, or ``tools`` / ``documents`` are not
            lists of dicts.
    """
    chat = _normalize_messages(messages)
    if tools is not None and not all(isinstance(t, Mapping) for t in tools):
        raise TypeError("tools: expected a list of JSON-schema dicts")
    if documents is not None and not all(isinstance(d, Mapping) for d in documents):
        raise TypeError("documents: expected a list of dicts with 'title' and 'text' keys")
    variables = _plain_template_data(dict(variables))
    final = None
    if continue_final_message:
        if add_generation_prompt:
            raise ValueError("continue_final_message: not compatible with add_generation_prompt")
        field = continue_final_message if isinstance(continue_final_message, str) else "content"
        final = _tag_final_message(chat, field, source or "")
    try:
        rendered = template.render(
            messages=chat,
            tools=_plain_template_data(tools),
            documents=_plain_template_data(documents),
            add_generation_prompt=bool(add_generation_prompt),
            **variables,
        )
    except jinja2.exceptions.TemplateError as e:
        raise ValueError(f"chat_template: {e}") from e
    except RecursionError as e:
        raise ValueError("chat_template: rendering stopped: calls nested too deeply") from e
    except (TypeError, KeyError, AttributeError, IndexError, OverflowError, MemoryError) as e:
        raise ValueError(f"chat_template: rendering failed: {type(e).__name__}: {e}") from e
    return rendered if final is None else _cut_at_tag(rendered, final)


def is_harmony(chat_template: str | None) -> bool:
    """Whether a chat template writes OpenAI's harmony format (gpt-oss's: messages
    ``<|start|>ROLE<|channel|>CHANNEL<|message|>BODY``), whose replies are split into
    channels by :class:`zipmoe_rt.server.harmony.HarmonySplitter`."""
    return bool(chat_template) and "<|channel|>" in chat_template \
        and "<|message|>" in chat_template
