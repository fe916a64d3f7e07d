"""Tests for kljax.mc against NumPy formulas, high-precision references and closed forms.

Closed forms for P = N(0, 1), Q = N(mu, 1): at x ~ P the log-ratio t = log Q(x) - log P(x) =
mu x - mu^2 / 2 is N(-mu^2 / 2, mu^2), r = e^t, and Gaussian moment identities
(E[t^k e^{lt}] for t ~ N(m, s^2)) give the mean and variance of every per-sample term
(``_closed_form_moments``). ``test_closed_form_moments_match_quadrature`` checks those derivations
by numerical integration, so the Monte Carlo tests compare against verified truths. Monte Carlo
tolerances are 5 standard errors.
"""

from __future__ import annotations

import math
from decimal import Decimal, getcontext

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st
from scipy import integrate, stats

from kljax import mc

FORWARD = {"k1": mc.k1, "k2": mc.k2, "k3": mc.k3}
REVERSE = {"k1": mc.reverse_k1, "k3": mc.reverse_k3}
ALL_TERMS = {**{f"forward_{k}": f for k, f in FORWARD.items()},
             **{f"reverse_{k}": f for k, f in REVERSE.items()}}
SIGMAS = 5.0


def _closed_form_moments(name: str, mu: float) -> tuple[float, float]:
    """(mean, variance) of one per-sample term for P = N(0, 1), Q = N(mu, 1)."""
    m2 = mu * mu
    e = math.exp(m2)
    return {
        # k1 = -t ~ N(mu^2/2, mu^2)
        "forward_k1": (m2 / 2, m2),
        # k2 = t^2 / 2; E[t^2] = mu^2 + mu^4/4, Var[t^2] = 2 s^4 + 4 m^2 s^2
        "forward_k2": ((m2 + m2 * m2 / 4) / 2, m2 * m2 / 2 + m2 ** 3 / 4),
        # k3 = r - 1 - t; E[r] = 1, Var[r] = e^{mu^2} - 1, Cov(r, t) = mu^2
        "forward_k3": (m2 / 2, e - 1 - m2),
        # r t; E[t^2 e^{2t}] = ((m + 2 s^2)^2 + s^2) e^{2m + 2 s^2}
        "reverse_k1": (m2 / 2, (9 * m2 * m2 / 4 + m2) * e - m2 * m2 / 4),
        # r (t - 1) + 1; E[r^2 (t - 1)^2] = e^{mu^2} (9 mu^4/4 - 2 mu^2 + 1)
        "reverse_k3": (m2 / 2, e * (9 * m2 * m2 / 4 - 2 * m2 + 1) - (m2 / 2 - 1) ** 2),
    }[name]


def _numpy_terms(log_p: np.ndarray, log_q: np.ndarray) -> dict[str, np.ndarray]:
    """The textbook per-sample formulas, written with r = Q/P directly."""
    r = np.exp(log_q - log_p)
    return {
        "forward_k1": log_p - log_q,
        "forward_k2": 0.5 * (log_p - log_q) ** 2,
        "forward_k3": (r - 1) - np.log(r),
        "reverse_k1": r * np.log(r),
        "reverse_k3": r * np.log(r) - (r - 1),
    }


def _gaussian_log_densities(key, mu: float, num_samples: int, dtype=jnp.float64, sigma: float = 1.0):
    """log P(x), log Q(x) at x ~ P = N(0, 1), Q = N(mu, sigma^2) (the shared constant dropped)."""
    x = jax.random.normal(key, (num_samples,), dtype)
    return -0.5 * x * x, -0.5 * ((x - mu) / sigma) ** 2 - math.log(sigma)


# --------------------------------------------------------------------------------------------------
# per-sample terms
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(ALL_TERMS))
def test_terms_match_numpy_formulas(name):
    rng = np.random.default_rng(0)
    log_p = rng.normal(-3.0, 2.0, size=(4, 50))
    log_q = log_p + rng.uniform(-6.0, 6.0, size=(4, 50))
    got = np.asarray(ALL_TERMS[name](log_p, log_q))
    want = _numpy_terms(log_p, log_q)[name]
    assert got.shape == (4, 50)
    # atol covers the cancellation the textbook formulas suffer for |t| << 1
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def _high_precision(name: str, t: float) -> float:
    getcontext().prec = 50
    t = Decimal(t)
    r = t.exp()
    return float({"forward_k3": r - 1 - t, "reverse_k3": r * (t - 1) + 1}[name])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("name", ["forward_k3", "reverse_k3"])
