"""The staged segment decoder on CUDA (kernels and method: :mod:`zipmoe_rt.kernels.cuda_segdec_src`):
Huffman exponent streams decoded from known start bits with multi-symbol lookups, staged in
shared memory and written coalesced. Two entry points share its kernels:

- :func:`decode_runs`: an expert's BF16 words from its SM and exponent regions and its segment
  tables (:mod:`zipmoe_rt.engine.gpu_meta`), the engine's GPU decode
  (:class:`~zipmoe_rt.backends.cuda_experts.CudaOps`);
- :func:`decode_batch`: :func:`decode_runs` for several experts in one launch (the misses of
  one MoE layer call), through a descriptor of their addresses, optionally launched before
  their copies have landed (each block waits for its experts' copies);
- :func:`write_streams`: the write pass of the self-synchronising decoder behind
  ``decode_exponents`` (:mod:`zipmoe_rt.backends.cuda_huffman`), once its passes have found each
  segment's start bit and symbol count.

Both give the host decoder's bytes (:func:`zipmoe_rt.kernels.gpu_segments.decode_segments`,
:func:`zmoe.huffman.decode`). Imports CuPy.
"""
from __future__ import annotations

import numpy as np

import cupy as cp

from ..kernels import cuda_segdec_src

#: compile-time variants: name -> (threads per block, symbols per round, table in shared memory)
VARIANTS = {"t128": (128, 256, 0), "t256": (256, 128, 0), "t128r128": (128, 128, 0),
            "t512": (512, 64, 0), "t64s": (64, 128, 1)}
#: the variant :func:`decode_runs` and :func:`write_streams` use unless told
DEFAULT = "t128"
_MADE: dict = {}


def kernels(variant: str | None = None) -> tuple[dict, int, int]:
    """``(kernels by name, threads per block, symbols per round)`` of a variant of
    :data:`VARIANTS`, compiled once per device.

    Raises:
        KeyError: an unknown variant (names it).
    """
    v = variant or DEFAULT
    if v not in VARIANTS:
        raise KeyError(f"segment decoder variant {v!r}: expected one of {sorted(VARIANTS)}")
    t, rnd, smem = VARIANTS[v]
    key = (cp.cuda.runtime.getDevice(), v)
    if key not in _MADE:
        mod = cp.RawModule(code=cuda_segdec_src.SOURCE,
                           options=("-std=c++14", f"-DSD_T={t}", f"-DSD_ROUND={rnd}",
                                    f"-DSD_SMEM_TAB={smem}"))
        _MADE[key] = ({n: mod.get_function(n) for n in cuda_segdec_src.KERNELS}, t, rnd)
    return _MADE[key]


