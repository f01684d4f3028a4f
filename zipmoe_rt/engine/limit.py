"""``--memory-limit``: a bound on the whole process, and the weight budget it leaves.

A memory budget (``--memory-budget``) counts weights only: dense weights, the experts' cache
tiers and one token's decoded experts (:func:`~zipmoe_rt.engine.pipeline.budget_split`). A
memory limit counts everything the process holds, and derives the budget from it::

    budget = limit - fixed overhead - KV cache - read buffers - prefill activations
             - engine headroom

* **fixed overhead**: the steady RSS of a fresh interpreter that imports the runtime, reads the
  model's index and tokenizer and warms every CPU kernel up on tiny models of the same family
  and one real expert, after the freed heap is trimmed and LLVM's code pages are dropped
  (interpreter, numpy, Numba and its JIT code, tokenizer, index;
  :mod:`~zipmoe_rt.engine.footprint`), measured in a child process
  (:func:`zipmoe_rt.bench.baseline_footprint`) and remembered in ``overhead.json`` of the cache folder
  (one entry per model file, runtime version and Python). A loading process under a limit runs
  the same warm-up and release before it holds any weight, so the warm-up's higher peak (JIT
  and LLVM) never meets the weights;
* **KV cache**: the allocation a context of ``context`` tokens ends at (the caches grow by
  doubling from 256 positions: :class:`~zipmoe_rt.models.cache.KVCache`), plus the old copy of
  one layer while it grows;
* **read buffers**: the expert-region read buffers of the engine, ``top-k x (SM region +
  exponent region)`` of the largest expert (:mod:`~zipmoe_rt.engine.buffers`), which the budget
  does not count;
* **prefill activations**: the float32 activations of one prefill batch (a prompt runs in
  batches of :data:`~zipmoe_rt.models.model.PREFILL_UBATCH` tokens; fewer when ``context`` is
  shorter), :func:`activation_bytes`;
* **engine headroom**: :data:`ENGINE_HEADROOM`, what the running engine holds beyond the
  measured footprint.

``auto`` takes the memory cgroup's limit of this process (cgroup v2 ``memory.max``, v1
``memory.limit_in_bytes``, the smallest along its path; ``max`` or the v1 "no limit" value mean
none), capped by the memory available (``MemAvailable`` of ``/proc/meminfo`` plus this process's
own RSS), and leaves a margin of :data:`MARGIN_FRACTION` of it, at least :data:`MARGIN_MIN`
bytes, for the file-backed pages a cgroup also charges (page cache of expert reads, library
code). ``N%`` is that share of the same detected memory, without margin; a size is taken as is.
"""
from __future__ import annotations

import json
import math
import os
import sys
from dataclasses import asdict, dataclass
from pathlib import Path

from .memparts import activation_bytes, kv_bytes, read_buffer_bytes
from .tiers import BudgetError, mb_at_least, size_text, smallest_budget

__all__ = ["MemoryLimitError", "MemoryPlan", "parse_limit", "cgroup_limit", "mem_available",
           "detect_memory", "resolve_limit", "fixed_overhead", "plan_memory", "memory_line",
           "footprint", "warmup_peak", "ENGINE_HEADROOM", "DEFAULT_CONTEXT", "MARGIN_FRACTION",
           "MARGIN_MIN", "OVERHEAD_METHOD"]

