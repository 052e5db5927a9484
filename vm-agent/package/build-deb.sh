#!/usr/bin/env bash
# Builds the VM agent's Debian package from a built binary:
#   vm-agent/package/build-deb.sh BINARY OUT_DIR
# The package holds /usr/bin/mesh-vm-agent and its hardened systemd unit
# (printed by the binary itself, so the unit `join` writes and the packaged
# one are the same). Installing it starts nothing: `mesh-vm-agent join`
# enables and starts the unit once the VM has an identity.
set -euo pipefail
bin="${1:?usage: build-deb.sh BINARY OUT_DIR}"
out="${2:?usage: build-deb.sh BINARY OUT_DIR}"
command -v dpkg-deb >/dev/null || { echo "error: dpkg-deb is required (apt-get install dpkg)" >&2; exit 1; }

version="$("$bin" --version | awk '{print $2}')"
arch="$(dpkg --print-architecture)"
root="$(mktemp -d)"
chmod 0755 "$root"
trap 'rm -rf "$root"' EXIT

install -D -m 0755 "$bin" "$root/usr/bin/mesh-vm-agent"
strip --strip-debug "$root/usr/bin/mesh-vm-agent" 2>/dev/null || true
install -d -m 0755 "$root/lib/systemd/system"
"$bin" unit --exe /usr/bin/mesh-vm-agent --config /etc/mesh/vm-agent.json \
  > "$root/lib/systemd/system/mesh-vm-agent.service"
chmod 0644 "$root/lib/systemd/system/mesh-vm-agent.service"
install -d -m 0755 "$root/usr/share/doc/mesh-vm-agent"
cat > "$root/usr/share/doc/mesh-vm-agent/README" <<'DOC'
Join this VM to a Mesh cluster with the line `mesh vm token create` printed:
  mesh-vm-agent join mesh-vm1....
Leave with `mesh-vm-agent leave`. See https://github.com/mesh-rs/mesh#vms
DOC

install -d -m 0755 "$root/DEBIAN"
size="$(du -sk --exclude=DEBIAN "$root" | cut -f1)"
cat > "$root/DEBIAN/control" <<CTRL
Package: mesh-vm-agent
Version: ${version}
Architecture: ${arch}
Maintainer: Mesh developers <mesh@mesh.rs>
Installed-Size: ${size}
Depends: libc6 (>= 2.36), systemd
Recommends: iptables
Section: net
Priority: optional
Homepage: https://github.com/mesh-rs/mesh
Description: Mesh VM agent: one command brings this VM into the mesh
 Joins the VM to a Mesh cluster with a single-use join string, keeps its
 SPIFFE identity, registers it with health checks, runs the mesh proxy and
 serves the SPIFFE Workload API to local apps, under systemd.
CTRL
# On removal, stop the agent: it deregisters the VM as it stops.
cat > "$root/DEBIAN/prerm" <<'PRERM'
#!/bin/sh
set -e
if [ -d /run/systemd/system ] && [ "$1" = remove ]; then
  systemctl disable --now mesh-vm-agent.service >/dev/null 2>&1 || true
fi
PRERM
chmod 0755 "$root/DEBIAN/prerm"

mkdir -p "$out"
deb="$out/mesh-vm-agent_${version}_${arch}.deb"
dpkg-deb --root-owner-group --build "$root" "$deb" >/dev/null
echo "$deb"
