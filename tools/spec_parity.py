"""Print the parity figures of tiny specs against transformers (the numbers models/README.md
quotes): for each spec of ``tests/tiny_models.py`` named on the command line, the largest
|logit difference| at every position of a 16-token prompt between transformers (float32,
eager) and the runtime on the Numba and the NumPy backends, between the two backends, and
whether 20 greedy tokens through the cache equal transformers' (full recompute each step).

Usage (from the repository root)::

    PYTHONPATH=$PWD:$PWD/format python tools/spec_parity.py lfm2_moe lfm2_moe_bias

Needs torch and transformers (the tiny checkpoints are built at run time, in a temporary
folder). Errors: an unknown spec name exits with status 2 and the list of specs.
"""
from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

PROMPT = np.random.default_rng(1).integers(0, 256, 16)
STEPS = 20


def spec_parity(name: str, folder: Path) -> str:
    """One line of figures for spec ``name`` built in ``folder``."""
    import torch
    from hf_parity import hf_logits
    from tiny_models import load_hf, make_tiny

    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    d = make_tiny(name, folder)
    hf = load_hf(d)
    ref = hf_logits(hf, PROMPT)
    seq = [int(t) for t in PROMPT]
    with torch.no_grad():
        for _ in range(STEPS):
            seq.append(int(hf(torch.tensor(seq)[None]).logits[0, -1].argmax()))
    logits, same = {}, {}
    for be in ("numba", "numpy"):
        m = build_model(CheckpointSource(d), backend=be)
        cache = m.new_cache()
        logits[be] = m.forward(PROMPT, cache, last_only=False)
        toks, last = [], logits[be][-1]
        for _ in range(STEPS):
            toks.append(int(last.argmax()))
            last = m.forward(np.array(toks[-1:]), cache)
        same[be] = toks == seq[len(PROMPT):]
    return (f"{name}: max|dlogit| vs transformers numba {np.abs(logits['numba'] - ref).max():.1e}"
            f", numpy {np.abs(logits['numpy'] - ref).max():.1e}; numpy vs numba "
            f"{np.abs(logits['numpy'] - logits['numba']).max():.1e}; {STEPS} greedy tokens = "
            f"transformers': numba {same['numba']}, numpy {same['numpy']}")


def main(argv=None) -> int:
    from tiny_models import SPECS
    names = (sys.argv[1:] if argv is None else argv) or list(SPECS)
    unknown = [n for n in names if n not in SPECS]
    if unknown:
        print(f"unknown spec(s) {', '.join(unknown)}; specs: {', '.join(SPECS)}", file=sys.stderr)
        return 2
    for name in names:
        with tempfile.TemporaryDirectory() as td:
            print(spec_parity(name, Path(td)), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
