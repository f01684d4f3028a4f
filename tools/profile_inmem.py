#!/usr/bin/env python
"""Where the time of an in-memory forward pass goes: per op class, per decode token and per
prefill, on a ``.zmoe`` model held in memory (no budget).

    PYTHONPATH=.:format python tools/profile_inmem.py [MODEL] [--tokens 64] [--prefill 512]
        [--resident full|compressed] [--reps 3]

Every op of the model's backend (:mod:`zipmoe_rt.backends`) is wrapped with a
``time.perf_counter`` timer; ``linear`` calls are classed by their weight (the LM head, the
attention's fused q/k/v and o projections, the routers, other). Per class the table gives the
calls and the milliseconds per decode token (greedy, the generated token fed back, as
``zipmoe-rt bench`` decodes) and per prefill of ``--prefill`` tokens; "outside ops" is the wall
time of the forward passes less the time inside backend ops: the Python of the model code
between the kernels (plus the timers' own cost, measured and printed). Medians over ``--reps``
repetitions of the timed passes. A forward pass is also run without the timers, for the
unwrapped wall time.

The wait policy is the one ``zipmoe_rt.load`` picks (spinning OpenMP workers without a budget)
unless ``OMP_WAIT_POLICY`` is set.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(REPO), str(REPO / "format")]

#: backend ops and the class each is reported under (``linear`` is classed by its weight)
OP_CLASS = {"rmsnorm": "norms", "layer_norm": "norms", "add_": "residual add",
            "rope_qk_cache": "q/k norm + RoPE + KV write", "attention": "attention",
            "attention_sinks": "attention", "route": "router (top-k)",
            "experts_token": "MoE experts", "expert_accumulate": "MoE experts",
            "embed": "embedding", "zeros": "allocations", "empty": "allocations",
            "swiglu": "dense MLP", "scale_": "scalar ops", "to_host": "copies",
            "from_host": "copies"}


def _linear_classes(net) -> dict:
    """id(weight array) -> class name for every linear weight of the model."""
    cls = {id(net.lm_head): "LM head"}
    for layer in net.layers:
        a = layer.attn
        cls[id(a.wqkv)] = "attn q/k/v proj"
        cls[id(a.wo)] = "attn o proj"
        mlp = layer.mlp
        router = getattr(mlp, "router", None)
        if router is not None:
            cls[id(router.weight)] = "router (logits)"
    return cls


class OpTimer:
    """Wraps the ops of ``net.backend`` (instance attributes shadowing the class's methods)."""

    def __init__(self, net):
        self.net = net
        self.be = net.backend
        self.lin = _linear_classes(net)
        self.t = defaultdict(float)
        self.cpu = defaultdict(float)
        self.n = defaultdict(int)
        self.on = False
        self._wrapped = []
        for name in OP_CLASS.keys() | {"linear"}:
            if hasattr(type(self.be), name):
                self._wrap(name)

    def _wrap(self, name):
        fn = getattr(self.be, name)
        pc, pt = time.perf_counter, time.process_time
        t, n, cpu = self.t, self.n, self.cpu
        if name == "linear":
            lin = self.lin

            def w(x, W, *a, **k):
                if not self.on:
                    return fn(x, W, *a, **k)
                c0, t0 = pt(), pc()
                r = fn(x, W, *a, **k)
                c = lin.get(id(W), "other linear")
                t[c] += pc() - t0
                cpu[c] += pt() - c0
                n[c] += 1
                return r
        else:
            c = OP_CLASS[name]

            def w(*a, **k):
                if not self.on:
                    return fn(*a, **k)
                c0, t0 = pt(), pc()
                r = fn(*a, **k)
                t[c] += pc() - t0
                cpu[c] += pt() - c0
                n[c] += 1
                return r
        setattr(self.be, name, w)
        self._wrapped.append(name)

    def unwrap(self):
        for name in self._wrapped:
            delattr(self.be, name)
        self._wrapped = []

    def reset(self):
        self.t.clear()
        self.cpu.clear()
        self.n.clear()


def timer_cost(n=200_000) -> float:
    """Seconds one wrapped call adds (two perf_counter calls, dict updates, the wrapper)."""
    pc, pt = time.perf_counter, time.process_time
    t = defaultdict(float)
    cnt = defaultdict(int)

    def f(x):
        return x

    def w(x):
        c0, t0 = pt(), pc()
        r = f(x)
        t["a"] += pc() - t0
        t["b"] += pt() - c0
        cnt["a"] += 1
        return r
    t0 = pc()
    for i in range(n):
        w(i)
    t1 = pc()
    for i in range(n):
        f(i)
    t2 = pc()
    return max(0.0, ((t1 - t0) - (t2 - t1)) / n)


def decode_pass(net, ids, n_tok, timer=None, on=False):
    """Prefill ``ids``, then ``n_tok`` single-token greedy steps; returns their wall seconds
    (``timer.on`` set to ``on`` for the steps only)."""
    c = net.new_cache()
    logits = net.forward(np.asarray(ids, np.int64), c)
    tok = int(np.argmax(logits))
    if timer is not None:
        timer.on = on
    t0 = time.perf_counter()
    for _ in range(n_tok):
        logits = net.forward(np.array([tok], np.int64), c)
        tok = int(np.argmax(logits))
    t = time.perf_counter() - t0
    if timer is not None:
        timer.on = False
    return t


def prefill_pass(net, ids, timer=None, on=False):
    """One forward pass over ``ids`` into a fresh cache; its wall seconds."""
    c = net.new_cache()
    if timer is not None:
        timer.on = on
    t0 = time.perf_counter()
    net.forward(np.asarray(ids, np.int64), c)
    t = time.perf_counter() - t0
    if timer is not None:
        timer.on = False
    return t


def table(title, per, wall, timer, unwrapped, cost, calls, cpu, cpu_all):
    inside = sum(timer.values())
    rows = sorted(timer.items(), key=lambda kv: -kv[1])
    out = [f"\n{title}: wall {wall * 1e3:.2f} ms with timers, {unwrapped * 1e3:.2f} ms without "
           f"(timer cost ~{cost * 1e6:.2f} us x {calls:.0f} calls = {cost * calls * 1e3:.2f} ms); "
           f"process CPU {cpu_all * 1e3:.2f} ms",
           "| op class | calls | wall ms | % of wall | CPU ms (all threads) |",
           "|---|---|---|---|---|"]
    for k, v in rows:
        out.append(f"| {k} | {per[k]:.0f} | {v * 1e3:.3f} | {100 * v / wall:.1f} | "
                   f"{cpu[k] * 1e3:.3f} |")
    out.append(f"| outside ops (Python between kernels) | - | {(wall - inside) * 1e3:.3f} | "
               f"{100 * (wall - inside) / wall:.1f} | {(cpu_all - sum(cpu.values())) * 1e3:.3f} |")
    return "\n".join(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", nargs="?", default=str(Path.home() / ".cache" / "zipmoe-rt" /
                                                    "smollm2-135m-instruct-moe4.zmoe"))
    ap.add_argument("--tokens", type=int, default=64, help="decode steps per repetition")
    ap.add_argument("--prefill", type=int, default=512, help="prefill tokens (0: skip)")
    ap.add_argument("--resident", default="full", choices=["full", "compressed"])
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    from zipmoe_rt.api import load
    from zipmoe_rt.bench import prompt_ids

    m = load(a.model, progress=False, resident=a.resident)
    m.source.admit_all()
    net = m.net
    ids16 = prompt_ids(m.tokenizer, 16)
    idsp = prompt_ids(m.tokenizer, a.prefill) if a.prefill else None
    decode_pass(net, ids16, 2)                      # JIT warm-up
    if idsp is not None:
        prefill_pass(net, idsp[:8])
    cost = timer_cost()
    tm = OpTimer(net)
    res = {"decode": [], "prefill": []}
    for _ in range(a.reps):
        for kind in ("decode", "prefill"):
            if kind == "prefill" and idsp is None:
                continue
            run = (lambda on: decode_pass(net, ids16, a.tokens, tm, on)) if kind == "decode" \
                else (lambda on: prefill_pass(net, idsp, tm, on))
            plain = run(False)
            tm.reset()
            c0 = time.process_time()
            wall = run(True)
            cpu_all = time.process_time() - c0
            res[kind].append((plain, wall, dict(tm.t), dict(tm.n), dict(tm.cpu), cpu_all))
    tm.unwrap()
    for kind, n in (("decode", a.tokens), ("prefill", 1)):
        if not res[kind]:
            continue
        rs = res[kind]
        i = sorted(range(len(rs)), key=lambda j: rs[j][1])[len(rs) // 2]    # median wall
        plain = statistics.median(r[0] for r in rs) / n
        wall, t, cnt = rs[i][1] / n, {k: v / n for k, v in rs[i][2].items()}, \
            {k: v / n for k, v in rs[i][3].items()}
        cpu = {k: v / n for k, v in rs[i][4].items()}
        title = (f"decode, per token (median of {a.reps} x {a.tokens} tokens; "
                 f"{1 / plain:.2f} tokens/s without timers)" if kind == "decode" else
                 f"prefill of {a.prefill} tokens (median of {a.reps}; "
                 f"{a.prefill / plain:.1f} tokens/s without timers)")
        print(table(title, cnt, wall, t, plain, cost, sum(cnt.values()), cpu, rs[i][5] / n))
    import os
    print(f"\nmodel {a.model}, resident {a.resident}, OMP_WAIT_POLICY="
          f"{os.environ.get('OMP_WAIT_POLICY')}, load average {os.getloadavg()[0]:.2f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
