"""Tests of zipmoe_rt.engine.planner (ZIPMOE.md §3): every DP against brute force over subsets,
the planner against exhaustive search and hand-worked cases."""
from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from zipmoe_rt.engine import planner as P
from zipmoe_rt.engine.planner import DelayModel

TIERS = ("F", "C", "S", "E", "miss")


# ------------------------------------------------------------------------------------------------
# brute-force references
# ------------------------------------------------------------------------------------------------

def bf_esp(w, j):
    return sum(math.prod(w[i] for i in S) for S in itertools.combinations(range(len(w)), j))


def bf_cp_design(w, k):
    """All k-subsets with P(S) ∝ Π w_i; inf weights = always selected (limit w → ∞)."""
    w = list(w)
    inf = [i for i, x in enumerate(w) if math.isinf(x)]
    subsets, probs = [], []
    for S in itertools.combinations(range(len(w)), k):
        if not set(inf) <= set(S):
            continue
        subsets.append(S)
        probs.append(math.prod(w[i] for i in S if not math.isinf(w[i])))
    tot = sum(probs)
    return [(S, p / tot) for S, p in zip(subsets, probs)]


def bf_inclusion(w, k):
    pi = np.zeros(len(w))
    for S, p in bf_cp_design(w, k):
        pi[list(S)] += p
    return pi


def rank_tiers(n, counts):
    nF, nC, nS, nE = counts
    return ["F"] * nF + ["C"] * nC + ["S"] * nS + ["E"] * nE + ["miss"] * (n - sum(counts))


def bf_expected_makespan(w, counts, k, delay):
    """Σ over k-subsets of the CP design of makespan(hits per tier), tiers by rank of w."""
    order = np.argsort(-np.asarray(w), kind="stable")
    tier = {int(e): t for e, t in zip(order, rank_tiers(len(w), counts))}
    tot = 0.0
    for S, p in bf_cp_design(w, k):
        hits = {t: 0 for t in TIERS}
        for e in S:
            hits[tier[e]] += 1
        tot += p * delay.layer_makespan(hits)
    return tot


def random_delay(rng, workers=None, chunks=1):
    return DelayModel(sm_read_s=float(rng.uniform(0.5, 4)), exp_read_s=float(rng.uniform(0.1, 2)),
                      decode_s=float(rng.uniform(0.2, 4)), matmul_s=float(rng.uniform(0, 1)),
                      workers=int(workers or rng.integers(1, 5)), bytes_F=int(rng.integers(8, 20)),
                      bytes_sm=int(rng.integers(3, 9)), bytes_exp=int(rng.integers(1, 4)),
                      chunks=chunks)


def random_pi(rng, n, k, near_one=0, tiny=0):
    """Inclusion probabilities with some entries within 1e-9..1e-3 of 1 and some ~1e-12."""
    pi = np.zeros(n)
    idx = rng.permutation(n)
    hi, lo, mid = idx[:near_one], idx[near_one:near_one + tiny], idx[near_one + tiny:]
    pi[hi] = 1 - 10.0 ** -rng.uniform(3, 9, len(hi))
    pi[lo] = 10.0 ** -rng.uniform(10, 12, len(lo))
    rest = k - pi[hi].sum() - pi[lo].sum()
    x = rng.random(len(mid)) + 0.05
    pi[mid] = rest * x / x.sum()
    return pi


# ------------------------------------------------------------------------------------------------
# §3.1-3.2
# ------------------------------------------------------------------------------------------------

def test_popularity_by_rank_values():
    counts = np.array([[1, 3, 0, 4], [2, 2, 2, 2]])
    pop = P.popularity_by_rank(counts)
    np.testing.assert_allclose(pop, [[0.5, 0.375, 0.125, 0.0], [0.25] * 4])
    avg = P.popularity_by_rank(counts, average=True)
    np.testing.assert_allclose(avg, [0.375, 0.3125, 0.1875, 0.125])
    assert avg.shape == (4,)


@pytest.mark.parametrize("bad", [np.array([1, 2, 3]), np.array([[1, 2], [0, 0]]),
                                 np.array([[1, -1], [2, 2]]), np.zeros((0, 3))])
def test_popularity_by_rank_errors(bad):
    with pytest.raises(ValueError):
        P.popularity_by_rank(bad)


def test_inclusion_probabilities_caps_iteratively():
    # 2·(0.8, 0.1, 0.1) = (1.6, .2, .2): cap the first, spread the remaining 1 over (1, 1)
    np.testing.assert_allclose(P.inclusion_probabilities([8, 1, 1], 2), [1, 0.5, 0.5])
    # 3/18·(10,5,1,1,1) = (1.67, .83, ...): cap 10; 2/8·(5,1,1,1) = (1.25, ...): cap 5;
    # 1/3 each for the rest
    np.testing.assert_allclose(P.inclusion_probabilities([10, 5, 1, 1, 1], 3),
                               [1, 1, 1 / 3, 1 / 3, 1 / 3])
    # order kept, zeros stay zero
    np.testing.assert_allclose(P.inclusion_probabilities([1, 0, 3], 1), [0.25, 0, 0.75])
    # k equal to the number of non-zero experts: all of them are certain
    np.testing.assert_allclose(P.inclusion_probabilities([5, 0, 1], 2), [1, 0, 1])


def test_inclusion_probabilities_errors():
    with pytest.raises(ValueError):
        P.inclusion_probabilities([1, 0, 0], 2)      # only one expert with mass
    with pytest.raises(ValueError):
        P.inclusion_probabilities([1, 1], 0)
    with pytest.raises(ValueError):
        P.inclusion_probabilities([1, 1], 1.5)
    with pytest.raises(ValueError):
        P.inclusion_probabilities([1, -1, 2], 1)


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(st.just(0.0), st.floats(1e-6, 1e6)), min_size=1, max_size=20),
       st.integers(1, 8))
