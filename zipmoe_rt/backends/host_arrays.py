"""Array allocation of the backends whose arrays are host numpy arrays (the CPU backends)."""
from __future__ import annotations

import numpy as np


class HostArrays:
    """Array allocation for backends whose arrays are host numpy arrays (the CPU backends):
    mixed in before :class:`Backend`."""

    def empty(self, shape, dtype=np.float32):
        """``np.empty``."""
        return np.empty(shape, dtype)

    def zeros(self, shape, dtype=np.float32):
        """``np.zeros``."""
        return np.zeros(shape, dtype)

    def from_host(self, a):
        """``np.ascontiguousarray`` (no copy when already contiguous)."""
        return np.ascontiguousarray(a)

    def to_host(self, a):
        """``np.asarray`` (no copy)."""
        return np.asarray(a)
