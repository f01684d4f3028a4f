"""Prefetch across layers: start loading layer l+1's experts while layer l computes.

During a decode step (one token), before layer l's MoE block runs, the model applies the *next*
MoE layer's norm and router to the residual stream as it enters layer l's MoE block (the hidden
state layer l+1 will see, less layer l's MoE output), as offloading systems do (Pre-gated MoE,
Hwang et al., ISCA 2024; AdapMoE, Zhong et al., ICCAD 2024; MoE-Infinity, Xue et al. 2024). The
predicted experts that are neither resident (F, compute-form C) nor holding both regions are
started once layer l's loads are queued, as **reads only**: their regions are read on the I/O
threads, behind every read a running layer waits for (:class:`~zipmoe_rt.engine.io.ReadQueue`
serves those first), so the device works while layer l computes, and nothing of a guess runs
on the cores the compute uses. When layer l+1 runs, each expert it selects that was predicted
is claimed: its decode starts then (:meth:`~zipmoe_rt.engine.pipeline.ExpertEngine._release`),
from the regions already read. A wrong guess is never decoded: it is discarded, its reads that
have not begun are skipped, and its read buffers go back to the pool once the reads in flight
end; it costs only the bytes it read, never correctness: a load gives the same bits whether
its reads ran early or not.

Two parts:

* :func:`attach` sets a ``lookahead`` callable on every decoder layer whose next MoE layer
  exists (:class:`~zipmoe_rt.models.model.DecoderLayer` calls it with the residual stream
  before its feed-forward block). It calls :meth:`PrefetchMixin.predict` with the next MoE
  layer's routing of that state (the block's own :meth:`~zipmoe_rt.models.moe.SparseMoeBlock.
  route`, so every routing rule of every family predicts as it routes).
* :class:`PrefetchMixin`, part of :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`: the loads
  in flight, their claim by the next layer, the discard of wrong guesses, and the counters
  ``bench`` reports (recall per layer = |predicted ∩ used| / |used|, wasted bytes per token).

Candidates beyond the top-k: the next router's own top-k on the earlier state misses a share
of the experts the layer will use (on the trained model of docs/benchmarks.md §16, 10-45 % per
layer). The prediction therefore carries the router's whole ranking of that state, and each layer
predicts its top ``k + m_l`` (:meth:`PrefetchMixin.extra_candidates`): the engine keeps, per
layer, how often the expert the layer really used stood at each rank of its prediction, and
``m_l`` is the fewest extra ranks (at most :data:`MAX_EXTRA` · k) whose running recall reaches
:data:`RECALL_TARGET`, so a layer whose router is already well predicted wastes nothing more,
and no more than keep the extras' expected unused loads per call within :data:`WASTE_BOUND` · k.
Loads start in rank order (the likeliest first); at most ``k`` predicted loads are alive at
once, which bounds both the memory and the bytes a wrong guess may read in flight.

Memory: the predicted loads alive at once (at most ``k``) hold read buffers, no decoded
expert; the budget sets aside a second working set of ``k`` experts for them
(:func:`~zipmoe_rt.engine.pipeline.budget_split`, which the GPU engine's decoded predictions
need; the host's read buffers take about two-thirds of it), and a budget too small for that
runs without prefetch.
"""
from __future__ import annotations

import numpy as np

#: values of ``--prefetch``.
PREFETCH_MODES = ("on", "off")
#: the default of ``--prefetch`` / ``load(prefetch=None)`` (docs/benchmarks.md §16 measures it).
DEFAULT_PREFETCH = "off"
#: the recall per layer that the extra candidates aim at (:meth:`PrefetchMixin.extra_candidates`)
RECALL_TARGET = 0.9
#: extra candidates per layer at most, as a multiple of k (``m_l <= MAX_EXTRA * k``)
MAX_EXTRA = 1
#: one-token calls of a layer before its extra candidates follow its measured ranks (until
#: then: none)
EXTRA_WARMUP = 4
#: the extra candidates' expected unused loads per call at most, as a multiple of k
WASTE_BOUND = 0.75
#: whether the look-ahead reads the next router's logits for the ranking of the extra
#: candidates. None (the default): where that read is free, on host backends, and not on the GPU,
#: where it would be a second device-to-host read after the routing's own (on one H100 skipping
#: it ran raw-lru with prefetch 1.43× faster: docs/benchmarks.md §13, run 12). False: the
#: prediction is the router's top-k alone, one read per look-ahead; True: the scores everywhere.
#: The logits never change, only which experts are loaded early
#: (``tools/gpu_timeline.py --ab lookahead_scores=on``)
LOOKAHEAD_SCORES = None
#: on a backend with ``read_later`` (CUDA), a look-ahead from an MoE layer queues the next
#: router's logits and their copy to the host without waiting, and the prediction is made from
#: them when the running layer issues its prefetch (after its own routing read, which the copy
#: precedes on the same stream): no host wait of its own. The experts are chosen by the
#: block's rule on the host copy (the softmax top-k by logit where the rule runs only on the
#: device). False: the look-ahead reads its routing at once. The logits never change, only
#: the prediction's timing (``tools/gpu_timeline.py --ab lookahead_async=on``)
LOOKAHEAD_ASYNC = False


