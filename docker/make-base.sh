#!/usr/bin/env bash
# Build a local Python 3.11 base image from Debian bookworm packages, for machines that
# reach no container registry: debootstrap from the mirror apt uses, then `docker import`.
# Usage: docker/make-base.sh [IMAGE]   (default hpo-base:bookworm; kept if it exists)
set -euo pipefail
image="${1:-hpo-base:bookworm}"
if docker image inspect "$image" >/dev/null 2>&1; then
    echo "$image exists; remove it (docker rmi $image) to build it again"
    exit 0
fi
mirror="$(grep -rhoE 'https?://[^ ]+/debian/?( |$)' /etc/apt/sources.list /etc/apt/sources.list.d/ 2>/dev/null \
          | head -n1 | tr -d ' ' || true)"
mirror="${mirror:-http://deb.debian.org/debian}"
rootfs="$(mktemp -d /tmp/hpo-base.XXXXXX)"
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$rootfs" "$mirror"
# The machine may reach package registries through a proxy with its own certificate
# authority: the image trusts what the host trusts.
if compgen -G "/usr/local/share/ca-certificates/*.crt" >/dev/null; then
    cp /usr/local/share/ca-certificates/*.crt "$rootfs/usr/local/share/ca-certificates/"
fi
chroot "$rootfs" update-ca-certificates >/dev/null
# pip, python and installed scripts on PATH, as in python:3.11-slim (Debian's own
# Python refuses system-wide pip installs).
chroot "$rootfs" python3 -m venv /opt/python
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/*
tar -C "$rootfs" -c . | docker import \
    --change 'ENV PATH=/opt/python/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
    --change 'ENV LANG=C.UTF-8' \
    --change 'ENV SSL_CERT_FILE=/etc/ssl/certs/ca-certificates.crt' \
    --change 'ENV PIP_CERT=/etc/ssl/certs/ca-certificates.crt' \
    --change 'CMD ["python3"]' - "$image"
echo "built $image"
