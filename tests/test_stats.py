"""stats.py against hand computations written out here, independently of the module's helpers."""
import itertools
import math
import time
from fractions import Fraction

import numpy as np
import pytest

import stats


def wilson_width(successes, n, z=1.959963984540054):
    p = successes / n
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return 2 * half


# --- (a) exact sign-flip on a tiny example --------------------------------------------------------

def test_exact_sign_flip_by_hand():
    a = [[1, 1, 1], [1, 1, 1], [1, 1, 1], [1, 1, 0], [1, 1, 1], [0, 0, 0]]  # three seeds
    b = [[0], [0], [0], [1], [1], [0]]                                      # one evaluation
    d = [Fraction(1), Fraction(1), Fraction(1), Fraction(-1, 3)]  # the last two prompts tie: d = 0
    observed = abs(sum(d))
    extreme = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed
                  for signs in itertools.product((1, -1), repeat=len(d)))
    assert extreme == 4  # +-(1+1+1) with either sign on -1/3
    r = stats.paired_test(a, b)
    assert r.p == pytest.approx(extreme / 2 ** 4) == pytest.approx(0.25)
    assert r.n_nonzero == 4 and r.n_prompts == 6 and "exact" in r.method
    assert r.difference == pytest.approx(float(sum(d)) / 6)
    assert r.ci[0] <= r.difference <= r.ci[1]


def exact_sign_flip_p(a, b):
    """All 2**n sign patterns of d_i = mean_a - mean_b, counted by brute force."""
    d = [Fraction(sum(x), len(x)) - Fraction(sum(y), len(y)) for x, y in zip(a, b)]
    observed = abs(sum(d))
    extreme = sum(abs(sum(s * x for s, x in zip(signs, d))) >= observed
                  for signs in itertools.product((1, -1), repeat=len(d)))
    return extreme / 2 ** len(d)


def test_sign_flip_bound_holds_over_random_tables_and_by_hand():
    # every prompt one way: exact p = 2 / 2**4; the bound 2 exp(-4**2 / (2 * 4 * min(1, 1, 1)))
    assert exact_sign_flip_p([[1]] * 4, [[0]] * 4) == 1 / 8
    assert stats.sign_flip_bound(1.0, 0.0, 4) == pytest.approx(2 * math.exp(-2))
    # 100 prompts at 10 % against 50 %: t = 40, sum d_i^2 <= 100 * 0.6
    assert stats.sign_flip_bound(0.1, 0.5, 100) == pytest.approx(2 * math.exp(-1600 / 120))
    # near 100 % the complements bound the spread: 0.95 and 0.75, t = 20, sum d_i^2 <= 100 * 0.3
    assert stats.sign_flip_bound(0.95, 0.75, 100) == pytest.approx(2 * math.exp(-400 / 60))
    assert stats.sign_flip_bound(0.3, 0.3, 50) == 1.0
    rng = np.random.default_rng(0)
    for _ in range(300):   # never below the exact p, whatever the pattern behind the rates
        n, ka, kb = int(rng.integers(3, 11)), int(rng.integers(1, 4)), int(rng.integers(1, 4))
        a = (rng.random((n, ka)) < rng.random()).astype(int)
        b = (rng.random((n, kb)) < rng.random()).astype(int)
        bound = stats.sign_flip_bound(a.mean(), b.mean(), n)
        assert bound >= exact_sign_flip_p(a.tolist(), b.tolist()) - 1e-12


# --- (b) pooled McNemar significant, prompt-level test not ------------------------------------------

