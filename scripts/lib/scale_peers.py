#!/usr/bin/env python3
"""Simulated peer leases for scripts/bench-scale.sh, written through etcd's JSON gateway.

    scale_peers.py ENDPOINT PREFIX put N [FIRST]     N peers (numbered from FIRST, default 0)
    scale_peers.py ENDPOINT PREFIX del N [FIRST]     delete them again
    scale_peers.py ENDPOINT PREFIX churn RATE SECONDS DEL_FIRST PUT_FIRST
        RATE operations per second for SECONDS, alternately deleting the next existing peer
        (numbered from DEL_FIRST) and putting a new one (from PUT_FIRST), so the peer count stays
        level; prints one line per operation: "<unix time sent> put|del <subnet>"
    scale_peers.py - - respond PORT SECONDS
        answer, for SECONDS, the node's peer probes as every simulated peer's kernel would: each
        VXLAN packet on UDP PORT that carries an ICMP echo request gets the echo reply back in
        VXLAN, from the peer's PublicIP (the caller routes 198.18.0.0/15 to this namespace as
        local addresses); prints "answered N" at the end

Peer i holds subnet 10.<1 + i/256>.<i%256>.0/24 (Network 10.0.0.0/8), PublicIP 198.18.0.0 + i
(RFC 2544's benchmarking range: the documentation ranges hold 762 addresses, too few for 20 000
peers; the bench's node has no route out of the lab, so nothing is ever sent to them), and a
locally administered VtepMAC derived from i. Puts go in transactions of 128 (etcd's default
--max-txn-ops), all bound to one etcd lease, as a node's key would be.
"""
import base64
import json
import sys
import time
import urllib.request


def call(endpoint, path, body):
    req = urllib.request.Request(
        endpoint + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read() or b"{}")


def b64(s):
    return base64.b64encode(s.encode()).decode()


def subnet(i):
    return f"10.{1 + i // 256}.{i % 256}.0"


def key(prefix, i):
    return f"{prefix}/subnets/{subnet(i)}-24"


def value(i):
    ip = 198 << 24 | 18 << 16
    ip += i
    pub = ".".join(str(ip >> s & 255) for s in (24, 16, 8, 0))
    mac = "02:5c:%02x:%02x:%02x:%02x" % (i >> 24 & 255, i >> 16 & 255, i >> 8 & 255, i & 255)
    return json.dumps(
        {
            "PublicIP": pub,
            "BackendType": "vxlan",
            "BackendData": {"VNI": 1, "VtepMAC": mac},
            "NodeName": f"sim-{i}",
        },
        separators=(",", ":"),
    )


def lease(endpoint):
    return call(endpoint, "/v3/lease/grant", {"TTL": 86400})["ID"]


def put_many(endpoint, prefix, ids):
    lid = lease(endpoint)
    ids = list(ids)
    for start in range(0, len(ids), 128):
        ops = [
            {"requestPut": {"key": b64(key(prefix, i)), "value": b64(value(i)), "lease": lid}}
            for i in ids[start : start + 128]
        ]
        call(endpoint, "/v3/kv/txn", {"success": ops})


def del_many(endpoint, prefix, ids):
    ids = list(ids)
    for start in range(0, len(ids), 128):
        ops = [{"requestDeleteRange": {"key": b64(key(prefix, i))}} for i in ids[start : start + 128]]
        call(endpoint, "/v3/kv/txn", {"success": ops})


def churn(endpoint, prefix, rate, seconds, del_first, put_first):
    lid = lease(endpoint)
    n = int(rate * seconds)
    t0 = time.time()
    for k in range(n):
        due = t0 + k / rate
        wait = due - time.time()
        if wait > 0:
            time.sleep(wait)
        # Each operation must change the kernel: delete a peer that exists, add one that never did.
        sent = time.time()
        if k % 2 == 0:
            i = del_first + k // 2
            call(endpoint, "/v3/kv/deleterange", {"key": b64(key(prefix, i))})
            print(f"{sent:.6f} del {subnet(i)}/24", flush=True)
        else:
            i = put_first + k // 2
            call(endpoint, "/v3/kv/put", {"key": b64(key(prefix, i)), "value": b64(value(i)), "lease": lid})
            print(f"{sent:.6f} put {subnet(i)}/24", flush=True)


def checksum(b):
    if len(b) % 2:
        b += b"\0"
    s = sum(int.from_bytes(b[i : i + 2], "big") for i in range(0, len(b), 2))
    while s > 0xFFFF:
        s = (s & 0xFFFF) + (s >> 16)
    return ~s & 0xFFFF


def echo_reply(frame):
    """The VXLAN payload answering `frame` (VXLAN header + Ethernet + IPv4 + ICMP echo request),
    or None when it is something else."""
    if len(frame) < 8 + 14 + 20 + 8 or frame[0] & 0x08 == 0:
        return None
    vx, eth, ip = frame[:8], frame[8:22], frame[22:]
    if eth[12:14] != b"\x08\x00" or ip[9] != 1:
        return None
    ihl = (ip[0] & 0x0F) * 4
    icmp = bytearray(ip[ihl:])
    if len(icmp) < 8 or icmp[0] != 8:
        return None
    icmp[0], icmp[2:4] = 0, b"\0\0"
    icmp[2:4] = checksum(bytes(icmp)).to_bytes(2, "big")
    # Swapping the addresses leaves the IPv4 header checksum as it was.
    hdr = bytearray(ip[:ihl])
    hdr[12:16], hdr[16:20] = ip[16:20], ip[12:16]
    return vx + eth[6:12] + eth[0:6] + eth[12:14] + bytes(hdr) + bytes(icmp)


def respond(port, seconds):
    import socket
    import struct

    IP_PKTINFO = 8
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_IP, IP_PKTINFO, 1)
    s.bind(("0.0.0.0", port))
    s.settimeout(0.5)
    end, answered = time.time() + seconds, 0
    while time.time() < end:
        try:
            data, anc, _, src = s.recvmsg(2048, socket.CMSG_SPACE(12))
        except socket.timeout:
            continue
        reply = echo_reply(data)
        if reply is None:
            continue
        # Sent from the address the request was sent to: the peer's PublicIP.
        local = next((d[4:8] for lvl, t, d in anc if lvl == socket.SOL_IP and t == IP_PKTINFO), None)
        if local is None:
            continue
        pktinfo = struct.pack("=I4s4s", 0, local, b"\0\0\0\0")
        s.sendmsg([reply], [(socket.SOL_IP, IP_PKTINFO, pktinfo)], 0, (src[0], port))
        answered += 1
    print(f"answered {answered}", flush=True)


def main():
    endpoint, prefix, op = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3]
    if op == "respond":
        respond(int(sys.argv[4]), float(sys.argv[5]))
    elif op == "put":
        n, first = int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0
        put_many(endpoint, prefix, range(first, first + n))
    elif op == "del":
        n, first = int(sys.argv[4]), int(sys.argv[5]) if len(sys.argv) > 5 else 0
        del_many(endpoint, prefix, range(first, first + n))
    elif op == "churn":
        rate, seconds = float(sys.argv[4]), float(sys.argv[5])
        churn(endpoint, prefix, rate, seconds, int(sys.argv[6]), int(sys.argv[7]))
    else:
        sys.exit(f"unknown operation {op}")


if __name__ == "__main__":
    main()
