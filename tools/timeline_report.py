"""Aggregation of the decode-token timelines that ``tools/gpu_timeline.py`` records: busy and
idle time per lane, host waits by what they wait for, the critical path, and a text Gantt.

Pure Python over plain records (no GPU, no CuPy), so it is tested on synthetic timelines
(``tests/test_gpu_timeline.py``). One token's record (a dict, as stored in the tool's JSON):

* ``wall``: seconds from the token's reference (a device synchronise, then one CUDA event
  recorded on the compute stream and the host clock read) to the end of the token's forward
  pass (its logits on the host);
* ``host``: host spans ``{"name", "kind", "layer", "t0", "t1"}``, seconds from the reference;
  ``kind`` is ``"launch"`` (the host queues work: attention, router, MoE bookkeeping, copies,
  decode launches, matmuls) or ``"wait"`` (the host is blocked: a routing read, an event
  synchronise); ``layer`` the decoder layer (None outside the layers); spans nest (a wait
  inside a launch section), and time is charged to the innermost span;
* ``gpu``: work items ``{"stream", "name", "layer", "t0", "t1", "host_t", "deps"}`` on the
  ``compute``, ``copy`` and ``decode`` streams: ``t0``/``t1`` the CUDA events recorded on that
  stream just before and after the work (seconds from the reference), ``host_t`` the host's
  time when it queued it, ``deps`` the times of the events the stream was made to wait for
  since its previous item (cross-stream waits); ``waits_on`` of a host wait span names the
  stream it waits for.

Times in the printed reports are milliseconds.
"""
from __future__ import annotations

#: lanes of the Gantt and of the busy/idle sums
STREAMS = ("compute", "copy", "decode")
#: slack (seconds) when matching an item's start to what gated it (event timestamps of
#: different streams and the host clock agree to a few microseconds)
EPS = 4e-6


def union_length(intervals, lo: float = float("-inf"), hi: float = float("inf")) -> float:
    """Length (seconds) of the union of ``(t0, t1)`` intervals clipped to ``[lo, hi]``."""
    iv = sorted((max(a, lo), min(b, hi)) for a, b in intervals if min(b, hi) > max(a, lo))
    total, end = 0.0, float("-inf")
    for a, b in iv:
        if a > end:
            total += b - a
            end = b
        elif b > end:
            total += b - end
            end = b
    return total


def exclusive_host(spans) -> list:
    """Each host span's own time (seconds), its nested spans' time taken out: a list of
    ``(span, own_seconds)``. Spans must nest (as wrappers record them)."""
    order = sorted(range(len(spans)), key=lambda i: (spans[i]["t0"], -spans[i]["t1"]))
    own = {i: spans[i]["t1"] - spans[i]["t0"] for i in order}
    stack: list = []
    for i in order:
        s = spans[i]
        while stack and spans[stack[-1]]["t1"] <= s["t0"] + 1e-12:
            stack.pop()
        if stack:
            own[stack[-1]] -= s["t1"] - s["t0"]
        stack.append(i)
    return [(spans[i], max(0.0, own[i])) for i in range(len(spans))]


def host_times(tok: dict, layer=None) -> dict:
    """The host's time in one token (or in one layer's spans, ``layer``): ``busy`` (queuing
    work: the wall time, or the layer's spans, less every wait), ``wait`` (blocked), and
    ``by_name`` own seconds per span name (waits as ``wait:NAME``)."""
    by: dict = {}
    wait = 0.0
    for s, own in exclusive_host(tok["host"]):
        if layer is not None and s.get("layer") != layer:
            continue
        key = f"wait:{s['name']}" if s["kind"] == "wait" else s["name"]
        by[key] = by.get(key, 0.0) + own
        if s["kind"] == "wait":
            wait += own
    if layer is None:
        busy = tok["wall"] - wait
    else:
        busy = sum(v for k, v in by.items() if not k.startswith("wait:"))
    return {"busy": busy, "wait": wait, "by_name": by}


def stream_times(tok: dict, lo: float = 0.0, hi: float | None = None) -> dict:
    """Per stream, busy seconds (union of its items) and idle seconds within ``[lo, hi]``
    (default: the token)."""
    hi = tok["wall"] if hi is None else hi
    out = {}
    for st in STREAMS:
        busy = union_length([(g["t0"], g["t1"]) for g in tok["gpu"] if g["stream"] == st],
                            lo, hi)
        out[st] = {"busy": busy, "idle": max(0.0, hi - lo - busy)}
    return out


def layer_windows(tok: dict) -> dict:
    """``layer -> (t0, t1)``: the host span of each decoder layer (``name == "layer"``)."""
    return {s["layer"]: (s["t0"], s["t1"]) for s in tok["host"] if s["name"] == "layer"}


def _last_before(items, t: float):
    """The item of ``items`` with the latest end at or before ``t`` (+EPS), or None."""
    best = None
    for g in items:
        if g["t1"] <= t + EPS and (best is None or g["t1"] > best["t1"]):
            best = g
    return best


