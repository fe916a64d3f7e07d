"""Smoke-and-sense tests of the drift experiment at a small scale.

Each runs the experiment's ``main`` in-process with tiny settings and checks the metrics layout the
report relies on, the figure, and a result that must hold if the study is wired correctly.
"""

from __future__ import annotations

import json

from experiments import drift_monitor


def _check_written(out_dir, metrics, module, figure):
    assert json.loads((out_dir / "metrics.json").read_text()).keys() == metrics.keys()
    assert (out_dir / f"{figure}.png").stat().st_size > 1000
    text = module.report(metrics, out_dir.name)
    assert f"({out_dir.name}/{figure}.png)" in text and "|" in text


def test_drift_monitor_alarms_under_strong_shift_and_rarely_before(tmp_path):
    out = tmp_path / "drift_monitor"
    metrics = drift_monitor.main(["--out", str(out), "--repeats", "1", "--windows", "8", "--clean-windows", "4",
                                  "--null-windows", "4", "--permutations", "49", "--histogram-permutations",
                                  "1279", "--no-progress"])
    _check_written(out, metrics, drift_monitor, "stream")
    summary = metrics["summary"]
    # pixel noise at severity >= 0.5 (sd >= 4 on the 0-16 scale) is obvious to the input detectors
    assert summary["pixel_noise"]["input_histogram"]["detected"] == 1
    assert summary["pixel_noise"]["input_knn"]["detected"] == 1
    # a class-mix shift shows in the predicted class distribution
    assert summary["class_mix"]["output_mean_kl"]["detected"] == 1
    for name, rates in metrics["false_alarms"].items():
        assert rates["windows"] == 4 + 3 * 4
        assert rates["alarms"] <= 1, name
    stream = metrics["repeats"][0]["streams"]["pixel_noise"]
    assert len(stream["pool_accuracy"]) == 8 and stream["pool_accuracy"][0] > 0.9