def multi_tables(tabs, variant: str | None = None):
    """Multi-symbol decode tables on the device.

    Args:
        tabs: device uint16 [ntab, 4096]: ``symbol | length << 8`` of the first code in each
            12-bit window (LSB first) of a complete code.
    Returns:
        device uint64 [ntab * 4096] (layout: :mod:`zipmoe_rt.kernels.cuda_segdec_src`).
    """
    k, _, _ = kernels(variant)
    n = int(tabs.shape[0]) * 4096
    multi = cp.empty(max(n, 1), cp.uint64)
    if n:
        k["sd_multi_tables"](((n + 255) // 256,), (256,), (tabs, multi, np.int32(tabs.shape[0])))
    return multi


def decode_runs(exp, sm, runs, bits, tabs, seg: int, out, variant: str | None = None,
                multi=None) -> None:
    """Decode an expert's segments into BF16 words, on the current stream.

    Args:
        exp: device uint8 exponent region.  sm: device uint8 SM region (one byte per word).
        runs: device int32 [nruns, 6]: per run its first segment, the end byte of its stream in
            ``exp``, its first word in ``out``, its first byte in ``sm``, its symbol count and
            its table (:class:`~zipmoe_rt.engine.gpu_meta.ExpertMeta`).
        bits: device int32 [nseg]: each segment's first bit in ``exp``.
        tabs: device uint16 [ntab, 4096] single-symbol tables.
        seg: symbols per segment (the last of a run holds fewer).
        out: device uint16, written at each run's words.
        variant: a name of :data:`VARIANTS` (default :data:`DEFAULT`).
        multi: :func:`multi_tables` of ``tabs`` if already made (else made here).
    """
    n = int(bits.shape[0])
    if not n:
        return
    k, t, _ = kernels(variant)
    if multi is None:
        multi = multi_tables(tabs, variant)
    k["sd_decode_runs"](((n + t - 1) // t,), (t,),
                        (exp, sm, runs, np.int32(runs.shape[0]), bits, tabs, multi,
                         np.int32(seg), out, np.int32(n)))


def decode_batch(desc, n: int, nseg: int, ntab: int, seg: int, multi,
                 variant: str | None = None, landed=None) -> None:
    """Decode the segments of ``n`` experts in one launch (and build their multi-symbol tables
    in one more), on the current stream.

    Args:
        desc: device int64 [(n + 1) * BATCH_FIELDS]: per expert its first segment in the batch,
            the addresses of its exponent region, SM region, runs (int32 [nruns, 6] as in
            :func:`decode_runs`), run count, segment bits (int32), single-symbol tables (uint16
            [ntab, 4096]), its first table in ``multi`` and its output words (uint16); the last
            row holds ``nseg`` and ``ntab`` in fields 0 and 7
            (:data:`~zipmoe_rt.kernels.cuda_segdec_src.BATCH_FIELDS`).
        nseg, ntab: total segments and tables.  seg: symbols per segment.
        multi: device uint64 [>= ntab * 4096], written with the multi-symbol tables.
        variant: a name of :data:`VARIANTS`.
        landed: None, or a device uint32 word the copy stream writes each copied expert's
            sequence number into once its bytes have landed: the decode does not wait for the
            copies on the stream but block by block (``sd_decode_batch_wait``); rows with
            field 9 >= 0 are those copies (their tables are not counted in ``ntab``).
    """
    if not nseg:
        return
    k, t, _ = kernels(variant)
    if ntab:
        k["sd_multi_batch"](((ntab * 4096 + 255) // 256,), (256,), (desc, np.int32(n), multi))
    grid = ((nseg + t - 1) // t,)
    if landed is None:
        k["sd_decode_batch"](grid, (t,), (desc, np.int32(n), multi, np.int32(seg)))
    else:
        k["sd_decode_batch_wait"](grid, (t,), (desc, np.int32(n), multi, np.int32(seg), landed,
                                               np.uint32(cuda_segdec_src.SEQ_MASK),
                                               np.int64(cuda_segdec_src.WAIT_POLLS)))


def write_streams(src, s_src, s_size, tab, seg_first, start, cnt, incl, o_base, o_count,
                  tabs, out, status, variant: str | None = None, multi=None) -> None:
    """The write pass of :func:`zipmoe_rt.backends.cuda_huffman.decode_streams`: every segment's
    symbols (exact start bits and counts from its synchronisation passes) to their place in
    ``out``, each stream's end checked.

    Args:
        src: device uint8 streams.  s_src, s_size: device int64 [n]: each stream's byte offset
            in ``src`` and size.  tab: device int32 [n] table per stream.
        seg_first: host int64 [n + 1]: first segment of each stream (prefix sums).
        start: device int64 [nseg] exact start bits.  cnt: device int32 [nseg] symbol counts.
        incl: device int64 [nseg] inclusive prefix sums of ``cnt``.
        o_base, o_count: device int64 [n]: each stream's first output byte and symbol count.
        tabs: device uint16 [ntab, 4096] single-symbol tables.
        out: device uint8.  status: device int32 [n], set to 3 for a stream whose last symbol
            does not end in its last byte.
        variant: a name of :data:`VARIANTS`.  multi: :func:`multi_tables` of ``tabs`` if
            already made.
    """
    nseg = int(seg_first[-1])
    if not nseg:
        return
    k, t, rnd = kernels(variant)
    if multi is None:
        multi = multi_tables(tabs, variant)
    counts = np.diff(seg_first)
    sq = cp.asarray(np.repeat(np.arange(counts.size, dtype=np.int32), counts))
    excl = incl - cnt.astype(cp.int64)
    first = cp.asarray(np.minimum(seg_first[:-1], nseg - 1))   # (empty streams: no segment)
    before = excl - excl[first][sq]
    rounds = (int(cnt.max().get()) + rnd - 1) // rnd
    k["sd_decode_streams"](((nseg + t - 1) // t,), (t,),
                           (src, s_src, s_size, tab, sq, start, cnt, before, o_base, o_count,
                            tabs, multi, out, status, np.int64(nseg), np.int32(rounds)))
