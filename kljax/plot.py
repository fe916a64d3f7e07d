"""Standard figures for KL studies: estimator error against sample size, method comparisons over seeds,
placement trajectories and drift streams, each from plain arrays (or the metrics the experiments write).

Every function returns a ``matplotlib.figure.Figure`` (the caller saves or shows it) and draws an
interval wherever it draws a mean over repeats: a claim that one curve lies below another is only as
good as the spread of the repeats behind it. The intervals are

- for a mean over repeats, Student's t interval ``mean +- t_{(1+level)/2, r-1} s / sqrt(r)``
  (:func:`mean_interval`);
- for an RMSE or any other non-linear statistic of the repeats, a percentile bootstrap over the
  repeats (Efron & Tibshirani 1993, ch. 13) with a fixed seed, so that figures are reproducible
  (:func:`bootstrap_interval`).

matplotlib is imported when a figure is drawn, not when this module is imported: the estimators of
kljax do not need it (install the ``plot`` or ``experiments`` extra for the figures).

References:
  Efron, B. and Tibshirani, R. J. (1993). An Introduction to the Bootstrap. Chapman & Hall.
"""

from __future__ import annotations

from typing import Mapping, Sequence

import numpy as np
from scipy import stats

__all__ = [
    "bootstrap_interval",
    "drift_stream",
    "error_vs_n",
    "mean_interval",
    "method_comparison",
    "placement_trajectories",
]


def _pyplot():
    try:
        import matplotlib.pyplot as plt
    except ImportError as error:  # pragma: no cover - depends on the environment
        raise ImportError("kljax.plot draws with matplotlib: pip install 'kljax[plot]' (or matplotlib).") from error
    return plt


def _check_level(level: float) -> float:
    if not 0.0 < float(level) < 1.0:
        raise ValueError(f"`level` must be in (0, 1), got {level}.")
    return float(level)


def mean_interval(values, *, axis: int = -1, level: float = 0.95):
    """Mean over ``axis`` and its Student-t confidence interval (NaN entries are left out).

    Args:
      values: repeats along ``axis`` (e.g. seeds).
      axis: the repeat axis.
      level: coverage of the interval.

    Returns:
      ``(mean, low, high)``, arrays with ``axis`` removed; the interval is NaN where fewer than two
      finite repeats exist (one repeat has no spread to report).

    Example:
      >>> mean, low, high = mean_interval([1.0, 2.0, 3.0])
      >>> print(float(mean), round(float(low), 3), round(float(high), 3))
      2.0 -0.484 4.484
    """
    level = _check_level(level)
    values = np.asarray(values, dtype=float)
    finite = np.isfinite(values)
    count = np.sum(finite, axis=axis)
    kept = np.where(finite, values, 0.0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.sum(kept, axis=axis) / count
        deviations = np.where(finite, values - np.expand_dims(mean, axis), 0.0)
        spread = np.sqrt(np.sum(deviations**2, axis=axis) / (count - 1))
        half = stats.t.ppf(0.5 + level / 2, np.maximum(count - 1, 1)) * spread / np.sqrt(count)
    half = np.where(count >= 2, half, np.nan)
    return mean, mean - half, mean + half


def bootstrap_interval(values, statistic=None, *, axis: int = -1, level: float = 0.95,
                       num_resamples: int = 2000, seed: int = 0):
    """A statistic of the repeats along ``axis`` and its percentile-bootstrap interval.

    Args:
      values: repeats along ``axis``.
      statistic: function of an array and ``axis=`` (reducing it); default: root mean square,
        the RMSE when ``values`` are errors.
      axis: the repeat axis.
      level: coverage of the interval.
      num_resamples: bootstrap resamples.
      seed: seed of the resampling (fixed, so that a figure is reproducible).

    Returns:
      ``(estimate, low, high)`` with ``axis`` removed.

    Example:
      >>> errors = [0.1, -0.2, 0.3, -0.1, 0.2]
      >>> estimate, low, high = bootstrap_interval(errors)
      >>> print(round(float(estimate), 4), bool(low < estimate < high))
      0.1949 True
    """
    level = _check_level(level)
    if statistic is None:
        def statistic(x, axis):
            return np.sqrt(np.mean(np.square(x), axis=axis))
    values = np.moveaxis(np.asarray(values, dtype=float), axis, -1)
    repeats = values.shape[-1]
    if repeats < 1:
        raise ValueError("`values` needs at least one repeat along `axis`.")
    estimate = statistic(values, axis=-1)
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, repeats, size=(num_resamples, repeats))
    resampled = statistic(values[..., picks], axis=-1)  # (..., num_resamples)
    low, high = np.percentile(resampled, [50 * (1 - level), 50 * (1 + level)], axis=-1)
    return estimate, low, high


