"""kljax.distributions against SciPy densities, entropies and moments, plus pytree/transform behaviour."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special, stats

from kljax.distributions import (
    Bernoulli,
    Beta,
    Categorical,
    Dirichlet,
    Exponential,
    Gamma,
    Laplace,
    MultivariateNormalDiag,
    MultivariateNormalTriL,
    Normal,
    Poisson,
)

LOGITS = np.array([[0.3, -1.0, 2.0, -np.inf], [0.0, 0.5, -0.5, 1.0]])
DIAG_LOC = np.array([[0.0, 1.0, -2.0], [0.5, 0.5, 0.5]])
DIAG_SCALE = np.array([[1.0, 0.5, 3.0], [2.0, 1.0, 0.3]])
TRIL_LOC = np.array([[0.0, 1.0, -1.0], [2.0, 0.0, 0.5]])
TRIL_SCALE = np.array([
    [[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [-0.3, 0.2, 0.7]],
    [[0.5, 0.0, 0.0], [-1.0, 1.0, 0.0], [0.4, 0.4, 1.5]],
])
CONCENTRATION = np.array([[1.0, 2.0, 3.0], [0.5, 4.0, 1.5]])


def _arrays(dtype, *values):
    return [jnp.asarray(v, dtype) for v in values]


# name -> (constructor from dtype, batch shape, event shape)
FAMILIES = {
    "Normal": (lambda dt: Normal(*_arrays(dt, [0.0, 1.0, -2.0], [1.0, 0.5, 3.0])), (3,), ()),
    "MultivariateNormalDiag": (lambda dt: MultivariateNormalDiag(*_arrays(dt, DIAG_LOC, DIAG_SCALE)), (2,), (3,)),
    "MultivariateNormalTriL": (lambda dt: MultivariateNormalTriL(*_arrays(dt, TRIL_LOC, TRIL_SCALE)), (2,), (3,)),
    "Categorical": (lambda dt: Categorical(*_arrays(dt, LOGITS)), (2,), ()),
    "Bernoulli": (lambda dt: Bernoulli(*_arrays(dt, [-2.0, 0.0, 1.5])), (3,), ()),
    "Beta": (lambda dt: Beta(*_arrays(dt, [0.5, 2.0, 5.0], [0.7, 3.0, 1.0])), (3,), ()),
    "Gamma": (lambda dt: Gamma(*_arrays(dt, [0.5, 2.0, 9.0], [1.0, 3.0, 0.5])), (3,), ()),
    "Dirichlet": (lambda dt: Dirichlet(*_arrays(dt, CONCENTRATION)), (2,), (3,)),
    "Laplace": (lambda dt: Laplace(*_arrays(dt, [0.0, 1.0, -2.0], [1.0, 0.5, 3.0])), (3,), ()),
    "Exponential": (lambda dt: Exponential(*_arrays(dt, [0.3, 1.0, 4.0])), (3,), ()),
    "Poisson": (lambda dt: Poisson(*_arrays(dt, [0.5, 4.0, 150.0])), (3,), ()),
}
DISCRETE = {"Categorical", "Bernoulli", "Poisson"}

# Univariate families with a vectorised SciPy twin (same parameters as FAMILIES).
SCIPY_UNIVARIATE = {
    "Normal": stats.norm([0.0, 1.0, -2.0], [1.0, 0.5, 3.0]),
    "Bernoulli": stats.bernoulli(special.expit([-2.0, 0.0, 1.5])),
    "Beta": stats.beta([0.5, 2.0, 5.0], [0.7, 3.0, 1.0]),
    "Gamma": stats.gamma([0.5, 2.0, 9.0], scale=1 / np.array([1.0, 3.0, 0.5])),
    "Laplace": stats.laplace([0.0, 1.0, -2.0], [1.0, 0.5, 3.0]),
    "Exponential": stats.expon(scale=1 / np.array([0.3, 1.0, 4.0])),
    "Poisson": stats.poisson([0.5, 4.0, 150.0]),
}


def _scipy_multivariate(name):
    """One frozen SciPy distribution per batch member."""
    if name == "MultivariateNormalDiag":
        return [stats.multivariate_normal(m, np.diag(s**2)) for m, s in zip(DIAG_LOC, DIAG_SCALE)]
    if name == "MultivariateNormalTriL":
        return [stats.multivariate_normal(m, L @ L.T) for m, L in zip(TRIL_LOC, TRIL_SCALE)]
    if name == "Dirichlet":
        return [stats.dirichlet(a) for a in CONCENTRATION]
    raise KeyError(name)


def _make(name, dtype=jnp.float64):
    return FAMILIES[name][0](dtype)


# --------------------------------------------------------------------------------------------------
# log_prob, entropy, mean, variance against SciPy
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(SCIPY_UNIVARIATE))
def test_univariate_against_scipy(name):
    dist, reference = _make(name), SCIPY_UNIVARIATE[name]
    points = reference.ppf(np.array([[0.05], [0.3], [0.5], [0.8], [0.97]]) * np.ones(3))
    reference_log_prob = reference.logpmf(points) if name in DISCRETE else reference.logpdf(points)
    np.testing.assert_allclose(dist.log_prob(points), reference_log_prob, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dist.entropy(), reference.entropy(), rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(dist.mean(), reference.mean(), rtol=1e-12)
    np.testing.assert_allclose(dist.variance(), reference.var(), rtol=1e-12)


@pytest.mark.parametrize("name", ["MultivariateNormalDiag", "MultivariateNormalTriL", "Dirichlet"])
def test_multivariate_against_scipy(name):
    dist, references = _make(name), _scipy_multivariate(name)
    # Evaluation points drawn from SciPy, shape (num_points, batch, d): log_prob broadcasts the extra axis.
    rng = np.random.default_rng(0)
    points = np.stack([ref.rvs(size=4, random_state=rng) for ref in references], axis=1)
    expected = np.stack([ref.logpdf(points[:, i].T if name == "Dirichlet" else points[:, i])
                         for i, ref in enumerate(references)], axis=1)
    np.testing.assert_allclose(dist.log_prob(points), expected, rtol=1e-10)
    np.testing.assert_allclose(dist.entropy(), [ref.entropy() for ref in references], rtol=1e-10)
    if name == "Dirichlet":
        np.testing.assert_allclose(dist.mean(), [ref.mean() for ref in references], rtol=1e-12)
        np.testing.assert_allclose(dist.variance(), [ref.var() for ref in references], rtol=1e-12)
    else:
        np.testing.assert_allclose(dist.covariance(), [ref.cov for ref in references], rtol=1e-12)
        np.testing.assert_allclose(dist.variance(), [np.diag(ref.cov) for ref in references], rtol=1e-12)


def test_categorical_against_scipy():
    dist = _make("Categorical")
    probs = special.softmax(LOGITS, axis=-1)
    values = np.array([[0, 1], [2, 3], [3, 0]])  # shape (3, batch=2)
    with np.errstate(divide="ignore"):
        expected = np.log(probs[np.arange(2), values])
    np.testing.assert_array_equal(np.isneginf(dist.log_prob(values)), np.isneginf(expected))
    finite = np.isfinite(expected)
    np.testing.assert_allclose(np.asarray(dist.log_prob(values))[finite], expected[finite], rtol=1e-12)
    np.testing.assert_allclose(dist.entropy(), stats.entropy(probs, axis=-1), rtol=1e-12)
    # Outside the support.
    assert np.all(np.isneginf(dist.log_prob(np.array([[-1, 4]]))))


def test_categorical_zero_probability_category_is_safe():
    logits = jnp.array([0.0, -jnp.inf, 1.0])
    dist = Categorical(logits)
    assert np.isfinite(float(dist.entropy()))
    gradient = jax.grad(lambda z: Categorical(z).entropy())(logits)
    assert np.all(np.isfinite(gradient)) and float(gradient[1]) == 0.0
    draws = dist.sample(jax.random.key(1), (2000,))
    assert not np.any(np.asarray(draws) == 1)


def test_bernoulli_extreme_logits():
    dist = Bernoulli(jnp.array([jnp.inf, -jnp.inf, 1e4, -1e4], jnp.float32))
    np.testing.assert_array_equal(dist.entropy(), np.zeros(4, np.float32))
    np.testing.assert_allclose(dist.log_prob(jnp.array([1, 0, 0, 1])), [0.0, 0.0, -1e4, -1e4], rtol=1e-6)
    np.testing.assert_array_equal(dist.sample(jax.random.key(0), (3,)), [[1, 0, 1, 0]] * 3)


@pytest.mark.parametrize("rate", [1e-3, 0.3, 4.0, 60.0, 99.9, 100.1, 400.0, 5e3])
def test_poisson_entropy_by_exact_summation(rate):
    # Truth: -sum_k p_k log p_k over a range holding all but ~1e-40 of the mass.
    upper = int(rate + 40 * math.sqrt(rate) + 60)
    log_pmf = stats.poisson(rate).logpmf(np.arange(upper + 1))
    expected = -np.sum(np.exp(log_pmf) * log_pmf)
    np.testing.assert_allclose(Poisson(rate).entropy(), expected, rtol=1e-9, atol=1e-12)


def test_log_prob_outside_support():
    assert np.isneginf(float(Beta(2.0, 2.0).log_prob(1.5)))
    assert np.isneginf(float(Gamma(2.0, 1.0).log_prob(-1.0)))
    assert np.isneginf(float(Exponential(1.0).log_prob(-0.1)))
    assert np.isneginf(float(Poisson(2.0).log_prob(1.5)))
    assert np.isneginf(float(Poisson(2.0).log_prob(-1)))
    assert np.isneginf(float(Bernoulli(0.0).log_prob(0.5)))
    assert np.isneginf(float(Dirichlet(jnp.ones(3)).log_prob(jnp.array([1.2, -0.1, -0.1]))))


# --------------------------------------------------------------------------------------------------
# Sampling: moments and reparameterised gradients within 5 standard errors; shapes and dtypes
# --------------------------------------------------------------------------------------------------

NUM_GROUPS, GROUP_SIZE = 40, 250  # 10_000 draws per batch member


def _beta_second_moment_gradient(alpha, beta):
    """d/dalpha E[X^2] for X ~ Beta(alpha, beta), E[X^2] = a (a + 1) / (s (s + 1)), s = a + b."""
    total = alpha + beta
    numerator, denominator = alpha * (alpha + 1), total * (total + 1)
    return ((2 * alpha + 1) * denominator - numerator * (2 * total + 1)) / denominator**2


def _dirichlet_first_mean_gradient(alpha):
    """d/dalpha_j E[X_0] for X ~ Dir(alpha), E[X_0] = alpha_0 / sum(alpha)."""
    total = alpha.sum(-1, keepdims=True)
    gradient = -alpha[..., :1] / total**2 * np.ones_like(alpha)
    gradient[..., 0] += 1 / total[..., 0]
    return gradient


# Families sampled through jax.random.gamma's implicit reparameterisation: the pathwise gradient is
# checked statistically against d/dtheta E[g(X)] in closed form.
# name -> (differentiated parameter, g, closed-form gradient from the NumPy parameters).
IMPLICITLY_REPARAMETERISED = {
    "Beta": ("alpha", lambda x: x**2, lambda d: _beta_second_moment_gradient(d["alpha"], d["beta"])),
    "Gamma": ("concentration", lambda x: x, lambda d: 1 / d["rate"]),  # E[X] = k / b
    "Dirichlet": ("concentration", lambda x: x[..., 0], lambda d: _dirichlet_first_mean_gradient(d["concentration"])),
}


def _check_moments(dist, draws):
    """Sample mean and second central moment within 5 standard errors (draws: (n,) + batch + event)."""
    n = draws.shape[0]
    mean, variance = np.asarray(dist.mean(), np.float64), np.asarray(dist.variance(), np.float64)
    centred = np.asarray(draws, np.float64) - mean
    assert np.all(np.abs(centred.mean(0)) <= 5 * np.sqrt(variance / n))
    squares = centred**2
    assert np.all(np.abs(squares.mean(0) - variance) <= 5 * squares.std(0) / np.sqrt(n))
    return centred


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(IMPLICITLY_REPARAMETERISED))
def test_sample_moments_and_implicit_reparameterisation_gradient(name):
    """One jitted reverse-mode pass gives both the draws and pathwise gradients (Figurnov et al. 2018).

    Each of NUM_GROUPS groups of draws has its own copy of the parameters, so the gradient with respect
    to a copy is that group's sum of per-draw derivatives; the spread across groups gives the standard
    error of the pathwise estimate of d/dtheta E[g(X)].
    """
    # float32: the common case, and cheaper to compile than float64 for the gamma samplers.
    dist = _make(name, jnp.float32)
    parameter, g, exact_gradient = IMPLICITLY_REPARAMETERISED[name]
    names = type(dist)._parameter_names
    cls = type(dist)

    def grouped(theta):
        values = {n: jnp.broadcast_to(getattr(dist, n), (NUM_GROUPS,) + getattr(dist, n).shape) for n in names}
        values[parameter] = theta
        draws = cls(*values.values()).sample(jax.random.key(7), (GROUP_SIZE,))
        return g(draws), draws

    @jax.jit
    def draws_and_gradients(theta):
        statistic, pullback, draws = jax.vjp(grouped, theta, has_aux=True)
        return draws, pullback(jnp.ones_like(statistic))[0] / GROUP_SIZE

    theta = getattr(dist, parameter)
    draws, group_gradients = draws_and_gradients(jnp.broadcast_to(theta, (NUM_GROUPS,) + theta.shape))
    _check_moments(dist, np.asarray(draws).reshape((-1,) + draws.shape[2:]))

    exact = exact_gradient({n: np.asarray(getattr(dist, n), np.float64) for n in names})
    group_gradients = np.asarray(group_gradients, np.float64)
    assert np.all(np.isfinite(group_gradients))
    standard_error = group_gradients.std(0) / np.sqrt(NUM_GROUPS)
    tolerance = 5 * standard_error + 1e-5 * np.abs(exact) + 1e-7
    np.testing.assert_array_less(np.abs(group_gradients.mean(0) - exact), tolerance)


@pytest.mark.parametrize(
    "name", ["Normal", "MultivariateNormalDiag", "MultivariateNormalTriL", "Laplace", "Exponential",
             "Bernoulli", "Poisson"])
def test_sample_moments(name):
    dist = _make(name)
    draws = np.asarray(dist.sample(jax.random.key(3), (NUM_GROUPS * GROUP_SIZE,)))
    centred = _check_moments(dist, draws)
    if name == "MultivariateNormalTriL":
        products = centred[..., :, None] * centred[..., None, :]
        error = np.abs(products.mean(0) - np.asarray(dist.covariance()))
        assert np.all(error <= 5 * products.std(0) / np.sqrt(draws.shape[0]))


def test_categorical_sample_frequencies():
    dist = _make("Categorical")
    num_samples = NUM_GROUPS * GROUP_SIZE
    draws = np.asarray(dist.sample(jax.random.key(3), (num_samples,)))
    probs = special.softmax(LOGITS, axis=-1)
    for b in range(2):
        frequencies = np.bincount(draws[:, b], minlength=4) / num_samples
        tolerance = 5 * np.sqrt(probs[b] * (1 - probs[b]) / num_samples)
        assert np.all(np.abs(frequencies - probs[b]) <= tolerance)


def test_grad_flows_through_location_scale_samples():
    key = jax.random.key(4)
    loc, scale_tril = jnp.zeros(3), jnp.array([[1.0, 0.0, 0.0], [0.5, 2.0, 0.0], [-0.3, 0.2, 0.7]])

    @jax.jit  # one compiled program for all three families
    def gradients_and_noise():
        def total(d):
            return jnp.sum(d.sample(key, (100,)))

        return dict(
            normal=jax.grad(total)(Normal(2.0, 3.0)), normal_noise=Normal(0.0, 1.0).sample(key, (100,)),
            tril=jax.grad(lambda t: total(MultivariateNormalTriL(loc, t)))(scale_tril),
            tril_noise=MultivariateNormalTriL(loc, jnp.eye(3)).sample(key, (100,)),
            exponential=jax.grad(lambda r: total(Exponential(r)))(2.0),
            exponential_draws=Exponential(2.0).sample(key, (100,)),
        )

    out = gradients_and_noise()
    # x = loc + scale * noise: d/dloc sum(x) = n, d/dscale sum(x) = sum(noise).
    np.testing.assert_allclose(out["normal"].loc, 100.0, rtol=1e-12)
    np.testing.assert_allclose(out["normal"].scale, np.sum(out["normal_noise"]), rtol=1e-10)
    # x = loc + L noise: d/dL_ij sum_s x_si = sum_s noise_sj on and below the diagonal, 0 above.
    expected = np.tril(np.broadcast_to(np.sum(out["tril_noise"], 0), (3, 3)))
    np.testing.assert_allclose(out["tril"], expected, rtol=1e-10, atol=1e-12)
    # x = noise / rate: d/drate sum(x) = -sum(x) / rate.
    np.testing.assert_allclose(out["exponential"], -np.sum(out["exponential_draws"]) / 2.0, rtol=1e-10)


def _abstract(name, dtype, shape):
    """Output shapes and dtypes without compiling (jax.eval_shape only traces)."""
    dist = _make(name, dtype)

    def outputs():
        draws = dist.sample(jax.random.key(0), shape)
        return dict(draws=draws, log_prob=dist.log_prob(draws), entropy=dist.entropy(),
                    mean=getattr(dist, "mean", dist.entropy)(),
                    variance=getattr(dist, "variance", dist.entropy)())

    return dist, jax.eval_shape(outputs)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_shapes(name):
    _, batch, event = FAMILIES[name]
    for shape, expected in [((5, 2), (5, 2)), (4, (4,)), ((), ())]:
        dist, out = _abstract(name, jnp.float64, shape)
        assert dist.batch_shape == batch and dist.event_shape == event
        assert out["draws"].shape == expected + batch + event
        assert out["log_prob"].shape == expected + batch
        assert out["entropy"].shape == batch


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_float32_in_float32_out(name):
    dist, out = _abstract(name, jnp.float32, (3,))
    assert dist.dtype == jnp.float32
    assert out["draws"].dtype == (jnp.int32 if name in DISCRETE else jnp.float32)
    for key in ["log_prob", "entropy", "mean", "variance"]:
        assert out[key].dtype == jnp.float32, key


@pytest.mark.parametrize(
    "make, batch, event",
    [
        (lambda: Normal(jnp.zeros((3, 1)), jnp.ones(4)), (3, 4), ()),
        (lambda: Gamma(jnp.ones((2, 1)), jnp.ones((1, 5))), (2, 5), ()),
        (lambda: MultivariateNormalDiag(jnp.zeros((3, 1, 2)), jnp.ones((4, 2))), (3, 4), (2,)),
        (lambda: MultivariateNormalTriL(jnp.zeros((3, 1, 2)), jnp.broadcast_to(jnp.eye(2), (4, 2, 2))), (3, 4), (2,)),
        (lambda: MultivariateNormalTriL(jnp.zeros(2), jnp.broadcast_to(jnp.eye(2), (4, 2, 2))), (4,), (2,)),
    ],
)
def test_parameters_broadcast(make, batch, event):
    dist = make()
    assert dist.batch_shape == batch and dist.event_shape == event
    # Rank-promotion errors would raise while tracing, so abstract evaluation suffices.
    draws = jax.eval_shape(lambda: dist.sample(jax.random.key(0), (6,)))
    assert draws.shape == (6,) + batch + event
    assert jax.eval_shape(dist.log_prob, draws).shape == (6,) + batch
    # A value without the sample axis, or with unit batch axes, broadcasts against the batch too.
    assert jax.eval_shape(dist.log_prob, jnp.zeros(batch + event)).shape == batch
    assert jax.eval_shape(dist.log_prob, jnp.zeros(event)).shape == batch
    assert jax.eval_shape(dist.entropy).shape == batch


def test_tril_log_prob_broadcasts_value_batch_against_parameter_batch():
    dist = MultivariateNormalTriL(jnp.zeros((3, 2)), jnp.array([[1.0, 0.0], [0.5, 2.0]]))
    values = jnp.arange(10.0).reshape(5, 1, 2)
    expected = stats.multivariate_normal(np.zeros(2), [[1.0, 0.5], [0.5, 4.25]]).logpdf(np.asarray(values[:, 0]))
    np.testing.assert_allclose(dist.log_prob(values), np.broadcast_to(expected[:, None], (5, 3)), rtol=1e-10)


def test_python_scalars_follow_array_dtype():
    assert Normal(jnp.zeros(2, jnp.float32), 1.0).dtype == jnp.float32
    assert Normal(0, 1).dtype == jnp.result_type(float)
    assert Gamma(np.float32(2.0), 1).dtype == jnp.float32


# --------------------------------------------------------------------------------------------------
# Pytrees under jit / vmap; float32 numerics
# --------------------------------------------------------------------------------------------------

# Points inside each family's support, shape (2,) + batch + event.
POINTS = {
    "Normal": np.array([[0.1, 1.2, -3.0], [2.0, 0.0, 0.5]]),
    "MultivariateNormalDiag": DIAG_LOC[None] + np.array([0.3, -0.2, 1.0]) * np.ones((2, 1, 1)),
    "MultivariateNormalTriL": TRIL_LOC[None] + np.array([0.3, -0.2, 1.0]) * np.ones((2, 1, 1)),
    "Categorical": np.array([[0, 1], [2, 3]]),
    "Bernoulli": np.array([[0, 1, 1], [1, 0, 0]]),
    "Beta": np.array([[0.1, 0.5, 0.9], [0.3, 0.2, 0.99]]),
    "Gamma": np.array([[0.1, 0.5, 20.0], [2.0, 0.2, 9.0]]),
    "Dirichlet": np.array([[0.2, 0.3, 0.5], [0.1, 0.6, 0.3]]) * np.ones((2, 1, 1)),
    "Laplace": np.array([[0.1, 1.2, -3.0], [2.0, 0.0, 0.5]]),
    "Exponential": np.array([[0.1, 1.2, 3.0], [2.0, 0.0, 0.5]]),
    "Poisson": np.array([[0, 3, 140], [2, 5, 160]]),
}


def _scipy_log_prob_and_entropy(name, points):
    """SciPy's log density at ``points`` ((n,) + batch + event) and entropy, for any family."""
    if name in SCIPY_UNIVARIATE:
        reference = SCIPY_UNIVARIATE[name]
        log_prob = reference.logpmf(points) if name in DISCRETE else reference.logpdf(points)
        return log_prob, reference.entropy()
    if name == "Categorical":
        log_probs = special.log_softmax(LOGITS, axis=-1)
        return log_probs[np.arange(2), points], stats.entropy(np.exp(log_probs), axis=-1)
    references = _scipy_multivariate(name)
    log_prob = np.stack([ref.logpdf(points[:, i].T if name == "Dirichlet" else points[:, i])
                         for i, ref in enumerate(references)], axis=1)
    return log_prob, np.array([ref.entropy() for ref in references])


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_float32_matches_scipy(name):
    dist, points = _make(name, jnp.float32), POINTS[name]
    expected_log_prob, expected_entropy = _scipy_log_prob_and_entropy(name, points)
    for got, want in [(dist.log_prob(points.astype(np.float32)), expected_log_prob),
                      (dist.entropy(), expected_entropy)]:
        assert got.dtype == jnp.float32
        np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("name", ["Normal", "MultivariateNormalTriL", "Categorical", "Dirichlet"])
