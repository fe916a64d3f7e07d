"""Tests for kljax.discrete against SciPy, NumPy brute force and closed forms."""

import functools
import math
import re

import chex
import jax
import jax.numpy as jnp
import mpmath
import numpy as np
import pytest
import scipy.spatial.distance
import scipy.special
import scipy.stats
from hypothesis import given
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp
from jax.test_util import check_grads

from kljax import _math, discrete

LN2 = math.log(2.0)
K = 6  # event size of the property tests (fixed so eager ops compile once)


def _simplex(rng, shape, zeros=0.0):
    """Random probability vectors along the last axis, with a fraction of exact zeros."""
    x = rng.gamma(0.7, size=shape)
    if zeros:
        x = np.where(rng.random(shape) < zeros, 0.0, x)
        x[..., 0] += 0.1  # keep every slice's mass positive
    return x / x.sum(-1, keepdims=True)


def _np_kl(p, q, axis=-1):
    p = p / p.sum(axis, keepdims=True)
    q = q / q.sum(axis, keepdims=True)
    return scipy.special.rel_entr(p, q).sum(axis)


def _np_kl_logits(a, b, axis=-1):
    la = scipy.special.log_softmax(np.asarray(a, np.float64), axis=axis)
    lb = scipy.special.log_softmax(np.asarray(b, np.float64), axis=axis)
    pa = np.exp(la)
    with np.errstate(invalid="ignore"):
        terms = np.where(pa > 0, pa * (la - lb), 0.0)
    return terms.sum(axis)


probability_vectors = hnp.arrays(
    np.float64,
    (K,),
    elements=st.one_of(st.just(0.0), st.floats(1e-3, 1.0)),
).filter(lambda p: p.sum() > 0)
positive_vectors = hnp.arrays(np.float64, (K,), elements=st.floats(1e-3, 1.0))
logit_vectors = hnp.arrays(np.float64, (K,), elements=st.floats(-20.0, 20.0))


# --------------------------------------------------------------------------------------------------
# _math helpers


def test_math_helpers_match_scipy_and_are_zero_safe():
    x = jnp.array([0.0, 0.0, 0.3, 0.7, 0.5])
    y = jnp.array([0.0, 0.4, 0.0, 0.2, 0.5])
    xlogx, safe_log, phi, log_ratio = map(
        jax.jit, (_math.xlogx, _math.safe_log, _math.exp_minus_one_minus, _math.log_ratio)
    )
    np.testing.assert_allclose(xlogx(x), -scipy.special.entr(x), rtol=1e-12)
    np.testing.assert_array_equal(safe_log(x), [-np.inf, -np.inf, np.log(0.3), np.log(0.7), np.log(0.5)])
    u = np.array([-50.0, -1.0, -0.09, -1e-5, 0.0, 1e-7, 0.05, 0.2, 30.0])
    with mpmath.workdps(50):
        expected = np.array([float(mpmath.expm1(v) - v) for v in u])
    np.testing.assert_allclose(phi(u), expected, rtol=1e-15)
    np.testing.assert_allclose(phi(u.astype(np.float32)), expected, rtol=3e-7)
    assert np.isposinf(phi(jnp.array([-jnp.inf, jnp.inf]))).all()
    a = np.array([1.0001, 3.0, 0.0, 1e-30], np.float32)
    b = np.array([1.0, 1.0, 2.0, 1.0], np.float32)
    with mpmath.workdps(50):
        expected = [float(mpmath.log(mpmath.mpf(float(ai)) / float(bi))) if ai > 0 else -np.inf for ai, bi in zip(a, b)]
    np.testing.assert_allclose(log_ratio(a, b), expected, rtol=2e-7)
    # Invalid input never hides in a finite value.
    assert np.isnan(xlogx(jnp.array([-0.1, jnp.nan]))).all()
    assert np.isnan(safe_log(jnp.array([-0.1, jnp.nan]))).all()
    # Gradients at the zeros: 0, never NaN.
    for f in (lambda x: jnp.sum(xlogx(x)), lambda x: jnp.sum(jnp.where(x > 0, safe_log(x), 0))):
        g = jax.grad(f)(x)
        assert np.isfinite(g[:2]).all() and (g[:2] == 0).all()


