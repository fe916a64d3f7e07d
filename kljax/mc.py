"""Monte Carlo estimators of D_KL(P || Q) from samples x ~ P.

Every estimator here takes the log-densities at samples drawn from P: ``log_p = log P(x)`` and
``log_q = log Q(x)`` for ``x ~ P``, and averages a per-sample term. With the log-ratio
``t = log_q - log_p`` and the density ratio ``r = Q(x) / P(x) = exp(t)`` (Schulman, 2020):

=========  =======================  ===========  ==========  ===========================================
estimator  per-sample term          unbiased?    >= 0?       spread
=========  =======================  ===========  ==========  ===========================================
``k1``     ``-log r``               yes          no          high: Var = Var_P[log(P/Q)], often >> KL^2
``k2``     ``(log r)^2 / 2``        no           yes         low; E[k2] is an f-divergence ~= KL
``k3``     ``(r - 1) - log r``      yes          yes         low for close P, Q; infinite if E_P[r^2] is
=========  =======================  ===========  ==========  ===========================================

- ``k1`` is the plain log-ratio. Its mean is exactly D(P||Q), but single terms are negative whenever
  Q(x) > P(x), so for close P and Q the relative spread is large (for P = N(0, 1), Q = N(mu, 1):
  Var[k1] = mu^2 = 2 KL, so one sample's relative standard deviation is sqrt(2 / KL)).
- ``k2`` is never negative and has low spread, but it estimates E_P[(log r)^2] / 2, the f-divergence
  with f(r) = (log r)^2 / 2. That f matches the KL generator -log r to second order in (r - 1), so the
  bias is small only when P and Q are close (N(0, 1) vs N(mu, 1): bias = mu^4 / 8 = KL^2 / 2).
- ``k3`` adds the zero-mean control variate (r - 1) to k1 (E_P[r] = 1 whenever Q is absolutely
  continuous with respect to P; otherwise E_P[r] < 1 and k3 is biased low). Because log r <= r - 1
  every term is >= 0, and k3 is the Bregman divergence of -log between 1 and r. Its variance contains
  E_P[r^2] = int Q^2 / P, which is infinite when Q has heavier tails than P allows (for P = N(0, 1),
  Q = N(mu, sigma^2): whenever sigma^2 >= 2); then k3 is still unbiased but heavy-tailed.

The reverse direction D(Q || P) can be estimated from the same samples of P by importance weighting:
E_P[r log r] = D(Q||P) (``reverse_k1``), and subtracting the zero-mean control variate (r - 1) gives
the non-negative Bregman form r log r - (r - 1) (``reverse_k3``, Schulman 2020). Both carry the weight
r, so their variance involves E_P[r^2 (log r)^2] and E_P[r^2]: finite for Gaussians only when Q is
less than sqrt(2) times wider than P, and heavy-tailed as that limit nears.

Functions:
    k1, k2, k3                  per-sample terms whose mean estimates D(P||Q)
    kl, kl_with_stderr          the estimate (and its standard error) from log-densities
    kl_from                     sample P, evaluate both log-densities, estimate
    reverse_k1, reverse_k3      per-sample terms whose mean estimates D(Q||P)
    reverse_kl, reverse_kl_with_stderr, reverse_kl_from   the same for the reverse direction

Numerics: k3 and reverse_k3 are evaluated from t with a Taylor series for |t| < 1/2 (where
expm1(t) - t and e^t (t - 1) + 1 lose relative accuracy to cancellation) and the closed form
elsewhere, so they are accurate to a few ulps for every t, including t -> 0, and stay >= 0.
Infinite log-densities follow the limits: Q(x) = 0 at a sample of P gives +inf for k1, k2, k3;
reverse terms at r = 0 are 0 (r log r) and 1 (r log r - (r - 1)).

References:
    J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    (k1, k2, k3 and the reverse estimator r log r - (r - 1)).
"""

from __future__ import annotations

import functools
import math
import operator
from typing import Callable

import jax
import jax.numpy as jnp

from kljax._math import exp_minus_one_minus
from kljax._contract import as_float_array, check_eagerly, check_same_shape, normalize_axis, not_nan

