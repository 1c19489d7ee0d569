# syntax=docker/dockerfile:1
# The pgshift image: one static binary, both the CLI and the operator (`pgshift operator`,
# the default command). Build with: docker build -t pgshift:0.1.0 .

ARG RUST_VERSION=1.95

FROM rust:${RUST_VERSION}-bookworm AS build
# ring compiles C and assembly: it needs a musl C compiler for the static target.
RUN apt-get update \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y --no-install-recommends musl-tools \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
ENV CC_x86_64_unknown_linux_musl=musl-gcc \
    CARGO_PROFILE_RELEASE_STRIP=symbols
WORKDIR /src
# The whole workspace: cargo loads every member's manifest even to build one package.
COPY . .
# Cache mounts keep the registry and target directory between builds without baking them into
# a layer; the binary is copied out because the target mount is gone after this step.
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p pgshift --target x86_64-unknown-linux-musl \
 && install -D -m 0755 target/x86_64-unknown-linux-musl/release/pgshift /out/pgshift

# No shell, no package manager: the operator needs only its binary and CA certificates.
FROM gcr.io/distroless/static-debian12:nonroot
ARG VERSION=0.1.0
ARG REVISION=unknown
ARG CREATED=unknown
LABEL org.opencontainers.image.title="pgshift" \
      org.opencontainers.image.description="PostgreSQL major-version upgrades with a millisecond write pause; CLI and Kubernetes operator" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${REVISION}" \
      org.opencontainers.image.created="${CREATED}" \
      org.opencontainers.image.licenses="Apache-2.0"
COPY --from=build /out/pgshift /pgshift
# Numeric, so that the kubelet can verify runAsNonRoot.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/pgshift"]
CMD ["operator"]
