"""Loading a ``.zmoe`` file for the embedding API: :func:`load` (weights, tokenizer, the
budgeted expert engine or resident experts, the compute backend) and :func:`parse_size` (the
``--memory-budget`` text). :mod:`zipmoe_rt.api` re-exports both; :class:`~zipmoe_rt.api.Model`
is what :func:`load` returns.
"""
from __future__ import annotations

import contextlib
import math
from pathlib import Path
from typing import TYPE_CHECKING

from zmoe.constants import Keys

from .default_model import ensure_default_model
from .tokenizer import Tokenizer

if TYPE_CHECKING:
    from .api import Model

__all__ = ["load", "parse_size", "tokenizer_from_source"]


def parse_size(text, source=None) -> int:
    """A byte count from ``"600MB"``, ``"1.5GiB"``, ``"750000000"`` or ``"25%"``.

    A percentage means the dense weights plus that share of the experts' full BF16 bytes
    (``source`` required), so ``100%`` holds the whole model decoded.

    Raises:
        ValueError: unparseable text, a bool or a float that is not a whole number of bytes,
            a size or percentage that is not positive, or a size over 1 PB (the option is
            named).
    """
    check_budget_type(text)
    if isinstance(text, (int, float)):
        if text <= 0:
            raise ValueError(f"memory_budget (--memory-budget): must be positive, got {text!r}")
        return _at_most_limit(int(text), text)
    t = str(text).strip().upper().replace(" ", "")
    if t.endswith("%"):
        if source is None:
            raise ValueError("--memory-budget: a percentage needs the model")
        try:
            frac = float(t[:-1]) / 100
        except ValueError:
            raise ValueError(f"--memory-budget: cannot read {text!r} (use e.g. 600MB, 1.5GiB, "
                             f"25%)") from None
        if not 0 < frac <= 1:
            raise ValueError(f"--memory-budget: a share must be in (0, 100] %, got {text!r}")
        experts = sum(l.full_bytes for l in source.layouts.values())
        return int(source.dense_bytes() + frac * experts)
    units = {"KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "KB": 10**3, "MB": 10**6, "GB": 10**9,
             "K": 10**3, "M": 10**6, "G": 10**9, "B": 1}
    value = None
    for u, mul in units.items():
        if t.endswith(u):
            try:
                value = int(float(t[:-len(u)]) * mul)
            except (ValueError, OverflowError):         # OverflowError: "infGB"
                pass
            break
    if value is None:
        try:
            value = int(float(t))
        except (ValueError, OverflowError):             # OverflowError: "inf", "1e400"
            raise ValueError(f"--memory-budget: cannot read {text!r} (use e.g. 600MB, 1.5GiB, "
                             f"25%)") from None
    if value <= 0:
        raise ValueError(f"--memory-budget: must be positive, got {text!r}")
    return _at_most_limit(value, text)


def _at_most_limit(value: int, text) -> int:
    """``value``, or a ValueError naming the option where it passes ``--memory-limit``'s
    largest figure (1 PB, :data:`~zipmoe_rt.engine.limit.MAX_LIMIT`): a typo, not a machine."""
    from .engine.limit import MAX_LIMIT
    if value > MAX_LIMIT:
        raise ValueError(f"memory_budget (--memory-budget): {text!r} is more than 1 PB; give "
                         f"the bytes the weights may use (e.g. 600MB, 1.5GiB, 25%)")
    return value


def check_budget_type(value) -> None:
    """Refuse a ``memory_budget`` that is neither an int (bytes), a whole-number float nor a
    str (``"2GB"``, ``"25%"``): ``True`` and ``1.5`` are not byte counts.

    Raises:
        ValueError: naming ``memory_budget (--memory-budget)`` and the value.
    """
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise ValueError(f"memory_budget (--memory-budget): expected bytes (an int) or a size "
                         f"such as '2GB' or '25%', got {value!r}")
    if isinstance(value, float) and not value.is_integer():
        raise ValueError(f"memory_budget (--memory-budget): {value!r} is not a whole number of "
                         f"bytes (give an int, or a size such as '1.5GB')")