def test_inclusion_probabilities_properties(pop, k):
    pop = np.array(pop)
    if (pop > 0).sum() < k:
        with pytest.raises(ValueError):
            P.inclusion_probabilities(pop, k)
        return
    pi = P.inclusion_probabilities(pop, k)
    assert pi.sum() == pytest.approx(k, rel=1e-12)
    assert (pi >= 0).all() and (pi <= 1).all()
    assert (pi[pop == 0] == 0).all()
    # uncapped entries stay proportional to the popularity
    free = (pi < 1) & (pop > 0)
    if free.sum() >= 2:
        ratio = pi[free] / pop[free]
        np.testing.assert_allclose(ratio, ratio[0], rtol=1e-9)


# ------------------------------------------------------------------------------------------------
# §3.3: ESPs and conditional Poisson
# ------------------------------------------------------------------------------------------------

def test_elementary_symmetric_vs_brute_force():
    rng = np.random.default_rng(1)
    for n in range(0, 9):
        w = rng.uniform(0, 3, n)
        k = n + 1
        e = P.elementary_symmetric(w, k)
        ref = [bf_esp(w, j) for j in range(k + 1)]
        np.testing.assert_allclose(e, ref, rtol=1e-13)
        assert e[-1] == 0.0        # e_{n+1} = 0
    assert P.elementary_symmetric([2.0, 3.0], 2).tolist() == [1.0, 5.0, 6.0]


def test_elementary_symmetric_leave_one_out_vs_brute_force():
    rng = np.random.default_rng(2)
    w = np.concatenate([[1e8], rng.uniform(1e-3, 2, 6)])     # one dominant weight
    k = 4
    loo = P.elementary_symmetric_leave_one_out(w, k)
    for i in range(len(w)):
        rest = np.delete(w, i)
        np.testing.assert_allclose(loo[i], [bf_esp(rest, j) for j in range(k + 1)], rtol=1e-12)


def test_esp_errors():
    with pytest.raises(ValueError):
        P.elementary_symmetric([1.0, -1.0], 1)
    with pytest.raises(ValueError):
        P.elementary_symmetric([1.0, np.inf], 1)
    with pytest.raises(ValueError):
        P.elementary_symmetric([1.0], -1)


def weight_trials(seed, n_min, decades, period, trials=40):
    """Random conditional-Poisson designs: per trial ``n`` in ``n_min..8``, ``k`` in ``1..n``,
    float64 weights ``w [n]`` log-uniform over ``±decades`` decades; trial ``1 (mod period)``
    sets one weight to 0 (if ``n > k``), trial ``2 (mod period)`` one to ``inf`` (if ``k > 1``).
    Yields ``(rng, n, k, w)`` for the trials with at least ``k`` positive weights; the caller
    may draw from ``rng`` between trials."""
    rng = np.random.default_rng(seed)
    for trial in range(trials):
        n = int(rng.integers(n_min, 9))
        k = int(rng.integers(1, n + 1))
        w = 10.0 ** rng.uniform(-decades, decades, n)
        if trial % period == 1 and n > k:
            w[rng.integers(n)] = 0.0
        if trial % period == 2 and k > 1:
            w[rng.integers(n)] = np.inf
        if (w > 0).sum() >= k:
            yield rng, n, k, w


def test_cp_inclusion_vs_enumeration():
    for _, n, k, w in weight_trials(3, n_min=1, decades=4, period=4):
        pi = P.cp_inclusion(w, k)
        np.testing.assert_allclose(pi, bf_inclusion(w, k), rtol=1e-10, atol=1e-14)
        assert pi.sum() == pytest.approx(k, rel=1e-12)


def test_cp_inclusion_scale_invariant_and_errors():
    w = np.array([0.3, 2.0, 5.0, 0.01])
    np.testing.assert_allclose(P.cp_inclusion(w, 2), P.cp_inclusion(w * 1e200, 2), rtol=1e-12)
    with pytest.raises(ValueError):
        P.cp_inclusion([1.0, 0.0, 0.0], 2)           # fewer than k positive
    with pytest.raises(ValueError):
        P.cp_inclusion([np.inf, np.inf, 1.0], 1)     # more always-selected than k
    with pytest.raises(ValueError):
        P.cp_inclusion([1.0, 2.0], 0)


@pytest.mark.parametrize("k", [1, 2, 3, 4, 5, 6])
def test_fit_conditional_poisson_reproduces_pi(k):
    rng = np.random.default_rng(10 + k)
    for trial in range(6):
        n = int(rng.integers(k + 3, 64))
        pi = random_pi(rng, n, k, near_one=min(trial % 3, k - 1) if k > 1 else 0,
                       tiny=trial % 4)
        w = P.fit_conditional_poisson(pi, k)
        assert np.isfinite(w).all() and (w > 0).all()
        np.testing.assert_allclose(P.cp_inclusion(w, k), pi, rtol=0, atol=1e-8)
        # the returned scale: the Poisson design p = w/(1+w) has expected size k
        assert np.sum(w / (1 + w)) == pytest.approx(k, rel=1e-9)


def test_fit_conditional_poisson_vs_enumeration_small():
    # independent check of the fitted design: enumerate its subsets
    rng = np.random.default_rng(4)
    for n, k in [(5, 2), (6, 3), (7, 1), (8, 4)]:
        pi = random_pi(rng, n, k, near_one=1 if k > 1 else 0, tiny=1)
        w = P.fit_conditional_poisson(pi, k)
        np.testing.assert_allclose(bf_inclusion(w, k), pi, atol=1e-10)


