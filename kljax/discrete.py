"""Exact divergences between categorical distributions.

All functions reduce over one event axis (``axis=-1`` by default) and batch over every other axis;
they work under ``jax.jit``, ``jax.vmap`` and ``jax.grad`` in float32 and float64, and the output
dtype follows the input. Results are in nats; ``base=2`` gives bits (any positive ``base != 1``).

Normalisation, decided once for the whole module:

* Probability inputs (``kl``, ``entropy``, ``cross_entropy``, ``jensen_shannon``, ``jeffreys``) are
  **normalised** along the event axis before use, as ``scipy.stats.entropy`` does. Counts, histograms
  and vectors that sum to 0.9999999 therefore give the divergence of the distributions they define,
  and the result is always a true divergence (>= 0).
* ``kl_logits`` takes unnormalised logits and normalises them with a softmax; ``kl_log`` takes
  log-probabilities and renormalises them the same way (it is ``kl_logits`` under the name that
  says what the inputs are).

Accuracy, decided once too: every divergence is computed as a sum of non-negative terms
(``kljax._math.kl_from_log_weights``: ``D = log1p(E_P[e^c - 1 - c])`` with ``c`` the P-centred
log-ratio), so it never comes out negative and keeps full relative precision when P and Q are
close, where the textbook ``sum p (log p - log q)`` returns rounding noise (per-token KL of 5e-7
over a 32k vocabulary in float32). float16 and bfloat16 inputs are computed in float32 and the
result is cast back; inputs are scaled by their maximum before any sum, so that nothing overflows.

Zeros follow information theory's conventions: ``0 log(0 / q) = 0`` in value and in gradient (the
derivative with respect to a zero probability is defined as 0; see ``kljax._math``), and ``p > 0``
where ``q = 0`` gives ``+inf``, never NaN.

Bad input: eagerly (concrete arrays) a ``TypeError``/``ValueError`` naming the argument; shape and
dtype problems raise at trace time under ``jax.jit`` as well; under ``jax.jit`` a value problem
(negative or NaN probability, NaN or ``+inf`` logit, a slice without mass) gives NaN.
"""

from __future__ import annotations

import functools
import math
import operator

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from kljax._math import computation_dtype, kl_from_log_weights, log_ratio, safe_log, xlogx
from kljax._contract import (as_float_array, check_eagerly, check_logits, check_probabilities, check_same_shape,
                             host_values, is_concrete, nan_unless, nonnegative, normalize_axis, not_nan,
                             probabilities_mask)

__all__ = [
    "kl",
    "kl_logits",
    "kl_log",
    "entropy",
    "cross_entropy",
    "jensen_shannon",
    "jeffreys",
    "histogram_kl",
]


# --------------------------------------------------------------------------------------------------
# Input handling
#
# Static checks (dtype, shape, axis, mask shape) run on every call, so they also raise at trace time
# under jit. Value checks run only on concrete input and on the host with NumPy: one transfer and no
# per-shape compilation of a dozen tiny reductions. The numerics run in jitted cores, so an eager call
# compiles one program per shape instead of dispatching op by op.


def _float_pair(name_a: str, a, name_b: str, b, axis) -> tuple[jax.Array, jax.Array, int]:
    """Two floating arrays of one common dtype and the same shape (checked statically), and the axis."""
    a = as_float_array(name_a, a)
    b = as_float_array(name_b, b)
    dtype = jnp.result_type(a.dtype, b.dtype)
    a, b = a.astype(dtype), b.astype(dtype)
    axis = _event_axis(name_a, a, axis)
    if a.ndim == b.ndim and a.shape != b.shape:
        batch_a = a.shape[:axis] + a.shape[axis + 1 :]
        batch_b = b.shape[:axis] + b.shape[axis + 1 :]
        if batch_a == batch_b:
            raise ValueError(
                f"`{name_a}` and `{name_b}` must have the same number of categories along axis {axis}, "
                f"got {a.shape[axis]} and {b.shape[axis]} (shapes {a.shape} and {b.shape})."
            )
    check_same_shape(name_a, a, name_b, b)
    return a, b, axis


def _event_axis(name: str, x: jax.Array, axis) -> int:
    try:
        axis = operator.index(axis)
    except TypeError:
        raise TypeError(f"`axis` must be an int, got {axis!r}.") from None
    return normalize_axis(name, x, axis)


