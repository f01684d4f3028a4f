"""Host side of the GPU expert path: how an expert's bytes are laid out for one PCIe copy, the
segment tables that let thousands of GPU threads decode its Huffman exponent streams at once,
and the ``--host-budget`` option. No CuPy here (CPU-testable); the GPU side is
:mod:`zipmoe_rt.backends.cuda_experts`.

**Segments.** A Huffman chunk (format/SPEC.md §5.3) has four streams, each a contiguous range of
exponents coded LSB-first. One GPU thread per stream (:mod:`~zipmoe_rt.backends.cuda_planes`) is
correct but serial: an expert of the Qwen3-30B-A3B shape has 48 streams of ~98 K symbols. As
DFloat11 does with its per-thread start table, the runtime records, once per expert, the bit
position of every :data:`SEGMENT`-th symbol of every stream (a host decode of the chunk, then the
running sum of the code lengths: 4 bytes per 256 weights, ~1 % of the compressed expert), so each
GPU thread decodes :data:`SEGMENT` symbols from a known bit and merges them with their
sign+mantissa bytes into BF16 words (one kernel per expert). The table is derived from the
file's own bytes (CRC-checked) and changes nothing in the format.

**Block.** An expert's host block (pinned staging buffer or host cache entry) and its device
copy hold ``[SM region | exponent region | runs | segment bits | decode tables]`` at 256-byte aligned
offsets, so one ``cudaMemcpyAsync`` moves a miss.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from zmoe import huffman
from zmoe.constants import EXP_HUFFMAN

#: symbols decoded by one GPU thread
SEGMENT = 256
#: alignment (bytes) of the parts of a block and of each tensor in a decoded expert
ALIGN = 256
#: int32 fields per run: first segment, end byte of its stream (in the exponent region),
#: first output word, first SM byte, symbol count, decode table index
RUN_FIELDS = 6
_MAX_I32 = (1 << 31) - 1


def _al(n: int) -> int:
    return -(-int(n) // ALIGN) * ALIGN


@dataclass
class ExpertMeta:
    """How to rebuild one expert on the device from its two regions.

    A *run* is a range of consecutive symbols of one Huffman stream whose words are consecutive
    in the output (a stream, or its part before / after the start of an output array); it is
    cut into segments of ``segment`` symbols (the last one shorter), one GPU thread each.

    Attributes:
        runs: int32 [nruns, :data:`RUN_FIELDS`] (empty for a raw expert).
        bits: int32 [nseg]: each segment's first bit in the exponent region.
        tabs: uint16 [ntab, 4096] decode tables, ``symbol | code length << 8`` per 12-bit
            window (LSB first).
        outs: per output array ``(role, first word, shape)`` in the decoded word buffer
            (``gate_up`` pieces are split into ``gate`` and ``up``, each aligned).
        words: uint16 words of the decoded buffer (padding included).
        segment: symbols per segment.
        raw: the expert is stored raw (``raw-lru`` files): ``outs`` index the SM region's
            bytes as uint16 words instead, and nothing is decoded.
    """

    runs: np.ndarray
    bits: np.ndarray
    tabs: np.ndarray
    outs: list
    words: int
    segment: int = SEGMENT
    raw: bool = False

    @property
    def meta_bytes(self) -> int:
        """Bytes of runs + segment bits + tables in a block."""
        return _al(self.runs.nbytes) + _al(self.bits.nbytes) + self.tabs.nbytes


#: the expert roles the GPU path rebuilds: [out, in] matrices, or gpt-oss's in x out slices
#: and biases (rearranged on the GPU after the decode, gpu_engine.assemble)
GPU_ROLE_SETS = ({"gate", "up", "down"}, {"gate_up", "down"},
                 {"gate_up_cols", "down_cols", "gate_up_bias", "down_bias"})


def gpu_decodable(lay) -> bool:
    """Whether the GPU path can rebuild the expert: every piece BF16 with Huffman exponents, or
    every piece raw BF16 (else the engine decodes it on the host and uploads the words), of
    one of the :data:`GPU_ROLE_SETS`."""
    if {p.role for p in lay.pieces} not in GPU_ROLE_SETS:
        return False
    if all(p.raw for p in lay.pieces):
        return all(p.dtype == "BF16" and p.sm[0] % 2 == 0 for p in lay.pieces)
    return all(p.dtype == "BF16" and p.codec == EXP_HUFFMAN and p.chunks for p in lay.pieces)


def block_layout(lay, meta: ExpertMeta | None) -> tuple[int, int, int, int, int]:
    """``(exp offset, runs offset, bits offset, tables offset, total bytes)`` of the expert's
    block (the SM region is at 0)."""
    e0 = _al(lay.sm_region[1])
    r0 = _al(e0 + lay.exp_region[1])
    if meta is None or meta.raw:
        return e0, r0, r0, r0, r0
    b0 = r0 + _al(meta.runs.nbytes)
    t0 = b0 + _al(meta.bits.nbytes)
    return e0, r0, b0, t0, t0 + meta.tabs.nbytes


def meta_bound(lay, segment: int = SEGMENT) -> int:
    """An upper bound of :attr:`ExpertMeta.meta_bytes` for ``lay`` (staging blocks are sized
    before the exponent region is read)."""
    if all(p.raw for p in lay.pieces):
        return 0
    runs = segs = tabs = 0
    for p in lay.pieces:
        for _, _, raw, _ in p.chunks:
            runs += 2 * huffman.STREAMS
            segs += huffman.STREAMS * (-(-raw // (huffman.STREAMS * segment)) + 2)
            tabs += 1
    return _al(runs * RUN_FIELDS * 4) + _al(segs * 4) + tabs * 4096 * 2


def _tables(lengths: np.ndarray) -> np.ndarray:
    """``symbol | length << 8`` of the first code in each 12-bit window (LSB first) of a
    complete canonical code."""
    codes = huffman.canonical_codes(lengths)
    t = np.zeros(1 << huffman.MAX_BITS, np.uint16)
    for s in np.nonzero(lengths)[0]:
        ln = int(lengths[s])
        t[int(codes[s])::1 << ln] = s | (ln << 8)
    return t


def _bit_offsets(exps: np.ndarray, lengths: np.ndarray, at: np.ndarray) -> np.ndarray:
    """Bits used by ``exps[:j]`` for each ``j`` of ``at`` (sorted)."""
    from ..kernels.gpu_segments import bit_offsets
    return bit_offsets(exps, lengths.astype(np.uint8), np.ascontiguousarray(at, np.int64))


def _out_splits(p, base: int, shape) -> tuple[list, list]:
    """Output arrays of one piece: ``[(role, start element in the piece, count, first word,
    shape)]``; ``gate_up`` becomes gate and up, each starting aligned."""
    n = p.elements
    if p.role == "gate_up":
        half = shape[0] // 2
        cut = half * shape[1]
        g = (("gate", 0, cut, base, (half,) + tuple(shape[1:])),)
        u0 = base + _al(2 * cut) // 2
        return list(g) + [("up", cut, n - cut, u0, (shape[0] - half,) + tuple(shape[1:]))], \
            [u0 + _al(2 * (n - cut)) // 2]
    return [(p.role, 0, n, base, tuple(shape))], [base + _al(2 * n) // 2]


def build_meta(lay, exp: np.ndarray | None, segment: int = SEGMENT) -> ExpertMeta:
    """The runs, segment bits and decode tables of one expert, from its exponent region bytes.

    Args:
        lay: the expert's :class:`~zipmoe_rt.engine.layout.ExpertLayout` (must be
            :func:`gpu_decodable`).
        exp: uint8 exponent region (CRC-checked by the caller); ignored for a raw expert.
        segment: symbols per segment (per GPU thread).
    Returns:
        :class:`ExpertMeta`.
    Raises:
        zmoe.huffman.HuffmanError: a malformed chunk (names the tensor and chunk).
        ValueError: regions too large for int32 offsets (> 256 MiB).
    """
    outs, word = [], 0
    if all(p.raw for p in lay.pieces):
        for p in lay.pieces:
            for role, s0, cnt, _, shape in _out_splits(p, 0, p.shape)[0]:
                outs.append((role, p.sm[0] // 2 + s0, shape))
        return ExpertMeta(np.zeros((0, RUN_FIELDS), np.int32), np.zeros(0, np.int32),
                          np.zeros((0, 4096), np.uint16), outs, lay.sm_region[1] // 2,
                          segment, raw=True)
    if 8 * lay.exp_region[1] > _MAX_I32 or lay.sm_region[1] > _MAX_I32:
        raise ValueError(f"expert {lay.layer}/{lay.expert}: regions above 256 MiB are not "
                         f"decoded on the GPU")
    runs, bits, tabs, keys = [], [], [], {}
    for p in lay.pieces:
        splits, nxt = _out_splits(p, word, p.shape)
        word = nxt[0]
        for role, s0, cnt, w0, shape in splits:
            outs.append((role, w0, shape))
        first = 0                                   # first element of the chunk in the piece
        for ci, (o, n, raw, _) in enumerate(p.chunks):
            chunk = exp[o:o + n]
            try:
                lengths, spans = huffman.parse_header(chunk, raw)
                exps = huffman.decode(chunk, raw)
            except huffman.HuffmanError as e:
                raise huffman.HuffmanError(f"tensor {p.name!r}: exponent chunk {ci}: {e}") \
                    from None
            key = chunk[:huffman.LENGTHS_BYTES].tobytes()
            if key not in keys:
                keys[key] = len(tabs)
                tabs.append(_tables(lengths))
            t = keys[key]
            for (so, size), (a, b) in zip(spans, huffman.stream_ranges(raw)):
                if b <= a:
                    continue
                cuts = sorted({a, b} | {s_0 - first for _, s_0, _, _, _ in splits
                                        if a < s_0 - first < b})
                starts = np.concatenate([np.arange(c0, c1, segment)
                                         for c0, c1 in zip(cuts[:-1], cuts[1:])])
                offs = _bit_offsets(exps[a:b], lengths, starts - a)
                seg_of = dict(zip(starts.tolist(), range(len(bits), len(bits) + len(starts))))
                bits.extend((8 * (o + so) + offs).tolist())
                for c0, c1 in zip(cuts[:-1], cuts[1:]):
                    el = first + c0                      # element in the piece
                    w = next(w0 + el - s_0 for _, s_0, c, w0, _ in splits if s_0 <= el < s_0 + c)
                    runs.append((seg_of[c0], o + so + size, w, p.sm[0] + el, c1 - c0, t))
            first += raw
    return ExpertMeta(np.array(runs, np.int32).reshape(-1, RUN_FIELDS),
                      np.array(bits, np.int64).astype(np.int32),
                      np.stack(tabs) if tabs else np.zeros((0, 4096), np.uint16), outs, word,
                      segment)


def pack_meta(meta: ExpertMeta, block: np.ndarray, lay) -> None:
    """Write ``meta``'s runs, bits and tables into their places in an expert's ``block``."""
    _, r0, b0, t0, end = block_layout(lay, meta)
    if meta.raw:
        return
    block[r0:r0 + meta.runs.nbytes] = meta.runs.reshape(-1).view(np.uint8)
    block[b0:b0 + meta.bits.nbytes] = meta.bits.view(np.uint8)
    block[t0:end] = meta.tabs.reshape(-1).view(np.uint8)


def parse_host_budget(text, source) -> int:
    """Bytes of pinned host memory for experts from ``"2GB"``, ``"1.5GiB"``, ``"0"`` or
    ``"40%"`` (a share of the experts' stored bytes in the file: SM + exponent regions, so
    ``100%`` keeps every expert in host memory). The engine counts the regions it keeps against
    it; their segment tables (about 1 % more) ride along.

    Raises:
        ValueError: unreadable text, a negative value or a share outside [0, 100] % (names
            ``host_budget (--host-budget)``).
    """
    opt = "host_budget (--host-budget)"
    if isinstance(text, bool):
        raise ValueError(f"{opt}: expected a size, got {text!r}")
    if isinstance(text, (int, float)):
        if text < 0:
            raise ValueError(f"{opt}: must be 0 or more, got {text!r}")
        return int(text)
    t = str(text).strip().upper().replace(" ", "")
    if t.endswith("%"):
        try:
            frac = float(t[:-1]) / 100
        except ValueError:
            raise ValueError(f"{opt}: cannot read {text!r} (use e.g. 2GB, 1.5GiB, 40%)") from None
        if not 0 <= frac <= 1:
            raise ValueError(f"{opt}: a share must be in [0, 100] %, got {text!r}")
        total = sum(l.sm_region[1] + l.exp_region[1] for l in source.layouts.values())
        return int(frac * total)
    if t in ("0", "0B"):
        return 0
    from ..loading import parse_size
    try:
        return parse_size(t)
    except ValueError as e:
        raise ValueError(str(e).replace("--memory-budget", opt).replace("600MB", "2GB")
                         .replace("25%", "40%")) from None


def pack_expert(mats: dict, chunks: int = 4, min_chunk: int = 1 << 14, layer: int = 0,
                expert: int = 0):
    """An expert held in memory as the converter stores it: each BF16 matrix split into its
    planes (format/SPEC.md §5.1), its exponent plane Huffman-coded in ``chunks`` chunks that
    share the plane's code (§5.2, §5.3), the SM planes and the chunks laid back to back.

    Args:
        mats: role (``gate``, ``up``, ``down``) -> uint16 [out, in] BF16 words.
        chunks, min_chunk: as :func:`zmoe.codec.compress_chunks`.
        layer, expert: the layout's key.
    Returns:
        ``(layout, sm region uint8, exponent region uint8)``: an
        :class:`~zipmoe_rt.engine.layout.ExpertLayout` whose regions start at 0, for
        :func:`build_meta` and the segment decoders (tests, benchmarks).
    """
    from zmoe import codec
    from .layout import ExpertLayout, Piece
    pieces, sms, exps, so, eo = [], [], [], 0, 0
    for role, w in mats.items():
        w = np.ascontiguousarray(w, np.uint16)
        e, s = codec.split_planes(w.reshape(-1), "BF16")
        cs = []
        for c, raw in codec.compress_chunks(e, chunks, min_chunk, exp_codec=EXP_HUFFMAN):
            cs.append((eo, len(c), raw, 0))
            exps.append(np.frombuffer(c, np.uint8))
            eo += len(c)
        pieces.append(Piece(f"experts.{expert}.{role}", role, "BF16", tuple(w.shape),
                            (so, s.size, 0), tuple(cs), EXP_HUFFMAN))
        sms.append(s)
        so += s.size
    lay = ExpertLayout(layer, expert, (0, so), (0, eo), tuple(pieces))
    return lay, np.concatenate(sms), np.concatenate(exps) if exps else np.zeros(0, np.uint8)
