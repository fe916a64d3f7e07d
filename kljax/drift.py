"""Two-sample drift statistics: permutation tests of a reference against a window, and a stream monitor.

A drift check asks whether a production window ``y`` (m samples) still comes from the distribution of a
reference sample ``x`` (n samples). The statistic (a KL estimate, or a baseline such as the energy
distance) has an unknown null distribution, so the p-value comes from permutations of the pooled sample.

Rules.
    * The p-value is p = (1 + #{b : T_b >= T_obs}) / (1 + B). Under H0 the pooled points are
      exchangeable, the observed and the B re-split statistics are exchangeable, and
      P(p <= alpha) <= alpha for every alpha and B (Phipson & Smyth, 2010, eq. 2). Ties count as
      exceedances (conservative), within 64 eps (the observed and the re-split values come from
      differently batched programs). An observed +inf is exceeded by every permuted +inf, so a statistic
      that is +inf on every split gives p = 1, never a small p-value. A statistic fitted on part of the
      pool (``permuted_rows``: :class:`ClassifierKL`) is re-split over the other rows only, among
      themselves, which is exact conditionally on the fit.
    * Statistics are values: :class:`GaussianKL`, :class:`ClassifierKL`, :class:`KnnKL`,
      :class:`KnnGraphKL`, :class:`HistogramKL`, :class:`CategoricalKL`, :class:`EnergyDistance`, or any
      callable ``statistic(x, y) -> array``. A statistic value
      ``prepare``\\ s the pooled sample once (distances, neighbour lists, bins) and ``evaluate``\\ s a
      batch of re-labellings of it, so a permutation never recomputes what does not depend on the labels.
      The permutation core (:func:`permutation_test`) is the same for all.
    * Bad values: eagerly (concrete inputs) NaN or +-inf samples raise ``ValueError`` naming the argument;
      under ``jit`` they give a NaN statistic and a NaN p-value. Too few rows for a statistic is a shape
      problem and raises at trace time as well.
    * Several p-values (one per feature): :func:`adjust_p_values` (Bonferroni, valid under any dependence;
      Benjamini-Hochberg, whose smallest adjusted value is Simes' global p-value, valid under positive
      dependence). The window's p-value is the smallest adjusted one.
    * Stream alarms: an alarm needs ``consecutive`` = r significant windows in a row. The significance of a
      window whose p-value is NaN (possible only under ``jit``) is *unknown*, and the alarm follows
      Kleene's three-valued logic: 1.0 when the last r windows are all significant, 0.0 when one of them
      is not, NaN (unknown) otherwise. An unscorable window neither resets nor extends the run silently.
      With per-window level alpha and independent windows, the expected number of windows to the first
      false alarm is ARL_0 = (1 - alpha^r) / ((1 - alpha) alpha^r) (the waiting time for r successes in a
      row; 420 windows at alpha = 0.05, r = 2); :func:`expected_windows_to_false_alarm`. Windows share
      the reference, which correlates them; ``experiments/drift_monitor`` measures the rate.

Statistics:
    * :class:`GaussianKL` (``estimator="gaussian"``): the KL between the Gaussians fitted to each sample
      (means and ridge-shrunk covariances of the pooled-standardised data), the regularised Hotelling
      T^2 plus a covariance term; exact permutations, O(N d^2 + d^3) per re-split. Of the KL statistics
      measured (this, classifier KL, kNN KL with k = 10) it had the most power in most settings (README,
      "Choices that matter"); against the energy distance it wins on scale and correlation shifts and
      loses on mixture-weight and sparse shifts, and it is blind to changes that keep the first two
      moments. It is not the default of :func:`kl_permutation_test` (API.md fixes ``"knn"``, and the
      statistic is the KL of the Gaussian fits, not of the data).
    * :class:`KnnGraphKL` (``estimator="knn_graph"``): the plug-in KL of the density ratio read off the
      pooled kNN graph (each point's counts of x- and y-labelled points among its K = N / 3 nearest,
      with a pseudocount), both directions by default. A permutation relabels a fixed graph: O(N K) per
      re-split. Shrunk towards 0 (a detector, not an estimate of the divergence); of the KL statistics
      measured it comes closest to the energy distance's power across the suite.
    * :class:`ClassifierKL`: a logistic classifier fitted on half of the pool, D read off its held-out
      logits; the permutations re-label the held-out half with the classifier fixed (Lopez-Paz & Oquab
      2017), so a re-split costs O(N).
    * :class:`KnnKL`: the Wang-Kulkarni-Verdu (2009, eq. 5) k-nearest-neighbour estimate of D(P_x || P_y)
      (optionally symmetrised, D(P_x||P_y) + D(P_y||P_x)). Fast permutation path for any k: a re-split
      only relabels the pooled points, so each point's neighbour list in the pool (K entries, from
      :func:`kljax.knn.neighbors`, or a top-k of the exact distance matrix for long lists) is computed
      once, and per re-split the k-th nearest point labelled x and labelled y are read off the list with
      a running count of labels (32 re-splits at a time, packed in the bits of a word): O(N K) per
      permutation, whatever d. K is chosen so that a random relabelling leaves fewer than k points of
      one label in a list with probability about 1e-9 per point; when it happens, those points are
      searched afresh by brute force, so the result never depends on K. The observed split is read from
      :func:`kljax.knn.neighbors` directly.
    * :class:`HistogramKL`: per-feature (marginal) histogram KL on fixed bin edges with a pseudocount
      (:func:`bin_edges`, :func:`feature_histogram_kl`); one p-value per feature.
    * :class:`CategoricalKL`: per-feature KL of category frequencies; codes outside the known
      categories (unseen categories) share one extra bin, so a new category is counted, not dropped.
    * :class:`EnergyDistance`: the energy distance of Szekely & Rizzo (2004), the baseline test; one
      (N, N) distance matrix for all permutations.

References:
    B. Phipson and G. K. Smyth, "Permutation p-values should never be zero: calculating exact p-values
    when permutations are randomly drawn", Statistical Applications in Genetics and Molecular Biology
    9(1), 2010. https://doi.org/10.2202/1544-6115.1585
    Q. Wang, S. R. Kulkarni and S. Verdu, "Divergence estimation for multidimensional densities via
    k-nearest-neighbor distances", IEEE Trans. Inf. Theory 55(5), 2009.
    G. J. Szekely and M. L. Rizzo, "Testing for equal distributions in high dimension", InterStat, 2004.
    Y. Benjamini and Y. Hochberg, "Controlling the false discovery rate", JRSS B 57(1), 1995;
    R. J. Simes, "An improved Bonferroni procedure for multiple tests of significance", Biometrika 73, 1986.
    S. Rabanser, S. Guennemann and Z. Lipton, "Failing loudly: an empirical study of methods for
    detecting dataset shift", NeurIPS 2019. https://arxiv.org/abs/1810.11953
    S. C. Kleene, "Introduction to Metamathematics", 1952 (three-valued logic).
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax.scipy.special import digamma

from kljax import discrete, knn
from kljax._contract import (as_float_array, check_eagerly, check_int, host_values, is_concrete, nonnegative,
                             not_nan, positive, real)

__all__ = [
    "CategoricalKL",
    "ClassifierKL",
    "DriftMonitor",
    "EnergyDistance",
    "GaussianKL",
    "HistogramKL",
    "KnnGraphKL",
    "KnnKL",
    "MonitorState",
    "WindowScore",
    "adjust_p_values",
    "bin_edges",
    "bin_indices",
    "energy_distance",
    "expected_windows_to_false_alarm",
    "feature_histogram_kl",
    "kl_permutation_test",
    "permutation_test",
    "sustained_alarms",
]

_BINNINGS = ("quantile", "range")
_CORRECTIONS = ("bonferroni", "bh")
_ESTIMATORS = ("gaussian", "classifier", "knn", "knn_graph", "histogram", "energy")
#: neighbour order of the default kNN statistic (chosen by measured power; see KnnKL)
DEFAULT_K = 10


# --------------------------------------------------------------------------------------------------
# Input checks shared by every entry point
# --------------------------------------------------------------------------------------------------


def _as_samples(name: str, x, *, min_rows: int = 1) -> jax.Array:
    x = as_float_array(name, x)
    if x.ndim not in (1, 2):
        raise ValueError(f"`{name}` must have shape (n,) or (n, d), got {x.shape}.")
    if x.shape[0] < min_rows:
        raise ValueError(f"`{name}` needs at least {min_rows} samples (rows), got shape {x.shape}.")
    return x


def _as_pair(x, y, x_name="x", y_name="y") -> tuple[jax.Array, jax.Array]:
    """Two samples with the same features, ``y`` cast to ``x``'s dtype, finite (checked eagerly)."""
    x = _as_samples(x_name, x)
    y = _as_samples(y_name, y)
    if x.ndim != y.ndim or (x.ndim == 2 and x.shape[1] != y.shape[1]):
        raise ValueError(f"`{x_name}` and `{y_name}` must have the same number of features, got shapes "
                         f"{x.shape} and {y.shape}.")
    check_eagerly(x_name, x, real)
    check_eagerly(y_name, y, real)
    return x, y.astype(x.dtype)


def _not_finite(*arrays) -> jax.Array:
    return functools.reduce(jnp.logical_or, [jnp.any(~jnp.isfinite(a)) for a in arrays])


# --------------------------------------------------------------------------------------------------
# Bins
# --------------------------------------------------------------------------------------------------


