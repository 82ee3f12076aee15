/**
 * The coordinator ↔ worker protocol: every message of both directions survives the wire (encode, decode, parse)
 * unchanged; malformed ones are refused with a WEFT_PROTOCOL error saying where. Then the two ends of the socket:
 * the coordinator's WorkerClient against fake ranks (a bad reply fails the request with an error naming the
 * rank, and the coordinator goes on), the group relaying rank 0's NCCL id, and a real worker (runWorker, in this
 * process) answering `ncclId` from a stand-in NCCL, or with the load error when there is none.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync } from 'node:child_process';
import { mkdtempSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as zmq from 'zeromq';
import { PROTOCOL_VERSION, decode, encode } from '../../core/wire.ts';
import { isWeftError } from '../../core/errors.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { parseCoordinatorMessage, parseWorkerMessage, type CoordinatorMessage, type WorkerMessage } from '../../core/worker-protocol.ts';
import { WorkerClient } from '../../coordinator/worker-client.ts';
import { WorkerGroup } from '../../coordinator/worker-group.ts';
import { runWorker } from '../../worker/main.ts';
import { FIXTURES, fixtureDir } from '../helpers/fixtures.ts';

const v = PROTOCOL_VERSION;
const spec = readModelSpec(fixtureDir('llama-tiny'));
const plan = planShards(spec, 2);
const ncclId = Uint8Array.from({ length: 128 }, (_, i) => (i * 7) & 0xff);
const batch = { tokens: [5, 6], positions: [3, 0], tokenSeq: [0, 1], kvBlockTable: [[0], [1]], logitRows: [0, 1], sample: { temperature: [0, 0.7], topK: [0, 40], topP: [1, 0.9], uniform: [0.1, 0.5] } };
const settings = { modelDir: '/models/tiny', spec, plan, device: 'cuda' as const, kvSlots: 4, maxContext: 64, threads: 1 };

const coordinatorMessages: CoordinatorMessage[] = [
  { v, type: 'init', id: 1, ...settings, device: 'cpu', collectiveRoot: 'tcp://127.0.0.1:5000' },
  { v, type: 'init', id: 2, ...settings, collectiveRoot: '', ncclId, deviceIndex: 1 },
  { v, type: 'step', id: 3, batch },
  { v, type: 'step', id: 4, batch: { tokens: [1], positions: [9], tokenSeq: [0], kvBlockTable: [[0]], logitRows: [0], scoreIds: [7], fullLogprobs: true } },
  { v, type: 'ncclId', id: 5 },
  { v, type: 'ping', session: 'abcdef0123456789' },
  { v, type: 'ping' },
  { v, type: 'shutdown' },
];

const workerMessages: WorkerMessage[] = [
  { v, type: 'hello', rank: 1, world: 2, pid: 4242, collectiveEndpoint: null, secret: 's3cret', hostname: 'node-a' },
  { v, type: 'hello', rank: 0, world: 2, pid: 4241, collectiveEndpoint: 'tcp://127.0.0.1:5000' },
  { v, type: 'heartbeat', rank: 0 },
  { v, type: 'progress', rank: 1, bytesRead: 10, bytesTotal: 100 },
  { v, type: 'reply', rank: 0, id: 1, command: 'init', result: { bytesLoaded: 123456 } },
  { v, type: 'reply', rank: 0, id: 3, command: 'step', result: { tokens: [17, 4] } },
  { v, type: 'reply', rank: 0, id: 4, command: 'step', result: { logprobs: [-0.5, -Infinity], fullLogprobs: new Uint8Array(new Float32Array([-1, -2]).buffer) } },
  { v, type: 'reply', rank: 1, id: 3, command: 'step', result: {} },
  { v, type: 'reply', rank: 0, id: 5, command: 'ncclId', result: { ncclId } },
  { v, type: 'error', rank: 1, id: 3, error: { code: 'WEFT_NATIVE', message: 'out of memory' } },
];

/** The wire carries byte fields as Buffers: compare messages by their encoding, which covers every field. */
const sameMessage = (actual: unknown, expected: unknown): void => assert.deepEqual(encode(actual), encode(expected));

