"""Tensor names and shapes of a family, expanded from its name table.

A family's name table maps *logical keys* (the same for every family, :data:`KEYS`) to Hugging
Face name templates, ``{i}`` standing for the layer and ``{e}`` for the expert, e.g.
``"attn_q": "model.layers.{i}.self_attn.q_proj.weight"``. A family lists only the tensors it
can have; which of them a given model has follows from its hyper-parameters (:func:`present`),
their shapes too (:func:`shape`), as transformers' ``modeling_<family>.py`` creates them.

Two layouts of the expert tensors:

- :data:`HUB`: one tensor per expert and projection, as checkpoints on the Hub are published
  and as transformers' ``save_pretrained`` writes them (``experts.{e}.gate_proj.weight`` ...).
- :data:`FUSED`: transformers 5's in-memory ``state_dict()``: experts stacked per layer,
  ``gate_up_proj`` [E, 2I, H] (gate rows first) and ``down_proj`` [E, H, I]; transformers 5 can
  also save this layout. A family's ``fused_tensors`` gives the names that differ in it.

Importable without torch and Numba.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

HUB = "hub"
FUSED = "fused"
LAYOUTS = (HUB, FUSED)

#: logical key -> what it is (transformers module). Families use these keys only.
KEYS = {
    "embed": "token embedding [V, H]",
    "attn_q": "self_attn.q_proj weight [heads*hd, H]",
    "attn_q_bias": "q_proj bias [heads*hd] (attention_bias)",
    "attn_k": "self_attn.k_proj weight [kv_heads*hd, H]",
    "attn_k_bias": "k_proj bias [kv_heads*hd] (attention_bias)",
    "attn_v": "self_attn.v_proj weight [kv_heads*hd, H]",
    "attn_v_bias": "v_proj bias [kv_heads*hd] (attention_bias)",
    "attn_o": "self_attn.o_proj weight [H, heads*hd]",
    "attn_o_bias": "o_proj bias [H] (attention_bias, families whose o_proj has one)",
    "attn_q_norm": "RMSNorm on q (qk_norm): [hd] per head, or [heads*hd] over the projection",
    "attn_k_norm": "RMSNorm on k (qk_norm): [hd] per head, or [kv_heads*hd] over the projection",
    "router": "router (gate) weight [E, H] (MoE layers)",
    "expert_gate": "expert e gate projection [I, H] (HUB)",
    "expert_up": "expert e up projection [I, H] (HUB)",
    "expert_down": "expert e down projection [H, I] (HUB)",
    "experts_gate_up": "stacked gate+up projections [E, 2I, H] (FUSED)",
    "experts_down": "stacked down projections [E, H, I] (FUSED)",
    "shared_gate": "shared expert gate projection [SI, H] (SI > 0)",
    "shared_up": "shared expert up projection [SI, H] (SI > 0)",
    "shared_down": "shared expert down projection [H, SI] (SI > 0)",
    "shared_expert_gate": "sigmoid gate of the shared expert [1, H] (SI > 0)",
    "mlp_gate": "dense MLP gate projection [intermediate, H] (layers outside moe_layers)",
    "mlp_up": "dense MLP up projection [intermediate, H]",
    "mlp_down": "dense MLP down projection [H, intermediate]",
    "attn_norm": "input_layernorm weight [H]",
    "ffn_norm": "post_attention_layernorm weight [H]",
    "norm": "final norm weight [H]",
    "lm_head": "output projection [V, H] (the embedding when tie_word_embeddings)",
    # DeepSeek-V3 / GLM-4-MoE routers (noaux_tc)
    "router_bias": "router e_score_correction_bias [E], F32, for the choice only (MoE layers)",
    # PhiMoE: LayerNorm biases, lm_head bias
    "attn_norm_bias": "input_layernorm bias [H] (LayerNorm families, HParams.NORM 'layer')",
    "ffn_norm_bias": "post_attention_layernorm bias [H] (HParams.NORM 'layer')",
    "norm_bias": "final norm bias [H] (HParams.NORM 'layer')",
    "lm_head_bias": "output projection bias [V] (lm_head_bias)",
    # Multi-head Latent Attention (DeepSeek-V2/V3, GLM-4-MoE-Lite); attn_q is then q_proj
    # [heads*(nope+rope), H] (q_lora_rank null) and attn_o [H, heads*v_head_dim]
    "attn_q_a": "MLA q_a_proj weight [q_lora_rank, H] (q_lora_rank set)",
    "attn_q_a_bias": "MLA q_a_proj bias [q_lora_rank] (attention_bias)",
    "attn_q_a_norm": "MLA q_a_layernorm weight [q_lora_rank]",
    "attn_q_b": "MLA q_b_proj weight [heads*(nope+rope), q_lora_rank]",
    "attn_kv_a": "MLA kv_a_proj_with_mqa weight [kv_lora_rank+rope, H]",
    "attn_kv_a_bias": "MLA kv_a_proj_with_mqa bias [kv_lora_rank+rope] (attention_bias)",
    "attn_kv_a_norm": "MLA kv_a_layernorm weight [kv_lora_rank]",
    "attn_kv_b": "MLA kv_b_proj weight [heads*(nope+v_head_dim), kv_lora_rank]",
    # Granite-MoE-Shared
    "shared_gate_up": "shared expert gate+up projections, gate rows first [2*SI, H] (SI > 0)",
    # ERNIE 4.5 MoE
    "moe_statics": "e_score_correction_bias [1, E], F32: added to the router's probabilities "
                   "for the choice of experts only (MoE layers)",
    # Qwen3-Next / Qwen3.5-MoE: Gated DeltaNet (linear-attention) layers; their attn_q is
    # q_proj [heads*hd*2, H] (each head's query rows, then its output-gate rows)
    "lin_qkvz": "Qwen3-Next in_proj_qkvz [2*nk*dk + 2*nv*dv, H], grouped by key head: q, k, "
                "v, z of each (linear-attention layers)",
    "lin_ba": "Qwen3-Next in_proj_ba [2*nv, H], grouped by key head: b, a of each",
    "lin_qkv": "Qwen3.5 in_proj_qkv [2*nk*dk + nv*dv, H]: q heads, k heads, v heads",
    "lin_z": "Qwen3.5 in_proj_z [nv*dv, H]: the output gate",
    "lin_b": "Qwen3.5 in_proj_b [nv, H]: beta's logits",
    "lin_a": "Qwen3.5 in_proj_a [nv, H]: the decay's input",
    "lin_conv": "causal depthwise conv1d weight [2*nk*dk + nv*dv, 1, K]",
    "lin_dt_bias": "dt_bias [nv]",
    "lin_A_log": "A_log [nv]",
    "lin_norm": "gated RMSNorm weight [dv]",
    "lin_out": "out_proj weight [H, nv*dv]",
    # Gemma 4 (sandwich norms, router scales, the layer scalar)
    "attn_post_norm": "post_attention_layernorm weight [H]: RMSNorm of the attention output",
    "ffn_post_norm": "post_feedforward_layernorm weight [H]: RMSNorm of the feed-forward output",
    "ffn_post_norm_1": "post_feedforward_layernorm_1 weight [H]: RMSNorm of the dense MLP's "
                       "output in a MoE layer",
    "ffn_pre_norm_2": "pre_feedforward_layernorm_2 weight [H]: RMSNorm of the experts' input",
    "ffn_post_norm_2": "post_feedforward_layernorm_2 weight [H]: RMSNorm of the experts' output",
    "router_scale": "router.scale [H]: multiplies the router's unweighted RMSNorm",
    "router_expert_scale": "router.per_expert_scale [E]: multiplies each chosen expert's weight",
    "layer_scalar": "layer_scalar [1]: the decoder layer's output is multiplied by it",
    # gpt-oss: attention sinks, router bias, experts stacked as [E, in, out] with biases
    "attn_sinks": "self_attn.sinks [heads]: a learned logit per head in the softmax denominator",
    "router_logit_bias": "router bias [E], added to the router logits (MoE layers)",
    "experts_gate_up_cols": "stacked gate+up [E, H, 2I], in x out, gate and up interleaved "
                            "column by column (even columns gate, odd up)",
    "experts_gate_up_bias": "stacked gate+up biases [E, 2I], interleaved as the columns",
    "experts_down_cols": "stacked down [E, I, H], in x out",
    "experts_down_bias": "stacked down biases [E, H]",
    # LFM2-MoE: gated short-convolution layers (``layer_types`` "conv"); router_bias is its
    # expert_bias, attn_o its self_attn.out_proj
    "conv_in": "short conv in_proj [3*H, H]: B, C and x rows (conv layers)",
    "conv_in_bias": "short conv in_proj bias [3*H] (conv_bias)",
    "conv_kernel": "short conv depthwise causal conv1d weight [H, 1, L] (L = conv_L_cache)",
    "conv_kernel_bias": "short conv conv1d bias [H] (conv_bias)",
    "conv_out": "short conv out_proj [H, H]",
    "conv_out_bias": "short conv out_proj bias [H] (conv_bias)",
}
#: the tensor names transformers' Llama-style MoE decoders use (Qwen2/3-MoE, OLMoE, and Mixtral
#: apart from its ``block_sparse_moe`` experts): one table that families pick their keys from
#: (:func:`llama_names`) instead of each spelling the names again.
LLAMA_NAMES = {
    "embed": "model.embed_tokens.weight",
    "attn_norm": "model.layers.{i}.input_layernorm.weight",
    "attn_q": "model.layers.{i}.self_attn.q_proj.weight",
    "attn_q_bias": "model.layers.{i}.self_attn.q_proj.bias",
    "attn_k": "model.layers.{i}.self_attn.k_proj.weight",
    "attn_k_bias": "model.layers.{i}.self_attn.k_proj.bias",
    "attn_v": "model.layers.{i}.self_attn.v_proj.weight",
    "attn_v_bias": "model.layers.{i}.self_attn.v_proj.bias",
    "attn_o": "model.layers.{i}.self_attn.o_proj.weight",
    "attn_o_bias": "model.layers.{i}.self_attn.o_proj.bias",
    "attn_q_norm": "model.layers.{i}.self_attn.q_norm.weight",
    "attn_k_norm": "model.layers.{i}.self_attn.k_norm.weight",
    "ffn_norm": "model.layers.{i}.post_attention_layernorm.weight",
    "router": "model.layers.{i}.mlp.gate.weight",
    "expert_gate": "model.layers.{i}.mlp.experts.{e}.gate_proj.weight",
    "expert_up": "model.layers.{i}.mlp.experts.{e}.up_proj.weight",
    "expert_down": "model.layers.{i}.mlp.experts.{e}.down_proj.weight",
    "shared_gate": "model.layers.{i}.mlp.shared_expert.gate_proj.weight",
    "shared_up": "model.layers.{i}.mlp.shared_expert.up_proj.weight",
    "shared_down": "model.layers.{i}.mlp.shared_expert.down_proj.weight",
    "shared_expert_gate": "model.layers.{i}.mlp.shared_expert_gate.weight",
    "mlp_gate": "model.layers.{i}.mlp.gate_proj.weight",
    "mlp_up": "model.layers.{i}.mlp.up_proj.weight",
    "mlp_down": "model.layers.{i}.mlp.down_proj.weight",
    "norm": "model.norm.weight",
    "lm_head": "lm_head.weight",
}
#: transformers 5's in-memory names of expert-stacked tensors (the FUSED layout).
FUSED_EXPERT_NAMES = {
    "experts_gate_up": "model.layers.{i}.mlp.experts.gate_up_proj",
    "experts_down": "model.layers.{i}.mlp.experts.down_proj",
}


def llama_names(without=(), **names) -> dict:
    """A family's HUB name table: :data:`LLAMA_NAMES` less the keys in ``without`` (tensors the
    family never has), with ``names`` (key=template) replacing or adding entries.

    Raises:
        KeyError: a key in ``without`` or ``names`` that is not in :data:`KEYS`.
    """
    for k in list(without) + list(names):
        if k not in KEYS:
            raise KeyError(f"unknown tensor key {k!r}")
    table = {k: v for k, v in LLAMA_NAMES.items() if k not in without}
    table.update(names)
    return table


#: per-expert keys of the HUB layout -> expert role (see ``ExpertRef.role``).
EXPERT_ROLES = {"expert_gate": "gate", "expert_up": "up", "expert_down": "down"}
#: stacked keys of the FUSED layout -> expert role.
STACKED_ROLES = {"experts_gate_up": "gate_up", "experts_down": "down",
                 # gpt-oss (in x out layouts and expert biases; models/weights.py assembles them)
                 "experts_gate_up_cols": "gate_up_cols", "experts_gate_up_bias": "gate_up_bias",
                 "experts_down_cols": "down_cols", "experts_down_bias": "down_bias"}

_BIAS = ("attn_q_bias", "attn_k_bias", "attn_v_bias", "attn_o_bias")
_SHARED = ("shared_gate", "shared_up", "shared_down", "shared_expert_gate",
           "shared_gate_up")       # Granite-MoE-Shared
_DENSE = ("mlp_gate", "mlp_up", "mlp_down")


@dataclass(frozen=True)
class TensorSpec:
    """One tensor a model of the family has.

    Attributes:
        name: HF tensor name.  shape: dims as torch/safetensors list them (``[out, in]``).
        key: logical key (:data:`KEYS`).  layer: decoder layer, None for global tensors.
        expert: expert index of a per-expert tensor, else None.
        role: expert role (``gate``, ``up``, ``down``, ``gate_up``) of expert tensors, else None.
        stacked: an expert-stacked tensor ([E, ...], axis 0 = expert).
        tied: ``lm_head.weight`` of a model with tied embeddings: the embedding matrix itself;
            ``state_dict()`` lists it, checkpoint files do not hold it.
    """

    name: str
    shape: tuple
    key: str
    layer: int | None = None
    expert: int | None = None
    role: str | None = None
    stacked: bool = False
    tied: bool = False

    @property
    def is_expert(self) -> bool:
        """Whether the tensor belongs to routed experts (stored as expert blocks)."""
        return self.role is not None


def shape(key: str, hp, layer: int | None = None) -> tuple:
    """Shape of tensor ``key`` (of ``layer``, for a family whose layers differ: its
    ``hp.tensor_shape_at(key, layer)``) for hyper-parameters ``hp`` (an
    :class:`~.hparams.HParams`; its ``QK_NORM_SCOPE`` sets the q/k norm shapes).

    Raises:
        KeyError: unknown key.
    """
    own = getattr(hp, "tensor_shape", None)     # a family's own shapes (MLA)
    if own is not None and own(key) is not None:
        return own(key)
    own = getattr(hp, "tensor_shape_at", None)  # shapes per layer (Gemma 4's global layers)
    if own is not None and own(key, layer) is not None:
        return own(key, layer)
    H, V, hd = hp.hidden_size, hp.vocab_size, hp.head_dim
    q, kv = hp.num_attention_heads * hd, hp.num_key_value_heads * hd
    qn, kn = (q, kv) if hp.QK_NORM_SCOPE == "projection" else (hd, hd)
    E, I = hp.num_experts, hp.moe_intermediate_size
    SI, D = hp.shared_expert_intermediate_size, hp.intermediate_size
    return {
        "embed": (V, H), "lm_head": (V, H), "norm": (H,), "attn_norm": (H,), "ffn_norm": (H,),
        "attn_q": (q, H), "attn_q_bias": (q,), "attn_k": (kv, H), "attn_k_bias": (kv,),
        "attn_v": (kv, H), "attn_v_bias": (kv,), "attn_o": (H, q), "attn_o_bias": (H,),
        "attn_q_norm": (qn,), "attn_k_norm": (kn,), "router": (E, H),
        "expert_gate": (I, H), "expert_up": (I, H), "expert_down": (H, I),
        "experts_gate_up": (E, 2 * I, H), "experts_down": (E, H, I),
        "shared_gate": (SI, H), "shared_up": (SI, H), "shared_down": (H, SI),
        "shared_expert_gate": (1, H),
        "mlp_gate": (D, H), "mlp_up": (D, H), "mlp_down": (H, D),
        "router_bias": (E,),        # DeepSeek-V3 / GLM-4-MoE
        # PhiMoE
        "attn_norm_bias": (H,), "ffn_norm_bias": (H,), "norm_bias": (H,), "lm_head_bias": (V,),
        "shared_gate_up": (2 * SI, H),      # Granite-MoE-Shared
        "moe_statics": (1, E),              # ERNIE 4.5 MoE
        # Gemma 4
        "attn_post_norm": (H,), "ffn_post_norm": (H,), "ffn_post_norm_1": (H,),
        "ffn_pre_norm_2": (H,), "ffn_post_norm_2": (H,), "router_scale": (H,),
        "router_expert_scale": (E,), "layer_scalar": (1,),
        # gpt-oss
        "attn_sinks": (hp.num_attention_heads,), "router_logit_bias": (E,),
        "experts_gate_up_cols": (E, H, 2 * I), "experts_gate_up_bias": (E, 2 * I),
        "experts_down_cols": (E, I, H), "experts_down_bias": (E, H),
    }[key]


def present(key: str, hp, layer: int | None, moe_layers=None) -> bool:
    """Whether a model with ``hp`` has tensor ``key`` (in ``layer`` for per-layer keys), given
    that its family lists the key: biases with ``attention_bias``, q/k norms with ``qk_norm``,
    router and experts in ``moe_layers``, the shared expert there when its size is > 0, the
    dense MLP elsewhere, the router's correction bias with the router; a family's
    ``hp.tensor_present(key)`` decides first (MLA), then ``hp.tensor_present_at(key, layer)``
    (per layer: Gemma 4). ``moe_layers``: ``hp.moe_layers`` as a set, for callers that ask
    layer by layer (:func:`expand`), so that each question is O(1) rather than a list scan."""
    own = getattr(hp, "tensor_present", None)
    if own is not None and own(key) is not None:
        return own(key)
    own = getattr(hp, "tensor_present_at", None)     # per layer: Gemma 4, hybrid Qwen3-Next
    if own is not None and own(key, layer) is not None:
        return own(key, layer)
    if key in _BIAS:
        return bool(hp.attention_bias)
    if key in ("attn_norm_bias", "ffn_norm_bias", "norm_bias"):      # PhiMoE's LayerNorms
        return getattr(hp, "NORM", "rms") == "layer"
    if key == "lm_head_bias":                                          # PhiMoE
        return bool(getattr(hp, "lm_head_bias", False))
    if key in ("attn_q_norm", "attn_k_norm"):
        return bool(hp.qk_norm)
    moe = layer is not None and layer in (hp.moe_layers if moe_layers is None else moe_layers)
    if key in _SHARED:
        return moe and hp.shared_expert_intermediate_size > 0
    if key in _DENSE:
        return layer is not None and not moe
    if key in ("router", "router_bias", "router_logit_bias") or key in EXPERT_ROLES \
            or key in STACKED_ROLES:
        return moe
    if key == "moe_statics":        # ERNIE 4.5 MoE
        return moe
    return True


def layout_table(tensors: dict, fused: dict, layout: str) -> dict:
    """The name table of ``layout``: ``tensors`` (HUB) as is (less the stacked expert keys when
    it has per-expert ones), or for FUSED with the names of ``fused`` replacing theirs and the
    stacked expert keys in place of the per-expert ones.

    Raises:
        ValueError: unknown layout.
    """
    if layout == HUB:   # stacked keys are HUB names only for a family whose Hub files stack
        if not any(k in EXPERT_ROLES for k in tensors):     # (Granite: input_linear)
            return dict(tensors)
        return {k: v for k, v in tensors.items() if k not in STACKED_ROLES}
    if layout != FUSED:
        raise ValueError(f"unknown tensor layout {layout!r} (one of {', '.join(LAYOUTS)})")
    out = {}
    for k, v in tensors.items():
        if k in EXPERT_ROLES:
            out.update((s, fused[s]) for s in STACKED_ROLES if s in fused)
        else:
            out[k] = fused.get(k, v)
    return out


def expand(table: dict, hp) -> list[TensorSpec]:
    """Every tensor of a model: ``table`` (from :func:`layout_table`) expanded over layers and
    experts, in table order: global keys before the first per-layer key, then layer by layer
    (per-expert tensors expert by expert), then the remaining global keys.

    Args:
        table: logical key -> template.  hp: :class:`~.hparams.HParams`.
    Returns:
        list of :class:`TensorSpec` (``lm_head`` included, marked ``tied`` when tied).
    """
    keys = list(table)
    per_layer = [k for k in keys if "{i}" in table[k]]
    first = keys.index(per_layer[0]) if per_layer else len(keys)
    head = [k for k in keys[:first] if k not in per_layer]
    tail = [k for k in keys[first:] if k not in per_layer]

    def glob(k):
        return TensorSpec(table[k], shape(k, hp), k,
                          tied=k == "lm_head" and bool(hp.tie_word_embeddings))

    experts = [k for k in per_layer if k in EXPERT_ROLES]
    moe = frozenset(hp.moe_layers)          # per-layer questions in O(1), not a list scan
    same = getattr(hp, "tensor_shape_at", None) is None     # shapes alike in every layer
    shapes: dict = {}

    def shape_of(k, i):
        if not same:
            return shape(k, hp, i)
        if k not in shapes:
            shapes[k] = shape(k, hp, i)
        return shapes[k]

    out = [glob(k) for k in head if present(k, hp, None)]
    for i in range(hp.num_hidden_layers):
        for k in per_layer:
            if not present(k, hp, i, moe) or (k in EXPERT_ROLES and k != experts[0]):
                continue
            if k in EXPERT_ROLES:      # expert by expert, its projections in table order
                xs = [(x, table[x], shape_of(x, i), EXPERT_ROLES[x]) for x in experts]
                out += [TensorSpec(t.format(i=i, e=e), sh, x, i, e, r)
                        for e in range(hp.num_experts) for x, t, sh, r in xs]
            else:
                out.append(TensorSpec(table[k].format(i=i), shape_of(k, i), k, i,
                                      role=STACKED_ROLES.get(k), stacked=k in STACKED_ROLES))
    return out + [glob(k) for k in tail if present(k, hp, None)]


def template_regex(template: str) -> str:
    """A regex matching the names of ``template``: groups ``layer`` ({i}) and ``expert`` ({e}),
    each a number as Python's ``str(int)`` writes it (ASCII digits, no leading zero), the only
    spelling transformers' module names match (``layers.01`` or ``layers.\u0661`` is not layer
    1)."""
    rx = re.escape(template)
    num = "0|[1-9][0-9]*"
    return rx.replace(r"\{i\}", rf"(?P<layer>{num})").replace(r"\{e\}", rf"(?P<expert>{num})")
