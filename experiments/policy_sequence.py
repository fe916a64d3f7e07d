"""KL penalties on token sequences: per-token placements vs the sequence-level KL gradient.

An autoregressive *tabular* policy pi(x_t | x_<t) (one row of logits per prefix, so it can represent
any distribution over sequences) generates x = (x_1..x_T) over a vocabulary of V tokens. A sequence
reward R(x) (the fraction of steps that "count up", x_t = x_{t-1} + 1 mod V) is maximised with a
sequence-level penalty,

    J(pi) = E_pi[R] - beta * KL(pi || pi_ref),   KL over whole sequences, maximised by pi* ∝ pi_ref exp(R / beta),

all exact by enumerating the V**T sequences. Each placement is a per-sequence surrogate built from
``kljax.policy``; "token_*" sums a per-token surrogate over positions, "seq_*" applies it to the
summed log-probabilities. Three kinds of result, all exact or enumerated:

- at pi*, the expectation and the per-sample variance of each surrogate's gradient, against the true
  grad KL(pi || pi_ref): per-token penalties give only a *partial* gradient (they ignore that earlier
  tokens change which prefixes are visited), k3 as a loss gives that of the other KL;
- the fixed point of each placement, by training on its exact expected gradient (Adam);
- learning curves from sampled sequences (many seeds vmapped), with the exact J and KL along the way.

The Rao-Blackwellised placements use the exact per-token KL over the vocabulary at each visited
prefix: ``token_exact_kl`` differentiates it directly (partial), ``rb_exact_kl``
(``kljax.policy.sequence_exact_kl``) adds the score term for the prefixes (correct, and the lowest
variance of the unbiased placements).

    python -m experiments.policy_sequence --vocab-size 3 --length 5 --beta 0.1 --out DIR

References:
    Y. Tang and R. Munos, "On a few pitfalls in KL divergence gradient estimation for RL",
    arXiv:2506.09477, 2025 (the sequential pitfall and its fix).
"""

from __future__ import annotations

import dataclasses
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _common, _stats
from kljax import policy

TITLE = "KL penalties on sequences: per-token placements vs the sequence-level gradient"
ORDER = 41

# name -> (kind, description). kind: "correct" (E[grad] = grad KL(pi || pi_ref) over sequences),
# "partial" (drops the prefix score terms), "other" (another objective).
PLACEMENTS = {
    "seq_k1_reward": ("correct", "k1_reward on the summed log-probs (sequence KL in the reward)"),
    "k1_reward_to_go": ("correct", "sequence_k1_reward: each token charged the KL to go"),
    "seq_k2_loss": ("correct", "k2_loss of the summed log-ratio"),
    "seq_k3_loss_is": ("correct", "k3_loss_is of the summed log-ratio"),
    "rb_exact_kl": ("correct", "sequence_exact_kl: exact per-token KL + prefix score term"),
    "token_k1_reward": ("partial", "sum_t k1_reward (each token charged its own k1 only)"),
    "token_k2_loss": ("partial", "sum_t k2_loss"),
    "token_k3_loss_is": ("partial", "sum_t k3_loss_is"),
    "token_exact_kl": ("partial", "sum_t exact_kl at the visited prefixes, differentiated directly"),
    "token_k3_loss": ("other", "sum_t k3_loss (per-token KL(pi_ref || pi) gradient, partial)"),
    "token_k1_loss": ("other", "sum_t k1_loss (zero expected gradient)"),
}
NAMES = tuple(PLACEMENTS)

# Where practice puts the KL (the rows the grid names): PPO-RLHF (Ouyang et al. 2022; TRL's PPO trainer)
# adds a per-token k1 penalty to the per-token reward and, with gamma = lambda = 1, each token's return
# carries the penalties of the tokens after it: the reward-to-go placement. GRPO (Shao et al. 2024,
# DeepSeekMath; TRL's GRPO trainer) adds the per-token k3 estimate, with r = pi_ref / pi, to the loss.
PRACTICE = {"k1_reward_to_go": "PPO-RLHF", "token_k3_loss": "GRPO"}