test('every message of both directions round-trips through encode, decode and parse unchanged', () => {
  for (const message of coordinatorMessages) sameMessage(parseCoordinatorMessage(decode(encode(message))), message);
  for (const message of workerMessages) sameMessage(parseWorkerMessage(decode(encode(message))), message);
  const parsed = parseWorkerMessage(decode(encode(workerMessages[6])));
  assert.ok(parsed.type === 'reply' && parsed.command === 'step');
  assert.equal(parsed.result.logprobs?.[1], -Infinity, 'a log-prob of -Infinity is a value, not an error');
});

const refused = (parse: (value: unknown) => unknown, value: unknown, pattern: RegExp): void =>
  assert.throws(() => parse(decode(encode(value))), (err: unknown) => isWeftError(err) && err.code === 'WEFT_PROTOCOL' && pattern.test(err.message), `refused: ${pattern}`);

test('malformed messages are refused with a WEFT_PROTOCOL error saying where', () => {
  const stepReply = { v, type: 'reply', rank: 0, id: 3, command: 'step', result: { tokens: [1] } };
  refused(parseWorkerMessage, { ...stepReply, type: 'answer' }, /invalid worker message at type/);
  refused(parseWorkerMessage, { ...stepReply, command: 'load' }, /at command/);
  refused(parseWorkerMessage, { ...stepReply, result: { tokens: ['a'] } }, /at result\.tokens\.0/);
  refused(parseWorkerMessage, { ...stepReply, result: { tokens: [1], extra: true } }, /at result.*extra/);
  refused(parseWorkerMessage, { ...stepReply, result: { fullLogprobs: [1, 2] } }, /at result\.fullLogprobs: expected bytes/);
  refused(parseWorkerMessage, { ...stepReply, command: 'init', result: { tokens: [1] } }, /at result/);
  refused(parseWorkerMessage, { v, type: 'reply', rank: 0, id: 5, command: 'ncclId', result: { ncclId: new Uint8Array(127) } }, /NCCL unique id is 128 bytes/);
  refused(parseWorkerMessage, { v, type: 'reply', rank: 0, id: 3, ok: true, result: {} }, /at command/);
  refused(parseWorkerMessage, { v, type: 'error', rank: 0, id: 3, error: { code: 'WEFT_NATIVE' } }, /at error\.message/);
  refused(parseWorkerMessage, { v, type: 'hello', rank: -1, world: 2, pid: 1, collectiveEndpoint: null }, /at rank/);
  refused(parseCoordinatorMessage, { v, type: 'step', id: 3, batch: { ...batch, tokenSeq: [0] } }, /equal lengths/);
  refused(parseCoordinatorMessage, { v, type: 'init', id: 1, ...settings, collectiveRoot: '', spec: [] }, /at spec: expected an object/);
  refused(parseCoordinatorMessage, { v, type: 'ncclId', id: 5, rank: 0 }, /Unrecognized key: "rank"/);
  refused(parseCoordinatorMessage, { v, type: 'eval', id: 5 }, /at type/);
});

/** A fake rank on a Dealer socket: says hello, then lets the test read commands (pings skipped) and answer. */
async function fakeRank(endpoint: string, rank: number, world: number, secret: string) {
  const socket = new zmq.Dealer({ routingId: `rank-${rank}`, linger: 0 });
  socket.connect(endpoint);
  const send = (message: unknown): Promise<void> => socket.send(encode(message));
  await send({ v, type: 'hello', rank, world, pid: process.pid, collectiveEndpoint: `tcp://127.0.0.1:${7000 + rank}`, secret });
  return {
    send,
    async next(): Promise<CoordinatorMessage> {
      for (;;) {
        const [frame] = await socket.receive();
        const message = parseCoordinatorMessage(decode(frame!));
        if (message.type !== 'ping') return message;
      }
    },
    close: () => socket.close(),
  };
}

