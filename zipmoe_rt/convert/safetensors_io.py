"""Raw-byte access to safetensors files (single file or sharded with an index).

The ``safetensors`` package cannot hand BF16 tensors to numpy (numpy has no bfloat16), and a
lossless converter needs the stored bytes anyway, so this module reads and writes the format
directly: an 8-byte little-endian header length, a JSON header
``{name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}}``, then the
data (https://github.com/huggingface/safetensors#format).

Tensors come back as read-only ``numpy.uint8`` views of a memory map, so reading one tensor
touches only its bytes.
"""
from __future__ import annotations

import json
import math
import mmap
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import numpy as np

#: safetensors dtype name -> bytes per element.
DTYPE_SIZES = {
    "BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1,
    "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
    "I32": 4, "U32": 4, "F32": 4,
    "I64": 8, "U64": 8, "F64": 8,
}

#: safetensors dtype name -> numpy dtype used to view the raw bytes (BF16 as its uint16 bits).
NUMPY_VIEW = {
    "BOOL": np.bool_, "U8": np.uint8, "I8": np.int8, "F8_E4M3": np.uint8, "F8_E5M2": np.uint8,
    "I16": np.int16, "U16": np.uint16, "F16": np.float16, "BF16": np.uint16,
    "I32": np.int32, "U32": np.uint32, "F32": np.float32,
    "I64": np.int64, "U64": np.uint64, "F64": np.float64,
}


