"""Smoke test of experiments/knn_accuracy.py on a tiny grid, beside independent truths.

The study's numbers are only as good as its truth and its WKV baseline, so: the closed form is checked
against a Monte Carlo average of log p - log q (SciPy densities), kljax's WKV must equal the
SciPy-cKDTree WKV and the universal-divergence package on the same samples (float64 rounding), and
every estimator's mean must lie near the closed form.
"""

import json
import math

import numpy as np
import pytest
from scipy.stats import multivariate_normal

from experiments import knn_accuracy

pytest.importorskip("universal_divergence")

DIMS = (1, 2)
SIZE = 500
SEEDS = 8
PEER_SEEDS = 4


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("knn_accuracy")
    metrics = knn_accuracy.main(["--dims", ",".join(map(str, DIMS)), "--sizes", str(SIZE), "--seeds", str(SEEDS),
                                 "--peer-seeds", str(PEER_SEEDS), "--dtype", "float64", "--out", str(out),
                                 "--no-progress"])
    return out, metrics


@pytest.mark.parametrize("d", [1, 3, 20])
def test_closed_form_matches_monte_carlo(d):
    loc_p, tril_p, loc_q, tril_q = knn_accuracy.gaussian_pair(d)
    x, _ = knn_accuracy.sample_sets(123, d, 40000, 1, np.float64)
    log_ratio = (multivariate_normal(loc_p, tril_p @ tril_p.T).logpdf(x[0])
                 - multivariate_normal(loc_q, tril_q @ tril_q.T).logpdf(x[0]))
    stderr = np.std(log_ratio) / math.sqrt(log_ratio.size)
    assert abs(np.mean(log_ratio) - knn_accuracy.gaussian_kl(loc_p, tril_p, loc_q, tril_q)) < 5 * stderr


def test_metrics_structure(run):
    out, metrics = run
    assert json.loads((out / "metrics.json").read_text())["config"]["dims"] == list(DIMS)
    names = metrics["config"]["estimators"]
    assert "wkv" in names and metrics["config"]["default_estimator"] in names
    expected = {(d, SIZE, name) for d in DIMS for name in names + metrics["config"]["peers"]}
    cells = {(c["d"], c["n"], c["estimator"]): c for c in metrics["cells"]}
    assert set(cells) == expected and len(metrics["cells"]) == len(expected)
    for (d, _, name), cell in cells.items():
        assert cell["num_seeds"] == (PEER_SEEDS if cell["source"] == "peer" else SEEDS)
        assert cell["nonfinite"] == 0
        assert cell["true_kl"] == pytest.approx(metrics["true_kl"][str(d)]["value"])
        assert cell["bias"] == pytest.approx(cell["mean"] - cell["true_kl"])
        # RMSE^2 = bias^2 + population variance.
        variance = cell["std"] ** 2 * (cell["num_seeds"] - 1) / cell["num_seeds"]
        assert cell["rmse"] ** 2 == pytest.approx(cell["bias"] ** 2 + variance, rel=1e-9)
    assert {(r["d"], r["n"]) for r in metrics["ratios"]} == {(d, SIZE) for d in DIMS}
    for r in metrics["ratios"]:
        default = cells[(r["d"], r["n"], metrics["config"]["default_estimator"])]
        assert r["ratio"] == pytest.approx(default["rmse"] / cells[(r["d"], r["n"], "wkv")]["rmse"])
        wkv = cells[(r["d"], r["n"], "wkv")]
        assert r["wkv_bias_dominates"] == (wkv["bias"] ** 2 > wkv["std"] ** 2)
        assert r["target_met"] == (r["ratio"] <= (0.5 if r["wkv_bias_dominates"] else 1.1))
    assert metrics["target"]["cells_total"] == len(DIMS)
    for figure in ("rmse_vs_d.png", "bias_vs_d.png"):
        assert (out / figure).stat().st_size > 0


def test_kljax_wkv_equals_peers_on_same_samples(run):
    _, metrics = run
    for check in metrics["wkv_checks"]:
        assert check["num_seeds"] == PEER_SEEDS
        assert check["wkv_kljax_vs_ckdtree_max_abs_diff"] < 1e-9
        assert check["universal_divergence_vs_ckdtree_max_abs_diff"] < 1e-9


def test_estimates_near_truth(run):
    # At n = 500, d <= 2 the kNN estimators' bias is a few hundredths of a nat; allow 0.1 nat plus
    # 5 standard errors of the mean over seeds, which a wrong formula (sign, missing d, digamma) exceeds.
    _, metrics = run
    for cell in metrics["cells"]:
        assert abs(cell["bias"]) < 0.1 + 5 * cell["bias_stderr"], cell


def test_report_has_table_figures_and_verdict(run):
    _, metrics = run
    text = knn_accuracy.report(metrics, "knn_accuracy")
    for name in metrics["config"]["estimators"] + metrics["config"]["peers"]:
        assert f"`{name}`" in text
    assert "![" in text and "(knn_accuracy/rmse_vs_d.png)" in text and "(knn_accuracy/bias_vs_d.png)" in text
    assert f"in {metrics['target']['cells_met']} of {metrics['target']['cells_total']} cells" in text or \
        "Target met in all" in text


def test_chunked_vmapped_estimates_equal_one_call_and_single_sets():
    # Chunking over seeds (with the last chunk padded) must not change any estimate.
    x, y = knn_accuracy.sample_sets(7, 2, 100, 5, np.float64)
    kwargs = dict(estimator="wkv", k=1, block_size=None)
    whole, _, _ = knn_accuracy.kljax_estimates(x, y, seeds_per_call=5, **kwargs)
    chunked, _, _ = knn_accuracy.kljax_estimates(x, y, seeds_per_call=2, **kwargs)
    assert whole.shape == chunked.shape == (5,)
    np.testing.assert_allclose(chunked, whole, rtol=0, atol=1e-12)
    singles = [knn_accuracy.ckdtree_wkv(x[s], y[s], 1) for s in range(5)]
    np.testing.assert_allclose(whole, singles, rtol=0, atol=1e-9)


def test_float32_sample_sets_have_no_coincident_points():
    # 2 * 10^4 float32 draws in d = 1 coincide with high probability; a coincidence makes a
    # neighbour distance 0 and every estimate undefined, so the study redraws them.
    x, y = knn_accuracy.sample_sets(0, 1, 10000, 2, np.float32)
    assert x.dtype == y.dtype == np.float32
    for s in range(2):
        assert np.unique(np.concatenate([x[s], y[s]]), axis=0).shape[0] == 20000