def test_terms_accurate_to_a_few_ulps_for_all_log_ratios(name, dtype):
    # t from 1e-12 (where expm1(t) - t loses every digit) to 30, both signs
    magnitudes = np.logspace(-12, np.log10(30.0), 300)
    t = np.concatenate([-magnitudes, magnitudes]).astype(dtype)
    got = np.asarray(ALL_TERMS[name](np.zeros_like(t), t))
    assert got.dtype == dtype
    want = np.array([_high_precision(name, float(v)) for v in t])
    relative_error = np.abs(got - want) / want
    assert np.max(relative_error) < 8 * np.finfo(dtype).eps


@given(
    log_p=hnp.arrays(np.float64, 16, elements=st.floats(-60, 60)),
    log_q=hnp.arrays(np.float64, 16, elements=st.floats(-60, 60)),
    dtype=st.sampled_from([np.float32, np.float64]),
)
def test_nonnegative_terms_are_nonnegative_and_zero_iff_equal(log_p, log_q, dtype):
    log_p, log_q = log_p.astype(dtype), log_q.astype(dtype)
    # below |t| ~ 1e-19 the exact value t^2 / 2 underflows float32, so "nonzero" needs a margin
    differ = np.abs(log_q.astype(np.float64) - log_p) > 1e-10
    for f in (mc.k2, mc.k3, mc.reverse_k3):
        value = np.asarray(f(log_p, log_q))
        assert np.all(value >= 0)
        assert np.all(value[differ] > 0)
        assert np.all(value[log_p == log_q] == 0)
        assert np.all(np.asarray(f(log_p, log_p)) == 0)


def test_infinite_log_densities_follow_the_limits():
    log_p = jnp.array([0.0, 0.0, -jnp.inf])
    log_q = jnp.array([-jnp.inf, 0.0, 0.0])  # Q(x) = 0; equal; P(x) = 0
    np.testing.assert_array_equal(mc.k1(log_p, log_q), [np.inf, 0.0, -np.inf])
    np.testing.assert_array_equal(mc.k2(log_p, log_q), [np.inf, 0.0, np.inf])
    np.testing.assert_array_equal(mc.k3(log_p, log_q), [np.inf, 0.0, np.inf])
    # r = 0: 0 log 0 = 0 and 0 log 0 - (0 - 1) = 1
    np.testing.assert_array_equal(mc.reverse_k1(log_p, log_q), [0.0, 0.0, np.inf])
    np.testing.assert_array_equal(mc.reverse_k3(log_p, log_q), [1.0, 0.0, np.inf])
    assert float(mc.kl(log_p[:1], log_q[:1])) == np.inf


# --------------------------------------------------------------------------------------------------
# reductions, dtypes and transformations
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.float64])
def test_output_dtype_follows_input(dtype):
    log_p = jnp.linspace(-2.0, 0.0, 6, dtype=dtype).reshape(2, 3)
    log_q = jnp.flip(log_p, axis=-1)
    for f in list(FORWARD.values()) + list(REVERSE.values()):
        assert f(log_p, log_q).dtype == dtype
    for name in mc.ESTIMATORS:
        assert mc.kl(log_p, log_q, estimator=name).dtype == dtype
        assert all(v.dtype == dtype for v in mc.kl_with_stderr(log_p, log_q, estimator=name))
    for name in mc.REVERSE_ESTIMATORS:
        assert mc.reverse_kl(log_p, log_q, estimator=name).dtype == dtype
        assert all(v.dtype == dtype for v in mc.reverse_kl_with_stderr(log_p, log_q, estimator=name))


def test_float32_agrees_with_float64():
    log_p, log_q = _gaussian_log_densities(jax.random.key(1), 0.7, 1000)
    for name in mc.ESTIMATORS:
        want = mc.kl(log_p, log_q, estimator=name)
        got = mc.kl(log_p.astype(jnp.float32), log_q.astype(jnp.float32), estimator=name)
        np.testing.assert_allclose(got, want, rtol=1e-5)


