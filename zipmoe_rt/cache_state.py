"""The token ids a model's cache holds (:class:`CacheState`), kept in step with the cache by
the token loop (:mod:`zipmoe_rt.generate`, which re-exports these names), and reused across
prompts that share a prefix (:meth:`CacheState.sync_prefix`): a chat turn or a server request
prefills only what the cache does not already hold.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Sequence

import numpy as np

__all__ = ["CacheState", "common_prefix_len", "cache_length", "cache_can_crop"]


def common_prefix_len(a: Sequence[int], b: Sequence[int]) -> int:
    """Length of the longest common prefix of two id sequences."""
    n = min(len(a), len(b))
    if n == 0:
        return 0
    x = np.asarray(a[:n], dtype=np.int64)
    y = np.asarray(b[:n], dtype=np.int64)
    diff = np.flatnonzero(x != y)
    return int(diff[0]) if diff.size else n


def cache_length(cache: Any) -> int | None:
    """The positions ``cache`` holds, from its ``get_seq_length()`` (transformers' name; also
    :class:`~zipmoe_rt.models.cache.ModelCache`'s); None where it has none or it fails."""
    f = getattr(cache, "get_seq_length", None)
    if callable(f):
        try:
            return int(f())
        except Exception:
            return None
    return None


def cache_can_crop(cache: Any, n: int) -> bool:
    """Whether ``cache.crop(n)`` may be called: the cache has a ``crop`` and, when it also has
    ``can_crop`` (:class:`~zipmoe_rt.models.cache.ModelCache`: every layer cache can drop
    positions; a recurrent state cannot), that agrees."""
    if not callable(getattr(cache, "crop", None)):
        return False
    can = getattr(cache, "can_crop", None)
    if not callable(can):
        return True
    try:
        return bool(can(n))
    except Exception:
        return False


@dataclass
class CacheState:
    """A model's KV cache plus the token ids it holds.

    Invariant: ``token_ids`` lists, in order, every id fed through ``model.forward`` into
    ``cache`` — exactly the positions the cache holds. :func:`~zipmoe_rt.generate.generate` keeps it true, also when
    generation stops early (the consumer stops iterating, ``KeyboardInterrupt``): ids are appended
    only after ``forward`` returns. If ``forward`` itself is interrupted, :func:`~zipmoe_rt.generate.generate`
    reconciles with ``cache.get_seq_length()`` (whole call committed or not) or rolls back with
    ``cache.crop(n)``; when the cache offers neither, ``valid`` becomes ``False`` and the state
    must not be reused. A cache with ``mark()`` (recurrent layer states, which can crop only to
    a marked position) is marked before a prompt is prefilled after tokens it holds, so that a
    prefill interrupted between its batches, some of them committed, is rolled back too.

    Attributes:
        cache: the object from ``model.new_cache()``.
        token_ids: ids held by the cache.
        valid: ``False`` once the cache contents are unknown (see above).
    """

    cache: Any
    token_ids: list[int] = field(default_factory=list)
    valid: bool = True

    @classmethod
    def new(cls, model: Any, max_tokens: int | None = None) -> "CacheState":
        """An empty state: ``CacheState(model.new_cache(), [])``.

        ``max_tokens``: the most positions this state will hold, if known; passed on as
        ``model.new_cache(max_tokens=...)`` (a smaller initial KV allocation; the cache still
        grows on demand).
        """
        return cls(model.new_cache(max_tokens=None if max_tokens is None else int(max_tokens)), [])

    def __len__(self) -> int:
        return len(self.token_ids)

    def crop_to(self, n: int) -> bool:
        """Go back to the first ``n`` tokens held (e.g. what the cache held before a turn or
        request that was stopped), where the cache can (``can_crop(n)``; a recurrent state
        only to its marked position).

        Returns:
            True when the state now holds at most ``n`` tokens; False when it could not crop
            (it is left as it was, valid: the next :meth:`sync_prefix` crops or rebuilds).
        """
        n = int(n)
        if len(self.token_ids) <= n:
            return True
        if not self.valid or not cache_can_crop(self.cache, n):
            return False
        self.cache.crop(n)
        del self.token_ids[n:]
        return True

    def sync_prefix(self, target_ids: Sequence[int], model: Any | None = None) -> list[int]:
        """Reuse the cache for a prompt that shares a prefix with what it holds.

        Keeps the longest common prefix of ``token_ids`` and ``target_ids`` (at most
        ``len(target_ids) - 1`` ids, so at least one id is left to prefill), drops the rest of
        the cache with ``cache.crop(n)``, and returns the ids still to feed. A cache with
        ``crop_points()`` (recurrent layer states: only some positions come back, e.g. the end
        of the last prompt, :meth:`~zipmoe_rt.models.cache.ModelCache.mark`) keeps the largest
        of them within the common prefix. If the cache must shrink but cannot (no ``crop``, or
        ``cache.can_crop(n)`` is False), or the state is not ``valid``, it is replaced by
        ``model.new_cache()`` and all of ``target_ids`` is returned.

        Typical chat use: ``new = state.sync_prefix(tok.encode_chat(messages), model)`` then
        ``generate(model, new, params, stop_ids, cache=state)``.

        Args:
            target_ids: the full token sequence the cache should end up holding (non-empty).
            model: used to make a fresh cache when needed.

        Returns:
            The suffix of ``target_ids`` to pass as ``prompt_ids``.

        Raises:
            ValueError: ``target_ids`` is empty, or the cache must be rebuilt and no ``model``
                was given.
        """
        target = [int(t) for t in target_ids]
        if not target:
            raise ValueError("target_ids: empty")
        keep = min(common_prefix_len(self.token_ids, target), len(target) - 1) if self.valid else 0
        points = getattr(self.cache, "crop_points", None)
        if keep < len(self.token_ids) and callable(points):
            pts = points()          # a recurrent layer state: only some positions come back
            if pts is not None:
                keep = max((p for p in pts if p <= keep), default=0)
        if keep < len(self.token_ids):
            if self.valid and cache_can_crop(self.cache, keep):
                self.cache.crop(keep)
                del self.token_ids[keep:]
            else:
                if model is None:
                    raise ValueError("model: needed to rebuild a cache that cannot be cropped")
                self.cache, self.token_ids, self.valid, keep = model.new_cache(), [], True, 0
        return target[keep:]