def test_fit_conditional_poisson_ones_and_zeros():
    pi = np.array([1.0, 0.0, 0.7, 0.2, 1.0, 0.1, 0.0])        # k = 3
    w = P.fit_conditional_poisson(pi, 3)
    assert np.isinf(w[[0, 4]]).all()
    assert (w[[1, 6]] == 0).all()
    assert np.isfinite(w[[2, 3, 5]]).all()
    np.testing.assert_allclose(P.cp_inclusion(w, 3), pi, atol=1e-12)
    np.testing.assert_allclose(bf_inclusion(w, 3), pi, atol=1e-12)
    # all certain
    assert np.isinf(P.fit_conditional_poisson([1.0, 1.0, 0.0], 2)[:2]).all()


def test_fit_conditional_poisson_errors():
    with pytest.raises(ValueError):
        P.fit_conditional_poisson([0.5, 0.6], 1)             # sums to 1.1
    with pytest.raises(ValueError):
        P.fit_conditional_poisson([1.2, -0.2], 1)
    with pytest.raises(ValueError):
        P.fit_conditional_poisson([0.5, 0.5], 0)
    with pytest.raises(RuntimeError):
        P.fit_conditional_poisson([0.9, 0.05, 0.05], 1, tol=0.0, max_iter=0)


# ------------------------------------------------------------------------------------------------
# §3.4
# ------------------------------------------------------------------------------------------------

def test_poisson_binomial_vs_brute_force():
    rng = np.random.default_rng(5)
    for n in range(0, 10):
        p = rng.random(n)
        if n > 2:
            p[0], p[1] = 0.0, 1.0
        pmf = P.poisson_binomial(p)
        ref = np.zeros(n + 1)
        for bits in itertools.product([0, 1], repeat=n):
            ref[sum(bits)] += math.prod(pi if b else 1 - pi for pi, b in zip(p, bits))
        np.testing.assert_allclose(pmf, ref, rtol=1e-12, atol=1e-15)
        assert pmf.sum() == pytest.approx(1.0)
    np.testing.assert_allclose(P.poisson_binomial([0.5, 0.5]), [0.25, 0.5, 0.25])
    with pytest.raises(ValueError):
        P.poisson_binomial([1.5])


def random_pools(rng, n, parts):
    cuts = np.sort(rng.integers(0, n + 1, parts - 1))
    b = [0, *cuts.tolist(), n]
    return list(zip(b[:-1], b[1:]))


def test_pool_hit_distribution_vs_enumeration():
    for rng, n, k, w in weight_trials(6, n_min=2, decades=3, period=3):
        pools = random_pools(rng, n, int(rng.integers(1, 6)))
        dist = P.pool_hit_distribution(w, pools, k)
        ref: dict = {}
        for S, p in bf_cp_design(w, k):
            h = tuple(sum(a <= e < b for e in S) for a, b in pools)
            ref[h] = ref.get(h, 0.0) + p
        assert sum(dist.values()) == pytest.approx(1.0, abs=1e-12)
        for h in set(dist) | set(ref):
            assert dist.get(h, 0.0) == pytest.approx(ref.get(h, 0.0), rel=1e-9, abs=1e-13), h
        assert all(sum(h) == k for h in dist)


def test_pool_hit_distribution_hand_case():
    # k = 1: P(the one pick is in a pool) = its share of the weights
    d = P.pool_hit_distribution([3.0, 1.0, 1.0, 5.0], [(0, 1), (1, 3), (3, 4)], 1)
    assert d == pytest.approx({(1, 0, 0): 0.3, (0, 1, 0): 0.2, (0, 0, 1): 0.5})


def test_pool_hit_distribution_errors():
    with pytest.raises(ValueError):
        P.pool_hit_distribution([1, 1, 1], [(0, 1), (2, 3)], 1)     # gap
    with pytest.raises(ValueError):
        P.pool_hit_distribution([1, 1, 1], [(0, 2)], 1)             # does not cover
    with pytest.raises(ValueError):
        P.pool_hit_distribution([1, 0, 0], [(0, 3)], 2)


# ------------------------------------------------------------------------------------------------
# §3.5: delay model, expected makespan, planning
# ------------------------------------------------------------------------------------------------

def test_layer_makespan_formula():
    d = DelayModel(sm_read_s=3.0, exp_read_s=1.0, decode_s=2.0, matmul_s=0.5, workers=2,
                   bytes_F=10, bytes_sm=5, bytes_exp=2)
    # io = 3·(hE+hm) + 1·(hS+hm) = 3·2 + 1·2 = 8, + the last read expert's decode 2·ceil(1/2)
    # = 2 → 10; decodes 1+1+1+1 = 4 → 2·ceil(4/2) = 4; matmul 0.5·ceil(5/2) = 1.5
    assert d.layer_makespan({"F": 1, "C": 1, "S": 1, "E": 1, "miss": 1}) == pytest.approx(11.5)
    # compute-bound: 5 C hits, 2·ceil(5/2) = 6, + 0.5·3
    assert d.layer_makespan({"C": 5}) == pytest.approx(7.5)
    assert d.layer_makespan({"F": 2}) == pytest.approx(0.5)
    assert d.layer_makespan({}) == 0.0
    # decode split into 4 chunks: 0.5·ceil(3·4/2) = 3 against io 0
    d4 = DelayModel(3.0, 1.0, 2.0, 0.0, 2, 10, 5, 2, chunks=4)
    assert d4.layer_makespan({"C": 3}) == pytest.approx(3.0)
    assert d.tier_bytes() == {"F": 10, "C": 7, "S": 5, "E": 2, "miss": 0}
    assert d.plan_bytes(1, 2, 3, 4) == 10 + 14 + 15 + 8
    with pytest.raises(ValueError):
        d.layer_makespan({"X": 1})
    with pytest.raises(ValueError):
        DelayModel(-1.0, 1.0, 1.0, 1.0, 1, 1, 1, 1)
    with pytest.raises(ValueError):
        DelayModel(1.0, 1.0, 1.0, 1.0, 0, 1, 1, 1)


