#!/usr/bin/env bash
# `watch`: what watching costs the supervisor. Three rows:
# - setup: an app watching a tree of 1,000 directories beside a node_modules of 20,000 (ignored):
#   time until every watch is in place (inotify watches counted in /proc/PID/fdinfo), watches
#   held, clusterd's RSS;
# - reads: a worker that reads 20 files of its watched tree 2,000 times (every open and close
#   is an inotify event that notify's thread reads and drops), clusterd's CPU from its start to
#   the last read, with `watch` and without;
# - reaction: touch -> `watch_reload` in clusterd's JSON log, over 10 touches (watch_delay
#   100ms), median and max.
# Loopback only (no sockets at all); cleans up its processes.
set -euo pipefail
cd "$(dirname "$0")/../.."
[ -n "${BENCH_SKIP_BUILD:-}" ] || cargo build --release -q -p clusterd
bin=${BENCH_CLUSTERD_BIN:-$PWD/target/release/clusterd}
work=$(mktemp -d)
pid=
trap '[ -n "$pid" ] && kill -9 "$pid" 2>/dev/null; rm -rf "$work"' EXIT
ticks=$(getconf CLK_TCK)
stamp=$(date -u +%Y%m%dT%H%M%SZ)
results=$PWD/bench/results/watch-$stamp
mkdir -p "$results"

watches() { # inotify watches held by $1
  local n=0 fd
  for fd in /proc/"$1"/fd/*; do
    if [ "$(readlink "$fd" 2>/dev/null)" = "anon_inode:inotify" ]; then
      n=$((n + $(grep -c '^inotify wd:' "/proc/$1/fdinfo/${fd##*/}" || true)))
    fi
  done
  echo "$n"
}
cpu_seconds() { # user + system CPU seconds of $1
  awk -v t="$ticks" '{sub(/.*\) /, ""); printf "%.2f", ($12 + $13) / t}' "/proc/$1/stat"
}
now_ms() { date +%s%3N; }

app=$work/app
mkdir -p "$app/src" "$app/node_modules"
for i in $(seq 1 1000); do mkdir -p "$app/src/d$((i % 50))/e$i"; done
for i in $(seq 1 20000); do mkdir -p "$app/node_modules/p$((i % 100))/q$i"; done
for i in $(seq 1 20); do echo "// $i" >"$app/src/f$i.js"; done
dirs=$(find "$app/src" -type d | wc -l) # watched by `watch = ["src"]`

{
printf '%-44s %s\n' "case" "result"

# setup
cat >"$app/setup.toml" <<TOML
[supervisor]
log_format = "json"
[apps.web]
command = ["sleep", "1000"]
watch = true
TOML
start=$(now_ms)
"$bin" start "$app/setup.toml" >"$results/setup.log" 2>&1 &
pid=$!
until [ "$(watches "$pid")" -ge $((dirs + 1)) ]; do sleep 0.01; done # and the app's own
took=$(( $(now_ms) - start ))
rss=$(awk '/^VmRSS/ {print $2}' "/proc/$pid/status")
printf '%-44s %s\n' "setup: $((dirs + 1)) dirs + 20,000 in node_modules" \
  "$(watches "$pid") watches in ${took} ms (from start), clusterd RSS $((rss / 1024)) MiB"
kill -TERM "$pid"; wait "$pid" || true; pid=

# reads
for mode in off on; do
  watch_line=""
  [ "$mode" = on ] && watch_line='watch = ["src"]'
  rm -f "$app/reads.done"
  cat >"$app/reads.toml" <<TOML
[apps.reader]
command = ["sh", "-c", "for i in \$(seq 1 2000); do cat src/*.js > /dev/null; done; touch reads.done; exec sleep 1000"]
$watch_line
TOML
  t0=$(now_ms)
  "$bin" start "$app/reads.toml" >"$results/reads-$mode.log" 2>&1 &
  pid=$!
  until [ -e "$app/reads.done" ]; do sleep 0.01; done
  took=$(( $(now_ms) - t0 ))
  cpu=$(cpu_seconds "$pid")
  kill -TERM "$pid"; wait "$pid" || true; pid=
  printf '%-44s %s\n' "reads, watch $mode" \
    "40,000 reads of watched files in ${took} ms: clusterd CPU ${cpu} s (start included)"
done

# reaction
cat >"$app/react.toml" <<TOML
[supervisor]
log_format = "json"
[apps.web]
command = ["sleep", "1000"]
watch = ["src"]
watch_delay = "100ms"
[apps.web.reload]
bake = "0s"
TOML
"$bin" start "$app/react.toml" >"$results/react.log" 2>&1 &
pid=$!
until [ "$(watches "$pid")" -ge "$dirs" ]; do sleep 0.01; done
: >"$work/latencies"
for i in $(seq 1 10); do
  seen=$(grep -c '"event":"watch_reload"' "$results/react.log" || true)
  t0=$(now_ms)
  touch "$app/src/f1.js"
  until [ "$(grep -c '"event":"watch_reload"' "$results/react.log" || true)" -gt "$seen" ]; do
    sleep 0.005
  done
  echo $(( $(now_ms) - t0 )) >>"$work/latencies"
  until grep -q "\"event\":\"rollout_done\",\"generation\":$((i + 1))" "$results/react.log"; do
    sleep 0.01
  done
done
kill -TERM "$pid"; wait "$pid" || true; pid=
sort -n "$work/latencies" >"$work/sorted"
printf '%-44s %s\n' "reaction: touch -> watch_reload (delay 100ms)" \
  "median $(sed -n 5p "$work/sorted") ms, max $(tail -1 "$work/sorted") ms (10 touches)"
} | tee "$results/table.txt"
