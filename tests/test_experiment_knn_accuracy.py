"""experiments/knn_accuracy.py: its truths, its samplers, and a tiny run of the factorial design.

The study's numbers are only as good as its truths and its WKV baseline, so: the Gaussian closed forms
are checked against a Monte Carlo of SciPy densities, the Monte Carlo truths (Student-t, mixture)
against SciPy's densities and a quadrature, the samplers against their moments, kljax's WKV against the
SciPy-cKDTree WKV and the universal-divergence package on the same samples, and every estimator's mean
against the truth where the bias is known to be small.
"""

import dataclasses
import json
import math

import numpy as np
import pytest
from scipy import integrate, stats

from experiments import knn_accuracy as K

pytest.importorskip("universal_divergence")

TINY = K.Config(families=K.FAMILIES, dims=(1,), plane_sizes=(200,), small_n=100, small_n_dims=(),
                line_families=("shift",), line_dims=(1,), sizes=(100, 200), base_n=200, unequal_ratios=(0.5,),
                orders=(1,), seeds=6, peer_seeds=2, mc_draws=20000, max_adaptive_n=200,
                candidates=False, dtype="float64")


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("knn_accuracy")
    flags = []
    for field in dataclasses.fields(K.Config):
        value = getattr(TINY, field.name)
        text = ",".join(map(str, value)) if isinstance(value, tuple) else str(value)
        flags += [f"--{field.name.replace('_', '-')}", text]
    return out, K.main(flags + ["--out", str(out), "--no-progress"])


def test_design_covers_every_level_of_every_factor():
    full = K.Config()
    cells = full.cells()
    assert len(cells) == len(set(cells))
    assert {c[0] for c in cells} == set(K.FAMILIES)
    assert {c[1] for c in cells} == {1, 2, 5, 10, 20, 50, 100}
    assert {c[2] for c in cells} == {100, 1000, 10000, 100000}
    assert {c[3] / c[2] for c in cells} == {0.25, 1.0, 4.0}
    assert {c[4] for c in cells} == {1, 4}
    # the brute search at 100k points is only asked for where the k-d tree serves (d <= 6)
    assert all(c[1] <= 6 for c in cells if c[2] > full.line_max_brute_n)
    quick = K.Config.quick().cells()
    assert {c[0] for c in quick} == set(K.FAMILIES) and len({c[4] for c in quick}) == 2
    assert TINY.cells()[-1] == ("shift", 1, 200, 100, 1)
    assert any(c[2] != c[3] for c in quick) and len({c[2] for c in quick}) >= 2


@pytest.mark.parametrize("family, d", [("shift", 1), ("correlated", 3), ("covariance", 20), ("same", 2)])
def test_gaussian_closed_forms_match_monte_carlo(family, d):
    loc_p, tril_p, loc_q, tril_q = K.gaussian_pair(family, d)
    x = K.draw(family, "p", d, np.random.default_rng(123), (40000,))
    log_ratio = (stats.multivariate_normal(loc_p, tril_p @ tril_p.T).logpdf(x)
                 - stats.multivariate_normal(loc_q, tril_q @ tril_q.T).logpdf(x))
    stderr = max(np.std(log_ratio) / math.sqrt(log_ratio.size), 1e-12)
    assert abs(np.mean(log_ratio) - K.true_kl(family, d, 0, 0)["value"]) < 5 * stderr + 1e-12


