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
one batch (:mod:`~zipmoe_rt.engine.gpu_batch`) that is launched at once, so on the copy stream
they follow the running layer's copies, on the decode stream they follow its decode, and the
compute stream does not wait for them: they overlap the running layer's matmuls and the next
layer's attention. The next layer's call claims the loads of the experts it selects
(:meth:`~zipmoe_rt.engine.prefetch.PrefetchMixin._claim_prefetched`) and waits on their
decode's event as for any miss; the others (wrong guesses) are discarded.

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

    def _issue_prefetch(self) -> None:
        """:meth:`PrefetchMixin._issue_prefetch
        <zipmoe_rt.engine.prefetch.PrefetchMixin._issue_prefetch>`, then the predicted misses'
        copies and decode launched as one batch (the running layer's MoE time keeps its own
        last decode as its start, :meth:`~zipmoe_rt.engine.gpu_batch.BatchedMisses._note_layer`)."""
        if self._next is None:
            return
        last = self._last_dec
        super()._issue_prefetch()
        self._flush()
        self._last_dec = last

    def _sweep_discarded(self, wait: bool = False) -> None:
        """Release discarded loads: one whose file read is still running stays until it ends
        (waits for it with ``wait``); one copied and decoded is dropped once the compute stream
        waits for its decode (no host wait); count the bytes each fetched as wasted."""
        keep = []
        ops = self.ops
        for p in self._discard:
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
