#!/usr/bin/env bash
# Builds the container image from the project's Dockerfile with buildah and runs it for real.
#
#   scripts/image-test.sh [--host-bin PATH] [--force]
#
# No Docker engine or registry is reachable here, so the two bases the Dockerfile names in its ARGs
# (rust:1.95-bookworm, nvidia/cuda:…-cudnn-runtime-ubuntu24.04) are replaced by local stand-ins
# built from Debian's packages: a Debian bookworm from debootstrap (the runtime base, like
# debian:bookworm-slim, without CUDA) and, on top of it, the compilers of buildpack-deps that a
# Rust build uses plus this machine's Rust toolchain copied in (the build base). The Dockerfile
# itself is built unchanged, with only --build-arg RUST_IMAGE=… --build-arg CUDA_RUNTIME=… and
# SDBATCH_SOURCE / SDBATCH_TORCH (hashes of the inputs: buildah's cache once reused a COPY of
# changed sources).
# Then, in the built image, as its own user (uid 10001):
#   1. sdbatch --version, and the user the image runs as;
#   2. the libraries: every DT_NEEDED of sdbatch and of /opt/sdbatch/lib resolves in the image, and
#      what a CPU run loads (LD_DEBUG);
#   3. sdbatch generate on the tiny model (mounted read-only) on the CPU: the same pixels as the
#      same command outside the image (--host-bin, by default a debug build of this tree);
#   4. a worker in the image against the local RabbitMQ and a local S3 server (host network):
#      the image's HEALTHCHECK command passes against it (and fails against a dead port), a
#      `sdbatch submit --wait` run from the image gets every batch's completion event and the
#      objects are in the store;
#   5. SIGTERM while a batch is in hand: the batch completes, the worker exits 0, the queue is empty.
# It prints the build times, the image's size and its layers' sizes.
#
# It runs only when its inputs changed since its last pass on this machine (a stamp over the
# Dockerfile, the crate's sources, the scripts and the tiny model; --force runs it anyway), so a
# repeated `scripts/test.sh` costs nothing. buildah keeps its layers and the Dockerfile's cache
# mounts (cargo's registry and target folder) under ~/.cache/sdbatch/image, so a changed source file
# rebuilds only the sdbatch crate. Needs root (buildah --isolation chroot); installs buildah and
# debootstrap from Debian where they are missing.
set -euo pipefail
root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
cd "$root"

host_bin="" force=0
while [ $# -gt 0 ]; do
  case "$1" in
    --host-bin) host_bin=$2; shift 2 ;;
    --force) force=1; shift ;;
    *) echo "usage: $0 [--host-bin PATH] [--force]" >&2; exit 2 ;;
  esac
done

cache=${SDBATCH_CACHE:-$HOME/.cache/sdbatch}
state="$cache/image"              # everything of this script's: buildah's storage, cache mounts, stamp
version=$(sed -n 's/^version = "\(.*\)"$/\1/p' Cargo.toml | head -n1)
image="localhost/sdbatch:$version" # the name deploy/ uses (sdbatch:VERSION)
# Bump when the stand-ins' recipe below changes: they are rebuilt under the new tag (and, since
# every layer above them changes, the next build is a cold one).
standin=v3
runtime_base="localhost/sdbatch-standin-debian:bookworm-slim-$standin"
rust_version=$(rustc --version | sed -n 's/^rustc \([0-9]*\.[0-9]*\)\..*/\1/p')
rust_base="localhost/sdbatch-standin-rust:$rust_version-bookworm-$standin"

log() { echo "image-test: $*"; }
die() { echo "image-test: FAIL: $*" >&2; exit 1; }
passed=0
pass() { passed=$((passed + 1)); log "PASS $*"; }

# --- the stamp: skip when nothing the image or the checks depend on changed -----------------------
stamp_inputs=(Dockerfile .dockerignore Cargo.toml Cargo.lock build.rs src data examples/prompts.jsonl
  scripts/image-test.sh scripts/image-libtorch.sh scripts/requirements-fixtures.txt scripts/s3.sh)
