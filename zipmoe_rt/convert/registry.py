"""The converter's view of the family registry (:mod:`zipmoe_rt.families`).

Each supported Hugging Face ``architectures[0]`` maps to a :class:`~zipmoe_rt.families.Family`
class (llama.cpp's conversion style); :func:`get_architecture` binds one to a config.json, which
then gives the normalised hyper-parameters (``hparams()``) and tells which checkpoint tensors
belong to experts (``expert_tensor(name)``). Everything a family knows lives in its module under
``zipmoe_rt/families/``; this module re-exports what the converter and its users import.
"""
from __future__ import annotations

from ..families import (ARCHITECTURES, ConfigError, ExpertRef, Family,
                        UnsupportedArchitectureError, get_architecture, register,
                        rope_parameters)
from ..families.mixtral import Mixtral
from ..families.qwen2_moe import Qwen2Moe
from ..families.qwen3_moe import Qwen3Moe

#: The base class of a registered architecture (older name of :class:`Family`).
Architecture = Family

__all__ = ["ARCHITECTURES", "Architecture", "ConfigError", "ExpertRef", "Family", "Mixtral",
           "Qwen2Moe", "Qwen3Moe", "UnsupportedArchitectureError", "get_architecture",
           "register", "rope_parameters"]
