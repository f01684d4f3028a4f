"""Tests for zipmoe_rt.generate: sampling vs transformers' logits processors, and the token loop
on a fake bigram model with a KV cache."""
from __future__ import annotations

import dataclasses
import itertools

import numpy as np
import pytest

from zipmoe_rt.generate import (
    CacheState,
    Generation,
    GenerationStep,
    Sampler,
    SamplingParams,
    common_prefix_len,
    generate,
)

VOCAB = 64


# ------------------------------------------------------------------ fake model


class FakeCache:
    """KV cache stand-in: records the ids it holds. Commits a forward only at its end (atomic)."""

    def __init__(self, croppable: bool = True, measurable: bool = True):
        self.ids: list[int] = []
        self.forward_calls: list[int] = []  # T of each forward
        if not croppable:
            self.crop = None
        if not measurable:
            self.get_seq_length = None

    def get_seq_length(self) -> int:
        return len(self.ids)

    def crop(self, n: int) -> None:
        del self.ids[n:]


class FakeModel:
    """Bigram LM: logits of a position = table[id at that position]. Optionally fails inside forward."""

    class config:
        vocab_size = VOCAB

    def __init__(self, seed: int = 0, scale: float = 3.0, **cache_kw):
        self.table = (np.random.default_rng(seed).standard_normal((VOCAB, VOCAB)) * scale).astype(np.float32)
        self.cache_kw = cache_kw
        self.fail_on_call: int | None = None  # raise KeyboardInterrupt on this forward call (0-based)
        self.fail_after_commit = False
        self.fail_partial = False
        self.calls = 0

    def new_cache(self, max_tokens: int | None = None) -> FakeCache:
        return FakeCache(**self.cache_kw)   # grows on demand: the size hint is not needed

    def forward(self, ids: np.ndarray, cache: FakeCache, last_only: bool = False) -> np.ndarray:
        assert ids.dtype == np.int64 and ids.ndim == 1 and ids.size >= 1
        call = self.calls
        self.calls += 1
        if call == self.fail_on_call:
            if self.fail_after_commit:
                cache.ids.extend(int(i) for i in ids)
            elif self.fail_partial:
                # some positions written, length not what a finished call leaves (T=1: none written)
                cache.ids.extend(int(i) for i in ids[:-1])
            raise KeyboardInterrupt
        cache.ids.extend(int(i) for i in ids)
        cache.forward_calls.append(len(ids))
        logits = self.table[ids]
        return logits[-1] if last_only else logits


def make_model(**kw) -> FakeModel:
    return FakeModel(**kw)


# ------------------------------------------------------------------ SamplingParams


