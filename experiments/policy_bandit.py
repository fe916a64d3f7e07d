"""KL placements on a K-armed bandit: which objective does each one actually optimise?

A softmax policy pi = softmax(theta) over K arms with deterministic rewards r is trained to maximise

    J(pi) = E_pi[r] - beta * KL(pi || pi_ref),     maximised by  pi*(a) ∝ pi_ref(a) exp(r(a) / beta),

from *sampled* actions only: each step draws a batch a_1..a_n ~ pi, the reward enters through the
policy gradient -(r(a) - b) log pi(a) (leave-one-out baseline b), and the KL through one of the
placements of ``kljax.policy``:

- ``k1_reward``: KL in the reward (REINFORCE on -beta k1); expected gradient grad KL(pi || pi_ref);
- ``k1_loss``: k1 differentiated; expected gradient 0, so the policy maximises E[r] alone and heads
  for the reward-greedy vertex (its logits diverge, slowly);
- ``k2_loss``: k2 differentiated; expected gradient grad KL(pi || pi_ref);
- ``k3_loss``: k3 differentiated; expected gradient grad KL(pi_ref || pi), so it converges to the
  maximiser of E[r] - beta KL(pi_ref || pi): pi(a) = beta pi_ref(a) / (c - r(a)), c the root of
  sum_a beta pi_ref(a) / (c - r(a)) = 1 (stationarity of the softmax gradient);
- ``k3_loss_is``: k3 weighted by pi / stop_gradient(pi); expected gradient grad KL(pi || pi_ref);
- ``exact_kl``: the exact KL from the logits (no sampling in the KL term), a reference.

Plain SGD on the logits with a Robbins-Monro step size lr_t = lr / (1 + t / decay), many seeds vmapped.
Distances are total variation, 0.5 * sum |p - q|.

    python -m experiments.policy_bandit --rewards 1,0.5,0 --ref-probs 0.2,0.3,0.5 --beta 0.5 --out DIR

References:
    Y. Tang and R. Munos, "On a few pitfalls in KL divergence gradient estimation for RL",
    arXiv:2506.09477, 2025.
    J. Schulman, "Approximating KL divergence", 2020. http://joschu.net/blog/kl-approx.html
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from scipy import optimize

from experiments import _common, _stats
from kljax import policy

TITLE = "KL placements on a bandit: which regularised objective does each one optimise?"
ORDER = 40

PLACEMENTS = ("k1_reward", "k1_loss", "k2_loss", "k3_loss", "k3_loss_is", "exact_kl")

EXPECTED_GRADIENT = {
    "k1_reward": "grad KL(pi || pi_ref)",
    "k1_loss": "0",
    "k2_loss": "grad KL(pi || pi_ref)",
    "k3_loss": "grad KL(pi_ref || pi)",
    "k3_loss_is": "grad KL(pi || pi_ref)",
    "exact_kl": "grad KL(pi || pi_ref) (exact)",
}

FIXED_POINT_NAME = {
    "k1_reward": "optimum",
    "k1_loss": "reward-greedy vertex",
    "k2_loss": "optimum",
    "k3_loss": "argmax E[r] - beta KL(pi_ref || pi)",
    "k3_loss_is": "optimum",
    "exact_kl": "optimum",
}


# --- exact answers --------------------------------------------------------------------------------


def regularised_optimum(rewards, ref_probs, beta):
    """pi*(a) ∝ pi_ref(a) exp(r(a) / beta), the maximiser of E[r] - beta KL(pi || pi_ref)."""
    log_w = np.log(ref_probs) + np.asarray(rewards) / beta
    w = np.exp(log_w - log_w.max())
    return w / w.sum()


def forward_kl_optimum(rewards, ref_probs, beta):
    """The maximiser of E_pi[r] - beta KL(pi_ref || pi): the fixed point of the k3 loss.

    Stationarity of the softmax gradient, pi(a) (r(a) - E_pi r) = beta (pi(a) - pi_ref(a)), gives
    pi(a) = beta pi_ref(a) / (c - r(a)) with c = E_pi r + beta > max r, and sum_a pi(a) = 1 fixes c
    (the sum decreases from +inf to at most 1 on (max r, max r + beta]).
    """
    r, q = np.asarray(rewards, float), np.asarray(ref_probs, float)
    top = r.max()

    def excess(c):
        return np.sum(beta * q / (c - r)) - 1.0

    c = optimize.brentq(excess, top + beta * 1e-12, top + beta, xtol=1e-15, rtol=1e-15)
    pi = beta * q / (c - r)
    return pi / pi.sum()


def greedy_vertex(rewards, ref_probs):
    """The fixed point of reward-only policy gradient from pi_ref: all mass on argmax r.

    Ties keep pi_ref's ratio (the softmax policy gradient moves tied logits equally).
    """
    r, q = np.asarray(rewards, float), np.asarray(ref_probs, float)
    best = np.isclose(r, r.max())
    return np.where(best, q, 0.0) / q[best].sum()


def objective(probs, rewards, ref_probs, beta):
    """E_pi[r] - beta KL(pi || pi_ref) (0 log 0 = 0)."""
    p = np.asarray(probs, float)
    q = np.asarray(ref_probs, float)
    support = p > 0
    kl = float(np.sum(p[support] * np.log(p[support] / q[support])))
    return float(p @ np.asarray(rewards)) - beta * kl, kl


def total_variation(p, q):
    return 0.5 * float(np.sum(np.abs(np.asarray(p) - np.asarray(q))))


# --- training -------------------------------------------------------------------------------------


def _kl_term(name, logits, actions, log_ref):
    """The KL placement's surrogate for a batch of sampled actions (mean over the batch)."""
    if name == "exact_kl":
        return policy.exact_kl(logits, log_ref)
    log_prob, log_prob_ref = jax.nn.log_softmax(logits)[actions], log_ref[actions]
    if name == "k1_reward":
        # With the reward's leave-one-out baseline this is REINFORCE on r - beta k1, which is the same
        # constant for every arm at pi*: the gradient noise vanishes at the optimum.
        k1 = jax.lax.stop_gradient(log_prob - log_prob_ref)
        leave_one_out = (jnp.sum(k1) - k1) / (k1.shape[0] - 1)
        return jnp.mean(policy.k1_reward(log_prob, log_prob_ref, baseline=leave_one_out))
    surrogate = {"k1_loss": policy.k1_loss, "k2_loss": policy.k2_loss, "k3_loss": policy.k3_loss,
                 "k3_loss_is": policy.k3_loss_is}[name]
    return jnp.mean(surrogate(log_prob, log_prob_ref))