__all__ = [
    "ESTIMATORS",
    "REVERSE_ESTIMATORS",
    "k1",
    "k2",
    "k3",
    "kl",
    "kl_from",
    "kl_with_stderr",
    "reverse_k1",
    "reverse_k3",
    "reverse_kl",
    "reverse_kl_from",
    "reverse_kl_with_stderr",
]

# Below this |t| the series is used: the closed forms lose ~2 eps / |t| relative accuracy to
# cancellation, the series (degree 18) is exact to < eps64 for |t| < 1/2.
_SERIES_RADIUS = 0.5
_MAX_DEGREE = 18
# t e^t - expm1(t) = sum_{k >= 2} (k - 1) t^k / k!
_REVERSE_K3_COEFFICIENTS = tuple((k - 1) / math.factorial(k) for k in range(2, _MAX_DEGREE + 1))


def _series_times_t_squared(t: jax.Array, coefficients: tuple[float, ...]) -> jax.Array:
    """t^2 * sum_j c_j t^j by Horner's rule (Python-float coefficients keep t's dtype)."""
    acc = jnp.zeros_like(t)
    for c in reversed(coefficients):
        acc = acc * t + c
    return acc * t * t


@jax.jit
def _k1_of_log_ratio(t: jax.Array) -> jax.Array:
    return -t


@jax.jit
def _k2_of_log_ratio(t: jax.Array) -> jax.Array:
    return 0.5 * t * t


@jax.jit
def _k3_of_log_ratio(t: jax.Array) -> jax.Array:
    # (r - 1) - log r = e^t - 1 - t: the one kernel kljax._math keeps for it (a series near t = 0,
    # +inf at r = 0 and r = inf, finite gradients).
    return exp_minus_one_minus(t)


@jax.jit
def _reverse_k1_of_log_ratio(t: jax.Array) -> jax.Array:
    # r log r = t e^t, with 0 log 0 = 0 at r = 0 (t = -inf) in value and gradient.
    zero_weight = t == -jnp.inf
    t_safe = jnp.where(zero_weight, 0.0, t)
    return jnp.where(zero_weight, 0.0, t_safe * jnp.exp(t_safe))


@jax.jit
def _reverse_k3_of_log_ratio(t: jax.Array) -> jax.Array:
    # r log r - (r - 1) = e^t (t - 1) + 1: no overflow-induced inf - inf for large t, and
    # the value 1 at r = 0 (t = -inf).
    small = jnp.abs(t) < _SERIES_RADIUS
    zero_weight = t == -jnp.inf
    t_small = jnp.where(small, t, 0.0)
    t_large = jnp.where(small | zero_weight, 1.0, t)
    value = jnp.where(small, _series_times_t_squared(t_small, _REVERSE_K3_COEFFICIENTS),
                      jnp.exp(t_large) * (t_large - 1.0) + 1.0)
    return jnp.where(zero_weight, 1.0, value)


_FORWARD_TERMS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "k1": _k1_of_log_ratio,
    "k2": _k2_of_log_ratio,
    "k3": _k3_of_log_ratio,
}
_REVERSE_TERMS: dict[str, Callable[[jax.Array], jax.Array]] = {
    "k1": _reverse_k1_of_log_ratio,
    "k3": _reverse_k3_of_log_ratio,
}

ESTIMATORS: tuple[str, ...] = tuple(_FORWARD_TERMS)
"""Names accepted by ``estimator=`` of :func:`kl`, :func:`kl_with_stderr` and :func:`kl_from`."""

REVERSE_ESTIMATORS: tuple[str, ...] = tuple(_REVERSE_TERMS)
"""Names accepted by ``estimator=`` of :func:`reverse_kl` and friends."""


def _term(estimator: str, terms: dict, function: str) -> Callable[[jax.Array], jax.Array]:
    try:
        return terms[estimator]
    except (KeyError, TypeError):
        raise ValueError(
            f"`estimator`={estimator!r} is not known to {function}; valid names: {sorted(terms)}."
        ) from None


