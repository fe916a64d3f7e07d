"""Tests of the exact neighbour search ``kljax.knn.neighbors`` (engine: ``kljax/_knn_search.py``).

Truths: NumPy brute force (``np.linalg.norm`` of differences, stable ``argsort``, so ties go to the
smaller index) and the search itself across block sizes, backends and device layouts.
"""

import os
import socket
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from kljax import _knn_search
from kljax.knn import neighbors


def brute_force(queries, refs, k, exclude_self=False):
    """(distances, indices) by NumPy in float64; ties to the smaller index (stable argsort)."""
    queries = np.asarray(queries, dtype=np.float64)
    refs = np.asarray(refs, dtype=np.float64)
    distances = np.linalg.norm(queries[:, None, :] - refs[None, :, :], axis=-1)
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    index = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, index, axis=1), index


def normal(seed, *shape, dtype=np.float64):
    return np.random.default_rng(seed).normal(size=shape).astype(dtype)


def grid_points(seed, n, d):
    """Points on a small integer grid: many exact duplicates and exactly tied distances."""
    return np.random.default_rng(seed).integers(0, 3, size=(n, d)).astype(np.float64)


def assert_same(result, expected):
    """Bitwise equality of two searches (the distances come from the same refinement code)."""
    np.testing.assert_array_equal(np.asarray(result[1]), np.asarray(expected[1]))
    np.testing.assert_array_equal(np.asarray(result[0]), np.asarray(expected[0]))


def assert_matches_numpy(result, expected):
    """Same indices as NumPy; distances equal up to the summation order of ``np.linalg.norm``."""
    np.testing.assert_array_equal(np.asarray(result[1]), expected[1])
    np.testing.assert_allclose(np.asarray(result[0]), expected[0], rtol=1e-13, atol=0)


# ------------------------------------------------------------------------------------------------
# Exactness against NumPy
# ------------------------------------------------------------------------------------------------


# d = 2: tiles of squared differences; d = 12, 20: Gram pre-selection, certification, fallback
# (one tile and several, k = 1 (argmin) and k = 5).
@pytest.mark.parametrize("d, block_size, k", [(2, None, 1), (2, 32, 5), (12, None, 5), (20, 32, 1)])
def test_matches_numpy_brute_force(d, block_size, k):
    queries, refs = normal(0, 70, d), normal(1, 133, d)  # neither divisible by the block
    assert_matches_numpy(neighbors(queries, refs, k, block_size=block_size, method="brute"),
                         brute_force(queries, refs, k))


@pytest.mark.parametrize("method", ["brute", "kdtree"])
@pytest.mark.parametrize("d", [1, 3])
def test_ties_go_to_the_smaller_index(method, d):
    refs, queries = grid_points(2, 150, d), grid_points(3, 40, d)
    assert_matches_numpy(neighbors(queries, refs, 6, method=method, block_size=64),
                         brute_force(queries, refs, 6))
    assert_matches_numpy(neighbors(refs, refs, 1, exclude_self=True, method=method),
                         brute_force(refs, refs, 1, exclude_self=True))


@pytest.mark.parametrize("k", [6, 12])  # the exact fallback: argmin passes (k <= 8) or a sort
def test_gram_path_ties_are_certified_or_recomputed(k):
    # Above d = 3 candidates come from the Gram form, whose rounding reorders exactly equal
    # distances; such rows fail the certification and are redone exactly, so ties still go to the
    # smaller index.
    refs, queries = grid_points(4, 150, 20), grid_points(5, 40, 20)
    assert_matches_numpy(neighbors(queries, refs, k, method="brute"), brute_force(queries, refs, k))
    assert_matches_numpy(neighbors(queries, refs, k, method="brute", block_size=16),
                         brute_force(queries, refs, k))


