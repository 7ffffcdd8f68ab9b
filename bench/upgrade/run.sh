#!/usr/bin/env bash
# bench/upgrade/run.sh: `clusterd upgrade` under HTTP load (issue 12).
#
# For each app and client mode (keep-alive, Connection: close) it starts clusterd on
# 127.0.0.1:$BENCH_PORT, runs wrk against it, upgrades clusterd in place $BENCH_UPGRADES times
# (to the same binary; every upgrade is a full check + exec + hand-over) while the load runs,
# and prints one table row: upgrades done, time from `clusterd upgrade` to the new supervisor
# answering status (median and max, as `clusterd upgrade` measures it), requests served, failed
# requests (non-2xx + socket errors), and whether clusterd's pid and every worker's pid stayed
# the same. The apps (BENCH_APPS):
#
# - hello:       4 `hello` workers on clusterd's socket (fd 3), ready = "notify";
# - intercepted: `clusterd run --workers 2 --listen ADDR -- node child.js` (the tutorial's
#                file, its port set to ADDR's): binds trapped, one steered socket per worker;
# - node-ipc:    2 Node workers on fd 3 that also talk over their channels (ipc_broadcast,
#                a message every 10 ms each) while the load and the upgrades run.
#
# Settings (environment): BENCH_PORT (21080), BENCH_UPGRADES (10), BENCH_THREADS (2),
# BENCH_CONNECTIONS (32), BENCH_WARMUP (1 s), BENCH_GAP (0.3 s between upgrades), BENCH_TAIL
# (1 s), BENCH_MODES ("keepalive close"), BENCH_APPS ("hello intercepted node-ipc"),
# BENCH_SKIP_BUILD=1 (use target/release as it is). Needs wrk, node and python3. Writes the
# table and logs to bench/results/upgrade-<UTC time>/.
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
APPS=${BENCH_APPS:-hello intercepted node-ipc}
CLUSTERD=$ROOT/target/release/clusterd
HELLO=$ROOT/target/release/hello

BENCH_NAME=upgrade
source "$HERE/../lib.sh"

# Workers of an upgraded clusterd get up to 10 s to stop.
STOP_TENTHS=100
bench_temp

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

cat >"$TMP/hello.toml" <<TOML
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

CHILD_JS=${BENCH_CHILD_JS:-$ROOT/../shared/mission-examples/child.js}
if [[ $APPS == *intercepted* ]]; then
    [[ -f $CHILD_JS ]] || die "$CHILD_JS is missing (BENCH_CHILD_JS names the tutorial's child.js)"
    sed "s/const PORT = 8001;/const PORT = $PORT;/" "$CHILD_JS" >"$TMP/child.js"
fi

cat >"$TMP/ipc-server.js" <<'JS'
// HTTP on fd 3, and a status message to the other workers every 10 ms (ipc_broadcast).
const http = require('node:http');
let heard = 0;
process.on('message', () => { heard += 1; });
http.createServer((req, res) => res.end(`heard ${heard}\n`)).listen({ fd: 3 }, () => {
  process.send('ready');
  setInterval(() => process.send({ type: 'status', pid: process.pid }), 10);
});
JS
cat >"$TMP/node-ipc.toml" <<TOML
[supervisor]
stop_timeout = "5s"
run_dir = "$TMP/run"

[sockets.http]
listen = "127.0.0.1:$PORT"

[apps.web]
command = ["node", "$TMP/ipc-server.js"]
workers = 2
sockets = ["http"]
ready = "message"
ipc_broadcast = true
TOML
# `clusterd run` keeps its run directory here; the control commands find it through this.
printf '[supervisor]\nrun_dir = "%s"\n[apps.unused]\ncommand = ["true"]\n' "$TMP/run" \
    >"$TMP/intercepted.toml"

# The manifest the control commands of the current app use.
MANIFEST=$TMP/hello.toml

# pids: clusterd's and every worker's, one line.
pids() {
    "$CLUSTERD" status --json -f "$MANIFEST" | python3 -c '
import json, sys
s = json.load(sys.stdin)
print(s["pid"], sorted(w["pid"] for a in s["apps"] for w in a["workers"] if w["pid"]))'
}

# field FILE NAME: a value of wrk's BENCH line (../reload/stats.lua).
field() { sed -n "s/.*[ ]$2=\([^ ]*\).*/\1/p" "$1" | head -1; }

run_mode() {
    local app=$1 mode=$2 header=() out=$RUN_DIR/$1-$2
    [[ $mode == close ]] && header=(-H "Connection: close")
    MANIFEST=$TMP/$app.toml
    if [[ $app == intercepted ]]; then
        (cd "$TMP" && exec "$CLUSTERD" run --run-dir "$TMP/run" --workers 2 \
            --listen "127.0.0.1:$PORT" -- node child.js) >"$out.clusterd.log" 2>&1 &
    else
        "$CLUSTERD" start "$MANIFEST" >"$out.clusterd.log" 2>&1 &
    fi
    local supervisor=$!
    PIDS+=("$supervisor")
    for _ in $(seq 400); do
        "$CLUSTERD" status --check -f "$MANIFEST" >/dev/null 2>&1 && break
        sleep 0.05
    done
    "$CLUSTERD" status --check -f "$MANIFEST" >/dev/null || die "$app: workers not ready"
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
        if "$CLUSTERD" upgrade -f "$MANIFEST" >>"$out.upgrades" 2>&1; then
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
    printf '| %-11s | %-9s | %8s | %27s | %9s | %6s | %17s | %16s |\n' "$app" "$mode" "$ok/$UPGRADES" "$times" \
        "${requests:-?}" "${failed:-?}" "$same_supervisor" "$same_workers" >>"$TABLE"
}

{
    echo "# wrk -t$THREADS -c$CONNS, $UPGRADES upgrades ${GAP} s apart per row ($(uname -r), $(nproc) CPUs)"
    echo
    echo "| app         | clients   | upgrades | to status ms (median / max) |  requests | failed | clusterd pid kept | worker pids kept |"
    echo "|-------------|-----------|----------|-----------------------------|-----------|--------|-------------------|------------------|"
} >"$TABLE"
for app in $APPS; do
    for mode in $MODES; do
        log "$app, $mode"
        run_mode "$app" "$mode"
    done
done
cat "$TABLE"
