#!/usr/bin/env node
// A clusterd worker in plain Node.js (no npm dependencies): the same HTTP routes as the Rust
// `hello` example, served on the listening socket clusterd passes at fd 3.
//
//   GET /            hello from <app>[<slot>] pid <pid> generation <generation>
//   GET /whoami      {"app":..,"slot":..,"pid":..,"generation":..}
//   GET /sleep/<ms>  answers after <ms> milliseconds (at most 60000)
//
// Socket: fd 3 when LISTEN_FDS is set and LISTEN_PID is this process's pid (systemd's
// socket-activation convention, which clusterd follows); otherwise it binds 127.0.0.1:$PORT
// (default 8000) so that `node server.js` works alone.
//
// Readiness: Node cannot send unix datagrams, so once listening it runs
// `$CLUSTERD_EXE notify READY=1` (clusterd sets CLUSTERD_EXE for its workers and attributes
// notifications from a worker's children to the worker). Skipped when NOTIFY_SOCKET is unset.
// When WATCHDOG_USEC is set, `notify WATCHDOG=1` runs at half that interval.
//
// SIGTERM or SIGINT: stop accepting at once; for up to LINGER_MS every response carries
// `Connection: close`, so keep-alive clients get their answer and reconnect (to another worker)
// instead of finding their connection closed under their next request; then close the
// connections still idle, let in-flight requests finish, and exit 0 once every connection is
// closed (1 if that takes longer than 30 s). http.Server#close() would also close idle
// connections at once, so the listener is closed with net.Server#close() instead.
'use strict';

const http = require('node:http');
const net = require('node:net');
const { execFile } = require('node:child_process');

const DRAIN_TIMEOUT_MS = 30_000;
const LINGER_MS = 1_000;
const MAX_SLEEP_MS = 60_000;
const FIRST_LISTEN_FD = 3;

const me = {
  app: process.env.CLUSTERD_APP || 'node',
  slot: Number.parseInt(process.env.CLUSTERD_WORKER_ID || '0', 10),
  pid: process.pid,
  generation: Number.parseInt(process.env.CLUSTERD_GENERATION || '0', 10),
};

function log(message) {
  process.stderr.write(`node ${me.app}[${me.slot}] pid ${me.pid}: ${message}\n`);
}

// Whether clusterd (or systemd) passed listening sockets to this very process.
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

// Runs `$CLUSTERD_EXE notify <assignments...>` when NOTIFY_SOCKET is set.
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

let stopping = false;

function send(res, status, type, body) {
  const headers = { 'Content-Type': type, 'Content-Length': Buffer.byteLength(body) };
  if (stopping) {
    // Tells a keep-alive client to reconnect (to another worker) for its next request.
    headers.Connection = 'close';
  }
  res.writeHead(status, headers);
  res.end(body);
}

function handle(req, res) {
  const path = new URL(req.url, 'http://worker').pathname;
  if (req.method !== 'GET') {
    return send(res, 404, 'text/plain; charset=utf-8', 'not found\n');
  }
  if (path === '/') {
    const body = `hello from ${me.app}[${me.slot}] pid ${me.pid} generation ${me.generation}\n`;
    return send(res, 200, 'text/plain; charset=utf-8', body);
  }
  if (path === '/whoami') {
    return send(res, 200, 'application/json', JSON.stringify(me));
  }
  const sleep = /^\/sleep\/(\d+)$/.exec(path);
  if (sleep) {
    const ms = Math.min(Number(sleep[1]), MAX_SLEEP_MS);
    setTimeout(() => send(res, 200, 'text/plain; charset=utf-8', `slept ${ms} ms\n`), ms);
    return undefined;
  }
  return send(res, 404, 'text/plain; charset=utf-8', 'not found\n');
}

function describe(address) {
  if (typeof address === 'string') {
    return `unix:${address}`;
  }
  return address.family === 'IPv6'
    ? `[${address.address}]:${address.port}`
    : `${address.address}:${address.port}`;
}

function main() {
  const server = http.createServer(handle);
  server.on('error', (err) => {
    log(`server error: ${err.message}`);
    process.exit(1);
  });

  let origin;
  if (inheritedSockets() > 0) {
    origin = `inherited fd ${FIRST_LISTEN_FD}`;
    server.listen({ fd: FIRST_LISTEN_FD });
  } else {
    const port = Number(process.env.PORT || 8000);
    if (!Number.isInteger(port) || port < 0 || port > 65535) {
      throw new Error(`PORT=${JSON.stringify(process.env.PORT)} is not a port number`);
    }
    origin = 'bound by server.js';
    server.listen({ host: '127.0.0.1', port });
  }

  server.on('listening', () => {
    log(`listening on ${describe(server.address())} (${origin}), generation ${me.generation}`);
    notify('READY=1', 'STATUS=serving');
    const watchdogUsec = Number(process.env.WATCHDOG_USEC || 0);
    if (watchdogUsec > 0) {
      setInterval(() => notify('WATCHDOG=1'), Math.max(1, watchdogUsec / 2000)).unref();
    }
  });

  const stop = (signal) => {
    if (stopping) {
      return;
    }
    stopping = true;
    log(`received ${signal}: stopping, draining connections`);
    // The callback runs once every connection has closed, which may be before the linger ends.
    net.Server.prototype.close.call(server, (err) => {
      if (err) {
        log(`closing the server: ${err.message}`);
        process.exit(1);
      }
      log('exiting: all connections closed');
      process.exit(0);
    });
    setTimeout(() => server.closeIdleConnections(), LINGER_MS).unref();
    setTimeout(() => {
      log(`exiting: connections still open after ${DRAIN_TIMEOUT_MS} ms`);
      process.exit(1);
    }, DRAIN_TIMEOUT_MS).unref();
  };
  process.on('SIGTERM', () => stop('SIGTERM'));
  process.on('SIGINT', () => stop('SIGINT'));
}

try {
  main();
} catch (err) {
  log(err.message);
  process.exit(2);
}
