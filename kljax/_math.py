"""Safe numerics shared by the estimators (private): one home per numerical kernel.

Three habits hold throughout:

* **Zero-safe in value and gradient.** A naive ``p * log(p)`` is ``0 * -inf = NaN`` at ``p = 0``, and
  so is its gradient even when the value is masked afterwards, because the masked-away branch still
  receives a zero cotangent that is multiplied by ``log(0)``. The cure is the "double-``where``":
  replace the offending input by a harmless value *before* the log, then select the result (JAX FAQ,
  "Gradients contain NaN where using where"; distrax ``utils/math.py``). Conventions follow SciPy's
  ``entr``/``rel_entr``: ``0 log 0 = 0``, ``0 log(0 / q) = 0``, and the derivative with respect to a
  zero probability is *defined* as 0 (zeros are outside the support).
* **No cancellation near P = Q.** A divergence is a sum of signed terms whose total is much smaller
  than the terms when P is close to Q; summed naively in float32 the total is rounding noise and can
  be negative. Every kernel here is written as a sum of non-negative terms, each accurate to a few
  ulps: ``phi(u) = e^u - 1 - u`` (:func:`exp_minus_one_minus`), ``log(a / b)`` for close ``a, b``
  (:func:`log_ratio`), and the centred form of :func:`kl_from_log_weights`.
* **Low precision accumulates in float32.** float16 and bfloat16 inputs are computed in float32
  (:func:`computation_dtype`) and the result is cast back, so that sums over 10^5 entries neither
  overflow (float16's largest value is 65504) nor drown in rounding.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

# Below this |u| the Taylor series of phi(u) = e^u - 1 - u is used (expm1(u) - u loses up to a
# factor 1 + 2/|u| to cancellation, 5 ulps at 0.5); 17 terms reach float64's precision there
# (truncation < 2 * 0.5^16 / 18! ~ 5e-21 relative).
_SERIES_RADIUS = 0.5
_SERIES_TERMS = 17


def computation_dtype(dtype) -> np.dtype:
    """The dtype to compute in for inputs of ``dtype``: float32 for 16-bit floats, else ``dtype``."""
    return jnp.promote_types(dtype, jnp.float32)


def xlogx(x: jax.Array) -> jax.Array:
    """``x * log(x)`` with ``0 log 0 = 0`` in value and gradient; NaN for negative or NaN ``x``.

    >>> import jax.numpy as jnp
    >>> print(xlogx(jnp.array([0.0, 1.0, 0.5])).round(4))
    [ 0.      0.     -0.3466]
    """
    positive = x > 0
    x_safe = jnp.where(positive, x, jnp.ones_like(x))
    value = jnp.where(positive, x_safe * jnp.log(x_safe), jnp.zeros_like(x))
    return jnp.where(x >= 0, value, jnp.full_like(x, jnp.nan))


def safe_log(x: jax.Array) -> jax.Array:
    """``log(x)`` with ``-inf`` at 0 and NaN for negative or NaN ``x``; the gradient at 0 is 0.

    >>> import jax.numpy as jnp
    >>> print(safe_log(jnp.array([0.0, 1.0, -1.0])))
    [-inf   0.  nan]
    """
    positive = x > 0
    value = jnp.log(jnp.where(positive, x, jnp.ones_like(x)))
    return jnp.where(positive, value, jnp.where(x == 0, jnp.full_like(x, -jnp.inf), jnp.full_like(x, jnp.nan)))


def exp_minus_one_minus(u: jax.Array) -> jax.Array:
    """``phi(u) = e^u - 1 - u >= 0`` to full relative precision, also near ``u = 0``.

    ``expm1(u) - u`` loses about ``log10(2 / |u|)`` digits to cancellation; for ``|u| < 0.5`` the
    Taylor series ``sum_{n>=2} u^n / n!`` is used instead. ``phi(-inf) = +inf``, ``phi(+inf) = +inf``.
    Every scale-only closed-form KL (Normal, Exponential, Poisson, ...) and the k3 estimator is this
    function of a log-ratio.

    >>> import jax.numpy as jnp
    >>> print(exp_minus_one_minus(jnp.array([1e-4, 1.0], jnp.float32)))
    [5.0001665e-09 7.1828175e-01]
    """
    small = jnp.abs(u) < _SERIES_RADIUS
    v = jnp.where(small, u, jnp.zeros_like(u))
    w = jnp.where(small | jnp.isinf(u), jnp.ones_like(u), u)
    large = jnp.expm1(w) - w
    return jnp.where(small, _phi_series(v), jnp.where(jnp.isinf(u), jnp.full_like(u, jnp.inf), large))


def log_ratio(a: jax.Array, b: jax.Array) -> jax.Array:
    """``log(a / b)`` for non-negative ``a`` and positive ``b``; via ``log1p((a - b) / b)`` when close.

    ``a - b`` is exact there (Sterbenz's lemma), so the result keeps full relative precision even in
    float32, where ``log(a) - log(b)`` would lose about three digits for ``a / b = 1.001``. ``a = 0``
    gives ``-inf``.

    >>> import jax.numpy as jnp
    >>> print(f"{float(log_ratio(jnp.float32(1.0001), jnp.float32(1.0))):.6e}")  # float32(1.0001) - 1
    1.000116e-04
    """
    close = jnp.abs(a - b) < 0.5 * b
    b_safe = jnp.where(close, b, jnp.ones_like(b))
    near = jnp.log1p((a - b) / b_safe)
    a_far = jnp.where(close, jnp.ones_like(a), a)
    b_far = jnp.where(close, jnp.ones_like(b), b)
    return jnp.where(close, near, safe_log(a_far) - jnp.log(b_far))


def _top(x: jax.Array, axis: int) -> jax.Array:
    """``max(x)`` along ``axis`` (kept), held constant, with the finite lowest value for an empty
    support, so that ``x - top`` stays ``-inf`` rather than NaN on an all ``-inf`` slice."""
    lowest = np.array(jnp.finfo(x.dtype).min, dtype=x.dtype)
    return jnp.expand_dims(lax.reduce(lax.stop_gradient(x), lowest, lax.max, (axis,)), axis)


def _phi_series(c: jax.Array) -> jax.Array:
    """``phi(c) = e^c - 1 - c`` by its Taylor series (Horner: ``c^2 (1/2! + c (1/3! + ...))``), for
    ``|c| < 0.5``, select-free; as many terms as the dtype needs (9 for 32 bits or fewer, 17 for
    float64: the first omitted term is below half an ulp of the sum)."""
    terms = 9 if jnp.finfo(c.dtype).bits <= 32 else _SERIES_TERMS
    series = jnp.full_like(c, 1 / math.factorial(terms + 1))
    for n in range(terms, 1, -1):
        series = c * series + 1 / math.factorial(n)
    return c * c * series


def _kl_full_support(log_weights_p, log_weights_q, log_ratios, axis):
    """The value of :func:`_kl_parts` for inputs finite everywhere (no zero probability on either
    side), in three passes over the inputs that XLA:CPU fuses into one kernel each.

    XLA:CPU fuses an elementwise chain into the reduction that consumes it only when nothing else
    consumes it and it has no compare or select; otherwise the chain is written to memory at full
    size and read back. So each sum recomputes its chain from the raw inputs (an optimisation
    barrier keeps common-subexpression elimination from merging the chains again), and the
    terms are select-free: with ``s = clip(c, -1/2, 1/2)`` and ``phi(s)`` from its series,

        phi(c) = phi(s) + e^s expm1(c - s) - (c - s),   e^s = 1 + s + phi(s),

    exact for ``|c| <= 1/2`` (the correction is 0) and without cancellation beyond. A term that
    overflows (a KL of dozens of nats, or a P weight underflowing to 0 against a huge ratio) makes
    the total non-finite, and the caller then takes the careful path.
    """
    default_ratios = log_ratios is None
    inputs = (log_weights_p, log_weights_q, log_ratios)

    def fused_sum(chain):
        nonlocal inputs
        a, b, r = inputs
        inputs = lax.optimization_barrier(inputs)  # the next chain reads a distinct copy
        # The maxima are recomputed inside each chain: a fused reduction costs no extra pass.
        top_a, top_b = _top(a, axis), _top(b, axis)
        d = (b - (top_b - top_a)) - a if default_ratios else r
        return jnp.sum(chain(jnp.exp(a - top_a), d), axis=axis, keepdims=True)

    total = fused_sum(lambda w, d: w)
    mean = fused_sum(lambda w, d: w * d) / total

    def terms(w, d):
        c = d - mean
        # clip(c, -r, r) as a product: XLA:CPU will not fuse a clamp into the reduction. Exact:
        # r is a power of two, so s = c for |c| <= r and s = +-r beyond.
        s = (c * _SERIES_RADIUS) / jnp.maximum(jnp.abs(c), _SERIES_RADIUS)
        phi_s = _phi_series(s)
        return w * (phi_s + (1 + s + phi_s) * jnp.expm1(c - s) - (c - s))

    return jnp.squeeze(jnp.log1p(fused_sum(terms) / total), axis)


def _kl_parts(log_weights_p, log_weights_q, log_ratios, axis, full_support=False):
    """Shared pieces of :func:`kl_from_log_weights` and its derivative (see there).

    ``full_support=True`` is the fast path for inputs known to be finite everywhere (no zero
    probability on either side): the same arithmetic without the masks, whose selects would split
    XLA:CPU's fused reductions and write full-size temporaries.
    """
    top_p, top_q = _top(log_weights_p, axis), _top(log_weights_q, axis)
    if log_ratios is None:
        # (b - s) - a with s = max b - max a: the first difference is exact where b is near s and
        # the second where b - s is near a (Sterbenz), so neither close logits nor logits offset
        # by a constant (softmax does not see it) lose digits; an error in s is a constant, which
        # the centring removes.
        offset = top_q - top_p
        log_ratios = (log_weights_q - offset) - log_weights_p
    else:
        offset = jnp.zeros_like(top_p)
    if full_support:
        def mask(condition, x, other=0):
            return x
        in_support = jnp.ones(log_weights_p.shape, bool)
    else:
        def mask(condition, x, other=0):
            return jnp.where(condition, x, other)
        in_support = log_weights_p > -jnp.inf
        q_zero = in_support & (log_ratios == -jnp.inf)
    supported = in_support if full_support else in_support & ~q_zero
    weights = jnp.exp(log_weights_p - top_p)  # 0 off P's support
    total = jnp.sum(weights, axis=axis, keepdims=True)
    q_weights = jnp.exp(log_weights_q - top_q)
    q_on = jnp.sum(mask(in_support, q_weights), axis=axis)
    q_off = jnp.zeros_like(q_on) if full_support else jnp.sum(mask(in_support, 0, q_weights), axis=axis)
    d = mask(supported, log_ratios)
    mean = jnp.sum(weights * d, axis=axis, keepdims=True) / total
    c = d - mean  # centred: E_P[c] = 0
    small = jnp.abs(c) < _SERIES_RADIUS
    # w phi(c): the series where c is small; e^(log w + c) - w (1 + c) elsewhere, with
    # log w + c = (log w_q - max log w_q) + (max log w_q - max log w_p - offset) - mean formed
    # from Q's weights: no overflow where w is tiny and c huge, and no rounding of a huge c.
    shift = top_q - top_p - offset - mean
    log_q = mask(supported, log_weights_q - top_q)
    terms = jnp.where(
        small,
        weights * _phi_series(jnp.where(small, c, jnp.zeros_like(c))),
        mask(in_support, jnp.exp(log_q + shift) - weights * (1 + c)),
    )
    excess = jnp.sum(terms, axis=axis) / jnp.squeeze(total, axis)
    # Q's mass off P's support enters as log(Q(all) / Q(support of P)), also a non-negative term.
    value = jnp.log1p(excess)
    if not full_support:
        value = value + jnp.log1p(q_off / jnp.where(q_on > 0, q_on, jnp.ones_like(q_on)))
    # A KL beyond log(finfo.max) (~88 nats in float32) overflows the sum above; there the textbook
    # form -E_P[log w_q - log w_p] + log Z_q - log Z_p has no cancellation to fear.
    log_z_q = jnp.squeeze(top_q, axis) + jnp.log(q_on + q_off)
    log_z_p = jnp.squeeze(top_p + jnp.log(total), axis)
    textbook = log_z_q - log_z_p - jnp.squeeze(mean + offset, axis)
    value = jnp.where(jnp.isfinite(excess), value, textbook)
    if not full_support:
        value = jnp.where(jnp.any(q_zero, axis=axis) | (q_on == 0), jnp.full_like(value, jnp.inf), value)
    # NaN or +inf in either input shows in its maximum; an empty slice in its sum (0 on one side).
    tops = jnp.squeeze(jnp.maximum(top_p, top_q), axis)
    invalid = jnp.isnan(tops) | (tops == jnp.inf) | (jnp.squeeze(total, axis) == 0) | (q_on + q_off == 0)
    value = jnp.where(invalid, jnp.full_like(value, jnp.nan), value)
    q_total = jnp.expand_dims(q_on + q_off, axis)
    return value, weights / total, q_weights / q_total, c, in_support


def _kl_value(log_weights_p, log_weights_q, log_ratios, axis):
    def fast(*args):
        return _kl_full_support(*args, axis)

    def careful(*args):
        return _kl_parts(*args, axis)[0]

    # One branch for the whole batch: the fast value unless it is not finite everywhere. A zero
    # probability on either side makes it NaN or inf (see the ratios), and so does an overflowing
    # term or invalid input.
    fast_value = fast(log_weights_p, log_weights_q, log_ratios)
    return lax.cond(jnp.all(jnp.isfinite(fast_value)), lambda *args: fast_value, careful,
                    log_weights_p, log_weights_q, log_ratios)


_kl_from_log_weights = jax.custom_jvp(_kl_value, nondiff_argnums=(3,))


@_kl_from_log_weights.defjvp
def _kl_from_log_weights_jvp(axis, primals, tangents):
    # With P = w_p / sum(w_p), Q = w_q / sum(w_q) and c the centred log-ratio, on P's support
    # Q_i = P_i e^(c_i - KL), and (softmax Jacobians):
    #   dKL/dlog w_p,i = -P_i c_i (0 off the support),   dKL/dlog w_q,i = Q_i - P_i.
    # ``log_ratios`` only sharpens the value (it equals log w_q - log w_p up to a constant), so its
    # tangent is not used.
    value, p, q, c, in_support = _kl_parts(*primals, axis)
    tangent_p, tangent_q = tangents[:2]
    finite_value = jnp.where(jnp.isfinite(value), value, jnp.zeros_like(value))
    c_safe = jnp.where(in_support, c, jnp.zeros_like(c))
    gap = c_safe - jnp.expand_dims(finite_value, axis)  # log(Q_i / P_i)
    near = jnp.abs(gap) < 1
    p_safe = jnp.where(in_support, p, jnp.ones_like(p))
    far = jnp.exp(jnp.log(p_safe) + jnp.where(near, 0, gap)) - p  # Q_i <= 1: cannot overflow
    q_minus_p = jnp.where(in_support, jnp.where(near, p * jnp.expm1(jnp.where(near, gap, 0)), far), q)
    terms = jnp.where(in_support, -tangent_p * p * c_safe, 0) + jnp.where(q_minus_p != 0, tangent_q * q_minus_p, 0)
    return value, jnp.sum(terms, axis=axis)


def kl_from_log_weights(log_weights_p: jax.Array, log_weights_q: jax.Array, axis: int,
                        log_ratios: jax.Array | None = None) -> jax.Array:
    """``D(P || Q)`` from unnormalised log-weights of P and Q, without cancellation.

    P and Q are ``exp(log_weights)`` normalised along ``axis`` (any shifts; ``-inf`` is a category
    outside the support). With ``d = log(w_q / w_p)`` on P's support and ``c = d - E_P[d]``,

        D(P || Q) = log E_P[e^c] + log(Q(all) / Q(supp P)) = log1p(E_P[phi(c)]) + log1p(Q_off / Q_on),

    with ``phi(c) = e^c - 1 - c``, because ``E_P[c] = 0``. Both parts sum non-negative terms, each
    accurate to a few ulps, so the result keeps full relative precision when P and Q are close
    (per-token KL of 1e-7 over a 32k vocabulary in float32), where ``sum p (log p - log q)`` returns
    rounding noise and can be negative.

    Conventions: q = 0 under p > 0 gives ``+inf``; entries outside P's support only count through
    Q's mass there. The derivative is the closed form of the softmax Jacobian (see the JVP rule),
    0 with respect to P's weights off its support. Callers check validity (NaN, ``+inf``, empty
    supports) and mask the result.

    Args:
        log_weights_p: unnormalised log-probabilities of P.
        log_weights_q: unnormalised log-probabilities of Q, same shape.
        axis: the event axis (a non-negative int).
        log_ratios: optional ``log(w_q / w_p)`` on P's support computed more accurately than the
            difference of the log-weights (e.g. ``log1p((q - p) / p)`` from probabilities); it
            must equal that difference up to rounding (first derivatives come from the log-weights
            alone).

    Returns:
        The divergence with ``axis`` removed, in the inputs' dtype.
    """
    if log_ratios is not None:
        # NaN off P's support sends the fast path to the careful one, which ignores it there (the
        # default ratios get the same from -inf - -inf or x - -inf).
        log_ratios = jnp.where(log_weights_p > -jnp.inf, log_ratios, jnp.nan)
    return _kl_from_log_weights(log_weights_p, log_weights_q, log_ratios, axis)