#: tokens of context the KV cache is sized for when the caller does not say (``chat``, ``load``)
DEFAULT_CONTEXT = 2048
#: ``auto`` leaves this share of the detected memory unused ...
MARGIN_FRACTION = 0.05
#: ... and at least this many bytes (32 MiB)
MARGIN_MIN = 32 << 20
#: what a running engine holds beyond the steady footprint measured without one (its threads'
#: stacks and heaps, heap fragments prefills leave): 16 MiB. On the default model under
#: ``--memory-limit 600MB`` (bench, pp128 tg32) the process's peak was 4.7 MB above the parts
#: the plan counts as in use, and a second prompt grew its RssAnon by up to 15 MB; without this
#: term the peak came within 0.3 MB of the limit.
ENGINE_HEADROOM = 16 << 20
#: how the fixed overhead is measured, part of its ``overhead.json`` key (a value measured
#: another way is measured again): the steady RSS after the warm-up and its release
OVERHEAD_METHOD = "steady-v1"
#: cgroup v1 reports "no limit" as the largest page-aligned counter (9223372036854771712 with
#: 4 KiB pages); any value from here up means none
V1_UNLIMITED = 1 << 62
_UNITS = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40, "KB": 10**3, "MB": 10**6,
          "GB": 10**9, "TB": 10**12, "K": 10**3, "M": 10**6, "G": 10**9, "T": 10**12, "B": 1}
_OPT = "--memory-limit"


#: the largest ``--memory-limit`` taken (1 PB): a larger figure is a typo, not a machine
MAX_LIMIT = 10**15


class MemoryLimitError(BudgetError):
    """A memory limit that cannot be read or that cannot run the model (the message states
    the limit and what is needed). A ValueError (through BudgetError)."""


def parse_limit(text):
    """Read a ``--memory-limit`` value.

    Args:
        text: ``"auto"``; a size ``"600MB"``, ``"1.5GiB"``, ``"750000000"`` (SI and binary
            units, case-insensitive); a share ``"80%"`` of the detected memory; or a positive
            int (bytes).
    Returns:
        ``"auto"``, an int of bytes, or a float share in (0, 1] for a percentage.
    Raises:
        MemoryLimitError: unreadable text, a value not positive or a share above 100 % (the
            option and the value are named).
    """
    if isinstance(text, bool):
        raise MemoryLimitError(f"{_OPT}: cannot read {text!r} (use e.g. 600MB, 1.5GiB, 80%, auto)")
    if isinstance(text, (int, float)):
        if not (math.isfinite(text) and text > 0):
            raise MemoryLimitError(f"{_OPT}: must be positive, got {text!r}")
        if text > MAX_LIMIT:
            raise MemoryLimitError(f"{_OPT}: {text!r} bytes is more than any machine's memory "
                                   f"(at most {MAX_LIMIT // 10**15} PB)")
        return int(text)
    t = str(text).strip().upper().replace(" ", "")
    bad = MemoryLimitError(f"{_OPT}: cannot read {text!r} (use e.g. 600MB, 1.5GiB, 80%, auto)")
    if t == "AUTO":
        return "auto"
    if t.endswith("%"):
        try:
            share = float(t[:-1]) / 100
        except ValueError:
            raise bad from None
        if not (math.isfinite(share) and 0 < share <= 1):
            raise MemoryLimitError(f"{_OPT}: a share must be in (0, 100] %, got {text!r}")
        return share
    mul = 1
    for u, m in _UNITS.items():
        if t.endswith(u):
            t, mul = t[:-len(u)], m
            break
    try:
        v = float(t)
    except ValueError:
        raise bad from None
    if not math.isfinite(v):
        raise MemoryLimitError(f"{_OPT}: must be a finite size, got {text!r}")
    if v * mul < 1:
        raise MemoryLimitError(f"{_OPT}: must be positive, got {text!r}")
    if v * mul > MAX_LIMIT:
        raise MemoryLimitError(f"{_OPT}: {text!r} is more than any machine's memory (at most "
                               f"{MAX_LIMIT // 10**15} PB)")
    return int(v * mul)


def _read_int(path: Path):
    """The integer in a cgroup file, None for ``max``, a missing or unreadable file."""
    try:
        s = path.read_text().strip()
    except OSError:
        return None
    if s == "max":
        return None
    try:
        return int(s)
    except ValueError:
        return None


