"""Module switches compared inside one loaded model: decode steps timed in blocks, the blocks
alternating between the defaults and the switches flipped in ABBA order (A B B A A B B A ...),
so that a drift of the machine's speed over the run touches both sides alike.

Rows of ``tools/gpu_timeline.py`` are timed one after the other, each with its own load; on one
H100 host two rows of the same code and configuration differed by up to 1.35× (docs/benchmarks.md
§13, run 12), more than the switches' effects. ``gpu_timeline.py run --interleave N`` times each
``--ab`` row with :func:`interleaved` instead: the same model, the same cache, the same token
stream, blocks of ``N`` tokens. The switches are module attributes the engine reads at every
use (``gpu_timeline.AB_SWITCHES``), so flipping them between two decode steps changes what the
next step does and nothing else.
"""
from __future__ import annotations

import contextlib
import statistics
import time


def abba(i: int) -> bool:
    """Whether block ``i`` (0-based) runs with the switches flipped: A B B A A B B A ...

    >>> [abba(i) for i in range(8)]
    [False, True, True, False, False, True, True, False]
    """
    return (i % 4) in (1, 2)


def interleaved(step, sync, ids, block: int, flip) -> dict:
    """Time ``len(ids) // block`` blocks of decode steps, blocks alternating (:func:`abba`)
    between the defaults and the context manager ``flip()`` (the switches flipped).

    Args:
        step: ``step(token_id) -> logits``, one decode step (it advances the model's cache).
        sync: waits for the device's queued work (called before and after each block).
        ids: the token ids to feed, one per step (at least ``2 * block``).
        block: decode steps per block (>= 1).
        flip: a callable returning a context manager that flips the switches.

    Returns:
        ``{"plain_s", "flipped_s"}``: median seconds per token of the default and the flipped
        blocks; ``"ratio"``: median over consecutive (default, flipped) block pairs of default
        time ÷ flipped time (> 1: flipped is faster), with ``"ratio_min"``, ``"ratio_max"``;
        ``"blocks"``: ``(flipped, seconds per token)`` per block in order; ``"logits"``: every
        step's logits in order.

    Raises:
        ValueError: ``block`` < 1 or fewer than two blocks of ``ids``.
    """
    block = int(block)
    n = len(ids) // block if block >= 1 else 0
    if block < 1 or n < 2:
        raise ValueError(f"--interleave: blocks of {block} tokens need at least "
                         f"{2 * max(block, 1)} timed tokens, got {len(ids)}")
    blocks, logits = [], []
    for i in range(n):
        flipped = abba(i)
        with (flip() if flipped else contextlib.nullcontext()):
            sync()
            t0 = time.perf_counter()
            for t in ids[i * block:(i + 1) * block]:
                logits.append(step(t))
            sync()
            blocks.append((flipped, (time.perf_counter() - t0) / block))
    plain = [s for f, s in blocks if not f]
    flipped = [s for f, s in blocks if f]
    ratios = [p / f for p, f in zip(plain, flipped)]
    return {"plain_s": statistics.median(plain), "flipped_s": statistics.median(flipped),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios),
            "ratio_max": max(ratios), "blocks": blocks, "logits": logits}
