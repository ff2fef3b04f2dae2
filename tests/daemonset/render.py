#!/usr/bin/env python3
"""Turns the shipped manifests into what `podman kube play` (4.3) can run on one lab node.

Input: manifests/overlayd.yaml (ServiceAccount, ConfigMap, DaemonSet) and etcd-tls-secret.yaml.
Output: one Pod (the DaemonSet's .spec.template) written to --out, and the files a kubelet would
project for its configMap/secret volumes, written under --files.

Only what a kubelet (or the DaemonSet controller) would do is done here, plus what podman 4.3
cannot take; everything else of the template is passed through unchanged:
- images: every container's image becomes --image (the only edit the test makes on purpose);
- restartPolicy Never: podman 4.3 gives init containers the pod's policy (issue #16343), and with
  Always they restart in a loop;
- ports dropped: podman refuses port mappings on a hostNetwork pod (the daemon still listens);
- probes dropped: podman does not run them as the kubelet does (the test calls the readiness
  endpoint itself; --probe prints it);
- envFrom configMapRef, configMapKeyRef, fieldRef (spec.nodeName, status.hostIP) resolved to
  values, and an optional secretKeyRef to a Secret that does not exist dropped, as the kubelet does;
- configMap and secret volumes: their keys written as files and mounted as hostPath directories
  (podman 4.3's secret volumes are broken: data stays base64, stringData is dropped).
"""
import argparse
import json
import os
import sys

import yaml


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--manifest", required=True)
    ap.add_argument("--secret", required=True, help="etcd-tls-secret.yaml (its key names are kept)")
    ap.add_argument("--secret-from", required=True,
                    help="KEY=PATH,... the test's own files for the Secret's keys")
    ap.add_argument("--image", required=True)
    ap.add_argument("--node-name", required=True)
    ap.add_argument("--host-ip", required=True)
    ap.add_argument("--set", action="append", default=[], help="ConfigMap KEY=VALUE overrides")
    ap.add_argument("--files", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--probe", action="store_true", help="print the readiness probe's port and path")
    a = ap.parse_args()

    docs = [d for d in yaml.safe_load_all(open(a.manifest)) if d]
    by_kind = {}
    for d in docs:
        by_kind.setdefault(d["kind"], {})[d["metadata"]["name"]] = d
    ds = next(iter(by_kind["DaemonSet"].values()))
    configmaps = {n: dict(d.get("data") or {}) for n, d in by_kind.get("ConfigMap", {}).items()}
    for kv in a.set:
        k, v = kv.split("=", 1)
        for cm in configmaps.values():
            if k in cm:
                cm[k] = v
                break
        else:
            sys.exit(f"--set {k}: no ConfigMap in {a.manifest} has that key")

    secret = yaml.safe_load(open(a.secret))
    given = dict(kv.split("=", 1) for kv in a.secret_from.split(","))
    keys = list((secret.get("stringData") or {}).keys()) + list((secret.get("data") or {}).keys())
    if sorted(keys) != sorted(given):
        sys.exit(f"the Secret has keys {sorted(keys)}, the test gave {sorted(given)}")
    secrets = {secret["metadata"]["name"]: {k: open(p).read() for k, p in given.items()}}

    tmpl = ds["spec"]["template"]
    spec = tmpl["spec"]
    probe = None
    for c in spec.get("initContainers", []) + spec["containers"]:
        c["image"] = a.image
        c.pop("ports", None)
        if "readinessProbe" in c:
            probe = c["readinessProbe"]["httpGet"]
        for p in ("readinessProbe", "livenessProbe", "startupProbe"):
            c.pop(p, None)
        env = []
        for ref in c.pop("envFrom", []):
            cm = configmaps[ref["configMapRef"]["name"]]
            env += [{"name": k, "value": v} for k, v in cm.items() if "." not in k and k.isupper()]
        for e in c.get("env", []):
            vf = e.get("valueFrom")
            if not vf:
                env.append(e)
            elif "fieldRef" in vf:
                field = vf["fieldRef"]["fieldPath"]
                value = {"spec.nodeName": a.node_name, "status.hostIP": a.host_ip}[field]
                env.append({"name": e["name"], "value": value})
            elif "configMapKeyRef" in vf:
                r = vf["configMapKeyRef"]
                env.append({"name": e["name"], "value": configmaps[r["name"]][r["key"]]})
            elif "secretKeyRef" in vf:
                r = vf["secretKeyRef"]
                if r["name"] in secrets:
                    env.append({"name": e["name"], "value": secrets[r["name"]][r["key"]]})
                elif not r.get("optional"):
                    sys.exit(f"{c['name']}: env {e['name']} needs Secret {r['name']}")
        if env:
            c["env"] = env
    for v in spec.get("volumes", []):
        if "configMap" in v:
            files = configmaps[v.pop("configMap")["name"]]
        elif "secret" in v:
            files = secrets[v.pop("secret")["secretName"]]
        else:
            continue
        d = os.path.join(a.files, v["name"])
        os.makedirs(d, exist_ok=True)
        for k, content in files.items():
            with open(os.path.join(d, k), "w") as f:
                f.write(content)
        v["hostPath"] = {"path": d, "type": "Directory"}
    spec["restartPolicy"] = "Never"
    spec["nodeName"] = a.node_name
    pod = {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": f"{ds['metadata']['name']}-{a.node_name}",
                     "labels": tmpl["metadata"].get("labels", {})},
        "spec": spec,
    }
    with open(a.out, "w") as f:
        yaml.safe_dump(pod, f, sort_keys=False)
    if a.probe:
        print(probe["port"], probe["path"])


if __name__ == "__main__":
    main()
