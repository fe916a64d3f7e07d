"""Failing loudly on digits: drift detection power against window size, per shift and detector.

    python -m experiments.drift_monitor [--quick] [--out results/drift_monitor]
    python -m experiments.drift_monitor --window-sizes 10,50,200 --repeats 30

A Rabanser-style benchmark (Rabanser, Guennemann & Lipton, "Failing loudly", NeurIPS 2019) on
scikit-learn's bundled digits (1797 images of 8 x 8 pixels on a 0-16 scale).

Setup. The images are split once (stratified, ``seed``) into a training set (40 %), a reference set
(30 %) and a production pool (30 %). A logistic regression (C = 0.1) is trained on the training set; a
10-component PCA is fitted on it too. Every repeat draws, for each window size m, a window of m pool images
(without replacement) and applies the shift; each detector tests the whole reference set against the
window at level alpha = 0.05.

Shifts (``SHIFTS``):

    none            no shift: the rejection rate is the false-positive rate
    gaussian_noise  x + N(0, 6^2) on every pixel, clipped to [0, 16]
    small_noise     x + N(0, 1) on every pixel, clipped to [0, 16]
    border_noise    x + N(0, 6^2) on the near-constant pixels only (training-set sd < 0.5: the image
                    border), clipped: the classifier gives those pixels no weight
    translation     the image moved one pixel to the right (zero fill)
    class_mix       label shift: the model's two worst classes (on the reference set) make up half the
                    window; the images themselves are unchanged

Harm. Each shift's accuracy drop is the model's accuracy on the whole unshifted pool minus its accuracy on
the whole pool under the shift (for class_mix: the per-class accuracies weighted by the window's class
proportions), one fresh shift draw per repeat, with a t-interval. A shift is *harmful* when the drop is at
least ``harm_threshold`` (2 accuracy points) and its interval excludes 0, *harmless* when the interval
lies below the threshold, else *unclear*.

Detectors (p-value of each window; per-feature tests combined by Bonferroni):

    gaussian_kl     Gaussian KL (``GaussianKL()``, ``kl_permutation_test(estimator="gaussian")``) on the pixels / 16
    knn_kl          kNN KL (``KnnKL()``, k = 10) on the 10 PCA components
    knn_graph_kl    kNN-graph KL (``KnnGraphKL()``, K = N / 3, both directions) on the 10 PCA components (the
                    pixels are integers, whose tied distances the graph would break by sample order)
    histogram_kl    per-pixel histogram KL (``HistogramKL``, 8 fixed bins on [0, 16]), Bonferroni over 64
    classifier_kl   classifier KL (``ClassifierKL()``) on the pixels / 16
    bbsd_kl         BBSD: KL of the predicted-class frequencies (``CategoricalKL(10)``) on the model's argmax
    bbsd_ks         BBSD: Kolmogorov-Smirnov on each of the 10 softmax outputs, Bonferroni over 10
    energy          energy distance (``EnergyDistance``) on the pixels / 16 (MMD-type baseline)
    ks_pixels       Kolmogorov-Smirnov on each pixel, Bonferroni over 64 (univariate baseline)

The permutation tests use B = ``permutations`` re-splits (``histogram_permutations`` for the 64-pixel
histogram, so that Bonferroni can reach alpha). Power = the fraction of repeats with p <= alpha, with a
Wilson 95% interval.

False alarms of a stream. ``DriftMonitor`` (BBSD statistic, the cheapest) scores ``streams`` unshifted
streams of ``stream_windows`` windows of ``stream_window_size`` images, all against the same reference, at
(alpha, consecutive) = (0.05, 1) and (0.2, 2); the measured mean number of windows to the first false
alarm (streams without an alarm are censored at their length, so the mean is a lower bound when some are)
is compared with ARL_0 of ``expected_windows_to_false_alarm`` for independent windows.

References: S. Rabanser, S. Guennemann and Z. Lipton, NeurIPS 2019, https://arxiv.org/abs/1810.11953;
Z. Lipton, Y.-X. Wang and A. Smola, "Detecting and correcting for label shift with black box predictors",
ICML 2018 (BBSD); D. Lopez-Paz and M. Oquab, "Revisiting classifier two-sample tests", ICLR 2017;
E. B. Wilson, "Probable inference, the law of succession, and statistical inference", JASA 22, 1927.
"""

