"""Timing shared by the benchmarks (jax docs/benchmarking.md discipline).

Inputs are put on the device first; every callable is run once to warm up (compile time for jitted
JAX functions is measured apart from the run time); each timed call ends with ``block_until_ready``
(or returns a host array); the median of ``repeats`` runs is reported.
"""

from __future__ import annotations

import statistics
import time
from typing import Any, Callable

import jax


def _block(value: Any) -> Any:
    return jax.block_until_ready(value)


def time_call(fn: Callable[[], Any], *, repeats: int = 7, min_seconds: float = 0.0) -> dict:
    """Runs ``fn`` once for warm-up (reported as ``first_s``) then ``repeats`` times.

    Returns a dict with ``first_s`` (first call: compile + run for jitted JAX), ``median_s``,
    ``min_s`` and the list ``runs_s``. With ``min_seconds``, keeps repeating until that much time
    has been spent, so that fast calls are not dominated by timer noise.
    """
    start = time.perf_counter()
    _block(fn())
    first = time.perf_counter() - start
    runs = []
    spent = 0.0
    while len(runs) < repeats or spent < min_seconds:
        start = time.perf_counter()
        _block(fn())
        runs.append(time.perf_counter() - start)
        spent += runs[-1]
    return {"first_s": first, "median_s": statistics.median(runs), "min_s": min(runs), "runs_s": runs}


def compile_seconds(jitted: Callable, *args) -> float:
    """Seconds to lower and compile ``jitted`` for ``args`` (reported apart from run time)."""
    start = time.perf_counter()
    jitted.lower(*args).compile()
    return time.perf_counter() - start


def ratio_table(rows: list[tuple[str, dict]], reference: str) -> str:
    """Markdown table of median times and their ratio to the ``reference`` row."""
    ref = dict(rows)[reference]["median_s"]
    lines = ["| implementation | median ms | ratio to " + reference + " |", "|---|---:|---:|"]
    for name, result in rows:
        lines.append(f"| {name} | {1e3 * result['median_s']:.2f} | {result['median_s'] / ref:.2f}x |")
    return "\n".join(lines)
