"""KL-regularised fine-tuning of a small transformer LM, scored against the exact reward-KL frontier; distillation.

    python -m experiments.lm_kl_finetune [--quick] [--out results/lm_kl_finetune]
    python -m experiments.lm_kl_finetune --beta 0.3 --seeds 8 --finetune-steps 800

Setting. A causal transformer (``experiments._tiny_lm.TinyLM``: equinox ``Embedding``,
``MultiheadAttention`` with a causal mask, ``LayerNorm``, ``MLP``; an unembedding matrix) over V content
tokens and length L, with V**L small enough to enumerate (default V = 6, L = 5: 7776 sequences). It is
pretrained by maximum likelihood on text from a seeded second-order Markov chain generated on the spot
(nothing downloaded); the pretrained model is pi_ref, a learned model, not the generator. The programmatic
reward is the fraction of steps that count up, ``R(x) = mean_t [x_t = x_{t-1} + 1 mod V]``.

Exact answers by enumeration (float64 over all V**L sequences, from the models' teacher-forced log-probs):
E_pi[R], the sequence-level KL(pi || pi_ref), and the KL-regularised optimum
``pi*_b(x) ∝ pi_ref(x) exp(R(x) / b)`` for every coefficient b, whose (KL, E[R]) pairs trace the
reward-KL frontier (the largest reward at a given KL; Rafailov et al. 2023, eq. 4). Every final policy
is scored by its reward gap at its own KL (frontier reward minus its reward), its KL gap at its own reward
(its KL minus the least KL that reaches that reward on the frontier) and its objective gap
``J*(beta) - J(pi)`` with ``J = E[R] - beta KL`` and ``J*(beta) = beta log E_ref[exp(R / beta)]``.

Fine-tuning. On-policy REINFORCE with a group baseline, as GRPO does (Shao et al. 2024) but without the
division by the group's reward spread (which would rescale the reward against beta and unmatch the arms'
beta): each step samples ``batch_size`` sequences from pi, the advantage is ``R - mean of the others' R``
(leave-one-out, unbiased), loss ``-mean(A * sum_t log pi(x_t | x_<t)) + beta * mean(KL surrogate)``,
Adam with a cosine-decayed step size; pi starts at pi_ref. The arms, all at the same beta, differ in
the KL surrogate (every one from ``kljax.policy`` or ``kljax.lm``):

=====================  ======================================================================  =========
arm                    KL surrogate per sequence                                               gradient
=====================  ======================================================================  =========
``none``               none (beta = 0: the unconstrained reference)                            -
``k1_reward_token``    ``policy.sequence_k1_reward``: per-token k1 in the reward, each token   correct
                       charged the KL to go (PPO-RLHF), leave-one-out baseline per position
``k1_reward_sequence`` ``policy.k1_reward`` of the summed log-probs, leave-one-out baseline     correct
``k3_loss_token``      ``sum_t policy.k3_loss`` (GRPO's per-token k3 loss)                     biased
``k3_loss_is``         ``policy.k3_loss_is`` of the summed log-ratio (importance-corrected k3) correct
``exact_kl``           ``kljax.lm.kl_from_hidden`` at each visited prefix (exact over the      correct
                       vocabulary, from hidden states and unembeddings) plus the prefix score
                       term ``sum_{t>s} KL_t * grad log pi(x_s)`` (Rao-Blackwellised)
``straight_through``   ``sum_t policy.straight_through_loss`` (value k3, gradient k2; verl's   biased
                       "k3+"), per token
=====================  ======================================================================  =========

GRPO's per-token k3 follows a per-token (partial) gradient of the other KL, KL(pi_ref || pi);
the per-token straight-through gradient is the per-token k1 score, which drops the terms of earlier
tokens changing the later prefixes (Tang & Munos 2025). ``k3_loss_is`` is applied to the sequence
log-ratio: on-policy its weight is 1 in value (so a ``max_weight`` cap never binds and none is set) and
its gradient ``K grad log pi(x)`` is the sequence k1's without a baseline; per token it would have the
straight-through arm's gradient exactly (``kljax.policy`` docstring). At pi*,
``R(x) - beta log(pi*(x) / pi_ref(x)) = beta log Z`` for every x, so the sequence k1 in the reward with a
group baseline has a per-sample gradient that vanishes at the optimum; the other correct placements keep
the reward's sampling noise there (the exact-KL arm removes only the KL's). Every seed is a sampling stream;
all arms x seeds are one ``eqx.filter_vmap``-ed, jitted program. Each arm is compared with the
``exact_kl`` arm by Welch's t-test over seeds, Holm-corrected over the arms.

Scales: the default (full) model has width 32 and 2 layers, 8 seeds x 600 steps of 64 sequences; ``--quick``
has width 24 and 1 layer, 5 seeds x 120 steps of 32 sequences (about 26 CPU-seconds, compilation included).

Distillation. A larger model (pi_ref's size, pretrained as above) teaches a smaller one on held-out
generated text (a disjoint draw from the same chain), teacher-forced: per-token forward
KL(teacher || student) (``kljax.lm.kl_from_hidden``), reverse KL(student || teacher) at the same prefixes,
and JSD(beta) (``kljax.lm.jsd_from_hidden``, teacher first, GKD's convention), against plain
cross-entropy on the text (``labels``). Reported: the exact sequence-level KL(teacher || student) and
KL(student || teacher) by enumeration, and the NLL per token on a third, test draw; intervals over
student seeds (initialisation and batch order; one teacher).

References:
    Y. Tang and R. Munos, "On a few pitfalls in KL divergence gradient estimation for RL",
    arXiv:2506.09477, 2025.
    Z. Shao et al., "DeepSeekMath" (GRPO), arXiv:2402.03300, 2024.
    L. Ouyang et al., "Training language models to follow instructions with human feedback", 2022.
    R. Rafailov et al., "Direct Preference Optimization", NeurIPS 2023 (eq. 4: the optimal KL-regularised policy).
    R. Agarwal et al., "On-Policy Distillation of Language Models" (GKD), ICLR 2024, arXiv:2306.13649.
    G. Sheng et al., "HybridFlow" (verl), arXiv:2409.19256, 2024 (the "k3+" straight-through penalty).
"""

