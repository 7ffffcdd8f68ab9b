#!/usr/bin/env bash
# bench/reload/run.sh: rolling reloads under HTTP load, clusterd vs PM2 (issue 3).
#
# For each scenario and each client mode (keep-alive, Connection: close) it runs wrk against
# 127.0.0.1:$BENCH_PORT, triggers $BENCH_RELOADS rolling reloads one after the other while the
# load runs, stops the load shortly after the last one and prints one table row:
# requests, non-2xx responses, socket errors (connect/read/write/timeout), p99, reloads done.
#
# Scenarios (BENCH_SCENARIOS, default all):
#   hello       clusterd + target/release/hello, 4 workers, ready = "notify"
#   node        clusterd + examples/node/server.js on inherited fds
#   pm2         PM2 cluster mode (-i 4) on the same Node app, `pm2 reload` each time
#   broken      clusterd + hello through a wrapper that the bench swaps, before every other
#               reload, for one that exits 1 at once (odd reloads broken, even ones good)
#   pm2-broken  the same under PM2: server.js swapped for one that exits 1 at once
#   speed       how long a reload takes (issue 20): clusterd + hello with each worker count of
#               BENCH_SPEED_WORKERS ("4 64"), bake 1s, each pace of BENCH_SPEED_PACES ("canary
#               each": the default, and bake_each = true), BENCH_SPEED_RELOADS (3) reloads each
#               timed from `clusterd reload --wait` to its return, under the same wrk load; rows
#               go to a second table (reload seconds, median and max; failed requests)
#
# Settings (environment): BENCH_PORT (18080), BENCH_RELOADS (10), BENCH_THREADS (2),
# BENCH_CONNECTIONS (32), BENCH_WARMUP (1 s of load before the first reload), BENCH_GAP
# (0.5 s between reloads), BENCH_TAIL (1 s of load after the last), BENCH_MAX_SECONDS (90,
# wrk's hard bound), BENCH_RELOAD_TIMEOUT (30 s per reload), BENCH_MODES ("keepalive close"),
# BENCH_SCENARIOS, BENCH_SKIP_BUILD=1 (use the binaries already in target/release); for A/B
# runs: BENCH_CLUSTERD_BIN, BENCH_HELLO_BIN (binaries), BENCH_NODE_APP (a directory with server.js).
#
# Installs what it lacks: wrk (apt-get), PM2 (npm, under bench/.tools). Writes the table and
# the logs of the run to bench/results/reload-<UTC time>/ (git-ignored).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS=$ROOT/bench/.tools

PORT=${BENCH_PORT:-18080}
RELOADS=${BENCH_RELOADS:-10}
THREADS=${BENCH_THREADS:-2}
CONNS=${BENCH_CONNECTIONS:-32}
WARMUP=${BENCH_WARMUP:-1}
GAP=${BENCH_GAP:-0.5}
TAIL=${BENCH_TAIL:-1}
MAX_SECONDS=${BENCH_MAX_SECONDS:-90}
RELOAD_TIMEOUT=${BENCH_RELOAD_TIMEOUT:-30}
MODES=${BENCH_MODES:-keepalive close}
SCENARIOS=${BENCH_SCENARIOS:-hello node pm2 broken pm2-broken speed}
SPEED_WORKERS=${BENCH_SPEED_WORKERS:-4 64}
SPEED_PACES=${BENCH_SPEED_PACES:-canary each}
SPEED_RELOADS=${BENCH_SPEED_RELOADS:-3}
WORKERS=4
URL="http://127.0.0.1:$PORT/"

BENCH_NAME=reload
source "$HERE/../lib.sh"

# --- cleanup: everything this script started, by pid --------------------------------------
TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-reload-bench.XXXXXX")
PIDS=()          # background processes we started (clusterd, wrk)
PM2_STARTED=0
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do
        kill -TERM "$pid" 2>/dev/null || true
    done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
        wait "$pid" 2>/dev/null || true
    done
    if [[ $PM2_STARTED == 1 ]]; then pm2_kill; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

forget_pid() { # removes $1 from PIDS
    local keep=() pid
    for pid in "${PIDS[@]}"; do [[ $pid == "$1" ]] || keep+=("$pid"); done
    PIDS=("${keep[@]}")
}

