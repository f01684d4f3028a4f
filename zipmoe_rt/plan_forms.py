"""How a release encodes each tensor, for ``zipmoe-rt plan`` (:mod:`zipmoe_rt.plan`): which
tensors an FP8 or MXFP4 release quantises, their bytes in the release's files, the bytes the
runtime holds them in (the engine's own :func:`~zipmoe_rt.engine.lowprec.decoded_bytes`), the
measured stored ratios of their ``.zmoe`` encodings, and plan's lines about them.

Importable without torch and Numba (:func:`held_bytes` of a quantised tensor imports the
engine's low-precision module, which imports Numba).
"""
from __future__ import annotations

import math

#: bytes per weight of a BF16 tensor of the source checkpoint.
SOURCE_BYTES_PER_WEIGHT = 2


def mb(n: int) -> str:
    """``n`` bytes as plan prints them (MB to 0.1, GB to 0.01 from 1 GB on)."""
    return f"{n / 1e9:,.2f} GB" if n >= 10 ** 9 else f"{n / 1e6:,.1f} MB"


#: logical keys a quantised release leaves in BF16 although they are 2-D: the embedding, the
#: output head and the router (transformers' FP8 quantizer converts ``nn.Linear`` modules only,
#: and not ``lm_head``; ``DeepseekV3TopkRouter`` is no ``nn.Linear``)
_KEEP_BF16 = ("embed", "lm_head", "router")


#: logical keys whose tensors are F32 in every release (the routers' correction biases, used
#: for the choice of experts only: tensors.KEYS)
_F32_KEYS = ("router_bias", "moe_statics")


def source_form(spec, fp8_block=None, quant: str | None = None) -> str:
    """How a release holds tensor ``spec``: ``"fp8"`` (F8_E4M3 with F32 block scales: the 2-D
    linear weights of an FP8 release, ``fp8_block`` set), ``"mxfp4"`` (FP4 blocks with e8m0
    scales per 32: the expert projections of an MXFP4 release, their biases not), ``"f32"``
    (:data:`_F32_KEYS`) or ``"bf16"``."""
    if spec.key in _F32_KEYS:
        return "f32"
    if fp8_block and len(spec.shape) == 2 and spec.key not in _KEEP_BF16:
        return "fp8"
    if quant == "mxfp4" and spec.is_expert and not spec.role.endswith("_bias"):
        return "mxfp4"
    return "bf16"


def source_bytes(spec, form: str, fp8_block=None) -> int:
    """Bytes of ``spec`` in the release's file: FP8 one per weight plus an F32 scale per
    block, MXFP4 half a byte per weight plus a scale byte per 32, BF16 two."""
    n = math.prod(spec.shape)
    if form == "fp8":
        rows = math.prod(spec.shape[:-1])
        return n + 4 * math.ceil(rows / fp8_block[0]) * math.ceil(spec.shape[-1] / fp8_block[1])
    if form == "mxfp4":
        return n // 2 + math.ceil(n / 32)
    return n * (4 if form == "f32" else SOURCE_BYTES_PER_WEIGHT)


def held_bytes(spec, form: str) -> int:
    """Bytes the runtime holds ``spec`` in once loaded (``load()`` on the CPU), by the engine's
    own accounting: an expert piece's :func:`~zipmoe_rt.engine.lowprec.decoded_bytes` (FP8 and
    MXFP4 dequantised to float32, block scales nothing), a dense FP8 tensor float32 (as
    :meth:`~zipmoe_rt.engine.store.ZmoeSource.dense_bytes` counts it), BF16 two bytes, F32
    four."""
    n = math.prod(spec.shape)
    if form in ("bf16", "f32"):
        return source_bytes(spec, form)
    from types import SimpleNamespace

    from .engine.lowprec import decoded_bytes
    if form == "fp8":
        piece = SimpleNamespace(role=spec.role or "", dtype="F8_E4M3", elements=n)
    else:   # the ``*_blocks`` piece of the file: a byte per two weights
        piece = SimpleNamespace(role=f"{spec.role}_blocks", dtype="U8", elements=n // 2)
    return decoded_bytes(piece)


#: stored bytes of FP8 experts (F8_E4M3 bit-planes with Huffman exponents, F32 128x128 scales)
#: per source byte, measured on the default model's experts quantised to FP8: 6.70 bits per
#: weight of 8.002 (``python tools/bench_lowprec.py``, docs/benchmarks.md "Low-precision
#: sources")
FP8_STORED_RATIO = 6.70 / 8.002


def fp8_line(expert_params: int, block) -> str:
    """The ``plan`` line of an FP8 release (``hparams.fp8_block_size`` set): the experts' FP8
    bytes with their F32 block scales, their expected stored bytes, and what a decoded expert
    takes (float32, engine/lowprec.py)."""
    src = expert_params * (1 + 4 / (block[0] * block[1]))
    return (f"FP8 source  {mb(round(src)):>17}  experts as F8_E4M3 + F32 scales per "
            f"{block[0]}x{block[1]} block; stored at ~{100 * FP8_STORED_RATIO:.1f} % "
            f"({mb(round(src * FP8_STORED_RATIO))}); decoded experts are float32 (4 bytes per "
            f"weight); the BF16 figures above are those of a BF16 copy")


#: stored bytes of MXFP4 experts (blocks as stored, e8m0 scales as U8 bit-planes) per source
#: byte, measured on the default model's experts quantised to MXFP4: 4.04 bits per weight of
#: 4.25 (``python tools/bench_lowprec.py``, docs/benchmarks.md "Low-precision sources")
MXFP4_STORED_RATIO = 4.04 / 4.25


def mxfp4_line(expert_params: int) -> str:
    """The ``plan`` line of an MXFP4 release: the experts' source bytes (half a byte per weight
    and a scale byte per 32), their expected stored bytes, and the float32 decoded form."""
    src = expert_params * (0.5 + 1 / 32)
    return (f"MXFP4 source {mb(round(src)):>16}  experts as FP4 blocks + e8m0 scales per 32; "
            f"stored at ~{100 * MXFP4_STORED_RATIO:.1f} % ({mb(round(src * MXFP4_STORED_RATIO))}"
            f"); decoded experts are float32 (4 bytes per weight); the BF16 figures above are "
            f"those of a BF16 copy")

