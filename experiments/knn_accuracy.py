"""Factorial accuracy study of the kNN KL estimators in ``kljax.knn`` on pairs with a known KL.

    python -m experiments.knn_accuracy [--quick] [--out results/knn_accuracy]
    python -m experiments.knn_accuracy --families shift,student_t --dims 1,10 --seeds 8

Families (P first, Q second; the truth in brackets):

- ``same``: P = Q = N(0, I_d) [0; where WKV's bias is small and any correction only adds variance].
- ``shift``: N(0, I_d) against N(mu, I_d), |mu| = 1 [1/2, closed form].
- ``correlated``: equicorrelated N(0, S), S = (1 - r) I + r 11^T with r = 0.9 (strongly anisotropic),
  against N(mu, S) with a Mahalanobis shift of 1 [1/2, closed form].
- ``covariance``: means, scales and correlations all differ (P: Cholesky factor with 0.25 on the
  sub-diagonal; Q: alternating scales 1.15 / 0.9, -0.1 on the sub-diagonal, |mu| = 1) [closed form,
  grows with d].
- ``student_t``: multivariate t with 4 degrees of freedom, t_4(0, I_d) against t_4(mu, I_d),
  |mu| = 1 [Monte Carlo of log p - log q over ``mc_draws`` draws of P, its standard error reported].
- ``mixture``: 1/2 N(-a u, I_d) + 1/2 N(a u, I_d), a = 1.5, u = 1/sqrt(d), against the Gaussian with the
  same covariance, N(0, I_d + a^2 u u^T) [Monte Carlo, as above].
- ``bounded``: uniform on [0, 1]^d against Beta(2, 2) on the first min(d, 2) coordinates and uniform
  on the others [min(d, 2) (2 - log 6), closed form].

Design (fractional, not the full cartesian product; every level of every factor appears):

1. plane: every family x every d in ``dims`` at n = m in ``plane_sizes`` (1000), k = 1, and every
   family at n = m = ``small_n`` (100) in the high dimensions ``small_n_dims`` (20, 50, 100);
2. size line: n = m over ``sizes`` (100 ... 100k) for ``line_families`` at d in ``line_dims``
   (n above ``line_max_brute_n`` = 1000 only where the k-d tree searches, d <= 6: the brute
   searches at 10k and 100k points in 10-D, 20 seeds and every candidate, do not fit the hour of
   2 shared CPU cores that the full study is given; so n = 10k and 100k are at d = 2);
3. n != m: m = ratio * n for ``unequal_ratios`` at n = ``base_n`` (1000), ``line_families`` x ``line_dims``;
4. orders: k in ``orders`` at n = m = ``base_n``, ``line_families`` x ``line_dims``.

Each cell draws ``seeds`` independent sample sets; every estimator of ``kljax.knn.ESTIMATORS`` (with
its jackknife standard error from ``kl_with_stderr``; ``wkv_adaptive`` without one, and only up to
``max_adaptive_n``; ``corrected``, which simulates four reference sample pairs per estimate, only
with ``candidates``, i.e. not at the CI scale) runs on the same sets in one jitted, vmapped call. Per cell: RMSE (bootstrap
interval over seeds), bias (t interval), the ratio of the default's RMSE to textbook WKV's (paired
bootstrap interval), the goal (ratio <= 1.1, and <= 0.5 where WKV's squared bias exceeds its
variance) met or missed, and the coverage of the 95% jackknife intervals est +- 1.96 se. A SciPy
cKDTree implementation of WKV (and the ``universal-divergence`` package when installed) is run on
the first ``peer_seeds`` sets of each cell as an independent check of kljax's WKV.
"""

from __future__ import annotations

import dataclasses
import inspect
import math
import pathlib
import time
from functools import lru_cache

import jax
import jax.numpy as jnp
import numpy as np
from scipy.spatial import cKDTree
from scipy.special import gammaln

from experiments import _common

TITLE = "kNN KL estimators: a factorial accuracy study (families x d x n x m x k)"
ORDER = 20

