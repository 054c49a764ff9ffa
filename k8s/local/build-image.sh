#!/usr/bin/env bash
# The rethink image for a CPU machine without a registry: a Debian 13 base carrying Debian's CPU builds of
# torch and torchvision, made with debootstrap (nothing is pulled), then the repository's Dockerfile on it.
# Idempotent: a base that exists is reused, and the engine's layer cache makes an unchanged image a no-op.
#
#   k8s/local/build-image.sh                     # -> localhost/rethink:cpu on localhost/rethink-cpu-base:trixie
#                                                #    (podman, as root; podman names local images localhost/...)
#   IMAGE=localhost/rethink:dev k8s/local/build-image.sh   # for kind: pass --image localhost/rethink:dev to submit
#   BASE_IMAGE=mirror.example/pytorch:TAG k8s/local/build-image.sh   # any base with torch: no debootstrap
#   REBUILD_BASE=1 k8s/local/build-image.sh      # make the base again (e.g. for newer Debian packages)
#   DEBIAN_MIRROR=URL k8s/local/build-image.sh   # debootstrap from a mirror of your own
#
# Needs podman, runc and debootstrap (apt-get install podman runc debootstrap) and root for debootstrap.
# The base trusts the CAs in this machine's /usr/local/share/ca-certificates, as pip on this machine does.
# Docker users: docs/cluster.md has the same steps as docker commands.
set -euo pipefail
cd "$(dirname "$0")/../.."

LOCAL_BASE=localhost/rethink-cpu-base:trixie
BASE_IMAGE=${BASE_IMAGE:-$LOCAL_BASE}
IMAGE=${IMAGE:-localhost/rethink:cpu}
SUITE=${DEBIAN_SUITE:-trixie}  # Debian 13: python3-torch 2.6 and python3-torchvision 0.21, CPU builds
MIRROR=${DEBIAN_MIRROR:-}  # empty: debootstrap's default Debian mirror
# runc, not crun (crun refuses some cgroup layouts), and explicit limits (the defaults can exceed a sandbox's).
ENGINE=(podman --runtime runc)
LIMITS=(--ulimit nproc=32768:32768 --ulimit nofile=20000:20000)

seconds() { date +%s.%N; }
took() { awk -v a="$1" -v b="$(seconds)" 'BEGIN { printf "%.0f s", b - a }'; }

make_base() {
    command -v debootstrap >/dev/null || { echo "build-image: debootstrap is missing (apt-get install debootstrap)" >&2; exit 1; }
    [ "$(id -u)" = 0 ] || { echo "build-image: making the base needs root (debootstrap); or pass BASE_IMAGE=..." >&2; exit 1; }
    local root old
    old=$("${ENGINE[@]}" image inspect --format '{{.Id}}' "$LOCAL_BASE" 2>/dev/null || true)
    root=$(mktemp -d "${TMPDIR:-/var/tmp}/rethink-base.XXXXXX")
    # shellcheck disable=SC2064  # expand now: the trap must remove this very directory
    trap "rm -rf '$root'" EXIT
    echo "build-image: making $LOCAL_BASE with debootstrap (Debian $SUITE${MIRROR:+ from $MIRROR})"
    debootstrap --variant=minbase "$SUITE" "$root" ${MIRROR:+"$MIRROR"} >"$root.log" 2>&1 \
        || { tail -n 30 "$root.log" >&2; echo "build-image: debootstrap failed (log: $root.log)" >&2; exit 1; }
    cp /etc/resolv.conf "$root/etc/resolv.conf"
    # Debian's own resolver, not debootstrap's --include (which ignores alternatives and virtual packages).
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get -q -o Dpkg::Use-Pty=0 update >>"$root.log" 2>&1
    chroot "$root" env DEBIAN_FRONTEND=noninteractive apt-get -q -y -o Dpkg::Use-Pty=0 install \
        --no-install-recommends python3 python3-pip python3-torch python3-torchvision ca-certificates \
        >>"$root.log" 2>&1 || { tail -n 30 "$root.log" >&2; exit 1; }
    # The local CAs this machine trusts (e.g. a TLS-intercepting proxy's): pip in the build reaches PyPI with them.
    if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
        cp /usr/local/share/ca-certificates/*.crt "$root/usr/local/share/ca-certificates/"
        chroot "$root" update-ca-certificates >>"$root.log" 2>&1
    fi
    # Python packages live in a venv over Debian's: pip installs the lock's versions there, shadowing Debian's
    # copies (which it cannot uninstall), while torch and torchvision come from Debian's site-packages.
    chroot "$root" python3 -m venv --system-site-packages --without-pip /opt/venv
    chroot "$root" apt-get clean
    rm -rf "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* "$root"/var/log/* "$root"/tmp/* "$root/root"/.cache
    : >"$root/etc/resolv.conf"  # the engine provides one in every container
    tar -C "$root" --numeric-owner -c . | "${ENGINE[@]}" import --quiet --change 'CMD ["python3"]' \
        --change "ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin" \
        - "$LOCAL_BASE" >/dev/null
    rm -rf "$root" "$root.log"
    trap - EXIT
    # The base this replaces, unless an image still builds on it.
    if [ -n "$old" ] && [ "$old" != "$("${ENGINE[@]}" image inspect --format '{{.Id}}' "$LOCAL_BASE")" ]; then
        "${ENGINE[@]}" rmi "$old" >/dev/null 2>&1 || true
    fi
}

start=$(seconds)
if [ "$BASE_IMAGE" = "$LOCAL_BASE" ]; then
    if [ -n "${REBUILD_BASE:-}" ] || ! "${ENGINE[@]}" image exists "$LOCAL_BASE"; then
        make_base
        echo "build-image: base $LOCAL_BASE made in $(took "$start")"
    else
        echo "build-image: reusing base $LOCAL_BASE (REBUILD_BASE=1 makes it again)"
    fi
fi

# Host networking for the build: pip reaches PyPI the way this machine does (no bridge or NAT needed).
start=$(seconds)
log=$(mktemp "${TMPDIR:-/var/tmp}/rethink-image.XXXXXX.log")
if ! "${ENGINE[@]}" build "${LIMITS[@]}" --network host --build-arg "BASE_IMAGE=$BASE_IMAGE" -t "$IMAGE" \
        -f Dockerfile . >"$log" 2>&1; then
    tail -n 40 "$log" >&2
    echo "build-image: building $IMAGE failed (log: $log)" >&2
    exit 1
fi
rm -f "$log"
size=$("${ENGINE[@]}" image inspect --format '{{.Size}}' "$IMAGE")
echo "build-image: $IMAGE built in $(took "$start") on $BASE_IMAGE; size $(awk -v s="$size" 'BEGIN { printf "%.2f GB", s / 1e9 }')"