@pytest.mark.parametrize("name", mc.ESTIMATORS)
def test_kl_and_stderr_match_numpy_mean_and_std(name):
    rng = np.random.default_rng(1)
    log_p, log_q = rng.normal(size=(3, 40)), rng.normal(size=(3, 40))
    terms = _numpy_terms(log_p, log_q)[f"forward_{name}"]
    for axis in (0, 1, -1):
        estimate, stderr = mc.kl_with_stderr(log_p, log_q, estimator=name, axis=axis)
        np.testing.assert_allclose(estimate, terms.mean(axis=axis), rtol=1e-12)
        np.testing.assert_allclose(stderr, terms.std(axis=axis, ddof=1) / math.sqrt(terms.shape[axis]),
                                   rtol=1e-12)
        np.testing.assert_allclose(mc.kl(log_p, log_q, estimator=name, axis=axis), estimate, rtol=1e-14)


def test_reverse_kl_and_stderr_match_numpy_mean_and_std():
    rng = np.random.default_rng(2)
    log_p, log_q = rng.normal(size=(5, 30)), rng.normal(size=(5, 30))
    for name in mc.REVERSE_ESTIMATORS:
        terms = _numpy_terms(log_p, log_q)[f"reverse_{name}"]
        estimate, stderr = mc.reverse_kl_with_stderr(log_p, log_q, estimator=name)
        np.testing.assert_allclose(estimate, terms.mean(axis=-1), rtol=1e-12)
        np.testing.assert_allclose(stderr, terms.std(axis=-1, ddof=1) / math.sqrt(30), rtol=1e-12)
        np.testing.assert_allclose(mc.reverse_kl(log_p, log_q, estimator=name), estimate, rtol=1e-14)


def test_stderr_of_a_single_sample_is_nan():
    estimate, stderr = mc.kl_with_stderr(jnp.array([-1.0]), jnp.array([-2.0]))
    assert np.isfinite(estimate) and np.isnan(stderr)


def test_jit_and_vmap_agree_with_eager():
    rng = np.random.default_rng(3)
    log_p, log_q = rng.normal(size=(3, 20)), rng.normal(size=(3, 20))
    for name in mc.ESTIMATORS:
        eager = mc.kl_with_stderr(log_p, log_q, estimator=name)
        jitted = jax.jit(lambda a, b: mc.kl_with_stderr(a, b, estimator=name))(log_p, log_q)
        mapped = jax.vmap(lambda a, b: mc.kl_with_stderr(a, b, estimator=name))(log_p, log_q)
        looped = [mc.kl_with_stderr(a, b, estimator=name) for a, b in zip(log_p, log_q)]
        for got in (jitted, mapped):
            np.testing.assert_allclose(got[0], eager[0], rtol=1e-13)
            np.testing.assert_allclose(got[1], eager[1], rtol=1e-13)
        np.testing.assert_allclose(mapped[0], [v[0] for v in looped], rtol=1e-13)
    for name in mc.REVERSE_ESTIMATORS:
        jitted = jax.jit(lambda a, b: mc.reverse_kl(a, b, estimator=name))(log_p, log_q)
        np.testing.assert_allclose(jitted, mc.reverse_kl(log_p, log_q, estimator=name), rtol=1e-13)


def test_gradients_match_derivatives_of_the_terms():
    # d/dt of each term (t = log_q - log_p): k1 -1, k2 t, k3 expm1(t), r log r (1 + t) e^t,
    # r log r - (r - 1) t e^t; t spans both the series and the closed-form branches and t = 0.
    t = np.array([0.0, 1e-6, -0.3, 0.49, 0.51, -2.0, 4.0])
    log_p = np.linspace(-3.0, -1.0, t.size)
    log_q = log_p + t
    n = t.size
    derivatives = {
        (mc.kl, "k1"): -np.ones_like(t), (mc.kl, "k2"): t, (mc.kl, "k3"): np.expm1(t),
        (mc.reverse_kl, "k1"): (1 + t) * np.exp(t), (mc.reverse_kl, "k3"): t * np.exp(t),
    }
    for (f, name), dt in derivatives.items():
        grad = jax.jit(jax.grad(lambda a, b: f(a, b, estimator=name), argnums=(0, 1)))
        grad_p, grad_q = grad(log_p, log_q)
        np.testing.assert_allclose(grad_q, dt / n, rtol=1e-10, atol=1e-15)
        np.testing.assert_allclose(grad_p, -dt / n, rtol=1e-10, atol=1e-15)


