#!/usr/bin/env bash
# Idempotent: installs (where missing) and starts the local stack the worker and its tests need:
#   * RabbitMQ on 127.0.0.1:5672 (guest/guest), from Debian's rabbitmq-server;
#   * the S3-compatible server s3s-fs 0.14.1, built once from crates.io into a cache folder.
# `scripts/services.sh install` only installs; `start` (default) installs and starts RabbitMQ.
# The S3 server is started per use (scripts/s3.sh, the tests), each on its own port and folder.
set -euo pipefail
cache=${SDBATCH_CACHE:-$HOME/.cache/sdbatch}
s3s_root="$cache/s3s-fs-0.14.1"
action=${1:-start}

if ! command -v rabbitmq-server >/dev/null 2>&1 && [ ! -x /usr/sbin/rabbitmq-server ]; then
  echo "services: installing rabbitmq-server (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq rabbitmq-server >/dev/null
fi

if [ ! -x "$s3s_root/bin/s3s-fs" ]; then
  echo "services: building s3s-fs 0.14.1 (once, ~5 min)"
  cargo install s3s-fs --version 0.14.1 --features binary --locked --root "$s3s_root" --quiet
fi

[ "$action" = install ] && exit 0

if ! (echo > /dev/tcp/127.0.0.1/5672) 2>/dev/null; then
  echo "services: starting RabbitMQ"
  # The Debian package may have tried to start it under a service manager that is absent here.
  RABBITMQ_NODE_IP_ADDRESS=127.0.0.1 /usr/sbin/rabbitmq-server -detached >/dev/null 2>&1 || true
  for _ in $(seq 1 60); do
    (echo > /dev/tcp/127.0.0.1/5672) 2>/dev/null && break
    sleep 1
  done
  rabbitmqctl await_startup >/dev/null 2>&1 || true
fi
(echo > /dev/tcp/127.0.0.1/5672) 2>/dev/null || { echo "services: RabbitMQ did not start" >&2; exit 1; }
echo "services: RabbitMQ up on 127.0.0.1:5672; s3s-fs at $s3s_root/bin/s3s-fs"