@pytest.mark.parametrize(
    "kw,name",
    [
        ({"temperature": -0.1}, "temperature"),
        ({"temperature": float("nan")}, "temperature"),
        ({"temperature": "1"}, "temperature"),
        ({"top_k": -1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"top_k": True}, "top_k"),
        ({"top_p": 1.5}, "top_p"),
        ({"top_p": -0.1}, "top_p"),
        ({"min_p": 2.0}, "min_p"),
        ({"repetition_penalty": 0.0}, "repetition_penalty"),
        ({"repetition_penalty": float("inf")}, "repetition_penalty"),
        ({"seed": -2}, "seed"),
        ({"seed": 1.0}, "seed"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": None}, "max_tokens"),
    ],
)
def test_sampling_params_validation(kw, name):
    with pytest.raises(ValueError, match=f"^{name}:"):
        SamplingParams(**kw)


def test_seed_minus_one_is_random_as_on_the_command_line():
    # the CLI's --seed -1 is "random", i.e. None; the API takes -1 the same way
    assert SamplingParams(seed=-1).seed is None
    assert SamplingParams(seed=0).seed == 0
    with pytest.raises(ValueError, match=r"^seed: expected None, -1 \(random\) or an int >= 0, "
                                         r"got -2$"):
        SamplingParams(seed=-2)


def test_sampling_params_defaults_and_generation_config():
    p = SamplingParams()
    assert p.greedy and p.top_k == 0 and p.top_p == 1.0 and p.repetition_penalty == 1.0
    assert SamplingParams(temperature=1).temperature == 1.0
    q = SamplingParams.from_generation_config({"do_sample": True, "temperature": 0.6, "top_p": 0.95}, seed=3)
    assert (q.temperature, q.top_k, q.top_p, q.seed) == (0.6, 50, 0.95, 3)  # transformers' top_k default 50
    assert SamplingParams.from_generation_config({"temperature": 0.6}).greedy  # do_sample absent -> greedy
    assert SamplingParams.from_generation_config({"repetition_penalty": 1.1}).repetition_penalty == 1.1


# ------------------------------------------------------------------ processors vs transformers

COMBOS = [
    # temperature, top_k, top_p, min_p, repetition_penalty
    (1.0, 0, 1.0, 0.0, 1.0),
    (0.7, 0, 1.0, 0.0, 1.0),
    (1.3, 10, 1.0, 0.0, 1.0),
    (1.0, 0, 0.9, 0.0, 1.0),
    (0.6, 20, 0.95, 0.0, 1.1),
    (1.0, 0, 0.5, 0.0, 1.3),
    (0.8, 50, 0.8, 0.05, 1.2),
    (1.5, 0, 1.0, 0.1, 0.9),
    (1.0, 1, 1.0, 0.0, 1.0),
    (2.0, 0, 0.0, 0.0, 1.0),
    (1.0, 5000, 0.3, 0.0, 1.0),
]


def _hf_processed(logits: np.ndarray, context: np.ndarray, temperature, top_k, top_p, min_p, penalty):
    """transformers' processors in the order of GenerationMixin._get_logits_processor (do_sample=True)."""
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    procs = []
    if penalty != 1.0:
        procs.append(lp.RepetitionPenaltyLogitsProcessor(float(penalty)))
    if temperature != 1.0:
        procs.append(lp.TemperatureLogitsWarper(float(temperature)))
    if top_k != 0:
        procs.append(lp.TopKLogitsWarper(top_k=top_k, min_tokens_to_keep=1))
    if top_p < 1.0:
        procs.append(lp.TopPLogitsWarper(top_p=top_p, min_tokens_to_keep=1))
    if min_p > 0.0:
        procs.append(lp.MinPLogitsWarper(min_p=min_p, min_tokens_to_keep=1))
    input_ids = torch.from_numpy(context[None, :].astype(np.int64))
    scores = torch.from_numpy(logits[None, :].copy())
    for p in procs:
        scores = p(input_ids, scores)
    return scores[0].numpy(), torch.softmax(scores[0].double(), -1).numpy()


@pytest.mark.parametrize("combo", COMBOS)
@pytest.mark.parametrize("vocab", [50, 3000])
def test_filtered_distribution_matches_transformers(combo, vocab):
    temperature, top_k, top_p, min_p, penalty = combo
    params = SamplingParams(temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p,
                            repetition_penalty=penalty, seed=0)
    sampler = Sampler(params)
    rng = np.random.default_rng(1234 + vocab)
    for trial in range(8):
        logits = (rng.standard_normal(vocab) * rng.uniform(0.5, 6)).astype(np.float32)
        context = rng.integers(0, vocab, size=rng.integers(1, 40))
        ref_scores, ref_probs = _hf_processed(logits, context, *combo)
        ours_scores = sampler.filtered_logits(logits, context)
        np.testing.assert_array_equal(np.isinf(ours_scores), np.isinf(ref_scores))
        finite = np.isfinite(ref_scores)
        np.testing.assert_allclose(ours_scores[finite], ref_scores[finite], rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(sampler.probs(logits, context), ref_probs, rtol=0, atol=1e-6)


@pytest.mark.parametrize("top_k", [1, 3, 7])
def test_top_k_keeps_ties_like_transformers(top_k):
    rng = np.random.default_rng(top_k)
    for _ in range(10):
        logits = np.round(rng.standard_normal(40) * 2).astype(np.float32)  # many exact ties
        ref_scores, ref_probs = _hf_processed(logits, np.array([0]), 1.0, top_k, 1.0, 0.0, 1.0)
        s = Sampler(SamplingParams(temperature=1.0, top_k=top_k))
        np.testing.assert_array_equal(np.isinf(s.filtered_logits(logits)), np.isinf(ref_scores))
        np.testing.assert_allclose(s.probs(logits), ref_probs, atol=1e-6)


def test_top_p_prefilter_path_matches_full_sort():
    """Peaked logits over a large vocabulary take the top-m shortcut; it must agree with a full sort."""
    rng = np.random.default_rng(7)
    logits = (rng.standard_normal(20000) * 4).astype(np.float32)
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.9))
    fast = s.probs(logits)
    Sampler.TOP_P_PREFILTER, saved = 10**9, Sampler.TOP_P_PREFILTER
    try:
        slow = s.probs(logits)
    finally:
        Sampler.TOP_P_PREFILTER = saved
    np.testing.assert_allclose(fast, slow, atol=1e-12)
    _, ref = _hf_processed(logits, np.array([0]), 1.0, 0, 0.9, 0.0, 1.0)
    np.testing.assert_allclose(fast, ref, atol=1e-6)


