"""A VAE on scikit-learn's 8x8 digits: which KL term to train with, judged by a tighter bound than the ELBO.

Data: the 1797 8x8 digits scaled to [0, 1] and binarised at 0.5 (so the Bernoulli likelihood is a proper
density and the ELBO a bound on log p(x)); a stratified 80/20 train/test split.
Model: z ~ N(0, I_d) for latent sizes d (``--latents``); x | z ~ Bernoulli(decoder(z)) on 64 pixels;
q(z | x) = N(mu(x), diag sigma(x)^2); one-hidden-layer tanh MLP encoder and decoder (equinox). Trained by Adam on the
single-sample reparameterised ELBO log p(x | z) - KL(q(z | x) || p(z)), z = mu + sigma * eps, with the KL
term

- ``closed_form``: kljax.analytic.kl (Kingma and Welling 2014's estimator L^B);
- ``monte_carlo_k1``: log q(z | x) - log p(z) from the same z with kljax.mc.k1 (their L^A);
- ``stl``: the same k1 with q's parameters held fixed inside log q (sticking the landing, Roeder, Wu and
  Duvenaud 2017: the score term, mean zero, is dropped).

All three give unbiased gradients of the same ELBO, so what differs is gradient noise and, through it,
where training ends. Each (latent size, KL term) is trained from the same initialisations and minibatch
orders over several seeds (vmapped: one program per latent size). The models are judged on held-out
images by the importance-weighted bound (IWAE, Burda, Grosse and Salakhutdinov 2016)

    log p(x) >= E[log (1/K) sum_k p(x, z_k) / q(z_k | x)],   z_k ~ q(z | x),

with K draws (tighter than the ELBO, which is K = 1, and approaching log p(x) as K grows), with 95% t
intervals over seeds and paired t-tests between KL terms (a seed's runs share initialisation and data order).

    python -m experiments.vae_digits [--quick] --out results/vae_digits

References:
    Kingma, Welling (2014). Auto-Encoding Variational Bayes. ICLR. https://arxiv.org/abs/1312.6114
    Roeder, Wu, Duvenaud (2017). Sticking the Landing. NeurIPS. https://arxiv.org/abs/1703.09194
    Burda, Grosse, Salakhutdinov (2016). Importance Weighted Autoencoders. ICLR. https://arxiv.org/abs/1509.00519
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _common, _data, _models, _stats, _train
from kljax import analytic, distributions, mc, plot

TITLE = "VAE on 8x8 digits: closed-form vs Monte Carlo vs STL KL term, judged by the IWAE bound"
ORDER = 53

KL_TERMS = ("closed_form", "monte_carlo_k1", "stl")
PIXELS = 64


def load_data(seed: int):
    """Binarised digits (float) and labels, split 80/20 stratified."""
    from sklearn.model_selection import train_test_split

    images, labels = _data.digits()
    binary = (images >= 0.5).astype(np.float64)
    return train_test_split(binary, labels, test_size=0.2, random_state=seed, stratify=labels)


def init_params(key, hidden, dtype, latent=2):
    """Encoder 64 -> hidden -> (mu, log sigma) and decoder latent -> hidden -> 64 logits: tanh
    ``equinox.nn.MLP``s (their array parts), Glorot-normal weights and zero biases."""
    def dense(key, fan_in, fan_out):
        scale = math.sqrt(2.0 / (fan_in + fan_out))
        return scale * jax.random.normal(key, (fan_in, fan_out), dtype).T, jnp.zeros(fan_out, dtype)
    keys = jax.random.split(key, 4)
    encoder, _ = _models.from_layers([dense(keys[0], PIXELS, hidden), dense(keys[1], hidden, 2 * latent)], jnp.tanh)
    decoder, _ = _models.from_layers([dense(keys[2], latent, hidden), dense(keys[3], hidden, PIXELS)], jnp.tanh)
    return {"encoder": encoder, "decoder": decoder}


def encode(params, x):
    """q(z | x) for one image x of shape (64,); the latent size is the decoder's input size."""
    out = _models.network(params["encoder"], jnp.tanh)(x)
    latent = out.shape[-1] // 2
    return distributions.MultivariateNormalDiag(out[:latent], jnp.exp(out[latent:]))


