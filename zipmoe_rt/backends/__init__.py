"""Compute backends: one object that allocates arrays and runs every compute op of the model and
the expert executors (:class:`~zipmoe_rt.backends.base.Backend` documents the op set).

* ``"numba"`` (default): :class:`~zipmoe_rt.backends.numba_cpu.NumbaBackend`, the Numba CPU
  kernels of :mod:`zipmoe_rt.kernels`.
* ``"numpy"``: :class:`~zipmoe_rt.backends.numpy_ref.NumpyBackend`, a slow, readable float32
  reference in plain NumPy.

A new backend (e.g. CuPy) subclasses :class:`Backend` and adds one entry to :data:`BACKENDS`;
model code only ever calls backend methods.
"""
from __future__ import annotations

import importlib

from .base import Backend, to_f32

__all__ = ["Backend", "BACKENDS", "get_backend", "to_f32"]

#: backend name -> "module:class" under this package (imported on first use).
BACKENDS = {
    "numba": "numba_cpu:NumbaBackend",
    "numpy": "numpy_ref:NumpyBackend",
}

_made: dict = {}


def get_backend(backend=None) -> Backend:
    """The backend named ``backend`` (one shared instance per name).

    Args:
        backend: None (the default, ``"numba"``), a name of :data:`BACKENDS`, or a
            :class:`Backend` instance (returned as is).
    Returns:
        a :class:`Backend`.
    Raises:
        ValueError: an unknown name (the message lists the known ones).
        TypeError: neither a name nor a Backend.
    """
    if isinstance(backend, Backend):
        return backend
    name = "numba" if backend is None else backend
    if not isinstance(name, str):
        raise TypeError(f"backend: expected a name or a Backend, got {type(backend).__name__}")
    if name not in _made:
        spec = BACKENDS.get(name)
        if spec is None:
            raise ValueError(f"unknown backend {name!r}; known: {', '.join(sorted(BACKENDS))}")
        mod, cls = spec.split(":")
        _made[name] = getattr(importlib.import_module(f".{mod}", __name__), cls)()
    return _made[name]