http_ok() { curl -fsS -o /dev/null --max-time 1 "$URL" 2>/dev/null; }

# --- tools and binaries ------------------------------------------------------------------------
install_tools() {
    if ! command -v wrk >/dev/null; then
        [[ $(id -u) == 0 ]] || die "wrk is missing: apt-get install wrk (as root)"
        log "installing wrk"
        apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
    fi
    command -v curl >/dev/null || die "curl is missing"
    NODE=$(command -v node || true)
    if [[ $SCENARIOS == *node* || $SCENARIOS == *pm2* ]]; then
        [[ -n $NODE ]] || die "node is missing (needed by the node and pm2 scenarios)"
    fi
    if [[ $SCENARIOS == *pm2* && ! -x $TOOLS/node_modules/.bin/pm2 ]]; then
        log "installing pm2 under bench/.tools"
        mkdir -p "$TOOLS"
        npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error pm2 >/dev/null
    fi
    PM2=$TOOLS/node_modules/.bin/pm2
}

build() {
    if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
        log "building clusterd and hello (release)"
        (cd "$ROOT" && cargo build --release --quiet -p clusterd -p hello) ||
            die "cargo build failed (BENCH_SKIP_BUILD=1 benches the binaries already built)"
    fi
    CLUSTERD=${BENCH_CLUSTERD_BIN:-$ROOT/target/release/clusterd}
    HELLO=${BENCH_HELLO_BIN:-$ROOT/target/release/hello}
    [[ -x $CLUSTERD && -x $HELLO ]] || die "target/release/clusterd or hello is missing"
}

# --- clusterd ----------------------------------------------------------------------------------
# write_manifest FILE COMMAND...: the manifest of one scenario, the command as a TOML array.
write_manifest() {
    local file=$1 arg cmd=""; shift
    for arg in "$@"; do cmd+="${cmd:+, }\"$arg\""; done
    cat >"$file" <<EOF
[supervisor]
stop_timeout = "10s"

[sockets.http]
listen = "127.0.0.1:$PORT"

[apps.web]
command = [$cmd]
workers = $WORKERS
sockets = ["http"]
ready = "notify"
ready_timeout = "10s"
EOF
}

count_lines() { local n; n=$(grep -c -- "$2" "$1" 2>/dev/null) || true; echo "${n:-0}"; }
all_ready() { (( $(count_lines "$CD_LOG" ') ready after') >= WORKERS )) && http_ok; }

start_clusterd() { # start_clusterd MANIFEST LOG
    CD_LOG=$2
    wait_until 10 port_free || die "127.0.0.1:$PORT is busy"
    "$CLUSTERD" start "$1" >"$CD_LOG" 2>&1 &
    CD_PID=$!
    PIDS+=("$CD_PID")
    wait_until 20 all_ready || { tail -20 "$CD_LOG" >&2; die "clusterd did not get $WORKERS workers ready"; }
}

stop_clusterd() {
    kill -TERM "$CD_PID"
    local rc=0
    wait "$CD_PID" || rc=$?
    forget_pid "$CD_PID"
    [[ $rc == 0 ]] || log "warning: clusterd exited with status $rc on SIGTERM"
}

reload_outcomes() { count_lines "$CD_LOG" 'reload of web \(complete\|aborted\)'; }

# clusterd_reload: SIGUSR2, then waits for the next "complete" or "aborted" line.
# Sets RELOAD_RESULT to complete, aborted or timeout.
clusterd_reload() {
    local before; before=$(reload_outcomes)
    kill -USR2 "$CD_PID"
    if wait_until "$RELOAD_TIMEOUT" eval '(( $(reload_outcomes) > before ))'; then
        if grep 'reload of web \(complete\|aborted\)' "$CD_LOG" | tail -1 | grep -q complete; then
            RELOAD_RESULT=complete
        else
            RELOAD_RESULT=aborted
        fi
    else
        RELOAD_RESULT=timeout
    fi
}

