"""Machine calibration (design note §3): this machine's delay-model constants for a model.

:func:`calibrate` measures them on the model's own experts (SM read, exponent read from a cold
page cache, decode of one expert on one worker, one expert's matmul); they are stored next to the
model as ``MODEL.calib.json``. :func:`load_checked_calibration` reads that file back and warns
(:class:`CalibrationWarning`) when it does not fit the run (:func:`calibration_mismatch`);
:func:`delay_model` turns a calibration into the planner's :class:`DelayModel`.
"""
from __future__ import annotations

import json
import os
import platform
import shlex
import time
import warnings
from pathlib import Path

import numpy as np

from . import layout as L_
from .io import IO_DEPTH, RegionReader, check_io_depth, evict_page_cache
from .planner import DelayModel
from .trace import TraceError, sidecar

CALIB_SUFFIX = ".calib.json"
#: version :func:`calibrate` writes. 2: each sample's exponent region is read before its SM
#: region, as the engine reads a missing expert (version 1 read SM first, so read-ahead served
#: part of the exponent read and timed it 2-5x too cheap). 3: reads are also timed ``io_depth``
#: at a time, as the engine issues them, and priced at that throughput (version 2 priced reads
#: one at a time). 4: the engine's per-layer and per-load overheads are measured too
#: (:mod:`~zipmoe_rt.engine.overhead`). 5: the C tier's engine load term is timed on
#: storage-form C slots, which the base delay model prices with a decode per hit (version 4
#: could time it on compute-form slots, a term that does not fit that price). 6: each load term
#: is fitted on calls that load ONE expert beside ``k − 1`` F hits, the read price on the
#: overlap of a call's further reads, with a first-read latency ``read_first_s`` (version 5
#: fitted the load terms on calls whose ``k`` experts all load: the reads' overlap went into a
#: negative per-load term, and a call loading one expert was priced too cheaply).
CALIB_VERSION = 6
#: the first version whose engine terms :func:`delay_model` applies (older ones' are ignored)
ENGINE_TERMS_VERSION = 6
#: what was wrong with each older calibration version
_OLD_VERSIONS = {1: "timed exponent reads 2-5x too cheap", 2: "timed reads one at a time",
                 3: "did not measure the engine's per-layer and per-load overheads",
                 4: "may have timed the C tier's engine load on compute-form C slots",
                 5: "fitted the engine's load terms on calls whose k experts all load, which "
                    "prices a call loading one expert too cheaply (its engine terms are "
                    "ignored)"}


class CalibrationWarning(UserWarning):
    """A stored machine calibration does not fit this run (older version, other read mode,
    other machine); the plan is made with it anyway. Filter it with :mod:`warnings`."""