def test_kl_from_log_weights_matches_the_definition_and_its_corners():
    kernel = jax.jit(_math.kl_from_log_weights, static_argnums=2)
    rng = np.random.default_rng(0)
    log_w, log_v = rng.normal(size=(3, 6)), rng.normal(size=(3, 6))
    # Unnormalised, shifted weights: the kernel normalises both.
    lp, lq = scipy.special.log_softmax(log_w, -1), scipy.special.log_softmax(log_v, -1)
    expected = np.sum(np.exp(lp) * (lp - lq), -1)
    np.testing.assert_allclose(kernel(log_w + 3.0, log_v - 7.0, 1), expected, rtol=1e-13)
    # An accurate ratio may be passed; it must agree with the difference of the log-weights.
    np.testing.assert_allclose(kernel(log_w, log_v, 1, log_v - log_w), expected, rtol=1e-13)
    inf = np.inf
    # p = 0 counts only through Q's mass there; q = 0 under p > 0 is +inf.
    got = kernel(jnp.array([[0.0, -inf, 0.0], [0.0, 0.0, 0.0], [0.0, -inf, -inf]]),
                 jnp.array([[0.0, 0.0, 0.0], [0.0, -inf, 1.0], [0.0, -inf, -inf]]), 1)
    np.testing.assert_allclose(got[0], np.log(1.5), rtol=1e-15)
    assert np.isposinf(got[1]) and got[2] == 0.0
    # Gradient: the softmax Jacobians, dKL/dlog w_p = p (log p - log q - KL), dKL/dlog w_q = q - p.
    grad_p, grad_q = jax.grad(lambda a, b: jnp.sum(kernel(a, b, 1)), argnums=(0, 1))(log_w, log_v)
    np.testing.assert_allclose(grad_q, np.exp(lq) - np.exp(lp), rtol=1e-10, atol=1e-14)
    np.testing.assert_allclose(grad_p, np.exp(lp) * (lp - lq - expected[:, None]), rtol=1e-10, atol=1e-14)
    g = jax.grad(lambda a: kernel(a, jnp.array([0.3, 0.0, -0.1]), 0))(jnp.array([0.0, -inf, 0.0]))
    assert g[1] == 0.0 and np.isfinite(g).all()


# --------------------------------------------------------------------------------------------------
# Against SciPy / NumPy


@pytest.mark.parametrize("axis", [0, -1])
def test_kl_matches_scipy_rel_entr_batched(axis):
    rng = np.random.default_rng(0)
    p = _simplex(rng, (3, 4, 7), zeros=0.3)
    q = _simplex(rng, (3, 4, 7))
    if axis == 0:
        p, q = np.moveaxis(p, -1, 0), np.moveaxis(q, -1, 0)
    np.testing.assert_allclose(discrete.kl(p, q, axis=axis), _np_kl(p, q, axis), rtol=1e-12, atol=1e-15)
    np.testing.assert_allclose(
        discrete.kl(p, q, axis=axis), scipy.stats.entropy(p, q, axis=axis), rtol=1e-12, atol=1e-15
    )


def test_kl_normalises_unnormalised_input_like_scipy_stats_entropy():
    rng = np.random.default_rng(1)
    p, q = rng.random((5, 9)) * 7, rng.random((5, 9)) * 0.1
    np.testing.assert_allclose(discrete.kl(p, q), scipy.stats.entropy(p, q, axis=-1), rtol=1e-12)


def test_entropy_cross_entropy_jeffreys_match_scipy():
    rng = np.random.default_rng(2)
    p = _simplex(rng, (4, 8), zeros=0.3)
    q = _simplex(rng, (4, 8))
    np.testing.assert_allclose(discrete.entropy(p), scipy.stats.entropy(p, axis=-1), rtol=1e-12)
    np.testing.assert_allclose(
        discrete.entropy(p, base=2), scipy.stats.entropy(p, base=2, axis=-1), rtol=1e-12
    )
    np.testing.assert_allclose(discrete.cross_entropy(p, q), -scipy.special.xlogy(p, q).sum(-1), rtol=1e-12)
    jeffreys = scipy.special.rel_entr(p, q).sum(-1) + scipy.special.rel_entr(q, p).sum(-1)
    assert np.isinf(jeffreys).all()  # p has zeros where q does not
    np.testing.assert_array_equal(discrete.jeffreys(p, q), jeffreys)
    q2 = _simplex(rng, (4, 8))
    np.testing.assert_allclose(
        discrete.jeffreys(q, q2),
        scipy.special.rel_entr(q, q2).sum(-1) + scipy.special.rel_entr(q2, q).sum(-1),
        rtol=1e-12,
    )


@pytest.mark.parametrize("base", [None, 2])
def test_jensen_shannon_is_scipy_distance_squared(base):
    rng = np.random.default_rng(3)
    p = _simplex(rng, (5, 6), zeros=0.4)
    q = _simplex(rng, (5, 6), zeros=0.4)
    expected = scipy.spatial.distance.jensenshannon(p, q, axis=-1, base=base) ** 2
    np.testing.assert_allclose(discrete.jensen_shannon(p, q, base=base), expected, rtol=1e-10, atol=1e-14)
    # Disjoint supports reach the upper bound log 2 (one bit).
    np.testing.assert_allclose(discrete.jensen_shannon(np.array([1.0, 0.0]), np.array([0.0, 1.0])), LN2)


@pytest.mark.parametrize("axis", [0, -1])
def test_kl_logits_and_kl_log_match_scipy(axis):
    rng = np.random.default_rng(4)
    a, b = rng.normal(size=(5, 11)) * 4, rng.normal(size=(5, 11)) * 4
    if axis == 0:
        a, b = a.T, b.T
    expected = _np_kl_logits(a, b, axis)
    np.testing.assert_allclose(discrete.kl_logits(a, b, axis=axis), expected, rtol=1e-12)
    la = scipy.special.log_softmax(a, axis=axis)
    lb = scipy.special.log_softmax(b, axis=axis)
    np.testing.assert_allclose(discrete.kl_log(la, lb, axis=axis), expected, rtol=1e-12)
    np.testing.assert_allclose(
        discrete.kl(np.exp(la), np.exp(lb), axis=axis), expected, rtol=1e-10
    )


