#!/usr/bin/env python
"""Convert a Hugging Face MoE checkpoint folder to .zmoe: the same as `zipmoe-rt convert`.

    python tools/convert_hf_to_zmoe.py HF_DIR -o model.zmoe [--chunks 4] [--dense-encoding raw]
"""
import sys
from pathlib import Path

try:
    import zipmoe_rt  # noqa: F401
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "format"))

from zipmoe_rt.cli import main  # noqa: E402

if __name__ == "__main__":
    main(["convert", *sys.argv[1:]], prog_name="convert_hf_to_zmoe.py")
