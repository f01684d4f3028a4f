#!/usr/bin/env python
"""Soak test: long generation and many chat turns on one loaded model, watching memory.

    python tools/soak.py [MODEL.zmoe] [--minutes 10] [--tokens 20000] [--turns 1000]
        [--memory-budget SIZE] [--reset-every 10] [--json out.json]

Loads MODEL (default: the bundled model, built on first use) once, then

1. generates ``--tokens`` tokens in runs of ``--run-tokens`` (each run a fresh prompt and KV
   cache, at most the model's context, so the KV cache is bounded by the context);
2. holds ``--turns`` chat turns in one :class:`~zipmoe_rt.api.ChatSession` of
   ``--turn-tokens`` tokens each, with ``/reset`` (:meth:`ChatSession.reset`) every
   ``--reset-every`` turns.

Each phase stops early when its share of ``--minutes`` is spent (said in the output). Every
``--sample-every`` tokens (phase 1) or turns (phase 2) it prints a sample: elapsed seconds,
RSS, the KV cache's bytes (allocated) and positions held, the experts held (decoded experts
without a budget; under ``--memory-budget`` the tiers F/C/S/E, beside what the budget leaves
for them), and RSS minus the most both caches have held so far: the memory that must not grow
(a KV cache that shrinks, at a new run or a ``/reset``, leaves its memory with the allocator for
the next one, so RSS does not fall with it; that memory is counted until it is reused).

Checks (exit status 1 if one fails, 0 otherwise; 2 for a usage or load error):

* flat memory: after the warm-up (the first ``--warmup`` share of each phase's samples), RSS
  minus the caches' high-water mark (KV cache and experts held) never exceeds its value at the
  end of the warm-up by more than ``--rss-tolerance-mb`` + ``--rss-tolerance-pct`` % of it
  (without a budget, experts are decoded on first use, so RSS itself grows until every expert
  was used);
* bounded KV cache: the positions held never exceed the model's context
  (``max_position_embeddings``), and the allocated positions never exceed twice those held or
  the initial allocation (the cache grows by doubling), with the memory given back at
  ``/reset``;
* bounded expert cache: under a budget, dense + tiers + the working set never exceed it.

Timings are printed for information only; nothing is judged on them.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

try:
    import zipmoe_rt  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "format"))

import zipmoe_rt  # noqa: E402
from zipmoe_rt.util import status_bytes  # noqa: E402

MB = 1e6
#: user turns the chat phase cycles through
TURNS = ["hello, how are you today?", "tell me a story about a cat", "what is the capital of "
         "france?", "please answer the question again", "be brief: what did I ask first?"]
#: prompts the generation phase cycles through (raw text, no chat template)
PROMPTS = ["The quick brown fox", "Once upon a time", "In the beginning", "Dear diary,"]


def rss() -> int:
    """Resident set size of this process in bytes."""
    return status_bytes("VmRSS")


def kv_of(cache) -> tuple[int, int, int]:
    """(allocated bytes, positions allocated, positions held) of a model's KV cache."""
    return int(cache.nbytes), int(cache.capacity), int(cache.get_seq_length())


def expert_cache(model) -> tuple[int, int | None]:
    """(resident expert bytes, bytes the budget leaves for them): the tiers F/C/S/E under a
    budget; without one, the decoded experts kept and None."""
    rep = model.memory_report()
    if model.engine is None:
        return rep["experts"], None
    held = sum(rep[t] for t in ("F", "C", "S", "E"))
    allowed = rep["budget"] - rep["dense"] - rep["working set (max)"]
    return held, allowed


