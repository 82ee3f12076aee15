/**
 * The coordinator ↔ worker protocol: every message of both directions survives the wire (encode, decode, parse)
 * unchanged; malformed ones are refused with a WEFT_PROTOCOL error saying where. Then the two ends of the socket:
 * the coordinator's WorkerClient against fake ranks (a bad reply fails the request with an error naming the
 * rank, and the coordinator goes on; connections that have not proven the group secret, or replay another's
 * frames, or claim a rank held by a live process, are refused and logged), the group relaying rank 0's NCCL id,
 * and a real worker (runWorker, in this process) answering `ncclId` from a stand-in NCCL, or with the load error
 * when there is none, and obeying only messages with a valid MAC.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { execFileSync, spawn } from 'node:child_process';
import { mkdtempSync, readFileSync } from 'node:fs';
import { hostname, tmpdir } from 'node:os';
import { join } from 'node:path';
import * as zmq from 'zeromq';
import { PROTOCOL_VERSION, decode, encode } from '../../core/wire.ts';
import { isWeftError } from '../../core/errors.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { planShards } from '../../core/shard-plan.ts';
import { parseCoordinatorMessage, parseWorkerMessage, type CoordinatorMessage, type WorkerMessage } from '../../core/worker-protocol.ts';
import { FrameAuth, newNonce } from '../../core/frame-auth.ts';
import { WorkerClient, alive } from '../../coordinator/worker-client.ts';
import { WorkerGroup } from '../../coordinator/worker-group.ts';
import { runWorker } from '../../worker/main.ts';
import { FIXTURES, fixtureDir, waitFor } from '../helpers/fixtures.ts';
import { FakeRank } from '../helpers/fake-worker.ts';

const v = PROTOCOL_VERSION;
const SECRET = 'worker-protocol-test-secret';
const nonce = '0123456789abcdef0123456789abcdef';
const spec = readModelSpec(fixtureDir('llama-tiny'));
const plan = planShards(spec, 2);
const ncclId = Uint8Array.from({ length: 128 }, (_, i) => (i * 7) & 0xff);
const batch = { tokens: [5, 6], positions: [3, 0], tokenSeq: [0, 1], kvBlockTable: [[0], [1]], logitRows: [0, 1], sample: { temperature: [0, 0.7], topK: [0, 40], topP: [1, 0.9], uniform: [0.1, 0.5] } };
const settings = { modelDir: '/models/tiny', spec, plan, device: 'cuda' as const, kvSlots: 4, maxContext: 64, kvDtype: 'bf16' as const, threads: 1 };

const coordinatorMessages: CoordinatorMessage[] = [
  { v, type: 'challenge', nonce },
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
  { v, type: 'hello', rank: 1, world: 2, pid: 4242, collectiveEndpoint: null, nonce, hostname: 'node-a' },
  { v, type: 'hello', rank: 0, world: 2, pid: 4241, collectiveEndpoint: 'tcp://127.0.0.1:5000', nonce },
  { v, type: 'auth', rank: 1 },
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
  const parsed = parseWorkerMessage(decode(encode(workerMessages[7])));
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
  refused(parseWorkerMessage, { v, type: 'hello', rank: -1, world: 2, pid: 1, collectiveEndpoint: null, nonce }, /at rank/);
  refused(parseWorkerMessage, { v, type: 'hello', rank: 0, world: 2, pid: 1, collectiveEndpoint: null, nonce: 'XYZ' }, /at nonce: expected 32 hex digits/);
  refused(parseWorkerMessage, { v, type: 'hello', rank: 0, world: 2, pid: 1, collectiveEndpoint: null, nonce, secret: 's3cret' }, /Unrecognized key: "secret"/);
  refused(parseCoordinatorMessage, { v, type: 'challenge' }, /at nonce/);
  refused(parseCoordinatorMessage, { v, type: 'step', id: 3, batch: { ...batch, tokenSeq: [0] } }, /equal lengths/);
  refused(parseCoordinatorMessage, { v, type: 'init', id: 1, ...settings, collectiveRoot: '', spec: [] }, /at spec: expected an object/);
  refused(parseCoordinatorMessage, { v, type: 'init', id: 1, ...settings, collectiveRoot: '', kvDtype: 'auto' }, /at kvDtype/);
  refused(parseCoordinatorMessage, { v, type: 'ncclId', id: 5, rank: 0 }, /Unrecognized key: "rank"/);
  refused(parseCoordinatorMessage, { v, type: 'eval', id: 5 }, /at type/);
});

async function clientWithOneRank(faults: Error[]) {
  const client = await WorkerClient.bind({ world: 1, bindHost: '127.0.0.1', port: 0, heartbeatTimeoutMs: 30_000, secret: SECRET, label: 'worker', childPid: () => undefined, onFailure: (err) => faults.push(err) });
  const rank = await FakeRank.join(client.endpoint, 0, 1, SECRET);
  await client.join(5000);
  return { client, rank };
}

/** Collect what is written to stderr while `run` runs. */
async function capturingStderr<T>(run: (logged: string[]) => Promise<T>): Promise<T> {
  const logged: string[] = [];
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string) => logged.push(String(chunk)) > 0) as typeof process.stderr.write;
  try {
    return await run(logged);
  } finally {
    process.stderr.write = write;
  }
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
    await rank.handshake(); // the client forgot the connection: it proves itself again
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
  await capturingStderr(async (logged) => {
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
  }).finally(async () => {
    rank.close();
    await client.close(async () => undefined);
  });
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
  const group = await WorkerGroup.bind({ world: 2, spawnLocal: false, secret: SECRET, joinTimeoutMs: 5000 });
  const ranks = await Promise.all([0, 1].map((r) => FakeRank.join(group.endpoint, r, 2, SECRET)));
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

