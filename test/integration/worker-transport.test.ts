/**
 * The worker transports (core/transport.ts) on a TP=2 cluster (llama-tiny, CPU): by default the coordinator's
 * socket and rank 0's collective hub are ipc:// in one directory of mode 0700, removed on close, and nothing
 * listens on TCP; with a worker host that is not loopback the socket (and the hub) are tcp:// with CURVE, refused
 * without keys, and a socket without the server's key gets nothing. Greedy outputs equal the fixtures' reference
 * over both transports. The socket's message limit (a speculative group's is sized to its rounds) cuts off a
 * larger frame and passes a smaller one.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, lstatSync, mkdtempSync, readFileSync, readdirSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { basename, dirname, join } from 'node:path';
import * as zmq from 'zeromq';
import { startCluster, type Cluster } from '../../coordinator/cluster.ts';
import { isWeftError } from '../../core/errors.ts';
import { PROTOCOL_VERSION, decode, encode } from '../../core/wire.ts';
import { parseCoordinatorMessage } from '../../core/worker-protocol.ts';
import { bindWorkerSocket } from '../../coordinator/worker-transport.ts';
import { fixtureDir, readReference } from '../helpers/fixtures.ts';
import { argOf, listen, listeningPorts } from '../helpers/sockets.ts';

const model = 'llama-tiny';
const reference = readReference(model);

/** Greedy generations of every reference prompt, all at once; each must equal the reference. */
async function assertReference(cluster: Cluster): Promise<void> {
  const outputs = await Promise.all(
    reference.prompts.map(async (promptIds, i) => {
      let tokens: number[] = [];
      for await (const e of cluster.generate({ promptIds, sampling: { maxNewTokens: reference.greedy[i]!.length, ignoreEos: true } })) if (e.type === 'done') tokens = e.tokens;
      return tokens;
    }),
  );
  outputs.forEach((tokens, i) => assert.deepEqual(tokens, reference.greedy[i], `prompt ${i}: the reference's greedy tokens`));
}

const hello = (rank: number): Buffer =>
  encode({ v: PROTOCOL_VERSION, type: 'hello', rank, world: 2, pid: process.pid, collectiveEndpoint: null, nonce: '00112233445566778899aabbccddeeff', hostname: 'rogue' });
const hubHello = (): Buffer[] => [Buffer.from('weft.hello'), Buffer.from([1, 0, 0, 0]), Buffer.alloc(16, 7)];

test('a local cluster: worker socket and collective hub are ipc:// in a 0700 directory of this user, nothing on TCP, the reference outputs, the directory gone after close', { timeout: 120_000 }, async () => {
  const cluster = await startCluster({ modelDir: fixtureDir(model), tp: 2, threads: 1 });
  let dir = '';
  try {
    const [rank0, rank1] = cluster.workerPids() as [number, number];
    const endpoint = argOf(rank1, '--coordinator') ?? '';
    assert.match(endpoint, /^ipc:\/\/\/.+\/worker\.sock$/, 'the workers were given an ipc:// endpoint');
    dir = dirname(endpoint.slice('ipc://'.length));
    assert.match(basename(dir), /^weft-/);
    const stat = statSync(dir);
    assert.equal((stat.mode & 0o777).toString(8), '700', 'only this user can open the socket directory');
    assert.equal(stat.uid, process.getuid!());
    assert.deepEqual(readdirSync(dir).sort(), [`hub-${rank0}-0.sock`, 'worker.sock'], "rank 0's hub lives in the same directory");
    assert.ok(readdirSync(dir).every((name) => lstatSync(join(dir, name)).isSocket()));
    for (const pid of [process.pid, rank0, rank1]) assert.deepEqual(listeningPorts(pid), [], `pid ${pid} listens on no TCP port`);
    await assertReference(cluster);
  } finally {
    await cluster.close();
  }
  assert.ok(dir && !existsSync(dir), `${dir} is removed when the cluster closes`);
});

test('a worker host that is not loopback without CURVE keys: WEFT_BAD_CONFIG naming --worker-curve-dir, before any worker starts', async () => {
  await assert.rejects(
    startCluster({ modelDir: fixtureDir(model), tp: 2, threads: 1, workerHost: '0.0.0.0' }),
    (err: unknown) => isWeftError(err) && err.code === 'WEFT_BAD_CONFIG' && /tcp:\/\/0\.0\.0\.0:\* \(not loopback\) needs CURVE keys .*--worker-curve-dir/.test(err.message),
  );
});

