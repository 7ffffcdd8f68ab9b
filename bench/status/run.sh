#!/usr/bin/env bash
# bench/status/run.sh: `clusterd status` latency and the supervisor's own memory (issue 4).
#
# Targets: `clusterd status` answers in under 10 ms with 64 workers; clusterd's RSS stays under
# 10 MB with 16 workers (PM2's God Daemon is ~50 MB).
#
#  1. clusterd with 64 `hello` workers (real HTTP workers on one shared socket, ready = "notify",
#     so status has real processes to read CPU and memory from): once all are ready, times
#     $BENCH_STATUS_RUNS runs of `clusterd status --json MANIFEST` (wall clock of the whole
#     command, fork/exec included, measured with date +%s%N) after 5 warm-up runs; prints the
#     median, p95 and max, and clusterd's VmRSS/VmHWM from /proc/<pid>/status.
#  1b. clusterd with 128 `hello` workers: the daemon's status round trip alone (python, as in 1)
#     with no extra processes, then with $BENCH_STATUS_HOST_PROCS (5000) unrelated sleeping
#     processes on the host (issue 20: status must not grow with the host), and with those
#     $BENCH_STATUS_FRESH_RUNS (10) times 1.1 s apart (clusterd measures its workers at most
#     once a second: each of these is a new measurement). Run it once with
#     BENCH_CLUSTERD_BIN set to an older clusterd for the "before".
#  2. clusterd with 16 `hello` workers, then with 16 workers of examples/node/server.js:
#     clusterd's VmRSS and VmHWM.
#  3. PM2 (cluster mode, `pm2 start server.js -i 16`, private PM2_HOME) on the same Node app:
#     the God Daemon's VmRSS and VmHWM, and the time of `pm2 jlist` (PM2's status) for contrast.
#
# Settings (environment): BENCH_PORT (18090), BENCH_STATUS_RUNS (50), BENCH_PM2_RUNS (10),
# BENCH_STATUS_HOST_PROCS (5000), BENCH_STATUS_FRESH_RUNS (10), BENCH_READY_WAIT (60 s for the workers to be ready),
# BENCH_SKIP_BUILD=1, BENCH_CLUSTERD_BIN, BENCH_HELLO_BIN, BENCH_NODE_APP, BENCH_SKIP_PM2=1.
# Installs PM2 under bench/.tools when missing. Writes the table to bench/results/status-<time>/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS=$ROOT/bench/.tools
PORT=${BENCH_PORT:-18090}
RUNS=${BENCH_STATUS_RUNS:-50}
PM2_RUNS=${BENCH_PM2_RUNS:-10}
HOST_PROCS=${BENCH_STATUS_HOST_PROCS:-5000}
FRESH_RUNS=${BENCH_STATUS_FRESH_RUNS:-10}

