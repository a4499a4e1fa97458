#!/bin/bash
# Makes a registry with the trainer image (by hand, as root; not in CI): runs it once as its
# non-root user with a data and a registry directory mounted, as the trainer Deployment does:
# `python -m model prepare-data` (skipped when DATA already holds MNIST), then `python -m model
# train` with TRAIN_ARGS (default: the full base training; e.g. "--epochs 1 --limit 6000" for a
# quick one), which publishes v0001 with its model.onnx. The serving images serve the result.
#   usage: deploy/image/trainer-registry.sh IMAGE DATA OUT_REGISTRY [TRAIN_ARGS]
set -euo pipefail
image=$1
data=$2
out=$3
train_args=${4:-}

if [ -e "$out" ]; then echo "$out exists: give a new directory"; exit 1; fi
work=$(mktemp -d)
container=""
cleanup() {
    [ -n "$container" ] && buildah rm "$container" >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

# One mount, as the pods' shared volume at /srv/digits (buildah 1.28's chroot isolation kept
# writes to a second -v mount inside the container: the host saw none of them).
mkdir -p "$work/shared/registry" "$work/shared/data"
if [ -d "$data" ]; then cp -a "$data/." "$work/shared/data/"; fi
chown -R 10001:10001 "$work/shared"
container=$(buildah from --pull=never "$image")
started=$(date +%s)
# shellcheck disable=SC2016  # $0: the inner shell's first argument (the training options)
buildah run --isolation chroot -v "$work/shared:/srv/digits" "$container" -- sh -c '
    set -e; cli="python -m model --data-dir /srv/digits/data --registry /srv/digits/registry"
    echo "uid $(id -u)"; $cli prepare-data; $cli train $0' "$train_args"
mv "$work/shared/registry" "$out"
echo "==> $image made $out in $(($(date +%s) - started)) s: $(cat "$out/ACTIVE")"
ls -l "$out/versions/$(cat "$out/ACTIVE")"
