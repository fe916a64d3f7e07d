"""A VAE on scikit-learn's 8x8 digits: closed-form KL term vs Monte Carlo (k1) KL term.

Data: the 1797 8x8 digits scaled to [0, 1] and binarised at 0.5 (so the Bernoulli likelihood is a proper
density and the ELBO a bound on log p(x)); a stratified 80/20 train/test split.
Model: z ~ N(0, I_2); x | z ~ Bernoulli(decoder(z)) on 64 pixels; q(z | x) = N(mu(x), diag sigma(x)^2);
one-hidden-layer MLP encoder and decoder. Trained by Adam on the single-sample reparameterised ELBO

    log p(x | z) - KL(q(z | x) || p(z)),   z = mu + sigma * eps,

with the KL term either in closed form (kljax.analytic.kl; Kingma and Welling 2014's estimator L^B) or
estimated from the same z with kljax.mc.k1: log q(z | x) - log p(z) (their L^A). Both are unbiased
for the ELBO and its gradient; the closed form removes the KL term's sampling noise. Only encoder
gradients differ (the decoder never sees the KL term), so gradient variance is reported per part.
Test ELBOs use the same estimator for both runs: closed-form KL and 16 draws for log p(x | z).

    python -m experiments.vae_digits [--quick] --out results/vae_digits

References:
    Kingma, Welling (2014). Auto-Encoding Variational Bayes. ICLR. https://arxiv.org/abs/1312.6114
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments._common import (Timer, markdown_table, parser, progress, run_main, save_figure,
                                 save_metrics)
from kljax import analytic, distributions, mc

TITLE = "VAE on 8x8 digits: closed-form vs Monte Carlo KL term"
ORDER = 53

KL_TERMS = ("closed_form", "monte_carlo_k1")
LATENT = 2
PIXELS = 64


def load_data(seed: int):
    """Binarised digits (float) and labels, split 80/20 stratified."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    images, labels = load_digits(return_X_y=True)
    binary = (images / 16.0 >= 0.5).astype(np.float64)
    return train_test_split(binary, labels, test_size=0.2, random_state=seed, stratify=labels)


def init_params(key, hidden, dtype):
    """Encoder 64 -> hidden -> (mu, log sigma) and decoder 2 -> hidden -> 64 logits (Glorot normal)."""
    def dense(key, fan_in, fan_out):
        scale = math.sqrt(2.0 / (fan_in + fan_out))
        return {"w": scale * jax.random.normal(key, (fan_in, fan_out), dtype), "b": jnp.zeros(fan_out, dtype)}
    keys = jax.random.split(key, 4)
    return {"encoder": [dense(keys[0], PIXELS, hidden), dense(keys[1], hidden, 2 * LATENT)],
            "decoder": [dense(keys[2], LATENT, hidden), dense(keys[3], hidden, PIXELS)]}


def _mlp(layers, x):
    hidden = jnp.tanh(x @ layers[0]["w"] + layers[0]["b"])
    return hidden @ layers[1]["w"] + layers[1]["b"]


def encode(params, x):
    """q(z | x) for one image x of shape (64,)."""
    out = _mlp(params["encoder"], x)
    return distributions.MultivariateNormalDiag(out[:LATENT], jnp.exp(out[LATENT:]))


def decode(params, z):
    """Bernoulli logits of the 64 pixels for one latent z of shape (2,)."""
    return _mlp(params["decoder"], z)


def _prior(dtype):
    return distributions.MultivariateNormalDiag(jnp.zeros(LATENT, dtype), jnp.ones(LATENT, dtype))


def example_elbo(params, x, key, kl_term):
    """Single-sample ELBO estimate for one image with the named KL term."""
    q = encode(params, x)
    prior = _prior(x.dtype)
    z = q.sample(key)
    reconstruction = jnp.sum(distributions.Bernoulli(decode(params, z)).log_prob(x))
    if kl_term == "closed_form":
        kl = analytic.kl(q, prior)
    elif kl_term == "monte_carlo_k1":
        kl = mc.k1(q.log_prob(z), prior.log_prob(z))
    else:
        raise ValueError(f"unknown kl_term {kl_term!r}")
    return reconstruction - kl