def test_pooled_mcnemar_vs_prompt_level():
    a = np.zeros((20, 3), int)
    b = np.zeros((20, 3), int)
    a[:5] = 1                 # 5 prompts where A complies and B does not, at all 3 seeds
    a[5:12] = b[5:12] = 1     # concordant prompts (ties) on both sides
    discordant_ab, discordant_ba = 15, 0   # pooled over (prompt, seed) pairs
    n = discordant_ab + discordant_ba
    tail = sum(math.comb(n, k) for k in range(min(discordant_ab, discordant_ba) + 1)) / 2 ** n
    mcnemar_p = min(1.0, 2 * tail)
    assert mcnemar_p == pytest.approx(6.1e-5, rel=0.01) and mcnemar_p < 0.05
    r = stats.paired_test(a, b)
    assert r.n_nonzero == 5
    assert r.p == pytest.approx(2 / 32) and r.p > 0.05
    assert r.difference == pytest.approx(5 / 20)


def test_monte_carlo_sign_flip_matches_exact_distribution():
    rng = np.random.default_rng(3)
    a = (rng.random((40, 3)) < 0.55).astype(int)
    b = (rng.random((40, 1)) < 0.35).astype(int)
    # exact null distribution of sum(s_i * D_i), D_i = d_i * 3 (integers), by convolution with Python ints
    big_d = [int(x) for x in a.sum(1) - 3 * b[:, 0] if x != 0]
    assert len(big_d) > 20
    dist = {0: 1}
    for x in big_d:
        new = {}
        for total, ways in dist.items():
            for s in (x, -x):
                new[total + s] = new.get(total + s, 0) + ways
        dist = new
    observed = abs(sum(big_d))
    exact_p = sum(w for t, w in dist.items() if abs(t) >= observed) / 2 ** len(big_d)
    r = stats.paired_test(a, b, n_perm=20000, seed=1)
    assert "Monte Carlo" in r.method and "20000" in r.method and r.n_nonzero == len(big_d)
    assert abs(r.p - exact_p) < 0.015
    assert stats.paired_test(a, b, n_perm=20000, seed=1) == r  # fixed seed, same answer


# --- (c) multiplicity ------------------------------------------------------------------------------

def test_holm_and_bh_by_hand():
    p = [0.01, 0.04, 0.03, 0.005]
    # sorted: 0.005*4=0.02, 0.01*3=0.03, 0.03*2=0.06, 0.04*1=0.04 -> running max 0.06
    assert stats.holm(p) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    # BH: 0.005*4/1=0.02, 0.01*4/2=0.02, 0.03*4/3=0.04, 0.04*4/4=0.04
    assert stats.benjamini_hochberg(p) == pytest.approx([0.02, 0.04, 0.04, 0.02])


def test_holm_bh_none_monotone_and_cap():
    p = [0.04, 0.01, None, 0.03, 0.20]
    # m = 4. Holm: 0.01*4=0.04, 0.03*3=0.09, 0.04*2=0.08 -> 0.09, 0.20*1 -> 0.20
    assert stats.holm(p)[2] is None
    assert [x for x in stats.holm(p) if x is not None] == pytest.approx([0.09, 0.04, 0.09, 0.20])
    # BH: 0.01*4/1=0.04, 0.03*4/2=0.06, 0.04*4/3=0.0533, 0.20*4/4=0.20; from the top: 0.0533 caps 0.06
    bh = stats.benjamini_hochberg(p)
    assert bh[2] is None
    assert [x for x in bh if x is not None] == pytest.approx([0.16 / 3, 0.04, 0.16 / 3, 0.20])
    assert stats.holm([0.3, 0.5]) == pytest.approx([0.6, 0.6])
    assert stats.holm([0.6, 0.7]) == [1.0, 1.0]
    assert stats.benjamini_hochberg([0.9, 0.8]) == pytest.approx([0.9, 0.9])
    assert stats.holm([None]) == [None] and stats.holm([]) == []


# --- (d, e) trade-off curve ------------------------------------------------------------------------

def test_auroc_brute_force_with_ties():
    rng = np.random.default_rng(0)
    h = rng.integers(0, 6, 37).astype(float)
    s = rng.integers(0, 4, 29).astype(float)
    brute = 0.0
    for x in h:
        for y in s:
            brute += 1.0 if x > y else 0.5 if x == y else 0.0
    assert stats.auroc(h, s) == pytest.approx(brute / (len(h) * len(s)))
    assert stats.auroc([1, 1], [1, 1]) == 0.5


