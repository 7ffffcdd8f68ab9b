#!/usr/bin/env bash
# bench/faults/run.sh: what hostile or broken surroundings cost clusterd (issue 9).
#
# For each hostile input, clusterd's descriptor count (/proc/<pid>/fd), RSS (VmRSS), CPU time
# (utime + stime) and `clusterd status` latency (median of 5 runs, each bounded by 5 s:
# "timeout" when it does not answer) are taken before and after, and one table row printed:
#
#  1. notify fds      a worker sends 5 sd_notify datagrams with 40 descriptors each
#  2. unread output   clusterd's stdout and stderr are a FIFO nobody reads, a worker floods
#                     both (`yes`) for 3 s, then another worker is SIGKILLed: replaced?
#  3. /dev/shm FIFO   a FIFO planted under the app's kv_segment name
#  4. 120 workers     under `ulimit -Sn 256`: how many became ready
#  5. bad SIGHUP      a re-read whose second new socket cannot bind (port held by the bench)
#  6. SIGKILL+start   clusterd SIGKILLed while its workers' setsid'd children hold the port,
#                     then started again on the same manifest: does it serve?
#
# Settings (environment): BENCH_PORT (18300; the bench uses BENCH_PORT..BENCH_PORT+3),
# BENCH_SKIP_BUILD=1, BENCH_CLUSTERD_BIN, BENCH_HELLO_BIN (for A/B runs against another build).
# Writes the table to bench/results/faults-<time>/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PORT=${BENCH_PORT:-18300}

BENCH_NAME=faults
source "$HERE/../lib.sh"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-faults-bench.XXXXXX")
PIDS=()          # processes this bench started, killed by pid at exit
SHM_FIFO=""
cleanup() {
    for pid in "${PIDS[@]}"; do
        kill -KILL "$pid" 2>/dev/null || true
    done
    # The escaped sleepers of scenario 6 carry a marker of this run in their argv.
    for pid in $(pgrep -x -f "sleep 1000.$$" || true); do kill -KILL "$pid" 2>/dev/null || true; done
    [[ -n $SHM_FIFO ]] && rm -f "$SHM_FIFO"
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building clusterd and hello (release)"
    (cd "$ROOT" && cargo build --release --quiet -p clusterd -p hello) ||
        die "cargo build failed (BENCH_SKIP_BUILD=1 benches the binaries already built)"
fi
CLUSTERD=${BENCH_CLUSTERD_BIN:-$ROOT/target/release/clusterd}
HELLO=${BENCH_HELLO_BIN:-$ROOT/target/release/hello}
[[ -x $CLUSTERD && -x $HELLO ]] || die "target/release/clusterd or hello is missing"
command -v python3 >/dev/null || die "python3 is missing"
OUT=$ROOT/bench/results/faults-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$OUT"

# --- measuring ---------------------------------------------------------------------------------
fds() { find "/proc/$1/fd" -mindepth 1 -maxdepth 1 2>/dev/null | wc -l; }
rss() { awk '$1 == "VmRSS:" { printf "%.1fM", $2 / 1024 }' "/proc/$1/status"; }
cpu() { # utime + stime in seconds
    local tck; tck=$(getconf CLK_TCK)
    awk -v t="$tck" '{ sub(/.*\) /, ""); printf "%.2fs", ($12 + $13) / t }' "/proc/$1/stat"
}
# Median wall time of 5 `clusterd status` runs, each killed after 5 s ("timeout").
status_ms() {
    local manifest=$1 times=() t0 t1
    for _ in 1 2 3 4 5; do
        t0=$(date +%s%N)
        if ! timeout 5 "$CLUSTERD" status -f "$manifest" >/dev/null 2>&1; then
            echo timeout; return
        fi
        t1=$(date +%s%N)
        times+=($(( (t1 - t0) / 1000 )))
    done
    printf '%s\n' "${times[@]}" | sort -n | awk 'NR == 3 { printf "%.1fms", $1 / 1000 }'
}
snapshot() { # snapshot PID MANIFEST -> "fds rss cpu status"
    echo "$(fds "$1") $(rss "$1") $(cpu "$1") $(status_ms "$2")"
}

ROWS=()
row() { # row NAME "before" "after" RESULT
    local b a
    read -r -a b <<<"$2"; read -r -a a <<<"$3"
    ROWS+=("$(printf '%-15s %5s -> %-5s %7s -> %-7s %6s -> %-6s %8s -> %-8s %s' \
        "$1" "${b[0]}" "${a[0]}" "${b[1]}" "${a[1]}" "${b[2]}" "${a[2]}" "${b[3]}" "${a[3]}" "$4")")
    log "${ROWS[-1]}"
}

# start DIR [WRAPPER...]: clusterd start DIR/clusterd.toml, output to DIR/out.log; sets CD_PID.
start() {
    local dir=$1; shift
    (cd "$dir" && exec "$@" "$CLUSTERD" start clusterd.toml >"$dir/out.log" 2>&1) &
    CD_PID=$!
    PIDS+=("$CD_PID")
    wait_until 10 test -S "$dir/.clusterd/clusterd/control.sock"
}
stop() {
    kill -TERM "$1" 2>/dev/null || true
    wait_until 20 bash -c "! kill -0 $1 2>/dev/null" || kill -KILL "$1" 2>/dev/null || true
    wait "$1" 2>/dev/null || true
}
status_json() { timeout 5 "$CLUSTERD" status --json -f "$1" 2>/dev/null || true; }
json() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)" 2>/dev/null || true; }