def _np_histogram_kl(x, y, bins, range_, pseudocount):
    if np.ndim(bins) == 0:
        if range_ is None:
            range_ = (min(x.min(), y.min()), max(x.max(), y.max()))
        edges = np.histogram_bin_edges(x, bins, range_)
    else:
        edges = np.asarray(bins)
    lo, hi = edges[0], edges[-1]
    cx = np.histogram(np.clip(x, lo, hi), edges)[0] + pseudocount
    cy = np.histogram(np.clip(y, lo, hi), edges)[0] + pseudocount
    return scipy.stats.entropy(cx, cy)


@pytest.mark.parametrize(
    "bins, range_, pseudocount",
    [
        (10, None, 0.5),
        (7, (-1.0, 1.5), 1.0),
        (np.array([-3.0, -1.0, 0.0, 0.3, 2.0, 4.0]), None, 0.5),
        (5, None, 0.0),
    ],
)
def test_histogram_kl_matches_numpy_brute_force(bins, range_, pseudocount):
    rng = np.random.default_rng(5)
    x, y = rng.normal(0.0, 1.0, 300), rng.normal(0.4, 1.3, 200)
    got = discrete.histogram_kl(x, y, bins=bins, range=range_, pseudocount=pseudocount)
    np.testing.assert_allclose(got, _np_histogram_kl(x, y, bins, range_, pseudocount), rtol=1e-12)


def test_histogram_kl_edge_conventions():
    # Samples on interior edges go right, the top edge closes the last bin, out-of-range samples
    # are counted in the end bins, and a zero-width pooled range is widened like numpy's.
    x = np.array([0.0, 0.5, 1.0, 2.0, -9.0])
    y = np.array([0.25, 0.75, 0.75, 0.9, 0.1])
    got = discrete.histogram_kl(x, y, bins=2, range=(0.0, 1.0), pseudocount=0.0)
    # x -> bins [0, 0.5): {0, -9}, [0.5, 1]: {0.5, 1, 2};  y -> 2 and 3.
    expected = scipy.stats.entropy([2, 3], [2, 3])
    np.testing.assert_allclose(got, expected, atol=1e-15)
    same = np.full(4, 3.0)
    assert float(discrete.histogram_kl(same, same, bins=3)) == 0.0
    # pseudocount 0 and an empty bin of y under mass of x: infinite, not NaN.
    empty_bin = discrete.histogram_kl(np.array([0.0, 1.0]), np.array([0.0, 0.1]), bins=2, pseudocount=0.0)
    assert np.isposinf(empty_bin)


def test_histogram_kl_jit_vmap_and_consistency():
    rng = np.random.default_rng(6)
    x, y = rng.normal(size=(3, 100)), rng.normal(0.5, 1.0, size=(3, 120))
    # Pooled range under jit (bins static), with the pseudocount traced.
    pooled = jax.jit(lambda x, y, c: discrete.histogram_kl(x, y, bins=8, pseudocount=c))
    eager = discrete.histogram_kl(x[0], y[0], bins=8)
    np.testing.assert_allclose(pooled(x[0], y[0], 0.5), eager, rtol=1e-12)
    np.testing.assert_allclose(eager, _np_histogram_kl(x[0], y[0], 8, None, 0.5), rtol=1e-12)
    np.testing.assert_allclose(discrete.histogram_kl(x[0], y[0], bins=8, base=2), eager / LN2, rtol=1e-12)
    # Under jit a NaN sample or a negative pseudocount gives NaN.
    with_nan = x[0].copy()
    with_nan[3] = np.nan
    assert np.isnan(pooled(with_nan, y[0], 0.5))
    assert np.isnan(pooled(x[0], y[0], -0.1))
    # A fixed range, jitted and vmapped over windows.
    ranged = jax.vmap(jax.jit(functools.partial(discrete.histogram_kl, bins=8, range=(-1.0, 1.0))))
    expected = [_np_histogram_kl(x[i], y[i], 8, (-1.0, 1.0), 0.5) for i in range(3)]
    np.testing.assert_allclose(ranged(x, y), expected, rtol=1e-12)


@pytest.mark.slow
def test_histogram_kl_converges_to_the_gaussian_kl():
    # P = N(0, 1), Q = N(1, 2^2): KL(P || Q) = log 2 + 2/8 - 1/2 = 0.4431 (the reverse is 1.307).
    # Delta method: sd = sqrt((Var_P[log p/q] + Var_Q[p/q]) / n) = sqrt((0.344 + 0.744) / 1e5) = 0.0033;
    # binning on 60 bins over [-6, 7] moves the target by -0.0012 (exact bin probabilities); the
    # plug-in bias is about (K - 1) / (2 n) = 3e-4 per sample. 5 sd + both biases < 0.02.
    rng = np.random.default_rng(7)
    n = 100_000
    x, y = rng.normal(0.0, 1.0, n), rng.normal(1.0, 2.0, n)
    got = float(discrete.histogram_kl(x, y, bins=60, range=(-6.0, 7.0)))
    assert abs(got - (math.log(2.0) + 2.0 / 8.0 - 0.5)) < 0.02


