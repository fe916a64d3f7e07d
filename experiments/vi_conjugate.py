"""Variational inference on a conjugate Gaussian model: closed-form KL, Monte Carlo KL, sticking the landing.

Model: z ~ N(0, s0^2), x_i | z ~ N(z, s^2) for i = 1..n. The posterior is Gaussian,

    p(z | x) = N(m, v),   1 / v = 1 / s0^2 + n / s^2,   m = v * sum(x) / s^2,

and the log evidence is closed form, log p(x) = log N(x; 0, s^2 I + s0^2 1 1^T). A Gaussian
q(z) = N(mu, exp(log_scale)^2) contains the posterior, so the ELBO's maximum equals log p(x) exactly.

Three reparameterised (z = mu + sigma * eps) single-sample ELBO gradient estimators are compared:

- ``analytic_kl``: E_q[log p(x | z)] estimated by sampling, KL(q || prior) in closed form (kljax.analytic.kl);
- ``mc_kl``: the KL term estimated from the same sample with kljax.mc's k1 (log q(z) - log p(z));
  this is the plain "total derivative" estimator of the ELBO log p(x, z) - log q(z);
- ``stl``: sticking the landing (Roeder, Wu and Duvenaud 2017, the path-derivative estimator): the
  same estimate with q's parameters held fixed (stop_gradient) inside log q(z), which drops the score
  term -d/dphi log q_phi(z) (mean zero, but not variance zero).

At q = p(z | x), log p(x, z) - log q(z) = log p(x) for every z, so its derivative in z is 0 and the STL
gradient (d/dz)(...) * dz/dphi is exactly 0 for every eps: zero variance. The total-derivative estimator
keeps the score term, -(eps / sigma, eps^2 - 1) for (mean, log scale), whose variance is (1 / v, 2).

A misspecified target shows what is *not* true by construction: with a Student-t likelihood
(``--misspecified-df``, default 3) and data in two clusters (``--misspecified-data``) the posterior has
two modes, so no q in the family makes log p(x, z) - log q(z) constant and STL's gradient keeps
a variance at the best q* (found by quadrature and SciPy); the fits and the gradient variances at q*
are measured the same way, the ELBO gap by quadrature. Where a variance is infinite (the k3 KL term
when the posterior variance is below half the prior's, E_q[(prior/q)^2] diverging) it is reported and
drawn as infinite, with its sample estimates at several numbers of draws (which do not settle) beside it.

    python -m experiments.vi_conjugate --data 0.5,1.2,-0.3,0.8,1.0 --prior-scale 1 --noise-scale 1

References:
    Roeder, Wu, Duvenaud (2017). Sticking the Landing: Simple, Lower-Variance Gradient Estimators
    for Variational Inference. NeurIPS. https://arxiv.org/abs/1703.09194
    Kingma, Welling (2014). Auto-Encoding Variational Bayes. ICLR. Section 2.3: the SGVB estimators
    L^A (all Monte Carlo) and L^B (KL term in closed form).
"""

from __future__ import annotations

import dataclasses
import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _common, _stats, _train
from kljax import analytic, distributions, mc

TITLE = "VI on a conjugate Gaussian model: closed-form KL vs Monte Carlo KL vs sticking the landing"
ORDER = 50

ESTIMATORS = ("analytic_kl", "mc_kl", "stl")


def exact_posterior(data, prior_scale, noise_scale):
    """Posterior mean and variance of z given x (conjugate normal-normal update)."""
    data = np.asarray(data, dtype=np.float64)
    precision = 1.0 / prior_scale**2 + data.size / noise_scale**2
    var = 1.0 / precision
    return var * data.sum() / noise_scale**2, var


def log_evidence(data, prior_scale, noise_scale):
    """log N(x; 0, s^2 I + s0^2 1 1^T), via the matrix determinant lemma and Sherman-Morrison."""
    x = np.asarray(data, dtype=np.float64)
    n = x.size
    ratio = n * prior_scale**2 / noise_scale**2
    log_det = 2 * n * math.log(noise_scale) + math.log1p(ratio)
    quad = (x @ x - prior_scale**2 * x.sum() ** 2 / (noise_scale**2 * (1 + ratio))) / noise_scale**2
    return -0.5 * (n * math.log(2 * math.pi) + log_det + quad)


def _q(params, stop=False):
    loc, log_scale = params[0], params[1]
    if stop:
        loc, log_scale = jax.lax.stop_gradient(loc), jax.lax.stop_gradient(log_scale)
    return distributions.Normal(loc, jnp.exp(log_scale))


def log_likelihood(z, data, noise_scale, df=None):
    """sum_i log p(x_i | z) for each z (shape (S,)): Normal(z, s^2), or Student-t(df, z, s) when ``df``."""
    residual = (data[None, :] - z[:, None]) / noise_scale
    if df is None:
        terms = -0.5 * residual**2 - 0.5 * math.log(2 * math.pi)
    else:
        terms = jax.scipy.stats.t.logpdf(residual, df)
    return jnp.sum(terms, axis=-1) - data.size * math.log(noise_scale)


