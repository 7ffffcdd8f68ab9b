# bench/lib.sh: what the bench scripts share. A script sets BENCH_NAME and sources it:
#
#   BENCH_NAME=balance
#   source "$HERE/../lib.sh"
#
# log and die print as [NAME-bench] on stderr; wait_until polls a command (every WAIT_STEP
# seconds, default 0.05); port_free checks a loopback port. bench_temp makes $TMP and, on
# exit, stops the processes listed in PIDS (SIGTERM, SIGKILL after STOP_TENTHS tenths of a
# second, default 50), runs `pm2 kill` when PM2_STARTED is 1 (the script's own `pm2`
# function) and removes $TMP.

log() { printf '[%s-bench] %s\n' "$BENCH_NAME" "$*" >&2; }
die() { log "error: $*"; exit 1; }

wait_until() { # wait_until SECONDS COMMAND...: until COMMAND succeeds, for at most SECONDS
    local deadline=$(( $(date +%s%N) + $1 * 1000000000 )); shift
    until "$@"; do
        (( $(date +%s%N) < deadline )) || return 1
        sleep "${WAIT_STEP:-0.05}"
    done
}

port_free() { # port_free [PORT]: nothing listens on 127.0.0.1:PORT (default: $PORT)
    ! (exec 3<>"/dev/tcp/127.0.0.1/${1:-$PORT}") 2>/dev/null
}

bench_temp() {
    TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-$BENCH_NAME-bench.XXXXXX")
    PIDS=()
    PM2_STARTED=0
    trap bench_cleanup EXIT
    trap 'exit 130' INT TERM
}

bench_cleanup() {
    local pid
    for pid in "${PIDS[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${PIDS[@]}"; do
        for _ in $(seq "${STOP_TENTHS:-50}"); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
        kill -KILL "$pid" 2>/dev/null || true
    done
    if [[ $PM2_STARTED == 1 ]]; then pm2 kill >/dev/null 2>&1 || true; fi
    rm -rf "$TMP"
}
