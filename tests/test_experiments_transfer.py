"""Smoke-and-sense tests of the fine-tuning and distillation experiments at a small scale.

Each runs the experiment's ``main`` in-process with tiny settings and checks the metrics layout the
report relies on, the figure, and a result that must hold if the study is wired correctly.
"""

from __future__ import annotations

import json

import numpy as np
import pytest

from experiments import distill_kl, finetune_kl


def _check_written(out_dir, metrics, module, figure):
    assert json.loads((out_dir / "metrics.json").read_text()).keys() == metrics.keys()
    assert (out_dir / f"{figure}.png").stat().st_size > 1000
    text = module.report(metrics, out_dir.name)
    assert f"({out_dir.name}/{figure}.png)" in text and "|" in text


def test_finetune_kl_penalty_reduces_forgetting(tmp_path):
    out = tmp_path / "finetune_kl"
    metrics = finetune_kl.main(["--out", str(out), "--betas", "0,10", "--l2", "0,1", "--seeds", "1",
                                "--steps", "150", "--no-progress"])
    _check_written(out, metrics, finetune_kl, "tradeoff")
    assert metrics["base"]["old_task_accuracy"] > 0.95
    no_penalty, strong = metrics["sweep"]
    assert {"beta", "old_task_accuracy", "new_task_accuracy"} <= no_penalty.keys()
    assert (no_penalty["beta"], strong["beta"]) == (0.0, 10.0)
    # beta = 0 learns the new task and forgets the old one; a large beta keeps the old task
    assert no_penalty["new_task_accuracy"] > 0.8
    assert strong["old_task_accuracy"] > no_penalty["old_task_accuracy"] + 0.2
    assert strong["kl_to_base_on_old_inputs"] < no_penalty["kl_to_base_on_old_inputs"]
    # the L2 sweep with coefficient 0 is the same fine-tuning run as beta = 0
    assert metrics["l2_sweep"][0]["old_task_accuracy"] == pytest.approx(no_penalty["old_task_accuracy"], abs=1e-6)


def test_distill_kl_forward_objective_reaches_lower_forward_kl(tmp_path):
    out = tmp_path / "distill_kl"
    metrics = distill_kl.main(["--out", str(out), "--temperatures", "1,4", "--seeds", "1", "--steps", "200",
                               "--no-progress"])
    _check_written(out, metrics, distill_kl, "distillation")
    rows = {(r["direction"], r["temperature"]): r for r in metrics["results"]}
    assert rows.keys() == {("forward", 1.0), ("forward", 4.0), ("reverse", 1.0), ("reverse", 4.0)}
    assert metrics["teacher"]["accuracy"] > 0.9
    for row in rows.values():
        assert 0.0 <= row["ece"] <= 1.0 and row["forward_kl"] >= 0 and row["reverse_kl"] >= 0
        assert row["student_accuracy"] > 0.5
    # training on the forward KL reaches a lower forward KL (test inputs, T = 1) than training on the reverse
    assert rows[("forward", 1.0)]["forward_kl"] < rows[("reverse", 1.0)]["forward_kl"]


def test_expected_calibration_error_against_hand_computation():
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]))
    labels = np.array([0, 1, 1, 1])  # correct: yes, no, yes, yes; confidences 0.9, 0.6, 0.7, 0.8
    # 4 bins: {0.6 wrong, 0.7 right} in [0.5, 0.75): |0.5 - 0.65|; {0.9, 0.8} in [0.75, 1]: |1 - 0.85|
    assert distill_kl.expected_calibration_error(logits, labels, num_bins=4) == pytest.approx(0.5 * 0.15 + 0.5 * 0.15)
    # 1 bin: |mean accuracy - mean confidence| = |0.75 - 0.75|
    assert distill_kl.expected_calibration_error(logits, labels, num_bins=1) == pytest.approx(0.0, abs=1e-12)
