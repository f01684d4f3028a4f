"""Where two backends, or a backend and transformers, part ways on a tiny spec: the spec's
checkpoint (tests/tiny_models.py) runs through our model on a reference backend (``numpy`` by
default), on a device backend (``cuda`` by default; experts resident as in unbudgeted runs)
and through transformers (float32, eager); each decoder layer's attention output, router
logits and top-k choice, feed-forward output and residual stream are recorded, and the first
that differs beyond ``--tol`` (relative to the reference's largest value) is named.

For gpt-oss it also says whether the installed transformers honours the config's
``swiglu_alpha`` / ``swiglu_limit`` (5.17 fixes 1.702 / 7.0) and compares against it both as
installed and with the config's values (tests/test_gpu.py ``hf_glu_from_config``).

Usage (repository root, ``zipmoe_rt``, ``format/`` and ``tests/`` importable)::

    python tools/gpu_diff.py gpt_oss gpt_oss_sizes [--device cuda] [--ref numpy] [--tol 1e-4]

Prints one line per recorded value (max |delta|, relative) and a verdict per spec.
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "format"), str(ROOT / "tests")]


class _Rec:
    """A callable wrapped so that its output (or ``pick(output)``) is recorded, host copy,
    under ``name``; other attributes pass through."""

    def __init__(self, inner, name, log, be, pick=None):
        self.__dict__.update(_inner=inner, _name=name, _log=log, _be=be, _pick=pick)

    def __call__(self, *a, **k):
        out = self._inner(*a, **k)
        v = out if self._pick is None else self._pick(out)
        self._log.append((self._name, np.array(self._be.to_host(v), np.float32, copy=True)))
        return out

    def __getattr__(self, n):
        return getattr(self._inner, n)


def ours(folder, backend, prompt):
    """Our model of ``folder`` on ``backend``: [(name, host array)] in execution order, then
    the logits."""
    from zipmoe_rt.backends import get_backend
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.moe import ExpertExecutor
    from zipmoe_rt.models.weights import CheckpointSource
    be = get_backend(backend)
    src = CheckpointSource(folder)
    ex = ExpertExecutor(be.resident_experts(src), be) if backend == "cuda" else None
    m = build_model(src, executor=ex, backend=backend)
    log: list = []
    for i, layer in enumerate(m.layers):
        layer.attn = _Rec(layer.attn, f"L{i}.attn", log, be)
        layer.mlp = _Rec(layer.mlp, f"L{i}.mlp", log, be)
        m.layers[i] = _Rec(layer, f"L{i}.residual", log, be)

    def hook(i, x, logits, idx, w):
        log.append((f"L{i}.router_logits", np.array(be.to_host(logits), np.float32)))
        log.append((f"L{i}.topk_idx", np.asarray(idx, np.float32)))
        log.append((f"L{i}.topk_w", np.asarray(w, np.float32)))
    m.route_hook = hook
    logits = m.forward(prompt, m.new_cache(), last_only=False)
    return log, logits


def theirs(hf, prompt):
    """transformers' per-layer attention output, feed-forward output and residual stream."""
    import torch
    log: list = []
    first = (lambda o: o[0] if isinstance(o, tuple) else o)
    hooks = []
    for i, layer in enumerate(hf.model.layers):
        for part, mod in (("attn", layer.self_attn), ("mlp", layer.mlp), ("residual", layer)):
            hooks.append(mod.register_forward_hook(
                lambda m, a, o, n=f"L{i}.{part}": log.append(
                    (n, first(o)[0].detach().float().numpy().copy()))))
    try:
        with torch.no_grad():
            logits = hf(torch.tensor(np.asarray(prompt))[None]).logits[0].numpy()
    finally:
        for h in hooks:
            h.remove()
    return log, logits


def compare(a, b, label, tol):
    """Print max |a - b| of every common entry in a's order; the first beyond ``tol`` times
    the scale of ``b``'s entry, or None."""
    bd = dict(b)
    first = None
    for name, x in a:
        if name not in bd:
            continue
        y = bd[name]
        if x.shape != y.shape:
            print(f"  {label} {name}: shapes {x.shape} / {y.shape}")
            first = first or name
            continue
        d = float(np.abs(x - y).max()) if x.size else 0.0
        rel = d / max(float(np.abs(y).max()), 1e-30)
        flag = rel > tol
        if flag and first is None:
            first = name
        print(f"  {label} {name:22s} max|d| {d:.3e}  rel {rel:.2e}{'  <-- differs' if flag else ''}")
    return first


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("specs", nargs="+")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--ref", default="numpy")
    ap.add_argument("--tol", type=float, default=1e-4)
    a = ap.parse_args(argv)
    import transformers
    from test_gpu import hf_glu_from_config
    from tiny_models import load_hf, make_tiny
    print(f"transformers {transformers.__version__}; {a.device} against {a.ref} and transformers")
    prompt = np.random.default_rng(1).integers(0, 256, 16)
    bad = 0
    for spec in a.specs:
        folder = make_tiny(spec, tempfile.mkdtemp(prefix=f"diff-{spec}-"))
        ref_log, ref_lg = ours(folder, a.ref, prompt)
        dev_log, dev_lg = ours(folder, a.device, prompt)
        hf = load_hf(folder)
        hf_log, hf_lg = theirs(hf, prompt)
        print(f"== {spec}: logits {a.device}-{a.ref} {np.abs(dev_lg - ref_lg).max():.3e}, "
              f"{a.device}-transformers {np.abs(dev_lg - hf_lg).max():.3e}, "
              f"{a.ref}-transformers {np.abs(ref_lg - hf_lg).max():.3e}")
        f1 = compare(dev_log, ref_log, f"{a.device}-{a.ref}", a.tol)
        f2 = compare(ref_log, hf_log, f"{a.ref}-hf", a.tol)
        if hf_glu_from_config(hf):
            hf_log2, hf_lg2 = theirs(hf, prompt)
            print(f"  transformers {transformers.__version__} ignores the config's swiglu_alpha /"
                  f" swiglu_limit; with them: {a.device}-transformers "
                  f"{np.abs(dev_lg - hf_lg2).max():.3e}")
            f2 = compare(ref_log, hf_log2, f"{a.ref}-hf(config glu)", a.tol)
        print(f"== {spec}: first difference {a.device} vs {a.ref}: {f1 or 'none'}; "
              f"{a.ref} vs transformers: {f2 or 'none'}")
        bad += bool(f1 or f2)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
