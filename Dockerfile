# syntax=docker/dockerfile:1

# token-broker container image: built with cargo-chef so dependencies are a
# cached layer of their own; the runtime is distroless (glibc, CA
# certificates, no shell) and runs as a fixed non-root user.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse --short=12 HEAD)" -t token-broker .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-slim-bookworm AS chef
RUN cargo install cargo-chef --locked --version 0.1.78
WORKDIR /src

FROM chef AS planner
COPY . .
RUN cargo chef prepare --recipe-path recipe.json

FROM chef AS builder
COPY --from=planner /src/recipe.json recipe.json
RUN cargo chef cook --release --locked --recipe-path recipe.json
COPY . .
# The commit for token_broker_build_info (the context has no .git).
ARG GIT_COMMIT=unknown
RUN TOKEN_BROKER_COMMIT="${GIT_COMMIT}" cargo build --release --locked --bin token-broker

FROM gcr.io/distroless/cc-debian12:nonroot
ARG GIT_COMMIT=unknown
LABEL org.opencontainers.image.title="token-broker" \
      org.opencontainers.image.description="Hands internal callers BotPenguin user tokens without exposing the partner key" \
      org.opencontainers.image.version="0.1.0" \
      org.opencontainers.image.revision="${GIT_COMMIT}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=builder /src/target/release/token-broker /usr/local/bin/token-broker
# 65532 is distroless's "nonroot"; Kubernetes manifests pin the same UID.
USER 65532:65532
WORKDIR /
EXPOSE 8080 9090
ENTRYPOINT ["/usr/local/bin/token-broker", "serve"]
