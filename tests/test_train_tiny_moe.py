"""tools/train_tiny_moe.py: a few steps on a small corpus give a Hugging Face folder that
``zipmoe-rt convert`` takes and the runtime runs like transformers (same greedy tokens); the
routing statistics it prints are shares in [0, 1]; no corpus is a clear error."""
from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parent.parent
TOOL = ROOT / "tools" / "train_tiny_moe.py"


def test_a_few_steps_give_a_checkpoint_the_runtime_runs(tmp_path):
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    rng = np.random.default_rng(0)
    words = ["the", "sea", "ship", "captain", "wind", "night", "sailed", "dark", "and", "a"]
    (corpus / "a.txt").write_text(" ".join(rng.choice(words, 6000)) + "\n")
    out = tmp_path / "hf"
    r = subprocess.run([sys.executable, str(TOOL), "--corpus", str(corpus), "--out", str(out),
                        "--layers", "2", "--hidden", "64", "--experts", "4", "--top-k", "2",
                        "--moe-intermediate", "32", "--vocab", "300", "--seq", "16",
                        "--batch", "2", "--max-steps", "3", "--minutes", "5"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "trained 3 steps" in r.stdout
    rows = re.findall(r"^\s+(\d)\s+(\d+\.\d+) \((\d\.\d+)\)\s+(\d\.\d+)\s+(\S+)$", r.stdout, re.M)
    assert [int(x[0]) for x in rows] == [0, 1]
    for _l, _bits, share, overlap, rec in rows:
        assert 0.0 <= float(share) <= 1.0 and 0.0 <= float(overlap) <= 1.0
    assert rows[1][4] == "-" and 0.0 <= float(rows[0][4]) <= 1.0
    for f in ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert (out / f).is_file(), f

    from zipmoe_rt import load
    from zipmoe_rt.convert.converter import convert
    z = tmp_path / "m.zmoe"
    convert(out, z)
    m = load(z, progress=False)
    try:
        ids = m.tokenizer.encode("the sea and the ship")
        from zipmoe_rt.generate import generate
        from zipmoe_rt.sampling import SamplingParams
        got = [s.token_id for s in generate(m.net, ids, SamplingParams(temperature=0.0,
                                                                       max_tokens=6),
                                            stop_ids=()) if s.token_id is not None]
    finally:
        m.close()
    from transformers import AutoModelForCausalLM
    hf = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    with torch.no_grad():
        want = hf.generate(torch.tensor([ids]), max_new_tokens=6, min_new_tokens=6, do_sample=False,
                           eos_token_id=None)[0, len(ids):].tolist()
    assert got == want


def test_no_corpus_is_a_clear_error(tmp_path):
    r = subprocess.run([sys.executable, str(TOOL), "--corpus", str(tmp_path / "none"),
                        "--out", str(tmp_path / "o")], capture_output=True, text=True,
                       timeout=120)
    assert r.returncode != 0
    assert f"corpus {tmp_path / 'none'} does not exist (give --corpus PATH)" in r.stderr
