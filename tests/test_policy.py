"""kljax.policy: the expected gradient of every KL placement, proven by exact enumeration.

For a softmax policy over K actions the expectation over a ~ pi of any per-action surrogate's gradient is
the finite sum ``sum_a pi(a) grad surrogate(a)``; it is compared with the closed-form gradients
d KL(pi || q) / d logits = pi * (log(pi / q) - KL(pi || q))   and   d KL(q || pi) / d logits = pi - q.
For sequences, an autoregressive tabular policy is enumerated over all V**T sequences.
"""

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from kljax import policy

K = 4


def _case(seed, k=K):
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=k) * 1.5
    ref = rng.dirichlet(np.ones(k))
    return jnp.asarray(logits), jnp.log(jnp.asarray(ref))


def _softmax(logits):
    e = np.exp(logits - np.max(logits))
    return e / e.sum()


def _grad_reverse_kl(logits, log_ref):
    """Closed form d KL(softmax(logits) || ref) / d logits, in NumPy."""
    p = _softmax(np.asarray(logits))
    log_ratio = np.log(p) - np.asarray(log_ref)
    return p * (log_ratio - np.sum(p * log_ratio))


def _grad_forward_kl(logits, log_ref):
    """Closed form d KL(ref || softmax(logits)) / d logits = pi - ref."""
    return _softmax(np.asarray(logits)) - np.exp(np.asarray(log_ref))


def _expected_grad(surrogate, logits, log_ref, sampling_logits=None):
    """sum_a mu(a) grad_logits surrogate(log pi(a), log pi_ref(a)), mu = pi unless sampling_logits given."""
    def per_action(lg, a):
        return surrogate(jax.nn.log_softmax(lg)[a], log_ref[a])

    grads = jnp.stack([jax.grad(per_action)(logits, a) for a in range(logits.shape[0])])
    mu = jax.nn.softmax(logits if sampling_logits is None else sampling_logits)
    return np.asarray(mu @ grads)


def _expected_value(surrogate, logits, log_ref):
    values = surrogate(jax.nn.log_softmax(logits), log_ref)
    return float(jax.nn.softmax(logits) @ values)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_expected_gradients_by_enumeration(seed):
    logits, log_ref = _case(seed)
    reverse = _grad_reverse_kl(logits, log_ref)
    forward = _grad_forward_kl(logits, log_ref)
    assert np.linalg.norm(reverse - forward) > 1e-2  # the two KLs really differ here

    np.testing.assert_allclose(_expected_grad(policy.k1_reward, logits, log_ref), reverse, atol=1e-12)
    np.testing.assert_allclose(_expected_grad(policy.k1_loss, logits, log_ref), 0.0, atol=1e-12)
    np.testing.assert_allclose(_expected_grad(policy.k2_loss, logits, log_ref), reverse, atol=1e-12)
    np.testing.assert_allclose(_expected_grad(policy.k3_loss, logits, log_ref), forward, atol=1e-12)
    np.testing.assert_allclose(_expected_grad(policy.k3_loss_is, logits, log_ref), reverse, atol=1e-12)
    np.testing.assert_allclose(jax.grad(policy.exact_kl)(logits, log_ref), reverse, atol=1e-12)


def test_k1_reward_baseline_changes_nothing_in_expectation():
    logits, log_ref = _case(3)

    def with_baseline(lp, lr):
        return policy.k1_reward(lp, lr, baseline=0.7)

    np.testing.assert_allclose(_expected_grad(with_baseline, logits, log_ref),
                               _grad_reverse_kl(logits, log_ref), atol=1e-12)
    # ... while each per-action gradient moves by -baseline * grad log pi(a), and the value stays k1
    g0 = jax.grad(lambda lg: policy.k1_reward(jax.nn.log_softmax(lg)[0], log_ref[0]))(logits)
    g1 = jax.grad(lambda lg: with_baseline(jax.nn.log_softmax(lg)[0], log_ref[0]))(logits)
    score = jax.grad(lambda lg: jax.nn.log_softmax(lg)[0])(logits)
    np.testing.assert_allclose(g1 - g0, -0.7 * score, atol=1e-12)
    log_p = jax.nn.log_softmax(logits)
    np.testing.assert_allclose(with_baseline(log_p, log_ref), log_p - log_ref, atol=1e-12)


