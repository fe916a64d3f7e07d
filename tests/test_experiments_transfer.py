"""Tests of the fine-tuning and distillation experiments and of their shared helpers.

Each study runs once at a small scale through its ``main`` (flags generated from its ``Config``); the
checks are results that must hold if the study is wired correctly, plus independent truths for the pieces:
the Fisher against its closed form for softmax regression and against the KL's curvature, the mixed
distillation loss against a NumPy computation, ECE by hand, and the Reading text against planted numbers.
"""

from __future__ import annotations

import copy
import json

import jax
import jax.flatten_util
import jax.numpy as jnp
import numpy as np
import pytest

from experiments import _data, _models, _stats, distill_kl, finetune_kl
from kljax import discrete


def _check_written(out_dir, metrics, module, figure):
    assert json.loads((out_dir / "metrics.json").read_text()).keys() == metrics.keys()
    assert (out_dir / f"{figure}.png").stat().st_size > 1000
    text = module.report(metrics, out_dir.name)
    assert f"({out_dir.name}/{figure}.png)" in text and "|" in text and "**Reading**" in text
    return text


@pytest.fixture(scope="module")
def finetune_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ft") / "finetune_kl"
    metrics = finetune_kl.main(["--out", str(out), "--kl-full-betas", "30", "--lwf-betas", "30",
                                "--ewc-betas", "10000", "--l2-betas", "1", "--seeds", "2", "--steps", "150",
                                "--no-progress"])
    return out, metrics


def test_finetune_methods_do_what_they_penalise(finetune_run):
    out, metrics = finetune_run
    _check_written(out, metrics, finetune_kl, "tradeoff")
    assert metrics["config"]["seeds"] == 2 and tuple(metrics["config"]["lwf_betas"]) == (30.0,)
    assert metrics["base"]["old_task_accuracy"] > 0.95
    rows = {r["method"]: r for r in metrics["sweep"]}
    assert list(rows) == ["none", "kl_full", "lwf", "ewc", "l2"]
    none, full, lwf, ewc = rows["none"], rows["kl_full"], rows["lwf"], rows["ewc"]
    assert {"beta", "old_task_accuracy", "new_task_accuracy", "method"} <= none.keys()
    assert len(none["old_task_accuracy_seeds"]) == 2 and none["old_task_accuracy_ci95"] > 0
    # plain fine-tuning learns the new task and, class-incrementally, labels old images as new classes
    assert none["new_task_accuracy"] > 0.8 and none["old_images_labelled_new"] > 0.2
    # the full KL on new inputs forbids the new classes: the new task is not learnt
    assert full["new_task_accuracy"] < 0.2 and full["old_task_accuracy"] > none["old_task_accuracy"] + 0.2
    # LwF learns the new task and keeps the old classes' relative outputs (its own quantity, on old images)
    assert lwf["new_task_accuracy"] > 0.8
    assert lwf["kl_within_old_classes_on_old_inputs"] < 0.5 * none["kl_within_old_classes_on_old_inputs"]
    assert lwf["old_task_accuracy_within_old_classes"] >= none["old_task_accuracy_within_old_classes"] - 0.01
    # EWC (the quadratic approximation of the KL on old inputs) keeps that KL lower and the old task better
    assert ewc["kl_to_base_on_old_inputs"] < 0.5 * none["kl_to_base_on_old_inputs"]
    assert ewc["old_task_accuracy"] > none["old_task_accuracy"] + 0.1


def test_finetune_reading_follows_the_numbers(finetune_run):
    _, metrics = finetune_run
    planted = copy.deepcopy(metrics)
    none, lwf = planted["sweep"][0], planted["sweep"][2]
    for key in ("old_task_accuracy", "new_task_accuracy"):
        lwf[key + "_seeds"] = [v + d for v, d in zip(none[key + "_seeds"], (0.01, -0.01))]
    (line,) = [t for t in finetune_kl.reading(planted) if t.startswith("LwF") and "best balance" in t]
    assert "difference not significant" in line and "higher old-task" not in line
    lwf["old_task_accuracy_seeds"] = [0.99, 0.98]
    none["old_task_accuracy_seeds"] = [0.30, 0.31]
    (line,) = [t for t in finetune_kl.reading(planted) if t.startswith("LwF") and "best balance" in t]
    assert "has higher old-task accuracy than no penalty" in line