def _log_base(base):
    """``log(base)`` as a Python float (or a traced scalar); 1.0 for nats."""
    if base is None:
        return 1.0
    if is_concrete(base):
        if np.ndim(base) != 0:
            raise ValueError(f"`base` must be a scalar, got shape {np.shape(base)}.")
        value = float(base)
        if not (value > 0 and value != 1 and np.isfinite(value)):
            raise ValueError(f"`base` must be a positive number other than 1, got {base!r}.")
        return math.log(value)
    # Traced: an invalid base (<= 0, 1, NaN, inf) gives NaN, never an infinite or negative scale.
    base = jnp.asarray(base)
    valid = (base > 0) & (base != 1) & jnp.isfinite(base)
    return jnp.where(valid, jnp.log(jnp.where(valid, base, 2.0)), jnp.nan)


def _mask(where, shape: tuple[int, ...]):
    """Validates a boolean mask that broadcasts to ``shape`` (NumPy rules); ``None`` passes through."""
    if where is None:
        return None
    if not hasattr(where, "dtype"):
        where = np.asarray(where)
    if where.dtype != bool:
        raise TypeError(f"`where` must be a boolean mask, got dtype {where.dtype}.")
    try:
        broadcast = np.broadcast_shapes(np.shape(where), shape)
    except ValueError:
        broadcast = None
    if broadcast != tuple(shape):
        raise ValueError(f"`where` of shape {np.shape(where)} does not broadcast to the input shape {shape}.")
    return where


def _masked(x: jax.Array, mask, fill: float) -> jax.Array:
    if mask is None:
        return x
    return jnp.where(jnp.broadcast_to(mask, x.shape), x, jnp.full_like(x, fill))


def _in_base(nats: jax.Array, log_base, dtype) -> jax.Array:
    """Divides by ``log(base)`` and casts to the output ``dtype`` (that of the inputs)."""
    return (nats / jnp.asarray(log_base).astype(nats.dtype)).astype(dtype)


def _upcast(*arrays):
    """The arrays in the computation dtype (float32 for 16-bit inputs; see ``kljax._math``)."""
    return tuple(x.astype(computation_dtype(x.dtype)) for x in arrays)


def _kl_of_probabilities(p: jax.Array, q: jax.Array, axis: int) -> jax.Array:
    """``D(P || Q)`` of the normalised non-negative weights ``p`` and ``q``, cancellation-free."""
    p_positive = p > 0
    # Double where: the ratio is only used on P's support, and must not poison the gradient off it.
    p_safe = jnp.where(p_positive, p, jnp.ones_like(p))
    log_ratios = jnp.where(p_positive, log_ratio(q, p_safe), 0)
    value = kl_from_log_weights(safe_log(p), safe_log(q), axis, log_ratios)
    value = value + _normalisation_gradient_at_zeros(p, q, value, axis)
    return nan_unless(value, probabilities_mask(p, axis), probabilities_mask(q, axis))


def _normalisation_gradient_at_zeros(p, q, value, axis):
    """0 in value; in gradient, the derivative through the normalisation at zero entries.

    Differentiating in log space gives nothing at ``p_i = 0``; but ``p_i`` also enters
    ``sum(p)``, and with the convention ``d(0 log 0) = 0`` the derivative there is
    ``-(KL + 1) / sum(p)`` (and ``1 / sum(q)`` at ``q_i = 0``), as for the textbook sum.
    """
    finite = jnp.isfinite(value)
    slope_p = -(jnp.where(finite, value, 0) + 1) / jnp.sum(p, axis=axis)
    slope_q = 1 / jnp.sum(q, axis=axis)
    slopes = lax.stop_gradient(jnp.where(finite, jnp.stack([slope_p, slope_q]), 0))
    at_zero_p = jnp.sum(jnp.where(p == 0, p, 0), axis=axis)
    at_zero_q = jnp.sum(jnp.where(q == 0, q, 0), axis=axis)
    return at_zero_p * slopes[0] + at_zero_q * slopes[1]


def _kl_of_logits(a: jax.Array, b: jax.Array, axis: int) -> jax.Array:
    """``D(softmax(a) || softmax(b))``, cancellation-free; ``-inf`` logits are zero probabilities."""
    # NaN, +inf or an all -inf slice on either side reaches the result as NaN through the
    # kernel's maxima and sums (see kl_from_log_weights): no full-size checks needed.
    return kl_from_log_weights(a, b, axis)


