"""The PPO experiment: each penalty's expected gradient by enumeration (the module docstring's table), the
statistics against SciPy and by hand, and a small run whose wiring is checked: common random numbers
(beta = 0 reproduces the unconstrained arm), PPO's adaptive rule, and the logged KL values."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import stats

from experiments import _common, _stats, ppo_kl
from kljax import discrete


@jax.jit
def _expected_gradients(logits, logits_old):
    """sum_a pi_old(a) grad_logits term(a), for every penalty, by enumerating the 3 actions."""
    log_old = jax.nn.log_softmax(logits_old)

    def terms(logits):  # every penalty's term at each of the 3 actions, shape (3,) per penalty
        return ppo_kl.penalty_terms(jnp.broadcast_to(logits, (3, 3)), jnp.broadcast_to(logits_old, (3, 3)),
                                    jax.nn.log_softmax(logits), log_old)

    return {name: jnp.exp(log_old) @ jacobian for name, jacobian in jax.jacrev(terms)(logits).items()}


def test_penalty_gradients_match_the_table():
    logits = jnp.array([0.4, -0.3, 0.1])
    logits_old = jnp.array([-0.2, 0.5, 0.0])
    pi, pi_old = np.asarray(jax.nn.softmax(logits)), np.asarray(jax.nn.softmax(logits_old))
    score = np.eye(3) - pi[None, :]  # row a: grad_logits log pi(a)
    k1 = np.log(pi) - np.log(pi_old)
    got = _expected_gradients(logits, logits_old)
    # exact and importance-corrected k3: grad KL(pi || pi_old) = sum_a pi(a) k1(a) grad log pi(a)
    reverse = (pi * k1) @ score
    np.testing.assert_allclose(got["exact"], reverse, atol=1e-6)
    np.testing.assert_allclose(got["k3_is"], reverse, atol=1e-6)
    np.testing.assert_allclose(np.asarray(jax.grad(lambda z: discrete.kl_logits(z, logits_old))(logits)), reverse,
                               atol=1e-6)
    # k1 as a loss on pi_old's samples: -grad KL(pi_old || pi) = sum_a pi_old(a) grad log pi(a)
    np.testing.assert_allclose(got["k1_loss"], pi_old @ score, atol=1e-6)
    np.testing.assert_allclose(got["k1_loss"], -np.asarray(
        jax.grad(lambda z: discrete.kl_logits(logits_old, z))(logits)), atol=1e-6)
    np.testing.assert_allclose(got["k1_reward"], (pi_old * k1) @ score, atol=1e-6)
    np.testing.assert_allclose(got["k3_loss"], (pi_old * (1 - pi_old / pi)) @ score, atol=1e-6)
    # at pi = pi_old no penalty pushes
    for name, g in _expected_gradients(logits_old, logits_old).items():
        np.testing.assert_allclose(g, 0.0, atol=1e-7, err_msg=name)


def test_welch_and_holm():
    rng = np.random.default_rng(0)
    a, b = rng.normal(size=10), rng.normal(0.5, 2.0, size=7)
    difference, t, p = _stats.welch(a, b)
    expected = stats.ttest_ind(a, b, equal_var=False)
    assert difference == pytest.approx(a.mean() - b.mean())
    assert t == pytest.approx(expected.statistic) and p == pytest.approx(expected.pvalue)
    assert _stats.welch([-500.0] * 3, [-500.0] * 3)[2] == 1.0
    np.testing.assert_allclose(_stats.holm_adjusted([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(_stats.holm_adjusted([0.5, float("nan")]), [1.0, 1.0])


def test_small_run_wiring(tmp_path):
    metrics = ppo_kl.main(["--quick", "--num-seeds", "2", "--num-iterations", "4", "--num-envs", "2",
                           "--num-steps", "128", "--num-minibatches", "2", "--num-epochs", "2", "--beta", "1.0",
                           "--kl-target", "0.01", "--beta-sweep", "0", "--kl-target-sweep=",
                           "--out", str(tmp_path), "--no-progress"])
    arms = metrics["arms"]
    assert {"none", "clip", "exact, beta=1", "k1_reward, beta=1", "k1_loss, beta=1", "k3_loss, beta=1",
            "k3_is, beta=1", "exact, adaptive d_targ=0.01", "k3_is, adaptive d_targ=0.01",
            "exact, beta=0"} <= set(arms)
    # common random numbers: a zero penalty changes nothing, so beta = 0 is the unconstrained run
    for key in ("kl", "kl_reverse", "entropy"):
        np.testing.assert_array_equal(arms["exact, beta=0"]["per_seed"][key], arms["none"]["per_seed"][key])
    for name, r in arms.items():
        kl = np.asarray(r["per_seed"]["kl"], float)
        assert np.all(np.isfinite(kl)) and np.all(kl >= 0), name
        entropy = np.asarray(r["per_seed"]["entropy"], float)
        assert np.all((entropy >= 0) & (entropy <= np.log(3) + 1e-6)), name
        if r["penalty"] == "exact":  # the logged penalty is the exact KL(pi_new || pi_old) of the same batch
            np.testing.assert_allclose(r["per_seed"]["penalty_value"], r["per_seed"]["kl_reverse"], rtol=1e-4)
        if r["penalty"] == "none":
            assert np.all(np.asarray(r["per_seed"]["penalty_value"]) == 0)
        if not r["adaptive"]:
            assert np.all(np.asarray(r["per_seed"]["beta"]) == r["beta"]), name
        else:  # PPO's rule, Schulman et al. 2017 Section 4, on the measured KL[pi_old || pi_new]
            beta, kl_seed = np.asarray(r["per_seed"]["beta"], float), kl
            for s in range(beta.shape[0]):
                for i in range(beta.shape[1] - 1):
                    b, d = beta[s, i], kl_seed[s, i]
                    expected = b / 2 if d < 0.01 / 1.5 else b * 2 if d > 0.015 else b
                    assert beta[s, i + 1] == pytest.approx(expected, rel=1e-6), name
    assert len(metrics["comparisons"]) >= 8
    text = ppo_kl.report(metrics, "ppo_kl")
    assert "ppo_kl.png" in text and "significant" in text
    for figure in ("ppo_kl", "ppo_kl_final_return", "ppo_kl_mean_return"):
        assert (tmp_path / f"{figure}.png").is_file()
    assert "levels off" in text or "has not levelled off" in text

    # A diverged seed (full scale: k1_loss with the adaptive rule) has NaN entropy and KL, which metrics.json
    # stores as null: the report from the saved file leaves them out and says so instead of failing.
    saved = _common.load_metrics(tmp_path)
    arm = saved["arms"]["k1_loss, beta=1"]
    arm["final_entropy_per_seed"][0] = None
    arm["final_return_per_seed"] = [-500.0] * len(arm["final_return_per_seed"])
    row = next(r for r in saved["comparisons"] if r["a"] == "k1_loss, beta=1")
    row["kl_ratio"], row["kl_p"] = None, None
    text = ppo_kl.report(saved, "ppo_kl")
    assert "1 diverged (its policy's entropy is not finite)" in text
    assert "no ratio or test (a diverged seed's KL is not finite)" in text