# --------------------------------------------------------------------------------------------------
# Properties


@given(probability_vectors, positive_vectors)
def test_kl_nonnegative_pinsker_and_cross_entropy_decomposition(p, q):
    kl = float(discrete.kl(p, q))
    pn, qn = p / p.sum(), q / q.sum()
    total_variation = 0.5 * np.abs(pn - qn).sum()
    # Pinsker: KL >= 2 TV^2 > 0 unless the distributions are equal ("zero iff equal").
    assert kl >= 2 * total_variation**2 - 1e-12
    assert float(discrete.kl(p, p)) == 0.0
    np.testing.assert_allclose(
        discrete.cross_entropy(p, q), float(discrete.entropy(p)) + kl, rtol=1e-12, atol=1e-12
    )
    js = float(discrete.jensen_shannon(p, q))
    assert 0.0 <= js <= LN2 + 1e-12
    assert float(discrete.jeffreys(p, q)) >= kl


@given(logit_vectors, logit_vectors)
def test_kl_logits_properties(a, b):
    kl = float(discrete.kl_logits(a, b))
    assert kl >= 0.0
    np.testing.assert_allclose(kl, _np_kl_logits(a, b), rtol=1e-10, atol=1e-12)
    # Shift invariance of the softmax, and zero at equality.
    np.testing.assert_allclose(discrete.kl_logits(a + 3.0, b - 5.0), kl, rtol=1e-9, atol=1e-11)
    assert float(discrete.kl_logits(a, a)) == 0.0
    np.testing.assert_allclose(
        discrete.kl_log(jax.nn.log_softmax(a), jax.nn.log_softmax(b)), kl, rtol=1e-9, atol=1e-11
    )


@given(positive_vectors, positive_vectors)
def test_float32_agrees_with_float64(p, q):
    for f in (discrete.kl, discrete.jensen_shannon, discrete.jeffreys, discrete.cross_entropy):
        np.testing.assert_allclose(
            f(p.astype(np.float32), q.astype(np.float32)), f(p, q), rtol=2e-4, atol=2e-6
        )
    np.testing.assert_allclose(
        discrete.entropy(p.astype(np.float32)), discrete.entropy(p), rtol=2e-5, atol=1e-6
    )
    a, b = np.log(p) * 5, np.log(q) * 5
    np.testing.assert_allclose(
        discrete.kl_logits(a.astype(np.float32), b.astype(np.float32)),
        discrete.kl_logits(a, b),
        rtol=2e-4,
        atol=5e-6,
    )


# Jitted once so that the examples below do not re-trace.
_grad_kl = jax.jit(jax.grad(discrete.kl, argnums=(0, 1)))
_grad_entropy = jax.jit(jax.grad(discrete.entropy))
_grad_cross_entropy = jax.jit(jax.grad(discrete.cross_entropy))
_grad_jensen_shannon = jax.jit(jax.grad(discrete.jensen_shannon))


@given(probability_vectors, positive_vectors)
def test_gradient_finite_at_zeros_and_matches_closed_form(p, q):
    # d/dp_i of KL(p / sum p || q / sum q) = (log(p_i/q_i) + 1 - (KL + 1)) / sum p for p_i > 0 and,
    # with the convention that the derivative of 0 log 0 is 0, -(KL + 1) / sum p for p_i = 0.
    grad_p, grad_q = _grad_kl(p, q)
    assert np.isfinite(grad_p).all() and np.isfinite(grad_q).all()
    pn, qn = p / p.sum(), q / q.sum()
    kl = float(discrete.kl(p, q))
    with np.errstate(divide="ignore"):
        log_ratio = np.where(pn > 0, np.log(pn / qn) + 1.0, 0.0)
    np.testing.assert_allclose(grad_p, (log_ratio - (kl + 1.0)) / p.sum(), rtol=1e-9, atol=1e-12)
    # d/dq_i = (-p_i / q_i + 1) / sum q for normalised inputs of this form.
    np.testing.assert_allclose(grad_q, (1.0 - pn / qn) / q.sum(), rtol=1e-9, atol=1e-12)
    for g in _grad_entropy(p), _grad_cross_entropy(p, q), _grad_jensen_shannon(p, q):
        assert np.isfinite(g).all()


def test_gradient_of_kl_at_exact_zero_probability_is_finite():
    p = jnp.array([0.0, 0.3, 0.7])
    for q in (jnp.array([0.2, 0.3, 0.5]), jnp.array([0.0, 0.5, 0.5])):
        g = jax.grad(discrete.kl, argnums=(0, 1))(p, q)
        assert np.isfinite(g[0]).all() and np.isfinite(g[1]).all()
    interior = (jnp.array([0.1, 0.3, 0.6]),)
    check_grads(lambda p: discrete.kl(p, jnp.array([0.2, 0.3, 0.5])), interior, order=1, modes=("rev",))