from __future__ import annotations

import contextlib
import dataclasses
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _common, _stats
from experiments import _tiny_lm as lm_model
from kljax import lm, policy

TITLE = "KL-regularised fine-tuning of a small transformer LM against the exact reward-KL frontier; LM distillation"
ORDER = 43

# arm -> (kind, description). kind: "reference" (beta = 0), "correct" (expected gradient = grad of the
# sequence KL), "biased" (another expected gradient).
ARMS = {
    "none": ("reference", "no KL (beta = 0)"),
    "k1_reward_token": ("correct", "per-token k1 in the reward, KL to go (PPO-RLHF)"),
    "k1_reward_sequence": ("correct", "sequence k1 in the reward"),
    "k3_loss_token": ("biased", "per-token k3 loss (GRPO)"),
    "k3_loss_is": ("correct", "importance-corrected k3 (sequence)"),
    "exact_kl": ("correct", "exact KL via kljax.lm + prefix score"),
    "straight_through": ("biased", "per-token straight-through k3 value, k2 gradient"),
}
NAMES = tuple(ARMS)
PENALISED = NAMES[1:]
DISTILL_LOSSES = ("labels", "forward_kl", "reverse_kl", "jsd")
SCORES = ("expected_reward", "kl", "objective_gap", "reward_gap", "kl_gap")


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    vocab_size: int = 6
    length: int = 5
    width: int = 32
    num_layers: int = 2
    num_heads: int = 2
    concentration: float = 0.3
    corpus_size: int = 4096
    pretrain_steps: int = 600
    pretrain_batch: int = 128
    pretrain_learning_rate: float = 3e-3
    beta: float = 0.2
    seeds: int = 8
    finetune_steps: int = 600
    batch_size: int = 64
    learning_rate: float = 2e-3
    student_width: int = 8
    student_layers: int = 1
    distill_steps: int = 500
    distill_batch: int = 128
    jsd_beta: float = 0.5
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(width=24, num_layers=1, pretrain_steps=250, seeds=5, finetune_steps=120, batch_size=32,
                   distill_steps=150, distill_batch=64)


# ----------------------------------------------------------------------------------------------
# Reward and the exact frontier
# ----------------------------------------------------------------------------------------------

def counting_up_reward(sequences, vocab_size: int):
    """Fraction of steps t >= 2 with x_t = x_{t-1} + 1 (mod V); works on NumPy and JAX arrays."""
    up = sequences[..., 1:] == (sequences[..., :-1] + 1) % vocab_size
    return up.astype(np.float32).mean(axis=-1)


def _softmax_weights(log_ref: np.ndarray, rewards: np.ndarray, b):
    """pi*_b for each coefficient in ``b`` (array (k,)): rows (k, N), and log Z (k,)."""
    log_w = log_ref[None, :] + rewards[None, :] / np.asarray(b, float)[:, None]
    top = log_w.max(axis=1, keepdims=True)
    log_z = top[:, 0] + np.log(np.exp(log_w - top).sum(axis=1))
    return np.exp(log_w - log_z[:, None]), log_z


def optimum(log_ref: np.ndarray, rewards: np.ndarray, b) -> dict:
    """E[R], KL(pi*_b || pi_ref) and J*(b) = b log Z_b for each coefficient b (arrays)."""
    b = np.atleast_1d(np.asarray(b, float))
    probs, log_z = _softmax_weights(log_ref, rewards, b)
    expected_reward = probs @ rewards
    # log pi*_b - log pi_ref = R / b - log Z_b
    kl = expected_reward / b - log_z
    return {"expected_reward": expected_reward, "kl": np.maximum(kl, 0.0), "objective": b * log_z,
            "probs_sum": probs.sum(axis=1)}


def _bisect_log_b(target, value_of_b, increasing_in_b: bool, iterations: int = 80):
    """For each target, the b in [1e-4, 1e4] (log scale) with value_of_b(b) = target (monotone)."""
    target = np.asarray(target, float)
    low, high = np.full(target.shape, np.log(1e-4)), np.full(target.shape, np.log(1e4))
    for _ in range(iterations):
        middle = 0.5 * (low + high)
        value = value_of_b(np.exp(middle))
        above = value > target
        go_low = above if increasing_in_b else ~above
        high, low = np.where(go_low, middle, high), np.where(go_low, low, middle)
    return np.exp(0.5 * (low + high))