def test_vmap_over_distribution(name):
    dist, points = _make(name), POINTS[name]
    # vmap over the first batch axis of the distribution and the matching axis of the values.
    mapped = jax.vmap(lambda d, x: (d.log_prob(x), d.entropy()), in_axes=(0, 1))(dist, points)
    np.testing.assert_allclose(mapped[0].T, dist.log_prob(points), rtol=1e-12)
    np.testing.assert_allclose(mapped[1], dist.entropy(), rtol=1e-12)


def test_distributions_are_pytrees_through_jit():
    dist = _make("MultivariateNormalTriL")
    leaves = jax.tree_util.tree_leaves(dist)
    assert [leaf.shape for leaf in leaves] == [(2, 3), (2, 3, 3)]
    # A distribution built inside jit comes out as a distribution with the same parameters.
    rebuilt = jax.jit(lambda loc, tril: MultivariateNormalTriL(loc, tril))(dist.loc, dist.scale_tril)
    assert type(rebuilt) is MultivariateNormalTriL
    np.testing.assert_array_equal(rebuilt.scale_tril, dist.scale_tril)
    shifted = jax.jit(lambda d: jax.tree_util.tree_map(lambda leaf: leaf * 2, d))(_make("Gamma"))
    assert type(shifted) is Gamma
    np.testing.assert_allclose(shifted.rate, 2 * _make("Gamma").rate)