class Model:
    """Tabular autoregressive policies over V tokens and length T, with exact enumeration.

    Prefixes are numbered by length, then as base-V numbers (first token most significant), so the
    logits table has sum_{t<T} V**t rows.
    """

    def __init__(self, vocab_size, length):
        self.vocab_size, self.length = vocab_size, length
        self.offsets = np.cumsum([0] + [vocab_size ** t for t in range(length)])
        self.num_prefixes = int(self.offsets[-1])
        self.sequences = jnp.asarray(list(itertools.product(range(vocab_size), repeat=length)))

    def rows(self, tokens):
        """Logits-table row of the prefix x_<t at each position t."""
        rows, code = [], jnp.zeros((), tokens.dtype)
        for t in range(self.length):
            rows.append(self.offsets[t] + code)
            code = code * self.vocab_size + tokens[t]
        return jnp.stack(rows)

    def token_log_probs(self, table, tokens):
        """log pi(x_t | x_<t) for t = 1..T, shape (T,)."""
        logits = table[self.rows(tokens)]
        return jnp.take_along_axis(jax.nn.log_softmax(logits), tokens[:, None], axis=-1)[:, 0]

    def sample(self, table, gumbel_noise):
        """One sequence x ~ pi, token by token, from Gumbel noise of shape (T, V) (Gumbel-max trick)."""
        tokens, code = [], jnp.zeros((), jnp.int32)
        for t in range(self.length):
            logits = jax.nn.log_softmax(table[self.offsets[t] + code])
            x = jnp.argmax(logits + gumbel_noise[t]).astype(jnp.int32)
            tokens.append(x)
            code = code * self.vocab_size + x
        return jnp.stack(tokens)

    def sequence_log_probs(self, table):
        """log pi(x) of every sequence, shape (V**T,)."""
        return jax.vmap(lambda x: jnp.sum(self.token_log_probs(table, x)))(self.sequences)

    def table_from_probs(self, probs):
        """The conditional logits table of an arbitrary distribution over the V**T sequences."""
        joint = np.asarray(probs, float).reshape((self.vocab_size,) * self.length)
        rows = []
        for t in range(self.length):
            prefix_and_next = joint.sum(axis=tuple(range(t + 1, self.length))) if t + 1 < self.length else joint
            conditional = prefix_and_next / prefix_and_next.sum(axis=-1, keepdims=True)
            rows.append(np.log(conditional).reshape(-1, self.vocab_size))
        return np.concatenate(rows)


def counting_up_reward(sequences, vocab_size):
    """Fraction of steps t >= 2 with x_t = x_{t-1} + 1 (mod V)."""
    up = sequences[:, 1:] == (sequences[:, :-1] + 1) % vocab_size
    return jnp.mean(up.astype(jnp.float32), axis=1)


def token_quantities(model, table, table_ref, tokens):
    """Everything a placement needs about one sequence: per-position logits and token log-probs."""
    rows = model.rows(tokens)
    logits, logits_ref = table[rows], table_ref[rows]

    def pick(lg):
        return jnp.take_along_axis(jax.nn.log_softmax(lg), tokens[:, None], axis=-1)[:, 0]

    return {"log_probs": pick(logits), "log_probs_ref": pick(logits_ref), "logits": logits,
            "logits_ref": logits_ref, "tokens": tokens}


def _summed(q):
    return jnp.sum(q["log_probs"]), jnp.sum(q["log_probs_ref"])


def _per_token(q):
    return q["log_probs"], q["log_probs_ref"]


# name -> per-sequence KL surrogate of ``token_quantities``; same order as PLACEMENTS.
SURROGATES = {
    "seq_k1_reward": lambda q: policy.k1_reward(*_summed(q)),
    "k1_reward_to_go": lambda q: policy.sequence_k1_reward(*_per_token(q)),
    "seq_k2_loss": lambda q: policy.k2_loss(*_summed(q)),
    "seq_k3_loss_is": lambda q: policy.k3_loss_is(*_summed(q)),
    "rb_exact_kl": lambda q: policy.sequence_exact_kl(q["logits"], q["logits_ref"], q["tokens"]),
    "token_k1_reward": lambda q: jnp.sum(policy.k1_reward(*_per_token(q))),
    "token_k2_loss": lambda q: jnp.sum(policy.k2_loss(*_per_token(q))),
    "token_k3_loss_is": lambda q: jnp.sum(policy.k3_loss_is(*_per_token(q))),
    "token_exact_kl": lambda q: jnp.sum(policy.exact_kl(q["logits"], q["logits_ref"])),
    "token_k3_loss": lambda q: jnp.sum(policy.k3_loss(*_per_token(q))),
    "token_k1_loss": lambda q: jnp.sum(policy.k1_loss(*_per_token(q))),
}
assert tuple(SURROGATES) == NAMES


def batch_loss(model, table, table_ref, tokens, advantages, weights, placement, beta):
    """sum_i weights_i [-advantage_i log pi(x_i) + beta * surrogate(x_i)] for placement index ``placement``.

    ``lax.switch`` on an (unbatched) placement index keeps one copy of the shared code in the program.
    """
    q = jax.vmap(lambda x: token_quantities(model, table, table_ref, x))(tokens)
    branches = [lambda q, fn=fn: jax.vmap(fn)(q) for fn in SURROGATES.values()]
    kl_part = jax.lax.switch(placement, branches, q)
    reward_part = -jax.lax.stop_gradient(advantages) * jnp.sum(q["log_probs"], axis=-1)
    return jnp.sum(weights * (reward_part + beta * kl_part))


def exact_objective(model, table, log_ref_seq, rewards, beta):
    """(J, E[R], KL) of the policy ``table``, by enumeration."""
    log_p = model.sequence_log_probs(table)
    p = jnp.exp(log_p)
    kl = jnp.sum(p * (log_p - log_ref_seq))
    expected_reward = p @ rewards
    return expected_reward - beta * kl, expected_reward, kl


