"""Tests of the k-NN estimators in ``kljax.knn``: kl, entropy, cross_entropy.

Truths: the ``universal-divergence`` package (WKV 2009, fixed and adaptive k), closed-form KL and
entropies of Gaussians (Monte Carlo tolerance from the spread over seeds), finite differences.
"""

import functools
import inspect
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import scipy.special
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from universal_divergence import estimate as universal_divergence_estimate

from kljax import knn


def normal(seed, *shape, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


# ------------------------------------------------------------------------------------------------
# Against the universal-divergence package (WKV 2009)
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("d, k, method", [(1, 1, "auto"), (4, 3, "brute"), (7, 2, "auto")])
def test_wkv_equals_universal_divergence(d, k, method):
    # universal-divergence: rho = (k+1)-th neighbour in X counting x_i itself, nu = k-th in Y,
    # (d / n) sum log(nu / rho) + log(m / (n - 1)): WKV 2009 eq. (5), as is "wkv".
    x, y = normal(0, 150, d), normal(1, 120, d) + 0.3
    expected = universal_divergence_estimate(x, y, k=k)
    got = float(knn.kl(x, y, k=k, estimator="wkv", method=method))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)


def test_wkv_adaptive_equals_universal_divergence_adaptive():
    # universal-divergence with k=None is WKV's adaptive estimator with base order 1.
    x, y = normal(2, 70, 2), 1.5 * normal(3, 60, 2) + 0.5
    expected = universal_divergence_estimate(x, y, k=None)
    got = float(knn.kl(x, y, k=1, estimator="wkv_adaptive"))
    assert got == pytest.approx(expected, rel=1e-12, abs=1e-12)
    # The tiled counting pass gives the same.
    assert float(knn.kl(x, y, k=1, estimator="wkv_adaptive", block_size=16)) == pytest.approx(got, abs=1e-13)


def test_weighted_is_a_weighted_average_of_wkv():
    x, y = normal(4, 200, 3), normal(5, 180, 3) * 1.2
    orders = knn._weighted_orders(2, 200, 180)
    assert orders == tuple(range(2, 33, 2))
    weights = knn._weights(3, orders)
    j = np.asarray(orders, dtype=np.float64)
    ratio = np.exp(scipy.special.gammaln(j + 2 / 3) - scipy.special.gammaln(j))
    assert weights.sum() == pytest.approx(1.0, abs=1e-12)
    assert weights @ ratio == pytest.approx(0.0, abs=1e-9)
    # minimum norm: the weights lie in the span of the two constraint rows
    span = np.stack([np.ones_like(j), ratio], axis=1)
    np.testing.assert_allclose(span @ np.linalg.lstsq(span, weights, rcond=None)[0], weights, atol=1e-12)
    # WKV (eq. 5) of every order from NumPy distances, then the weighted sum.
    rho = np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, j.astype(int)]
    nu = np.sort(np.linalg.norm(x[:, None] - y[None], axis=-1), axis=1)[:, j.astype(int) - 1]
    per_order = 3 * np.mean(np.log(nu / rho), axis=0) + math.log(180 / 199)
    got = float(knn.kl(x, y, k=2, estimator="weighted", method="brute"))
    assert got == pytest.approx(float(weights @ per_order), rel=1e-12)


def test_default_estimator_is_listed():
    default = inspect.signature(knn.kl).parameters["estimator"].default
    assert default == "weighted" and set(knn.ESTIMATORS) == {"weighted", "wkv", "wkv_adaptive"}


# ------------------------------------------------------------------------------------------------
# Near closed forms (Monte Carlo over seeds)
# ------------------------------------------------------------------------------------------------


def gaussian_entropy(cov):
    d = cov.shape[0]
    return 0.5 * (d * math.log(2 * math.pi * math.e) + np.linalg.slogdet(cov)[1])


def gaussian_kl(mean_p, cov_p, mean_q, cov_q):
    d = mean_p.shape[0]
    inverse = np.linalg.inv(cov_q)
    delta = mean_q - mean_p
    return 0.5 * (np.trace(inverse @ cov_p) + delta @ inverse @ delta - d
                  + np.linalg.slogdet(cov_q)[1] - np.linalg.slogdet(cov_p)[1])


def within_monte_carlo_error(estimates, truth, bias_allowance):
    """|mean - truth| <= 5 standard errors of the mean + the estimator's known finite-n bias."""
    estimates = np.asarray(estimates, dtype=np.float64)
    standard_error = estimates.std(ddof=1) / math.sqrt(estimates.size)
    error = abs(estimates.mean() - truth)
    assert error <= 5 * standard_error + bias_allowance, (estimates.mean(), truth, standard_error)


SEEDS = 8


