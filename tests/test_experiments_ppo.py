"""The PPO experiment at a small scale: CartPole's step against a NumPy transcription of Gym's equations,
and the adaptive beta history against PPO's rule."""

import math

import numpy as np
import pytest

from experiments import ppo_kl


def _gym_cartpole_step(state, action):
    """Gym's CartPole-v1 step (euler), transcribed in plain Python floats."""
    gravity, masscart, masspole, length, force_mag, tau = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
    total_mass, polemass_length = masspole + masscart, masspole * length
    x, x_dot, theta, theta_dot = state
    force = force_mag if action == 1 else -force_mag
    costheta, sintheta = math.cos(theta), math.sin(theta)
    temp = (force + polemass_length * theta_dot**2 * sintheta) / total_mass
    thetaacc = (gravity * sintheta - costheta * temp) / (
        length * (4.0 / 3.0 - masspole * costheta**2 / total_mass))
    xacc = temp - polemass_length * thetaacc * costheta / total_mass
    x, x_dot = x + tau * x_dot, x_dot + tau * xacc
    theta, theta_dot = theta + tau * theta_dot, theta_dot + tau * thetaacc
    terminated = x < -2.4 or x > 2.4 or theta < -12 * 2 * math.pi / 360 or theta > 12 * 2 * math.pi / 360
    return np.array([x, x_dot, theta, theta_dot]), terminated


def test_cartpole_matches_gym_equations():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    for _ in range(50):
        state = rng.uniform([-2.5, -2, -0.25, -2], [2.5, 2, 0.25, 2])
        action = int(rng.integers(2))
        expected, expected_done = _gym_cartpole_step(state, action)
        got, done = ppo_kl.cartpole_step(jnp.asarray(state), jnp.asarray(action))
        np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-12, atol=1e-12)
        assert bool(done) == expected_done


def test_ppo_smoke_and_adaptive_rule(tmp_path):
    metrics = ppo_kl.main(["--quick", "--num-seeds", "1", "--num-iterations", "4", "--num-envs", "4",
                           "--num-steps", "32", "--beta", "1.0", "--kl-target", "0.01", "--out", str(tmp_path),
                           "--no-progress"])
    res = metrics["variants"]
    for name, r in res.items():
        kl = np.asarray(r["per_seed"]["kl"], float)
        assert np.all(np.isfinite(kl)) and np.all(kl >= 0) and np.all(kl < 1.0), name
        returns = np.asarray(r["per_seed"]["return"], float)
        assert np.all((returns[np.isfinite(returns)] >= 1) & (returns[np.isfinite(returns)] <= 500))
    assert np.all(np.asarray(res["kl_fixed"]["per_seed"]["beta"]) == 1.0)
    beta = np.asarray(res["kl_adaptive"]["per_seed"]["beta"], float)[0]
    kl = np.asarray(res["kl_adaptive"]["per_seed"]["kl"], float)[0]
    for i in range(len(beta) - 1):  # PPO's rule, Schulman et al. 2017 Section 4
        expected = beta[i] / 2 if kl[i] < 0.01 / 1.5 else beta[i] * 2 if kl[i] > 0.015 else beta[i]
        assert beta[i + 1] == pytest.approx(expected, rel=1e-6)
    assert (tmp_path / "ppo_kl.png").is_file()
    assert "ppo_kl.png" in ppo_kl.report(metrics, "ppo_kl")
