#!/usr/bin/env bash
# The DaemonSet of manifests/overlayd.yaml, run for real: its pod template (only the image replaced,
# see render.py for what a kubelet would do and podman 4.3 cannot) played with `podman kube play` on
# three lab nodes, pods made through the installed conflist by containerd (`ctr run --cni`) and by
# podman's CNI backend (for a hostPort: ctr has no port mappings), and a node's overlayd pod
# replaced by a newer image while its pods keep pinging.
#
# Each node is a network namespace on the lab's underlay bridge, plus a private mount namespace in
# which the node's hostPath directories (/etc/cni/net.d, /opt, /run, /var/lib, /usr/lib/cni) are
# bind-mounted from per-node directories under one temp dir: nothing of the host's is touched.
# A holder process (`sleep`) keeps each node's namespaces; everything for a node runs through
# `nsenter -t HOLDER -m -n`. etcd speaks TLS with client certificates from a CA made here.
#
# Usage: tests/daemonset/run.sh [IMAGE_ARCHIVE]   (default: target/image/overlayd-<version>.tar)
# OVERLAYD_DS_MANIFEST=FILE runs another DaemonSet manifest (e.g. an older one, to compare).
# Prints one `N passed, N failed` line; exits 1 when anything failed.
set -uo pipefail
# One brace group, parsed whole before it runs: a child that moves the offset of the script's file
# descriptor cannot make bash read the rest from the wrong place.
{
cd "$(dirname "$0")/../.."
export PATH="$PATH:/usr/sbin:/sbin"

if [[ $(id -u) != 0 ]]; then
  echo "SKIP tests/daemonset/run.sh: needs root (network and mount namespaces, podman, containerd)"
  exit 0
fi
for c in podman catatonit containerd ctr runc etcd etcdctl openssl curl nsenter unshare; do
  command -v "$c" >/dev/null || { echo "FAILED: $c not found (scripts/lib/deps.sh installs it)"; exit 1; }
done
PY=/usr/bin/python3 # Debian's, with python3-yaml (a pyenv shim may lack it)

version=$(awk -F'"' '/^\[workspace.package\]/ {p = 1} p && /^version/ {print $2; exit}' Cargo.toml)
archive=$(realpath "${1:-target/image/overlayd-$version.tar}")
[[ -s $archive ]] || { echo "FAILED: no image archive $archive: run scripts/image.sh"; exit 1; }
image=localhost/overlayd:$version
image_new=localhost/overlayd:$version-rolled

tag=ds$(printf '%04x' $((RANDOM % 65536)))
W=$(mktemp -d /tmp/overlayd-ds.XXXXXX)
UL=${tag}ul
ETCD_IP=192.0.2.254
NODES=(0 1 2)
declare -A HOLDER CTRD
ETCD_PID=
passed=0
failed=0

log() { echo "--- $*"; }
ok() { passed=$((passed + 1)); echo "ok: $*"; }
bad() { failed=$((failed + 1)); echo "FAILED: $*"; }
check() { local what=$1; shift; if "$@"; then ok "$what"; else bad "$what"; fi; }
# Bounded wait: CMD... until it succeeds, at most SECONDS seconds.
wait_until() {
  local secs=$1 i; shift
  for ((i = 0; i < secs * 4; i++)); do "$@" && return 0; sleep 0.25; done
  return 1
}

ns_of() { echo "${tag}n$1"; }
dir_of() { echo "$W/n$1"; }
ip_of() { echo "192.0.2.1$1"; }
# Runs a command on node N: its network namespace and its private mount namespace.
on() { local n=$1; shift; nsenter -t "${HOLDER[$n]}" -m -n -- "$@"; }
pm() {
  local n=$1 d; shift; d=$(dir_of "$n")
  on "$n" env CONTAINERS_CONF="$d/containers.conf" podman --root "$d/podman/root" --runroot "$d/podman/run" "$@"
}
ctrn() { local n=$1; shift; on "$n" ctr -a "$(dir_of "$n")/containerd/sock" -n lab "$@"; }

cleanup() {
  local n
  set +e
  for n in "${NODES[@]}"; do
    [[ -n ${HOLDER[$n]:-} ]] || continue
    pm "$n" pod rm -a -f -t 2 >/dev/null 2>&1
    pm "$n" rm -a -f -t 2 >/dev/null 2>&1
    if [[ -n ${CTRD[$n]:-} ]]; then
      for c in $(ctrn "$n" task ls -q 2>/dev/null); do ctrn "$n" task kill -s KILL "$c" >/dev/null 2>&1; done
      sleep 0.5
      for c in $(ctrn "$n" task ls -q 2>/dev/null); do ctrn "$n" task rm -f "$c" >/dev/null 2>&1; done
      for c in $(ctrn "$n" containers ls -q 2>/dev/null); do ctrn "$n" containers rm "$c" >/dev/null 2>&1; done
      kill "${CTRD[$n]}" 2>/dev/null
    fi
    pm "$n" rmi -a -f >/dev/null 2>&1
  done
  for n in "${NODES[@]}"; do
    [[ -n ${CTRD[$n]:-} ]] && { wait "${CTRD[$n]}" 2>/dev/null; }
    # The mount namespace and its bind mounts end with the holder, its last process.
    [[ -n ${HOLDER[$n]:-} ]] && { kill "${HOLDER[$n]}" 2>/dev/null; wait "${HOLDER[$n]}" 2>/dev/null; }
    ip netns del "$(ns_of "$n")" 2>/dev/null
  done
  [[ -n $ETCD_PID ]] && { kill "$ETCD_PID" 2>/dev/null; wait "$ETCD_PID" 2>/dev/null; }
  ip netns del "$UL" 2>/dev/null
  # Container layers were mounted only inside the (now gone) mount namespaces.
  rm -rf "$W"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# ---------- the lab: underlay, etcd with TLS, three nodes ----------
log "lab $tag in $W"
ip netns add "$UL"
ip -n "$UL" link add br0 type bridge
ip -n "$UL" addr add "$ETCD_IP/24" dev br0
ip -n "$UL" link set br0 up
ip -n "$UL" link set lo up

pki=$W/pki
mkdir -p "$pki"
(
  cd "$pki" || exit 1
  ec=(-newkey ec -pkeyopt ec_paramgen_curve:prime256v1 -nodes)
  openssl req -x509 "${ec[@]}" -keyout ca.key -out ca.crt -days 2 -subj /CN=overlayd-ds-ca
  printf 'subjectAltName=IP:%s\nextendedKeyUsage=serverAuth\n' "$ETCD_IP" >server.ext
  printf 'extendedKeyUsage=clientAuth\n' >client.ext
  for n in server client; do
    openssl req "${ec[@]}" -keyout $n.key -out $n.csr -subj /CN=$n
    openssl x509 -req -in $n.csr -CA ca.crt -CAkey ca.key -CAcreateserial -out $n.crt -days 2 -extfile $n.ext
  done
) >"$W/pki.log" 2>&1 || { echo "FAILED: openssl PKI (see $W/pki.log)"; cat "$W/pki.log"; exit 1; }
ETCD=https://$ETCD_IP:2379
ip netns exec "$UL" etcd --name ds --data-dir "$W/etcd" \
  --listen-client-urls "$ETCD" --advertise-client-urls "$ETCD" \
  --listen-peer-urls "http://$ETCD_IP:2380" --initial-advertise-peer-urls "http://$ETCD_IP:2380" \
  --initial-cluster "ds=http://$ETCD_IP:2380" --log-level warn \
  --cert-file "$pki/server.crt" --key-file "$pki/server.key" \
  --client-cert-auth --trusted-ca-file "$pki/ca.crt" >"$W/etcd.log" 2>&1 &
ETCD_PID=$!
etcdctl_() {
  ip netns exec "$UL" env ETCDCTL_API=3 etcdctl --endpoints "$ETCD" --cacert "$pki/ca.crt" \
    --cert "$pki/client.crt" --key "$pki/client.key" "$@"
}
wait_until 20 etcdctl_ endpoint health >/dev/null 2>&1 || { echo "FAILED: etcd did not start"; cat "$W/etcd.log"; exit 1; }

for n in "${NODES[@]}"; do
  ns=$(ns_of "$n") d=$(dir_of "$n")
  ip netns add "$ns"
  ip -n "$ns" link add eth0 type veth peer name "n$n" netns "$UL"
  ip -n "$UL" link set "n$n" master br0 up
  ip -n "$ns" addr add "$(ip_of "$n")/24" dev eth0
  ip -n "$ns" link set eth0 up
  ip -n "$ns" link set lo up
  ip -n "$ns" route add default via "$ETCD_IP"
  mkdir -p "$d"/{etc-cni,opt/cni/bin,run,varlib,usr-lib-cni,podman/tmp,containerd,files}
  cat >"$d/containers.conf" <<CONF
[containers]
default_ulimits = ["nofile=1024:1024", "nproc=4096:4096"]
[engine]
cgroup_manager = "cgroupfs"
events_logger = "file"
events_logfile_path = "$d/podman/events.log"
tmp_dir = "$d/podman/tmp"
[network]
network_config_dir = "/etc/cni/net.d"
cni_plugin_dirs = ["/opt/cni/bin"]
CONF
  # The holder: node's netns, then a private mount namespace with the node's own host paths.
  nsenter --net="/run/netns/$ns" unshare -m --propagation private sh -c '
    d=$1
    # This VM has no /lib/modules (modules built in) and the manifest mounts it: an overlay on
    # /usr/lib gives the node an empty one without creating it on the host.
    if [ ! -e /lib/modules ]; then
      mkdir -p "$d/usrlib-up/modules" "$d/usrlib-work" &&
      mount -t overlay overlay -o "lowerdir=/usr/lib,upperdir=$d/usrlib-up,workdir=$d/usrlib-work" /usr/lib || exit 1
    fi
    mount --bind "$d/etc-cni" /etc/cni/net.d &&
    mount --bind "$d/usr-lib-cni" /usr/lib/cni &&
    mount --bind "$d/opt" /opt &&
    mount --bind "$d/varlib" /var/lib &&
    mount --bind "$d/run" /run &&
    : >/run/xtables.lock && touch "$d/holder.ready" && exec sleep 3600' holder "$d" &
  HOLDER[$n]=$!
done
for n in "${NODES[@]}"; do
  wait_until 10 test -e "$(dir_of "$n")/holder.ready" || { echo "FAILED: node $n's mount namespace"; exit 1; }
done

# Node 0 is dressed as an EKS node that ran aws-node: its iptables chain, ip rule, 10-aws.conflist;
# and ip_forward off (the node-setup init container must turn it on).
d0=$(dir_of 0)
on 0 iptables-legacy -t nat -N AWS-SNAT-CHAIN-0
on 0 iptables-legacy -t nat -A AWS-SNAT-CHAIN-0 -m comment --comment "AWS, SNAT" \
  -m addrtype ! --dst-type LOCAL -j SNAT --to-source 192.0.2.10
on 0 iptables-legacy -t nat -A POSTROUTING -m comment --comment "AWS SNAT CHAIN" -j AWS-SNAT-CHAIN-0
on 0 ip rule add not to 192.168.0.0/16 lookup main priority 1024
cat >"$d0/etc-cni/10-aws.conflist" <<'EOF'
{"cniVersion":"0.4.0","name":"aws-cni","plugins":[{"name":"aws-cni","type":"aws-cni","vethPrefix":"eni","mtu":"9001"}]}
EOF
on 0 sh -c 'echo 0 >/proc/sys/net/ipv4/ip_forward'

log "loading $archive into each node's podman store"
for n in "${NODES[@]}"; do
  pm "$n" load -q -i "$archive" >/dev/null || { echo "FAILED: podman load on node $n"; exit 1; }
done

# Renders node N's pod from the manifests with IMAGE; prints the readiness probe "PORT PATH".
render() {
  local n=$1 img=$2 d; d=$(dir_of "$n")
  "$PY" tests/daemonset/render.py --manifest "${OVERLAYD_DS_MANIFEST:-manifests/overlayd.yaml}" \
    --secret manifests/etcd-tls-secret.yaml \
    --secret-from "ca.crt=$pki/ca.crt,tls.crt=$pki/client.crt,tls.key=$pki/client.key" \
    --set "OVERLAYD_ETCD_ENDPOINTS=$ETCD" \
    --image "$img" --node-name "node$n" --host-ip "$(ip_of "$n")" \
    --files "$d/files" --out "$d/pod.yaml" --probe
}
play() {
  local n=$1
  pm "$n" kube play "$(dir_of "$n")/pod.yaml" >"$(dir_of "$n")/play.log" 2>&1 || {
    cat "$(dir_of "$n")/play.log"; return 1; }
}
# HTTP status of node N's readiness endpoint ("000": nothing answers).
probe() {
  on "$1" curl -s -o /dev/null -m 2 -w '%{http_code}' "http://$(ip_of "$1"):$PROBE_PORT$PROBE_PATH" || true
}
daemon_running() {
  [[ $(pm "$1" inspect -f '{{.State.Status}}' "overlayd-node$1-overlayd" 2>/dev/null) == running ]]
}

read -r PROBE_PORT PROBE_PATH < <(render 0 "$image") || { echo "FAILED: render"; exit 1; }
log "readiness probe: port $PROBE_PORT path $PROBE_PATH"

# ---------- node 0: init containers, then a daemon waiting for a config ----------
log "node 0: kube play before the network config is in etcd"
check "node 0's pod plays" play 0
check "node 0's daemon container runs" wait_until 60 daemon_running 0

# The init containers' order, from podman's event log: each starts after the previous one died.
events=$(pm 0 events --stream=false --format '{{.Status}} {{.Name}}' 2>/dev/null)
order=$(awk '$1 == "start" || $1 == "died" {print $1, $2}' <<<"$events" | sed 's/overlayd-node0-//' | tr '\n' ' ')
want="start node-setup died node-setup start cleanup-aws-vpc-cni died cleanup-aws-vpc-cni start install-cni died install-cni start overlayd "
got=$(grep -o "start node-setup.*" <<<"$order")
check "init containers ran in order, then the daemon (events: $order)" test "${got:0:${#want}}" == "$want"
check "node-setup turned ip_forward on (was 0)" test "$(on 0 cat /proc/sys/net/ipv4/ip_forward)" == 1
check "aws-node's iptables chain is gone" test -z "$(on 0 iptables-legacy-save -t nat | grep AWS)"
check "aws-node's ip rule 1024 is gone" test -z "$(on 0 ip -4 rule | grep '^1024:')"
check "10-aws.conflist was moved aside" test ! -e "$d0/etc-cni/10-aws.conflist" -a -n "$(ls "$d0/etc-cni" | grep '^10-aws.conflist.')"
first=$(ls "$d0/etc-cni" | grep -E '\.(conflist|conf|json)$' | LC_ALL=C sort | head -1)
check "00-overlay.conflist is installed and sorts first ($first)" test "$first" == 00-overlay.conflist
check "the plugin and portmap/loopback are in /opt/cni/bin" test -x "$d0/opt/cni/bin/overlay" -a -x "$d0/opt/cni/bin/portmap" -a -x "$d0/opt/cni/bin/loopback"
check "the installed conflist is the ConfigMap's" diff -q "$d0/etc-cni/00-overlay.conflist" "$d0/files/config/00-overlay.conflist"

caps=$(pm 0 inspect -f '{{.EffectiveCaps}}' overlayd-node0-overlayd 2>/dev/null)
check "the daemon container keeps only NET_ADMIN and NET_RAW ($caps)" test "$caps" == "[CAP_NET_ADMIN CAP_NET_RAW]"
code=000
wait_until 30 eval '[[ $(probe 0) != 000 ]]' && code=$(probe 0)
check "readiness answers 503 while the network config is missing (got $code)" test "$code" == 503

# ---------- the config arrives: node 0 leases; nodes 1 and 2 join ----------
etcdctl_ put /coreos.com/network/config '{"Network":"10.244.0.0/16","SubnetLen":24,"Backend":{"Type":"vxlan","VNI":1}}' >/dev/null
check "node 0 becomes ready (200)" wait_until 60 eval '[[ $(probe 0) == 200 ]]'
check "node 0 wrote its subnet file" grep -q '^OVERLAY_SUBNET=10.244.' "$d0/run/overlayd/subnet.env"
leases=$(etcdctl_ get --prefix --keys-only /coreos.com/network/subnets/ | grep -c subnets/)
check "node 0's lease is in etcd ($leases)" test "$leases" -ge 1
for n in 1 2; do
  render "$n" "$image" >/dev/null
  check "node $n's pod plays" play "$n"
done
for n in 1 2; do
  check "node $n becomes ready (200)" wait_until 90 eval "[[ \$(probe $n) == 200 ]]"
done
leases=$(etcdctl_ get --prefix --keys-only /coreos.com/network/subnets/ | grep -c subnets/)
check "three leases in etcd ($leases)" test "$leases" == 3

# ---------- pods through the installed conflist: containerd on nodes 0 and 1 ----------
start_containerd() {
  local n=$1 d; d=$(dir_of "$n")
  cat >"$d/containerd/config.toml" <<CONF
version = 2
root = "$d/containerd/root"
state = "$d/containerd/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "$d/containerd/sock"
CONF
  # Not through `on`: a function in the background is a subshell, and $! must be containerd's PID.
  nsenter -t "${HOLDER[$n]}" -m -n -- containerd --config "$d/containerd/config.toml" >"$d/containerd/log" 2>&1 &
  CTRD[$n]=$!
  wait_until 30 test -S "$d/containerd/sock" && wait_until 10 ctrn "$n" version >/dev/null 2>&1
}
pod_pid() { ctrn "$1" task ls | awk -v c="$2" '$1 == c {print $2}'; }
pod_ip() { nsenter -t "$(pod_pid "$1" "$2")" -n ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1; }
declare -A POD_IP
for n in 0 1; do
  check "containerd starts on node $n" start_containerd "$n"
  ctrn "$n" images import -q "$archive" >/dev/null 2>&1 || ctrn "$n" images import "$archive"
  check "ctr run --cni makes pod p$n on node $n" ctrn "$n" run -d --cni "$image" "p$n" sleep 3600
  POD_IP[$n]=$(pod_ip "$n" "p$n")
  check "pod p$n got an address from node $n's subnet (${POD_IP[$n]})" \
    grep -q "^OVERLAY_SUBNET=${POD_IP[$n]%.*}\." "$(dir_of "$n")/run/overlayd/subnet.env"
done
check "pod p0 (node 0) reaches pod p1 (node 1)" \
  nsenter -t "$(pod_pid 0 p0)" -n ping -c 3 -W 2 -q "${POD_IP[1]}"
check "pod p1 (node 1) reaches pod p0 (node 0)" \
  nsenter -t "$(pod_pid 1 p1)" -n ping -c 3 -W 2 -q "${POD_IP[0]}"

# ---------- a hostPort through the chained portmap ----------
# ctr run --cni passes no port mappings (containerd 1.6's ctr has no flag, and the CNI library
# overwrites CNI_ARGS): podman's CNI backend is the runtime here that passes the portMappings
# capability, through the same installed conflist (network "overlay").
log "hostPort: podman run --network overlay -p 18080:8080 on node 1"
hp_ok=false
if pm 1 run -d --name hostport --network overlay -p 18080:8080 "$image" sleep 3600 >"$W/hostport.log" 2>&1; then
  hp_pid=$(pm 1 inspect -f '{{.State.Pid}}' hostport)
  hp_ip=$(nsenter -t "$hp_pid" -n ip -4 -o addr show eth0 | awk '{print $4}' | cut -d/ -f1)
  echo "hostport pod: $hp_ip" >"$W/www.txt"
  nsenter -t "$hp_pid" -n "$PY" -m http.server 8080 --bind 0.0.0.0 --directory "$W" >/dev/null 2>&1 &
  www=$!
  if wait_until 10 nsenter -t "$hp_pid" -n curl -sf -m 1 -o /dev/null http://127.0.0.1:8080/www.txt; then
    got=$(on 0 curl -s -m 5 "http://$(ip_of 1):18080/www.txt")
    [[ $got == "hostport pod: $hp_ip" ]] && hp_ok=true
  fi
  kill "$www" 2>/dev/null; wait "$www" 2>/dev/null
else
  cat "$W/hostport.log"
fi
check "node 0 reaches node 1's hostPort 18080 (portmap DNAT to the pod ${hp_ip:-?})" $hp_ok

# ---------- rolling update of node 1's overlayd pod, pods keep pinging ----------
log "rolling update: node 1's overlayd pod replaced by $image_new"
pm 1 tag "$image" "$image_new"
pinglog=$W/ping.log
nsenter -t "$(pod_pid 0 p0)" -n ping -i 0.2 -W 1 "${POD_IP[1]}" >"$pinglog" 2>&1 &
pinger=$!
sleep 2
pm 1 kube down "$(dir_of 1)/pod.yaml" >/dev/null 2>&1
check "node 1's overlayd pod is gone" test "$(probe 1)" == 000
render 1 "$image_new" >/dev/null
check "node 1's pod plays with the new image" play 1
check "node 1 is ready again (200)" wait_until 90 eval '[[ $(probe 1) == 200 ]]'
running_image=$(pm 1 inspect -f '{{.ImageName}}' overlayd-node1-overlayd 2>/dev/null)
check "node 1's daemon runs $image_new ($running_image)" test "$running_image" == "$image_new"
sleep 3
kill -INT "$pinger"; wait "$pinger" 2>/dev/null
summary=$(grep 'packets transmitted' "$pinglog")
sent=$(awk '{print $1}' <<<"$summary")
recv=$(awk '{print $4}' <<<"$summary")
check "0 pings lost between node 0's and node 1's pods during the update ($summary)" \
  test -n "$sent" -a "${sent:-0}" -ge 20 -a "$sent" == "$recv"

echo "daemonset: $passed passed, $failed failed"
((failed == 0))
exit
}
