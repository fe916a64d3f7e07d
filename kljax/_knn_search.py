"""Private engine of :mod:`kljax.knn`: exact k-nearest-neighbour search.

Everything here works on one unbatched problem, queries ``(n, d)`` against references ``(m, d)``;
the public wrappers in :mod:`kljax.knn` validate the input and ``jax.vmap`` over batches.

Design (why, not what):

* **Tiles.** Queries are cut into tiles with ``lax.map`` and references into tiles with
  ``lax.scan``; each query tile keeps a running top-k that is merged with the top-k of every
  reference tile, so the peak memory is one tile of about ``block_size^2`` entries, never
  ``(n, m)`` (``block_size=None``: ``_AUTO_BLOCK``; small problems are a single tile).
* **Exact answers, fast selection.** In dimension ``d >= _GRAM_MIN_DIM`` the tiles hold the
  Gram key ``|r|^2 - 2 q.r`` (the squared distance less ``|q|^2``) of data centred on the
  reference mean, from one matmul of ``[q, 1]`` with ``[-2 r, |r|^2]``: no elementwise pass and
  no mask over the tile (padding references have ``|r|^2 = inf``; with ``exclude_self`` one more
  candidate is kept and the query itself is dropped afterwards). Below it they sum
  ``sum_c (q_c - r_c)^2``. Selection
  runs on float32 keys (XLA's CPU ``top_k`` is fast only in float32; in float64 it sorts whole
  rows, ~100x slower). ``k + 2`` candidates are kept, their distances recomputed from
  coordinate differences, and every query's answer is certified against rigorous bounds on the
  Gram form's and the keys' rounding; uncertified rows (near or exact ties, strong cancellation:
  a few per 10^4 rows of random data) are redone exactly in small tiles by a ``lax.while_loop``.
  Float32 difference tiles need no certificate. So the *indices* are exact (ties to the smaller
  index) and the returned distances of finite points, recomputed from differences, are never
  negative or NaN, also far from the origin.
* **Selection without wide ``top_k``.** XLA's ``top_k`` over long rows is slow on CPU. A tile is
  reduced to the minima of groups of ``_GROUP`` consecutive columns; ``top_k`` over those group
  minima picks ``k`` groups, which contain ``k`` smallest entries (each selected group holds an
  entry at least as small as anything in an unselected group), and a small ``top_k`` over the
  ``k * _GROUP`` entries of these groups finishes (for k = 1: argmin over the group minima,
  then over one group; XLA's CPU argmin is a slow variadic reduction, the minima vectorise).
* **Ties** are broken by the smaller reference index, which is what a stable ``argsort`` of the
  exact distances gives: candidates are sorted by (exact distance, index), and a tie at the k-th
  distance with a non-candidate fails the certificate and goes to the exact fallback.
* **k-d tree.** ``method="kdtree"`` calls a k-d tree through ``jax.pure_callback`` for the
  candidate indices only: pykdtree's when it is installed (optional, Euclidean; faster to build and
  query than SciPy's at d <= 6), SciPy's ``cKDTree`` otherwise and for the Chebyshev metric; the
  distances are recomputed and sorted in JAX exactly as on the brute path, so both paths return the same numbers and gradients flow through the distances.
* **Metrics.** ``metric="chebyshev"`` (max-norm, for the KSG mutual information) keys the tiles
  with ``max_c (q_c - r_c)^2`` (no Gram form: the max has no matmul), whose square root is
  ``max_c |q_c - r_c|`` exactly; the certificate, the fallback, the refinement and the sharded
  merge are those of the Euclidean difference form; the k-d tree queries with ``p=inf``.
  :func:`count_within` gives KSG's strict radius counts with the same arithmetic.
* **Non-finite points** (possible only under ``jit``: eager input is validated) have no answer;
  :func:`search` returns NaN distances, with in-range placeholder indices, for every query with a
  NaN or inf coordinate, and for all queries when some reference has one (it could be, or hide,
  anyone's neighbour). The engine's own answer there would be a wrong finite number.
* **Several devices.** When ``refs`` (or ``queries``) is a concrete ``jax.Array`` whose rows are
  sharded by a ``NamedSharding``, ``jax.shard_map`` runs the search per shard; per-shard candidates
  (with global indices) are gathered and merged, which gives the single-device answer exactly.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.sharding import NamedSharding, PartitionSpec

# From this dimension on, candidates are selected with the Gram form (a matmul); below it the
# tiles sum squared differences. Measured on this CPU (d = 10, 2048 x 2048 tiles):
# Gram form + min 1.0 ns per pair, differences + min 2.8-3.2 ns per pair.
_GRAM_MIN_DIM = 4
# Query rows per tile of the exact fallback for uncertified rows.
_FALLBACK_ROWS = 64
# Columns per group in the two-level selection (see module docstring).
_GROUP = 64
# Smallest group width tried for large k (see _smallest).
_MIN_GROUP = 8
# Above this k the exact fallback sorts its rows instead of taking k argmin passes.
_EXACT_PASSES_MAX_K = 8
# Dimension up to which method="auto" uses the k-d tree on CPU. Measured (Gaussian points, n = m,
# k = 1, ms, tree / brute): n = 10k: d = 4 14 / 51, d = 6 39 / 49, d = 8 129 / 85; n = 50k:
# d = 4 95 / 1428, d = 6 401 / 1507, d = 8 1504 / 1791.
_KDTREE_MAX_DIM = 6
# Tile size used when ``block_size`` is None: tiles of about 2048^2 entries (16 MiB in float32)
# are faster than one dense (n, m) tile, whose intermediates do not fit in cache.
_AUTO_BLOCK = 2048
_INDEX_DTYPE = jnp.int32
METHODS = ("auto", "brute", "kdtree")
METRICS = ("euclidean", "chebyshev")


# ------------------------------------------------------------------------------------------------
# Distances
# ------------------------------------------------------------------------------------------------


def _sum_squared_differences(a: jax.Array, b: jax.Array, metric: str = "euclidean") -> jax.Array:
    """Squared distance from coordinate differences (broadcasting a, b): ``sum_c (a_c - b_c)^2``
    accumulated in coordinate order (``"euclidean"``), or ``max_c (a_c - b_c)^2``
    (``"chebyshev"``, whose square root is ``max_c |a_c - b_c|`` exactly)."""
    combine = jnp.maximum if metric == "chebyshev" else jnp.add
    total = jnp.square(a[..., 0] - b[..., 0])
    for c in range(1, a.shape[-1]):
        total = combine(total, jnp.square(a[..., c] - b[..., c]))
    return total


def safe_sqrt(s: jax.Array) -> jax.Array:
    """``sqrt(s)`` for ``s >= 0`` whose gradient is 0 (not inf) at ``s = 0`` (double ``where``)."""
    positive = s > 0
    return jnp.where(positive, jnp.sqrt(jnp.where(positive, s, 1)), 0)


def _tile_squared_distances(q: jax.Array, r: jax.Array, metric: str = "euclidean") -> jax.Array:
    """Squared distances between the rows of ``q`` (a, d) and ``r`` (b, d) from differences, (a, b)."""
    return _sum_squared_differences(q[:, None, :], r[None, :, :], metric)


# ------------------------------------------------------------------------------------------------
# Selection and merging
# ------------------------------------------------------------------------------------------------


def _smallest(values: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` smallest entries of each row and their columns, ascending; among equal values the
    columns chosen are arbitrary (the certification in :func:`brute_indices` catches ties)."""
    rows, width = values.shape
    group = _GROUP  # narrower groups for large k, so that there are at least 2k of them
    while group > _MIN_GROUP and width // group < 2 * k:
        group //= 2
    groups = width // group
    if width % group or groups < 2 * k:
        if k == 1:
            column = jnp.argmin(values, axis=1)[:, None]
            return jnp.take_along_axis(values, column, axis=1), column.astype(_INDEX_DTYPE)
        negated, column = lax.top_k(-values, k)
        return -negated, column.astype(_INDEX_DTYPE)
    grouped = values.reshape(rows, groups, group)
    group_minima = jnp.min(grouped, axis=2)
    if k == 1:  # a vectorised min per group, then argmin over the few group minima and one group
        chosen = jnp.argmin(group_minima, axis=1)[:, None]
    else:
        _, chosen = lax.top_k(-group_minima, k)
    candidates = jnp.take_along_axis(grouped, chosen[:, :, None], axis=1).reshape(rows, k * group)
    if k == 1:
        position = jnp.argmin(candidates, axis=1)[:, None]
        smallest = jnp.take_along_axis(candidates, position, axis=1)
    else:
        negated, position = lax.top_k(-candidates, k)
        smallest = -negated
    column = jnp.take_along_axis(chosen, position // group, axis=1) * group + position % group
    return smallest, column.astype(_INDEX_DTYPE)


def _merge(best, new, k: int):
    """Running top-k merged with a tile's top-k (ties in any order)."""
    (best_values, best_index), (new_values, new_index) = best, new
    if k == 1:
        take_new = new_values < best_values
        return jnp.where(take_new, new_values, best_values), jnp.where(take_new, new_index, best_index)
    values = jnp.concatenate([best_values, new_values], axis=1)
    index = jnp.concatenate([best_index, new_index], axis=1)
    negated, position = lax.top_k(-values, k)
    return -negated, jnp.take_along_axis(index, position, axis=1)


def _smallest_exact(values: jax.Array, index: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """The ``k`` smallest (value, index) pairs of each row, in the input dtype and without ``top_k``
    (whose CPU version sorts whole rows outside float32): k argmin passes, each taking the
    lexicographic successor of the previous pair. Among equal values, positions must be in index
    order (the first position found is then the smallest index)."""

    def next_smallest(previous, _):
        value, chosen = previous
        later = (values > value[:, None]) | ((values == value[:, None]) & (index > chosen[:, None]))
        masked = jnp.where(later, values, jnp.inf)
        position = jnp.argmin(masked, axis=1)[:, None]
        value = jnp.take_along_axis(masked, position, axis=1)[:, 0]
        chosen = jnp.take_along_axis(index, position, axis=1)[:, 0]
        return (value, chosen), (value, chosen)

    start = (jnp.full(values.shape[:1], -jnp.inf, values.dtype),
             jnp.full(values.shape[:1], -1, _INDEX_DTYPE))
    _, (value, chosen) = lax.scan(next_smallest, start, None, length=k)
    return value.T, chosen.T


# Rows up to this width are sorted by a sorting network (elementwise compare-exchanges of columns)
# instead of ``lax.sort``: measured at n = 50k rows of 6 columns, XLA's CPU sort took 25-30 ms.
_NETWORK_SORT_MAX_WIDTH = 16


def sort_by_distance(distances: jax.Array, index: jax.Array, k: int):
    """Sorts each row by (distance, index) and keeps the first ``k`` columns.

    The order is that of ``lax.sort`` with two keys (NaN after every number). Narrow rows go
    through an odd-even transposition network (Knuth, TAOCP vol. 3, 5.3.4), ``w`` rounds of
    compare-exchanges of neighbouring columns, which sorts any input of width ``w``.
    """
    width = distances.shape[-1]
    if width > _NETWORK_SORT_MAX_WIDTH:
        distances, index = lax.sort((distances, index), dimension=-1, num_keys=2)
        return distances[..., :k], index[..., :k]

    def after(da, ia, db, ib):  # (distance, index) a comes after b in lax.sort's order
        nan_a, nan_b = jnp.isnan(da), jnp.isnan(db)
        return (da > db) | (nan_a & ~nan_b) | (((da == db) | (nan_a & nan_b)) & (ia > ib))

    for round_ in range(width):
        start = round_ % 2
        pairs = (width - start) // 2
        if pairs == 0:
            continue
        stop = start + 2 * pairs
        # columns start, start + 2, ... against start + 1, start + 3, ...: one vectorised exchange
        da, db = distances[..., start:stop:2], distances[..., start + 1:stop:2]
        ia, ib = index[..., start:stop:2], index[..., start + 1:stop:2]
        swap = after(da, ia, db, ib)
        low_d, high_d = jnp.where(swap, db, da), jnp.where(swap, da, db)
        low_i, high_i = jnp.where(swap, ib, ia), jnp.where(swap, ia, ib)
        merged_d = jnp.stack([low_d, high_d], axis=-1).reshape(low_d.shape[:-1] + (2 * pairs,))
        merged_i = jnp.stack([low_i, high_i], axis=-1).reshape(low_i.shape[:-1] + (2 * pairs,))
        distances = jnp.concatenate([distances[..., :start], merged_d, distances[..., stop:]], axis=-1)
        index = jnp.concatenate([index[..., :start], merged_i, index[..., stop:]], axis=-1)
    return distances[..., :k], index[..., :k]


# ------------------------------------------------------------------------------------------------
# Tiled brute force
# ------------------------------------------------------------------------------------------------


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def _tile_shape(n: int, m: int, block_size: int | None) -> tuple[int, int]:
    """(query rows, reference rows) of a tile of about ``block_size^2`` entries (``None``:
    ``_AUTO_BLOCK``), shaped ``(block_size / 4, 4 block_size)``: wide reference tiles amortise the
    per-row selection over more columns (measured at n = m = 20000, d = 10: 1.6x faster than
    square). The rows are spread evenly over the tiles, so padding stays small (m = 10000 in
    tiles of 8192 would be padded to 16384; two tiles of 5056 are not)."""
    block_size = _AUTO_BLOCK if block_size is None else block_size
    ref_tiles = -(-m // min(4 * block_size, m))
    ref_block = -(-m // ref_tiles)
    if ref_block > 4 * _GROUP:  # let the grouped selection apply (padding is never selected)
        ref_block = _round_up(ref_block, _GROUP)
    query_block = min(n, max(1, block_size * block_size // ref_block))
    query_block = -(-n // -(-n // query_block)) if n else 1
    return query_block, ref_block


def _pad_rows(x: jax.Array, rows: int, fill=None) -> jax.Array:
    """``x`` with rows of zeros (or copies of the row ``fill``) appended up to ``rows``."""
    if rows == x.shape[0]:
        return x
    shape = (rows - x.shape[0],) + x.shape[1:]
    padding = jnp.zeros(shape, x.dtype) if fill is None else jnp.broadcast_to(fill, shape)
    return jnp.concatenate([x, padding.astype(x.dtype)], axis=0)


def tiled_map(queries, refs, block_size, per_query, init, update, ref_fill=None):
    """Runs ``update`` over all (query tile, reference tile) pairs and returns per-query results.

    ``per_query`` is a pytree of arrays with leading axis ``n`` tiled along with the queries.
    ``init(query_block)`` gives the carry of one query tile; ``update(carry, q_tile, extra_tile,
    r_tile, q_start, r_start)`` folds one reference tile in (``q_start``/``r_start`` are the global
    positions of the tiles' first rows; reference rows at or beyond ``m`` are padding: zeros, or
    copies of the row ``ref_fill``). The carries of all query tiles are concatenated and cut back
    to ``n`` rows.
    """
    n, m = queries.shape[0], refs.shape[0]
    query_block, ref_block = _tile_shape(n, m, block_size)
    num_query_tiles = -(-n // query_block)
    num_ref_tiles = -(-m // ref_block)
    query_tiles = _pad_rows(queries, num_query_tiles * query_block).reshape(
        num_query_tiles, query_block, -1)
    extra_tiles = jax.tree.map(
        lambda a: _pad_rows(a, num_query_tiles * query_block).reshape(
            (num_query_tiles, query_block) + a.shape[1:]), per_query)
    ref_tiles = _pad_rows(refs, num_ref_tiles * ref_block, ref_fill).reshape(
        num_ref_tiles, ref_block, -1)
    query_starts = jnp.arange(num_query_tiles, dtype=_INDEX_DTYPE) * query_block
    ref_starts = jnp.arange(num_ref_tiles, dtype=_INDEX_DTYPE) * ref_block

    def one_query_tile(args):
        q_tile, extra_tile, q_start = args

        def body(carry, ref_args):
            r_tile, r_start = ref_args
            return update(carry, q_tile, extra_tile, r_tile, q_start, r_start), None

        if num_ref_tiles == 1:
            return update(init(query_block), q_tile, extra_tile, ref_tiles[0], q_start, ref_starts[0])
        return lax.scan(body, init(query_block), (ref_tiles, ref_starts))[0]

    if num_query_tiles == 1:
        out = jax.tree.map(lambda a: a[None], one_query_tile(
            (query_tiles[0], jax.tree.map(lambda a: a[0], extra_tiles), query_starts[0])))
    else:
        out = lax.map(one_query_tile, (query_tiles, extra_tiles, query_starts))
    return jax.tree.map(lambda a: a.reshape((-1,) + a.shape[2:])[:n], out)


def _tile_mask(q_start, r_start, query_block, ref_block, m, exclude_self, query_offset, ref_offset):
    """True where a tile entry must be ignored: reference padding, and the query itself."""
    rows = q_start + lax.broadcasted_iota(_INDEX_DTYPE, (query_block, ref_block), 0)
    cols = r_start + lax.broadcasted_iota(_INDEX_DTYPE, (query_block, ref_block), 1)
    mask = cols >= m
    if exclude_self:
        mask = mask | (rows + query_offset == cols + ref_offset)
    return mask


def _selection_keys(values: jax.Array) -> jax.Array:
    """float32 keys for the fast selection: XLA's CPU ``top_k`` is fast only in float32. Rounding
    to float32 is monotone, so keys are ordered like the values up to float32 ties, which the
    certification in :func:`brute_indices` accounts for."""
    return values.astype(jnp.float32) if jnp.finfo(values.dtype).bits > 32 else values


def brute_candidates(queries, refs, num_candidates, *, form, block_size, metric="euclidean"):
    """The ``num_candidates`` smallest selection keys per query and their reference positions.

    Returns ``(keys, index)``, each ``(n, num_candidates)``, ascending by key (ties in any order),
    keys rounded to float32 (see :func:`_selection_keys`). ``form`` says what the keys are:

    * ``"difference"``: the squared distance of ``metric`` from coordinate differences (see
      :func:`_sum_squared_differences`);
    * ``"gram"``: ``|r|^2 - 2 q.r``, the squared distance less ``|q|^2`` (the same for every
      reference of a query, so the order is the same), from one matmul of ``[q, 1]`` with
      ``[-2 r, |r|^2]``: no elementwise pass over the tile before the selection.

    Padding rows of the reference tiles get key ``+inf`` (infinite coordinates, or an infinite
    ``|r|^2``), so no mask is formed; their positions are ``>= m``.
    """
    n, d = queries.shape
    m = refs.shape[0]
    dtype = _selection_keys(jnp.zeros((), queries.dtype)).dtype
    if form == "gram":
        queries = jnp.concatenate([queries, jnp.ones((n, 1), queries.dtype)], axis=1)
        refs = jnp.concatenate([-2 * refs, jnp.sum(refs * refs, axis=1, keepdims=True)], axis=1)
        fill = jnp.zeros((d + 1,), refs.dtype).at[d].set(jnp.inf)
    else:
        fill = jnp.full((d,), jnp.inf, refs.dtype)

    def init(query_block):
        return (jnp.full((query_block, num_candidates), jnp.inf, dtype),
                jnp.full((query_block, num_candidates), m, _INDEX_DTYPE))

    def update(best, q_tile, _, r_tile, q_start, r_start):
        if form == "gram":
            keys = jnp.matmul(q_tile, r_tile.T, precision=lax.Precision.HIGHEST)
        else:
            keys = _tile_squared_distances(q_tile, r_tile, metric)
        keys = _selection_keys(keys)
        width = min(num_candidates, r_tile.shape[0])
        values, index = _smallest(keys, width)
        if width < num_candidates:  # a tile narrower than k: pad with nothing found
            short = num_candidates - width
            values = jnp.concatenate([values, jnp.full((values.shape[0], short), jnp.inf, dtype)], 1)
            index = jnp.concatenate([index, jnp.full((index.shape[0], short), m - r_start,
                                                     _INDEX_DTYPE)], 1)
        return _merge(best, (values, index + r_start), num_candidates)

    return tiled_map(queries, refs, block_size, (), init, update, ref_fill=fill)


def _exact_rows(queries, refs, k, *, exclude_self, block_size, query_offset, ref_offset,
                metric="euclidean"):
    """Indices (rows, k) of the k nearest ``refs`` of a few queries, selected in the input dtype
    from squared differences (exact; slower than the float32-key path, used for uncertified rows).
    References are scanned in tiles of ``block_size``, keeping a running top-k."""
    rows, m = queries.shape[0], refs.shape[0]
    ref_block = m if block_size is None else min(block_size, m)
    tiles = -(-m // ref_block)
    ref_tiles = _pad_rows(refs, tiles * ref_block).reshape(tiles, ref_block, -1)
    own = query_offset + jnp.arange(rows, dtype=_INDEX_DTYPE)

    def body(best, ref_args):
        r_tile, r_start = ref_args
        values = _tile_squared_distances(queries, r_tile, metric)
        index = jnp.broadcast_to(r_start + jnp.arange(ref_block, dtype=_INDEX_DTYPE), values.shape)
        mask = index >= m
        if exclude_self:
            mask = mask | (index + ref_offset == own[:, None])
        values = jnp.concatenate([best[0], jnp.where(mask, jnp.inf, values)], axis=1)
        index = jnp.concatenate([best[1], index], axis=1)
        if k > _EXACT_PASSES_MAX_K:  # k argmin passes cost more than sorting the rows
            return sort_by_distance(values, index, k), None
        return _smallest_exact(values, index, k), None

    init = (jnp.full((rows, k), jnp.inf, queries.dtype), jnp.full((rows, k), m, _INDEX_DTYPE))
    starts = jnp.arange(tiles, dtype=_INDEX_DTYPE) * ref_block
    return lax.scan(body, init, (ref_tiles, starts))[0][1]


def brute_indices(queries, refs, k, *, exclude_self, block_size, query_offset=0, ref_offset=0,
                  metric="euclidean"):
    """Indices (n, k) of the exact k nearest ``refs`` (local positions), sorted, ties to the smaller.

    Fast path: tiles of selection keys (squared differences below ``_GRAM_MIN_DIM``, else the
    Gram key ``|r|^2 - 2 q.r`` of data centred on the reference mean, see
    :func:`brute_candidates`) select ``k + 2`` candidates by float32 keys; their distances are
    recomputed exactly, and each query's answer is *certified*: every reference outside the
    candidates has a key >= the last candidate's, and its exact squared distance s is at least
    that key (plus ``|q|^2`` for the Gram key) less the key's float32 rounding and, for the Gram
    key, ``2 (d + 6) eps (2|q| + sqrt(s))^2``: the matmul sums d + 1 terms of total magnitude at
    most ``2|q||r| + |r|^2`` with ``|r| <= |q| + sqrt(s)``, and the norms, the centring and the
    additions each add a unit roundoff of the magnitudes involved (with a factor 2 to spare).
    If that bound separates the k-th exact distance from every non-candidate, the answer is
    exact (also the order of ties: they are sorted by index among the candidates, and none lies
    outside). The other rows (near or exact ties at the k-th distance, strong cancellation) are
    recomputed with exact differences and exact selection in small tiles by a
    ``lax.while_loop``, which under ``vmap`` runs only as long as some batch member needs it.
    ``metric="chebyshev"`` always takes the difference form (its keys ``max_c (q_c - r_c)^2`` have
    less rounding than the Euclidean sum, so the same certificate holds).
    """
    queries = lax.stop_gradient(queries)
    refs = lax.stop_gradient(refs)
    n, d = queries.shape
    m = refs.shape[0]
    dtype = queries.dtype
    offsets = dict(query_offset=query_offset, ref_offset=ref_offset, metric=metric)
    if k >= m:  # every reference, in order of (distance, index) after refinement
        return jnp.broadcast_to(jnp.arange(m, dtype=_INDEX_DTYPE), (n, m))
    gram = d >= _GRAM_MIN_DIM and metric == "euclidean"
    rounded_keys = jnp.finfo(dtype).bits > 32
    if gram:
        # Centring on the reference mean removes the common offset that makes |q|^2 and |r|^2
        # large against |q - r|^2 (the cancellation that gave NaN estimates far from the origin).
        centre = jnp.mean(refs, axis=0)
        tile_queries, tile_refs = queries - centre[None, :], refs - centre[None, :]
    else:
        tile_queries, tile_refs = queries, refs
    # k + 2 candidates: the k-th distance must be separated from the last candidate's key, which
    # (unlike the (k+1)-th) is rarely within rounding of it for continuous data. (2k candidates
    # certify a few more rows but cost more than the fallback saves; measured at d = 4, 10, 32.)
    # With exclude_self the query itself is usually among them (it is dropped by the refinement),
    # so one more is kept: no mask of the query's own column is formed in the tiles.
    # For large k in high dimension the neighbour distances crowd together (at d = 64, k = 80
    # k + 2 candidates left 1.2% of the rows uncertified, k + 4 none), so the margin grows with k.
    num_candidates = min(k + 2 + k // 16 + int(exclude_self), m)
    keys, candidates = brute_candidates(tile_queries, tile_refs, num_candidates,
                                        form="gram" if gram else "difference",
                                        block_size=block_size, metric=metric)
    distances, candidates = refine(queries, refs, candidates, num_candidates,
                                   exclude_self=exclude_self, **offsets)
    if num_candidates == m:  # every reference is a candidate: nothing to certify
        return candidates[:, :k]
    eps = jnp.finfo(dtype).eps
    kth = distances[:, k - 1]
    last = keys[:, -1].astype(dtype)
    if rounded_keys:
        last = last - jnp.finfo(jnp.float32).eps * jnp.abs(last)
    if gram:
        query_norm = jnp.sqrt(jnp.sum(jnp.square(tile_queries), axis=1))
        last = last + jnp.square(query_norm) - 2 * (d + 6) * eps * jnp.square(2 * query_norm + kth)
    certified = last > jnp.square(kth) * (1 + (d + 2) * eps)
    return _exact_where_uncertified(queries, refs, candidates[:, :k], certified, k,
                                    exclude_self=exclude_self, block_size=block_size, **offsets)


def _exact_where_uncertified(queries, refs, index, certified, k, *, exclude_self, block_size,
                             query_offset, ref_offset, metric):
    """Recomputes, with exact differences, the rows of ``index`` in tiles that hold an uncertified row."""
    n = queries.shape[0]
    rows = min(n, _FALLBACK_ROWS)
    tiles = -(-n // rows)
    queries = _pad_rows(queries, tiles * rows)
    index = _pad_rows(index, tiles * rows)
    pending = ~jnp.all(jnp.concatenate([certified, jnp.ones((tiles * rows - n,), bool)])
                       .reshape(tiles, rows), axis=1)

    def body(state):
        index, pending = state
        tile = jnp.argmax(pending)
        start = (tile * rows).astype(_INDEX_DTYPE)
        exact = _exact_rows(lax.dynamic_slice_in_dim(queries, start, rows), refs, k,
                            exclude_self=exclude_self, block_size=block_size,
                            query_offset=query_offset + start, ref_offset=ref_offset, metric=metric)
        return lax.dynamic_update_slice_in_dim(index, exact, start, axis=0), pending.at[tile].set(False)

    index, _ = lax.while_loop(lambda state: jnp.any(state[1]), body, (index, pending))
    return index[:n]


def refine(queries, refs, candidates, k, *, exclude_self, query_offset=0, ref_offset=0,
           metric="euclidean"):
    """Exact distances of the candidate neighbours, sorted by (distance, index), first ``k``.

    Distances are recomputed from coordinate differences, so they are exact up to rounding and
    differentiable with respect to ``queries`` and ``refs``. Candidates that are padding (index
    ``>= m``) or the query itself (``exclude_self``) get distance ``inf``.
    """
    m = refs.shape[0]
    valid = candidates < m
    if exclude_self:
        own = (query_offset + jnp.arange(queries.shape[0], dtype=_INDEX_DTYPE))[:, None]
        valid = valid & (candidates + ref_offset != own)
    neighbours = jnp.take(refs, jnp.minimum(candidates, m - 1), axis=0)
    squared = _sum_squared_differences(queries[:, None, :], neighbours, metric)
    distances = jnp.where(valid, safe_sqrt(squared), jnp.inf)
    return sort_by_distance(distances, candidates, k)


# ------------------------------------------------------------------------------------------------
# k-d tree through a host callback
# ------------------------------------------------------------------------------------------------


def _pykdtree():
    """pykdtree's ``KDTree`` when installed (an optional, faster CPU tree), else None."""
    try:
        from pykdtree.kdtree import KDTree
    except ImportError:
        return None
    return KDTree


# Uncertified rows of the float32 k-d tree are redone by NumPy brute force (float64 differences)
# when they pair with at most this many references in all; a float64 tree is built otherwise.
# Random data have about one such row per 10^4: rebuilding a float64 tree of all references for
# it cost more than the float32 query itself (n = m = 10^4, d = 2: 25 ms against 7 ms).
_HOST_EXACT_MAX_PAIRS = 4_000_000


def _exact_rows_host(queries: np.ndarray, refs: np.ndarray, k: int) -> np.ndarray:
    """Indices (n, k) of the exact k nearest Euclidean ``refs`` of a few ``queries``, ties to the
    smaller index, from float64 squared distances to every reference (NumPy brute force)."""
    by_coordinate = np.ascontiguousarray(refs.T, dtype=np.float64)  # (d, m): contiguous passes
    out = np.empty((queries.shape[0], k), np.int64)
    for row, query in enumerate(queries.astype(np.float64)):
        difference = by_coordinate - query[:, None]
        squared = np.einsum("cj,cj->j", difference, difference)
        kth = np.partition(squared, k - 1)[k - 1]
        inside = np.flatnonzero(squared <= kth)
        out[row] = inside[np.lexsort((inside, squared[inside]))][:k]
    return out


def _kdtree_host(queries: np.ndarray, refs: np.ndarray, k: int, metric: str = "euclidean",
                 backend: str = "auto") -> np.ndarray:
    """Indices of the ``k`` nearest ``refs`` of every query via a k-d tree (as a set: the order is fixed in JAX).

    The tree is pykdtree's (Euclidean, when installed) or SciPy's cKDTree (otherwise, and always
    for the Chebyshev metric). For float32 data pykdtree ranks in float32 and each row is certified
    against float32 rounding (rows that are not are redone in float64); otherwise the ranking is in
    float64 (``backend="float64"``: pykdtree or cKDTree in float64; ``"scipy"``: cKDTree only). Rows
    where some of the ``k + 1`` nearest are tied are re-sorted by index, and a tie between the k-th
    and the next is resolved with a ball query (cKDTree), so that ties go to the smaller index as
    on the brute path.
    """
    from scipy.spatial import cKDTree

    queries, refs = np.asarray(queries), np.asarray(refs)
    # Non-finite points (possible only under jit; eager input is validated) get arbitrary
    # neighbours here; their recomputed distances in JAX are NaN, never a wrong finite number.
    if not (np.isfinite(queries).all() and np.isfinite(refs).all()):
        queries = np.where(np.isfinite(queries), queries, 0.0)
        refs = np.where(np.isfinite(refs), refs, 0.0)
    m = refs.shape[0]
    probe = min(k + 1, m)
    p = np.inf if metric == "chebyshev" else 2.0
    fast = _pykdtree() if backend in ("auto", "float64") and metric == "euclidean" else None
    tree = None
    both_float32 = refs.dtype == np.float32 and queries.dtype == np.float32
    if backend == "auto" and fast is not None and both_float32 and probe > k:
        # pykdtree ranks in the data's float32; a row is certified when its k-th and (k+1)-th
        # float32 distances are apart by more than their rounding (relative (d + 2) eps each, with
        # a margin of 4), so that the first k are the exact first k as a set (the order is fixed
        # in JAX from exact distances). Other rows (ties, near ties) are redone in float64 below.
        distances, index = fast(np.ascontiguousarray(refs)).query(np.ascontiguousarray(queries), k=probe)
        distances = np.asarray(distances, np.float64).reshape(len(queries), probe)
        index = np.asarray(index, np.int64).reshape(len(queries), probe)
        slack = 4.0 * (refs.shape[1] + 2) * float(np.finfo(np.float32).eps)
        uncertain = np.flatnonzero(distances[:, k - 1] * (1 + slack) >= distances[:, k] * (1 - slack))
        if uncertain.size:
            redo = _exact_rows_host if uncertain.size * m <= _HOST_EXACT_MAX_PAIRS else functools.partial(
                _kdtree_host, metric=metric, backend="float64")
            index[uncertain, :k] = redo(queries[uncertain], refs, k)[:, :k]
        return index[:, :k].astype(np.int32)
    if fast is not None:
        distances, index = fast(np.ascontiguousarray(refs, dtype=np.float64)).query(
            np.ascontiguousarray(queries, dtype=np.float64), k=probe)
        distances = np.asarray(distances, np.float64).reshape(len(queries), probe)
        index = np.asarray(index, np.int64).reshape(len(queries), probe)
    else:
        # balanced_tree=False (sliding midpoint) builds in about half the time and queries as fast.
        tree = cKDTree(refs, balanced_tree=False, compact_nodes=False)
        distances, index = tree.query(queries, probe, p=p, workers=-1)
        distances = distances.reshape(len(queries), probe)
        index = index.reshape(len(queries), probe)
    tied = np.flatnonzero(np.any(distances[:, 1:] == distances[:, :-1], axis=1))
    if tied.size:
        order = np.lexsort((index[tied], distances[tied]), axis=1)
        distances[tied] = np.take_along_axis(distances[tied], order, axis=1)
        index[tied] = np.take_along_axis(index[tied], order, axis=1)
    if probe > k:
        for row in np.flatnonzero(distances[:, k] <= distances[:, k - 1]):
            if tree is None:
                tree = cKDTree(refs, balanced_tree=False, compact_nodes=False)
            radius = distances[row, k - 1]
            inside = np.asarray(tree.query_ball_point(queries[row], radius * (1 + 1e-12) + 1e-300,
                                                      p=p), dtype=np.int64)
            difference = refs[inside].astype(np.float64) - queries[row].astype(np.float64)
            exact = (np.max(np.abs(difference), axis=1) if metric == "chebyshev"
                     else np.sqrt(np.sum(difference ** 2, axis=1)))
            index[row, :k] = inside[np.lexsort((inside, exact))[:k]]
    return index[:, :k].astype(np.int32)


def kdtree_candidates(queries, refs, k, metric="euclidean"):
    """Indices (n, k) of the ``k`` nearest ``refs`` via SciPy's cKDTree in a ``jax.pure_callback``."""
    k = min(k, refs.shape[0])
    shape = jax.ShapeDtypeStruct((queries.shape[0], k), _INDEX_DTYPE)
    return jax.pure_callback(functools.partial(_kdtree_host, k=k, metric=metric), shape,
                             lax.stop_gradient(queries),
                             lax.stop_gradient(refs), vmap_method="sequential")


# ------------------------------------------------------------------------------------------------
# One device
# ------------------------------------------------------------------------------------------------


def resolve_method(method: str, d: int) -> str:
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got {method!r}.")
    if method == "auto":
        return "kdtree" if d <= _KDTREE_MAX_DIM and jax.default_backend() == "cpu" else "brute"
    return method


def local_search(queries, refs, k, *, exclude_self, block_size, method, query_offset=0,
                 ref_offset=0, metric="euclidean"):
    """Top-k (distances, global indices) of one device's problem; ``k`` may exceed ``m`` (padded)."""
    m = refs.shape[0]
    if queries.shape[0] == 0:
        return jnp.zeros((0, k), queries.dtype), jnp.zeros((0, k), _INDEX_DTYPE)
    if method == "kdtree":
        candidates = kdtree_candidates(queries, refs, k + 1 if exclude_self else k, metric)
    else:
        candidates = brute_indices(queries, refs, min(k, m), exclude_self=exclude_self,
                                   block_size=block_size, query_offset=query_offset,
                                   ref_offset=ref_offset, metric=metric)
    # The final distances are recomputed outside the (non-differentiable) selection, so gradients
    # with respect to the points flow through them.
    distances, index = refine(queries, refs, candidates, min(k, candidates.shape[1]),
                              exclude_self=exclude_self, query_offset=query_offset,
                              ref_offset=ref_offset, metric=metric)
    index = jnp.where(index < m, index + ref_offset, jnp.iinfo(_INDEX_DTYPE).max)
    if index.shape[1] < k:  # a shard with fewer than k references
        short = k - index.shape[1]
        distances = jnp.concatenate([distances, jnp.full((distances.shape[0], short), jnp.inf,
                                                         distances.dtype)], axis=1)
        index = jnp.concatenate([index, jnp.full((index.shape[0], short),
                                                 jnp.iinfo(_INDEX_DTYPE).max, _INDEX_DTYPE)], axis=1)
    return distances, index


# ------------------------------------------------------------------------------------------------
# Several devices
# ------------------------------------------------------------------------------------------------


def row_split(x):
    """(mesh, mesh axes) over which the rows of a concrete 2-D ``x`` are split, or None.

    This is static (hashable) information read from ``x.sharding`` before tracing, so that a
    jitted search can build its ``shard_map`` from it.
    """
    if isinstance(x, jax.core.Tracer) or not isinstance(x, jax.Array) or x.ndim != 2:
        return None
    sharding = getattr(x, "sharding", None)
    if not isinstance(sharding, NamedSharding) or len(sharding.spec) == 0:
        return None
    axes = sharding.spec[0]
    if axes is None:
        return None
    axes = (axes,) if isinstance(axes, str) else tuple(axes)
    shards = math.prod(sharding.mesh.shape[a] for a in axes)
    if shards <= 1 or x.shape[0] % shards:
        return None
    return sharding.mesh, axes


def replicate(x, mesh):
    """``x`` replicated over ``mesh`` (across processes too, from each process's identical copy)."""
    replicated = NamedSharding(mesh, PartitionSpec())
    if isinstance(x, jax.Array) and x.sharding.is_equivalent_to(replicated, x.ndim):
        return x
    if jax.process_count() > 1:
        return jax.make_array_from_process_local_data(replicated, np.asarray(x), x.shape)
    return jax.device_put(x, replicated)


def _shard_index(mesh, axes):
    index = 0
    for axis in axes:  # row-major over the mesh axes, as PartitionSpec((a, b)) lays shards out
        index = index * mesh.shape[axis] + lax.axis_index(axis)
    return index


def sharded_search(queries, refs, k, *, exclude_self, block_size, method, query_split, ref_split,
                   metric="euclidean"):
    """Search with the rows of refs (or else queries) split over a mesh; same answer as one device."""
    if ref_split is not None:
        mesh, axes = ref_split
        shards = math.prod(mesh.shape[a] for a in axes)
        local_m = refs.shape[0] // shards

        def per_shard(q, r):
            offset = (_shard_index(mesh, axes) * local_m).astype(_INDEX_DTYPE)
            distances, index = local_search(q, r, k, exclude_self=exclude_self,
                                            block_size=block_size, method=method, ref_offset=offset,
                                            metric=metric)
            # (n, shards * k) exact candidates with global indices; ties go to the smaller index.
            distances = lax.all_gather(distances, axes, axis=1, tiled=True)
            index = lax.all_gather(index, axes, axis=1, tiled=True)
            return sort_by_distance(distances, index, k)

        in_specs = (PartitionSpec(), PartitionSpec(axes))
        out_specs = (PartitionSpec(), PartitionSpec())
    else:
        mesh, axes = query_split
        shards = math.prod(mesh.shape[a] for a in axes)
        local_n = queries.shape[0] // shards

        def per_shard(q, r):
            offset = (_shard_index(mesh, axes) * local_n).astype(_INDEX_DTYPE)
            return local_search(q, r, k, exclude_self=exclude_self, block_size=block_size,
                                method=method, query_offset=offset, metric=metric)

        in_specs = (PartitionSpec(axes), PartitionSpec())
        out_specs = (PartitionSpec(axes), PartitionSpec(axes))
    return jax.shard_map(per_shard, mesh=mesh, in_specs=in_specs, out_specs=out_specs,
                         check_vma=False)(queries, refs)


# ------------------------------------------------------------------------------------------------
# Entry points used by kljax.knn
# ------------------------------------------------------------------------------------------------


def search(queries, refs, k, *, exclude_self=False, block_size=None, method="auto",
           query_split=None, ref_split=None, metric="euclidean"):
    """Exact k-NN of one unbatched problem: (distances, int32 indices), each (n, k), ascending.

    ``query_split``/``ref_split`` (from :func:`row_split`, static) say how the rows are split over
    devices; with either, the search runs under ``jax.shard_map`` (refs split: queries must be
    replicated over the same mesh, see :func:`replicate`; else refs must be). Queries without an
    answer (non-finite points) get NaN distances, see :func:`unknown_as_nan`.
    """
    method = resolve_method(method, queries.shape[1])
    if query_split is not None or ref_split is not None:
        found = sharded_search(queries, refs, k, exclude_self=exclude_self, block_size=block_size,
                               method=method, query_split=query_split, ref_split=ref_split,
                               metric=metric)
    else:
        found = local_search(queries, refs, k, exclude_self=exclude_self, block_size=block_size,
                             method=method, metric=metric)
    return unknown_as_nan(queries, refs, *found)


def unknown_as_nan(queries, refs, distances, index):
    """NaN distances (and placeholder indices ``0, 1, ..., k - 1``) for the queries without an answer.

    A query with a NaN or infinite coordinate has no defined distance to anything; a reference with
    one could be (or hide) any query's nearest neighbour, so it leaves *every* query without an
    answer. The searches above would return a wrong finite distance there (``safe_sqrt(nan) = 0``,
    NaN keys never selected) and padding indices; this is the one place that overrides them, after
    the per-shard merge, so a non-finite reference on any shard counts.
    """
    k, m = index.shape[1], refs.shape[0]
    unknown = ~jnp.all(jnp.isfinite(queries), axis=1) | ~jnp.all(jnp.isfinite(refs))
    placeholder = jnp.minimum(jnp.arange(k, dtype=_INDEX_DTYPE), max(m - 1, 0))
    return (jnp.where(unknown[:, None], jnp.nan, distances),
            jnp.where(unknown[:, None], placeholder[None, :], index))


def ball_statistics(queries, refs, radius, *, exclude_self=False, block_size=None):
    """For each query: how many ``refs`` lie within ``radius`` (inclusive) and the largest such distance.

    ``radius`` (n,) is widened by a few units in the last place so that a point whose distance
    *defines* the radius (computed by :func:`refine`, possibly fused differently) is counted.
    Brute force over tiles with the difference form, so counts are exact; the largest distance
    inside is recomputed like :func:`refine`'s (0 when no reference is inside).
    """
    m = refs.shape[0]
    queries = lax.stop_gradient(queries)
    refs = lax.stop_gradient(refs)
    dtype = queries.dtype
    widened = radius * (1 + 8 * jnp.finfo(dtype).eps)
    limit = jnp.square(widened)

    def init(query_block):
        return jnp.zeros((query_block,), _INDEX_DTYPE), jnp.zeros((query_block,), dtype)

    def update(carry, q_tile, limit_tile, r_tile, q_start, r_start):
        count, largest = carry
        squared = _tile_squared_distances(q_tile, r_tile)
        mask = _tile_mask(q_start, r_start, q_tile.shape[0], r_tile.shape[0], m, exclude_self, 0, 0)
        inside = (squared <= limit_tile[:, None]) & ~mask
        count = count + jnp.sum(inside, axis=1, dtype=_INDEX_DTYPE)
        largest = jnp.maximum(largest, jnp.max(jnp.where(inside, squared, 0), axis=1))
        return count, largest

    count, largest = tiled_map(queries, refs, block_size, limit, init, update)
    return count, safe_sqrt(largest)


def count_within(queries, refs, radius, *, metric="euclidean", exclude_self=False, block_size=None):
    """For each query: how many ``refs`` lie at a distance *strictly* below ``radius`` (n,).

    The radius counts of the Kraskov-Stoegbauer-Grassberger estimator (2004, eq. 8: points with
    ``||z_j - z_i|| < eps_i``). Brute force over tiles of about ``block_size^2`` entries with the
    difference form of ``metric``, the same arithmetic as :func:`refine`, so a distance that equals
    ``radius`` there (e.g. the point that defines it) is not counted. Memory as for the search.
    """
    m = refs.shape[0]
    queries = lax.stop_gradient(queries)
    refs = lax.stop_gradient(refs)
    limit = jnp.square(lax.stop_gradient(radius))

    def init(query_block):
        return jnp.zeros((query_block,), _INDEX_DTYPE)

    def update(count, q_tile, limit_tile, r_tile, q_start, r_start):
        squared = _tile_squared_distances(q_tile, r_tile, metric)
        mask = _tile_mask(q_start, r_start, q_tile.shape[0], r_tile.shape[0], m, exclude_self, 0, 0)
        inside = (squared < limit_tile[:, None]) & ~mask
        return count + jnp.sum(inside, axis=1, dtype=_INDEX_DTYPE)

    return tiled_map(queries, refs, block_size, limit, init, update)
