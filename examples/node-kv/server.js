#!/usr/bin/env node
// HTTP over a Redis cluster from plain Node.js (no npm dependencies), through the clusterd-kv
// binding (bindings/node): the Node twin of examples/kv-http, with the same routes and status
// codes. One worker per host — the tend owner — reads the cluster's topology and shares the
// slot map with the others through shared memory.
//
//   GET  /<key>      200 with the stored JSON record, or 404
//   POST /<key>      JSON body -> 201 {"stored":"<key>"}; invalid JSON 400, over 1 MiB 413
//   GET  /_kv/stats  this worker's KV role and counters as JSON
//   GET  /           a usage line; other methods 405 (with Allow)
//   KV failures      502 {"error":"KV store: ..."}; 503 once the KV client is closed
//
// The key is the percent-decoded path without its leading `/`; keys under `_kv/` are reserved.
//
// Settings (environment): REDIS_CLUSTER (seeds, default 127.0.0.1:7000), KV_TEND_INTERVAL_MS
// (default 1000), KV_SHARED_MEMORY=0 (every worker tends its own map), CLUSTERD_KV_SEGMENT
// (segment name prefix; clusterd sets it from the manifest's `kv_segment`), CLUSTERD_KV_DIR,
// and KV_HTTP_ADDR (host:port to bind when not started by clusterd, default 127.0.0.1:8004).
//
// Socket, readiness and shutdown as in examples/node: fd 3 when LISTEN_FDS/LISTEN_PID say so;
// `$CLUSTERD_EXE notify READY=1` once the KV client is connected and the server listens; on
// SIGTERM/SIGINT stop accepting, answer with `Connection: close` for LINGER_MS, close idle
// connections, and once every connection is closed close the KV client (which hands the tend
// lock to another worker at once) and exit 0.
'use strict';

const http = require('node:http');
const net = require('node:net');
const path = require('node:path');
const { execFile } = require('node:child_process');
const { connect } = require(path.join(__dirname, '..', '..', 'bindings', 'node'));

const MAX_BODY = 1024 * 1024;
const DRAIN_TIMEOUT_MS = 30_000;
const LINGER_MS = 1_000;
const FIRST_LISTEN_FD = 3;
const DEFAULT_SEEDS = '127.0.0.1:7000';
const USAGE = 'node-kv: GET /<key> reads a JSON record, POST /<key> stores one, GET /_kv/stats\n';

const me = {
  app: process.env.CLUSTERD_APP || 'node-kv',
  slot: Number.parseInt(process.env.CLUSTERD_WORKER_ID || '0', 10),
};

function log(message) {
  process.stderr.write(`node-kv ${me.app}[${me.slot}] pid ${process.pid}: ${message}\n`);
}

function inheritedSockets() {
  const count = process.env.LISTEN_FDS;
  if (count === undefined || process.env.LISTEN_PID !== String(process.pid)) {
    return 0;
  }
  const n = Number(count);
  if (!Number.isInteger(n) || n < 0) {
    throw new Error(`LISTEN_FDS=${JSON.stringify(count)} is not a number of fds`);
  }
  return n;
}

function notify(...assignments) {
  if (!process.env.NOTIFY_SOCKET) {
    return;
  }
  const exe = process.env.CLUSTERD_EXE;
  if (!exe) {
    log(`NOTIFY_SOCKET is set but CLUSTERD_EXE is not: cannot send ${assignments.join(' ')}`);
    return;
  }
  execFile(exe, ['notify', ...assignments], { timeout: 10_000 }, (err, _stdout, stderr) => {
    if (err) {
      log(`${exe} notify ${assignments.join(' ')} failed: ${err.message} ${stderr}`.trim());
    }
  });
}

