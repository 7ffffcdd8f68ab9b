// clusterd-kv for Node.js: loads the native addon that `cargo build --workspace` (or
// `--release`) builds from this directory's crate, and exports `connect`.
//
//   const { connect } = require('.../bindings/node');
//   const kv = await connect({ seeds: '127.0.0.1:7000,127.0.0.1:7001', segment: 'app' });
//   await kv.set('user:1', '{"name":"ada"}');
//   const record = await kv.get('user:1');     // Buffer or null (kv.getString: string or null)
//   await kv.del('user:1');                     // true if it existed
//   kv.stats();                                 // { role: 'owner' | 'follower' | ..., ownerPid, ... }
//   await kv.close();                           // another process takes over tending at once
//   tendOwners(dir, prefix);                    // who tends the host's segments (as clusterd status)
//
// The library: $CLUSTERD_KV_NODE_ADDON if set, else the newest of
// target/{release,debug}/libclusterd_kv_node.so of the workspace (or of $CARGO_TARGET_DIR).
// It is loaded with process.dlopen, so no copy or rename to `.node` is needed.
//
// Errors reject with an Error whose `code` is stable: ERR_KV_CONNECT, ERR_KV_COMMAND,
// ERR_KV_CLOSED, ERR_KV_INVALID_OPTION, ... (see src/lib.rs, `error_code`), or
// ERR_INVALID_ARG_TYPE for options (or keys and values) of the wrong type.
//
// Split of the work: the addon keeps the cluster map (the shared segment read through its
// seqlock, the tend lock, the tend owner's topology reads, the futex wake-up of the owner on
// a MOVED); the commands themselves run here, on Node's event loop (connection.js: `net`
// sockets and RESP), so a GET never leaves the JavaScript thread. For each command the
// addon's `route` names the node for the key's slot from the current map (one atomic load
// when the map has not changed); a MOVED is reported to the addon (`noteMoved`: patch the
// local map, wake the owner) and the command retried on the right node; an ASK is followed
// with ASKING, as by the Rust client.
'use strict';

const fs = require('node:fs');
const path = require('node:path');
const { Connection, ReplyError, encode } = require('./connection');

const LIBRARY = 'libclusterd_kv_node.so';
const OVERRIDE = 'CLUSTERD_KV_NODE_ADDON';

// The candidate libraries, the newest first.
function candidates() {
  const targets = [];
  if (process.env.CARGO_TARGET_DIR) {
    targets.push(path.resolve(process.env.CARGO_TARGET_DIR));
  }
  targets.push(path.resolve(__dirname, '..', '..', 'target'));
  const found = [];
  for (const target of targets) {
    for (const profile of ['release', 'debug']) {
      const file = path.join(target, profile, LIBRARY);
      try {
        found.push({ file, mtime: fs.statSync(file).mtimeMs });
      } catch {
        // Not built in this profile.
      }
    }
  }
  return found.sort((a, b) => b.mtime - a.mtime).map((c) => c.file);
}

function load() {
  const chosen = process.env[OVERRIDE] || candidates()[0];
  if (!chosen) {
    const error = new Error(
      `${LIBRARY} not found: run \`cargo build --workspace\` (or --release) in the clusterd ` +
        `workspace, or set ${OVERRIDE} to the library's path`,
    );
    error.code = 'ERR_KV_ADDON_NOT_FOUND';
    throw error;
  }
  const module = { exports: {} };
  process.dlopen(module, path.resolve(chosen));
  return { native: module.exports, file: path.resolve(chosen) };
}

const { native, file } = load();

function invalid(message) {
  const error = new TypeError(message);
  error.code = 'ERR_INVALID_ARG_TYPE';
  return error;
}

function milliseconds(options, name) {
  const value = options[name];
  if (value === undefined || value === null) {
    return undefined;
  }
  if (!Number.isInteger(value) || value < 0 || value > 0xffffffff) {
    throw invalid(`options.${name} must be a whole number of milliseconds, got ${value}`);
  }
  return value;
}

function optionalString(options, name) {
  const value = options[name];
  if (value === undefined || value === null) {
    return undefined;
  }
  if (typeof value !== 'string') {
    throw invalid(`options.${name} must be a string, got ${typeof value}`);
  }
  return value;
}

// `seeds`: "host:port,host:port" or ["host:port", ...]; blank entries are ignored.
function seedList(seeds) {
  const list = typeof seeds === 'string' ? seeds.split(',') : seeds;
  if (!Array.isArray(list) || !list.every((s) => typeof s === 'string')) {
    throw invalid('options.seeds must be a "host:port,..." string or an array of strings');
  }
  return list.map((s) => s.trim()).filter((s) => s !== '');
}

