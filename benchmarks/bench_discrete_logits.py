"""Batched KL from logits: kljax vs optax, torch (CPU), NumPy/SciPy and a memory-read floor.

    python -m benchmarks.bench_discrete_logits [--batch 256] [--classes 32768] [--repeats 15]

D(P || Q) for each of ``batch`` rows of ``classes`` float32 logits. Every implementation computes the
same quantity from the same logits (checked against kljax before timing). The floor is a jitted read of
both input arrays (a row sum of each), the least any implementation must do. Times are medians after a
warm-up; compile time of the jitted functions is reported apart. Ratios are to kljax in this run.
"""

from __future__ import annotations

import argparse
import json
import pathlib
import platform

import jax
import jax.numpy as jnp
import numpy as np

from benchmarks._timing import compile_seconds, ratio_table, time_call
from kljax import discrete


def _peers(logits_p_np, logits_q_np, logits_p, logits_q):
    """(name, callable, compile-able jitted fn or None) for every implementation."""
    impls = []

    kljax_fn = jax.jit(discrete.kl_logits)
    impls.append(("kljax (jit)", lambda: kljax_fn(logits_p, logits_q), kljax_fn))

    floor_fn = jax.jit(lambda a, b: jnp.sum(a, axis=-1) + jnp.sum(b, axis=-1))
    impls.append(("floor: jitted read of both inputs", lambda: floor_fn(logits_p, logits_q), floor_fn))

    try:
        import optax

        def optax_kl(a, b):
            log_q = jax.nn.log_softmax(b, axis=-1)
            return optax.losses.kl_divergence(log_q, jax.nn.softmax(a, axis=-1))

        def optax_kl_log(a, b):
            return optax.losses.kl_divergence_with_log_targets(
                jax.nn.log_softmax(b, axis=-1), jax.nn.log_softmax(a, axis=-1))

        optax_fn = jax.jit(optax_kl)
        optax_log_fn = jax.jit(optax_kl_log)
        impls.append(("optax log_softmax + kl_divergence (jit)", lambda: optax_fn(logits_p, logits_q), optax_fn))
        impls.append(("optax kl_divergence_with_log_targets (jit)",
                      lambda: optax_log_fn(logits_p, logits_q), optax_log_fn))
    except ImportError:
        pass

    try:
        import torch
        import torch.nn.functional as F

        tp = torch.from_numpy(logits_p_np)
        tq = torch.from_numpy(logits_q_np)

        def torch_kl():
            with torch.no_grad():
                log_p = F.log_softmax(tp, dim=-1)
                log_q = F.log_softmax(tq, dim=-1)
                return F.kl_div(log_q, log_p, reduction="none", log_target=True).sum(-1).numpy()

        impls.append((f"torch {torch.__version__} CPU log_softmax + kl_div", torch_kl, None))
    except ImportError:
        pass

    from scipy import special

    def scipy_kl():
        log_p = special.log_softmax(logits_p_np, axis=-1)
        log_q = special.log_softmax(logits_q_np, axis=-1)
        return np.sum(np.exp(log_p) * (log_p - log_q), axis=-1)

    impls.append(("NumPy/SciPy log_softmax", scipy_kl, None))
    return impls


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--classes", type=int, default=32768)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--scale", type=float, default=3.0, help="standard deviation of the logits")
    parser.add_argument("--out", type=pathlib.Path, default=pathlib.Path("benchmarks/results"))
    args = parser.parse_args(argv)

    rng = np.random.default_rng(0)
    shape = (args.batch, args.classes)
    logits_p_np = (args.scale * rng.standard_normal(shape)).astype(np.float32)
    logits_q_np = (args.scale * rng.standard_normal(shape)).astype(np.float32)
    logits_p = jax.device_put(logits_p_np)
    logits_q = jax.device_put(logits_q_np)

    impls = _peers(logits_p_np, logits_q_np, logits_p, logits_q)
    # Compile times first, before any call has filled the compilation cache.
    compile_times = {name: compile_seconds(jitted, logits_p, logits_q)
                     for name, _, jitted in impls if jitted is not None}
    reference = np.asarray(impls[0][1]())
    rows = []
    for name, fn, jitted in impls:
        if not name.startswith("floor"):
            np.testing.assert_allclose(np.asarray(fn()), reference, rtol=2e-3, atol=2e-3,
                                       err_msg=f"{name} disagrees with kljax")
        rows.append((name, time_call(fn, repeats=args.repeats, min_seconds=1.0)))

    table = ratio_table(rows, "kljax (jit)")
    header = (f"KL from logits, {args.batch} x {args.classes} float32, {platform.machine()}, "
              f"{jax.devices()[0].device_kind}, jax {jax.__version__}")
    print(header)
    print(table)
    print("compile seconds:", {k: round(v, 3) for k, v in compile_times.items()})
    args.out.mkdir(parents=True, exist_ok=True)
    result = {"header": header, "rows": {n: r for n, r in rows}, "compile_s": compile_times}
    (args.out / "discrete_logits.json").write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
