"""Step 4 of tools/compare_llamacpp.py: the tables it prints (decode rows, prefill rows) and
every setting of both programs, from the rows of :func:`compare_llamacpp.run_case`.
"""
from __future__ import annotations

from llamacpp_common import LAUNCH_ENV, LLAMA_VERSION, omp_settings


def fmt_mb(x) -> str:
    return "-" if not x else f"{x / 1e6:.0f}"


def pp_table(rows, n_pp) -> str:
    """The prefill rows (in memory): pp tokens/s per program, median and runs, and the ratio
    against llama.cpp's median; empty when no row has a prefill."""
    pr = [r for r in rows if "pp_median" in r]
    if not pr:
        return ""
    ref = next((r["pp_median"] for r in pr if r["program"] == "llama.cpp"), None)
    lines = [f"| program | limit | pp{n_pp} tokens/s (median) | runs | × llama.cpp |",
             "|---|---|---|---|---|"]
    for r in pr:
        ratio = f"{r['pp_median'] / ref:.2f}" if ref else "-"
        prog = r["program"] + (f" {r['policy']}" if r.get("policy") else "")
        lines.append(f"| {prog} | none | {r['pp_median']:.1f} | "
                     f"{', '.join(f'{x:.1f}' for x in r['pp_tps'])} | {ratio} |")
    return "\n".join(lines)


def table(rows, n_gen) -> str:
    head = ["program", "limit", f"tg{n_gen} tokens/s (median)", "runs", "× llama.cpp (same limit)",
            "cgroup peak MB", "anon peak MB", "failcnt", "VmHWM MB", "note"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    ref = {r["limit"]: r["tg_median"] for r in rows if r["program"] == "llama.cpp" and "tg_median" in r}
    for r in rows:
        prog = r["program"] + (f" {r['policy']}" if r["policy"] else "")
        if r["program"] == "zipmoe-rt" and r["budget"]:
            prog += f" (budget {r['budget'] / 1e6:.0f} MB)"
        lim = "none" if r["limit"] is None else f"{r['limit'] / 1e6:.0f} MB"
        med = f"{r['tg_median']:.2f}" if "tg_median" in r else "-"
        runs = ", ".join(f"{x:.2f}" for x in r.get("tg_tps", [])) or "-"
        ratio = (f"{r['tg_median'] / ref[r['limit']]:.2f}" if "tg_median" in r and ref.get(r["limit"])
                 else "-")
        note = r.get("error", "")
        if not note and "hit_rate" in r:
            note = ("hits F/C/S/E/miss " + "/".join(f"{100 * r['hit_rate'][k]:.0f}"
                                                   for k in ("F", "C", "S", "E", "miss")) + " %, "
                    f"{r['mb_read_per_token']:.1f} MB read/token")
        cg = r["cgroup"]
        fails = str(cg["failcnt"]) + (f" (memsw {cg['memsw_failcnt']})" if cg.get("memsw_failcnt")
                                      else "")
        lines.append("| " + " | ".join([prog, lim, med, runs, ratio, fmt_mb(cg["max_usage"]),
                                        fmt_mb((cg.get("stat_peaks") or {}).get("rss")), fails,
                                        fmt_mb(r.get("peak_rss")), note]) + " |")
    return "\n".join(lines)


def settings_text(rows, a) -> str:
    """Every setting of both programs, as the children reported them (one line per row)."""
    out = ["settings (each program with its own defaults; the children get this script's "
           f"environment at its start: {omp_settings(LAUNCH_ENV)}):"]
    for r in rows:
        st = r.get("settings")
        if not st:
            continue
        omp = r.get("omp") or {}
        out.append(f"  {r['name']}: " + ", ".join(f"{k}={v}" for k, v in st.items())
                   + "; " + omp_settings({k: v for k, v in omp.items() if v is not None}))
    if not getattr(a, "zipmoe_only", False):
        out.append(f"  llama.cpp build: llama-cpp-python {LLAMA_VERSION}, CMAKE_ARGS "
                   f"{a.cmake_args!r}, GGUF BF16, prompt evaluated in one call, greedy argmax")
    return "\n".join(out)