def record_steps(num_steps, num_records):
    """Log-spaced step counts 1 .. num_steps at which the logits are recorded (unique integers)."""
    return np.unique(np.round(np.geomspace(1, num_steps, num_records)).astype(int))


def make_trainer(*, rewards, ref_probs, beta, batch_size, learning_rate, decay, recorded_steps):
    """A jitted function keys -> logit trajectories (seeds, placements, records, K) at ``recorded_steps``.

    All placements advance inside one loop (each with its own samples and gradient), so the loop
    overhead is paid once.
    """
    rewards = jnp.asarray(rewards)
    log_ref = jnp.log(jnp.asarray(ref_probs))
    segment_ends = jnp.asarray(recorded_steps)
    segment_starts = jnp.concatenate([jnp.zeros(1, segment_ends.dtype), segment_ends[:-1]])

    def loss(logits, actions, name):
        r = rewards[actions]
        leave_one_out = (jnp.sum(r) - r) / (batch_size - 1)
        log_prob = jax.nn.log_softmax(logits)[actions]
        policy_gradient = -jnp.mean(jax.lax.stop_gradient(r - leave_one_out) * log_prob)
        return policy_gradient + beta * _kl_term(name, logits, actions, log_ref)

    def step(logits, t, key):
        lr = learning_rate / (1.0 + t / decay)
        new = []
        for i, name in enumerate(PLACEMENTS):
            key_i = jax.random.fold_in(jax.random.fold_in(key, t), i)
            actions = jax.random.categorical(key_i, logits[i], shape=(batch_size,))
            new.append(logits[i] - lr * jax.grad(loss)(logits[i], actions, name))
        return jnp.stack(new)

    def run_one(key):
        def record(logits, segment):
            start, stop = segment
            logits = jax.lax.fori_loop(start, stop, lambda t, lg: step(lg, t, key), logits)
            return logits, logits
        start = jnp.broadcast_to(log_ref, (len(PLACEMENTS), log_ref.shape[0]))
        _, trajectory = jax.lax.scan(record, start, (segment_starts, segment_ends))
        return jnp.swapaxes(trajectory, 0, 1)  # (placements, records, K)

    return jax.jit(jax.vmap(run_one))


