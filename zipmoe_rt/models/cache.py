"""What a model keeps between forward calls: one cache per decoder layer behind a small contract
(:class:`LayerCache`), and :class:`ModelCache`, the list of them plus the tokens committed.

Per-layer caches let layers differ: their own K and V head sizes, kv-head count and attention
window today (:class:`KVCache`); a compressed latent per token (MLA) or a recurrent state (linear
attention) later, each implementing :class:`LayerCache`. transformers' ``cache_utils.py``
(``DynamicCache`` of ``DynamicLayer`` / ``DynamicSlidingWindowLayer``) is the model.

Commit protocol: a forward call of ``T`` tokens first reserves room
(:meth:`ModelCache.reserve`), each layer then writes its entries for positions ``length ..
length + T - 1`` (pending: not counted in ``length``), and :meth:`ModelCache.commit` advances
every layer once all layers ran. A forward interrupted in between leaves every layer's committed
contents as they were.
"""
from __future__ import annotations

from typing import Protocol, runtime_checkable

import numpy as np

from ..backends import get_backend

__all__ = ["LayerCache", "GrowingCache", "KVCache", "LatentCache", "RecurrentCache", "ModelCache",
           "KV_DTYPE"]

#: dtype of the keys and values a :class:`KVCache` holds (float32, as the attention ops
#: compute; ``np.dtype(KV_DTYPE).itemsize`` bytes per cached value).
KV_DTYPE = np.float32


@runtime_checkable
class LayerCache(Protocol):
    """The contract between one decoder layer's cache and :class:`ModelCache`.

    How entries are written is the layer's own business (:meth:`KVCache.update`, or a fused
    kernel writing into its buffers); what every layer cache offers is this.

    Attributes:
        length: positions committed (int).
    """

    length: int

    def reserve(self, n: int) -> None:
        """Make room for ``n`` pending positions past ``length``."""

    def commit(self, n: int) -> None:
        """Count the ``n`` pending positions written by the last forward call as held.

        Raises:
            ValueError: fewer than ``n`` positions were reserved.
        """

    def uncommit(self, n: int) -> None:
        """Undo the last :meth:`commit` ``(n)`` (:meth:`ModelCache.commit` interrupted after
        some layers had committed)."""

    def can_crop(self, n: int) -> bool:
        """Whether :meth:`crop` ``(n)`` is possible. A cache that keeps every position (a KV
        cache) can crop to any ``0 <= n <= length``; a recurrent state only to ``n == length``
        (nothing to drop)."""

    def crop(self, n: int) -> None:
        """Forget positions ``n`` and later.

        Raises:
            ValueError: ``can_crop(n)`` is False.
        """

    @property
    def nbytes(self) -> int:
        """Bytes allocated (not only those in use)."""


class GrowingCache:
    """The bookkeeping :class:`KVCache` and :class:`LatentCache` share: ``length`` positions
    committed out of ``capacity`` allocated, growth by doubling, commit and crop (transformers'
    ``DynamicLayer`` keeps every position the same way). Implements :class:`LayerCache` given a
    subclass's :meth:`_grow` (reallocate its buffers) and :meth:`_buffers`.

    Attributes:
        backend: where the buffers live.  length: positions committed (int).
        capacity: positions allocated (int, at least 1).
    """

    backend = None
    length = 0
    capacity = 1

    def _grow(self, cap: int) -> None:
        """Reallocate the buffers to ``cap`` positions, copying positions ``0 .. length - 1``."""
        raise NotImplementedError

    def _buffers(self) -> tuple:
        """The backend arrays this cache holds (for :attr:`nbytes`)."""
        raise NotImplementedError

    def reserve(self, n: int) -> None:
        """Make room for ``n`` positions past ``length`` (doubling the capacity as needed; the
        committed positions are copied, pending ones are not)."""
        need = self.length + int(n)
        if need <= self.capacity:
            return
        cap = self.capacity
        while cap < need:
            cap *= 2
        self._grow(cap)
        self.capacity = cap

    def commit(self, n: int) -> None:
        """``length += n`` (see :meth:`LayerCache.commit`). Raises ValueError past capacity."""
        if not 0 <= int(n) <= self.capacity - self.length:
            raise ValueError(f"commit({n}): only {self.capacity - self.length} positions reserved")
        self.length += int(n)

    def uncommit(self, n: int) -> None:
        """``length -= n``: the last :meth:`commit` ``(n)`` undone (the positions stay written,
        as pending ones)."""
        self.length -= int(n)

    def can_crop(self, n: int) -> bool:
        """True for any ``0 <= n <= length``."""
        return 0 <= int(n) <= self.length

    def crop(self, n: int) -> None:
        """Forget positions ``n`` and later. Raises ValueError when ``n`` is not in 0..length."""
        if not self.can_crop(n):
            raise ValueError(f"crop({n}): cache holds {self.length} tokens")
        self.length = int(n)

    @property
    def nbytes(self) -> int:
        """Bytes allocated (capacity, not length)."""
        return int(sum(b.nbytes for b in self._buffers()))