def _entropy_of_probabilities(p: jax.Array, axis: int) -> jax.Array:
    """``H(P)`` of the normalised weights ``p`` as ``log Z - sum w log w / Z`` with ``w = p / max p``.

    Scaling by the maximum avoids overflow of the sum (``[3e38, 3e38]``); both parts are
    non-negative, and ``log Z = log1p(Z - 1)`` with ``Z - 1`` summed without the largest weight, so
    a nearly deterministic P keeps its small entropy.
    """
    top = jnp.max(p, axis=axis, keepdims=True)
    # Divided by sqrt(top) twice: XLA:CPU divides by multiplying with the reciprocal, and 1 / 3e38
    # is a float32 subnormal, which it flushes to zero.
    root = jnp.sqrt(jnp.where(top > 0, top, jnp.ones_like(top)))
    w = (p / root) / root
    is_top = p == top
    z_minus_one = jnp.sum(jnp.where(is_top, 0, w), axis=axis) + (jnp.sum(is_top, axis=axis) - 1)
    value = jnp.log1p(z_minus_one) - jnp.sum(xlogx(jnp.where(is_top, 1, w)), axis=axis) / (1 + z_minus_one)
    return nan_unless(value, probabilities_mask(p, axis))


def _validated_probability_pair(p, q, axis, where):
    p, q, axis = _float_pair("p", p, "q", q, axis)
    mask = _mask(where, p.shape)
    check_probabilities("p", p, axis, mask)
    check_probabilities("q", q, axis, mask)
    return p, q, axis, mask


# --------------------------------------------------------------------------------------------------
# Divergences


def kl(p, q, *, axis: int = -1, where=None, base: float | None = None) -> jax.Array:
    """Kullback-Leibler divergence ``D(P || Q) = sum_i p_i log(p_i / q_i)`` between categoricals.

    ``p`` and ``q`` are normalised along ``axis`` first (so counts or unnormalised weights are fine),
    which matches ``scipy.stats.entropy(p, q)``.

    Args:
        p: probabilities (or non-negative weights) of P, float array, event axis ``axis``.
        q: probabilities (or non-negative weights) of Q, same shape as ``p``.
        axis: the event axis; every other axis is a batch axis.
        where: optional boolean mask broadcastable to ``p.shape``; entries where it is False are
            dropped entirely, and ``p`` and ``q`` are normalised over the kept entries only (the
            divergence between the two distributions conditioned on the kept categories).
        base: logarithm base of the result; ``None`` means nats, ``2`` bits.

    Returns:
        ``D(P || Q) >= 0`` with the event axis removed; ``+inf`` where ``p_i > 0`` and ``q_i = 0``.
        Dtype: the common dtype of ``p`` and ``q``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.discrete import kl
        >>> p = jnp.array([0.5, 0.5, 0.0])
        >>> q = jnp.array([0.25, 0.25, 0.5])
        >>> print(round(float(kl(p, q)), 4), round(float(kl(p, q, base=2)), 4))
        0.6931 1.0
        >>> print(kl(q, p))  # Q puts mass where P has none
        inf

    References:
        Kullback, S. and Leibler, R. A. (1951). On information and sufficiency. Ann. Math. Statist.
        22(1), 79-86. https://doi.org/10.1214/aoms/1177729694
        Cover, T. M. and Thomas, J. A. (2006). Elements of Information Theory, 2nd ed., Sec. 2.3.
    """
    log_base = _log_base(base)
    p, q, axis, mask = _validated_probability_pair(p, q, axis, where)
    return _kl_core(p, q, mask, log_base, axis=axis)


@functools.partial(jax.jit, static_argnames="axis")
def _kl_core(p, q, mask, log_base, *, axis):
    p_in, q_in = _upcast(_masked(p, mask, 0.0), _masked(q, mask, 0.0))
    return _in_base(_kl_of_probabilities(p_in, q_in, axis), log_base, p.dtype)


