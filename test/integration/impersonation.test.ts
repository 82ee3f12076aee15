/**
 * Rank impersonation, tried while a TP=2 cluster (llama-tiny, CPU) streams greedy generations: rogue peers
 * connect to the coordinator's worker socket with every rank's old routing id (`rank-0`, `rank-1`) and with
 * random ones, without a hello, with an old-style hello, with a plausible hello and a made-up proof, with a
 * wrong secret, and replaying frames; other rogues connect to rank 0's collective hub and spray pieces and forged
 * handshakes. No client gets a rogue token (every stream equals the reference), no rogue receives anything but
 * a challenge (no step batch, no ping, no tensor), the group is never re-formed, and the refusals are logged.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { createServer } from 'node:net';
import * as zmq from 'zeromq';
import { startCluster } from '../../coordinator/cluster.ts';
import { PROTOCOL_VERSION, decode, encode } from '../../core/wire.ts';
import { parseCoordinatorMessage } from '../../core/worker-protocol.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';
import { FakeRank } from '../helpers/fake-worker.ts';
import { listen, listeningPorts } from '../helpers/sockets.ts';

const v = PROTOCOL_VERSION;
const model = 'llama-tiny';
process.env.WEFT_WORKER_STDERR = 'inherit'; // the workers' log lines (rank 0's hub refusals) reach this process's stderr

async function freePort(): Promise<number> {
  const server = createServer();
  await new Promise<void>((resolve) => server.listen(0, '127.0.0.1', resolve));
  const { port } = server.address() as { port: number };
  await new Promise((resolve) => server.close(resolve));
  return port;
}

const u32 = (n: number): Buffer => {
  const b = Buffer.alloc(4);
  b.writeUInt32LE(n, 0);
  return b;
};

/** Rogues on the coordinator's worker socket; returns the sockets (each listened to into `received`). */
async function controlRogues(endpoint: string, received: Buffer[][]): Promise<zmq.Dealer[]> {
  const sockets: zmq.Dealer[] = [];
  const open = (routingId?: string): zmq.Dealer => {
    const socket = new zmq.Dealer({ linger: 0, ...(routingId && { routingId }) });
    socket.connect(endpoint);
    sockets.push(socket);
    listen(socket, received);
    return socket;
  };
  const forged = (rank: number, id: number) => encode({ v, type: 'reply', rank, id, command: 'step', result: { tokens: [7, 7, 7, 7] } });
  for (const rank of [0, 1]) {
    // the old routing id, no hello: a heartbeat, an old-style hello with a guessed secret, replies to every plausible request id
    const oldName = open(`rank-${rank}`);
    await oldName.send(encode({ v, type: 'heartbeat', rank }));
    await oldName.send(encode({ v, type: 'hello', rank, world: 2, pid: process.pid, collectiveEndpoint: null, secret: 'guess' }));
    for (let id = 1; id <= 300; id++) await oldName.send(forged(rank, id));
    for (let id = 1; id <= 50; id++) await oldName.send([forged(rank, id), Buffer.alloc(40, id)]);
    // an old-style hello from a fresh connection
    await open().send(encode({ v, type: 'hello', rank, world: 2, pid: process.pid, collectiveEndpoint: null, secret: 'guess' }));
    // a plausible hello, a made-up proof, replies with made-up MACs
    const plausible = open();
    await plausible.send(encode({ v, type: 'hello', rank, world: 2, pid: process.pid, collectiveEndpoint: 'tcp://127.0.0.1:1', nonce: '00112233445566778899aabbccddeeff', hostname: 'x' }));
    await new Promise((r) => setTimeout(r, 100));
    await plausible.send([encode({ v, type: 'auth', rank }), Buffer.alloc(40)]);
    for (let id = 1; id <= 50; id++) await plausible.send([forged(rank, id), Buffer.alloc(40)]);
    // the full handshake with a wrong secret, then replies under the key it derived
    const wrong = await FakeRank.join(endpoint, rank, 2, 'a-guessed-group-secret');
    sockets.push(wrong.socket);
    received.push(...wrong.received);
    listen(wrong.socket, received);
    for (let id = 1; id <= 50; id++) await wrong.send({ v, type: 'reply', rank, id, command: 'step', result: { tokens: [7] } });
  }
  return sockets;
}

/** Rogues on rank 0's collective hub: pieces for every plausible sequence number, forged handshakes. */
async function hubRogues(endpoint: string, received: Buffer[][]): Promise<zmq.Dealer[]> {
  const sockets = ['rank-1', undefined, undefined, undefined].map((routingId) => {
    const socket = new zmq.Dealer({ linger: 0, ...(routingId && { routingId }) });
    socket.connect(endpoint);
    listen(socket, received);
    return socket;
  });
  const [oldName, random, hello, rankZero] = sockets as [zmq.Dealer, zmq.Dealer, zmq.Dealer, zmq.Dealer];
  const piece = Buffer.from(new Float32Array(64).fill(1e4).buffer);
  for (let seq = 0; seq < 2000; seq++) {
    await oldName.send([u32(seq), piece]);
    await random.send([u32(seq), piece, Buffer.alloc(40)]);
  }
  await hello.send([Buffer.from('weft.hello'), u32(1), Buffer.alloc(16, 9)]);
  await new Promise((r) => setTimeout(r, 100));
  await hello.send([Buffer.from('weft.auth'), Buffer.alloc(40)]);
  await rankZero.send([Buffer.from('weft.hello'), u32(0), Buffer.alloc(16, 3)]);
  return sockets;
}

