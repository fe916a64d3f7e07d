"""Power and level of the drift statistics against the energy-distance baseline, on generated shifts.

    python -m benchmarks.drift_power --sizes 300 --out power_300.json
    python -m benchmarks.drift_power --sizes 100,1000 --cells mean:2,scale:2,correlation:2,mean:10
    python -m benchmarks.drift_power --sizes 300,100,1000 --out power.json      # the README's table (every cell)

Each cell draws ``--repeats`` independent pairs (x, y) of n = m points (``--null-repeats`` for the
unshifted cells) and runs every detector's permutation test (B = ``--permutations``, level 0.05) on the
same pairs; power is the fraction of rejections. Shift sizes are multiplied by s = sqrt(300 / n) so that
the detection difficulty stays comparable across n:

    null                 y ~ N(0, I)
    mean                 y + 0.25 s / sqrt(d) in every feature (shift vector of norm 0.25 s)
    scale                y * (1 + 0.15 s)
    correlation          equicorrelation 0.15 s
    mixture              feature 0: 0.5 N(-1.5, 1) + 0.5 N(1.5, 1), weight 0.5 -> 0.5 + 0.15 s on the + part
    few_features         5 of d features shifted by 0.25 s
    classifier_outputs   the 10-class softmax outputs of a fixed random linear map of 20-D inputs whose
                         mean moved by 0.5 s / sqrt(20) per feature (BBSD's setting)

Rows are printed as JSON lines and written to ``--out`` after every cell (with the per-detector seconds).
``--plot ROWS.json --figure FIG.png`` draws each KL detector's power against energy distance's, setting by
setting, from such a file (``reports/drift_power/drift_power.json`` holds the README table's rows).
"""

from __future__ import annotations

import argparse
import json
import math
import time

import jax
import jax.numpy as jnp
import numpy as np

from kljax import drift

DETECTORS = {
    "gaussian": drift.GaussianKL(),
    "gaussian_symmetric": drift.GaussianKL(symmetric=True),
    "classifier": drift.ClassifierKL(),
    "knn10": drift.KnnKL(10),
    "knn10_symmetric": drift.KnnKL(10, symmetric=True),
    "knn_graph": drift.KnnGraphKL(),
    "energy": drift.EnergyDistance(),
}
CELLS = ([("null", d) for d in (1, 2, 10, 50)] + [("mean", d) for d in (1, 2, 10, 50)]
         + [("scale", d) for d in (1, 2, 10, 50)] + [("correlation", d) for d in (2, 10, 50)]
         + [("mixture", d) for d in (1, 2, 10, 50)] + [("few_features", 50), ("classifier_outputs", 10)])
_OUTPUT_MAP = np.random.default_rng(99).normal(size=(20, 10)) * 3 / math.sqrt(20)


def _softmax(z):
    z = np.exp(z - z.max(axis=1, keepdims=True))
    return z / z.sum(axis=1, keepdims=True)


def sample(rng, shift: str, n: int, d: int, s: float):
    """One pair (x, y) of float32 samples of the cell ``(shift, d)``; ``s`` scales the shift."""
    x, y = rng.normal(size=(n, d)), rng.normal(size=(n, d))
    if shift == "mean":
        y = y + 0.25 * s / math.sqrt(d)
    elif shift == "scale":
        y = y * (1 + 0.15 * s)
    elif shift == "correlation":
        rho = 0.15 * s
        y = math.sqrt(1 - rho) * y + math.sqrt(rho) * rng.normal(size=(n, 1))
    elif shift == "mixture":
        x[:, 0] += np.where(rng.random(n) < 0.5, 1.5, -1.5)
        y[:, 0] += np.where(rng.random(n) < 0.5 + 0.15 * s, 1.5, -1.5)
    elif shift == "few_features":
        y[:, :5] += 0.25 * s
    elif shift == "classifier_outputs":
        inputs_x = rng.normal(size=(n, 20))
        inputs_y = rng.normal(size=(n, 20)) + 0.5 * s / math.sqrt(20)
        x, y = _softmax(inputs_x @ _OUTPUT_MAP), _softmax(inputs_y @ _OUTPUT_MAP)
    elif shift != "null":
        raise ValueError(f"unknown shift {shift!r}")
    return x.astype(np.float32), y.astype(np.float32)


LABELS = {"gaussian": "Gaussian KL", "gaussian_symmetric": "Gaussian KL, symmetric", "classifier": "classifier KL",
          "knn10": "kNN KL, k = 10 (default)", "knn10_symmetric": "kNN KL, k = 10, symmetric",
          "knn_graph": "kNN-graph KL"}