class KVCache(GrowingCache):
    """Keys and values of ONE attention layer, growing by doubling (transformers'
    ``DynamicLayer``). Implements :class:`LayerCache`.

    Storage keeps every position, also for a sliding-window layer (``window`` is recorded for the
    attention op and for a future trimming cache), so any prefix can be cropped back to.

    Args:
        num_kv_heads: kv heads.  k_head_dim: key size per head.
        v_head_dim: value size per head (default ``k_head_dim``).
        window: the layer's attention window in tokens, 0 = full attention.
        capacity: positions allocated up front (at least 1; grows by doubling on demand).
        backend: where the buffers live (:func:`~zipmoe_rt.backends.get_backend`; default
            numba = host numpy).
    Attributes:
        k: float32 [num_kv_heads, capacity, k_head_dim] (keys stored after RoPE).
        v: float32 [num_kv_heads, capacity, v_head_dim].
        length: positions committed; slots past it are scratch (a pending or interrupted
            forward's entries, overwritten by the next call).
        capacity: positions allocated.
    """

    def __init__(self, num_kv_heads: int, k_head_dim: int, v_head_dim: int | None = None,
                 window: int = 0, capacity: int = 256, backend=None):
        self.backend = get_backend(backend)
        self.num_kv_heads, self.k_head_dim = int(num_kv_heads), int(k_head_dim)
        self.v_head_dim = self.k_head_dim if v_head_dim is None else int(v_head_dim)
        self.window = int(window)
        self.capacity = max(1, int(capacity))
        self.k = self.backend.zeros((self.num_kv_heads, self.capacity, self.k_head_dim), KV_DTYPE)
        self.v = self.backend.zeros((self.num_kv_heads, self.capacity, self.v_head_dim), KV_DTYPE)
        self.length = 0

    def _grow(self, cap: int) -> None:
        for name, d in (("k", self.k_head_dim), ("v", self.v_head_dim)):
            a = getattr(self, name)
            b = self.backend.zeros((self.num_kv_heads, cap, d), KV_DTYPE)
            b[:, :self.length] = a[:, :self.length]
            setattr(self, name, b)

    def _buffers(self) -> tuple:
        return self.k, self.v

    def update(self, k, v):
        """Append entries (pending until :meth:`commit`): ``k`` float32 [num_kv_heads, T,
        k_head_dim] and ``v`` [num_kv_heads, T, v_head_dim] go to positions ``length ..
        length + T - 1`` (room is made as needed).

        Returns:
            (keys, values): views of positions ``0 .. length + T - 1``.
        Raises:
            ValueError: shapes do not match the cache.
        """
        T = k.shape[1]
        if (tuple(k.shape) != (self.num_kv_heads, T, self.k_head_dim)
                or tuple(v.shape) != (self.num_kv_heads, T, self.v_head_dim)):
            raise ValueError(f"update: k {tuple(k.shape)} / v {tuple(v.shape)} do not match a "
                             f"cache of {self.num_kv_heads} heads x ({self.k_head_dim}, "
                             f"{self.v_head_dim})")
        self.reserve(T)
        end = self.length + T
        self.k[:, self.length:end] = k
        self.v[:, self.length:end] = v
        return self.k[:, :end], self.v[:, :end]