def test_uncertified_rows_are_recomputed_under_vmap():
    # One batch member with ties (fallback runs), one without: both exact.
    queries = np.stack([grid_points(6, 30, 6), normal(7, 30, 6)])
    refs = np.stack([grid_points(8, 90, 6), normal(9, 90, 6)])
    got = jax.jit(jax.vmap(lambda q, r: neighbors(q, r, 3, method="brute", block_size=32)))(queries, refs)
    for b in range(2):
        assert_matches_numpy((got[0][b], got[1][b]), brute_force(queries[b], refs[b], 3))


@pytest.mark.parametrize("d", [2, 20])
def test_float32_far_from_origin_is_exact(d):
    offset = np.float32(1e4)
    queries = normal(6, 60, d, dtype=np.float32) + offset
    refs = normal(7, 300, d, dtype=np.float32) + offset
    distances, index = neighbors(queries, refs, 4, block_size=64, method="brute")
    assert distances.dtype == jnp.float32 and index.dtype == jnp.int32
    distances, index = np.asarray(distances), np.asarray(index)
    assert np.all(np.isfinite(distances)) and np.all(distances > 0)
    # The returned distances are those of the returned points (float64 reference on the same
    # float32 inputs) and are the 4 smallest, up to float32 rounding.
    exact = np.linalg.norm(queries[:, None, :].astype(np.float64) - refs[index].astype(np.float64),
                           axis=-1)
    np.testing.assert_allclose(distances, exact, rtol=2e-6)
    np.testing.assert_allclose(distances, brute_force(queries, refs, 4)[0], rtol=2e-6)


def test_matmul_form_would_fail_far_from_origin():
    # The cancellation the engine avoids: |a|^2 - 2ab + |b|^2 in float32 at 1e4 from the origin.
    a = np.float32(1e4) + normal(8, 50, 2, dtype=np.float32)
    b = a + np.float32(1e-2)
    squared = (np.sum(a * a, 1) - 2 * np.sum(a * b, 1) + np.sum(b * b, 1)).astype(np.float32)
    assert np.max(np.abs(np.sqrt(np.abs(squared)) - np.sqrt(2) * 1e-2)) > 1e-2
    distances = np.asarray(neighbors(a, b, 1, method="brute")[0])[:, 0]
    np.testing.assert_allclose(distances, np.linalg.norm(a.astype(np.float64) - b, axis=1), rtol=1e-3)


# ------------------------------------------------------------------------------------------------
# Tiling, backends, exclude_self
# ------------------------------------------------------------------------------------------------


def test_tiled_equals_dense_for_every_block_size():
    queries, refs = normal(9, 45, 3), normal(10, 101, 3)
    dense = neighbors(queries, refs, 7, method="brute")
    for block_size in (1, 44):  # tiles (1, 4), (15, 101): padding and several tiles
        assert_same(neighbors(queries, refs, 7, block_size=block_size, method="brute"), dense)
    dense_self = neighbors(refs, refs, 3, exclude_self=True, method="brute")
    for block_size in (9,):
        assert_same(neighbors(refs, refs, 3, exclude_self=True, block_size=block_size,
                              method="brute"), dense_self)


@pytest.mark.parametrize("k", [1, 5])
def test_grouped_selection_on_wide_tiles(k):
    # Tiles wide enough for the two-level (group minima) selection, with padding: automatic (one
    # tile of 2048 columns) and block_size=250 (two tiles of 1024); exclude_self keeps k + 3.
    queries, refs = normal(11, 30, 4), normal(12, 2000, 4)
    assert_matches_numpy(neighbors(queries, refs, k, method="brute"), brute_force(queries, refs, k))
    assert_matches_numpy(neighbors(queries, refs, k, block_size=250, method="brute"),
                         brute_force(queries, refs, k))
    assert_matches_numpy(neighbors(refs, refs, k, exclude_self=True, block_size=250, method="brute"),
                         brute_force(refs, refs, k, exclude_self=True))


