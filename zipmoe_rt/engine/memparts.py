"""The parts of a process's memory that grow with the model and the context, in bytes: the KV
cache of a context, the fixed state of linear-attention layers, one prefill batch's activations
and the expert read buffers. :func:`zipmoe_rt.engine.limit.plan_memory` adds them up under a
``--memory-limit``; ``plan`` and ``/stats`` report them.
"""
from __future__ import annotations

__all__ = ["kv_bytes", "activation_bytes", "state_bytes", "read_buffer_bytes"]


def kv_bytes(hparams: dict, context: int) -> int:
    """Bytes the KV cache holds at its largest for ``context`` tokens: the capacity the caches
    reach (256 positions doubled until ``context`` fits, as
    :meth:`~zipmoe_rt.models.cache.KVCache.reserve` grows them) for every layer, plus the old
    copy of one layer while it grows. ``hparams``: the stored hyper-parameters (format/SPEC.md
    §3); per token: ``HParams.kv_values_per_token`` values of
    :data:`~zipmoe_rt.models.cache.KV_DTYPE`; plus the fixed state of linear-attention layers
    (:func:`state_bytes`)."""
    import numpy as np

    from ..families import get_family
    from ..models.cache import KV_DTYPE
    hp = get_family(hparams.get("family")).hparams_class.from_hparams(hparams)
    per_token = int(hp.kv_values_per_token()) * np.dtype(KV_DTYPE).itemsize
    cap = 256
    while cap < context:
        cap *= 2
    layers = max(1, int(hparams["num_hidden_layers"]))
    return per_token * cap + (per_token // layers) * (cap // 2) + state_bytes(hp)


def activation_bytes(hparams: dict, context: int | None = None) -> int:
    """Bytes of the float32 activations one prefill batch of
    :data:`~zipmoe_rt.models.model.PREFILL_UBATCH` tokens holds at its peak (a longer prompt
    is run in batches of that many tokens, as llama.cpp's ``n_ubatch``), or of ``context``
    tokens where that is fewer (a limit sized for a shorter context holds no longer prompt:
    its KV cache is sized the same way, :func:`kv_bytes`): per token four
    hidden-size vectors (residual stream, normed input, attention output, MoE output) and the
    gate and up rows of the ``top-k`` experts (and of a shared expert) it is routed to.
    On the default model (hidden 576, intermediate 1536, top-2) that is 23.6 MB; measured with
    ``tracemalloc`` over a 512-token prefill: 32.8 MB in all, of which the KV cache (counted by
    :func:`kv_bytes`) is 23.6 MB.
    ``hparams``: the stored hyper-parameters (format/SPEC.md §3)."""
    from ..models.model import PREFILL_UBATCH
    hidden = int(hparams["hidden_size"])
    inter = max(int(hparams.get(key) or 0) for key in
                ("moe_intermediate_size", "intermediate_size", "shared_expert_intermediate_size"))
    k = int(hparams["num_experts_per_tok"]) + 1          # + a shared expert or a dense MLP row
    tokens = PREFILL_UBATCH if context is None else max(1, min(PREFILL_UBATCH, int(context)))
    return 4 * tokens * (4 * hidden + 2 * k * inter)


def state_bytes(hp) -> int:
    """Bytes of the fixed per-sequence state of linear-attention layers (Qwen3-Next's Gated
    DeltaNet: ``HParams.state_values``, float32, in the copies a
    :class:`~zipmoe_rt.models.cache.RecurrentCache` holds: committed, pending, marked); 0 for
    families without one.
    ``hp``: typed hyper-parameters (:class:`~zipmoe_rt.families.HParams`)."""
    from ..models.cache import RecurrentCache
    f = getattr(hp, "state_values", None)
    return 0 if f is None else int(f()) * 4 * RecurrentCache.COPIES


def read_buffer_bytes(source) -> int:
    """Bytes of the engine's expert-region read buffers that a budget does not count: top-k
    buffers of each region kind (SM and exponent), each as big as that region of the largest
    expert (:class:`~zipmoe_rt.engine.buffers.BufferPools`)."""
    lays = list(source.layouts.values())
    k = int(source.hparams["num_experts_per_tok"])
    return k * (max(l.sm_region[1] for l in lays) + max(l.exp_region[1] for l in lays))