def test_gradients_finite_at_infinite_log_densities():
    log_p = jnp.zeros(3)
    log_q = jnp.array([-jnp.inf, 0.0, 1.0])
    for f, names in ((mc.kl, ("k3",)), (mc.reverse_kl, mc.REVERSE_ESTIMATORS)):
        for name in names:
            grad = jax.jit(jax.grad(lambda b: f(log_p, b, estimator=name)))(log_q)
            assert np.all(np.isfinite(grad)), (f.__name__, name, grad)


# --------------------------------------------------------------------------------------------------
# errors
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("function", [mc.kl, mc.kl_with_stderr])
def test_unknown_estimator_lists_the_valid_names(function):
    with pytest.raises(ValueError, match=r"'k4'.*\['k1', 'k2', 'k3'\]"):
        function(jnp.zeros(3), jnp.zeros(3), estimator="k4")


def test_unknown_reverse_estimator_lists_the_valid_names():
    with pytest.raises(ValueError, match=r"'k2'.*\['k1', 'k3'\]"):
        mc.reverse_kl(jnp.zeros(3), jnp.zeros(3), estimator="k2")


def test_shape_mismatch_raises_eagerly_and_under_jit():
    with pytest.raises(ValueError, match=r"`log_p` and `log_q`.*\(3,\) and \(4,\)"):
        mc.kl(jnp.zeros(3), jnp.zeros(4))
    with pytest.raises(ValueError, match=r"\(2, 3\) and \(3,\)"):
        jax.jit(mc.k3)(jnp.zeros((2, 3)), jnp.zeros(3))


def test_bad_values_and_dtypes_raise():
    with pytest.raises(TypeError, match="`log_q`.*floating"):
        mc.k1(jnp.zeros(3), jnp.zeros(3, dtype=jnp.int32))
    with pytest.raises(ValueError, match="`log_p` contains NaN"):
        mc.kl(jnp.array([0.0, jnp.nan]), jnp.zeros(2))
    with pytest.raises(ValueError, match="`axis`=2"):
        mc.kl(jnp.zeros((2, 2)), jnp.zeros((2, 2)), axis=2)
    # under jit a NaN cannot raise; it must come out as NaN
    assert np.isnan(jax.jit(mc.kl)(jnp.array([0.0, jnp.nan]), jnp.zeros(2)))
    # a concrete array closed over by a jitted function is still checked (at trace time)
    closed_over = jnp.array([0.0, jnp.nan])
    with pytest.raises(ValueError, match="`log_p` contains NaN"):
        jax.jit(lambda b: mc.kl(closed_over, b))(jnp.zeros(2))


@pytest.mark.parametrize("function", [mc.kl, mc.kl_with_stderr, mc.reverse_kl,
                                      mc.reverse_kl_with_stderr])
def test_empty_sample_axis_raises(function):
    # The mean of no samples used to come back as a silent NaN.
    with pytest.raises(ValueError, match=r"`log_p` is empty along the sample axis 0 \(shape \(0,\)\)"):
        function(jnp.zeros(0), jnp.zeros(0))
    with pytest.raises(ValueError, match=r"`log_p` is empty along the sample axis 0 \(shape \(0, 3\)\)"):
        function(jnp.zeros((0, 3)), jnp.zeros((0, 3)), axis=0)
    # the size is static: under jit it raises at trace time too
    with pytest.raises(ValueError, match="`log_p` is empty"):
        jax.jit(function)(jnp.zeros((2, 0)), jnp.zeros((2, 0)))
    # an empty batch axis is fine: no estimates, each of many samples
    out = function(jnp.zeros((0, 3)), jnp.zeros((0, 3)))
    assert all(np.shape(o) == (0,) for o in (out if isinstance(out, tuple) else (out,)))


def test_per_sample_terms_of_no_samples_are_empty():
    for term in (*FORWARD.values(), *REVERSE.values()):
        assert term(jnp.zeros(0), jnp.zeros(0)).shape == (0,)


def test_kl_from_rejects_bad_arguments():
    key = jax.random.key(0)

    class NoLogProb:
        def sample(self, key, shape):
            return jnp.zeros(shape)

    good = _DuckNormal(0.0, 1.0)
    with pytest.raises(TypeError, match="`q`.*NoLogProb.*`log_prob`"):
        mc.kl_from(key, good, NoLogProb(), 10)
    with pytest.raises(ValueError, match="`num_samples` must be >= 1"):
        mc.kl_from(key, good, good, 0)
    with pytest.raises(TypeError, match="`num_samples` must be an int"):
        mc.reverse_kl_from(key, good, good, 10.0)
    with pytest.raises(ValueError, match="valid names"):
        mc.kl_from(key, good, good, 10, estimator="reverse")


