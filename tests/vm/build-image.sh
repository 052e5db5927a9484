#!/usr/bin/env bash
# Builds the Debian VM the VM-agent test boots under qemu:
#   tests/vm/build-image.sh OUT_DIR
# OUT_DIR gets root.img (ext4, labelled root, no partition table), vmlinuz
# and initrd.img. The image has systemd as PID 1, DHCP on its NIC,
# python3 (the test's app), iptables, a `billing` user for the app, and a unit that runs /payload/run.sh from a
# second disk labelled `payload`, which is how the test drives the guest
# (no ssh). The root password is empty: the guest only ever talks to the
# test. Building takes about a minute; the test caches the result.
set -euo pipefail
out="${1:?usage: build-image.sh OUT_DIR}"
for tool in mmdebstrap mkfs.ext4; do
  command -v "$tool" >/dev/null || { echo "error: $tool is required (apt-get install mmdebstrap e2fsprogs)" >&2; exit 1; }
done
mkdir -p "$out"
work="$(mktemp -d)"
trap 'rm -rf "$work"' EXIT
rootfs="$work/rootfs"

mmdebstrap --variant=minbase --quiet \
  --include=systemd,systemd-sysv,udev,iproute2,kmod,initramfs-tools,procps,python3,iptables,passwd,linux-image-cloud-amd64 \
  --customize-hook='chroot "$1" passwd -d root' \
  --customize-hook='chroot "$1" useradd --system --no-create-home --shell /usr/sbin/nologin billing' \
  --customize-hook='echo "LABEL=root / ext4 rw,relatime 0 1" > "$1/etc/fstab"' \
  --customize-hook='echo meshvm > "$1/etc/hostname"' \
  --customize-hook='mkdir -p "$1/etc/systemd/network" && printf "[Match]\nName=en*\n\n[Network]\nDHCP=ipv4\n" > "$1/etc/systemd/network/10-dhcp.network"' \
  --customize-hook='chroot "$1" systemctl enable systemd-networkd.service' \
  --customize-hook='printf "[Unit]\nDescription=Mesh test payload\nAfter=network-online.target\nWants=network-online.target\n\n[Service]\nType=oneshot\nExecStartPre=/bin/mkdir -p /payload\nExecStartPre=/bin/mount -o ro LABEL=payload /payload\nExecStart=/bin/sh /payload/run.sh\nStandardOutput=journal+console\nStandardError=journal+console\n\n[Install]\nWantedBy=multi-user.target\n" > "$1/etc/systemd/system/mesh-test-payload.service"' \
  --customize-hook='chroot "$1" systemctl enable mesh-test-payload.service systemd-networkd-wait-online.service' \
  --customize-hook='cp -L "$1/vmlinuz" "$1/initrd.img" "'"$work"'/"' \
  bookworm "$rootfs"

mkfs.ext4 -q -L root -d "$rootfs" "$work/root.img" 2G
mv "$work/root.img" "$work/vmlinuz" "$work/initrd.img" "$out/"
echo "$out"
