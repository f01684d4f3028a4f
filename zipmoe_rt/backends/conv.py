"""The short causal convolution of LFM2's conv layers as plain array code for any NumPy-like
module (``numpy`` on the host backends, ``cupy`` on the CUDA one): see
:meth:`Backend.short_conv <zipmoe_rt.backends.base.Backend.short_conv>`."""
from __future__ import annotations


def short_conv_xp(xp, bcx, w, b, hist, pos0: int):
    """``C * (conv(B * x) + b)`` of ``Lfm2MoeShortConv.forward`` for tokens at ``pos0..``.

    Args:
        xp: the array module (numpy or cupy).
        bcx: float32 [T, 3H], ``in_proj`` output: B, C, x (``chunk(3)`` order).
        w: float32 [H, L] taps (``conv.weight[:, 0, :]``; cross-correlation, as ``F.conv1d``).
        b: None or float32 [H] (``conv.bias``).
        hist: float32 [capacity, H], the layer's ``B * x`` of every position; rows ``pos0 ..
            pos0 + T - 1`` are written here, rows before ``pos0`` read (zeros before 0, the
            convolution's left padding).
        pos0: position of the first token.
    Returns:
        float32 [T, H].
    Raises:
        ValueError: shapes disagree or ``hist`` lacks room.
    """
    T = bcx.shape[0]
    H, L = w.shape
    if bcx.shape[1] != 3 * H or hist.shape[1] != H or hist.shape[0] < pos0 + T:
        raise ValueError(f"short_conv: bcx {tuple(bcx.shape)}, taps {tuple(w.shape)}, history "
                         f"{tuple(hist.shape)} at {pos0} + {T} disagree")
    hist[pos0:pos0 + T] = bcx[:, :H] * bcx[:, 2 * H:]
    lo = pos0 - (L - 1)
    seq = hist[max(lo, 0):pos0 + T]
    if lo < 0:
        seq = xp.concatenate([xp.zeros((-lo, H), xp.float32), seq])
    out = xp.zeros((T, H), xp.float32)
    for j in range(L):
        out += w[:, j] * seq[j:j + T]
    if b is not None:
        out += b
    return bcx[:, H:2 * H] * out
