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
# The container image, built with buildah and run for real (scripts/image-test.sh): only when its
# inputs changed since its last pass here (a stamp), so a repeated run costs nothing; after a
# source change it rebuilds the sdbatch crate alone (~4 min), a cold first build takes 30-45 min.
# SDBATCH_IMAGE_TEST=0 leaves it out (a developer's quick run; CI does not set it).
if [ "${SDBATCH_IMAGE_TEST:-1}" != 0 ]; then
  scripts/image-test.sh
fi
