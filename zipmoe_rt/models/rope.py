"""Rotary position embeddings: inverse frequencies of the RoPE variants (transformers'
``modeling_rope_utils.py``) and the cos/sin tables of a run of positions (``*RotaryEmbedding``
of the modeling files). Host numpy; the tables are small and go through the backend's
``from_host``.
"""
from __future__ import annotations

import math

import numpy as np

from ..families.hparams import HParams


# ---------------------------------------------------------------------------------------------
# RoPE (modeling_rope_utils.py)


def rotary_dim(args: HParams) -> int:
    """``dim = int(head_dim * partial_rotary_factor)`` (the factor from ``args.rope``, 1.0 when
    absent), as ``modeling_rope_utils.py`` computes it: the frequencies are
    ``base ** -(arange(0, dim, 2) / dim)``, ``ceil(dim / 2)`` of them, and the first
    ``2 * ceil(dim / 2)`` dimensions of each head turn (one more than ``dim`` when it is odd, as
    transformers' tables are that wide).

    Raises:
        ValueError: a factor that is not a number in (0, 1], or one that gives no dimension.
    """
    prf = (args.rope or {}).get("partial_rotary_factor", 1.0)
    if prf is None:
        prf = 1.0
    if isinstance(prf, bool) or not isinstance(prf, (int, float)) or not 0 < prf <= 1:
        raise ValueError(f"rope.partial_rotary_factor: {str(prf)[:40]!r} is not a number in "
                         f"(0, 1]")
    dim = int(args.head_dim * float(prf))
    if dim < 1 or 2 * ((dim + 1) // 2) > args.head_dim:
        raise ValueError(f"rope.partial_rotary_factor {prf} gives {dim} rotary dimensions of "
                         f"head_dim {args.head_dim}")
    return dim


def rope_inv_freq(args: HParams, seq_len: int | None = None) -> tuple[np.ndarray, float]:
    """Inverse frequencies and the cos/sin scale, as transformers' ``ROPE_INIT_FUNCTIONS``.

    Supports rope_type ``default``, ``linear``, ``llama3``, ``yarn`` and ``longrope`` (float32
    arithmetic in the same order as ``modeling_rope_utils.py``), each with
    ``partial_rotary_factor``: only the first ``rotary_dim = int(head_dim *
    partial_rotary_factor)`` dimensions of a head rotate (``Glm4MoeRotaryEmbedding``,
    ``apply_rotary_pos_emb`` of ``modeling_glm4_moe.py``), and the frequencies are those of a
    head of ``rotary_dim``. ``longrope`` (``_compute_longrope_parameters``):
    ``inv_freq = 1 / (ext * theta ** (2i / hd))`` with ``ext`` = ``long_factor`` when
    ``seq_len > original_max_position_embeddings``, else ``short_factor`` (also when
    ``seq_len`` is None); the scale is ``attention_factor``, by default
    ``sqrt(1 + ln(factor) / ln(original))`` (1 when ``factor <= 1``), ``factor`` defaulting to
    ``max_position_embeddings / original``.

    Args:
        args: a family's :class:`~zipmoe_rt.families.HParams`; uses ``rope`` (rope_theta,
            partial_rotary_factor, factor, ...), ``head_dim``, ``max_position_embeddings``.
        seq_len: the current sequence length in tokens (only ``longrope`` reads it).
    Returns:
        (inv_freq float32 [ceil(rotary_dim / 2)] in radians per position, attention_scaling
        float).
    Raises:
        ValueError: an unsupported rope_type, a partial_rotary_factor outside (0, 1] or giving
            no rotary dimension (:func:`rotary_dim`), an odd rotary dimension with yarn,
            missing keys, or longrope factors that are not ``head_dim / 2`` positive numbers.
    """
    rp = args.rope or {}
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
    base = float(rp.get("rope_theta", 10000.0))
    if rtype == "proportional":
        return proportional_inv_freq(args), 1.0
    dim = rotary_dim(args)
    f32 = np.float32
    expo = np.arange(0, dim, 2, dtype=np.int64).astype(np.float32) / f32(dim)
    pos_freqs = np.power(f32(base), expo, dtype=np.float32)
    inv = (f32(1.0) / pos_freqs).astype(np.float32)
    try:
        if rtype == "default":
            return inv, 1.0
        if rtype == "linear":
            return (inv / f32(rp["factor"])).astype(np.float32), 1.0
        if rtype == "llama3":
            factor = float(rp["factor"])
            lo, hi = float(rp["low_freq_factor"]), float(rp["high_freq_factor"])
            old = float(rp["original_max_position_embeddings"])
            lo_wl, hi_wl = old / lo, old / hi
            wavelen = (f32(2 * math.pi) / inv).astype(np.float32)
            inv_l = np.where(wavelen > lo_wl, inv / f32(factor), inv).astype(np.float32)
            smooth = ((f32(old) / wavelen - f32(lo)) / f32(hi - lo)).astype(np.float32)
            smoothed = ((f32(1) - smooth) * inv_l / f32(factor) + smooth * inv_l).astype(np.float32)
            medium = ~(wavelen < hi_wl) & ~(wavelen > lo_wl)
            return np.where(medium, smoothed, inv_l).astype(np.float32), 1.0
        if rtype == "yarn":
            if dim % 2:         # transformers' ramp (dim // 2) would not fit the frequencies
                raise ValueError(f"rope_parameters: yarn needs an even rotary dimension, not "
                                 f"{dim} (partial_rotary_factor)")
            orig = float(rp.get("original_max_position_embeddings") or args.max_position_embeddings)
            factor = rp.get("factor")
            factor = float(factor) if factor is not None else args.max_position_embeddings / orig
            attn = rp.get("attention_factor")
            mscale, mscale_all = rp.get("mscale"), rp.get("mscale_all_dim")

            def get_mscale(scale, m=1.0):
                return 1.0 if scale <= 1 else 0.1 * m * math.log(scale) + 1.0

            if attn is None:
                if mscale and mscale_all:
                    attn = float(get_mscale(factor, mscale) / get_mscale(factor, mscale_all))
                else:
                    attn = get_mscale(factor)
            beta_fast = rp.get("beta_fast") or 32
            beta_slow = rp.get("beta_slow") or 1

            def corr_dim(rot):
                return (dim * math.log(orig / (rot * 2 * math.pi))) / (2 * math.log(base))

            low, high = corr_dim(beta_fast), corr_dim(beta_slow)
            if rp.get("truncate", True):
                low, high = math.floor(low), math.ceil(high)
            low, high = max(low, 0), min(high, dim - 1)
            if low == high:
                high += 0.001
            ramp = np.clip((np.arange(dim // 2, dtype=np.float32) - f32(low)) / f32(high - low),
                           0, 1).astype(np.float32)
            extra = (f32(1) - ramp).astype(np.float32)
            inv_interp = (f32(1.0) / (f32(factor) * pos_freqs)).astype(np.float32)
            inv_y = (inv_interp * (f32(1) - extra) + inv * extra).astype(np.float32)
            return inv_y, float(attn)
        if rtype == "longrope":
            orig = float(rp["original_max_position_embeddings"])
            factor = rp.get("factor")
            factor = float(factor) if factor is not None else args.max_position_embeddings / orig
            attn = rp.get("attention_factor")
            if attn is None:
                attn = 1.0 if factor <= 1.0 else math.sqrt(1 + math.log(factor) / math.log(orig))
            key = "long_factor" if seq_len and seq_len > orig else "short_factor"
            ext = longrope_factors(rp, key, dim)
            return (f32(1.0) / (ext * pos_freqs)).astype(np.float32), float(attn)
    except KeyError as e:
        raise ValueError(f"rope_parameters: {rtype} needs {e.args[0]!r}") from None
    raise ValueError(f"rope_type {rtype!r} is not supported (default, linear, llama3, yarn, "
                     f"longrope)")


def proportional_inv_freq(args: HParams) -> np.ndarray:
    """Proportional RoPE (``_compute_proportional_rope_parameters`` of transformers'
    ``modeling_rope_utils.py``; Gemma 4's full-attention layers): ``head_dim / 2`` frequencies
    for the whole head, of which the first ``n = int(partial_rotary_factor * head_dim // 2)``
    are ``theta ** -(2i / head_dim)`` (exponents over the *whole* head width, unlike
    ``partial_rotary_factor`` elsewhere) and the rest 0 (cos 1, sin 0: those pairs do not
    turn); all divided by ``factor`` (1 when absent). Applied with ``rotate_half`` over the
    whole head, pairs ``(i, i + head_dim/2)``.

    Args:
        args: :class:`~zipmoe_rt.families.HParams` with ``rope`` (``rope_theta``,
            ``partial_rotary_factor``, ``factor``) and ``head_dim``.
    Returns:
        float32 [head_dim / 2] inverse frequencies in radians per position.
    Raises:
        ValueError: a ``partial_rotary_factor`` outside [0, 1] or a ``factor`` that is not a
            positive number.
    """
    rp = args.rope or {}
    f32 = np.float32
    base = float(rp.get("rope_theta", 10000.0))
    prf = rp.get("partial_rotary_factor", 1.0)
    prf = 1.0 if prf is None else prf
    factor = rp.get("factor", 1.0)
    factor = 1.0 if factor is None else factor
    for name, v, lo in (("partial_rotary_factor", prf, 0.0), ("factor", factor, None)):
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or (
                v < 0 or v > 1 if lo is not None else v <= 0):
            raise ValueError(f"rope.{name}: {str(v)[:40]!r} is out of range for proportional "
                             f"RoPE")
    hd = int(args.head_dim)
    n = int(float(prf) * hd // 2)
    expo = np.arange(0, 2 * n, 2, dtype=np.int64).astype(np.float32) / f32(hd)
    # the power in float64, rounded once: within an ulp of torch's float32 pow
    pw = np.power(float(base), expo.astype(np.float64)).astype(np.float32)
    inv = (f32(1.0) / pw).astype(np.float32)
    inv = np.concatenate([inv, np.zeros(hd // 2 - n, np.float32)])
    return (inv / f32(factor)).astype(np.float32)


def longrope_factors(rp: dict, key: str, dim: int) -> np.ndarray:
    """``rp[key]`` (``short_factor`` / ``long_factor``) as float32 [dim / 2].

    Raises:
        KeyError: ``key`` absent.  ValueError: not a list of ``dim / 2`` positive finite numbers
            (named ``rope.<key>``).
    """
    v = rp[key]
    ok = isinstance(v, (list, tuple)) and len(v) == dim // 2 and all(
        not isinstance(x, bool) and isinstance(x, (int, float)) and math.isfinite(x) and x > 0
        for x in v)
    if not ok:
        raise ValueError(f"rope.{key}: expected {dim // 2} positive numbers (head_dim / 2), "
                         f"got {str(v)[:60]!r}")
    return np.asarray(v, dtype=np.float32)


class RoPE:
    """Rotary embedding tables for positions, as ``MixtralRotaryEmbedding.forward``:
    ``freqs = float32(pos) * inv_freq``; ``cos = cos(freqs) * attention_scaling`` (same for sin).
    Applied with ``rotate_half`` to the first ``rotary_dim`` dimensions of each head (pairs
    ``i`` and ``i + rotary_dim/2``), the rest left as they are (``rotary_dim`` = ``head_dim``
    unless ``partial_rotary_factor`` < 1; the backends read it from the tables' width).

    ``longrope`` has two *regimes*, chosen on the length ``pos0 + T`` of the sequence a forward
    call ends with (transformers' ``seq_len = max(position_ids) + 1``): 0 while it is at most
    ``original_max_position_embeddings``, 1 beyond. By default the regime picks the frequencies
    (short or long factors) as ``dynamic_rope_update`` does, with the one ``attention_factor``
    scale. ``PhimoeRotaryEmbedding.forward`` (transformers 5.25) differs, and a family passes
    what it does: ``switch_freqs=False`` keeps the short factors at every length, and
    ``mscale=(short_mscale, long_mscale)`` replaces the scale per regime. Keys cached in one
    regime are wrong in the other: :meth:`regime` lets the model recompute them
    (:meth:`~zipmoe_rt.models.model.Model.forward`).

    Args:
        args: the family's :class:`~zipmoe_rt.families.HParams`.
        switch_freqs: longrope: use the long factors in regime 1.
        mscale: None, or (scale of regime 0, scale of regime 1) replacing ``attention_factor``.
    Attributes:
        inv_freq, scaling: regime 0's frequencies (float32 [head_dim / 2]) and scale.
        original: longrope's ``original_max_position_embeddings``, else None (one regime).
    Raises:
        ValueError: from :func:`rope_inv_freq`; an ``mscale`` that is not two positive numbers.
    """

    def __init__(self, args: HParams, switch_freqs: bool = True,
                 mscale: tuple[float, float] | None = None):
        rp = args.rope or {}
        rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
        self.inv_freq, self.scaling = rope_inv_freq(args)
        self.original = None
        self._tables = [(self.inv_freq, self.scaling)]
        if rtype == "longrope":
            self.original = int(rp["original_max_position_embeddings"])
            inv_long, scale_long = (rope_inv_freq(args, self.original + 1) if switch_freqs
                                    else (self.inv_freq, self.scaling))
            self._tables.append((inv_long, scale_long))
        if mscale is not None:
            if len(mscale) != 2 or not all(isinstance(m, (int, float)) and not isinstance(
                    m, bool) and math.isfinite(m) and m > 0 for m in mscale):
                raise ValueError(f"mscale: expected two positive numbers, got {mscale!r}")
            self._tables = [(inv, float(m)) for (inv, _), m in zip(self._tables, mscale)]
            self.scaling = self._tables[0][1]

    def regime(self, seq_len: int) -> int:
        """0, or 1 for a longrope sequence of ``seq_len`` tokens past
        ``original_max_position_embeddings``."""
        return int(self.original is not None and seq_len > self.original)

    def cos_sin(self, pos0: int, T: int) -> tuple[np.ndarray, np.ndarray]:
        """Tables for positions ``pos0 .. pos0+T-1`` in the regime of a sequence of ``pos0 + T``
        tokens: (cos, sin), each float32 [T, rotary_dim/2]."""
        inv_freq, scaling = self._tables[self.regime(pos0 + T)]
        pos = np.arange(pos0, pos0 + T, dtype=np.float32)
        freqs = pos[:, None] * inv_freq[None, :]
        cos, sin = np.cos(freqs), np.sin(freqs)
        if scaling != 1.0:
            cos *= np.float32(scaling)
            sin *= np.float32(scaling)
        return np.ascontiguousarray(cos, np.float32), np.ascontiguousarray(sin, np.float32)


def interleaved_to_halves(n: int) -> np.ndarray:
    """The order of ``n`` rotary dimensions (``n`` even) that turns interleaved RoPE (pairs
    ``(2i, 2i+1)``: DeepSeek's complex product / ``apply_rotary_pos_emb_interleave``, ERNIE 4.5's
    ``rotate_half`` on stacked pairs) into half-split RoPE (pairs ``(i, i + n/2)``, transformers'
    ``rotate_half``): ``[0, 2, ..., n-2, 1, 3, ..., n-1]`` (int64 [n]). Permuting the rows of the
    q and k projections by it leaves every q.k dot product unchanged.
    """
    return np.concatenate([np.arange(0, n, 2), np.arange(1, n, 2)])


def yarn_mscale(scale: float, mscale: float = 1.0) -> float:
    """YaRN's magnitude factor ``0.1 * mscale * ln(scale) + 1`` (1 for ``scale <= 1``), as
    transformers' ``yarn_get_mscale`` (``modeling_rope_utils.py``)."""
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


def softmax_scale(args: HParams, qk_head_dim: int) -> float:
    """The attention score scale ``qk_head_dim ** -0.5``, times ``yarn_mscale(factor,
    mscale_all_dim) ** 2`` when the rope is not the default one and sets ``mscale_all_dim``
    (transformers' ``yarn_apply_mscale``, used by the DeepSeek-V2/V3 and GLM-4-MoE-Lite
    attention: YaRN scales every q/k dimension, not only the rotary ones).

    Args:
        args: a family's :class:`~zipmoe_rt.families.HParams` (``rope``).
        qk_head_dim: the width of one query/key head (elements).
    Returns:
        the scale as a Python float (the caller narrows it to float32).
    Raises:
        ValueError: ``mscale_all_dim`` set without a ``factor``.
    """
    scale = qk_head_dim ** -0.5
    rp = args.rope or {}
    rtype = rp.get("rope_type", rp.get("type", "default")) or "default"
    if rtype != "default" and rp.get("mscale_all_dim"):
        if rp.get("factor") is None:
            raise ValueError("rope_parameters: mscale_all_dim needs 'factor'")
        m = yarn_mscale(float(rp["factor"]), float(rp["mscale_all_dim"]))
        scale = scale * m * m
    return scale