# --- 1. notify fds ----------------------------------------------------------------------------
D=$TMP/notify; mkdir -p "$D"
cat >"$D/sender.py" <<EOF
#!/usr/bin/env python3
import array, os, socket, time
addr = os.environ["NOTIFY_SOCKET"]
s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
s.sendto(b"READY=1", addr)
while not os.path.exists("$D/go"):
    time.sleep(0.02)
fd = os.open("/dev/null", os.O_RDONLY)
for _ in range(5):
    s.sendmsg([b"STATUS=burst"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * 40))], 0, addr)
s.sendto(b"STATUS=sent", addr)
time.sleep(100000)
EOF
chmod +x "$D/sender.py"
printf '[apps.sender]\ncommand = ["%s/sender.py"]\nready = "notify"\n' "$D" >"$D/clusterd.toml"
start "$D" || die "clusterd did not start in $D"
sent() { status_json "$D/clusterd.toml" | json 'd["apps"][0]["workers"][0]["status_text"]' | grep -qx sent; }
ready1() { [[ $(status_json "$D/clusterd.toml" | json 'd["apps"][0]["ready"]') == 1 ]]; }
wait_until 20 ready1 || die "notify sender not ready"
before=$(snapshot "$CD_PID" "$D/clusterd.toml")
touch "$D/go"
if wait_until 20 sent; then result="200 fds received"; else result="STATUS=sent never arrived"; fi
after=$(snapshot "$CD_PID" "$D/clusterd.toml")
row "notify fds" "$before" "$after" "$result"
stop "$CD_PID"

# --- 2. unread output ---------------------------------------------------------------------------
D=$TMP/unread; mkdir -p "$D"
mkfifo "$D/out.fifo"
sleep 100000 <"$D/out.fifo" &   # holds the read end open and never reads
PIDS+=($!); disown
cat >"$D/clusterd.toml" <<EOF
[apps.flood]
command = ["sh", "-c", "while [ ! -e $D/go ]; do sleep 0.05; done; yes stderr-flood >&2 & exec yes stdout-flood"]

[apps.web]
command = ["sleep", "100000"]
EOF
(cd "$D" && exec "$CLUSTERD" start clusterd.toml >"$D/out.fifo" 2>&1) &
CD_PID=$!; PIDS+=("$CD_PID")
wait_until 10 test -S "$D/.clusterd/clusterd/control.sock" || die "clusterd did not start in $D"
web_pid() { status_json "$D/clusterd.toml" | json '[w["pid"] for a in d["apps"] if a["name"] == "web" for w in a["workers"]][0]'; }
wait_until 10 test -n "$(web_pid)" || die "no web worker"
before=$(snapshot "$CD_PID" "$D/clusterd.toml")
touch "$D/go"
sleep 3   # let the flood fill both pipes and the queues
victim=$(web_pid)
kill -KILL "$victim" 2>/dev/null || true
replaced() { local p; p=$(web_pid); [[ -n $p && $p != "$victim" ]]; }
if wait_until 10 replaced; then result="killed worker replaced"; else result="killed worker NOT replaced in 10 s"; fi
after=$(snapshot "$CD_PID" "$D/clusterd.toml")
row "unread output" "$before" "$after" "$result"
t0=$(date +%s%N)
stop "$CD_PID"
ROWS[-1]+=", SIGTERM exit in $(( ($(date +%s%N) - t0) / 1000000 ))ms"

# --- 3. /dev/shm FIFO ------------------------------------------------------------------------------
D=$TMP/shm; mkdir -p "$D"
PREFIX=clusterd-faults-bench-$$
printf '[apps.web]\ncommand = ["sleep", "100000"]\nkv_segment = "%s"\n' "$PREFIX" >"$D/clusterd.toml"
start "$D" || die "clusterd did not start in $D"
before=$(snapshot "$CD_PID" "$D/clusterd.toml")
SHM_FIFO=/dev/shm/$PREFIX-0123456789abcdef
mkfifo "$SHM_FIFO"
after=$(snapshot "$CD_PID" "$D/clusterd.toml")
row "/dev/shm FIFO" "$before" "$after" "$([[ $after == *timeout* ]] && echo "status hangs" || echo "status unaffected")"
rm -f "$SHM_FIFO"; SHM_FIFO=""
stop "$CD_PID"

