"""The ``.zmoe`` expert store: a :class:`~zipmoe_rt.models.weights.WeightSource` over a
memory-mapped ``.zmoe`` file (format/SPEC.md).

Dense tensors are loaded once (raw tensors are zero-copy views of the map, CRC-checked once).
An expert is rebuilt from its planes on request: each exponent chunk is zstd-decoded and merged
with its sign+mantissa bytes by a Numba kernel while still in cache (ZipMoE §3.1). Every piece's
CRC-32 is checked before use unless ``verify=False``.
"""
from __future__ import annotations

import threading

import numpy as np
import zstandard as zstd

import zmoe
from zmoe.constants import Keys
from zmoe.reader import NUMPY_DTYPES

from ..families.check import check_stored_tensors
from ..models.weights import ExpertWeights
from . import layout as L_
from .io import RegionReader


class ZmoeSource:
    """Weights of a ``.zmoe`` model.

    Args:
        path: the ``.zmoe`` file.
        verify: check the CRC-32 of every piece read (recommended; ~4 GB/s per core).
        keep_experts: keep decoded experts in memory after first use (unbudgeted runs).
        copy_dense: copy dense tensors into process memory instead of viewing the file map
            (budgeted runs: resident bytes are then exactly what the budget counts, and evicting
            the page cache cannot push dense weights back to the disk).

    Attributes:
        hparams: normalised hyper-parameters (``hparams.*`` metadata, format/SPEC.md §3).
        metadata: all metadata.

    Raises:
        zmoe.ZmoeError subclasses: corrupt, truncated or foreign files (see the reader).
    """

    def __init__(self, path, verify: bool = True, keep_experts: bool = True,
                 copy_dense: bool = False):
        self.reader = zmoe.ZmoeReader(path)
        self.path = self.reader.path
        self.metadata = self.reader.metadata
        prefix = Keys.HParams.PREFIX
        self.hparams = {k[len(prefix):]: v for k, v in self.metadata.items()
                        if k.startswith(prefix)}
        if "family" not in self.hparams:
            self.hparams["family"] = self.metadata.get(Keys.General.FAMILY, "")
        # hyper-parameters size the runtime's buffers: they must agree with the stored shapes
        try:
            check_stored_tensors(self.hparams,
                                 {n: t["shape"] for n, t in self.reader.tensors.items()},
                                 str(self.path))
        except zmoe.ZmoeError:
            self.reader.close()
            raise
        self.verify = verify
        self.keep_experts = keep_experts
        self.copy_dense = copy_dense
        self._dense: dict = {}
        self._experts: dict = {}
        self._layouts = None
        self._rr = None                     # RegionReader for copied raw dense tensors
        self._tls = threading.local()
        self.bytes_read = 0

    # -- dense -------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        t = self.reader.tensors.get(name)
        return t is not None and "expert" not in t

    def tensor(self, name: str) -> np.ndarray:
        """Dense tensor ``name`` (BF16 as uint16), shaped. Raises KeyError naming it if absent.

        Views of the file map are cached; with ``copy_dense`` every call returns a new copy
        that the caller owns (the source keeps none, so a model that converts or concatenates
        a tensor holds the only copy in memory)."""
        a = self._dense.get(name)
        if a is None:
            if not self.has(name):
                raise KeyError(f"{self.path}: no dense tensor {name!r}")
            t = self.reader.tensors[name]
            if self.copy_dense and t["encoding"] == "raw":
                a = self._pread_raw(name, t)     # never maps file pages into this process
            else:
                a = self.reader.read_tensor(name, verify=self.verify)
                if self.copy_dense:
                    a = np.array(a)
            if not self.copy_dense:
                self._dense[name] = a
        return a

    def _pread_raw(self, name: str, t: dict) -> np.ndarray:
        """A raw tensor read with pread (:class:`~zipmoe_rt.engine.io.RegionReader`: its pages
        leave the page cache right after), CRC-checked if ``verify``."""
        import zlib
        off, size, crc = t["parts"][0]["raw"]
        if self._rr is None:
            self._rr = RegionReader(self.path)
        try:
            buf = self._rr.read(off, size)
        except OSError as e:
            raise zmoe.TruncatedFileError(f"{self.path}: tensor {name!r}: {e}") from None
        if self.verify and zlib.crc32(buf) & 0xFFFFFFFF != crc:
            raise zmoe.ChecksumError(f"{self.path}: tensor {name!r}: raw data fails its CRC-32 "
                                     f"(corrupt file)")
        return buf.view(NUMPY_DTYPES[t["dtype"]]).reshape(t["shape"])

    def dense_bytes(self) -> int:
        """Bytes of all dense tensors (what stays resident)."""
        return sum(zmoe.reader.element_count(t) * np.dtype(NUMPY_DTYPES[t["dtype"]]).itemsize
                   for t in self.reader.tensors.values() if "expert" not in t)

    # -- experts -----------------------------------------------------------------------------
    def _dctx(self) -> zstd.ZstdDecompressor:
        d = getattr(self._tls, "d", None)
        if d is None:
            d = self._tls.d = zstd.ZstdDecompressor()
        return d

    @property
    def layouts(self) -> dict:
        """``{(layer, expert): ExpertLayout}`` of every expert block (built once)."""
        if self._layouts is None:
            self._layouts = L_.expert_layouts(self.reader)
        return self._layouts

    def layout(self, layer: int, expert: int) -> L_.ExpertLayout:
        """Where one expert's pieces sit in its regions. KeyError naming it if absent."""
        lay = self.layouts.get((layer, expert))
        if lay is None:
            raise KeyError(f"{self.path}: no expert {expert} in layer {layer}")
        return lay

    def decode_expert(self, layer: int, expert: int) -> ExpertWeights:
        """Read (from the map, CRC-checked if ``verify``) and rebuild one expert, no caching.

        Raises:
            zmoe.ChecksumError: a piece fails its CRC or a chunk does not decode to its size.
        """
        lay = self.layout(layer, expert)
        sm = self.reader.view(*lay.sm_region)
        exp = self.reader.view(*lay.exp_region)
        if self.verify:
            L_.check_regions(self.path, lay, sm, exp)
        return L_.decode_expert(self.path, lay, sm, exp, self._dctx())

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """One expert's weights; decoded on first use and kept if ``keep_experts``."""
        w = self._experts.get((layer, expert))
        if w is None:
            w = self.decode_expert(layer, expert)
            if self.keep_experts:
                self._experts[(layer, expert)] = w
        return w

    def memory_report(self) -> dict:
        """Bytes held for weights: ``{"dense": ..., "experts": ...}`` (decoded experts kept)."""
        return {"dense": self.dense_bytes(),
                "experts": sum(w.nbytes for w in self._experts.values())}

    def close(self):
        self._dense.clear()
        self._experts.clear()
        if self._rr is not None:
            self._rr.close()
            self._rr = None
        self.reader.close()
