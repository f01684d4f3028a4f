"""A short soak (tools/soak.py) on the tiny chat model: 2,000 generated tokens and 100 chat
turns with /reset, in a child process with a time limit; memory must stay flat after the
warm-up (RSS minus the most the KV cache and the experts have held, within the tool's tolerance), the
KV cache within the context and the expert cache within its budget. The long version is run
by hand (see the tool)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_api import make_chat_model

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def tiny_zmoe(tiny_moe_dir, tmp_path_factory) -> Path:
    return make_chat_model(tiny_moe_dir("mixtral"), tmp_path_factory.mktemp("soak") / "tiny-chat")


@pytest.mark.parametrize("budget,tokens,turns", [("50%", 2000, 100), (None, 1000, 50)],
                         ids=["budgeted", "unbudgeted"])
def test_short_soak_keeps_memory_flat_and_caches_bounded(tiny_zmoe, tmp_path, budget, tokens,
                                                         turns):
    out = tmp_path / "soak.json"
    env = {k: v for k, v in os.environ.items() if k != "ZIPMOE_RT_DEBUG"}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(ROOT / "format")])
    argv = [sys.executable, str(ROOT / "tools" / "soak.py"), str(tiny_zmoe), "--tokens",
            str(tokens), "--turns", str(turns), "--minutes", "4", "--sample-every", "100",
            "--sample-every-turns", "5", "--reset-every", "10", "--json", str(out)]
    if budget:
        argv += ["--memory-budget", budget]
    r = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    res = json.loads(out.read_text())
    assert res["failures"] == []
    assert res["tokens"] > 0 and res["turns"] > 0
    for f in res["flat"]:
        assert f["checked"] and f["samples"] >= 4, f
        assert f["growth_mb"] <= f["tolerance_mb"] <= 8.0 + 0.02 * f["baseline_mb"] + 0.01, f
    ctx = res["context"]
    assert ctx == 512
    for s in res["samples"]:
        assert s["kv_held"] <= ctx and s["kv_capacity"] <= max(256, 2 * s["kv_held"]), s
        if budget:
            assert s["experts"] <= s["experts_allowed"], s
        else:
            assert s["experts_allowed"] is None
    # /reset gives the conversation's KV memory back: the last sample holds nothing
    assert res["samples"][-1]["kv_held"] == 0
    assert "OK: memory flat after warm-up" in r.stdout
