# overlayd's node image: the daemon, the `overlay` CNI plugin, and the tools they call on a node.
#
# Full build (a machine that can pull images):
#   docker build -t overlayd:0.1.0 .          (or: podman build --network host -t overlayd:0.1.0 .)
# scripts/image.sh builds the same file offline: it makes the base image with debootstrap, builds
# the binaries on the host and builds `--target runtime-prebuilt` with a context holding only
# bin/overlayd and bin/overlay (see that script).
#
# Stages: build (compiles) -> runtime (the default, last); runtime-base is shared with
# runtime-prebuilt. Two final stages rather than `FROM ${BINARIES}`: podman 4.3's buildah does not
# build a stage that is named only through a build-arg, and BuildKit does not expand args in
# `COPY --from`; both skip stages a target does not need.

ARG RUST_IMAGE=docker.io/library/rust:1.85-bookworm
ARG BASE_IMAGE=docker.io/library/debian:bookworm-slim

FROM ${RUST_IMAGE} AS build
RUN apt-get update \
 && apt-get install -y --no-install-recommends protobuf-compiler libprotobuf-dev \
 && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY . .
# No .git in the context: build.rs stamps this commit into `overlayd --version`.
ARG OVERLAYD_GIT_COMMIT=unknown
RUN OVERLAYD_GIT_COMMIT=${OVERLAYD_GIT_COMMIT} bash -c '. scripts/lib/build.sh && build_release' \
 && mkdir /out \
 && cp target/release/overlayd target/release/overlay /out/

FROM ${BASE_IMAGE} AS runtime-base
# iptables: both backends' tools (iptables-legacy-*, iptables-nft-*); overlayd picks the one the
# node's rules use. nftables: aws-node's leftover table. kmod: modprobe in the init container.
# containernetworking-plugins: only portmap and loopback are kept (the conflist chains portmap;
# install-cni copies both to a node that lacks them); the rest of the package is removed.
RUN apt-get update \
 && apt-get install -y --no-install-recommends iptables nftables kmod containernetworking-plugins \
 && mkdir -p /usr/local/lib/overlayd/cni \
 && cp /usr/lib/cni/portmap /usr/lib/cni/loopback /usr/local/lib/overlayd/cni/ \
 && apt-get purge -y containernetworking-plugins \
 && apt-get autoremove -y \
 && rm -rf /var/lib/apt/lists/* /var/cache/apt/* /var/log/apt /var/log/dpkg.log \
           /usr/share/doc /usr/share/man /usr/share/info
ARG VERSION=0.1.0
ARG OVERLAYD_GIT_COMMIT=unknown
# scripts/image.sh passes the repository's `git remote get-url origin`.
ARG SOURCE_URL=
LABEL org.opencontainers.image.title="overlayd" \
      org.opencontainers.image.description="VXLAN overlay network for Kubernetes (EKS without aws-node)" \
      org.opencontainers.image.source="${SOURCE_URL}" \
      org.opencontainers.image.licenses="Apache-2.0" \
      org.opencontainers.image.version="${VERSION}" \
      org.opencontainers.image.revision="${OVERLAYD_GIT_COMMIT}"
CMD ["overlayd", "run"]

FROM runtime-base AS runtime-prebuilt
COPY bin/overlayd bin/overlay /usr/local/bin/

FROM runtime-base AS runtime
COPY --from=build /out/overlayd /out/overlay /usr/local/bin/
