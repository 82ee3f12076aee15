/**
 * Faults: a worker SIGKILLed in the middle of a generation fails the request within seconds with an error
 * naming the rank (and, with `recover`, the group re-forms and serves again); a SIGKILLed coordinator leaves no
 * workers behind; a SIGSTOPped worker is declared dead by the heartbeat deadline, but a stall of the coordinator's
 * own event loop is not blamed on the workers, nor is a CPU worker's long step (it blocks the worker's event loop, heartbeats
 * included, while its CPU time grows).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { spawn } from 'node:child_process';
import { cpSync, existsSync, mkdtempSync, rmSync, truncateSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { startCluster } from '../../coordinator/cluster.ts';
import { isWeftError } from '../../core/errors.ts';
import { WEFT_BIN, fixtureDir, processesMentioning, readReference, waitFor } from '../helpers/fixtures.ts';
import { startServe } from './serve-helpers.ts';
import { writeInductionModel } from '../../bench/induction-model.ts';
import { heldOutStream } from '../../bench/needle.ts';
import { withCluster } from '../helpers/with-cluster.ts';

const model = 'llama-tiny';

/** Read a generation to its end (or its error). */
async function drain(events: AsyncGenerator<unknown>): Promise<void> {
  for (let e = await events.next(); !e.done; e = await events.next());
}

/** The stream ends with WEFT_WORKER_DIED naming rank 1 and the cause, within 5 s of the fault. */
async function failsNamingRank1(events: AsyncGenerator<unknown>, cause: RegExp): Promise<void> {
  const started = Date.now();
  await assert.rejects(
    drain(events),
    (err: unknown) => isWeftError(err) && err.code === 'WEFT_WORKER_DIED' && /rank 1/.test(err.message) && cause.test(err.message),
  );
  assert.ok(Date.now() - started < 5000, `noticed in ${Date.now() - started} ms`);
}

test('a worker killed during generation fails the request, naming the rank, within seconds', async () => {
  const cluster = await startCluster({ modelDir: fixtureDir(model), tp: 2, threads: 1 });
  try {
    const events = cluster.generate({ promptIds: readReference(model).prompts[0]!, sampling: { maxNewTokens: 200, ignoreEos: true } });
    const first = await events.next();
    assert.equal(first.done, false);
    const victim = cluster.workerPids()[1]!;
    process.kill(victim, 'SIGKILL');
    await failsNamingRank1(events, /SIGKILL/);
  } finally {
    await cluster.close();
  }
  assert.deepEqual(processesMentioning(`--parent-pid\0${process.pid}\0`), [], 'no worker left behind');
});

test('with recover, a killed worker fails only its request: the group re-forms around the survivor (same pid) and serves again', async () => {
  const cluster = await startCluster({ modelDir: fixtureDir(model), tp: 2, threads: 1, recover: true });
  try {
    const reference = readReference(model);
    const events = cluster.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 200, ignoreEos: true } });
    assert.equal((await events.next()).done, false);
    const before = cluster.workerPids();
    process.kill(before[1]!, 'SIGKILL');
    await assert.rejects(drain(events), (err: unknown) => isWeftError(err) && err.code === 'WEFT_WORKER_DIED' && /rank 1/.test(err.message));
    assert.ok(await waitFor(() => cluster.stats().reforms === 1 && cluster.state === 'ready', 30_000), `re-formed: ${cluster.stats().detail}`);
    const after = cluster.workerPids();
    assert.equal(after[0], before[0], `rank 0 survived and rejoined in its process (${before} → ${after})`);
    assert.notEqual(after[1], before[1], 'rank 1 runs in a new process');
    let tokens: number[] = [];
    for await (const e of cluster.generate({ promptIds: reference.prompts[1]!, sampling: { maxNewTokens: 24, ignoreEos: true } })) if (e.type === 'done') tokens = e.tokens;
    assert.deepEqual(tokens, reference.greedy[1], 'the re-formed group gives the reference output');
  } finally {
    await cluster.close();
  }
  assert.ok(await waitFor(() => processesMentioning(`--parent-pid\0${process.pid}\0`).length === 0, 20_000), 'no worker left behind');
});

