/**
 * The RPC client's deadlines cover its sends: a DEALER with no live connection holds a send (here `immediate`, so a
 * connection that never completes holds it, as a handshake the server refuses can), and a call must still end with
 * WEFT_TIMEOUT, a generate with WEFT_CANCELLED when its signal aborts.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as zmq from 'zeromq';
import { WeftClient, type WeftClientOptions } from '../../coordinator/api/client.ts';
import { isWeftError } from '../../core/errors.ts';

// The client over a socket of the test's making (its constructor is private: connect() makes its own socket).
const clientOver = (socket: zmq.Dealer, options: WeftClientOptions): WeftClient =>
  new (WeftClient as unknown as new (socket: zmq.Dealer, options: WeftClientOptions) => WeftClient)(socket, options);

// A DEALER that holds every send: connected to a port nobody listens on, with `immediate` (no pipe until connected).
async function heldSocket(): Promise<{ socket: zmq.Dealer; endpoint: string }> {
  const probe = new zmq.Router();
  await probe.bind('tcp://127.0.0.1:*');
  const endpoint = probe.lastEndpoint!;
  probe.close(); // the port is free again: the dealer's connection attempts are refused
  const socket = new zmq.Dealer({ linger: 0, immediate: true });
  socket.connect(endpoint);
  return { socket, endpoint };
}

test('a call whose send the socket holds ends with WEFT_TIMEOUT at its deadline', { timeout: 30_000 }, async () => {
  const { socket, endpoint } = await heldSocket();
  const client = clientOver(socket, { endpoint, timeoutMs: 300 });
  try {
    const started = Date.now();
    await assert.rejects(client.health(), (err: unknown) => isWeftError(err) && err.code === 'WEFT_TIMEOUT');
    assert.ok(Date.now() - started < 20_000, 'the deadline ended the call');
  } finally {
    await client.close();
  }
});

test('a generate whose held send ends with WEFT_CANCELLED when its signal aborts', { timeout: 30_000 }, async () => {
  const { socket, endpoint } = await heldSocket();
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
  }
});
