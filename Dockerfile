# syntax=docker/dockerfile:1
# sluice as a container: `docker build -t sluice .` (or `podman build`). The build stage
# keeps the crate registry and the target directory in BuildKit cache mounts, so a change
# to the sources rebuilds sluice's own crates, not its ~500 dependencies. The runtime
# stage is Debian slim with the binary, CA certificates and curl (for HEALTHCHECK),
# running as an unprivileged user. See compose.yaml and docs/operations.md.
ARG RUST_IMAGE=docker.io/library/rust:1.95-slim-bookworm
ARG RUNTIME_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin sluice \
    && cp target/release/sluice /usr/local/bin/sluice

FROM ${RUNTIME_IMAGE}
# Unpinned on purpose: the image takes bookworm's security updates when it is rebuilt.
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates curl \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --system --uid 10001 --user-group --home-dir /var/lib/sluice --create-home sluice
COPY --from=build /usr/local/bin/sluice /usr/local/bin/sluice
USER 10001:10001
WORKDIR /var/lib/sluice
# The embedded queue and warehouse (when no Redis or PostgreSQL is configured) live here.
ENV SLUICE_DATA_DIR=/var/lib/sluice
VOLUME ["/var/lib/sluice"]
EXPOSE 8080
# `sluice serve` answers /health on its API port; a worker or scheduler container
# overrides this check with its --metrics-listen port (compose.yaml does).
HEALTHCHECK --interval=15s --timeout=5s --start-period=20s --retries=3 \
    CMD ["curl", "-fsS", "-o", "/dev/null", "http://127.0.0.1:8080/health"]
ENTRYPOINT ["/usr/local/bin/sluice"]
CMD ["--log-format", "json", "serve", "--listen", "0.0.0.0:8080"]