# --------------------------------------------------------------------------------------------------
# Monte Carlo against closed forms
# --------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("mu", [0.5, 1.0])
@pytest.mark.parametrize("name", sorted(ALL_TERMS))
def test_closed_form_moments_match_quadrature(name, mu):
    def term(x):
        log_p, log_q = np.array([-0.5 * x * x]), np.array([-0.5 * (x - mu) ** 2])
        return _numpy_terms(log_p, log_q)[name][0]

    def moment(k):
        # beyond |x| = 20 the integrands are below e^-100
        value, _ = integrate.quad(lambda x: term(x) ** k * stats.norm.pdf(x), -20.0, 20.0,
                                  epsabs=1e-13, epsrel=1e-11, limit=200)
        return value

    mean, variance = _closed_form_moments(name, mu)
    np.testing.assert_allclose(moment(1), mean, rtol=1e-8)
    np.testing.assert_allclose(moment(2) - moment(1) ** 2, variance, rtol=1e-7)


@pytest.mark.parametrize("mu", [0.5, 1.0])
@pytest.mark.parametrize("name", sorted(ALL_TERMS))
def test_mean_and_spread_match_closed_forms(name, mu):
    num_samples = 400_000
    log_p, log_q = _gaussian_log_densities(jax.random.key(10), mu, num_samples)
    terms = np.asarray(ALL_TERMS[name](log_p, log_q))
    mean, variance = _closed_form_moments(name, mu)
    # bias: the sample mean within 5 standard errors of the exact expectation
    assert abs(terms.mean() - mean) < SIGMAS * math.sqrt(variance / num_samples)
    # spread: the sample variance within 5 of its own (data-estimated) standard errors
    centred_squares = (terms - terms.mean()) ** 2
    assert abs(centred_squares.mean() - variance) < SIGMAS * centred_squares.std() / math.sqrt(num_samples)


def test_k1_k3_unbiased_and_k2_biased_for_mu_1():
    # D(N(0,1) || N(1,1)) = 1/2; E[k2] = 5/8, a bias the sample detects at > 5 sigma.
    num_samples = 200_000
    log_p, log_q = _gaussian_log_densities(jax.random.key(11), 1.0, num_samples)
    for name in mc.ESTIMATORS:
        estimate, stderr = mc.kl_with_stderr(log_p, log_q, estimator=name)
        bias = float(estimate) - 0.5
        if name == "k2":
            assert abs(bias - 0.125) < SIGMAS * float(stderr)
            assert bias > SIGMAS * float(stderr)
        else:
            assert abs(bias) < SIGMAS * float(stderr)


@pytest.mark.parametrize("mu", [0.1, 0.5])
def test_k3_spreads_less_than_k1_for_close_distributions(mu):
    # Var[k3] = e^{mu^2} - 1 - mu^2 ~ mu^4 / 2 against Var[k1] = mu^2 (closed forms above),
    # and the samples show it.
    log_p, log_q = _gaussian_log_densities(jax.random.key(12), mu, 100_000)
    _, stderr_k1 = mc.kl_with_stderr(log_p, log_q, estimator="k1")
    _, stderr_k3 = mc.kl_with_stderr(log_p, log_q, estimator="k3")
    ratio = _closed_form_moments("forward_k3", mu)[1] / _closed_form_moments("forward_k1", mu)[1]
    np.testing.assert_allclose((stderr_k3 / stderr_k1) ** 2, ratio, rtol=0.05)
    assert stderr_k3 < stderr_k1


@pytest.mark.slow
@pytest.mark.parametrize("name", mc.ESTIMATORS)
def test_stderr_is_calibrated_against_the_spread_over_seeds(name):
    mu, num_samples, num_seeds = 0.7, 64, 4000
    mean, variance = _closed_form_moments(f"forward_{name}", mu)

    def one_seed(key):
        log_p, log_q = _gaussian_log_densities(key, mu, num_samples)
        return mc.kl_with_stderr(log_p, log_q, estimator=name)

    estimates, stderrs = jax.jit(jax.vmap(one_seed))(jax.random.split(jax.random.key(13), num_seeds))
    estimates, squared_stderrs = np.asarray(estimates), np.asarray(stderrs) ** 2
    target = variance / num_samples
    # E[stderr^2] = Var / n exactly (ddof=1)
    assert abs(squared_stderrs.mean() - target) < SIGMAS * squared_stderrs.std() / math.sqrt(num_seeds)
    # the spread of the estimates over seeds is Var / n as well, and their mean is the expectation
    spread = (estimates - estimates.mean()) ** 2
    assert abs(spread.mean() - target) < SIGMAS * spread.std() / math.sqrt(num_seeds)
    assert abs(estimates.mean() - mean) < SIGMAS * math.sqrt(target / num_seeds)


