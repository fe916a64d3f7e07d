"""kljax.ratio against closed forms: Gaussian KL (kljax.analytic) and the MI of correlated Gaussians.

Tolerances come from the estimator's own standard error (plus a small allowance for the classifier's
finite-sample bias, stated per test). Every distinct option set and shape compiles one training
program (seconds), so the tests share shapes: (2000, 3) samples with default options.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kljax import analytic, distributions, ratio

N = 2000


def _gaussian_pair(dtype=np.float32):
    """P = N(0, L_p L_p^T), Q = N(mu, L_q L_q^T) in d = 3 (different means, scales and correlations)."""
    loc_p, tril_p = np.zeros(3), np.array([[1.0, 0, 0], [0.3, 1.0, 0], [0.0, -0.2, 0.8]])
    loc_q, tril_q = np.array([0.5, -0.3, 0.2]), np.array([[1.2, 0, 0], [0.0, 0.9, 0], [0.1, 0.0, 1.1]])
    p = distributions.MultivariateNormalTriL(jnp.asarray(loc_p), jnp.asarray(tril_p))
    q = distributions.MultivariateNormalTriL(jnp.asarray(loc_q), jnp.asarray(tril_q))
    kx, ky = jax.random.split(jax.random.key(42))
    x = np.asarray(p.sample(kx, (N,)), dtype)
    y = np.asarray(q.sample(ky, (N,)), dtype)
    return x, y, float(analytic.kl(p, q))


def _correlated(rho: float, d: int, n: int, seed: int):
    """x, y in R^d with corr(x_i, y_i) = rho per coordinate: MI = -d/2 log(1 - rho^2) (closed form)."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, d))
    y = rho * x + math.sqrt(1 - rho ** 2) * rng.standard_normal((n, d))
    return x.astype(np.float32), y.astype(np.float32), -0.5 * d * math.log(1 - rho ** 2)


@pytest.mark.slow
def test_classifier_kl_matches_the_closed_form_and_is_unbiased_for_equal_distributions():
    x, y, truth = _gaussian_pair()
    value, stderr = ratio.kl_with_stderr(jax.random.key(0), x, y)
    assert value.dtype == np.float32
    # 4 standard errors + 0.03 nats for the classifier's finite-sample bias (measured +0.01 to +0.02).
    assert abs(float(value) - truth) < 4 * float(stderr) + 0.03, (float(value), float(stderr), truth)
    # P = Q, same shapes (same compiled program): cross-fitted logits average to ~0, never inflated by
    # overfitting (in-sample logits would be biased upwards).
    x2 = np.asarray(np.random.default_rng(1).permutation(np.concatenate([x, y]))[: 2 * N])
    value, stderr = ratio.kl_with_stderr(jax.random.key(1), x2[:N], x2[N:])
    assert abs(float(value)) < 4 * float(stderr), (float(value), float(stderr))


@pytest.mark.slow
def test_classifier_mutual_information_of_correlated_gaussians():
    x, y, truth = _correlated(0.8, 2, N, seed=3)  # MI = 1.02 nats
    result = ratio.mutual_information_with_diagnostics(jax.random.key(0), x, y)
    assert not bool(result.diverged)
    assert abs(float(result.value) - truth) < 4 * float(result.stderr) + 0.05, (float(result.value), truth)


@pytest.mark.slow
def test_telescoping_reaches_a_large_mutual_information_where_one_classifier_falls_short():
    # rho = 0.99 in each of 2 coordinate pairs: MI = -log(1 - rho^2) = 3.92 nats, log-ratio coefficients
    # of size 1 / (1 - rho^2) = 50, joint and shuffled pairs nearly separable. The single classifier
    # (waymarks=1) reads 3.12-3.26 on seeds 4-6, 11 standard errors low; the default 3-step telescoping
    # reads 3.75-3.84.
    x, y, truth = _correlated(0.99, 2, N, seed=4)
    value, stderr = ratio.mutual_information_with_stderr(jax.random.key(0), x, y)
    assert abs(float(value) - truth) < 4 * float(stderr) + 0.05, (float(value), float(stderr), truth)
    single, single_stderr = ratio.mutual_information_with_stderr(jax.random.key(0), x, y, waymarks=1)
    assert truth - float(single) > max(0.5, 6 * float(single_stderr)), (float(single), float(single_stderr))