stamp=$( {
  find "${stamp_inputs[@]}" -type f -print0 | LC_ALL=C sort -z | xargs -0 sha256sum
  cat tests/fixtures/generated/.stamp # the tiny model's own stamp (scripts/setup.sh)
  echo "$rust_version $standin"
} | sha256sum | cut -c1-16)
# What the libtorch layer is made from (the final stage's build arg SDBATCH_TORCH).
torch_stamp=$(cat scripts/requirements-fixtures.txt scripts/image-libtorch.sh | sha256sum | cut -c1-16)
if [ "$force" = 0 ] && [ "$(cat "$state/stamp" 2>/dev/null)" = "$stamp" ]; then
  log "inputs unchanged since the last pass (stamp $stamp): skipped (--force runs it)"
  exit 0
fi

# --- tools ----------------------------------------------------------------------------------------
if ! command -v buildah >/dev/null 2>&1 || ! command -v debootstrap >/dev/null 2>&1; then
  log "installing buildah and debootstrap (apt)"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq buildah debootstrap >/dev/null
fi
mkdir -p "$state/tmp"
# One run at a time: they share the storage, the RabbitMQ queue names and the cache mounts.
exec 9>"$state/lock"
flock -w 3600 9 || die "another image test holds $state/lock"
# One place for everything buildah writes: images and layers, its run state, and (through TMPDIR)
# the Dockerfile's RUN --mount=type=cache folders, which buildah keeps in $TMPDIR/buildah-cache.
export TMPDIR="$state/tmp"
# Every run and build step in a chroot: the OCI runtimes (crun, runc) need cgroup and namespace
# setups that this machine lacks.
export BUILDAH_ISOLATION=chroot
bh() { buildah --root "$state/storage" --runroot "$state/run" --storage-driver overlay "$@"; }

# Disk: a cold build peaks at ~15 GB above what it leaves behind (~11 GB: the stand-ins, the build
# stage's libtorch layer, cargo's cache folders, the image), a build on a warm cache at ~8 GB. Refuse
# to start rather than fill a shared disk; SDBATCH_IMAGE_RESERVE_GB is what must stay free besides.
if bh inspect --type image "$image" >/dev/null 2>&1; then need_gb=8; else need_gb=16; fi
need_gb=$((need_gb + ${SDBATCH_IMAGE_RESERVE_GB:-4}))
free_gb=$(df -P --block-size=1G "$state" | awk 'NR==2 {print $4}')
if [ "$free_gb" -lt "$need_gb" ]; then
  die "only ${free_gb} GB free under $state, the build needs ~${need_gb} GB (SDBATCH_IMAGE_RESERVE_GB included)"
fi

# --- the stand-in bases ---------------------------------------------------------------------------
if ! bh inspect --type image "$runtime_base" >/dev/null 2>&1; then
  t0=$SECONDS
  log "building $runtime_base (debootstrap, minbase: what debian:bookworm-slim holds)"
  rootfs="$state/rootfs"
  rm -rf "$rootfs"
  debootstrap --variant=minbase bookworm "$rootfs" http://deb.debian.org/debian >"$state/debootstrap.log" 2>&1 ||
    { tail -n 20 "$state/debootstrap.log" >&2; die "debootstrap failed (log: $state/debootstrap.log)"; }
  # The same package sources as the real image (with updates and security), and no package lists or
  # downloaded packages left in the image.
  rm -f "$rootfs/etc/apt/sources.list"
  cat >"$rootfs/etc/apt/sources.list.d/debian.sources" <<'EOF'
Types: deb
URIs: http://deb.debian.org/debian
Suites: bookworm bookworm-updates
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg

Types: deb
URIs: http://deb.debian.org/debian-security
Suites: bookworm-security
Components: main
Signed-By: /usr/share/keyrings/debian-archive-keyring.gpg
EOF
  # And apt's cache files (~80 MB) cleaned after every apt run, as the official debian and ubuntu
  # images do (their /etc/apt/apt.conf.d/docker-clean): without it the image would measure bigger
  # here than on the real base.
  cat >"$rootfs/etc/apt/apt.conf.d/docker-clean" <<'EOF'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/archives/partial/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache "";
Dir::Cache::srcpkgcache "";
EOF
  rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/archives/*.deb "$rootfs"/var/cache/apt/*.bin
  ctr=$(bh from scratch)
  bh copy "$ctr" "$rootfs/" / >/dev/null
  bh config --cmd bash --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin "$ctr"
  bh commit --quiet --rm "$ctr" "$runtime_base" >/dev/null
  rm -rf "$rootfs"
  log "built $runtime_base in $((SECONDS - t0)) s"
fi

if ! bh inspect --type image "$rust_base" >/dev/null 2>&1; then
  t0=$SECONDS
  sysroot=$(rustc --print sysroot)
  log "building $rust_base (compilers from buildpack-deps:bookworm + the toolchain in $sysroot)"
  ctx="$state/rust-context"
  rm -rf "$ctx"
  mkdir -p "$ctx/toolchain" "$ctx/ca"
  # This machine reaches PyPI and crates.io through an egress proxy that presents its own CA, which
  # the host trusts (/usr/local/share/ca-certificates, PIP_CERT, ...). The stand-in trusts it too,
  # as a base image made for such a network would; the Dockerfile needs nothing of it.
  cp /usr/local/share/ca-certificates/*.crt "$ctx/ca/" 2>/dev/null || true
  # Hard links, not copies: the toolchain is ~600 MB. Its docs (share/) stay out.
  for d in bin lib libexec etc; do [ -e "$sysroot/$d" ] && cp -al "$sysroot/$d" "$ctx/toolchain/"; done
  tc="/usr/local/rustup/toolchains/$(rustc --version | awk '{print $2}')-x86_64-unknown-linux-gnu"
  # The layout and environment of the official rust image (RUSTUP_HOME, CARGO_HOME, cargo on PATH).
  # The packages: those of buildpack-deps:bookworm (the rust image's base) that a Rust build can
  # touch; it has many more (-dev libraries) that sdbatch does not link.
  cat >"$ctx/Containerfile" <<EOF
FROM $runtime_base
COPY ca /usr/local/share/ca-certificates
RUN apt-get update \\
 && apt-get install -y --no-install-recommends ca-certificates curl wget netbase git procps \\
      gcc g++ libc6-dev make autoconf automake libtool patch file bzip2 unzip xz-utils dpkg-dev \\
      libssl-dev zlib1g-dev \\
 && update-ca-certificates \\
 && rm -rf /var/lib/apt/lists/*
ENV RUSTUP_HOME=/usr/local/rustup CARGO_HOME=/usr/local/cargo \\
    PATH=/usr/local/cargo/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \\
    SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt PIP_CERT=/etc/ssl/certs/ca-certificates.crt \\
    REQUESTS_CA_BUNDLE=/etc/ssl/certs/ca-certificates.crt CARGO_HTTP_CAINFO=/etc/ssl/certs/ca-certificates.crt
COPY toolchain $tc
RUN mkdir -p /usr/local/cargo/bin \\
 && for t in cargo rustc rustdoc; do ln -s $tc/bin/\$t /usr/local/cargo/bin/\$t; done \\
 && cargo --version && rustc --version
EOF
  bh bud --quiet --isolation chroot --layers=false --force-rm -t "$rust_base" "$ctx" >/dev/null ||
    die "building $rust_base failed"
  rm -rf "$ctx"
  log "built $rust_base in $((SECONDS - t0)) s"
fi

# --- the image ------------------------------------------------------------------------------------
t0=$SECONDS
log "building $image from Dockerfile (RUST_IMAGE=$rust_base, CUDA_RUNTIME=$runtime_base)"
# --format docker: OCI image configs have no HEALTHCHECK. --layers: keep every step as a cache.
# Two runs, the build stage first: buildah keeps each stage's working container (a second copy of
# all the stage wrote) until the run ends, so in one run the build stage's ~3.5 GB copy would
# still be there while the runtime stage copies the libraries. The second run takes the build
# stage from the layer cache.
: >"$state/build.log"
for run in "--target build -t localhost/sdbatch-build:$version" "-t $image"; do
  # shellcheck disable=SC2086 # $run is two options, split on purpose
  bh bud --isolation chroot --layers --force-rm --format docker --pull=false \
    --build-arg "RUST_IMAGE=$rust_base" --build-arg "CUDA_RUNTIME=$runtime_base" \
    --build-arg "SDBATCH_SOURCE=$stamp" --build-arg "SDBATCH_TORCH=$torch_stamp" \
    $run -f Dockerfile . >>"$state/build.log" 2>&1 ||
    { tail -n 40 "$state/build.log" >&2; die "buildah bud failed (log: $state/build.log)"; }
done
build_secs=$((SECONDS - t0))
# Bound the disk across runs: intermediate images (the layer cache) of earlier builds that the
# current ones no longer build on, e.g. the previous binary's layers, are removed; the cache of
# the current build is kept. (buildah rmi --prune would remove that cache too.)
python3 - "$state/storage/overlay-images/images.json" "$state/storage/overlay-layers/layers.json" <<'EOF' |
import json, sys
images = json.load(open(sys.argv[1]))
parent = {l["id"]: l.get("parent") for l in json.load(open(sys.argv[2]))}
in_use = set()
for img in images:
    if img.get("names"): # tagged: the stand-ins, the build stage, the image
        layer = img.get("layer")
        while layer and layer not in in_use:
            in_use.add(layer)
            layer = parent.get(layer)
for img in images:
    if not img.get("names") and img.get("layer") not in in_use:
        print(img["id"])
EOF
  while read -r stale; do bh rmi "$stale" >/dev/null 2>&1 || true; done
cached_steps=$(grep -c -- '--> Using cache' "$state/build.log" || true)
grep -E '^image-libtorch: (dropped|kept)' "$state/build.log" | sed 's/^/  /' || true
log "built $image in ${build_secs} s (${cached_steps} steps from the layer cache; log: $state/build.log)"

# The image's size and its layers (sizes from containers/storage's layer records).
bh inspect --type image "$image" >"$state/inspect.json"
python3 - "$state/inspect.json" "$state/storage/overlay-layers/layers.json" <<'EOF'
import json, sys
img = json.load(open(sys.argv[1]))
layers = {l.get("diff-digest"): l.get("diff-size", 0) for l in json.load(open(sys.argv[2]))}
diffs = img["Docker"]["rootfs"]["diff_ids"]
steps = [h for h in img["Docker"]["history"] if not h.get("empty_layer")]
total = 0
print("image-test: layers (uncompressed):")
for i, d in enumerate(diffs):
    size = layers.get(d, 0)
    total += size
    what = steps[i]["created_by"] if i < len(steps) else "?"
    what = what.replace("/bin/sh -c #(nop) ", "").replace("/bin/sh -c ", "RUN ")
    print(f"  {size / 2**20:9.1f} MiB  {what[:110]}")
print(f"image-test: image size {total / 2**20:.1f} MiB ({total / 1e9:.2f} GB) in {len(diffs)} layers")
EOF

# --- checks ---------------------------------------------------------------------------------------
work=$(mktemp -d "$state/tmp/run.XXXXXX")
containers=()
worker_pid="" submit_pid="" s3_port=""
# The processes under `buildah run` PID called NAME (buildah does not forward signals to them).
descendant() { # PID NAME
  local p
  for p in $(ps -o pid= --ppid "$1"); do
    [ "$(cat "/proc/$p/comm" 2>/dev/null)" = "$2" ] && { echo "$p"; return 0; }
    descendant "$p" "$2" && return 0
  done
  return 1
}
cleanup() {
  # The worker inside first: killing buildah run alone leaves it running (and holding the lock).
  if [ -n "$worker_pid" ]; then
    inner=$(descendant "$worker_pid" sdbatch) && kill -KILL "$inner" 2>/dev/null
    kill "$worker_pid" 2>/dev/null
  fi
  [ -n "$submit_pid" ] && kill "$submit_pid" 2>/dev/null
  [ -n "$s3_port" ] && S3_PORT=$s3_port scripts/s3.sh stop >/dev/null 2>&1
  for c in "${containers[@]}"; do bh rm "$c" >/dev/null 2>&1; done
  rm -rf "$work"
  return 0
}
trap cleanup EXIT
# Called as c=$(new_container NAME), in a subshell, so the caller records it in containers.
new_container() { bh from --pull=false --name "sdbatch-image-test-$1-$$" "$image"; }
free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
# Polls "$@" once a second until it succeeds, for at most $1 seconds.
wait_for() {
  local limit=$1
  shift
  for _ in $(seq 1 "$limit"); do
    "$@" && return 0
    sleep 1
  done
  return 1
}

tool=$(new_container tool)
containers+=("$tool")
# Mounts are read-only; the one output folder is the image user's (uid 10001).
mkdir -p "$work/out-image" "$work/out-host" "$work/in"
chown 10001:10001 "$work/out-image"
fixture="$root/tests/fixtures/generated/tiny-sd"
[ -f "$fixture/model_index.json" ] || die "no tiny model at $fixture: run scripts/setup.sh"
# The image's user must be able to read the model: the fixture's weights are written 0600 (root),
# as a model folder often is, so the test mounts a copy that everyone may read (deploy/ says so).
model="$work/model"
cp -r "$fixture" "$model"
chmod -R a+rX "$model"

# 1. The user and --version.
uid=$(bh run "$tool" -- id -u)
[ "$uid" = 10001 ] || die "the image runs as uid $uid, not 10001"
in_image_version=$(bh run "$tool" -- sdbatch --version)
[ "$in_image_version" = "sdbatch $version" ] || die "sdbatch --version in the image: '$in_image_version'"
pass "sdbatch --version in the image: '$in_image_version', as uid $uid"

# 2. Libraries: every DT_NEEDED resolves in the image; what a CPU run loads.
if bh run "$tool" -- ldd /usr/local/bin/sdbatch | grep 'not found'; then
  die "sdbatch has unresolved libraries in the image"
fi
# Only the driver (mounted by the NVIDIA Container Toolkit on a GPU host) and what NVSHMEM's and
# cuFile's multi-node plugins use (InfiniBand, MPI, UCX, libfabric: from the host, when used) may
# be missing; scripts/image-libtorch.sh explains what was left out and why.
# shellcheck disable=SC2016 # expanded by the image's shell
missing=$(bh run "$tool" -- sh -c 'for f in /opt/sdbatch/lib/*; do ldd "$f" | sed -n "s|^\t\(.*\) => not found|\1|p"; done' |
  sort -u | grep -vxE 'libcuda\.so\.1|libibverbs\.so\.1|libmlx5\.so\.1|librdmacm\.so\.1|libmpi\.so\.40|libpmix\.so\.2|liboshmem\.so\.40|libfabric\.so\.1|libucp\.so\.0|libucs\.so\.0' || true)
[ -z "$missing" ] || die "libraries in /opt/sdbatch/lib need what the image lacks: $missing"
nlibs=$(bh run "$tool" -- sh -c 'ls /opt/sdbatch/lib | wc -l')
loaded=$(bh run --env LD_DEBUG=libs "$tool" -- sdbatch --version 2>&1 | sed -n 's/.*calling init: \(.*\)$/\1/p' | sort -u)
from_lib=$(grep -c '^/opt/sdbatch/lib/' <<<"$loaded" || true)
pass "libraries: $nlibs in /opt/sdbatch/lib, all their DT_NEEDED resolve (but the host-provided driver/RDMA/MPI ones); a CPU run loads $(wc -l <<<"$loaded") files, $from_lib of them from /opt/sdbatch/lib"

# 3. generate on the CPU, in the image and outside it: the same pixels.
printf '%s\n' '{"id": "bag", "prompt": "a leather handbag", "seed": 5}' \
  '{"id": "sneaker", "prompt": "a red sneaker", "negative_prompt": "blurry", "seed": 6}' >"$work/in/prompts.jsonl"
gen_args=(--prompts /in/prompts.jsonl --steps 4 --batch-size 2 --device cpu)
bh run -v "$model:/models/sd:ro" -v "$work/in:/in:ro" -v "$work/out-image:/out" "$tool" -- \
  sdbatch generate --model /models/sd --out /out "${gen_args[@]}" >"$work/gen-image.log" 2>&1 ||
  { cat "$work/gen-image.log" >&2; die "generate in the image failed"; }
if [ -z "$host_bin" ]; then
  # The profile scripts/test.sh builds (cargo test): nothing to compile there. Same libtorch,
  # same numbers: the profile changes no floating-point result.
  # shellcheck source=scripts/env.sh
  host_bin=$(. scripts/env.sh && cargo build --locked --quiet --bin sdbatch && echo "$CARGO_TARGET_DIR/debug/sdbatch")
fi
# The image's binary is this tree's: every subcommand's --help equals the host build's (an image
# built from stale sources once passed every other check).
for cmd in "" generate worker submit status cancel; do
  # shellcheck disable=SC2086 # an empty $cmd is no argument
  in_image=$(bh run "$tool" -- sdbatch $cmd --help)
  # shellcheck disable=SC2086,SC1091
  on_host=$(. scripts/env.sh && "$host_bin" $cmd --help)
  [ "$in_image" = "$on_host" ] || die "sdbatch $cmd --help differs between the image and this tree: a stale image"
done
(
  # shellcheck source=scripts/env.sh
  . scripts/env.sh
  "$host_bin" generate --model "$model" --out "$work/out-host" --prompts "$work/in/prompts.jsonl" \
    "${gen_args[@]:2}"
) >"$work/gen-host.log" 2>&1 || { cat "$work/gen-host.log" >&2; die "generate outside the image failed"; }
compare=$("$root/.venv/bin/python" - "$work/out-image" "$work/out-host" <<'EOF'
import pathlib, sys
from PIL import Image
a, b = map(pathlib.Path, sys.argv[1:3])
names = sorted(p.name for p in a.glob("*.png"))
if not names or names != sorted(p.name for p in b.glob("*.png")):
    sys.exit(f"different PNG files: {names} vs {sorted(p.name for p in b.glob('*.png'))}")
same_bytes = 0
for n in names:
    x, y = Image.open(a / n), Image.open(b / n)
    if (x.size, x.mode, x.tobytes()) != (y.size, y.mode, y.tobytes()):
        sys.exit(f"{n}: pixels differ")
    same_bytes += (a / n).read_bytes() == (b / n).read_bytes()
print(f"{len(names)} PNGs ({x.size[0]}x{x.size[1]}), pixels identical, {same_bytes} byte-identical")
EOF
) || die "generate: the image's output differs from the host's: $compare"
pass "the image's CLI is this tree's (--help of every subcommand); generate on the CPU (tiny model mounted read-only): $compare to the host build's"

# 4. The worker in the image, on the local RabbitMQ and a local S3 server.
scripts/services.sh start >/dev/null
prefix=sdbatch-image-test
# A previous run that died may have left messages behind.
for q in "$prefix.jobs" "$prefix.jobs.dead"; do rabbitmqctl -q purge_queue "$q" >/dev/null 2>&1 || true; done
s3_port=$(free_port)
export AWS_ACCESS_KEY_ID=sdbatch AWS_SECRET_ACCESS_KEY=sdbatch-secret
S3_PORT=$s3_port S3_DATA="$work/s3" scripts/s3.sh start >/dev/null 9>&-
mkdir -p "$work/s3/images" # s3s-fs buckets are folders
metrics_port=$(free_port)
amqp=amqp://guest:guest@127.0.0.1:5672/%2f
worker_ctr=$(new_container worker)
containers+=("$worker_ctr")
# The worker's settings as a deployment passes them: environment variables (deploy/k8s/configmap.yaml).
bh run -v "$model:/models/sd:ro" \
  --env "AMQP_URL=$amqp" --env "S3_ENDPOINT=http://127.0.0.1:$s3_port" --env S3_BUCKET=images \
  --env "AWS_ACCESS_KEY_ID=$AWS_ACCESS_KEY_ID" --env "AWS_SECRET_ACCESS_KEY=$AWS_SECRET_ACCESS_KEY" --env SDBATCH_MODEL=/models/sd \
  --env SDBATCH_QUEUE_PREFIX=$prefix --env "SDBATCH_METRICS_ADDR=127.0.0.1:$metrics_port" \
  --env SDBATCH_GRACE_PERIOD_SECS=300 --env NO_COLOR=1 \
  "$worker_ctr" -- sdbatch worker --worker-id image-test --max-batch 2 >"$work/worker.log" 2>&1 9>&- &
worker_pid=$!
ready() {
  kill -0 "$worker_pid" 2>/dev/null || { cat "$work/worker.log" >&2; die "the worker in the image exited"; }
  curl -fsS -o /dev/null "http://127.0.0.1:$metrics_port/readyz" 2>/dev/null
}
wait_for 180 ready || { tail -n 30 "$work/worker.log" >&2; die "the worker in the image was not ready within 180 s"; }
pass "worker in the image: /readyz 200 (model loaded, RabbitMQ connected, S3 reachable)"

# The HEALTHCHECK exactly as the image declares it, run in the image.
mapfile -t hc < <(bh inspect --type image "$image" | python3 -c '
import json, sys
test = json.load(sys.stdin)["Docker"]["config"]["Healthcheck"]["Test"]
assert test[0] == "CMD", test
print("\n".join(test[1:]))')
[ "${#hc[@]}" -gt 0 ] || die "the image has no HEALTHCHECK"

bh run --env "SDBATCH_METRICS_ADDR=127.0.0.1:$metrics_port" "$tool" -- "${hc[@]}" ||
  die "the HEALTHCHECK command failed against the running worker"
if bh run --env "SDBATCH_METRICS_ADDR=127.0.0.1:$(free_port)" "$tool" -- "${hc[@]}" 2>/dev/null; then
  die "the HEALTHCHECK command passed against a port nobody listens on"
fi
pass "HEALTHCHECK (${hc[*]}): passes against the worker, fails against a dead port"

run_submit() { # BATCH_PREFIX ARGS...: sdbatch submit --wait, run from the image
  local bp=$1
  shift
  bh run -v "$work/in:/in:ro" --env "AMQP_URL=$amqp" --env SDBATCH_QUEUE_PREFIX=$prefix "$tool" -- \
    sdbatch submit --prompts /in/prompts.jsonl --batch-prefix "$bp" --wait --timeout-secs 300 "$@"
}
batch_prefix="image-test-$(date +%s)"
run_submit "$batch_prefix" --batch-size 1 --steps 4 >"$work/submit.log" 2>&1 ||
  { cat "$work/submit.log" "$work/worker.log" >&2; die "submit --wait from the image did not see its batches complete"; }
manifests=$(find "$work/s3/images" -path "*/$batch_prefix-*/manifest.json" | wc -l)
pngs=$(find "$work/s3/images" -path "*/$batch_prefix-*" -name '*.png' | wc -l)
if [ "$manifests" != 2 ] || [ "$pngs" != 2 ]; then
  die "expected 2 manifests and 2 PNGs in S3, found $manifests and $pngs"