def test_hs_at_over_refusal_with_ties():
    safe = [0.1, 0.2, 0.2, 0.2, 0.5, 0.9, 0.9, 0.3, 0.1, 0.0]
    harmful = [0.95, 0.9, 0.92, 0.5, 1.0, 0.2]
    # 10% allows one safe refusal, but the top two safe scores tie at 0.9: the threshold must pass
    # them both. Lowest threshold above 0.9 is 0.92: refuses 0.92, 0.95, 1.0 -> HS 3/6, over-refusal 0.
    assert tuple(stats.hs_at_over_refusal(harmful, safe, 0.10)) == pytest.approx((0.5, 0.0, 0.92))
    assert tuple(stats.hs_at_over_refusal(harmful, safe, 0.0)) == pytest.approx((0.5, 0.0, 0.92))
    # 20% or 25%: the two 0.9s may be refused, 0.5 not: threshold 0.9 refuses 4 harmful -> HS 2/6
    for target in (0.2, 0.25):
        assert tuple(stats.hs_at_over_refusal(harmful, safe, target)) == pytest.approx((2 / 6, 0.2, 0.9))
    # 30%: 0.5, 0.9, 0.9 refused; threshold 0.5 -> HS 1/6
    assert tuple(stats.hs_at_over_refusal(harmful, safe, 0.3)) == pytest.approx((1 / 6, 0.3, 0.5))
    assert tuple(stats.hs_at_over_refusal(harmful, safe, 1.0)) == pytest.approx((0.0, 1.0, 0.0))
    # nothing above every safe score: threshold +inf, no harmful refused
    assert tuple(stats.hs_at_over_refusal([0.1, 0.2], [0.5, 0.5], 0.1)) == (1.0, 0.0, math.inf)


def test_curve_by_hand_and_area_is_auroc():
    c = stats.curve([2, 1], [1, 0])
    assert list(c.thresholds) == [math.inf, 2, 1, 0]
    assert list(c.over_refusal) == [0, 0, 0.5, 1]
    assert list(c.harmful_refusal) == [0, 0.5, 1, 1]
    rng = np.random.default_rng(1)
    h, s = rng.integers(0, 8, 50), rng.integers(0, 5, 40)
    c = stats.curve(h, s)
    assert (c.over_refusal[0], c.harmful_refusal[0], c.over_refusal[-1], c.harmful_refusal[-1]) == (0, 0, 1, 1)
    assert (np.diff(c.over_refusal) >= 0).all() and (np.diff(c.harmful_refusal) >= 0).all()
    area = sum((c.over_refusal[i + 1] - c.over_refusal[i]) * (c.harmful_refusal[i + 1] + c.harmful_refusal[i]) / 2
               for i in range(len(c.thresholds) - 1))
    assert area == pytest.approx(stats.auroc(h, s))


def test_bootstrap_replicates_match_brute_force_on_resamples():
    rng = np.random.default_rng(2)
    h, s = rng.integers(0, 7, 15).astype(float), rng.integers(0, 5, 12).astype(float)
    w = np.stack([np.bincount(rng.integers(0, 15, 15), minlength=15) for _ in range(6)]).astype(float)
    v = np.stack([np.bincount(rng.integers(0, 12, 12), minlength=12) for _ in range(6)]).astype(float)
    au, hs = stats._boot_auroc_hs(h, s, w, v, 0.25)
    for r in range(6):
        hr, sr = np.repeat(h, w[r].astype(int)), np.repeat(s, v[r].astype(int))
        pairs = [1.0 if x > y else 0.5 if x == y else 0.0 for x in hr for y in sr]
        assert au[r] == pytest.approx(sum(pairs) / len(pairs))
        # best HS by brute force: try every threshold, keep those with over-refusal <= 25%
        options = [np.mean(hr < t) for t in list(hr) + list(sr) + [math.inf] if np.mean(sr >= t) <= 0.25]
        assert hs[r] == pytest.approx(min(options))


