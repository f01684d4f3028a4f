"""The family registry: :class:`Family`, :func:`register` and the lookups.

A family is a :class:`Family` subclass registered under the Hugging Face ``architectures[0]``
names it handles (llama.cpp's converter style). Its class attributes are the single list of what
the project knows about it: names (runtime family, HF architectures, transformers config class,
``model_type``, runtime model module), typed hyper-parameters with transformers' defaults and
their config.json mapping (:attr:`Family.hparams_class`), and its tensor name table
(:attr:`Family.tensors`, :attr:`Family.fused_tensors`) from which tensor specs and the converter's
expert patterns are derived. An instance binds a config.json (what the converter works with).

Importable without torch and Numba.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from . import tensors as T
from .hparams import HParams

#: HF ``architectures[0]`` -> family class.
ARCHITECTURES: dict[str, type["Family"]] = {}
#: runtime family name -> family class.
BY_NAME: dict[str, type["Family"]] = {}


class UnsupportedArchitectureError(ValueError):
    """The checkpoint's ``architectures[0]`` is not registered (the message lists those that are)."""


class UnknownFamilyError(ValueError):
    """No family of that name is registered (the message lists those that are)."""


@dataclass(frozen=True)
class ExpertRef:
    """Where a checkpoint tensor sits among the experts.

    Attributes:
        layer: decoder layer index.
        expert: expert index, or None for an expert-stacked tensor ([E, ...], axis 0 = expert).
        role: "gate", "up", "down" (SwiGLU projections) or "gate_up" (gate rows then up rows).
    """

    layer: int
    expert: int | None
    role: str


def register(*hf_names: str):
    """Class decorator: register a :class:`Family` under HF ``architectures`` names.

    Raises:
        ValueError: a name or the family name is already registered to another class.
    """
    def deco(cls):
        for n in hf_names:
            if ARCHITECTURES.get(n, cls) is not cls:
                raise ValueError(f"architecture {n!r} is already registered")
        if BY_NAME.get(cls.family, cls) is not cls:
            raise ValueError(f"family {cls.family!r} is already registered")
        cls.hf_names = tuple(hf_names)
        ARCHITECTURES.update((n, cls) for n in hf_names)
        BY_NAME[cls.family] = cls
        return cls
    return deco


def family_names() -> list[str]:
    """Registered runtime family names, sorted."""
    return sorted(BY_NAME)


def all_families() -> list[type["Family"]]:
    """Registered family classes, sorted by family name."""
    return [BY_NAME[n] for n in family_names()]


def get_family(name: str) -> type["Family"]:
    """The family class registered as ``name`` (e.g. ``"qwen2_moe"``).

    Raises:
        UnknownFamilyError: unknown name (lists the supported ones).
    """
    cls = BY_NAME.get(name)
    if cls is None:
        raise UnknownFamilyError(f"unsupported model family {name!r}; supported: "
                                 f"{', '.join(family_names())}")
    return cls


def family_for_architecture(hf_name: str) -> type["Family"]:
    """The family class of an HF architecture name (e.g. ``"MixtralForCausalLM"``).

    Raises:
        UnsupportedArchitectureError: unknown name (lists the supported ones).
    """
    cls = ARCHITECTURES.get(hf_name)
    if cls is None:
        raise UnsupportedArchitectureError(
            f"unsupported architecture {hf_name!r}; supported: {', '.join(sorted(ARCHITECTURES))}")
    return cls


def get_architecture(config: dict) -> "Family":
    """The registered family for an HF config dict, bound to it.

    Raises:
        UnsupportedArchitectureError: unknown or missing ``architectures`` (lists supported ones),
            or one that is not a list of names.
    """
    archs = config.get("architectures") or []
    if not archs:
        raise UnsupportedArchitectureError("config.json has no 'architectures' entry")
    if not isinstance(archs, list) or not isinstance(archs[0], str):
        raise UnsupportedArchitectureError(f"config.json: architectures must be a list of names, "
                                           f"not {str(archs)[:60]!r}")
    return family_for_architecture(archs[0])(config)