def test_delay_model_sides_and_matmul_time():
    d = DelayModel(sm_read_s=3.0, exp_read_s=1.0, decode_s=2.0, matmul_s=0.5, workers=2,
                   bytes_F=10, bytes_sm=5, bytes_exp=2)
    # 2 SM reads, 2 exponent reads: io = 3·2 + 1·2 + decode of the last read 2·ceil(1/2) = 10;
    # 4 decodes on 2 workers: 2·ceil(4/2) = 4
    io, comp = d.io_and_compute(4, 2, 2)
    assert (float(io), float(comp)) == (10.0, 4.0)
    # broadcast; nothing read: no decode tail on the io side
    io, comp = d.io_and_compute(np.array([0, 3]), np.array([0, 1]), 0)
    np.testing.assert_array_equal(io, [0.0, 5.0])
    np.testing.assert_array_equal(comp, [0.0, 4.0])
    assert d.matmul_time(0) == 0.0
    assert d.matmul_time(3) == 1.0          # 0.5·ceil(3/2)
    assert d.matmul_time(4) == 1.0


def test_lower_hull_hand_case():
    # (1, 5) is below the chord (0, 10)-(3, 0); (2, 4) lies above the chord (1, 5)-(3, 0)
    assert P.lower_hull(np.array([0.0, 1, 2, 3]), np.array([10.0, 5, 4, 0])) == [0, 1, 3]
    # collinear middle point dropped; one or two points kept as they are
    assert P.lower_hull(np.array([0.0, 1, 2]), np.array([2.0, 1, 0])) == [0, 2]
    assert P.lower_hull(np.array([0.0]), np.array([1.0])) == [0]


def test_package_exports_every_public_name():
    import importlib
    for name in P.__all__:
        assert hasattr(P, name), name
    # each module's public names are the ones the package re-exports (no second copy)
    for mod, names in {"conditional_poisson": ["fit_conditional_poisson", "cp_inclusion"],
                       "delay": ["DelayModel", "TIERS"], "frontier": ["layer_frontier"],
                       "locality": ["lru_pool_model", "ADMISSION_WINDOW"],
                       "plan": ["plan_model", "TierPlan"], "split": ["lower_hull"]}.items():
        m = importlib.import_module(f"zipmoe_rt.engine.planner.{mod}")
        for name in names:
            assert getattr(m, name) is getattr(P, name)
    assert P.ADMISSION_WINDOW == 16 and P.TIERS == ("F", "C", "S", "E", "miss")


def test_expected_layer_makespan_vs_enumeration():
    rng = np.random.default_rng(7)
    for trial in range(25):
        n = int(rng.integers(2, 8))
        k = int(rng.integers(1, n + 1))
        w = 10.0 ** rng.uniform(-2, 2, n)
        if trial % 5 == 0 and k > 1:
            w[0] = np.inf
        cuts = np.sort(rng.integers(0, n + 1, 4))
        counts = tuple(np.diff([0, *cuts.tolist()]).tolist())
        d = random_delay(rng, chunks=int(rng.integers(1, 3)))
        got = P.expected_layer_makespan(w, counts, k, d)
        assert got == pytest.approx(bf_expected_makespan(w, counts, k, d), rel=1e-10)


@pytest.mark.parametrize("step", [1, 2])
def test_layer_frontier_matches_reference(step):
    rng = np.random.default_rng(8 + step)
    for trial in range(6):
        n = int(rng.integers(3, 8))
        k = int(rng.integers(1, min(n, 4) + 1))
        pi = P.inclusion_probabilities(rng.pareto(1.0, n) + 0.01, k)
        w = P.fit_conditional_poisson(pi, k)
        d = random_delay(rng)
        t = P.layer_frontier(w, k, d, step=step)
        grid = set(range(0, n + 1, step)) | {n}
        expect = {c for c in itertools.product(range(n + 1), repeat=4) if sum(c) <= n
                  and all(b in grid for b in np.cumsum(c))}
        assert {tuple(c) for c in t.counts.tolist()} == expect
        for c, b, em in zip(t.counts, t.bytes, t.makespan_s):
            assert em == pytest.approx(P.expected_layer_makespan(w, tuple(c), k, d), rel=1e-10)
            assert b == d.plan_bytes(*c)


