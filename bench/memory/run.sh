#!/usr/bin/env bash
# bench/memory/run.sh: does clusterd's memory come back after a burst? (issue 20 item 5)
#
# One clusterd runs 4 Node workers (`ipc_broadcast = true`, the worker of bench/ipc) and a
# metrics listener. Its VmRSS (from /proc/<pid>/status) is printed at the start, at the peak of
# each burst and 1 s and 5 s after it, for three bursts one after the other:
#
#  1. control: $BENCH_MEM_CONNS (2000) control connections opened at once and held for 1 s
#     (each sends half a request), then closed (those over clusterd's cap are refused);
#  2. metrics: 64 scrapers (the connection cap) at once, $BENCH_MEM_SCRAPES (20) scrapes each;
#  3. ipc: every worker sends $BENCH_MEM_MESSAGES (20000) messages, each forwarded to the 3
#     others (60k deliveries per worker); also its time, as messages per second.
#
# Then 50 `status` round trips (python, as in bench/status) for the daemon's latency.
# Run it once per allocator build (BENCH_CLUSTERD_BIN) to compare them.
#
# Settings: BENCH_PORT (18095, the metrics listener), BENCH_MEM_CONNS, BENCH_MEM_SCRAPES,
# BENCH_MEM_MESSAGES, BENCH_SKIP_BUILD=1, BENCH_CLUSTERD_BIN. Needs python3 and node.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PORT=${BENCH_PORT:-18095}
CONNS=${BENCH_MEM_CONNS:-2000}
SCRAPES=${BENCH_MEM_SCRAPES:-20}
M=${BENCH_MEM_MESSAGES:-20000}
N=4

BENCH_NAME=memory
source "$HERE/../lib.sh"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-memory-bench.XXXXXX")
CD_PID=""
cleanup() {
    if [[ -n $CD_PID ]] && kill -0 "$CD_PID" 2>/dev/null; then
        kill -TERM "$CD_PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$CD_PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$CD_PID" 2>/dev/null || true
        wait "$CD_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

count() { local n; n=$(grep -c -- "$2" "$1" 2>/dev/null) || true; echo "${n:-0}"; }
have() { (( $(count "$1" "$2") >= $3 )); }
rss_kb() { awk '$1 == "VmRSS:" { print $2 }' "/proc/$CD_PID/status"; }
mb() { awk "BEGIN { printf \"%.1f\", $1 / 1024 }"; }

command -v python3 >/dev/null || die "python3 is needed"
command -v node >/dev/null || die "node is needed"
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release --quiet -p clusterd) || die "cargo build failed"
fi
CLUSTERD=${BENCH_CLUSTERD_BIN:-$ROOT/target/release/clusterd}
[[ -x $CLUSTERD ]] || die "$CLUSTERD is missing"

# The worker of bench/ipc, for a burst of messages.
export IPC_N=$N IPC_M=$M
cat > "$TMP/memory.toml" <<TOML
[metrics]
listen = "127.0.0.1:$PORT"

[apps.web]
command = ["node", "$HERE/../ipc/worker.js"]
workers = $N
ipc_broadcast = true
ready = "message"
TOML

"$CLUSTERD" start "$TMP/memory.toml" --run-dir "$TMP/run" >"$TMP/clusterd.log" 2>&1 &
CD_PID=$!
wait_until 30 have "$TMP/clusterd.log" 'ready after' "$N" || die "the workers did not get ready"
SOCK=$TMP/run/control.sock
"$CLUSTERD" status --run-dir "$TMP/run" -f "$TMP/memory.toml" >/dev/null # touched once
sleep 1
START=$(rss_kb)

printf '%-10s %9s %9s %9s %9s  %s\n' burst start peak "+1 s" "+5 s" "(VmRSS, MB)" >"$TMP/table"
# after NAME PEAK_KB: waits and prints the row.
after() {
    sleep 1
    local one; one=$(rss_kb)
    sleep 4
    local five; five=$(rss_kb)
    printf '%-10s %9s %9s %9s %9s  %s\n' "$1" "$(mb "$START")" "$(mb "$2")" "$(mb "$one")" \
        "$(mb "$five")" "${3:-}" >>"$TMP/table"
}