# --- 4. 120 workers under ulimit -Sn 256 ----------------------------------------------------------
D=$TMP/many; mkdir -p "$D"
cat >"$D/clusterd.toml" <<'EOF'
[apps.many]
command = ["sh", "-c", "\"$CLUSTERD_EXE\" notify READY=1 && exec sleep 100000"]
workers = 120
ready = "notify"
EOF
start "$D" sh -c 'ulimit -Sn 256; exec "$@"' sh || die "clusterd did not start in $D"
before=$(snapshot "$CD_PID" "$D/clusterd.toml")
ready120() { [[ $(status_json "$D/clusterd.toml" | json 'd["apps"][0]["ready"]') == 120 ]]; }
wait_until 60 ready120 || true
after=$(snapshot "$CD_PID" "$D/clusterd.toml")
row "120 workers" "$before" "$after" "$(status_json "$D/clusterd.toml" | json 'd["apps"][0]["ready"]')/120 ready"
stop "$CD_PID"

# --- 5. a SIGHUP whose second new socket fails -------------------------------------------------------
D=$TMP/sighup; mkdir -p "$D"
printf '[apps.web]\ncommand = ["sleep", "100000"]\n' >"$D/clusterd.toml"
start "$D" || die "clusterd did not start in $D"
python3 -c "import socket,time; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1', $((PORT + 1)))); s.listen(); time.sleep(100000)" &
PIDS+=($!); disown
wait_until 10 bash -c "(exec 3<>/dev/tcp/127.0.0.1/$((PORT + 1))) 2>/dev/null" || die "port holder did not start"
before=$(snapshot "$CD_PID" "$D/clusterd.toml")
printf '[sockets.a]\nlisten = "127.0.0.1:%d"\n[sockets.b]\nlisten = "127.0.0.1:%d"\n[apps.web]\ncommand = ["sleep", "100000"]\n' \
    "$PORT" "$((PORT + 1))" >"$D/clusterd.toml"
kill -HUP "$CD_PID"
wait_until 10 grep -q "re-read rejected" "$D/out.log" || die "the bad SIGHUP was not rejected"
after=$(snapshot "$CD_PID" "$D/clusterd.toml")
if (exec 3<>"/dev/tcp/127.0.0.1/$PORT") 2>/dev/null; then result="socket a left bound"; else result="rejected, nothing bound"; fi
row "bad SIGHUP" "$before" "$after" "$result"
stop "$CD_PID"

# --- 6. SIGKILL, then start again -------------------------------------------------------------------
D=$TMP/restart; mkdir -p "$D"
cat >"$D/clusterd.toml" <<EOF
[sockets.http]
listen = "127.0.0.1:$((PORT + 2))"

[apps.web]
command = ["sh", "-c", "(setsid sleep 1000.$$ &); exec $HELLO"]
workers = 2
sockets = ["http"]
ready = "notify"
EOF
start "$D" || die "clusterd did not start in $D"
serves() { curl -fsS -o /dev/null --max-time 1 "http://127.0.0.1:$((PORT + 2))/" 2>/dev/null; }
wait_until 20 serves || die "first run does not serve"
wait_until 10 bash -c "[[ \$(pgrep -xfc 'sleep 1000.$$') == 2 ]]" || true
before=$(snapshot "$CD_PID" "$D/clusterd.toml")
kill -KILL "$CD_PID"; wait "$CD_PID" 2>/dev/null || true
t0=$(date +%s%N)
start "$D" || true
if wait_until 20 serves && kill -0 "$CD_PID" 2>/dev/null; then
    result="serves again after $(( ($(date +%s%N) - t0) / 1000000 ))ms"
    after=$(snapshot "$CD_PID" "$D/clusterd.toml")
else
    result="new start fails: $(grep -o 'cannot listen.*' "$D/out.log" | head -1)"
    after="- - - -"
fi
row "SIGKILL+start" "$before" "$after" "$result"
kill -0 "$CD_PID" 2>/dev/null && stop "$CD_PID"

# --- table -----------------------------------------------------------------------------------------
{
    echo "clusterd $("$CLUSTERD" --version | awk '{print $2}') ($(git -C "$ROOT" rev-parse --short HEAD 2>/dev/null || echo '?')), nproc $(nproc), kernel $(uname -r), load $(cut -d' ' -f1-3 /proc/loadavg)"
    printf '%-15s %14s %18s %16s %20s %s\n' "input" "fds" "rss" "cpu" "status p50" "result"
    printf '%s\n' "${ROWS[@]}"
} | tee "$OUT/table.txt"