def _log_ratio(log_p, log_q, name_p: str = "log_p", name_q: str = "log_q") -> jax.Array:
    """Validates the log-densities and returns t = log_q - log_p = log(Q(x) / P(x))."""
    log_p = as_float_array(name_p, log_p)
    log_q = as_float_array(name_q, log_q)
    check_same_shape(name_p, log_p, name_q, log_q)
    check_eagerly(name_p, log_p, not_nan)
    check_eagerly(name_q, log_q, not_nan)
    return log_q - log_p


def _sample_axis(terms: jax.Array, axis: int, name: str) -> int:
    """``axis`` normalised; a ValueError naming ``name`` if it is out of range or holds no samples.

    The size is static, so an empty sample axis raises at trace time too (a shape problem): the
    mean of no samples would otherwise be a silent NaN.
    """
    axis = normalize_axis(name, terms, axis)
    if terms.shape[axis] == 0:
        raise ValueError(f"`{name}` is empty along the sample axis {axis} (shape {terms.shape}): "
                         "an estimate needs at least one sample.")
    return axis


def _mean(terms: jax.Array, axis: int, name: str) -> jax.Array:
    return jnp.mean(terms, axis=_sample_axis(terms, axis, name))


def _mean_and_stderr(terms: jax.Array, axis: int, name: str) -> tuple[jax.Array, jax.Array]:
    return _mean_and_stderr_on_axis(terms, _sample_axis(terms, axis, name))


@functools.partial(jax.jit, static_argnums=1)
def _mean_and_stderr_on_axis(terms: jax.Array, axis: int) -> tuple[jax.Array, jax.Array]:
    num_samples = terms.shape[axis]
    mean = jnp.mean(terms, axis=axis)
    # ddof=1: the unbiased variance; with a single sample the standard error is undefined (NaN).
    stderr = jnp.std(terms, axis=axis, ddof=1) / math.sqrt(num_samples)
    return mean, stderr


def k1(log_p, log_q) -> jax.Array:
    """Per-sample k1 term ``log_p - log_q``; its mean is an unbiased estimate of D(P||Q).

    Unbiased but high-variance, and individual terms are negative where Q(x) > P(x).

    Args:
        log_p: log P(x) at samples x ~ P, floating array.
        log_q: log Q(x) at the same samples, same shape as ``log_p``.

    Returns:
        The per-sample terms, same shape and dtype as the inputs.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax import mc
        >>> print(mc.k1(jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])).round(4).tolist())
        [0.5, -1.0]

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    return _k1_of_log_ratio(_log_ratio(log_p, log_q))


def k2(log_p, log_q) -> jax.Array:
    """Per-sample k2 term ``(log_p - log_q)^2 / 2``: biased, low-variance, never negative.

    Its mean estimates E_P[(log r)^2] / 2 (r = Q/P), an f-divergence that agrees with D(P||Q) to
    second order in (r - 1); the bias grows with the distance (N(0,1) vs N(mu,1): mu^4 / 8).

    Args:
        log_p: log P(x) at samples x ~ P, floating array.
        log_q: log Q(x) at the same samples, same shape as ``log_p``.

    Returns:
        The per-sample terms, same shape and dtype as the inputs.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax import mc
        >>> print(mc.k2(jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])).round(4).tolist())
        [0.125, 0.5]

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    return _k2_of_log_ratio(_log_ratio(log_p, log_q))


def k3(log_p, log_q) -> jax.Array:
    """Per-sample k3 term ``(r - 1) - log r`` with r = Q(x)/P(x): unbiased and never negative.

    Computed from t = log_q - log_p as expm1(t) - t, with a Taylor series for |t| < 1/2 so that the
    value is accurate to a few ulps even as t -> 0. Unbiased when Q is absolutely continuous with
    respect to P (E_P[r] = 1); its variance involves E_P[r^2] and is infinite when that is.

    Args:
        log_p: log P(x) at samples x ~ P, floating array.
        log_q: log Q(x) at the same samples, same shape as ``log_p``.

    Returns:
        The per-sample terms (>= 0), same shape and dtype as the inputs.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax import mc
        >>> print(mc.k3(jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])).round(4).tolist())
        [0.1065, 0.7183]

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    return _k3_of_log_ratio(_log_ratio(log_p, log_q))


def reverse_k1(log_p, log_q) -> jax.Array:
    """Per-sample importance-weighted term ``r log r`` (r = Q/P); its mean estimates D(Q||P).

    Unbiased for D(Q||P) from samples of P (when Q is absolutely continuous with respect to P),
    but terms can be negative and the weight r makes it heavy-tailed.

    Args:
        log_p: log P(x) at samples x ~ P, floating array.
        log_q: log Q(x) at the same samples, same shape as ``log_p``.

    Returns:
        The per-sample terms, same shape and dtype as the inputs (0 where Q(x) = 0).

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax import mc
        >>> print(mc.reverse_k1(jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])).round(4).tolist())
        [-0.3033, 2.7183]

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    return _reverse_k1_of_log_ratio(_log_ratio(log_p, log_q))


