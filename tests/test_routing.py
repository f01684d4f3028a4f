"""The shared router (zipmoe_rt/models/routing.py, the backends' ``route`` op) against
transformers' own router modules on random, tie-free inputs: ``DeepseekV2TopkRouter`` (greedy
and group_limited_greedy), ``DeepseekV3TopkRouter`` and ``Glm4MoeTopkRouter`` (noaux_tc with
the correction bias), on both backends; argument checks; the softmax top-k path of the earlier
families unchanged."""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.backends import get_backend
from zipmoe_rt.models.routing import Router, RoutingRule

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

BACKENDS = ("numba", "numpy")
H, T = 32, 96


def _hf_router(kind, E, k, **cfg):
    """transformers' router module of ``kind`` with a random float32 weight (std 0.3, so the
    scores spread) and, for V3 / GLM, a random correction bias (std 0.1)."""
    from transformers.models.deepseek_v2.modeling_deepseek_v2 import DeepseekV2TopkRouter
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3TopkRouter
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeTopkRouter

    gen = torch.Generator().manual_seed(E * 100 + k)
    if kind == "v2":
        c = transformers.DeepseekV2Config(hidden_size=H, n_routed_experts=E,
                                          num_experts_per_tok=k, **cfg)
        r = DeepseekV2TopkRouter(c)
    elif kind == "v3":
        c = transformers.DeepseekV3Config(hidden_size=H, n_routed_experts=E,
                                          num_experts_per_tok=k, **cfg)
        r = DeepseekV3TopkRouter(c)
    else:
        c = transformers.Glm4MoeConfig(hidden_size=H, n_routed_experts=E, num_experts_per_tok=k,
                                       **cfg)
        r = Glm4MoeTopkRouter(c)
    with torch.no_grad():
        r.weight.copy_(0.3 * torch.randn(r.weight.shape, generator=gen))
        if hasattr(r, "e_score_correction_bias"):
            r.e_score_correction_bias.copy_(0.1 * torch.randn(E, generator=gen))
    return r.eval(), c


def _rule_of(kind, c):
    """The :class:`RoutingRule` a family builds from config ``c`` (V2 never renormalises)."""
    if kind == "v2":
        return RoutingRule(c.num_experts_per_tok, False, "softmax", c.topk_method,
                           c.n_group or 1, c.topk_group or 1, c.routed_scaling_factor)
    return RoutingRule(c.num_experts_per_tok, bool(c.norm_topk_prob), "sigmoid", "noaux_tc",
                       c.n_group, c.topk_group, c.routed_scaling_factor)


def _by_expert(idx, w):
    """(idx, w) with each row sorted by expert index (transformers' topk order is unsorted)."""
    o = np.argsort(idx, axis=1, kind="stable")
    return np.take_along_axis(idx, o, 1), np.take_along_axis(w, o, 1)


def _compare(kind, c, r, backend, x=None):
    """Route ``x`` with transformers' module and ours; returns our (idx, w)."""
    rng = np.random.default_rng(7)
    x = rng.standard_normal((T, H)).astype(np.float32) if x is None else x
    with torch.no_grad():
        logits_t, w_t, i_t = r(torch.from_numpy(x))
    bias = None
    if hasattr(r, "e_score_correction_bias"):
        bias = r.e_score_correction_bias.detach().numpy().copy()
    ours = Router(r.weight.detach().numpy().copy(), _rule_of(kind, c), bias, backend)
    logits, idx, w = ours(x)
    np.testing.assert_allclose(logits, logits_t.numpy(), rtol=1e-5, atol=1e-5)
    a_i, a_w = _by_expert(idx, w)
    b_i, b_w = _by_expert(i_t.numpy().astype(np.int64), w_t.numpy())
    assert np.array_equal(a_i, b_i)
    np.testing.assert_allclose(a_w, b_w, rtol=2e-6, atol=1e-7)
    return idx, w


