#!/usr/bin/env bash
# One-call CPU benchmark of zipmoe-rt on a bare machine (the device tool's nvidia-h200: 16 cores,
# no network): install the carried wheels, generate a synthetic Qwen1.5-MoE-shaped checkpoint,
# convert it (bit-plane and raw experts), record a trace, calibrate, then `zipmoe-rt bench` at
# several decode-worker counts, each with the policies zip-lru, zipmoe and auto (and raw-lru at
# the DEVICE_BENCH_RAW_AT counts). Everything that must come back goes to $OUT (<= 8 files):
#   bench_wW.json (one per worker count), tables.md (combined + per-run tables, auto against the
#   best single policy), log.txt, meta.tar.gz (synthetic.json, trace, calib, environment).
#
# Needs (carried, ignored by git): .whl/ (zstandard, gguf wheels for the device's Python),
# .dev/smollm2-reduced.gguf (weight pools + tokenizer, ~29 MB, written by
# `python tools/make_synthetic_checkpoint_gguf.py .dev/smollm2-reduced.gguf`),
# .dev/gutenberg/*.txt (calibration text, bench prompt text; a copy of shared/corpora/gutenberg).
# Run from anywhere:  bash tools/device_bench.sh
#
# Environment knobs:
#   DEVICE_BENCH_SMALL=1     dry run: 1 layer, hidden 256, experts of 128 (60 of them), W in "1 2"
#   DEVICE_BENCH_LAYERS=N    decoder layers of the full-width model (default 5)
#   DEVICE_BENCH_WORKERS     worker counts, run in this order (default "14 1 4 8 2")
#   DEVICE_BENCH_RAW_AT      worker counts whose run also has raw-lru (default "14 1")
#   DEVICE_BENCH_POLICIES    policies of every run besides raw-lru (default "zip-lru zipmoe auto")
#   DEVICE_BENCH_RESIDENT    expert residency of the rows, a row each (default "full"; e.g.
#                            "full compressed" adds `--resident compressed` rows)
#   DEVICE_BENCH_DEADLINE    seconds after start by which everything must be over (default 555)
#   DEVICE_BENCH_WORK        work folder (default: first non-tmpfs of /var/tmp, /root, /tmp)
#   DEVICE_BENCH_DROP=0|1    drop the page cache before each bench (default 1; 0 when SMALL)
#   DEVICE_BENCH_REUSE=1     keep the model and trace a previous call left in the work folder
#                            (same machine, still warm): recalibrate, then only run the benches
#   DEVICE_BENCH_IO_DEPTH    --io-depth of every bench (default: the runtime's default); the
#                            JSON files are then named bench_wW_dD.json
#   DEVICE_BENCH_COMMIT      commit to record in env.txt where the copy has no .git
#   PYTHON                   interpreter (default python3)
set -u -o pipefail
T0=$(date +%s)
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$REPO" || exit 1
OUT=${OUT:-/tmp/device_bench_out}
mkdir -p "$OUT"
exec > >(tee -a "$OUT/log.txt") 2>&1

SMALL=${DEVICE_BENCH_SMALL:-0}
DEADLINE=${DEVICE_BENCH_DEADLINE:-555}
PY=${PYTHON:-python3}
if [ "$SMALL" = 1 ]; then
  WLIST=${DEVICE_BENCH_WORKERS:-"1 2"}
  RAW_AT=${DEVICE_BENCH_RAW_AT:-"1"}
  DROP=${DEVICE_BENCH_DROP:-0}
  GEN_ARGS=(--layers 1 --hidden 256 --heads 4 --kv-heads 4 --moe-intermediate 128
            --shared-intermediate 512)
else
  WLIST=${DEVICE_BENCH_WORKERS:-"14 1 4 8 2"}
  RAW_AT=${DEVICE_BENCH_RAW_AT:-"14 1"}
  DROP=${DEVICE_BENCH_DROP:-1}
  GEN_ARGS=(--layers "${DEVICE_BENCH_LAYERS:-5}")
