"""Lightweight pytree distributions: ``sample``, ``log_prob``, ``entropy``, ``mean``, ``variance``.

Each distribution is a JAX pytree whose leaves are its parameters, so it passes through ``jax.jit``,
``jax.vmap`` and ``jax.grad`` like an array would. Parameters broadcast against each other explicitly
(the package runs under ``jax_numpy_rank_promotion="raise"``); the broadcast shape, less the event
shape, is ``batch_shape``. ``sample(key, shape)`` returns ``shape + batch_shape + event_shape``.

Parameter conventions:

- All parameters of one distribution share one floating dtype: the JAX promotion of the inputs, with
  Python scalars weakly typed (``Normal(jnp.float32(0), 1.0)`` is float32). Integer inputs become the
  default float dtype. Every output that is not an integer sample has that dtype; ``log_prob`` casts
  its argument to it.
- Eagerly (concrete parameters) a NaN, an infinity or a non-positive scale/rate/concentration raises a
  ``ValueError`` naming the argument. Under ``jax.jit`` (or ``vmap``/``grad``) nothing is checked and
  bad parameters give NaN; an integer sample, which cannot be NaN, is -1 there instead (never a valid
  category, outcome or count). Both come from one declaration per class, ``arg_constraints`` (constraints
  from ``kljax._contract``, as numpyro's ``arg_constraints``); rules across parameters or elements
  (a Cholesky factor's positive diagonal) go in the ``_extra_valid`` hook.
- Continuous families sample by reparameterisation, so ``jax.grad`` flows through ``sample``: location
  scale transforms for Normal, the multivariate normals, Laplace and Exponential; implicit
  reparameterisation (Figurnov, Mohamed & Mnih 2018, "Implicit Reparameterization Gradients") through
  ``jax.random.gamma`` for Gamma, Beta and Dirichlet. Discrete families return ``int32`` samples.

The methods are jitted (an eager call compiles each method once per shape and dtype), so they accept
only pytree arguments: arrays, scalars, and distributions. A subclass that adds parameters must list
them in ``_parameter_names`` to survive flattening, and their domains in ``arg_constraints``.

Closed-form KL divergences between these distributions live in :mod:`kljax.analytic`.
"""

from __future__ import annotations

import functools
import math
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.linalg import solve_triangular
from jax.scipy.special import betaln, digamma, gammaln, xlog1py, xlogy

from kljax import _contract
from kljax._contract import finite_positive, is_concrete, not_nan, real

__all__ = [
    "Distribution",
    "Normal",
    "MultivariateNormalDiag",
    "MultivariateNormalTriL",
    "Categorical",
    "Bernoulli",
    "Beta",
    "Gamma",
    "Dirichlet",
    "Laplace",
    "Exponential",
    "Poisson",
]

_HALF_LOG_2PI = 0.5 * math.log(2.0 * math.pi)

# Poisson entropy: below this rate an exact sum over k < _POISSON_ENTROPY_TERMS, above it the
# asymptotic series. At rate 100 the sum's tail P(K >= 256) is below 1e-40 and the series' first
# neglected term is O(rate^-4) = O(1e-8).
_POISSON_ENTROPY_SWITCH = 100.0
_POISSON_ENTROPY_TERMS = 256


# --------------------------------------------------------------------------------------------------
# Parameter handling
# --------------------------------------------------------------------------------------------------


def _as_parameters(named: dict) -> list[jax.Array]:
    """Converts the named parameters to arrays of one common floating dtype.

    Python scalars stay weakly typed while the dtype is chosen, so they follow the arrays' dtype.
    """
    values = []
    for name, value in named.items():
        if not isinstance(value, (int, float)) and not hasattr(value, "dtype"):
            value = np.asarray(value)
        dtype = getattr(value, "dtype", None)
        if isinstance(value, bool) or (dtype is not None and (
                jnp.issubdtype(dtype, jnp.complexfloating) or jnp.issubdtype(dtype, jnp.bool_))):
            raise TypeError(
                f"`{name}` must be real-valued (a float or integer array), got {dtype or 'bool'}."
            )
        values.append(value)
    dtype = jnp.result_type(*values)
    if not jnp.issubdtype(dtype, jnp.floating):
        dtype = jnp.result_type(float)
    return [jnp.asarray(value, dtype=dtype) for value in values]


def _broadcast_batch(named: dict, event_ndims: Sequence[int]) -> list[jax.Array]:
    """Broadcasts the batch dimensions (all but the trailing ``event_ndims``) of the parameters."""
    arrays = list(named.values())
    for (name, array), ndims in zip(named.items(), event_ndims):
        if array.ndim < ndims:
            raise ValueError(f"`{name}` must have at least {ndims} dimension(s), got shape {array.shape}.")
    batch_shapes = [array.shape[: array.ndim - ndims] for array, ndims in zip(arrays, event_ndims)]
    try:
        batch_shape = jnp.broadcast_shapes(*batch_shapes)
    except ValueError:
        described = ", ".join(f"`{name}` {array.shape}" for name, array in named.items())
        raise ValueError(f"parameter batch shapes do not broadcast: {described}.") from None
    return [
        _broadcast_to(array, batch_shape + array.shape[array.ndim - ndims:])
        for array, ndims in zip(arrays, event_ndims)
    ]