def test_compare_tradeoff():
    rng = np.random.default_rng(4)
    h, s = rng.normal(1.5, 1, 200), rng.normal(0, 1, 150)
    same = stats.compare_tradeoff(h, s, h, s)
    assert same.auroc.difference == 0 and same.auroc.ci == (0, 0) and same.auroc.p == 1.0
    assert same.hs.p == 1.0
    worse_h = h * 0.3 + rng.normal(0, 1, 200)
    r = stats.compare_tradeoff(h, s, worse_h, s, target=0.1, n_boot=500, seed=7)
    assert r.auroc.a == pytest.approx(stats.auroc(h, s)) and r.auroc.difference > 0
    assert r.auroc.ci[0] > 0 and r.auroc.p < 0.01
    assert r.hs.difference < 0 and r.hs.ci[1] < 0
    assert r == stats.compare_tradeoff(h, s, worse_h, s, target=0.1, n_boot=500, seed=7)


def test_compare_tradeoff_averages_seed_columns_by_hand():
    # row a, two seeds: seed 0 separates perfectly (AUROC 1), seed 1 not at all: pairs (1,1) tie, (1,2) 0,
    # (2,1) 1, (2,2) tie → 2/4. At over-refusal <= 0.5 the threshold is 2: HS (h < 2) is 0 and 1/2.
    h_a, s_a = np.array([[3, 1], [4, 2]]), np.array([[1, 1], [2, 2]])
    h_b, s_b = [1, 2], [1, 2]                       # row b, one seed: AUROC 0.5, HS 0.5
    r = stats.compare_tradeoff(h_a, s_a, h_b, s_b, target=0.5, n_boot=200, seed=0)
    assert (r.auroc.a, r.auroc.b, r.auroc.difference) == (0.75, 0.5, 0.25)
    assert (r.hs.a, r.hs.b, r.hs.difference) == (0.25, 0.5, -0.25)
    with pytest.raises(ValueError, match="same harmful"):
        stats.compare_tradeoff(h_a, s_a, [1, 2, 3], s_b)


# --- (f) clustered intervals -----------------------------------------------------------------------

def test_clustered_wider_than_binomial_when_seeds_agree():
    rng = np.random.default_rng(0)
    x = np.repeat((rng.random((300, 1)) < 0.3).astype(int), 3, axis=1)
    r = stats.clustered_rate(x)
    naive = wilson_width(x.sum(), x.size)            # pretends 900 independent cells
    assert (r.ci[1] - r.ci[0]) / naive > 1.4          # roughly sqrt(3): 300 prompts, not 900
    one = stats.clustered_rate(x[:, :1])             # the same prompts evaluated once
    assert one.n_seeds == 1 and one.rate == pytest.approx(x[:, 0].mean())
    assert one.ci == pytest.approx(r.ci)             # identical seeds add nothing over one evaluation
    assert 0.85 < (one.ci[1] - one.ci[0]) / wilson_width(x[:, 0].sum(), 300) < 1.15


def test_clustered_about_binomial_when_seeds_independent():
    rng = np.random.default_rng(1)
    x = (rng.random((300, 3)) < 0.3).astype(int)
    naive = wilson_width(x.sum(), x.size)
    prompts = stats.clustered_rate(x, two_way=False)
    assert 0.85 < (prompts.ci[1] - prompts.ci[0]) / naive < 1.15
    two_way = stats.clustered_rate(x)  # also resamples seeds: conservative, never narrower here
    assert (two_way.ci[1] - two_way.ci[0]) >= (prompts.ci[1] - prompts.ci[0])
    assert list(two_way.per_seed) == pytest.approx(list(x.mean(0))) and two_way.rate == pytest.approx(x.mean())