# --- PM2 ---------------------------------------------------------------------------------------
pm2() { PM2_HOME=$TMP/pm2 "$PM2" "$@"; }
pm2_kill() {
    pm2 kill >/dev/null 2>&1 || true
    local pid
    pid=$(cat "$TMP/pm2/pm2.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    rm -rf "$TMP/pm2" # a fresh PM2_HOME (and pm2.log) for the next scenario
    PM2_STARTED=0
}
pm2_online() { # number of "web" processes PM2 reports online (0 when it cannot tell)
    local n
    n=$(pm2 jlist 2>/dev/null | "$NODE" -e '
        let s = ""; process.stdin.on("data", d => s += d).on("end", () => {
            let n = 0; try { for (const p of JSON.parse(s)) if (p.name === "web" && p.pm2_env.status === "online") n++; } catch (e) {}
            console.log(n); });' 2>/dev/null || true)
    echo "${n:-0}"
}
start_pm2() { # start_pm2 APPDIR
    wait_until 10 port_free || die "127.0.0.1:$PORT is busy"
    PM2_STARTED=1
    (cd "$1" && PORT=$PORT pm2 start server.js -i "$WORKERS" --name web >"$TMP/pm2-start.out" 2>&1) ||
        { cat "$TMP/pm2-start.out" >&2; die "pm2 start failed"; }
    wait_until 30 eval '(( $(pm2_online) >= WORKERS )) && http_ok' || die "PM2 workers did not come up"
}
pm2_reload() { # sets RELOAD_RESULT to complete (exit 0), failed (non-zero) or timeout
    local rc=0
    PM2_HOME=$TMP/pm2 timeout "$RELOAD_TIMEOUT" "$PM2" reload web >>"$RUN_DIR/$SCEN_NAME.pm2-reload.log" 2>&1 || rc=$?
    case $rc in
        0) RELOAD_RESULT=complete ;;
        124) RELOAD_RESULT=timeout ;;
        *) RELOAD_RESULT=failed ;;
    esac
}

# --- the Node app ------------------------------------------------------------------------------
# A private copy, so the broken scenario can swap server.js without touching the checkout.
node_app_copy() { # node_app_copy DIR
    rm -rf "$1"; mkdir -p "$1"
    cp -R "$NODE_APP_DIR"/. "$1"/
    rm -rf "$1/node_modules"
    [[ -d $NODE_APP_DIR/node_modules ]] && ln -s "$NODE_APP_DIR/node_modules" "$1/node_modules"
    return 0
}
swap_in() { # swap_in SRC DEST: atomic replace (rename), keeps the exec bit
    cp "$1" "$2.new"; chmod +x "$2.new"; mv -f "$2.new" "$2"
}

# --- load --------------------------------------------------------------------------------------
# A probe beside wrk: one fresh-connection GET every 100 ms (0.5 s timeout), one line each,
# 1 for a 2xx and 0 otherwise: tells how long the service was unavailable, which wrk's error
# counters (events, inflated by its reconnect loop when nothing answers) do not.
start_probe() { # start_probe OUTFILE
    (
        for ((n = 0; n < MAX_SECONDS * 10; n++)); do
            if curl -fsS -o /dev/null --max-time 0.5 "$URL" 2>/dev/null; then echo 1; else echo 0; fi
            sleep 0.1
        done
    ) >"$1" &
    PROBE_PID=$!
    PIDS+=("$PROBE_PID")
}
stop_probe() {
    kill -TERM "$PROBE_PID" 2>/dev/null || true
    wait "$PROBE_PID" 2>/dev/null || true
    forget_pid "$PROBE_PID"
}

start_load() { # start_load MODE OUTFILE
    local header=()
    [[ $1 == close ]] && header=(-H "Connection: close")
    wrk -t"$THREADS" -c"$CONNS" -d"${MAX_SECONDS}s" "${header[@]}" \
        -s "$HERE/stats.lua" "$URL" >"$2" 2>&1 &
    WRK_PID=$!
    PIDS+=("$WRK_PID")
    start_probe "${2%.wrk.out}.probe"
    sleep "$WARMUP"
}
stop_load() {
    sleep "$TAIL"
    kill -INT "$WRK_PID" 2>/dev/null || true
    wait "$WRK_PID" || true
    forget_pid "$WRK_PID"
    stop_probe
}

# field OUTFILE NAME: one value from wrk's BENCH line (see stats.lua).
field() { grep -o "BENCH .*" "$1" | tr ' ' '\n' | sed -n "s/^$2=//p"; }

