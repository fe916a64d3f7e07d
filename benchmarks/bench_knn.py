"""Exact k-NN search and kNN KL: kljax vs SciPy cKDTree, pykdtree, scikit-learn, faiss and a matmul floor.

    python -m benchmarks.bench_knn                                   # full grid (slow on 2 cores)
    python -m benchmarks.bench_knn --sizes 10000 --dims 2,3,10,32,64 --ks 1,5
    python -m benchmarks.bench_knn --sizes 10000 --dims 10 --ks 1 --peers ckdtree,faiss,floor
    python -m benchmarks.bench_knn --sizes 10000 --tree-max-dim 10     # skip k-d trees at d > 10
    python -m benchmarks.bench_knn --memory --memory-sizes 50000,200000 --no-grid --name knn_memory

Grid: n = m in ``--sizes``, d in ``--dims``, k in ``--ks``; float32 points, queries x ~ N(0, I) and
references y ~ N(0.5, I); kljax and the floor work in tiles of ``--block-size`` (default 2048; 0 means
``block_size=None``, kljax's automatic tiles). Every cell times

* ``neighbors``: the k nearest references of every query, distances and indices. kljax: jitted
  ``kljax.knn.neighbors`` (``method="auto"``). Peers build their index inside the timed call (a search
  from raw points, as kljax does): SciPy ``cKDTree`` (``workers=-1``), ``pykdtree``, scikit-learn
  ``NearestNeighbors`` (``algorithm="auto"``, ``n_jobs=-1``), faiss ``IndexFlatL2`` (exact brute force).
  Floor: one jitted pass over tiles of the same number of query rows (against all references) that
  forms every squared distance by the matmul form and reduces each row to its minimum, the least a
  brute-force search must do.
* ``kl``: the WKV estimate D(P || Q) from x and y (two searches: x among x without itself, x among y).
  kljax: jitted ``kljax.knn.kl(estimator="wkv")`` (and the default estimator); peers: the same formula on
  each peer's searches; floor: two matmul passes.

Before timing, each peer's answer is checked against kljax: its neighbours' exact (float64) distances
must equal kljax's up to float32 selection rounding (exact ties may swap indices), and its WKV must
match. Times are medians after a warm-up; compile time of the jitted functions is reported apart.
Ratios are peer time / kljax time in the same run (> 1: kljax is faster).

``--memory``: peak resident memory of a fresh subprocess that runs a tiled ``neighbors`` search of
n x n points in d = 16 (``--memory-block``), measured with ``os.wait4``'s ``ru_maxrss``, next to the
same process with a tiny search (the import baseline). Issue 3 asks for 200k x 200k under 2 GiB.
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import subprocess
import sys
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import compile_seconds, time_call

ALL_PEERS = ("ckdtree", "pykdtree", "sklearn", "faiss", "floor")
TREE_PEERS = ("ckdtree", "pykdtree")
FLOOR_DENSE_BLOCK = 1024
PEER_LABELS = {"ckdtree": "SciPy cKDTree", "pykdtree": "pykdtree", "sklearn": "sklearn NearestNeighbors",
               "faiss": "faiss IndexFlatL2", "floor": "matmul floor"}


def _int_list(text: str) -> list[int]:
    return [int(float(v)) for v in text.split(",") if v.strip()]


def _str_list(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


# kljax's tile size in the grid. Measured here (n = 10k, d = 10 and 16, k = 1, brute force): 2048 x 2048
# tiles cost about half the CPU time of one dense (n, m) tile, whose intermediates do not fit in cache.
DEFAULT_BLOCK = 2048


# ----------------------------------------------------------------------------------------------
# Peers: each returns (distances float64 (n, k), indices int64 (n, k)) of the k nearest refs.
# ----------------------------------------------------------------------------------------------

def _search_ckdtree(queries, refs, k):
    from scipy.spatial import cKDTree

    dist, idx = cKDTree(refs).query(queries, k=[j + 1 for j in range(k)], workers=-1)
    return dist, idx


def _search_pykdtree(queries, refs, k):
    from pykdtree.kdtree import KDTree

    dist, idx = KDTree(refs).query(queries, k=k)
    return dist.reshape(len(queries), k), idx.reshape(len(queries), k)


def _search_sklearn(queries, refs, k):
    from sklearn.neighbors import NearestNeighbors

    model = NearestNeighbors(n_neighbors=k, algorithm="auto", n_jobs=-1).fit(refs)
    return model.kneighbors(queries)


def _search_faiss(queries, refs, k):
    import faiss

    index = faiss.IndexFlatL2(refs.shape[1])
    index.add(refs)
    dist2, idx = index.search(queries, k)
    return np.sqrt(np.maximum(dist2, 0.0)), idx


PEER_SEARCH = {"ckdtree": _search_ckdtree, "pykdtree": _search_pykdtree, "sklearn": _search_sklearn,
               "faiss": _search_faiss}


def _available(peer: str) -> bool:
    module = {"ckdtree": "scipy", "pykdtree": "pykdtree", "sklearn": "sklearn", "faiss": "faiss"}.get(peer)
    if module is None:
        return True
    try:
        __import__(module)
        return True
    except ImportError:
        return False


def wkv_from_search(search, x, y, k):
    """WKV (Wang, Kulkarni, Verdu 2009, eq. 5) from a peer's k-NN search, as a float."""
    n, d = x.shape
    m = y.shape[0]
    rho = np.asarray(search(x, x, k + 1)[0], dtype=np.float64)[:, k]  # neighbour 0 is the point itself
    nu = np.asarray(search(x, y, k)[0], dtype=np.float64)[:, k - 1]
    return float(d * np.mean(np.log(nu / rho)) + np.log(m / (n - 1)))


