"""Closed-form KL divergence D(P || Q) between :mod:`kljax.distributions`, in nats.

``kl(p, q)`` looks the pair of types up in a registry and calls the registered function. Every
same-family pair is registered, plus ``MultivariateNormalDiag`` <-> ``MultivariateNormalTriL`` in both
directions. Parameters of P and Q broadcast against each other (batch shapes (3, 1) and (4,) give a
(3, 4) result; batch shapes that do not broadcast raise a ``ValueError`` naming both); the result has
the parameters' (promoted) dtype. The built-in rules are jitted, so an eager call compiles once per
shape and dtype.

Accuracy rule: every built-in formula is written as a sum of non-negative terms, each computed to
full relative precision, so the result is never negative and keeps its relative precision (float32
included) however close P and Q are. The textbook forms subtract O(1) quantities whose difference is
O(|theta_p - theta_q|^2) and fail there: ``log(s_q) - log(s_p) + s_p^2 / (2 s_q^2) - 1/2`` or
``log Gamma(a_q) - log Gamma(a_p) - (a_q - a_p) psi(a_p)`` can be negative in float32. Two bounded
differences remain: inside the Stirling remainder below (its negative part is a fraction of the
positive one), and for Dirichlet and Beta between the remainders of the components and of the total
(large only for pairs far apart, where the value is not small). The building blocks are

- phi(u) = e^u - 1 - u >= 0 (a series near u = 0) with u = log(a / b) from ``log1p((a - b) / b)``:
  the scale and rate terms of every family;
- for Categorical and Bernoulli (and the means of a Dirichlet), D = log E_P[e^c] = log1p(E_P[phi(c)])
  with c the log-ratio log(q / p) centred under P;
- for Gamma, Beta and Dirichlet, which are Bregman divergences of log-partition functions made of
  log-gamma, log Gamma(x) = x log x - x + g(x) splits the divergence into a divergence between means
  (phi or a categorical KL, as above) and the Bregman divergence of the convex Stirling remainder
  g, computed through the recurrence to x >= 10 and then Stirling's series;
- for full-covariance Gaussians, with W = L_q^-1 L_p lower triangular,
  tr(W W^T) - d - log det(W W^T) = sum_{i>j} W_ij^2 + sum_i phi(2 log W_ii), and W - I is solved
  from L_p - L_q.

Adding a pair::

    @register_kl(MyDistribution, Normal)
    def _kl_mine_normal(p, q):
        ...

Lookup follows the method resolution order of both types, so a subclass of ``Normal`` uses the
``(Normal, Normal)`` rule unless a more specific pair is registered. When several registered pairs
match, the one with the smallest sum of MRO distances wins, ties going to the more specific P.

References:
  Banerjee, Merugu, Dhillon & Ghosh (2005), "Clustering with Bregman divergences", JMLR 6:1705-1749
  (the KL between members of an exponential family is the Bregman divergence of its log-partition
  function, section 4); NIST Digital Library of Mathematical Functions, eq. 5.11.1 (Stirling's series
  for log Gamma) and 5.5.1 (the recurrence Gamma(x + 1) = x Gamma(x)).
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import jax
import jax.numpy as jnp
from jax.scipy.linalg import solve_triangular

from kljax import _contract
from kljax._math import exp_minus_one_minus, kl_from_log_weights, log_ratio
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
      ValueError: when the batch shapes of P and Q do not broadcast, naming both shapes and types
        (also at trace time under ``jax.jit``).

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
    _check_batch_shapes(p, q)
    return function(p, q)


def _batch_shape(distribution) -> tuple[int, ...] | None:
    """The batch shape of a kljax distribution; None for other objects (their rules check shapes)."""
    if isinstance(distribution, Distribution) and distribution._parameter_names:
        return distribution.batch_shape
    return None


def _check_batch_shapes(p, q) -> None:
    shape_p, shape_q = _batch_shape(p), _batch_shape(q)
    if shape_p is None or shape_q is None:
        return
    try:
        jnp.broadcast_shapes(shape_p, shape_q)
    except ValueError:
        raise ValueError(
            f"the batch shapes of P and Q do not broadcast: P ({type(p).__name__}) has batch shape "
            f"{shape_p} and Q ({type(q).__name__}) has batch shape {shape_q}."
        ) from None


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
        return _contract.nan_unless(function(p, q), p._valid(), q._valid())

    return jax.jit(masked)


def _log1p_of_ratio(x: jax.Array, numerator: jax.Array, denominator: jax.Array) -> jax.Array:
    """log(1 + x) where 1 + x = numerator / denominator (both > 0) and x carries their exact difference.

    ``log1p(x)`` while |x| < 1/2; beyond, log(numerator) - log(denominator), because 1 + x cancels
    when x is close to -1.
    """
    near = jnp.abs(x) < 0.5
    far_numerator = jnp.where(near, jnp.ones_like(numerator), numerator)
    far_denominator = jnp.where(near, jnp.ones_like(denominator), denominator)
    return jnp.where(near, jnp.log1p(jnp.where(near, x, jnp.zeros_like(x))),
                     jnp.log(far_numerator) - jnp.log(far_denominator))


def _x_minus_log1p(x: jax.Array, log1p_x: jax.Array) -> jax.Array:
    """x - log(1 + x) >= 0 for x > -1, given log(1 + x), to full relative precision also near x = 0.

    That is phi(log1p(x)): the series of ``kljax._math.exp_minus_one_minus`` for |log1p(x)| < 0.1, else the
    difference itself (no cancellation there).
    """
    small = jnp.abs(log1p_x) < 0.1
    series = exp_minus_one_minus(jnp.where(small, log1p_x, jnp.zeros_like(log1p_x)))
    return jnp.where(small, series, x - log1p_x)


# Stirling's series for g(x) = log Gamma(x) - (x - 1/2) log x + x - log(2 pi) / 2 (DLMF 5.11.1):
# sum_j B_2j / (2j (2j - 1) x^(2j - 1)), as (power, coefficient). From x >= 10 on, the omitted terms
# change the Bregman divergence below by about 1e-14 of itself at most.
_STIRLING_SERIES = ((1, 1 / 12), (3, -1 / 360), (5, 1 / 1260), (7, -1 / 1680), (9, 1 / 1188),
                    (11, -691 / 360360), (13, 1 / 156))
_STIRLING_FROM = 10


def _along_new_axis(values, like: jax.Array) -> jax.Array:
    """``values`` as an array of ``like``'s dtype, shaped to broadcast along a new last axis of ``like``."""
    return jnp.reshape(jnp.asarray(list(values), like.dtype), (1,) * like.ndim + (-1,))


