"""Per-token KL from hidden states: kljax.lm (chunked, custom VJP) against the materialised-logits program.

    python -m benchmarks.bench_lm                       # reduced grid for a small CPU (a few minutes)
    python -m benchmarks.bench_lm --full                # T = 8192, h = 1024, V in {32k, 128k}: a large accelerator
    python -m benchmarks.bench_lm --tokens 1024 --vocab 32000 --dtypes float32 --modes value

Two models' per-token D(P || Q), logits = hidden @ unembed (h = 1024), for ``value`` (the (T,) vector)
and ``grad`` (jax.grad of its sum with respect to both hidden states and both unembeddings). The naive
program materialises both (T, V) logits and uses optax's ``log_softmax`` +
``kl_divergence_with_log_targets`` with ``jax.grad`` through it. Both programs are jitted.

Memory: XLA's compiled ``memory_analysis()`` of each program at the *memory* sizes (``--memory-tokens``,
default 8192, the issue's size): argument + output + temporary bytes (minus aliased bytes), which is the
peak the program can need; it is computed by compiling only (no run), so the full sizes cost nothing on a
small machine. Time: median of ``--repeats`` runs after a warm-up, at ``--tokens`` (default 512 on CPU),
with the compile time reported apart; the two programs' runs alternate, so that they see the same load.
Ratios are kljax / naive in one run ("paired": the median of the per-round ratios).
"""

from __future__ import annotations

import argparse
import json
import os
import pathlib
import platform
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax

from kljax import lm


def _naive_kl(hidden_p, unembed_p, hidden_q, unembed_q):
    log_p = jax.nn.log_softmax((hidden_p @ unembed_p).astype(jnp.float32), axis=-1)
    log_q = jax.nn.log_softmax((hidden_q @ unembed_q).astype(jnp.float32), axis=-1)
    return optax.losses.kl_divergence_with_log_targets(log_q, log_p)  # KL(P || Q) per token


def _chunked_kl(chunk_size):
    def kl(hidden_p, unembed_p, hidden_q, unembed_q):
        return lm.kl_from_hidden(hidden_p, unembed_p, hidden_q, unembed_q, chunk_size=chunk_size)

    return kl


def _program(kl, mode):
    if mode == "value":
        return jax.jit(kl)
    return jax.jit(jax.grad(lambda *a: jnp.sum(kl(*a).astype(jnp.float32)), argnums=(0, 1, 2, 3)))


def _shapes(tokens, hidden, vocabulary, dtype):
    return [jax.ShapeDtypeStruct(shape, dtype) for shape in ((tokens, hidden), (hidden, vocabulary)) * 2]


def _memory(program, shapes):
    # XLA:CPU's YNNPACK fusion runs a dot and the reductions that consume it as one custom call whose
    # buffers memory_analysis() does not see (it reports 0 temporary bytes for the naive value program,
    # which does hold both logits); the memory analysis compiles without it. Timings use the defaults.
    options = {"xla_cpu_experimental_ynn_fusion_type": ""} if jax.default_backend() == "cpu" else {}
    start = time.perf_counter()
    analysis = program.lower(*shapes).compile(compiler_options=options).memory_analysis()
    seconds = time.perf_counter() - start
    total = (analysis.argument_size_in_bytes + analysis.output_size_in_bytes + analysis.temp_size_in_bytes
             - analysis.alias_size_in_bytes)
    return {"total_bytes": int(total), "temp_bytes": int(analysis.temp_size_in_bytes),
            "argument_bytes": int(analysis.argument_size_in_bytes),
            "output_bytes": int(analysis.output_size_in_bytes), "compile_s": seconds}


def _inputs(tokens, hidden, vocabulary, dtype, seed=0):
    keys = jax.random.split(jax.random.key(seed), 4)
    scale = 1 / np.sqrt(hidden)
    hidden_p = jax.random.normal(keys[0], (tokens, hidden), jnp.float32)
    hidden_q = hidden_p + 0.1 * jax.random.normal(keys[1], (tokens, hidden), jnp.float32)
    unembed_p = 3 * scale * jax.random.normal(keys[2], (hidden, vocabulary), jnp.float32)
    unembed_q = unembed_p + 0.3 * scale * jax.random.normal(keys[3], (hidden, vocabulary), jnp.float32)
    return [jax.device_put(x.astype(dtype)) for x in (hidden_p, unembed_p, hidden_q, unembed_q)]


def _interleaved_times(programs, arrays, repeats):
    """A warm-up call of each program, then ``repeats`` rounds that run them one after the other, so
    that both see the same machine load (the CPU this was written on is shared)."""
    for program in programs.values():
        jax.block_until_ready(program(*arrays))
    runs = {name: [] for name in programs}
    for _ in range(repeats):
        for name, program in programs.items():
            start = time.perf_counter()
            jax.block_until_ready(program(*arrays))
            runs[name].append(time.perf_counter() - start)
    return {f"{name}_time": {"median_s": float(np.median(times)), "min_s": min(times), "runs_s": times}
            for name, times in runs.items()}