def test_monte_carlo_truths_match_scipy_densities_and_quadrature():
    rng = np.random.default_rng(5)
    d = 4
    points = rng.standard_normal((50, d)) * 2
    u = np.full(d, 0.5)
    t_p = stats.multivariate_t(np.zeros(d), np.eye(d), df=K.T_DOF)
    t_q = stats.multivariate_t(u, np.eye(d), df=K.T_DOF)
    np.testing.assert_allclose(K.log_ratio("student_t", points), t_p.logpdf(points) - t_q.logpdf(points), atol=1e-10)
    a = K.MIXTURE_OFFSET
    mix_p = 0.5 * (stats.multivariate_normal(-a * u, np.eye(d)).pdf(points)
                   + stats.multivariate_normal(a * u, np.eye(d)).pdf(points))
    mix_q = stats.multivariate_normal(np.zeros(d), np.eye(d) + a * a * np.outer(u, u)).pdf(points)
    np.testing.assert_allclose(K.log_ratio("mixture", points), np.log(mix_p) - np.log(mix_q), atol=1e-10)
    # The mixture's KL is that of its 1-D projection on u: a quadrature agrees with the Monte Carlo.
    p1 = lambda s: 0.5 * (stats.norm.pdf(s, -a) + stats.norm.pdf(s, a))  # noqa: E731
    q1 = lambda s: stats.norm.pdf(s, 0, math.sqrt(1 + a * a))  # noqa: E731
    exact = integrate.quad(lambda s: p1(s) * math.log(p1(s) / q1(s)), -15, 15)[0]
    mc = K.true_kl("mixture", 10, 200000, 0)
    assert mc["stderr"] > 0 and abs(mc["value"] - exact) < 5 * mc["stderr"]
    # Bounded: KL(U || Beta(2, 2)) per coordinate by quadrature.
    per = integrate.quad(lambda v: -stats.beta(2, 2).logpdf(v), 0, 1)[0]
    assert K.true_kl("bounded", 7, 0, 0)["value"] == pytest.approx(2 * per, rel=1e-9)
    assert K.true_kl("bounded", 1, 0, 0)["value"] == pytest.approx(per, rel=1e-9)


@pytest.mark.parametrize("family", ["student_t", "mixture", "bounded", "correlated"])
def test_samplers_have_the_family_moments(family):
    d = 3
    x = K.draw(family, "p", d, np.random.default_rng(1), (200000,))
    y = K.draw(family, "q", d, np.random.default_rng(2), (200000,))
    u = np.full(d, 1 / math.sqrt(d))
    expected = {
        "student_t": (np.zeros(d), K.T_DOF / (K.T_DOF - 2) * np.eye(d), u, K.T_DOF / (K.T_DOF - 2) * np.eye(d)),
        "mixture": (np.zeros(d), np.eye(d) + K.MIXTURE_OFFSET ** 2 * np.outer(u, u), np.zeros(d),
                    np.eye(d) + K.MIXTURE_OFFSET ** 2 * np.outer(u, u)),
        "bounded": (np.full(d, 0.5), np.eye(d) / 12, np.full(d, 0.5), np.diag([0.05, 0.05, 1 / 12])),
    }
    if family == "correlated":
        loc_p, tril_p, loc_q, tril_q = K.gaussian_pair(family, d)
        expected[family] = (loc_p, tril_p @ tril_p.T, loc_q, tril_q @ tril_q.T)
    mean_p, cov_p, mean_q, cov_q = expected[family]
    for sample, mean, cov in ((x, mean_p, cov_p), (y, mean_q, cov_q)):
        np.testing.assert_allclose(sample.mean(0), mean, atol=0.03)
        np.testing.assert_allclose(np.cov(sample.T), cov, atol=0.06)