def check_prefetch(value) -> bool:
    """``--prefetch`` / ``load(prefetch=)`` as a bool: ``on``/``off`` or a bool.

    Raises:
        ValueError: naming the option, for any other value.
    """
    if isinstance(value, bool):
        return value
    if value in PREFETCH_MODES:
        return value == "on"
    raise ValueError(f"prefetch (--prefetch) must be one of {', '.join(PREFETCH_MODES)}, "
                     f"got {value!r}")


class PrefetchWarning(UserWarning):
    """``prefetch`` was asked for and the run goes without it (:func:`prefetch_off_reason`)."""


def prefetch_off_reason(engine, budget: int, limited: bool) -> str:
    """The one-line notice for ``prefetch`` asked for and turned off by ``engine`` (an
    :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`) under ``budget`` bytes: the budget has
    no room for the second working set of ``k`` experts that prefetch takes, and the budget
    that has. ``limited``: the budget came from ``--memory-limit``."""
    from .tiers import mb_at_least, size_text, smallest_budget
    k, bytes_F = engine.k, engine.bytes_F
    need = smallest_budget(engine.source) + k * bytes_F
    where = (f"the weight budget of {size_text(budget)} that --memory-limit leaves"
             if limited else f"--memory-budget {size_text(budget)}")
    return (f"prefetch off: {where} has no room for the second working set of {k} experts "
            f"({k} x {bytes_F / 1e6:.1f} MB) that --prefetch on takes; a weight budget of at "
            f"least {mb_at_least(need)} runs with prefetch")


