"""Input checks shared by the estimators.

Eager (concrete) inputs get a clear ``ValueError``/``TypeError`` naming the argument. Under ``jax.jit``
value checks are impossible, so estimators instead return NaN for bad values (see API.md); shape and
dtype checks use static information and therefore raise at trace time as well.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def is_concrete(x) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def as_float_array(name: str, x) -> jax.Array:
    """Converts ``x`` to a floating JAX array; integer, boolean and complex inputs raise ``TypeError``."""
    dtype = getattr(x, "dtype", None)
    if dtype is None:
        x = np.asarray(x)
        dtype = x.dtype
        if np.issubdtype(dtype, np.floating):
            x = jnp.asarray(x, dtype=jnp.result_type(float))
    if not jnp.issubdtype(dtype, jnp.floating):
        raise TypeError(f"`{name}` must have a floating dtype (float32 or float64), got {dtype}.")
    return jnp.asarray(x)


def normalize_axis(name: str, x: jax.Array, axis: int) -> int:
    """Returns ``axis`` as a non-negative int, raising ``ValueError`` when it is out of range."""
    if not -x.ndim <= axis < x.ndim or x.ndim == 0:
        raise ValueError(f"`axis`={axis} is out of range for `{name}` of shape {x.shape}.")
    return axis % x.ndim


def check_same_shape(name_a: str, a: jax.Array, name_b: str, b: jax.Array) -> None:
    """Raises ``ValueError`` (at trace time too) when two arrays' shapes differ."""
    if a.shape != b.shape:
        raise ValueError(
            f"`{name_a}` and `{name_b}` must have the same shape, got {a.shape} and {b.shape}."
        )


def check_no_nan(name: str, x: jax.Array) -> None:
    """Eagerly raises ``ValueError`` when ``x`` contains NaN; a no-op under tracing."""
    # NumPy, not jnp: a concrete array closed over by a jitted function is concrete here, but jnp
    # operations on it inside the trace would return tracers.
    if is_concrete(x) and np.isnan(np.asarray(x)).any():
        raise ValueError(f"`{name}` contains NaN.")


def check_nonnegative(name: str, x: jax.Array) -> None:
    """Eagerly raises ``ValueError`` when ``x`` has NaN or negative entries; a no-op under tracing."""
    check_no_nan(name, x)
    if is_concrete(x) and (np.asarray(x) < 0).any():
        raise ValueError(
            f"`{name}` has negative entries (min {float(np.min(np.asarray(x)))}); probabilities must be >= 0."
        )
