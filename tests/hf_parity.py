"""Helpers the model tests share: transformers' logits of a prompt, our model next to
transformers' on a tiny random checkpoint (:mod:`tiny_models`), and the logits of a model
built from a converted ``.zmoe`` container or a checkpoint folder."""
from __future__ import annotations

from pathlib import Path

import numpy as np

from zipmoe_rt.models import build_model
from zipmoe_rt.models.weights import CheckpointSource


def hf_logits(hf, ids) -> np.ndarray:
    """transformers' logits, float32 [T, vocab], of ``ids`` (int [T]) in one forward pass
    without a cache."""
    import torch

    with torch.no_grad():
        return hf(torch.tensor(np.asarray(ids), dtype=torch.long)[None]).logits[0].numpy()


def model_pair(tiny_moe_dir, sharded=()):
    """Factory ``get(name) -> (our model, transformers' model in float32)`` on the tiny
    checkpoint of spec ``name`` (``tiny_moe_dir`` the session fixture; specs in ``sharded``
    are built as sharded checkpoints), each pair built once."""
    from tiny_models import load_hf

    made: dict = {}

    def get(name: str):
        if name not in made:
            d = tiny_moe_dir(name, sharded=name in sharded) if sharded else tiny_moe_dir(name)
            made[name] = (build_model(CheckpointSource(d)), load_hf(d))
        return made[name]
    return get


def all_logits(source, ids) -> np.ndarray:
    """float32 [T, vocab] logits at every position of ``ids`` from a model built on ``source``
    (a weight source), with a fresh cache."""
    m = build_model(source)
    return m.forward(ids, m.new_cache(), last_only=False)


def zmoe_logits(path: Path, ids, check=None) -> np.ndarray:
    """:func:`all_logits` of the container at ``path`` (opened and closed here); ``check``,
    when given, is called with the open :class:`~zipmoe_rt.engine.store.ZmoeSource` first."""
    from zipmoe_rt.engine.store import ZmoeSource

    source = ZmoeSource(path)
    try:
        if check is not None:
            check(source)
        return all_logits(source, ids)
    finally:
        source.close()


def checkpoint_logits(folder: Path, ids) -> np.ndarray:
    """:func:`all_logits` of the HF checkpoint folder ``folder``."""
    return all_logits(CheckpointSource(folder), ids)
