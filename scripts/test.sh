#!/usr/bin/env bash
# The project's test command (README, .ci/run): set up what is missing, then run every test.
# The full run (no arguments, what CI does) includes the container image test
# (scripts/image-test.sh), which builds and checks only when its inputs changed since its last pass
# on this machine. SDBATCH_IMAGE_TEST=0 leaves it out, =1 runs it with a selection of cargo tests.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/setup.sh
scripts/services.sh start
# shellcheck source=scripts/env.sh
. scripts/env.sh

# The image test first, so that cargo's summary stays the last thing printed; its failure fails
# the run after the cargo tests have run too. Its outside-the-image reference is the debug build
# that cargo test needs anyway.
image_rc=0 image_default=1
[ $# -eq 0 ] || image_default=0
if [ "${SDBATCH_IMAGE_TEST:-$image_default}" = 1 ]; then
  cargo build --locked --bin sdbatch
  scripts/image-test.sh --host-bin "$CARGO_TARGET_DIR/debug/sdbatch" || image_rc=$?
fi
cargo test --all-targets --locked "$@"
if [ "$image_rc" != 0 ]; then
  echo "test.sh: the container image test failed (exit $image_rc; its output is above)" >&2
  exit "$image_rc"
fi
