#!/usr/bin/env python
"""zipmoe-rt against llama.cpp on the bundled default model, under the same memory cgroup.

    .venv/bin/python tools/compare_llamacpp.py [--limit 600MB] [--zipmoe-limit auto] [--reps 3]   # as root

End to end, every step cached under ``~/.cache/zipmoe-rt/llamacpp/`` (``--cache`` to move it):

1. A separate venv with ``llama-cpp-python==0.3.36`` compiled from its PyPI sdist (CPU, native);
   the sdist itself, unpacked, for ``vendor/llama.cpp/convert_hf_to_gguf.py`` + its ``gguf-py``.
   ``tools/build_default_model.py`` writes the HF checkpoint (SmolLM2-135M-Instruct upcycled to a
   4-expert top-2 Mixtral, BF16); the sdist's converter turns it into a BF16 GGUF, which must
   answer "What is the capital of France?" with Paris under llama.cpp (greedy, chat template).
2. ``zipmoe-rt convert`` of the same checkpoint, ``zipmoe-rt profile`` (activation trace over
   tools/prompts.txt) and ``zipmoe-rt calibrate``.
3. tg64 decode benchmarks, each program as one child process in a fresh memory cgroup v1
   (``/sys/fs/cgroup/memory/zipmoe-bench-<name>``, ``memory.limit_in_bytes`` and
   ``memory.memsw.limit_in_bytes`` = the limit) after ``sync; echo 3 > drop_caches``: llama.cpp
   (llama-cpp-python, n_threads=2, mmap, the same 16 prompt token ids, greedy, EOS ignored) and
   zipmoe-rt (the exact per-configuration code of ``zipmoe-rt bench``, policies zipmoe and
   zip-lru, under ``--memory-limit`` = ``--zipmoe-limit``, by default ``auto``: inside its
   cgroup the child reads the cgroup's limit and leaves its stated margin, and the weight budget
   is what the runtime's measured fixed overhead, KV cache and read buffers leave
   (zipmoe_rt/engine/limit.py)); both also without a limit, for reference. Decode tokens/s are
   (64 - 1) / time of the 63 single-token forward passes after the prompt, as ``zipmoe-rt bench``
   defines them; each is repeated ``--reps`` times in the child, with the model file's pages
   dropped from the page cache (posix_fadvise DONTNEED) before every repetition. The in-memory
   rows also time a prefill of ``--n-pp`` prompt tokens (default 512) per repetition: one
   forward pass (``zipmoe-rt bench``'s pp) against one ``eval`` call of llama.cpp (n_batch 512)
   into an empty context; pp tokens/s = tokens / seconds of that call (``--in-memory-only``:
   only these rows).
4. A table: program, limit, tg64 tokens/s (median of reps), ratio against llama.cpp under the
   same limit, cgroup peak usage (memory.max_usage_in_bytes, page cache included), peak anonymous
   memory (memory.stat ``rss``, polled), failcnt, VmHWM of the child (file-mapped pages included).
   An OOM kill inside a cgroup (memory.oom_control ``oom_kill``) is reported as such. Note: on the
   6.x kernel here ``memory.failcnt`` stays 0 even when the limit is hit or the OOM killer fires;
   ``oom_kill`` and usage == limit are what tell.
   Also checks that llama.cpp's 64 greedy tokens equal zipmoe-rt's (unbudgeted) for the prompt.
   Every setting of both programs is printed under the table.

Each program runs with its own defaults: importing ``zipmoe_rt`` sets ``OMP_WAIT_POLICY=PASSIVE``
and ``KMP_BLOCKTIME=0`` in this process's environment (zipmoe_rt/kernels/__init__.py), which a
child would inherit (llama.cpp's OpenMP threads then sleep between ops, measured 15.1 against
39.0 tokens/s). Every child therefore gets the environment as it was when this script started
(:data:`LAUNCH_ENV`; a variable the user set there is kept, and printed).

llama.cpp: a ``llama-bench``/``llama-cli`` on PATH is reported but not used (the tool needs
llama.cpp's Python binding to feed the same token ids); ``--llama-python PY`` uses a Python that
imports ``llama_cpp``, else the tool builds its own venv as in step 1. Where none is installed
and the build cannot run (no network, no compiler), it stops with an error saying so.

Needs root (cgroups, drop_caches), a C/C++ compiler and cmake (first run only, ~10 min on 2 cores).

This file holds the command line, one benchmark case and the run; the steps live beside it:
``llamacpp_setup.py`` (1), ``llamacpp_models.py`` (2), ``llamacpp_cgroup.py`` (3, the cgroup),
``llamacpp_workers.py`` (the benchmark children), ``llamacpp_report.py`` (4, the tables), and
``llamacpp_common.py`` (what they share).
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))     # the helper modules beside it
# first: llamacpp_common keeps the environment from before anything imported zipmoe_rt
from llamacpp_common import (CG_ROOT, LAUNCH_ENV, LLAMA_VERSION, OMP_VARS, QUESTION,  # noqa: E402,F401
                             REPO, Paths, child_env, log, omp_settings, parse_bytes, sh)
from llamacpp_cgroup import drop_page_cache, run_in_cgroup  # noqa: E402,F401
from llamacpp_models import (bench_prompt, ensure_zmoe, zipmoe_chat_check,  # noqa: E402,F401
                             zipmoe_cli, zipmoe_greedy_tokens)
from llamacpp_workers import (LLAMA_SETTINGS, llama_bench_worker, llama_chat_worker,  # noqa: E402,F401
                              zipmoe_bench_worker)
from llamacpp_setup import (base_python, ensure_gguf, ensure_hf_checkpoint,  # noqa: E402,F401
                            ensure_llama, ensure_llama_venv, ensure_sdist, find_llama,
                            llama_chat_check, llama_installed)
from llamacpp_report import fmt_mb, pp_table, settings_text, table  # noqa: E402,F401


# =============================================================================================
# 3. one benchmark case (a child in its own cgroup) and 4. the comparison
# =============================================================================================
def run_case(p: Paths, a, program: str, policy: str | None, limit: int | None, ids, text,
             resident: str = "full") -> dict:
    lim = "none" if limit is None else f"{limit / 1e6:.0f}MB"
    name = f"{program}-{policy or 'mmap'}-{lim}" + ("-compressed" if resident == "compressed"
                                                    else "")
    if program == "llama.cpp":
        cmd = [a.llama_py, __file__, "_llama-bench", "--model", p.gguf, "--threads", a.threads,
               "--prompt-ids", ",".join(map(str, ids)), "--prompt-text", text,
               "--n-gen", a.n_gen, "--reps", a.reps]
        if limit is None and a.pp_ids:            # prefill rows: in memory only
            cmd += ["--pp-ids", ",".join(map(str, a.pp_ids))]
        files = [p.gguf]
    else:
        zlim = "none" if limit is None else a.zipmoe_limit
        cmd = [sys.executable, __file__, "_zipmoe-bench", "--model", p.zmoe, "--limit", zlim,
               "--policy", policy, "--n-gen", a.n_gen, "--reps", a.reps,
               "--resident", resident, "--n-pp", len(a.pp_ids)] + (["--direct"] if a.direct
                                                                     else [])
        files = [p.zmoe]
    how = drop_page_cache(files)
    log(f"run {name} (cache dropped via {how}) ...")
    load0 = os.getloadavg()[0]
    r = run_in_cgroup(name, cmd, limit, timeout=a.timeout, cwd=REPO, env=child_env())
    load1 = os.getloadavg()[0]
    shown = policy and policy + (" --resident compressed" if resident == "compressed" else "")
    if policy is None and resident == "compressed":      # the in-memory row of the compute form
        shown = "--resident compressed"
    row = {"program": program, "policy": shown, "resident": resident, "limit": limit, "name": name,
           "budget": None,
           "cgroup": {k: r.get(k) for k in ("max_usage", "memsw_max_usage", "failcnt",
                                            "memsw_failcnt", "oom_kill", "stat_peaks",
                                            "limit", "memsw_limit", "memsw_error")},
           "wall_s": r["wall_s"], "returncode": r["returncode"], "drop": how,
           "loadavg_1min": [load0, load1]}
    if r["timed_out"]:
        row["error"] = f"timed out after {a.timeout} s (killed)"
    elif r["oom_killed"]:
        row["error"] = (f"OOM-killed inside the cgroup (signal {r['signal']}, failcnt "
                        f"{r['failcnt']}, oom_kill {r['oom_kill']})")
    elif r["returncode"] != 0:
        tail = (r["stderr"] or r["stdout"] or "").strip().splitlines()[-3:]
        row["error"] = f"exit {r['returncode']}: " + " | ".join(tail)
    else:
        try:
            res = json.loads(r["stdout"].strip().splitlines()[-1])
        except (ValueError, IndexError):
            row["error"] = f"no result on stdout: {r['stdout'][-300:]!r} {r['stderr'][-300:]!r}"
            res = None
        if res:
            row["runs"] = res["runs"]
            row["tg_tps"] = [x["decode_tps"] for x in res["runs"]]
            row["tg_median"] = statistics.median(row["tg_tps"])
            row["peak_rss"] = max(x.get("peak_rss", 0) for x in res["runs"])
            pp = [x.get("pp_tps") or (len(a.pp_ids) / x["pp_s"] if x.get("pp_s") else None)
                  for x in res["runs"]]
            if all(pp) and pp:
                row["pp_tps"] = pp
                row["pp_median"] = statistics.median(pp)
            for k in ("memory", "prompt_tokens_match", "load_s", "omp", "settings"):
                if k in res:
                    row[k] = res[k]
            if program == "zipmoe-rt" and limit is not None:
                row["budget"] = (res.get("memory") or {}).get("budget")
            if "engine" in res["runs"][0]:
                e = [x["engine"] for x in res["runs"]]
                hits = {k: sum(x["hits"][k] for x in e) for k in e[0]["hits"]}
                tot = max(1, sum(hits.values()))
                row["hit_rate"] = {k: v / tot for k, v in hits.items()}
                n = max(1, sum(x["decode_steps"] for x in res["runs"]))   # decode steps only
                row["mb_read_per_token"] = sum(x["bytes_read"] for x in e) / n / 1e6
    msg = row.get("error") or (f"tg{a.n_gen} {', '.join(f'{x:.2f}' for x in row['tg_tps'])} "
                              f"tokens/s (median {row['tg_median']:.2f})")
    if "pp_median" in row:
        msg += (f"; pp{len(a.pp_ids)} {', '.join(f'{x:.1f}' for x in row['pp_tps'])} tokens/s "
                f"(median {row['pp_median']:.1f})")
    log(f"  {name}: {msg}; cgroup peak {fmt_mb(row['cgroup']['max_usage'])} MB, failcnt "
        f"{row['cgroup']['failcnt']}, wall {row['wall_s']:.0f} s, load {load0:.1f} -> {load1:.1f}")
    return row


def main(argv=None) -> int:
    if argv is None:
        argv = sys.argv[1:]
    if argv and argv[0].startswith("_"):
        return _worker(argv)
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cache", type=Path, default=Path.home() / ".cache" / "zipmoe-rt" / "llamacpp",
                    help="where the venv, sdist, checkpoint, GGUF, .zmoe and results live")
    ap.add_argument("--limit", default="600MB", help="cgroup memory limit (default 600MB = 600e6 B)")
    ap.add_argument("--zipmoe-limit", default="auto",
                    help="zipmoe-rt's --memory-limit inside the cgroup (default auto: the "
                         "cgroup's limit less the runtime's stated margin; or a size)")
    ap.add_argument("--llama-python", default=None,
                    help="a Python that imports llama_cpp (default: the tool's own venv, built "
                         "from the sdist on first use)")
    ap.add_argument("--policy", action="append", choices=["zipmoe", "zip-lru", "raw-lru"],
                    help="zipmoe-rt policies under the limit (repeatable; default zipmoe, zip-lru)")
    ap.add_argument("--resident", action="append", choices=["full", "compressed"],
                    help="how zipmoe-rt holds experts and dense linears (repeatable: limited "
                         "rows for each, and an in-memory row for compressed; default full)")
    ap.add_argument("--n-prompt", type=int, default=16, help="prompt tokens (default 16)")
    ap.add_argument("--n-gen", type=int, default=64, help="tokens generated (default 64)")
    ap.add_argument("--reps", type=int, default=3, help="repetitions (default 3)")
    ap.add_argument("--n-pp", type=int, default=512,
                    help="prefill tokens of the in-memory rows' pp runs, one forward pass / one "
                         "eval call per repetition (default 512; 0: no pp)")
    ap.add_argument("--in-memory-only", action="store_true",
                    help="only the unlimited rows (both programs in memory: tg and pp)")
    ap.add_argument("--direct", action="store_true",
                    help="zipmoe-rt reads experts with O_DIRECT (no page cache: under a memory "
                         "limit, expert reads then do not push the runtime's own pages out)")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1,
                    help="llama.cpp threads (default: all cores, as llama-bench and llama-cli "
                         "use; llama-cpp-python's own default is half of them)")
    ap.add_argument("--timeout", type=float, default=1800, help="seconds per child (default 1800)")
    ap.add_argument("--no-unlimited", action="store_true", help="skip the unlimited reference rows")
    ap.add_argument("--zipmoe-only", action="store_true",
                    help="no llama.cpp (neither built nor run): zipmoe-rt rows under the limit "
                         "only, e.g. to check a budget quickly")
    ap.add_argument("--setup-only", action="store_true", help="build and check, run no benchmark")
    ap.add_argument("--recalibrate", action="store_true", help="re-run zipmoe-rt calibrate")
    ap.add_argument("--cmake-args", default="-DGGML_NATIVE=ON",
                    help="CMAKE_ARGS for the llama-cpp-python build (default -DGGML_NATIVE=ON)")
    ap.add_argument("--json", type=Path, default=None, help="write all results here")
    a = ap.parse_args(argv)
    policies = a.policy or ["zipmoe", "zip-lru"]
    p = Paths(a.cache.expanduser())
    p.cache.mkdir(parents=True, exist_ok=True)
    if os.geteuid() != 0 and not a.setup_only:
        print("error: run as root (memory cgroups and drop_caches)", file=sys.stderr)
        return 1
    try:
        if not a.zipmoe_only:
            a.llama_py = ensure_llama(p, a)
        ensure_hf_checkpoint(p)
        if not a.zipmoe_only:
            ensure_gguf(p)
        ensure_zmoe(p, a.recalibrate, a.direct)
        answers = {} if a.zipmoe_only else {"llama.cpp": llama_chat_check(p, a.llama_py)}
        answers["zipmoe-rt"] = zipmoe_chat_check(p)
        for k, v in answers.items():
            log(f"{k} answers {QUESTION!r}: {v!r}")
        if a.setup_only:
            return 0
        ids, text = bench_prompt(p, a.n_prompt)
        log(f"prompt ({len(ids)} tokens): {text!r}")
        a.pp_ids = bench_prompt(p, a.n_pp)[0] if a.n_pp > 0 else []
        limit = parse_bytes(a.limit)
        swap_on = any(l.strip() for l in open("/proc/swaps").read().splitlines()[1:])
        cases = [("llama.cpp", None, limit, "full")] + [
            ("zipmoe-rt", pol, limit, res) for res in (a.resident or ["full"]) for pol in policies]
        if not a.no_unlimited:
            cases += [("llama.cpp", None, None, "full")] + [
                ("zipmoe-rt", None, None, res) for res in dict.fromkeys(["full"] + (a.resident or []))]
        if a.zipmoe_only:
            cases = [c for c in cases if c[0] == "zipmoe-rt" and c[2] is not None]
        if a.in_memory_only:
            cases = [c for c in cases if c[2] is None]
        t0 = time.strftime("%Y-%m-%d %H:%M:%S")
        rows = [run_case(p, a, prog, pol, lim, ids, text, res) for prog, pol, lim, res in cases]
        ref_tokens = [] if a.zipmoe_only else zipmoe_greedy_tokens(p, ids, a.n_gen)
    except RuntimeError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    for r in rows:
        if r["program"] == "llama.cpp" and r.get("runs"):
            toks = r["runs"][0]["tokens"]
            r["tokens_equal_zipmoe"] = sum(x == y for x, y in zip(toks, ref_tokens))
            log(f"{r['name']}: {r['tokens_equal_zipmoe']} of {len(toks)} greedy tokens equal "
                f"zipmoe-rt's")
    result = {"date": t0, "limit": limit, "zipmoe_limit": a.zipmoe_limit,
              "launch_env_omp": {k: LAUNCH_ENV.get(k) for k in OMP_VARS}, "n_prompt": len(ids),
              "n_gen": a.n_gen, "n_pp": len(a.pp_ids), "reps": a.reps, "threads": a.threads, "prompt_text": text,
              "prompt_ids": ids, "swap_on": swap_on, "answers": answers,
              "zipmoe_tokens": ref_tokens,
              "gguf": str(p.gguf), "gguf_bytes": p.gguf.stat().st_size if p.gguf.exists() else None,
              "zmoe": str(p.zmoe),
              "zmoe_bytes": p.zmoe.stat().st_size, "rows": rows}
    print(table(rows, a.n_gen))
    if pp_table(rows, len(a.pp_ids)):
        print("\n" + pp_table(rows, len(a.pp_ids)))
    print(f"\nprompt {len(ids)} tokens, tg{a.n_gen}, {a.reps} repetitions, medians; cgroup v1 "
          f"memory limit {limit / 1e6:.0f} MB (memsw the same; swap {'on' if swap_on else 'off'}); "
          f"page cache dropped before each child and the model file's pages before each "
          f"repetition; GGUF {p.gguf.stat().st_size / 1e6 if p.gguf.exists() else 0:.0f} MB BF16, .zmoe "
          f"{p.zmoe.stat().st_size / 1e6:.0f} MB; {t0}")
    print(settings_text(rows, a))
    lt = {r["limit"]: r for r in rows if r["program"] == "llama.cpp"}
    best = max((r for r in rows if r["program"] == "zipmoe-rt" and r["limit"] == limit
                and "tg_median" in r), key=lambda r: r["tg_median"], default=None)
    if best and "tg_median" in lt.get(limit, {}):
        x = best["tg_median"] / lt[limit]["tg_median"]
        print(f"under {limit / 1e6:.0f} MB: zipmoe-rt {best['policy']} / llama.cpp = {x:.2f}x "
              f"(goal >= 10x: {'met' if x >= 10 else 'NOT met'})")
    p.results.mkdir(exist_ok=True)
    out = a.json or p.results / f"compare-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.write_text(json.dumps(result, indent=1))
    log(f"wrote {out}")
    return 0


def _worker(argv) -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("verb", choices=["_llama-chat", "_llama-bench", "_zipmoe-bench"])
    ap.add_argument("--model", required=True)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--prompt-ids", default="")
    ap.add_argument("--prompt-text", default=None)
    ap.add_argument("--n-gen", type=int, default=64)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--limit", default="none")
    ap.add_argument("--policy", default="zipmoe")
    ap.add_argument("--resident", default="full")
    ap.add_argument("--direct", action="store_true")
    ap.add_argument("--pp-ids", default="")
    ap.add_argument("--n-pp", type=int, default=0)
    a = ap.parse_args(argv)
    {"_llama-chat": llama_chat_worker, "_llama-bench": llama_bench_worker,
     "_zipmoe-bench": zipmoe_bench_worker}[a.verb](a)
    return 0


if __name__ == "__main__":
    sys.exit(main())