def matmul_floor(block_size: int | None):
    """Jitted squared distances by the matmul form over query tiles, each row reduced to its minimum.

    Tiles of ``block_size`` query rows (kljax's tiling); with ``None`` (kljax's automatic tiles) the
    floor uses tiles of ``FLOOR_DENSE_BLOCK`` rows, because writing out the whole (n, m) matrix is
    memory-bound and would flatter kljax.
    """
    block_size = block_size or FLOOR_DENSE_BLOCK

    def tile_min(q, refs, ref_sq):
        d2 = jnp.sum(q * q, axis=1, keepdims=True) - 2.0 * (q @ refs.T) + ref_sq[None, :]
        return jnp.min(d2, axis=1)

    @jax.jit
    def floor(queries, refs):
        ref_sq = jnp.sum(refs * refs, axis=1)
        n = queries.shape[0]
        if block_size is None or block_size >= n:
            return tile_min(queries, refs, ref_sq)
        pad = (-n) % block_size
        tiles = jnp.pad(queries, ((0, pad), (0, 0))).reshape(-1, block_size, queries.shape[1])
        return jax.lax.map(lambda q: tile_min(q, refs, ref_sq), tiles).reshape(-1)[:n]

    return floor


# ----------------------------------------------------------------------------------------------
# Agreement checks (before timing)
# ----------------------------------------------------------------------------------------------

def exact_sq_distances(queries, refs, indices):
    """float64 squared distances from each query to the references named by ``indices``."""
    q = np.asarray(queries, dtype=np.float64)
    r = np.asarray(refs, dtype=np.float64)
    diff = q[:, None, :] - r[np.asarray(indices)]
    return np.sum(diff * diff, axis=-1)


def check_neighbors(name, queries, refs, peer, reference):
    """Peer and kljax agree up to float32 selection rounding: the exact (float64) distances of the
    neighbours each returned are equal, and the peer's reported distances are those distances.
    Returns the fraction of indices that differ (exact or near ties) for the record."""
    peer_dist, peer_idx = (np.asarray(a) for a in peer)
    ref_idx = np.asarray(reference[1])
    exact_peer = exact_sq_distances(queries, refs, peer_idx)
    exact_ref = exact_sq_distances(queries, refs, ref_idx)
    # A float32 matmul-form selection can mis-order squared distances by a few eps * (|q|^2 + |r|^2).
    q_sq = np.sum(np.asarray(queries, np.float64) ** 2, axis=1, keepdims=True)
    r_sq = np.max(np.sum(np.asarray(refs, np.float64) ** 2, axis=1))
    tol = 64 * np.finfo(np.float32).eps * (q_sq + r_sq) + 1e-6 * exact_ref
    bad = np.abs(np.sort(exact_peer, axis=1) - exact_ref) > tol
    if np.any(bad):
        i = np.argwhere(bad)[0]
        raise AssertionError(f"{name} disagrees with kljax at query {i[0]}, neighbour {i[1]}: exact squared "
                             f"distances {np.sort(exact_peer, axis=1)[tuple(i)]} vs {exact_ref[tuple(i)]}")
    np.testing.assert_allclose(peer_dist, np.sqrt(exact_peer), rtol=1e-3, atol=1e-3,
                               err_msg=f"{name} reports distances far from its neighbours' exact ones")
    return float(np.mean(peer_idx != ref_idx))


