"""GLM-4-MoE-Lite / GLM-4.7-Flash (transformers ``models/glm4_moe_lite/
modeling_glm4_moe_lite.py``, ``Glm4MoeLiteForCausalLM``): the DeepSeek-V3 layers
(:mod:`.deepseek_v3`: MLA, the ``noaux_tc`` sigmoid router with its correction bias, ungated
shared experts), sparse where ``mlp_layer_types`` says so (the registry's ``moe_layers``).
"""
from __future__ import annotations

from . import deepseek_v3


class Model(deepseek_v3.Model):
    """``Glm4MoeLiteForCausalLM`` over a weight source. See
    :class:`~zipmoe_rt.models.model.Model`."""