def bin_edges(reference, bins: int = 10, *, binning: str = "quantile") -> jax.Array:
    """Bin edges for each feature, fixed on a reference sample.

    ``binning="quantile"`` puts the edges at the reference's empirical quantiles 0, 1/bins, ..., 1, so
    every bin holds about n / bins reference points; with tied values several edges coincide and the
    bins between them stay empty, which the pseudocount of :func:`feature_histogram_kl` handles.
    ``binning="range"`` spaces the edges evenly between the reference's minimum and maximum. The
    reference must be finite (eagerly ``ValueError``; under ``jit`` the edges of a feature with a
    non-finite value are NaN).

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
    bins = check_int("bins", bins, 1)
    if binning not in _BINNINGS:
        raise ValueError(f"`binning` must be one of {_BINNINGS}, got {binning!r}.")
    check_eagerly("reference", reference, real)
    return _bin_edges(reference, bins, binning)


@functools.partial(jax.jit, static_argnames=("bins", "binning"))
def _bin_edges(reference: jax.Array, bins: int, binning: str) -> jax.Array:
    levels = jnp.linspace(0.0, 1.0, bins + 1, dtype=reference.dtype)
    if binning == "quantile":
        edges = jnp.quantile(reference, levels, axis=0)
    else:
        low, high = jnp.min(reference, axis=0, keepdims=True), jnp.max(reference, axis=0, keepdims=True)
        edges = low + jnp.expand_dims(levels, tuple(range(1, reference.ndim))) * (high - low)
    bad = jnp.any(~jnp.isfinite(reference), axis=0)  # per feature
    edges = jnp.where(bad, jnp.nan, edges)
    return edges.T if reference.ndim == 2 else edges


def _check_edges(edges, num_features: int | None, dtype, two_dimensional: bool) -> jax.Array:
    """Validates edges of shape (bins + 1,) (one feature) or (d, bins + 1)."""
    edges = as_float_array("edges", edges).astype(dtype)
    if edges.ndim not in (1, 2) or edges.shape[-1] < 2:
        raise ValueError(f"`edges` must have shape (bins + 1,) or (d, bins + 1) with bins >= 1, got {edges.shape}.")
    if edges.ndim == 2 and num_features is not None and edges.shape[0] != num_features:
        raise ValueError(f"`edges` has {edges.shape[0]} rows but the samples have {num_features} features.")
    if (edges.ndim == 2) != two_dimensional:
        raise ValueError(f"samples of {'(n, d)' if two_dimensional else '(n,)'} shape need `edges` of shape "
                         f"{'(d, bins + 1)' if two_dimensional else '(bins + 1,)'}, got {edges.shape}.")
    check_eagerly("edges", edges, real)
    values = host_values(edges)  # NumPy: closed-over edges are concrete inside a jit trace too
    if values is not None and (np.diff(values, axis=-1) < 0).any():
        raise ValueError("`edges` must be non-decreasing along the last axis.")
    return edges


def _edges_valid(edges: jax.Array) -> jax.Array:
    """Per feature (the leading axes): finite and non-decreasing (the traced counterpart of _check_edges)."""
    return jnp.all(jnp.isfinite(edges), axis=-1) & jnp.all(jnp.diff(edges, axis=-1) >= 0, axis=-1)


def bin_indices(x, edges) -> jax.Array:
    """Bin index of every value, with out-of-range values sent to the edge bins.

    Bin b is [edges[b], edges[b + 1]) as in ``numpy.histogram``, except that values below
    ``edges[0]`` join bin 0 and values at or above ``edges[-1]`` join the last bin (numpy would drop
    the ones outside): a drifted window must not lose its most drifted points.

    Invalid input. Indices are integers and cannot be NaN, so the rule is: eagerly a NaN in ``x`` or
    NaN/inf/decreasing ``edges`` raise ``ValueError``; under ``jit`` a NaN value gets index -1, and
    every value of a feature whose edges are invalid gets -1. (+-inf values are valid: they go to the
    edge bins.)

    Args:
        x: samples, shape (n,) with 1-D ``edges`` or (n, d) with ``edges`` of shape (d, bins + 1).
        edges: non-decreasing finite bin edges, e.g. from :func:`bin_edges`.

    Returns:
        int32 indices in [0, bins) (or -1 for an invalid value under ``jit``), shape of ``x``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.drift import bin_indices
        >>> bin_indices(jnp.array([-5.0, 0.0, 0.5, 1.0, 2.0, 9.0]), jnp.array([0.0, 1.0, 2.0, 3.0])).tolist()
        [0, 0, 0, 1, 2, 2]
    """
    x = _as_samples("x", x)
    edges = _check_edges(edges, x.shape[1] if x.ndim == 2 else None, x.dtype, x.ndim == 2)
    check_eagerly("x", x, not_nan)
    return _bin_indices(x, edges)


@jax.jit
def _bin_indices(x: jax.Array, edges: jax.Array) -> jax.Array:
    def one_feature(values, feature_edges):
        # Only the interior edges are searched: everything left of edges[1] is bin 0, everything at or
        # right of edges[-2] is the last bin. side="right" makes bins closed on the left.
        index = jnp.searchsorted(feature_edges[1:-1], values, side="right").astype(jnp.int32)
        return jnp.where(jnp.isnan(values) | ~_edges_valid(feature_edges), -1, index)

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
    biases D_j towards 0 by O(B a / m), which a permutation test absorbs.

    Args:
        x: reference samples (P), shape (n,) or (n, d).
        y: window samples (Q), shape (m,) or (m, d), same number of features as ``x``.
        edges: bin edges, shape (bins + 1,) or (d, bins + 1), e.g. ``bin_edges(reference)``.
        pseudocount: a >= 0 added to every bin count (0 gives the plug-in estimate, possibly +inf).

    Returns:
        KL in nats, a scalar for 1-D input, else shape (d,); dtype of ``x``. NaN under ``jit`` for
        NaN samples, a negative pseudocount, or NaN/decreasing edges (of that feature).

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
    edges = _check_edges(edges, x.shape[1] if x.ndim == 2 else None, x.dtype, x.ndim == 2)
    check_eagerly("x", x, not_nan)
    check_eagerly("y", y, not_nan)
    check_eagerly("pseudocount", pseudocount, nonnegative)
    return _feature_histogram_kl(x, y, edges, jnp.asarray(pseudocount, x.dtype))


@jax.jit
def _feature_histogram_kl(x, y, edges, pseudocount):
    bins = edges.shape[-1] - 1
    counts_x = jnp.sum(jax.nn.one_hot(_bin_indices(x, edges), bins, dtype=x.dtype), axis=0)
    counts_y = jnp.sum(jax.nn.one_hot(_bin_indices(y, edges), bins, dtype=x.dtype), axis=0)
    result = _smoothed_kl(counts_x, counts_y, pseudocount)
    valid = (~jnp.any(jnp.isnan(x), axis=0) & ~jnp.any(jnp.isnan(y), axis=0) & _edges_valid(edges)
             & (pseudocount >= 0))
    return jnp.where(valid, result, jnp.nan)


# --------------------------------------------------------------------------------------------------
# Statistics as values
# --------------------------------------------------------------------------------------------------
#
# A statistic value has
#   check(x, y)               static and eager checks (rows, duplicates, options); raises ValueError;
#   prepare(x, y) -> data     (inside jit) everything that depends on the pooled points only;
#   evaluate(data, is_x)      statistics for a batch of labellings is_x, bool (batch, N), each with n True;
#   valid(x, y) -> mask       (inside jit) False where the statistic is undefined (NaN out).
# Any other callable statistic(x, y) is wrapped by _Callable.


def _labels_to_rows(is_x: jax.Array) -> jax.Array:
    """Row order putting the points labelled x first (stable), for statistics that need the samples."""
    return jnp.argsort(~is_x, stable=True)


@functools.partial(jax.tree_util.register_dataclass, data_fields=(), meta_fields=("k", "symmetric"))
@dataclasses.dataclass(frozen=True)
class KnnKL:
    """The k-nearest-neighbour KL estimate D(P_x || P_y) (Wang, Kulkarni & Verdu 2009, eq. 5) as a statistic.

        D = d / n sum_{i in x} log(nu_k(i) / rho_k(i)) + log(m / (n - 1)),

    rho_k(i) the distance from x_i to its k-th nearest other point of x, nu_k(i) to its k-th nearest
    point of y; it equals ``kljax.knn.kl(x, y, k=k, estimator="wkv")``. ``symmetric=True`` adds the
    same estimate of D(P_y || P_x) (Jeffreys divergence), which also sees a window that fills in a
    region the reference lacks. Larger k trades bias (which a permutation test absorbs: every permuted
    statistic carries the same) for variance, hence power; the default, k = min(``DEFAULT_K`` = 10,
    n - 1, m - 1), was chosen by measured power (k = 10 roughly doubles the power of k = 1 on a small
    mean shift).

    Ties follow ``kljax.knn``'s ``ties="auto"`` rule (WKV 2009, Sec. III): a point with ``c`` exact
    copies among its own label counts them as neighbours, uses the first positive distance (order
    ``k + c``) and ``psi(k + c)`` for ``psi(k)``; likewise towards the other label; so continuous data
    that float rounding made tied are scored, for the observed split and every re-split alike. Pooled
    data that look discrete (more than 10% of the points with a copy, or a point with more than 8
    copies) are refused eagerly and give NaN under jit.

    Attributes:
        k: neighbour order >= 1, or None for min(DEFAULT_K, n - 1, m - 1).
        symmetric: add D(P_y || P_x).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import KnnKL, permutation_test
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (200, 2))
        >>> y = jax.random.normal(ky, (100, 2)) + 1.0
        >>> statistic, p_value = permutation_test(jax.random.key(1), KnnKL(k=5), x, y, num_permutations=99)
        >>> float(p_value)
        0.01

    References:
        Q. Wang, S. R. Kulkarni and S. Verdu, IEEE Trans. Inf. Theory 55(5), 2009, eq. 5.
    """

    k: int | None = None
    symmetric: bool = False

    def __post_init__(self):
        if self.k is not None:
            check_int("k", self.k, 1)

    def order(self, n: int, m: int) -> int:
        """The neighbour order used for samples of n and m rows: ``k``, or for ``k=None``
        min(DEFAULT_K, n - 1, m - 1) (at least 1), the largest the samples allow up to the default."""
        if self.k is not None:
            return self.k
        return max(1, min(DEFAULT_K, n - 1, m - 1))

    def check(self, x, y) -> None:
        n, m = x.shape[0], y.shape[0]
        k = self.order(n, m)
        if n <= k or m < k or (self.symmetric and m <= k):
            need = "more than k rows in `x` and `y`" if self.symmetric else "more than k rows in `x` and k in `y`"
            raise ValueError(f"`k`={k} needs {need}, got shapes {x.shape} and {y.shape}.")
        _check_continuous(x, y)

    def list_length(self, n: int, m: int) -> int:
        """K, the neighbours kept per pooled point: a random relabelling leaves fewer than k of the rarer
        label among K neighbours with probability ~1e-9 (the count is about Binomial(K, min(n, m) / N))."""
        k = self.order(n, m)
        needed = k + 6 * math.sqrt(k) + 12
        # + the copies a point may have at distance 0 before its positive neighbours
        return min(n + m - 1, math.ceil(needed * (n + m) / min(n, m)) + _MAX_COPIES)

    def prepare(self, x, y):
        x, y = (x[:, None], y[:, None]) if x.ndim == 1 else (x, y)
        x, y = jnp.where(jnp.isfinite(x), x, 0), jnp.where(jnp.isfinite(y), y, 0)  # bad input: NaN (valid)
        pooled = jnp.concatenate([x, y], axis=0)
        length = self.list_length(x.shape[0], y.shape[0])
        distances, indices = _pooled_lists(pooled, length)
        # the tie policy's limits, from the pooled lists (label-free: the same for every split); under
        # jit, where check() cannot run, data beyond them give NaN
        discrete = _looks_discrete(distances)
        return x, y, pooled, distances, indices, self.order(x.shape[0], y.shape[0]), discrete

    def observe(self, data):
        """The observed split, directly from kljax.knn.neighbors (exact whatever the list length)."""
        x, y, _, _, _, k, discrete = data
        n, m = x.shape[0], y.shape[0]

        def kth_positive(queries, refs, exclude_self):
            # the k-th neighbour at a positive distance, and the copies (zero distances) before it
            available = refs.shape[0] - int(exclude_self)
            found = knn.neighbors(queries, refs, min(k + _MAX_COPIES, available), exclude_self=exclude_self,
                                  method="brute")[0]
            copies = jnp.sum(found == 0, axis=1)
            position = copies + k - 1
            picked = jnp.take_along_axis(found, jnp.minimum(position, found.shape[1] - 1)[:, None], axis=1)[:, 0]
            return jnp.where(position < found.shape[1], picked, jnp.nan), copies

        own_x, copies_own_x = kth_positive(x, x, True)
        other_x, copies_other_x = kth_positive(x, y, False)
        if self.symmetric:
            own_y, copies_own_y = kth_positive(y, y, True)
            other_y, copies_other_y = kth_positive(y, x, False)
        else:  # y's rows do not enter the statistic
            own_y = other_y = jnp.ones(m, x.dtype)
            copies_own_y = copies_other_y = jnp.zeros(m, copies_own_x.dtype)
        is_x = jnp.arange(n + m) < n
        value = self._value(jnp.concatenate([own_x, own_y]), jnp.concatenate([other_x, other_y]), is_x, x.shape[1],
                            jnp.concatenate([copies_own_x, copies_own_y]),
                            jnp.concatenate([copies_other_x, copies_other_y]), k)
        return jnp.where(discrete, jnp.nan, value)

    def evaluate(self, data, is_x):
        *_, pooled, distances, indices, k, discrete = data
        # The lists answer almost every re-split; a re-split with a list short of k points of a label
        # (probability ~1e-9 per point) is patched by a brute-force search of those points. The branch
        # is taken for the whole batch, so the patch costs nothing when it is not needed.
        own, other, copies_own, copies_other, incomplete = self._list_positions(distances, indices, is_x, k)
        d = pooled.shape[1]
        values = jax.vmap(lambda *row: self._value(*row[:3], d, *row[3:], k))(
            own, other, is_x, copies_own, copies_other)
        values = jax.lax.cond(
            jnp.any(incomplete),
            lambda: jax.vmap(lambda *row: self._patched(pooled, *row, k))(
                is_x, own, other, copies_own, copies_other, incomplete),
            lambda: values)
        return jnp.where(discrete, jnp.nan, values)

    def valid(self, x, y):
        return ~_not_finite(x, y)

    def _value(self, own, other, is_x, d, copies_own, copies_other, k):
        """WKV (eq. 5) from each point's k-th positive distance to its own label (own) and to the other
        (other), with psi(k + copies_own) - psi(k + copies_other) for the copies skipped (Sec. III)."""
        n = jnp.sum(is_x).astype(own.dtype)
        m = is_x.shape[0] - n
        relevant = is_x | self.symmetric
        safe_own, safe_other = jnp.where(relevant, own, 1), jnp.where(relevant, other, 1)
        order_correction = (digamma((k + copies_own).astype(own.dtype)) - digamma((k + copies_other).astype(own.dtype))
                            ) / jnp.maximum(d, 1)
        log_ratio = jnp.where(relevant, jnp.log(safe_other) - jnp.log(safe_own) + order_correction, 0)
        value = d * jnp.sum(jnp.where(is_x, log_ratio, 0)) / n + jnp.log(m) - jnp.log(n - 1)
        if self.symmetric:
            value = value + d * jnp.sum(jnp.where(is_x, 0, log_ratio)) / m + jnp.log(n) - jnp.log(m - 1)
        zero = jnp.any(relevant & ((own == 0) | (other == 0)))
        return jnp.where(zero, jnp.nan, value).astype(own.dtype)

    def _list_positions(self, distances, indices, is_x, k):
        """Per re-split and pooled point (``is_x``: (B, N) labels), from the point's list: the k-th
        positive distance to its own label and to the other, the copies (zero distances) of each label
        before them, and whether the list was too short; each (B, N).

        One pass over the K columns of the lists with running counts, O(B N K) and nothing of size
        (B, N, K) built: XLA:CPU lowers ``cumsum`` over the lists to a windowed sum, O(N K^2). The labels
        of 32 re-splits are packed into the bits of one uint32 per point, so the list entries' labels are
        one gather of (B / 32, N, K) words before the pass, not a gather per re-split and column inside
        it (2-4x faster)."""
        batch, size = is_x.shape
        length = distances.shape[1]
        groups = -(-batch // 32)
        labels = jnp.zeros((groups * 32, size), bool).at[:batch].set(is_x).reshape(groups, 32, size)
        bits = jnp.arange(32, dtype=jnp.uint32)[None, :, None]
        packed = jnp.sum(labels.astype(jnp.uint32) << bits, axis=1, dtype=jnp.uint32)  # (groups, N)
        listed = jnp.moveaxis(packed[:, indices], 2, 0)  # (K, groups, N): column j's labels, 32 re-splits a word
        zeros, not_found = jnp.zeros(labels.shape, jnp.int32), jnp.full(labels.shape, length, jnp.int32)

        def step(carry, column):
            own_count, own_position, other_count, other_position, copies_own, copies_other = carry
            word, distance, position = column
            same = (((word[:, None, :] >> bits) & 1) == 1) == labels  # neighbour `position` has the point's label
            zero = (distance == 0)[None, None, :]  # exact copies: counted, not used (knn's ties="auto")
            own, other = same & ~zero, ~same & ~zero
            own_count, other_count = own_count + own, other_count + other
            own_position = jnp.where(own & (own_count == k), position, own_position)
            other_position = jnp.where(other & (other_count == k), position, other_position)
            return (own_count, own_position, other_count, other_position, copies_own + (same & zero),
                    copies_other + (~same & zero)), None

        columns = (listed, distances.T, jnp.arange(length, dtype=jnp.int32))
        carry = jax.lax.scan(step, (zeros, not_found, zeros, not_found, zeros, zeros), columns)[0]
        _, own_position, _, other_position, copies_own, copies_other = (
            part.reshape(groups * 32, size)[:batch] for part in carry)

        def pick(position):
            return jnp.take_along_axis(distances[None], jnp.minimum(position, length - 1)[..., None], axis=2)[..., 0]

        relevant = is_x | self.symmetric
        incomplete = relevant & ((own_position >= length) | (other_position >= length))
        return pick(own_position), pick(other_position), copies_own, copies_other, incomplete

    def _patched(self, pooled, is_x, own, other, copies_own, copies_other, incomplete, k):
        """One re-split's statistic after patching the points whose list had fewer than k points of a
        label (probability ~1e-9 per point, whatever the data: the labels are a uniform relabelling of
        fixed lists) by a brute-force search, for up to _PATCHED_ROWS points; more than that (probability
        < 1e-40) gives NaN, never a wrong number."""
        rows = jnp.nonzero(incomplete, size=_PATCHED_ROWS, fill_value=0)[0]
        patch = jax.vmap(lambda row: self._brute_row(pooled, is_x, row, k))(rows)
        own, other, copies_own, copies_other = (
            current.at[rows].set(jnp.where(incomplete[rows], patched.astype(current.dtype), current[rows]))
            for current, patched in zip((own, other, copies_own, copies_other), patch))
        value = self._value(own, other, is_x, pooled.shape[1], copies_own, copies_other, k)
        return jnp.where(jnp.sum(incomplete) > _PATCHED_ROWS, jnp.nan, value)

    @staticmethod
    def _brute_row(pooled, is_x, row, k):
        """Exact k-th positive distances of one point to the other points of its label and of the other
        label, and its copies (zero distances) in each."""
        distance = jnp.sqrt(jnp.sum((pooled - pooled[row][None, :]) ** 2, axis=-1))
        distance = jnp.where(jnp.arange(pooled.shape[0]) == row, jnp.inf, distance)
        same = is_x == is_x[row]
        zero = distance == 0
        own = -jax.lax.top_k(-jnp.where(same & ~zero, distance, jnp.inf), k)[0][-1]
        other = -jax.lax.top_k(-jnp.where(~same & ~zero, distance, jnp.inf), k)[0][-1]
        return own, other, jnp.sum(same & zero), jnp.sum(~same & zero)


_PATCHED_ROWS = 4


# knn's tie policy (ties="auto"): the most tied points and copies per point continuous data may show
_MAX_TIED_FRACTION = 0.1
_MAX_COPIES = 8


def _check_continuous(x, y) -> None:
    """Eagerly refuses pooled samples that look discrete (the kNN statistics' tie policy)."""
    if not (is_concrete(x) and is_concrete(y)):
        return
    pooled = np.concatenate([np.asarray(x), np.asarray(y)]).reshape(x.shape[0] + y.shape[0], -1)
    _, inverse, counts = np.unique(pooled, axis=0, return_inverse=True, return_counts=True)
    tied = np.mean(counts[inverse.reshape(-1)] > 1)
    if tied > _MAX_TIED_FRACTION or counts.max() - 1 > _MAX_COPIES:
        raise ValueError(
            f"`x` and `y` look discrete: pooled, {tied:.0%} of the points have an exact copy and one "
            f"has {counts.max() - 1} copies (continuous data tied by rounding stay below "
            f"{_MAX_TIED_FRACTION:.0%} and {_MAX_COPIES}). The kNN statistics need continuous data: use "
            "estimator='histogram' (or CategoricalKL) for discrete features, or add jitter.")


def _looks_discrete(distances: jax.Array) -> jax.Array:
    """The traced counterpart of _check_continuous, from the pooled neighbour distances (label-free)."""
    copies = jnp.sum(distances[:, :_MAX_COPIES + 1] == 0, axis=1)
    return (jnp.mean((copies > 0).astype(distances.dtype)) > _MAX_TIED_FRACTION) | jnp.any(copies > _MAX_COPIES)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("pseudocount",),
                   meta_fields=("neighbors", "symmetric"))
