"""The token loop: autoregressive generation over a model with a KV cache.

Sampling (:class:`SamplingParams`, :class:`Sampler`, transformers' logits processors) lives in
:mod:`zipmoe_rt.sampling`, the cache's token ids (:class:`CacheState`, ``common_prefix_len``) in
:mod:`zipmoe_rt.cache_state`; those names are re-exported here.

The model interface this module drives (the model side must match it)::

    cache = model.new_cache(max_tokens=None)             # or the most positions it will hold
    logits = model.forward(ids, cache, last_only=True)   # ids: int64 [T]; logits: float32 [vocab]
    model.config.vocab_size                               # int (``model.config`` may be a dict)

``forward`` appends the ``T`` ids after what the cache holds. A ``[T, vocab]`` or ``[1, vocab]``
result is accepted too (its last row is used). With ``generate(..., cancel=event)``, a ``forward``
that takes an ``interrupt`` argument is called as ``model.forward(ids, cache, last_only=True,
interrupt=check)`` and should call ``check()`` between its layers (an exception from it stops the
call, the cache as before that call); one that does not is checked between calls only.

For safe cancellation, the cache should offer
``get_seq_length() -> int`` and, ideally, ``crop(n)`` (the names of transformers' ``DynamicCache``),
with ``can_crop(n) -> bool`` when some crops are impossible (a recurrent layer state; see
:class:`zipmoe_rt.models.cache.ModelCache`), see :class:`CacheState`.
"""
from __future__ import annotations

import inspect
import time
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, Literal, Mapping, Sequence

import numpy as np

from .cache_state import CacheState, cache_can_crop, cache_length, common_prefix_len
from .sampling import Sampler, SamplingParams
from .util import is_int as _is_int

__all__ = [
    "SamplingParams",
    "Sampler",
    "CacheState",
    "GenerationStep",
    "GenerationStats",
    "Generation",
    "GenerationCancelled",
    "generate",
    "common_prefix_len",
]

FinishReason = Literal["stop", "length", "cancelled", "error"]


class GenerationCancelled(Exception):
    """Raised inside ``model.forward`` (between two layers) by the check
    :func:`generate` passes when its ``cancel`` event is set; :class:`Generation` catches it
    and ends with ``finish_reason="cancelled"``."""


# --------------------------------------------------------------------------------------------
# Generation
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GenerationStats:
    """Counts and timings of one :func:`generate` call.

    Times are seconds of work inside the generator (``forward`` plus sampling), measured with
    ``time.perf_counter``; time the consumer spends between steps is not counted.

    Attributes:
        prompt_tokens: ids prefilled by this call (the new ``prompt_ids`` only).
        cached_tokens: ids already in the cache when the call started (reused KV entries).
        generated_tokens: tokens sampled, the stop token included when ``finish_reason == "stop"``.
        output_tokens: tokens yielded (``generated_tokens`` minus the stop token).
        finish_reason: ``"stop"`` (a stop id was sampled), ``"length"`` (``max_tokens`` reached),
            ``"cancelled"`` (closed early, ``KeyboardInterrupt`` or the ``cancel`` event of
            :func:`generate`), ``"error"`` (``forward`` raised).
        stop_token_id: the stop id sampled, or ``None``.
        ttft_s: time to first token: prefill ``forward`` plus the first sampling; ``None`` if no
            token was sampled.
        prefill_tokens_per_s: ``prompt_tokens / ttft_s``.
        decode_s: time of the decode steps (one ``forward`` of one id and one sampling each).
        decode_tokens_per_s: ``(generated_tokens - 1) / decode_s``; ``None`` with fewer than 2
            generated tokens.
        tpot_s: time per output token in decode, ``decode_s / (generated_tokens - 1)``; ``None``
            likewise.
    """

    prompt_tokens: int
    cached_tokens: int
    generated_tokens: int
    output_tokens: int
    finish_reason: FinishReason
    stop_token_id: int | None
    ttft_s: float | None
    prefill_tokens_per_s: float | None
    decode_s: float
    decode_tokens_per_s: float | None
    tpot_s: float | None


@dataclass(frozen=True)
class GenerationStep:
    """One item yielded by :class:`Generation`.

    Every step but the last carries a sampled ``token_id`` (never a stop id) and ``stats=None``.
    The last step has ``token_id=None`` and the :class:`GenerationStats` (``stats.finish_reason``,
    ``stats.stop_token_id``).
    """

    token_id: int | None
    stats: GenerationStats | None = None

    @property
    def is_final(self) -> bool:
        """``True`` for the last step (the one carrying ``stats``)."""
        return self.stats is not None


