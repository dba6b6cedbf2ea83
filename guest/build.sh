#!/usr/bin/env bash
# guest/build.sh [OUTDIR] — build ARS's test guest into OUTDIR (default
# build/guest): OUTDIR/vmlinuz (Debian's current 6.1 kernel) and
# OUTDIR/initramfs.gz (busybox, the virtio modules, the workload, /init).
#
# Nothing is installed on the host: the kernel and busybox-static packages
# are fetched with `apt-get download` into OUTDIR/cache and unpacked there.
# Runs again only when an input (this script, init.sh, the workload sources)
# is newer than the outputs; ARS_GUEST_FORCE=1 rebuilds anyway.
# ARS_GUEST_KERNEL_PKG=linux-image-6.1.0-NN-amd64 pins the kernel package.
set -euo pipefail

here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
repo=$(dirname "$here")
out=${1:-$repo/build/guest}
mkdir -p "$out"
out=$(cd "$out" && pwd)

log() { echo "guest: $*"; }
die() {
	echo "guest: error: $*" >&2
	exit 1
}

# Modules the guest loads; their dependencies are added and ordered from
# the modules' own metadata (modinfo), so a new kernel ABI cannot break it.
wanted=(virtio_ring virtio virtio_pci_legacy_dev virtio_pci_modern_dev virtio_pci
	virtio_balloon virtio_blk failover net_failover virtio_net virtio_console)

# --- up to date? -----------------------------------------------------------
inputs=("$here/build.sh" "$here/init.sh" "$repo/go.mod")
while IFS= read -r -d '' f; do inputs+=("$f"); done < <(find "$here/workload" -name '*.go' ! -name '*_test.go' -print0)
if [[ -z ${ARS_GUEST_FORCE:-} && -s $out/vmlinuz && -s $out/initramfs.gz ]]; then
	newer=$(find "${inputs[@]}" -newer "$out/initramfs.gz" -print -quit)
	if [[ -z $newer ]]; then
		log "up to date: $out/vmlinuz $out/initramfs.gz (ARS_GUEST_FORCE=1 rebuilds)"
		exit 0
	fi
	log "rebuilding: $newer changed"
fi

for tool in apt-get apt-cache dpkg-deb tar cpio gzip go; do
	command -v "$tool" >/dev/null || die "$tool not found (make deps installs the guest build tools)"
done

# --- packages --------------------------------------------------------------
kpkg=${ARS_GUEST_KERNEL_PKG:-}
current_kernel_pkg() {
	apt-cache depends linux-image-amd64 2>/dev/null |
		awk '$1 == "Depends:" && $2 ~ /^linux-image-[0-9]/ { print $2; exit }'
}
if [[ -z $kpkg ]]; then
	kpkg=$(current_kernel_pkg || true)
	if [[ -z $kpkg ]]; then
		log "apt-cache does not know linux-image-amd64; running apt-get update"
		apt-get update -q || die "apt-get update failed"
		kpkg=$(current_kernel_pkg || true)
	fi
	[[ -n $kpkg ]] || die "cannot find the kernel package behind linux-image-amd64"
