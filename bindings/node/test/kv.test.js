// get/set/del with strings and Buffers, error codes, stats and roles, ASK and MOVED (a slot
// migrated with redis-cli), in one process.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const fs = require('node:fs');
const { spawnSync } = require('node:child_process');
const { connect } = require('..');
const { seeds, freshSegment, waitFor } = require('./helpers');

test('strings and Buffers round-trip; del reports whether the key existed', async () => {
  const kv = await connect({ seeds, segment: freshSegment('rw') });
  try {
    await kv.set('user:1', '{"name":"ada"}');
    const got = await kv.get('user:1');
    assert.ok(Buffer.isBuffer(got));
    assert.equal(got.toString(), '{"name":"ada"}');
    assert.equal(await kv.getString('user:1'), '{"name":"ada"}');
    assert.equal(await kv.getString('unicode:ünï'), null);
    await kv.set('unicode:ünï', 'κλειδί ✓');
    assert.equal(await kv.getString('unicode:ünï'), 'κλειδί ✓');

    // Binary keys and values, with NULs and bytes that are not UTF-8.
    const key = Buffer.from([0x00, 0xff, 0x7b, 0x7d, 0x01]);
    const value = Buffer.from([0xde, 0xad, 0x00, 0xbe, 0xef, 0x80]);
    await kv.set(key, value);
    assert.deepEqual(await kv.get(key), value);
    assert.equal(await kv.get(key.toString('latin1')), null, 'a string key is UTF-8');
    // A string key and the Buffer of its UTF-8 bytes are the same key.
    assert.equal((await kv.get(Buffer.from('user:1'))).toString(), '{"name":"ada"}');

    assert.equal(await kv.del('user:1'), true);
    assert.equal(await kv.del('user:1'), false);
    assert.equal(await kv.get('user:1'), null);
    assert.equal(await kv.del(key), true);

    // Keys spread over all three masters, so every node is reached.
    const routes = new Set();
    const writes = [];
    for (let i = 0; i < 100; i += 1) {
      routes.add(kv.route(`k${i}`));
      writes.push(kv.set(`k${i}`, `v${i}`));
    }
    await Promise.all(writes);
    assert.equal(routes.size, 3, `routes: ${[...routes]}`);
    const values = await Promise.all([...Array(100).keys()].map((i) => kv.getString(`k${i}`)));
    assert.deepEqual(values, [...Array(100).keys()].map((i) => `v${i}`));
  } finally {
    await kv.close();
  }
});

test('errors are Error objects with a stable code', async () => {
  await assert.rejects(connect({ seeds: 'nohost' }), (e) => {
    assert.ok(e instanceof Error);
    assert.equal(e.code, 'ERR_KV_INVALID_OPTION');
    assert.match(e.message, /seeds/);
    return true;
  });
  await assert.rejects(connect({ seeds: 7 }), { code: 'ERR_INVALID_ARG_TYPE' });
  await assert.rejects(connect(), { code: 'ERR_INVALID_ARG_TYPE' });
  await assert.rejects(connect({ seeds, tendInterval: 1 }), { code: 'ERR_KV_INVALID_OPTION' });
  await assert.rejects(connect({ seeds, segment: 'a/b' }), { code: 'ERR_KV_INVALID_OPTION' });
  // Nobody listens on port 1: no node answers the topology query.
  await assert.rejects(
    connect({ seeds: '127.0.0.1:1', segment: freshSegment('down'), connectTimeout: 200 }),
    (e) => {
      assert.ok(e instanceof Error);
      assert.match(e.code, /^ERR_KV_(TOPOLOGY|CONNECT)$/);
      return true;
    },
  );

  const kv = await connect({ seeds, segment: freshSegment('closed') });
  // Sent, but its reply cannot arrive before close() settles it.
  const unanswered = assert.rejects(kv.get('x'), { code: 'ERR_KV_CLOSED' });
  await kv.close();
  await unanswered;
  await kv.close(); // idempotent
  for (const attempt of [kv.get('x'), kv.set('x', 'y'), kv.del('x'), kv.getString('x')]) {
    await assert.rejects(attempt, (e) => {
      assert.ok(e instanceof Error);
      assert.equal(e.code, 'ERR_KV_CLOSED');
      return true;
    });
  }
  assert.equal(kv.stats().role, 'closed');
  assert.throws(() => kv.get(42), /./, 'a key must be a string or a Buffer');
});