class LatentCache(GrowingCache):
    """One vector per position of ONE layer, growing by doubling: the compressed key/value
    latent of Multi-head Latent Attention (DeepSeek-V2/V3, GLM-4-MoE-Lite; transformers caches
    the same two tensors, ``kv_a_layernorm(kv_nope)`` and the rotated ``k_pe``, in
    ``DeepseekV2Attention.forward``). Implements :class:`LayerCache`.

    Args:
        width: values per position (``kv_lora_rank + qk_rope_head_dim`` for MLA).
        capacity: positions allocated up front (at least 1; grows by doubling on demand).
        backend: where the buffer lives (:func:`~zipmoe_rt.backends.get_backend`).
    Attributes:
        kv: float32 [capacity, width]; row ``p`` is position ``p`` (rows past ``length`` are
            scratch: pending entries of the running forward call).
        length: positions committed.  capacity: positions allocated.  width: as given.
    """

    def __init__(self, width: int, capacity: int = 256, backend=None):
        self.backend = get_backend(backend)
        self.width = int(width)
        self.capacity = max(1, int(capacity))
        self.kv = self.backend.zeros((self.capacity, self.width))
        self.length = 0

    def _grow(self, cap: int) -> None:
        b = self.backend.zeros((cap, self.width))
        b[:self.length] = self.kv[:self.length]
        self.kv = b

    def _buffers(self) -> tuple:
        return (self.kv,)