def _reverse_kl_gaussians(mu: float, sigma: float) -> float:
    """D(Q || P) for Q = N(mu, sigma^2), P = N(0, 1)."""
    return -math.log(sigma) + (sigma**2 + mu**2) / 2 - 0.5


@pytest.mark.parametrize(("mu", "sigma"), [(0.5, 1.0), (0.3, 0.8), (1.0, 1.2)])
@pytest.mark.parametrize("name", mc.REVERSE_ESTIMATORS)
def test_reverse_kl_matches_closed_form(name, mu, sigma):
    # sigma^2 < 2 keeps the importance weights' variance finite, so the stderr is meaningful.
    log_p, log_q = _gaussian_log_densities(jax.random.key(14), mu, 400_000, sigma=sigma)
    estimate, stderr = mc.reverse_kl_with_stderr(log_p, log_q, estimator=name)
    assert abs(float(estimate) - _reverse_kl_gaussians(mu, sigma)) < SIGMAS * float(stderr)


# --------------------------------------------------------------------------------------------------
# kl_from: kljax distributions, duck-typed objects, numpyro
# --------------------------------------------------------------------------------------------------


class _DuckNormal:
    """Only ``sample(key, shape)`` and ``log_prob(x)``: what kl_from asks of a distribution."""

    def __init__(self, loc, scale):
        self.loc, self.scale = loc, scale

    def sample(self, key, shape):
        return self.loc + self.scale * jax.random.normal(key, shape)

    def log_prob(self, x):
        return _normal_log_density(x, self.loc, self.scale)


def _normal_log_density(x, loc, scale):
    return -0.5 * ((x - loc) / scale) ** 2 - jnp.log(scale) - 0.5 * math.log(2 * math.pi)


def _kl_gaussians(loc_p, scale_p, loc_q, scale_q):
    """D(N(loc_p, scale_p^2) || N(loc_q, scale_q^2)), elementwise."""
    loc_p, scale_p, loc_q, scale_q = map(np.asarray, (loc_p, scale_p, loc_q, scale_q))
    return (np.log(scale_q / scale_p) + (scale_p**2 + (loc_p - loc_q) ** 2) / (2 * scale_q**2) - 0.5)


def _k2_expectation(mu, sigma):
    """E[k2] for P = N(0, 1), Q = N(mu, sigma^2): log P/Q = c0 + c1 x + c2 x^2, E[x^2] = 1, E[x^4] = 3."""
    c0, c1, c2 = mu**2 / (2 * sigma**2) + math.log(sigma), -mu / sigma**2, 0.5 / sigma**2 - 0.5
    return (c0**2 + c1**2 + 3 * c2**2 + 2 * c0 * c2) / 2


def _assert_within_stderr(result, exact):
    estimate, stderr = (np.asarray(v) for v in result)
    assert estimate.shape == np.shape(exact)
    assert np.all(np.abs(estimate - exact) < SIGMAS * stderr), (estimate, stderr, exact)


@pytest.mark.parametrize("name", mc.ESTIMATORS)
def test_kl_from_duck_typed_object(name):
    p, q = _DuckNormal(0.0, 1.0), _DuckNormal(0.6, 0.9)
    result = mc.kl_from(jax.random.key(20), p, q, 50_000, estimator=name, with_stderr=True)
    # k2 is biased: compare it with its own expectation, E_P[(log P/Q)^2] / 2
    exact = _k2_expectation(0.6, 0.9) if name == "k2" else _kl_gaussians(0.0, 1.0, 0.6, 0.9)
    _assert_within_stderr(result, exact)
    assert float(mc.kl_from(jax.random.key(20), p, q, 50_000, estimator=name)) == float(result[0])


