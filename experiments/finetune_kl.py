"""Fine-tuning without the old data: full KL, Learning without Forgetting, EWC and L2 on digits 0-4 -> 5-9.

    python -m experiments.finetune_kl [--quick] [--out results/finetune_kl]
    python -m experiments.finetune_kl --lwf-betas 1,10 --ewc-lambdas 100 --seeds 3 --steps 300

Setting (class-incremental, single head). An MLP 64-128-10 (equinox, full-batch Adam) is trained on digits
0-4, the "old task"; its output layer has all 10 classes from the start. It is then fine-tuned on digits
5-9 only; the old images are unavailable during fine-tuning. Evaluation takes the argmax over all 10
classes on the test images of each task, so an old image counts as correct only if it is not labelled
as one of the new classes (van de Ven and Tolias's class-incremental scenario, 2019). The argmax restricted
to the old classes 0-4 (a separate "old head") is reported too: the task-incremental score.

Each method adds a penalty, scaled by its coefficient ``beta``, to the cross-entropy on the new task:

- ``none``: no penalty (plain fine-tuning).
- ``kl_full``: ``mean_x KL(p_base(.|x) || p_theta(.|x))`` over the 10 classes on the new-task inputs x. The
  base gives classes 5-9 almost no mass on any input, so this KL forbids exactly what the task loss asks:
  at large beta the new task is not learnt. Kept as the contradiction it is.
- ``lwf``: Learning without Forgetting (Li and Hoiem, 2016, eq. 2-3): the KL on the same new-task inputs,
  restricted to the old classes and renormalised over them, at temperature T (2, as in the paper):
  ``mean_x KL(softmax(z_base[:5] / T) || softmax(z_theta[:5] / T))``. It keeps the old classes' relative
  outputs and says nothing about old versus new classes, so it does not conflict with the new task.
- ``ewc``: elastic weight consolidation (Kirkpatrick et al., 2017, eq. 3): ``beta / 2 * sum_i F_i
  (theta_i - theta_base_i)^2`` with ``F`` the diagonal of the Fisher information of the base model's
  predictive distribution, ``F = mean_x sum_y p_base(y|x) (d log p_theta(y|x) / d theta)^2`` at
  theta_base, computed exactly over the 10 classes on the old-task training inputs (at the end of the
  old task, while they were available). Since ``mean_x KL(p_base || p_theta) = 1/2 delta^T F delta +
  O(|delta|^3)`` (Martens, 2020, sec. 9.2), EWC is the diagonal quadratic approximation of the KL to the
  base on the old inputs, the quantity reported as forgetting. ``--fisher-inputs new`` takes the Fisher
  on the new-task inputs instead (the quadratic approximation of ``kl_full``'s KL).
- ``l2``: ``beta / 2 * ||theta - theta_base||^2``, the isotropic special case of EWC.

What the class-incremental setting does to all of them: without old images, no loss here trains the
decision "old image -> not a new class" directly. Plain fine-tuning raises the new classes' logits on
every input. LwF constrains only the old classes' outputs relative to each other, so it cannot stop that.
EWC and L2 slow down the weights the old predictions depend on, and slow the new task with them (under the
base, the Fisher of a new-class output weight is ~p(1 - p) ~ 1e-4: EWC leaves those weights free). The
full KL penalises new-class mass directly, on the new images, against the task loss. The report measures
how much each of these matters: the 10-way against the within-old-classes accuracy, and the fraction of
old images labelled as a new class.

Every seed is a new per-class split and initialisation; all seeds x methods x coefficients are one
jitted ``jax.vmap``-ed run. Every KL is ``kljax.discrete.kl_logits``.

References: Z. Li and D. Hoiem, "Learning without forgetting", ECCV 2016, https://arxiv.org/abs/1606.09282;
J. Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017,
https://arxiv.org/abs/1612.00796; G. M. van de Ven and A. S. Tolias, "Three scenarios for continual
learning", 2019, https://arxiv.org/abs/1904.07734; J. Martens, "New insights and perspectives on the
natural gradient method", JMLR 2020.
"""

