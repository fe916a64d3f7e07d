"""PPO on gymnax's Acrobot: the KL penalty's estimator (exact, sampled k1, sampled k3) against clipping.

Every arm trains the same actor-critic on ``gymnax``'s ``Acrobot-v1`` (Sutton 1996; 3 actions, reward -1
per step until the tip swings above the bar, 500-step limit); only the policy loss differs. With three
actions the KL to the old policy is a genuine sum the sampled estimators approximate. Its return is the
(negative) time to swing up, which has no cap that the arms all reach early the way CartPole's 500 is
reached; as the final return of good arms levels off within 2 * 10^5 steps, the main score is the mean
return over training (the area under the learning curve: how fast an arm learns), reported beside
the final return and the KL each arm allows per update.

Policy loss (to minimise) on a minibatch of the old policy's samples a ~ pi_old, ratio = pi / pi_old and
A the normalised GAE advantage (Schulman et al. 2016):

- ``none``: -E[ratio A], several epochs with no constraint at all (the unconstrained baseline);
- ``clip``: -E[min(ratio A, clip(ratio, 1 - eps, 1 + eps) A)], eps = 0.2 (Schulman et al. 2017, eq. 7);
- ``<penalty>, beta``: -E[ratio A] + beta * E[penalty], with the penalty one of ``kljax.policy``'s
  placements of KL(pi || pi_ref), pi_ref = pi_old (eq. 8 with the KL written in the direction the
  placements estimate; KL(pi || pi_old) and KL(pi_old || pi) agree to second order near pi_old):

  ===============  ============================================  =======================================
  penalty          per sample (kljax.policy)                     gradient, expected over a ~ pi_old
  ===============  ============================================  =======================================
  ``exact``        ``exact_kl(logits, logits_old)``: the whole   grad KL(pi || pi_old), exactly, at every
                   action distribution, no sampled action        visited state
  ``k1_reward``    ``k1_reward``: k1 held constant times the     sum_a pi_old k1 grad log pi: the correct
                   score (the "KL in the reward" placement)      one to first order around pi_old
  ``k1_loss``      ``k1_loss``: k1 = log pi - log pi_old         -grad KL(pi_old || pi): with samples of
                   differentiated directly                       pi_old, minimising it *pushes away*
  ``k3_loss``      ``k3_loss``: (rho - 1) - log rho,             E_old[(1 - pi_old / pi) grad log pi]: a
                   rho = pi_old / pi                             proximity penalty (0 only at pi_old)
  ``k3_is``        ``k3_loss_is`` with the behaviour policy      grad KL(pi || pi_old): importance-
                   pi_old                                        corrected, unbiased
  ===============  ============================================  =======================================

- ``adaptive``: the same with beta updated after every iteration by PPO's rule
  (``kljax.policy.adaptive_kl_coefficient``: halve when d < d_targ / 1.5, double when d > 1.5 d_targ),
  d the exact mean KL[pi_old || pi_new] over the iteration's batch, beta kept in [1e-6, 1e6].

After every update the experiment measures, with ``kljax.discrete.kl_logits``, the exact mean
KL[pi_old || pi_new] (and its reverse) over the visited states, so the effect of each estimator on the
constraint is seen directly, and the estimator's own value on the same batch. Truncation at 500 steps
bootstraps from the value of the final observation; termination does not.

All arms and seeds form one ``jax.jit``-compiled program: the training loop is a ``lax.scan`` over
iterations, ``jax.vmap``-ed over (arm, seed); the arm's choices are traced numbers, so one compilation
serves them all. Every arm shares the seeds' initial weights and random streams.

    python -m experiments.ppo_kl --quick --out DIR

References:
    J. Schulman, F. Wolski, P. Dhariwal, A. Radford and O. Klimov, "Proximal Policy Optimization
    Algorithms", arXiv:1707.06347, 2017, eq. 7-8 and Section 4 (adaptive KL coefficient).
    J. Schulman, "Approximating KL divergence", 2020, http://joschu.net/blog/kl-approx.html (k1, k3).
    Y. Tang and R. Munos, "On a few pitfalls in KL divergence gradient estimation for RL",
    arXiv:2506.09477, 2025 (the gradients of the placements).
    J. Schulman et al., "High-Dimensional Continuous Control Using Generalized Advantage
    Estimation", ICLR 2016 (GAE).
    R. S. Sutton, "Generalization in reinforcement learning: successful examples using sparse coarse
    coding", NeurIPS 1996 (Acrobot); R. T. Lange, "gymnax: A JAX-based reinforcement learning
    environment library", 2022, https://github.com/RobertTLange/gymnax.
    B. L. Welch, "The generalization of Student's problem when several different population
    variances are involved", Biometrika 34, 1947; S. Holm, "A simple sequentially rejective multiple
    test procedure", Scand. J. Statist. 6, 1979.
"""

from __future__ import annotations

import dataclasses
import math
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax

from experiments import _common, _models, _stats, _train
from kljax import discrete, plot, policy

TITLE = "PPO on Acrobot: exact vs sampled (k1, k3) KL penalties, adaptive beta, clipping, no constraint"
ORDER = 42

