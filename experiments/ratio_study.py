"""Density-ratio (kljax.ratio) against k-NN estimators of KL and MI in high dimension.

    python -m experiments.ratio_study [--quick] [--out results/ratio_study]
    python -m experiments.ratio_study --dims 20 --sizes 5000 --seeds 5 --families covariance,anisotropic

KL cells (d >= 10, n = m >= 5000): the families of ``experiments.knn_accuracy`` (its Gaussian pairs
``shift``, ``correlated``, ``covariance``; ``student_t``, ``mixture`` and ``bounded``, whose truth is its
closed form or Monte Carlo value) and an ``anisotropic`` pair (coordinate scales log-spaced from 0.1 to
10, Q shifted by half a scale and 1.2 times wider in every coordinate; closed form from
``kljax.analytic``). Estimators on the same samples: ``kljax.ratio.kl`` (default: cross-fitted quadratic
logistic classifier; on the ``variational_dims`` x ``variational_sizes`` cells also the MLP classifier
and the NWJ / DV bounds) against ``kljax.knn.kl`` with its default estimator (read from its signature),
``"weighted"`` and ``"wkv"``. Per cell: bias (t interval over seeds), spread, RMSE (bootstrap interval),
seconds per estimate and the ratio RMSE(ratio) / RMSE(best kNN) with a paired bootstrap interval (goal:
at most 0.5 at d >= 10, n >= 5k), and the coverage of ``ratio.kl_with_stderr``'s 2-standard-error interval.

MI cells: x, y in R^10 each (joint d = 20), ``mi_size`` pairs. The "staircase" of Poole et al. 2019 /
Song & Ermon 2020: coordinate pairs correlated with rho chosen so that MI = -5 log(1 - rho^2) steps
through 2, 4, 6, 8, 10 nats. "Beyond normal" tasks (Czyz et al. 2023), each a transform with a known
MI: half-cube (the Gaussian pair seen through h(t) = t |t|^(1/2) on every coordinate) and spiral
(x and y each rotated in their first coordinate plane by an angle ``SPIRAL_SPEED * |v|^2``), both
smooth invertible maps of each variable, so MI is unchanged; and a multivariate Student-t with nu = 5
degrees of freedom (a Gaussian pair divided by one shared sqrt(chi^2_nu / nu)), whose MI is the Gaussian
part -5 log(1 - rho^2) plus h_nu(10) + h_nu(10) - h_nu(20) with h_nu(k) = log G(nu/2) - log G((nu+k)/2)
+ (nu+k)/2 (psi((nu+k)/2) - psi(nu/2)) (Arellano-Valle, Contreras-Reyes & Genton 2013; Czyz et al.
2023), 0.33 nats for nu = 5. Estimators: ``ratio.mutual_information`` (the default telescoped
quadratic classifier; ``.../waymarks=1``, the single joint-vs-shuffled classifier; NWJ and InfoNCE,
whose value cannot exceed log(batch_size); the MLP classifier on the transformed tasks), against KSG
(``kljax.knn.mutual_information``, k = 3) and the k-NN entropies H(X) + H(Y) - H(X, Y)
(``kljax.knn.entropy``, k = 3).

A method is written ``method/model[/option=value...]`` (options of ``kljax.ratio``).

References:
    P. Czyz et al. (2023), "Beyond normal: on the evaluation of mutual information estimators", NeurIPS,
    https://arxiv.org/abs/2306.11078.
    R. B. Arellano-Valle, J. E. Contreras-Reyes, M. G. Genton (2013), "Shannon entropy and mutual
    information for multivariate skew-elliptical distributions", Scand. J. Statist. 40 (Student-t MI).
    B. Poole et al. (2019), "On variational bounds of mutual information", ICML.
    J. Song, S. Ermon (2020), "Understanding the limitations of variational mutual information
    estimators", ICLR (the staircase).
    B. Rhodes, K. Xu, M. U. Gutmann (2020), "Telescoping density-ratio estimation", NeurIPS,
    https://arxiv.org/abs/2006.12204.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import math
import pathlib
import time
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from scipy import stats
from scipy.special import digamma, gammaln

from experiments import _common
from experiments import knn_accuracy
from kljax import analytic, distributions, knn, plot
from kljax import ratio

TITLE = "Density-ratio estimators (kljax.ratio) against k-NN in high dimension: KL and MI"
ORDER = 22

TARGET_RATIO = 0.5  # issue 13: RMSE at most half the best kNN estimator's at d >= 10, n >= 5k
MI_HALF_DIM = 10
STUDENT_DOF = 5
SPIRAL_SPEED = 0.5  # radians per unit of |v|^2 (|v|^2 ~ 10 for the standardised 10-d halves)
GOAL_METHOD = "classifier/quadratic"
BATCH_SIZE = 256  # kljax.ratio's default batch_size: InfoNCE's ceiling is log of it
LEVEL = 0.95


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    families: tuple[str, ...] = ("covariance", "anisotropic", "shift", "correlated", "student_t", "mixture",
                                 "bounded")
    dims: tuple[int, ...] = (10, 20)
    sizes: tuple[int, ...] = (5000, 10000)
    seeds: int = 5
    knn_estimators: tuple[str, ...] = ("weighted", "wkv")
    # The goal is judged on GOAL_METHOD; the others run only on the variational_* cells (they train by
    # stochastic gradients for num_steps and cost ten times more).
    kl_methods: tuple[str, ...] = (GOAL_METHOD,)
    variational_kl_methods: tuple[str, ...] = ("classifier/mlp", "nwj/quadratic", "dv/quadratic")
    variational_families: tuple[str, ...] = ("covariance", "mixture")
    variational_dims: tuple[int, ...] = (20,)
    variational_sizes: tuple[int, ...] = (5000,)
    mi_size: int = 5000
    mi_values: tuple[float, ...] = (2.0, 4.0, 6.0, 8.0, 10.0)
    half_cube_values: tuple[float, ...] = (6.0,)
    spiral_values: tuple[float, ...] = (6.0,)
    student_t_values: tuple[float, ...] = (2.0, 6.0)
    mi_methods: tuple[str, ...] = (GOAL_METHOD, "classifier/quadratic/waymarks=1", "nwj/quadratic",
                                   "infonce/quadratic")
    transform_methods: tuple[str, ...] = ("classifier/mlp",)
    mi_baselines: tuple[str, ...] = ("ksg", "entropies")
    mc_draws: int = 1_000_000
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        # Two KL cells and two staircase steps within the CI budget (35 s on 2 CPU cores); at n = 2000
        # the MI cells would be cheaper but the classifier overfits there.
        return cls(families=("covariance", "anisotropic"), dims=(20,), sizes=(5000,), seeds=2,
                   knn_estimators=("weighted",), variational_kl_methods=(), mi_values=(2.0, 10.0),
                   half_cube_values=(), spiral_values=(), student_t_values=(), mi_methods=(GOAL_METHOD,),
                   transform_methods=(), mi_baselines=("entropies",), mc_draws=100_000)


# ----------------------------------------------------------------------------------------------
# Tasks
# ----------------------------------------------------------------------------------------------

def anisotropic_pair(d: int):
    """(loc_p, tril_p, loc_q, tril_q): scales log-spaced 0.1..10; Q shifted by half a scale, 1.2x wider."""
    scales = np.logspace(-1, 1, d)
    return np.zeros(d), np.diag(scales), 0.5 * scales, np.diag(1.2 * scales)


def closed_form_kl(pair) -> float:
    p = distributions.MultivariateNormalTriL(jnp.asarray(pair[0]), jnp.asarray(pair[1]))
    q = distributions.MultivariateNormalTriL(jnp.asarray(pair[2]), jnp.asarray(pair[3]))
    return float(analytic.kl(p, q))


def kl_truth(family: str, d: int, mc_draws: int, seed: int) -> dict:
    """``{"value", "stderr", "source"}`` of D(P || Q) for one family and dimension."""
    if family == "anisotropic":
        return {"value": closed_form_kl(anisotropic_pair(d)), "stderr": 0.0, "source": "closed form"}
    return knn_accuracy.true_kl(family, d, mc_draws, seed)


def kl_samples(family: str, d: int, n: int, num_seeds: int, seed: int):
    """``num_seeds`` sample sets x ~ P, y ~ Q, each (num_seeds, n, d) float32."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, d, n, 13, sum(map(ord, family))]))
    if family == "anisotropic":
        loc_p, tril_p, loc_q, tril_q = anisotropic_pair(d)
        x = loc_p + rng.standard_normal((num_seeds, n, d)) @ tril_p.T
        y = loc_q + rng.standard_normal((num_seeds, n, d)) @ tril_q.T
    else:
        x = knn_accuracy.draw(family, "p", d, rng, (num_seeds, n))
        y = knn_accuracy.draw(family, "q", d, rng, (num_seeds, n))
    return x.astype(np.float32), y.astype(np.float32)