def _broadcast_to(array: jax.Array, shape: tuple[int, ...]) -> jax.Array:
    """``jnp.broadcast_to`` that skips the (eagerly compiled) no-op when the shape already matches."""
    return array if array.shape == shape else jnp.broadcast_to(array, shape)


def _broadcast_arrays(*arrays: jax.Array) -> list[jax.Array]:
    """Constructor-time ``jnp.broadcast_arrays``, without an XLA compile when shapes already agree."""
    shape = jnp.broadcast_shapes(*(array.shape for array in arrays))
    return [_broadcast_to(array, shape) for array in arrays]


def _method(output_event_ndims=0, static_argnums=()):
    """Jits a method and turns its floating outputs to NaN where the parameters are invalid.

    Jitting means an eager call compiles the whole method once per shape and dtype instead of
    dispatching (and compiling) every primitive separately; inside an outer jit it is inlined. The
    NaN mask is how a bad parameter shows under jit, where ``__init__`` cannot check values (API.md:
    never a finite wrong number). ``output_event_ndims`` counts the output's trailing non-batch axes
    ("event" for the distribution's event rank).
    """

    def decorate(function):
        @functools.wraps(function)
        def masked(self, *args):
            core = self._event_ndims if output_event_ndims == "event" else output_event_ndims
            # An integer sample cannot be NaN: nan_unless marks it -1, never a valid category or count.
            return _contract.nan_unless(function(self, *args), self._valid(), event_ndims=core)

        return jax.jit(masked, static_argnums=static_argnums)

    return decorate


def _sample_shape(shape) -> tuple[int, ...]:
    if isinstance(shape, (int, np.integer)):
        return (int(shape),)
    return tuple(int(s) for s in shape)


def _lift_to_rank(x: jax.Array, core_ndims: int, batch_ndims: int) -> jax.Array:
    """Prepends unit axes so that ``x`` has ``batch_ndims`` batch axes (``jnp.vectorize`` needs it)."""
    missing = batch_ndims - (x.ndim - core_ndims)
    return jnp.reshape(x, (1,) * missing + x.shape) if missing > 0 else x


def _p_log_p(log_p: jax.Array) -> jax.Array:
    """p log p from log p, with 0 log 0 = 0 in value and gradient (log p = -inf gives 0)."""
    zero = jnp.isneginf(log_p)
    safe = jnp.where(zero, jnp.zeros_like(log_p), log_p)
    return jnp.where(zero, jnp.zeros_like(log_p), jnp.exp(safe) * safe)


# --------------------------------------------------------------------------------------------------
# Base class
# --------------------------------------------------------------------------------------------------


