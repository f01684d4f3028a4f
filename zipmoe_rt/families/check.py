"""Stored hyper-parameters against stored tensors: a container whose ``hparams`` lie about the
shapes its tensors have is refused before any model code (or kernel) trusts them.

The runtime sizes its buffers and indexes its kernels from the hyper-parameters (heads, head
size, widths, expert counts); a file that says ``num_attention_heads: 8`` over q/k/v weights of
four heads would otherwise make the attention kernels read past their arrays. This module
checks, from the family's registry entry (:mod:`zipmoe_rt.families`), that every tensor a model
with these hyper-parameters has is stored with the shape they imply, and that the routed experts
of every sparse layer are all there. It reads shapes only (no tensor data), so it is cheap enough
to run on every load and in ``zipmoe-rt verify``.
"""
from __future__ import annotations

import zmoe
from zmoe.constants import Keys

from . import tensors as T
from .base import UnknownFamilyError, get_family

#: logical tensor key -> the hyper-parameters its shape comes from (named in errors).
SHAPE_FIELDS = {
    "embed": "vocab_size, hidden_size", "lm_head": "vocab_size, hidden_size",
    "attn_q": "num_attention_heads, head_dim", "attn_q_bias": "num_attention_heads, head_dim",
    "attn_k": "num_key_value_heads, head_dim", "attn_k_bias": "num_key_value_heads, head_dim",
    "attn_v": "num_key_value_heads, head_dim", "attn_v_bias": "num_key_value_heads, head_dim",
    "attn_o": "num_attention_heads, head_dim", "attn_q_norm": "head_dim",
    "attn_k_norm": "head_dim", "router": "num_experts",
    "expert_gate": "moe_intermediate_size", "expert_up": "moe_intermediate_size",
    "expert_down": "moe_intermediate_size",
    "experts_gate_up": "num_experts, moe_intermediate_size",
    "experts_down": "num_experts, moe_intermediate_size",
    "shared_gate": "shared_expert_intermediate_size",
    "shared_up": "shared_expert_intermediate_size",
    "shared_down": "shared_expert_intermediate_size", "mlp_gate": "intermediate_size",
    "mlp_up": "intermediate_size", "mlp_down": "intermediate_size",
    # Multi-head Latent Attention
    "attn_q_a": "q_lora_rank", "attn_q_a_bias": "q_lora_rank", "attn_q_a_norm": "q_lora_rank",
    "attn_q_b": "num_attention_heads, qk_nope_head_dim, qk_rope_head_dim, q_lora_rank",
    "attn_kv_a": "kv_lora_rank, qk_rope_head_dim", "attn_kv_a_bias": "kv_lora_rank, qk_rope_head_dim",
    "attn_kv_a_norm": "kv_lora_rank",
    "attn_kv_b": "num_attention_heads, qk_nope_head_dim, v_head_dim, kv_lora_rank",
    "shared_gate_up": "shared_expert_intermediate_size",        # Granite-MoE-Shared
    "moe_statics": "num_experts",                               # ERNIE 4.5 MoE
    # Gated DeltaNet (Qwen3-Next, Qwen3.5-MoE)
    **{k: "linear_num_key_heads, linear_key_head_dim, linear_num_value_heads, "
          "linear_value_head_dim" for k in ("lin_qkvz", "lin_qkv", "lin_out")},
    **{k: "linear_num_value_heads" for k in ("lin_ba", "lin_b", "lin_a", "lin_dt_bias",
                                              "lin_A_log")},
    "lin_z": "linear_num_value_heads, linear_value_head_dim", "lin_norm": "linear_value_head_dim",
    "lin_conv": "linear_num_key_heads, linear_key_head_dim, linear_num_value_heads, "
                "linear_value_head_dim, linear_conv_kernel_dim",
    # LFM2-MoE short convolution
    **{k: "hidden_size" for k in ("conv_in", "conv_in_bias", "conv_kernel_bias", "conv_out",
                                  "conv_out_bias")},
    "conv_kernel": "hidden_size, conv_l_cache",
}


def _fail(where: str, msg: str):
    raise zmoe.CorruptIndexError(f"{where}: {msg}")


