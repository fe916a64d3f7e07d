"""KL-regularised fine-tuning against catastrophic forgetting, on scikit-learn's bundled digits.

    python -m experiments.finetune_kl [--quick] [--out results/finetune_kl]
    python -m experiments.finetune_kl --betas 0,1,10 --l2 0,0.1 --seeds 2 --steps 300

A 64-128-10 MLP (optax Adam, full-batch) is trained on digits 0-4 (the "old task"; the output layer
has all 10 classes from the start). It is then fine-tuned on digits 5-9 only (the "new task"); the old
data is unavailable during fine-tuning. The fine-tuning loss is

    cross-entropy on 5-9  +  beta * mean_x KL(p_base(. | x) || p_theta(. | x)),

where the KL is over the 10-way predictive distributions (``kljax.discrete.kl_logits``) and x runs over
the fine-tuning (new-task) inputs: the only inputs available. With beta = 0 the new-class logits rise
everywhere and the old classes are suppressed (forgetting); the forward KL keeps p_theta covering the
old classes' mass wherever the base model put it. Baseline: an L2 pull to the base weights,
``lam / 2 * ||theta - theta_base||^2`` (the isotropic special case of EWC, Kirkpatrick et al., 2017).
Each sweep is ``jax.vmap``-ed over its coefficients in one jitted training run.

Metrics: old-task accuracy (10-way argmax on the test images of 0-4), new-task accuracy (10-way argmax
on the test images of 5-9), the old-task accuracy when the argmax is restricted to classes 0-4 (are the
old features still there, only outvoted?), and the mean KL(p_base || p_theta) on old-task test inputs.
Means (and standard deviations) over ``--seeds`` train/test splits and initialisations.

References: Z. Li and D. Hoiem, "Learning without forgetting", ECCV 2016 (distillation on new-task
inputs); J. Kirkpatrick et al., "Overcoming catastrophic forgetting in neural networks", PNAS 2017.
"""

from __future__ import annotations

import functools
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _common
from kljax import discrete

TITLE = "KL-regularised fine-tuning: forgetting vs beta (digits 0-4 -> 5-9)"
ORDER = 61

FULL = dict(betas=[0.0, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0, 30.0], l2=[0.0, 0.001, 0.01, 0.1, 1.0, 10.0],
            seeds=3, steps=400)
QUICK = dict(betas=[0.0, 0.3, 3.0, 30.0], l2=[0.0, 0.01, 1.0], seeds=1, steps=200)


# ----------------------------------------------------------------------------------------------
# Data and a small MLP (shared with experiments.distill_kl)
# ----------------------------------------------------------------------------------------------