fi
BENCH_ARGS=(--memory-budget 25% -p 128 -n 32 -r 2)
POLICIES=${DEVICE_BENCH_POLICIES:-"zip-lru zipmoe auto"}
RESIDENT=${DEVICE_BENCH_RESIDENT:-"full"}
for r in $RESIDENT; do BENCH_ARGS+=(--resident "$r"); done
NRES=$(echo $RESIDENT | wc -w)

elapsed() { echo $(( $(date +%s) - T0 )); }
left() { echo $(( DEADLINE - $(date +%s) + T0 )); }
phase() { echo; echo "=== $(date '+%F %T') [+$(elapsed)s, $(left)s left] $*"; }
run() { echo "+ $*" >&2; "$@"; }
# run with a time limit (seconds); the whole process group is signalled at the limit
limited() {
  local t=$1; shift
  if [ "$t" -lt 5 ]; then echo "SKIP (no time left): $*"; return 124; fi
  echo "+ (limit ${t}s) $*" >&2; timeout -k 10 "$t" "$@"
}
die() { echo "FATAL: $*"; finish; exit 1; }

finish() {
  phase "finish"
  if [ -n "${WARM_PID:-}" ] && kill -0 "$WARM_PID" 2>/dev/null; then   # warm-up still running
    pkill -P "$WARM_PID"; kill "$WARM_PID" 2>/dev/null
  fi
  [ -n "${WORK:-}" ] && [ -d "$WORK" ] || return 0
  "$PY" - "$OUT" "$WORK" <<'EOF' || echo "(summary failed)"
import glob, json, os, statistics as S, sys
out, work = sys.argv[1], sys.argv[2]
res = []
for p in glob.glob(os.path.join(out, "bench_w*.json")):
    try:
        res.append(json.load(open(p)))
    except Exception as e:  # noqa: BLE001
        print(f"skip {p}: {e}")
if not res:
    sys.exit(0)
raw = [S.mean(r["tg_tps"]) for x in res for r in x["rows"] if r["policy"] == "raw-lru"]
rawpp = [S.mean(r["pp_tps"]) for x in res for r in x["rows"] if r["policy"] == "raw-lru"]
ref, refpp = (S.mean(raw) if raw else None), (S.mean(rawpp) if rawpp else None)
L = ["# Summary (all runs; ratios to the mean raw-lru tg/pp over all its rows: "
     + (f"tg {ref:.2f} t/s from {len(raw)} rows" if ref else "no raw-lru row") + ")", "",
     "| workers (io depth) | policy | pp t/s | tg t/s | tg × raw-lru | pp × raw-lru | TTFT s | TPOT ms | "
     "hits F/C/S/E/miss % | MB read/tok | io/dec/wait/mm ms/tok | peak RSS MB |",
     "|" + "---|" * 12]
def sd(a):
    return S.stdev(a) if len(a) > 1 else 0.0
for x in sorted(res, key=lambda x: (x["env"]["workers"], x["env"].get("io_depth", 1))):
    for r in x["rows"]:
        tg, pp = S.mean(r["tg_tps"]), S.mean(r["pp_tps"])
        h = "/".join(f"{100 * r['hit_rate'][k]:.0f}" for k in ("F", "C", "S", "E", "miss")) \
            if "hit_rate" in r else "-"
        st = r.get("stage_ms_per_token")
        st = "/".join(f"{st[k]:.1f}" for k in ("io_s", "decode_s", "wait_s", "compute_s")) if st else "-"
        L.append(" | ".join([
            f"| {x['env']['workers']} ({x['env'].get('io_depth', 1)})", r["policy"], f"{pp:.2f} ± {sd(r['pp_tps']):.2f}",
            f"{tg:.2f} ± {sd(r['tg_tps']):.2f}", f"{tg / ref:.2f}" if ref else "-",
            f"{pp / refpp:.2f}" if refpp else "-", f"{S.mean(r['ttft_s']):.3f}",
            f"{1e3 * S.mean(r['tpot_s']):.1f}", h,
            f"{r.get('bytes_read_per_token', 0) / 1e6:.1f}", st, f"{r['peak_rss'] / 1e6:.0f} |"]))
# auto against the fastest single policy of the same run and residency (issue goal: >= 0.95)
L += ["", "| workers | resident | auto tg t/s | best single policy | its tg t/s | auto ÷ best | auto's choice |",
      "|" + "---|" * 7]
for x in sorted(res, key=lambda x: (x["env"]["workers"], x["env"].get("io_depth", 1))):
    for res_mode in sorted({r.get("resident", "full") for r in x["rows"]}):
        rows = [r for r in x["rows"] if r.get("resident", "full") == res_mode and r.get("tg_tps")]
        auto = [r for r in rows if r["policy"].split()[0] == "auto"]
        single = [r for r in rows if r["policy"].split()[0] != "auto"]
        if not auto or not single:
            continue
        a = S.mean(auto[0]["tg_tps"])
        best = max(single, key=lambda r: S.mean(r["tg_tps"]))
        b = S.mean(best["tg_tps"])
        ac = auto[0].get("auto_choice") or {}
        ch = (("zip-lru, one shared LRU pool" if ac.get("engine", "zipmoe") != "zipmoe"
               else ac.get("summary", "-")) if "codes" in ac
              else f"{ac['fallback']} ({ac.get('why', '')})" if "fallback" in ac else "-")
        L.append(f"| {x['env']['workers']} | {res_mode} | {a:.2f} | {best['policy']} | {b:.2f} | "
                 f"{a / b:.2f} | {ch} |")
e = res[0]["env"]
L.append(f"\n{e['name']}: {e['experts']} experts, top-{e['top_k']}; {e['cpus']} CPUs; pp{e['pp']} "
         f"tg{e['tg']} x{e['reps']}; file {e['file_bytes'] / 1e9:.2f} GB; baseline RSS "
         f"{e.get('baseline_rss', 0) / 1e6:.0f} MB")
tables = os.path.join(out, "tables.md")
old = open(tables).read() if os.path.exists(tables) else ""
open(tables, "w").write("\n".join(L) + "\n\n# Per-run tables (bench's own output)\n" + old)
print("\n".join(L))
EOF
  ( cd "$WORK" && tar czf "$OUT/meta.tar.gz" --ignore-failed-read env.txt synthetic.json config.json model.zmoe.trace.json model.zmoe.calib.json convert*.txt 2>/dev/null ) || true
  phase "done"
  ls -la "$OUT"
}