def check_stored_tensors(hparams: dict, shapes: dict, where: str):
    """Check stored hyper-parameters against the stored tensors' shapes.

    Args:
        hparams: the container's ``hparams.*`` metadata without the prefix (``family`` included),
            as :class:`~zipmoe_rt.engine.store.ZmoeSource` reads it.
        shapes: every stored tensor name -> its shape (list of ints), experts included.
        where: the file, for messages.
    Returns:
        the family's typed hyper-parameters (:class:`~zipmoe_rt.families.hparams.HParams`).
    Raises:
        zmoe.CorruptIndexError: an unknown family, a hyper-parameter of the wrong type or out
            of range (:meth:`~.hparams.HParams.validate`), inconsistent hyper-parameters, a tensor whose shape
            differs from the one they imply (tensor, both shapes and the hyper-parameters named),
            a missing dense tensor, or a sparse layer without all of its routed experts.
    """
    try:
        fam = get_family(hparams.get("family"))
    except UnknownFamilyError as e:
        _fail(where, f"hparams.family: {e}")
    layers = hparams.get("num_hidden_layers")
    if type(layers) is int and layers > len(shapes):    # before validate lists every layer
        _fail(where, f"hparams.num_hidden_layers: {layers} layers, but the file holds only "
                     f"{len(shapes)} tensors")
    try:    # types and ranges of every value (HParams.validate)
        hp = fam.hparams_class.from_hparams(hparams)
    except (ValueError, TypeError, KeyError) as e:
        _fail(where, f"hparams: {e}")
    moe = [i for i in hp.moe_layers if isinstance(i, int) and 0 <= i < hp.num_hidden_layers]
    if len(moe) != len(hp.moe_layers):
        _fail(where, f"hparams.moe_layers: entries outside 0..{hp.num_hidden_layers - 1}")
    stacked = any(ref is not None and ref.expert is None
                  for ref in map(fam.expert_tensor, shapes))
    if not stacked and len(moe) * hp.num_experts * 3 > len(shapes):
        _fail(where, f"hparams.num_experts: {hp.num_experts} experts in {len(moe)} sparse "
                     f"layers need {len(moe) * hp.num_experts * 3} expert tensors, but the file "
                     f"holds only {len(shapes)} tensors")
    hub = fam.tensor_table(T.HUB)    # stacked under Hub names (Granite) or transformers 5's
    fused = stacked and not any(hub[k].format(i=i) in shapes for i in moe[:1]
                                for k in T.STACKED_ROLES if k in hub)
    specs = fam.tensor_specs(hp, T.FUSED if fused else T.HUB)
    by_name = {s.name: s for s in specs}
    for name, shape in shapes.items():
        s = by_name.get(name)
        if s is not None and list(shape) != list(s.shape):
            field = SHAPE_FIELDS.get(s.key, "")
            _fail(where, f"tensor {name!r} has shape {list(shape)}, but the stored "
                         f"hyper-parameters imply {list(s.shape)}"
                         + (f" (hparams {field})" if field else ""))
    for s in specs:
        if s.tied or s.name in shapes:
            continue
        alternatives = fam.tensor_names(s.key, s.layer) if s.expert is None else [s.name]
        if not any(n in shapes for n in alternatives):
            if s.key == "lm_head":
                _fail(where, f"no tensor {s.name!r}, and hparams.tie_word_embeddings is false: "
                             f"the output head is missing")
            kind = "routed expert tensor" if s.is_expert else "tensor"
            _fail(where, f"no {kind} {s.name!r}, which the stored hyper-parameters imply"
                         + (f" for layer {s.layer}" if s.layer is not None else ""))
    return hp


def stored_hparams(metadata: dict) -> dict:
    """The ``hparams.*`` metadata of a container without the prefix, ``family`` filled from
    ``general.family`` when absent (format/SPEC.md §3)."""
    prefix = Keys.HParams.PREFIX
    hp = {k[len(prefix):]: v for k, v in metadata.items() if k.startswith(prefix)}
    hp.setdefault("family", metadata.get(Keys.General.FAMILY, ""))
    return hp


def check_reader(reader, where: str):
    """:func:`check_stored_tensors` for an open :class:`zmoe.ZmoeReader` (as ``verify`` and the
    runtime's :class:`~zipmoe_rt.engine.store.ZmoeSource` run it). Raises like it."""
    return check_stored_tensors(stored_hparams(reader.metadata),
                                {n: t["shape"] for n, t in reader.tensors.items()}, where)