class Distribution:
    """Base class: a pytree whose leaves are the parameters named in ``_parameter_names``.

    Subclasses are registered as pytrees automatically. Unflattening (what ``jit``, ``vmap`` and
    ``grad`` do) bypasses ``__init__``, so no validation or broadcasting happens on traced leaves.
    A subclass that adds fields must list them in ``_parameter_names``.
    """

    _parameter_names: tuple[str, ...] = ()
    # The elementwise domain of each parameter, declared once: the constructor's eager check and the
    # traced validity mask (NaN outputs under jit) are both derived from it.
    arg_constraints: dict[str, _contract.Constraint] = {}
    # Trailing axes of a parameter that are not batch axes (its mask is reduced over them).
    _parameter_core_ndims: dict[str, int] = {}
    # Rank of one draw, and the number of trailing axes of the first parameter that are not batch axes.
    _event_ndims: int = 0
    _first_parameter_core_ndims: int = 0

    def __init_subclass__(cls, **kwargs):
        super().__init_subclass__(**kwargs)
        jax.tree_util.register_pytree_node_class(cls)

    def tree_flatten(self):
        return tuple(getattr(self, name) for name in self._parameter_names), None

    @classmethod
    def tree_unflatten(cls, aux_data, children):
        del aux_data
        instance = object.__new__(cls)
        for name, child in zip(cls._parameter_names, children):
            object.__setattr__(instance, name, child)
        return instance

    def _check_arguments(self, named: dict) -> None:
        """Eagerly checks concrete parameters against ``arg_constraints`` (``ValueError`` naming them)."""
        for name, value in named.items():
            if name in self.arg_constraints:
                _contract.check_eagerly(name, value, self.arg_constraints[name])

    def _valid(self) -> jax.Array | None:
        """Boolean array of shape ``batch_shape``: parameters inside the family's domain.

        Derived from ``arg_constraints`` (each parameter's mask reduced over its non-batch axes) and
        :meth:`_extra_valid`; ``None`` when nothing is declared, as invalid parameters then already
        propagate NaN by themselves.
        """
        masks = []
        for name, constraint in self.arg_constraints.items():
            value = getattr(self, name)
            core = self._parameter_core_ndims.get(name, 0)
            mask = constraint(value)
            masks.append(jnp.all(mask, axis=tuple(range(-core, 0))) if core else mask)
        extra = self._extra_valid()
        if extra is not None:
            masks.append(extra)
        return functools.reduce(jnp.logical_and, masks) if masks else None

    def _extra_valid(self) -> jax.Array | None:
        """Hook for cross-parameter or structural rules ``arg_constraints`` cannot state; shape ``batch_shape``."""
        return None

    @property
    def _first_parameter(self) -> jax.Array:
        return getattr(self, self._parameter_names[0])

    @property
    def dtype(self):
        """The parameters' (and the continuous samples') floating dtype."""
        return self._first_parameter.dtype

    @property
    def batch_shape(self) -> tuple[int, ...]:
        """Shape of the batch of independent distributions this object holds."""
        first = self._first_parameter
        return tuple(first.shape[: first.ndim - self._first_parameter_core_ndims])

    @property
    def event_shape(self) -> tuple[int, ...]:
        """Shape of one draw from one distribution of the batch."""
        first = self._first_parameter
        return tuple(first.shape[first.ndim - self._event_ndims:]) if self._event_ndims else ()

    def _full_shape(self, shape) -> tuple[int, ...]:
        return _sample_shape(shape) + self.batch_shape + self.event_shape

    def sample(self, key: jax.Array, shape=()) -> jax.Array:
        """Draws samples of shape ``shape + batch_shape + event_shape`` (``shape`` an int or a tuple)."""
        return self._sample(key, _sample_shape(shape))

    def _sample(self, key: jax.Array, shape: tuple[int, ...]) -> jax.Array:  # pragma: no cover - abstract
        raise NotImplementedError

    def log_prob(self, x) -> jax.Array:  # pragma: no cover - abstract
        """Log density (or mass) of ``x``, shape ``broadcast(x.shape[:-event_ndims], batch_shape)``."""
        raise NotImplementedError

    def entropy(self) -> jax.Array:  # pragma: no cover - abstract
        """Differential entropy (or Shannon entropy for discrete families) in nats, shape ``batch_shape``."""
        raise NotImplementedError

    def __repr__(self) -> str:
        fields = ", ".join(
            f"{name}={getattr(getattr(self, name), 'shape', '?')}" for name in self._parameter_names
        )
        return f"{type(self).__name__}({fields}, dtype={self.dtype})"


# --------------------------------------------------------------------------------------------------
# Gaussian families
# --------------------------------------------------------------------------------------------------


class Normal(Distribution):
    """Univariate normal N(loc, scale^2), elementwise over the broadcast of ``loc`` and ``scale``.

    Args:
      loc: mean; any shape.
      scale: standard deviation, > 0; broadcasts with ``loc``.

    Example:
      >>> import jax
      >>> d = Normal(0.0, 2.0)
      >>> print(round(float(d.log_prob(1.0)), 4), round(float(d.entropy()), 4))
      -1.7371 2.1121
      >>> d.sample(jax.random.key(0), (5,)).shape
      (5,)
    """

    _parameter_names = ("loc", "scale")
    arg_constraints = {"loc": real, "scale": finite_positive}

    def __init__(self, loc, scale):
        loc, scale = _as_parameters({"loc": loc, "scale": scale})
        self._check_arguments({"loc": loc, "scale": scale})
        self.loc, self.scale = _broadcast_arrays(loc, scale)

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        shape = self._full_shape(shape)
        noise = jax.random.normal(key, shape, self.dtype)
        return jnp.broadcast_to(self.loc, shape) + jnp.broadcast_to(self.scale, shape) * noise

    @_method()
    def log_prob(self, x):
        x, loc, scale = jnp.broadcast_arrays(jnp.asarray(x, self.dtype), self.loc, self.scale)
        z = (x - loc) / scale
        return -0.5 * jnp.square(z) - jnp.log(scale) - _HALF_LOG_2PI

    @_method()
    def entropy(self):
        # 0.5 log(2 pi e scale^2)
        return jnp.log(self.scale) + (0.5 + _HALF_LOG_2PI)

    @_method("event")
    def mean(self):
        return self.loc

    @_method("event")
    def variance(self):
        return jnp.square(self.scale)