ENV_NAME = "Acrobot-v1"
PENALTIES = ("none", "exact", "k1_reward", "k1_loss", "k3_loss", "k3_is")
ESTIMATOR_ARMS = ("exact", "k1_reward", "k1_loss", "k3_loss", "k3_is")
LEVEL = 0.95
ALPHA = 0.05
BETA_MIN, BETA_MAX = 1e-6, 1e6  # the adaptive beta's range
KL_FLOOR = 1e-12  # logs of a KL floor it here (a collapsed, deterministic policy measures KL = 0)


def make_arms(beta, kl_target, beta_sweep, kl_target_sweep, adaptive_penalties=ESTIMATOR_ARMS):
    """The arms: name -> dict(clip, penalty, beta, adaptive, kl_target); names are unique and ordered.

    Main comparison (``group="main"``): no constraint, clip, each penalty with fixed ``beta``; the
    adaptive rule with each penalty at ``kl_target`` (``group="adaptive"``); the beta sweep (exact KL,
    fixed beta) and the d_targ sweep (exact KL, adaptive) (``group="beta_sweep"`` / ``"kl_target_sweep"``).
    """
    arms = {"none": dict(clip=False, penalty="none", beta=0.0, adaptive=False, kl_target=kl_target, group="main"),
            "clip": dict(clip=True, penalty="none", beta=0.0, adaptive=False, kl_target=kl_target, group="main")}
    for p in ESTIMATOR_ARMS:
        arms[f"{p}, beta={beta:g}"] = dict(clip=False, penalty=p, beta=beta, adaptive=False, kl_target=kl_target,
                                           group="main")
    for p in adaptive_penalties:
        arms[f"{p}, adaptive d_targ={kl_target:g}"] = dict(clip=False, penalty=p, beta=beta, adaptive=True,
                                                           kl_target=kl_target, group="adaptive")
    for b in beta_sweep:
        name = f"exact, beta={b:g}"
        arms.setdefault(name, dict(clip=False, penalty="exact", beta=b, adaptive=False, kl_target=kl_target,
                                   group="beta_sweep"))
    for d in kl_target_sweep:
        name = f"exact, adaptive d_targ={d:g}"
        arms.setdefault(name, dict(clip=False, penalty="exact", beta=beta, adaptive=True, kl_target=d,
                                   group="kl_target_sweep"))
    return arms


# --- actor-critic -----------------------------------------------------------------------------------


def init_layers(rng, sizes, out_scale):
    """(weight (out, in), bias) layers, orthogonal init (gain sqrt 2 hidden, ``out_scale`` last), zero biases.

    Done in NumPy, outside the compiled program: a batched QR (vmapped ``orthogonal`` initialiser)
    inside ``jit`` can deadlock jaxlib's CPU LAPACK kernel on a 2-thread pool.
    """
    layers = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        gain = out_scale if i == len(sizes) - 2 else math.sqrt(2)
        q, r = np.linalg.qr(rng.normal(size=(max(n_in, n_out), min(n_in, n_out))))
        q = q * np.sign(np.diag(r))
        w = q if n_in >= n_out else q.T  # (in, out)
        layers.append((gain * w.T.astype(np.float32), np.zeros(n_out, np.float32)))
    return layers


def init_agents(rngs, obs_dim, num_actions, hidden=64):
    """Actor and critic (tanh ``equinox.nn.MLP``s, two hidden layers of ``hidden``), one per NumPy generator,
    stacked: ``(params, static)`` with ``params = {"actor": ..., "critic": ...}``."""
    params, static = {}, {}
    for name, out_size, out_scale in (("actor", num_actions, 0.01), ("critic", 1, 1.0)):
        per_agent = [init_layers(rng, (obs_dim, hidden, hidden, out_size), out_scale) for rng in rngs]
        stacked = [tuple(np.stack([agent[i][j] for agent in per_agent]) for j in range(2))
                   for i in range(len(per_agent[0]))]
        params[name], static[name] = _models.from_layers(stacked, jnp.tanh)
    return params, static


# --- PPO --------------------------------------------------------------------------------------------


def penalty_terms(logits, logits_old, log_prob, log_prob_old):
    """Every penalty's per-sample surrogate (a dict over ``PENALTIES[1:]``), KL(pi || pi_old) placements."""
    return {
        "exact": policy.exact_kl(logits, logits_old),
        "k1_reward": policy.k1_reward(log_prob, log_prob_old),
        "k1_loss": policy.k1_loss(log_prob, log_prob_old),
        "k3_loss": policy.k3_loss(log_prob, log_prob_old),
        "k3_is": policy.k3_loss_is(log_prob, log_prob_old, log_prob_old),
    }


