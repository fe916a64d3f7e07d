"""The bandit and sequence policy experiments at a small scale, checked against exact answers computed here.

- bandit: the regularised optimum and k3's fixed point are recomputed by direct numerical maximisation
  (SciPy) and the trained policies must land on the fixed point their expected gradient predicts;
- sequences: the optimum is recomputed by brute force in NumPy, the gradient biases are exact.

The PPO experiment's tests are in test_experiments_ppo.py.
"""

import itertools

import numpy as np
import pytest
from scipy import optimize, special, stats

from experiments import policy_bandit, policy_sequence

REWARDS = np.array([1.0, 0.5, 0.0])
REF = np.array([0.2, 0.3, 0.5])
BETA = 0.5


def _maximise_on_simplex(objective):
    """argmax over the simplex of ``objective(p)``, by BFGS on softmax logits."""
    result = optimize.minimize(lambda z: -objective(special.softmax(z)), np.zeros(3), method="BFGS",
                               options={"gtol": 1e-10})
    return special.softmax(result.x)


@pytest.fixture(scope="module")
def bandit(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy_bandit")
    metrics = policy_bandit.main(["--num-seeds", "16", "--num-steps", "1000", "--out", str(out), "--no-progress"])
    return metrics, out


def test_bandit_fixed_points_are_the_right_maximisers(bandit):
    metrics, _ = bandit
    reverse = _maximise_on_simplex(lambda p: p @ REWARDS - BETA * np.sum(p * np.log(p / REF)))
    forward = _maximise_on_simplex(lambda p: p @ REWARDS - BETA * np.sum(REF * np.log(REF / p)))
    np.testing.assert_allclose(metrics["optimum"], reverse, atol=1e-6)
    np.testing.assert_allclose(metrics["placements"]["k3_loss"]["fixed_point"], forward, atol=1e-6)
    np.testing.assert_allclose(metrics["placements"]["k1_loss"]["fixed_point"], [1.0, 0.0, 0.0])
    assert metrics["optimum_objective"] == pytest.approx(BETA * np.log(REF @ np.exp(REWARDS / BETA)), rel=1e-12)


def test_bandit_placements_converge_where_their_gradient_says(bandit):
    metrics, out = bandit
    pl = metrics["placements"]
    # TV between the two candidate fixed points is 0.07; the trained policies must resolve it.
    for name in ("k1_reward", "k2_loss", "k3_loss_is", "exact_kl"):
        assert pl[name]["distance_to_optimum"] < 0.01, (name, pl[name]["final_probs"])
        assert pl[name]["last_window_change"] < 0.01
    assert pl["k3_loss"]["distance_to_fixed_point"] < 0.01
    assert pl["k3_loss"]["distance_to_optimum"] > 0.05
    assert pl["k1_loss"]["final_probs"][0] > 0.95  # heading for the greedy vertex, no regularisation
    assert pl["k1_loss"]["distance_to_optimum"] > 0.4
    for name in pl:
        assert pl[name]["objective"] <= metrics["optimum_objective"] + 1e-6
        # the reported seed std and the table's 95% half-width describe the same spread (float64 both)
        seeds = metrics["config"]["num_seeds"]
        factor = stats.t.ppf(0.975, seeds - 1) / np.sqrt(seeds)
        np.testing.assert_allclose(pl[name]["final_probs_ci95"], factor * np.asarray(pl[name]["final_probs_seed_std"]),
                                   rtol=1e-6, atol=1e-12)
    assert (out / "metrics.json").is_file() and (out / "arm_probabilities.png").is_file()
    assert (out / "simplex.png").is_file()
    text = policy_bandit.report(metrics, "policy_bandit")
    assert "policy_bandit/arm_probabilities.png" in text and "k3_loss" in text


def test_bandit_cli_rejects_bad_reference(tmp_path):
    with pytest.raises(SystemExit):
        policy_bandit.main(["--ref-probs", "0.5,0.6,0.1", "--out", str(tmp_path)])


# --- sequences --------------------------------------------------------------------------------------


def _brute_force_sequence_optimum(vocab_size, length, beta, seed, ref_scale=1.0):
    """J* = beta log sum_x pi_ref(x) exp(R(x) / beta) with pi_ref rebuilt from the experiment's seed."""
    rng = np.random.default_rng(seed)
    num_prefixes = sum(vocab_size ** t for t in range(length))
    table = (rng.normal(size=(num_prefixes, vocab_size)) * ref_scale).astype(np.float32).astype(float)
    log_cond = table - special.logsumexp(table, axis=1, keepdims=True)
    terms = []
    for x in itertools.product(range(vocab_size), repeat=length):
        log_p, row, offset = 0.0, 0, 0
        for t, token in enumerate(x):
            log_p += log_cond[offset + row, token]
            offset += vocab_size ** t
            row = row * vocab_size + token
        reward = np.mean([x[t] == (x[t - 1] + 1) % vocab_size for t in range(1, length)])
        terms.append(log_p + reward / beta)
    return beta * special.logsumexp(terms)


@pytest.fixture(scope="module")
def sequence(tmp_path_factory):
    out = tmp_path_factory.mktemp("policy_sequence")
    metrics = policy_sequence.main(["--vocab-size", "3", "--length", "4", "--num-steps", "300", "--num-seeds", "2",
                                    "--num-records", "5", "--out", str(out), "--no-progress",
                                    "--grid-lengths", "2,3", "--grid-betas", "0.1,1", "--grid-steps", "300"])
    return metrics, out


def test_sequence_experiment_exact_answers(sequence):
    metrics, out = sequence
    optimum = _brute_force_sequence_optimum(3, 4, 0.1, seed=0)
    assert metrics["optimum"]["objective"] == pytest.approx(optimum, rel=1e-5)
    pl = metrics["placements"]
    for name, m in pl.items():
        if m["kind"] == "correct":
            assert m["relative_bias"] < 1e-4, name
            assert m["fixed_point_gap"] < 2e-3, name  # exact expected-gradient training reaches J*
        elif m["kind"] == "partial":
            assert m["relative_bias"] > 0.05, name
            assert m["fixed_point_gap"] > pl["seq_k1_reward"]["fixed_point_gap"] + 1e-3, name
        assert m["fixed_point_objective"] <= metrics["optimum"]["objective"] + 1e-4
    assert pl["token_k1_loss"]["relative_bias"] == pytest.approx(1.0, abs=1e-4)  # E[grad] = 0 exactly
    # Rao-Blackwellisation lowers the variance of the correct gradient
    assert pl["rb_exact_kl"]["variance"] < pl["seq_k1_reward"]["variance"]
    for name in ("gradient_bias_variance", "learning_curves", "fixed_points", "placement_grid"):
        assert (out / f"{name}.png").is_file()
    text = policy_sequence.report(metrics, "policy_sequence")
    assert "policy_sequence/learning_curves.png" in text
    # the per-token penalties share one expected gradient, so the reading names one shared fixed point
    # rather than a "worst" among equals
    assert "so they share one fixed point" in text and "the worst" not in text


def test_sequence_grid_separates_sequence_and_per_token_fixed_points(sequence):
    metrics, _ = sequence
    grid = metrics["grid"]
    gap = np.asarray(grid["gap"])
    assert gap.shape == (2, 2, len(policy_sequence.NAMES))
    kinds = [policy_sequence.PLACEMENTS[n][0] for n in policy_sequence.NAMES]
    correct = gap[:, :, [k == "correct" for k in kinds]]
    partial = gap[:, :, [k == "partial" for k in kinds]]
    # the sequence-level placements share one fixed point in every cell; the per-token ones miss it
    assert np.ptp(correct, axis=2).max() < 1e-5
    assert (partial.min(axis=2) > correct.max(axis=2) + 2e-5).all()
    # the grid names the placements practice uses, and the optimum's KL matches enumeration
    assert grid["practice"] == {"k1_reward_to_go": "PPO-RLHF", "token_k3_loss": "GRPO"}
    assert np.all(np.asarray(grid["optimum_kl"]) > 0)
    text = policy_sequence.report(metrics, "policy_sequence")
    assert "k1_reward_to_go (PPO-RLHF)" in text and "token_k3_loss (GRPO)" in text
