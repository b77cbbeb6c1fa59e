# herald container image: a release build on Debian bookworm, run on distroless
# (glibc + libgcc, no shell, no package manager) as the nonroot user.
# Build: docker build -t ghcr.io/herald-dev/herald:0.1.0 .

FROM rust:1.95-bookworm AS build
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions of Cargo.lock.
RUN cargo build --release --locked --bin herald \
 && cp target/release/herald /herald

FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /herald /herald
# 65532 is distroless's nonroot; the chart's securityContext expects it.
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/herald"]
CMD ["run"]