def make_train(cfg, env, env_params, static):
    """A function (params, key, arm) -> per-iteration statistics, ``arm`` a dict of traced numbers
    (clip flag, penalty index into ``PENALTIES``, beta, adaptive flag, d_targ); ``static`` the networks'
    static part from ``init_agents``."""

    def mlp(params, name, x):
        return _models.apply(params[name], static[name], x)

    num_envs, num_steps = cfg["num_envs"], cfg["num_steps"]
    batch = num_envs * num_steps
    minibatch = batch // cfg["num_minibatches"]
    optimizer = optax.chain(optax.clip_by_global_norm(cfg["max_grad_norm"]),
                            optax.adam(cfg["learning_rate"], eps=1e-5))

    def loss_fn(params, mb, arm, beta):
        logits = mlp(params, "actor", mb["obs"])
        log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), mb["action"][:, None], axis=-1)[:, 0]
        ratio = jnp.exp(log_prob - mb["log_prob"])
        adv = (mb["advantage"] - jnp.mean(mb["advantage"])) / (jnp.std(mb["advantage"]) + 1e-8)
        clipped = jnp.minimum(ratio * adv, jnp.clip(ratio, 1 - cfg["clip_eps"], 1 + cfg["clip_eps"]) * adv)
        surrogate = jnp.where(arm["clip"], jnp.mean(clipped), jnp.mean(ratio * adv))
        terms = penalty_terms(logits, mb["logits"], log_prob, mb["log_prob"])
        penalty = jnp.stack([jnp.zeros((), jnp.float32)] + [jnp.mean(terms[p]) for p in PENALTIES[1:]])[arm["penalty"]]
        value = mlp(params, "critic", mb["obs"])[:, 0]
        value_loss = 0.5 * jnp.mean(jnp.square(value - mb["return"]))
        return -surrogate + beta * penalty + cfg["value_coef"] * value_loss

    def rollout(params, env_state, obs, key, episode_return):
        def step(carry, k):
            env_state, obs, episode_return = carry
            k_act, k_env = jax.random.split(k)
            logits = mlp(params, "actor", obs)
            action = jax.random.categorical(k_act, logits)
            log_prob = jnp.take_along_axis(jax.nn.log_softmax(logits), action[:, None], axis=-1)[:, 0]
            next_obs, env_state, reward, terminated, truncated, info = jax.vmap(
                env.step, in_axes=(0, 0, 0, None))(jax.random.split(k_env, num_envs), env_state, action, env_params)
            done = terminated | truncated
            # truncation bootstraps from the value of the observation the episode ended in
            next_value = mlp(params, "critic", info["final_observation"])[:, 0]
            episode_return = episode_return + reward
            transition = {"obs": obs, "action": action, "log_prob": log_prob, "logits": logits,
                          "value": mlp(params, "critic", obs)[:, 0], "reward": reward, "next_value": next_value,
                          "terminated": terminated, "done": done, "finished": jnp.where(done, episode_return, 0.0)}
            return (env_state, next_obs, jnp.where(done, 0.0, episode_return)), transition

        (env_state, obs, episode_return), traj = jax.lax.scan(step, (env_state, obs, episode_return),
                                                              jax.random.split(key, num_steps))
        return env_state, obs, episode_return, traj

    def gae(traj):
        def back(advantage, t):
            delta = t["reward"] + cfg["gamma"] * (1.0 - t["terminated"]) * t["next_value"] - t["value"]
            advantage = delta + cfg["gamma"] * cfg["gae_lambda"] * (1.0 - t["done"]) * advantage
            return advantage, advantage

        fields = {k: traj[k].astype(jnp.float32) for k in ("reward", "terminated", "next_value", "value", "done")}
        return jax.lax.scan(back, jnp.zeros(num_envs, jnp.float32), fields, reverse=True)[1]

    def iteration(carry, key, arm):
        params, opt_state, env_state, obs, episode_return, beta = carry
        k_roll, k_perm = jax.random.split(key)
        env_state, obs, episode_return, traj = rollout(params, env_state, obs, k_roll, episode_return)
        advantages = gae(traj)
        data = {"obs": traj["obs"], "action": traj["action"], "log_prob": traj["log_prob"],
                "logits": traj["logits"], "advantage": advantages, "return": advantages + traj["value"]}
        data = jax.tree_util.tree_map(lambda x: x.reshape((batch,) + x.shape[2:]), data)

        def epoch(state, k):
            perm = jax.random.permutation(k, batch).reshape(cfg["num_minibatches"], minibatch)
            loss = lambda p, idx: loss_fn(p, _train.index_tree(data, idx), arm, beta)
            return _train.run_steps(loss, optimizer, *state, perm)[0], None

        (params, opt_state), _ = jax.lax.scan(epoch, (params, opt_state),
                                              jax.random.split(k_perm, cfg["num_epochs"]))
        new_logits = mlp(params, "actor", data["obs"])
        new_log_prob = jnp.take_along_axis(jax.nn.log_softmax(new_logits), data["action"][:, None], axis=-1)[:, 0]
        kl_old_new = jnp.mean(discrete.kl_logits(data["logits"], new_logits))  # KL[pi_old || pi_new], eq. 8's d
        kl_new_old = jnp.mean(discrete.kl_logits(new_logits, data["logits"]))
        terms = penalty_terms(new_logits, data["logits"], new_log_prob, data["log_prob"])
        estimate = jnp.stack([jnp.zeros((), jnp.float32)] + [jnp.mean(terms[p]) for p in PENALTIES[1:]])[arm["penalty"]]
        # PPO's rule, kept inside [BETA_MIN, BETA_MAX]: halving 150 times underflows float32 to 0 (then NaN)
        adapted = jnp.clip(policy.adaptive_kl_coefficient(beta, kl_old_new, arm["kl_target"]), BETA_MIN, BETA_MAX)
        new_beta = jnp.where(arm["adaptive"], adapted, beta)
        entropy = jnp.mean(discrete.entropy(jax.nn.softmax(new_logits)))
        stats = {"kl": kl_old_new, "kl_reverse": kl_new_old, "penalty_value": estimate, "beta": beta,
                 "entropy": entropy,
                 "episode_return_sum": jnp.sum(traj["finished"]), "episodes": jnp.sum(traj["done"])}
        return (params, opt_state, env_state, obs, episode_return, new_beta), stats

    def train(params, key, arm):
        k_env, k_loop = jax.random.split(key)
        obs, env_state = jax.vmap(env.reset, in_axes=(0, None))(jax.random.split(k_env, num_envs), env_params)
        carry = (params, optimizer.init(params), env_state, obs, jnp.zeros(num_envs, jnp.float32), arm["beta"])
        _, stats = jax.lax.scan(lambda c, k: iteration(c, k, arm), carry,
                                jax.random.split(k_loop, cfg["num_iterations"]))
        return stats

    return train