def negative_elbo(params, key, *, data, prior_scale, noise_scale, estimator, num_samples=1, df=None):
    """Single-batch Monte Carlo negative ELBO whose gradient is the named estimator.

    Args:
        params: (mean, log scale) of q, shape (2,).
        key: PRNG key for eps.
        data: observations x, shape (n,).
        prior_scale, noise_scale: s0 and s.
        estimator: "analytic_kl", "mc_kl" (k1), "mc_kl_k3" or "stl".
        num_samples: S, reparameterised draws averaged.
        df: None for the Gaussian likelihood; degrees of freedom of a Student-t likelihood otherwise.

    Returns:
        The scalar -ELBO estimate; its ``jax.grad`` is the estimator's gradient.
    """
    q = _q(params)
    prior = distributions.Normal(jnp.zeros_like(params[0]), jnp.full_like(params[0], prior_scale))
    z = q.sample(key, (num_samples,))
    if df is None:
        likelihood = distributions.Normal(z[:, None], jnp.full_like(z[:, None], noise_scale))
        log_lik = jnp.sum(likelihood.log_prob(jnp.broadcast_to(data, (num_samples, data.size))), -1)
    else:
        log_lik = log_likelihood(z, data, noise_scale, df)
    if estimator == "analytic_kl":
        kl_term = analytic.kl(q, prior)
    elif estimator == "mc_kl":
        kl_term = mc.kl(q.log_prob(z), prior.log_prob(z), estimator="k1")
    elif estimator == "mc_kl_k3":
        kl_term = mc.kl(q.log_prob(z), prior.log_prob(z), estimator="k3")
    elif estimator == "stl":
        # Roeder et al. 2017: the path derivative only; q's parameters are constants in log q.
        kl_term = mc.kl(_q(params, stop=True).log_prob(z), prior.log_prob(z), estimator="k1")
    else:
        raise ValueError(f"unknown estimator {estimator!r}")
    return kl_term - jnp.mean(log_lik)


