"""kljax.analytic.kl against quadrature, exact summation, NumPy closed forms and Monte Carlo."""

import decimal

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import integrate, special, stats

from kljax import analytic
from kljax.analytic import kl, register_kl
from kljax.distributions import (
    Bernoulli,
    Beta,
    Categorical,
    Dirichlet,
    Distribution,
    Exponential,
    Gamma,
    Laplace,
    MultivariateNormalDiag,
    MultivariateNormalTriL,
    Normal,
    Poisson,
)

# --------------------------------------------------------------------------------------------------
# Independent truths
# --------------------------------------------------------------------------------------------------

# family -> (kljax constructor, SciPy frozen constructor) from the same positional parameters.
UNIVARIATE = {
    "Normal": (Normal, lambda loc, scale: stats.norm(loc, scale)),
    "Laplace": (Laplace, lambda loc, scale: stats.laplace(loc, scale)),
    "Exponential": (Exponential, lambda rate: stats.expon(scale=1 / rate)),
    "Gamma": (Gamma, lambda k, rate: stats.gamma(k, scale=1 / rate)),
    "Beta": (Beta, lambda a, b: stats.beta(a, b)),
}

QUADRATURE_CASES = [
    ("Normal", (0.0, 1.0), (1.0, 2.0)),
    ("Normal", (0.3, 0.5), (-1.0, 0.45)),
    ("Normal", (1.0, 1.0), (1.001, 1.002)),
    ("Laplace", (0.0, 1.0), (1.0, 2.0)),
    ("Laplace", (0.5, 0.3), (0.4, 0.35)),
    ("Laplace", (-2.0, 2.0), (3.0, 0.5)),
    ("Exponential", (1.0,), (2.0,)),
    ("Exponential", (0.3,), (0.301,)),
    ("Exponential", (5.0,), (0.2,)),
    ("Gamma", (2.0, 1.0), (3.0, 2.0)),
    ("Gamma", (1.2, 0.5), (1.5, 3.0)),
    ("Gamma", (9.0, 2.0), (8.5, 1.9)),
    ("Beta", (2.0, 3.0), (1.0, 1.0)),
    ("Beta", (1.5, 4.0), (3.0, 2.0)),
    ("Beta", (5.0, 1.2), (4.5, 1.5)),
]


def _quadrature_kl(p, q):
    """integral of p(x) log(p(x) / q(x)) over all but 1e-13 of P's mass, split at the modes and kinks."""
    lower, upper = p.ppf(1e-13), p.isf(1e-13)
    inner = [x for x in (p.median(), q.median(), p.mean(), q.mean()) if lower < x < upper]
    edges = [lower, *sorted(inner), upper]

    def integrand(x):
        log_p = p.logpdf(x)
        return np.exp(log_p) * (log_p - q.logpdf(x))

    return sum(integrate.quad(integrand, a, b, epsabs=1e-14, epsrel=1e-11, limit=200)[0]
               for a, b in zip(edges[:-1], edges[1:]))


@pytest.mark.parametrize("family, params_p, params_q", QUADRATURE_CASES)
def test_univariate_kl_matches_quadrature(family, params_p, params_q):
    ours, theirs = UNIVARIATE[family]
    expected = _quadrature_kl(theirs(*params_p), theirs(*params_q))
    np.testing.assert_allclose(kl(ours(*params_p), ours(*params_q)), expected, rtol=1e-7, atol=1e-12)


@pytest.mark.parametrize("rate_p, rate_q", [(2.0, 3.0), (0.5, 7.0), (30.0, 29.9), (100.0, 140.0)])
def test_poisson_kl_matches_exact_summation(rate_p, rate_q):
    k = np.arange(int(rate_p + 40 * np.sqrt(rate_p) + 60))
    log_p, log_q = stats.poisson(rate_p).logpmf(k), stats.poisson(rate_q).logpmf(k)
    expected = np.sum(np.exp(log_p) * (log_p - log_q))
    np.testing.assert_allclose(kl(Poisson(rate_p), Poisson(rate_q)), expected, rtol=1e-10)


