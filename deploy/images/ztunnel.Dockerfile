# The ztunnel image: built from the workspace root (the build context),
#   docker build -f deploy/images/ztunnel.Dockerfile -t ambient/ztunnel:latest .
# (name and tag as deploy/kustomization.yaml).
# Building needs Docker (or any OCI builder); the CI machine here cannot build images.

FROM rust:1-bookworm AS build
WORKDIR /src
COPY . .
RUN --mount=type=cache,target=/usr/local/cargo/registry \
    --mount=type=cache,target=/src/target \
    cargo build --release --locked -p ztunnel --bin ztunnel \
 && cp target/release/ztunnel /ztunnel

# ztunnel installs its capture with nft and ip (TPROXY ruleset, policy routing) and destroys
# TIME_WAIT sockets with ss (iproute2).
FROM debian:bookworm-slim
RUN apt-get update \
 && apt-get install -y --no-install-recommends nftables iproute2 ca-certificates \
 && rm -rf /var/lib/apt/lists/*
COPY --from=build /ztunnel /usr/local/bin/ztunnel
ENTRYPOINT ["/usr/local/bin/ztunnel"]
