#!/usr/bin/env bash
# bench/chaos/run.sh: random SIGKILLs under HTTP load (issue 8).
#
# clusterd runs target/release/hello as 4 workers (ready = "notify", default backoff) on
# 127.0.0.1:$BENCH_PORT. wrk loads it with fresh connections for $BENCH_SECONDS while a killer
# sends SIGKILL to one random serving worker every $BENCH_KILL_EVERY seconds (by pid, from
# `clusterd status --json`), and a sampler counts the ready workers 10 times a second.
# Prints: requests, non-2xx, socket errors, kills, the share of samples with 0 / >= 3 / 4
# ready workers, the minimum per second, and clusterd's CPU time.
#
# Settings: BENCH_PORT (18090), BENCH_SECONDS (60), BENCH_KILL_EVERY (0.5), BENCH_WORKERS (4),
# BENCH_CONNECTIONS (16), BENCH_SKIP_BUILD=1. Installs wrk with apt-get when missing.
# Loopback only; kills only the processes it started.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PORT=${BENCH_PORT:-18090}
SECONDS_=${BENCH_SECONDS:-60}
KILL_EVERY=${BENCH_KILL_EVERY:-0.5}
WORKERS=${BENCH_WORKERS:-4}
CONNS=${BENCH_CONNECTIONS:-16}

BENCH_NAME=chaos
source "$HERE/../lib.sh"

if ! command -v wrk >/dev/null; then
    log "installing wrk"
    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq wrk >/dev/null
fi
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release -q -p clusterd -p hello)
fi
BIN=$ROOT/target/release/clusterd
HELLO=$ROOT/target/release/hello

TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-chaos.XXXXXX")
PIDS=()
cleanup() {
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do wait "$pid" 2>/dev/null || true; done
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

cat >"$TMP/chaos.toml" <<TOML
[supervisor]
stop_timeout = "5s"
run_dir = "run"

[sockets.http]
listen = "127.0.0.1:$PORT"

[apps.web]
command = ["$HELLO"]
workers = $WORKERS
sockets = ["http"]
ready = "notify"
TOML

"$BIN" start "$TMP/chaos.toml" >"$TMP/clusterd.log" 2>&1 &
CLUSTERD=$!
PIDS+=("$CLUSTERD")
status() { "$BIN" status --json -f "$TMP/chaos.toml" 2>/dev/null; }
ready_count() { status | jq '[.apps[0].workers[] | select(.role == "serving" and .state == "ready")] | length'; }
for _ in $(seq 100); do [[ $(ready_count || echo 0) == "$WORKERS" ]] && break; sleep 0.1; done
[[ $(ready_count) == "$WORKERS" ]] || { log "workers did not get ready"; cat "$TMP/clusterd.log" >&2; exit 1; }

# The sampler: one line per sample, "<second> <ready>".
(
    start=$(date +%s%N)
    end=$(( start + SECONDS_ * 1000000000 ))
    while (( $(date +%s%N) < end )); do
        n=$(ready_count || echo 0)
        echo "$(( ($(date +%s%N) - start) / 1000000000 )) $n"
        sleep 0.1
    done
) >"$TMP/samples" &
SAMPLER=$!
PIDS+=("$SAMPLER")

# The killer: a random serving worker every KILL_EVERY seconds.
(
    end=$(( $(date +%s) + SECONDS_ ))
    kills=0
    while (( $(date +%s) < end )); do
        pid=$(status | jq -r '[.apps[0].workers[] | select(.role == "serving" and .pid != null) | .pid] | .[]' | shuf -n 1 || true)
        if [[ -n $pid ]] && kill -KILL "$pid" 2>/dev/null; then kills=$((kills + 1)); fi
        sleep "$KILL_EVERY"
    done
    echo "$kills" >"$TMP/kills"
) &
KILLER=$!
PIDS+=("$KILLER")

wrk -t2 -c"$CONNS" -d"${SECONDS_}s" -H 'Connection: close' --latency "http://127.0.0.1:$PORT/" >"$TMP/wrk" 2>&1 || true
wait "$KILLER" "$SAMPLER" 2>/dev/null || true
read -r utime stime < <(awk '{sub(/.*\) /, ""); print $12, $13}' "/proc/$CLUSTERD/stat")
ticks=$(getconf CLK_TCK)

requests=$(awk '/requests in/ {print $1}' "$TMP/wrk")
non2xx=$(awk '/Non-2xx/ {print $NF}' "$TMP/wrk"); non2xx=${non2xx:-0}
errors=$(awk '/Socket errors/ {gsub(/,/, ""); print $4 + $6 + $8 + $10}' "$TMP/wrk"); errors=${errors:-0}
p99=$(awk '/ 99%/ {print $2}' "$TMP/wrk")
kills=$(cat "$TMP/kills" 2>/dev/null || echo "?")
awk -v w="$WORKERS" -v req="$requests" -v n2="$non2xx" -v se="$errors" -v p99="$p99" -v kills="$kills" \
    -v cpu="$(awk -v u="$utime" -v s="$stime" -v t="$ticks" 'BEGIN {printf "%.2f", (u + s) / t}')" '
{ n++; c[$2]++; if (!($1 in m) || $2 < m[$1]) m[$1] = $2; if ($1 > last) last = $1 }
END {
    printf "| requests | non-2xx | socket errors | p99 | kills | samples | 0 ready | >= %d ready | %d ready | clusterd CPU |\n", w - 1, w
    printf "|---|---|---|---|---|---|---|---|---|---|\n"
    ge = c[w - 1] + c[w]
    printf "| %s | %s | %s | %s | %s | %d | %.1f%% | %.1f%% | %.1f%% | %s s |\n", req, n2, se, p99, kills, n, 100 * c[0] / n, 100 * ge / n, 100 * c[w] / n, cpu
    line = ""
    for (s = 0; s <= last; s++) line = line (s in m ? m[s] : "-")
    printf "\nminimum ready workers per second: %s\n", line
}' "$TMP/samples"
