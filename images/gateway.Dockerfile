# The gateway image: one static binary (API, proxy, controller) on distroless, as a non-root user.
#   docker build -f images/gateway.Dockerfile -t ghcr.io/dask-gateway-rs/gateway:0.1.0 .
# Build stage: Rust (the workspace's rust-version is 1.80; this pins the toolchain used).
FROM rust:1.95.0-slim-bookworm AS build
# musl for a static binary (rusqlite's bundled SQLite and ring are C: musl-gcc builds them).
RUN apt-get update \
 && apt-get install -y --no-install-recommends musl-tools=1.2.3-1 \
 && rm -rf /var/lib/apt/lists/* \
 && rustup target add x86_64-unknown-linux-musl
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY crates ./crates
COPY charts/dask-gateway-rs/files ./charts/dask-gateway-rs/files
RUN cargo build --release --locked --target x86_64-unknown-linux-musl -p gateway-server \
 && cp target/x86_64-unknown-linux-musl/release/gateway-server /gateway-server

# Runtime: no shell, no package manager; uid/gid 65532 ("nonroot"), as the chart's
# podSecurityContext expects.
FROM gcr.io/distroless/static-debian12:nonroot
COPY --from=build /gateway-server /usr/local/bin/gateway-server
USER 65532:65532
EXPOSE 8000 8786
ENTRYPOINT ["/usr/local/bin/gateway-server"]