@pytest.mark.parametrize("d, k", [(1, 4), (4, 1)])
def test_kdtree_equals_brute(d, k):
    queries, refs = normal(13, 80, d), normal(14, 200, d)
    assert_same(neighbors(queries, refs, k, method="kdtree"), neighbors(queries, refs, k, method="brute"))
    assert_same(neighbors(refs, refs, 2, exclude_self=True, method="kdtree"),
                neighbors(refs, refs, 2, exclude_self=True, method="brute"))
    if d == 1:  # float32 on the pykdtree path (float32 ranking, certified rows) as on the brute path
        q32, r32 = queries.astype(np.float32) + np.float32(1e3), refs.astype(np.float32) + np.float32(1e3)
        assert_same(neighbors(q32, r32, k, method="kdtree"), neighbors(q32, r32, k, method="brute"))


@pytest.mark.parametrize("tree", ["pykdtree", "scipy"])
def test_kdtree_host_returns_the_exact_k_nearest(tree, monkeypatch):
    # The host side of the k-d tree path returns the exact k nearest as a set (ties to the smaller
    # index), with pykdtree (float32: its float32 ranking plus a certificate, near ties redone in
    # float64) and with SciPy's cKDTree (pykdtree not installed), on continuous and tied data.
    if tree == "pykdtree":
        pytest.importorskip("pykdtree")
    else:
        monkeypatch.setattr(_knn_search, "_pykdtree", lambda: None)
    cases = [(normal(20, 300, 1), normal(21, 500, 1)), (grid_points(22, 100, 2), grid_points(23, 300, 2)),
             (normal(24, 300, 3) + 1e4, normal(25, 500, 3) + 1e4), (normal(26, 200, 6), normal(27, 400, 6))]
    _assert_tree_exact(cases)


def _assert_tree_exact(cases):
    """The host tree's k nearest (k = 1, 5; float32 and float64) equal brute force's, as sets."""
    for queries, refs in cases:
        for dtype in (np.float32, np.float64):
            q, r = queries.astype(dtype), refs.astype(dtype)
            for k in (1, 5):
                got = np.sort(_knn_search._kdtree_host(q, r, k), axis=1)
                np.testing.assert_array_equal(got, np.sort(brute_force(q, r, k)[1], axis=1))


@pytest.mark.parametrize("d", [1, 2, 3])
def test_kdtree_host_is_exact_on_large_inputs(d):
    # From about a thousand points the tree's fast paths reorder points and queries (a space-filling
    # curve order, mapped back); the answer must stay the exact k nearest as a set, ties to the
    # smaller index: continuous data far from the origin, tied grid data, and queries that are
    # the references themselves (each its own nearest, or a smaller-index copy).
    pytest.importorskip("pykdtree")
    cases = [(normal(30 + d, 1500, d) + 1e3, normal(40 + d, 2000, d) + 1e3),
             (grid_points(50 + d, 1200, d), grid_points(60 + d, 1300, d))]
    same = normal(70 + d, 1600, d)
    cases.append((same, same))
    _assert_tree_exact(cases)


def test_exclude_self_drops_own_index_but_keeps_duplicates():
    points = np.array([[0.0, 0.0], [0.0, 0.0], [5.0, 0.0], [0.0, 0.0], [7.0, 0.0]])
    for method in ("brute", "kdtree"):
        distances, index = neighbors(points, points, 2, exclude_self=True, method=method)
        index = np.asarray(index)
        assert not np.any(index == np.arange(5)[:, None])
        np.testing.assert_array_equal(index[:4], [[1, 3], [0, 3], [4, 0], [0, 1]])
        np.testing.assert_array_equal(np.asarray(distances)[0], [0.0, 0.0])
    # k = m - 1 is the largest allowed: every other point, in order.
    _, index = neighbors(points, points, 4, exclude_self=True)
    assert sorted(np.asarray(index)[2].tolist()) == [0, 1, 3, 4]


# ------------------------------------------------------------------------------------------------
# Transformations and devices
# ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["brute", "kdtree"])
def test_jit_vmap_and_batch_axes(method):
    queries, refs = normal(15, 3, 25, 2), normal(16, 3, 40, 2)
    search = jax.jit(lambda q, r: neighbors(q, r, 3, method=method, block_size=16))
    batched = jax.vmap(search)(queries, refs)
    leading = neighbors(queries, refs, 3, method=method)
    for b in range(3):
        expected = brute_force(queries[b], refs[b], 3)
        np.testing.assert_array_equal(np.asarray(batched[1][b]), expected[1])
        np.testing.assert_array_equal(np.asarray(leading[1][b]), expected[1])
        np.testing.assert_allclose(np.asarray(batched[0][b]), expected[0], rtol=1e-13)


