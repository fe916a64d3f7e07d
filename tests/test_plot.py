"""kljax.plot: the intervals against SciPy/NumPy, and the figures drawn from the numbers given."""

import matplotlib

matplotlib.use("Agg")

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
from scipy import stats  # noqa: E402

from kljax import plot  # noqa: E402


@pytest.fixture(autouse=True)
def _close_figures():
    yield
    plt.close("all")


def test_mean_interval_is_scipys_t_interval_and_skips_nan():
    rng = np.random.default_rng(0)
    values = rng.normal(size=(3, 7))
    mean, low, high = plot.mean_interval(values, level=0.9)
    for row in range(3):
        want = stats.t.interval(0.9, 6, loc=values[row].mean(), scale=stats.sem(values[row]))
        np.testing.assert_allclose([low[row], high[row]], want, rtol=1e-12)
    with_nan = np.append(values[0], np.nan)
    np.testing.assert_allclose(plot.mean_interval(with_nan, level=0.9), (mean[0], low[0], high[0]), rtol=1e-12)
    single = plot.mean_interval([1.0])
    assert single[0] == 1.0 and np.isnan(single[1]) and np.isnan(single[2])
    with pytest.raises(ValueError, match="`level`"):
        plot.mean_interval(values, level=1.5)


def test_bootstrap_interval_covers_the_rmse_about_as_often_as_stated():
    # errors ~ N(0, 1): the true RMSE is 1; 80% percentile-bootstrap intervals from 40 repeats
    rng = np.random.default_rng(1)
    errors = rng.normal(size=(300, 40))
    estimate, low, high = plot.bootstrap_interval(errors, level=0.8, num_resamples=400)
    np.testing.assert_allclose(estimate, np.sqrt(np.mean(errors**2, axis=1)))
    coverage = np.mean((low <= 1.0) & (1.0 <= high))
    assert 0.7 <= coverage <= 0.9, coverage
    again = plot.bootstrap_interval(errors, level=0.8, num_resamples=400)
    np.testing.assert_array_equal(again[1], low)  # fixed seed: the same figure every time


def test_error_vs_n_draws_the_bias_and_rmse_it_is_given():
    rng = np.random.default_rng(2)
    sizes = [100, 1000, 10000]
    estimates = {"a": 1.0 + rng.normal(0.1, 0.2, (3, 30)), "b": 1.0 + rng.normal(-0.3, 0.1, (3, 30))}
    fig = plot.error_vs_n(sizes, estimates, truth=1.0, title="t")
    bias_ax, rmse_ax = fig.axes
    for line, values in zip(bias_ax.get_lines(), estimates.values()):
        np.testing.assert_allclose(line.get_ydata(), (values - 1.0).mean(axis=1))
    for line, values in zip(rmse_ax.get_lines(), estimates.values()):
        np.testing.assert_allclose(line.get_ydata(), np.sqrt(((values - 1.0) ** 2).mean(axis=1)))
    with pytest.raises(ValueError, match="estimates\\['c'\\]"):
        plot.error_vs_n(sizes, {"c": np.zeros((2, 30))}, truth=1.0)


def test_method_comparison_orders_methods_and_drawing_the_stream_checks_lengths():
    fig = plot.method_comparison({"low": [0.0, 0.1, 0.2], "high": [1.0, 1.1, 0.9]}, label="score")
    # best on top: tick labels run bottom to top
    assert [t.get_text() for t in fig.axes[0].get_yticklabels()] == ["low", "high"]
    fig = plot.drift_stream([0.1, 0.3, 2.0, 2.5], [0.5, 0.3, 0.01, 0.002], [False, False, False, True],
                            alpha=0.05, change_point=2)
    alarm_points = fig.axes[1].collections[0].get_offsets()
    np.testing.assert_allclose(alarm_points, [[3, 0.002]])
    with pytest.raises(ValueError, match="one length"):
        plot.drift_stream([0.1], [0.5, 0.4], [False], alpha=0.05)


def test_placement_trajectories_one_panel_per_placement():
    probs = np.random.default_rng(3).dirichlet([1, 1, 1], size=(4, 5))[None].repeat(2, axis=0)  # (2, 4, 5, 3)
    fig = plot.placement_trajectories(np.arange(1, 6), {"k1": probs[0], "k3": probs[1], "k2": probs[1],
                                                        "exact": probs[0]},
                                      [0.5, 0.3, 0.2], fixed_points={"k3": [0.2, 0.3, 0.5]})
    visible = [ax for ax in fig.axes if ax.get_visible()]
    assert [ax.get_title() for ax in visible] == ["k1", "k3", "k2", "exact"]
    np.testing.assert_allclose(visible[0].get_lines()[0].get_ydata(), probs[0][:, :, 0].mean(axis=0))
    with pytest.raises(ValueError, match="probabilities\\['bad'\\]"):
        plot.placement_trajectories([1, 2], {"bad": np.zeros((2, 3, 3))}, [0.5, 0.3, 0.2])
