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


def _square(x):
    return x**2


def _second_moment(d):
    return d.variance() + d.mean() ** 2


# name -> (differentiated parameter, g, E[g] from the distribution's own mean/variance).
# Per-sample g is summed over the event axis, so multivariate families give one value per batch member.
REPARAMETERISED = {
    "Normal": ("scale", _square, _second_moment),
    "MultivariateNormalDiag": ("scale_diag", lambda x: jnp.sum(x**2, -1), lambda d: jnp.sum(_second_moment(d), -1)),
    "MultivariateNormalTriL": ("scale_tril", lambda x: jnp.sum(x**2, -1), lambda d: jnp.sum(_second_moment(d), -1)),
    "Beta": ("alpha", _square, _second_moment),
    "Gamma": ("concentration", lambda x: x, lambda d: d.mean()),
    "Dirichlet": ("concentration", lambda x: x[..., 0], lambda d: d.mean()[..., 0]),
    "Laplace": ("scale", _square, _second_moment),
    "Exponential": ("rate", lambda x: x, lambda d: d.mean()),
}


def _check_moments(dist, draws):
    """Sample mean and second central moment within 5 standard errors (draws: (n,) + batch + event)."""
    n = draws.shape[0]
    mean, variance = np.asarray(dist.mean()), np.asarray(dist.variance())
    centred = np.asarray(draws, np.float64) - mean
    assert np.all(np.abs(centred.mean(0)) <= 5 * np.sqrt(variance / n))
    squares = centred**2
    assert np.all(np.abs(squares.mean(0) - variance) <= 5 * squares.std(0) / np.sqrt(n))
    return centred


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(REPARAMETERISED))
def test_sample_moments_and_reparameterised_gradient(name):
    """One jitted reverse-mode pass gives both the draws and pathwise gradients (Figurnov et al. 2018).

    Each of NUM_GROUPS groups of draws has its own copy of the parameters, so the gradient with respect
    to a copy is that group's sum of per-draw derivatives; the spread across groups gives the standard
    error of the pathwise estimate of d/dtheta E[g(X)].
    """
    dist = _make(name)
    parameter, g, expected_g = REPARAMETERISED[name]
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
    draws = np.asarray(draws).reshape((-1,) + draws.shape[2:])
    centred = _check_moments(dist, draws)
    if name == "MultivariateNormalTriL":
        products = centred[..., :, None] * centred[..., None, :]
        error = np.abs(products.mean(0) - np.asarray(dist.covariance()))
        assert np.all(error <= 5 * products.std(0) / np.sqrt(draws.shape[0]))

    values = {n: getattr(dist, n) for n in names}

    def expectation(t):
        return expected_g(cls(*{**values, parameter: t}.values()))

    expected_value, expected_pullback = jax.vjp(expectation, theta)
    exact = np.asarray(expected_pullback(jnp.ones_like(expected_value))[0])
    group_gradients = np.asarray(group_gradients)
    assert np.all(np.isfinite(group_gradients))
    standard_error = group_gradients.std(0) / np.sqrt(NUM_GROUPS)
    np.testing.assert_array_less(np.abs(group_gradients.mean(0) - exact), 5 * standard_error + 1e-12)


@pytest.mark.parametrize("name", ["Bernoulli", "Poisson"])
def test_discrete_sample_moments(name):
    dist = _make(name)
    _check_moments(dist, dist.sample(jax.random.key(3), (NUM_GROUPS * GROUP_SIZE,)))


def test_categorical_sample_frequencies():
    dist = _make("Categorical")
    num_samples = NUM_GROUPS * GROUP_SIZE
    draws = np.asarray(dist.sample(jax.random.key(3), (num_samples,)))
    probs = special.softmax(LOGITS, axis=-1)
    for b in range(2):
        frequencies = np.bincount(draws[:, b], minlength=4) / num_samples
        tolerance = 5 * np.sqrt(probs[b] * (1 - probs[b]) / num_samples)
        assert np.all(np.abs(frequencies - probs[b]) <= tolerance)


def test_grad_flows_through_sample():
    # Location-scale reparameterisation: d/dloc mean(x) = 1, d/dscale mean(x) = mean(noise).
    key = jax.random.key(4)
    noise = Normal(0.0, 1.0).sample(key, (1000,))
    gradient = jax.grad(lambda d: jnp.mean(d.sample(key, (1000,))))(Normal(2.0, 3.0))
    np.testing.assert_allclose(gradient.loc, 1.0, rtol=1e-12)
    np.testing.assert_allclose(gradient.scale, jnp.mean(noise), rtol=1e-10)


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


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_float32_matches_float64(name):
    points = POINTS[name]
    double, single = _make(name), _make(name, jnp.float32)
    for got, want in [(single.log_prob(points.astype(np.float32)), double.log_prob(points)),
                      (single.entropy(), double.entropy())]:
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


def test_no_value_checks_under_jit():
    log_prob = jax.jit(lambda scale: Normal(0.0, scale).log_prob(0.0))(-1.0)
    assert np.isnan(float(log_prob))
    assert np.isnan(float(jax.jit(lambda rate: Poisson(rate).log_prob(1))(-1.0)))
