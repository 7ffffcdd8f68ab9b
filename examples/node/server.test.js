// Tests of server.js as clusterd runs it: a real listening socket at fd 3, LISTEN_PID set to
// the worker's own pid (through a `sh -c 'LISTEN_PID=$$ exec ...'` trampoline), real signals.
//
//   node --test examples/node/
//
// Every wait has a deadline; every process started here is killed when its test ends.
'use strict';

const assert = require('node:assert/strict');
const { spawn } = require('node:child_process');
const net = require('node:net');
const path = require('node:path');
const { once } = require('node:events');
const { test } = require('node:test');

const SERVER = path.join(__dirname, 'server.js');
const DEADLINE_MS = 20_000;

function withDeadline(promise, what) {
  let timer;
  const deadline = new Promise((_, reject) => {
    timer = setTimeout(() => reject(new Error(`${what}: no result within ${DEADLINE_MS} ms`)), DEADLINE_MS);
  });
  return Promise.race([promise, deadline]).finally(() => clearTimeout(timer));
}

// The environment without anything clusterd would set.
function cleanEnv(extra) {
  const env = {};
  for (const [key, value] of Object.entries(process.env)) {
    if (!/^(LISTEN_|CLUSTERD_|WATCHDOG_)/.test(key) && key !== 'NOTIFY_SOCKET' && key !== 'PORT') {
      env[key] = value;
    }
  }
  return { ...env, ...extra };
}

// A running server.js; `listener` (a listening net.Server) is passed at fd 3.
class Worker {
  constructor(t, { listener, env } = {}) {
    const stdio = ['ignore', 'ignore', 'pipe'];
    let command = process.execPath;
    let args = [SERVER];
    if (listener) {
      // The listening socket's fd (libuv's handle), duplicated to fd 3 in the child.
      stdio.push(listener._handle.fd);
      command = 'sh';
      args = ['-c', 'LISTEN_PID=$$ exec "$0" "$@"', process.execPath, SERVER];
      env = { LISTEN_FDS: '1', ...env };
    }
    this.child = spawn(command, args, { stdio, env: cleanEnv(env) });
    if (listener) {
      // The child has its own copy now; stop this process from accepting on the socket.
      listener.close();
    }
    this.exited = once(this.child, 'exit');
    this.stderr = '';
    this.waiters = [];
    this.child.stderr.setEncoding('utf8');
    this.child.stderr.on('data', (chunk) => {
      this.stderr += chunk;
      this.waiters = this.waiters.filter((w) => !w());
    });
    t.after(() => {
      if (this.child.exitCode === null && this.child.signalCode === null) {
        this.child.kill('SIGKILL');
      }
    });
  }

  // Resolves with the first stderr line matching `pattern`.
  logLine(pattern) {
    return withDeadline(
      new Promise((resolve) => {
        const check = () => {
          const line = this.stderr.split('\n').find((l) => pattern.test(l));
          if (line !== undefined) {
            resolve(line);
            return true;
          }
          return false;
        };
        if (!check()) {
          this.waiters.push(check);
        }
      }),
      `log line ${pattern}`,
    );
  }

  async listeningOn() {
    const line = await this.logLine(/listening on /);
    return /listening on (\S+)/.exec(line)[1];
  }

  async exitCode() {
    const [code] = await withDeadline(this.exited, 'exit');
    return code;
  }
}

// A keep-alive HTTP/1.1 connection over a raw socket.
class Client {
  constructor(t, address) {
    const [host, port] = [address.slice(0, address.lastIndexOf(':')), address.slice(address.lastIndexOf(':') + 1)];
    this.socket = net.connect({ host, port: Number(port) });
    this.buffer = Buffer.alloc(0);
    this.ended = false;
    this.waiters = [];
    this.socket.on('data', (chunk) => {
      this.buffer = Buffer.concat([this.buffer, chunk]);
      this.wake();
    });
    this.socket.on('end', () => {
      this.ended = true;
      this.wake();
    });
    this.socket.on('error', () => {
      this.ended = true;
      this.wake();
    });
    t.after(() => this.socket.destroy());
  }

  wake() {
    this.waiters = this.waiters.filter((w) => !w());
  }

  send(target) {
    this.socket.write(`GET ${target} HTTP/1.1\r\nHost: worker\r\n\r\n`);
  }