def fixed_point_grid(vocab_size, lengths, betas, *, ref_scale, seed, num_steps, learning_rate):
    """Each placement's fixed point for every (length, beta): the objective gap J* - J and the KL there.

    The fixed point is reached by Adam on the exact expected gradient (enumeration), as in the main
    run; one program per length (beta is an argument, so every beta reuses it).

    Returns:
      dict with "gap" and "kl" arrays of shape (len(lengths), len(betas), len(NAMES)), and the
      optimum's "optimum_kl" of shape (len(lengths), len(betas)).
    """
    gap = np.empty((len(lengths), len(betas), len(NAMES)))
    kl = np.empty_like(gap)
    optimum_kl = np.empty((len(lengths), len(betas)))
    optimizer = optax.adam(optax.cosine_decay_schedule(learning_rate, num_steps, 0.01))
    for i, length in enumerate(lengths):
        model = Model(vocab_size, length)
        rng = np.random.default_rng(seed)
        table_ref = jnp.asarray(rng.normal(size=(model.num_prefixes, vocab_size)) * ref_scale, dtype=jnp.float32)
        rewards = counting_up_reward(model.sequences, vocab_size)
        log_ref_seq = model.sequence_log_probs(table_ref)

        @jax.jit
        def fixed_points(beta, model=model, table_ref=table_ref, rewards=rewards, log_ref_seq=log_ref_seq):
            def expected_grad(table, placement):
                probs = jnp.exp(jax.lax.stop_gradient(model.sequence_log_probs(table)))
                return jax.grad(batch_loss, argnums=1)(model, table, table_ref, model.sequences,
                                                       rewards - probs @ rewards, probs, placement, beta)

            def step(carry, _):
                tables, state = carry
                grads = jax.lax.map(lambda a: expected_grad(*a), (tables, jnp.arange(len(NAMES))))
                updates, state = optimizer.update(grads, state, tables)
                return (optax.apply_updates(tables, updates), state), None

            start = jnp.broadcast_to(table_ref, (len(NAMES),) + table_ref.shape)
            tables = jax.lax.scan(step, (start, optimizer.init(start)), None, length=num_steps)[0][0]
            return jax.vmap(lambda tb: jnp.stack(exact_objective(model, tb, log_ref_seq, rewards, beta)))(tables)

        for j, beta in enumerate(betas):
            log_w = np.asarray(log_ref_seq, float) + np.asarray(rewards, float) / beta
            log_z = np.logaddexp.reduce(log_w)
            optimum_probs = np.exp(log_w - log_z)
            optimum_kl[i, j] = float(np.sum(optimum_probs * (log_w - log_z - np.asarray(log_ref_seq, float))))
            result = np.asarray(fixed_points(jnp.float32(beta)), float)  # (P, 3): J, E[R], KL
            gap[i, j] = beta * log_z - result[:, 0]
            kl[i, j] = result[:, 2]
    return {"gap": gap, "kl": kl, "optimum_kl": optimum_kl}


def gradient_statistics(model, table, table_ref):
    """Per placement: bias of E[grad] against the true grad KL, and tr Cov(grad) per sampled sequence."""
    log_ref_seq = model.sequence_log_probs(table_ref)

    def sequence_kl(tb):
        log_p = model.sequence_log_probs(tb)
        return jnp.sum(jnp.exp(log_p) * (log_p - log_ref_seq))

    @jax.jit
    def moments(table):
        weights = jnp.exp(model.sequence_log_probs(table))

        def per_placement(i):
            def one(x):  # the KL surrogate's gradient for a single sequence
                return jax.grad(lambda tb: batch_loss(model, tb, table_ref, x[None], jnp.zeros(1),
                                                      jnp.ones(1), i, 1.0))(table)
            grads = jax.vmap(one)(model.sequences)
            mean = jnp.tensordot(weights, grads, axes=1)
            second = weights @ jnp.sum(jnp.square(grads), axis=(1, 2))
            return mean, second

        return jax.lax.map(per_placement, jnp.arange(len(NAMES))), jax.grad(sequence_kl)(table)

    (means, seconds), true_grad = moments(table)
    true_norm = jnp.linalg.norm(true_grad)
    stats = {}
    for i, name in enumerate(NAMES):
        mean = means[i]
        stats[name] = {
            "relative_bias": float(jnp.linalg.norm(mean - true_grad) / true_norm),
            "cosine_to_true": float(jnp.sum(mean * true_grad) / (jnp.linalg.norm(mean) * true_norm)),
            "variance": float(seconds[i] - jnp.sum(jnp.square(mean))),
        }
    return stats, float(true_norm)


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    vocab_size: int = 3
    length: int = 5
    beta: float = 0.1  # KL coefficient
    ref_scale: float = 1.0  # std of pi_ref's random logits
    num_seeds: int = 16
    num_steps: int = 3000  # Adam steps
    batch_size: int = 32  # sampled sequences per step
    learning_rate: float = 0.05  # Adam step size (cosine-decayed)
    num_records: int = 40
    grid_lengths: tuple[int, ...] = (2, 3, 4, 5, 6)  # lengths T of the fixed-point grid
    grid_betas: tuple[float, ...] = (0.01, 0.03, 0.1, 0.3, 1.0)  # betas of the fixed-point grid
    grid_steps: int = 2000  # Adam steps per grid fixed point
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(num_seeds=4, num_steps=800, grid_lengths=(2, 3, 4), grid_betas=(0.03, 0.1, 0.3, 1.0),
                   grid_steps=600)


