// One connection to one Redis node, driven by Node's event loop (`net`): commands are
// pipelined in order, replies are RESP2 and matched to commands first in, first out.
//
// The KV client (index.js) sends key commands here; everything about the map — routing,
// MOVED reports, the tend lock — stays in the native addon. A connection knows nothing of
// its client, so an idle one keeps no client alive.
//
// Failures reject a command's promise with a ConnectionError whose `kind` is 'connect' (the
// connection never came up), 'io' (it failed or closed with the command unanswered) or
// 'timeout' (no reply within the command timeout; the connection is then dropped, as the
// Rust client drops it). A reply that is a Redis error resolves as a ReplyError.
'use strict';

const net = require('node:net');
const { performance } = require('node:perf_hooks');

const CR = 13;
const CRLF = '\r\n';
/** `ASKING`, sent before a command that follows an ASK redirection. */
const ASKING = Buffer.from(`*1${CRLF}$6${CRLF}ASKING${CRLF}`, 'latin1');

/** A Redis error reply (`-MOVED 3999 127.0.0.1:7001`, `-ERR ...`). */
class ReplyError {
  constructor(message) {
    this.message = message;
  }
}

/** Why a command got no reply: `kind` is 'connect', 'io' or 'timeout'. */
class ConnectionError extends Error {
  constructor(kind, message) {
    super(message);
    this.kind = kind;
  }
}

/**
 * A command in RESP: `*n` then each argument as a bulk string. Arguments are Buffers or
 * strings (written as UTF-8).
 */
function encode(args) {
  let size = 0;
  const parts = new Array(args.length);
  for (let i = 0; i < args.length; i += 1) {
    const arg = typeof args[i] === 'string' ? Buffer.from(args[i], 'utf8') : args[i];
    parts[i] = arg;
    size += arg.length;
  }
  let head = `*${args.length}${CRLF}`;
  size += head.length;
  for (const part of parts) {
    size += String(part.length).length + 5; // $<len>\r\n ... \r\n
  }
  const out = Buffer.allocUnsafe(size);
  let at = out.latin1Write(head, 0);
  for (const part of parts) {
    head = `$${part.length}${CRLF}`;
    at += out.latin1Write(head, at);
    at += part.copy(out, at);
    out[at] = CR;
    out[at + 1] = 10;
    at += 2;
  }
  return out;
}

/** Where a parse stopped for lack of bytes. */
const INCOMPLETE = -1;

/** An incremental RESP2 reply parser; `value` holds the last reply parsed. */
class Parser {
  constructor() {
    this.pending = null; // chunks of an incomplete reply, or null
    this.pendingBytes = 0;
    this.need = 0; // bytes the incomplete reply needs at least (absolute while parsing)
    this.value = undefined;
  }

  /** Adds received bytes; calls `deliver(reply)` for each complete reply. */
  push(chunk, deliver) {
    if (this.pending !== null) {
      this.pending.push(chunk);
      this.pendingBytes += chunk.length;
      if (this.pendingBytes < this.need) {
        return;
      }
      chunk = Buffer.concat(this.pending, this.pendingBytes);
      this.pending = null;
    }
    let at = 0;
    while (at < chunk.length) {
      const next = this.parse(chunk, at);
      if (next === INCOMPLETE) {
        const rest = chunk.subarray(at);
        this.pending = [rest];
        this.pendingBytes = rest.length;
        this.need -= at;
        return;
      }
      at = next;
      deliver(this.value);
    }
  }