def decode(params, z):
    """Bernoulli logits of the 64 pixels for one latent z of shape (latent,)."""
    return _models.network(params["decoder"], jnp.tanh)(z)


def _prior(latent, dtype):
    return distributions.MultivariateNormalDiag(jnp.zeros(latent, dtype), jnp.ones(latent, dtype))


def _kl_terms(q, prior, z):
    """The three KL terms for one image, in KL_TERMS order (each a scalar)."""
    q_fixed = distributions.MultivariateNormalDiag(jax.lax.stop_gradient(q.loc),
                                                   jax.lax.stop_gradient(q.scale_diag))
    return (analytic.kl(q, prior), mc.k1(q.log_prob(z), prior.log_prob(z)),
            mc.k1(q_fixed.log_prob(z), prior.log_prob(z)))


def example_elbo(params, x, key, kl_term):
    """Single-sample ELBO estimate for one image; ``kl_term`` is a name or an index into KL_TERMS
    (an index may be traced: all three terms are cheap, and the chosen one is selected)."""
    q = encode(params, x)
    prior = _prior(q.loc.shape[-1], x.dtype)
    z = q.sample(key)
    reconstruction = jnp.sum(distributions.Bernoulli(decode(params, z)).log_prob(x))
    if isinstance(kl_term, str):
        if kl_term not in KL_TERMS:
            raise ValueError(f"unknown kl_term {kl_term!r}")
        kl_term = KL_TERMS.index(kl_term)
    return reconstruction - jnp.stack(_kl_terms(q, prior, z))[kl_term]


def batch_loss(params, images, key, kl_term):
    """Negative mean ELBO estimate over a minibatch (one eps per image)."""
    keys = jax.random.split(key, images.shape[0])
    elbos = jax.vmap(lambda x, k: example_elbo(params, x, k, kl_term))(images, keys)
    return -jnp.mean(elbos)


@functools.partial(jax.jit, static_argnames="num_draws")
def evaluate(params, images, key, num_draws=16):
    """Mean test ELBO (closed-form KL, ``num_draws`` draws for log p(x | z)) and its two parts."""
    def one(x, key):
        q = encode(params, x)
        z = q.sample(key, (num_draws,))
        reconstruction = jnp.mean(jax.vmap(
            lambda z: jnp.sum(distributions.Bernoulli(decode(params, z)).log_prob(x)))(z))
        return reconstruction, analytic.kl(q, _prior(q.loc.shape[-1], x.dtype))
    reconstruction, kl = jax.vmap(one)(images, jax.random.split(key, images.shape[0]))
    return jnp.mean(reconstruction - kl), jnp.mean(reconstruction), jnp.mean(kl)


@functools.partial(jax.jit, static_argnames="num_draws")
def iwae_bound(params, images, key, num_draws):
    """Mean over images of the importance-weighted bound log (1/K) sum_k p(x, z_k) / q(z_k | x), K draws."""
    def one(x, key):
        q = encode(params, x)
        prior = _prior(q.loc.shape[-1], x.dtype)
        z = q.sample(key, (num_draws,))
        log_likelihood = jax.vmap(lambda z: jnp.sum(distributions.Bernoulli(decode(params, z)).log_prob(x)))(z)
        log_weights = log_likelihood + prior.log_prob(z) - q.log_prob(z)
        return jax.nn.logsumexp(log_weights) - math.log(num_draws)
    return jnp.mean(jax.vmap(one)(images, jax.random.split(key, images.shape[0])))


@jax.jit
def _per_draw_gradients(params, images, keys, kl_term):
    return jax.vmap(lambda k: jax.grad(batch_loss)(params, images, k, kl_term))(keys)


def gradient_variance(params, images, key, kl_term, num_draws):
    """Summed per-parameter variance of the minibatch gradient over ``num_draws`` eps draws (batch fixed).

    Returns a dict with the encoder, decoder and total sums.
    """
    index = KL_TERMS.index(kl_term)
    grads = _per_draw_gradients(params, images, jax.random.split(key, num_draws), index)
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


