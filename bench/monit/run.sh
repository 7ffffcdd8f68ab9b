#!/usr/bin/env bash
# bench/monit/run.sh: what `clusterd monit` costs the supervisor (issue 19 item 4).
#
# Target: nothing measurable: monit asks `status` once a second and follows one app's logs.
#
# clusterd with 4 `hello` workers (ready = "notify"), idle. Three windows of $BENCH_MONIT_SECS
# (30) seconds each: without monit, with `clusterd monit` attached (in a 120x40 tmux session
# of the bench's own tmux server, once it shows the workers), and without it again (the
# spread of the two "without" rows is the noise). For each window: clusterd's own CPU time
# (utime + stime from /proc/<pid>/stat, clock ticks, so 10 ms resolution), as milliseconds
# and as percent of one core; and monit's own CPU in the window it runs.
#
# Settings (environment): BENCH_PORT (18100), BENCH_MONIT_SECS (30), BENCH_SKIP_BUILD=1,
# BENCH_CLUSTERD_BIN, BENCH_HELLO_BIN. Needs tmux. Writes the table to
# bench/results/monit-<time>/.
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/../.." && pwd)
PORT=${BENCH_PORT:-18100}
SECS=${BENCH_MONIT_SECS:-30}

BENCH_NAME=monit
source "$HERE/../lib.sh"

TMP=$(mktemp -d "${TMPDIR:-/tmp}/clusterd-monit-bench.XXXXXX")
TMUX_SOCKET=clusterd-monit-bench-$$
CD_PID=""
tmux_() { tmux -L "$TMUX_SOCKET" -f /dev/null "$@"; }
cleanup() {
    tmux_ kill-server 2>/dev/null || true
    if [[ -n $CD_PID ]] && kill -0 "$CD_PID" 2>/dev/null; then
        kill -TERM "$CD_PID" 2>/dev/null || true
        wait "$CD_PID" 2>/dev/null || true
    fi
    rm -rf "$TMP"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

# cpu_ticks PID: utime + stime of that process (fields 14 and 15, after the command's parens).
cpu_ticks() { sed 's/.*) //' "/proc/$1/stat" | awk '{ print $12 + $13 }'; }
TCK=$(getconf CLK_TCK)
ms() { echo $(( $1 * 1000 / TCK )); }
pct() { awk -v t="$1" -v s="$SECS" -v k="$TCK" 'BEGIN { printf "%.3f%%", t / k / s * 100 }'; }

command -v tmux >/dev/null || die "tmux is missing (apt-get install tmux)"
if [[ ${BENCH_SKIP_BUILD:-0} != 1 ]]; then
    log "building clusterd and hello (release)"
    (cd "$ROOT" && cargo build --release --quiet -p clusterd -p hello) ||
        die "cargo build failed (BENCH_SKIP_BUILD=1 benches the binaries already built)"
fi
CLUSTERD=${BENCH_CLUSTERD_BIN:-$ROOT/target/release/clusterd}
HELLO=${BENCH_HELLO_BIN:-$ROOT/target/release/hello}
[[ -x $CLUSTERD && -x $HELLO ]] || die "target/release/clusterd or hello is missing"

MANIFEST=$TMP/monit.toml
cat >"$MANIFEST" <<EOF
[supervisor]
run_dir = "$TMP/run"

[sockets.http]
listen = "127.0.0.1:$PORT"

[apps.web]
command = ["$HELLO"]
workers = 4
sockets = ["http"]
ready = "notify"
EOF
wait_until 10 port_free || die "127.0.0.1:$PORT is busy"
"$CLUSTERD" start "$MANIFEST" >"$TMP/clusterd.log" 2>&1 &
CD_PID=$!
ready() { "$CLUSTERD" status --check "$MANIFEST" >/dev/null 2>&1; }
wait_until 60 ready || { tail -20 "$TMP/clusterd.log" >&2; die "the workers did not get ready"; }

STAMP=$(date -u +%Y%m%dT%H%M%SZ)
OUT=$ROOT/bench/results/monit-$STAMP
mkdir -p "$OUT"
TABLE=$OUT/table.txt
{
    echo "# clusterd monit bench, $(date -u '+%Y-%m-%d %H:%M UTC'), nproc $(nproc), load $(cut -d' ' -f1-3 /proc/loadavg), kernel $(uname -r), commit $(git -C "$ROOT" describe --always --dirty 2>/dev/null || echo unknown)"
    echo "# clusterd with 4 idle hello workers; CPU over ${SECS}s windows (utime+stime, ${TCK} ticks/s)"
    printf '%-32s %14s %12s %14s\n' window "clusterd CPU" "of a core" "monit CPU"
} >"$TABLE"
row() { printf '%-32s %14s %12s %14s\n' "$@" >>"$TABLE"; }

# window NAME [MONIT_PID]: clusterd's (and monit's) CPU over SECS seconds.
window() {
    local name=$1 monit=${2:-} c0 c1 m0=0 m1=0
    log "$name: ${SECS}s"
    c0=$(cpu_ticks "$CD_PID")
    [[ -n $monit ]] && m0=$(cpu_ticks "$monit")
    sleep "$SECS"
    c1=$(cpu_ticks "$CD_PID")
    [[ -n $monit ]] && m1=$(cpu_ticks "$monit")
    row "$name" "$(ms $((c1 - c0))) ms" "$(pct $((c1 - c0)))" \
        "$([[ -n $monit ]] && echo "$(ms $((m1 - m0))) ms" || echo -)"
}

window "without monit"
tmux_ new-session -d -s monit -x 120 -y 40 "'$CLUSTERD' monit --file '$MANIFEST'; exec sleep 600"
shows_workers() { tmux_ capture-pane -p -t monit | grep -q 'web\[3\]'; }
wait_until 20 shows_workers || die "monit did not show the workers: $(tmux_ capture-pane -p -t monit)"
shell=$(tmux_ display-message -p -t monit '#{pane_pid}')
MONIT=$(awk '{ print $1 }' "/proc/$shell/task/$shell/children")
[[ -n $MONIT ]] || die "cannot find monit's pid"
window "with monit attached" "$MONIT"
tmux_ send-keys -t monit q
wait_until 10 eval '! kill -0 "$MONIT" 2>/dev/null' || die "monit did not exit on q"
window "without monit (again)"

echo
cat "$TABLE"
log "table: ${OUT#"$ROOT"/}"
