#!/usr/bin/env python3
"""Simulated peer leases for scripts/bench-scale.sh, written through etcd's JSON gateway.

    scale_peers.py ENDPOINT PREFIX put N [FIRST]     N peers (numbered from FIRST, default 0)
    scale_peers.py ENDPOINT PREFIX del N [FIRST]     delete them again
    scale_peers.py ENDPOINT PREFIX churn RATE SECONDS DEL_FIRST PUT_FIRST
        RATE operations per second for SECONDS, alternately deleting the next existing peer
        (numbered from DEL_FIRST) and putting a new one (from PUT_FIRST), so the peer count stays
        level; prints one line per operation: "<unix time sent> put|del <subnet>"

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


def main():
    endpoint, prefix, op = sys.argv[1], sys.argv[2].rstrip("/"), sys.argv[3]
    if op == "put":
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
