# Sourced by the scripts: installs what building and testing overlayd needs on Debian/Ubuntu, only
# when it is missing, so a second run is quick and offline.

# Debian package providing each command we need.
OVERLAY_DEPS=(
  "cc:gcc"                       # the linker rustc calls, and ring's C code (TLS to etcd)
  "c++:g++"                      # libFuzzer (the fuzz target, scripts/fuzz.sh) is C++
  "protoc:protobuf-compiler"     # etcd-client compiles etcd's protos at build time...
  "/usr/include/google/protobuf/descriptor.proto:libprotobuf-dev"  # ...which import these
  "etcd:etcd-server"             # the real etcd the tests and the lab run
  "etcdctl:etcd-client"          # seeding the config, as an operator would
  "ip:iproute2"                  # building lab namespaces (the product itself speaks netlink)
  "bridge:iproute2"
  "iptables:iptables"
  "iptables-legacy:iptables"
  "nft:nftables"
  "ping:iputils-ping"
  "iperf3:iperf3"
  "pgrep:procps"
  "openssl:openssl"              # a throwaway PKI for the TLS-to-etcd test
  "python3:python3"              # the benchmarks read iperf3's JSON
  "/usr/lib/cni/host-local:containernetworking-plugins"  # the reference the CNI bench compares with
  "/usr/lib/cni/portmap:containernetworking-plugins"     # hostPort chained after overlay (kube_proxy test)
  "podman:podman"                # builds the node image (scripts/image.sh), runs the DaemonSet's pod
  "catatonit:catatonit"          # podman kube play's infra container
  "debootstrap:debootstrap"      # the image's base when no registry is reachable
  "curl:curl"                    # image.sh: is a registry reachable? tests read /metrics, /readyz, /status
  "containerd:containerd"        # the DaemonSet test's pods, made through the installed conflist
  "ctr:containerd"
  "runc:runc"
  "/usr/lib/python3/dist-packages/yaml/__init__.py:python3-yaml"  # the DaemonSet test renders the manifests
  "/usr/lib/python3.11/ensurepip:python3-venv"  # kubernetes-validate's venv (scripts/validate-manifests.sh)
)

ensure_deps() {
  local missing=() entry cmd pkg
  for entry in "${OVERLAY_DEPS[@]}"; do
    cmd=${entry%%:*}
    pkg=${entry#*:}
    if [[ $cmd == /* ]]; then
      [[ -e $cmd ]] && continue
    else
      command -v "$cmd" >/dev/null 2>&1 && continue
      [[ -x /usr/sbin/$cmd || -x /sbin/$cmd ]] && continue
    fi
    [[ " ${missing[*]} " == *" $pkg "* ]] || missing+=("$pkg")
  done
  # libc6-dev has no command to probe: gcc without it cannot link.
  [[ -e /usr/include/stdio.h ]] || missing+=(libc6-dev)
  if ((${#missing[@]})); then
    if [[ $(id -u) != 0 ]]; then
      echo "missing packages: ${missing[*]}; run as root, or: apt-get install -y ${missing[*]}" >&2
      return 1
    fi
    echo "==> installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
  # iptables and friends live in sbin, which a non-login root shell may lack.
  export PATH="$PATH:/usr/sbin:/sbin"
}

ensure_rust() {
  if ! command -v cargo >/dev/null 2>&1; then
    [[ -f $HOME/.cargo/env ]] && . "$HOME/.cargo/env"
  fi
  command -v cargo >/dev/null 2>&1 || {
    echo "cargo not found: install a Rust toolchain >= 1.85 (https://rustup.rs)" >&2
    return 1
  }
  local v
  v=$(rustc --version | awk '{print $2}')
  if ! printf '1.85.0\n%s\n' "$v" | sort -V -C; then
    echo "rustc $v is too old: overlayd needs >= 1.85 (rustup update)" >&2
    return 1
  fi
  # clippy and rustfmt come with rustup's default profile; add them if this toolchain lacks them.
  if command -v rustup >/dev/null 2>&1; then
    cargo clippy --version >/dev/null 2>&1 || rustup component add clippy
    cargo fmt --version >/dev/null 2>&1 || rustup component add rustfmt
  fi
}

# cargo-fuzz (scripts/fuzz.sh) from crates.io, built once into ~/.cargo/bin.
ensure_cargo_fuzz() {
  cargo fuzz --version >/dev/null 2>&1 && return 0
  echo "==> installing cargo-fuzz (cargo install, once)"
  cargo install cargo-fuzz --locked -q
}