# 1. Control connections held, then closed. The peak is read while they are held.
log "control: $CONNS connections"
python3 - "$SOCK" "$CONNS" "$CD_PID" >"$TMP/peak" <<'PY'
import socket, sys, time
path, n, pid = sys.argv[1], int(sys.argv[2]), sys.argv[3]
held = []
for _ in range(n):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    try:
        s.sendall(b'{"v":1,')
    except OSError:
        pass # over clusterd's cap: answered "busy" and closed
    held.append(s)
time.sleep(1)
rss = [l.split()[1] for l in open("/proc/%s/status" % pid) if l.startswith("VmRSS:")][0]
for s in held:
    s.close()
print(rss)
PY
after control "$(cat "$TMP/peak")" "$CONNS connections"

# 2. Metrics scrapes, 64 at once.
log "metrics: 64 x $SCRAPES scrapes"
python3 - "$PORT" "$SCRAPES" "$CD_PID" >"$TMP/peak" <<'PY'
import http.client, sys, threading
port, n, pid = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
peak = [0]
def rss():
    return int([l.split()[1] for l in open("/proc/%s/status" % pid) if l.startswith("VmRSS:")][0])
def scraper():
    for _ in range(n):
        c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
        c.request("GET", "/metrics")
        c.getresponse().read()
        c.close()
        peak[0] = max(peak[0], rss())
threads = [threading.Thread(target=scraper) for _ in range(64)]
for t in threads: t.start()
for t in threads: t.join()
print(peak[0])
PY
after metrics "$(cat "$TMP/peak")" "64 x $SCRAPES scrapes"

# 3. ipc: every worker floods the others.
log "ipc: $N workers x $M messages, broadcast"
: >"$TMP/peak.ipc"
( peak=0; while kill -0 "$CD_PID" 2>/dev/null && [[ ! -e $TMP/ipc.done ]]; do
      r=$(rss_kb); (( r > peak )) && peak=$r && echo "$peak" >"$TMP/peak.ipc"; sleep 0.05
  done ) &
SAMPLER=$!
"$CLUSTERD" send --run-dir "$TMP/run" -f "$TMP/memory.toml" web '"go"' >/dev/null
wait_until 300 have "$TMP/clusterd.log" '\(done\|partial\) [0-9][0-9]* [0-9]' "$N" ||
    die "the workers did not finish"
touch "$TMP/ipc.done"; wait "$SAMPLER" || true
first=$(grep -o 'go [0-9]*' "$TMP/clusterd.log" | awk '{print $2}' | sort -n | head -1)
last=$(grep -o '\(done\|partial\) [0-9]* [0-9]*' "$TMP/clusterd.log" | awk '{print $3}' | sort -n | tail -1)
rate=$(awk -v m=$((N * M)) -v ms=$((last - first)) 'BEGIN { printf "%.0f", m / (ms / 1000) }')
after ipc "$(cat "$TMP/peak.ipc")" "$N x $M messages, $rate messages/s"

# 4. The status round trip, for the allocator's cost on the daemon's own work.
python3 - "$SOCK" >>"$TMP/table" <<'PY'
import socket, sys, time
path = sys.argv[1]
def once():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.connect(path)
    s.sendall(b'{"v":1,"cmd":"status"}\n')
    while s.recv(65536):
        pass
    s.close()
for _ in range(5):
    once()
times = []
for _ in range(50):
    t0 = time.perf_counter_ns(); once(); times.append((time.perf_counter_ns() - t0) / 1e6)
times.sort()
print("status round trip: p50 %.2f ms, p99 %.2f ms" % (times[25], times[49]))
PY

echo "# clusterd memory bench, $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), load $(cut -d' ' -f1 /proc/loadavg), $(basename "$CLUSTERD") $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
cat "$TMP/table"