def _ancestors(root: Path, cg_path: str):
    """``root/cg_path`` and each folder above it up to ``root`` (inclusive), deepest first."""
    parts = [p for p in cg_path.strip().split("/") if p and p != ".."]
    for i in range(len(parts), -1, -1):
        yield root.joinpath(*parts[:i])


def cgroup_limit(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup"):
    """The memory limit of this process's cgroup, and where it was read.

    cgroup v2 (a ``0::PATH`` line): ``memory.max`` under ``root`` (or ``root/unified`` on a
    hybrid mount); cgroup v1 (a line whose controllers include ``memory``):
    ``memory.limit_in_bytes`` under ``root/memory``. Each folder from the process's cgroup up
    to the mount's root counts (a parent's limit binds its children too; inside a cgroup
    namespace the process's own cgroup is the mount's root): the smallest limit wins. ``max``
    (v2) and values from :data:`V1_UNLIMITED` up (v1) mean no limit.

    Args:
        proc_cgroup: the ``/proc/self/cgroup`` file to read.
        root: where the cgroup file systems are mounted.
    Returns:
        ``(bytes, file)`` of the smallest limit, or ``(None, None)`` without one (no cgroup
        files, no memory controller, every level unlimited).
    """
    try:
        lines = Path(proc_cgroup).read_text().splitlines()
    except OSError:
        return None, None
    root = Path(root)
    best = (None, None)
    for line in lines:
        hid, _, rest = line.partition(":")
        ctrls, _, path = rest.partition(":")
        if hid == "0" and ctrls == "":
            cands = [(d, "memory.max") for base in (root, root / "unified")
                     for d in _ancestors(base, path)]
        elif "memory" in ctrls.split(","):
            cands = [(d, "memory.limit_in_bytes") for d in _ancestors(root / "memory", path)]
        else:
            continue
        for d, name in cands:
            v = _read_int(d / name)
            if v is None or v <= 0 or v >= V1_UNLIMITED:
                continue
            if best[0] is None or v < best[0]:
                best = (v, str(d / name))
    return best


def mem_available(meminfo="/proc/meminfo"):
    """``MemAvailable`` of ``meminfo`` in bytes, None where unknown."""
    try:
        with open(meminfo) as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def detect_memory(proc_cgroup="/proc/self/cgroup", root="/sys/fs/cgroup",
                  meminfo="/proc/meminfo"):
    """The memory this process may use: its cgroup's limit (:func:`cgroup_limit`), capped by
    ``MemAvailable`` plus this process's RSS (memory it already holds is not "available").

    Returns:
        ``(bytes, text)``: the amount and where it comes from, e.g. ``"cgroup limit 600.0 MB
        (/sys/fs/cgroup/.../memory.max)"``.
    Raises:
        MemoryLimitError: neither a cgroup limit nor ``MemAvailable`` can be read.
    """
    from ..util import status_bytes
    cg, where = cgroup_limit(proc_cgroup, root)
    avail = mem_available(meminfo)
    if avail is not None:
        avail += status_bytes("VmRSS")
    if cg is not None and (avail is None or cg <= avail):
        return cg, f"cgroup limit {cg / 1e6:.1f} MB ({where})"
    if avail is not None:
        extra = f"; below the cgroup limit {cg / 1e6:.1f} MB" if cg is not None else ""
        return avail, f"available memory {avail / 1e6:.1f} MB (MemAvailable + own RSS{extra})"
    raise MemoryLimitError(f"{_OPT} auto: no memory cgroup limit and no MemAvailable in "
                           f"{meminfo}; give a size (e.g. {_OPT} 600MB)")


def resolve_limit(value, **detect_kw):
    """The limit in bytes of a :func:`parse_limit` value, and how it was obtained.

    ``auto``: :func:`detect_memory` minus the margin (:data:`MARGIN_FRACTION`, at least
    :data:`MARGIN_MIN`); a share: that share of :func:`detect_memory`; bytes: as given.
    ``detect_kw`` go to :func:`detect_memory` (file paths).

    Returns:
        ``(bytes, text)``.
    Raises:
        MemoryLimitError: as :func:`parse_limit` and :func:`detect_memory`; ``auto`` leaving
            nothing after the margin.
    """
    v = parse_limit(value)
    if isinstance(v, int):
        return v, "given"
    mem, how = detect_memory(**detect_kw)
    if v == "auto":
        margin = max(MARGIN_MIN, int(MARGIN_FRACTION * mem))
        if mem - margin <= 0:
            raise MemoryLimitError(f"{_OPT} auto: {how} leaves nothing after the margin of "
                                   f"{margin / 1e6:.1f} MB")
        return mem - margin, f"auto: {how} - margin {margin / 1e6:.1f} MB"
    return int(v * mem), f"{100 * v:g}% of {how}"


def _overhead_store() -> Path:
    from ..default_model import cache_dir
    return cache_dir() / "overhead.json"


def footprint(model_path, measure=None, cache_filled: bool = False) -> dict:
    """The runtime's own memory for ``model_path`` in bytes, ``{"steady": ..., "peak": ...}``:
    a child process loads the runtime, the model's index and tokenizer, warms the kernels up and
    releases what the warm-up left (:func:`zipmoe_rt.bench.baseline_footprint`,
    :func:`zipmoe_rt.engine.footprint.steady_footprint`); ``steady`` is its RSS after that
    (what the weights compete with), ``peak`` its VmHWM (the warm-up's peak, which a loading
    process reaches before it holds any weight). Remembered per model file (path, size,
    modification time), runtime version, Python, :data:`OVERHEAD_METHOD`, the kernel sources'
    newest modification time and whether Numba's cache of them is filled
    (:func:`zipmoe_rt.engine.footprint.kernel_cache_stamp`) in ``overhead.json`` of the cache
    folder. A first child fills
    Numba's on-disk cache and a second one measures, so the figure is that of a process that
    loads its kernels rather than compiling them, as every later process does (a compile leaves
    ~20 MB more heap behind; where the cache cannot be written, both compile and so does the
    run). With ``cache_filled`` the first child is left out: the kernel-compiling child of
    :func:`zipmoe_rt.engine.precompile.ensure_kernels` has filled the cache with the same
    warm-up (:func:`zipmoe_rt.engine.footprint.warm_up`).

    Args:
        model_path: the ``.zmoe`` file.
        measure: the measuring function (default :func:`zipmoe_rt.bench.baseline_footprint`):
            a dict as above, or an int taken as both.
        cache_filled: Numba's cache already holds this model's kernels (``ensure_kernels``
            returned ``"ready"`` or ``"compiled"``).
    Raises:
        MemoryLimitError: the measurement failed (the child exited with an error).
    """
    from .. import __version__
    from .footprint import kernel_cache_stamp, sources_stamp
    p = Path(model_path).resolve()
    st = p.stat()

    def key() -> str:
        return (f"{p}|{st.st_size}|{st.st_mtime_ns}|{__version__}|{sys.version.split()[0]}|"
                f"{OVERHEAD_METHOD}|{sources_stamp()}|{kernel_cache_stamp()}")
    store = _overhead_store()
    try:
        known = json.loads(store.read_text())
    except (OSError, ValueError):
        known = {}
    if not isinstance(known, dict):
        known = {}
    v = known.get(key())
    if isinstance(v, dict) and all(isinstance(v.get(k), int) and v[k] > 0
                                   for k in ("steady", "peak")):
        return {"steady": v["steady"], "peak": v["peak"]}
    if measure is None:
        from ..bench import baseline_footprint as measure
    if not cache_filled:
        measure(p)    # fills Numba's cache: a child that compiles holds ~20 MB more, as no run does
    got = measure(p)
    if not isinstance(got, dict):
        got = {"steady": int(got), "peak": int(got)}
    v = {"steady": int(got.get("steady", 0)), "peak": int(got.get("peak", 0))}
    if v["steady"] <= 0 or v["peak"] <= 0:
        raise MemoryLimitError(f"{p}: could not measure the runtime's fixed memory overhead "
                               f"(the measuring child process failed; run `python -m "
                               f"zipmoe_rt.bench '[\"baseline\", \"{p}\"]'` to see why)")
    v["peak"] = max(v["peak"], v["steady"])
    known[key()] = v       # after the measurement, which filled Numba's cache
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        tmp = store.with_name(f"{store.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=1))
        os.replace(tmp, store)
    except OSError:
        pass      # a read-only cache folder: measured again next time
    return v


def fixed_overhead(model_path, measure=None, cache_filled: bool = False) -> int:
    """The runtime's fixed memory for ``model_path`` in bytes: the ``steady`` RSS of
    :func:`footprint` (arguments and errors as there)."""
    return footprint(model_path, measure, cache_filled)["steady"]


def warmup_peak(model_path, measure=None, cache_filled: bool = False) -> int:
    """The peak RSS in bytes a process reaches while it warms the kernels up, before it holds
    any weight: the ``peak`` of :func:`footprint` (arguments and errors as there). A limit
    below it is too small whatever the weights."""
    return footprint(model_path, measure, cache_filled)["peak"]


@dataclass
class MemoryPlan:
    """How a memory limit divides (bytes): ``limit`` = ``overhead`` + ``kv`` + ``buffers`` +
    ``activations`` + ``engine`` + ``budget`` (the weight budget, ``--memory-budget``), and ``limit`` >=
    ``warmup_peak`` (reached before the weights). ``how``: where the limit came from;
    ``context``: tokens the KV cache is sized for; ``minimum``: the smallest budget the model
    runs with (dense weights + one token's experts)."""
    limit: int
    how: str
    overhead: int
    kv: int
    buffers: int
    budget: int
    context: int
    minimum: int
    activations: int = 0
    #: the runtime's peak while it loads its kernels, before any weight (0: not checked)
    warmup_peak: int = 0
    #: :data:`ENGINE_HEADROOM`
    engine: int = 0

    def as_dict(self) -> dict:
        return asdict(self)

    def describe(self) -> str:
        """One line for the banner and ``/stats``."""
        return (f"memory limit {size_text(self.limit)} ({self.how}) = fixed overhead "
                f"{self.overhead / 1e6:.1f} MB + KV cache {self.kv / 1e6:.1f} MB ({self.context} "
                f"tokens) + read buffers {self.buffers / 1e6:.1f} MB + prefill activations "
                f"{self.activations / 1e6:.1f} MB + engine headroom "
                f"{self.engine / 1e6:.1f} MB + weight budget "
                f"{size_text(self.budget)}" + (
                    f" (kernel warm-up peak {self.warmup_peak / 1e6:.1f} MB, before the "
                    f"weights)" if self.warmup_peak else ""))


def plan_memory(source, limit, context: int | None = None, overhead: int | None = None,
                budget=None, peak: int | None = None, **detect_kw) -> MemoryPlan:
    """Divide a memory limit for ``source`` (a :class:`~zipmoe_rt.engine.store.ZmoeSource`).

    Args:
        source: the model.
        limit: a :func:`parse_limit` value (``"auto"``, ``"600MB"``, ``"80%"``, bytes).
        context: tokens the KV cache must hold (default :data:`DEFAULT_CONTEXT`).
        overhead: the fixed overhead in bytes (default: :func:`fixed_overhead`, measured).
        budget: a weight budget also given (``--memory-budget``, bytes): used as is, and it
            must fit the limit.
        peak: the warm-up's peak RSS (:func:`warmup_peak`), which the limit must also hold
            (default: measured with the overhead when ``overhead`` is None, else not checked).
        detect_kw: file paths for :func:`detect_memory`.
    Returns:
        the :class:`MemoryPlan`.
    Raises:
        MemoryLimitError: an unreadable limit; a limit below the overhead plus the smallest
            budget (both numbers stated), or below the warm-up's ``peak``; a ``budget`` that
            does not fit the limit.
    """
    from .pipeline import budget_split
    lim, how = resolve_limit(limit, **detect_kw)
    context = DEFAULT_CONTEXT if context is None else int(context)
    if context < 1:
        raise MemoryLimitError(f"context: must be at least 1 token, got {context}")
    if overhead is None:
        fp = footprint(source.path)
        ov, peak = fp["steady"], fp["peak"] if peak is None else peak
    else:
        ov = int(overhead)
    kv = kv_bytes(source.hparams, context)
    buf = read_buffer_bytes(source)
    act = activation_bytes(source.hparams, context)
    minimum = smallest_budget(source)
    need = ov + kv + buf + act + ENGINE_HEADROOM
    if peak is not None and lim < peak:
        # the one minimum of the limit: the warm-up's peak or the parts plus the smallest
        # weight budget, whichever is larger (a limit of the peak alone may not run)
        raise MemoryLimitError(
            f"{_OPT} {size_text(lim)} ({how}) is too small for this model: the runtime "
            f"peaks at {peak / 1e6:.1f} MB while it loads its kernels, before any weight "
            f"(it then keeps {ov / 1e6:.1f} MB), and needs {need / 1e6:.1f} MB plus the "
            f"smallest weight budget {mb_at_least(minimum)} to run: give at least "
            f"{mb_at_least(max(peak, need + minimum))}")
    free = lim - need
    parts = (f"fixed overhead {ov / 1e6:.1f} MB + KV cache {kv / 1e6:.1f} MB for {context} "
             f"tokens + read buffers {buf / 1e6:.1f} MB + prefill activations "
             f"{act / 1e6:.1f} MB + engine headroom {ENGINE_HEADROOM / 1e6:.1f} MB = "
             f"{need / 1e6:.1f} MB")
    if budget is not None:
        budget = int(budget)
        if budget > free:
            raise MemoryLimitError(
                f"--memory-budget {size_text(budget)} does not fit {_OPT} {size_text(lim)} "
                f"({how}): the limit holds {parts} and at most {max(free, 0) / 1e6:.1f} MB of "
                f"weights; drop --memory-budget to use that")
        budget_split(source, budget)          # BudgetError below the smallest budget
        free = budget
    elif free < minimum:
        raise MemoryLimitError(
            f"{_OPT} {size_text(lim)} ({how}) is too small for this model: it needs {parts}, "
            f"plus the smallest weight budget {mb_at_least(minimum)} (dense weights and one "
            f"token's experts): at least {mb_at_least(need + minimum)}")
    return MemoryPlan(limit=lim, how=how, overhead=ov, kv=kv, buffers=buf, budget=int(free),
                      context=context, minimum=minimum, activations=act,
                      warmup_peak=int(peak or 0), engine=ENGINE_HEADROOM)


def memory_line(plan: MemoryPlan | None, budget: int | None, policy: str,
                compressed: bool = False) -> str:
    """One line on a loaded model's memory for the banner and ``/stats``: the limit and how it
    divides (``plan``), else the weight budget (bytes, or None: unbudgeted), and the policy.
    ``compressed``: unbudgeted, every expert is held in the compute form (``--resident
    compressed``), not decoded."""
    pol = f"policy {policy}"
    if plan is not None:
        return f"{plan.describe()}; {pol}"
    if budget is not None:
        return f"no memory limit; weight budget {size_text(budget)}; {pol}"
    kept = ("every expert kept in the compute form, computed in place" if compressed
            else "every expert kept once decoded")
    return f"no memory limit, no weight budget ({kept}); {pol}"