def _phi(u):
    """e^u - 1 - u in 50-digit decimal arithmetic."""
    return u.exp() - 1 - u


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-13), (np.float32, 2e-6)])
@pytest.mark.parametrize("ratio", [1 + 2**-10, 1 - 2**-17, 1.3])
def test_nearby_distributions_keep_relative_precision(dtype, rtol, ratio):
    # Truth in decimal arithmetic from the exactly represented parameters; KL ~ (ratio - 1)^2 is tiny
    # when the distributions are close, which naive forms (log a - log b, exp(u) - 1 - u) lose.
    with decimal.localcontext(decimal.Context(prec=50)):
        a, b = dtype(2.0), dtype(2.0) * dtype(ratio)
        a_, b_ = decimal.Decimal(float(a)), decimal.Decimal(float(b))
        u = (b_ / a_).ln()  # log(b / a)
        expected = {
            "Normal": _phi(-2 * u) / 2,  # same loc, scales a and b
            "Exponential": _phi(u),  # rates a and b
            "Poisson": a_ * _phi(u),  # rates a and b
            "Laplace": _phi(-u),  # same loc, scales a and b
            "Laplace-shifted": _phi(-abs(b_ - a_) / a_),  # scale a, locations a and b
        }
    got = {
        "Normal": kl(Normal(dtype(0), a), Normal(dtype(0), b)),
        "Exponential": kl(Exponential(a), Exponential(b)),
        "Poisson": kl(Poisson(a), Poisson(b)),
        "Laplace": kl(Laplace(dtype(0), a), Laplace(dtype(0), b)),
        "Laplace-shifted": kl(Laplace(a, a), Laplace(b, a)),
    }
    for name, value in got.items():
        assert value.dtype == dtype
        np.testing.assert_allclose(float(value), float(expected[name]), rtol=rtol, err_msg=name)


def test_categorical_kl_matches_rel_entr():
    rng = np.random.default_rng(0)
    logits_p, logits_q = rng.normal(size=(2, 5, 6)) * 2
    expected = special.rel_entr(special.softmax(logits_p, -1), special.softmax(logits_q, -1)).sum(-1)
    np.testing.assert_allclose(kl(Categorical(logits_p), Categorical(logits_q)), expected, rtol=1e-10)


def test_categorical_zero_probability_categories():
    logits_p = jnp.array([0.5, -jnp.inf, 1.0, -jnp.inf])
    logits_q = jnp.array([0.0, 0.2, -1.0, -jnp.inf])
    probs_p, probs_q = special.softmax(np.asarray(logits_p)), special.softmax(np.asarray(logits_q))
    np.testing.assert_allclose(kl(Categorical(logits_p), Categorical(logits_q)),
                               special.rel_entr(probs_p, probs_q).sum(), rtol=1e-12)
    gradients = jax.grad(lambda a, b: kl(Categorical(a), Categorical(b)), argnums=(0, 1))(logits_p, logits_q)
    for gradient in gradients:
        assert np.all(np.isfinite(gradient))
    # p > 0 where q = 0: +inf, not NaN.
    assert float(kl(Categorical(logits_q), Categorical(logits_p))) == np.inf


@pytest.mark.parametrize("logit_p, logit_q", [(0.0, 2.0), (-3.0, 1.5), (4.0, 4.01), (-20.0, 20.0)])
def test_bernoulli_kl_matches_rel_entr(logit_p, logit_q):
    p, q = special.expit(logit_p), special.expit(logit_q)
    # 1 - expit(l) = expit(-l) keeps the small complements exact.
    expected = special.rel_entr(p, q) + special.rel_entr(special.expit(-logit_p), special.expit(-logit_q))
    np.testing.assert_allclose(kl(Bernoulli(logit_p), Bernoulli(logit_q)), expected, rtol=1e-10)


def test_bernoulli_kl_extreme_logits_float32():
    logits_p = jnp.array([1e4, jnp.inf, -jnp.inf, jnp.inf, 30.0], jnp.float32)
    logits_q = jnp.array([-1e4, 2.0, -3.0, jnp.inf, -30.0], jnp.float32)
    value = kl(Bernoulli(logits_p), Bernoulli(logits_q))
    assert value.dtype == jnp.float32
    # P certain of 1 (0): D = -log sigmoid(l_q) (-log sigmoid(-l_q)); identical certainties: 0.
    expected = [1e4, -np.log(special.expit(2.0)), -np.log(special.expit(3.0)), 0.0, 30.0 + np.log1p(np.exp(-30.0))]
    np.testing.assert_allclose(value, expected, rtol=1e-6)
    gradient = jax.grad(lambda a: jnp.sum(kl(Bernoulli(a), Bernoulli(logits_q))))(logits_p)
    assert np.all(np.isfinite(gradient))


def _numpy_gaussian_kl(mean_p, cov_p, mean_q, cov_q):
    """Rasmussen & Williams (2006) eq. (A.23) with explicit inverses and slogdet."""
    inverse_q = np.linalg.inv(cov_q)
    diff = mean_q - mean_p
    return 0.5 * (np.trace(inverse_q @ cov_p) + diff @ inverse_q @ diff - len(mean_p)
                  + np.linalg.slogdet(cov_q)[1] - np.linalg.slogdet(cov_p)[1])