def test_correct_placements_share_the_per_sample_gradient_on_policy():
    # grad[(pi / sg pi) k3] = (k3 + 1 - rho) grad log pi = k1 grad log pi = grad k2 = grad k1_reward
    logits, log_ref = _case(6)
    for a in range(K):
        grads = [jax.grad(lambda lg: s(jax.nn.log_softmax(lg)[a], log_ref[a]))(logits)
                 for s in (policy.k1_reward, policy.k2_loss, policy.k3_loss_is)]
        np.testing.assert_allclose(grads[1], grads[0], atol=1e-12)
        np.testing.assert_allclose(grads[2], grads[0], atol=1e-12)


def test_k3_loss_is_off_policy_with_behaviour_log_probs():
    # Actions from pi_old != pi: E_{pi_old}[grad (pi / pi_old) k3] = grad KL(pi || pi_ref).
    logits, log_ref = _case(4)
    old_logits = logits + jnp.asarray(np.random.default_rng(5).normal(size=K))
    log_old = jax.nn.log_softmax(old_logits)

    def per_action(lg, a):
        return policy.k3_loss_is(jax.nn.log_softmax(lg)[a], log_ref[a], log_old[a])

    grads = jnp.stack([jax.grad(per_action)(logits, a) for a in range(K)])
    np.testing.assert_allclose(jax.nn.softmax(old_logits) @ grads, _grad_reverse_kl(logits, log_ref),
                               atol=1e-12)
    # and without the correction (on-policy weight) the same off-policy samples are biased
    biased = _expected_grad(policy.k3_loss_is, logits, log_ref, sampling_logits=old_logits)
    assert np.linalg.norm(biased - _grad_reverse_kl(logits, log_ref)) > 1e-2


@pytest.mark.parametrize("seed", [0, 1])
def test_values_in_expectation(seed):
    logits, log_ref = _case(seed)
    p = _softmax(np.asarray(logits))
    q = np.exp(np.asarray(log_ref))
    kl = float(np.sum(p * np.log(p / q)))
    for surrogate in (policy.k1_reward, policy.k1_loss, policy.k3_loss, policy.k3_loss_is):
        assert _expected_value(surrogate, logits, log_ref) == pytest.approx(kl, rel=1e-12)
    assert float(policy.exact_kl(logits, log_ref)) == pytest.approx(kl, rel=1e-12)
    # k2 is biased but non-negative and equals half the second moment of the log-ratio
    second_moment = float(np.sum(p * np.log(p / q) ** 2))
    assert _expected_value(policy.k2_loss, logits, log_ref) == pytest.approx(second_moment / 2, rel=1e-12)
    assert np.all(np.asarray(policy.k3_loss(jax.nn.log_softmax(logits), log_ref)) >= 0)


def test_exact_kl_zero_safe_and_infinite():
    log_p = jnp.log(jnp.array([0.5, 0.5, 0.0]))
    log_q = jnp.log(jnp.array([0.25, 0.25, 0.5]))
    value, grad = jax.value_and_grad(policy.exact_kl)(log_p, log_q)
    assert float(value) == pytest.approx(np.log(2.0), rel=1e-12)
    assert np.all(np.isfinite(np.asarray(grad)))
    assert float(policy.exact_kl(log_q, log_p)) == np.inf
    # batched over leading axes, custom axis
    batch = jnp.stack([log_p, log_q])
    np.testing.assert_allclose(policy.exact_kl(batch.T, batch[::-1].T, axis=0),
                               [np.log(2.0), np.inf])


@pytest.mark.parametrize("surrogate", [policy.k1_reward, policy.k1_loss, policy.k2_loss, policy.k3_loss,
                                       policy.k3_loss_is])