from __future__ import annotations

import dataclasses
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import scipy.stats

from experiments import _common, _stats
from kljax import plot
from kljax.drift import (CategoricalKL, ClassifierKL, DriftMonitor, EnergyDistance, GaussianKL, HistogramKL,
                         KnnGraphKL, KnnKL, adjust_p_values, expected_windows_to_false_alarm, permutation_test)

TITLE = "Drift detection on digits: power against window size, harmful and harmless shifts"
ORDER = 60

SHIFTS = ("none", "gaussian_noise", "small_noise", "border_noise", "translation", "class_mix")
DETECTORS = ("gaussian_kl", "knn_kl", "knn_graph_kl", "histogram_kl", "classifier_kl", "bbsd_kl", "bbsd_ks", "energy",
             "ks_pixels")
KL_DETECTORS = ("gaussian_kl", "knn_kl", "knn_graph_kl", "histogram_kl", "classifier_kl", "bbsd_kl")
LABELS = {"gaussian_kl": "Gaussian KL (pixels)", "knn_kl": "kNN KL (PCA-10)", "knn_graph_kl": "kNN-graph KL (PCA-10)",
          "histogram_kl": "histogram KL (pixels, Bonferroni)",
          "classifier_kl": "classifier KL (pixels)", "bbsd_kl": "BBSD KL (predicted class)",
          "bbsd_ks": "BBSD KS (softmax, Bonferroni)", "energy": "energy distance (pixels)",
          "ks_pixels": "KS (pixels, Bonferroni)"}
ALPHA = 0.05
PCA_COMPONENTS = 10
HISTOGRAM_BINS = 8
BORDER_SD = 0.5  # training-set sd below which a pixel counts as near-constant
NUM_WORST_CLASSES = 2
STREAM_SETTINGS = ((0.05, 1), (0.2, 2))  # (alpha, consecutive) of the false-alarm streams


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    window_sizes: tuple[int, ...] = (10, 20, 50, 100, 200)
    repeats: int = 30
    permutations: int = 199
    histogram_permutations: int = 1599
    noise_sd: float = 6.0
    small_noise_sd: float = 1.0
    harm_threshold: float = 0.02
    streams: int = 20
    stream_windows: int = 120
    stream_window_size: int = 50
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(window_sizes=(200,), repeats=4, permutations=99, histogram_permutations=1299,
                   streams=3, stream_windows=30)


# ----------------------------------------------------------------------------------------------
# Data, model and shifts
# ----------------------------------------------------------------------------------------------


