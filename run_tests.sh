#!/usr/bin/env bash
# Front door 2: set up .venv from nothing and run the whole test suite (slow statistical tests included).
# Extra arguments go to pytest, e.g. ./run_tests.sh -m "not slow" tests/test_discrete.py
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh dev
# 4 simulated CPU devices for the sharding tests; set here too because pytest-xdist workers may
# import jax (through plugins) before tests/conftest.py runs.
export XLA_FLAGS="${XLA_FLAGS:-} --xla_force_host_platform_device_count=4"
exec python -m pytest -n 2 --dist loadfile "$@"
