"""The input contract, declared once: constraints that give both the eager error and the traced mask.

API.md's rule: eagerly (concrete inputs) a bad argument raises a ``ValueError``/``TypeError`` naming
it and what is wrong; under ``jax.jit`` value checks are impossible, so the result is NaN wherever a
value breaks its constraint (never a finite wrong number). Shape and dtype problems use static
information and raise at trace time as well.

A :class:`Constraint` is an elementwise test plus the text of the requirement. :func:`check` runs the
test on a concrete argument (raising) and returns the traced mask; :func:`nan_unless` applies the
masks. Distributions declare ``arg_constraints = {"loc": real, "scale": finite_positive}`` once per
class (as numpyro's ``arg_constraints``), and their constructor check and traced validity mask are
both derived from it.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


# --------------------------------------------------------------------------------------------------
# Concrete or traced; dtype, axis and shape checks (static: they raise at trace time too)
# --------------------------------------------------------------------------------------------------


def is_concrete(x) -> bool:
    """True when ``x`` has a value now (not a tracer inside jit/vmap/grad)."""
    return not isinstance(x, jax.core.Tracer)


def host_values(x, mask=None, fill=0.0) -> np.ndarray | None:
    """A concrete ``x`` as a NumPy array (floats NumPy cannot test, e.g. bfloat16, as float32); else None.

    Entries where the boolean ``mask`` is False (when given) are replaced by ``fill``; a traced mask
    makes the values unknowable, so it gives None as well.

    NumPy, not jnp: a concrete array closed over by a jitted function is concrete here, but jnp
    operations on it inside the trace would return tracers that cannot be tested with ``bool()``.
    Arrays spread over several processes are not readable here and count as not concrete.
    """
    if not is_concrete(x) or not getattr(x, "is_fully_addressable", True):
        return None
    if mask is not None and not is_concrete(mask):
        return None
    values = np.asarray(x)
    if values.dtype.kind == "V" or (values.dtype.kind == "f" and values.dtype not in (
            np.float16, np.float32, np.float64)):
        values = values.astype(np.float32)
    if mask is not None:
        values = np.where(np.asarray(mask), values, fill)
    return values


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


# --------------------------------------------------------------------------------------------------
# Python-value options (static: checked on every call, traced or not)
# --------------------------------------------------------------------------------------------------


def check_int(name: str, value, minimum: int) -> int:
    """``value`` as an int; ``TypeError`` if it is not an integer (bools excluded), ``ValueError`` if below."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return int(value)