class Generation(Iterator[GenerationStep]):
    """A running generation; iterate it for :class:`GenerationStep` items. Made by :func:`generate`.

    Iteration yields one step per sampled token, then one final step with the stats. Each
    ``next()`` does one ``model.forward`` call (the first one prefills the whole prompt) and one
    sampling; nothing runs before the first ``next()``.

    Cancellation: stopping the iteration at any point (``break``, an exception in the consumer,
    ``KeyboardInterrupt`` inside ``forward``) leaves ``state`` consistent with the cache (see
    :class:`CacheState`). Call :meth:`close` (or use ``with generate(...) as gen:``) to record
    ``finish_reason="cancelled"`` and get ``stats``. Ids that belong to the transcript but are not in
    the cache are in :attr:`pending_ids`: normally the last sampled token (or the stop token), which
    is sampled but never fed; after an interrupted prefill, the prompt. To continue the
    conversation, feed them first, e.g. ``generate(model, gen.pending_ids + next_ids, ...,
    cache=gen.state)``, or re-render the chat and use :meth:`CacheState.sync_prefix`. If
    ``pending_ids`` is empty (an interrupted ``forward`` had committed) and you want to keep
    sampling, ``gen.state.sync_prefix(gen.state.token_ids, model)`` crops the last id and returns it
    to feed again.

    A ``cancel`` event (see :func:`generate`) set from another thread stops the run within one
    layer of the ``forward`` in progress (the prefill too): the next ``next()`` returns the final
    step with ``finish_reason="cancelled"``, the cache as before that ``forward`` (a prefill in
    several batches is cropped back to where it began, as after a Ctrl-C).

    Attributes:
        state: the :class:`CacheState`; updated in place.
        prompt_ids: the ids this call prefills (``list[int]``).
        output_ids: the token ids yielded so far (stop token excluded).
        stop_token_id: the stop id sampled, or ``None``.
        finish_reason: ``None`` while running, then as in :class:`GenerationStats`.
        stats: ``None`` until finished.
    """

    def __init__(self, model: Any, prompt_ids: list[int], params: SamplingParams, stop_ids: frozenset[int],
                 state: CacheState, clock: Callable[[], float], cancel: Any = None):
        self.model = model
        self.cancel = cancel
        self._interrupt = cancel is not None and _takes_interrupt(model)
        self.params = params
        self.stop_ids = stop_ids
        self.state = state
        self.prompt_ids = prompt_ids
        self.output_ids: list[int] = []
        self.stop_token_id: int | None = None
        self.finish_reason: FinishReason | None = None
        self.stats: GenerationStats | None = None
        self.sampler = Sampler(params)
        self._clock = clock
        self._phase = "new"  # new -> running -> (final_due) -> done
        self._cached_tokens = len(state.token_ids)
        self._unfed: list[int] = list(prompt_ids)  # transcript ids not in the cache yet
        # repetition-penalty context: unique ids of cache + prompt + output
        self._seen_set = set(state.token_ids)
        self._seen_set.update(prompt_ids)
        self._seen = list(self._seen_set)
        self._ttft: float | None = None
        self._decode_s = 0.0
        self._n_sampled = 0

    # -- public helpers ----------------------------------------------------------------------

    @property
    def pending_ids(self) -> list[int]:
        """Ids of this call's transcript (prompt, sampled tokens, stop token) not yet in the cache."""
        return list(self._unfed)

    def collect(self) -> list[int]:
        """Run to the end; return :attr:`output_ids` (``stats`` is then set)."""
        for _ in self:
            pass
        return list(self.output_ids)

    def close(self) -> None:
        """Stop early: no more ``forward`` calls; sets ``finish_reason="cancelled"`` and ``stats``.

        A no-op once finished. The cache stays as it is (see :attr:`pending_ids`).
        """
        if self._phase in ("new", "running"):
            self._finish("cancelled")
        self._phase = "done"

    def __enter__(self) -> "Generation":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __iter__(self) -> "Generation":
        return self

    # -- the loop ----------------------------------------------------------------------------

    def __next__(self) -> GenerationStep:
        if self._phase == "done":
            raise StopIteration
        if self._phase == "final_due":
            self._phase = "done"
            return GenerationStep(None, self.stats)
        t0 = self._clock()
        feed = list(self._unfed)
        if self._phase == "new" and len(feed) > 1 and self.state.token_ids:
            self._mark()        # the state before the prefill, for a prefill interrupted
        try:                    # between its batches (_reconcile crops back to it)
            logits = self._forward(feed)
            token = self.sampler.sample(logits, self._seen)
        except GenerationCancelled:
            self._finish("cancelled")       # the cancel event, seen between two layers
            self._phase = "done"
            return GenerationStep(None, self.stats)
        except BaseException as e:
            self._finish("cancelled" if isinstance(e, KeyboardInterrupt) else "error")
            self._phase = "done"
            raise
        dt = self._clock() - t0
        if self._phase == "new":
            self._ttft = dt
            self._phase = "running"
            self._mark()        # the prompt's end: a recurrent state can come back here
        else:
            self._decode_s += dt
        self._n_sampled += 1
        self._unfed = [token]
        if token not in self._seen_set:
            self._seen_set.add(token)
            self._seen.append(token)
        if token in self.stop_ids:
            self.stop_token_id = token
            self._finish("stop")
            self._phase = "done"
            return GenerationStep(None, self.stats)
        self.output_ids.append(token)
        if self._n_sampled >= self.params.max_tokens:
            self._finish("length")
            self._phase = "final_due"
        return GenerationStep(token)

    def _mark(self) -> None:
        """``cache.mark()`` where the cache has one (recurrent layer states: a position
        :meth:`CacheState.sync_prefix` and ``crop`` can return to)."""
        mark = getattr(self.state.cache, "mark", None)
        if callable(mark):
            mark()

    def _forward(self, ids: list[int]) -> np.ndarray:
        state = self.state
        n0 = len(state.token_ids)
        arr = np.asarray(ids, dtype=np.int64)
        try:
            if self._interrupt:
                out = self.model.forward(arr, state.cache, last_only=True,
                                         interrupt=self._check_cancel)
            else:
                if self.cancel is not None:
                    self._check_cancel()
                out = self.model.forward(arr, state.cache, last_only=True)
        except BaseException:
            self._reconcile(n0, ids)
            raise
        state.token_ids += ids     # (no call between these two lines: a Ctrl-C lands before
        self._unfed = []           # or after both, never between them)
        logits = np.asarray(out)
        if logits.ndim == 2:
            logits = logits[-1]
        if logits.ndim != 1:
            raise ValueError(f"model.forward: expected logits of shape [vocab] or [T, vocab], got {np.shape(out)}")
        return logits.astype(np.float32, copy=False)

    def _check_cancel(self) -> None:
        """The ``interrupt`` handed to ``model.forward``: raise :class:`GenerationCancelled`
        once the ``cancel`` event is set."""
        if self.cancel.is_set():
            raise GenerationCancelled("generation cancelled")

    def _reconcile(self, n0: int, ids: list[int]) -> None:
        """After ``forward`` raised: make ``state`` match the cache again, or mark it invalid."""
        state = self.state
        length = cache_length(state.cache)
        if length == n0:
            return
        if length == n0 + len(ids):  # the call committed before the interrupt landed
            state.token_ids.extend(ids)
            self._unfed = []
            return
        if cache_can_crop(state.cache, n0):
            try:
                state.cache.crop(n0)
                after = cache_length(state.cache)
                if after is None or after == n0:
                    return
            except Exception:
                pass
        state.valid = False

    def _finish(self, reason: FinishReason) -> None:
        self.finish_reason = reason
        n = self._n_sampled
        decode_steps = max(n - 1, 0)
        ttft = self._ttft
        self.stats = GenerationStats(
            prompt_tokens=len(self.prompt_ids),
            cached_tokens=self._cached_tokens,
            generated_tokens=n,
            output_tokens=len(self.output_ids),
            finish_reason=reason,
            stop_token_id=self.stop_token_id,
            ttft_s=ttft,
            prefill_tokens_per_s=(len(self.prompt_ids) / ttft) if ttft else None,
            decode_s=self._decode_s,
            decode_tokens_per_s=(decode_steps / self._decode_s) if decode_steps and self._decode_s > 0 else None,
            tpot_s=(self._decode_s / decode_steps) if decode_steps else None,
        )


