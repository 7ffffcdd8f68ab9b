#!/usr/bin/env bash
# bench/unmodified/run.sh: an app that cannot drain itself, through reloads under load.
#
# The tutorial's child.js (binds its own port, answers after a short spin, exits at once on
# SIGTERM/SIGINT) as 2 workers, unmodified:
#   - clusterd: `clusterd run --workers 2 -- node child.js` (no --listen: the port it binds is
#     found by itself, a steered socket per worker, drain 1s), reloaded with
#     `clusterd reload --wait`;
#   - clusterd-listen: the same with the address named (`--listen 127.0.0.1:PORT`), for contrast;
#   - PM2: `pm2 start child.js -i 2` (cluster mode: the master accepts and hands connections
#     to the workers), reloaded with `pm2 reload`.
# For each and each client mode (keep-alive, `Connection: close`): wrk -t2 -c16 for 14 s while
# 2 reloads happen one after the other; one table row: requests, non-2xx, socket errors
# (connect/read/write/timeout), failed share, reloads done (and how long each took), and the
# workers' unplanned restarts (clusterd: the sum of status's `restarts`; PM2: the growth of
# `restart_time` minus one per worker per reload, which PM2 counts there too).
#
# child.js is not in this repository: BENCH_CHILD_JS names it (default ../shared/mission-examples/
# child.js beside the checkout). It is copied to a temporary directory with its port (8001)
# replaced by the first free port from BENCH_PORT (21850) up, and removed afterwards.
#
# Settings: BENCH_PORT, BENCH_SECONDS (14), BENCH_THREADS (2), BENCH_CONNECTIONS (16),
# BENCH_RELOADS (2), BENCH_WARMUP (2 s of load before the first reload), BENCH_GAP (2 s
# between a reload's end and the next), BENCH_MODES ("keepalive close"), BENCH_SETUPS
# ("clusterd clusterd-listen pm2"), BENCH_SKIP_BUILD=1, BENCH_CLUSTERD_BIN. Installs wrk (apt-get) and PM2
# (npm, under bench/.tools) when missing. Writes the table and the logs of the run to
# bench/results/unmodified-<UTC time>/ (git-ignored).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS=$ROOT/bench/.tools
PORT=${BENCH_PORT:-21850}
SECS=${BENCH_SECONDS:-14}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNECTIONS:-16}
RELOADS=${BENCH_RELOADS:-2}
WARMUP=${BENCH_WARMUP:-2}
GAP=${BENCH_GAP:-2}
MODES=${BENCH_MODES:-keepalive close}
SETUPS=${BENCH_SETUPS:-clusterd clusterd-listen pm2}
CHILD_JS=${BENCH_CHILD_JS:-$ROOT/../shared/mission-examples/child.js}

BENCH_NAME=unmodified
source "$HERE/../lib.sh"

bench_temp

