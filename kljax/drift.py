"""Two-sample drift statistics: KL estimates with permutation p-values, and a stream monitor.

A drift check asks whether a production window ``y`` (m samples) still comes from the distribution of a
reference sample ``x`` (n samples). The statistic is a KL estimate D(P_x || P_y); its null distribution
is unknown (estimator bias depends on n, m, the dimension and the data), so the p-value comes from
permutations of the pooled sample instead of an asymptotic formula.

Why the permutation p-value is valid. Under H0 (no drift) the n + m pooled points are exchangeable, so
the observed split and B uniformly random re-splits of the pool are B + 1 exchangeable draws of the
statistic. The rank of the observed value among them is then (super-)uniform, and

    p = (1 + #{b : T_b >= T_obs}) / (1 + B)

satisfies P(p <= alpha) <= alpha for every alpha and every B, with equality at alpha = j / (B + 1)
when the statistic has no ties (Phipson & Smyth, 2010, eq. 2). Leaving out the "+ 1"s gives p = 0 with
positive probability and an anti-conservative test. Ties (counted as exceedances) only make it
conservative. Exchangeability also requires that anything the statistic is tuned on (here: histogram
bin edges) is either a symmetric function of the pool or independent of both samples; see
:func:`kl_permutation_test` and :class:`DriftMonitor`.

Statistics:
    * ``"histogram"``: per-feature (marginal) histogram KL with fixed bin edges and a pseudocount
      (:func:`bin_edges`, :func:`feature_histogram_kl`); one p-value per feature.
    * ``"knn"``: the multivariate k-nearest-neighbour estimator :func:`kljax.knn.kl`; one p-value.
    * any function ``statistic(x, y) -> array``, e.g. the KL between mean predicted class
      distributions of a classifier (black-box shift detection, Lipton et al., 2018).

References:
    B. Phipson and G. K. Smyth, "Permutation p-values should never be zero: calculating exact p-values
    when permutations are randomly drawn", Statistical Applications in Genetics and Molecular Biology
    9(1), 2010. https://doi.org/10.2202/1544-6115.1585
    Q. Wang, S. R. Kulkarni and S. Verdu, "Divergence estimation for multidimensional densities via
    k-nearest-neighbor distances", IEEE Trans. Inf. Theory 55(5), 2009.
    S. Rabanser, S. Guennemann and Z. Lipton, "Failing loudly: an empirical study of methods for
    detecting dataset shift", NeurIPS 2019. https://arxiv.org/abs/1810.11953
    Z. Lipton, Y.-X. Wang and A. Smola, "Detecting and correcting for label shift with black box
    predictors", ICML 2018. https://arxiv.org/abs/1802.03916
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from kljax import discrete, knn
from kljax._contract import (as_float_array, check_eagerly, check_int, host_values, is_concrete, nonnegative,
                             not_nan)

__all__ = [
    "DriftMonitor",
    "MonitorState",
    "WindowScore",
    "bin_edges",
    "bin_indices",
    "feature_histogram_kl",
    "kl_permutation_test",
    "sustained_alarms",
]

_ESTIMATORS = ("knn", "histogram")
_BINNINGS = ("quantile", "range")


# --------------------------------------------------------------------------------------------------
# Per-feature histograms with fixed edges
# --------------------------------------------------------------------------------------------------


def _as_samples(name: str, x, *, min_rows: int = 1) -> jax.Array:
    x = as_float_array(name, x)
    if x.ndim not in (1, 2):
        raise ValueError(f"`{name}` must have shape (n,) or (n, d), got {x.shape}.")
    if x.shape[0] < min_rows:
        raise ValueError(f"`{name}` needs at least {min_rows} samples (rows), got shape {x.shape}.")
    return x


def bin_edges(reference, bins: int = 10, *, binning: str = "quantile") -> jax.Array:
    """Bin edges for each feature, fixed on a reference sample.

    ``binning="quantile"`` puts the edges at the reference's empirical quantiles 0, 1/bins, ..., 1, so
    every bin holds about n / bins reference points (robust to scale and outliers); with many tied
    values (e.g. integer pixels) several edges coincide and the bins between them stay empty, which
    the pseudocount of :func:`feature_histogram_kl` handles. ``binning="range"`` spaces the edges
    evenly between the reference's minimum and maximum. In both cases :func:`bin_indices` sends values
    outside [edges[0], edges[-1]] to the first or last bin, so a window can always be scored.

    Args:
        reference: samples, shape (n,) for one feature or (n, d) for d features.
        bins: number of bins (>= 1).
        binning: ``"quantile"`` or ``"range"``.

    Returns:
        Non-decreasing edges of shape (bins + 1,) for 1-D input, else (d, bins + 1); dtype of
        ``reference``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.drift import bin_edges
        >>> bin_edges(jnp.arange(9.0), bins=4).tolist()
        [0.0, 2.0, 4.0, 6.0, 8.0]
        >>> bin_edges(jnp.array([0.0, 1.0, 10.0]), bins=2, binning="range").tolist()
        [0.0, 5.0, 10.0]

    References:
        Quantile (equal-frequency) binning for drift statistics: Rabanser et al., "Failing loudly",
        NeurIPS 2019, sec. 3.
    """
    reference = _as_samples("reference", reference)
    if not isinstance(bins, (int, np.integer)) or isinstance(bins, bool) or bins < 1:
        raise ValueError(f"`bins` must be a positive int, got {bins!r}.")
    if binning not in _BINNINGS:
        raise ValueError(f"`binning` must be one of {_BINNINGS}, got {binning!r}.")
    check_eagerly("reference", reference, not_nan)
    return _bin_edges(reference, int(bins), binning)


@functools.partial(jax.jit, static_argnames=("bins", "binning"))
def _bin_edges(reference: jax.Array, bins: int, binning: str) -> jax.Array:
    levels = jnp.linspace(0.0, 1.0, bins + 1, dtype=reference.dtype)
    if binning == "quantile":
        edges = jnp.quantile(reference, levels, axis=0)
    else:
        low, high = jnp.min(reference, axis=0, keepdims=True), jnp.max(reference, axis=0, keepdims=True)
        edges = low + jnp.expand_dims(levels, tuple(range(1, reference.ndim))) * (high - low)
    return edges.T if reference.ndim == 2 else edges


def _check_edges(edges, num_features: int | None, dtype) -> jax.Array:
    """Validates edges of shape (bins + 1,) (one feature) or (d, bins + 1)."""
    edges = as_float_array("edges", edges).astype(dtype)
    if edges.ndim not in (1, 2) or edges.shape[-1] < 2:
        raise ValueError(f"`edges` must have shape (bins + 1,) or (d, bins + 1) with bins >= 1, got {edges.shape}.")
    if edges.ndim == 2 and num_features is not None and edges.shape[0] != num_features:
        raise ValueError(f"`edges` has {edges.shape[0]} rows but the samples have {num_features} features.")
    if edges.ndim == 1 and num_features not in (None, 1):
        raise ValueError(f"1-D `edges` of shape {edges.shape} can only bin one feature, got {num_features}.")
    check_eagerly("edges", edges, not_nan)
    values = host_values(edges)  # NumPy: closed-over edges are concrete inside a jit trace too
    if values is not None and (np.diff(values, axis=-1) < 0).any():
        raise ValueError("`edges` must be non-decreasing along the last axis.")
    return edges


def bin_indices(x, edges) -> jax.Array:
    """Bin index of every value, with out-of-range values sent to the edge bins.

    Bin b is [edges[b], edges[b + 1]) as in ``numpy.histogram``, except that values below
    ``edges[0]`` join bin 0 and values at or above ``edges[-1]`` join the last bin (numpy would drop
    the ones outside): a drifted window must not lose its most drifted points.

    Args:
        x: samples, shape (n,) with 1-D ``edges`` or (n, d) with ``edges`` of shape (d, bins + 1).
        edges: non-decreasing bin edges, e.g. from :func:`bin_edges`.

    Returns:
        int32 indices in [0, bins), shape of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.drift import bin_indices
        >>> bin_indices(jnp.array([-5.0, 0.0, 0.5, 1.0, 2.0, 9.0]), jnp.array([0.0, 1.0, 2.0, 3.0])).tolist()
        [0, 0, 0, 1, 2, 2]
    """
    x = _as_samples("x", x)
    edges = _check_edges(edges, x.shape[1] if x.ndim == 2 else None, x.dtype)
    if (x.ndim == 2) != (edges.ndim == 2):
        raise ValueError(f"`x` of shape {x.shape} needs `edges` of shape (d, bins + 1), got {edges.shape}.")
    return _bin_indices(x, edges)


@jax.jit
def _bin_indices(x: jax.Array, edges: jax.Array) -> jax.Array:
    def one_feature(values, feature_edges):
        # Only the interior edges are searched: everything left of edges[1] is bin 0, everything at or
        # right of edges[-2] is the last bin. side="right" makes bins closed on the left.
        return jnp.searchsorted(feature_edges[1:-1], values, side="right").astype(jnp.int32)

    if x.ndim == 1:
        return one_feature(x, edges)
    return jax.vmap(one_feature, in_axes=(1, 0), out_axes=1)(x, edges)


def _smoothed_kl(counts_x: jax.Array, counts_y: jax.Array, pseudocount) -> jax.Array:
    """KL(p_x || p_y) over the last (bins) axis of count arrays, each smoothed by ``pseudocount``."""
    p = counts_x + pseudocount
    q = counts_y + pseudocount
    return discrete.kl(p / jnp.sum(p, axis=-1, keepdims=True), q / jnp.sum(q, axis=-1, keepdims=True))


def feature_histogram_kl(x, y, edges, *, pseudocount: float = 0.5) -> jax.Array:
    """Per-feature KL between the histograms of ``x`` and ``y`` on fixed bin edges.

    For each feature, both samples are binned on the same ``edges`` (:func:`bin_indices`; values out
    of range join the edge bins), ``pseudocount`` is added to every bin of both histograms, and

        D_j = sum_b p_b log(p_b / q_b),   p_b = (c_b(x) + a) / (n + B a),   q_b = (c_b(y) + a) / (m + B a).

    The pseudocount a keeps the estimate finite when a window leaves a bin empty (the plug-in estimate
    is +inf there); a = 1/2 is the Krichevsky-Trofimov (Jeffreys-prior) estimate of each histogram. It
    biases D_j towards 0 by O(B a / m), which a permutation test absorbs (the same bias is in every
    permuted statistic).

    Args:
        x: reference samples (P), shape (n,) or (n, d).
        y: window samples (Q), shape (m,) or (m, d), same number of features as ``x``.
        edges: bin edges, shape (bins + 1,) or (d, bins + 1), e.g. ``bin_edges(reference)``.
        pseudocount: a >= 0 added to every bin count (0 gives the plug-in estimate, possibly +inf).

    Returns:
        KL in nats, a scalar for 1-D input, else shape (d,); dtype of ``x``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import bin_edges, feature_histogram_kl
        >>> x = jnp.array([0.1, 0.2, 0.6, 0.7])
        >>> y = jnp.array([0.1, 0.6, 0.7, 0.8])
        >>> edges = jnp.array([0.0, 0.5, 1.0])
        >>> print(round(float(feature_histogram_kl(x, y, edges, pseudocount=0.0)), 4))  # p = (1/2, 1/2), q = (1/4, 3/4)
        0.1438

    References:
        R. Krichevsky and V. Trofimov, "The performance of universal encoding", IEEE Trans. Inf. Theory
        27(2), 1981 (the add-1/2 estimator).
    """
    x = _as_samples("x", x)
    y = _as_samples("y", y)
    if x.ndim != y.ndim or (x.ndim == 2 and x.shape[1] != y.shape[1]):
        raise ValueError(f"`x` and `y` must have the same number of features, got shapes {x.shape} and {y.shape}.")
    y = y.astype(x.dtype)
    edges = _check_edges(edges, x.shape[1] if x.ndim == 2 else None, x.dtype)
    if (x.ndim == 2) != (edges.ndim == 2):
        raise ValueError(f"`x` of shape {x.shape} needs `edges` of shape (d, bins + 1), got {edges.shape}.")
    check_eagerly("pseudocount", pseudocount, nonnegative)
    return _feature_histogram_kl(x, y, edges, jnp.asarray(pseudocount, x.dtype))


@jax.jit
def _feature_histogram_kl(x, y, edges, pseudocount):
    bins = edges.shape[-1] - 1
    counts_x = jnp.sum(jax.nn.one_hot(_bin_indices(x, edges), bins, dtype=x.dtype), axis=0)
    counts_y = jnp.sum(jax.nn.one_hot(_bin_indices(y, edges), bins, dtype=x.dtype), axis=0)
    result = _smoothed_kl(counts_x, counts_y, pseudocount)
    bad = jnp.any(jnp.isnan(x)) | jnp.any(jnp.isnan(y))
    return jnp.where(bad, jnp.nan, result)


# --------------------------------------------------------------------------------------------------
# Permutation machinery
# --------------------------------------------------------------------------------------------------


def _permutation_statistics(key, num_total: int, statistic_of_split: Callable, num_permutations: int,
                            chunk_size: int) -> jax.Array:
    """The statistic at the observed split (row 0) and at ``num_permutations`` random re-splits.

    ``statistic_of_split(order)`` receives a permutation of range(num_total) whose first n entries
    form the new x. Re-split b >= 1 uses the key ``fold_in(key, b)``, so the result does not depend on
    ``chunk_size``. The observed split (b = 0, the identity) goes through the same vmapped code as the
    permuted ones, so that equal statistics are bitwise equal. Chunks of ``chunk_size`` splits are
    vmapped and run one after another (``lax.map``): memory grows with ``chunk_size``, not with B. The
    last chunk is padded with extra permutations whose statistics are dropped, so that one chunk
    shape is compiled.
    """
    total = num_permutations + 1
    chunk = min(chunk_size, total)
    num_chunks = -(-total // chunk)
    identity = jnp.arange(num_total)

    def one(index):
        permutation = jax.random.permutation(jax.random.fold_in(key, index), num_total)
        return statistic_of_split(jnp.where(index == 0, identity, permutation))

    stats = jax.lax.map(lambda start: jax.vmap(one)(start + jnp.arange(chunk)), jnp.arange(num_chunks) * chunk)
    return stats.reshape((num_chunks * chunk,) + stats.shape[2:])[:total]


def _p_values(stats: jax.Array) -> tuple[jax.Array, jax.Array]:
    """Observed statistic and (1 + #{T_b >= T_obs}) / (1 + B) from the stacked statistics."""
    observed, permuted = stats[0], stats[1:]
    # Exact ties (e.g. equal histograms) count as exceedances; the tolerance only guards against
    # last-bit differences of a mathematically equal statistic, and can only make p larger.
    tolerance = 4 * jnp.finfo(stats.dtype).eps * jnp.abs(observed)
    exceed = jnp.sum(permuted >= jnp.expand_dims(observed - tolerance, 0), axis=0)
    num_permutations = permuted.shape[0]
    p_value = ((1 + exceed) / (1 + num_permutations)).astype(stats.dtype)
    bad = jnp.isnan(observed) | jnp.any(jnp.isnan(permuted), axis=0)
    return observed, jnp.where(bad, jnp.nan, p_value)


@functools.partial(jax.jit, static_argnames=("num_permutations", "chunk_size"))
def _histogram_test(key, x, y, edges, pseudocount, *, num_permutations, chunk_size):
    n, bins = x.shape[0], edges.shape[-1] - 1
    pooled = jnp.concatenate([x, y], axis=0)
    num_total = pooled.shape[0]
    # Bins are fixed before permuting, so each pooled point keeps its bin; a re-split only changes
    # which points count for x. counts_x = mask @ one_hot is one (chunk, N) x (N, d * bins) matmul.
    one_hot = jax.nn.one_hot(_bin_indices(pooled, edges), bins, dtype=x.dtype)  # (N, d, bins)
    flat = one_hot.reshape(num_total, -1)
    total = jnp.sum(one_hot, axis=0)

    def statistic_of_split(order):
        mask = jnp.zeros(num_total, x.dtype).at[order[:n]].set(1)
        counts_x = (mask @ flat).reshape(total.shape)
        return _smoothed_kl(counts_x, total - counts_x, pseudocount)

    stats = _permutation_statistics(key, num_total, statistic_of_split, num_permutations, chunk_size)
    observed, p_value = _p_values(stats)
    bad = jnp.any(jnp.isnan(x)) | jnp.any(jnp.isnan(y))
    return jnp.where(bad, jnp.nan, observed), jnp.where(bad, jnp.nan, p_value)


@functools.partial(jax.jit, static_argnames=("statistic", "num_permutations", "chunk_size"))
def _generic_test(key, x, y, *, statistic, num_permutations, chunk_size):
    n = x.shape[0]
    pooled = jnp.concatenate([x, y], axis=0)

    def statistic_of_split(order):
        shuffled = pooled[order]
        return jnp.asarray(statistic(shuffled[:n], shuffled[n:]))

    stats = _permutation_statistics(key, pooled.shape[0], statistic_of_split, num_permutations, chunk_size)
    observed, p_value = _p_values(stats)
    bad = jnp.any(jnp.isnan(x)) | jnp.any(jnp.isnan(y))
    return jnp.where(bad, jnp.nan, observed), jnp.where(bad, jnp.nan, p_value)


def _pairwise_distances(points: jax.Array) -> jax.Array:
    """Euclidean distances between all rows, from coordinate differences (exact, never negative),
    computed a block of rows at a time so that memory stays O(N^2), not O(N^2 d)."""
    def row(point):
        return jnp.sqrt(jnp.sum((points - point[None, :]) ** 2, axis=-1))

    return jax.lax.map(row, points, batch_size=min(64, points.shape[0]))


def _kth_smallest(values: jax.Array, k: int) -> jax.Array:
    if k == 1:
        return jnp.min(values, axis=-1)
    return -jax.lax.top_k(-values, k)[0][..., -1]


@functools.partial(jax.jit, static_argnames=("k", "num_permutations", "chunk_size"))
def _knn_wkv_test(key, x, y, *, k, num_permutations, chunk_size):
    """Permutation test of the WKV statistic from one pooled distance matrix.

    A re-split does not move the points, only their labels, so the (N, N) distances are computed
    once; per re-split, rho_k(i) and nu_k(i) are k-th smallest distances over the columns labelled x
    (the diagonal excluded: a point is not its own neighbour) and y. That is O(N^2) per permutation
    instead of a fresh O(N^2 d) search, and the number is kljax.knn.kl(x, y, k=k, estimator="wkv")
    (WKV 2009, eq. 5): d / n sum_{i in x} log(nu_k(i) / rho_k(i)) + log(m / (n - 1)).
    Memory: the (N, N) matrix plus chunk_size of them per chunk.
    """
    n, d = x.shape
    m = y.shape[0]
    pooled = jnp.concatenate([x, y], axis=0)
    num_total = n + m
    distances = _pairwise_distances(pooled)
    distances = jnp.where(jnp.eye(num_total, dtype=bool), jnp.inf, distances)
    offset = jnp.log(jnp.asarray(m, x.dtype)) - jnp.log(jnp.asarray(n - 1, x.dtype))

    def statistic_of_split(order):
        is_x = jnp.zeros(num_total, bool).at[order[:n]].set(True)
        rho = _kth_smallest(jnp.where(is_x[None, :], distances, jnp.inf), k)
        nu = _kth_smallest(jnp.where(is_x[None, :], jnp.inf, distances), k)
        # the sum runs over the rows labelled x; rows labelled y contribute 0 (and may hold zeros)
        log_ratio = jnp.where(is_x, jnp.log(jnp.where(is_x, nu, 1)) - jnp.log(jnp.where(is_x, rho, 1)), 0)
        value = d * jnp.sum(log_ratio) / n + offset
        # a zero distance (duplicated points) makes the estimate undefined, as in kljax.knn.kl
        zero = jnp.any(is_x & ((rho == 0) | (nu == 0)))
        return jnp.where(zero, jnp.nan, value).astype(x.dtype)

    stats = _permutation_statistics(key, num_total, statistic_of_split, num_permutations, chunk_size)
    observed, p_value = _p_values(stats)
    bad = jnp.any(jnp.isnan(x)) | jnp.any(jnp.isnan(y))
    return jnp.where(bad, jnp.nan, observed), jnp.where(bad, jnp.nan, p_value)


@dataclasses.dataclass(frozen=True)
class _KnnStatistic:
    """Hashable ``(x, y) -> kljax.knn.kl(x, y, ...)`` so that jit caches it across calls."""

    k: int
    knn_estimator: str
    method: str

    def __call__(self, x, y):
        return knn.kl(x, y, k=self.k, estimator=self.knn_estimator, method=self.method)


def kl_permutation_test(
    key,
    x,
    y,
    *,
    estimator: str | Callable[[jax.Array, jax.Array], Any] = "knn",
    num_permutations: int = 200,
    chunk_size: int | None = None,
    k: int = 1,
    knn_estimator: str = "wkv",
    knn_method: str = "brute",
    bins: int = 10,
    binning: str = "quantile",
    edges=None,
    pseudocount: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """KL drift statistic D(P_x || P_y) of a reference ``x`` and a window ``y``, with its permutation p-value.

    The pooled sample (x, y) is re-split ``num_permutations`` times into groups of the original sizes
    n and m (uniformly random permutations, one key each), the statistic is recomputed on each split,
    and the p-value is (1 + #{T_perm >= T_obs}) / (1 + B), which is valid at every level under H0:
    P(p <= alpha) <= alpha (Phipson & Smyth, 2010; see the module docstring). Permutations are
    vmapped in chunks of ``chunk_size`` run one after another, so memory is bounded by the chunk.

    Estimators:
        * ``"knn"``: ``kljax.knn.kl(x, y, k=k, estimator=knn_estimator)`` on (n, d) samples (1-D
          input is treated as d = 1); one statistic and one p-value. For the default ``"wkv"`` the
          (N, N) distance matrix of the pool (N = n + m) is computed once and each permutation only
          relabels its columns: O(N^2) per permutation whatever d, memory O(chunk_size N^2). Other
          estimators call ``kljax.knn.kl(..., method=knn_method)`` on every re-split. Duplicated
          points make the statistic undefined for some re-splits: ``ValueError`` eagerly, NaN
          under ``jit``.
        * ``"histogram"``: :func:`feature_histogram_kl` per feature; for (n, d) input the statistic and
          p-value have shape (d,) (one joint permutation of the rows for all features, so each feature's
          p-value is valid on its own; combine them with a multiple-testing rule, e.g. Bonferroni as
          :class:`DriftMonitor` does). Bin edges: ``edges`` when given (they must not depend on x or
          y, e.g. fixed on a separate part of the reference, otherwise the permuted statistics are not
          exchangeable with the observed one); else ``bin_edges(pooled, bins, binning=binning)`` on the
          pooled sample, a symmetric function of the pool and therefore exactly valid.
        * a callable ``statistic(x, y) -> array``: any statistic of the two samples (pass the same
          function object each time to avoid recompiling).

    Args:
        key: a ``jax.random`` key.
        x: reference sample (P), shape (n,) or (n, d).
        y: window sample (Q), shape (m,) or (m, d), same number of features.
        estimator: ``"knn"``, ``"histogram"`` or a callable, see above.
        num_permutations: B >= 1; the smallest attainable p-value is 1 / (B + 1).
        chunk_size: permutations evaluated together by ``vmap`` (memory and speed knob; does not change
            the result). None: 256 for ``"histogram"`` (one matmul per chunk), 4 for the ``"knn"``
            distance-matrix path (each permutation streams an (N, N) matrix; measured fastest on
            CPU), 64 otherwise.
        k: neighbour order for ``"knn"``.
        knn_estimator: ``estimator=`` passed to ``kljax.knn.kl``. The default ``"wkv"`` (Wang,
            Kulkarni and Verdu 2009, eq. 5) is the cheapest: a bias correction buys nothing in a
            permutation test, where every permuted statistic carries the same bias.
        knn_method: ``method=`` passed to ``kljax.knn.kl``; the default ``"brute"`` is pure JAX and
            vectorises over the permutations (a k-d tree would run them one by one on the host).
        bins: number of bins for ``"histogram"`` when ``edges`` is None.
        binning: ``"quantile"`` or ``"range"`` (see :func:`bin_edges`), when ``edges`` is None.
        edges: fixed bin edges, shape (bins + 1,) or (d, bins + 1), for ``"histogram"``.
        pseudocount: added to every histogram bin (see :func:`feature_histogram_kl`).

    Returns:
        ``(statistic, p_value)``: the KL estimate on the observed split and its p-value; scalars, or
        shape (d,) for the per-feature histogram statistic; dtype of ``x``. NaN under ``jit`` when an
        input has NaN.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import kl_permutation_test
        >>> kx, ky, kp = jax.random.split(jax.random.key(0), 3)
        >>> x = jax.random.normal(kx, (100, 2), jnp.float32)
        >>> y = jax.random.normal(ky, (50, 2), jnp.float32) + 1.5    # a clear shift
        >>> statistic, p_value = kl_permutation_test(kp, x, y, estimator="knn", num_permutations=99)
        >>> print(float(p_value))                                # 1 / (B + 1): no permutation beats it
        0.01
        >>> statistic, p_value = kl_permutation_test(kp, x, y, estimator="histogram",
        ...                                          num_permutations=99)
        >>> p_value.shape                                        # one p-value per feature
        (2,)

    References:
        B. Phipson and G. K. Smyth, "Permutation p-values should never be zero", Stat. Appl. Genet.
        Mol. Biol. 9(1), 2010, eq. 2. https://doi.org/10.2202/1544-6115.1585
        E. J. G. Pitman, "Significance tests which may be applied to samples from any populations",
        J. R. Stat. Soc. Suppl. 4(1), 1937.
    """
    if not callable(estimator) and estimator not in _ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {_ESTIMATORS} or a callable, got {estimator!r}.")
    num_permutations = check_int("num_permutations", num_permutations, 1)
    chunk_size = _default_chunk_size(estimator, knn_estimator) if chunk_size is None else chunk_size
    chunk_size = check_int("chunk_size", chunk_size, 1)
    x = _as_samples("x", x, min_rows=2)
    y = _as_samples("y", y, min_rows=1)
    if x.ndim != y.ndim or (x.ndim == 2 and x.shape[1] != y.shape[1]):
        raise ValueError(f"`x` and `y` must have the same number of features, got shapes {x.shape} and {y.shape}.")
    y = y.astype(x.dtype)
    check_eagerly("x", x, not_nan)
    check_eagerly("y", y, not_nan)

    if estimator == "histogram":
        check_eagerly("pseudocount", pseudocount, nonnegative)
        if edges is None:
            if binning not in _BINNINGS:
                raise ValueError(f"`binning` must be one of {_BINNINGS}, got {binning!r}.")
            check_int("bins", bins, 1)
            edges = _bin_edges(jnp.concatenate([x, y], axis=0), int(bins), binning)
        else:
            edges = _check_edges(edges, x.shape[1] if x.ndim == 2 else None, x.dtype)
            if (x.ndim == 2) != (edges.ndim == 2):
                raise ValueError(f"`x` of shape {x.shape} needs `edges` of shape (d, bins + 1), got {edges.shape}.")
        return _histogram_test(key, x, y, edges, jnp.asarray(pseudocount, x.dtype),
                               num_permutations=num_permutations, chunk_size=chunk_size)

    if estimator == "knn":
        k = check_int("k", k, 1)
        if x.shape[0] <= k or y.shape[0] < k:
            raise ValueError(f"`k`={k} needs more than k rows in `x` and at least k in `y`, "
                             f"got shapes {x.shape} and {y.shape}.")
        _check_no_duplicates(x, y, k)
    return _sample_test(key, x, y, estimator=estimator, k=k, knn_estimator=knn_estimator, knn_method=knn_method,
                        num_permutations=num_permutations, chunk_size=chunk_size)


def _default_chunk_size(estimator, knn_estimator) -> int:
    if estimator == "histogram":
        return 256
    if estimator == "knn" and knn_estimator == "wkv":
        return 4
    return 64


def _check_no_duplicates(x, y, k: int) -> None:
    """Eagerly: some re-split would put k copies of a point next to it (log 0) -> ValueError."""
    if not (is_concrete(x) and is_concrete(y)):
        return
    pooled = np.concatenate([np.asarray(x), np.asarray(y)]).reshape(x.shape[0] + y.shape[0], -1)
    copies = np.unique(pooled, axis=0, return_counts=True)[1].max()
    if copies > k:
        raise ValueError(
            f"the pooled sample (x, y) has a point with {copies} exact copies: for some re-splits its k-th "
            f"nearest-neighbour distance is 0 (k={k}) and the kNN statistic is undefined (log 0). Remove "
            "duplicates, add jitter, or raise `k` above the largest multiplicity.")


def _sample_test(key, x, y, *, estimator, k, knn_estimator, knn_method, num_permutations, chunk_size):
    """The "knn" and callable statistics; WKV takes the shared-distance-matrix path."""
    if estimator == "knn":
        if x.ndim == 1:
            x, y = x[:, None], y[:, None]
        if knn_estimator == "wkv":
            return _knn_wkv_test(key, x, y, k=k, num_permutations=num_permutations, chunk_size=chunk_size)
        estimator = _KnnStatistic(k, knn_estimator, knn_method)
    return _generic_test(key, x, y, statistic=estimator, num_permutations=num_permutations,
                         chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------------
# Stream monitor
# --------------------------------------------------------------------------------------------------


class WindowScore(NamedTuple):
    """What :meth:`DriftMonitor.score` reports for one window.

    Attributes:
        statistic: the KL estimate(s): shape (d,) per feature for ``"histogram"``, else the shape the
            statistic has (a scalar for ``"knn"``).
        p_value: the permutation p-value of each entry of ``statistic``.
        window_p_value: Bonferroni-combined p-value of the window, min(1, d * min_j p_j).
        significant: ``window_p_value <= alpha``.
    """

    statistic: jax.Array
    p_value: jax.Array
    window_p_value: jax.Array
    significant: jax.Array


class MonitorState(NamedTuple):
    """Stream state of a :class:`DriftMonitor`: consecutive significant windows so far and the alarm."""

    run_length: jax.Array
    alarm: jax.Array


def sustained_alarms(significant, consecutive: int) -> jax.Array:
    """Alarm at window t when windows t - consecutive + 1, ..., t were all significant.

    Args:
        significant: booleans over windows, shape (T,).
        consecutive: r >= 1 windows in a row needed to raise the alarm.

    Returns:
        Booleans, shape (T,).

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.drift import sustained_alarms
        >>> sustained_alarms(jnp.array([1, 0, 1, 1, 1, 0], bool), 2).tolist()
        [False, False, False, True, True, False]
    """
    consecutive = check_int("consecutive", consecutive, 1)
    return _sustained_alarms(jnp.asarray(significant, bool), consecutive)


@functools.partial(jax.jit, static_argnames="consecutive")
def _sustained_alarms(significant: jax.Array, consecutive: int) -> jax.Array:
    def step(run_length, s):
        run_length = jnp.where(s, run_length + 1, 0)
        return run_length, run_length >= consecutive

    return jax.lax.scan(step, jnp.zeros((), jnp.int32), significant)[1]


@jax.tree_util.register_pytree_node_class
class DriftMonitor:
    """Scores production windows against a fixed reference sample: KL statistic, p-value, alarm.

    Per window (level ``alpha``): a permutation test of reference vs window
    (:func:`kl_permutation_test`). With the per-feature ``"histogram"`` statistic the d feature
    p-values are combined by Bonferroni, p_window = min(1, d * min_j p_j), which keeps the chance of a
    false "significant" at most alpha whatever the dependence between features (pixels are strongly
    correlated, so no independence-based correction would be valid). Because permutation p-values are
    multiples of 1 / (B + 1), Bonferroni can only fire when d / (B + 1) <= alpha; the default B is
    chosen so that d / (B + 1) <= alpha / 5, and a smaller explicit B raises ``ValueError``.

    Over the stream: an alarm needs ``consecutive`` significant windows in a row. Each window has
    P(significant) <= alpha under no drift, so the per-window false-alarm probability is at most alpha
    for any dependence between windows, and about alpha ** consecutive when windows are independent
    given the reference (they all share the reference, which correlates them slightly; the tests and
    ``experiments/drift_monitor`` measure the rate). The price is a delay of consecutive - 1 windows
    after a real shift. We prefer this to alpha-spending over time (level alpha * 6 / (pi t)^2 at
    window t keeps the probability of any false alarm over an endless stream <= alpha, but the level
    and hence the power vanish as the stream ages, and B would have to grow like t^2 / alpha).

    Binning (``"histogram"``): the edges are fixed on the reference. So that the permuted statistics
    stay exchangeable with the observed one, the edges come from the even rows of the reference
    (``reference[0::2]``) and the test uses the odd rows (``reference[1::2]``), which are independent
    of the edges when the reference rows are i.i.d. Pass ``edges`` to use the whole reference.

    The monitor is a pytree (the reference and edges are its leaves), so it can be passed through
    ``jax.jit``; ``score``, ``update`` and ``run`` are pure.

    Args:
        reference: reference sample, shape (n,) or (n, d).
        estimator: ``"histogram"`` (per-feature), ``"knn"`` (multivariate) or a callable statistic.
        alpha: per-window significance level (after Bonferroni).
        consecutive: significant windows in a row needed for an alarm.
        num_permutations: B; default max(199, ceil(5 d / alpha) - 1) with d the number of p-values.
        chunk_size: permutations per vmapped chunk (None: as in :func:`kl_permutation_test`).
        k, knn_estimator, knn_method: for ``"knn"`` (see :func:`kl_permutation_test`).
        bins, binning, pseudocount: for ``"histogram"`` (see :func:`bin_edges`,
            :func:`feature_histogram_kl`).
        edges: fixed bin edges independent of the reference; then the whole reference is tested.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import DriftMonitor
        >>> key = jax.random.key(0)
        >>> reference = jax.random.normal(key, (400, 3), jnp.float32)
        >>> monitor = DriftMonitor(reference, estimator="histogram", alpha=0.05, bins=8)
        >>> monitor.num_permutations          # ceil(5 * 3 / 0.05) - 1, so that Bonferroni can fire
        299
        >>> window_keys = jax.random.split(jax.random.key(1), 6)
        >>> shifts = jnp.array([0.0, 0.0, 0.0, 2.0, 2.0, 2.0])
        >>> windows = jnp.stack([jax.random.normal(k, (100, 3), jnp.float32) + s for k, s in zip(window_keys, shifts)])
        >>> scores, alarms = monitor.run(jax.random.key(2), windows)
        >>> alarms.tolist()
        [False, False, False, False, True, True]

    References:
        C. E. Bonferroni, "Teoria statistica delle classi e calcolo delle probabilita", 1936;
        Rabanser, Guennemann and Lipton, "Failing loudly", NeurIPS 2019 (per-feature univariate tests
        with Bonferroni for dataset shift); Phipson and Smyth, 2010 (the p-value).
    """

    def __init__(self, reference, *, estimator="histogram", alpha: float = 0.05, consecutive: int = 2,
                 num_permutations: int | None = None, chunk_size: int | None = None, k: int = 1,
                 knn_estimator: str = "wkv", knn_method: str = "brute", bins: int = 10,
                 binning: str = "quantile", pseudocount: float = 0.5, edges=None):
        if not callable(estimator) and estimator not in _ESTIMATORS:
            raise ValueError(f"`estimator` must be one of {_ESTIMATORS} or a callable, got {estimator!r}.")
        if not 0 < alpha < 1:
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
        consecutive = check_int("consecutive", consecutive, 1)
        chunk_size = _default_chunk_size(estimator, knn_estimator) if chunk_size is None else chunk_size
        chunk_size = check_int("chunk_size", chunk_size, 1)
        reference = _as_samples("reference", reference, min_rows=2)
        check_eagerly("reference", reference, not_nan)
        num_features = 1 if reference.ndim == 1 else reference.shape[1]
        if estimator == "histogram":
            check_eagerly("pseudocount", pseudocount, nonnegative)
            if edges is None:
                if reference.shape[0] < 4:
                    raise ValueError("`reference` needs at least 4 rows (half fix the bins, half are tested).")
                edges = bin_edges(reference[0::2], bins, binning=binning)
                reference = reference[1::2]
            else:
                edges = _check_edges(edges, num_features if reference.ndim == 2 else None, reference.dtype)
            num_tests = num_features
        else:
            num_tests = 1  # "knn" is one multivariate test; a callable's output size is checked on first use
        if num_permutations is None:
            num_permutations = max(199, math.ceil(5 * num_tests / alpha) - 1)
        num_permutations = check_int("num_permutations", num_permutations, 1)
        _check_bonferroni_can_fire(num_tests, num_permutations, alpha)
        self.reference = reference
        self.edges = edges
        self.config = _MonitorConfig(estimator, float(alpha), consecutive, num_permutations, chunk_size,
                                     check_int("k", k, 1), knn_estimator, knn_method, float(pseudocount))

    # The pytree protocol: arrays are leaves, the configuration is static (hashable).
    def tree_flatten(self):
        return (self.reference, self.edges), self.config

    @classmethod
    def tree_unflatten(cls, config, leaves):
        monitor = object.__new__(cls)
        monitor.reference, monitor.edges = leaves
        monitor.config = config
        return monitor

    estimator = property(lambda self: self.config.estimator)
    alpha = property(lambda self: self.config.alpha)
    consecutive = property(lambda self: self.config.consecutive)
    num_permutations = property(lambda self: self.config.num_permutations)

    def _check_window(self, window) -> jax.Array:
        window = _as_samples("window", window)
        if window.ndim != self.reference.ndim or (window.ndim == 2 and window.shape[1] != self.reference.shape[1]):
            raise ValueError(f"`window` of shape {window.shape} does not match the reference's features "
                             f"(reference shape {self.reference.shape}).")
        check_eagerly("window", window, not_nan)
        return window.astype(self.reference.dtype)

    def score(self, key, window) -> WindowScore:
        """Permutation test of the reference against one window (no stream state).

        Args:
            key: a ``jax.random`` key.
            window: shape (m,) or (m, d), matching the reference.

        Returns:
            A :class:`WindowScore`.
        """
        window = self._check_window(window)
        if self.config.estimator == "knn":
            _check_no_duplicates(self.reference, window, self.config.k)
        return _score(self, key, window)

    def init(self) -> MonitorState:
        """The state before the first window: no run of significant windows, no alarm."""
        return MonitorState(jnp.zeros((), jnp.int32), jnp.zeros((), bool))

    def update(self, state: MonitorState, key, window) -> tuple[MonitorState, WindowScore]:
        """Scores the next window and updates the alarm (``consecutive`` significant in a row).

        Returns:
            ``(new_state, score)``; ``new_state.alarm`` is the alarm after this window.
        """
        score = self.score(key, window)
        run_length = jnp.where(score.significant, state.run_length + 1, 0)
        return MonitorState(run_length, run_length >= self.consecutive), score

    def run(self, key, windows) -> tuple[WindowScore, jax.Array]:
        """Scores a stream of equal-sized windows, shape (T, m) or (T, m, d), from a fresh state.

        Window t uses the key ``jax.random.split(key, T)[t]``. Eagerly the windows are scored one by
        one with the compiled :meth:`score`; under ``jit``/``vmap`` by one ``lax.map``; both give the
        same result.

        Returns:
            ``(scores, alarms)``: a :class:`WindowScore` whose fields have a leading T axis, and the
            alarm after each window, shape (T,).
        """
        windows = as_float_array("windows", windows)
        if windows.ndim != self.reference.ndim + 1:
            raise ValueError(f"`windows` must have shape (T,) + window shape, got {windows.shape} for "
                             f"reference shape {self.reference.shape}.")
        windows = self._check_window(windows.reshape((-1,) + windows.shape[2:])).reshape(windows.shape)
        keys = jax.random.split(key, windows.shape[0])
        if is_concrete(windows) and all(is_concrete(leaf) for leaf in jax.tree.leaves((self, keys))):
            rows = [self.score(window_key, window) for window_key, window in zip(keys, windows)]
            scores = jax.tree.map(lambda *fields: jnp.stack(fields), *rows)
        else:
            scores = jax.lax.map(lambda args: _score(self, *args), (keys, windows))
        return scores, sustained_alarms(scores.significant, self.consecutive)


class _MonitorConfig(NamedTuple):
    estimator: Any
    alpha: float
    consecutive: int
    num_permutations: int
    chunk_size: int
    k: int
    knn_estimator: str
    knn_method: str
    pseudocount: float


def _check_bonferroni_can_fire(num_tests: int, num_permutations: int, alpha: float) -> None:
    if num_tests / (num_permutations + 1) > alpha:
        raise ValueError(
            f"`num_permutations`={num_permutations} is too small: with {num_tests} Bonferroni-combined "
            f"p-values the smallest window p-value is {num_tests}/(B + 1) > alpha={alpha}, so the "
            f"monitor could never alarm. Use B >= {math.ceil(num_tests / alpha) - 1}.")


@jax.jit
def _score(monitor: DriftMonitor, key, window) -> WindowScore:
    config = monitor.config
    if config.estimator == "histogram":
        statistic, p_value = _histogram_test(
            key, monitor.reference, window, monitor.edges, jnp.asarray(config.pseudocount, window.dtype),
            num_permutations=config.num_permutations, chunk_size=config.chunk_size)
    else:
        statistic, p_value = _sample_test(key, monitor.reference, window, estimator=config.estimator, k=config.k,
                                          knn_estimator=config.knn_estimator, knn_method=config.knn_method,
                                          num_permutations=config.num_permutations, chunk_size=config.chunk_size)
    _check_bonferroni_can_fire(p_value.size, config.num_permutations, config.alpha)
    window_p_value = jnp.minimum(1, p_value.size * jnp.min(p_value)).astype(p_value.dtype)
    return WindowScore(statistic, p_value, window_p_value, window_p_value <= config.alpha)