def train(keys, x_train, *, latent, epochs, batch_size, learning_rate, hidden, disable_progress=True):
    """Adam training of one model per (KL term, seed), vmapped, from the same initialisation and minibatch
    order for every KL term of a seed.

    Args:
      keys: one PRNG key per seed.

    Returns:
      (initial params, final params, per-epoch mean training ELBO), params stacked over
      (len(KL_TERMS), seeds), the curve of shape (len(KL_TERMS), seeds, epochs).
    """
    dtype = x_train.dtype
    num_seeds = keys.shape[0]
    optimizer = optax.adam(learning_rate)
    num_batches = x_train.shape[0] // batch_size
    init_keys = jax.vmap(lambda k: jax.random.fold_in(k, 0))(keys)
    one_seed = jax.jit(jax.vmap(lambda k: init_params(k, hidden, dtype, latent)))(init_keys)
    params = jax.tree.map(lambda leaf: jnp.broadcast_to(leaf, (len(KL_TERMS),) + leaf.shape), one_seed)
    terms = jnp.broadcast_to(jnp.arange(len(KL_TERMS))[:, None], (len(KL_TERMS), num_seeds))
    state = jax.vmap(jax.vmap(optimizer.init))(params)

    def one_epoch(params, state, key, term):
        perm_key, step_key = jax.random.split(key)
        order = jax.random.permutation(perm_key, x_train.shape[0])[:num_batches * batch_size]
        batches = order.reshape(num_batches, batch_size)

        (params, state), losses = _train.run_steps(
            lambda p, inputs: batch_loss(p, x_train[inputs[0]], inputs[1], term), optimizer, params, state,
            (batches, jax.random.split(step_key, num_batches)), trace="loss")
        return params, state, -jnp.mean(losses)

    @jax.jit
    def epoch(params, state, epoch_keys):
        # the same key for every KL term of a seed: same minibatches and eps
        per_seed = lambda p, s, t: jax.vmap(one_epoch)(p, s, epoch_keys, t)
        return jax.vmap(per_seed)(params, state, terms)

    initial = params
    curve = []
    for e in _common.progress(range(1, epochs + 1), desc=f"VAE latent {latent}", total=epochs,
                              disable=disable_progress):
        params, state, elbo = epoch(params, state, jax.vmap(lambda k: jax.random.fold_in(k, e))(keys))
        curve.append(np.asarray(elbo))
    return initial, params, np.stack(curve, axis=-1)


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    epochs: int = 300  # training epochs
    batch_size: int = 64
    learning_rate: float = 3e-3
    hidden: int = 128  # hidden units of encoder and decoder
    latents: tuple[int, ...] = (2, 8, 16)  # latent sizes
    seeds: int = 5  # seeds per (latent, KL term)
    iwae_draws: int = 1000  # K, importance samples of the test bound
    grad_draws: int = 256  # eps draws per gradient-variance estimate
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(epochs=40, latents=(2, 8), seeds=3, iwae_draws=200, grad_draws=64)


def run(config: Config, *, show_progress: bool = False) -> tuple[dict, tuple]:
    """Trains and evaluates every (latent size, KL term, seed); returns ``(metrics, figure_inputs)``."""
    if config.seeds < 2:
        raise ValueError(f"seeds must be >= 2: the comparison needs a spread over seeds, got {config.seeds}")
    dtype = jnp.result_type(float)
    x_train, x_test, y_train, y_test = load_data(config.seed)
    x_train, x_test = jnp.asarray(x_train, dtype), jnp.asarray(x_test, dtype)
    seed_keys = jax.random.split(jax.random.key(config.seed), config.seeds)
    eval_key, variance_key = jax.random.split(jax.random.key(config.seed + 10_000))
    fixed_batch = x_train[:config.batch_size]

    results, latent_two = {}, None
    for latent in config.latents:
        with _common.Timer() as timer:
            initial, final, curve = train(seed_keys, x_train, latent=latent, epochs=config.epochs,
                                          batch_size=config.batch_size, learning_rate=config.learning_rate,
                                          hidden=config.hidden, disable_progress=not show_progress)
        per_term = {}
        for t, term in enumerate(KL_TERMS):
            iwae, elbo, kl = [], [], []
            for seed in range(config.seeds):
                params = _train.index_tree(final, (t, seed))
                iwae.append(float(iwae_bound(params, x_test, eval_key, config.iwae_draws)))
                test_elbo, _, test_kl = evaluate(params, x_test, eval_key)
                elbo.append(float(test_elbo))
                kl.append(float(test_kl))
            per_term[term] = {"iwae": iwae, "elbo": elbo, "kl": kl, "train_curve": curve[t].tolist()}
        # gradient variance of the three estimators at the same parameters (seed 0 of the closed-form run),
        # at initialisation and at the end, same minibatch and eps draws
        variance = {}
        for stage, tree in (("initial", initial), ("final", final)):
            params = _train.index_tree(tree, (0, 0))
            variance[stage] = {term: gradient_variance(params, fixed_batch, jax.random.fold_in(variance_key, latent),
                                                       term, config.grad_draws) for term in KL_TERMS}
        results[str(latent)] = {"terms": per_term, "gradient_variance": variance, "seconds": timer.seconds}
        if latent == 2:
            latent_two = {term: _train.index_tree(final, (t, 0)) for t, term in enumerate(KL_TERMS)}

    metrics = {
        "config": {**dataclasses.asdict(config), "latents": [int(v) for v in config.latents],
                   "num_train": int(x_train.shape[0]), "num_test": int(x_test.shape[0]),
                   "likelihood": "Bernoulli on pixels binarised at 0.5"},
        "results": results,
        "comparisons": _comparisons(results),
    }
    return metrics, (latent_two, x_test, np.asarray(y_test))