def test_kl_from_kljax_normal_batched():
    distributions = pytest.importorskip("kljax.distributions")
    loc_q = jnp.array([0.0, 0.3, 1.0])
    p = distributions.Normal(jnp.zeros(3), jnp.ones(3))
    q = distributions.Normal(loc_q, jnp.array([1.0, 1.2, 0.9]))
    result = jax.jit(lambda key: mc.kl_from(key, p, q, 100_000, with_stderr=True))(jax.random.key(21))
    exact = _kl_gaussians(np.zeros(3), np.ones(3), loc_q, [1.0, 1.2, 0.9])
    assert exact[0] == 0 and float(result[0][0]) == 0  # P = Q: every k3 term is exactly 0
    _assert_within_stderr((result[0][1:], result[1][1:]), exact[1:])


def test_kl_from_kljax_multivariate_normal_and_reverse():
    distributions = pytest.importorskip("kljax.distributions")
    p = distributions.MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2))
    q = distributions.MultivariateNormalDiag(jnp.array([0.5, -0.2]), jnp.array([1.1, 0.8]))
    exact_pq = _kl_gaussians(0.0, 1.0, np.array([0.5, -0.2]), np.array([1.1, 0.8])).sum()
    exact_qp = _kl_gaussians(np.array([0.5, -0.2]), np.array([1.1, 0.8]), 0.0, 1.0).sum()
    _assert_within_stderr(mc.kl_from(jax.random.key(22), p, q, 100_000, with_stderr=True), exact_pq)
    _assert_within_stderr(mc.reverse_kl_from(jax.random.key(23), p, q, 100_000, with_stderr=True),
                          exact_qp)


def test_kl_from_under_jit_and_grad():
    p, q = _DuckNormal(0.0, 1.0), _DuckNormal(0.5, 1.0)
    key = jax.random.key(24)
    eager = mc.kl_from(key, p, q, 1000)
    jitted = jax.jit(lambda k: mc.kl_from(k, p, q, 1000))(key)
    np.testing.assert_allclose(jitted, eager, rtol=1e-12)

    # d/d loc_q of the k1 estimate is mean(loc_q - x) = loc_q - mean(x), for any sample
    def estimate(loc_q):
        return mc.kl_from(key, p, _DuckNormal(loc_q, 1.0), 1000, estimator="k1")

    x = p.sample(key, (1000,))
    np.testing.assert_allclose(jax.grad(estimate)(0.5), 0.5 - float(jnp.mean(x)), rtol=1e-10)


@pytest.fixture
def numpyro_distributions():
    # numpyro broadcasts parameters against samples by rank promotion, which the test suite
    # otherwise forbids; kl_from itself does not need it.
    dist = pytest.importorskip("numpyro.distributions")
    with jax.numpy_rank_promotion("allow"):
        yield dist


def test_kl_from_numpyro_normal(numpyro_distributions):
    dist = numpyro_distributions
    p = dist.Normal(jnp.zeros(2), jnp.ones(2))
    q = dist.Normal(jnp.array([0.4, 1.0]), jnp.array([1.0, 1.3]))
    result = mc.kl_from(jax.random.key(25), p, q, 100_000, with_stderr=True)
    _assert_within_stderr(result, _kl_gaussians(0.0, 1.0, [0.4, 1.0], [1.0, 1.3]))


def test_kl_from_numpyro_multivariate_normal(numpyro_distributions):
    dist = numpyro_distributions
    cov_q = np.array([[1.5, 0.3, 0.0], [0.3, 1.0, -0.2], [0.0, -0.2, 0.8]])
    loc_q = np.array([0.2, -0.4, 0.1])

    @jax.jit  # built inside the trace: numpyro's eager construction (Cholesky etc.) is slow op by op
    def estimate(key):
        p = dist.MultivariateNormal(jnp.zeros(3), jnp.eye(3))
        q = dist.MultivariateNormal(jnp.asarray(loc_q), jnp.asarray(cov_q))
        return mc.kl_from(key, p, q, 100_000, with_stderr=True)

    result = estimate(jax.random.key(26))
    # log_prob of a multivariate distribution is per sample: one scalar estimate
    assert np.shape(result[0]) == ()
    precision = np.linalg.inv(cov_q)
    exact = 0.5 * (np.trace(precision) + loc_q @ precision @ loc_q - 3 + np.log(np.linalg.det(cov_q)))
    _assert_within_stderr(result, exact)
