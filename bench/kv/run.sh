#!/usr/bin/env bash
# bench/kv: the shared-memory KV cluster map, measured on a real three-master Redis cluster
# that the bench starts on free loopback ports in a temp dir (and stops).
#
#   bench/kv/run.sh                     # all sections
#   bench/kv/run.sh takeover            # takeover latency after kill -9 / close()
#   bench/kv/run.sh topology            # topology commands/s, 8 processes, shared vs not
#   bench/kv/run.sh latency             # GET latency vs the redis crate's cluster client
#
# KV_BENCH_TRIALS (default 20) sets the takeover trials. Tables go to stdout and to
# bench/results/kv.md. Needs redis-server and redis-cli (apt-get install redis-server
# redis-tools). Bounded: the whole run is killed after 15 minutes.
set -euo pipefail
cd "$(dirname "$0")/../.."

for tool in redis-server redis-cli; do
  command -v "$tool" >/dev/null || { echo "bench/kv: $tool not found (apt-get install redis-server redis-tools)" >&2; exit 1; }
done

mkdir -p bench/results
# Build first, so that the time limit below covers only the measurement.
cargo bench -p clusterd-kv --bench kv --no-run
timeout --kill-after=10s 900 cargo bench -p clusterd-kv --bench kv -- "$@" | tee bench/results/kv.md