class PrefetchMixin:
    """Cross-layer prefetch of the expert engine (a mixin of
    :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`; see the module docstring). Main thread
    only. Works on the engine's ``fpools``, ``slots``, ``layouts``, ``stats``, ``_start``,
    ``_done_with`` and ``_give_read_buf``."""

    #: predicted loads only read, and are decoded when claimed (the host engine); False: they
    #: are decoded at once (the GPU engine, whose decodes do not take the compute's cores)
    PREFETCH_READS_ONLY = True

    def _prefetch_setup(self, enabled: bool) -> None:
        self.prefetch = bool(enabled)
        self._inflight: dict = {}     # (layer, e) -> PendingLoad started by a prediction
        self._next = None             # (layer, experts) predicted, not issued yet
        self._predicted: dict = {}    # layer -> (experts predicted for its coming call, ranking)
        self._discard: list = []      # wrong guesses whose loads may still be running
        self._rank_hist: dict = {}    # layer -> int64 [N]: used experts by rank in the ranking
        self._deferred = None         # (layer, fn): a look-ahead whose routing is on its way

    def predict(self, layer: int, experts, issue_now: bool = False, scores=None) -> None:
        """Note that MoE layer ``layer`` will probably use ``experts`` (ints, the router's top-k
        on the earlier state) for the coming token. With ``scores`` (float ``[N]``, the
        router's logits of that state, higher = likelier) the prediction is the top ``k + m``
        of the ranking, ``experts`` first (:meth:`extra_candidates`), and loads start in rank
        order; without, it is ``experts`` alone, by ascending id. Issued by
        :meth:`_issue_prefetch` after the running layer queued its own loads, or at once with
        ``issue_now`` (the running layer has no experts to load first)."""
        if not self.prefetch:
            return
        top = [int(e) for e in experts]
        if scores is not None and np.size(scores) != int(self.hp["num_experts"]):
            scores = None        # a router whose logits are not one score per expert
        if scores is None:
            self._next = (int(layer), sorted(set(top)), None)
        else:
            sc = np.asarray(scores, dtype=np.float64).reshape(-1)
            first = sorted(set(top), key=lambda e: (-sc[e], e))
            rest = [int(e) for e in np.argsort(-sc, kind="stable") if int(e) not in set(first)]
            ranking = first + rest
            m = self.extra_candidates(int(layer))
            self._next = (int(layer), ranking[:len(first) + m], ranking)
        if issue_now:
            self._issue_prefetch()

    def predict_later(self, layer: int, fn) -> None:
        """Note a prediction for MoE layer ``layer`` whose routing is still on its way to the
        host: ``fn()`` returns ``(experts, scores)`` as :meth:`predict` takes them; it is
        called by :meth:`_take_deferred` when the running layer issues its prefetch."""
        if self.prefetch:
            self._deferred = (int(layer), fn)

    def _take_deferred(self) -> None:
        """Turn a deferred prediction (:meth:`predict_later`) into the pending one."""
        d, self._deferred = self._deferred, None
        if d is not None:
            experts, scores = d[1]()
            self.predict(d[0], experts, scores=scores)

    def extra_candidates(self, layer: int) -> int:
        """``m_l``: how many experts beyond the router's top-k the prediction of MoE layer
        ``layer`` includes. The fewest ranks past ``k`` at which the layer's recall so far (the
        share of the experts its one-token calls used that stood within the top ``k + m`` of
        their prediction's ranking) reaches :data:`RECALL_TARGET`, at most
        :data:`MAX_EXTRA` · k, and fewer where the extras would waste more: the expected
        number of them a call does not use, ``Σ_{r=k}^{k+m−1} (1 − p_r)`` with ``p_r`` the
        share of calls that used the expert ranked ``r``, stays within
        :data:`WASTE_BOUND` · k. 0 before :data:`EXTRA_WARMUP` calls of the layer."""
        h = self._rank_hist.get(layer)
        k = self.k
        if h is None or h.sum() < EXTRA_WARMUP * k:
            return 0
        cum = np.cumsum(h) / h.sum()
        p = h * k / h.sum()                       # per rank: uses per call
        m = 0
        while m < min(MAX_EXTRA * k, len(h) - k) and cum[k + m - 1] < RECALL_TARGET \
                and float(np.sum(1.0 - p[k:k + m + 1])) <= WASTE_BOUND * k:
            m += 1
        return m

    def _issue_prefetch(self) -> None:
        """Start the loads of the pending prediction's experts that are neither in the layer's
        F pool nor already in flight."""
        self._take_deferred()
        nxt, self._next = self._next, None
        if nxt is None:
            return
        layer, experts, ranking = nxt
        self._predicted[layer] = (experts, ranking)
        # loads of other layers nobody claimed (the running layer has claimed its own by now)
        # are discarded first; at most k predicted loads are alive at once (in flight or
        # discarded and still running), so decoded experts stay within the 2k working set
        for key in [k for k in self._inflight if k[0] != layer]:
            self._discard_load(self._inflight.pop(key))
        self._sweep_discarded()
        room = self.k - len(self._discard) - len(self._inflight)
        pool = self.fpools[layer]
        for e in experts:
            key = (layer, e)
            if key in pool.slots or key in self._inflight or self._c_hit(key) is not None:
                continue     # resident, computed in place (F, compute-form C), or loading
            if room <= 0:
                self.stats.prefetch_skipped += 1
                continue
            slot = self.slots.get(key)
            if not self.PREFETCH_READS_ONLY:
                self._inflight[key] = self._start(self.layouts[key], slot)
            elif slot is not None and slot.sm is not None and slot.exp is not None:
                continue     # both regions resident: nothing to read ahead
            else:
                self._inflight[key] = self._start(self.layouts[key], slot, read_only=True)
            self.stats.prefetch_issued += 1
            room -= 1

    def _claim_prefetched(self, key, in_f: bool):
        """The load in flight for ``key`` if a prediction started one (None otherwise); when
        the expert turned out F-resident (``in_f``) the load is discarded instead."""
        p = self._inflight.pop(key, None)
        if p is None:
            return None
        if in_f:
            self._discard_load(p)
            return None
        self.stats.prefetch_used += 1
        if self.PREFETCH_READS_ONLY:
            self._release(p)      # its reads ran ahead; the decode starts now
        return p

    def _end_prefetch(self, layer: int, topk_idx: np.ndarray) -> None:
        """After MoE layer ``layer``'s call: count its prediction's recall (one-token calls),
        discard its loads nobody claimed, and release the discarded loads that ended."""
        pred = self._predicted.pop(layer, None)
        if pred is not None and topk_idx.shape[0] == 1:
            pred, ranking = pred
            used = {int(e) for e in topk_idx[0]}
            st = self.stats
            st.recall_hits[layer] = st.recall_hits.get(layer, 0) + len(used.intersection(pred))
            st.recall_used[layer] = st.recall_used.get(layer, 0) + len(used)
            st.predicted[layer] = st.predicted.get(layer, 0) + len(pred)
            if ranking is not None:
                h = self._rank_hist.setdefault(layer, np.zeros(len(ranking), np.int64))
                at = {e: i for i, e in enumerate(ranking)}
                for e in used:
                    h[at[e]] += 1
        for key in [k for k in self._inflight if k[0] == layer]:
            self._discard_load(self._inflight.pop(key))
        self._sweep_discarded()

    def _discard_load(self, p) -> None:
        """A predicted load nobody will claim: its reads not begun yet are skipped, and it is
        released by :meth:`_sweep_discarded` once its reads in flight end."""
        if self.PREFETCH_READS_ONLY:
            p.cancelled = True
        self._discard.append(p)

    def _sweep_discarded(self, wait: bool = False) -> None:
        """Give back the output arrays and read buffers of discarded loads that ended (all of
        them, waiting, with ``wait``); count the bytes they read as wasted."""
        keep = []
        for p in self._discard:
            if not _ended(p):
                if not wait:
                    keep.append(p)
                    continue
                while not _ended(p):
                    p.done.wait(0.001)
            lay = p.lay
            self.stats.prefetch_wasted_bytes += p.nread
            self.stats.prefetch_wasted += 1
            if p.outs is not None:
                self._done_with.append((lay, p.outs))
            for which, buf in p.bufs.items():
                self._give_read_buf(which, buf)
            p.bufs, p.outs, p.weights, p.sm, p.exp = {}, None, None, None, None
        self._discard = keep

    def _drop_prefetch(self) -> None:
        """Discard every load in flight and wait for them (before closing the engine)."""
        self._next = self._deferred = None
        self._predicted.clear()
        for p in self._inflight.values():
            self._discard_load(p)
        self._inflight.clear()
        self._sweep_discarded(wait=True)