# Issue 12: in every cell the default's RMSE is at most 1.1x textbook WKV's, and at most 0.5x where
# WKV's bias dominates (squared bias above its variance over the seeds).
TARGET_RATIO = 0.5
NEVER_WORSE_RATIO = 1.1
# Coverage goal of the 95% jackknife intervals where the bias is small (|bias| <= std / 2).
COVERAGE_GOAL = 0.9
FAMILIES = ("same", "shift", "correlated", "covariance", "student_t", "mixture", "bounded")
CORRELATION = 0.9
T_DOF = 4.0
MIXTURE_OFFSET = 1.5
# Estimators that simulate reference samples (four pairs per estimate): run with ``candidates``.
SIMULATING = ("corrected",)
CKDTREE_PEER = "scipy cKDTree WKV"
UD_PEER = "universal-divergence WKV"


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    families: tuple[str, ...] = FAMILIES
    dims: tuple[int, ...] = (1, 2, 5, 10, 20, 50, 100)
    plane_sizes: tuple[int, ...] = (1000,)
    small_n: int = 100
    small_n_dims: tuple[int, ...] = (20, 50, 100)
    line_families: tuple[str, ...] = ("shift", "correlated", "student_t")
    line_dims: tuple[int, ...] = (2, 10)
    sizes: tuple[int, ...] = (100, 1000, 10000, 100000)
    line_max_brute_n: int = 1000
    base_n: int = 1000
    unequal_ratios: tuple[float, ...] = (0.25, 4.0)
    orders: tuple[int, ...] = (1, 4)
    seeds: int = 20
    peer_seeds: int = 2
    mc_draws: int = 2_000_000
    max_adaptive_n: int = 10000
    candidates: bool = True
    dtype: str = "float32"
    memory_mib: int = 512
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(dims=(1, 10), plane_sizes=(1000,), small_n_dims=(), line_families=("shift",), line_dims=(1,),
                   sizes=(300, 1000), unequal_ratios=(4.0,), orders=(1, 4), seeds=10,
                   peer_seeds=2, mc_draws=400_000, max_adaptive_n=3000, candidates=False)

    def cells(self) -> list[tuple[str, int, int, int, int]]:
        """The design: (family, d, n, m, k), each cell once, in a fixed order."""
        design = []
        for n in self.plane_sizes:
            design += [(f, d, n, n, 1) for f in self.families for d in self.dims]
        design += [(f, d, self.small_n, self.small_n, 1) for f in self.families for d in self.small_n_dims]
        for f in self.line_families:
            for d in self.line_dims:
                design += [(f, d, n, n, 1) for n in self.sizes if n <= self.line_max_brute_n or d <= 6]
                b = self.base_n
                design += [(f, d, b, max(2, int(round(r * b))), 1) for r in self.unequal_ratios]
                design += [(f, d, b, b, k) for k in self.orders]
        return list(dict.fromkeys(design))


# ----------------------------------------------------------------------------------------------
# The families: samplers, log densities and the true KL
# ----------------------------------------------------------------------------------------------

