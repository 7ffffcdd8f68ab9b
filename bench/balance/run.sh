#!/usr/bin/env bash
# bench/balance/run.sh: balanced accept (issue 20, item 6). A CPU-bound Node app
# (bench/balance/server.js: BUSY_MS, default 1.5 ms, of CPU per request), 2 workers, under:
#   - clusterd, balance = "shared" (one accept queue for both workers: the old default),
#   - clusterd, the default (a steered socket per worker, balance = "random"),
#   - PM2 cluster mode (`pm2 start server.js -i 2`: Node's cluster module, the master accepts),
#   - circus (2 processes sharing one socket it binds, `use_sockets`), when pip installs it.
# For each: wrk with BENCH_CONNECTIONS (64) keep-alive connections (p50, p99, rps), then with
# `Connection: close` (rps, p99), BENCH_SECONDS (10) each.
#
# Settings: BENCH_PORT (18090; circus also uses the next three for its endpoints),
# BENCH_SECONDS, BENCH_CONNECTIONS, BENCH_THREADS (2), BUSY_MS, BENCH_SKIP_BUILD=1,
# BENCH_SETUPS ("shared steered pm2 circus"), BENCH_NICE (a niceness for the servers and wrk,
# e.g. -10 on a machine busy with other work; default: none). Installs wrk (apt-get), PM2 (npm) and circus
# (pip, in a venv) under bench/.tools when missing.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS=$ROOT/bench/.tools
PORT=${BENCH_PORT:-18090}
SECS=${BENCH_SECONDS:-10}
CONNS=${BENCH_CONNECTIONS:-64}
THREADS=${BENCH_THREADS:-2}
SETUPS=${BENCH_SETUPS:-shared steered pm2 circus}
export BUSY_MS=${BUSY_MS:-1.5}
URL="http://127.0.0.1:$PORT/"
NICE=()
[[ -n ${BENCH_NICE:-} ]] && NICE=(nice -n "$BENCH_NICE")

log() { printf '[balance-bench] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }

TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-balance-bench.XXXXXX")
PIDS=()
PM2_STARTED=0
cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ $PM2_STARTED == 1 ]]; then pm2 kill >/dev/null 2>&1 || true; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