def _gib(n):
    return n / 2**30


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--full", action="store_true", help="the issue's grid: time at T = 8192 as well")
    parser.add_argument("--tokens", type=int, default=None, help="T for the timed runs (default 512; 8192 with --full)")
    parser.add_argument("--memory-tokens", type=int, default=8192, help="T for the compiled memory analysis")
    parser.add_argument("--hidden", type=int, default=1024)
    parser.add_argument("--vocab", type=int, nargs="+", default=[32_000, 128_256])
    parser.add_argument("--dtypes", nargs="+", default=["float32", "bfloat16"])
    parser.add_argument("--modes", nargs="+", default=["value", "grad"])
    parser.add_argument("--chunk-size", type=int, nargs=2, default=list(lm.DEFAULT_CHUNK_SIZE),
                        metavar=("TOKENS", "VOCAB"))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-time", action="store_true", help="memory analysis only")
    parser.add_argument("--out", type=pathlib.Path, default=None, help="write the results as JSON here")
    args = parser.parse_args(argv)
    tokens = args.tokens or (8192 if args.full else 512)
    chunk_size = tuple(args.chunk_size)
    print(f"# bench_lm: {jax.devices()[0].device_kind}, {os.cpu_count()} CPUs, jax {jax.__version__}, "
          f"{platform.python_version()}; h = {args.hidden}, chunk_size = {chunk_size}, "
          f"memory at T = {args.memory_tokens}, time at T = {tokens}")
    rows = []
    for vocabulary in args.vocab:
        for dtype_name in args.dtypes:
            dtype = jnp.dtype(dtype_name)
            arrays = None if args.no_time else _inputs(tokens, args.hidden, vocabulary, dtype)
            if arrays is not None:  # the two programs agree before anything is timed
                got = jax.jit(_chunked_kl(chunk_size))(*arrays).astype(jnp.float32)
                want = jax.jit(_naive_kl)(*arrays)
                agreement = float(jnp.max(jnp.abs(got - want)) / jnp.max(want))
            for mode in args.modes:
                row = {"vocab": vocabulary, "dtype": dtype_name, "mode": mode, "memory_tokens": args.memory_tokens,
                       "time_tokens": tokens}
                shapes = _shapes(args.memory_tokens, args.hidden, vocabulary, dtype)
                programs = {}
                for name, kl in (("naive", _naive_kl), ("kljax", _chunked_kl(chunk_size))):
                    programs[name] = program = _program(kl, mode)
                    row[f"{name}_memory"] = _memory(program, shapes)
                    if arrays is not None:
                        start = time.perf_counter()
                        program.lower(*arrays).compile()
                        row[f"{name}_compile_s"] = time.perf_counter() - start
                if arrays is not None:
                    row.update(_interleaved_times(programs, arrays, args.repeats))
                naive, chunked = row["naive_memory"], row["kljax_memory"]
                row["memory_ratio"] = chunked["total_bytes"] / naive["total_bytes"]
                row["temp_ratio"] = chunked["temp_bytes"] / max(naive["temp_bytes"], 1)
                line = (f"V={vocabulary:>6} {dtype_name:>8} {mode:>5}: memory naive {_gib(naive['total_bytes']):7.2f} GiB "
                        f"(temp {_gib(naive['temp_bytes']):6.2f}), kljax {_gib(chunked['total_bytes']):6.2f} GiB "
                        f"(temp {_gib(chunked['temp_bytes']):5.2f}): ratio {row['memory_ratio']:.3f} "
                        f"(temp {row['temp_ratio']:.4f})")
                if arrays is not None:
                    row["agreement_rel"] = agreement
                    row["time_ratio"] = row["kljax_time"]["median_s"] / row["naive_time"]["median_s"]
                    row["paired_time_ratio"] = float(np.median(np.divide(row["kljax_time"]["runs_s"],
                                                                         row["naive_time"]["runs_s"])))
                    line += (f"; time naive {row['naive_time']['median_s']:.3f} s, kljax "
                             f"{row['kljax_time']['median_s']:.3f} s: ratio {row['time_ratio']:.2f} "
                             f"(paired {row['paired_time_ratio']:.2f}) "
                             f"(max rel diff {agreement:.1e})")
                print(line, flush=True)
                rows.append(row)
    if args.out is not None:
        args.out.parent.mkdir(parents=True, exist_ok=True)
        args.out.write_text(json.dumps(rows, indent=1))
    return rows


if __name__ == "__main__":
    main()
