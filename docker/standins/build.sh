#!/usr/bin/env bash
# Builds local stand-ins for the images docker-compose.yml pulls from Docker Hub, for hosts that cannot
# reach it (the compose smoke run: bench/compose-smoke.sh). Needs root, debootstrap, a Debian mirror and
# a running Docker engine; no registry. Images that exist already are kept (--rebuild to redo them).
#
#   tuneserve-standin/debian:bookworm          debootstrap --variant=minbase, `docker import`ed
#   tuneserve-standin/python:3.11-slim-bookworm   for Dockerfile.gpu's BASE_IMAGE
#   tuneserve-standin/postgres:15-bookworm     POSTGRES_IMAGE (Debian has 15; the real default is 16)
#   tuneserve-standin/redis:7-bookworm         REDIS_IMAGE
set -euo pipefail
cd "$(dirname "$0")"
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
REBUILD=0; [ "${1:-}" = --rebuild ] && REBUILD=1
have() { [ "$REBUILD" = 0 ] && docker image inspect "$1" >/dev/null 2>&1; }
NICE=(nice -n 19)

if ! have tuneserve-standin/debian:bookworm; then
    work=$(mktemp -d /var/tmp/tuneserve-debootstrap.XXXXXX)
    trap 'rm -rf "$work"' EXIT
    "${NICE[@]}" debootstrap --variant=minbase --include=ca-certificates bookworm "$work/rootfs" "$MIRROR" >"$work/log" \
        || { tail -20 "$work/log"; exit 1; }
    rm -rf "$work/rootfs/var/cache/apt/archives/"*.deb "$work/rootfs/var/lib/apt/lists/"*
    echo "deb $MIRROR bookworm main" >"$work/rootfs/etc/apt/sources.list"
    tar -C "$work/rootfs" -c . | docker import \
        -c 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' -c 'CMD ["bash"]' \
        - tuneserve-standin/debian:bookworm >/dev/null
    echo "built tuneserve-standin/debian:bookworm"
fi

build() {  # tag dir
    have "$1" && return 0
    "${NICE[@]}" docker build --network host -q -t "$1" "$2" >/dev/null
    echo "built $1"
}

rm -rf python/ca && mkdir python/ca
cp /usr/local/share/ca-certificates/*.crt python/ca/ 2>/dev/null || true
build tuneserve-standin/python:3.11-slim-bookworm python
rm -rf python/ca
build tuneserve-standin/postgres:15-bookworm postgres
build tuneserve-standin/redis:7-bookworm redis
