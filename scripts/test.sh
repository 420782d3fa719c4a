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
