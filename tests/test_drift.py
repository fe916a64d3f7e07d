"""Tests for kljax.drift: binning and histogram KL against NumPy, the permutation p-value against a
brute-force recomputation, its validity (false-alarm rate and uniformity under the null, over many
seeds), its power, the stream monitor, and the regression tests of issue 14 (an infinite statistic's
p-value, windows too small or non-finite, a NaN window under jit, range binning with inf)."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from kljax import discrete, drift, knn
from kljax.drift import (
    CategoricalKL,
    ClassifierKL,
    DriftMonitor,
    GaussianKL,
    HistogramKL,
    KnnGraphKL,
    KnnKL,
    adjust_p_values,
    energy_distance,
    expected_windows_to_false_alarm,
    permutation_test,
    bin_edges,
    bin_indices,
    feature_histogram_kl,
    kl_permutation_test,
    sustained_alarms,
)


def numpy_histogram_kl(x, y, edges, pseudocount):
    """Reference: numpy.histogram on values clipped into the edge range, smoothed, scipy's KL."""
    x = np.clip(np.asarray(x, np.float64), edges[0], edges[-1])
    y = np.clip(np.asarray(y, np.float64), edges[0], edges[-1])
    counts_x = np.histogram(x, edges)[0] + pseudocount
    counts_y = np.histogram(y, edges)[0] + pseudocount
    return scipy.stats.entropy(counts_x, counts_y)


def binomial_upper(rate, trials, sigmas=3.0):
    return rate + sigmas * math.sqrt(rate * (1 - rate) / trials)


# ------------------------------------------------------------------------------------------------
# Binning and the histogram statistic


def test_bin_edges_match_numpy():
    rng = np.random.default_rng(0)
    reference = rng.normal(size=(101, 3))
    edges = np.asarray(bin_edges(jnp.asarray(reference), 5))
    np.testing.assert_allclose(edges, np.quantile(reference, np.linspace(0, 1, 6), axis=0).T, rtol=1e-12)
    edges = np.asarray(bin_edges(jnp.asarray(reference), 4, binning="range"))
    expected = np.stack([np.linspace(reference[:, j].min(), reference[:, j].max(), 5) for j in range(3)])
    np.testing.assert_allclose(edges, expected, rtol=1e-12)
    assert bin_edges(jnp.ones(5, jnp.float32), 3).dtype == jnp.float32


def test_bin_indices_match_numpy_with_out_of_range_to_edge_bins():
    rng = np.random.default_rng(1)
    edges = np.array([-1.0, -0.2, 0.0, 0.5, 1.5])
    values = np.concatenate([rng.normal(size=200) * 2, edges, [-np.inf, np.inf]])
    expected = np.clip(np.searchsorted(edges, values, side="right") - 1, 0, len(edges) - 2)
    np.testing.assert_array_equal(np.asarray(bin_indices(jnp.asarray(values), jnp.asarray(edges))), expected)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
@pytest.mark.parametrize("pseudocount", [0.5, 1.0])
def test_feature_histogram_kl_matches_numpy(dtype, pseudocount):
    rng = np.random.default_rng(2)
    x = rng.normal(size=(300, 4))
    y = rng.normal(0.3, 1.4, size=(150, 4))  # wider: many values outside the reference's edges
    edges = np.quantile(x, np.linspace(0, 1, 9), axis=0).T
    result = feature_histogram_kl(jnp.asarray(x, dtype), jnp.asarray(y, dtype), jnp.asarray(edges, dtype),
                                  pseudocount=pseudocount)
    expected = [numpy_histogram_kl(x[:, j], y[:, j], edges[j], pseudocount) for j in range(4)]
    assert result.dtype == dtype and result.shape == (4,)
    np.testing.assert_allclose(np.asarray(result), expected, rtol=1e-5 if dtype == jnp.float32 else 1e-10)
    # the same number as kljax.discrete.histogram_kl with these edges, one feature at a time
    for j in range(4):
        single = discrete.histogram_kl(jnp.asarray(x[:, j]), jnp.asarray(y[:, j]), bins=jnp.asarray(edges[j]),
                                       pseudocount=pseudocount)
        np.testing.assert_allclose(float(single), expected[j], rtol=1e-10)


def test_feature_histogram_kl_plug_in_is_inf_on_an_empty_bin_and_nan_under_jit():
    x, y, edges = jnp.array([0.1, 0.7]), jnp.array([0.1, 0.2]), jnp.array([0.0, 0.5, 1.0])
    assert np.isinf(float(feature_histogram_kl(x, y, edges, pseudocount=0.0)))
    jitted = jax.jit(feature_histogram_kl)
    assert np.isnan(float(jitted(x.at[0].set(jnp.nan), y, edges)))


# ------------------------------------------------------------------------------------------------
# The permutation test


def _brute_force_p_value(key, x, y, statistic, num_permutations):
    """Recomputes the test with the same permutation keys, in NumPy, one permutation at a time."""
    pooled = np.concatenate([np.asarray(x), np.asarray(y)])
    n = len(x)
    keys = jax.vmap(lambda b: jax.random.fold_in(key, b))(jnp.arange(1, num_permutations + 1))
    observed = statistic(pooled[:n], pooled[n:])
    orders = np.asarray(jax.vmap(lambda k: jax.random.permutation(k, len(pooled)))(keys))
    exceed = sum(statistic(pooled[order[:n]], pooled[order[n:]]) >= observed for order in orders)
    return observed, (1 + exceed) / (1 + num_permutations)


def _mean_difference(x, y):
    return np.mean(x) - np.mean(y)


def _jnp_mean_difference(x, y):
    return jnp.mean(x) - jnp.mean(y)


def test_p_value_matches_brute_force():
    rng = np.random.default_rng(3)
    x, y = rng.normal(size=30), rng.normal(0.4, 1.0, size=20)
    key = jax.random.key(4)
    statistic, p_value = kl_permutation_test(key, jnp.asarray(x), jnp.asarray(y), estimator=_jnp_mean_difference,
                                             num_permutations=60, chunk_size=16)  # 4 chunks, the last padded
    expected_statistic, expected_p = _brute_force_p_value(key, x, y, _mean_difference, 60)
    np.testing.assert_allclose(float(statistic), expected_statistic, rtol=1e-12)
    assert float(p_value) == pytest.approx(expected_p, abs=1e-12)


