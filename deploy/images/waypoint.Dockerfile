# The waypoint image: built from the workspace root (the build context),
#   docker build -f deploy/images/waypoint.Dockerfile -t ambient/waypoint:latest .
# (name and tag as deploy/kustomization.yaml and the controller's WAYPOINT_IMAGE default).
# Building needs Docker (or any OCI builder); the CI machine here cannot build images.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p waypoint --bin waypoint \
 && cp target/release/waypoint /waypoint

# Nothing but libc and CA roots, as a non-root user.
FROM gcr.io/distroless/cc-debian12:nonroot
COPY --from=build /waypoint /usr/local/bin/waypoint
USER 65532:65532
ENTRYPOINT ["/usr/local/bin/waypoint"]