def test_dtype_jit_vmap_and_errors(surrogate):
    lp = jnp.log(jnp.array([0.5, 0.1, 0.3], dtype=jnp.float32))
    lr = jnp.log(jnp.array([0.2, 0.3, 0.4], dtype=jnp.float32))
    out = jax.jit(surrogate)(lp, lr)
    assert out.dtype == jnp.float32 and out.shape == (3,)
    np.testing.assert_allclose(jax.vmap(surrogate)(lp, lr), surrogate(lp, lr), rtol=1e-6)
    assert jax.grad(lambda x: jnp.sum(surrogate(x, lr)))(lp).dtype == jnp.float32
    with pytest.raises(ValueError, match="log_prob_ref"):
        surrogate(lp, lr[:2])
    with pytest.raises(TypeError, match="log_prob"):
        surrogate(jnp.array([1, 2, 3]), lr)


def test_k3_precision_near_reference():
    lp = jnp.float32(-1.0)
    value = policy.k3_loss(lp, lp + jnp.float32(1e-4))
    assert float(value) == pytest.approx(0.5e-8, rel=1e-2)  # k3 ~ d^2 / 2, no cancellation


# --- sequences: autoregressive tabular policy, V tokens, length T, enumerated exactly -------------

V, T = 2, 3


def _prefix_index(tokens):
    """Row of the logits table for each position: prefixes of length t are numbered after shorter ones."""
    index, code, offset = [], 0, 0
    for t in range(T):
        index.append(offset + code)
        code = code * V + tokens[t]
        offset += V ** t
    return jnp.stack(index)


SEQUENCES = jnp.asarray(list(itertools.product(range(V), repeat=T)))
NUM_PREFIXES = sum(V ** t for t in range(T))


def _seq_log_prob(table, tokens):
    logits = table[_prefix_index(tokens)]
    return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, None], axis=-1)[:, 0]


def _sequence_kl(table, table_ref):
    log_p = jax.vmap(lambda x: jnp.sum(_seq_log_prob(table, x)))(SEQUENCES)
    log_q = jax.vmap(lambda x: jnp.sum(_seq_log_prob(table_ref, x)))(SEQUENCES)
    return jnp.sum(jnp.exp(log_p) * (log_p - log_q))


def _expected_sequence_grad(per_sequence, table):
    """sum_x pi(x) grad per_sequence(table, x) over all V**T sequences."""
    @jax.jit
    def expectation(table):
        log_p = jax.vmap(lambda x: jnp.sum(_seq_log_prob(table, x)))(SEQUENCES)
        values, grads = jax.vmap(jax.value_and_grad(per_sequence), in_axes=(None, 0))(table, SEQUENCES)
        weights = jnp.exp(log_p)
        return jnp.tensordot(weights, grads, axes=1), weights @ values

    grad, value = expectation(table)
    return np.asarray(grad), float(value)


@pytest.fixture(scope="module")
def tables():
    rng = np.random.default_rng(7)
    return (jnp.asarray(rng.normal(size=(NUM_PREFIXES, V)) * 1.5),
            jnp.asarray(rng.normal(size=(NUM_PREFIXES, V))))


def test_sequence_surrogates_give_the_sequence_kl_gradient(tables):
    table, table_ref = tables
    true_kl, true_grad = jax.value_and_grad(_sequence_kl)(table, table_ref)

    def k1_to_go(tb, x):
        return policy.sequence_k1_reward(_seq_log_prob(tb, x), _seq_log_prob(table_ref, x))

    def rao_blackwell(tb, x):
        idx = _prefix_index(x)
        return policy.sequence_exact_kl(tb[idx], table_ref[idx], x)

    def sequence_level_k2(tb, x):  # k2 of the summed log-ratio is correct at the sequence level
        return policy.k2_loss(jnp.sum(_seq_log_prob(tb, x)), jnp.sum(_seq_log_prob(table_ref, x)))

    for surrogate in (k1_to_go, rao_blackwell):
        grad, value = _expected_sequence_grad(surrogate, table)
        np.testing.assert_allclose(grad, true_grad, atol=1e-12)
        assert value == pytest.approx(float(true_kl), rel=1e-12)
    np.testing.assert_allclose(_expected_sequence_grad(sequence_level_k2, table)[0], true_grad, atol=1e-12)


