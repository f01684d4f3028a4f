"""Recording a decode token's timeline on the budgeted GPU path: host time stamps and CUDA
events installed by wrapping methods, so the runtime carries no instrumentation when the tool
is not running (``tools/gpu_timeline.py``; the records are aggregated by
``tools/timeline_report.py``, whose module docstring describes them).

What :func:`install` wraps (and :func:`uninstall` restores):

* host spans (``time.perf_counter``): each decoder layer (``layer``), its attention, the
  look-ahead (the next MoE layer's norm + router + its reads), the sparse block's routing, the
  expert engine's call (``moe``) and inside it ``prepare`` (the call's misses: copy queuing and
  the decode launch), each expert's copy queuing (``queue``), each decode launch
  (``decode launch``), the prefetch's queuing (``prefetch``), ``wait_gpu`` (the compute stream
  made to wait for a decode), the experts' matmul launches (``experts``), the end of the call
  (``end call``: the prefetch batch's decode launch), the embedding and the lm_head;
* host waits: every read of a device array into host memory (the routing reads and the final
  logits; ``HostReads.read``) and every event synchronise of the engine (``ops.sync``), each
  named by the launch sections it happens in (``router``: the block's routing read;
  ``lookahead/router``: the look-ahead's; ``lookahead``: its scores; ``logits``: the token's
  end);
* CUDA events (timing on) on the stream each piece of work is queued on, just before and after
  it: every compute op of the backend (the outermost one when ops nest), every host-to-device
  copy of an expert (copy stream), every decode launch (decode stream); the engine's own events
  are made timing events too, so each cross-stream wait (``ops.wait``) is kept as a dependency
  of the next item of the waiting stream, with the time of the event it waited for.

On the host model of the device operations (:class:`~zipmoe_rt.engine.gpu_ops.HostOps`, the CPU
smoke test) the "events" are host clock readings and every operation is synchronous.
"""
from __future__ import annotations

import time

#: the backend ops recorded as compute-stream items (those a decode step calls; not ``route``,
#: whose end is a host read: its kernel is short and the read is recorded as a host wait)
COMPUTE_OPS = ("embed", "from_host", "zeros", "linear", "swiglu", "rmsnorm", "layer_norm",
               "add_", "rope_qk_cache", "attention", "experts_token",
               "expert_accumulate", "sigmoid_gate_add_", "scale_", "softcap_")
#: engine methods recorded as host launch spans: method -> span name
ENGINE_SPANS = {"run": "moe", "_prepare": "prepare", "_queue": "queue",
                "_close_batch": "decode launch", "_issue_prefetch": "prefetch",
                "_wait_gpu": "wait_gpu", "_end_call": "end call",
                "_end_prefetch": "prefetch end"}


class HostClock:
    """Events as host clock readings (the device operations run at once).

    A clock's interface, as :class:`Recorder` uses it: ``start(ops)`` takes the token's
    reference (``t_ref``, a ``time.perf_counter()`` reading, and the device's), ``mark(stream)``
    returns an event on ``stream``, ``seconds(ev)`` its time in seconds after the reference,
    ``sync()`` waits for the queued device work."""

    def start(self, ops):
        self.t_ref = time.perf_counter()

    def mark(self, stream):
        return time.perf_counter()

    def seconds(self, ev) -> float:
        return float(ev) - self.t_ref

    def sync(self):
        """Nothing is queued."""


class CudaClock:
    """CUDA events with timing on, against a reference event recorded on the compute stream
    right after a device synchronise."""

    def __init__(self):
        import cupy as cp
        self.cp = cp

    def start(self, ops):
        cp = self.cp
        cp.cuda.Device().synchronize()
        self.e0 = self.mark(cp.cuda.get_current_stream())
        self.t_ref = time.perf_counter()

    def mark(self, stream):
        ev = self.cp.cuda.Event(disable_timing=False)
        ev.record(stream)
        return ev

    def seconds(self, ev) -> float:
        if isinstance(ev, float):
            return ev - self.t_ref
        return self.cp.cuda.get_elapsed_time(self.e0, ev) / 1e3

    def sync(self):
        self.cp.cuda.Device().synchronize()


