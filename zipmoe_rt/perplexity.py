"""Sliding-window perplexity of a model on a text (``zipmoe-rt perplexity``).

The recipe is transformers' "Perplexity of fixed-length models" guide
(``docs/source/en/perplexity.md``): the token ids of the whole text are cut into windows of
``ctx`` tokens whose starts move by ``stride``; each window is run from an empty KV cache
(positions 0 .. ctx-1), and only the tokens no earlier window scored are scored in it, so that
with ``stride < ctx`` every scored token has at least ``ctx - stride`` tokens of context.

What is scored, exactly (:func:`windows`): window ``w`` covers ids ``[begin, end)`` with
``begin = w * stride`` and ``end = min(begin + ctx, N)``, and scores token ``t`` for
``max(prev_end, begin + 1) <= t < end`` (``prev_end`` the previous window's end, 0 for the
first) by ``-log p(ids[t] | ids[begin:t])``; the windows stop at the first that reaches the
end of the text. So token 0 is never scored (nothing predicts it), with ``stride < ctx``
every other token is scored exactly once, and with ``stride == ctx`` the first token of each
window is not scored either (the guide's labels leave it out the same way). The result is the
mean of the scored tokens' negative log-likelihoods (natural log) and its exponential.

The guide's loop weights each window's mean loss by its unmasked labels minus one (older
versions: by ``trg_len``); that is the number of tokens scored for the first window but one
less than it for the next ones (their first unmasked label is predicted too). Here every
scored token counts once, which is the sum transformers' own loss gives over the same labels
(the tests compare with that: each window's loss times the labels it averaged).

Log-probabilities are computed in float64 from the model's float32 logits. Importable without
Numba (the model passed in brings its own backend).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np


class PerplexityError(ValueError):
    """Windows or text that cannot give a perplexity (the message names the option or file)."""


@dataclass
class Perplexity:
    """The result of :func:`perplexity`.

    Attributes:
        tokens: token ids in the text (N).  scored: tokens scored.  windows: windows run.
        nll_sum: sum of the scored tokens' negative log-likelihoods (nats).
        ctx, stride: the window length and step (tokens).
    """

    tokens: int
    scored: int
    windows: int
    nll_sum: float
    ctx: int
    stride: int

    @property
    def mean_nll(self) -> float:
        """Mean negative log-likelihood per scored token (nats)."""
        return self.nll_sum / self.scored

    @property
    def ppl(self) -> float:
        """Perplexity, ``exp(mean_nll)``."""
        return math.exp(self.mean_nll)


def check_windows(n_tokens: int, ctx: int, stride: int, max_ctx: int | None = None,
                  where: str = "the text") -> None:
    """Refuse windows that cannot score the text.

    Args:
        n_tokens: token ids in the text.  ctx, stride: window length and step.
        max_ctx: the model's context length (``max_position_embeddings``), if known.
        where: what to name when the text is too short (e.g. the file).
    Raises:
        PerplexityError: ``ctx`` or ``stride`` below 1, ``stride > ctx`` (tokens would be
            skipped), ``ctx`` above ``max_ctx``, ``ctx`` of 1 (nothing to condition on), or
            fewer than 2 tokens.
    """
    for name, v in (("--ctx", ctx), ("--stride", stride)):
        if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
            raise PerplexityError(f"{name} must be a positive number of tokens, got {v!r}")
    if ctx < 2:
        raise PerplexityError(f"--ctx must be at least 2 tokens (one to predict from), got {ctx}")
    if stride > ctx:
        raise PerplexityError(f"--stride {stride} is larger than --ctx {ctx}: the tokens between "
                              f"windows would never be scored")
    if max_ctx is not None and ctx > max_ctx:
        raise PerplexityError(f"--ctx {ctx} is longer than the model's context length "
                              f"(max_position_embeddings {max_ctx})")
    if n_tokens < 2:
        raise PerplexityError(f"{where}: {n_tokens} token{'' if n_tokens == 1 else 's'}; at "
                              f"least 2 are needed (the first is never scored)")


def windows(n_tokens: int, ctx: int, stride: int) -> list[tuple[int, int, int]]:
    """The windows of the recipe (see the module docstring).

    Returns:
        ``(begin, end, first)`` per window: it runs ids ``[begin, end)`` and scores tokens
        ``first .. end - 1``.
    Raises:
        PerplexityError: as :func:`check_windows`.
    """
    check_windows(n_tokens, ctx, stride)
    out, prev_end = [], 0
    for begin in range(0, n_tokens, stride):
        end = min(begin + ctx, n_tokens)
        out.append((begin, end, max(prev_end, begin + 1)))
        prev_end = end
        if end == n_tokens:
            break
    return out


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target: float64 ``logsumexp(row) - row[target]``.

    Args:
        logits: float32 [T, V].  targets: int [T] token ids.
    Returns:
        float64 [T] (nats).
    """
    z = np.asarray(logits, dtype=np.float64)
    m = z.max(axis=1, keepdims=True)
    lse = np.log(np.exp(z - m).sum(axis=1)) + m[:, 0]
    return lse - z[np.arange(len(targets)), np.asarray(targets, dtype=np.int64)]


def perplexity(net, ids, ctx: int, stride: int, max_ctx: int | None = None,
               progress=None) -> Perplexity:
    """Sliding-window perplexity of ``net`` on token ids ``ids``.

    Args:
        net: a runtime model (:class:`~zipmoe_rt.models.model.Model`: ``new_cache`` and
            ``forward(ids, cache, last_only=False) -> float32 [T, vocab]``), budgeted or not.
        ids: int token ids [N] of the text.
        ctx: window length (tokens).  stride: step between window starts (tokens).
        max_ctx: the model's context length; ``ctx`` may not exceed it.
        progress: optional callable ``(windows_done, windows_total)``.
    Returns:
        a :class:`Perplexity`.
    Raises:
        PerplexityError: see :func:`check_windows`.  IndexError: an id outside the vocabulary.
    """
    ids = np.ascontiguousarray(ids, dtype=np.int64).reshape(-1)
    check_windows(len(ids), ctx, stride, max_ctx)
    wins = windows(len(ids), ctx, stride)
    total, scored = 0.0, 0
    for w, (begin, end, first) in enumerate(wins):
        cache = net.new_cache(max_tokens=end - begin)
        logits = net.forward(ids[begin:end], cache, last_only=False)
        # logits row j predicts the token at begin + j + 1
        rows = logits[first - begin - 1:end - begin - 1]
        total += float(token_nll(rows, ids[first:end]).sum())
        scored += end - first
        if progress is not None:
            progress(w + 1, len(wins))
    return Perplexity(tokens=len(ids), scored=scored, windows=len(wins), nll_sum=total,
                      ctx=int(ctx), stride=int(stride))
