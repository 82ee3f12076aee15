/**
 * The RPC client's deadlines cover its sends: a DEALER with no live connection holds a send (here `immediate`, so a
 * connection that never completes holds it, as a handshake the server refuses can), and a call must still end with
 * WEFT_TIMEOUT, a generate with WEFT_CANCELLED when its signal aborts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtemp, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as zmq from 'zeromq';
import { WeftClient, type WeftClientOptions } from '../../coordinator/api/client.ts';
import { isWeftError } from '../../core/errors.ts';

// The client over a socket of the test's making (its constructor is private: connect() makes its own socket).
const clientOver = (socket: zmq.Dealer, options: WeftClientOptions): WeftClient =>
  new (WeftClient as unknown as new (socket: zmq.Dealer, options: WeftClientOptions) => WeftClient)(socket, options);

// A DEALER that holds every send: connected (with `immediate`: no pipe until connected) to an IPC path in a fresh
// directory that nothing binds. A closed TCP port would do the same until some other process took the port.
async function heldSocket(): Promise<{ socket: zmq.Dealer; endpoint: string; dir: string }> {
  const dir = await mkdtemp(join(tmpdir(), 'weft-held-'));
  const endpoint = `ipc://${join(dir, 'nobody.sock')}`;
  const socket = new zmq.Dealer({ linger: 0, immediate: true });
  socket.connect(endpoint);
  return { socket, endpoint, dir };
}

test('a call whose send the socket holds ends with WEFT_TIMEOUT at its deadline', { timeout: 30_000 }, async () => {
  const { socket, endpoint, dir } = await heldSocket();
  const client = clientOver(socket, { endpoint, timeoutMs: 300 });
  try {
    const started = Date.now();
    await assert.rejects(client.health(), (err: unknown) => isWeftError(err) && err.code === 'WEFT_TIMEOUT');
    assert.ok(Date.now() - started < 20_000, 'the deadline ended the call');
  } finally {
    await client.close();
    await rm(dir, { recursive: true, force: true });
  }
});

test('a generate whose held send ends with WEFT_CANCELLED when its signal aborts', { timeout: 30_000 }, async () => {
  const { socket, endpoint, dir } = await heldSocket();
  const client = clientOver(socket, { endpoint });
  const abort = new AbortController();
  const timer = setTimeout(() => abort.abort(), 300);
  try {
    const run = async (): Promise<void> => {
      const events = client.generate({ prompt: 'hi' }, { signal: abort.signal });
      for await (const _ of events) assert.fail('no event can come');
    };
    await assert.rejects(run(), (err: unknown) => isWeftError(err) && err.code === 'WEFT_CANCELLED');
  } finally {
    clearTimeout(timer);
    await client.close();
    await rm(dir, { recursive: true, force: true });
  }
});