# row LABEL MODE WRK_OUT RELOADS_TEXT: appends one table row.
row() {
    local out=$3 req dur probe=${3%.wrk.out}.probe probes
    probes="$(grep -c 1 "$probe" || true)/$(wc -l <"$probe")"
    if ! grep -q '^BENCH ' "$out"; then
        printf '%-24s %-10s %s\n' "$1" "$2" "wrk printed no summary (see $(basename "$out"))" >>"$TABLE"
        return
    fi
    req=$(field "$out" requests); dur=$(field "$out" duration_us)
    local bad=$(( $(field "$out" non2xx) + $(field "$out" connect) + $(field "$out" read) \
        + $(field "$out" write) + $(field "$out" timeout) ))
    printf '%-24s %-10s %5.1f %9d %7d %7d %17s %7s %8s %9s  %s\n' "$1" "$2" \
        "$(awk "BEGIN{print $dur/1e6}")" "$req" "$(awk "BEGIN{printf \"%d\", $req/($dur/1e6)}")" \
        "$(field "$out" non2xx)" \
        "$(field "$out" connect)/$(field "$out" read)/$(field "$out" write)/$(field "$out" timeout)" \
        "$(awk "BEGIN{printf \"%.3f%%\", 100*$bad/($req > 0 ? $req : 1)}")" \
        "$(awk "BEGIN{printf \"%.1fms\", $(field "$out" p99_us)/1000}")" "$probes" "$4" >>"$TABLE"
}

# --- scenarios ---------------------------------------------------------------------------------
# Each runs one client mode ($1) and appends one row (and notes) to the table.

scenario_clusterd() { # scenario_clusterd MODE LABEL COMMAND...
    local mode=$1 label=$2; shift 2
    local manifest=$TMP/$SCEN_NAME.toml ok=0 i
    write_manifest "$manifest" "$@"
    start_clusterd "$manifest" "$RUN_DIR/$SCEN_NAME.clusterd.log"
    start_load "$mode" "$RUN_DIR/$SCEN_NAME.wrk.out"
    for ((i = 1; i <= RELOADS; i++)); do
        clusterd_reload
        [[ $RELOAD_RESULT == complete ]] && ok=$((ok + 1))
        [[ $RELOAD_RESULT == complete ]] || log "$SCEN_NAME: reload $i: $RELOAD_RESULT"
        sleep "$GAP"
    done
    stop_load
    stop_clusterd
    row "$label" "$mode" "$RUN_DIR/$SCEN_NAME.wrk.out" "$ok/$RELOADS complete"
}

scenario_hello() { scenario_clusterd "$1" "clusterd + hello" "$HELLO"; }

scenario_node() { scenario_clusterd "$1" "clusterd + node" "$NODE" "$NODE_APP_DIR/server.js"; }

scenario_broken() {
    local mode=$1 manifest=$TMP/$SCEN_NAME.toml wrapper=$TMP/$SCEN_NAME-worker.sh
    local good=$TMP/good.sh bad=$TMP/bad.sh i done_ok=0 aborted=0 other=0 serving=0
    printf '#!/bin/sh\nexec "%s" "$@"\n' "$HELLO" >"$good"
    printf '#!/bin/sh\n# the broken new version: exits 1 at once\nexit 1\n' >"$bad"
    swap_in "$good" "$wrapper"
    write_manifest "$manifest" "$wrapper"
    start_clusterd "$manifest" "$RUN_DIR/$SCEN_NAME.clusterd.log"
    start_load "$mode" "$RUN_DIR/$SCEN_NAME.wrk.out"
    for ((i = 1; i <= RELOADS; i++)); do
        if ((i % 2)); then swap_in "$bad" "$wrapper"; else swap_in "$good" "$wrapper"; fi
        clusterd_reload
        case "$((i % 2)):$RELOAD_RESULT" in
            1:aborted) aborted=$((aborted + 1)) ;;
            0:complete) done_ok=$((done_ok + 1)) ;;
            *) other=$((other + 1)); log "$SCEN_NAME: reload $i: $RELOAD_RESULT" ;;
        esac
        # Are the old workers still serving right after a broken reload?
        if ((i % 2)) && http_ok; then serving=$((serving + 1)); fi
        sleep "$GAP"
    done
    stop_load
    stop_clusterd
    row "clusterd + broken (alt.)" "$mode" "$RUN_DIR/$SCEN_NAME.wrk.out" \
        "$aborted/$((RELOADS - RELOADS / 2)) broken aborted, $done_ok/$((RELOADS / 2)) good complete"
    local reason
    reason=$(grep -o 'reload of web aborted: .*' "$RUN_DIR/$SCEN_NAME.clusterd.log" | head -1 || true)
    NOTES+=("$SCEN_NAME: first abort logged: ${reason:-none}")
    NOTES+=("$SCEN_NAME: a probe request right after each broken reload got 200 $serving/$((RELOADS - RELOADS / 2)) times")
    if ((other)); then NOTES+=("$SCEN_NAME: $other reloads ended otherwise than expected"); fi
}

