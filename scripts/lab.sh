#!/usr/bin/env bash
# The local multi-node lab: a whole overlayd cluster on one machine, nothing touched outside it.
#
#   scripts/lab.sh up [N]   N nodes (default 3), two pods each; prints nodes, pods and a ping matrix
#   scripts/lab.sh status   the same table and matrix for a running lab, and the peer probe matrix
#   scripts/lab.sh down     removes everything the lab made
#
# Every node and pod is a network namespace named olab-*. An underlay namespace holds a bridge that
# joins the nodes (192.0.2.0/24, a documentation range) and runs etcd on a random port. Each node
# runs the real overlayd (iface and public IP found from its default route, as on a real node), and
# pods are made by the real `overlay` CNI plugin. Needs root; installs missing Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD

P=olab                      # name prefix of everything the lab creates
STATE=/run/overlay-lab      # logs, subnet files, IPAM stores; removed by `down`
UNDERLAY=$P-ul
UNDERLAY_NET=192.0.2
ETCD_IP=$UNDERLAY_NET.254
NETWORK=10.244.0.0/16
PREFIX=/coreos.com/network
METRICS_PORT=9472           # each node's overlayd serves /status there, on the node's own loopback

die() { echo "lab: $*" >&2; exit 1; }
[[ $(id -u) == 0 ]] || die "needs root (it creates network namespaces)"

bin_dir() { echo "${OVERLAY_BIN_DIR:-$ROOT/target/release}"; }

build() {
  . scripts/lib/deps.sh
  . scripts/lib/build.sh
  ensure_rust
  ensure_deps
  if [[ -z ${OVERLAY_BIN_DIR:-} ]]; then
    echo "==> building overlayd and the overlay CNI plugin (release)"
    build_release
  fi
  [[ -x $(bin_dir)/overlayd && -x $(bin_dir)/overlay ]] || die "binaries missing in $(bin_dir)"
}

# On a machine that never had iproute2 nothing of the lab can exist yet: say nothing alarming.
have_ip() { command -v ip >/dev/null 2>&1; }
nodes() { have_ip || return 0; ip netns list | awk '{print $1}' | grep -E "^$P-n[0-9]+$" | sort -V || true; }
pods_of() { ip netns list | awk '{print $1}' | grep -E "^$1-p[0-9]+$" | sort -V || true; }

down() {
  local ns
  have_ip || { rm -rf "$STATE"; return 0; }
  # Daemons first, so nothing re-creates what we remove.
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$P-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill "$pid" 2>/dev/null || true; done
  done
  sleep 0.3
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$P-" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$STATE"
}

etcdctl_lab() {
  ip netns exec "$UNDERLAY" env ETCDCTL_API=3 etcdctl --endpoints="$(cat "$STATE/etcd.endpoint")" "$@"
}

start_etcd() {
  ip netns add "$UNDERLAY"
  ip -n "$UNDERLAY" link set lo up
  ip -n "$UNDERLAY" link add br0 type bridge
  ip -n "$UNDERLAY" addr add "$ETCD_IP/24" dev br0
  ip -n "$UNDERLAY" link set br0 up
  local port=$((20000 + RANDOM % 20000)) peer
  peer=$((port + 1))
  echo "http://$ETCD_IP:$port" >"$STATE/etcd.endpoint"
  ip netns exec "$UNDERLAY" setsid etcd --name lab --data-dir "$STATE/etcd" \
    --listen-client-urls "http://$ETCD_IP:$port" --advertise-client-urls "http://$ETCD_IP:$port" \
    --listen-peer-urls "http://127.0.0.1:$peer" --initial-advertise-peer-urls "http://127.0.0.1:$peer" \
    --initial-cluster "lab=http://127.0.0.1:$peer" >"$STATE/etcd.log" 2>&1 </dev/null &
  local i
  for i in $(seq 1 100); do
    etcdctl_lab endpoint health >/dev/null 2>&1 && return 0
    sleep 0.1
  done
  die "etcd did not start; see $STATE/etcd.log"
}

