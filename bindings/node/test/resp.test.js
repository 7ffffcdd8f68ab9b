// The data path's RESP encoding and incremental reply parsing (connection.js), without a
// server: every reply split at every byte boundary parses the same.
'use strict';

const test = require('node:test');
const assert = require('node:assert/strict');
const { Parser, ReplyError, encode, splitAddr } = require('../connection');

function parseAll(chunks) {
  const parser = new Parser();
  const replies = [];
  for (const chunk of chunks) {
    parser.push(chunk, (reply) => replies.push(reply));
  }
  return replies;
}

const WIRE = Buffer.concat([
  Buffer.from('+OK\r\n:42\r\n:-7\r\n$-1\r\n$0\r\n\r\n$5\r\nhe\r\no\r\n'),
  Buffer.from('-MOVED 3999 127.0.0.1:7001\r\n*3\r\n$1\r\na\r\n*-1\r\n*1\r\n:1\r\n*0\r\n'),
]);
const EXPECTED = [
  'OK', 42, -7, null, Buffer.alloc(0), Buffer.from('he\r\no'),
  new ReplyError('MOVED 3999 127.0.0.1:7001'), [Buffer.from('a'), null, [1]], [],
];

test('replies parse the same in one chunk, split anywhere, and byte by byte', () => {
  assert.deepEqual(parseAll([WIRE]), EXPECTED);
  for (let at = 1; at < WIRE.length; at += 1) {
    assert.deepEqual(parseAll([WIRE.subarray(0, at), WIRE.subarray(at)]), EXPECTED, `split at ${at}`);
  }
  assert.deepEqual(parseAll([...WIRE].map((b) => Buffer.from([b]))), EXPECTED);
});

test('a large bulk string arriving in many chunks parses whole, as a copy', () => {
  const value = Buffer.alloc(1 << 20, 0xab);
  const wire = Buffer.concat([Buffer.from(`$${value.length}\r\n`), value, Buffer.from('\r\n+OK\r\n')]);
  const chunks = [];
  for (let at = 0; at < wire.length; at += 65536) {
    chunks.push(wire.subarray(at, at + 65536));
  }
  const [got, ok] = parseAll(chunks);
  assert.ok(got.equals(value));
  assert.equal(ok, 'OK');
  assert.notEqual(got.buffer, wire.buffer);
});

test('a byte that starts no RESP reply is an error, not a hang', () => {
  assert.throws(() => parseAll([Buffer.from('?x\r\n')]), /not a RESP reply/);
  assert.throws(() => parseAll([Buffer.from(':4x\r\n')]), /not a RESP integer/);
});

test('commands encode as RESP arrays of bulk strings, strings as UTF-8', () => {
  assert.equal(
    encode(['SET', 'ü', Buffer.from([0, 255])]).toString('latin1'),
    '*3\r\n$3\r\nSET\r\n$2\r\n\u00c3\u00bc\r\n$2\r\n\u0000\u00ff\r\n',
  );
});

test('node addresses split like the Rust client', () => {
  assert.deepEqual(splitAddr('127.0.0.1:7000'), { host: '127.0.0.1', port: 7000 });
  assert.deepEqual(splitAddr('[::1]:7000'), { host: '::1', port: 7000 });
  assert.deepEqual(splitAddr('redis.local:6379'), { host: 'redis.local', port: 6379 });
  for (const bad of [':7000', 'host', 'host:http', 'host:70000']) {
    assert.equal(splitAddr(bad), null, bad);
  }
});
