"""Statistics over seeds, shared by the experiments: intervals, Welch and paired tests, Holm's correction.

Rules: every compared number carries a 95% Student-t interval of its mean over seeds; two arms are
compared by Welch's unequal-variance t-test (Welch, 1947), or by a paired t-test when the seeds pair the
runs (same initialisation, data and noise); "significant" means p < ``SIGNIFICANCE``; a family of
comparisons is corrected by Holm's step-down procedure (Holm, 1979) where the report says so.

References: B. L. Welch, "The generalization of Student's problem when several different population
variances are involved", Biometrika 34, 1947; S. Holm, "A simple sequentially rejective multiple test
procedure", Scandinavian Journal of Statistics 6, 1979.
"""

from __future__ import annotations

import math

import numpy as np
import scipy.stats

from kljax import plot

SIGNIFICANCE = 0.05


def interval(samples, level: float = 0.95) -> tuple[float, float]:
    """Mean and half-width of the Student-t ``level`` interval of the mean (``kljax.plot.mean_interval``;
    NaN samples left out; half-width 0 for one sample)."""
    samples = np.asarray(samples, float)
    mean, _, high = plot.mean_interval(samples, level=level)
    if np.sum(np.isfinite(samples)) < 2:
        return float(mean), 0.0
    return float(mean), float(high - mean)


def welch(a, b) -> tuple[float, float, float]:
    """Welch's t-test of mean(a) - mean(b): ``(difference, t, two-sided p)``, Welch-Satterthwaite degrees
    of freedom.

    Samples without spread on both sides (every seed at a floor) give a defined answer: t = NaN and
    p = 1 for equal means, 0 for different ones. Fewer than two samples on a side: t = p = NaN.
    """
    a, b = np.asarray(a, float), np.asarray(b, float)
    difference = float(a.mean() - b.mean()) if a.size and b.size else float("nan")
    if a.size < 2 or b.size < 2:
        return difference, float("nan"), float("nan")
    va, vb = a.var(ddof=1) / a.size, b.var(ddof=1) / b.size
    se = math.sqrt(va + vb)
    scale = max(1.0, abs(a.mean()), abs(b.mean()))
    if se <= 1e-12 * scale:
        return difference, float("nan"), 1.0 if abs(difference) <= 1e-12 * scale else 0.0
    dof = (va + vb) ** 2 / (va**2 / (a.size - 1) + vb**2 / (b.size - 1))
    t = difference / se
    return difference, float(t), float(2 * scipy.stats.t.sf(abs(t), dof))


def welch_p(a, b) -> float:
    """Two-sided p-value of Welch's t-test of equal means (see ``welch``)."""
    return welch(a, b)[2]


def paired_p(a, b) -> float:
    """Two-sided p-value of the paired t-test of mean(a - b) = 0 (seeds pair the runs); differences without
    spread give 1 when they are all 0 and 0 otherwise; fewer than two pairs give NaN."""
    difference = np.asarray(a, float) - np.asarray(b, float)
    if difference.size < 2:
        return float("nan")
    if np.all(difference == difference[0]):
        return 1.0 if difference[0] == 0 else 0.0
    return float(scipy.stats.ttest_rel(np.asarray(a, float), np.asarray(b, float)).pvalue)


def holm_adjusted(p_values) -> np.ndarray:
    """Holm's step-down adjusted p-values (family-wise error), in the order given; NaN counts as 1."""
    p = np.nan_to_num(np.asarray(p_values, float), nan=1.0)
    adjusted = np.empty_like(p)
    running = 0.0
    for rank, index in enumerate(np.argsort(p, kind="stable")):
        running = max(running, min(1.0, (p.size - rank) * p[index]))
        adjusted[index] = running
    return adjusted


def holm(p_values, level: float = SIGNIFICANCE) -> list[bool]:
    """Which of the p-values stay significant under Holm's correction at ``level``; NaN never does."""
    return [bool(q < level) for q in holm_adjusted(p_values)]


def summarise(samples) -> dict[str, float]:
    """``{"mean", "ci95", "std"}`` of per-seed values."""
    samples = np.asarray(samples, float)
    mean, half = interval(samples)
    return {"mean": mean, "ci95": half, "std": float(samples.std(ddof=1)) if samples.size > 1 else 0.0}


def fmt(summary: dict[str, float]) -> str:
    """``"0.953 ± 0.012"`` from a ``summarise`` dict."""
    return f"{summary['mean']:.3f} ± {summary['ci95']:.3f}"


def compare(a, b, name_a: str, name_b: str, what: str, *, paired: bool = False) -> str:
    """One sentence comparing per-seed values ``a`` and ``b`` of ``what``, saying whether the difference
    is significant (Welch's test, or the paired test when ``paired``; p < 0.05) with both intervals."""
    (mean_a, half_a), (mean_b, half_b) = interval(a), interval(b)
    p, test = (paired_p(a, b), "paired t-test") if paired else (welch_p(a, b), "Welch")
    name_a = name_a[:1].upper() + name_a[1:]
    values = f"{mean_a:.3f} ± {half_a:.3f} vs {mean_b:.3f} ± {half_b:.3f}"
    if np.isnan(p):
        return f"{name_a} vs {name_b}, {what}: {values} (one seed: no test)."
    if p >= SIGNIFICANCE:
        return f"{name_a} vs {name_b}, {what}: {values}, difference not significant ({test} p = {p:.2g})."
    direction = "higher" if mean_a > mean_b else "lower"
    return f"{name_a} has {direction} {what} than {name_b}: {values} ({test} p = {p:.2g})."


def one_sample_p(samples, value: float) -> float:
    """Two-sided p-value of the one-sample t-test of mean(samples) = ``value``; samples without spread give
    1 when they equal ``value`` (to 1e-9) and 0 otherwise; fewer than two samples give NaN."""
    samples = np.asarray(samples, float)
    if samples.size < 2:
        return float("nan")
    if np.all(samples == samples[0]):
        return 1.0 if abs(samples[0] - value) <= 1e-9 * max(1.0, abs(value)) else 0.0
    return float(scipy.stats.ttest_1samp(samples, value).pvalue)


def one_sided_paired_p(a, b) -> float:
    """p-value of the paired t-test of mean(a - b) > 0 (one-sided); NaN for fewer than two pairs."""
    difference = np.asarray(a, float) - np.asarray(b, float)
    if difference.size < 2:
        return float("nan")
    if np.all(difference == difference[0]):
        return 0.0 if difference[0] > 0 else 1.0
    return float(scipy.stats.ttest_1samp(difference, 0.0, alternative="greater").pvalue)