test('G11: rogue peers with every rank\'s routing id, with and without a hello, and rogues on the collective hub: no rogue token reaches a client, no rogue gets step data, no re-form, refusals logged', { timeout: 240_000 }, async () => {
  const logged: string[] = [];
  const write = process.stderr.write.bind(process.stderr);
  process.stderr.write = ((chunk: string) => logged.push(String(chunk)) > 0) as typeof process.stderr.write;
  const workerPort = await freePort();
  const cluster = await startCluster({ modelDir: fixtureDir(model), tp: 2, threads: 1, recover: true, workerPort, heartbeatTimeoutMs: 5000 });
  const rogueSockets: zmq.Dealer[] = [];
  try {
    const reference = readReference(model);
    const pids = cluster.workerPids();
    const [hubPort, ...others] = listeningPorts(pids[0]!);
    assert.ok(hubPort !== undefined && others.length === 0, `rank 0 listens on its hub only: ${[hubPort, ...others]}`);

    const streams = [0, 1, 2, 3].map((i) => {
      const prompt = i % reference.prompts.length;
      const events = cluster.generate({ promptIds: reference.prompts[prompt]!, sampling: { maxNewTokens: 400, ignoreEos: true } });
      return { prompt, events };
    });
    for (const { events } of streams) assert.equal((await events.next()).done, false, 'streaming before the rogues come');
    let finished = 0;
    const outputs = streams.map(async ({ events }) => {
      let tokens: number[] = [];
      for (let e = await events.next(); !e.done; e = await events.next()) if (e.value.type === 'done') tokens = e.value.tokens;
      finished++;
      return tokens;
    });

    const controlReceived: Buffer[][] = [];
    const hubReceived: Buffer[][] = [];
    rogueSockets.push(...(await controlRogues(`tcp://127.0.0.1:${workerPort}`, controlReceived)));
    rogueSockets.push(...(await hubRogues(`tcp://127.0.0.1:${hubPort}`, hubReceived)));
    assert.ok(finished < streams.length, `the rogues came while clients streamed (${finished} of ${streams.length} streams had finished)`);

    const tokens = await Promise.all(outputs);
    tokens.forEach((t, i) => {
      assert.equal(t.length, 400, `stream ${i} finished`);
      assert.deepEqual(t.slice(0, reference.greedy[streams[i]!.prompt]!.length), reference.greedy[streams[i]!.prompt], `stream ${i}: the reference's greedy tokens`);
    });
    let after: number[] = [];
    for await (const e of cluster.generate({ promptIds: reference.prompts[1]!, sampling: { maxNewTokens: 24, ignoreEos: true } })) if (e.type === 'done') after = e.tokens;
    assert.deepEqual(after, reference.greedy[1], 'a request after the attack: the reference tokens');

    const challenges = controlReceived.map((frames) => (frames.length === 1 ? parseCoordinatorMessage(decode(frames[0]!)).type : `${frames.length} frames`));
    assert.ok(challenges.length >= 4, `the rogues that said hello got challenges: ${challenges.length}`);
    assert.deepEqual([...new Set(challenges)], ['challenge'], 'a rogue on the worker socket receives a challenge at most: no step, no ping');
    assert.ok(hubReceived.length >= 1, 'the hub rogue that said hello got its challenge');
    assert.deepEqual([...new Set(hubReceived.map((frames) => frames[0]!.toString()))], ['weft.challenge'], 'a rogue on the hub receives a challenge at most: no tensor');

    const stats = cluster.stats();
    assert.equal(stats.reforms, 0, `the group was not re-formed (${stats.detail})`);
    assert.equal(cluster.state, 'ready');
    assert.deepEqual(cluster.workerPids(), pids, 'the same worker processes');

    const log = logged.join('');
    assert.match(log, /weft: dropped a heartbeat message for rank \d from connection [0-9a-f]+, which has not proven the group secret/);
    assert.match(log, /weft: dropped a message from connection [0-9a-f]+, which has not proven the group secret: invalid worker message at nonce/);
    assert.match(log, /weft: refused a connection claiming worker rank 0 \(pid \d+, connection [0-9a-f]+\): its proof does not match the group secret/);
    assert.match(log, /weft: refused a connection claiming worker rank 1 \(pid \d+, connection [0-9a-f]+\): its proof does not match the group secret/);
    assert.match(log, /weft worker rank 0: collective hub: dropped a message \(2 frames\) from connection [0-9a-f]+, which has not proven the group secret/);
    assert.match(log, /weft worker rank 0: collective hub: refused a peer claiming rank 1 \(connection [0-9a-f]+\): its proof does not match the group secret/);
    assert.match(log, /weft worker rank 0: collective hub: refused a hello for rank 0/);
    const lines = log.split('\n').filter((line) => /refused|dropped/.test(line));
    assert.ok(lines.length < 60, `refusals are logged once per peer, not once per message (${lines.length} lines for thousands of rogue messages)`);
  } finally {
    rogueSockets.forEach((socket) => socket.close());
    await cluster.close();
    process.stderr.write = write;
  }
  process.stderr.write(logged.filter((line) => /refused|dropped/.test(line)).slice(0, 12).join(''));
});