def test_newton_fit_is_the_exact_penalised_logistic_minimiser():
    # The damped Newton iteration with a subsampled Hessian (more rows than _HESSIAN_ROWS) against
    # SciPy's BFGS on the same convex objective in float64.
    from scipy.optimize import minimize

    from kljax.ratio import _HESSIAN_ROWS, _newton_classifier
    rng = np.random.default_rng(7)
    n, m = 3000, 2500
    assert n + m > _HESSIAN_ROWS
    z = np.concatenate([rng.normal(0.5, 1.0, (n, 2)), rng.normal(0.0, 1.5, (m, 2))])
    design = np.concatenate([np.ones((n + m, 1)), z, z ** 2], axis=1)
    label = np.concatenate([np.ones(n), np.zeros(m)])
    weight = np.where(label > 0, 0.5 / n, 0.5 / m)
    weight[:100] = 0.0  # held-out rows
    penalty = 1e-3
    rows = np.unique(np.linspace(0, n + m - 1, 1000).astype(np.int32))

    def objective(beta):
        logits = design @ beta
        return np.sum(weight * np.logaddexp(0.0, -(2 * label - 1) * logits)) + 0.5 * penalty * np.sum(beta[1:] ** 2)

    expected = minimize(objective, np.zeros(5), method="BFGS", options={"gtol": 1e-10}).x
    beta, loss, covariance = _newton_classifier(jnp.asarray(design, jnp.float32), jnp.asarray(label, jnp.float32),
                                                jnp.asarray(weight, jnp.float32), jnp.asarray(rows), penalty,
                                                jnp.zeros(5, jnp.float32), 40)
    np.testing.assert_allclose(np.asarray(beta), expected, atol=2e-3)
    np.testing.assert_allclose(float(loss), objective(expected), rtol=1e-5)
    assert covariance.shape == (5, 5) and np.all(np.linalg.eigvalsh(np.asarray(covariance, np.float64)) > 0)


@pytest.mark.slow
@pytest.mark.parametrize("method", ["nwj", "dv"])
def test_variational_kl_bounds_on_a_small_gaussian_pair(method):
    # The bounds' held-out values are noisier than the classifier's (exp terms); d = 1 keeps them sane.
    rng = np.random.default_rng(5)
    x = rng.standard_normal((N, 1)).astype(np.float32)
    y = (1.0 + rng.standard_normal((N, 1))).astype(np.float32)  # KL = 1/2
    result = ratio.kl_with_diagnostics(jax.random.key(0), x, y, method=method)
    assert not bool(result.diverged)
    assert abs(float(result.value) - 0.5) < 4 * float(result.stderr) + 0.05, (float(result.value), float(result.stderr))


def test_jit_and_vmap_over_seeds_equal_eager_and_nan_under_jit():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 2)).astype(np.float32)
    y = (0.5 + rng.standard_normal((30, 2))).astype(np.float32)
    options = {"num_steps": 100}
    keys = jax.random.split(jax.random.key(0), 2)
    eager = np.array([float(ratio.kl(k, x, y, **options)) for k in keys])
    assert eager[0] != eager[1]  # the seeds matter (folds, minibatches)
    # One compile serves both checks: jit of the estimator vmapped over seeds.
    over_seeds = jax.jit(lambda ks, a, b: jax.vmap(lambda k: ratio.kl(k, a, b, **options))(ks))
    np.testing.assert_allclose(np.asarray(over_seeds(keys, x, y)), eager, rtol=1e-5, atol=1e-5)
    bad = x.copy()
    bad[3, 1] = np.nan
    assert np.isnan(np.asarray(over_seeds(keys, bad, y))).all()


