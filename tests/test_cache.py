"""Per-layer caches (zipmoe_rt/models/cache.py): the KVCache of one layer, ModelCache over the
layers, the commit protocol of Model.forward, and chat-turn reuse through CacheState when a layer
cache cannot crop (a recurrent state)."""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.generate import CacheState, SamplingParams, generate
from zipmoe_rt.models.cache import KVCache, LayerCache, ModelCache


class NoCropKV(KVCache):
    """A KV cache that, like a recurrent state, cannot go back: crops only to its own length."""

    def can_crop(self, n):
        return int(n) == self.length


# ------------------------------------------------------------------ KVCache


def test_kvcache_own_head_sizes_update_commit_crop():
    c = KVCache(2, 6, 4, window=3, capacity=2)
    assert isinstance(c, LayerCache)
    assert (c.k.shape, c.v.shape, c.window, c.length) == ((2, 2, 6), (2, 2, 4), 3, 0)
    assert c.nbytes == 2 * 2 * (6 + 4) * 4
    rng = np.random.default_rng(0)
    k1, v1 = rng.standard_normal((2, 3, 6)), rng.standard_normal((2, 3, 4))
    keys, vals = c.update(k1.astype(np.float32), v1.astype(np.float32))
    assert keys.shape == (2, 3, 6) and vals.shape == (2, 3, 4)
    assert c.length == 0 and c.capacity == 4          # pending until commit; grew by doubling
    c.commit(3)
    k2, v2 = rng.standard_normal((2, 2, 6)), rng.standard_normal((2, 2, 4))
    keys, vals = c.update(k2.astype(np.float32), v2.astype(np.float32))
    c.commit(2)
    assert c.length == 5 and c.capacity == 8 and c.nbytes == 2 * 8 * 10 * 4
    np.testing.assert_array_equal(keys, np.concatenate([k1, k2], 1).astype(np.float32))
    np.testing.assert_array_equal(vals, np.concatenate([v1, v2], 1).astype(np.float32))
    with pytest.raises(ValueError, match="do not match"):
        c.update(np.zeros((2, 1, 4), np.float32), np.zeros((2, 1, 4), np.float32))
    with pytest.raises(ValueError, match="reserved"):
        c.commit(4)                                    # 3 slots left
    assert c.can_crop(5) and c.can_crop(0) and not c.can_crop(6) and not c.can_crop(-1)
    with pytest.raises(ValueError, match="holds 5"):
        c.crop(6)
    c.crop(2)
    assert c.length == 2
    np.testing.assert_array_equal(c.k[:, :2], k1[:, :2].astype(np.float32))


def test_kvcache_growth_keeps_committed_entries_only():
    c = KVCache(1, 2, capacity=2)
    c.k[0, :2] = [[1, 1], [2, 2]]
    c.commit(1)                 # position 1 is pending scratch
    c.reserve(3)
    assert c.capacity == 4
    assert c.k[0, 0].tolist() == [1, 1] and c.k[0, 1].tolist() == [0, 0]


# ------------------------------------------------------------------ ModelCache


def test_model_cache_layers_differ_and_crop_is_all_or_none():
    layers = [KVCache(2, 8, capacity=4), KVCache(1, 16, 4, window=2, capacity=8),
              NoCropKV(1, 4, capacity=4)]
    mc = ModelCache(layers)
    assert len(mc) == 3 and mc[1] is layers[1] and mc.capacity == 4
    assert mc.nbytes == sum(lc.nbytes for lc in layers) == (2 * 4 * 16 + 8 * 20 + 4 * 8) * 4
    mc.reserve(6)
    assert [lc.capacity for lc in layers] == [8, 8, 8] and mc.get_seq_length() == 0
    mc.commit(6)
    assert mc.offset == mc.get_seq_length() == 6 and all(lc.length == 6 for lc in layers)
    assert mc.can_crop(6) and not mc.can_crop(3) and not mc.can_crop(7)
    with pytest.raises(ValueError, match=r"layer cache\(s\) \[2\] cannot crop"):
        mc.crop(3)
    assert mc.offset == 6 and all(lc.length == 6 for lc in layers)   # nothing changed
    with pytest.raises(ValueError, match="holds 6"):
        mc.crop(7)
    ok = ModelCache([KVCache(2, 8, capacity=4), KVCache(1, 16, 4, window=2, capacity=8)])
    ok.reserve(6)
    ok.commit(6)
    assert ok.can_crop(3)
    ok.crop(3)
    assert ok.offset == 3 and [lc.length for lc in ok.layers] == [3, 3]
    with pytest.raises(ValueError, match="start empty"):
        ModelCache(ok.layers)


