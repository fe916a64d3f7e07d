"""The digits data of the experiments: one loader, per-class splits whose shapes do not depend on the seed.

scikit-learn's bundled 8x8 digits (1797 images, nothing downloaded), pixels scaled to [0, 1]. Splits are
per class in fixed proportions, so the number of images of each class in each part depends only on the
proportions, not on the seed: every seed's parts have the same shapes and stack into one array that a
study can ``jax.vmap`` over.
"""

from __future__ import annotations

import functools
from typing import Sequence

import jax
import jax.numpy as jnp
import numpy as np

NUM_CLASSES = 10
NUM_FEATURES = 64


@functools.cache
def _digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    x, y = (images / 16.0).astype(np.float32), labels.astype(np.int32)
    x.flags.writeable = y.flags.writeable = False
    return x, y


def digits() -> tuple[np.ndarray, np.ndarray]:
    """All digits: x float32 (1797, 64) with pixels in [0, 1], y int32 (1797,) labels 0-9 (read-only)."""
    return _digits()


def digits_parts(seed: int, fractions: Sequence[float]) -> list[tuple[np.ndarray, np.ndarray]]:
    """The digits split per class into parts of the given proportions, shuffled by ``seed``.

    Args:
      seed: NumPy seed of the per-class shuffles and of the order inside each part.
      fractions: proportions of the parts (normalised); each class contributes
        ``floor(fraction * count)`` images to every part but the last, which takes the rest.

    Returns:
      One ``(x, y)`` per part: x float32 (n, 64) in [0, 1], y int32 (n,). Shapes do not depend on ``seed``.
    """
    x, y = digits()
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
