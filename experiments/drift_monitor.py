"""Drift monitoring on a digits classifier: does a KL alarm fire before accuracy drops?

    python -m experiments.drift_monitor [--quick] [--out results/drift_monitor]
    python -m experiments.drift_monitor --repeats 2 --windows 20 --window-size 100

Setup. scikit-learn's bundled digits are split (stratified, per repeat) into a training set (40 %), a
reference set (24 %) and a production pool (36 %, about 65 images per class). A logistic-regression
classifier is trained on the training set. A production stream is a sequence of ``--windows`` windows of ``--window-size`` images
drawn from the pool; the first ``--clean-windows`` are unshifted, then the shift severity s grows
linearly from 0 to 1 at the last window. Three kinds of shift:

    pixel_noise  x + N(0, (8 s)^2) per pixel (0-16 scale), clipped to [0, 16]
    blur         Gaussian blur of the 8 x 8 image with standard deviation 1.5 s pixels
    class_mix    class proportions (1 - s) * uniform + s * uniform over the model's 2 worst classes
                 (lowest accuracy on the reference set); images themselves unchanged (label shift)

Detectors (``kljax.drift.DriftMonitor``, per-window level alpha = 0.05 after Bonferroni, alarm after
2 significant windows in a row):

    input_histogram  per-pixel histogram KL (64 features, 8 equal-width bins fixed on half of the
                     reference, pseudocount 1/2), Bonferroni over the 64 pixels; its smallest window
                     p-value is 64 / (B + 1), so B is large (2559 quick, 6399 full)
    input_knn        kNN KL (``kljax.knn.kl``, k = 1) on a 10-component PCA projection (PCA fit on the
                     training set)
    output_mean_kl   KL(mean predicted class distribution on the reference || on the window): black-box
                     shift detection on the model's outputs (Lipton et al., 2018)

Each window also gets the model's accuracy on it. The accuracy drop is defined without window noise:
the model's accuracy on the whole pool under the window's shift severity (for class_mix, the class
accuracies weighted by the window's class proportions); the stream "has dropped" at the first window
where that accuracy is at least ``--drop`` (5 points) below the accuracy on the unshifted pool.
Lead time = (first accuracy-drop window) - (first alarm at or after the shift starts), in windows:
positive means the alarm came first. False-alarm rates come from the unshifted windows: the clean
prefixes of all streams plus a separate unshifted stream per repeat.

References: S. Rabanser, S. Guennemann and Z. Lipton, "Failing loudly: an empirical study of methods
for detecting dataset shift", NeurIPS 2019; Z. Lipton, Y.-X. Wang and A. Smola, "Detecting and
correcting for label shift with black box predictors", ICML 2018; B. Phipson and G. K. Smyth,
"Permutation p-values should never be zero", 2010.
"""

from __future__ import annotations

import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _common
from kljax import discrete
from kljax.drift import DriftMonitor

TITLE = "Drift monitoring: KL alarms vs accuracy drop on a digits classifier"
ORDER = 60

SHIFTS = ("pixel_noise", "blur", "class_mix")
DETECTORS = ("input_histogram", "input_knn", "output_mean_kl")
FULL = dict(repeats=3, windows=24, clean_windows=6, window_size=100, null_windows=40,
            histogram_permutations=6399, permutations=199)
QUICK = dict(repeats=1, windows=14, clean_windows=4, window_size=100, null_windows=12,
             histogram_permutations=2559, permutations=99)
ALPHA = 0.05
CONSECUTIVE = 2
PCA_COMPONENTS = 10
HISTOGRAM_BINS = 8
NOISE_SCALE = 8.0
BLUR_SIGMA = 1.5
NUM_WORST_CLASSES = 2


def mean_prediction_kl(probabilities_reference, probabilities_window):
    """KL(mean class distribution predicted on the reference || mean predicted on the window)."""
    return discrete.kl(jnp.mean(probabilities_reference, axis=0), jnp.mean(probabilities_window, axis=0))


# ----------------------------------------------------------------------------------------------
# Data, model and shifts
# ----------------------------------------------------------------------------------------------

