"""Host (Numba) twin of the GPU segment decode kernel of
:mod:`zipmoe_rt.backends.cuda_experts`: the same per-segment loop, for the host device model
(:class:`~zipmoe_rt.engine.gpu_ops.HostOps`) and the tests of the segment tables
(:mod:`zipmoe_rt.engine.gpu_meta`).
"""
from __future__ import annotations

import numba as nb
import numpy as np


@nb.njit(cache=True, nogil=True)
def decode_segments(exp, sm, rows, tabs, out):
    """For each row ``(bit, end, w0, s0, count, table)`` of ``rows`` (int32 [n, 6]): decode
    ``count`` Huffman symbols of ``exp`` (uint8) from bit ``bit`` (LSB first, 12-bit windows
    of table ``tabs[table]``: ``symbol | length << 8``), reading no byte at or beyond ``end``,
    and write the BF16 words ``(sm >> 7) << 15 | e << 7 | sm & 0x7F`` with the SM bytes
    ``sm[s0:s0 + count]`` to ``out[w0:w0 + count]`` (uint16). format/SPEC.md §5.1, §5.3."""
    for r in range(rows.shape[0]):
        bit = np.int64(rows[r, 0])
        end = np.int64(rows[r, 1])
        w0 = np.int64(rows[r, 2])
        s0 = np.int64(rows[r, 3])
        cnt = np.int64(rows[r, 4])
        t = rows[r, 5]
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