def _forward_fill_returns(sums, counts):
    """Mean return of the episodes finished in each iteration; carried forward where none finished."""
    out = np.full(sums.shape, np.nan)
    last = np.full(sums.shape[:-1], np.nan)
    for i in range(sums.shape[-1]):
        has = counts[..., i] > 0
        last = np.where(has, sums[..., i] / np.maximum(counts[..., i], 1), last)
        out[..., i] = last
    return out


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    num_seeds: int = 10  # seeds per arm
    num_iterations: int = 200  # PPO iterations
    num_envs: int = 8  # parallel environments
    num_steps: int = 128  # rollout length per environment and iteration
    num_epochs: int = 4
    num_minibatches: int = 4
    learning_rate: float = 2.5e-3
    beta: float = 1.0  # fixed beta, and adaptive beta's initial value
    kl_target: float = 0.01  # d_targ of the adaptive rule
    beta_sweep: tuple[float, ...] = (0.1, 0.3, 3.0, 10.0)  # fixed betas of the exact-KL sweep (beside beta)
    kl_target_sweep: tuple[float, ...] = (0.003, 0.03)  # d_targ values of the adaptive sweep (beside kl_target)
    clip_eps: float = 0.2
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(num_seeds=2, num_iterations=12)


def run(config: Config) -> dict:
    """Trains every arm and seed as one compiled program; returns the metrics."""
    num_seeds = config.num_seeds
    cfg = {"env": ENV_NAME, "num_envs": config.num_envs, "num_steps": config.num_steps,
           "num_epochs": config.num_epochs, "num_minibatches": config.num_minibatches,
           "learning_rate": config.learning_rate, "num_iterations": config.num_iterations,
           "gamma": 0.99, "gae_lambda": 0.95, "clip_eps": config.clip_eps, "value_coef": 0.5, "max_grad_norm": 0.5,
           "kl_target": config.kl_target, "beta": config.beta}
    if (cfg["num_envs"] * cfg["num_steps"]) % cfg["num_minibatches"]:
        raise ValueError("num_envs * num_steps must be divisible by num_minibatches")
    if num_seeds < 2:
        raise ValueError(f"num_seeds must be at least 2 (intervals and Welch tests need a spread), got {num_seeds}")

    import gymnax

    env, env_params = gymnax.make(ENV_NAME)
    obs_dim = int(np.prod(env.observation_space(env_params).shape))
    num_actions = int(env.num_actions)
    arms = make_arms(config.beta, config.kl_target, config.beta_sweep, config.kl_target_sweep)
    names = list(arms)
    flat = [arms[n] for n in names for _ in range(num_seeds)]
    traced = {"clip": jnp.asarray([a["clip"] for a in flat]),
              "penalty": jnp.asarray([PENALTIES.index(a["penalty"]) for a in flat], jnp.int32),
              "beta": jnp.asarray([a["beta"] for a in flat], jnp.float32),
              "adaptive": jnp.asarray([a["adaptive"] for a in flat]),
              "kl_target": jnp.asarray([a["kl_target"] for a in flat], jnp.float32)}
    # the same seeds (initial weights, environments, sampling) in every arm: common random numbers
    keys = jnp.stack([jax.random.fold_in(jax.random.PRNGKey(config.seed), s) for _ in names for s in range(num_seeds)])
    params, static = init_agents([np.random.default_rng([config.seed, s]) for _ in names for s in range(num_seeds)],
                                 obs_dim, num_actions)

    train = jax.jit(jax.vmap(make_train(cfg, env, env_params, static)))
    with _common.Timer() as timer:
        stats = jax.tree_util.tree_map(np.asarray, train(params, keys, traced))
    shape = (len(names), num_seeds, cfg["num_iterations"])
    stats = {k: v.reshape(shape).astype(float) for k, v in stats.items()}
    returns = _forward_fill_returns(stats["episode_return_sum"], stats["episodes"])
    steps_per_iteration = cfg["num_envs"] * cfg["num_steps"]
    env_steps = (np.arange(cfg["num_iterations"]) + 1) * steps_per_iteration
    tail = max(1, cfg["num_iterations"] // 10)

    results = {}
    for i, name in enumerate(names):
        arm = arms[name]
        band = (arm["kl_target"] / 1.5, arm["kl_target"] * 1.5)
        with warnings.catch_warnings():  # a run with no finished episode yet has a NaN return (no warning)
            warnings.simplefilter("ignore", RuntimeWarning)
            final = np.nanmean(returns[i, :, -tail:], axis=1)  # per seed
            mean_curve = np.nanmean(returns[i], axis=1)  # per seed: area under the learning curve / iterations
        kl = stats["kl"][i]
        m, lo, hi = plot.mean_interval(final, level=LEVEL)
        results[name] = {
            **{k: arm[k] for k in ("group", "clip", "penalty", "beta", "adaptive", "kl_target")},
            "final_return_mean": float(m), "final_return_interval": [float(lo), float(hi)],
            "final_return_per_seed": final,
            "mean_return_per_seed": mean_curve,
            "median_kl_to_old": float(np.median(kl)),
            "mean_kl_to_old": float(np.mean(kl)),
            "max_kl_to_old_per_seed": kl.max(axis=1),
            "median_kl_per_seed": np.median(kl, axis=1),
            "median_penalty_value": float(np.median(stats["penalty_value"][i])),
            "median_kl_reverse": float(np.median(stats["kl_reverse"][i])),
            "final_entropy_per_seed": stats["entropy"][i, :, -1],
            "fraction_in_target_band": float(np.mean((kl >= band[0]) & (kl <= band[1]))),
            "final_beta_per_seed": stats["beta"][i, :, -1],
            "mean_return_interval": [float(v) for v in plot.mean_interval(mean_curve, level=LEVEL)[1:]],
            "per_seed": {"return": returns[i], "kl": kl, "beta": stats["beta"][i], "kl_reverse": stats["kl_reverse"][i],
                         "entropy": stats["entropy"][i],
                         "penalty_value": stats["penalty_value"][i]},
        }
    metrics = {
        "config": {**cfg, "num_seeds": num_seeds, "seed": config.seed,
                   "num_actions": num_actions, "env_steps_per_run": int(env_steps[-1]),
                   "final_window_iterations": tail, "beta_sweep": list(config.beta_sweep),
                   "kl_target_sweep": list(config.kl_target_sweep), "level": LEVEL, "alpha": ALPHA},
        "env_steps": env_steps,
        "arms": results,
        "comparisons": _comparisons(results, config.beta, config.kl_target),
        "seconds": timer.seconds,
        "env_steps_per_second": float(env_steps[-1] * len(names) * num_seeds / timer.seconds),
    }
    return metrics


def main(argv=None) -> dict:
    config, args = _common.parse_config(Config, "ppo_kl", __doc__.splitlines()[0], argv)
    metrics = run(config)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _plot(args.out, metrics)
    return metrics


def _comparisons(results, beta, kl_target):
    """Welch tests of final return and of the per-seed median KL per update; Holm-adjusted per family."""
    exact = f"exact, beta={beta:g}"
    pairs = [("clip", "none"), (exact, "none"), (exact, "clip")]
    pairs += [(f"{p}, beta={beta:g}", exact) for p in ESTIMATOR_ARMS if p != "exact"]
    adaptive_exact = f"exact, adaptive d_targ={kl_target:g}"
    pairs += [(adaptive_exact, exact), (adaptive_exact, "clip")]
    pairs += [(f"{p}, adaptive d_targ={kl_target:g}", adaptive_exact) for p in ESTIMATOR_ARMS if p != "exact"]
    pairs = [(a, b) for a, b in pairs if a in results and b in results]
    rows = []
    for a, b in pairs:
        d_ret, _, p_ret = _stats.welch(results[a]["final_return_per_seed"], results[b]["final_return_per_seed"])
        d_auc, _, p_auc = _stats.welch(results[a]["mean_return_per_seed"], results[b]["mean_return_per_seed"])
        log_kl_a = np.log(np.maximum(np.asarray(results[a]["median_kl_per_seed"], float), KL_FLOOR))
        log_kl_b = np.log(np.maximum(np.asarray(results[b]["median_kl_per_seed"], float), KL_FLOOR))
        d_kl, _, p_kl = _stats.welch(log_kl_a, log_kl_b)
        rows.append({"a": a, "b": b, "return_difference": d_ret, "return_p": p_ret,
                     "mean_return_difference": d_auc, "mean_return_p": p_auc,
                     "kl_ratio": float(np.exp(d_kl)), "kl_p": p_kl})
    for key in ("return_p", "mean_return_p", "kl_p"):
        adjusted = _stats.holm_adjusted([r[key] for r in rows]) if rows else []
        for r, q in zip(rows, adjusted):
            r[key + "_holm"] = float(q)
    return rows


COLORS = {"none": "tab:gray", "clip": "tab:blue", "exact": "black", "k1_reward": "tab:green",
          "k1_loss": "tab:red", "k3_loss": "tab:orange", "k3_is": "tab:purple"}


def _color(arm):
    return COLORS["clip" if arm["clip"] else arm["penalty"]]


def _band(ax, x, values, color, label, linestyle="-"):
    mean, low, high = plot.mean_interval(values, axis=0, level=LEVEL)
    ax.plot(x, mean, color=color, label=label, linestyle=linestyle, linewidth=1.3)
    ax.fill_between(x, low, high, color=color, alpha=0.15, linewidth=0)


def _plot(out_dir, metrics):
    import matplotlib.pyplot as plt

    steps = np.asarray(metrics["env_steps"]) / 1000
    arms = metrics["arms"]
    fig, axes = plt.subplots(2, 3, figsize=(16, 8.5))
    for row, group in enumerate(("main", "adaptive")):
        for name, r in arms.items():
            if r["group"] != group and not (group == "adaptive" and name in ("none", "clip")):
                continue
            c, ls = _color(r), ("--" if r["adaptive"] else "-")
            _band(axes[row, 0], steps, np.asarray(r["per_seed"]["return"], float), c, name, ls)
            _band(axes[row, 1], steps, np.log10(np.maximum(np.asarray(r["per_seed"]["kl"], float), KL_FLOOR)), c,
                  name, ls)
            if r["adaptive"]:
                _band(axes[row, 2], steps, np.log10(np.asarray(r["per_seed"]["beta"], float)), c, name, ls)
        axes[row, 0].set_ylabel("episode return (mean, 95% t band)")
        axes[row, 0].set_ylim(-510, 0)
        axes[row, 1].set_ylabel("log10 KL[pi_old || pi_new] per update")
        axes[row, 0].set_title(f"{group}: return", fontsize=9)
        axes[row, 1].set_title(f"{group}: exact KL to the old policy after each update", fontsize=9)
    d_targ = metrics["config"]["kl_target"]
    axes[1, 1].axhspan(np.log10(d_targ / 1.5), np.log10(d_targ * 1.5), color="gray", alpha=0.2)
    axes[1, 2].set_ylabel("log10 beta (adaptive rule)")
    # the sweeps: final return and KL against beta / d_targ
    ax = axes[0, 2]
    sweep = sorted(((r["beta"], r) for r in arms.values() if r["penalty"] == "exact" and not r["adaptive"]),
                   key=lambda item: item[0])
    betas = np.array([b for b, _ in sweep])
    for values, label, axis, color in (
            ([r["mean_return_per_seed"] for _, r in sweep], "mean return over training", ax, "black"),
            ([np.log10(np.maximum(r["median_kl_per_seed"], KL_FLOOR)) for _, r in sweep],
             "log10 median KL per update", ax.twinx(), "tab:red")):
        mean, low, high = plot.mean_interval(np.asarray(values, float), axis=1, level=LEVEL)
        axis.errorbar(betas, mean, yerr=[mean - low, high - mean], color=color, marker="o", capsize=3, label=label)
        axis.set_ylabel(label, color=color)
    ax.set_xscale("log")
    ax.set_title("exact KL, fixed beta sweep (95% t intervals)", fontsize=9)
    for a in axes.flat:
        if a is not ax:
            a.set_xlabel("environment steps per run (thousands)")
    ax.set_xlabel("beta")
    for a in (axes[0, 0], axes[1, 0], axes[1, 2]):
        a.legend(fontsize=7)
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "ppo_kl")
    fig = plot.method_comparison({n: r["final_return_per_seed"] for n, r in arms.items()},
                                 label=f"final return ({ENV_NAME}, higher is better)", level=LEVEL)
    _common.save_figure(fig, out_dir, "ppo_kl_final_return")
    fig = plot.method_comparison({n: r["mean_return_per_seed"] for n, r in arms.items()},
                                 label=f"mean return over training ({ENV_NAME}, higher is better)", level=LEVEL)
    _common.save_figure(fig, out_dir, "ppo_kl_mean_return")


