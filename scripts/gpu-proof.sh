#!/usr/bin/env bash
# One-call proof on a GPU machine (issue 15): random full-size SD v1-4 weights written there,
# sdbatch's images against diffusers' on those weights, `sdbatch bench` eager and compiled next to
# the diffusers anchor benchmark, one table printed and every part's JSON under the output folder.
#
#   scripts/gpu-proof.sh [--cpu --tiny] [--bin PATH] [--python PY] [--out DIR] [--no-compile]
#                        [--no-anchor] [--budget SECONDS]
#
# On the device machine (see the README):
#   LD_LIBRARY_PATH=/opt/torch/.venv/lib/python3.12/site-packages/torch/lib \
#     scripts/gpu-proof.sh --bin .carry/sdbatch --python python3 --out "$OUT"
# (python3 there is torch 2.11.0+cu130; diffusers travels as wheels). `--cpu --tiny` is the same
# run on a tiny model of the same architecture families, on the CPU: scripts/test.sh runs it
# (with --no-compile --no-anchor: tests/compiled.rs covers compiling, and the anchor's CPU
# timings say nothing) so the script itself is tested.
#
# Parts, each timed: model (random weights, fp32 and fp16 files), reference (diffusers
# StableDiffusionPipeline, PNDM, per-image CPU generators as sdbatch draws its noise), ours
# (`sdbatch generate` on the same prompts and seeds), compare (max difference and share within one
# level), worker (the same prompts and seeds as batch messages through `sdbatch worker --messages`:
# the worker path without a broker, an in-memory queue and the local-folder sink; its stored images
# compared with diffusers'), compile (`sdbatch compile`, AOTInductor), bench (`sdbatch bench
# --compiled`: eager and compiled rows), anchor (../shared/bench/diffusers_anchor.py when present).
#
# A device call has one chance and a time limit, so every part's JSON is copied to the output
# folder as soon as it exists, and with --budget (default 540 s on CUDA: the proof must fit in 9
# minutes) the compile step gets only the time the budget leaves after reserving the bench's: a
# compile that would not fit is stopped and the bench runs eager only (the summary says so).
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)

cpu=0 tiny=0 compile=1 anchor=1 bin="" py="" out="" budget=""
while [ $# -gt 0 ]; do
  case "$1" in
    --cpu) cpu=1; shift ;;
    --tiny) tiny=1; shift ;;
    --no-compile) compile=0; shift ;;
    --no-anchor) anchor=0; shift ;;
    --bin) bin=$2; shift 2 ;;
    --python) py=$2; shift 2 ;;
    --out) out=$2; shift 2 ;;
    --budget) budget=$2; shift 2 ;;
    *) echo "usage: $0 [--cpu --tiny] [--bin PATH] [--python PY] [--out DIR] [--no-compile] [--no-anchor] [--budget SECONDS]" >&2; exit 2 ;;
  esac
done
[ -n "$py" ] || py=$(command -v python3)
[ -n "$bin" ] || bin="${CARGO_TARGET_DIR:-$root/target}/release/sdbatch"
[ -x "$bin" ] || { echo "gpu-proof: no sdbatch binary at $bin (--bin)" >&2; exit 2; }
out=${out:-$(mktemp -d)}
mkdir -p "$out"
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

if [ "$cpu" = 1 ]; then device=cpu; else device=cuda; fi
if [ -z "$budget" ]; then
  if [ "$cpu" = 1 ]; then budget=0; else budget=540; fi
fi
case "$budget" in ''|*[!0-9]*) echo "gpu-proof: --budget takes whole seconds" >&2; exit 2 ;; esac
# Seconds kept for the bench and the anchor after compiling (50 steps at five batch sizes, eager
# and compiled, on an H100/H200; the tiny model needs little).
reserve=200
[ "$tiny" = 1 ] && reserve=30
if [ "$tiny" = 1 ]; then
  size=64 steps=4 batches=1,2 tiny_flag=--tiny
else
  size=512 steps=50 batches=1,4,8,16,32 tiny_flag=
fi