def frontier_gaps(log_ref: np.ndarray, rewards: np.ndarray, expected_reward, kl) -> dict:
    """Reward gap at equal KL and KL gap at equal reward of policies with the given (E[R], KL).

    The frontier r*(k) = E_{pi*_b}[R] where KL(pi*_b || pi_ref) = k is increasing and concave in k; beyond
    the largest frontier KL (b -> 0: pi_ref restricted to the best sequences) it is flat at max R.
    """
    expected_reward, kl = np.asarray(expected_reward, float), np.asarray(kl, float)
    ref_reward = float(np.exp(log_ref) @ rewards)
    kl_limit = float(optimum(log_ref, rewards, 1e-4)["kl"][0])
    reward_limit = float(optimum(log_ref, rewards, 1e-4)["expected_reward"][0])
    b_at_kl = _bisect_log_b(np.minimum(kl, kl_limit), lambda b: optimum(log_ref, rewards, b)["kl"], False)
    frontier_reward = np.where(kl <= 0, ref_reward, optimum(log_ref, rewards, b_at_kl)["expected_reward"])
    frontier_reward = np.where(kl >= kl_limit, reward_limit, frontier_reward)
    b_at_reward = _bisect_log_b(np.clip(expected_reward, ref_reward, reward_limit),
                                lambda b: optimum(log_ref, rewards, b)["expected_reward"], False)
    least_kl = np.where(expected_reward <= ref_reward, 0.0, optimum(log_ref, rewards, b_at_reward)["kl"])
    least_kl = np.where(expected_reward >= reward_limit, kl_limit, least_kl)
    return {"reward_gap": frontier_reward - expected_reward, "kl_gap": kl - least_kl,
            "frontier_reward_at_kl": frontier_reward, "frontier_kl_at_reward": least_kl}


# ----------------------------------------------------------------------------------------------
# Fine-tuning
# ----------------------------------------------------------------------------------------------

def _leave_one_out_mean(x):
    """Mean of the other rows along axis 0 (the group baseline that does not depend on the row's sample)."""
    n = x.shape[0]
    return (jnp.sum(x, axis=0, keepdims=True) - x) / (n - 1)


def _score(log_probs, weight):
    """Zero in value; gradient ``weight * grad log_probs`` (``weight`` held constant)."""
    return jax.lax.stop_gradient(weight) * (log_probs - jax.lax.stop_gradient(log_probs))


def kl_surrogates(model, reference, tokens):
    """Each arm's per-sequence KL surrogate (``PENALISED`` order), shape (arms, B), for sampled ``tokens`` (B, L)."""
    hidden = jax.vmap(model.hidden)(tokens)
    hidden_ref = jax.lax.stop_gradient(jax.vmap(reference.hidden)(tokens))
    unembed_ref = jax.lax.stop_gradient(reference.unembed)

    def pick(h, unembed):
        return jnp.take_along_axis(jax.nn.log_softmax(h @ unembed, axis=-1), tokens[..., None], axis=-1)[..., 0]

    lp, lp_ref = pick(hidden, model.unembed), pick(hidden_ref, unembed_ref)  # (B, L)
    seq_lp, seq_lp_ref = jnp.sum(lp, axis=-1), jnp.sum(lp_ref, axis=-1)
    k1 = jax.lax.stop_gradient(lp - lp_ref)
    k1_to_go = jnp.flip(jnp.cumsum(jnp.flip(k1, axis=-1), axis=-1), axis=-1)
    token_reward = policy.sequence_k1_reward(lp, lp_ref) - jnp.sum(_score(lp, _leave_one_out_mean(k1_to_go)), axis=-1)
    sequence_reward = policy.k1_reward(seq_lp, seq_lp_ref, baseline=_leave_one_out_mean(jnp.sum(k1, axis=-1)))
    # (B, L); one chunk of all tokens and the whole vocabulary: no loops at this size
    exact_per_token = lm.kl_from_hidden(hidden, model.unembed, hidden_ref, unembed_ref,
                                        chunk_size=(tokens.size, model.vocab_size))
    kl_after = jax.lax.stop_gradient(jnp.flip(jnp.cumsum(jnp.flip(exact_per_token, axis=-1), axis=-1), axis=-1)
                                     - exact_per_token)
    exact = jnp.sum(exact_per_token + _score(lp, kl_after - _leave_one_out_mean(kl_after)), axis=-1)
    return jnp.stack([
        token_reward,
        sequence_reward,
        jnp.sum(policy.k3_loss(lp, lp_ref), axis=-1),
        policy.k3_loss_is(seq_lp, seq_lp_ref),
        exact,
        jnp.sum(policy.straight_through_loss(lp, lp_ref, value="k3", gradient="k2"), axis=-1),
    ]), seq_lp, jnp.sum(k1, axis=-1)


def finetune(model, reference, key, coefficients, config: Config):
    """One run: ``finetune_steps`` of REINFORCE with a group baseline + beta * sum_k c_k * surrogate_k.

    ``coefficients`` (len(PENALISED),) is a one-hot row (zeros for ``none``): one program for every arm.
    Returns the final model and per-step records (batch mean reward, batch mean sequence k1) of shape (steps, 2).
    """
    params, static = eqx.partition(model, eqx.is_array)
    optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, config.finetune_steps, 0.1))
    vocab_size, length = config.vocab_size, config.length

    def loss(p, tokens):
        m = eqx.combine(p, static)
        surrogates, seq_lp, k1 = kl_surrogates(m, reference, tokens)
        rewards = counting_up_reward(tokens, vocab_size)
        advantages = rewards - _leave_one_out_mean(rewards)
        objective = -jnp.mean(jax.lax.stop_gradient(advantages) * seq_lp)
        penalty = jnp.sum(coefficients * jnp.mean(surrogates, axis=1))
        return objective + config.beta * penalty, jnp.stack([jnp.mean(rewards), jnp.mean(k1)])

    def step(carry, k):
        p, state = carry
        m = eqx.combine(p, static)
        tokens = jax.vmap(lambda kk: m.sample(kk, length))(jax.random.split(k, config.batch_size))
        grads, record = jax.grad(loss, has_aux=True)(p, tokens)
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), record

    keys = jax.random.split(key, config.finetune_steps)
    (params, _), records = jax.lax.scan(step, (params, optimizer.init(params)), keys)
    return eqx.combine(params, static), records