def test_plan_layer_hand_case():
    # N = 3, k = 1: CP with k = 1 picks expert i with probability π_i. One hit per token, L = 1;
    # a read expert's decode (2) follows its read:
    #   F: 0 + 0.5; C: max(0, 2) + .5 = 2.5; S: max(1 + 2, 2) + .5 = 3.5;
    #   E: max(4 + 2, 2) + .5 = 6.5; miss: max(4 + 1 + 2, 2) + .5 = 7.5.
    # Bytes F 4, C 3, S 2, E 1; budget 4 fits one F, or two S, or C+E, S+E+E, E+E+E, ...
    d = DelayModel(sm_read_s=4.0, exp_read_s=1.0, decode_s=2.0, matmul_s=0.5, workers=1,
                   bytes_F=4, bytes_sm=2, bytes_exp=1)
    # π = (.5, .3, .2):  F,miss,miss = .5·.5 + .5·7.5 = 4.0;  S,S,miss = .8·3.5 + .2·7.5 = 4.3;
    #   C,E,miss = 1.25 + 1.95 + 1.5 = 4.7;  S,E,E = .5·3.5 + .5·6.5 = 5.0;
    #   S,E,miss = 1.75 + 1.95 + 1.5 = 5.2;  C,miss,miss = 5.0;  E,E,E = 6.5  →  one F, 4.0
    plan = P.plan_layer([0.5, 0.3, 0.2], 1, 4, d)
    assert (plan.nF, plan.nC, plan.nS, plan.nE) == (1, 0, 0, 0)
    assert plan.predicted_makespan_s == pytest.approx(4.0)
    assert plan.bytes == 4
    # π = (.4, .35, .25):  F = .4·.5 + .6·7.5 = 4.7;  S,S = .75·3.5 + .25·7.5 = 4.5;
    #   S,E,E = .4·3.5 + .6·6.5 = 5.3;  C,E,miss = 1 + 2.275 + 1.875 = 5.15;
    #   C,miss,miss = 1 + .6·7.5 = 5.5  →  two S, 4.5
    plan = P.plan_layer([0.25, 0.4, 0.35], 1, 4, d)            # any order: ranked inside
    assert (plan.nF, plan.nC, plan.nS, plan.nE) == (0, 0, 2, 0)
    assert plan.predicted_makespan_s == pytest.approx(4.5)
    assert plan.tier_of_rank(3) == ["S", "S", "miss"]
    # budget 0: all miss, 7.5
    plan = P.plan_layer([0.5, 0.3, 0.2], 1, 0, d)
    assert (plan.nF, plan.nC, plan.nS, plan.nE, plan.bytes) == (0, 0, 0, 0, 0)
    assert plan.predicted_makespan_s == pytest.approx(7.5)


@settings(max_examples=40, deadline=None)
@given(st.integers(0, 2**32 - 1), st.integers(2, 6), st.floats(0, 1.2))
def test_plan_layer_respects_budget_and_is_optimal(seed, n, frac):
    rng = np.random.default_rng(seed)
    k = int(rng.integers(1, n + 1))
    pop = rng.pareto(1.0, n) + 1e-3
    pi = P.inclusion_probabilities(pop, k)
    d = random_delay(rng)
    budget = frac * n * d.bytes_F
    plan = P.plan_layer(pi, k, budget, d)
    assert plan.bytes <= budget
    assert plan.bytes == d.plan_bytes(plan.nF, plan.nC, plan.nS, plan.nE)
    w = P.fit_conditional_poisson(pi, k)
    best = min(P.expected_layer_makespan(w, c, k, d)
               for c in itertools.product(range(n + 1), repeat=4)
               if sum(c) <= n and d.plan_bytes(*c) <= budget)
    assert plan.predicted_makespan_s == pytest.approx(best, rel=1e-9)


def test_plan_layer_accepts_weights_and_errors():
    d = DelayModel(4.0, 1.0, 2.0, 0.5, 1, 4, 2, 1)
    w = P.fit_conditional_poisson([0.5, 0.3, 0.2], 1)
    a = P.plan_layer(w, 1, 4, d, is_w=True)
    b = P.plan_layer([0.5, 0.3, 0.2], 1, 4, d)
    assert (a.nF, a.nC, a.nS, a.nE, a.bytes) == (b.nF, b.nC, b.nS, b.nE, b.bytes) == (1, 0, 0, 0, 4)
    assert a.predicted_makespan_s == pytest.approx(b.predicted_makespan_s, rel=1e-12)
    with pytest.raises(ValueError):
        P.plan_layer([0.5, 0.3, 0.2], 1, -1, d)
    with pytest.raises(ValueError):
        P.plan_layer([0.5, 0.3, 0.2], 4, 10, d)


def small_trace(rng, layers, n, k, tokens=200):
    counts = np.zeros((layers, n), dtype=np.int64)
    for l in range(layers):
        p = rng.dirichlet(np.full(n, 0.5))
        for _ in range(tokens):
            counts[l, rng.choice(n, size=k, replace=False, p=p)] += 1
    return counts


def exhaustive_split(fronts, total):
    opt = math.inf
    for idx in itertools.product(*(range(len(f.bytes)) for f in fronts)):
        if sum(f.bytes[i] for f, i in zip(fronts, idx)) <= total:
            opt = min(opt, sum(f.makespan_s[i] for f, i in zip(fronts, idx)))
    return opt


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 2**32 - 1), st.floats(0, 1.1), st.sampled_from([1, 10**6]))
def test_plan_model_respects_budget_and_is_near_optimal(seed, frac, scale):
    rng = np.random.default_rng(seed)
    L, n, k = 3, 4, int(rng.integers(1, 3))
    counts = small_trace(rng, L, n, k)
    d0 = random_delay(rng)
    d = DelayModel(d0.sm_read_s, d0.exp_read_s, d0.decode_s, d0.matmul_s, d0.workers,
                   d0.bytes_F * scale, d0.bytes_sm * scale, d0.bytes_exp * scale)
    total = frac * L * n * d.bytes_F
    plan = P.plan_model(counts, k, total, d)
    assert len(plan.layers) == L
    assert plan.bytes <= total
    assert plan.predicted_makespan_s == pytest.approx(
        sum(p.predicted_makespan_s for p in plan.layers))
    # each layer's plan is what plan_layer picks for its own bytes (Pareto-optimal)
    pop = P.popularity_by_rank(counts)
    fronts = []
    for l, p in enumerate(plan.layers):
        pi = P.inclusion_probabilities(pop[l], k)
        alone = P.plan_layer(pi, k, p.bytes, d)
        assert alone.predicted_makespan_s == pytest.approx(p.predicted_makespan_s, rel=1e-9)
        fronts.append(P.layer_frontier(P.fit_conditional_poisson(pi, k), k, d).pareto())
    opt = exhaustive_split(fronts, total)
    if scale == 1:
        # integer bytes, budget < 65536: the DP works in single bytes and is exact
        assert plan.predicted_makespan_s == pytest.approx(opt, rel=1e-9)
    else:
        # quantised DP or greedy: OPT <= plan <= OPT + one convex-hull step's makespan gain
        step_gain = 0.0
        for f in fronts:
            h = P.lower_hull(f.bytes, f.makespan_s)
            if len(h) > 1:
                step_gain = max(step_gain, float(np.max(-np.diff(f.makespan_s[h]))))
        assert opt * (1 - 1e-9) <= plan.predicted_makespan_s <= opt + step_gain + 1e-12


