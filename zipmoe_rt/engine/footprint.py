"""The runtime's own memory under ``--memory-limit``: warming the kernels up before any weight
is loaded, and giving back what the warm-up leaves behind (design.md §10, "memory limit").

A process that runs a model holds, besides weights, KV cache and buffers, the interpreter, numpy,
Numba and its compiled code, the tokenizer and the container's index. Loading Numba's cached
machine code (``cache=True``) or compiling it on a cold cache goes through LLVM
(``libllvmlite.so``), whose code pages and heap the process touches once and never again while
it decodes. :func:`warm_up` runs every kernel the CPU paths use on a tiny model of the same
family (decoded and compute-form experts) and one real expert of the file (Huffman decode and
transcode), before the limit's weights exist, so that peak never meets them; then
:func:`release` returns the freed C heap (``malloc_trim``) and drops the process's mappings of
LLVM's code pages (``madvise(MADV_DONTNEED)`` on file-backed mappings with no private copy-on-
write pages: the kernel re-reads such a page from the file if it is ever used again). What is
left, the steady RSS, is what the weights compete with: :func:`steady_footprint` measures it
in a child process for :func:`zipmoe_rt.engine.limit.fixed_overhead`.
"""
from __future__ import annotations

import contextlib
import gc
import re
import sys

import numpy as np

__all__ = ["TinySource", "warm_up", "warm_up_calibration", "release", "drop_cold_library_pages",
           "steady_footprint", "sources_stamp", "COLD_LIBRARIES"]

#: shared libraries whose code a process needs only to compile or load Numba kernels
COLD_LIBRARIES = ("libllvmlite",)
_MADV_DONTNEED = 4
_MAP = re.compile(r"^([0-9a-f]+)-([0-9a-f]+) (\S+) \S+ \S+ \S+\s*(.*)$")


class TinySource:
    """A WeightSource with the family of ``hp`` but tiny random BF16 weights (JIT warm-up): two
    layers, hidden 64, the tensors its family's registry entry lists for that shape
    (:meth:`zipmoe_rt.families.Family.tensor_specs`). With ``packed``, every odd expert comes
    in the compute form (:func:`zipmoe_rt.engine.resident.pack_bf16`; ``--resident
    compressed``, the C tier) where its roles allow it, so a forward pass runs both expert
    kernels.

    Raises:
        ValueError: unknown family (UnknownFamilyError lists the supported ones).
    """

    def __init__(self, hp: dict, packed: bool = False):
        from ..families import get_family
        from ..models.weights import assemble_expert
        hp = dict(hp, hidden_size=64, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                  vocab_size=128, moe_intermediate_size=32, intermediate_size=32,
                  shared_expert_intermediate_size=min(32, hp.get("shared_expert_intermediate_size", 0)),
                  num_hidden_layers=2, moe_layers=[i for i in (0, 1) if i in hp["moe_layers"]] or [0])
        if hp.get("layer_types") is not None:
            hp["layer_types"] = list(hp["layer_types"][:2])
        self.hparams = hp
        specs = get_family(hp.get("family")).tensor_specs(hp)
        self._shapes = {s.name: s.shape for s in specs if not s.is_expert and not s.tied}
        #: one expert's roles and shapes as the family stores them (a stacked tensor's slice)
        self._roles = {s.role: tuple(s.shape[1:] if s.stacked else s.shape)
                       for s in specs if s.is_expert}
        self._rng, self._assemble = np.random.default_rng(0), assemble_expert
        self._cache: dict = {}
        self._packed = packed and set(self._roles) == {"gate", "up", "down"}
        #: with ``packed`` the model holds its dense linears in the compute form too
        self.resident = "compressed" if packed else "full"

    def has(self, name):
        return name in self._shapes

    def tensor(self, name):
        if name not in self._cache:
            self._cache[name] = self._rng.integers(0x3C00, 0x3D00, self._shapes[name]).astype(np.uint16)
        return self._cache[name]

    def expert(self, layer, e):
        roles = {r: self._rng.integers(0x3C00, 0x3D00, s).astype(np.uint16)
                 for r, s in self._roles.items()}
        if self._packed and e % 2:
            from ..models.packed import PackedExpert
            from .resident import pack_bf16
            return PackedExpert(*(pack_bf16(roles[r]) for r in ("gate", "up", "down")))
        return self._assemble(roles)


