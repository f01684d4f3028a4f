"""Activation traces (design note §3): which experts the model selects, token by token.

* :class:`TraceRecorder`: a route hook that counts, per MoE layer, how often each expert is
  selected (batch 1, decode tokens), and keeps the selections token by token (``sequences``),
  from which the planner measures temporal locality.
* :func:`record_trace` runs prompts through the model with it; :func:`save_trace` stores the
  result next to the model as ``MODEL.trace.json`` with a :func:`fingerprint` of the source
  checkpoint, and :func:`load_trace` refuses a trace of another model (:class:`TraceError`).
* :func:`sidecar`: the path of such a file next to the model (also used for the calibration).
"""
from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import numpy as np
from zmoe.constants import Keys

TRACE_SUFFIX = ".trace.json"


class TraceError(ValueError):
    """A missing, malformed or foreign activation trace / calibration file."""


def fingerprint(source) -> str:
    """sha256 of the architecture, hyper-parameters and source files: identifies the model."""
    m = source.metadata
    blob = json.dumps({"arch": m.get(Keys.General.ARCHITECTURE), "hparams": source.hparams,
                       "files": sorted(f["sha256"] for f in m.get(Keys.Provenance.FILES, []))},
                      sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()


def sidecar(model_path, suffix: str) -> Path:
    p = Path(model_path)
    return p.with_name(p.name + suffix)


class TraceRecorder:
    """Route hook that counts selections: ``counts[i, e]`` for the i-th MoE layer and expert e.

    Also keeps, for decode tokens (one-row calls), the selected expert ids of every MoE layer,
    token by token, in runs (:meth:`new_sequence` starts the next run, e.g. per prompt), and the
    per-layer repeat counts: ``repeats[i]`` = selected experts of a token that the previous
    token of the run also selected in that layer, ``pairs[i]`` = selections that had a previous
    token (``repeats / pairs`` = the planner's :func:`~zipmoe_rt.engine.planner.repeat_probability`).
    """

    def __init__(self, hparams: dict, decode_only: bool = True):
        self.moe_layers = list(hparams["moe_layers"])
        self.pos = {l: i for i, l in enumerate(self.moe_layers)}
        self.counts = np.zeros((len(self.moe_layers), hparams["num_experts"]), np.int64)
        self.decode_only = decode_only
        self.tokens = 0
        self.prev = {}
        self.layer_repeats = np.zeros(len(self.moe_layers), np.int64)
        self.layer_pairs = np.zeros(len(self.moe_layers), np.int64)
        self.runs: list = [[]]   # runs of decode tokens: [token][moe layer] -> sorted ids

    @property
    def repeats(self) -> int:
        """Selections also made by the previous token, all layers (locality numerator)."""
        return int(self.layer_repeats.sum())

    @property
    def pairs(self) -> int:
        """Selections that had a previous token, all layers (locality denominator)."""
        return int(self.layer_pairs.sum())

    def new_sequence(self):
        """Start a new run: the next token has no previous token (e.g. a new prompt)."""
        self.prev.clear()
        if self.runs[-1]:
            self.runs.append([])

    def sequences(self) -> list:
        """Recorded runs as nested lists ``[run][token][moe layer][k]`` (complete tokens only)."""
        out = []
        for run in self.runs:
            rows = [row for row in run if all(r is not None for r in row)]
            if rows:
                out.append(rows)
        return out

    def __call__(self, layer, x, logits, idx, w):
        if self.decode_only and idx.shape[0] != 1:
            return
        i = self.pos[layer]
        np.add.at(self.counts[i], idx.reshape(-1), 1)
        if i == 0:
            self.tokens += idx.shape[0]
        cur = set(int(e) for e in idx[-1])
        if idx.shape[0] == 1:
            if i == 0 or not self.runs[-1]:
                self.runs[-1].append([None] * len(self.moe_layers))
            self.runs[-1][-1][i] = sorted(cur)
            if layer in self.prev:
                self.layer_repeats[i] += len(cur & self.prev[layer])
                self.layer_pairs[i] += len(cur)
        self.prev[layer] = cur


def record_trace(model, prompts: list[str], max_tokens: int = 32, chat: bool = True,
                 progress: bool = True) -> dict:
    """Generate greedily from each prompt and return the trace dict (see :func:`save_trace`).

    Keys: ``version`` (1), ``fingerprint``, ``model``, ``moe_layers``, ``num_experts``, ``top_k``,
    ``tokens`` (decode tokens), ``prompts``, ``counts`` (``[L, N]`` selections), ``locality``
    (fraction of selections repeated from the previous token, all layers; None without pairs),
    and, since the planner models temporal locality, ``repeat`` (the same per MoE layer) and
    ``sequences`` (one run per prompt: ``[token][moe layer]`` = the ``k`` selected expert ids).
    Older traces without the last two still load (the planner then uses ``locality``).
    """
    from tqdm.auto import tqdm
    rec = TraceRecorder(model.hparams)
    model.net.route_hook = rec
    try:
        for p in tqdm(prompts, desc="profile", unit="prompt", disable=not progress):
            if chat:
                model.chat([{"role": "user", "content": p}], max_tokens=max_tokens)
            else:
                model.generate(p, max_tokens=max_tokens)
            rec.new_sequence()
    finally:
        model.net.route_hook = None
    return {"version": 1, "fingerprint": fingerprint(model.source), "model": model.name,
            "moe_layers": rec.moe_layers, "num_experts": int(model.hparams["num_experts"]),
            "top_k": int(model.hparams["num_experts_per_tok"]), "tokens": rec.tokens,
            "prompts": len(prompts), "locality": rec.repeats / rec.pairs if rec.pairs else None,
            "repeat": [float(r / p) if p else None
                       for r, p in zip(rec.layer_repeats, rec.layer_pairs)],
            "counts": rec.counts.tolist(), "sequences": rec.sequences()}


def save_trace(trace: dict, path) -> Path:
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(trace))
    os.replace(tmp, path)
    return path