def run(config: Config) -> tuple[dict, dict]:
    """Runs the study; returns ``(metrics, curves)``, the latter the arrays the figures draw."""
    if max(config.vocab_size ** length for length in config.grid_lengths + (config.length,)) > 50_000:
        raise ValueError("V**T must stay enumerable (<= 50000 sequences), in the grid too")
    if config.num_seeds < 2:
        raise ValueError(f"num_seeds must be >= 2 (intervals over seeds), got {config.num_seeds}")
    grid_lengths, grid_betas, grid_steps = list(config.grid_lengths), list(config.grid_betas), config.grid_steps
    num_seeds, num_steps = config.num_seeds, config.num_steps

    model = Model(config.vocab_size, config.length)
    beta = config.beta
    rng = np.random.default_rng(config.seed)
    table_ref = jnp.asarray(rng.normal(size=(model.num_prefixes, config.vocab_size)) * config.ref_scale,
                            dtype=jnp.float32)
    rewards = counting_up_reward(model.sequences, config.vocab_size)
    log_ref_seq = model.sequence_log_probs(table_ref)
    num_placements = len(NAMES)

    # the optimum pi* ∝ pi_ref exp(R / beta), J* = beta log E_ref[exp(R / beta)]
    log_w = np.asarray(log_ref_seq, float) + np.asarray(rewards, float) / beta
    log_z = np.logaddexp.reduce(log_w)
    optimum_probs = np.exp(log_w - log_z)
    table_opt = jnp.asarray(model.table_from_probs(optimum_probs), dtype=jnp.float32)
    optimum = {"objective": beta * log_z,
               "kl": float(np.sum(optimum_probs * (log_w - log_z - np.asarray(log_ref_seq, float)))),
               "expected_reward": float(optimum_probs @ np.asarray(rewards, float))}
    ref_objective = exact_objective(model, table_ref, log_ref_seq, rewards, beta)

    with _common.Timer() as grad_timer:
        grad_stats, true_grad_norm = gradient_statistics(model, table_opt, table_ref)

    # --- training: one program for the exact expected gradient (fixed points) and for sampled batches.
    # A batch of B sequences is represented by its counts over the enumerated sequences, so that both
    # modes evaluate the same loss; run 0 uses weights pi(x) (exact), runs 1.. use counts / B.
    records = max(1, min(config.num_records, num_steps))
    steps_per_record = num_steps // records
    num_steps = steps_per_record * records
    optimizer = optax.adam(optax.cosine_decay_schedule(config.learning_rate, num_steps, 0.01))
    batch = config.batch_size
    num_sequences = model.sequences.shape[0]

    def placement_grad(table, placement, key, exact):
        log_p = jax.lax.stop_gradient(model.sequence_log_probs(table))
        probs = jnp.exp(log_p)
        sampled = jax.random.choice(key, num_sequences, shape=(batch,), p=probs)
        counts = jnp.zeros(num_sequences, probs.dtype).at[sampled].add(1)
        # leave-one-out baseline: a sample at x is compared with the mean reward of the other B - 1
        sampled_advantages = rewards - (counts @ rewards - rewards) / (batch - 1)
        weights = jnp.where(exact, probs, counts / batch)
        advantages = jnp.where(exact, rewards - probs @ rewards, sampled_advantages)
        return jax.grad(batch_loss, argnums=1)(model, table, table_ref, model.sequences, advantages, weights,
                                               placement, beta)

    def objective_of(tables):  # (P, rows, V) -> (P, 3)
        return jax.vmap(lambda tb: jnp.stack(exact_objective(model, tb, log_ref_seq, rewards, beta)))(tables)

    def run(key, exact):
        def step(carry, t):
            tables, state, _ = carry
            keys = jax.random.split(jax.random.fold_in(key, t), num_placements)
            grads = jax.lax.map(lambda a: placement_grad(*a, exact), (tables, jnp.arange(num_placements), keys))
            updates, state = optimizer.update(grads, state, tables)
            return (optax.apply_updates(tables, updates), state, grads), None

        def record(carry, r):
            carry, _ = jax.lax.scan(step, carry, r * steps_per_record + jnp.arange(steps_per_record))
            grad_norms = jnp.sqrt(jnp.sum(jnp.square(carry[2]), axis=(1, 2)))
            return carry, jnp.concatenate([objective_of(carry[0]), grad_norms[:, None]], axis=1)

        start = jnp.broadcast_to(table_ref, (num_placements,) + table_ref.shape)
        carry = (start, optimizer.init(start), jnp.zeros_like(start))
        return jax.lax.scan(record, carry, jnp.arange(records))[1]  # (records, P, 4)

    keys = jax.random.split(jax.random.PRNGKey(config.seed), num_seeds + 1)
    exact_flags = jnp.arange(num_seeds + 1) == 0
    with _common.Timer() as train_timer:
        all_curves = np.asarray(jax.jit(jax.vmap(run))(keys, exact_flags))  # (1 + seeds, records, P, 4)
    if not np.all(np.isfinite(all_curves)):
        raise FloatingPointError("non-finite objective or gradient during training")
    fixed = all_curves[0, -1]  # (P, 4): J, E[R], KL, expected-gradient norm at the end
    curves = all_curves[1:]

    placements = {}
    for i, name in enumerate(NAMES):
        final = curves[:, -1, i]
        placements[name] = {
            "kind": PLACEMENTS[name][0],
            "description": PLACEMENTS[name][1],
            **grad_stats[name],
            "fixed_point_objective": fixed[i, 0],
            "fixed_point_expected_reward": fixed[i, 1],
            "fixed_point_kl": fixed[i, 2],
            "fixed_point_gap": optimum["objective"] - fixed[i, 0],
            "fixed_point_grad_norm": float(fixed[i, 3]),
            "final_objective": float(final[:, 0].mean()),
            "final_objective_std": float(final[:, 0].std()),
            "final_objective_ci95": _stats.interval(final[:, 0])[1],
            "final_objective_seeds": final[:, 0],
            "final_expected_reward": float(final[:, 1].mean()),
            "final_kl": float(final[:, 2].mean()),
            "final_gap": optimum["objective"] - float(final[:, 0].mean()),
            "last_window_change": float(np.abs(curves[:, -1, i, 0].mean()
                                               - curves[:, int(0.8 * records) - 1, i, 0].mean())),
        }

    with _common.Timer() as grid_timer:
        grid = fixed_point_grid(config.vocab_size, grid_lengths, grid_betas, ref_scale=config.ref_scale,
                                seed=config.seed, num_steps=grid_steps, learning_rate=config.learning_rate)

    metrics = {
        "grid": {"lengths": grid_lengths, "betas": grid_betas, "num_steps": grid_steps, "placements": list(NAMES),
                 "practice": PRACTICE, **grid},
        "config": {"vocab_size": config.vocab_size, "length": config.length, "beta": beta,
                   "num_sequences": int(config.vocab_size ** config.length), "num_prefixes": model.num_prefixes,
                   "ref_scale": config.ref_scale, "num_seeds": num_seeds, "num_steps": num_steps,
                   "batch_size": config.batch_size,
                   "learning_rate": config.learning_rate, "seed": config.seed,
                   "reward": "fraction of steps with x_t = x_{t-1} + 1 mod V"},
        "optimum": optimum,
        "reference": {"objective": float(ref_objective[0]), "expected_reward": float(ref_objective[1]),
                      "kl": 0.0},
        "true_kl_grad_norm_at_optimum": true_grad_norm,
        "placements": placements,
        "seconds": {"gradient_statistics": grad_timer.seconds, "training": train_timer.seconds,
                    "grid": grid_timer.seconds},
    }
    steps = (np.arange(records) + 1) * steps_per_record
    return metrics, {"steps": steps, "curves": curves, "exact_curve": all_curves[0],
                     "log_ref_seq": np.asarray(log_ref_seq, float), "rewards": np.asarray(rewards, float)}


