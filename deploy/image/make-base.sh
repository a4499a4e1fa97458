#!/bin/sh
# Builds the image's base locally: no image registry is reachable on our build machines,
# so mmdebstrap makes a Debian bookworm root filesystem from Debian's own packages and
# `podman import` turns it into an image. Skipped when the image already exists.
#   usage: deploy/image/make-base.sh [IMAGE]   (default localhost/digit-service-base:bookworm)
set -eu
image=${1:-localhost/digit-service-base:bookworm}

if podman image exists "$image"; then
    echo "==> base image $image exists"
    exit 0
fi
for tool in mmdebstrap podman buildah; do
    command -v "$tool" >/dev/null && continue
    echo "==> installing $tool (apt)"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$tool" >/dev/null
done

rootfs=$(mktemp -d)/rootfs.tar
trap 'rm -rf "$(dirname "$rootfs")"' EXIT
echo "==> mmdebstrap: Debian bookworm with Python 3.11 -> $image"
# minbase: only Essential + apt; then what a Python service image needs, no recommends (the
# images' venvs bring their own pip, from python3-venv's wheels); apt lists, docs, man pages
# and message catalogues are left out to keep the base small.
# shellcheck disable=SC2016  # the hook expands $1 (the root filesystem), not this shell
mmdebstrap --variant=minbase --aptopt='APT::Install-Recommends "false"' \
    --include=python3,python3-venv,ca-certificates \
    --dpkgopt='path-exclude=/usr/share/man/*' --dpkgopt='path-exclude=/usr/share/doc/*' \
    --dpkgopt='path-exclude=/usr/share/locale/*' \
    --dpkgopt='path-include=/usr/share/doc/*/copyright' \
    --customize-hook='rm -rf "$1"/var/lib/apt/lists/* "$1"/var/cache/apt/*' \
    bookworm "$rootfs" http://deb.debian.org/debian
podman import --change 'CMD ["/bin/bash"]' --change 'ENV LANG=C.UTF-8' "$rootfs" "$image"
podman image ls "$image"
