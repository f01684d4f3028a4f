"""The model side of the server: loading in the background, one worker thread that runs the
requests one at a time from a bounded queue, the prompt-prefix KV cache, cancellation.

No ASGI import here: a request's events are handed to an ``emit`` callable (the app passes one
that forwards them into its event loop).
"""
from __future__ import annotations

import logging
import queue
import threading
from dataclasses import dataclass, field
from typing import Any, Callable

import numpy as np

from .schemas import APIError
from .harmony import HarmonySplitter
from .textproc import StopText, ToolCallSplitter, parse_tool_calls

__all__ = ["Job", "ModelHost"]


@dataclass
class Job:
    """One generation request handed to :class:`ModelHost`.

    Attributes:
        ids: the full prompt, token ids.
        params: :class:`~zipmoe_rt.generate.SamplingParams` (``max_tokens`` already fitted to
            the context).
        emit: called from the worker thread with each event: ``("text", str, [logprob
            entries])`` as the reply grows, then ``("done", result dict)``, ``("error",
            APIError)`` or ``("cancelled",)`` (after :attr:`cancel` was set).
        stops: stop strings.
        logprobs: None, or the number of top alternatives per token.
        tool_format: a key of :data:`~zipmoe_rt.server.textproc.TOOL_FORMATS` when the request
            gave tools and the template writes calls in that syntax; ``"harmony"`` for a chat
            request to a model whose template writes gpt-oss's harmony format (its reply is
            split into content, tool calls and reasoning by
            :class:`~zipmoe_rt.server.harmony.HarmonySplitter`); else None.
        tools: the request's OpenAI ``tools`` (parameter types for the XML call syntaxes).
        cancel: set it to stop the generation (client gone): before its next token, or within
            one decoder layer of the forward pass in progress (a long prompt's prefill too).
        label: names the request in the server log (the response id), e.g. in the one line
            logged when its client disconnected before the reply was complete.
        tokens: tokens generated so far (for the log line of a reply cut short).
    """

    ids: list
    params: Any
    emit: Callable
    stops: list = field(default_factory=list)
    logprobs: int | None = None
    tool_format: str | None = None
    tools: list | None = None
    cancel: threading.Event = field(default_factory=threading.Event)
    label: str = "request"
    tokens: int = 0