def _stirling_series_bregmans(shifted_a: jax.Array, shifted_b: jax.Array, x: jax.Array,
                              log1p_x: jax.Array) -> jax.Array:
    """c_j t^-m_j [(1 + x)^-m_j - 1 + m_j x] for each term of ``_STIRLING_SERIES`` (new last axis).

    That is the Bregman divergence of c_j t^-m_j from t = ``shifted_a`` >= 10 to t (1 + x) =
    ``shifted_b`` >= 10. For m = 1 it is x^2 / (t (1 + x)), exact; for m >= 3, t^-m expm1(-m log1p(x))
    + m x t^-m loses about log10(1 / |x|) digits near x = 0, but these terms are below 1e-4 of the
    divergence they are part of (|c_j| <= 1/360, t^-m <= 1e-3 t^-1), so the sum keeps its relative
    precision. Far from x = 0 the power is taken as exp(-m log(t (1 + x))), which cannot overflow.
    """
    m = _along_new_axis([m for m, _ in _STIRLING_SERIES[1:]], x)
    coefficients = _along_new_axis([c for _, c in _STIRLING_SERIES], x)
    log_a, log_b = jnp.log(shifted_a)[..., None], jnp.log(shifted_b)[..., None]
    x, log1p_x = x[..., None], log1p_x[..., None]
    exponent = -m * log1p_x  # log (1 + x)^-m
    far = exponent > 20
    near_exponent = jnp.where(far, jnp.zeros_like(exponent), exponent)
    power = jnp.exp(-m * log_a)  # t^-m
    higher = (jnp.where(far, jnp.exp(-m * log_b) - power, power * jnp.expm1(near_exponent))
              + m * x * power)
    first = jnp.square(x) / shifted_b[..., None]
    return coefficients * jnp.concatenate([first, higher], axis=-1)