class MultivariateNormalDiag(Distribution):
    """Multivariate normal N(loc, diag(scale_diag)^2) with event shape ``(d,)``.

    Args:
      loc: mean, shape ``batch + (d,)``.
      scale_diag: per-coordinate standard deviations, > 0, shape broadcasting with ``loc``.

    Example:
      >>> import jax.numpy as jnp
      >>> d = MultivariateNormalDiag(jnp.zeros(3), jnp.array([1.0, 2.0, 0.5]))
      >>> d.batch_shape, d.event_shape
      ((), (3,))
      >>> print(round(float(d.log_prob(jnp.ones(3))), 4))
      -5.3818
    """

    _parameter_names = ("loc", "scale_diag")
    arg_constraints = {"loc": real, "scale_diag": finite_positive}
    _parameter_core_ndims = {"loc": 1, "scale_diag": 1}
    _event_ndims = 1
    _first_parameter_core_ndims = 1

    def __init__(self, loc, scale_diag):
        loc, scale_diag = _as_parameters({"loc": loc, "scale_diag": scale_diag})
        self._check_arguments({"loc": loc, "scale_diag": scale_diag})
        if loc.ndim < 1 or scale_diag.ndim < 1:
            raise ValueError(
                f"`loc` and `scale_diag` need an event axis, got shapes {loc.shape} and {scale_diag.shape}."
            )
        try:
            self.loc, self.scale_diag = _broadcast_arrays(loc, scale_diag)
        except ValueError:
            raise ValueError(
                f"`loc` {loc.shape} and `scale_diag` {scale_diag.shape} do not broadcast."
            ) from None

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        shape = self._full_shape(shape)
        noise = jax.random.normal(key, shape, self.dtype)
        return jnp.broadcast_to(self.loc, shape) + jnp.broadcast_to(self.scale_diag, shape) * noise

    @_method()
    def log_prob(self, x):
        x, loc, scale = jnp.broadcast_arrays(jnp.asarray(x, self.dtype), self.loc, self.scale_diag)
        z = (x - loc) / scale
        return jnp.sum(-0.5 * jnp.square(z) - jnp.log(scale) - _HALF_LOG_2PI, axis=-1)

    @_method()
    def entropy(self):
        return jnp.sum(jnp.log(self.scale_diag) + (0.5 + _HALF_LOG_2PI), axis=-1)

    @_method("event")
    def mean(self):
        return self.loc

    @_method("event")
    def variance(self):
        return jnp.square(self.scale_diag)

    @_method(2)
    def covariance(self):
        return jnp.vectorize(jnp.diag, signature="(d)->(d,d)")(jnp.square(self.scale_diag))

    @property
    def scale_tril(self) -> jax.Array:
        """The diagonal scale as a (diagonal) lower-triangular matrix."""
        return jnp.vectorize(jnp.diag, signature="(d)->(d,d)")(self.scale_diag)


class MultivariateNormalTriL(Distribution):
    """Multivariate normal N(loc, L L^T) with L = ``scale_tril`` lower triangular, event shape ``(d,)``.

    Only the lower triangle of ``scale_tril`` is used; its diagonal must be positive (so L is the
    Cholesky factor of the covariance).

    Args:
      loc: mean, shape ``batch + (d,)``.
      scale_tril: shape ``batch' + (d, d)``; ``batch`` and ``batch'`` broadcast.

    Example:
      >>> import jax.numpy as jnp
      >>> d = MultivariateNormalTriL(jnp.zeros(2), jnp.array([[1.0, 0.0], [0.5, 2.0]]))
      >>> print(d.covariance())
      [[1.   0.5 ]
       [0.5  4.25]]
      >>> print(round(float(d.entropy()), 4))
      3.5310
    """

    _parameter_names = ("loc", "scale_tril")
    arg_constraints = {"loc": real, "scale_tril": real}
    _parameter_core_ndims = {"loc": 1, "scale_tril": 2}
    _event_ndims = 1
    _first_parameter_core_ndims = 1

    def __init__(self, loc, scale_tril):
        loc, scale_tril = _as_parameters({"loc": loc, "scale_tril": scale_tril})
        if loc.ndim < 1 or scale_tril.ndim < 2 or scale_tril.shape[-1] != scale_tril.shape[-2]:
            raise ValueError(
                "`loc` must have shape batch + (d,) and `scale_tril` batch + (d, d), got "
                f"{loc.shape} and {scale_tril.shape}."
            )
        if loc.shape[-1] != scale_tril.shape[-1]:
            raise ValueError(
                f"`loc` has event size {loc.shape[-1]} but `scale_tril` is "
                f"{scale_tril.shape[-2]}x{scale_tril.shape[-1]} (shapes {loc.shape} and {scale_tril.shape})."
            )
        scale_tril = jnp.tril(scale_tril)
        self._check_arguments({"loc": loc, "scale_tril": scale_tril})
        _contract.check_eagerly("diagonal of scale_tril", _diagonal(scale_tril), finite_positive)
        self.loc, self.scale_tril = _broadcast_batch({"loc": loc, "scale_tril": scale_tril}, (1, 2))

    def _extra_valid(self):
        # L is a Cholesky factor: its diagonal must be positive (a cross-element rule).
        return jnp.all(finite_positive(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1)), axis=-1)

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        sample_shape = _sample_shape(shape)
        batch, d = self.batch_shape, self.loc.shape[-1]
        count = math.prod(sample_shape)
        # Draw the sample axis last so that one batched matmul L @ noise does all draws.
        noise = jax.random.normal(key, batch + (d, count), self.dtype)
        draws = jnp.matmul(self.scale_tril, noise)  # batch + (d, count)
        draws = jnp.moveaxis(draws, -1, 0).reshape(sample_shape + batch + (d,))
        return draws + jnp.broadcast_to(self.loc, draws.shape)

    @_method()
    def log_prob(self, x):
        x = jnp.asarray(x, self.dtype)
        batch_ndims = max(x.ndim - 1, self.loc.ndim - 1)
        return jnp.vectorize(_mvn_tril_log_prob, signature="(d),(d),(d,d)->()")(
            _lift_to_rank(x, 1, batch_ndims),
            _lift_to_rank(self.loc, 1, batch_ndims),
            _lift_to_rank(self.scale_tril, 2, batch_ndims),
        )

    @_method()
    def entropy(self):
        d = self.loc.shape[-1]
        log_det = jnp.sum(jnp.log(jnp.diagonal(self.scale_tril, axis1=-2, axis2=-1)), axis=-1)
        return log_det + d * (0.5 + _HALF_LOG_2PI)

    @_method("event")
    def mean(self):
        return self.loc

    @_method("event")
    def variance(self):
        # diag(L L^T)_i = sum_j L_ij^2
        return jnp.sum(jnp.square(self.scale_tril), axis=-1)

    @_method(2)
    def covariance(self):
        return jnp.matmul(self.scale_tril, jnp.swapaxes(self.scale_tril, -1, -2))