def _verdict(row, key, alpha):
    return "significant" if row[key + "_holm"] < alpha else "not significant"


def _interval(r, key):
    low, high = r[key + "_interval"]
    return f"{low:.1f} .. {high:.1f}"


def _reading(metrics):
    cfg, arms, rows = metrics["config"], metrics["arms"], metrics["comparisons"]
    alpha = cfg["alpha"]
    exact = f"exact, beta={cfg['beta']:g}"
    learning = {n: float(np.mean(r["mean_return_per_seed"])) for n, r in arms.items()}
    best_final = max(arms, key=lambda n: arms[n]["final_return_mean"])
    best = max(learning, key=learning.get)
    near = [n for n in arms if arms[n]["final_return_interval"][1] >= arms[best_final]["final_return_mean"]]
    lines = [
        f"- Final return: the highest mean is `{best_final}` ({arms[best_final]['final_return_mean']:.1f}, "
        f"{_interval(arms[best_final], 'final_return')}); {len(near)} of {len(arms)} arms have a 95% interval "
        f"reaching it" + (
            f", so at {cfg['env_steps_per_run']} steps the final return does not separate most arms (Gym's "
            "'solved' threshold for Acrobot is -100); the return averaged over training, which also counts how "
            "fast an arm learns, is the main score." if 2 * len(near) > len(arms) else
            f": at {cfg['env_steps_per_run']} steps the final return still separates most arms."),
        f"- Mean return over training: best `{best}` ({learning[best]:.1f}, "
        f"{_interval(arms[best], 'mean_return')}); " + ", ".join(
            f"`{n}` {learning[n]:.1f}" for n in sorted(learning, key=learning.get, reverse=True)) + ".",
    ]
    floor = {n: np.asarray(r["final_return_per_seed"], float) <= -499 for n, r in arms.items()}
    floor = {n: mask for n, mask in floor.items() if mask.any()}
    if floor:
        entropies = np.concatenate([np.asarray(arms[n]["final_entropy_per_seed"], float)[mask]
                                    for n, mask in floor.items()])
        low, high = float(np.nanmin(entropies)), float(np.nanmax(entropies))
        collapsed = int(np.sum(entropies < 0.1 * np.log(3)))
        diverged = int(np.sum(~np.isfinite(entropies)))  # a NaN policy (non-finite logits) has no entropy
        random = entropies.size - collapsed - diverged
        lines.append("- Seeds that end at the floor (final return <= -499): " + ", ".join(
            f"`{n}` {int(mask.sum())}/{cfg['num_seeds']}" for n, mask in floor.items())
            + f"; their finite final policy entropies range from {low:.2g} to {high:.2g} nats (uniform: "
            f"{np.log(3):.3f}): "
            + (f"all {entropies.size} collapsed to a near-deterministic policy that no longer explores."
               if collapsed == entropies.size else
               f"{collapsed} of {entropies.size} collapsed (entropy below a tenth of uniform's)"
               + (f", {diverged} diverged (its policy's entropy is not finite)" if diverged else "")
               + (f", {random} still act near randomly and have not found the swing-up" if random else "") + "."))
    else:
        lines.append("- No seed ends at the floor of -500.")
    lines.append("- Comparisons (Welch tests over seeds, Holm-adjusted within each quantity):")
    for r in rows:
        lines.append(
            f"  - `{r['a']}` vs `{r['b']}`: mean return over training {r['mean_return_difference']:+.1f} "
            f"(p = {r['mean_return_p']:.2g}, Holm {r['mean_return_p_holm']:.2g}: "
            f"{_verdict(r, 'mean_return_p', alpha)}); final return {r['return_difference']:+.1f} "
            f"(p = {r['return_p']:.2g}, Holm {r['return_p_holm']:.2g}: {_verdict(r, 'return_p', alpha)}); "
            + (f"median exact KL per update x{r['kl_ratio']:.3g} (p = {r['kl_p']:.2g}, Holm {r['kl_p_holm']:.2g}: "
               f"{_verdict(r, 'kl_p', alpha)})." if np.isfinite(r["kl_ratio"]) else
               "median exact KL per update: no ratio or test (a diverged seed's KL is not finite)."))
    k1 = arms.get(f"k1_loss, beta={cfg['beta']:g}")
    if k1 is not None and exact in arms:
        lines.append(
            f"- k1 as a loss on the old policy's samples: its value E_old[log pi - log pi_old] = -KL(pi_old || pi) "
            f"(median logged value {k1['median_penalty_value']:.3g}) is minimised by moving away from pi_old; the "
            f"policy's entropy ends at a median {np.median(k1['final_entropy_per_seed']):.3g} nats "
            f"(log 3 = {np.log(3):.3f} for uniform; {np.median(arms[exact]['final_entropy_per_seed']):.3g} with the "
            f"exact penalty), the median KL per update is {k1['median_kl_to_old']:.3g} and the final return "
            f"{k1['final_return_mean']:.1f}"
            + (": a near-deterministic policy no longer explores." if np.median(k1["final_entropy_per_seed"])
               < 0.1 * np.log(3) else "."))
    sampled = [f"{p}, beta={cfg['beta']:g}" for p in ("k1_reward", "k3_loss", "k3_is")]
    sampled = [n for n in sampled if n in arms]
    if sampled and exact in arms:
        lines.append("- Sampled penalties against the exact KL at beta = " + f"{cfg['beta']:g}: median KL per update "
                     + ", ".join(f"`{n.split(',')[0]}` {arms[n]['median_kl_to_old']:.3g}" for n in sampled)
                     + f" vs `exact` {arms[exact]['median_kl_to_old']:.3g} (ratios and their tests above).")
    sweep = sorted((r["beta"], n) for n, r in arms.items() if r["penalty"] == "exact" and not r["adaptive"])
    kls = [arms[n]["median_kl_to_old"] for _, n in sweep]
    monotone = all(x >= y for x, y in zip(kls, kls[1:]))
    lines.append("- Beta sweep (exact KL): median KL per update " + ", ".join(
        f"{arms[n]['median_kl_to_old']:.3g} at beta = {b:g}" for b, n in sweep)
        + (" (falling as beta grows)" if monotone else " (not monotone in beta)") + "; mean return over training "
        + ", ".join(f"{learning[n]:.1f}" for _, n in sweep) + "; final return "
        + ", ".join(f"{arms[n]['final_return_mean']:.1f}" for _, n in sweep) + ".")
    adaptive = [(r["kl_target"], n) for n, r in arms.items() if r["adaptive"] and r["penalty"] == "exact"]
    lines.append("- Adaptive rule (exact KL): " + "; ".join(
        f"d_targ = {d:g}: median KL {arms[n]['median_kl_to_old']:.3g}, "
        f"{100 * arms[n]['fraction_in_target_band']:.0f}% of updates inside [d_targ / 1.5, 1.5 d_targ], final beta "
        f"median {np.nanmedian(arms[n]['final_beta_per_seed']):.3g} (from {cfg['beta']:g}), mean return over "
        f"training {learning[n]:.1f}" for d, n in sorted(adaptive)) + ".")
    return "\n".join(lines)