@dataclasses.dataclass(frozen=True)
class KnnGraphKL:
    """The plug-in KL of the pooled kNN graph's density ratio (a kNN-classifier KL) as a statistic.

    Every pooled point z_i gets its K nearest other pooled points (the kNN graph, built once by
    :func:`kljax.knn.neighbors`, or for K > N / 16 and N <= 8192 by a top-k of the exact distance matrix); c_x(i) and c_y(i) = K - c_x(i) count those labelled x and y. The
    ratio of the two counts, each over the other points of its label, estimates p_x / p_y at z_i, and

        D = 1/n sum_{i in x} log[(c_x(i) + a) / (c_y(i) + a)] + log(m / (n - 1)),

    a = ``pseudocount`` > 0. ``symmetric=True`` (the default) adds the same estimate of D(P_y || P_x)
    over the points of y, 1/m sum_{j in y} log[(c_y(j) + a) / (c_x(j) + a)] + log(n / (m - 1)).
    A re-split only relabels the pool, so the graph is fixed and a permutation costs O(N K) (the counts
    are one product of the labels with the graph's adjacency matrix), whatever d.

    What it estimates, honestly: the KL of the kNN-smoothed densities, not D(P_x || P_y) itself, and it is
    shrunk towards 0: the pseudocount pulls every ratio towards 1 (by O(a / K)), and each count averages
    the ratio over a K-neighbourhood, a smoothing bias that grows with K / N. It is a detector, not an
    estimate of the divergence (use ``kljax.knn.kl`` for that). Each point's K labels make its log-odds
    far less noisy than WKV's one distance per label (:class:`KnnKL`), hence the power. The default
    K = round(N / 3) and ``symmetric=True`` were chosen by measured power on ``benchmarks.drift_power``'s
    suite (K from N / 8 to N / 2 and 10 to 150 at N = 600): broad shifts (mean, mixture weight) want a
    large K; the one-directional form had far less power on mean and mixture shifts (at most 0.27 for K
    from 10 to 150, against 0.77, on the 2-D mean shift at n = m = 300) but more on scale shifts; K = N - 1 would make every count
    equal. Memory: the graph is (N, K) indices, and for K > N / 16 a dense (N, N) adjacency matrix
    (O(N^2), as :class:`EnergyDistance`); pass a small ``neighbors`` for very large N.

    Validity: the graph is a function of the pooled points, the same for every split, so the permutation
    p-value is exact except where distances tie at a list's end (broken by pooled index, which follows the
    labels); continuous data tie with probability 0, and pooled samples that look discrete are refused as
    for :class:`KnnKL` (eagerly ``ValueError``, NaN under ``jit``).

    Attributes:
        neighbors: K >= 1, or None for round(N / 3); at most N - 1.
        pseudocount: a > 0 added to each count.
        symmetric: add the estimate of D(P_y || P_x) (default True).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import KnnGraphKL, permutation_test
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (300, 2))
        >>> y = jax.random.normal(ky, (300, 2)) + 1.0
        >>> statistic, p_value = permutation_test(jax.random.key(1), KnnGraphKL(), x, y, num_permutations=99)
        >>> float(p_value)
        0.01

    References:
        M. F. Schilling, "Multivariate two-sample tests based on nearest neighbors", JASA 81(395), 1986
        (the pooled kNN graph's label counts as a two-sample statistic); D. Lopez-Paz and M. Oquab,
        "Revisiting classifier two-sample tests", ICLR 2017 (a classifier's log-odds as the statistic);
        Q. Wang, S. R. Kulkarni and S. Verdu, IEEE Trans. Inf. Theory 55(5), 2009 (the kNN KL it smooths).
    """

    neighbors: int | None = None
    pseudocount: Any = 0.5
    symmetric: bool = True

    def __post_init__(self):
        if self.neighbors is not None:
            check_int("neighbors", self.neighbors, 1)

    def list_length(self, n: int, m: int) -> int:
        """K for samples of n and m rows: ``neighbors`` or round((n + m) / 3), at most n + m - 1."""
        size = n + m
        wanted = self.neighbors if self.neighbors is not None else round(size / 3)
        return max(1, min(wanted, size - 1))

    def check(self, x, y) -> None:
        if x.shape[0] < 2 or (self.symmetric and y.shape[0] < 2):
            name = "x" if x.shape[0] < 2 else "y"
            raise ValueError(f"`{name}` needs at least 2 rows for the kNN graph statistic, got shapes {x.shape} "
                             f"and {y.shape}.")
        check_eagerly("pseudocount", self.pseudocount, positive)
        _check_continuous(x, y)

    def prepare(self, x, y):
        n, m = x.shape[0], y.shape[0]
        pooled = jnp.concatenate([x, y], axis=0).reshape(n + m, -1)
        pooled = jnp.where(jnp.isfinite(pooled), pooled, 0)  # bad input: NaN (valid)
        length = self.list_length(n, m)
        distances, graph = _pooled_lists(pooled, length)
        if 16 * length > n + m:
            # dense: one matrix product per chunk beats the gather 20-30x
            graph = jnp.zeros((n + m, n + m), pooled.dtype).at[jnp.arange(n + m)[:, None], graph].set(1)
        return graph, length, _looks_discrete(distances), jnp.zeros((), pooled.dtype)

    def counts(self, graph, is_x, dtype):
        """Each pooled point's count of x-labelled neighbours, for a batch of labellings (batch, N)."""
        if graph.dtype == jnp.int32:
            return jnp.sum(is_x[:, graph], axis=2).astype(dtype)
        return is_x.astype(dtype) @ graph.T

    def evaluate(self, data, is_x):
        graph, length, discrete, zero = data
        count_x = self.counts(graph, is_x, zero.dtype)
        values = jax.vmap(lambda counts, labels: self.from_counts(counts, length, labels))(count_x, is_x)
        return jnp.where(discrete, jnp.nan, values)

    def from_counts(self, count_x, num_neighbors: int, is_x):
        """D from each pooled point's count of x-labelled neighbours (out of ``num_neighbors``)."""
        a = jnp.asarray(self.pseudocount, count_x.dtype)
        log_odds = jnp.log(count_x + a) - jnp.log(num_neighbors - count_x + a)
        n = jnp.sum(is_x).astype(count_x.dtype)
        m = is_x.shape[0] - n
        value = jnp.sum(jnp.where(is_x, log_odds, 0)) / n + jnp.log(m) - jnp.log(n - 1)
        if self.symmetric:
            value = value - jnp.sum(jnp.where(is_x, 0, log_odds)) / m + jnp.log(n) - jnp.log(m - 1)
        return value

    def valid(self, x, y):
        return ~_not_finite(x, y) & (jnp.asarray(self.pseudocount) > 0)