def test_grad_of_log_prob_matches_closed_form():
    # d/dloc log N(x; loc, scale) = (x - loc) / scale^2
    gradient = jax.grad(lambda d: d.log_prob(2.0))(Normal(0.5, 2.0))
    assert isinstance(gradient, Normal)
    np.testing.assert_allclose(gradient.loc, 1.5 / 4.0, rtol=1e-12)
    np.testing.assert_allclose(gradient.scale, -1 / 2.0 + 1.5**2 / 8.0, rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Validation
# --------------------------------------------------------------------------------------------------

NAN, INF = float("nan"), float("inf")


@pytest.mark.parametrize(
    "make, argument",
    [
        (lambda: Normal(0.0, -1.0), "scale"),
        (lambda: Normal(0.0, 0.0), "scale"),
        (lambda: Normal(NAN, 1.0), "loc"),
        (lambda: Normal(0.0, NAN), "scale"),
        (lambda: Normal(INF, 1.0), "loc"),
        (lambda: MultivariateNormalDiag(jnp.zeros(2), jnp.array([1.0, 0.0])), "scale_diag"),
        (lambda: MultivariateNormalDiag(jnp.zeros(2), jnp.ones(3)), "scale_diag"),
        (lambda: MultivariateNormalTriL(jnp.zeros(2), jnp.array([[1.0, 0.0], [0.0, -1.0]])), "scale_tril"),
        (lambda: MultivariateNormalTriL(jnp.zeros(2), jnp.array([[1.0, 0.0], [NAN, 1.0]])), "scale_tril"),
        (lambda: MultivariateNormalTriL(jnp.zeros(3), jnp.eye(2)), "scale_tril"),
        (lambda: MultivariateNormalTriL(jnp.zeros((3, 2)), jnp.broadcast_to(jnp.eye(2), (4, 2, 2))), "scale_tril"),
        (lambda: Categorical(jnp.array([0.0, NAN])), "logits"),
        (lambda: Categorical(jnp.array([0.0, INF])), "logits"),
        (lambda: Categorical(jnp.array([-INF, -INF])), "logits"),
        (lambda: Categorical(0.0), "logits"),
        (lambda: Bernoulli(NAN), "logits"),
        (lambda: Beta(0.0, 1.0), "alpha"),
        (lambda: Beta(1.0, -1.0), "beta"),
        (lambda: Gamma(-1.0, 1.0), "concentration"),
        (lambda: Gamma(1.0, 0.0), "rate"),
        (lambda: Gamma(1.0, INF), "rate"),
        (lambda: Dirichlet(jnp.array([1.0, 0.0])), "concentration"),
        (lambda: Dirichlet(jnp.array([1.0])), "concentration"),
        (lambda: Laplace(0.0, 0.0), "scale"),
        (lambda: Exponential(-1.0), "rate"),
        (lambda: Poisson(0.0), "rate"),
    ],
)
def test_bad_parameters_raise_naming_the_argument(make, argument):
    with pytest.raises(ValueError, match=f"`{argument}`|{argument}"):
        make()


def test_complex_parameter_raises_type_error():
    with pytest.raises(TypeError, match="`loc`"):
        Normal(jnp.array([1 + 2j]), 1.0)


def _invalid_distributions(negative, nan):
    """Each family with one parameter out of its domain, built without ``__init__``'s checks."""
    one = jnp.ones_like(negative)

    def unchecked(cls, *leaves):
        return cls.tree_unflatten(None, [jnp.asarray(leaf) for leaf in leaves])

    return {
        "Normal": unchecked(Normal, 0.0, negative),
        "MultivariateNormalDiag": unchecked(MultivariateNormalDiag, jnp.zeros(2), jnp.stack([one, negative])),
        "MultivariateNormalTriL": unchecked(MultivariateNormalTriL, jnp.zeros(2),
                                            jnp.stack([jnp.stack([one, 0 * one]), jnp.stack([0.3 * one, negative])])),
        "Categorical": unchecked(Categorical, jnp.stack([one, nan])),
        "Bernoulli": unchecked(Bernoulli, nan),
        "Beta": unchecked(Beta, negative, 1.0),
        "Gamma": unchecked(Gamma, negative, 1.0),
        "Dirichlet": unchecked(Dirichlet, jnp.stack([one, negative])),
        "Laplace": unchecked(Laplace, 0.0, negative),
        "Exponential": unchecked(Exponential, negative),
        "Poisson": unchecked(Poisson, negative),
    }


INSIDE_SUPPORT = {"Normal": 0.5, "MultivariateNormalDiag": np.zeros(2), "MultivariateNormalTriL": np.zeros(2),
                  "Categorical": 0, "Bernoulli": 1, "Beta": 0.5, "Gamma": 1.0, "Dirichlet": np.array([0.4, 0.6]),
                  "Laplace": 0.0, "Exponential": 1.0, "Poisson": 2}


@pytest.mark.parametrize("negative, nan", [(-1.0, np.nan), (0.0, np.nan), (np.nan, np.nan), (np.inf, np.nan)])
def test_every_family_flags_invalid_parameters(negative, nan):
    # Families whose bad parameters do not propagate NaN by themselves have a validity flag, which the
    # methods (and kljax.analytic) use to return NaN under jit.
    distributions = _invalid_distributions(jnp.asarray(negative), jnp.asarray(nan))
    assert set(distributions) == set(FAMILIES)
    for name, dist in distributions.items():
        valid = dist._valid()
        if valid is None:  # Categorical, Bernoulli: NaN logits give NaN everywhere.
            assert np.isnan(float(jnp.sum(dist.entropy()))), name
        else:
            assert not np.any(np.asarray(valid)), name


def test_invalid_parameters_under_jit_give_nan_not_errors():
    # A negative Gamma concentration has a finite log-gamma: without the mask a finite wrong number
    # would come out. Built inside jit, so the constructors' eager checks are skipped.
    @jax.jit
    def evaluate(negative):
        gamma, normal = Gamma(negative, 1.0), MultivariateNormalTriL(jnp.zeros(2), jnp.eye(2) * negative)
        return [gamma.log_prob(1.0), gamma.entropy(), gamma.mean(), gamma.variance(),
                normal.log_prob(jnp.zeros(2)), normal.entropy(), normal.covariance(),
                normal.sample(jax.random.key(0), (2,))]

    for value in evaluate(-1.0):
        assert np.all(np.isnan(value))
