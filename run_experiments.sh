#!/usr/bin/env bash
# Front door 1: set up .venv from nothing, run every experiment at its quick scale and write
# results/REPORT.md with the key numbers and figures. Pass --full for the full scale.
set -euo pipefail
cd "$(dirname "$0")"
source scripts/setup_env.sh experiments
scale="--quick"
if [ "${1:-}" = "--full" ]; then scale=""; shift; fi
exec python -m experiments.report $scale --out results "$@"