def test_repetition_penalty_semantics():
    logits = np.array([2.0, -2.0, 1.0, -1.0, 0.0], dtype=np.float32)
    out = Sampler(SamplingParams(repetition_penalty=2.0)).penalize(logits, [0, 1, 1, 4, 99])
    np.testing.assert_array_equal(out, [1.0, -4.0, 1.0, -1.0, 0.0])
    np.testing.assert_array_equal(logits, [2.0, -2.0, 1.0, -1.0, 0.0])  # input untouched


def test_greedy_is_argmax_with_penalty():
    rng = np.random.default_rng(0)
    s = Sampler(SamplingParams(temperature=0.0, top_k=3, top_p=0.5))
    for _ in range(20):
        logits = rng.standard_normal(100).astype(np.float32)
        assert s.sample(logits) == int(np.argmax(logits))
    logits = np.array([5.0, 4.0, 1.0], dtype=np.float32)
    assert Sampler(SamplingParams(repetition_penalty=2.0)).sample(logits, [0]) == 1  # 5/2 < 4
    torch = pytest.importorskip("torch")
    lp = pytest.importorskip("transformers.generation.logits_process")
    ref = lp.RepetitionPenaltyLogitsProcessor(2.0)(torch.tensor([[0]]), torch.from_numpy(logits[None].copy()))
    assert int(ref.argmax()) == 1


def test_sampling_frequencies_follow_distribution():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    s = Sampler(SamplingParams(temperature=1.0, seed=42))
    draws = np.bincount([s.sample(logits) for _ in range(20000)], minlength=4) / 20000
    np.testing.assert_allclose(draws, [0.5, 0.3, 0.15, 0.05], atol=0.015)
    s = Sampler(SamplingParams(temperature=1.0, top_p=0.7, seed=42))  # keeps {0, 1}
    draws = np.bincount([s.sample(logits) for _ in range(5000)], minlength=4) / 5000
    assert draws[2] == draws[3] == 0
    np.testing.assert_allclose(draws[:2], [0.625, 0.375], atol=0.03)


def test_same_seed_same_tokens_different_seed_different():
    logits = np.zeros(1000, dtype=np.float32)  # uniform: collisions are vanishingly unlikely
    def draw(seed):
        s = Sampler(SamplingParams(temperature=1.0, seed=seed))
        return [s.sample(logits) for _ in range(200)]
    assert draw(1) == draw(1)
    a, b = np.array(draw(1)), np.array(draw(2))
    assert (a == b).mean() < 0.02  # expected 1/1000 matches

    model = make_model()
    params = SamplingParams(temperature=1.5, seed=5, max_tokens=50)
    r1 = generate(model, [1, 2, 3], params).collect()
    r2 = generate(model, [1, 2, 3], params).collect()
    r3 = generate(model, [1, 2, 3], dataclasses.replace(params, seed=6)).collect()
    assert r1 == r2 and r1 != r3


# ------------------------------------------------------------------ the token loop