def error_vs_n(sizes: Sequence[int], estimates: Mapping[str, np.ndarray], truth, *, level: float = 0.95,
               title: str | None = None):
    """Bias and RMSE of estimators against sample size, with intervals over repeats.

    Args:
      sizes: the sample sizes, length ``S``.
      estimates: estimator name -> array ``(S, R)`` of estimates (``R`` repeats per size; NaN allowed:
        a failed repeat is left out of the bias and counted in the title of the panel).
      truth: the true value (scalar, or length ``S``).
      level: coverage of the intervals (t interval for the bias, bootstrap for the RMSE).
      title: optional figure title.

    Returns:
      A Figure with two panels: bias (mean error, linear scale, zero line) and RMSE (log-log).

    Example:
      >>> import numpy as np
      >>> rng = np.random.default_rng(0)
      >>> sizes = [100, 1000]
      >>> fig = error_vs_n(sizes, {"k1": 0.5 + rng.normal(0, 1, (2, 20)) / np.sqrt([[100], [1000]])}, 0.5)
      >>> [ax.get_ylabel() for ax in fig.axes]
      ['bias (mean error)', 'RMSE']
    """
    plt = _pyplot()
    sizes = np.asarray(sizes, dtype=float)
    truth = np.broadcast_to(np.asarray(truth, dtype=float), sizes.shape)
    fig, (bias_ax, rmse_ax) = plt.subplots(1, 2, figsize=(11, 4.2))
    colors = plt.cm.tab10(np.arange(max(len(estimates), 1)) % 10)
    for color, (name, values) in zip(colors, estimates.items()):
        values = np.asarray(values, dtype=float)
        if values.ndim != 2 or values.shape[0] != sizes.size:
            raise ValueError(f"estimates[{name!r}] must have shape ({sizes.size}, repeats), got {values.shape}.")
        errors = values - truth[:, None]
        mean, low, high = mean_interval(errors, level=level)
        bias_ax.plot(sizes, mean, marker="o", color=color, label=name)
        bias_ax.fill_between(sizes, low, high, color=color, alpha=0.2, linewidth=0)
        finite = np.where(np.isfinite(errors), errors, np.nan)
        rmse, r_low, r_high = bootstrap_interval(finite, lambda x, axis: np.sqrt(np.nanmean(x * x, axis=axis)),
                                                 level=level)
        rmse_ax.plot(sizes, rmse, marker="o", color=color, label=name)
        rmse_ax.fill_between(sizes, r_low, r_high, color=color, alpha=0.2, linewidth=0)
    bias_ax.axhline(0.0, color="black", linewidth=0.8)
    bias_ax.set_xscale("log")
    bias_ax.set_xlabel("sample size n")
    bias_ax.set_ylabel("bias (mean error)")
    rmse_ax.set_xscale("log")
    rmse_ax.set_yscale("log")
    rmse_ax.set_xlabel("sample size n")
    rmse_ax.set_ylabel("RMSE")
    bias_ax.legend(fontsize=8)
    bias_ax.set_title(f"mean error, {level:.0%} t interval", fontsize=9)
    rmse_ax.set_title(f"RMSE, {level:.0%} bootstrap interval", fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig


def method_comparison(results: Mapping[str, np.ndarray], *, label: str, level: float = 0.95,
                      higher_is_better: bool = True, title: str | None = None):
    """One score per method and seed, shown as the seeds' dots with the mean and its t interval.

    Args:
      results: method name -> 1-D array of the score over seeds.
      label: what the score is (the axis label).
      level: coverage of the interval.
      higher_is_better: only orders the methods (best on top).
      title: optional figure title.

    Returns:
      A horizontal dot-and-interval Figure; methods whose intervals overlap cannot be told apart at
      this number of seeds.

    Example:
      >>> fig = method_comparison({"a": [1.0, 1.2, 0.9], "b": [2.0, 2.1, 1.8]}, label="return")
      >>> [t.get_text() for t in fig.axes[0].get_yticklabels()]
      ['a', 'b']
    """
    plt = _pyplot()
    names = list(results)
    means = {name: mean_interval(np.asarray(results[name], dtype=float), level=level) for name in names}
    names.sort(key=lambda name: means[name][0], reverse=not higher_is_better)
    fig, ax = plt.subplots(figsize=(6.5, 0.45 * len(names) + 1.4))
    for row, name in enumerate(names):
        values = np.asarray(results[name], dtype=float)
        mean, low, high = means[name]
        ax.scatter(values, np.full(values.shape, row), color="gray", s=12, alpha=0.6, zorder=2)
        ax.errorbar(mean, row, xerr=[[mean - low], [high - mean]] if np.isfinite(low) else None,
                    fmt="o", color="black", capsize=4, zorder=3)
    ax.set_yticks(range(len(names)), names)
    ax.set_xlabel(label)
    ax.set_title(title or f"mean over seeds with {level:.0%} t interval (dots: seeds)", fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    return fig


def placement_trajectories(steps, probabilities: Mapping[str, np.ndarray], optimum, *,
                           fixed_points: Mapping[str, np.ndarray] | None = None, title: str | None = None):
    """Action probabilities of KL-penalised policies over training, one panel per penalty placement.

    Args:
      steps: the training steps, length ``T``.
      probabilities: placement name -> array ``(seeds, T, k)`` of action probabilities.
      optimum: the optimal regularised policy ``pi* ∝ pi_ref exp(r / beta)``, length ``k`` (dashed).
      fixed_points: optional placement name -> the policy that placement converges to in expectation,
        drawn dotted where it differs from ``optimum``.
      title: optional figure title.

    Returns:
      A Figure: per placement, the mean over seeds with a 10-90% band per action.

    Example:
      >>> import numpy as np
      >>> p = np.full((2, 3, 2), 0.5)
      >>> fig = placement_trajectories([1, 10, 100], {"k1 in reward": p}, [0.7, 0.3])
      >>> fig.axes[0].get_title()
      'k1 in reward'
    """
    plt = _pyplot()
    steps = np.asarray(steps, dtype=float)
    optimum = np.asarray(optimum, dtype=float)
    fixed_points = fixed_points or {}
    count = len(probabilities)
    columns = min(3, count)
    rows = -(-count // columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.3 * columns, 3.4 * rows), sharex=True, sharey=True,
                             squeeze=False)
    colors = plt.cm.tab10(np.arange(optimum.size) % 10)
    for ax, (name, probs) in zip(axes.flat, probabilities.items()):
        probs = np.asarray(probs, dtype=float)
        if probs.ndim != 3 or probs.shape[1:] != (steps.size, optimum.size):
            raise ValueError(f"probabilities[{name!r}] must have shape (seeds, {steps.size}, {optimum.size}), "
                             f"got {probs.shape}.")
        fixed = fixed_points.get(name)
        for action in range(optimum.size):
            low, high = np.percentile(probs[:, :, action], [10, 90], axis=0)
            ax.plot(steps, probs[:, :, action].mean(axis=0), color=colors[action], label=f"action {action}")
            ax.fill_between(steps, low, high, color=colors[action], alpha=0.2, linewidth=0)
            ax.axhline(optimum[action], color=colors[action], linestyle="--", linewidth=1)
            if fixed is not None and not np.allclose(fixed, optimum):
                ax.axhline(np.asarray(fixed)[action], color=colors[action], linestyle=":", linewidth=1.5)
        ax.set_xscale("log")
        ax.set_ylim(0, 1)
        ax.set_title(name, fontsize=9)
    for ax in axes.flat[count:]:
        ax.set_visible(False)
    axes.flat[0].legend(fontsize=8, loc="upper left")
    fig.suptitle(title or "mean over seeds (10-90% band); dashed: optimum; dotted: the placement's fixed point",
                 fontsize=9)
    fig.tight_layout()
    return fig


def drift_stream(statistics, p_values, alarms, *, alpha: float, change_point: int | None = None,
                 title: str | None = None):
    """A monitored stream: the statistic and the p-value per window, alarms marked.

    Args:
      statistics: the statistic per window, length ``W`` (NaN: a window that could not be scored).
      p_values: the p-value per window, length ``W``.
      alarms: boolean alarm per window, length ``W``.
      alpha: the significance level (drawn on the p-value panel).
      change_point: index of the first drifted window, if known (drawn as a vertical line).
      title: optional figure title.

    Returns:
      A Figure with the statistic (top) and the p-value on a log scale (bottom); alarms are red marks.

    Example:
      >>> fig = drift_stream([0.1, 0.2, 1.5], [0.6, 0.4, 0.01], [False, False, True], alpha=0.05,
      ...                    change_point=2)
      >>> len(fig.axes)
      2
    """
    plt = _pyplot()
    statistics = np.asarray(statistics, dtype=float)
    p_values = np.asarray(p_values, dtype=float)
    alarms = np.asarray(alarms, dtype=bool)
    if not statistics.shape == p_values.shape == alarms.shape or statistics.ndim != 1:
        raise ValueError(f"`statistics`, `p_values` and `alarms` must be 1-D of one length, got "
                         f"{statistics.shape}, {p_values.shape} and {alarms.shape}.")
    windows = np.arange(statistics.size)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(9, 5), sharex=True)
    top.plot(windows, statistics, marker=".", color="tab:blue")
    top.set_ylabel("statistic")
    bottom.semilogy(windows, p_values, marker=".", color="tab:blue")
    bottom.axhline(alpha, color="gray", linestyle="--", linewidth=1, label=f"alpha = {alpha:g}")
    bottom.scatter(windows[alarms], p_values[alarms], color="red", zorder=3, label="alarm")
    top.scatter(windows[alarms], statistics[alarms], color="red", zorder=3)
    bottom.set_ylabel("p-value")
    bottom.set_xlabel("window")
    for ax in (top, bottom):
        if change_point is not None:
            ax.axvline(change_point - 0.5, color="black", linewidth=1)
    bottom.legend(fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    return fig