# ------------------------------------------------------------------ on a model


@pytest.fixture(scope="module")
def model(tiny_moe_dir):
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    return build_model(CheckpointSource(tiny_moe_dir("qwen3_moe")))


def test_new_cache_one_layer_cache_per_layer(model, tiny_moe_dir):
    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    c = model.new_cache(capacity=16)
    a = model.args
    assert len(c.layers) == a.num_hidden_layers == 3
    assert all(isinstance(lc, KVCache) and lc.k.shape == (a.num_key_value_heads, 16, a.head_dim)
               and lc.v.shape == lc.k.shape and lc.window == 0 for lc in c.layers)
    assert model.new_cache(max_tokens=5).capacity == 5
    src = CheckpointSource(tiny_moe_dir("qwen2_moe_swa"))
    src.hparams = dict(src.hparams, max_window_layers=2)
    swa = build_model(src)
    assert [lc.window for lc in swa.new_cache().layers] == [5, 0, 0]


def test_interrupted_forward_commits_nothing(model):
    ids = np.arange(10, 16)
    ref_cache = model.new_cache(capacity=4)
    model.forward(ids[:3], ref_cache)
    ref = model.forward(ids[3:], ref_cache, last_only=False)   # the same pieces, uninterrupted
    cache = model.new_cache(capacity=4)
    model.forward(ids[:3], cache)
    real = model.executor

    class Boom:
        backend = real.backend

        def run(self, layer, *a):
            if layer == 2:       # after layers 0 and 1 wrote their k/v
                raise KeyboardInterrupt
            return real.run(layer, *a)

    model.executor = Boom()
    try:
        with pytest.raises(KeyboardInterrupt):
            model.forward(ids[3:], cache)
    finally:
        model.executor = real
    assert cache.offset == 3 and all(lc.length == 3 for lc in cache.layers)
    again = model.forward(ids[3:], cache, last_only=False)
    np.testing.assert_array_equal(again, ref)
    with pytest.raises(ValueError, match="layers"):
        model.forward(ids, ModelCache([KVCache(2, 32)]))


def test_chat_turn_rebuilds_when_a_layer_cannot_crop(model):
    """A second chat turn whose prompt diverges from the cached transcript: croppable caches are
    cropped and reused, a cache with one non-croppable layer is rebuilt from scratch; both give
    the tokens of a fresh run over the whole transcript."""
    params = SamplingParams(max_tokens=6)
    prompt = [1, 5, 9, 33, 7, 100]

    def two_turns():
        state = CacheState.new(model)
        g1 = generate(model, prompt, params, cache=state)
        out1 = g1.collect()
        target = prompt + out1[:2] + [3, 4]         # diverges after two generated tokens
        first = state.cache
        new = state.sync_prefix(target, model)
        reused = state.cache is first
        return out1, generate(model, new, params, cache=state).collect(), new, target, \
            reused, state

    out1, out2, new, target, reused, state = two_turns()
    assert reused and new == [3, 4]
    attn = model.layers[1].attn
    attn.new_cache = lambda capacity=256: NoCropKV(attn.nkv, attn.hd, attn.hd, attn.window,
                                                   capacity)
    try:
        out1b, out2b, newb, _, reusedb, stateb = two_turns()
    finally:
        del attn.new_cache
    assert not reusedb and newb == target            # rebuilt: the whole transcript again
    assert isinstance(stateb.cache.layers[1], NoCropKV)
    assert stateb.cache.get_seq_length() == len(stateb.token_ids)
    fresh = generate(model, target, params).collect()
    assert out1b == out1 and out2b == out2 == fresh