def main(argv=None) -> dict:
    config, args = _common.parse_config(Config, "policy_sequence", __doc__.splitlines()[0], argv)
    metrics, arrays = run(config)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _plot_gradients(args.out, metrics)
    _plot_curves(args.out, arrays["steps"], arrays["curves"], arrays["exact_curve"], metrics)
    _plot_frontier(args.out, metrics, arrays["log_ref_seq"], arrays["rewards"])
    _plot_grid(args.out, metrics)
    return metrics


# --- figures and report ---------------------------------------------------------------------------

KIND_COLOR = {"correct": "tab:green", "partial": "tab:orange", "other": "tab:red"}


def _plot_gradients(out_dir, metrics):
    import matplotlib.pyplot as plt

    pl = metrics["placements"]
    names = list(pl)
    colors = [KIND_COLOR[pl[n]["kind"]] for n in names]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    y = np.arange(len(names))
    axes[0].barh(y, [max(pl[n]["relative_bias"], 1e-8) for n in names], color=colors)
    axes[0].set_xscale("log")
    axes[0].set_xlabel("||E[grad] - grad KL|| / ||grad KL||  (at pi*)")
    axes[0].set_title("bias of the expected KL gradient (exact, by enumeration)", fontsize=10)
    axes[1].barh(y, [pl[n]["variance"] for n in names], color=colors)
    axes[1].set_xscale("log")
    axes[1].set_xlabel("tr Cov(grad) per sampled sequence (at pi*)")
    axes[1].set_title("variance of the single-sequence gradient", fontsize=10)
    for ax in axes:
        ax.set_yticks(y)
        ax.set_yticklabels(names, fontsize=8)
        ax.invert_yaxis()
    axes[1].set_yticklabels([])
    handles = [plt.Rectangle((0, 0), 1, 1, color=c) for c in KIND_COLOR.values()]
    axes[0].legend(handles, ["correct", "partial (per-token)", "other objective"], fontsize=8, loc="lower right")
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "gradient_bias_variance")