class _CountStatistic:
    """The permutation core of the statistics built on per-point one-hot bins (``one_hot(pooled)``):
    each pooled point keeps its bin under a re-split, so a re-split's counts are one product of its labels
    with the pooled one-hot matrix, and the statistic is the smoothed KL of the two count vectors."""

    def prepare(self, x, y):
        one_hot, feature_valid = self.one_hot(jnp.concatenate([x, y], axis=0))  # (N, [d,] bins)
        return one_hot.reshape(one_hot.shape[0], -1), jnp.sum(one_hot, axis=0), feature_valid

    def evaluate(self, data, is_x):
        flat, total, feature_valid = data
        counts_x = (is_x.astype(flat.dtype) @ flat).reshape((is_x.shape[0],) + total.shape)
        value = _smoothed_kl(counts_x, total[None] - counts_x, jnp.asarray(self.pseudocount, flat.dtype))
        return jnp.where(feature_valid[None], value, jnp.nan)

    def valid(self, x, y):
        return ~_not_finite(x, y) & (jnp.asarray(self.pseudocount) >= 0)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("pseudocount", "edges"),
                   meta_fields=("bins", "binning"))
@dataclasses.dataclass(frozen=True)
class HistogramKL(_CountStatistic):
    """Per-feature histogram KL (:func:`feature_histogram_kl`) as a statistic; one value per feature.

    Bin edges: ``edges`` when given (they must not depend on x or y, e.g. fixed on a separate part
    of the reference, or the permuted statistics are not exchangeable with the observed one); else
    ``bin_edges(pooled, bins, binning=binning)``, a symmetric function of the pool and so exactly valid.
    Each pooled point keeps its bin under a re-split, so a permutation is one (N,) x (N, d * bins)
    product of its labels with the pooled one-hot bins.

    Attributes:
        bins: number of bins when ``edges`` is None.
        binning: ``"quantile"`` or ``"range"``.
        pseudocount: added to every bin of both histograms (>= 0).
        edges: fixed edges, shape (bins + 1,) or (d, bins + 1), as a tuple (hashable) or array.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import HistogramKL, permutation_test
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (200, 3))
        >>> y = jax.random.normal(ky, (100, 3)).at[:, 1].add(1.0)   # feature 1 drifts
        >>> statistic, p_value = permutation_test(jax.random.key(1), HistogramKL(bins=8), x, y, num_permutations=99)
        >>> [round(float(p), 2) for p in p_value][1]
        0.01

    References:
        Rabanser, Guennemann and Lipton, "Failing loudly", NeurIPS 2019 (univariate tests per feature).
    """

    bins: int = 10
    binning: str = "quantile"
    pseudocount: Any = 0.5
    edges: Any = None

    def check(self, x, y) -> None:
        check_int("bins", self.bins, 1)
        if self.binning not in _BINNINGS:
            raise ValueError(f"`binning` must be one of {_BINNINGS}, got {self.binning!r}.")
        check_eagerly("pseudocount", self.pseudocount, nonnegative)
        if self.edges is not None:
            _check_edges(self.edges, x.shape[1] if x.ndim == 2 else None, x.dtype, x.ndim == 2)

    def one_hot(self, pooled):
        if self.edges is None:
            edges = _bin_edges(pooled, self.bins, self.binning)
        else:
            edges = jnp.asarray(self.edges, pooled.dtype)
        bins = edges.shape[-1] - 1
        return jax.nn.one_hot(_bin_indices(pooled, edges), bins, dtype=pooled.dtype), _edges_valid(edges)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("pseudocount",),
                   meta_fields=("num_categories",))
@dataclasses.dataclass(frozen=True)
class CategoricalKL(_CountStatistic):
    """Per-feature KL between category frequencies, with unseen categories counted in one extra bin.

    Each feature holds category codes 0, 1, ..., ``num_categories`` - 1 (as floats). A value that is not
    one of them (a category the reference never had, coded e.g. as ``num_categories`` or -1) joins an
    extra "unseen" bin, so a new category in a window raises the statistic instead of vanishing.
    ``pseudocount`` smooths both histograms (num_categories + 1 bins) as in :func:`feature_histogram_kl`.

    Attributes:
        num_categories: known categories per feature (>= 1).
        pseudocount: added to every bin (>= 0).

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.drift import CategoricalKL, permutation_test
        >>> x = jnp.tile(jnp.array([0.0, 1.0, 2.0]), 40)
        >>> y = jnp.concatenate([jnp.tile(jnp.array([0.0, 1.0]), 20), jnp.full(20, 7.0)])  # 7: unseen
        >>> statistic, p_value = permutation_test(jax.random.key(0), CategoricalKL(3), x, y, num_permutations=99)
        >>> float(p_value)
        0.01

    References:
        R. Krichevsky and V. Trofimov, IEEE Trans. Inf. Theory 27(2), 1981 (the add-1/2 estimator).
    """

    num_categories: int
    pseudocount: Any = 0.5

    def check(self, x, y) -> None:
        check_int("num_categories", self.num_categories, 1)
        check_eagerly("pseudocount", self.pseudocount, nonnegative)

    def one_hot(self, pooled):
        known = (pooled >= 0) & (pooled < self.num_categories) & (pooled == jnp.round(pooled))
        codes = jnp.where(known, pooled, self.num_categories).astype(jnp.int32)
        valid = jnp.ones(pooled.shape[1:], bool)
        return jax.nn.one_hot(codes, self.num_categories + 1, dtype=pooled.dtype), valid


@functools.partial(jax.tree_util.register_dataclass, data_fields=(), meta_fields=())
@dataclasses.dataclass(frozen=True)
class EnergyDistance:
    """The energy distance of Szekely & Rizzo as a statistic (the baseline two-sample test).

        E = 2 / (n m) sum_{i, j} |x_i - y_j| - 1 / n^2 sum_{i, i'} |x_i - x_i'| - 1 / m^2 sum_{j, j'} |y_j - y_j'|

    (the V-statistic; E >= 0 with equality iff the empirical distributions agree). The (N, N) distance
    matrix D of the pool is computed once; a re-split with label vector s costs the products D s:
    one (chunk, N) x (N, N) matrix product per chunk. Memory O(N^2).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import energy_distance, EnergyDistance, permutation_test
        >>> x, y = jnp.array([[0.0], [1.0]]), jnp.array([[3.0]])
        >>> print(float(energy_distance(x, y)))          # 2 (3 + 2) / 2 - 2 / 4
        4.5
        >>> float(permutation_test(jax.random.key(0), EnergyDistance(), jnp.arange(40.0), jnp.arange(40.0) + 30,
        ...                        num_permutations=99)[1])
        0.01

    References:
        G. J. Szekely and M. L. Rizzo, "Testing for equal distributions in high dimension", InterStat,
        2004; "Energy statistics: a class of statistics based on distances", J. Stat. Plan. Inference
        143(8), 2013.
    """

    def check(self, x, y) -> None:
        pass

    def prepare(self, x, y):
        pooled = jnp.concatenate([x, y], axis=0).reshape(x.shape[0] + y.shape[0], -1)
        pooled = jnp.where(jnp.isfinite(pooled), pooled, 0)
        return _pairwise_distances(pooled)

    def evaluate(self, distances, is_x):
        labels = is_x.astype(distances.dtype)  # (batch, N)
        n = jnp.sum(labels, axis=1)
        m = labels.shape[1] - n
        row_x = labels @ distances  # sum over x-labelled columns, for every row
        within_x = jnp.sum(row_x * labels, axis=1)
        between = jnp.sum(row_x * (1 - labels), axis=1)
        within_y = jnp.sum(distances) - within_x - 2 * between
        return 2 * between / (n * m) - within_x / n ** 2 - within_y / m ** 2

    def valid(self, x, y):
        return ~_not_finite(x, y)


