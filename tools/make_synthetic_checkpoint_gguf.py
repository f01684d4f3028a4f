#!/usr/bin/env python
"""Write a reduced copy of the SmolLM2 GGUF that ``make_synthetic_checkpoint.py --gguf`` reads:
the same metadata (tokenizer, chat template, special ids), the blocks of every ``--every``-th
layer and ``--embed-rows`` random rows of the token embedding, so that it travels where the full
file (98 MB) does not (``tools/device_bench.sh`` carries it as ``.dev/smollm2-reduced.gguf``).

    python tools/make_synthetic_checkpoint_gguf.py .dev/smollm2-reduced.gguf \\
        [--source PATH] [--every 3] [--embed-rows 8192] [--seed 0]

What the generator takes from the file (``synthetic_pools.RealPools``) stays real SmolLM2 data:
the value pools are drawn from the kept layers (layers 0, 3, ..., 27 with ``--every 3``) instead
of all 30, and the embedding pool from the kept rows (the generator draws 8192 rows of the full
embedding too). The tensors keep their quantisation (Q4_1 / Q8_0 / F32) byte for byte. With the
defaults the file is about 27 MB.

Errors: a missing ``--source`` file, or ``--every`` / ``--embed-rows`` < 1, exit with status 1
and a message naming it.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def reduce_gguf(source, dest, every: int = 3, embed_rows: int = 8192, seed: int = 0) -> dict:
    """Copy ``source`` (a llama-architecture GGUF) to ``dest`` keeping every metadata field, the
    ``blk.N.*`` tensors of layers ``N % every == 0``, the non-block tensors, and ``embed_rows``
    rows of ``token_embd.weight`` (a seeded random subset, in ascending order; all rows if it has
    fewer). Returns ``{"layers": [...], "embed_rows": n, "bytes": size of dest}``.

    Raises:
        FileNotFoundError: ``source`` does not exist.  ValueError: ``every`` or ``embed_rows`` < 1.
    """
    import gguf

    if every < 1 or embed_rows < 1:
        raise ValueError("--every and --embed-rows must be >= 1")
    source, dest = Path(source), Path(dest)
    if not source.is_file():
        raise FileNotFoundError(f"{source}: no such GGUF file")
    reader = gguf.GGUFReader(source)
    arch = reader.fields[gguf.Keys.General.ARCHITECTURE].contents()
    dest.parent.mkdir(parents=True, exist_ok=True)
    writer = gguf.GGUFWriter(dest, arch, endianess=reader.endianess)
    for field in reader.fields.values():
        if field.name == gguf.Keys.General.ARCHITECTURE or field.name.startswith("GGUF."):
            continue   # written by GGUFWriter itself
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        writer.add_key_value(field.name, field.contents(), vtype, sub_type=sub)
    rng = np.random.default_rng([seed, 7])
    kept, layers, n_embed = [], set(), 0
    for t in reader.tensors:
        data = t.data
        if t.name.startswith("blk."):
            layer = int(t.name.split(".")[1])
            if layer % every:
                continue
            layers.add(layer)
        elif t.name == "token_embd.weight" and data.shape[0] > embed_rows:
            data = data[np.sort(rng.choice(data.shape[0], embed_rows, replace=False))]
        if t.name == "token_embd.weight":
            n_embed = data.shape[0]
        data = np.ascontiguousarray(data)
        kept.append((t, data))
        writer.add_tensor_info(t.name, data.shape, data.dtype, data.nbytes, t.tensor_type)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_ti_data_to_file()
    for t, data in kept:
        writer.write_tensor_data(data, tensor_endianess=reader.endianess)
    writer.close()
    return {"layers": sorted(layers), "embed_rows": n_embed, "bytes": dest.stat().st_size}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("dest", type=Path, help="reduced GGUF to write")
    ap.add_argument("--source", type=Path, default=None,
                    help="SmolLM2 GGUF (default: the runtime's cached copy, downloaded if absent)")
    ap.add_argument("--every", type=int, default=3, help="keep layers N with N %% EVERY == 0 "
                                                          "(default 3)")
    ap.add_argument("--embed-rows", type=int, default=8192,
                    help="token-embedding rows to keep (default 8192)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the row choice (default 0)")
    a = ap.parse_args(argv)
    src = a.source
    if src is None:
        from zipmoe_rt.convert.smollm2 import locate_smollm2_gguf
        from zipmoe_rt.default_model import cache_dir
        src = locate_smollm2_gguf(cache_dir(), progress=True)
    try:
        r = reduce_gguf(src, a.dest, a.every, a.embed_rows, a.seed)
    except (FileNotFoundError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {a.dest}: layers {r['layers']}, {r['embed_rows']} embedding rows, "
          f"{r['bytes'] / 1e6:.1f} MB")
    return 0


if __name__ == "__main__":
    sys.exit(main())