def _random_tril(rng, d, batch=()):
    tril = np.tril(rng.normal(size=batch + (d, d)) * 0.5, -1)
    return tril + np.eye(d) * rng.uniform(0.5, 1.5, size=batch + (d, 1))


def test_mvn_tril_kl_matches_numpy_closed_form_and_monte_carlo():
    rng = np.random.default_rng(1)
    d = 4
    loc_p, loc_q = rng.normal(size=(2, d))
    tril_p, tril_q = _random_tril(rng, d), _random_tril(rng, d)
    cov_p, cov_q = tril_p @ tril_p.T, tril_q @ tril_q.T
    value = float(kl(MultivariateNormalTriL(loc_p, tril_p), MultivariateNormalTriL(loc_q, tril_q)))
    np.testing.assert_allclose(value, _numpy_gaussian_kl(loc_p, cov_p, loc_q, cov_q), rtol=1e-10)
    # Monte Carlo with SciPy densities, within 5 standard errors.
    x = stats.multivariate_normal(loc_p, cov_p).rvs(size=100_000, random_state=rng)
    log_ratio = stats.multivariate_normal(loc_p, cov_p).logpdf(x) - stats.multivariate_normal(loc_q, cov_q).logpdf(x)
    assert abs(log_ratio.mean() - value) <= 5 * log_ratio.std() / np.sqrt(len(x))


def test_mvn_diag_kl_matches_numpy_closed_form():
    rng = np.random.default_rng(2)
    loc_p, loc_q = rng.normal(size=(2, 3))
    scale_p, scale_q = rng.uniform(0.3, 2.0, size=(2, 3))
    value = kl(MultivariateNormalDiag(loc_p, scale_p), MultivariateNormalDiag(loc_q, scale_q))
    expected = _numpy_gaussian_kl(loc_p, np.diag(scale_p**2), loc_q, np.diag(scale_q**2))
    np.testing.assert_allclose(value, expected, rtol=1e-12)


def test_dirichlet_kl_matches_monte_carlo():
    rng = np.random.default_rng(3)
    alpha, beta = np.array([1.5, 2.0, 4.0, 0.8]), np.array([2.0, 1.0, 3.0, 2.5])
    value = float(kl(Dirichlet(alpha), Dirichlet(beta)))
    x = rng.dirichlet(alpha, size=100_000)
    x = np.clip(x, 1e-300, None)
    x /= x.sum(-1, keepdims=True)
    log_ratio = stats.dirichlet(alpha).logpdf(x.T) - stats.dirichlet(beta).logpdf(x.T)
    assert abs(log_ratio.mean() - value) <= 5 * log_ratio.std() / np.sqrt(len(x))


def test_beta_kl_equals_two_component_dirichlet_kl():
    params_p, params_q = np.array([[2.0, 3.0], [0.5, 0.7]]), np.array([[1.0, 4.0], [3.0, 0.9]])
    beta = kl(Beta(params_p[:, 0], params_p[:, 1]), Beta(params_q[:, 0], params_q[:, 1]))
    np.testing.assert_allclose(beta, kl(Dirichlet(params_p), Dirichlet(params_q)), rtol=1e-10)


# --------------------------------------------------------------------------------------------------
# Properties for every registered family
# --------------------------------------------------------------------------------------------------


def _random_distribution(name, rng, batch=(), dtype=jnp.float64):
    def array(x):
        return jnp.asarray(x, dtype)

    def uniform(low, high, shape=batch):
        return array(rng.uniform(low, high, size=shape))

    if name == "Normal":
        return Normal(array(rng.normal(size=batch)), uniform(0.5, 2.0))
    if name == "MultivariateNormalDiag":
        return MultivariateNormalDiag(array(rng.normal(size=batch + (3,))), uniform(0.5, 2.0, batch + (3,)))
    if name == "MultivariateNormalTriL":
        return MultivariateNormalTriL(array(rng.normal(size=batch + (3,))), array(_random_tril(rng, 3, batch)))
    if name == "Categorical":
        return Categorical(array(rng.normal(size=batch + (4,))))
    if name == "Bernoulli":
        return Bernoulli(array(2 * rng.normal(size=batch)))
    if name == "Beta":
        return Beta(uniform(0.5, 5.0), uniform(0.5, 5.0))
    if name == "Gamma":
        return Gamma(uniform(0.5, 5.0), uniform(0.5, 3.0))
    if name == "Dirichlet":
        return Dirichlet(uniform(0.5, 5.0, batch + (3,)))
    if name == "Laplace":
        return Laplace(array(rng.normal(size=batch)), uniform(0.5, 2.0))
    if name == "Exponential":
        return Exponential(uniform(0.3, 3.0))
    if name == "Poisson":
        return Poisson(uniform(0.5, 20.0))
    raise KeyError(name)


