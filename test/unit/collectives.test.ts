/**
 * One contract (test/helpers/collectives-contract.ts) run against every Collectives implementation this
 * machine has: the group of one, the CPU hub with 2 and 4 ranks, and NCCL with one rank (skipped, saying
 * why, without a CUDA build and a GPU; test/gpu/collectives.test.ts runs it on the GPU host). Then the CPU hub's
 * authentication: only peers that proved the group secret take part.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import * as zmq from 'zeromq';
import { createEngine } from '../../worker/native.ts';
import { bindCollectiveHub, CpuCollectives } from '../../worker/collectives/cpu.ts';
import { HUB_SECRET, collectiveContract, cpuHubImplementation, ncclImplementation, soloImplementation } from '../helpers/collectives-contract.ts';

collectiveContract(soloImplementation());
collectiveContract(cpuHubImplementation(2));
collectiveContract(cpuHubImplementation(4));
collectiveContract(ncclImplementation());

test('G11: the CPU hub reads pieces only from peers that proved the group secret; rogues get no tensor and are logged', { timeout: 30_000 }, async () => {
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  const hub = await bindCollectiveHub('127.0.0.1');
  const logged: string[] = [];
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string) => logged.push(String(chunk)) > 0) as typeof process.stderr.write;
  const rogues = [new zmq.Dealer({ linger: 0, routingId: 'rank-1' }), new zmq.Dealer({ linger: 0 }), new zmq.Dealer({ linger: 0 })];
  const received: Buffer[][] = [];
  const comms: CpuCollectives[] = [];
  try {
    const root = CpuCollectives.create(engine, 0, 2, hub.socket, hub.endpoint, { secret: HUB_SECRET, peerTimeoutMs: 5000 });
    for (const rogue of rogues) {
      rogue.connect(hub.endpoint);
      void (async () => {
        for await (const frames of rogue) received.push(frames);
      })().catch(() => undefined);
    }
    const seq0 = Buffer.alloc(4);
    const bogus = Buffer.from(new Float32Array([1e6, 1e6]).buffer);
    const rank1 = Buffer.alloc(4);
    rank1.writeUInt32LE(1, 0);
    // the old routing id and a random one, sending pieces without a handshake; a hello whose proof is made up
    await rogues[0]!.send([seq0, bogus]);
    await rogues[1]!.send([seq0, bogus, Buffer.alloc(40)]);
    await rogues[2]!.send([Buffer.from('weft.hello'), rank1, Buffer.alloc(16, 7)]);
    await new Promise((r) => setTimeout(r, 200));
    await rogues[2]!.send([Buffer.from('weft.auth'), Buffer.alloc(40)]);
    // a real peer with another secret is refused, and says so
    await assert.rejects(
      CpuCollectives.create(engine, 1, 2, null, hub.endpoint, { secret: 'another-group-secret', peerTimeoutMs: 500 }),
      /rank 1: the collective hub at tcp:\/\/127\.0\.0\.1:\d+ did not welcome this rank within 500 ms/,
    );
    comms.push(await root, await CpuCollectives.create(engine, 1, 2, null, hub.endpoint, { secret: HUB_SECRET, peerTimeoutMs: 5000 }));
    // with rank 1 joined, a second peer for it (with the secret) is refused; the rogues try again
    await assert.rejects(CpuCollectives.create(engine, 1, 2, null, hub.endpoint, { secret: HUB_SECRET, peerTimeoutMs: 500 }), /did not welcome this rank/);
    await rogues[0]!.send([seq0, bogus]);
    const pieces = [new Float32Array([1, 2]), new Float32Array([10, 20])];
    const sums = await Promise.all(comms.map(async (comm, r) => engine.download(await comm.allReduce(engine.upload(new Uint8Array(pieces[r]!.buffer), 'f32', [1, 2])))));
    sums.forEach((sum, r) => assert.deepEqual(Array.from(sum), [11, 22], `rank ${r} summed only the real pieces`));
    await new Promise((r) => setTimeout(r, 200));
    assert.ok(received.length > 0, 'the rogue that said hello got its challenge');
    for (const frames of received) assert.equal(frames[0]!.toString(), 'weft.challenge', 'a rogue gets a challenge at most, never a piece');
    const log = logged.join('');
    assert.match(log, /weft worker rank 0: collective hub: dropped a message \(2 frames\) from connection [0-9a-f]+, which has not proven the group secret/);
    assert.match(log, /hub: refused a peer claiming rank 1 \(connection [0-9a-f]+\): its proof does not match the group secret/);
    assert.match(log, /hub: refused a second peer for rank 1 \(connection [0-9a-f]+\): rank 1 already joined/);
  } finally {
    process.stderr.write = write;
    rogues.forEach((rogue) => rogue.close());
    comms.forEach((comm) => comm.close());
  }
});

test('two ranks: the hub\'s first collective, issued before the peer has joined, waits for it (bounded) instead of failing', { timeout: 30_000 }, async () => {
  const engine = createEngine({ backend: 'cpu', threads: 1 });
  const hub = await bindCollectiveHub('127.0.0.1');
  const root = await CpuCollectives.create(engine, 0, 2, hub.socket, hub.endpoint, { secret: HUB_SECRET, peerTimeoutMs: 5000 });
  const upload = (values: number[]) => engine.upload(new Uint8Array(Float32Array.from(values).buffer), 'f32', [values.length]);
  const early = root.allReduce(upload([1, 2])); // no peer yet: the hub must not send to a rank that has not joined
  await new Promise((resolve) => setTimeout(resolve, 100));
  const peer = await CpuCollectives.create(engine, 1, 2, null, hub.endpoint, { secret: HUB_SECRET, peerTimeoutMs: 5000 });
  try {
    const [a, b] = await Promise.all([early, peer.allReduce(upload([10, 20]))]);
    assert.deepEqual([...(engine.download(a!) as Float32Array)], [11, 22]);
    assert.deepEqual([...(engine.download(b!) as Float32Array)], [11, 22]);
    // and a peer that never comes fails the hub's collective within its bound, naming it
    const alone = await CpuCollectives.create(engine, 0, 2, (await bindCollectiveHub('127.0.0.1')).socket, 'unused', { secret: HUB_SECRET, peerTimeoutMs: 300 });
    await assert.rejects(alone.allReduce(upload([1])), /rank 0: allReduce #0: rank 1 did not join the collective hub within 300 ms/);
    alone.close();
  } finally {
    root.close();
    peer.close();
  }
});