@eqx.filter_jit
def _finetune_all(reference, keys, coefficients, config: Config):
    """Every (arm, seed) run from pi_ref, vmapped; returns the final sequence log-probs and the records."""
    def one(key, c):
        model, records = finetune(reference, reference, key, c, config)
        return lm_model.enumerate_log_probs(model, config.vocab_size, config.length), records

    return eqx.filter_vmap(one)(keys, coefficients)


# ----------------------------------------------------------------------------------------------
# Distillation
# ----------------------------------------------------------------------------------------------

def distill(student, teacher_unembed, teacher_hidden, data, key, loss_index, config: Config):
    """Minibatch Adam on the held-out text ``data`` with the loss ``DISTILL_LOSSES[loss_index]`` (one-hot mix);
    ``teacher_hidden`` holds the teacher's hidden states on ``data`` (computed once)."""
    params, static = eqx.partition(student, eqx.is_array)
    optimizer = optax.adam(optax.cosine_decay_schedule(config.pretrain_learning_rate, config.distill_steps, 0.05))
    weights = jax.nn.one_hot(loss_index, len(DISTILL_LOSSES), dtype=lm_model.DTYPE)
    chunks = (config.distill_batch * config.length, config.vocab_size)  # one chunk: no loops at this size

    def loss(p, tokens, hidden_t):
        s = eqx.combine(p, static)
        hidden = jax.vmap(s.hidden)(tokens)
        log_probs = jax.nn.log_softmax(hidden @ s.unembed, axis=-1)
        nll = -jnp.mean(jnp.take_along_axis(log_probs, tokens[..., None], axis=-1))
        forward = jnp.mean(lm.kl_from_hidden(hidden_t, teacher_unembed, hidden, s.unembed, chunk_size=chunks))
        reverse = jnp.mean(lm.kl_from_hidden(hidden, s.unembed, hidden_t, teacher_unembed, chunk_size=chunks))
        jsd = jnp.mean(lm.jsd_from_hidden(hidden_t, teacher_unembed, hidden, s.unembed, beta=config.jsd_beta,
                                          chunk_size=chunks))
        return jnp.sum(weights * jnp.stack([nll, forward, reverse, jsd]))

    def step(carry, k):
        p, state = carry
        rows = jax.random.randint(k, (config.distill_batch,), 0, data.shape[0])
        grads = jax.grad(loss)(p, data[rows], teacher_hidden[rows])
        updates, state = optimizer.update(grads, state, p)
        return (optax.apply_updates(p, updates), state), None

    (params, _), _ = jax.lax.scan(step, (params, optimizer.init(params)), jax.random.split(key, config.distill_steps))
    return eqx.combine(params, static)


@eqx.filter_jit
def _distill_all(students, teacher, data, test, keys, loss_indices, config: Config):
    """Every (loss, seed) student, vmapped: enumerated sequence log-probs and test NLL per token; the
    teacher's test NLL per token."""
    teacher_hidden = jax.lax.stop_gradient(jax.vmap(teacher.hidden)(data))
    teacher_unembed = jax.lax.stop_gradient(teacher.unembed)

    def one(student, key, index):
        s = distill(student, teacher_unembed, teacher_hidden, data, key, index, config)
        nll = -jnp.mean(jax.vmap(s.token_log_probs)(test))
        return lm_model.enumerate_log_probs(s, config.vocab_size, config.length), nll

    teacher_nll = -jnp.mean(jax.vmap(teacher.token_log_probs)(test))
    return *eqx.filter_vmap(one)(students, keys, loss_indices), teacher_nll


# ----------------------------------------------------------------------------------------------
# The study
# ----------------------------------------------------------------------------------------------

def _summary(values) -> dict:
    mean, half = _stats.interval(values)
    return {"mean": mean, "ci95": half, "seeds": [float(v) for v in np.asarray(values, float)]}


@contextlib.contextmanager
def _timed(timings: dict, name: str):
    """Records the wall-clock and the process CPU seconds of the block under ``name``."""
    wall, cpu = time.perf_counter(), time.process_time()
    yield
    timings[name] = {"wall": time.perf_counter() - wall, "cpu": time.process_time() - cpu}


