"""Where a model's weights come from: the interface between model code and storage.

Model code asks a :class:`WeightSource` for dense tensors by their Hugging Face name and for one
expert's SwiGLU projections by (layer, expert). Arrays are BF16 as ``uint16`` bit patterns,
FP16 as ``float16`` and FP32 as ``float32``, always C-contiguous, shaped ``[out, in]`` like
``torch.nn.Linear.weight``.

Implementations: :class:`CheckpointSource` (an HF folder, for tests and quick runs) and the
``.zmoe`` expert store in :mod:`zipmoe_rt.engine.store`.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

import numpy as np

from ..convert.registry import get_architecture
from ..convert.safetensors_io import Checkpoint


@dataclass
class ExpertWeights:
    """One SwiGLU expert: ``down @ (silu(gate @ x) * (up @ x))``.

    Attributes:
        gate: [I, H] weight.  up: [I, H] weight.  down: [H, I] weight.
    """

    gate: np.ndarray
    up: np.ndarray
    down: np.ndarray

    @property
    def nbytes(self) -> int:
        return self.gate.nbytes + self.up.nbytes + self.down.nbytes


def assemble_expert(roles: dict) -> ExpertWeights:
    """Build :class:`ExpertWeights` from ``{role: array}`` with roles gate/up/down or gate_up
    (gate rows first, then up rows; transformers' fused layout).

    Raises:
        KeyError: a role is missing (message names it).
    """
    if "gate_up" in roles:
        gu = roles["gate_up"]
        half = gu.shape[0] // 2
        gate, up = gu[:half], gu[half:]
    else:
        gate, up = roles["gate"], roles["up"]
    return ExpertWeights(np.ascontiguousarray(gate), np.ascontiguousarray(up),
                         np.ascontiguousarray(roles["down"]))


class WeightSource(Protocol):
    """What model code needs from storage."""

    hparams: dict

    def tensor(self, name: str) -> np.ndarray:
        """A dense tensor by its HF name. Raises KeyError naming it when absent."""

    def has(self, name: str) -> bool:
        """Whether a dense tensor exists (e.g. ``lm_head.weight`` is absent when tied)."""

    def expert(self, layer: int, expert: int) -> ExpertWeights:
        """One expert's weights. Raises KeyError when absent."""


class CheckpointSource:
    """A :class:`WeightSource` over an HF checkpoint folder (safetensors, single or sharded).

    Args:
        folder: contains config.json and safetensors.
    Raises:
        UnsupportedArchitectureError / ConfigError: from the registry.
    """

    def __init__(self, folder):
        self.folder = Path(folder)
        self.config = json.loads((self.folder / "config.json").read_text())
        self.arch = get_architecture(self.config)
        self.hparams = self.arch.hparams()
        self.ckpt = Checkpoint(self.folder)
        self._experts: dict = {}
        for t in self.ckpt:
            ref = self.arch.expert_tensor(t.name)
            if ref is not None:
                self._experts.setdefault(ref.layer, []).append((t.name, ref))

    def tensor(self, name):
        if name not in self.ckpt.tensors or self.arch.expert_tensor(name) is not None:
            raise KeyError(f"{self.folder}: no dense tensor {name!r}")
        return self._array(name)

    def _array(self, name, expert=None):
        """A stored array (``[expert]`` of a stacked one); an F8_E4M3 weight dequantised with
        its ``weight_scale_inv`` into float32 (FP8 releases; zipmoe_rt/engine/lowprec.py)."""
        a = self.ckpt.array(name)
        if self.ckpt.tensors[name].dtype != "F8_E4M3":
            return a if expert is None else a[expert]
        from zmoe.fp8 import dequantize_blocks
        s = self.ckpt.array(name + "_scale_inv")
        if expert is not None:
            a, s = a[expert], s[expert]
        return dequantize_blocks(a, s, self.hparams["fp8_block_size"])

    def has(self, name):
        return name in self.ckpt.tensors

    def expert(self, layer, expert):
        roles = {}
        for name, ref in self._experts.get(layer, ()):
            if ref.expert is None:
                roles[ref.role] = self._array(name, expert)
            elif ref.expert == expert:
                roles[ref.role] = self._array(name)
        if not roles:
            raise KeyError(f"{self.folder}: no expert {expert} in layer {layer}")
        return assemble_expert(roles)
