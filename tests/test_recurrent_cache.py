"""Layers with a recurrent state (Qwen3-Next / Qwen3.5-MoE's Gated DeltaNet, LFM2-MoE's short
convolution; :class:`~zipmoe_rt.models.cache.RecurrentCache`): prefill in one call against
token by token, and cache reuse across chat turns only where the held sequence is a prefix of
the new one, each against a fresh run and transformers."""
from __future__ import annotations

import numpy as np
import pytest

from zipmoe_rt.generate import CacheState, generate
from zipmoe_rt.models import build_model
from zipmoe_rt.models.weights import CheckpointSource
from zipmoe_rt.sampling import SamplingParams

from hf_parity import hf_logits

pytest.importorskip("torch")
pytest.importorskip("transformers")

#: spec -> tolerance between the piecewise and the one-call logits (float32 rounding of the
#: state stored between calls: the gated delta rule's state accumulates more of it)
SPECS = {"qwen3_next": 1e-4, "qwen3_next_dense_bias": 1e-4, "qwen3_5_moe": 1e-4,
         "qwen3_5_moe_vl": 1e-4, "lfm2_moe": 1e-5, "lfm2_moe_bias": 1e-5, "lfm2_moe_dense2": 1e-5}
PROMPT = np.random.default_rng(1).integers(0, 256, 16)
BACKENDS = ("numba", "numpy")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(SPECS))
def test_prefill_one_call_equals_token_by_token(tiny_moe_dir, pair, name, backend):
    """The whole prompt in one call (Gated DeltaNet: chunked scan; short conv: one conv) and
    one token per call (the recurrence, state carried) give the same logits at every position, both within the parity bar of
    transformers."""
    _, hf = pair(name)
    model = build_model(CheckpointSource(tiny_moe_dir(name)), backend=backend)
    ref = hf_logits(hf, PROMPT)
    full = model.forward(PROMPT, model.new_cache(), last_only=False)
    cache = model.new_cache()
    steps = np.stack([model.forward(PROMPT[i:i + 1], cache) for i in range(len(PROMPT))])
    assert cache.offset == len(PROMPT)
    assert np.abs(full - ref).max() <= 1e-3 and np.abs(steps - ref).max() <= 1e-3
    np.testing.assert_allclose(steps, full, rtol=0, atol=SPECS[name])
    assert np.array_equal(steps.argmax(-1), full.argmax(-1))


@pytest.mark.parametrize("name", list(SPECS))
def test_chat_turns_reuse_the_cache_only_for_a_prefix(pair, name):
    """Turns through one :class:`CacheState` (what ``ChatSession`` and the server's prompt
    cache do): a turn that extends the held sequence reuses the state and gives the logits of a
    fresh run over the whole conversation; a turn that shares only the last prompt (a reply
    rendered differently) returns to the state marked at that prompt's end; a turn that
    diverges earlier cannot roll the recurrent state back and is recomputed from scratch, with
    the fresh run's logits exactly."""
    model, hf = pair(name)
    greedy = SamplingParams(temperature=0.0, max_tokens=6)
    state = CacheState.new(model)
    conv = [int(t) for t in PROMPT[:10]]
    new = state.sync_prefix(conv, model)
    assert new == conv
    conv += [s.token_id for s in generate(model, new, greedy, cache=state)
             if s.token_id is not None]
    assert state.cache.crop_points() == [0, 10, len(state.token_ids)]     # marked after prefill
    held_cache = state.cache

    def turn(target, reused):
        new = state.sync_prefix(target, model)
        assert state.cache is held_cache and len(state.token_ids) == reused
        assert new == target[reused:] and state.cache.offset == reused
        logits = model.forward(np.array(new), state.cache, last_only=False)
        state.token_ids.extend(new)
        fresh = model.forward(np.array(target), model.new_cache(), last_only=False)
        np.testing.assert_allclose(logits, fresh[reused:], rtol=0, atol=SPECS[name])
        assert np.abs(logits - hf_logits(hf, target)[reused:]).max() <= 1e-3
        return logits, fresh

    target = conv + [int(t) for t in PROMPT[10:16]]
    turn(target, len(conv) - 1 if len(state.token_ids) < len(conv) else len(conv))
    # the previous prompt, then another reply: back to the mark at its end
    turn(conv[:10] + [5, 6, 7, 8], 10)
    # an edited history: no position to return to but 0
    edited = conv[:8] + [7, 8, 9]
    logits, fresh = turn(edited, 0)
    np.testing.assert_array_equal(logits, fresh)
