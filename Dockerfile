# One Dockerfile, one image per service. The workspace is compiled once (all
# three binaries in the `builder` stage); each service's image is a small
# stage on top of a distroless runtime with just its binary:
#
#   docker build --target gateway            -t shoal-gateway .
#   docker build --target worker             -t shoal-worker .
#   docker build --target metrics-aggregator -t shoal-metrics-aggregator .
#
# (`docker compose build` does exactly this.) Layer caching: the `skeleton`
# stage reduces the workspace to its manifests, build scripts and protos,
# with stub sources, so the dependency build below it is reused until a
# Cargo.toml, Cargo.lock or .proto changes; editing one service's code
# recompiles only the workspace's own crates. It works with the classic
# builder and with BuildKit alike (no cache mounts needed).
#
# Build arguments: VERSION, REVISION (the git commit), SOURCE go into the OCI
# labels; BUILDER_IMAGE and RUNTIME_IMAGE may pin the bases by digest.

ARG BUILDER_IMAGE=rust:1.95.0-slim-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot

# --- the workspace's manifests with stub sources ----------------------------
FROM ${BUILDER_IMAGE} AS skeleton
SHELL ["/bin/bash", "-o", "pipefail", "-c"]
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY proto proto
COPY crates crates
# Keep manifests and build scripts; every target root becomes a stub; every
# other file goes. The result changes only when a manifest, a build script,
# a .proto or the set of targets changes.
RUN find crates -type f ! -name Cargo.toml ! -name build.rs | while read -r file; do \
      case "$file" in \
        crates/*/src/lib.rs) : > "$file" ;; \
        crates/*/src/main.rs | crates/*/src/bin/*.rs | crates/*/tests/*/main.rs \
          | crates/*/benches/*.rs | crates/*/examples/*.rs) echo 'fn main() {}' > "$file" ;; \
        crates/*/tests/*/*) rm -f "$file" ;; \
        crates/*/tests/*.rs) echo 'fn main() {}' > "$file" ;; \
        *) rm -f "$file" ;; \
      esac; \
    done

# --- dependencies, then the workspace: one release build of all services -----
FROM ${BUILDER_IMAGE} AS builder
WORKDIR /src
ENV CARGO_TERM_COLOR=never \
    CARGO_INCREMENTAL=0 \
    CARGO_PROFILE_RELEASE_STRIP=symbols \
    CARGO_PROFILE_RELEASE_DEBUG=0
COPY --from=skeleton /src ./
RUN cargo build --release --locked --bins \
      -p shoal-gateway -p shoal-worker -p shoal-metrics-aggregator
# (proto/ came whole with the skeleton.)
COPY crates crates
# The stubs were compiled after the real files' mtimes: touch the real ones
# so cargo rebuilds the workspace's crates (and only those).
RUN find crates -name '*.rs' ! -name build.rs -exec touch {} + \
    && cargo build --release --locked --bins \
      -p shoal-gateway -p shoal-worker -p shoal-metrics-aggregator \
    && mkdir /out \
    && cp target/release/shoal-gateway target/release/shoal-worker target/release/shoal-metrics-aggregator /out/

# --- what every service image shares -----------------------------------------
FROM ${RUNTIME_IMAGE} AS runtime
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG SOURCE=https://gitlab.com/shoal/shoal
LABEL org.opencontainers.image.source="${SOURCE}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.vendor="Shoal"
# distroless "nonroot", numeric so that runAsNonRoot can verify it.
USER 65532:65532
ENV SHOAL_LOG_FORMAT=json

# --- the images --------------------------------------------------------------
FROM runtime AS gateway
LABEL org.opencontainers.image.title="shoal-gateway" \
      org.opencontainers.image.description="Shoal gateway: the HTTP front door that fans out over gRPC"
COPY --from=builder /out/shoal-gateway /usr/local/bin/shoal-gateway
EXPOSE 8080 9090
HEALTHCHECK --interval=5s --timeout=4s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/shoal-gateway", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/shoal-gateway"]

FROM runtime AS worker
LABEL org.opencontainers.image.title="shoal-worker" \
      org.opencontainers.image.description="Shoal worker: runs tasks and durable jobs"
COPY --from=builder /out/shoal-worker /usr/local/bin/shoal-worker
EXPOSE 50051 9091
HEALTHCHECK --interval=5s --timeout=4s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/shoal-worker", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/shoal-worker"]

FROM runtime AS metrics-aggregator
LABEL org.opencontainers.image.title="shoal-metrics-aggregator" \
      org.opencontainers.image.description="Shoal metrics-aggregator: one fleet view of every replica's metrics"
COPY --from=builder /out/shoal-metrics-aggregator /usr/local/bin/shoal-metrics-aggregator
EXPOSE 50052 9092
HEALTHCHECK --interval=5s --timeout=4s --start-period=10s --retries=3 \
  CMD ["/usr/local/bin/shoal-metrics-aggregator", "healthcheck"]
ENTRYPOINT ["/usr/local/bin/shoal-metrics-aggregator"]
