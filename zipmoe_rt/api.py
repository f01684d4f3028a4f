"""The embedding API: ``zipmoe_rt.load()`` (:mod:`zipmoe_rt.loading`, re-exported here with
:func:`parse_size`) and :class:`Model` (generate / stream / chat).

Shaped after llama-cpp-python and mlx-lm: a loaded model owns its weights, tokenizer and chat
template; ``generate`` and ``stream`` take a raw prompt, ``chat`` takes OpenAI-style messages
(``[{"role": "user", "content": "..."}]``) and applies the model's own chat template.
Sampling defaults to greedy (``temperature=0``); pass ``temperature``, ``top_k``, ``top_p``,
``min_p``, ``repetition_penalty``, ``seed`` to sample (semantics of transformers' processors).
"""
from __future__ import annotations

import threading
import warnings
from pathlib import Path
from typing import Iterator, Sequence

from zmoe.constants import Keys

from .default_model import default_model_path
from .generate import CacheState, GenerationStats, SamplingParams, generate
from .api_args import (NO_LIMIT, ContextWarning, check_sampling_args, full_context,
                       past_trained_context)
from .chat_session import ChatSession
from .loading import load, parse_size, tokenizer_from_source  # noqa: F401  (the API's names)
from .stops import check_stops, stop_at
from .tokenizer import Tokenizer

__all__ = ["load", "Model", "ChatSession", "default_model_path"]


