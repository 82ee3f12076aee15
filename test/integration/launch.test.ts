/**
 * `weft launch` under real pm2 (a temporary PM2_HOME and WEFT_HOME), TP=2 on the CPU: the cluster becomes
 * ready, a SIGKILLed worker ends the in-flight request with an error naming its rank, pm2 restarts it, the group
 * re-forms without restarting the coordinator and the next request gets the same greedy tokens; `weft stop`
 * leaves no process behind (not even the pm2 daemon). A coordinator that cannot start (a missing model
 * directory) ends launch within seconds with its own error line and exit 78, and no process of the cluster is left.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, mkdirSync, mkdtempSync, readFileSync, rmSync, statSync, writeFileSync } from 'node:fs';
import { spawnSync } from 'node:child_process';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WeftClient } from '../../coordinator/api/client.ts';
import { isWeftError } from '../../core/errors.ts';
import { fixtureDir, processesMentioning, readReference, waitFor } from '../helpers/fixtures.ts';
import { runWeft, type CliResult } from '../helpers/cli.ts';

const reference = readReference('llama-tiny');

type Weft = (args: string[], timeoutMs?: number) => Promise<CliResult>;

/** Run `body` with `weft` in a temporary PM2_HOME and WEFT_HOME; afterwards stop cluster `name`, kill that pm2 and remove the home. */
async function inTemporaryHome(name: string, body: (weft: Weft, home: string) => Promise<void>): Promise<void> {
  const home = mkdtempSync(join(tmpdir(), 'weft-launch-'));
  const env = { PM2_HOME: join(home, 'pm2'), WEFT_HOME: join(home, 'weft') };
  try {
    await body((args, timeoutMs = 90_000) => runWeft(args, { env, timeoutMs }), home);
  } finally {
    if (processesMentioning(home).length > 0) await runWeft(['stop', '--name', name], { env, timeoutMs: 30_000 }).catch(() => undefined);
    // pm2 kill that home, whatever happened above
    spawnSync(process.execPath, [join(import.meta.dirname, '../../node_modules/pm2/bin/pm2'), 'kill'], { env: { ...process.env, ...env }, stdio: 'ignore', timeout: 30_000 });
    for (const pid of processesMentioning(home)) process.kill(pid, 'SIGKILL');
    rmSync(home, { recursive: true, force: true });
  }
}

test('launch, survive a SIGKILLed worker, stop with nothing left', async () => {
  let client: WeftClient | null = null;
  await inTemporaryHome('itest', async (weft, home) => {
    try {
      const launched = await weft(['launch', '--name', 'itest', '--model', fixtureDir('llama-tiny'), '--tp', '2', '--device', 'cpu', '--rpc-port', '0', '--http-port', '0', '--threads', '1']);
      assert.equal(launched.code, 0, launched.stderr);
      assert.match(launched.stderr, /ready/);
      const ready = JSON.parse(launched.stdout) as { http: string; rpc: string; ecosystem: string };
      const ecosystem = readFileSync(ready.ecosystem, 'utf8');
      assert.match(ecosystem, /"name": "weft-itest-rank-1"/);
      assert.match(ecosystem, /"CUDA_VISIBLE_DEVICES": ""/);
      // the workers reach the coordinator over ipc:// in a private directory, which stop removes
      const { socketDir } = JSON.parse(readFileSync(join(home, 'weft', 'itest', 'cluster.json'), 'utf8')) as { socketDir: string };
      assert.equal((statSync(socketDir).mode & 0o777).toString(8), '700');
      assert.ok(ecosystem.includes(`"ipc://${socketDir}/worker.sock"`), 'the workers are given the ipc:// endpoint');

      const status = JSON.parse((await weft(['status', '--name', 'itest', '--json'])).stdout) as { apps: { name: string; pid: number; status: string; restarts: number }[] };
      assert.deepEqual(status.apps.map((a) => [a.name, a.status]), [['weft-itest-coordinator', 'online'], ['weft-itest-rank-0', 'online'], ['weft-itest-rank-1', 'online']]);
      const coordinatorPid = status.apps[0]!.pid;
      const victim = status.apps[2]!.pid;

      client = await WeftClient.connect({ endpoint: ready.rpc });
      const events = client.generate({ promptIds: reference.prompts[1]!, sampling: { maxNewTokens: 400, ignoreEos: true } });
      assert.equal((await events.next()).done, false);
      process.kill(victim, 'SIGKILL');
      const killedAt = Date.now();
      await assert.rejects(
        (async () => {
          for (let e = await events.next(); !e.done; e = await events.next());
        })(),
        (err: unknown) => isWeftError(err) && err.code === 'WEFT_WORKER_DIED' && /rank 1/.test(err.message),
      );
      assert.ok(Date.now() - killedAt < 10_000, `error after ${Date.now() - killedAt} ms`);

      const deadline = Date.now() + 60_000;
      let health = 0;
      while (Date.now() < deadline && (health = (await fetch(`${ready.http}/health`)).status) !== 200) await new Promise((r) => setTimeout(r, 100));
      assert.equal(health, 200, 'serving again');
      const tokens: number[] = [];
      for await (const e of client.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 10, ignoreEos: true } })) if (e.type === 'token') tokens.push(e.token);
      assert.deepEqual(tokens, reference.greedy[0]!.slice(0, 10));
      assert.equal((await client.stats()).reforms, 1);

      const after = JSON.parse((await weft(['status', '--name', 'itest', '--json'])).stdout) as typeof status;
      assert.equal(after.apps[0]!.pid, coordinatorPid, 'the coordinator was not restarted');
      assert.notEqual(after.apps[2]!.pid, victim, 'pm2 restarted the killed worker');
      assert.equal(after.apps[1]!.pid, status.apps[1]!.pid, 'rank 0 rejoined the re-formed group in its process (G1)');
      assert.ok(after.apps[2]!.restarts >= 1);
      assert.match((await weft(['logs', '--name', 'itest', '--lines', '20'])).stdout, /re-forming the worker group after: worker rank 1 \(pid \d+\) is gone/);

      // without --name: the one cluster running (a launched one no longer in pm2 does not count); several: their names
      const record = JSON.parse(readFileSync(join(home, 'weft', 'itest', 'cluster.json'), 'utf8')) as { apps: { name: string }[] };
      const fakeRecord = (name: string, apps: { name: string }[]): void => {
        mkdirSync(join(home, 'weft', name));
        writeFileSync(join(home, 'weft', name, 'cluster.json'), JSON.stringify({ ...record, name, apps }));
      };
      fakeRecord('gone', [{ name: 'weft-gone-coordinator' }]);
      const only = await weft(['status', '--json']);
      assert.equal(only.code, 0, only.stderr);
      assert.equal((JSON.parse(only.stdout) as { name: string }).name, 'itest');
      fakeRecord('twin', record.apps); // a record whose processes pm2 runs: a second running cluster
      const several = await weft(['status']);
      assert.equal(several.code, 1);
      assert.equal(several.stderr, 'weft: WEFT_BAD_REQUEST: 2 clusters are running: itest, twin; name one with --name\n');
      rmSync(join(home, 'weft', 'twin'), { recursive: true });

      await client.close();
      client = null;
      const stopped = await weft(['stop', '--name', 'itest']);
      assert.equal(stopped.code, 0, stopped.stderr);
      assert.ok(await waitFor(() => processesMentioning(home).length === 0, 10_000), `left behind: ${processesMentioning(home).join(', ')}`);
      assert.ok(!existsSync(socketDir), `stop removed ${socketDir}`);
    } finally {
      await client?.close();
    }
  });
});

