#!/usr/bin/env bash
# The main job end to end on the local stack: RabbitMQ + a local S3 server, one `sdbatch worker`
# on the tiny test model (MODEL=/path/to/stable-diffusion-v1-4 for a real one), `sdbatch submit
# --wait` of examples/prompts.jsonl, then the stored objects are listed. Extra arguments go to
# `sdbatch submit` (e.g. --steps 50 --preset production).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
scripts/setup.sh
scripts/services.sh start
# shellcheck source=env.sh
. scripts/env.sh

export AWS_ACCESS_KEY_ID=${AWS_ACCESS_KEY_ID:-sdbatch} AWS_SECRET_ACCESS_KEY=${AWS_SECRET_ACCESS_KEY:-sdbatch-secret}
export S3_PORT=${S3_PORT:-9000}
scripts/s3.sh start
bucket=${S3_BUCKET:-images}
data=${S3_DATA:-$HOME/.cache/sdbatch/s3-data}
mkdir -p "$data/$bucket"   # s3s-fs buckets are folders

cargo build --release --locked --quiet
bin="$CARGO_TARGET_DIR/release/sdbatch"
model=${MODEL:-tests/fixtures/generated/tiny-sd}
log=$(mktemp -t sdbatch-worker.XXXXXX.log)

"$bin" worker --model "$model" --s3-endpoint "http://127.0.0.1:$S3_PORT" --bucket "$bucket" \
  --queue-prefix sdbatch-demo --max-batch 4 --worker-id demo-worker 2>"$log" &
worker=$!
trap 'kill -TERM $worker 2>/dev/null; wait $worker 2>/dev/null || true' EXIT
echo "worker pid $worker, log $log"

batch_prefix="demo-$(date +%s)"
"$bin" submit --queue-prefix sdbatch-demo --prompts examples/prompts.jsonl --batch-size 2 \
  --steps 20 --batch-prefix "$batch_prefix" --wait --timeout-secs 600 "$@"

echo "objects in s3://$bucket (stored under $data/$bucket):"
(cd "$data/$bucket" && find "$batch_prefix"-* -type f | sort | sed 's|^|  |')