def unit_hint(text) -> str:
    """The hint added to a too-small budget given as a bare number (``--memory-budget 1``, which
    is 1 byte): ``""`` for an int, a size with a unit or a percentage."""
    t = text.strip() if isinstance(text, str) else ""
    try:
        n = float(t)
    except ValueError:
        return ""
    if not math.isfinite(n):
        return ""
    shown = str(int(n)) if n.is_integer() else t
    return f" (a number without a unit is bytes: did you mean {shown}GB or {shown}%?)"


@contextlib.contextmanager
def budget_hint(memory_budget):
    """Re-raise a :class:`~zipmoe_rt.engine.tiers.BudgetError` about ``--memory-budget`` raised
    inside with :func:`unit_hint` added, when ``memory_budget`` was a bare number; anything
    else passes unchanged."""
    from .engine.tiers import BudgetError
    try:
        yield
    except BudgetError as e:
        hint = unit_hint(memory_budget)
        if hint and str(e).startswith("--memory-budget "):
            raise type(e)(f"{e}{hint}") from None
        raise


def check_workers(workers) -> None:
    """Refuse ``workers`` other than None or an int >= 1 (the CLI's ``--workers`` takes the same).

    Raises:
        ValueError: ``"workers: expected None (all cores) or an int >= 1, got ..."``.
    """
    if workers is not None and (isinstance(workers, bool) or not isinstance(workers, int)
                                or workers < 1):
        raise ValueError(f"workers (--workers): expected None (all cores) or an int >= 1, got "
                         f"{workers!r}")


def _check_choice(value, choices, name: str) -> None:
    """Raise ValueError naming ``name`` and the ``choices`` when ``value`` is not one of them
    (an option that applies only under a budget is still checked without one)."""
    if value not in choices:
        raise ValueError(f"{name}: expected one of {', '.join(choices)}, got {value!r}")


