"""Bayesian logistic regression: mean-field vs full-rank Gaussian VI against a NUTS reference posterior.

Data: scikit-learn's breast cancer set (569 tumours, 30 features), standardised with the training
split's statistics, plus a bias column. Model: w ~ N(0, prior_scale^2 I_31), y_i ~ Bernoulli(sigmoid(x_i w)).

- Reference posterior: NUTS (numpyro) on the same log joint.
- VI: q = MultivariateNormalDiag (mean field) or MultivariateNormalTriL (full rank), fitted by Adam on
  the reparameterised ELBO E_q[log p(y | w)] - KL(q || prior), the KL term in closed form
  (kljax.analytic.kl).
- Distance of each q from the reference, with kljax's estimators:
  (a) closed form (kljax.analytic.kl) between q and a Gaussian fitted to the NUTS draws, both directions;
  (b) kljax.knn.kl on draws, both directions, after whitening every draw with the reference Gaussian
      (KL is invariant under an invertible affine map, and whitening makes Euclidean neighbours sensible);
  (c) kljax.ratio.kl on the same whitened draws (cross-fitted quadratic logistic classifier, a density-
      ratio estimate that does not degrade with dimension the way neighbour distances do), with its
      standard error.
  All are shown beside a floor: the score of a perfect q, i.e. the same estimator when the reference
  is as many independent draws of the full-rank q itself (the estimators' finite-sample bias).
- Held-out predictive accuracy, log loss and calibration (expected calibration error, 10 equal-width
  confidence bins, and a reliability figure) from each posterior's predictive mean.

Mean field cannot represent the strong posterior correlations of collinear features; it is known to
under-estimate the marginal variances (reverse KL's zero-forcing), which the figures show.

    python -m experiments.vi_logistic [--quick] --out results/vi_logistic

References:
    Blei, Kucukelbir, McAuliffe (2017). Variational Inference: A Review for Statisticians. JASA.
    Hoffman, Gelman (2014). The No-U-Turn Sampler. JMLR 15.
    Wang, Kulkarni, Verdu (2009). Divergence Estimation for Multidimensional Densities via
    k-Nearest-Neighbor Distances. IEEE Trans. Inf. Theory 55(5).
    Guo, Pleiss, Sun, Weinberger (2017). On Calibration of Modern Neural Networks. ICML, section 2 (ECE).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _common, _train
from kljax import analytic, distributions, knn, ratio

TITLE = "Bayesian logistic regression: mean-field vs full-rank VI against NUTS"
ORDER = 52

FAMILIES = ("mean_field", "full_rank")


def load_data(seed: int, test_fraction: float = 0.3):
    """Breast-cancer features standardised on the training split, with a leading bias column."""
    from sklearn.datasets import load_breast_cancer
    from sklearn.model_selection import train_test_split

    features, labels = load_breast_cancer(return_X_y=True)
    x_train, x_test, y_train, y_test = train_test_split(features, labels, test_size=test_fraction,
                                                        random_state=seed, stratify=labels)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    add_bias = lambda x: np.concatenate([np.ones((x.shape[0], 1)), (x - mean) / std], axis=1)
    return add_bias(x_train), y_train.astype(np.float64), add_bias(x_test), y_test.astype(np.float64)


def log_likelihood(weights, features, labels):
    """sum_i log Bernoulli(y_i | sigmoid(x_i w)) for one weight vector, shape (d,)."""
    return jnp.sum(distributions.Bernoulli(features @ weights).log_prob(labels))


def _prior(dim, prior_scale, dtype):
    return distributions.MultivariateNormalDiag(jnp.zeros(dim, dtype), jnp.full((dim,), prior_scale, dtype))


def run_nuts(key, features, labels, *, prior_scale, num_warmup, num_samples, progress_bar):
    """Reference posterior draws (num_samples, d) from numpyro's NUTS on the same log joint."""
    from numpyro.infer import MCMC, NUTS

    prior = _prior(features.shape[1], prior_scale, features.dtype)

    def potential(weights):
        return -(log_likelihood(weights, features, labels) + prior.log_prob(weights))

    # numpyro's internals broadcast ranks implicitly; the strict test setting must not reach them.
    with jax.numpy_rank_promotion("allow"):
        mcmc = MCMC(NUTS(potential_fn=potential), num_warmup=num_warmup, num_samples=num_samples,
                    num_chains=1, progress_bar=progress_bar)
        mcmc.run(key, init_params=jnp.zeros(features.shape[1], features.dtype),
                 extra_fields=("diverging", "num_steps"))
        extra = mcmc.get_extra_fields()
        draws = mcmc.get_samples()
    return draws, {"divergences": int(np.sum(extra["diverging"])),
                   "mean_leapfrog_steps": float(np.mean(extra["num_steps"]))}


