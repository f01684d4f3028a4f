"""The benchmark children of tools/compare_llamacpp.py (run as ``compare_llamacpp.py _llama-chat |
_llama-bench | _zipmoe-bench``; the llama.cpp ones under the llama.cpp venv's Python, which has
numpy but not zipmoe-rt).
"""
from __future__ import annotations

import json
import os
import sys
import time

from llamacpp_common import OMP_VARS, QUESTION, REPO


# =============================================================================================
# workers (run as children; the llama one under the llama.cpp venv's Python)
# =============================================================================================
#: the llama.cpp settings of every run (printed with the table); n_threads from --threads
LLAMA_SETTINGS = {"n_ctx": 512, "n_batch": 512, "use_mmap": True, "use_mlock": False,
                  "type_k/type_v": "f16 (default)", "flash_attn": "default"}


def _open_llama(model: str, n_threads: int):
    from llama_cpp import Llama
    st = LLAMA_SETTINGS
    return Llama(model_path=model, n_ctx=st["n_ctx"], n_batch=st["n_batch"], n_threads=n_threads,
                 n_threads_batch=n_threads, use_mmap=st["use_mmap"], use_mlock=st["use_mlock"],
                 verbose=False, seed=0)


def llama_chat_worker(a) -> None:
    llm = _open_llama(a.model, a.threads)
    r = llm.create_chat_completion(messages=[{"role": "user", "content": QUESTION}],
                                   temperature=0.0, top_k=1, max_tokens=32, seed=0)
    print(json.dumps({"answer": r["choices"][0]["message"]["content"]}))


def llama_bench_worker(a) -> None:
    """tg benchmark: eval the prompt ids, then n_gen - 1 single-token evals, greedy, no EOS stop;
    with ``a.pp_ids``, each repetition then also evaluates those ids in one call into an empty
    context (pp: ``pp_tps`` = tokens / seconds of that call, as ``zipmoe-rt bench``'s pp)."""
    import numpy as np
    sys.path.insert(0, str(REPO))     # this venv has numpy, not zipmoe-rt: the repository's copy
    from zipmoe_rt.engine.io import evict_page_cache
    from zipmoe_rt.util import peak_rss, reset_peak_rss
    ids = [int(x) for x in a.prompt_ids.split(",")]
    pp_ids = [int(x) for x in a.pp_ids.split(",")] if a.pp_ids else []
    omp = {k: os.environ.get(k) for k in OMP_VARS}    # as llama.cpp's OpenMP runtime reads them
    t_load = time.perf_counter()
    llm = _open_llama(a.model, a.threads)
    load_s = time.perf_counter() - t_load
    same_tokens = None
    if a.prompt_text is not None:
        got = llm.tokenize(a.prompt_text.encode("utf-8"), add_bos=False, special=False)
        same_tokens = list(got) == ids or list(got)

    n_vocab = llm.n_vocab()

    def greedy() -> int:        # argmax of the last position's logits (Llama.eval keeps none)
        return int(np.argmax(np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(n_vocab,))))

    llm.reset()                                   # warm-up, like zipmoe-rt bench's JIT warm-up
    llm.eval(ids[:4])
    llm.eval([greedy()])
    runs = []
    for _ in range(a.reps):
        evict_page_cache(a.model)                 # cold reads: drop the file's unmapped pages
        reset_peak_rss()
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(ids)
        out = [greedy()]
        t1 = time.perf_counter()
        for _ in range(a.n_gen - 1):
            llm.eval([out[-1]])
            out.append(greedy())
        t2 = time.perf_counter()
        run = {"ttft_s": t1 - t0, "decode_s": t2 - t1,
               "decode_tps": (a.n_gen - 1) / (t2 - t1) if a.n_gen > 1 else None,
               "decoded": len(out), "peak_rss": peak_rss(), "tokens": out}
        if pp_ids:                                # prefill: the pp prompt in one eval call
            llm.reset()
            t0 = time.perf_counter()
            llm.eval(pp_ids)
            run["pp_s"] = time.perf_counter() - t0
            run["pp_tps"] = len(pp_ids) / run["pp_s"]
        runs.append(run)
    print(json.dumps({"load_s": load_s, "prompt_tokens_match": same_tokens, "runs": runs,
                      "omp": omp, "settings": dict(LLAMA_SETTINGS, n_threads=a.threads,
                                                   n_threads_batch=a.threads)}))


def zipmoe_bench_worker(a) -> None:
    """One configuration exactly as ``zipmoe-rt bench`` runs it (zipmoe_rt.bench.run_config),
    under ``--memory-limit`` = ``a.limit`` (``none``: unbudgeted, in memory, and then with a
    prefill of ``a.n_pp`` tokens per repetition when it is not 0); prints the runs,
    the memory report (with the limit's division), the OpenMP variables the runtime ran with
    and its settings."""
    sys.path.insert(0, str(REPO))
    from zipmoe_rt import bench as B
    limit = None if a.limit == "none" else a.limit
    policy = a.policy if limit is not None else "auto"
    direct = bool(a.direct) and limit is not None
    pp = a.n_pp if limit is None else 0              # prefill rows: in memory only
    runs, mem = B.run_config(a.model, None, policy, pp, a.n_gen, a.reps, None, direct, "lru",
                             None, memory_limit=limit, resident=a.resident)
    settings = {"memory_limit": a.limit, "policy": policy, "resident": a.resident,
                "workers": os.cpu_count(),
                "io_depth": "default (4)", "direct": direct, "eviction": "lru",
                "budget": mem.get("budget")}
    print(json.dumps({"runs": runs, "memory": mem, "settings": settings,
                      "omp": {k: os.environ.get(k) for k in OMP_VARS}}))
