#!/usr/bin/env bash
# Builds overlayd's node image from ./Dockerfile and writes it as an archive:
#   target/image/overlayd-<version>.tar   (docker-archive: `podman load`, `docker load`, `ctr import`)
#
# Uses docker when its daemon answers, else podman (Debian's, daemonless; installed if missing).
# With a registry reachable the Dockerfile builds in full (rust image → release binaries →
# runtime). Without one (this lab, CI) the same Dockerfile builds only its runtime stage: the base
# image debian:bookworm-slim is made locally with debootstrap (cached under target/image/base) and
# the binaries are the host's release build (scripts/lib/build.sh): --target runtime-prebuilt.
#
# podman keeps its images under target/image/podman (never the host's /var/lib/containers).
# Env: OVERLAYD_IMAGE (default overlayd:<version>), OVERLAYD_IMAGE_MODE=auto|full|prebuilt.
set -euo pipefail
cd "$(dirname "$0")/.."
. scripts/lib/deps.sh
. scripts/lib/build.sh
. scripts/lib/podman.sh

version=$(awk -F'"' '/^\[workspace.package\]/ {p = 1} p && /^version/ {print $2; exit}' Cargo.toml)
image=${OVERLAYD_IMAGE:-overlayd:$version}
mode=${OVERLAYD_IMAGE_MODE:-auto}
commit=$(git rev-parse --short=12 HEAD 2>/dev/null || echo "${OVERLAYD_GIT_COMMIT:-unknown}")
source_url=$(git remote get-url origin 2>/dev/null || true)
out_dir=$PWD/target/image
archive=$out_dir/overlayd-$version.tar
mkdir -p "$out_dir"

ensure_rust
ensure_deps

if docker info >/dev/null 2>&1; then
  engine=(docker)
else
  engine=(lab_podman)
fi

if [[ $mode == auto ]]; then
  # A registry answers with some HTTP status (401 for Docker Hub's /v2/); no DNS or no route: 000.
  code=$(curl -sS -m 10 -o /dev/null -w '%{http_code}' https://registry-1.docker.io/v2/ 2>/dev/null || true)
  if [[ $code =~ ^[1-5][0-9][0-9]$ ]]; then mode=full; else mode=prebuilt; fi
fi

build_args=(--build-arg "VERSION=$version" --build-arg "OVERLAYD_GIT_COMMIT=$commit"
            --build-arg "SOURCE_URL=$source_url")
[[ ${engine[0]} == docker ]] || build_args+=(--network host)

case $mode in
  full)
    echo "==> image $image: full build (${engine[0]})"
    "${engine[@]}" build "${build_args[@]}" -t "$image" -f Dockerfile .
    ;;
  prebuilt)
    echo "==> image $image: runtime stage from host binaries (no registry; ${engine[0]})"
    base=docker.io/library/debian:bookworm-slim
    if ! "${engine[@]}" image inspect "$base" >/dev/null 2>&1; then
      make_base_tar "$out_dir/base"
      "${engine[@]}" import "$out_dir/base/bookworm-slim.tar" "$base" >/dev/null
    fi
    echo "==> release binaries"
    build_release
    ctx=$out_dir/context
    rm -rf "$ctx" && mkdir -p "$ctx/bin"
    cp "${CARGO_TARGET_DIR:-target}/release/overlayd" "${CARGO_TARGET_DIR:-target}/release/overlay" "$ctx/bin/"
    "${engine[@]}" build "${build_args[@]}" --target runtime-prebuilt \
      -t "$image" -f Dockerfile "$ctx"
    ;;
  *)
    echo "OVERLAYD_IMAGE_MODE=$mode: use auto, full or prebuilt" >&2
    exit 2
    ;;
esac

# The previous build's image, now untagged, would pile up in target/image/podman (our own store;
# a docker daemon's images are the user's and left alone).
[[ ${engine[0]} == docker ]] || "${engine[@]}" image prune -f >/dev/null 2>&1 || true
rm -f "$archive"
"${engine[@]}" save -o "$archive" "$image"
size=$("${engine[@]}" image inspect --format '{{.Size}}' "$image")
echo "image $image: $((size / 1000000)) MB ($size bytes) uncompressed; archive $archive ($(du -m "$archive" | cut -f1) MiB)"
"${engine[@]}" run --rm --network host "$image" overlayd --version