def _sid(stream):
    """A stream's identity: its handle on CUDA, the token itself on the host model."""
    return getattr(stream, "ptr", stream) if stream is not None else None


class Recorder:
    """The records of the tokens timed so far (:attr:`tokens`, the format of
    ``tools/timeline_report.py``) and the state of the token being recorded."""

    def __init__(self, clock, engine=None):
        self.clock = clock
        self.engine = engine
        self.tokens: list = []
        self.on = False
        self.layer = None
        self._stack: list = []          # names of the open launch spans
        self._in_op = 0                 # nesting depth of compute ops
        self._names: dict = {}          # stream id -> lane name
        self._ev_stream: dict = {}      # id(event) or float -> (event, lane)
        self._pending: dict = {}        # lane -> [events waited for since its last item]

    def set_streams(self, compute, copy=None, decode=None):
        """Name the lanes: items queued on ``compute``, ``copy`` and ``decode`` (streams, or
        the host model's stream tokens; None: absent) go to the lane of that name."""
        self._names = {_sid(compute): "compute"}
        if copy is not None:
            self._names[_sid(copy)] = "copy"
        if decode is not None:
            self._names[_sid(decode)] = "decode"

    def lane(self, stream) -> str:
        """The lane of ``stream`` (``compute`` for a stream not named by :meth:`set_streams`)."""
        return self._names.get(_sid(stream), "compute")

    # -- a token -------------------------------------------------------------------------------
    def begin(self, ops=None):
        """Start a token: device synchronised, reference taken."""
        self.clock.start(ops)
        self._host, self._gpu = [], []
        self._ev_stream.clear()
        self._pending = {}
        self.on = True

    def end(self) -> dict:
        """End the token (device synchronised), resolve its events; returns its record."""
        self.clock.sync()
        wall = time.perf_counter() - self.clock.t_ref
        self.on = False
        sec = self.clock.seconds
        gpu = []
        for g in self._gpu:
            deps = []
            for ev in g.pop("dep_events"):
                lane = self._ev_stream.get(_evkey(ev), (None, "compute"))[1]
                try:
                    deps.append((sec(ev), lane))
                except Exception:  # noqa: BLE001 - an event without timing: no dependency
                    pass
            e0, e1 = g.pop("e0"), g.pop("e1")
            gpu.append({**g, "t0": sec(e0), "t1": sec(e1), "deps": deps})
        tok = {"wall": wall, "host": self._host, "gpu": gpu}
        self.tokens.append(tok)
        return tok

    # -- spans and items -----------------------------------------------------------------------
    def host_span(self, name, kind, fn, *a, waits_on="compute", **kw):
        """``fn(*a, **kw)``, recorded (while a token is recorded) as a host span of ``kind``
        ``"launch"`` (a launch section named ``name``) or ``"wait"`` (a wait of what ``name``
        says, on the lane ``waits_on``, named by the launch sections it happens in); returns
        ``fn``'s result."""
        if not self.on:
            return fn(*a, **kw)
        t_ref = self.clock.t_ref
        if kind == "launch":
            self._stack.append(name)
        t0 = time.perf_counter()
        try:
            return fn(*a, **kw)
        finally:
            t1 = time.perf_counter()
            if kind == "launch":
                self._stack.pop()
            # a wait is named by the launch sections it happens in: "router", "lookahead/router"
            # (the look-ahead's routing read), "lookahead" (its scores), "logits" (the end)
            label = "/".join(n for n in self._stack if n != "layer") or "logits"
            span = {"name": label if kind == "wait" else name, "kind": kind, "layer": self.layer,
                    "t0": t0 - t_ref, "t1": t1 - t_ref}
            if kind == "wait":
                span["what"] = name
                span["waits_on"] = waits_on
            self._host.append(span)

    def gpu_item(self, stream, name, fn, *a, **kw):
        """``fn(*a, **kw)``, queuing work on ``stream``, recorded as an item ``name`` of that
        stream's lane between two clock events, with the cross-stream waits queued before it as
        dependencies (a compute op inside another records nothing: the outer one covers it);
        returns ``fn``'s result."""
        if not self.on:
            return fn(*a, **kw)
        lane = self.lane(stream)
        if lane == "compute":
            self._in_op += 1
            if self._in_op > 1:              # an op inside an op: the outer one records
                try:
                    return fn(*a, **kw)
                finally:
                    self._in_op -= 1
        try:
            deps = self._pending.pop(lane, [])       # waits queued before this item
            host_t = time.perf_counter() - self.clock.t_ref
            e0 = self.clock.mark(stream)
            out = fn(*a, **kw)
            e1 = self.clock.mark(stream)
            self._gpu.append({"stream": lane, "name": name, "layer": self.layer,
                              "host_t": host_t, "e0": e0, "e1": e1, "dep_events": deps})
            return out
        finally:
            if lane == "compute":
                self._in_op -= 1

    def note_record(self, stream, ev):
        """Remember the lane the engine's event ``ev`` was recorded on; returns ``ev``."""
        if self.on:
            self._ev_stream[_evkey(ev)] = (ev, self.lane(stream))
        return ev

    def lane_of(self, ev) -> str:
        """The lane an event was recorded on (``compute`` when not recorded this token)."""
        return self._ev_stream.get(_evkey(ev), (None, "compute"))[1]

    def note_wait(self, stream, ev):
        """Note that ``stream`` was made to wait for ``ev``: a dependency of its next item."""
        if self.on:
            self._pending.setdefault(self.lane(stream), []).append(ev)