def _stirling_remainder_bregman(a: jax.Array, b: jax.Array, delta: jax.Array) -> jax.Array:
    """g(b) - g(a) - (b - a) g'(a) >= 0 for g(x) = log Gamma(x) - x log x + x and a, b > 0.

    ``delta`` is b - a, passed so that the difference of close concentrations stays exact (b - a
    recomputed from rounded sums would not be); b enters only as a factor, or where a and b are far
    apart.
    g is convex (g'' = psi'(x) - 1/x > 0). With n = max(0, ceil(10 - min(a, b))) steps of the
    recurrence log Gamma(x) = log Gamma(x + n) - sum_{k<n} log(x + k) (DLMF 5.5.1),
    x = delta / (a + n) and h(y) = y - log1p(y) >= 0,

        D = sum_{k<n} h(delta / (a + k)) - b h(z) - (n - 1/2) h(x)
            + sum_j c_j (a + n)^-m_j [(1 + x)^-m_j - 1 + m_j x],     z = -n x / b,

    with (m_j, c_j) Stirling's series. Every h and bracket is >= 0 and computed to full relative
    precision (log(1 + y) from the ratio it stands for where y is near -1). The negative terms (only
    when n > 0) come from the recurrence and are a fraction of the positive ones (the sum is within
    a factor of 9 of its positive part), so the result loses at most about one digit.
    """
    steps = jnp.clip(jnp.ceil(_STIRLING_FROM - jnp.minimum(a, b)), 0, _STIRLING_FROM)
    shifted_a, shifted_b = a + steps, b + steps
    x = delta / shifted_a
    log1p_x = _log1p_of_ratio(x, shifted_b, shifted_a)
    z = -steps * x / b  # 1 + z = a (b + n) / ((a + n) b)
    near = jnp.abs(z) < 0.5
    log1p_z = jnp.where(near, jnp.log1p(jnp.where(near, z, jnp.zeros_like(z))),
                        jnp.log(a) + jnp.log(shifted_b) - jnp.log(shifted_a) - jnp.log(b))
    k = _along_new_axis(range(_STIRLING_FROM), a)
    a_k, b_k = a[..., None] + k, b[..., None] + k
    y = delta[..., None] / a_k
    # One vectorised x - log1p(x) for all brackets (a small program to compile, also for gradients).
    arguments = jnp.concatenate([y, z[..., None], x[..., None]], axis=-1)
    logs = jnp.concatenate([_log1p_of_ratio(y, b_k, a_k), log1p_z[..., None], log1p_x[..., None]],
                           axis=-1)
    weights = jnp.concatenate(
        [(k < steps[..., None]).astype(a.dtype), -b[..., None], (0.5 - steps)[..., None]], axis=-1)
    series = _stirling_series_bregmans(shifted_a, shifted_b, x, log1p_x)
    terms = jnp.concatenate([weights * _x_minus_log1p(arguments, logs), series], axis=-1)
    return jnp.sum(terms, axis=-1)


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
    log_scale_ratio = log_ratio(scale_p, scale_q)
    return 0.5 * exp_minus_one_minus(2 * log_scale_ratio) + 0.5 * jnp.square((loc_p - loc_q) / scale_q)


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
    log_scale_ratio = log_ratio(scale_p, scale_q)
    terms = 0.5 * exp_minus_one_minus(2 * log_scale_ratio) + 0.5 * jnp.square((loc_p - loc_q) / scale_q)
    return jnp.sum(terms, axis=-1)


def _mvn_tril_kl(loc_p, scale_p, loc_q, scale_q):
    # Rasmussen & Williams (2006), eq. (A.23), with Sigma = L L^T and W = L_q^-1 L_p (lower triangular,
    # diagonal L_p,ii / L_q,ii): tr(Sigma_q^-1 Sigma_p) = ||W||_F^2, log|Sigma_q| - log|Sigma_p| =
    # -2 sum log W_ii, so 2 D = sum_{i>j} W_ij^2 + sum_i phi(2 log W_ii) + ||L_q^-1 (m_p - m_q)||^2, all
    # terms >= 0. The off-diagonal part of W is that of L_q^-1 (L_p - L_q), which keeps its relative
    # precision when L_p and L_q are close (a solve for W itself would not: W_ij = O(1e-7) in float32).
    scale_p, scale_q = jnp.tril(scale_p), jnp.tril(scale_q)
    whitened_difference = solve_triangular(scale_q, scale_p - scale_q, lower=True)
    whitened_loc = solve_triangular(scale_q, loc_p - loc_q, lower=True)
    log_diagonal_ratio = log_ratio(jnp.diagonal(scale_p), jnp.diagonal(scale_q))
    return 0.5 * (jnp.sum(jnp.square(jnp.tril(whitened_difference, -1)))
                  + jnp.sum(exp_minus_one_minus(2 * log_diagonal_ratio))
                  + jnp.sum(jnp.square(whitened_loc)))