def run(config: Config) -> dict:
    """Runs the study; returns the metrics (per-seed values, means and 95% t-intervals)."""
    if config.vocab_size ** config.length > 50_000:
        raise ValueError(f"vocab_size ** length = {config.vocab_size ** config.length} sequences is too many to "
                         "enumerate (at most 50000).")
    if config.seeds < 2 or config.batch_size < 2:
        raise ValueError("seeds and batch_size must be at least 2 (intervals; leave-one-out baselines).")
    V, L = config.vocab_size, config.length
    corpus, tables = lm_model.markov_corpus(config.seed, V, L, config.corpus_size, concentration=config.concentration)
    held_out, _ = lm_model.markov_corpus(config.seed, V, L, config.corpus_size, concentration=config.concentration,
                                         stream=1)
    test, _ = lm_model.markov_corpus(config.seed, V, L, config.corpus_size, concentration=config.concentration,
                                     stream=2)
    sequences = lm_model.all_sequences(V, L)
    rewards = np.asarray(counting_up_reward(sequences, V), float)
    timings = {}
    # PRNG keys from NumPy seed sequences and NumPy initialisations: eager jax.random calls would each
    # compile a threefry kernel, which costs more than these models' training
    pretrain_key = lm_model.keys_for(config.seed, 1, 1)[0]

    with _timed(timings, "pretrain"):
        reference = lm_model.unstack(lm_model.init_models([config.seed], V, L, config.width, config.num_layers,
                                                          config.num_heads))
        reference = eqx.filter_jit(lm_model.pretrain)(
            reference, jnp.asarray(corpus), pretrain_key, steps=config.pretrain_steps,
            batch_size=config.pretrain_batch, learning_rate=config.pretrain_learning_rate)
        log_ref = np.asarray(eqx.filter_jit(lm_model.enumerate_log_probs)(reference, V, L), float)
    log_data = lm_model.markov_log_probs(tables, sequences)
    p_data = np.exp(log_data)

    # the optimum at the training beta and the frontier
    best = optimum(log_ref, rewards, config.beta)
    frontier_b = np.geomspace(1e-3, 1e3, 600)
    frontier = optimum(log_ref, rewards, frontier_b)

    # fine-tuning: arms x seeds, flattened (arm-major)
    coefficients = np.zeros((len(NAMES), len(PENALISED)), np.float32)
    for i, name in enumerate(PENALISED):
        coefficients[i + 1, i] = 1.0
    coefficients = np.repeat(coefficients, config.seeds, axis=0)
    seed_keys = lm_model.keys_for(config.seed, 2, config.seeds)
    keys = jnp.concatenate([seed_keys] * len(NAMES))  # a seed's sampling stream is shared by the arms
    with _timed(timings, "finetune"):
        final_log_probs, records = _finetune_all(reference, keys, jnp.asarray(coefficients), config)
        final_log_probs, records = np.asarray(final_log_probs, float), np.asarray(records, float)
    probs = np.exp(final_log_probs)
    expected_reward = probs @ rewards
    kl = np.sum(probs * (final_log_probs - log_ref[None, :]), axis=1)
    objective = expected_reward - config.beta * kl
    gaps = frontier_gaps(log_ref, rewards, expected_reward, kl)
    per_run = {"expected_reward": expected_reward, "kl": kl, "objective_gap": best["objective"][0] - objective,
               "reward_gap": gaps["reward_gap"], "kl_gap": gaps["kl_gap"],
               "probability_mass": probs.sum(axis=1)}
    arms = {}
    for i, name in enumerate(NAMES):
        rows = slice(i * config.seeds, (i + 1) * config.seeds)
        arms[name] = {"kind": ARMS[name][0], "description": ARMS[name][1],
                      **{key: _summary(values[rows]) for key, values in per_run.items()}}
        arms[name]["curve_reward"] = records[rows, :, 0].mean(axis=0)
        arms[name]["curve_kl_estimate"] = records[rows, :, 1].mean(axis=0)
    exact_seeds = arms["exact_kl"]
    others = [n for n in PENALISED if n != "exact_kl"]
    for key in ("objective_gap", "reward_gap", "kl_gap"):
        p_values = [_stats.welch_p(arms[n][key]["seeds"], exact_seeds[key]["seeds"]) for n in others]
        adjusted = _stats.holm_adjusted(p_values)
        for n, p, q in zip(others, p_values, adjusted):
            arms[n][key]["welch_p_vs_exact"] = p
            arms[n][key]["holm_p_vs_exact"] = float(q)

    # distillation: losses x seeds, flattened (loss-major); the teacher is pi_ref
    with _timed(timings, "distill"):
        # a seed's student initialisation and batch order are shared by the losses
        student_seeds = [config.seed + 1000 + s for s in range(config.seeds)] * len(DISTILL_LOSSES)
        students = lm_model.init_models(student_seeds, V, L, config.student_width, config.student_layers,
                                        config.num_heads, stream=1)
        d_keys = jnp.concatenate([lm_model.keys_for(config.seed, 3, config.seeds)] * len(DISTILL_LOSSES))
        loss_indices = jnp.asarray(np.repeat(np.arange(len(DISTILL_LOSSES)), config.seeds))
        student_log_probs, test_nll, teacher_nll = _distill_all(students, reference, jnp.asarray(held_out),
                                                                jnp.asarray(test), d_keys, loss_indices, config)
        student_log_probs, test_nll = np.asarray(student_log_probs, float), np.asarray(test_nll, float)
        teacher_nll = float(teacher_nll)
    p_teacher = np.exp(log_ref)
    student_probs = np.exp(student_log_probs)
    forward = np.sum(p_teacher[None, :] * (log_ref[None, :] - student_log_probs), axis=1)
    reverse = np.sum(student_probs * (student_log_probs - log_ref[None, :]), axis=1)
    distillation = {}
    for i, name in enumerate(DISTILL_LOSSES):
        rows = slice(i * config.seeds, (i + 1) * config.seeds)
        distillation[name] = {"kl_teacher_student": _summary(forward[rows]),
                              "kl_student_teacher": _summary(reverse[rows]),
                              "test_nll_per_token": _summary(test_nll[rows])}
    for key in ("kl_teacher_student", "kl_student_teacher", "test_nll_per_token"):
        p_values = [_stats.welch_p(distillation[n][key]["seeds"], distillation["forward_kl"][key]["seeds"])
                    for n in DISTILL_LOSSES if n != "forward_kl"]
        for n, p, q in zip([n for n in DISTILL_LOSSES if n != "forward_kl"], p_values,
                           _stats.holm_adjusted(p_values)):
            distillation[n][key]["welch_p_vs_forward_kl"] = p
            distillation[n][key]["holm_p_vs_forward_kl"] = float(q)

    return {
        "config": {**dataclasses.asdict(config), "num_sequences": int(V ** L),
                   "num_parameters": lm_model.num_parameters(reference),
                   "student_parameters": lm_model.num_parameters(students) // (len(DISTILL_LOSSES) * config.seeds),
                   "reward": "fraction of steps with x_t = x_{t-1} + 1 mod V"},
        "reference": {"expected_reward": float(p_teacher @ rewards),
                      "kl_data_model": float(np.sum(p_data * (log_data - log_ref))),
                      "kl_model_data": float(np.sum(p_teacher * (log_ref - log_data))),
                      "test_nll_per_token": teacher_nll,
                      "data_entropy_per_token": float(-np.sum(p_data * log_data) / L),
                      "probability_mass": float(p_teacher.sum()),
                      "max_reward": float(rewards.max()),
                      "mass_on_max_reward": float(p_teacher[rewards == rewards.max()].sum())},
        "optimum": {"beta": config.beta, "objective": float(best["objective"][0]),
                    "expected_reward": float(best["expected_reward"][0]), "kl": float(best["kl"][0]),
                    "probability_mass": float(best["probs_sum"][0])},
        "frontier": {"b": frontier_b, "kl": frontier["kl"], "expected_reward": frontier["expected_reward"]},
        "arms": arms,
        "distillation": distillation,
        "seconds": timings,
    }