def test_per_token_penalties_give_a_partial_gradient(tables):
    # Summing per-token k2 losses, or per-token exact KLs, ignores that the prefixes are sampled from pi:
    # both have the same expectation sum_t E[grad KL_t | prefix], which is not grad KL.
    table, table_ref = tables
    true_grad = np.asarray(jax.grad(_sequence_kl)(table, table_ref))

    def token_k2(tb, x):
        return jnp.sum(policy.k2_loss(_seq_log_prob(tb, x), _seq_log_prob(table_ref, x)))

    def token_exact(tb, x):
        idx = _prefix_index(x)
        return jnp.sum(policy.exact_kl(tb[idx], table_ref[idx]))

    partial_k2, _ = _expected_sequence_grad(token_k2, table)
    partial_exact, _ = _expected_sequence_grad(token_exact, table)
    np.testing.assert_allclose(partial_k2, partial_exact, atol=1e-12)
    assert np.linalg.norm(partial_k2 - true_grad) > 0.05 * np.linalg.norm(true_grad)
    # the last position's conditionals have no future, so their partial gradient is already exact
    last = slice(NUM_PREFIXES - V ** (T - 1), NUM_PREFIXES)
    np.testing.assert_allclose(partial_k2[last], true_grad[last], atol=1e-12)


def test_sequence_exact_kl_shape_errors():
    logits = jnp.zeros((3, 2))
    with pytest.raises(ValueError, match="tokens"):
        policy.sequence_exact_kl(logits, logits, jnp.array([0, 1]))
    with pytest.raises(TypeError, match="tokens"):
        policy.sequence_exact_kl(logits, logits, jnp.zeros(3))
    batched = policy.sequence_exact_kl(jnp.zeros((5, 3, 2)), jnp.ones((5, 3, 2)), jnp.zeros((5, 3), int))
    assert batched.shape == (5,)


# --- controllers ----------------------------------------------------------------------------------


def test_adaptive_kl_coefficient_rule():
    kls = jnp.array([0.001, 0.0066, 0.0067, 0.01, 0.015, 0.0151, 0.1])
    expected = [0.5, 0.5, 1.0, 1.0, 1.0, 2.0, 2.0]  # band (0.01 / 1.5, 0.01 * 1.5)
    np.testing.assert_allclose(policy.adaptive_kl_coefficient(1.0, kls, 0.01), expected)
    jitted = jax.jit(policy.adaptive_kl_coefficient)
    np.testing.assert_allclose(jax.vmap(jitted, in_axes=(None, 0, None))(1.0, kls, 0.01), expected)
    assert np.isnan(float(jitted(1.0, jnp.nan, 0.01)))
    out = policy.adaptive_kl_coefficient(jnp.float32(1.0), jnp.float32(0.1), 0.01)
    assert out.dtype == jnp.float32
    with pytest.raises(ValueError, match="beta"):
        policy.adaptive_kl_coefficient(0.0, 0.01, 0.01)
    with pytest.raises(ValueError, match="target"):
        policy.adaptive_kl_coefficient(1.0, 0.01, -1.0)


def test_proportional_kl_coefficient_matches_reference_formula():
    def reference(beta, kl, target, n_steps, horizon):  # lm-human-preferences / TRL AdaptiveKLController
        return beta * (1 + np.clip(kl / target - 1, -0.2, 0.2) * n_steps / horizon)

    rng = np.random.default_rng(0)
    for _ in range(20):
        beta, kl, target = rng.uniform(0.01, 1.0), rng.uniform(0.0, 20.0), rng.uniform(1.0, 10.0)
        n, horizon = int(rng.integers(1, 512)), float(rng.uniform(100, 10_000))
        got = policy.proportional_kl_coefficient(beta, kl, target, n, horizon)
        assert float(got) == pytest.approx(reference(beta, kl, target, n, horizon), rel=1e-12)
    # controller drives beta towards the target: up above it, down below it, clipped at 20%
    assert float(policy.proportional_kl_coefficient(1.0, 100.0, 1.0, 1, 1)) == pytest.approx(1.2)
    assert float(policy.proportional_kl_coefficient(1.0, 0.0, 1.0, 1, 1)) == pytest.approx(0.8)
    assert float(policy.proportional_kl_coefficient(1.0, 1.05, 1.0, 1, 1)) == pytest.approx(1.05)

    def run(kl_sequence):
        def step(beta, kl):
            return policy.proportional_kl_coefficient(beta, kl, 1.0, 10, 100), None
        return jax.lax.scan(step, jnp.float32(0.5), kl_sequence)[0]

    final = jax.jit(run)(jnp.full(50, 3.0, dtype=jnp.float32))
    assert final.dtype == jnp.float32
    assert float(final) == pytest.approx(0.5 * 1.02 ** 50, rel=1e-5)
    assert np.isnan(float(jax.jit(policy.proportional_kl_coefficient)(1.0, jnp.nan, 1.0, 1, 1)))
    with pytest.raises(ValueError, match="horizon"):
        policy.proportional_kl_coefficient(1.0, 1.0, 1.0, 1, 0)


