"""Zero-safe numerics shared by the estimators (private).

The helpers keep the input dtype and are safe in value *and* gradient at the boundary of the
simplex. A naive ``p * log(p)`` is ``0 * -inf = NaN`` at ``p = 0``, and so is its gradient even when
the value is masked afterwards, because the masked-away branch still receives a zero cotangent
that is multiplied by ``log(0)``. In probability space the cure is the "double-``where``" trick:
replace the offending input by a harmless value *before* the log, then select the result (JAX FAQ,
"Gradients contain NaN where using where"; distrax ``utils/math.py``). In log space,
:func:`sum_rel_entr_from_logs` has a select-free fast path, because a select there would stop
XLA:CPU from fusing the reduction (see its docstring).

Conventions follow SciPy's ``scipy.special.entr``/``rel_entr``: ``0 log 0 = 0`` and
``0 log(0 / q) = 0``; the derivative at ``p = 0`` is *defined* as 0 (the one-sided derivative is
``-inf``; zeros are treated as outside the support, so moving mass onto them is not differentiated).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax


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


def xlogy(x: jax.Array, y: jax.Array) -> jax.Array:
    """``x * log(y)`` with value and gradient 0 where ``x = 0``; ``-inf`` where ``x > 0`` and ``y = 0``.

    NaN where ``x`` or ``y`` is negative or NaN. ``x`` and ``y`` must have the same shape.

    >>> import jax.numpy as jnp
    >>> print(xlogy(jnp.array([0.0, 0.5, 0.5]), jnp.array([0.0, 0.25, 0.0])).round(4))
    [ 0.     -0.6931    -inf]
    """
    positive = x > 0
    ones = jnp.ones_like(x)
    y_safe = jnp.where(positive, y, ones)
    value = jnp.where(positive, x * jnp.log(y_safe), jnp.zeros_like(x))
    valid = (x >= 0) & (y >= 0)
    return jnp.where(valid, value, jnp.full_like(value, jnp.nan))


def rel_entr(p: jax.Array, q: jax.Array) -> jax.Array:
    """Elementwise relative entropy ``p * (log p - log q)``, zero-safe, never a spurious NaN.

    Values: 0 where ``p = 0`` (whatever ``q >= 0`` is); ``+inf`` where ``p > 0`` and ``q = 0``; NaN
    where ``p`` or ``q`` is negative or NaN, so that invalid input cannot hide in a finite sum.
    Gradients: 0 with respect to both arguments where ``p = 0``. ``p`` and ``q`` must have the same
    shape (no implicit broadcasting).

    This is ``scipy.special.rel_entr`` except that invalid input gives NaN rather than ``+inf``.

    >>> import jax.numpy as jnp
    >>> print(rel_entr(jnp.array([0.0, 0.5, 0.5]), jnp.array([0.0, 0.25, 0.0])).round(4))
    [0.     0.3466    inf]
    """
    positive = p > 0
    ones = jnp.ones_like(p)
    p_safe = jnp.where(positive, p, ones)
    # q only matters where p > 0; elsewhere it is replaced so that log(q = 0) cannot poison the gradient.
    q_safe = jnp.where(positive, q, ones)
    value = jnp.where(positive, p_safe * (jnp.log(p_safe) - jnp.log(q_safe)), jnp.zeros_like(p))
    valid = (p >= 0) & (q >= 0)
    return jnp.where(valid, value, jnp.full_like(value, jnp.nan))


def rel_entr_from_logs(log_p: jax.Array, log_q: jax.Array) -> jax.Array:
    """Elementwise ``exp(log_p) * (log_p - log_q)`` from log-probabilities, zero-safe.

    ``log_p = -inf`` (a zero probability) gives 0 in value and gradient; ``log_q = -inf`` where
    ``log_p > -inf`` gives ``+inf`` (also when ``exp(log_p)`` underflows: the probability is not
    zero); NaN or ``+inf`` in either input gives NaN. ``log_p`` need not be normalised. For a sum
    over an axis prefer :func:`sum_rel_entr_from_logs`, which is fused.

    >>> import jax.numpy as jnp
    >>> print(rel_entr_from_logs(jnp.log(jnp.array([0.0, 0.5, 0.5])),
    ...                          jnp.log(jnp.array([0.5, 0.25, 0.0]))).round(4))
    [0.     0.3466    inf]
    """
    in_support = log_p > -jnp.inf
    q_positive = log_q > -jnp.inf
    zeros = jnp.zeros_like(log_p)
    # Double where: the difference is +-inf or NaN exactly where it is not used.
    log_ratio = jnp.where(in_support & q_positive, log_p - log_q, zeros)
    value = jnp.where(
        in_support,
        jnp.where(q_positive, jnp.exp(log_p) * log_ratio, jnp.full_like(log_p, jnp.inf)),
        zeros,
    )
    valid = (log_p < jnp.inf) & (log_q < jnp.inf)
    return jnp.where(valid, value, jnp.full_like(value, jnp.nan))


def sum_rel_entr_from_logs(x, y, axis: int, *, prepare=None) -> jax.Array:
    """``sum(rel_entr_from_logs(log_p, log_q), axis)`` with ``(log_p, log_q) = prepare(x, y)``, fused.

    ``prepare`` (default: identity) is a cheap elementwise map such as a max-shift of logits. It is
    applied inside both paths below rather than once up front, so that its full-size output is
    never written to memory.

    Fast path: XLA:CPU fuses a chain like ``x - max(x) -> exp -> * -> sum`` into one kernel, but a
    compare or select in it splits the kernel and writes a full-size intermediate to memory, and
    every extra elementwise op costs time in this compute-bound loop. So the fast path is pure
    arithmetic, ``exp(lp) * (max(lp, -big) - max(lq, floor))`` with ``floor = -inf`` where ``lp``
    is finite and ``-2 big`` where ``lp = -inf``: exact for finite inputs, 0 where ``lp = -inf``
    whatever ``lq`` is (also ``-inf``: a category both sides exclude), ``+inf`` where ``p > 0``
    faces ``q = 0``. Fallback: if any total is not finite (``q = 0`` under ``p > 0``, an
    underflowed ``p`` facing ``q = 0``, invalid input), all totals are recomputed with the
    select-based :func:`rel_entr_from_logs`, which defines the result. The fast path therefore
    only ever returns finite totals, where it is exact. Log-probabilities below
    ``-finfo.max / 32`` are outside the supported range.

    >>> import jax.numpy as jnp
    >>> log_p = jnp.log(jnp.array([[0.0, 0.5, 0.5], [0.0, 0.5, 0.5]]))
    >>> log_q = jnp.log(jnp.array([[0.0, 0.25, 0.75], [0.5, 0.5, 0.0]]))
    >>> print(sum_rel_entr_from_logs(log_p, log_q, axis=-1).round(4))
    [0.1438    inf]
    """
    if prepare is None:
        prepare = lambda x, y: (x, y)  # noqa: E731
    log_p, log_q = prepare(x, y)
    big = jnp.asarray(jnp.finfo(log_p.dtype).max / 16, log_p.dtype)
    log_p_clamped = jnp.maximum(log_p, -big)
    # (log_p_clamped + big) * 32 overflows to +inf for any ordinary log_p and is 0 for log_p = -inf.
    floor = lax.stop_gradient(-(log_p_clamped + big) * 32 - 2 * big)
    fast = jnp.sum(jnp.exp(log_p) * (log_p_clamped - jnp.maximum(log_q, floor)), axis=axis)

    def careful(x, y):
        return jnp.sum(rel_entr_from_logs(*prepare(x, y)), axis=axis)

    return lax.cond(jnp.all(jnp.isfinite(fast)), lambda x, y: fast, careful, x, y)
