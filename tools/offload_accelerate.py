"""The transformers + accelerate baseline of ``tools/gpu_offload_bench.py``: the same checkpoint
in bf16 with accelerate's CPU offload (``device_map="auto"`` with ``max_memory``, or every
layer's routed experts on ``"cpu"``), teacher-forced decode tokens/s.
"""
from __future__ import annotations

import time

from offload_model import token_stream


def experts_on_cpu_map(layers: int) -> dict:
    """A ``device_map`` with every layer's routed experts in CPU memory (accelerate runs them on
    the GPU, copying their weights in for each forward) and everything else on GPU 0."""
    m = {"model.embed_tokens": 0, "model.norm": 0, "lm_head": 0}
    for i in range(layers):
        p = f"model.layers.{i}"
        m.update({f"{p}.self_attn": 0, f"{p}.input_layernorm": 0,
                  f"{p}.post_attention_layernorm": 0, f"{p}.mlp.gate": 0,
                  f"{p}.mlp.experts": "cpu"})
    return m


def time_accelerate(hf, budget_bytes, tokens, warm, device_map="auto") -> dict:
    """transformers (bf16, eager) with accelerate's CPU offload: ``device_map`` (``"auto"``
    with ``max_memory={0: budget, "cpu": ...}``, or a map) ; teacher-forced decode tokens/s.
    Errors are returned, not raised (``{"error": ...}``)."""
    try:
        return _time_accelerate(hf, budget_bytes, tokens, warm, device_map)
    except Exception as e:  # noqa: BLE001 - a baseline that cannot run is reported as such
        return {"error": f"{type(e).__name__}: {e}"[:300]}


def _time_accelerate(hf, budget_bytes, tokens, warm, device_map) -> dict:
    try:
        import accelerate
    except ImportError:
        return {"error": "accelerate is not installed"}
    import torch
    if not torch.cuda.is_available():
        return {"error": "no CUDA device for torch"}
    from transformers import AutoModelForCausalLM
    kw = {"max_memory": {0: int(budget_bytes), "cpu": 200 * 2**30}} if device_map == "auto" \
        else {}
    model = AutoModelForCausalLM.from_pretrained(
        hf, dtype=torch.bfloat16, device_map=device_map, attn_implementation="eager", **kw)
    placed = {}
    for dev in getattr(model, "hf_device_map", {}).values():
        placed[str(dev)] = placed.get(str(dev), 0) + 1
    on_gpu = sum(p.numel() * p.element_size() for p in model.parameters() if p.device.type == "cuda")
    hooks = {str(getattr(getattr(m, "_hf_hook", None), "execution_device", None))
             for m in model.modules() if hasattr(m, "_hf_hook")}
    w = model.get_input_embeddings().weight
    dev = w.device if w.device.type != "meta" else torch.device("cuda", 0)
    ids = torch.tensor(token_stream(16 + warm + tokens)).to(dev)
    with torch.no_grad():
        out = model(input_ids=ids[None, :16], use_cache=True)
        pkv = out.past_key_values
        for i in range(16, 16 + warm):
            pkv = model(input_ids=ids[None, i:i + 1], past_key_values=pkv,
                        use_cache=True).past_key_values
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(16 + warm, 16 + warm + tokens):
            pkv = model(input_ids=ids[None, i:i + 1], past_key_values=pkv,
                        use_cache=True).past_key_values
        torch.cuda.synchronize()
        dt = time.perf_counter() - t0
    del model
    torch.cuda.empty_cache()
    return {"tps": tokens / dt, "accelerate": accelerate.__version__, "device_map": placed,
            "gpu_param_bytes": on_gpu, "hook_execution_devices": sorted(hooks)}