def _plot_curves(out_dir, steps, curves, exact_curve, metrics):
    import matplotlib.pyplot as plt

    pl = metrics["placements"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    cmap = {"correct": plt.cm.Greens, "partial": plt.cm.Oranges, "other": plt.cm.Reds}
    counts = {k: 0 for k in cmap}
    for i, name in enumerate(pl):
        kind = pl[name]["kind"]
        counts[kind] += 1
        color = cmap[kind](0.35 + 0.13 * counts[kind])
        style = "-" if kind == "correct" else "--"
        for ax, column in zip(axes, (0, 2)):
            values = curves[:, :, i, column]
            ax.plot(steps, values.mean(axis=0), style, color=color, label=name, linewidth=1.3)
            ax.fill_between(steps, np.percentile(values, 10, axis=0), np.percentile(values, 90, axis=0),
                            color=color, alpha=0.15, linewidth=0)
            ax.plot(steps, exact_curve[:, i, column], ":", color=color, linewidth=0.8)
    axes[0].axhline(metrics["optimum"]["objective"], color="black", linestyle=":", label="J* (optimum)")
    axes[1].axhline(metrics["optimum"]["kl"], color="black", linestyle=":", label="KL(pi* || pi_ref)")
    axes[0].set_ylabel("J = E[R] - beta KL (exact)")
    axes[1].set_ylabel("sequence KL(pi || pi_ref) (exact)")
    axes[1].set_yscale("log")
    for ax in axes:
        ax.set_xlabel("training step (sampled sequences)")
    axes[1].legend(fontsize=7, ncol=2)
    fig.suptitle("Sampled training, mean over seeds (10-90% band); dotted: exact expected gradient; "
                 "green: correct, orange: partial, red: other",
                 fontsize=10)
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "learning_curves")


def _plot_frontier(out_dir, metrics, log_ref_seq, rewards):
    import matplotlib.pyplot as plt

    pl, opt = metrics["placements"], metrics["optimum"]
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8), gridspec_kw={"width_ratios": [1, 1.2]})
    names = list(pl)
    y = np.arange(len(names))
    axes[0].barh(y, [max(pl[n]["fixed_point_gap"], 1e-7) for n in names],
                 color=[KIND_COLOR[pl[n]["kind"]] for n in names])
    axes[0].set_xscale("log")
    axes[0].set_yticks(y)
    axes[0].set_yticklabels(names, fontsize=8)
    axes[0].invert_yaxis()
    axes[0].set_xlabel("J* - J at the placement's fixed point")
    axes[0].set_title("objective lost at each fixed point (exact expected-gradient training)", fontsize=10)

    ax = axes[1]
    shown = [n for n in names if pl[n]["fixed_point_kl"] < 2 * opt["kl"]]
    kl_values = [pl[n]["fixed_point_kl"] for n in shown] + [opt["kl"]]
    lo, hi = 0.9 * min(kl_values), 1.1 * max(kl_values)
    kls, ers = [], []
    for b in np.geomspace(0.01, 10, 400):  # the reward-KL frontier: pi*_b for every coefficient b
        log_w = log_ref_seq + rewards / b
        w = np.exp(log_w - np.logaddexp.reduce(log_w))
        kl = float(np.sum(w * (np.log(np.maximum(w, 1e-300)) - log_ref_seq)))
        if lo <= kl <= hi:
            kls.append(kl)
            ers.append(float(w @ rewards))
    ax.plot(kls, ers, color="gray", label="frontier: max E[R] at given KL")
    groups = {}
    for n in shown:  # placements with the same fixed point share one marker and label
        groups.setdefault((round(pl[n]["fixed_point_kl"], 3), round(pl[n]["fixed_point_expected_reward"], 3)),
                          []).append(n)
    for (kl, er), members in groups.items():
        ax.scatter(kl, er, color=KIND_COLOR[pl[members[0]]["kind"]], s=35, zorder=3)
        ax.annotate("\n".join(members), (kl, er), fontsize=7, textcoords="offset points", xytext=(6, -4),
                    va="top")
    ax.scatter(opt["kl"], opt["expected_reward"], marker="*", s=180, color="black", zorder=4,
               label=f"optimum at beta = {metrics['config']['beta']:g}")
    hidden = [n for n in names if n not in shown]
    if hidden:
        ax.set_title("fixed points near the optimum (off the plot: " + ", ".join(
            f"{n} at KL {pl[n]['fixed_point_kl']:.2f}" for n in hidden) + ")", fontsize=9)
    ax.set_xlabel("sequence KL(pi || pi_ref)")
    ax.set_ylabel("E[R]")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "fixed_points")


