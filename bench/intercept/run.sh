#!/usr/bin/env bash
# bench/intercept/run.sh: the tutorial's unmodified child.js (issue 10) under `clusterd run`
# (bind() intercepted), under `pm2 start child.js -i 2`, and alone.
#
# For each setup: wrk rps and p99 with keep-alive and with `Connection: close`, then (clusterd
# and PM2) $BENCH_RELOADS rolling reloads under `Connection: close` load, counting failed
# requests (non-2xx + socket errors). Last, the spawn-to-first-answer time of one worker, with
# and without interception (median of $BENCH_STARTS starts), and clusterd's own spawn-to-ready.
#
# child.js hard-codes port 8001, which must be free. Settings: BENCH_SECONDS (5 per wrk run),
# BENCH_RELOADS (10), BENCH_STARTS (10), BENCH_CONNECTIONS (32), BENCH_THREADS (2),
# BENCH_CHILD_JS (default ../shared/mission-examples/child.js beside the clone),
# BENCH_SKIP_BUILD=1. Installs wrk (apt-get) and PM2 (npm, under bench/.tools) when missing.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS=$ROOT/bench/.tools
CHILD_JS=${BENCH_CHILD_JS:-$ROOT/../shared/mission-examples/child.js}
SECONDS_PER_RUN=${BENCH_SECONDS:-5}
RELOADS=${BENCH_RELOADS:-10}
STARTS=${BENCH_STARTS:-10}
CONNS=${BENCH_CONNECTIONS:-32}
THREADS=${BENCH_THREADS:-2}
PORT=8001
URL="http://127.0.0.1:$PORT/"

BENCH_NAME=intercept
# Start-up times are measured with wait_until: poll every 10 ms.
WAIT_STEP=0.01
source "$HERE/../lib.sh"

bench_temp

http_ok() { curl -fsS -o /dev/null --max-time 1 "$URL" 2>/dev/null; }
stop_pid() { # stop_pid PID: SIGTERM, wait, forget
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# --- tools -------------------------------------------------------------------------------------
[[ -f $CHILD_JS ]] || die "$CHILD_JS is missing (set BENCH_CHILD_JS)"
command -v node >/dev/null || die "node is missing"
command -v curl >/dev/null || die "curl is missing"
if ! command -v wrk >/dev/null; then
    [[ $(id -u) == 0 ]] || die "wrk is missing: apt-get install wrk (as root)"
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi
if [[ ! -x $TOOLS/node_modules/.bin/pm2 ]]; then
    log "installing pm2 under bench/.tools"
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error pm2 >/dev/null
fi
pm2() { PM2_HOME=$TMP/pm2 "$TOOLS/node_modules/.bin/pm2" "$@"; }
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building clusterd (release)"
    (cd "$ROOT" && cargo build --release --quiet -p clusterd) || die "cargo build failed"
fi
CLUSTERD=$ROOT/target/release/clusterd
APP=$TMP/app
mkdir -p "$APP"
cp "$CHILD_JS" "$APP/child.js"
port_free || die "127.0.0.1:$PORT (hard-coded in child.js) is busy"

# --- measurements ------------------------------------------------------------------------------
# wrk_row MODE: "rps p99 errors" of one wrk run (MODE keepalive or close).
wrk_run() { # wrk_run MODE SECONDS OUT
    local header=()
    [[ $1 == close ]] && header=(-H "Connection: close")
    wrk -t"$THREADS" -c"$CONNS" -d"$2"s --latency "${header[@]}" "$URL" >"$3" 2>&1 || true
}
rps() { awk '/Requests\/sec/ {printf "%d", $2}' "$1"; }
p99() { awk '$1 == "99%" {print $2}' "$1"; }
failed() { # non-2xx + socket errors
    awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/[a-z:,]/, " "); n += $1 + $2 + $3 + $4} END {print n + 0}' "$1"
}
requests() { awk '/requests in/ {print $1}' "$1"; }

ROWS=()
measure() { # measure NAME: keep-alive and close rows
    local ka=$TMP/$1-ka.txt cl=$TMP/$1-close.txt
    wrk_run keepalive "$SECONDS_PER_RUN" "$ka"
    wrk_run close "$SECONDS_PER_RUN" "$cl"
    RPS_KA=$(rps "$ka"); P99_KA=$(p99 "$ka"); RPS_CL=$(rps "$cl"); P99_CL=$(p99 "$cl")
}
# reloads NAME COMMAND...: wrk (close) during $RELOADS reloads by COMMAND; "failed/requests".
reloads() {
    local name=$1 out=$TMP/$1-reloads.txt; shift
    wrk -t"$THREADS" -c"$CONNS" -d600s --latency -H "Connection: close" "$URL" >"$out" 2>&1 &
    local wrk_pid=$!
    PIDS+=("$wrk_pid")
    sleep 1
    for _ in $(seq "$RELOADS"); do "$@" >/dev/null 2>&1 || log "$name: a reload failed"; done
    sleep 1
    kill -INT "$wrk_pid" 2>/dev/null || true
    wait "$wrk_pid" 2>/dev/null || true
    RELOAD_FAILED="$(failed "$out")/$(requests "$out")"
}