def test_metrics_structure_goal_and_figures(run):
    out, metrics = run
    assert json.loads((out / "metrics.json").read_text())["config"]["dims"] == list(TINY.dims)
    names, default = metrics["config"]["estimators"], metrics["config"]["default_estimator"]
    assert "wkv" in names and default in names
    assert [(c["family"], c["d"], c["n"], c["m"], c["k"]) for c in metrics["cells"]] == TINY.cells()
    for c in metrics["cells"]:
        assert set(c["estimators"]) == set(names)  # max(n, m) <= max_adaptive_n everywhere here
        for name, row in c["estimators"].items():
            assert row["num_seeds"] == TINY.seeds and row["nonfinite"] == 0
            assert row["bias"] == pytest.approx(row["mean"] - c["true_kl"])
            variance = row["std"] ** 2 * (TINY.seeds - 1) / TINY.seeds
            assert row["rmse"] ** 2 == pytest.approx(row["bias"] ** 2 + variance, rel=1e-9)
            assert row["rmse_ci"][0] <= row["rmse"] <= row["rmse_ci"][1]
            if name != "wkv_adaptive":
                hits = np.abs(np.asarray(row["estimates"]) - c["true_kl"]) <= 1.959964 * np.asarray(row["stderrs"])
                assert row["coverage"] == pytest.approx(hits.mean())
        wkv, ours = c["estimators"]["wkv"], c["estimators"][default]
        assert c["ratio"] == pytest.approx(ours["rmse"] / wkv["rmse"])
        assert c["ratio_ci"][0] <= c["ratio"] <= c["ratio_ci"][1]
        assert c["wkv_bias_dominates"] == (wkv["bias"] ** 2 > wkv["std"] ** 2)
        assert c["goal_met"] == (c["ratio"] <= (0.5 if c["wkv_bias_dominates"] else 1.1))
    assert metrics["summary"]["cells"] == len(TINY.cells())
    assert metrics["as_default"][default]["goal_met"] == metrics["summary"]["goal_met"]
    for figure in ("ratio_heatmap_n200.png", "error_vs_n_shift_d1.png"):
        assert (out / figure).stat().st_size > 0


def test_kljax_wkv_equals_peers_and_estimates_are_near_the_truth(run):
    _, metrics = run
    for c in metrics["cells"]:
        for peer, diff in c["peer_max_abs_diff"].items():
            assert diff < 1e-9, (peer, c["family"], c["d"])
        if c["d"] == 1:  # at n >= 100 in 1-D every estimator's bias is a few hundredths of a nat
            for row in c["estimators"].values():
                assert abs(row["bias"]) < 0.15 + 5 * row["bias_stderr"], (c["family"], row)


def test_report_has_tables_figures_and_a_computed_reading(run):
    _, metrics = run
    text = K.report(metrics, "knn_accuracy")
    for name in metrics["config"]["estimators"]:
        assert f"`{name}`" in text
    assert "(knn_accuracy/ratio_heatmap_n200.png)" in text and "(knn_accuracy/error_vs_n_shift_d1.png)" in text
    s = metrics["summary"]
    assert f"met in {s['goal_met']} of {s['cells']} cells" in text and "**Reading**" in text


def test_chunked_estimates_equal_the_public_estimators():
    # Chunking over seeds (the last chunk padded) must not change any estimate; the study's values
    # are the public functions' (knn._kl_study against kl_with_stderr: tests/test_knn.py).
    from kljax import knn

    x, y = K.sample_sets("covariance", 7, 2, 100, 80, 5, np.float64)
    chunked = K.kljax_estimates(x, y, k=1, adaptive=True, candidates=False, seeds_per_call=2)
    for s in range(5):
        estimate, stderr = knn.kl_with_stderr(x[s], y[s])
        assert chunked["selected"][0][s] == pytest.approx(float(estimate), abs=1e-12)
        assert chunked["selected"][1][s] == pytest.approx(float(stderr), abs=1e-12)
        assert np.isfinite(chunked["wkv_adaptive"][0][s])  # knn.kl itself, inside the vmapped call
        assert chunked["wkv"][0][s] == pytest.approx(K.ckdtree_wkv(x[s], y[s], 1), abs=1e-9)


def test_float32_sample_sets_have_no_coincident_points():
    x, y = K.sample_sets("shift", 0, 1, 10000, 10000, 2, np.float32)
    assert x.dtype == y.dtype == np.float32
    for s in range(2):
        assert np.unique(np.concatenate([x[s], y[s]]), axis=0).shape[0] == 20000