def test_plan_model_extremes_and_errors():
    rng = np.random.default_rng(9)
    L, n, k = 4, 6, 2
    counts = small_trace(rng, L, n, k)
    d = DelayModel(sm_read_s=2.0, exp_read_s=0.7, decode_s=1.5, matmul_s=0.25, workers=2,
                   bytes_F=16, bytes_sm=8, bytes_exp=3)
    none = P.plan_model(counts, k, 0, d)
    assert all((p.nF, p.nC, p.nS, p.nE) == (0, 0, 0, 0) for p in none.layers)
    # all miss, k = 2 per token: io = 2·(2 + 0.7) = 5.4, + the last one's decode
    # 1.5·ceil(1/2) = 6.9 > decodes 1.5·ceil(2/2); + 0.25
    assert none.predicted_makespan_s == pytest.approx(L * 7.15)
    full = P.plan_model(counts, k, L * n * 16, d)
    # every expert the trace saw is F; the never-seen ones are left uncached (no gain, ties go
    # to fewer bytes)
    assert [(p.nF, p.nC, p.nS, p.nE) for p in full.layers] == [
        (int((row > 0).sum()), 0, 0, 0) for row in counts]
    assert full.predicted_makespan_s == pytest.approx(L * 0.25)
    layers, total = P.plan_model(counts, k, 100, d)          # unpacks as (layers, makespan)
    assert total < none.predicted_makespan_s and sum(p.bytes for p in layers) <= 100
    avg = P.plan_model(counts, k, 100, d, average=True)
    assert avg.bytes <= 100
    with pytest.raises(ValueError):
        P.plan_model(counts, k, -1, d)
    with pytest.raises(ValueError):
        P.plan_model(counts, k, 10, d, shape=(L, n + 1))
    with pytest.raises(ValueError):
        P.plan_model(counts[0], k, 10, d)
    with pytest.raises(ValueError):
        P.plan_model(counts, n + 1, 10, d)


def test_plan_model_realistic_size_runs():
    # N = 60 experts, L = 24 layers, top-4 (Qwen1.5-MoE-like); budget 40 % of BF16.
    rng = np.random.default_rng(11)
    L, n, k = 24, 60, 4
    counts = rng.multinomial(2000 * k, rng.dirichlet(np.full(n, 0.3)), size=L)
    d = DelayModel(sm_read_s=2e-3, exp_read_s=0.7e-3, decode_s=1.5e-3, matmul_s=0.2e-3,
                   workers=6, bytes_F=100, bytes_sm=50, bytes_exp=17)
    total = 0.4 * L * n * 100
    plan = P.plan_model(counts, k, total, d)
    assert total - 100 <= plan.bytes <= total           # the budget is (nearly) used up
    none = P.plan_model(counts, k, 0, d).predicted_makespan_s
    full = P.plan_model(counts, k, L * n * 100, d).predicted_makespan_s
    assert full < plan.predicted_makespan_s < none


# ------------------------------------------------------------------------------------------------
# §3.6: temporal locality, recency F pools
# ------------------------------------------------------------------------------------------------

def test_repeat_probability_hand_case():
    # 2 layers, k = 2; run A has 3 tokens, run B 2, run C 1 (no pair: contributes nothing)
    A = [[[0, 1], [0, 1]], [[1, 2], [2, 3]], [[1, 2], [0, 2]]]
    B = [[[3, 0], [1, 2]], [[0, 3], [3, 0]]]
    C = [[[0, 1], [2, 3]]]
    # layer 0: A {1,2}∩{0,1} = 1, {1,2}∩{1,2} = 2; B {0,3}∩{3,0} = 2  -> 5 of 6 selections
    # layer 1: A {2,3}∩{0,1} = 0, {0,2}∩{2,3} = 1; B {3,0}∩{1,2} = 0  -> 1 of 6
    assert P.repeat_probability([A, B, C]).tolist() == [5 / 6, 1 / 6]
    assert np.isnan(P.repeat_probability([C])).all()
    with pytest.raises(ValueError):
        P.repeat_probability([])
    with pytest.raises(ValueError):
        P.repeat_probability([[[0, 1], [1, 2]]])          # not [T, L, k]
    with pytest.raises(ValueError):
        P.repeat_probability([A, [[[0, 1, 2], [0, 1, 2]]]])   # runs disagree in k