@functools.partial(jax.tree_util.register_dataclass, data_fields=("shrinkage",), meta_fields=("symmetric",))
@dataclasses.dataclass(frozen=True)
class GaussianKL:
    """KL between the Gaussians fitted to each sample (moments), with shrunk covariances, as a statistic.

    The pooled sample is standardised (pooled mean and standard deviation per feature: label-free), each
    sample gets its mean mu and covariance S + lambda I (ridge shrinkage, lambda = ``shrinkage`` when
    given, else d / min(n, m): more shrinkage when the covariance has more entries per point), and

        D(N_x || N_y) = 1/2 [tr(S_y^-1 S_x) + (mu_y - mu_x)^T S_y^-1 (mu_y - mu_x) - d + log det S_y / det S_x],

    or with ``symmetric=True`` the Jeffreys divergence D(N_x||N_y) + D(N_y||N_x), in which the
    log-determinants cancel. It is the exact KL when both samples are Gaussian, and otherwise the KL of
    their Gaussian (moment) approximations: it sees changes of mean, scale and correlation, not changes
    that keep the first two moments. It is the likelihood-ratio statistic of quadratic discriminant
    analysis, the regularised Hotelling T^2 (Hotelling 1931) plus a covariance test. Every re-split
    recomputes both fits from the labels (the statistic is a symmetric function of the labelled pool),
    so the permutation test is exact; a re-split costs O(N d^2 + d^3), with the label-free second
    moments of the pool computed once.

    Attributes:
        symmetric: the Jeffreys divergence (both directions) instead of D(N_x || N_y).
        shrinkage: the ridge lambda added to each standardised covariance (> 0), or None for d / min(n, m).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import GaussianKL, permutation_test
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (200, 2))
        >>> y = jax.random.normal(ky, (100, 2)) * 1.5
        >>> statistic, p_value = permutation_test(jax.random.key(1), GaussianKL(), x, y, num_permutations=99)
        >>> float(p_value)
        0.01

    References:
        H. Hotelling, "The generalization of Student's ratio", Ann. Math. Statist. 2(3), 1931;
        O. Ledoit and M. Wolf, "A well-conditioned estimator for large-dimensional covariance matrices",
        J. Multivariate Anal. 88(2), 2004 (shrinkage towards the identity).
    """

    symmetric: bool = False
    shrinkage: Any = None

    def check(self, x, y) -> None:
        if x.shape[0] < 2 or y.shape[0] < 2:
            name = "x" if x.shape[0] < 2 else "y"
            raise ValueError(f"`{name}` needs at least 2 rows for a covariance, got shapes {x.shape} and {y.shape}.")
        if self.shrinkage is not None:
            check_eagerly("shrinkage", self.shrinkage, positive)

    def ridge(self, n: int, m: int, d: int):
        return d / min(n, m) if self.shrinkage is None else self.shrinkage

    def prepare(self, x, y):
        pooled = jnp.concatenate([x, y], axis=0).reshape(x.shape[0] + y.shape[0], -1)
        pooled = jnp.where(jnp.isfinite(pooled), pooled, 0)
        std = jnp.std(pooled, axis=0, keepdims=True)
        pooled = (pooled - jnp.mean(pooled, axis=0, keepdims=True)) / jnp.where(std > 0, std, 1)
        ridge = jnp.asarray(self.ridge(x.shape[0], y.shape[0], pooled.shape[1]), pooled.dtype)
        return pooled, pooled.T @ pooled, ridge

    def evaluate(self, data, is_x):
        pooled, total, ridge = data
        labels = is_x.astype(pooled.dtype)  # (batch, N)
        n = jnp.sum(labels, axis=1)[:, None]
        m = pooled.shape[0] - n
        sum_x = labels @ pooled  # (batch, d)
        mean_x, mean_y = sum_x / n, -sum_x / m  # the pooled mean is 0
        second_x = jnp.einsum("bn,ni,nj->bij", labels, pooled, pooled)
        second_y = total[None] - second_x
        eye = jnp.eye(pooled.shape[1], dtype=pooled.dtype)[None]
        cov_x = second_x / n[..., None] - mean_x[:, :, None] * mean_x[:, None, :] + ridge * eye
        cov_y = second_y / m[..., None] - mean_y[:, :, None] * mean_y[:, None, :] + ridge * eye
        # lax.map, not vmap: on CPU, batched triangular solves run jaxlib's ParallelBatchMap on the intra-op
        # thread pool, and two of them at once (independent solves, or an outer lax.map) can take every pool
        # thread and wait on each other for good (seen at d = 50 on 2 cores, all threads in futex waits).
        return jax.lax.map(lambda moments: _gaussian_kl(*moments, symmetric=self.symmetric),
                           (mean_x, cov_x, mean_y, cov_y))

    def valid(self, x, y):
        ok = ~_not_finite(x, y)
        return ok if self.shrinkage is None else ok & (jnp.asarray(self.shrinkage) > 0)


def _gaussian_kl(mean_x, cov_x, mean_y, cov_y, symmetric: bool):
    """D(N(mean_x, cov_x) || N(mean_y, cov_y)), or the Jeffreys divergence (both directions)."""
    d = mean_x.shape[0]
    factor_y = jax.scipy.linalg.cho_factor(cov_y, lower=True)
    difference = mean_y - mean_x
    trace_y = jnp.trace(jax.scipy.linalg.cho_solve(factor_y, cov_x))
    mahalanobis_y = difference @ jax.scipy.linalg.cho_solve(factor_y, difference)
    if not symmetric:
        log_det_y = 2 * jnp.sum(jnp.log(jnp.diag(factor_y[0])))
        log_det_x = jnp.linalg.slogdet(cov_x)[1]
        return 0.5 * (trace_y + mahalanobis_y - d + log_det_y - log_det_x)
    factor_x = jax.scipy.linalg.cho_factor(cov_x, lower=True)
    trace_x = jnp.trace(jax.scipy.linalg.cho_solve(factor_x, cov_y))
    mahalanobis_x = difference @ jax.scipy.linalg.cho_solve(factor_x, difference)
    return 0.5 * (trace_y + trace_x + mahalanobis_y + mahalanobis_x) - d


_CLASSIFIER_MODELS = ("auto", "linear", "diagonal", "quadratic")
_NEWTON_STEPS = 20


@functools.partial(jax.tree_util.register_dataclass, data_fields=("penalty",), meta_fields=("model",))
@dataclasses.dataclass(frozen=True)
class ClassifierKL:
    """Classifier KL: D(P_x || P_y) read off a logistic classifier fitted on half of the data, tested on the
    other half with the classifier held fixed (a classifier two-sample test; Lopez-Paz & Oquab 2017).

    The even rows of ``x`` and of ``y`` train a penalised logistic regression of the label (x = 1, y = 0)
    on features of the points, each class weighted by 1 / (2 * its rows), so that the fitted logit f
    estimates log p_x / p_y (the prior correction of ``kljax.ratio``). The statistic is the held-out
    estimate D = mean of f over the odd rows of ``x``. The permutation test re-labels the held-out (odd)
    rows only, keeping the classifier fixed: under H0 those rows are exchangeable and independent of the
    classifier, so the p-value is valid (Phipson & Smyth), and a re-split costs one (N/2,) dot product.
    With the held-out sums fixed, D is an increasing function of the held-out mean logit difference
    mean_x f - mean_y f, so the test is the same as the held-out difference test.

    Features (``model``): ``"linear"`` (x), ``"diagonal"`` (x, x_j^2), ``"quadratic"`` (x, x_i x_j for
    i <= j: exact for two Gaussians), standardised on the training rows; ``"auto"`` takes the quadratic
    features when there are at most a quarter as many as training rows, else the diagonal ones when at
    most half as many, else the linear ones (a rule of thumb against overfitting, not tuned). The fit:
    ``_NEWTON_STEPS`` = 20 damped Newton steps on the convex objective (class-weighted mean softplus +
    ``penalty`` / 2 |beta|^2, intercept not penalised), to convergence. In the measured power table it
    had less power than :class:`GaussianKL` (half the pool trains, half tests), so it is not the default.

    Attributes:
        model: ``"auto"``, ``"linear"``, ``"diagonal"`` or ``"quadratic"``.
        penalty: L2 penalty on the standardised coefficients (> 0).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import ClassifierKL, permutation_test
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (200, 2))
        >>> y = jax.random.normal(ky, (100, 2)) + 1.0
        >>> statistic, p_value = permutation_test(jax.random.key(1), ClassifierKL(), x, y, num_permutations=99)
        >>> float(p_value)
        0.01

    References:
        D. Lopez-Paz and M. Oquab, "Revisiting classifier two-sample tests", ICLR 2017.
        https://arxiv.org/abs/1610.06545
        S. Bickel, M. Brueckner and T. Scheffer, "Discriminative learning under covariate shift", JMLR 10,
        2009 (the logit of a balanced classifier as the log density ratio).
    """

    model: str = "auto"
    penalty: Any = 1e-2

    def __post_init__(self):
        if self.model not in _CLASSIFIER_MODELS:
            raise ValueError(f"`model` must be one of {_CLASSIFIER_MODELS}, got {self.model!r}.")

    def features(self, d: int, training_rows: int) -> str:
        """The feature set used for d features and ``training_rows`` training points."""
        if self.model != "auto":
            return self.model
        if d * (d + 3) // 2 <= training_rows / 4:
            return "quadratic"
        if 2 * d <= training_rows / 2:
            return "diagonal"
        return "linear"

    def check(self, x, y) -> None:
        if x.shape[0] < 2 or y.shape[0] < 2:
            name = "x" if x.shape[0] < 2 else "y"
            raise ValueError(f"`{name}` needs at least 2 rows (one to train the classifier, one held out), got "
                             f"shapes {x.shape} and {y.shape}.")
        check_eagerly("penalty", self.penalty, positive)

    @staticmethod
    def permuted_rows(n: int, m: int) -> np.ndarray:
        """The pooled rows a re-split re-labels: the held-out (odd) rows of x and of y."""
        return np.concatenate([np.arange(1, n, 2), n + np.arange(1, m, 2)])

    def prepare(self, x, y):
        x, y = (x[:, None], y[:, None]) if x.ndim == 1 else (x, y)
        x, y = jnp.where(jnp.isfinite(x), x, 0), jnp.where(jnp.isfinite(y), y, 0)  # bad input: NaN (valid)
        train = jnp.concatenate([x[0::2], y[0::2]])
        n_train, m_train = x[0::2].shape[0], y[0::2].shape[0]
        kind = self.features(x.shape[1], n_train + m_train)
        features = functools.partial(_classifier_features, kind=kind)
        phi = features(train)
        mean, std = jnp.mean(phi, axis=0, keepdims=True), jnp.std(phi, axis=0, keepdims=True)
        std = jnp.where(std > 0, std, 1)

        def design(z):
            return jnp.concatenate([jnp.ones((z.shape[0], 1), z.dtype), (features(z) - mean) / std], axis=1)

        label = (jnp.arange(n_train + m_train) < n_train).astype(x.dtype)
        weight = jnp.where(label > 0, 0.5 / n_train, 0.5 / m_train).astype(x.dtype)
        beta = _fit_logistic(design(train), label, weight, jnp.asarray(self.penalty, x.dtype))
        pooled = jnp.concatenate([x, y])
        held = self.permuted_rows(x.shape[0], y.shape[0])
        logits = design(pooled[held]) @ beta  # the fixed classifier on the held-out rows
        return held, logits

    def evaluate(self, data, is_x):
        held, logits = data
        labels = is_x[:, held].astype(logits.dtype)  # (batch, held-out rows)
        return labels @ logits / jnp.sum(labels, axis=1)

    def valid(self, x, y):
        return ~_not_finite(x, y) & (jnp.asarray(self.penalty) > 0)


def _classifier_features(z: jax.Array, kind: str) -> jax.Array:
    if kind == "linear":
        return z
    if kind == "diagonal":
        return jnp.concatenate([z, z ** 2], axis=1)
    upper_i, upper_j = np.triu_indices(z.shape[1])
    return jnp.concatenate([z, z[:, upper_i] * z[:, upper_j]], axis=1)


def _fit_logistic(design, label, weight, penalty):
    """Minimises sum_i weight_i softplus(-s_i design_i . beta) + penalty / 2 |beta[1:]|^2 (s = +1 for label 1,
    -1 for label 0) by damped Newton steps (lengths 1, 1/2, ..., 1/16 or 0, the best kept: never uphill)."""
    dtype = design.dtype
    ridge = jnp.full((design.shape[1],), penalty, dtype).at[0].set(0)
    sign = 2 * label - 1
    lengths = jnp.asarray([1.0, 0.5, 0.25, 0.125, 0.0625, 0.0], dtype)

    def objective(beta):
        return jnp.sum(weight * jax.nn.softplus(-sign * (design @ beta))) + 0.5 * jnp.sum(ridge * beta ** 2)

    def step(beta, _):
        prob = jax.nn.sigmoid(design @ beta)
        gradient = design.T @ (weight * (prob - label)) + ridge * beta
        hessian = (design * (weight * prob * (1 - prob))[:, None]).T @ design + jnp.diag(ridge + 1e-8)
        direction = -jax.scipy.linalg.cho_solve(jax.scipy.linalg.cho_factor(hessian), gradient)
        trials = jax.vmap(lambda t: objective(beta + t * direction))(lengths)
        length = lengths[jnp.argmin(jnp.where(jnp.isfinite(trials), trials, jnp.inf))]
        return beta + length * direction, None

    return jax.lax.scan(step, jnp.zeros(design.shape[1], dtype), None, length=_NEWTON_STEPS)[0]


_DENSE_LISTS_MAX_POINTS = 8192  # the (N, N) distance matrix of _pooled_lists: 256 MiB in float32


def _pooled_lists(pooled: jax.Array, length: int) -> tuple[jax.Array, jax.Array]:
    """Each pooled point's ``length`` nearest other pooled points: (distances, indices), ascending.

    For long lists (``length`` > N / 16, N <= _DENSE_LISTS_MAX_POINTS), ``lax.top_k`` of the exact
    distance matrix (ties: the smaller index first, as :func:`kljax.knn.neighbors`): 2-4x faster than
    the certified tiled search there (XLA:CPU's full sort is slower still); else that search."""
    size = pooled.shape[0]
    if 16 * length > size and size <= _DENSE_LISTS_MAX_POINTS:
        all_distances = _pairwise_distances(pooled).at[jnp.arange(size), jnp.arange(size)].set(jnp.inf)
        distances, indices = jax.lax.top_k(-all_distances, length)
        return -distances, indices
    return knn.neighbors(pooled, pooled, length, exclude_self=True, method="brute")