@pytest.mark.parametrize("controller, arguments, name, bad", [
    ("adaptive", dict(beta=1.0, kl=0.01, target=0.01), "target", -1.0),
    ("adaptive", dict(beta=1.0, kl=0.01, target=0.01), "target", 0.0),
    ("adaptive", dict(beta=1.0, kl=0.01, target=0.01), "beta", -0.5),
    ("adaptive", dict(beta=1.0, kl=0.01, target=0.01), "tolerance", 0.5),  # an inverted band
    ("adaptive", dict(beta=1.0, kl=0.01, target=0.01), "factor", 0.5),  # beta moves the wrong way
    ("proportional", dict(beta=1.0, kl=2.0, target=1.0, num_steps=1, horizon=10), "target", 0.0),
    ("proportional", dict(beta=1.0, kl=2.0, target=1.0, num_steps=1, horizon=10), "target", -1.0),
    ("proportional", dict(beta=1.0, kl=2.0, target=1.0, num_steps=1, horizon=10), "beta", 0.0),
    ("proportional", dict(beta=1.0, kl=2.0, target=1.0, num_steps=1, horizon=10), "num_steps", -5),
    ("proportional", dict(beta=1.0, kl=2.0, target=1.0, num_steps=1, horizon=10), "horizon", -10.0),
    ("proportional", dict(beta=1.0, kl=2.0, target=1.0, num_steps=1, horizon=10), "error_clip", -0.2),
    ("proportional", dict(beta=1.0, kl=2.0, target=1.0, num_steps=1, horizon=10), "beta", np.nan),
    ("lagrangian", dict(beta=1.0, kl=0.01, target=0.01, learning_rate=0.1), "beta", -0.5),
    ("lagrangian", dict(beta=1.0, kl=0.01, target=0.01, learning_rate=0.1), "target", 0.0),
    ("lagrangian", dict(beta=1.0, kl=0.01, target=0.01, learning_rate=0.1), "learning_rate", 0.0),
])
def test_controllers_reject_bad_arguments(controller, arguments, name, bad):
    # Eagerly a ValueError naming the argument; under jit NaN, never a finite coefficient.
    function = {"adaptive": policy.adaptive_kl_coefficient, "proportional": policy.proportional_kl_coefficient,
                "lagrangian": policy.lagrangian_kl_coefficient}[controller]
    arguments = dict(arguments, **{name: bad})
    assert np.isfinite(float(function(**dict(arguments, **{name: {"num_steps": 1}.get(name, 1.0)}))))
    with pytest.raises(ValueError, match=f"`{name}` must be"):
        function(**arguments)
    assert np.isnan(float(jax.jit(lambda a: function(**a))(arguments)))


def test_proportional_controller_step_must_keep_beta_positive():
    # error_clip * num_steps / horizon >= 1 would let one step down turn beta negative (here -1).
    with pytest.raises(ValueError, match=r"`error_clip \* num_steps / horizon` must be < 1"):
        policy.proportional_kl_coefficient(1.0, 0.0, 1.0, 100, 10)
    assert np.isnan(float(jax.jit(policy.proportional_kl_coefficient)(1.0, 0.0, 1.0, 100, 10)))
    # at rest (num_steps = 0) nothing moves; an unclipped controller (error_clip = 0) neither
    assert float(policy.proportional_kl_coefficient(0.3, 5.0, 1.0, 0, 10)) == pytest.approx(0.3)
    assert float(policy.proportional_kl_coefficient(0.3, 5.0, 1.0, 4, 10, error_clip=0.0)) == 0.3


