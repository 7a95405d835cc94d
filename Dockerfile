# pgsnap's image: a static-enough Rust build on Debian, run from distroless as non-root.
FROM rust:1.95-slim-bookworm AS build
WORKDIR /src
COPY Cargo.toml Cargo.lock ./
COPY src ./src
COPY crds ./crds
COPY benches ./benches
# The workspace's other member: cargo reads its manifest and the targets it declares.
COPY e2e/Cargo.toml ./e2e/Cargo.toml
COPY e2e/src ./e2e/src
COPY e2e/benches ./e2e/benches
RUN cargo build --release --locked -p pgsnap \
 && strip target/release/pgsnap

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /src/target/release/pgsnap /usr/local/bin/pgsnap
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/pgsnap"]
CMD ["run"]
