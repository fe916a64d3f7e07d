"""Shared pieces of the transfer studies (``finetune_kl``, ``distill_kl``): data, models, training, statistics.

Rules these helpers keep, so that the two studies can batch everything over seeds with ``jax.vmap``:

- Data: scikit-learn's bundled digits (nothing downloaded), pixels scaled to [0, 1], split per class in
  fixed proportions. The number of images of each class in each part depends only on the proportions,
  not on the seed, so every seed's parts have the same shapes and stack into one array.
- Models: ``equinox.nn.MLP`` (ReLU hidden layers, linear logits), handled as ``(params, static)``
  from ``equinox.partition`` so that the array part can be stacked over seeds and runs.
- Training: full-batch Adam (optax) in a ``lax.scan``, so a whole sweep is one jitted, vmapped call.
- Statistics over seeds: Student-t 95% intervals of the mean and Welch's unequal-variance t-test
  (Welch, 1947); "significant" means p < 0.05, uncorrected for the number of comparisons shown.
- Settings: a frozen dataclass per study with a ``quick()`` variant; the command-line flags are
  generated from its fields (``--name-with-dashes`` per field, comma lists for tuples).

References: B. L. Welch, "The generalization of Student's problem when several different population
variances are involved", Biometrika 34, 1947; S. Holm, "A simple sequentially rejective multiple test
procedure", Scandinavian Journal of Statistics 6, 1979; P. Kidger and C. Garcia, "Equinox: neural networks in JAX
via callable PyTrees and filtered transformations", 2021, https://arxiv.org/abs/2111.00254.
"""

from __future__ import annotations

from typing import Any, Callable, Sequence

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax
import scipy.stats

from experiments import _common

NUM_CLASSES = 10
NUM_FEATURES = 64
SIGNIFICANCE = 0.05


# ----------------------------------------------------------------------------------------------
# Data
# ----------------------------------------------------------------------------------------------

