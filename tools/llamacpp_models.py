"""Step 2 of tools/compare_llamacpp.py: the zipmoe-rt model (convert, activation trace,
calibration), its chat check, the benchmark prompt and zipmoe-rt's greedy tokens for it.
"""
from __future__ import annotations

import subprocess
import sys

from llamacpp_common import QUESTION, REPO, Paths, child_env, log, sh


# =============================================================================================
# 2. zipmoe-rt model, trace, calibration
# =============================================================================================
def zipmoe_cli(*args) -> subprocess.CompletedProcess:
    return sh([sys.executable, "-m", "zipmoe_rt.cli", *args], cwd=REPO, env=child_env())


def ensure_zmoe(p: Paths, recalibrate: bool, direct: bool = False) -> None:
    """Convert, profile and calibrate the model once (cached). The calibration is redone when
    asked, or when it does not fit the run (``calibration_mismatch``: an older calibration
    version, reads timed in another mode than the run's ``--direct``, another machine)."""
    import zmoe
    trace = p.zmoe.with_name(p.zmoe.name + ".trace.json")
    calib = p.zmoe.with_name(p.zmoe.name + ".calib.json")
    if p.zmoe.exists() and zmoe.file_version(p.zmoe) < zmoe.VERSION:
        log(f"{p.zmoe}: older .zmoe format; reconverting (and re-profiling, recalibrating)")
        for f in (p.zmoe, trace, calib):
            f.unlink(missing_ok=True)
    if not p.zmoe.exists():
        zipmoe_cli("convert", p.hf, "-o", p.zmoe, "-q")
    if not trace.exists():
        zipmoe_cli("profile", p.zmoe, "--prompts", REPO / "tools" / "prompts.txt", "-q")
    if not recalibrate and calib.exists():
        sys.path.insert(0, str(REPO))
        from zipmoe_rt.engine.profile import TraceError, calibration_mismatch, load_calibration
        try:
            why = calibration_mismatch(load_calibration(calib), direct)
        except (OSError, TraceError) as e:
            why = [f"unreadable: {e}"]
        if why:
            log(f"{calib}: recalibrating ({'; '.join(why)})")
            recalibrate = True
    if recalibrate or not calib.exists():
        log(zipmoe_cli("calibrate", p.zmoe, *(["--direct"] if direct else []))
            .stdout.strip().replace("\n", " |"))


def zipmoe_chat_check(p: Paths) -> str:
    r = zipmoe_cli("run", p.zmoe, "-p", QUESTION, "-n", "32", "--temp", "0")   # greedy, as llama.cpp
    if "paris" not in r.stdout.lower():
        raise RuntimeError(f"zipmoe-rt's answer to {QUESTION!r} lacks Paris: {r.stdout!r}")
    return r.stdout.strip()


def bench_prompt(p: Paths, n: int) -> tuple[list[int], str]:
    """The prompt of ``zipmoe-rt bench``'s tg runs: its ``prompt_ids(tokenizer, n)``."""
    from zipmoe_rt.api import tokenizer_from_source
    from zipmoe_rt.bench import prompt_ids
    from zipmoe_rt.engine.store import ZmoeSource
    src = ZmoeSource(p.zmoe)
    tok = tokenizer_from_source(src)
    ids = [int(i) for i in prompt_ids(tok, n)]
    text = tok.decode(ids)
    src.close()
    return ids, text


def zipmoe_greedy_tokens(p: Paths, ids, n: int) -> list[int]:
    """zipmoe-rt's greedy continuation of ``ids`` (no budget, EOS ignored), to compare the
    tokens both programs decode."""
    from zipmoe_rt.api import load
    from zipmoe_rt.generate import SamplingParams, generate
    m = load(p.zmoe, progress=False)
    try:
        return [int(t) for t in generate(m.net, ids, SamplingParams(temperature=0.0, max_tokens=n),
                                         stop_ids=()).collect()]
    finally:
        m.close()