def half_cube(t):
    """Czyz et al. 2023's half-cube map t |t|^(1/2): smooth, strictly increasing, so MI is unchanged."""
    return t * np.sqrt(np.abs(t))


def spiral(v):
    """Rotation of the first coordinate plane by ``SPIRAL_SPEED * |v|^2`` (Czyz et al. 2023's spiral):
    a diffeomorphism of R^d (its inverse rotates back by the same angle, |v| being unchanged)."""
    angle = SPIRAL_SPEED * np.sum(v * v, axis=-1)
    c, s = np.cos(angle), np.sin(angle)
    out = v.copy()
    out[..., 0], out[..., 1] = c * v[..., 0] - s * v[..., 1], s * v[..., 0] + c * v[..., 1]
    return out


def _student_entropy_term(k: int, dof: float) -> float:
    """h_nu(k) - (k/2) log(nu pi): the part of a standard k-variate Student-t's entropy that does not
    cancel in I(X; Y) = H(X) + H(Y) - H(X, Y) (Arellano-Valle et al. 2013, eq. 7)."""
    half = 0.5 * (dof + k)
    return float(gammaln(0.5 * dof) - gammaln(half) + half * (digamma(half) - digamma(0.5 * dof)))


def student_correction(dof: float, dim_x: int = MI_HALF_DIM, dim_y: int = MI_HALF_DIM) -> float:
    """MI of a multivariate Student-t minus that of the Gaussian with its dispersion matrix (nats)."""
    return (_student_entropy_term(dim_x, dof) + _student_entropy_term(dim_y, dof)
            - _student_entropy_term(dim_x + dim_y, dof))