def prepare(seed: int) -> dict:
    """Split, classifier, PCA and per-class accuracies for one repeat."""
    from sklearn.datasets import load_digits
    from sklearn.decomposition import PCA
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x, y = digits.data, digits.target
    x_train, x_rest, y_train, y_rest = train_test_split(x, y, test_size=0.6, stratify=y, random_state=seed)
    x_ref, x_pool, y_ref, y_pool = train_test_split(x_rest, y_rest, test_size=0.6, stratify=y_rest,
                                                    random_state=seed)
    model = LogisticRegression(max_iter=3000, C=0.1).fit(x_train / 16.0, y_train)
    pca = PCA(PCA_COMPONENTS, random_state=seed).fit(x_train)
    reference_correct = model.predict(x_ref / 16.0) == y_ref
    class_accuracy = np.array([reference_correct[y_ref == c].mean() for c in range(10)])
    return dict(model=model, pca=pca, x_ref=x_ref, y_ref=y_ref, x_pool=x_pool, y_pool=y_pool,
                worst_classes=np.argsort(class_accuracy, kind="stable")[:NUM_WORST_CLASSES])


def class_weights(severity: float, worst_classes) -> np.ndarray:
    weights = np.full(10, (1.0 - severity) / 10)
    weights[worst_classes] += severity / len(worst_classes)
    return weights


def apply_shift(kind: str, images: np.ndarray, severity: float, rng: np.random.Generator) -> np.ndarray:
    """Pixel noise or blur at ``severity`` in [0, 1] (class_mix leaves the images unchanged)."""
    if kind == "pixel_noise" and severity > 0:
        return np.clip(images + rng.normal(0.0, NOISE_SCALE * severity, images.shape), 0.0, 16.0)
    if kind == "blur" and severity > 0:
        from scipy.ndimage import gaussian_filter

        square = images.reshape(-1, 8, 8)
        blurred = np.stack([gaussian_filter(img, BLUR_SIGMA * severity, mode="constant") for img in square])
        return blurred.reshape(images.shape)
    return images


def sample_window(kind: str, data: dict, severity: float, size: int, rng: np.random.Generator):
    """One production window: (images, labels)."""
    x_pool, y_pool = data["x_pool"], data["y_pool"]
    if kind == "class_mix":
        # class counts by largest remainder (no multinomial noise); images without replacement, so a
        # window never repeats an image (the kNN statistic needs distinct points)
        quota = size * class_weights(severity, data["worst_classes"])
        counts = np.floor(quota).astype(int)
        counts[np.argsort(counts - quota)[:size - counts.sum()]] += 1
        index = np.concatenate([rng.choice(np.flatnonzero(y_pool == c), n, replace=False)
                                for c, n in enumerate(counts)])
    else:
        index = rng.choice(len(y_pool), size, replace=False)
    return apply_shift(kind, x_pool[index], severity, rng), y_pool[index]


def pool_accuracy(kind: str, data: dict, severity: float, rng: np.random.Generator) -> float:
    """The model's accuracy on the whole pool at ``severity``: the noise-free accuracy curve."""
    model, x_pool, y_pool = data["model"], data["x_pool"], data["y_pool"]
    if kind == "class_mix":
        correct = model.predict(x_pool / 16.0) == y_pool
        per_class = np.array([correct[y_pool == c].mean() for c in range(10)])
        return float(class_weights(severity, data["worst_classes"]) @ per_class)
    shifted = apply_shift(kind, x_pool, severity, rng)
    return float(np.mean(model.predict(shifted / 16.0) == y_pool))


def severities(config: dict) -> np.ndarray:
    t = np.arange(config["windows"])
    ramp = config["windows"] - config["clean_windows"]
    return np.clip((t - config["clean_windows"] + 1) / ramp, 0.0, 1.0)


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------