class RecurrentCache:
    """The state of ONE linear-attention layer (Gated DeltaNet: Qwen3-Next, Qwen3.5-MoE): the
    last ``K - 1`` inputs of its causal conv1d and its recurrent state, of a size that does not
    grow with the sequence (transformers keeps the same two tensors per linear layer in
    ``DynamicCache``: ``conv_states`` and ``recurrent_states``). Implements :class:`LayerCache`.

    Each buffer is held three times: the forward call reads the committed copy and writes the
    pending one (:meth:`pending`), and :meth:`commit` swaps them, so an interrupted forward leaves
    the committed state as it was; :meth:`mark` copies the committed state aside (the end of a
    prompt). A recurrent state cannot be rolled back to an arbitrary position: :meth:`crop`
    accepts ``n == length`` (nothing to drop), ``n == 0`` (the zero state) and the marked
    position (the copy comes back); a caller that needs another position recomputes.

    Args:
        conv_shape: (K - 1, C) of the conv state.  state_shape: (nv, dk, dv) of the recurrent
            state.  backend: where the buffers live (:func:`~zipmoe_rt.backends.get_backend`).
    Attributes:
        conv, state: the committed float32 buffers (zeros at length 0).
        length: tokens folded into the state.
    """

    #: copies of each buffer held (committed, pending, marked): :attr:`nbytes` is this many
    #: times the state's size.
    COPIES = 3

    def __init__(self, conv_shape, state_shape, backend=None):
        self.backend = be = get_backend(backend)
        self.conv = be.zeros(tuple(conv_shape))
        self.state = be.zeros(tuple(state_shape))
        self._next = (be.zeros(tuple(conv_shape)), be.zeros(tuple(state_shape)))
        self._marked = (be.zeros(tuple(conv_shape)), be.zeros(tuple(state_shape)))
        self.mark_length: int | None = None
        self._written = False
        self.length = 0

    def mark(self) -> None:
        """Copy the committed state aside as the state at position :attr:`length`
        (:attr:`mark_length`), which :meth:`crop` can then return to."""
        self._marked[0][...] = self.conv
        self._marked[1][...] = self.state
        self.mark_length = self.length

    def pending(self):
        """(conv, state) buffers the running forward call writes; they become the committed
        ones at :meth:`commit`."""
        self._written = True
        return self._next

    def reserve(self, n: int) -> None:
        """Nothing to allocate: the state has a fixed size."""

    def commit(self, n: int) -> None:
        """``length += n``; the pending buffers become the committed ones when ``n > 0``.

        Raises:
            ValueError: ``n > 0`` but the forward call wrote no state (:meth:`pending`).
        """
        n = int(n)
        if n < 0:
            raise ValueError(f"commit({n}): negative")
        if n:
            if not self._written:
                raise ValueError(f"commit({n}): no state was written for these tokens")
            (self.conv, self.state), self._next = self._next, (self.conv, self.state)
        self._written = False
        self.length += n

    def uncommit(self, n: int) -> None:
        """Undo the last :meth:`commit` ``(n)``: the state before it is the committed one again
        (the pending buffers, which the commit swapped out, still hold it)."""
        n = int(n)
        if n:
            (self.conv, self.state), self._next = self._next, (self.conv, self.state)
        self.length -= n

    def crop_points(self) -> list[int]:
        """The positions :meth:`crop` accepts: 0, the marked one (if not past ``length``) and
        ``length``."""
        pts = {0, self.length}
        if self.mark_length is not None and self.mark_length <= self.length:
            pts.add(self.mark_length)
        return sorted(pts)

    def can_crop(self, n: int) -> bool:
        """Only ``n`` in :meth:`crop_points`."""
        return int(n) in self.crop_points()

    def crop(self, n: int) -> None:
        """``n == length``: nothing; ``n == 0``: the zero state (the mark is dropped); the marked
        position: the marked copy becomes the state.

        Raises:
            ValueError: any other ``n`` (a recurrent state cannot go back to position ``n``).
        """
        n = int(n)
        if not self.can_crop(n):
            raise ValueError(f"crop({n}): a recurrent state holding {self.length} tokens can "
                             f"only be kept whole, reset to 0 or returned to its mark "
                             f"({self.mark_length})")
        if n == 0:
            if self.length:
                self.conv[...] = 0
                self.state[...] = 0
            self.length, self.mark_length = 0, None
        elif n != self.length:          # the mark
            self.conv[...] = self._marked[0]
            self.state[...] = self._marked[1]
            self.length = n
        self._written = False

    @property
    def nbytes(self) -> int:
        """Bytes allocated: the three copies of both buffers."""
        return int(self.conv.nbytes + self.state.nbytes
                   + sum(b.nbytes for b in self._next + self._marked))


