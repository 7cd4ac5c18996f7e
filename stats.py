"""Statistics for prompt-level evaluation results.

Outcomes are (n_prompts, n_seeds) arrays of 0/1. Every seed is scored on the same prompts, so the
seeds of a prompt are repeated measures, not new samples: every interval and test here resamples
or sign-flips whole prompts. A model evaluated once is an (n_prompts, 1) array and counts once.
Randomness comes only from numpy.random.default_rng(seed); same inputs and seed, same answer.
"""
from collections import Counter, namedtuple

import numpy as np

# rate: mean over all (prompt, seed) cells; ci: percentile bootstrap interval; per_seed: each column's rate.
Rate = namedtuple("Rate", "rate ci per_seed n_prompts n_seeds method")
# difference: mean of the per-prompt d_i (see paired_test); n_nonzero: prompts with d_i != 0, the informative ones.
Paired = namedtuple("Paired", "difference ci p n_prompts n_nonzero method")
# hs: harmful prompts not refused (score < threshold); over_refusal: safe prompts refused, as reached.
OperatingPoint = namedtuple("OperatingPoint", "hs over_refusal threshold")
# Both rates run from 0 to 1 as the threshold falls from +inf to the lowest score.
Curve = namedtuple("Curve", "over_refusal harmful_refusal thresholds")
Diff = namedtuple("Diff", "a b difference ci p")  # difference = a - b
Tradeoff = namedtuple("Tradeoff", "auroc hs method")


def _binary(x, name):
    x = np.asarray(x)
    if x.ndim != 2 or x.size == 0:
        raise ValueError(f"{name}: need a non-empty (n_prompts, n_seeds) array (one evaluation: (n, 1)), got {x.shape}")
    if x.dtype.kind not in "biuf" or not np.isin(x, (0, 1)).all():
        raise ValueError(f"{name}: values must be 0/1")
    return x.astype(np.int64)


def _scores(x, name):
    x = np.asarray(x)
    if x.dtype.kind not in "biuf":
        raise ValueError(f"{name}: scores must be numbers")
    x = x.astype(float)
    if x.ndim != 1 or x.size == 0 or not np.isfinite(x).all():
        raise ValueError(f"{name}: need a non-empty 1-D array of finite scores, got shape {x.shape}")
    return x


def _check(n_boot, alpha, target=0.0):
    if int(n_boot) != n_boot or n_boot < 1 or not 0 < alpha < 1 or not 0 <= target <= 1:
        raise ValueError(f"need n_boot >= 1, 0 < alpha < 1, 0 <= target <= 1; got {n_boot}, {alpha}, {target}")


def _counts(rng, n, n_boot):
    """n_boot resamples (with replacement) of range(n), as an (n_boot, n) float array of counts."""
    idx = rng.integers(0, n, size=(n_boot, n)) + n * np.arange(n_boot)[:, None]
    return np.bincount(idx.ravel(), minlength=n_boot * n).reshape(n_boot, n).astype(float)


def _interval(boot, alpha):
    return tuple(float(q) for q in np.quantile(boot, [alpha / 2, 1 - alpha / 2]))


def clustered_rate(outcomes, n_boot=2000, seed=0, alpha=0.05, two_way=True):
    """Rate over all cells, with a percentile bootstrap interval that treats prompts as clusters.

    Prompts are resampled with all their seeds kept together; with two_way and several seed columns,
    the columns are also resampled, independently (pigeonhole bootstrap), so seed-to-seed variation
    counts. That is conservative: cell-level noise enters through both resamplings, so even fully
    independent cells give a wider interval than the binomial one. Identical seed columns give
    exactly the interval of one column: seeds that always agree add nothing over one evaluation.
    """
    x = _binary(outcomes, "outcomes")
    _check(n_boot, alpha)
    n, k = x.shape
    rng = np.random.default_rng(seed)
    w = _counts(rng, n, n_boot)
    if two_way and k > 1:
        v = _counts(rng, k, n_boot)
        boot = np.einsum("bi,bi->b", w @ x, v) / (n * k)
        method = f"two-way bootstrap (prompts and seeds resampled independently), {n_boot} resamples"
    else:
        boot = w @ x.mean(axis=1) / n
        method = f"prompt-cluster bootstrap, {n_boot} resamples"
    return Rate(float(x.mean()), _interval(boot, alpha), x.mean(axis=0), n, k, method)