/** The coordinator's end of one worker's handshake, by hand: a bare Router, the worker's hello, a challenge. */
async function fakeCoordinator(router: zmq.Router) {
  const [routingId, helloFrame] = await router.receive();
  const hello = parseWorkerMessage(decode(helloFrame!));
  assert.ok(hello.type === 'hello', `the worker opens with its hello, got ${hello.type}`);
  const coordinatorNonce = newNonce();
  const auth = FrameAuth.derive(SECRET, 'control', 'server', Buffer.from(hello.nonce, 'hex'), coordinatorNonce, helloFrame!);
  await router.send([routingId!, encode({ v, type: 'challenge', nonce: coordinatorNonce.toString('hex') })]);
  const receive = async (): Promise<WorkerMessage> => {
    for (;;) {
      const [, frame, mac] = await router.receive();
      assert.ok(auth.open([frame!], mac), 'every worker message after the challenge has a valid MAC');
      const message = parseWorkerMessage(decode(frame!));
      if (message.type !== 'heartbeat') return message;
    }
  };
  const sealed = (message: CoordinatorMessage): Buffer[] => {
    const frame = encode(message);
    return [frame, auth.seal([frame])];
  };
  return { routingId: routingId!, receive, sealed, send: (message: CoordinatorMessage) => router.send([routingId!, ...sealed(message)]) };
}

test('a worker answers ncclId with the id its NCCL library makes, and obeys only messages with a valid MAC', async () => {
  const lib = join(mkdtempSync(join(tmpdir(), 'weft-fake-nccl-')), 'libfake-nccl.so');
  execFileSync('cc', ['-shared', '-fPIC', '-O1', '-o', lib, join(FIXTURES, '..', 'fake-nccl', 'fake-nccl.c')]);
  const router = new zmq.Router({ linger: 0 });
  await router.bind('tcp://127.0.0.1:*');
  const worker = runWorker({ coordinator: router.lastEndpoint!, rank: 0, world: 1, collectiveHost: '127.0.0.1', coordinatorTimeoutMs: 30_000, ncclLibrary: lib, secret: SECRET });
  let exited = false;
  void worker.finally(() => (exited = true));
  const coordinator = await fakeCoordinator(router);
  try {
    assert.deepEqual((await coordinator.receive()).type, 'auth', 'the worker proves the secret');
    await coordinator.send({ v, type: 'ncclId', id: 2 });
    const made = await coordinator.receive();
    assert.ok(made.type === 'reply' && made.command === 'ncclId' && made.id === 2, JSON.stringify(made));
    // the stand-in library's id: byte i is 0 where i % 5 == 0, else i * 7
    assert.deepEqual(Array.from(made.result.ncclId.slice(0, 6)), [0, 7, 14, 21, 28, 0]);
    await capturingStderr(async (logged) => {
      const shutdown = encode({ v, type: 'shutdown' });
      const [, replayedMac] = coordinator.sealed({ v, type: 'ping' });
      await router.send([coordinator.routingId, shutdown]); // no MAC
      await router.send([coordinator.routingId, shutdown, Buffer.alloc(40)]); // a made-up MAC
      await router.send([coordinator.routingId, shutdown, replayedMac!]); // another message's MAC
      assert.ok(!(await waitFor(() => exited, 1500)), 'the worker did not obey a shutdown without a valid MAC');
      assert.match(logged.join(''), /weft worker rank 0: dropped a message from the coordinator without a valid MAC/);
    });
  } finally {
    await coordinator.send({ v, type: 'shutdown' });
    assert.equal(await worker, 0, 'the worker exits when told to');
    router.close();
  }
});