def main(argv: list[str] | None = None) -> dict:
    config, args = _common.parse_config(Config, "lm_kl_finetune", __doc__.splitlines()[0], argv)
    metrics = run(config)
    metrics["config"]["quick"] = bool(args.quick)
    with _timed(metrics["seconds"], "figures"):
        _plot_frontier(metrics, args.out)
        _plot_curves(metrics, args.out)
        _plot_distillation(metrics, args.out)
    _common.save_metrics(args.out, metrics)
    return metrics


# ----------------------------------------------------------------------------------------------
# Figures and report
# ----------------------------------------------------------------------------------------------

COLORS = {"none": "black", "k1_reward_token": "tab:green", "k1_reward_sequence": "tab:olive",
          "k3_loss_token": "tab:red", "k3_loss_is": "tab:cyan", "exact_kl": "tab:blue",
          "straight_through": "tab:orange"}


def _plot_frontier(metrics: dict, out_dir) -> None:
    import matplotlib.pyplot as plt

    arms, opt, frontier = metrics["arms"], metrics["optimum"], metrics["frontier"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 5))
    for ax, zoom in zip(axes, (False, True)):
        ax.plot(frontier["kl"], frontier["expected_reward"], color="gray", lw=1.5,
                label="frontier: pi*_b ∝ pi_ref exp(R / b)")
        ax.scatter([0.0], [metrics["reference"]["expected_reward"]], marker="s", color="gray", label="pi_ref")
        ax.scatter([opt["kl"]], [opt["expected_reward"]], marker="*", s=260, facecolors="none", edgecolors="black",
                   zorder=2, label=f"pi* at beta = {opt['beta']:g}")
        for name, arm in arms.items():
            if zoom and name == "none":
                continue
            ax.errorbar(arm["kl"]["mean"], arm["expected_reward"]["mean"], xerr=arm["kl"]["ci95"],
                        yerr=arm["expected_reward"]["ci95"], fmt="o", ms=5, capsize=3, color=COLORS[name],
                        zorder=3, label=f"{name} ({arm['kind']})")
        ax.set_xlabel("sequence KL(pi || pi_ref), exact (nats)")
        ax.set_ylabel("E_pi[R], exact")
    penalised = [arms[n] for n in PENALISED]
    kls = [a["kl"]["mean"] for a in penalised] + [opt["kl"]]
    rws = [a["expected_reward"]["mean"] for a in penalised] + [opt["expected_reward"]]
    span_k, span_r = max(kls) - min(kls) + 0.05, max(rws) - min(rws) + 0.02
    axes[1].set_xlim(min(kls) - 0.3 * span_k, max(kls) + 0.3 * span_k)
    axes[1].set_ylim(min(rws) - 0.3 * span_r, max(rws) + 0.3 * span_r)
    axes[0].set_title("final policies (mean, 95% t interval over seeds)", fontsize=9)
    axes[1].set_title("zoom on the KL-penalised arms", fontsize=9)
    axes[0].legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "frontier")


def _smooth(values, window):
    values = np.asarray(values, float)
    window = max(1, min(window, values.size))
    return np.convolve(values, np.ones(window) / window, mode="valid")


def _plot_curves(metrics: dict, out_dir) -> None:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    window = max(1, len(metrics["arms"]["none"]["curve_reward"]) // 20)
    for name, arm in metrics["arms"].items():
        for ax, key in zip(axes, ("curve_reward", "curve_kl_estimate")):
            values = _smooth(arm[key], window)
            ax.plot(np.arange(values.size) + window, values, color=COLORS[name], lw=1.2, label=name)
    axes[0].axhline(metrics["optimum"]["expected_reward"], color="black", ls=":", label="pi*: E[R]")
    axes[1].axhline(metrics["optimum"]["kl"], color="black", ls=":", label="pi*: KL")
    axes[0].set_ylabel("batch mean reward")
    axes[1].set_ylabel("batch mean sequence k1 (unbiased KL estimate)")
    for ax in axes:
        ax.set_xlabel(f"fine-tuning step (moving average over {window})")
    axes[1].legend(fontsize=7)
    fig.suptitle("Training curves, mean over seeds", fontsize=9)
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "training_curves")