def prepare(seed: int) -> dict:
    """The split, the classifier, the PCA and the near-constant pixels."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data, digits.target
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.6, stratify=y, random_state=seed)
    x_ref, x_pool, y_ref, y_pool = train_test_split(x_rest, y_rest, test_size=0.5, stratify=y_rest,
                                                    random_state=seed)
    model = LogisticRegression(max_iter=3000, C=0.1).fit(x_train / 16.0, y_train)
    pca = PCA(PCA_COMPONENTS, random_state=seed).fit(x_train)
    reference_correct = model.predict(x_ref / 16.0) == y_ref
    class_accuracy = np.array([reference_correct[y_ref == c].mean() for c in range(10)])
    return dict(model=model, pca=pca, x_ref=x_ref, y_ref=y_ref, x_pool=x_pool, y_pool=y_pool,
                border=np.flatnonzero(x_train.std(axis=0) < BORDER_SD),
                worst_classes=np.argsort(class_accuracy, kind="stable")[:NUM_WORST_CLASSES])


def apply_shift(kind: str, images: np.ndarray, data: dict, config: Config, rng: np.random.Generator):
    """The shifted images (class_mix acts on the sampling, not the images)."""
    if kind == "gaussian_noise":
        return np.clip(images + rng.normal(0.0, config.noise_sd, images.shape), 0.0, 16.0)
    if kind == "small_noise":
        return np.clip(images + rng.normal(0.0, config.small_noise_sd, images.shape), 0.0, 16.0)
    if kind == "border_noise":
        shifted = images.copy()
        border = data["border"]
        shifted[:, border] = np.clip(images[:, border] + rng.normal(0.0, config.noise_sd, (len(images), len(border))),
                                     0.0, 16.0)
        return shifted
    if kind == "translation":
        square = images.reshape(-1, 8, 8)
        moved = np.zeros_like(square)
        moved[:, :, 1:] = square[:, :, :-1]
        return moved.reshape(images.shape)
    return images


def class_mix_counts(size: int, worst_classes) -> np.ndarray:
    """Per-class counts of a class_mix window: half the window from the worst classes (largest remainder)."""
    weights = np.full(10, 0.5 / (10 - len(worst_classes)))
    weights[worst_classes] = 0.5 / len(worst_classes)
    quota = size * weights
    counts = np.floor(quota).astype(int)
    counts[np.argsort(counts - quota)[:size - counts.sum()]] += 1
    return counts


def sample_window(kind: str, data: dict, size: int, config: Config, rng: np.random.Generator) -> np.ndarray:
    x_pool, y_pool = data["x_pool"], data["y_pool"]
    if kind == "class_mix":
        counts = class_mix_counts(size, data["worst_classes"])
        index = np.concatenate([rng.choice(np.flatnonzero(y_pool == c), n, replace=False)
                                for c, n in enumerate(counts)])
    else:
        index = rng.choice(len(y_pool), size, replace=False)
    return apply_shift(kind, x_pool[index], data, config, rng)


def accuracy_drop(kind: str, data: dict, config: Config, rng: np.random.Generator) -> float:
    """Accuracy on the unshifted pool minus accuracy on the pool under the shift (one shift draw)."""
    model, x_pool, y_pool = data["model"], data["x_pool"], data["y_pool"]
    correct = model.predict(x_pool / 16.0) == y_pool
    if kind == "class_mix":
        per_class = np.array([correct[y_pool == c].mean() for c in range(10)])
        weights = class_mix_counts(10_000, data["worst_classes"]) / 10_000
        return float(correct.mean() - weights @ per_class)
    shifted = apply_shift(kind, x_pool, data, config, rng)
    return float(correct.mean() - np.mean(model.predict(shifted / 16.0) == y_pool))


# ----------------------------------------------------------------------------------------------
# Detectors: images (0-16) -> window p-value
# ----------------------------------------------------------------------------------------------


def make_detectors(data: dict, config: Config) -> dict:
    """name -> function(key, reference images, window images) -> the window's p-value."""
    model, pca = data["model"], data["pca"]
    edges = np.tile(np.linspace(0.0, 1.0, HISTOGRAM_BINS + 1), (64, 1))  # pixels / 16; fixed: data-independent

    def pixels(images):
        return jnp.asarray(images / 16.0, jnp.float32)

    def components(images):
        return jnp.asarray(pca.transform(images), jnp.float32)

    def predicted(images):
        return jnp.asarray(model.predict(images / 16.0), jnp.float32)

    def permutation(statistic, features, permutations, correct=False):
        def detector(key, reference, window):
            _, p_value = permutation_test(key, statistic, features(reference), features(window),
                                          num_permutations=permutations)
            return float(jnp.min(adjust_p_values(p_value))) if correct else float(p_value)
        return detector

    def ks_bonferroni(features):
        def detector(key, reference, window):
            p_values = scipy.stats.ks_2samp(features(reference), features(window), axis=0, method="asymp").pvalue
            p_values = np.where(np.isnan(p_values), 1.0, p_values)  # a pixel constant in both samples
            return float(min(1.0, p_values.size * np.min(p_values)))
        return detector

    return {
        "gaussian_kl": permutation(GaussianKL(), pixels, config.permutations),
        "knn_kl": permutation(KnnKL(), components, config.permutations),
        "knn_graph_kl": permutation(KnnGraphKL(), components, config.permutations),
        "histogram_kl": permutation(HistogramKL(edges=jnp.asarray(edges, jnp.float32)), pixels,
                                    config.histogram_permutations, correct=True),
        "classifier_kl": permutation(ClassifierKL(), pixels, config.permutations),
        "bbsd_kl": permutation(CategoricalKL(10), predicted, config.permutations),
        "bbsd_ks": ks_bonferroni(lambda images: model.predict_proba(images / 16.0)),
        "energy": permutation(EnergyDistance(), pixels, config.permutations),
        "ks_pixels": ks_bonferroni(lambda images: images),
    }


