"""k-nearest-neighbour search and the k-NN estimators of KL divergence and entropy.

For continuous samples ``x ~ P`` of shape ``(n, d)`` and ``y ~ Q`` of shape ``(m, d)`` (leading batch
axes allowed, equal for ``x`` and ``y``), the estimators compare, for every ``x_i``, the distance
``rho_k(i)`` to its k-th nearest neighbour among the other points of ``x`` with the distance
``nu_k(i)`` to its k-th nearest neighbour in ``y``: a small ``nu`` relative to ``rho`` means Q puts
more mass near ``x_i`` than P does.

Functions:
    neighbors            exact Euclidean or Chebyshev k-NN (distances, indices); tiled brute force,
                         k-d tree or sharded
    kl                   D(P || Q) from samples; ``ESTIMATORS`` lists the estimators
    kl_with_stderr       the same and its jackknife standard error
    entropy              Kozachenko-Leonenko differential entropy of P (``entropy_with_stderr``)
    cross_entropy        k-NN cross-entropy H(P, Q) = -E_P[log q]
    mutual_information   Kraskov-Stoegbauer-Grassberger I(X; Y) of paired samples

Estimators of ``kl`` (``estimator=``):

=================  ==============================================================================
``"selected"``     (default) per sample, ``"weighted"`` or ``"wkv"``, whichever has the smaller
                   estimated mean squared error (jackknife variances, WKV's bias estimated by the
                   difference of the two); plain WKV for d > 5 and where the weights exceed 1.5
``"weighted"``     weighted average of WKV over the orders k, 2k, ..., 16k whose weights
                   cancel the leading bias term (Berrett, Samworth & Yuan 2019 weights)
``"wkv"``          Wang, Kulkarni & Verdu (2009) eq. (5), exactly as published
``"wkv_adaptive"`` WKV with sample-dependent orders l_i, k_i and digamma correction (WKV 2009 Sec. III)
``"corrected"``    WKV of order 4k less its bias simulated on the Gaussians fitted to x and y
                   (a parametric-bootstrap bias correction), where both samples have Gaussian-like
                   tails (Mardia's kurtosis) and 10 points per dimension; ``"selected"`` otherwise
=================  ==============================================================================

The default's rule: never be the wrong choice, i.e. an RMSE at most 1.1x textbook WKV's wherever
WKV is nearly unbiased, and well below it where WKV's bias dominates. ``"weighted"`` alone fails
the first half: where WKV's bias is small (P = Q, or high d at small n) the weights only add
variance, and they grow with d (largest 1.0 at d = 10, 6.1 at d = 64 over 16 orders), so at
d = 64, n = 100 its RMSE is several times WKV's. ``"selected"`` takes the weights only when they
pay for their variance in the sample at hand, never where they exceed 1.5, and never above d = 5. The study that
chose it is ``experiments.knn_accuracy``: a fractional factorial design over seven families with a
known KL (isotropic, equicorrelated and differently-shaped Gaussians, P = Q, multivariate t, a
Gaussian mixture, uniform against Beta), d from 1 to 100, n from 100 to 10^5, n != m and several k.
Against the other candidates measured there (``"weighted"``, ``"wkv_adaptive"``, a continuous
shrinkage of the weights by estimated MSE, and both estimators after affine pre-whitening of the
pooled sample) ``"selected"`` met the goal in the most cells and lost significantly to WKV in the
fewest, so it stays the default. Its full run also showed the selection's worst losses, all at
d = 10 with m = n / 4 or 4 n, or with k = 4 (2-5x WKV's RMSE): there it took the weighted estimator,
whose largest orders (16k neighbours, a large part of the smaller sample) are far from local, and whose
jackknife variance does not show it. Since then ``"selected"`` is WKV above d = 5 (at d <= 5 its
worst loss in that run was 1.16x, not significant). The report lists the cells where it still loses to WKV
by more than 10% and those (WKV's bias dominating) where no candidate reaches half WKV's RMSE.

``"corrected"`` attacks that bias: WKV's bias depends on the shapes of P and Q, and for Gaussians
the shapes are known from the samples' moments, so the bias of the same estimator on samples of the
fitted Gaussians (the fits' differences shrunk to what sampling noise leaves, their KL in closed
form) estimates it (Efron & Tibshirani 1993, ch. 10, with a Gaussian working model); the order 4k
cuts the variance that the simulation adds. It is applied only where Mardia's (1970) kurtosis of
both samples is Gaussian-like, since heavy tails (multivariate t) make the Gaussian reference
over-correct, and falls back to ``"selected"`` elsewhere. It is not the default: in the study's
cells where WKV's bias dominates it still misses half WKV's RMSE in most (the report has its
ratios), and it costs about 5x ``"wkv"`` (four simulated sample pairs).

Ties (exact copies), ``ties=``. The estimators take logarithms of neighbour distances, which are
0 when a point has exact copies (in ``x`` for ``rho``, in ``y`` for ``nu``). Continuous data get
copies from rounding: 10^4 float32 draws of ``jax.random.normal`` hold a few tied pairs (0.1% of
the points; 1% at 10^5, 11% at 10^6). Policy ``ties="auto"`` (default): a point with ``c`` copies
counts them as its nearest neighbours (they are, at a distance below the rounding) but uses the
first *positive* distance, that of order ``k + c``, with ``psi(k + c)`` in place of ``psi(k)``:
the sample-dependent orders of WKV (2009, Sec. III), whose ball-mass argument holds for every
order, so the copies add no bias beyond that of rounding itself (which moves every distance by
up to one unit of resolution). Data that look discrete are refused: more than 10% of the points
of ``x`` with a copy in ``x`` (or in ``y``), a point with more than 8 copies, or too few points
at a positive distance; there rounding, not the density, sets the distances (measured on N(0, 1)
rounded to a grid of 1e-5 with n = 10^4: 2.7% of points tied, entropy biased by +0.09 nats).
``ties="error"``: any zero k-th distance is refused (the former policy). Refusals raise
``ValueError`` naming the sample with concrete inputs and give NaN under ``jax.jit``. A point of
``x`` is never its own neighbour: ``rho`` excludes it by index, so a duplicate *is* found.

Standard errors (``kl_with_stderr``, ``entropy_with_stderr``): the delete-one jackknife (two-sample
for KL), computed in closed form from one search of one extra order, since deleting a point only
moves the neighbour distances of the points that had it among their first k (or 16k) neighbours.
They cover the sampling spread, never the bias; measured on 1-D and 2-D Gaussian shifts (n = m =
1000, 200 seeds) the jackknife is conservative (standard errors 1.1-1.4x the spread over seeds,
95% intervals covering the truth in 95-100% of seeds) where the bias is small.

Mutual information: KSG estimator 1 on the joint sample with the max-norm, from the same engine
(``metric="chebyshev"``) and an exact tiled count of the marginal neighbours within ``eps_i``.

Non-finite points. A NaN or inf coordinate raises ``ValueError`` (naming the sample) with concrete
inputs; under ``jax.jit`` every estimate that involves it is NaN, and so is every neighbour distance
whose answer it makes unknowable (see :func:`neighbors`).

Search backends (``method=``): ``"brute"`` is pure JAX (any backend; jit, vmap, grad, sharding);
``"kdtree"`` is a k-d tree through ``jax.pure_callback``: pykdtree's when that optional package is
installed (Euclidean; float32 data are ranked in float32 and every row is certified against its
rounding, near ties redone in float64, so the answer is exact), SciPy's cKDTree otherwise and for
the Chebyshev metric (works under jit and vmap, the latter sequentially; the data make a host
round trip, so it is meant for CPU; the indices are not differentiated but the distances are
recomputed in JAX, so gradients with respect to the points still flow); ``"auto"`` takes the k-d tree for d <= 6 on a CPU backend and brute force otherwise.

References:
    Q. Wang, S. R. Kulkarni, S. Verdu (2009), "Divergence estimation for multidimensional densities
    via k-nearest-neighbor distances", IEEE Trans. Inf. Theory 55(5), 2392-2405.
    B. Efron, C. Stein (1981), "The jackknife estimate of variance", Ann. Statist. 9(3), 586-596.
    L. F. Kozachenko, N. N. Leonenko (1987), "Sample estimate of the entropy of a random vector",
    Problems Inform. Transmission 23(2), 95-101.
    A. Kraskov, H. Stoegbauer, P. Grassberger (2004), "Estimating mutual information",
    Phys. Rev. E 69, 066138.
    T. B. Berrett, R. J. Samworth, M. Yuan (2019), "Efficient multivariate entropy estimation via
    k-nearest neighbour distances", Ann. Statist. 47(1), 288-318.
    B. Efron, R. J. Tibshirani (1993), "An Introduction to the Bootstrap", Chapman & Hall, ch. 10
    (bias estimation by the parametric bootstrap).
    K. V. Mardia (1970), "Measures of multivariate skewness and kurtosis with applications",
    Biometrika 57(3), 519-530.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.scipy.special import digamma

from kljax import _knn_search
from kljax._contract import as_float_array, check_eagerly, check_flag, check_int, is_concrete, real

__all__ = ["ESTIMATORS", "TIES", "neighbors", "kl", "kl_with_stderr", "entropy", "entropy_with_stderr",
           "cross_entropy", "mutual_information"]

ESTIMATORS = ("selected", "weighted", "wkv", "wkv_adaptive", "corrected")
# "selected" considers "weighted" only while its largest weight is at most this (d <= 15 with 16
# orders): larger weights make both the estimate and its jackknife variance unreliable at small n.
_MAX_SELECTED_WEIGHT = 1.5
# ... and only up to this dimension: in experiments.knn_accuracy's full run the selection's worst loss to
# WKV at d <= 5 was 1.16x (not significant), but at d = 10 it took the weights where they lost up to 5x
# (m = n / 4 or 4 n, k = 4), their largest orders far from local and the jackknife blind to it.
_MAX_SELECTED_DIM = 5
# The weighted estimator averages WKV over the orders k, 2k, ..., _WEIGHTED_ORDERS * k.
_WEIGHTED_ORDERS = 16
# "corrected": WKV of order _CORRECTED_ORDER * k less its bias on _REFERENCE_DRAWS sample pairs of the
# Gaussians fitted to x and y, where both samples pass Mardia's kurtosis check (at most
# _KURTOSIS_Z standard errors above the Gaussian value) and have at least _REFERENCE_POINTS_PER_DIM
# points per dimension; "selected" otherwise.
_CORRECTED_ORDER = 4
_REFERENCE_DRAWS = 4
_REFERENCE_POINTS_PER_DIM = 10
_KURTOSIS_Z = 3.0
_REFERENCE_SEED = 0
# Tie policies (``ties=``), see the module docstring.
TIES = ("auto", "error")
# ties="auto" refuses data where more than this fraction of the points have an exact copy ...
_MAX_TIED_FRACTION = 0.1
# ... or where a point has more copies than this (the search looks this much deeper).
_MAX_COPIES = 8


# ------------------------------------------------------------------------------------------------
# Validation
# ------------------------------------------------------------------------------------------------


def _samples(name: str, x) -> jax.Array:
    x = as_float_array(name, x)
    if x.ndim < 2:
        raise ValueError(f"`{name}` must have shape (..., num_points, dim), got shape {x.shape}.")
    if x.shape[-1] < 1:
        raise ValueError(f"`{name}` must have at least one coordinate, got shape {x.shape}.")
    return x


def _pair(name_a: str, a, name_b: str, b) -> tuple[jax.Array, jax.Array]:
    a, b = _samples(name_a, a), _samples(name_b, b)
    if a.shape[-1] != b.shape[-1]:
        raise ValueError(f"`{name_a}` and `{name_b}` must have the same dimension (last axis), got "
                         f"shapes {a.shape} and {b.shape}.")
    if a.shape[:-2] != b.shape[:-2]:
        raise ValueError(f"`{name_a}` and `{name_b}` must have the same batch shape (axes before the "
                         f"last two), got shapes {a.shape} and {b.shape}.")
    dtype = jnp.result_type(a.dtype, b.dtype)
    return a.astype(dtype), b.astype(dtype)


def _check_order(k, *, limit: int, limit_text: str) -> None:
    check_int("k", k, 1)
    if k > limit:
        raise ValueError(f"`k`={k} is too large: it must be at most {limit_text}.")


def _check_block_size(block_size) -> None:
    if block_size is None:
        return
    if isinstance(block_size, bool) or not isinstance(block_size, (int, np.integer)) or block_size < 1:
        raise ValueError(f"`block_size` must be None (automatic) or a positive int, got {block_size!r}.")


def _check_num_points(name: str, x: jax.Array, minimum: int) -> None:
    if x.shape[-2] < minimum:
        raise ValueError(f"`{name}` needs at least {minimum} points, got {x.shape[-2]} "
                         f"(shape {x.shape}).")


# ------------------------------------------------------------------------------------------------
# Batching and dispatch
# ------------------------------------------------------------------------------------------------


def _over_batch(fn, *arrays):
    """Applies ``fn`` (written for unbatched (n, d) inputs) over the common leading axes."""
    batch = arrays[0].shape[:-2]
    if not batch:
        return fn(*arrays)
    flat = [a.reshape((-1,) + a.shape[-2:]) for a in arrays]
    out = jax.vmap(fn)(*flat)
    return jax.tree.map(lambda o: o.reshape(batch + o.shape[1:]), out)


@functools.lru_cache(maxsize=None)
def _jitted(core, static: tuple):
    return jax.jit(lambda *arrays: _over_batch(functools.partial(core, **dict(static)), *arrays))


def _run(core, arrays, **static):
    """Runs ``core`` over the batch, jitted (and cached) for concrete inputs.

    ``core`` also receives ``splits``: for each (unbatched, concrete) input, the (mesh, axes) its
    rows are split over, or None. With any split input the others are first replicated over that
    mesh, and the searches inside run under ``shard_map``.
    """
    splits = tuple(_knn_search.row_split(a) for a in arrays)
    mesh = next((split[0] for split in splits if split is not None), None)
    if mesh is not None:
        arrays = tuple(a if split is not None else _knn_search.replicate(a, mesh)
                       for a, split in zip(arrays, splits))
    static = dict(static, splits=splits)
    if all(is_concrete(a) for a in arrays):
        return _jitted(core, tuple(sorted(static.items())))(*arrays)
    return _over_batch(functools.partial(core, **static), *arrays)


def _finish(value, problems: dict, eager: bool):
    """Raises (eager) or turns into NaN (traced) the estimates flagged by ``problems``.

    ``value`` is an array or a tuple of arrays of one shape (estimate, standard error)."""
    first = value[0] if isinstance(value, tuple) else value
    bad = jnp.zeros(jnp.shape(first), bool)
    for message, flag in problems.items():
        if eager and bool(jnp.any(flag)):
            raise ValueError(message)
        bad = bad | flag
    if isinstance(value, tuple):
        return tuple(jnp.where(bad, jnp.nan, v) for v in value)
    return jnp.where(bad, jnp.nan, value)


_DUPLICATES_IN_X = (
    "`{x}` has duplicated points: some point has at least k={k} exact copies, so its k-th "
    "nearest-neighbour distance within `{x}` is 0 and the k-NN estimate is undefined (log 0). "
    "Remove duplicates, add jitter, or raise `k` above the largest multiplicity.")
_DUPLICATES_ACROSS = (
    "some point of `{x}` coincides with at least k={k} points of `{y}`, so its k-th nearest-neighbour "
    "distance in `y` is 0 and the k-NN estimate is undefined (log 0). Remove duplicates, add "
    "jitter, or raise `k` above the largest multiplicity.")
_TIES_IN_X = (
    "`{x}` looks discrete: more than {fraction:.0%} of its points have an exact copy in `{x}`, a "
    "point has more than {copies} copies, or fewer than k={k} other points are at a positive "
    "distance. The k-NN estimates need continuous data; copies from float rounding are handled "
    "(ties=\"auto\") below these limits. Use unrounded (e.g. float64) data, add jitter at the "
    "data's resolution, or use kljax.discrete for discrete data.")
_TIES_ACROSS = (
    "`{x}` and `{y}` share many exact points: more than {fraction:.0%} of the points of `{x}` have "
    "an exact copy in `{y}`, a point has more than {copies} copies in `{y}`, or fewer than k={k} "
    "points of `{y}` are at a positive distance. The k-NN estimates need continuous data; use "
    "unrounded (e.g. float64) data, add jitter at the data's resolution, or use kljax.discrete.")
_NOT_FINITE = "the input contains NaN or inf"


# ------------------------------------------------------------------------------------------------
# Search
# ------------------------------------------------------------------------------------------------


def neighbors(queries, refs, k: int, *, exclude_self: bool = False, block_size: int | None = None,
              method: str = "auto", metric: str = "euclidean") -> tuple[jax.Array, jax.Array]:
    """Exact k nearest neighbours of every query among ``refs``, Euclidean or Chebyshev.

    Distances are exact (recomputed from coordinate differences, never from the cancelling form
    ``|a|^2 - 2 a.b + |b|^2``), so they are never negative or NaN, also far from the origin. Ties
    are broken by the smaller reference index, as a stable ``argsort`` of the exact distances would.
    The brute path (d >= 4) pre-selects candidates with that fast matmul form on centred data and
    certifies each answer against its rounding error; rows that cannot be certified (near or
    exact ties) are recomputed from differences. In float32, neighbours whose distances differ by
    less than float32 rounding may come back in either order on the k-d tree path, which ranks in
    float64. See the module docstring for ``method``.

    Non-finite points: with concrete inputs a NaN or inf coordinate raises ``ValueError``. Under
    ``jax.jit`` (or across processes, where the values are not checked) a query with one gets NaN
    distances, and a reference with one gives NaN distances to *every* query of its problem (it
    could be, or hide, anyone's nearest neighbour); the indices of those rows are placeholders
    ``0, 1, ..., k - 1``, in range but meaningless.

    Several devices: when ``refs`` (or else ``queries``) is a concrete ``jax.Array`` whose rows are
    split by a ``NamedSharding`` (e.g. ``jax.device_put(y, NamedSharding(mesh, P("x")))``), every
    device searches its shard under ``jax.shard_map`` and the per-shard candidates are gathered and
    merged; the answer is identical to the single-device one. The same holds across processes after
    ``jax.distributed.initialize(...)`` with a global array from
    ``jax.make_array_from_process_local_data`` (the result is then replicated on every process;
    the CPU backend's cross-process collectives are gloo's, JAX's default). Inside a user's
    ``jax.jit`` the sharding is not visible: XLA partitions the plain brute-force search, while
    the k-d tree's host callback cannot be partitioned (use ``method="brute"`` there, or call
    outside ``jit``).

    Args:
        queries: points, shape ``(..., n, d)``.
        refs: reference points, shape ``(..., m, d)`` (same leading axes and ``d``).
        k: number of neighbours, ``1 <= k <= m`` (``<= m - 1`` with ``exclude_self``).
        exclude_self: a bool; ``queries`` *are* ``refs`` (same shape; row i of both is the same
            point): drop each query's own index i. This goes by index, not by distance 0, so other
            copies of a duplicated point are still returned (at distance 0).
        block_size: the brute path never forms the ``(n, m)`` distance matrix: it works in tiles
            of about ``block_size^2`` entries (``block_size / 4`` queries by ``4 block_size``
            references, rows spread evenly over the tiles) with a running top-k per query, so
            memory is O(block_size^2 + n k d) per problem (times the batch size under ``vmap``).
            ``None`` picks 2048 (16 MiB tiles in float32, faster on CPU than larger ones; small
            problems are one tile). The k-d tree never forms the matrix.
        method: ``"auto"``, ``"brute"`` or ``"kdtree"``.
        metric: ``"euclidean"`` (default) or ``"chebyshev"`` (max-norm ``max_c |q_c - r_c|``, the
            metric of the KSG mutual information estimator; always the difference form on the
            brute path, ``p=inf`` in the k-d tree; exact and sharded alike).

    Returns:
        ``(distances, indices)``, each ``(..., n, k)``, sorted ascending by distance; distances in the
        input dtype, indices ``int32`` into ``refs``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.knn import neighbors
        >>> refs = jnp.array([[0.0, 0.0], [3.0, 4.0], [1.0, 0.0]])
        >>> distances, indices = neighbors(jnp.array([[0.0, 0.5]]), refs, 2)
        >>> print(indices.tolist(), [round(float(v), 4) for v in distances[0]])
        [[0, 2]] [0.5, 1.118]
        >>> _, own = neighbors(refs, refs, 1, exclude_self=True)
        >>> print(own[:, 0].tolist())
        [2, 2, 0]

    References:
        J. L. Bentley (1975), "Multidimensional binary search trees used for associative
        searching", Commun. ACM 18(9) (the k-d tree); SciPy ``scipy.spatial.cKDTree``.
    """
    queries, refs = _pair("queries", queries, "refs", refs)
    check_flag("exclude_self", exclude_self)
    if exclude_self and queries.shape != refs.shape:
        raise ValueError("`exclude_self=True` means `queries` are `refs` (same points, same order), "
                         f"but their shapes differ: {queries.shape} and {refs.shape}.")
    m = refs.shape[-2]
    if exclude_self:
        _check_order(k, limit=m - 1, limit_text=f"m - 1 = {m - 1} (number of refs minus the query itself)")
    else:
        _check_order(k, limit=m, limit_text=f"m = {m} (the number of refs)")
    _check_block_size(block_size)
    _knn_search.resolve_method(method, refs.shape[-1])
    if metric not in _knn_search.METRICS:
        raise ValueError(f"`metric` must be one of {_knn_search.METRICS}, got {metric!r}.")
    check_eagerly("queries", queries, real)
    check_eagerly("refs", refs, real)
    return _run(_neighbors_core, (queries, refs), k=int(k), exclude_self=bool(exclude_self),
                block_size=block_size, method=method, metric=metric)


def _neighbors_core(queries, refs, *, splits, metric="euclidean", **options):
    return _knn_search.search(queries, refs, query_split=splits[0], ref_split=splits[1],
                              metric=metric, **options)


class _Positive(NamedTuple):
    """Neighbours at positive distance of each query (see :func:`_positive_neighbours`)."""

    distances: jax.Array  # (n, depth): column j is the neighbour of order j + 1 + copies
    index: jax.Array  # (n, depth) int32 into the references
    copies: jax.Array  # (n,) int32: references at distance 0 (skipped), 0 with ties="error"
    bad: jax.Array  # () bool: the tie policy's limits are exceeded (or, "error": a zero distance)


def _positive_neighbours(queries, refs, depth, used, *, k, exclude_self, ties, block_size, method,
                         query_split, ref_split, metric="euclidean"):
    """The ``depth`` nearest references at a *positive* distance of every query, and the copies skipped.

    ``ties="auto"``: exact copies of a query (distance 0) are counted, not used: the neighbour of
    order ``j`` among the others is the ``(j + copies)``-th neighbour, whose order the estimators
    use in their digamma terms. ``bad`` flags data that look discrete: more than
    ``_MAX_TIED_FRACTION`` of the queries with a copy, a query with more than ``_MAX_COPIES``, or
    fewer than ``used`` references at positive distance. ``ties="error"``: no skipping; ``bad``
    flags a zero k-th distance (the smallest order used). Distances beyond the references are ``inf``.
    """
    available = refs.shape[0] - int(exclude_self)
    extra = _MAX_COPIES + 1 if ties == "auto" else 0
    width = depth + extra

    def find(count):
        found = _knn_search.search(queries, refs, min(count, available), exclude_self=exclude_self,
                                   block_size=block_size, method=method, query_split=query_split,
                                   ref_split=ref_split, metric=metric)
        short = width - found[0].shape[1]
        if short:  # inf distances (and index 0) beyond the references or the first search
            n = found[0].shape[0]
            found = (jnp.concatenate([found[0], jnp.full((n, short), jnp.inf, found[0].dtype)], 1),
                     jnp.concatenate([found[1], jnp.zeros((n, short), found[1].dtype)], 1))
        return found

    distances, index = find(depth)
    if extra and available > depth:
        # Copies are rare in continuous data: look deeper only when some point has one (under
        # vmap both branches run).
        distances, index = lax.cond(jnp.any(distances[:, 0] == 0), lambda: find(width),
                                    lambda: (distances, index))
    if ties == "error":
        copies = jnp.zeros(distances.shape[:1], jnp.int32)
        return _Positive(distances, index, copies, jnp.any(distances[:, k - 1] == 0))
    copies = jnp.sum(distances[:, :extra] == 0, axis=1, dtype=jnp.int32)
    columns = jnp.minimum(copies, extra)[:, None] + jnp.arange(depth)[None, :]
    distances = jnp.take_along_axis(distances, columns, axis=1)
    index = jnp.take_along_axis(index, columns, axis=1)
    tied = jnp.mean((copies > 0).astype(jnp.float32)) > _MAX_TIED_FRACTION
    bad = tied | jnp.any(copies > _MAX_COPIES) | jnp.any(distances[:, :used] == jnp.inf)
    return _Positive(distances, index, copies, bad)


def _not_finite(*arrays):
    return functools.reduce(jnp.logical_or, [~jnp.all(jnp.isfinite(a)) for a in arrays])


def _scatter(size: int, index: jax.Array, values: jax.Array) -> jax.Array:
    """``out[j] = sum of values where index == j`` (non-finite values dropped), shape (size,)."""
    values = jnp.where(jnp.isfinite(values), values, 0)
    return jnp.zeros((size,), values.dtype).at[index.reshape(-1)].add(values.reshape(-1))


def _removal_effects(distances, orders, weights, d):
    """Change of ``sum_o w_o d log r_o(i)`` when the neighbour in column p of query i is removed.

    ``distances`` (n, depth) are the positive-distance neighbours (column j: order j + 1, after the
    skipped copies), with ``depth > max(orders)``. Removing the neighbour in column ``p < o`` moves
    the order-o neighbour to column o: ``d (log r_{o+1} - log r_o)``. Returns (n, max(orders)).
    """
    log_r = jnp.log(distances)
    columns = np.asarray(orders) - 1
    step = d * (log_r[:, columns + 1] - log_r[:, columns])  # (n, len(orders))
    step = jnp.where(jnp.isfinite(step), step, 0)
    below = (np.arange(max(orders))[None, :] < np.asarray(orders)[:, None]).astype(np.float64)
    return (step * jnp.asarray(weights, step.dtype)[None, :]) @ jnp.asarray(below, step.dtype)


def _jackknife_variance(replicates: jax.Array) -> jax.Array:
    """Delete-one jackknife variance ``(N - 1) / N sum_j (T_(j) - mean)^2`` (Efron & Stein 1981)."""
    size = replicates.shape[0]
    return (size - 1) / size * jnp.sum(jnp.square(replicates - jnp.mean(replicates)))


# ------------------------------------------------------------------------------------------------
# KL divergence
# ------------------------------------------------------------------------------------------------


def _weights(d: int, orders: tuple[int, ...]) -> np.ndarray:
    """Minimum-norm weights with sum 1 that cancel the leading bias term of the k-NN estimators.

    Berrett, Samworth & Yuan (2019, Sec. 3) expand the bias of the order-j estimator in terms
    proportional to Gamma(j + 2l/d) / Gamma(j), l = 1, 2, ...; requiring
    ``sum_j w_j Gamma(j + 2/d) / Gamma(j) = 0`` removes the l = 1 term (the largest, O((j/n)^(2/d))).
    Measured on Gaussians, cancelling more terms inflates the variance more than it removes bias
    for n <= 10^4 (and badly so for d >= 10), so one constraint is used.
    """
    j = np.asarray(orders, dtype=np.float64)
    import scipy.special

    constraints = np.stack([np.ones_like(j), np.exp(scipy.special.gammaln(j + 2.0 / d)
                                                    - scipy.special.gammaln(j))])
    target = np.array([1.0, 0.0])
    return constraints.T @ np.linalg.solve(constraints @ constraints.T, target)


def _weighted_orders(k: int, n: int, m: int) -> tuple[int, ...]:
    count = min(_WEIGHTED_ORDERS, (n - 1) // k, m // k)
    return tuple(k * i for i in range(1, count + 1))


def _digamma(values, dtype):
    return digamma(values.astype(dtype))


def _kl_terms(x, y, orders, depth, *, k, ties, block_size, method, splits):
    """The two searches and the per-point, per-order WKV terms ``(n, len(orders))`` of ``x``, ``y``."""
    d = x.shape[1]
    dtype = x.dtype
    search = dict(ties=ties, block_size=block_size, method=method)
    within = _positive_neighbours(x, x, depth, max(orders), k=k, exclude_self=True, query_split=splits[0],
                                  ref_split=splits[0], **search)
    across = _positive_neighbours(x, y, depth, max(orders), k=k, exclude_self=False,
                                  query_split=splits[0], ref_split=splits[1], **search)
    columns = np.asarray(orders) - 1
    order_values = jnp.asarray(orders, dtype)[None, :]
    rho, nu = within.distances[:, columns], across.distances[:, columns]
    # Per point and order o (WKV 2009 eq. 5; the digamma terms, zero without copies, are those of
    # WKV's Sec. III for the orders o + copies that the positive distances have).
    per_order = (d * (jnp.log(nu) - jnp.log(rho))
                 + digamma(order_values + within.copies[:, None].astype(dtype))
                 - digamma(order_values + across.copies[:, None].astype(dtype)))
    return within, across, rho, nu, per_order


def _selection(per_order, within, across, orders, weights, d, n, m):
    """The weights ``"selected"`` uses: ``weights`` or WKV's (the first order), by estimated MSE.

    ``"weighted"`` is taken as unbiased; WKV's squared bias is estimated by the squared difference
    of the two less its variance; all variances are jackknife ones (linear in the weights).
    """
    dtype = per_order.dtype
    first = np.eye(len(orders))[0]

    def variance(w):
        return jnp.square(_jackknife_stderr(per_order @ jnp.asarray(w, dtype), within, across, orders,
                                            w, d, n, m))

    difference = jnp.mean(per_order @ jnp.asarray(weights - first, dtype))
    squared_bias = jnp.maximum(jnp.square(difference) - variance(weights - first), 0)
    use_weighted = variance(weights) < variance(first) + squared_bias
    return jnp.where(use_weighted, jnp.asarray(weights, dtype), jnp.asarray(first, dtype))


def _corrected_applies(k: int, n: int, m: int, d: int) -> bool:
    """Whether ``"corrected"`` has its order ``4k`` and enough points per dimension (else "selected")."""
    return (_CORRECTED_ORDER * k in _weighted_orders(k, n, m)
            and min(n, m) >= _REFERENCE_POINTS_PER_DIM * d)


def _gaussian_pair_fit(x, y):
    """Gaussians fitted to ``x`` and ``y``, their differences shrunk to what sampling noise leaves.

    Sample means and covariances are noisy, and the noise alone makes two fitted Gaussians differ
    (KL about (d^2 + 3 d) / (4 n) between fits to one distribution). The mean and covariance
    differences are therefore shrunk towards the pooled fit by the James-Stein factor
    ``max(0, 1 - noise / observed)``, with both measured in the pooled-whitened coordinates and the
    noise their expectation for Gaussian data with equal parameters: ``d (1/n + 1/m)`` for the
    means, ``(d^2 + d) (1/(n-1) + 1/(m-1))`` for the covariances (squared Frobenius norm).
    Returns (mean_x, cholesky_x, mean_y, cholesky_y).
    """
    n, d = x.shape
    m = y.shape[0]
    eye = jnp.eye(d, dtype=x.dtype)
    mean_x, mean_y = jnp.mean(x, axis=0), jnp.mean(y, axis=0)
    centred_x, centred_y = x - mean_x[None, :], y - mean_y[None, :]
    cov_x = centred_x.T @ centred_x / (n - 1)
    cov_y = centred_y.T @ centred_y / (m - 1)
    pooled = ((n - 1) * cov_x + (m - 1) * cov_y) / (n + m - 2)

    def cholesky(cov):
        return jnp.linalg.cholesky(cov + 1e-6 * jnp.trace(cov) / d * eye)

    tril = cholesky(pooled)

    def whiten(a):
        return jax.scipy.linalg.solve_triangular(tril, a, lower=True)

    cov_difference = whiten(whiten(cov_x - cov_y).T)
    mean_difference = whiten(mean_x - mean_y)
    tiny = jnp.finfo(x.dtype).tiny
    shrink_cov = jnp.clip(1 - (d * d + d) * (1 / (n - 1) + 1 / (m - 1))
                          / jnp.maximum(jnp.sum(jnp.square(cov_difference)), tiny), 0, 1)
    shrink_mean = jnp.clip(1 - d * (1 / n + 1 / m) / jnp.maximum(jnp.sum(jnp.square(mean_difference)), tiny),
                           0, 1)
    centre = (n * mean_x + m * mean_y) / (n + m)
    return (centre + shrink_mean * (mean_x - centre), cholesky(pooled + shrink_cov * (cov_x - pooled)),
            centre + shrink_mean * (mean_y - centre), cholesky(pooled + shrink_cov * (cov_y - pooled)))


def _gaussian_kl(mean_p, tril_p, mean_q, tril_q):
    """Closed-form D(N(mean_p, L_p L_p^T) || N(mean_q, L_q L_q^T)) (Rasmussen & Williams 2006, A.23)."""
    a = jax.scipy.linalg.solve_triangular(tril_q, tril_p, lower=True)
    b = jax.scipy.linalg.solve_triangular(tril_q, mean_q - mean_p, lower=True)
    log_det = 2 * (jnp.sum(jnp.log(jnp.diag(tril_q))) - jnp.sum(jnp.log(jnp.diag(tril_p))))
    return 0.5 * (jnp.sum(a * a) + jnp.sum(b * b) - mean_p.shape[0] + log_det)


def _kurtosis_is_gaussian(a):
    """Mardia's (1970) multivariate kurtosis ``b2 = mean((z_i^T S^-1 z_i)^2)`` of ``a`` is at most
    ``_KURTOSIS_Z`` of its standard errors under normality, ``sqrt(8 d (d + 2) / n)``, above the
    Gaussian value ``d (d + 2)``: the tails are not heavier than a Gaussian's."""
    n, d = a.shape
    centred = a - jnp.mean(a, axis=0, keepdims=True)
    cov = centred.T @ centred / n
    tril = jnp.linalg.cholesky(cov + 1e-6 * jnp.trace(cov) / d * jnp.eye(d, dtype=a.dtype))
    white = jax.scipy.linalg.solve_triangular(tril, centred.T, lower=True)
    b2 = jnp.mean(jnp.square(jnp.sum(white * white, axis=0)))
    return b2 <= d * (d + 2) + _KURTOSIS_Z * math.sqrt(8 * d * (d + 2) / n)


def _reference_bias(x, y, order, *, block_size, method):
    """Bias of the order-``order`` WKV estimate on the Gaussians fitted to ``x``, ``y`` (shrunk fits,
    :func:`_gaussian_pair_fit`): mean over ``_REFERENCE_DRAWS`` simulated sample pairs of the same
    sizes less the fits' closed-form KL, and whether both samples have Gaussian-like tails."""
    n, d = x.shape
    m = y.shape[0]
    dtype = x.dtype
    mean_x, tril_x, mean_y, tril_y = _gaussian_pair_fit(x, y)
    offset = math.log(m) - math.log(n - 1)

    def one(key):
        key_x, key_y = jax.random.split(key)
        ref_x = mean_x[None, :] + jax.random.normal(key_x, (n, d), dtype) @ tril_x.T
        ref_y = mean_y[None, :] + jax.random.normal(key_y, (m, d), dtype) @ tril_y.T
        per_order = _kl_terms(ref_x, ref_y, (order,), order, k=order, ties="auto", block_size=block_size,
                              method=method, splits=(None, None))[-1]
        return jnp.mean(per_order[:, 0]) + offset

    keys = jax.random.split(jax.random.key(_REFERENCE_SEED), _REFERENCE_DRAWS)
    simulated = lax.map(one, keys)
    bias = jnp.mean(simulated) - _gaussian_kl(mean_x, tril_x, mean_y, tril_y)
    return lax.stop_gradient(bias), _kurtosis_is_gaussian(x) & _kurtosis_is_gaussian(y)


def _kl_core(x, y, *, k, estimator, ties, block_size, method, splits, with_stderr=False):
    n, d = x.shape
    m = y.shape[0]
    dtype = x.dtype
    offset = math.log(m) - math.log(n - 1)
    if estimator == "corrected":
        if not _corrected_applies(k, n, m, d):
            estimator = "selected"
        else:
            return _corrected_core(x, y, k=k, ties=ties, block_size=block_size, method=method,
                                   splits=splits, with_stderr=with_stderr)
    selected = estimator == "selected"
    orders = _weighted_orders(k, n, m) if estimator in ("weighted", "selected") else (k,)
    if selected and len(orders) < 2:
        selected, orders = False, (k,)  # plain WKV
    weights = _weights(d, orders) if len(orders) > 1 else np.ones(1)
    if selected and (np.abs(weights).max() > _MAX_SELECTED_WEIGHT or d > _MAX_SELECTED_DIM):
        selected, orders, weights = False, (k,), np.ones(1)  # plain WKV
    depth = max(orders) + int(with_stderr or selected)
    within, across, rho, nu, per_order = _kl_terms(x, y, orders, depth, k=k, ties=ties,
                                                   block_size=block_size, method=method, splits=splits)
    if estimator == "wkv_adaptive":
        # WKV 2009 Sec. III: radius eps_i = max(rho_k(i), nu_k(i)); l_i, k_i = numbers of points of
        # x (without x_i) and of y within eps_i (exact copies included); rho_{l_i}, nu_{k_i} = the
        # farthest of them.
        radius = jnp.maximum(rho[:, 0], nu[:, 0])
        count_x, rho_l = _knn_search.ball_statistics(x, x, radius, exclude_self=True,
                                                     block_size=block_size)
        count_y, nu_k = _knn_search.ball_statistics(x, y, radius, block_size=block_size)
        terms = (d * (jnp.log(nu_k) - jnp.log(rho_l)) + _digamma(count_x, dtype)
                 - _digamma(count_y, dtype))
    else:
        if selected:
            weights_used = _selection(per_order, within, across, orders, weights, d, n, m)
        else:
            weights_used = jnp.asarray(weights, dtype)
        terms = per_order @ weights_used
    value = (jnp.mean(terms) + offset).astype(dtype)
    flags = (within.bad, across.bad, _not_finite(x, y))
    if not with_stderr:
        return value, flags
    if estimator == "wkv_adaptive":
        raise NotImplementedError  # kl_with_stderr refuses it before tracing
    stderr = _jackknife_stderr(terms, within, across, orders, weights_used, d, n, m)
    return (value, stderr.astype(dtype)), flags


def _jackknife_replicates(terms, within, across, orders, weights, d, n, m):
    """Delete-one replicates ``(without_x (n,), without_y (m,))`` of ``mean(terms)`` (constants left out)."""
    total = jnp.sum(terms)
    shift_x = _scatter(n, within.index[:, :max(orders)],
                       -_removal_effects(within.distances, orders, weights, d))
    without_x = (total - terms + shift_x) / (n - 1)
    shift_y = _scatter(m, across.index[:, :max(orders)],
                       _removal_effects(across.distances, orders, weights, d))
    without_y = (total + shift_y) / n
    return without_x, without_y


def _jackknife_stderr(terms, within, across, orders, weights, d, n, m):
    """Two-sample delete-one jackknife standard error (Arvesen 1969) of ``mean(terms) + const``.

    ``terms`` are the per-point terms ``sum_o w_o t_o(i)`` of the KL estimators. Removing x_j drops
    its term and moves to the next order the neighbours of the points that had x_j among their
    first o; removing y_j moves their nu. Removing a skipped exact copy is ignored (it moves no
    distance). The constants (``log(m / (n - 1))`` and its deleted versions) add the same amount to
    every replicate of one sample, so they do not change the variance and are left out.
    """
    without_x, without_y = _jackknife_replicates(terms, within, across, orders, weights, d, n, m)
    return jnp.sqrt(_jackknife_variance(without_x) + _jackknife_variance(without_y))


def _corrected_core(x, y, *, k, ties, block_size, method, splits, with_stderr):
    """``"corrected"`` (see :func:`kl`): Gaussian-reference bias correction of WKV at order 4k where
    the tails are Gaussian-like, ``"selected"`` otherwise; one pair of searches serves both."""
    n, d = x.shape
    m = y.shape[0]
    dtype = x.dtype
    offset = math.log(m) - math.log(n - 1)
    orders = _weighted_orders(k, n, m)
    column = orders.index(_CORRECTED_ORDER * k)
    weights = _weights(d, orders)
    within, across, _, _, per_order = _kl_terms(x, y, orders, max(orders) + 1, k=k, ties=ties,
                                                block_size=block_size, method=method, splits=splits)
    if np.abs(weights).max() > _MAX_SELECTED_WEIGHT:
        selected_weights, weights = jnp.asarray(np.eye(len(orders))[0], dtype), np.eye(len(orders))[0]
    else:
        selected_weights = _selection(per_order, within, across, orders, weights, d, n, m)
    corrected_weights = np.eye(len(orders))[column]
    bias, gaussian = _reference_bias(x, y, _CORRECTED_ORDER * k, block_size=block_size, method=method)
    weights_used = jnp.where(gaussian, jnp.asarray(corrected_weights, dtype), selected_weights)
    terms = per_order @ weights_used
    value = (jnp.mean(terms) + offset - jnp.where(gaussian, bias, 0)).astype(dtype)
    flags = (within.bad, across.bad, _not_finite(x, y))
    if not with_stderr:
        return value, flags
    # The simulated bias adds the variance of a mean of _REFERENCE_DRAWS estimates like the data's.
    inflation = jnp.where(gaussian, math.sqrt(1 + 1 / _REFERENCE_DRAWS), 1.0)
    stderr = _jackknife_stderr(terms, within, across, orders, weights_used, d, n, m) * inflation
    return (value, stderr.astype(dtype)), flags


# Candidates for the default measured by ``experiments.knn_accuracy`` (the study); see _kl_study.
_STUDY_CANDIDATES = ("shrunk", "wkv_whitened", "selected_whitened")


def _kl_study(x, y, *, k: int = 1, candidates: bool = True) -> dict:
    """Every estimator of :func:`kl` but ``"wkv_adaptive"``, from one pair of searches, for the study.

    Unbatched ``x`` (n, d), ``y`` (m, d) (``jax.vmap`` it over sample sets); default ``ties``,
    ``method`` and ``block_size``, no validation. Returns name -> ``(estimate, stderr)``; the
    ``"wkv"``, ``"weighted"`` and ``"selected"`` entries equal :func:`kl_with_stderr`'s. With
    ``candidates`` also ``"corrected"`` (equal to :func:`kl_with_stderr`'s; it simulates reference
    samples, so the CI-scale study leaves it out) and (NaN where they do not apply):

    * ``"shrunk"``: ``wkv + lambda (weighted - wkv)`` with the ``lambda`` in [0, 1] that minimises
      the estimated MSE ``var(wkv + lambda delta) + (1 - lambda)^2 b^2`` (``b^2`` WKV's squared bias
      as ``"selected"`` estimates it, variances and the covariance from the jackknife), i.e. a
      continuous version of ``"selected"`` without its weight cap;
    * ``"wkv_whitened"``, ``"selected_whitened"``: the same estimators after the affine map that
      whitens the pooled sample (KL is invariant under it; the k-NN estimators are not), where
      ``n + m >= 5 d``.
    """
    n, d = x.shape
    m = y.shape[0]
    dtype = x.dtype
    offset = math.log(m) - math.log(n - 1)
    splits = (None, None)
    orders = _weighted_orders(k, n, m)
    many = len(orders) >= 2
    weights = _weights(d, orders) if many else np.ones(1)
    first = np.eye(len(orders))[0]
    capped = (not many) or np.abs(weights).max() > _MAX_SELECTED_WEIGHT or d > _MAX_SELECTED_DIM
    nan = jnp.full((), jnp.nan, dtype)

    def estimates(a, b, names):
        within, across, _, _, per_order = _kl_terms(a, b, orders, max(orders) + 1, k=k, ties="auto",
                                                    block_size=None, method="auto", splits=splits)

        def combine(w):
            terms = per_order @ jnp.asarray(w, dtype)
            se = _jackknife_stderr(terms, within, across, orders, w, d, n, m)
            return (jnp.mean(terms) + offset).astype(dtype), se.astype(dtype)

        out = {"wkv": combine(first)}
        if "weighted" in names:
            out["weighted"] = combine(weights) if many else (nan, nan)
        if "selected" in names:
            out["selected"] = out["wkv"] if capped else combine(
                _selection(per_order, within, across, orders, weights, d, n, m))
        if "corrected" in names:
            if not _corrected_applies(k, n, m, d):
                out["corrected"] = out["selected"]
            else:
                bias, gaussian = _reference_bias(a, b, _CORRECTED_ORDER * k, block_size=None, method="auto")
                estimate, se = combine(np.eye(len(orders))[orders.index(_CORRECTED_ORDER * k)])
                out["corrected"] = (
                    jnp.where(gaussian, estimate - bias.astype(dtype), out["selected"][0]),
                    jnp.where(gaussian, se * math.sqrt(1 + 1 / _REFERENCE_DRAWS), out["selected"][1]))
        if "shrunk" in names:
            if not many:
                out["shrunk"] = out["wkv"]
            else:
                delta = weights - first
                rep_w = _jackknife_replicates(per_order @ jnp.asarray(first, dtype), within, across,
                                              orders, first, d, n, m)
                rep_d = _jackknife_replicates(per_order @ jnp.asarray(delta, dtype), within, across,
                                              orders, delta, d, n, m)

                def covariance(a_reps, b_reps):
                    total = 0.0
                    for ra, rb in zip(a_reps, b_reps):
                        size = ra.shape[0]
                        total = total + (size - 1) / size * jnp.sum((ra - jnp.mean(ra)) * (rb - jnp.mean(rb)))
                    return total

                var_delta = covariance(rep_d, rep_d)
                cov = covariance(rep_w, rep_d)
                difference = jnp.mean(per_order @ jnp.asarray(delta, dtype))
                squared_bias = jnp.maximum(jnp.square(difference) - var_delta, 0)
                lam = jnp.clip((squared_bias - cov) / jnp.maximum(var_delta + squared_bias, 1e-30), 0, 1)
                w = jnp.asarray(first, dtype) + lam * jnp.asarray(delta, dtype)
                terms = per_order @ w
                se = _jackknife_stderr(terms, within, across, orders, w, d, n, m)
                out["shrunk"] = ((jnp.mean(terms) + offset).astype(dtype), se.astype(dtype))
        return out

    result = estimates(x, y, ("weighted", "selected") + (("shrunk", "corrected") if candidates else ()))
    if candidates:
        if n + m >= 5 * d:
            pooled = jnp.concatenate([x, y]).astype(jnp.float64 if jax.config.jax_enable_x64 else dtype)
            centre = jnp.mean(pooled, axis=0, keepdims=True)
            cov = jnp.cov(pooled, rowvar=False).reshape(d, d)
            tril = jnp.linalg.cholesky(cov + 1e-12 * jnp.trace(cov) / d * jnp.eye(d, dtype=cov.dtype))

            def whiten(a):
                return jax.scipy.linalg.solve_triangular(tril, (a - centre).T, lower=True).T.astype(dtype)

            white = estimates(whiten(x), whiten(y), ("selected",))
            result["wkv_whitened"], result["selected_whitened"] = white["wkv"], white["selected"]
        else:
            result["wkv_whitened"] = result["selected_whitened"] = (nan, nan)
    return result


def _entropy_core(x, *, k, ties, block_size, method, splits, with_stderr=False):
    n, d = x.shape
    dtype = x.dtype
    within = _positive_neighbours(x, x, k + int(with_stderr), k, k=k, exclude_self=True, ties=ties,
                                  block_size=block_size, method=method, query_split=splits[0],
                                  ref_split=splits[0])
    # Kraskov et al. (2004) eq. (20) with the Euclidean ball, per point:
    # psi(n) - psi(k_i) + log V_d + d log rho_{k_i}(i), k_i = k + copies (k without copies).
    terms = d * jnp.log(within.distances[:, k - 1]) - digamma((k + within.copies).astype(dtype))
    constant = _log_unit_ball_volume(d)
    value = (digamma(jnp.asarray(n, dtype)) + constant + jnp.mean(terms)).astype(dtype)
    flags = (within.bad, _not_finite(x))
    if not with_stderr:
        return value, flags
    shift = _scatter(n, within.index[:, :k], _removal_effects(within.distances, (k,), np.ones(1), d))
    without = digamma(jnp.asarray(n - 1, dtype)) + constant + (jnp.sum(terms) - terms + shift) / (n - 1)
    return (value, jnp.sqrt(_jackknife_variance(without)).astype(dtype)), flags


def _cross_entropy_core(x, y, *, k, ties, block_size, method, splits):
    d = x.shape[1]
    m = y.shape[0]
    dtype = x.dtype
    across = _positive_neighbours(x, y, k, k, k=k, exclude_self=False, ties=ties, block_size=block_size,
                                  method=method, query_split=splits[0], ref_split=splits[1])
    terms = d * jnp.log(across.distances[:, k - 1]) - digamma((k + across.copies).astype(dtype))
    value = (digamma(jnp.asarray(m + 1, dtype)) + _log_unit_ball_volume(d) + jnp.mean(terms))
    return value.astype(dtype), (across.bad, _not_finite(x, y))


def _mutual_information_core(x, y, *, k, ties, block_size, method, splits):
    n = x.shape[0]
    dtype = x.dtype
    joint = jnp.concatenate([x, y], axis=1)
    split = splits[0] if splits[0] is not None else splits[1]
    # KSG estimator 1 (Kraskov, Stoegbauer & Grassberger 2004, eq. 8): eps_i = max-norm distance
    # to the k-th neighbour in the joint space; n_x(i), n_y(i) = points strictly within eps_i in
    # each marginal. With copies skipped (ties="auto") the order is k + copies, as in the kNN
    # estimators above, and the copies are counted in n_x and n_y.
    within = _positive_neighbours(joint, joint, k, k, k=k, exclude_self=True, ties=ties,
                                  block_size=block_size, method=method, query_split=split,
                                  ref_split=split, metric="chebyshev")
    radius = within.distances[:, k - 1]
    count_x = _knn_search.count_within(x, x, radius, metric="chebyshev", exclude_self=True,
                                       block_size=block_size)
    count_y = _knn_search.count_within(y, y, radius, metric="chebyshev", exclude_self=True,
                                       block_size=block_size)
    terms = (digamma((k + within.copies).astype(dtype)) - digamma((count_x + 1).astype(dtype))
             - digamma((count_y + 1).astype(dtype)))
    value = (digamma(jnp.asarray(n, dtype)) + jnp.mean(terms)).astype(dtype)
    return value, (within.bad, _not_finite(x, y))


# ------------------------------------------------------------------------------------------------
# Public estimators
# ------------------------------------------------------------------------------------------------


def _check_ties(ties) -> None:
    if ties not in TIES:
        raise ValueError(f"`ties` must be one of {TIES}, got {ties!r}.")


def _check_kl_arguments(x, y, k, estimator, ties, block_size, method, *, minimum_n=2):
    if estimator not in ESTIMATORS:
        raise ValueError(f"`estimator` must be one of {ESTIMATORS}, got {estimator!r}.")
    n, m = x.shape[-2], y.shape[-2]
    _check_num_points("x", x, minimum_n)
    _check_order(k, limit=min(n - 1, m), limit_text=f"min(n - 1, m) = {min(n - 1, m)} "
                 f"(n = {n} points in x without x_i itself, m = {m} points in y)")
    if estimator == "weighted" and len(_weighted_orders(int(k), n, m)) < 2:
        raise ValueError(f'`estimator="weighted"` needs at least the orders k and 2k, i.e. '
                         f"2k <= n - 1 and 2k <= m; got k={k}, n={n}, m={m}. Use \"wkv\".")
    _check_ties(ties)
    _check_block_size(block_size)
    _knn_search.resolve_method(method, x.shape[-1])


def _tie_messages(ties: str, k, *, within: str, across: str | None = None) -> tuple[str, str]:
    if ties == "error":
        return (_DUPLICATES_IN_X.format(x=within, k=k),
                _DUPLICATES_ACROSS.format(k=k, x=within, y=across))
    return (_TIES_IN_X.format(x=within, k=k, fraction=_MAX_TIED_FRACTION, copies=_MAX_COPIES),
            _TIES_ACROSS.format(x=within, y=across, k=k, fraction=_MAX_TIED_FRACTION,
                                copies=_MAX_COPIES))


def kl(x, y, *, k: int = 1, estimator: str = "selected", ties: str = "auto",
       block_size: int | None = None, method: str = "auto") -> jax.Array:
    """k-NN estimate of D(P || Q) in nats from samples ``x ~ P`` and ``y ~ Q``.

    With ``rho_j(i)`` the distance from ``x_i`` to its j-th nearest neighbour among the other
    points of ``x`` and ``nu_j(i)`` that to its j-th nearest neighbour in ``y``:

    * ``"wkv"`` (WKV 2009, eq. 5), exactly as published:
      ``D = d/n sum_i log(nu_k(i) / rho_k(i)) + log(m / (n - 1))``.
    * ``"wkv_adaptive"`` (WKV 2009, Sec. III, the estimator with sample-dependent orders):
      ``D = d/n sum_i log(nu_{k_i}(i) / rho_{l_i}(i)) + 1/n sum_i (psi(l_i) - psi(k_i))
      + log(m / (n - 1))`` with ``eps_i = max(rho_k(i), nu_k(i))`` and ``l_i`` (``k_i``) the number of
      points of ``x`` without ``x_i`` (of ``y``) within ``eps_i``, so that both radii match; with
      ``k = 1`` this is the ``universal-divergence`` package's ``estimate(x, y, k=None)``. The counts
      come from a brute-force pass (O(n (n + m) d) whatever ``method``; memory bounded by
      ``block_size``); its gradient is not propagated (the radii are from the counting pass).
    * ``"weighted"``: ``D = sum_j w_j D_wkv(j)`` over the orders ``j = k, 2k, ..., 16k``
      (fewer when n or m is small), with the minimum-norm weights satisfying ``sum_j w_j = 1`` and
      ``sum_j w_j Gamma(j + 2/d) / Gamma(j) = 0`` (Berrett, Samworth & Yuan 2019, Sec. 3: the weight
      class that cancels the bias terms of order (j/n)^(2l/d); here l = 1).
    * ``"selected"`` (default): per sample, ``"weighted"`` or ``"wkv"``, whichever has the smaller
      estimated mean squared error: ``"weighted"`` is taken when its jackknife variance is below
      WKV's plus WKV's estimated squared bias, ``max(Delta^2 - var(Delta), 0)`` with ``Delta`` their
      difference (all three variances from the jackknife of :func:`kl_with_stderr`, linear in the
      weights). Only WKV where the weights exceed 1.5 in size (d > 15 with 16 orders, or few
      orders) or where n or m leave fewer than two orders.
    * ``"corrected"``: ``D_wkv(4k) - b``, with ``b`` the mean of ``D_wkv(4k) - D_ref`` over four
      sample pairs of sizes n and m drawn from Gaussians fitted to ``x`` and ``y`` (mean and
      covariance differences shrunk towards the pooled fit by a James-Stein factor; ``D_ref`` their
      closed-form KL), where Mardia's kurtosis of both samples is within 3 standard errors of the
      Gaussian value or below, 4k <= min(n - 1, m) and min(n, m) >= 10 d; ``"selected"`` otherwise.
      The draws use a fixed key, so the estimate is deterministic; about 5x the time of ``"wkv"``;
      the simulated bias is not differentiated.

    Exact copies (``ties="auto"``, module docstring): a point's copies are counted as neighbours
    but their distance 0 is not used: the first positive distance is that of order ``k + c``
    (``c`` copies), and the term gets ``psi(k + c)`` in place of ``psi(k)`` as in WKV's Sec. III.

    Works under ``jax.jit``, ``jax.vmap`` (or leading batch axes) and ``jax.grad`` (with respect
    to the points, for ``"wkv"`` and ``"weighted"``); output dtype follows the input.

    Args:
        x: samples of P, shape ``(..., n, d)``, ``n >= 2``.
        y: samples of Q, shape ``(..., m, d)``.
        k: neighbour order (``"weighted"``, ``"selected"``: the smallest order); needs
            ``k <= n - 1`` and ``k <= m``.
        estimator: one of ``ESTIMATORS`` (default ``"selected"``).
        ties: ``"auto"`` (copies from rounding are handled, data that look discrete are refused)
            or ``"error"`` (any zero neighbour distance is refused); see the module docstring.
        block_size: ``None`` (automatic) or tile size of the search (see :func:`neighbors`).
        method: search backend, ``"auto"``, ``"brute"`` or ``"kdtree"`` (see :func:`neighbors`).

    Returns:
        The estimate, shape ``(...)``. Data the tie policy refuses: ``ValueError`` for concrete
        inputs, NaN under tracing (module docstring).

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.knn import kl
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (2000, 2))
        >>> y = jax.random.normal(ky, (2000, 2)) + jnp.array([[1.0, 0.0]])
        >>> print(abs(float(kl(x, y)) - 0.5) < 0.15)  # closed form: |mu|^2 / 2 = 0.5
        True

    References:
        Wang, Kulkarni & Verdu (2009), IEEE Trans. Inf. Theory 55(5), eq. (5) and Sec. III.
        Berrett, Samworth & Yuan (2019), Ann. Statist. 47(1), Sec. 3 (weights).
    """
    x, y = _pair("x", x, "y", y)
    _check_kl_arguments(x, y, k, estimator, ties, block_size, method)
    eager = is_concrete(x) and is_concrete(y)
    check_eagerly("x", x, real)
    check_eagerly("y", y, real)
    value, (bad_x, bad_y, not_finite) = _run(_kl_core, (x, y), k=int(k), estimator=estimator,
                                             ties=ties, block_size=block_size, method=method)
    in_x, across = _tie_messages(ties, k, within="x", across="y")
    return _finish(value, {in_x: bad_x, across: bad_y, _NOT_FINITE: not_finite}, eager)


def kl_with_stderr(x, y, *, k: int = 1, estimator: str = "selected", ties: str = "auto",
                   block_size: int | None = None, method: str = "auto") -> tuple[jax.Array, jax.Array]:
    """:func:`kl` and a delete-one jackknife standard error of it, ``(estimate, stderr)``.

    The standard error is the two-sample jackknife (Arvesen 1969): the estimate is recomputed
    without each point of ``x`` and without each point of ``y`` in closed form, since removing a
    point only moves, to their next order, the neighbour distances of the points that had it
    among their neighbours (those are known from one search of one extra order), and
    ``se^2 = (n-1)/n sum_j (D_(-x_j) - mean)^2 + (m-1)/m sum_j (D_(-y_j) - mean)^2``. It measures the
    sampling spread only: an interval ``estimate +- 1.96 stderr`` does **not** cover the
    estimator's bias, which dominates in higher dimension (module docstring); its coverage is
    measured in ``experiments.knn_accuracy``. O(n k) on top of :func:`kl`.

    Args:
        x: samples of P, shape ``(..., n, d)``, ``n >= 3``.
        y: samples of Q, shape ``(..., m, d)``, ``m >= 2``.
        k: neighbour order, as for :func:`kl`.
        estimator: ``"selected"`` (default; the standard error of the estimator it selected, not
            counting the selection), ``"weighted"``, ``"wkv"`` or ``"corrected"`` (the jackknife
            of its WKV term times sqrt(1 + 1/4) for the simulated bias) (``"wkv_adaptive"`` has
            no closed-form jackknife here: its orders change with every removal).
        ties: as for :func:`kl`.
        block_size: ``None`` (automatic) or tile size of the search (see :func:`neighbors`).
        method: search backend (see :func:`neighbors`).

    Returns:
        ``(estimate, stderr)``, each of shape ``(...)``; the estimate equals :func:`kl`'s. Both are
        NaN under tracing where :func:`kl` would raise.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.knn import kl_with_stderr
        >>> kx, ky = jax.random.split(jax.random.key(0))
        >>> x = jax.random.normal(kx, (2000, 1))
        >>> y = jax.random.normal(ky, (2000, 1)) + 1.0
        >>> estimate, stderr = kl_with_stderr(x, y)
        >>> print(abs(float(estimate) - 0.5) < 3 * float(stderr), 0.01 < float(stderr) < 0.1)
        True True

    References:
        B. Efron, C. Stein (1981), "The jackknife estimate of variance", Ann. Statist. 9(3), 586-596.
        J. N. Arvesen (1969), "Jackknifing U-statistics", Ann. Math. Statist. 40(6), 2076-2100.
        Wang, Kulkarni & Verdu (2009), IEEE Trans. Inf. Theory 55(5), eq. (5).
    """
    x, y = _pair("x", x, "y", y)
    if estimator == "wkv_adaptive":
        raise ValueError('`estimator="wkv_adaptive"` has no standard error here; use "weighted" or "wkv".')
    _check_kl_arguments(x, y, k, estimator, ties, block_size, method, minimum_n=3)
    _check_num_points("y", y, 2)
    eager = is_concrete(x) and is_concrete(y)
    check_eagerly("x", x, real)
    check_eagerly("y", y, real)
    value, (bad_x, bad_y, not_finite) = _run(_kl_core, (x, y), k=int(k), estimator=estimator,
                                             ties=ties, block_size=block_size, method=method,
                                             with_stderr=True)
    in_x, across = _tie_messages(ties, k, within="x", across="y")
    return _finish(value, {in_x: bad_x, across: bad_y, _NOT_FINITE: not_finite}, eager)


# ------------------------------------------------------------------------------------------------
# Entropies
# ------------------------------------------------------------------------------------------------


def _log_unit_ball_volume(d: int) -> float:
    """log of the volume of the Euclidean unit ball in R^d, pi^(d/2) / Gamma(d/2 + 1)."""
    return 0.5 * d * math.log(math.pi) - math.lgamma(0.5 * d + 1)


def _entropy_arguments(x, k, ties, block_size, method, minimum_n):
    x = _samples("x", x)
    n = x.shape[-2]
    _check_num_points("x", x, minimum_n)
    _check_order(k, limit=n - 1, limit_text=f"n - 1 = {n - 1} (points of x without x_i itself)")
    _check_ties(ties)
    _check_block_size(block_size)
    _knn_search.resolve_method(method, x.shape[-1])
    check_eagerly("x", x, real)
    return x


def entropy(x, *, k: int = 1, ties: str = "auto", block_size: int | None = None,
            method: str = "auto") -> jax.Array:
    """Kozachenko-Leonenko k-NN estimate of the differential entropy H(P) in nats from ``x ~ P``.

    ``H = psi(n) - psi(k) + log V_d + d/n sum_i log rho_k(i)``, with ``rho_k(i)`` the distance from
    ``x_i`` to its k-th nearest neighbour among the other points and ``V_d = pi^(d/2) / Gamma(d/2+1)``
    the volume of the unit ball (Kraskov, Stoegbauer & Grassberger 2004, eq. 20, written with the
    Euclidean norm; k = 1 is Kozachenko & Leonenko 1987). The digamma terms make it exact in
    expectation for a locally uniform density: the probability mass of the k-NN ball is the k-th of
    n - 1 uniform order statistics, whose log has mean psi(k) - psi(n). A point with ``c`` exact
    copies (``ties="auto"``) uses its first positive distance, of order ``k + c``, and ``psi(k + c)``.

    Args:
        x: samples, shape ``(..., n, d)``, ``n >= 2``.
        k: neighbour order, ``1 <= k <= n - 1``.
        ties: ``"auto"`` or ``"error"``, as for :func:`kl`.
        block_size: ``None`` (automatic) or tile size of the search (see :func:`neighbors`).
        method: search backend (see :func:`neighbors`).

    Returns:
        The estimate, shape ``(...)``, in the input dtype. Ties: as for :func:`kl`.

    Example:
        >>> import jax
        >>> from kljax.knn import entropy
        >>> x = jax.random.normal(jax.random.key(0), (4000, 2))
        >>> print(abs(float(entropy(x, k=3)) - 2.8379) < 0.1)  # log(2 pi e) for N(0, I_2)
        True

    References:
        Kozachenko & Leonenko (1987), Problems Inform. Transmission 23(2), 95-101.
        Kraskov, Stoegbauer & Grassberger (2004), Phys. Rev. E 69, 066138, eq. (20).
    """
    x = _entropy_arguments(x, k, ties, block_size, method, 2)
    value, (bad, not_finite) = _run(_entropy_core, (x,), k=int(k), ties=ties, block_size=block_size,
                                    method=method)
    return _finish(value, {_tie_messages(ties, k, within="x")[0]: bad, _NOT_FINITE: not_finite},
                   is_concrete(x))


def entropy_with_stderr(x, *, k: int = 1, ties: str = "auto", block_size: int | None = None,
                        method: str = "auto") -> tuple[jax.Array, jax.Array]:
    """:func:`entropy` and its delete-one jackknife standard error, ``(estimate, stderr)``.

    Removing ``x_j`` drops its term and moves to order k + 1 the k-th neighbour distance of every
    point that had ``x_j`` among its first k, so all n jackknife replicates come from one search of
    order k + 1 (Efron & Stein 1981). The standard error covers sampling spread, not bias.

    Args:
        x: samples, shape ``(..., n, d)``, ``n >= 3``.
        k: neighbour order, ``1 <= k <= n - 1``.
        ties: as for :func:`entropy`.
        block_size: ``None`` (automatic) or tile size of the search (see :func:`neighbors`).
        method: search backend (see :func:`neighbors`).

    Returns:
        ``(estimate, stderr)``, each of shape ``(...)``.

    Example:
        >>> import jax
        >>> from kljax.knn import entropy_with_stderr
        >>> x = jax.random.normal(jax.random.key(0), (4000, 1))
        >>> estimate, stderr = entropy_with_stderr(x)
        >>> print(abs(float(estimate) - 1.4189) < 3 * float(stderr))  # 0.5 log(2 pi e)
        True

    References:
        Efron & Stein (1981), Ann. Statist. 9(3), 586-596.
        Kozachenko & Leonenko (1987), Problems Inform. Transmission 23(2), 95-101.
    """
    x = _entropy_arguments(x, k, ties, block_size, method, 3)
    value, (bad, not_finite) = _run(_entropy_core, (x,), k=int(k), ties=ties, block_size=block_size,
                                    method=method, with_stderr=True)
    return _finish(value, {_tie_messages(ties, k, within="x")[0]: bad, _NOT_FINITE: not_finite},
                   is_concrete(x))


def cross_entropy(x, y, *, k: int = 1, ties: str = "auto", block_size: int | None = None,
                  method: str = "auto") -> jax.Array:
    """k-NN estimate of the cross-entropy H(P, Q) = -E_P[log q] in nats from ``x ~ P``, ``y ~ Q``.

    ``H(P, Q) = psi(m + 1) - psi(k) + log V_d + d/n sum_i log nu_k(i)``, with ``nu_k(i)`` the
    distance from ``x_i`` to its k-th nearest neighbour in ``y``: the Kozachenko-Leonenko argument
    (Kraskov et al. 2004, eq. 20) with the ball's Q-mass the k-th of m uniform order statistics
    (mean log psi(k) - psi(m + 1)); it is the nu-half of WKV 2009 eq. (5) (Leonenko, Pronzato &
    Savani 2008 give the same construction for Renyi cross-entropies). ``cross_entropy(x, y) -
    entropy(x)`` is WKV with psi(m + 1) - psi(n) in place of log(m / (n - 1)). Copies of ``x_i``
    in ``y`` (``ties="auto"``): as for :func:`kl`.

    Args:
        x: samples of P, shape ``(..., n, d)``.
        y: samples of Q, shape ``(..., m, d)``.
        k: neighbour order, ``1 <= k <= m``.
        ties: ``"auto"`` or ``"error"``, as for :func:`kl`.
        block_size: ``None`` (automatic) or tile size of the search (see :func:`neighbors`).
        method: search backend (see :func:`neighbors`).

    Returns:
        The estimate, shape ``(...)``, in the input dtype. Ties: as for :func:`kl`.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.knn import cross_entropy
        >>> kx, ky = jax.random.split(jax.random.key(1))
        >>> x = jax.random.normal(kx, (4000, 1))
        >>> y = 2.0 * jax.random.normal(ky, (4000, 1))
        >>> # -E_P log q for P = N(0, 1), Q = N(0, 4): 0.5 log(8 pi) + 1/8 = 1.7371
        >>> print(abs(float(cross_entropy(x, y, k=4)) - 1.7371) < 0.1)
        True

    References:
        Wang, Kulkarni & Verdu (2009), IEEE Trans. Inf. Theory 55(5), eq. (5).
        Kraskov, Stoegbauer & Grassberger (2004), Phys. Rev. E 69, 066138, eq. (20).
        N. Leonenko, L. Pronzato, V. Savani (2008), "A class of Renyi information estimators for
        multidimensional densities", Ann. Statist. 36(5), 2153-2182.
    """
    x, y = _pair("x", x, "y", y)
    m = y.shape[-2]
    _check_num_points("x", x, 1)
    _check_order(k, limit=m, limit_text=f"m = {m} (the number of points in y)")
    _check_ties(ties)
    _check_block_size(block_size)
    _knn_search.resolve_method(method, x.shape[-1])
    eager = is_concrete(x) and is_concrete(y)
    check_eagerly("x", x, real)
    check_eagerly("y", y, real)
    value, (bad, not_finite) = _run(_cross_entropy_core, (x, y), k=int(k), ties=ties,
                                    block_size=block_size, method=method)
    across = _tie_messages(ties, k, within="x", across="y")[1]
    return _finish(value, {across: bad, _NOT_FINITE: not_finite}, eager)


# ------------------------------------------------------------------------------------------------
# Mutual information
# ------------------------------------------------------------------------------------------------


def mutual_information(x, y, *, k: int = 3, ties: str = "auto", block_size: int | None = None,
                       method: str = "auto") -> jax.Array:
    """Kraskov-Stoegbauer-Grassberger estimate of the mutual information I(X; Y) in nats.

    KSG estimator 1 (Kraskov et al. 2004, eq. 8) on paired rows ``(x_i, y_i)``:
    ``I = psi(k) + psi(n) - 1/n sum_i [psi(n_x(i) + 1) + psi(n_y(i) + 1)]``, where ``eps_i`` is the
    max-norm (Chebyshev) distance from ``z_i = (x_i, y_i)`` to its k-th nearest neighbour in the
    joint space and ``n_x(i)`` (``n_y(i)``) counts the other points with ``||x_j - x_i||_inf < eps_i``
    (``||y_j - y_i||_inf < eps_i``). The joint search is the exact engine of :func:`neighbors` with
    ``metric="chebyshev"``; the counts are an exact tiled brute-force pass (O(n^2 (dx + dy)), memory
    bounded by ``block_size``), so the result matches scikit-learn's ``mutual_info_regression``
    core (which uses the same estimator) on the same data. Exact joint copies (``ties="auto"``):
    the first positive eps is that of order ``k + c`` and ``psi(k + c)`` replaces ``psi(k)``. The
    estimate is not clipped at 0 (it can be slightly negative for independent variables).

    Args:
        x: shape ``(..., n, dx)``.
        y: shape ``(..., n, dy)``, paired with ``x`` row by row (same ``n`` and leading axes).
        k: neighbour order in the joint space, ``1 <= k <= n - 1``.
        ties: ``"auto"`` or ``"error"``, as for :func:`kl` (on the joint points).
        block_size: ``None`` (automatic) or tile size (see :func:`neighbors`).
        method: backend of the joint search (see :func:`neighbors`).

    Returns:
        The estimate, shape ``(...)``, in the input dtype.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.knn import mutual_information
        >>> z = jax.random.normal(jax.random.key(0), (3000, 2))
        >>> x, y = z[:, :1], 0.8 * z[:, :1] + 0.6 * z[:, 1:]  # correlation 0.8
        >>> print(abs(float(mutual_information(x, y)) - 0.5108) < 0.05)  # -log(1 - 0.8^2) / 2
        True

    References:
        A. Kraskov, H. Stoegbauer, P. Grassberger (2004), "Estimating mutual information",
        Phys. Rev. E 69, 066138, eq. (8).
    """
    x, y = _samples("x", x), _samples("y", y)
    if x.shape[:-1] != y.shape[:-1]:
        raise ValueError("`x` and `y` must be paired: the same leading axes and number of points "
                         f"(axes before the last), got shapes {x.shape} and {y.shape}.")
    dtype = jnp.result_type(x.dtype, y.dtype)
    x, y = x.astype(dtype), y.astype(dtype)
    n = x.shape[-2]
    _check_num_points("x", x, 2)
    _check_order(k, limit=n - 1, limit_text=f"n - 1 = {n - 1} (points without the point itself)")
    _check_ties(ties)
    _check_block_size(block_size)
    _knn_search.resolve_method(method, x.shape[-1] + y.shape[-1])
    eager = is_concrete(x) and is_concrete(y)
    check_eagerly("x", x, real)
    check_eagerly("y", y, real)
    value, (bad, not_finite) = _run(_mutual_information_core, (x, y), k=int(k), ties=ties,
                                    block_size=block_size, method=method)
    joint = _tie_messages(ties, k, within="(x, y)")[0].replace("`(x, y)`", "the joint sample `(x, y)`")
    return _finish(value, {joint: bad, _NOT_FINITE: not_finite}, eager)