def batch_loss(params, images, key, kl_term):
    """Negative mean ELBO estimate over a minibatch (one eps per image)."""
    keys = jax.random.split(key, images.shape[0])
    elbos = jax.vmap(lambda x, k: example_elbo(params, x, k, kl_term))(images, keys)
    return -jnp.mean(elbos)


@jax.jit
def evaluate(params, images, key, num_draws=16):
    """Mean test ELBO (closed-form KL, ``num_draws`` draws for log p(x | z)) and its two parts."""
    def one(x, key):
        q = encode(params, x)
        z = q.sample(key, (num_draws,))
        reconstruction = jnp.mean(jax.vmap(
            lambda z: jnp.sum(distributions.Bernoulli(decode(params, z)).log_prob(x)))(z))
        return reconstruction, analytic.kl(q, _prior(x.dtype))
    reconstruction, kl = jax.vmap(one)(images, jax.random.split(key, images.shape[0]))
    return jnp.mean(reconstruction - kl), jnp.mean(reconstruction), jnp.mean(kl)


@functools.partial(jax.jit, static_argnames="kl_term")
def _per_draw_gradients(params, images, keys, kl_term):
    return jax.vmap(lambda k: jax.grad(batch_loss)(params, images, k, kl_term))(keys)


def gradient_variance(params, images, key, kl_term, num_draws):
    """Summed per-parameter variance of the minibatch gradient over ``num_draws`` eps draws (batch fixed).

    Returns a dict with the encoder, decoder and total sums.
    """
    grads = _per_draw_gradients(params, images, jax.random.split(key, num_draws), kl_term)
    part = lambda tree: float(sum(np.asarray(leaf).var(axis=0, ddof=1).sum() for leaf in jax.tree.leaves(tree)))
    encoder, decoder = part(grads["encoder"]), part(grads["decoder"])
    return {"encoder": encoder, "decoder": decoder, "total": encoder + decoder}


@jax.jit
def latent_means(params, images):
    """Means of q(z | x) for a batch of images."""
    return jax.vmap(lambda x: encode(params, x).loc)(images)


@jax.jit
def reconstruct(params, images):
    """Pixel probabilities decoded from the latent means."""
    return jax.nn.sigmoid(jax.vmap(lambda z: decode(params, z))(latent_means(params, images)))


def train(key, kl_term, x_train, x_test, *, epochs, batch_size, learning_rate, hidden, eval_every,
          checkpoints, disable_progress=True):
    """Adam training; returns final params, curves and the params at the ``checkpoints`` epochs."""
    dtype = x_train.dtype
    init_key, key = jax.random.split(key)
    params = jax.jit(init_params, static_argnums=(1, 2))(init_key, hidden, dtype)
    optimizer = optax.adam(learning_rate)
    state = optimizer.init(params)
    num_batches = x_train.shape[0] // batch_size

    @jax.jit
    def epoch(params, state, key):
        perm_key, step_key = jax.random.split(key)
        order = jax.random.permutation(perm_key, x_train.shape[0])[:num_batches * batch_size]
        batches = order.reshape(num_batches, batch_size)

        def step(carry, inputs):
            params, state = carry
            index, k = inputs
            loss, grads = jax.value_and_grad(batch_loss)(params, x_train[index], k, kl_term)
            updates, state = optimizer.update(grads, state, params)
            return (optax.apply_updates(params, updates), state), -loss
        (params, state), elbos = jax.lax.scan(step, (params, state),
                                              (batches, jax.random.split(step_key, num_batches)))
        return params, state, elbos

    saved = {0: params} if 0 in checkpoints else {}
    train_curve, test_curve = [], []
    eval_key = jax.random.key(12345)  # the same eps for every evaluation and both runs
    for e in progress(range(1, epochs + 1), desc=f"VAE {kl_term}", total=epochs, disable=disable_progress):
        params, state, elbos = epoch(params, state, jax.random.fold_in(key, e))
        train_curve.append(np.asarray(elbos))
        if e % eval_every == 0 or e == epochs:
            elbo, reconstruction, kl = evaluate(params, x_test, eval_key)
            test_curve.append({"epoch": e, "elbo": float(elbo), "reconstruction": float(reconstruction),
                               "kl": float(kl)})
        if e in checkpoints:
            saved[e] = params
    return params, np.concatenate(train_curve), test_curve, saved


