#!/bin/bash
# Smoke test of a built serving image (by hand, not in CI): serve a copy of a registry from the
# image as its non-root user and time container start -> /ready 200 on 127.0.0.1 (buildah's
# chroot isolation shares the host network), polling every 0.2 s. Stops everything it started,
# also on failure.
#   usage: deploy/image/smoke.sh IMAGE REGISTRY [TIMEOUT_S]
set -euo pipefail
image=$1
source_registry=$2
timeout_s=${3:-300}

work=$(mktemp -d)
container=""
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill -TERM -- "-$server_pid" 2>/dev/null || true
        i=0; while kill -0 -- "-$server_pid" 2>/dev/null && [ $i -lt 30 ]; do sleep 1; i=$((i + 1)); done
        kill -KILL -- "-$server_pid" 2>/dev/null || true
    fi
    [ -n "$container" ] && buildah rm "$container" >/dev/null
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

cp -a "$source_registry" "$work/registry"
chown -R 10001:10001 "$work/registry"
port=$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')
container=$(buildah from --pull=never "$image")
echo "==> $image runs as uid $(buildah run --isolation chroot "$container" -- id -u)"

echo "==> $image: $(buildah images --format '{{.Size}}' "$image" | head -1)"
started=$(date +%s%N)
setsid buildah run --isolation chroot -v "$work/registry:/app/registry" \
    -e DIGITS_HOST=127.0.0.1 -e DIGITS_PORT="$port" "$container" -- python -m service \
    > "$work/server.log" 2>&1 &
server_pid=$!

echo "==> waiting for http://127.0.0.1:$port/ready (at most ${timeout_s}s)"
while :; do
    status=$(curl -s -o "$work/ready.json" -w '%{http_code}' "http://127.0.0.1:$port/ready" || true)
    [ "$status" = 200 ] && break
    if ! kill -0 "$server_pid" 2>/dev/null || [ $((($(date +%s%N) - started) / 1000000000)) -ge "$timeout_s" ]; then
        echo "FAILED: /ready answered ${status:-nothing}; server log:"; tail -40 "$work/server.log"; exit 1
    fi
    sleep 0.2
done
elapsed_ms=$((($(date +%s%N) - started) / 1000000))
echo "==> container start -> /ready 200: $((elapsed_ms / 1000)).$(printf %03d $((elapsed_ms % 1000))) s: $(cat "$work/ready.json")"
echo "==> processes (user, rss KiB):"; ps -o user=,rss=,args= -g "$server_pid" | cut -c1-120
ps -o rss= -g "$server_pid" | awk '{s += $1} END {printf "==> resident memory of the server: %.0f MiB\n", s / 1024}'
curl -s -o /dev/null -w '==> /health %{http_code}\n' "http://127.0.0.1:$port/health"
curl -s -o /dev/null -w '==> /v2/health/ready %{http_code}\n' "http://127.0.0.1:$port/v2/health/ready"
if buildah run --isolation chroot "$container" -- python -c 'import torch' 2>/dev/null; then
    echo "==> the image has torch"
else
    echo "==> the image has no torch"
fi