# Shared shapes and settings, so that the tests reuse compiled programs.
N, M, D, B = 40, 30, 2, 49


def _samples(seed, shift=0.5, dtype=jnp.float64):
    rng = np.random.default_rng(seed)
    return (jnp.asarray(rng.normal(size=(N, D)), dtype), jnp.asarray(rng.normal(shift, 1.0, size=(M, D)), dtype))


def test_histogram_statistic_is_the_direct_estimate_and_p_value_matches_brute_force():
    x, y = _samples(5)
    edges = np.quantile(np.random.default_rng(6).normal(size=(500, D)), np.linspace(0, 1, 7), axis=0).T
    key = jax.random.key(6)
    statistic, p_value = kl_permutation_test(key, x, y, estimator="histogram", edges=jnp.asarray(edges),
                                             num_permutations=B)
    direct = feature_histogram_kl(x, y, jnp.asarray(edges))
    np.testing.assert_allclose(np.asarray(statistic), np.asarray(direct), rtol=1e-12)
    for j in range(D):
        numpy_statistic = functools.partial(lambda a, b, j: numpy_histogram_kl(a[:, j], b[:, j], edges[j], 0.5), j=j)
        _, expected_p = _brute_force_p_value(key, np.asarray(x), np.asarray(y), numpy_statistic, B)
        assert float(p_value[j]) == pytest.approx(expected_p, abs=1e-12)
    # without edges, the bins come from the pooled sample (a symmetric function of the pool)
    statistic, _ = kl_permutation_test(key, x, y, estimator="histogram", bins=6, num_permutations=B)
    pooled_edges = bin_edges(jnp.concatenate([x, y]), 6)
    np.testing.assert_allclose(np.asarray(statistic), np.asarray(feature_histogram_kl(x, y, pooled_edges)),
                               rtol=1e-12)


def numpy_wkv(x, y, k):
    """WKV 2009 eq. 5 by brute force in NumPy: d / n sum log(nu_k / rho_k) + log(m / (n - 1))."""
    from scipy.spatial.distance import cdist
    x, y = np.asarray(x).reshape(len(x), -1), np.asarray(y).reshape(len(y), -1)
    rho = np.sort(cdist(x, x) + np.diag(np.full(len(x), np.inf)), axis=1)[:, k - 1]
    nu = np.sort(cdist(x, y), axis=1)[:, k - 1]
    return x.shape[1] * np.mean(np.log(nu / rho)) + np.log(len(y) / (len(x) - 1))


def test_knn_neighbour_lists_equal_a_fresh_search_on_every_split():
    # Each re-split reads the k-th neighbours of each label off the pooled neighbour lists; a NumPy
    # search on every re-split (same keys) must give the same statistic and p-value, for several k.
    x, y = _samples(21, shift=0.2)
    for k in (4,):
        statistic, p_value = kl_permutation_test(jax.random.key(3), x, y, estimator="knn", k=k, num_permutations=B)
        expected_statistic, expected_p = _brute_force_p_value(jax.random.key(3), x, y,
                                                              functools.partial(numpy_wkv, k=k), B)
        np.testing.assert_allclose(float(statistic), expected_statistic, rtol=1e-10)
        assert float(p_value) == pytest.approx(expected_p, abs=1e-12)
    # the symmetric statistic: both directions
    statistic, p_value = permutation_test(jax.random.key(3), KnnKL(4, symmetric=True), x, y, num_permutations=B)
    expected_statistic, expected_p = _brute_force_p_value(
        jax.random.key(3), x, y, lambda a, b: numpy_wkv(a, b, 4) + numpy_wkv(b, a, 4), B)
    np.testing.assert_allclose(float(statistic), expected_statistic, rtol=1e-10)
    assert float(p_value) == pytest.approx(expected_p, abs=1e-12)


def test_knn_short_lists_are_patched_by_a_fresh_search_or_give_nan(monkeypatch):
    # Lists too short for some points (probability ~1e-9 per point at the real length; forced here):
    # each such point is searched afresh, up to drift._PATCHED_ROWS per re-split; beyond that, NaN.
    x, y = _samples(23, shift=0.2)
    y = y.at[0].set(x[0])  # a copy, so the patch also counts copies
    pooled = np.concatenate([np.asarray(x), np.asarray(y)])
    labels = np.stack([np.random.default_rng(seed).permutation(N + M) < N for seed in range(40)])
    for statistic in (KnnKL(3), KnnKL(2, symmetric=True)):
        monkeypatch.setattr(KnnKL, "list_length", lambda self, n, m: 9)
        fast = np.asarray(statistic.evaluate(statistic.prepare(x, y), jnp.asarray(labels)))
        monkeypatch.undo()
        direct = np.array([float(drift._statistic_only(statistic, jnp.asarray(pooled[lab]), jnp.asarray(pooled[~lab])))
                           for lab in labels])
        patched = ~np.isnan(fast)
        assert 5 <= patched.sum() < len(labels)  # both outcomes occur
        np.testing.assert_allclose(fast[patched], direct[patched], rtol=1e-12)


def test_knn_copy_is_scored_by_the_tie_rule_eagerly_and_under_jit():
    # A point copied across the samples: with k = 1 every re-split keeping both copies apart had nu = 0
    # (log 0) before; knn's ties="auto" rule skips the copy and corrects the order (WKV 2009, Sec. III).
    x, y = _samples(22)
    y = y.at[0].set(x[0])
    statistic, p_value = kl_permutation_test(jax.random.key(0), x, y, estimator="knn", k=1, num_permutations=B)
    assert np.isfinite(float(statistic)) and np.isfinite(float(p_value))
    np.testing.assert_allclose(float(statistic), float(knn.kl(x, y, k=1, estimator="wkv")), rtol=1e-10)
    jitted = jax.jit(functools.partial(kl_permutation_test, estimator="knn", k=1, num_permutations=B))
    np.testing.assert_allclose(np.asarray(jitted(jax.random.key(0), x, y)), [statistic, p_value], rtol=1e-10)