def test_diagonal_fisher_closed_form_and_kl_curvature():
    # softmax regression z = W x + b: d log p_y / d W_kj = x_j (1[y = k] - p_k), so
    # F_W[k, j] = mean_x x_j^2 p_k (1 - p_k) and F_b[k] = mean_x p_k (1 - p_k)
    key_w, key_x = jax.random.split(jax.random.key(3))
    params = {"w": jax.random.normal(key_w, (4, 3), jnp.float64), "b": jnp.array([0.3, -0.2, 0.0, 1.0])}
    x = jax.random.normal(key_x, (7, 3), jnp.float64)

    def logits_fn(p, inputs):
        return inputs @ p["w"].T + p["b"][None, :]

    fisher = jax.jit(finetune_kl.diagonal_fisher, static_argnums=0)(logits_fn, params, x)
    probs = np.asarray(jax.nn.softmax(logits_fn(params, x), axis=-1))
    xs = np.asarray(x)
    np.testing.assert_allclose(fisher["w"], np.einsum("nk,nj->kj", probs * (1 - probs), xs**2) / 7, rtol=1e-10)
    np.testing.assert_allclose(fisher["b"], np.mean(probs * (1 - probs), axis=0), rtol=1e-10)

    # on an equinox MLP: mean KL(p_base || p_theta) = 1/2 F_i eps^2 + O(eps^3) along one coordinate
    mlp_params, static = _models.init_mlps([1], 0, 6, 1)
    mlp_params = jax.tree.map(lambda leaf: leaf[0].astype(jnp.float64), mlp_params)
    inputs = jax.random.uniform(jax.random.key(2), (9, 64), jnp.float64)

    def mlp_logits(p, z):
        return _models.apply(p, static, z)

    @jax.jit
    def fisher_and_kls(p, eps):
        """Per leaf: its largest Fisher entry, and the KL after moving that coordinate by eps."""
        fisher = finetune_kl.diagonal_fisher(mlp_logits, p, inputs)
        flat, unravel = jax.flatten_util.ravel_pytree(p)
        flat_fisher, _ = jax.flatten_util.ravel_pytree(fisher)
        sizes = np.cumsum([0] + [leaf.size for leaf in jax.tree.leaves(p)])
        picks = jnp.stack([start + jnp.argmax(flat_fisher[start:stop]) for start, stop in zip(sizes[:-1], sizes[1:])])
        moved = flat[None, :] + eps * jax.nn.one_hot(picks, flat.size, dtype=flat.dtype)
        base = mlp_logits(p, inputs)
        kls = jax.vmap(lambda q: jnp.mean(discrete.kl_logits(base, mlp_logits(unravel(q), inputs))))(moved)
        return flat_fisher[picks], kls

    eps = 1e-3
    fisher_max, kls = fisher_and_kls(mlp_params, eps)
    assert kls.shape == (4,) and np.all(np.asarray(fisher_max) > 0)
    np.testing.assert_allclose(kls, 0.5 * np.asarray(fisher_max) * eps**2, rtol=1e-2)


def test_parts_have_seed_independent_shapes_and_are_disjoint():
    a, b = _data.digits_parts(0, (0.4, 0.3, 0.3)), _data.digits_parts(1, (0.4, 0.3, 0.3))
    assert [part[0].shape for part in a] == [part[0].shape for part in b]
    assert sum(part[0].shape[0] for part in a) == 1797
    assert [np.bincount(part[1]).tolist() for part in a] == [np.bincount(part[1]).tolist() for part in b]
    rows = [{row.tobytes() for row in part[0]} for part in a]
    # the digits contain a few duplicate images; parts share at most those
    assert len(rows[0] & rows[1]) + len(rows[1] & rows[2]) + len(rows[0] & rows[2]) < 5


@pytest.fixture(scope="module")
def distill_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("dk") / "distill_kl"
    metrics = distill_kl.main(["--out", str(out), "--student-widths", "8", "--temperatures", "1,4", "--seeds", "2",
                               "--steps", "200", "--teacher-width", "64", "--teacher-steps", "200",
                               "--no-progress"])
    return out, metrics


