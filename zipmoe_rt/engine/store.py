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
from zmoe.reader import NUMPY_DTYPES

from ..models.weights import ExpertWeights
from . import layout as L_


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
        self.hparams = {k[len("hparams."):]: v for k, v in self.metadata.items()
                        if k.startswith("hparams.")}
        if "family" not in self.hparams:
            self.hparams["family"] = self.metadata.get("general.family", "")
        self.verify = verify
        self.keep_experts = keep_experts
        self.copy_dense = copy_dense
        self._dense: dict = {}
        self._experts: dict = {}
        self._layouts = None
        self._released: set = set()
        self._tls = threading.local()
        self.bytes_read = 0

    # -- dense -------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        t = self.reader.tensors.get(name)
        return t is not None and "expert" not in t

    def tensor(self, name: str) -> np.ndarray:
        """Dense tensor ``name`` (BF16 as uint16), shaped. Raises KeyError naming it if absent."""
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
            self._dense[name] = a
        return a

    def _pread_raw(self, name: str, t: dict) -> np.ndarray:
        import os
        import zlib
        off, size, crc = t["parts"][0]["raw"]
        buf = np.empty(size, np.uint8)
        fd = os.open(self.path, os.O_RDONLY)
        try:
            got = os.preadv(fd, [buf], off)
        finally:
            os.close(fd)
        if got != size:
            raise zmoe.TruncatedFileError(f"{self.path}: tensor {name!r}: short read")
        if self.verify and zlib.crc32(buf) & 0xFFFFFFFF != crc:
            raise zmoe.ChecksumError(f"{self.path}: tensor {name!r}: raw data fails its CRC-32 "
                                     f"(corrupt file)")
        return buf.view(NUMPY_DTYPES[t["dtype"]]).reshape(t["shape"])

    def forget(self, *names: str) -> None:
        """Drop this source's own references to dense tensors ``names`` (a model that copied
        or converted them, e.g. q/k/v concatenated into one matrix, then holds the only copy).
        A later :meth:`tensor` call reads the tensor again."""
        for n in names:
            self._dense.pop(n, None)

    def forget_dense(self) -> None:
        """:meth:`forget` every dense tensor read so far (called once a model is built)."""
        self._dense.clear()

    def release_metadata(self, *keys: str) -> None:
        """Drop large metadata values that are not needed after load (e.g. ``tokenizer.json``,
        ~7 MB as a Python string). :meth:`metadata_value` still finds them (re-read from the
        file's index)."""
        for k in keys:
            if self.metadata.pop(k, None) is not None:
                self._released.add(k)

    def metadata_value(self, key: str, default=None):
        """``metadata[key]``, re-reading the index when :meth:`release_metadata` dropped it."""
        if key in self.metadata or key not in self._released:
            return self.metadata.get(key, default)
        return zmoe.ZmoeReader(self.path).metadata.get(key, default)

    def drop_page_cache(self) -> bool:
        """Drop the model file's pages from the OS page cache (posix_fadvise DONTNEED), e.g.
        after dense weights and cache tiers were read into process memory, so that a memory
        cgroup stops charging them. Mapped pages in use are not dropped. False if unsupported."""
        from .io import evict_page_cache
        try:
            return evict_page_cache(self.path)
        except OSError:
            return False

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
        self.reader.close()