scenario_pm2() {
    local mode=$1 app=$TMP/$SCEN_NAME-app ok=0 i
    node_app_copy "$app"
    start_pm2 "$app"
    start_load "$mode" "$RUN_DIR/$SCEN_NAME.wrk.out"
    for ((i = 1; i <= RELOADS; i++)); do
        pm2_reload
        [[ $RELOAD_RESULT == complete ]] && ok=$((ok + 1))
        [[ $RELOAD_RESULT == complete ]] || log "$SCEN_NAME: reload $i: $RELOAD_RESULT"
        sleep "$GAP"
    done
    stop_load
    pm2 logs web --nostream --lines 200 >"$RUN_DIR/$SCEN_NAME.pm2-app.log" 2>&1 || true
    cp "$TMP/pm2/pm2.log" "$RUN_DIR/$SCEN_NAME.pm2-daemon.log" 2>/dev/null || true
    pm2_kill
    row "pm2 -i 4 (node)" "$mode" "$RUN_DIR/$SCEN_NAME.wrk.out" "$ok/$RELOADS exit 0"
}

scenario_pm2_broken() {
    local mode=$1 app=$TMP/$SCEN_NAME-app i rc_fail=0 online_min=$WORKERS online
    local good=$TMP/good-server.js bad=$TMP/bad-server.js down=0
    node_app_copy "$app"
    cp "$app/server.js" "$good"
    printf '// the broken new version: exits 1 at once\nprocess.exit(1);\n' >"$bad"
    start_pm2 "$app"
    start_load "$mode" "$RUN_DIR/$SCEN_NAME.wrk.out"
    for ((i = 1; i <= RELOADS; i++)); do
        if ((i % 2)); then swap_in "$bad" "$app/server.js"; else swap_in "$good" "$app/server.js"; fi
        pm2_reload
        online=$(pm2_online)
            if ((online < online_min)); then online_min=$online; fi
        if ((i % 2)) && ! http_ok; then down=$((down + 1)); fi
        if ((i % 2)); then
            NOTES+=("$SCEN_NAME: broken reload $i: pm2 reload $RELOAD_RESULT, $online/$WORKERS online right after")
        fi
        [[ $RELOAD_RESULT == complete ]] || rc_fail=$((rc_fail + 1))
        sleep "$GAP"
    done
    stop_load
    pm2 logs web --nostream --lines 200 >"$RUN_DIR/$SCEN_NAME.pm2-app.log" 2>&1 || true
    cp "$TMP/pm2/pm2.log" "$RUN_DIR/$SCEN_NAME.pm2-daemon.log" 2>/dev/null || true
    pm2_kill
    row "pm2 + broken (alt.)" "$mode" "$RUN_DIR/$SCEN_NAME.wrk.out" \
        "$((RELOADS - rc_fail))/$RELOADS exit 0 (odd ones broken)"
    NOTES+=("$SCEN_NAME: fewest workers online after a reload: $online_min/$WORKERS; a request right after a broken reload failed $down/$((RELOADS - RELOADS / 2)) times")
}

