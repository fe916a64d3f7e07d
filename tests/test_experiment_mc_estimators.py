"""Runs experiments/mc_estimators.py at its quick scale and checks its numbers against closed forms.

The study's truths are checked first (its k2 expectation and k1 variance by quadrature, its exact
divergences by the textbook Gaussian formula); then the measured biases of the unbiased estimators
must be within 5 standard errors of 0, k2's bias within 5 standard errors of its exact value, and
k1's spread over seeds must match sqrt(Var[k1] / n).
"""

import math
import pathlib

import numpy as np
import pytest
from scipy import integrate, stats

from experiments import _common, mc_estimators

SIGMAS = 5.0


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("mc_estimators")
    metrics = mc_estimators.main(["--quick", "--out", str(out), "--no-progress"])
    return out, metrics


def _gaussian_kl(loc_p, scale_p, loc_q, scale_q):
    return math.log(scale_q / scale_p) + (scale_p**2 + (loc_p - loc_q) ** 2) / (2 * scale_q**2) - 0.5


@pytest.mark.parametrize(("mu", "sigma"), [(0.5, 1.0), (1.0, 0.7), (2.0, 1.5)])
def test_closed_forms_of_the_study(mu, sigma):
    def log_ratio(x):
        return stats.norm.logpdf(x) - stats.norm.logpdf(x, mu, sigma)

    def expect(f):
        return integrate.quad(lambda x: f(x) * stats.norm.pdf(x), -30, 30, epsabs=1e-12, limit=200)[0]

    mean = expect(log_ratio)
    np.testing.assert_allclose(mc_estimators.k2_expectation(mu, sigma), expect(lambda x: log_ratio(x) ** 2) / 2,
                               rtol=1e-8)
    np.testing.assert_allclose(mc_estimators.log_ratio_variance(mu, sigma),
                               expect(lambda x: (log_ratio(x) - mean) ** 2), rtol=1e-8)
    forward, reverse = mc_estimators.exact_divergences(mu, sigma)
    np.testing.assert_allclose(forward, _gaussian_kl(0.0, 1.0, mu, sigma), rtol=1e-6)
    np.testing.assert_allclose(reverse, _gaussian_kl(mu, sigma, 0.0, 1.0), rtol=1e-6)
    np.testing.assert_allclose(forward, mean, rtol=1e-6)


def test_sample_sizes_are_half_decades():
    assert mc_estimators.sample_sizes(1000) == [1, 3, 10, 32, 100, 316, 1000]
    assert mc_estimators.sample_sizes(5000) == [1, 3, 10, 32, 100, 316, 1000, 3162, 5000]


def test_outputs_written_and_reported(run):
    out, metrics = run
    assert _common.load_metrics(out)["config"] == metrics["config"]
    for name in ("error_vs_n", "error_vs_distance"):
        assert (out / f"{name}.png").stat().st_size > 10_000
    text = mc_estimators.report(metrics, pathlib.Path("mc_estimators"))
    assert "![bias, std and RMSE against n](mc_estimators/error_vs_n.png)" in text
    assert "(mc_estimators/error_vs_distance.png)" in text
    assert text.count("\n| ") == len(metrics["pairs"]) + 1  # header + one row per pair
    assert len(metrics["table"]) == len(metrics["pairs"]) * len(mc_estimators.ESTIMATORS)


def test_cells_are_consistent(run):
    _, metrics = run
    num_seeds = metrics["config"]["num_seeds"]
    for pair in metrics["pairs"]:
        for name, cells in pair["estimators"].items():
            assert [c["n"] for c in cells] == metrics["config"]["sizes"]
            for cell in cells:
                assert cell["nonfinite"] == 0
                # RMSE^2 = bias^2 + the population variance over seeds
                variance = cell["std"] ** 2 * (num_seeds - 1) / num_seeds
                assert cell["rmse"] ** 2 == pytest.approx(cell["bias"] ** 2 + variance, rel=1e-6)
                assert cell["bias_stderr"] == pytest.approx(cell["std"] / math.sqrt(num_seeds))


def test_unbiased_estimators_have_no_detectable_bias(run):
    _, metrics = run
    checked = 0
    for pair in metrics["pairs"]:
        # k1 has finite variance for every Gaussian pair; k3 and reverse_k3 only when E_P[r^2] < inf
        names = ("k1", "k3", "reverse_k3") if pair["finite_variance"] else ("k1",)
        for name in names:
            for cell in pair["estimators"][name][-3:]:  # the three largest n
                assert abs(cell["bias"]) < SIGMAS * cell["bias_stderr"], (pair["mu"], pair["sigma"], name, cell)
                checked += 1
    assert checked >= 3 * len(metrics["pairs"])


def test_k2_bias_matches_its_exact_expectation(run):
    _, metrics = run
    for pair in metrics["pairs"]:
        predicted = pair["k2_expectation"] - pair["kl"]
        for cell in pair["estimators"]["k2"][-3:]:
            assert abs(cell["bias"] - predicted) < SIGMAS * cell["bias_stderr"], (pair["mu"], pair["sigma"], cell)
        # the bias is real where it is large: it does not vanish with n
        if abs(predicted) > 0.05:
            assert abs(pair["estimators"]["k2"][-1]["bias"]) > SIGMAS * pair["estimators"]["k2"][-1]["bias_stderr"]


def test_k1_spread_matches_closed_form(run):
    _, metrics = run
    num_seeds = metrics["config"]["num_seeds"]
    # relative standard error of a sample standard deviation of near-Gaussian estimates
    tolerance = SIGMAS / math.sqrt(2 * (num_seeds - 1))
    for pair in metrics["pairs"]:
        for cell in pair["estimators"]["k1"]:
            if cell["n"] >= 100:
                expected = math.sqrt(pair["k1_variance"] / cell["n"])
                assert cell["std"] == pytest.approx(expected, rel=tolerance), (pair["mu"], pair["sigma"], cell)
        rmse = [c["rmse"] for c in pair["estimators"]["k1"]]
        assert rmse[-1] < rmse[0] / 10  # 1000x the samples: ~sqrt(1000) less error


def test_a_deviation_shared_by_every_estimator_on_the_same_draws_is_not_called_a_bias():
    # full scale (mu = 0.1, sigma = 1): k3, k2 (from its exact expectation) and reverse_k3 all read +6.5e-6
    def cell(bias):
        return [{"bias": bias}]

    pair = {"kl": 0.005, "k2_expectation": 0.0050125,
            "estimators": {"k3": cell(6.5e-6), "k2": cell(1.25e-5 + 6.6e-6), "reverse_k3": cell(6.4e-6)}}
    assert "not a bias of the estimator" in mc_estimators._shared_deviation(pair, "k3")
    pair["estimators"]["reverse_k3"] = cell(-1e-6)  # not shared: then it is the estimator's
    assert mc_estimators._shared_deviation(pair, "k3").endswith(": a bias.")
