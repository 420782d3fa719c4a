#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up what is missing, then run every test.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/setup.sh
scripts/services.sh start
# shellcheck source=env.sh
. scripts/env.sh
cargo test --all-targets --locked "$@"
# The GPU proof's CPU mode, so the script a GPU machine runs is known to work (about a minute).
scripts/gpu-proof.sh --cpu --tiny --no-compile --no-anchor --bin "$CARGO_TARGET_DIR/debug/sdbatch" \
  --out "$(mktemp -d)"