/** Redirections followed for one command before giving up (as the Rust client). */
const MAX_REDIRECTS = 5;

function kvError(code, message) {
  const error = new Error(message);
  error.code = code;
  return error;
}

function closedError() {
  return kvError('ERR_KV_CLOSED', 'the KV client is closed');
}

/** A key or value as bytes: strings as UTF-8, Buffers (and Uint8Arrays) as they are. */
function bytes(value, what) {
  if (typeof value === 'string') {
    return Buffer.from(value, 'utf8');
  }
  if (value instanceof Uint8Array) {
    return value;
  }
  throw invalid(`${what} must be a string or a Buffer, got ${value === null ? 'null' : typeof value}`);
}

/** `MOVED <slot> <host:port>` / `ASK <slot> <host:port>`: the target, with the asked host when empty. */
function redirection(message, asked) {
  const parts = message.split(' ');
  let to = parts[2] || '';
  if (to.startsWith(':')) {
    to = asked.slice(0, asked.lastIndexOf(':')) + to;
  }
  return { slot: Number(parts[1]), to };
}

/** The connections of one client, by node address. Knows nothing of the client. */
class Pool {
  constructor(timeouts) {
    this.timeouts = timeouts;
    this.connections = new Map();
    this.forget = (connection) => {
      if (this.connections.get(connection.addr) === connection) {
        this.connections.delete(connection.addr);
      }
    };
  }

  get(addr) {
    let connection = this.connections.get(addr);
    if (connection === undefined) {
      connection = new Connection(addr, this.timeouts, this.forget);
      if (connection.dead === null) {
        this.connections.set(addr, connection);
      }
    }
    return connection;
  }

  /** Closes every connection; their pending commands reject with `error`. */
  destroy(error) {
    const all = [...this.connections.values()];
    this.connections.clear();
    for (const connection of all) {
      connection.fail(error);
    }
  }
}

// A client that is garbage-collected without close() drops its sockets (the addon's own
// Drop releases the tend lock).
const orphans = new FinalizationRegistry((pool) => pool.destroy(closedError()));

/**
 * A connected client (from `connect()`). `get`, `getString`, `set`, `del` and `close`
 * return promises; `route` and `stats` answer at once.
 */
class KvClient {
  constructor(handle, { connectTimeout = 1000, commandTimeout = 1000 }) {
    this._handle = handle;
    this._pool = new Pool({ connectTimeout, commandTimeout });
    this._closed = false;
    this._counts = { commands: 0, moved: 0, ask: 0 };
    orphans.register(this, this._pool, this);
  }

  /** The value at `key` (a string, as UTF-8, or a Buffer) as a Buffer, or null. */
  get(key) {
    return this._run('GET', bytes(key, 'key'), null, bulkReply);
  }

  /** The value at `key` decoded as UTF-8 (invalid sequences become U+FFFD), or null. */
  getString(key) {
    return this._run('GET', bytes(key, 'key'), null, stringReply);
  }

  /** Stores `value` (a string, stored as UTF-8, or a Buffer) at `key`. */
  set(key, value) {
    return this._run('SET', bytes(key, 'key'), bytes(value, 'value'), okReply);
  }

  /** Deletes `key`; resolves true if it existed. */
  del(key) {
    return this._run('DEL', bytes(key, 'key'), null, countReply);
  }

  /** The node (`host:port`) the client's map routes `key` to, or null. */
  route(key) {
    return this._handle.route(bytes(key, 'key'));
  }

  /** The client's role and counters, with the segment's owner facts. */
  stats() {
    const stats = this._handle.stats();
    stats.commands += this._counts.commands;
    stats.moved += this._counts.moved;
    stats.ask += this._counts.ask;
    return stats;
  }

  /**
   * Releases the tend lock (a waiting process takes over at once), leaves the segment and
   * closes the connections; later commands (and unanswered ones) reject with ERR_KV_CLOSED.
   * Idempotent.
   */
  async close() {
    if (!this._closed) {
      this._closed = true;
      orphans.unregister(this);
      this._pool.destroy(closedError());
    }
    await this._handle.close();
  }

