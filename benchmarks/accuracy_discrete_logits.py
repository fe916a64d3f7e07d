"""Accuracy of KL from logits in float32 in the per-token regime of RL fine-tuning (KL ~ 5e-7).

    python -m benchmarks.accuracy_discrete_logits [--seeds 10] [--classes 32768]

Logits a ~ 3 N(0, 1) and b = a + 1e-3 N(0, 1), both float32; the truth is computed in 30-digit
arithmetic (mpmath) from the same float32 values, so the table shows each implementation's rounding
alone. Peers: optax's `kl_divergence` and `kl_divergence_with_log_targets` on `log_softmax` outputs.
"""

from __future__ import annotations

import argparse

import jax
import mpmath
import numpy as np

from kljax import discrete


def true_kl(a: np.ndarray, b: np.ndarray) -> float:
    with mpmath.workdps(30):
        xs, ys = [mpmath.mpf(float(v)) for v in a], [mpmath.mpf(float(v)) for v in b]
        log_za = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in xs))
        log_zb = mpmath.log(mpmath.fsum(mpmath.exp(v) for v in ys))
        return float(mpmath.fsum(mpmath.exp(x - log_za) * ((x - log_za) - (y - log_zb)) for x, y in zip(xs, ys)))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, default=10)
    parser.add_argument("--classes", type=int, default=32768)
    args = parser.parse_args(argv)
    import optax

    implementations = {
        "kljax `discrete.kl_logits`": jax.jit(discrete.kl_logits),
        "optax `kl_divergence_with_log_targets`": jax.jit(lambda a, b: optax.losses.kl_divergence_with_log_targets(
            jax.nn.log_softmax(b), jax.nn.log_softmax(a))),
        "optax `kl_divergence`": jax.jit(lambda a, b: optax.losses.kl_divergence(jax.nn.log_softmax(b), jax.nn.softmax(a))),
    }
    errors = {name: [] for name in implementations}
    truths = []
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        a = (rng.normal(size=args.classes) * 3).astype(np.float32)
        b = (a + rng.normal(size=args.classes).astype(np.float32) * np.float32(1e-3)).astype(np.float32)
        truth = true_kl(a, b)
        truths.append(truth)
        for name, function in implementations.items():
            errors[name].append(abs(float(function(a, b)) / truth - 1))
    print(f"KL from float32 logits, {args.classes} classes, {args.seeds} seeds, true KL "
          f"{min(truths):.2g}-{max(truths):.2g} nats")
    print("| implementation | median relative error | max relative error |\n|---|---:|---:|")
    for name, values in errors.items():
        print(f"| {name} | {np.median(values):.1e} | {np.max(values):.1e} |")
    return {"truths": truths, "errors": errors}


if __name__ == "__main__":
    main()
