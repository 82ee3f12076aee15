/** The worker transports' rules (core/transport.ts, coordinator/worker-transport.ts) and the options that carry keys. */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { chmodSync, existsSync, mkdirSync, mkdtempSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { dirname, join } from 'node:path';
import * as zmq from 'zeromq';
import { isWeftError } from '../../core/errors.ts';
import { curveClient, curveServer, ensurePrivateDir, ipcEndpoint, leavesHost, makeSocketDir, parseWorkerCurveKeys } from '../../core/transport.ts';
import { readWorkerCurveDir } from '../../coordinator/worker-transport.ts';
import { WorkerGroup } from '../../coordinator/worker-group.ts';
import { commandConfig, workerEnvironment, workerStartOf } from '../../coordinator/config.ts';
import { runWorker } from '../../worker/main.ts';
import { FakeRank } from '../helpers/fake-worker.ts';

const badConfig = (pattern: RegExp) => (err: unknown) => isWeftError(err) && err.code === 'WEFT_BAD_CONFIG' && pattern.test(err.message);
const scratch = mkdtempSync(join(tmpdir(), 'weft-transport-test-'));
test.after(() => rmSync(scratch, { recursive: true, force: true }));
const secret = 'a-group-secret-of-some-length';

test('a socket directory: fresh (never one a dead cluster left), mode 0700, in $XDG_RUNTIME_DIR when it is set', () => {
  const runtime = join(scratch, 'runtime');
  mkdirSync(runtime, { mode: 0o700 });
  const saved = process.env.XDG_RUNTIME_DIR;
  process.env.XDG_RUNTIME_DIR = runtime;
  try {
    const [a, b] = [makeSocketDir(), makeSocketDir()];
    assert.notEqual(a, b);
    for (const dir of [a, b]) {
      assert.equal(dirname(dir), runtime);
      assert.equal((statSync(dir).mode & 0o777).toString(8), '700');
    }
  } finally {
    if (saved === undefined) delete process.env.XDG_RUNTIME_DIR;
    else process.env.XDG_RUNTIME_DIR = saved;
  }
});

test('a given socket directory is made 0700 when missing, and refused when other users can open it', () => {
  const made = join(scratch, 'made', 'sockets');
  ensurePrivateDir(made, '--worker-socket-dir');
  assert.equal((statSync(made).mode & 0o777).toString(8), '700');
  const open = join(scratch, 'open');
  mkdirSync(open);
  chmodSync(open, 0o755);
  assert.throws(() => ensurePrivateDir(open, '--worker-socket-dir'), badConfig(/--worker-socket-dir .*open has mode 755: other users could reach its sockets; chmod 700 it/));
  assert.throws(() => ipcEndpoint(join(scratch, 'x'.repeat(120)), 'worker.sock'), badConfig(/ipc:\/\/ sockets allow 107/));
});

test('CURVE applies to tcp:// only, and is required where traffic leaves the host', () => {
  const keys = { serverKey: zmq.curveKeyPair().publicKey, ...zmq.curveKeyPair() };
  assert.deepEqual([leavesHost('tcp://10.0.0.5:7000'), leavesHost('tcp://0.0.0.0:*'), leavesHost('tcp://127.0.0.1:7000'), leavesHost('tcp://[::1]:7000'), leavesHost('ipc:///tmp/weft-x/worker.sock')], [true, true, false, false, false]);
  assert.deepEqual(curveClient('ipc:///tmp/weft-x/worker.sock', keys, keys.serverKey, 'OPT'), {});
  assert.deepEqual(curveClient('tcp://127.0.0.1:7000', undefined, undefined, 'OPT'), {});
  assert.deepEqual(curveClient('tcp://127.0.0.1:7000', keys, keys.serverKey, 'OPT'), { curveServerKey: keys.serverKey, curvePublicKey: keys.publicKey, curveSecretKey: keys.secretKey });
  assert.throws(() => curveClient('tcp://10.0.0.5:7000', undefined, undefined, '--worker-curve-file PATH'), badConfig(/tcp:\/\/10\.0\.0\.5:7000 is not loopback.*--worker-curve-file PATH/));
  assert.throws(() => curveServer('tcp://0.0.0.0:*', undefined, '--worker-curve-dir DIR'), badConfig(/binding tcp:\/\/0\.0\.0\.0:\* \(not loopback\) needs CURVE keys.*--worker-curve-dir DIR/));
  assert.deepEqual(curveServer('tcp://0.0.0.0:*', keys.secretKey, 'OPT'), { curveServer: true, curveSecretKey: keys.secretKey });
  assert.throws(() => parseWorkerCurveKeys('{"serverKey": "short"}', 'the file k.json'), badConfig(/the file k\.json must hold .* serverKey, publicKey, secretKey are missing or malformed/));
});

test('--worker-curve-dir: keys made once (0600) and read back the same; a worker.json for another coordinator is refused', () => {
  const dir = join(scratch, 'curve');
  const made = readWorkerCurveDir(dir);
  assert.equal(made.worker.serverKey, made.publicKey);
  assert.deepEqual(readWorkerCurveDir(dir), made, 'a restarted coordinator keeps its keys');
  for (const name of ['coordinator.json', 'worker.json']) assert.equal((statSync(join(dir, name)).mode & 0o777).toString(8), '600');
  writeFileSync(join(dir, 'worker.json'), JSON.stringify({ ...made.worker, serverKey: zmq.curveKeyPair().publicKey }), { mode: 0o600 });
  assert.throws(() => readWorkerCurveDir(dir), badConfig(/worker\.json expects server key .* but .*coordinator\.json holds/));
});

test('a worker takes its CURVE keys from --worker-curve-file (mode 0600 only) or WEFT_WORKER_CURVE; spawned workers get them in the environment', () => {
  const keys = readWorkerCurveDir(join(scratch, 'curve-worker')).worker;
  const file = join(scratch, 'worker.json');
  writeFileSync(file, JSON.stringify(keys), { mode: 0o600 });
  const flags = { coordinator: 'tcp://10.0.0.5:7000', rank: '1', world: '2' };
  assert.deepEqual(workerStartOf(commandConfig('worker', { ...flags, workerCurveFile: file }, { WEFT_WORKER_CURVE: '{}' })).curve, keys, 'the file wins over the variable');
  assert.deepEqual(workerStartOf(commandConfig('worker', flags, { WEFT_WORKER_CURVE: JSON.stringify(keys) })).curve, keys);
  assert.equal(workerStartOf(commandConfig('worker', flags, {})).curve, undefined);
  chmodSync(file, 0o644);
  assert.throws(() => commandConfig('worker', { ...flags, workerCurveFile: file }, {}), badConfig(/--worker-curve-file .*worker\.json has mode 644: other users can read its keys; chmod 600 it/));
  assert.deepEqual(JSON.parse(workerEnvironment(secret, keys).WEFT_WORKER_CURVE!), keys);
  process.env.WEFT_WORKER_CURVE = 'inherited';
  try {
    assert.equal(workerEnvironment(secret).WEFT_WORKER_CURVE, undefined, 'a group without keys passes none on');
  } finally {
    delete process.env.WEFT_WORKER_CURVE;
  }
  assert.match(commandConfig('worker', { ...flags, coordinator: 'ipc:///run/weft-x/worker.sock' }, {}).coordinator, /^ipc:/);
});

test('a worker refuses a coordinator that is not loopback without CURVE keys', async () => {
  await assert.rejects(
    runWorker({ coordinator: 'tcp://10.0.0.5:7000', rank: 0, world: 1, collectiveHost: '127.0.0.1', coordinatorTimeoutMs: 1000, ncclLibrary: 'x', secret }),
    badConfig(/tcp:\/\/10\.0\.0\.5:7000 is not loopback.*--worker-curve-file PATH or WEFT_WORKER_CURVE/),
  );
});

test('external workers in a given socket directory: they join over ipc://; on close the socket goes and the directory stays', async () => {
  const socketDir = join(scratch, 'given');
  const group = await WorkerGroup.bind({ world: 1, spawnLocal: false, socketDir, secret, joinTimeoutMs: 5000 });
  let fake: FakeRank | null = null;
  try {
    assert.equal(group.endpoint, `ipc://${socketDir}/worker.sock`);
    assert.equal((statSync(socketDir).mode & 0o777).toString(8), '700');
    fake = await FakeRank.join(group.endpoint, 0, 1, secret);
    await group.join();
    assert.deepEqual(group.status().map((s) => s.joined), [true]);
  } finally {
    fake?.close();
    await group.close(100);
  }
  assert.ok(!existsSync(join(socketDir, 'worker.sock')), 'the socket file is removed');
  assert.ok(existsSync(socketDir), 'a directory the operator named is kept');
});