def calibrate(source, samples: int = 12, direct: bool = False, seed: int = 0,
              io_depth: int | None = None, backend=None, max_bytes: int | None = None) -> dict:
    """Measure the delay-model constants on this machine for this model (medians, seconds).

    Reads ``samples`` random experts' regions from a cold page cache, decodes them on one
    thread, and times one expert's matmul for one token. Also measures how decoding scales with
    concurrent workers (``decode_speedup``: {workers: speedup over one}), since zstd + merge
    rarely scale linearly (shared memory bandwidth, Python between chunks).

    Reads are timed twice from a cold cache: one at a time (``sm_read_qd1_s``,
    ``exp_read_qd1_s``: the latency of one read), then ``io_depth`` at a time with both regions
    of each sample in flight, as the engine reads misses. The planner's single I/O channel is
    priced at the second pass's throughput: ``sm_read_s``/``exp_read_s`` are the one-at-a-time
    medians divided by ``io_speedup`` (bytes per second with ``io_depth`` in flight over one at
    a time, at least 1).

    Then the engine itself is timed on one-token calls that load one expert of each tier
    beside F hits, and on calls whose ``k`` experts all miss
    (:func:`~zipmoe_rt.engine.overhead.measure_engine_terms`, compressed experts on the CPU
    backend only): ``layer_fixed_s``, ``read_first_s`` and ``load_C_s`` / ``load_S_s`` /
    ``load_E_s`` / ``load_miss_s``, the delay model's engine terms, with ``engine_layer_s``
    (the measured calls) and ``engine_workers``. Where the ``k``-miss calls measure the
    overlap of reads, the read prices ``sm_read_s``/``exp_read_s`` are the engine's (a further
    miss's regions at the throughput its calls reached) and ``io_speedup`` the one-at-a-time
    time over that price; the read pass's own figure is kept as ``io_speedup_reads``.

    The result records ``version`` (:data:`CALIB_VERSION`, 6: exponent region read before the
    SM region, as the engine reads a miss, reads timed ``io_depth`` at a time, engine load
    terms fitted on one-load calls, the read overlap on the k-miss calls),
    ``direct`` (whether reads were timed with O_DIRECT), ``io_depth``, ``machine``
    (``platform.node()``) and ``cpus`` (``os.cpu_count()``), which
    :func:`calibration_mismatch` compares with the run that uses it.

    ``backend`` (default numba) is the compute backend the matmul is timed on (``--device``;
    a device backend uploads the decoded expert, as a budgeted run does, and the time includes
    the upload and a synchronisation).

    ``max_bytes``: a bound on what the engine-term scenarios hold together (a calibration
    inside a run under a memory budget: the budget's experts' share); where not even one
    layer's scenarios fit, the result has no engine terms. It also bounds the sample experts
    (their regions and decode transients, :func:`sample_bytes`): fewer than ``samples`` are
    measured where they would not fit (at least two).

    Raises:
        ValueError: ``io_depth`` below 1.
    """
    from concurrent.futures import ThreadPoolExecutor
    from ..backends import get_backend
    import zstandard as zstd

    io_depth = check_io_depth(io_depth)   # before any I/O
    lays = list(source.layouts.values())
    rng = np.random.default_rng(seed)
    pick = [lays[i] for i in rng.choice(len(lays), min(samples, len(lays)), replace=False)]
    counts = sorted({w for w in (1, 2, 4, 8, 16) if w <= (os.cpu_count() or 1)}
                    | {os.cpu_count() or 1})
    if max_bytes is not None:   # the samples' regions and transients within the bound
        pick = pick[:sample_count(pick, max_bytes, io_depth, max(counts))]
    evict_page_cache(source.path)
    rr = RegionReader(source.path, direct=direct)
    sm_t, exp_t, dec_t, mm_t, bufs = [], [], [], [], []
    for lay in pick:
        # exponents first, as the engine reads a missing expert: the exponent region follows
        # the SM region in the file, so reading SM first would let the kernel's read-ahead
        # serve part of the exponent read and make it look ~2x cheaper than it is
        t0 = time.perf_counter()
        exp = rr.read(*lay.exp_region)
        t1 = time.perf_counter()
        sm = rr.read(*lay.sm_region)
        t2 = time.perf_counter()
        exp_t.append(t1 - t0)
        sm_t.append(t2 - t1)
        bufs.append((lay, sm, exp))
    io_speedup = 1.0
    if io_depth > 1:   # the same reads again, io_depth in flight (exponents, then SM, queued)
        evict_page_cache(source.path)
        t0 = time.perf_counter()
        with ThreadPoolExecutor(io_depth) as pool:
            # each copy dropped once read: io_depth of them at a time, not one per sample
            list(pool.map(lambda r: len(rr.read(*r)), [r for lay in pick
                                                       for r in (lay.exp_region, lay.sm_region)]))
        wall = time.perf_counter() - t0
        io_speedup = max(1.0, (sum(sm_t) + sum(exp_t)) / max(wall, 1e-9))
    rr.close()
    dctx = zstd.ZstdDecompressor()
    be = get_backend(backend)
    x = be.from_host(np.random.default_rng(1).standard_normal(
        source.hparams["hidden_size"]).astype(np.float32))
    for rep in range(2):
        for lay, sm, exp in bufs:
            t0 = time.perf_counter()
            w = L_.decode_expert(source.path, lay, sm, exp, dctx)
            t1 = time.perf_counter()
            out = be.zeros(x.shape)
            be.experts_token(out, x, [w], np.ones(1, np.float32))
            be.synchronize()
            t2 = time.perf_counter()
            if rep:  # first pass warms the JIT
                dec_t.append(t1 - t0)
                mm_t.append(t2 - t1)
    def decode_all(items):
        d = zstd.ZstdDecompressor()
        for lay, sm, exp in items:
            L_.decode_expert(source.path, lay, sm, exp, d)

    jobs = [[b] for b in bufs] * 2
    times = {}
    for w in counts:
        with ThreadPoolExecutor(w) as pool:
            best = float("inf")
            for _ in range(2):
                t0 = time.perf_counter()
                list(pool.map(decode_all, jobs))
                best = min(best, time.perf_counter() - t0)
        times[w] = best
    speedup = {str(w): float(times[1] / times[w]) for w in counts}
    lay0 = pick[0]
    cform = compute_form_costs(source, bufs, be, float(np.median(mm_t)))
    out = {**cform, "version": CALIB_VERSION, "decode_speedup": speedup, "machine": platform.node(),
            "cpus": os.cpu_count(), "direct": direct, "io_depth": io_depth,
            "io_speedup": float(io_speedup),
            "sm_read_s": float(np.median(sm_t)) / io_speedup,
            "exp_read_s": float(np.median(exp_t)) / io_speedup,
            "sm_read_qd1_s": float(np.median(sm_t)), "exp_read_qd1_s": float(np.median(exp_t)),
            "decode_s": float(np.median(dec_t)), "matmul_s": float(np.median(mm_t)),
            "bytes_F": int(lay0.full_bytes), "bytes_sm": int(lay0.sm_region[1]),
            "bytes_exp": int(lay0.exp_region[1]),
            "chunks": max(1, len(lay0.jobs)),
            "read_GBps": float(sum(l.sm_region[1] + l.exp_region[1] for l, _, _ in bufs)
                               / max(sum(sm_t) + sum(exp_t), 1e-9) / 1e9),
            "decode_Gweights_per_s": float(lay0.elements / np.median(dec_t) / 1e9)}
    terms = _engine_terms(source, out, direct, io_depth, backend, max_bytes)
    if "sm_read_s" in terms:
        out["io_speedup_reads"] = out["io_speedup"]
        out["io_speedup"] = float(out["sm_read_qd1_s"] / terms["sm_read_s"])
    out.update(terms)
    return out