def test_kl_logits_gradient_closed_form_and_finite_differences():
    # d KL / d a = p * (log p - log q - KL) and d KL / d b = q - p (softmax Jacobians).
    rng = np.random.default_rng(8)
    a, b = rng.normal(size=(2, 7)) * 2, rng.normal(size=(2, 7)) * 2
    grad_a, grad_b = jax.grad(lambda a, b: jnp.sum(discrete.kl_logits(a, b)), argnums=(0, 1))(a, b)
    la, lb = scipy.special.log_softmax(a, -1), scipy.special.log_softmax(b, -1)
    kl = _np_kl_logits(a, b)[:, None]
    np.testing.assert_allclose(grad_a, np.exp(la) * (la - lb - kl), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(grad_b, np.exp(lb) - np.exp(la), rtol=1e-10, atol=1e-13)
    check_grads(discrete.kl_logits, (a, b), order=1, modes=("fwd", "rev"))
    check_grads(discrete.kl_logits, (a, b), order=2, modes=("rev",))  # through the custom JVP rule
    # Second derivatives stay NaN-free next to a category both sides exclude.
    a[0, 2] = b[0, 2] = -np.inf
    hessian = jax.hessian(lambda a: jnp.sum(discrete.kl_logits(a, b)))(a)
    assert not np.isnan(hessian).any()
    # kl_log normalises too, so its derivatives are the same softmax Jacobians.
    grad_lp, grad_lq = jax.grad(lambda a, b: jnp.sum(discrete.kl_log(a, b)), argnums=(0, 1))(la, lb)
    np.testing.assert_allclose(grad_lp, np.exp(la) * (la - lb - kl), rtol=1e-10, atol=1e-13)
    np.testing.assert_allclose(grad_lq, np.exp(lb) - np.exp(la), rtol=1e-10, atol=1e-13)


def test_asymmetry_example():
    p, q = np.array([0.5, 0.5]), np.array([0.9, 0.1])
    forward, reverse = float(discrete.kl(p, q)), float(discrete.kl(q, p))
    np.testing.assert_allclose(forward, 0.5 * np.log(0.5 / 0.9) + 0.5 * np.log(0.5 / 0.1), rtol=1e-14)
    np.testing.assert_allclose(reverse, 0.9 * np.log(0.9 / 0.5) + 0.1 * np.log(0.1 / 0.5), rtol=1e-14)
    assert forward > reverse + 0.1
    np.testing.assert_allclose(discrete.jeffreys(p, q), forward + reverse, rtol=1e-14)
    np.testing.assert_allclose(discrete.jensen_shannon(p, q), discrete.jensen_shannon(q, p), rtol=1e-14)


PAIR_FUNCTIONS = {
    "kl": discrete.kl,
    "kl_logits": discrete.kl_logits,
    "kl_log": lambda a, b, **kw: discrete.kl_log(jax.nn.log_softmax(a, axis=kw.get("axis", -1)),
                                                 jax.nn.log_softmax(b, axis=kw.get("axis", -1)), **kw),
    "cross_entropy": discrete.cross_entropy,
    "jensen_shannon": discrete.jensen_shannon,
    "jeffreys": discrete.jeffreys,
    "entropy": lambda a, b, **kw: discrete.entropy(a, **kw),
}


@pytest.mark.parametrize("name", sorted(PAIR_FUNCTIONS))
def test_jit_vmap_loop_axis_and_base_agree(name):
    f = PAIR_FUNCTIONS[name]
    rng = np.random.default_rng(9)
    if name in ("kl_logits", "kl_log"):
        a, b = rng.normal(size=(3, 5)), rng.normal(size=(3, 5))
    else:
        a, b = _simplex(rng, (3, 5), zeros=0.2), _simplex(rng, (3, 5))
    eager = np.asarray(f(a, b))
    assert eager.shape == (3,)
    np.testing.assert_allclose(jax.jit(f)(a, b), eager, rtol=1e-12)
    np.testing.assert_allclose(jax.vmap(f)(a, b), eager, rtol=1e-12)
    np.testing.assert_allclose([f(a[i], b[i]) for i in range(3)], eager, rtol=1e-12)
    np.testing.assert_allclose(f(a.T, b.T, axis=0), eager, rtol=1e-12)
    np.testing.assert_allclose(f(a, b, base=2), eager / LN2, rtol=1e-12)
    np.testing.assert_allclose(f(a, b, base=10), eager / math.log(10), rtol=1e-12)
    # Output dtype follows the input.
    assert f(a.astype(np.float32), b.astype(np.float32)).dtype == jnp.float32
    assert f(a, b).dtype == jnp.float64
    if name == "kl_logits":
        assert f(jnp.asarray(a, jnp.bfloat16), jnp.asarray(b, jnp.bfloat16)).dtype == jnp.bfloat16
        assert f(a.astype(np.float32), b).dtype == jnp.float64  # mixed: the common dtype


def test_kl_logits_and_kl_log_write_no_full_size_intermediates():
    # The fused design (kljax._math.sum_rel_entr_from_logs) keeps every pass over the logits in one
    # kernel; a full-size temporary would add a write and a read of the whole array. Only the rarely
    # taken fallback branch (non-finite totals) may materialise, so inspect the top-level program.
    logits = jnp.zeros((64, 4096), jnp.float32)
    for f in (discrete.kl_logits, discrete.kl_log):
        text = jax.jit(f).lower(logits, logits).compile().as_text()
        entry = text[text.index("\nENTRY") :]
        entry = entry[: entry.index("\n}")]
        # Instructions look like "%name = f32[64,4096]{1,0} fusion(...)": look at the result shape.
        full_size = [
            line
            for line in entry.splitlines()[1:]
            if re.match(r"\s*(?:ROOT )?%\S+ = f32\[64,4096\]", line) and " parameter(" not in line
        ]
        assert not full_size, full_size


def test_kl_logits_does_not_retrace():
    fn = jax.jit(chex.assert_max_traces(discrete.kl_logits, n=1))
    a = jnp.zeros((2, 4), jnp.float32)
    for shift in range(3):
        fn(a + shift, a)


# --------------------------------------------------------------------------------------------------
# Edge cases


def test_zeros_and_infinities():
    assert float(discrete.kl(np.array([0.0, 1.0]), np.array([0.5, 0.5]))) == pytest.approx(LN2, rel=1e-14)
    # p = 0 where q = 0 contributes nothing.
    assert float(discrete.kl(np.array([0.0, 1.0]), np.array([0.0, 1.0]))) == 0.0
    # p > 0 where q = 0 is +inf, never NaN, in every function that can be infinite.
    p, q = np.array([0.5, 0.5]), np.array([1.0, 0.0])
    for value in (
        discrete.kl(p, q),
        discrete.cross_entropy(p, q),
        discrete.jeffreys(p, q),
        discrete.kl_log(jnp.log(p), jnp.log(jnp.array([1.0, 0.0]))),
        discrete.kl_logits(np.zeros(2), np.array([0.0, -np.inf])),
        discrete.kl(p.astype(np.float32), q.astype(np.float32)),
    ):
        assert np.isposinf(value)
    assert np.isfinite(discrete.jensen_shannon(p, q))
    assert float(discrete.entropy(np.array([1.0, 0.0, 0.0]))) == 0.0


@pytest.mark.parametrize(
    "a, b",
    [
        # both around 1e4: only the differences matter
        (1e4 + np.linspace(-3, 3, 9), 1e4 + np.cos(np.arange(9.0))),
        # magnitudes spread over [-1e4, 1e4]
        (np.linspace(-1e4, 1e4, 9), np.linspace(1e4, -1e4, 9) + np.sin(np.arange(9.0))),
        # Q is P shifted by a constant: exactly zero
        (np.linspace(-5, 5, 9), np.linspace(-5, 5, 9) + 1e4),
        # near-ties at 1e4 against flat logits
        (np.array([1e4, 1e4 - 0.5, 1e4 - 1, -1e4, 0, 0, 0, 0, 0]), np.zeros(9)),
    ],
)
def test_large_float32_logits_stay_finite_and_accurate(a, b):
    a32, b32 = a.astype(np.float32), b.astype(np.float32)
    expected = _np_kl_logits(a32.astype(np.float64), b32.astype(np.float64))
    got = discrete.kl_logits(a32, b32)
    assert got.dtype == jnp.float32 and np.isfinite(got)
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)
    grad = jax.grad(discrete.kl_logits, argnums=(0, 1))(a32, b32)
    assert np.isfinite(grad[0]).all() and np.isfinite(grad[1]).all()