def unit_vectors(queries, refs, k):
    """d |q - r| / dq = (q - r) / |q - r| for the k nearest r of every q, shape (n, k, d)."""
    _, index = brute_force(queries, refs, k)
    difference = queries[:, None, :] - refs[index]
    norm = np.linalg.norm(difference, axis=-1, keepdims=True)
    return difference / np.where(norm > 0, norm, 1.0)  # 0 where a query sits on its neighbour


@pytest.mark.parametrize("method", ["brute", "kdtree"])
def test_gradient_of_distances(method):
    queries, refs = normal(17, 10, 3), normal(18, 30, 3)
    grad = jax.jit(jax.grad(lambda q: jnp.sum(neighbors(q, refs, 2, method=method)[0])))(queries)
    np.testing.assert_allclose(np.asarray(grad), unit_vectors(queries, refs, 2).sum(axis=1), rtol=1e-10)
    # Queries sitting on reference points: the zero distance contributes gradient 0, not NaN.
    at_point = jax.jit(jax.grad(lambda q: jnp.sum(neighbors(q, refs, 2, method=method)[0])))(refs[:10])
    np.testing.assert_allclose(np.asarray(at_point), unit_vectors(refs[:10], refs, 2).sum(axis=1),
                               rtol=1e-10)


def four_device_mesh():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 (simulated) devices; tests/conftest.py sets them")
    return Mesh(np.array(devices[:4]), ("shards",))


@pytest.mark.parametrize("method", ["brute", "kdtree"])
def test_sharded_equals_single_device(method):
    mesh = four_device_mesh()
    rows = NamedSharding(mesh, PartitionSpec("shards"))
    queries, refs = normal(19, 36, 3), grid_points(20, 160, 3) + 0.5 * normal(21, 160, 3)
    refs[7] = refs[100]  # a duplicate across shards
    sharded_refs, sharded_queries = jax.device_put(refs, rows), jax.device_put(queries, rows)
    for k in (1, 5):
        single = neighbors(queries, refs, k, method=method)
        assert_same(neighbors(queries, sharded_refs, k, method=method, block_size=16), single)
    assert_same(neighbors(sharded_queries, refs, 5, method=method), single)
    single = neighbors(refs, refs, 3, exclude_self=True, method=method)
    assert_same(neighbors(sharded_refs, sharded_refs, 3, exclude_self=True, method=method), single)


def chebyshev_brute_force(queries, refs, k, exclude_self=False):
    """(distances, indices) under the max-norm by NumPy; ties to the smaller index."""
    distances = np.max(np.abs(np.asarray(queries)[:, None, :] - np.asarray(refs)[None, :, :]), axis=-1)
    if exclude_self:
        np.fill_diagonal(distances, np.inf)
    index = np.argsort(distances, axis=1, kind="stable")[:, :k]
    return np.take_along_axis(distances, index, axis=1), index


# d = 2: k-d tree with p=inf; d = 12: the brute path, which for Chebyshev always tiles differences
# (grid points: exact ties, resolved to the smaller index); float32 keys with float64 input.
@pytest.mark.parametrize("d, method, block_size", [(2, "kdtree", None), (2, "brute", 16),
                                                   (12, "brute", None), (12, "kdtree", None)])
