"""Distillation on a held-out transfer set: labels, Hinton's mixed loss, forward and reverse KL, on digits.

    python -m experiments.distill_kl [--quick] [--out results/distill_kl]
    python -m experiments.distill_kl --temperatures 1,4 --student-widths 8 --seeds 3 --steps 500

The digits are split per class into three disjoint parts: the teacher's training set (40%), the transfer
set (30%) and the test set (30%). A teacher MLP 64-256-256-10 (equinox, full-batch Adam) is trained on its
part only, so its outputs on the transfer set are predictions on images it never saw, not memorised
labels; the report gives its mean max-probability on both sets. Students 64-``width``-10 are trained on
the transfer set with

    loss = alpha * CE(labels, s(x))  +  (1 - alpha) * T^2 * mean_x KL(softmax(t(x) / T) || softmax(s(x) / T))

(Hinton et al., 2015, sec. 2: the T^2 keeps the soft-target gradients' scale as T changes). Four losses:
``labels`` (alpha = 1), ``forward`` (alpha = 0, pure distillation, no labels), ``mixed`` (alpha =
``--mixed-alpha``), and ``reverse`` (alpha = 0 with the KL's arguments swapped, KL(s || t), mode-seeking;
Gu et al., 2024), for every student width x temperature. Every KL is ``kljax.discrete.kl_logits``
(P first: the teacher for forward, the student for reverse).

Reported per (width, loss, T), on the test set at T = 1: student accuracy, expected calibration error
(ECE, 15 equal-width confidence bins; Guo et al., 2017, eq. 3), the KL to the teacher in both directions
and the agreement with the teacher's argmax; mean and Student-t 95% interval over seeds (each seed is a
new three-way split, teacher and student initialisation; the losses of one seed share the student's
initialisation). All seeds x losses x temperatures of one width are one jitted ``jax.vmap``-ed run.

References: G. Hinton, O. Vinyals and J. Dean, "Distilling the knowledge in a neural network", 2015,
https://arxiv.org/abs/1503.02531; C. Guo et al., "On calibration of modern neural networks", ICML 2017;
Y. Gu et al., "MiniLLM: knowledge distillation of large language models", ICLR 2024 (reverse KL);
S. Stanton et al., "Does knowledge distillation really work?", NeurIPS 2021 (fidelity versus accuracy).
"""

from __future__ import annotations

import dataclasses
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from experiments import _common, _data, _models, _stats, _train
from kljax import discrete

TITLE = "Distillation on a held-out transfer set: labels, mixed, forward and reverse KL (digits)"
ORDER = 62

LOSSES = ("labels", "forward", "mixed", "reverse")
FRACTIONS = (0.4, 0.3, 0.3)  # teacher training set, transfer set, test set
ECE_BINS = 15
METRICS = ("student_accuracy", "ece", "forward_kl", "reverse_kl", "agreement_with_teacher")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    student_widths: tuple[int, ...] = (4, 8, 16, 64)
    temperatures: tuple[float, ...] = (1.0, 2.0, 4.0, 8.0)
    mixed_alpha: float = 0.5
    seeds: int = 5
    steps: int = 1000
    teacher_width: int = 256
    teacher_depth: int = 2
    teacher_steps: int = 400
    learning_rate: float = 3e-3
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(student_widths=(8,), temperatures=(1.0, 4.0), seeds=3, steps=400)

    def runs(self) -> list[tuple[str, float]]:
        """``(loss, T)`` of every student of one width; ``labels`` once (T plays no part in it)."""
        return [("labels", 1.0)] + [(loss, float(t)) for loss in LOSSES[1:] for t in self.temperatures]


