"""experiments/ratio_study.py: its tasks' truths against independent computations, and a tiny run end to end.

The tiny run (d = 10, n = 600, 2 seeds, one MI step, short NWJ / InfoNCE trainings) checks the
plumbing: every cell is present and finite, the RMSE ratios and their intervals are consistent with the
per-seed values, and the report's reading is computed from them. The accuracy claims themselves are
the study's (its quick run is part of the report) and kljax.ratio's tests'.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from experiments import _common, knn_accuracy, ratio_study


def test_anisotropic_truth_is_the_gaussian_closed_form():
    pair = ratio_study.anisotropic_pair(10)
    np.testing.assert_allclose(ratio_study.kl_truth("anisotropic", 10, 10, 0)["value"],
                               knn_accuracy.gaussian_kl(*pair), rtol=1e-5)


def test_mi_samples_have_the_staircase_correlation_and_the_maps_are_invertible():
    mi = 4.0
    x, y = ratio_study.mi_samples(mi, 20000, 1, 0)
    rho = math.sqrt(1.0 - math.exp(-2.0 * mi / ratio_study.MI_HALF_DIM))
    corr = np.mean(x[0] * y[0], axis=0) / (np.std(x[0], axis=0) * np.std(y[0], axis=0))
    np.testing.assert_allclose(corr, rho, atol=0.01)
    v = np.random.default_rng(0).standard_normal((500, 10))
    turned = ratio_study.spiral(v)
    np.testing.assert_allclose(np.linalg.norm(turned, axis=1), np.linalg.norm(v, axis=1), rtol=1e-12)
    # The inverse: rotate back by the same angle (the norm, hence the angle, is unchanged).
    angle = ratio_study.SPIRAL_SPEED * np.sum(v * v, axis=1)
    back = turned.copy()
    back[:, 0] = np.cos(angle) * turned[:, 0] + np.sin(angle) * turned[:, 1]
    back[:, 1] = -np.sin(angle) * turned[:, 0] + np.cos(angle) * turned[:, 1]
    np.testing.assert_allclose(back, v, atol=1e-12)
    assert np.all(np.diff(ratio_study.half_cube(np.linspace(-3, 3, 101))) > 0)


def test_student_t_correction_matches_a_monte_carlo_of_the_entropies():
    # I(X; Y) of a 1 + 1-variate Student-t with identity dispersion: E[log p(x, y) - log p(x) - log p(y)].
    from scipy import stats
    dof = 5.0
    rng = np.random.default_rng(1)
    z = rng.standard_normal((400_000, 2)) / np.sqrt(rng.chisquare(dof, (400_000, 1)) / dof)
    joint = stats.multivariate_t(np.zeros(2), np.eye(2), df=dof).logpdf(z)
    marginal = stats.t(dof).logpdf(z).sum(axis=1)
    values = joint - marginal
    assert abs(ratio_study.student_correction(dof, 1, 1) - values.mean()) < 4 * values.std() / math.sqrt(values.size)


def test_parse_method_and_rmse_ratio():
    assert ratio_study.parse_method("classifier/quadratic/waymarks=1/penalty=0.5/extrapolate=false") == {
        "method": "classifier", "model": "quadratic", "waymarks": 1, "penalty": 0.5, "extrapolate": False}
    value, (low, high) = ratio_study.rmse_ratio([1.1, 0.9, 1.2], [1.5, 0.4, 1.6], 1.0)
    np.testing.assert_allclose(value, math.sqrt((0.01 + 0.01 + 0.04) / (0.25 + 0.36 + 0.36)))
    assert low <= value <= high


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    # One KL cell and one MI cell, the cheapest run through every stage (each distinct shape compiles a
    # program: the MI cell has x, y in R^2, not the study's R^10); the reading's other branches are
    # checked on made-up cells below.
    out = tmp_path_factory.mktemp("ratio_study")
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setattr(ratio_study, "MI_HALF_DIM", 2)
    try:
        metrics = ratio_study.main([
            "--families", "anisotropic", "--dims", "10", "--sizes", "300", "--seeds", "2", "--knn-estimators", "",
            "--variational-kl-methods", "", "--mi-size", "300", "--mi-values", "1", "--half-cube-values", "",
            "--spiral-values", "", "--student-t-values", "", "--mi-methods", "classifier/quadratic",
            "--transform-methods", "", "--mi-baselines", "entropies", "--out", str(out), "--no-progress"])
    finally:
        monkeypatch.undo()
    return out, metrics


def test_tiny_run_writes_consistent_metrics_figures_and_report(tiny):
    out, metrics = tiny
    assert _common.load_metrics(out)["config"]["seeds"] == 2
    for name in ("kl_rmse_ratio", "kl_rmse", "mi_estimates"):
        assert (out / f"{name}.png").stat().st_size > 5_000
    assert [c["estimator"] for c in metrics["kl_cells"]] == ["ratio classifier/quadratic",
                                                             f"knn {ratio_study.knn_default()}"]
    assert [c["estimator"] for c in metrics["mi_cells"]] == ["ratio classifier/quadratic", "knn entropies (k=3)"]
    for c in metrics["kl_cells"] + metrics["mi_cells"]:
        assert len(c["values"]) == 2 and np.all(np.isfinite(c["values"])), c["estimator"]
        np.testing.assert_allclose(c["rmse"], np.sqrt(np.mean((np.array(c["values"]) - c["truth"]) ** 2)))
        assert c["rmse_ci"][0] <= c["rmse"] + 1e-12 and c["rmse"] <= c["rmse_ci"][1] + 1e-12
    (r,) = metrics["kl_ratios"]
    np.testing.assert_allclose(r["rmse_ratio"], r["ratio_rmse"] / r["best_knn_rmse"])
    assert r["target_met"] == (r["rmse_ratio"] <= ratio_study.TARGET_RATIO)
    assert metrics["target"]["cells_total"] == 1 and len(metrics["mi_ratios"]) == 1
    text = ratio_study.report(metrics, "ratio_study")
    assert "**Reading**" in text and "![KL RMSE ratio](ratio_study/kl_rmse_ratio.png)" in text
    assert f"| {r['rmse_ratio']:.2f} | [{r['rmse_ratio_ci'][0]:.2f}, {r['rmse_ratio_ci'][1]:.2f}] |" in text


def _made_up(truth, values, estimator, **labels):
    return ratio_study._cell(np.asarray(values), np.full(len(values), 0.05), truth, 1.0, estimator=estimator,
                             **labels)


def test_reading_states_the_failure_modes_from_the_numbers():
    kl = {"family": "covariance", "d": 20, "n": 5000, "truth_stderr": 0.0}
    staircase = {"task": "staircase", "n": 5000}
    cells = [_made_up(2.0, [2.01, 1.98, 2.02, 1.99, 2.0], "ratio classifier/quadratic", **kl),
             _made_up(2.0, [1.0, 3.5, 2.9, 0.2, 2.6], "ratio dv/quadratic", **kl)]
    mi_cells = [_made_up(10.0, [10.1, 9.9, 10.0, 10.05, 9.95], "ratio classifier/quadratic", mi=10.0, **staircase),
                _made_up(10.0, [8.0, 8.1, 7.9, 8.05, 7.95], "ratio classifier/quadratic/waymarks=1", mi=10.0,
                         **staircase),
                _made_up(10.0, [5.5, 5.52, 5.51, 5.5, 5.53], "ratio infonce/quadratic", mi=10.0, **staircase)]
    metrics = {"config": {"seeds": 5, "infonce_ceiling": math.log(256)}, "kl_cells": cells, "kl_ratios": [],
               "mi_cells": mi_cells, "mi_ratios": [], "target": {}}
    lines = ratio_study.reading(metrics)
    dv = next(line for line in lines if line.startswith("dv/quadratic"))
    assert "not significant" not in dv.split("F test")[1].split(")")[0]  # 100 times the spread: significant
    mi = next(line for line in lines if line.startswith("Staircase MI"))
    assert "MI 10: +0.00 (95% CI" in mi and "single-ratio -2.00" in mi and "p = " in mi
    assert any("staircase MI = 10 reads 5.51" in line for line in lines)