def _diagonal(matrix):
    """The diagonal of a concrete matrix on the host (no XLA compile), or of a traced one."""
    if is_concrete(matrix):
        return np.diagonal(np.asarray(matrix), axis1=-2, axis2=-1)
    return jnp.diagonal(matrix, axis1=-2, axis2=-1)


def _mvn_tril_log_prob(x, loc, scale_tril):
    z = solve_triangular(scale_tril, x - loc, lower=True)
    log_det = jnp.sum(jnp.log(jnp.diagonal(scale_tril)))
    return -0.5 * jnp.sum(jnp.square(z)) - log_det - x.shape[-1] * _HALF_LOG_2PI


# --------------------------------------------------------------------------------------------------
# Discrete families
# --------------------------------------------------------------------------------------------------


class Categorical(Distribution):
    """Categorical distribution over ``{0, ..., k-1}`` from unnormalised ``logits`` of shape ``batch + (k,)``.

    A logit of ``-inf`` gives a category of probability zero: never sampled, ``log_prob`` of it is
    ``-inf``, and it adds 0 (not NaN) to the entropy.

    Args:
      logits: shape ``batch + (k,)``; finite or ``-inf``, at least one finite per distribution.

    Example:
      >>> import jax.numpy as jnp
      >>> d = Categorical(jnp.log(jnp.array([0.5, 0.25, 0.25])))
      >>> print(round(float(d.log_prob(1)), 4), round(float(d.entropy()), 4))
      -1.3863 1.0397
    """

    _parameter_names = ("logits",)
    _first_parameter_core_ndims = 1

    def __init__(self, logits):
        (logits,) = _as_parameters({"logits": logits})
        if logits.ndim < 1:
            raise ValueError(f"`logits` needs a category axis, got shape {logits.shape}.")
        _contract.check_logits("logits", logits, axis=-1)
        self.logits = logits

    def _extra_valid(self):
        # check_logits' rule, traced: no NaN or +inf, and some category with probability > 0
        return (jnp.all((self.logits == self.logits) & (self.logits < jnp.inf), axis=-1)
                & jnp.any(self.logits > -jnp.inf, axis=-1))

    @property
    def num_categories(self) -> int:
        return self.logits.shape[-1]

    @property
    def log_probs(self) -> jax.Array:
        """Normalised log-probabilities, shape ``batch + (k,)``."""
        return jax.nn.log_softmax(self.logits, axis=-1)

    @property
    def probs(self) -> jax.Array:
        return jax.nn.softmax(self.logits, axis=-1)

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        shape = _sample_shape(shape) + self.batch_shape
        return jax.random.categorical(key, self.logits, axis=-1, shape=shape).astype(jnp.int32)

    @_method()
    def log_prob(self, x):
        x = jnp.asarray(x)
        k = self.num_categories
        index = x.astype(jnp.int32)
        valid = (index == x) & (index >= 0) & (index < k)
        index = jnp.clip(index, 0, k - 1)
        shape = jnp.broadcast_shapes(index.shape, self.batch_shape)
        log_probs = jnp.broadcast_to(self.log_probs, shape + (k,))
        index = jnp.broadcast_to(index, shape)
        valid = jnp.broadcast_to(valid, shape)
        values = jnp.take_along_axis(log_probs, index[..., None], axis=-1)[..., 0]
        return jnp.where(valid, values, -jnp.inf)

    @_method()
    def entropy(self):
        return -jnp.sum(_p_log_p(self.log_probs), axis=-1)