def test_chebyshev_matches_numpy_brute_force(d, method, block_size):
    queries = grid_points(30, 50, d) + 0.25 * normal(31, 50, d)
    refs = grid_points(32, 90, d)
    refs[:45] += 0.25 * normal(33, 45, d)
    for k in (1, 4):
        expected = chebyshev_brute_force(queries, refs, k)
        result = neighbors(queries, refs, k, method=method, block_size=block_size, metric="chebyshev")
        np.testing.assert_array_equal(np.asarray(result[1]), expected[1])
        np.testing.assert_array_equal(np.asarray(result[0]), expected[0])  # max |q - r| is exact
    expected = chebyshev_brute_force(refs, refs, 3, exclude_self=True)
    result = neighbors(refs, refs, 3, exclude_self=True, method=method, metric="chebyshev")
    np.testing.assert_array_equal(np.asarray(result[1]), expected[1])
    with pytest.raises(ValueError, match="`metric` must be one of"):
        neighbors(queries, refs, 1, metric="manhattan")


def test_chebyshev_sharded_equals_single_device_and_radius_counts():
    rows = NamedSharding(four_device_mesh(), PartitionSpec("shards"))
    queries, refs = normal(34, 36, 3), grid_points(35, 160, 3) + 0.5 * normal(36, 160, 3)
    for method in ("brute", "kdtree"):
        single = neighbors(queries, refs, 4, method=method, metric="chebyshev")
        assert_same(neighbors(queries, jax.device_put(refs, rows), 4, method=method, metric="chebyshev"),
                    single)
    # strict radius counts (KSG): the point at distance exactly eps is not counted
    radius = np.asarray(single[0])[:, 3]
    distances = np.max(np.abs(queries[:, None] - refs[None]), axis=-1)
    for block_size in (None, 16):
        counts = _knn_search.count_within(jnp.asarray(queries), jnp.asarray(refs), jnp.asarray(radius),
                                          metric="chebyshev", block_size=block_size)
        np.testing.assert_array_equal(np.asarray(counts), np.sum(distances < radius[:, None], axis=1))


