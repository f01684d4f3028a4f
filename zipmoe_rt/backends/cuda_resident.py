"""Experts held on the GPU for unbudgeted ``--device cuda`` runs: each is fetched from the
weight source once, uploaded (BF16 words, or the compute form of ``--resident compressed``:
:mod:`zipmoe_rt.backends.cuda_packed`) and kept.

Imported by :mod:`zipmoe_rt.backends.cupy_cuda` only (it needs CuPy).
"""
from __future__ import annotations

from . import cuda_packed

__all__ = ["ResidentExperts"]


class ResidentExperts:
    """A weight source whose experts live on the GPU: each is fetched from ``source`` once,
    uploaded, and kept (unbudgeted ``--device cuda`` runs). Dense tensors and the rest of the
    source's interface are passed through.

    Args:
        source: a :class:`~zipmoe_rt.models.weights.WeightSource`.  backend: a
            :class:`~zipmoe_rt.backends.cupy_cuda.CupyBackend`.
    """

    def __init__(self, source, backend):
        self.source, self.backend = source, backend
        self.hparams = source.hparams
        self._experts: dict = {}

    def tensor(self, name):
        """The source's dense tensor ``name`` (host array; KeyError naming it when absent)."""
        return self.source.tensor(name)

    def has(self, name):
        """Whether the source holds dense tensor ``name``."""
        return self.source.has(name)

    def expert(self, layer, expert):
        """The expert's weights as device arrays (uploaded on first use). Raises what the
        source raises (KeyError for a missing expert)."""
        w = self._experts.get((layer, expert))
        if w is None:
            e = self.source.expert(layer, expert)
            if cuda_packed.is_packed_any(e):        # compressed: kept packed (cuda_packed)
                w = cuda_packed.on_device(e)
            else:
                w = e.map(self.backend.from_host)     # biases too (gpt-oss)
            self._experts[(layer, expert)] = w
        return w

    def load_all(self):
        """Upload every expert of the source now (``resident="compressed"``)."""
        for layer, e in sorted(self.source.layouts):
            self.expert(layer, e)

    @property
    def bf16_nbytes(self) -> int:
        """Bytes the experts uploaded so far would take in BF16."""
        return sum(getattr(w, "bf16_nbytes", w.nbytes) for w in self._experts.values())

    @property
    def nbytes(self) -> int:
        """GPU bytes of the experts uploaded so far."""
        return sum(w.nbytes for w in self._experts.values())

    def clear(self):
        """Drop every uploaded expert."""
        self._experts.clear()
