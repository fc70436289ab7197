#!/usr/bin/env bash
# Builds a bootable guest image from Debian packages: the distro kernel (vmlinuz) and an
# initramfs whose /init is the static my_hypervisor-init, with the kernel modules a
# cloud-hypervisor guest needs (and their dependencies, from the package's modules.dep).
# Then prints the cloud-hypervisor command line that boots it. docs/guest-init.md.
#
# usage: guest-init/image/build-initramfs.sh [--out DIR] [--init FILE] [--busybox] [--list]
#   --out DIR    where vmlinuz and initramfs.cpio.gz go (default: target/guest-image)
#   --init FILE  the static guest-init to use as /init (default: a release build of it)
#   --busybox    add busybox-static as /bin/busybox and /bin/sh, for debugging
#   --list       list the archive's contents at the end
#   --check      list it and fail unless it holds /init and every module named in its
#                modules.dep (CI runs this)
# Environment: KERNEL_META (default linux-image-amd64; linux-image-cloud-amd64 works too),
# MODULES (default below). Needs apt-get and dpkg-deb (Debian); installs cpio if missing
# when run as root.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
repo=$(cd "$here/../.." && pwd)
out="$repo/target/guest-image"
init=""
busybox=0
list=0
while [ $# -gt 0 ]; do
    case "$1" in
        --out) out=$2; shift 2 ;;
        --init) init=$2; shift 2 ;;
        --busybox) busybox=1; shift ;;
        --list) list=1; shift ;;
        --check) list=2; shift ;;
        -h|--help) sed -n '2,18p' "$0"; exit 0 ;;
        *) echo "build-initramfs: unknown argument $1" >&2; exit 2 ;;
    esac
done
meta=${KERNEL_META:-linux-image-amd64}
modules=${MODULES:-virtio_pci vmw_vsock_virtio_transport virtio_blk virtio_net virtio_console button evdev}

die() { echo "build-initramfs: $*" >&2; exit 1; }
command -v apt-get >/dev/null && command -v dpkg-deb >/dev/null || die "needs apt-get and dpkg-deb (Debian)"
if ! command -v cpio >/dev/null; then
    [ "$(id -u)" = 0 ] || die "needs cpio (apt-get install cpio)"
    apt-get install -y -qq --no-install-recommends cpio >/dev/null 2>&1 ||
        { apt-get update -qq && apt-get install -y -qq --no-install-recommends cpio >/dev/null; }
fi

if [ -z "$init" ]; then
    (cd "$repo" && cargo build --release -p my_hypervisor-init)
    init="$repo/target/static-init/$(rustc -vV | sed -n 's/^host: //p')/release/my_hypervisor-init"
fi
[ -x "$init" ] || die "$init is not an executable"

mkdir -p "$out/cache"
cache=$(cd "$out/cache" && pwd)
# The metapackage depends on the real, versioned kernel package.
resolve() { apt-cache depends "$1" 2>/dev/null | awk '/Depends: linux-image-[0-9]/ {print $2; exit}'; }
pkg=$(resolve "$meta")
if [ -z "$pkg" ]; then
    apt-get update -qq
    pkg=$(resolve "$meta")
fi
[ -n "$pkg" ] || die "cannot resolve the kernel package behind $meta"
echo "build-initramfs: kernel package $pkg"
deb=$(ls "$cache/${pkg}_"*.deb 2>/dev/null | head -n1 || true)
if [ -z "$deb" ]; then
    (cd "$cache" && apt-get download -q "$pkg" 2>&1 | grep -v '^N: Download is performed unsandboxed' || true)
    deb=$(ls "$cache/${pkg}_"*.deb 2>/dev/null | head -n1 || true)
fi
[ -n "$deb" ] || die "apt-get download $pkg failed"

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
kroot="$work/kernel"
mkdir -p "$kroot"
# Debian's package ships modules.builtin but not modules.dep (its postinst runs depmod), so
# the dependencies come from each module's .modinfo "depends=" entry, read pass by pass
# over the package: only the kernel, the indexes and the needed modules are extracted.
dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kroot" --wildcards \
    './boot/vmlinuz-*' './lib/modules/*/modules.builtin' './usr/lib/modules/*/modules.builtin' 2>/dev/null || true
