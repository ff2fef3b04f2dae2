#!/usr/bin/env bash
# Per-call cost of the `overlay` CNI plugin against the reference it replaces: Debian's
# containernetworking-plugins `bridge` with `host-local` IPAM (what flannel's CNI plugin delegates
# to), configured alike (bridge cni0, gateway .1, default route, hairpin, MTU 1450), in the same run.
#
#   scripts/bench-cni.sh [N]        (default N=200)
#
# Times N sequential ADDs then N sequential DELs of each plugin (means per call), then the wall time
# of 100 ADDs started at once. Each plugin runs in its own lab "node" namespace, called straight from
# a shell inside it (as a runtime would exec it), so namespace-entry costs of the harness do not
# count. Targets: overlay ADD <= 0.25x and DEL <= 0.15x the reference.
#
# Needs root. Everything lives in namespaces named <prefix>-* and a temp dir, removed on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
N=${1:-200}
[[ $N =~ ^[0-9]+$ && $N -ge 1 && $N -le 250 ]] || { echo "N must be 1..250 (one /24 per node)" >&2; exit 2; }
PAR=100
PODS=$((N > PAR ? N : PAR))
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

if [[ -f $HOME/.cargo/env ]] && ! command -v cargo >/dev/null; then . "$HOME/.cargo/env"; fi
echo "==> building the overlay plugin (release)"
cargo build --release -p overlay-cni --bin overlay -q
TARGET_DIR=$(cargo metadata --format-version 1 --no-deps | python3 -c 'import json,sys; print(json.load(sys.stdin)["target_directory"])')
OVERLAY=$TARGET_DIR/release/overlay
[[ -x $OVERLAY ]] || { echo "no $OVERLAY" >&2; exit 1; }

P=obcni$$
TMP=$(mktemp -d /tmp/$P.XXXXXX)
cleanup() {
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$P-" || true); do
    ip netns del "$ns" 2>/dev/null || true
  done
  rm -rf "$TMP"
}
trap cleanup EXIT INT TERM

echo "==> lab: 2 node namespaces, $PODS pod namespaces (prefix $P-)"
for n in on rn; do
  ip netns add "$P-$n"
  ip -n "$P-$n" link set lo up
done
for i in $(seq 1 "$PODS"); do
  ip netns add "$P-p$i"
done

printf 'OVERLAY_NETWORK=10.244.0.0/16\nOVERLAY_SUBNET=10.244.7.1/24\nOVERLAY_MTU=1450\nOVERLAY_IPMASQ=true\n' >"$TMP/subnet.env"
cat >"$TMP/overlay.json" <<EOF
{"cniVersion":"1.0.0","name":"benchnet","type":"overlay","bridge":"cni0",
 "subnetFile":"$TMP/subnet.env","dataDir":"$TMP/overlay-ipam"}
EOF
cat >"$TMP/bridge.json" <<EOF
{"cniVersion":"1.0.0","name":"benchnet","type":"bridge","bridge":"cni0","isGateway":true,
 "isDefaultGateway":true,"hairpinMode":true,"mtu":1450,
 "ipam":{"type":"host-local","dataDir":"$TMP/ref-ipam",
         "ranges":[[{"subnet":"10.244.7.0/24","rangeStart":"10.244.7.2","gateway":"10.244.7.1"}]]}}
EOF

# bench_in NODE PLUGIN CONF: runs inside the node namespace; prints "add_mean_ms del_mean_ms par_ms".
# Per-call times come from $EPOCHREALTIME around each exec: no helper process is timed.
cat >"$TMP/inner.sh" <<'EOF'
set -euo pipefail
plugin=$1 conf=$2 n=$3 par=$4 prefix=$5
export CNI_PATH=/usr/lib/cni CNI_IFNAME=eth0
us() { local t=${1/./}; echo $((10#$t)); }
call() { # COMMAND POD
  CNI_COMMAND=$1 CNI_CONTAINERID=bench-$2 CNI_NETNS=/var/run/netns/$prefix-p$2 "$plugin" <"$conf" >/dev/null ||
    { echo "$1 of pod $2 failed:" >&2; CNI_COMMAND=$1 CNI_CONTAINERID=bench-$2 CNI_NETNS=/var/run/netns/$prefix-p$2 "$plugin" <"$conf" >&2; exit 1; }
}
total() { # COMMAND
  local sum=0 i t0 t1
  for i in $(seq 1 "$n"); do
    t0=$EPOCHREALTIME; call "$1" "$i"; t1=$EPOCHREALTIME
    sum=$((sum + $(us "$t1") - $(us "$t0")))
  done
  echo "$sum"
}
# One untimed ADD/DEL first: the bridge exists from then on for both plugins, and page cache is warm.
call ADD 1; call DEL 1
add=$(total ADD)
del=$(total DEL)
t0=$EPOCHREALTIME
pids=()
for i in $(seq 1 "$par"); do call ADD "$i" & pids+=($!); done
fail=0
for p in "${pids[@]}"; do wait "$p" || fail=1; done
t1=$EPOCHREALTIME
((fail == 0)) || { echo "a parallel ADD failed" >&2; exit 1; }
parms=$(( ($(us "$t1") - $(us "$t0")) / 1000 ))
for i in $(seq 1 "$par"); do call DEL "$i"; done
echo "$add $del $parms"
EOF

run_bench() { # NODE PLUGIN CONF
  timeout 600 ip netns exec "$P-$1" bash "$TMP/inner.sh" "$2" "$3" "$N" "$PAR" "$P"
}

echo "==> overlay: $N x ADD, $N x DEL, $PAR parallel ADDs"
read -r o_add o_del o_par < <(run_bench on "$OVERLAY" "$TMP/overlay.json")
echo "==> reference bridge + host-local: $N x ADD, $N x DEL, $PAR parallel ADDs"
read -r r_add r_del r_par < <(run_bench rn "$REF_DIR/bridge" "$TMP/bridge.json")

python3 - "$N" "$PAR" "$o_add" "$o_del" "$o_par" "$r_add" "$r_del" "$r_par" <<'EOF'
import sys
n, par, oa, od, op, ra, rd, rp = map(int, sys.argv[1:])
ma, md, rma, rmd = oa / n / 1000, od / n / 1000, ra / n / 1000, rd / n / 1000
print()
print(f"CNI per-call cost, mean of {n} sequential calls (ms):")
print(f"                         ADD       DEL")
print(f"  overlay             {ma:7.2f}   {md:7.2f}")
print(f"  bridge+host-local   {rma:7.2f}   {rmd:7.2f}")
ar, dr = ma / rma, md / rmd
print(f"  ratio overlay/ref   {ar:7.3f}   {dr:7.3f}   (targets <= 0.25 and <= 0.15: "
      f"ADD {'PASS' if ar <= 0.25 else 'FAIL'}, DEL {'PASS' if dr <= 0.15 else 'FAIL'})")
print(f"{par} ADDs started at once, wall time: overlay {op} ms, bridge+host-local {rp} ms "
      f"(ratio {op / rp:.3f})")
EOF