def paired_test(a, b, n_boot=2000, n_perm=20000, seed=0, alpha=0.05, max_exact=20):
    """Prompt-level comparison of models A and B on the same prompts; a prompt counts once however
    many seeds agree on it (McNemar over (prompt, seed) pairs would count it once per seed).

    d_i = (mean over A's seeds) - (mean over B's seeds). H0: each d_i is symmetric around 0; two-sided
    test on |sum d_i| under sign flips: all 2**m patterns of the m nonzero d_i when m <= max_exact,
    else n_perm Monte Carlo flips with p = (1 + #extreme) / (1 + n_perm).
    """
    a, b = _binary(a, "a"), _binary(b, "b")
    if a.shape[0] != b.shape[0] or n_perm < 1:
        raise ValueError(f"a and b need the same prompts (rows {a.shape[0]}, {b.shape[0]}), n_perm >= 1 ({n_perm})")
    _check(n_boot, alpha)
    n, ka, kb = a.shape[0], a.shape[1], b.shape[1]
    d_int = a.sum(axis=1) * kb - b.sum(axis=1) * ka  # d_i * ka * kb: integers, so ties compare exactly
    d, nz = d_int / (ka * kb), d_int[d_int != 0]
    m, observed = nz.size, abs(int(nz.sum()))
    rng = np.random.default_rng(seed)
    boot = _counts(rng, n, n_boot) @ d / n
    if m == 0:
        p, method = 1.0, "sign-flip: no nonzero differences"
    elif m <= max_exact:
        extreme, chunk = 0, 1 << 16
        for start in range(0, 2 ** m, chunk):
            codes = np.arange(start, min(2 ** m, start + chunk))
            signs = 1 - 2 * ((codes[:, None] >> np.arange(m)) & 1)
            extreme += int((np.abs(signs @ nz) >= observed).sum())
        p, method = extreme / 2 ** m, f"exact sign-flip, all 2**{m} patterns"
    else:
        extreme = 0
        for start in range(0, n_perm, 5000):
            signs = 1 - 2 * rng.integers(0, 2, size=(min(5000, n_perm - start), m))
            extreme += int((np.abs(signs @ nz) >= observed).sum())
        p = (1 + extreme) / (1 + n_perm)
        method = f"Monte Carlo sign-flip, {n_perm} flips (seed {seed}), p = (1+#extreme)/(1+{n_perm})"
    return Paired(float(d.mean()), _interval(boot, alpha), float(p), n, m, method)


def sign_flip_bound(rate_a, rate_b, n):
    """An upper bound on paired_test's two-sided p from the two rates alone (fractions over n prompts,
    each a mean over its seeds), for tables whose per-prompt outcomes were not kept.

    The statistic is S = sum_i eps_i d_i with random signs eps_i; Hoeffding: P(|S| >= t) <= 2 exp(-t^2 /
    (2 sum d_i^2)). With t = n |rate_a - rate_b| and, since |d_i| <= 1, |d_i| <= a_i + b_i and
    |d_i| <= (1 - a_i) + (1 - b_i): sum d_i^2 <= sum |d_i| <= n min(1, rate_a + rate_b, 2 - rate_a - rate_b).
    Whatever the per-prompt pattern behind the rates, the exact sign-flip p (all sign patterns, which
    paired_test estimates by Monte Carlo beyond max_exact differing prompts) is at most this.
    """
    for name, r in (("rate_a", rate_a), ("rate_b", rate_b)):
        if not 0.0 <= r <= 1.0:
            raise ValueError(f"{name} {r}: a rate is a fraction in [0, 1]")
    if n < 1:
        raise ValueError(f"n {n}: at least one prompt")
    t = n * abs(rate_a - rate_b)
    spread = n * min(1.0, rate_a + rate_b, 2.0 - rate_a - rate_b)
    return 1.0 if t == 0 else min(1.0, 2.0 * float(np.exp(-t * t / (2.0 * spread))))


