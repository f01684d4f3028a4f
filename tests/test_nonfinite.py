"""Non-finite values in a model's weights (a file from a stranger may hold NaN or ±Inf anywhere:
the container stores them bit-exactly) never crash a forward pass, raise from a kernel, or
route a token to an expert index outside ``[0, E)``: the output is then NaN, as transformers'
would be, and nothing reads or writes out of bounds.

Found by ``tools/fuzz_convert.py`` (an embedding row of NaN made the Numba RMSNorm raise
``ZeroDivisionError`` under fastmath, and the softmax router returned expert -1).
"""
from __future__ import annotations

import warnings

import numpy as np
import pytest

from zipmoe_rt.backends import get_backend

BACKENDS = ("numba", "numpy")
BAD = (np.nan, np.inf, -np.inf)


def _logits(v):
    """[3, 8] router logits: a row all ``v``, a row with one ``v``, a finite row."""
    x = np.random.RandomState(0).randn(3, 8).astype(np.float32)
    x[0, :] = v
    x[1, 3] = v
    return x


def _in_range(idx, E):
    return bool(((idx >= 0) & (idx < E)).all())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", BAD)
@pytest.mark.parametrize("kw", [
    {},
    dict(method="group_limited_greedy", n_group=4, topk_group=2),
    dict(scoring="sigmoid", method="noaux_tc", n_group=2, topk_group=1,
         bias=np.zeros(8, np.float32), scale=2.5),
], ids=["softmax", "group_limited", "noaux_tc"])
def test_router_indices_stay_in_range(backend, v, kw):
    be = get_backend(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        idx, w = be.route(_logits(v), 2, True, **kw)
    assert idx.shape == (3, 2) and _in_range(idx, 8)
    assert len(set(idx[2])) == 2                       # a finite row still gets two experts
    assert np.isfinite(w[2]).all()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", BAD)
def test_sparsemixer_indices_stay_in_range(backend, v):
    be = get_backend(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        idx, _ = be.route_sparsemixer(_logits(v), 0.01)
    assert _in_range(idx, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", BAD)
def test_choice_bias_router_indices_stay_in_range(backend, v):
    be = get_backend(backend)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        idx, _ = be.route_choice_bias(_logits(v), 2, np.linspace(-1, 1, 8).astype(np.float32),
                                      1e-12)
    assert _in_range(idx, 8)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("v", BAD)
def test_norms_do_not_raise(backend, v):
    be = get_backend(backend)
    x = np.ones((2, 16), np.float32)
    x[0, 3] = v
    w = np.linspace(0.5, 1.5, 16).astype(np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        y = be.to_host(be.rmsnorm(be.from_host(x), be.from_host(w), np.float32(1e-6)))
        z = be.to_host(be.layer_norm(be.from_host(x), be.from_host(w), be.from_host(w),
                                     np.float32(1e-5)))
    assert np.isfinite(y[1]).all() and np.isfinite(z[1]).all()   # the clean row is untouched


class _Poisoned:
    """A weight source whose embedding rows 0 and 1 are NaN and +Inf."""

    def __init__(self, src, embed_name):
        self.src, self.hparams, self.embed_name = src, src.hparams, embed_name

    def tensor(self, name):
        t = self.src.tensor(name)
        if name == self.embed_name:
            t = t.copy()
            if t.dtype == np.uint16:                   # BF16 bits
                t[0], t[1] = 0x7FC1, 0x7F80
            else:
                t[0], t[1] = np.nan, np.inf
        return t

    def has(self, name):
        return self.src.has(name)

    def expert(self, layer, expert):
        return self.src.expert(layer, expert)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spec", ["mixtral", "qwen2_moe", "olmoe_clip", "phimoe",
                                  "glm4_moe", "deepseek_v2_lite", "granitemoe_shared", "ernie4_5_moe"])
def test_forward_with_nonfinite_embedding_rows(tiny_moe_dir, spec, backend):
    from tiny_models import SPECS

    from zipmoe_rt.families import get_family
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    if spec not in SPECS:
        pytest.skip(f"no tiny spec {spec!r}")
    src = CheckpointSource(tiny_moe_dir(spec))
    fam = get_family(src.hparams["family"])
    model = build_model(_Poisoned(src, fam.tensor_name("embed")), backend=backend)
    E = int(src.hparams["num_experts"])
    seen = []

    def hook(layer, x, logits, idx, w):
        seen.append(_in_range(np.asarray(idx), E))

    model.route_hook = hook
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        logits = model.forward(np.array([2, 0, 1, 3]), model.new_cache(8), last_only=False)
        step = model.forward(np.array([4]), model.new_cache(8))
    assert logits.shape == (4, int(src.hparams["vocab_size"])) and step.shape[0] == logits.shape[1]
    assert seen and all(seen)