def mi_samples(mi: float, n: int, num_seeds: int, seed: int, transform: str | None = None):
    """x, y in R^10 each with MI = ``mi`` nats: Gaussian with corr(x_i, y_i) = rho, MI = -5 log(1 - rho^2);
    ``"half_cube"`` / ``"spiral"``: the same through those maps; ``"student_t"``: the Gaussian pair of MI
    ``mi - student_correction(5)`` divided by one shared sqrt(chi^2_5 / 5) per row."""
    gaussian_mi = mi - student_correction(STUDENT_DOF) if transform == "student_t" else mi
    rho = math.sqrt(1.0 - math.exp(-2.0 * gaussian_mi / MI_HALF_DIM))
    rng = np.random.default_rng(np.random.SeedSequence([seed, int(mi * 1000), n, 14]))
    x = rng.standard_normal((num_seeds, n, MI_HALF_DIM))
    y = rho * x + math.sqrt(1 - rho ** 2) * rng.standard_normal((num_seeds, n, MI_HALF_DIM))
    if transform == "half_cube":
        x, y = half_cube(x), half_cube(y)
    elif transform == "spiral":
        x, y = spiral(x), spiral(y)
    elif transform == "student_t":
        scale = np.sqrt(rng.chisquare(STUDENT_DOF, (num_seeds, n, 1)) / STUDENT_DOF)
        x, y = x / scale, y / scale
    return x.astype(np.float32), y.astype(np.float32)


# ----------------------------------------------------------------------------------------------
# Estimators, vmapped over seeds in one jitted call each
# ----------------------------------------------------------------------------------------------

def parse_method(spec: str) -> dict:
    """``"method/model[/option=value...]"`` -> keyword arguments of ``kljax.ratio``."""
    method, model, *rest = spec.split("/")
    options = {"method": method, "model": model}
    for item in rest:
        name, _, text = item.partition("=")
        value: object = text
        for kind in (int, float):
            try:
                value = kind(text)
                break
            except ValueError:
                continue
        options[name] = {"true": True, "false": False}.get(text, value)
    return options


def _timed(fn, *arrays):
    start = time.perf_counter()
    out = jax.block_until_ready(fn(*arrays))
    return jax.tree.map(lambda a: np.asarray(a, np.float64), out), time.perf_counter() - start


# One jitted, vmapped function per estimator and options (cached), so that cells of equal shapes
# share one compilation.
@functools.lru_cache(maxsize=None)
def _ratio_fn(function, options: tuple):
    return jax.jit(jax.vmap(lambda k, a, b: function(k, a, b, **dict(options))))


@functools.lru_cache(maxsize=None)
def _knn_kl_fn(estimator):
    return jax.jit(jax.vmap(partial(knn.kl, estimator=estimator, block_size=1024)))


@functools.lru_cache(maxsize=None)
def _knn_mi_fn(baseline: str):
    if baseline == "ksg":
        return jax.jit(jax.vmap(partial(knn.mutual_information, k=3, block_size=1024)))

    def one(a, b):
        h = partial(knn.entropy, k=3, block_size=1024)
        return h(a) + h(b) - h(jnp.concatenate([a, b], axis=1))
    return jax.jit(jax.vmap(one))


def knn_default() -> str:
    """The default estimator of ``kljax.knn.kl``, read from its signature."""
    return inspect.signature(knn.kl).parameters["estimator"].default


def _ratio(function, spec: str, x, y, seed: int):
    keys = jax.random.split(jax.random.key(seed), x.shape[0])
    options = tuple(sorted(parse_method(spec).items()))
    return _timed(_ratio_fn(function, options), keys, jnp.asarray(x), jnp.asarray(y))