def warm_up(source) -> None:
    """Run, in this process, the kernels a CPU model of ``source``'s family uses: a prefill
    and a decode step of two tiny models (:class:`TinySource`; decoded experts, then mixed
    decoded and compute-form ones), and the Huffman decode and the transcode into the compute
    form of one real expert of the file (read with pread, not kept); each tiny model runs once
    as it is and once with the kernels' parallel thresholds at 0, so the parallel kernels a
    full-size model takes are loaded too. Numba loads each kernel
    from its on-disk cache, or compiles it on a cold one. Needs no weights of ``source``.

    Args:
        source: a :class:`~zipmoe_rt.engine.store.ZmoeSource` (its index and hyper-parameters).
    Raises:
        as :meth:`~zipmoe_rt.engine.store.ZmoeSource.decode_expert` (an unreadable expert).
    """
    from ..models import build_model
    for parallel in (False, True):
        with _parallel_thresholds(0 if parallel else None):
            for packed in (False, True):
                net = build_model(TinySource(source.hparams, packed=packed))
                c = net.new_cache()
                net.forward(np.arange(8, dtype=np.int64), c)
                net.forward(np.array([3], np.int64), c)
                _one_token_experts(net.backend, TinySource(source.hparams, packed=packed))
                del net, c
    from .resident import packable
    for (layer, e), lay in sorted(source.layouts.items())[:1]:
        source.decode_expert(layer, e)
        if packable(lay):
            source.pack_expert(layer, e)


#: the kernels' module-level work thresholds below which they run single-threaded
_THRESHOLDS = ("PAR_MIN_WORK", "ATTN_PAR_MIN")


@contextlib.contextmanager
def _parallel_thresholds(value):
    """With ``value`` (not None), every loaded kernel module's :data:`_THRESHOLDS` set to it
    while the block runs (0: a tiny model takes the parallel kernels a full-size one takes),
    restored after."""
    saved = []
    if value is not None:
        for name, mod in list(sys.modules.items()):
            if name.startswith(__package__.rsplit(".", 1)[0] + ".kernels") and mod is not None:
                for attr in _THRESHOLDS:
                    if isinstance(getattr(mod, attr, None), int):
                        saved.append((mod, attr, getattr(mod, attr)))
                        setattr(mod, attr, value)
    try:
        yield
    finally:
        for mod, attr, old in saved:
            setattr(mod, attr, old)


def _one_token_experts(backend, tiny: TinySource) -> None:
    """One token through one expert at a time (``expert_accumulate``, as the engine computes
    experts as their loads finish), a decoded and (``tiny``'s ``packed``) a compute-form one;
    families whose experts are not gate/up/down SwiGLU are left to their forward pass."""
    if set(tiny._roles) != {"gate", "up", "down"}:
        return
    hid = tiny._roles["gate"][1]
    x = np.ones((1, hid), np.float32)
    out = np.zeros((1, hid), np.float32)
    for e in (0, 1):
        backend.expert_accumulate(out, x, np.zeros(1, np.int64), np.ones(1, np.float32),
                                  tiny.expert(0, e))


def warm_up_calibration(source) -> None:
    """Run, in this process, the kernel signatures a calibration at load uses beyond
    :func:`warm_up`'s: one expert, decoded and in the compute form, on a 1-D token
    (``experts_token``, as :func:`zipmoe_rt.engine.calibration.calibrate` and
    ``compute_form_costs`` time the matmul), on tiny experts of ``source``'s family, serial
    and with the parallel thresholds at 0 (as :func:`warm_up`). Only the
    kernel-compiling child runs it (:mod:`zipmoe_rt.engine.precompile`): a loading process
    loads these from the cache only when it calibrates, inside the calibration's share of the
    budget, so the fixed overhead does not hold them."""
    from ..backends import get_backend
    tiny = TinySource(source.hparams, packed=True)
    if set(tiny._roles) != {"gate", "up", "down"}:
        return
    hid = tiny._roles["gate"][1]
    backend = get_backend("numba")
    for parallel in (False, True):        # the parallel kernels a full-size expert takes too
        with _parallel_thresholds(0 if parallel else None):
            for e in (0, 1):
                backend.experts_token(np.zeros(hid, np.float32), np.ones(hid, np.float32),
                                      [tiny.expert(0, e)], np.ones(1, np.float32))