@dataclasses.dataclass(frozen=True)
class Config:
    """Settings of the study (``quick()``: the CI scale)."""

    rewards: tuple[float, ...] = (1.0, 0.5, 0.0)  # reward of each arm
    ref_probs: tuple[float, ...] = (0.2, 0.3, 0.5)  # pi_ref over the arms
    beta: float = 0.5  # KL coefficient
    num_seeds: int = 128
    num_steps: int = 10000  # SGD steps
    batch_size: int = 64  # sampled actions per step
    learning_rate: float = 2.0  # initial step size on the logits
    decay: float = 200.0  # step size lr / (1 + t / decay)
    num_records: int = 120  # trajectory points kept (log-spaced)
    seed: int = 0

    @classmethod
    def quick(cls) -> "Config":
        return cls(num_seeds=64, num_steps=2000)

    def validate(self) -> None:
        rewards, ref_probs = np.asarray(self.rewards, float), np.asarray(self.ref_probs, float)
        if rewards.shape != ref_probs.shape or rewards.size < 2:
            raise ValueError(f"rewards and ref_probs need the same length >= 2, got {rewards.size} and "
                             f"{ref_probs.size}")
        if np.any(ref_probs <= 0) or not np.isclose(ref_probs.sum(), 1.0):
            raise ValueError(f"ref_probs must be positive and sum to 1, got {ref_probs.tolist()}")
        if self.beta <= 0:
            raise ValueError(f"beta must be > 0, got {self.beta}")
        if self.num_seeds < 2:
            raise ValueError(f"num_seeds must be >= 2 (intervals over seeds), got {self.num_seeds}")


TOLERANCE = 1e-4  # float32 logits: probabilities this close count as equal


def equality_test(final_probs, target) -> float:
    """Family p-value that the seeds' mean final policy equals ``target``: per-arm one-sample t-tests,
    Holm-adjusted over the arms, the smallest adjusted p (1 when every arm's mean is within TOLERANCE)."""
    final_probs, target = np.asarray(final_probs, float), np.asarray(target, float)
    if np.max(np.abs(final_probs.mean(axis=0) - target)) <= TOLERANCE:
        return 1.0
    return float(np.min(_stats.holm_adjusted([_stats.one_sample_p(final_probs[:, a], target[a])
                                              for a in range(target.size)])))


