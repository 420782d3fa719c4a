#!/usr/bin/env bash
# Audits Cargo.lock against the RustSec advisory database with cargo-audit, offline by default.
#
#   scripts/audit.sh install            only install the pinned cargo-audit (idempotent, cached)
#   scripts/audit.sh [ARGS...]          audit this checkout's Cargo.lock against the snapshot
#                                       (SDBATCH_ADVISORY_DB, else ../shared/advisory-db)
#   scripts/audit.sh --fresh [ARGS...]  audit against the current database, fetched by cargo-audit
#                                       into ~/.cargo/advisory-db (needs network)
#
# ARGS go to `cargo audit` (e.g. --file OTHER/Cargo.lock, --json). What is allowed and why is in
# .cargo/audit.toml (read from the current folder, so this script runs from the repository root).
# Any vulnerability and any warning not listed there (unmaintained, unsound, yanked) fails.
#
# cargo-audit 0.22.2 is built once from crates.io (without its binary-scanning feature, which we
# do not use; ~3 min on 2 cores) into ${SDBATCH_CACHE:-~/.cache/sdbatch}/cargo-audit-0.22.2.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"
version=0.22.2
cache=${SDBATCH_CACHE:-$HOME/.cache/sdbatch}
prefix="$cache/cargo-audit-$version"
bin="$prefix/bin/cargo-audit"

if [ ! -x "$bin" ]; then
  mkdir -p "$cache"
  # One installer at a time (tests may run this in parallel); the others wait, then reuse it.
  exec 9>"$cache/.cargo-audit-$version.lock"
  flock 9
  if [ ! -x "$bin" ]; then
    echo "audit: building cargo-audit $version (once, a few minutes)" >&2
    # A private build folder (not the shared CARGO_TARGET_DIR of scripts/env.sh), removed after.
    env -u CARGO_TARGET_DIR cargo install cargo-audit --version "$version" --locked \
      --no-default-features --root "$prefix" --quiet
  fi
  flock -u 9
  exec 9>&-
fi
[ "${1:-}" = install ] && exit 0

if [ "${1:-}" = --fresh ]; then
  shift
  # cargo-audit clones/fetches the advisory database into ~/.cargo/advisory-db itself.
  exec "$bin" audit "$@"
fi

db=${SDBATCH_ADVISORY_DB:-$root/../shared/advisory-db}
if [ ! -d "$db/crates" ]; then
  echo "audit: no advisory database at $db (set SDBATCH_ADVISORY_DB, or use --fresh)" >&2
  exit 2
fi
# --no-fetch: the snapshot is used as it is; --stale: it is older than cargo-audit's 90-day
# freshness window, on purpose (replace the snapshot to see newer advisories).
exec "$bin" audit --db "$db" --no-fetch --stale "$@"