# add_node I: namespace olab-nI on the underlay at 192.0.2.(10+I), running overlayd.
add_node() {
  local i=$1 ns=$P-n$1 ip=$UNDERLAY_NET.$((10 + $1))
  ip netns add "$ns"
  ip -n "$ns" link set lo up
  ip link add "$ns" netns "$UNDERLAY" type veth peer name eth0 netns "$ns"
  ip -n "$UNDERLAY" link set "$ns" master br0 up
  ip -n "$ns" addr add "$ip/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" route add default via "$ETCD_IP"
  mkdir -p "$STATE/$ns"
  ip netns exec "$ns" setsid "$(bin_dir)/overlayd" run \
    --etcd-endpoints "$(cat "$STATE/etcd.endpoint")" \
    --node-name "lab-node$i" --metrics-addr "127.0.0.1:$METRICS_PORT" \
    --cni-data-dir "$STATE/$ns/ipam" \
    --subnet-file "$STATE/$ns/subnet.env" >"$STATE/$ns/overlayd.log" 2>&1 </dev/null &
}

wait_subnet() {
  local ns=$1 i
  for i in $(seq 1 200); do
    [[ -s $STATE/$ns/subnet.env ]] && return 0
    sleep 0.1
  done
  tail -n 20 "$STATE/$ns/overlayd.log" >&2
  die "overlayd on $ns leased no subnet; log above ($STATE/$ns/overlayd.log)"
}

# cni NODE POD COMMAND: runs the real plugin inside the node's namespace, as a runtime would.
cni() {
  local node=$1 pod=$2 cmd=$3
  ip netns exec "$node" env CNI_COMMAND="$cmd" CNI_CONTAINERID="$pod" \
    CNI_NETNS="/var/run/netns/$pod" CNI_IFNAME=eth0 CNI_PATH="$(bin_dir)" \
    "$(bin_dir)/overlay" <<EOF
{"cniVersion":"1.0.0","name":"overlay-lab","type":"overlay",
 "subnetFile":"$STATE/$node/subnet.env","dataDir":"$STATE/$node/ipam"}
EOF
}

add_pod() {
  local node=$1 pod=$1-p$2 out
  ip netns add "$pod"
  ip -n "$pod" link set lo up
  if ! out=$(cni "$node" "$pod" ADD); then
    die "CNI ADD for $pod failed: $out"
  fi
}

pod_ip() { ip -n "$1" -4 -o addr show dev eth0 2>/dev/null | awk '{print $4}' | cut -d/ -f1; }