def check_flag(name: str, value) -> bool:
    """A flag must be a bool: a string such as ``"no"`` would otherwise count as True."""
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{name}` must be a bool, got {type(value).__name__} {value!r}.")
    return bool(value)


# --------------------------------------------------------------------------------------------------
# Value constraints: eager error and traced mask from one declaration
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Constraint:
    """An elementwise requirement on an argument's values.

    Attributes:
      test: elementwise predicate, written with operators only so that it works on NumPy arrays (the
        eager check) and on jax arrays (the traced mask); NaN must fail it unless NaN is allowed.
      requirement: the requirement as text, e.g. ``"> 0"``, for ``"`scale` must be > 0"``.
      failure: optional message template with ``{name}``, ``{requirement}`` and ``{min}`` (the smallest
        entry); the default is "`{name}` must be {requirement}, got ...".
    """

    test: Callable
    requirement: str
    failure: str | None = None

    def __call__(self, x):
        return self.test(x)

    def message(self, name: str, values: np.ndarray) -> str:
        if self.failure is not None:
            minimum = np.nanmin(values) if values.size and not np.isnan(values).all() else np.nan
            return self.failure.format(name=name, requirement=self.requirement, min=minimum)
        got = values if values.size <= 8 else f"entries {values[~self.test(values)][:4]}"
        return f"`{name}` must be {self.requirement}, got {got}."


def _finite(x):
    return (x > -np.inf) & (x < np.inf)


not_nan = Constraint(lambda x: x == x, "not NaN", "`{name}` contains NaN.")
real = Constraint(_finite, "finite", "`{name}` contains NaN or inf; it must be finite.")
positive = Constraint(lambda x: x > 0, "> 0")
nonnegative = Constraint(lambda x: x >= 0, ">= 0")
finite_positive = Constraint(lambda x: (x > 0) & (x < np.inf), "finite and > 0")
#: A probability or a mass: finite and >= 0 (normalisation is a separate, per-slice matter).
probability_like = Constraint(lambda x: (x >= 0) & (x < np.inf), "finite and >= 0")


def at_least(bound) -> Constraint:
    """``x >= bound``."""
    return Constraint(lambda x: x >= bound, f">= {bound}")


def below(bound, why: str = "") -> Constraint:
    """``x < bound``; ``why`` (optional) says what breaks otherwise."""
    return Constraint(lambda x: x < bound, f"< {bound}" + (f" ({why})" if why else ""))


def check(name: str, x, constraint: Constraint) -> jax.Array:
    """Checks ``x`` against ``constraint``; returns the (possibly traced) mask of entries that meet it.

    Eagerly (``x`` concrete) a failing entry raises ``ValueError`` naming ``name`` and the requirement;
    under tracing nothing is raised and the mask is what :func:`nan_unless` turns into NaN.
    """
    values = host_values(x)
    if values is not None and not np.all(constraint.test(values)):
        raise ValueError(constraint.message(name, values))
    return constraint.test(jnp.asarray(x))


def check_eagerly(name: str, x, constraint: Constraint) -> None:
    """:func:`check` without building the traced mask (for callers that mask in their own way)."""
    values = host_values(x)
    if values is not None and not np.all(constraint.test(values)):
        raise ValueError(constraint.message(name, values))


def nan_unless(value: jax.Array, *masks: jax.Array, event_ndims: int = 0) -> jax.Array:
    """``value`` where every mask holds, NaN elsewhere (API.md: a bad traced value gives NaN).

    An integer ``value`` (a sample of counts or categories, a bin index) cannot be NaN: it gets -1,
    which kljax never returns as a valid integer result. ``event_ndims`` trailing axes of ``value``
    have no counterpart in the masks (e.g. a sample's event axis against a per-distribution mask).
    """
    masks = [mask for mask in masks if mask is not None]
    if not masks:
        return value
    # explicit broadcasting (the package runs with jax_numpy_rank_promotion="raise")
    masks = [jnp.broadcast_to(jnp.reshape(mask, mask.shape + (1,) * event_ndims), value.shape) for mask in masks]
    valid = functools.reduce(jnp.logical_and, masks)
    bad = jnp.nan if jnp.issubdtype(value.dtype, jnp.inexact) else -1
    return jnp.where(valid, value, jnp.asarray(bad, value.dtype))


def check_probabilities(name: str, x, axis: int, mask=None) -> None:
    """Eagerly: no NaN, no negative or infinite entry, and some mass in every slice (kept entries).

    The traced counterpart is :func:`probabilities_mask`.
    """
    values = host_values(x, mask, 0.0)
    if values is None:
        return
    if np.isnan(values).any():
        raise ValueError(f"`{name}` contains NaN.")
    if (values < 0).any():
        raise ValueError(f"`{name}` has negative entries (min {values.min()}); probabilities must be >= 0.")
    if np.isinf(values).any():
        raise ValueError(f"`{name}` has infinite entries; probabilities must be finite.")
    if not (values > 0).any(axis=axis).all():
        raise ValueError(
            f"`{name}` has a slice along axis {axis} with no probability mass "
            "(all entries zero or masked out)."
        )


def probabilities_mask(x: jax.Array, axis: int) -> jax.Array:
    """Per slice along ``axis``: every entry :data:`probability_like` (no NaN) and some mass."""
    return jnp.all(probability_like(x), axis=axis) & jnp.any(x > 0, axis=axis)


def check_logits(name: str, x, axis: int, mask=None, kind: str = "logits") -> None:
    """Eagerly: no NaN or ``+inf``, and at least one entry above ``-inf`` per slice (kept entries).

    Logits (or log-probabilities) of a categorical distribution along ``axis``; ``mask`` marks the
    entries that take part (the others are ignored).
    """
    values = host_values(x, mask, -np.inf)
    if values is None:
        return
    if np.isnan(values).any():
        raise ValueError(f"`{name}` contains NaN.")
    if (values == np.inf).any():
        raise ValueError(f"`{name}` contains +inf; {kind} must be finite or -inf.")
    if not (values > -np.inf).any(axis=axis).all():
        raise ValueError(
            f"`{name}` has a slice along axis {axis} whose entries are all -inf or masked out "
            "(no probability mass)."
        )