/** What a request asks for, from its method and path alone (as kv-http's `route`). */
function route(method, rawPath) {
  let key;
  try {
    key = decodeURIComponent(rawPath.replace(/^\//, ''));
  } catch {
    return { kind: 'badKey', reason: 'the key is not valid UTF-8 once percent-decoded' };
  }
  if (key === '') {
    return method === 'GET' ? { kind: 'usage' } : { kind: 'notAllowed', allow: 'GET' };
  }
  if (key === '_kv/stats') {
    return method === 'GET' ? { kind: 'stats' } : { kind: 'notAllowed', allow: 'GET' };
  }
  if (key.startsWith('_kv/')) {
    return { kind: 'badKey', reason: 'keys under _kv/ are reserved' };
  }
  if (method === 'GET') {
    return { kind: 'get', key };
  }
  if (method === 'POST') {
    return { kind: 'store', key };
  }
  return { kind: 'notAllowed', allow: 'GET, POST' };
}

let stopping = false;

function send(res, status, type, body, extra = {}) {
  const headers = { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body), ...extra };
  if (stopping) {
    headers.Connection = 'close';
  }
  res.writeHead(status, headers);
  res.end(body);
}

function json(res, status, value, extra) {
  send(res, status, 'application/json', `${JSON.stringify(value)}\n`, extra);
}

function error(res, status, message, extra) {
  json(res, status, { error: message }, extra);
}

function kvError(res, e) {
  error(res, e.code === 'ERR_KV_CLOSED' ? 503 : 502, `KV store: ${e.message}`);
}

function stats(kv) {
  const s = kv.stats();
  return {
    pid: process.pid,
    role: s.role,
    commands: s.commands,
    moved: s.moved,
    ask: s.ask,
    topology_commands: s.topologyCommands,
    refreshes: s.refreshes,
    publishes: s.publishes,
    refresh_requests: s.refreshRequests,
    snapshot_copies: s.snapshotCopies,
    self_refreshes: s.selfRefreshes,
    takeovers: s.takeovers,
    owner_epoch: s.ownerEpoch,
    map_generation: s.mapGeneration,
    owner_pid: s.ownerPid,
  };
}

/** Reads a body of at most MAX_BODY bytes; resolves null when it is larger. */
function readBody(req) {
  return new Promise((resolve, reject) => {
    const chunks = [];
    let size = 0;
    let tooLarge = false;
    req.on('data', (chunk) => {
      size += chunk.length;
      if (size > MAX_BODY) {
        tooLarge = true;
        chunks.length = 0;
      } else if (!tooLarge) {
        chunks.push(chunk);
      }
    });
    req.on('end', () => resolve(tooLarge ? null : Buffer.concat(chunks)));
    req.on('error', reject);
  });
}

async function handle(kv, req, res) {
  const rawPath = req.url.split('?')[0];
  const r = route(req.method, rawPath);
  switch (r.kind) {
    case 'usage':
      return send(res, 200, 'text/plain; charset=utf-8', USAGE);
    case 'stats':
      return json(res, 200, stats(kv));
    case 'badKey':
      return error(res, 400, r.reason);
    case 'notAllowed':
      return error(res, 405, 'method not allowed', { Allow: r.allow });
    case 'get': {
      let record;
      try {
        record = await kv.get(r.key);
      } catch (e) {
        return kvError(res, e);
      }
      if (record === null) {
        return error(res, 404, `no record under ${JSON.stringify(r.key)}`);
      }
      return send(res, 200, 'application/json', record);
    }
    case 'store': {
      let body;
      try {
        body = await readBody(req);
      } catch (e) {
        return error(res, 400, `reading the body: ${e.message}`);
      }
      if (body === null) {
        return error(res, 413, `records are limited to ${MAX_BODY} bytes`);
      }
      try {
        JSON.parse(body.toString('utf8'));
      } catch (e) {
        return error(res, 400, `invalid JSON: ${e.message}`);
      }
      try {
        await kv.set(r.key, body);
      } catch (e) {
        return kvError(res, e);
      }
      return json(res, 201, { stored: r.key });
    }
    default:
      throw new Error(`unhandled route ${r.kind}`);
  }
}

function describe(address) {
  if (typeof address === 'string') {
    return `unix:${address}`;
  }
  return address.family === 'IPv6'
    ? `[${address.address}]:${address.port}`
    : `${address.address}:${address.port}`;
}

function listenTarget() {
  if (inheritedSockets() > 0) {
    return { origin: `inherited fd ${FIRST_LISTEN_FD}`, options: { fd: FIRST_LISTEN_FD } };
  }
  const addr = process.env.KV_HTTP_ADDR || '127.0.0.1:8004';
  const at = addr.lastIndexOf(':');
  const port = Number(addr.slice(at + 1));
  if (at < 0 || !Number.isInteger(port) || port < 0 || port > 65535) {
    throw new Error(`KV_HTTP_ADDR=${JSON.stringify(addr)} is not host:port`);
  }
  return { origin: 'bound by server.js', options: { host: addr.slice(0, at), port } };
}

async function main() {
  const seeds = process.env.REDIS_CLUSTER || DEFAULT_SEEDS;
  const tendInterval = Number(process.env.KV_TEND_INTERVAL_MS || 1000);
  const sharedMemory = process.env.KV_SHARED_MEMORY !== '0';
  const { origin, options } = listenTarget();
  const kv = await connect({ seeds, tendInterval, sharedMemory });
  log(`kv client connected to ${seeds} as ${kv.stats().role}`);

  const server = http.createServer((req, res) => {
    handle(kv, req, res).catch((e) => {
      log(`request failed: ${e.stack}`);
      if (!res.headersSent) {
        error(res, 500, 'internal error');
      } else {
        res.destroy();
      }
    });
  });
  server.on('error', (err) => {
    log(`server error: ${err.message}`);
    process.exit(1);
  });
  server.listen(options);
  server.on('listening', () => {
    log(`listening on ${describe(server.address())} (${origin})`);
    notify('READY=1', 'STATUS=serving');
  });

  const finish = async (code, message) => {
    try {
      await kv.close();
    } catch (e) {
      log(`closing the KV client: ${e.message}`);
    }
    log(message);
    process.exit(code);
  };
  const stop = (signal) => {
    if (stopping) {
      return;
    }
    stopping = true;
    log(`received ${signal}: stopping, draining connections`);
    net.Server.prototype.close.call(server, (err) => {
      if (err) {
        log(`closing the server: ${err.message}`);
      }
      finish(err ? 1 : 0, 'exiting: all connections closed, KV client closed');
    });
    setTimeout(() => server.closeIdleConnections(), LINGER_MS).unref();
    setTimeout(
      () => finish(1, `exiting: connections still open after ${DRAIN_TIMEOUT_MS} ms`),
      DRAIN_TIMEOUT_MS,
    ).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

main().catch((err) => {
  log(`${err.message}${err.code ? ` (${err.code})` : ''}`);
  process.exit(2);
});