def main(argv: list[str] | None = None) -> dict:
    config, args = _common.parse_config(Config, "vae_digits", __doc__.splitlines()[0], argv)
    metrics, (latent_two, x_test, y_test) = run(config, show_progress=not args.no_progress)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _figures(metrics, latent_two, x_test, y_test, args.out)
    return metrics


def _comparisons(results):
    """Paired t-tests of the test IWAE bound between KL terms, per latent size: the terms of a seed share
    the initialisation, minibatches and eps, so the seeds pair the runs."""
    rows = []
    for latent, result in results.items():
        for a, b in (("closed_form", "monte_carlo_k1"), ("closed_form", "stl"), ("stl", "monte_carlo_k1")):
            x, y = np.asarray(result["terms"][a]["iwae"]), np.asarray(result["terms"][b]["iwae"])
            rows.append({"latent": int(latent), "a": a, "b": b, "difference": float(x.mean() - y.mean()),
                         "p_value": _stats.paired_p(x, y)})
    return rows


def _figures(metrics, latent_two, x_test, y_test, out_dir):
    import matplotlib.pyplot as plt

    results = metrics["results"]
    latents = list(results)
    fig, axes = plt.subplots(1, 2, figsize=(12, 4))
    width = 0.8 / len(KL_TERMS)
    for t, term in enumerate(KL_TERMS):
        means, lows, highs = zip(*(plot.mean_interval(results[d]["terms"][term]["iwae"]) for d in latents))
        positions = np.arange(len(latents)) + (t - 1) * width
        axes[0].errorbar(positions, means, yerr=[np.subtract(means, lows), np.subtract(highs, means)],
                         fmt="o", capsize=4, color=f"C{t}", label=term)
        for i, d in enumerate(latents):
            axes[0].scatter(np.full(len(results[d]["terms"][term]["iwae"]), positions[i]),
                            results[d]["terms"][term]["iwae"], color=f"C{t}", s=8, alpha=0.4)
        for d, style in zip(latents, ("-", "--", ":", "-.")):
            curve = np.asarray(results[d]["terms"][term]["train_curve"])
            axes[1].plot(np.arange(1, curve.shape[-1] + 1), curve.mean(axis=0), color=f"C{t}", ls=style,
                         label=f"{term}, latent {d}")
    axes[0].set_xticks(range(len(latents)), [f"latent {d}" for d in latents])
    axes[0].set(ylabel=f"test IWAE bound, K = {metrics['config']['iwae_draws']} (nats per image)",
                title="held-out bound: mean over seeds, 95% t interval (dots: seeds)")
    axes[0].legend(fontsize=8)
    final = [np.mean(results[d]["terms"][t]["train_curve"], axis=0)[-1] for d in latents for t in KL_TERMS]
    axes[1].set_ylim(min(final) - 15, max(final) + 5)
    axes[1].set(xlabel="epoch", ylabel="training ELBO (its own estimator)", title="training curves (mean of seeds)")
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "iwae_by_latent")

    if latent_two is None:
        return
    shown = 10
    fig, axes = plt.subplots(1 + len(KL_TERMS), shown, figsize=(shown, 1.1 * (1 + len(KL_TERMS))))
    rows = [("data", x_test[:shown])] + [(term, reconstruct(latent_two[term], x_test[:shown])) for term in KL_TERMS]
    for r, (name, images) in enumerate(rows):
        for c in range(shown):
            axes[r, c].imshow(np.asarray(images[c]).reshape(8, 8), cmap="gray_r", vmin=0, vmax=1)
            axes[r, c].axis("off")
        axes[r, 0].set_title(name, fontsize=7, loc="left")
    _common.save_figure(fig, out_dir, "reconstructions")

    fig, axes = plt.subplots(1, len(KL_TERMS), figsize=(5 * len(KL_TERMS), 4.5))
    for ax, term in zip(axes, KL_TERMS):
        means = np.asarray(latent_means(latent_two[term], x_test))
        scatter = ax.scatter(means[:, 0], means[:, 1], c=y_test, cmap="tab10", s=8, vmin=-0.5, vmax=9.5)
        ax.set(title=f"latent 2, {term} KL (seed 0)", xlabel="z1", ylabel="z2")
    fig.colorbar(scatter, ax=axes, ticks=range(10), label="digit")
    _common.save_figure(fig, out_dir, "latent")


