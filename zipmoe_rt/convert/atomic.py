"""Publishing finished outputs in one step, so a reader never sees a half-written folder."""
from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def replace_dir(tmp: Path, out_dir: Path) -> Path:
    """Move the completed folder ``tmp`` to ``out_dir``, replacing an existing one.

    The old folder is first renamed aside (same file system), then ``tmp`` is renamed into place,
    then the old one is deleted: ``out_dir`` always names either the old or the new folder.
    """
    tmp, out_dir = Path(tmp), Path(out_dir)
    if out_dir.exists():
        trash = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.old-", dir=out_dir.parent))
        os.replace(out_dir, trash / "old")
        os.replace(tmp, out_dir)
        shutil.rmtree(trash, ignore_errors=True)
    else:
        os.replace(tmp, out_dir)
    return out_dir