test('a worker host that is not loopback with CURVE: the reference outputs; sockets without the server key get nothing from the worker socket or the hub, one with it only a challenge', { timeout: 120_000 }, async () => {
  const curveDir = mkdtempSync(join(tmpdir(), 'weft-worker-curve-'));
  const cluster = await startCluster({ modelDir: fixtureDir(model), tp: 2, threads: 1, workerHost: '0.0.0.0', workerCurveDir: curveDir });
  const rogues: zmq.Dealer[] = [];
  try {
    for (const name of ['coordinator.json', 'worker.json']) assert.equal((statSync(join(curveDir, name)).mode & 0o777).toString(8), '600', `${name} is private`);
    const workerKeys = JSON.parse(readFileSync(join(curveDir, 'worker.json'), 'utf8')) as { serverKey: string; publicKey: string };
    const [rank0, rank1] = cluster.workerPids() as [number, number];
    const endpoint = argOf(rank1, '--coordinator') ?? '';
    const port = /^tcp:\/\/0\.0\.0\.0:(\d+)$/.exec(endpoint)?.[1];
    assert.ok(port, `the workers were given a tcp:// endpoint: ${endpoint}`);
    const [hubPort, ...others] = listeningPorts(rank0);
    assert.ok(hubPort !== undefined && others.length === 0, `rank 0 listens on its hub only: ${[hubPort, ...others]}`);

    // one received-list per kind of rogue: [worker socket, hub]
    const plain: Buffer[][] = [];
    const wrongKey: Buffer[][] = [];
    const rightKey: Buffer[][] = [];
    const rogue = (into: Buffer[][], serverKey?: string): zmq.Dealer => {
      const stranger = zmq.curveKeyPair();
      const socket = new zmq.Dealer({ linger: 0, receiveTimeout: 200, sendTimeout: 1000, ...(serverKey && { curveServerKey: serverKey, curvePublicKey: stranger.publicKey, curveSecretKey: stranger.secretKey }) });
      rogues.push(socket);
      listen(socket, into);
      return socket;
    };
    const control = `tcp://127.0.0.1:${port}`;
    const hub = `tcp://127.0.0.1:${hubPort}`;
    const attempts: [Buffer[][], string | undefined, string | undefined][] = [
      [plain, undefined, undefined],
      [wrongKey, zmq.curveKeyPair().publicKey, zmq.curveKeyPair().publicKey],
      [rightKey, workerKeys.serverKey, workerKeys.publicKey],
    ];
    const generating = assertReference(cluster);
    for (const [into, controlKey, hubKey] of attempts) {
      const toControl = rogue(into, controlKey);
      toControl.connect(control);
      const toHub = rogue(into, hubKey);
      toHub.connect(hub);
      for (const rank of [0, 1]) await toControl.send(hello(rank)).catch(() => undefined);
      await toHub.send(hubHello()).catch(() => undefined);
    }
    await generating;
    await new Promise((r) => setTimeout(r, 1500));
    assert.deepEqual(plain, [], 'a socket without CURVE gets nothing');
    assert.deepEqual(wrongKey, [], 'a socket that does not know the server key gets nothing');
    // the control: the same rogue with the server's public key passes CURVE, and the group secret stops it
    const kinds = rightKey.map((frames) => (frames.length === 1 ? parseCoordinatorMessage(decode(frames[0]!)).type : frames[0]!.toString()));
    assert.deepEqual(kinds.sort(), ['challenge', 'weft.challenge'], 'with the server key: one challenge from each, no step data');
    assert.equal(cluster.stats().reforms, 0);
    await assertReference(cluster);
  } finally {
    rogues.forEach((socket) => socket.close());
    await cluster.close();
    rmSync(curveDir, { recursive: true, force: true });
  }
});

test('the worker socket takes a frame up to its maxMessageBytes and cuts off a peer whose frame is larger', async () => {
  for (const [limit, arrives] of [[1 << 20, false], [4 << 20, true]] as const) {
    const { router, endpoint, release } = await bindWorkerSocket({ bindHost: '127.0.0.1', port: 0, label: 'worker', maxMessageBytes: limit });
    const dealer = new zmq.Dealer({ linger: 0 });
    try {
      dealer.connect(endpoint);
      await dealer.send(Buffer.alloc(2 << 20)); // 2 MiB
      const received = await Promise.race([router.receive().then(() => true), new Promise<boolean>((r) => setTimeout(() => r(false), 3000))]);
      assert.equal(received, arrives, `a 2 MiB frame against a ${limit >> 20} MiB limit`);
    } finally {
      dealer.close();
      router.close();
      release();
    }
  }
});
