#!/usr/bin/env python
"""Decode tokens/s of zipmoe-rt (in memory) beside Hugging Face transformers on the same checkpoint,
in the same run (needs the test extra: torch + transformers).

    python tools/bench_vs_transformers.py [HF_DIR] [-n 64] [--runs 3]

HF_DIR defaults to the bundled default model's checkpoint, built into a temporary folder. Our side
loads the ``.zmoe`` converted from the same folder. Each side: a 16-token prompt, greedy, ``-n``
tokens with EOS ignored, timed after one warm-up run; medians of ``--runs``.
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

try:
    import zipmoe_rt  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def ours(zmoe_path, ids, n, runs):
    import zipmoe_rt
    from zipmoe_rt.generate import SamplingParams, generate
    m = zipmoe_rt.load(zmoe_path)
    rates = []
    for r in range(runs + 1):
        gen = generate(m.net, ids, SamplingParams(max_tokens=n), stop_ids=())
        toks = [s.token_id for s in gen if s.token_id is not None]
        if r:
            rates.append(gen.stats.decode_tokens_per_s)
    return statistics.median(rates), toks


def theirs(hf_dir, ids, n, runs, dtype):
    import torch
    from transformers import AutoModelForCausalLM
    torch.set_num_threads(os.cpu_count())
    model = AutoModelForCausalLM.from_pretrained(hf_dir, dtype=dtype).eval()
    x = torch.tensor([ids])
    rates = []
    with torch.no_grad():
        for r in range(runs + 1):
            out = model(x, use_cache=True)
            past, tok = out.past_key_values, out.logits[0, -1].argmax()
            toks = [int(tok)]
            t0 = time.perf_counter()
            for _ in range(n - 1):
                out = model(tok.view(1, 1), past_key_values=past, use_cache=True)
                past, tok = out.past_key_values, out.logits[0, -1].argmax()
                toks.append(int(tok))
            if r:
                rates.append((n - 1) / (time.perf_counter() - t0))
    return statistics.median(rates), toks


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("hf_dir", nargs="?", type=Path)
    ap.add_argument("-n", type=int, default=64)
    ap.add_argument("--runs", type=int, default=3)
    a = ap.parse_args(argv)
    from zipmoe_rt.convert.converter import convert
    with tempfile.TemporaryDirectory() as d:
        hf = a.hf_dir
        if hf is None:
            from zipmoe_rt.convert.smollm2 import build_upcycled_checkpoint, locate_smollm2_gguf
            from zipmoe_rt.default_model import cache_dir
            hf = build_upcycled_checkpoint(locate_smollm2_gguf(cache_dir()), Path(d) / "hf",
                                           progress=False)
        z = convert(hf, Path(d) / "m.zmoe", progress=False)
        from zipmoe_rt.tokenizer import Tokenizer
        ids = Tokenizer.from_dir(hf).encode("The history of the city begins in the year", False)[:16]
        import torch
        r_ours, t_ours = ours(z, ids, a.n, a.runs)
        r32, t32 = theirs(hf, ids, a.n, a.runs, torch.float32)
        r16, _ = theirs(hf, ids, a.n, a.runs, torch.bfloat16)
    print(f"decode tokens/s, greedy, {a.n} tokens, median of {a.runs}, {os.cpu_count()} cores:")
    print(f"  zipmoe-rt (BF16 weights, fp32 math)  {r_ours:7.2f}")
    print(f"  transformers fp32                    {r32:7.2f}   ratio zipmoe/transformers {r_ours / r32:.1f}x")
    print(f"  transformers bf16                    {r16:7.2f}   ratio zipmoe/transformers {r_ours / r16:.1f}x")
    same = sum(x == y for x, y in zip(t_ours, t32))
    print(f"  greedy tokens identical to transformers fp32: {same}/{len(t32)}")


if __name__ == "__main__":
    main()