def wilson_interval(successes: int, trials: int, level: float = 0.95) -> tuple[float, float]:
    """Wilson score interval for a binomial proportion (Wilson 1927)."""
    if trials == 0:
        return (0.0, 1.0)
    z = _normal_quantile(0.5 + level / 2)
    rate = successes / trials
    centre = (rate + z * z / (2 * trials)) / (1 + z * z / trials)
    half = z * math.sqrt(rate * (1 - rate) / trials + z * z / (4 * trials ** 2)) / (1 + z * z / trials)
    return (max(0.0, min(rate, centre - half)), min(1.0, max(rate, centre + half)))  # rounding at 0 and 1


def _normal_quantile(q: float) -> float:
    return float(scipy.stats.norm.ppf(q))


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------


def false_alarm_streams(data: dict, config: Config, key, disable: bool) -> list[dict]:
    """Windows to the first false alarm of DriftMonitor (BBSD statistic) on unshifted streams."""
    model = data["model"]
    reference = jnp.asarray(model.predict(data["x_ref"] / 16.0), jnp.float32)
    rng = np.random.default_rng(config.seed + 1)
    streams = []
    for _ in range(config.streams):
        windows = np.stack([sample_window("none", data, config.stream_window_size, config, rng)
                            for _ in range(config.stream_windows)])
        streams.append(model.predict(windows.reshape(-1, 64) / 16.0).reshape(config.stream_windows, -1))
    streams = jnp.asarray(np.stack(streams), jnp.float32)
    out = []
    for alpha, consecutive in STREAM_SETTINGS:
        monitor = DriftMonitor(reference, estimator=CategoricalKL(10), alpha=alpha, consecutive=consecutive,
                               num_permutations=config.permutations)
        first, significant = [], []
        for index in _common.progress(range(config.streams), desc=f"streams alpha={alpha} r={consecutive}",
                                      disable=disable):
            scores, alarms = monitor.run(jax.random.fold_in(key, index), streams[index])
            alarms = np.asarray(alarms)
            hits = np.flatnonzero(alarms == 1)
            first.append(int(hits[0]) + 1 if hits.size else None)
            significant.append(float(np.mean(np.asarray(scores.significant) == 1)))
        observed = [f if f is not None else config.stream_windows for f in first]
        censored = sum(f is None for f in first)
        out.append({"alpha": alpha, "consecutive": consecutive,
                    "expected": expected_windows_to_false_alarm(alpha, consecutive),
                    "first_alarm": first, "censored": censored,
                    "mean_windows_to_alarm": float(np.mean(observed)),
                    "mean_interval": [float(v) for v in plot.mean_interval(np.asarray(observed, float))],
                    "significant_rate": float(np.mean(significant))})
    return out


