"""The compute form of resident BF16 experts and dense linears (design note §6.5): what
``--resident compressed`` keeps in memory instead of BF16 weights, and what the Numba backend's
expert, linear, SwiGLU and embedding ops (:class:`~zipmoe_rt.backends.numba_cpu.NumbaBackend`)
compute from in place.

A :class:`PackedMatrix` holds a BF16 ``[out, in]`` matrix as its raw sign+mantissa plane
(8 bits per weight, format/SPEC.md §5.1) plus the exponent as a 4-bit index into a window of
15 consecutive exponents and an escape list for the rest (~12 bits per weight in all, ~75 % of
BF16); a :class:`PackedExpert` groups gate, up and down like
:class:`~zipmoe_rt.models.weights.ExpertWeights`. Backends take either kind of expert.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .weights import ExpertWeights


@dataclass
class PackedMatrix:
    """A BF16 matrix in the compute form.

    Attributes:
        shape: ``(out, in)``.
        base: exponent of index 0 (0..241); index ``v < 15`` is exponent ``base + v``.
        nib: uint8 ``[out, (in + 1) // 2]``: low nibble of byte ``j`` = index of column ``j``,
            high nibble = index of column ``(in + 1) // 2 + j``; 15 = escape.
        sm: uint8 ``[out, in]`` sign+mantissa plane (``(w >> 15) << 7 | (w & 0x7F)``).
        esc_ptr: int64 ``[out + 1]``: row ``r``'s escapes are entries ``esc_ptr[r] ..
            esc_ptr[r + 1] - 1`` of ``esc_col`` (int32 column) and ``esc_val`` (uint8 exponent).
    """

    shape: tuple
    base: int
    nib: np.ndarray
    sm: np.ndarray
    esc_ptr: np.ndarray
    esc_col: np.ndarray
    esc_val: np.ndarray
    dtype = np.dtype(np.uint16)   # the BF16 bits it stands for (what ExpertWeights would hold)

    @property
    def nbytes(self) -> int:
        """Bytes held (index, sign+mantissa plane, escape list)."""
        return (self.nib.nbytes + self.sm.nbytes + self.esc_ptr.nbytes + self.esc_col.nbytes
                + self.esc_val.nbytes)

    @property
    def source(self) -> tuple:
        """The row source the Numba backend computes from: ``(nib, sm, base << 7 as uint16,
        esc_ptr, esc_col, esc_val)``, built once."""
        src = self.__dict__.get("_source")
        if src is None:
            src = self.__dict__["_source"] = (self.nib, self.sm, np.uint16(self.base << 7),
                                              self.esc_ptr, self.esc_col, self.esc_val)
        return src

    @property
    def n_escapes(self) -> int:
        return int(self.esc_col.size)

    @property
    def bf16_nbytes(self) -> int:
        """Bytes of the same matrix in BF16."""
        return 2 * self.shape[0] * self.shape[1]

    def bf16(self) -> np.ndarray:
        """The BF16 bits, uint16 ``[out, in]`` (a new array), decoded with NumPy: the reference
        of the Numba backend's packed decode, and the form for backends without packed ops."""
        rows, cols = self.shape
        h = (cols + 1) // 2
        e = np.empty((rows, cols), np.uint16)
        e[:, :h] = self.nib & 15
        e[:, h:] = self.nib[:, :cols - h] >> 4
        e += np.uint16(self.base)
        r = np.repeat(np.arange(rows), np.diff(self.esc_ptr))
        e[r, self.esc_col] = self.esc_val
        sm = self.sm.astype(np.uint16)
        return ((sm >> 7) << 15) | (e << 7) | (sm & 0x7F)


@dataclass
class PackedExpert:
    """One SwiGLU expert in the compute form: gate, up ``[I, H]`` and down ``[H, I]``
    :class:`PackedMatrix` (the roles of :class:`~zipmoe_rt.models.weights.ExpertWeights`)."""

    gate: PackedMatrix
    up: PackedMatrix
    down: PackedMatrix

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes

    @property
    def bf16_nbytes(self) -> int:
        return self.gate.bf16_nbytes + self.up.bf16_nbytes + self.down.bf16_nbytes

    def weights(self) -> ExpertWeights:
        """The decoded expert (:meth:`PackedMatrix.bf16` of each role)."""
        return ExpertWeights(self.gate.bf16(), self.up.bf16(), self.down.bf16())


def is_packed(expert) -> bool:
    """Whether ``expert`` is a :class:`PackedExpert` (else ExpertWeights-like)."""
    return isinstance(expert, PackedExpert)


def as_weights(expert):
    """``expert`` as ExpertWeights-like arrays: a :class:`PackedExpert` decoded, anything else
    as it is."""
    return expert.weights() if isinstance(expert, PackedExpert) else expert


def packed_matrices(root, skip=("source", "executor", "backend", "route_hook")) -> list:
    """Every :class:`PackedMatrix` reachable from ``root`` (a model: its layers, attention,
    MLPs, head) through attributes, lists, tuples and dicts of objects of
    :mod:`zipmoe_rt.models`, each once; attributes named in ``skip`` are not followed (the
    weight source and the expert executor hold the experts, not the dense weights).

    Returns:
        list of PackedMatrix, in the order first reached.
    """
    seen, found, todo = set(), [], [root]
    while todo:
        o = todo.pop()
        if id(o) in seen:
            continue
        seen.add(id(o))
        if isinstance(o, PackedMatrix):
            found.append(o)
        elif isinstance(o, (list, tuple)):
            todo.extend(reversed(o))
        elif isinstance(o, dict):
            todo.extend(reversed(list(o.values())))
        elif type(o).__module__.startswith("zipmoe_rt.models") and hasattr(o, "__dict__"):
            todo.extend(reversed([v for k, v in vars(o).items() if k not in skip]))
    return found


def dense_saving(model) -> int:
    """Bytes the compute form saves on ``model``'s dense weights: the BF16 bytes of its
    :func:`packed_matrices` less the bytes they hold (0 when it holds none)."""
    return sum(P.bf16_nbytes - P.nbytes for P in packed_matrices(model))


def dense_saving_bound(source) -> int:
    """The most :func:`dense_saving` can be for a model of ``source`` (a
    :class:`~zipmoe_rt.engine.store.ZmoeSource`), from its tensor records alone, before any
    weight is read: every dense BF16 tensor of two or more dimensions counted as if held in
    the compute form without a single escape (a 4-bit index and the sign+mantissa byte per
    weight, and a row pointer per row of its shortest dimension), and a key projection
    without a value projection beside it twice (Gemma 4's ``attention_k_eq_v``: the model
    holds it as the value too). So ``dense_bytes()`` less this is the least the dense
    weights can hold."""
    tensors = source.reader.tensors
    total = 0
    for name, t in tensors.items():
        shape = [int(d) for d in t["shape"]]
        if "expert" in t or t["dtype"] != "BF16" or len(shape) < 2 or not all(shape):
            continue
        n = math.prod(map(int, shape))
        uses = 2 if "k_proj" in name and name.replace("k_proj", "v_proj") not in tensors else 1
        total += uses * max(0, n - 16 * min(shape))          # twice (n / 2 - 8 * rows)
    return (total + 1) // 2