class ModelCache:
    """The caches of every decoder layer of one sequence, plus the tokens committed (the spelling
    of transformers' ``Cache``: ``get_seq_length``, ``crop``).

    Args:
        layers: one :class:`LayerCache` per decoder layer, all empty.
    Attributes:
        layers: list of the layer caches (``cache[i]`` is layer ``i``'s).
        offset: tokens held (read-only; :meth:`commit` advances it after all layers ran, so an
            interrupted forward leaves the cache as it was).
        token_ids: the ids of the tokens held, when every :meth:`commit` gave them (a model
            whose RoPE has several regimes recomputes the sequence from them).
        regime: the RoPE regime the held keys were rotated in
            (:meth:`~zipmoe_rt.models.rope.RoPE.regime`; 0 for one-regime RoPE).
    Raises:
        ValueError: a layer cache that is not empty.
    """

    def __init__(self, layers):
        self.layers = list(layers)
        if any(lc.length for lc in self.layers):
            raise ValueError("ModelCache: layer caches must start empty")
        self._offset = 0
        self._ids: list[int] | None = []
        self.regime = 0

    @property
    def offset(self) -> int:
        """Tokens held, the same in every layer (see :meth:`commit`)."""
        return self._offset

    def __getitem__(self, i: int):
        return self.layers[i]

    def __len__(self) -> int:
        """Number of layers (not tokens: see :meth:`get_seq_length`)."""
        return len(self.layers)

    def get_seq_length(self) -> int:
        """Tokens held (``offset``)."""
        return self._offset

    def reserve(self, n: int) -> None:
        """Room for ``n`` more tokens in every layer."""
        for lc in self.layers:
            lc.reserve(n)

    def commit(self, n: int, ids=None, regime: int | None = None) -> None:
        """Count the ``n`` tokens the forward call wrote into every layer as held; ``ids``: their
        token ids (int [n]), kept in :attr:`token_ids` (without them, it becomes None);
        ``regime``: the RoPE regime they were rotated in (:attr:`regime`; None: unchanged).

        All or nothing: interrupted between two layers (Ctrl-C), the layers that had committed
        are undone (:meth:`LayerCache.uncommit`), so every layer still holds :attr:`offset`
        tokens; the offset, ids and regime change only once every layer has committed."""
        n = int(n)
        if ids is None or self._ids is None or len(ids) != n:
            new_ids = None
        else:
            new_ids = self._ids + [int(t) for t in ids]
        try:
            for lc in self.layers:
                lc.commit(n)
        except BaseException:
            for lc in self.layers:
                if lc.length != self._offset:
                    lc.uncommit(n)
            raise
        self._ids, self._offset = new_ids, self._offset + n
        if regime is not None:
            self.regime = regime

    @property
    def token_ids(self) -> list[int] | None:
        """Ids of the tokens held (a copy), or None when a commit came without them."""
        return None if self._ids is None else list(self._ids)

    def adopt(self, other: "ModelCache") -> None:
        """Take ``other``'s layers, tokens, ids and regime (a sequence recomputed into a fresh
        cache replaces this one's contents only once it is complete)."""
        self.layers, self._offset = other.layers, other._offset
        self._ids, self.regime = other._ids, other.regime

    def mark(self) -> None:
        """Have every layer that cannot crop freely (a recurrent state) keep a copy of its
        state at the current position, so that :meth:`crop` can return there (the end of a
        prompt, for the next chat turn)."""
        for lc in self.layers:
            f = getattr(lc, "mark", None)
            if callable(f):
                f()

    def crop_points(self) -> list[int] | None:
        """The positions every layer can crop to, ascending, or None when every position
        ``0..offset`` is one (no layer restricts it)."""
        common = None
        for lc in self.layers:
            f = getattr(lc, "crop_points", None)
            if callable(f):
                pts = set(f())
                common = pts if common is None else common & pts
        return None if common is None else sorted(p for p in common if p <= self._offset)

    def can_crop(self, n: int) -> bool:
        """Whether :meth:`crop` ``(n)`` would succeed: ``0 <= n <= offset`` and every layer can."""
        return 0 <= int(n) <= self._offset and all(lc.can_crop(n) for lc in self.layers)

    def crop(self, n: int) -> None:
        """Forget tokens from position ``n`` on (e.g. to reuse a shared prompt prefix), in every
        layer or, when one cannot, in none.

        Raises:
            ValueError: ``n`` not in 0..offset, or a layer cannot crop to ``n`` (the message
                lists them; the cache is unchanged, rebuild it instead).
        """
        if not 0 <= int(n) <= self._offset:
            raise ValueError(f"crop({n}): cache holds {self._offset} tokens")
        stuck = [i for i, lc in enumerate(self.layers) if not lc.can_crop(n)]
        if stuck:
            raise ValueError(f"crop({n}): layer cache(s) {stuck} cannot crop")
        for lc in self.layers:
            lc.crop(n)
        self._offset = int(n)
        if int(n) == 0:
            self._ids = []
        elif self._ids is not None:
            del self._ids[int(n):]

    @property
    def nbytes(self) -> int:
        """Bytes allocated by all layers."""
        return sum(int(lc.nbytes) for lc in self.layers)

    @property
    def capacity(self) -> int | None:
        """Smallest ``capacity`` of the layers that have one (positions held without growing);
        None when no layer has a capacity."""
        caps = [lc.capacity for lc in self.layers if getattr(lc, "capacity", None) is not None]
        return min(caps) if caps else None