class Bernoulli(Distribution):
    """Bernoulli distribution on ``{0, 1}`` with P(1) = sigmoid(``logits``), elementwise.

    ``logits`` of ``+inf``/``-inf`` are allowed (certain 1/0); all terms use ``log_sigmoid`` so that
    large logits stay accurate.

    Args:
      logits: log-odds of a 1; any shape.

    Example:
      >>> d = Bernoulli(0.0)
      >>> print(round(float(d.log_prob(1)), 4), round(float(d.entropy()), 4))
      -0.6931 0.6931
    """

    _parameter_names = ("logits",)
    # +-inf are certain outcomes; NaN would propagate anyway, so it is only refused eagerly.
    arg_constraints = {"logits": not_nan}

    def __init__(self, logits):
        (logits,) = _as_parameters({"logits": logits})
        self._check_arguments({"logits": logits})
        self.logits = logits

    @property
    def probs(self) -> jax.Array:
        return jax.nn.sigmoid(self.logits)

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        shape = self._full_shape(shape)
        uniform = jax.random.uniform(key, shape, self.dtype)
        return (uniform < jnp.broadcast_to(self.probs, shape)).astype(jnp.int32)

    @_method()
    def log_prob(self, x):
        x, logits = jnp.broadcast_arrays(jnp.asarray(x, self.dtype), self.logits)
        log_one, log_zero = jax.nn.log_sigmoid(logits), jax.nn.log_sigmoid(-logits)
        return jnp.where(x == 1, log_one, jnp.where(x == 0, log_zero, -jnp.inf))

    @_method()
    def entropy(self):
        return -(_p_log_p(jax.nn.log_sigmoid(self.logits)) + _p_log_p(jax.nn.log_sigmoid(-self.logits)))

    @_method("event")
    def mean(self):
        return self.probs

    @_method("event")
    def variance(self):
        return self.probs * jax.nn.sigmoid(-self.logits)


class Poisson(Distribution):
    """Poisson distribution with mean ``rate``, elementwise.

    The entropy has no closed form: it is an exact sum over k < 256 for rate < 100 and the asymptotic
    series 0.5 log(2 pi e rate) - 1/(12 rate) - 1/(24 rate^2) - 19/(360 rate^3) above (Evans & Boersma
    1988, "The entropy of a Poisson distribution", SIAM Review 30(2)).

    Args:
      rate: mean, > 0; any shape.

    Example:
      >>> d = Poisson(3.0)
      >>> print(round(float(d.log_prob(2)), 4), round(float(d.entropy()), 4))
      -1.4959 1.9315
    """

    _parameter_names = ("rate",)
    arg_constraints = {"rate": finite_positive}

    def __init__(self, rate):
        (rate,) = _as_parameters({"rate": rate})
        self._check_arguments({"rate": rate})
        self.rate = rate

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        shape = self._full_shape(shape)
        return jax.random.poisson(key, jnp.broadcast_to(self.rate, shape), shape, dtype=jnp.int32)

    @_method()
    def log_prob(self, x):
        x = jnp.asarray(x)
        valid = (x >= 0) & (jnp.floor(x) == x)
        x, rate, valid = jnp.broadcast_arrays(jnp.asarray(x, self.dtype), self.rate, valid)
        safe_x = jnp.where(valid, x, jnp.zeros_like(x))
        values = xlogy(safe_x, rate) - rate - gammaln(safe_x + 1)
        return jnp.where(valid, values, -jnp.inf)

    @_method()
    def entropy(self):
        rate = self.rate
        large = rate >= _POISSON_ENTROPY_SWITCH
        # Exact: -sum_k p_k log p_k over k < 256 (rates below the switch).
        small_rate = jnp.where(large, jnp.ones_like(rate), rate)
        k = jnp.arange(_POISSON_ENTROPY_TERMS, dtype=rate.dtype)
        k, small = jnp.broadcast_arrays(k, small_rate[..., None])
        log_pmf = xlogy(k, small) - small - gammaln(k + 1)
        exact = -jnp.sum(_p_log_p(log_pmf), axis=-1)
        # Asymptotic series (Evans & Boersma 1988) for large rates.
        big = jnp.where(large, rate, jnp.full_like(rate, _POISSON_ENTROPY_SWITCH))
        inverse = 1 / big
        series = (0.5 * jnp.log(2 * math.pi * math.e * big)
                  - inverse * (1 / 12 + inverse * (1 / 24 + inverse * (19 / 360))))
        return jnp.where(large, series, exact)

    @_method("event")
    def mean(self):
        return self.rate

    @_method("event")
    def variance(self):
        return self.rate


