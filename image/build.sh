#!/usr/bin/env bash
# Builds the `mesh` container image without a Docker daemon: an OCI image
# layout made with umoci (Debian package `umoci`), holding only the release
# binary, the shared libraries it links (from ldd), CA certificates and a
# non-root user. Every Mesh component runs from it (`mesh control`, `mesh
# proxy`, `mesh gateway`, `mesh service-mirror`), and `mesh-cni`.
#
#   image/build.sh [TAG]          -> target/image/mesh (OCI layout), target/image/mesh-TAG.tar
#   MESH_PGO=0 image/build.sh     the same without profile-guided optimisation (faster to build)
#
# Push or load it with any OCI tool, e.g. `skopeo copy oci:target/image/mesh:TAG
# docker://registry.example/mesh:TAG`, then `mesh install --set image=...`.
set -euo pipefail
cd "$(dirname "$0")/.."
tag="${1:-$(cargo metadata --no-deps --format-version 1 | python3 -c 'import json,sys; print(next(p["version"] for p in json.load(sys.stdin)["packages"] if p["name"]=="mesh-cli"))')}"
command -v umoci >/dev/null || { echo "error: umoci is not installed (apt-get install umoci)" >&2; exit 1; }

# Release with LTO, laid out by a profile of the proxies' hot paths
# (image/pgo.sh: an instrumented build, a training run, the final build;
# about half an hour on 2 cores). MESH_PGO=0 builds without the profile.
if [ "${MESH_PGO:-1}" = 0 ]; then
  echo "== cargo build --profile dist -p mesh-cli -p mesh-cni (release with LTO, no PGO; several minutes)" >&2
  cargo build --profile dist -p mesh-cli --bin mesh -p mesh-cni --bin mesh-cni
else
  image/pgo.sh
fi
bin=target/dist/mesh

out=target/image
layout="$out/mesh"
rm -rf "$layout" "$out/bundle"
mkdir -p "$out"
umoci init --layout "$layout"
umoci new --image "$layout:$tag"
umoci unpack --rootless --image "$layout:$tag" "$out/bundle"
root="$out/bundle/rootfs"

install -D -m 0755 "$bin" "$root/usr/bin/mesh"
# The CNI plugin, copied onto each node by `mesh install-cni`'s DaemonSet.
install -D -m 0755 target/dist/mesh-cni "$root/usr/bin/mesh-cni"
# Debug info stays in target/dist; the image carries the code only.
strip --strip-unneeded "$root/usr/bin/mesh" "$root/usr/bin/mesh-cni"
# The dynamic loader and the libraries the binary links, nothing else.
for lib in $(ldd "$bin" | awk '/=> \// {print $3} /^\t\// {print $1}'); do
  install -D -m 0755 "$(readlink -f "$lib")" "$root$lib"
done
# Roots for the API server client (kube-rs reads the system store in-cluster).
if [ -f /etc/ssl/certs/ca-certificates.crt ]; then
  install -D -m 0644 /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
fi
printf 'root:x:0:0:root:/:/sbin/nologin\nmesh:x:65532:65532:mesh:/:/sbin/nologin\n' >"$root/etc/passwd"
printf 'root:x:0:\nmesh:x:65532:\n' >"$root/etc/group"

umoci repack --image "$layout:$tag" "$out/bundle"
umoci config --image "$layout:$tag" \
  --config.entrypoint /usr/bin/mesh \
  --config.user 65532:65532 \
  --config.workingdir / \
  --config.label "org.opencontainers.image.source=https://github.com/mesh-rs/mesh" \
  --config.label "org.opencontainers.image.version=$tag"
umoci gc --layout "$layout"
rm -rf "$out/bundle"
tar -C "$layout" -cf "$out/mesh-$tag.tar" .
size=$(du -sh "$out/mesh-$tag.tar" | cut -f1)
echo "image: oci:$layout:$tag ($size as an OCI archive: $out/mesh-$tag.tar)" >&2