wait_until() { # wait_until SECONDS COMMAND...
    local deadline=$(( $(date +%s%N) + $1 * 1000000000 )); shift
    until "$@"; do (( $(date +%s%N) < deadline )) || return 1; sleep 0.05; done
}
port_free() { ! (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; }
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
if ! command -v wrk >/dev/null; then
    [[ $(id -u) == 0 ]] || die "wrk is missing: apt-get install wrk (as root)"
    apt-get install -y wrk >/dev/null 2>&1 || { apt-get update >/dev/null && apt-get install -y wrk >/dev/null; }
fi
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
wrk_run() { # wrk_run MODE OUT
    local header=()
    [[ $1 == close ]] && header=(-H "Connection: close")
    "${NICE[@]}" wrk -t"$THREADS" -c"$CONNS" -d"$SECS"s --latency "${header[@]}" "$URL" >"$2" 2>&1 || true
}
rps() { awk '/Requests\/sec/ {printf "%d", $2}' "$1"; }
pct() { awk -v p="$2" '$1 == p {print $2}' "$1"; }
errors() { # non-2xx + socket errors
    awk '/Non-2xx/ {n += $NF} /Socket errors/ {gsub(/[a-z:,]/, " "); n += $1 + $2 + $3 + $4} END {print n + 0}' "$1"
}

# The keep-alive connections each worker holds ("33/31"): the established connections to
# PORT (/proc/net/tcp, local port PORT, state 01) whose inode is an fd of a server.js process.
spread() {
    local port_hex inodes pid counts=()
    port_hex=$(printf '%04X' "$PORT")
    inodes=$(awk -v p=":$port_hex" 'NR > 1 && $4 == "01" && substr($2, length($2) - 4) == p {print "socket:[" $10 "]"}' /proc/net/tcp /proc/net/tcp6 | sort -u)
    for pid in $(pgrep -f "$HERE/server.js" || true); do
        counts+=("$(find "/proc/$pid/fd" -maxdepth 1 -type l -printf '%l\n' 2>/dev/null | grep -cxF "$inodes" || true)")
    done
    (IFS=/; echo "${counts[*]}")
}

ROWS=()
measure() { # measure LABEL: one row
    local ka=$TMP/ka.txt cl=$TMP/close.txt share
    wrk_run keepalive "$ka" &
    local wrk_pid=$!
    sleep "$(( SECS / 2 ))"
    share=$(spread)
    wait "$wrk_pid"
    wrk_run close "$cl"
    cp "$ka" "$RESULTS/$2-keepalive.txt"; cp "$cl" "$RESULTS/$2-close.txt"
    ROWS+=("| $1 | $share | $(pct "$ka" 50%) | $(pct "$ka" 99%) | $(rps "$ka") | $(rps "$cl") | $(pct "$cl" 99%) | $(( $(errors "$ka") + $(errors "$cl") )) |")
    log "${ROWS[-1]}"
}

RESULTS=$ROOT/bench/results/balance-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RESULTS"

clusterd_setup() { # clusterd_setup LABEL NAME BALANCE_LINE
    log "clusterd: $1"
    mkdir -p "$TMP/$2"
    cat >"$TMP/$2/app.toml" <<EOT
[supervisor]
run_dir = "$TMP/$2/run"
stop_timeout = "5s"

[sockets.http]
listen = "127.0.0.1:$PORT"

[apps.web]
command = ["node", "$HERE/server.js"]
workers = 2
sockets = ["http"]
ipc = false
$3
EOT
    "${NICE[@]}" "$CLUSTERD" start "$TMP/$2/app.toml" >"$RESULTS/$2-clusterd.log" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    wait_until 30 two_serve || die "clusterd ($2) did not serve from 2 workers"
    measure "$1" "$2"
    stop_pid "$pid"
    wait_until 10 port_free || die "port still busy after clusterd ($2)"
}

for setup in $SETUPS; do
    case $setup in
    shared) clusterd_setup 'clusterd, balance = "shared" (one queue, the old default)' shared 'balance = "shared"' ;;
    steered) clusterd_setup 'clusterd, default (a steered socket per worker)' steered '' ;;
    pm2)
        log "pm2 start server.js -i 2"
        PM2_STARTED=1
        PORT=$PORT pm2 start "$HERE/server.js" -i 2 --name web >"$RESULTS/pm2.log" 2>&1
        wait_until 30 two_serve || die "PM2 did not serve from 2 workers"
        measure "pm2 start -i 2 (cluster mode)" pm2
        pm2 kill >/dev/null 2>&1 || true
        PM2_STARTED=0
        wait_until 10 port_free || die "port still busy after PM2"
        ;;
    circus)
        if [[ ! -x $CIRCUS ]]; then
            ROWS+=("| circus | not installable here | | | | | | |")
            continue
        fi
        log "circus, 2 processes on one shared socket"
        cat >"$TMP/circus.ini" <<EOT
[circus]
endpoint = tcp://127.0.0.1:$((PORT + 1))
pubsub_endpoint = tcp://127.0.0.1:$((PORT + 2))
stats_endpoint = tcp://127.0.0.1:$((PORT + 3))
statsd = False

[watcher:web]
cmd = node $HERE/server.js --fd \$(circus.sockets.web)
numprocesses = 2
use_sockets = True
copy_env = True

[socket:web]
host = 127.0.0.1
port = $PORT
EOT
        "${NICE[@]}" "$CIRCUS" "$TMP/circus.ini" >"$RESULTS/circus.log" 2>&1 &
        CPID=$!
        PIDS+=("$CPID")
        wait_until 30 two_serve || die "circus did not serve from 2 workers"
        measure "circus (2 processes, one shared socket)" circus
        stop_pid "$CPID"
        wait_until 10 port_free || die "port still busy after circus"
        ;;
    *) die "unknown setup $setup" ;;
    esac
done

{
    echo "nproc $(nproc), kernel $(uname -r), node $(node --version), $(wrk --version 2>&1 | head -1 | cut -d' ' -f1-2), load average $(cut -d' ' -f1-3 /proc/loadavg)"
    echo "BUSY_MS=$BUSY_MS, wrk -t$THREADS -c$CONNS, ${SECS}s per run${BENCH_NICE:+, nice $BENCH_NICE}"
    echo
    echo "| setup | keep-alive connections per worker | p50 keep-alive | p99 keep-alive | rps keep-alive | rps close | p99 close | errors |"
    echo "|---|---|---|---|---|---|---|---|"
    printf '%s\n' "${ROWS[@]}"
} | tee "$RESULTS/table.md"