def _pairwise_distances(points: jax.Array) -> jax.Array:
    """Euclidean distances between all rows from coordinate differences (exact, never negative), a block
    of rows at a time so that memory stays O(N^2), not O(N^2 d)."""
    def row(point):
        return jnp.sqrt(jnp.sum((points - point[None, :]) ** 2, axis=-1))

    return jax.lax.map(row, points, batch_size=min(64, points.shape[0]))


def energy_distance(x, y) -> jax.Array:
    """Energy distance between the samples ``x`` and ``y`` (see :class:`EnergyDistance`).

    Args:
        x: samples, shape (n,) or (n, d).
        y: samples, shape (m,) or (m, d).

    Returns:
        The V-statistic E >= 0, dtype of ``x``; NaN under ``jit`` for non-finite input.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.drift import energy_distance
        >>> print(float(energy_distance(jnp.array([0.0, 1.0]), jnp.array([3.0]))))
        4.5

    References:
        G. J. Szekely and M. L. Rizzo, InterStat, 2004.
    """
    x, y = _as_pair(x, y)
    return _statistic_only(EnergyDistance(), x, y)


@functools.partial(jax.tree_util.register_dataclass, data_fields=(), meta_fields=("function",))
@dataclasses.dataclass(frozen=True)
class _Callable:
    """Any ``statistic(x, y) -> array`` as a statistic value (the samples are gathered per re-split)."""

    function: Callable

    def check(self, x, y) -> None:
        if hasattr(self.function, "check"):  # e.g. the kNN estimators' rows and duplicates
            self.function.check(x, y)

    def prepare(self, x, y):
        return jnp.concatenate([x, y], axis=0), x.shape[0]

    def evaluate(self, data, is_x):
        pooled, n = data

        def one(labels):
            rows = pooled[_labels_to_rows(labels)]
            return jnp.asarray(self.function(rows[:n], rows[n:]))

        return jax.vmap(one)(is_x)

    def valid(self, x, y):
        return ~_not_finite(x, y)


def _as_statistic(statistic):
    if all(hasattr(statistic, name) for name in ("check", "prepare", "evaluate", "valid")):
        return statistic
    if callable(statistic):
        return _Callable(statistic)
    raise TypeError(f"`statistic` must be a statistic value (KnnKL, HistogramKL, CategoricalKL, EnergyDistance) "
                    f"or a callable statistic(x, y), got {statistic!r}.")


@jax.jit
def _statistic_only(statistic, x, y):
    data = statistic.prepare(x, y)
    if hasattr(statistic, "observe"):
        value = statistic.observe(data)
    else:
        value = statistic.evaluate(data, jnp.arange(x.shape[0] + y.shape[0])[None] < x.shape[0])[0]
    return jnp.where(statistic.valid(x, y), value, jnp.nan).astype(x.dtype)


# --------------------------------------------------------------------------------------------------
# The permutation core
# --------------------------------------------------------------------------------------------------


#: relative tolerance, in units of the dtype's eps, within which a permuted statistic ties the observed one
_TIE_TOLERANCE = 64


def _p_values(observed: jax.Array, permuted: jax.Array) -> jax.Array:
    """(1 + #{T_b >= T_obs}) / (1 + B) for each entry of the observed statistic."""
    # Exact ties count as exceedances; the tolerance only guards against last-bit differences of a
    # mathematically equal statistic (it can only make p larger). The observed and the permuted values
    # come from differently batched (so differently fused and summed) programs: a constant statistic
    # of 64 histogram features differed by 4.6 eps in float32, which a 4 eps tolerance turned into
    # p = 1 / (B + 1); hence _TIE_TOLERANCE eps. It must not turn an observed +inf into inf - inf = NaN:
    # an infinite observed value is compared as it is (+inf >= +inf counts).
    tolerance = _TIE_TOLERANCE * jnp.finfo(permuted.dtype).eps * jnp.abs(observed)
    threshold = jnp.where(jnp.isfinite(observed), observed - tolerance, observed)
    exceed = jnp.sum(permuted >= threshold[None], axis=0)
    p_value = ((1 + exceed) / (1 + permuted.shape[0])).astype(permuted.dtype)
    bad = jnp.isnan(observed) | jnp.any(jnp.isnan(permuted), axis=0)
    return jnp.where(bad, jnp.nan, p_value)


