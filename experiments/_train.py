"""The optax training loop of the experiments, and the small pytree and classification helpers around it.

One loop: ``steps`` optimizer updates in a ``jax.lax.scan`` (jit- and vmap-able, so a sweep over seeds
and runs is one compiled call). The loss takes the parameters and, when ``xs`` is given, one slice of
``xs`` per step (a PRNG key, a minibatch index, or both): ``loss(params)`` or ``loss(params, x)``.
``fit_in_chunks`` runs the same loop in jitted chunks behind a progress bar when it is long.
"""

from __future__ import annotations

from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _common


def run_steps(loss: Callable[..., jax.Array], optimizer: optax.GradientTransformation, params, state, xs=None, *,
          length: int | None = None, trace: str | None = None):
    """Optimizer steps on ``loss`` in a ``lax.scan`` from ``(params, state)``.

    Args:
      loss: ``loss(params)`` (``xs`` None) or ``loss(params, x)`` with x one slice of ``xs``.
      optimizer: an optax transformation.
      params, state: the starting parameters and optimizer state.
      xs: a pytree scanned over (its leading axis is the step), or None with ``length``.
      length: number of steps when ``xs`` is None.
      trace: None, ``"loss"`` (the loss of every step, before its update) or ``"params"`` (the parameters
        after every step).

    Returns:
      ``((params, state), trace)`` with trace None when not asked for.
    """
    differentiate = jax.value_and_grad(loss) if trace == "loss" else jax.grad(loss)

    def step(carry, x):
        params, state = carry
        out = differentiate(params) if xs is None else differentiate(params, x)
        value, grads = out if trace == "loss" else (None, out)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        return (params, state), {None: None, "loss": value, "params": params}[trace]

    return jax.lax.scan(step, (params, state), xs, length=length)


def fit(params, loss: Callable[..., jax.Array], *, steps: int | None = None, learning_rate: float | None = None,
        optimizer: optax.GradientTransformation | None = None, xs=None, trace: str | None = None):
    """Training from scratch: the optimizer (Adam at ``learning_rate`` unless given) initialised at ``params``,
    then ``steps`` updates (or one per slice of ``xs``). Returns the final parameters, and the trace when asked."""
    optimizer = optax.adam(learning_rate) if optimizer is None else optimizer
    (params, _), traced = run_steps(loss, optimizer, params, optimizer.init(params), xs,
                                    length=None if xs is not None else steps, trace=trace)
    return params if trace is None else (params, traced)


def chunk_size(num_steps: int, target: int = 250) -> int:
    """The largest chunk length <= ``target`` that divides ``num_steps``: one compiled scan serves all chunks."""
    count = -(-num_steps // target)
    while num_steps % count:
        count += 1
    return num_steps // count


def fit_in_chunks(params, loss: Callable[[Any, jax.Array], jax.Array], optimizer: optax.GradientTransformation,
                  key: jax.Array, num_steps: int, *, trace: str, desc: str, disable: bool = True):
    """``num_steps`` optimizer steps on ``loss(params, key)`` (one key per step from ``key``), run as jitted
    chunks of equal length behind a progress bar. Returns ``(params, trace)``, the trace as one array."""
    run_chunk = jax.jit(lambda carry, keys: run_steps(loss, optimizer, *carry, keys, trace=trace))
    keys = jax.random.split(key, num_steps)
    carry, traced = (params, optimizer.init(params)), []
    chunk = chunk_size(num_steps)
    starts = range(0, num_steps, chunk)
    for start in _common.progress(starts, desc=desc, total=len(starts), disable=disable):
        carry, values = run_chunk(carry, keys[start:start + chunk])
        traced.append(values)
    return carry[0], jnp.concatenate(traced)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of integer ``labels`` under ``softmax(logits)``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows whose argmax is the label, over the last batch axis: logits (..., n, K), labels (..., n)."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels, axis=-1)


def index_tree(tree, index):
    """The slice ``leaf[index]`` of every array leaf."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def stack(trees):
    """The trees' leaves stacked along a new leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree) -> list:
    """The inverse of ``stack``: one tree per index of the leading axis."""
    return [index_tree(tree, i) for i in range(jax.tree.leaves(tree)[0].shape[0])]


def as_numpy(tree):
    """Every leaf as a NumPy array (device to host once)."""
    return jax.tree.map(np.asarray, tree)