declare -A took
# What the summary should say besides the figures (a part skipped or stopped), one per line.
: > "$work/notes.txt"
save_partial() { # every part's JSON so far, in case the call is cut short
  cp -f "$work"/*.json "$work/notes.txt" "$out/" 2>/dev/null || true
}
step() { # step NAME command...: runs it, records its seconds, returns its status
  local name=$1; shift
  local t0=$SECONDS rc=0
  echo "gpu-proof: $name" >&2
  "$@" || rc=$?
  took[$name]=$((SECONDS - t0))
  save_partial
  return "$rc"
}

step model "$py" "$root/scripts/gpu_proof.py" model "$work/model" $tiny_flag

# Four images of two prompts, seeds as a producer would send them.
cat > "$work/prompts.jsonl" <<'EOF'
{"prompt": "a red sneaker on a white background, studio light", "seed": 42}
{"prompt": "a red sneaker on a white background, studio light", "seed": 43}
{"prompt": "concept art of a ruined castle at dusk", "seed": 7}
{"prompt": "concept art of a ruined castle at dusk", "seed": 8}
EOF
step reference "$py" "$root/scripts/gpu_proof.py" reference "$work/model" "$work/prompts.jsonl" \
  "$work/reference" --steps "$steps" --size "$size" --device "$device"
step ours "$bin" generate --model "$work/model" --device "$device" --prompts "$work/prompts.jsonl" \
  --steps "$steps" --width "$size" --height "$size" --scheduler pndm --guidance 7.5 \
  --batch-size 4 --out "$work/ours"
step compare "$py" "$root/scripts/gpu_proof.py" compare "$work/reference" "$work/ours" "$work/compare.json"

"$py" "$root/scripts/gpu_proof.py" messages "$work/prompts.jsonl" "$work/messages.jsonl" \
  --steps "$steps" --size "$size"
step worker "$bin" worker --model "$work/model" --device "$device" --messages "$work/messages.jsonl" \
  --report "$work/worker-report.json" --storage-url "file://$work/store" --bucket proof \
  --worker-id gpu-proof --metrics-addr off
"$py" "$root/scripts/gpu_proof.py" worker "$work/worker-report.json" "$work/store" \
  "$work/worker-images" "$work/reference" "$work/worker.json"

bench_compiled=()
if [ "$compile" = 1 ]; then
  limit=0  # no limit
  if [ "$budget" -gt 0 ]; then
    limit=$((budget - SECONDS - reserve))
  fi
  if [ "$budget" -gt 0 ] && [ "$limit" -lt 30 ]; then
    echo "compile: skipped, the ${budget} s budget left ${limit} s after the bench's ${reserve} s" \
      | tee -a "$work/notes.txt" >&2
  elif step compile timeout "${limit}" "$bin" compile --model "$work/model" --device "$device" \
      --out "$work/compiled" --batch-sizes "$batches" --width "$size" --height "$size" --python "$py"
  then
    bench_compiled=(--compiled "$work/compiled")
  else
    rc=$?
    # `timeout 0` never stops it; 124 is the limit running out.
    why="failed (exit $rc)"
    [ "$rc" = 124 ] && why="stopped at its ${limit} s share of the ${budget} s budget"
    echo "compile: $why: the bench runs eager only" | tee -a "$work/notes.txt" >&2
  fi
fi
step bench "$bin" bench --model "$work/model" --device "$device" "${bench_compiled[@]}" \
  --batch-sizes "$batches" --steps "$steps" --width "$size" --height "$size" --json "$work/bench.json"

anchor_script="$root/../shared/bench/diffusers_anchor.py"
if [ "$anchor" = 0 ]; then
  :
elif [ -f "$anchor_script" ]; then
  step anchor "$py" "$anchor_script" "$work/anchor.json" $tiny_flag
else
  echo "gpu-proof: no $anchor_script: the diffusers anchor is left out" >&2
fi

{
  echo "{"
  first=1
  for k in "${!took[@]}"; do
    [ "$first" = 1 ] || echo ","
    first=0
    printf '  "%s_s": %s' "$k" "${took[$k]}"
  done
  echo
  echo "}"
} > "$work/timings.json"
"$py" "$root/scripts/gpu_proof.py" summary "$work" "$out/gpu-proof.json"
save_partial

# The proof fails when the images are not diffusers' (fp32 on the CPU: within one level almost
# everywhere; fp16 on CUDA: kernels differ, so only a coarse bound).
"$py" - "$device" "$work/compare.json" "$work/worker.json" <<'EOF'
import json, sys
need = 0.999 if sys.argv[1] == "cpu" else 0.95
for path, what in zip(sys.argv[2:], ["generate", "worker"]):
    c = json.load(open(path))
    if c["worst_within_1"] < need:
        sys.exit(f"gpu-proof: FAIL: {what}'s images differ from diffusers' (worst share within 1 "
                 f"level {c['worst_within_1']:.4%} < {need:.1%})")
    print(f"gpu-proof: {what}'s images match diffusers' (worst share within 1 level "
          f"{c['worst_within_1']:.4%})")
EOF
