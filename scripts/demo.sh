#!/usr/bin/env bash
# Runs the main job end to end on the local machine: `sdbatch generate` on a prompts file.
# Default: the tiny random test model (made by scripts/setup.sh); MODEL=/path/to/stable-diffusion-v1-4
# for a real one. Extra arguments go to `sdbatch generate` (e.g. --steps 50 --device cuda).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/setup.sh
# shellcheck source=env.sh
. scripts/env.sh
model=${MODEL:-tests/fixtures/generated/tiny-sd}
out=${OUT_DIR:-out/demo}
cargo build --release --locked --quiet
"$CARGO_TARGET_DIR/release/sdbatch" generate --model "$model" --prompts examples/prompts.jsonl \
  --out "$out" --steps 20 --batch-size 4 --seed 42 "$@"
ls -l "$out"