def _reference_greedy(model: FakeModel, prompt: list[int], n: int, stop=()) -> list[int]:
    out, last = [], prompt[-1]
    for _ in range(n):
        last = int(np.argmax(model.table[last]))
        if last in stop:
            break
        out.append(last)
    return out


def test_greedy_generation_and_call_pattern():
    model = make_model()
    gen = generate(model, [3, 4, 5], SamplingParams(max_tokens=10))
    assert isinstance(gen, Generation)
    steps = list(gen)
    assert all(isinstance(s, GenerationStep) for s in steps)
    assert [s.token_id for s in steps[:-1]] == _reference_greedy(model, [3, 4, 5], 10)
    assert steps[-1].token_id is None and steps[-1].is_final and not steps[0].is_final
    st = steps[-1].stats
    assert st is gen.stats and st.finish_reason == "length" and gen.finish_reason == "length"
    assert (st.prompt_tokens, st.cached_tokens, st.generated_tokens, st.output_tokens) == (3, 0, 10, 10)
    # prefill in one call, then one id per call; the last sampled token is not fed
    assert gen.state.cache.forward_calls == [3] + [1] * 9
    assert gen.state.token_ids == gen.state.cache.ids == [3, 4, 5] + gen.output_ids[:-1]
    assert gen.pending_ids == gen.output_ids[-1:]
    assert list(gen) == []  # exhausted


def test_stop_id_ends_with_stop_and_is_not_yielded():
    model = make_model()
    free = _reference_greedy(model, [7], 30)
    stop = free[4]
    first = free.index(stop)
    gen = generate(model, [7], SamplingParams(max_tokens=30), stop_ids={stop})
    steps = list(gen)
    assert [s.token_id for s in steps[:-1]] == free[:first]
    assert stop not in gen.output_ids
    st = steps[-1].stats
    assert st.finish_reason == "stop" and st.stop_token_id == stop == gen.stop_token_id
    assert st.generated_tokens == first + 1 and st.output_tokens == first
    assert gen.pending_ids == [stop]  # sampled, not fed
    assert gen.state.cache.ids == [7] + free[:first]


def test_stop_on_first_token():
    model = make_model()
    first = _reference_greedy(model, [9], 1)[0]
    steps = list(generate(model, [9], SamplingParams(), stop_ids=[first]))
    assert len(steps) == 1 and steps[0].stats.finish_reason == "stop"
    assert steps[0].stats.decode_tokens_per_s is None and steps[0].stats.ttft_s is not None


def test_max_tokens_one():
    model = make_model()
    steps = list(generate(model, [9], SamplingParams(max_tokens=1)))
    assert len(steps) == 2 and steps[1].stats.finish_reason == "length"
    assert model.calls == 1


def test_stats_timings_with_fake_clock():
    ticks = itertools.count(0.0, 0.5)  # every clock() call advances 0.5 s
    model = make_model()
    gen = generate(model, list(range(8)), SamplingParams(max_tokens=5), clock=lambda: next(ticks))
    gen.collect()
    st = gen.stats
    assert st.ttft_s == 0.5 and st.prefill_tokens_per_s == 16.0
    assert st.decode_s == 2.0 and st.tpot_s == 0.5 and st.decode_tokens_per_s == 2.0


def test_stats_exclude_consumer_time():
    import time
    model = make_model()
    gen = generate(model, [1], SamplingParams(max_tokens=4))
    for _ in gen:
        time.sleep(0.02)
    assert gen.stats.decode_s < 0.02


def test_forward_returning_all_positions_is_accepted():
    class AllPositions(FakeModel):
        def forward(self, ids, cache, last_only=False):
            return super().forward(ids, cache, last_only=False)  # [T, vocab]
    model = AllPositions()
    assert generate(model, [3, 4], SamplingParams(max_tokens=6)).collect() == _reference_greedy(model, [3, 4], 6)


def test_prompt_validation():
    model = make_model()
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [], SamplingParams())
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [1, VOCAB], SamplingParams())
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, [-1], SamplingParams())
    with pytest.raises(ValueError, match="prompt_ids"):
        generate(model, np.array([1.0, 2.0]), SamplingParams())
    with pytest.raises(TypeError, match="cache"):
        generate(model, [1], SamplingParams(), cache=model.new_cache())
    with pytest.raises(TypeError, match="params"):
        generate(model, [1], {"temperature": 0})


