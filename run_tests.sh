#!/usr/bin/env bash
# Front door 2: set up .venv from nothing and run the whole test suite (slow statistical tests included).
# Extra arguments go to pytest, e.g. ./run_tests.sh -m "not slow" tests/test_discrete.py
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh dev
exec python -m pytest -n 2 --dist loadfile "$@"