def load(path: str | Path | None = None, *, verify: bool = True, progress: bool = True,
         memory_budget=None, policy: str = "auto", eviction: str = "lru",
         workers: int | None = None, direct: bool = False, trace=None,
         io_depth: int | None = None, device: str = "cpu", memory_limit=None,
         context: int | None = None, resident: str = "full", host_budget=None,
         prefetch=None, c_tier: str = "packed") -> "Model":
    """Load a ``.zmoe`` model (or the bundled default model when ``path`` is None).

    Args:
        path: a ``.zmoe`` file. None builds/reuses the default model in the cache folder.
        verify: check the CRC-32 of every piece read from the file.
        progress: show progress bars when building the default model.
        memory_budget: bytes (or "600MB", "25%", see :func:`parse_size`) for all weights; None
            keeps every expert decoded after first use. Dense weights always stay resident.
        policy: ``zipmoe`` (tiers planned from an activation trace), ``zip-lru``, ``raw-lru``
            (needs a file converted with ``--expert-encoding raw``), or ``auto``: when a
            trace exists next to the model, the zipmoe engine with each MoE layer's plan an LRU
            pool of full experts, C/S/E tiers or a mix, whichever the planner predicts fastest
            (``engine.auto_choice`` says which); else zip-lru (raw-lru for raw files).
        eviction: ``lru``, ``lfu`` or ``tlfu`` (token-weighted LFU) for F caches.
        workers: decode workers L, an int >= 1 (default None: all cores).
        direct: O_DIRECT reads of expert regions.
        io_depth: expert-region reads in flight at once (default
            :data:`~zipmoe_rt.engine.io.IO_DEPTH`; 1 = one I/O thread).
        trace: activation trace file (default ``MODEL.trace.json``).
        memory_limit: a bound on the whole process ("600MB", "80%", "auto", bytes): the
            weight budget is what the measured overhead, the KV cache for ``context`` tokens
            and the read buffers leave (:func:`~zipmoe_rt.engine.limit.plan_memory`, result
            in :attr:`Model.memory_plan`); a ``memory_budget`` given too must fit it.
        context: tokens the KV cache is sized for under ``memory_limit`` (default
            :data:`~zipmoe_rt.engine.limit.DEFAULT_CONTEXT`).
        device: ``cpu`` (Numba kernels), ``cuda`` (the CuPy backend on the GPU: dense weights,
            KV cache and compute there; unbudgeted, every expert is uploaded once and stays on
            the GPU; under a budget the budget counts GPU memory and misses are copied
            compressed and decoded on the GPU, :mod:`zipmoe_rt.engine.gpu_engine`; FP8 /
            MXFP4 weights are dequantised on the host and held as BF16 words where exact, else
            float32, :func:`~zipmoe_rt.engine.lowprec.compute_form`), or
            ``auto`` (cuda when CuPy imports and sees a GPU, else cpu with one
            :class:`~zipmoe_rt.backends.DeviceWarning`).
        resident: without a budget, how experts are held: ``full`` (decoded to BF16 on first
            use and kept) or ``compressed`` (every expert read at load and kept in the compute
            form, ~75 % of the BF16 bytes, and computed in place by the packed kernels; no reads
            after loading; outputs bit-identical; design note §6.5). Under a budget or limit
            (CPU): the experts the policy caches (zip-lru's and raw-lru's LRU cache, zipmoe's
            F pools) are held in the compute form, misses transcoded when loaded, so about
            1.3x as many fit; the policy (``auto`` too) is chosen as with ``full``
            (engine/ctier.py). The C tier of ``zipmoe`` is in the compute form either way. On ``cuda`` every expert
            is transcoded on the host, uploaded packed at load and computed in place by the
            fused decode + GEMV kernels (:mod:`zipmoe_rt.backends.cuda_packed`; logits equal
            the BF16 GPU path's bit for bit).
        host_budget: with ``device="cuda"`` and a ``memory_budget``: pinned host memory for
            experts kept in host RAM in compressed form ("2GB", "40%" of the experts' stored
            bytes, bytes; :func:`~zipmoe_rt.engine.gpu_meta.parse_host_budget`); the other
            misses are read from the file. Default 0 (docs/gpu.md).
        prefetch: under a budget, ``on``/``off`` (or a bool): while a layer computes, start
            loading the experts the next MoE layer's router predicts from the current hidden
            state (engine/prefetch.py; on ``cuda`` their copies over PCIe and decodes,
            engine/gpu_prefetch.py; outputs bit-identical either way).
            None: the default, :data:`~zipmoe_rt.engine.prefetch.DEFAULT_PREFETCH`. No effect
            without a budget. Asked for under a budget without room for its second working
            set, the run goes without it and warns
            (:class:`~zipmoe_rt.engine.prefetch.PrefetchWarning`, saying why).
        c_tier: under a budget, how ``zipmoe``'s C slots hold their experts: ``packed`` (the
            compute form, transcoded once when a slot is filled, computed in place with no
            decode) or ``planes`` (the storage form, SM + Huffman exponents, decoded into BF16
            at every use). Experts that are not packable keep the storage form either way.

    Returns:
        a :class:`Model`.

    Raises:
        FileNotFoundError: no such file.
        zmoe.ZmoeError: not a ``.zmoe``, corrupt, truncated, or from a newer format version.
        ValueError: a ``policy``, ``eviction``, ``context`` or ``workers`` out of its choices
            or range, or a ``memory_budget`` that is a bool or a float with a fraction
            (checked with or without a budget); a ``host_budget`` that cannot be read, or given without ``device="cuda"``
            and a ``memory_budget``; an architecture this runtime does not run, a file without a tokenizer, a
            ``device`` other than auto, cpu, cuda, an unknown ``resident`` value, or
            ``resident="compressed"`` with a memory budget or limit on ``cuda``, or a
            ``prefetch`` other than on, off or a bool; ``resident="compressed"`` on ``cuda``
            for a file with FP8 or MXFP4 tensors
            (:func:`~zipmoe_rt.engine.lowprec.refuse_device`, naming the file and tensor).
        zipmoe_rt.engine.limit.MemoryLimitError: an unreadable ``memory_limit``, one too small
            for the fixed overhead plus the smallest budget (both stated), or a
            ``memory_budget`` that does not fit it.
        zipmoe_rt.backends.DeviceError: ``device="cuda"`` without CuPy or a GPU (the message
            names the option and the extra to install).
        zipmoe_rt.engine.io.ModelFileError: the file was replaced or changed while loading, or
            a read failed (EIO). Later, the calls of the :class:`Model` raise it when the file
            is changed in place under them (see :class:`Model` for what is guaranteed).

    Warns:
        zipmoe_rt.engine.profile.CalibrationWarning: policy ``zipmoe`` with a stored
            calibration (``MODEL.calib.json``) from another version, the other read mode
            (``direct``), another ``io_depth`` or another machine; the plan uses it anyway.
        zipmoe_rt.engine.precompile.KernelCompileWarning: under a memory budget or limit on
            the CPU with Numba's kernel cache cold, the child process that compiles the
            kernels failed or timed out; they compile in this process instead (same output).

    Under a memory budget or limit on the CPU, a cold kernel cache (first run after an install
    or upgrade) is filled first by a child process (:mod:`zipmoe_rt.engine.precompile`; a
    notice on stderr meanwhile, with or without ``progress``: on a terminal a line as it
    starts and one as it ends, elsewhere one plain line), so that this process loads compiled
    kernels and never holds LLVM's compile memory beside its weights.
    """
    from .api import Model
    from .backends import get_backend, resolve_device
    from .engine.factory import build_engine
    from .engine.store import ZmoeSource
    from .engine.tiers import budget_split
    from .models import build_model
    from .models.moe import ExpertExecutor
    from .models.packed import dense_saving

    path = Path(path) if path is not None else ensure_default_model(progress=progress)
    if not path.exists():
        raise FileNotFoundError(f"{path}: no such file")
    if path.is_dir():
        from .cli_types import folder_message
        raise ValueError(folder_message(path))
    budgeted = memory_budget is not None or memory_limit is not None
    backend = get_backend(resolve_device(device, "--device"))
    on_host = backend.name != "cuda"
    from .engine.resident import check_resident
    if check_resident(resident) == "compressed" and budgeted and not on_host:
        raise ValueError("resident (--resident): 'compressed' with a memory budget "
                         "(--memory-budget, --memory-limit) runs on the CPU engine only; "
                         "--device cuda budgets hold experts compressed on the host with "
                         "--host-budget instead")
    if host_budget is not None and (on_host or memory_budget is None):
        raise ValueError("host_budget (--host-budget): applies to --device cuda with "
                         "--memory-budget (it bounds the pinned host memory of experts the GPU "
                         "budget leaves out)")
    from .engine.io import check_io_depth
    from .engine.ctier import check_c_form
    check_c_form(c_tier)
    check_io_depth(io_depth)   # also unbudgeted: a bad value is an error, not ignored
    from .engine.tiers import EVICTIONS, POLICIES
    _check_choice(policy, ("auto",) + POLICIES, "policy (--policy)")
    _check_choice(eviction, EVICTIONS, "eviction (--eviction)")
    if context is not None and (isinstance(context, bool) or not isinstance(context, int)
                                or context < 1):
        raise ValueError(f"context: expected a number of tokens >= 1, got {context!r}")
    check_workers(workers)
    if memory_budget is not None:
        check_budget_type(memory_budget)
    from .engine.prefetch import DEFAULT_PREFETCH, attach, check_prefetch
    prefetch = check_prefetch(DEFAULT_PREFETCH if prefetch is None else prefetch)
    from . import kernels
    if kernels.USER_WAIT_POLICY is None:  # see zipmoe_rt/kernels/__init__.py
        kernels.set_wait_policy("passive" if budgeted else "active")
    # on the GPU the device holds the dense weights and (unbudgeted) the experts, and with
    # resident="compressed" the model holds them in the compute form: the source keeps no
    # host copies of its own
    source = ZmoeSource(path, verify=verify, keep_experts=not budgeted and on_host,
                        copy_dense=budgeted or not on_host or resident == "compressed",
                        resident=resident, lowprec_form="float32" if on_host else "compact")
    engine = None
    with budget_hint(memory_budget):     # a bare-number budget too small: the unit hint
        try:
            from .engine.lowprec import refuse_device
            refuse_device(source.reader, backend.name, resident)   # FP8 / MXFP4 files
            cache_filled = False
            if budgeted and on_host:
                # a cold kernel cache is filled by a child process, whose compile memory is given
                # back before this one holds anything (engine/precompile.py)
                from .engine.precompile import ensure_kernels
                # (a notice whether or not progress bars are wanted: a minute without output
                # would look like a hang where stderr is piped)
                cache_filled = ensure_kernels(source, notice=True) != "failed"
            tok = tokenizer_from_source(source)
            # the tokenizer holds its own parsed copy; the JSON text (~7 MB as a str) is not needed
            source.metadata.pop(Keys.Tokenizer.JSON, None)
            mplan = None
            net = None
            # with resident="compressed" on the host the model holds its dense linears in the
            # compute form: built before the budget is divided, so that the dense bytes the budget
            # holds are the bytes held (its executor is replaced by the engine below)
            dense_first = budgeted and on_host and resident == "compressed"
            if budgeted:
                if dense_first and memory_limit is None:
                    _refuse_early(source, lambda: budget_split(
                        source, parse_size(memory_budget, source)))
                    net = _dense_first(source, backend)    # a share budget counts dense as held
                budget = None if memory_budget is None else parse_size(memory_budget, source)
                if memory_limit is not None:
                    from .engine.footprint import release, warm_up
                    from .engine.limit import fixed_overhead, plan_memory, warmup_peak
                    # measured first (a child process, which also fills Numba's cache); then the
                    # kernels' load peak here, before any weight exists; what stays is the steady
                    # overhead the limit counts (engine/footprint.py)
                    overhead = fixed_overhead(source.path, cache_filled=cache_filled)
                    peak = warmup_peak(source.path, cache_filled=cache_filled)
                    if not dense_first:
                        mplan = plan_memory(source, memory_limit, context, budget=budget,
                                            overhead=overhead, peak=peak)
                    else:        # checked again, exactly, once the dense linears are built
                        _refuse_early(source, lambda: plan_memory(
                            source, memory_limit, context, overhead=overhead, peak=peak,
                            budget=None if memory_budget is None
                            else parse_size(memory_budget, source)))
                    warm_up(source)
                    release()
                    if dense_first:
                        net = _dense_first(source, backend)
                        if memory_budget is not None:
                            budget = parse_size(memory_budget, source)
                        mplan = plan_memory(source, memory_limit, context, budget=budget,
                                            overhead=overhead, peak=peak)
                    budget = mplan.budget
                hb = 0
                if host_budget is not None:
                    from .engine.gpu_meta import parse_host_budget
                    hb = parse_host_budget(host_budget, source)
                engine = build_engine(source, budget, policy, eviction,
                                      workers, direct, trace, verify, io_depth, warn_stacklevel=2,
                                      backend=backend, host_budget=hb, prefetch=prefetch,
                                      resident=resident, c_form=c_tier)
                _check_same_file(source, engine.reader)
                if prefetch and not getattr(engine, "prefetch", True):
                    import warnings
                    from .engine.prefetch import PrefetchWarning, prefetch_off_reason
                    warnings.warn(PrefetchWarning(prefetch_off_reason(
                        engine, budget, memory_limit is not None)), stacklevel=2)
                executor = engine
            else:
                executor = ExpertExecutor(backend.resident_experts(source), backend)
                if resident == "compressed":   # every expert now: on the host, or uploaded packed
                    if on_host:
                        source.admit_all()
                    else:
                        executor.source.load_all()
            if net is None:
                net = build_model(source, executor=executor, backend=backend)
                if resident == "compressed" and on_host:
                    source.dense_saving = dense_saving(net)
            else:
                net.executor = executor
            if engine is not None:
                attach(net, engine)
            model = Model(source, net, tok, path, engine)
            model.memory_plan = mplan
            if budgeted or resident == "compressed":
                _release_load_memory(source)
            return model
        except BaseException:
            if engine is not None:
                engine.close()
            source.close()
            raise