@pytest.mark.parametrize("estimator", ["histogram", "knn"])
def test_chunk_size_does_not_change_the_result(estimator):
    x, y = _samples(9, shift=0.3)
    results = [kl_permutation_test(jax.random.key(1), x, y, estimator=estimator, num_permutations=B, bins=6,
                                   chunk_size=chunk) for chunk in (None, 7)]  # the default; 8 chunks, padded
    statistic, p_value = results[1]
    np.testing.assert_allclose(np.asarray(statistic), np.asarray(results[0][0]), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(p_value), np.asarray(results[0][1]))
    if estimator == "knn":  # the default statistic is WKV 2009 eq. 5 with k = min(10, n - 1, m - 1)
        np.testing.assert_allclose(float(statistic), float(knn.kl(x, y, k=10, estimator="wkv")), rtol=1e-10)


@pytest.mark.parametrize("estimator", ["histogram", "knn"])
def test_float32_in_float32_out_under_jit_and_nan_for_nan_input(estimator):
    x, y = _samples(10, shift=0.0)
    test = functools.partial(kl_permutation_test, estimator=estimator, num_permutations=B, bins=6)
    reference_statistic, reference_p = test(jax.random.key(2), x, y)  # float64, eager
    jitted = jax.jit(test)
    statistic, p_value = jitted(jax.random.key(2), x.astype(jnp.float32), y.astype(jnp.float32))
    assert statistic.dtype == jnp.float32 and p_value.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(statistic), np.asarray(reference_statistic), rtol=1e-4, atol=1e-6)
    # p-values agree up to float32 ties (at most a couple of permutations out of B)
    np.testing.assert_allclose(np.asarray(p_value), np.asarray(reference_p), atol=2.5 / (B + 1))
    # the smallest attainable p-value is 1 / (B + 1), never 0 (Phipson and Smyth 2010)
    assert float(jnp.min(reference_p)) >= 1 / (B + 1) - 1e-12
    # a NaN sample cannot raise under jit; it must not give a finite p-value
    statistic, p_value = jitted(jax.random.key(2), x.astype(jnp.float32), y.astype(jnp.float32).at[0, 0].set(jnp.nan))
    assert np.all(np.isnan(np.asarray(p_value))) and np.all(np.isnan(np.asarray(statistic)))


def test_bad_input_raises_eagerly():
    x, y = jnp.zeros((10, 2)), jnp.ones((5, 2))
    key = jax.random.key(0)
    with pytest.raises(ValueError, match="estimator"):
        kl_permutation_test(key, x, y, estimator="mmd")
    with pytest.raises(ValueError, match="same number of features"):
        kl_permutation_test(key, x, jnp.ones((5, 3)))
    with pytest.raises(ValueError, match="`y` contains NaN"):
        kl_permutation_test(key, x, y.at[0, 0].set(jnp.nan), estimator="histogram")
    with pytest.raises(ValueError, match="num_permutations"):
        kl_permutation_test(key, x, y, num_permutations=0)
    with pytest.raises(TypeError, match="floating"):
        kl_permutation_test(key, jnp.zeros((10, 2), int), y)
    with pytest.raises(ValueError, match="`k`=3"):
        kl_permutation_test(key, x, y[:2], estimator="knn", k=3)
    # kNN-only options with another statistic are refused, never silently ignored
    for options in ({"estimator": "gaussian", "k": 3}, {"estimator": "energy", "knn_estimator": "weighted"},
                    {"estimator": "classifier", "k": 5}):
        with pytest.raises(ValueError, match="applies to estimator='knn' only"):
            kl_permutation_test(key, x, y, **options)
    with pytest.raises(ValueError, match="non-decreasing"):
        kl_permutation_test(key, x, y, estimator="histogram", edges=jnp.array([[0.0, 1.0, 0.5]] * 2))
    with pytest.raises(ValueError, match="`edges` has 3 rows"):
        kl_permutation_test(key, x, y, estimator="histogram", edges=jnp.zeros((3, 4)))


# ------------------------------------------------------------------------------------------------
# Validity and power over many seeds (vmapped; lax.map over seed chunks bounds the memory)


@functools.partial(jax.jit, static_argnames=("estimator", "num_seeds"))
def _p_values_over_seeds(shift, *, estimator, num_seeds):
    """p-values of N(0, I) samples (n = 40) against N(shift, I) samples (m = 30), d = 2, B = 99."""
    def one_seed(key):
        kx, ky, kp = jax.random.split(key, 3)
        x = jax.random.normal(kx, (N, D))
        y = jax.random.normal(ky, (M, D)) + shift
        return kl_permutation_test(kp, x, y, estimator=estimator, num_permutations=99, bins=8)[1]

    keys = jax.random.split(jax.random.key(11), num_seeds)
    return jax.lax.map(one_seed, keys, batch_size=100)


@pytest.mark.slow
def test_knn_p_value_is_uniform_under_the_null_and_has_power():
    # Continuous statistic, B + 1 = 100: P(p <= j / 100) = j / 100 exactly (Phipson and Smyth 2010).
    num_seeds = 1000
    p_values = np.asarray(_p_values_over_seeds(0.0, estimator="knn", num_seeds=num_seeds))
    for level in (0.05, 0.1, 0.5):
        rate = np.mean(p_values <= level + 1e-9)
        sigma = math.sqrt(level * (1 - level) / num_seeds)
        assert abs(rate - level) <= 4 * sigma, (level, rate)
    # a clear shift (KL = 1.125 nats) is found nearly always
    p_values = np.asarray(_p_values_over_seeds(1.5, estimator="knn", num_seeds=num_seeds))
    assert np.mean(p_values <= 0.05) >= 0.95


