#!/usr/bin/env bash
# Validates the deployment files offline: every YAML document of DEPLOY_DIR/k8s/*.yaml against the
# Kubernetes and KEDA schemas (unknown fields included), DEPLOY_DIR/docker-compose.yml against the
# Compose Specification, and sdbatch's own rules across them (deploy/validate/validate.mjs says
# which). One line per document; exit status 1 on any error.
#
#   scripts/validate-manifests.sh [DEPLOY_DIR]      (default: deploy/ of this checkout)
#
# Needs Node.js (20 or later) and npm. The validator's packages (deploy/validate/package.json, exact
# versions locked in package-lock.json) are installed once with `npm ci` into
# ${SDBATCH_CACHE:-~/.cache/sdbatch}/manifest-validator and reinstalled only when those two files
# change. Nothing is downloaded after that: the schemas ship inside the packages.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
deploy=${1:-$root/deploy}
src="$root/deploy/validate"
cache="${SDBATCH_CACHE:-$HOME/.cache/sdbatch}/manifest-validator"

for tool in node npm; do
  command -v "$tool" >/dev/null 2>&1 || { echo "validate-manifests: $tool not found (install Node.js 20 or later)" >&2; exit 2; }
done
[ -d "$deploy/k8s" ] || { echo "validate-manifests: no folder $deploy/k8s" >&2; exit 2; }

mkdir -p "$cache"
stamp=$(cat "$src/package.json" "$src/package-lock.json" | sha256sum | cut -c1-16)
# One installer at a time (tests run this script in parallel); the others wait, then reuse it.
exec 9>"$cache/.lock"
flock 9
if [ "$(cat "$cache/.installed" 2>/dev/null)" != "$stamp" ] || [ ! -d "$cache/node_modules" ]; then
  echo "validate-manifests: installing the validator into $cache (npm ci)" >&2
  rm -f "$cache/.installed"
  cp "$src/package.json" "$src/package-lock.json" "$cache/"
  # --loglevel=error: the kubernetes-models packages declare node >= 22 and npm warns about it on
  # Node 20, where they work (tests/manifests.rs runs them there). Errors stay in npm-ci.log.
  if ! (cd "$cache" && npm ci --no-audit --no-fund --loglevel=error) >"$cache/npm-ci.log" 2>&1; then
    cat "$cache/npm-ci.log" >&2
    echo "validate-manifests: npm ci failed (log: $cache/npm-ci.log)" >&2
    exit 2
  fi
  echo "$stamp" >"$cache/.installed"
fi
# The script runs from the cache folder so that its imports find node_modules there; copied by
# rename so that a concurrent run never reads half a file.
cp "$src/validate.mjs" "$cache/validate.mjs.$$"
mv -f "$cache/validate.mjs.$$" "$cache/validate.mjs"
flock -u 9
exec 9>&-

shopt -s nullglob
files=("$deploy"/k8s/*.yaml "$deploy"/k8s/*.yml)
[ -f "$deploy/docker-compose.yml" ] && files+=("$deploy/docker-compose.yml")
[ "${#files[@]}" -gt 0 ] || { echo "validate-manifests: no manifests under $deploy" >&2; exit 2; }
exec node "$cache/validate.mjs" "${files[@]}"
