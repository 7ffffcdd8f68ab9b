#!/usr/bin/env bash
# bench/upgrade/run.sh: `clusterd upgrade` under HTTP load (issue 12).
#
# For each client mode (keep-alive, Connection: close) it starts clusterd with 4 hello workers
# on 127.0.0.1:$BENCH_PORT, runs wrk against them, upgrades clusterd in place $BENCH_UPGRADES
# times (to the same binary; every upgrade is a full check + exec + hand-over) while the
# load runs, and prints one table row: upgrades done, time from `clusterd upgrade` to the new
# supervisor answering status (median and max, as `clusterd upgrade` measures it), requests
# served, failed requests (non-2xx + socket errors), and whether clusterd's pid and every
# worker's pid stayed the same.
#
# Settings (environment): BENCH_PORT (21080), BENCH_UPGRADES (10), BENCH_THREADS (2),
# BENCH_CONNECTIONS (32), BENCH_WARMUP (1 s), BENCH_GAP (0.3 s between upgrades), BENCH_TAIL
# (1 s), BENCH_MODES ("keepalive close"), BENCH_SKIP_BUILD=1 (use target/release as it is).
# Needs wrk and python3. Writes the table and logs to bench/results/upgrade-<UTC time>/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PORT=${BENCH_PORT:-21080}
UPGRADES=${BENCH_UPGRADES:-10}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNECTIONS:-32}
WARMUP=${BENCH_WARMUP:-1}
GAP=${BENCH_GAP:-0.3}
TAIL=${BENCH_TAIL:-1}
MODES=${BENCH_MODES:-keepalive close}
CLUSTERD=$ROOT/target/release/clusterd
HELLO=$ROOT/target/release/hello

log() { printf '[upgrade-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-upgrade-bench.XXXXXX")
PIDS=()
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    rm -rf "$TMP"
}
trap cleanup EXIT

command -v wrk >/dev/null || die "wrk is missing (apt-get install wrk)"
command -v python3 >/dev/null || die "python3 is missing"
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building clusterd and hello (release)"
    (cd "$ROOT" && cargo build --release -j 1 -p clusterd -p hello) >&2
fi
[[ -x $CLUSTERD && -x $HELLO ]] || die "no release binaries in target/release"

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN_DIR=$ROOT/bench/results/upgrade-$STAMP
mkdir -p "$RUN_DIR"
TABLE=$RUN_DIR/table.md

cat >"$TMP/supervisor.toml" <<TOML
[supervisor]
stop_timeout = "5s"
run_dir = "$TMP/run"

[sockets.http]
listen = "127.0.0.1:$PORT"

[apps.web]
command = ["$HELLO"]
workers = 4
sockets = ["http"]
ready = "notify"
TOML

# pids: clusterd's and every worker's, one line.
pids() {
    "$CLUSTERD" status --json -f "$TMP/supervisor.toml" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["pid"], sorted(w["pid"] for a in s["apps"] for w in a["workers"] if w["pid"]))'
}

# field FILE NAME: a value of wrk's BENCH line (../reload/stats.lua).
field() { sed -n "s/.*[ ]$2=\([^ ]*\).*/\1/p" "$1" | head -1; }

run_mode() {
    local mode=$1 header=() out=$RUN_DIR/$1
    [[ $mode == close ]] && header=(-H "Connection: close")
    "$CLUSTERD" start "$TMP/supervisor.toml" >"$out.clusterd.log" 2>&1 &
    local supervisor=$!
    PIDS+=("$supervisor")
    for _ in $(seq 200); do
        "$CLUSTERD" status --check -f "$TMP/supervisor.toml" >/dev/null 2>&1 && break
        sleep 0.05
    done
    "$CLUSTERD" status --check -f "$TMP/supervisor.toml" >/dev/null || die "workers not ready"
    local before
    before=$(pids)
    local seconds
    seconds=$(python3 -c "import math; print(math.ceil($WARMUP + $TAIL + $UPGRADES * ($GAP + 0.5)) + 2)")
    wrk -t"$THREADS" -c"$CONNS" -d"${seconds}s" "${header[@]}" -s "$ROOT/bench/reload/stats.lua" \
        "http://127.0.0.1:$PORT/" >"$out.wrk.out" 2>&1 &
    local wrk=$!
    PIDS+=("$wrk")
    sleep "$WARMUP"
    : >"$out.upgrades"
    local ok=0 i
    for i in $(seq "$UPGRADES"); do
        if "$CLUSTERD" upgrade -f "$TMP/supervisor.toml" >>"$out.upgrades" 2>&1; then
            ok=$((ok + 1))
        fi
        sleep "$GAP"
    done
    wait "$wrk" || true
    local after
    after=$(pids)
    kill -TERM "$supervisor"
    wait "$supervisor" || true
    local times
    times=$(sed -n 's/.* in \([0-9]*\) ms;.*/\1/p' "$out.upgrades" | sort -n | python3 -c '
import sys
t = [int(x) for x in sys.stdin.read().split()]
print(f"{t[len(t)//2]} / {t[-1]}" if t else "-")')
    local requests failed
    requests=$(field "$out.wrk.out" requests)
    failed=$(python3 -c "print(sum(int(x or 0) for x in '$(field "$out.wrk.out" non2xx) $(field "$out.wrk.out" connect) $(field "$out.wrk.out" read) $(field "$out.wrk.out" write) $(field "$out.wrk.out" timeout)'.split()))")
    local same_supervisor=no same_workers=no
    [[ ${before%% *} == "${after%% *}" ]] && same_supervisor=yes
    [[ ${before#* } == "${after#* }" ]] && same_workers=yes
    printf '| %-9s | %8s | %27s | %9s | %6s | %17s | %16s |\n' "$mode" "$ok/$UPGRADES" "$times" \
        "${requests:-?}" "${failed:-?}" "$same_supervisor" "$same_workers" >>"$TABLE"
}

{
    echo "# wrk -t$THREADS -c$CONNS, 4 hello workers, $UPGRADES upgrades ${GAP} s apart per row ($(uname -r), $(nproc) CPUs)"
    echo
    echo "| clients   | upgrades | to status ms (median / max) |  requests | failed | clusterd pid kept | worker pids kept |"
    echo "|-----------|----------|-----------------------------|-----------|--------|-------------------|------------------|"
} >"$TABLE"
for mode in $MODES; do
    log "mode $mode"
    run_mode "$mode"
done
cat "$TABLE"