from __future__ import annotations

import dataclasses
import pathlib

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _common, _data, _models, _stats, _train
from kljax import discrete

TITLE = "Fine-tuning without the old data: full KL, LwF, EWC, L2 (digits 0-4 -> 5-9)"
ORDER = 61

NUM_OLD = 5  # classes 0-4 are the old task, 5-9 the new one
METHODS = ("kl_full", "lwf", "ewc", "l2")
METRICS = ("old_task_accuracy", "new_task_accuracy", "old_task_accuracy_within_old_classes",
           "old_images_labelled_new", "kl_to_base_on_old_inputs", "kl_within_old_classes_on_old_inputs")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale). Coefficient grids exclude 0 (``none`` is run once)."""

    kl_full_betas: tuple[float, ...] = (0.03, 0.1, 0.3, 1.0, 3.0, 30.0)
    lwf_betas: tuple[float, ...] = (0.3, 1.0, 3.0, 10.0, 30.0, 100.0)
    ewc_betas: tuple[float, ...] = (1.0, 10.0, 100.0, 1e3, 1e4, 1e5)
    l2_betas: tuple[float, ...] = (0.001, 0.01, 0.1, 1.0, 10.0)
    seeds: int = 5
    steps: int = 400
    hidden: int = 128
    base_steps: int = 300
    learning_rate: float = 1e-3
    lwf_temperature: float = 2.0
    fisher_inputs: str = "old"
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(kl_full_betas=(0.3, 30.0), lwf_betas=(1.0, 30.0), ewc_betas=(100.0, 1e4),
                   l2_betas=(0.01, 1.0), seeds=3, steps=200)

    def runs(self) -> list[tuple[str, float]]:
        """``(method, beta)`` of every fine-tuning run, ``("none", 0.0)`` first."""
        grids = {"kl_full": self.kl_full_betas, "lwf": self.lwf_betas, "ewc": self.ewc_betas,
                 "l2": self.l2_betas}
        return [("none", 0.0)] + [(m, float(b)) for m in METHODS for b in grids[m]]


# ----------------------------------------------------------------------------------------------
# The Fisher information of the predictive distribution
# ----------------------------------------------------------------------------------------------

def diagonal_fisher(logits_fn, params, x: jax.Array):
    """Diagonal Fisher of a classifier's predictive distribution, exact over the classes.

    ``F_i = mean_x sum_y p(y|x) (d log p(y|x) / d theta_i)^2`` with ``p = softmax(logits_fn(params, x))``:
    the curvature of ``mean_x KL(p_params(.|x) || p_theta(.|x))`` at ``theta = params``.

    Args:
      logits_fn: ``(params, x) -> logits (n, K)``.
      params: a pytree of arrays (the base model).
      x: inputs, shape (n, ...).

    Returns:
      A pytree like ``params``.
    """
    log_probs = jax.nn.log_softmax(logits_fn(params, x), axis=-1)
    probs = jnp.exp(log_probs)

    def class_term(label):
        def log_prob(p, xi):
            return jax.nn.log_softmax(logits_fn(p, xi[None]), axis=-1)[0, label]

        grads = jax.vmap(jax.grad(log_prob), in_axes=(None, 0))(params, x)
        weight = probs[:, label]
        return jax.tree.map(lambda g: jnp.tensordot(weight, jnp.square(g), axes=1) / x.shape[0], grads)

    terms = jax.lax.map(class_term, jnp.arange(probs.shape[-1]))
    return jax.tree.map(lambda t: jnp.sum(t, axis=0), terms)


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------

def _evaluate(params, base, static, data) -> dict[str, jax.Array]:
    x_old, y_old, x_new, y_new = data
    logits_old, logits_new = _models.apply(params, static, x_old), _models.apply(params, static, x_new)
    base_old = _models.apply(base, static, x_old)
    return {
        "old_task_accuracy": _train.accuracy(logits_old, y_old),
        "new_task_accuracy": _train.accuracy(logits_new, y_new),
        "old_task_accuracy_within_old_classes": _train.accuracy(logits_old[:, :NUM_OLD], y_old),
        "old_images_labelled_new": jnp.mean(jnp.argmax(logits_old, axis=-1) >= NUM_OLD),
        "kl_to_base_on_old_inputs": jnp.mean(discrete.kl_logits(base_old, logits_old)),
        # LwF's quantity at T = 1 on the old images: the old classes' distribution, renormalised
        "kl_within_old_classes_on_old_inputs": jnp.mean(
            discrete.kl_logits(base_old[:, :NUM_OLD], logits_old[:, :NUM_OLD])),
    }


def _split(config: Config):
    """Per seed: old/new training and test parts, stacked over seeds (shapes do not depend on the seed)."""
    parts = {key: [] for key in ("x_old", "y_old", "x_new", "y_new", "tx_old", "ty_old", "tx_new", "ty_new")}
    for s in range(config.seeds):
        (x, y), (tx, ty) = _data.digits_parts(config.seed + s, (0.7, 0.3))
        for prefix, xs, ys in (("", x, y), ("t", tx, ty)):
            old = ys < NUM_OLD
            parts[prefix + "x_old"].append(xs[old]), parts[prefix + "y_old"].append(ys[old])
            parts[prefix + "x_new"].append(xs[~old]), parts[prefix + "y_new"].append(ys[~old])
    return {key: jnp.asarray(np.stack(value)) for key, value in parts.items()}


@eqx.filter_jit
def _study(init, joint_init, static, data, coefficients, config: Config):
    """Base and joint models, the base's Fisher and every fine-tuning run, for one seed."""
    def logits(p, x):
        return _models.apply(p, static, x)

    # the base (old images only) and the joint reference (all images) as one vmapped fit of a weighted
    # cross-entropy: one compiled training loop instead of two
    x_all = jnp.concatenate([data["x_old"], data["x_new"]])
    y_all = jnp.concatenate([data["y_old"], data["y_new"]])
    num_old, num_all = data["x_old"].shape[0], x_all.shape[0]
    weights = jnp.stack([jnp.arange(num_all) < num_old, jnp.ones(num_all, bool)]).astype(jnp.float32)
    weights = weights / jnp.sum(weights, axis=1, keepdims=True)

    def weighted_fit(p, w):
        def loss(q):
            return jnp.sum(w * optax.softmax_cross_entropy_with_integer_labels(logits(q, x_all), y_all))

        return _train.fit(p, loss, steps=config.base_steps, learning_rate=3 * config.learning_rate)

    base, joint = _train.unstack(jax.vmap(weighted_fit)(_train.stack([init, joint_init]), weights))
    fisher = diagonal_fisher(logits, base, data["x_old"] if config.fisher_inputs == "old" else data["x_new"])
    x_new, y_new = data["x_new"], data["y_new"]
    base_new = logits(base, x_new)
    temperature = config.lwf_temperature
    test = (data["tx_old"], data["ty_old"], data["tx_new"], data["ty_new"])

    def finetune(c):
        def loss(p):
            z = logits(p, x_new)
            full = jnp.mean(discrete.kl_logits(base_new, z))
            lwf = jnp.mean(discrete.kl_logits(base_new[:, :NUM_OLD] / temperature, z[:, :NUM_OLD] / temperature))
            delta = jax.tree.map(jnp.subtract, p, base)
            ewc = 0.5 * sum(jnp.sum(f * d**2) for f, d in zip(jax.tree.leaves(fisher), jax.tree.leaves(delta)))
            l2 = 0.5 * sum(jnp.sum(d**2) for d in jax.tree.leaves(delta))
            return _train.cross_entropy(z, y_new) + c[0] * full + c[1] * lwf + c[2] * ewc + c[3] * l2

        return _train.fit(base, loss, steps=config.steps, learning_rate=config.learning_rate)

    # every model is evaluated by one vmapped call (one compiled evaluation, not three)
    models = jax.tree.map(lambda b, j, r: jnp.concatenate([b[None], j[None], r]), base, joint,
                          jax.vmap(finetune)(coefficients))
    scores = jax.vmap(lambda p: _evaluate(p, base, static, test))(models)
    output_fisher = fisher.layers[-1].weight  # (10, hidden): how much EWC restrains each class's output weights
    return {"base": _train.index_tree(scores, 0), "joint": _train.index_tree(scores, 1),
            "runs": _train.index_tree(scores, slice(2, None)),
            "fisher": {"output_weights_old_classes": jnp.mean(output_fisher[:NUM_OLD]),
                       "output_weights_new_classes": jnp.mean(output_fisher[NUM_OLD:])},
            "base_new_class_mass_on_new_inputs": jnp.mean(
                jnp.sum(jax.nn.softmax(base_new, axis=-1)[:, NUM_OLD:], axis=-1))}


