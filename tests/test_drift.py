"""Tests for kljax.drift: binning and histogram KL against NumPy, the permutation p-value against a
brute-force recomputation, its validity (false-alarm rate and uniformity under the null, over many
seeds), its power, and the stream monitor."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.stats

from kljax import discrete, knn
from kljax.drift import _KnnStatistic  # the per-split kljax.knn.kl statistic of the non-WKV estimators
from kljax.drift import (
    DriftMonitor,
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


def test_knn_shared_distance_path_equals_calling_knn_kl_on_every_split():
    # The WKV statistic is computed from one pooled distance matrix; calling kljax.knn.kl on every
    # re-split (the path of the other kNN estimators, here given as a callable; same keys) must give
    # the same statistic, equal to knn.kl on the observed split, and the same p-value.
    x, y = _samples(21, shift=0.2)
    fast = kl_permutation_test(jax.random.key(3), x, y, estimator="knn", k=2, num_permutations=B)
    slow = kl_permutation_test(jax.random.key(3), x, y, estimator=_KnnStatistic(2, "wkv", "brute"),
                               num_permutations=B)
    np.testing.assert_allclose(float(fast[0]), float(knn.kl(x, y, k=2, estimator="wkv")), rtol=1e-10)
    np.testing.assert_allclose(float(fast[0]), float(slow[0]), rtol=1e-10)
    assert float(fast[1]) == float(slow[1])


def test_knn_duplicates_raise_eagerly_and_give_nan_under_jit():
    x, y = _samples(22)
    y = y.at[0].set(x[0])  # with k = 1, any re-split that keeps x[0] in x has nu = 0 for it
    with pytest.raises(ValueError, match="2 exact copies"):
        kl_permutation_test(jax.random.key(0), x, y, estimator="knn", num_permutations=B)
    statistic, p_value = kl_permutation_test(jax.random.key(0), x, y, estimator="knn", k=2, num_permutations=B)
    assert np.isfinite(float(p_value))  # k = 2 > 1 copy: defined
    jitted = jax.jit(functools.partial(kl_permutation_test, estimator="knn", num_permutations=B))
    assert np.isnan(float(jitted(jax.random.key(0), x, y)[1]))


@pytest.mark.parametrize("estimator", ["histogram", "knn"])
def test_chunk_size_does_not_change_the_result(estimator):
    x, y = _samples(9, shift=0.3)
    results = [kl_permutation_test(jax.random.key(1), x, y, estimator=estimator, num_permutations=B, bins=6,
                                   chunk_size=chunk) for chunk in (None, 7)]  # the default; 8 chunks, padded
    statistic, p_value = results[1]
    np.testing.assert_allclose(np.asarray(statistic), np.asarray(results[0][0]), rtol=1e-12)
    np.testing.assert_array_equal(np.asarray(p_value), np.asarray(results[0][1]))
    if estimator == "knn":  # the default statistic is WKV 2009 eq. 5 with k = 1
        np.testing.assert_allclose(float(statistic), float(knn.kl(x, y, k=1, estimator="wkv")), rtol=1e-10)


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
        kl_permutation_test(key, x, y[:2], k=3)
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


@pytest.mark.parametrize("estimator", ["histogram", "knn"])
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