def test_negative_infinite_logits_are_zero_probabilities():
    inf = np.inf
    a = np.array([1.0, -inf, 2.0, -inf])
    b = np.array([0.5, 3.0, -1.0, -inf])
    # p = 0 on entries 1 and 3; q = 0 on entry 3 only.
    q_full = scipy.special.softmax(b[[0, 1, 2]])
    p_full = scipy.special.softmax(a[[0, 2]])
    expected = scipy.special.rel_entr(p_full, q_full[[0, 2]]).sum()
    np.testing.assert_allclose(discrete.kl_logits(a, b), expected, rtol=1e-12)
    np.testing.assert_allclose(
        discrete.kl_log(jax.nn.log_softmax(a), jax.nn.log_softmax(b)), expected, rtol=1e-12
    )
    ga, gb = jax.grad(discrete.kl_logits, argnums=(0, 1))(a, b)
    assert not (np.isnan(ga).any() or np.isnan(gb).any())
    assert ga[1] == 0 and ga[3] == 0 and gb[3] == 0
    # p underflows to 0 in float32 but is positive; q = 0 there: still +inf.
    underflow = np.array([0.0, -200.0], np.float32)
    assert np.isposinf(discrete.kl_logits(underflow, np.array([0.0, -np.inf], np.float32)))
    # q has a -inf logit where p has mass: +inf, and float32 behaves the same.
    assert np.isposinf(discrete.kl_logits(b, a))
    assert np.isposinf(discrete.kl_logits(b.astype(np.float32), a.astype(np.float32)))
    # jitted and with a large finite magnitude next to -inf.
    big = np.array([1e4, -inf, 1e4 - 2.0], np.float32)
    np.testing.assert_allclose(
        jax.jit(discrete.kl_logits)(big, np.zeros(3, np.float32)),
        _np_kl_logits(np.array([1e4, -np.inf, 1e4 - 2.0]), np.zeros(3)),
        rtol=1e-5,
    )