def _evkey(ev):
    return ev if isinstance(ev, float) else id(ev)


def _wrap_attr(obj, name, make, undo):
    """Replace ``obj.name`` (an instance attribute) by ``make(original)``; remember how to
    restore it."""
    orig = getattr(obj, name, None)
    if orig is None:
        return
    had = name in getattr(obj, "__dict__", {})
    setattr(obj, name, make(orig))
    undo.append((obj, name, orig if had else None))


#: ``detail`` of :func:`install`: every compute op an item, or a few launch sections only
DETAILS = ("ops", "sections")
#: the compute-stream items of ``detail="sections"`` (each section's kernels: no reads inside)
SECTION_ITEMS = ("embed", "attention", "router logits", "experts", "lm_head")


def install(rec: Recorder, net, engine=None, detail: str = "ops") -> list:
    """Wrap the model's, backend's and engine's methods to record into ``rec`` (see the module
    docstring). ``detail``: ``"ops"`` records every compute op of the backend as a
    compute-stream item (two CUDA events each); ``"sections"`` only :data:`SECTION_ITEMS`
    (fewer events, so less of the hooks' own host time; the norms and additions between them
    are not covered). Returns the undo list for :func:`uninstall`.

    Raises:
        ValueError: an unknown ``detail``.
    """
    from zipmoe_rt.models.model import DecoderLayer
    if detail not in DETAILS:
        raise ValueError(f"detail must be one of {', '.join(DETAILS)}, got {detail!r}")
    sections = detail == "sections"
    undo: list = []
    be = net.backend
    ops = getattr(engine, "ops", None)
    cur = ops.current() if ops is not None else None
    rec.set_streams(cur, getattr(engine, "_copy_s", None), getattr(engine, "_dec_s", None))
    index = {id(layer): i for i, layer in enumerate(net.layers)}

    def cur_stream():
        return ops.current() if ops is not None else None

    def launch(name, f, item=None):
        """A host launch span, which with ``item`` is also a compute-stream item."""
        if item is None:
            return lambda *a, **kw: rec.host_span(name, "launch", f, *a, **kw)
        return lambda *a, **kw: rec.host_span(name, "launch", rec.gpu_item, cur_stream(),
                                              item, f, *a, **kw)

    # decoder layers and attention: __call__ is looked up on the class
    classes = {DecoderLayer: "layer"}
    for layer in net.layers:
        classes.setdefault(type(layer.attn), "attention")
    for cls, name in classes.items():
        orig = cls.__dict__.get("__call__")
        if orig is None:
            continue

        def call(self, *a, _orig=orig, _name=name, **kw):
            if _name == "layer":
                prev, rec.layer = rec.layer, index.get(id(self))
                try:
                    return rec.host_span("layer", "launch", _orig, self, *a, **kw)
                finally:
                    rec.layer = prev
            return launch(_name, _orig, _name if sections else None)(self, *a, **kw)
        cls.__call__ = call
        undo.append((cls, "__call__", ("class", orig)))

    for layer in net.layers:
        if getattr(layer, "lookahead", None) is not None:
            _wrap_attr(layer, "lookahead", lambda f: launch("lookahead", f), undo)
        mlp = getattr(layer, "mlp", None)
        if mlp is not None and hasattr(mlp, "route"):
            _wrap_attr(mlp, "route", lambda f: launch("router", f), undo)
            if sections:
                _wrap_attr(mlp, "router_logits", lambda f: (lambda *a, **kw: rec.gpu_item(
                    cur_stream(), "router logits", f, *a, **kw)), undo)
    _wrap_attr(net, "embed_tokens", lambda f: launch("embed", f, "embed" if sections else None),
               undo)
    _wrap_attr(net, "logits", lambda f: launch("lm_head", f, "lm_head" if sections else None),
               undo)

    # compute ops on the current stream
    for name in ("experts_token", "expert_accumulate"):        # a host span of their own too
        _wrap_attr(be, name, lambda f, n=name: launch("experts", f, "experts" if sections
                                                       else n), undo)
    for name in () if sections else COMPUTE_OPS:
        if name not in ("experts_token", "expert_accumulate"):
            _wrap_attr(be, name, lambda f, n=name: (lambda *a, **kw: rec.gpu_item(
                cur_stream(), n, f, *a, **kw)), undo)
    if getattr(be, "read_later", None) is not None:       # the wait comes when it is used
        _wrap_attr(be, "read_later", lambda f: (lambda *a: (lambda done: (
            lambda: rec.host_span("read later", "wait", done)))(f(*a))), undo)
    reads = getattr(be, "reads", None)
    if reads is not None:
        _wrap_attr(reads, "read", lambda f: (lambda *a, **kw: rec.host_span(
            "read", "wait", f, *a, **kw)), undo)

    if engine is not None:
        for meth, name in ENGINE_SPANS.items():
            _wrap_attr(engine, meth, lambda f, n=name: (lambda *a, **kw: rec.host_span(
                n, "launch", f, *a, **kw)), undo)
    if ops is not None:
        _wrap_attr(ops, "h2d_at", lambda f: (lambda dst, off, src, stream: rec.gpu_item(
            stream, "h2d", f, dst, off, src, stream)), undo)
        _wrap_attr(ops, "h2d", lambda f: (lambda dst, src, stream: rec.gpu_item(
            stream, "h2d", f, dst, src, stream)), undo)
        _wrap_attr(ops, "decode_batch", lambda f: (lambda jobs, seg, stream, **kw: rec.gpu_item(
            stream, "decode", f, jobs, seg, stream, **kw)), undo)
        _wrap_attr(ops, "decode", lambda f: (lambda *a: rec.gpu_item(
            a[-1], "decode", f, *a)), undo)
        _wrap_attr(ops, "record", lambda f: (lambda stream, timing=False: rec.note_record(
            stream, f(stream, timing=True))), undo)
        _wrap_attr(ops, "wait", lambda f: (lambda stream, ev: (rec.note_wait(stream, ev),
                                                                f(stream, ev))[1]), undo)
        _wrap_attr(ops, "sync", lambda f: (lambda ev: rec.host_span(
            "event sync", "wait", f, ev, waits_on=rec.lane_of(ev))), undo)
    return undo


def uninstall(undo: list) -> None:
    """Restore what :func:`install` wrapped."""
    for obj, name, orig in reversed(undo):
        if isinstance(orig, tuple) and orig and orig[0] == "class":
            setattr(obj, name, orig[1])
        elif orig is None:
            try:
                delattr(obj, name)
            except AttributeError:
                pass
        else:
            setattr(obj, name, orig)
