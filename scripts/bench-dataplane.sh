#!/usr/bin/env bash
# Pod-to-pod throughput across two lab nodes running overlayd, against the same kernel VXLAN path
# built by hand with `ip`/`bridge` between other namespaces, measured in the same run: once bare,
# once with the same masquerade/forward iptables rules overlayd installs.
#
#   scripts/bench-dataplane.sh [SECONDS_PER_RUN] [ROUNDS]      (defaults: 4 s, 5 rounds)
#
# Rounds alternate the three so machine noise hits all alike; the medians are compared. Prints the
# throughputs and overlayd's ratio to each reference (target >= 0.97). Needs root; uses scripts/lab.sh
# for the overlay side and removes everything it made on exit.
set -euo pipefail
cd "$(dirname "$0")/.."
SECS=${1:-4}
ROUNDS=${2:-5}
R=obref                          # prefix of the hand-built reference namespaces
[[ $(id -u) == 0 ]] || { echo "bench: needs root" >&2; exit 1; }

cleanup() {
  for ns in $(ip netns list | awk '{print $1}' | grep -E "^$R" || true); do
    for pid in $(ip netns pids "$ns" 2>/dev/null); do kill -9 "$pid" 2>/dev/null || true; done
    ip netns del "$ns" 2>/dev/null || true
  done
  scripts/lab.sh down >/dev/null 2>&1 || true
}
trap cleanup EXIT

. scripts/lib/deps.sh
ensure_deps
echo "==> overlay side: scripts/lab.sh up 2"
scripts/lab.sh down >/dev/null 2>&1 || true
scripts/lab.sh up 2 >/tmp/obench-lab.out 2>&1 || { cat /tmp/obench-lab.out; exit 1; }
grep -E "pod pairs reachable" /tmp/obench-lab.out

# The reference: same topology, same MTU, VXLAN id 1 on port 8472, programmed by hand.
# build_ref PREFIX MASQ: two nodes with a pod each; MASQ=yes adds the masquerade and forward rules
# overlayd (and flannel) install, so that reference differs from overlayd only in who programmed
# it. Those rules turn on connection tracking for every packet in the node, which a Kubernetes node
# has anyway (kube-proxy).
build_ref() {
  local R=$1 masq=$2 i j n p
  ip netns add $R-ul
  ip -n $R-ul link add br0 type bridge
  ip -n $R-ul link set br0 up
  for i in 1 2; do
    n=$R-n$i p=$R-p$i
    ip netns add $n
    ip netns add $p
    ip -n $n link set lo up
    ip -n $p link set lo up
    ip link add v$i netns $R-ul type veth peer name eth0 netns $n
    ip -n $R-ul link set v$i master br0 up
    ip -n $n addr add 198.51.100.1$i/24 dev eth0
    ip -n $n link set eth0 up
    ip -n $n link add overlay.1 type vxlan id 1 local 198.51.100.1$i dev eth0 dstport 8472 nolearning
    ip -n $n link set overlay.1 mtu 1450 address 02:00:00:00:00:0$i up
    ip -n $n addr add 10.99.$i.0/32 dev overlay.1
    ip -n $n link add cni0 mtu 1450 type bridge
    ip -n $n addr add 10.99.$i.1/24 dev cni0
    ip -n $n link set cni0 up
    ip link add veth$i netns $n mtu 1450 type veth peer name eth0 netns $p mtu 1450
    ip -n $n link set veth$i master cni0 up
    ip -n $p addr add 10.99.$i.2/24 dev eth0
    ip -n $p link set eth0 up
    ip -n $p route add default via 10.99.$i.1
    ip netns exec $n sysctl -qw net.ipv4.ip_forward=1
    if [[ $masq == yes ]]; then
      printf '%s\n' '*nat' ':MASQ - [0:0]' '-A POSTROUTING -j MASQ' \
        '-A MASQ -m mark --mark 0x4000/0x4000 -j RETURN' \
        '-A MASQ -s 10.99.0.0/16 -d 10.99.0.0/16 -j RETURN' \
        '-A MASQ -s 10.99.0.0/16 ! -d 224.0.0.0/4 -j MASQUERADE --random-fully' \
        "-A MASQ ! -s 10.99.0.0/16 -d 10.99.$i.0/24 -j RETURN" \
        '-A MASQ ! -s 10.99.0.0/16 -d 10.99.0.0/16 -j MASQUERADE --random-fully' 'COMMIT' \
        '*filter' ':FWD - [0:0]' '-A FORWARD -j FWD' '-A FWD -s 10.99.0.0/16 -j ACCEPT' \
        '-A FWD -d 10.99.0.0/16 -j ACCEPT' 'COMMIT' | ip netns exec $n iptables-restore --noflush
    fi
  done
  for i in 1 2; do
    j=$((3 - i))
    n=$R-n$i
    ip -n $n neigh add 10.99.$j.0 lladdr 02:00:00:00:00:0$j dev overlay.1 nud permanent
    bridge -n $n fdb add 02:00:00:00:00:0$j dev overlay.1 dst 198.51.100.1$j self permanent
    ip -n $n route add 10.99.$j.0/24 via 10.99.$j.0 dev overlay.1 onlink
  done
  ip netns exec $R-p1 ping -c 1 -W 2 -q 10.99.2.2 >/dev/null || { echo "reference path $R does not work" >&2; exit 1; }
}
echo "==> reference side: the same VXLAN path built with ip/bridge, bare and with the same iptables rules"
build_ref $R no
build_ref ${R}m yes

pod_ip() { ip -n "$1" -4 -o addr show dev eth0 | awk '{print $4}' | cut -d/ -f1; }
# iperf3 TCP throughput in Gbit/s from pod $1 to pod $2 (server started and stopped here).
measure() {
  local src=$1 dst=$2 ip
  ip=$(pod_ip "$dst")
  ip netns exec "$dst" iperf3 -s -1 -D >/dev/null 2>&1
  sleep 0.3
  ip netns exec "$src" iperf3 -c "$ip" -t "$SECS" -J 2>/dev/null |
    python3 -c 'import json,sys; print("%.3f" % (json.load(sys.stdin)["end"]["sum_received"]["bits_per_second"]/1e9))'
}
median() { printf '%s\n' "$@" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }

overlay=() bare=() masq=()
for r in $(seq 1 "$ROUNDS"); do
  overlay+=("$(measure olab-n1-p1 olab-n2-p1)")
  bare+=("$(measure $R-p1 $R-p2)")
  masq+=("$(measure ${R}m-p1 ${R}m-p2)")
  echo "round $r: overlayd ${overlay[-1]}, hand-built ${bare[-1]}, hand-built + same iptables rules ${masq[-1]} Gbit/s"
done
o=$(median "${overlay[@]}")
b=$(median "${bare[@]}")
m=$(median "${masq[@]}")
ratio() { python3 -c "print('%.3f' % ($1 / $2))"; }
echo
echo "pod-to-pod TCP over VXLAN, median of $ROUNDS x ${SECS}s (Gbit/s):"
echo "  overlayd (lab, 2 nodes):                         $o"
echo "  hand-built ip/bridge VXLAN:                      $b   ratio overlayd/this $(ratio "$o" "$b")"
echo "  hand-built + the same masquerade/forward rules:  $m   ratio overlayd/this $(ratio "$o" "$m")"
echo "  target: ratio >= 0.97"