  /** Parses one reply at `at`: the offset after it (value in `this.value`), or INCOMPLETE. */
  parse(buf, at) {
    const end = buf.indexOf(CR, at + 1);
    if (end < 0 || end + 1 >= buf.length) {
      this.need = buf.length + 1;
      return INCOMPLETE;
    }
    const type = buf[at];
    if (type === 0x24 /* $ */) {
      const len = integer(buf, at + 1, end);
      if (len < 0) {
        this.value = null;
        return end + 2;
      }
      const start = end + 2;
      if (start + len + 2 > buf.length) {
        this.need = start + len + 2;
        return INCOMPLETE;
      }
      // A copy: the caller may keep it, and must not keep the whole socket chunk alive.
      this.value = Buffer.from(buf.subarray(start, start + len));
      return start + len + 2;
    }
    if (type === 0x2b /* + */) {
      this.value = buf.toString('utf8', at + 1, end);
      return end + 2;
    }
    if (type === 0x3a /* : */) {
      this.value = integer(buf, at + 1, end);
      return end + 2;
    }
    if (type === 0x2d /* - */) {
      this.value = new ReplyError(buf.toString('utf8', at + 1, end));
      return end + 2;
    }
    if (type === 0x2a /* * */) {
      const n = integer(buf, at + 1, end);
      if (n < 0) {
        this.value = null;
        return end + 2;
      }
      const items = new Array(n);
      let next = end + 2;
      for (let i = 0; i < n; i += 1) {
        if (next >= buf.length) {
          this.need = buf.length + 1;
          return INCOMPLETE;
        }
        next = this.parse(buf, next);
        if (next === INCOMPLETE) {
          return INCOMPLETE;
        }
        items[i] = this.value;
      }
      this.value = items;
      return next;
    }
    throw new ConnectionError('io', `not a RESP reply (first byte 0x${type.toString(16)})`);
  }
}

/** The decimal integer in `buf[from..to]` (with an optional leading `-`). */
function integer(buf, from, to) {
  let negative = false;
  if (buf[from] === 0x2d) {
    negative = true;
    from += 1;
  }
  let n = 0;
  for (let i = from; i < to; i += 1) {
    const digit = buf[i] - 0x30;
    if (digit < 0 || digit > 9) {
      throw new ConnectionError('io', `not a RESP integer: ${buf.toString('latin1', from, to)}`);
    }
    n = n * 10 + digit;
  }
  return negative ? -n : n;
}

/**
 * `host:port` (or `[v6]:port`) split at the last colon, or null: as the Rust client's
 * `split_addr`.
 */
function splitAddr(addr) {
  const colon = addr.lastIndexOf(':');
  if (colon < 0) {
    return null;
  }
  let host = addr.slice(0, colon);
  const portText = addr.slice(colon + 1);
  if (host.startsWith('[') && host.endsWith(']')) {
    host = host.slice(1, -1);
  }
  const port = Number(portText);
  if (host === '' || !/^[0-9]+$/.test(portText) || port > 65535) {
    return null;
  }
  return { host, port };
}

/** A connection to the node at `addr`; `onDead(connection)` runs once when it fails or closes. */
class Connection {
  constructor(addr, { connectTimeout, commandTimeout }, onDead) {
    this.addr = addr;
    this.commandTimeout = commandTimeout;
    this.onDead = onDead;
    this.dead = null; // the ConnectionError that ended it, once it ended
    this.connected = false;
    // Pending commands, oldest first: { resolve, reject, sent } from `head` on.
    this.queue = [];
    this.head = 0;
    this.out = []; // encoded commands waiting for this tick's flush
    this.timer = null; // the command-timeout check
    this.expiring = null; // its second look, after the loop's reads (see checkTimeout)
    this.parser = new Parser();
    this.flush = () => this.flushOut();
    this.deliver = (reply) => this.onReply(reply);

    const target = splitAddr(addr);
    if (target === null) {
      this.fail(new ConnectionError('connect', 'not a host:port address'));
      return;
    }
    this.socket = net.connect({ host: target.host, port: target.port, noDelay: true });
    // Only pending commands keep the process alive (as the native promises did).
    this.socket.unref();
    const connectTimer = setTimeout(() => {
      this.fail(new ConnectionError('connect', `connect timed out after ${connectTimeout} ms`));
    }, connectTimeout);
    connectTimer.unref();
    this.socket.once('connect', () => {
      clearTimeout(connectTimer);
      this.connected = true;
    });
    this.socket.on('data', (chunk) => {
      try {
        this.parser.push(chunk, this.deliver);
      } catch (e) {
        this.fail(e instanceof ConnectionError ? e : new ConnectionError('io', e.message));
      }
    });
    this.socket.on('error', (e) => {
      clearTimeout(connectTimer);
      this.fail(new ConnectionError(this.connected ? 'io' : 'connect', e.message));
    });
    this.socket.on('close', () => {
      clearTimeout(connectTimer);
      this.fail(new ConnectionError(this.connected ? 'io' : 'connect', 'connection closed'));
    });
  }

