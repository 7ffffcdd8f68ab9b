#!/usr/bin/env bash
# bench/nodelay/run.sh: `uvicorn --fd 3` keep-alive latency behind a clusterd socket vs on its
# own port (issue 19 item 2).
#
# uvicorn takes an inherited fd for a unix socket, so asyncio never sets TCP_NODELAY on the
# connections it accepts there: headers and body, written separately, meet Nagle and the
# client's delayed ACK unless the listener already had TCP_NODELAY (Linux copies it to every
# accepted connection). Rows, each `wrk -t1 -c$BENCH_CONNECTIONS` keep-alive for
# $BENCH_SECONDS against a one-worker uvicorn serving a tiny ASGI app:
#
# - uvicorn own port:           `uvicorn --port`, no clusterd;
# - clusterd (default):         `uvicorn --fd 3` on `[sockets.http]` as the manifest's default;
# - clusterd tcp_nodelay=false: the same with the option turned off.
#
# Settings (environment): BENCH_PORT (31080), BENCH_SECONDS (5), BENCH_CONNECTIONS (1),
# BENCH_SKIP_BUILD=1 (use target/release as it is), BENCH_CLUSTERD_BIN (another clusterd; it
# only holds the listener, so a debug build measures the same). Installs uvicorn with pip into
# bench/.tools/uvicorn (a venv) and wrk from Debian's packages when missing. Writes the table
# and logs to bench/results/nodelay-<UTC time>/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PORT=${BENCH_PORT:-31080}
SECONDS_=${BENCH_SECONDS:-5}
CONNS=${BENCH_CONNECTIONS:-1}
CLUSTERD=${BENCH_CLUSTERD_BIN:-$ROOT/target/release/clusterd}
VENV=$ROOT/bench/.tools/uvicorn
RESULTS=$ROOT/bench/results/nodelay-$(date -u +%Y%m%dT%H%M%SZ)

BENCH_NAME=nodelay
source "$HERE/../lib.sh"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-nodelay-bench.XXXXXX")
PID=
cleanup() {
    if [ -n "$PID" ]; then
        kill -TERM "$PID" 2>/dev/null || true
        for _ in $(seq 100); do kill -0 "$PID" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT

command -v wrk >/dev/null || { log "installing wrk"; apt-get install -y wrk >/dev/null; }
if [ ! -x "$VENV/bin/uvicorn" ]; then
    log "installing uvicorn into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install -q uvicorn
fi
if [ -z "${BENCH_SKIP_BUILD:-}" ] && [ -z "${BENCH_CLUSTERD_BIN:-}" ]; then
    (cd "$ROOT" && cargo build --release -q -p clusterd)
fi
mkdir -p "$RESULTS"

cat > "$TMP/app.py" <<'PY'
async def app(scope, receive, send):
    if scope["type"] != "http":
        return
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain"), (b"content-length", b"3")]})
    await send({"type": "http.response.body", "body": b"ok\n"})
PY

# Waits until 127.0.0.1:$PORT answers.
wait_up() {
    for _ in $(seq 300); do
        curl -fs "http://127.0.0.1:$PORT/" >/dev/null 2>&1 && return 0
        sleep 0.1
    done
    log "nothing answers on $PORT"; return 1
}

# One row: wrk's average latency and requests/s.
measure() {
    local name=$1 out
    out=$(wrk -t1 -c"$CONNS" -d"${SECONDS_}s" "http://127.0.0.1:$PORT/")
    printf '%s\n' "$out" >"$RESULTS/$(echo "$name" | tr -c 'a-z0-9\n' '-').wrk"
    printf '%-28s %10s %10s\n' "$name" \
        "$(awk '/Latency/ {print $2}' <<<"$out")" "$(awk '/Requests\/sec/ {print $2}' <<<"$out")"
}

stop() {
    kill -TERM "$PID" 2>/dev/null || true
    wait "$PID" 2>/dev/null || true
    PID=
}

{
    printf '%-28s %10s %10s\n' "setup" "avg lat" "req/s"
    (cd "$TMP" && exec "$VENV/bin/uvicorn" --no-access-log --host 127.0.0.1 --port "$PORT" app:app) \
        >"$RESULTS/own-port.log" 2>&1 &
    PID=$!
    wait_up
    measure "uvicorn own port"
    stop
    for nodelay in default false; do
        option=
        [ "$nodelay" = false ] && option="tcp_nodelay = false"
        cat >"$TMP/supervisor.toml" <<TOML
[sockets.http]
listen = "127.0.0.1:$PORT"
$option

[apps.web]
command = ["$VENV/bin/uvicorn", "--no-access-log", "--fd", "3", "app:app"]
sockets = ["http"]
TOML
        "$CLUSTERD" start --run-dir "$TMP/run-$nodelay" "$TMP/supervisor.toml" \
            >"$RESULTS/clusterd-$nodelay.log" 2>&1 &
        PID=$!
        wait_up
        if [ "$nodelay" = default ]; then
            measure "clusterd (default)"
        else
            measure "clusterd tcp_nodelay=false"
        fi
        stop
    done
} | tee "$RESULTS/table.txt"