# -------------------------------------------------------------------------------------------
phase "start: repo $REPO, out $OUT, small=$SMALL, deadline ${DEADLINE}s, workers '$WLIST'"
export PYTHONUNBUFFERED=1

# wheels (only when the modules are missing, as on the device; cp312 wheels do not fit elsewhere)
if ! "$PY" -c 'import zstandard, gguf' 2>/dev/null; then
  phase "install wheels"
  SITE=${DEVICE_BENCH_SITE:-/tmp/site}
  ls .whl/*.whl >/dev/null 2>&1 || die "no .whl/*.whl (carry .whl)"
  run "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || die "wheel install failed"
  export PYTHONPATH=$SITE${PYTHONPATH:+:$PYTHONPATH}
fi
export PYTHONPATH=$REPO:$REPO/format${PYTHONPATH:+:$PYTHONPATH}

# work folder on a real disk (the bench evicts the model from the page cache: not on tmpfs)
WORK=
for d in ${DEVICE_BENCH_WORK:-} /var/tmp/zipmoe-bench /root/zipmoe-bench /tmp/zipmoe-bench; do
  mkdir -p "$d" 2>/dev/null || continue
  case $(stat -f -c %T "$d") in tmpfs|ramfs) continue ;; esac
  WORK=$d; break
done
[ -n "$WORK" ] || { WORK=/tmp/zipmoe-bench; mkdir -p "$WORK"; echo "WARNING: $WORK is tmpfs"; }
export NUMBA_CACHE_DIR=$WORK/numba-cache

phase "environment (work folder $WORK)"
{
  echo "date: $(date)"; echo "uname: $(uname -a)"; echo "nproc: $(nproc)"
  grep -m1 'model name' /proc/cpuinfo; free -g; df -hT "$WORK" "$REPO" /tmp
  echo "python: $(command -v "$PY")"
  "$PY" -c 'import sys, numpy, numba, tokenizers, click, jinja2, tqdm, zstandard, gguf
print(sys.version.split()[0], "numpy", numpy.__version__, "numba", numba.__version__,
      "tokenizers", tokenizers.__version__, "click", click.__version__, "jinja2", jinja2.__version__,
      "tqdm", tqdm.__version__, "zstandard", zstandard.__version__)
print("numba threads", numba.config.NUMBA_NUM_THREADS)'
  echo "small=$SMALL gen=${GEN_ARGS[*]} bench=${BENCH_ARGS[*]} workers='$WLIST' raw_at='$RAW_AT'"
  echo "policies='$POLICIES' resident='$RESIDENT'"
  echo "source commit: ${DEVICE_BENCH_COMMIT:-$(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)}"
} 2>&1 | tee "$WORK/env.txt"
"$PY" -c 'import zipmoe_rt.cli, zstandard, gguf, numba' || die "imports failed"

# corpus: the bench's prompt text and the generator's default calibration text are read from
# <repo parent>/shared/corpora/gutenberg (the checkout's sibling; it does not travel)
CORP=$("$PY" -c 'from pathlib import Path; import zipmoe_rt.bench as b
print(Path(b.__file__).resolve().parents[2] / "shared" / "corpora" / "gutenberg")')
CALIB=()
if [ ! -f "$CORP/austen-emma.txt" ]; then
  if mkdir -p "$CORP" 2>/dev/null && cp .dev/gutenberg/*.txt "$CORP"/; then
    echo "placed .dev/gutenberg in $CORP"
  else
    echo "WARNING: could not place the corpus in $CORP: bench prompts use filler text"
    CALIB=(--calib-text .dev/gutenberg/*.txt)
  fi
fi

# Numba JIT warm-up in the background, while the (mostly one-thread) generator runs: a tiny model
# of the same family compiles the same kernel specialisations into $NUMBA_CACHE_DIR (first
# compile ~30-100 s of one core), so the profile and bench processes only load them.
REUSE=0
if [ "${DEVICE_BENCH_REUSE:-0}" = 1 ] && [ -f "$WORK/model.zmoe" ] && [ -f "$WORK/model.raw.zmoe" ] \
    && [ -f "$WORK/model.zmoe.calib.json" ] && [ -f "$WORK/model.zmoe.trace.json" ]; then
  REUSE=1
fi
rm -rf "$WORK/warm" "$WORK"/warm.*
[ "$REUSE" = 1 ] || {
head -2 tools/prompts.txt > "$WORK/warm_prompts.txt"
(
  timeout -k 5 240 "$PY" tools/make_synthetic_checkpoint.py "$WORK/warm/hf" --layers 1 --hidden 256 --heads 4 \
      --kv-heads 4 --moe-intermediate 128 --shared-intermediate 512 --calib-seqs 4 -q \
      --gguf .dev/smollm2-reduced.gguf "${CALIB[@]}" &&
  timeout -k 5 120 "$PY" -m zipmoe_rt.cli convert "$WORK/warm/hf" -o "$WORK/warm/warm.zmoe" -f -q \
      --no-verify &&
  timeout -k 5 240 "$PY" -m zipmoe_rt.cli profile "$WORK/warm/warm.zmoe" --prompts "$WORK/warm_prompts.txt" -n 4 -q
) > "$WORK/warm.log" 2>&1 &
WARM_PID=$!
echo "JIT warm-up started (pid $WARM_PID)"
}

# -------------------------------------------------------------------------------------------
IOD=${DEVICE_BENCH_IO_DEPTH:-}
SUFFIX=${IOD:+_d$IOD}
[ -n "$IOD" ] && BENCH_ARGS+=(--io-depth "$IOD")
HF=$WORK/qwen1.5-moe-synth-$([ "$SMALL" = 1 ] && echo small || echo "L${DEVICE_BENCH_LAYERS:-5}")
MODEL=$WORK/model.zmoe
RAW=$WORK/model.raw.zmoe
if [ "$REUSE" = 1 ]; then
  phase "reuse the model and trace in $WORK; recalibrate (this code, this io depth)"
  ls -la "$WORK"
  limited $(( $(left) < 90 ? $(left) : 90 )) "$PY" -m zipmoe_rt.cli calibrate "$MODEL" \
      ${IOD:+--io-depth "$IOD"} || die "calibrate failed"
  cat "$MODEL.calib.json"
else
  phase "generate synthetic checkpoint: ${GEN_ARGS[*]}"
  rm -rf "$WORK"/qwen1.5-moe-synth-* "$MODEL" "$RAW" "$MODEL".*.json "$WORK"/synthetic.json "$WORK"/config.json \
      "$WORK"/convert*.txt "$WORK"/table_w*.md
  limited $(( $(left) - 200 )) "$PY" tools/make_synthetic_checkpoint.py "$HF" "${GEN_ARGS[@]}" \
      --gguf .dev/smollm2-reduced.gguf --overwrite "${CALIB[@]}" || die "generation failed"
  du -sh "$HF"

  phase "convert (bit-plane experts)"
  limited $(( $(left) - 150 )) "$PY" -m zipmoe_rt.cli convert "$HF" -o "$MODEL" -f -q \
      | tee "$WORK/convert.txt" || die "convert failed"
  phase "convert (raw experts)"
  limited $(( $(left) - 120 )) "$PY" -m zipmoe_rt.cli convert "$HF" -o "$RAW" \
      --expert-encoding raw --no-verify -f -q | tee "$WORK/convert_raw.txt" || die "raw convert failed"
  # keep the generator's summary, drop the checkpoint (its dirty pages need not reach the disk)
  cp "$HF/synthetic.json" "$WORK/synthetic.json"; cp "$HF/config.json" "$WORK/config.json"
  rm -rf "$HF"
  ls -la "$WORK"; df -h "$WORK"

  phase "wait for the JIT warm-up"
  wait "$WARM_PID"; echo "warm-up rc $?"; cat "$WORK/warm.log"; rm -rf "$WORK/warm"

  phase "profile (activation trace)"
  limited $(( $(left) - 100 )) "$PY" -m zipmoe_rt.cli profile "$MODEL" --prompts tools/prompts.txt \
      -n 16 -q || die "profile failed"
  phase "calibrate"
  limited $(( $(left) < 60 ? $(left) : 60 )) "$PY" -m zipmoe_rt.cli calibrate "$MODEL" \
      ${IOD:+--io-depth "$IOD"} || die "calibrate failed"
  cat "$MODEL.calib.json"

fi

# -------------------------------------------------------------------------------------------
ROW_S=0   # seconds per bench row (one policy x residency) of the last bench
for W in $WLIST; do
  POL=()
  for p in $POLICIES; do POL+=(--policy "$p"); done
  case " $RAW_AT " in *" $W "*) POL=(--policy raw-lru "${POL[@]}") ;; esac
  np=$(( ${#POL[@]} / 2 * NRES ))   # rows of this bench
  est=$(( ROW_S * np ))
  budget=$(( $(left) - 25 ))
  phase "bench workers=$W (${POL[*]}, resident $RESIDENT: $np rows), estimate ${est}s, ${budget}s available"
  if [ "$budget" -lt 30 ] || [ $(( est * 11 / 10 )) -gt "$budget" ]; then
    echo "SKIP workers=$W: not enough time left"; continue
  fi
  if [ "$DROP" = 1 ]; then echo "sync + drop_caches"; sync; echo 3 > /proc/sys/vm/drop_caches || echo "(drop_caches failed)"; fi
  s=$(date +%s)
  limited "$budget" "$PY" -m zipmoe_rt.cli bench "$MODEL" "${BENCH_ARGS[@]}" "${POL[@]}" \
      --raw-model "$RAW" --workers "$W" --json "$OUT/bench_w$W$SUFFIX.json" > "$WORK/table_w$W.md"
  rc=$?
  cat "$WORK/table_w$W.md"
  took=$(( $(date +%s) - s ))
  ROW_S=$(( (took + np - 1) / np ))
  [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ] && ROW_S=$(( ROW_S * 2 ))   # cut short: longer
  echo "bench workers=$W: rc $rc, ${took}s (${ROW_S}s per row)"
  { echo "## workers $W${IOD:+, io depth $IOD} (rc $rc, ${took} s)"; echo; cat "$WORK/table_w$W.md"; echo; } \
      >> "$OUT/tables.md"
done

finish