def reverse_k3(log_p, log_q) -> jax.Array:
    """Per-sample term ``r log r - (r - 1)`` (r = Q/P): a non-negative estimate of D(Q||P).

    The Bregman divergence of r log r between 1 and r; ``reverse_k1`` plus the zero-mean control
    variate -(r - 1). Unbiased when Q is absolutely continuous with respect to P. Evaluated as
    e^t (t - 1) + 1 with a Taylor series for |t| < 1/2, accurate to a few ulps for every t.

    Args:
        log_p: log P(x) at samples x ~ P, floating array.
        log_q: log Q(x) at the same samples, same shape as ``log_p``.

    Returns:
        The per-sample terms (>= 0), same shape and dtype as the inputs (1 where Q(x) = 0).

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax import mc
        >>> print(mc.reverse_k3(jnp.array([-1.0, -2.0]), jnp.array([-1.5, -1.0])).round(4).tolist())
        [0.0902, 1.0]

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
        (the estimator r log r - (r - 1) for the reverse direction).
    """
    return _reverse_k3_of_log_ratio(_log_ratio(log_p, log_q))


def kl(log_p, log_q, *, estimator: str = "k3", axis: int = -1) -> jax.Array:
    """Monte Carlo estimate of D_KL(P || Q) in nats from log-densities at samples of P.

    The mean of the per-sample term of ``estimator`` (see :data:`ESTIMATORS` and the module
    docstring for their bias and spread) over ``axis``, the sample axis.

    Args:
        log_p: log P(x) at samples x ~ P, floating array.
        log_q: log Q(x) at the same samples, same shape as ``log_p``.
        estimator: ``"k1"`` (unbiased, high variance), ``"k2"`` (biased, low variance) or ``"k3"``
            (unbiased, non-negative; default).
        axis: the sample axis to average over.

    Returns:
        The estimate, the inputs' shape without ``axis``, in the inputs' dtype.

    Raises:
        ValueError: unknown ``estimator`` (the message lists the valid names), shapes that differ,
            an out-of-range ``axis`` or an empty sample axis (these three at trace time too), or
            NaN in concrete inputs.
        TypeError: non-floating inputs.

    Example:
        >>> import jax
        >>> from kljax import mc
        >>> x = jax.random.normal(jax.random.key(0), (100_000,))   # x ~ P = N(0, 1)
        >>> log_p = -0.5 * x**2                                     # Q = N(1, 1); the constant cancels
        >>> log_q = -0.5 * (x - 1.0) ** 2
        >>> print(round(float(mc.kl(log_p, log_q)), 1))             # exact: 1/2
        0.5

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    term = _term(estimator, _FORWARD_TERMS, "kl")
    return _mean(term(_log_ratio(log_p, log_q)), axis, "log_p")


def kl_with_stderr(log_p, log_q, *, estimator: str = "k3", axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Monte Carlo estimate of D_KL(P || Q) and its standard error.

    The standard error is std(terms, ddof=1) / sqrt(n) over the n samples on ``axis``; it is NaN for
    n = 1 (n = 0 raises ValueError, as for :func:`kl`), and it is itself unreliable when the
    term's variance is infinite (k3 with E_P[r^2] = inf).

    Args:
        log_p: log P(x) at samples x ~ P, floating array.
        log_q: log Q(x) at the same samples, same shape as ``log_p``.
        estimator: one of :data:`ESTIMATORS` (default ``"k3"``).
        axis: the sample axis.

    Returns:
        ``(estimate, stderr)``, each the inputs' shape without ``axis``, in the inputs' dtype.

    Example:
        >>> import jax
        >>> from kljax import mc
        >>> x = jax.random.normal(jax.random.key(0), (100_000,))
        >>> estimate, stderr = mc.kl_with_stderr(-0.5 * x**2, -0.5 * (x - 1.0) ** 2, estimator="k1")
        >>> print(round(float(stderr), 4))   # sqrt(Var[k1] / n) = 1 / sqrt(1e5)
        0.0032

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    term = _term(estimator, _FORWARD_TERMS, "kl_with_stderr")
    return _mean_and_stderr(term(_log_ratio(log_p, log_q)), axis, "log_p")


def _sample_log_probs(key, p, q, num_samples) -> jax.Array:
    """Draws ``num_samples`` x ~ P and returns t = log Q(x) - log P(x), sample axis first."""
    for name, dist in (("p", p), ("q", q)):
        for method in ("sample", "log_prob"):
            if not callable(getattr(dist, method, None)):
                raise TypeError(
                    f"`{name}` must have `sample(key, shape)` and `log_prob(x)` methods; "
                    f"{type(dist).__name__} has no `{method}`."
                )
    try:
        num_samples = operator.index(num_samples)
    except TypeError:
        raise TypeError(f"`num_samples` must be an int, got {type(num_samples).__name__}.") from None
    if num_samples < 1:
        raise ValueError(f"`num_samples` must be >= 1, got {num_samples}.")
    # Positional shape: kljax's sample(key, shape) and numpyro's sample(key, sample_shape) both fit.
    x = p.sample(key, (num_samples,))
    return _log_ratio(p.log_prob(x), q.log_prob(x), "p.log_prob(x)", "q.log_prob(x)")


def kl_from(key, p, q, num_samples: int, *, estimator: str = "k3", with_stderr: bool = False):
    """Samples P and returns the Monte Carlo estimate of D_KL(P || Q) (optionally with stderr).

    Draws ``x = p.sample(key, (num_samples,))``, evaluates ``p.log_prob(x)`` and ``q.log_prob(x)`` and
    averages the ``estimator`` term over the sample axis (axis 0). Works with kljax distributions and
    any object with ``sample(key, shape)`` and ``log_prob(x)`` returning per-sample log-densities,
    e.g. numpyro distributions. Batched distributions give one estimate per batch element.

    Args:
        key: a JAX PRNG key.
        p: the distribution to sample from (first argument of the KL).
        q: the second distribution; its ``log_prob`` must accept P's samples.
        num_samples: the number of samples n >= 1 (a Python int).
        estimator: one of :data:`ESTIMATORS` (default ``"k3"``).
        with_stderr: also return the standard error (std with ddof=1 over sqrt(n)).

    Returns:
        The estimate of shape ``log_prob(x).shape[1:]``, or ``(estimate, stderr)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax import mc
        >>> class UnitGaussian:   # any object with sample and log_prob works
        ...     def __init__(self, loc):
        ...         self.loc = loc
        ...     def sample(self, key, shape):
        ...         return self.loc + jax.random.normal(key, shape)
        ...     def log_prob(self, x):
        ...         return -0.5 * (x - self.loc) ** 2 - 0.5 * jnp.log(2 * jnp.pi)
        >>> estimate = mc.kl_from(jax.random.key(0), UnitGaussian(0.0), UnitGaussian(1.0), 100_000)
        >>> print(round(float(estimate), 1))   # exact: (0 - 1)^2 / 2
        0.5

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    term = _term(estimator, _FORWARD_TERMS, "kl_from")
    terms = term(_sample_log_probs(key, p, q, num_samples))
    if with_stderr:
        return _mean_and_stderr(terms, 0, "p.log_prob(x)")
    return _mean(terms, 0, "p.log_prob(x)")