def test_continue_conversation_reuses_cache():
    model = make_model()
    params = SamplingParams(max_tokens=5)
    g1 = generate(model, [1, 2, 3], params)
    out1 = g1.collect()
    state = g1.state
    # next turn: the pending (sampled, unfed) token, then the new user ids
    g2 = generate(model, g1.pending_ids + [10, 11], params, cache=state)
    out2 = g2.collect()
    assert g2.state is state and g2.stats.cached_tokens == 3 + 4 and g2.stats.prompt_tokens == 3
    assert state.cache.forward_calls[5] == 3  # only the new ids were prefilled
    full = [1, 2, 3] + out1 + [10, 11]
    assert state.token_ids == state.cache.ids == full + out2[:-1]
    # same tokens as one fresh run over the whole transcript
    fresh = generate(make_model(), full, params).collect()
    assert out2 == fresh


def test_repetition_penalty_sees_cached_history():
    model = make_model()
    params = SamplingParams(max_tokens=6, repetition_penalty=1.8)
    g1 = generate(model, [5, 6], params)
    g1.collect()
    g2 = generate(model, g1.pending_ids + [7], params, cache=g1.state)
    cont = g2.collect()
    transcript = [5, 6] + g1.output_ids + [7]
    assert cont == generate(make_model(), transcript, params).collect()
    # without the history the penalty context differs, and so (for this model) do the tokens
    fresh_state = CacheState(model.new_cache(), [])
    generate(model, transcript[:-1], SamplingParams(max_tokens=1), cache=fresh_state).collect()
    fresh_state.token_ids[:] = []  # pretend the history is unknown
    assert generate(model, [7], params, cache=fresh_state).collect() != cont


def test_sync_prefix():
    model = make_model()
    state = CacheState.new(model)
    generate(model, [1, 2, 3, 4], SamplingParams(max_tokens=1), cache=state).collect()
    assert state.token_ids == [1, 2, 3, 4]
    new = state.sync_prefix([1, 2, 9, 9, 9], model)
    assert new == [9, 9, 9] and state.token_ids == state.cache.ids == [1, 2]
    assert state.sync_prefix([1, 2], model) == [2] and state.token_ids == [1]  # keeps one id to feed
    nocrop = make_model(croppable=False)
    st2 = CacheState.new(nocrop)
    generate(nocrop, [1, 2, 3], SamplingParams(max_tokens=1), cache=st2).collect()
    old_cache = st2.cache
    assert st2.sync_prefix([1, 2, 3, 4], nocrop) == [4] and st2.cache is old_cache
    assert st2.sync_prefix([1, 5], nocrop) == [1, 5] and st2.cache is not old_cache and st2.token_ids == []
    generate(nocrop, [1, 5], SamplingParams(max_tokens=1), cache=st2).collect()
    with pytest.raises(ValueError, match="model"):
        st2.sync_prefix([7, 8])  # must shrink, cannot crop, no model to rebuild with
    with pytest.raises(ValueError, match="target_ids"):
        st2.sync_prefix([])


def test_common_prefix_len():
    assert common_prefix_len([], [1]) == 0
    assert common_prefix_len([1, 2, 3], [1, 2, 4]) == 2
    assert common_prefix_len([1, 2], [1, 2, 3]) == 2


# ------------------------------------------------------------------ cancellation


def test_consumer_break_keeps_cache_consistent():
    model = make_model()
    gen = generate(model, [1, 2], SamplingParams(max_tokens=50, temperature=1.0, seed=0))
    seen = []
    for step in gen:
        seen.append(step.token_id)
        if len(seen) == 4:
            break
    assert gen.finish_reason is None and gen.stats is None
    assert gen.state.token_ids == gen.state.cache.ids == [1, 2] + seen[:3]
    assert gen.pending_ids == [seen[3]]
    gen.close()
    assert gen.finish_reason == "cancelled" and gen.stats.generated_tokens == 4
    assert list(gen) == []
    assert model.calls == 4  # nothing ran after the break
    # the state can be continued
    cont = generate(model, gen.pending_ids + [3], SamplingParams(max_tokens=2), cache=gen.state).collect()
    assert len(cont) == 2 and gen.state.cache.ids == gen.state.token_ids


