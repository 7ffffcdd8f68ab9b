// bench/kv, Node section: the clusterd-kv Node binding on a real three-master Redis cluster
// that this program starts on free loopback ports in a temp dir (and stops). Run by
// `bench/kv/run.sh node`, which builds the release addon and installs the npm `redis` client
// into a temp dir (REDIS_NPM_DIR); prints Markdown tables.
//
//   topology  8 worker processes, tend interval 100 ms, shared map vs every worker tending
//             (sharedMemory: false): CLUSTER SHARDS/SLOTS per second as the servers count them
//   takeover  8 worker processes, tend interval 30 s; kill -9 of the tend owner: the new
//             owner's lock time (stamped in the segment by the thread woken from flock) minus
//             the time just before the kill, same clock (CLOCK_MONOTONIC)
//   latency   sequential GETs in one process: the binding vs the npm `redis` client's cluster
//             mode (createCluster), interleaved rounds after a warm-up; with
//             KV_BENCH_OLD_ADDON=<libclusterd_kv_node.so built before the event-loop data
//             path> also that addon's own GET (each call hops to napi's tokio runtime)
//
// Usage: node bench/kv/node.js [topology|takeover|latency ...]; KV_BENCH_TRIALS (default 20),
// KV_BENCH_ROUNDS (latency rounds, default 10).
'use strict';

const fs = require('node:fs');
const net = require('node:net');
const os = require('node:os');
const path = require('node:path');
const { spawn, spawnSync, fork } = require('node:child_process');
const kvNode = require('../../bindings/node');

const WORKERS = 8;
const TRIALS = Number(process.env.KV_BENCH_TRIALS || 20);
const KEYS = 1000;
const GETS_PER_ROUND = 2000;
const ROUNDS = Number(process.env.KV_BENCH_ROUNDS || 10);

const sleep = (ms) => new Promise((resolve) => setTimeout(resolve, ms));

// ---- agents: child processes with one client each ----------------------------------------

async function agentMain() {
  const options = JSON.parse(process.argv[3]);
  const kv = await kvNode.connect(options);
  process.send({ ready: true, role: kv.stats().role });
  process.on('message', async (m) => {
    if (m === 'close') {
      await kv.close();
      process.send({ closed: true });
      process.disconnect();
    }
  });
}

function startAgent(options) {
  const child = fork(__filename, ['agent', JSON.stringify(options)], { stdio: 'inherit' });
  const ready = new Promise((resolve, reject) => {
    child.once('message', resolve);
    child.once('exit', (code) => reject(new Error(`agent exited with ${code} before ready`)));
  });
  return { child, ready };
}

async function startAgents(n, options) {
  const agents = [];
  for (let i = 0; i < n; i += 1) {
    const agent = startAgent(options);
    await agent.ready; // one at a time: the first is the owner
    agents.push(agent);
  }
  return agents;
}

async function stopAgents(agents) {
  await Promise.all(
    agents.map(
      ({ child }) =>
        new Promise((resolve) => {
          if (child.exitCode !== null || child.signalCode !== null) {
            resolve();
            return;
          }
          child.once('exit', resolve);
          child.kill('SIGKILL');
        }),
    ),
  );
}

// ---- the Redis cluster ---------------------------------------------------------------------

function portFree(port) {
  return new Promise((resolve) => {
    const server = net.createServer();
    server.once('error', () => resolve(false));
    server.listen({ host: '127.0.0.1', port }, () => server.close(() => resolve(true)));
  });
}

// Client ports in 12000..22000 with their bus ports (+10000) below the ephemeral range.
async function freePorts(n) {
  const ports = [];
  while (ports.length < n) {
    const port = 12000 + Math.floor(Math.random() * 10000);
    if (!ports.includes(port) && (await portFree(port)) && (await portFree(port + 10000))) {
      ports.push(port);
    }
  }
  return ports;
}

function cli(port, ...args) {
  const out = spawnSync('redis-cli', ['-h', '127.0.0.1', '-p', String(port), ...args], {
    encoding: 'utf8',
    timeout: 10_000,
  });
  if (out.status !== 0) {
    throw new Error(`redis-cli -p ${port} ${args.join(' ')}: ${out.stderr}`);
  }
  return out.stdout;
}

