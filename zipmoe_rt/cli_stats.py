"""The statistics lines of ``run`` and ``chat``: the timings line after each reply and the
REPL's ``/stats`` (conversation, memory, KV cache)."""
from __future__ import annotations

import numpy as np


def stats_line(st) -> str:
    """The timings line of ``run`` and ``chat`` (stderr). "N generated" counts the tokens
    sampled, the stop token included, as ``serve``'s ``usage.completion_tokens`` and the
    llama.cpp server's ``tokens_predicted`` / ``timings.predicted_n`` (its ``n_decoded``) do;
    ``decode tokens/s`` divides the same count less the first token by the decode time.
    A reply stopped by Ctrl-C/Ctrl-D after its first token says ``(stopped)``, as the reply's
    `` [stopped]`` mark does; a turn cancelled before it (nothing generated) ``(cancelled)``."""
    if st is None:
        return ""
    reason = st.finish_reason
    if reason == "cancelled" and st.generated_tokens > 0:
        reason = "stopped"

    def num(x, fmt):  # timings are None when there was nothing to time (no token, one token)
        return "-" if x is None else format(x, fmt)
    return (f"[{st.prompt_tokens} prompt + {st.cached_tokens} cached tokens, {st.generated_tokens} "
            f"generated ({reason}); TTFT {num(st.ttft_s, '.3f')} s, prefill "
            f"{num(st.prefill_tokens_per_s, '.1f')} tokens/s, decode "
            f"{num(st.decode_tokens_per_s, '.1f')} tokens/s]")


def session_stats(m, session) -> str:
    """``/stats``: the last reply's :func:`stats_line`, the conversation's size, the memory
    line and report, the KV cache (:func:`kv_stats`) and, on a budgeted GPU run, its line."""
    lines = [stats_line(m.last_stats) or "(no reply in this conversation yet)",
             f"conversation: {len(session.messages)} messages, {len(session.state.token_ids)} "
             f"tokens in the KV cache"]
    lines.append(m.memory_line())
    mem = m.memory_report()
    lines.append("memory: " + ", ".join(f"{k} {v / 1e6:.1f} MB" for k, v in mem.items()))
    lines.append(kv_stats(m, session.state.cache))
    gpu = getattr(m.engine, "gpu_report", None)
    if gpu is not None:                               # budgeted GPU runs (docs/gpu.md)
        from .bench import gpu_line
        lines.append(gpu_line(gpu()))
    return "\n".join(lines)


def kv_stats(m, cache) -> str:
    """The KV cache line of ``/stats``: bytes per token (the family's
    ``HParams.kv_values_per_token`` values of :data:`~zipmoe_rt.models.cache.KV_DTYPE`), the
    bytes its tokens use and the bytes it has allocated."""
    from .models.cache import KV_DTYPE
    per_token = m.net.args.kv_values_per_token() * np.dtype(KV_DTYPE).itemsize
    line = (f"KV cache: {per_token:,d} bytes per token, {cache.offset} tokens = "
            f"{cache.offset * per_token / 1e6:.3f} MB in use, {cache.nbytes / 1e6:.3f} MB "
            f"allocated")
    from .engine.memparts import state_bytes
    state = state_bytes(m.net.args)
    if state:       # linear-attention layers (Qwen3-Next): a fixed state, counted in the total
        line += f" (of which {state / 1e6:.3f} MB the fixed linear-attention state)"
    return line
