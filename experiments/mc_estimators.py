"""Bias, spread and RMSE of the Monte Carlo KL estimators k1, k2, k3 against sample size and distance.

    python -m experiments.mc_estimators [--quick] [--out results/mc_estimators]
    python -m experiments.mc_estimators --mus 0.5,1 --sigmas 1 --max-n 1000 --seeds 200

P = N(0, 1) and Q = N(mu, sigma^2) for a grid of (mu, sigma), so that D(P || Q) and D(Q || P) are
known in closed form (``kljax.analytic.kl``). For every pair, ``--seeds`` independent sample sets of
size ``max_n`` are drawn from P in one jitted call (seeds batched by ``jax.lax.map`` over vmapped
chunks), and each estimator of ``kljax.mc`` is evaluated on the first n samples of each set (the
running mean of its per-sample terms) for log-spaced n from 1 to ``max_n``. Over seeds this gives,
per (pair, estimator, n), the bias (with its standard error), the standard deviation and the RMSE
against the closed form.

Estimators: ``k1``, ``k2``, ``k3`` (``kljax.mc.kl``, targets D(P || Q)) and ``reverse_k3``
(``kljax.mc.reverse_kl``: importance-weighted r log r - (r - 1), target D(Q || P)). k2 is biased by
design; its exact expectation E_P[(log P/Q)^2] / 2 is recorded as ``k2_expectation`` so that its
measured bias can be checked against the prediction. For sigma^2 >= 2 the density ratio r = Q/P has
E_P[r^2] = inf, so k3 and the reverse estimator have infinite variance (flag ``finite_variance``):
they are still unbiased, but their spread over seeds does not settle.
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
from kljax import analytic, distributions, mc

TITLE = "Monte Carlo KL estimators k1, k2, k3: bias, spread and RMSE"
ORDER = 10

FORWARD = ("k1", "k2", "k3")
REVERSE = "reverse_k3"
ESTIMATORS = FORWARD + (REVERSE,)
REFERENCE_N = 100  # the sample size of the distance figure and the report's relative errors
DTYPE = jnp.float32
SEED_CHUNK = 100  # seeds per vmapped chunk inside the jitted call: bounds memory at max_n = 1e4


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    mus: tuple[float, ...] = (0.1, 0.5, 1.0, 2.0)
    sigmas: tuple[float, ...] = (0.7, 1.0, 1.5)
    max_n: int = 10_000
    seeds: int = 1000
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(max_n=1000, seeds=400)


def sample_sizes(max_n: int) -> list[int]:
    """Log-spaced sample sizes 1, 3, 10, 32, ... up to and including ``max_n`` (half-decades)."""
    sizes = {int(round(10 ** (k / 2))) for k in range(int(2 * math.log10(max_n)) + 1)}
    return sorted(s for s in sizes | {max_n} if s <= max_n)


def k2_expectation(mu: float, sigma: float) -> float:
    """E_P[(log P(x) - log Q(x))^2] / 2 for P = N(0, 1), Q = N(mu, sigma^2), exactly.

    log P/Q = c0 + c1 x + c2 x^2 with x ~ N(0, 1), so E[(.)^2] = c0^2 + c1^2 + 3 c2^2 + 2 c0 c2.
    """
    c0 = mu**2 / (2 * sigma**2) + math.log(sigma)
    c1 = -mu / sigma**2
    c2 = 0.5 / sigma**2 - 0.5
    return 0.5 * (c0**2 + c1**2 + 3 * c2**2 + 2 * c0 * c2)


def log_ratio_variance(mu: float, sigma: float) -> float:
    """Var_P[log P/Q] = Var[k1] for the pair (c1^2 + 2 c2^2 in the notation of ``k2_expectation``)."""
    return (mu / sigma**2) ** 2 + 2 * (0.5 / sigma**2 - 0.5) ** 2


def exact_divergences(mu: float, sigma: float) -> tuple[float, float]:
    """(D(P || Q), D(Q || P)) from ``kljax.analytic`` in float64 NumPy-side arithmetic."""
    p = distributions.Normal(np.float64(0.0), np.float64(1.0))
    q = distributions.Normal(np.float64(mu), np.float64(sigma))
    return float(analytic.kl(p, q)), float(analytic.kl(q, p))


def _estimates_for_pair(key, mu, sigma, *, sizes: tuple[int, ...], num_seeds: int) -> jax.Array:
    """Estimates of shape (num_seeds, len(sizes), len(ESTIMATORS)) for one (mu, sigma)."""
    p = distributions.Normal(jnp.zeros((), DTYPE), jnp.ones((), DTYPE))
    q = distributions.Normal(mu, sigma)
    max_n = sizes[-1]

    terms = (mc.k1, mc.k2, mc.k3, mc.reverse_k3)  # per-sample terms, in ESTIMATORS order
    counts = jnp.asarray(sizes, DTYPE)[:, None]

    def one_seed(seed_key):
        x = p.sample(seed_key, (max_n,))
        log_p, log_q = p.log_prob(x), q.log_prob(x)
        per_sample = jnp.stack([term(log_p, log_q) for term in terms], axis=-1)  # (max_n, estimators)
        # the estimate after the first n samples (mc.kl on log_p[:n], log_q[:n]) is the running mean
        running_sums = jnp.cumsum(per_sample, axis=0)
        return running_sums[jnp.asarray(sizes) - 1] / counts

    keys = jax.random.split(key, num_seeds)
    return jax.lax.map(one_seed, keys, batch_size=min(SEED_CHUNK, num_seeds))


def summarize(estimates: np.ndarray, truth: float) -> dict:
    """Mean, bias, its standard error, standard deviation (ddof=1) and RMSE over seeds."""
    estimates = np.asarray(estimates, dtype=np.float64)
    num_seeds = estimates.shape[0]
    error = estimates - truth
    std = float(np.std(estimates, ddof=1))
    return {
        "mean": float(np.mean(estimates)),
        "bias": float(np.mean(error)),
        "bias_stderr": std / math.sqrt(num_seeds),
        "std": std,
        "rmse": float(np.sqrt(np.mean(error**2))),
        "relative_rmse": float(np.sqrt(np.mean(error**2)) / truth) if truth > 0 else float("nan"),
        "nonfinite": int(np.sum(~np.isfinite(estimates))),
    }


def run(config: Config, *, show_progress: bool = False) -> dict:
    """Runs the study; returns the metrics (per pair, estimator and sample size: bias, spread, RMSE)."""
    if config.seeds < 2 or config.max_n < 1 or min(config.sigmas) <= 0:
        raise ValueError(f"need seeds >= 2, max_n >= 1 and positive sigmas, got seeds={config.seeds}, "
                         f"max_n={config.max_n}, sigmas={config.sigmas}")
    sizes = tuple(sample_sizes(config.max_n))
    num_seeds = config.seeds
    estimate = jax.jit(lambda key, mu, sigma: _estimates_for_pair(key, mu, sigma, sizes=sizes,
                                                                   num_seeds=num_seeds))
    pairs = [(mu, sigma) for sigma in config.sigmas for mu in config.mus]
    base_key = jax.random.key(config.seed)
    results = []
    with _common.Timer() as timer:
        for index, (mu, sigma) in enumerate(_common.progress(pairs, desc="mc_estimators",
                                                             disable=not show_progress)):
            forward, reverse = exact_divergences(mu, sigma)
            values = np.asarray(estimate(jax.random.fold_in(base_key, index), jnp.asarray(mu, DTYPE),
                                         jnp.asarray(sigma, DTYPE)))
            cells = {}
            for e, name in enumerate(ESTIMATORS):
                truth = reverse if name == REVERSE else forward
                cells[name] = [{"n": n, **summarize(values[:, i, e], truth)} for i, n in enumerate(sizes)]
            results.append({
                "mu": mu, "sigma": sigma, "kl": forward, "reverse_kl": reverse,
                "k2_expectation": k2_expectation(mu, sigma),
                "k1_variance": log_ratio_variance(mu, sigma),
                "finite_variance": bool(sigma**2 < 2),
                "estimators": cells,
            })

    table = []
    for pair in results:
        for name in ESTIMATORS:
            last = pair["estimators"][name][-1]
            table.append({"mu": pair["mu"], "sigma": pair["sigma"], "estimator": name,
                          "truth": pair["reverse_kl"] if name == REVERSE else pair["kl"], "n": last["n"],
                          "bias": last["bias"], "bias_stderr": last["bias_stderr"], "std": last["std"],
                          "rmse": last["rmse"], "relative_rmse": last["relative_rmse"]})
    return {
        "config": {"mus": list(config.mus), "sigmas": list(config.sigmas), "sizes": list(sizes),
                   "num_seeds": num_seeds, "seed": config.seed, "dtype": jnp.dtype(DTYPE).name,
                   "estimators": list(ESTIMATORS), "reference_n": min(REFERENCE_N, config.max_n),
                   "jax": jax.__version__, "backend": jax.default_backend()},
        "pairs": results,
        "table": table,
        "seconds": timer.seconds,
    }


def main(argv: list[str] | None = None) -> dict:
    config, args = _common.parse_config(Config, "mc_estimators", __doc__.splitlines()[0], argv)
    metrics = run(config, show_progress=not args.no_progress)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _figures(metrics, args.out)
    return metrics


# ----------------------------------------------------------------------------------------------
# Figures and report
# ----------------------------------------------------------------------------------------------

def _column(rows: list[dict], key: str) -> np.ndarray:
    return np.array([np.nan if r[key] is None else r[key] for r in rows], dtype=np.float64)


def _figures(metrics: dict, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import NullFormatter

    sizes = np.array(metrics["config"]["sizes"], dtype=np.float64)
    sigma_ref = min(metrics["config"]["sigmas"], key=lambda s: abs(s - 1.0))
    shown = [p for p in metrics["pairs"] if p["sigma"] == sigma_ref]
    colors = plt.cm.viridis(np.linspace(0.0, 0.85, max(len(shown), 1)))

    # bias / std / RMSE against n, one column per estimator
    fig, axes = plt.subplots(3, len(ESTIMATORS), figsize=(3.6 * len(ESTIMATORS), 9), sharex=True,
                             squeeze=False)
    for col, name in enumerate(ESTIMATORS):
        for color, pair in zip(colors, shown):
            rows = pair["estimators"][name]
            label = f"mu={pair['mu']:g}"
            axes[0][col].plot(sizes, np.abs(_column(rows, "bias")), "o-", color=color, ms=3, label=label)
            axes[0][col].plot(sizes, 2 * _column(rows, "bias_stderr"), ":", color=color, lw=0.8)
            axes[1][col].plot(sizes, _column(rows, "std"), "o-", color=color, ms=3)
            axes[2][col].plot(sizes, _column(rows, "rmse"), "o-", color=color, ms=3)
        axes[0][col].set_title(f"{name} (target {'D(Q||P)' if name == REVERSE else 'D(P||Q)'})")
        axes[2][col].set_xlabel("sample size n")
        for row in range(3):
            axes[row][col].set_xscale("log")
            axes[row][col].set_yscale("log")
    for row, label in enumerate(("|bias| (dotted: 2 s.e.)", "std over seeds", "RMSE")):
        axes[row][0].set_ylabel(label)
    axes[0][0].legend(fontsize=7, title=f"Q = N(mu, {sigma_ref:g}^2)", title_fontsize=7)
    fig.suptitle("P = N(0,1): error of the Monte Carlo estimators against n")
    _common.save_figure(fig, out_dir, "error_vs_n")

    # relative RMSE and relative bias against the true divergence (mu varies along each line)
    reference_n = metrics["config"]["reference_n"]
    index = int(np.argmin(np.abs(sizes - reference_n)))
    sigmas = metrics["config"]["sigmas"]
    fig, axes = plt.subplots(2, len(sigmas), figsize=(4.2 * len(sigmas), 7.5), squeeze=False)
    for col, sigma in enumerate(sigmas):
        pairs = sorted((p for p in metrics["pairs"] if p["sigma"] == sigma), key=lambda p: p["mu"])
        for color, name in zip(plt.cm.tab10(np.arange(len(ESTIMATORS))), ESTIMATORS):
            truth = np.array([p["reverse_kl"] if name == REVERSE else p["kl"] for p in pairs])
            cells = [p["estimators"][name][index] for p in pairs]
            axes[0][col].plot(truth, _column(cells, "rmse") / truth, "o-", color=color, label=name)
            axes[1][col].plot(truth, np.abs(_column(cells, "bias")) / truth, "o-", color=color)
            axes[1][col].plot(truth, 2 * _column(cells, "bias_stderr") / truth, ":", color=color, lw=0.8)
        note = "" if sigma**2 < 2 else ", E_P[r^2] = inf"
        axes[0][col].set_title(f"Q = N(mu, {sigma:g}^2), n = {int(sizes[index])}{note}", fontsize=9)
        axes[1][col].set_xlabel("true divergence (nats; D(Q||P) for reverse_k3)")
        for row in range(2):
            axes[row][col].set_xscale("log")
            axes[row][col].set_yscale("log")
            axes[row][col].xaxis.set_minor_formatter(NullFormatter())  # no crowded minor labels
    axes[0][0].set_ylabel("RMSE / true divergence")
    axes[1][0].set_ylabel("|bias| / true divergence (dotted: 2 s.e.)")
    axes[0][0].legend(fontsize=7)
    mus = ", ".join(f"{mu:g}" for mu in metrics["config"]["mus"])
    fig.suptitle(f"P = N(0,1): relative error against the distance (mu = {mus})")
    _common.save_figure(fig, out_dir, "error_vs_distance")


def _shared_deviation(pair, name) -> str:
    """Whether the other low-variance estimators, on the same draws, deviate from their exact expectations by
    the same amount as ``name`` does (then the excess is the draws', not the estimator's): a computed clause."""
    deviation = pair["estimators"][name][-1]["bias"]
    others = {"k2": pair["estimators"]["k2"][-1]["bias"] - (pair["k2_expectation"] - pair["kl"]),
              "reverse_k3": pair["estimators"]["reverse_k3"][-1]["bias"]}
    others.pop(name, None)
    shared = all(np.sign(v) == np.sign(deviation) and abs(v - deviation) <= 0.25 * abs(deviation)
                 for v in others.values())
    listed = ", ".join(f"{other} {value:+.2g}" for other, value in others.items())
    if shared:
        return (f" ({deviation:+.2g}), which the other estimators share on the same draws ({listed} from their exact "
                "expectations): a fluctuation of the draws common to all of them, not a bias of the estimator.")
    return f" ({deviation:+.2g}; the other estimators on the same draws: {listed} from their exact expectations): a bias."


def reading(metrics: dict) -> list[str]:
    """The conclusions, each computed from the measured cells (z-tests of the biases, Bonferroni over pairs)."""
    cfg = metrics["config"]
    max_n, sizes = cfg["sizes"][-1], cfg["sizes"]
    index = sizes.index(min(sizes, key=lambda s: abs(s - cfg["reference_n"])))
    finite = [p for p in metrics["pairs"] if p["finite_variance"]]
    # a two-sided z-test of zero bias per pair, Bonferroni-corrected over the finite-variance pairs
    critical = float(scipy.stats.norm.ppf(1 - _stats.SIGNIFICANCE / (2 * max(len(finite), 1))))

    def z_score(pair, name, target=0.0, at=-1):
        cell = pair["estimators"][name][at]
        return abs(cell["bias"] - target) / cell["bias_stderr"] if cell["bias_stderr"] > 0 else float("inf")

    out = []
    for name in ("k1", "k3"):
        worst = max(finite, key=lambda p: z_score(p, name), default=None)
        if worst is None:
            continue
        z = z_score(worst, name)
        out.append(
            f"Unbiasedness of {name} at n = {max_n}: the largest |bias| / standard error over the "
            f"{len(finite)} finite-variance pairs is {z:.2f} (mu={worst['mu']:g}, sigma={worst['sigma']:g}); "
            + (f"below {critical:.2f}, the 5% two-sided threshold with Bonferroni's correction: no significant bias."
               if z < critical else
               f"above {critical:.2f}, the 5% two-sided threshold with Bonferroni's correction: a significant "
               "deviation" + _shared_deviation(worst, name)))
    worst = max(metrics["pairs"], key=lambda p: abs(p["estimators"]["k2"][-1]["bias"]))
    predicted = worst["k2_expectation"] - worst["kl"]
    at_max, at_reference = worst["estimators"]["k2"][-1], worst["estimators"]["k2"][index]
    z_max = z_score(worst, "k2", predicted)
    out.append(
        f"k2's bias is its exact expectation E_P[(log P/Q)^2]/2 minus the KL, largest at mu={worst['mu']:g}, "
        f"sigma={worst['sigma']:g}: measured {at_max['bias']:+.4g} +- {at_max['bias_stderr']:.2g} at n = {max_n} "
        f"({at_reference['bias']:+.4g} at n = {sizes[index]}) vs predicted {predicted:+.4g}, "
        + (f"{z_max:.2f} standard errors apart (not significant): the bias does not shrink with n."
           if z_max < critical else f"{z_max:.2f} standard errors apart: the measurement departs from the prediction."))
    ratios = [(p["estimators"]["k3"][index]["rmse"] / p["estimators"]["k1"][index]["rmse"], p) for p in finite]
    if ratios:
        best, worst_ratio = min(ratios, key=lambda rp: rp[0]), max(ratios, key=lambda rp: rp[0])
        closest_helps = best[1]["kl"] < worst_ratio[1]["kl"]
        out.append(
            f"k3 against k1 (RMSE ratio at n = {sizes[index]}): {best[0]:.2g} at mu={best[1]['mu']:g}, "
            f"sigma={best[1]['sigma']:g} (KL {best[1]['kl']:.3g}) up to {worst_ratio[0]:.2g} at "
            f"mu={worst_ratio[1]['mu']:g}, sigma={worst_ratio[1]['sigma']:g} (KL {worst_ratio[1]['kl']:.3g}): "
            + ("the control variate helps most when P and Q are close." if closest_helps else
               "the largest gain is not at the closest pair here."))
    out.append(f"Total run time {metrics['seconds']:.1f} s.")
    return out


def report(metrics: dict, rel_dir: pathlib.Path) -> str:
    cfg = metrics["config"]
    max_n = cfg["sizes"][-1]
    reference_n = cfg["reference_n"]
    index = cfg["sizes"].index(min(cfg["sizes"], key=lambda s: abs(s - reference_n)))
    parts = [
        f"P = N(0, 1), Q = N(mu, sigma^2); {cfg['num_seeds']} seeds per pair (vmapped, one jitted call per "
        f"pair), {cfg['dtype']}, sample sizes {cfg['sizes'][0]} to {max_n}. k1, k2, k3 target D(P||Q); "
        f"`reverse_k3` (r log r - (r - 1) from samples of P) targets D(Q||P). Cells: RMSE (bias +- its "
        f"standard error) at n = {max_n}, and the relative RMSE at n = {cfg['sizes'][index]}.",
    ]
    header = ["mu", "sigma", "D(P||Q)", "D(Q||P)"] + [f"`{name}`" for name in ESTIMATORS] + \
             [f"rel. RMSE n={cfg['sizes'][index]}: " + " / ".join(ESTIMATORS)]
    rows = []
    for pair in metrics["pairs"]:
        cells = [pair["estimators"][name][-1] for name in ESTIMATORS]
        relative = [pair["estimators"][name][index]["relative_rmse"] for name in ESTIMATORS]
        rows.append([f"{pair['mu']:g}", f"{pair['sigma']:g}" + ("" if pair["finite_variance"] else " *"),
                     f"{pair['kl']:.4f}", f"{pair['reverse_kl']:.4f}"]
                    + [f"{c['rmse']:.3g} ({c['bias']:+.2g} +- {c['bias_stderr']:.1g})" for c in cells]
                    + [" / ".join(f"{v:.2g}" for v in relative)])
    parts.append(_common.markdown_table(header, rows))

    parts.append(
        "Rows marked * have sigma^2 >= 2, where E_P[r^2] = inf: k3 and the reverse estimator are unbiased "
        "but have infinite variance there, so their spread and standard errors are not reliable.\n\n"
        "**Reading** (computed from the numbers above):\n\n" + "\n".join(f"- {line}" for line in reading(metrics)))
    parts.append(f"![bias, std and RMSE against n]({rel_dir}/error_vs_n.png)")
    parts.append(f"![relative error against the true divergence]({rel_dir}/error_vs_distance.png)")
    return "\n\n".join(parts)


if __name__ == "__main__":
    _common.run_main(main)