def test_lru_pool_model_hand_case():
    # N = 4, k = 2, one run; warm start by popularity 0, 1, 2, 3
    run = [[0, 1], [2, 1], [2, 3], [3, 0]]
    m = P.lru_pool_model([np.array(run)], 4, 2, warm=[0, 1, 2, 3])
    # C = 0: all miss; C = 4: all hit
    assert m.hit_pmf[0].tolist() == [1, 0, 0] and m.miss_rate[0].tolist() == [.5] * 4
    assert m.hit_pmf[4].tolist() == [0, 0, 1] and m.miss_rate[4].tolist() == [0] * 4
    # C = 1: pool [0]; {0,1}: 0 hits, 1 evicts 0; {1,2}: 1 hits, 2 evicts 1; {2,3}: 2 hits,
    # 3 evicts 2; {0,3}: 3 hits, 0 evicts 3 -> one hit per token, each expert missed once
    assert m.hit_pmf[1].tolist() == [0, 1, 0] and m.miss_rate[1].tolist() == [.25] * 4
    # C = 2: pool [1, 0] (0 most recent); {0,1}: 2 hits -> [0, 1]; {1,2}: 1 hits -> [0, 1],
    # 2 evicts 0 -> [1, 2]; {2,3}: 2 hits, 3 evicts 1 -> [2, 3]; {0,3}: 3 hits, 0 evicts 2
    assert m.hit_pmf[2].tolist() == [0, .75, .25]
    assert m.miss_rate[2].tolist() == [.25, 0, .25, .25]
    # C = 3: pool [2, 1, 0]; two hits twice, then 3 evicts 0 (LRU after {0,1}, {1,2}) and
    # 0 comes back evicting 1
    assert m.hit_pmf[3].tolist() == [0, .5, .5]
    assert m.miss_rate[3].tolist() == [.25, 0, 0, .25]
    assert np.allclose(m.miss_rate.sum(axis=1), 2 - m.expected_hits())
    # the pool carries over between runs; without a warm start it begins empty
    cold = P.lru_pool_model([np.array(run[:2]), np.array(run[2:])], 4, 2)
    assert cold.hit_pmf[4].tolist() == [.25, .5, .25]   # 0 hits, then 1, 1, 2
    for bad in ([np.array([[0, 0]])], [np.array([[0, 4]])], [np.array([[0, 1, 2]])], []):
        with pytest.raises(ValueError):
            P.lru_pool_model(bad, 4, 2)


def test_lru_pool_model_admission_hand_case():
    # N = 3, k = 1, C = 1, empty start; window 16·1·1 selections (no halving in 7)
    run = np.array([[0], [0], [1], [0], [2], [2], [0]])
    adm = P.lru_pool_model([run], 3, 1, admission=True)
    # counts before each admission: 1 (count 1) vs 0 (2): refused; 2 (1, then 2) vs 0 (3, 3):
    # refused -> 0 stays and hits at tokens 1, 3, 6
    assert adm.hit_pmf[1].tolist() == [4 / 7, 3 / 7]
    assert (adm.miss_rate[1] * 7).tolist() == [1, 1, 2]
    # plain LRU: every miss replaces the pool's expert -> hits at tokens 1 and 5
    lru = P.lru_pool_model([run], 3, 1)
    assert lru.hit_pmf[1].tolist() == [5 / 7, 2 / 7]
    assert (lru.miss_rate[1] * 7).tolist() == [3, 1, 1]
    # halving: 20 uses of 0, then 1 twice: 0's count is 20 -> halved to 8 at the 16th selection
    # (then 4 more: 12), so 1 (2) is refused twice; C = 1, window 16
    run2 = np.array([[0]] * 20 + [[1]] * 2)
    m = P.lru_pool_model([run2], 3, 1, admission=True)
    assert m.hit_pmf[1].tolist() == [3 / 22, 19 / 22]


def test_locality_pool_model_formula_hand_case():
    pi = [0.8, 0.4, 0.6, 0.2]           # Σ = k = 2; sorted shares s = 0, .4, .7, .9, 1
    m = P.locality_pool_model(pi, 0.9, 2)
    # q(C) = max(s(C), ρ·min(C,k)/k + (1−ρ)·s(C−k)): C=1: max(.4, .45); C=2: max(.7, .9);
    # C=3: max(.9, .9 + .1·.4); C=4: max(1, .9 + .1·.7)
    q = np.array([0, .45, .9, .94, 1.0])
    assert m.expected_hits() == pytest.approx(2 * q)
    assert m.hit_pmf[2] == pytest.approx([.01, .18, .81])
    assert m.miss_rate[2] == pytest.approx(np.array(pi) * .1)
    # no locality: an LRU is credited with the static pool's hits
    static = P.locality_pool_model(pi, 0.0, 2)
    assert static.expected_hits() == pytest.approx(2 * np.array([0, .4, .7, .9, 1]))
    with pytest.raises(ValueError):
        P.locality_pool_model(pi, 1.5, 2)
    with pytest.raises(ValueError):
        P.locality_pool_model([0.5, 0.5, 0.5, 0.2], 0.3, 2)