# --------------------------------------------------------------------------------------------------
# Gamma-based families
# --------------------------------------------------------------------------------------------------


class Gamma(Distribution):
    """Gamma distribution with shape k and rate b: density b^k x^(k-1) e^(-b x) / Gamma(k) on x >= 0.

    Args:
      concentration: shape k > 0.
      rate: inverse scale b > 0; broadcasts with ``concentration``.

    Example:
      >>> d = Gamma(2.0, 3.0)
      >>> print(round(float(d.mean()), 4), round(float(d.log_prob(0.5)), 4), round(float(d.entropy()), 4))
      0.6667 0.0041 0.4786
    """

    _parameter_names = ("concentration", "rate")
    arg_constraints = {"concentration": finite_positive, "rate": finite_positive}

    def __init__(self, concentration, rate):
        concentration, rate = _as_parameters({"concentration": concentration, "rate": rate})
        self._check_arguments({"concentration": concentration, "rate": rate})
        self.concentration, self.rate = _broadcast_arrays(concentration, rate)

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        shape = self._full_shape(shape)
        standard = jax.random.gamma(key, jnp.broadcast_to(self.concentration, shape), shape, self.dtype)
        return standard / jnp.broadcast_to(self.rate, shape)

    @_method()
    def log_prob(self, x):
        x, k, rate = jnp.broadcast_arrays(jnp.asarray(x, self.dtype), self.concentration, self.rate)
        inside = x >= 0
        safe_x = jnp.where(inside, x, jnp.ones_like(x))
        values = xlogy(k, rate) + xlogy(k - 1, safe_x) - rate * safe_x - gammaln(k)
        return jnp.where(inside, values, -jnp.inf)

    @_method()
    def entropy(self):
        k = self.concentration
        # k - log b + log Gamma(k) + (1 - k) psi(k)
        return k - jnp.log(self.rate) + gammaln(k) + (1 - k) * digamma(k)

    @_method("event")
    def mean(self):
        return self.concentration / self.rate

    @_method("event")
    def variance(self):
        return self.concentration / jnp.square(self.rate)


class Beta(Distribution):
    """Beta distribution on [0, 1]: density x^(alpha-1) (1-x)^(beta-1) / B(alpha, beta).

    Args:
      alpha: first concentration, > 0.
      beta: second concentration, > 0; broadcasts with ``alpha``.

    Example:
      >>> d = Beta(2.0, 3.0)
      >>> print(round(float(d.mean()), 4), round(float(d.log_prob(0.5)), 4), round(float(d.entropy()), 4))
      0.4 0.4055 -0.2349
    """

    _parameter_names = ("alpha", "beta")
    arg_constraints = {"alpha": finite_positive, "beta": finite_positive}

    def __init__(self, alpha, beta):
        alpha, beta = _as_parameters({"alpha": alpha, "beta": beta})
        self._check_arguments({"alpha": alpha, "beta": beta})
        self.alpha, self.beta = _broadcast_arrays(alpha, beta)

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        shape = self._full_shape(shape)
        return jax.random.beta(
            key, jnp.broadcast_to(self.alpha, shape), jnp.broadcast_to(self.beta, shape), shape, self.dtype
        )

    @_method()
    def log_prob(self, x):
        x, alpha, beta = jnp.broadcast_arrays(jnp.asarray(x, self.dtype), self.alpha, self.beta)
        inside = (x >= 0) & (x <= 1)
        safe_x = jnp.where(inside, x, jnp.full_like(x, 0.5))
        values = xlogy(alpha - 1, safe_x) + xlog1py(beta - 1, -safe_x) - betaln(alpha, beta)
        return jnp.where(inside, values, -jnp.inf)

    @_method()
    def entropy(self):
        a, b = self.alpha, self.beta
        return betaln(a, b) - (a - 1) * digamma(a) - (b - 1) * digamma(b) + (a + b - 2) * digamma(a + b)

    @_method("event")
    def mean(self):
        return self.alpha / (self.alpha + self.beta)

    @_method("event")
    def variance(self):
        total = self.alpha + self.beta
        return self.alpha * self.beta / (jnp.square(total) * (total + 1))