def test_where_masks():
    rng = np.random.default_rng(10)
    p, q = _simplex(rng, (2, 6)), _simplex(rng, (2, 6))
    mask = np.array([True, False, True, True, False, True])
    keep = mask.nonzero()[0]
    # kl: renormalised over the kept entries; the mask broadcasts over the batch axis.
    np.testing.assert_allclose(discrete.kl(p, q, where=mask), _np_kl(p[:, keep], q[:, keep]), rtol=1e-12)
    a, b = np.log(p) * 3, np.log(q) * 3
    np.testing.assert_allclose(
        discrete.kl_logits(a, b, where=mask), _np_kl_logits(a[:, keep], b[:, keep]), rtol=1e-12
    )
    # kl_log: like kl_logits, renormalised over the kept entries.
    np.testing.assert_allclose(
        discrete.kl_log(np.log(p), np.log(q), where=mask), _np_kl(p[:, keep], q[:, keep]), rtol=1e-12
    )
    # Garbage (NaN, negative, +inf) under the mask changes neither value nor gradient finiteness.
    dirty_p = np.where(mask, p, np.nan)
    dirty_q = np.where(mask, q, -1.0)
    np.testing.assert_allclose(
        discrete.kl(dirty_p, dirty_q, where=mask), _np_kl(p[:, keep], q[:, keep]), rtol=1e-12
    )
    dirty_a = np.where(mask, a, np.inf)
    f = jax.jit(lambda a, b: jnp.sum(discrete.kl_logits(a, b, where=mask)))
    np.testing.assert_allclose(f(dirty_a, b), _np_kl_logits(a[:, keep], b[:, keep]).sum(), rtol=1e-12)
    g = jax.grad(f)(dirty_a, b)
    assert np.isfinite(g).all() and (g[:, ~mask] == 0).all()
    # A per-row mask of the full shape, axis=0.
    row_mask = rng.random((6, 2)) < 0.7
    row_mask[0] = True
    got = discrete.kl(p.T, q.T, axis=0, where=row_mask)
    for j in range(2):
        k = row_mask[:, j]
        np.testing.assert_allclose(got[j], _np_kl(p[j, k], q[j, k]), rtol=1e-12)


# --------------------------------------------------------------------------------------------------
# Errors and invalid values


def test_eager_errors_name_the_argument():
    p, q = np.array([0.5, 0.5]), np.array([0.3, 0.7])
    with pytest.raises(ValueError, match="`p`.*negative"):
        discrete.kl(np.array([1.2, -0.2]), q)
    with pytest.raises(ValueError, match="`q`.*NaN"):
        discrete.kl(p, np.array([np.nan, 1.0]))
    with pytest.raises(ValueError, match="`q`.*infinite"):
        discrete.jensen_shannon(p, np.array([np.inf, 1.0]))
    with pytest.raises(ValueError, match="`p` and `q`.*same number of categories.*\\(2,\\).*\\(3,\\)"):
        discrete.kl(p, np.array([0.2, 0.3, 0.5]))
    with pytest.raises(ValueError, match="`p` and `q` must have the same shape"):
        discrete.kl(np.ones((2, 3)), np.ones((3, 3)))
    with pytest.raises(TypeError, match="`p`.*floating"):
        discrete.kl(np.array([1, 1]), q)
    with pytest.raises(TypeError, match="`logits_q`.*floating"):
        discrete.kl_logits(p, np.array([1, 2], np.int32))
    with pytest.raises(TypeError, match="`p`.*floating"):
        discrete.entropy([True, False])
    with pytest.raises(ValueError, match="`p`.*no probability mass"):
        discrete.entropy(np.zeros(3))
    with pytest.raises(ValueError, match="`p`.*no probability mass"):
        discrete.kl(p, q, where=np.array([False, False]))
    with pytest.raises(ValueError, match="`logits_p` contains NaN"):
        discrete.kl_logits(np.array([np.nan, 0.0]), p)
    with pytest.raises(ValueError, match="`logits_q` contains \\+inf"):
        discrete.kl_logits(p, np.array([np.inf, 0.0]))
    with pytest.raises(ValueError, match="`logits_p`.*all -inf"):
        discrete.kl_logits(np.array([-np.inf, -np.inf]), p)
    with pytest.raises(ValueError, match="`log_q` contains NaN"):
        discrete.kl_log(np.log(p), np.array([np.nan, 0.0]))
    with pytest.raises(TypeError, match="`where` must be a boolean"):
        discrete.kl(p, q, where=np.array([1, 0]))
    with pytest.raises(ValueError, match="`where` of shape \\(3,\\)"):
        discrete.kl(p, q, where=np.array([True, True, False]))
    with pytest.raises(ValueError, match="`axis`=2 is out of range for `p`"):
        discrete.kl(p, q, axis=2)
    with pytest.raises(TypeError, match="`axis` must be an int"):
        discrete.entropy(p, axis=1.0)
    with pytest.raises(ValueError, match="`base`"):
        discrete.kl(p, q, base=1)
    with pytest.raises(ValueError, match="`base`"):
        discrete.entropy(p, base=-2.0)


