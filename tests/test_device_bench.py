"""tools/device_bench.sh: the script parses, and its summary step (the Python the script runs at
the end over the bench JSON files under $OUT) computes the ratios to raw-lru and auto against the
fastest single policy. Input: the 16-core results in docs/results/synthetic-qwen15-16core/ (what
the script wrote on the device)."""
from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "tools" / "device_bench.sh"
RESULTS = ROOT / "docs" / "results" / "synthetic-qwen15-16core"


def test_script_parses():
    bash = shutil.which("bash")
    if bash is None:
        pytest.skip("no bash")
    r = subprocess.run([bash, "-n", str(SCRIPT)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def _summary_code() -> str:
    m = re.search(r"<<'EOF' \|\| echo \"\(summary failed\)\"\n(.*?)\nEOF\n", SCRIPT.read_text(),
                  re.S)
    assert m, "summary heredoc not found in device_bench.sh"
    return m.group(1)


def test_summary_ratios_and_auto_against_best(tmp_path):
    out, work = tmp_path / "out", tmp_path / "work"
    out.mkdir()
    work.mkdir()
    for w in (14, 8, 2):
        shutil.copy(RESULTS / f"workers{w}.json", out / f"bench_w{w}.json")
    (out / "tables.md").write_text("## workers 14\n")
    r = subprocess.run([sys.executable, "-c", _summary_code(), str(out), str(work)],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    text = (out / "tables.md").read_text()
    assert text.endswith("# Per-run tables (bench's own output)\n## workers 14\n")
    assert "tg 13.28 t/s from 1 rows" in text      # raw-lru at 14 workers is the reference
    rows = {tuple(c.strip() for c in line.split("|")[1:3]): line for line in text.splitlines()
            if line.startswith("| ") and line.count("|") == 13}
    assert rows[("14 (4)", "zipmoe")].split("|")[5].strip() == "1.47"   # 19.53 / 13.28
    assert rows[("8 (4)", "zipmoe")].split("|")[5].strip() == "1.57"
    auto = {line.split("|")[1].strip(): [c.strip() for c in line.split("|")[2:8]]
            for line in text.splitlines() if line.count("|") == 8 and line[2:3].isdigit()}
    assert auto["14"] == ["full", "18.55", "zipmoe", "19.53", "0.95", "tiers 5"]
    assert auto["8"] == ["full", "19.05", "zipmoe", "20.84", "0.91", "tiers 5"]
    assert auto["2"] == ["full", "19.16", "zipmoe", "17.82", "1.08", "tiers 5"]