def run(config: Config) -> tuple[dict, dict]:
    """Runs the study; returns ``(metrics, trajectories)``, the latter the per-seed arm probabilities
    (seeds, records, K) of each placement at ``metrics["steps"]``."""
    config.validate()
    rewards = np.asarray(config.rewards, float)
    ref_probs = np.asarray(config.ref_probs, float)
    beta, num_steps = config.beta, config.num_steps
    steps_axis = record_steps(num_steps, config.num_records)

    optimum = regularised_optimum(rewards, ref_probs, beta)
    fixed_points = {
        "optimum": optimum,
        "reward-greedy vertex": greedy_vertex(rewards, ref_probs),
        "argmax E[r] - beta KL(pi_ref || pi)": forward_kl_optimum(rewards, ref_probs, beta),
    }
    optimum_objective, optimum_kl = objective(optimum, rewards, ref_probs, beta)

    keys = jax.random.split(jax.random.PRNGKey(config.seed), config.num_seeds)
    placements, trajectories = {}, {}
    trainer = make_trainer(rewards=rewards, ref_probs=ref_probs, beta=beta, batch_size=config.batch_size,
                           learning_rate=config.learning_rate, decay=config.decay, recorded_steps=steps_axis)
    with _common.Timer() as total:
        all_logits = np.asarray(trainer(keys))  # (seeds, placements, records, K)
        window_start = int(np.searchsorted(steps_axis, 0.8 * num_steps))
        for i, name in enumerate(PLACEMENTS):
            logits = all_logits[:, i]
            probs = np.asarray(jax.nn.softmax(logits, axis=-1))
            trajectories[name] = probs
            mean_path = probs.mean(axis=0)
            final = mean_path[-1]
            fixed_point = fixed_points[FIXED_POINT_NAME[name]]
            obj, kl = objective(final, rewards, ref_probs, beta)
            centred = np.abs(logits - logits.mean(-1, keepdims=True)).max(-1)  # (seeds, records)
            placements[name] = {
                "expected_gradient": EXPECTED_GRADIENT[name],
                "fixed_point_name": FIXED_POINT_NAME[name],
                "fixed_point": fixed_point,
                "final_probs": final,
                # in float64: a float32 std of 128 nearly equal values reads ~1e-7 of round-off
                "final_probs_seed_std": probs[:, -1].astype(np.float64).std(axis=0, ddof=1),
                "final_probs_ci95": [_stats.interval(probs[:, -1, a])[1] for a in range(rewards.size)],
                "distance_to_optimum": total_variation(final, optimum),
                "distance_to_fixed_point": total_variation(final, fixed_point),
                "p_equals_optimum": equality_test(probs[:, -1], optimum),
                "p_equals_fixed_point": equality_test(probs[:, -1], fixed_point),
                "last_window_change": total_variation(final, mean_path[window_start]),
                "objective": obj,
                "objective_gap": optimum_objective - obj,
                "kl": kl,
                "expected_reward": float(final @ rewards),
                "max_abs_logit": float(centred[:, -1].max()),
                "max_abs_logit_window_start": float(centred[:, window_start].max()),
                "p_logits_grow": _stats.one_sided_paired_p(centred[:, -1], centred[:, window_start]),
            }

    metrics = {
        "config": {**dataclasses.asdict(config), "rewards": rewards, "ref_probs": ref_probs,
                   "distance": "total variation", "last_window": "last 20% of steps"},
        "optimum": optimum,
        "optimum_objective": optimum_objective,
        "optimum_kl": optimum_kl,
        "fixed_points": fixed_points,
        "placements": placements,
        "steps": steps_axis,
        "seconds": total.seconds,
    }
    return metrics, trajectories


def main(argv=None) -> dict:
    config, args = _common.parse_config(Config, "policy_bandit", __doc__.splitlines()[0], argv)
    try:
        config.validate()
    except ValueError as err:  # a bad flag: the command line's usual exit
        raise SystemExit(f"policy_bandit: error: {err}") from err
    metrics, trajectories = run(config)
    metrics["config"]["quick"] = bool(args.quick)
    _common.save_metrics(args.out, metrics)
    _plot_trajectories(args.out, metrics["steps"], trajectories, metrics)
    if len(config.rewards) == 3:
        _plot_simplex(args.out, trajectories, metrics)
    return metrics


# --- figures and report ---------------------------------------------------------------------------


def _plot_trajectories(out_dir, steps, trajectories, metrics):
    import matplotlib.pyplot as plt

    optimum = np.asarray(metrics["optimum"])
    k = optimum.size
    colors = plt.cm.tab10(np.arange(k))
    fig, axes = plt.subplots(2, 3, figsize=(13, 7), sharex=True, sharey=True)
    for ax, name in zip(axes.flat, PLACEMENTS):
        probs = trajectories[name]
        fixed = np.asarray(metrics["placements"][name]["fixed_point"])
        for a in range(k):
            lo, mid, hi = np.percentile(probs[:, :, a], [10, 50, 90], axis=0)
            ax.plot(steps, probs[:, :, a].mean(axis=0), color=colors[a], label=f"arm {a}")
            ax.fill_between(steps, lo, hi, color=colors[a], alpha=0.2, linewidth=0)
            ax.axhline(optimum[a], color=colors[a], linestyle="--", linewidth=1)
            if not np.allclose(fixed, optimum):
                ax.axhline(fixed[a], color=colors[a], linestyle=":", linewidth=1.5)
        ax.set_xscale("log")
        ax.set_title(f"{name}: E[grad] = {EXPECTED_GRADIENT[name]}", fontsize=9)
        ax.set_ylim(0, 1)
    for ax in axes[-1]:
        ax.set_xlabel("SGD step")
    for ax in axes[:, 0]:
        ax.set_ylabel("pi(arm)")
    axes.flat[0].legend(loc="upper left", fontsize=8)
    fig.suptitle("Arm probabilities (mean over seeds, 10-90% band); dashed: optimum pi* ∝ pi_ref exp(r/beta); "
                 "dotted: the placement's own fixed point", fontsize=10)
    fig.tight_layout()
    _common.save_figure(fig, out_dir, "arm_probabilities")


