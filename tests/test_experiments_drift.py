"""Smoke-and-sense tests of the drift experiment at a small scale.

Each runs the experiment's ``main`` in-process with tiny settings and checks the metrics layout the
report relies on, the figure, and a result that must hold if the study is wired correctly.
"""

from __future__ import annotations

import json

import pytest

from experiments import drift_monitor


def _check_written(out_dir, metrics, module, figure):
    assert json.loads((out_dir / "metrics.json").read_text()).keys() == metrics.keys()
    assert (out_dir / f"{figure}.png").stat().st_size > 1000
    text = module.report(metrics, out_dir.name)
    assert f"({out_dir.name}/{figure}.png)" in text and "|" in text and "**Reading**" in text


def test_drift_study_tells_harmful_from_harmless_shifts_and_detects_the_obvious(tmp_path):
    out = tmp_path / "drift_monitor"
    repeats = 3
    metrics = drift_monitor.main(["--out", str(out), "--window-sizes", "200", "--repeats", str(repeats),
                                  "--permutations", "49", "--histogram-permutations", "1299", "--streams", "2",
                                  "--stream-windows", "20", "--no-progress"])
    _check_written(out, metrics, drift_monitor, "power")
    harm, power = metrics["harm"], metrics["power"]
    # noise on the border pixels, which the classifier gives no weight, costs no accuracy; strong noise
    # and a one-pixel translation do
    assert harm["border_noise"]["verdict"] == "harmless" and abs(harm["border_noise"]["accuracy_drop"]) < 0.01
    assert harm["translation"]["verdict"] == "harmful" and harm["translation"]["accuracy_drop"] > 0.3
    assert harm["gaussian_noise"]["verdict"] == "harmful"
    # a 30-point accuracy drop is seen by the multivariate input detectors in every repeat
    for name in ("gaussian_kl", "knn_kl", "knn_graph_kl", "energy"):
        assert power["translation"][name]["200"]["rate"] == 1.0, name
    # the label shift shows in the predicted-class frequencies (BBSD)
    assert power["class_mix"]["bbsd_kl"]["200"]["rate"] >= 2 / 3
    for name in drift_monitor.DETECTORS:
        cell = power["none"][name]["200"]
        assert cell["wilson95"][0] <= cell["rate"] <= cell["wilson95"][1]
    assert [s["expected"] for s in metrics["streams"]] == pytest.approx([20.0, 30.0])
    assert all(len(s["first_alarm"]) == 2 for s in metrics["streams"])
