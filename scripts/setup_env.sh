#!/usr/bin/env bash
# Create (or reuse) the local virtual environment .venv and install kljax with the given extras.
# Usage: source scripts/setup_env.sh EXTRAS   (e.g. "dev" or "experiments")
# Re-installs only when pyproject.toml or the extras change (a stamp file records what was installed).
set -euo pipefail
extras="${1:-experiments}"
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
python_bin="${PYTHON:-python3}"
if [ ! -x "$root/.venv/bin/python" ]; then
  echo "[kljax] creating virtual environment in $root/.venv"
  "$python_bin" -m venv "$root/.venv"
fi
stamp="$root/.venv/.kljax-installed-$extras"
want="$(cat "$root/pyproject.toml" | sha256sum | cut -c1-16)"
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  echo "[kljax] installing kljax[$extras] into .venv (first run takes a few minutes)"
  "$root/.venv/bin/python" -m pip install --quiet --upgrade pip
  "$root/.venv/bin/python" -m pip install --quiet -e "$root[$extras]"
  echo "$want" > "$stamp"
fi
export PATH="$root/.venv/bin:$PATH"
