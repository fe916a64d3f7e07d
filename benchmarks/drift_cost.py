"""Cost of one drift permutation test per statistic, as a ratio to the kNN KL at k = 1 and to energy distance.

    python -m benchmarks.drift_cost                      # every shape, B = 99
    python -m benchmarks.drift_cost --shapes 300x300x2 --out drift_cost.json

Issue 14's cost goals: the kNN KL at any k within 2x the time of k = 1, and the KL detectors' cost next
to the energy-distance baseline. Each row is one jitted ``permutation_test(key, statistic, x, y)`` with
B = ``--permutations`` re-splits on float32 inputs already on the device; compile time (the first call)
is reported apart; the time is the median of ``--repeats`` calls after it, each ending with
``block_until_ready`` (``benchmarks._timing``). Every statistic of a shape runs in the same process on
the same inputs, so the ratios compare like with like on a shared machine.
"""

from __future__ import annotations

import argparse
import json

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import compile_seconds, time_call
from kljax import drift

STATISTICS = {
    "knn_k1": drift.KnnKL(1),
    "knn_k10 (default)": drift.KnnKL(),
    "knn_k30": drift.KnnKL(30),
    "knn_k10_symmetric": drift.KnnKL(10, symmetric=True),
    "knn_graph": drift.KnnGraphKL(),
    "energy": drift.EnergyDistance(),
}
SHAPES = ("300x300x2", "539x100x2", "300x300x10", "539x100x10")


def measure(n: int, m: int, d: int, permutations: int, repeats: int) -> list[dict]:
    """One row per statistic: compile and median run seconds, and the two ratios."""
    rng = np.random.default_rng(0)
    x = jax.device_put(jnp.asarray(rng.normal(size=(n, d)), jnp.float32))
    y = jax.device_put(jnp.asarray(rng.normal(size=(m, d)) + 0.1, jnp.float32))
    rows = []
    for name, statistic in STATISTICS.items():
        test = jax.jit(lambda key, a, b, s=statistic: drift.permutation_test(key, s, a, b,
                                                                              num_permutations=permutations))
        keys = iter(jax.random.split(jax.random.key(1), 1000))
        compile_s = compile_seconds(test, jax.random.key(0), x, y)
        timing = time_call(lambda: test(next(keys), x, y), repeats=repeats)
        rows.append({"statistic": name, "n": n, "m": m, "d": d, "B": permutations,
                     "compile_s": compile_s, "median_s": timing["median_s"]})
    by_name = {row["statistic"]: row["median_s"] for row in rows}
    for row in rows:
        row["ratio_to_knn_k1"] = row["median_s"] / by_name["knn_k1"]
        row["ratio_to_energy"] = row["median_s"] / by_name["energy"]
    return rows


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drift_cost", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shapes", default=",".join(SHAPES), help="comma-separated n x m x d")
    parser.add_argument("--permutations", type=int, default=99)
    parser.add_argument("--repeats", type=int, default=9)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    args = parser.parse_args(argv)
    rows = []
    print("| n | m | d | statistic | compile s | ms per test | / kNN k = 1 | / energy |")
    print("|---:|---:|---:|---|---:|---:|---:|---:|")
    for shape in args.shapes.split(","):
        n, m, d = (int(part) for part in shape.split("x"))
        for row in measure(n, m, d, args.permutations, args.repeats):
            rows.append(row)
            print(f"| {n} | {m} | {d} | {row['statistic']} | {row['compile_s']:.2f} | {1e3 * row['median_s']:.1f} | "
                  f"{row['ratio_to_knn_k1']:.2f} | {row['ratio_to_energy']:.2f} |", flush=True)
    if args.out:
        with open(args.out, "w") as handle:
            json.dump({"backend": jax.default_backend(), "rows": rows}, handle, indent=1)
    return rows


if __name__ == "__main__":
    main()