fi
kver=${kpkg#linux-image-}
log "kernel package $kpkg"

cache=$out/cache
mkdir -p "$cache"
apt_opts=(-q)
[[ $(id -u) == 0 ]] && apt_opts+=(-o APT::Sandbox::User=root)
find_deb() {
	local f
	for f in "$cache/$1"_*.deb; do
		[[ -s $f ]] && { echo "$f"; return 0; }
	done
	return 1
}
fetch() {
	local deb
	if deb=$(find_deb "$1"); then
		log "cached $(basename "$deb")" >&2
	else
		log "downloading $1 (apt-get download)" >&2
		(cd "$cache" && apt-get download "${apt_opts[@]}" "$1" >&2) || die "apt-get download $1 failed"
		deb=$(find_deb "$1") || die "apt-get download $1 left no .deb in $cache"
	fi
	echo "$deb"
}
kdeb=$(fetch "$kpkg")
bdeb=$(fetch busybox-static)

# --- unpack what the guest needs -------------------------------------------
kroot=$cache/$kpkg
bbroot=$cache/busybox-static
if [[ ! -x $bbroot/bin/busybox || $bdeb -nt $bbroot/bin/busybox ]]; then
	log "unpacking $(basename "$bdeb")"
	rm -rf "$bbroot" && mkdir -p "$bbroot"
	dpkg-deb -x "$bdeb" "$bbroot"
fi
[[ -x $bbroot/bin/busybox ]] || die "no bin/busybox in $bdeb"

# The kernel package is large; unpack only vmlinuz and the modules used.
mkdir -p "$kroot"
if [[ ! -s $kroot/contents || $kdeb -nt $kroot/contents ]]; then
	log "listing $(basename "$kdeb")"
	dpkg-deb --fsys-tarfile "$kdeb" | tar -t >"$kroot/contents.tmp"
	mv "$kroot/contents.tmp" "$kroot/contents"
fi
declare -A modpath=()
while IFS= read -r p; do
	b=${p##*/}
	n=${b%%.ko*}
	modpath[${n//-/_}]=$p
done < <(grep -E "^\./lib/modules/$kver/.*\.ko(\.xz|\.zst|\.gz)?$" "$kroot/contents")
vmlinuz_member=$(grep -E "^\./boot/vmlinuz-$kver\$" "$kroot/contents" | head -1)
[[ -n $vmlinuz_member ]] || die "no boot/vmlinuz-$kver in $kdeb"

extract() { # members...
	local missing=() m
	for m in "$@"; do [[ -e $kroot/$m ]] || missing+=("$m"); done
	((${#missing[@]})) || return 0
	log "unpacking ${#missing[@]} file(s) from $(basename "$kdeb")"
	dpkg-deb --fsys-tarfile "$kdeb" | tar -x -C "$kroot" "${missing[@]}"
}

# Resolve dependencies breadth-first, unpacking each layer in one pass.
declare -A deps=()
todo=("${wanted[@]}")
while ((${#todo[@]})); do
	members=()
	for n in "${todo[@]}"; do
		[[ -n ${modpath[$n]:-} ]] || die "module $n not found in $kpkg"
		members+=("${modpath[$n]}")
	done
	extract "${members[@]}"
	next=()
	for n in "${todo[@]}"; do
		[[ -n ${deps[$n]+x} ]] && continue
		if command -v modinfo >/dev/null; then
			d=$(modinfo -F depends "$kroot/${modpath[$n]}") || die "modinfo $n failed"
		else
			d="" # without kmod, trust the order of $wanted
		fi
		d=${d//,/ }
		deps[$n]=${d//-/_}
		for x in ${deps[$n]}; do [[ -n ${deps[$x]+x} ]] || next+=("$x"); done
	done
	todo=("${next[@]}")
done
order=()
declare -A placed=()
place() {
	local n=$1 d
	[[ -n ${placed[$n]:-} ]] && return
	placed[$n]=1
	for d in ${deps[$n]}; do place "$d"; done
	order+=("$n")
}
for n in "${wanted[@]}"; do place "$n"; done
log "module load order: ${order[*]}"
extract "$vmlinuz_member"

# --- workload --------------------------------------------------------------
stage=$out/stage
rm -rf "$stage"
mkdir -p "$stage"/{bin,dev,proc,sys,run,tmp,etc,lib/modules}
log "building workload (CGO_ENABLED=0 go build)"
(cd "$repo" && CGO_ENABLED=0 GOOS=linux GOARCH=amd64 go build -trimpath -ldflags='-s -w' \
	-o "$stage/bin/ars-workload" ./guest/workload) || die "go build ./guest/workload failed"

# --- initramfs -------------------------------------------------------------
cp "$bbroot/bin/busybox" "$stage/bin/busybox"
ln -s busybox "$stage/bin/sh"
install -m 0755 "$here/init.sh" "$stage/init"
for n in "${order[@]}"; do
	src=$kroot/${modpath[$n]}
	case $src in
	*.ko) cp "$src" "$stage/lib/modules/$n.ko" ;;
	*.ko.xz) xz -dc "$src" >"$stage/lib/modules/$n.ko" ;;
	*.ko.zst) zstd -qdc "$src" >"$stage/lib/modules/$n.ko" ;;
	*.ko.gz) gzip -dc "$src" >"$stage/lib/modules/$n.ko" ;;
	esac
	echo "$n" >>"$stage/lib/modules/load-order"
done
# The kernel opens /dev/console for /init before devtmpfs is mounted.
if [[ $(id -u) == 0 ]]; then
	mknod -m 600 "$stage/dev/console" c 5 1
else
	log "not root: no /dev/console node in the initramfs (init reopens it from devtmpfs)"
fi
log "packing initramfs"
(cd "$stage" && find . -print0 | LC_ALL=C sort -z | cpio --null -o -H newc -R 0:0 --quiet) |
	gzip -9n >"$out/initramfs.gz.tmp"
cp "$kroot/$vmlinuz_member" "$out/vmlinuz.tmp"
mv "$out/vmlinuz.tmp" "$out/vmlinuz"
mv "$out/initramfs.gz.tmp" "$out/initramfs.gz"
echo "$kpkg" >"$out/kernel-package"
rm -rf "$stage"
log "done: $out/vmlinuz ($(du -h "$out/vmlinuz" | cut -f1)), $out/initramfs.gz ($(du -h "$out/initramfs.gz" | cut -f1))"