async function startCluster() {
  const dir = fs.mkdtempSync(path.join(os.tmpdir(), 'kv-bench-redis-'));
  const ports = await freePorts(3);
  const servers = ports.map((port) =>
    spawn(
      'redis-server',
      ['--port', String(port), '--bind', '127.0.0.1', '--cluster-enabled', 'yes',
        '--cluster-config-file', `nodes-${port}.conf`, '--dir', dir, '--save', '',
        '--appendonly', 'no', '--logfile', path.join(dir, `${port}.log`)],
      { stdio: 'ignore' },
    ),
  );
  for (const port of ports) {
    for (let i = 0; ; i += 1) {
      try {
        if (cli(port, 'PING').trim() === 'PONG') break;
      } catch (e) {
        if (i > 200) throw e;
      }
      await sleep(25);
    }
  }
  const create = spawnSync(
    'redis-cli',
    ['--cluster', 'create', ...ports.map((p) => `127.0.0.1:${p}`), '--cluster-replicas', '0', '--cluster-yes'],
    { encoding: 'utf8', timeout: 30_000 },
  );
  if (!create.stdout.includes('All 16384 slots covered')) {
    throw new Error(`redis-cli --cluster create failed: ${create.stdout}${create.stderr}`);
  }
  for (let i = 0; ; i += 1) {
    if (ports.every((p) => cli(p, 'CLUSTER', 'INFO').includes('cluster_state:ok'))) break;
    if (i > 400) throw new Error('the cluster did not converge');
    await sleep(25);
  }
  return {
    ports,
    seeds: ports.map((p) => `127.0.0.1:${p}`).join(','),
    stop() {
      for (const server of servers) server.kill('SIGKILL');
      fs.rmSync(dir, { recursive: true, force: true });
    },
  };
}

function topologyCalls(cluster) {
  let total = 0;
  for (const port of cluster.ports) {
    for (const line of cli(port, 'INFO', 'commandstats').split('\n')) {
      if (/^cmdstat_cluster\|(shards|slots):/.test(line)) {
        total += Number(/calls=(\d+)/.exec(line)[1]);
      }
    }
  }
  return total;
}

// ---- sections ------------------------------------------------------------------------------

function segmentDir() {
  return fs.mkdtempSync(path.join(os.tmpdir(), 'kv-bench-shm-'));
}

async function topology(cluster) {
  const rows = [];
  for (const sharedMemory of [true, false]) {
    const segDir = segmentDir();
    const agents = await startAgents(WORKERS, {
      seeds: cluster.seeds, segmentDir: segDir, segment: 'bench-topo', tendInterval: 100, sharedMemory,
    });
    const roles = (await Promise.all(agents.map((a) => a.ready))).map((m) => m.role);
    await sleep(1000);
    const before = topologyCalls(cluster);
    const started = process.hrtime.bigint();
    await sleep(5000);
    const calls = topologyCalls(cluster) - before;
    const seconds = Number(process.hrtime.bigint() - started) / 1e9;
    await stopAgents(agents);
    fs.rmSync(segDir, { recursive: true, force: true });
    const tending = roles.filter((r) => r !== 'follower').length;
    rows.push([sharedMemory ? 'shared memory' : 'no shared memory (`sharedMemory: false`)', tending, (calls / seconds).toFixed(1)]);
  }
  return [
    `| mode (${WORKERS} Node processes, 100 ms interval) | processes reading the topology | topology commands/s |`,
    '| --- | ---: | ---: |',
    ...rows.map((r) => `| ${r.join(' | ')} |`),
  ].join('\n');
}

function quantile(sorted, q) {
  return sorted[Math.min(sorted.length - 1, Math.floor(q * sorted.length))];
}

async function takeover(cluster) {
  const segDir = segmentDir();
  const options = { seeds: cluster.seeds, segmentDir: segDir, segment: 'bench-takeover', tendInterval: 30_000 };
  let agents = await startAgents(WORKERS, options);
  const latencies = [];
  for (let trial = 0; trial < TRIALS; trial += 1) {
    const [info] = kvNode.tendOwners(segDir, 'bench-takeover');
    const victim = agents.find((a) => a.child.pid === info.lockPid);
    if (!victim) throw new Error(`no agent holds the lock: ${JSON.stringify(info)}`);
    const before = kvNode.monotonicMicros();
    victim.child.kill('SIGKILL');
    const deadline = Date.now() + 5000;
    for (;;) {
      const [now] = kvNode.tendOwners(segDir, 'bench-takeover');
      if (now && now.lockPid && now.lockPid !== info.lockPid && now.ownerSinceUs > before) {
        latencies.push(now.ownerSinceUs - before);
        break;
      }
      if (Date.now() > deadline) throw new Error('no takeover within 5 s');
      await sleep(1);
    }
    await stopAgents([victim]);
    agents = agents.filter((a) => a !== victim);
    const replacement = startAgent(options);
    await replacement.ready;
    agents.push(replacement);
  }
  await stopAgents(agents);
  fs.rmSync(segDir, { recursive: true, force: true });
  latencies.sort((a, b) => a - b);
  const us = (v) => `${Math.round(v)} µs`;
  return [
    `| event (${WORKERS} Node processes, 30 s interval, ${TRIALS} trials) | median | p95 | max |`,
    '| --- | ---: | ---: | ---: |',
    `| owner killed (\`kill -9\`) | ${us(quantile(latencies, 0.5))} | ${us(quantile(latencies, 0.95))} | ${us(latencies[latencies.length - 1])} |`,
  ].join('\n');
}