def reverse_kl(log_p, log_q, *, estimator: str = "k3", axis: int = -1) -> jax.Array:
    """Importance-sampled estimate of the reverse divergence D_KL(Q || P) from samples of P.

    With r = Q(x)/P(x), E_P[r log r] = D(Q||P). ``estimator="k3"`` (default) averages
    r log r - (r - 1) (non-negative, control variate), ``"k1"`` averages r log r.

    Args:
        log_p: log P(x) at samples x ~ P, floating array.
        log_q: log Q(x) at the same samples, same shape as ``log_p``.
        estimator: one of :data:`REVERSE_ESTIMATORS`.
        axis: the sample axis.

    Returns:
        The estimate of D(Q||P), the inputs' shape without ``axis``, in the inputs' dtype.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax import mc
        >>> x = jax.random.normal(jax.random.key(0), (100_000,))   # x ~ P = N(0, 1)
        >>> log_p, log_q = -0.5 * x**2, -0.5 * (x / 0.8) ** 2 - jnp.log(0.8)   # Q = N(0, 0.8^2)
        >>> print(round(float(mc.reverse_kl(log_p, log_q)), 2))  # exact D(Q||P): log(1/0.8) + 0.32 - 0.5
        0.04

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    term = _term(estimator, _REVERSE_TERMS, "reverse_kl")
    return _mean(term(_log_ratio(log_p, log_q)), axis, "log_p")


def reverse_kl_with_stderr(log_p, log_q, *, estimator: str = "k3",
                           axis: int = -1) -> tuple[jax.Array, jax.Array]:
    """Importance-sampled estimate of D_KL(Q || P) from samples of P, with its standard error.

    Args:
        log_p: log P(x) at samples x ~ P, floating array.
        log_q: log Q(x) at the same samples, same shape as ``log_p``.
        estimator: one of :data:`REVERSE_ESTIMATORS` (default ``"k3"``).
        axis: the sample axis.

    Returns:
        ``(estimate, stderr)``; stderr = std(terms, ddof=1) / sqrt(n), NaN for n = 1 (n = 0
        raises ValueError).

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax import mc
        >>> estimate, stderr = mc.reverse_kl_with_stderr(jnp.zeros(4), jnp.zeros(4))
        >>> print(float(estimate), float(stderr))
        0.0 0.0

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    term = _term(estimator, _REVERSE_TERMS, "reverse_kl_with_stderr")
    return _mean_and_stderr(term(_log_ratio(log_p, log_q)), axis, "log_p")


