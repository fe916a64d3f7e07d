"""kljax.analytic.kl keeps its relative precision when P and Q are close, in float32 and float64.

The truth is computed independently with mpmath at 60 digits from the parameters exactly as given
(float32 and float64 values convert to mpmath exactly), with the textbook formulas (log-gamma,
digamma, softmax, matrix inverse and log-determinant), which are exact at that precision.
"""

import dataclasses
import math
from typing import Callable

import hypothesis.strategies as st
import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings

from kljax import analytic
from kljax.analytic import kl
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

# mpmath comes with the dev extra; without it this module is skipped rather than failing to import.
import mpmath  # noqa: E402

# Relative tolerance where the true value is at least the threshold; below it, the absolute error must
# stay below tolerance * threshold.
TOLERANCE = {np.float32: 1e-2, np.float64: 1e-8}
THRESHOLD = {np.float32: 1e-7, np.float64: 1e-14}

DIGITS = 60  # mpmath working precision of the truths


# --------------------------------------------------------------------------------------------------
# mpmath truths, from the parameters as given
# --------------------------------------------------------------------------------------------------


def _mp(x):
    """An array of float32/float64 values as a list of exact mpmath numbers (nested like the array)."""
    x = np.asarray(x)
    if x.ndim == 0:
        return mpmath.mpf(float(x))
    return [_mp(row) for row in x]


def _truth_normal(p, q):
    loc_p, scale_p, loc_q, scale_q = map(_mp, (p.loc, p.scale, q.loc, q.scale))
    return (mpmath.log(scale_q / scale_p) + (scale_p**2 + (loc_p - loc_q) ** 2) / (2 * scale_q**2)
            - mpmath.mpf(1) / 2)


def _truth_laplace(p, q):
    loc_p, scale_p, loc_q, scale_q = map(_mp, (p.loc, p.scale, q.loc, q.scale))
    distance = abs(loc_p - loc_q)
    return (mpmath.log(scale_q / scale_p) + distance / scale_q
            + scale_p / scale_q * mpmath.exp(-distance / scale_p) - 1)


def _truth_exponential(p, q):
    rate_p, rate_q = _mp(p.rate), _mp(q.rate)
    return mpmath.log(rate_p / rate_q) + rate_q / rate_p - 1


def _truth_poisson(p, q):
    rate_p, rate_q = _mp(p.rate), _mp(q.rate)
    return rate_p * mpmath.log(rate_p / rate_q) - rate_p + rate_q


def _truth_gamma(p, q):
    k_p, rate_p, k_q, rate_q = map(_mp, (p.concentration, p.rate, q.concentration, q.rate))
    return ((k_p - k_q) * mpmath.digamma(k_p) - mpmath.loggamma(k_p) + mpmath.loggamma(k_q)
            + k_q * (mpmath.log(rate_p) - mpmath.log(rate_q)) + k_p * (rate_q - rate_p) / rate_p)


def _truth_dirichlet_from(a, b):
    a0, b0 = sum(a), sum(b)
    return (mpmath.loggamma(a0) - mpmath.loggamma(b0)
            + sum(mpmath.loggamma(y) - mpmath.loggamma(x) for x, y in zip(a, b))
            + sum((x - y) * (mpmath.digamma(x) - mpmath.digamma(a0)) for x, y in zip(a, b)))


def _truth_dirichlet(p, q):
    return _truth_dirichlet_from(_mp(p.concentration), _mp(q.concentration))


def _truth_beta(p, q):
    return _truth_dirichlet_from([_mp(p.alpha), _mp(p.beta)], [_mp(q.alpha), _mp(q.beta)])


def _softmax(logits):
    finite = [x for x in logits if x != -mpmath.inf]
    top = max(finite)
    weights = [mpmath.exp(x - top) if x != -mpmath.inf else mpmath.mpf(0) for x in logits]
    total = sum(weights)
    return [w / total for w in weights]