# ----------------------------------------------------------------------------------------------
# One cell
# ----------------------------------------------------------------------------------------------

def _timed(fn):
    start = time.perf_counter()
    value = jax.block_until_ready(fn())
    return value, time.perf_counter() - start


def time_peer(fn, first_s, *, repeats, single_above_s):
    """``time_call`` for a peer already run once (``first_s``); a peer slower than ``single_above_s``
    is not repeated: its one checked run is the measurement (marked ``single``)."""
    if first_s > single_above_s:
        return {"first_s": first_s, "median_s": first_s, "min_s": first_s, "runs_s": [first_s], "single": True}
    return time_call(fn, repeats=repeats, min_seconds=0.5)


def bench_cell(n, d, k, peers, *, repeats, block_size, rng, do_kl=True, single_above_s=30.0,
               tree_max_dim=None):
    from kljax import knn

    x_np = rng.standard_normal((n, d)).astype(np.float32)
    y_np = (0.5 + rng.standard_normal((n, d))).astype(np.float32)
    x, y = jax.device_put(x_np), jax.device_put(y_np)
    if tree_max_dim is not None and d > tree_max_dim:
        peers = [p for p in peers if p not in TREE_PEERS]
    cell = {"n": n, "d": d, "k": k, "block_size": block_size, "neighbors": {}, "kl": {}, "compile_s": {},
            "index_mismatch": {}, "kl_abs_diff": {}}

    # --- neighbors ---
    search = jax.jit(partial(knn.neighbors, k=k, block_size=block_size))
    cell["compile_s"]["kljax neighbors"] = compile_seconds(search, x, y)
    reference = [np.asarray(a) for a in search(x, y)]
    exact = np.sqrt(exact_sq_distances(x_np, y_np, reference[1]))
    np.testing.assert_allclose(reference[0], exact, rtol=1e-5, atol=1e-6,
                               err_msg="kljax distances differ from the exact distances of its indices")
    cell["neighbors"]["kljax"] = time_call(lambda: search(x, y), repeats=repeats, min_seconds=0.5)
    for peer in peers:
        if peer == "floor":
            floor = matmul_floor(block_size)
            cell["compile_s"]["floor neighbors"] = compile_seconds(floor, x, y)
            cell["neighbors"]["floor"] = time_call(lambda: floor(x, y), repeats=repeats, min_seconds=0.5)
            continue
        fn = PEER_SEARCH[peer]
        answer, first_s = _timed(lambda: fn(x_np, y_np, k))
        cell["index_mismatch"][peer] = check_neighbors(peer, x_np, y_np, answer, reference)
        cell["neighbors"][peer] = time_peer(lambda: fn(x_np, y_np, k), first_s, repeats=repeats,
                                            single_above_s=single_above_s)

    if not do_kl:
        return cell

    # --- kl (WKV) ---
    kl_wkv = jax.jit(partial(knn.kl, k=k, estimator="wkv", block_size=block_size))
    cell["compile_s"]["kljax kl wkv"] = compile_seconds(kl_wkv, x, y)
    reference_kl = float(kl_wkv(x, y))
    cell["kl"]["kljax"] = time_call(lambda: kl_wkv(x, y), repeats=repeats, min_seconds=0.5)
    default = _default_estimator(knn)
    if default != "wkv":
        kl_default = jax.jit(partial(knn.kl, k=k, block_size=block_size))
        cell["compile_s"]["kljax kl default"] = compile_seconds(kl_default, x, y)
        cell["kl"][f"kljax {default}"] = time_call(lambda: kl_default(x, y), repeats=repeats, min_seconds=0.5)
    for peer in peers:
        if peer == "floor":
            floor = matmul_floor(block_size)
            cell["kl"]["floor"] = time_call(lambda: (floor(x, x), floor(x, y)), repeats=repeats, min_seconds=0.5)
            continue
        fn = PEER_SEARCH[peer]
        value, first_s = _timed(lambda: wkv_from_search(fn, x_np, y_np, k))
        cell["kl_abs_diff"][peer] = abs(value - reference_kl)
        if not abs(value - reference_kl) <= 5e-3 * (1.0 + abs(reference_kl)):
            raise AssertionError(f"{peer} WKV {value} disagrees with kljax WKV {reference_kl} (n={n}, d={d}, k={k})")
        cell["kl"][peer] = time_peer(lambda: wkv_from_search(fn, x_np, y_np, k), first_s, repeats=repeats,
                                     single_above_s=single_above_s)
    return cell