def make_monitors(data: dict, config: dict) -> dict[str, tuple[DriftMonitor, object]]:
    """Each detector's monitor and its feature map (images on the 0-16 scale -> monitored features)."""
    model, pca = data["model"], data["pca"]
    features = {
        "input_histogram": lambda images: images.astype(np.float32),
        "input_knn": lambda images: pca.transform(images).astype(np.float32),
        "output_mean_kl": lambda images: model.predict_proba(images / 16.0).astype(np.float32),
    }
    x_ref = data["x_ref"]
    # Equal-width bins on [0, 16] from the reference's range: DriftMonitor fixes them on the even
    # reference rows and tests the odd ones (see its docstring).
    monitors = {
        "input_histogram": DriftMonitor(features["input_histogram"](x_ref), estimator="histogram",
                                        alpha=ALPHA, consecutive=CONSECUTIVE, bins=HISTOGRAM_BINS,
                                        binning="range", num_permutations=config["histogram_permutations"]),
        "input_knn": DriftMonitor(features["input_knn"](x_ref), estimator="knn", k=1, alpha=ALPHA,
                                  consecutive=CONSECUTIVE, num_permutations=config["permutations"]),
        "output_mean_kl": DriftMonitor(features["output_mean_kl"](x_ref), estimator=mean_prediction_kl,
                                       alpha=ALPHA, consecutive=CONSECUTIVE,
                                       num_permutations=config["permutations"]),
    }
    return {name: (monitors[name], features[name]) for name in DETECTORS}


def score_stream(key, monitors: dict, images: np.ndarray) -> dict[str, dict[str, np.ndarray]]:
    """Runs every detector on a stream of windows, shape (T, m, 64), one window at a time."""
    out = {}
    for name, (monitor, feature_map) in monitors.items():
        state, rows = monitor.init(), []
        for window in images:
            key, sub = jax.random.split(key)
            state, score = monitor.update(state, sub, jnp.asarray(feature_map(window)))
            statistic = np.asarray(score.statistic)
            # the per-pixel statistics are summed for display; the test uses each pixel's own p-value
            rows.append((statistic.sum() if statistic.ndim else statistic, float(score.window_p_value),
                         bool(score.significant), bool(state.alarm)))
        columns = list(zip(*rows))
        out[name] = {field: np.array(column) for field, column in
                     zip(("statistic", "p_value", "significant", "alarm"), columns)}
    return out


def _first(condition: np.ndarray, start: int = 0) -> int | None:
    hits = np.flatnonzero(condition[start:])
    return int(hits[0] + start) if hits.size else None


def run_repeat(seed: int, config: dict) -> dict:
    data = prepare(seed)
    rng = np.random.default_rng(seed)
    key = jax.random.key(seed)
    monitors = make_monitors(data, config)
    clean_accuracy = pool_accuracy("pixel_noise", data, 0.0, rng)
    threshold = clean_accuracy - config["drop"]
    levels = severities(config)
    streams = {}
    for kind in SHIFTS:
        windows = [sample_window(kind, data, s, config["window_size"], rng) for s in levels]
        images = np.stack([w[0] for w in windows])
        window_accuracy = np.array([np.mean(data["model"].predict(x / 16.0) == y) for x, y in windows])
        true_accuracy = np.array([pool_accuracy(kind, data, s, rng) for s in levels])
        key, sub = jax.random.split(key)
        scores = score_stream(sub, monitors, images)
        drop = _first(true_accuracy <= threshold)
        detection = {}
        for name in DETECTORS:
            alarm = scores[name]["alarm"]
            first_after_shift = _first(alarm, config["clean_windows"])
            detection[name] = {
                "first_alarm": _first(alarm),
                "first_alarm_after_shift": first_after_shift,
                "severity_at_alarm": None if first_after_shift is None else float(levels[first_after_shift]),
                "lead_windows": None if first_after_shift is None or drop is None else drop - first_after_shift,
            }
        streams[kind] = {"window_accuracy": window_accuracy, "pool_accuracy": true_accuracy,
                         "drop_window": drop, "severity_at_drop": None if drop is None else float(levels[drop]),
                         "scores": scores, "detection": detection}
    null_images = np.stack([sample_window("pixel_noise", data, 0.0, config["window_size"], rng)[0]
                            for _ in range(config["null_windows"])])
    key, sub = jax.random.split(key)
    null_scores = score_stream(sub, monitors, null_images)
    return {"clean_accuracy": clean_accuracy, "threshold": threshold, "streams": streams,
            "null_scores": null_scores, "worst_classes": data["worst_classes"].tolist()}