FAMILIES = ["Normal", "MultivariateNormalDiag", "MultivariateNormalTriL", "Categorical", "Bernoulli",
            "Beta", "Gamma", "Dirichlet", "Laplace", "Exponential", "Poisson"]


@pytest.mark.parametrize("name", FAMILIES)
def test_properties(name):
    # Shapes are chosen so that few distinct programs are compiled: (12,) pairs and (3, 1) x (4,).
    rng = np.random.default_rng(FAMILIES.index(name))
    # KL(P, P) = 0 and KL(P, Q) > 0 over a batch of random pairs.
    p, q = _random_distribution(name, rng, (12,)), _random_distribution(name, rng, (12,))
    np.testing.assert_allclose(kl(p, p), np.zeros(12), atol=1e-12)
    assert np.all(np.asarray(kl(p, q)) > 0)
    # Batch shapes (3, 1) and (4,) broadcast to (3, 4), equal to the pairwise values computed with
    # both sides explicitly broadcast and flattened to (12,).
    p, q = _random_distribution(name, rng, (3, 1)), _random_distribution(name, rng, (4,))
    value = kl(p, q)
    assert value.shape == (3, 4) and value.dtype == jnp.float64
    pairs = [jax.tree_util.tree_map(lambda leaf: leaf.reshape((12,) + leaf.shape[2:]), _expand(d, (3, 4)))
             for d in (p, q)]
    np.testing.assert_allclose(value, np.asarray(kl(*pairs)).reshape(3, 4), rtol=1e-12)
    # float32 in, float32 out, close to float64.
    p32, q32 = jax.tree_util.tree_map(lambda x: np.asarray(x, np.float32), (p, q))
    value32 = kl(p32, q32)
    assert value32.dtype == jnp.float32
    np.testing.assert_allclose(value32, value, rtol=1e-4, atol=1e-5)


def _expand(dist, batch_shape):
    """``dist`` with its batch axes broadcast to ``batch_shape`` (event axes are trailing)."""
    batch_ndims = len(dist.batch_shape)
    # NumPy-side, to keep eager XLA compilations out of the test's budget.
    return jax.tree_util.tree_map(
        lambda leaf: np.broadcast_to(np.asarray(leaf), batch_shape + leaf.shape[batch_ndims:]), dist)


@pytest.mark.parametrize("name", ["Normal", "MultivariateNormalTriL", "Categorical"])
def test_jit_and_vmap(name):
    rng = np.random.default_rng(10 + FAMILIES.index(name))
    p, q = _random_distribution(name, rng, (3, 1)), _random_distribution(name, rng, (4,))
    value = kl(p, q)
    np.testing.assert_allclose(jax.jit(kl)(p, q), value, rtol=1e-12)
    # vmap over P's leading batch axis: each slice has batch (1,), broadcasting against Q's (4,).
    np.testing.assert_allclose(jax.vmap(kl, in_axes=(0, None))(p, q), value, rtol=1e-12)


@pytest.mark.parametrize("name", ["Normal", "MultivariateNormalTriL", "Dirichlet"])
def test_gradient_matches_finite_differences(name):
    rng = np.random.default_rng(4)
    p, q = _random_distribution(name, rng), _random_distribution(name, rng)
    flat, unravel = jax.flatten_util.ravel_pytree((p, q))

    def objective(vector):
        return kl(*unravel(vector))

    gradient = np.asarray(jax.grad(objective)(flat))
    assert np.all(np.isfinite(gradient))
    step = 1e-6
    basis = np.eye(flat.size)
    finite_differences = np.array([(objective(flat + step * e) - objective(flat - step * e)) / (2 * step)
                                   for e in basis])
    np.testing.assert_allclose(gradient, finite_differences, rtol=1e-6, atol=1e-8)


def test_invalid_parameters_under_jit_give_nan():
    # Under jit constructors cannot check values; the rules then give NaN rather than a finite number
    # (a negative Gamma concentration has a finite log-gamma). Each family's validity flag is
    # tested in test_distributions; here the masking of the rules, in both argument positions.
    @jax.jit
    def values(negative):
        pairs = [(Gamma(negative, 1.0), Gamma(2.0, 1.0)), (Poisson(negative), Poisson(1.0)),
                 (MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2) * negative),
                  MultivariateNormalTriL(jnp.zeros(2), jnp.eye(2)))]
        return [(kl(p, q), kl(q, p)) for p, q in pairs]

    for forward, backward in values(-1.0):
        assert np.isnan(float(forward)) and np.isnan(float(backward))


