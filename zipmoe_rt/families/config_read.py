"""Reading ``config.json`` values for the family registry: typed getters that name the key at
fault (:class:`ConfigError`), the RoPE parameters in transformers' two spellings (and a partial
rotary factor given beside them), and the MoE
layer list of ``first_k_dense_replace``. Importable without torch and Numba; re-exported by
:mod:`zipmoe_rt.families.hparams`.
"""
from __future__ import annotations

__all__ = ["ConfigError", "config_value", "rope_parameters", "resolve_partial_rotary",
           "config_int", "config_bool", "config_list", "layers_from", "cast_value"]

_MISSING = object()


class ConfigError(ValueError):
    """config.json lacks a required key or has an invalid value (the message names it)."""


def config_value(config: dict, keys, default=_MISSING):
    """The first of ``keys`` present in ``config`` with a non-null value.

    Args:
        config: a parsed config.json.  keys: a key or a sequence of alias keys, in priority order.
        default: returned when none is present; without it the key is required.
    Raises:
        ConfigError: none present and no default (``"config.json: missing a / b"``).
    """
    keys = (keys,) if isinstance(keys, str) else tuple(keys)
    for k in keys:
        if config.get(k) is not None:
            return config[k]
    if default is _MISSING:
        raise ConfigError(f"config.json: missing {' / '.join(keys)}")
    return default


def rope_parameters(config: dict, default_theta: float = 10000.0) -> dict:
    """RoPE settings from either spelling: ``rope_parameters`` (transformers >= 5) or
    ``rope_theta`` + ``rope_scaling`` (transformers 4), as ``PreTrainedConfig`` reads them.

    Args:
        config: a parsed config.json.
        default_theta: the family's ``default_theta`` (used when no rope_theta is given).
    Returns:
        a new dict with at least ``rope_type`` (``"default"`` when unset) and ``rope_theta``
        (float); scaling fields as given (``type`` renamed to ``rope_type``).
    Raises:
        ConfigError: ``rope_parameters`` / ``rope_scaling`` not an object, or a rope_theta
            that is not a number.
    """
    rp = config.get("rope_parameters")
    if rp is not None and not isinstance(rp, dict):
        raise ConfigError(f"config.json: rope_parameters must be an object, not {str(rp)[:40]!r}")
    scaling = config.get("rope_scaling")
    if scaling is not None and not isinstance(scaling, dict):
        raise ConfigError(f"config.json: rope_scaling must be an object, not "
                          f"{str(scaling)[:40]!r}")
    if isinstance(rp, dict) and "rope_theta" in rp:
        out = dict(rp)
    else:
        out = dict(scaling or {})
        out["rope_theta"] = config_value(config, "rope_theta", default_theta)
    t = out.pop("type", None)
    out["rope_type"] = out.get("rope_type") or t or "default"
    theta = out["rope_theta"]
    if isinstance(theta, bool) or not isinstance(theta, (int, float)):
        raise ConfigError(f"config.json: rope_theta must be a number, not {str(theta)[:40]!r}")
    out["rope_theta"] = float(theta)
    return out


def resolve_partial_rotary(rope: dict, config: dict, default: float | None) -> None:
    """Give ``rope`` (from :func:`rope_parameters`) a ``partial_rotary_factor`` where it has
    none: config.json's top-level key, else ``default`` (None: left without one).

    Raises:
        ConfigError: the factor is not a number.
    """
    if "partial_rotary_factor" not in rope:
        prf = config.get("partial_rotary_factor", default)
        if prf is not None:
            rope["partial_rotary_factor"] = prf
    prf = rope.get("partial_rotary_factor")
    if prf is not None and (isinstance(prf, bool) or not isinstance(prf, (int, float))):
        raise ConfigError(f"config.json: partial_rotary_factor must be a number, not "
                          f"{str(prf)[:40]!r}")


_CASTS = {"int": int, "float": float, "bool": bool, "str": str}


def cast_value(field: str, key: str, kind: str, v):
    """config.json value ``v`` of ``key`` as the field's type, refusing what transformers'
    config classes would not hold (a string or a fraction where a count belongs, a bool where a
    number belongs). Raises ConfigError naming the key."""
    if kind == "int":
        if isinstance(v, float) and v.is_integer():
            v = int(v)
        if type(v) is not int:
            raise ConfigError(f"config.json: {key} must be an integer, not {str(v)[:40]!r}")
        return v
    if kind == "float":
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ConfigError(f"config.json: {key} must be a number, not {str(v)[:40]!r}")
        return float(v)
    if kind == "bool":
        if not isinstance(v, bool):
            raise ConfigError(f"config.json: {key} must be true or false, not {str(v)[:40]!r}")
        return v
    if kind == "str" and not isinstance(v, str):
        raise ConfigError(f"config.json: {key} must be a string, not {str(v)[:40]!r}")
    return v


def config_int(config: dict, key: str, default: int, lo: int | None = 0) -> int:
    """config.json's integer ``key`` (``default`` when absent or null; 3.0 reads as 3), for the
    values a family derives from config.json beyond its fields (``decoder_sparse_step``...).
    ``lo`` None: any integer (the caller checks the range).

    Raises:
        ConfigError: not an integer, or (``lo`` given) not in ``lo``..2**31-1 (key named).
    """
    v = config.get(key)
    if v is None:
        return default
    v = cast_value(key, key, "int", v)
    if lo is not None and not lo <= v < 2 ** 31:
        raise ConfigError(f"config.json: {key} {v} is not in {lo}..2**31-1")
    return v


def config_bool(config: dict, key: str, default: bool) -> bool:
    """config.json's boolean ``key`` (``default`` when absent or null).

    Raises:
        ConfigError: not true or false (key named).
    """
    v = config.get(key)
    return default if v is None else cast_value(key, key, "bool", v)


def config_list(config: dict, key: str, kind: str) -> list | None:
    """config.json's ``key`` as a list of ``kind`` (``"int"`` or ``"str"``), None when absent
    or null.

    Raises:
        ConfigError: not a list of such values (key named).
    """
    v = config.get(key)
    if v is None:
        return None
    if not isinstance(v, list):
        raise ConfigError(f"config.json: {key} must be a list, not {str(v)[:40]!r}")
    return [cast_value(key, f"{key}[{i}]", kind, x) for i, x in enumerate(v)]


def layers_from(first_k_dense_replace: int, num_layers: int) -> list[int]:
    """The sparse layers of the DeepSeek lineage: ``first_k_dense_replace .. num_layers - 1``
    (none when ``first_k_dense_replace >= num_layers``), as ``DeepseekV2DecoderLayer`` /
    ``Glm4MoeDecoderLayer`` pick their MoE block (``layer_idx >= first_k_dense_replace``).

    Args:
        first_k_dense_replace: leading dense layers (int >= 0).  num_layers: layers (int).
    Returns:
        list of int layer indices (the ``moe_layers`` field).
    """
    return list(range(min(first_k_dense_replace, num_layers), num_layers))
