"""The LM KL fine-tuning study at a small scale, checked against answers recomputed here.

- the frontier and the optimum pi* are recomputed by brute force in NumPy from pi_ref's enumerated
  log-probs (normalisation, J* = beta log E_ref[exp(R / beta)], the Gibbs variational inequality);
- the enumeration of a model's sequence log-probs matches its teacher-forced log-probs;
- the trained arms land below pi*'s objective, the exact-KL arm close to the frontier, GRPO's k3 farther;
- each arm's KL surrogate has, in expectation over groups of two sampled sequences (enumerated, with the
  leave-one-out baselines), exactly the gradient of the sequence KL when the arm is labelled correct.
"""

import dataclasses

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy import special

from experiments import _tiny_lm, lm_kl_finetune

SMALL = dataclasses.replace(lm_kl_finetune.Config.quick(), width=16, pretrain_steps=150, seeds=3,
                            finetune_steps=100, distill_steps=40)


@pytest.fixture(scope="module")
def study(tmp_path_factory):
    out = tmp_path_factory.mktemp("lm_kl_finetune")
    argv = ["--out", str(out), "--no-progress"]
    for field in dataclasses.fields(SMALL):
        if field.name != "seed":
            argv += ["--" + field.name.replace("_", "-"), str(getattr(SMALL, field.name))]
    return lm_kl_finetune.main(argv), out


def test_enumeration_matches_teacher_forcing():
    model = _tiny_lm.unstack(_tiny_lm.init_models([0], 4, 3, 8, 1, 2))
    sequences = _tiny_lm.all_sequences(4, 3)
    enumerated = np.asarray(eqx.filter_jit(_tiny_lm.enumerate_log_probs)(model, 4, 3), float)
    direct = eqx.filter_jit(lambda m, x: jnp.sum(jax.vmap(m.token_log_probs)(x), axis=1))(model, jnp.asarray(sequences))
    direct = np.asarray(direct, float)
    np.testing.assert_allclose(enumerated, direct, atol=2e-5)
    assert abs(special.logsumexp(enumerated)) < 1e-5


def test_optimum_and_frontier_by_brute_force():
    rng = np.random.default_rng(0)
    log_ref = rng.normal(size=50)
    log_ref -= special.logsumexp(log_ref)
    rewards = rng.uniform(size=50)
    beta = 0.3
    best = lm_kl_finetune.optimum(log_ref, rewards, beta)
    log_star = log_ref + rewards / beta - special.logsumexp(log_ref + rewards / beta)
    p_star = np.exp(log_star)
    assert best["probs_sum"][0] == pytest.approx(1.0, abs=1e-12)
    assert best["expected_reward"][0] == pytest.approx(p_star @ rewards, rel=1e-10)
    assert best["kl"][0] == pytest.approx(np.sum(p_star * (log_star - log_ref)), rel=1e-9)
    assert best["objective"][0] == pytest.approx(beta * np.log(np.exp(log_ref) @ np.exp(rewards / beta)), rel=1e-10)
    # no policy beats pi* at its beta (Gibbs): random policies all fall below
    for _ in range(20):
        log_p = rng.normal(size=50) * 2
        log_p -= special.logsumexp(log_p)
        p = np.exp(log_p)
        assert p @ rewards - beta * np.sum(p * (log_p - log_ref)) <= best["objective"][0] + 1e-12
    # a point on the frontier has zero gaps; a point below it has positive ones
    frontier = lm_kl_finetune.optimum(log_ref, rewards, np.array([0.1, 1.0]))
    gaps = lm_kl_finetune.frontier_gaps(log_ref, rewards, frontier["expected_reward"], frontier["kl"])
    np.testing.assert_allclose(gaps["reward_gap"], 0.0, atol=1e-9)
    np.testing.assert_allclose(gaps["kl_gap"], 0.0, atol=1e-7)
    below = lm_kl_finetune.frontier_gaps(log_ref, rewards, frontier["expected_reward"] - 0.05, frontier["kl"])
    assert np.all(below["reward_gap"] > 0.049) and np.all(below["kl_gap"] > 0)


def test_metrics_and_report(study):
    metrics, out = study
    assert set(metrics["arms"]) == set(lm_kl_finetune.NAMES)
    for arm in metrics["arms"].values():
        for key in lm_kl_finetune.SCORES:
            assert len(arm[key]["seeds"]) == SMALL.seeds and np.isfinite(arm[key]["mean"])
        assert arm["probability_mass"]["mean"] == pytest.approx(1.0, abs=1e-4)
    for loss in lm_kl_finetune.DISTILL_LOSSES:
        for key in ("kl_teacher_student", "kl_student_teacher", "test_nll_per_token"):
            assert metrics["distillation"][loss][key]["mean"] > 0
    for name in ("frontier", "training_curves", "distillation"):
        assert (out / f"{name}.png").is_file()
    text = lm_kl_finetune.report(metrics, "lm_kl_finetune")
    assert "![reward-KL frontier with every arm](lm_kl_finetune/frontier.png)" in text
    assert "Reading" in text and "exact_kl" in text