def _default_estimator(knn) -> str:
    import inspect

    return inspect.signature(knn.kl).parameters["estimator"].default


# ----------------------------------------------------------------------------------------------
# Tables
# ----------------------------------------------------------------------------------------------

def summary_table(cells, peers, what):
    """One row per (n, d, k): kljax ms, each peer's ms and its ratio peer / kljax, and the targets."""
    header = ["n", "d", "k", "kljax ms"] + [PEER_LABELS[p] for p in peers] + [
        "kljax / best peer", "kljax / floor", "targets"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---:|" * len(header)]
    for cell in cells:
        results = cell[what]
        if "kljax" not in results:
            continue
        ours = results["kljax"]["median_s"]
        row = [str(cell["n"]), str(cell["d"]), str(cell["k"]), f"{1e3 * ours:.1f}"]
        for p in peers:
            r = results.get(p)
            row.append("-" if r is None else f"{1e3 * r['median_s']:.1f} ({r['median_s'] / ours:.2f}x)"
                       + ("*" if r.get("single") else ""))
        peer_times = [results[p]["median_s"] for p in peers if p != "floor" and p in results]
        best = ours / min(peer_times) if peer_times else float("nan")
        floor = ours / results["floor"]["median_s"] if "floor" in results else float("nan")
        ok_best = best <= 1.0
        ok_floor = floor <= 2.0 if cell["d"] >= 16 else None
        verdict = ("best-peer met" if ok_best else "**best-peer missed**")
        if ok_floor is not None:
            verdict += "; floor met" if ok_floor else "; **floor missed**"
        row += [f"{best:.2f}", f"{floor:.2f}", verdict]
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def best_peer_table(cells, peers):
    """README-ready: one row per (d, n, k) with kljax's neighbors time, the fastest peer and the ratio."""
    lines = ["| d | n | k | kljax ms | best peer (ms) | kljax / best peer |", "|---:|---:|---:|---:|---|---:|"]
    for cell in sorted(cells, key=lambda c: (c["d"], c["n"], c["k"])):
        results = cell["neighbors"]
        timed = {p: results[p]["median_s"] for p in peers if p != "floor" and p in results}
        if "kljax" not in results or not timed:
            continue
        best = min(timed, key=timed.get)
        ours = results["kljax"]["median_s"]
        lines.append(f"| {cell['d']} | {cell['n']} | {cell['k']} | {1e3 * ours:.1f} | {PEER_LABELS[best]} "
                     f"({1e3 * timed[best]:.1f}) | {ours / timed[best]:.2f} |")
    return "\n".join(lines)


def kljax_tree_backend() -> str:
    """The k-d tree kljax's ``method="auto"`` uses on CPU at d <= 6 (pykdtree when installed)."""
    from kljax import _knn_search

    return "pykdtree" if _knn_search._pykdtree() is not None else "SciPy cKDTree"


def compile_table(cells):
    lines = ["| n | d | k | " + " | ".join(sorted({key for c in cells for key in c["compile_s"]})) + " |"]
    keys = sorted({key for c in cells for key in c["compile_s"]})
    lines.append("|" + "---:|" * (3 + len(keys)))
    for c in cells:
        lines.append(f"| {c['n']} | {c['d']} | {c['k']} | "
                     + " | ".join(f"{c['compile_s'][key]:.2f}" if key in c["compile_s"] else "-" for key in keys) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Memory
# ----------------------------------------------------------------------------------------------

def _memory_child(n: int, d: int, k: int, block_size: int) -> None:
    """Runs in a fresh process: one tiled search, prints its seconds as JSON."""
    from kljax import knn

    rng = np.random.default_rng(0)
    x = jax.device_put(rng.standard_normal((n, d)).astype(np.float32))
    y = jax.device_put(rng.standard_normal((n, d)).astype(np.float32))
    search = jax.jit(partial(knn.neighbors, k=k, block_size=block_size))
    start = time.perf_counter()
    compiled = search.lower(x, y).compile()
    compile_s = time.perf_counter() - start
    start = time.perf_counter()
    jax.block_until_ready(compiled(x, y))
    print(json.dumps({"compile_s": compile_s, "run_s": time.perf_counter() - start}))


class _Popen(subprocess.Popen):
    """``subprocess.Popen`` that records the child's own peak RSS when it is reaped (``os.wait4``)."""

    _peak_rss_mib = None

    def _try_wait(self, wait_flags):
        try:
            pid, status, usage = os.wait4(self.pid, wait_flags)
        except ChildProcessError:
            return (self.pid, 0)
        if pid == self.pid:
            self._peak_rss_mib = usage.ru_maxrss / 1024.0  # Linux reports KiB
        return (pid, status)



def _memory_runs(sizes, d, k, block_size, limit_s):
    """The import baseline, then each size in turn unless the last measured run, scaled by n^2
    (n = m), predicts more than ``limit_s`` seconds."""
    results = [{"role": "baseline (tiny search: imports + runtime)",
                **_measure(2048, d, k, min(block_size, 1024), None)}]
    measured = None
    for n in sorted(sizes):
        if measured is not None:
            estimate = measured["run_s"] * (n / measured["n"]) ** 2
            if estimate > limit_s:
                results.append({"role": "tiled search", "n": n, "d": d, "k": k, "block_size": block_size,
                                "skipped": True, "estimated_run_s": estimate})
                continue
        record = {"role": "tiled search", **_measure(n, d, k, block_size, 3 * limit_s)}
        results.append(record)
        if "run_s" in record:
            measured = record
    return results


def _measure(n, d, k, block_size, timeout):
    command = [sys.executable, "-m", "benchmarks.bench_knn", "--memory-child", f"{n},{d},{k},{block_size}"]
    start = time.perf_counter()
    proc = _Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                  cwd=pathlib.Path(__file__).resolve().parent.parent)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.communicate()
        return {"n": n, "d": d, "k": k, "block_size": block_size, "timed_out": True,
                "wall_s": time.perf_counter() - start, "peak_rss_mib": proc._peak_rss_mib}
    record = {"n": n, "d": d, "k": k, "block_size": block_size, "wall_s": time.perf_counter() - start,
              "returncode": proc.returncode, "peak_rss_mib": proc._peak_rss_mib}
    if proc.returncode == 0:
        record.update(json.loads(out.strip().splitlines()[-1]))
    else:
        record["stderr"] = err[-2000:]
    return record


def memory_table(results):
    lines = ["| run | n | d | k | block_size | peak RSS MiB | compile s | run s | note |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for r in results:
        note = ""
        if r.get("skipped"):
            note = f"not run: estimated {r['estimated_run_s']:.0f} s from the smaller size (time ~ n^2)"
        elif r.get("timed_out"):
            note = "timed out"
        elif r.get("returncode"):
            note = "failed: " + r.get("stderr", "").strip().splitlines()[-1] if r.get("stderr") else "failed"
        rss = r.get("peak_rss_mib")
        lines.append(f"| {r.get('role', '')} | {r['n']} | {r['d']} | {r['k']} | {r['block_size']} | "
                     f"{'-' if rss is None else f'{rss:.0f}'} | "
                     f"{r['compile_s']:.2f} | {r['run_s']:.2f} | {note} |" if "run_s" in r else
                     f"| {r.get('role', '')} | {r['n']} | {r['d']} | {r['k']} | {r['block_size']} | "
                     f"{'-' if rss is None else f'{rss:.0f}'} | - | - | {note} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------

def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench_knn", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", type=_int_list, default=[10000, 50000], help="n = m (default 10000,50000)")
    parser.add_argument("--dims", type=_int_list, default=[2, 3, 10, 32, 64])
    parser.add_argument("--ks", type=_int_list, default=[1, 5])
    parser.add_argument("--peers", type=_str_list, default=list(ALL_PEERS),
                        help=f"subset of {','.join(ALL_PEERS)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--block-size", type=int, default=DEFAULT_BLOCK,
                        help="block_size for kljax and the floor (default %(default)s; 0: block_size=None, automatic)")
    parser.add_argument("--single-above-s", type=float, default=30.0,
                        help="a peer whose checked first run takes longer is timed by that one run (marked *)")
    parser.add_argument("--tree-max-dim", type=int, default=None,
                        help="skip the k-d tree peers (cKDTree, pykdtree) above this dimension, where they are "
                             "many times slower than brute force (default: never skip)")
    parser.add_argument("--no-kl", action="store_true", help="time neighbors only")
    parser.add_argument("--no-grid", action="store_true", help="skip the timing grid (e.g. with --memory)")
    parser.add_argument("--memory", action="store_true", help="measure peak RSS of a tiled search")
    parser.add_argument("--memory-sizes", type=_int_list, default=[50000, 200000])
    parser.add_argument("--memory-dim", type=int, default=16)
    parser.add_argument("--memory-block", type=int, default=2048)
    parser.add_argument("--memory-limit-s", type=float, default=600.0,
                        help="skip a memory size whose run time, extrapolated as n^2, exceeds this")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    parser.add_argument("--name", default="knn", help="output file stem (OUT/NAME.md, OUT/NAME.json)")
    parser.add_argument("--memory-child", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.memory_child:
        _memory_child(*_int_list(args.memory_child))
        return {}
    unknown = set(args.peers) - set(ALL_PEERS)
    if unknown:
        parser.error(f"unknown peers {sorted(unknown)}; choose from {','.join(ALL_PEERS)}")
    peers = [p for p in args.peers if _available(p)]
    missing = [p for p in args.peers if p not in peers]

    header = (f"kNN search and WKV KL, float32, {platform.machine()}, {os.cpu_count()} CPU cores, "
              f"{jax.devices()[0].device_kind} ({jax.default_backend()}), jax {jax.__version__}, "
              f"load average at start {os.getloadavg()[0]:.1f}; kljax's k-d tree (d <= 6): {kljax_tree_backend()}")
    sections = [f"# {header}", f"`python -m benchmarks.bench_knn {' '.join(argv if argv is not None else sys.argv[1:])}`"]
    if missing:
        sections.append(f"Peers not installed, skipped: {', '.join(missing)}")
    result = {"header": header, "argv": argv if argv is not None else sys.argv[1:], "cells": [], "memory": None}

    if not args.no_grid:
        rng = np.random.default_rng(0)
        for n in args.sizes:
            for d in args.dims:
                for k in args.ks:
                    block = args.block_size or None
                    print(f"[bench_knn] n={n} d={d} k={k} block_size={block}", file=sys.stderr, flush=True)
                    cell = bench_cell(n, d, k, peers, repeats=args.repeats, block_size=block, rng=rng,
                                      do_kl=not args.no_kl, single_above_s=args.single_above_s,
                                      tree_max_dim=args.tree_max_dim)
                    result["cells"].append(cell)
        sections += ["## neighbors: kljax against the fastest peer (README table)",
                     best_peer_table(result["cells"], peers),
                     "## neighbors: median ms (peer / kljax)", summary_table(result["cells"], peers, "neighbors"),
                     "\\* one run only (slower than --single-above-s); -: not run (--tree-max-dim)."]
        if not args.no_kl:
            sections += ["## kl (WKV): median ms (peer / kljax)", summary_table(result["cells"], peers, "kl"),
                         "\\* one run only (slower than --single-above-s); -: not run (--tree-max-dim)."]
            others = sorted({key for c in result["cells"] for key in c["kl"] if key.startswith("kljax ")})
            if others:
                lines = ["| n | d | k | kljax wkv ms | " + " | ".join(f"{key} ms" for key in others) + " |",
                         "|" + "---:|" * (4 + len(others))]
                for c in result["cells"]:
                    lines.append(f"| {c['n']} | {c['d']} | {c['k']} | {1e3 * c['kl']['kljax']['median_s']:.1f} | "
                                 + " | ".join(f"{1e3 * c['kl'][key]['median_s']:.1f}" if key in c["kl"] else "-"
                                              for key in others) + " |")
                sections += ["## kl with kljax's default estimator (more neighbour orders than WKV)",
                             "\n".join(lines)]
        sections += ["## compile seconds (apart from the times above)", compile_table(result["cells"])]

    if args.memory:
        runs = _memory_runs(args.memory_sizes, args.memory_dim, 1, args.memory_block, args.memory_limit_s)
        result["memory"] = runs
        sections += [f"## peak memory of a tiled search (d={args.memory_dim}, k=1, block_size={args.memory_block})",
                     memory_table(runs)]

    text = "\n\n".join(sections) + "\n"
    print(text)
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{args.name}.md").write_text(text)
    (args.out / f"{args.name}.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
