"""The ``.zmoe`` expert store: a :class:`~zipmoe_rt.models.weights.WeightSource` over a
``.zmoe`` file (format/SPEC.md).

Everything is read with ``pread`` into memory this process owns
(:class:`~zipmoe_rt.engine.io.RegionReader`), never through a memory map of the file: a model
file truncated while mapped kills the process with SIGBUS at the next access to a lost page,
whereas a read reports it (see :class:`~zipmoe_rt.engine.io.ModelFileError`). Dense tensors are
read once (CRC-checked once). An expert is rebuilt from its planes on request: its two regions
are read, then each exponent chunk is decoded and merged with its sign+mantissa bytes by a Numba
kernel while still in cache (ZipMoE §3.1). Every piece's CRC-32 is checked before use unless
``verify=False``.
"""
from __future__ import annotations

import threading

import numpy as np
import zstandard as zstd

import zmoe
from zmoe.reader import NUMPY_DTYPES

from ..families.check import check_reader, stored_hparams
from ..models.weights import ExpertWeights
from . import layout as L_
from . import lowprec
from .io import ModelFileError, RegionReader, aligned_empty


class ZmoeSource:
    """Weights of a ``.zmoe`` model.

    Args:
        path: the ``.zmoe`` file.
        verify: check the CRC-32 of every piece read (recommended; ~4 GB/s per core).
        keep_experts: keep decoded experts in memory after first use (unbudgeted runs).
        copy_dense: every :meth:`tensor` call returns a new array that the caller owns (the
            source keeps none: budgeted runs, where resident bytes are then exactly what the
            budget counts); otherwise each dense tensor is read once and kept by the source.
            Either way dense tensors are in process memory, not in a map of the file.
        check_model: check the stored hyper-parameters against the stored tensor shapes
            (:func:`zipmoe_rt.families.check.check_stored_tensors`); off only for tools that
            read containers which are not whole models (the fuzzer's partial bases).
        resident: ``"full"`` keeps experts as decoded weights, ``"compressed"`` in the compute
            form (:mod:`zipmoe_rt.engine.resident`; ValueError for any other value).
        lowprec_form: how FP8 / MXFP4 weights are returned once dequantised (dense tensors
            and experts; others are unaffected): ``"float32"`` (the CPU kernels) or
            ``"compact"``, BF16 words where every value of a tensor (of an expert's three
            projections) round-trips through BF16, float32 otherwise (the GPU;
            :func:`~zipmoe_rt.engine.lowprec.compute_form`). ValueError for any other value.

    Attributes:
        hparams: normalised hyper-parameters (``hparams.*`` metadata, format/SPEC.md §3).
        metadata: all metadata.

    Raises:
        zmoe.ZmoeError subclasses: corrupt, truncated or foreign files (see the reader).
        zipmoe_rt.engine.io.ModelFileError: the file was replaced or changed while it was being
            opened.
    """

    def __init__(self, path, verify: bool = True, keep_experts: bool = True,
                 copy_dense: bool = False, check_model: bool = True, resident: str = "full",
                 lowprec_form: str = "float32"):
        from .resident import check_resident
        self.resident = check_resident(resident)
        if lowprec_form not in lowprec.LOWPREC_FORMS:
            raise ValueError(f"lowprec_form: expected one of {', '.join(lowprec.LOWPREC_FORMS)}, "
                             f"got {lowprec_form!r}")
        self.lowprec_form = lowprec_form
        # every read after the index goes through this descriptor: a file renamed over ``path``
        # or deleted while the model runs does not matter, one changed in place is detected by
        # the reads (RegionReader.read)
        import os
        # page-cache pages are left as they are: an unbudgeted model reads each expert once,
        # and a budgeted load evicts the file's pages when it is done (api.load)
        self._rr = RegionReader(path, keep_cache=True)
        try:
            self.reader = zmoe.ZmoeReader(path)
            self.path = self.reader.path
            ours, now = os.fstat(self._rr.fd), os.stat(self.path)
            if ((ours.st_ino, ours.st_dev) != (now.st_ino, now.st_dev)
                    or self._rr.size != self.reader.header.file_size):
                self.reader.close()
                raise ModelFileError(f"{self.path}: the file was replaced or changed while it "
                                     f"was being opened; load it again")
        except BaseException:
            self._rr.close()
            raise
        self.metadata = self.reader.metadata
        self.hparams = stored_hparams(self.metadata)
        # hyper-parameters size the runtime's buffers: they must agree with the stored shapes
        try:
            if check_model:
                check_reader(self.reader, str(self.path))
        except zmoe.ZmoeError:
            self.reader.close()
            self._rr.close()
            raise
        self.verify = verify
        self.keep_experts = keep_experts
        self.copy_dense = copy_dense
        self._dense: dict = {}
        #: bytes the model built on this source saves on its dense weights by holding them in
        #: the compute form (``resident="compressed"``; set by the loader from the built model,
        #: :func:`zipmoe_rt.models.packed.dense_saving`)
        self.dense_saving = 0
        self._experts: dict = {}
        self._layouts = None
        self._tls = threading.local()
        self.bytes_read = 0

    # -- dense -------------------------------------------------------------------------------
    def has(self, name: str) -> bool:
        t = self.reader.tensors.get(name)
        return t is not None and "expert" not in t

    def tensor(self, name: str) -> np.ndarray:
        """Dense tensor ``name`` (BF16 as uint16), shaped, in process memory; an F8_E4M3 one
        dequantised with its scales (float32, or its compact form: ``lowprec_form``).

        Read once and kept by the source; with ``copy_dense`` every call reads a new copy that
        the caller owns (the source keeps none, so a model that converts or concatenates a
        tensor holds the only copy in memory).

        Raises:
            KeyError: no such dense tensor (named).
            zmoe.ChecksumError: a piece fails its CRC-32 (``verify``) or does not decode.
            zipmoe_rt.engine.io.ModelFileError: the file changed since it was opened, or a read
                failed.
        """
        a = self._dense.get(name)
        if a is None:
            if not self.has(name):
                raise KeyError(f"{self.path}: no dense tensor {name!r}")
            a = self._read_dense(name, self.reader.tensors[name])
            if lowprec.is_f8(self.reader.tensors[name]["dtype"]):   # FP8: float32 at load
                a = self._dequantize(name, a)
                if self.lowprec_form == "compact":
                    a = lowprec.compute_form(a)
            if not self.copy_dense:
                self._dense[name] = a
        return a

    def _dequantize(self, name: str, q: np.ndarray) -> np.ndarray:
        """An F8_E4M3 dense tensor dequantised with its ``<name>_scale_inv`` (float32,
        :func:`zipmoe_rt.engine.lowprec.dequantize_dense`).

        Raises:
            zmoe.CorruptIndexError: the scale tensor is missing or does not fit (named).
        """
        sname = name + lowprec.SCALE_NAME_SUFFIX
        if not self.has(sname) or self.reader.tensors[sname]["dtype"] != "F32":
            raise zmoe.CorruptIndexError(f"{self.path}: tensor {name!r} is F8_E4M3 but the file "
                                         f"has no F32 {sname!r}")
        scale = self._read_dense(sname, self.reader.tensors[sname])
        return lowprec.dequantize_dense(self.path, name, q, scale, lowprec.fp8_block(self.metadata))

    def _read_piece(self, name: str, what: str, entry) -> np.ndarray:
        """One stored piece (``[offset, size, ..., crc32]``) read with pread, CRC-checked if
        ``verify``."""
        import zlib
        off, size, crc = entry[0], entry[1], entry[-1]
        buf = self._rr.read(off, size)
        if self.verify and zlib.crc32(buf) & 0xFFFFFFFF != crc:
            raise zmoe.ChecksumError(f"{self.path}: tensor {name!r}: {what} fails its CRC-32 "
                                     f"(corrupt file)")
        return buf

    def _read_dense(self, name: str, t: dict) -> np.ndarray:
        """A dense tensor read with pread (:class:`~zipmoe_rt.engine.io.RegionReader`: its pages
        leave the page cache right after) and decoded if stored as bit-planes."""
        parts = []
        for part in t["parts"]:
            if "raw" in part:
                parts.append(self._read_piece(name, "raw data", part["raw"]))
                continue
            sm = self._read_piece(name, "sign+mantissa plane", part["sm"])
            chunks = [self._read_piece(name, f"exponent chunk {i}", c)
                      for i, c in enumerate(part["exp"])]
            try:
                words = zmoe.codec.merge_chunks(chunks, [c[2] for c in part["exp"]], sm,
                                                t["dtype"], t["exp_codec"], self._dctx())
            except ValueError as e:
                raise zmoe.ChecksumError(f"{self.path}: tensor {name!r}: {e}") from None
            parts.append(words.view(np.uint8))
        raw = parts[0] if len(parts) == 1 else np.concatenate(parts)
        return raw.view(NUMPY_DTYPES[t["dtype"]]).reshape(t["shape"])

    @property
    def reader_fd(self) -> int:
        """The descriptor every read of the file goes through (open since construction)."""
        return self._rr.fd

    def dense_bytes(self) -> int:
        """Bytes of all dense tensors as held (what stays resident): as stored, less
        :attr:`dense_saving`, what the model saves by holding some in the compute form. An
        F8_E4M3 tensor counts 4 bytes per weight (it is held dequantised: float32, or at most
        that in the compact form) and its ``_scale_inv`` nothing (read only to dequantise)."""
        ts = self.reader.tensors
        total = 0
        for name, t in ts.items():
            if "expert" in t:
                continue
            n = zmoe.reader.element_count(t)
            if lowprec.is_f8(t["dtype"]):
                total += 4 * n
            elif not (name.endswith(lowprec.SCALE_NAME_SUFFIX) and lowprec.is_f8(
                    ts.get(name[:-len(lowprec.SCALE_NAME_SUFFIX)], {}).get("dtype", ""))):
                total += n * np.dtype(NUMPY_DTYPES[t["dtype"]]).itemsize
        return total - self.dense_saving

    # -- experts -----------------------------------------------------------------------------
    def _dctx(self) -> zstd.ZstdDecompressor:
        d = getattr(self._tls, "d", None)
        if d is None:
            d = self._tls.d = zstd.ZstdDecompressor()
        return d

    @property
    def layouts(self) -> dict:
        """``{(layer, expert): ExpertLayout}`` of every expert block (built once); with
        ``lowprec_form="compact"`` MXFP4 experts count their projections as BF16 words
        (``ExpertLayout.mxfp4_bf16``: the form they are held in)."""
        if self._layouts is None:
            lays = L_.expert_layouts(self.reader)
            if self.lowprec_form == "compact":
                import dataclasses
                lays = {k: dataclasses.replace(v, mxfp4_bf16=True) for k, v in lays.items()}
            self._layouts = lays
        return self._layouts

    def layout(self, layer: int, expert: int) -> L_.ExpertLayout:
        """Where one expert's pieces sit in its regions. KeyError naming it if absent."""
        lay = self.layouts.get((layer, expert))
        if lay is None:
            raise KeyError(f"{self.path}: no expert {expert} in layer {layer}")
        return lay

    def decode_expert(self, layer: int, expert: int) -> ExpertWeights:
        """Read (pread, CRC-checked if ``verify``) and rebuild one expert, no caching.

        Raises:
            zmoe.ChecksumError: a piece fails its CRC or a chunk does not decode to its size.
            zipmoe_rt.engine.io.ModelFileError: the file changed since it was opened (e.g.
                truncated), or the read failed (e.g. EIO); names the file.
        """
        lay = self.layout(layer, expert)
        sm, exp = self._read_regions(lay, own_sm=False)
        return L_.decode_expert(self.path, lay, sm, exp, self._dctx())

    def pack_expert(self, layer: int, expert: int):
        """Read one expert (as :meth:`decode_expert`) and transcode it into the compute form
        (:func:`zipmoe_rt.engine.resident.pack_expert`), no caching; the packed matrices keep
        the SM region buffer read here.

        Returns:
            :class:`~zipmoe_rt.models.packed.PackedExpert` (ExpertWeights for an expert that is
            not all BF16 bit-planes).
        Raises:
            as :meth:`decode_expert`.
        """
        from .resident import pack_expert
        lay = self.layout(layer, expert)
        sm, exp = self._read_regions(lay, own_sm=True)
        return pack_expert(self.path, lay, sm, exp, self._dctx())

    def _read_regions(self, lay: L_.ExpertLayout, own_sm: bool):
        """An expert's SM and exponent region buffers (CRC-checked if ``verify``); with
        ``own_sm`` the SM region is a new buffer the caller may keep."""
        (s0, sn), (e0, en) = lay.sm_region, lay.exp_region
        if not own_sm and s0 <= e0 and e0 - (s0 + sn) < 1 << 16:   # one read (SPEC §6)
            both = self._rr.read(s0, e0 + en - s0, alloc=self._read_buffer)
            sm, exp = both[:sn], both[e0 - s0:]
        else:
            sm = self._rr.read(s0, sn)
            exp = self._rr.read(e0, en, alloc=self._read_buffer)
        if self.verify:
            L_.check_regions(self.path, lay, sm, exp)
        return sm, exp

    def _read_buffer(self, n: int) -> np.ndarray:
        """This thread's reusable read buffer, at least ``n`` bytes (a decoded expert keeps no
        view of it: raw pieces are copied out), so reading an expert allocates nothing."""
        buf = getattr(self._tls, "buf", None)
        if buf is None or buf.size < n:
            buf = self._tls.buf = aligned_empty(max(n, 1 << 20))
        return buf[:n]

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """One expert's weights; decoded (``resident="full"``; FP8 / MXFP4 projections
        dequantised, in ``lowprec_form``) or transcoded into the compute form
        (``"compressed"``) on first use, and kept if ``keep_experts``."""
        w = self._experts.get((layer, expert))
        if w is None:
            if self.resident == "compressed":
                w = self.pack_expert(layer, expert)
            else:
                w = self.decode_expert(layer, expert)
                if self.lowprec_form == "compact" and lowprec.is_lowprec_expert(
                        self.layout(layer, expert)):
                    w = lowprec.expert_compute_form(w)
            if self.keep_experts:
                self._experts[(layer, expert)] = w
        return w

    def admit_all(self) -> None:
        """Load every expert now (:meth:`expert` of each, in file order), so that running the
        model reads nothing more from the file."""
        for layer, e in sorted(self.layouts):
            self.expert(layer, e)

    def expert_bytes(self) -> dict:
        """``{"held": bytes of the experts held, "bf16": their bytes decoded}``."""
        held = sum(w.nbytes for w in self._experts.values())
        full = sum(getattr(w, "bf16_nbytes", w.nbytes) for w in self._experts.values())
        return {"held": held, "bf16": full}

    def memory_report(self) -> dict:
        """Bytes held for weights: ``{"dense": ..., "experts": ...}`` (experts kept); with
        ``resident="compressed"`` also ``experts_bf16``, the same experts' bytes in BF16."""
        rep = {"dense": self.dense_bytes(),
               "experts": sum(w.nbytes for w in self._experts.values())}
        if self.resident == "compressed":
            rep["experts_bf16"] = self.expert_bytes()["bf16"]
        return rep

    def close(self):
        self._dense.clear()
        self._experts.clear()
        self._rr.close()
        self.reader.close()
