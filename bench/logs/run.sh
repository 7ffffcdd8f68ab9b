#!/usr/bin/env bash
# bench/logs/run.sh: the cost of logging to files (issue 11), clusterd vs PM2.
#
# 4 workers (bench/logs/gen.js under node) print BENCH_RATE lines per second each (default
# 25000: 100k lines/s in all, ~80 bytes a line) for BENCH_SECS seconds (10). For each
# scenario the bench waits until the lines stop arriving, counts them in the log files, and
# reads the supervisor's CPU time from /proc (the supervisor only: clusterd, or PM2's daemon;
# the workers' CPU is the same program in both).
#
# Scenarios (BENCH_SCENARIOS, default all):
#   text      clusterd, log = "<dir>/", text lines (timestamp + app[slot])
#   json      clusterd, log = "<dir>/", log_format = "json"
#   rotate    clusterd, text, log_max_size = "20M", log_keep = 10
#   pm2       PM2 (-i 4, cluster mode) with --log-date-format (timestamps), its own log files
#
# Settings: BENCH_RATE, BENCH_SECS, BENCH_SCENARIOS, BENCH_SKIP_BUILD=1,
# BENCH_CLUSTERD_BIN. Installs PM2 under bench/.tools (git-ignored) when missing. Writes the
# table to bench/results/logs-<UTC time>/ (git-ignored). Loopback only; no port is used.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
TOOLS=$ROOT/bench/.tools
RATE=${BENCH_RATE:-25000}
SECS=${BENCH_SECS:-10}
SCENARIOS=${BENCH_SCENARIOS:-text json rotate pm2}
WORKERS=4
EXPECTED=$((RATE * SECS * WORKERS))

BENCH_NAME=logs
source "$HERE/../lib.sh"

bench_temp

NODE=$(command -v node || true)
[[ -n $NODE ]] || die "node is missing"
CLK_TCK=$(getconf CLK_TCK)
RUN_DIR=$ROOT/bench/results/logs-$(date -u +%Y%m%dT%H%M%SZ)
mkdir -p "$RUN_DIR"