def _label(name):
    return f"{name} ({PRACTICE[name]})" if name in PRACTICE else name


def _plot_grid(out_dir, metrics):
    import matplotlib.pyplot as plt

    grid = metrics["grid"]
    gap, _ = _excess_gap(metrics)
    betas, lengths = grid["betas"], grid["lengths"]
    shown = [n for n in NAMES if PLACEMENTS[n][0] != "correct" and n != "token_k1_loss"] + ["k1_reward_to_go"]
    fig, axes = plt.subplots(1, len(shown), figsize=(3.1 * len(shown), 3.4), sharey=True, squeeze=False)
    floor = 1e-6
    for ax, name in zip(axes[0], shown):
        i = NAMES.index(name)
        for color, (t, length) in zip(plt.cm.viridis(np.linspace(0, 0.85, len(lengths))), enumerate(lengths)):
            ax.plot(betas, np.maximum(gap[t, :, i], floor), marker="o", color=color, label=f"T = {length}")
        ax.set(xscale="log", yscale="log", xlabel="beta", title=_label(name))
        ax.title.set_fontsize(8)
        ax.title.set_color(KIND_COLOR[PLACEMENTS[name][0]])
    axes[0][0].set_ylabel(f"excess gap over the sequence-level fixed point (floor {floor:g})")
    axes[0][0].legend(fontsize=7)
    fig.suptitle("Fixed points of the per-token placements over a beta x length grid (exact expected gradients)",
                 fontsize=9)
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "placement_grid")


def _excess_gap(metrics):
    """Gap J* - J at each fixed point minus the smallest gap of the sequence-level placements in the same
    cell: the same optimiser budget leaves them all some optimisation error, which this removes."""
    gap = np.asarray(metrics["grid"]["gap"], float)
    correct = [i for i, n in enumerate(NAMES) if PLACEMENTS[n][0] == "correct"]
    return gap - gap[:, :, correct].min(axis=2, keepdims=True), gap[:, :, correct].max()


def _grid_reading(metrics) -> str:
    grid = metrics["grid"]
    excess, floor = _excess_gap(metrics)
    kl, optimum_kl = np.asarray(grid["kl"], float), np.asarray(grid["optimum_kl"], float)
    betas, lengths = grid["betas"], grid["lengths"]
    header = ["placement", "kind"] + [f"T={t}, β={b:g}" for t in (lengths[0], lengths[-1]) for b in betas]
    rows = [[_label(name), PLACEMENTS[name][0]]
            + [excess[t, j, i] for t in (0, len(lengths) - 1) for j in range(len(betas))]
            for i, name in enumerate(NAMES)]
    table = _common.markdown_table(header, rows, float_format="{:.3g}")
    correct = [i for i, n in enumerate(NAMES) if PLACEMENTS[n][0] == "correct"]
    partial = [i for i, n in enumerate(NAMES) if PLACEMENTS[n][0] == "partial"]
    grpo = NAMES.index("token_k3_loss")
    worst_partial = excess[:, :, partial].max(axis=2)  # (T, beta)
    t_worst, b_worst = np.unravel_index(np.argmax(worst_partial), worst_partial.shape)
    by_length = ", ".join(f"{worst_partial[t].max():.3g} (T = {length})" for t, length in enumerate(lengths))
    return (
        f"Objective gap J* - J at each placement's fixed point ({grid['num_steps']} Adam steps on the exact "
        f"expected gradient per cell), minus the smallest gap of the sequence-level placements in the same "
        f"cell (their remaining optimisation error, at most {floor:.2g} here), for T in {lengths} and beta in "
        f"{betas}; the table shows the shortest and the longest T (every cell is in `metrics.json` and the "
        f"figure):\n\n{table}\n\n"
        f"Reading: the sequence-level placements, PPO-RLHF's reward-to-go among them, agree to "
        f"{excess[:, :, correct].max():.2g} in every cell: one fixed point, pi* (the gap to J* they share is the "
        f"optimiser's, at most {floor:.2g}). The per-token "
        f"placements converge elsewhere: their largest excess gap is {worst_partial.max():.3g} at "
        f"T = {lengths[t_worst]}, beta = {betas[b_worst]:g}; by length (largest over beta): {by_length}. "
        f"GRPO's per-token k3 loss follows a partial gradient of the other KL, KL(pi_ref || pi): excess gaps "
        f"from {excess[:, :, grpo].min():.3g} to {excess[:, :, grpo].max():.3g}, and at T = {lengths[-1]}, "
        f"beta = {betas[0]:g} its fixed point has KL(pi || pi_ref) = {kl[-1, 0, grpo]:.3g} against the "
        f"optimum's {optimum_kl[-1, 0]:.3g}."
    )