def _loc_and_tril(distribution) -> tuple[jax.Array, jax.Array]:
    return distribution.loc, distribution.scale_tril


@register_kl(MultivariateNormalTriL, MultivariateNormalTriL)
@register_kl(MultivariateNormalDiag, MultivariateNormalTriL)
@register_kl(MultivariateNormalTriL, MultivariateNormalDiag)
@_builtin
def kl_mvn(p, q) -> jax.Array:
    """D(N(m_p, L_p L_p^T) || N(m_q, L_q L_q^T)) for full-covariance (or diagonal) Gaussians.

    D = 0.5 [ ||L_q^-1 L_p||_F^2 + ||L_q^-1 (m_p - m_q)||^2 - d ] + sum_i log(L_q,ii / L_p,ii),

    computed without cancellation as 0.5 [ sum_{i>j} W_ij^2 + sum_i phi(2 log W_ii) + ||z||^2 ] with
    W = L_q^-1 L_p (its off-diagonal part solved from L_p - L_q), z = L_q^-1 (m_p - m_q) and
    phi(u) = e^u - 1 - u: triangular solves, no explicit inverse. Only the lower triangles of the
    scales are used. Either argument may be ``MultivariateNormalDiag`` (its scale is used as a
    diagonal L).

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
    """D(P || Q) = sum_k p_k (log p_k - log q_k) from logits.

    Computed as log1p(sum_k p_k phi(c_k)) with phi(u) = e^u - 1 - u and c = d - E_P[d], d = l_q - l_p
    the difference of the logits (so D = log E_P[e^c]): a sum of non-negative terms, accurate in
    float32 also when P and Q are close, where sum p log(p / q) cancels. Categories with p_k = 0
    (logit -inf) contribute 0, without NaN in value or gradient; if Q has mass there,
    -log Q(support of P) is added. p_k > 0 where q_k = 0 gives +inf.

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
    logits_p, logits_q = jnp.broadcast_arrays(p.logits, q.logits)
    return kl_from_log_weights(logits_p, logits_q, logits_p.ndim - 1)


@register_kl(Bernoulli, Bernoulli)
@_builtin
def kl_bernoulli(p: Bernoulli, q: Bernoulli) -> jax.Array:
    """D(Ber(p) || Ber(q)) = p log(p / q) + (1 - p) log((1 - p) / (1 - q)) from logits.

    The categorical form of ``kl_categorical`` with logits (l, 0), which is accurate when the logits
    are close and stays finite and accurate for logits of magnitude 1e4; infinite logits (certain
    outcomes) use log-probabilities (log_sigmoid(l), log_sigmoid(-l)) instead.

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
    finite = jnp.isfinite(logits_p) & jnp.isfinite(logits_q)

    def two_logits(logits):
        # (l, 0) where both logits are finite, else the log-probabilities; the unused branch gets
        # finite stand-ins so that neither it nor its gradient is NaN.
        finite_logits = jnp.where(finite, logits, jnp.zeros_like(logits))
        log_probs = jnp.stack([jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)], axis=-1)
        return jnp.where(finite[..., None],
                         jnp.stack([finite_logits, jnp.zeros_like(logits)], axis=-1), log_probs)

    logits_p, logits_q = two_logits(logits_p), two_logits(logits_q)
    return kl_from_log_weights(logits_p, logits_q, logits_p.ndim - 1)


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
    return rate_p * exp_minus_one_minus(log_ratio(rate_q, rate_p))


# --------------------------------------------------------------------------------------------------
# Gamma-based families
# --------------------------------------------------------------------------------------------------


@register_kl(Gamma, Gamma)
@_builtin
def kl_gamma(p: Gamma, q: Gamma) -> jax.Array:
    """D(Gamma(k_p, b_p) || Gamma(k_q, b_q)) for shape k and rate b.

    D = (k_p - k_q) psi(k_p) - log Gamma(k_p) + log Gamma(k_q) + k_q (log b_p - log b_q)
        + k_p (b_q - b_p) / b_p.

    Computed without cancellation as D = k_q phi(log(m_p / m_q)) + B_g(k_p, k_q), with means
    m = k / b, phi(u) = e^u - 1 - u and B_g the Bregman divergence of the Stirling remainder
    g(x) = log Gamma(x) - x log x + x (convex), both >= 0: splitting log Gamma(x) = x log x - x + g(x),
    the x log x - x part and the rate terms combine into the phi term.

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
    log_mean_ratio = log_ratio(rate_q, rate_p) - log_ratio(k_q, k_p)  # log(m_p / m_q)
    return k_q * exp_minus_one_minus(log_mean_ratio) + _stirling_remainder_bregman(k_p, k_q, k_q - k_p)