class Family:
    """Base class of a family. Subclasses set the class attributes and register themselves.

    Class attributes:
        family: runtime family name (``hparams["family"]``).
        hf_names: HF ``architectures`` names (set by :func:`register`).
        model_type: config.json ``model_type``.
        hf_config_class: transformers config class name (e.g. ``"MixtralConfig"``).
        model_module: module under ``zipmoe_rt/models/`` that runs the family.
        hparams_class: the family's :class:`~.hparams.HParams` subclass.
        tensors: logical key (:data:`~.tensors.KEYS`) -> name template, HUB layout, in
            checkpoint order (embedding, per layer: norms, attention, MoE / MLP; final norm,
            head). A family whose Hub checkpoints store the experts stacked (Granite's
            ``input_linear`` [E, 2I, H]) lists the stacked keys instead of the per-expert ones.
        fused_tensors: the names that differ in transformers 5's FUSED layout.

    Args:
        config: a parsed config.json (``architectures[0]`` one of :attr:`hf_names`).
    Attributes:
        config: the dict.  name: ``architectures[0]``.
    """

    family: ClassVar[str] = ""
    hf_names: ClassVar[tuple] = ()
    model_type: ClassVar[str] = ""
    hf_config_class: ClassVar[str] = ""
    model_module: ClassVar[str] = ""
    hparams_class: ClassVar[type[HParams]] = HParams
    tensors: ClassVar[dict] = {}
    fused_tensors: ClassVar[dict] = {}

    def __init__(self, config: dict):
        self.config = config
        self.name = config["architectures"][0]

    # -- hyper-parameters ---------------------------------------------------------------------

    def typed_hparams(self) -> HParams:
        """The config's hyper-parameters as :attr:`hparams_class`.

        Raises:
            ConfigError: a required key is missing or a value is unsupported (named).
        """
        return self.hparams_class.from_config(self.config, self.name, self.family)

    def hparams(self) -> dict:
        """Normalised hyper-parameters for the runtime (stored as ``hparams.*`` metadata).

        Raises:
            ConfigError: as :meth:`typed_hparams`.
        """
        return self.typed_hparams().to_hparams()

    @classmethod
    def as_hparams(cls, hp) -> HParams:
        """``hp`` as :attr:`hparams_class`: an instance is returned as is, a stored ``hparams``
        dict goes through :meth:`~.hparams.HParams.from_hparams` (ValueError when invalid)."""
        return hp if isinstance(hp, HParams) else cls.hparams_class.from_hparams(hp)

    @classmethod
    def hf_config(cls, hp) -> dict:
        """A config.json that transformers' :attr:`hf_config_class` loads into a model of
        these hyper-parameters (``architectures``, ``model_type`` and the family's keys)."""
        hp = cls.as_hparams(hp)
        return {"architectures": [cls.hf_names[0]], "model_type": cls.model_type,
                **hp.to_config()}

    # -- tensors ------------------------------------------------------------------------------

    @classmethod
    def tensor_table(cls, layout: str = T.HUB) -> dict:
        """Logical key -> name template in ``layout`` (:data:`~.tensors.HUB` or ``FUSED``)."""
        return T.layout_table(cls.tensors, cls.fused_tensors, layout)

    @classmethod
    def tensor_name(cls, key: str, layer: int | None = None, expert: int | None = None,
                    layout: str = T.HUB) -> str:
        """HF name of tensor ``key`` (``{i}`` = ``layer``, ``{e}`` = ``expert``).

        Raises:
            KeyError: the family has no such key in ``layout`` (message names family and key).
        """
        table = cls.tensor_table(layout)
        if key not in table:
            raise KeyError(f"{cls.family}: no tensor {key!r} in the {layout} layout")
        return table[key].format(i=layer, e=expert)

    @classmethod
    def tensor_names(cls, key: str, layer: int | None = None) -> tuple[str, ...]:
        """Every name tensor ``key`` of ``layer`` may have in a checkpoint: the HUB name, then
        the FUSED one when it differs (e.g. Mixtral's router). Raises KeyError when unknown."""
        names = [cls.tensor_name(key, layer)]
        fused = cls.tensor_table(T.FUSED).get(key)
        if fused is not None and fused.format(i=layer) not in names:
            names.append(fused.format(i=layer))
        return tuple(names)

    @classmethod
    def tensor_specs(cls, hp, layout: str = T.HUB) -> list[T.TensorSpec]:
        """Every tensor of a model of this family with hyper-parameters ``hp`` (an
        :class:`~.hparams.HParams` or a stored ``hparams`` dict), with its shape.

        ``lm_head.weight`` is included and marked ``tied`` with tied embeddings (it is then
        in ``state_dict()`` but not in checkpoint files).
        """
        return T.expand(cls.tensor_table(layout), cls.as_hparams(hp))

    @classmethod
    def expert_patterns(cls) -> tuple[tuple[str, str], ...]:
        """(regex over a tensor name, role) for every expert tensor name the family may have in
        a checkpoint, both layouts; groups ``layer`` and ``expert`` (absent when stacked)."""
        out = []
        hub_roles = {**T.EXPERT_ROLES, **T.STACKED_ROLES}   # a Hub layout may stack (Granite)
        for layout, roles in ((T.HUB, hub_roles), (T.FUSED, T.STACKED_ROLES)):
            table = cls.tensor_table(layout)
            out += [(T.template_regex(table[k]), r) for k, r in roles.items() if k in table]
        return tuple(dict.fromkeys(out))

    @classmethod
    def _compiled(cls):
        if "_re" not in cls.__dict__:
            cls._re = [(re.compile(p), r) for p, r in cls.expert_patterns()]
        return cls._re

    @classmethod
    def unsupported_tensor(cls, name: str, dtype: str) -> str | None:
        """Why the converter cannot store checkpoint tensor ``name`` of safetensors ``dtype``
        (a sentence naming it), or None. Base: None; a family refuses a layout it cannot run
        yet (gpt-oss: the MXFP4 release)."""
        return None

    @classmethod
    def expert_tensor(cls, name: str) -> ExpertRef | None:
        """The :class:`ExpertRef` of a checkpoint tensor, or None for a dense tensor."""
        for pat, role in cls._compiled():
            m = pat.fullmatch(name)
            if m:
                g = m.groupdict()
                e = g.get("expert")
                return ExpertRef(int(g["layer"]), int(e) if e is not None else None, role)
        return None
