#!/usr/bin/env bash
# A local S3-compatible server (s3s-fs, built by `scripts/services.sh install`) for the demo:
#   scripts/s3.sh start    # background, idempotent; prints the endpoint
#   scripts/s3.sh stop
#   scripts/s3.sh status
# Settings: S3_PORT (9000), S3_DATA (~/.cache/sdbatch/s3-data), AWS_ACCESS_KEY_ID /
# AWS_SECRET_ACCESS_KEY (sdbatch / sdbatch-secret: export the same values for the worker, which
# reads the standard AWS variables). Buckets are folders under S3_DATA; the worker's
# `create_bucket` (or `mkdir "$S3_DATA/<bucket>"`) makes them.
set -euo pipefail
cache=${SDBATCH_CACHE:-$HOME/.cache/sdbatch}
bin=${SDBATCH_S3S_FS:-$cache/s3s-fs-0.14.1/bin/s3s-fs}
port=${S3_PORT:-9000}
data=${S3_DATA:-$cache/s3-data}
access_key=${AWS_ACCESS_KEY_ID:-sdbatch}
secret_key=${AWS_SECRET_ACCESS_KEY:-sdbatch-secret}
run_dir="$cache/s3-run"
pid_file="$run_dir/s3s-fs-$port.pid"
log_file="$run_dir/s3s-fs-$port.log"
endpoint="http://127.0.0.1:$port"

listening() { (echo >"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }
# The pid file's process, if it is still our s3s-fs (a stale file may name a reused pid).
running_pid() {
  [ -f "$pid_file" ] || return 1
  local pid
  pid=$(cat "$pid_file")
  [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null && grep -q s3s-fs "/proc/$pid/cmdline" 2>/dev/null || return 1
  echo "$pid"
}

start() {
  if listening; then
    if pid=$(running_pid); then
      echo "s3: already running (pid $pid) at $endpoint"
    else
      echo "s3: something already listens on 127.0.0.1:$port; not starting a second server" >&2
      echo "s3: endpoint $endpoint"
    fi
    return 0
  fi
  if [ ! -x "$bin" ]; then
    echo "s3: $bin is missing: run scripts/services.sh install" >&2
    exit 1
  fi
  mkdir -p "$data" "$run_dir"
  # setsid: the server outlives this shell and its terminal.
  RUST_LOG=${RUST_LOG:-info} setsid "$bin" --host 127.0.0.1 --port "$port" \
    --access-key "$access_key" --secret-key "$secret_key" "$data" \
    >>"$log_file" 2>&1 </dev/null &
  echo $! >"$pid_file"
  for _ in $(seq 1 100); do
    listening && break
    if ! kill -0 "$(cat "$pid_file")" 2>/dev/null; then
      echo "s3: s3s-fs exited; see $log_file:" >&2
      tail -n 20 "$log_file" >&2
      rm -f "$pid_file"
      exit 1
    fi
    sleep 0.1
  done
  listening || { echo "s3: s3s-fs did not listen on $port within 10 s; see $log_file" >&2; exit 1; }
  echo "s3: s3s-fs (pid $(cat "$pid_file")) serving $data"
  echo "s3: endpoint $endpoint (path-style, region us-east-1, access key $access_key)"
}

stop() {
  if pid=$(running_pid); then
    kill "$pid"
    for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    kill -0 "$pid" 2>/dev/null && kill -9 "$pid"
    echo "s3: stopped (pid $pid)"
  else
    echo "s3: not running (no live pid in $pid_file)"
  fi
  rm -f "$pid_file"
}

case "${1:-start}" in
  start) start ;;
  stop) stop ;;
  status)
    if pid=$(running_pid) && listening; then echo "s3: running (pid $pid) at $endpoint"; else echo "s3: not running"; exit 1; fi ;;
  *) echo "usage: $0 [start|stop|status]" >&2; exit 2 ;;
esac