def digits_parts(seed: int, fractions: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The digits split per class into parts of the given proportions, shuffled by ``seed``.

    Args:
      seed: NumPy seed of the per-class shuffles and of the order inside each part.
      fractions: proportions of the parts (normalised); each class contributes
        ``floor(fraction * count)`` images to every part but the last, which takes the rest.

    Returns:
      One ``(x, y)`` per part: x float32 (n, 64) in [0, 1], y int32 (n,). Shapes do not depend on ``seed``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    fractions = np.asarray(fractions, float) / np.sum(fractions)
    rng = np.random.default_rng(seed)
    parts: list[list[np.ndarray]] = [[] for _ in fractions]
    for label in range(NUM_CLASSES):
        members = rng.permutation(np.flatnonzero(y == label))
        cuts = np.floor(np.cumsum(fractions[:-1]) * len(members)).astype(int)
        for part, chunk in zip(parts, np.split(members, cuts)):
            part.append(chunk)
    out = []
    for part in parts:
        index = rng.permutation(np.concatenate(part))
        out.append((x[index], y[index]))
    return out


def stacked_parts(seeds: Sequence[int], fractions: Sequence[float]) -> list[tuple[jax.Array, jax.Array]]:
    """``digits_parts`` for every seed, stacked: one ``(x (S, n, 64), y (S, n))`` per part."""
    per_seed = [digits_parts(seed, fractions) for seed in seeds]
    return [(jnp.asarray(np.stack([s[i][0] for s in per_seed])), jnp.asarray(np.stack([s[i][1] for s in per_seed])))
            for i in range(len(fractions))]


# ----------------------------------------------------------------------------------------------
# Models and training
# ----------------------------------------------------------------------------------------------

def init_mlps(seeds: Sequence[int], stream: int, width: int, depth: int):
    """One ``equinox.nn.MLP`` (64 -> ``depth`` ReLU layers of ``width`` -> 10 logits) per seed.

    Equinox's default initialisation, weights and biases ~ U(-1/sqrt(fan_in), 1/sqrt(fan_in)), drawn with
    NumPy from ``default_rng([stream, seed])`` (each model depends on its own seed and stream only; no
    compiled random-number kernels, whose compilation costs more than these models' training).

    Args:
      seeds: one model per seed.
      stream: separates the models of one seed (teacher, student, ...).
      width: hidden width.
      depth: number of hidden layers.

    Returns:
      ``(params, static)``: float32 parameter arrays stacked over the seeds, and the static rest.
    """
    template = eqx.filter_eval_shape(lambda: eqx.nn.MLP(NUM_FEATURES, NUM_CLASSES, width, depth,
                                                        activation=jax.nn.relu, dtype=jnp.float32,
                                                        key=jax.random.key(0)))
    arrays = []
    for layer in template.layers:
        out_size, in_size = layer.weight.shape
        bound = 1.0 / np.sqrt(in_size)
        for shape in ((out_size, in_size), (out_size,)):
            arrays.append(jnp.asarray(np.stack([
                np.random.default_rng([stream, seed, len(arrays)]).uniform(-bound, bound, shape) for seed in seeds
            ]).astype(np.float32)))
    models = eqx.tree_at(lambda m: [leaf for layer in m.layers for leaf in (layer.weight, layer.bias)],
                         template, arrays)
    return eqx.partition(models, eqx.is_array)


def logits_of(params, static, x: jax.Array) -> jax.Array:
    """The logits (n, 10) of the MLP ``combine(params, static)`` on a batch x of shape (n, 64)."""
    return jax.vmap(eqx.combine(params, static))(x)


def cross_entropy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Mean cross-entropy of integer ``labels`` under ``softmax(logits)``."""
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def accuracy(logits: jax.Array, labels: jax.Array) -> jax.Array:
    """Fraction of rows whose argmax is the label, over the last batch axis: logits (..., n, K), labels (..., n)."""
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels, axis=-1)


def fit(params, loss: Callable[[Any], jax.Array], *, steps: int, learning_rate: float):
    """``steps`` full-batch Adam steps on ``loss(params)`` (a ``lax.scan``: jit- and vmap-able)."""
    optimizer = optax.adam(learning_rate)

    def step(carry, _):
        params, state = carry
        grads = jax.grad(loss)(params)
        updates, state = optimizer.update(grads, state, params)
        return (optax.apply_updates(params, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def index_tree(tree, index):
    """The slice ``leaf[index]`` of every array leaf."""
    return jax.tree.map(lambda leaf: leaf[index], tree)


def stack(trees):
    """The trees' leaves stacked along a new leading axis."""
    return jax.tree.map(lambda *leaves: jnp.stack(leaves), *trees)


def unstack(tree) -> list:
    """The inverse of ``stack``: one tree per index of the leading axis."""
    return [index_tree(tree, i) for i in range(jax.tree.leaves(tree)[0].shape[0])]


# ----------------------------------------------------------------------------------------------
# Statistics over seeds
# ----------------------------------------------------------------------------------------------

def interval(samples) -> tuple[float, float]:
    """Mean and half-width of the Student-t 95% interval of the mean (half-width 0 for one sample)."""
    samples = np.asarray(samples, float)
    if samples.size < 2:
        return float(samples.mean()), 0.0
    half = scipy.stats.t.ppf(0.975, samples.size - 1) * samples.std(ddof=1) / np.sqrt(samples.size)
    return float(samples.mean()), float(half)


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test of equal means; NaN when it cannot be computed (fewer than
    two samples on a side, or both sides without spread and different means: then 0.0)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    if a.size < 2 or b.size < 2:
        return float("nan")
    if a.std() == 0 and b.std() == 0:
        return 1.0 if a.mean() == b.mean() else 0.0
    return float(scipy.stats.ttest_ind(a, b, equal_var=False).pvalue)


def holm(p_values, level: float = SIGNIFICANCE) -> list[bool]:
    """Which of the p-values stay significant under Holm's step-down correction (Holm, 1979); NaN never does."""
    p = np.asarray(p_values, float)
    order = np.argsort(np.where(np.isnan(p), np.inf, p))
    keep = np.zeros(p.size, bool)
    for rank, index in enumerate(order):
        if not p[index] < level / (p.size - rank):
            break
        keep[index] = True
    return keep.tolist()


def summarise(samples) -> dict[str, float]:
    """``{"mean", "ci95", "std"}`` of per-seed values."""
    samples = np.asarray(samples, float)
    mean, half = interval(samples)
    return {"mean": mean, "ci95": half, "std": float(samples.std(ddof=1)) if samples.size > 1 else 0.0}


def compare(a, b, name_a: str, name_b: str, what: str) -> str:
    """One sentence comparing per-seed values ``a`` and ``b`` of ``what``, saying whether the difference
    is significant (Welch, p < 0.05) and giving both intervals."""
    (mean_a, half_a), (mean_b, half_b) = interval(a), interval(b)
    p = welch_p(a, b)
    name_a = name_a[:1].upper() + name_a[1:]
    values = f"{mean_a:.3f} ± {half_a:.3f} vs {mean_b:.3f} ± {half_b:.3f}"
    if np.isnan(p):
        return f"{name_a} vs {name_b}, {what}: {values} (one seed: no test)."
    if p >= SIGNIFICANCE:
        return f"{name_a} vs {name_b}, {what}: {values}, difference not significant (Welch p = {p:.2g})."
    direction = "higher" if mean_a > mean_b else "lower"
    return f"{name_a} has {direction} {what} than {name_b}: {values} (Welch p = {p:.2g})."


def fmt(summary: dict[str, float]) -> str:
    """``"0.953 ± 0.012"`` from a ``summarise`` dict."""
    return f"{summary['mean']:.3f} ± {summary['ci95']:.3f}"