def _truth_categorical_from(logits_p, logits_q):
    probs_p, probs_q = _softmax(logits_p), _softmax(logits_q)
    total = mpmath.mpf(0)
    for p_k, q_k in zip(probs_p, probs_q):
        if p_k == 0:
            continue
        if q_k == 0:
            return mpmath.inf
        total += p_k * mpmath.log(p_k / q_k)
    return total


def _truth_categorical(p, q):
    return _truth_categorical_from(_mp(p.logits), _mp(q.logits))


def _bernoulli_logits(logit):
    # P(1) = sigmoid(l): logits (l, 0); a certain outcome has logits (0, -inf) or (-inf, 0).
    if logit == mpmath.inf:
        return [mpmath.mpf(0), -mpmath.inf]
    if logit == -mpmath.inf:
        return [-mpmath.inf, mpmath.mpf(0)]
    return [logit, mpmath.mpf(0)]


def _truth_bernoulli(p, q):
    return _truth_categorical_from(_bernoulli_logits(_mp(p.logits)), _bernoulli_logits(_mp(q.logits)))


def _loc_and_tril(distribution):
    if isinstance(distribution, MultivariateNormalDiag):
        return _mp(distribution.loc), mpmath.diag(_mp(distribution.scale_diag))
    return _mp(distribution.loc), mpmath.matrix(_mp(np.tril(distribution.scale_tril)))


def _truth_mvn(p, q):
    """Rasmussen & Williams (2006) eq. (A.23) with the covariances formed and inverted in mpmath."""
    loc_p, tril_p = _loc_and_tril(p)
    loc_q, tril_q = _loc_and_tril(q)
    d = len(loc_p)
    cov_p, cov_q = tril_p * tril_p.T, tril_q * tril_q.T
    inverse_q = mpmath.inverse(cov_q)
    diff = mpmath.matrix(loc_p) - mpmath.matrix(loc_q)
    trace = sum((inverse_q * cov_p)[i, i] for i in range(d))
    mahalanobis = (diff.T * inverse_q * diff)[0, 0]
    log_det_ratio = 2 * sum(mpmath.log(tril_q[i, i]) - mpmath.log(tril_p[i, i]) for i in range(d))
    return (trace + mahalanobis - d + log_det_ratio) / 2


# --------------------------------------------------------------------------------------------------
# Random close pairs
# --------------------------------------------------------------------------------------------------

_LOG10 = math.log(10.0)


def _log_uniform(u, low, high):
    """log x for x log-uniform on [10^low, 10^high], from u in [0, 1]."""
    return _LOG10 * (low + (high - low) * u)


@dataclasses.dataclass(frozen=True)
class Family:
    """How to draw a pair: unconstrained coordinates theta, their perturbation scales, and builders.

    P is built from the base theta and Q from a perturbed copy (or, with ``swap``, the other way round);
    coordinates in ``shared`` are never perturbed nor redrawn.
    """

    size: int
    make: Callable  # u in [0, 1]^size -> theta
    scale: Callable  # theta -> perturbation scale per coordinate
    build_p: Callable  # (theta, dtype) -> distribution
    build_q: Callable
    truth: Callable  # (p, q) -> mpmath value
    shared: tuple = ()
    swap: bool = False
    far_make: Callable | None = None  # theta of the far side, if it differs from ``make``


def _array(x, dtype):
    return np.asarray(x, np.float64).astype(dtype)


def _location_scale(kind, truth):
    return Family(
        size=2,
        make=lambda u: np.array([20 * u[0] - 10, _log_uniform(u[1], -2, 2)]),
        scale=lambda t: np.array([np.exp(t[1]), 1.0]),
        build_p=lambda t, dtype: kind(_array(t[0], dtype), _array(np.exp(t[1]), dtype)),
        build_q=lambda t, dtype: kind(_array(t[0], dtype), _array(np.exp(t[1]), dtype)),
        truth=truth,
    )


def _rate(kind, low, high, truth):
    return Family(
        size=1,
        make=lambda u: np.array([_log_uniform(u[0], low, high)]),
        scale=lambda t: np.ones(1),
        build_p=lambda t, dtype: kind(_array(np.exp(t[0]), dtype)),
        build_q=lambda t, dtype: kind(_array(np.exp(t[0]), dtype)),
        truth=truth,
    )