def correlated_gaussian_samples(seed, d, n):
    """x ~ P = N(0, A A^T), y ~ Q = N(mu, B B^T), ``SEEDS`` sets of each; and D(P || Q), H(P), H(P, Q)."""
    a = np.eye(d) + 0.3 * np.eye(d, k=-1)
    b = np.diag(np.where(np.arange(d) % 2 == 0, 1.2, 0.9))
    mu = np.full(d, 0.4)
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((SEEDS, n, d)) @ a.T
    y = mu + rng.standard_normal((SEEDS, n, d)) @ b.T
    cov_p, cov_q = a @ a.T, b @ b.T
    divergence = gaussian_kl(np.zeros(d), cov_p, mu, cov_q)
    entropy = gaussian_entropy(cov_p)
    return x, y, divergence, entropy, entropy + divergence


# Bias allowances: the finite-n biases measured on this pair with 64 seeds (d = 2, n = m = 2000) were
# KL: weighted -0.010, wkv +0.001, wkv_adaptive +0.004 (standard errors about 0.005); entropy (k=3)
# -0.011; cross-entropy (k=3) -0.031; uniform square entropy (k=3, boundary effect) +0.022. The
# allowances below exceed these by about 3 of those standard errors; 5 standard errors of the mean
# over the 8 seeds here cover the spread.
@pytest.mark.slow
def test_estimators_near_gaussian_closed_forms():
    x, y, divergence, entropy, cross = correlated_gaussian_samples(10, 2, 2000)
    for estimator in knn.ESTIMATORS:
        within_monte_carlo_error(knn.kl(x, y, k=1, estimator=estimator), divergence, 0.025)
    within_monte_carlo_error(knn.entropy(x, k=3), entropy, 0.025)
    within_monte_carlo_error(knn.cross_entropy(x, y, k=3), cross, 0.045)


@pytest.mark.slow
def test_entropy_of_uniform_square_is_nearly_exact():
    # Uniform density: the KL argument is exact apart from the boundary; H(U[0, 2]^2) = log 4.
    x = 2.0 * np.random.default_rng(6).uniform(size=(SEEDS, 2000, 2))
    within_monte_carlo_error(knn.entropy(x, k=3), math.log(4.0), 0.03)


def test_entropy_and_cross_entropy_formulas():
    x, y = normal(7, 60, 3), normal(8, 50, 3)
    rho = np.sort(np.linalg.norm(x[:, None] - x[None], axis=-1), axis=1)[:, 2]  # column 0 is x_i itself
    nu = np.sort(np.linalg.norm(x[:, None] - y[None], axis=-1), axis=1)[:, 1]
    log_ball = 1.5 * math.log(math.pi) - math.lgamma(2.5)
    expected_entropy = scipy.special.digamma(60) - scipy.special.digamma(2) + log_ball + 3 * np.mean(np.log(rho))
    expected_cross = scipy.special.digamma(51) - scipy.special.digamma(2) + log_ball + 3 * np.mean(np.log(nu))
    assert float(knn.entropy(x, k=2)) == pytest.approx(expected_entropy, rel=1e-12)
    assert float(knn.cross_entropy(x, y, k=2)) == pytest.approx(expected_cross, rel=1e-12)


# ------------------------------------------------------------------------------------------------
# Transformations, dtypes, backends, devices
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("estimator", ["weighted", "wkv_adaptive"])
def test_jit_vmap_batch_axes_block_size_and_backends_agree(estimator):
    x, y = normal(9, 3, 90, 3), normal(10, 3, 70, 3) + 0.2
    batched = knn.kl(x, y, estimator=estimator)  # leading batch axes; d = 3: dense k-d tree path
    vmapped = jax.jit(jax.vmap(lambda a, b: knn.kl(a, b, estimator=estimator, method="brute",
                                                   block_size=32)))(x, y)
    np.testing.assert_allclose(np.asarray(vmapped), np.asarray(batched), rtol=1e-12)
    assert batched.shape == (3,) and np.all(np.isfinite(np.asarray(batched)))
    if estimator == "weighted":
        single = knn.kl(x.astype(np.float32), y.astype(np.float32))
        assert single.dtype == jnp.float32
        np.testing.assert_allclose(np.asarray(single), np.asarray(batched), rtol=1e-4, atol=1e-4)


def test_gradient_matches_finite_differences():
    x, y = jnp.asarray(normal(11, 40, 2)), jnp.asarray(normal(12, 30, 2))
    grad = jax.jit(jax.grad(knn.kl, argnums=(0, 1)))(x, y)
    direction_x, direction_y = normal(13, 40, 2), normal(14, 30, 2)
    step = 1e-6  # far below the gaps between neighbour distances: the neighbour sets do not change
    plus = float(knn.kl(x + step * direction_x, y + step * direction_y))
    minus = float(knn.kl(x - step * direction_x, y - step * direction_y))
    directional = float(jnp.sum(grad[0] * direction_x) + jnp.sum(grad[1] * direction_y))
    assert directional == pytest.approx((plus - minus) / (2 * step), rel=1e-5, abs=1e-7)


