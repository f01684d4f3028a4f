"""The budgeted expert engine's statistics: seconds per stage and counters (``bench``,
``/stats``; :class:`~zipmoe_rt.engine.pipeline.ExpertEngine`)."""
from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["StageTimes"]


@dataclass
class StageTimes:
    """Seconds spent per stage (summed over calls) and counters, for the benchmark."""

    io_s: float = 0.0          # time in reads (summed over the reads in flight)
    verify_s: float = 0.0      # of io_s: CRC-32 checks of regions read (I/O threads' CPU)
    decode_s: float = 0.0      # decode workers busy (sum over workers)
    wait_s: float = 0.0        # main thread blocked waiting for weights
    compute_s: float = 0.0     # main thread in expert kernels
    layer_s: float = 0.0       # wall time inside run()
    layer_calls: int = 0
    decode_layer_s: float = 0.0   # wall time inside run() for one-token calls (decode steps)
    decode_layer_calls: int = 0
    bytes_read: int = 0
    reads: int = 0
    hits: dict = field(default_factory=lambda: {"F": 0, "C": 0, "S": 0, "E": 0, "miss": 0})
    # cross-layer prefetch (engine/prefetch.py): per MoE layer, experts used by one-token calls
    # that were predicted / all of them; loads started, claimed, discarded and their bytes read
    recall_hits: dict = field(default_factory=dict)
    recall_used: dict = field(default_factory=dict)
    prefetch_issued: int = 0
    prefetch_used: int = 0
    prefetch_wasted: int = 0
    prefetch_wasted_bytes: int = 0
    prefetch_skipped: int = 0     # predicted, not started: k predicted loads already alive
    predicted: dict = field(default_factory=dict)   # per MoE layer: experts predicted (k + m)
    # one-token calls by their hits per tier: "hF,hC,hS,hE,hmiss" -> calls (what the delay
    # model is priced at: zipmoe_rt.bench's modelled layer time)
    call_hits: dict = field(default_factory=dict)

    def reset(self):
        self.__init__()

    def as_dict(self) -> dict:
        return {"io_s": self.io_s, "verify_s": self.verify_s, "decode_s": self.decode_s, "wait_s": self.wait_s,
                "compute_s": self.compute_s, "layer_s": self.layer_s,
                "layer_calls": self.layer_calls, "decode_layer_s": self.decode_layer_s,
                "decode_layer_calls": self.decode_layer_calls, "bytes_read": self.bytes_read,
                "reads": self.reads, "hits": dict(self.hits),
                "recall_hits": {str(k): v for k, v in self.recall_hits.items()},
                "recall_used": {str(k): v for k, v in self.recall_used.items()},
                "prefetch_issued": self.prefetch_issued, "prefetch_used": self.prefetch_used,
                "prefetch_wasted": self.prefetch_wasted,
                "prefetch_wasted_bytes": self.prefetch_wasted_bytes,
                "prefetch_skipped": self.prefetch_skipped, "call_hits": dict(self.call_hits),
                "predicted": {str(k): v for k, v in self.predicted.items()}}
