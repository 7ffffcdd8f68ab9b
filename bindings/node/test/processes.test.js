// Several Node processes on one segment: exactly one tend owner; close(), process.exit()
// without close and kill -9 each hand the lock to another process at once (the tend
// interval is 30 s, so no polling can be what notices); nothing keeps a closed client's
// process alive, nor an idle open one's.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const path = require('node:path');
const readline = require('node:readline');
const { spawn } = require('node:child_process');
const { tendOwners, monotonicMicros } = require('..');
const { seeds, freshSegment, waitFor } = require('./helpers');

const AGENT = path.join(__dirname, 'fixtures', 'agent.js');

/** A child agent process and a request/response channel over its stdio. */
class Agent {
  constructor(segment, ...args) {
    this.child = spawn(process.execPath, [AGENT, segment, ...args], {
      stdio: ['pipe', 'pipe', 'inherit'],
    });
    this.pid = this.child.pid;
    this.replies = [];
    this.waiters = [];
    this.exited = new Promise((resolve) => this.child.on('exit', (code, signal) => resolve({ code, signal })));
    readline.createInterface({ input: this.child.stdout }).on('line', (line) => {
      const value = JSON.parse(line);
      const waiter = this.waiters.shift();
      if (waiter) {
        waiter(value);
      } else {
        this.replies.push(value);
      }
    });
  }

  next() {
    if (this.replies.length > 0) {
      return Promise.resolve(this.replies.shift());
    }
    return new Promise((resolve) => this.waiters.push(resolve));
  }

  async ask(command) {
    this.child.stdin.write(`${command}\n`);
    return this.next();
  }

  async stats() {
    return (await this.ask('stats')).stats;
  }

  kill() {
    this.child.kill('SIGKILL');
  }
}

async function startAgents(segment, n) {
  const agents = [...Array(n)].map(() => new Agent(segment));
  for (const agent of agents) {
    const first = await agent.next();
    assert.ok(first.connected, JSON.stringify(first));
  }
  return agents;
}

async function owners(agents) {
  const all = await Promise.all(agents.map((a) => a.stats()));
  return agents.filter((_, i) => all[i].role === 'owner');
}

async function stopAll(agents) {
  for (const agent of agents) {
    agent.kill();
    await agent.exited;
  }
}

test('exactly one owner among four processes, and every process names it', async () => {
  const segment = freshSegment('one');
  const agents = await startAgents(segment, 4);
  try {
    const stats = await Promise.all(agents.map((a) => a.stats()));
    const owning = stats.filter((s) => s.role === 'owner');
    assert.equal(owning.length, 1, JSON.stringify(stats));
    const ownerPid = agents[stats.indexOf(owning[0])].pid;
    // The kernel's lock table agrees.
    const [info, ...others] = tendOwners(process.env.CLUSTERD_KV_DIR, segment);
    assert.equal(others.length, 0);
    assert.equal(info.lockPid, ownerPid);
    assert.equal(info.ownerPid, ownerPid);
    assert.ok(info.ownerSinceUs <= monotonicMicros());
    for (const s of stats) {
      assert.equal(s.ownerPid, ownerPid);
      if (s.role === 'follower') {
        assert.equal(s.topologyCommands, 0);
      }
    }
    assert.deepEqual(await agents[1].ask('set shared v1'), { ok: true });
    assert.deepEqual(await agents[2].ask('get shared'), { ok: 'v1' });
  } finally {
    await stopAll(agents);
  }
});

for (const [how, end] of [
  ['close()', async (agent) => assert.deepEqual(await agent.ask('close'), { closed: true })],
  ['process.exit() without close()', async (agent) => {
    agent.child.stdin.write('exit\n');
    assert.deepEqual(await agent.exited, { code: 0, signal: null });
  }],
  ['kill -9', async (agent) => {
    agent.kill();
    await agent.exited;
  }],
]) {
  test(`${how} of the owner hands the lock to another process at once`, async () => {
    const agents = await startAgents(freshSegment('handover'), 3);
    try {
      const [first] = await owners(agents);
      const before = await first.stats();
      const ended = Date.now();
      await end(first);
      const rest = agents.filter((a) => a !== first);
      const [next] = await waitFor('a new owner', async () => {
        const found = await owners(rest);
        return found.length > 0 && found;
      }, 5_000);
      const took = Date.now() - ended;
      assert.ok(took < 2_000, `takeover took ${took} ms`);
      assert.equal((await owners(rest)).length, 1);
      const s = await next.stats();
      assert.equal(s.ownerPid, next.pid);
      assert.equal(s.ownerEpoch, before.ownerEpoch + 1);
      assert.deepEqual(await next.ask('set after v2'), { ok: true });
    } finally {
      await stopAll(agents);
    }
  });
}

for (const [how, mode] of [['closed', 'once'], ['idle and open', 'idle']]) {
  test(`a process whose client is ${how} exits by itself`, async () => {
    const agent = new Agent(freshSegment(mode), mode);
    assert.deepEqual(await agent.next(), { done: true });
    const timeout = setTimeout(() => agent.kill(), 10_000);
    const exit = await agent.exited;
    clearTimeout(timeout);
    assert.deepEqual(exit, { code: 0, signal: null }, 'the process should exit on its own');
  });
}
