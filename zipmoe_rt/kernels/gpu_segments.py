"""Host (Numba) twin of the GPU segment decode kernel of
:mod:`zipmoe_rt.backends.cuda_experts` (the same per-segment loop, for the host device model
:class:`~zipmoe_rt.engine.gpu_ops.HostOps` and the tests of the segment tables), and the bit
offsets the tables of :mod:`zipmoe_rt.engine.gpu_meta` are built from.
"""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def bit_offsets(exps, lengths, at):
    """Bits used by ``exps[:j]`` (code ``lengths`` uint8 [256]) for each ``j`` of ``at``
    (ascending int64): int64 [len(at)]."""
    out = np.empty(at.size, np.int64)
    acc = np.int64(0)
    i = 0
    for j in range(at.size):
        stop = at[j]
        while i < stop:
            acc += lengths[exps[i]]
            i += 1
        out[j] = acc
    return out


@nb.njit(cache=True, nogil=True)
def decode_segments(exp, sm, runs, bits, tabs, seg, out):
    """For each segment ``j`` (``bits[j]``: its first bit in ``exp``) of the run ``r`` holding
    it (``runs[r] = (first segment, end byte, first word, first SM byte, symbols, table)``):
    decode its symbols from that bit (LSB first, 12-bit windows of table ``tabs[table]``:
    ``symbol | length << 8``), reading no byte at or beyond the end byte, and write the BF16
    words ``(sm >> 7) << 15 | e << 7 | sm & 0x7F`` to ``out`` (uint16). format/SPEC.md §5.1,
    §5.3."""
    r = 0
    for j in range(bits.size):
        while r + 1 < runs.shape[0] and runs[r + 1, 0] <= j:
            r += 1
        k0 = np.int64(j - runs[r, 0]) * seg
        cnt = min(np.int64(seg), np.int64(runs[r, 4]) - k0)
        bit = np.int64(bits[j])
        end = np.int64(runs[r, 1])
        w0 = np.int64(runs[r, 2]) + k0
        s0 = np.int64(runs[r, 3]) + k0
        t = runs[r, 5]
        nxt = bit >> 3
        buf = np.uint64(0)
        have = 0
        while have <= 56 and nxt < end:
            buf |= np.uint64(exp[nxt]) << np.uint64(have)
            nxt += 1
            have += 8
        skip = int(bit & 7)
        buf >>= np.uint64(skip)
        have -= skip
        for k in range(cnt):
            while have <= 56 and nxt < end:
                buf |= np.uint64(exp[nxt]) << np.uint64(have)
                nxt += 1
                have += 8
            v = tabs[t, int(buf & np.uint64(4095))]
            ln = int(v >> 8)
            e = np.uint16(v & 0xFF)
            s = np.uint16(sm[s0 + k])
            out[w0 + k] = ((s >> np.uint16(7)) << np.uint16(15)) | (e << np.uint16(7)) | (s & np.uint16(0x7F))
            buf >>= np.uint64(ln)
            have -= ln
