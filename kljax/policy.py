"""KL penalties for policy optimisation: where the KL goes changes the gradient you get.

A policy pi_theta is regularised towards a fixed reference pi_ref with a penalty beta * KL(pi || pi_ref)
(PPO, RLHF, GRPO). With actions a ~ pi sampled on-policy, the KL has to be *estimated*, and the
estimate can enter training in two places:

* **in the reward** (``k1_reward``): r(a) - beta * k1(a) with k1 = log pi(a) - log pi_ref(a), treated as a
  constant and multiplied by the score log pi(a) (REINFORCE);
* **as a loss** differentiated by automatic differentiation (``k1_loss``, ``k2_loss``, ``k3_loss``,
  ``k3_loss_is``), with k1, k2, k3 the per-sample terms of Schulman (2020).

All functions here are *surrogate losses to minimise*, one value per sampled action; average them
over the batch and add ``beta * surrogate`` to the reward's policy-gradient loss. Their gradients
with respect to the policy's parameters, in expectation over a ~ pi, are (Tang & Munos 2025):

=================  ===================================  =================================
surrogate          value (in expectation)               gradient (in expectation)
=================  ===================================  =================================
``k1_reward``      KL(pi || pi_ref)                     grad KL(pi || pi_ref)   (correct)
``k1_loss``        KL(pi || pi_ref)                     0                       (no regularisation)
``k2_loss``        >= 0, ~ KL near pi_ref               grad KL(pi || pi_ref)   (correct)
``k3_loss``        KL(pi || pi_ref)                     grad KL(pi_ref || pi)   (the *other* KL)
``k3_loss_is``     KL(pi || pi_ref)                     grad KL(pi || pi_ref)   (correct)
``exact_kl``       KL(pi || pi_ref) exactly             grad KL(pi || pi_ref)   exactly
``abs_loss``       E|k1| >= KL(pi || pi_ref)            sum_a sign(k1(a)) grad pi(a)  (neither KL's)
=================  ===================================  =================================

Options practitioners use (TRL, verl, OpenRLHF), each with its expected gradient stated and tested by
enumeration:

* ``abs_loss``: TRL's / verl's ``"abs"`` penalty |k1|; its gradient is not that of any KL.
* ``straight_through_loss``: the value of one estimator with the gradient of another, e.g. verl's
  ``"k3+"`` (k3's low-variance value, k2's correct gradient): expected gradient = that of the
  ``gradient`` estimator in the table.
* ``kl_loss``: the choice of KL *direction*, reverse KL(pi || pi_ref) (mode-seeking, the RLHF default) or
  forward KL(pi_ref || pi) (mass-covering), with any unbiased value estimate and the exact on-policy
  score-function gradient of the chosen direction.
* ``k3_loss_is(..., max_weight=c)``: off-policy k3 with truncated importance weights min(pi / pi_old, c)
  (Ionides 2008; the rho-bar of V-trace): bounded variance, a bias on the actions whose weight is cut.

The k2 and k3 identities need on-policy samples (``k3_loss_is`` also takes a behaviour policy). On-policy
the three correct sampled placements even share their per-sample gradient, k1(a) * grad log pi(a);
they differ in value, in baseline and off-policy.

For sequences a ~ pi(. | prefix) token by token, summing per-token surrogates over positions gives
only a *partial* gradient, because it ignores that earlier tokens change the distribution of later
prefixes. ``sequence_k1_reward`` and ``sequence_exact_kl`` are the sequence-level surrogates whose
expected gradient is the gradient of the sequence KL.

The KL coefficient itself can be controlled: ``adaptive_kl_coefficient`` (PPO's halve/double rule),
``proportional_kl_coefficient`` (Ziegler et al. 2019) and ``lagrangian_kl_coefficient`` (dual ascent on
the constraint KL <= target, which makes beta the Lagrange multiplier of a KL budget), all pure
functions usable under ``jit``.

Bad input: a NaN log-probability or KL raises ``ValueError`` naming the argument when concrete; under
``jit`` it gives NaN (API.md).

References:
    J. Schulman, "Approximating KL divergence", blog post, 2020.
    http://joschu.net/blog/kl-approx.html
    Y. Tang and R. Munos, "On a few pitfalls in KL divergence gradient estimation for RL",
    arXiv:2506.09477, 2025.
    J. Schulman, F. Wolski, P. Dhariwal, A. Radford and O. Klimov, "Proximal Policy Optimization
    Algorithms", arXiv:1707.06347, 2017, Section 4.
    D. M. Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593,
    2019, Section 2.2.
    E. L. Ionides, "Truncated importance sampling", J. Comput. Graph. Stat. 17(2), 2008.
    L. Espeholt et al., "IMPALA: Scalable Distributed Deep-RL with Importance Weighted Actor-Learner
    Architectures" (V-trace), ICML 2018, arXiv:1802.01561.
    A. Stooke, J. Achiam and P. Abbeel, "Responsive Safety in Reinforcement Learning by PID Lagrangian
    Methods", ICML 2020, arXiv:2007.03964 (the Lagrangian multiplier update).
    G. Sheng et al., "HybridFlow: A Flexible and Efficient RLHF Framework" (verl), arXiv:2409.19256, 2024
    (``kl_penalty`` options, the ``"k3+"`` straight-through estimator).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from kljax import discrete, mc
from kljax._contract import (as_float_array, at_least, below, check, check_eagerly, check_logits, check_same_shape,
                             is_concrete, nan_unless, nonnegative, normalize_axis, not_nan, positive)

__all__ = [
    "k1_reward",
    "k1_loss",
    "k2_loss",
    "k3_loss",
    "k3_loss_is",
    "abs_loss",
    "straight_through_loss",
    "kl_loss",
    "exact_kl",
    "sequence_k1_reward",
    "sequence_exact_kl",
    "adaptive_kl_coefficient",
    "proportional_kl_coefficient",
    "lagrangian_kl_coefficient",
]

_sg = jax.lax.stop_gradient


def _log_probs(log_prob, log_prob_ref, names=("log_prob", "log_prob_ref")):
    """Checks the pair and returns (log_prob, stop_gradient(log_prob_ref)) in log_prob's dtype.

    ``names`` are the caller's argument names, for the messages. A NaN log-probability raises eagerly;
    under jit it propagates to the surrogate (NaN)."""
    log_prob = as_float_array(names[0], log_prob)
    log_prob_ref = as_float_array(names[1], log_prob_ref)
    check_same_shape(names[0], log_prob, names[1], log_prob_ref)
    check_eagerly(names[0], log_prob, not_nan)
    check_eagerly(names[1], log_prob_ref, not_nan)
    return log_prob, _sg(log_prob_ref.astype(log_prob.dtype))


def _score_surrogate(log_prob, weight):
    """Zero in value; its gradient is ``weight * grad log_prob`` (``weight`` held constant)."""
    return _sg(weight) * (log_prob - _sg(log_prob))


def k1_reward(log_prob, log_prob_ref, baseline=0.0):
    """KL folded into the reward: REINFORCE surrogate whose gradient is (k1 - baseline) * grad log pi.

    With the KL in the reward, r'(a) = r(a) - beta * k1(a) with k1(a) = log pi(a) - log pi_ref(a)
    held constant, and the policy-gradient loss -r'(a) * log pi(a) contains
    ``beta * stop_gradient(k1(a)) * log pi(a)``. This function is that KL part per unit beta, written
    so that its *value* is the k1 estimate itself (useful for logging) while its gradient is the
    score-function one:

        value = k1(a),    gradient = (k1(a) - baseline) * grad log pi(a).

    Expected gradient over a ~ pi: ``E[(k1 - b) grad log pi] = grad KL(pi || pi_ref)``, the correct
    reverse-KL gradient, for any ``baseline`` b that does not depend on a (E[grad log pi] = 0).

    Args:
        log_prob: log pi(a) of the sampled actions a ~ pi, differentiable in pi's parameters.
        log_prob_ref: log pi_ref(a) of the same actions; treated as a constant (stop_gradient).
        baseline: a control variate subtracted from k1 in the gradient only: a scalar or a per-sample
            array that does not depend on that sample's own action (e.g. the leave-one-out mean of the
            other samples' k1); it changes the variance, not the expectation.

    Returns:
        The per-sample surrogate, same shape and dtype as ``log_prob``. Minimise ``beta * mean``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.policy import k1_reward
        >>> logits = jnp.array([0.5, 0.0, -0.5])
        >>> log_ref = jnp.log(jnp.array([0.2, 0.3, 0.5]))
        >>> def surrogate(logits, action):
        ...     return k1_reward(jax.nn.log_softmax(logits)[action], log_ref[action])
        >>> print(round(float(surrogate(logits, 0)), 4))  # value = k1(a=0)
        0.9292
        >>> # expected gradient sum_a pi(a) grad surrogate(a) equals grad KL(pi || pi_ref):
        >>> from kljax.policy import exact_kl
        >>> grads = jnp.stack([jax.grad(surrogate)(logits, a) for a in range(3)])
        >>> expected = jax.nn.softmax(logits) @ grads
        >>> kl_grad = jax.grad(exact_kl)(logits, log_ref)
        >>> bool(jnp.allclose(expected, kl_grad, atol=1e-5))
        True

    References:
        R. J. Williams, "Simple statistical gradient-following algorithms for connectionist
        reinforcement learning", Machine Learning, 1992 (REINFORCE, eq. 9);
        Y. Tang and R. Munos, arXiv:2506.09477, 2025 (the "vanilla" gradient estimate).
    """
    log_prob, log_prob_ref = _log_probs(log_prob, log_prob_ref)
    k1 = log_prob - log_prob_ref
    baseline = jnp.asarray(baseline, dtype=log_prob.dtype)
    return _sg(k1) + _score_surrogate(log_prob, k1 - baseline)


def k1_loss(log_prob, log_prob_ref):
    """k1 = log pi(a) - log pi_ref(a) used as a loss: an unbiased KL *value* with zero expected gradient.

    Differentiating k1 directly gives grad log pi(a), whose expectation under a ~ pi is zero:
    ``E[grad k1] = sum_a grad pi(a) = 0``. The penalty therefore does nothing on average (it only adds
    noise) and a policy trained with it maximises the reward alone.

    Args:
        log_prob: log pi(a) of the sampled actions a ~ pi, differentiable.
        log_prob_ref: log pi_ref(a) of the same actions; treated as a constant.

    Returns:
        k1 per sample, same shape and dtype as ``log_prob``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.policy import k1_loss
        >>> print(round(float(k1_loss(jnp.log(0.5), jnp.log(0.25))), 4))
        0.6931

    References:
        J. Schulman, "Approximating KL divergence", 2020 (k1);
        Y. Tang and R. Munos, arXiv:2506.09477, 2025, Section 3 (its gradient has zero mean).
    """
    log_prob, log_prob_ref = _log_probs(log_prob, log_prob_ref)
    return log_prob - log_prob_ref


def k2_loss(log_prob, log_prob_ref):
    """k2 = (log pi(a) - log pi_ref(a))^2 / 2 used as a loss: on-policy, the correct reverse-KL gradient.

    ``grad k2 = (log pi - log pi_ref) * grad log pi``, which is exactly the score-function estimate of
    grad KL(pi || pi_ref); so ``E_{a~pi}[grad k2] = grad KL(pi || pi_ref)`` although k2's value is a
    biased estimate of the KL (it estimates an f-divergence, close to the KL when pi ~ pi_ref). The
    identity needs a ~ pi: with samples from an older policy it is biased (use ``k3_loss_is`` with
    ``log_prob_old``).

    Args:
        log_prob: log pi(a) of the sampled actions a ~ pi, differentiable.
        log_prob_ref: log pi_ref(a) of the same actions; treated as a constant.

    Returns:
        k2 per sample, same shape and dtype as ``log_prob``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.policy import k2_loss
        >>> print(round(float(k2_loss(jnp.log(0.5), jnp.log(0.25))), 4))
        0.2402

    References:
        J. Schulman, "Approximating KL divergence", 2020 (k2);
        Y. Tang and R. Munos, arXiv:2506.09477, 2025 (the "squared" estimate).
    """
    log_prob, log_prob_ref = _log_probs(log_prob, log_prob_ref)
    return 0.5 * jnp.square(log_prob - log_prob_ref)


def _k3(log_prob, log_prob_ref):
    # k3 = (rho - 1) - log rho with rho = pi_ref / pi (Schulman 2020); expm1 keeps precision near rho = 1.
    log_ratio = log_prob_ref - log_prob
    return jnp.expm1(log_ratio) - log_ratio


def k3_loss(log_prob, log_prob_ref):
    """k3 = (rho - 1) - log rho, rho = pi_ref(a) / pi(a), as a loss: the gradient of KL(pi_ref || pi), the other KL.

    k3 is an unbiased, non-negative, low-variance estimate of the *value* KL(pi || pi_ref), but
    ``grad k3 = (1 - rho) * grad log pi`` and ``E_{a~pi}[grad k3] = -sum_a pi_ref(a) grad log pi(a)
    = grad KL(pi_ref || pi)``: differentiating it minimises the forward (mass-covering) KL instead of
    the intended reverse KL, and the regularised optimum moves (GRPO's pitfall).

    Args:
        log_prob: log pi(a) of the sampled actions a ~ pi, differentiable.
        log_prob_ref: log pi_ref(a) of the same actions; treated as a constant.

    Returns:
        k3 per sample (>= 0), same shape and dtype as ``log_prob``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.policy import k3_loss
        >>> print(round(float(k3_loss(jnp.log(0.5), jnp.log(0.25))), 4))  # 0.5 - 1 + log 2
        0.1931

    References:
        J. Schulman, "Approximating KL divergence", 2020 (k3);
        Y. Tang and R. Munos, arXiv:2506.09477, 2025, Section 3 (its gradient is that of KL(pi_ref, pi)).
    """
    log_prob, log_prob_ref = _log_probs(log_prob, log_prob_ref)
    return _k3(log_prob, log_prob_ref)


def k3_loss_is(log_prob, log_prob_ref, log_prob_old=None, *, max_weight=None):
    """Importance-weighted k3, (pi(a) / pi_old(a)) * k3(a), as a loss: the correct reverse-KL gradient.

    With a ~ pi_old, ``E_{pi_old}[(pi / pi_old) k3] = E_pi[k3] = KL(pi || pi_ref)`` for *every*
    parameter value, so differentiating the weighted term gives, in expectation,
    ``grad KL(pi || pi_ref)``. On-policy (``log_prob_old=None``) pi_old = stop_gradient(pi): the weight
    is 1 in value and contributes the missing score term ``k3 * grad log pi``. The per-sample gradient
    is then ``(k3 + 1 - rho) grad log pi = k1 grad log pi``, *identical* to that of ``k2_loss`` and of
    ``k1_reward`` without baseline: on-policy, the three correct placements differ only in value.

    Truncated weights (``max_weight=c``, Ionides 2008; V-trace's rho-bar): the weight is
    ``w = min(pi / pi_old, c)``, differentiable below the cap and constant at it. With a ~ pi_old the
    expected gradient is then

        sum_{a: w(a) < c} pi(a) k1(a) grad log pi(a) + sum_{a: w(a) > c} pi_old(a) c (1 - rho(a)) grad log pi(a),

    ``rho = pi_ref / pi``: exactly ``grad KL(pi || pi_ref)`` when no weight reaches c, and otherwise
    a bias on the cut actions in exchange for a bounded variance.

    Args:
        log_prob: log pi(a) of the sampled actions, differentiable.
        log_prob_ref: log pi_ref(a) of the same actions; treated as a constant.
        log_prob_old: log pi_old(a) of the behaviour policy that sampled a (constant); ``None`` means
            on-policy sampling, pi_old = stop_gradient(pi).
        max_weight: optional cap c > 0 on the importance weight (e.g. 2 or 10); ``None``: no cap.

    Returns:
        The weighted k3 per sample, same shape and dtype as ``log_prob``; NaN under ``jit`` for a
        ``max_weight`` <= 0 (``ValueError`` when concrete).

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.policy import k3_loss_is
        >>> print(round(float(k3_loss_is(jnp.log(0.5), jnp.log(0.25))), 4))  # on-policy value = k3
        0.1931
        >>> # pi / pi_old = 4 capped at 2: 2 * k3
        >>> print(round(float(k3_loss_is(jnp.log(0.5), jnp.log(0.25), jnp.log(0.125), max_weight=2.0)), 4))
        0.3863

    References:
        Y. Tang and R. Munos, arXiv:2506.09477, 2025 (the importance-corrected estimate);
        J. Schulman, "Approximating KL divergence", 2020 (k3);
        E. L. Ionides, "Truncated importance sampling", J. Comput. Graph. Stat., 2008.
    """
    log_prob, log_prob_ref = _log_probs(log_prob, log_prob_ref)
    if log_prob_old is None:
        log_prob_old = log_prob
    else:
        log_prob_old = as_float_array("log_prob_old", log_prob_old)
        check_same_shape("log_prob", log_prob, "log_prob_old", log_prob_old)
        check_eagerly("log_prob_old", log_prob_old, not_nan)
        log_prob_old = log_prob_old.astype(log_prob.dtype)
    weight = jnp.exp(log_prob - _sg(log_prob_old))
    masks = []
    if max_weight is not None:
        masks.append(check("max_weight", max_weight, positive))
        weight = jnp.minimum(weight, jnp.asarray(max_weight, log_prob.dtype))
    return nan_unless(weight * _k3(log_prob, log_prob_ref), *masks)


def abs_loss(log_prob, log_prob_ref):
    """|k1| = |log pi(a) - log pi_ref(a)| as a loss (TRL's and verl's ``"abs"`` penalty): not a KL gradient.

    Its value over-estimates the KL in expectation (``E|k1| >= |E k1|``) and its gradient is
    ``sign(k1(a)) grad log pi(a)``, whose expectation over a ~ pi is

        sum_a pi(a) sign(k1(a)) grad log pi(a) = sum_a sign(k1(a)) grad pi(a)

    (for softmax logits z: ``pi * (s - E_pi[s])`` with ``s = sign(k1)``): it moves mass from the actions
    pi favours over pi_ref to the others at a rate independent of *how much* they differ, so it is
    the gradient of neither KL and its fixed point is pi = pi_ref only when nothing else pulls.

    Args:
        log_prob: log pi(a) of the sampled actions a ~ pi, differentiable.
        log_prob_ref: log pi_ref(a) of the same actions; treated as a constant.

    Returns:
        |k1| per sample, same shape and dtype as ``log_prob``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.policy import abs_loss
        >>> print(round(float(abs_loss(jnp.log(0.25), jnp.log(0.5))), 4))
        0.6931

    References:
        L. von Werra et al., TRL (``kl_penalty="abs"``), 2020-2025;
        G. Sheng et al., verl, arXiv:2409.19256, 2024 (``kl_penalty="abs"``).
    """
    log_prob, log_prob_ref = _log_probs(log_prob, log_prob_ref)
    return jnp.abs(log_prob - log_prob_ref)


def _estimator_terms(log_prob, log_prob_ref):
    """The per-sample estimators as differentiable functions of log pi (log pi_ref held constant)."""
    k1 = log_prob - log_prob_ref
    return {"k1": k1, "k2": 0.5 * jnp.square(k1), "k3": _k3(log_prob, log_prob_ref), "abs": jnp.abs(k1)}


_ST_ESTIMATORS = ("k1", "k2", "k3", "abs")


def _estimator_name(name, value):
    if value not in _ST_ESTIMATORS:
        raise ValueError(f"`{name}`={value!r} is not a known estimator; valid names: {list(_ST_ESTIMATORS)}.")
    return value


def straight_through_loss(log_prob, log_prob_ref, *, value="k3", gradient="k2"):
    """The value of one KL estimator with the gradient of another (verl's ``"k3+"`` by default).

    Returns ``stop_gradient(value_term) + gradient_term - stop_gradient(gradient_term)``: the number
    logged and summed is the ``value`` estimator's, the parameters move along the ``gradient``
    estimator's derivative. Expected gradient over a ~ pi (on-policy), by ``gradient``:

    * ``"k2"``: ``grad KL(pi || pi_ref)`` (correct; verl's ``"k3+"`` is value k3, gradient k2);
    * ``"k1"``: 0 (no regularisation);
    * ``"k3"``: ``grad KL(pi_ref || pi)`` (the forward KL);
    * ``"abs"``: ``sum_a sign(k1(a)) grad pi(a)`` (see :func:`abs_loss`).

    Values: ``"k1"`` and ``"k3"`` are unbiased for KL(pi || pi_ref) (k3 >= 0 with low variance near
    pi_ref), ``"k2"`` is biased (an f-divergence, ~ KL near pi_ref), ``"abs"`` over-estimates.

    Args:
        log_prob: log pi(a) of the sampled actions a ~ pi, differentiable.
        log_prob_ref: log pi_ref(a) of the same actions; treated as a constant.
        value: the estimator whose value is returned: ``"k1"``, ``"k2"``, ``"k3"`` or ``"abs"``.
        gradient: the estimator whose gradient flows, same names.

    Returns:
        The per-sample surrogate, same shape and dtype as ``log_prob``.

    Example:
        >>> import jax, jax.numpy as jnp
        >>> from kljax.policy import straight_through_loss, k2_loss, k3_loss
        >>> lp, lp_ref = jnp.log(0.5), jnp.log(0.25)
        >>> bool(straight_through_loss(lp, lp_ref) == k3_loss(lp, lp_ref))  # the value of k3 ...
        True
        >>> g = jax.grad(straight_through_loss)(lp, lp_ref)
        >>> bool(g == jax.grad(k2_loss)(lp, lp_ref))  # ... the gradient of k2
        True

    References:
        G. Sheng et al., verl, arXiv:2409.19256, 2024 (``kl_penalty`` with the ``"+"`` suffix);
        Y. Bengio, N. Leonard and A. Courville, arXiv:1308.3432, 2013 (straight-through estimators);
        Y. Tang and R. Munos, arXiv:2506.09477, 2025 (which gradients are correct).
    """
    value, gradient = _estimator_name("value", value), _estimator_name("gradient", gradient)
    log_prob, log_prob_ref = _log_probs(log_prob, log_prob_ref)
    terms = _estimator_terms(log_prob, log_prob_ref)
    return _sg(terms[value]) + (terms[gradient] - _sg(terms[gradient]))


_DIRECTIONS = {
    # direction -> (value terms of t = log(pi_ref / pi), score weight of the exact on-policy gradient)
    "reverse": ({"k1": mc._k1_of_log_ratio, "k2": mc._k2_of_log_ratio, "k3": mc._k3_of_log_ratio},
                lambda t: -t),  # grad KL(pi || pi_ref) = E_pi[k1 grad log pi]
    "forward": ({"k1": mc._reverse_k1_of_log_ratio, "k3": mc._reverse_k3_of_log_ratio},
                lambda t: -jnp.expm1(t)),  # grad KL(pi_ref || pi) = E_pi[(1 - rho) grad log pi]
}


def kl_loss(log_prob, log_prob_ref, *, direction="reverse", estimator="k3"):
    """A KL penalty of the chosen direction with the exact on-policy gradient of that direction.

    For actions a ~ pi and ``rho = pi_ref(a) / pi(a)``:

    * ``direction="reverse"``, KL(pi || pi_ref) (mode-seeking; RLHF, PPO, GRPO): value ``k1 = -log rho``,
      ``k2 = (log rho)^2 / 2`` or ``k3 = rho - 1 - log rho``; gradient ``k1(a) grad log pi(a)``, whose
      expectation is ``grad KL(pi || pi_ref)``;
    * ``direction="forward"``, KL(pi_ref || pi) (mass-covering): value ``k1 = rho log rho`` or
      ``k3 = rho log rho - (rho - 1) >= 0`` (unbiased from samples of pi, :func:`kljax.mc.reverse_k3`);
      gradient ``(1 - rho(a)) grad log pi(a)``, whose expectation is ``grad KL(pi_ref || pi)``.

    The value is the estimator's, the gradient a score-function term whose weight is held constant
    (as in :func:`k1_reward`), so the two are chosen independently and the gradient is unbiased
    whichever estimate is logged. Samples must come from pi (on-policy).

    Args:
        log_prob: log pi(a) of the sampled actions a ~ pi, differentiable.
        log_prob_ref: log pi_ref(a) of the same actions; treated as a constant.
        direction: ``"reverse"`` (KL(pi || pi_ref)) or ``"forward"`` (KL(pi_ref || pi)).
        estimator: the value's estimator: ``"k1"``, ``"k2"`` (reverse only) or ``"k3"``.

    Returns:
        The per-sample surrogate, same shape and dtype as ``log_prob``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.policy import kl_loss
        >>> lp, lp_ref = jnp.log(0.5), jnp.log(0.25)  # rho = 1/2
        >>> print(round(float(kl_loss(lp, lp_ref, direction="forward")), 4))  # 0.5 log 0.5 + 0.5
        0.1534

    References:
        J. Schulman, "Approximating KL divergence", 2020 (the estimators of both directions);
        Y. Tang and R. Munos, arXiv:2506.09477, 2025 (score-function gradients of both directions).
    """
    if direction not in _DIRECTIONS:
        raise ValueError(f"`direction`={direction!r} must be 'reverse' (KL(pi || pi_ref)) or 'forward' "
                         "(KL(pi_ref || pi)).")
    terms, weight = _DIRECTIONS[direction]
    if estimator not in terms:
        raise ValueError(f"`estimator`={estimator!r} is not available for direction {direction!r}; "
                         f"valid names: {sorted(terms)}.")
    log_prob, log_prob_ref = _log_probs(log_prob, log_prob_ref)
    t = log_prob_ref - log_prob
    return _sg(terms[estimator](t)) + _score_surrogate(log_prob, weight(t))


def exact_kl(logits, logits_ref, *, axis=-1):
    """Exact KL(softmax(logits) || softmax(logits_ref)) over enumerable actions: the Rao-Blackwellised penalty.

    When the actions can be enumerated, the KL at a visited state needs no sampled action at all:
    averaging any unbiased per-action estimate over a ~ pi(. | s) gives this exact value, so it is
    the Rao-Blackwellisation of k1/k3 and has zero variance at a fixed state. Its gradient is the exact
    ``grad KL(pi(. | s) || pi_ref(. | s))``. (For sequences, where the *states* are sampled from pi,
    see ``sequence_exact_kl``.)

    Args:
        logits: unnormalised log-probabilities of pi, differentiable; ``-inf`` marks impossible actions.
        logits_ref: those of pi_ref, same shape; treated as a constant.
        axis: the action axis.

    Returns:
        The KL in nats, reduced over ``axis``; +inf where pi puts mass on an action pi_ref excludes
        (also mass too small for the dtype: a finite logit is a positive probability). Computed by
        :func:`kljax.discrete.kl_logits`. Concrete NaN or ``+inf`` logits, or a slice with every
        logit ``-inf``, raise ``ValueError``; under ``jit`` they give NaN.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.policy import exact_kl
        >>> kl = exact_kl(jnp.log(jnp.array([0.5, 0.5])), jnp.log(jnp.array([0.25, 0.75])))
        >>> print(round(float(kl), 4))  # 0.5 log 2 + 0.5 log(2/3)
        0.1438

    References:
        Y. Tang and R. Munos, arXiv:2506.09477, 2025 (analytic per-state KL);
        D. Blackwell, "Conditional expectation and unbiased sequential estimation", 1947.
    """
    logits = as_float_array("logits", logits)
    logits_ref = as_float_array("logits_ref", logits_ref)
    check_same_shape("logits", logits, "logits_ref", logits_ref)
    axis = normalize_axis("logits", logits, axis)
    check_logits("logits", logits, axis)
    check_logits("logits_ref", logits_ref, axis)
    # One home for the kernel: kljax.discrete's (accurate, zero-safe, with the closed-form gradient
    # p (log p - log q - KL) that is exactly 0 at zero probabilities).
    return discrete.kl_logits(logits, _sg(logits_ref.astype(logits.dtype)), axis=axis)


def _reverse_cumsum(x, axis):
    return jnp.flip(jnp.cumsum(jnp.flip(x, axis=axis), axis=axis), axis=axis)


def sequence_k1_reward(log_probs, log_probs_ref, *, axis=-1):
    """Sequence KL in the reward, token by token with reward-to-go: the correct sequence-level gradient.

    For a sequence x ~ pi sampled token by token, k1_t = log pi(x_t | x_<t) - log pi_ref(x_t | x_<t)
    and KL(pi || pi_ref) over sequences is E[sum_t k1_t]. Its gradient is
    ``E[sum_s (sum_{t >= s} k1_t) grad log pi(x_s | x_<s)]``: each token is charged the KL of itself and
    of everything after it (Tang & Munos 2025, sequential case). The surrogate returned has

        value = sum_t k1_t,    gradient = sum_s (sum_{t >= s} k1_t) * grad log pi(x_s | x_<s).

    Charging each token only its own k1_t (``sum_t k1_reward(...)``), or summing per-token ``k2_loss``,
    drops the future terms and gives a partial gradient.

    Args:
        log_probs: log pi(x_t | x_<t) of the sampled tokens, differentiable, positions along ``axis``.
        log_probs_ref: log pi_ref(x_t | x_<t) of the same tokens; treated as a constant.
        axis: the position (time) axis; it is reduced.

    Returns:
        One surrogate per sequence (``axis`` removed), dtype of ``log_probs``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.policy import sequence_k1_reward
        >>> lp = jnp.log(jnp.array([0.5, 0.5, 0.9]))
        >>> lp_ref = jnp.log(jnp.array([0.25, 0.5, 0.9]))
        >>> print(round(float(sequence_k1_reward(lp, lp_ref)), 4))  # value: sequence k1 = log 2
        0.6931

    References:
        Y. Tang and R. Munos, arXiv:2506.09477, 2025 (sequence-level KL gradient).
    """
    log_probs, log_probs_ref = _log_probs(log_probs, log_probs_ref, ("log_probs", "log_probs_ref"))
    axis = normalize_axis("log_probs", log_probs, axis)
    k1 = log_probs - log_probs_ref
    k1_to_go = _reverse_cumsum(k1, axis)
    return jnp.sum(_sg(k1) + _score_surrogate(log_probs, k1_to_go), axis=axis)


def sequence_exact_kl(logits, logits_ref, tokens):
    """Rao-Blackwellised sequence KL: exact per-position KL at the visited prefixes plus the prefix score term.

    For a sequence x ~ pi, KL_t = KL(pi(. | x_<t) || pi_ref(. | x_<t)) is computed exactly over the
    vocabulary at every visited prefix. ``sum_t KL_t`` is an unbiased, lower-variance estimate of the
    sequence KL. Differentiating it alone gives only the partial gradient ``E[sum_t grad KL_t]``: the
    prefixes themselves are drawn from pi. The full gradient adds the score of each sampled token times
    the KL still to come after it (Tang & Munos 2025):

        value = sum_t KL_t,
        gradient = sum_t grad KL_t + sum_s (sum_{t > s} KL_t) * grad log pi(x_s | x_<s),

    whose expectation is exactly grad KL(pi || pi_ref) over sequences.

    Args:
        logits: pi's logits at each position, shape (..., T, V), differentiable.
        logits_ref: pi_ref's logits at the same prefixes, same shape; treated as a constant.
        tokens: the sampled tokens x_t, integer array of shape (..., T), each in [0, V).

    Returns:
        One surrogate per sequence, shape (...), dtype of ``logits``. A token outside [0, V) raises
        ``ValueError`` when concrete and gives NaN for its sequence under ``jit``.

    Example:
        >>> import jax.numpy as jnp
        >>> from kljax.policy import sequence_exact_kl
        >>> logits = jnp.log(jnp.array([[0.5, 0.5], [0.9, 0.1]]))
        >>> logits_ref = jnp.log(jnp.array([[0.25, 0.75], [0.9, 0.1]]))
        >>> print(round(float(sequence_exact_kl(logits, logits_ref, jnp.array([0, 1]))), 4))
        0.1438

    References:
        Y. Tang and R. Munos, arXiv:2506.09477, 2025 (analytic per-token KL and the sequential gradient).
    """
    logits = as_float_array("logits", logits)
    if logits.ndim < 2:
        raise ValueError(f"`logits` must have shape (..., T, V), got {logits.shape}.")
    tokens = jnp.asarray(tokens)
    if not jnp.issubdtype(tokens.dtype, jnp.integer):
        raise TypeError(f"`tokens` must be an integer array, got {tokens.dtype}.")
    if tokens.shape != logits.shape[:-1]:
        raise ValueError(f"`tokens` must have shape {logits.shape[:-1]} to match `logits` of shape "
                         f"{logits.shape}, got {tokens.shape}.")
    vocabulary = logits.shape[-1]
    if is_concrete(tokens):
        values = np.asarray(tokens)
        if ((values < 0) | (values >= vocabulary)).any():
            raise ValueError(f"`tokens` must lie in [0, {vocabulary}) (the vocabulary of `logits`), "
                             f"got values from {values.min()} to {values.max()}.")
    in_range = (tokens >= 0) & (tokens < vocabulary)
    kl_per_position = exact_kl(logits, logits_ref)
    # Under jit an out-of-range token must give NaN, not a wrapped-around (negative) index's value.
    log_probs = jnp.take_along_axis(jax.nn.log_softmax(logits, axis=-1),
                                    jnp.where(in_range, tokens, 0)[..., None], axis=-1)[..., 0]
    log_probs = jnp.where(in_range, log_probs, jnp.nan)
    kl_after = _reverse_cumsum(kl_per_position, -1) - kl_per_position
    return jnp.sum(kl_per_position + _score_surrogate(log_probs, kl_after), axis=-1)


# The controllers' argument constraints (kljax._contract): eagerly (concrete values) a violation raises
# ValueError naming the argument; under jit it makes the returned coefficient NaN (API.md).
_AT_LEAST_ONE = at_least(1)
_BELOW_ONE = below(1, "else the step down, 1 - error_clip * num_steps / horizon, makes beta <= 0")


def adaptive_kl_coefficient(beta, kl, target, *, tolerance=1.5, factor=2.0):
    """PPO's adaptive KL penalty coefficient: halve beta when the KL is small, double it when large.

    After each policy update with the penalty ``beta * KL[pi_old, pi]`` (Schulman et al. 2017, eq. 8),
    with d the measured KL:

        d < target / 1.5  ->  beta / 2,      d > target * 1.5  ->  beta * 2,      otherwise beta.

    Pure and elementwise, so it can be used inside ``jit``/``lax.scan``/``vmap``.

    Args:
        beta: the current coefficient (> 0).
        kl: the measured KL of the last update (e.g. the mean of ``exact_kl(old_logits, logits)``).
        target: the target KL d_targ (> 0).
        tolerance: the band half-width factor, >= 1 (1.5 in the paper; below 1 the band is inverted).
        factor: the multiplicative step, >= 1 (2 in the paper; below 1 beta moves the wrong way).

    Returns:
        The next coefficient, dtype of ``beta``'s promotion with ``kl``. An argument outside its range
        (a NaN ``kl`` included) raises ``ValueError`` naming it when concrete, and gives NaN (where it
        is out of range) under ``jit``.

    Example:
        >>> from kljax.policy import adaptive_kl_coefficient
        >>> [float(adaptive_kl_coefficient(1.0, kl, 0.01)) for kl in (0.001, 0.01, 0.1)]
        [0.5, 1.0, 2.0]

    References:
        J. Schulman et al., "Proximal Policy Optimization Algorithms", arXiv:1707.06347, 2017,
        Section 4 (eq. 8 and the update rule after it).
    """
    masks = [check("beta", beta, positive), check("kl", kl, not_nan), check("target", target, positive),
             check("tolerance", tolerance, _AT_LEAST_ONE), check("factor", factor, _AT_LEAST_ONE)]
    beta = jnp.asarray(beta)
    kl = jnp.asarray(kl)
    new_beta = jnp.where(kl < target / tolerance, beta / factor,
                         jnp.where(kl > target * tolerance, beta * factor, beta))
    return nan_unless(new_beta, *masks)


def proportional_kl_coefficient(beta, kl, target, num_steps, horizon, *, error_clip=0.2):
    """Ziegler et al.'s proportional KL controller: beta *= 1 + clip(kl / target - 1, +-0.2) * num_steps / horizon.

    The log of beta follows a clipped proportional controller towards the target KL (Ziegler et al.
    2019, Section 2.2: e_t = clip((KL_t - KL_targ) / KL_targ, -0.2, 0.2), beta_{t+1} = beta_t
    (1 + K_beta e_t)), with the gain K_beta = num_steps / horizon as in OpenAI's lm-human-preferences
    code (the paper uses K_beta = 0.1). Pure and elementwise, usable under ``jit``.

    Args:
        beta: the current coefficient (> 0).
        kl: the measured KL(pi || pi_ref) of the current batch.
        target: the target KL (> 0).
        num_steps: the number of samples (or steps) since the last update (>= 0).
        horizon: the controller's horizon (> 0); the gain is num_steps / horizon.
        error_clip: the clipping of the proportional error (>= 0; 0.2 in the paper). The largest
            step down, ``1 - error_clip * num_steps / horizon``, must stay > 0 so beta stays > 0.

    Returns:
        The next coefficient. An argument outside its range (a NaN ``kl`` included) raises
        ``ValueError`` naming it when concrete, and gives NaN (where it is out of range) under ``jit``.

    Example:
        >>> from kljax.policy import proportional_kl_coefficient
        >>> print(round(float(proportional_kl_coefficient(0.1, 12.0, 6.0, 256, 10_000)), 6))
        0.100512

    References:
        D. M. Ziegler et al., "Fine-Tuning Language Models from Human Preferences", arXiv:1909.08593,
        2019, Section 2.2.
    """
    masks = [check("beta", beta, positive), check("kl", kl, not_nan), check("target", target, positive),
             check("num_steps", num_steps, nonnegative), check("horizon", horizon, positive),
             check("error_clip", error_clip, nonnegative)]
    gain = jnp.asarray(num_steps) / horizon
    # The largest downward step must leave beta positive: 1 - error_clip * gain > 0.
    masks.append(check("error_clip * num_steps / horizon", error_clip * gain, _BELOW_ONE))
    error = jnp.clip(jnp.asarray(kl) / target - 1.0, -error_clip, error_clip)
    return nan_unless(jnp.asarray(beta) * (1.0 + error * gain), *masks)


def lagrangian_kl_coefficient(beta, kl, target, *, learning_rate):
    """Dual ascent on a KL budget: beta <- max(0, beta + learning_rate * (kl - target)).

    The constrained problem ``max_pi E_pi[r]`` subject to ``KL(pi || pi_ref) <= target`` has the
    Lagrangian ``E_pi[r] - beta (KL - target)``; for fixed beta its maximiser is the KL-regularised
    policy ``pi_beta ~ pi_ref exp(r / beta)``, and projected gradient ascent on the dual variable,
    ``beta <- max(0, beta + eta (KL(pi_beta) - target))``, raises beta while the budget is exceeded and
    lowers it (down to 0: the constraint inactive) while it is not. At a fixed point with beta > 0 the
    constraint is tight, ``KL = target``, unlike the PPO and proportional controllers, which have no
    integral action and settle where their multiplicative steps balance. This is the integral (I) term
    of Stooke et al.'s PID Lagrangian; with the measured KL noisy, a small ``learning_rate`` averages.

    Args:
        beta: the current coefficient (multiplier), >= 0.
        kl: the measured KL(pi || pi_ref) of the current policy (not NaN).
        target: the KL budget (> 0).
        learning_rate: the dual step size (> 0), in units of beta per nat of excess KL.

    Returns:
        The next coefficient (>= 0). An argument outside its range raises ``ValueError`` naming it
        when concrete, and gives NaN under ``jit``.

    Example:
        >>> from kljax.policy import lagrangian_kl_coefficient
        >>> [round(float(lagrangian_kl_coefficient(0.1, kl, 0.05, learning_rate=1.0)), 4) for kl in (0.0, 0.05, 0.2)]
        [0.05, 0.1, 0.25]

    References:
        A. Stooke, J. Achiam and P. Abbeel, "Responsive Safety in Reinforcement Learning by PID
        Lagrangian Methods", ICML 2020, arXiv:2007.03964, Algorithm 1 (the integral term);
        E. Altman, "Constrained Markov Decision Processes", 1999 (the Lagrangian and its dual);
        S. Boyd and L. Vandenberghe, "Convex Optimization", 2004, Section 5 (dual ascent).
    """
    masks = [check("beta", beta, nonnegative), check("kl", kl, not_nan), check("target", target, positive),
             check("learning_rate", learning_rate, positive)]
    step = jnp.asarray(learning_rate) * (jnp.asarray(kl) - target)
    return nan_unless(jnp.maximum(jnp.asarray(beta) + step, 0), *masks)
