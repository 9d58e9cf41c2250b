#!/bin/sh
# PID 1 of a sandbox whose / is writable: an overlay of the host root with a
# tmpfs upper layer, so that dpkg, useradd and installers write only into
# that layer and everything they wrote vanishes with the sandbox.
#
# Started by the tests exactly like ns-init.sh (see tests/harness.py):
#   unshare --pid --fork --kill-child --mount --uts --ipc --cgroup \
#           --propagation private --mount-proc \
#     env SBX_DIR=<shared host dir> SBX_HOST_MNTNS=<host mount ns link> \
#     sh ns-init-overlay.sh systemd
#
# Stage 1 (argument "systemd") builds the overlay root and moves into it
# with pivot_root. It then runs ns-init.sh unchanged, so every isolation
# step of the normal sandbox still applies, with stage 2 (argument "boot")
# as the command that ns-init.sh runs in place of systemd. Stage 2 undoes
# only the two read-only remounts that ns-init.sh makes for / and the vendor
# unit dir, because in this sandbox both are copy-on-write, and then execs
# systemd.
set -eu

S=${SBX_DIR:?SBX_DIR is not set}
HERE=$(cd "$(dirname "$0")" && pwd)
[ "$$" = 1 ] || {
  echo "ns-init-overlay: not PID 1 of a new pid namespace, not starting" >&2
  exit 1
}
[ "$(readlink /proc/self/ns/mnt)" != "${SBX_HOST_MNTNS:-none}" ] || {
  echo "ns-init-overlay: still in the host mount namespace, not starting" >&2
  exit 1
}

boot_systemd() {
  # Both mounts are overlays or tmpfs in this namespace only, so making
  # them writable again cannot reach the host.
  mount -o remount,bind,rw /
  mount -o remount,bind,rw /usr/lib/systemd/system
  exec env -i container=other \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    /lib/systemd/systemd --system --unit=sandbox.target \
    --log-target=journal-or-kmsg --show-status=0
}

if [ "${1:-systemd}" = boot ]; then
  boot_systemd
fi

# Nothing mounted from here on may propagate to the host. "-n" (no utab
# update) until the private /run exists, as in ns-init.sh.
mount -n --make-rprivate /

# === Overlay root: host / below, a tmpfs above ===
# The tmpfs sits on /run of this namespace only. lowerdir=/ covers the
# root file system alone, not the file systems mounted below it.
mount -n -t tmpfs -o mode=0755,nosuid,nodev,size=1g sbx-root-rw /run
mkdir -p /run/root-upper /run/root-work /run/root
mount -n -t overlay \
  -o lowerdir=/,upperdir=/run/root-upper,workdir=/run/root-work \
  sbx-root /run/root
R=/run/root

# === What ns-init.sh expects below the new root ===
# /proc of this pid namespace; /sys with its cgroup mounts, because
# ns-init.sh replaces /sys/fs/cgroup; /dev until ns-init.sh replaces it.
mount -n -t proc -o nosuid,nodev,noexec proc "$R/proc"
mount -n --rbind /sys "$R/sys"
mount -n --rbind /dev "$R/dev"
# The shared dir must be the host's own dir, not a copy-on-write view.
mkdir -p "$R$S"
mount -n --bind "$S" "$R$S"
# These scripts, read-only, in case they live on another file system.
mkdir -p "$R$HERE"
mount -n --bind "$HERE" "$R$HERE"
mount -n -o remount,bind,ro "$R$HERE"

# === Switch roots and drop every host mount ===
mkdir -p "$R/.sbx-old-root"
cd "$R"
pivot_root . .sbx-old-root
cd /
umount -n -l /.sbx-old-root
rmdir /.sbx-old-root

exec /bin/sh "$HERE/ns-init.sh" shell /bin/sh "$HERE/ns-init-overlay.sh" boot
