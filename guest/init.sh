#!/bin/busybox sh
# /init of the ARS test guest (guest/build.sh packs this file as /init).
# PID 1 must never exit: every step tolerates failure and says so on the
# serial console, and the script ends in an endless wait.
/bin/busybox mkdir -p /proc /sys /dev /run /tmp
/bin/busybox mount -t proc proc /proc
/bin/busybox mount -t sysfs sysfs /sys
/bin/busybox mount -t devtmpfs devtmpfs /dev || echo "ars-guest: devtmpfs mount failed"
[ -c /dev/console ] && exec 0</dev/console 1>/dev/console 2>&1
/bin/busybox --install -s /bin
export PATH=/bin

mount -t tmpfs -o mode=0755 tmpfs /run
mount -t tmpfs tmpfs /tmp
# cgroup v2 with every controller the guest kernel has, for tests of
# cgroup v2 behaviour inside the guest.
mount -t cgroup2 cgroup2 /sys/fs/cgroup || echo "ars-guest: cgroup2 mount failed"

echo "ars-guest: loading modules"
while read -r m; do
	insmod "/lib/modules/$m.ko" || echo "ars-guest: insmod $m failed"
done </lib/modules/load-order

ip link set lo up
# virtio-net probes while insmod runs; wait briefly in case eth0 lags.
net=0
for d in /sys/bus/virtio/devices/*; do
	[ "$(cat "$d/device" 2>/dev/null)" = 0x0001 ] && net=1
done
if [ "$net" = 1 ]; then
	i=0
	while [ ! -e /sys/class/net/eth0 ] && [ "$i" -lt 20 ]; do sleep 0.1; i=$((i + 1)); done
fi
if [ -e /sys/class/net/eth0 ]; then
	ip addr add 169.254.100.2/24 dev eth0 && ip link set eth0 up &&
		echo "ars-guest: eth0 169.254.100.2/24 up"
fi

# Online hot-added CPUs (there is no udev to do it).
(
	while :; do
		for f in /sys/devices/system/cpu/cpu[0-9]*/online; do
			[ -e "$f" ] || continue
			read -r v <"$f" && [ "$v" = 0 ] && echo 1 >"$f" &&
				echo "ars-guest: onlined ${f%/online}"
		done
		sleep 1
	done
) &

/bin/ars-workload &
i=0
while [ ! -e /run/ars-workload.ready ] && [ "$i" -lt 150 ]; do sleep 0.1; i=$((i + 1)); done
[ -e /run/ars-workload.ready ] || echo "ars-guest: workload not ready after 15s"
echo "ARS-GUEST-READY"

# Reap orphans forever.
while :; do
	wait
	sleep 3600
done
