#!/bin/bash
# Smoke test of a built serving image (by hand, not in CI): serve a copy of a registry from the
# image as its non-root user and time container start -> /ready 200 on 127.0.0.1 (buildah's
# chroot isolation shares the host network; wait-ready.sh). Stops everything it started,
# also on failure.
#   usage: deploy/image/smoke.sh IMAGE REGISTRY [TIMEOUT_S]
set -euo pipefail
# shellcheck source=deploy/image/wait-ready.sh
. "$(dirname "$0")/wait-ready.sh"
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

wait_ready "http://127.0.0.1:$port" "$server_pid" "$started" "$timeout_s" "$work/server.log" "$work/ready.json"
echo "==> container start -> /ready 200: $((READY_MS / 1000)).$(printf %03d $((READY_MS % 1000))) s"
# The server's own processes (uid 10001, not buildah's): what a pod's memory request covers.
server_rss() { ps -o uid=,rss=,args= -g "$server_pid" | awk '$1 == 10001 && $3 !~ /buildah/ {s += $2} END {print s}'; }
# CPU time the server's processes used until then (less sensitive than the wall time to other load)
server_cpu_ms() {
    ps -o uid=,pid=,args= -g "$server_pid" | awk '$1 == 10001 && $3 !~ /buildah/ {print $2}' | while read -r pid; do
        awk '{print $14 + $15 + $16 + $17}' "/proc/$pid/stat" 2>/dev/null || echo 0
    done | awk -v tick="$(getconf CLK_TCK)" '{s += $1} END {print int(s * 1000 / tick)}'
}
echo "==> CPU time of the server until /ready 200: $(server_cpu_ms) ms"
echo "==> processes (uid, rss KiB):"; ps -o uid=,rss=,args= -g "$server_pid" | cut -c1-120
echo "==> resident memory of the server after warm-up: $(($(server_rss) / 1024)) MiB"
# a short load, LOAD_S (10) s: hey, 8 clients of V2 infer (a batch of 16 images a request) and 1
# client of /predict with a 1,500 x 1,500 PNG (the API servers' decoder processes); the server's
# RSS sampled every 0.5 s
python3 -c 'import json, random; print(json.dumps({"inputs": [{"name": "pixels", "shape": [16, 28, 28],
    "datatype": "UINT8", "data": [random.randrange(256) for _ in range(16 * 784)]}]}))' > "$work/infer.json"
python3 -c '
import base64, json, struct, zlib
side = 1500  # black, with a white vertical stroke: a "1"
row = lambda y: bytes(255 if 650 <= x < 850 else 0 for x in range(side)) if 300 <= y < 1200 else bytes(side)
raw = b"".join(b"\0" + row(y) for y in range(side))
chunk = lambda kind, data: struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
png = (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", side, side, 8, 0, 0, 0, 0))
       + chunk(b"IDAT", zlib.compress(raw)) + chunk(b"IEND", b""))
print(json.dumps({"image": base64.b64encode(png).decode()}))' > "$work/large.json"
hey -z "${LOAD_S:-10}s" -c 1 -m POST -T application/json -D "$work/large.json" \
    "http://127.0.0.1:$port/predict" > "$work/hey-large.txt" &
large_pid=$!
hey -z "${LOAD_S:-10}s" -c 8 -m POST -T application/json -D "$work/infer.json" \
    "http://127.0.0.1:$port/v2/models/digits/infer" > "$work/hey-v2.txt" &
load_pid=$!
peak=0
while kill -0 "$load_pid" 2>/dev/null; do
    rss=$(server_rss); [ "$rss" -gt "$peak" ] && peak=$rss
    sleep 0.5
done
wait "$load_pid" "$large_pid"
for kind in v2 large; do echo "==> $kind: $(grep -E 'Requests/sec|^ *\[[0-9]{3}\][[:space:]]+[0-9]+ responses' "$work/hey-$kind.txt" | tr -s ' \t\n' ' ')"; done
echo "==> peak RSS of the server under load: $((peak / 1024)) MiB"
echo "==> after the load:"; ps -o uid=,rss=,args= -g "$server_pid" | awk '$1 == 10001 && $3 !~ /buildah/' | cut -c1-100
curl -s -o /dev/null -w '==> /health %{http_code}\n' "http://127.0.0.1:$port/health"
curl -s -o /dev/null -w '==> /v2/health/ready %{http_code}\n' "http://127.0.0.1:$port/v2/health/ready"
if buildah run --isolation chroot "$container" -- python -c 'import torch' 2>/dev/null; then
    echo "==> the image has torch"
else
    echo "==> the image has no torch"
fi