def _false_alarm_rates(repeats: list[dict], config: dict) -> dict:
    """Per detector: significant and alarm rates over all unshifted windows."""
    rates = {}
    clean = config["clean_windows"]
    for name in DETECTORS:
        significant, alarms, windows = 0, 0, 0
        for repeat in repeats:
            parts = [repeat["null_scores"][name]] + [repeat["streams"][k]["scores"][name] for k in SHIFTS]
            limits = [None] + [clean] * len(SHIFTS)
            for part, limit in zip(parts, limits):
                significant += int(part["significant"][:limit].sum())
                alarms += int(part["alarm"][:limit].sum())
                windows += len(part["alarm"][:limit])
        rates[name] = {"windows": windows, "significant": significant, "alarms": alarms,
                       "significant_rate": significant / windows, "alarm_rate": alarms / windows}
    return rates


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser("drift_monitor", __doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, help="independent splits / streams")
    p.add_argument("--windows", type=int, help="windows per stream")
    p.add_argument("--clean-windows", type=int, help="unshifted windows at the start of each stream")
    p.add_argument("--window-size", type=int, help="images per window")
    p.add_argument("--null-windows", type=int, help="windows of the separate unshifted stream")
    p.add_argument("--permutations", type=int, help="permutations for the kNN and output detectors")
    p.add_argument("--histogram-permutations", type=int, help="permutations for the per-pixel detector")
    p.add_argument("--drop", type=float, default=0.05, help="accuracy drop that counts (default 0.05)")
    args = p.parse_args(argv)
    config = _common.scaled_config(args, QUICK, FULL)
    config["drop"] = args.drop

    with _common.Timer() as timer:
        repeats = [run_repeat(args.seed + r, config)
                   for r in _common.progress(range(config["repeats"]), desc="drift_monitor repeats",
                                             disable=args.no_progress)]
    summary = {}
    for kind in SHIFTS:
        summary[kind] = {"drop_window": [r["streams"][kind]["drop_window"] for r in repeats]}
        for name in DETECTORS:
            leads = [r["streams"][kind]["detection"][name]["lead_windows"] for r in repeats]
            summary[kind][name] = {
                "lead_windows": leads,
                "median_lead_windows": float(np.median([v for v in leads if v is not None]))
                if any(v is not None for v in leads) else None,
                "detected": sum(r["streams"][kind]["detection"][name]["first_alarm_after_shift"] is not None
                                for r in repeats),
                "first_alarm_after_shift": [r["streams"][kind]["detection"][name]["first_alarm_after_shift"]
                                            for r in repeats],
            }
    metrics = {
        "config": {**config, "alpha": ALPHA, "consecutive": CONSECUTIVE, "pca_components": PCA_COMPONENTS,
                   "histogram_bins": HISTOGRAM_BINS, "noise_scale": NOISE_SCALE, "blur_sigma": BLUR_SIGMA,
                   "quick": args.quick},
        "severities": severities(config),
        "summary": summary,
        "false_alarms": _false_alarm_rates(repeats, config),
        "repeats": repeats,
        "seconds": timer.seconds,
    }
    _common.save_metrics(args.out, metrics)
    _plot(metrics, args.out)
    return metrics