CASES = {
    "v2_greedy": ("v2", 16, 4, dict(topk_method="greedy", routed_scaling_factor=1.0)),
    "v2_greedy_scaled": ("v2", 16, 6, dict(topk_method="greedy", routed_scaling_factor=16.0)),
    "v2_group_limited": ("v2", 16, 4, dict(topk_method="group_limited_greedy", n_group=4,
                                           topk_group=2, routed_scaling_factor=16.0)),
    "v3_noaux_tc": ("v3", 32, 6, dict(n_group=8, topk_group=3, routed_scaling_factor=2.5,
                                      norm_topk_prob=True)),
    "v3_noaux_tc_no_renorm": ("v3", 32, 6, dict(n_group=4, topk_group=2,
                                                routed_scaling_factor=2.5, norm_topk_prob=False)),
    "glm4_moe": ("glm", 16, 4, dict(n_group=1, topk_group=1, routed_scaling_factor=1.0,
                                    norm_topk_prob=True)),
    "glm4_moe_scaled_no_renorm": ("glm", 16, 4, dict(routed_scaling_factor=2.5,
                                                     norm_topk_prob=False)),
    "glm4_moe_groups": ("glm", 24, 5, dict(n_group=4, topk_group=2, routed_scaling_factor=1.5,
                                           norm_topk_prob=True)),
}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", sorted(CASES))
def test_router_matches_transformers(case, backend):
    kind, E, k, cfg = CASES[case]
    r, c = _hf_router(kind, E, k, **cfg)
    idx, w = _compare(kind, c, r, backend)
    assert idx.shape == w.shape == (T, k)
    assert all(len(set(row)) == k for row in idx.tolist())
    if c.norm_topk_prob and kind != "v2":       # renormalised, then scaled
        np.testing.assert_allclose(w.sum(1), c.routed_scaling_factor, rtol=1e-5)
    elif kind != "v2":     # sigmoid weights are not a distribution: the sum is far from 1
        assert (np.abs(w.sum(1) / c.routed_scaling_factor - 1) > 0.2).mean() > 0.9
    if kind == "v2" or c.n_group > 1:
        grp = E // (c.n_group or 1)
        used = [len(set((row // grp).tolist())) for row in idx]
        assert max(used) <= (c.topk_group or c.n_group or 1)


def test_group_limit_changes_the_choice():
    """The group limit is not a no-op on these inputs: plain greedy picks other experts."""
    r, c = _hf_router("v2", 16, 4, topk_method="group_limited_greedy", n_group=4, topk_group=2)
    grouped, _ = _compare("v2", c, r, "numba")
    r2, c2 = _hf_router("v2", 16, 4, topk_method="greedy")
    greedy, _ = _compare("v2", c2, r2, "numba")
    assert (np.sort(grouped, 1) != np.sort(greedy, 1)).any(axis=1).mean() > 0.2


@pytest.mark.parametrize("backend", BACKENDS)
def test_correction_bias_changes_the_choice_not_the_weights(backend):
    """Mutation check: a different ``e_score_correction_bias`` changes which experts are chosen
    (and transformers agrees), while each chosen expert's weight stays its unbiased score."""
    r, c = _hf_router("glm", 16, 4, norm_topk_prob=False, routed_scaling_factor=1.0)
    first, w1 = _compare("glm", c, r, backend)
    with torch.no_grad():
        r.e_score_correction_bias.copy_(torch.flip(r.e_score_correction_bias, (0,)) * 3)
    second, w2 = _compare("glm", c, r, backend)
    changed = (np.sort(first, 1) != np.sort(second, 1)).any(axis=1)
    assert changed.mean() > 0.3
    x = np.random.default_rng(7).standard_normal((T, H)).astype(np.float32)
    sig = 1 / (1 + np.exp(-(x.astype(np.float64) @ r.weight.detach().numpy().T.astype(np.float64))))
    np.testing.assert_allclose(w2, np.take_along_axis(sig, second, 1), rtol=1e-5)


def test_backends_agree_bit_for_bit_on_choices():
    rng = np.random.default_rng(3)
    logits = rng.standard_normal((50, 24)).astype(np.float32)
    bias = (0.1 * rng.standard_normal(24)).astype(np.float32)
    for kw in (dict(scoring="sigmoid", method="noaux_tc", n_group=4, topk_group=2, bias=bias,
                    scale=2.5),
               dict(scoring="softmax", method="group_limited_greedy", n_group=6, topk_group=3,
                    scale=16.0),
               dict(scoring="sigmoid", method="greedy")):
        for renorm in (False, True):
            (i1, w1), (i2, w2) = (get_backend(b).route(logits, 5, renorm, **kw)
                                  for b in BACKENDS)
            assert np.array_equal(i1, i2)
            np.testing.assert_allclose(w1, w2, rtol=1e-6)


def test_default_path_is_the_softmax_kernel():
    """Softmax greedy without bias or scale runs the earlier families' kernel: the same bits."""
    from zipmoe_rt.kernels.routing import route, route_grouped

    rng = np.random.default_rng(4)
    logits = rng.standard_normal((40, 8)).astype(np.float32)
    for renorm in (False, True):
        a = get_backend("numba").route(logits, 2, renorm)
        b = route(logits, 2, renorm)
        c = route_grouped(logits, 2, renorm)       # the general kernel: the same choice
        assert np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1])
        assert np.array_equal(a[0], c[0])
        np.testing.assert_allclose(a[1], c[1], rtol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kw, msg", [
    (dict(k=0), "top-k 0"),
    (dict(k=9), "top-k 9"),
    (dict(scoring="relu"), "scoring 'relu'"),
    (dict(method="topk"), "method 'topk'"),
    (dict(method="noaux_tc", n_group=3), "n_group 3 does not divide"),
    (dict(method="noaux_tc", n_group=2, topk_group=3), "topk_group 3"),
    (dict(method="noaux_tc", n_group=4, topk_group=1, k=3), "exceeds the 2 experts"),
    (dict(method="noaux_tc", n_group=8, topk_group=4), "at least 2 experts per group"),
    (dict(bias=np.zeros(7, np.float32)), "bias has shape (7,)"),
    (dict(scale=float("nan")), "scale nan"),
])
def test_route_arguments_are_checked(backend, kw, msg):
    logits = np.zeros((2, 8), np.float32)
    kw = dict(kw)
    k = kw.pop("k", 2)
    with pytest.raises(ValueError, match=msg.replace("(", r"\(").replace(")", r"\)")):
        get_backend(backend).route(logits, k, True, **kw)


def test_router_rejects_a_bad_rule():
    with pytest.raises(ValueError, match="n_group 5"):
        Router(np.zeros((8, 4), np.float32), RoutingRule(2, True, "sigmoid", "noaux_tc", 5, 1))
