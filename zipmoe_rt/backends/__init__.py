"""Compute backends: one object that allocates arrays and runs every compute op of the model and
the expert executors (:class:`~zipmoe_rt.backends.base.Backend` documents the op set).

* ``"numba"`` (default): :class:`~zipmoe_rt.backends.numba_cpu.NumbaBackend`, the Numba CPU
  kernels of :mod:`zipmoe_rt.kernels`.
* ``"numpy"``: :class:`~zipmoe_rt.backends.numpy_ref.NumpyBackend`, a slow, readable float32
  reference in plain NumPy.
* ``"cuda"``: :class:`~zipmoe_rt.backends.cupy_cuda.CupyBackend`, CuPy arrays on an NVIDIA GPU
  and the RawKernels of :mod:`zipmoe_rt.kernels.cuda_src` (needs the ``cuda`` or ``cuda13``
  extra; CuPy is imported only when this backend is asked for).

:func:`resolve_device` maps the ``--device`` option (``auto``, ``cpu``, ``cuda``) to a backend
name.

A new backend (e.g. CuPy) subclasses :class:`Backend` and adds one entry to :data:`BACKENDS`;
model code only ever calls backend methods.
"""
from __future__ import annotations

import importlib
import warnings

from .base import Backend, to_f32

__all__ = ["Backend", "BACKENDS", "DEVICES", "DeviceError", "DeviceWarning", "cuda_unavailable",
           "get_backend", "resolve_device", "to_f32"]

#: backend name -> "module:class" under this package (imported on first use).
BACKENDS = {
    "numba": "numba_cpu:NumbaBackend",
    "numpy": "numpy_ref:NumpyBackend",
    "cuda": "cupy_cuda:CupyBackend",
}

#: values of the ``device`` argument / ``--device`` option
DEVICES = ("auto", "cpu", "cuda")

#: how to install CuPy (the optional extras of pyproject.toml)
CUDA_EXTRA = ("pip install 'zipmoe-rt[cuda]' (CUDA 12.x driver and toolkit) or "
              "'zipmoe-rt[cuda13]' (CUDA 13.x)")


class DeviceError(RuntimeError):
    """``--device cuda`` (or the ``cuda`` backend) was asked for where it cannot run: CuPy is
    not installed or sees no GPU. The message names the option and the extra to install."""


class DeviceWarning(UserWarning):
    """``--device auto`` found no usable GPU and runs on the CPU (one notice)."""


def cuda_unavailable() -> str | None:
    """Why the CUDA backend cannot run here, or None when it can: CuPy imports and sees at
    least one CUDA device. Imports CuPy (only call it when a GPU was asked for)."""
    try:
        import cupy
    except ImportError as e:
        return f"CuPy is not installed ({e})"
    try:
        n = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # noqa: BLE001 - CUDARuntimeError and driver/library load errors
        return f"CuPy sees no CUDA GPU ({type(e).__name__}: {e})"
    if n < 1:
        return "CuPy sees no CUDA GPU"
    return None


def resolve_device(device: str = "cpu", option: str = "--device") -> str:
    """The backend name for a ``device`` choice.

    Args:
        device: ``"cpu"`` (the Numba backend), ``"cuda"`` (the CUDA backend; an error when it
            cannot run) or ``"auto"`` (CUDA when CuPy imports and sees a GPU, else the CPU with
            one :class:`DeviceWarning`).
        option: the option's name for messages.
    Returns:
        ``"numba"`` or ``"cuda"``.
    Raises:
        ValueError: another value.  DeviceError: ``cuda`` without CuPy or a GPU (names the
        option and the extra to install).
    Warns:
        DeviceWarning: ``auto`` without a usable GPU.
    """
    if device not in DEVICES:
        raise ValueError(f"{option} must be one of {', '.join(DEVICES)}, got {device!r}")
    if device == "cpu":
        return "numba"
    why = cuda_unavailable()
    if why is None:
        return "cuda"
    if device == "cuda":
        raise DeviceError(f"{option} cuda: {why}; install CuPy with {CUDA_EXTRA}, or use "
                          f"{option} cpu")
    warnings.warn(DeviceWarning(f"{option} auto: {why}; running on the CPU"), stacklevel=2)
    return "numba"

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
        DeviceError: ``"cuda"`` where CuPy is missing or sees no GPU.
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
        if name == "cuda":
            why = cuda_unavailable()
            if why is not None:
                raise DeviceError(f"backend 'cuda' (--device cuda): {why}; install CuPy with "
                                  f"{CUDA_EXTRA}")
        mod, cls = spec.split(":")
        _made[name] = getattr(importlib.import_module(f".{mod}", __name__), cls)()
    return _made[name]
