#!/bin/bash
# Sourced by smoke.sh and pod-smoke.sh: the one way they wait for a server to be ready.
#   wait_ready URL PID STARTED_NS TIMEOUT_S LOG BODY
# Polls URL/ready every 0.05 s (readiness is an HTTP answer: nothing to wait on but the
# answer, which Kubernetes' probe polls too) until it answers 200, its body in BODY; sets
# READY_MS to the milliseconds since STARTED_NS (`date +%s%N` at the container's start).
# Fails, with the tail of LOG, when the process PID has exited or TIMEOUT_S have passed.
wait_ready() {
    local url=$1 pid=$2 started_ns=$3 timeout_s=$4 log=$5 body=$6 status
    echo "==> waiting for $url/ready (at most ${timeout_s}s)"
    while :; do
        status=$(curl -s -o "$body" -w '%{http_code}' "$url/ready" || true)
        [ "$status" = 200 ] && break
        if ! kill -0 "$pid" 2>/dev/null || [ $((($(date +%s%N) - started_ns) / 1000000000)) -ge "$timeout_s" ]; then
            echo "FAILED: /ready answered ${status:-nothing}; server log:"; tail -40 "$log"
            return 1
        fi
        sleep 0.05
    done
    READY_MS=$((($(date +%s%N) - started_ns) / 1000000))
    echo "==> /ready 200 after $((READY_MS / 1000)).$(printf %03d $((READY_MS % 1000))) s: $(cat "$body")"
}