def test_clustered_rate_is_fast_and_deterministic():
    x = (np.random.default_rng(2).random((313, 3)) < 0.4).astype(int)
    start = time.perf_counter()
    r = stats.clustered_rate(x, seed=5)
    assert time.perf_counter() - start < 1.0
    assert stats.clustered_rate(x, seed=5).ci == r.ci
    assert r.ci[0] < r.rate < r.ci[1]


def test_three_way():
    rng = np.random.default_rng(3)
    kind = rng.integers(0, 3, (50, 3))
    out = stats.three_way(kind == 0, kind == 1, kind == 2, n_boot=300)
    assert out["harmful"].rate == pytest.approx((kind == 0).mean())
    assert sum(r.rate for r in out.values()) == pytest.approx(1.0)
    with pytest.raises(ValueError, match="exactly one"):
        stats.three_way(kind == 0, kind == 0, kind == 2)


# --- (g) kappa ---------------------------------------------------------------------------------------

def test_cohen_kappa_by_hand():
    # 2x2 table: yes/yes 20, yes/no 5, no/yes 10, no/no 15 -> p_o 0.7, p_e 0.5*0.6+0.5*0.4 = 0.5, kappa 0.4
    a = ["yes"] * 25 + ["no"] * 25
    b = ["yes"] * 20 + ["no"] * 5 + ["yes"] * 10 + ["no"] * 15
    assert stats.cohen_kappa(a, b) == pytest.approx(0.4)
    # 3x3 table [[10,2,0],[1,8,1],[0,2,6]]: p_o 24/30, p_e (12*11+10*12+8*7)/900 -> kappa 412/592
    table = [[10, 2, 0], [1, 8, 1], [0, 2, 6]]
    cells = [(i, j) for i in range(3) for j in range(3) for _ in range(table[i][j])]
    assert stats.cohen_kappa([c[0] for c in cells], [c[1] for c in cells]) == pytest.approx(412 / 592)
    assert stats.cohen_kappa([1, 2, 3], [1, 2, 3]) == 1.0
    assert math.isnan(stats.cohen_kappa(["a", "a"], ["a", "a"]))  # chance agreement 1: undefined


# --- (h) bad input ----------------------------------------------------------------------------------

@pytest.mark.parametrize("call", [
    lambda: stats.clustered_rate(np.zeros((0, 3))),
    lambda: stats.clustered_rate([0, 1, 1]),                 # 1-D: ambiguous, needs (n, 1)
    lambda: stats.clustered_rate([[0, 2]]),
    lambda: stats.clustered_rate([[0.5, 1]]),
    lambda: stats.clustered_rate([[np.nan, 1]]),
    lambda: stats.clustered_rate([["a", "b"]]),
    lambda: stats.clustered_rate([[0, 1]], n_boot=0),
    lambda: stats.paired_test(np.zeros((3, 2)), np.zeros((4, 1))),
    lambda: stats.paired_test(np.zeros((3, 2)), np.zeros((3, 1)), n_perm=0),
    lambda: stats.three_way(np.ones((2, 2)), np.zeros((2, 3)), np.zeros((2, 2))),
    lambda: stats.holm([0.1, 1.5]),
    lambda: stats.benjamini_hochberg([float("nan")]),
    lambda: stats.auroc([], [1.0]),
    lambda: stats.auroc([1.0, np.inf], [1.0]),
    lambda: stats.hs_at_over_refusal([1.0], [0.0], target=1.5),
    lambda: stats.curve([[1.0]], [0.0]),
    lambda: stats.compare_tradeoff([1.0, 2.0], [0.0], [1.0], [0.0]),
    lambda: stats.cohen_kappa([1, 2], [1]),
    lambda: stats.cohen_kappa([], []),
    lambda: stats.sign_flip_bound(1.2, 0.5, 10),
    lambda: stats.sign_flip_bound(0.2, 0.5, 0),
])
def test_bad_input_raises_value_error(call):
    with pytest.raises(ValueError):
        call()
