"""Model families: the one home of everything the project knows about each family.

Each family (:mod:`.mixtral`, :mod:`.olmoe`, :mod:`.qwen2_moe`, :mod:`.qwen3_moe`,
:mod:`.phimoe`) is a :class:`~.base.Family` subclass registered under its Hugging Face
``architectures`` names: its names, typed hyper-parameters with transformers' defaults and their config.json mapping
(:mod:`.hparams`), its tensor names and shapes (:mod:`.tensors`) and the runtime module that
runs it. The converter, the runtime's family table, the benchmark's warm-up model, the
synthetic-checkpoint tool and the tests all read it from here.

Importable without torch and Numba.
"""
from .base import (ARCHITECTURES, BY_NAME, ExpertRef, Family, UnknownFamilyError,
                   UnsupportedArchitectureError, all_families, family_for_architecture,
                   family_names, get_architecture, get_family, register)
from .hparams import ConfigError, HParams, config_value, rope_parameters
from .tensors import FUSED, HUB, KEYS, LAYOUTS, TensorSpec
from . import mixtral, olmoe, qwen2_moe, qwen3_moe  # noqa: E402,F401  (registration)
from . import glm4_moe  # noqa: E402,F401  (registration: GLM-4-MoE)
from . import phimoe  # noqa: E402,F401  (registration: PhiMoE)
from . import deepseek_v2, deepseek_v3, glm4_moe_lite  # noqa: E402,F401  (registration: MLA families)
from . import granitemoe  # noqa: E402,F401  (Granite-MoE, Granite-MoE-Shared)
from . import ernie4_5_moe  # noqa: E402,F401  (ERNIE 4.5 MoE)
from . import gemma4  # noqa: E402,F401  (Gemma 4: Gemma4ForCausalLM, Gemma4ForConditionalGeneration)
from . import gpt_oss  # noqa: E402,F401  (gpt-oss)

__all__ = [
    "ARCHITECTURES", "BY_NAME", "ExpertRef", "Family", "UnknownFamilyError",
    "UnsupportedArchitectureError", "all_families", "family_for_architecture", "family_names",
    "get_architecture", "get_family", "register",
    "ConfigError", "HParams", "config_value", "rope_parameters",
    "FUSED", "HUB", "KEYS", "LAYOUTS", "TensorSpec",
]
from . import qwen3_next  # noqa: E402,F401  (Qwen3-Next, Qwen3.5-MoE: hybrid linear attention)
from . import lfm2_moe  # noqa: E402,F401  (LFM2-MoE: short-convolution layers)
