#!/usr/bin/env bash
# Per-call cost of the `overlay` CNI plugin against the reference it replaces: Debian's
# containernetworking-plugins `bridge` with `host-local` IPAM (what flannel's CNI plugin delegates
# to), configured alike (own bridge, gateway .1, default route, hairpin, MTU 1450), in the same run.
#
#   scripts/bench-cni.sh [N]        (default N=200)
#
# Times N sequential ADDs then N sequential DELs of each plugin (means per call), N DELs of
# attachments that do not exist (the plugin's own cost without the kernel's veth teardown), and the
# wall time of 100 ADDs started at once (median of 3 rounds). The two plugins alternate call by call
# from one shell inside a lab node namespace (as a runtime would exec them), so load from anything
# else on the machine hits both alike and no harness cost is timed.
# Targets: overlay ADD <= 0.25x and DEL <= 0.15x the reference. The plugin is built as shipped
# (release, statically linked: scripts/lib/build.sh).
#
# Needs root. Everything lives in namespaces named <prefix>-* and a temp dir, removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
[[ $N =~ ^[0-9]+$ && $N -ge 1 && $N -le 250 ]] || { echo "N must be 1..250 (one /24 per plugin)" >&2; exit 2; }
PAR=100
[[ $(id -u) == 0 ]] || { echo "bench-cni: needs root (network namespaces)" >&2; exit 1; }