test('stats: one owner tends, a second client in the same process follows', async () => {
  const segment = freshSegment('stats');
  const owner = await connect({ seeds, segment, tendInterval: 30_000 });
  const follower = await connect({ seeds, segment, tendInterval: 30_000 });
  try {
    const o = owner.stats();
    const f = follower.stats();
    assert.equal(o.role, 'owner');
    assert.equal(f.role, 'follower');
    assert.equal(o.ownerPid, process.pid);
    assert.equal(f.ownerPid, process.pid);
    assert.ok(o.mapGeneration >= 1, JSON.stringify(o));
    assert.equal(f.mapGeneration, o.mapGeneration);
    assert.ok(o.topologyCommands >= 1, JSON.stringify(o));
    assert.equal(o.publishes, 1);
    assert.equal(f.topologyCommands, 0, 'a follower reads no topology');
    assert.ok(f.snapshotCopies >= 1);

    await follower.set('s', '1');
    await follower.get('s');
    assert.equal(follower.stats().commands, 2);

    // close() hands the lock over at once (the tend interval is 30 s: no poll helps).
    await owner.close();
    await waitFor('the follower to take over', () => follower.stats().role === 'owner', 5_000);
    const s = follower.stats();
    assert.equal(s.takeovers, 1);
    assert.equal(s.ownerEpoch, o.ownerEpoch + 1);
    assert.equal(await follower.getString('s'), '1');
  } finally {
    await owner.close();
    await follower.close();
  }
});

test('sharedMemory: false tends a private map', async () => {
  const kv = await connect({ seeds, sharedMemory: false });
  try {
    const s = kv.stats();
    assert.equal(s.role, 'local');
    assert.equal(s.ownerPid, null);
    assert.ok(s.topologyCommands >= 1);
    await kv.set('local', Buffer.from('x'));
    assert.equal(await kv.getString('local'), 'x');
  } finally {
    await kv.close();
  }
});

// redis-cli against one node of the test cluster.
function cli(addr, ...args) {
  const [host, port] = addr.split(':');
  const out = spawnSync('redis-cli', ['-h', host, '-p', port, ...args], { encoding: 'utf8', timeout: 10_000 });
  assert.equal(out.status, 0, `redis-cli -p ${port} ${args.join(' ')}: ${out.stderr}`);
  return out.stdout.trim();
}