def fit(keys, *, data, prior_scale, noise_scale, estimator, steps, learning_rate, num_samples, df=None):
    """Adam on the estimator's gradient from q = prior, one run per key (a seed); returns the
    (seeds, steps + 1, 2) parameter paths, all seeds as one compiled, vectorised program.

    The learning rate drops 25-fold after the first quarter of the steps.
    """
    params = jnp.array([0.0, math.log(prior_scale)], dtype=data.dtype)
    # Large steps to get near, then small ones whose iterates are averaged (Polyak and Juditsky 1992).
    optimizer = optax.adam(optax.piecewise_constant_schedule(learning_rate, {steps // 4: 0.04}))
    loss = lambda p, k: negative_elbo(p, k, data=data, prior_scale=prior_scale, noise_scale=noise_scale,
                                      estimator=estimator, num_samples=num_samples, df=df)

    def one(key):
        _, path = _train.fit(params, loss, optimizer=optimizer, xs=jax.random.split(key, steps), trace="params")
        return jnp.concatenate([params[None], path], axis=0)

    return jax.jit(jax.vmap(one))(keys)


@functools.partial(jax.jit, static_argnames=("prior_scale", "noise_scale", "estimator", "df"))
def _gradients(params, keys, data, *, prior_scale, noise_scale, estimator, df):
    grad = jax.grad(lambda p, k: negative_elbo(p, k, data=data, prior_scale=prior_scale,
                                               noise_scale=noise_scale, estimator=estimator, df=df))
    return jax.vmap(grad, in_axes=(None, 0))(params, keys)


def gradients(keys, params, *, data, prior_scale, noise_scale, estimator, num_draws, df=None):
    """``num_draws`` single-sample (S = 1) gradients at ``params`` per key (a seed): one (num_draws, 2)
    float64 array per key, in a list."""
    return [np.asarray(_gradients(params, jax.random.split(key, num_draws), data, prior_scale=prior_scale,
                                  noise_scale=noise_scale, estimator=estimator, df=df), dtype=np.float64)
            for key in keys]


def gradient_variance(keys, params, *, data, prior_scale, noise_scale, estimator, num_draws, df=None):
    """Per-coordinate variance and mean of ``num_draws`` single-sample (S = 1) gradients at ``params``,
    once per key (a seed): two arrays of shape (seeds, 2)."""
    grads = gradients(keys, params, data=data, prior_scale=prior_scale, noise_scale=noise_scale,
                      estimator=estimator, num_draws=num_draws, df=df)
    return np.asarray([g.var(axis=0, ddof=1) for g in grads]), np.asarray([g.mean(axis=0) for g in grads])


def _summary(per_seed) -> dict:
    """Seed mean, 95% t half-width and the per-seed values of a (seeds, ...) array, per trailing entry."""
    per_seed = np.asarray(per_seed, dtype=np.float64)
    flat = per_seed.reshape(per_seed.shape[0], -1)
    pairs = [_stats.interval(flat[:, j]) for j in range(flat.shape[1])]
    shape = per_seed.shape[1:]
    return {"mean": np.reshape([m for m, _ in pairs], shape).tolist(),
            "ci95": np.reshape([h for _, h in pairs], shape).tolist(), "per_seed": per_seed.tolist()}


def _paired_family(per_seed: dict, pairs, what: str, number="{:.3g}", log=False) -> list[str]:
    """Paired t-tests (seeds pair the runs: common random numbers) of ``pairs`` of ``per_seed`` values,
    Holm-corrected as one family; one sentence per pair saying whether the difference is significant.
    ``log``: test the log10 of the (positive, skewed) values; the intervals stay those of the values."""
    tested = {name: np.log10(np.maximum(np.asarray(v, float), 1e-300)) if log else v for name, v in per_seed.items()}
    p_values = [_stats.paired_p(tested[a], tested[b]) for a, b in pairs]
    adjusted = _stats.holm_adjusted(p_values)
    sentences = []
    for (a, b), p, q in zip(pairs, p_values, adjusted):
        (mean_a, half_a), (mean_b, half_b) = _stats.interval(per_seed[a]), _stats.interval(per_seed[b])
        values = (f"{number.format(mean_a)} ± {number.format(half_a)} vs "
                  f"{number.format(mean_b)} ± {number.format(half_b)}")
        if np.isnan(p):
            sentences.append(f"{a} vs {b}, {what}: {values} (one seed: no test).")
        elif q < _stats.SIGNIFICANCE:
            sentences.append(f"{a} has {'higher' if mean_a > mean_b else 'lower'} {what} than {b}: {values} "
                             f"(paired t-test p = {p:.2g}, Holm-adjusted {q:.2g}).")
        else:
            sentences.append(f"{a} vs {b}, {what}: {values}, difference not significant (paired t-test "
                             f"p = {p:.2g}, Holm-adjusted {q:.2g}).")
    return sentences


# Quadrature for the misspecified (Student-t likelihood) model: the posterior on a fine grid, the ELBO of a
# Gaussian q by Gauss-Hermite nodes (exact for polynomials of degree < 2 * 80 against q).
_HERMITE_NODES, _HERMITE_WEIGHTS = np.polynomial.hermite_e.hermegauss(80)
_HERMITE_WEIGHTS = _HERMITE_WEIGHTS / _HERMITE_WEIGHTS.sum()


def _numpy_log_joint(z, data, prior_scale, noise_scale, df):
    from scipy import stats

    z = np.asarray(z, dtype=np.float64)
    residual = (np.asarray(data)[None, :] - z[:, None]) / noise_scale
    log_lik = np.sum(stats.t.logpdf(residual, df), axis=-1) - len(data) * math.log(noise_scale)
    return log_lik + stats.norm.logpdf(z, 0.0, prior_scale)


def misspecified_evidence(data, prior_scale, noise_scale, df):
    """log p(x) = log int p(x, z) dz by the trapezoid rule on a grid wide enough for prior and data."""
    half_width = 12 * max(prior_scale, noise_scale) + np.max(np.abs(data))
    grid = np.linspace(-half_width, half_width, 200_001)
    log_joint = _numpy_log_joint(grid, data, prior_scale, noise_scale, df)
    top = log_joint.max()
    return float(top + math.log(np.trapezoid(np.exp(log_joint - top), grid)))


def misspecified_elbo(mean, scale, data, prior_scale, noise_scale, df):
    """ELBO of q = N(mean, scale^2): E_q[log p(x, z)] (Gauss-Hermite) + H(q)."""
    z = mean + scale * _HERMITE_NODES
    return float(_HERMITE_WEIGHTS @ _numpy_log_joint(z, data, prior_scale, noise_scale, df)
                 + 0.5 * math.log(2 * math.pi * math.e * scale**2))


def misspecified_optimum(data, prior_scale, noise_scale, df):
    """The best Gaussian q* = argmax ELBO (a two-mode posterior gives several local optima): BFGS on
    (mean, log scale) from every observation, the median and zero, each at three scales; the best end."""
    from scipy import optimize

    best = None
    for mean in [*data, float(np.median(data)), 0.0]:
        for scale in (noise_scale, 1.0, prior_scale):
            result = optimize.minimize(lambda v: -misspecified_elbo(v[0], math.exp(v[1]), data, prior_scale,
                                                                    noise_scale, df),
                                       np.array([mean, math.log(scale)]), method="BFGS", options={"gtol": 1e-10})
            if best is None or result.fun < best.fun:
                best = result
    return float(best.x[0]), float(math.exp(best.x[1])), float(-best.fun)


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    data: tuple[float, ...] = (0.5, 1.2, -0.3, 0.8, 1.0)  # observations x_i
    prior_scale: float = 1.0  # s0, prior standard deviation of z
    noise_scale: float = 1.0  # s, standard deviation of x_i given z
    steps: int = 20000  # Adam steps per fit
    learning_rate: float = 0.05
    samples_per_step: int = 1  # S, reparameterised draws per step
    num_draws: int = 200_000  # single-sample gradients drawn for the variance at the posterior
    misspecified_data: tuple[float, ...] = (0.5, 1.2, 4.0, 4.5)  # two clusters: a two-mode posterior
    misspecified_df: float = 3.0  # degrees of freedom of the Student-t likelihood of the misspecified target
    misspecified_prior_scale: float = 3.0
    misspecified_noise_scale: float = 0.3
    variance_growth_draws: tuple[int, ...] = (1000, 10_000, 100_000, 1_000_000)  # draws at which an infinite
    # variance's sample estimate is recorded
    seeds: int = 5  # independent repeats of every fit and measurement (the estimators share each seed's noise)
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(steps=4000, num_draws=20_000, variance_growth_draws=(1000, 10_000, 100_000), seeds=3)


def _fit_summaries(paths, tail, evaluate):
    """Per estimator: the mean of the second half of each seed's iterates, evaluated by ``evaluate(mean,
    var) -> dict``, as seed means with their 95% t half-widths and the per-seed values."""
    averaged = np.asarray(jnp.mean(paths[:, -tail:], axis=1), dtype=np.float64)  # (seeds, 2)
    rows = [{"mean": float(m), "var": float(math.exp(2 * ls)), **evaluate(float(m), math.exp(2 * ls))}
            for m, ls in averaged]
    out = {"per_seed": {key: [row[key] for row in rows] for key in rows[0]}}
    for key in rows[0]:
        out[key], half = _stats.interval(out["per_seed"][key])
        out.setdefault("ci95", {})[key] = half
    return out


def run(config: Config, *, show_progress: bool = False) -> dict:
    """Runs the fits and the gradient-variance measurements, once per seed; returns ``(metrics, kl_paths)``
    with ``kl_paths[estimator]`` of shape (seeds, steps + 1)."""
    if config.seeds < 2:
        raise ValueError(f"seeds must be at least 2 (intervals over seeds need a spread), got {config.seeds}")
    dtype = jnp.result_type(float)
    data = jnp.asarray(config.data, dtype=dtype)
    s0, s = config.prior_scale, config.noise_scale
    post_mean, post_var = exact_posterior(config.data, s0, s)
    evidence = log_evidence(config.data, s0, s)
    posterior = distributions.Normal(jnp.asarray(post_mean, dtype), jnp.asarray(math.sqrt(post_var), dtype))
    key = jax.random.key(config.seed)
    fit_key, grad_key = jax.random.split(key)
    # Common random numbers: within a seed every estimator sees the same eps, so seeds pair the estimators.
    fit_keys, grad_keys = jax.random.split(fit_key, config.seeds), jax.random.split(grad_key, config.seeds)

    def exact_fit(mean, var):
        kl = float(analytic.kl(distributions.Normal(jnp.asarray(mean, dtype), jnp.asarray(math.sqrt(var), dtype)),
                               posterior))
        return {"kl_to_posterior": kl, "elbo": evidence - kl}

    fits, paths = {}, {}
    tail = max(1, config.steps // 2)
    for name in _common.progress(ESTIMATORS, desc="fits", disable=not show_progress):
        path = fit(fit_keys, data=data, prior_scale=s0, noise_scale=s, estimator=name, steps=config.steps,
                   learning_rate=config.learning_rate, num_samples=config.samples_per_step)
        # ELBO(q) = log p(x) - KL(q || p(z | x)) exactly, for every iterate.
        paths[name] = np.asarray(analytic.kl(distributions.Normal(path[..., 0], jnp.exp(path[..., 1])), posterior),
                                 dtype=np.float64)
        # The reported fit averages the second half of the iterates, which removes most SGD jitter.
        fits[name] = _fit_summaries(path, tail, exact_fit)
        fits[name]["last_iterate"] = {"mean": np.asarray(path[:, -1, 0]).tolist(),
                                      "var": np.exp(2 * np.asarray(path[:, -1, 1])).tolist()}

    at_posterior = jnp.array([post_mean, 0.5 * math.log(post_var)], dtype=dtype)
    variances, means = {}, {}
    for name in ("mc_kl", "stl", "analytic_kl", "mc_kl_k3"):
        variances[name], means[name] = gradient_variance(grad_keys, at_posterior, data=data, prior_scale=s0,
                                                         noise_scale=s, estimator=name, num_draws=config.num_draws)

    k3_variance_finite = bool(post_var > s0**2 / 2)
    # An infinite variance's sample estimate keeps growing with the draws; a finite one settles. The draws
    # are nested (the first n of one stream of max(draws)), so one compiled program serves every n.
    growth_keys = jax.vmap(lambda k: jax.random.fold_in(k, 100))(grad_keys)
    growth = {name: np.stack([np.stack([grads[:n].var(axis=0, ddof=1) for n in config.variance_growth_draws])
                              for grads in gradients(growth_keys, at_posterior, data=data, prior_scale=s0,
                                                     noise_scale=s, estimator=name,
                                                     num_draws=max(config.variance_growth_draws))])
              for name in ("mc_kl", "mc_kl_k3")}  # (seeds, draws, 2)

    misspecified = _misspecified_study(config, dtype, jax.random.fold_in(key, 7), show_progress)
    by_term = {"analytic_kl": variances["analytic_kl"], "mc_kl_k1": variances["mc_kl"],
               "mc_kl_k3": variances["mc_kl_k3"], "stl": variances["stl"]}

    metrics = {
        "misspecified": misspecified,
        # per draws count, the median over seeds of the sample variance (d/d mean, d/d log scale)
        "variance_growth": {"draws": list(config.variance_growth_draws),
                            "mc_kl_k1": np.median(growth["mc_kl"], axis=0).tolist(),
                            "mc_kl_k3": np.median(growth["mc_kl_k3"], axis=0).tolist(),
                            "per_seed": {"mc_kl_k1": growth["mc_kl"].tolist(),
                                         "mc_kl_k3": growth["mc_kl_k3"].tolist()}},
        "config": {"data": list(config.data), "prior_scale": s0, "noise_scale": s, "steps": config.steps,
                   "learning_rate": config.learning_rate, "samples_per_step": config.samples_per_step,
                   "num_draws": config.num_draws, "seeds": config.seeds, "seed": config.seed,
                   "dtype": str(np.dtype(dtype))},
        "posterior": {"mean": post_mean, "var": post_var},
        "log_evidence": evidence,
        "fits": fits,
        # seed means; the per-seed values and 95% t half-widths are in grad_variance_by_kl_term_seeds
        "grad_variance_at_posterior": {"total_derivative": variances["mc_kl"].mean(axis=0).tolist(),
                                       "stl": variances["stl"].mean(axis=0).tolist()},
        # The score term -(eps / sigma, eps^2 - 1) has variance (1 / v, 2); the path term is 0 here.
        "grad_variance_at_posterior_theory": {"total_derivative": [1.0 / post_var, 2.0], "stl": [0.0, 0.0]},
        "grad_variance_by_kl_term": {name: v.mean(axis=0).tolist() for name, v in by_term.items()},
        "grad_variance_by_kl_term_seeds": {name: _summary(v) for name, v in by_term.items()},
        "grad_mean_at_posterior": {k: v.mean(axis=0).tolist() for k, v in means.items()},
        # k3 = (r - 1) - log r with r = prior / q: E_q[r^2] = int prior^2 / q is finite only when
        # 2 / s0^2 > 1 / v, so below that the k3 terms and their gradients have infinite variance and the
        # sample variance above grows with the number of draws.
        "k3_variance_finite": k3_variance_finite,
    }
    return metrics, paths


def main(argv: list[str] | None = None) -> dict:
    config, args = _common.parse_config(Config, "vi_conjugate", __doc__.splitlines()[0], argv)
    metrics, paths = run(config, show_progress=not args.no_progress)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _figure(paths, metrics, args.out)
    return metrics


def _misspecified_study(config: Config, dtype, key, show_progress):
    """Fits and gradient variances on the Student-t target, where the Gaussian family misses the posterior,
    once per seed (the estimators share each seed's noise)."""
    data_list = list(config.misspecified_data)
    data = jnp.asarray(data_list, dtype=dtype)
    s0, s, df = config.misspecified_prior_scale, config.misspecified_noise_scale, config.misspecified_df
    evidence = misspecified_evidence(data_list, s0, s, df)
    best_mean, best_scale, best_elbo = misspecified_optimum(data_list, s0, s, df)
    fit_key, grad_key = jax.random.split(key)
    fit_keys, grad_keys = jax.random.split(fit_key, config.seeds), jax.random.split(grad_key, config.seeds)

    def quadrature_fit(mean, var):
        elbo = misspecified_elbo(mean, math.sqrt(var), data_list, s0, s, df)
        return {"elbo": elbo, "gap_to_best": best_elbo - elbo}

    fits = {}
    tail = max(1, config.steps // 2)
    for name in _common.progress(ESTIMATORS, desc="misspecified fits", disable=not show_progress):
        path = fit(fit_keys, data=data, prior_scale=s0, noise_scale=s, estimator=name, steps=config.steps,
                   learning_rate=config.learning_rate, num_samples=config.samples_per_step, df=df)
        fits[name] = _fit_summaries(path, tail, quadrature_fit)
    at_best = jnp.array([best_mean, math.log(best_scale)], dtype=dtype)
    variances = {name: gradient_variance(grad_keys, at_best, data=data, prior_scale=s0, noise_scale=s,
                                         estimator=name, num_draws=config.num_draws, df=df)[0]
                 for name in ("mc_kl", "stl", "analytic_kl")}
    return {"data": data_list, "df": df, "prior_scale": s0, "noise_scale": s, "log_evidence": evidence,
            "best_q": {"mean": best_mean, "var": best_scale**2, "elbo": best_elbo,
                       "kl_to_posterior": evidence - best_elbo},
            "fits": fits,
            "grad_variance_at_best_q": {name: v.mean(axis=0).tolist() for name, v in variances.items()},
            "grad_variance_at_best_q_seeds": {name: _summary(v) for name, v in variances.items()},
            # per seed and coordinate, STL's variance over the total derivative's (same eps)
            "stl_variance_ratio": _summary(variances["stl"] / variances["mc_kl"])}


def _figure(kl_paths, metrics, out_dir):
    import matplotlib.pyplot as plt

    from kljax import plot

    fig, axes = plt.subplots(1, 4, figsize=(20, 4))
    steps = np.arange(next(iter(kl_paths.values())).shape[1])
    evidence = metrics["log_evidence"]
    seeds = metrics["config"]["seeds"]
    for j, (name, kl_path) in enumerate(kl_paths.items()):
        mean, low, high = plot.mean_interval(kl_path, axis=0)
        axes[0].plot(steps, evidence - mean, label=name, lw=1, color=f"C{j}")
        axes[0].fill_between(steps, evidence - high, evidence - low, color=f"C{j}", alpha=0.25, lw=0)
        # On the log scale: the geometric mean and the t band of log10 KL (the Reading tests log10 KL too).
        log_mean, log_low, log_high = plot.mean_interval(np.log10(np.maximum(kl_path, 1e-16)), axis=0)
        axes[1].semilogy(steps, 10**log_mean, label=name, lw=1, color=f"C{j}")
        axes[1].fill_between(steps, 10**log_low, 10**log_high, color=f"C{j}", alpha=0.25, lw=0)
    axes[0].axhline(evidence, color="k", ls="--", lw=1, label="log p(x)")
    axes[0].set_ylim(evidence - 1.5, evidence + 0.1)
    axes[0].set(xlabel="step", ylabel="exact ELBO of the iterate",
                title=f"ELBO vs log evidence (mean of {seeds} seeds, 95% t band)")
    axes[1].set(xlabel="step", ylabel="log p(x) - ELBO = KL(q ‖ posterior)",
                title="gap (geometric mean of seeds, 95% t band of log KL)")
    for ax in axes[:2]:
        ax.legend()

    labels = ["analytic_kl", "mc_kl_k1", "mc_kl_k3", "stl"]
    by_term = metrics["grad_variance_by_kl_term_seeds"]
    infinite = {"mc_kl_k3"} if not metrics["k3_variance_finite"] else set()
    _variance_bars(axes[2], labels, [by_term[name] for name in labels], infinite)
    axes[2].set(title=f"gradient variance at q = exact posterior ({seeds} seeds)")

    mis = metrics["misspecified"]["grad_variance_at_best_q_seeds"]
    _variance_bars(axes[3], ["analytic_kl", "mc_kl_k1", "stl"], [mis[name] for name in ("analytic_kl", "mc_kl", "stl")],
                   set())
    axes[3].set(title=f"misspecified (Student-t, df = {metrics['misspecified']['df']:g}): at the best q*")
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "elbo_and_gradient_variance")


def _variance_bars(ax, labels, summaries, infinite):
    """Variance bars (seed means, 95% t intervals as error bars) on a log scale; an infinite variance is
    drawn as a hatched bar to the top marked ∞."""
    width = 0.38
    positions = np.arange(len(labels))
    finite_values = [v for name, summary in zip(labels, summaries) if name not in infinite
                     for v in summary["mean"] if v > 0]
    top = 10 * max(finite_values) if finite_values else 1.0
    for j, (coordinate, offset) in enumerate((("mean", -width / 2), ("log scale", width / 2))):
        heights = [top if name in infinite else max(summary["mean"][j], 1e-20)
                   for name, summary in zip(labels, summaries)]
        errors = [0.0 if name in infinite else summary["ci95"][j] for name, summary in zip(labels, summaries)]
        bars = ax.bar(positions + offset, heights, width, yerr=errors, capsize=3, label=coordinate, color=f"C{j}")
        for bar, name in zip(bars, labels):
            if name in infinite:
                bar.set_hatch("//")
                bar.set_alpha(0.5)
                ax.annotate("∞", (bar.get_x() + bar.get_width() / 2, top), ha="center", va="bottom", fontsize=12)
    ax.set_yscale("log")
    ax.set_ylim(top=top * 20)
    ax.set_xticks(positions, labels)
    ax.set_ylabel("variance of S = 1 gradient (95% t interval)")
    ax.legend(fontsize=8)


def _growth_reading(growth) -> str:
    """Whether k3's sample variance keeps growing with the draws while k1's settles, per seed (computed)."""
    k3 = np.asarray(growth["per_seed"]["mc_kl_k3"])[:, :, 0]  # (seeds, draws), d/d mean
    k1 = np.asarray(growth["per_seed"]["mc_kl_k1"])[:, :, 0]
    k3_growth = k3[:, -1] / k3[:, 0]
    k1_change = k1.max(axis=1) / k1.min(axis=1)
    grows = int(np.sum(k3_growth > 2 * k1_change))
    return (f"From the fewest to the most draws k3's grew {np.min(k3_growth):.3g}- to {np.max(k3_growth):.3g}-fold "
            f"across the {k3.shape[0]} seeds and k1's varied by a factor {np.max(k1_change):.3g} at most: "
            + (f"k3's does not settle in {grows} of {k3.shape[0]} seeds, as an infinite variance predicts."
               if grows > k3.shape[0] // 2 else
               f"growth beyond twice k1's wobble shows in only {grows} of {k3.shape[0]} seeds at these draws."))


def _cell(summary_mean, half, number="{:.4g}"):
    return f"{number.format(summary_mean)} ± {half:.2g}"


def report(metrics: dict, rel_dir) -> str:
    post = metrics["posterior"]
    seeds = metrics["config"]["seeds"]
    rows = [["exact posterior", post["mean"], post["var"], metrics["log_evidence"], 0.0]]
    for name in ESTIMATORS:
        f = metrics["fits"][name]
        rows.append([name, *[_cell(f[k], f["ci95"][k]) for k in ("mean", "var", "elbo", "kl_to_posterior")]])
    fits = _common.markdown_table(["q", "mean", "var", "ELBO (exact)", "KL(q ‖ posterior)"], rows)
    fit_reading = _paired_family({name: metrics["fits"][name]["per_seed"]["kl_to_posterior"] for name in ESTIMATORS},
                                 [("stl", "analytic_kl"), ("stl", "mc_kl"), ("analytic_kl", "mc_kl")],
                                 "KL(q ‖ posterior) of the fit", log=True)
    theory = metrics["grad_variance_at_posterior_theory"]["total_derivative"]
    by_term = metrics["grad_variance_by_kl_term_seeds"]
    infinite = not metrics.get("k3_variance_finite", True)

    def cells(name):
        summary = by_term[name]
        if infinite and name == "mc_kl_k3":
            return [f"∞ (sample, median of seeds: {np.median(np.asarray(summary['per_seed'])[:, j]):.3g})"
                    for j in range(2)]
        return [_cell(summary["mean"][j], summary["ci95"][j]) for j in range(2)]

    grads = _common.markdown_table(
        ["estimator", "Var d/d mean", "Var d/d log scale"],
        [[name, *cells(name)] for name in by_term]
        + [["theory: total derivative (= mc_kl_k1)", theory[0], theory[1]], ["theory: stl", 0.0, 0.0]],
    )
    k1_seeds = np.asarray(by_term["mc_kl_k1"]["per_seed"])
    theory_p = [_stats.one_sample_p(k1_seeds[:, j], theory[j]) for j in range(2)]
    theory_reading = (
        "The total derivative's measured variances " + (
            "agree with the theory (1/v, 2)" if min(theory_p) >= _stats.SIGNIFICANCE else
            "differ from the theory (1/v, 2)") +
        f" (one-sample t-tests over seeds p = {theory_p[0]:.2g}, {theory_p[1]:.2g}); "
        + " ".join(_paired_family({name: np.asarray(by_term[name]["per_seed"])[:, 0]
                                   for name in ("analytic_kl", "mc_kl_k1", "stl")},
                                  [("stl", "analytic_kl"), ("analytic_kl", "mc_kl_k1")], "Var d/d mean")))
    growth = metrics["variance_growth"]
    growth_text = ", ".join(f"{k3[0]:.3g} at {n} draws" for n, k3 in zip(growth["draws"], growth["mc_kl_k3"]))
    k1_text = ", ".join(f"{k1[0]:.3g}" for k1 in growth["mc_kl_k1"])
    mis = metrics["misspecified"]
    mis_rows = [["best Gaussian q* (quadrature + BFGS)", mis["best_q"]["mean"], mis["best_q"]["var"],
                 mis["best_q"]["elbo"], 0.0]]
    mis_rows += [[name, *[_cell(f[k], f["ci95"][k]) for k in ("mean", "var", "elbo", "gap_to_best")]]
                 for name, f in mis["fits"].items()]
    mis_fits = _common.markdown_table(["q", "mean", "var", "ELBO (quadrature)", "ELBO gap to q*"], mis_rows)
    stuck = {name: int(np.sum(np.asarray(f["per_seed"]["gap_to_best"]) > 0.05)) for name, f in mis["fits"].items()}
    gap_reading = _paired_family({name: f["per_seed"]["gap_to_best"] for name, f in mis["fits"].items()},
                                 [("stl", "analytic_kl"), ("stl", "mc_kl"), ("analytic_kl", "mc_kl")],
                                 "ELBO gap to q*")
    mv = mis["grad_variance_at_best_q_seeds"]
    mis_grads = _common.markdown_table(["estimator", "Var d/d mean", "Var d/d log scale"],
                                       [[name, *[_cell(mv[name]["mean"][j], mv[name]["ci95"][j]) for j in range(2)]]
                                        for name in mv])
    ratio = mis["stl_variance_ratio"]
    ratio_seeds = np.asarray(ratio["per_seed"])
    lower_p = [_stats.one_sided_paired_p(np.asarray(mv["mc_kl"]["per_seed"])[:, j],
                                         np.asarray(mv["stl"]["per_seed"])[:, j]) for j in range(2)]
    lower = all(p < _stats.SIGNIFICANCE for p in lower_p)
    nonzero = bool(np.all(ratio_seeds > 0))
    mis_reading = (
        f"At q* STL's gradient variance is {_cell(ratio['mean'][0], ratio['ci95'][0], '{:.3g}')} times (mean) and "
        f"{_cell(ratio['mean'][1], ratio['ci95'][1], '{:.3g}')} times (log scale) the total derivative's over "
        f"{seeds} seeds: "
        + ("lower in both coordinates" if lower else "not significantly lower in every coordinate")
        + f" (one-sided paired t-tests p = {lower_p[0]:.2g}, {lower_p[1]:.2g})"
        + (", and no longer zero" if nonzero else "")
        + f"; the KL from q* to the posterior is {mis['best_q']['kl_to_posterior']:.4f} nats, which no Gaussian "
        "can remove."
        + (" Reverse KL has several local optima here; fits that ended in a worse one (ELBO gap > 0.05), started, "
           "like the others, from the prior: " + ", ".join(f"{name} in {n} of {seeds} seeds"
                                                            for name, n in stuck.items() if n) + "."
           if any(stuck.values()) else f" Every estimator's fit reached q* at every seed (ELBO gaps above).")
    )
    return (
        f"Data {metrics['config']['data']}, s0 = {metrics['config']['prior_scale']}, "
        f"s = {metrics['config']['noise_scale']}; {metrics['config']['steps']} Adam steps, "
        f"S = {metrics['config']['samples_per_step']} sample per step (fit = mean of the second half of "
        f"the iterates). {seeds} seeds; within a seed the estimators share the noise (common random numbers), "
        "so seeds pair them; ± is the 95% t interval over seeds.\n\n"
        f"{fits}\n\n**Reading** (computed; paired t-tests of log10 KL over seeds, Holm-corrected): " + " ".join(fit_reading)
        + "\n\nVariance of single-sample gradients at q = exact posterior "
        f"({metrics['config']['num_draws']} draws per seed). At the posterior log p(x, z) - log q(z) = log p(x) "
        "for every z, so the STL (path-only) gradient is identically zero; the total derivative keeps the "
        "score term -(eps/sigma, eps^2 - 1) with variance (1/v, 2).\n\n"
        f"{grads}\n\n{theory_reading}\n\n"
        + ("" if not infinite else
           "The k3 KL term's variance is infinite here (∞ in the table and the figure): with r = prior/q, "
           "E_q[r^2] = ∫ prior²/q diverges because the posterior variance is below half the prior variance. "
           f"Its sample variance (d/d mean, median of seeds) as the draws grow: {growth_text}; k1's: {k1_text}. "
           + _growth_reading(growth) + "\n\n")
        + "**Misspecified target** (not true by construction): Student-t likelihood with "
        f"df = {mis['df']:g} and scale {mis['noise_scale']:g}, prior N(0, {mis['prior_scale']:g}²), data "
        f"{mis['data']} in two clusters (log evidence {mis['log_evidence']:.4f} by quadrature). "
        "No Gaussian q equals the posterior, so STL's gradient is no longer zero at the optimum.\n\n"
        f"{mis_fits}\n\nPaired t-tests over seeds, Holm-corrected: " + " ".join(gap_reading) + "\n\n"
        f"Variance of single-sample gradients at q* (seed means ± 95% t interval):\n\n{mis_grads}\n\n"
        f"{mis_reading}\n\n"
        + f"![ELBO and gradient variance]({rel_dir}/elbo_and_gradient_variance.png)\n"
    )


if __name__ == "__main__":
    _common.run_main(main)