export PATH="$PATH:/usr/sbin:/sbin"
REF_DIR=/usr/lib/cni
missing=()
command -v ip >/dev/null || missing+=(iproute2)
[[ -x $REF_DIR/bridge && -x $REF_DIR/host-local ]] || missing+=(containernetworking-plugins)
if ((${#missing[@]})); then
  echo "==> installing ${missing[*]}"
  DEBIAN_FRONTEND=noninteractive apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null && [[ -f $HOME/.cargo/env ]]; then . "$HOME/.cargo/env"; fi
echo "==> building the overlay plugin (release, static as shipped)"
. scripts/lib/build.sh
build_plugin_release
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps |
  python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
OVERLAY=$TARGET_DIR/release/overlay
[[ -x $OVERLAY ]] || { echo "no $OVERLAY" >&2; exit 1; }

P=obcni$$
TMP=$(mktemp -d "/tmp/$P.XXXXXX")
cleanup() {
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$P-" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

# A fresh pod netns for every sandbox, as a runtime makes one: overlay's DEL leaves the pair
# (host end down) for the netns removal to take along, so a netns is never reused.
SANDBOXES=("warm1")
for i in $(seq 1 "$N"); do SANDBOXES+=("bench$i"); done
for r in 1 2 3; do for i in $(seq 1 "$PAR"); do SANDBOXES+=("par$r-$i"); done; done
echo "==> lab: 1 node namespace, 2 x ${#SANDBOXES[@]} pod namespaces (prefix $P-)"
ip netns add "$P-node"
ip -n "$P-node" link set lo up
for s in "${SANDBOXES[@]}"; do
  ip netns add "$P-o$s"
  ip netns add "$P-r$s"
done

printf 'OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=10.244.7.1/24\nOVERLAY_MTU=1450\nOVERLAY_IPMASQ=true\n' >"$TMP/subnet.env"
cat >"$TMP/overlay.json" <<EOF
{"cniVersion":"1.0.0","name":"benchnet","type":"overlay","bridge":"cni0",
 "subnetFile":"$TMP/subnet.env","dataDir":"$TMP/overlay-ipam"}
EOF
cat >"$TMP/bridge.json" <<EOF
{"cniVersion":"1.0.0","name":"benchref","type":"bridge","bridge":"cni1","isGateway":true,
 "isDefaultGateway":true,"hairpinMode":true,"mtu":1450,
 "ipam":{"type":"host-local","dataDir":"$TMP/ref-ipam",
         "ranges":[[{"subnet":"10.245.7.0/24","rangeStart":"10.245.7.2","gateway":"10.245.7.1"}]]}}
EOF

# Runs inside the node namespace. Prints, for overlay then the reference: total µs of the N ADDs,
# of the N DELs, of the N DELs of attachments that never existed, and the median wall ms of 3
# rounds of PAR parallel ADDs. Per-call times come from $EPOCHREALTIME: no helper process is timed.
cat >"$TMP/inner.sh" <<'INNER'
set -euo pipefail
n=$1 par=$2 prefix=$3 tmp=$4
declare -A plugin=([o]=$5 [r]=$6) conf=([o]=$tmp/overlay.json [r]=$tmp/bridge.json)
export CNI_PATH=/usr/lib/cni CNI_IFNAME=eth0
us() { local t=${1/./}; echo $((10#$t)); }
# The plugin's output is read through a pipe to its end, as a runtime reads it: a call is over
# when every copy of its stdout is closed, not only when the process exits. (`exec`: the subshell
# of $(...) becomes the plugin, as a runtime's fork does; no helper like env(1) is timed.)
call() { # o|r COMMAND POD ID-PREFIX (the sandbox's netns is <ID-PREFIX><POD>)
  local out
  out=$(CNI_COMMAND=$2 CNI_CONTAINERID=$4-$3 CNI_NETNS=/var/run/netns/$prefix-$1$4$3 exec "${plugin[$1]}" <"${conf[$1]}") ||
    { echo "$1: $2 of pod $3 failed: $out" >&2; exit 1; }
}
declare -A sum
timed() { # COMMAND ID-PREFIX: both plugins, alternating; totals in sum[o], sum[r]
  local i k t0 t1
  sum=([o]=0 [r]=0)
  for i in $(seq 1 "$n"); do
    for k in o r; do
      t0=$EPOCHREALTIME; call "$k" "$1" "$i" "$2"; t1=$EPOCHREALTIME
      sum[$k]=$((sum[$k] + $(us "$t1") - $(us "$t0")))
    done
  done
}
parallel() { # o|r ROUND: wall ms of PAR ADDs started at once (their DELs follow, untimed)
  local t0 t1 i fail=0 pids=()
  t0=$EPOCHREALTIME
  for i in $(seq 1 "$par"); do call "$1" ADD "$i" "par$2-" & pids+=($!); done
  for i in "${pids[@]}"; do wait "$i" || fail=1; done
  t1=$EPOCHREALTIME
  ((fail == 0)) || { echo "$1: a parallel ADD failed" >&2; exit 1; }
  for i in $(seq 1 "$par"); do call "$1" DEL "$i" "par$2-"; done
  echo $(( ($(us "$t1") - $(us "$t0")) / 1000 ))
}
median3() { printf '%s\n' "$@" | sort -n | sed -n 2p; }
# One untimed ADD/DEL each first: from then on both bridges exist and the page cache is warm.
for k in o r; do call "$k" ADD 1 warm; call "$k" DEL 1 warm; done
timed ADD bench; add_o=${sum[o]} add_r=${sum[r]}
timed DEL bench; del_o=${sum[o]} del_r=${sum[r]}
timed DEL none; noop_o=${sum[o]} noop_r=${sum[r]}
po=() pr=()
for r in 1 2 3; do po+=("$(parallel o "$r")"); pr+=("$(parallel r "$r")"); done
echo "$add_o $del_o $noop_o $(median3 "${po[@]}") $add_r $del_r $noop_r $(median3 "${pr[@]}")"
INNER

echo "==> $N x ADD then $N x DEL, overlay and bridge+host-local alternating; 3 x $PAR parallel ADDs each"
out=$(timeout 900 ip netns exec "$P-node" bash "$TMP/inner.sh" "$N" "$PAR" "$P" "$TMP" "$OVERLAY" "$REF_DIR/bridge")

python3 - "$N" "$PAR" $out <<'EOF'
import sys
n, par = int(sys.argv[1]), int(sys.argv[2])
oa, od, on, op, ra, rd, rn, rp = map(int, sys.argv[3:])
ms = lambda total: total / n / 1000
print()
print(f"CNI per-call cost, mean of {n} sequential calls (ms):")
print(f"                           ADD       DEL   DEL of nothing")
print(f"  overlay             {ms(oa):9.2f} {ms(od):9.2f} {ms(on):9.2f}")
print(f"  bridge+host-local   {ms(ra):9.2f} {ms(rd):9.2f} {ms(rn):9.2f}")
ar, dr, nr = oa / ra, od / rd, on / rn
print(f"  ratio overlay/ref   {ar:9.3f} {dr:9.3f} {nr:9.3f}")
print(f"  targets: ADD <= 0.25 {'PASS' if ar <= 0.25 else 'FAIL'}, DEL <= 0.15 {'PASS' if dr <= 0.15 else 'FAIL'}")
print(f"{par} ADDs started at once, wall time (median of 3): overlay {op} ms, "
      f"bridge+host-local {rp} ms (ratio {op / rp:.3f})")
EOF
