#!/usr/bin/env bash
# Builds what ships with profile-guided optimisation (PGO): the `dist`
# profile (release + whole-program LTO), laid out by a profile of the
# proxies' own hot paths.
#
#   image/pgo.sh        -> target/dist/mesh, target/dist/mesh-proxy, target/dist/mesh-cni
#
# Three steps, each printed as it starts:
#   1. an instrumented build, in target/pgo/gen (counters in every branch);
#   2. a training run of it: `mesh bench --rounds 1` (HTTP/1.1 and HTTP/2
#      through a proxy pair, new mTLS connections, the memory phases) and
#      `mesh bench --cross-cluster --rounds 1` (gateways, TCP and QUIC
#      tunnels), whose counters llvm-profdata merges into one profile;
#   3. the optimised build into target/dist, with that profile.
# The profile is made here from this source and compiler, never checked in:
# one from other code would only be partly used (LLVM ignores functions that
# changed). Code the training does not run (trailers, large bodies, the
# Kubernetes store, injection) is optimised as without a profile.
#
# The final build goes to target/dist with its own compiler flags: a plain
# `cargo build --profile dist` after it (or before it) rebuilds everything.
#
# Twice a cold `dist` build (about 30 min on 2 cores) plus about a minute of
# training. llvm-profdata comes from rustup's `llvm-tools` component, which
# matches rustc's LLVM; it is added when missing.
set -euo pipefail
cd "$(dirname "$0")/.."

sysroot="$(rustc --print sysroot)"
host="$(rustc -vV | sed -n 's/^host: //p')"
profdata="$sysroot/lib/rustlib/$host/bin/llvm-profdata"
if [ ! -x "$profdata" ]; then
  echo "== rustup component add llvm-tools (llvm-profdata, to merge the training counters)" >&2
  if ! rustup component add llvm-tools; then
    echo "error: $profdata is missing and 'rustup component add llvm-tools' failed; install the llvm-tools component for $(rustc -V), or build without PGO: cargo build --profile dist -p mesh-cli -p mesh-proxy (for the image: MESH_PGO=0 image/build.sh)" >&2
    exit 1
  fi
fi

# The same packages in both builds: features unify per build, and a profile
# applies to the code it was taken from.
packages=(-p mesh-cli --bin mesh -p mesh-proxy --bin mesh-proxy -p mesh-cni --bin mesh-cni)
work="$PWD/target/pgo"
rm -rf "$work/profiles"
mkdir -p "$work/profiles"

echo "== 1/3 instrumented build: cargo build --profile dist --target-dir target/pgo/gen" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-generate=$work/profiles" \
  cargo build --profile dist "${packages[@]}" --target-dir "$work/gen"

echo "== 2/3 training: mesh bench --rounds 1, mesh bench --cross-cluster --rounds 1 (output in target/pgo/training.txt)" >&2
{
  "$work/gen/dist/mesh" bench --rounds 1
  "$work/gen/dist/mesh" bench --cross-cluster --rounds 1
} >"$work/training.txt" 2>&1 || {
  echo "error: the training run failed; its output:" >&2
  tail -n 30 "$work/training.txt" >&2
  exit 1
}
"$profdata" merge -o "$work/merged.profdata" "$work/profiles"
echo "   profile: $(du -h "$work/merged.profdata" | cut -f1) from $(find "$work/profiles" -name '*.profraw' | wc -l) raw files" >&2

echo "== 3/3 optimised build: cargo build --profile dist (target/dist)" >&2
RUSTFLAGS="${RUSTFLAGS:-} -Cprofile-use=$work/merged.profdata" \
  cargo build --profile dist "${packages[@]}"
echo "built with PGO: target/dist/mesh, target/dist/mesh-proxy, target/dist/mesh-cni" >&2