def kl_logits(logits_p, logits_q, *, axis: int = -1, where=None, base: float | None = None) -> jax.Array:
    """KL divergence ``D(softmax(logits_p) || softmax(logits_q))`` from unnormalised logits.

    Computed in log-softmax space, ``sum_i p_i (log p_i - log q_i)`` with every log-probability
    formed as ``(x_i - max x) - log sum_j exp(x_j - max x)``, so float32 logits of magnitude 1e4
    stay accurate. A ``-inf`` logit is a category with probability zero.

    Args:
        logits_p: logits of P (any real shift), float array, event axis ``axis``; entries may be
            ``-inf`` but not ``+inf`` or NaN.
        logits_q: logits of Q, same shape as ``logits_p``.
        axis: the event axis; every other axis is a batch axis.
        where: optional boolean mask broadcastable to the logits' shape. Entries where it is False
            are excluded from the softmax normalisation and from the sum, exactly as if both
            logits were ``-inf`` there (e.g. a padded or disallowed vocabulary).
        base: logarithm base of the result; ``None`` means nats, ``2`` bits.

    Returns:
        ``D(P || Q) >= 0`` with the event axis removed (``+inf`` where ``logits_q`` is ``-inf`` on a
        category that P supports), in the common dtype of the inputs.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.discrete import kl_logits
        >>> a = jnp.array([1e4, 1e4 - 1.0, -jnp.inf], dtype=jnp.float32)
        >>> b = jnp.array([0.0, 0.0, 0.0], dtype=jnp.float32)
        >>> print(round(float(kl_logits(a, b)), 4))
        0.5164

    References:
        Blanchard, P., Higham, D. J. and Higham, N. J. (2021). Accurately computing the log-sum-exp
        and softmax functions. IMA J. Numer. Anal. 41(4), 2311-2330.
        https://doi.org/10.1093/imanum/draa038
        Cover, T. M. and Thomas, J. A. (2006). Elements of Information Theory, 2nd ed., Sec. 2.3.
    """
    log_base = _log_base(base)
    a, b, axis = _float_pair("logits_p", logits_p, "logits_q", logits_q, axis)
    mask = _mask(where, a.shape)
    check_logits("logits_p", a, axis, mask)
    check_logits("logits_q", b, axis, mask)
    return _kl_logits_core(a, b, mask, log_base, axis=axis)


@functools.partial(jax.jit, static_argnames="axis")
def _kl_logits_core(a, b, mask, log_base, *, axis):
    a_in, b_in = _upcast(_masked(a, mask, -jnp.inf), _masked(b, mask, -jnp.inf))
    return _in_base(_kl_of_logits(a_in, b_in, axis), log_base, a.dtype)


def kl_log(log_p, log_q, *, axis: int = -1, where=None, base: float | None = None) -> jax.Array:
    """KL divergence ``sum_i exp(log_p_i) (log_p_i - log_q_i)`` from log-probabilities.

    For outputs that already are log-probabilities (``jax.nn.log_softmax``, a distribution's
    ``log_prob``). The inputs are renormalised on the way, exactly like :func:`kl_logits` (whose
    value this is): normalising costs nothing extra in the cancellation-free form, and it keeps the
    rounding in ``sum(exp(log_p))`` (about ``1e-7 sqrt(V)`` in float32 over V categories) from
    dominating a small KL, which the textbook sum cannot avoid.

    Args:
        log_p: log-probabilities of P, float array, event axis ``axis``; ``-inf`` allowed (zero
            probability), ``+inf`` and NaN are not.
        log_q: log-probabilities of Q, same shape as ``log_p``.
        axis: the event axis; every other axis is a batch axis.
        where: optional boolean mask broadcastable to ``log_p.shape``; entries where it is False
            are left out, as in :func:`kl_logits`.
        base: logarithm base of the result; ``None`` means nats, ``2`` bits.

    Returns:
        ``D(P || Q)`` with the event axis removed (``+inf`` where ``log_q = -inf`` on P's support),
        in the common dtype of the inputs.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.discrete import kl_log
        >>> log_p = jax.nn.log_softmax(jnp.array([2.0, 1.0, 0.0]))
        >>> log_q = jax.nn.log_softmax(jnp.array([0.0, 1.0, 2.0]))
        >>> print(round(float(kl_log(log_p, log_q)), 4))
        1.1504

    References:
        Cover, T. M. and Thomas, J. A. (2006). Elements of Information Theory, 2nd ed., Sec. 2.3.
    """
    log_base = _log_base(base)
    log_p, log_q, axis = _float_pair("log_p", log_p, "log_q", log_q, axis)
    mask = _mask(where, log_p.shape)
    check_logits("log_p", log_p, axis, mask, kind="log-probabilities")
    check_logits("log_q", log_q, axis, mask, kind="log-probabilities")
    return _kl_log_core(log_p, log_q, mask, log_base, axis=axis)


_kl_log_core = _kl_logits_core