@pytest.mark.slow
def test_histogram_false_alarm_rate_is_at_most_alpha_and_has_power():
    # Per-feature p-values; ties can only make the test conservative, so test the upper bound and
    # that it is not uselessly conservative.
    num_seeds = 1000
    p_values = np.asarray(_p_values_over_seeds(0.0, estimator="histogram", num_seeds=num_seeds))
    for level in (0.05, 0.1):
        rate = np.mean(p_values <= level + 1e-9, axis=0)
        assert np.all(rate <= binomial_upper(level, num_seeds)), (level, rate)
        assert np.all(rate >= level - 5 * math.sqrt(level * (1 - level) / num_seeds)), (level, rate)
    p_values = np.asarray(_p_values_over_seeds(1.5, estimator="histogram", num_seeds=num_seeds))
    assert np.mean(p_values <= 0.05) >= 0.95


# ------------------------------------------------------------------------------------------------
# The monitor


def test_sustained_alarms_match_brute_force():
    rng = np.random.default_rng(12)
    significant = rng.random(200) < 0.5
    for consecutive in (1, 2, 3):
        expected = [t >= consecutive - 1 and all(significant[t - consecutive + 1:t + 1]) for t in range(200)]
        np.testing.assert_array_equal(np.asarray(sustained_alarms(jnp.asarray(significant), consecutive)), expected)


def _stream(seed, num_clean, num_shifted, shift, m=100, d=3):
    """Windows (T, m, d) of N(0, I), the last ``num_shifted`` shifted by ``shift`` in every feature."""
    shifts = np.concatenate([np.zeros(num_clean), np.full(num_shifted, shift)])
    return jnp.asarray(np.random.default_rng(seed).normal(size=(len(shifts), m, d)) + shifts[:, None, None])


# One monitor configuration (reference (300, 3), windows (100, 3), alpha 0.05, 8 bins) for all tests.
def _monitor(seed, estimator="histogram"):
    return DriftMonitor(jax.random.normal(jax.random.key(seed), (300, 3)), estimator=estimator, alpha=0.05, bins=8)


@pytest.mark.parametrize("estimator", ["histogram", "knn", "knn_graph"])
def test_monitor_quiet_before_and_alarms_after_a_shift(estimator):
    monitor = _monitor(13, estimator)
    windows = _stream(14, 6, 4, 1.0)
    scores, alarms = monitor.run(jax.random.key(15), windows)
    assert not np.any(np.asarray(alarms[:6]))
    assert np.all(np.asarray(alarms[7:]))  # 2 consecutive significant windows: alarm from the 2nd on
    # the stateful update gives the same as run
    state, step_alarms = monitor.init(), []
    for key, window in zip(jax.random.split(jax.random.key(15), 10), windows):
        state, score = monitor.update(state, key, window)
        step_alarms.append(bool(state.alarm))
    np.testing.assert_array_equal(step_alarms, np.asarray(alarms))
    np.testing.assert_allclose(np.asarray(score.p_value), np.asarray(scores.p_value[-1]))


def test_monitor_histogram_uses_bonferroni_and_fixed_reference_bins():
    from kljax import drift

    monitor = _monitor(13)
    reference = jax.random.normal(jax.random.key(13), (300, 3))
    assert monitor.num_permutations == math.ceil(5 * 3 / 0.05) - 1
    np.testing.assert_allclose(np.asarray(monitor.edges), np.asarray(bin_edges(reference[0::2], 8)))
    before = drift._score._cache_size()
    for seed in range(3):
        window = jax.random.normal(jax.random.key(17 + seed), (100, 3))
        score = monitor.score(jax.random.key(18), window)
        assert score.p_value.shape == (3,)
        assert float(score.window_p_value) == pytest.approx(min(1.0, 3 * float(jnp.min(score.p_value))))
        np.testing.assert_allclose(np.asarray(score.statistic),
                                   np.asarray(feature_histogram_kl(reference[1::2], window, monitor.edges)),
                                   rtol=1e-12)
    # a new reference with the same configuration reuses the compiled program (the monitor is a pytree)
    other = _monitor(99)
    other.score(jax.random.key(0), window)
    assert drift._score._cache_size() - before <= 1
    with pytest.raises(ValueError, match="could never alarm"):
        DriftMonitor(reference, estimator="histogram", alpha=0.05, num_permutations=50)
    with pytest.raises(ValueError, match="window"):
        monitor.score(jax.random.key(0), jnp.zeros((10, 4)))


@pytest.mark.slow
def test_monitor_false_alarm_rate_under_no_drift():
    # Independent (reference, stream) pairs of one feature: per-window P(significant) <= alpha and
    # P(alarm) <= alpha are the guarantees; 2 significant windows in a row should make alarms much
    # rarer (about alpha^2 for independent windows). The windows of one stream share the reference,
    # so the tolerance counts streams, not windows, as independent trials.
    num_streams, num_windows, alpha = 150, 4, 0.05
    significant, alarms = [], []
    for seed in range(num_streams):
        rng = np.random.default_rng(seed)
        monitor = DriftMonitor(jnp.asarray(rng.normal(size=300)), estimator="histogram", alpha=alpha, bins=8)
        scores, stream_alarms = monitor.run(jax.random.key(seed), jnp.asarray(rng.normal(size=(num_windows, 100))))
        significant.append(np.asarray(scores.significant))
        alarms.append(np.asarray(stream_alarms))
    significant_rate, alarm_rate = float(np.mean(significant)), float(np.mean(alarms))
    assert significant_rate <= binomial_upper(alpha, num_streams), significant_rate
    assert alarm_rate <= alpha / 2, alarm_rate


# ------------------------------------------------------------------------------------------------
# Issue 14: wrong answers in corners (regression tests)


def _always_infinite(x, y):
    return jnp.sum(x) * 0 + jnp.inf


@functools.partial(jax.jit, static_argnames="num_seeds")
def _plug_in_histogram_p_values(num_seeds):
    """No drift, plug-in histogram KL (pseudocount 0: +inf whenever a window leaves a bin empty)."""
    def one_seed(key):
        kx, ky, kp = jax.random.split(key, 3)
        return kl_permutation_test(kp, jax.random.normal(kx, (N,)), jax.random.normal(ky, (M,)),
                                   estimator="histogram", bins=20, pseudocount=0.0, num_permutations=B)

    return jax.lax.map(one_seed, jax.random.split(jax.random.key(30), num_seeds), batch_size=50)


