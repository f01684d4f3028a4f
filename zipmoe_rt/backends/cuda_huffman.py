"""The parallel Huffman stream decoder of the CUDA backend (kernels and method:
:mod:`zipmoe_rt.kernels.cuda_huffman_src`): one thread per segment of :data:`SEG_BITS` bits of a
stream instead of one thread per stream, byte for byte the host decoder's output
(:func:`zmoe.huffman.decode`) with the same acceptance of a stream.

Used by :func:`zipmoe_rt.backends.cuda_planes.decode_exponents` once the chunk headers have been
checked on the host. Its passes find each segment's exact start bit and symbol count; the
symbols are then written by the staged multi-symbol kernel it shares with the engine's segment
decode (:func:`zipmoe_rt.backends.cuda_segdec.write_streams`; ``hf_write`` with :data:`STAGED`
off). Imports CuPy.
"""
from __future__ import annotations

import numpy as np

import cupy as cp

from ..kernels import cuda_huffman_src
from . import cuda_segdec

#: bits per segment (one thread each); codewords are at most 12 bits. 2048: the fastest of
#: 512-2048 with the staged write pass (docs/benchmarks.md §12).
SEG_BITS = 2048
#: :func:`zipmoe_rt.backends.cuda_planes.decode_exponents` decodes with :func:`decode_streams`
#: (False: its one-thread-per-stream kernel, for comparison)
PARALLEL = True
#: the write pass: the staged multi-symbol kernel of :mod:`~zipmoe_rt.backends.cuda_segdec`
#: (False: ``hf_write``, one symbol per lookup, one byte per thread and store)
STAGED = True
_T = 256
_MADE: dict = {}


def _kernels() -> dict:
    """The compiled kernels of the current device (compiled once per device)."""
    dev = cp.cuda.runtime.getDevice()
    if dev not in _MADE:
        mod = cp.RawModule(code=cuda_huffman_src.SOURCE, options=("-std=c++14",))
        _MADE[dev] = {n: mod.get_function(n) for n in cuda_huffman_src.KERNELS}
    return _MADE[dev]


def decode_streams(src, rows: np.ndarray, sym, bits, out, seg_bits: int | None = None):
    """Decode Huffman streams into ``out``.

    Args:
        src: device uint8 buffer holding the streams.
        rows: host int64 [n, 5+]: per stream its byte offset in ``src``, its size in bytes,
            its first output index, its symbol count and its table index.
        sym, bits: device uint8 [tables * 4096]: per table, the symbol and the code length of
            the first code in each 12-bit window (LSB first).
        out: device uint8, written at each stream's output range.
        seg_bits: bits per segment (default :data:`SEG_BITS`; small values force many
            resynchronisation passes).
    Returns:
        host int32 [n]: 0 for a stream that decodes to exactly its symbols within exactly its
        bytes (bits past the end read as 0), 3 otherwise (:data:`zmoe.huffman.DECODE_STATUS`).
    """
    k = _kernels()
    seg_bits = int(seg_bits or SEG_BITS)
    n = rows.shape[0]
    s_size, o_count = rows[:, 1], rows[:, 3]
    nseg_s = -(-8 * s_size // seg_bits)                    # 0 for an empty stream
    seg_first = np.concatenate([[0], np.cumsum(nseg_s)]).astype(np.int64)
    nseg = int(seg_first[-1])
    status = np.zeros(n, np.int32)
    total = np.zeros(n, np.int64)
    if nseg:
        per = cp.asarray(np.ascontiguousarray(rows[:, :5], np.int64).T.copy())   # [5, n]
        s_src, s_sz, o_base, o_cnt = per[0], per[1], per[2], per[3]
        tab = per[4].astype(cp.int32)
        first = cp.asarray(seg_first)
        start = cp.empty(nseg, cp.int64)
        ends = [cp.empty(nseg, cp.int64), cp.empty(nseg, cp.int64)]
        cnt = cp.empty(nseg, cp.int32)
        changed = cp.zeros(1, cp.int32)
        grid = ((nseg + _T - 1) // _T,)
        common = (src, s_src, s_sz, tab, first, np.int32(n))

        def seg_pass(pass0, e_old, e_new):
            k["hf_segments"](grid, (_T,), (*common, np.int64(seg_bits), bits, start, e_old,
                                           e_new, cnt, changed, np.int64(nseg),
                                           np.int32(pass0)))
        seg_pass(1, ends[1], ends[0])
        for p in range(int(nseg_s.max())):    # pass p makes segment p of each stream exact
            changed.fill(0)
            seg_pass(0, ends[p % 2], ends[1 - p % 2])
            if not int(changed.get()[0]):
                break
        incl = cp.cumsum(cnt.astype(cp.int64))
        dev_status = cp.zeros(n, cp.int32)
        if STAGED:
            tabs = (sym.astype(cp.uint16) | (bits.astype(cp.uint16) << 8)).reshape(-1, 4096)
            cuda_segdec.write_streams(src, s_src, s_sz, tab, seg_first, start, cnt, incl,
                                      o_base, o_cnt, tabs, out, dev_status)
        else:
            k["hf_write"](grid, (_T,), (*common, sym, bits, start, cnt, incl, o_base, o_cnt,
                                        out, dev_status, np.int64(nseg)))
        status = cp.asnumpy(dev_status)
        last = seg_first[1:] - 1                  # each stream's last segment (or before it)
        upto = np.where(last >= 0, cp.asnumpy(incl[cp.asarray(np.maximum(last, 0))]), 0)
        total = np.diff(np.concatenate([[0], upto]))      # symbols decoded per stream
    status[(total < o_count) | ((o_count == 0) & (s_size != 0))] = 3
    return status