test('a coordinator that cannot start (missing model directory) fails launch within 45 s with its own error line, exit 78, nothing left in pm2; so does a timeout', async () => {
  await inTemporaryHome('broken', async (weft, home) => {
    const missing = join(home, 'no-such-model');
    const started = Date.now();
    const launched = await weft(['launch', '--name', 'broken', '--model', missing, '--tp', '2', '--device', 'cpu', '--rpc-port', '0', '--http-port', '0', '--threads', '1'], 60_000);
    const seconds = (Date.now() - started) / 1000;
    console.log(`# launch failed after ${seconds.toFixed(1)} s`);
    assert.equal(launched.code, 78, launched.stderr);
    assert.ok(seconds < 45, `launch took ${seconds.toFixed(1)} s`);
    const lastLine = launched.stderr.trim().split('\n').at(-1)!;
    assert.match(lastLine, new RegExp(`^weft: WEFT_BAD_MODEL: .*${missing}.*exited during start-up with code 78`));
    assert.doesNotMatch(launched.stderr, /is ready/);
    assert.ok(await waitFor(() => processesMentioning(home).length === 0, 10_000), `left behind: ${processesMentioning(home).join(', ')}`);
    // the coordinator's log still holds the line launch quoted
    assert.match((await weft(['logs', '--name', 'broken'])).stdout, /WEFT_BAD_MODEL/);
    // a start-up that outlasts --wait-timeout is cleaned up the same way
    const late = await weft(['launch', '--name', 'broken', '--model', fixtureDir('llama-tiny'), '--tp', '2', '--device', 'cpu', '--rpc-port', '0', '--http-port', '0', '--threads', '1', '--wait-timeout', '300'], 60_000);
    assert.equal(late.code, 1, late.stderr);
    assert.match(late.stderr.trim().split('\n').at(-1)!, /^weft: WEFT_TIMEOUT: cluster "broken" was not ready within 300 ms/);
    assert.ok(await waitFor(() => processesMentioning(home).length === 0, 10_000), `left behind after the timeout: ${processesMentioning(home).join(', ')}`);
    const { socketDir } = JSON.parse(readFileSync(join(home, 'weft', 'broken', 'cluster.json'), 'utf8')) as { socketDir: string };
    assert.ok(!existsSync(socketDir), `a launch that failed removed ${socketDir}`);
  });
});