def test_infinite_statistic_is_exceeded_by_infinite_permutations():
    x, y = _samples(31, shift=0.0)
    # a statistic that is +inf on every split: every permutation ties with it, p = 1 (was 1 / (B + 1))
    statistic, p_value = kl_permutation_test(jax.random.key(0), x, y, estimator=_always_infinite, num_permutations=B)
    assert np.isposinf(float(statistic)) and float(p_value) == 1.0
    # the case: plug-in histogram KL without drift rejected 92 % of the time at alpha = 0.05
    statistics, p_values = map(np.asarray, _plug_in_histogram_p_values(200))
    assert np.mean(np.isinf(statistics)) > 0.5  # the corner is exercised
    assert np.mean(p_values <= 0.05 + 1e-9) <= binomial_upper(0.05, 200)


def test_windows_the_monitor_cannot_score_raise_eagerly():
    reference = jax.random.normal(jax.random.key(32), (N, D))
    monitor = DriftMonitor(reference, estimator="knn", k=3, num_permutations=19)
    with pytest.raises(ValueError, match="`window` cannot be scored.*`k`=3"):  # was: inf statistic, p = 0.005
        monitor.score(jax.random.key(0), reference[:2] + 0.1)
    with pytest.raises(ValueError, match="`windows` cannot be scored"):
        monitor.run(jax.random.key(0), jnp.stack([reference[:2] + 0.1] * 3))
    for estimator in ("knn", "histogram"):
        monitor = DriftMonitor(reference, estimator=estimator, bins=4, num_permutations=99)
        for bad in (jnp.inf, -jnp.inf, jnp.nan):
            with pytest.raises(ValueError, match="`window` contains NaN or inf"):
                monitor.score(jax.random.key(0), reference[:M].at[3, 1].set(bad))
        with pytest.raises(ValueError, match="`reference` contains NaN or inf"):
            DriftMonitor(reference.at[0, 0].set(jnp.inf), estimator=estimator)
    for name in ("x", "y"):
        inputs = {"x": reference, "y": reference[:M] + 0.1}
        inputs[name] = inputs[name].at[0, 0].set(jnp.inf)
        with pytest.raises(ValueError, match=f"`{name}` contains NaN or inf"):
            kl_permutation_test(jax.random.key(0), inputs["x"], inputs["y"], num_permutations=B)


def test_nan_window_under_jit_makes_the_alarm_unknown_instead_of_resetting_the_run():
    reference = jax.random.normal(jax.random.key(33), (N, D))
    monitor = DriftMonitor(reference, estimator="histogram", bins=4)
    windows = jax.random.normal(jax.random.key(34), (4, M, D)) + 3.0  # every window clearly drifted
    windows = windows.at[1, 0, 0].set(jnp.nan)
    scores, alarms = jax.jit(lambda w: monitor.run(jax.random.key(35), w))(windows)
    np.testing.assert_array_equal(np.asarray(scores.significant), [1.0, np.nan, 1.0, 1.0])
    # window 1 may have been significant: the alarm is unknown (NaN), not False; window 3 makes two
    # certain significant windows in a row (was [F, F, F, T]: the NaN window reset the run silently)
    np.testing.assert_array_equal(np.asarray(alarms), [0.0, np.nan, np.nan, 1.0])


def _kleene_alarms(significant, consecutive):
    """Brute force: 1 if the last r are all 1, 0 if any of them is 0, else unknown."""
    out = []
    for t in range(len(significant)):
        last = significant[max(0, t - consecutive + 1):t + 1]
        if t < consecutive - 1 or np.any(last == 0):
            out.append(0.0)
        elif np.all(last == 1):
            out.append(1.0)
        else:
            out.append(np.nan)
    return np.array(out)


def test_three_valued_alarms_match_brute_force():
    rng = np.random.default_rng(36)
    significant = rng.choice([0.0, 1.0, np.nan], size=300, p=[0.3, 0.5, 0.2])
    for consecutive in (1, 2, 3):
        np.testing.assert_array_equal(np.asarray(sustained_alarms(jnp.asarray(significant), consecutive)),
                                      _kleene_alarms(significant, consecutive))


def test_range_binning_with_inf_raises_eagerly_and_gives_nan_edges_under_jit():
    reference = jnp.asarray(np.random.default_rng(37).normal(size=(20, 2))).at[0, 1].set(jnp.inf)
    with pytest.raises(ValueError, match="`reference` contains NaN or inf"):
        bin_edges(reference, 4, binning="range")
    edges = np.asarray(jax.jit(functools.partial(bin_edges, bins=4, binning="range"))(reference))
    assert np.all(np.isfinite(edges[0])) and np.all(np.isnan(edges[1]))  # only the bad feature
    # bin indices cannot be NaN: an invalid value or invalid edges give -1 under jit
    indices = np.asarray(jax.jit(bin_indices)(jnp.array([[0.0, 0.0], [jnp.nan, 0.0]]), jnp.asarray(edges)))
    np.testing.assert_array_equal(indices, [[np.asarray(bin_indices(jnp.zeros(1), jnp.asarray(edges[0])))[0], -1],
                                            [-1, -1]])


# ------------------------------------------------------------------------------------------------
# Statistics as values: kNN for any k, symmetric, energy, categorical; multiple testing


def _numpy_energy(x, y):
    from scipy.spatial.distance import cdist
    x, y = np.asarray(x).reshape(len(x), -1), np.asarray(y).reshape(len(y), -1)
    return 2 * cdist(x, y).mean() - cdist(x, x).mean() - cdist(y, y).mean()


def test_energy_distance_and_its_p_value_match_numpy_brute_force():
    x, y = _samples(39, shift=0.3)
    np.testing.assert_allclose(float(energy_distance(x, y)), _numpy_energy(x, y), rtol=1e-10)
    key = jax.random.key(5)
    statistic, p_value = kl_permutation_test(key, x, y, estimator="energy", num_permutations=B)
    expected_statistic, expected_p = _brute_force_p_value(key, x, y, _numpy_energy, B)
    np.testing.assert_allclose(float(statistic), expected_statistic, rtol=1e-10)
    assert float(p_value) == pytest.approx(expected_p, abs=1e-12)