def gaussian_pair(family: str, d: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """(loc_p, scale_tril_p, loc_q, scale_tril_q) of the Gaussian families."""
    eye = np.eye(d)
    if family == "same":
        return np.zeros(d), eye, np.zeros(d), eye
    if family == "shift":
        return np.zeros(d), eye, np.full(d, 1.0 / math.sqrt(d)), eye
    if family == "correlated":
        tril = np.linalg.cholesky((1 - CORRELATION) * eye + CORRELATION * np.ones((d, d)))
        return np.zeros(d), tril, tril @ np.full(d, 1.0 / math.sqrt(d)), tril
    if family == "covariance":
        tril_p = eye + 0.25 * np.eye(d, k=-1)
        scales_q = np.where(np.arange(d) % 2 == 0, 1.15, 0.9)
        return np.zeros(d), tril_p, np.full(d, 1.0 / math.sqrt(d)), np.diag(scales_q) - 0.1 * np.eye(d, k=-1)
    raise ValueError(f"{family!r} is not a Gaussian family")


def gaussian_kl(loc_p, tril_p, loc_q, tril_q) -> float:
    """Closed-form D(N(loc_p, L_p L_p^T) || N(loc_q, L_q L_q^T)) in nats, in float64 NumPy.

    0.5 * (tr(S_q^-1 S_p) + (mu_q - mu_p)^T S_q^-1 (mu_q - mu_p) - d + log det S_q - log det S_p)
    (e.g. Rasmussen and Williams 2006, eq. A.23), evaluated through triangular solves.
    """
    from scipy.linalg import solve_triangular

    d = loc_p.shape[0]
    a = solve_triangular(tril_q, tril_p, lower=True)  # L_q^-1 L_p, so tr(S_q^-1 S_p) = ||a||_F^2
    b = solve_triangular(tril_q, loc_q - loc_p, lower=True)
    log_det = 2.0 * (np.sum(np.log(np.abs(np.diag(tril_q)))) - np.sum(np.log(np.abs(np.diag(tril_p)))))
    return float(0.5 * (np.sum(a * a) + np.sum(b * b) - d + log_det))


def _unit(d: int) -> np.ndarray:
    return np.full(d, 1.0 / math.sqrt(d))


def draw(family: str, which: str, d: int, rng: np.random.Generator, shape: tuple[int, ...]) -> np.ndarray:
    """Draws of P (``which="p"``) or Q (``"q"``) of ``family`` in dimension d, shape ``shape + (d,)``."""
    if family in ("same", "shift", "correlated", "covariance"):
        loc_p, tril_p, loc_q, tril_q = gaussian_pair(family, d)
        loc, tril = (loc_p, tril_p) if which == "p" else (loc_q, tril_q)
        return loc + rng.standard_normal(shape + (d,)) @ tril.T
    if family == "student_t":
        z = rng.standard_normal(shape + (d,)) / np.sqrt(rng.chisquare(T_DOF, shape + (1,)) / T_DOF)
        return z if which == "p" else z + _unit(d)
    if family == "mixture":
        z = rng.standard_normal(shape + (d,))
        if which == "p":
            sign = np.where(rng.random(shape + (1,)) < 0.5, -1.0, 1.0)
            return z + sign * MIXTURE_OFFSET * _unit(d)
        return z + rng.standard_normal(shape + (1,)) * MIXTURE_OFFSET * _unit(d)
    if family == "bounded":
        u = rng.random(shape + (d,))
        if which == "q":
            u[..., :min(d, 2)] = rng.beta(2.0, 2.0, shape + (min(d, 2),))
        return u
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def log_ratio(family: str, x: np.ndarray) -> np.ndarray:
    """log p(x) - log q(x) for the Monte Carlo families (float64; constants common to p and q dropped)."""
    d = x.shape[-1]
    if family == "student_t":
        shifted = x - _unit(d)
        return -0.5 * (T_DOF + d) * (np.log1p(np.sum(x * x, -1) / T_DOF)
                                     - np.log1p(np.sum(shifted * shifted, -1) / T_DOF))
    if family == "mixture":
        s = x @ _unit(d)  # p and q differ only along u; the orthogonal part is N(0, I) in both
        a = MIXTURE_OFFSET
        log_p = np.logaddexp(-0.5 * (s - a) ** 2, -0.5 * (s + a) ** 2) - math.log(2.0)
        log_q = -0.5 * s * s / (1 + a * a) - 0.5 * math.log(1 + a * a)
        return log_p - log_q
    raise ValueError(f"{family!r} has a closed form; no Monte Carlo needed")


def true_kl(family: str, d: int, mc_draws: int, seed: int) -> dict:
    """The truth of one (family, d): closed form (``stderr`` 0) or Monte Carlo (``stderr`` > 0)."""
    if family in ("same", "shift", "correlated", "covariance"):
        return {"value": gaussian_kl(*gaussian_pair(family, d)), "stderr": 0.0, "source": "closed form"}
    if family == "bounded":
        beta_22 = -gammaln(4.0) + 2 * gammaln(2.0)  # log B(2, 2) = -log 6
        return {"value": min(d, 2) * (beta_22 + 2.0), "stderr": 0.0, "source": "closed form"}
    rng = np.random.default_rng(np.random.SeedSequence([seed, 7919, d, FAMILIES.index(family)]))
    total, total_sq, done, chunk = 0.0, 0.0, 0, max(1, min(mc_draws, 2 ** 22 // d))
    while done < mc_draws:
        size = min(chunk, mc_draws - done)
        values = log_ratio(family, draw(family, "p", d, rng, (size,)))
        total, total_sq, done = total + values.sum(), total_sq + np.square(values).sum(), done + size
    mean = total / done
    std = math.sqrt(max(total_sq / done - mean * mean, 0.0))
    return {"value": mean, "stderr": std / math.sqrt(done), "source": f"Monte Carlo ({done} draws of P)"}


def sample_sets(family: str, seed: int, d: int, n: int, m: int, num_sets: int, dtype) -> tuple[np.ndarray, np.ndarray]:
    """``num_sets`` independent pairs x ~ P (num_sets, n, d), y ~ Q (num_sets, m, d) in ``dtype``.

    Points of a set that, after rounding to ``dtype``, coincide with an earlier point of x or y are
    redrawn (the study measures the estimators, not the tie policy, which has its own tests).
    """
    rng = np.random.default_rng(np.random.SeedSequence([seed, FAMILIES.index(family), d, n, m]))
    x = draw(family, "p", d, rng, (num_sets, n)).astype(dtype)
    y = draw(family, "q", d, rng, (num_sets, m)).astype(dtype)
    for s in range(num_sets):
        while True:
            both = np.concatenate([x[s], y[s]])
            _, first = np.unique(both, axis=0, return_index=True)
            repeated = np.setdiff1d(np.arange(n + m), first)
            if repeated.size == 0:
                break
            in_x, in_y = repeated[repeated < n], repeated[repeated >= n] - n
            x[s, in_x] = draw(family, "p", d, rng, (in_x.size,)).astype(dtype)
            y[s, in_y] = draw(family, "q", d, rng, (in_y.size,)).astype(dtype)
    return x, y


# ----------------------------------------------------------------------------------------------
# Peers and kljax
# ----------------------------------------------------------------------------------------------

def ckdtree_wkv(x: np.ndarray, y: np.ndarray, k: int) -> float:
    """Textbook WKV (Wang, Kulkarni, Verdu 2009, eq. 5) with SciPy's cKDTree, in float64."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    n, d = x.shape
    rho = cKDTree(x).query(x, k=k + 1)[0][:, k]  # neighbour 0 is x_i itself
    nu = cKDTree(y).query(x, k=[k])[0][:, 0]
    return float(d * np.mean(np.log(nu / rho)) + np.log(y.shape[0] / (n - 1)))


def universal_divergence_available() -> bool:
    import importlib.util

    return importlib.util.find_spec("universal_divergence") is not None


def universal_divergence_wkv(x: np.ndarray, y: np.ndarray, k: int) -> float:
    from universal_divergence import estimate

    return float(estimate(np.asarray(x, dtype=np.float64), np.asarray(y, dtype=np.float64), k=k))


def estimator_names() -> tuple[list[str], str]:
    """(every estimator name ``knn.kl`` accepts, the default one), read from the module itself."""
    from kljax import knn

    default = inspect.signature(knn.kl).parameters["estimator"].default
    names = list(knn.ESTIMATORS)
    if default not in names:
        raise RuntimeError(f"default estimator {default!r} is not among kljax.knn.ESTIMATORS {names}")
    return names, default


@lru_cache(maxsize=None)
def _estimates_fn(k: int, adaptive: bool, candidates: bool):
    """One jitted, vmapped function: every estimator and candidate with its jackknife standard error
    (``knn._kl_study``: one pair of searches serves them all; its values equal ``knn.kl_with_stderr``'s,
    which the tests check), and ``"wkv_adaptive"`` (no standard error) from ``knn.kl``."""
    from kljax import knn

    def one(x, y):
        out = knn._kl_study(x, y, k=k, candidates=candidates)
        if adaptive:
            out["wkv_adaptive"] = (knn.kl(x, y, k=k, estimator="wkv_adaptive"), jnp.full((), jnp.nan, x.dtype))
        return out

    return jax.jit(jax.vmap(one))


def kljax_estimates(x: np.ndarray, y: np.ndarray, *, k: int, adaptive: bool, candidates: bool,
                    seeds_per_call: int) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """name -> (estimates, standard errors) for every seed of the (seeds, n, d) batches; chunked over
    seeds only to bound memory (the last chunk padded so that one compiled shape serves all)."""
    fn = _estimates_fn(int(k), bool(adaptive), bool(candidates))
    num_seeds = x.shape[0]
    calls = -(-num_seeds // max(1, seeds_per_call))
    chunk = -(-num_seeds // calls)
    parts = []
    for lo in range(0, num_seeds, chunk):
        xs, ys = x[lo:lo + chunk], y[lo:lo + chunk]
        if xs.shape[0] < chunk:
            pad = chunk - xs.shape[0]
            xs = np.concatenate([xs, np.repeat(xs[:1], pad, axis=0)])
            ys = np.concatenate([ys, np.repeat(ys[:1], pad, axis=0)])
        value = jax.tree.map(np.asarray, jax.block_until_ready(fn(jnp.asarray(xs), jnp.asarray(ys))))
        parts.append(jax.tree.map(lambda v: v[: min(chunk, num_seeds - lo)], value))
    return {name: tuple(np.concatenate([p[name][i] for p in parts]).astype(np.float64) for i in range(2))
            for name in parts[0]}


def seeds_per_call(n: int, m: int, d: int, itemsize: int, budget_bytes: int) -> int:
    """Seeds one vmapped call may hold within ``budget_bytes``: a (2048, 2048)-bounded tile and a
    few (n, 32) neighbour arrays per seed and search, 8 such intermediates."""
    side = min(max(n, m), 2048)
    per_seed = 8 * (side * side + (n + m) * (d + 40)) * itemsize
    return int(max(1, budget_bytes // per_seed))


# ----------------------------------------------------------------------------------------------
# Statistics
# ----------------------------------------------------------------------------------------------

def summarize(estimates: np.ndarray, truth: float) -> dict:
    """Mean, bias (t interval), standard deviation (ddof=1), RMSE (bootstrap interval over seeds)."""
    from kljax.plot import bootstrap_interval, mean_interval

    estimates = np.asarray(estimates, dtype=np.float64)
    s = estimates.shape[0]
    error = estimates - truth
    std = float(np.std(estimates, ddof=1)) if s > 1 else float("nan")
    _, bias_low, bias_high = mean_interval(error)
    rmse, rmse_low, rmse_high = bootstrap_interval(error)
    return {"mean": float(np.mean(estimates)), "bias": float(np.mean(error)), "std": std,
            "bias_ci": [float(bias_low), float(bias_high)],
            "bias_stderr": std / math.sqrt(s) if s > 1 else float("nan"),
            "rmse": float(rmse), "rmse_ci": [float(rmse_low), float(rmse_high)], "num_seeds": int(s),
            "nonfinite": int(np.sum(~np.isfinite(estimates)))}


def ratio_interval(errors_a: np.ndarray, errors_b: np.ndarray, *, num_resamples: int = 2000,
                   seed: int = 0) -> tuple[float, float, float]:
    """RMSE(a) / RMSE(b) over the same seeds and its paired percentile-bootstrap 95% interval."""
    a, b = np.asarray(errors_a, float), np.asarray(errors_b, float)
    ratio = math.sqrt(np.mean(a * a) / np.mean(b * b)) if np.mean(b * b) > 0 else float("nan")
    picks = np.random.default_rng(seed).integers(0, a.size, (num_resamples, a.size))
    with np.errstate(divide="ignore", invalid="ignore"):
        resampled = np.sqrt(np.mean(a[picks] ** 2, 1) / np.mean(b[picks] ** 2, 1))
    low, high = np.nanpercentile(resampled, [2.5, 97.5])
    return ratio, float(low), float(high)


def coverage(estimates: np.ndarray, stderrs: np.ndarray, truth: float) -> dict:
    """Fraction of seeds whose 95% interval est +- 1.96 se holds the truth, and its Wilson interval."""
    inside = np.abs(np.asarray(estimates) - truth) <= 1.959964 * np.asarray(stderrs)
    s, hits = inside.size, int(np.sum(inside))
    p, z = hits / s, 1.959964
    centre = (p + z * z / (2 * s)) / (1 + z * z / s)
    half = z * math.sqrt(p * (1 - p) / s + z * z / (4 * s * s)) / (1 + z * z / s)
    return {"coverage": p, "coverage_ci": [max(0.0, centre - half), min(1.0, centre + half)],
            "mean_stderr": float(np.mean(stderrs))}


# ----------------------------------------------------------------------------------------------
# Study
# ----------------------------------------------------------------------------------------------

def run(config: Config, *, progress: bool = True) -> dict:
    """Runs every cell of ``config.cells()``; returns the metrics (per-cell summaries and seeds)."""
    unknown = set(config.families + config.line_families) - set(FAMILIES)
    if unknown:
        raise ValueError(f"unknown families {sorted(unknown)}; expected some of {FAMILIES}")
    if config.seeds < 2 or config.peer_seeds < 1:
        raise ValueError("seeds must be at least 2 and peer_seeds at least 1")
    if config.dtype == "float64" and not jax.config.jax_enable_x64:
        raise ValueError("dtype float64 needs jax_enable_x64 (set JAX_ENABLE_X64=1)")
    dtype = np.dtype(config.dtype)
    names, default = estimator_names()
    if not config.candidates:  # the CI scale leaves out what simulates reference samples
        names = [nm for nm in names if nm not in SIMULATING or nm == default]
    from kljax import knn

    candidate_names = list(knn._STUDY_CANDIDATES) if config.candidates else []
    have_ud = universal_divergence_available()
    design = config.cells()
    truths: dict[tuple[str, int], dict] = {}
    cells, start = [], time.perf_counter()
    for family, d, n, m, k in _common.progress(design, desc="knn_accuracy", disable=not progress):
        if (family, d) not in truths:
            truths[(family, d)] = true_kl(family, d, config.mc_draws, config.seed)
        truth = truths[(family, d)]["value"]
        x, y = sample_sets(family, config.seed, d, n, m, config.seeds, dtype)
        per_call = seeds_per_call(n, m, d, dtype.itemsize, config.memory_mib * 2 ** 20)
        tic = time.perf_counter()
        values = kljax_estimates(x, y, k=k, adaptive=max(n, m) <= config.max_adaptive_n,
                                 candidates=config.candidates, seeds_per_call=per_call)
        seconds = time.perf_counter() - tic
        estimators = {}
        for name, (est, se) in values.items():
            if not np.all(np.isfinite(est)) and name in candidate_names:
                continue  # a candidate that does not apply to this cell
            row = {**summarize(est, truth), "estimates": est.tolist()}
            if name != "wkv_adaptive":
                row.update(coverage(est, se, truth), stderrs=se.tolist())
            estimators[name] = row
        wkv = estimators["wkv"]
        ratio, low, high = ratio_interval(values[default][0] - truth, values["wkv"][0] - truth)
        dominated = bool(wkv["bias"] ** 2 > wkv["std"] ** 2)
        limit = TARGET_RATIO if dominated else NEVER_WORSE_RATIO
        peers = {CKDTREE_PEER: [ckdtree_wkv(x[s], y[s], k) for s in range(min(config.peer_seeds, config.seeds))]}
        if have_ud:
            peers[UD_PEER] = [universal_divergence_wkv(x[s], y[s], k) for s in range(len(peers[CKDTREE_PEER]))]
        first = np.asarray(values["wkv"][0][:len(peers[CKDTREE_PEER])])
        cells.append({
            "family": family, "d": d, "n": n, "m": m, "k": k, "true_kl": truth,
            "true_kl_stderr": truths[(family, d)]["stderr"], "seconds": seconds,
            "estimators": estimators,
            "ratio": ratio, "ratio_ci": [low, high], "wkv_bias_dominates": dominated, "limit": limit,
            "goal_met": bool(ratio <= limit),
            # a miss is significant when the whole interval of the ratio lies above the limit
            "miss_significant": bool(low > limit),
            "peer_max_abs_diff": {name: float(np.max(np.abs(np.asarray(v) - first))) for name, v in peers.items()},
        })
    return {
        "config": {**dataclasses.asdict(config), "estimators": names, "default_estimator": default,
                   "candidate_estimators": candidate_names,
                   "peers": [CKDTREE_PEER] + ([UD_PEER] if have_ud else []),
                   "skipped_peers": [] if have_ud else [UD_PEER + " (package not installed)"],
                   "jax": jax.__version__, "backend": jax.default_backend()},
        "true_kl": [{"family": f, "d": d, **t} for (f, d), t in truths.items()],
        "cells": cells,
        "summary": _summary(cells, default),
        "as_default": {name: _as_default(cells, name) for name in names + candidate_names if name != "wkv"},
        "seconds": time.perf_counter() - start,
    }


def _as_default(cells: list[dict], name: str) -> dict:
    """How ``name`` would fare against the goal if it were the default (cells where it ran)."""
    rows = []
    for c in cells:
        if name not in c["estimators"]:
            continue
        errors = np.asarray(c["estimators"][name]["estimates"]) - c["true_kl"]
        wkv = np.asarray(c["estimators"]["wkv"]["estimates"]) - c["true_kl"]
        ratio, low, high = ratio_interval(errors, wkv)
        rows.append({"ratio": ratio, "low": low, "limit": c["limit"],
                     "where": [c["family"], c["d"], c["n"], c["m"], c["k"]]})
    if not rows:
        return {"cells": 0}
    worst = max(rows, key=lambda r: r["ratio"])
    return {"cells": len(rows), "goal_met": sum(r["ratio"] <= r["limit"] for r in rows),
            "never_worse_met": sum(r["ratio"] <= NEVER_WORSE_RATIO for r in rows),
            "missed_significantly": sum(r["low"] > r["limit"] for r in rows),
            "worse_than_wkv_significantly": sum(r["low"] > 1.0 for r in rows),
            "worst_ratio": worst["ratio"], "worst_cell": worst["where"],
            "geometric_mean_ratio": float(np.exp(np.mean(np.log([r["ratio"] for r in rows]))))}


def _small_bias(row: dict) -> bool:
    return abs(row["bias"]) <= 0.5 * row["std"]


def _summary(cells: list[dict], default: str) -> dict:
    missed = [c for c in cells if not c["goal_met"]]
    dominated = [c for c in cells if c["wkv_bias_dominates"]]
    small = [c for c in cells if _small_bias(c["estimators"][default])]
    low_coverage = [c for c in small if c["estimators"][default]["coverage"] < COVERAGE_GOAL]
    return {"cells": len(cells), "goal_met": len(cells) - len(missed), "missed": len(missed),
            "missed_significantly": sum(c["miss_significant"] for c in missed),
            "wkv_bias_dominates": len(dominated),
            "half_met_where_bias_dominates": sum(c["ratio"] <= TARGET_RATIO for c in dominated),
            "never_worse_met": sum(c["ratio"] <= NEVER_WORSE_RATIO for c in cells),
            "small_bias_cells": len(small), "small_bias_coverage_below_goal": len(low_coverage),
            "worst_ratio": max(c["ratio"] for c in cells), "best_ratio": min(c["ratio"] for c in cells)}


def main(argv: list[str] | None = None) -> dict:
    config, args = _common.parse_config(Config, "knn_accuracy", __doc__.splitlines()[0], argv)
    metrics = run(config, progress=not args.no_progress)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _figures(metrics, args.out)
    return metrics


# ----------------------------------------------------------------------------------------------
# Figures and report
# ----------------------------------------------------------------------------------------------

def _plane(metrics: dict, n: int) -> list[dict]:
    return [c for c in metrics["cells"] if c["n"] == n and c["m"] == n and c["k"] == 1]


def _lines(metrics: dict) -> dict[tuple[str, int], list[dict]]:
    """(family, d) -> cells with n = m, k = 1 over at least two sizes (for error against n)."""
    groups: dict[tuple[str, int], list[dict]] = {}
    for c in metrics["cells"]:
        if c["n"] == c["m"] and c["k"] == 1:
            groups.setdefault((c["family"], c["d"]), []).append(c)
    cfg = metrics["config"]
    return {key: sorted(v, key=lambda c: c["n"]) for key, v in groups.items()
            if len(v) >= 2 and key[0] in cfg["line_families"] and key[1] in cfg["line_dims"]}


def _figures(metrics: dict, out_dir: pathlib.Path) -> None:
    import matplotlib.pyplot as plt

    from kljax.plot import error_vs_n

    cfg = metrics["config"]
    for n in cfg["plane_sizes"]:
        plane = _plane(metrics, n)
        families = [f for f in cfg["families"] if any(c["family"] == f for c in plane)]
        dims = sorted({c["d"] for c in plane})
        grid = np.full((len(families), len(dims)), np.nan)
        for c in plane:
            grid[families.index(c["family"]), dims.index(c["d"])] = c["ratio"]
        fig, ax = plt.subplots(figsize=(1.2 * len(dims) + 3, 0.55 * len(families) + 1.8))
        image = ax.imshow(np.log2(grid), cmap="RdBu_r", vmin=-2, vmax=2, aspect="auto")
        for i, f in enumerate(families):
            for j, d in enumerate(dims):
                cell = next(c for c in plane if c["family"] == f and c["d"] == d)
                mark = "" if cell["goal_met"] else ("**" if cell["miss_significant"] else "*")
                ax.text(j, i, f"{grid[i, j]:.2f}{mark}", ha="center", va="center", fontsize=8)
        ax.set_xticks(range(len(dims)), [str(d) for d in dims])
        ax.set_yticks(range(len(families)), families)
        ax.set_xlabel("dimension d")
        ax.set_title(f"RMSE of `{cfg['default_estimator']}` / RMSE of WKV, n = m = {n}, k = 1\n"
                     "(*: goal missed, **: missed with the whole 95% interval above the limit)", fontsize=9)
        fig.colorbar(image, ax=ax, label="log2 ratio")
        _common.save_figure(fig, out_dir, f"ratio_heatmap_n{n}")
    for (family, d), rows in _lines(metrics).items():
        names = [nm for nm in cfg["estimators"] if all(nm in r["estimators"] for r in rows)]
        sizes = [r["n"] for r in rows]
        errors = {nm: np.asarray([r["estimators"][nm]["estimates"] for r in rows]) for nm in names}
        truth = [r["true_kl"] for r in rows]
        fig = error_vs_n(sizes, errors, truth, title=f"{family}, d = {d}, m = n, k = 1")
        _common.save_figure(fig, out_dir, f"error_vs_n_{family}_d{d}")


def reading(metrics: dict) -> list[str]:
    """Sentences computed from the numbers (goal, where it is missed, coverage)."""
    cfg, s, cells = metrics["config"], metrics["summary"], metrics["cells"]
    default = cfg["default_estimator"]

    def where(c):
        return f"{c['family']} d={c['d']} n={c['n']} m={c['m']} k={c['k']}"

    lines = [f"The goal (default RMSE <= {NEVER_WORSE_RATIO}x WKV's, <= {TARGET_RATIO}x where WKV's bias "
             f"dominates) is met in {s['goal_met']} of {s['cells']} cells; default/WKV ranges from "
             f"{s['best_ratio']:.2f} to {s['worst_ratio']:.2f}."]
    missed = sorted((c for c in cells if not c["goal_met"]), key=lambda c: -c["ratio"])
    if missed:
        significant = [c for c in missed if c["miss_significant"]]
        lines.append(f"{len(significant)} of the {len(missed)} misses are significant (the whole 95% "
                     "bootstrap interval of the ratio lies above its limit); the others are within "
                     "seed noise of it.")
        over = [c for c in missed if c["ratio"] > NEVER_WORSE_RATIO]  # whatever the cell's limit
        if over:
            lines.append(f"Cells where the default loses to WKV by more than 10% ({len(over)}, "
                         f"{sum(c['wkv_bias_dominates'] for c in over)} of them where WKV's bias dominates): "
                         + "; ".join(
                f"{where(c)}: {c['ratio']:.2f} [{c['ratio_ci'][0]:.2f}, {c['ratio_ci'][1]:.2f}]" for c in over[:12])
                + ("" if len(over) <= 12 else f"; and {len(over) - 12} more") + ".")
        half = [c for c in missed if c["limit"] == TARGET_RATIO]
        if half:
            lines.append(f"Where WKV's bias dominates ({s['wkv_bias_dominates']} cells) the default reaches "
                         f"0.5x in {s['half_met_where_bias_dominates']}; the worst there: " + "; ".join(
                             f"{where(c)}: {c['ratio']:.2f}" for c in half[:8]) + ".")
    else:
        lines.append("No cell misses the goal.")
    wins = [c for c in cells if c["ratio_ci"][1] < 1.0]
    lines.append(f"The default is significantly better than WKV (ratio interval below 1) in {len(wins)} "
                 f"cells and significantly worse (interval above 1) in "
                 f"{sum(c['ratio_ci'][0] > 1.0 for c in cells)}.")
    small = [c for c in cells if _small_bias(c["estimators"][default])]
    low = [c for c in small if c["estimators"][default]["coverage"] < COVERAGE_GOAL]
    clearly_low = [c for c in low if c["estimators"][default]["coverage_ci"][1] < COVERAGE_GOAL]
    lines.append(f"Coverage of the default's 95% jackknife intervals where its bias is small (|bias| <= "
                 f"std/2, {len(small)} cells): below {COVERAGE_GOAL:.0%} in {len(low)} cells, "
                 f"{len(clearly_low)} of them significantly (Wilson interval below {COVERAGE_GOAL:.0%})"
                 + (": " + "; ".join(f"{where(c)}: {c['estimators'][default]['coverage']:.0%}"
                                     for c in clearly_low[:8]) if clearly_low else "")
                 + ". Where the bias is large the intervals do not cover it, by construction.")
    judged = {name: a for name, a in metrics.get("as_default", {}).items() if a.get("cells")}
    if len(judged) > 1:
        j, ours = judged, judged[default]
        most = max(j, key=lambda name: (j[name]["goal_met"], -j[name]["worse_than_wkv_significantly"]))
        safest = min(j, key=lambda name: (j[name]["worse_than_wkv_significantly"], j[name]["worst_ratio"]))

        def versus(name, value):
            return "" if name == default else f"; `{default}`: {value}"

        lines.append(f"Judged as the default: `{most}` meets the goal in the most cells ({j[most]['goal_met']} of "
                     f"{j[most]['cells']}{versus(most, ours['goal_met'])}); `{safest}` is significantly worse "
                     f"than WKV in the fewest ({j[safest]['worse_than_wkv_significantly']}"
                     f"{versus(safest, ours['worse_than_wkv_significantly'])}), worst ratio "
                     f"{j[safest]['worst_ratio']:.2f}{versus(safest, format(ours['worst_ratio'], '.2f'))}. "
                     f"Plain WKV as the default would meet it in {len(cells) - s['wkv_bias_dominates']} of "
                     f"{len(cells)} (every cell where its bias does not dominate, none of the others).")
    diffs = [c["peer_max_abs_diff"][CKDTREE_PEER] for c in cells]
    lines.append(f"kljax `wkv` equals the SciPy cKDTree WKV on the same samples to {max(diffs):.2g} nats "
                 f"(float32 data, float64 peer)" + (f" and the universal-divergence package to "
                 f"{max(c['peer_max_abs_diff'][UD_PEER] for c in cells):.2g}" if UD_PEER in cfg["peers"] else "")
                 + ".")
    return lines


def report(metrics: dict, rel_dir: pathlib.Path) -> str:
    cfg = metrics["config"]
    default = cfg["default_estimator"]
    names = cfg["estimators"] + cfg.get("candidate_estimators", [])
    mc = [t for t in metrics["true_kl"] if t["stderr"] > 0]
    parts = [
        f"Families with known KL (module docstring of `experiments.knn_accuracy`); fractional design of "
        f"{len(metrics['cells'])} cells: every family x d in {list(cfg['dims'])} at n = m in "
        f"{list(cfg['plane_sizes'])}, k = 1, and at n = m = {cfg['small_n']} for d in {list(cfg['small_n_dims'])}; "
        f"n in {list(cfg['sizes'])}, m = n x {list(cfg['unequal_ratios'])} "
        f"and k in {list(cfg['orders'])} for {list(cfg['line_families'])} at d in {list(cfg['line_dims'])}. "
        f"{cfg['seeds']} sample sets per cell, {cfg['dtype']}. Default estimator: `{default}`. Cells: RMSE "
        f"(bias) in nats; ratio: default / WKV RMSE with a paired bootstrap 95% interval; coverage: of the "
        f"default's 95% jackknife interval."
        + (f" Monte Carlo truths: largest standard error {max(t['stderr'] for t in mc):.1e} nats." if mc else ""),
    ]
    header = (["family", "d", "n", "m", "k", "true KL"] + [f"`{nm}`" for nm in names]
              + ["ratio [95%]", "goal", "coverage"])
    rows = []
    for c in metrics["cells"]:
        est = c["estimators"]
        rows.append([c["family"], c["d"], c["n"], c["m"], c["k"], f"{c['true_kl']:.3f}"]
                    + [f"{est[nm]['rmse']:.3f} ({est[nm]['bias']:+.3f})" if nm in est else "-" for nm in names]
                    + [f"{c['ratio']:.2f} [{c['ratio_ci'][0]:.2f}, {c['ratio_ci'][1]:.2f}]",
                       ("met" if c["goal_met"] else ("**missed**" if c["miss_significant"] else "missed (n.s.)"))
                       + f" (<= {c['limit']:g})",
                       f"{est[default]['coverage']:.0%}"])
    parts.append(_common.markdown_table(header, rows))
    header = ["estimator (as the default)", "cells", "goal met", "<= 1.1x WKV", "goal missed (significant)",
              "worse than WKV (significant)", "worst ratio (cell: family, d, n, m, k)", "geometric mean ratio"]
    rows = []
    for name, a in metrics["as_default"].items():
        if a["cells"]:
            rows.append([f"`{name}`" + (" (default)" if name == default else ""), a["cells"], a["goal_met"],
                         a["never_worse_met"], a["missed_significantly"], a["worse_than_wkv_significantly"],
                         f"{a['worst_ratio']:.2f} ({', '.join(map(str, a['worst_cell']))})",
                         f"{a['geometric_mean_ratio']:.2f}"])
    parts.append("Each estimator and candidate judged as if it were the default (RMSE / WKV RMSE per cell, "
                 "paired bootstrap):\n\n" + _common.markdown_table(header, rows))
    parts.append("**Reading** (computed from the numbers):\n\n" + "\n".join(f"- {line}" for line in reading(metrics)))
    for skipped in cfg.get("skipped_peers", []):
        parts.append(f"Peer skipped: {skipped}; `pip install -e '.[dev]'` adds it.")
    for n in cfg["plane_sizes"]:
        parts.append(f"![default / WKV RMSE, n = m = {n}]({rel_dir}/ratio_heatmap_n{n}.png)")
    for family, d in _lines(metrics):
        parts.append(f"![error against n, {family}, d = {d}]({rel_dir}/error_vs_n_{family}_d{d}.png)")
    return "\n\n".join(parts)


if __name__ == "__main__":
    _common.run_main(main)