def _refuse_early(source, check) -> None:
    """Run ``check()`` (a budget or limit check that raises when it is too small) before the
    dense linears are built into the compute form, with the least bytes they can hold there
    (:func:`~zipmoe_rt.models.packed.dense_saving_bound`): a budget or limit too small even
    then is refused at once, in the words of the exact check that follows the build, rather
    than after that build (which reads and transcodes every dense weight)."""
    from .engine.tiers import BudgetError
    from .models.packed import dense_saving_bound
    bound = dense_saving_bound(source)
    source.dense_saving = bound
    try:
        check()
    except BudgetError as e:
        # the minimum stated is the least the dense linears can take: the exact one, known once
        # they are built, may be higher by what their compute form leaves unsaved
        raise type(e)(f"{e} (counting the dense linears at the least they can take in the "
                      f"compute form; the exact minimum, known once they are built, is at most "
                      f"{bound / 1e6:.1f} MB more)") from None
    finally:
        source.dense_saving = 0


def _dense_first(source, backend):
    """The model of ``source`` built before its expert engine (an executor that is replaced
    before it runs), with ``source.dense_saving`` set from the dense weights it holds
    (:func:`~zipmoe_rt.models.packed.dense_saving`)."""
    from .models import build_model
    from .models.moe import ExpertExecutor
    from .models.packed import dense_saving
    net = build_model(source, executor=ExpertExecutor(source, backend), backend=backend)
    source.dense_saving = dense_saving(net)
    return net