log "the app alone (1 process)"
(cd "$APP" && exec node child.js >/dev/null 2>&1) &
ALONE=$!; PIDS+=("$ALONE")
wait_until 10 http_ok || die "child.js alone did not answer"
measure alone
ROWS+=("| node child.js alone (1 process) | $RPS_KA | $P99_KA | $RPS_CL | $P99_CL | - | - |")
stop_pid "$ALONE"; wait_until 10 port_free

# The share of requests each worker answered, from child.js's own log lines ("This request
# came from") in clusterd's output: "51/49" for two workers.
balance() {
    grep -o '\[[0-9]*\] This request came from' "$1" | sort | uniq -c \
        | awk '{n[NR]=$1; t+=$1} END {s=""; for (i=1;i<=NR;i++) s=s (i>1?"/":"") int(100*n[i]/t+0.5); print s}'
}

# clusterd_row LABEL [run options...]: child.js under `clusterd run`, measured and reloaded.
clusterd_row() {
    local label=$1; shift
    log "clusterd run --workers 2 $*"
    rm -rf "$TMP/run"
    (cd "$APP" && exec "$CLUSTERD" run --run-dir "$TMP/run" --workers 2 --listen "127.0.0.1:$PORT" "$@" -- node child.js >"$TMP/clusterd.log" 2>&1) &
    CD=$!; PIDS+=("$CD")
    wait_until 20 eval '(( $(grep -c "ready after" "$TMP/clusterd.log") >= 2 ))' || die "clusterd did not start 2 workers"
    measure clusterd
    local share
    share=$(balance "$TMP/clusterd.log")
    reloads clusterd "$CLUSTERD" reload --wait --run-dir "$TMP/run"
    ROWS+=("| $label | $RPS_KA | $P99_KA | $RPS_CL | $P99_CL | $RELOAD_FAILED | $share |")
    READY_MS=$(grep -o 'ready after [0-9.]*m\?s' "$TMP/clusterd.log" | awk '{v=$3; if (v ~ /ms$/) {sub(/ms/,"",v)} else {sub(/s/,"",v); v*=1000} print v}' | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
    stop_pid "$CD"; wait_until 10 port_free
}
clusterd_row "clusterd run --workers 2 --balance shared (one shared socket)" --balance shared
clusterd_row "clusterd run --workers 2 (socket per worker, steered, drain 1s)"

log "pm2 start child.js -i 2"
PM2_STARTED=1
(cd "$APP" && pm2 start child.js -i 2 --name web >/dev/null 2>&1) || die "pm2 start failed"
wait_until 30 http_ok || die "PM2 did not answer"
sleep 1
measure pm2
reloads pm2 pm2 reload web
ROWS+=("| pm2 start child.js -i 2 | $RPS_KA | $P99_KA | $RPS_CL | $P99_CL | $RELOAD_FAILED | - |")
pm2 kill >/dev/null 2>&1 || true; PM2_STARTED=0; wait_until 10 port_free

# Spawn to first answer of one worker: launch, poll every 10 ms, stop; median in ms.
first_answer_ms() { # first_answer_ms COMMAND...
    local t0 t1 pid all=()
    for _ in $(seq "$STARTS"); do
        t0=$(date +%s%N)
        (cd "$APP" && exec "$@" >/dev/null 2>&1) &
        pid=$!
        wait_until 10 http_ok || die "no answer from: $*"
        t1=$(date +%s%N)
        all+=($(( (t1 - t0) / 1000000 )))
        kill -TERM "$pid"; wait "$pid" 2>/dev/null || true
        wait_until 10 port_free
    done
    printf '%s\n' "${all[@]}" | sort -n | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'
}
log "spawn to first answer, $STARTS starts each"
PLAIN_MS=$(first_answer_ms node child.js)
RUN_MS=$(first_answer_ms "$CLUSTERD" run --run-dir "$TMP/run1" --listen "127.0.0.1:$PORT" -- node child.js)

cat <<EOF

| setup | rps keep-alive | p99 keep-alive | rps close | p99 close | failed / requests over $RELOADS reloads (close) | share per worker (%) |
|---|---|---|---|---|---|---|
$(printf '%s\n' "${ROWS[@]}")

Spawn to first answer (median of $STARTS): node child.js alone ${PLAIN_MS} ms; under \`clusterd run\` (clusterd start, bind trapped and handed off, listen trapped) ${RUN_MS} ms. clusterd's spawn-to-ready (ready = "listen") of the workers above: median ${READY_MS} ms.
EOF