def variational_family(family, params):
    """q for the raw parameters: (loc, log scale) or (loc, unconstrained lower triangle)."""
    loc, raw = params
    if family == "mean_field":
        return distributions.MultivariateNormalDiag(loc, jnp.exp(raw))
    # A positive diagonal (exp) makes L the Cholesky factor of the covariance.
    scale_tril = jnp.tril(raw, -1) + jnp.diag(jnp.exp(jnp.diagonal(raw)))
    return distributions.MultivariateNormalTriL(loc, scale_tril)


def fit_vi(key, family, features, labels, *, prior_scale, steps, learning_rate, num_samples,
           disable_progress=True):
    """Adam on the reparameterised ELBO with the closed-form KL to the prior; returns (q, ELBO trace)."""
    dim, dtype = features.shape[1], features.dtype
    init_scale = jnp.full((dim,), math.log(0.1), dtype)
    raw = init_scale if family == "mean_field" else jnp.diag(init_scale)
    params = (jnp.zeros(dim, dtype), raw)
    prior = _prior(dim, prior_scale, dtype)
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, steps, alpha=0.01))

    def negative_elbo(params, key):
        q = variational_family(family, params)
        weights = q.sample(key, (num_samples,))
        expected_log_likelihood = jnp.mean(jax.vmap(log_likelihood, in_axes=(0, None, None))(
            weights, features, labels))
        return analytic.kl(q, prior) - expected_log_likelihood

    params, losses = _train.fit_in_chunks(params, negative_elbo, optimizer, key, steps, trace="loss",
                                          desc=f"VI {family}", disable=disable_progress)
    return variational_family(family, params), -np.asarray(losses)


def gaussian_fit(draws):
    """MultivariateNormalTriL with the draws' mean and (ddof=1) covariance."""
    draws = np.asarray(draws, dtype=np.float64)
    covariance = np.cov(draws, rowvar=False)
    return draws.mean(axis=0), np.linalg.cholesky(covariance)


