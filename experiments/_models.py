"""The networks of the experiments: ``equinox.nn.MLP``, handled as ``(params, static)``.

Every network is an ``equinox.nn.MLP`` (Kidger and Garcia, 2021) split by ``equinox.partition`` into its
array part (``params``: stacked over seeds and runs, given to optax, ``jax.vmap``-ed) and its static rest
(``static``: layer structure and activation). Initial weights are drawn outside the compiled program by
the study that owns the convention (equinox's uniform default here, Glorot or orthogonal there) and put in
with ``from_layers``; ``apply`` runs the network on a batch.

Reference: P. Kidger and C. Garcia, "Equinox: neural networks in JAX via callable PyTrees and filtered
transformations", 2021, https://arxiv.org/abs/2111.00254.
"""

from __future__ import annotations

import functools
from typing import Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


@functools.cache
def _static(sizes: tuple[int, ...], activation: Callable):
    """The static part of an MLP with these layer sizes (cached: built once per shape)."""
    template = eqx.filter_eval_shape(lambda: eqx.nn.MLP(sizes[0], sizes[-1], sizes[1], len(sizes) - 2,
                                                        activation=activation, key=jax.random.key(0)))
    return eqx.partition(template, eqx.is_array)[1]


def from_layers(layers: Sequence[tuple[jax.Array, jax.Array]], activation: Callable = jax.nn.relu):
    """An ``equinox.nn.MLP`` holding the given weights, as ``(params, static)``.

    Args:
      layers: ``(weight (out, in), bias (out,))`` per linear layer, input first; every hidden layer has
        the same width (``equinox.nn.MLP``'s shape). Leading batch axes (seeds) are kept: the weights
        may be stacked, shape (..., out, in).
      activation: the hidden layers' activation (the output layer is linear).

    Returns:
      ``(params, static)`` from ``equinox.partition``: combine them with ``equinox.combine``, or run
      them with ``apply``.
    """
    sizes = [layers[0][0].shape[-1]] + [weight.shape[-2] for weight, _ in layers]
    if len(set(sizes[1:-1])) > 1:
        raise ValueError(f"layers: every hidden layer must have one width, got sizes {sizes}")
    static = _static(tuple(sizes), activation)
    shapes = eqx.filter_eval_shape(lambda: eqx.nn.MLP(sizes[0], sizes[-1], sizes[1], len(layers) - 1,
                                                      activation=activation, key=jax.random.key(0)))
    model = eqx.tree_at(lambda m: [leaf for layer in m.layers for leaf in (layer.weight, layer.bias)],
                        shapes, [jnp.asarray(leaf) for layer in layers for leaf in layer])
    return eqx.filter(model, eqx.is_array), static


def uniform_layers(seeds: Sequence[int], stream: int, sizes: Sequence[int]) -> list[tuple[jax.Array, jax.Array]]:
    """Equinox's default initialisation, weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), one network
    per seed (stacked), drawn with NumPy from ``default_rng([stream, seed, leaf])``: each network depends on
    its own seed and stream only, and no compiled random-number kernel is built (their compilation costs
    more than these models' training)."""
    layers, leaf = [], 0
    for in_size, out_size in zip(sizes[:-1], sizes[1:]):
        bound = 1.0 / np.sqrt(in_size)
        pair = []
        for shape in ((out_size, in_size), (out_size,)):
            pair.append(jnp.asarray(np.stack([
                np.random.default_rng([stream, seed, leaf]).uniform(-bound, bound, shape) for seed in seeds
            ]).astype(np.float32)))
            leaf += 1
        layers.append(tuple(pair))
    return layers


def init_mlps(seeds: Sequence[int], stream: int, width: int, depth: int, in_size: int = 64, out_size: int = 10):
    """One ReLU MLP ``in_size`` -> ``depth`` hidden layers of ``width`` -> ``out_size`` per seed, equinox's
    default initialisation (``uniform_layers``); ``stream`` separates the models of one seed (teacher,
    student, ...). Returns ``(params, static)``, the parameters stacked over the seeds."""
    return from_layers(uniform_layers(seeds, stream, [in_size] + [width] * depth + [out_size]), jax.nn.relu)


def network(params, activation: Callable = jax.nn.relu):
    """The callable MLP of unbatched parameters ``params`` (the array part from ``from_layers``), its static
    part rebuilt from the weights' shapes: for code that carries only the arrays (through optax, vmap)."""
    sizes = (params.layers[0].weight.shape[-1],) + tuple(layer.weight.shape[-2] for layer in params.layers)
    return eqx.combine(params, _static(sizes, activation))


def apply(params, static, x: jax.Array) -> jax.Array:
    """The network ``combine(params, static)`` on a batch x of shape (n, in): outputs (n, out)."""
    return jax.vmap(eqx.combine(params, static))(x)