def critical_path(tok: dict) -> list:
    """The chain of work the token's end waited for, walked back from its end: a list of
    ``(t0, t1, who)`` segments (latest first) that tile ``[0, wall]``. ``who`` is ``host`` (the
    host queuing work), ``sync`` (a host wait beyond the GPU work it waited for: the read's
    own latency), ``launch latency`` (a GPU item started only when the host queued it), a
    stream name (its item ran), or ``gap`` (nothing recorded explains the time).

    The walk: from the host at time t, back to the end of the last wait before t (host time);
    a wait is explained by the last item of the stream it waits on that ended before the wait
    did; an item's start by what came last of its previous item on the same stream, the
    host's queuing of it and the events it was made to wait for (each of those an item of
    another stream)."""
    gpu = tok["gpu"]
    by_stream = {st: [g for g in gpu if g["stream"] == st] for st in STREAMS}
    waits = sorted((s for s in tok["host"] if s["kind"] == "wait"), key=lambda s: s["t1"])
    segs: list = []
    t, node = tok["wall"], None          # node None: the host; t never grows
    seen: set = set()
    while t > EPS:
        if node is None:
            w = None
            for s in reversed(waits):
                if s["t1"] <= t + EPS and s["t0"] < t:
                    w = s
                    break
            if w is None:
                segs.append((0.0, t, "host"))
                break
            if w["t1"] < t:
                segs.append((w["t1"], t, "host"))
            end = min(t, w["t1"])
            item = _last_before(by_stream.get(w.get("waits_on") or "compute", []), end)
            if item is None or item["t1"] <= w["t0"] or id(item) in seen:
                segs.append((w["t0"], end, "sync"))
                t = w["t0"]
                continue
            if item["t1"] < end:
                segs.append((item["t1"], end, "sync"))
            t, node = min(item["t1"], end), item
            continue
        g = node
        seen.add(id(g))
        start = min(g["t0"], t)
        segs.append((start, t, g["stream"]))
        cands = [(g["host_t"], "host", None)]
        prev = _last_before([x for x in by_stream[g["stream"]] if x is not g
                             and x["t0"] < g["t0"]], start)
        if prev is not None:
            cands.append((prev["t1"], "prev", prev))
        for dt, ds in g.get("deps") or ():
            cands.append((dt, "dep", _last_before(by_stream.get(ds, []), dt)))
        cands = [c for c in cands if c[0] <= start + EPS]
        if not cands:
            segs.append((0.0, start, "gap"))
            break
        when, kind, it = max(cands, key=lambda c: c[0])
        if kind == "host" or it is None or id(it) in seen:
            when = min(when, start)
            if when < start:
                segs.append((when, start, "launch latency" if kind == "host" else "gap"))
            t, node = when, None
        else:
            nt = min(it["t1"], start)
            if nt < start:
                segs.append((nt, start, "gap"))
            t, node = nt, it
    return segs


def path_shares(segs, lo: float = float("-inf"), hi: float = float("inf")) -> dict:
    """Seconds of the critical path per ``who`` within ``[lo, hi]``."""
    out: dict = {}
    for a, b, who in segs:
        d = min(b, hi) - max(a, lo)
        if d > 0:
            out[who] = out.get(who, 0.0) + d
    return out


def token_summary(tok: dict) -> dict:
    """One token: wall, host busy/wait (and waits by name), streams' busy/idle, critical path
    shares, and per layer the same within the layer's host window; seconds."""
    segs = critical_path(tok)
    res = {"wall": tok["wall"], "host": host_times(tok), "streams": stream_times(tok),
           "critical": path_shares(segs), "layers": {}}
    for layer, (a, b) in sorted(layer_windows(tok).items()):
        res["layers"][layer] = {"window": b - a, "host": host_times(tok, layer),
                                "streams": stream_times(tok, a, b),
                                "critical": path_shares(segs, a, b)}
    return res


def _mean(dicts):
    """Element-wise mean of nested dicts of numbers (missing keys count as 0)."""
    keys = list(dict.fromkeys(k for d in dicts for k in d))
    out = {}
    for k in keys:
        vals = [d.get(k) for d in dicts]
        if any(isinstance(v, dict) for v in vals):
            out[k] = _mean([v if isinstance(v, dict) else {} for v in vals])
        else:
            out[k] = sum(float(v or 0.0) for v in vals) / len(vals)
    return out


def summarize(tokens: list) -> dict:
    """The mean of :func:`token_summary` over ``tokens`` (per token and per layer)."""
    return _mean([token_summary(t) for t in tokens])


def verdict(summary: dict, plain_s: float | None = None) -> str:
    """One line: host-bound when the host's launching time is at least the compute stream's
    busy time (the GPU waits for the host), else GPU-bound. With ``plain_s`` (the seconds per
    token of the same steps without the timeline's hooks) the line adds the host's launching
    time without the hooks' own cost, estimated as ``plain_s`` less the recorded waits."""
    hb = summary["host"]["busy"]
    gb = summary["streams"]["compute"]["busy"]
    kind = "host-bound" if hb >= gb else "GPU-bound"
    line = (f"{kind}: host launching {1e3 * hb:.3f} ms vs compute stream busy "
            f"{1e3 * gb:.3f} ms per token (ratio {hb / gb if gb else float('inf'):.2f})")
    if plain_s is not None:
        est = max(0.0, plain_s - summary["host"]["wait"])
        line += (f"; without the hooks about {1e3 * est:.3f} ms of launching (ratio "
                 f"{est / gb if gb else float('inf'):.2f}: "
                 f"{'host-bound' if est >= gb else 'GPU-bound'})")
    return line