def test_context_manager_closes():
    model = make_model()
    with generate(model, [1], SamplingParams(max_tokens=10)) as gen:
        next(gen)
    assert gen.finish_reason == "cancelled"
    with generate(model, [1], SamplingParams(max_tokens=2)) as gen:
        gen.collect()
    assert gen.finish_reason == "length"


def test_close_before_start():
    model = make_model()
    gen = generate(model, [1, 2], SamplingParams())
    gen.close()
    assert model.calls == 0 and gen.pending_ids == [1, 2] and gen.stats.generated_tokens == 0
    assert gen.stats.ttft_s is None


@pytest.mark.parametrize("mode", ["before_commit", "after_commit", "partial"])
@pytest.mark.parametrize("fail_on_call", [0, 3])
@pytest.mark.parametrize("cache_kw", [{}, {"croppable": False}, {"measurable": False}])
def test_keyboard_interrupt_inside_forward(mode, fail_on_call, cache_kw):
    model = make_model(**cache_kw)
    model.fail_on_call = fail_on_call
    model.fail_after_commit = mode == "after_commit"
    model.fail_partial = mode == "partial"
    gen = generate(model, [1, 2, 3], SamplingParams(max_tokens=20))
    got = []
    with pytest.raises(KeyboardInterrupt):
        for step in gen:
            got.append(step.token_id)
    assert len(got) == fail_on_call
    assert gen.finish_reason == "cancelled" and gen.stats is not None
    st = gen.state
    cache = st.cache
    if not st.valid:
        # only when the cache could neither be measured nor cropped back
        assert mode == "partial" and cache_kw == {"croppable": False} and fail_on_call == 0
        with pytest.raises(ValueError, match="cache"):
            generate(model, [1], SamplingParams(), cache=st)
        return
    assert cache.ids == st.token_ids
    transcript = [1, 2, 3] + got
    assert st.token_ids + gen.pending_ids == transcript
    # resuming gives the same tokens as an uninterrupted run
    model.fail_on_call = None
    # nothing pending (the interrupted call had committed): step back one id to get logits again
    resume = gen.pending_ids or st.sync_prefix(st.token_ids, model)
    cont = generate(model, resume, SamplingParams(max_tokens=20 - len(got)), cache=st).collect()
    assert got + cont == _reference_greedy(model, [1, 2, 3], 20)
    assert st.cache.ids == st.token_ids


def test_interrupt_without_any_cache_introspection_marks_invalid():
    model = make_model(croppable=False, measurable=False)
    model.fail_on_call = 1
    gen = generate(model, [1], SamplingParams(max_tokens=5))
    with pytest.raises(KeyboardInterrupt):
        gen.collect()
    assert gen.state.valid is False
    with pytest.raises(ValueError, match="cache"):
        generate(model, [1], cache=gen.state)


def test_model_error_finishes_with_error():
    class Broken(FakeModel):
        def forward(self, ids, cache, last_only=False):
            raise RuntimeError("boom")
    gen = generate(Broken(), [1], SamplingParams())
    with pytest.raises(RuntimeError):
        next(gen)
    assert gen.finish_reason == "error" and gen.state.token_ids == [] and gen.pending_ids == [1]
    with pytest.raises(StopIteration):
        next(gen)


# ------------------------------------------------------------------ end to end on a real runtime model


