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
// ERR_INVALID_ARG_TYPE for options of the wrong type.
'use strict';

const fs = require('node:fs');
const path = require('node:path');

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
  return native.connectNative({
    seeds: seedList(options.seeds),
    segment: optionalString(options, 'segment'),
    segmentDir: optionalString(options, 'segmentDir'),
    namespace: optionalString(options, 'namespace'),
    tendInterval: milliseconds(options, 'tendInterval'),
    sharedMemory: options.sharedMemory,
    connectTimeout: milliseconds(options, 'connectTimeout'),
    commandTimeout: milliseconds(options, 'commandTimeout'),
  });
}

module.exports = {
  connect,
  KvClient: native.KvClient,
  // tendOwners(dir?, prefix?): the host's segments and who tends each (ownerSinceUs is on
  // the clock of monotonicMicros()).
  tendOwners: native.tendOwners,
  monotonicMicros: native.monotonicMicros,
  addonPath: file,
};
