/**
 * The pieces under every authenticated link: a connection's MAC (core/frame-auth.ts) is valid only under its own
 * secret, link, nonces, hello and direction, for the exact frames, with a rising counter; refusals are logged once
 * per peer and rate-limited; the responsive clock (core/loop-clock.ts) leaves its own stalls out of what it counts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { FrameAuth, MAC_BYTES, RefusalLog, newNonce, requireSecret } from '../../core/frame-auth.ts';
import { ResponsiveClock } from '../../core/loop-clock.ts';
import { isWeftError } from '../../core/errors.ts';

const SECRET = 'frame-auth-test-secret';
const clientNonce = newNonce();
const serverNonce = newNonce();
const hello = Buffer.from('hello frame');
const frames = [Buffer.from('message'), Buffer.from([1, 2, 3])];

const pair = (secret = SECRET, link: 'control' | 'collective' = 'control') => ({
  client: FrameAuth.derive(secret, link, 'client', clientNonce, serverNonce, hello),
  server: FrameAuth.derive(SECRET, 'control', 'server', clientNonce, serverNonce, hello),
});

test('a MAC opens only on its own connection, for the exact frames, in the direction it was made', () => {
  const { client, server } = pair();
  const mac = client.seal(frames);
  assert.equal(mac.byteLength, MAC_BYTES);
  assert.ok(server.open(frames, mac), 'the server opens what the client sealed');
  assert.ok(client.open(frames, server.seal(frames)), 'and the other way');
  const { client: other } = pair();
  assert.ok(!pair().server.open([Buffer.from('messagf'), frames[1]!], other.seal(frames)), 'another frame');
  assert.ok(!pair().server.open([Buffer.concat(frames)], pair().client.seal(frames)), 'frame boundaries count');
  assert.ok(!pair().server.open(frames, pair('another-group-secret').client.seal(frames)), 'another secret');
  assert.ok(!pair().server.open(frames, pair(SECRET, 'collective').client.seal(frames)), 'another link');
  const otherNonce = FrameAuth.derive(SECRET, 'control', 'client', newNonce(), serverNonce, hello);
  assert.ok(!pair().server.open(frames, otherNonce.seal(frames)), 'another connection (nonce)');
  const otherHello = FrameAuth.derive(SECRET, 'control', 'client', clientNonce, serverNonce, Buffer.from('other hello'));
  assert.ok(!pair().server.open(frames, otherHello.seal(frames)), 'another hello');
  const fresh = pair();
  assert.ok(!fresh.client.open(frames, fresh.client.seal(frames)), "a MAC reflected back to its maker (the other direction's key)");
  assert.ok(!fresh.server.open(frames, undefined) && !fresh.server.open(frames, Buffer.alloc(MAC_BYTES)) && !fresh.server.open(frames, Buffer.alloc(3)), 'missing, zero or short');
});

test('counters rise: a replay on the same connection is refused, a gap (a message lost) is not', () => {
  const { client, server } = pair();
  const first = client.seal(frames);
  client.seal(frames); // lost on the way
  const third = client.seal(frames);
  assert.ok(server.open(frames, first));
  assert.ok(!server.open(frames, first), 'the same MAC again');
  assert.ok(server.open(frames, third), 'after a gap');
  assert.ok(!server.open(frames, first), 'an older one');
});

test('every group has a secret of at least 16 characters', () => {
  const refused = (pattern: RegExp) => (err: unknown) => isWeftError(err) && err.code === 'WEFT_BAD_REQUEST' && pattern.test(err.message);
  assert.throws(() => requireSecret(undefined, 'the worker group'), refused(/the worker group needs the group's shared secret/));
  assert.throws(() => requireSecret('', 'x'), refused(/needs the group's shared secret/));
  assert.throws(() => requireSecret('123456789012345', 'x'), refused(/15 characters, at least 16/));
  assert.equal(requireSecret(SECRET, 'x'), SECRET);
});

test('refusals: one line per peer, at most `burst` lines per window, then a count', () => {
  const lines: string[] = [];
  const log = new RefusalLog((line) => lines.push(line), 3, 60_000);
  for (let i = 0; i < 100; i++) log.refuse('peer-a', `refused a (${i})`);
  assert.deepEqual(lines, ['refused a (0)'], 'a flood from one peer is one line');
  for (let i = 0; i < 50; i++) log.refuse(`peer-${i}`, `refused ${i}`);
  assert.equal(lines.length, 3, 'a flood of peers: the burst, no more');
});

test('the responsive clock leaves out its own stalls: a late probe is a stall, an on-time one is not', () => {
  let wall = 1000;
  const clock = new ResponsiveClock(100, () => wall);
  const start = clock.now();
  wall += 100;
  assert.equal(clock.probe(), 0);
  wall += 3100; // the loop was blocked for 3 s: the probe ran 3000 ms late
  assert.equal(clock.probe(), 3000);
  assert.equal(clock.now() - start, 200, 'only the responsive time counts');
  wall += 500; // no probe yet: time runs on
  assert.equal(clock.now() - start, 700);
  assert.equal(clock.stalledMs(), 3000);
});
