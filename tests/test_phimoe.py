"""PhiMoE (``PhimoeForCausalLM``, transformers ``models/phimoe/``): the shared ops it added
(LayerNorm with weight and bias, the sparsemixer router, PhiMoE's LongRoPE) against
transformers / torch on both backends, its config rules, and the bug-report case of prompts
shorter and longer than ``original_max_position_embeddings``."""
from __future__ import annotations

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("transformers")

from zipmoe_rt.backends import get_backend  # noqa: E402

BACKENDS = ["numba", "numpy"]


# ------------------------------------------------------------------ LayerNorm


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("T,n,eps", [(1, 64, 1e-5), (7, 300, 1e-6), (3, 4096, 1e-5)])
def test_layer_norm_matches_torch(backend, T, n, eps):
    g = np.random.default_rng(T * n)
    x = (g.standard_normal((T, n)) * 3 + 1.5).astype(np.float32)
    w = (1 + 0.3 * g.standard_normal(n)).astype(np.float32)
    b = (0.2 * g.standard_normal(n)).astype(np.float32)
    ln = torch.nn.LayerNorm(n, eps=eps)
    with torch.no_grad():
        ln.weight.copy_(torch.from_numpy(w))
        ln.bias.copy_(torch.from_numpy(b))
        want = ln(torch.from_numpy(x)).numpy()
    be = get_backend(backend)
    got = be.layer_norm(x, w, b, eps)
    assert got.dtype == np.float32 and got.shape == (T, n)
    assert np.abs(got - want).max() <= 2e-5 * max(1.0, np.abs(want).max())
    out = np.full_like(x, np.nan)
    assert be.layer_norm(x, w, b, eps, out=out) is out
    assert np.array_equal(out, got)
    # the bias and the mean matter: a wrong one would be far off
    assert np.abs(be.layer_norm(x, w, np.zeros_like(b), eps) - want).max() > 0.1


# ------------------------------------------------------------------ sparsemixer router


def _hf_sparsemixer(logits: np.ndarray, eps: float):
    from transformers.models.phimoe.modeling_phimoe import sparsemixer

    w, idx = sparsemixer(torch.from_numpy(logits), jitter_eps=eps, training=False)
    return idx.numpy(), w.numpy()


def _router_logits(T, E, seed, spread):
    """Logits around a common level so that several experts fall within the masks."""
    g = np.random.default_rng(seed)
    level = g.standard_normal((T, 1)) * 2
    return (level + spread * g.standard_normal((T, E))).astype(np.float32)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("E,eps,spread", [(2, 0.01, 0.03), (8, 0.01, 0.05), (16, 0.01, 0.02),
                                          (8, 0.2, 0.5), (6, 0.5, 1.0)])
def test_sparsemixer_matches_transformers(backend, E, eps, spread):
    logits = _router_logits(257, E, E, spread)
    logits[0] = 0.0                       # all equal: 0/0 in the mask (not masked), ties
    logits[1, :] = -1.0
    logits[1, E - 1] = 0.0                # max 0, the rest negative: factor |s|
    want_idx, want_w = _hf_sparsemixer(logits, eps)
    idx, w = get_backend(backend).route_sparsemixer(logits, eps)
    assert idx.dtype == np.int64 and w.dtype == np.float32 and idx.shape == (257, 2)
    assert np.array_equal(idx, want_idx)
    assert np.abs(w - want_w).max() <= 1e-6
    # the masks really act: some weights are 1 (one expert within the threshold), many not
    assert (w < 0.9).mean() > 0.2 and (w == 1).any()


def test_sparsemixer_backends_agree_and_refuse_one_expert():
    logits = _router_logits(100, 8, 3, 0.03)
    a = get_backend("numba").route_sparsemixer(logits, 0.01)
    b = get_backend("numpy").route_sparsemixer(logits, 0.01)
    assert np.array_equal(a[0], b[0]) and np.abs(a[1] - b[1]).max() <= 1e-7
    for backend in BACKENDS:
        with pytest.raises(ValueError, match="at least 2 experts"):
            get_backend(backend).route_sparsemixer(np.zeros((3, 1), np.float32), 0.01)