def load_trace(path, source) -> dict:
    """Read a trace and check it belongs to ``source``'s model.

    Returns:
        the trace dict (:func:`record_trace`) with ``counts`` as int64 ``[L, N]`` and, when
        present, ``sequences`` as a list of int64 ``[T, L, k]`` arrays (one per run).

    Raises:
        TraceError: missing file (says how to make one), malformed, or another model's trace.
    """
    path = Path(path)
    if not path.exists():
        raise TraceError(f"{path}: no activation trace; run `zipmoe-rt profile {source.path} "
                         f"--prompts FILE` first")
    try:
        t = json.loads(path.read_text())
        counts = np.asarray(t["counts"], np.int64)
    except (json.JSONDecodeError, KeyError, ValueError, TypeError) as e:
        raise TraceError(f"{path}: not a valid trace ({e})") from None
    if t.get("fingerprint") != fingerprint(source):
        raise TraceError(f"{path}: trace of another model ({t.get('model')!r}), not of "
                         f"{source.path.name}; profile this model again")
    want = (len(source.hparams["moe_layers"]), source.hparams["num_experts"])
    if counts.shape != want or (counts.sum(axis=1) == 0).any():
        raise TraceError(f"{path}: counts have shape {counts.shape} (want {want}) or an empty layer")
    t["counts"] = counts
    if t.get("sequences") is not None:
        k = int(source.hparams["num_experts_per_tok"])
        try:
            runs = [np.asarray(r, np.int64) for r in t["sequences"]]
        except (ValueError, TypeError) as e:
            raise TraceError(f"{path}: sequences are not [token][layer][k] lists ({e})") from None
        for r in runs:
            if r.ndim != 3 or r.shape[1:] != (want[0], k) or r.shape[0] == 0:
                raise TraceError(f"{path}: a sequence has shape {r.shape}, want "
                                 f"[tokens, {want[0]}, {k}]")
            if r.min() < 0 or r.max() >= want[1] or \
                    (np.diff(np.sort(r, axis=2), axis=2) == 0).any():
                raise TraceError(f"{path}: a sequence has expert ids outside 0..{want[1] - 1} "
                                 f"or a token selecting the same expert twice")
        t["sequences"] = runs
    return t