async function clientWithOneRank(faults: Error[]) {
  const client = await WorkerClient.bind({ world: 1, bindHost: '127.0.0.1', port: 0, heartbeatTimeoutMs: 30_000, secret: 'key', label: 'worker', childPid: () => undefined, onFailure: (err) => faults.push(err) });
  const rank = await fakeRank(client.endpoint, 0, 1, 'key');
  await client.join(5000);
  return { client, rank };
}

const protocolError = (pattern: RegExp) => (err: unknown) => isWeftError(err) && err.code === 'WEFT_PROTOCOL' && pattern.test(err.message);

test('a step reply with a bad shape fails the request with an error naming the rank, and the client goes on', async () => {
  const faults: Error[] = [];
  const { client, rank } = await clientWithOneRank(faults);
  try {
    const reply = client.request(0, { type: 'step', batch });
    const sent = await rank.next();
    assert.equal(sent.type, 'step');
    await rank.send({ v, type: 'reply', rank: 0, id: (sent as { id: number }).id, command: 'step', result: { tokens: 'not a list' } });
    await assert.rejects(reply, protocolError(/^worker rank 0: invalid worker message at result\.tokens/));
    assert.equal(faults.length, 1, 'the fault was reported once');
    await assert.rejects(client.request(0, { type: 'ncclId' }), protocolError(/rank 0/), 'a failed client refuses new requests with the same error');
    client.reset([process.pid]);
    await rank.send({ v, type: 'hello', rank: 0, world: 1, pid: process.pid, collectiveEndpoint: null, secret: 'key' });
    await client.join(5000);
    const again = client.request(0, { type: 'ncclId' });
    const second = await rank.next();
    await rank.send({ v, type: 'reply', rank: 0, id: (second as { id: number }).id, command: 'ncclId', result: { ncclId } });
    assert.deepEqual(Uint8Array.from((await again).ncclId), ncclId, 'the same client serves again after a reset');
  } finally {
    rank.close();
    await client.close(async () => undefined);
  }
});

test('a reply of the wrong command fails the request; a reply to an id never sent is dropped with a log line', async () => {
  const faults: Error[] = [];
  const { client, rank } = await clientWithOneRank(faults);
  const logged: string[] = [];
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string) => logged.push(String(chunk)) > 0) as typeof process.stderr.write;
  try {
    const reply = client.request(0, { type: 'step', batch });
    const { id } = (await rank.next()) as { id: number };
    await rank.send({ v, type: 'reply', rank: 0, id: id + 100, command: 'step', result: { tokens: [1] } });
    await rank.send({ v, type: 'reply', rank: 0, id, command: 'step', result: { tokens: [17, 4] } });
    assert.deepEqual(await reply, { tokens: [17, 4] }, 'the stray reply did not disturb the pending request');
    assert.match(logged.join(''), new RegExp(`dropped a reply from worker rank 0 to request ${id + 100}, which was never sent`));
    assert.equal(faults.length, 0);

    const init = client.request(0, { type: 'step', batch });
    const next = (await rank.next()) as { id: number };
    await rank.send({ v, type: 'reply', rank: 0, id: next.id, command: 'init', result: { bytesLoaded: 1 } });
    await assert.rejects(init, protocolError(new RegExp(`worker rank 0 answered request ${next.id} \\(step to rank 0\\) with a init reply`)));
  } finally {
    process.stderr.write = write;
    rank.close();
    await client.close(async () => undefined);
  }
});

test('an error reply fails the request with its code and the rank; a stranger sending garbage is only dropped', async () => {
  const faults: Error[] = [];
  const { client, rank } = await clientWithOneRank(faults);
  const stranger = new zmq.Dealer({ routingId: 'rank-7', linger: 0 });
  stranger.connect(client.endpoint);
  try {
    await stranger.send(Buffer.from([0xc1]));
    const reply = client.request(0, { type: 'step', batch });
    const { id } = (await rank.next()) as { id: number };
    await rank.send({ v, type: 'error', rank: 0, id, error: { code: 'WEFT_NATIVE', message: 'out of memory' } });
    await assert.rejects(reply, (err: unknown) => isWeftError(err) && err.code === 'WEFT_NATIVE' && err.message === 'worker rank 0: out of memory');
    assert.equal(faults.length, 1, 'only the rank that said hello could fail the client');
  } finally {
    stranger.close();
    rank.close();
    await client.close(async () => undefined);
  }
});