def test_categorical_kl_counts_unseen_categories():
    x = jnp.asarray(np.tile([0.0, 1.0, 2.0, 2.0], 10))[:, None]
    y = jnp.asarray(np.concatenate([np.tile([0.0, 1.0, 2.0], 5), np.full(5, 7.0), [-1.0, 0.5]]))[:, None]
    statistic, p_value = permutation_test(jax.random.key(0), CategoricalKL(3), x, y, num_permutations=B)
    counts_x, counts_y = np.array([10, 10, 20, 0]), np.array([5, 5, 5, 7])  # 7, -1 and 0.5 are unseen
    np.testing.assert_allclose(np.asarray(statistic), [scipy.stats.entropy(counts_x + 0.5, counts_y + 0.5)],
                               rtol=1e-10)
    assert p_value.shape == (1,) and float(p_value[0]) == 1 / (B + 1)


def _numpy_bh(p):
    d = len(p)
    return np.array([min(1.0, min(d * p[j] / (np.sum(p <= p[j])) for j in range(d) if p[j] >= p[i]))
                     for i in range(d)])


def test_adjust_p_values_match_their_definitions():
    p = np.random.default_rng(40).uniform(size=12) ** 3
    np.testing.assert_allclose(np.asarray(adjust_p_values(jnp.asarray(p))), np.minimum(1, 12 * p), rtol=1e-12)
    np.testing.assert_allclose(np.asarray(adjust_p_values(jnp.asarray(p), "bh")), _numpy_bh(p), rtol=1e-12)
    simes = min(12 * np.sort(p)[i] / (i + 1) for i in range(12))
    assert float(jnp.min(adjust_p_values(jnp.asarray(p), "bh"))) == pytest.approx(simes, rel=1e-12)
    assert np.all(np.isnan(np.asarray(jax.jit(adjust_p_values)(jnp.asarray(p).at[0].set(jnp.nan)))))


def test_expected_windows_to_false_alarm_matches_simulated_runs():
    alpha, consecutive, num_streams, length = 0.2, 2, 4000, 400
    significant = np.random.default_rng(41).random((num_streams, length)) < alpha
    alarms = np.asarray(jax.vmap(lambda s: sustained_alarms(s, consecutive))(jnp.asarray(significant)))
    assert alarms.any(axis=1).all()
    first = np.argmax(alarms, axis=1) + 1
    expected = expected_windows_to_false_alarm(alpha, consecutive)  # (1 - 0.04) / (0.8 * 0.04) = 30
    assert expected == pytest.approx(30.0)
    assert abs(first.mean() - expected) <= 4 * first.std() / math.sqrt(num_streams)


def test_monitor_bh_correction_gives_the_simes_window_p_value():
    monitor = DriftMonitor(jax.random.normal(jax.random.key(13), (300, 3)), estimator="histogram", alpha=0.05,
                           bins=8, correction="bh")
    score = monitor.score(jax.random.key(18), jax.random.normal(jax.random.key(42), (100, 3)).at[:, 0].add(0.5))
    p = np.sort(np.asarray(score.p_value))
    assert float(score.window_p_value) == pytest.approx(min(3 * p[i] / (i + 1) for i in range(3)), rel=1e-6)


def test_knn_statistic_scores_float32_rounding_ties_like_knn_kl():
    # Continuous float32 data with rounding ties (issue 12): the kNN test scores them with knn's
    # ties="auto" rule, the observed statistic equals knn.kl's WKV, and the re-splits use the same rule.
    kx, ky = jax.random.split(jax.random.key(5))
    x = jax.random.normal(kx, (60, 1), jnp.float32)
    y = jax.random.normal(ky, (40, 1), jnp.float32) + 0.3
    # exact copies as float32 rounding makes them: within x, within y, and across the samples (6%)
    x = x.at[6].set(x[5])
    y = y.at[1].set(y[0]).at[2].set(x[10])
    pooled = np.concatenate([np.asarray(x), np.asarray(y)])
    _, inverse, counts = np.unique(pooled, axis=0, return_inverse=True, return_counts=True)
    assert 0 < np.mean(counts[inverse.reshape(-1)] > 1) <= 0.1
    statistic, p_value = kl_permutation_test(jax.random.key(1), x, y, estimator="knn", k=3, num_permutations=49)
    assert np.isfinite(statistic) and 0 < p_value <= 1
    np.testing.assert_allclose(statistic, knn.kl(x, y, k=3, estimator="wkv"), rtol=1e-5)
    # the identity relabelling through the neighbour lists gives the observed value
    test = KnnKL(k=3)
    data = test.prepare(x, y)
    relabelled = test.evaluate(data, (jnp.arange(100) < 60)[None])[0]
    np.testing.assert_allclose(relabelled, test.observe(data), rtol=1e-5)


def test_knn_statistic_refuses_discrete_data_naming_both_samples():
    x = jnp.asarray(np.repeat(np.arange(10.0), 5)[:, None])
    y = jnp.asarray(np.repeat(np.arange(10.0), 3)[:, None])
    with pytest.raises(ValueError, match="`x` and `y` look discrete"):
        kl_permutation_test(jax.random.key(0), x, y, estimator="knn", k=3, num_permutations=9)
    statistic, p_value = jax.jit(lambda x, y: kl_permutation_test(
        jax.random.key(0), x, y, estimator="knn", k=3, num_permutations=9))(x, y)
    assert np.isnan(statistic) and np.isnan(p_value)


# ------------------------------------------------------------------------------------------------
# The classifier and Gaussian KL statistics; ties of a constant statistic


