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
from pathlib import Path
from typing import Iterator, Sequence

from zmoe.constants import Keys

from .default_model import default_model_path
from .generate import CacheState, GenerationStats, SamplingParams, generate
from .loading import load, parse_size, tokenizer_from_source  # noqa: F401  (the API's names)
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
        Raises:
            ValueError: the prompt alone fills the context (the message gives both sizes and
                names ``ctx_size`` / ``--ctx-size``).
        """
        limit = self.ctx_size
        if limit is None:
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
    def stream(self, prompt: str | Sequence[int], max_tokens: int = 256, **sampling) -> Iterator[str]:
        """Complete a raw prompt (no chat template), yielding text pieces as they are decoded.

        Pieces are never broken UTF-8. Stops at an EOS id or after ``max_tokens`` tokens.
        Closing the iterator early (``break``, Ctrl-C) stops generation; :attr:`last_stats`
        then says ``finish_reason="cancelled"``.
        """
        ids = self._ids(prompt)
        max_tokens = self.fit_context(len(ids), max_tokens)
        return self._stream_ids(ids, self.sampling(max_tokens, **sampling))

    def generate(self, prompt: str | Sequence[int], max_tokens: int = 256, **sampling) -> str:
        """Complete a raw prompt and return the completion text (prompt not included)."""
        return "".join(self.stream(prompt, max_tokens, **sampling))

    def chat(self, messages: list[dict], max_tokens: int = 512, stream: bool = False,
             skip_special_tokens: bool = True, **sampling):
        """Reply to an OpenAI-style conversation using the model's chat template.

        Args:
            messages: ``[{"role": "system"|"user"|"assistant", "content": str}, ...]``.
            stream: return an iterator of text pieces instead of the whole reply.
            skip_special_tokens: leave the tokenizer's special tokens out of the text (default);
                False keeps them, e.g. gpt-oss's harmony markers (``<|channel|>``, ...) for
                :class:`zipmoe_rt.server.harmony.HarmonySplitter` to split the channels.
        Returns:
            the assistant's reply (str), or an iterator of pieces when ``stream``.
        Raises:
            ValueError: malformed messages (index and field named), no chat template, or a
                prompt that fills :attr:`ctx_size`.
        """
        ids = self.tokenizer.encode_chat(messages, add_generation_prompt=True)
        max_tokens = self.fit_context(len(ids), max_tokens)
        it = self._stream_ids(ids, self.sampling(max_tokens, **sampling),
                              skip_special_tokens=skip_special_tokens)
        return it if stream else "".join(it)

    def chat_session(self, system: str | None = None) -> "ChatSession":
        """A multi-turn conversation that keeps its KV cache between turns.

        Raises:
            RuntimeError: the model was closed.
        """
        return ChatSession(self, system)

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
                given = f"weight budget {plan.budget / 1e6:.1f} MB"
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


class ChatSession:
    """A conversation with a model: messages plus the KV cache that holds them.

    Each :meth:`send` re-renders the whole conversation with the chat template and feeds only
    the tokens the cache does not already hold (common-prefix reuse), so long chats stay fast.
    A reply interrupted once it has begun (Ctrl-C, the iterator closed) is kept as far as it
    got. A turn stopped before its first reply token, while its prompt is prefilled (Ctrl-C,
    or an error), is withdrawn: its user message is not kept and the KV cache holds what it
    held before the turn, so the next turn's reply is the one it would have been had the
    withdrawn turn never been sent (:attr:`withdrawn` says so).

    Attributes:
        messages: the conversation (user and assistant turns; the system prompt apart).
        state: the :class:`~zipmoe_rt.generate.CacheState` holding it.
        withdrawn: True when the last :meth:`send` was stopped before its first reply token
            and left the conversation as it was.
    """

    def __init__(self, model: Model, system: str | None = None):
        self.model = model
        self.system = system
        self.messages: list[dict] = []
        self.state = CacheState.new(model.live_net())
        self.withdrawn = False
        self._busy = threading.Lock()     # held while a reply is being generated

    def _claim(self, what: str):
        if not self._busy.acquire(blocking=False):
            raise RuntimeError(f"chat session: cannot {what} while a reply is still being "
                               f"generated (finish or close the previous send() first; one "
                               f"conversation is one reply at a time)")

    def reset(self, system: str | None = ...):
        """Forget the conversation (and optionally set a new system prompt); the KV cache's
        memory is released.

        Raises:
            RuntimeError: a reply of this session is still being generated, or the model was
                closed (the conversation is left as it was).
        """
        self._claim("reset")
        try:
            state = CacheState.new(self.model.live_net())    # closed: nothing changes
            if system is not ...:
                self.system = system
            self.messages = []
            self.state = state
        finally:
            self._busy.release()

    def _all_messages(self):
        return ([{"role": "system", "content": self.system}] if self.system else []) + self.messages

    def send(self, text: str, max_tokens: int = 512, skip_special_tokens: bool = True,
             **sampling) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply (text pieces).

        Nothing runs until the iterator is first advanced; from then until it is exhausted or
        closed, the reply holds the session. The reply is kept in :attr:`messages` as the
        assistant's turn (``content``: the text streamed; a caller that splits it, as the
        ``chat`` command does gpt-oss's channels, may replace that entry before the next turn).
        Stopped before its first reply token (during the prefill), the turn is withdrawn
        instead (see :class:`ChatSession`). ``skip_special_tokens``: as for :meth:`Model.chat`.

        Raises:
            ValueError: a bad sampling option or message, or a conversation that no longer
                fits :attr:`Model.ctx_size` (raised here, before anything changes: the
                conversation is left as it was).
            RuntimeError: (when the iterator is first advanced) another reply of this session is
                still being generated, by this or another thread, or the model was closed; the
                conversation is left as it was.
        """
        user = {"role": "user", "content": text}
        ids = self.model.tokenizer.encode_chat(self._all_messages() + [user],
                                               add_generation_prompt=True)
        max_tokens = self.model.fit_context(len(ids), max_tokens)
        params = self.model.sampling(max_tokens, **sampling)
        return self._send(user, ids, params, skip_special_tokens)

    def _send(self, user: dict, ids: list[int], params, skip_special_tokens: bool = True
              ) -> Iterator[str]:
        self._claim("send")
        try:
            it = self._reply(user, ids, params, skip_special_tokens)
            try:
                yield from it
            finally:
                it.close()
        finally:
            self._busy.release()

    def _reply(self, user: dict, ids: list[int], params, skip_special_tokens: bool = True
               ) -> Iterator[str]:
        net = self.model.live_net()       # a closed model: RuntimeError, nothing changed
        self.withdrawn = False
        new = self.state.sync_prefix(ids, net)
        held = len(self.state.token_ids)
        self.messages.append(user)
        reply: list[str] = []
        finished = False

        def finish(gen):
            nonlocal finished
            finished = True
            stats = gen.stats
            if stats is not None and stats.output_tokens == 0 and \
                    stats.finish_reason in ("cancelled", "error"):
                # stopped before its first reply token (in the prefill): the turn is
                # withdrawn, the cache goes back to the tokens it held before it (if the
                # prefill committed, e.g. before a Ctrl-C that landed in the sampling)
                self.messages.pop()
                self.withdrawn = True
                self.state.crop_to(held)
                return
            self.messages.append({"role": "assistant", "content": "".join(reply)})

        try:
            inner = self.model._stream_ids(new, params, self.state, on_finish=finish,
                                           skip_special_tokens=skip_special_tokens)
            try:
                for piece in inner:
                    reply.append(piece)
                    yield piece
            finally:
                inner.close()
        finally:
            if not finished and not reply:
                # interrupted (Ctrl-C) before the generation recorded its end and before any
                # reply token: withdrawn as in ``finish``
                if self.messages and self.messages[-1] is user:
                    self.messages.pop()
                self.withdrawn = True
                self.state.crop_to(held)

    @property
    def last_stats(self) -> GenerationStats | None:
        return self.model.last_stats