def test_divergence_gives_nan_a_flag_a_warning_and_progress_reports():
    rng = np.random.default_rng(0)
    x = rng.standard_normal((40, 2)).astype(np.float32)
    y = (3.0 * rng.standard_normal((30, 2))).astype(np.float32)
    seen = []
    # NWJ's exp(f - 1) overflows float32 when Adam takes steps of size 1e6.
    with pytest.warns(RuntimeWarning, match="diverged"):
        result = ratio.kl_with_diagnostics(jax.random.key(0), x, y, method="nwj", learning_rate=1e6, num_steps=100,
                                           progress=lambda step, losses: seen.append((step, losses)))
    assert bool(result.diverged)
    assert np.isnan(float(result.value)) and np.isnan(float(result.stderr))
    # progress(step, per-fold losses) every tenth of the training; the last losses show the blow-up.
    jax.effects_barrier()
    assert [step for step, _ in seen] == [10 * (i + 1) for i in range(10)]
    assert seen[-1][1].shape == (5,) and not np.isfinite(seen[-1][1]).all()


@pytest.mark.parametrize("call, message", [
    (lambda: ratio.kl(jax.random.key(0), np.zeros((20, 2)), np.zeros((20, 3))), "`y`"),
    (lambda: ratio.kl(jax.random.key(0), np.ones((9, 2)), np.ones((20, 2))), "`x` has 9 points"),
    (lambda: ratio.kl(jax.random.key(0), np.ones((20, 2)), np.ones((20, 2)), num_folds=11), "`num_folds`"),
    (lambda: ratio.kl(jax.random.key(0), np.full((20, 2), np.nan), np.ones((20, 2))), "`x` contains NaN"),
    (lambda: ratio.kl(jax.random.key(0), np.ones((20, 2)), np.full((20, 2), np.inf)), "`y` contains NaN or inf"),
    (lambda: ratio.kl(jax.random.key(0), np.ones((20, 2)), np.ones((20, 2)), method="mine"), "`method`"),
    (lambda: ratio.kl(jax.random.key(0), np.ones((20, 2)), np.ones((20, 2)), model="tree"), "`model`"),
    (lambda: ratio.kl(jax.random.key(0), np.ones(20), np.ones(20)), "`x` must have shape"),
    (lambda: ratio.kl(0, np.ones((20, 2)), np.ones((20, 2))), "`key`"),
    (lambda: ratio.kl(jax.random.key(0), np.ones((20, 2)), np.ones((20, 2)), learning_rate=-1.0), "`learning_rate`"),
    (lambda: ratio.kl(jax.random.key(0), np.ones((20, 2)), np.ones((20, 2)), penalty=np.nan), "`penalty`"),
    (lambda: ratio.kl(jax.random.key(0), np.ones((20, 2)), np.ones((20, 2)), extrapolate="no"), "`extrapolate`"),
    (lambda: ratio.mutual_information(jax.random.key(0), np.ones((20, 2)), np.ones((21, 2))), "`y`"),
    (lambda: ratio.mutual_information(jax.random.key(0), np.ones((20, 2)), np.ones((20, 2)), method="dv"),
     "`method`"),
    (lambda: ratio.kl(jax.random.key(0), np.ones((20, 2), int), np.ones((20, 2))), "`x` must have a floating"),
    (lambda: ratio.mutual_information(jax.random.key(0), np.ones((20, 2)), np.ones((20, 2)), waymarks=0),
     "`waymarks`"),
    (lambda: ratio.mutual_information(jax.random.key(0), np.ones((20, 2)), np.ones((20, 2)), method="nwj",
                                      waymarks=2), "`waymarks`"),
])
def test_bad_input_raises_eagerly_naming_the_argument(call, message):
    with pytest.raises((ValueError, TypeError), match=message.replace("(", r"\(")):
        call()