def _positive_pair(kind, low, high, truth):
    return Family(
        size=2,
        make=lambda u: np.array([_log_uniform(u[0], low[0], high[0]), _log_uniform(u[1], low[1], high[1])]),
        scale=lambda t: np.ones(2),
        build_p=lambda t, dtype: kind(*_array(np.exp(t), dtype)),
        build_q=lambda t, dtype: kind(*_array(np.exp(t), dtype)),
        truth=truth,
    )


NUM_CATEGORIES = 5


def _categorical(t, dtype):
    # The last coordinate (shared by P and Q) decides whether category 0 has probability zero in both.
    logits = _array(t[:NUM_CATEGORIES], dtype)
    if t[NUM_CATEGORIES] < 0.25:
        logits[0] = -np.inf
    return Categorical(logits)


def _dirichlet(t, dtype):
    return Dirichlet(_array(np.exp(t), dtype))


DIMENSION = 3
_OFF_DIAGONAL = np.tril_indices(DIMENSION, -1)


def _mvn_make(u, off_diagonal=True):
    u = np.asarray(u)
    d = DIMENSION
    return np.concatenate([10 * u[:d] - 5, _log_uniform(u[d:2 * d], -1, 1),
                           (4 * u[2 * d:] - 2) * off_diagonal])


def _mvn_scale(t):
    d = DIMENSION
    typical = np.full(d, np.exp(np.mean(t[d:2 * d])))
    return np.concatenate([typical, np.ones(d), np.ones(len(t) - 2 * d)])


def _tril(t, dtype):
    d = DIMENSION
    tril = np.diag(np.exp(t[d:2 * d]))
    tril[_OFF_DIAGONAL] = t[2 * d:]
    return MultivariateNormalTriL(_array(t[:d], dtype), _array(tril, dtype))


def _diag(t, dtype):
    d = DIMENSION
    return MultivariateNormalDiag(_array(t[:d], dtype), _array(np.exp(t[d:2 * d]), dtype))


_MVN_SIZE = 2 * DIMENSION + len(_OFF_DIAGONAL[0])

FAMILIES = {
    "Normal": _location_scale(Normal, _truth_normal),
    "Laplace": _location_scale(Laplace, _truth_laplace),
    "Exponential": _rate(Exponential, -3, 3, _truth_exponential),
    "Poisson": _rate(Poisson, -3, 4, _truth_poisson),
    "Gamma": _positive_pair(Gamma, (-2, -3), (4, 3), _truth_gamma),
    "Beta": _positive_pair(Beta, (-2, -2), (4, 4), _truth_beta),
    "Dirichlet": Family(
        size=3, make=lambda u: _log_uniform(np.asarray(u), -2, 3), scale=lambda t: np.ones(3),
        build_p=_dirichlet, build_q=_dirichlet, truth=_truth_dirichlet),
    "Bernoulli": Family(
        size=1, make=lambda u: np.array([40 * u[0] - 20]), scale=lambda t: np.maximum(1.0, np.abs(t)),
        build_p=lambda t, dtype: Bernoulli(_array(t[0], dtype)),
        build_q=lambda t, dtype: Bernoulli(_array(t[0], dtype)), truth=_truth_bernoulli),
    "Categorical": Family(
        size=NUM_CATEGORIES + 1,
        make=lambda u: np.concatenate([20 * np.asarray(u[:NUM_CATEGORIES]) - 10, u[NUM_CATEGORIES:]]),
        scale=lambda t: np.concatenate([np.maximum(1.0, np.abs(t[:NUM_CATEGORIES])), [0.0]]),
        build_p=_categorical, build_q=_categorical, truth=_truth_categorical, shared=(NUM_CATEGORIES,)),
    "MultivariateNormalDiag": Family(
        size=2 * DIMENSION, make=_mvn_make, scale=_mvn_scale, build_p=_diag, build_q=_diag, truth=_truth_mvn),
    "MultivariateNormalTriL": Family(
        size=_MVN_SIZE, make=_mvn_make, scale=_mvn_scale, build_p=_tril, build_q=_tril, truth=_truth_mvn),
    # Mixed pairs: the diagonal side is the base (its off-diagonal coordinates are 0), the TriL side
    # the perturbed or redrawn one.
    "Diag-TriL": Family(
        size=_MVN_SIZE, make=lambda u: _mvn_make(u, off_diagonal=False), scale=_mvn_scale,
        build_p=_diag, build_q=_tril, truth=_truth_mvn, far_make=_mvn_make),
    "TriL-Diag": Family(
        size=_MVN_SIZE, make=lambda u: _mvn_make(u, off_diagonal=False), scale=_mvn_scale,
        build_p=_tril, build_q=_diag, truth=_truth_mvn, swap=True, far_make=_mvn_make),
}