def entropy(p, *, axis: int = -1, base: float | None = None) -> jax.Array:
    """Shannon entropy ``H(P) = -sum_i p_i log p_i`` of a categorical distribution.

    ``p`` is normalised along ``axis`` first, as in ``scipy.stats.entropy(p)``.

    Args:
        p: probabilities (or non-negative weights), float array, event axis ``axis``.
        axis: the event axis; every other axis is a batch axis.
        base: logarithm base of the result; ``None`` means nats, ``2`` bits.

    Returns:
        ``H(P) >= 0`` with the event axis removed, in the dtype of ``p``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.discrete import entropy
        >>> print(round(float(entropy(jnp.array([0.25, 0.25, 0.5, 0.0]), base=2)), 4))
        1.5

    References:
        Shannon, C. E. (1948). A mathematical theory of communication. Bell Syst. Tech. J. 27(3),
        379-423, Theorem 2. Cover, T. M. and Thomas, J. A. (2006). Elements of Information Theory,
        2nd ed., Sec. 2.1.
    """
    log_base = _log_base(base)
    p = as_float_array("p", p)
    axis = _event_axis("p", p, axis)
    check_probabilities("p", p, axis)
    return _entropy_core(p, log_base, axis=axis)


@functools.partial(jax.jit, static_argnames="axis")
def _entropy_core(p, log_base, *, axis):
    (p_in,) = _upcast(p)
    return _in_base(_entropy_of_probabilities(p_in, axis), log_base, p.dtype)


def cross_entropy(p, q, *, axis: int = -1, base: float | None = None) -> jax.Array:
    """Cross-entropy ``H(P, Q) = -sum_i p_i log q_i = H(P) + D(P || Q)``.

    Both inputs are normalised along ``axis`` first, like :func:`kl`.

    Args:
        p: probabilities (or non-negative weights) of P, float array, event axis ``axis``.
        q: probabilities (or non-negative weights) of Q, same shape as ``p``.
        axis: the event axis; every other axis is a batch axis.
        base: logarithm base of the result; ``None`` means nats, ``2`` bits.

    Returns:
        ``H(P, Q)`` with the event axis removed; ``+inf`` where ``p_i > 0`` and ``q_i = 0``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.discrete import cross_entropy
        >>> print(round(float(cross_entropy(jnp.array([0.5, 0.5]), jnp.array([0.25, 0.75]))), 4))
        0.8370

    References:
        Cover, T. M. and Thomas, J. A. (2006). Elements of Information Theory, 2nd ed., Sec. 2.3 and
        Sec. 5.4 (the wrong-code penalty: coding P with a code for Q costs H(P) + D(P || Q)).
    """
    log_base = _log_base(base)
    p, q, axis, _ = _validated_probability_pair(p, q, axis, None)
    return _cross_entropy_core(p, q, log_base, axis=axis)


@functools.partial(jax.jit, static_argnames="axis")
def _cross_entropy_core(p, q, log_base, *, axis):
    # H(P, Q) = H(P) + D(P || Q): two non-negative parts, each computed without cancellation.
    p_in, q_in = _upcast(p, q)
    value = _entropy_of_probabilities(p_in, axis) + _kl_of_probabilities(p_in, q_in, axis)
    return _in_base(value, log_base, p.dtype)


def jensen_shannon(p, q, *, axis: int = -1, base: float | None = None) -> jax.Array:
    """Jensen-Shannon divergence ``(D(P || M) + D(Q || M)) / 2`` with ``M = (P + Q) / 2``.

    Symmetric, finite (at most ``log 2``, i.e. 1 bit) and its square root is a metric. Inputs are
    normalised along ``axis`` first. ``scipy.spatial.distance.jensenshannon`` returns the square
    root of this value.

    Args:
        p: probabilities (or non-negative weights) of P, float array, event axis ``axis``.
        q: probabilities (or non-negative weights) of Q, same shape as ``p``.
        axis: the event axis; every other axis is a batch axis.
        base: logarithm base of the result; ``None`` means nats, ``2`` bits.

    Returns:
        ``JS(P, Q)`` in ``[0, log 2]`` with the event axis removed.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.discrete import jensen_shannon
        >>> print(round(float(jensen_shannon(jnp.array([1.0, 0.0]), jnp.array([0.0, 1.0]), base=2)), 4))
        1.0

    References:
        Lin, J. (1991). Divergence measures based on the Shannon entropy. IEEE Trans. Inf. Theory
        37(1), 145-151. https://doi.org/10.1109/18.61115
        Endres, D. M. and Schindelin, J. E. (2003). A new metric for probability distributions.
        IEEE Trans. Inf. Theory 49(7), 1858-1860.
    """
    log_base = _log_base(base)
    p, q, axis, _ = _validated_probability_pair(p, q, axis, None)
    return _jensen_shannon_core(p, q, log_base, axis=axis)


