# syntax=docker/dockerfile:1
# sdbatch GPU image. libtorch comes from the PyPI torch wheel (the same 2.11.0 the project pins):
# the build stage unpacks it into /opt/libtorch (headers + the libraries sdbatch can load, see
# scripts/image-libtorch.sh), links against it, and the runtime stage ships exactly those libraries.
#
#   docker build -t sdbatch:0.1.0 .
#   buildah bud --format docker -t sdbatch:0.1.0 .       (docker format: OCI configs drop HEALTHCHECK)
#
# scripts/image-test.sh builds this file unchanged on local stand-ins for the two bases and runs
# the image (see the README).

ARG CUDA_RUNTIME=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG RUST_IMAGE=rust:1.95-bookworm

FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/requirements-fixtures.txt scripts/image-libtorch.sh scripts/
# torch only: the reference-fixture packages are for tests, not for the image. The venv is only a
# way to unpack the wheels; it is deleted in the same step, so the layer holds /opt/libtorch alone
# (the wheels' Python parts, triton included, never reach a layer). Before the sources are copied:
# a code change reuses this layer.
RUN python3 -m venv /tmp/torch-venv \
 && /tmp/torch-venv/bin/pip install --no-cache-dir "$(grep '^torch==' scripts/requirements-fixtures.txt)" \
 && scripts/image-libtorch.sh /tmp/torch-venv/lib/python3*/site-packages /opt/libtorch \
 && rm -rf /tmp/torch-venv
# torch-sys and build.rs read LIBTORCH (include/, lib/, build-version).
ENV LIBTORCH=/opt/libtorch
# buildah's layer cache can reuse a COPY of sources that have changed since (containers/buildah
# issue 6106; seen here: an image built from stale sources). A value that changes with the
# sources makes this step and every later one miss the cache: pass
# --build-arg SDBATCH_SOURCE=$(git rev-parse HEAD) (scripts/image-test.sh passes a hash of the
# build inputs). Docker compares the copied files itself and needs nothing.
ARG SDBATCH_SOURCE=unset
RUN echo "building sdbatch from sources ${SDBATCH_SOURCE}"
COPY Cargo.toml Cargo.lock build.rs ./
# The C++ bridge to libtorch (build.rs compiles it with the image's g++ against the venv's headers).
COPY csrc csrc
COPY src src
# Embedded in the binary: `sdbatch compile` runs it.
COPY scripts/compile_unet.py scripts/
# The built-in CLIP tokenizer's BPE file, embedded at compile time.
COPY data data
# Cache mounts (BuildKit and buildah): crates are downloaded once, and a code change recompiles the
# sdbatch crate alone. Neither lands in a layer, so the binary is copied out in the same step.
# `cargo clean -p sdbatch` first: the cached target folder outlives builds, and cargo trusts the
# copied files' mtimes against it; a file changed while an earlier build ran looked fresh to it
# (an image once shipped a binary of the previous sources). The dependencies stay cached.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo clean --release --locked -p sdbatch \
 && cargo build --release --locked --bin sdbatch \
 && mkdir -p /out \
 && cp target/release/sdbatch /out/

# `docker build --target compiler`: the image of the init container that runs `sdbatch compile`
# once per GPU type into a shared volume (deploy/k8s/deployment.yaml). AOTInductor needs Python,
# torch (the same wheel as the worker's libtorch), diffusers to build the model, and a C++
# compiler; the worker image needs none of them.
# Its own venv: the build stage deletes the one it unpacked libtorch from.
FROM build AS compiler
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir \
      "$(grep '^torch==' scripts/requirements-fixtures.txt)" \
      "$(grep '^diffusers==' scripts/requirements-fixtures.txt)" \
      "$(grep '^safetensors==' scripts/requirements-fixtures.txt)" \
 && cp /out/sdbatch /usr/local/bin/sdbatch \
 && useradd --system --uid 10001 --create-home sdbatch
ENV LD_LIBRARY_PATH=/opt/libtorch/lib SDBATCH_PYTHON=/opt/venv/bin/python RUST_LOG=info
USER 10001:10001
WORKDIR /home/sdbatch
ENTRYPOINT ["sdbatch"]
CMD ["compile", "--help"]

FROM ${CUDA_RUNTIME}
RUN useradd --system --uid 10001 --create-home sdbatch \
 && apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
# The libraries first: they change only with the torch pin, so after a code change the new image
# differs from the old one in its last, small layer (a pull fetches ~0.2 GB, not ~3.5 GB).
# As in the build stage: buildah's cache takes a COPY --from without looking at what it copies,
# so a value that changes with what the build stage made keeps each layer fresh (the libraries'
# with the torch pin, the binary's with the sources).
ARG SDBATCH_TORCH=unset
RUN echo "libtorch from ${SDBATCH_TORCH}"
COPY --from=build /opt/libtorch/lib /opt/sdbatch/lib
ARG SDBATCH_SOURCE=unset
RUN echo "sdbatch from sources ${SDBATCH_SOURCE}"
COPY --from=build /out/sdbatch /usr/local/bin/sdbatch
# /usr/local/nvidia/lib*: where the CUDA base images look for driver libraries that older NVIDIA
# container runtimes mount (the base's own LD_LIBRARY_PATH, which this line replaces).
ENV LD_LIBRARY_PATH=/opt/sdbatch/lib:/usr/local/nvidia/lib:/usr/local/nvidia/lib64 \
    RUST_LOG=info
# The model is mounted here (docker run -v /models/sd-v1-4:/models/sd:ro ...).
VOLUME ["/models"]
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/sdbatch
EXPOSE 9090
# The worker serves /healthz on --metrics-addr (default 0.0.0.0:9090); readiness (/readyz) is the
# orchestrator's business. The port follows SDBATCH_METRICS_ADDR when the address is set that way.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["sh", "-c", "a=${SDBATCH_METRICS_ADDR:-0.0.0.0:9090}; curl -fsS \"http://127.0.0.1:${a##*:}/healthz\" >/dev/null || exit 1"]
ENTRYPOINT ["sdbatch"]
CMD ["worker"]