def _reading(metrics) -> list[str]:
    """The conclusions about the main run, each computed from its numbers."""
    opt, pl = metrics["optimum"], metrics["placements"]
    correct = [n for n, m in pl.items() if m["kind"] == "correct"]
    partial = [n for n, m in pl.items() if m["kind"] == "partial"]
    out = []
    bias = max(pl[n]["relative_bias"] for n in correct)
    gap = max(pl[n]["fixed_point_gap"] for n in correct)
    quietest = min(correct, key=lambda n: pl[n]["variance"])
    out.append(
        f"The sequence-level placements ({', '.join(correct)}) have a relative bias of at most {bias:.2g}"
        + (" (zero up to float32 round-off)" if bias < 1e-3 else "")
        + f"; trained on the exact expected gradient they end within {gap:.2g} of J*. Among them `{quietest}` "
        "has the smallest per-sequence gradient variance ("
        + ", ".join(f"{n} {pl[n]['variance']:.3g}" for n in correct) + ").")
    if partial:
        biases = [pl[n]["relative_bias"] for n in partial]
        shared = max(biases) - min(biases) <= 1e-3 * max(max(biases), 1e-12)
        worst = max(partial, key=lambda n: pl[n]["fixed_point_gap"])
        more_kl = pl[worst]["fixed_point_kl"] > opt["kl"]
        out.append(
            f"The per-token penalties ({', '.join(partial)}) "
            + (f"share one expected gradient that drops the prefix score terms (relative bias {biases[0]:.3g})"
               if shared else f"have relative biases {min(biases):.3g} to {max(biases):.3g}")
            + (f"; so they share one fixed point, at KL {pl[worst]['fixed_point_kl']:.3f} "
               if shared else f"; the worst, `{worst}`, has its fixed point at KL {pl[worst]['fixed_point_kl']:.3f} ")
            + f"({'more' if more_kl else 'less'} than the optimum's {opt['kl']:.3f}) and objective gap "
            f"{pl[worst]['fixed_point_gap']:.4f} to J*.")
    if "token_k1_loss" in pl:
        largest = max(pl, key=lambda n: pl[n]["fixed_point_kl"])
        out.append(
            f"`token_k1_loss` ends at KL {pl['token_k1_loss']['fixed_point_kl']:.3f}"
            + (", the largest of all placements: it does not regularise." if largest == "token_k1_loss"
               else f" (largest: `{largest}` at {pl[largest]['fixed_point_kl']:.3f})."))
    if partial and correct:
        best = max(correct, key=lambda n: pl[n]["final_objective"])
        worst = min(partial, key=lambda n: pl[n]["final_objective"])
        out.append("Sampled runs: " + _stats.compare(
            pl[best]["final_objective_seeds"], pl[worst]["final_objective_seeds"], f"`{best}`", f"`{worst}`",
            "final objective J"))
    return out


def report(metrics: dict, rel_dir) -> str:
    cfg, opt, pl = metrics["config"], metrics["optimum"], metrics["placements"]
    rows = [[n, m["kind"], m["relative_bias"], m["variance"], m["fixed_point_objective"], m["fixed_point_kl"],
             f"{m['final_objective']:.4g} ± {m['final_objective_ci95']:.2g}", m["final_kl"], m["final_gap"]]
            for n, m in pl.items()]
    table = _common.markdown_table(["placement", "kind", "rel. bias of E[grad] at pi*", "grad variance at pi*",
                            "fixed-point J", "fixed-point KL", "sampled final J (95% CI)", "sampled final KL",
                            "gap J* - J"], rows, float_format="{:.4g}")
    return (
        f"V = {cfg['vocab_size']} tokens, length T = {cfg['length']} ({cfg['num_sequences']} sequences, "
        f"{cfg['num_prefixes']} prefix rows), beta = {cfg['beta']}, reward: {cfg['reward']}. Optimum: "
        f"J* = {opt['objective']:.4f}, KL(pi* || pi_ref) = {opt['kl']:.4f}, E[R] = {opt['expected_reward']:.4f} "
        f"(pi_ref: J = {metrics['reference']['objective']:.4f}). {cfg['num_steps']} Adam steps, either on the "
        "exact expected gradient (fixed points) or on sampled batches "
        f"({cfg['num_seeds']} seeds x {cfg['batch_size']} sequences per step).\n\n"
        f"{table}\n\n"
        "**Reading** (computed from the table; sampled runs compared by Welch's t-test over seeds, p < 0.05):\n\n"
        + "\n".join(f"- {line}" for line in _reading(metrics)) + "\n\n"
        f"![gradient bias and variance]({rel_dir}/gradient_bias_variance.png)\n\n"
        f"![learning curves]({rel_dir}/learning_curves.png)\n\n"
        f"![fixed points]({rel_dir}/fixed_points.png)\n\n"
        "### Which placements break where: a beta x length grid\n\n"
        + _grid_reading(metrics) + "\n\n"
        f"![placement grid]({rel_dir}/placement_grid.png)\n"
    )


if __name__ == "__main__":
    _common.run_main(main)