def test_sharded_over_two_mesh_axes():
    devices = jax.devices()
    if len(devices) < 4:
        pytest.skip("needs 4 (simulated) devices")
    mesh = Mesh(np.array(devices[:4]).reshape(2, 2), ("a", "b"))
    refs = normal(22, 64, 5)
    sharded = jax.device_put(refs, NamedSharding(mesh, PartitionSpec(("a", "b"))))
    assert_matches_numpy(neighbors(refs[:9], sharded, 4, method="brute"), brute_force(refs[:9], refs, 4))


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.multiprocess
@pytest.mark.slow
def test_multihost_two_processes_on_loopback():
    """Two processes x 2 CPU devices joined by ``jax.distributed`` (gloo collectives on CPU)."""
    worker = os.path.join(os.path.dirname(__file__), "_knn_multihost_worker.py")
    port = _free_port()
    env = dict(os.environ)
    env.pop("XLA_FLAGS", None)
    repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env["PYTHONPATH"] = repo + os.pathsep + env.get("PYTHONPATH", "")
    processes = [subprocess.Popen([sys.executable, worker, str(port), str(i), "2"], env=env,
                                  stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
                 for i in range(2)]
    outputs = []
    try:
        for process in processes:
            outputs.append(process.communicate(timeout=180)[0])
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
    for process, output in zip(processes, outputs):
        assert process.returncode == 0 and "OK" in output, output[-3000:]


# ------------------------------------------------------------------------------------------------
# Memory
# ------------------------------------------------------------------------------------------------


def test_tiled_search_never_allocates_the_distance_matrix():
    # Compiled, not run: XLA's own accounting of the temporary buffers of a 20k x 20k search.
    n = m = 20_000
    spec = jax.ShapeDtypeStruct((n, 10), jnp.float32)
    search = jax.jit(lambda q, r: neighbors(q, r, 5, block_size=1024, method="brute"))
    temp = search.lower(spec, spec).compile().memory_analysis().temp_size_in_bytes
    # A few (1024, 1024) tiles plus O(n k) results: far below the (n, m) matrix (1.6 GB).
    assert temp < 64 * 2**20 < (n * m * 4) // 20


# ------------------------------------------------------------------------------------------------
# Errors
# ------------------------------------------------------------------------------------------------


def test_errors():
    queries, refs = normal(23, 5, 2), normal(24, 8, 2)
    with pytest.raises(ValueError, match="`k`=9 is too large"):
        neighbors(queries, refs, 9)
    with pytest.raises(ValueError, match="m - 1 = 7"):
        neighbors(refs, refs, 8, exclude_self=True)
    with pytest.raises(ValueError, match="`k` must be >= 1"):
        neighbors(queries, refs, 0)
    with pytest.raises(TypeError, match="`k` must be an int"):
        neighbors(queries, refs, 1.5)
    with pytest.raises(ValueError, match=r"same dimension.*\(5, 2\) and \(8, 3\)"):
        neighbors(queries, normal(25, 8, 3), 1)
    with pytest.raises(ValueError, match="shapes differ"):
        neighbors(queries, refs, 1, exclude_self=True)
    with pytest.raises(ValueError, match="`block_size`"):
        neighbors(queries, refs, 1, block_size=0)
    with pytest.raises(ValueError, match="`method`"):
        neighbors(queries, refs, 1, method="ball_tree")
    with pytest.raises(ValueError, match=r"\(\.\.\., num_points, dim\)"):
        neighbors(queries[0], refs, 1)
    with pytest.raises(TypeError, match="floating"):
        neighbors(np.ones((3, 2), dtype=np.int32), refs, 1)
    bad = refs.copy()
    bad[3, 1] = np.nan
    with pytest.raises(ValueError, match="`refs` contains NaN"):
        neighbors(queries, bad, 1)
    # No queries: empty results.
    distances, index = neighbors(np.zeros((0, 2)), refs, 3, method="brute")
    assert distances.shape == index.shape == (0, 3)
    # Shape errors also at trace time.
    with pytest.raises(ValueError, match="too large"):
        jax.jit(lambda q, r: neighbors(q, r, 9))(queries, refs)


def test_auto_method_choice():
    assert _knn_search.resolve_method("auto", 2) == ("kdtree" if jax.default_backend() == "cpu" else "brute")
    assert _knn_search.resolve_method("auto", 7) == "brute"
    assert _knn_search.resolve_method("kdtree", 50) == "kdtree"


# ------------------------------------------------------------------------------------------------
# Non-finite points: eagerly an error, under jit NaN (never a wrong finite distance)
# ------------------------------------------------------------------------------------------------


def assert_unknown_rows(result, refs_rows, unknown, expected):
    """Rows ``unknown`` have NaN distances and in-range indices; the others match ``expected``."""
    distances, index = np.asarray(result[0]), np.asarray(result[1])
    assert np.all((index >= 0) & (index < refs_rows))
    assert np.all(np.isnan(distances[unknown]))
    known = np.setdiff1d(np.arange(len(distances)), unknown)
    if known.size:
        np.testing.assert_array_equal(index[known], expected[1][known])
        np.testing.assert_allclose(distances[known], expected[0][known], rtol=1e-13)


# d = 2: difference tiles; d = 8: Gram pre-selection (centred on the reference mean, which a NaN
# reference poisons); block_size=4: many tiles, so the NaN sits in one of several (brute path only;
# one tile is the special case). The k-d tree's host code does not depend on d.
@pytest.mark.parametrize("method, d, block_size", [("brute", 2, 4), ("brute", 8, 4), ("kdtree", 2, None)])
def test_non_finite_points_give_nan_distances_under_jit(method, d, block_size):
    queries, refs = normal(30, 20, d), normal(31, 30, d)
    search = jax.jit(lambda q, r: neighbors(q, r, 3, method=method, block_size=block_size))
    for bad in (np.nan, np.inf, -np.inf):
        # A non-finite query: NaN for that query only (was 0 on the tree path, inf on the brute one,
        # with index 2**31 - 1).
        bad_queries = queries.copy()
        bad_queries[5, d - 1] = bad
        expected = brute_force(queries, refs, 3)
        assert_unknown_rows(search(bad_queries, refs), 30, [5], expected)
        # A non-finite reference could be anyone's neighbour: NaN for every query (the brute path
        # skipped it silently, the tree path answered distance 0).
        bad_refs = refs.copy()
        bad_refs[7, 0] = bad
        assert_unknown_rows(search(queries, bad_refs), 30, np.arange(20), expected)
    # with exclude_self the query is also a reference: every row is unknown
    bad_refs = refs.copy()
    bad_refs[2, 0] = np.nan
    result = jax.jit(lambda r: neighbors(r, r, 2, exclude_self=True, method=method,
                                         block_size=block_size))(bad_refs)
    assert_unknown_rows(result, 30, np.arange(30), None)


def test_non_finite_points_give_nan_under_vmap_per_problem():
    queries, refs = normal(32, 3, 10, 2), normal(33, 3, 12, 2)
    refs[1, 4, 1] = np.nan
    queries[2, 6, 0] = np.nan
    distances, index = jax.jit(jax.vmap(lambda q, r: neighbors(q, r, 2, method="brute")))(queries, refs)
    distances = np.asarray(distances)
    assert np.all((np.asarray(index) >= 0) & (np.asarray(index) < 12))
    assert not np.any(np.isnan(distances[0]))
    assert np.all(np.isnan(distances[1]))  # a NaN reference: its whole problem
    assert np.isnan(distances[2, 6]).all() and not np.isnan(np.delete(distances[2], 6, axis=0)).any()


@pytest.mark.parametrize("method", ["brute", "kdtree"])
def test_non_finite_points_give_nan_on_the_sharded_path(method):
    # The shard_map path runs eagerly only for inputs it cannot check (across processes); here the
    # engine is driven directly, under jit, with the split a concrete sharded array would give.
    mesh = four_device_mesh()
    rows = NamedSharding(mesh, PartitionSpec("shards"))
    queries, refs = normal(34, 16, 3), normal(35, 40, 3)
    ref_split = _knn_search.row_split(jax.device_put(refs, rows))
    query_split = _knn_search.row_split(jax.device_put(queries, rows))
    expected = brute_force(queries, refs, 2)
    split_refs = jax.jit(lambda q, r: _knn_search.search(q, r, 2, method=method, ref_split=ref_split))
    split_queries = jax.jit(lambda q, r: _knn_search.search(q, r, 2, method=method,
                                                            query_split=query_split))
    replicated_queries = _knn_search.replicate(jnp.asarray(queries), mesh)
    replicated_refs = _knn_search.replicate(jnp.asarray(refs), mesh)
    assert_unknown_rows(split_refs(replicated_queries, jax.device_put(refs, rows)), 40, [], expected)
    bad_refs = refs.copy()
    bad_refs[37, 1] = np.nan  # on the last shard: the merge over shards must not hide it
    assert_unknown_rows(split_refs(replicated_queries, jax.device_put(bad_refs, rows)), 40,
                        np.arange(16), expected)
    bad_queries = queries.copy()
    bad_queries[9, 2] = np.nan
    assert_unknown_rows(split_queries(jax.device_put(bad_queries, rows), replicated_refs), 40, [9],
                        expected)


def test_non_finite_points_raise_eagerly():
    queries, refs = normal(36, 5, 2), normal(37, 8, 2)
    for bad in (np.nan, np.inf):
        bad_queries = queries.copy()
        bad_queries[1, 0] = bad
        with pytest.raises(ValueError, match="`queries` contains NaN or inf"):
            neighbors(bad_queries, refs, 1)
        bad_refs = refs.copy()
        bad_refs[1, 0] = bad
        with pytest.raises(ValueError, match="`refs` contains NaN or inf"):
            neighbors(queries, bad_refs, 1, method="brute")


def test_exclude_self_must_be_a_bool():
    refs = normal(38, 8, 2)
    for flag in ("no", 0, 1, None):
        with pytest.raises(TypeError, match="`exclude_self` must be a bool"):
            neighbors(refs, refs, 1, exclude_self=flag)
    assert_same(neighbors(refs, refs, 1, exclude_self=np.bool_(True)),
                neighbors(refs, refs, 1, exclude_self=True))
