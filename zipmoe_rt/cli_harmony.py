"""gpt-oss's replies (the harmony format) in ``zipmoe-rt run`` and ``chat``: the channels are
split as ``serve`` splits them (:class:`~zipmoe_rt.server.harmony.HarmonySplitter`): the
``final`` channel is the reply printed on stdout; the ``analysis`` channel (the reasoning) is
shown only with ``--show-reasoning``, on stderr as it streams (dimmed on a terminal), ended by
a blank line before the answer; a ``commentary`` message addressed ``to=functions.NAME`` (a tool
call, which the command line does not run) is one note on stderr. The markup itself
(``<|channel|>``, ``<|message|>``, ...) is never printed.
"""
from __future__ import annotations

from typing import Iterator

import click

__all__ = ["HarmonyReply"]


class HarmonyReply:
    """One harmony reply on its way to the terminal.

    Args:
        show_reasoning: print the ``analysis`` channel on stderr as it arrives.

    Attributes:
        content: the ``final`` channel's text so far.  splitter: the
            :class:`~zipmoe_rt.server.harmony.HarmonySplitter` (``reasoning``, ``calls``).
    """

    def __init__(self, show_reasoning: bool = False):
        from .server.harmony import HarmonySplitter    # (pure Python: no server extra needed)
        self.show_reasoning = show_reasoning
        self.splitter = HarmonySplitter()
        self.content = ""
        self._reasoning_shown = False

    def filter(self, pieces: Iterator[str]) -> Iterator[str]:
        """Yield the ``final`` channel's text of ``pieces`` (the reply decoded with its special
        tokens: ``skip_special_tokens=False``); closing this closes ``pieces``."""
        sp = self.splitter
        try:
            for piece in pieces:
                out = sp.push(piece)
                self._show_reasoning(bool(out))
                if out:
                    self.content += out
                    yield out
            out = sp.flush()
            self._show_reasoning(bool(out))
            if out:
                self.content += out
                yield out
            for call in sp.finish()[0]:
                f = call["function"]
                click.echo(f"(tool call {f['name']}({f['arguments']}): the command line does "
                           f"not run tools)", err=True)
        finally:
            self._show_reasoning(True)
            pieces.close()

    def _show_reasoning(self, answer_follows: bool) -> None:
        if not self.show_reasoning:
            return
        text = self.splitter.take_reasoning()
        if text:
            click.secho(text, nl=False, err=True, dim=True)
            self._reasoning_shown = True
        if answer_follows and self._reasoning_shown:
            click.echo("\n", err=True)            # a blank line between reasoning and answer
            self._reasoning_shown = False

    def message(self) -> dict:
        """The assistant turn to keep in the conversation: the final text as ``content`` and
        the reasoning as ``thinking`` (the key gpt-oss's chat template reads)."""
        msg = {"role": "assistant", "content": self.content}
        if self.splitter.reasoning:
            msg["thinking"] = self.splitter.reasoning
        return msg


def harmony_reply(m, show_reasoning: bool, raw: bool):
    """A :class:`~zipmoe_rt.cli_harmony.HarmonyReply` when the model's chat template writes
    gpt-oss's harmony format (and the prompt goes through it: not ``--raw``), else None, with
    one warning line when ``--show-reasoning`` then has nothing to show."""
    from .chat_template import is_harmony
    if not raw and is_harmony(m.tokenizer.chat_template):
        return HarmonyReply(show_reasoning)
    if show_reasoning:
        why = ("--raw completes the prompt without the chat template" if raw else
               "the model's chat template has no separate reasoning channel (harmony format)")
        click.echo(f"zipmoe-rt: warning: --show-reasoning: no effect: {why}", err=True)
    return None
