#!/usr/bin/env bash
# bench/balance/run.sh: balanced accept (issue 20, item 6). A CPU-bound app (BUSY_MS, default
# 1.5 ms, of CPU per request), 2 workers, in two languages:
#   - node: bench/balance/server.js (Node accepts one connection per turn of its event loop),
#   - go: bench/balance/goserver (net/http accepts every connection it can at once;
#     GOMAXPROCS=1 so that a worker is one CPU, as a Node worker is),
# under:
#   - clusterd, balance = "shared" (one accept queue for both workers: the old default),
#   - clusterd, the default (a steered socket per worker, balance = "round-robin"),
#   - clusterd, balance = "least-queued" (steered, each connection to the worker with the
#     fewest connections waiting to be accepted),
#   - clusterd, balance = "random" (steered, each connection to a worker at random),
#   - PM2 cluster mode (`pm2 start server.js -i 2`: Node's cluster module; node only),
#   - circus (2 processes sharing one socket it binds, `use_sockets`), when pip installs it.
# For each, bench/balance/client (a closed-loop load generator in Go; see its comment for why
# not wrk) with BENCH_CONNECTIONS (64) keep-alive connections, then the same with a new
# connection per request (`Connection: close`), each measured for BENCH_SECONDS (10) after a
# 3 s warm-up: how the connections (or requests) fell on the two workers, p50/p99/p99.9, rps.
#
# Settings: BENCH_PORT (18090; circus also uses the next three for its endpoints),
# BENCH_SECONDS, BENCH_CONNECTIONS, BUSY_MS, BENCH_SKIP_BUILD=1, BENCH_APPS ("node go"),
# BENCH_SETUPS ("shared steered least-queued random pm2 circus"), BENCH_NICE (a niceness for the servers
# and the client, e.g. -10 on a machine busy with other work; default: none). Installs Go
# (apt-get) when missing, PM2 (npm) and circus (pip, in a venv) under bench/.tools.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS=$ROOT/bench/.tools
PORT=${BENCH_PORT:-18090}
SECS=${BENCH_SECONDS:-10}
CONNS=${BENCH_CONNECTIONS:-64}
SETUPS=${BENCH_SETUPS:-shared steered least-queued random pm2 circus}
APPS=${BENCH_APPS:-node go}
export BUSY_MS=${BUSY_MS:-1.5}
URL="http://127.0.0.1:$PORT/"
NICE=()
[[ -n ${BENCH_NICE:-} ]] && NICE=(nice -n "$BENCH_NICE")

BENCH_NAME=balance
source "$HERE/../lib.sh"

bench_temp

# Two distinct pids answer: both workers serve.
two_serve() {
    local seen
    seen=$(for _ in $(seq 20); do curl -fsS --max-time 1 "$URL" 2>/dev/null || true; done | sort -u | wc -l)
    (( seen >= 2 ))
}
stop_pid() { # stop_pid PID: SIGTERM, wait, forget
    kill -TERM "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
    local keep=() p
    for p in "${PIDS[@]}"; do [[ $p == "$1" ]] || keep+=("$p"); done
    PIDS=("${keep[@]}")
}

# --- tools -------------------------------------------------------------------------------------
command -v node >/dev/null || die "node is missing"
command -v curl >/dev/null || die "curl is missing"
if ! command -v go >/dev/null; then
    [[ $(id -u) == 0 ]] || die "go is missing: apt-get install golang-go (as root)"
    apt-get install -y golang-go >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y golang-go >/dev/null; }
fi
(cd "$HERE/client" && go build -o "$TMP/client" .) || die "cannot build bench/balance/client"
(cd "$HERE/goserver" && go build -o "$TMP/goserver" .) || die "cannot build bench/balance/goserver"
if [[ $SETUPS == *pm2* && ! -x $TOOLS/node_modules/.bin/pm2 ]]; then
    log "installing pm2 under bench/.tools"
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error pm2 >/dev/null
fi
pm2() { PM2_HOME=$TMP/pm2 "${NICE[@]}" "$TOOLS/node_modules/.bin/pm2" "$@"; }
CIRCUS=$TOOLS/circus/bin/circusd
if [[ $SETUPS == *circus* && ! -x $CIRCUS ]]; then
    log "installing circus (pip) under bench/.tools/circus"
    { python3 -m venv "$TOOLS/circus" && "$TOOLS/circus/bin/pip" install -q circus; } >"$TMP/pip.log" 2>&1 \
        || log "circus could not be installed: $(tail -1 "$TMP/pip.log")"
fi
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building clusterd (release)"
    (cd "$ROOT" && cargo build --release --quiet -p clusterd) || die "cargo build failed"
fi
CLUSTERD=${BENCH_CLUSTERD_BIN:-$ROOT/target/release/clusterd}
port_free || die "127.0.0.1:$PORT is busy (set BENCH_PORT)"

# --- measurements ------------------------------------------------------------------------------
# field LINE KEY: the value of KEY=... in the client's line.
field() { tr ' ' '\n' <<<"$1" | sed -n "s/^$2=//p"; }