def _check_same_file(source, reader) -> None:
    """The engine opened the file the source opened (not one renamed over it meanwhile).

    Raises:
        zipmoe_rt.engine.io.ModelFileError: they differ.
    """
    import os

    from .engine.io import ModelFileError
    a, b = os.fstat(source.reader_fd), os.fstat(reader.fd)
    if (a.st_ino, a.st_dev) != (b.st_ino, b.st_dev):
        raise ModelFileError(f"{source.path}: the file was replaced while the model was being "
                             f"loaded; load it again")


def _release_load_memory(source) -> None:
    """After a budgeted load, give back what loading left behind and a memory cgroup would
    keep charging: the model file's pages in the page cache (dense weights and tiers were read
    into process memory with pread, so nothing maps them), the freed C heap and LLVM's code
    pages (:func:`~zipmoe_rt.engine.footprint.drop_cold_library_pages`)."""
    import gc

    from .engine.io import evict_page_cache, release_heap

    try:
        evict_page_cache(source.path)
    except OSError:
        pass
    gc.collect()
    release_heap()
    from .engine.footprint import drop_cold_library_pages
    drop_cold_library_pages()


def tokenizer_from_source(source) -> Tokenizer:
    """The tokenizer stored in a model file: ``tokenizer.json``, ``tokenizer.config`` and
    ``tokenizer.chat_template`` of ``source.metadata`` (a :class:`~zipmoe_rt.engine.store.ZmoeSource`).

    Raises:
        ValueError: the file has no ``tokenizer.json`` (converted from a folder without one).
    """
    meta = source.metadata
    tok_json = meta.get(Keys.Tokenizer.JSON)
    if tok_json is None:
        raise ValueError(f"{source.path}: has no tokenizer (convert a folder with tokenizer.json)")
    return Tokenizer.from_hf_config(tok_json, meta.get(Keys.Tokenizer.CONFIG) or {},
                                    meta.get(Keys.Tokenizer.CHAT_TEMPLATE))