test('G4: a worker whose authenticated connection drops exits at once, saying why (the session cannot be resumed)', async () => {
  const router = new zmq.Router({ linger: 0 });
  await router.bind('tcp://127.0.0.1:*');
  await capturingStderr(async (logged) => {
    const worker = runWorker({ coordinator: router.lastEndpoint!, rank: 0, world: 1, collectiveHost: '127.0.0.1', coordinatorTimeoutMs: 60_000, ncclLibrary: 'x', secret: SECRET });
    const coordinator = await fakeCoordinator(router);
    assert.equal((await coordinator.receive()).type, 'auth');
    await coordinator.send({ v, type: 'ping', session: 'one' }); // the coordinator proves itself
    await new Promise((r) => setTimeout(r, 200));
    const closedAt = Date.now();
    router.close(); // the coordinator is gone
    assert.equal(await worker, 1);
    assert.ok(Date.now() - closedAt < 3000, `exited ${Date.now() - closedAt} ms after the connection dropped (its timeout is 60 s)`);
    assert.match(logged.join(''), /weft worker rank 0: lost its authenticated connection to coordinator tcp:\/\/127\.0\.0\.1:\d+, exiting/);
  });
});

test('a worker without the group secret refuses to start, naming what to set', async () => {
  await assert.rejects(
    runWorker({ coordinator: 'tcp://127.0.0.1:1', rank: 0, world: 1, collectiveHost: '127.0.0.1', coordinatorTimeoutMs: 1000, ncclLibrary: 'x' }),
    (err: unknown) => isWeftError(err) && err.code === 'WEFT_BAD_REQUEST' && /--worker-secret-file PATH or WEFT_WORKER_SECRET/.test(err.message),
  );
  await assert.rejects(WorkerGroup.bind({ world: 2, spawnLocal: false }), (err: unknown) => isWeftError(err) && /the worker group needs the group's shared secret/.test(err.message));
  await assert.rejects(WorkerGroup.bind({ world: 2, spawnLocal: false, secret: 'short' }), (err: unknown) => isWeftError(err) && /5 characters, at least 16/.test(err.message));
});

test('G11: connections that have not proven the secret get no command and move nothing; each is refused and logged', async () => {
  const faults: Error[] = [];
  await capturingStderr(async (logged) => {
    const { client, rank } = await clientWithOneRank(faults);
    // the old scheme's routing id, without a hello: replies and heartbeats as rank 0
    const oldName = new FakeRank(client.endpoint, 0, 1, SECRET, { routingId: 'rank-0', receiveTimeoutMs: 500 });
    // a plausible hello with a wrong secret
    const wrongSecret = await FakeRank.join(client.endpoint, 0, 1, 'not-the-group-secret!');
    const rogues = [oldName, wrongSecret];
    try {
      const reply = client.request(0, { type: 'step', batch });
      const { id } = (await rank.next()) as { id: number };
      const forged = { v, type: 'reply', rank: 0, id, command: 'step', result: { tokens: [666] } };
      await oldName.socket.send(encode(forged));
      await oldName.socket.send([encode(forged), Buffer.alloc(40)]);
      await wrongSecret.send(forged);
      // the real rank's own frames, replayed from another connection and on its own
      const frame = encode({ v, type: 'reply', rank: 0, id, command: 'step', result: { tokens: [17, 4] } });
      const realMac = (rank as unknown as { auth: FrameAuth }).auth.seal([frame]);
      await oldName.socket.send([frame, realMac]);
      await new Promise((r) => setTimeout(r, 300));
      await rank.socket.send([frame, realMac]);
      assert.deepEqual(await reply, { tokens: [17, 4] }, 'only the real rank answered the request');
      await rank.socket.send([frame, realMac]); // the same frames again on the real connection: a replay
      await new Promise((r) => setTimeout(r, 300));
      assert.equal(faults.length, 0, 'no rogue could fail the client');
      // hellos again and again on one connection: one challenge (a stranger that never reads cannot fill its pipe)
      for (let i = 0; i < 5; i++) await oldName.socket.send(encode({ v, type: 'hello', rank: 0, world: 1, pid: 1, collectiveEndpoint: null, nonce }));
      await new Promise((r) => setTimeout(r, 300));
      for (;;) {
        try {
          oldName.received.push(await oldName.socket.receive());
        } catch {
          break; // nothing more within its receive timeout
        }
        if (oldName.received.length > 5) break;
      }
      assert.equal(oldName.received.length, 1, 'one challenge per connection');
      for (const rogue of rogues) {
        for (const frames of rogue.received) assert.equal(parseCoordinatorMessage(decode(frames[0]!)).type, 'challenge', 'a rogue gets a challenge at most');
      }
      const log = logged.join('');
      assert.match(log, /refused a connection claiming worker rank 0 \(pid \d+, connection [0-9a-f]+\): its proof does not match the group secret/);
      assert.match(log, /dropped a reply message for rank 0 from connection [0-9a-f]+, which has not proven the group secret/);
      assert.match(log, /dropped a message on worker rank 0's connection without a valid MAC/, 'the replay on the real connection');
      assert.equal(client.status()[0]!.pid, process.pid, 'rank 0 is still the real one');
    } finally {
      rogues.forEach((r) => r.close());
      rank.close();
      await client.close(async () => undefined);
    }
  });
});

test('G11: a second connection proving the secret for a rank held by a live process is refused and logged', async () => {
  const faults: Error[] = [];
  await capturingStderr(async (logged) => {
    const { client, rank } = await clientWithOneRank(faults);
    const second = await FakeRank.join(client.endpoint, 0, 1, SECRET, { pid: process.ppid });
    try {
      assert.ok(await waitFor(() => /refused a second connection for worker rank 0 \(pid \d+\): the rank is held by pid \d+, which runs on another host \(presumed alive until its heartbeats stop\)/.test(logged.join('')), 20_000), logged.join(''));
      const reply = client.request(0, { type: 'ncclId' });
      const { id } = (await rank.next()) as { id: number };
      await rank.send({ v, type: 'reply', rank: 0, id, command: 'ncclId', result: { ncclId } });
      await reply;
      assert.equal(second.received.length, 1, 'the second connection got its challenge and nothing after');
      assert.equal(faults.length, 0);
    } finally {
      second.close();
      rank.close();
      await client.close(async () => undefined);
    }
  });
});

test('a zombie process (exited, not reaped) is not alive: a SIGKILLed worker counts as gone before pm2 reaps it', async () => {
  // sh starts `sleep 0` in the background, prints its pid, then becomes `sleep 30`, which never waits on it
  const parent = spawn('sh', ['-c', 'sleep 0 & echo $!; exec sleep 30'], { stdio: ['ignore', 'pipe', 'ignore'] });
  try {
    const zombie = Number(await new Promise<string>((resolve) => parent.stdout.once('data', (d: Buffer) => resolve(d.toString()))));
    const state = (): string => { const stat = readFileSync(`/proc/${zombie}/stat`, 'latin1'); return stat.slice(stat.lastIndexOf(')') + 2, stat.lastIndexOf(')') + 3); };
    assert.ok(await waitFor(() => state() === 'Z', 20_000), `pid ${zombie} became a zombie`);
    process.kill(zombie, 0); // the pid still exists: signal 0 alone would call it alive
    assert.equal(alive(zombie), false);
    assert.equal(alive(parent.pid!), true);
  } finally {
    parent.kill('SIGKILL');
  }
});

test('a rank killed while a send to it waits: the request fails at once naming the death, not the socket or the send timeout', async () => {
  const worker = spawn('sleep', ['30'], { stdio: 'ignore' }); // stands for the rank's process
  const faults: Error[] = [];
  const client = await WorkerClient.bind({ world: 1, bindHost: '127.0.0.1', port: 0, heartbeatTimeoutMs: 60_000, secret: SECRET, label: 'worker', childPid: () => undefined, onFailure: (err) => faults.push(err) });
  const rank = await FakeRank.join(client.endpoint, 0, 1, SECRET, { pid: worker.pid!, hostname: hostname() });
  try {
    await client.join(5000);
    rank.close(); // the socket goes first, as a killed process's does, while the process is still there
    // until the router drops the peer a send to it waits (up to the socket's 5 s send timeout), after that it fails
    // at once: either way the request must end with the death, soon after it is seen
    await new Promise((r) => setTimeout(r, 300));
    const reply = client.request(0, { type: 'ncclId' }).then(() => null, (err: Error) => err);
    await new Promise((r) => setTimeout(r, 100));
    worker.kill('SIGKILL');
    const killedAt = Date.now();
    assert.match((await reply)?.message ?? 'no error', new RegExp(`^worker rank 0 \\(pid ${worker.pid}\\) is gone$`));
    assert.ok(Date.now() - killedAt < 4000, `failed ${Date.now() - killedAt} ms after the kill (a waiting send times out after 5000)`);
    assert.equal(faults.length, 1);
  } finally {
    worker.kill('SIGKILL');
    await client.close(async () => undefined);
  }
});

test('a rank that reports losing a peer: the failure names the peer\'s death when it is seen within the grace, else the report', async () => {
  const lostPeer = 'rank 0: allReduce #9: cannot send to rank 1 (Host unreachable)';
  // killAfterMs: when rank 1's process dies after rank 0's report (null: it does not)
  const run = async (killAfterMs: number | null): Promise<{ message: string; pid: number }> => {
    const processes = [spawn('sleep', ['30'], { stdio: 'ignore' }), spawn('sleep', ['30'], { stdio: 'ignore' })]; // stand for the ranks
    const client = await WorkerClient.bind({ world: 2, bindHost: '127.0.0.1', port: 0, heartbeatTimeoutMs: 60_000, secret: SECRET, label: 'worker', childPid: () => undefined });
    const ranks = await Promise.all([0, 1].map((r) => FakeRank.join(client.endpoint, r, 2, SECRET, { pid: processes[r]!.pid!, hostname: hostname() })));
    try {
      await client.join(5000);
      const reply = client.request(0, { type: 'step', batch }).then(() => 'no error', (err: Error) => err.message);
      const { id } = (await ranks[0]!.next()) as { id: number };
      await ranks[0]!.send({ v, type: 'error', rank: 0, id, error: { code: 'WEFT_WORKER_DIED', message: lostPeer } });
      if (killAfterMs !== null) setTimeout(() => processes[1]!.kill('SIGKILL'), killAfterMs);
      return { message: await reply, pid: processes[1]!.pid! };
    } finally {
      ranks.forEach((r) => r.close());
      processes.forEach((p) => p.kill('SIGKILL'));
      await client.close(async () => undefined);
    }
  };
  const seen = await run(100); // the report comes first, the death is seen after it
  assert.equal(seen.message, `worker rank 1 (pid ${seen.pid}) is gone`);
  assert.equal((await run(null)).message, `worker rank 0: ${lostPeer}`);
});

test('a proven connection for a rank whose local process is gone takes the rank: the rank restarted, the client fails naming both pids', async () => {
  const gone = execFileSync(process.execPath, ['-e', 'process.stdout.write(String(process.pid))'], { encoding: 'utf8' });
  const faults: Error[] = [];
  const client = await WorkerClient.bind({ world: 1, bindHost: '127.0.0.1', port: 0, heartbeatTimeoutMs: 30_000, secret: SECRET, label: 'worker', childPid: () => undefined, onFailure: (err) => faults.push(err) });
  const first = await FakeRank.join(client.endpoint, 0, 1, SECRET, { pid: Number(gone), hostname: hostname() });
  try {
    await client.join(5000);
    const restarted = await FakeRank.join(client.endpoint, 0, 1, SECRET, { hostname: hostname() });
    assert.ok(await waitFor(() => faults.length > 0, 20_000), 'the client failed');
    assert.match(faults[0]!.message, new RegExp(`^worker rank 0 (restarted \\(pid ${gone} is gone, pid ${process.pid} took its place\\)|\\(pid ${gone}\\) is gone)$`));
    assert.equal(client.status()[0]!.pid, process.pid, 'the new process holds the rank');
    restarted.close();
  } finally {
    first.close();
    await client.close(async () => undefined);
  }
});