class SafetensorsError(ValueError):
    """A safetensors file or index is malformed; the message names the file and tensor."""


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint: where its bytes live.

    Attributes:
        name: tensor name as stored (e.g. ``model.layers.0.mlp.gate.weight``).
        dtype: safetensors dtype name (``BF16``, ``F16``, ``F32``, ...).
        shape: tuple of ints, row-major.
        file: the shard holding it.
        begin, end: byte offsets inside the shard's data section.
    """

    name: str
    dtype: str
    shape: tuple
    file: Path
    begin: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.begin


#: the largest header the reference reader accepts (safetensors ``MAX_HEADER_SIZE``, bytes)
MAX_HEADER_SIZE = 100_000_000


def _no_constants(name):
    raise ValueError(f"{name} is not a JSON number")


def _finite(text):
    v = float(text)
    if not math.isfinite(v):
        raise ValueError(f"{text[:40]} is out of the range of a double")
    return v


def _unique_keys(pairs):
    out = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def strict_json(data: bytes | str):
    """Parse JSON as strictly as the reference readers (Rust serde_json, which safetensors and
    tokenizers use): no NaN / Infinity (nor numbers that overflow a double, such as 1e999), no
    key twice in an object, UTF-8 only.

    Raises:
        ValueError: not such JSON (also for nesting too deep to parse or integers of more than
            4300 digits); the caller names the file.
    """
    try:
        if isinstance(data, bytes):
            data = data.decode("utf-8")
        return json.loads(data, parse_constant=_no_constants, parse_float=_finite,
                          object_pairs_hook=_unique_keys)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except UnicodeDecodeError as e:
        raise ValueError(f"not UTF-8 ({e.reason} at byte {e.start})") from None


def _count(v) -> bool:
    return type(v) is int and v >= 0


class SafetensorsFile:
    """A memory-mapped safetensors file, its header checked as the reference reader checks it
    (safetensors ``SafeTensors::read_metadata`` / ``Metadata::validate``).

    Raises:
        SafetensorsError: truncated file, a header length past the end of the file or above
            :data:`MAX_HEADER_SIZE`, header not a JSON object (or NaN, a key twice, bad
            UTF-8), ``__metadata__`` not an object of strings, a tensor entry without a known
            ``dtype``, a ``shape`` of non-negative integers or ``data_offsets`` [begin, end]
            of integers, a byte range not matching dtype x shape, or byte ranges that do not
            tile the data section exactly (overlapping, a gap, past the end, bytes left over).
            The message names the file and the tensor.
    """

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        size = self.path.stat().st_size
        with open(self.path, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise SafetensorsError(f"{self.path}: truncated safetensors header "
                                       f"({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > size - 8:
                raise SafetensorsError(f"{self.path}: header length {n} exceeds file size {size}")
            if n > MAX_HEADER_SIZE:
                raise SafetensorsError(f"{self.path}: header length {n} exceeds the "
                                       f"{MAX_HEADER_SIZE}-byte limit of safetensors")
            try:
                header = strict_json(f.read(n))
            except ValueError as e:
                raise SafetensorsError(f"{self.path}: header is not valid JSON ({e})") from None
        if not isinstance(header, dict):
            raise SafetensorsError(f"{self.path}: header is not a JSON object")
        meta = header.pop("__metadata__", None) or {}
        if not isinstance(meta, dict) or not all(isinstance(v, str) for v in meta.values()):
            raise SafetensorsError(f"{self.path}: __metadata__ is not an object of strings")
        self.metadata = meta
        self.data_start = 8 + n
        data_size = size - self.data_start
        self.tensors: dict[str, TensorInfo] = {}
        for name, h in header.items():
            where = f"{self.path}: tensor {name!r}"
            if not isinstance(h, dict):
                raise SafetensorsError(f"{where}: entry is not an object")
            dtype = h.get("dtype")
            if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
                raise SafetensorsError(f"{where} has unknown dtype {str(dtype)[:40]!r}")
            shape, offs = h.get("shape"), h.get("data_offsets")
            if not isinstance(shape, list) or not all(_count(d) for d in shape):
                raise SafetensorsError(f"{where}: shape {str(shape)[:60]} is not a list of "
                                       f"non-negative integers")
            if not (isinstance(offs, list) and len(offs) == 2 and all(_count(x) for x in offs)
                    and offs[0] <= offs[1]):
                raise SafetensorsError(f"{where}: data_offsets {str(offs)[:60]} is not "
                                       f"[begin, end] with 0 <= begin <= end")
            begin, end = offs
            expect = DTYPE_SIZES[dtype] * math.prod(shape)   # Python ints: no overflow
            if end - begin != expect:
                raise SafetensorsError(
                    f"{where} has {end - begin} bytes, expected {expect} for {dtype}{shape}")
            if end > data_size:
                raise SafetensorsError(f"{where} lies past the end of the file "
                                       f"(truncated shard?)")
            self.tensors[name] = TensorInfo(name, dtype, tuple(shape), self.path, begin, end)
        pos = 0   # the byte ranges tile the data section (Metadata::validate)
        for t in sorted(self.tensors.values(), key=lambda t: (t.begin, t.end)):
            if t.begin != pos:
                why = "overlaps the tensor before" if t.begin < pos else "a gap"
                raise SafetensorsError(f"{self.path}: tensor {t.name!r} starts at byte {t.begin} "
                                       f"of the data, expected {pos} ({why})")
            pos = t.end
        if pos != data_size:
            raise SafetensorsError(f"{self.path}: the tensors cover {pos} bytes of data, the file "
                                   f"holds {data_size} (truncated or extra bytes)")
        self._mm = None

    def _map(self):
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) if \
                    self.path.stat().st_size else b""
        return self._mm

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of tensor ``name`` as a read-only 1-D uint8 view (no copy)."""
        t = self.tensors[name]
        if t.nbytes == 0:
            return np.zeros(0, np.uint8)
        return np.frombuffer(self._map(), np.uint8, t.nbytes, self.data_start + t.begin)

    def array(self, name: str) -> np.ndarray:
        """Tensor ``name`` as a numpy array of ``NUMPY_VIEW[dtype]`` with its shape (no copy)."""
        t = self.tensors[name]
        return self.raw(name).view(NUMPY_VIEW[t.dtype]).reshape(t.shape)

    def close(self):
        if self._mm is not None and not isinstance(self._mm, bytes):
            try:
                self._mm.close()
            except BufferError:  # numpy views still alive: the map closes when they are freed
                pass
        self._mm = None


def read_index(path: Path) -> dict:
    """The ``weight_map`` of a ``model.safetensors.index.json``: tensor name -> shard file name.

    Raises:
        SafetensorsError (naming ``path``): not a JSON object with a ``weight_map`` object of
            strings, or a shard name that is not a plain file name in the folder (``../x``,
            an absolute path, a subfolder: transformers joins it to the folder as given, so it
            could read any file; HF checkpoints keep their shards beside the index).
    """
    try:
        doc = strict_json(path.read_bytes())
    except ValueError as e:
        raise SafetensorsError(f"{path}: not valid JSON ({e})") from None
    wm = doc.get("weight_map") if isinstance(doc, dict) else None
    if not isinstance(wm, dict):
        raise SafetensorsError(f"{path}: not a safetensors index (no weight_map object)")
    for name, s in wm.items():
        if not isinstance(s, str):
            raise SafetensorsError(f"{path}: weight_map[{name!r}] is {str(s)[:40]!r}, not a file "
                                   f"name")
        if s in ("", ".", "..") or "/" in s or "\\" in s or os.sep in s or "\0" in s:
            raise SafetensorsError(f"{path}: weight_map[{name!r}] = {s[:80]!r} is not a file in "
                                   f"the checkpoint folder")
    return wm


