# syntax=docker/dockerfile:1
#
# One image for the whole mesh: the four services and the `stagedoor` command. Compose (or any
# orchestrator) picks which binary a container runs through its command:
#
#   docker build -t stagedoor .
#   docker run --rm stagedoor stagedoor --help
#
# No protoc is needed: the protos are compiled by protox (pure Rust) inside the build.

FROM rust:1-bookworm AS builder
WORKDIR /src
COPY . .
# The registry and target/ live in BuildKit caches, so a rebuild after a code change compiles
# only what changed. target/ is a cache mount (gone after this step), hence the copy to /out.
RUN --mount=type=cache,id=stagedoor-cargo-registry,target=/usr/local/cargo/registry \
    --mount=type=cache,id=stagedoor-cargo-git,target=/usr/local/cargo/git \
    --mount=type=cache,id=stagedoor-target,target=/src/target \
    cargo build --release --locked \
        -p stagedoor-queue -p stagedoor-concert -p stagedoor-point -p stagedoor-payment \
        -p stagedoor \
    && mkdir -p /out \
    && cp target/release/stagedoor-queue target/release/stagedoor-concert \
          target/release/stagedoor-point target/release/stagedoor-payment \
          target/release/stagedoor /out/

FROM debian:bookworm-slim AS runtime
# hadolint ignore=DL3008
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates \
    && rm -rf /var/lib/apt/lists/*
RUN groupadd --system --gid 10001 stagedoor \
    && useradd --system --uid 10001 --gid stagedoor --no-create-home \
        --home-dir /nonexistent --shell /usr/sbin/nologin stagedoor
COPY --from=builder /out/ /usr/local/bin/
# Numeric, so that an orchestrator's runAsNonRoot can verify it.
USER 10001:10001
# The services' own default filter (libs/runtime/src/telemetry.rs), spelled out: RUST_LOG
# replaces all of it.
ENV RUST_LOG=info,sqlx=warn,h2=warn,tower=warn,hyper=warn
# No transparent huge pages, even where the host's THP mode is `always`: under a rush the
# kernel spent more time zeroing them than the services spent answering (libs/runtime).
ENV MIMALLOC_ALLOW_THP=0
# queue, concert, point, payment
EXPOSE 50051 50052 50053 50054
CMD ["stagedoor", "--help"]