test('G4: a coordinator killed with SIGKILL leaves no worker behind within 20 s (goal 10 s)', async (t) => {
  const child = spawn(process.execPath, [WEFT_BIN, 'generate', '--model', fixtureDir(model), '--tp', '2', '--prompt', 'hi', '--max-new-tokens', '400', '--ignore-eos'], {
    stdio: ['ignore', 'pipe', 'pipe'],
  });
  const marker = `--parent-pid\0${child.pid}\0`;
  assert.ok(await waitFor(() => processesMentioning(marker).length === 2, 30_000), 'both workers started');
  assert.equal(child.exitCode, null, 'the coordinator is still generating when it is killed');
  child.kill('SIGKILL');
  const killedAt = Date.now();
  // Workers watch their parent once per heartbeat (500 ms); the reliability goal (G4) gives them 10 s. Exiting takes 4-8 s
  // on a 2-core machine at load average 15 (measured while six test suites ran), so the bound is twice G4's.
  assert.ok(await waitFor(() => processesMentioning(marker).length === 0, 20_000), `workers still alive: ${processesMentioning(marker).join(', ')}`);
  t.diagnostic(`G4 measured: the last worker gone ${Date.now() - killedAt} ms after the coordinator's SIGKILL`);
});

test('G2: a hung worker (SIGSTOP) is declared dead by the heartbeat deadline, naming the rank', async () => {
  const cluster = await startCluster({ modelDir: fixtureDir(model), tp: 2, threads: 1, heartbeatTimeoutMs: 1500 });
  try {
    const events = cluster.generate({ promptIds: readReference(model).prompts[0]!, sampling: { maxNewTokens: 200, ignoreEos: true } });
    assert.equal((await events.next()).done, false);
    process.kill(cluster.workerPids()[1]!, 'SIGSTOP'); // alive, but silent: no exit event, only the missing heartbeat
    await failsNamingRank1(events, /heartbeat/);
  } finally {
    await cluster.close(); // SIGKILL reaches a stopped process
  }
  assert.ok(await waitFor(() => processesMentioning(`--parent-pid\0${process.pid}\0`).length === 0, 20_000), 'no worker left behind');
});

test('G2 then G1: with recover, a hung rank (SIGSTOP) is declared dead, killed and replaced; the survivor keeps its process; the reference output follows', async () => {
  const cluster = await startCluster({ modelDir: fixtureDir(model), tp: 2, threads: 1, heartbeatTimeoutMs: 1500, recover: true });
  try {
    const reference = readReference(model);
    const events = cluster.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 200, ignoreEos: true } });
    assert.equal((await events.next()).done, false);
    const before = cluster.workerPids();
    process.kill(before[1]!, 'SIGSTOP');
    await failsNamingRank1(events, /heartbeat/);
    assert.ok(await waitFor(() => cluster.stats().reforms === 1 && cluster.state === 'ready', 30_000), `re-formed: ${cluster.stats().detail}`);
    const after = cluster.workerPids();
    assert.equal(after[0], before[0], 'rank 0 rejoined in its process');
    assert.notEqual(after[1], before[1], 'rank 1 runs in a new process');
    assert.ok(await waitFor(() => !existsSync(`/proc/${before[1]}`), 20_000), 'the hung process was killed');
    let tokens: number[] = [];
    for await (const e of cluster.generate({ promptIds: reference.prompts[1]!, sampling: { maxNewTokens: 24, ignoreEos: true } })) if (e.type === 'done') tokens = e.tokens;
    assert.deepEqual(tokens, reference.greedy[1]);
  } finally {
    await cluster.close();
  }
});

test('G5: a group that cannot re-form (its weights truncated after start) ends weft serve with a non-zero exit after its attempts, no worker left', async (t) => {
  const dir = mkdtempSync(join(tmpdir(), 'weft-g5-'));
  cpSync(fixtureDir(model), dir, { recursive: true });
  const server = await startServe(['--model', dir, '--tp', '2']);
  try {
    const exited = new Promise<number | null>((resolve) => server.child.once('exit', (code) => resolve(code)));
    const marker = `--parent-pid\0${server.child.pid}\0`;
    truncateSync(join(dir, 'model.safetensors'), 1000);
    const killedAt = Date.now();
    process.kill(processesMentioning(marker)[0]!, 'SIGKILL');
    const code = await exited;
    t.diagnostic(`G5 measured: exit code ${code} ${Date.now() - killedAt} ms after the fault`);
    assert.ok(code !== null && code !== 0, `exit code ${code}`);
    assert.match(server.stderr(), /could not be re-formed after 3 attempts/);
    assert.ok(await waitFor(() => processesMentioning(marker).length === 0, 10_000), 'no worker left behind');
  } finally {
    if (server.child.exitCode === null) await server.stop();
    rmSync(dir, { recursive: true, force: true });
  }
});