@register_kl(Beta, Beta)
@_builtin
def kl_beta(p: Beta, q: Beta) -> jax.Array:
    """D(Beta(a_p, b_p) || Beta(a_q, b_q)).

    D = log B(a_q, b_q) - log B(a_p, b_p) + (a_p - a_q) psi(a_p) + (b_p - b_q) psi(b_p)
        + (a_q - a_p + b_q - b_p) psi(a_p + b_p),

    computed as the two-component ``kl_dirichlet``, which has no cancellation.

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
    return _dirichlet_kl(jnp.stack([a_p, b_p], axis=-1), jnp.stack([a_q, b_q], axis=-1))


@register_kl(Dirichlet, Dirichlet)
@_builtin
def kl_dirichlet(p: Dirichlet, q: Dirichlet) -> jax.Array:
    """D(Dir(a) || Dir(b)) with a0 = sum_i a_i, b0 = sum_i b_i.

    D = log Gamma(a0) - sum_i log Gamma(a_i) - log Gamma(b0) + sum_i log Gamma(b_i)
        + sum_i (a_i - b_i) (psi(a_i) - psi(a0)).

    This is the Bregman divergence of the log-partition function A(a) = sum_i log Gamma(a_i) -
    log Gamma(a0) from a to b. Splitting log Gamma(x) = x log x - x + g(x) (g the Stirling remainder,
    see ``kl_gamma``), it is computed without cancellation as

        D = b0 KL(b / b0 || a / a0) + sum_i B_g(a_i, b_i) - B_g(a0, b0),

    a categorical KL between the means of Q and P (``kl_categorical``'s form) plus the Bregman
    divergence of the convex sum_i g(a_i) - g(a0) (convex because x psi'(x) decreases).

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
    return _dirichlet_kl(a, b)


def _dirichlet_kl(a: jax.Array, b: jax.Array) -> jax.Array:
    # The differences b - a are exact for close concentrations; their sum, not b0 - a0, gives delta0.
    delta = b - a
    a0, b0, delta0 = jnp.sum(a, axis=-1), jnp.sum(b, axis=-1), jnp.sum(delta, axis=-1)
    # D(mean_Q || mean_P) from the weights b and a, with the exact ratio log(a_i / b_i).
    means = b0 * kl_from_log_weights(jnp.log(b), jnp.log(a), a.ndim - 1, log_ratio(a, b))
    # sum_i B_g(a_i, b_i) - B_g(a0, b0) in one call.
    bregmans = _stirling_remainder_bregman(jnp.concatenate([a, a0[..., None]], axis=-1),
                                           jnp.concatenate([b, b0[..., None]], axis=-1),
                                           jnp.concatenate([delta, delta0[..., None]], axis=-1))
    remainder = jnp.sum(bregmans[..., :-1], axis=-1) - bregmans[..., -1]
    # The remainder is >= 0 (convexity); where the means term dominates, rounding could leave it at
    # -1 ulp of its parts, and 0 is closer to the truth then.
    return means + jnp.maximum(remainder, jnp.zeros_like(remainder))


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
    log_scale_ratio = log_ratio(scale_p, scale_q)
    scaled_distance = jnp.abs(loc_p - loc_q) / scale_p
    # -w + z e^w + e^(w - z) - 1 = phi(w - z) + z (e^w - 1)
    return exp_minus_one_minus(log_scale_ratio - scaled_distance) + scaled_distance * jnp.expm1(log_scale_ratio)


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
    return exp_minus_one_minus(log_ratio(rate_q, rate_p))
