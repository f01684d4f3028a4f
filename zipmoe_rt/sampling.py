"""Sampling: decoding options and the logits processors that turn logits into the next token.

Mirrors the logits processors of Hugging Face ``transformers``
(``transformers/generation/logits_process.py``) in the order ``GenerationMixin._get_logits_processor``
(``transformers/generation/utils.py``) applies them:

1. ``RepetitionPenaltyLogitsProcessor`` — for every token id already in the context (prompt,
   earlier turns held in the cache, and the tokens generated so far) the logit ``x`` becomes
   ``x * penalty`` if ``x < 0`` else ``x / penalty``. Applied for greedy decoding too.
2. greedy (``temperature == 0``, transformers' ``do_sample=False``): ``argmax``; the warpers below
   are skipped, as in transformers.
3. ``TemperatureLogitsWarper``: ``x / temperature``.
4. ``TopKLogitsWarper``: drop tokens whose logit is below the k-th largest (ties at the k-th are kept).
5. ``TopPLogitsWarper``: sorted ascending, drop the tokens whose cumulative probability is
   ``<= 1 - top_p`` (nucleus sampling), always keeping the most likely token.
6. ``MinPLogitsWarper``: drop tokens with probability ``< min_p * max probability``.

Then one token is drawn from the softmax of what is left, with a seeded
``numpy.random.Generator``. The token loop that drives it is :mod:`zipmoe_rt.generate`.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping, Sequence

import numpy as np

from .util import is_int, is_real

__all__ = ["SamplingParams", "Sampler", "GenerationConfigError", "file_sampling"]

#: the largest temperature: the largest float32 (the logits are float32)
TEMPERATURE_MAX = float(np.finfo(np.float32).max)


@dataclass(frozen=True)
class SamplingParams:
    """Decoding options, validated on construction.

    Attributes:
        temperature: softmax temperature, in ``[0, TEMPERATURE_MAX]``. ``0`` selects greedy
            decoding (``argmax``; then ``top_k``, ``top_p`` and ``min_p`` are ignored, like
            transformers with ``do_sample=False``); a positive one so small that a logit
            divided by it overflows float32 samples its limit, the argmax, too.
        top_k: keep the ``top_k`` most likely tokens; ``0`` turns it off. ``>= 0``.
        top_p: nucleus sampling mass in ``[0, 1]``; ``1.0`` turns it off.
        min_p: keep tokens with probability ``>= min_p * max probability``; in ``[0, 1]``; ``0``
            turns it off.
        repetition_penalty: ``> 0``; ``1.0`` turns it off. Applies to every token id in the
            context: the cache's tokens (see :class:`~zipmoe_rt.generate.CacheState`), the
            prompt and the output.
        seed: seed of the ``numpy.random.Generator`` (``None`` or ``-1``, the CLI's
            ``--seed -1``: fresh OS entropy; ``-1`` is stored as ``None``). Same seed, model and
            prompt give the same tokens.
        max_tokens: the most tokens to sample (the stop token included), ``>= 1``.

    Raises:
        ValueError: an option is out of range or of the wrong type; the message names it.
    """

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    max_tokens: int = 512

    def __post_init__(self):
        def real(name: str, lo: float, hi: float, lo_open: bool = False) -> None:
            v = getattr(self, name)
            if not is_real(v) or not math.isfinite(v):
                raise ValueError(f"{name}: expected a finite number, got {v!r}")
            if (v <= lo if lo_open else v < lo) or v > hi:
                raise ValueError(f"{name}: must be in {'(' if lo_open else '['}{lo}, {hi}], got {v!r}")
            object.__setattr__(self, name, float(v))

        real("temperature", 0.0, math.inf)
        if self.temperature > TEMPERATURE_MAX:
            raise ValueError(f"temperature: must be at most {TEMPERATURE_MAX:.6g} (the largest "
                             f"float32; the logits are divided by it), got {self.temperature!r}")
        real("top_p", 0.0, 1.0)
        real("min_p", 0.0, 1.0)
        real("repetition_penalty", 0.0, math.inf, lo_open=True)
        if not is_int(self.top_k) or self.top_k < 0:
            raise ValueError(f"top_k: expected an int >= 0 (0 = off), got {self.top_k!r}")
        object.__setattr__(self, "top_k", int(self.top_k))
        if self.seed is not None:
            if not is_int(self.seed) or self.seed < -1:
                raise ValueError(f"seed: expected None, -1 (random) or an int >= 0, got "
                                 f"{self.seed!r}")
            object.__setattr__(self, "seed", None if self.seed == -1 else int(self.seed))
        if not is_int(self.max_tokens) or self.max_tokens < 1:
            raise ValueError(f"max_tokens: expected an int >= 1, got {self.max_tokens!r}")
        object.__setattr__(self, "max_tokens", int(self.max_tokens))

    @property
    def greedy(self) -> bool:
        """``True`` when ``temperature == 0`` (argmax decoding)."""
        return self.temperature == 0.0

    @classmethod
    def from_generation_config(cls, config: Mapping[str, Any], *, where: str | None = None,
                               **overrides: Any) -> "SamplingParams":
        """Defaults from a Hugging Face ``generation_config.json`` (parsed), as transformers reads it.

        ``do_sample`` false/absent → greedy (``temperature=0``). Otherwise ``temperature``,
        ``top_k``, ``top_p`` and ``min_p`` are used; unset or ``null`` ones take transformers'
        defaults (``GenerationConfig._get_default_generation_params``: temperature 1.0, **top_k
        50**, top_p 1.0; min_p off). ``repetition_penalty`` (default 1.0) applies either way.
        ``overrides`` (e.g. ``seed=0, max_tokens=128``) win over the file: a field overridden
        is not read from the file, and greedy decoding (``temperature`` 0, from either) does not
        read the file's ``top_k``/``top_p``/``min_p``, which it does not use.

        Args:
            where: the model file, named in the error for a value of the file out of range.

        Raises:
            GenerationConfigError: a value of the file out of range (``"FILE:
                generation.config: top_p: must be in [0.0, 1.0], got 7"``, :func:`file_sampling`).
            ValueError: an override out of range, as for :class:`SamplingParams`.
        """
        def get(key: str, default: Any) -> Any:  # unset or null -> transformers' global default
            value = config.get(key)
            return default if value is None else value

        kw: dict[str, Any] = {}
        if get("do_sample", False):
            kw["temperature"] = get("temperature", 1.0)
            kw["top_k"] = get("top_k", 50)
            kw["top_p"] = get("top_p", 1.0)
            kw["min_p"] = get("min_p", 0.0)
        else:
            kw["temperature"] = 0.0
        kw["repetition_penalty"] = get("repetition_penalty", 1.0)
        return cls(**file_sampling(kw, overrides, where))


class GenerationConfigError(ValueError):
    """A sampling value of the model file's ``generation.config`` out of range: a fault of
    the model file, not of the options or the request that met it (:func:`file_sampling`)."""


#: the sampling fields greedy decoding does not use (their neutral values)
UNUSED_WHEN_GREEDY = {"top_k": 0, "top_p": 1.0, "min_p": 0.0}


def file_sampling(from_file: Mapping[str, Any], given: Mapping[str, Any],
                  where: str | None = None) -> dict:
    """The sampling keywords of a run: the values the model file's ``generation.config``
    gives (``from_file``) with those the user gave (``given``: options or arguments, not None)
    in their place. Only the file's values that are used are checked: a field the user gives
    is not, nor, when the run is greedy (``temperature`` 0), ``top_k``/``top_p``/``min_p``,
    which then take their neutral values.

    Raises:
        GenerationConfigError: a value used from the file is out of range, naming the file
            (``where``), ``generation.config`` and the field: ``"m.zmoe: generation.config:
            temperature: must be in [0.0, inf], got -5"``.
    """
    given = {k: v for k, v in given.items() if v is not None}
    out = dict(from_file)
    temperature = given.get("temperature", out.get("temperature"))
    if is_real(temperature) and temperature == 0:
        for k, neutral in UNUSED_WHEN_GREEDY.items():
            if k in out:
                out[k] = neutral
    for k, v in out.items():
        if k in given:
            continue
        try:
            SamplingParams(**{k: v})
        except (TypeError, ValueError) as e:
            raise GenerationConfigError(
                f"{where + ': ' if where else ''}generation.config: {e}") from None
    out.update(given)
    return out


def _softmax64(x: np.ndarray) -> np.ndarray:
    z = x.astype(np.float64) - np.max(x)
    e = np.exp(z)
    return e / e.sum()


class Sampler:
    """Applies :class:`SamplingParams` to logits and draws tokens.

    Follows transformers' ``RepetitionPenaltyLogitsProcessor``, ``TemperatureLogitsWarper``,
    ``TopKLogitsWarper``, ``TopPLogitsWarper`` and ``MinPLogitsWarper``
    (``transformers/generation/logits_process.py``), in that order, with
    ``min_tokens_to_keep=1``; see the module docstring. Filtering works on the surviving
    candidates only, so top-k / top-p cost O(vocab) plus a sort of the candidates.

    Args:
        params: the options.
        rng: the random generator; default ``numpy.random.default_rng(params.seed)``.

    Draw procedure (fixed, so a seed reproduces a run): ``u = rng.random()``; the token is the first
    surviving candidate, in increasing id order, whose cumulative probability exceeds ``u``
    (inverse-CDF sampling). Greedy decoding draws nothing.
    """

    #: Candidates looked at first for top-p; the full set is sorted only if they hold < top_p mass.
    TOP_P_PREFILTER = 1024

    def __init__(self, params: SamplingParams, rng: np.random.Generator | None = None):
        if not isinstance(params, SamplingParams):
            raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
        self.params = params
        self.rng = rng if rng is not None else np.random.default_rng(params.seed)

    # -- the processors ----------------------------------------------------------------------

    def penalize(self, logits: np.ndarray, context_ids: np.ndarray | Sequence[int] | None) -> np.ndarray:
        """Repetition penalty (``RepetitionPenaltyLogitsProcessor``).

        Args:
            logits: float32 ``[vocab]`` raw logits (not modified).
            context_ids: int ids already in the context; duplicates and ids ``>= vocab`` are
                ignored (transformers clamps those away too).

        Returns:
            float32 ``[vocab]``: a copy with the penalty applied, or ``logits`` itself when the
            penalty is off or there is no context.
        """
        pen = self.params.repetition_penalty
        if pen == 1.0 or context_ids is None or len(context_ids) == 0:
            return logits
        ids = np.asarray(context_ids, dtype=np.int64)
        ids = ids[(ids >= 0) & (ids < logits.shape[-1])]
        out = np.array(logits, dtype=np.float32, copy=True)
        sel = out[ids]
        out[ids] = np.where(sel < 0, sel * np.float32(pen), sel / np.float32(pen))
        return out

    def candidates(self, logits: np.ndarray, context_ids=None) -> tuple[np.ndarray, np.ndarray]:
        """Run all processors; return what survives.

        Args:
            logits: float32 ``[vocab]`` raw logits from the model.
            context_ids: ids for the repetition penalty (see :meth:`penalize`).

        Returns:
            ``(ids, scores)``: int64 ``[n]`` surviving token ids in increasing order and float32
            ``[n]`` their processed logits (penalized, divided by the temperature), ``n >= 1``.
            In greedy mode the single argmax token.
        """
        x = self.penalize(np.asarray(logits, dtype=np.float32), context_ids)
        p = self.params
        if p.greedy:
            i = int(np.argmax(x))
            return np.array([i], dtype=np.int64), x[i : i + 1].astype(np.float32)
        if p.temperature != 1.0:
            with np.errstate(over="ignore", divide="ignore"):
                y = x / np.float32(p.temperature)
            if not np.isfinite(y[np.isfinite(x)]).all():
                # a temperature so small that x / T overflows float32: its limit, argmax
                i = int(np.argmax(x))
                return np.array([i], dtype=np.int64), x[i : i + 1].astype(np.float32)
            x = y
        v = x.shape[-1]
        if p.top_k > 0 and p.top_k < v:
            kth = np.partition(x, v - p.top_k)[v - p.top_k]
            ids = np.flatnonzero(x >= kth)
        else:
            ids = np.arange(v, dtype=np.int64)
        scores = x[ids]
        if p.top_p < 1.0:
            ids, scores = self._top_p(ids, scores, p.top_p)
        if p.min_p > 0.0:
            probs = _softmax64(scores)
            keep = probs >= p.min_p * probs.max()
            ids, scores = ids[keep], scores[keep]
        return ids.astype(np.int64, copy=False), scores.astype(np.float32, copy=False)

    def _top_p(self, ids: np.ndarray, scores: np.ndarray, top_p: float) -> tuple[np.ndarray, np.ndarray]:
        # transformers sorts ascending and drops cumsum <= 1 - top_p. Equivalently, in descending
        # order a token is kept iff the mass of the tokens before it is < top_p (the first is
        # always kept). If the TOP_P_PREFILTER most likely tokens already hold >= top_p of the
        # mass, every other token has >= top_p before it, so only those need sorting.
        n = scores.shape[0]
        m = self.TOP_P_PREFILTER
        z = scores.astype(np.float64) - float(np.max(scores))
        e = np.exp(z)
        total = e.sum()
        sub = np.arange(n)
        if n > 2 * m:
            top = np.argpartition(scores, n - m)[n - m :]
            if e[top].sum() / total >= top_p:
                sub = top
        order = sub[np.argsort(-scores[sub], kind="stable")]
        mass = e[order] / total
        before = np.concatenate(([0.0], np.cumsum(mass)[:-1]))  # mass of the more likely tokens
        keep_n = max(1, int(np.count_nonzero(before < top_p)))
        keep = np.sort(order[:keep_n])
        return ids[keep], scores[keep]

    def filtered_logits(self, logits: np.ndarray, context_ids=None) -> np.ndarray:
        """Processed logits over the full vocabulary, ``-inf`` where filtered out.

        What transformers' processor list returns for the same options (useful for testing).

        Returns:
            float32 ``[vocab]``.
        """
        ids, scores = self.candidates(logits, context_ids)
        out = np.full(np.shape(logits)[-1], -np.inf, dtype=np.float32)
        out[ids] = scores
        return out

    def probs(self, logits: np.ndarray, context_ids=None) -> np.ndarray:
        """The sampling distribution: softmax of :meth:`filtered_logits` (one-hot when greedy).

        Returns:
            float64 ``[vocab]``, sums to 1.
        """
        ids, scores = self.candidates(logits, context_ids)
        out = np.zeros(np.shape(logits)[-1], dtype=np.float64)
        out[ids] = _softmax64(scores)
        return out

    def sample(self, logits: np.ndarray, context_ids=None) -> int:
        """Pick the next token.

        Args:
            logits: float32 ``[vocab]`` raw logits of the last position.
            context_ids: ids for the repetition penalty.

        Returns:
            The token id (``int``).
        """
        ids, scores = self.candidates(logits, context_ids)
        if ids.shape[0] == 1:
            return int(ids[0])
        cdf = np.cumsum(_softmax64(scores))
        k = int(np.searchsorted(cdf, self.rng.random() * cdf[-1], side="right"))
        return int(ids[min(k, ids.shape[0] - 1)])