def sample_bytes(pick, io_depth: int, workers: int) -> int:
    """Bytes :func:`calibrate` holds at most while it measures the sample experts ``pick``:
    their read regions (kept for the whole measurement) and the larger of its transients, the
    ``io_depth`` regions in flight in the second read pass or the experts decoded at once
    (``workers`` in the decode-scaling pass, and the BF16 and compute forms of one in
    :func:`compute_form_costs`)."""
    if not pick:
        return 0
    region = max(max(l.sm_region[1], l.exp_region[1]) for l in pick)
    full = max(l.full_bytes for l in pick)
    return (sum(l.sm_region[1] + l.exp_region[1] for l in pick)
            + max(io_depth * region, max(workers, 2) * full))


def sample_count(pick, max_bytes: int, io_depth: int, workers: int) -> int:
    """How many of the sample experts ``pick`` (a prefix) :func:`calibrate` measures within
    ``max_bytes`` (:func:`sample_bytes`); at least two (one warms the JIT) where ``pick`` has
    them, even where they do not fit."""
    n = len(pick)
    while n > 2 and sample_bytes(pick[:n], io_depth, workers) > max_bytes:
        n -= 1
    return n


def _engine_terms(source, calib, direct, io_depth, backend, max_bytes=None) -> dict:
    """The engine terms of the delay model (:func:`~zipmoe_rt.engine.overhead.measure_engine_terms`,
    the run's default of one decode worker per core); none for a file with raw experts or on a
    device backend (whose engine is another)."""
    from .overhead import measure_engine_terms
    raw = all(p.raw for l in source.layouts.values() for p in l.pieces)
    if raw or getattr(backend, "name", backend) not in (None, "numba"):
        return {}
    workers = os.cpu_count() or 1
    return measure_engine_terms(source, delay_model(calib, workers), workers, direct=direct,
                                io_depth=io_depth, max_bytes=max_bytes,
                                max_read_s=calib["sm_read_qd1_s"] + calib["exp_read_qd1_s"])


