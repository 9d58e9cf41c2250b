#!/bin/sh
# PID 1 of the test sandbox: builds a private, host-safe view of the file
# system, then execs systemd (or, with "shell CMD...", runs CMD instead).
#
# Started by tests/harness.py as
#   unshare --pid --fork --kill-child --mount --uts --ipc --cgroup \
#           --propagation private --mount-proc \
#     env SBX_DIR=<shared host dir> SBX_HOST_MNTNS=<host mount ns link> \
#     sh ns-init.sh [systemd | shell CMD...]
#
# Each step below prevents a change to the host that a plain "systemd in a
# namespace" boot makes (seen with systemd 252 on Debian 12). Without them,
# tmpfiles empties /tmp, PID 1 raises sysctls and sets the hostname,
# journald creates /dev/log in the host devtmpfs, and host-enabled units and
# generators run.
set -eu

S=${SBX_DIR:?SBX_DIR is not set}
[ "$$" = 1 ] || {
  echo "ns-init: not PID 1 of a new pid namespace, not starting" >&2
  exit 1
}
[ "$(readlink /proc/self/ns/mnt)" != "${SBX_HOST_MNTNS:-none}" ] || {
  echo "ns-init: still in the host mount namespace, not starting" >&2
  exit 1
}

# Nothing mounted or unmounted from here on may propagate to the host.
# "-n" (no utab update) on the mounts made while /run is still the host's:
# without it libmount creates /run/mount on the host.
mount -n --make-rprivate /

# === Private /run, with the shared dir parked in it ===
# The shared dir is bind-mounted into /run first so that it stays reachable
# (and writable, as its own mount) while /tmp, /var and / are replaced or
# made read-only below.
mount -n -t tmpfs -o mode=0755,nosuid,nodev,size=512m sbx-run /run
mkdir -p /run/lock /run/sbx/shared /run/sbx/units /run/sbx/empty \
  /run/sbx/var-upper /run/sbx/var-work \
  /run/systemd/system /run/systemd/system.conf.d /run/systemd/journald.conf.d
mount --rbind "$S" /run/sbx/shared

# === Private /tmp, /var/tmp and a copy-on-write /var ===
# systemd-tmpfiles ("D /tmp" in tmp.conf) would otherwise empty the host /tmp.
mount -t tmpfs -o mode=1777,nosuid,nodev sbx-tmp /tmp
# Host /var stays readable; writes (StateDirectory=, DynamicUser= state) go to
# a tmpfs upper layer and vanish with the sandbox.
mount -t overlay \
  -o lowerdir=/var,upperdir=/run/sbx/var-upper,workdir=/run/sbx/var-work \
  sbx-var /var
mount -t tmpfs -o mode=1777,nosuid,nodev sbx-vartmp /var/tmp
# The host's persistent journal has the same machine id and boot id, so
# journalctl would mix host entries into the sandbox's output.
if [ -d /var/log/journal ]; then
  mount -t tmpfs -o mode=0755,nosuid,nodev sbx-journal /var/log/journal
fi
mkdir -p "$S"
mount --move /run/sbx/shared "$S"

# === Private /dev ===
# /dev is a devtmpfs shared by every mount namespace, so anything systemd or
# journald creates there (/dev/log, /dev/hugepages) would appear on the host.
mount -t tmpfs -o mode=0755,nosuid,size=4m sbx-dev /dev
for spec in null:1:3 zero:1:5 full:1:7 random:1:8 urandom:1:9 tty:5:0; do
  name=${spec%%:*}
  numbers=${spec#*:}
  mknod -m 0666 "/dev/$name" c "${numbers%%:*}" "${numbers#*:}"
done
mkdir -p /dev/pts /dev/shm /dev/mqueue
mount -t devpts -o newinstance,ptmxmode=0666,mode=0620 devpts /dev/pts
ln -s pts/ptmx /dev/ptmx
mount -t tmpfs -o mode=1777,nosuid,nodev sbx-shm /dev/shm
ln -s /proc/self/fd /dev/fd
ln -s /proc/self/fd/0 /dev/stdin
ln -s /proc/self/fd/1 /dev/stdout
ln -s /proc/self/fd/2 /dev/stderr
# systemd as PID 1 reopens /dev/console and uses it only when it is a TTY; a
# regular file is rejected. /dev/null makes it log to the journal instead.
touch /dev/console
mount --bind /dev/null /dev/console

# === cgroup2-only view rooted at this cgroup namespace ===
# Without it systemd creates init.scope and system.slice at the top of every
# host cgroup v1 hierarchy and moves processes between them.
umount -l /sys/fs/cgroup
mount -t cgroup2 -o nosuid,nodev,noexec cgroup2 /sys/fs/cgroup

# === Host-wide kernel settings read-only ===
# PID 1 raises fs.file-max, fs.nr_open and net.unix.max_dgram_qlen, which
# are global (or shared with the host network namespace).
mount -o remount,bind,ro,nosuid,nodev,noexec /sys
mount --bind /proc/sys /proc/sys
mount -o remount,bind,ro /proc/sys
if [ -e /proc/sysrq-trigger ]; then
  mount --bind /proc/sysrq-trigger /proc/sysrq-trigger
  mount -o remount,bind,ro /proc/sysrq-trigger
fi

# === Unit search path: shared units dir, an allow-list of vendor units ===
# Vendor .wants/ links pull in tmpfiles, sysctl, swap and binfmt units, and
# host-enabled units (docker, caddy, timers) live in /etc/systemd/system.
# Generators run at boot and at every daemon-reload, so they get an empty dir.
mkdir -p "$S/units"
mount --bind "$S/units" /etc/systemd/system
(
  cd /usr/lib/systemd/system
  cp -a ./*.target user.slice machine.slice \
    systemd-journald.service systemd-journald.socket \
    systemd-poweroff.service systemd-halt.service systemd-reboot.service \
    systemd-exit.service systemd-kexec.service /run/sbx/units/
)
mount --bind /run/sbx/units /usr/lib/systemd/system
mount -o remount,bind,ro /usr/lib/systemd/system
mount --bind /run/sbx/empty /usr/lib/systemd/system-generators
mount -o remount,bind,ro /usr/lib/systemd/system-generators
printf '%s\n' '[Manager]' ShowStatus=no LogColor=no \
  DefaultTimeoutStartSec=30s DefaultTimeoutStopSec=10s \
  > /run/systemd/system.conf.d/50-sandbox.conf
printf '%s\n' '[Journal]' Storage=volatile ReadKMsg=no ForwardToWall=no \
  ForwardToConsole=no \
  > /run/systemd/journald.conf.d/50-sandbox.conf
# multi-user.target is pulled in so that units enabled in $S/units start at
# boot, as on a host. Its vendor .wants directory was not copied above, so
# it starts nothing else.
printf '%s\n' '[Unit]' 'Description=Sandbox boot target' \
  'Wants=systemd-journald.service multi-user.target' AllowIsolate=yes \
  > /run/systemd/system/sandbox.target

# === Everything else read-only ===
# "remount,bind,ro" changes the flag of this namespace's mount only. A plain
# "remount,ro" would change the superblock and make the host root read-only.
mount -o remount,bind,ro /

if [ "${1:-systemd}" = systemd ]; then
  exec env -i container=other \
    PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    LANG=C.UTF-8 \
    /lib/systemd/systemd --system --unit=sandbox.target \
    --log-target=journal-or-kmsg --show-status=0
fi
shift
exec "$@"
