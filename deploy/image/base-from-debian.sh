#!/usr/bin/env bash
# Build a local base image (Debian bookworm + python3.11) with debootstrap and
# import it into buildah's store as $BASE_TAG, for machines that reach Debian's
# package archive but no container registry (docs/deploy.md, Build the image).
# Needs root, debootstrap and buildah. Re-running reuses an existing image.
set -euo pipefail
BASE_TAG=${BASE_TAG:-localhost/loyalty-base:bookworm-py311}
SUITE=${SUITE:-bookworm}
MIRROR=${MIRROR:-}   # empty: debootstrap's default for the suite
WORK=${WORK:-/var/tmp/loyalty-base}

if buildah inspect --type image "$BASE_TAG" >/dev/null 2>&1; then
    echo "base image $BASE_TAG exists"
    exit 0
fi
rootfs="$WORK/rootfs"
rm -rf "$rootfs"
mkdir -p "$rootfs"
# minbase: dpkg, apt and their essentials; python3.11-venv brings ensurepip
# (the Containerfile makes its virtualenv with it), ca-certificates for pip.
debootstrap --variant=minbase \
    --include=python3.11,python3.11-venv,python3-distutils,python3-pip-whl,python3-setuptools-whl,ca-certificates \
    "$SUITE" "$rootfs" ${MIRROR:+"$MIRROR"}
chroot "$rootfs" apt-get clean
rm -rf "$rootfs"/var/lib/apt/lists/* "$rootfs"/var/cache/apt/*.bin
tar -C "$rootfs" -c . -f "$WORK/rootfs.tar"
ctr=$(buildah from scratch)
buildah add "$ctr" "$WORK/rootfs.tar" /
buildah config --env PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    --env LANG=C.UTF-8 --cmd '["python3.11"]' "$ctr"
buildah commit --rm "$ctr" "$BASE_TAG"
rm -rf "$rootfs" "$WORK/rootfs.tar"
echo "base image $BASE_TAG built"