def _ended(p) -> bool:
    """A discarded load is over: decoded (or failed), or, read-only, all its reads ended (it
    is never decoded)."""
    if p.done.is_set():
        return True
    with p.lock:
        return p.deferred and p.reads_done


def attach(model, engine) -> int:
    """Install the look-ahead of ``engine`` (an :class:`~zipmoe_rt.engine.pipeline.
    ExpertEngine` with ``prefetch`` on) on ``model``'s decoder layers.

    Layer i (MoE or dense) whose next MoE layer is j, both the shared
    :class:`~zipmoe_rt.models.model.DecoderLayer`, gets ``lookahead(x)``: for one-token
    calls, ``x`` (float32 [1, H], the residual stream before layer i's feed-forward norm) goes
    through layer j's ``post_attention_layernorm`` and its block's routing, and the engine is
    told the experts chosen and the router's logits (their ranking gives the extra candidates,
    :meth:`PrefetchMixin.extra_candidates`; issued after layer i's own loads when layer i is an MoE layer,
    else at once). Prefill (several tokens) is not predicted: it uses most experts anyway.

    Args:
        model: a :class:`~zipmoe_rt.models.model.Model` whose executor is ``engine``.
        engine: the expert engine.
    Returns:
        the number of layers given a look-ahead (0 when the engine's prefetch is off).
    """
    from ..models.model import DecoderLayer
    shared = [isinstance(layer, DecoderLayer) for layer in model.layers]
    for layer, ok in zip(model.layers, shared):
        if ok:
            layer.lookahead = None
    if not getattr(engine, "prefetch", False):
        return 0
    moe = sorted(model.moe_layers)
    n = 0
    for i, layer in enumerate(model.layers):
        nxt = [j for j in moe if j > i]
        if not nxt or not shared[i]:
            continue
        j = nxt[0]
        target = model.layers[j]
        if not shared[j] or not hasattr(target.mlp, "route"):
            continue   # a family with a decoder layer of its own (Gemma 4): not predicted
        layer.lookahead = _lookahead(engine, j, target, i in model.moe_layers)
        n += 1
    return n


def _lookahead(engine, j: int, target, defer: bool):
    norm, block = target.post_attention_layernorm, target.mlp

    def lookahead(x):
        if x.shape[0] != 1:
            return
        later = getattr(block.backend, "read_later", None)
        if LOOKAHEAD_ASYNC and defer and later is not None:
            pending = later(block.router_logits(norm(x)))     # queued, no host wait
            engine.predict_later(j, lambda: _host_prediction(block, pending()[0]))
            return
        logits, idx, _w = block.route(norm(x))
        want = (later is None) if LOOKAHEAD_SCORES is None else LOOKAHEAD_SCORES
        scores = block.backend.to_host(logits).reshape(-1) if want else None
        engine.predict(j, np.asarray(idx).reshape(-1).tolist(), issue_now=not defer,
                       scores=scores)   # GPU: the scores are a second host read

    return lookahead


def _host_prediction(block, logits: np.ndarray) -> tuple:
    """``(experts, scores)`` of a look-ahead from host router logits float32 [1, E]: the
    block's rule where it runs on host arrays, else (a rule only the device runs) the top-k by
    logit, the softmax top-k's choice. A prediction only: the layer routes on its own."""
    lg = np.asarray(logits, np.float32).reshape(1, -1)
    try:
        idx, _w = block.select(lg)
    except TypeError:
        idx = np.argsort(-lg[0], kind="stable")[:block.top_k]
    return np.asarray(idx).reshape(-1).tolist(), lg.reshape(-1)