class Checkpoint:
    """All tensors of a Hugging Face checkpoint folder, single-file or sharded.

    Reads the files transformers loads (``modeling_utils._get_resolved_checkpoint_files``):
    ``model.safetensors`` when present, else the shards ``model.safetensors.index.json`` lists.
    Other ``*.safetensors`` files in the folder are never read (transformers does not load a
    folder of unindexed shards either). A tensor name found in two of the files read is an
    error, so no tensor is taken silently from the wrong file.

    Attributes:
        unread: names of ``*.safetensors`` files in the folder that were not read.
    Raises:
        FileNotFoundError: no ``model.safetensors`` and no index (the message lists the unindexed
            shards found, if any), or a shard named by the index is missing (named).
        SafetensorsError: a malformed file or index, a tensor the index places in a shard that
            lacks it, or a tensor name in two files (both named).
    """

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)
        index = self.folder / "model.safetensors.index.json"
        single = self.folder / "model.safetensors"
        if single.exists():
            weight_map, shards = None, ["model.safetensors"]
        elif index.exists():
            weight_map = read_index(index)
            shards = sorted(set(weight_map.values()))
            for s in shards:
                if not (self.folder / s).is_file():
                    raise FileNotFoundError(f"{self.folder / s}: shard named by {index.name} is missing")
        else:
            found = sorted(p.name for p in self.folder.glob("*.safetensors"))
            hint = (f"; found {', '.join(found)} without an index (transformers cannot load "
                    f"them either): add the model.safetensors.index.json that came with them"
                    if found else "")
            raise FileNotFoundError(f"{self.folder}: no model.safetensors or "
                                    f"model.safetensors.index.json{hint}")
        self.unread = sorted(p.name for p in self.folder.glob("*.safetensors")
                             if p.name not in shards)
        self.files = {s: SafetensorsFile(self.folder / s) for s in shards}
        self.tensors: dict[str, TensorInfo] = {}
        for s, f in self.files.items():
            for name, t in f.tensors.items():
                if name in self.tensors:
                    raise SafetensorsError(f"tensor {name!r} is in two files: "
                                           f"{self.tensors[name].file} and {t.file}")
                self.tensors[name] = t
        if weight_map is not None:
            for name, s in weight_map.items():
                if name not in self.tensors or self.tensors[name].file.name != s:
                    raise SafetensorsError(f"{self.folder / s}: tensor {name!r} named by the index "
                                           f"is not in the shard")

    def _file(self, name: str) -> SafetensorsFile:
        return self.files[self.tensors[name].file.name]

    def raw(self, name: str) -> np.ndarray:
        """Stored bytes of ``name`` (1-D uint8 view)."""
        return self._file(name).raw(name)

    def array(self, name: str) -> np.ndarray:
        """``name`` viewed as numpy (BF16 as uint16 bits), shaped."""
        return self._file(name).array(name)

    def __iter__(self) -> Iterator[TensorInfo]:
        return iter(self.tensors.values())

    def close(self):
        for f in self.files.values():
            f.close()


def write_safetensors(path: str | os.PathLike, tensors: dict, metadata: dict | None = None):
    """Write ``{name: (dtype_name, shape, data)}`` as one safetensors file.

    ``data`` is bytes-like, or a zero-argument callable returning it (called once, when the
    tensor is written, so a caller can stream tensors without holding them all).
    Tensors are written in the given order; the data must hold exactly
    ``DTYPE_SIZES[dtype] * prod(shape)`` bytes (checked; ``ValueError`` names the tensor).
    The header is padded with spaces to a multiple of 8 bytes, as the reference writer does.
    """
    header, offset = {}, 0
    for name, (dtype, shape, _) in tensors.items():
        n = DTYPE_SIZES[dtype] * int(np.prod(shape, dtype=np.int64))
        header[name] = {"dtype": dtype, "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    if metadata:
        header = {"__metadata__": {str(k): str(v) for k, v in metadata.items()}, **header}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, (dtype, shape, data) in tensors.items():
            mv = memoryview(data() if callable(data) else data).cast("B")
            h = header[name]["data_offsets"]
            if mv.nbytes != h[1] - h[0]:
                raise ValueError(f"tensor {name!r}: {mv.nbytes} bytes given, {h[1] - h[0]} "
                                 f"expected for {dtype}{list(shape)}")
            f.write(mv)