shopt -s nullglob
dirs=("$kroot"/lib/modules/* "$kroot"/usr/lib/modules/*)
shopt -u nullglob
moddir=${dirs[0]:-}
[ -n "$moddir" ] && [ -f "$moddir/modules.builtin" ] || die "no modules.builtin in $deb"
release=$(basename "$moddir")
prefix=${moddir#"$kroot"/}
listing=$(dpkg-deb --fsys-tarfile "$deb" | tar -t | sed -n "s|^\./$prefix/||p" | grep -E '\.ko(\.xz|\.zst)?$')

norm() { echo "${1//-/_}"; }
# The module's path in the package (relative to its modules dir), by name.
path_of() { awk -v n="$1" '{ b = $0; sub(/.*\//, "", b); sub(/\.ko.*$/, "", b); gsub(/-/, "_", b) } b == n { print; exit }' <<<"$listing"; }
modinfo_depends() {
    case "$1" in
        *.xz) xz -dc "$1" ;;
        *.zst) zstd -qdc "$1" ;;
        *) cat "$1" ;;
    esac | tr '\0' '\n' | sed -n '/^depends=/{s/^depends=//;s/,/ /g;p;q}'
}
declare -A path depends
todo=""
for m in $modules; do todo="$todo $(norm "$m")"; done
while [ -n "${todo// /}" ]; do
    batch=""
    for m in $todo; do
        [ -z "${path[$m]+x}" ] || continue
        p=$(path_of "$m")
        if [ -z "$p" ]; then
            grep -Eq "/${m//_/[-_]}\.ko" "$moddir/modules.builtin" || die "module $m is neither a module nor built in"
            echo "build-initramfs: $m is built into the kernel"
            path[$m]=""
            continue
        fi
        path[$m]=$p
        batch="$batch $m"
    done
    [ -n "$batch" ] || break
    dpkg-deb --fsys-tarfile "$deb" | tar -x -C "$kroot" $(for m in $batch; do echo "./$prefix/${path[$m]}"; done)
    todo=""
    for m in $batch; do
        depends[$m]=$(for d in $(modinfo_depends "$moddir/${path[$m]}"); do norm "$d"; done | tr '\n' ' ')
        todo="$todo ${depends[$m]}"
    done
done

# Each module's dependencies, deepest first (depth-first post-order).
closure() {
    local m=$1 d
    for d in ${depends[$m]:-}; do
        [ -n "${path[$d]:-}" ] || continue
        case " $seen " in *" $d "*) continue ;; esac
        seen="$seen $d"
        closure "$d"
        order="$order $d"
    done
}
strip() { local f=${1%.xz}; echo "${f%.zst}"; }
needed=""
depfile="$work/modules.dep"
: >"$depfile"
for m in "${!path[@]}"; do
    [ -n "${path[$m]}" ] || continue
    needed="$needed ${path[$m]}"
    seen="" order=""
    closure "$m"
    # modules.dep order: the last entry loads first.
    line="$(strip "${path[$m]}"):"
    rev=""
    for d in $order; do rev="$(strip "${path[$d]}") $rev"; done
    echo "$line ${rev% }" | sed 's/ $//' >>"$depfile"
done
LC_ALL=C sort -o "$depfile" "$depfile"

root="$work/root"
mkdir -p "$root"/{proc,sys,dev,run,tmp,etc,bin,sbin,root,"$prefix"}
install -m 0755 "$init" "$root/init"
for f in $needed; do
    src="$moddir/$f"
    dst="$root/$prefix/${f%.xz}"
    dst="${dst%.zst}"
    mkdir -p "$(dirname "$dst")"
    case "$f" in
        *.xz) xz -dc "$src" >"$dst" ;;
        *.zst) zstd -qdc "$src" >"$dst" ;;
        *) cp "$src" "$dst" ;;
    esac
done
# The index names the modules as they are in the image: decompressed.
cp "$depfile" "$root/$prefix/modules.dep"
cp "$moddir/modules.builtin" "$root/$prefix/"
cat >"$root/etc/my_hypervisor-init.conf" <<CONF
# Read by /init; myhv.* words on the kernel command line override these.
modules = $(echo $modules | tr ' ' ',')
CONF
if [ "$busybox" = 1 ]; then
    (cd "$cache" && ls busybox-static_*.deb >/dev/null 2>&1 || apt-get download -q busybox-static 2>&1 | grep -v '^N: ' || true)
    dpkg-deb --fsys-tarfile "$(ls "$cache"/busybox-static_*.deb | head -n1)" | tar -x -C "$work" ./bin/busybox
    install -m 0755 "$work/bin/busybox" "$root/bin/busybox"
    ln -sf busybox "$root/bin/sh"
fi

cp "$kroot/boot/vmlinuz-$release" "$out/vmlinuz"
(cd "$root" && find . -mindepth 1 | LC_ALL=C sort | cpio -o -H newc --owner=0:0 --quiet) | gzip -9 >"$out/initramfs.cpio.gz"
echo "build-initramfs: $out/vmlinuz ($release) and $out/initramfs.cpio.gz, with $(echo $needed | wc -w) modules"
if [ "$list" != 0 ]; then
    gzip -dc "$out/initramfs.cpio.gz" | cpio -t --quiet >"$work/list"
    cat "$work/list"
fi
if [ "$list" = 2 ]; then
    grep -qx init "$work/list" || die "the archive has no /init"
    for f in $(tr -d ':' <"$depfile"); do
        grep -qx "$prefix/$f" "$work/list" || die "the archive lacks $prefix/$f"
    done
    for m in $modules; do
        m=$(norm "$m")
        [ -z "${path[$m]}" ] || grep -q "/$(strip "${path[$m]}")\$" "$work/list" || die "the archive lacks module $m"
    done
    echo "build-initramfs: check passed: /init and $(echo $needed | wc -w) modules with their dependencies"
fi
cat <<CMD
Boot it (the vsock socket is the host side of guest-init's exec service, port 1024):
cloud-hypervisor --kernel $out/vmlinuz --initramfs $out/initramfs.cpio.gz \\
    --cmdline "console=hvc0 myhv.port=1024 myhv.hostname=guest" \\
    --cpus boot=1 --memory size=512M --console tty --serial off \\
    --vsock cid=3,socket=/tmp/my_hypervisor-guest.vsock
CMD