test('a cuda group of two asks rank 0 for the NCCL id, then sends it to every rank in init', async () => {
  const group = await WorkerGroup.bind({ world: 2, spawnLocal: false, secret: 'key', joinTimeoutMs: 5000 });
  const ranks = await Promise.all([0, 1].map((r) => fakeRank(group.endpoint, r, 2, 'key')));
  try {
    await group.join();
    const initDone = group.init(settings);
    const first = await ranks[0]!.next();
    assert.equal(first.type, 'ncclId', 'rank 0 is asked first');
    await ranks[0]!.send({ v, type: 'reply', rank: 0, id: (first as { id: number }).id, command: 'ncclId', result: { ncclId } });
    const inits = await Promise.all(ranks.map((r) => r.next()));
    for (const [r, init] of inits.entries()) {
      assert.ok(init.type === 'init', `rank ${r} gets init`);
      assert.deepEqual(Uint8Array.from(init.ncclId ?? []), ncclId, `rank ${r} gets rank 0's id`);
      assert.equal(init.collectiveRoot, 'tcp://127.0.0.1:7000', "rank 0's hub");
      await ranks[r]!.send({ v, type: 'reply', rank: r, id: init.id, command: 'init', result: { bytesLoaded: 10 } });
    }
    await initDone;
  } finally {
    ranks.forEach((r) => r.close());
    await group.close();
  }
});

test('a cuda group whose rank 0 cannot load NCCL fails its init with the load error, naming the rank', async () => {
  const previous = process.env.WEFT_NCCL_LIBRARY;
  process.env.WEFT_NCCL_LIBRARY = '/nonexistent/libnccl.so.2'; // the spawned workers inherit it
  const group = await WorkerGroup.bind({ world: 2, spawnLocal: true, joinTimeoutMs: 30_000 });
  try {
    await group.join();
    await assert.rejects(
      group.init({ ...settings, modelDir: fixtureDir('llama-tiny') }),
      (err: unknown) => isWeftError(err) && err.code === 'WEFT_NATIVE' && /^worker rank 0: cannot load \/nonexistent\/libnccl\.so\.2/.test(err.message),
    );
  } finally {
    if (previous === undefined) delete process.env.WEFT_NCCL_LIBRARY;
    else process.env.WEFT_NCCL_LIBRARY = previous;
    await group.close();
  }
});

test('a worker answers ncclId with the id its NCCL library makes', async () => {
  const lib = join(mkdtempSync(join(tmpdir(), 'weft-fake-nccl-')), 'libfake-nccl.so');
  execFileSync('cc', ['-shared', '-fPIC', '-O1', '-o', lib, join(FIXTURES, '..', 'fake-nccl', 'fake-nccl.c')]);
  const router = new zmq.Router({ linger: 0 });
  await router.bind('tcp://127.0.0.1:*');
  const worker = runWorker({ coordinator: router.lastEndpoint!, rank: 0, world: 1, collectiveHost: '127.0.0.1', coordinatorTimeoutMs: 30_000, ncclLibrary: lib });
  const receive = async (): Promise<WorkerMessage> => {
    for (;;) {
      const [, frame] = await router.receive();
      const message = parseWorkerMessage(decode(frame!));
      if (message.type !== 'heartbeat') return message;
    }
  };
  const command = (message: CoordinatorMessage): Promise<void> => router.send(['rank-0', encode(message)]);
  try {
    assert.equal((await receive()).type, 'hello');
    await command({ v, type: 'ncclId', id: 2 });
    const made = await receive();
    assert.ok(made.type === 'reply' && made.command === 'ncclId' && made.id === 2, JSON.stringify(made));
    // the stand-in library's id: byte i is 0 where i % 5 == 0, else i * 7
    assert.deepEqual(Array.from(made.result.ncclId.slice(0, 6)), [0, 7, 14, 21, 28, 0]);
  } finally {
    await command({ v, type: 'shutdown' });
    assert.equal(await worker, 0, 'the worker exits when told to');
    router.close();
  }
});