def test_distill_kl_held_out_transfer_set(distill_run):
    out, metrics = distill_run
    text = _check_written(out, metrics, distill_kl, "distillation")
    teacher = metrics["teacher"]
    assert teacher["accuracy"]["mean"] > 0.9 and len(teacher["accuracy"]["seeds"]) == 2
    # the teacher memorises its own images but not the transfer set it never saw
    assert teacher["mean_max_probability_on_own_training_set"]["mean"] > 0.98
    assert (teacher["mean_max_probability_on_transfer_set"]["mean"]
            < teacher["mean_max_probability_on_own_training_set"]["mean"] - 0.005)
    assert "mean max-probability there is" in text
    rows = {(r["loss"], r["temperature"]): r for r in metrics["results"]}
    assert rows.keys() == {("labels", 1.0), ("forward", 1.0), ("forward", 4.0), ("mixed", 1.0), ("mixed", 4.0),
                           ("reverse", 1.0), ("reverse", 4.0)}
    for row in rows.values():
        assert 0.0 <= row["ece"] <= 1.0 and row["forward_kl"] >= 0 and row["reverse_kl"] >= 0
        assert row["student_accuracy"] > 0.5 and len(row["student_accuracy_seeds"]) == 2
    # training on the forward KL reaches a lower forward KL (test inputs, T = 1) than training on the reverse
    assert rows[("forward", 1.0)]["forward_kl"] < rows[("reverse", 1.0)]["forward_kl"]


def test_distill_reading_says_not_significant_for_equal_seeds(distill_run):
    _, metrics = distill_run
    planted = copy.deepcopy(metrics)
    rows = {(r["loss"], r["temperature"]): r for r in planted["results"]}
    labels = rows[("labels", 1.0)]["student_accuracy_seeds"]
    for key, row in rows.items():
        if key != ("labels", 1.0):
            row["student_accuracy_seeds"] = [v - 0.001 * (i + 1) for i, v in enumerate(labels)]
    lines = distill_kl.reading(planted)
    assert "forward KL(t||s) at its best T" in lines[1] or "Forward KL(t||s) at its best T" in lines[1]
    assert "test accuracy" in lines[1] and "difference not significant" in lines[1]


def test_distillation_loss_against_numpy():
    rng = np.random.default_rng(0)
    student, teacher = rng.normal(size=(5, 4)), rng.normal(size=(5, 4)) * 3
    labels = rng.integers(0, 4, size=5)

    def log_softmax(z):
        z = z - z.max(-1, keepdims=True)
        return z - np.log(np.exp(z).sum(-1, keepdims=True))

    def kl(a, b):
        return np.mean(np.sum(np.exp(log_softmax(a)) * (log_softmax(a) - log_softmax(b)), -1))

    ce = -np.mean(log_softmax(student)[np.arange(5), labels])
    temperature, alpha = 2.5, 0.3
    loss = jax.jit(lambda reverse: distill_kl.distillation_loss(
        jnp.asarray(student), jnp.asarray(teacher), jnp.asarray(labels), alpha=alpha, temperature=temperature,
        reverse=reverse))
    for reverse, divergence in ((0.0, kl(teacher / temperature, student / temperature)),
                                (1.0, kl(student / temperature, teacher / temperature))):
        value = loss(reverse)
        assert float(value) == pytest.approx(alpha * ce + (1 - alpha) * temperature**2 * divergence, rel=1e-10)


def test_expected_calibration_error_against_hand_computation():
    logits = np.log(np.array([[0.9, 0.1], [0.6, 0.4], [0.3, 0.7], [0.2, 0.8]]))
    labels = np.array([0, 1, 1, 1])  # correct: yes, no, yes, yes; confidences 0.9, 0.6, 0.7, 0.8
    # 4 bins: {0.6 wrong, 0.7 right} in [0.5, 0.75): |0.5 - 0.65|; {0.9, 0.8} in [0.75, 1]: |1 - 0.85|
    assert distill_kl.expected_calibration_error(logits, labels, num_bins=4) == pytest.approx(0.5 * 0.15 + 0.5 * 0.15)
    # 1 bin: |mean accuracy - mean confidence| = |0.75 - 0.75|
    assert distill_kl.expected_calibration_error(logits, labels, num_bins=1) == pytest.approx(0.0, abs=1e-12)