def predictive_metrics(weight_draws, features, labels, num_bins=10):
    """Accuracy, log loss and top-label ECE of the posterior predictive mean P(y = 1 | x)."""
    logits = np.asarray(weight_draws, dtype=np.float64) @ features.T
    probability = np.mean(1.0 / (1.0 + np.exp(-logits)), axis=0)
    predicted = (probability >= 0.5).astype(np.float64)
    confidence = np.where(predicted == 1.0, probability, 1.0 - probability)
    correct = (predicted == labels).astype(np.float64)
    eps = 1e-12
    log_loss = -np.mean(labels * np.log(probability + eps) + (1 - labels) * np.log(1 - probability + eps))
    # Guo et al. 2017, section 2: ECE = sum_b |B_b| / n * |acc(B_b) - conf(B_b)|.
    edges = np.linspace(0.5, 1.0, num_bins + 1)
    bin_index = np.clip(np.digitize(confidence, edges[1:-1]), 0, num_bins - 1)
    ece, bins = 0.0, []
    for b in range(num_bins):
        inside = bin_index == b
        if inside.any():
            gap = abs(correct[inside].mean() - confidence[inside].mean())
            ece += inside.mean() * gap
            bins.append({"low": edges[b], "high": edges[b + 1], "count": int(inside.sum()),
                         "accuracy": float(correct[inside].mean()),
                         "confidence": float(confidence[inside].mean())})
    return {"accuracy": float(correct.mean()), "log_loss": float(log_loss), "ece": float(ece),
            "reliability": bins}


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    prior_scale: float = 1.0  # prior std of every weight and the bias
    num_warmup: int = 2000  # NUTS warmup
    num_samples: int = 4000  # NUTS draws
    steps: int = 4000  # VI Adam steps
    learning_rate: float = 0.02
    samples_per_step: int = 8  # reparameterised draws per VI step
    # In d = 31 with a few thousand draws, k = 1 and the bias-weighted estimator are too noisy to be
    # useful (several nats between repeated draws); WKV with k = 5 is the most stable option measured.
    knn_k: int = 5  # neighbour order of the kNN KL estimator
    knn_estimator: str = "wkv"  # kljax.knn.kl estimator
    # The quadratic classifier has (d + 1)(d + 2) / 2 = 528 parameters in d = 31. Measured on a whitened
    # Gaussian pair with a true KL of 4.18 (3 seeds): at 500 draws per side the default reads 11.6-12.9
    # (7.7 where the truth is 0); at 4000 it reads 0.8-2.9, and with penalty 1e-3 and no bias
    # extrapolation 4.9 (+17 %, stable). Below ratio_min_draws_per_parameter the column is not computed.
    ratio_penalty: float = 1e-3
    ratio_extrapolate: bool = False
    ratio_min_draws_per_parameter: float = 4.0
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(num_warmup=500, num_samples=500, steps=1500)


