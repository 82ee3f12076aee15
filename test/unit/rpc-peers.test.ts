/**
 * The RPC server's sends to a client that left or stops reading (reliability.md: a slow or non-reading peer must
 * never stall the server; per-peer sends with a bounded high-water mark, the peer dropped when it is reached): its
 * generations are cancelled, not streamed into a socket nobody reads, and the other clients are served meanwhile.
 * Against a stand-in cluster whose generations stream tokens until cancelled.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as zmq from 'zeromq';
import { pack, unpack } from 'msgpackr';
import { RpcServer } from '../../coordinator/api/server.ts';
import type { Cluster } from '../../coordinator/cluster.ts';
import type { GenerationHandle } from '../../coordinator/scheduler.ts';
import type { GenerationEvent } from '../../coordinator/generate.ts';
import { waitFor } from '../helpers/fixtures.ts';

/**
 * A cluster whose generations stream tokens until cancelled or `limit` tokens: a prompt of 3 ids `burst` tokens at a
 * time (a flood), others one every 5 ms; it counts the cancels.
 */
function endlessCluster(burst: number, limit: number): { cluster: Cluster; cancelled: () => number } {
  let cancelled = 0;
  const submit = async (request: { promptIds: number[] }): Promise<GenerationHandle> => {
    let stop = false;
    const flood = request.promptIds.length === 3;
    async function* events(): AsyncGenerator<GenerationEvent> {
      for (let sent = 0; !stop && sent < limit; ) {
        for (let i = 0; i < (flood ? burst : 1); i++, sent++) yield { type: 'token', token: 7, text: 'x' } as GenerationEvent;
        await new Promise((r) => setTimeout(r, flood ? 0 : 5));
      }
    }
    return { promptTokens: 1, events: events(), cancel: () => { stop = true; cancelled++; } };
  };
  return { cluster: { submit } as unknown as Cluster, cancelled: () => cancelled };
}

const generate = (id: number, promptIds = [1, 2, 3]): Buffer => pack({ v: 1, type: 'generate', id, promptIds });

test('a client that leaves mid-stream, sending no cancel, has its generation cancelled', async () => {
  const fake = endlessCluster(1, 100_000);
  const server = await RpcServer.start(fake.cluster);
  const client = new zmq.Dealer({ linger: 0 });
  try {
    client.connect(server.endpoint);
    await client.send(generate(1));
    const [first] = await client.receive();
    assert.equal((unpack(first!) as { type: string }).type, 'token');
    client.close(); // killed, say: no cancel
    assert.ok(await waitFor(() => fake.cancelled() === 1, 20_000), 'the generation of the departed client was cancelled');
  } finally {
    if (!client.closed) client.close();
    await server.close();
  }
});

test('a client that stops reading is dropped at the high-water mark, its generation cancelled; another client streams on', async () => {
  const fake = endlessCluster(1000, 2_000_000);
  const server = await RpcServer.start(fake.cluster);
  const stalled = new zmq.Dealer({ linger: 0, receiveHighWaterMark: 1 });
  const reader = new zmq.Dealer({ linger: 0 });
  try {
    stalled.connect(server.endpoint);
    reader.connect(server.endpoint);
    await reader.send(generate(1, [1]));
    await reader.receive();
    await stalled.send(generate(1)); // a flood, never read
    let read = 1;
    let longestGapMs = 0;
    let last = Date.now();
    const until = Date.now() + 30_000; // a wait for the drop, not a measure
    while (fake.cancelled() === 0 && Date.now() < until) {
      await reader.receive();
      read++;
      longestGapMs = Math.max(longestGapMs, Date.now() - last);
      last = Date.now();
    }
    assert.equal(fake.cancelled(), 1, `the stalled client's flood was cancelled (the reader got ${read} tokens meanwhile)`);
    // a server whose sends waited on the stalled client would hold the reader until the 30 s above; a loaded
    // 2-core CI machine has paused a healthy reader for 2.1 s, so the bound is wide
    assert.ok(longestGapMs < 10_000, `the reader waited ${longestGapMs} ms between two tokens`);
  } finally {
    stalled.close();
    reader.close();
    await server.close();
  }
});