@functools.partial(jax.jit, static_argnames="axis")
def _jensen_shannon_core(p, q, log_base, *, axis):
    p_in, q_in = _upcast(p, q)
    return _in_base(_jensen_shannon_of_probabilities(p_in, q_in, axis), log_base, p.dtype)


def _log_half_one_plus_exp(u: jax.Array) -> jax.Array:
    """``log((1 + e^u) / 2)``: ``log1p(expm1(u) / 2)`` near 0 (no cancellation), softplus far out."""
    near = u < 1
    u_near = jnp.where(near, u, jnp.zeros_like(u))
    u_far = jnp.where(near, jnp.ones_like(u), u)
    return jnp.where(near, jnp.log1p(jnp.expm1(u_near) / 2), jax.nn.softplus(u_far) - math.log(2))


def _jensen_shannon_of_probabilities(p: jax.Array, q: jax.Array, axis: int) -> jax.Array:
    """``(D(P || M) + D(Q || M)) / 2`` with each KL from the cancellation-free kernel.

    With ``u = log(Q_i / P_i)`` for the normalised distributions, ``log(M / P) = log((1 + e^u) / 2)``
    and ``log(M / Q) = log((1 + e^-u) / 2)``; ``u = -inf`` (q = 0) gives ``log 1/2``.
    """
    both = (p > 0) & (q > 0)
    p_safe, q_safe = jnp.where(both, p, jnp.ones_like(p)), jnp.where(both, q, jnp.ones_like(q))
    log_sums = jnp.log(jnp.sum(p, axis=axis, keepdims=True)) - jnp.log(jnp.sum(q, axis=axis, keepdims=True))
    u = jnp.where(both, log_ratio(q_safe, p_safe) + log_sums, jnp.where(q > 0, jnp.inf, -jnp.inf))
    u_p = jnp.where(p > 0, u, jnp.zeros_like(u))  # where P is 0 the P-side term is unused
    u_q = jnp.where(q > 0, -u, jnp.zeros_like(u))
    # Normalised log-probabilities, so that the ratios below are log(M / P) exactly, no constant.
    log_p = safe_log(p) - jnp.log(jnp.sum(p, axis=axis, keepdims=True))
    log_q = safe_log(q) - jnp.log(jnp.sum(q, axis=axis, keepdims=True))
    log_m = jnp.logaddexp(log_p, log_q) - math.log(2)
    value = (kl_from_log_weights(log_p, log_m, axis, _log_half_one_plus_exp(u_p))
             + kl_from_log_weights(log_q, log_m, axis, _log_half_one_plus_exp(u_q))) / 2
    return nan_unless(value, probabilities_mask(p, axis), probabilities_mask(q, axis))


def jeffreys(p, q, *, axis: int = -1, base: float | None = None) -> jax.Array:
    """Jeffreys divergence ``J(P, Q) = D(P || Q) + D(Q || P) = sum_i (p_i - q_i) log(p_i / q_i)``.

    Symmetric; ``+inf`` unless P and Q have the same support. Inputs are normalised along ``axis``.

    Args:
        p: probabilities (or non-negative weights) of P, float array, event axis ``axis``.
        q: probabilities (or non-negative weights) of Q, same shape as ``p``.
        axis: the event axis; every other axis is a batch axis.
        base: logarithm base of the result; ``None`` means nats, ``2`` bits.

    Returns:
        ``J(P, Q) >= 0`` with the event axis removed.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.discrete import jeffreys
        >>> print(round(float(jeffreys(jnp.array([0.5, 0.5]), jnp.array([0.25, 0.75]))), 4))
        0.2747

    References:
        Jeffreys, H. (1946). An invariant form for the prior probability in estimation problems.
        Proc. R. Soc. Lond. A 186(1007), 453-461. https://doi.org/10.1098/rspa.1946.0056
        Kullback, S. and Leibler, R. A. (1951). On information and sufficiency. Ann. Math. Statist.
        22(1), 79-86 (the divergence J(1, 2)).
    """
    log_base = _log_base(base)
    p, q, axis, _ = _validated_probability_pair(p, q, axis, None)
    return _jeffreys_core(p, q, log_base, axis=axis)


@functools.partial(jax.jit, static_argnames="axis")
def _jeffreys_core(p, q, log_base, *, axis):
    p_in, q_in = _upcast(p, q)
    value = _kl_of_probabilities(p_in, q_in, axis) + _kl_of_probabilities(q_in, p_in, axis)
    return _in_base(value, log_base, p.dtype)


# --------------------------------------------------------------------------------------------------
# Binned samples