def load_digits_split(seed: int, test_fraction: float = 0.3):
    """Digits scaled to [0, 1], split stratified: (x_train, y_train, x_test, y_test) as float32/int32."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    digits = load_digits()
    x = (digits.data / 16.0).astype(np.float32)
    y = digits.target.astype(np.int32)
    x_train, x_test, y_train, y_test = train_test_split(
        x, y, test_size=test_fraction, stratify=y, random_state=seed)
    return x_train, y_train, x_test, y_test


def init_mlp(key, sizes) -> list[tuple[jax.Array, jax.Array]]:
    """He-initialised (weights, bias) per layer for layer widths ``sizes`` (float32)."""
    params = []
    for key, (fan_in, fan_out) in zip(jax.random.split(key, len(sizes) - 1), zip(sizes[:-1], sizes[1:])):
        weights = jax.random.normal(key, (fan_in, fan_out), jnp.float32) * jnp.sqrt(2.0 / fan_in)
        params.append((weights, jnp.zeros(fan_out, jnp.float32)))
    return params


def mlp_logits(params, x) -> jax.Array:
    """ReLU MLP on a batch x of shape (n, features); the last layer is linear (logits)."""
    for weights, bias in params[:-1]:
        x = jax.nn.relu(x @ weights + bias[None, :])
    weights, bias = params[-1]
    return x @ weights + bias[None, :]


def cross_entropy(logits, labels) -> jax.Array:
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))


def train(params, loss_fn, *, steps: int, learning_rate: float):
    """Full-batch Adam for ``steps`` steps (``lax.scan``, so it can be vmapped and jitted)."""
    optimizer = optax.adam(learning_rate)

    def step(carry, _):
        params, opt_state = carry
        grads = jax.grad(loss_fn)(params)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return (optax.apply_updates(params, updates), opt_state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), None, length=steps)
    return params


def accuracy(logits, labels) -> jax.Array:
    return jnp.mean(jnp.argmax(logits, axis=-1) == labels)


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------

NUM_OLD = 5  # classes 0-4 are the old task, 5-9 the new one
HIDDEN = 128
BASE_STEPS = 300
LEARNING_RATE = 1e-3


def _evaluate(params, base_params, data) -> dict[str, jax.Array]:
    x_old, y_old, x_new, y_new = data
    logits_old, logits_new = mlp_logits(params, x_old), mlp_logits(params, x_new)
    base_old = mlp_logits(base_params, x_old)
    return {
        "old_task_accuracy": accuracy(logits_old, y_old),
        "new_task_accuracy": accuracy(logits_new, y_new),
        "old_task_accuracy_within_old_classes": accuracy(logits_old[:, :NUM_OLD], y_old),
        "kl_to_base_on_old_inputs": jnp.mean(discrete.kl_logits(base_old, logits_old)),
    }


@functools.partial(jax.jit, static_argnames=("steps", "penalty"))
def _finetune_sweep(base_params, coefficients, x_train_new, y_train_new, test_data, *, steps: int,
                    penalty: str):
    """Fine-tunes from the base for every coefficient (vmapped) and evaluates each result."""
    base_logits = mlp_logits(base_params, x_train_new)  # p_base on the fine-tuning inputs, fixed

    def finetune(coefficient):
        def loss(params):
            logits = mlp_logits(params, x_train_new)
            task = cross_entropy(logits, y_train_new)
            if penalty == "kl":
                # forward KL(p_base || p_theta), averaged over the new-task inputs
                return task + coefficient * jnp.mean(discrete.kl_logits(base_logits, logits))
            squared = sum(jnp.sum((a - b) ** 2) for a, b in
                          zip(jax.tree.leaves(params), jax.tree.leaves(base_params)))
            return task + 0.5 * coefficient * squared

        params = train(base_params, loss, steps=steps, learning_rate=LEARNING_RATE)
        return _evaluate(params, base_params, test_data)

    return jax.vmap(finetune)(coefficients)


def run_seed(seed: int, betas, l2s, steps: int) -> dict:
    """Base model, joint-training reference and both sweeps for one split / initialisation."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    old_train, old_test = y_train < NUM_OLD, y_test < NUM_OLD
    test_data = (x_test[old_test], y_test[old_test], x_test[~old_test], y_test[~old_test])
    init_key, joint_key = jax.random.split(jax.random.key(seed))
    init = init_mlp(init_key, (64, HIDDEN, 10))

    base = jax.jit(lambda p: train(p, lambda q: cross_entropy(mlp_logits(q, x_train[old_train]),
                                                              y_train[old_train]),
                                   steps=BASE_STEPS, learning_rate=3 * LEARNING_RATE))(init)
    joint = jax.jit(lambda p: train(p, lambda q: cross_entropy(mlp_logits(q, x_train), y_train),
                                    steps=BASE_STEPS, learning_rate=3 * LEARNING_RATE))(
        init_mlp(joint_key, (64, HIDDEN, 10)))
    x_new, y_new = x_train[~old_train], y_train[~old_train]
    kl_results = _finetune_sweep(base, jnp.asarray(betas, jnp.float32), x_new, y_new, test_data,
                                 steps=steps, penalty="kl")
    l2_results = _finetune_sweep(base, jnp.asarray(l2s, jnp.float32), x_new, y_new, test_data,
                                 steps=steps, penalty="l2")
    return {
        "base": {k: float(v) for k, v in _evaluate(base, base, test_data).items()},
        "joint": {k: float(v) for k, v in _evaluate(joint, base, test_data).items()},
        "kl": {k: np.asarray(v) for k, v in kl_results.items()},
        "l2": {k: np.asarray(v) for k, v in l2_results.items()},
    }


def _summarise(per_seed: list[dict], part: str, name: str, values) -> list[dict]:
    rows = []
    for i, value in enumerate(values):
        row = {name: float(value)}
        for metric in per_seed[0][part]:
            samples = np.array([seed[part][metric][i] for seed in per_seed])
            row[metric] = float(samples.mean())
            row[metric + "_std"] = float(samples.std(ddof=1)) if len(samples) > 1 else 0.0
        rows.append(row)
    return rows