def reverse_kl_from(key, p, q, num_samples: int, *, estimator: str = "k3", with_stderr: bool = False):
    """Samples P and returns the importance-sampled estimate of D_KL(Q || P).

    Like :func:`kl_from` (same arguments, same sampling of P), but estimating the reverse direction;
    useful when only P can be sampled.

    Args:
        key: a JAX PRNG key.
        p: the distribution to sample from (second argument of the reverse KL).
        q: the other distribution; its ``log_prob`` must accept P's samples.
        num_samples: the number of samples n >= 1 (a Python int).
        estimator: one of :data:`REVERSE_ESTIMATORS` (default ``"k3"``).
        with_stderr: also return the standard error.

    Returns:
        The estimate of D(Q||P), or ``(estimate, stderr)``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax import mc
        >>> class UnitGaussian:
        ...     def __init__(self, loc):
        ...         self.loc = loc
        ...     def sample(self, key, shape):
        ...         return self.loc + jax.random.normal(key, shape)
        ...     def log_prob(self, x):
        ...         return -0.5 * (x - self.loc) ** 2
        >>> estimate = mc.reverse_kl_from(jax.random.key(0), UnitGaussian(0.0), UnitGaussian(1.0), 100_000)
        >>> print(round(float(estimate), 1))   # exact: (1 - 0)^2 / 2
        0.5

    References:
        J. Schulman (2020), "Approximating KL Divergence", http://joschu.net/blog/kl-approx.html
    """
    term = _term(estimator, _REVERSE_TERMS, "reverse_kl_from")
    terms = term(_sample_log_probs(key, p, q, num_samples))
    if with_stderr:
        return _mean_and_stderr(terms, 0, "p.log_prob(x)")
    return _mean(terms, 0, "p.log_prob(x)")
