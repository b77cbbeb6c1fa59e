# herald container image: a release build, run as the nonroot user (65532) on a base with
# glibc and libgcc only (no shell, no package manager).
#
#   docker build -t ghcr.io/herald-dev/herald:0.1.0 .
#
# The bases are build arguments so that a machine that cannot pull them can use its own
# (tests/node/image.sh makes both from Debian packages). BINARY picks where /herald comes
# from: `compiled` builds it from this context; `prebuilt` takes an already built binary,
# `herald` at the root of the build context (tests/node/image.sh uses a directory holding
# only that file).
ARG BUILD_IMAGE=docker.io/library/rust:1.95-bookworm
ARG RUNTIME_IMAGE=gcr.io/distroless/cc-debian12:nonroot
ARG BINARY=compiled

FROM ${BUILD_IMAGE} AS compiled
WORKDIR /src
COPY . .
# --locked: exactly the dependency versions of Cargo.lock.
RUN cargo build --release --locked --bin herald \
 && cp target/release/herald /herald

FROM scratch AS prebuilt
COPY herald /herald

FROM ${BINARY} AS binary

FROM ${RUNTIME_IMAGE}
COPY --from=binary /herald /herald
# The chart's securityContext runs as 65532 too (distroless's nonroot).
USER 65532:65532
EXPOSE 8080
ENTRYPOINT ["/herald"]
CMD ["run"]
