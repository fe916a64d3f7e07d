"""Strict settings for the whole test suite.

- 4 simulated CPU devices (for the sharded neighbour search); must be set before jax is imported.
- rank promotion raises, so the library never relies on implicit broadcasting of ranks.
- float64 is enabled so that float64 paths can be tested; float32 tests ask for float32 explicitly.
- warnings are errors (pyproject's filterwarnings).
"""

import os

_flag = "--xla_force_host_platform_device_count=4"
if _flag not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _flag).strip()
os.environ.setdefault("MPLBACKEND", "Agg")

import jax  # noqa: E402
import hypothesis  # noqa: E402

jax.config.update("jax_numpy_rank_promotion", "raise")
jax.config.update("jax_enable_x64", True)
# Start the CPU backend now, while XLA_FLAGS asks for 4 devices: JAX reads the flags only when the
# backend starts, and a test that changes XLA_FLAGS (the notebook test clears it for its kernels)
# must not decide how many devices a later test in the same worker sees.
jax.devices()

# JAX compiles on first call, so per-example deadlines are meaningless; keep example counts modest
# so that the suite fits the CI budget on 2 cores.
hypothesis.settings.register_profile("kljax", deadline=None, max_examples=30, derandomize=True)
hypothesis.settings.load_profile("kljax")