class Soak:
    """Samples, checks and the printed table of one soak run."""

    def __init__(self, model, args):
        self.m, self.args = model, args
        self.t0 = time.perf_counter()
        self.samples: list[dict] = []
        self.failures: list[str] = []
        self.context = int(model.hparams.get("max_position_embeddings") or 4096)
        self.caches_hw = 0      # the most the KV cache and the experts held have taken together

    def sample(self, phase: str, count: int, cache) -> dict:
        kv_bytes, kv_cap, kv_held = kv_of(cache) if cache is not None else (0, 0, 0)
        s = {"phase": phase, "count": count, "t_s": round(time.perf_counter() - self.t0, 2),
             "rss": rss(), "kv_bytes": kv_bytes, "kv_capacity": kv_cap, "kv_held": kv_held}
        ec = expert_cache(self.m)
        s["experts"], s["experts_allowed"] = ec
        self.caches_hw = max(self.caches_hw, kv_bytes + ec[0])
        s["caches_hw"] = self.caches_hw
        s["rss_minus_caches"] = s["rss"] - self.caches_hw
        if ec[1] is not None:
            if ec[0] > ec[1]:
                self.failures.append(f"{phase} {count}: expert cache {ec[0] / MB:.1f} MB over "
                                     f"its {ec[1] / MB:.1f} MB")
        if kv_held > self.context:
            self.failures.append(f"{phase} {count}: KV cache holds {kv_held} positions, over the "
                                 f"context of {self.context}")
        if kv_cap > max(self.initial_capacity, 2 * kv_held):
            self.failures.append(f"{phase} {count}: KV cache allocates {kv_cap} positions for "
                                 f"{kv_held} held")
        self.samples.append(s)
        print(f"{phase:<8} {count:>7} {s['t_s']:>8.1f} {s['rss'] / MB:>8.1f} "
              f"{kv_bytes / MB:>7.2f} {kv_held:>6} {ec[0] / MB:>10.2f}"
              + (f" / {ec[1] / MB:<8.2f}" if ec[1] is not None else " " * 11)
              + f" {s['rss_minus_caches'] / MB:>13.1f}", flush=True)
        return s

    @property
    def initial_capacity(self) -> int:
        return self.m.net.new_cache().capacity

    def check_flat(self, phase: str) -> dict:
        """Growth of RSS minus the caches after the warm-up of ``phase``'s samples."""
        ss = [s for s in self.samples if s["phase"] == phase]
        if len(ss) < 3:
            return {"phase": phase, "samples": len(ss), "checked": False}
        w = min(len(ss) - 2, max(1, int(len(ss) * self.args.warmup)))
        base = ss[w]["rss_minus_caches"]
        after = ss[w + 1:]
        growth = max(s["rss_minus_caches"] for s in after) - base
        tol = self.args.rss_tolerance_mb * MB + self.args.rss_tolerance_pct / 100 * base
        out = {"phase": phase, "samples": len(ss), "warmup_samples": w + 1, "checked": True,
               "baseline_mb": round(base / MB, 2), "growth_mb": round(growth / MB, 2),
               "tolerance_mb": round(tol / MB, 2),
               "last_mb": round(after[-1]["rss_minus_caches"] / MB, 2)}
        if growth > tol:
            self.failures.append(f"{phase}: RSS minus the caches grew {growth / MB:.1f} MB after "
                                 f"the warm-up (tolerance {tol / MB:.1f} MB)")
        return out


def run_tokens(soak: Soak, deadline: float) -> int:
    """Phase 1: ``--tokens`` generated tokens in runs of fresh caches; returns tokens made."""
    from zipmoe_rt.generate import CacheState, SamplingParams, generate

    a, m = soak.args, soak.m
    made, i, next_sample, state = 0, 0, 0, None
    soak.sample("tokens", 0, None)
    while made < a.tokens and time.perf_counter() < deadline:
        ids = m.tokenizer.encode(PROMPTS[i % len(PROMPTS)])
        n = min(a.run_tokens, a.tokens - made, soak.context - len(ids))
        state = CacheState.new(m.net, max_tokens=len(ids) + n)
        params = SamplingParams(temperature=a.temperature, seed=i, max_tokens=n)
        gen = generate(m.net, ids, params, m.stop_ids, cache=state)   # (one thread: no lock)
        for step in gen:
            if step.token_id is None:
                break
            made += 1
            if made >= next_sample:
                soak.sample("tokens", made, state.cache)
                next_sample += a.sample_every
            if time.perf_counter() > deadline:
                break
        gen.close()
        i += 1
    soak.sample("tokens", made, None if state is None else state.cache)  # the last run's cache
    if made < a.tokens:
        print(f"(generation phase stopped on time: {made} of {a.tokens} tokens)", flush=True)
    return made