class Model:
    """A loaded model: weights (:attr:`source`), runtime network (:attr:`net`), tokenizer.

    Threads: one model may be shared by several threads. Its forward passes are serialised by
    a lock, one token step at a time: a call made while another thread generates waits for
    each step in turn (it does not fail), and calls that run together interleave their tokens
    (each keeps its own KV cache, so outputs are exactly those of the same calls one after the
    other, e.g. the same greedy text). An unconsumed :meth:`stream` holds nothing between its
    steps. A :class:`ChatSession` is one conversation: a second :meth:`ChatSession.send` while
    its previous reply is still being streamed raises RuntimeError. :meth:`close` waits for the
    step in progress. :attr:`last_stats` is the last call finished by any thread.

    The model file: weights are read with ``pread`` into process memory (never through a memory
    map). Replacing the file by renaming another over it, or deleting it, while a model runs
    from it is harmless: the open file is still read. A file truncated, extended or rewritten
    in place is detected (size and modification time of the open file; so a ``touch`` of the
    file counts as a change) at the next read from it, i.e. the next expert that is not in
    memory, and that call raises
    :class:`~zipmoe_rt.engine.io.ModelFileError` naming the file: bytes of a changed file are
    never used, and the process is never killed by SIGBUS. Weights already in memory keep
    working, so an unbudgeted model whose experts have all been used may never read the file
    again and then does not notice a change. A write that lands between that check and the read
    is caught by the pieces' CRC-32 (``verify=True``, the default) as
    :class:`zmoe.ChecksumError`; with ``verify=False`` it is not.

    Attributes:
        path: the ``.zmoe`` file.
        tokenizer: :class:`~zipmoe_rt.tokenizer.Tokenizer`.
        stop_ids: token ids that end generation (generation_config's ``eos_token_id`` and the
            tokenizer's EOS).
        last_stats: :class:`~zipmoe_rt.generate.GenerationStats` of the last finished call
            (prompt/generated tokens, TTFT, prefill and decode tokens/s), or None.
    """

    def __init__(self, source, net, tokenizer: Tokenizer, path: Path, engine=None):
        self.source, self.net, self.tokenizer, self.path = source, net, tokenizer, Path(path)
        #: the budgeted expert engine (None when unbudgeted)
        self.engine = engine
        ids = set(source.metadata.get(Keys.Generation.EOS_TOKEN_IDS) or [])
        if tokenizer.eos_token_id is not None:
            ids.add(tokenizer.eos_token_id)
        self.stop_ids = frozenset(ids)
        self.last_stats: GenerationStats | None = None
        #: the most positions one sequence may hold (prompt, earlier turns and reply), or None
        #: for no limit; see :meth:`fit_context`
        self.ctx_size: int | None = None
        #: how ``load(memory_limit=...)`` divided the limit
        #: (:class:`~zipmoe_rt.engine.limit.MemoryPlan`), else None
        self.memory_plan = None
        # one forward pass at a time (the engine's pools, caches and Numba's threads are shared)
        self._lock = threading.RLock()

    @property
    def hparams(self) -> dict:
        """Normalised hyper-parameters (format/SPEC.md §3)."""
        return self.source.hparams

    @property
    def name(self) -> str:
        return self.source.metadata.get(Keys.General.NAME, self.path.stem)

    # -- sampling ----------------------------------------------------------------------------
    @staticmethod
    def sampling(max_tokens: int = 256, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, min_p: float = 0.0, repetition_penalty: float = 1.0,
                 seed: int | None = None) -> SamplingParams:
        """Build validated :class:`SamplingParams` (ValueError names a bad option)."""
        return SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                              repetition_penalty=repetition_penalty, seed=seed,
                              max_tokens=max_tokens)

    def fit_context(self, n_tokens: int, max_tokens: int) -> int:
        """Check a sequence of ``n_tokens`` ids (cached and new) against :attr:`ctx_size`.

        Returns:
            ``max_tokens`` lowered so that the reply fits the context (the last sampled token
            is never fed, so ``ctx_size - n_tokens + 1`` tokens fit); unchanged without a limit.
            ``-1``: as many as fit (:func:`~zipmoe_rt.api_args.full_context`).
        Warns:
            ContextWarning: without :attr:`ctx_size`, the ids are more than the model's
                ``max_position_embeddings``.
        Raises:
            ValueError: the prompt alone fills the context (the message gives both sizes and
                names ``ctx_size`` / ``--ctx-size``).
        """
        limit = self.ctx_size
        if max_tokens == NO_LIMIT and not isinstance(max_tokens, bool):
            limit = full_context(self)
            max_tokens = limit + 1        # all that fits: cut below
        if limit is None:
            over = past_trained_context(self, n_tokens)
            if over:
                warnings.warn(ContextWarning(over), stacklevel=3)
            return max_tokens
        if n_tokens >= limit:
            raise ValueError(f"prompt: {n_tokens} tokens do not fit the context of {limit} tokens "
                             f"(ctx_size / --ctx-size); shorten it or start a new conversation")
        return min(max_tokens, limit - n_tokens + 1)

    def _ids(self, prompt: str | Sequence[int], add_special_tokens: bool = True) -> list[int]:
        """``prompt`` as token ids: a str encoded, or a sequence of ids checked.

        Raises:
            TypeError: neither a str nor a sequence of integers (the message says which).
            ValueError: empty, or an id outside the model's vocabulary (``hparams.vocab_size``).
        """
        import operator
        if isinstance(prompt, str):
            ids = self.tokenizer.encode(prompt, add_special_tokens=add_special_tokens)
        else:
            if isinstance(prompt, (bytes, dict)) or not hasattr(prompt, "__iter__"):
                raise TypeError(f"prompt: expected a str or a sequence of token ids, got "
                                f"{type(prompt).__name__}")
            items = list(prompt)
            try:
                ids = [operator.index(t) for t in items]
            except TypeError:
                bad = next(t for t in items if not hasattr(t, "__index__"))
                raise TypeError(f"prompt: token ids must be integers, got "
                                f"{type(bad).__name__} {bad!r:.40}") from None
            vocab = int(self.hparams.get("vocab_size") or 0)
            out = [t for t in ids if t < 0 or (vocab and t >= vocab)]
            if out:
                raise ValueError(f"prompt: token id {out[0]} is out of range (vocabulary size "
                                 f"{vocab})")
        if not ids:
            raise ValueError("prompt: empty (nothing to condition on)")
        return ids

    def _stream_ids(self, ids: list[int], params: SamplingParams, state: CacheState | None = None,
                    on_finish=None, skip_special_tokens: bool = True) -> Iterator[str]:
        if self.net is None:
            raise RuntimeError(f"{self.path}: the model was closed")
        dec = self.tokenizer.stream_decoder(skip_special_tokens=skip_special_tokens,
                                            context_ids=ids[-4:])
        gen = generate(self.net, ids, params, self.stop_ids, cache=state)
        try:
            while True:
                with self._lock:      # one token step: other threads' steps wait (see Model)
                    if self.net is None:
                        raise RuntimeError(f"{self.path}: the model was closed")
                    step = next(gen, None)
                if step is None or step.token_id is None:
                    break
                piece = dec.push(step.token_id)
                if piece:
                    yield piece
            tail = dec.flush()
            if tail:
                yield tail
        finally:
            gen.close()
            self.last_stats = gen.stats
            if on_finish is not None:
                on_finish(gen)

    def token_steps(self, ids: Sequence[int], params: SamplingParams,
                    state: CacheState | None = None, on_logits=None,
                    cancel=None) -> Iterator:
        """Run one generation step by step: the low-level loop behind servers and custom UIs.

        Yields the :class:`~zipmoe_rt.generate.GenerationStep` items of
        :func:`~zipmoe_rt.generate.generate` (sampled token ids, then one final step with the
        stats), each computed under the model's lock (see :class:`Model`), so a caller can stop
        between any two tokens: closing the iterator (``break``) ends generation at once with
        ``finish_reason="cancelled"``. :attr:`last_stats` is set when it ends.

        Args:
            ids: prompt token ids to feed (with ``state``: those after what its cache holds).
            params: :class:`SamplingParams` (see :meth:`sampling`).
            state: a :class:`~zipmoe_rt.generate.CacheState` to continue and update in place
                (e.g. for prompt-prefix reuse through ``state.sync_prefix``); default a new one.
            on_logits: called with each step's raw logits (float32 ``[vocab]``, before any
                sampling processor) before the token is drawn, e.g. for log-probabilities.
            cancel: None, or an event (``threading.Event``) another thread sets to stop the
                run within one decoder layer, the prompt's prefill included: the final step
                then says ``finish_reason="cancelled"`` and ``state`` holds what it held before
                the forward pass that was stopped (see :func:`~zipmoe_rt.generate.generate`).

        Raises:
            ValueError: as for :func:`~zipmoe_rt.generate.generate`.
            RuntimeError: the model was closed.
        """
        if self.net is None:
            raise RuntimeError(f"{self.path}: the model was closed")
        gen = generate(self.net, list(ids), params, self.stop_ids, cache=state, cancel=cancel)
        if on_logits is not None:
            inner = gen.sampler

            class _Watch:
                def sample(self, logits, context_ids=None):
                    on_logits(logits)
                    return inner.sample(logits, context_ids)
            gen.sampler = _Watch()
        try:
            while True:
                with self._lock:
                    if self.net is None:
                        raise RuntimeError(f"{self.path}: the model was closed")
                    step = next(gen, None)
                if step is None:
                    break
                yield step
                if step.token_id is None:
                    break
        finally:
            gen.close()
            self.last_stats = gen.stats

    # -- public ------------------------------------------------------------------------------
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256,
               stop: str | Sequence[str] | None = None, **sampling) -> Iterator[str]:
        """Complete a raw prompt (no chat template), yielding text pieces as they are decoded.

        Pieces are never broken UTF-8. Stops at an EOS id, after ``max_tokens`` tokens (``-1``:
        no limit but the context, :attr:`ctx_size` or the model's), or before the first of the
        ``stop`` strings (a str or a list; never part of the text; ``finish_reason="stop"``).
        Closing the iterator early (``break``, Ctrl-C) stops generation; :attr:`last_stats`
        then says ``finish_reason="cancelled"``.
        """
        check_sampling_args("Model.stream", sampling, ("prompt", "max_tokens", "stop"))
        stops = check_stops(stop)
        ids = self._ids(prompt)
        max_tokens = self.fit_context(len(ids), max_tokens)
        it = self._stream_ids(ids, self.sampling(max_tokens, **sampling))
        return stop_at(it, stops, self) if stops else it

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256,
                 stop: str | Sequence[str] | None = None, **sampling) -> str:
        """Complete a raw prompt and return the completion text (prompt not included);
        ``max_tokens`` and ``stop`` as for :meth:`stream`."""
        check_sampling_args("Model.generate", sampling, ("prompt", "max_tokens", "stop"))
        return "".join(self.stream(prompt, max_tokens, stop, **sampling))

    def chat(self, messages: list[dict], max_tokens: int = 512, stream: bool = False,
             skip_special_tokens: bool = True, stop: str | Sequence[str] | None = None,
             **sampling):
        """Reply to an OpenAI-style conversation using the model's chat template.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            stream: return an iterator of text pieces instead of the whole reply.
            skip_special_tokens: leave the tokenizer's special tokens out of the text (default);
                False keeps them, e.g. gpt-oss's harmony markers (``<|channel|>``, ...) for
                :class:`zipmoe_rt.server.harmony.HarmonySplitter` to split the channels.
            max_tokens, stop: as for :meth:`stream` (``-1``: no limit but the context; the
                reply ends before the first stop string, which is not part of it).
        Returns:
            the assistant's reply (str), or an iterator of pieces when ``stream``.
        Raises:
            ValueError: malformed messages (index and field named), no chat template, or a
                prompt that fills :attr:`ctx_size`.
        """
        check_sampling_args("Model.chat", sampling, ("messages", "max_tokens", "stream",
                                                     "skip_special_tokens", "stop"))
        stops = check_stops(stop)
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        max_tokens = self.fit_context(len(ids), max_tokens)
        it = self._stream_ids(ids, self.sampling(max_tokens, **sampling),
                              skip_special_tokens=skip_special_tokens)
        it = stop_at(it, stops, self) if stops else it
        return it if stream else "".join(it)

    def chat_session(self, system: str | None = None) -> "ChatSession":
        """A multi-turn conversation that keeps its KV cache between turns.

        Raises:
            RuntimeError: the model was closed.
        """
        return ChatSession(self, system)

    def stream_ids(self, ids: list[int], params: SamplingParams, state: CacheState | None = None,
                   on_finish=None, skip_special_tokens: bool = True) -> Iterator[str]:
        """Text pieces of one generation from prompt ``ids`` (the loop behind :meth:`stream`,
        :meth:`chat` and :meth:`ChatSession.send`): ``state`` a cache to continue, ``on_finish``
        called with the generator when it ends (its ``stats`` then final)."""
        return self._stream_ids(ids, params, state, on_finish, skip_special_tokens)

    def live_net(self):
        """The network, for a new KV cache or a forward pass.

        Raises:
            RuntimeError: the model was closed (the message names the file).
        """
        net = self.net
        if net is None:
            raise RuntimeError(f"{self.path}: the model was closed")
        return net

    def memory_report(self) -> dict:
        """Bytes held for weights by kind: ``dense`` and ``experts`` (unbudgeted), or
        ``dense``, tiers ``F``/``C``/``S``/``E``, the working set and the budget."""
        if self.engine:
            return self.engine.memory_report()
        rep = self.source.memory_report()
        held = getattr(getattr(self.net, "executor", None), "source", self.source)
        if held is not self.source and hasattr(held, "nbytes"):
            rep["experts"] = held.nbytes        # experts resident on the GPU
            if getattr(self.source, "resident", "full") == "compressed":
                rep["experts_bf16"] = held.bf16_nbytes   # the same experts in BF16
        return rep

    @property
    def policy(self) -> str:
        """The expert policy in use (``zipmoe``, ``zip-lru``, ``raw-lru``; ``auto`` resolved),
        or ``in-memory`` without a budget."""
        return self.engine.policy if self.engine is not None else "in-memory"

    def memory_line(self) -> str:
        """The banner's and ``/stats``' memory line
        (:func:`~zipmoe_rt.engine.limit.memory_line`); under ``auto`` the policy says what it
        chose per MoE layer (:func:`~zipmoe_rt.engine.factory.describe_auto`). Under a limit,
        the part a smaller ``memory_budget`` leaves unused is stated (so that the parts add up
        to the limit); under a budget, whether the engine prefetches (before the policy)."""
        from .engine.factory import describe_auto
        from .engine.limit import memory_line
        from .engine.tiers import size_text
        pol = describe_auto(getattr(self.engine, "auto_choice", None), self.policy)
        if getattr(self.engine, "resident", "full") == "compressed":
            pol += " (experts cached in the compute form)"
        line = memory_line(self.memory_plan, self.engine and self.engine.budget, pol,
                           compressed=getattr(self.source, "resident", "full") == "compressed")
        plan = self.memory_plan
        if plan is not None:
            unused = plan.limit - (plan.overhead + plan.kv + plan.buffers + plan.activations
                                   + plan.engine + plan.budget)
            if unused >= 50_000:          # (shown to 0.1 MB)
                given = f"weight budget {size_text(plan.budget)}"
                line = line.replace(given, f"{given} + unused {unused / 1e6:.1f} MB "
                                           f"(--memory-budget is smaller)", 1)
        if self.engine is not None and hasattr(self.engine, "prefetch"):
            head, sep, tail = line.rpartition("; policy ")
            if sep:
                on = "on" if self.engine.prefetch else "off"
                line = f"{head}; prefetch {on}{sep}{tail}"
        return line

    @property
    def device(self) -> str:
        """``"cuda"`` when the model computes on the GPU, else ``"cpu"``."""
        return "cuda" if self.net is not None and self.net.backend.name == "cuda" else "cpu"

    def close(self):
        """Release the model file and the weights (waits for a token step in progress in
        another thread; calls after this raise RuntimeError). Closing twice is harmless."""
        with self._lock:
            if self.net is None:
                return
            self.net = None
            if self.engine is not None:
                self.engine.close()
            self.source.close()

    def __enter__(self):
        return self

    def __exit__(self, *a):
        self.close()