# Two distinct pids answer ("Hola amigos! PID"): both workers serve.
two_serve() {
    local seen
    seen=$(for _ in $(seq 20); do curl -fsS --max-time 1 "http://127.0.0.1:$PORT/" 2>/dev/null || true; done |
        sort -u | wc -l)
    (( seen >= 2 ))
}
forget_pid() {
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# --- tools, binaries, the app ------------------------------------------------------------------
command -v node >/dev/null || die "node is missing"
command -v curl >/dev/null || die "curl is missing"
if ! command -v wrk >/dev/null; then
    [[ $(id -u) == 0 ]] || die "wrk is missing: apt-get install wrk (as root)"
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi
if [[ $SETUPS == *pm2* && ! -x $TOOLS/node_modules/.bin/pm2 ]]; then
    log "installing pm2 under bench/.tools"
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error pm2 >/dev/null
fi
pm2() { PM2_HOME=$TMP/pm2 "$TOOLS/node_modules/.bin/pm2" "$@"; }
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building clusterd (release)"
    (cd "$ROOT" && cargo build --release --quiet -p clusterd) || die "cargo build failed"
fi
CLUSTERD=${BENCH_CLUSTERD_BIN:-$ROOT/target/release/clusterd}
[[ -x $CLUSTERD ]] || die "$CLUSTERD is missing"
[[ -f $CHILD_JS ]] || die "$CHILD_JS is missing (BENCH_CHILD_JS names the tutorial's child.js)"
grep -q 'const PORT = 8001;' "$CHILD_JS" || die "$CHILD_JS does not say 'const PORT = 8001;'"
for ((p = PORT; p < PORT + 50; p++)); do port_free "$p" && break; done
port_free "$p" || die "no free port in $PORT-$((PORT + 49)) (set BENCH_PORT)"
PORT=$p
APP=$TMP/app
mkdir -p "$APP"
sed "s/const PORT = 8001;/const PORT = $PORT;/" "$CHILD_JS" >"$APP/child.js"
URL="http://127.0.0.1:$PORT/"

RESULTS=$ROOT/bench/results/unmodified-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"

# --- one row -----------------------------------------------------------------------------------
# field FILE NAME: a value of wrk's BENCH line (../reload/stats.lua).
field() { grep -o 'BENCH .*' "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

# clusterd_restarts: the sum of the workers' `restarts` in status.
clusterd_restarts() {
    "$CLUSTERD" status --json --run-dir "$APP/.clusterd/node" | node -e '
        let s = ""; process.stdin.on("data", d => s += d).on("end", () => {
            let n = 0; for (const a of JSON.parse(s).apps) for (const w of a.workers) n += w.restarts;
            console.log(n); });'
}
# pm2_restarts: the sum of the processes' restart_time.
pm2_restarts() {
    pm2 jlist | node -e '
        let s = ""; process.stdin.on("data", d => s += d).on("end", () => {
            let n = 0; for (const p of JSON.parse(s)) n += p.pm2_env.restart_time;
            console.log(n); });'
}

ROWS=()
# measure SETUP MODE RELOAD_FN LABEL NAME: load, reloads, one row.
measure() {
    local setup=$1 mode=$2 reload=$3 header=() out=$RESULTS/$5-$2 ok=0 times=() i t0 before after
    [[ $mode == close ]] && header=(-H "Connection: close")
    before=$("${setup}_restarts")
    wrk -t"$THREADS" -c"$CONNS" -d"${SECS}s" "${header[@]}" -s "$ROOT/bench/reload/stats.lua" "$URL" \
        >"$out.wrk.out" 2>&1 &
    local wrk=$!
    PIDS+=("$wrk")
    sleep "$WARMUP"
    for ((i = 1; i <= RELOADS; i++)); do
        (( i == 1 )) || sleep "$GAP"
        t0=$(date +%s%N)
        if "$reload" >>"$out.reloads" 2>&1; then ok=$((ok + 1)); else log "$setup $mode: reload $i failed"; fi
        times+=("$(awk "BEGIN{printf \"%.1f\", ($(date +%s%N) - $t0) / 1e9}")")
    done
    kill -0 "$wrk" 2>/dev/null || log "warning: $setup $mode: the load ended before the last reload did"
    wait "$wrk" || true
    forget_pid "$wrk"
    after=$("${setup}_restarts")
    local restarts=$((after - before))
    # PM2 counts each worker's reload in restart_time too.
    [[ $setup == pm2 ]] && restarts=$((restarts - 2 * ok))
    grep -q '^BENCH ' "$out.wrk.out" || die "wrk printed no summary (see $out.wrk.out)"
    local req non2xx c r w to bad
    req=$(field "$out.wrk.out" requests); non2xx=$(field "$out.wrk.out" non2xx)
    c=$(field "$out.wrk.out" connect); r=$(field "$out.wrk.out" read)
    w=$(field "$out.wrk.out" write); to=$(field "$out.wrk.out" timeout)
    bad=$((non2xx + c + r + w + to))
    ROWS+=("$(printf '| %-66s | %-9s | %8d | %7d | %16s | %7s | %-18s | %8d |' "$4" "$mode" "$req" "$non2xx" \
        "$c/$r/$w/$to" "$(awk "BEGIN{printf \"%.3f%%\", 100 * $bad / ($req > 0 ? $req : 1)}")" \
        "$ok/$RELOADS (${times[*]} s)" "$restarts")")
    log "${ROWS[-1]}"
}

# --- setups ------------------------------------------------------------------------------------
clusterd_reload() { "$CLUSTERD" reload --wait --run-dir "$APP/.clusterd/node"; }
pm2_reload() { pm2 reload child; }

run_clusterd() { # run_clusterd MODE [--listen ADDR]
    local mode=$1 name=clusterd label; shift
    [[ $# -gt 0 ]] && name=clusterd-listen
    label="clusterd run --workers 2 ${*:+$* }-- node child.js"
    log "$label ($mode)"
    wait_until 10 port_free || die "127.0.0.1:$PORT is busy"
    rm -rf "$APP/.clusterd"
    (cd "$APP" && exec "$CLUSTERD" run --workers 2 "$@" -- node child.js) >"$RESULTS/$name-$mode.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_until 30 "$CLUSTERD" status --check --run-dir "$APP/.clusterd/node" >/dev/null 2>&1 ||
        die "clusterd's workers did not get ready (see $RESULTS/$name-$mode.log)"
    wait_until 30 two_serve || die "clusterd did not serve from 2 workers"
    measure clusterd "$mode" clusterd_reload "$label" "$name"
    kill -TERM "$pid"
    wait "$pid" || log "warning: clusterd exited with status $? on SIGTERM"
    forget_pid "$pid"
    wait_until 10 port_free || die "port still busy after clusterd"
}

run_pm2() { # run_pm2 MODE
    log "pm2 start child.js -i 2 ($1)"
    wait_until 10 port_free || die "127.0.0.1:$PORT is busy"
    PM2_STARTED=1
    (cd "$APP" && pm2 start child.js -i 2) >"$RESULTS/pm2-$1.start.log" 2>&1 || die "pm2 start failed"
    wait_until 30 two_serve || die "PM2 did not serve from 2 workers"
    measure pm2 "$1" pm2_reload 'pm2 start child.js -i 2' pm2
    cp "$TMP/pm2/pm2.log" "$RESULTS/pm2-$1.pm2.log" 2>/dev/null || true
    pm2 kill >/dev/null 2>&1 || true
    PM2_STARTED=0
    rm -rf "$TMP/pm2"
    wait_until 10 port_free || die "port still busy after PM2"
}

for mode in $MODES; do
    for setup in $SETUPS; do
        case $setup in
        clusterd) run_clusterd "$mode" ;;
        clusterd-listen) run_clusterd "$mode" --listen "127.0.0.1:$PORT" ;;
        pm2) run_pm2 "$mode" ;;
        *) die "unknown setup $setup" ;;
        esac
    done
done

{
    echo "nproc $(nproc), kernel $(uname -r), node $(node --version), $([[ $SETUPS == *pm2* ]] && echo "pm2 $(node -p "require('$TOOLS/node_modules/pm2/package.json').version"), ")$(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "wrk -t$THREADS -c$CONNS -d${SECS}s, $RELOADS reloads (the first after ${WARMUP} s, then ${GAP} s after each), port $PORT"
    echo
    echo "| setup                                                              | clients   | requests | non-2xx | sock err c/r/w/t |  failed | reloads (each)     | restarts |"
    echo "|--------------------------------------------------------------------|-----------|----------|---------|-----------------|---------|--------------------|----------|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$RESULTS/table.md"