def _plot_simplex(out_dir, trajectories, metrics):
    import matplotlib.pyplot as plt

    corners = np.array([[0.0, 0.0], [1.0, 0.0], [0.5, np.sqrt(3) / 2]])

    def xy(p):
        return np.asarray(p) @ corners

    fig, ax = plt.subplots(figsize=(6.5, 6))
    ax.plot(*np.vstack([corners, corners[:1]]).T, color="black", linewidth=0.8)
    for a, c in enumerate(corners):
        ax.annotate(f"arm {a} (r={metrics['config']['rewards'][a]:g})", c, textcoords="offset points",
                    xytext=(0, -14 if c[1] == 0 else 6), ha="center", fontsize=9)
    colors = plt.cm.tab10(np.arange(len(PLACEMENTS)))
    for color, name in zip(colors, PLACEMENTS):
        path = xy(trajectories[name].mean(axis=0))
        start = xy(metrics["config"]["ref_probs"])
        ax.plot(*np.vstack([start, path]).T, color=color, label=name, linewidth=1.5)
        ax.scatter(*path[-1], color=color, s=25, zorder=3)
    ax.scatter(*xy(metrics["config"]["ref_probs"]), marker="s", color="gray", s=50, label="pi_ref (start)")
    ax.scatter(*xy(metrics["optimum"]), marker="*", color="black", s=160, label="optimum pi*", zorder=4)
    ax.scatter(*xy(metrics["fixed_points"]["argmax E[r] - beta KL(pi_ref || pi)"]), marker="X", color="red",
               s=90, label="k3_loss fixed point", zorder=4)
    ax.set_aspect("equal")
    ax.axis("off")
    ax.legend(loc="upper right", fontsize=8)
    ax.set_title("Mean trajectories on the simplex", fontsize=10)
    _common.save_figure(fig, out_dir, "simplex")


def _at(m, point: str) -> str:
    p = m["p_equals_optimum" if point == "optimum" else "p_equals_fixed_point"]
    distance = m["distance_to_optimum" if point == "optimum" else "distance_to_fixed_point"]
    verdict = "not significantly different" if p >= _stats.SIGNIFICANCE else "significantly different"
    return f"TV {distance:.4f}, {verdict} (p = {p:.2g})"