def _parse(argv):
    p = parser("vae_digits", __doc__.splitlines()[0])
    p.add_argument("--epochs", type=int, default=None, help="training epochs (default 400; quick 60)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--learning-rate", type=float, default=3e-3)
    p.add_argument("--hidden", type=int, default=128, help="hidden units of encoder and decoder")
    p.add_argument("--grad-draws", type=int, default=None,
                   help="eps draws per gradient-variance estimate (default 256; quick 64)")
    args = p.parse_args(argv)
    if args.epochs is None:
        args.epochs = 60 if args.quick else 400
    if args.grad_draws is None:
        args.grad_draws = 64 if args.quick else 256
    return args


def main(argv: list[str] | None = None) -> dict:
    args = _parse(argv)
    dtype = jnp.result_type(float)
    x_train, x_test, y_train, y_test = load_data(args.seed)
    x_train, x_test = jnp.asarray(x_train, dtype), jnp.asarray(x_test, dtype)
    checkpoints = sorted({0, max(1, args.epochs // 10), args.epochs // 2, args.epochs})
    eval_every = max(1, args.epochs // 30)
    key = jax.random.key(args.seed)
    # Same initialisation and minibatch order for both runs: only the KL term differs.
    train_key, variance_key = jax.random.split(key)
    fixed_batch = x_train[:args.batch_size]

    runs, final_params = {}, {}
    for kl_term in KL_TERMS:
        with Timer() as timer:
            params, train_curve, test_curve, saved = train(
                train_key, kl_term, x_train, x_test, epochs=args.epochs, batch_size=args.batch_size,
                learning_rate=args.learning_rate, hidden=args.hidden, eval_every=eval_every,
                checkpoints=checkpoints, disable_progress=args.no_progress)
        variances = []
        for epoch in checkpoints:
            # Both estimators at the same parameters, batch and eps draws.
            row = {"epoch": epoch}
            for estimator in KL_TERMS:
                row[estimator] = gradient_variance(saved[epoch], fixed_batch,
                                                   jax.random.fold_in(variance_key, epoch), estimator,
                                                   args.grad_draws)
            variances.append(row)
        final_params[kl_term] = params
        runs[kl_term] = {
            "seconds": timer.seconds,
            "test_elbo": test_curve[-1]["elbo"],
            "test_reconstruction": test_curve[-1]["reconstruction"],
            "test_kl": test_curve[-1]["kl"],
            "train_elbo_last_epoch": float(np.mean(train_curve[-(x_train.shape[0] // args.batch_size):])),
            "test_curve": test_curve,
            "train_curve_per_epoch": [float(v) for v in np.mean(
                train_curve.reshape(args.epochs, -1), axis=1)],
            "gradient_variance": variances,
        }

    metrics = {
        "config": {"epochs": args.epochs, "batch_size": args.batch_size, "learning_rate": args.learning_rate,
                   "hidden": args.hidden, "latent": LATENT, "grad_draws": args.grad_draws,
                   "checkpoints": checkpoints, "seed": args.seed, "num_train": int(x_train.shape[0]),
                   "num_test": int(x_test.shape[0]), "likelihood": "Bernoulli on pixels binarised at 0.5"},
        "runs": runs,
    }
    save_metrics(args.out, metrics)
    _figures(metrics, final_params, x_test, np.asarray(y_test), args.out)
    return metrics


def _figures(metrics, final_params, x_test, y_test, out_dir):
    import matplotlib.pyplot as plt

    runs = metrics["runs"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    for kl_term, color in zip(KL_TERMS, ("C0", "C3")):
        run = runs[kl_term]
        epochs = np.arange(1, len(run["train_curve_per_epoch"]) + 1)
        axes[0].plot(epochs, run["train_curve_per_epoch"], color=color, alpha=0.5, lw=1,
                     label=f"{kl_term}: train (its own estimator)")
        axes[0].plot([c["epoch"] for c in run["test_curve"]], [c["elbo"] for c in run["test_curve"]],
                     "o-", ms=3, color=color, label=f"{kl_term}: test (closed-form KL)")
        checkpoints = [row["epoch"] for row in run["gradient_variance"]]
        for estimator, marker in zip(KL_TERMS, ("o", "s")):
            axes[1].semilogy(checkpoints, [row[estimator]["encoder"] for row in run["gradient_variance"]],
                             marker=marker, color=color, ls="-" if estimator == "closed_form" else "--",
                             label=f"params of {kl_term} run, {estimator} gradient")
    final = [runs[k]["test_elbo"] for k in KL_TERMS]
    axes[0].set_ylim(min(final) - 15, max(final) + 5)
    axes[0].set(xlabel="epoch", ylabel="ELBO per image (nats)", title="ELBO")
    axes[0].legend(fontsize=8)
    axes[1].set(xlabel="epoch (checkpoint)", ylabel="summed variance of encoder gradients",
                title="gradient variance (fixed minibatch, eps redrawn)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    save_figure(fig, out_dir, "elbo_and_gradient_variance")

    shown = 10
    fig, axes = plt.subplots(1 + len(KL_TERMS), shown, figsize=(shown, 1.1 * (1 + len(KL_TERMS))))
    rows = [("data", x_test[:shown])]
    for kl_term in KL_TERMS:
        rows.append((kl_term, reconstruct(final_params[kl_term], x_test[:shown])))
    for r, (name, images) in enumerate(rows):
        for c in range(shown):
            axes[r, c].imshow(np.asarray(images[c]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(name, fontsize=7, loc="left")
    save_figure(fig, out_dir, "reconstructions")

    fig, axes = plt.subplots(1, len(KL_TERMS), figsize=(6 * len(KL_TERMS), 5))
    for ax, kl_term in zip(axes, KL_TERMS):
        means = np.asarray(latent_means(final_params[kl_term], x_test))
        scatter = ax.scatter(means[:, 0], means[:, 1], c=y_test, cmap="tab10", s=8, vmin=-0.5, vmax=9.5)
        ax.set(title=f"test-set latent means, {kl_term} KL", xlabel="z1", ylabel="z2")
    fig.colorbar(scatter, ax=axes, ticks=range(10), label="digit")
    save_figure(fig, out_dir, "latent")


def report(metrics: dict, rel_dir) -> str:
    runs = metrics["runs"]
    elbo_rows = [[k, runs[k]["test_elbo"], runs[k]["test_reconstruction"], runs[k]["test_kl"],
                  runs[k]["train_elbo_last_epoch"], runs[k]["seconds"]] for k in KL_TERMS]
    elbos = markdown_table(["KL term in training", "test ELBO", "test reconstruction E_q log p(x ∣ z)", "test KL",
                            "train ELBO (last epoch)", "seconds"], elbo_rows)
    variance_rows = []
    for kl_term in KL_TERMS:
        for row in runs[kl_term]["gradient_variance"]:
            closed, monte_carlo = row["closed_form"], row["monte_carlo_k1"]
            variance_rows.append([kl_term, row["epoch"], closed["encoder"], monte_carlo["encoder"],
                                  monte_carlo["encoder"] / closed["encoder"], closed["decoder"]])
    variances = markdown_table(["run", "epoch", "encoder Var, closed-form KL", "encoder Var, k1 KL",
                                "ratio k1 / closed", "decoder Var (same for both)"], variance_rows)
    config = metrics["config"]
    return (
        f"{config['num_train']} train / {config['num_test']} test binarised digits, 2-D latent, "
        f"{config['hidden']} hidden units, {config['epochs']} epochs of Adam (batch {config['batch_size']}). "
        "Test ELBO (nats per image) uses the closed-form KL and 16 draws for both runs. Seconds include "
        "compilation (the first run also compiles the shared evaluation).\n\n"
        f"{elbos}\n\nGradient variance: summed per-parameter variance of the minibatch gradient over "
        f"{config['grad_draws']} eps draws, same minibatch and draws for both estimators.\n\n{variances}\n\n"
        f"![ELBO and gradient variance]({rel_dir}/elbo_and_gradient_variance.png)\n\n"
        f"![reconstructions]({rel_dir}/reconstructions.png)\n\n![latent]({rel_dir}/latent.png)\n"
    )


if __name__ == "__main__":
    run_main(main)