# --------------------------------------------------------------------------------------------------
# Diagonal <-> full-covariance Gaussians
# --------------------------------------------------------------------------------------------------


def test_diag_and_tril_pairs_agree():
    rng = np.random.default_rng(5)
    loc_p, loc_q = rng.normal(size=(2, 2, 3))
    scale_diag = rng.uniform(0.5, 2.0, size=(2, 3))
    diag = MultivariateNormalDiag(loc_p, scale_diag)
    diag_as_tril = MultivariateNormalTriL(loc_p, np.stack([np.diag(s) for s in scale_diag]))
    other_diag = MultivariateNormalDiag(loc_q, rng.uniform(0.5, 2.0, size=(2, 3)))
    other_tril = MultivariateNormalTriL(loc_q, _random_tril(rng, 3, (2,)))
    other_diag_as_tril = MultivariateNormalTriL(loc_q, np.stack([np.diag(s) for s in other_diag.scale_diag]))
    np.testing.assert_allclose(kl(diag, other_tril), kl(diag_as_tril, other_tril), rtol=1e-12)
    np.testing.assert_allclose(kl(other_tril, diag), kl(other_tril, diag_as_tril), rtol=1e-12)
    np.testing.assert_allclose(kl(diag, other_diag), kl(diag_as_tril, other_diag_as_tril), rtol=1e-12)


def test_event_size_mismatch_raises_naming_both_sizes():
    with pytest.raises(ValueError, match="3.*4"):
        kl(Categorical(jnp.zeros(3)), Categorical(jnp.zeros(4)))
    p, q = MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2)), MultivariateNormalTriL(jnp.zeros(3), jnp.eye(3))
    with pytest.raises(ValueError, match="2.*3"):
        jax.jit(kl)(p, q)


# --------------------------------------------------------------------------------------------------
# Registry
# --------------------------------------------------------------------------------------------------


def test_unregistered_pair_names_both_types():
    with pytest.raises(NotImplementedError, match="Normal.*Laplace"):
        kl(Normal(0.0, 1.0), Laplace(0.0, 1.0))
    with pytest.raises(NotImplementedError, match="Gamma.*Exponential"):
        kl(Gamma(1.0, 1.0), Exponential(1.0))


@pytest.fixture
def registry(monkeypatch):
    """A private copy of the registry, so pairs registered by a test do not leak."""
    monkeypatch.setattr(analytic, "_REGISTRY", dict(analytic._REGISTRY))


def test_register_kl_adds_a_pair(registry):
    class PointMass(Distribution):
        _parameter_names = ("value",)

        def __init__(self, value):
            self.value = jnp.asarray(value)

    # D(delta_v || N(m, s^2)) is infinite; a toy rule to see dispatch: -log q(v).
    @register_kl(PointMass, Normal)
    def _kl_point_normal(p, q):
        return -q.log_prob(p.value)

    value = kl(PointMass(1.0), Normal(0.0, 1.0))
    np.testing.assert_allclose(value, -stats.norm.logpdf(1.0), rtol=1e-12)
    # The registered pair works under jit too (PointMass became a pytree by subclassing).
    np.testing.assert_allclose(jax.jit(kl)(PointMass(1.0), Normal(0.0, 1.0)), value, rtol=1e-12)
    with pytest.raises(NotImplementedError, match="Normal.*PointMass"):
        kl(Normal(0.0, 1.0), PointMass(1.0))


def test_lookup_follows_subclass_mro(registry):
    class TemperedNormal(Normal):
        pass

    p, q = TemperedNormal(0.0, 1.0), Normal(1.0, 2.0)
    expected = analytic.kl_normal(Normal(0.0, 1.0), q)
    # Inherits the (Normal, Normal) rule in both positions.
    np.testing.assert_allclose(kl(p, q), expected, rtol=1e-12)
    np.testing.assert_allclose(kl(q, p), analytic.kl_normal(q, Normal(0.0, 1.0)), rtol=1e-12)

    # A more specific registration wins for that pair only.
    @register_kl(TemperedNormal, Normal)
    def _kl_tempered(p, q):
        return 2 * analytic.kl_normal(p, q)

    np.testing.assert_allclose(kl(p, q), 2 * expected, rtol=1e-12)
    np.testing.assert_allclose(kl(q, p), analytic.kl_normal(q, Normal(0.0, 1.0)), rtol=1e-12)
    np.testing.assert_allclose(kl(p, TemperedNormal(1.0, 2.0)), 2 * expected, rtol=1e-12)
