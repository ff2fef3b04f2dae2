# Sourced by the scripts: podman with its state kept under target/ (never the host's
# /var/lib/containers or /run/containers), and the base image made offline.

OVERLAY_PODMAN_DIR=${OVERLAY_PODMAN_DIR:-$PWD/target/image/podman}

# containers.conf for this machine: the host's limits refuse podman's default ulimits, there is no
# systemd to manage cgroups, and podman must never read or write the host's /etc/cni.
_lab_podman_conf() {
  local d=$OVERLAY_PODMAN_DIR
  mkdir -p "$d/root" "$d/run" "$d/tmp" "$d/cni"
  [[ -f $d/containers.conf ]] && return 0
  cat >"$d/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
tmp_dir = "$d/tmp"
[network]
network_config_dir = "$d/cni"
CONF
}

# podman writes its blob-info cache to /var/lib/containers/cache whatever --root says: a private
# mount namespace puts a directory of ours there (only podman's view of /var/lib changes).
lab_podman() {
  _lab_podman_conf
  mkdir -p "$OVERLAY_PODMAN_DIR/varlib"
  CONTAINERS_CONF=$OVERLAY_PODMAN_DIR/containers.conf unshare -m --propagation private \
    sh -c 'mount --bind "$1" /var/lib && shift && exec podman "$@"' lab_podman "$OVERLAY_PODMAN_DIR/varlib" \
    --root "$OVERLAY_PODMAN_DIR/root" --runroot "$OVERLAY_PODMAN_DIR/run" "$@"
}

# debian:bookworm-slim as Docker's official image is made (debuerreotype's "slim": minbase without
# docs, man pages and locales), written once to DIR/bookworm-slim.tar and reused.
make_base_tar() {
  local dir=$1 tar=$1/bookworm-slim.tar root=$1/rootfs
  [[ -s $tar ]] && return 0
  echo "==> base image: debootstrap --variant=minbase bookworm (once; cached in $tar)"
  rm -rf "$root" && mkdir -p "$root"
  debootstrap --variant=minbase bookworm "$root" http://deb.debian.org/debian >"$dir/debootstrap.log" 2>&1 || {
    tail -20 "$dir/debootstrap.log" >&2
    echo "debootstrap failed (see $dir/debootstrap.log): is deb.debian.org reachable?" >&2
    return 1
  }
  cat >"$root/etc/dpkg/dpkg.cfg.d/docker" <<'CFG'
path-exclude /usr/share/doc/*
path-include /usr/share/doc/*/copyright
path-exclude /usr/share/man/*
path-exclude /usr/share/groff/*
path-exclude /usr/share/info/*
path-exclude /usr/share/lintian/*
path-exclude /usr/share/locale/*
CFG
  cat >"$root/etc/apt/apt.conf.d/docker-clean" <<'CFG'
DPkg::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
APT::Update::Post-Invoke { "rm -f /var/cache/apt/archives/*.deb /var/cache/apt/*.bin || true"; };
Dir::Cache::pkgcache ""; Dir::Cache::srcpkgcache "";
CFG
  find "$root/usr/share/doc" -mindepth 1 -not -name copyright -not -type d -delete
  rm -rf "$root"/usr/share/{man,groff,info,lintian,locale}/* "$root"/var/lib/apt/lists/* \
    "$root"/var/cache/apt/* "$root"/var/log/* "$root"/tmp/*
  tar -C "$root" --numeric-owner -cf "$tar.tmp" . && mv "$tar.tmp" "$tar"
  rm -rf "$root"
}