def run(config: Config) -> dict:
    """Runs the study; returns the metrics (per-seed values, means and 95% intervals per run)."""
    if config.fisher_inputs not in ("old", "new"):
        raise ValueError(f"fisher_inputs must be 'old' or 'new', got {config.fisher_inputs!r}")
    runs = config.runs()
    coefficients = np.zeros((len(runs), len(METHODS)), np.float32)
    for i, (method, beta) in enumerate(runs):
        if method != "none":
            coefficients[i, METHODS.index(method)] = beta
    data = _split(config)
    seeds = [config.seed + s for s in range(config.seeds)]
    init, static = _models.init_mlps(seeds, 0, config.hidden, 1)
    joint_init, _ = _models.init_mlps(seeds, 1, config.hidden, 1)
    with _common.Timer() as timer:
        per_seed = jax.vmap(lambda i, j, d: _study(i, j, static, d, jnp.asarray(coefficients), config))(
            init, joint_init, data)
        per_seed = jax.tree.map(np.asarray, per_seed)  # (seeds,) and (seeds, runs) arrays

    def summary(values) -> dict:
        row = {}
        for name in METRICS:
            stats = _stats.summarise(values[name])
            row[name], row[name + "_ci95"], row[name + "_std"] = stats["mean"], stats["ci95"], stats["std"]
            row[name + "_seeds"] = [float(v) for v in values[name]]
        return row

    sweep = [{"method": method, "beta": beta, **summary({k: v[:, i] for k, v in per_seed["runs"].items()})}
             for i, (method, beta) in enumerate(runs)]
    return {
        "config": {**dataclasses.asdict(config), "num_params": int(sum(leaf[0].size for leaf in jax.tree.leaves(init))),
                   "penalty_inputs": "new-task (digits 5-9) training inputs (kl_full, lwf)"},
        "base": summary(per_seed["base"]),
        "joint_training": summary(per_seed["joint"]),
        "sweep": sweep,
        "fisher": {name: _stats.summarise(values) for name, values in per_seed["fisher"].items()},
        "base_new_class_mass_on_new_inputs": _stats.summarise(per_seed["base_new_class_mass_on_new_inputs"]),
        "seconds": timer.seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    config, args = _common.parse_config(Config, "finetune_kl", __doc__.splitlines()[0], argv)
    metrics = run(config)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _plot(metrics, args.out)
    return metrics


# ----------------------------------------------------------------------------------------------
# Figure and report
# ----------------------------------------------------------------------------------------------

LABELS = {"none": "no penalty", "kl_full": "full 10-way KL (new inputs)", "lwf": "LwF (old classes only)",
          "ewc": "EWC (diagonal Fisher)", "l2": "L2 to base weights"}
STYLES = {"kl_full": "o-", "lwf": "s-", "ewc": "^-", "l2": "d--"}


def _plot(metrics: dict, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    none = metrics["sweep"][0]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), sharex=True)
    for ax, old_key, title in ((axes[0], "old_task_accuracy", "class-incremental: argmax over all 10 classes"),
                               (axes[1], "old_task_accuracy_within_old_classes",
                                "task-incremental: old images, argmax over 0-4")):
        for method in METHODS:
            rows = [none] + [r for r in metrics["sweep"] if r["method"] == method]
            ax.errorbar([r["new_task_accuracy"] for r in rows], [r[old_key] for r in rows],
                        xerr=[r["new_task_accuracy_ci95"] for r in rows], yerr=[r[old_key + "_ci95"] for r in rows],
                        fmt=STYLES[method], ms=4, capsize=2, lw=1, label=LABELS[method])
            for r in rows[1:]:
                ax.annotate(f"{r['beta']:g}", (r["new_task_accuracy"], r[old_key]), textcoords="offset points",
                            xytext=(3, 3), fontsize=6)
        ax.plot([none["new_task_accuracy"]], [none[old_key]], "kx", ms=9, mew=2, label="no penalty (beta = 0)")
        joint = metrics["joint_training"]
        ax.plot([joint["new_task_accuracy"]], [joint[old_key]], "k*", ms=11, label="joint training (old data kept)")
        ax.set_xlabel("new-task accuracy (digits 5-9, 10-way)")
        ax.set_ylabel("old-task accuracy (digits 0-4)")
        ax.set_title(title, fontsize=9)
        ax.set_ylim(top=1.01)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"mean and 95% interval over {metrics['config']['seeds']} seeds; labels: beta", fontsize=9)
    _common.save_figure(fig, out_dir, "tradeoff")