if [[ -z ${BENCH_CLUSTERD_BIN:-} && ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building clusterd (release)"
    (cd "$ROOT" && cargo build --release -q -p clusterd)
fi
CLUSTERD=${BENCH_CLUSTERD_BIN:-$ROOT/target/release/clusterd}
[[ -x $CLUSTERD ]] || die "$CLUSTERD is missing"

if [[ $SCENARIOS == *pm2* && ! -x $TOOLS/node_modules/.bin/pm2 ]]; then
    log "installing pm2 under bench/.tools"
    mkdir -p "$TOOLS"
    npm install --prefix "$TOOLS" --no-audit --no-fund --loglevel=error pm2 >/dev/null
fi
PM2=$TOOLS/node_modules/.bin/pm2
pm2() { PM2_HOME=$TMP/pm2 "$PM2" "$@"; }

# cpu_ticks PID: utime + stime of a process, in clock ticks.
cpu_ticks() { awk '{ sub(/.*\) /, ""); print $12 + $13 }' "/proc/$1/stat"; }

# count_lines FILES...: lines of the generator in the files (rotated ones included).
count_lines() { cat "$@" 2>/dev/null | grep -c 'w[0-9] [0-9]* xxxxxxxx' || true; }

# wait_settled GLOB: until the line count stops changing for 2 s (after the generation).
wait_settled() {
    local last=-1 now stable=0
    while ((stable < 20)); do
        # shellcheck disable=SC2086
        now=$(count_lines $1)
        if [[ $now == "$last" ]]; then stable=$((stable + 1)); else stable=0; fi
        last=$now
        ((now >= EXPECTED)) && break
        sleep 0.1
    done
}

ROWS=()
row() { # row NAME CPU_SECONDS LINES BYTES
    local lost=$((EXPECTED - $3))
    ROWS+=("$(printf '%-22s %9s %11d %9d %9s %8s' "$1" "$2" "$3" "$lost" "$(numfmt --to=iec "$4")" "$5")")
}

run_clusterd() { # run_clusterd NAME EXTRA_TOML
    local name=$1 dir=$TMP/$1
    mkdir -p "$dir"
    cat >"$dir/bench.toml" <<TOML
[supervisor]
log = "$dir/logs/"
stop_timeout = "2s"
$2
[apps.gen]
command = ["$NODE", "$HERE/gen.js"]
workers = $WORKERS
env = { RATE = "$RATE", SECS = "$SECS" }
TOML
    "$CLUSTERD" start "$dir/bench.toml" --run-dir "$dir/run" >"$RUN_DIR/$name.out" 2>&1 &
    local pid=$!
    PIDS+=("$pid")
    local t0 c0 t1 c1
    c0=$(cpu_ticks "$pid"); t0=$(date +%s.%N)
    sleep "$SECS"
    wait_settled "$dir/logs/gen.log*"
    c1=$(cpu_ticks "$pid"); t1=$(date +%s.%N)
    local dropped
    dropped=$("$CLUSTERD" status --json --socket "$dir/run/control.sock" | "$NODE" -e \
        'let s="";process.stdin.on("data",d=>s+=d).on("end",()=>console.log(JSON.parse(s).output_dropped))')
    local lines bytes
    lines=$(count_lines "$dir"/logs/gen.log*)
    head -n 3 "$dir"/logs/gen.log >"$RUN_DIR/$name-sample.txt" || true
    bytes=$(cat "$dir"/logs/gen.log* | wc -c)
    kill -TERM "$pid"; wait "$pid" || true
    local cpu
    cpu=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" -v s="$t0" -v e="$t1" \
        'BEGIN { printf "%.2fs/%.0f%%", (b - a) / t, 100 * (b - a) / t / (e - s) }')
    log "$name: $lines lines, cpu $cpu, dropped (status) $dropped"
    row "clusterd $name" "$cpu" "$lines" "$bytes" "$(ls "$dir"/logs/gen.log* | wc -l)"
}

run_pm2() {
    local dir=$TMP/pm2app
    mkdir -p "$dir"
    cp "$HERE/gen.js" "$dir/"
    PM2_STARTED=1
    (cd "$dir" && RATE=$RATE SECS=$SECS pm2 start gen.js -i "$WORKERS" --log-date-format "YYYY-MM-DDTHH:mm:ss.SSSZ" --name gen >"$RUN_DIR/pm2-start.out" 2>&1) ||
        die "pm2 start failed"
    local daemon t0 c0 t1 c1
    daemon=$(cat "$TMP/pm2/pm2.pid")
    c0=$(cpu_ticks "$daemon"); t0=$(date +%s.%N)
    sleep "$SECS"
    wait_settled "$TMP/pm2/logs/gen-out*.log"
    c1=$(cpu_ticks "$daemon"); t1=$(date +%s.%N)
    local lines bytes
    lines=$(count_lines "$TMP"/pm2/logs/gen-out*.log)
    head -n 3 "$TMP"/pm2/logs/gen-out-0.log >"$RUN_DIR/pm2-sample.txt" || true
    bytes=$(cat "$TMP"/pm2/logs/gen-out*.log | wc -c)
    local cpu
    cpu=$(awk -v a="$c0" -v b="$c1" -v t="$CLK_TCK" -v s="$t0" -v e="$t1" \
        'BEGIN { printf "%.2fs/%.0f%%", (b - a) / t, 100 * (b - a) / t / (e - s) }')
    log "pm2: $lines lines, cpu $cpu"
    row "pm2 -i 4, date format" "$cpu" "$lines" "$bytes" "$(ls "$TMP"/pm2/logs/gen-out*.log | wc -l)"
    pm2 kill >/dev/null 2>&1 || true
    PM2_STARTED=0
}

for scenario in $SCENARIOS; do
    case $scenario in
    text) run_clusterd text "" ;;
    json) run_clusterd json 'log_format = "json"' ;;
    rotate) run_clusterd rotate $'log_max_size = "20M"\nlog_keep = 10' ;;
    pm2) run_pm2 ;;
    *) die "unknown scenario $scenario" ;;
    esac
done

{
    echo "$WORKERS workers x $RATE lines/s for ${SECS}s = $EXPECTED lines; $(nproc) CPUs, $(uname -r), node $("$NODE" --version)"
    printf '%-22s %9s %11s %9s %9s %8s\n' scenario "cpu/%" lines lost bytes files
    printf '%s\n' "${ROWS[@]}"
} | tee "$RUN_DIR/table.txt"