def _plot_distillation(metrics: dict, out_dir) -> None:
    import matplotlib.pyplot as plt

    dist = metrics["distillation"]
    keys = (("kl_teacher_student", "KL(teacher || student), sequences"),
            ("kl_student_teacher", "KL(student || teacher), sequences"),
            ("test_nll_per_token", "test NLL per token"))
    fig, axes = plt.subplots(1, 3, figsize=(13, 3.6))
    x = np.arange(len(DISTILL_LOSSES))
    for ax, (key, label) in zip(axes, keys):
        means = [dist[n][key]["mean"] for n in DISTILL_LOSSES]
        ax.bar(x, means, yerr=[dist[n][key]["ci95"] for n in DISTILL_LOSSES], capsize=4,
               color=["gray", "tab:blue", "tab:red", "tab:purple"])
        ax.set_xticks(x, DISTILL_LOSSES, fontsize=8)
        ax.set_title(label, fontsize=9)
    axes[2].axhline(metrics["reference"]["test_nll_per_token"], color="black", ls=":", label="teacher")
    axes[2].legend(fontsize=7)
    low = min(dist[n]["test_nll_per_token"]["mean"] for n in DISTILL_LOSSES)
    axes[2].set_ylim(bottom=0.9 * min(low, metrics["reference"]["test_nll_per_token"]))
    fig.suptitle("Distillation of the small student, mean and 95% t interval over seeds", fontsize=9)
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "distillation")


def _cell(summary: dict) -> str:
    """``mean ± half-width``: three decimals, or three significant digits below 0.01 (gaps near 0)."""
    mean, half = summary["mean"], summary["ci95"]
    if abs(mean) >= 0.01:
        return f"{mean:.3f} ± {half:.3f}"
    return f"{mean:.3g} ± {half:.2g}"


def _verdict(arm: dict, key: str) -> str:
    q = arm[key]["holm_p_vs_exact"]
    return f"Holm p = {q:.2g}" + (", significant" if q < _stats.SIGNIFICANCE else ", not significant")


def _against_exact(arms: dict, key: str) -> dict[str, list[str]]:
    """Arms whose ``key`` is significantly smaller than, not different from, or larger than the exact arm's."""
    groups = {"smaller": [], "not different": [], "larger": []}
    for name in PENALISED:
        if name == "exact_kl":
            continue
        arm = arms[name][key]
        if arm["holm_p_vs_exact"] >= _stats.SIGNIFICANCE:
            groups["not different"].append(name)
        else:
            groups["smaller" if arm["mean"] < arms["exact_kl"][key]["mean"] else "larger"].append(name)
    return groups


def _names(names) -> str:
    return ", ".join(f"`{n}`" for n in names) if names else "no arm"


def reading(metrics: dict) -> list[str]:
    """The conclusions, computed from the per-seed numbers."""
    arms, opt = metrics["arms"], metrics["optimum"]
    exact = arms["exact_kl"]
    out = [
        f"The exact-KL arm (`kljax.lm` per-token KL at the visited prefixes plus the prefix score term) ends at "
        f"KL {_cell(exact['kl'])} and E[R] {_cell(exact['expected_reward'])}, against pi*'s KL {opt['kl']:.3f} and "
        f"E[R] {opt['expected_reward']:.3f}: objective gap J* - J = {_cell(exact['objective_gap'])} "
        f"({100 * exact['objective_gap']['mean'] / opt['objective']:.1f}% of J*), reward gap at its KL "
        f"{_cell(exact['reward_gap'])}, KL gap at its reward {_cell(exact['kl_gap'])}."]
    groups = _against_exact(arms, "objective_gap")
    out.append(
        f"Objective gap against the exact arm's (Welch, Holm-corrected over the {len(PENALISED) - 1} other arms): "
        f"significantly smaller for {_names(groups['smaller'])}; not significantly different for "
        f"{_names(groups['not different'])}; significantly larger for {_names(groups['larger'])}.")
    correct = [n for n in PENALISED if ARMS[n][0] == "correct"]
    biased = [n for n in PENALISED if ARMS[n][0] == "biased"]

    def span(names, key):
        values = [arms[n][key]["mean"] for n in names]
        return f"{min(values):.4f} to {max(values):.4f}"

    excess = {n: arms[n]["kl"]["mean"] - opt["kl"] for n in PENALISED}
    out.append(
        f"The arms whose expected gradient is that of the sequence KL ({_names(correct)}) end with objective gaps "
        f"{span(correct, 'objective_gap')} and reward gaps at equal KL {span(correct, 'reward_gap')}; they share "
        f"one fixed point, pi*, so their differences are those of gradient variance over "
        f"{metrics['config']['finetune_steps']} sampled steps. The biased placements ({_names(biased)}) end "
        f"with objective gaps {span(biased, 'objective_gap')} and reward gaps {span(biased, 'reward_gap')}; their "
        f"KL exceeds pi*'s by {', '.join(f'{excess[n]:.3f} (`{n}`)' for n in biased)} against at most "
        f"{max(excess[n] for n in correct):.3f} for the correct ones.")
    for name in PENALISED:
        if name == "exact_kl":
            continue
        arm = arms[name]
        out.append(
            f"`{name}` ({arm['kind']}): KL {_cell(arm['kl'])}, E[R] {_cell(arm['expected_reward'])}; objective gap "
            f"{_cell(arm['objective_gap'])} ({_verdict(arm, 'objective_gap')} against exact), reward gap at equal KL "
            f"{_cell(arm['reward_gap'])} ({_verdict(arm, 'reward_gap')}), KL gap at equal reward "
            f"{_cell(arm['kl_gap'])} ({_verdict(arm, 'kl_gap')}).")
    smallest = min(correct, key=lambda n: arms[n]["objective_gap"]["mean"])
    if smallest == "k1_reward_sequence":
        out.append(
            "The smallest gap among the correct arms is the sequence k1 in the reward's: at pi*, "
            "R(x) - beta log(pi*(x) / pi_ref(x)) = beta log Z for every x, so its per-sample advantage "
            "(reward minus beta times the sequence k1, minus the group's mean) vanishes at the optimum and its "
            "gradient noise with it; the exact-KL arm removes the KL's sampling noise but keeps the reward's.")
    grpo, corrected = arms["k3_loss_token"], arms["k3_loss_is"]
    out.append(
        "GRPO's per-token k3 against the importance-corrected k3: " + _stats.compare(
            grpo["objective_gap"]["seeds"], corrected["objective_gap"]["seeds"], "`k3_loss_token`",
            "`k3_loss_is`", "objective gap"))
    none = arms["none"]
    out.append(
        f"Without a KL (beta = 0) the policy reaches E[R] {_cell(none['expected_reward'])} at KL {_cell(none['kl'])}; "
        f"its objective at beta = {opt['beta']:g} falls short by {_cell(none['objective_gap'])}, and its reward gap "
        f"at its own KL is {_cell(none['reward_gap'])}.")
    dist = metrics["distillation"]
    best = {key: min(DISTILL_LOSSES, key=lambda n: dist[n][key]["mean"])
            for key in ("kl_teacher_student", "kl_student_teacher", "test_nll_per_token")}
    out.append(
        f"Distillation: the smallest mean KL(teacher || student) comes with `{best['kl_teacher_student']}`, the "
        f"smallest KL(student || teacher) with `{best['kl_student_teacher']}`, the smallest test NLL with "
        f"`{best['test_nll_per_token']}`. "
        + _stats.compare(dist["reverse_kl"]["kl_teacher_student"]["seeds"],
                         dist["forward_kl"]["kl_teacher_student"]["seeds"], "reverse-KL training",
                         "forward-KL training", "KL(teacher || student)")
        + " " + _stats.compare(dist["reverse_kl"]["kl_student_teacher"]["seeds"],
                               dist["forward_kl"]["kl_student_teacher"]["seeds"], "reverse-KL training",
                               "forward-KL training", "KL(student || teacher)")
        + " " + _stats.compare(dist["jsd"]["kl_teacher_student"]["seeds"],
                               dist["forward_kl"]["kl_teacher_student"]["seeds"], "JSD training",
                               "forward-KL training", "KL(teacher || student)")
        + " " + _stats.compare(dist["labels"]["test_nll_per_token"]["seeds"],
                               dist["forward_kl"]["test_nll_per_token"]["seeds"], "training on the text",
                               "forward-KL distillation", "test NLL per token")
        + " (Welch tests, uncorrected.)")
    return [line[:1].upper() + line[1:] for line in out]


