/**
 * Tensor parallelism on CUDA at TP 2 and 4 with the default collectives (--collectives auto): on a one-GPU host
 * the ranks share the GPU through shared-gpu; on a host with a GPU per rank the same tests run on NCCL. Every
 * hf-tiny model against Hugging Face (scoring and greedy decode through CUDA graphs), Mixtral with and without
 * expert parallelism, `weft generate --tp 2 --device cuda`, speculative decoding with a TP 2 target, and a
 * SIGKILLed rank: the group re-forms and serves again (as on the CPU). Skips, saying why, without a CUDA build
 * or a GPU.
 *
 * Tolerances as in e2e.test.ts: f32 weights with an f32 KV cache 1e-3 (greedy tokens exact); bf16 weights with
 * the bf16 KV cache 0.05 + 0.03.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { startCluster, type Cluster } from '../../coordinator/cluster.ts';
import { isWeftError } from '../../core/errors.ts';
import { FIXTURE_MODELS, fixtureDir, processesMentioning, readReference, waitFor } from '../helpers/fixtures.ts';
import { runWeft } from '../helpers/cli.ts';
import { assertGreedyMatches, assertLogprobsMatch, greedy } from './hf-agreement.ts';
import { cudaSkipReason } from './shared-gpu-group.ts';

const skip = cudaSkipReason();
if (skip) console.log(`# TP on CUDA skipped: ${skip}`);

const runs = [2, 4].flatMap((tp) => [
  ...FIXTURE_MODELS.map((name) => ({ tp, name, expertParallel: false })),
  { tp, name: 'mixtral-tiny', expertParallel: true },
]);

for (const { tp, name, expertParallel } of runs) {
  const bf16 = name.endsWith('bf16');
  const tolerance = bf16 ? 0.05 + 0.03 : 1e-3;
  describe(`${name}${expertParallel ? ' (expert parallel)' : ''} at TP ${tp} on CUDA matches Hugging Face`, { skip }, () => {
    let cluster: Cluster;
    before(async () => {
      cluster = await startCluster({ modelDir: fixtureDir(name), tp, device: 'cuda', kvDtype: bf16 ? 'bf16' : 'f32', expertParallel });
    });
    after(async () => cluster?.close());

    test(`log-probs within ${tolerance}`, () => assertLogprobsMatch(cluster, name, tolerance));
    test('greedy tokens (decode through CUDA graphs) equal Hugging Face', () => assertGreedyMatches(cluster, name, tolerance));
  });
}

describe('TP 2 on CUDA through the CLI and the cluster', { skip }, () => {
  const reference = readReference('llama-tiny');

  test('weft generate --tp 2 --device cuda: greedy tokens equal Hugging Face', { timeout: 180_000 }, async () => {
    const result = await runWeft(
      ['generate', '--model', fixtureDir('llama-tiny'), '--tp', '2', '--device', 'cuda', '--kv-dtype', 'f32', '--prompt-ids', reference.prompts[0]!.join(','), '--max-new-tokens', '10', '--ignore-eos', '--json'],
      { timeoutMs: 180_000 },
    );
    assert.equal(result.code, 0, result.stderr);
    assert.deepEqual((JSON.parse(result.stdout) as { tokens: number[] }).tokens, reference.greedy[0]!.slice(0, 10));
    assert.deepEqual(result.leftover, [], 'no worker left behind');
  });

  test("speculative decoding with a TP 2 target: greedy equals the target's own (HF's)", { timeout: 300_000 }, async () => {
    const cluster = await startCluster({ modelDir: fixtureDir('llama-tiny'), tp: 2, device: 'cuda', kvDtype: 'f32', draft: { modelDir: fixtureDir('llama-tiny-bf16'), k: 3 } });
    try {
      for (let i = 0; i < reference.prompts.length; i++) assert.deepEqual(await greedy(cluster, reference.prompts[i]!, 24), reference.greedy[i], `prompt ${i}`);
      assert.ok(cluster.speculationStats()!.proposed > 0);
    } finally {
      await cluster.close();
    }
  });

  test('a SIGKILLed rank fails only its request; the group re-forms on new processes and serves again', { timeout: 300_000 }, async () => {
    const cluster = await startCluster({ modelDir: fixtureDir('llama-tiny'), tp: 2, device: 'cuda', kvDtype: 'f32', recover: true });
    try {
      const events = cluster.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 400, ignoreEos: true } });
      assert.equal((await events.next()).done, false);
      const before = cluster.workerPids();
      process.kill(before[1]!, 'SIGKILL');
      await assert.rejects(
        (async () => {
          for await (const _ of events);
        })(),
        (err: unknown) => isWeftError(err) && err.code === 'WEFT_WORKER_DIED',
      );
      assert.ok(await waitFor(() => cluster.stats().reforms === 1 && cluster.state === 'ready', 120_000), `re-formed: ${cluster.stats().detail}`);
      const after = cluster.workerPids();
      assert.ok(after.every((pid) => !before.includes(pid)), `every rank runs in a new process (${before} → ${after})`);
      assert.deepEqual(await greedy(cluster, reference.prompts[1]!, 24), reference.greedy[1], 'the re-formed group gives the reference output');
    } finally {
      await cluster.close();
    }
    assert.ok(await waitFor(() => processesMentioning(`--parent-pid\0${process.pid}\0`).length === 0, 10_000), 'no worker left behind');
  });
});
