"""A multi-turn conversation that keeps its KV cache between turns
(:meth:`zipmoe_rt.api.Model.chat_session`; re-exported by :mod:`zipmoe_rt.api`)."""
from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Iterator, Sequence

from .api_args import check_sampling_args
from .generate import CacheState, GenerationStats
from .stops import check_stops, stop_at

if TYPE_CHECKING:
    from .api import Model


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
             stop: str | Sequence[str] | None = None, **sampling) -> Iterator[str]:
        """Add a user turn and stream the assistant's reply (text pieces).

        Nothing runs until the iterator is first advanced; from then until it is exhausted or
        closed, the reply holds the session. The reply is kept in :attr:`messages` as the
        assistant's turn (``content``: the text streamed; a caller that splits it, as the
        ``chat`` command does gpt-oss's channels, may replace that entry before the next turn).
        Stopped before its first reply token (during the prefill), the turn is withdrawn
        instead (see :class:`ChatSession`). ``skip_special_tokens``, ``max_tokens`` (``-1``:
        no limit but the context) and ``stop``: as for :meth:`Model.chat`; with a stop string
        the assistant's turn kept is exactly the text streamed.

        Raises:
            ValueError: a bad sampling option or message, or a conversation that no longer
                fits :attr:`Model.ctx_size` (raised here, before anything changes: the
                conversation is left as it was).
            RuntimeError: (when the iterator is first advanced) another reply of this session is
                still being generated, by this or another thread, or the model was closed; the
                conversation is left as it was.
        """
        check_sampling_args("ChatSession.send", sampling, ("text", "max_tokens",
                                                           "skip_special_tokens", "stop"))
        stops = check_stops(stop)
        user = {"role": "user", "content": text}
        ids = self.model.tokenizer.encode_chat(self._all_messages() + [user],
                                               add_generation_prompt=True)
        max_tokens = self.model.fit_context(len(ids), max_tokens)
        params = self.model.sampling(max_tokens, **sampling)
        return self._send(user, ids, params, skip_special_tokens, stops)

    def _send(self, user: dict, ids: list[int], params, skip_special_tokens: bool = True,
              stops: Sequence[str] = ()) -> Iterator[str]:
        self._claim("send")
        try:
            it = self._reply(user, ids, params, skip_special_tokens, stops)
            try:
                yield from it
            finally:
                it.close()
        finally:
            self._busy.release()

    def _reply(self, user: dict, ids: list[int], params, skip_special_tokens: bool = True,
               stops: Sequence[str] = ()) -> Iterator[str]:
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
            inner = self.model.stream_ids(new, params, self.state, on_finish=finish,
                                          skip_special_tokens=skip_special_tokens)
            inner = stop_at(inner, stops, self.model) if stops else inner
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