@pytest.mark.parametrize("dtype, far", [(jnp.float32, -200.0), (jnp.float64, -800.0)])
def test_exact_kl_agrees_with_discrete_when_a_probability_underflows(dtype, far):
    # exp(far) underflows to 0, but a finite logit is a positive probability facing q = 0: +inf,
    # as kljax.discrete.kl_logits says (policy used to call the action out of support: 0).
    from kljax import discrete

    logits = jnp.array([[0.0, far], [0.0, 1.0]], dtype=dtype)
    logits_ref = jnp.array([[0.0, -jnp.inf], [1.0, 0.0]], dtype=dtype)
    value = policy.exact_kl(logits, logits_ref)
    assert value.dtype == dtype
    np.testing.assert_array_equal(np.asarray(value), np.asarray(discrete.kl_logits(logits, logits_ref)))
    assert float(value[0]) == np.inf
    np.testing.assert_array_equal(np.asarray(jax.jit(policy.exact_kl)(logits, logits_ref)),
                                  np.asarray(value))


def test_exact_kl_bad_logits_raise_eagerly_and_give_nan_under_jit():
    good = jnp.log(jnp.array([0.5, 0.3, 0.2]))
    for bad, message in ((jnp.array([0.0, jnp.nan, 1.0]), "contains NaN"),
                         (jnp.array([0.0, jnp.inf, 1.0]), r"contains \+inf"),
                         (jnp.full(3, -jnp.inf), "all -inf")):
        with pytest.raises(ValueError, match=f"`logits` .*{message}"):
            policy.exact_kl(bad, good)
        with pytest.raises(ValueError, match=f"`logits_ref` .*{message}"):
            policy.exact_kl(good, bad)
        assert np.isnan(float(jax.jit(policy.exact_kl)(bad, good)))
        assert np.isnan(float(jax.jit(policy.exact_kl)(good, bad)))


def test_sequence_exact_kl_tokens_out_of_range():
    # A token -1 used to wrap around to the last action and give a finite surrogate.
    logits, logits_ref = jnp.zeros((3, 2)), jnp.array([[0.0, 1.0]] * 3)
    for tokens in ([0, 1, -1], [0, 2, 1]):
        with pytest.raises(ValueError, match=r"`tokens` must lie in \[0, 2\)"):
            policy.sequence_exact_kl(logits, logits_ref, jnp.array(tokens))
        assert np.isnan(float(jax.jit(policy.sequence_exact_kl)(logits, logits_ref, jnp.array(tokens))))
    batch = jax.jit(policy.sequence_exact_kl)(jnp.zeros((2, 3, 2)), jnp.ones((2, 3, 2)),
                                              jnp.array([[0, 1, 1], [0, -1, 1]]))
    assert np.isfinite(float(batch[0])) and np.isnan(float(batch[1]))


# --- RL options: abs, straight-through, KL direction, truncated weights, Lagrangian controller ---------


def _expected_grad_elementwise(surrogate, logits, log_ref, sampling_logits=None, *extra):
    """sum_a mu(a) grad_logits surrogate(log pi(a)) for an elementwise surrogate, by the chain rule through
    log pi(a): one autodiff call for all actions (the surrogate's derivative in its first argument)."""
    log_pi = jax.nn.log_softmax(logits)
    derivative = np.asarray(jax.grad(lambda lp: jnp.sum(surrogate(lp, log_ref, *extra)))(log_pi))
    p = _softmax(np.asarray(logits))
    mu = p if sampling_logits is None else _softmax(np.asarray(sampling_logits))
    return (mu * derivative) @ (np.eye(p.size) - p[None, :])  # row a of the second factor: grad log pi(a)


def _sign_gradient(logits, log_ref):
    """Closed form sum_a sign(k1(a)) grad pi(a) = pi * (s - E_pi[s]) with s = sign(log pi - log ref)."""
    p = _softmax(np.asarray(logits))
    s = np.sign(np.log(p) - np.asarray(log_ref))
    return p * (s - np.sum(p * s))


_OPTIONS = {f"straight_through[{v},{g}]": functools.partial(policy.straight_through_loss, value=v, gradient=g)
            for v in ("k1", "k2", "k3", "abs") for g in ("k1", "k2", "k3", "abs")}