def compute_form_costs(source, bufs, backend, matmul_s: float) -> dict:
    """The compute form's costs on sample experts (design note §6.5; the C tier computed in
    place and ``--resident compressed`` under a budget, engine/ctier.py): medians over the
    packable samples, seconds, on one thread for the transcode.

    Args:
        source: the model's :class:`~zipmoe_rt.engine.store.ZmoeSource` (its path).
        bufs: ``[(layout, sm region, exponent region)]`` of sample experts, read.
        backend: the compute backend the matmuls are timed on.
        matmul_s: the BF16 matmul time of one expert for one token measured beside.
    Returns:
        ``{}`` without packable samples, else ``c_matmul_s`` (``matmul_s`` times the median
        ratio of the packed to the BF16 matmul of the same expert, each the best of three
        runs: the ratio is steadier on a busy machine than either time), ``transcode_s`` (read
        regions to compute form: decode the exponents into a plane and transcode) and
        ``escape_share`` (the largest share of escapes in any sample).
    """
    from .resident import pack_expert, packable
    import zstandard as zstd
    dctx = zstd.ZstdDecompressor()
    ratios, trans, share = [], [], 0.0
    x = backend.from_host(np.random.default_rng(2).standard_normal(
        source.hparams["hidden_size"]).astype(np.float32))
    one = np.ones(1, np.float32)
    for lay, sm, exp in bufs:
        if not packable(lay):
            continue
        t0 = time.perf_counter()
        P = pack_expert(source.path, lay, sm, exp, dctx)
        trans.append(time.perf_counter() - t0)
        W = L_.decode_expert(source.path, lay, sm, exp, dctx)
        share = max(share, sum(m.n_escapes for m in (P.gate, P.up, P.down)) / lay.elements)
        best = {}
        for _ in range(3):
            for name, w in (("bf16", W), ("packed", P)):
                out = backend.zeros(x.shape)
                t0 = time.perf_counter()
                backend.experts_token(out, x, [w], one)
                backend.synchronize()
                best[name] = min(best.get(name, np.inf), time.perf_counter() - t0)
        ratios.append(best["packed"] / max(best["bf16"], 1e-9))
    if not ratios:
        return {}
    return {"c_matmul_s": float(matmul_s * np.median(ratios)),
            "transcode_s": float(np.median(trans[1:] or trans)),   # the first warms the JIT
            "escape_share": float(share)}


#: keys every calibration needs, all positive numbers (what :func:`delay_model` reads)
_CALIB_NUMBERS = ("sm_read_s", "exp_read_s", "decode_s", "matmul_s", "bytes_F", "bytes_sm",
                  "bytes_exp")


def load_calibration(path) -> dict | None:
    """The calibration dict stored at ``path``, or None when there is no such file.

    Raises:
        TraceError: the file is not UTF-8 JSON, not an object, lacks one of the delay-model
            constants (:data:`_CALIB_NUMBERS`, positive numbers), or has a ``version``,
            ``io_depth``, ``chunks`` that is not an integer or a ``decode_speedup`` that is not
            an object of numbers. The message names the file and says to re-run
            ``zipmoe-rt calibrate``.
    """
    path = Path(path)
    if not path.exists():
        return None

    def bad(why):
        return TraceError(f"{path}: not a valid calibration file ({why}); re-run "
                          f"`zipmoe-rt calibrate` on the model")
    try:
        calib = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise bad(e) from None
    if not isinstance(calib, dict):
        raise bad(f"expected a JSON object, got {type(calib).__name__}")
    for k in _CALIB_NUMBERS:
        v = calib.get(k)
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
            raise bad(f"{k!r} must be a positive number, got {v!r}")
    for k in ("version", "io_depth", "chunks", "cpus"):
        v = calib.get(k)
        if v is not None and (isinstance(v, bool) or not isinstance(v, int)):
            raise bad(f"{k!r} must be an integer, got {v!r}")
    sp = calib.get("decode_speedup")
    if sp is not None:
        try:
            if not isinstance(sp, dict) or not all(float(v) > 0 and int(k) > 0
                                                   for k, v in sp.items()):
                raise ValueError
        except (TypeError, ValueError):
            raise bad(f"'decode_speedup' must map worker counts to speedups, got {sp!r}") from None
    return calib


def _read_mode(direct) -> str:
    return "O_DIRECT reads" if direct else "buffered (page-cache) reads"