class ModelHost:
    """Owns the model: loads it in the background and serves :class:`Job` s one at a time.

    Args:
        loader: a callable returning a loaded :class:`~zipmoe_rt.api.Model` (called once, in a
            thread, by :meth:`start`).
        queue_size: the most requests that may wait while one runs; one more is refused with
            429 by :meth:`submit`.
        close_model: :meth:`close` also closes the model (False when the caller shares it).
        ctx_size: the context in tokens (prompt plus reply) each request may use (``serve
            -c``); None: the model's ``max_position_embeddings``. A longer one is allowed, with
            one warning in the log once the model is loaded.
        on_load_error: called with the error's message (without its class name, as ``run``
            prints it) when the model fails to load (``serve`` stops the server then); None: the server stays up and every request answers 503.

    Attributes:
        model: the model once loaded, else None.
        status: ``"loading"``, ``"ok"`` or ``"error"``; ``error`` holds the message then.
        served: requests finished (any outcome); ``last_result``: the last one's result dict.
    """

    def __init__(self, loader: Callable, queue_size: int = 16, close_model: bool = True,
                 ctx_size: int | None = None, on_load_error: Callable | None = None):
        if queue_size < 0:
            raise ValueError(f"queue_size (--queue): must be >= 0, got {queue_size}")
        if ctx_size is not None and (isinstance(ctx_size, bool) or not isinstance(ctx_size, int)
                                     or ctx_size < 1):
            raise ValueError(f"ctx_size (-c/--ctx-size): must be at least 1, got {ctx_size!r}")
        self.ctx_size = ctx_size
        self.loader, self.queue_size, self.close_model = loader, queue_size, close_model
        self.on_load_error = on_load_error
        self.model = None
        self.status, self.error = "loading", None
        self.served, self.last_result = 0, None
        self._jobs: queue.Queue = queue.Queue()
        self._pending = 0
        self._lock = threading.Lock()
        self._state = None              # CacheState of the previous request (prefix reuse)
        self._stop = False
        self.stopping = False            # the server is shutting down: no new requests
        self._current: Job | None = None
        self._waiting: list[Job] = []

    # -- lifecycle ---------------------------------------------------------------------------
    def start(self) -> None:
        """Start loading (a thread) and the worker thread; returns at once."""
        threading.Thread(target=self._load, name="zipmoe-rt-load", daemon=True).start()
        threading.Thread(target=self._work, name="zipmoe-rt-worker", daemon=True).start()

    def _load(self) -> None:
        log = logging.getLogger("uvicorn.error")     # the server's console log
        try:
            self.model = self.loader()
            if self.ctx_size is not None:
                from ..cli_repl import over_trained_context
                warning = over_trained_context(
                    self.ctx_size, self.model.hparams.get("max_position_embeddings"))
                if warning:
                    log.warning(warning)
            self.status = "ok"
            log.info("model %s loaded: ready", self.model.name)
        except BaseException as e:  # noqa: BLE001 - reported by /health and every request
            self.error = f"{type(e).__name__}: {e}"
            self.status = "error"
            if self.on_load_error is not None:
                # the error's own words, as ``run`` prints them (no class name)
                msg = str(e.args[0] if isinstance(e, KeyError) and e.args else e)
                self.on_load_error(msg or type(e).__name__)
            else:
                log.error("the model failed to load: %s (every request answers 503)",
                          self.error)

    def shut_down(self) -> None:
        """The server is shutting down: end the request in progress and those queued now, each
        with a 503 error event (a stream then ends with it and ``[DONE]``), and log one line
        for each; later requests get 503. Call it from the event loop's thread, before the
        server waits for its connections to close."""
        log = logging.getLogger("uvicorn.error")
        with self._lock:
            self.stopping = True
            jobs = ([self._current] if self._current is not None else []) + self._waiting
            self._waiting = []
        for job in jobs:
            if job.cancel.is_set():
                continue
            job.cancel.set()
            running = job is self._current
            what = (f"the reply ends with an error after {job.tokens} generated "
                    f"token{'s' if job.tokens != 1 else ''}" if running
                    else "the request waited in the queue and does not run")
            log.info("%s: the server is shutting down: %s", job.label, what)
            job.emit(("error", _shutting_down()))

    def close(self) -> None:
        """Stop the worker after the job in progress and close the model."""
        self._stop = True
        self._jobs.put(None)
        if self.model is not None and self.close_model:
            self.model.close()

    def ready(self) -> None:
        """Raise unless the model is loaded.

        Raises:
            APIError: 503 while loading, or after a failed load (with its message).
        """
        if self.status == "loading":
            raise APIError(503, "the model is still loading; retry when GET /health returns 200",
                           type="service_unavailable", code="model_loading")
        if self.status == "error":
            raise APIError(503, f"the model failed to load: {self.error}",
                           type="service_unavailable", code="model_load_failed")

    @property
    def context_length(self) -> int:
        """The context of a request in tokens: ``ctx_size`` when given, else the model's
        ``max_position_embeddings`` (a very large number if unknown); under a memory limit at
        most the context its KV cache was planned for (``Model.memory_plan.context``)."""
        plan = getattr(self.model, "memory_plan", None)
        if plan is not None:        # a memory limit holds a KV cache of the context it planned
            return min(self.ctx_size or plan.context, plan.context)
        if self.ctx_size is not None:
            return self.ctx_size
        n = self.model.hparams.get("max_position_embeddings") if self.model else None
        return int(n) if n else 2**31 - 1

    @property
    def pending(self) -> int:
        """Requests queued or running."""
        return self._pending

    # -- requests ----------------------------------------------------------------------------
    def submit(self, job: Job) -> None:
        """Queue ``job`` (runs after those ahead of it).

        Raises:
            APIError: 429 when ``queue_size`` requests already wait behind the running one.
        """
        with self._lock:
            if self.stopping:
                raise _shutting_down()
            if self._pending > self.queue_size:
                raise APIError(429, f"the server is busy: {self._pending} requests are queued "
                               f"or running (--queue {self.queue_size}); retry later",
                               type="rate_limit_error", code="queue_full")
            self._pending += 1
            self._waiting.append(job)
        self._jobs.put(job)

    def _work(self) -> None:
        while not self._stop:
            job = self._jobs.get()
            if job is None:
                break
            with self._lock:
                if job in self._waiting:
                    self._waiting.remove(job)
                self._current = job
            try:
                if self.stopping and job.cancel.is_set():     # ended by shut_down()
                    self.last_result = {"finish_reason": "cancelled", "completion_tokens": 0}
                elif job.cancel.is_set():          # the client left while it was queued
                    self.last_result = {"finish_reason": "cancelled", "completion_tokens": 0}
                    _log_cancelled(job, "while it waited in the queue; not run")
                    job.emit(("cancelled",))
                else:
                    self._run(job)
            except APIError as e:
                job.emit(("error", e))
            except Exception as e:  # noqa: BLE001 - answered as a JSON 500, never a traceback
                self._state = None
                message = f"generation failed: {type(e).__name__}: {e}"
                logging.getLogger("uvicorn.error").error("%s: %s", job.label, message)
                job.emit(("error", APIError(500, message, type="server_error")))
            finally:
                self.served += 1
                with self._lock:
                    self._pending -= 1
                    self._current = None

    def _run(self, job: Job) -> None:
        from ..generate import CacheState

        model = self.model
        state = self._state
        if state is None or not state.valid:
            state = self._state = CacheState.new(model.net)
        new = state.sync_prefix(job.ids, model.net)
        cached = held = len(job.ids) - len(new)
        tok = model.tokenizer
        harmony = job.tool_format == "harmony"      # gpt-oss: its markers are special tokens
        dec = tok.stream_decoder(skip_special_tokens=not harmony, context_ids=job.ids[-4:])
        stopper = StopText(job.stops)
        splitter = (HarmonySplitter() if harmony else
                    ToolCallSplitter(job.tool_format) if job.tool_format else None)
        seen = {"logits": None}
        on_logits = (lambda x: seen.__setitem__("logits", x)) if job.logprobs is not None else None
        n_tokens, finish, stopped, texts = 0, "length", False, []

        def out(piece: str, lps) -> None:
            nonlocal stopped
            text, stopped = stopper.push(piece)
            if splitter is not None:
                text = splitter.push(text)
            if text or lps:
                texts.append(text)
                job.emit(("text", text, lps))

        # job.cancel is checked before every layer: a client gone during a long prefill stops
        # it within one layer (the steps then end with finish_reason "cancelled")
        steps = model.token_steps(new, job.params, state, on_logits=on_logits,
                                  cancel=job.cancel)
        try:
            for step in steps:
                if step.token_id is None:
                    finish = step.stats.finish_reason
                    n_tokens = step.stats.generated_tokens
                    break
                n_tokens += 1
                job.tokens = n_tokens
                lps = ([self._logprob(tok, seen["logits"], step.token_id, job.logprobs)]
                       if job.logprobs is not None else None)
                out(dec.push(step.token_id), lps)
                if stopped:
                    finish = "stop"
                    break
                if job.cancel.is_set():
                    finish = "cancelled"
                    break
        finally:
            steps.close()
        if finish == "cancelled":
            # the client left: the prefix cache goes back to what this request found in it
            # (less what its prompt did not share), so the next request is computed as if it
            # had never come (a recurrent state that cannot return there is left to the next
            # sync_prefix, which rebuilds it)
            state.crop_to(held)
            self.last_result = {"finish_reason": "cancelled", "completion_tokens": n_tokens}
            if self.stopping:            # shut_down() has logged it and sent the error
                return
            _log_cancelled(job, f"after {n_tokens} generated token{'s' if n_tokens != 1 else ''}; "
                                f"generation stopped")
            job.emit(("cancelled",))
            return
        if not stopped:
            out(dec.flush(), None)
            if not stopped:
                tail = stopper.flush()
                if splitter is not None:
                    tail = splitter.push(tail) + splitter.flush()
                if tail:
                    texts.append(tail)
                    job.emit(("text", tail, None))
        if stopped:
            finish = "stop"
        result = {"finish_reason": finish, "prompt_tokens": len(job.ids),
                  "cached_tokens": cached, "completion_tokens": n_tokens,
                  "text": "".join(texts), "tool_calls": None}
        if harmony:
            calls, rest = splitter.finish()
            if splitter.reasoning:
                result["reasoning"] = splitter.reasoning
        elif splitter is not None and splitter.calls_text is not None:
            calls, rest = parse_tool_calls(splitter.calls_text, job.tool_format, job.tools)
        else:
            calls, rest = None, ""
        if calls is not None:
            if calls:
                result["tool_calls"] = calls
                result["finish_reason"] = "tool_calls"
            if rest:        # unparsable call text is returned as content, not lost
                result["text"] += rest
                result["extra_text"] = rest
        self.last_result = result
        job.emit(("done", result))

    @staticmethod
    def _logprob(tok, logits, token_id: int, top: int) -> dict:
        """OpenAI's ``{"token", "logprob", "bytes", "top_logprobs"}`` from raw logits (the
        model's distribution before sampling processors, as vLLM reports by default)."""
        x = np.asarray(logits, dtype=np.float64)
        m = x.max()
        lsm = x - (m + np.log(np.exp(x - m).sum()))

        def entry(i: int) -> dict:
            s = tok.decode([int(i)])
            return {"token": s, "logprob": float(lsm[i]), "bytes": list(s.encode("utf-8"))}

        e = entry(token_id)
        if top:
            idx = np.argpartition(-lsm, top - 1)[:top] if top < lsm.size else np.arange(lsm.size)
            idx = idx[np.argsort(-lsm[idx], kind="stable")]
            e["top_logprobs"] = [entry(int(i)) for i in idx]
        else:
            e["top_logprobs"] = []
        return e


def _shutting_down() -> APIError:
    """The 503 of a request that the server's shutdown ends (or refuses)."""
    return APIError(503, "the server is shutting down; the request was not completed",
                    type="service_unavailable", code="server_shutting_down")


def _log_cancelled(job: Job, what: str) -> None:
    """The one server-log line of a request whose client went away before its reply was
    complete (the worker then moves on to the next request)."""
    logging.getLogger("uvicorn.error").info("%s: the client disconnected %s", job.label, what)
