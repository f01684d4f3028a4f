"""Option types of the command line: click's ranges with plain-worded errors.

click's own ``IntRange`` and ``FloatRange`` say "'abc' is not a valid integer range" for a
value that is not a number and let ``nan`` and ``inf`` through every float range; these say
"'abc' is not a valid integer" and refuse non-finite numbers, naming the option as click does
(``Invalid value for '--seed': ...``). ``-n/--max-tokens`` takes llama.cpp's ``-1`` (no limit).
"""
from __future__ import annotations

import math
import sys

import click


class IntRange(click.IntRange):
    """An integer in a range (click's :class:`click.IntRange`, worded "integer").

    ``shown``: the range in ``--help`` (``[x>=1 or x=-1]``) for a range a callback narrows
    further (click would show an unbounded range as ``[x<=None]``)."""

    name = "integer"

    def __init__(self, *args, shown: str | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.shown = shown

    def _describe_range(self) -> str:
        if self.shown is not None:
            return self.shown
        if self.min is None and self.max is None:
            return ""                          # any integer: no range in --help
        return super()._describe_range()


#: the largest float32 (``--temp``'s upper bound, as :data:`zipmoe_rt.sampling.TEMPERATURE_MAX`;
#: spelled out so that the command line starts without importing NumPy)
FLOAT32_MAX = 3.4028234663852886e+38


class FloatRange(click.FloatRange):
    """A finite number in a range (click's :class:`click.FloatRange`; ``nan`` and ``inf``
    refused).

    ``most``: an upper bound checked but not shown in ``--help`` (``--temp``'s largest float32,
    which would print as ``[0.0<=x<=3.4028234663852886e+38]``); a number above it is refused
    naming the bound."""

    name = "number"

    def __init__(self, *args, most: float | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.most = most

    def convert(self, value, param, ctx):
        v = click.types.FloatParamType.convert(self, value, param, ctx)   # the number first
        if not math.isfinite(v):
            self.fail(f"{value!r} is not a finite number", param, ctx)
        v = super().convert(v, param, ctx)                                # then the range
        if self.most is not None and v > self.most:
            self.fail(f"{value!r} is more than {self.most:.6g}, the largest accepted", param, ctx)
        return v


def folder_message(path) -> str:
    """The error for a folder given where a ``.zmoe`` file is expected (a Hugging Face
    checkpoint folder, typically): convert it first. The one wording of ``load()`` and of every
    command's MODEL argument."""
    return f"{path}: is a folder; convert it first with `zipmoe-rt convert {path} -o model.zmoe`"


class ModelPath(click.Path):
    """MODEL, a ``.zmoe`` file: a folder is refused with :func:`folder_message` as the whole
    one-line error (not click's "Invalid value for '[MODEL]': ... is a directory")."""

    def folder_error(self, value) -> str:
        """The one-line error for ``value``, a folder."""
        return folder_message(value)

    def convert(self, value, param, ctx):
        import os
        if os.path.isdir(value):
            raise click.UsageError(self.folder_error(value), ctx)
        return super().convert(value, param, ctx)


class TextPath(ModelPath):
    """A text file argument (``perplexity``'s FILE): a folder is refused in the same one-line
    form as MODEL's."""

    def folder_error(self, value) -> str:
        """The one-line error for ``value``, a folder."""
        return f"{value}: is a folder; give a UTF-8 text file"


def split_percent(params, args) -> str | None:
    """The error for a size option's value split from its ``%`` by a space (``--memory-budget
    25 %``: the shell passes ``25`` and ``%`` as two words, and ``%`` would be taken as MODEL),
    or None. ``params``: the command's click parameters; the size options are those whose
    metavar starts with ``SIZE``."""
    sized = {o for p in params if isinstance(p, click.Option)
             and (p.metavar or "").startswith("SIZE") for o in p.opts}
    for i, a in enumerate(args):
        if not a.startswith("%") or i == 0:
            continue
        prev = args[i - 1]
        opt, eq, val = prev.partition("=")
        if eq and opt in sized:
            shown = f"{opt}={val}"
        elif i >= 2 and args[i - 2] in sized:
            opt, val, shown = args[i - 2], prev, f"{args[i - 2]} {prev}"
        else:
            continue
        try:
            float(val)
        except ValueError:          # not a number: no percentage meant
            continue
        what = "a lone '%'" if a == "%" else repr(a)
        return (f"{shown}: followed by {what} (a space splits the size in two); "
                f"did you mean {opt} {val}%?")
    return None


#: ``-n -1``: generate until a stop token or the full context, as llama.cpp's ``-n -1``
NO_LIMIT = -1


def max_tokens_option(value):
    """``-n/--max-tokens`` of ``run`` and ``chat``: at least 1, or :data:`NO_LIMIT`.

    Raises:
        click.BadParameter: 0 (or below -1), worded with both choices.
    """
    if value is not None and value != NO_LIMIT and value < 1:
        raise click.BadParameter(f"{value}: give at least 1 token, or -1 for no limit (until "
                                 f"a stop token or the context is full)")
    return value


def max_tokens_for(requested: int | None, default: int, ctx_size: int) -> int:
    """The ``max_tokens`` of a run: ``requested``, ``default`` when None, the context size
    (``ctx_size`` tokens, which bounds every reply) for :data:`NO_LIMIT`."""
    if requested is None:
        return default
    return ctx_size if requested == NO_LIMIT else requested


def utf8_text(text: str | None, what: str) -> str | None:
    """``text`` from the command line or standard input, checked to be UTF-8.

    Python hands bytes that are not UTF-8 over as lone surrogates (``surrogateescape``),
    which the tokenizer cannot encode; this names the input and the first bad byte instead.

    Raises:
        ValueError: ``"WHAT: not valid UTF-8 (byte 0xff at character 3)"``.
    """
    if text is None:
        return None
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as e:
        c = ord(text[e.start])
        byte = f"byte 0x{c & 0xff:02x}" if 0xdc80 <= c <= 0xdcff else f"code point U+{c:04X}"
        raise ValueError(f"{what}: not valid UTF-8 ({byte} at character {e.start}); save "
                         f"the text as UTF-8") from None
    return text


def lenient_stdin() -> None:
    """Let standard input hand bytes that are not UTF-8 over as lone surrogates (as Python
    does under the C locale) instead of raising UnicodeDecodeError mid-read, so that
    :func:`utf8_text` can name the input and the byte. Does nothing where the stream cannot
    be reconfigured."""
    try:
        sys.stdin.reconfigure(errors="surrogateescape")
    except (AttributeError, ValueError, OSError):
        pass


def need_stdin(what: str) -> None:
    """Check that standard input is open (``cmd <&-`` closes it: Python's ``sys.stdin`` is
    None then).

    Raises:
        ValueError: ``"WHAT: standard input is closed"``.
    """
    if sys.stdin is None:
        raise ValueError(f"{what}: standard input is closed")