show() {
  local node pod all=() ip subnet
  printf '\n%-10s %-16s %-18s %s\n' NODE PUBLIC-IP SUBNET PODS
  for node in $(nodes); do
    # The file holds the gateway (x.y.z.1/len); show the subnet itself.
    subnet=$(grep OVERLAY_SUBNET "$STATE/$node/subnet.env" 2>/dev/null | cut -d= -f2 || true)
    [[ -n $subnet ]] && subnet="${subnet%.*/*}.0/${subnet#*/}" || subnet="-"
    ip=$(ip -n "$node" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1)
    local list=""
    for pod in $(pods_of "$node"); do
      list+="$pod=$(pod_ip "$pod") "
      all+=("$pod")
    done
    printf '%-10s %-16s %-18s %s\n' "$node" "$ip" "$subnet" "$list"
  done
  ((${#all[@]})) || return 0
  echo
  echo "ping matrix (row pings column; ok = reply across the overlay):"
  printf '%-10s' ""
  for pod in "${all[@]}"; do printf ' %-9s' "${pod#"$P"-}"; done
  echo
  local src dst fails=0 total=0
  for src in "${all[@]}"; do
    printf '%-10s' "${src#"$P"-}"
    for dst in "${all[@]}"; do
      if [[ $src == "$dst" ]]; then printf ' %-9s' "-"; continue; fi
      total=$((total + 1))
      if ip netns exec "$src" ping -c 1 -W 2 -q "$(pod_ip "$dst")" >/dev/null 2>&1; then
        printf ' %-9s' ok
      else
        printf ' %-9s' FAIL
        fails=$((fails + 1))
      fi
    done
    echo
  done
  echo
  echo "$((total - fails)) of $total pod pairs reachable"
  probe_matrix
  [[ $fails == 0 ]]
}

# What each node's overlayd says of every other node (its /status): the probes it sends through
# the overlay itself, VTEP to VTEP. "…" = not probed yet (each peer once per 30 s by default).
probe_matrix() {
  local node dir
  dir=$(mktemp -d)
  for node in $(nodes); do
    ip netns exec "$node" curl -s --max-time 3 "http://127.0.0.1:$METRICS_PORT/status" >"$dir/${node#"$P"-}.json" 2>/dev/null || true
  done
  echo
  echo "peer probe matrix (row's overlayd probes column through the overlay; rtt in ms):"
  python3 - "$dir" <<'PY'
import json, os, sys
d = sys.argv[1]
names = sorted((f[:-5] for f in os.listdir(d)), key=lambda n: int(n[1:]) if n[1:].isdigit() else 0)
status, subnet_of = {}, {}
for n in names:
    try:
        status[n] = json.load(open(os.path.join(d, n + ".json")))
        subnet_of[status[n]["lease"]["subnet"]] = n
    except Exception:
        status[n] = None
print("%-8s" % "" + "".join(" %-9s" % n for n in names))
causes = []
for row in names:
    cells = []
    s = status[row]
    by_node = {}
    for p in (s or {}).get("peers", []):
        by_node[subnet_of.get(p["subnet"], p["subnet"])] = p
    for col in names:
        if col == row:
            cells.append("-")
        elif s is None:
            cells.append("no-daemon")
        else:
            p = by_node.get(col)
            pr = (p or {}).get("probe") or {}
            if p is None:
                cells.append("no-peer")
            elif pr.get("reachable") is True:
                cells.append("%.2f" % (pr.get("rtt_ms") or 0))
            elif pr.get("reachable") is False:
                cells.append("DOWN")
                causes.append(f"{row} -> {col}: {pr.get('cause') or 'no reply'}")
            else:
                cells.append("…")
    print("%-8s" % row + "".join(" %-9s" % c for c in cells))
for c in causes:
    print("  " + c)
PY
  rm -rf "$dir"
}

up() {
  local n=${1:-3} i j
  [[ $n =~ ^[0-9]+$ && $n -ge 1 && $n -le 50 ]] || die "node count must be 1..50, got '$n'"
  [[ -z $(nodes) ]] || die "a lab is already up (scripts/lab.sh status, or scripts/lab.sh down first)"
  build
  down
  mkdir -p "$STATE"
  trap 'echo "lab: setup failed; removing it" >&2; down' ERR
  echo "==> etcd in the lab's underlay namespace"
  start_etcd
  local cfg='{"Network":"'$NETWORK'","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}'
  echo "==> ETCDCTL_API=3 etcdctl put $PREFIX/config '$cfg'"
  etcdctl_lab put "$PREFIX/config" "$cfg" >/dev/null
  echo "==> $n nodes running overlayd"
  for i in $(seq 1 "$n"); do add_node "$i"; done
  for i in $(seq 1 "$n"); do wait_subnet "$P-n$i"; done
  echo "==> two pods per node through the overlay CNI plugin"
  for i in $(seq 1 "$n"); do
    for j in 1 2; do add_pod "$P-n$i" "$j"; done
  done
  trap - ERR
  # Peers are programmed as leases arrive; give the last node's lease a moment to reach everyone.
  sleep 1
  show
  echo
  echo "logs and state: $STATE; remove everything with: scripts/lab.sh down"
}

case "${1:-}" in
  up) shift; up "$@" ;;
  status) [[ -n $(nodes) ]] || die "no lab is up (scripts/lab.sh up)"; show ;;
  down) down; echo "lab removed" ;;
  *) echo "usage: $0 up [N] | status | down" >&2; exit 2 ;;
esac