def _count(number: int, noun: str) -> str:
    return f"{number} {noun}" + ("s" if number != 1 else "")


def report(metrics: dict, rel_dir) -> str:
    cfg, ref, opt = metrics["config"], metrics["reference"], metrics["optimum"]
    arms, dist = metrics["arms"], metrics["distillation"]
    header = ["arm", "kind", "E[R]", "KL(π ‖ π_ref)", "J* - J", "reward gap at equal KL",
              "KL gap at equal reward", "Holm p vs exact (J* - J)"]
    rows = [[name, arm["kind"]] + [_cell(arm[k]) for k in SCORES]
            + [f"{arm['objective_gap']['holm_p_vs_exact']:.2g}" if name != "none" and name != "exact_kl" else "-"]
            for name, arm in arms.items()]
    d_header = ["distillation loss", "KL(teacher ‖ student)", "KL(student ‖ teacher)", "test NLL / token"]
    d_rows = [[name] + [_cell(dist[name][k]) for k in ("kl_teacher_student", "kl_student_teacher",
                                                        "test_nll_per_token")] for name in DISTILL_LOSSES]
    return "\n\n".join([
        f"Transformer LM ({cfg['num_parameters']} parameters: width {cfg['width']}, "
        f"{_count(cfg['num_layers'], 'layer')}, {cfg['num_heads']} heads; equinox) over V = {cfg['vocab_size']} "
        f"tokens, L = {cfg['length']} "
        f"({cfg['num_sequences']} sequences, all enumerated), pretrained {cfg['pretrain_steps']} steps on "
        f"second-order Markov text: KL(data || pi_ref) = {ref['kl_data_model']:.3f} nats per sequence. Reward: "
        f"{cfg['reward']}; E_ref[R] = {ref['expected_reward']:.3f}. Fine-tuned {cfg['finetune_steps']} steps "
        f"({cfg['batch_size']} sampled sequences per step, group baseline) with each KL placement at beta = "
        f"{opt['beta']:g}; optimum pi*: J* = {opt['objective']:.4f}, KL = {opt['kl']:.3f}, E[R] = "
        f"{opt['expected_reward']:.3f}. Mean ± 95% t-interval over {cfg['seeds']} seeds; every number below is "
        "exact for the final policy (enumeration); Welch tests against the exact-KL arm, Holm-corrected.",
        _common.markdown_table(header, rows),
        f"![reward-KL frontier with every arm]({rel_dir}/frontier.png)",
        "**Reading** (computed from the per-seed values):\n\n" + "\n".join(f"- {line}" for line in reading(metrics)),
        f"![training curves]({rel_dir}/training_curves.png)",
        f"Distillation: pi_ref ({cfg['num_parameters']} parameters) teaches a student of width "
        f"{cfg['student_width']}, {_count(cfg['student_layers'], 'layer')} ({cfg['student_parameters']} parameters), "
        f"{cfg['distill_steps']} steps on held-out generated text (JSD at beta = {cfg['jsd_beta']:g}); teacher test "
        f"NLL {ref['test_nll_per_token']:.3f} per token (data entropy {ref['data_entropy_per_token']:.3f}).",
        _common.markdown_table(d_header, d_rows),
        f"![distillation]({rel_dir}/distillation.png)",
    ])


if __name__ == "__main__":
    _common.run_main(main)
