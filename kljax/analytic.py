"""Closed-form KL divergence D(P || Q) between :mod:`kljax.distributions`, in nats.

``kl(p, q)`` looks the pair of types up in a registry and calls the registered function. Every
same-family pair is registered, plus ``MultivariateNormalDiag`` <-> ``MultivariateNormalTriL`` in both
directions. Parameters of P and Q broadcast against each other (batch shapes (3, 1) and (4,) give a
(3, 4) result); the result has the parameters' (promoted) dtype. Each pair's formula is written in a
form that stays accurate when P and Q are close (``expm1``, ``log_sigmoid``, ``log_softmax``,
triangular solves rather than inverses). The built-in rules are jitted, so an eager call compiles once
per shape and dtype.

Adding a pair::

    @register_kl(MyDistribution, Normal)
    def _kl_mine_normal(p, q):
        ...

Lookup follows the method resolution order of both types, so a subclass of ``Normal`` uses the
``(Normal, Normal)`` rule unless a more specific pair is registered. When several registered pairs
match, the one with the smallest sum of MRO distances wins, ties going to the more specific P.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import betaln, digamma, gammaln

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
    _lift_to_rank,
)

__all__ = [
    "kl",
    "register_kl",
    "kl_normal",
    "kl_mvn_diag",
    "kl_mvn",
    "kl_categorical",
    "kl_bernoulli",
    "kl_beta",
    "kl_gamma",
    "kl_dirichlet",
    "kl_laplace",
    "kl_exponential",
    "kl_poisson",
]

KLFunction = Callable[[object, object], jax.Array]
_REGISTRY: dict[tuple[type, type], KLFunction] = {}


def register_kl(type_p: type, type_q: type) -> Callable[[KLFunction], KLFunction]:
    """Decorator registering ``function(p, q) -> D(p || q)`` for P of ``type_p`` and Q of ``type_q``.

    The decorated function is returned unchanged. Registering a pair again replaces the old rule.

    Args:
      type_p: class of the first argument P (subclasses match too).
      type_q: class of the second argument Q (subclasses match too).

    Returns:
      A decorator.

    Example:
      >>> from kljax.distributions import Normal
      >>> class UnitNormal(Normal):
      ...     def __init__(self, loc):
      ...         super().__init__(loc, 1.0)
      >>> @register_kl(UnitNormal, UnitNormal)
      ... def _kl_unit(p, q):
      ...     return 0.5 * (p.loc - q.loc) ** 2
      >>> print(float(kl(UnitNormal(0.0), UnitNormal(2.0))))
      2.0
    """

    def decorator(function: KLFunction) -> KLFunction:
        _REGISTRY[(type_p, type_q)] = function
        return function

    return decorator


def _lookup(type_p: type, type_q: type) -> KLFunction | None:
    best, best_rank = None, None
    for distance_p, base_p in enumerate(type_p.__mro__):
        for distance_q, base_q in enumerate(type_q.__mro__):
            function = _REGISTRY.get((base_p, base_q))
            rank = (distance_p + distance_q, distance_p)
            if function is not None and (best_rank is None or rank < best_rank):
                best, best_rank = function, rank
    return best


def kl(p, q) -> jax.Array:
    """Closed-form D(P || Q) = E_P[log p(X) - log q(X)] in nats for a registered pair of distributions.

    Args:
      p: a distribution (the one the expectation is under).
      q: a distribution of a family registered against ``type(p)``.

    Returns:
      The divergence, shape ``broadcast(p.batch_shape, q.batch_shape)``.

    Raises:
      NotImplementedError: when no rule is registered for ``(type(p), type(q))``, naming both types.

    Example:
      >>> from kljax.distributions import Normal
      >>> print(round(float(kl(Normal(0.0, 1.0), Normal(1.0, 2.0))), 4))
      0.4431
    """
    function = _lookup(type(p), type(q))
    if function is None:
        raise NotImplementedError(
            f"no closed-form KL is registered for P of type {type(p).__name__} and Q of type "
            f"{type(q).__name__}; add one with kljax.analytic.register_kl({type(p).__name__}, "
            f"{type(q).__name__})."
        )
    return function(p, q)


# --------------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------------


def _builtin(function: KLFunction) -> KLFunction:
    """Jits a built-in rule and makes it NaN where either distribution's parameters are invalid.

    Constructors check values eagerly; under jit they cannot, and API.md asks for NaN there rather
    than a finite wrong number (e.g. a negative Gamma concentration has finite log-gamma).
    """

    @functools.wraps(function)
    def masked(p, q):
        value = function(p, q)
        for distribution in (p, q):
            valid = distribution._valid()
            if valid is not None:
                value = jnp.where(jnp.broadcast_to(valid, value.shape), value, jnp.nan)
        return value

    return jax.jit(masked)


def _exp_minus_one_minus(u: jax.Array) -> jax.Array:
    """e^u - 1 - u >= 0 to full relative precision, also near u = 0 (every scale-only KL term has it).

    ``expm1(u) - u`` loses about log10(2 / |u|) digits to cancellation; for |u| < 0.1 the Taylor
    series sum_{n=2}^{10} u^n / n! is used instead (truncation error < 1e-16 relative).
    """
    small = jnp.abs(u) < 0.1
    v = jnp.where(small, u, jnp.zeros_like(u))
    series = jnp.zeros_like(v)
    for n in range(10, 1, -1):  # Horner: u^2 (1/2! + u (1/3! + ... + u / 10!))
        series = v * series + 1 / math.factorial(n)
    return jnp.where(small, v * v * series, jnp.expm1(u) - u)


def _log_ratio(a: jax.Array, b: jax.Array) -> jax.Array:
    """log(a / b) for positive a, b; via log1p((a - b) / b) when a and b are close.

    a - b is exact there (Sterbenz), so the result keeps full relative precision even in float32,
    where log(a) - log(b) would lose ~3 digits for a/b = 1.001.
    """
    close = jnp.abs(a - b) < 0.5 * b
    near = jnp.log1p((a - b) / jnp.where(close, b, jnp.ones_like(b)))
    return jnp.where(close, near, jnp.log(a) - jnp.log(b))


def _sum_p_log_ratio(log_p: jax.Array, log_q: jax.Array, axis: int | None) -> jax.Array:
    """sum p (log p - log q) from log-probabilities, with 0 log(0 / q) = 0 in value and gradient.

    Where log p = -inf the term is 0 (also when log q = -inf); where only log q = -inf it is +inf.
    """
    zero = jnp.isneginf(log_p)
    safe_log_p = jnp.where(zero, jnp.zeros_like(log_p), log_p)
    log_ratio = jnp.where(zero, jnp.zeros_like(log_p), log_p - log_q)
    terms = jnp.where(zero, jnp.zeros_like(log_p), jnp.exp(safe_log_p) * log_ratio)
    return terms if axis is None else jnp.sum(terms, axis=axis)


def _check_event_sizes(what: str, size_p: int, size_q: int) -> None:
    if size_p != size_q:
        raise ValueError(f"P and Q must have the same {what}, got {size_p} for P and {size_q} for Q.")


# --------------------------------------------------------------------------------------------------
# Gaussian families
# --------------------------------------------------------------------------------------------------


@register_kl(Normal, Normal)
@_builtin
def kl_normal(p: Normal, q: Normal) -> jax.Array:
    """D(N(m_p, s_p^2) || N(m_q, s_q^2)) = log(s_q / s_p) + (s_p^2 + (m_p - m_q)^2) / (2 s_q^2) - 1/2.

    Computed as 0.5 (e^{2u} - 1 - 2u) + 0.5 ((m_p - m_q) / s_q)^2 with u = log s_p - log s_q, which is
    accurate when the scales are close.

    Args:
      p: ``Normal`` P.
      q: ``Normal`` Q.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> from kljax.distributions import Normal
      >>> print(round(float(kl_normal(Normal(0.0, 1.0), Normal(1.0, 2.0))), 4))
      0.4431

    References:
      Kullback (1959), Information Theory and Statistics, ch. 9; Gil, Alajaji & Linder (2013),
      "Renyi divergence measures for commonly used univariate continuous distributions",
      Information Sciences 249:124-131, table of Kullback-Leibler divergences.
    """
    loc_p, scale_p, loc_q, scale_q = jnp.broadcast_arrays(p.loc, p.scale, q.loc, q.scale)
    log_ratio = _log_ratio(scale_p, scale_q)
    return 0.5 * _exp_minus_one_minus(2 * log_ratio) + 0.5 * jnp.square((loc_p - loc_q) / scale_q)


@register_kl(MultivariateNormalDiag, MultivariateNormalDiag)
@_builtin
def kl_mvn_diag(p: MultivariateNormalDiag, q: MultivariateNormalDiag) -> jax.Array:
    """D(P || Q) for diagonal Gaussians: the sum over coordinates of the univariate ``kl_normal``.

    D = sum_i [ log(s_q,i / s_p,i) + (s_p,i^2 + (m_p,i - m_q,i)^2) / (2 s_q,i^2) - 1/2 ].

    Args:
      p: ``MultivariateNormalDiag`` P.
      q: ``MultivariateNormalDiag`` Q with the same event size.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> import jax.numpy as jnp
      >>> from kljax.distributions import MultivariateNormalDiag
      >>> p = MultivariateNormalDiag(jnp.zeros(2), jnp.ones(2))
      >>> q = MultivariateNormalDiag(jnp.ones(2), jnp.full(2, 2.0))
      >>> print(round(float(kl_mvn_diag(p, q)), 4))
      0.8863

    References:
      Rasmussen & Williams (2006), Gaussian Processes for Machine Learning, Appendix A.5.
    """
    _check_event_sizes("event size", p.loc.shape[-1], q.loc.shape[-1])
    loc_p, scale_p, loc_q, scale_q = jnp.broadcast_arrays(p.loc, p.scale_diag, q.loc, q.scale_diag)
    log_ratio = _log_ratio(scale_p, scale_q)
    terms = 0.5 * _exp_minus_one_minus(2 * log_ratio) + 0.5 * jnp.square((loc_p - loc_q) / scale_q)
    return jnp.sum(terms, axis=-1)


def _mvn_tril_kl(loc_p, scale_p, loc_q, scale_q):
    # Rasmussen & Williams (2006), eq. (A.23), with Sigma = L L^T:
    # tr(Sigma_q^-1 Sigma_p) = ||L_q^-1 L_p||_F^2, Mahalanobis term = ||L_q^-1 (m_p - m_q)||^2,
    # log|Sigma_q| - log|Sigma_p| = 2 sum log diag L_q - 2 sum log diag L_p.
    d = loc_p.shape[-1]
    whitened_scale = solve_triangular(scale_q, scale_p, lower=True)
    whitened_diff = solve_triangular(scale_q, loc_p - loc_q, lower=True)
    log_det_ratio = jnp.sum(_log_ratio(jnp.diagonal(scale_q), jnp.diagonal(scale_p)))
    trace_term = jnp.sum(jnp.square(whitened_scale))
    mahalanobis = jnp.sum(jnp.square(whitened_diff))
    return 0.5 * (trace_term + mahalanobis - d) + log_det_ratio


def _loc_and_tril(distribution) -> tuple[jax.Array, jax.Array]:
    return distribution.loc, distribution.scale_tril


@register_kl(MultivariateNormalTriL, MultivariateNormalTriL)
@register_kl(MultivariateNormalDiag, MultivariateNormalTriL)
@register_kl(MultivariateNormalTriL, MultivariateNormalDiag)
@_builtin
def kl_mvn(p, q) -> jax.Array:
    """D(N(m_p, L_p L_p^T) || N(m_q, L_q L_q^T)) for full-covariance (or diagonal) Gaussians.

    D = 0.5 [ ||L_q^-1 L_p||_F^2 + ||L_q^-1 (m_p - m_q)||^2 - d ] + sum_i log(L_q,ii / L_p,ii),

    with triangular solves (no explicit inverse) and log-determinants from the Cholesky diagonals.
    Either argument may be ``MultivariateNormalDiag`` (its scale is used as a diagonal L).

    Args:
      p: ``MultivariateNormalTriL`` or ``MultivariateNormalDiag`` P.
      q: ``MultivariateNormalTriL`` or ``MultivariateNormalDiag`` Q with the same event size.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> import jax.numpy as jnp
      >>> from kljax.distributions import MultivariateNormalDiag, MultivariateNormalTriL
      >>> p = MultivariateNormalTriL(jnp.zeros(2), jnp.array([[1.0, 0.0], [0.5, 1.0]]))
      >>> q = MultivariateNormalDiag(jnp.ones(2), jnp.full(2, 2.0))
      >>> print(round(float(kl_mvn(p, q)), 4))
      0.9176

    References:
      Rasmussen & Williams (2006), Gaussian Processes for Machine Learning, Appendix A.5, eq. (A.23).
    """
    loc_p, scale_p = _loc_and_tril(p)
    loc_q, scale_q = _loc_and_tril(q)
    _check_event_sizes("event size", loc_p.shape[-1], loc_q.shape[-1])
    batch_ndims = max(loc_p.ndim, loc_q.ndim) - 1
    return jnp.vectorize(_mvn_tril_kl, signature="(d),(d,d),(d),(d,d)->()")(
        _lift_to_rank(loc_p, 1, batch_ndims), _lift_to_rank(scale_p, 2, batch_ndims),
        _lift_to_rank(loc_q, 1, batch_ndims), _lift_to_rank(scale_q, 2, batch_ndims),
    )


# --------------------------------------------------------------------------------------------------
# Discrete families
# --------------------------------------------------------------------------------------------------


@register_kl(Categorical, Categorical)
@_builtin
def kl_categorical(p: Categorical, q: Categorical) -> jax.Array:
    """D(P || Q) = sum_k p_k (log p_k - log q_k) from logits, via ``log_softmax``.

    Categories with p_k = 0 (logit -inf) contribute 0, without NaN in value or gradient; p_k > 0 where
    q_k = 0 gives +inf.

    Args:
      p: ``Categorical`` P.
      q: ``Categorical`` Q with the same number of categories.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> import jax.numpy as jnp
      >>> from kljax.distributions import Categorical
      >>> p = Categorical(jnp.array([0.0, 0.0, -jnp.inf]))
      >>> q = Categorical(jnp.zeros(3))
      >>> print(round(float(kl_categorical(p, q)), 4))  # log(3/2)
      0.4055

    References:
      Cover & Thomas (2006), Elements of Information Theory, 2nd ed., eq. (2.26).
    """
    _check_event_sizes("number of categories", p.logits.shape[-1], q.logits.shape[-1])
    log_p, log_q = jnp.broadcast_arrays(p.log_probs, q.log_probs)
    return _sum_p_log_ratio(log_p, log_q, axis=-1)


@register_kl(Bernoulli, Bernoulli)
@_builtin
def kl_bernoulli(p: Bernoulli, q: Bernoulli) -> jax.Array:
    """D(Ber(p) || Ber(q)) = p log(p / q) + (1 - p) log((1 - p) / (1 - q)) from logits.

    With log p = log_sigmoid(l_p) and log(1 - p) = log_sigmoid(-l_p), so logits of magnitude 1e4 (and
    +-inf) stay finite and accurate.

    Args:
      p: ``Bernoulli`` P.
      q: ``Bernoulli`` Q.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> from kljax.distributions import Bernoulli
      >>> print(round(float(kl_bernoulli(Bernoulli(0.0), Bernoulli(2.0))), 4))
      0.4338

    References:
      Cover & Thomas (2006), Elements of Information Theory, 2nd ed., eq. (2.26).
    """
    logits_p, logits_q = jnp.broadcast_arrays(p.logits, q.logits)
    log_sigmoid = jax.nn.log_sigmoid
    return (_sum_p_log_ratio(log_sigmoid(logits_p), log_sigmoid(logits_q), axis=None)
            + _sum_p_log_ratio(log_sigmoid(-logits_p), log_sigmoid(-logits_q), axis=None))


@register_kl(Poisson, Poisson)
@_builtin
def kl_poisson(p: Poisson, q: Poisson) -> jax.Array:
    """D(Poi(r_p) || Poi(r_q)) = r_p log(r_p / r_q) - r_p + r_q = r_p (e^u - 1 - u), u = log(r_q / r_p).

    Args:
      p: ``Poisson`` P.
      q: ``Poisson`` Q.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> from kljax.distributions import Poisson
      >>> print(round(float(kl_poisson(Poisson(2.0), Poisson(3.0))), 4))
      0.1891

    References:
      Cover & Thomas (2006), Elements of Information Theory, 2nd ed., eq. (2.26), summed in closed form.
    """
    rate_p, rate_q = jnp.broadcast_arrays(p.rate, q.rate)
    return rate_p * _exp_minus_one_minus(_log_ratio(rate_q, rate_p))


# --------------------------------------------------------------------------------------------------
# Gamma-based families
# --------------------------------------------------------------------------------------------------


@register_kl(Gamma, Gamma)
@_builtin
def kl_gamma(p: Gamma, q: Gamma) -> jax.Array:
    """D(Gamma(k_p, b_p) || Gamma(k_q, b_q)) for shape k and rate b.

    D = (k_p - k_q) psi(k_p) - log Gamma(k_p) + log Gamma(k_q) + k_q (log b_p - log b_q)
        + k_p (b_q - b_p) / b_p.

    Args:
      p: ``Gamma`` P.
      q: ``Gamma`` Q.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> from kljax.distributions import Gamma
      >>> print(round(float(kl_gamma(Gamma(2.0, 1.0), Gamma(3.0, 2.0))), 4))
      0.1909

    References:
      Penny (2001), "KL-divergences of Normal, Gamma, Dirichlet and Wishart densities", Wellcome
      Department of Cognitive Neurology, UCL (Gamma section, there in scale form); Gil, Alajaji &
      Linder (2013), Information Sciences 249:124-131, table of Kullback-Leibler divergences.
    """
    k_p, rate_p, k_q, rate_q = jnp.broadcast_arrays(p.concentration, p.rate, q.concentration, q.rate)
    log_rate_ratio = _log_ratio(rate_q, rate_p)
    # k_q (log b_p - log b_q) + k_p (b_q - b_p) / b_p = k_p (e^u - 1 - u) + (k_p - k_q) u, u = log(b_q / b_p)
    return ((k_p - k_q) * digamma(k_p) - gammaln(k_p) + gammaln(k_q)
            + k_p * _exp_minus_one_minus(log_rate_ratio) + (k_p - k_q) * log_rate_ratio)


@register_kl(Beta, Beta)
@_builtin
def kl_beta(p: Beta, q: Beta) -> jax.Array:
    """D(Beta(a_p, b_p) || Beta(a_q, b_q)).

    D = log B(a_q, b_q) - log B(a_p, b_p) + (a_p - a_q) psi(a_p) + (b_p - b_q) psi(b_p)
        + (a_q - a_p + b_q - b_p) psi(a_p + b_p).

    Args:
      p: ``Beta`` P.
      q: ``Beta`` Q.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> from kljax.distributions import Beta
      >>> print(round(float(kl_beta(Beta(2.0, 3.0), Beta(1.0, 1.0))), 4))
      0.2349

    References:
      Gil, Alajaji & Linder (2013), "Renyi divergence measures for commonly used univariate continuous
      distributions", Information Sciences 249:124-131, table of Kullback-Leibler divergences; also
      the Dirichlet formula of Penny (2001) with k = 2.
    """
    a_p, b_p, a_q, b_q = jnp.broadcast_arrays(p.alpha, p.beta, q.alpha, q.beta)
    return (betaln(a_q, b_q) - betaln(a_p, b_p) + (a_p - a_q) * digamma(a_p) + (b_p - b_q) * digamma(b_p)
            + (a_q - a_p + b_q - b_p) * digamma(a_p + b_p))


@register_kl(Dirichlet, Dirichlet)
@_builtin
def kl_dirichlet(p: Dirichlet, q: Dirichlet) -> jax.Array:
    """D(Dir(a) || Dir(b)) with a0 = sum_i a_i, b0 = sum_i b_i.

    D = log Gamma(a0) - sum_i log Gamma(a_i) - log Gamma(b0) + sum_i log Gamma(b_i)
        + sum_i (a_i - b_i) (psi(a_i) - psi(a0)).

    Args:
      p: ``Dirichlet`` P.
      q: ``Dirichlet`` Q with the same number of components.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> import jax.numpy as jnp
      >>> from kljax.distributions import Dirichlet
      >>> p = Dirichlet(jnp.array([1.0, 2.0, 3.0]))
      >>> print(round(float(kl_dirichlet(p, Dirichlet(jnp.ones(3)))), 4))
      0.5512

    References:
      Penny (2001), "KL-divergences of Normal, Gamma, Dirichlet and Wishart densities", Wellcome
      Department of Cognitive Neurology, UCL (Dirichlet section).
    """
    _check_event_sizes("number of components", p.concentration.shape[-1], q.concentration.shape[-1])
    a, b = jnp.broadcast_arrays(p.concentration, q.concentration)
    a0, b0 = jnp.sum(a, axis=-1), jnp.sum(b, axis=-1)
    return (gammaln(a0) - gammaln(b0) + jnp.sum(gammaln(b) - gammaln(a), axis=-1)
            + jnp.sum((a - b) * (digamma(a) - digamma(a0)[..., None]), axis=-1))


# --------------------------------------------------------------------------------------------------
# Laplace and Exponential
# --------------------------------------------------------------------------------------------------


@register_kl(Laplace, Laplace)
@_builtin
def kl_laplace(p: Laplace, q: Laplace) -> jax.Array:
    """Closed-form D(Laplace(m_p, s_p) || Laplace(m_q, s_q)) for location m and scale s.

    D = log(s_q / s_p) + |m_p - m_q| / s_q + (s_p / s_q) exp(-|m_p - m_q| / s_p) - 1.

    With w = log(s_p / s_q) and z = |m_p - m_q| / s_p this is phi(w - z) + z expm1(w), phi(u) = e^u - 1 - u,
    a form without cancellation when P and Q are close.

    Args:
      p: ``Laplace`` P.
      q: ``Laplace`` Q.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> from kljax.distributions import Laplace
      >>> print(round(float(kl_laplace(Laplace(0.0, 1.0), Laplace(1.0, 2.0))), 4))
      0.3771

    References:
      Gil, Alajaji & Linder (2013), "Renyi divergence measures for commonly used univariate continuous
      distributions", Information Sciences 249:124-131, table of Kullback-Leibler divergences.
    """
    loc_p, scale_p, loc_q, scale_q = jnp.broadcast_arrays(p.loc, p.scale, q.loc, q.scale)
    log_ratio = _log_ratio(scale_p, scale_q)
    scaled_distance = jnp.abs(loc_p - loc_q) / scale_p
    # -w + z e^w + e^(w - z) - 1 = phi(w - z) + z (e^w - 1)
    return _exp_minus_one_minus(log_ratio - scaled_distance) + scaled_distance * jnp.expm1(log_ratio)


@register_kl(Exponential, Exponential)
@_builtin
def kl_exponential(p: Exponential, q: Exponential) -> jax.Array:
    """D(Exp(r_p) || Exp(r_q)) = log(r_p / r_q) + r_q / r_p - 1 = e^u - 1 - u, u = log(r_q / r_p).

    Args:
      p: ``Exponential`` P (rate parameter).
      q: ``Exponential`` Q.

    Returns:
      D(P || Q), shape broadcast of the batch shapes.

    Example:
      >>> from kljax.distributions import Exponential
      >>> print(round(float(kl_exponential(Exponential(1.0), Exponential(2.0))), 4))
      0.3069

    References:
      Gil, Alajaji & Linder (2013), "Renyi divergence measures for commonly used univariate continuous
      distributions", Information Sciences 249:124-131, table of Kullback-Leibler divergences.
    """
    rate_p, rate_q = jnp.broadcast_arrays(p.rate, q.rate)
    return _exp_minus_one_minus(_log_ratio(rate_q, rate_p))
