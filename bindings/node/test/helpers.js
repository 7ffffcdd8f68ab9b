// Shared by the binding's tests: the cluster and segment directory the Rust driver
// (tests/node.rs) set up, a fresh segment prefix per test, and waiting with a deadline.
'use strict';

const { randomBytes } = require('node:crypto');

const seeds = process.env.REDIS_CLUSTER;
if (!seeds || !process.env.CLUSTERD_KV_DIR) {
  throw new Error(
    'REDIS_CLUSTER and CLUSTERD_KV_DIR must be set: run these tests through ' +
      '`cargo test -p clusterd-kv-node`, which starts a Redis cluster for them',
  );
}

/** A segment prefix no other test uses, so that tests never share a tend lock. */
function freshSegment(name) {
  return `nt-${name}-${randomBytes(4).toString('hex')}`;
}

/** Polls `check` (which may be async) every 20 ms until it returns a truthy value. */
async function waitFor(what, check, timeoutMs = 10_000) {
  const deadline = Date.now() + timeoutMs;
  for (;;) {
    const value = await check();
    if (value) {
      return value;
    }
    if (Date.now() > deadline) {
      throw new Error(`timed out after ${timeoutMs} ms waiting for ${what}`);
    }
    await new Promise((resolve) => setTimeout(resolve, 20));
  }
}

module.exports = { seeds, freshSegment, waitFor };
