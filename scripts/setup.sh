#!/usr/bin/env bash
# Idempotent set-up of everything sdbatch needs to build and test:
#   * a Python venv with torch==2.11.0 (libtorch for tch) and the pinned diffusers/transformers used
#     to make the reference fixtures;
#   * the tiny random SD model and diffusers' reference outputs (tests/fixtures/…, generated, ignored by git);
#   * RabbitMQ (Debian package) and the s3s-fs S3 server (built from crates.io into the cache);
#   * cargo-audit, pinned, built once into the cache (scripts/audit.sh).
# The venv is large (~4.6 GB), so it lives in a cache folder keyed by the requirements' hash and the
# project's `.venv` is a link to it: a fresh clone reuses it, and because its path stays the same,
# torch-sys' C++ build (which reruns when LIBTORCH's path changes) is reused too.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

req=scripts/requirements-fixtures.txt
py=${PYTHON:-python3}
hash=$(cat "$req" | sha256sum | cut -c1-16)
cache=${SDBATCH_CACHE:-$HOME/.cache/sdbatch}
venv="$cache/venv-$hash"

if [ ! -f "$venv/.complete" ]; then
  echo "setup: creating venv $venv (torch 2.11.0 is ~4.6 GB, a few minutes the first time)"
  rm -rf "$venv"
  mkdir -p "$cache"
  "$py" -m venv "$venv"
  "$venv/bin/python" -m pip install -q --upgrade pip
  "$venv/bin/python" -m pip install -q -r "$req"
  # open-clip-torch ships OpenAI's CLIP BPE vocabulary (bpe_simple_vocab_16e6.txt.gz); we only read that
  # data file, so none of its dependencies (torchvision, …) are needed.
  "$venv/bin/python" -m pip install -q --no-deps open-clip-torch==3.3.0
  touch "$venv/.complete"
fi
# Fixture-only extras, layered into the same venv (see requirements-extra.txt).
extra=scripts/requirements-extra.txt
extra_hash=$(sha256sum < "$extra" | cut -c1-16)
if [ ! -f "$venv/.extra-$extra_hash" ]; then
  echo "setup: installing $extra into the venv"
  "$venv/bin/python" -m pip install -q -r "$extra"
  touch "$venv/.extra-$extra_hash"
fi
ln -sfn "$venv" .venv

# shellcheck source=env.sh
. scripts/env.sh

# A C++ compiler: build.rs compiles the bridge to libtorch (csrc/bridge.cpp), and AOTInductor
# (`sdbatch compile`, tests/compiled.rs) compiles the code it generates.
if ! command -v g++ >/dev/null 2>&1; then
  echo "setup: installing g++"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq g++ >/dev/null
fi

# The local stack for the worker: RabbitMQ from Debian, the s3s-fs S3 server built once.
scripts/services.sh install

# cargo-audit for the dependency audit (tests/audit.rs), pinned and built once.
scripts/audit.sh install

# Fixtures: regenerate only when the generating scripts or the pinned versions change.
fx=tests/fixtures/generated
stamp=$(cat scripts/make_fixtures.py scripts/fixtures_*.py "$req" "$extra" | sha256sum | cut -c1-16)
if [ "$(cat "$fx/.stamp" 2>/dev/null)" != "$stamp" ]; then
  echo "setup: generating tiny-model fixtures in $fx"
  rm -rf "$fx"
  python scripts/make_fixtures.py --out "$fx"
  echo "$stamp" > "$fx/.stamp"
fi
echo "setup: done"