def expected_calibration_error(logits, labels, num_bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b| / n * |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins."""
    probabilities = np.asarray(jax.nn.softmax(jnp.asarray(logits), axis=-1))
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == np.asarray(labels)
    bin_of = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        members = bin_of == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def distillation_loss(student_logits, teacher_logits, labels, *, alpha, temperature, reverse):
    """``alpha * CE + (1 - alpha) * T^2 * mean KL`` (forward ``KL(t || s)``, or ``KL(s || t)`` if ``reverse``).

    ``reverse`` is a 0/1 weight (a traced value under vmap), not a branch.
    """
    s, t = student_logits / temperature, teacher_logits / temperature
    kl = (1.0 - reverse) * discrete.kl_logits(t, s) + reverse * discrete.kl_logits(s, t)
    return alpha * _train.cross_entropy(student_logits, labels) + (1.0 - alpha) * temperature**2 * jnp.mean(kl)


@eqx.filter_jit
def _teachers(init, static, x, y, config: Config):
    return _train.fit(init, lambda p: _train.cross_entropy(_models.apply(p, static, x), y),
                      steps=config.teacher_steps, learning_rate=config.learning_rate)


@eqx.filter_jit
def _students(init, static, x, y, teacher_logits, x_test, settings, config: Config):
    """Trains one student per row of ``settings`` (alpha, T, reverse) from ``init``; test logits (R, n, 10)."""
    def one(setting):
        alpha, temperature, reverse = setting[0], setting[1], setting[2]
        def loss(p):
            return distillation_loss(_models.apply(p, static, x), teacher_logits, y, alpha=alpha,
                                     temperature=temperature, reverse=reverse)

        params = _train.fit(init, loss, steps=config.steps, learning_rate=config.learning_rate)
        return _models.apply(params, static, x_test)

    return jax.vmap(one)(settings)


@jax.jit
def _scores(logits, labels, teacher_logits) -> dict[str, jax.Array]:
    """Test metrics but ECE of every model at once: logits (..., n, 10), labels (..., n), teacher (..., n, 10)."""
    teacher_logits = jnp.broadcast_to(teacher_logits, logits.shape)
    return {
        "student_accuracy": _train.accuracy(logits, labels),
        "forward_kl": jnp.mean(discrete.kl_logits(teacher_logits, logits), axis=-1),
        "reverse_kl": jnp.mean(discrete.kl_logits(logits, teacher_logits), axis=-1),
        "agreement_with_teacher": jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1), axis=-1),
    }


def run(config: Config) -> dict:
    """Runs the study; returns the metrics (per-seed values, means and 95% intervals)."""
    seeds = [config.seed + s for s in range(config.seeds)]
    (x_teach, y_teach), (x_transfer, y_transfer), (x_test, y_test) = _data.stacked_parts(seeds, FRACTIONS)
    runs = config.runs()
    settings = jnp.asarray([(1.0 if loss == "labels" else config.mixed_alpha if loss == "mixed" else 0.0,
                             temperature, 1.0 if loss == "reverse" else 0.0) for loss, temperature in runs],
                           jnp.float32)
    with _common.Timer() as timer:
        init, static = _models.init_mlps(seeds, 0, config.teacher_width, config.teacher_depth)
        teacher = jax.vmap(lambda p, x, y: _teachers(p, static, x, y, config))(init, x_teach, y_teach)
        logits = jax.jit(jax.vmap(lambda p, x: _models.apply(p, static, x)))
        teacher_own, teacher_transfer, teacher_test = (logits(teacher, x) for x in (x_teach, x_transfer, x_test))
        per_width = {}
        for i, width in enumerate(config.student_widths):
            student_init, student_static = _models.init_mlps(seeds, 1 + i, width, 1)
            per_width[width] = jax.vmap(
                lambda p, x, y, t, xt: _students(p, student_static, x, y, t, xt, settings, config))(
                student_init, x_transfer, y_transfer, teacher_transfer, x_test)  # (seeds, runs, n, 10)

    def top_probability(z):
        return np.asarray(jnp.max(jax.nn.softmax(z, axis=-1), axis=-1))  # (seeds, n)

    top_own, top_transfer = top_probability(teacher_own), top_probability(teacher_transfer)
    teacher_rows = {
        "accuracy": np.asarray(_train.accuracy(teacher_test, y_test)),
        "ece": [expected_calibration_error(teacher_test[s], y_test[s]) for s in range(config.seeds)],
        "mean_max_probability_on_transfer_set": top_transfer.mean(axis=-1),
        "mean_max_probability_on_own_training_set": top_own.mean(axis=-1),
        "fraction_below_0.9_on_transfer_set": (top_transfer < 0.9).mean(axis=-1),
        "fraction_below_0.9_on_own_training_set": (top_own < 0.9).mean(axis=-1),
        "accuracy_on_transfer_set": np.asarray(_train.accuracy(teacher_transfer, y_transfer)),
    }
    results = []
    for width, test_logits in per_width.items():
        scores = {k: np.asarray(v) for k, v in _scores(test_logits, y_test[:, None, :],
                                                        teacher_test[:, None, :, :]).items()}  # (seeds, runs)
        test_logits = np.asarray(test_logits)
        scores["ece"] = np.array([[expected_calibration_error(test_logits[s, r], y_test[s]) for r in range(len(runs))]
                                  for s in range(config.seeds)])
        for r, (loss, temperature) in enumerate(runs):
            row = {"student_width": width, "loss": loss, "temperature": temperature,
                   "alpha": float(settings[r, 0])}
            for name in METRICS:
                values = [float(v) for v in scores[name][:, r]]
                stats = _stats.summarise(values)
                row[name], row[name + "_ci95"], row[name + "_std"] = stats["mean"], stats["ci95"], stats["std"]
                row[name + "_seeds"] = values
            results.append(row)
    return {
        "config": {**dataclasses.asdict(config), "fractions": list(FRACTIONS), "ece_bins": ECE_BINS,
                   "part_sizes": [int(x_teach.shape[1]), int(x_transfer.shape[1]), int(x_test.shape[1])]},
        "teacher": {name: {**_stats.summarise(values), "seeds": [float(v) for v in values]}
                    for name, values in teacher_rows.items()},
        "results": results,
        "seconds": timer.seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    config, args = _common.parse_config(Config, "distill_kl", __doc__.splitlines()[0], argv)
    metrics = run(config)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _plot(metrics, args.out)
    return metrics


# ----------------------------------------------------------------------------------------------
# Figure and report
# ----------------------------------------------------------------------------------------------

LABELS = {"labels": "labels (CE)", "forward": "forward KL(t||s)", "mixed": "mixed", "reverse": "reverse KL(s||t)"}
STYLES = {"forward": "o-", "mixed": "s-", "reverse": "^--"}


def _rows(metrics, width, loss):
    return [r for r in metrics["results"] if r["student_width"] == width and r["loss"] == loss]


def _plot(metrics: dict, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    widths = metrics["config"]["student_widths"]
    panels = (("student_accuracy", "test accuracy"), ("ece", "ECE (15 bins)"),
              ("agreement_with_teacher", "agreement with the teacher's argmax"))
    fig, axes = plt.subplots(len(panels), len(widths), figsize=(3.6 * len(widths) + 1, 8.5), squeeze=False,
                             sharex=True)
    teacher = metrics["teacher"]
    for column, width in enumerate(widths):
        for row, (key, label) in enumerate(panels):
            ax = axes[row, column]
            for loss in ("forward", "mixed", "reverse"):
                rows = _rows(metrics, width, loss)
                legend = LABELS[loss] if loss != "mixed" else f"mixed, alpha = {metrics['config']['mixed_alpha']:g}"
                ax.errorbar([r["temperature"] for r in rows], [r[key] for r in rows],
                            yerr=[r[key + "_ci95"] for r in rows], fmt=STYLES[loss], ms=4, capsize=2, lw=1,
                            label=legend)
            (labels,) = _rows(metrics, width, "labels")
            ax.axhline(labels[key], color="gray", ls=":", label="labels (CE), ±95%")
            ax.axhspan(labels[key] - labels[key + "_ci95"], labels[key] + labels[key + "_ci95"], color="gray",
                       alpha=0.15)
            if key in ("student_accuracy", "ece"):
                name = "accuracy" if key == "student_accuracy" else "ece"
                ax.axhline(teacher[name]["mean"], color="k", ls="-.", lw=0.8, label="teacher")
            ax.set_xscale("log", base=2)
            if row == 0:
                ax.set_title(f"student 64-{width}-10", fontsize=9)
            if column == 0:
                ax.set_ylabel(label, fontsize=8)
            if row == len(panels) - 1:
                ax.set_xlabel("temperature T")
    axes[0, 0].legend(fontsize=6)
    fig.suptitle(f"test set, mean and 95% interval over {metrics['config']['seeds']} seeds", fontsize=9)
    _common.save_figure(fig, out_dir, "distillation")


def reading(metrics: dict) -> list[str]:
    """The conclusions, each computed from the per-seed numbers (Welch tests at p < 0.05)."""
    teacher, config = metrics["teacher"], metrics["config"]
    out = [
        f"The teacher never saw the transfer set: its mean max-probability there is "
        f"{_stats.fmt(teacher['mean_max_probability_on_transfer_set'])} (accuracy "
        f"{_stats.fmt(teacher['accuracy_on_transfer_set'])}) against "
        f"{_stats.fmt(teacher['mean_max_probability_on_own_training_set'])} on its own training set; it gives less "
        f"than 0.9 to its top class on {_stats.fmt(teacher['fraction_below_0.9_on_transfer_set'])} of the transfer "
        f"images (on {_stats.fmt(teacher['fraction_below_0.9_on_own_training_set'])} of its training images)."]
    p_values, accuracy_tests, fidelity_tests = [], [], []
    for width in config["student_widths"]:
        (labels,) = _rows(metrics, width, "labels")
        best = {loss: max(_rows(metrics, width, loss), key=lambda r: r["student_accuracy"])
                for loss in ("forward", "mixed", "reverse")}
        forward = best["forward"]
        comparisons = [(best[loss], labels, f"{LABELS[loss]} at its best T = {best[loss]['temperature']:g}",
                        "labels (CE)", "student_accuracy", "test accuracy") for loss in ("forward", "mixed")]
        forward_at_lowest = _rows(metrics, width, "forward")[0]
        if forward is not forward_at_lowest:
            comparisons.append((forward, forward_at_lowest, f"forward KL at T = {forward['temperature']:g}",
                                f"at T = {forward_at_lowest['temperature']:g}", "student_accuracy", "test accuracy"))
        reverse = next(r for r in _rows(metrics, width, "reverse") if r["temperature"] == forward["temperature"])
        comparisons.append((reverse, forward, f"reverse KL at T = {reverse['temperature']:g}", "forward KL",
                            "student_accuracy", "test accuracy"))
        comparisons.append((forward, labels, f"forward KL at T = {forward['temperature']:g}", "labels (CE)", "ece",
                            "ECE"))
        forward_at_highest = _rows(metrics, width, "forward")[-1]
        comparisons.append((forward_at_highest, labels, f"forward KL at T = {forward_at_highest['temperature']:g}",
                            "labels (CE)", "agreement_with_teacher", "agreement with the teacher"))
        lines = []
        for a, b, name_a, name_b, key, what in comparisons:
            lines.append(_stats.compare(a[key + "_seeds"], b[key + "_seeds"], name_a, name_b, what))
            p = _stats.welch_p(a[key + "_seeds"], b[key + "_seeds"])
            p_values.append(p)
            if key == "student_accuracy" and b is labels:
                accuracy_tests.append(p < _stats.SIGNIFICANCE)
            if key == "agreement_with_teacher":
                fidelity_tests.append(p < _stats.SIGNIFICANCE and a[key] > b[key])
        out.append(f"Student 64-{width}-10: " + " ".join(lines))
    significant = sum(bool(p < _stats.SIGNIFICANCE) for p in p_values)
    out.append(f"{significant} of these {len(p_values)} comparisons are significant at p < 0.05 uncorrected, "
               f"{sum(_stats.holm(p_values))} after Holm's correction for the {len(p_values)} (the best T is picked on "
               "the test means, which favours the distilled students). Distillation (forward or mixed, "
               f"best T) changes the student's test accuracy significantly against training on the labels in "
               f"{sum(accuracy_tests)} of {len(accuracy_tests)} width x loss cases; the forward-KL student at the "
               f"highest T agrees with the teacher significantly more often than the labels student for "
               f"{sum(fidelity_tests)} of {len(fidelity_tests)} widths (fidelity to the teacher and accuracy are "
               "different things; Stanton et al., 2021).")
    return out


def report(metrics: dict, rel_dir: pathlib.Path) -> str:
    config, teacher = metrics["config"], metrics["teacher"]
    header = ["student", "loss", "T", "accuracy", "ECE", "KL(t||s)", "KL(s||t)", "agreement"]
    rows = [[f"64-{r['student_width']}-10", LABELS[r["loss"]],
             "-" if r["loss"] == "labels" else f"{r['temperature']:g}"]
            + [f"{r[k]:.3f} ± {r[k + '_ci95']:.3f}" for k in METRICS] for r in metrics["results"]]
    sizes = config["part_sizes"]
    return "\n\n".join([
        f"Teacher MLP 64-{'-'.join([str(config['teacher_width'])] * config['teacher_depth'])}-10 trained on "
        f"{sizes[0]} images (test accuracy {_stats.fmt(teacher['accuracy'])}, ECE "
        f"{_stats.fmt(teacher['ece'])}); students "
        f"trained {config['steps']} full-batch Adam steps on a disjoint transfer set of {sizes[1]} images; "
        f"metrics on {sizes[2]} test images at T = 1; mixed loss alpha = {config['mixed_alpha']:g}; mean ± 95% "
        f"t-interval over {config['seeds']} seeds.",
        _common.markdown_table(header, rows),
        "**Reading** (computed from the per-seed values; Welch t-tests, p < 0.05, uncorrected):\n\n"
        + "\n".join(f"- {line}" for line in reading(metrics)),
        f"![distillation]({rel_dir}/distillation.png)",
    ])


if __name__ == "__main__":
    _common.run_main(main)