def test_welch_and_interval_against_scipy_by_hand():
    a, b = [0.90, 0.92, 0.95, 0.91, 0.93], [0.80, 0.85, 0.83, 0.90, 0.82]
    mean, half = _stats.interval(a)
    # t_{4, 0.975} = 2.7764451
    assert mean == pytest.approx(0.922) and half == pytest.approx(2.7764451 * np.std(a, ddof=1) / np.sqrt(5))
    va, vb = np.var(a, ddof=1) / 5, np.var(b, ddof=1) / 5
    t = (np.mean(a) - np.mean(b)) / np.sqrt(va + vb)
    dof = (va + vb) ** 2 / (va**2 / 4 + vb**2 / 4)
    import scipy.stats

    assert _stats.welch_p(a, b) == pytest.approx(2 * scipy.stats.t.sf(abs(t), dof), rel=1e-9)
    assert "not significant" in _stats.compare(a, a[::-1], "x", "y", "accuracy")
    # Holm: sorted p against 0.05 / (m - rank), stopping at the first failure
    assert _stats.holm([0.01, 0.04, 0.03, float("nan")]) == [True, False, False, False]
    assert _stats.holm([0.03, 0.01, 0.02]) == [True, True, True]
    assert "has higher accuracy" in _stats.compare(a, b, "x", "y", "accuracy")


def test_shared_statistics_against_scipy():
    rng = np.random.default_rng(3)
    a, b = rng.normal(size=8), rng.normal(0.4, 1.5, size=8)
    import scipy.stats

    assert _stats.paired_p(a, b) == pytest.approx(scipy.stats.ttest_rel(a, b).pvalue, rel=1e-9)
    assert _stats.one_sample_p(a, 0.3) == pytest.approx(scipy.stats.ttest_1samp(a, 0.3).pvalue, rel=1e-9)
    assert _stats.one_sided_paired_p(a, b) == pytest.approx(
        scipy.stats.ttest_rel(a, b, alternative="greater").pvalue, rel=1e-9)
    # Holm's adjusted p-values: (m - rank) p, made monotone, capped at 1; NaN counts as 1
    np.testing.assert_allclose(_stats.holm_adjusted([0.01, 0.04, 0.03]), [0.03, 0.06, 0.06])
    np.testing.assert_allclose(_stats.holm_adjusted([0.5, float("nan")]), [1.0, 1.0])
    # samples without spread: defined answers instead of NaN
    assert _stats.welch([-500.0] * 3, [-500.0] * 3)[2] == 1.0 and _stats.welch([1.0] * 3, [2.0] * 3)[2] == 0.0
    assert _stats.paired_p([1.0, 2.0], [1.0, 2.0]) == 1.0 and _stats.one_sample_p([2.0, 2.0], 2.0) == 1.0
    assert "paired t-test" in _stats.compare(a, b, "x", "y", "score", paired=True)


def test_shared_training_loop_matches_a_hand_written_adam_loop():
    import jax
    import jax.numpy as jnp
    import optax

    from experiments import _train

    target = jnp.array([1.0, -2.0, 0.5])
    loss = lambda p, k: jnp.sum((p - target - 0.1 * jax.random.normal(k, p.shape)) ** 2)
    optimizer = optax.adam(optax.cosine_decay_schedule(0.1, 10, 0.01))
    start, key = jnp.zeros(3), jax.random.key(0)
    params, state, by_hand = start, optimizer.init(start), []
    for k in jax.random.split(key, 10):
        grads = jax.grad(loss)(params, k)
        updates, state = optimizer.update(grads, state, params)
        params = optax.apply_updates(params, updates)
        by_hand.append(params)
    final, path = _train.fit_in_chunks(start, loss, optimizer, key, 10, trace="params", desc="test")
    np.testing.assert_allclose(path, np.stack(by_hand), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_train.fit(start, loss, optimizer=optimizer, xs=jax.random.split(key, 10)), final,
                               rtol=1e-5, atol=1e-6)
    assert _train.chunk_size(1000) == 250 and _train.chunk_size(600) == 200


def test_models_hold_the_given_weights():
    import jax.numpy as jnp

    rng = np.random.default_rng(0)
    layers = [(rng.normal(size=(5, 3)), rng.normal(size=5)), (rng.normal(size=(2, 5)), rng.normal(size=2))]
    params, static = _models.from_layers(layers, jnp.tanh)
    x = rng.normal(size=(4, 3))
    expected = np.tanh(x @ layers[0][0].T + layers[0][1]) @ layers[1][0].T + layers[1][1]
    np.testing.assert_allclose(_models.apply(params, static, jnp.asarray(x)), expected, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_models.network(params, jnp.tanh)(jnp.asarray(x[0])), expected[0], rtol=1e-5, atol=1e-6)
    with pytest.raises(ValueError, match="one width"):
        _models.from_layers([(np.ones((5, 3)), np.ones(5)), (np.ones((4, 5)), np.ones(4)),
                             (np.ones((2, 4)), np.ones(2))])