# The registered pair each entry exercises.
PAIRS = {
    "Normal": (Normal, Normal), "Laplace": (Laplace, Laplace), "Exponential": (Exponential, Exponential),
    "Poisson": (Poisson, Poisson), "Gamma": (Gamma, Gamma), "Beta": (Beta, Beta),
    "Dirichlet": (Dirichlet, Dirichlet), "Bernoulli": (Bernoulli, Bernoulli),
    "Categorical": (Categorical, Categorical),
    "MultivariateNormalDiag": (MultivariateNormalDiag, MultivariateNormalDiag),
    "MultivariateNormalTriL": (MultivariateNormalTriL, MultivariateNormalTriL),
    "Diag-TriL": (MultivariateNormalDiag, MultivariateNormalTriL),
    "TriL-Diag": (MultivariateNormalTriL, MultivariateNormalDiag),
}


def pair_draws(size):
    unit = st.floats(0, 1)
    return st.tuples(
        st.lists(unit, min_size=size, max_size=size),  # base
        st.lists(st.floats(-1, 1), min_size=size, max_size=size),  # perturbation directions
        st.floats(-6, -1),  # log10 of the relative perturbation
        st.integers(0, 4),  # 0: a far pair, redrawn independently
        st.lists(unit, min_size=size, max_size=size),  # the far side
    )


def make_pair(name, draw, dtype):
    family = FAMILIES[name]
    base, directions, log10_size, mode, other = draw
    theta = family.make(np.asarray(base))
    if mode == 0:
        moved = (family.far_make or family.make)(np.asarray(other))
        moved[list(family.shared)] = theta[list(family.shared)]
    else:
        moved = theta + 10.0**log10_size * np.asarray(directions) * family.scale(theta)
    first, second = (moved, theta) if family.swap else (theta, moved)
    return family.build_p(first, dtype), family.build_q(second, dtype)


def check_against_truth(name, p, q):
    """Asserts the contract for one pair and returns (value, truth) as floats."""
    dtype = np.dtype(p.dtype).type
    value = kl(p, q)
    assert value.dtype == dtype
    value = float(value)
    with mpmath.workdps(DIGITS):
        truth = float(FAMILIES[name].truth(p, q))
    assert not math.isnan(value) and value >= 0, (value, truth)
    if truth >= THRESHOLD[dtype]:
        assert abs(value - truth) <= TOLERANCE[dtype] * truth, (value, truth, abs(value - truth) / truth)
    else:
        assert abs(value - truth) <= TOLERANCE[dtype] * THRESHOLD[dtype], (value, truth)
    return value, truth


# --------------------------------------------------------------------------------------------------
# Property test over every registered closed form
# --------------------------------------------------------------------------------------------------


def test_every_registered_pair_is_covered():
    assert set(PAIRS.values()) == set(analytic._REGISTRY)


# 13 pairs x 2 dtypes x 40 examples = 1040 cases; one compilation per pair and dtype (fixed shapes).
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
@pytest.mark.parametrize("name", list(FAMILIES))
def test_close_pairs_keep_relative_precision(name, dtype):
    @settings(max_examples=40)
    @given(pair_draws(FAMILIES[name].size))
    def check(draw):
        check_against_truth(name, *make_pair(name, draw, dtype))

    check()


