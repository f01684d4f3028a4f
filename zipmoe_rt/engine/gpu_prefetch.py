"""Cross-layer prefetch on the GPU expert engine: the next MoE layer's predicted misses cross
PCIe (and are decoded) while the running layer computes.

The prediction is the host engine's (:mod:`~zipmoe_rt.engine.prefetch`): the model's
look-ahead applies the next MoE layer's norm and router to the residual stream before the
running layer's feed-forward block, on the GPU (the router's logits and top-k are copied to the
host, as for every routing decision), and :meth:`PrefetchMixin.predict
<zipmoe_rt.engine.prefetch.PrefetchMixin.predict>` keeps the top ``k + m_l`` of its ranking.
Once the running layer has queued its own misses, :meth:`GpuPrefetch._issue_prefetch` starts
the predicted experts that are not in the F pool (at most ``k`` alive) through the engine's
own miss path (:meth:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine._start`): their copies join
one open batch (:mod:`~zipmoe_rt.engine.gpu_batch`) and start at once on the copy stream,
behind the running layer's copies, so they cross PCIe while the running layer computes and the
next layer's attention runs. Compressed experts stay compressed in the staging arena until the
running call has queued its matmuls; then the batch's decode is launched
(:meth:`GpuPrefetch._end_call`), into output buffers taken at that moment from the memory the
running call's experts give back (the decode stream waits for the compute stream's work so
far), so prefetch holds no second working set of decoded experts and the tiers keep the whole
budget they have without it (:meth:`GpuPrefetch.prefetch_second_set`). Raw experts
(``raw-lru``: the copied words are the weights), experts the GPU kernel does not take and
``gpu_batch.BATCHED`` off are decoded as they arrive and need a second working set of ``k``
experts, as on the host. The next layer's call claims the loads of the experts it selects
(:meth:`~zipmoe_rt.engine.prefetch.PrefetchMixin._claim_prefetched`) and waits on their
decode's event as for any miss; the others (wrong guesses) are discarded.

The host reads each layer's routing (the look-ahead's and the router's) into pinned memory,
the router's ids and weights in one read (:mod:`~zipmoe_rt.backends.cuda_reads`); those reads
wait for the compute stream only, not for the expert copies in flight (measured,
docs/benchmarks.md §13).

A discarded load never reaches a matmul: the compute stream waits for its decode's event before
its buffers are dropped (so memory the pool hands out again is not still being written by the
decode stream), and a staging block read for it goes back once its read has ended. A wrong
guess therefore costs PCIe bytes and decode time, never correctness: the words a load produces
are the same whether it was started early or not, so logits are bit-identical with prefetch on
and off. ``prefetch_wasted_bytes`` counts the compressed regions (raw regions for ``raw-lru``)
that were fetched for experts nobody used.
"""
from __future__ import annotations


class GpuPrefetch:
    """Mixin of :class:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine` over
    :class:`~zipmoe_rt.engine.prefetch.PrefetchMixin` (see the module docstring): launches the
    predicted loads at once and discards wrong guesses without a host wait. Uses the engine's
    ``ops``, ``_flush``, ``_last_dec``, ``_give_staging``, ``_discard`` and ``stats``."""

    #: the predicted loads are copied and decoded at once (the GPU's streams, not the host's
    #: cores; :attr:`PrefetchMixin.PREFETCH_READS_ONLY <zipmoe_rt.engine.prefetch.
    #: PrefetchMixin.PREFETCH_READS_ONLY>`)
    PREFETCH_READS_ONLY = False

    @classmethod
    def prefetch_second_set(cls, layouts: dict, prefetch: bool) -> bool:
        """Whether prefetch needs a second working set of ``k`` decoded experts within the
        budget (:func:`~zipmoe_rt.engine.pipeline.budget_split`): only where a predicted load
        is decoded when it arrives, i.e. raw experts (their copied words are the weights),
        experts the GPU kernel does not take, or ``gpu_batch.BATCHED`` off. Compressed experts
        on the batched path wait compressed in the staging arena until the running layer's
        matmuls are queued, and are decoded into the memory its experts give back."""
        from . import gpu_batch
        from .gpu_meta import gpu_decodable
        staged = gpu_batch.BATCHED and all(
            gpu_decodable(l) and not all(p.raw for p in l.pieces) for l in layouts.values())
        return bool(prefetch) and not staged

    def _issue_prefetch(self) -> None:
        """:meth:`PrefetchMixin._issue_prefetch
        <zipmoe_rt.engine.prefetch.PrefetchMixin._issue_prefetch>`: the predicted misses'
        copies start at once in one open batch; its decode is launched when the running MoE
        call has queued its matmuls (:meth:`~zipmoe_rt.engine.gpu_engine.GpuExpertEngine.run`),
        or at once when no call runs (a look-ahead from a dense layer). The running layer's MoE
        time keeps its own last decode as its start
        (:meth:`~zipmoe_rt.engine.gpu_batch.BatchedMisses._note_layer`)."""
        self._take_deferred()
        if self._next is None:
            return
        last = self._last_dec
        super()._issue_prefetch()
        if not self._in_call:
            self._flush()
        self._last_dec = last

    def _end_call(self) -> None:
        """After an MoE call has queued its matmuls: launch the decode of the predicted loads
        its prefetch queued (their outputs may take the memory the call's experts give back)."""
        self._in_call = False
        if self._batch is not None:
            self._flush()

    def _sweep_discarded(self, wait: bool = False) -> None:
        """Release discarded loads: one whose file read is still running stays until it ends
        (waits for it with ``wait``); one still in the open batch stays until the batch's
        decode is launched (launched now with ``wait``); one copied and decoded is dropped once
        the compute stream waits for its decode (no host wait); count the bytes each fetched as
        wasted."""
        keep = []
        ops = self.ops
        if wait and self._batch is not None:
            self._flush()
        for p in self._discard:
            if self._batch is not None and any(p is q for q in self._batch.group):
                keep.append(p)            # its decode is not launched yet
                continue
            if p.future is not None:
                if not (wait or p.future.done()):
                    keep.append(p)
                    continue
                try:
                    p.future.result()
                except Exception:  # noqa: BLE001 - a wrong guess's read error is not the run's
                    pass
                p.future = None
                if p.staging and p.block is not None:
                    self._give_staging(p.block, None)     # never copied: free at once
            elif p.event is not None:
                ops.wait(ops.current(), p.event)          # its buffers may back later arrays
            lay = p.lay
            self.stats.prefetch_wasted_bytes += (lay.sm_region[1] if p.need_sm else 0) + \
                (lay.exp_region[1] if p.need_exp else 0)
            self.stats.prefetch_wasted += 1
            p.weights = p.keep = p.block = p.event = None
        self._discard = keep

    def prefetch_report(self) -> dict:
        """The prefetch counters since the last stats reset: ``prefetch`` (bool: the engine
        predicts), ``recall`` (share of the experts one-token calls used that were predicted,
        over all predicted layers; None before any), loads ``issued``, ``used``, ``wasted``,
        and ``wasted_bytes`` (regions fetched for experts nobody used)."""
        st = self.stats
        used = sum(st.recall_used.values())
        return {"prefetch": bool(self.prefetch),
                "recall": sum(st.recall_hits.values()) / used if used else None,
                "issued": st.prefetch_issued, "used": st.prefetch_used,
                "wasted": st.prefetch_wasted, "wasted_bytes": st.prefetch_wasted_bytes}
