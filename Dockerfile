# syntax=docker/dockerfile:1

# token-broker container image: built with cargo-chef so dependencies are a
# cached layer of their own; the runtime is distroless (glibc, CA
# certificates, no shell) and runs as a fixed non-root user.
#
#   docker build --build-arg GIT_COMMIT="$(git rev-parse --short=12 HEAD)" -t token-broker:0.1.0 .

# Base images are pinned by digest, so a rebuild gets the same bytes whatever
# the tags point at today; the tag beside each digest says what it was. To
# move to newer base images, look the digests up and replace them together
# (the builder's and the runtime's glibc must stay compatible: both Debian 12):
#
#   docker buildx imagetools inspect rust:1.95-slim-bookworm --format '{{json .Manifest.Digest}}'
#   docker buildx imagetools inspect gcr.io/distroless/cc-debian12:nonroot --format '{{json .Manifest.Digest}}'

FROM rust:1.95-slim-bookworm@sha256:d7482085ff5b415f84dba5647ae71606650bdef00db7aeb69f4b3d170c3e4082 AS chef
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

FROM gcr.io/distroless/cc-debian12:nonroot@sha256:9dac0a79194e45a7da0158a9c6da57b217585af0786db3845d1f0ec1a0dd182f
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
# The binary is the entrypoint and `serve` the default command, so a container
# may run any subcommand (the dev overlay's simulator runs simulate-upstream);
# the manifests give `serve` explicitly.
ENTRYPOINT ["/usr/local/bin/token-broker"]
CMD ["serve"]