def _scipy_classifier_logits(x, y, penalty, features):
    """ClassifierKL by SciPy: the class-balanced penalised logistic fit on the even rows of x and y
    (features standardised on those rows), evaluated on the odd rows."""
    import scipy.optimize

    def phi(z):
        return z if features == "linear" else np.concatenate([z, z ** 2], axis=1)

    train = np.concatenate([x[0::2], y[0::2]])
    mean, std = phi(train).mean(0), phi(train).std(0)
    std[std == 0] = 1

    def design(z):
        return np.column_stack([np.ones(len(z)), (phi(z) - mean) / std])

    label = np.r_[np.ones(len(x[0::2])), np.zeros(len(y[0::2]))]
    weight = np.where(label > 0, 0.5 / len(x[0::2]), 0.5 / len(y[0::2]))
    matrix, sign = design(train), 2 * label - 1

    def objective(beta):
        return np.sum(weight * np.logaddexp(0, -sign * (matrix @ beta))) + 0.5 * penalty * np.sum(beta[1:] ** 2)

    def gradient(beta):
        grad = matrix.T @ (weight * (scipy.special.expit(matrix @ beta) - label))
        grad[1:] += penalty * beta[1:]
        return grad

    beta = scipy.optimize.minimize(objective, np.zeros(matrix.shape[1]), jac=gradient, method="BFGS",
                                   options={"gtol": 1e-13, "maxiter": 10_000}).x
    return design(x[1::2]) @ beta, design(y[1::2]) @ beta


def test_classifier_statistic_matches_scipy_and_permutes_only_held_out_rows():
    import scipy.special  # noqa: F401  (used by the helper)

    x, y = _samples(40, shift=0.3)
    x, y = np.asarray(x), np.asarray(y)
    for features in ("linear", "diagonal"):
        statistic = ClassifierKL(features, penalty=0.05)
        value, p_value = permutation_test(jax.random.key(5), statistic, x, y, num_permutations=B)
        logits_x, logits_y = _scipy_classifier_logits(x, y, 0.05, features)
        np.testing.assert_allclose(float(value), np.mean(logits_x), rtol=1e-6)
        # the p-value: the held-out rows (odd rows of x and y) re-labelled with the classifier fixed
        held = np.r_[np.arange(1, N, 2), N + np.arange(1, M, 2)]
        logits = np.r_[logits_x, logits_y]
        observed = np.arange(N + M) < N
        exceed = 0
        for b in range(1, B + 1):
            order = np.asarray(jax.random.permutation(jax.random.fold_in(jax.random.key(5), b), held.size))
            labels = observed[held][order]
            exceed += np.mean(logits[labels]) >= np.mean(logits_x) - 1e-9
        assert float(p_value) == pytest.approx((1 + exceed) / (1 + B), abs=1e-12)
    # the automatic features: quadratic when few, then diagonal, then linear
    assert [ClassifierKL().features(d, 400) for d in (2, 10, 50, 150)] == ["quadratic", "quadratic", "diagonal",
                                                                             "linear"]
    with pytest.raises(ValueError, match="`model`"):
        ClassifierKL("cubic")
    with pytest.raises(ValueError, match="`penalty`"):
        permutation_test(jax.random.key(0), ClassifierKL(penalty=-1.0), x, y)
    with pytest.raises(ValueError, match="`y` needs at least 2 rows"):
        permutation_test(jax.random.key(0), ClassifierKL(), x, y[:1])


def _numpy_gaussian_kl(x, y, ridge, symmetric):
    z = np.concatenate([x, y]).reshape(len(x) + len(y), -1)
    z = (z - z.mean(0)) / z.std(0)
    a, b = z[:len(x)], z[len(x):]
    d = z.shape[1]
    moments = [(part.mean(0), np.cov(part.T, bias=True).reshape(d, d) + ridge * np.eye(d)) for part in (a, b)]

    def kl(first, second):
        (m0, s0), (m1, s1) = first, second
        return 0.5 * (np.trace(np.linalg.solve(s1, s0)) + (m1 - m0) @ np.linalg.solve(s1, m1 - m0) - d
                      + np.linalg.slogdet(s1)[1] - np.linalg.slogdet(s0)[1])

    return kl(*moments) + (kl(*moments[::-1]) if symmetric else 0.0)


def test_gaussian_statistic_and_p_value_match_numpy_brute_force():
    x, y = _samples(41, shift=0.3)
    x = x * jnp.asarray([[1.0, 1.4]])
    for symmetric in (True, False):
        value, p_value = permutation_test(jax.random.key(6), GaussianKL(symmetric), x, y, num_permutations=B)
        expected, expected_p = _brute_force_p_value(
            jax.random.key(6), x, y, lambda a, b: _numpy_gaussian_kl(a, b, D / M, symmetric), B)
        np.testing.assert_allclose(float(value), expected, rtol=1e-9)
        assert float(p_value) == pytest.approx(expected_p, abs=1e-12)
    # exact for Gaussians: D(N(0, 1) || N(0, 4)) = (1/4 - 1 + log 4) / 2 with no shrinkage, in 1-D
    big = np.random.default_rng(7)
    value = drift._statistic_only(GaussianKL(False, 1e-12), jnp.asarray(big.normal(size=20_000)),
                                  jnp.asarray(2 * big.normal(size=20_000)))
    assert float(value) == pytest.approx((0.25 - 1 + math.log(4)) / 2, abs=0.02)
    with pytest.raises(ValueError, match="`shrinkage`"):
        permutation_test(jax.random.key(0), GaussianKL(shrinkage=0.0), x, y)


def test_a_constant_statistic_of_many_features_has_p_value_one_in_float32():
    # 64 constant features: every re-split ties the observed histogram KL, but the batched and the single
    # evaluation differ in the last bits (4.6 eps); a 4 eps tie tolerance gave p = 1 / (B + 1) everywhere.
    x, y = jnp.full((539, 64), 0.3, jnp.float32), jnp.full((100, 64), 0.3, jnp.float32)
    edges = jnp.asarray(np.tile(np.linspace(0.0, 1.0, 9), (64, 1)), jnp.float32)
    _, p_value = permutation_test(jax.random.key(0), HistogramKL(edges=edges), x, y, num_permutations=99)
    assert np.all(np.asarray(p_value) == 1.0)


