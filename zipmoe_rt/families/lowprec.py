"""Low-precision checkpoints in the family registry: reading a config.json
``quantization_config`` (transformers ``utils/quantization_config.py``,
``FineGrainedFP8Config``: ``quant_method: fp8``, ``weight_block_size`` default ``(128, 128)``,
``activation_scheme`` default ``dynamic``, ``scale_fmt`` default ``float``) into the
``fp8_block_size`` hyper-parameter that the converter stores and the runtime dequantises with
(zipmoe_rt/engine/lowprec.py).
"""
from __future__ import annotations

from .hparams import ConfigError

#: transformers' ``FineGrainedFP8Config.weight_block_size`` default
DEFAULT_FP8_BLOCK = [128, 128]


def fp8_block_size(config: dict) -> list | None:
    """The ``[rows, cols]`` weight block of an FP8 checkpoint's ``quantization_config``, or None
    when config.json has none.

    Accepted: ``quant_method`` ``fp8``; ``fmt`` (when given) ``e4m3``; ``activation_scheme``
    ``dynamic`` (the default; static activation scales are not read); ``scale_fmt`` ``float``
    (F32 ``weight_scale_inv``; the default); ``weight_block_size`` two positive integers
    (default ``[128, 128]``).

    Raises:
        ConfigError: naming config.json, ``quantization_config`` and the field at fault.
    """
    q = config.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"config.json: quantization_config {str(q)[:40]!r} is not an object")
    method = q.get("quant_method")
    if method != "fp8":
        raise ConfigError(f"config.json: quantization_config.quant_method {str(method)[:40]!r} "
                          f"is not supported (fp8 with block scales only)")
    for key, want in (("fmt", "e4m3"), ("activation_scheme", "dynamic"), ("scale_fmt", "float")):
        v = q.get(key, want)
        if v != want:
            raise ConfigError(f"config.json: quantization_config.{key} {str(v)[:40]!r} is not "
                              f"supported ({want} only)")
    block = q.get("weight_block_size", DEFAULT_FP8_BLOCK)
    if (not isinstance(block, (list, tuple)) or len(block) != 2
            or not all(type(b) is int and 1 <= b <= 1 << 20 for b in block)):
        raise ConfigError(f"config.json: quantization_config.weight_block_size "
                          f"{str(block)[:40]} is not two integers in 1..2**20")
    return [int(block[0]), int(block[1])]


def check_fp8_block_size(v) -> None:
    """A stored ``fp8_block_size``: None or two integers in 1..2**20.

    Raises:
        ValueError: naming the field.
    """
    if v is not None and (not isinstance(v, list) or len(v) != 2
                          or not all(type(b) is int and 1 <= b <= 1 << 20 for b in v)):
        raise ValueError(f"fp8_block_size: {str(v)[:40]!r} is not two integers in 1..2**20")