def _plateau(metrics) -> str:
    """Where the learning curve of the arm with the best final return levels off (computed): the first
    iteration whose 20-iteration running mean of the seed-mean return is within 5 of the final return."""
    cfg, arms = metrics["config"], metrics["arms"]
    best = max(arms, key=lambda n: arms[n]["final_return_mean"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        curve = np.nanmean(np.asarray(arms[best]["per_seed"]["return"], float), axis=0)
    window = cfg["final_window_iterations"]
    running = np.convolve(np.nan_to_num(curve, nan=-500.0), np.ones(window) / window, mode="valid")
    final = arms[best]["final_return_mean"]
    reached = int(np.argmax(running >= final - 5)) + window - 1 if np.any(running >= final - 5) else None
    steps = np.asarray(metrics["env_steps"], float)
    if reached is None:
        return f"the best arm (`{best}`) has not levelled off within 5 of its final return."
    return (f"the best arm's (`{best}`) learning curve levels off at {final:.0f} (within 5) after about "
            f"{steps[reached] / 1000:.0f} thousand of the {steps[-1] / 1000:.0f} thousand steps, so the later "
            "iterations measure where arms settle, and the return averaged over training how fast they get there.")


def _nulls_to_nan(value):
    """metrics.json stores NaN (a diverged seed's entropy or beta) as null: back to NaN, so that the nan-aware
    summaries below leave it out instead of failing on None."""
    if value is None:
        return float("nan")
    if isinstance(value, dict):
        return {k: _nulls_to_nan(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_nulls_to_nan(v) for v in value]
    return value


def report(metrics: dict, rel_dir) -> str:
    metrics = {**_nulls_to_nan(metrics), "config": metrics["config"]}
    cfg, arms = metrics["config"], metrics["arms"]
    rows = [[name, float(np.mean(r["mean_return_per_seed"])), _interval(r, "mean_return"), r["final_return_mean"],
             _interval(r, "final_return"), r["median_kl_to_old"], r["median_penalty_value"],
             float(np.nanmedian(r["final_entropy_per_seed"])),
             r["fraction_in_target_band"] if r["adaptive"] else "-",
             float(np.nanmedian(r["final_beta_per_seed"])) if r["penalty"] != "none" else "-"]
            for name, r in arms.items()]
    table = _common.markdown_table(["arm", "mean return over training", "95% t interval", "final return",
                                    "95% t interval",
                            "median exact KL[old || new] per update", "median penalty value (own estimator)",
                            "final entropy (median)", "fraction of updates in band", "final beta (median)"],
                           rows, float_format="{:.4g}")
    return (
        f"gymnax `{cfg['env']}` ({cfg['num_actions']} actions, reward -1 per step, 500-step limit): chosen because "
        f"its three actions make the KL to the old policy a sum the sampled k1/k3 only estimate, and because its "
        f"return has no fixed maximum like CartPole's 500 (an episode ends at the swing-up); {_plateau(metrics)} "
        f"{cfg['num_seeds']} seeds per arm x {cfg['num_iterations']} iterations x {cfg['num_envs']} envs x "
        f"{cfg['num_steps']} steps ({cfg['env_steps_per_run']} env steps per run), {cfg['num_epochs']} epochs x "
        f"{cfg['num_minibatches']} minibatches, Adam {cfg['learning_rate']:g}; penalties are kljax.policy's "
        f"placements of KL(pi || pi_old) on the old policy's samples. Final return = mean over the last "
        f"{cfg['final_window_iterations']} iterations' finished episodes; mean return over training = the learning "
        f"curve's average; intervals are 95% Student-t over seeds. All {len(arms) * cfg['num_seeds']} runs trained "
        f"in one vmapped, jitted program in {metrics['seconds']:.1f} s ({metrics['env_steps_per_second']:.0f} env "
        f"steps/s including compilation).\n\n{table}\n\nReading (computed from the numbers above):\n\n"
        f"{_reading(metrics)}\n\n"
        f"![PPO learning curves, KL to the old policy, beta]({rel_dir}/ppo_kl.png)\n\n"
        f"![mean return over training per arm]({rel_dir}/ppo_kl_mean_return.png)\n\n"
        f"![final return per arm]({rel_dir}/ppo_kl_final_return.png)\n"
    )


if __name__ == "__main__":
    _common.run_main(main)
