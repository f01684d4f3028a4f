#!/usr/bin/env python
"""Peak memory of ``zipmoe-rt run --memory-limit`` on a cold and on a warm Numba kernel cache.

    .venv/bin/python tools/firstrun_rss.py MODEL.zmoe --limit 600MB \\
        --row "zipmoe=--policy zipmoe" --row "compressed=--resident compressed" \\
        [--runtime DIR] [--json OUT.json]

Every row runs twice, each time as ``zipmoe-rt run MODEL -p "The capital of France is" -n 16
--temp 0 --memory-limit LIMIT OPTIONS`` under ``/usr/bin/time -v`` in a fresh memory cgroup v1
limited to ``LIMIT`` (``tools/llamacpp_cgroup.py``; page cache dropped first): ``cold``, with
an empty private ``NUMBA_CACHE_DIR`` and an empty private cache folder (``ZIPMOE_RT_HOME``: no
remembered overhead), as the first run after an install; then ``warm``, with the cache folders
the cold run left. Prints per run the process's peak RSS ("Maximum resident set size"), the
cgroup's ``max_usage_in_bytes``, the completion and the stderr notices. The private folders
never touch the shared caches. ``--runtime DIR`` runs the runtime found in DIR (another
checkout, for a before/after). Needs root (cgroups, drop_caches).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from llamacpp_cgroup import drop_page_cache, run_in_cgroup  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
PROMPT = "The capital of France is"


def one(model: Path, where: Path, opts: list, limit: str, limit_bytes: int, home: Path,
        numba_dir: Path) -> dict:
    """One ``run`` in a fresh cgroup; its peak RSS, cgroup peak and output."""
    drop_page_cache([model])
    env = dict(os.environ, PYTHONPATH=f"{where}{os.pathsep}{where / 'format'}",
               ZIPMOE_RT_HOME=str(home), NUMBA_CACHE_DIR=str(numba_dir))
    cmd = ["/usr/bin/time", "-v", sys.executable, "-m", "zipmoe_rt.cli", "run", str(model),
           "-p", PROMPT, "-n", "16", "--temp", "0", "--memory-limit", limit] + opts
    r = run_in_cgroup("firstrun", cmd, limit_bytes, timeout=900, env=env, cwd=str(where))
    m = re.search(r"Maximum resident set size \(kbytes\): (\d+)", r["stderr"])
    notices = [ln for ln in r["stderr"].splitlines()
               if ln and not ln.startswith("\t") and "Command being timed" not in ln]
    return {"returncode": r["returncode"], "peak_rss": int(m.group(1)) * 1024 if m else None,
            "cgroup_max_usage": r["max_usage"], "oom_killed": r["oom_killed"],
            "failcnt": r["failcnt"], "completion": r["stdout"].strip(),
            "stderr": notices[-12:], "wall_s": round(r["wall_s"], 1)}


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model", type=Path)
    ap.add_argument("--limit", default="600MB")
    ap.add_argument("--row", action="append", required=True, help="NAME=OPTIONS")
    ap.add_argument("--runtime", type=Path, default=REPO)
    ap.add_argument("--json", type=Path)
    a = ap.parse_args()
    sys.path.insert(0, str(REPO))
    from zipmoe_rt.engine.limit import parse_limit
    limit_bytes = parse_limit(a.limit)
    results = []
    for spec in a.row:
        name, _, opts = spec.partition("=")
        tmp = Path(tempfile.mkdtemp(prefix="firstrun-"))
        try:
            for state in ("cold", "warm"):
                r = one(a.model.resolve(), a.runtime.resolve(), opts.split(), a.limit,
                        limit_bytes, tmp / "home", tmp / "numba")
                r.update(row=name, state=state, options=opts)
                results.append(r)
                print(f"{name:12s} {state:5s} rc={r['returncode']} peak RSS "
                      f"{(r['peak_rss'] or 0) / 1e6:6.1f} MB  cgroup max_usage "
                      f"{r['cgroup_max_usage'] / 1e6:6.1f} MB  oom={r['oom_killed']}  "
                      f"{r['completion'][:40]!r}", flush=True)
                for ln in r["stderr"]:
                    print(f"    {ln[:200]}", flush=True)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    if a.json:
        a.json.write_text(json.dumps({"model": str(a.model), "limit": a.limit,
                                      "runtime": str(a.runtime), "rows": results}, indent=1))


if __name__ == "__main__":
    main()