  /**
   * Runs `name key [value]` on the node that serves the key's slot, following MOVED and ASK;
   * `check(reply, addr)` turns the final reply into the result.
   */
  async _run(name, key, value, check) {
    if (this._closed) {
      throw closedError();
    }
    this._counts.commands += 1;
    let addr = this._handle.route(key);
    if (addr === null) {
      const slot = native.keySlot(key);
      throw kvError('ERR_KV_NO_ROUTE', `no node serves hash slot ${slot} in the cluster map`);
    }
    const command = encode(value === null ? [name, key] : [name, key, value]);
    let asking = false;
    let reconnected = false;
    for (let hop = 0; hop <= MAX_REDIRECTS; hop += 1) {
      const connection = this._pool.get(addr);
      let reply;
      try {
        reply = await connection.send(command, asking);
      } catch (e) {
        if (this._closed) {
          throw closedError();
        }
        if (e.kind === 'io' && !reconnected) {
          // A stale connection (node restarted, idle timeout): reconnect once.
          this._handle.requestRefresh();
          reconnected = true;
          continue;
        }
        if (e.kind === 'connect') {
          throw kvError('ERR_KV_CONNECT', `connecting to Redis node ${addr}: ${e.message}`);
        }
        throw kvError('ERR_KV_COMMAND', `${name} on Redis node ${addr}: ${e.message}`);
      }
      if (!(reply instanceof ReplyError)) {
        return check(reply, addr, name);
      }
      const message = reply.message;
      if (message.startsWith('MOVED ')) {
        const { slot, to } = redirection(message, addr);
        this._counts.moved += 1;
        this._handle.noteMoved(slot, to);
        addr = to;
        asking = false;
      } else if (message.startsWith('ASK ')) {
        this._counts.ask += 1;
        addr = redirection(message, addr).to;
        asking = true;
      } else {
        throw kvError('ERR_KV_COMMAND', `${name} on Redis node ${addr}: ${message}`);
      }
    }
    const slot = native.keySlot(key);
    throw kvError(
      'ERR_KV_TOO_MANY_REDIRECTS',
      `hash slot ${slot}: gave up after ${MAX_REDIRECTS} redirections (last to ${addr})`,
    );
  }
}

function unexpected(reply, addr, name) {
  const shown = Buffer.isBuffer(reply) ? `bulk string of ${reply.length} bytes` : JSON.stringify(reply);
  return kvError('ERR_KV_COMMAND', `${name} on Redis node ${addr}: unexpected reply ${shown}`);
}

function bulkReply(reply, addr, name) {
  if (reply === null || Buffer.isBuffer(reply)) {
    return reply;
  }
  throw unexpected(reply, addr, name);
}

function stringReply(reply, addr, name) {
  return bulkReply(reply, addr, name)?.toString('utf8') ?? null;
}

function okReply(reply, addr, name) {
  if (reply !== 'OK') {
    throw unexpected(reply, addr, name);
  }
}

function countReply(reply, addr, name) {
  if (typeof reply !== 'number') {
    throw unexpected(reply, addr, name);
  }
  return reply > 0;
}

/**
 * Connects a client; resolves once it can route (as the host's tend owner or a follower).
 *
 * @param {object} options
 * @param {string|string[]} options.seeds  seed nodes, "host:port,..." or an array
 * @param {string} [options.segment]       segment name prefix ($CLUSTERD_KV_SEGMENT, else clusterd-kv)
 * @param {string} [options.segmentDir]    segment directory ($CLUSTERD_KV_DIR, else /dev/shm)
 * @param {string} [options.namespace]     separates maps of clients with the same seeds
 * @param {number} [options.tendInterval]  ms between the owner's topology reads (1000)
 * @param {boolean} [options.sharedMemory] false: tend a private map, as every plain client does
 * @param {number} [options.connectTimeout] ms (1000)
 * @param {number} [options.commandTimeout] ms (1000)
 * @returns {Promise<KvClient>}
 */
async function connect(options) {
  if (options === null || typeof options !== 'object') {
    throw invalid('connect() needs an options object with `seeds`');
  }
  if (options.sharedMemory !== undefined && typeof options.sharedMemory !== 'boolean') {
    throw invalid('options.sharedMemory must be a boolean');
  }
  const connectTimeout = milliseconds(options, 'connectTimeout');
  const commandTimeout = milliseconds(options, 'commandTimeout');
  const handle = await native.connectNative({
    seeds: seedList(options.seeds),
    segment: optionalString(options, 'segment'),
    segmentDir: optionalString(options, 'segmentDir'),
    namespace: optionalString(options, 'namespace'),
    tendInterval: milliseconds(options, 'tendInterval'),
    sharedMemory: options.sharedMemory,
    connectTimeout,
    commandTimeout,
  });
  return new KvClient(handle, { connectTimeout, commandTimeout });
}

module.exports = {
  connect,
  KvClient,
  // tendOwners(dir?, prefix?): the host's segments and who tends each (ownerSinceUs is on
  // the clock of monotonicMicros()).
  tendOwners: native.tendOwners,
  monotonicMicros: native.monotonicMicros,
  addonPath: file,
};