def plot(rows: list[dict], path: str, baseline: str = "energy") -> None:
    """One panel per detector: its power against the baseline's in every setting (marker: shift, colour: n);
    a ring marks a setting where the two differ by a two-sided Fisher exact test at 0.05."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import scipy.stats

    names = [name for name in LABELS if any(name in row for row in rows)]
    markers = dict(zip(("mean", "scale", "correlation", "mixture", "few_features", "classifier_outputs"), "osD^vP"))
    colours = {100: "tab:blue", 300: "tab:orange", 1000: "tab:green"}
    fig, axes = plt.subplots(1, len(names), figsize=(3.2 * len(names), 3.4), sharey=True, squeeze=False)
    for ax, name in zip(axes[0], names):
        tally = {"better": 0, "worse": 0, "n.s.": 0}
        for row in rows:
            if name not in row or baseline not in row or row["shift"] == "null":
                continue
            repeats = row["repeats"]
            a, b = round(row[name] * repeats), round(row[baseline] * repeats)
            p_value = scipy.stats.fisher_exact([[a, repeats - a], [b, repeats - b]])[1]
            verdict = "n.s." if p_value > 0.05 else ("better" if a > b else "worse")
            tally[verdict] += 1
            ax.scatter(row[baseline], row[name], marker=markers.get(row["shift"], "x"),
                       color=colours.get(row["n"], "k"), s=28, alpha=0.8)
            if verdict != "n.s.":
                ax.scatter(row[baseline], row[name], marker="o", s=130, facecolors="none", edgecolors="k", lw=0.8)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.8, ls="--")
        ax.set(xlim=(-0.04, 1.04), ylim=(-0.04, 1.04), xlabel=f"{baseline} distance power" if baseline == "energy"
               else f"{baseline} power", title=f"{LABELS[name]}\nbetter {tally['better']}, worse {tally['worse']}, "
               f"n.s. {tally['n.s.']}")
        ax.title.set_fontsize(9)
    axes[0][0].set_ylabel("detector power at alpha = 0.05")
    handles = ([plt.Line2D([], [], ls="", marker=m, color="k", label=s) for s, m in markers.items()]
               + [plt.Line2D([], [], ls="", marker="o", color=c, label=f"n = {n}") for n, c in colours.items()]
               + [plt.Line2D([], [], ls="", marker="o", mfc="none", mec="k", ms=10, label="Fisher p <= 0.05")])
    fig.legend(handles=handles, loc="lower center", ncol=len(handles), fontsize=8, frameon=False)
    fig.tight_layout(rect=(0, 0.08, 1, 1))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.drift_power", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", default="100,300,1000", help="comma-separated n (= m)")
    parser.add_argument("--cells", default="", help="comma-separated shift:d (default: every cell)")
    parser.add_argument("--detectors", default=",".join(DETECTORS), help="comma-separated detector names")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--null-repeats", type=int, default=30)
    parser.add_argument("--permutations", type=int, default=99)
    parser.add_argument("--out", default=None, help="JSON file for the rows")
    parser.add_argument("--plot", default=None, help="draw --figure from this JSON file of rows and stop")
    parser.add_argument("--figure", default="drift_power.png", help="figure file for --plot")
    args = parser.parse_args(argv)
    if args.plot:
        with open(args.plot) as f:
            rows = json.load(f)["rows"]
        plot(rows, args.figure)
        print(f"wrote {args.figure}")
        return rows
    cells = CELLS if not args.cells else [(c.split(":")[0], int(c.split(":")[1])) for c in args.cells.split(",")]
    detectors = {name: DETECTORS[name] for name in args.detectors.split(",")}
    programs = {}

    def p_values(name, keys, xs, ys):
        if (name, xs.shape) not in programs:
            def one(arguments):
                key, x, y = arguments
                return drift.permutation_test(key, detectors[name], x, y, num_permutations=args.permutations,
                                              chunk_size=32)[1]
            programs[name, xs.shape] = jax.jit(lambda k, a, b: jax.lax.map(one, (k, a, b)))
        return np.asarray(programs[name, xs.shape](keys, xs, ys))

    rows, start = [], time.time()
    for n in (int(v) for v in args.sizes.split(",")):
        for shift, d in cells:
            repeats = args.null_repeats if shift == "null" else args.repeats
            rng = np.random.default_rng([CELLS.index((shift, d)), n])
            pairs = [sample(rng, shift, n, d, math.sqrt(300 / n)) for _ in range(repeats)]
            xs, ys = (jnp.asarray(np.stack([pair[i] for pair in pairs])) for i in (0, 1))
            keys = jax.random.split(jax.random.key(n * 100 + xs.shape[2]), repeats)
            row = {"shift": shift, "n": n, "d": int(xs.shape[2]), "repeats": repeats}
            for name in detectors:
                tic = time.time()
                row[name] = float(np.mean(p_values(name, keys, xs, ys) <= 0.05))
                row[name + "_seconds"] = round(time.time() - tic, 2)
            rows.append(row)
            print(json.dumps(row), f"({time.time() - start:.0f} s)", flush=True)
            if args.out:
                with open(args.out, "w") as f:
                    json.dump({"B": args.permutations, "alpha": 0.05, "rows": rows}, f, indent=1)
    return rows


if __name__ == "__main__":
    main()