def _histogram_bins(x: jax.Array, y: jax.Array, bins, range):
    """Validated ``(edges, low, high, num_bins)``: edges given, or a range (``None``: pooled)."""
    if isinstance(bins, (bool, np.bool_)):
        raise TypeError(f"`bins` must be an int or a 1-D array of bin edges, got {bins!r}.")
    if not isinstance(bins, (int, np.integer)):
        try:
            edges = jnp.asarray(bins, dtype=x.dtype)
        except (TypeError, ValueError):
            raise TypeError(f"`bins` must be an int or a 1-D array of bin edges, got {bins!r}.") from None
        if edges.ndim != 1 or edges.shape[0] < 2:
            raise ValueError(f"`bins` as edges must be 1-D with at least 2 entries, got shape {edges.shape}.")
        if range is not None:
            raise ValueError("`range` must be None when `bins` gives the bin edges.")
        if is_concrete(edges) and not (np.diff(np.asarray(edges, dtype=np.float64)) > 0).all():
            raise ValueError("`bins` edges must be strictly increasing.")
        return edges, None, None, edges.shape[0] - 1
    bins = operator.index(bins)
    if bins < 1:
        raise ValueError(f"`bins` must be >= 1, got {bins}.")
    if range is None:
        for name, samples in (("x", x), ("y", y)):
            values = host_values(samples)
            if values is not None and np.isinf(values).any():
                raise ValueError(
                    f"`{name}` has infinite samples; pass `range` (the pooled range would be infinite)."
                )
        return None, None, None, bins
    if len(range) != 2:
        raise ValueError(f"`range` must be a pair (low, high), got {range!r}.")
    low, high = range
    if is_concrete(low) and is_concrete(high) and not (-np.inf < float(low) < float(high) < np.inf):
        raise ValueError(f"`range` must be finite with low < high, got {range!r}.")
    return None, low, high, bins


@functools.partial(jax.jit, static_argnames="num_bins")
def _histogram_kl_core(x, y, edges, low, high, pseudocount, log_base, *, num_bins):
    dtype = x.dtype
    if edges is None:
        if low is None:
            low = jnp.minimum(jnp.min(x), jnp.min(y))
            high = jnp.maximum(jnp.max(x), jnp.max(y))
            # numpy.histogram's convention for an empty interval: widen it by 1/2 on each side.
            half = jnp.asarray(0.5, dtype)
            empty = low == high
            low, high = jnp.where(empty, low - half, low), jnp.where(empty, high + half, high)
        low, high = jnp.asarray(low, dtype), jnp.asarray(high, dtype)
        edges = jnp.linspace(low, high, num_bins + 1, dtype=dtype)
        counts_x, counts_y = (_equal_width_counts(s, edges, low, high) for s in (x, y))
    else:
        counts_x, counts_y = (_edge_counts(s, edges) for s in (x, y))
    pseudocount = jnp.asarray(pseudocount, counts_x.dtype)
    value = _kl_core(counts_x + pseudocount, counts_y + pseudocount, None, log_base, axis=0).astype(dtype)
    # Under jit NaN samples, a negative pseudocount, an infinite or reversed range and edges that
    # do not increase cannot raise: make them visible as NaN instead of a finite number.
    valid = ~(jnp.any(jnp.isnan(x)) | jnp.any(jnp.isnan(y))) & (pseudocount >= 0)
    valid = valid & jnp.all(jnp.isfinite(edges)) & jnp.all(edges[1:] > edges[:-1])
    return jnp.where(valid, value, jnp.full_like(value, jnp.nan))


def _edge_counts(samples: jax.Array, edges: jax.Array) -> jax.Array:
    """Counts per bin ``[e_k, e_k+1)`` (last bin closed); samples outside go to the end bins."""
    num_bins = edges.shape[0] - 1
    index = jnp.searchsorted(edges, samples, side="right") - 1
    return _counts(index, num_bins, samples.dtype)


def _counts(index: jax.Array, num_bins: int, dtype) -> jax.Array:
    """Bin counts as floats, in float32 at least (float16 counts are inexact above 2048)."""
    return jnp.bincount(jnp.clip(index, 0, num_bins - 1), length=num_bins).astype(computation_dtype(dtype))