def drop_cold_library_pages(libraries=COLD_LIBRARIES, maps="/proc/self/smaps") -> int:
    """Drop this process's resident pages of ``libraries`` (file names containing one of
    them): ``madvise(MADV_DONTNEED)`` on each file-backed mapping that holds no anonymous
    (copy-on-write) page, so only clean file pages go and a later use faults them in again from
    the file. Linux with glibc; elsewhere nothing happens.

    Returns:
        the resident bytes dropped (the ``Rss`` of those mappings before the call); 0 where
        ``maps`` or ``madvise`` is unavailable.
    """
    try:
        import ctypes
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
        with open(maps) as f:
            text = f.read()
    except (OSError, AttributeError):
        return 0
    dropped, cur, rss = 0, None, 0
    for line in text.splitlines():
        m = _MAP.match(line)
        if m:
            name = m.group(4).strip()
            cur = (int(m.group(1), 16), int(m.group(2), 16)) if (
                name.startswith("/") and any(lib in name.rsplit("/", 1)[-1]
                                             for lib in libraries)) else None
        elif cur and line.startswith("Rss:"):
            rss = int(line.split()[1]) * 1024
        elif cur and line.startswith("Anonymous:"):
            if int(line.split()[1]) == 0 and rss:
                if libc.madvise(cur[0], cur[1] - cur[0], _MADV_DONTNEED) == 0:
                    dropped += rss
            cur = None
    return dropped


def release() -> int:
    """After :func:`warm_up`: collect garbage, trim the C heap
    (:func:`~zipmoe_rt.engine.io.release_heap`) and :func:`drop_cold_library_pages`.
    Returns the library bytes dropped."""
    from .io import release_heap
    gc.collect()
    release_heap()
    return drop_cold_library_pages()


def sources_stamp() -> int:
    """The newest modification time (ns) of the kernel sources and of this module: Numba's
    on-disk cache is invalid after a kernel changes, so the overhead (whose measurement refills
    that cache) is then measured again (:func:`zipmoe_rt.engine.limit.footprint`)."""
    from pathlib import Path
    here = Path(__file__).resolve()
    try:
        return max((f.stat().st_mtime_ns for f in
                    [*(here.parents[1] / "kernels").glob("*.py"), here]), default=0)
    except OSError:
        return 0


def kernel_cache_stamp() -> str:
    """Whether Numba's on-disk cache of the kernels holds any entry: ``"cached"`` or
    ``"empty"`` (``"unknown"`` where its folder cannot be found). A process that compiles its
    kernels keeps ~20 MB more heap than one that loads them, so an overhead measured with the
    cache filled is measured again once the cache is deleted
    (:func:`zipmoe_rt.engine.limit.footprint`). The folder is
    :func:`zipmoe_rt.kernels.kernel_cache_dir`."""
    from ..kernels import kernel_cache_dir
    folder = kernel_cache_dir()
    if folder is None:
        return "unknown"
    try:
        return "cached" if any(folder.glob("*.nbi")) else "empty"
    except OSError:
        return "unknown"


def steady_footprint(model_path) -> dict:
    """The runtime's memory for ``model_path`` without weights, in this (fresh) process: import
    the runtime, read the index and the tokenizer (the tokenizer's JSON text dropped, as
    :func:`zipmoe_rt.api.load` does), :func:`warm_up`, :func:`release`.

    Returns:
        bytes: ``peak`` (VmHWM: the warm-up's peak, JIT included), ``steady`` (VmRSS after
        :func:`release`: what stays while the model runs), ``anon`` (RssAnon of it),
        ``dropped`` (library pages :func:`release` dropped).
    """
    from zmoe.constants import Keys

    from ..loading import tokenizer_from_source
    from ..util import status_bytes
    from .store import ZmoeSource
    src = ZmoeSource(model_path, keep_experts=False, copy_dense=True)
    tok = tokenizer_from_source(src)
    src.metadata.pop(Keys.Tokenizer.JSON, None)
    warm_up(src)
    dropped = release()
    out = {"peak": status_bytes("VmHWM"), "steady": status_bytes("VmRSS"),
           "anon": status_bytes("RssAnon"), "dropped": dropped}
    src.close()
    del tok
    return out