test('ASK and MOVED are followed on the event loop; MOVED wakes the tend owner', async () => {
  const segment = freshSegment('moved');
  // A 30 s tend interval: only the follower's wake-up can make the owner re-read the map.
  const owner = await connect({ seeds, segment, tendInterval: 30_000 });
  const follower = await connect({ seeds, segment, tendInterval: 30_000 });
  const key = `moved:${segment}`;
  try {
    await follower.set(key, 'before');
    const from = follower.route(key);
    const to = seeds.split(',').find((n) => n !== from);
    const slot = cli(from, 'CLUSTER', 'KEYSLOT', key);
    const id = (addr) => cli(addr, 'CLUSTER', 'MYID');

    // Mid-migration, with the key already on the target: the source answers ASK.
    cli(to, 'CLUSTER', 'SETSLOT', slot, 'IMPORTING', id(from));
    cli(from, 'CLUSTER', 'SETSLOT', slot, 'MIGRATING', id(to));
    const [toHost, toPort] = to.split(':');
    assert.equal(cli(from, 'MIGRATE', toHost, toPort, '', '0', '5000', 'KEYS', key), 'OK');
    assert.equal(await follower.getString(key), 'before');
    assert.equal(follower.stats().ask, 1);
    assert.equal(follower.stats().moved, 0);
    assert.equal(follower.route(key), from, 'ASK does not change the map');

    // The slot now belongs to the target on every node: the source answers MOVED.
    for (const node of [to, from, ...seeds.split(',').filter((n) => n !== to && n !== from)]) {
      cli(node, 'CLUSTER', 'SETSLOT', slot, 'NODE', id(to));
    }
    const ownerBefore = owner.stats();
    assert.equal(await follower.getString(key), 'before');
    const f = follower.stats();
    assert.equal(f.moved, 1);
    assert.equal(f.refreshRequests, 1);
    assert.equal(f.topologyCommands, 0, 'the follower reads no topology');
    assert.equal(follower.route(key), to, 'the MOVED patched the local map');
    // The owner tends at once and publishes the new map.
    await waitFor('the owner to re-read the map', () => owner.route(key) === to, 5_000);
    assert.ok(owner.stats().topologyCommands > ownerBefore.topologyCommands);
    await follower.set(key, 'after');
    assert.equal(await owner.getString(key), 'after');
    assert.equal(owner.stats().moved, 0, 'the owner routed by the refreshed map');
  } finally {
    await follower.del(key).catch(() => {});
    await owner.close();
    await follower.close();
  }
});

test('a node that does not answer within commandTimeout: ERR_KV_COMMAND, then a new connection', async () => {
  const kv = await connect({ seeds, segment: freshSegment('timeout'), commandTimeout: 100 });
  const key = `timeout:${process.pid}`;
  const node = kv.route(key);
  try {
    // The node holds writes until CLIENT UNPAUSE (which, unlike a pause of ALL, it answers).
    assert.equal(cli(node, 'CLIENT', 'PAUSE', '30000', 'WRITE'), 'OK');
    try {
      await assert.rejects(kv.set(key, 'paused'), (e) => {
        assert.equal(e.code, 'ERR_KV_COMMAND');
        assert.match(e.message, /^SET on Redis node .*: no reply within 100 ms$/);
        return true;
      });
    } finally {
      cli(node, 'CLIENT', 'UNPAUSE');
    }
    await kv.set(key, 'v');
    assert.equal(await kv.getString(key), 'v');
  } finally {
    await kv.del(key).catch(() => {});
    await kv.close();
  }
});

/** Bytes the kernel holds unread for the TCP socket from local port `port` (/proc/net/tcp). */
function unreadBytes(port) {
  const hex = port.toString(16).toUpperCase().padStart(4, '0');
  for (const line of fs.readFileSync('/proc/net/tcp', 'utf8').split('\n').slice(1)) {
    const fields = line.trim().split(/\s+/);
    if (fields.length > 4 && fields[1].endsWith(`:${hex}`)) {
      return Number.parseInt(fields[4].split(':')[1], 16);
    }
  }
  return 0;
}

test('a reply that arrived while the process was too busy to read it is not a timeout', async () => {
  const kv = await connect({ seeds, segment: freshSegment('stall'), commandTimeout: 100 });
  const key = `stall:${process.pid}`;
  try {
    await kv.set(key, 'v');
    const socket = kv._pool.connections.get(kv.route(key)).socket;
    const got = kv.getString(key);
    // After the GET is written (the flush is the tick's first callback), block the event loop
    // past the command timeout, until the reply waits in the socket.
    process.nextTick(() => {
      const started = performance.now();
      while (performance.now() - started < 200 || unreadBytes(socket.localPort) === 0) {
        assert.ok(performance.now() - started < 10_000, 'no reply within 10 s');
      }
    });
    assert.equal(await got, 'v');
  } finally {
    await kv.del(key).catch(() => {});
    await kv.close();
  }
});