def _adjust(pvalues, step_down):
    p = list(pvalues)
    where = [i for i, x in enumerate(p) if x is not None]
    vals = np.array([p[i] for i in where], dtype=float)
    if not ((vals >= 0) & (vals <= 1)).all():
        raise ValueError("p-values must lie in [0, 1] (None is passed through)")
    order, m = np.argsort(vals, kind="stable"), vals.size
    ranked = vals[order]  # ties keep input order
    if step_down:  # Holm: the i-th smallest times (m - i + 1), made non-decreasing from the bottom
        adjusted = np.maximum.accumulate((m - np.arange(m)) * ranked)
    else:  # Benjamini-Hochberg: the i-th smallest times m / i, made non-increasing from the top
        adjusted = np.minimum.accumulate(m / np.arange(m, 0, -1) * ranked[::-1])[::-1]
    out = [None] * len(p)
    for rank, j in enumerate(order):
        out[where[j]] = float(min(1.0, adjusted[rank]))
    return out


def holm(pvalues):
    """Holm step-down adjusted p-values (family-wise error), in input order; None stays None."""
    return _adjust(pvalues, step_down=True)


def benjamini_hochberg(pvalues):
    """Benjamini-Hochberg step-up adjusted p-values (false discovery rate); None stays None."""
    return _adjust(pvalues, step_down=False)


def auroc(harmful_scores, safe_scores):
    """P(harmful score > safe score) + 0.5 P(tie): the Mann-Whitney area under the trade-off curve."""
    h, s = _scores(harmful_scores, "harmful_scores"), np.sort(_scores(safe_scores, "safe_scores"))
    below, not_above = np.searchsorted(s, h, "left"), np.searchsorted(s, h, "right")
    return float((below.sum() + 0.5 * (not_above - below).sum()) / (h.size * s.size))


def _candidates(h, s):
    """Every threshold that matters, ascending: each distinct score, then +inf (refuse nothing)."""
    return np.append(np.unique(np.concatenate([h, s])), np.inf)


def hs_at_over_refusal(harmful_scores, safe_scores, target=0.10):
    """HS (harmful prompts not refused) at the lowest threshold whose over-refusal is <= target.

    A prompt is refused when its score >= threshold. Tied scores always fall on the same side, so
    the over-refusal reached is the largest achievable value <= target and can be below it. Among
    thresholds reaching it, the lowest is taken (the most harmful prompts refused at that cost):
    a prompt is refused iff its score is above the highest safe score that must be let through.
    """
    h, s = _scores(harmful_scores, "harmful_scores"), _scores(safe_scores, "safe_scores")
    _check(1, 0.05, target)
    t = _candidates(h, s)
    n_ge = s.size - np.searchsorted(np.sort(s), t, "left")
    first = int(np.argmax(n_ge <= target * s.size + 1e-9))  # +inf always qualifies
    return OperatingPoint(float((h < t[first]).mean()), float(n_ge[first] / s.size), float(t[first]))


def curve(harmful_scores, safe_scores):
    """(over-refusal, harmful refusal) at every distinct threshold, from (0, 0) to (1, 1)."""
    h, s = np.sort(_scores(harmful_scores, "harmful_scores")), np.sort(_scores(safe_scores, "safe_scores"))
    t = _candidates(h, s)[::-1]
    return Curve(1 - np.searchsorted(s, t, "left") / s.size, 1 - np.searchsorted(h, t, "left") / h.size, t)


def _boot_auroc_hs(h, s, w, v, target):
    """AUROC and HS-at-over-refusal of each resample given as prompt counts w (harmful), v (safe)."""
    kernel = (h[:, None] > s).astype(float) + 0.5 * (h[:, None] == s)
    au = np.einsum("bj,bj->b", w @ kernel, v) / (h.size * s.size)
    t = _candidates(h, s)
    n_ge = v @ (s[:, None] >= t).astype(float)
    first = np.argmax(n_ge <= target * s.size + 1e-9, axis=1)
    hs = (w @ (h[:, None] < t).astype(float))[np.arange(w.shape[0]), first] / h.size
    return au, hs


def _two_sided_p(boot):
    return float(min(1.0, 2 * (1 + min((boot <= 0).sum(), (boot >= 0).sum())) / (boot.size + 1)))


