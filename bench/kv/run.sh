#!/usr/bin/env bash
# bench/kv: the shared-memory KV cluster map, measured on a real three-master Redis cluster
# that the bench starts on free loopback ports in a temp dir (and stops).
#
#   bench/kv/run.sh                     # all sections
#   bench/kv/run.sh takeover            # takeover latency after kill -9 / close()
#   bench/kv/run.sh topology            # topology commands/s, 8 processes, shared vs not
#   bench/kv/run.sh latency             # GET latency vs the redis crate's cluster client
#   bench/kv/run.sh node [SECTION...]   # the Node binding only (bench/kv/node.js): topology,
#                                       # takeover, latency vs the npm `redis` client
#
# KV_BENCH_TRIALS (default 20) sets the takeover trials, KV_BENCH_ROUNDS (default 10) the Node
# latency rounds; KV_BENCH_OLD_ADDON=<an older libclusterd_kv_node.so> adds that addon's own
# GET (the binding before its data path moved to the event loop) to the Node latency table.
# Tables go to stdout and to
# bench/results/kv.md (Rust) and bench/results/kv-node.md (Node). Needs redis-server and
# redis-cli (apt-get install redis-server redis-tools); the Node section also node and npm,
# and installs the npm `redis` package into a temp dir (removed afterwards). Bounded: each
# part is killed after 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

for tool in redis-server redis-cli; do
  command -v "$tool" >/dev/null || { echo "bench/kv: $tool not found (apt-get install redis-server redis-tools)" >&2; exit 1; }
done

mkdir -p bench/results

run_rust=1
run_node=1
if [ "${1:-}" = node ]; then
  run_rust=0
  shift
elif [ "$#" -gt 0 ]; then
  run_node=0
fi

if [ "$run_rust" = 1 ]; then
  # Build first, so that the time limit below covers only the measurement.
  cargo bench -p clusterd-kv --bench kv --no-run
  timeout --kill-after=10s 900 cargo bench -p clusterd-kv --bench kv -- "$@" | tee bench/results/kv.md
fi

if [ "$run_node" = 1 ]; then
  for tool in node npm; do
    command -v "$tool" >/dev/null || { echo "bench/kv: $tool not found" >&2; exit 1; }
  done
  cargo build --release -p clusterd-kv-node
  npm_dir=$(mktemp -d "${TMPDIR:-/tmp}/kv-bench-npm.XXXXXX")
  trap 'rm -rf "$npm_dir"' EXIT
  # The maintained Redis client (node-redis), for the latency baseline; never committed.
  npm install --prefix "$npm_dir" --no-save --no-audit --no-fund --loglevel=error redis >/dev/null
  echo "npm redis $(node -p "require('$npm_dir/node_modules/redis/package.json').version")" >&2
  CLUSTERD_KV_NODE_ADDON="$PWD/target/release/libclusterd_kv_node.so" REDIS_NPM_DIR="$npm_dir" \
    timeout --kill-after=10s 900 node bench/kv/node.js "$@" | tee bench/results/kv-node.md
fi