def test_histogram_kl_errors():
    x = np.linspace(0, 1, 10)
    with pytest.raises(ValueError, match="`x` must be a 1-D"):
        discrete.histogram_kl(x.reshape(2, 5), x)
    with pytest.raises(ValueError, match="`y` is empty"):
        discrete.histogram_kl(x, np.zeros(0))
    with pytest.raises(TypeError, match="`y`.*floating"):
        discrete.histogram_kl(x, np.arange(3))
    with pytest.raises(ValueError, match="`x` contains NaN"):
        discrete.histogram_kl(np.array([np.nan, 1.0]), x)
    with pytest.raises(ValueError, match="`y` has infinite samples; pass `range`"):
        discrete.histogram_kl(x, np.array([np.inf, 1.0]))
    with pytest.raises(ValueError, match="`pseudocount` must be >= 0"):
        discrete.histogram_kl(x, x, pseudocount=-1.0)
    with pytest.raises(ValueError, match="`range` must be finite with low < high"):
        discrete.histogram_kl(x, x, range=(1.0, 0.0))
    with pytest.raises(ValueError, match="`bins` must be >= 1"):
        discrete.histogram_kl(x, x, bins=0)
    with pytest.raises(TypeError, match="`bins` must be an int"):
        discrete.histogram_kl(x, x, bins="auto")
    with pytest.raises(ValueError, match="`bins` edges must be strictly increasing"):
        discrete.histogram_kl(x, x, bins=np.array([0.0, 1.0, 0.5]))
    with pytest.raises(ValueError, match="`range` must be None"):
        discrete.histogram_kl(x, x, bins=np.array([0.0, 1.0]), range=(0.0, 1.0))
    # Infinite samples are fine with a fixed range: they land in the end bins.
    assert np.isfinite(discrete.histogram_kl(np.array([np.inf, 0.5]), x, bins=4, range=(0.0, 1.0)))


def test_jit_shape_errors_raise_at_trace_time():
    with pytest.raises(ValueError, match="`p` and `q`"):
        jax.jit(discrete.kl)(jnp.ones(3), jnp.ones(4))
    with pytest.raises(ValueError, match="`logits_p` and `logits_q`"):
        jax.jit(discrete.kl_logits)(jnp.ones((2, 3)), jnp.ones((3, 3)))
    with pytest.raises(ValueError, match="`where`"):
        jax.jit(lambda p, q: discrete.kl(p, q, where=jnp.ones(4, bool)))(jnp.ones(3), jnp.ones(3))
    with pytest.raises(TypeError, match="`p`.*floating"):
        jax.jit(discrete.entropy)(jnp.ones(3, jnp.int32))


def test_jit_value_problems_give_nan():
    kl = jax.jit(discrete.kl)
    q = jnp.array([0.3, 0.3, 0.4])
    assert np.isnan(kl(jnp.array([0.6, -0.1, 0.5]), q))
    # All-negative p would normalise to a valid-looking distribution: must still be NaN.
    assert np.isnan(kl(jnp.array([-0.2, -0.3, -0.5]), q))
    # Negative q where p = 0 does not touch the sum but is still invalid.
    assert np.isnan(kl(jnp.array([0.0, 0.5, 0.5]), jnp.array([-0.1, 0.5, 0.6])))
    assert np.isnan(kl(jnp.array([jnp.nan, 0.5, 0.5]), q))
    assert np.isnan(kl(jnp.zeros(3), q))
    assert np.isnan(jax.jit(discrete.entropy)(jnp.array([0.5, -0.5, 1.0])))
    assert np.isnan(jax.jit(discrete.jensen_shannon)(jnp.array([0.5, -0.5, 1.0]), q))
    logits = jax.jit(discrete.kl_logits)
    assert np.isnan(logits(jnp.array([0.0, jnp.nan, 1.0]), q))
    assert np.isnan(logits(q, jnp.array([0.0, jnp.inf, 1.0])))
    assert np.isnan(logits(jnp.full(3, -jnp.inf), q))
    assert np.isnan(jax.jit(discrete.kl_log)(jnp.log(q), jnp.array([0.0, jnp.nan, 1.0])))