@pytest.mark.parametrize("name", ["mixtral", "qwen3_moe"])
def test_greedy_matches_transformers_generate_on_tiny_moe(name, tiny_moe_dir):
    """The token loop over zipmoe_rt's Model (KVCache with get_seq_length/crop) vs HF generate."""
    torch = pytest.importorskip("torch")
    from tiny_models import load_hf

    from zipmoe_rt.models import build_model
    from zipmoe_rt.models.weights import CheckpointSource

    folder = tiny_moe_dir(name)
    model = build_model(CheckpointSource(folder))
    hf_model = load_hf(folder)
    prompt = [1, 5, 9, 33, 7]
    for penalty in (1.0, 1.5):
        ours = generate(model, prompt, SamplingParams(max_tokens=10, repetition_penalty=penalty)).collect()
        ref = hf_model.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                                repetition_penalty=penalty, eos_token_id=None, pad_token_id=0)
        assert ours == ref[0, len(prompt):].tolist()
    # a second turn through the cache == one fresh run over the whole transcript
    g1 = generate(model, prompt, SamplingParams(max_tokens=4))
    g1.collect()
    g2 = generate(model, g1.pending_ids + [3, 4], SamplingParams(max_tokens=6), cache=g1.state)
    assert g2.collect() == generate(model, prompt + g1.output_ids + [3, 4], SamplingParams(max_tokens=6)).collect()
    assert g1.state.cache.get_seq_length() == len(g1.state.token_ids)


def test_sampling_lives_in_its_own_module():
    import zipmoe_rt.generate as G
    import zipmoe_rt.sampling as S
    assert G.Sampler is S.Sampler is Sampler and G.SamplingParams is S.SamplingParams
    assert {"Sampler", "SamplingParams"} <= set(G.__all__)
    assert set(S.__all__) == {"Sampler", "SamplingParams", "GenerationConfigError",
                              "file_sampling"}
    p = S.Sampler(S.SamplingParams(temperature=0.5, top_k=2, seed=1))
    logits = np.array([0.0, 1.0, 3.0, 2.0], np.float32)
    # top-2 of the temperature-scaled logits: ids 2, 3 with softmax of (6, 4)
    e = np.exp([6.0 - 6.0, 4.0 - 6.0])
    np.testing.assert_allclose(p.probs(logits), [0, 0, e[0] / e.sum(), e[1] / e.sum()], rtol=1e-12)


# ------------------------------------------------------------------ the cancel event


def test_cancel_event_reaches_a_forward_that_takes_interrupt():
    """A ``forward(..., interrupt=)`` is handed a check that raises once the event is set; the
    run then ends with a final ``cancelled`` step (no exception), the cache as before that
    forward, the ids it was fed still pending."""
    import threading

    class Interruptible(FakeModel):
        def forward(self, ids, cache, last_only=False, interrupt=None):
            self.seen = interrupt
            interrupt()                      # "layer 0"
            if len(ids) > 1:
                stop.set()                   # the client leaves while layer 0 runs
            interrupt()                      # "layer 1": raises once set
            return super().forward(ids, cache, last_only)

    stop = threading.Event()
    model = Interruptible()
    gen = generate(model, [1, 2, 3], SamplingParams(max_tokens=5), cancel=stop)
    steps = list(gen)
    assert [s.token_id for s in steps] == [None]
    assert steps[0].stats.finish_reason == "cancelled" and steps[0].stats.generated_tokens == 0
    assert model.calls == 0 and gen.state.token_ids == [] and gen.state.cache.ids == []
    assert gen.pending_ids == [1, 2, 3] and callable(model.seen)


def test_cancel_event_without_interrupt_is_checked_between_forward_calls():
    """A model whose ``forward`` takes no ``interrupt`` still runs (called as before); a set
    event stops the run before its next forward call."""
    import threading

    stop = threading.Event()
    model = FakeModel()
    gen = generate(model, [1, 2, 3], SamplingParams(max_tokens=5), cancel=stop)
    first = next(gen)
    assert first.token_id is not None and model.calls == 1
    stop.set()
    last = next(gen)
    assert last.token_id is None and last.stats.finish_reason == "cancelled"
    assert model.calls == 1 and gen.state.token_ids == [1, 2, 3]
    assert gen.pending_ids == [first.token_id]
    with pytest.raises(StopIteration):
        next(gen)


def test_cancel_must_be_an_event():
    with pytest.raises(TypeError, match="^cancel: expected an event"):
        generate(FakeModel(), [1, 2], cancel=True)
