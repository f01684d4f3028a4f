"""The gated short convolution of LFM2 (transformers ``models/lfm2_moe/modeling_lfm2_moe.py``
``Lfm2MoeShortConv``; the same block in ``models/lfm2/modeling_lfm2.py``): ``in_proj`` to
``B, C, x``, a depthwise causal conv1d over ``B * x`` (kernel ``conv_L_cache``, no activation),
``out_proj(C * conv)``. Its state, the last ``L - 1`` inputs of the convolution, lives in a
:class:`~zipmoe_rt.models.cache.RecurrentCache` (no recurrent part), which does not grow with
the sequence. Every op runs through the backend (:mod:`zipmoe_rt.backends`); the convolution is
the backend's ``conv1d_silu`` without its SiLU.
"""
from __future__ import annotations

import numpy as np

from ..backends import get_backend, to_f32
from .cache import RecurrentCache


class ShortConv:
    """``Lfm2MoeShortConv``: ``B, C, x = split(in_proj(h))``, ``y = C * conv1d(B * x)``,
    ``out_proj(y)``, the conv1d continuing the inputs held in the cache.

    Args:
        args: the family's HParams (``hidden_size``, ``conv_l_cache``).  layer: index.
        w_in: [3H, H] (B rows, C rows, x rows).  conv: [H, 1, L] or [H, L].  w_out: [H, H].
        b_in: None or [3H].  b_conv: None or [H].  b_out: None or [H] (``conv_bias``).
        backend: compute backend.
    Raises:
        ValueError: a weight of another shape than the hyper-parameters give (named).
    """

    def __init__(self, args, layer: int, w_in, conv, w_out, b_in=None, b_conv=None, b_out=None,
                 backend=None):
        be = self.backend = get_backend(backend)
        self.layer = layer
        H = self.H = args.hidden_size
        self.L = args.conv_l_cache
        conv = to_f32(conv).reshape(np.shape(conv)[0], -1)
        want = {"in_proj": ((3 * H, H), w_in), "conv": ((H, self.L), conv),
                "out_proj": ((H, H), w_out), "in_proj bias": ((3 * H,), b_in),
                "conv bias": ((H,), b_conv), "out_proj bias": ((H,), b_out)}
        for name, (shape, w) in want.items():
            if w is not None and tuple(np.shape(w)) != shape:
                raise ValueError(f"layer {layer}: short conv {name} has shape "
                                 f"{tuple(np.shape(w))}, expected {shape}")
        self.w_in, self.w_out = (be.linear_weight(w) for w in (w_in, w_out))
        self.conv = be.from_host(conv)
        self.b_in, self.b_conv, self.b_out = (None if b is None else be.from_host(to_f32(b))
                                              for b in (b_in, b_conv, b_out))

    def new_cache(self, capacity: int = 256) -> RecurrentCache:
        """An empty :class:`~zipmoe_rt.models.cache.RecurrentCache` (conv state [L - 1, H], no
        recurrent state); ``capacity`` is ignored (the state does not grow)."""
        return RecurrentCache((self.L - 1, self.H), (0,), self.backend)

    def state_values(self) -> int:
        """Values one copy of this layer's state holds: ``(L - 1) H``."""
        return (self.L - 1) * self.H

    def __call__(self, x, cache: RecurrentCache, pos0: int, cos=None, sin=None):
        """x float32 [T, H] -> float32 [T, H]; reads ``cache``'s committed conv state and
        writes the state after these tokens into its pending buffer (the model commits).
        ``pos0``, ``cos``, ``sin`` are unused (no positions in a convolution)."""
        be, H = self.backend, self.H
        bcx = be.linear(x, self.w_in, self.b_in)
        conv_next, _ = cache.pending()
        y = be.conv1d_silu(be.mul(bcx[:, :H], bcx[:, 2 * H:]), self.conv, cache.conv,
                           conv_next, silu=False, bias=self.b_conv)
        return be.linear(be.mul(bcx[:, H:2 * H], y), self.w_out, self.b_out)
