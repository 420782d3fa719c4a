# syntax=docker/dockerfile:1
# sdbatch GPU image. libtorch comes from the PyPI torch wheel (the same 2.11.0 the project pins),
# installed into a venv in the build stage and copied, libraries only, into a slim CUDA runtime.

ARG CUDA_RUNTIME=nvidia/cuda:13.0.1-cudnn-runtime-ubuntu24.04
ARG RUST_IMAGE=rust:1.95-bookworm

FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends python3 python3-venv python3-pip \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY scripts/requirements-fixtures.txt scripts/
# torch only: the reference-fixture packages are for tests, not for the image.
RUN python3 -m venv /opt/venv \
 && /opt/venv/bin/pip install --no-cache-dir "$(grep '^torch==' scripts/requirements-fixtures.txt)"
ENV PATH=/opt/venv/bin:$PATH LIBTORCH_USE_PYTORCH=1
COPY Cargo.toml Cargo.lock build.rs ./
# The C++ bridge to libtorch (build.rs compiles it with the image's g++ against the venv's headers).
COPY csrc csrc
COPY src src
# Embedded in the binary: `sdbatch compile` runs it.
COPY scripts/compile_unet.py scripts/
# The built-in CLIP tokenizer's BPE file, embedded at compile time.
COPY data data
RUN cargo build --release --locked --bin sdbatch \
 && mkdir -p /out/lib \
 && cp target/release/sdbatch /out/ \
 && cp -a /opt/venv/lib/python3*/site-packages/torch/lib/. /out/lib/ \
 && for d in /opt/venv/lib/python3*/site-packages/nvidia/*/lib; do cp -a "$d"/. /out/lib/; done

# `docker build --target compiler`: the image of the init container that runs `sdbatch compile`
# once per GPU type into a shared volume (deploy/k8s/deployment.yaml). AOTInductor needs Python,
# torch (the same wheel as the worker's libtorch), diffusers to build the model, and a C++
# compiler; the worker image needs none of them.
FROM build AS compiler
RUN /opt/venv/bin/pip install --no-cache-dir \
      "$(grep '^diffusers==' scripts/requirements-fixtures.txt)" \
      "$(grep '^safetensors==' scripts/requirements-fixtures.txt)" \
 && cp /out/sdbatch /usr/local/bin/sdbatch \
 && useradd --system --uid 10001 --create-home sdbatch
ENV LD_LIBRARY_PATH=/out/lib SDBATCH_PYTHON=/opt/venv/bin/python RUST_LOG=info
USER 10001:10001
WORKDIR /home/sdbatch
ENTRYPOINT ["sdbatch"]
CMD ["compile", "--help"]

FROM ${CUDA_RUNTIME}
RUN useradd --system --uid 10001 --create-home sdbatch \
 && apt-get update && apt-get install -y --no-install-recommends ca-certificates curl \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /out/lib /opt/sdbatch/lib
COPY --from=build /out/sdbatch /usr/local/bin/sdbatch
ENV LD_LIBRARY_PATH=/opt/sdbatch/lib \
    RUST_LOG=info
# The model is mounted here (docker run -v /models/sd-v1-4:/models/sd:ro ...).
VOLUME ["/models"]
# Numeric, so Kubernetes' runAsNonRoot can verify it without reading /etc/passwd.
USER 10001:10001
WORKDIR /home/sdbatch
EXPOSE 9090
# The worker serves /healthz on --metrics-addr (default 0.0.0.0:9090); readiness (/readyz) is the
# orchestrator's business.
HEALTHCHECK --interval=30s --timeout=5s --start-period=300s --retries=3 \
  CMD ["sh", "-c", "curl -fsS http://127.0.0.1:9090/healthz >/dev/null || exit 1"]
ENTRYPOINT ["sdbatch"]
CMD ["worker"]