def run(config: Config, *, show_progress: bool = False) -> tuple[dict, tuple]:
    """Runs NUTS, both VI fits and the distance estimates; returns ``(metrics, figure_inputs)``."""
    dtype = jnp.result_type(float)
    x_train, y_train, x_test, y_test = load_data(config.seed)
    features, labels = jnp.asarray(x_train, dtype), jnp.asarray(y_train, dtype)
    key = jax.random.key(config.seed)
    nuts_key, vi_key, draw_key = jax.random.split(key, 3)

    with _common.Timer() as nuts_timer:
        draws, nuts_stats = run_nuts(nuts_key, features, labels, prior_scale=config.prior_scale,
                                     num_warmup=config.num_warmup, num_samples=config.num_samples,
                                     progress_bar=show_progress)
    reference = np.asarray(draws, dtype=np.float64)
    ref_mean, ref_tril = gaussian_fit(reference)
    ref_gaussian = distributions.MultivariateNormalTriL(jnp.asarray(ref_mean, dtype), jnp.asarray(ref_tril, dtype))
    ref_std = np.sqrt(np.sum(ref_tril**2, axis=1))

    def whiten(x):
        return np.linalg.solve(ref_tril, (np.asarray(x, np.float64) - ref_mean).T).T

    ratio_key = jax.random.fold_in(key, 7)
    ratio_parameters = (reference.shape[1] + 1) * (reference.shape[1] + 2) // 2
    ratio_enough = reference.shape[0] >= config.ratio_min_draws_per_parameter * ratio_parameters

    def ratio_distances(x_p, x_q):
        if not ratio_enough:
            return {}

        def kl(a, b, salt):
            value, stderr = ratio.kl_with_stderr(jax.random.fold_in(ratio_key, salt), jnp.asarray(whiten(a), dtype),
                                                 jnp.asarray(whiten(b), dtype), penalty=config.ratio_penalty,
                                                 extrapolate=config.ratio_extrapolate)
            return float(value), float(stderr)
        forward, backward = kl(x_p, x_q, 0), kl(x_q, x_p, 1)
        return {"kl_reference_to_q": forward[0], "kl_q_to_reference": backward[0],
                "stderr_reference_to_q": forward[1], "stderr_q_to_reference": backward[1]}

    def knn_distances(x_p, x_q):
        def unique(x):
            # A repeated MCMC draw is a zero neighbour distance, which the kNN estimators reject; shapes
            # stay the same otherwise, so one compiled estimator serves every call.
            x = whiten(x)
            deduplicated = np.unique(x, axis=0)
            return x if deduplicated.shape[0] == x.shape[0] else deduplicated
        kl = lambda a, b: float(knn.kl(jnp.asarray(unique(a), dtype), jnp.asarray(unique(b), dtype),
                                       k=config.knn_k, estimator=config.knn_estimator))
        return {"kl_reference_to_q": kl(x_p, x_q), "kl_q_to_reference": kl(x_q, x_p)}

    def closed_form_distances(q):
        return {"kl_reference_to_q": float(analytic.kl(ref_gaussian, q)),
                "kl_q_to_reference": float(analytic.kl(q, ref_gaussian))}

    results, traces, vi_draws, fitted = {}, {}, {}, {}
    for i, family in enumerate(FAMILIES):
        with _common.Timer() as timer:
            q, trace = fit_vi(jax.random.fold_in(vi_key, i), family, features, labels,
                              prior_scale=config.prior_scale, steps=config.steps,
                              learning_rate=config.learning_rate, num_samples=config.samples_per_step,
                              disable_progress=not show_progress)
        traces[family], fitted[family] = trace, q
        q_draws = np.asarray(q.sample(jax.random.fold_in(draw_key, i), (reference.shape[0],)), np.float64)
        vi_draws[family] = q_draws
        q_std = np.sqrt(np.asarray(q.variance(), np.float64))
        results[family] = {
            "seconds": timer.seconds,
            "final_elbo": float(np.mean(trace[-max(1, len(trace) // 10):])),
            "kl_closed_form_gaussian": closed_form_distances(q),
            "kl_knn": knn_distances(reference, q_draws),
            "kl_ratio": ratio_distances(reference, q_draws),
            "std_ratio_to_reference": {"median": float(np.median(q_std / ref_std)),
                                       "min": float(np.min(q_std / ref_std))},
            "max_abs_mean_error_in_reference_std": float(np.max(
                np.abs(np.asarray(q.mean(), np.float64) - ref_mean) / ref_std)),
            "test": predictive_metrics(q_draws, x_test, y_test),
            "train_accuracy": predictive_metrics(q_draws, x_train, y_train)["accuracy"],
        }

    # What a perfect q would score: the full-rank q plays the reference, seen through as many
    # independent draws as NUTS gave (correlated MCMC draws are worth fewer, so the true floor is higher).
    exact = fitted["full_rank"]
    floor_draws = [np.asarray(exact.sample(jax.random.fold_in(draw_key, 10 + j), (reference.shape[0],)),
                              np.float64) for j in range(2)]
    floor_mean, floor_tril = gaussian_fit(floor_draws[0])
    floor_fit = distributions.MultivariateNormalTriL(jnp.asarray(floor_mean, dtype), jnp.asarray(floor_tril, dtype))
    floor = {
        "gaussian_closed_form": {"kl_reference_to_q": float(analytic.kl(floor_fit, exact)),
                                 "kl_q_to_reference": float(analytic.kl(exact, floor_fit))},
        "knn": knn_distances(floor_draws[0], floor_draws[1]),
        "ratio": ratio_distances(floor_draws[0], floor_draws[1]),
        "note": ("the same estimators when the reference is n independent draws of the fitted full-rank "
                 "q itself: the finite-sample bias of each estimator at this n and d"),
    }

    results["nuts"] = {
        "seconds": nuts_timer.seconds,
        **nuts_stats,
        "test": predictive_metrics(reference, x_test, y_test),
        "train_accuracy": predictive_metrics(reference, x_train, y_train)["accuracy"],
    }
    metrics = {
        "config": {**dataclasses.asdict(config),
                   "num_train": int(x_train.shape[0]), "num_test": int(x_test.shape[0]),
                   "dimension": int(x_train.shape[1])},
        "reference_floor": floor,
        "results": results,
    }
    return metrics, (traces, reference, vi_draws)


def main(argv: list[str] | None = None) -> dict:
    config, args = _common.parse_config(Config, "vi_logistic", __doc__.splitlines()[0], argv)
    metrics, (traces, reference, vi_draws) = run(config, show_progress=not args.no_progress)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _figures(metrics, traces, reference, vi_draws, args.out)
    return metrics


def _figures(metrics, traces, reference, vi_draws, out_dir):
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(16, 4.5))
    ref_std = reference.std(axis=0, ddof=1)
    ref_mean = reference.mean(axis=0)
    for family, color in zip(FAMILIES, ("C1", "C2")):
        draws = vi_draws[family]
        axes[0].scatter(ref_mean, draws.mean(axis=0), s=12, color=color, label=family)
        axes[1].scatter(ref_std, draws.std(axis=0, ddof=1), s=12, color=color, label=family)
        axes[2].plot(traces[family], color=color, lw=0.6, label=family)
    for ax, what in zip(axes[:2], ("posterior mean", "posterior std")):
        lims = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], ax.get_ylim()[1])]
        ax.plot(lims, lims, "k--", lw=0.8)
        ax.set(xlabel=f"NUTS {what}", ylabel=f"VI {what}", title=f"{what} per weight")
        ax.legend()
    final = [metrics["results"][f]["final_elbo"] for f in FAMILIES]
    axes[2].set_ylim(min(final) - 40, max(final) + 10)
    axes[2].set(xlabel="step", ylabel="ELBO estimate", title="ELBO during VI")
    axes[2].legend()
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "posteriors")

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for name, color in (("nuts", "C0"), ("mean_field", "C1"), ("full_rank", "C2")):
        bins = metrics["results"][name]["test"]["reliability"]
        confidence, accuracy = [b["confidence"] for b in bins], [b["accuracy"] for b in bins]
        # Marker area shows how many test points a bin holds: most sit in the top bin.
        ax.plot(confidence, accuracy, "-", color=color, lw=0.8, alpha=0.6)
        ax.scatter(confidence, accuracy, s=[8 + 2 * b["count"] for b in bins], color=color, alpha=0.6,
                   label=f"{name} (ECE {metrics['results'][name]['test']['ece']:.3f})")
    ax.plot([0.5, 1], [0.5, 1], "k--", lw=0.8)
    ax.set(xlabel="confidence (bin mean)", ylabel="accuracy (bin)",
           title="reliability, held-out split (area ~ points in bin)")
    ax.legend(loc="lower right")
    _common.save_figure(fig, out_dir, "reliability")


