#!/bin/bash
# Smoke test of the image as the Kubernetes serving pod runs it (by hand, as root; not in CI):
# the image's root filesystem read-only, a fresh tmpfs at /tmp, a registry copy at /srv/digits,
# the admin token as a file, uid 10001, and the environment the manifests give the server
# container (ConfigMap + env, from `kubectl kustomize deploy/k8s/base`). Waits for /ready 200,
# then checks the admin API with the token. Stops everything it started, also on failure.
#   usage: deploy/image/pod-smoke.sh IMAGE REGISTRY PYTHON [TIMEOUT_S]
set -euo pipefail
# shellcheck source=deploy/image/wait-ready.sh
. "$(dirname "$0")/wait-ready.sh"
image=$1
source_registry=$2
python=$3
timeout_s=${4:-300}

work=$(mktemp -d)
container=""
server_pid=""
cleanup() {
    if [ -n "$server_pid" ]; then
        kill -TERM -- "-$server_pid" 2>/dev/null || true
        for _ in $(seq 30); do kill -0 -- "-$server_pid" 2>/dev/null || break; sleep 1; done
        kill -KILL -- "-$server_pid" 2>/dev/null || true
    fi
    if [ -n "$container" ]; then buildah umount "$container" >/dev/null; buildah rm "$container" >/dev/null; fi
    rm -rf "$work"
}
trap cleanup EXIT INT TERM

env=$(kubectl kustomize deploy/k8s/base | "$python" -c '
import sys, yaml
docs = [d for d in yaml.safe_load_all(sys.stdin) if d]
maps = {d["metadata"]["name"]: d["data"] for d in docs if d["kind"] == "ConfigMap"}
[server] = [c for d in docs if d["kind"] == "Deployment" and d["metadata"]["name"] == "digit-service"
            for c in d["spec"]["template"]["spec"]["containers"]]
env = {}
for source in server.get("envFrom", []):
    env.update(maps[source["configMapRef"]["name"]])
env.update({v["name"]: v["value"] for v in server["env"]})
print(" ".join(f"{k}={v}" for k, v in env.items()))')
token_file=$(tr ' ' '\n' <<<"$env" | sed -n 's/^DIGITS_ADMIN_TOKEN_FILE=//p')
registry=$(tr ' ' '\n' <<<"$env" | sed -n 's/^DIGITS_REGISTRY=//p')
shared=$(dirname "$registry")
echo "==> the server container's environment: $env"

mkdir -p "$work/shared" "$work/secret"
cp -a "$source_registry" "$work/shared/$(basename "$registry")"
chown -R 10001:10001 "$work/shared"
token=$(od -An -N16 -tx1 /dev/urandom | tr -d ' \n')
echo "$token" > "$work/secret/$(basename "$token_file")"
chmod 444 "$work/secret/$(basename "$token_file")"
port=$("$python" -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')

container=$(buildah from --pull=never "$image")
root=$(buildah mount "$container")
mkdir -p "$root$shared" "$root$(dirname "$token_file")"  # mount points, in the container's own layer
started=$(date +%s%N)
# shellcheck disable=SC2016,SC2086  # the inner script expands its own arguments; $env: NAME=value words
setsid unshare --mount bash -c '
    set -e; root=$1 shared_src=$2 shared=$3 secret_src=$4 secret=$5; shift 5
    mount --bind "$root" "$root" && mount -o remount,bind,ro "$root"
    if touch "$root/.writable" 2>/dev/null; then echo "the root filesystem is writable"; exit 3; fi
    mount -t tmpfs -o mode=1777 tmpfs "$root/tmp"
    mount --bind "$shared_src" "$root$shared"
    mount --bind -o ro "$secret_src" "$root$secret"
    mount -t proc proc "$root/proc" && mount --rbind /dev "$root/dev"
    exec chroot --userspec=10001:10001 "$root" /usr/bin/env -i PATH=/opt/venv/bin:/usr/bin:/bin "$@" python -m service
' pod "$root" "$work/shared" "$shared" "$work/secret" "$(dirname "$token_file")" \
    $env DIGITS_HOST=127.0.0.1 DIGITS_PORT="$port" > "$work/server.log" 2>&1 < /dev/null &
server_pid=$!

url=http://127.0.0.1:$port
wait_ready "$url" "$server_pid" "$started" "$timeout_s" "$work/server.log" "$work/ready.json"
admin=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer $token" "$url/admin/models")
wrong=$(curl -s -o /dev/null -w '%{http_code}' -H "Authorization: Bearer not-$token" "$url/admin/models")
echo "==> /admin/models with the Secret's token: $admin, with another: $wrong"
[ "$admin" = 200 ] && [ "$wrong" = 401 ]
echo "==> processes: $(ps -o user= -g "$server_pid" | sort | uniq -c | tr -s ' \n' ' ')"