def run(config: Config, *, disable_progress: bool = False) -> dict:
    data = prepare(config.seed)
    detectors = make_detectors(data, config)
    rng = np.random.default_rng(config.seed)
    key = jax.random.key(config.seed)
    rejections = {shift: {name: {str(m): 0 for m in config.window_sizes} for name in DETECTORS}
                  for shift in SHIFTS}
    with _common.Timer() as timer:
        drops = {shift: [accuracy_drop(shift, data, config, rng) for _ in range(config.repeats)] for shift in SHIFTS}
        cells = [(shift, m, r) for shift in SHIFTS for m in config.window_sizes for r in range(config.repeats)]
        for index, (shift, m, _) in enumerate(_common.progress(cells, desc="windows", disable=disable_progress)):
            window = sample_window(shift, data, m, config, rng)
            for name, detector in detectors.items():
                p_value = detector(jax.random.fold_in(key, index), data["x_ref"], window)
                rejections[shift][name][str(m)] += int(p_value <= ALPHA)
        streams = false_alarm_streams(data, config, jax.random.fold_in(key, len(cells)), disable_progress)
    power = {shift: {name: {m: {"rate": count / config.repeats,
                                "wilson95": wilson_interval(count, config.repeats)}
                            for m, count in by_size.items()}
                     for name, by_size in by_detector.items()}
             for shift, by_detector in rejections.items()}
    harm = {}
    for shift in SHIFTS:
        values = np.asarray(drops[shift])
        mean, low, high = (float(v) for v in (plot.mean_interval(values) if values.std() > 0 else (values.mean(),) * 3))
        verdict = ("harmful" if mean >= config.harm_threshold and low > 0
                   else "harmless" if high < config.harm_threshold else "unclear")
        harm[shift] = {"accuracy_drop": float(mean), "interval95": [float(low), float(high)], "verdict": verdict}
    base_accuracy = float(np.mean(data["model"].predict(data["x_pool"] / 16.0) == data["y_pool"]))
    return {"config": {**dataclasses.asdict(config), "alpha": ALPHA, "reference_size": len(data["x_ref"]),
                       "pool_size": len(data["x_pool"]), "border_pixels": len(data["border"]),
                       "base_accuracy": base_accuracy, "worst_classes": data["worst_classes"]},
            "power": power, "harm": harm, "streams": streams, "seconds": timer.seconds}


def main(argv: list[str] | None = None) -> dict:
    config, args = _common.parse_config(Config, "drift_monitor", __doc__.splitlines()[0], argv)
    metrics = run(config, disable_progress=args.no_progress)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _plot(metrics, args.out)
    return metrics


# ----------------------------------------------------------------------------------------------
# Figure and report
# ----------------------------------------------------------------------------------------------

STYLES = {"gaussian_kl": "P-", "knn_kl": "o-", "knn_graph_kl": "h-",
          "histogram_kl": "s-", "classifier_kl": "^-", "bbsd_kl": "D-", "bbsd_ks": "v--",
          "energy": "x--", "ks_pixels": "+--"}