def _cell(values, stderrs, truth, seconds, **labels) -> dict:
    values = np.asarray(values, np.float64)
    errors = values - truth
    _, bias_low, bias_high = plot.mean_interval(errors, level=LEVEL)
    finite = np.where(np.isfinite(errors), errors, np.nan)
    _, rmse_low, rmse_high = plot.bootstrap_interval(finite, lambda e, axis: np.sqrt(np.nanmean(e * e, axis=axis)),
                                                     level=LEVEL)
    row = {**labels, "truth": truth, "seconds_per_estimate": seconds / len(values),
           **knn_accuracy.summarize(values, truth), "bias_ci": [float(bias_low), float(bias_high)],
           "rmse_ci": [float(rmse_low), float(rmse_high)], "values": values.tolist()}
    if stderrs is not None:
        stderrs = np.asarray(stderrs, np.float64)
        row["coverage_2se"] = float(np.mean(np.abs(errors) <= 2 * stderrs))
        row["mean_stderr"] = float(np.mean(stderrs))
        row["stderrs"] = stderrs.tolist()
    return row


def rmse_ratio(values_a, values_b, truth: float, *, num_resamples: int = 2000, seed: int = 0):
    """RMSE(a) / RMSE(b) on the same seeds and its paired percentile-bootstrap interval."""
    errors_a = np.asarray(values_a, np.float64) - truth
    errors_b = np.asarray(values_b, np.float64) - truth
    picks = np.random.default_rng(seed).integers(0, errors_a.size, (num_resamples, errors_a.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled = np.sqrt(np.mean(errors_a[picks] ** 2, 1)) / np.sqrt(np.mean(errors_b[picks] ** 2, 1))
    low, high = np.nanpercentile(resampled, [50 * (1 - LEVEL), 50 * (1 + LEVEL)])
    return float(np.sqrt(np.mean(errors_a ** 2)) / np.sqrt(np.mean(errors_b ** 2))), [float(low), float(high)]


# ----------------------------------------------------------------------------------------------
# Study
# ----------------------------------------------------------------------------------------------

def _check(config: Config) -> None:
    unknown = [f for f in config.families if f != "anisotropic" and f not in knn_accuracy.FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; expected 'anisotropic' or one of {knn_accuracy.FAMILIES}")
    if GOAL_METHOD not in config.kl_methods:
        raise ValueError(f"kl_methods must include {GOAL_METHOD!r} (the goal is judged on it)")
    if config.seeds < 2:
        raise ValueError("seeds must be at least 2 (the spread needs two sets)")
    for spec in config.kl_methods + config.variational_kl_methods + config.mi_methods + config.transform_methods:
        if len(spec.split("/")) < 2:
            raise ValueError(f"a method is 'method/model[/option=value]', got {spec!r}")
    bad = [b for b in config.mi_baselines if b not in ("ksg", "entropies")]
    if bad:
        raise ValueError(f"mi_baselines must be 'ksg' or 'entropies', got {bad}")


def run(config: Config, *, show_progress: bool = True) -> dict:
    """Runs the study; returns the metrics (per-seed values, summaries and intervals per cell)."""
    _check(config)
    seeds = config.seeds
    kl_cells, kl_ratios = [], []
    jobs = [(family, d, n) for family in config.families for d in config.dims for n in config.sizes]
    for family, d, n in _common.progress(jobs, desc="ratio_study KL", disable=not show_progress):
        truth = kl_truth(family, d, config.mc_draws, config.seed)
        x, y = kl_samples(family, d, n, seeds, config.seed)
        labels = {"family": family, "d": d, "n": n, "truth_stderr": truth["stderr"]}
        values = {}
        specs = list(config.kl_methods)
        if family in config.variational_families and d in config.variational_dims and n in config.variational_sizes:
            specs += [s for s in config.variational_kl_methods if s not in specs]
        for spec in specs:
            (value, stderr), seconds = _ratio(ratio.kl_with_stderr, spec, x, y, config.seed)
            kl_cells.append(_cell(value, stderr, truth["value"], seconds, estimator=f"ratio {spec}", **labels))
            values[f"ratio {spec}"] = value
        knn_names = []
        # The default, "weighted" and "wkv": the goal is judged against the best of them in each cell.
        for estimator in dict.fromkeys([knn_default()] + list(config.knn_estimators)):
            value, seconds = _timed(_knn_kl_fn(estimator), jnp.asarray(x), jnp.asarray(y))
            kl_cells.append(_cell(value, None, truth["value"], seconds, estimator=f"knn {estimator}", **labels))
            values[f"knn {estimator}"] = value
            knn_names.append(f"knn {estimator}")
        rmse = {name: float(np.sqrt(np.mean((v - truth["value"]) ** 2))) for name, v in values.items()}
        best_knn = min(knn_names, key=lambda name: rmse[name])
        goal = f"ratio {GOAL_METHOD}"
        ratio_value, ratio_ci = rmse_ratio(values[goal], values[best_knn], truth["value"])
        kl_ratios.append({**labels, "truth": truth["value"], "ratio_rmse": rmse[goal], "best_knn": best_knn,
                          "best_knn_rmse": rmse[best_knn], "rmse_ratio": ratio_value, "rmse_ratio_ci": ratio_ci,
                          "target_met": bool(ratio_value <= TARGET_RATIO),
                          "target_met_surely": bool(ratio_ci[1] <= TARGET_RATIO)})

    mi_cells, mi_ratios = [], []
    mi_jobs = ([(mi, "staircase") for mi in config.mi_values] + [(mi, "half_cube") for mi in config.half_cube_values]
               + [(mi, "spiral") for mi in config.spiral_values]
               + [(mi, "student_t") for mi in config.student_t_values])
    n_mi = config.mi_size
    for mi, task in _common.progress(mi_jobs, desc="ratio_study MI", disable=not show_progress):
        x, y = mi_samples(mi, n_mi, seeds, config.seed, None if task == "staircase" else task)
        labels = {"mi": mi, "task": task, "n": n_mi}
        values = {}
        specs = list(config.mi_methods) + (list(config.transform_methods) if task != "staircase" else [])
        for spec in dict.fromkeys(specs):
            (value, stderr), seconds = _ratio(ratio.mutual_information_with_stderr, spec, x, y, config.seed)
            mi_cells.append(_cell(value, stderr, mi, seconds, estimator=f"ratio {spec}", **labels))
            values[f"ratio {spec}"] = value
        for baseline in config.mi_baselines:
            value, seconds = _timed(_knn_mi_fn(baseline), jnp.asarray(x), jnp.asarray(y))
            name = "knn KSG (k=3)" if baseline == "ksg" else "knn entropies (k=3)"
            mi_cells.append(_cell(value, None, mi, seconds, estimator=name, **labels))
            values[name] = value
        knn_names = [name for name in values if name.startswith("knn")]
        if knn_names and f"ratio {GOAL_METHOD}" in values:
            rmse = {name: float(np.sqrt(np.mean((values[name] - mi) ** 2))) for name in knn_names}
            best_knn = min(knn_names, key=lambda name: rmse[name])
            ratio_value, ratio_ci = rmse_ratio(values[f"ratio {GOAL_METHOD}"], values[best_knn], mi)
            mi_ratios.append({**labels, "best_knn": best_knn, "rmse_ratio": ratio_value, "rmse_ratio_ci": ratio_ci})

    return {
        "config": {**dataclasses.asdict(config), "batch_size": BATCH_SIZE, "infonce_ceiling": math.log(BATCH_SIZE),
                   "student_t_correction": student_correction(STUDENT_DOF), "spiral_speed": SPIRAL_SPEED,
                   "knn_default": knn_default(), "jax": jax.__version__, "backend": jax.default_backend(),
                   "dtype": "float32", "level": LEVEL},
        "kl_cells": kl_cells,
        "kl_ratios": kl_ratios,
        "mi_cells": mi_cells,
        "mi_ratios": mi_ratios,
        "target": {"max_ratio": TARGET_RATIO, "cells_met": sum(r["target_met"] for r in kl_ratios),
                   "cells_met_surely": sum(r["target_met_surely"] for r in kl_ratios),
                   "cells_total": len(kl_ratios)},
    }


def main(argv: list[str] | None = None) -> dict:
    config, args = _common.parse_config(Config, "ratio_study", __doc__.splitlines()[0], argv)
    metrics = run(config, show_progress=not args.no_progress)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _figures(metrics, args.out)
    return metrics


# ----------------------------------------------------------------------------------------------
# Figures and report
# ----------------------------------------------------------------------------------------------

def _figures(metrics: dict, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    ratios = metrics["kl_ratios"]
    if ratios:
        _kl_figures(metrics, out_dir)
    mi_cells = metrics["mi_cells"]
    if mi_cells:
        fig, ax = plt.subplots(figsize=(6.5, 4.8))
        markers = {"staircase": "o", "half_cube": "s", "spiral": "D", "student_t": "^"}
        for name in dict.fromkeys(c["estimator"] for c in mi_cells):
            for task, marker in markers.items():
                rows = sorted((c for c in mi_cells if c["estimator"] == name and c["task"] == task),
                              key=lambda c: c["mi"])
                if not rows:
                    continue
                mean = np.array([c["mean"] for c in rows])
                low = np.array([c["truth"] + c["bias_ci"][0] for c in rows])
                high = np.array([c["truth"] + c["bias_ci"][1] for c in rows])
                ax.errorbar([c["mi"] for c in rows], mean, yerr=[mean - low, high - mean], marker=marker,
                            capsize=2, label=f"{name} ({task})", linestyle="-" if task == "staircase" else "none")
        top = max(c["mi"] for c in mi_cells)
        ax.plot([0, top], [0, top], "k--", lw=0.8, label="truth")
        if any("infonce" in c["estimator"] for c in mi_cells):
            ax.axhline(metrics["config"]["infonce_ceiling"], color="grey", lw=0.8, linestyle=":",
                       label="InfoNCE's log(batch) ceiling")
        ax.set(xlabel="true MI (nats)", ylabel=f"estimate (mean, {LEVEL:.0%} t interval)",
               title=f"MI, x, y in R^{MI_HALF_DIM} each, n = {metrics['config']['mi_size']}")
        ax.legend(fontsize=5)
        _common.save_figure(fig, out_dir, "mi_estimates")


def _kl_figures(metrics: dict, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    ratios = metrics["kl_ratios"]
    fig, ax = plt.subplots(figsize=(max(6.0, 0.55 * len(ratios) + 2), 4))
    positions = np.arange(len(ratios))
    values = np.array([r["rmse_ratio"] for r in ratios])
    low = np.array([r["rmse_ratio_ci"][0] for r in ratios])
    high = np.array([r["rmse_ratio_ci"][1] for r in ratios])
    ax.errorbar(positions, values, yerr=[values - low, high - values], fmt="o", capsize=3, color="black")
    ax.axhline(TARGET_RATIO, color="tab:red", lw=0.8, linestyle="--", label=f"goal {TARGET_RATIO}")
    ax.axhline(1.0, color="grey", lw=0.8, linestyle=":", label="equal RMSE")
    ax.set_xticks(positions, [f"{r['family']}\nd={r['d']}, n={r['n']}" for r in ratios], fontsize=6, rotation=60)
    ax.set_yscale("log")
    ax.set_ylabel("RMSE(ratio classifier) / RMSE(best kNN)")
    ax.set_title(f"KL: RMSE ratio per cell, {LEVEL:.0%} paired bootstrap interval over seeds", fontsize=9)
    ax.legend(fontsize=7)
    _common.save_figure(fig, out_dir, "kl_rmse_ratio")

    cells = metrics["kl_cells"]
    groups = list(dict.fromkeys((c["family"], c["d"], c["n"]) for c in cells))
    names = list(dict.fromkeys(c["estimator"] for c in cells))
    fig, ax = plt.subplots(figsize=(max(6.0, 0.9 * len(groups) + 2), 4.2))
    width = 0.8 / len(names)
    for i, name in enumerate(names):
        rows = [next((c for c in cells if (c["family"], c["d"], c["n"]) == g and c["estimator"] == name), None)
                for g in groups]
        at = [j + i * width for j, r in enumerate(rows) if r is not None]
        kept = [r for r in rows if r is not None]
        rmse = np.array([r["rmse"] for r in kept])
        ax.errorbar(at, rmse, yerr=[rmse - [r["rmse_ci"][0] for r in kept], [r["rmse_ci"][1] for r in kept] - rmse],
                    fmt="o", ms=3, capsize=2, label=name)
    ax.set_xticks(np.arange(len(groups)) + 0.4 - width / 2, [f"{f}\nd={d}, n={n}" for f, d, n in groups], fontsize=6,
                  rotation=60)
    ax.set_yscale("log")
    ax.set_ylabel("RMSE (nats)")
    ax.set_title(f"KL: RMSE over seeds with {LEVEL:.0%} bootstrap interval", fontsize=9)
    ax.legend(fontsize=6)
    _common.save_figure(fig, out_dir, "kl_rmse")


def _interval(c: dict, key: str) -> str:
    return f"[{c[key][0]:+.3f}, {c[key][1]:+.3f}]" if key == "bias_ci" else f"[{c[key][0]:.3f}, {c[key][1]:.3f}]"


def _bias_text(c: dict) -> str:
    significant = c["bias_ci"][0] > 0 or c["bias_ci"][1] < 0
    return f"{c['bias']:+.2f} (95% CI {_interval(c, 'bias_ci')}{'' if significant else ', not significant'})"


def _with_nan(value):
    """metrics.json stores NaN (a diverged training, a bad value) as null: back to NaN for arithmetic."""
    if isinstance(value, dict):
        return {k: v if k in ("config", "target") else _with_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_with_nan(v) for v in value]
    return float("nan") if value is None else value


def reading(metrics: dict) -> list[str]:
    """The conclusions, each computed from the per-seed values."""
    metrics = _with_nan(metrics)
    out = []
    ratios = metrics["kl_ratios"]
    target = metrics["target"]
    missed = [r for r in ratios if not r["target_met"]]

    def describe(r):
        return (f"{r['family']}, d={r['d']}, n={r['n']}: {r['rmse_ratio']:.2f} [{r['rmse_ratio_ci'][0]:.2f}, "
                f"{r['rmse_ratio_ci'][1]:.2f}] vs {r['best_knn']}")

    if ratios:
        values = [r["rmse_ratio"] for r in ratios]
        out.append(f"KL goal RMSE(ratio) <= {TARGET_RATIO} x RMSE(best kNN) at d >= 10, n >= 5k: met in "
                   f"{target['cells_met']} of {target['cells_total']} cells by the point ratio (range "
                   f"{min(values):.2f}-{max(values):.2f}), in {target['cells_met_surely']} with the whole 95% "
                   "interval below it" + (f"; missed at {'; '.join(describe(r) for r in missed)}" if missed else "")
                   + ".")
    cells = metrics["kl_cells"]
    goal_cells = [c for c in cells if c["estimator"] == f"ratio {GOAL_METHOD}"]
    biased = [c for c in goal_cells if c["bias_ci"][0] > 0 or c["bias_ci"][1] < 0]
    if goal_cells:
        cov = np.mean([c["coverage_2se"] for c in goal_cells])
        out.append(f"The quadratic classifier's 2-standard-error interval covered the truth in {100 * cov:.0f}% of "
                   f"{len(goal_cells)} cells x {metrics['config']['seeds']} seeds (nominal 95%). Its bias is "
                   f"significant (95% t interval excluding 0) in {len(biased)} of {len(goal_cells)} cells"
                   + (": " + "; ".join(f"{c['family']} d={c['d']} n={c['n']} {_bias_text(c)} of {c['truth']:.2f}"
                                       for c in biased) if biased else "")
                   + ". Classifier miscalibration shows where log p/q is not quadratic (student_t, mixture, "
                   "bounded): the standard error does not cover that bias.")
    # Variational bounds against the classifier on the cells where they ran.
    for c in cells:
        if c["estimator"] not in ("ratio dv/quadratic", "ratio nwj/quadratic", "ratio classifier/mlp"):
            continue
        base = next(b for b in goal_cells if (b["family"], b["d"], b["n"]) == (c["family"], c["d"], c["n"]))
        ratio_std = c["std"] / base["std"] if base["std"] > 0 else float("inf")
        dof = len(c["values"]) - 1
        p_value = 2 * min(stats.f.sf(ratio_std ** 2, dof, dof), stats.f.cdf(ratio_std ** 2, dof, dof))
        out.append(f"{c['estimator'][6:]} on {c['family']} d={c['d']} n={c['n']} (KL {c['truth']:.2f}): bias "
                   f"{_bias_text(c)}, std {c['std']:.3f} = {ratio_std:.1f}x the quadratic classifier's "
                   f"({'F test p = ' + format(p_value, '.2g')}{'' if p_value < 0.05 else ', not significant'}), "
                   f"RMSE {c['rmse']:.3f} vs {base['rmse']:.3f}, {c['seconds_per_estimate']:.1f} s vs "
                   f"{base['seconds_per_estimate']:.1f} s per estimate.")
    mi_cells = metrics["mi_cells"]
    by = {(c["task"], c["mi"], c["estimator"]): c for c in mi_cells}
    staircase = sorted({c["mi"] for c in mi_cells if c["task"] == "staircase"})
    goal, single = f"ratio {GOAL_METHOD}", "ratio classifier/quadratic/waymarks=1"
    if staircase and ("staircase", staircase[-1], goal) in by:
        parts = []
        for mi in staircase:
            c = by[("staircase", mi, goal)]
            text = f"MI {mi:g}: {_bias_text(c)}"
            if ("staircase", mi, single) in by:
                s = by[("staircase", mi, single)]
                _, p_value = stats.ttest_rel(np.abs(np.subtract(c["values"], mi)), np.abs(np.subtract(s["values"], mi)))
                text += (f" vs single-ratio {_bias_text(s)} (paired t test on |error|: p = {p_value:.2g}"
                         f"{'' if p_value < 0.05 else ', not significant'})")
            parts.append(text)
        out.append("Staircase MI (d = 20), bias of the telescoped classifier: " + "; ".join(parts) + ".")
    ceiling = metrics["config"]["infonce_ceiling"]
    infonce = [c for c in mi_cells if c["estimator"].startswith("ratio infonce")]
    if infonce:
        above = [c for c in infonce if c["truth"] > ceiling]
        out.append(f"InfoNCE cannot exceed log(batch_size) = {ceiling:.2f} nats: "
                   + ("; ".join(f"{c['task']} MI = {c['mi']:g} reads {c['mean']:.2f}" for c in above)
                      if above else "no cell here is above it") + ".")
    nwj = [c for c in mi_cells if c["estimator"].startswith("ratio nwj")]
    if nwj:
        worst = max(nwj, key=lambda c: c["std"])
        out.append(f"NWJ's largest spread over seeds: {worst['std']:.2f} nats at {worst['task']} MI = {worst['mi']:g} "
                   f"(mean {worst['mean']:.2f}); its exp(f - 1) term has variance growing like exp(MI).")
    failed = [c for c in cells + mi_cells if c.get("nonfinite")]
    if failed:
        out.append("Non-finite estimates (a diverged training gives NaN, never a number): " + "; ".join(
            f"{c['estimator']} on {c.get('family', c.get('task'))} (truth {c['truth']:.2f}): {c['nonfinite']} of "
            f"{len(c['values'])} seeds" for c in failed) + ".")
    for r in metrics["mi_ratios"]:
        c = by[(r["task"], r["mi"], goal)]
        knn_cell = by[(r["task"], r["mi"], r["best_knn"])]
        out.append(f"{r['task']} MI = {r['mi']:g}: telescoped classifier RMSE {c['rmse']:.3f} vs {r['best_knn']} "
                   f"{knn_cell['rmse']:.3f} (ratio {r['rmse_ratio']:.2f} [{r['rmse_ratio_ci'][0]:.2f}, "
                   f"{r['rmse_ratio_ci'][1]:.2f}]), bias {_bias_text(c)} vs {knn_cell['bias']:+.2f}.")
    return out


def report(metrics: dict, rel_dir) -> str:
    metrics = _with_nan(metrics)
    cfg = metrics["config"]
    parts = [f"Samples in float32; {cfg['seeds']} seeds per cell, every estimator on the same samples, vmapped over "
             f"seeds in one jitted call (seconds per estimate include compilation, measured on a shared 2-core "
             f"machine). {'Quick scale' if cfg.get('quick') else 'Full size'}: n = "
             f"{', '.join(map(str, cfg['sizes']))} for KL, {cfg['mi_size']} pairs for MI. Intervals: 95% t "
             "interval for the bias, percentile bootstrap over seeds for the RMSE and the RMSE ratio."]
    rows = [[c["family"], c["d"], c["n"], f"{c['truth']:.3f}", c["estimator"], f"{c['bias']:+.3f}",
             _interval(c, "bias_ci"), f"{c['std']:.3f}", f"{c['rmse']:.3f}", _interval(c, "rmse_ci"),
             f"{c['seconds_per_estimate']:.2f}", f"{c['coverage_2se']:.2f}" if "coverage_2se" in c else ""]
            for c in metrics["kl_cells"]]
    if rows:
        parts.append(_common.markdown_table(["family", "d", "n", "true KL", "estimator", "bias", "bias 95% CI",
                                             "std", "RMSE", "RMSE 95% CI", "s / estimate", "2-se coverage"], rows))
        rows = [[r["family"], r["d"], r["n"], r["best_knn"], f"{r['ratio_rmse']:.3f}", f"{r['best_knn_rmse']:.3f}",
                 f"{r['rmse_ratio']:.2f}", f"[{r['rmse_ratio_ci'][0]:.2f}, {r['rmse_ratio_ci'][1]:.2f}]",
                 "yes" if r["target_met"] else "**no**"] for r in metrics["kl_ratios"]]
        parts.append(_common.markdown_table(["family", "d", "n", "best kNN", "RMSE ratio clf.", "RMSE best kNN",
                                             "ratio", "95% CI", f"<= {TARGET_RATIO}"], rows))
    if metrics["mi_cells"]:
        rows = [[c["task"], c["mi"], c["estimator"], f"{c['mean']:.3f}", f"{c['bias']:+.3f}", _interval(c, "bias_ci"),
                 f"{c['std']:.3f}", f"{c['rmse']:.3f}", _interval(c, "rmse_ci"), f"{c['seconds_per_estimate']:.2f}",
                 f"{c['coverage_2se']:.2f}" if "coverage_2se" in c else ""] for c in metrics["mi_cells"]]
        parts.append(_common.markdown_table(["task", "true MI", "estimator", "mean", "bias", "bias 95% CI", "std",
                                             "RMSE", "RMSE 95% CI", "s / estimate", "2-se coverage"], rows))
    parts.append("**Reading** (computed from the per-seed values):\n\n" + "\n".join(f"- {line}" for line in reading(metrics)))
    if metrics["kl_ratios"]:
        parts.append(f"![KL RMSE ratio]({rel_dir}/kl_rmse_ratio.png)")
        parts.append(f"![KL RMSE]({rel_dir}/kl_rmse.png)")
    if metrics["mi_cells"]:
        parts.append(f"![MI estimates]({rel_dir}/mi_estimates.png)")
    return "\n\n".join(parts)


if __name__ == "__main__":
    _common.run_main(main)
