/**
 * `weft launch` under real pm2 (a temporary PM2_HOME and WEFT_HOME), TP=2 on the CPU: the cluster becomes
 * ready, a SIGKILLed worker ends the in-flight request with an error naming its rank, pm2 restarts it, the group
 * re-forms without restarting the coordinator and the next request gets the same greedy tokens; `weft stop`
 * leaves no process behind (not even the pm2 daemon).
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { WeftClient } from '../../coordinator/api/client.ts';
import { isWeftError } from '../../core/errors.ts';
import { fixtureDir, processesMentioning, readReference, waitFor } from '../helpers/fixtures.ts';
import { runWeft } from '../helpers/cli.ts';

const reference = readReference('llama-tiny');

test('launch, survive a SIGKILLed worker, stop with nothing left', async () => {
  const home = mkdtempSync(join(tmpdir(), 'weft-launch-'));
  const env = { PM2_HOME: join(home, 'pm2'), WEFT_HOME: join(home, 'weft') };
  const weft = (args: string[], timeoutMs = 90_000) => runWeft(args, { env, timeoutMs });
  let client: WeftClient | null = null;
  try {
    const launched = await weft(['launch', '--name', 'itest', '--model', fixtureDir('llama-tiny'), '--tp', '2', '--device', 'cpu', '--rpc-port', '0', '--http-port', '0', '--threads', '1']);
    assert.equal(launched.code, 0, launched.stderr);
    assert.match(launched.stderr, /ready/);
    const ready = JSON.parse(launched.stdout) as { http: string; rpc: string; ecosystem: string };
    const ecosystem = readFileSync(ready.ecosystem, 'utf8');
    assert.match(ecosystem, /"name": "weft-itest-rank-1"/);
    assert.match(ecosystem, /"CUDA_VISIBLE_DEVICES": ""/);

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
    assert.ok(after.apps[2]!.restarts >= 1);
    assert.match((await weft(['logs', '--name', 'itest', '--lines', '20'])).stdout, /re-forming the worker group after: worker rank 1/);

    await client.close();
    client = null;
    const stopped = await weft(['stop', '--name', 'itest']);
    assert.equal(stopped.code, 0, stopped.stderr);
    assert.ok(await waitFor(() => processesMentioning(home).length === 0, 10_000), `left behind: ${processesMentioning(home).join(', ')}`);
  } finally {
    await client?.close();
    if (processesMentioning(home).length > 0) await runWeft(['stop', '--name', 'itest'], { env, timeoutMs: 30_000 }).catch(() => undefined);
    // pm2 kill that home, whatever happened above
    const { spawnSync } = await import('node:child_process');
    spawnSync(process.execPath, [join(import.meta.dirname, '../../node_modules/pm2/bin/pm2'), 'kill'], { env: { ...process.env, ...env }, stdio: 'ignore', timeout: 30_000 });
    for (const pid of processesMentioning(home)) process.kill(pid, 'SIGKILL');
    rmSync(home, { recursive: true, force: true });
  }
});