_OPTIONS.update({f"kl_loss[{d},{e}]": functools.partial(policy.kl_loss, direction=d, estimator=e)
                 for d, estimators in (("reverse", ("k1", "k2", "k3")), ("forward", ("k1", "k3"))) for e in estimators})
_OPTIONS["abs_loss"] = policy.abs_loss


@jax.jit  # every option in one compile: per action, the surrogate's value and derivative in log pi(a)
def _values_and_derivatives(log_pi, log_ref):
    return {name: (f(log_pi, log_ref), jax.grad(lambda lp, f=f: jnp.sum(f(lp, log_ref)))(log_pi))
            for name, f in _OPTIONS.items()}


def test_rl_options_expected_gradients_by_enumeration():
    """E_{a~pi}[grad surrogate(a)] = sum_a pi(a) (d surrogate / d log pi(a)) grad log pi(a) (chain rule)."""
    logits, log_ref = _case(5)
    p, ref = _softmax(np.asarray(logits)), np.exp(np.asarray(log_ref))
    reverse, forward = float(np.sum(p * np.log(p / ref))), float(np.sum(ref * np.log(ref / p)))
    gradients = {"k1": np.zeros(K), "k2": _grad_reverse_kl(logits, log_ref),
                 "k3": _grad_forward_kl(logits, log_ref), "abs": _sign_gradient(logits, log_ref)}
    # the chain-rule shortcut agrees with per-action autodiff (the helper of the tests above)
    np.testing.assert_allclose(_expected_grad(policy.abs_loss, logits, log_ref), gradients["abs"], atol=1e-12)
    score = np.eye(K) - p[None, :]  # row a: grad_logits log pi(a)
    expected = {f"straight_through[{v},{g}]": (gradients[g], reverse if v in ("k1", "k3") else None)
                for v in ("k1", "k2", "k3", "abs") for g in gradients}
    expected.update({f"kl_loss[reverse,{e}]": (gradients["k2"], reverse if e != "k2" else None)
                     for e in ("k1", "k2", "k3")})
    expected.update({f"kl_loss[forward,{e}]": (gradients["k3"], forward) for e in ("k1", "k3")})
    expected["abs_loss"] = (gradients["abs"], None)
    results = _values_and_derivatives(jax.nn.log_softmax(logits), log_ref)
    assert set(results) == set(expected)
    for name, (values, derivatives) in results.items():
        gradient, value = expected[name]
        np.testing.assert_allclose((p * np.asarray(derivatives)) @ score, gradient, atol=1e-12, err_msg=name)
        if value is not None:  # unbiased values
            assert float(p @ np.asarray(values)) == pytest.approx(value, rel=1e-10), name


def test_truncated_importance_weights_by_enumeration():
    """a ~ pi_old: no weight cut -> grad KL(pi || ref); cut at c -> the stated biased formula."""
    logits, log_ref = _case(3)
    old_logits = jnp.asarray(np.random.default_rng(4).normal(size=K))
    log_old = jax.nn.log_softmax(old_logits)
    p, p_old, ref = (np.exp(np.asarray(jax.nn.log_softmax(x))) for x in (logits, old_logits, log_ref))
    weights = p / p_old
    score = np.eye(K) - p[None, :]  # row a: grad_logits log pi(a)
    k1 = np.log(p / ref)
    for cap in (2 * weights.max(), float(np.median(weights))):
        def surrogate(lp, lr, lo, cap=cap):
            return policy.k3_loss_is(lp, lr, lo, max_weight=cap)

        got = _expected_grad_elementwise(surrogate, logits, log_ref, old_logits, log_old)
        cut = weights > cap
        per_action = np.where(cut, p_old * cap * (1 - ref / p), p * k1)
        np.testing.assert_allclose(got, per_action @ score, atol=1e-12)
        if not cut.any():
            np.testing.assert_allclose(got, _grad_reverse_kl(logits, log_ref), atol=1e-12)
    with pytest.raises(ValueError, match="`max_weight`"):
        policy.k3_loss_is(-1.0, -1.0, -1.0, max_weight=0.0)
    assert np.isnan(float(jax.jit(lambda c: policy.k3_loss_is(-1.0, -1.0, -1.0, max_weight=c))(-1.0)))