def bf_lru_makespan(model, counts, k, delay):
    """Enumeration of layer_frontier_lru's model: hF ~ hit_pmf[nF]; the k − hF misses are the
    conditional Poisson design with weights odds(miss_rate[nF]); static tiers by miss rate."""
    nF, nC, nS, nE = counts
    u = model.miss_rate[nF]
    n = len(u)
    order = sorted(range(n), key=lambda e: (-u[e], e))
    tier = {e: rank_tiers(n, (0, nC, nS, nE))[r] for r, e in enumerate(order)}
    p = np.clip(u, 0, 1 - 1e-9)
    w = p / (1 - p)
    tot = norm = 0.0
    for h in range(k + 1):
        subs = list(itertools.combinations(range(n), k - h))
        ws = [math.prod(w[i] for i in S) for S in subs]
        if model.hit_pmf[nF, h] <= 0 or sum(ws) <= 0:
            continue
        norm += model.hit_pmf[nF, h]
        for S, x in zip(subs, ws):
            hits = {t: 0 for t in TIERS}
            hits["F"] = h
            for e in S:
                hits[tier[e]] += 1
            tot += model.hit_pmf[nF, h] * x / sum(ws) * delay.layer_makespan(hits)
    return tot / norm


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 2**32 - 1))
def test_layer_frontier_lru_matches_enumeration(seed):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(2, 6))
    k = int(rng.integers(1, n + 1))
    d = random_delay(rng, chunks=int(rng.integers(1, 3)))
    runs = [np.array([rng.choice(n, k, replace=False) for _ in range(int(rng.integers(1, 9)))])
            for _ in range(2)]
    models = [P.lru_pool_model(runs, n, k, warm=list(rng.permutation(n))),
              P.locality_pool_model(P.inclusion_probabilities(rng.random(n) + 0.01, k),
                                    float(rng.random()), k)]
    for m in models:
        f, orders = P.layer_frontier_lru(m, k, d)
        assert len(f.bytes) == (n + 1) * math.comb(n + 3, 3)   # every nF, every (nC, nS, nE)
        for c, b, em in zip(f.counts, f.bytes, f.makespan_s):
            assert b == d.plan_bytes(*c)
            assert em == pytest.approx(bf_lru_makespan(m, c, k, d), rel=1e-9, abs=1e-12)
        for C, o in enumerate(orders):
            u = m.miss_rate[C]
            assert list(o) == sorted(range(n), key=lambda e: (-u[e], e))
        pf, _ = P.layer_frontier_lru(m, k, d, pareto=True)
        assert set(map(tuple, pf.counts)) <= set(map(tuple, f.counts))
        # the per-capacity Pareto sets keep every globally Pareto-optimal plan
        full, part = f.pareto(), pf.pareto()
        assert np.allclose(full.bytes, part.bytes) and np.allclose(full.makespan_s, part.makespan_s)


@pytest.mark.parametrize("step", [2, 3])
def test_layer_frontier_lru_on_a_coarser_grid(step):
    # a coarser grid keeps exactly the plans whose pool boundaries lie on it, each with the
    # makespan every boundary's frontier gives the same plan
    rng = np.random.default_rng(40 + step)
    n, k = 7, 2
    d = random_delay(rng, chunks=2)
    runs = [np.array([rng.choice(n, k, replace=False) for _ in range(12)]) for _ in range(2)]
    m = P.lru_pool_model(runs, n, k, warm=list(rng.permutation(n)))
    full, _ = P.layer_frontier_lru(m, k, d)
    coarse, _ = P.layer_frontier_lru(m, k, d, step=step)
    grid = set(range(0, n + 1, step)) | {n}
    ref = {tuple(c): em for c, em in zip(full.counts.tolist(), full.makespan_s)}
    # the pool capacity nF and the static boundaries nC, nC + nS, nC + nS + nE on the grid
    want = {c for c in ref if c[0] in grid and all(b in grid for b in np.cumsum(c[1:]))}
    got = [tuple(c) for c in coarse.counts.tolist()]
    assert set(got) == want and len(got) == len(want) < len(ref)
    for c, em in zip(got, coarse.makespan_s):
        assert em == pytest.approx(ref[c], rel=1e-12, abs=1e-15)


def test_plan_step_keeps_every_boundary_below_64_experts():
    from zipmoe_rt.engine.profile import plan_step
    assert [plan_step(n) for n in (4, 8, 60, 63, 64, 128, 256, 384)] == [1, 1, 1, 1, 2, 4, 8, 12]


def test_plan_model_with_recency_pools():
    rng = np.random.default_rng(5)
    L, n, k = 3, 6, 2
    counts = small_trace(rng, L, n, k, tokens=60)
    d = DelayModel(sm_read_s=2.0, exp_read_s=0.7, decode_s=1.5, matmul_s=0.25, workers=2,
                   bytes_F=16, bytes_sm=8, bytes_exp=3)
    # sticky routing: every token repeats the previous one's experts -> an LRU of k is enough
    sticky = [P.lru_pool_model([np.tile(np.argsort(-counts[l])[:k], (50, 1))], n, k)
              for l in range(L)]
    plan = P.plan_model(counts, k, L * k * 16, d, fpool=sticky)
    assert [(p.nF, p.nC, p.nS, p.nE) for p in plan.layers] == [(k, 0, 0, 0)] * L
    assert all(sorted(p.order) == list(range(n)) for p in plan.layers)
    # the first token misses both (cold pool: io 2·(2 + 0.7) + the last one's decode 1.5 = 6.9),
    # the other 49 hit; + matmul 0.25
    assert plan.predicted_makespan_s == pytest.approx(L * (0.02 * 6.9 + 0.25))
    # trace-like pools: within budget, each layer's plan on its own Pareto frontier
    runs = [np.array([rng.choice(n, k, replace=False, p=counts[l] / counts[l].sum())
                      for _ in range(40)]) for l in range(L)]
    seqs = [np.stack(runs, axis=1)]
    models = [P.lru_pool_model([seqs[0][:, l]], n, k) for l in range(L)]
    for total in (0, 40, 100, L * n * 16):
        plan = P.plan_model(counts, k, total, d, fpool=models)
        assert plan.bytes <= total
        for m, p in zip(models, plan.layers):
            f, orders = P.layer_frontier_lru(m, k, d)
            i = [j for j, c in enumerate(f.counts) if tuple(c) == (p.nF, p.nC, p.nS, p.nE)]
            assert p.predicted_makespan_s == pytest.approx(f.makespan_s[i[0]])
            assert p.order == orders[p.nF]
            assert not ((f.bytes <= p.bytes) & (f.makespan_s < p.predicted_makespan_s * (1 - 1e-9))).any()
    with pytest.raises(ValueError):
        P.plan_model(counts, k, 100, d, fpool=models[:2])
    with pytest.raises(ValueError):
        P.plan_model(counts, k, 100, d, fpool=models, average=True)
    with pytest.raises(ValueError):
        P.layer_frontier_lru(P.FPoolModel(np.ones((n + 1, k)), np.zeros((n + 1, n))), k, d)