  readResponse() {
    return withDeadline(
      new Promise((resolve, reject) => {
        const check = () => {
          const end = this.buffer.indexOf('\r\n\r\n');
          if (end >= 0) {
            const [statusLine, ...lines] = this.buffer.subarray(0, end).toString().split('\r\n');
            const headers = {};
            for (const line of lines) {
              const colon = line.indexOf(':');
              headers[line.slice(0, colon).trim().toLowerCase()] = line.slice(colon + 1).trim();
            }
            const length = Number(headers['content-length']);
            if (this.buffer.length >= end + 4 + length) {
              const body = this.buffer.subarray(end + 4, end + 4 + length).toString();
              this.buffer = this.buffer.subarray(end + 4 + length);
              resolve({ status: Number(statusLine.split(' ')[1]), headers, body });
              return true;
            }
          }
          if (this.ended) {
            reject(new Error('connection closed before a full response'));
            return true;
          }
          return false;
        };
        if (!check()) {
          this.waiters.push(check);
        }
      }),
      'response',
    );
  }

  get(target) {
    this.send(target);
    return this.readResponse();
  }

  // Resolves once the server has closed the connection.
  closedByServer() {
    return withDeadline(
      new Promise((resolve) => {
        const check = () => {
          if (this.ended) {
            resolve(true);
          }
          return this.ended;
        };
        if (!check()) {
          this.waiters.push(check);
        }
      }),
      'server closing the connection',
    );
  }
}

async function tcpListener(t) {
  const listener = net.createServer();
  listener.listen({ host: '127.0.0.1', port: 0 });
  await once(listener, 'listening');
  t.after(() => listener.listening && listener.close());
  return [listener, `127.0.0.1:${listener.address().port}`];
}

test('serves the inherited socket and drains in-flight requests on SIGTERM', async (t) => {
  const [listener, address] = await tcpListener(t);
  const worker = new Worker(t, {
    listener,
    env: { CLUSTERD_APP: 'web', CLUSTERD_WORKER_ID: '3', CLUSTERD_GENERATION: '2' },
  });
  const pid = worker.child.pid;
  assert.equal(await worker.listeningOn(), address);
  assert.match(await worker.logLine(/listening on/), /\(inherited fd 3\)/);

  const idle = new Client(t, address);
  const hi = await idle.get('/');
  assert.equal(hi.status, 200);
  assert.equal(hi.headers['content-type'], 'text/plain; charset=utf-8');
  assert.equal(hi.body, `hello from web[3] pid ${pid} generation 2\n`);
  const whoami = await idle.get('/whoami');
  assert.equal(whoami.headers['content-type'], 'application/json');
  assert.equal(whoami.body, `{"app":"web","slot":3,"pid":${pid},"generation":2}`);
  assert.equal((await idle.get('/nope')).status, 404);

  const busy = new Client(t, address);
  busy.send('/sleep/500');
  // A barrier: connections are accepted and read in order on Node's single thread, so once
  // this later connection is answered the sleep request is being served.
  assert.equal((await new Client(t, address).get('/')).status, 200);

  worker.child.kill('SIGTERM');
  assert.ok(await idle.closedByServer(), 'idle keep-alive connection closed');
  const slept = await busy.readResponse();
  assert.equal(slept.status, 200);
  assert.equal(slept.body, 'slept 500 ms\n');
  assert.equal(slept.headers.connection, 'close');
  assert.ok(await busy.closedByServer());
  assert.equal(await worker.exitCode(), 0);
  await worker.logLine(/exiting: all connections closed/);
});

test('binds PORT when LISTEN_PID names another process', async (t) => {
  const worker = new Worker(t, { env: { LISTEN_FDS: '1', LISTEN_PID: '1', PORT: '0' } });
  const line = await worker.logLine(/listening on /);
  const [, bound] = /listening on (127\.0\.0\.1:\d+) \(bound by server\.js\)/.exec(line);
  const response = await new Client(t, bound).get('/sleep/10');
  assert.equal(response.body, 'slept 10 ms\n');
  worker.child.kill('SIGINT');
  assert.equal(await worker.exitCode(), 0);
});

test('a readiness notification without CLUSTERD_EXE is reported, not fatal', async (t) => {
  const worker = new Worker(t, { env: { PORT: '0', NOTIFY_SOCKET: '/nonexistent/notify.sock' } });
  await worker.logLine(/NOTIFY_SOCKET is set but CLUSTERD_EXE is not: cannot send READY=1/);
  const bound = await worker.listeningOn();
  assert.equal((await new Client(t, bound).get('/')).status, 200);
  worker.child.kill('SIGTERM');
  assert.equal(await worker.exitCode(), 0);
});

test('a malformed LISTEN_FDS exits 2', async (t) => {
  const [listener] = await tcpListener(t);
  const worker = new Worker(t, { listener, env: { LISTEN_FDS: 'one' } });
  assert.equal(await worker.exitCode(), 2);
  await worker.logLine(/LISTEN_FDS="one" is not a number of fds/);
});
