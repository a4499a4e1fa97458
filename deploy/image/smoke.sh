#!/bin/bash
# Smoke test of the built image (by hand, not in CI): serve a copy of a registry from the
# image as its non-root user and wait for /ready to answer 200 on 127.0.0.1 (buildah's chroot
# isolation shares the host network). Stops everything it started, also on failure.
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

started=$(date +%s)
setsid buildah run --isolation chroot -v "$work/registry:/app/registry" \
    -e DIGITS_HOST=127.0.0.1 -e DIGITS_PORT="$port" "$container" -- python -m service \
    > "$work/server.log" 2>&1 &
server_pid=$!

echo "==> waiting for http://127.0.0.1:$port/ready (at most ${timeout_s}s)"
while :; do
    status=$(curl -s -o "$work/ready.json" -w '%{http_code}' "http://127.0.0.1:$port/ready" || true)
    [ "$status" = 200 ] && break
    if ! kill -0 "$server_pid" 2>/dev/null || [ $(($(date +%s) - started)) -ge "$timeout_s" ]; then
        echo "FAILED: /ready answered ${status:-nothing}; server log:"; tail -40 "$work/server.log"; exit 1
    fi
    sleep 2
done
echo "==> /ready 200 after $(($(date +%s) - started)) s: $(cat "$work/ready.json")"
echo "==> processes (user, rss KiB):"; ps -o user=,rss=,args= -g "$server_pid" | cut -c1-120
ps -o rss= -g "$server_pid" | awk '{s += $1} END {printf "==> resident memory of the server: %.0f MiB\n", s / 1024}'
curl -s -o /dev/null -w '==> /health %{http_code}\n' "http://127.0.0.1:$port/health"