def _plot(metrics: dict, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    sizes = metrics["config"]["window_sizes"]
    fig, axes = plt.subplots(2, 3, figsize=(14, 7.5), sharex=True, sharey=True, squeeze=False)
    for ax, shift in zip(axes.ravel(), SHIFTS):
        for name in DETECTORS:
            cells = [metrics["power"][shift][name][str(m)] for m in sizes]
            rate = np.array([c["rate"] for c in cells])
            low, high = np.array([c["wilson95"] for c in cells]).T
            ax.plot(sizes, rate, STYLES[name], ms=5, lw=1, label=LABELS[name])
            ax.fill_between(sizes, low, high, alpha=0.08)
        harm = metrics["harm"][shift]
        ax.set_title(f"{shift}: accuracy drop {100 * harm['accuracy_drop']:.1f} pts ({harm['verdict']})", fontsize=9)
        if shift == "none":
            ax.axhline(ALPHA, color="k", lw=0.8, ls=":")
        ax.set_xscale("log")
        ax.set_ylim(-0.02, 1.02)
    for ax in axes[-1]:
        ax.set_xlabel("window size m")
    for ax in axes[:, 0]:
        ax.set_ylabel("rejection rate at alpha = 0.05")
    axes[0, 0].legend(fontsize=7)
    fig.suptitle(f"power against window size (reference {metrics['config']['reference_size']} images); "
                 f"{metrics['config']['repeats']} repeats, Wilson 95% bands", fontsize=9)
    _common.save_figure(fig, out_dir, "power")


def _cell(cell: dict) -> str:
    return f"{cell['rate']:.2f} [{cell['wilson95'][0]:.2f}, {cell['wilson95'][1]:.2f}]"


def _separated(a: dict, b: dict) -> bool:
    """Two power cells whose Wilson intervals do not overlap (a conservative significance check)."""
    return a["wilson95"][0] > b["wilson95"][1] or b["wilson95"][0] > a["wilson95"][1]


def reading(metrics: dict) -> list[str]:
    """The conclusions, computed from the numbers (a difference counts when the Wilson intervals are disjoint)."""
    config, power, harm = metrics["config"], metrics["power"], metrics["harm"]
    sizes = [str(m) for m in config["window_sizes"]]
    large, small = sizes[-1], sizes[0]
    out = []
    # the level: one-sided exact binomial tests of "rate <= alpha" per (detector, m) cell, Holm-corrected
    repeats = config["repeats"]
    cells = [(name, m) for name in DETECTORS for m in sizes]
    rejections = {cell: round(power["none"][cell[0]][cell[1]]["rate"] * repeats) for cell in cells}
    p_values = [scipy.stats.binomtest(rejections[cell], repeats, ALPHA, alternative="greater").pvalue
                for cell in cells]
    adjusted = dict(zip(cells, _stats.holm_adjusted(p_values)))
    worst = max(cells, key=lambda cell: (rejections[cell], -adjusted[cell]))
    above = [cell for cell in cells if power["none"][cell[0]][cell[1]]["wilson95"][0] > ALPHA]
    out.append(f"with no shift the largest rejection rate is {rejections[worst] / repeats:.2f} ({LABELS[worst[0]]}, "
               f"m = {worst[1]}; {rejections[worst]} of {repeats}); {len(above)} of the {len(cells)} (detector, m) "
               f"cells have a Wilson interval above alpha = {ALPHA} (about {0.025 * len(cells):.1f} expected by "
               "chance); exact binomial tests of rate <= alpha, Holm-corrected over the cells, "
               + ("reject none" if min(adjusted.values()) > _stats.SIGNIFICANCE else "reject "
                  + ", ".join(f"{LABELS[name]} at m = {m}" for (name, m), q in adjusted.items()
                              if q <= _stats.SIGNIFICANCE))
               + f" (smallest adjusted p = {min(adjusted.values()):.2g}). The windows of a cell share one "
               "reference, so its rejections are not independent draws of the level")
    for shift in SHIFTS[1:]:
        cells = {name: power[shift][name][large] for name in DETECTORS}
        best = max(DETECTORS, key=lambda name: (cells[name]["rate"], name in KL_DETECTORS))
        best_kl = max(KL_DETECTORS, key=lambda name: cells[name]["rate"])
        tied = [LABELS[name] for name in DETECTORS if name != best and cells[name]["rate"] == cells[best]["rate"]]
        h = harm[shift]
        line = (f"`{shift}` ({h['verdict']}, accuracy drop {100 * h['accuracy_drop']:.1f} points "
                f"[{100 * h['interval95'][0]:.1f}, {100 * h['interval95'][1]:.1f}]): at m = {large} the most "
                f"powerful detector is {LABELS[best]} ({_cell(cells[best])})"
                + (f", tied with {', '.join(tied)}" if tied else ""))
        if best not in KL_DETECTORS:
            line += (f"; the best KL detector, {LABELS[best_kl]}, has {_cell(cells[best_kl])}, "
                     + ("significantly less" if _separated(cells[best], cells[best_kl]) else
                        "not significantly different"))
        if small != large:
            small_cells = {name: power[shift][name][small] for name in DETECTORS}
            best_small = max(DETECTORS, key=lambda name: small_cells[name]["rate"])
            tied_small = [LABELS[name] for name in DETECTORS
                          if name != best_small and small_cells[name]["rate"] == small_cells[best_small]["rate"]]
            if small_cells[best_small]["rate"] == 0:
                line += f"; at m = {small} no detector rejects"
            else:
                line += (f"; at m = {small} the most powerful is {LABELS[best_small]} {_cell(small_cells[best_small])}"
                         + (f", tied with {', '.join(tied_small)}" if tied_small else ""))
        out.append(line)
    harmless = [s for s in SHIFTS[1:] if harm[s]["verdict"] == "harmless"]
    if harmless:
        flagged = {s: [LABELS[n] for n in DETECTORS if power[s][n][large]["wilson95"][0] > ALPHA] for s in harmless}
        out.append("harmless shifts flagged (power above alpha beyond noise at m = "
                   f"{large}): " + "; ".join(f"{s}: {', '.join(v) if v else 'none'}" for s, v in flagged.items())
                   + ". BBSD KL, on the model's outputs, "
                   + ("is not above alpha beyond noise on " + ", ".join(
                       s for s in harmless if power[s]["bbsd_kl"][large]["wilson95"][0] <= ALPHA)
                      if any(power[s]["bbsd_kl"][large]["wilson95"][0] <= ALPHA for s in harmless)
                      else "flags every one of them too"))
    harmful = [s for s in SHIFTS[1:] if harm[s]["verdict"] == "harmful"]
    missed = {s: [LABELS[n] for n in DETECTORS if power[s][n][large]["wilson95"][0] <= ALPHA] for s in harmful}
    if any(missed.values()):
        out.append("harmful shifts missed (power not above alpha beyond noise at m = "
                   f"{large}): " + "; ".join(f"{s}: {', '.join(v)}" for s, v in missed.items() if v))
    for stream in metrics["streams"]:
        low, high = stream["mean_interval"][1], stream["mean_interval"][2]
        out.append(f"DriftMonitor at alpha = {stream['alpha']}, {stream['consecutive']} in a row: "
                   f"{stream['mean_windows_to_alarm']:.1f} windows to the first false alarm [{low:.1f}, {high:.1f}] "
                   f"({stream['censored']} of {len(stream['first_alarm'])} streams without one, counted at their "
                   f"length) against ARL_0 = {stream['expected']:.1f} for independent windows at exactly alpha; "
                   f"per-window rejection rate {stream['significant_rate']:.3f}"
                   + (" (the discrete statistic is conservative)" if stream["significant_rate"] < stream["alpha"] / 2
                      else ""))
    return [line[:1].upper() + line[1:] for line in out]


def report(metrics: dict, rel_dir: pathlib.Path) -> str:
    config = metrics["config"]
    sizes = [str(m) for m in config["window_sizes"]]
    harm_rows = [[shift, f"{100 * h['accuracy_drop']:.1f} [{100 * h['interval95'][0]:.1f}, "
                         f"{100 * h['interval95'][1]:.1f}]", h["verdict"]] for shift, h in metrics["harm"].items()]
    power_rows = [[shift, LABELS[name]] + [_cell(metrics["power"][shift][name][m]) for m in sizes]
                  for shift in SHIFTS for name in DETECTORS]
    stream_rows = [[s["alpha"], s["consecutive"], f"{s['expected']:.1f}",
                    f"{s['mean_windows_to_alarm']:.1f} [{s['mean_interval'][1]:.1f}, {s['mean_interval'][2]:.1f}]",
                    f"{s['censored']} / {len(s['first_alarm'])}", f"{s['significant_rate']:.3f}"]
                   for s in metrics["streams"]]
    return "\n\n".join([
        f"Digits (logistic regression, pool accuracy {config['base_accuracy']:.3f}); reference of "
        f"{config['reference_size']} images against windows of m pool images; {config['repeats']} repeats per "
        f"cell, alpha = {config['alpha']}, B = {config['permutations']} permutations "
        f"({config['histogram_permutations']} for the per-pixel histogram). Power with a Wilson 95% interval.",
        "Accuracy drop per shift (points; mean and 95% t-interval over repeats):",
        _common.markdown_table(["shift", "accuracy drop", "verdict"], harm_rows),
        _common.markdown_table(["shift", "detector"] + [f"m = {m}" for m in sizes], power_rows),
        f"False alarms of `DriftMonitor` (BBSD KL) on {config['streams']} unshifted streams of "
        f"{config['stream_windows']} windows of {config['stream_window_size']} images, one shared reference:",
        _common.markdown_table(["alpha", "in a row", "ARL_0 (independent)", "measured mean [95%]", "censored",
                                "per-window rate"], stream_rows),
        "**Reading** (computed from the numbers):\n\n" + "\n".join(f"- {line}" for line in reading(metrics)),
        f"![power against window size]({rel_dir}/power.png)",
    ])


if __name__ == "__main__":
    _common.run_main(main)