def _reading(metrics) -> str:
    """The comparison's conclusion, from the paired tests with Holm's correction over all of them."""
    lines = []
    adjusted = _stats.holm_adjusted([row["p_value"] for row in metrics["comparisons"]])
    for row, q in zip(metrics["comparisons"], adjusted):
        p = f"p = {row['p_value']:.2g}, Holm {q:.2g}"
        if q < _stats.SIGNIFICANCE:
            verdict = f"{row['a'] if row['difference'] > 0 else row['b']} is higher by {abs(row['difference']):.2f} nats ({p})"
        elif row["p_value"] < _stats.SIGNIFICANCE:
            verdict = f"{row['difference']:+.2f} nats, significant alone but not after Holm's correction ({p})"
        else:
            verdict = f"no significant difference ({row['difference']:+.2f} nats, {p})"
        lines.append(f"- latent {row['latent']}, {row['a']} vs {row['b']}: {verdict}")
    return "\n".join(lines)


def _with_interval(values, digits: int) -> str:
    mean, low, high = plot.mean_interval(values)
    return f"{mean:.{digits}f} [{low:.{digits}f}, {high:.{digits}f}]"


def report(metrics: dict, rel_dir) -> str:
    config, results = metrics["config"], metrics["results"]
    rows = []
    for latent, result in results.items():
        for term in KL_TERMS:
            values = result["terms"][term]
            rows.append([latent, term, _with_interval(values["iwae"], 2), _with_interval(values["elbo"], 2),
                         _with_interval(values["kl"], 3), result["gradient_variance"]["final"][term]["encoder"]])
    table = _common.markdown_table(["latent", "KL term", f"test IWAE (K = {config['iwae_draws']})", "test ELBO",
                                    "test KL", "encoder grad. Var at the end (seed 0)"], rows, float_format="{:.4g}")
    return (
        f"{config['num_train']} train / {config['num_test']} test binarised digits, latent sizes "
        f"{config['latents']}, {config['hidden']} hidden units, {config['epochs']} epochs of Adam (batch "
        f"{config['batch_size']}), {config['seeds']} seeds per cell (the three KL terms of a seed share the "
        "initialisation, minibatches and eps). Judged by the held-out importance-weighted bound (nats per "
        "image; higher is better), with the ELBO and KL beside it; gradient variance: summed per-parameter "
        f"variance of the encoder's minibatch gradient over {config['grad_draws']} eps draws at the closed-form "
        "run's final parameters (seed 0).\n\n"
        "Seed means with 95% t intervals.\n\n"
        f"{table}\n\nReading (paired t-tests over seeds, alpha = 0.05 after Holm's correction over the "
        f"{len(metrics['comparisons'])} comparisons):\n\n" + _reading(metrics) + "\n\n"
        f"![IWAE by latent size]({rel_dir}/iwae_by_latent.png)\n\n"
        f"![reconstructions]({rel_dir}/reconstructions.png)\n\n![latent]({rel_dir}/latent.png)\n"
    )


if __name__ == "__main__":
    _common.run_main(main)