def report(metrics: dict, rel_dir) -> str:
    results, floor = metrics["results"], metrics["reference_floor"]
    def ratio_cells(values):
        if not values:
            return ["n/a", "n/a"]
        return [f"{values[f'kl_{d}']:.3g} ± {values[f'stderr_{d}']:.2g}" for d in ("reference_to_q", "q_to_reference")]

    rows = []
    for name in FAMILIES:
        r = results[name]
        closed, knn = r["kl_closed_form_gaussian"], r["kl_knn"]
        rows.append([name, closed["kl_reference_to_q"], closed["kl_q_to_reference"],
                     knn["kl_reference_to_q"] if knn else "n/a", knn["kl_q_to_reference"] if knn else "n/a",
                     *ratio_cells(r.get("kl_ratio")), r["std_ratio_to_reference"]["median"]])
    fknn = floor["knn"]
    rows.append(["floor: full_rank q vs n draws of itself", floor["gaussian_closed_form"]["kl_reference_to_q"],
                 floor["gaussian_closed_form"]["kl_q_to_reference"],
                 fknn["kl_reference_to_q"] if fknn else "n/a", fknn["kl_q_to_reference"] if fknn else "n/a",
                 *ratio_cells(floor.get("ratio")), 1.0])
    distances = _common.markdown_table(["posterior q", "Gaussian KL(ref ‖ q)", "Gaussian KL(q ‖ ref)",
                                "kNN KL(ref ‖ q)", "kNN KL(q ‖ ref)", "ratio KL(ref ‖ q)", "ratio KL(q ‖ ref)",
                                "median std ratio q / NUTS"], rows)
    predictive = _common.markdown_table(
        ["posterior", "test accuracy", "test log loss", "test ECE", "seconds"],
        [[name, results[name]["test"]["accuracy"], results[name]["test"]["log_loss"],
          results[name]["test"]["ece"], results[name]["seconds"]] for name in ("nuts",) + FAMILIES])
    config = metrics["config"]
    ratio_parameters = (config["dimension"] + 1) * (config["dimension"] + 2) // 2
    ratio_shown = bool(floor.get("ratio"))
    knn_values = [results[name]["kl_knn"][direction] for name in FAMILIES
                  for direction in ("kl_reference_to_q", "kl_q_to_reference")]
    agree = []
    for direction, label in (("kl_reference_to_q", "reference → q"), ("kl_q_to_reference", "q → reference")):
        knn_order = results["full_rank"]["kl_knn"][direction] < results["mean_field"]["kl_knn"][direction]
        closed_order = (results["full_rank"]["kl_closed_form_gaussian"][direction]
                        < results["mean_field"]["kl_closed_form_gaussian"][direction])
        agree.append(f"{label}: {'agrees' if knn_order == closed_order else 'disagrees'}")
    floor_knn = max(abs(fknn[d]) for d in ("kl_reference_to_q", "kl_q_to_reference")) if fknn else float("nan")
    family_knn = min(abs(v) for v in knn_values)
    knn_note = (
        f"\n\n**Reading** (computed): the floor row, a perfect q seen through d = {config['dimension']} and "
        f"{config['num_samples']} draws, reads up to {floor_knn:.3g} nats by kNN against at least {family_knn:.3g} "
        "for the two families, so the kNN values "
        + ("are dominated by the estimator's bias at this n and d; read them against the floor row."
           if floor_knn >= 0.5 * family_knn else "stand clear of the estimator's bias at this n and d.")
        + " Ranking of the two families by kNN vs by the closed form: " + "; ".join(agree) + "."
        + (" A negative kNN value (a divergence is >= 0) shows the bias directly: for a q narrower than "
           "the reference, reference draws lie nearer to q's cloud than to each other in high dimension."
           if min(knn_values) < 0 else ""))
    return (
        f"Breast cancer, {config['num_train']} train / {config['num_test']} test, d = {config['dimension']} "
        f"(bias included), prior N(0, {config['prior_scale']}²). NUTS: {config['num_warmup']} warmup + "
        f"{config['num_samples']} draws ({results['nuts']['divergences']} divergences). "
        f"VI: {config['steps']} Adam steps, {config['samples_per_step']} draws per step, closed-form KL "
        "to the prior. Distances (nats) from the NUTS reference: closed form between Gaussians "
        f"(ref = Gaussian fitted to the NUTS draws) and kljax.knn.kl (estimator {config['knn_estimator']!r}, "
        f"k = {config['knn_k']}) and kljax.ratio.kl (cross-fitted quadratic classifier, penalty "
        f"{config['ratio_penalty']:g}, extrapolation {'on' if config['ratio_extrapolate'] else 'off'}, ± its "
        "standard error) on whitened draws. The ratio estimate's error does not grow with d through neighbour "
        f"distances, but its quadratic model has {ratio_parameters} parameters for {config['num_samples']} "
        "draws per side: "
        + (f"fewer than {config['ratio_min_draws_per_parameter']:g} draws per parameter, so the ratio columns are "
           "not computed at this scale (measured on a Gaussian pair in d = 31 with KL 4.18: 11.6-12.9 nats at "
           "500 draws)." if not ratio_shown else
           "this setting read +17 % on a Gaussian pair in d = 31 with KL 4.18 at 4000 draws, more than its "
           "standard error says; read the ratio columns as biased upward, and the floor row as their bias at "
           "this n.")
        + f"{knn_note}\n\n{distances}\n\n{predictive}\n\n"
        f"![posteriors]({rel_dir}/posteriors.png)\n\n![reliability]({rel_dir}/reliability.png)\n"
    )


if __name__ == "__main__":
    _common.run_main(main)