def calibration_mismatch(calib: dict, direct: bool, io_depth: int | None = None) -> list[str]:
    """Why a calibration (a :func:`calibrate` dict) does not fit a run on this machine.

    Args:
        calib: the calibration, as :func:`load_calibration` returns it (validated: an integer
            ``version`` if any).
        direct: whether this run reads expert regions with O_DIRECT.
        io_depth: reads this run keeps in flight (default :data:`~zipmoe_rt.engine.io.IO_DEPTH`);
            compared with the calibration's ``io_depth`` when it has one.

    Returns:
        Human-readable reasons, one per mismatch (empty: the calibration fits): a ``version``
        older than :data:`CALIB_VERSION` (or none); reads timed in the other mode than
        ``direct`` (a missing ``direct`` counts as buffered); ``cpus`` other than
        ``os.cpu_count()``; ``machine`` other than ``platform.node()`` (only when both are
        known).
    """
    reasons = []
    v = calib.get("version")
    if v is None:
        reasons.append(f"it has no version (current {CALIB_VERSION}): an older zipmoe-rt wrote it")
    elif v < CALIB_VERSION:
        reasons.append(f"it was written by an older zipmoe-rt (calibration version {v}, current "
                       f"{CALIB_VERSION}), which {_OLD_VERSIONS.get(v, 'measured differently')}")
    elif v > CALIB_VERSION:
        reasons.append(f"it was written by a newer zipmoe-rt (calibration version {v}, this one "
                       f"reads {CALIB_VERSION})")
    if bool(calib.get("direct")) != bool(direct):
        reasons.append(f"it timed {_read_mode(calib.get('direct'))}, this run uses "
                       f"{_read_mode(direct)}")
    depth = check_io_depth(io_depth)
    if calib.get("io_depth") is not None and int(calib["io_depth"]) != depth:
        reasons.append(f"it timed reads {calib['io_depth']} at a time, this run keeps {depth} in "
                       f"flight")
    cpus = calib.get("cpus")
    if cpus is not None and cpus != os.cpu_count():
        reasons.append(f"it was measured with {cpus} CPUs, this machine has {os.cpu_count()}")
    machine, node = calib.get("machine"), platform.node()
    if machine and node and machine != node:
        reasons.append(f"it was measured on machine {machine!r}, this is {node!r}")
    return reasons


def load_checked_calibration(model_path, direct: bool, stacklevel: int = 1,
                             io_depth: int | None = None) -> dict | None:
    """The calibration stored next to ``model_path`` (``MODEL.calib.json``), or None if absent.

    When it does not fit this run (:func:`calibration_mismatch`), emits one
    :class:`CalibrationWarning` naming the file, the reasons and the command that refreshes
    it (``zipmoe-rt calibrate MODEL``, plus ``--direct`` when ``direct``); the calibration is
    returned all the same. ``stacklevel`` is as for :func:`warnings.warn`, counted from the
    caller of this function.

    Raises:
        TraceError: the file is not valid JSON.
    """
    path = sidecar(model_path, CALIB_SUFFIX)
    calib = load_calibration(path)
    reasons = calibration_mismatch(calib, direct, io_depth) if calib is not None else []
    if reasons:
        fix = "zipmoe-rt calibrate " + shlex.quote(str(model_path)) + (" --direct" if direct else "")
        if check_io_depth(io_depth) != IO_DEPTH:
            fix += f" --io-depth {check_io_depth(io_depth)}"
        warnings.warn(f"{path}: this calibration does not fit the run: {'; '.join(reasons)}. "
                      f"The plan uses it anyway; to fix, run: {fix}", CalibrationWarning,
                      stacklevel=stacklevel + 1)
    return calib


def effective_workers(calib: dict, workers: int) -> int:
    """How many workers' worth of decoding ``workers`` threads really deliver (from the measured
    ``decode_speedup``; the planner's L). Without a measurement: ``workers``."""
    sp = {int(k): v for k, v in (calib.get("decode_speedup") or {}).items()}
    if not sp:
        return int(workers)
    below = [w for w in sp if w <= workers]
    s = sp[max(below)] if below else 1.0
    return int(max(1, min(workers, round(s))))


def delay_model(calib: dict, workers: int) -> DelayModel:
    """Planner :class:`DelayModel` from a calibration dict; L is the measured effective
    parallelism of ``workers`` decode threads (:func:`effective_workers`), and the engine terms
    (per-layer and per-load overheads, :mod:`~zipmoe_rt.engine.overhead`) are the
    calibration's, when it has them (measured with ``engine_workers`` decode workers) and its
    version is at least :data:`ENGINE_TERMS_VERSION` (an older one's terms were fitted
    otherwise and are ignored; :func:`calibration_mismatch` says so)."""
    from .overhead import apply_engine_terms
    v = calib.get("version")
    terms = {} if isinstance(v, int) and v < ENGINE_TERMS_VERSION else calib
    return apply_engine_terms(
        DelayModel(sm_read_s=calib["sm_read_s"], exp_read_s=calib["exp_read_s"],
                   decode_s=calib["decode_s"], matmul_s=calib["matmul_s"],
                   workers=effective_workers(calib, workers),
                   bytes_F=calib["bytes_F"], bytes_sm=calib["bytes_sm"],
                   bytes_exp=calib["bytes_exp"], chunks=calib.get("chunks", 1)), terms)