def test_optimum_beats_every_arm_and_exact_kl_is_near_the_frontier(study):
    metrics, _ = study
    opt, arms = metrics["optimum"], metrics["arms"]
    assert opt["probability_mass"] == pytest.approx(1.0, abs=1e-12)
    assert metrics["reference"]["probability_mass"] == pytest.approx(1.0, abs=1e-4)
    for name, arm in arms.items():
        # J* - J >= 0 for every run, up to float32 rounding of the enumerated log-probs
        assert min(arm["objective_gap"]["seeds"]) > -1e-4, name
        assert min(arm["reward_gap"]["seeds"]) > -1e-4 and min(arm["kl_gap"]["seeds"]) > -1e-3, name
    exact = arms["exact_kl"]
    assert exact["objective_gap"]["mean"] < 0.05 * opt["objective"] + 0.01
    assert abs(exact["kl"]["mean"] - opt["kl"]) < 0.3 * opt["kl"]
    # without a KL the policy runs off to a far larger KL and a worse objective at beta
    assert arms["none"]["kl"]["mean"] > 3 * opt["kl"]
    assert arms["none"]["objective_gap"]["mean"] > 10 * exact["objective_gap"]["mean"]
    # GRPO's per-token k3 follows another gradient: more KL than the optimum, a larger gap than exact
    assert arms["k3_loss_token"]["kl"]["mean"] > opt["kl"]
    assert arms["k3_loss_token"]["objective_gap"]["mean"] > exact["objective_gap"]["mean"]


def test_correct_arms_have_the_sequence_kl_gradient():
    """Expected gradient of each arm's KL surrogate, exact over every group of two sequences (with the
    leave-one-out baselines), against the gradient of the enumerated sequence KL(pi || pi_ref)."""
    vocab_size, length = 3, 3
    models = jax.tree.map(lambda x: x.astype(jnp.float64) if isinstance(x, jax.Array) else x,
                          _tiny_lm.init_models([0, 1], vocab_size, length, 8, 1, 2))
    model, reference = _tiny_lm.unstack(models, 0), _tiny_lm.unstack(models, 1)
    sequences = jnp.asarray(_tiny_lm.all_sequences(vocab_size, length))
    n = sequences.shape[0]
    first, second = np.divmod(np.arange(n * n), n)
    groups = jnp.stack([sequences[first], sequences[second]], axis=1)  # (n * n, 2, L)
    params, static = eqx.partition(model, eqx.is_array)

    def sequence_kl(p):
        log_p = _tiny_lm.enumerate_log_probs(eqx.combine(p, static), vocab_size, length)
        log_ref = _tiny_lm.enumerate_log_probs(reference, vocab_size, length)
        return jnp.sum(jnp.exp(log_p) * (log_p - log_ref))

    @eqx.filter_jit
    def gradients(p):
        probs = jnp.exp(_tiny_lm.enumerate_log_probs(eqx.combine(p, static), vocab_size, length))
        weights = probs[first] * probs[second]

        def per_group(tokens):
            return jax.jacrev(lambda q: jnp.mean(lm_kl_finetune.kl_surrogates(eqx.combine(q, static), reference,
                                                                               tokens)[0], axis=1))(p)

        jacobians = jax.vmap(per_group)(groups)  # leaves (groups, arms, ...)
        expected = jax.tree.map(lambda j: jnp.tensordot(weights, j, axes=1), jacobians)
        return expected, jax.grad(sequence_kl)(p)

    expected, truth = gradients(params)
    truth = np.concatenate([np.ravel(leaf) for leaf in jax.tree.leaves(truth)])
    for k, name in enumerate(lm_kl_finetune.PENALISED):
        arm = np.concatenate([np.ravel(leaf[k]) for leaf in jax.tree.leaves(expected)])
        relative = np.linalg.norm(arm - truth) / np.linalg.norm(truth)
        if lm_kl_finetune.ARMS[name][0] == "correct":
            assert relative < 1e-9, (name, relative)  # float64 round-off, ~1e-15
        else:
            assert relative > 0.01, (name, relative)  # 0.72 (k3_loss_token), 0.053 (straight_through)
