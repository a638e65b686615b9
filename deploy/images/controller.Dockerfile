# The controller image: built from the workspace root (the build context),
#   docker build -f deploy/images/controller.Dockerfile -t ambient/controller:latest .
# (name and tag as deploy/kustomization.yaml).
# Building needs Docker (or any OCI builder); the CI machine here cannot build images.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p controller --bin controller \
 && cp target/release/controller /controller

# Nothing but libc and CA roots, as a non-root user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /controller /usr/local/bin/controller
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/controller"]
