/**
 * The set-up of shared-gpu collectives that runs without a GPU: trading handles over the CPU hub (what the workers
 * do: exchangeOver), and how a failed set-up is reported: every rank fails together, naming each memory it tried
 * and why. The collectives themselves run in the GPU suite (test/gpu/shared-gpu.test.ts).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createEngine, nativeInfo } from '../../worker/native.ts';
import { bindCollectiveHub, CpuCollectives } from '../../worker/collectives/cpu.ts';
import { SharedGpuCollectives, exchangeOver, type HandleExchange } from '../../worker/collectives/shared-gpu.ts';
import { HUB_SECRET } from '../helpers/collectives-contract.ts';

/** An exchange between ranks of this process: each round resolves once every rank has given its bytes. */
function inMemoryExchange(world: number): (rank: number) => HandleExchange {
  let given: Uint8Array[] = [];
  let waiting: ((all: Uint8Array[]) => void)[] = [];
  let arrived = 0;
  return (rank) => (mine) =>
    new Promise((resolve) => {
      given[rank] = Uint8Array.from(mine);
      waiting.push(resolve);
      if (++arrived < world) return;
      const all = given;
      const wake = waiting;
      [given, waiting, arrived] = [[], [], 0];
      wake.forEach((w) => w(all));
    });
}

test('exchangeOver the CPU hub: every rank gets every rank’s bytes (empty, handle-sized, name-sized) in rank order', { timeout: 30_000 }, async () => {
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  const hub = await bindCollectiveHub('127.0.0.1');
  const world = 3;
  const comms = await Promise.all(Array.from({ length: world }, (_, r) => CpuCollectives.create(engine, r, world, r === 0 ? hub.socket : null, hub.endpoint, { secret: HUB_SECRET })));
  try {
    const mine = [new Uint8Array(), Uint8Array.from({ length: 64 }, (_, i) => (i * 37 + 255) & 0xff), Buffer.from('/weft-shared-gpu-4242-0-123456789')];
    const results = await Promise.all(comms.map((comm, r) => exchangeOver(comm, engine)(mine[r]!)));
    results.forEach((all, r) => assert.deepEqual(all.map((b) => Array.from(b)), mine.map((b) => Array.from(b)), `rank ${r}`));
  } finally {
    comms.forEach((comm) => comm.close());
  }
});

test('a set-up that fails fails on every rank, naming each memory tried and why', { skip: nativeInfo().cuda && 'a CUDA build: test/gpu/shared-gpu.test.ts covers its set-up' }, async () => {
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  for (const [memory, pattern] of [
    ['device-ipc', /rank \d: shared-GPU collectives over device-ipc memory failed: rank 0: sharedGpuGroup: weft was built without CUDA/],
    ['auto', /rank \d: shared-GPU collectives failed over device IPC \(rank 0: sharedGpuGroup: weft was built without CUDA.*\) and over \/dev\/shm host memory \(rank 0: sharedGpuGroup: weft was built without CUDA/],
  ] as const) {
    const exchange = inMemoryExchange(2);
    const logged: string[] = [];
    const outcomes = await Promise.allSettled([0, 1].map((r) => SharedGpuCollectives.create(engine, 0, r, 2, exchange(r), { memory, log: (line) => logged.push(line) })));
    outcomes.forEach((o, r) => {
      assert.equal(o.status, 'rejected', `${memory}: rank ${r}`);
      assert.match(String((o as PromiseRejectedResult).reason), pattern);
    });
    if (memory === 'auto') assert.equal(logged.length, 2, 'each rank says it moves to /dev/shm');
  }
});
