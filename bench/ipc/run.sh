#!/usr/bin/env bash
# bench/ipc/run.sh: worker messaging (issue 14), clusterd against Node's cluster module.
#
# N workers (BENCH_IPC_WORKERS, 4) each send M messages (BENCH_IPC_MESSAGES, 20000) of the
# guide's shape, {"type":"status","pid":...,"n":...}, with process.send, as fast as Node's
# own backpressure allows (a send that returns false waits for its callback). The master
# forwards each message to the N-1 other workers:
#
#  - clusterd: `ipc_broadcast = true`, the worker script run directly (ipc.toml-style);
#  - Node: a cluster primary written here, doing what the guide's master does
#    (worker.on('message') → every other worker.send(msg)).
#
# Both start on a "go" message to every worker (`clusterd send`, or the primary once all are
# online). Each worker prints when it has received all (N-1)*M messages, or what it got after
# 3 s of silence (messages dropped by a full queue). Reported: messages per second through
# the master (N*M / time from the first go to the last worker done), deliveries per second,
# and the master's CPU (utime+stime from /proc) per 10k messages received.
#
# Settings: BENCH_IPC_WORKERS, BENCH_IPC_MESSAGES, BENCH_SKIP_BUILD=1, BENCH_CLUSTERD_BIN.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
N=${BENCH_IPC_WORKERS:-4}
M=${BENCH_IPC_MESSAGES:-20000}

BENCH_NAME=ipc
source "$HERE/../lib.sh"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-ipc-bench.XXXXXX")
MASTER=""
cleanup() {
    if [[ -n $MASTER ]] && kill -0 "$MASTER" 2>/dev/null; then
        kill -TERM "$MASTER" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$MASTER" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$MASTER" 2>/dev/null || true
    fi
    wait 2>/dev/null || true
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

count() { local n; n=$(grep -c -- "$2" "$1" 2>/dev/null) || true; echo "${n:-0}"; }
have() { (( $(count "$1" "$2") >= $3 )); }
cpu_ticks() { awk '{ print $14 + $15 }' "/proc/$1/stat"; }

if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    (cd "$ROOT" && cargo build --release --quiet -p clusterd) || die "cargo build failed"
fi
CLUSTERD=${BENCH_CLUSTERD_BIN:-$ROOT/target/release/clusterd}
command -v node >/dev/null || die "node is needed"
HZ=$(getconf CLK_TCK)

export IPC_N=$N IPC_M=$M

cat > "$TMP/primary.js" <<JS
const cluster = require('cluster');
cluster.setupPrimary({ exec: '$HERE/worker.js' });
const workers = [];
let online = 0;
for (let i = 0; i < $N; i++) {
  const w = cluster.fork();
  workers.push(w);
  w.on('message', (msg) => {
    if (msg === 'ready') {
      if (++online === $N) { console.log('primary ' + process.pid); workers.forEach((x) => x.send('go')); }
      return;
    }
    for (const other of workers) if (other !== w) other.send(msg);
  });
}
JS

cat > "$TMP/ipc.toml" <<TOML
[apps.web]
command = ["node", "$HERE/worker.js"]
workers = $N
ipc_broadcast = true
ready = "message"
TOML

# results: name msgs_per_s deliveries_per_s cpu_ms_per_10k delivered/expected
run_one() { # run_one NAME LOG MASTER_PID START_TICKS
    local name=$1 out=$2 pid=$3 t0=$4
    wait_until 300 have "$out" '\(done\|partial\) [0-9][0-9]* [0-9]' "$N" || die "$name: workers did not finish"
    local t1; t1=$(cpu_ticks "$pid")
    local first last got
    first=$(grep -o 'go [0-9]*' "$out" | awk '{print $2}' | sort -n | head -1)
    last=$(grep -o '\(done\|partial\) [0-9]* [0-9]*' "$out" | awk '{print $3}' | sort -n | tail -1)
    got=$(grep -o '\(done\|partial\) [0-9]*' "$out" | awk '{s += $2} END {print s}')
    local expected=$(( N * (N - 1) * M ))
    awk -v name="$name" -v n="$N" -v m="$M" -v ms=$((last - first)) -v got="$got" -v want="$expected" \
        -v cpu=$(( (t1 - t0) * 1000 / HZ )) 'BEGIN {
            printf "| %s | %d | %.0f | %.0f | %.1f | %d / %d |\n", name, n, n * m / (ms / 1000),
                got / (ms / 1000), cpu / (n * m / 10000), got, want }'
}

log "clusterd: $N workers x $M messages, ipc_broadcast"
"$CLUSTERD" start "$TMP/ipc.toml" --run-dir "$TMP/run" > "$TMP/clusterd.log" 2>&1 &
MASTER=$!
wait_until 30 have "$TMP/clusterd.log" 'ready after' "$N" || die "clusterd: workers not ready"
T0=$(cpu_ticks "$MASTER")
"$CLUSTERD" send --run-dir "$TMP/run" -f "$TMP/ipc.toml" web '"go"' >/dev/null
ROW_CD=$(run_one "clusterd (ipc_broadcast)" "$TMP/clusterd.log" "$MASTER" "$T0")
DROPPED=$("$CLUSTERD" status --json --run-dir "$TMP/run" -f "$TMP/ipc.toml" |
    grep -o '"messages_dropped": [0-9]*' | awk '{s += $2} END {print s + 0}')
kill -TERM "$MASTER"; wait "$MASTER" 2>/dev/null || true; MASTER=""

log "node cluster: $N workers x $M messages, primary forwards"
node "$TMP/primary.js" > "$TMP/node.log" 2>&1 &
MASTER=$!
wait_until 30 have "$TMP/node.log" '^primary ' 1 || die "node: primary did not start"
T0=$(cpu_ticks "$MASTER")
ROW_NODE=$(run_one "Node cluster primary" "$TMP/node.log" "$MASTER" "$T0")
kill -TERM "$MASTER"; wait "$MASTER" 2>/dev/null || true; MASTER=""

echo "| master | workers | messages/s in | deliveries/s out | master CPU ms per 10k messages | delivered / expected |"
echo "|---|---|---|---|---|---|"
echo "$ROW_CD"
echo "$ROW_NODE"
echo
echo "clusterd dropped $DROPPED messages (full per-worker queues); $(nproc) CPUs, node $(node --version)"
