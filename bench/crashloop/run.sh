#!/usr/bin/env bash
# Supervisor CPU during a crash loop: a worker that exits at once, for 10 s, under two backoff
# settings. Prints spawns and clusterd's own CPU time (from /proc/<pid>/stat). Loopback only;
# cleans up its processes.
set -euo pipefail
cd "$(dirname "$0")/../.."
cargo build --release -q -p clusterd
bin=$PWD/target/release/clusterd
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"' EXIT
ticks=$(getconf CLK_TCK)
window=10

printf '%-34s %8s %14s %10s\n' "backoff (initial..max)" "spawns" "clusterd CPU" "CPU %"
for setting in "100ms 30s" "10ms 100ms" "1ms 1ms"; do
  read -r initial max <<<"$setting"
  cat >"$work/crash.toml" <<TOML
[apps.crasher]
command = ["/bin/false"]
workers = 4
backoff_initial = "$initial"
backoff_max = "$max"
TOML
  "$bin" start "$work/crash.toml" >"$work/log" 2>&1 &
  pid=$!
  sleep "$window"
  read -r utime stime < <(awk '{sub(/.*\) /, ""); print $12, $13}' "/proc/$pid/stat")
  kill -TERM "$pid"; wait "$pid" || true; pid=
  spawns=$(grep -c 'started pid' "$work/log" || true)
  cpu=$(awk -v u="$utime" -v s="$stime" -v t="$ticks" 'BEGIN {printf "%.2f", (u + s) / t}')
  pct=$(awk -v c="$cpu" -v w="$window" 'BEGIN {printf "%.1f", 100 * c / w}')
  printf '%-34s %8s %13ss %9s%%\n' "$initial..$max, 4 workers, ${window}s" "$spawns" "$cpu" "$pct"
done
