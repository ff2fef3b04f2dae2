#!/usr/bin/env bash
# Every file in manifests/ against the Kubernetes API schemas, strictly (unknown fields fail), for
# each Kubernetes version EKS supports (standard and extended support: 1.29-1.34).
# kubernetes-validate (PyPI) lives in a venv under target/, made on the first run.
set -euo pipefail
cd "$(dirname "$0")/.."
KV_VERSION=1.37.0   # schemas up to 1.37
EKS_VERSIONS=(1.29 1.30 1.31 1.32 1.33 1.34)
venv=${CARGO_TARGET_DIR:-target}/kv-venv
if [[ ! -x $venv/bin/kubernetes-validate ]] || [[ $("$venv/bin/kubernetes-validate" --version 2>/dev/null) != *"$KV_VERSION"* ]]; then
  echo "==> kubernetes-validate $KV_VERSION into $venv"
  # Debian's python3 (python3-venv); a pyenv shim first in PATH may be another interpreter.
  py=/usr/bin/python3
  [[ -x $py ]] || py=python3
  rm -rf "$venv"
  "$py" -m venv "$venv"
  "$venv/bin/pip" install -q --disable-pip-version-check "kubernetes-validate==$KV_VERSION"
fi
shopt -s nullglob
files=(manifests/*.yaml manifests/*.yml)
status=0
for v in "${EKS_VERSIONS[@]}"; do
  if "$venv/bin/kubernetes-validate" --strict --quiet -k "$v" "${files[@]}"; then
    echo "manifests valid for Kubernetes $v (strict): ${files[*]}"
  else
    echo "manifests INVALID for Kubernetes $v (strict)"
    status=1
  fi
done
exit "$status"