def _plot(metrics: dict, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    config = metrics["config"]
    repeat = metrics["repeats"][0]
    t = np.arange(config["windows"])
    fig, axes = plt.subplots(3, len(SHIFTS), figsize=(14, 8.5), sharex=True)
    colors = dict(zip(DETECTORS, ("C0", "C1", "C2")))
    for column, kind in enumerate(SHIFTS):
        stream = repeat["streams"][kind]
        ax_stat, ax_p, ax_acc = axes[:, column]
        for name in DETECTORS:
            scores = stream["scores"][name]
            statistic = np.asarray(scores["statistic"], float)
            null = np.asarray(repeat["null_scores"][name]["statistic"], float)
            # z-score against the separate unshifted stream, so the three statistics share an axis
            ax_stat.plot(t, (statistic - null.mean()) / max(null.std(), 1e-12), color=colors[name], label=name)
            ax_stat.set_yscale("symlog", linthresh=3)
            ax_p.semilogy(t, np.asarray(scores["p_value"], float), "o-", ms=3, color=colors[name], label=name)
            alarm_at = stream["detection"][name]["first_alarm_after_shift"]
            if alarm_at is not None:
                for ax in (ax_stat, ax_p, ax_acc):
                    ax.axvline(alarm_at, color=colors[name], ls=":", lw=1)
        ax_p.axhline(config["alpha"], color="k", ls="--", lw=0.8, label="alpha")
        ax_acc.plot(t, stream["window_accuracy"], "o", ms=3, color="gray", label="window accuracy")
        ax_acc.plot(t, stream["pool_accuracy"], "-", color="k", label="accuracy at this severity (pool)")
        ax_acc.axhline(repeat["threshold"], color="r", ls="--", lw=0.8, label=f"clean - {config['drop']:g}")
        for ax in (ax_stat, ax_p, ax_acc):
            ax.axvspan(-0.5, config["clean_windows"] - 0.5, color="0.9", zorder=0)
            if stream["drop_window"] is not None:
                ax.axvline(stream["drop_window"], color="r", lw=1)
        ax_stat.set_title(f"{kind} (grey: unshifted; red: accuracy drop; dotted: first alarms)", fontsize=8)
        ax_acc.set_xlabel("window")
    axes[0, 0].set_ylabel("statistic (z vs unshifted)")
    axes[1, 0].set_ylabel("window p-value")
    axes[2, 0].set_ylabel("accuracy")
    axes[0, 0].legend(fontsize=7)
    axes[2, 0].legend(fontsize=7)
    _common.save_figure(fig, out_dir, "stream")


def report(metrics: dict, rel_dir: pathlib.Path) -> str:
    config, summary, false_alarms = metrics["config"], metrics["summary"], metrics["false_alarms"]
    rows = []
    for kind in SHIFTS:
        for name in DETECTORS:
            cell = summary[kind][name]
            rows.append([kind, name, f"{cell['detected']}/{config['repeats']}",
                         ", ".join("-" if v is None else str(v) for v in cell["first_alarm_after_shift"]),
                         ", ".join("-" if v is None else str(v) for v in summary[kind]["drop_window"]),
                         ", ".join("-" if v is None else str(v) for v in cell["lead_windows"])])
    fa_rows = [[name, v["windows"], v["significant"], f"{v['significant_rate']:.3f}", v["alarms"],
                f"{v['alarm_rate']:.3f}"] for name, v in false_alarms.items()]
    return "\n\n".join([
        f"Logistic regression on digits; streams of {config['windows']} windows of {config['window_size']} "
        f"images, the first {config['clean_windows']} unshifted, then severity rising linearly to 1; "
        f"{config['repeats']} repeat(s). Alarm: window p-value <= {config['alpha']} (Bonferroni over pixels for "
        f"the histogram detector) in {config['consecutive']} consecutive windows. Accuracy drop: the first "
        f"window whose severity costs >= {config['drop']:g} accuracy on the whole pool. Lead = drop window - "
        "first alarm window (positive: alarm first; '-': no alarm or no drop).",
        _common.markdown_table(["shift", "detector", "detected", "first alarm", "drop window", "lead (windows)"],
                               rows),
        "False alarms on unshifted windows (clean prefixes + a separate unshifted stream):",
        _common.markdown_table(["detector", "windows", "significant", "rate", "alarms", "alarm rate"], fa_rows),
        f"![stream]({rel_dir}/stream.png)",
    ])


if __name__ == "__main__":
    _common.run_main(main)