def run_turns(soak: Soak, deadline: float) -> int:
    """Phase 2: ``--turns`` chat turns with a reset every ``--reset-every``; returns turns."""
    a, m = soak.args, soak.m
    s = m.chat_session()
    done = 0
    soak.sample("turns", 0, s.state.cache)
    while done < a.turns and time.perf_counter() < deadline:
        if done and done % a.reset_every == 0:
            s.reset()
        for _ in s.send(TURNS[done % len(TURNS)], max_tokens=a.turn_tokens,
                        temperature=a.temperature, seed=done):
            pass
        if len(s.state.token_ids) + a.turn_tokens + 64 > soak.context:
            s.reset()        # the conversation would outgrow the context: start a new one
        done += 1
        if done % a.sample_every_turns == 0:
            soak.sample("turns", done, s.state.cache)
    s.reset()
    soak.sample("turns", done, s.state.cache)
    if done < a.turns:
        print(f"(chat phase stopped on time: {done} of {a.turns} turns)", flush=True)
    return done


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("model", nargs="?", type=Path, default=None,
                    help="a .zmoe file (default: the bundled model, built on first use)")
    ap.add_argument("--minutes", type=float, default=10.0, help="time limit of both phases")
    ap.add_argument("--tokens", type=int, default=20000, help="tokens to generate (phase 1)")
    ap.add_argument("--turns", type=int, default=1000, help="chat turns (phase 2)")
    ap.add_argument("--run-tokens", type=int, default=1000,
                    help="tokens per generation run (each with a fresh KV cache)")
    ap.add_argument("--turn-tokens", type=int, default=24, help="most tokens per chat reply")
    ap.add_argument("--reset-every", type=int, default=10, help="/reset every N turns")
    ap.add_argument("--memory-budget", "-m", default=None,
                    help="run under this budget (e.g. 25%%, 600MB); default: none")
    ap.add_argument("--policy", default="auto", help="expert cache policy under a budget")
    ap.add_argument("--temperature", type=float, default=0.8,
                    help="sampling temperature (seeded per run/turn; 0 = greedy)")
    ap.add_argument("--sample-every", type=int, default=250, help="tokens between samples")
    ap.add_argument("--sample-every-turns", type=int, default=25, help="turns between samples")
    ap.add_argument("--warmup", type=float, default=0.25,
                    help="share of each phase's samples that is warm-up (not checked)")
    ap.add_argument("--rss-tolerance-mb", type=float, default=8.0,
                    help="allowed growth of RSS minus the KV cache after the warm-up, MB")
    ap.add_argument("--rss-tolerance-pct", type=float, default=2.0,
                    help="... plus this percentage of the post-warm-up baseline")
    ap.add_argument("--json", type=Path, default=None, help="write samples and results here")
    a = ap.parse_args(argv)
    for name in ("tokens", "turns", "run_tokens", "turn_tokens", "reset_every", "sample_every",
                 "sample_every_turns"):
        if getattr(a, name) < (0 if name in ("tokens", "turns") else 1):
            ap.error(f"--{name.replace('_', '-')} must be positive")
    if not a.minutes > 0:
        ap.error("--minutes must be positive")
    try:
        model = zipmoe_rt.load(a.model, memory_budget=a.memory_budget, policy=a.policy,
                               progress=False)
    except (OSError, ValueError, RuntimeError) as e:
        print(f"soak: error: {e}", file=sys.stderr)
        return 2
    with model:
        soak = Soak(model, a)
        print(f"soak: {model.path} ({model.hparams['architecture']}, context {soak.context}); "
              f"budget {a.memory_budget or 'none'}; {a.tokens} tokens in runs of "
              f"{a.run_tokens}, {a.turns} turns of <= {a.turn_tokens} tokens with /reset every "
              f"{a.reset_every}; limit {a.minutes:g} min", flush=True)
        print(f"{'phase':<8} {'count':>7} {'t_s':>8} {'rss_MB':>8} {'kv_MB':>7} {'kv_pos':>6} "
              f"{'experts_MB':>10} {'/ allowed':<9} {'rss-caches_MB':>13}", flush=True)
        start = time.perf_counter()
        half = start + a.minutes * 30
        made = run_tokens(soak, half)
        turns = run_turns(soak, start + a.minutes * 60)
        elapsed = time.perf_counter() - start
        flat = [soak.check_flat("tokens"), soak.check_flat("turns")]
        result = {"model": str(model.path), "budget": a.memory_budget, "tokens": made,
                  "turns": turns, "elapsed_s": round(elapsed, 1), "context": soak.context,
                  "flat": flat, "failures": soak.failures, "samples": soak.samples,
                  "max_rss_mb": round(max(s["rss"] for s in soak.samples) / MB, 1)}
    for f in flat:
        if f["checked"]:
            print(f"{f['phase']}: RSS minus caches {f['baseline_mb']:.1f} MB after warm-up, "
                  f"max growth "
                  f"{f['growth_mb']:+.1f} MB (tolerance {f['tolerance_mb']:.1f} MB), last "
                  f"{f['last_mb']:.1f} MB")
        else:
            print(f"{f['phase']}: too few samples ({f['samples']}) to judge")
    print(f"{made} tokens and {turns} turns in {elapsed:.0f} s; max RSS "
          f"{result['max_rss_mb']:.1f} MB")
    if a.json:
        a.json.write_text(json.dumps(result, indent=1))
    if soak.failures:
        for f in soak.failures[:20]:
            print(f"FAIL: {f}")
        return 1
    print("OK: memory flat after warm-up, KV and expert caches within their bounds")
    return 0


if __name__ == "__main__":
    sys.exit(main())