class Dirichlet(Distribution):
    """Dirichlet distribution on the (k-1)-simplex with ``concentration`` of shape ``batch + (k,)``.

    ``log_prob(x)`` assumes ``x`` lies on the simplex (the sum is not checked; negative entries give -inf).

    Args:
      concentration: alpha > 0, shape ``batch + (k,)``, k >= 2.

    Example:
      >>> import jax.numpy as jnp
      >>> d = Dirichlet(jnp.array([1.0, 2.0, 3.0]))
      >>> print(d.mean())
      [0.16666667 0.33333334 0.5       ]
      >>> print(round(float(d.log_prob(jnp.array([0.2, 0.3, 0.5]))), 4))
      1.5041
    """

    _parameter_names = ("concentration",)
    arg_constraints = {"concentration": finite_positive}
    _parameter_core_ndims = {"concentration": 1}
    _event_ndims = 1
    _first_parameter_core_ndims = 1

    def __init__(self, concentration):
        (concentration,) = _as_parameters({"concentration": concentration})
        if concentration.ndim < 1 or concentration.shape[-1] < 2:
            raise ValueError(
                f"`concentration` must have shape batch + (k,) with k >= 2, got {concentration.shape}."
            )
        self._check_arguments({"concentration": concentration})
        self.concentration = concentration

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        shape = _sample_shape(shape) + self.batch_shape
        return jax.random.dirichlet(key, self.concentration, shape, self.dtype)

    @_method()
    def log_prob(self, x):
        x, alpha = jnp.broadcast_arrays(jnp.asarray(x, self.dtype), self.concentration)
        inside = jnp.all(x >= 0, axis=-1)
        log_norm = jnp.sum(gammaln(alpha), axis=-1) - gammaln(jnp.sum(alpha, axis=-1))
        values = jnp.sum(xlogy(alpha - 1, jnp.where(x >= 0, x, jnp.ones_like(x))), axis=-1) - log_norm
        return jnp.where(inside, values, -jnp.inf)

    @_method()
    def entropy(self):
        alpha = self.concentration
        k = alpha.shape[-1]
        total = jnp.sum(alpha, axis=-1)
        log_norm = jnp.sum(gammaln(alpha), axis=-1) - gammaln(total)
        return log_norm + (total - k) * digamma(total) - jnp.sum((alpha - 1) * digamma(alpha), axis=-1)

    @_method("event")
    def mean(self):
        return self.concentration / jnp.sum(self.concentration, axis=-1, keepdims=True)

    @_method("event")
    def variance(self):
        alpha = self.concentration
        total = jnp.sum(alpha, axis=-1, keepdims=True)
        return alpha * (total - alpha) / (jnp.square(total) * (total + 1))


# --------------------------------------------------------------------------------------------------
# Laplace and Exponential
# --------------------------------------------------------------------------------------------------


class Laplace(Distribution):
    """Laplace distribution: density exp(-|x - loc| / scale) / (2 scale), elementwise.

    Args:
      loc: location (median).
      scale: > 0; broadcasts with ``loc``.

    Example:
      >>> d = Laplace(0.0, 2.0)
      >>> print(round(float(d.log_prob(1.0)), 4), round(float(d.entropy()), 4), float(d.variance()))
      -1.8863 2.3863 8.0
    """

    _parameter_names = ("loc", "scale")
    arg_constraints = {"loc": real, "scale": finite_positive}

    def __init__(self, loc, scale):
        loc, scale = _as_parameters({"loc": loc, "scale": scale})
        self._check_arguments({"loc": loc, "scale": scale})
        self.loc, self.scale = _broadcast_arrays(loc, scale)

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        shape = self._full_shape(shape)
        noise = jax.random.laplace(key, shape, self.dtype)
        return jnp.broadcast_to(self.loc, shape) + jnp.broadcast_to(self.scale, shape) * noise

    @_method()
    def log_prob(self, x):
        x, loc, scale = jnp.broadcast_arrays(jnp.asarray(x, self.dtype), self.loc, self.scale)
        return -jnp.abs(x - loc) / scale - jnp.log(2 * scale)

    @_method()
    def entropy(self):
        return 1 + jnp.log(2 * self.scale)

    @_method("event")
    def mean(self):
        return self.loc

    @_method("event")
    def variance(self):
        return 2 * jnp.square(self.scale)


class Exponential(Distribution):
    """Exponential distribution with ``rate`` lambda: density lambda exp(-lambda x) on x >= 0.

    Args:
      rate: lambda > 0; any shape.

    Example:
      >>> d = Exponential(2.0)
      >>> print(round(float(d.log_prob(1.0)), 4), round(float(d.entropy()), 4), float(d.mean()))
      -1.3069 0.3069 0.5
    """

    _parameter_names = ("rate",)
    arg_constraints = {"rate": finite_positive}

    def __init__(self, rate):
        (rate,) = _as_parameters({"rate": rate})
        self._check_arguments({"rate": rate})
        self.rate = rate

    @_method("event", static_argnums=2)
    def _sample(self, key, shape):
        shape = self._full_shape(shape)
        return jax.random.exponential(key, shape, self.dtype) / jnp.broadcast_to(self.rate, shape)

    @_method()
    def log_prob(self, x):
        x, rate = jnp.broadcast_arrays(jnp.asarray(x, self.dtype), self.rate)
        return jnp.where(x >= 0, jnp.log(rate) - rate * x, -jnp.inf)

    @_method()
    def entropy(self):
        return 1 - jnp.log(self.rate)

    @_method("event")
    def mean(self):
        return 1 / self.rate

    @_method("event")
    def variance(self):
        return 1 / jnp.square(self.rate)
