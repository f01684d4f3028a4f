"""The short-convolution operator of hybrid models (LFM2's ``Lfm2MoeShortConv``,
``modeling_lfm2_moe.py``): ``in_proj`` to B, C, x; ``C * conv(B * x)`` with a causal depthwise
convolution of ``L`` taps (``backend.short_conv``); ``out_proj``. It takes an attention layer's
place in the decoder layer (same call, same ``new_cache``); its cache keeps ``B * x`` of every
position (a :class:`~zipmoe_rt.models.cache.LatentCache` of ``hidden_size`` values), so any
prefix can be cropped back to, as with attention.
"""
from __future__ import annotations

import numpy as np

from ..backends import get_backend, to_f32
from .cache import LatentCache


class ShortConv:
    """One short-convolution layer.

    Args:
        w_in: [3H, H] ``in_proj`` weight.  w_conv: [H, 1, L] (or [H, L]) taps.  w_out: [H, H].
        b_in, b_conv, b_out: optional biases ([3H], [H], [H]; ``conv_bias``).
        backend: compute backend (default numba).
    Raises:
        ValueError: shapes that disagree (named).
    """

    def __init__(self, w_in, w_conv, w_out, b_in=None, b_conv=None, b_out=None, backend=None):
        be = self.backend = get_backend(backend)
        H = int(np.shape(w_out)[0])
        taps = to_f32(w_conv).reshape(H, -1) if np.size(w_conv) % H == 0 else None
        if np.shape(w_in) != (3 * H, H) or np.shape(w_out) != (H, H) or taps is None:
            raise ValueError(f"short conv: in_proj {np.shape(w_in)}, conv {np.shape(w_conv)}, "
                             f"out_proj {np.shape(w_out)} disagree")
        self.hidden = H
        self.w_in = be.from_host(np.ascontiguousarray(w_in))
        self.w_out = be.from_host(np.ascontiguousarray(w_out))
        self.taps = be.from_host(np.ascontiguousarray(taps))
        self.b_in, self.b_conv, self.b_out = (None if b is None else be.from_host(to_f32(b))
                                              for b in (b_in, b_conv, b_out))

    def new_cache(self, capacity: int = 256) -> LatentCache:
        """The layer's cache: ``B * x`` (``hidden_size`` float32 values) per position."""
        return LatentCache(self.hidden, capacity, self.backend)

    def __call__(self, x, cache: LatentCache, pos0: int, cos=None, sin=None):
        """x float32 [T, H] at positions pos0.. -> float32 [T, H]; writes ``B * x`` into
        ``cache`` at pos0.. (pending until the model commits; room reserved by the model).
        ``cos`` / ``sin`` are ignored (the attention layers' RoPE tables)."""
        be = self.backend
        bcx = be.linear(x, self.w_in, self.b_in)
        y = be.short_conv(bcx, self.taps, self.b_conv, cache.kv, pos0)
        return be.linear(y, self.w_out, self.b_out)
