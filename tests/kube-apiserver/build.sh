#!/usr/bin/env bash
# Builds the test Kubernetes control plane (etcd + kube-apiserver +
# kube-controller-manager, see main.go) into
# target/kube-apiserver/mesh-test-kube, once: it is rebuilt only when
# go.mod, go.sum, main.go or the Go version change. Prints the binary's path.
#
# The Rust test helper (tests/src/kube.rs) runs this under a lock before it
# starts a control plane; .ci/run runs it first so its time shows apart.
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
root="$(cd "$here/../.." && pwd)"
out="${CARGO_TARGET_DIR:-$root/target}/kube-apiserver"
bin="$out/mesh-test-kube"
mkdir -p "$out"

if ! command -v go >/dev/null; then
  echo "error: go is not installed; the Kubernetes tests build kube-apiserver from its Go modules (https://go.dev/dl/)" >&2
  exit 1
fi

# One build at a time: test binaries may ask together.
exec 9>"$out/.lock"
flock 9

stamp="$( (go version; cat "$here/go.mod" "$here/go.sum" "$here/main.go") | sha256sum | cut -d' ' -f1)"
if [ -x "$bin" ] && [ "$(cat "$out/stamp" 2>/dev/null)" = "$stamp" ]; then
  echo "$bin"
  exit 0
fi

echo "building the test kube-apiserver (cold: about 4 minutes on 2 cores)" >&2
version=k8s.io/component-base/version
cd "$here"
# No toolchain download, module graph exactly as go.sum says.
GOTOOLCHAIN=local CGO_ENABLED=0 GOFLAGS=-mod=readonly go build -trimpath \
  -ldflags "-s -w -X $version.gitVersion=v1.34.4 -X $version.gitMajor=1 -X $version.gitMinor=34 -X $version.gitTreeState=clean" \
  -o "$bin.tmp" .
mv "$bin.tmp" "$bin"
echo "$stamp" >"$out/stamp"
echo "$bin"