# --------------------------------------------------------------------------------------------------
# Regressions: pairs that the textbook formulas got wrong in float32 (value, then the truth)
# --------------------------------------------------------------------------------------------------

f32 = np.float32


def _tril3(entry_10, entry_00=1.0):
    return np.array([[entry_00, 0, 0], [entry_10, 1, 0], [0, 0, 1]], f32)


# name -> (P, Q) builders; the comment gives what the textbook formula returned, then the truth.
REGRESSIONS = {
    # -2.9e-6 for 2.6e-9
    "Dirichlet": lambda: (Dirichlet(np.array([2, 3, 4], f32)), Dirichlet(np.array([2.0001, 3, 4], f32))),
    # 5.9e-7 for 1.3e-10
    "Gamma": lambda: (Gamma(f32(2), f32(1)), Gamma(f32(2.00002), f32(1))),
    # 7.0e-7 for 2.1e-9; -5.9e-8 for 3.0e-9
    "Beta": lambda: (Beta(f32(2), f32(3)), Beta(f32(2.0001), f32(3))),
    "Beta-both": lambda: (Beta(f32(2), f32(3)), Beta(f32(2.0002), f32(3.0003))),
    # 8.8e-10 for 9.8e-10
    "Bernoulli": lambda: (Bernoulli(f32(1)), Bernoulli(f32(1.0001))),
    # 3.5e-9 for 1.1e-9; -3.5e-9 for 7.2e-10
    "Categorical": lambda: (Categorical(np.array([0, 1, 2, 0, 0], f32)),
                            Categorical(np.array([0, 1, 2.0001, 0, 0], f32))),
    "Categorical-first": lambda: (Categorical(np.array([0.5, -1, 2, 0, 0], f32)),
                                  Categorical(np.array([0.5001, -1, 2, 0, 0], f32))),
    # 0 for 5.0e-9; -5.0e-9 for 1.1e-8
    "MultivariateNormalTriL": lambda: (MultivariateNormalTriL(np.zeros(3, f32), _tril3(0.5)),
                                       MultivariateNormalTriL(np.zeros(3, f32), _tril3(0.5001))),
    "MultivariateNormalTriL-diagonal": lambda: (
        MultivariateNormalTriL(np.zeros(3, f32), _tril3(0.5)),
        MultivariateNormalTriL(np.zeros(3, f32), _tril3(0.5, 1.0001))),
}


@pytest.mark.parametrize("case", list(REGRESSIONS))
def test_float32_regressions(case):
    value, truth = check_against_truth(case.split("-")[0], *REGRESSIONS[case]())
    assert value == pytest.approx(truth, rel=1e-4)


def test_dirichlet_and_gamma_reproducers_exact_numbers():
    np.testing.assert_allclose(float(kl(*REGRESSIONS["Dirichlet"]())), 2.6316360e-09, rtol=1e-5)
    np.testing.assert_allclose(float(kl(*REGRESSIONS["Gamma"]())), 1.2933685e-10, rtol=1e-5)


@pytest.mark.parametrize("logits_p, logits_q", [
    ([0, -100, 0, 0, 0], [0, 100, 0, 0, 0]),  # p e^c overflows: the logsumexp branch
    ([0, -100, 0, 0, 0], [0, -70, 0, 0, 0]),  # c = 30 on a category of mass e^-100: p phi(c) = e^-70
    ([-np.inf, 0, 1, 2, 3], [5, 0, 1, 2, 3]),  # Q puts most of its mass where P has none
    ([-np.inf, 0, 1, 2, 3], [-20, 0, 1, 2.0001, 3]),  # ... and a tiny mass, with close logits
    ([0, 1, 2, 3, 4], [1, 2, 3, 4, 5.0001]),  # a constant offset between the logits
])
@pytest.mark.parametrize("dtype", [np.float32, np.float64], ids=["float32", "float64"])
def test_categorical_extreme_logits(logits_p, logits_q, dtype):
    p, q = Categorical(np.asarray(logits_p, dtype)), Categorical(np.asarray(logits_q, dtype))
    value, truth = check_against_truth("Categorical", p, q)
    assert value == pytest.approx(truth, rel=TOLERANCE[dtype])


