/**
 * CURVE on the RPC socket: a client with an allowed key is served; a client with an unknown key (or none) never
 * gets an answer (the ZAP handler refuses its handshake), and the server keeps serving.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { mkdtempSync, readFileSync, rmSync, statSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import * as zmq from 'zeromq';
import { serve, readCurveDir, writeCurveDir } from '../../coordinator/serve.ts';
import { WeftClient } from '../../coordinator/api/client.ts';
import { isWeftError } from '../../core/errors.ts';
import { fixtureDir, processesMentioning, readReference } from '../helpers/fixtures.ts';

test('CURVE + ZAP: known client key served, unknown key refused', async () => {
  const dir = mkdtempSync(join(tmpdir(), 'weft-curve-'));
  const server = await serve({ modelDir: fixtureDir('llama-tiny'), threads: 1, curve: (writeCurveDir(dir), readCurveDir(dir)) });
  try {
    assert.equal(statSync(join(dir, 'server.json')).mode & 0o777, 0o600);
    await server.cluster.ready;
    const keys = JSON.parse(readFileSync(join(dir, 'client.json'), 'utf8')) as { serverKey: string; publicKey: string; secretKey: string };
    await using client = await WeftClient.connect({ endpoint: server.rpcEndpoint, curve: keys });
    const reference = readReference('llama-tiny');
    const tokens: number[] = [];
    for await (const e of client.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 4, ignoreEos: true } })) if (e.type === 'token') tokens.push(e.token);
    assert.deepEqual(tokens, reference.greedy[0]!.slice(0, 4));
    const stranger = zmq.curveKeyPair();
    await assert.rejects(
      WeftClient.connect({ endpoint: server.rpcEndpoint, timeoutMs: 1500, curve: { serverKey: keys.serverKey, ...stranger } }),
      (err: unknown) => isWeftError(err) && err.code === 'WEFT_TIMEOUT',
    );
    await assert.rejects(WeftClient.connect({ endpoint: server.rpcEndpoint, timeoutMs: 1000 }), (err: unknown) => isWeftError(err) && err.code === 'WEFT_TIMEOUT');
    assert.equal((await client.health()).ready, true);
  } finally {
    await server.close();
    rmSync(dir, { recursive: true, force: true });
  }
  assert.deepEqual(processesMentioning(`--parent-pid\0${process.pid}\0`), []);
});