@functools.partial(jax.jit, static_argnames=("num_permutations", "chunk_size"))
def _permutation_test(key, x, y, statistic, *, num_permutations, chunk_size):
    n, num_total = x.shape[0], x.shape[0] + y.shape[0]
    data = statistic.prepare(x, y)
    if hasattr(statistic, "observe"):
        observed = statistic.observe(data)
    else:
        observed = statistic.evaluate(data, (jnp.arange(num_total) < n)[None])[0]
    chunk = min(chunk_size, num_permutations)
    num_chunks = -(-num_permutations // chunk)

    rows = getattr(statistic, "permuted_rows", None)
    rows = None if rows is None else np.asarray(rows(n, num_total - n))

    def labels(index):  # re-split b uses the key fold_in(key, b), b = 1..B: independent of chunk_size
        if rows is None:
            order = jax.random.permutation(jax.random.fold_in(key, index), num_total)
            return jnp.zeros(num_total, bool).at[order[:n]].set(True)
        # a statistic fitted on some rows (ClassifierKL) re-labels only the others, among themselves
        observed = jnp.arange(num_total) < n
        order = jax.random.permutation(jax.random.fold_in(key, index), rows.size)
        return observed.at[rows].set(observed[rows][order])

    def one_chunk(start):
        return statistic.evaluate(data, jax.vmap(labels)(start + jnp.arange(chunk)))

    permuted = jax.lax.map(one_chunk, 1 + jnp.arange(num_chunks) * chunk)
    permuted = permuted.reshape((num_chunks * chunk,) + permuted.shape[2:])[:num_permutations]
    valid = statistic.valid(x, y)
    observed = jnp.where(valid, observed, jnp.nan).astype(x.dtype)
    return observed, jnp.where(valid, _p_values(observed, permuted.astype(x.dtype)), jnp.nan)


def permutation_test(key, statistic, x, y, *, num_permutations: int = 200,
                     chunk_size: int | None = None) -> tuple[jax.Array, jax.Array]:
    """Permutation test of ``statistic`` on a reference ``x`` and a window ``y``: (statistic, p-value).

    The pooled sample (x, y) is re-split ``num_permutations`` times into groups of sizes n and m
    (uniformly random permutations, re-split b with key ``fold_in(key, b)``), the statistic is
    evaluated on each split, and p = (1 + #{T_b >= T_obs}) / (1 + B) (Phipson & Smyth, 2010). Re-splits
    are evaluated a chunk of ``chunk_size`` at a time (vmapped within, ``lax.map`` across), so memory
    is bounded by the chunk, and the result does not depend on ``chunk_size``.

    Args:
        key: a ``jax.random`` key.
        statistic: :class:`KnnKL`, :class:`HistogramKL`, :class:`CategoricalKL`, :class:`EnergyDistance`
            or a callable ``statistic(x, y) -> array`` (a hashable one: the same object is not recompiled).
        x: reference sample (P), shape (n,) or (n, d).
        y: window sample (Q), shape (m,) or (m, d), same number of features.
        num_permutations: B >= 1; the smallest attainable p-value is 1 / (B + 1).
        chunk_size: re-splits per vmapped chunk (None: 32).

    Returns:
        ``(statistic, p_value)`` of the observed split, of the statistic's shape; dtype of ``x``. NaN
        under ``jit`` when an input is NaN or infinite.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import EnergyDistance, permutation_test
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x, y = jax.random.normal(kx, (100, 2)), jax.random.normal(ky, (80, 2))   # no drift
        >>> _, p_value = permutation_test(jax.random.key(1), EnergyDistance(), x, y, num_permutations=99)
        >>> bool(p_value > 0.05)
        True

    References:
        B. Phipson and G. K. Smyth, Stat. Appl. Genet. Mol. Biol. 9(1), 2010, eq. 2.
    """
    statistic = _as_statistic(statistic)
    num_permutations = check_int("num_permutations", num_permutations, 1)
    chunk_size = check_int("chunk_size", 32 if chunk_size is None else chunk_size, 1)
    x, y = _as_pair(x, y)
    if x.shape[0] < 2:
        raise ValueError(f"`x` needs at least 2 samples (rows), got shape {x.shape}.")
    statistic.check(x, y)
    return _permutation_test(key, x, y, statistic, num_permutations=num_permutations, chunk_size=chunk_size)


def _statistic_from_options(estimator, *, k, knn_estimator, knn_method, bins, binning, edges, pseudocount,
                            symmetric=None):
    """The keyword layer of :func:`kl_permutation_test` and :class:`DriftMonitor` -> a statistic value;
    ``symmetric=None`` is each statistic's default (False, except True for ``"knn_graph"``)."""
    if estimator != "knn" and (k is not None or knn_estimator != "wkv" or knn_method != "brute"):
        # a kNN option with another statistic would be silently ignored: refuse it
        given = "k" if k is not None else "knn_estimator" if knn_estimator != "wkv" else "knn_method"
        raise ValueError(f"`{given}` applies to estimator='knn' only, got estimator={estimator!r}; pass "
                         f"estimator='knn' for the kNN statistic.")
    if isinstance(estimator, str):
        if estimator == "gaussian":
            return GaussianKL(bool(symmetric))
        if estimator == "knn_graph":
            return KnnGraphKL(None, pseudocount, True if symmetric is None else symmetric)
        if estimator == "knn":
            k = None if k is None else check_int("k", k, 1)
            if knn_estimator == "wkv":
                return KnnKL(k, bool(symmetric))
            return _Callable(_KnnStatistic(k, knn_estimator, knn_method))
        if estimator == "histogram":
            return HistogramKL(check_int("bins", bins, 1), binning, pseudocount,
                               None if edges is None else as_float_array("edges", edges))
        if estimator == "energy":
            return EnergyDistance()
        if estimator == "classifier":
            return ClassifierKL()
        raise ValueError(f"`estimator` must be one of {_ESTIMATORS}, a statistic value or a "
                         f"callable, got {estimator!r}.")
    return _as_statistic(estimator)


@dataclasses.dataclass(frozen=True)
class _KnnStatistic:
    """Hashable ``(x, y) -> kljax.knn.kl(x, y, ...)`` for the kNN estimators other than WKV."""

    k: int | None
    knn_estimator: str
    method: str

    def check(self, x, y) -> None:
        KnnKL(self.k).check(x, y)

    def __call__(self, x, y):
        if x.ndim == 1:
            x, y = x[:, None], y[:, None]
        k = self.k if self.k is not None else max(1, min(DEFAULT_K, x.shape[0] - 1, y.shape[0] - 1))
        return knn.kl(x, y, k=k, estimator=self.knn_estimator, method=self.method)


def kl_permutation_test(
    key,
    x,
    y,
    *,
    estimator: Any = "knn",
    num_permutations: int = 200,
    chunk_size: int | None = None,
    k: int | None = None,
    symmetric: bool | None = None,
    knn_estimator: str = "wkv",
    knn_method: str = "brute",
    bins: int = 10,
    binning: str = "quantile",
    edges=None,
    pseudocount: float = 0.5,
) -> tuple[jax.Array, jax.Array]:
    """KL drift statistic D(P_x || P_y) of a reference ``x`` and a window ``y``, with its permutation p-value.

    A thin keyword layer over :func:`permutation_test`: ``estimator`` names the statistic and the other
    keywords configure it. p = (1 + #{T_perm >= T_obs}) / (1 + B), valid at every level under H0.

    Estimators:
        * ``"knn"`` (default, as API.md fixes it): :class:`KnnKL` (``k``, ``symmetric``) for
          ``knn_estimator="wkv"``, which equals ``kljax.knn.kl(x, y, k=k, estimator="wkv")`` on the
          observed split; any other ``knn_estimator`` calls ``kljax.knn.kl(..., estimator=knn_estimator,
          method=knn_method)`` on every re-split (slower). 1-D input is treated as d = 1. A consistent
          estimate of the KL itself, but the weakest detector of mean shifts (README, "Choices that matter").
        * ``"gaussian"``: :class:`GaussianKL`, D(N_x || N_y) between the Gaussians fitted to each sample
          (``symmetric=True``: both directions). The KL statistic with the most power measured (it
          beats energy distance on scale and correlation shifts and loses on mixture-weight and sparse
          shifts); it sees changes of the means and covariances only.
        * ``"knn_graph"``: :class:`KnnGraphKL`, the KL of the pooled kNN graph's density ratio
          (K = N / 3 neighbours; ``symmetric`` defaults to True here, ``pseudocount`` applies). A detector
          (shrunk towards 0, not an estimate of the divergence) with power near the energy distance's
          on the measured suite; see the README's power table.
        * ``"classifier"``: :class:`ClassifierKL`, a logistic classifier's held-out KL estimate.
        * ``"histogram"``: :class:`HistogramKL` (``bins``, ``binning``, ``edges``, ``pseudocount``);
          statistic and p-value of shape (d,) for (n, d) input, one per feature (combine them with
          :func:`adjust_p_values`).
        * ``"energy"``: :class:`EnergyDistance`, the baseline (not a KL).
        * a statistic value or a callable ``statistic(x, y) -> array``.

    Args:
        key: a ``jax.random`` key.
        x: reference sample (P), shape (n,) or (n, d).
        y: window sample (Q), shape (m,) or (m, d), same number of features.
        estimator: see above.
        num_permutations: B >= 1; the smallest attainable p-value is 1 / (B + 1).
        chunk_size: re-splits per vmapped chunk (memory knob; does not change the result).
        k: for ``"knn"`` only (else ``ValueError``): the neighbour order (None: min(10, n - 1, m - 1),
            see :class:`KnnKL`).
        symmetric: for ``"gaussian"``, ``"knn"`` and ``"knn_graph"``: add D(P_y || P_x); None (default)
            means False, except True for ``"knn_graph"``.
        knn_estimator, knn_method: for ``"knn"`` only, passed to ``kljax.knn.kl`` unless WKV.
        bins, binning, edges: for ``"histogram"``; pseudocount: for ``"histogram"`` and ``"knn_graph"``.

    Returns:
        ``(statistic, p_value)``: scalars, or shape (d,) for the per-feature histogram; dtype of ``x``.
        NaN under ``jit`` when an input has NaN or inf (or a bad option value).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import kl_permutation_test
        >>> kx, ky, kp = jax.random.split(jax.random.key(0), 3)
        >>> x = jax.random.normal(kx, (100, 2), jnp.float32)
        >>> y = jax.random.normal(ky, (50, 2), jnp.float32) + 1.5    # a clear shift
        >>> statistic, p_value = kl_permutation_test(kp, x, y, num_permutations=99)
        >>> print(float(p_value))                                # 1 / (B + 1): no permutation beats it
        0.01
        >>> statistic, p_value = kl_permutation_test(kp, x, y, estimator="histogram", num_permutations=99)
        >>> p_value.shape                                        # one p-value per feature
        (2,)

    References:
        B. Phipson and G. K. Smyth, "Permutation p-values should never be zero", Stat. Appl. Genet.
        Mol. Biol. 9(1), 2010, eq. 2. https://doi.org/10.2202/1544-6115.1585
        Q. Wang, S. R. Kulkarni and S. Verdu, IEEE Trans. Inf. Theory 55(5), 2009.
    """
    statistic = _statistic_from_options(estimator, k=k, knn_estimator=knn_estimator, knn_method=knn_method,
                                        bins=bins, binning=binning, edges=edges, pseudocount=pseudocount,
                                        symmetric=symmetric)
    return permutation_test(key, statistic, x, y, num_permutations=num_permutations, chunk_size=chunk_size)


# --------------------------------------------------------------------------------------------------
# Several p-values: multiple-testing adjustment
# --------------------------------------------------------------------------------------------------


def adjust_p_values(p_values, method: str = "bonferroni") -> jax.Array:
    """Multiple-testing adjusted p-values over the last axis (one entry per feature).

    * ``"bonferroni"``: min(1, d p_j); rejecting where the adjusted value is <= alpha keeps the
      family-wise error rate <= alpha under any dependence between the features.
    * ``"bh"``: Benjamini-Hochberg step-up, adjusted p_(i) = min_{j >= i} min(1, d p_(j) / j) for the
      sorted p-values; rejecting where it is <= alpha keeps the false discovery rate <= alpha under
      independence or positive dependence (PRDS). Its smallest value is Simes' global p-value
      min_i d p_(i) / i, a valid test of "no feature drifted" under the same conditions and never
      larger than Bonferroni's.

    A NaN p-value (an unscorable feature) makes every adjusted value of its slice NaN.

    Args:
        p_values: p-values, shape (..., d).
        method: ``"bonferroni"`` or ``"bh"``.

    Returns:
        Adjusted p-values, same shape and dtype.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.drift import adjust_p_values
        >>> p = jnp.array([0.01, 0.04, 0.03, 0.5])
        >>> [round(v, 4) for v in adjust_p_values(p).tolist()]
        [0.04, 0.16, 0.12, 1.0]
        >>> [round(v, 4) for v in adjust_p_values(p, "bh").tolist()]
        [0.04, 0.0533, 0.0533, 0.5]

    References:
        Y. Benjamini and Y. Hochberg, JRSS B 57(1), 1995; Y. Benjamini and D. Yekutieli, "The control
        of the false discovery rate in multiple testing under dependency", Ann. Statist. 29(4), 2001;
        R. J. Simes, Biometrika 73(3), 1986.
    """
    p_values = as_float_array("p_values", p_values)
    if p_values.ndim == 0:
        raise ValueError(f"`p_values` must have a feature axis, got shape {p_values.shape}.")
    if method not in _CORRECTIONS:
        raise ValueError(f"`method` must be one of {_CORRECTIONS}, got {method!r}.")
    check_eagerly("p_values", p_values, not_nan)
    return _adjust_p_values(p_values, method)


@functools.partial(jax.jit, static_argnames="method")
def _adjust_p_values(p_values, method):
    d = p_values.shape[-1]
    if method == "bonferroni":
        adjusted = jnp.minimum(1, d * p_values)
    else:
        order = jnp.argsort(p_values, axis=-1)
        ranked = jnp.take_along_axis(p_values, order, axis=-1) * d / jnp.arange(1, d + 1, dtype=p_values.dtype)
        ranked = jnp.minimum(1, jax.lax.cummin(ranked, axis=ranked.ndim - 1, reverse=True))
        adjusted = jnp.zeros_like(ranked)
        adjusted = jnp.put_along_axis(adjusted, order, ranked, axis=-1, inplace=False)
    bad = jnp.any(jnp.isnan(p_values), axis=-1, keepdims=True)
    return jnp.where(bad, jnp.nan, adjusted).astype(p_values.dtype)


# --------------------------------------------------------------------------------------------------
# Stream alarms (three-valued)
# --------------------------------------------------------------------------------------------------


class MonitorState(NamedTuple):
    """Stream state of a :class:`DriftMonitor` (the optax-style ``init``/``update`` state).

    Attributes:
        run_length: windows in a row, up to now, that were certainly significant.
        possible_run_length: the same, counting windows of unknown significance (NaN p-value) as
            significant: the longest run that may have happened.
        alarm: 1.0 (alarm), 0.0 (no alarm) or NaN (unknown: an alarm if the unknown windows were
            significant), after the last window.
    """

    run_length: jax.Array
    possible_run_length: jax.Array
    alarm: jax.Array


def _initial_state(dtype) -> MonitorState:
    zero = jnp.zeros((), jnp.int32)
    return MonitorState(zero, zero, jnp.zeros((), dtype))


def _alarm_step(state: MonitorState, significant: jax.Array, consecutive: int) -> MonitorState:
    """The one alarm rule: ``consecutive`` significant windows in a row, with Kleene's unknown."""
    certain = significant == 1
    unknown = jnp.isnan(significant)
    run_length = jnp.where(certain, state.run_length + 1, 0)
    possible = jnp.where(certain | unknown, state.possible_run_length + 1, 0)
    alarm = jnp.where(run_length >= consecutive, 1, jnp.where(possible >= consecutive, jnp.nan, 0))
    return MonitorState(run_length, possible, alarm.astype(state.alarm.dtype))


def sustained_alarms(significant, consecutive: int) -> jax.Array:
    """Alarm at window t when windows t - consecutive + 1, ..., t were all significant.

    Boolean input gives boolean alarms. Floating input is three-valued: 1 significant, 0 not, NaN
    unknown; the alarm is then 1.0, 0.0, or NaN where it depends on unknown windows (Kleene's logic:
    a run with one non-significant window is 0 whatever the unknown ones were).

    Args:
        significant: over windows, shape (T,), bool or float (1 / 0 / NaN).
        consecutive: r >= 1 windows in a row needed to raise the alarm.

    Returns:
        Alarms, shape (T,): bool for bool input, else the input's float dtype with NaN for unknown.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.drift import sustained_alarms
        >>> sustained_alarms(jnp.array([1, 0, 1, 1, 1, 0], bool), 2).tolist()
        [False, False, False, True, True, False]
        >>> sustained_alarms(jnp.array([1.0, jnp.nan, 1.0, 1.0, 0.0]), 2).tolist()
        [0.0, nan, nan, 1.0, 0.0]

    References:
        S. C. Kleene, "Introduction to Metamathematics", 1952, sec. 64 (strong three-valued logic).
    """
    consecutive = check_int("consecutive", consecutive, 1)
    significant = jnp.asarray(significant)
    if significant.dtype == bool:
        return _sustained_alarms(significant.astype(jnp.float32), consecutive) == 1
    return _sustained_alarms(as_float_array("significant", significant), consecutive)


@functools.partial(jax.jit, static_argnames="consecutive")
def _sustained_alarms(significant: jax.Array, consecutive: int) -> jax.Array:
    def step(state, s):
        state = _alarm_step(state, s, consecutive)
        return state, state.alarm

    return jax.lax.scan(step, _initial_state(significant.dtype), significant)[1]


def expected_windows_to_false_alarm(alpha: float, consecutive: int) -> float:
    """ARL_0: expected number of windows to the first false alarm when each window is independently
    significant with probability ``alpha`` (the waiting time for ``consecutive`` = r successes in a row).

        ARL_0 = (1 - alpha^r) / ((1 - alpha) alpha^r)

    Discrete permutation p-values make the per-window rate at most alpha, so this is a lower bound
    on the expected run length for independent windows; windows that share a reference are
    positively correlated, which ``experiments/drift_monitor`` measures.

    Args:
        alpha: per-window level in (0, 1).
        consecutive: r >= 1.

    Returns:
        The expected number of windows (a Python float).

    Example:
        >>> from kljax.drift import expected_windows_to_false_alarm
        >>> round(expected_windows_to_false_alarm(0.05, 1), 6), round(expected_windows_to_false_alarm(0.05, 2), 1)
        (20.0, 420.0)

    References:
        W. Feller, "An Introduction to Probability Theory and its Applications", vol. 1, 3rd ed., 1968,
        ch. XIII.7 (runs of successes).
    """
    consecutive = check_int("consecutive", consecutive, 1)
    if not 0 < alpha < 1:
        raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
    return (1 - alpha ** consecutive) / ((1 - alpha) * alpha ** consecutive)


# --------------------------------------------------------------------------------------------------
# The monitor: a pure init/update pair over MonitorState; run is one lax.scan
# --------------------------------------------------------------------------------------------------


class WindowScore(NamedTuple):
    """What :meth:`DriftMonitor.score` reports for one window.

    Attributes:
        statistic: the statistic: shape (d,) per feature for the histogram statistics, else its shape
            (a scalar for the kNN KL).
        p_value: the permutation p-value of each entry of ``statistic``.
        adjusted_p_value: ``p_value`` adjusted for the number of entries (:func:`adjust_p_values`).
        window_p_value: the window's p-value, the smallest adjusted p-value.
        significant: 1.0 when ``window_p_value <= alpha``, 0.0 when not, NaN when the p-value is NaN.
    """

    statistic: jax.Array
    p_value: jax.Array
    adjusted_p_value: jax.Array
    window_p_value: jax.Array
    significant: jax.Array


class _MonitorConfig(NamedTuple):
    alpha: float
    consecutive: int
    num_permutations: int
    chunk_size: int
    correction: str


@jax.tree_util.register_pytree_node_class
class DriftMonitor:
    """Scores production windows against a fixed reference sample: statistic, p-value, alarm.

    Per window: a permutation test (:func:`permutation_test`) of the reference against the window at
    level ``alpha``; several p-values (per feature) are adjusted by ``correction`` (:func:`adjust_p_values`:
    Bonferroni, valid under any dependence; ``"bh"``, Simes' global test, valid under positive
    dependence) and the window's p-value is the smallest adjusted one. Bonferroni's smallest window
    p-value is d / (B + 1), so the default B is max(199, ceil(5 d / alpha) - 1) and a B with which the
    monitor could never alarm raises ``ValueError``.

    Over the stream: an alarm needs ``consecutive`` = r significant windows in a row. P(significant) <=
    alpha per window under no drift; for independent windows the expected number of windows to the
    first false alarm is :func:`expected_windows_to_false_alarm` (420 at alpha = 0.05, r = 2), and
    ``experiments/drift_monitor`` measures it with the shared reference. The price is a delay of
    r - 1 windows after a real shift. Under ``jit`` a window with NaN or inf values has a NaN p-value
    and unknown significance; the alarm is then NaN where it depends on it (see :func:`sustained_alarms`),
    and such a window neither resets nor extends the run silently. Eagerly such a window raises.

    Histogram binning: so that the permuted statistics stay exchangeable with the observed one, the
    edges come from the even rows of the reference (``reference[0::2]``) and the test uses the odd rows,
    which are independent of the edges when the rows are i.i.d. Pass ``edges`` to use the whole reference.

    ``init``/``update`` are the pure pair (optax's ``GradientTransformation`` shape): ``update(state,
    key, window) -> (state, score)``; ``run`` is one ``lax.scan`` of ``update``. The monitor is a pytree
    (reference and statistic parameters are leaves), so it passes through ``jax.jit`` and monitors with
    the same configuration share compiled code.

    Args:
        reference: reference sample, shape (n,) or (n, d).
        estimator: ``"histogram"`` (per feature), ``"knn"`` (multivariate KL), ``"knn_graph"``, ``"gaussian"``,
            ``"classifier"``, ``"energy"``, a statistic value (:class:`KnnKL`, :class:`KnnGraphKL`,
            :class:`HistogramKL`, :class:`CategoricalKL`, :class:`EnergyDistance`, ...) or a callable
            ``statistic(x, y)``.
        alpha: per-window significance level (after the correction).
        consecutive: significant windows in a row needed for an alarm.
        num_permutations: B; default max(199, ceil(5 d / alpha) - 1), d the number of p-values.
        chunk_size: re-splits per vmapped chunk (None: 32).
        correction: ``"bonferroni"`` or ``"bh"``.
        k, knn_estimator, knn_method: for ``"knn"``; symmetric: for ``"knn"``, ``"knn_graph"`` and
            ``"gaussian"`` (see :func:`kl_permutation_test`).
        bins, binning, edges: for ``"histogram"``; pseudocount: for ``"histogram"`` and ``"knn_graph"``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.drift import DriftMonitor
        >>> reference = jax.random.normal(jax.random.key(0), (400, 3), jnp.float32)
        >>> monitor = DriftMonitor(reference, estimator="histogram", alpha=0.05, bins=8)
        >>> monitor.num_permutations          # ceil(5 * 3 / 0.05) - 1, so that Bonferroni can fire
        299
        >>> window_keys = jax.random.split(jax.random.key(1), 6)
        >>> shifts = jnp.array([0.0, 0.0, 0.0, 2.0, 2.0, 2.0])
        >>> windows = jnp.stack([jax.random.normal(k, (100, 3), jnp.float32) + s for k, s in zip(window_keys, shifts)])
        >>> scores, alarms = monitor.run(jax.random.key(2), windows)
        >>> alarms.tolist()
        [0.0, 0.0, 0.0, 0.0, 1.0, 1.0]

    References:
        Rabanser, Guennemann and Lipton, "Failing loudly", NeurIPS 2019 (per-feature tests with
        Bonferroni for dataset shift); Phipson and Smyth, 2010 (the p-value); Benjamini and Hochberg, 1995.
    """

    def __init__(self, reference, *, estimator="histogram", alpha: float = 0.05, consecutive: int = 2,
                 num_permutations: int | None = None, chunk_size: int | None = None,
                 correction: str = "bonferroni", k: int | None = None, symmetric: bool | None = None,
                 knn_estimator: str = "wkv", knn_method: str = "brute", bins: int = 10,
                 binning: str = "quantile", pseudocount: float = 0.5, edges=None):
        if not 0 < alpha < 1:
            raise ValueError(f"`alpha` must be in (0, 1), got {alpha!r}.")
        if correction not in _CORRECTIONS:
            raise ValueError(f"`correction` must be one of {_CORRECTIONS}, got {correction!r}.")
        consecutive = check_int("consecutive", consecutive, 1)
        chunk_size = check_int("chunk_size", 32 if chunk_size is None else chunk_size, 1)
        reference = _as_samples("reference", reference, min_rows=2)
        check_eagerly("reference", reference, real)
        statistic = _statistic_from_options(estimator, k=k, knn_estimator=knn_estimator, knn_method=knn_method,
                                            bins=bins, binning=binning, edges=edges, pseudocount=pseudocount,
                                            symmetric=symmetric)
        if isinstance(statistic, HistogramKL) and statistic.edges is None:
            if reference.shape[0] < 4:
                raise ValueError("`reference` needs at least 4 rows (half fix the bins, half are tested).")
            statistic = dataclasses.replace(statistic, edges=bin_edges(reference[0::2], statistic.bins,
                                                                       binning=statistic.binning))
            reference = reference[1::2]
        if isinstance(statistic, KnnKL):  # the window's rows and duplicates are checked by score
            if statistic.k is not None and reference.shape[0] <= statistic.k:
                raise ValueError(f"`reference` needs more than k={statistic.k} rows, got shape {reference.shape}.")
        elif isinstance(statistic, KnnGraphKL):  # options only: the pooled ties are checked by score
            check_eagerly("pseudocount", statistic.pseudocount, positive)
        elif not isinstance(statistic, _Callable):
            statistic.check(reference, reference)  # options only
        num_features = 1 if reference.ndim == 1 else reference.shape[1]
        num_tests = num_features if isinstance(statistic, (HistogramKL, CategoricalKL)) else 1
        if num_permutations is None:
            num_permutations = max(199, math.ceil(5 * num_tests / alpha) - 1)
        num_permutations = check_int("num_permutations", num_permutations, 1)
        _check_can_fire(num_tests, num_permutations, alpha, correction)
        self.reference = reference
        self.statistic = statistic
        self.config = _MonitorConfig(float(alpha), consecutive, num_permutations, chunk_size, correction)

    # The pytree protocol: the reference and the statistic's parameters are leaves, the rest is static.
    def tree_flatten(self):
        return (self.reference, self.statistic), self.config

    @classmethod
    def tree_unflatten(cls, config, leaves):
        monitor = object.__new__(cls)
        monitor.reference, monitor.statistic = leaves
        monitor.config = config
        return monitor

    alpha = property(lambda self: self.config.alpha)
    consecutive = property(lambda self: self.config.consecutive)
    num_permutations = property(lambda self: self.config.num_permutations)
    edges = property(lambda self: getattr(self.statistic, "edges", None))

    def _check_window(self, window, name="window") -> jax.Array:
        window = _as_samples(name, window)
        if window.ndim != self.reference.ndim or (window.ndim == 2 and window.shape[1] != self.reference.shape[1]):
            raise ValueError(f"`{name}` of shape {window.shape} does not match the reference's features "
                             f"(reference shape {self.reference.shape}).")
        check_eagerly(name, window, real)
        window = window.astype(self.reference.dtype)
        try:
            self.statistic.check(self.reference, window)
        except ValueError as error:
            raise ValueError(f"`{name}` cannot be scored: {error}") from None
        return window

    def score(self, key, window) -> WindowScore:
        """Permutation test of the reference against one window (no stream state).

        Args:
            key: a ``jax.random`` key.
            window: shape (m,) or (m, d), matching the reference; finite, with enough rows for the statistic.

        Returns:
            A :class:`WindowScore`.
        """
        return _score(self, key, self._check_window(window))

    def init(self) -> MonitorState:
        """The state before the first window: no run of significant windows, no alarm."""
        return _initial_state(self.reference.dtype)

    def update(self, state: MonitorState, key, window) -> tuple[MonitorState, WindowScore]:
        """Scores the next window and updates the alarm (pure: returns the new state).

        Returns:
            ``(new_state, score)``; ``new_state.alarm`` is the alarm after this window (1.0 / 0.0 / NaN).
        """
        score = self.score(key, window)
        return _alarm_step(state, score.significant, self.consecutive), score

    def run(self, key, windows) -> tuple[WindowScore, jax.Array]:
        """Scores a stream of equal-sized windows, shape (T, m) or (T, m, d), from :meth:`init`.

        Window t uses the key ``jax.random.split(key, T)[t]``; one ``lax.scan`` of :meth:`update`.

        Returns:
            ``(scores, alarms)``: a :class:`WindowScore` whose fields have a leading T axis, and the
            alarm after each window, shape (T,): 1.0, 0.0, or NaN (unknown).
        """
        windows = as_float_array("windows", windows)
        if windows.ndim != self.reference.ndim + 1:
            raise ValueError(f"`windows` must have shape (T,) + window shape, got {windows.shape} for "
                             f"reference shape {self.reference.shape}.")
        for window in (windows if is_concrete(windows) else windows[:1]):
            self._check_window(window, "windows")
        return _run(self, jax.random.split(key, windows.shape[0]), windows.astype(self.reference.dtype))


def _check_can_fire(num_tests: int, num_permutations: int, alpha: float, correction: str) -> None:
    smallest = (num_tests if correction == "bonferroni" else 1) / (num_permutations + 1)
    if smallest > alpha:
        raise ValueError(
            f"`num_permutations`={num_permutations} is too small: with {num_tests} p-values and correction "
            f"{correction!r} the smallest window p-value is {smallest:.4g} > alpha={alpha}, so the monitor "
            f"could never alarm. Use B >= {math.ceil(num_tests / alpha) - 1}.")


@jax.jit
def _score(monitor: DriftMonitor, key, window) -> WindowScore:
    config = monitor.config
    statistic, p_value = _permutation_test(key, monitor.reference, window, monitor.statistic,
                                           num_permutations=config.num_permutations, chunk_size=config.chunk_size)
    _check_can_fire(p_value.size, config.num_permutations, config.alpha, config.correction)
    adjusted = _adjust_p_values(p_value.reshape(-1), config.correction).reshape(p_value.shape)
    window_p_value = jnp.min(adjusted)  # NaN if any is NaN
    significant = jnp.where(jnp.isnan(window_p_value), jnp.nan, window_p_value <= config.alpha)
    return WindowScore(statistic, p_value, adjusted, window_p_value, significant.astype(window_p_value.dtype))


@jax.jit
def _run(monitor: DriftMonitor, keys, windows):
    def step(state, inputs):
        score = _score(monitor, *inputs)
        state = _alarm_step(state, score.significant, monitor.consecutive)
        return state, (score, state.alarm)

    return jax.lax.scan(step, monitor.init(), (keys, windows))[1]
