"""Stop strings: the reply ends before the first of them, which is never part of the text.

One implementation behind ``run`` / ``chat --stop`` and the Python API's ``stop=`` argument
(:meth:`zipmoe_rt.api.Model.generate`, :meth:`~zipmoe_rt.api.Model.chat`,
:meth:`~zipmoe_rt.api.ChatSession.send`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Iterator, Sequence


def check_stops(stop) -> list[str]:
    """The API's ``stop`` argument as a list: None, one string, or a list of strings (as
    OpenAI's and llama-cpp-python's ``stop``), each at least one character.

    Raises:
        TypeError: neither a str nor a list of str.
        ValueError: an empty stop string (it would match at once).
    """
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, (list, tuple)) or not all(isinstance(s, str) for s in stop):
        raise TypeError(f"stop: expected a str or a list of str, got {stop!r}")
    if not all(stop):
        raise ValueError("stop: a stop string must have at least one character")
    return list(stop)


def stop_at(pieces: Iterator[str], stops: Sequence[str], model=None) -> Iterator[str]:
    """Pass text pieces through until one of ``stops`` appears; the stop string and what
    follows are never yielded, and ``pieces`` is closed then. Text that might be the start of
    a stop string is held back until the next piece tells. When a stop string ends the reply,
    ``model.last_stats.finish_reason`` becomes ``"stop"`` (as for a stop token)."""
    stops = [s for s in stops if s]
    if not stops:
        yield from pieces
        return
    held = ""
    hit = False
    try:
        for piece in pieces:
            held += piece
            cut = min((i for i in (held.find(s) for s in stops) if i >= 0), default=-1)
            if cut >= 0:
                if cut:
                    yield held[:cut]
                hit = True
                return
            keep = max((k for s in stops for k in range(1, len(s))
                        if held.endswith(s[:k])), default=0)
            if len(held) > keep:
                yield held[:len(held) - keep]
                held = held[len(held) - keep:]
        if held:
            yield held
    finally:
        pieces.close()
        if hit and model is not None and model.last_stats is not None:
            model.last_stats = replace(model.last_stats, finish_reason="stop")