fi
sed 's/^/  /' "$work/submit.log" | tail -n 8
pass "worker in the image: 2 batches completed (batch.completed events seen by submit --wait), 2 manifests + 2 PNGs in S3"

# 5. SIGTERM with a batch in hand: 8 images of 150 steps, 4 GPU batches of 2, seconds of work.
printf '%s\n' '{"id": "drain", "prompt": "a lighthouse at dusk", "seed": 7, "num_images": 8}' >"$work/in/drain.jsonl"
drain_prefix="image-test-drain-$(date +%s)"
received() { curl -fsS "http://127.0.0.1:$metrics_port/metrics" | awk '/^sdbatch_lane_messages_received_total/ {n += $2} END {print n + 0}'; }
received_before=$(received)
bh run -v "$work/in:/in:ro" --env "AMQP_URL=$amqp" --env SDBATCH_QUEUE_PREFIX=$prefix "$tool" -- \
  sdbatch submit --prompts /in/drain.jsonl --batch-prefix "$drain_prefix" --steps 150 \
  --wait --timeout-secs 400 >"$work/drain-submit.log" 2>&1 9>&- &
submit_pid=$!
# A counter, polled often: a gauge of the messages in hand can rise and fall between two polls.
taken() { [ "$(received)" -gt "$received_before" ]; }
for _ in $(seq 1 1200); do taken && break; sleep 0.1; done
taken || die "the drain batch never reached the worker"
# buildah run does not forward signals (it would kill the container), so TERM goes where a
# container runtime sends it: to the entrypoint process, sdbatch, a descendant of our buildah run.
sdbatch_pid=$(descendant "$worker_pid" sdbatch) || die "no sdbatch process under buildah run $worker_pid"
kill -TERM "$sdbatch_pid"
exited() { ! kill -0 "$worker_pid" 2>/dev/null; }
wait_for 330 exited || die "the worker did not exit within 330 s of SIGTERM"
worker_rc=0
wait "$worker_pid" || worker_rc=$?
worker_pid=""
[ "$worker_rc" = 0 ] || { tail -n 30 "$work/worker.log" >&2; die "the worker exited $worker_rc after SIGTERM"; }
submit_rc=0
wait "$submit_pid" || submit_rc=$?
submit_pid=""
[ "$submit_rc" = 0 ] || { cat "$work/drain-submit.log" >&2; die "the batch in hand at SIGTERM did not complete"; }
drained=$(find "$work/s3/images" -path "*/$drain_prefix-*" -name '*.png' | wc -l)
# RabbitMQ's queue counts lag the acks by up to its stats interval (5 s): poll until it reads 0.
queued=""
queue_empty() {
  queued=$(rabbitmqctl -q list_queues name messages 2>/dev/null | awk -v q="$prefix.jobs" '$1 == q {print $2}')
  [ "$queued" = 0 ]
}
wait_for 30 queue_empty || true
if [ "$drained" != 8 ] || [ "$queued" != 0 ]; then
  die "after the drain: $drained of 8 PNGs stored, '$queued' messages left in $prefix.jobs"
fi
grep -q "finishing the messages in hand in_hand=1" "$work/worker.log" ||
  die "the worker did not hold the batch when SIGTERM came (its log does not say it finished one)"
pass "SIGTERM with a batch in hand: it completed (event + 8 PNGs), the worker exited 0, $prefix.jobs is empty"

echo "$stamp" >"$state/stamp"
log "built in ${build_secs} s; storage under $state: $(du -sh "$state" 2>/dev/null | cut -f1)"
echo "image-test: $passed passed, 0 failed"