def main(argv: list[str] | None = None) -> dict:
    p = _common.parser("finetune_kl", __doc__.splitlines()[0])
    p.add_argument("--betas", type=_common.float_list, help="KL coefficients (include 0)")
    p.add_argument("--l2", type=_common.float_list, help="L2-to-base coefficients")
    p.add_argument("--seeds", type=int, help="number of splits / initialisations")
    p.add_argument("--steps", type=int, help="fine-tuning steps")
    args = p.parse_args(argv)
    config = _common.scaled_config(args, QUICK, FULL)

    with _common.Timer() as timer:
        per_seed = [run_seed(args.seed + s, config["betas"], config["l2"], config["steps"])
                    for s in _common.progress(range(config["seeds"]), desc="finetune_kl seeds",
                                              disable=args.no_progress)]
    metrics = {
        "config": {**config, "hidden": HIDDEN, "base_steps": BASE_STEPS, "learning_rate": LEARNING_RATE,
                   "kl_inputs": "new-task (digits 5-9) training inputs", "quick": args.quick},
        "base": {k: float(np.mean([s["base"][k] for s in per_seed])) for k in per_seed[0]["base"]},
        "joint_training": {k: float(np.mean([s["joint"][k] for s in per_seed])) for k in per_seed[0]["joint"]},
        "sweep": _summarise(per_seed, "kl", "beta", config["betas"]),
        "l2_sweep": _summarise(per_seed, "l2", "l2", config["l2"]),
        "seconds": timer.seconds,
    }
    _common.save_metrics(args.out, metrics)
    _plot(metrics, args.out)
    return metrics


def _plot(metrics: dict, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    fig, (ax_trade, ax_beta) = plt.subplots(1, 2, figsize=(11, 4.2))
    for rows, key, label, style in ((metrics["sweep"], "beta", "KL(p_base || p_theta), beta", "o-"),
                                    (metrics["l2_sweep"], "l2", "L2 to base weights, lambda", "s--")):
        new = [r["new_task_accuracy"] for r in rows]
        old = [r["old_task_accuracy"] for r in rows]
        ax_trade.plot(new, old, style, label=label)
        for r, a, b in zip(rows, new, old):
            ax_trade.annotate(f"{r[key]:g}", (a, b), textcoords="offset points", xytext=(4, 4), fontsize=7)
    joint = metrics["joint_training"]
    ax_trade.plot([joint["new_task_accuracy"]], [joint["old_task_accuracy"]], "k*", ms=10,
                  label="joint training (old data available)")
    ax_trade.set_xlabel("new-task accuracy (digits 5-9, 10-way)")
    ax_trade.set_ylabel("old-task accuracy (digits 0-4, 10-way)")
    ax_trade.set_title("forgetting trade-off")
    ax_trade.legend(fontsize=8)
    betas = [max(r["beta"], 1e-3) for r in metrics["sweep"]]
    for key, label in (("old_task_accuracy", "old task"), ("new_task_accuracy", "new task"),
                       ("old_task_accuracy_within_old_classes", "old task, argmax over 0-4")):
        ax_beta.plot(betas, [r[key] for r in metrics["sweep"]], "o-", label=label)
    ax_beta.set_xscale("log")
    ax_beta.set_xlabel("beta (0 drawn at 1e-3)")
    ax_beta.set_ylabel("accuracy")
    ax_beta.set_title("KL penalty on new-task inputs")
    ax_beta.legend(fontsize=8)
    _common.save_figure(fig, out_dir, "tradeoff")


def report(metrics: dict, rel_dir: pathlib.Path) -> str:
    header = ["coefficient", "old-task acc", "new-task acc", "old acc (argmax 0-4)", "KL(base||theta) old inputs"]

    def rows(sweep, key):
        return [[f"{key} = {r[key]:g}", r["old_task_accuracy"], r["new_task_accuracy"],
                 r["old_task_accuracy_within_old_classes"], r["kl_to_base_on_old_inputs"]] for r in sweep]

    base, joint, config = metrics["base"], metrics["joint_training"], metrics["config"]
    return "\n\n".join([
        f"MLP 64-{config['hidden']}-10 trained on digits 0-4 (old-task accuracy {base['old_task_accuracy']:.3f}), "
        f"fine-tuned {config['steps']} Adam steps on digits 5-9 with beta * KL(p_base || p_theta) on the "
        f"{config['kl_inputs']}; means over {config['seeds']} seed(s). Joint training on all digits reaches "
        f"old {joint['old_task_accuracy']:.3f} / new {joint['new_task_accuracy']:.3f}.",
        _common.markdown_table(header, rows(metrics["sweep"], "beta") + rows(metrics["l2_sweep"], "l2"),
                               float_format="{:.3f}"),
        f"![old vs new accuracy]({rel_dir}/tradeoff.png)",
    ])


if __name__ == "__main__":
    _common.run_main(main)