def test_lagrangian_controller_settles_on_the_kl_budget():
    """Dual ascent with the exact KL of pi_beta ~ ref exp(r / beta) converges to the beta whose KL is the
    target (found by bisection), where the optimal policy's constraint is tight."""
    rng = np.random.default_rng(0)
    log_ref = jnp.log(jnp.asarray(rng.dirichlet(np.ones(6))))
    reward = jnp.asarray(rng.normal(size=6))
    target = 0.2

    def kl_of(beta):
        return policy.exact_kl(log_ref + reward / beta, log_ref)

    def kl_numpy(beta):  # the same KL in NumPy, for the bisection
        logits = np.asarray(log_ref) + np.asarray(reward) / beta
        log_p = logits - np.log(np.sum(np.exp(logits - logits.max()))) - logits.max()
        return float(np.sum(np.exp(log_p) * (log_p - np.asarray(log_ref))))

    @jax.jit
    def run(beta):
        def step(beta, _):
            return policy.lagrangian_kl_coefficient(beta, kl_of(beta), target, learning_rate=2.0), None
        return jax.lax.scan(step, beta, None, length=400)[0]

    low, high = 1e-3, 1e3  # KL decreases in beta
    for _ in range(100):
        middle = np.sqrt(low * high)
        low, high = (middle, high) if kl_numpy(middle) > target else (low, middle)
    beta = run(jnp.asarray(1.0))
    assert float(beta) == pytest.approx(low, rel=1e-6)
    assert float(kl_of(beta)) == pytest.approx(target, rel=1e-6)
    # A budget the reference already meets: the multiplier falls to 0 and stays there.
    assert float(policy.lagrangian_kl_coefficient(0.01, 0.0, target, learning_rate=1.0)) == 0.0


@pytest.mark.parametrize("surrogate, names", [
    (policy.k1_loss, ("log_prob", "log_prob_ref")), (policy.k2_loss, ("log_prob", "log_prob_ref")),
    (policy.k3_loss, ("log_prob", "log_prob_ref")), (policy.k1_reward, ("log_prob", "log_prob_ref")),
    (policy.k3_loss_is, ("log_prob", "log_prob_ref", "log_prob_old")), (policy.abs_loss, ("log_prob", "log_prob_ref")),
    (policy.straight_through_loss, ("log_prob", "log_prob_ref")), (policy.kl_loss, ("log_prob", "log_prob_ref")),
    (policy.sequence_k1_reward, ("log_probs", "log_probs_ref")),
])
def test_nan_log_probs_raise_eagerly_naming_the_argument(surrogate, names):
    good = jnp.log(jnp.array([0.2, 0.5]))
    for index, name in enumerate(names):
        arguments = [good] * len(names)
        arguments[index] = good.at[0].set(jnp.nan)
        with pytest.raises(ValueError, match=f"`{name}`"):
            surrogate(*arguments)
        assert np.isnan(np.asarray(jax.jit(surrogate)(*arguments))).any()


def test_controllers_reject_nan_kl_and_option_names():
    for controller, arguments in ((policy.adaptive_kl_coefficient, (1.0, jnp.nan, 0.01)),
                                  (policy.proportional_kl_coefficient, (1.0, jnp.nan, 1.0, 1, 10))):
        with pytest.raises(ValueError, match="`kl`"):
            controller(*arguments)
        assert np.isnan(float(jax.jit(controller)(*arguments)))
    with pytest.raises(ValueError, match="`kl`"):
        policy.lagrangian_kl_coefficient(1.0, np.nan, 0.1, learning_rate=0.1)
    with pytest.raises(ValueError, match="`gradient`"):
        policy.straight_through_loss(-1.0, -1.0, gradient="k4")
    with pytest.raises(ValueError, match="`direction`"):
        policy.kl_loss(-1.0, -1.0, direction="sideways")
    with pytest.raises(ValueError, match="`estimator`"):
        policy.kl_loss(-1.0, -1.0, direction="forward", estimator="k2")
    with pytest.raises(ValueError, match="`log_probs_ref`"):  # the shape message names the arguments
        policy.sequence_k1_reward(jnp.zeros(3), jnp.zeros(2))