@pytest.mark.slow
@pytest.mark.parametrize("estimator", ["classifier", "gaussian", "knn_graph"])
def test_classifier_gaussian_and_knn_graph_p_values_are_uniform_under_the_null(estimator):
    num_seeds = 1000
    p_values = np.asarray(_p_values_over_seeds(0.0, estimator=estimator, num_seeds=num_seeds))
    for level in (0.05, 0.1, 0.5):
        rate = np.mean(p_values <= level + 1e-9)
        assert abs(rate - level) <= 4 * math.sqrt(level * (1 - level) / num_seeds), (level, rate)
    p_values = np.asarray(_p_values_over_seeds(1.5, estimator=estimator, num_seeds=num_seeds))
    assert np.mean(p_values <= 0.05) >= 0.95


# ------------------------------------------------------------------------------------------------
# The kNN-graph KL statistic


def numpy_knn_graph_kl(x, y, neighbors, symmetric, pseudocount=0.5):
    """Reference: a fresh NumPy kNN search of the pooled sample, label counts, the plug-in KL."""
    pooled = np.concatenate([x, y]).reshape(len(x) + len(y), -1)
    distances = np.sqrt(((pooled[:, None] - pooled[None]) ** 2).sum(-1))
    np.fill_diagonal(distances, np.inf)
    lists = np.argsort(distances, axis=1, kind="stable")[:, :neighbors]
    count_x = (lists < len(x)).sum(axis=1)
    log_odds = np.log(count_x + pseudocount) - np.log(neighbors - count_x + pseudocount)
    value = log_odds[:len(x)].mean() + np.log(len(y) / (len(x) - 1))
    if symmetric:
        value += -log_odds[len(x):].mean() + np.log(len(x) / (len(y) - 1))
    return value


@pytest.mark.parametrize("neighbors, symmetric", [(None, True), (3, False)])  # dense, then gathered
def test_knn_graph_fast_permutations_equal_a_fresh_search_on_every_split(neighbors, symmetric):
    x, y = _samples(31, shift=0.3)
    statistic = KnnGraphKL(neighbors, symmetric=symmetric)
    size = statistic.list_length(N, M)
    assert size == (round((N + M) / 3) if neighbors is None else neighbors)
    value, p_value = permutation_test(jax.random.key(5), statistic, x, y, num_permutations=B)
    expected_value, expected_p = _brute_force_p_value(
        jax.random.key(5), x, y, functools.partial(numpy_knn_graph_kl, neighbors=size, symmetric=symmetric), B)
    np.testing.assert_allclose(float(value), expected_value, rtol=1e-12)
    assert float(p_value) == pytest.approx(expected_p, abs=1e-12)
    # the fixed graph relabelled equals the statistic recomputed from scratch on the relabelled samples
    data = statistic.prepare(x, y)
    pooled = np.concatenate([np.asarray(x), np.asarray(y)])
    labels = np.stack([np.random.default_rng(seed).permutation(N + M) < N for seed in range(6)])
    fast = np.asarray(statistic.evaluate(data, jnp.asarray(labels)))
    direct = [float(drift._statistic_only(statistic, jnp.asarray(pooled[lab]), jnp.asarray(pooled[~lab])))
              for lab in labels]
    np.testing.assert_allclose(fast, direct, rtol=1e-13, atol=1e-15)


def test_knn_graph_under_jit_and_vmap_float32_and_nan_input():
    x, y = _samples(32, shift=0.4)
    test = functools.partial(kl_permutation_test, estimator="knn_graph", num_permutations=B)
    eager = test(jax.random.key(1), x, y)
    # kl_permutation_test(estimator="knn_graph") is KnnGraphKL() (symmetric by default)
    reference = permutation_test(jax.random.key(1), KnnGraphKL(), x, y, num_permutations=B)
    np.testing.assert_array_equal(np.asarray(eager), np.asarray(reference))
    options = dict(k=None, knn_estimator="wkv", knn_method="brute", bins=10, binning="quantile", edges=None)
    assert drift._statistic_from_options("knn_graph", pseudocount=0.25, symmetric=False, **options) == KnnGraphKL(
        None, 0.25, False)
    x32, y32 = x.astype(jnp.float32), y.astype(jnp.float32)
    value, p_value = jax.jit(test)(jax.random.key(1), x32, y32)
    assert value.dtype == jnp.float32 and p_value.dtype == jnp.float32
    np.testing.assert_allclose(float(value), float(eager[0]), rtol=1e-4)
    xs, ys = jnp.stack([x, x + 1.0, x]), jnp.stack([y, y + 1.0, y + 2.0])
    batched = jax.vmap(lambda a, b: test(jax.random.key(1), a, b))(xs, ys)
    looped = [test(jax.random.key(1), a, b) for a, b in zip(xs, ys)]
    np.testing.assert_allclose(np.asarray(batched), np.asarray(looped).T, rtol=1e-12)
    value, p_value = jax.jit(test)(jax.random.key(1), x32, y32.at[3, 1].set(jnp.inf))
    assert np.isnan(float(value)) and np.isnan(float(p_value))
    # a bad pseudocount cannot raise under jit: NaN
    jitted = jax.jit(lambda a: permutation_test(jax.random.key(1), KnnGraphKL(pseudocount=a), x, y, num_permutations=B))
    assert np.all(np.isnan(np.asarray(jitted(0.0))))


def test_knn_graph_bad_input_raises_eagerly():
    x, y = _samples(33)
    with pytest.raises(ValueError, match="pseudocount"):
        kl_permutation_test(jax.random.key(0), x, y, estimator="knn_graph", pseudocount=0.0)
    with pytest.raises(ValueError, match="neighbors"):
        KnnGraphKL(0)
    with pytest.raises(ValueError, match="`y` needs at least 2 rows"):
        permutation_test(jax.random.key(0), KnnGraphKL(), x, y[:1])
    with pytest.raises(ValueError, match="look discrete"):
        kl_permutation_test(jax.random.key(0), jnp.round(x), jnp.round(y), estimator="knn_graph")
    with pytest.raises(ValueError, match="applies to estimator='knn' only"):
        kl_permutation_test(jax.random.key(0), x, y, estimator="knn_graph", k=3)