def _equal_width_counts(samples, edges, low, high):
    """Like :func:`_edge_counts` for equal-width edges, in O(n): the bin index is computed, then
    corrected by one against the edges where rounding put it off by one (numpy.histogram's method)."""
    num_bins = edges.shape[0] - 1
    index = jnp.floor((samples - low) * (num_bins / (high - low)))
    index = jnp.clip(jnp.nan_to_num(index), 0, num_bins - 1).astype(jnp.int32)
    index = index - (samples < edges[index]).astype(jnp.int32)
    index = index + ((samples >= edges[index + 1]) & (index < num_bins - 1)).astype(jnp.int32)
    return _counts(index, num_bins, samples.dtype)


def histogram_kl(
    x,
    y,
    *,
    bins=20,
    range: tuple[float, float] | None = None,
    pseudocount: float = 0.5,
    base: float | None = None,
) -> jax.Array:
    """KL divergence between the histograms of samples ``x ~ P`` and ``y ~ Q`` on shared bins.

    Both samples are binned on the same edges, ``pseudocount`` is added to every bin of both
    histograms, and the result is ``kl(counts_x + pseudocount, counts_y + pseudocount)``.

    Bins: with ``bins`` an int and ``range=None`` the edges span the pooled range
    ``[min(x, y), max(x, y)]``, because a KL needs both histograms on one common support and pooling
    guarantees that no sample of either set falls outside it. For drift monitoring, fix ``range``
    (or pass the edges as ``bins``) from the reference sample so that successive windows are scored
    on the same bins; samples outside a given range are counted in the first or last bin rather
    than dropped, since values beyond the reference range are exactly the drift one wants to see.

    Pseudocount: an empty bin of ``y`` under a non-empty bin of ``x`` would make the plug-in KL
    infinite. The default 0.5 is the Krichevsky-Trofimov (Jeffreys-prior) estimate of each bin
    probability, ``(n_k + 1/2) / (n + K/2)``; 1 gives Laplace's rule, 0 the raw frequencies.
    The plug-in estimate is biased (upwards by roughly ``(K - 1) / (2 m)`` nats for ``m`` samples of
    Q when P = Q; Paninski 2003), so compare values across windows of equal size and bin count.

    ``jax.jit`` works when ``bins`` is static (an int closed over or a concrete edge array) with or
    without ``range``; e.g. ``jax.jit(functools.partial(histogram_kl, bins=20))``.

    Args:
        x: 1-D float samples from P.
        y: 1-D float samples from Q (its length may differ from ``x``'s).
        bins: number of equal-width bins (int), or a 1-D increasing array of bin edges.
        range: ``(low, high)`` of the equal-width bins; ``None`` means the pooled sample range.
            Must be ``None`` when ``bins`` gives edges.
        pseudocount: non-negative count added to every bin of both histograms.
        base: logarithm base of the result; ``None`` means nats, ``2`` bits.

    Returns:
        The scalar plug-in estimate of ``D(P || Q)`` in the common dtype of ``x`` and ``y``.

    Example:
        >>> import numpy as np
        >>> from kljax.discrete import histogram_kl
        >>> rng = np.random.default_rng(0)
        >>> x, y = rng.normal(0.0, 1.0, 4000), rng.normal(1.0, 1.0, 4000)
        >>> print(round(float(histogram_kl(x, y, bins=30, range=(-5.0, 6.0))), 1))  # exact KL: 0.5
        0.5

    References:
        Krichevsky, R. and Trofimov, V. (1981). The performance of universal encoding. IEEE Trans.
        Inf. Theory 27(2), 199-207. https://doi.org/10.1109/TIT.1981.1056331
        Paninski, L. (2003). Estimation of entropy and mutual information. Neural Comput. 15(6),
        1191-1253, Sec. 4 (bias of plug-in estimators).
    """
    log_base = _log_base(base)
    x = as_float_array("x", x)
    y = as_float_array("y", y)
    dtype = jnp.result_type(x.dtype, y.dtype)
    x, y = x.astype(dtype), y.astype(dtype)
    for name, samples in (("x", x), ("y", y)):
        if samples.ndim != 1:
            raise ValueError(f"`{name}` must be a 1-D array of samples, got shape {samples.shape}.")
        if samples.shape[0] == 0:
            raise ValueError(f"`{name}` is empty.")
        check_eagerly(name, samples, not_nan)
    if np.ndim(pseudocount) != 0:
        raise ValueError(f"`pseudocount` must be a scalar, got shape {np.shape(pseudocount)}.")
    check_eagerly("pseudocount", pseudocount, nonnegative)
    edges, low, high, num_bins = _histogram_bins(x, y, bins, range)
    return _histogram_kl_core(x, y, edges, low, high, pseudocount, log_base, num_bins=num_bins)
