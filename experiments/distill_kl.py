"""Distillation with forward vs reverse KL at several temperatures, on scikit-learn's bundled digits.

    python -m experiments.distill_kl [--quick] [--out results/distill_kl]
    python -m experiments.distill_kl --temperatures 1,4 --seeds 2 --student-hidden 8

A teacher MLP (64-256-256-10) is trained on the digits training split with labels. A much smaller
student (64-``--student-hidden``-10) is then trained on the same training inputs without labels, on

    forward:  T^2 * mean_x KL(softmax(t(x) / T) || softmax(s(x) / T))   (mass-covering, the usual KD loss)
    reverse:  T^2 * mean_x KL(softmax(s(x) / T) || softmax(t(x) / T))   (mode-seeking)

with ``kljax.discrete.kl_logits`` (P first: the teacher for forward, the student for reverse), for a
sweep of temperatures T (the T^2 factor keeps gradient magnitudes comparable across T; Hinton et al.,
2015, sec. 2). Each temperature sweep is ``jax.vmap``-ed in one jitted run. A student of the same size
trained on the labels with cross-entropy is the reference.

Reported per (direction, T), on the test split at temperature 1: student accuracy, expected calibration
error (ECE, 15 equal-width confidence bins; Guo et al., 2017, eq. 3), the KL reached in both directions
(teacher || student and student || teacher), and agreement with the teacher's argmax. Means over
``--seeds`` splits / initialisations.

References: G. Hinton, O. Vinyals and J. Dean, "Distilling the knowledge in a neural network", 2015,
https://arxiv.org/abs/1503.02531; C. Guo et al., "On calibration of modern neural networks", ICML 2017;
Y. Gu et al., "MiniLLM: knowledge distillation of large language models" (reverse KL), ICLR 2024.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np

from experiments import _common
from experiments.finetune_kl import accuracy, cross_entropy, init_mlp, load_digits_split, mlp_logits, train
from kljax import discrete

TITLE = "Distillation: forward vs reverse KL and temperature (digits)"
ORDER = 62

FULL = dict(temperatures=[1.0, 2.0, 4.0, 8.0], seeds=3, steps=1000, student_hidden=8)
QUICK = dict(temperatures=[1.0, 4.0], seeds=1, steps=400, student_hidden=8)
TEACHER_SIZES = (64, 256, 256, 10)
TEACHER_STEPS = 400
LEARNING_RATE = 3e-3
ECE_BINS = 15
DIRECTIONS = ("forward", "reverse")


def expected_calibration_error(logits, labels, num_bins: int = ECE_BINS) -> float:
    """ECE = sum_b |B_b| / n * |accuracy(B_b) - confidence(B_b)| over equal-width confidence bins."""
    probabilities = np.asarray(jax.nn.softmax(logits, axis=-1))
    confidence = probabilities.max(axis=-1)
    correct = probabilities.argmax(axis=-1) == np.asarray(labels)
    bin_of = np.minimum((confidence * num_bins).astype(int), num_bins - 1)
    ece = 0.0
    for b in range(num_bins):
        members = bin_of == b
        if members.any():
            ece += members.mean() * abs(correct[members].mean() - confidence[members].mean())
    return float(ece)


def _test_metrics(logits, labels, teacher_logits) -> dict[str, float]:
    return {
        "student_accuracy": float(accuracy(logits, labels)),
        "ece": expected_calibration_error(logits, labels),
        "forward_kl": float(jnp.mean(discrete.kl_logits(teacher_logits, logits))),
        "reverse_kl": float(jnp.mean(discrete.kl_logits(logits, teacher_logits))),
        "agreement_with_teacher": float(jnp.mean(jnp.argmax(logits, -1) == jnp.argmax(teacher_logits, -1))),
    }


@functools.partial(jax.jit, static_argnames=("direction", "steps", "sizes"))
def _distill_sweep(init, teacher_logits, x_train, temperatures, *, direction: str, steps: int, sizes):
    """Trains one student per temperature (vmapped); returns their parameters."""
    del sizes  # part of the cache key only

    def distill(temperature):
        def loss(params):
            student = mlp_logits(params, x_train) / temperature
            teacher = teacher_logits / temperature
            if direction == "forward":
                kl = discrete.kl_logits(teacher, student)
            else:
                kl = discrete.kl_logits(student, teacher)
            return temperature**2 * jnp.mean(kl)

        return train(init, loss, steps=steps, learning_rate=LEARNING_RATE)

    return jax.vmap(distill)(temperatures)


def run_seed(seed: int, temperatures, steps: int, student_hidden: int) -> dict:
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    teacher_key, student_key = jax.random.split(jax.random.key(seed))
    teacher = jax.jit(lambda p: train(p, lambda q: cross_entropy(mlp_logits(q, x_train), y_train),
                                      steps=TEACHER_STEPS, learning_rate=LEARNING_RATE))(
        init_mlp(teacher_key, TEACHER_SIZES))
    teacher_train, teacher_test = mlp_logits(teacher, x_train), mlp_logits(teacher, x_test)
    sizes = (64, student_hidden, 10)
    student_init = init_mlp(student_key, sizes)
    labels_student = jax.jit(lambda p: train(p, lambda q: cross_entropy(mlp_logits(q, x_train), y_train),
                                             steps=steps, learning_rate=LEARNING_RATE))(student_init)
    out = {
        "teacher": {"accuracy": float(accuracy(teacher_test, y_test)),
                    "ece": expected_calibration_error(teacher_test, y_test)},
        "student_labels": _test_metrics(mlp_logits(labels_student, x_test), y_test, teacher_test),
    }
    temps = jnp.asarray(temperatures, jnp.float32)
    for direction in DIRECTIONS:
        students = _distill_sweep(student_init, teacher_train, x_train, temps, direction=direction,
                                  steps=steps, sizes=sizes)
        for i, temperature in enumerate(temperatures):
            params = jax.tree.map(lambda leaf: leaf[i], students)
            logits_train = mlp_logits(params, x_train) / temperature
            teacher_scaled = teacher_train / temperature
            train_kl = (discrete.kl_logits(teacher_scaled, logits_train) if direction == "forward"
                        else discrete.kl_logits(logits_train, teacher_scaled))
            out[(direction, temperature)] = {
                **_test_metrics(mlp_logits(params, x_test), y_test, teacher_test),
                "train_objective_kl": float(jnp.mean(train_kl)),
            }
    return out


def _mean(dicts: list[dict]) -> dict:
    return {key: float(np.mean([d[key] for d in dicts])) for key in dicts[0]}


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser("distill_kl", __doc__.splitlines()[0])
    p.add_argument("--temperatures", type=_common.float_list, help="distillation temperatures")
    p.add_argument("--seeds", type=int, help="number of splits / initialisations")
    p.add_argument("--steps", type=int, help="student training steps")
    p.add_argument("--student-hidden", type=int, help="hidden width of the student")
    args = p.parse_args(argv)
    config = _common.scaled_config(args, QUICK, FULL)

    with _common.Timer() as timer:
        per_seed = [run_seed(args.seed + s, config["temperatures"], config["steps"], config["student_hidden"])
                    for s in _common.progress(range(config["seeds"]), desc="distill_kl seeds",
                                              disable=args.no_progress)]
    results = []
    for direction in DIRECTIONS:
        for temperature in config["temperatures"]:
            rows = [seed[(direction, temperature)] for seed in per_seed]
            results.append({"direction": direction, "temperature": float(temperature), **_mean(rows),
                            "student_accuracy_std": float(np.std([r["student_accuracy"] for r in rows]))})
    metrics = {
        "config": {**config, "teacher_sizes": list(TEACHER_SIZES), "teacher_steps": TEACHER_STEPS,
                   "learning_rate": LEARNING_RATE, "ece_bins": ECE_BINS, "quick": args.quick},
        "teacher": _mean([s["teacher"] for s in per_seed]),
        "student_labels": _mean([s["student_labels"] for s in per_seed]),
        "results": results,
        "seconds": timer.seconds,
    }
    _common.save_metrics(args.out, metrics)
    _plot(metrics, args.out)
    return metrics


def _plot(metrics: dict, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    panels = (("student_accuracy", "test accuracy"), ("ece", "ECE (15 bins)"),
              ("forward_kl", "KL(teacher || student), T = 1"), ("reverse_kl", "KL(student || teacher), T = 1"))
    fig, axes = plt.subplots(1, len(panels), figsize=(15, 3.6))
    for ax, (key, label) in zip(axes, panels):
        for direction, style in zip(DIRECTIONS, ("o-", "s--")):
            rows = [r for r in metrics["results"] if r["direction"] == direction]
            ax.plot([r["temperature"] for r in rows], [r[key] for r in rows], style, label=f"{direction} KL")
        ax.axhline(metrics["student_labels"][key], color="gray", ls=":", label="student on labels")
        teacher = {"student_accuracy": metrics["teacher"]["accuracy"], "ece": metrics["teacher"]["ece"]}
        if key in teacher:
            ax.axhline(teacher[key], color="k", ls="-.", lw=0.8, label="teacher")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("temperature T")
        ax.set_title(label, fontsize=9)
    axes[0].set_ylabel("student (test split)")
    axes[0].legend(fontsize=7)
    _common.save_figure(fig, out_dir, "distillation")


def report(metrics: dict, rel_dir: pathlib.Path) -> str:
    header = ["loss", "T", "accuracy", "ECE", "KL(t||s)", "KL(s||t)", "agreement"]
    rows = [[f"{r['direction']} KL", f"{r['temperature']:g}", r["student_accuracy"], r["ece"], r["forward_kl"],
             r["reverse_kl"], r["agreement_with_teacher"]] for r in metrics["results"]]
    labels = metrics["student_labels"]
    rows.append(["labels (CE)", "-", labels["student_accuracy"], labels["ece"], labels["forward_kl"],
                 labels["reverse_kl"], labels["agreement_with_teacher"]])
    config, teacher = metrics["config"], metrics["teacher"]
    by_key = {(r["direction"], r["temperature"]): r for r in metrics["results"]}
    lowest = min(config["temperatures"])
    forward, reverse = by_key[("forward", lowest)], by_key[("reverse", lowest)]
    return "\n\n".join([
        f"Teacher MLP {'-'.join(map(str, config['teacher_sizes']))} (test accuracy {teacher['accuracy']:.3f}, "
        f"ECE {teacher['ece']:.3f}); student 64-{config['student_hidden']}-10 trained {config['steps']} Adam "
        f"steps on the training inputs; metrics on the test split at T = 1, means over {config['seeds']} seed(s).",
        _common.markdown_table(header, rows, float_format="{:.3f}"),
        f"At T = {lowest:g}: forward-KL student accuracy {forward['student_accuracy']:.3f}, reverse-KL student "
        f"{reverse['student_accuracy']:.3f} (final training objective {forward['train_objective_kl']:.3f} vs "
        f"{reverse['train_objective_kl']:.3f} nats). The reverse KL's gradient with respect to a class's logit "
        "is proportional to the student's probability of that class, so a class the student has given up on "
        "gets no pull back.",
        f"![distillation]({rel_dir}/distillation.png)",
    ])


if __name__ == "__main__":
    _common.run_main(main)