def _balance(row: dict) -> list[float]:
    return [(a + b) / 2 for a, b in zip(row["old_task_accuracy_seeds"], row["new_task_accuracy_seeds"])]


def reading(metrics: dict) -> list[str]:
    """The conclusions, each computed from the per-seed numbers (Welch tests at p < 0.05)."""
    sweep, base, joint = metrics["sweep"], metrics["base"], metrics["joint_training"]
    none = sweep[0]
    by_method = {m: [r for r in sweep if r["method"] == m] for m in METHODS}
    out = []

    def ci(row, key):
        return f"{row[key]:.3f} ± {row[key + '_ci95']:.3f}"

    lost_to_new_classes = none["old_task_accuracy_within_old_classes"] - none["old_task_accuracy"]
    lost_within_old = base["old_task_accuracy_within_old_classes"] - none["old_task_accuracy_within_old_classes"]
    out.append(
        f"Plain fine-tuning reaches new-task accuracy {ci(none, 'new_task_accuracy')} and keeps "
        f"{ci(none, 'old_task_accuracy')} of the old images correct out of {ci(base, 'old_task_accuracy')} "
        f"before; {ci(none, 'old_images_labelled_new')} of the old images are now labelled as a new class, "
        f"while the argmax over the old classes alone gets {ci(none, 'old_task_accuracy_within_old_classes')}. "
        + (f"Most of the loss ({lost_to_new_classes:.3f} of {lost_to_new_classes + lost_within_old:.3f}) is the "
           "old-versus-new decision, not the ranking among the old classes."
           if lost_to_new_classes > lost_within_old else
           f"The ranking among the old classes lost {lost_within_old:.3f}, the old-versus-new decision "
           f"{lost_to_new_classes:.3f}."))
    strongest = by_method["kl_full"][-1] if by_method["kl_full"] else None
    if strongest is not None:
        p = _stats.welch_p(strongest["new_task_accuracy_seeds"], none["new_task_accuracy_seeds"])
        conflict = p < _stats.SIGNIFICANCE and strongest["new_task_accuracy"] < none["new_task_accuracy"]
        out.append(
            f"The full 10-way KL on the new images at beta = {strongest['beta']:g}: new-task accuracy "
            f"{ci(strongest, 'new_task_accuracy')} (old {ci(strongest, 'old_task_accuracy')}); "
            + ("it contradicts the new-task loss: the base gives the new classes a total mass of "
               f"{metrics['base_new_class_mass_on_new_inputs']['mean']:.2g} on the new images, and the KL pulls "
               "the fine-tuned model towards that."
               if conflict else "no significant loss of new-task accuracy against no penalty at this beta."))
    chosen = {}
    for method in METHODS:
        if not by_method[method]:
            continue
        row = max(by_method[method], key=lambda r: np.mean(_balance(r)))
        chosen[method] = row
        out.append(
            f"{LABELS[method]}, best balance at beta = {row['beta']:g} (chosen on the test means, optimistic "
            f"alike for every method): old {ci(row, 'old_task_accuracy')}, new {ci(row, 'new_task_accuracy')}, "
            f"old images labelled new {ci(row, 'old_images_labelled_new')}. "
            + _stats.compare(_balance(row), _balance(none), LABELS[method], "no penalty",
                             "mean of old and new accuracy")
            + " " + _stats.compare(row["old_task_accuracy_seeds"], none["old_task_accuracy_seeds"], LABELS[method],
                                   "no penalty", "old-task accuracy"))
    fisher = metrics["fisher"]
    ratio = fisher["output_weights_new_classes"]["mean"] / fisher["output_weights_old_classes"]["mean"]
    out.append(
        f"EWC's Fisher (on the {metrics['config']['fisher_inputs']}-task inputs) of the new classes' output weights "
        f"averages {fisher['output_weights_new_classes']['mean']:.2g}, {ratio:.2g} times that of the old classes' "
        f"({fisher['output_weights_old_classes']['mean']:.2g}): EWC restrains the new-class outputs that much less.")
    for method in ("lwf", "ewc"):
        if method in chosen:
            row = chosen[method]
            out.append("Task-incremental score (argmax over 0-4): " + _stats.compare(
                row["old_task_accuracy_within_old_classes_seeds"], none["old_task_accuracy_within_old_classes_seeds"],
                LABELS[method], "no penalty", "old-task accuracy within the old classes"))
    if chosen:
        best = max(chosen.values(), key=lambda r: np.mean(_balance(r)))
        joint_balance = _balance(joint)
        out.append(
            f"Class-incremental verdict: the best data-free run ({LABELS[best['method']]}, beta = {best['beta']:g}) "
            f"reaches a mean accuracy of {np.mean(_balance(best)):.3f}; joint training with the old data reaches "
            f"{np.mean(joint_balance):.3f} (old {ci(joint, 'old_task_accuracy')}, "
            f"new {ci(joint, 'new_task_accuracy')}). "
            + _stats.compare(_balance(best), joint_balance, "that run", "joint training",
                             "mean of old and new accuracy"))
    return [line[:1].upper() + line[1:] for line in out]