def reading(metrics: dict) -> list[str]:
    """The conclusions, each computed from the per-seed final policies."""
    pl = metrics["placements"]
    equal = {name: m["p_equals_optimum"] >= _stats.SIGNIFICANCE for name, m in pl.items()}
    out = []
    unbiased = ("k1_reward", "k2_loss", "k3_loss_is", "exact_kl")
    at_optimum = [name for name in unbiased if equal[name]]
    away = [name for name in unbiased if not equal[name]]
    out.append(
        "Placements whose expected gradient is grad KL(pi || pi_ref): "
        + "; ".join(f"{name} {_at(pl[name], 'optimum')} from pi*" for name in unbiased) + ". "
        + (f"{', '.join(at_optimum)} {'ends' if len(at_optimum) == 1 else 'end'} at the regularised optimum"
           if at_optimum else "none ends at pi*")
        + (f"; {', '.join(away)} {'does' if len(away) == 1 else 'do'} not reach it in "
           f"{metrics['config']['num_steps']} steps." if away else "."))
    spread = max(pl["k1_reward"]["final_probs_seed_std"])
    out.append(
        f"With KL in the reward the seeds' final policies have a spread (largest per-arm std) of {spread:.1e}"
        + (": every seed lands on pi*, because r - beta k1 is the same for every arm at pi*, so the baselined "
           "gradient has no noise there." if spread < TOLERANCE and equal["k1_reward"] else
           f", against {max(pl['k2_loss']['final_probs_seed_std']):.1e} for k2 as a loss."))
    k3 = pl["k3_loss"]
    out.append(
        f"k3 differentiated as a loss: {_at(k3, 'fixed point')} from the maximiser of E[r] - beta KL(pi_ref || pi), "
        f"{_at(k3, 'optimum')} from pi*"
        + (f": it ends {k3['distance_to_optimum'] / max(k3['distance_to_fixed_point'], 1e-12):.3g} times nearer the "
           "wrong objective's maximiser than pi*." if k3["p_equals_optimum"] < _stats.SIGNIFICANCE
           and k3["distance_to_fixed_point"] < k3["distance_to_optimum"] else "."))
    k1 = pl["k1_loss"]
    growing = k1["p_logits_grow"] < _stats.SIGNIFICANCE
    out.append(
        f"k1 as a loss has zero expected gradient: the policy heads for the reward-greedy vertex "
        f"({_at(k1, 'fixed point')} from it; last-20% change {k1['last_window_change']:.4f}); its largest centred "
        f"|logit| goes from {k1['max_abs_logit_window_start']:.3f} at 80% of the steps to {k1['max_abs_logit']:.3f} "
        "at the end, "
        + (f"a significant rise over the seeds (paired one-sided p = {k1['p_logits_grow']:.2g}): the logits do not "
           "converge." if growing else f"no significant rise (paired one-sided p = {k1['p_logits_grow']:.2g})."))
    return out


def report(metrics: dict, rel_dir) -> str:
    cfg = metrics["config"]

    def fmt(v):
        return "[" + ", ".join(f"{x:.3f}" for x in v) + "]"

    rows = []
    for name, m in metrics["placements"].items():
        rows.append([name, m["expected_gradient"], m["fixed_point_name"],
                     fmt(m["final_probs"]) + f" ± {max(m['final_probs_ci95']):.1g}", m["distance_to_optimum"],
                     m["distance_to_fixed_point"], m["objective_gap"],
                     m["last_window_change"]])
    table = _common.markdown_table(["placement", "E[gradient of KL term]", "fixed point",
                                    "final pi (mean of seeds ± largest 95% half-width)", "TV to optimum",
                                    "TV to fixed point", "objective gap", "last-20% change"],
                                   rows, float_format="{:.4f}")
    simplex = f"\n\n![simplex]({rel_dir}/simplex.png)" if len(metrics["optimum"]) == 3 else ""
    return (
        f"Rewards {fmt(cfg['rewards'])}, pi_ref {fmt(cfg['ref_probs'])}, beta = {cfg['beta']}; "
        f"{cfg['num_seeds']} seeds x {cfg['num_steps']} SGD steps x {cfg['batch_size']} sampled actions, "
        f"step size {cfg['learning_rate']} / (1 + t / {cfg['decay']:g}). "
        f"Optimum pi* = {fmt(metrics['optimum'])} (objective {metrics['optimum_objective']:.4f}, "
        f"KL {metrics['optimum_kl']:.4f}); k3_loss's own fixed point "
        f"{fmt(metrics['fixed_points']['argmax E[r] - beta KL(pi_ref || pi)'])}.\n\n"
        f"{table}\n\n"
        "**Reading** (computed; a policy \"equals\" a point when per-arm t-tests over the seeds, Holm-adjusted "
        f"over the arms, find no difference at p < {_stats.SIGNIFICANCE:g}, or every arm is within {TOLERANCE:g}):\n\n"
        + "\n".join(f"- {line}" for line in reading(metrics)) + "\n\n"
        f"![arm probabilities]({rel_dir}/arm_probabilities.png){simplex}\n"
    )


if __name__ == "__main__":
    _common.run_main(main)