def _ms(x) -> str:
    return f"{1e3 * x:.3f}"


def format_summary(name: str, s: dict) -> str:
    """The per-token and per-layer tables of one configuration (milliseconds)."""
    h, st, cp = s["host"], s["streams"], s["critical"]
    lines = [f"## {name}", f"per token: wall {_ms(s['wall'])} ms; host launching "
             f"{_ms(h['busy'])}, host waiting {_ms(h['wait'])} ("
             + ", ".join(f"{k[5:]} {_ms(v)}" for k, v in sorted(h["by_name"].items())
                         if k.startswith("wait:")) + ")",
             "  streams busy/idle: " + "; ".join(f"{k} {_ms(v['busy'])}/{_ms(v['idle'])}"
                                                 for k, v in st.items()),
             "  critical path: " + ", ".join(f"{k} {_ms(v)}" for k, v in
                                              sorted(cp.items(), key=lambda kv: -kv[1])),
             "  host launching by section: " + ", ".join(
                 f"{k} {_ms(v)}" for k, v in sorted(h["by_name"].items(), key=lambda kv: -kv[1])
                 if not k.startswith("wait:"))]
    if s["layers"]:
        lines.append("| layer | window | host launch | host wait (on what) | compute busy | "
                     "copy busy | decode busy | critical path (largest first) |")
        lines.append("|---:|---:|---:|---|---:|---:|---:|---|")
        for layer in sorted(s["layers"], key=lambda x: int(x)):
            L = s["layers"][layer]
            crit = ", ".join(f"{k} {_ms(v)}" for k, v in
                             sorted(L["critical"].items(), key=lambda kv: -kv[1])[:4])
            on = ", ".join(f"{k[5:]} {_ms(v)}" for k, v in L["host"]["by_name"].items()
                           if k.startswith("wait:"))
            lines.append(f"| {layer} | {_ms(L['window'])} | {_ms(L['host']['busy'])} | "
                         f"{_ms(L['host']['wait'])}{f' ({on})' if on else ''} | "
                         f"{_ms(L['streams']['compute']['busy'])} | "
                         f"{_ms(L['streams']['copy']['busy'])} | "
                         f"{_ms(L['streams']['decode']['busy'])} | {crit} |")
    return "\n".join(lines)


#: Gantt characters: host launching / waiting, and per stream its items
GANTT_CHARS = {"launch": "#", "wait": "w", "compute": "C", "copy": "=", "decode": "D",
               "idle": "."}


def gantt(tokens: list, width: int = 120) -> str:
    """A text Gantt of consecutive ``tokens`` (their records, laid end to end): one row each
    for the host (``#`` launching, ``w`` waiting), the compute, copy and decode streams (busy
    or ``.`` idle), a row with the layer each host column is in (its last digit), and the
    scale."""
    if not tokens:
        return ""
    offs, off = [], 0.0
    for t in tokens:
        offs.append(off)
        off += t["wall"]
    total = off or 1.0
    dt = total / width

    def row(kind_at):
        out = []
        for c in range(width):
            a, b = c * dt, (c + 1) * dt
            out.append(kind_at(a, b))
        return "".join(out)

    def cover(intervals, a, b):
        return union_length(intervals, a, b) >= 0.5 * (b - a)

    host_w, host_l, layers = [], [], []
    streams = {st: [] for st in STREAMS}
    for o, t in zip(offs, tokens):
        host_w += [(o + s["t0"], o + s["t1"]) for s in t["host"] if s["kind"] == "wait"]
        host_l.append((o, o + t["wall"]))
        layers += [(o + a, o + b, l) for l, (a, b) in layer_windows(t).items()]
        for g in t["gpu"]:
            streams[g["stream"]].append((o + g["t0"], o + g["t1"]))

    def host_at(a, b):
        if cover(host_w, a, b):
            return GANTT_CHARS["wait"]
        return GANTT_CHARS["launch"] if cover(host_l, a, b) else " "

    def layer_at(a, b):
        m = (a + b) / 2
        for x, y, l in layers:
            if x <= m < y:
                return str(l)[-1]
        return " "

    lines = [f"host    |{row(host_at)}|", f"layer   |{row(layer_at)}|"]
    for st in STREAMS:
        ch = GANTT_CHARS[st]
        lines.append(f"{st:<8}|" + row(lambda a, b, iv=streams[st], ch=ch:
                                       ch if cover(iv, a, b) else GANTT_CHARS["idle"]) + "|")
    lines.append(f"scale: {width} columns = {1e3 * total:.3f} ms ({1e6 * dt:.1f} µs a column); "
                 f"tokens start at " + ", ".join(f"{1e3 * o:.3f}" for o in offs) + " ms")
    return "\n".join(lines)