def test_sharded_samples_give_the_single_device_estimate():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 (simulated) devices; tests/conftest.py sets them")
    rows = NamedSharding(Mesh(np.array(devices[:4]), ("shards",)), PartitionSpec("shards"))
    x, y = normal(15, 64, 5), normal(16, 96, 5)
    single = float(knn.kl(x, y))
    sharded = float(knn.kl(jax.device_put(x, rows), jax.device_put(y, rows)))
    # identical neighbour distances; the mean is reduced in another order outside jit
    assert sharded == pytest.approx(single, rel=1e-14)


# ------------------------------------------------------------------------------------------------
# Duplicated points and errors
# ------------------------------------------------------------------------------------------------


def test_duplicate_policy():
    x, y = normal(19, 50, 2), normal(20, 40, 2)
    x[10] = x[3]  # one pair of duplicates in x
    with pytest.raises(ValueError, match="`x` has duplicated points"):
        knn.kl(x, y, estimator="wkv")
    with pytest.raises(ValueError, match="duplicated points"):
        knn.entropy(x)
    # Under jit the same input gives NaN, never -inf or a finite wrong number.
    assert np.isnan(float(jax.jit(lambda a, b: knn.kl(a, b))(x, y)))
    # k above the multiplicity is well defined again: each copy's 2nd neighbour is at distance > 0.
    assert np.isfinite(float(knn.kl(x, y, k=2, estimator="wkv")))
    x[10] = normal(26, 2)
    y[5] = x[7]  # a point of x that is also in y
    with pytest.raises(ValueError, match="coincides with at least k=1 points of `y`"):
        knn.kl(x, y, estimator="wkv")
    with pytest.raises(ValueError, match="coincides"):
        knn.cross_entropy(x, y)
    assert np.isnan(float(jax.jit(lambda a, b: knn.cross_entropy(a, b))(x, y)))


@pytest.mark.parametrize("method", ["brute", "kdtree"])
def test_non_finite_samples_give_nan_under_jit(method):
    # The neighbour search now returns NaN distances for them; the estimates must stay NaN too.
    x, y = normal(27, 40, 2), normal(28, 30, 2)
    bad_x, bad_y = x.copy(), y.copy()
    bad_x[4, 0], bad_y[9, 1] = np.nan, np.inf
    estimators = [jax.jit(functools.partial(knn.kl, estimator=estimator, method=method))
                  for estimator in knn.ESTIMATORS]
    estimators.append(jax.jit(functools.partial(knn.cross_entropy, method=method)))
    for estimate in estimators:  # each compiled once, for both inputs
        assert np.isnan(float(estimate(bad_x, y))) and np.isnan(float(estimate(x, bad_y)))
    assert np.isnan(float(jax.jit(functools.partial(knn.entropy, method=method))(bad_x)))


def test_errors():
    x, y = normal(21, 6, 2), normal(22, 5, 2)
    with pytest.raises(ValueError, match=r"`k`=6 is too large.*n - 1"):
        knn.kl(x, y, k=6, estimator="wkv")
    with pytest.raises(ValueError, match="too large"):
        knn.entropy(x, k=6)
    with pytest.raises(ValueError, match="too large"):
        knn.cross_entropy(x, y, k=6)
    with pytest.raises(ValueError, match="at least 2 points"):
        knn.kl(x[:1], y, estimator="wkv")
    with pytest.raises(ValueError, match="at least 2 points"):
        knn.entropy(x[:1])
    with pytest.raises(ValueError, match=r"same dimension.*\(6, 2\) and \(5, 3\)"):
        knn.kl(x, normal(23, 5, 3))
    with pytest.raises(ValueError, match="same batch shape"):
        knn.kl(normal(24, 2, 6, 2), normal(25, 3, 5, 2))
    with pytest.raises(ValueError, match="`estimator`"):
        knn.kl(x, y, estimator="knn")
    with pytest.raises(ValueError, match='"weighted"` needs at least the orders k and 2k'):
        knn.kl(x, y, k=3)
    with pytest.raises(TypeError, match="`k` must be an int"):
        knn.kl(x, y, k=2.0)
    bad = x.copy()
    bad[0, 0] = np.inf
    with pytest.raises(ValueError, match="`x` contains NaN or inf"):
        knn.kl(bad, y, estimator="wkv")
    nan = x.copy()
    nan[1, 1] = np.nan
    assert np.isnan(float(jax.jit(lambda a, b: knn.kl(a, b, estimator="wkv"))(nan, y)))
    # shape errors raise at trace time under jit too
    with pytest.raises(ValueError, match="too large"):
        jax.jit(lambda a, b: knn.kl(a, b, k=6, estimator="wkv"))(x, y)
