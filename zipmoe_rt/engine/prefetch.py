"""Prefetch across layers: start loading layer l+1's experts while layer l computes.

During a decode step (one token), before layer l's MoE block runs, the model applies the *next*
MoE layer's norm and router to the residual stream as it enters layer l's MoE block (the hidden
state layer l+1 will see, less layer l's MoE output), as offloading systems do (Pre-gated MoE,
Hwang et al., ISCA 2024; AdapMoE, Zhong et al., ICCAD 2024; MoE-Infinity, Xue et al. 2024). The
predicted experts that are not in the F pool are started (their reads and decodes queued behind
layer l's own) once layer l's loads are queued, so they overlap layer l's compute. When layer
l+1 runs, each expert it selects that was predicted is taken from those loads; a wrong guess is
discarded once its load ends (its output arrays and read buffers go back to the pools) and costs
only the bytes read and the decode work, never correctness: the weights a load produces are the
same bits whether it was started early or not.

Two parts:

* :func:`attach` sets a ``lookahead`` callable on every decoder layer whose next MoE layer
  exists (:class:`~zipmoe_rt.models.model.DecoderLayer` calls it with the residual stream
  before its feed-forward block). It calls :meth:`PrefetchMixin.predict` with the next MoE
  layer's routing of that state (the block's own :meth:`~zipmoe_rt.models.moe.SparseMoeBlock.
  route`, so every routing rule of every family predicts as it routes).
* :class:`PrefetchMixin`, part of :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`: the loads
  in flight, their claim by the next layer, the discard of wrong guesses, and the counters
  ``bench`` reports (recall per layer = |predicted ∩ used| / |used|, wasted bytes per token).

Memory: a prefetch holds up to top-k more decoded experts than one layer's working set, so the
engine reserves ``2k`` experts of working set instead of ``k`` (:func:`~zipmoe_rt.engine.
pipeline.budget_split`); a budget too small for that runs without prefetch.
"""
from __future__ import annotations

import numpy as np

#: values of ``--prefetch``.
PREFETCH_MODES = ("on", "off")
#: the default of ``--prefetch`` / ``load(prefetch=None)`` (docs/benchmarks.md §16 measures it).
DEFAULT_PREFETCH = "off"


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


class PrefetchMixin:
    """Cross-layer prefetch of the expert engine (a mixin of
    :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`; see the module docstring). Main thread
    only. Works on the engine's ``fpools``, ``slots``, ``layouts``, ``stats``, ``_start``,
    ``_done_with`` and ``_give_read_buf``."""

    def _prefetch_setup(self, enabled: bool) -> None:
        self.prefetch = bool(enabled)
        self._inflight: dict = {}     # (layer, e) -> _Pending started by a prediction
        self._next = None             # (layer, experts) predicted, not issued yet
        self._predicted: dict = {}    # layer -> experts predicted for its coming call
        self._discard: list = []      # wrong guesses whose loads may still be running

    def predict(self, layer: int, experts, issue_now: bool = False) -> None:
        """Note that MoE layer ``layer`` will probably use ``experts`` (ints) for the coming
        token. Issued by :meth:`_issue_prefetch` after the running layer queued its own loads,
        or at once with ``issue_now`` (the running layer has no experts to load first)."""
        if not self.prefetch:
            return
        self._next = (int(layer), sorted({int(e) for e in experts}))
        if issue_now:
            self._issue_prefetch()

    def _issue_prefetch(self) -> None:
        """Start the loads of the pending prediction's experts that are neither in the layer's
        F pool nor already in flight."""
        nxt, self._next = self._next, None
        if nxt is None:
            return
        layer, experts = nxt
        self._predicted[layer] = experts
        # loads of other layers nobody claimed (the running layer has claimed its own by now)
        # are discarded first; at most k predicted loads are alive at once (in flight or
        # discarded and still running), so decoded experts stay within the 2k working set
        for key in [k for k in self._inflight if k[0] != layer]:
            self._discard.append(self._inflight.pop(key))
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
            self._inflight[key] = self._start(self.layouts[key], self.slots.get(key))
            self.stats.prefetch_issued += 1
            room -= 1

    def _claim_prefetched(self, key, in_f: bool):
        """The load in flight for ``key`` if a prediction started one (None otherwise); when
        the expert turned out F-resident (``in_f``) the load is discarded instead."""
        p = self._inflight.pop(key, None)
        if p is None:
            return None
        if in_f:
            self._discard.append(p)
            return None
        self.stats.prefetch_used += 1
        return p

    def _end_prefetch(self, layer: int, topk_idx: np.ndarray) -> None:
        """After MoE layer ``layer``'s call: count its prediction's recall (one-token calls),
        discard its loads nobody claimed, and release the discarded loads that ended."""
        pred = self._predicted.pop(layer, None)
        if pred is not None and topk_idx.shape[0] == 1:
            used = {int(e) for e in topk_idx[0]}
            st = self.stats
            st.recall_hits[layer] = st.recall_hits.get(layer, 0) + len(used.intersection(pred))
            st.recall_used[layer] = st.recall_used.get(layer, 0) + len(used)
        for key in [k for k in self._inflight if k[0] == layer]:
            self._discard.append(self._inflight.pop(key))
        self._sweep_discarded()

    def _sweep_discarded(self, wait: bool = False) -> None:
        """Give back the output arrays and read buffers of discarded loads that ended (all of
        them, waiting, with ``wait``); count the bytes they read as wasted."""
        keep = []
        for p in self._discard:
            if not p.done.is_set():
                if not wait:
                    keep.append(p)
                    continue
                p.done.wait()
            lay = p.lay
            self.stats.prefetch_wasted_bytes += sum(
                (lay.sm_region if which == "sm" else lay.exp_region)[1] for which in p.bufs)
            self.stats.prefetch_wasted += 1
            if p.outs is not None:
                self._done_with.append((lay, p.outs))
            for which, buf in p.bufs.items():
                self._give_read_buf(which, buf)
            p.bufs, p.outs, p.weights, p.sm, p.exp = {}, None, None, None, None
        self._discard = keep

    def _drop_prefetch(self) -> None:
        """Discard every load in flight and wait for them (before closing the engine)."""
        self._next = None
        self._predicted.clear()
        self._discard.extend(self._inflight.values())
        self._inflight.clear()
        self._sweep_discarded(wait=True)


def attach(model, engine) -> int:
    """Install the look-ahead of ``engine`` (an :class:`~zipmoe_rt.engine.pipeline.
    ExpertEngine` with ``prefetch`` on) on ``model``'s decoder layers.

    Layer i (MoE or dense) whose next MoE layer is j, both the shared
    :class:`~zipmoe_rt.models.model.DecoderLayer`, gets ``lookahead(x)``: for one-token
    calls, ``x`` (float32 [1, H], the residual stream before layer i's feed-forward norm) goes
    through layer j's ``post_attention_layernorm`` and its block's routing, and the engine is
    told the experts chosen (issued after layer i's own loads when layer i is an MoE layer,
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
        _logits, idx, _w = block.route(norm(x))
        engine.predict(j, np.asarray(idx).reshape(-1).tolist(), issue_now=not defer)

    return lookahead
