# syntax=docker/dockerfile:1.7
# Roster: a release build in a Rust image, shipped on distroless (no shell, no package
# manager, non-root). Build: docker build -t roster . ; run with DATABASE_URL set (the
# embedded PostgreSQL of `roster serve` is for development machines, not images).

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# Cache mounts keep the crates.io download and the compiled dependencies between builds,
# so a source change recompiles Roster only.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked --bin roster \
    && cp target/release/roster /roster

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /roster /usr/local/bin/roster
ENV ROSTER_LISTEN=0.0.0.0:50051 \
    ROSTER_METRICS_LISTEN=0.0.0.0:9090 \
    ROSTER_LOG_FORMAT=json \
    RUST_LOG=info
# gRPC (with grpc.health.v1 for the Kubernetes gRPC probe, and reflection); Prometheus.
EXPOSE 50051 9090
# distroless nonroot
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/roster"]
CMD ["serve"]