test('G2: a coordinator event-loop stall of twice the heartbeat timeout is not blamed on a worker: no re-form, the stream completes', async () => {
  const heartbeatTimeoutMs = 1500;
  const cluster = await startCluster({ modelDir: fixtureDir(model), tp: 2, threads: 1, heartbeatTimeoutMs, recover: true });
  try {
    const reference = readReference(model);
    const pids = cluster.workerPids();
    const events = cluster.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 60, ignoreEos: true } });
    assert.equal((await events.next()).done, false);
    await new Promise((r) => setTimeout(r, 1200)); // heartbeats and pings flowing, a check or two done
    const blockedAt = Date.now();
    while (Date.now() - blockedAt < 2 * heartbeatTimeoutMs); // the coordinator's only thread, busy: nothing is read
    let tokens: number[] = [];
    for (let e = await events.next(); !e.done; e = await events.next()) if (e.value.type === 'done') tokens = e.value.tokens;
    assert.deepEqual(tokens.slice(0, 24), reference.greedy[0], 'the stream completed with the reference tokens');
    await new Promise((r) => setTimeout(r, 2500)); // past another deadline after the stall
    assert.equal(cluster.stats().reforms, 0, `no re-form (${cluster.stats().detail})`);
    assert.equal(cluster.state, 'ready');
    assert.deepEqual(cluster.workerPids(), pids, 'the same worker processes');
  } finally {
    await cluster.close();
  }
});

test('G2: a CPU worker computing one step longer than the heartbeat deadline is not declared dead (its CPU time grows)', async (t) => {
  if (!existsSync('/proc/self/stat')) return t.skip('no /proc: a worker\'s CPU time cannot be read here');
  const heartbeatTimeoutMs = 1500;
  const dir = mkdtempSync(join(tmpdir(), 'weft-long-step-'));
  try {
    await writeInductionModel(dir); // context 32K: an 8192-token score in one step
    const ids = heldOutStream(dir).slice(0, 8192);
    await withCluster({ modelDir: dir, device: 'cpu', threads: 1, maxContext: 8192, maxNumBatchedTokens: 8192, heartbeatTimeoutMs }, async (cluster) => {
      const started = Date.now();
      const { logprobs } = await cluster.score(ids); // 12.4 s on a 2-core machine, its event loop blocked throughout
      const took = Date.now() - started;
      assert.equal(logprobs.length, 8192);
      assert.ok(took > 2 * heartbeatTimeoutMs, `the step took ${took} ms, too short to test the deadline`);
      t.diagnostic(`one ${took} ms step against a ${heartbeatTimeoutMs} ms heartbeat deadline`);
    });
  } finally {
    rmSync(dir, { recursive: true, force: true });
  }
});

test('a draft worker killed during speculative decoding costs no request: decoding goes on with the target alone', async () => {
  const cluster = await startCluster({ modelDir: fixtureDir(model), threads: 1, draft: { modelDir: fixtureDir('llama-tiny-bf16'), k: 2 } });
  try {
    const reference = readReference(model);
    const events = cluster.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 400, ignoreEos: true } });
    assert.equal((await events.next()).done, false);
    const [, draftPid] = cluster.workerPids(); // target rank 0, then draft rank 0
    process.kill(draftPid!, 'SIGKILL');
    let tokens: number[] = [];
    for (let e = await events.next(); !e.done; e = await events.next()) if (e.value.type === 'done') tokens = e.value.tokens;
    assert.equal(tokens.length, 400, 'the request finished');
    assert.deepEqual(tokens.slice(0, 24), reference.greedy[0], "still the target's greedy output");
    const stats = cluster.speculationStats()!;
    assert.match(stats.draftError ?? '', /draft worker rank 0/, 'the draft fault was noticed and named');
    // the next request runs too, on the target alone
    const again = cluster.generate({ promptIds: reference.prompts[1]!, sampling: { maxNewTokens: 24, ignoreEos: true } });
    let second: number[] = [];
    for await (const e of again) if (e.type === 'done') second = e.tokens;
    assert.deepEqual(second, reference.greedy[1]);
  } finally {
    await cluster.close();
  }
  assert.ok(await waitFor(() => processesMentioning(`--parent-pid\0${process.pid}\0`).length === 0, 20_000), 'no worker left behind');
});