BENCH_NAME=status
source "$HERE/../lib.sh"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-status-bench.XXXXXX")
CD_PID=""
PM2_STARTED=0
CROWD_PID="" # leader of the process group of unrelated sleepers (step 1b)
stop_crowd() {
    if [[ -n $CROWD_PID ]]; then
        kill -KILL -- "-$CROWD_PID" 2>/dev/null || true
        wait "$CROWD_PID" 2>/dev/null || true
        CROWD_PID=""
    fi
}
cleanup() {
    stop_crowd
    if [[ -n $CD_PID ]] && kill -0 "$CD_PID" 2>/dev/null; then
        kill -TERM "$CD_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$CD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$CD_PID" 2>/dev/null || true
        wait "$CD_PID" 2>/dev/null || true
    fi
    if [[ $PM2_STARTED == 1 ]]; then pm2_kill; fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

http_ok() { curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$PORT/" 2>/dev/null; }
count_lines() { local n; n=$(grep -c -- "$2" "$1" 2>/dev/null) || true; echo "${n:-0}"; }
rss_kb() { awk -v k="$2:" '$1 == k { print $2 }' "/proc/$1/status"; }
mb() { awk "BEGIN { printf \"%.1f MB\", $1 / 1024 }"; }

# --- tools, binaries ---------------------------------------------------------------------------
NODE=$(command -v node || true)
NODE_APP_DIR=${BENCH_NODE_APP:-$ROOT/examples/node}
command -v curl >/dev/null || die "curl is missing"
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building clusterd and hello (release)"
    (cd "$ROOT" && cargo build --release --quiet -p clusterd -p hello) ||
        die "cargo build failed (BENCH_SKIP_BUILD=1 benches the binaries already built)"
fi
CLUSTERD=${BENCH_CLUSTERD_BIN:-$ROOT/target/release/clusterd}
HELLO=${BENCH_HELLO_BIN:-$ROOT/target/release/hello}
[[ -x $CLUSTERD && -x $HELLO ]] || die "target/release/clusterd or hello is missing"
WITH_NODE=1
if [[ -z $NODE || ! -f $NODE_APP_DIR/server.js ]]; then
    WITH_NODE=0
    log "node or $NODE_APP_DIR/server.js missing: skipping the Node and PM2 rows"
fi
WITH_PM2=$WITH_NODE
[[ ${BENCH_SKIP_PM2:-0} == 1 ]] && WITH_PM2=0
PM2=$TOOLS/node_modules/.bin/pm2
if [[ $WITH_PM2 == 1 && ! -x $PM2 ]]; then
    log "installing pm2 under bench/.tools"
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error pm2 >/dev/null
fi

# --- clusterd ----------------------------------------------------------------------------------
# start_clusterd NAME WORKERS COMMAND...: runs a manifest and waits until every worker is ready.
start_clusterd() {
    local name=$1 workers=$2 arg cmd=""; shift 2
    for arg in "$@"; do cmd+="${cmd:+, }\"$arg\""; done
    MANIFEST=$TMP/$name.toml
    CD_LOG=$TMP/$name.log
    cat >"$MANIFEST" <<EOF
[supervisor]
stop_timeout = "10s"
run_dir = "$TMP/run-$name"

[sockets.http]
listen = "127.0.0.1:$PORT"

[apps.web]
command = [$cmd]
workers = $workers
sockets = ["http"]
ready = "notify"
ready_timeout = "30s"
EOF
    wait_until 10 port_free || die "127.0.0.1:$PORT is busy"
    "$CLUSTERD" start "$MANIFEST" >"$CD_LOG" 2>&1 &
    CD_PID=$!
    wait_until "${BENCH_READY_WAIT:-60}" eval '(( $(count_lines "$CD_LOG" ") ready after") >= workers ))' ||
        { tail -20 "$CD_LOG" >&2; die "clusterd did not get $workers workers ready"; }
    wait_until 10 http_ok || die "no HTTP answer on 127.0.0.1:$PORT"
    sleep 1 # let the start-up settle before measuring memory
}
stop_clusterd() {
    kill -TERM "$CD_PID"
    local rc=0
    wait "$CD_PID" || rc=$?
    CD_PID=""
    [[ $rc == 0 ]] || log "warning: clusterd exited with status $rc on SIGTERM"
}

# time_runs N COMMAND...: runs COMMAND N times (after up to 5 warm-up runs); sets MED, P95
# and MAX in ms. Fails if a run fails. (Runs in this shell, not in a pipe or a process
# substitution, so that a signal to the script stops it too.)
time_runs() {
    local n=$1 i t0 t1; shift
    for ((i = 0; i < (n < 5 ? n : 5); i++)); do "$@" >/dev/null; done
    : >"$TMP/times"
    for ((i = 0; i < n; i++)); do
        t0=$(date +%s%N)
        "$@" >/dev/null
        t1=$(date +%s%N)
        echo $(( (t1 - t0) / 1000 )) >>"$TMP/times"
    done
    sort -n "$TMP/times" | awk '{ v[NR] = $1 } END {
        med = (NR % 2) ? v[(NR + 1) / 2] : (v[NR / 2] + v[NR / 2 + 1]) / 2
        p95 = v[int(NR * 0.95 + 0.999999)]
        printf "%.2f %.2f %.2f\n", med / 1000, p95 / 1000, v[NR] / 1000 }' >"$TMP/stats"
    read -r MED P95 MAX <"$TMP/stats"
}

# control_round_trips SOCKET N [PAUSE]: the daemon's side alone: connect, send a status
# request, read the reply to EOF, N times in one python3 process (after 5 warm-up runs), PAUSE
# seconds (0) before each; sets MED, P95, MAX.
control_round_trips() {
    python3 - "$1" "$2" "${3:-0}" >"$TMP/stats" <<'PY'
import socket, sys, time
path, n, pause = sys.argv[1], int(sys.argv[2]), float(sys.argv[3])
def once():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b'{"v":1,"cmd":"status"}\n')
    data = b""
    while True:
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    if b'"reply":"status"' not in data.replace(b" ", b""):
        sys.exit("unexpected reply: %r" % data[:200])
for _ in range(5):
    once()
times = []
for _ in range(n):
    time.sleep(pause)
    t0 = time.perf_counter_ns(); once(); times.append((time.perf_counter_ns() - t0) / 1e6)
times.sort()
med = (times[(n - 1) // 2] + times[n // 2]) / 2
p95 = times[min(n - 1, -(-95 * n // 100) - 1)]
print("%.2f %.2f %.2f" % (med, p95, times[-1]))
PY
    read -r MED P95 MAX <"$TMP/stats"
}

# --- PM2 ---------------------------------------------------------------------------------------
pm2() { PM2_HOME=$TMP/pm2 "$PM2" "$@"; }
pm2_kill() {
    pm2 kill >/dev/null 2>&1 || true
    local pid
    pid=$(cat "$TMP/pm2/pm2.pid" 2>/dev/null || true)
    if [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null; then kill -KILL "$pid" 2>/dev/null || true; fi
    PM2_STARTED=0
}
pm2_online() { # number of processes PM2 reports online (0 when it cannot tell)
    local n
    n=$(pm2 jlist 2>/dev/null | "$NODE" -e '
        let s = ""; process.stdin.on("data", d => s += d).on("end", () => {
            let n = 0; try { for (const p of JSON.parse(s)) if (p.pm2_env.status === "online") n++; } catch (e) {}
            console.log(n); });' 2>/dev/null || true)
    echo "${n:-0}"
}

# --- main --------------------------------------------------------------------------------------
STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/bench/results/status-$STAMP
mkdir -p "$OUT"
TABLE=$OUT/table.txt
{
    echo "# clusterd status/memory bench, $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), kernel $(uname -r), commit $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "# status: wall time of the whole command (fork/exec included), $RUNS runs after 5 warm-up runs"
    printf '%-38s %9s %9s %9s  %-11s %s\n' measurement median p95 max VmRSS VmHWM
} >"$TABLE"
row() { printf '%-38s %9s %9s %9s  %-11s %s\n' "$@" >>"$TABLE"; }

# 1. 64 workers: status latency.
log "clusterd with 64 hello workers"
start_clusterd hello64 64 "$HELLO"
status_json=$("$CLUSTERD" status --json "$MANIFEST" 2>"$TMP/status.err") && status_rc=0 || status_rc=$?
if [[ $status_rc == 0 ]]; then
    ready=$(printf '%s' "$status_json" | grep -o '"state": *"ready"' | wc -l)
    ((ready >= 64)) || log "warning: status --json shows $ready ready workers, expected 64"
    time_runs "$RUNS" "$CLUSTERD" status --json "$MANIFEST"
    row "clusterd status --json, 64 workers" "${MED}ms" "${P95}ms" "${MAX}ms" \
        "$(mb "$(rss_kb "$CD_PID" VmRSS)")" "$(mb "$(rss_kb "$CD_PID" VmHWM)")"
    time_runs "$RUNS" "$CLUSTERD" status "$MANIFEST"
    row "clusterd status (table), 64 workers" "${MED}ms" "${P95}ms" "${MAX}ms" "" ""
    time_runs "$RUNS" "$CLUSTERD" --version
    row "clusterd --version (exec baseline)" "${MED}ms" "${P95}ms" "${MAX}ms" "" ""
    if command -v python3 >/dev/null; then
        control_round_trips "$TMP/run-hello64/control.sock" "$RUNS"
        row "  daemon round trip alone (python)" "${MED}ms" "${P95}ms" "${MAX}ms" "" ""
    fi
    "$CLUSTERD" status "$MANIFEST" >"$OUT/status-64.txt" 2>&1 || true
else
    log "clusterd status --json failed (status $status_rc): $(head -3 "$TMP/status.err")"
    row "clusterd status: NOT AVAILABLE" "-" "-" "-" \
        "$(mb "$(rss_kb "$CD_PID" VmRSS)")" "$(mb "$(rss_kb "$CD_PID" VmHWM)")"
    echo "(clusterd status --json failed with status $status_rc: $(head -1 "$TMP/status.err"))" >>"$TABLE"
fi
stop_clusterd

# 1b. 128 workers, with and without thousands of unrelated processes on the host.
if command -v python3 >/dev/null; then
    log "clusterd with 128 hello workers"
    start_clusterd hello128 128 "$HELLO"
    procs() { find /proc -maxdepth 1 -name '[0-9]*' | wc -l; }
    control_round_trips "$TMP/run-hello128/control.sock" "$RUNS"
    row "  round trip, 128 workers, $(procs) procs" "${MED}ms" "${P95}ms" "${MAX}ms" \
        "$(mb "$(rss_kb "$CD_PID" VmRSS)")" ""
    log "starting $HOST_PROCS unrelated sleeping processes"
    setsid bash -c "for ((i = 0; i < $HOST_PROCS; i++)); do sleep 3600 & done; echo up; wait" \
        >"$TMP/crowd.out" &
    CROWD_PID=$!
    wait_until 120 eval '[[ -s $TMP/crowd.out ]]' || die "the sleepers did not start"
    control_round_trips "$TMP/run-hello128/control.sock" "$RUNS"
    row "  round trip, 128 workers, $(procs) procs" "${MED}ms" "${P95}ms" "${MAX}ms" \
        "$(mb "$(rss_kb "$CD_PID" VmRSS)")" ""
    # Each 1.1 s after the last: a new measurement of the workers every time.
    control_round_trips "$TMP/run-hello128/control.sock" "$FRESH_RUNS" 1.1
    row "  same, 1.1 s apart ($FRESH_RUNS runs)" "${MED}ms" "${P95}ms" "${MAX}ms" "" ""
    stop_crowd
    stop_clusterd
fi

# 2. 16 workers: clusterd's memory.
log "clusterd with 16 hello workers"
start_clusterd hello16 16 "$HELLO"
"$CLUSTERD" status --json "$MANIFEST" >/dev/null 2>&1 || true # the control path touched once
row "clusterd RSS, 16 hello workers" "" "" "" \
    "$(mb "$(rss_kb "$CD_PID" VmRSS)")" "$(mb "$(rss_kb "$CD_PID" VmHWM)")"
stop_clusterd
if [[ $WITH_NODE == 1 ]]; then
    log "clusterd with 16 node workers"
    start_clusterd node16 16 "$NODE" "$NODE_APP_DIR/server.js"
    "$CLUSTERD" status --json "$MANIFEST" >/dev/null 2>&1 || true
    row "clusterd RSS, 16 node workers" "" "" "" \
        "$(mb "$(rss_kb "$CD_PID" VmRSS)")" "$(mb "$(rss_kb "$CD_PID" VmHWM)")"
    stop_clusterd
fi

# 3. PM2 with 16 workers of the same Node app.
if [[ $WITH_PM2 == 1 ]]; then
    log "PM2 with 16 node workers"
    wait_until 10 port_free || die "127.0.0.1:$PORT is busy"
    PM2_STARTED=1
    (cd "$NODE_APP_DIR" && PORT=$PORT pm2 start server.js -i 16 --name web >"$TMP/pm2-start.out" 2>&1) ||
        { cat "$TMP/pm2-start.out" >&2; die "pm2 start failed"; }
    wait_until 60 eval '(( $(pm2_online) >= 16 )) && http_ok' || die "PM2 workers did not come up"
    sleep 1
    daemon=$(cat "$TMP/pm2/pm2.pid")
    grep -q 'God Daemon' "/proc/$daemon/cmdline" || log "warning: pid $daemon is not PM2's God Daemon?"
    rss=$(mb "$(rss_kb "$daemon" VmRSS)") hwm=$(mb "$(rss_kb "$daemon" VmHWM)")
    time_runs "$PM2_RUNS" pm2 jlist
    row "pm2 $(pm2 --version 2>/dev/null | tail -1) God Daemon, 16 node workers" "" "" "" "$rss" "$hwm"
    row "pm2 jlist ($PM2_RUNS runs), 16 workers" "${MED}ms" "${P95}ms" "${MAX}ms" "" ""
    pm2_kill
fi

echo
cat "$TABLE"
log "table: ${OUT#"$ROOT"/}"
