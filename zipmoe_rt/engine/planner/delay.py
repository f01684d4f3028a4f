"""The delay model: what one MoE layer costs one token, given how many of its experts each
cache tier serves (ZipMoE, arXiv 2601.21198 §3.5 and §4).

Tier names used throughout the planner: ``"F"`` (full BF16), ``"C"`` (sign+mantissa +
compressed exponent), ``"S"`` (sign+mantissa only), ``"E"`` (compressed exponent only),
``"miss"`` (nothing) (§2).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .checks import check_int

#: Cache tiers in rank order: the most popular experts go to the first one (§2, §3.4).
TIERS = ("F", "C", "S", "E", "miss")
#: the engine's own costs beside the base model's resources
#: (:meth:`DelayModel.engine_overhead_s`)
ENGINE_TERMS = ("layer_fixed_s", "load_C_s", "load_S_s", "load_E_s", "load_miss_s")


@dataclass(frozen=True)
class DelayModel:
    """Profiled per-expert costs of one MoE layer, and the layer makespan they imply (§3.5, §4).

    Times are seconds, sizes bytes, all for one expert of the layer.

    Attributes:
        sm_read_s: read one expert's sign+mantissa planes from flash (on the single I/O thread).
        exp_read_s: read one expert's compressed exponent region from flash.
        decode_s: decompress + merge one whole expert on one worker.
        matmul_s: one expert's SwiGLU for one token.
        workers: L, the decode workers.
        bytes_F: cache bytes of a full BF16 expert (tier F).
        bytes_sm: bytes of its sign+mantissa planes (tier S; tier C holds ``bytes_sm + bytes_exp``).
        bytes_exp: bytes of its compressed exponent planes (tier E).
        chunks: independent decode pieces per expert (the engine's decode jobs,
            ``ExpertLayout.jobs``: runs of the paper's K exponent chunks, §1); a decode occupies
            one worker for ``decode_s / chunks`` per piece. Default 1.
        bytes_c_form: the C tier in the compute form (design note §6.5; 0 = the storage form,
            the default): cache bytes of a tier-C expert, which then needs no decode
            (:meth:`c_hit_cost`).
        c_matmul_s: with ``bytes_c_form``: one C-hit expert's SwiGLU for one token computed
            from the compute form; each C hit costs ``c_matmul_s - matmul_s`` beside the
            matmul term.
        layer_fixed_s, load_C_s, load_S_s, load_E_s, load_miss_s: the engine's own costs
            (seconds; :meth:`engine_overhead_s`). Default 0.
        read_first_s: seconds a call that reads an SM region waits for its first read beyond
            that read's share of the concurrent read throughput (its latency), on the I/O side;
            a call that reads only exponent regions waits ``read_first_s · exp_read_s /
            sm_read_s`` (>= 0; measured with the engine terms, design note §3.8). Default 0.

    Makespan of one layer for one token (:meth:`layer_makespan`), given the hits per tier
    ``h = (hF, hC, hS, hE, hmiss)`` and ``k = Σh``::

        reads   = sm_read_s·(hE + hmiss) + exp_read_s·(hS + hmiss)            # one I/O channel
        io      = reads + first + (decode_s/chunks)·ceil(chunks / workers)  if reads > 0, else 0
        first   = read_first_s  if hE + hmiss > 0, else read_first_s·exp_read_s/sm_read_s
        d       = dC + hS + hE + hmiss                                        # experts to decode
        compute = (decode_s/chunks) · ceil(d·chunks / workers)                # decodes on L workers
        matmul  = matmul_s · ceil(k / workers)
        makespan = max(io, compute) + xC + matmul + engine                   (0 when k = 0)
        engine  = layer_fixed_s + Σ_t load_t_s·h_t  (t = C, S, E, miss; :meth:`engine_overhead_s`)

    with ``(dC, xC) = c_hit_cost(hC)``: ``(hC, 0)`` for a C tier in the storage form, ``(0,
    hC·(c_matmul_s − matmul_s))`` in the compute form (C hits computed in place).
    (``makespan`` is clamped at 0.) The ``engine`` term is what a Python engine adds to the two
    resources: measured by running the engine itself, all 0 when not measured.

    Why: §3 step 5 prices a layer as ``max(compute side, I/O side)``: the single I/O thread
    serialises the reads (Type-I tasks E and miss read the SM planes, S and miss read the
    exponent), and the decodes of C/S/E/miss are indivisible pieces spread over L identical
    workers, which take exactly ``ceil(pieces/L)`` rounds. The two overlap (§4's blocks exist to
    make them overlap), except that the expert read last cannot be decoded before its read ends:
    its own decode (its pieces over L workers) follows the I/O side. With that tail the max is the
    pipeline's two-resource lower bound; the §4 scheduler's list schedule is within ``(3 − 1/L)``
    of the true optimum. (Without the tail the model called an I/O-bound layer as fast as its
    reads alone, and planned S/E tiers that ran ~14 % slower on the default model at 444 MB
    than the plan the tail gives.) The token's ``k`` matmuls follow
    the weights they need; the last-ready expert's matmul cannot overlap its own preparation,
    and with ``k > L`` the matmuls take ``ceil(k/L)`` rounds, hence the additive term. It does
    not depend on the tiers, so it shifts every plan equally and never changes a planning
    decision; it only makes the predicted makespan an absolute time.

    Raises:
        ValueError: negative or non-finite times (engine terms: non-finite), ``workers < 1``,
            ``chunks < 1``, negative byte sizes.
    """

    sm_read_s: float
    exp_read_s: float
    decode_s: float
    matmul_s: float
    workers: int
    bytes_F: int
    bytes_sm: int
    bytes_exp: int
    chunks: int = 1
    bytes_c_form: int = 0
    c_matmul_s: float = 0.0
    # engine terms (engine/overhead.py measures them; 0 = not measured): see engine_overhead_s
    layer_fixed_s: float = 0.0
    load_C_s: float = 0.0
    load_S_s: float = 0.0
    load_E_s: float = 0.0
    load_miss_s: float = 0.0
    read_first_s: float = 0.0

    def __post_init__(self):
        for name in ("sm_read_s", "exp_read_s", "decode_s", "matmul_s", "c_matmul_s",
                     "read_first_s"):
            v = float(getattr(self, name))
            if not math.isfinite(v) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")
        for name in ENGINE_TERMS:
            v = float(getattr(self, name))
            if not math.isfinite(v):
                raise ValueError(f"{name} must be finite, got {v!r}")
        for name in ("workers", "chunks"):
            if check_int(getattr(self, name), name) < 1:
                raise ValueError(f"{name} must be >= 1")
        for name in ("bytes_F", "bytes_sm", "bytes_exp", "bytes_c_form"):
            v = getattr(self, name)
            if not math.isfinite(float(v)) or v < 0:
                raise ValueError(f"{name} must be finite and >= 0, got {v!r}")

    @property
    def bytes_C(self):
        """Bytes of a tier-C expert: sign+mantissa plus compressed exponent, or its compute
        form (``bytes_c_form``)."""
        return self.bytes_c_form if self.bytes_c_form else self.bytes_sm + self.bytes_exp

    def c_hit_cost(self, hC):
        """What ``hC`` C hits add to a layer: ``(decodes, seconds)``. In the storage form each
        is one decode (``hC``, 0 s); in the compute form (``bytes_c_form``) none is decoded
        and each computes in place for ``c_matmul_s - matmul_s`` more than an F hit.

        Args:
            hC: C hits (int or int array).
        Returns:
            ``(decodes, extra)``: int (array) and float64 (array) of ``hC``'s shape.
        """
        hC = np.asarray(hC)
        if not self.bytes_c_form:
            return hC, np.zeros(hC.shape)
        return np.zeros_like(hC), hC * (float(self.c_matmul_s) - float(self.matmul_s))

    def tier_bytes(self) -> dict[str, float]:
        """Cache bytes per expert of each tier, ``{"F", "C", "S", "E", "miss"}`` (miss = 0)."""
        return {"F": self.bytes_F, "C": self.bytes_C, "S": self.bytes_sm, "E": self.bytes_exp,
                "miss": 0}

    def plan_bytes(self, nF: int, nC: int, nS: int, nE: int):
        """Cache bytes of a layer plan with ``nF, nC, nS, nE`` experts in tiers F, C, S, E."""
        return nF * self.bytes_F + nC * self.bytes_C + nS * self.bytes_sm + nE * self.bytes_exp

    def io_and_compute(self, d, n_sm, n_exp):
        """The two sides of :meth:`layer_makespan` before the max (class docstring's formulas).

        Args:
            d: experts to decode (int or int array).
            n_sm: sign+mantissa region reads (int or int array).
            n_exp: exponent region reads (int or int array); the three broadcast together.

        Returns:
            ``(io, compute)`` float64 arrays of the broadcast shape, seconds: the I/O side (the
            reads on the one I/O channel, plus the decode of the expert read last when anything
            is read, and ``read_first_s``) and the compute side (decode pieces over ``workers``).
        """
        n_sm, n_exp = np.asarray(n_sm), np.asarray(n_exp)
        reads = self.sm_read_s * n_sm + self.exp_read_s * n_exp
        piece = self.decode_s / self.chunks
        tail = piece * math.ceil(self.chunks / self.workers)
        # the first read's latency: read_first_s for an SM region, in proportion for a call
        # whose reads are all exponent regions (shorter reads wait less)
        ratio = self.exp_read_s / self.sm_read_s if self.sm_read_s > 0 else 1.0
        first = np.where(n_sm > 0, self.read_first_s, self.read_first_s * ratio)
        io = reads + np.where((n_sm + n_exp) > 0, tail + first, 0.0)
        comp = piece * np.ceil(np.asarray(d) * self.chunks / self.workers)
        return io, comp

    def matmul_time(self, k: int) -> float:
        """Seconds of a token's ``k`` expert matmuls on ``workers`` workers:
        ``matmul_s · ceil(k / workers)``, 0 when ``k = 0`` (the class docstring's ``matmul``)."""
        return self.matmul_s * math.ceil(k / self.workers) if k > 0 else 0.0

    def engine_overhead_s(self, hC, hS, hE, hmiss):
        """The engine's time beside the base model's resources, for one token of one layer
        (seconds; ints or broadcasting int arrays of hits per tier)::

            layer_fixed_s + load_C_s·hC + load_S_s·hS + load_E_s·hE + load_miss_s·hmiss

        ``layer_fixed_s``: the per-call work of a one-token MoE layer whose ``k`` experts are
        all F hits, less the base model's matmul term (Python dispatch, routing bookkeeping,
        the fused matmul's cold-cache reads and its serial order on the main thread).
        ``load_<tier>_s``: per expert prepared from that tier, the time the base model misses
        (task set-up, thread hand-offs and wake-ups, decode slowed by the main thread and the
        reads sharing the cores). All are measured by running the engine itself
        (:func:`zipmoe_rt.engine.overhead.measure_engine_terms`, stored by ``zipmoe-rt
        calibrate``) on calls that prepare one expert beside ``k − 1`` F hits, the marginal
        cost of a load (a calibration of version 6 never stores a negative one; older ones
        could). 0 (the default) leaves the base model unchanged.
        """
        return (self.layer_fixed_s + self.load_C_s * np.asarray(hC)
                + self.load_S_s * np.asarray(hS) + self.load_E_s * np.asarray(hE)
                + self.load_miss_s * np.asarray(hmiss))

    def layer_makespan(self, hits: dict) -> float:
        """Makespan in seconds of one layer for one token with ``hits[tier]`` experts per tier.

        Args:
            hits: ``{tier: count}`` over tiers ``"F", "C", "S", "E", "miss"`` (absent = 0).

        Returns:
            ``max(io, compute) + matmul`` as in the class docstring (seconds).

        Raises:
            ValueError: unknown tier or negative / non-integer count.
        """
        unknown = set(hits) - set(TIERS)
        if unknown:
            raise ValueError(f"unknown tiers {sorted(unknown)}; expected {TIERS}")
        h = {t: check_int(hits.get(t, 0), f"hits[{t}]") for t in TIERS}
        if any(v < 0 for v in h.values()):
            raise ValueError(f"negative hit count in {hits}")
        k = sum(h.values())
        if k == 0:
            return 0.0
        dC, xC = self.c_hit_cost(h["C"])
        d = int(dC) + h["S"] + h["E"] + h["miss"]
        io, comp = self.io_and_compute(d, h["E"] + h["miss"], h["S"] + h["miss"])
        base = float(max(io, float(comp))) + float(xC) + self.matmul_time(k)
        return max(0.0, base + float(self.engine_overhead_s(h["C"], h["S"], h["E"], h["miss"])))