scenario_speed() {
    local mode=$1 n pace manifest i t0 t1 times ok
    for n in $SPEED_WORKERS; do
        for pace in $SPEED_PACES; do
            SCEN_NAME=speed-$n-$pace-$mode
            manifest=$TMP/$SCEN_NAME.toml
            WORKERS=$n write_manifest "$manifest" "$HELLO"
            printf '[apps.web.reload]\nbake = "1s"\nbake_each = %s\n' \
                "$([[ $pace == each ]] && echo true || echo false)" >>"$manifest"
            WORKERS=$n start_clusterd "$manifest" "$RUN_DIR/$SCEN_NAME.clusterd.log"
            start_load "$mode" "$RUN_DIR/$SCEN_NAME.wrk.out"
            times=() ok=0
            for ((i = 1; i <= SPEED_RELOADS; i++)); do
                t0=$(date +%s%N)
                if "$CLUSTERD" reload --wait --file "$manifest" >>"$RUN_DIR/$SCEN_NAME.reload.out" 2>&1; then
                    ok=$((ok + 1))
                fi
                t1=$(date +%s%N)
                times+=("$(awk "BEGIN{printf \"%.2f\", ($t1 - $t0) / 1e9}")")
                sleep "$GAP"
            done
            stop_load
            stop_clusterd
            local out=$RUN_DIR/$SCEN_NAME.wrk.out req bad sorted
            req=$(field "$out" requests)
            bad=$(( $(field "$out" non2xx) + $(field "$out" connect) + $(field "$out" read) \
                + $(field "$out" write) + $(field "$out" timeout) ))
            sorted=$(printf '%s\n' "${times[@]}" | sort -n)
            printf '%-8s %-8s %-10s %8s %8s %-22s %9s %7s  %s\n' "$n" "$pace" "$mode" \
                "$(sed -n "$(( (SPEED_RELOADS + 1) / 2 ))p" <<<"$sorted")" "$(tail -1 <<<"$sorted")" \
                "$(IFS=' '; echo "${times[*]}")" "$req" "$bad" "$ok/$SPEED_RELOADS complete" >>"$SPEED_TABLE"
        done
    done
}

# --- main --------------------------------------------------------------------------------------
install_tools
build
NODE_APP_DIR=${BENCH_NODE_APP:-$ROOT/examples/node}
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
RUN_DIR=$ROOT/bench/results/reload-$STAMP
mkdir -p "$RUN_DIR"
TABLE=$RUN_DIR/table.txt
SPEED_TABLE=$RUN_DIR/speed.txt
NOTES=()
printf '%-8s %-8s %-10s %8s %8s %-22s %9s %7s  %s\n' workers pace client "median s" "max s" "each reload (s)" requests failed reloads >"$SPEED_TABLE"

{
    echo "# clusterd reload bench, $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), kernel $(uname -r), commit $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "# wrk -t$THREADS -c$CONNS on $URL, $RELOADS reloads per row ($GAP s apart, ${WARMUP} s warm-up, ${TAIL} s tail), $WORKERS workers"
    echo "# sock err = connect/read/write/timeout as wrk counts them; failed = (non-2xx + sock err) / requests; p99 over the whole run"
    echo "# probes ok = 2xx answers / probes of a separate curl every 100 ms during the run (how long the service was down)"
    printf '%-24s %-10s %5s %9s %7s %7s %17s %7s %8s %9s  %s\n' scenario client secs requests req/s non-2xx "sock err c/r/w/t" failed p99 "probes ok" reloads
} >"$TABLE"

for mode in $MODES; do
    [[ $mode == keepalive || $mode == close ]] || die "unknown mode $mode (keepalive, close)"
    for scenario in $SCENARIOS; do
        SCEN_NAME=$scenario-$mode
        if [[ $scenario == node || $scenario == pm2* ]] && [[ ! -f $NODE_APP_DIR/server.js ]]; then
            printf '%-24s %-10s %s\n' "$scenario" "$mode" "skipped: $NODE_APP_DIR/server.js not found" >>"$TABLE"
            continue
        fi
        declare -F "scenario_${scenario//-/_}" >/dev/null || die "unknown scenario $scenario"
        log "$scenario, $mode"
        "scenario_${scenario//-/_}" "$mode"
    done
done

if ((${#NOTES[@]})); then
    { echo; printf '%s\n' "${NOTES[@]}"; } >>"$TABLE"
fi
if [[ $SCENARIOS == *speed* ]]; then
    { echo; echo "# reload time (clusterd reload --wait, bake 1s; failed = non-2xx + socket errors)"; cat "$SPEED_TABLE"; } >>"$TABLE"
fi
echo
cat "$TABLE"
log "table and logs: ${RUN_DIR#"$ROOT"/}"
