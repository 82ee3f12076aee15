/**
 * SendQueue, over sockets of the test's making: sends run one at a time, in order; on a socket without a send
 * timeout an EAGAIN is tried again (there it only means the socket stopped being writable between its report and
 * the send); with a send timeout, and for any other error, the send fails with the socket's error.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import type * as zmq from 'zeromq';
import { SendQueue } from '../../core/wire.ts';

type Frames = Array<Buffer | Uint8Array | string>;

// A socket whose sends fail with the given errors, one per send, then succeed; it records what it took.
function fakeSocket(sendTimeout: number, failures: string[]): { socket: zmq.Writable; taken: string[]; tries: number } {
  const state = { taken: [] as string[], tries: 0, busy: false };
  const socket = {
    sendTimeout,
    async send(frames: Frames): Promise<void> {
      assert.equal(state.busy, false, 'a second send began while one was pending');
      state.busy = true;
      state.tries++;
      await new Promise((resolve) => setTimeout(resolve, 1));
      state.busy = false;
      const code = failures.shift();
      if (code) throw Object.assign(new Error(`fake ${code}`), { code });
      state.taken.push(String(frames[0]));
    },
  } as unknown as zmq.Writable;
  return {
    socket,
    get taken() { return state.taken; },
    get tries() { return state.tries; },
  };
}

test('sends on one socket run one at a time, in the order they were queued', async () => {
  const fake = fakeSocket(-1, []);
  const queue = new SendQueue(fake.socket);
  await Promise.all(['a', 'b', 'c'].map((frame) => queue.send([frame])));
  assert.deepEqual(fake.taken, ['a', 'b', 'c']);
});

test('without a send timeout, a send refused with EAGAIN is tried again and lands, in order', async () => {
  const fake = fakeSocket(-1, ['EAGAIN', 'EAGAIN']);
  const queue = new SendQueue(fake.socket);
  await Promise.all([queue.send(['first']), queue.send(['second'])]);
  assert.deepEqual(fake.taken, ['first', 'second']);
  assert.equal(fake.tries, 4);
});

test('with a send timeout, EAGAIN is the timeout: the send fails and the next one still goes', async () => {
  const fake = fakeSocket(5000, ['EAGAIN']);
  const queue = new SendQueue(fake.socket);
  const first = queue.send(['first']);
  const second = queue.send(['second']);
  await assert.rejects(first, { code: 'EAGAIN' });
  await second;
  assert.deepEqual(fake.taken, ['second']);
});

test('any other send error (a closed socket) fails the send at once, without a retry', async () => {
  const fake = fakeSocket(-1, ['EBADF']);
  const queue = new SendQueue(fake.socket);
  await assert.rejects(queue.send(['lost']), { code: 'EBADF' });
  assert.equal(fake.tries, 1);
});