async function latency(cluster) {
  const redisDir = process.env.REDIS_NPM_DIR;
  if (!redisDir) throw new Error('REDIS_NPM_DIR must name a dir with node_modules/redis (run.sh installs it)');
  const { createCluster } = require(path.join(redisDir, 'node_modules', 'redis'));
  const segDir = segmentDir();
  const binding = await kvNode.connect({ seeds: cluster.seeds, segmentDir: segDir, segment: 'bench-lat' });
  const follower = await kvNode.connect({ seeds: cluster.seeds, segmentDir: segDir, segment: 'bench-lat' });
  const npm = createCluster({ rootNodes: cluster.ports.map((p) => ({ url: `redis://127.0.0.1:${p}` })) });
  npm.on('error', (e) => console.error(`redis npm client: ${e.message}`));
  await npm.connect();
  const keys = [...Array(KEYS).keys()].map((i) => `bench:${i}`);
  await Promise.all(keys.map((k) => binding.set(k, 'x'.repeat(100))));

  const clients = [
    ['npm `redis` createCluster (baseline)', (k) => npm.get(k)],
    ['clusterd-kv binding, tend owner', (k) => binding.get(k)],
    ['clusterd-kv binding, follower (shared map)', (k) => follower.get(k)],
  ];
  let old = null;
  if (process.env.KV_BENCH_OLD_ADDON) {
    // The addon of before the event-loop data path: its native client's own `get`.
    const module = { exports: {} };
    process.dlopen(module, path.resolve(process.env.KV_BENCH_OLD_ADDON));
    old = await module.exports.connectNative({ seeds: cluster.ports.map((p) => `127.0.0.1:${p}`), segmentDir: segDir, segment: 'bench-lat-old' });
    clients.push(['old binding (tokio hop per call), tend owner', (k) => old.get(k)]);
  }
  const samples = clients.map(() => []);
  for (let round = 0; round <= ROUNDS; round += 1) {
    for (const [index, [, get]] of clients.entries()) {
      for (let i = 0; i < GETS_PER_ROUND; i += 1) {
        const key = keys[i % KEYS];
        const t0 = process.hrtime.bigint();
        await get(key);
        const took = Number(process.hrtime.bigint() - t0) / 1000;
        if (round > 0) samples[index].push(took); // round 0 warms up
      }
    }
  }
  await npm.quit();
  if (old) await old.close();
  await binding.close();
  await follower.close();
  fs.rmSync(segDir, { recursive: true, force: true });
  for (const s of samples) s.sort((a, b) => a - b);
  const base = quantile(samples[0], 0.5);
  const us = (v) => `${v.toFixed(1)} µs`;
  return [
    `| client (sequential GETs, ${GETS_PER_ROUND * ROUNDS} each in ${ROUNDS} interleaved rounds) | median | p95 | median vs baseline |`,
    '| --- | ---: | ---: | ---: |',
    ...clients.map(([name], i) => {
      const median = quantile(samples[i], 0.5);
      return `| ${name} | ${us(median)} | ${us(quantile(samples[i], 0.95))} | ${(median / base).toFixed(3)} |`;
    }),
  ].join('\n');
}

async function main() {
  const all = { topology, takeover, latency };
  const wanted = process.argv.slice(2).filter((a) => a in all);
  const sections = wanted.length > 0 ? wanted : Object.keys(all);
  const cluster = await startCluster();
  try {
    console.log(`Node ${process.version}, addon ${kvNode.addonPath}, ${os.cpus().length} CPUs\n`);
    for (const name of sections) {
      console.log(`### ${name}\n\n${await all[name](cluster)}\n`);
    }
  } finally {
    cluster.stop();
  }
}

if (process.argv[2] === 'agent') {
  agentMain().catch((e) => {
    console.error(`agent: ${e.message}`);
    process.exit(1);
  });
} else {
  main().catch((e) => {
    console.error(e.stack);
    process.exit(1);
  });
}