def report(metrics: dict, rel_dir: pathlib.Path) -> str:
    config, base = metrics["config"], metrics["base"]
    header = ["method", "beta", "old-task acc", "new-task acc", "old acc (argmax 0-4)", "old labelled new",
              "KL(base||theta) old inputs", "KL within 0-4, old inputs"]

    def cell(row, key):
        return f"{row[key]:.3f} ± {row[key + '_ci95']:.3f}"

    rows = [[LABELS[r["method"]], f"{r['beta']:g}"] + [cell(r, k) for k in METRICS] for r in metrics["sweep"]]
    rows.append(["joint training (reference)", "-"] + [cell(metrics["joint_training"], k) for k in METRICS])
    return "\n\n".join([
        f"MLP 64-{config['hidden']}-10 ({config['num_params']} parameters) trained on digits 0-4 (old-task test "
        f"accuracy {cell(base, 'old_task_accuracy')}), then fine-tuned {config['steps']} full-batch Adam steps on "
        f"digits 5-9 alone, with each method's penalty times beta. Class-incremental evaluation (argmax over all "
        f"10 classes) on held-out images; mean ± 95% t-interval over {config['seeds']} seeds (split and "
        f"initialisation). LwF at T = {config['lwf_temperature']:g}; EWC's Fisher is taken on "
        f"the {config['fisher_inputs']}-task training inputs.",
        _common.markdown_table(header, rows),
        "**Reading** (computed from the per-seed values; Welch t-tests, p < 0.05, uncorrected):\n\n"
        + "\n".join(f"- {line}" for line in reading(metrics)),
        f"![old vs new accuracy per method]({rel_dir}/tradeoff.png)",
    ])


if __name__ == "__main__":
    _common.run_main(main)