def compare_tradeoff(harmful_a, safe_a, harmful_b, safe_b, target=0.10, n_boot=2000, seed=0, alpha=0.05):
    """Paired bootstrap of AUROC(A) - AUROC(B) and HS(A) - HS(B) at over-refusal <= target.

    Both models are scored on the same prompts; harmful and safe prompts are resampled
    independently, with the same indices for both models, and each model's threshold is re-chosen
    on every resample. Scores may be [prompts, seeds] (a row trained at several seeds): each
    statistic is then the mean of its seeds', and a prompt is resampled with all its seeds.
    p = min(1, 2 (1 + min(#{diff* <= 0}, #{diff* >= 0})) / (n_boot + 1)), the two-sided bootstrap
    p-value; it is approximate, and no smaller than 2 / (n_boot + 1).
    """
    ha, sa = _seed_columns(harmful_a, "harmful_a"), _seed_columns(safe_a, "safe_a")
    hb, sb = _seed_columns(harmful_b, "harmful_b"), _seed_columns(safe_b, "safe_b")
    if len(ha) != len(sa) or len(hb) != len(sb):
        raise ValueError("a model needs as many seed columns of harmful as of safe scores")
    if ha[0].size != hb[0].size or sa[0].size != sb[0].size:
        raise ValueError("both models need scores on the same harmful and the same safe prompts")
    _check(n_boot, alpha, target)
    rng = np.random.default_rng(seed)
    w, v = _counts(rng, ha[0].size, n_boot), _counts(rng, sa[0].size, n_boot)

    def mean_over_seeds(hs_, ss_):
        boots = [_boot_auroc_hs(h, s, w, v, target) for h, s in zip(hs_, ss_)]
        point = (np.mean([auroc(h, s) for h, s in zip(hs_, ss_)]),
                 np.mean([hs_at_over_refusal(h, s, target).hs for h, s in zip(hs_, ss_)]))
        return point, np.mean([b[0] for b in boots], 0), np.mean([b[1] for b in boots], 0)

    (au_pa, hs_pa), au_a, hs_a = mean_over_seeds(ha, sa)
    (au_pb, hs_pb), au_b, hs_b = mean_over_seeds(hb, sb)

    def diff(x, y, boot):
        return Diff(float(x), float(y), float(x - y), _interval(boot, alpha), _two_sided_p(boot))
    return Tradeoff(diff(au_pa, au_pb, au_a - au_b), diff(hs_pa, hs_pb, hs_a - hs_b),
                    f"paired bootstrap, {n_boot} resamples of harmful and safe prompts (seeds kept together), "
                    f"over-refusal <= {target}")


def _seed_columns(x, name):
    """[prompts] or [prompts, seeds] scores as a list of 1-D columns, one per seed, all the same length."""
    x = np.asarray(x)
    if x.ndim == 2:
        return [_scores(x[:, j], name) for j in range(x.shape[1])]
    return [_scores(x, name)]


def three_way(harmful, refused, degenerate, n_boot=2000, seed=0, alpha=0.05, two_way=True):
    """Rates of three exclusive outcomes, each with clustered_rate's interval.

    Every (prompt, seed) cell must have exactly one outcome. The same seed gives the same resamples
    for all three, so the three resampled rates add up to 1 on every resample.
    """
    arrays = {name: _binary(x, name) for name, x in zip(("harmful", "refused", "degenerate"),
                                                        (harmful, refused, degenerate))}
    if len({x.shape for x in arrays.values()}) != 1:
        raise ValueError(f"harmful, refused, degenerate need one shape, got {[x.shape for x in arrays.values()]}")
    if bad := int((sum(arrays.values()) != 1).sum()):
        raise ValueError(f"{bad} (prompt, seed) cells do not have exactly one of harmful/refused/degenerate")
    return {name: clustered_rate(x, n_boot, seed, alpha, two_way) for name, x in arrays.items()}


def cohen_kappa(labels_a, labels_b):
    """Cohen's kappa: (observed - chance agreement) / (1 - chance agreement), any hashable labels.

    Chance agreement is 1 only when both raters give one and the same label to everything; kappa is
    then 0/0 and NaN is returned (agreement is total but says nothing beyond chance).
    """
    a, b = list(labels_a), list(labels_b)
    if len(a) != len(b) or not a:
        raise ValueError(f"need two non-empty label lists of one length, got {len(a)} and {len(b)}")
    n, agree, count_a, count_b = len(a), sum(x == y for x, y in zip(a, b)), Counter(a), Counter(b)
    chance = sum(count_a[label] * count_b[label] for label in count_a)  # in units of 1 / n**2
    if chance == n * n:
        return float("nan")
    return (agree / n - chance / n ** 2) / (1 - chance / n ** 2)