  /** Number of commands waiting for their reply. */
  get pending() {
    return this.queue.length - this.head;
  }

  /**
   * Sends `command` (encoded), preceded by ASKING when `asking`; resolves with the reply (a
   * ReplyError for an error reply).
   */
  send(command, asking) {
    if (this.dead !== null) {
      return Promise.reject(this.dead);
    }
    return new Promise((resolve, reject) => {
      if (this.pending === 0) {
        this.socket.ref();
      }
      const sent = performance.now();
      if (this.out.length === 0) {
        // The first command of this tick: the rest of the tick's go with it, in one write.
        process.nextTick(this.flush);
      }
      if (asking) {
        this.queue.push({ resolve: null, reject: null, sent, asking: true, answered: false });
        this.out.push(ASKING);
      }
      this.queue.push({ resolve, reject, sent, asking: false, answered: false });
      this.out.push(command);
      if (this.timer === null && this.expiring === null) {
        this.armTimer(this.commandTimeout);
      }
    });
  }

  flushOut() {
    if (this.dead !== null || this.out.length === 0) {
      return;
    }
    const out = this.out;
    this.out = [];
    this.socket.write(out.length === 1 ? out[0] : Buffer.concat(out));
  }

  onReply(reply) {
    if (this.head >= this.queue.length) {
      throw new ConnectionError('io', 'a reply nobody asked for');
    }
    const entry = this.queue[this.head];
    this.queue[this.head] = undefined;
    this.head += 1;
    if (this.head === this.queue.length) {
      this.queue.length = 0;
      this.head = 0;
      this.socket.unref();
    } else if (this.head > 1024 && this.head * 2 > this.queue.length) {
      this.queue = this.queue.slice(this.head);
      this.head = 0;
    }
    if (entry.asking) {
      // The reply of an ASKING: an error there is the command's answer.
      if (reply instanceof ReplyError) {
        const command = this.queue[this.head];
        command.answered = true;
        command.resolve(reply);
      }
      return;
    }
    if (!entry.answered) {
      entry.resolve(reply);
    }
  }

  armTimer(ms) {
    this.timer = setTimeout(() => this.checkTimeout(), ms);
    this.timer.unref();
  }

  /** Drops the connection if its oldest command waited too long; else re-arms. */
  checkTimeout(expired = null) {
    this.timer = null;
    this.expiring = null;
    if (this.dead !== null || this.pending === 0) {
      return;
    }
    const head = this.queue[this.head];
    const waited = performance.now() - head.sent;
    if (waited < this.commandTimeout) {
      this.armTimer(Math.ceil(this.commandTimeout - waited));
    } else if (expired === head) {
      this.fail(new ConnectionError('timeout', `no reply within ${this.commandTimeout} ms`));
    } else {
      // Timers run before the loop reads its sockets: after a stall of the whole process the
      // reply may already be here. Decide after this turn's reads (setImmediate runs then).
      this.expiring = setImmediate(() => this.checkTimeout(head));
    }
  }

  /** Ends the connection (idempotent): rejects every pending command with `error`. */
  fail(error) {
    if (this.dead !== null) {
      return;
    }
    this.dead = error;
    clearTimeout(this.timer);
    clearImmediate(this.expiring);
    this.timer = null;
    this.expiring = null;
    if (this.socket) {
      this.socket.destroy();
    }
    const queue = this.queue;
    const head = this.head;
    this.queue = [];
    this.head = 0;
    this.out = [];
    for (let i = head; i < queue.length; i += 1) {
      if (!queue[i].asking && !queue[i].answered) {
        queue[i].reject(error);
      }
    }
    this.onDead(this);
  }
}

module.exports = { Connection, ConnectionError, Parser, ReplyError, encode, splitAddr };