def _takes_interrupt(model: Any) -> bool:
    """Whether ``model.forward`` accepts an ``interrupt`` keyword (named, or ``**kwargs``)."""
    try:
        params = inspect.signature(model.forward).parameters.values()
    except (TypeError, ValueError, AttributeError):
        return False
    return any(p.name == "interrupt" or p.kind is p.VAR_KEYWORD for p in params)


def _vocab_size(model: Any) -> int | None:
    cfg = getattr(model, "config", None)
    if isinstance(cfg, Mapping):
        v = cfg.get("vocab_size")
    else:
        v = getattr(cfg, "vocab_size", None)
    return int(v) if _is_int(v) else None


def generate(
    model: Any,
    prompt_ids: Sequence[int] | np.ndarray,
    params: SamplingParams | None = None,
    stop_ids: Iterable[int] = (),
    *,
    cache: CacheState | None = None,
    clock: Callable[[], float] = time.perf_counter,
    cancel: Any = None,
) -> Generation:
    """Generate tokens autoregressively: prefill ``prompt_ids`` in one ``forward``, then one id per call.

    Args:
        model: object with ``new_cache(max_tokens=None)``, ``forward(ids int64 [T], cache, last_only=True) ->
            float32 [vocab]`` and ``config.vocab_size`` (see the module docstring).
        prompt_ids: int ids ``[T]``, ``T >= 1``, ``0 <= id < config.vocab_size``. With ``cache``,
            only the ids that follow what the cache holds.
        params: sampling options (default ``SamplingParams()``: greedy, 512 tokens).
        stop_ids: ids that end generation (e.g. EOS, ``<|im_end|>``); a sampled stop id is not
            yielded, it ends the run with ``finish_reason="stop"``.
        cache: a :class:`CacheState` to continue (e.g. ``previous_generation.state``); it is
            updated in place. Default: ``CacheState.new(model)``. Its ``token_ids`` join the
            repetition-penalty context, as the full conversation would in transformers.
        clock: time source in seconds (for tests).
        cancel: None, or an event (``is_set() -> bool``, e.g. ``threading.Event``) another
            thread may set to stop the run: it is checked before each decoder layer of every
            ``forward`` (the model is called with ``interrupt=``, see the module docstring), so
            a cancelled prefill stops within one layer instead of running to its end. The run
            then ends with a final step of ``finish_reason="cancelled"`` and the cache as
            before the ``forward`` that was stopped.

    Returns:
        A :class:`Generation`: an iterator of :class:`GenerationStep` — one per sampled token
        (``step.token_id``), then a final step (``token_id=None``, ``step.stats`` a
        :class:`GenerationStats`). Lazy: the model runs only while it is iterated.

    Raises:
        ValueError: empty or out-of-range ``prompt_ids`` (message names ``prompt_ids``), a
            ``cache`` whose ``valid`` is ``False``, bad ``stop_ids``.
        TypeError: ``params`` or ``cache`` of the wrong type.
    """
    if params is None:
        params = SamplingParams()
    if not isinstance(params, SamplingParams):
        raise TypeError(f"params: expected SamplingParams, got {type(params).__name__}")
    ids = np.asarray(prompt_ids)
    if ids.ndim != 1 or ids.shape[0] == 0:
        raise ValueError(f"prompt_ids: expected a non-empty 1-D sequence of ids, got shape {ids.shape}")
    if not np.issubdtype(ids.dtype, np.integer):
        raise ValueError(f"prompt_ids: expected integer ids, got dtype {ids.dtype}")
    vocab = _vocab_size(model)
    lo, hi = int(ids.min()), int(ids.max())
    if lo < 0 or (vocab is not None and hi >= vocab):
        raise ValueError(f"prompt_ids: ids must be in [0, {vocab}) (the model's vocab_size), "
                         f"got min {lo}, max {hi}: the tokenizer has ids the model does not")
    try:
        stops = frozenset(int(s) for s in stop_ids)
    except (TypeError, ValueError) as e:
        raise ValueError(f"stop_ids: expected integer ids, got {stop_ids!r}") from e
    if cache is None:
        cache = CacheState.new(model, max_tokens=len(ids) + params.max_tokens)
    elif not isinstance(cache, CacheState):
        raise TypeError(
            f"cache: expected a CacheState (e.g. generation.state, or CacheState(model_cache, token_ids)), "
            f"got {type(cache).__name__}"
        )
    if not cache.valid:
        raise ValueError("cache: its contents are unknown after an interrupted forward; use CacheState.new(model)")
    if cancel is not None and not callable(getattr(cancel, "is_set", None)):
        raise TypeError(f"cancel: expected an event with is_set() (e.g. threading.Event), "
                        f"got {type(cancel).__name__}")
    return Generation(model, [int(i) for i in ids], params, stops, cache, clock, cancel)