ROWS=()
measure() { # measure APP LABEL FILE: one row
    local ka cl
    ka=$("${NICE[@]}" "$TMP/client" -addr "127.0.0.1:$PORT" -c "$CONNS" -d "${SECS}s" 2>"$RESULTS/$3-keepalive.err") \
        || die "$2: the client failed: $(tail -1 "$RESULTS/$3-keepalive.err")"
    cl=$("${NICE[@]}" "$TMP/client" -addr "127.0.0.1:$PORT" -c "$CONNS" -d "${SECS}s" -close 2>"$RESULTS/$3-close.err") \
        || die "$2: the client failed: $(tail -1 "$RESULTS/$3-close.err")"
    printf '%s\n%s\n' "$ka" "$cl" >"$RESULTS/$3.txt"
    ROWS+=("| $1 | $2 | $(field "$ka" split) | $(field "$ka" p50) | $(field "$ka" p99) | $(field "$ka" p999) | $(field "$ka" rps) | $(field "$cl" split) | $(field "$cl" p99) | $(field "$cl" rps) | $(( $(field "$ka" errors) + $(field "$cl" errors) )) |")
    log "${ROWS[-1]}"
}

RESULTS=$ROOT/bench/results/balance-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"

clusterd_setup() { # clusterd_setup APP LABEL NAME BALANCE_LINE
    log "$1: clusterd, $2"
    mkdir -p "$TMP/$3"
    cat >"$TMP/$3/app.toml" <<EOT
[supervisor]
run_dir = "$TMP/$3/run"
stop_timeout = "5s"

[sockets.http]
listen = "127.0.0.1:$PORT"

[apps.web]
command = [$COMMAND]
workers = 2
sockets = ["http"]
ipc = false
$4
EOT
    "${NICE[@]}" "$CLUSTERD" start "$TMP/$3/app.toml" >"$RESULTS/$3-clusterd.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_until 30 two_serve || die "clusterd ($3) did not serve from 2 workers"
    measure "$1" "clusterd, $2" "$3"
    stop_pid "$pid"
    wait_until 10 port_free || die "port still busy after clusterd ($3)"
}

# Each worker is one CPU: Go's runtime would otherwise run a worker on both.
export GOMAXPROCS=1
for app in $APPS; do
    case $app in
    node) COMMAND="\"node\", \"$HERE/server.js\"" ;;
    go) COMMAND="\"$TMP/goserver\"" ;;
    *) die "unknown app $app" ;;
    esac
    for setup in $SETUPS; do
        case $setup in
        shared) clusterd_setup "$app" 'balance = "shared" (one queue, the old default)' "$app-shared" 'balance = "shared"' ;;
        steered) clusterd_setup "$app" 'default (round-robin, a steered socket per worker)' "$app-steered" '' ;;
        least-queued) clusterd_setup "$app" 'balance = "least-queued"' "$app-least-queued" 'balance = "least-queued"' ;;
        random) clusterd_setup "$app" 'balance = "random"' "$app-random" 'balance = "random"' ;;
        pm2)
            [[ $app == node ]] || continue
            log "$app: pm2 start server.js -i 2"
            PM2_STARTED=1
            PORT=$PORT pm2 start "$HERE/server.js" -i 2 --name web >"$RESULTS/pm2.log" 2>&1
            wait_until 30 two_serve || die "PM2 did not serve from 2 workers"
            measure "$app" "pm2 start -i 2 (cluster mode)" "$app-pm2"
            pm2 kill >/dev/null 2>&1 || true
            PM2_STARTED=0
            wait_until 10 port_free || die "port still busy after PM2"
            ;;
        circus)
            if [[ ! -x $CIRCUS ]]; then
                ROWS+=("| $app | circus | not installable here | | | | | | | | |")
                continue
            fi
            log "$app: circus, 2 processes on one shared socket"
            local_cmd="node $HERE/server.js"
            [[ $app == go ]] && local_cmd=$TMP/goserver
            cat >"$TMP/circus.ini" <<EOT
[circus]
endpoint = tcp://127.0.0.1:$((PORT + 1))
pubsub_endpoint = tcp://127.0.0.1:$((PORT + 2))
stats_endpoint = tcp://127.0.0.1:$((PORT + 3))
statsd = False

[watcher:web]
cmd = $local_cmd --fd \$(circus.sockets.web)
numprocesses = 2
use_sockets = True
copy_env = True

[socket:web]
host = 127.0.0.1
port = $PORT
EOT
            "${NICE[@]}" "$CIRCUS" "$TMP/circus.ini" >"$RESULTS/$app-circus.log" 2>&1 &
            CPID=$!
            PIDS+=("$CPID")
            wait_until 30 two_serve || die "circus did not serve from 2 workers"
            measure "$app" "circus (2 processes, one shared socket)" "$app-circus"
            stop_pid "$CPID"
            wait_until 10 port_free || die "port still busy after circus"
            ;;
        *) die "unknown setup $setup" ;;
        esac
    done
done

{
    echo "nproc $(nproc), kernel $(uname -r), node $(node --version), $(go version | cut -d' ' -f3), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "BUSY_MS=$BUSY_MS, 2 workers, $CONNS connections, ${SECS}s measured after a 3s warm-up${BENCH_NICE:+, nice $BENCH_NICE}; latencies in ms"
    echo
    echo "| app | setup | keep-alive connections per worker | p50 | p99 | p99.9 | rps | close: requests per worker | close p99 | close rps | errors |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$RESULTS/table.md"
