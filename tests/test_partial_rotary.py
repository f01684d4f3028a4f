"""Partial rotary embeddings (``partial_rotary_factor`` < 1, GLM-4-MoE): the frequencies and
tables against transformers' ``Glm4MoeRotaryEmbedding`` (default and yarn rope), and the
backends' ``rope_qk_cache`` against a float64 reference of ``apply_rotary_pos_emb`` of
``modeling_glm4_moe.py`` (the first ``rot`` dimensions of each head turn, pairs ``i`` and
``i + rot/2``; the rest pass), on both kernels (per-head norm, and the grouped one)."""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.backends import get_backend
from zipmoe_rt.families.hparams import HParams
from zipmoe_rt.models.rope import RoPE, rotary_dim

NB, NP = get_backend("numba"), get_backend("numpy")


def _args(hd=32, **rope):
    rope = {"rope_type": "default", "rope_theta": 10000.0, **rope}
    return HParams(hidden_size=64, num_attention_heads=2, num_key_value_heads=1,
                          head_dim=hd, rope=rope, max_position_embeddings=256)


@pytest.mark.parametrize("rope", [
    dict(partial_rotary_factor=0.5),
    dict(partial_rotary_factor=0.25, rope_theta=1e6),
    dict(partial_rotary_factor=0.3),        # int(9.6) = 9: 5 frequencies, 10 dimensions turn
    dict(partial_rotary_factor=0.5, rope_type="yarn", factor=4.0,
         original_max_position_embeddings=64),
    dict(),
])
def test_tables_match_transformers(rope):
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from transformers.models.glm4_moe.modeling_glm4_moe import Glm4MoeRotaryEmbedding

    args = _args(**rope)
    rp = dict(args.rope)
    if "partial_rotary_factor" not in rope:
        rp["partial_rotary_factor"] = 1.0
    cfg = transformers.Glm4MoeConfig(hidden_size=64, num_attention_heads=2, head_dim=32,
                                     max_position_embeddings=256, rope_parameters=rp)
    emb = Glm4MoeRotaryEmbedding(cfg)
    pos = torch.arange(5, 45)[None]
    cos_t, sin_t = emb(torch.zeros(1, dtype=torch.float32), pos)
    ours = RoPE(args)
    cos, sin = ours.cos_sin(5, 40)
    rot = rotary_dim(args)
    assert rot == int(32 * rp["partial_rotary_factor"])
    half = (rot + 1) // 2
    assert cos.shape == (40, half) and ours.inv_freq.shape == (half,)
    assert np.array_equal(ours.inv_freq, emb.inv_freq.numpy())
    np.testing.assert_allclose(np.concatenate([cos, cos], -1), cos_t[0].numpy(), atol=2e-6)
    np.testing.assert_allclose(np.concatenate([sin, sin], -1), sin_t[0].numpy(), atol=2e-6)


@pytest.mark.parametrize("prf, msg", [(0.0, "not a number in"), (1.5, "not a number in"),
                                      ("half", "not a number in"),
                                      (0.03, "gives 0 rotary"),
                                      (dict(rope_type="yarn", factor=2.0), "yarn needs an even")])
def test_bad_factor_is_refused(prf, msg):
    """A factor outside (0, 1] or turning nothing; yarn with an odd rotary dimension (9 of 32),
    which transformers cannot build either."""
    rope = dict(partial_rotary_factor=0.3, **prf) if isinstance(prf, dict) else dict(
        partial_rotary_factor=prf)
    with pytest.raises(ValueError, match=msg):
        RoPE(_args(**rope))


def _rope_partial64(x, cos, sin):
    """float64 GLM ``apply_rotary_pos_emb`` over the last axis of x [T, heads, hd]."""
    rot = 2 * cos.shape[-1]
    c = np.concatenate([cos, cos], -1).astype(np.float64)[:, None, :]
    s = np.concatenate([sin, sin], -1).astype(np.float64)[:, None, :]
    r, p = x[..., :rot], x[..., rot:]
    half = rot // 2
    turned = r * c + np.concatenate([-r[..., half:], r[..., :half]], -1) * s
    return np.concatenate([turned, p], -1)


@pytest.mark.parametrize("kernel", ["per_head", "grouped"])
@pytest.mark.parametrize("rot", [8, 10, 16, 32])
def test_rope_qk_cache_partial(kernel, rot):
    """per_head: q/k norms of head_dim (the one-pass kernel); grouped: a clip, which takes the
    grouped kernel (a clip larger than every value, so it cuts nothing)."""
    rng = np.random.default_rng(rot)
    T, nq, nkv, hd, pos0, eps = 3, 4, 2, 32, 5, 1e-6
    qkv = rng.standard_normal((T, (nq + 2 * nkv) * hd)).astype(np.float32)
    ang = (np.arange(pos0, pos0 + T)[:, None] * 0.37 ** np.arange(rot // 2)).astype(np.float32)
    cos, sin = np.cos(ang), np.sin(ang)
    kc = np.zeros((nkv, 12, hd), np.float32)
    vc = np.zeros((nkv, 12, hd), np.float32)
    qn = (1 + 0.2 * rng.standard_normal(hd)).astype(np.float32)
    kn = (1 + 0.2 * rng.standard_normal(hd)).astype(np.float32)
    clip = 1e6 if kernel == "grouped" else None
    x = qkv.astype(np.float64)
    q = x[:, :nq * hd].reshape(T, nq, hd)
    k = x[:, nq * hd:(nq + nkv) * hd].reshape(T, nkv, hd)
    q = qn * q / np.sqrt((q * q).mean(-1, keepdims=True) + eps)
    k = kn * k / np.sqrt((k * k).mean(-1, keepdims=True) + eps)
    q_ref, k_ref = _rope_partial64(q, cos, sin), _rope_partial64(k, cos, sin)
    for be in (NB, NP):
        a, kk, vv = qkv.copy(), kc.copy(), vc.copy()
        be.rope_qk_cache(a, nq, nkv, hd, qn, kn, np.float32(eps), cos, sin, kk, vv, pos0, clip)
        np.testing.assert_allclose(a[:, :nq * hd].reshape(T, nq, hd), q_ref, rtol=1e-5,
                                   atol=1e-5)
        np.testing.assert_allclose(kk[:, pos0:pos0 + T].transpose(1, 0, 2), k_ref, rtol=1e-5,
                                   atol=1e-5)
        if rot < hd:        # the pass-through dimensions are the normed inputs, untouched
            np.testing.assert_allclose(a[:, :nq * hd].reshape(T, nq, hd)[..., rot:],
                                       q[..., rot:], rtol=1e-5, atol=1e-6)


def test_tables_wider_than_the_head_are_refused():
    T, hd = 1, 8
    qkv = np.zeros((T, 3 * hd), np.float32)
    cs = np.zeros((T, hd), np.float32)          # would be hd/2 at most
    kc = np.zeros((1, 4, hd), np.float32)
    empty = np.zeros(0, np.float32)
    for be in (NB, NP):
        with pytest.raises(ValueError, match="RoPE tables of width 8"):
            be.rope_qk_cache(qkv, 1, 1, hd, empty, empty, np.float32(1e-6), cs, cs, kc,
                             kc.copy(), 0)