def test_categorical_and_bernoulli_infinite_cases():
    p, q = Categorical(np.array([0.0, 0, 0, 0, 0])), Categorical(np.array([0.0, 0, 0, 0, -np.inf]))
    assert float(kl(p, q)) == np.inf
    assert float(kl(q, p)) == pytest.approx(math.log(5 / 4), rel=1e-14)
    logits = np.array([np.inf, -np.inf, np.inf, 3.0, 3.0])
    other = np.array([2.0, -np.inf, -np.inf, np.inf, -np.inf])
    values = kl(Bernoulli(logits), Bernoulli(other))
    np.testing.assert_allclose(values[:1], [np.log1p(np.exp(-2.0))], rtol=1e-14)
    np.testing.assert_array_equal(values[1:], [0.0, np.inf, np.inf, np.inf])


# --------------------------------------------------------------------------------------------------
# Gradients: finite (zero) at P = Q, equal to finite differences away from it
# --------------------------------------------------------------------------------------------------

GRADIENT_FAMILIES = list(FAMILIES)


@pytest.mark.parametrize("name", GRADIENT_FAMILIES)
def test_gradient_zero_at_equality_and_matches_finite_differences(name):
    family = FAMILIES[name]
    rng = np.random.default_rng(GRADIENT_FAMILIES.index(name))
    # A base pair with moderate parameters (u in [0.3, 0.7]) and full support.
    theta = family.make(rng.uniform(0.3, 0.7, family.size))
    other = family.make(rng.uniform(0.3, 0.7, family.size))
    other[list(family.shared)] = theta[list(family.shared)]
    if name == "Categorical":
        theta[NUM_CATEGORIES] = other[NUM_CATEGORIES] = 1.0
    p, q = family.build_p(theta, np.float64), family.build_q(other, np.float64)
    flat, unravel = jax.flatten_util.ravel_pytree((p, q))
    value_and_grad = jax.jit(jax.value_and_grad(lambda vector: kl(*unravel(vector))))
    # P = Q: both halves of the vector from P (same structure, so one compilation).
    equal, _ = jax.flatten_util.ravel_pytree((p, family.build_q(theta, np.float64)))
    value, gradient = value_and_grad(equal)
    assert float(value) == pytest.approx(0.0, abs=1e-15)
    np.testing.assert_allclose(gradient, np.zeros_like(gradient), atol=1e-12)
    value, gradient = value_and_grad(flat)
    assert np.all(np.isfinite(gradient))
    step = 1e-6
    differences = [(value_and_grad(flat + step * e)[0] - value_and_grad(flat - step * e)[0]) / (2 * step)
                   for e in np.eye(flat.size)]
    np.testing.assert_allclose(gradient, differences, rtol=1e-5, atol=1e-8)


# --------------------------------------------------------------------------------------------------
# Batch shapes
# --------------------------------------------------------------------------------------------------


def test_batch_shape_mismatch_names_both_shapes_and_types():
    p, q = Normal(jnp.zeros(3), 1.0), Normal(jnp.zeros(4), 1.0)
    with pytest.raises(ValueError, match=r"P \(Normal\).*\(3,\).*Q \(Normal\).*\(4,\)"):
        kl(p, q)
    with pytest.raises(ValueError, match=r"\(3,\).*\(4,\)"):
        jax.jit(kl)(p, q)
    p = MultivariateNormalTriL(jnp.zeros((2, 3)), jnp.eye(3))
    q = MultivariateNormalDiag(jnp.zeros((5, 3)), jnp.ones(3))
    with pytest.raises(ValueError, match=r"MultivariateNormalTriL.*\(2,\).*MultivariateNormalDiag.*\(5,\)"):
        kl(p, q)
