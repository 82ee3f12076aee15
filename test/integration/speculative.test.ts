/**
 * Speculative decoding end to end on the CPU backend, real worker processes for both models.
 * - Greedy: with any draft (here one with other weights, so most proposals are rejected, and the target
 *   itself, so all are accepted) the output is token for token the target's own greedy output (the Hugging
 *   Face reference), at TP 1 and 2.
 * - Sampling is exact: with a draft that overlaps the target (see flattenedDraft), the joint distribution of the first two generated tokens (the second one comes from
 *   a speculative round) over 2400 seeds matches the target's own distribution, computed from its log-probs.
 *   Temperature 0.4 and top-k 4 keep 16 cells; chi-square with 15 degrees of freedom at significance 0.001
 *   (critical 37.70). Measured once with the residual replaced by p (a wrong rule): chi-square 98.4, so the
 *   test tells; with the right rule it read 22.5. test/unit/speculative.test.ts keeps a wrong rule failing.
 * - A dead draft (reliability goal G3): the request in flight ends with the target's greedy tokens, the draft
 *   group re-forms in the background and a later request speculates again.
 */
import { describe, test, after, before } from 'node:test';
import assert from 'node:assert/strict';
import { startCluster, type Cluster } from '../../coordinator/cluster.ts';
import { samplingDistribution } from '../../coordinator/speculative.ts';
import { fixtureDir, readReference, waitFor } from '../helpers/fixtures.ts';
import { cpSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import { join } from 'node:path';

/**
 * A draft that overlaps the target without equalling it: llama-tiny with its LM head scaled by 0.15, so its
 * distributions are flatter versions of the target's. Both acceptances and rejections happen, and a wrong
 * residual would show (with a draft of unrelated weights, the residual is nearly p and hides the error).
 */
function flattenedDraft(): string {
  const dir = join(mkdtempSync(join(tmpdir(), 'weft-draft-')), 'llama-tiny-flat');
  cpSync(fixtureDir('llama-tiny'), dir, { recursive: true });
  const file = join(dir, 'model.safetensors');
  const bytes = readFileSync(file);
  const headerLength = Number(bytes.readBigUInt64LE(0));
  const header = JSON.parse(bytes.subarray(8, 8 + headerLength).toString('utf8')) as Record<string, { data_offsets: [number, number] }>;
  const [begin, end] = header['lm_head.weight']!.data_offsets;
  for (let at = 8 + headerLength + begin; at < 8 + headerLength + end; at += 4) bytes.writeFloatLE(bytes.readFloatLE(at) * 0.15, at);
  writeFileSync(file, bytes);
  return dir;
}

async function generate(cluster: Cluster, promptIds: number[], sampling: Record<string, unknown>): Promise<number[]> {
  for await (const event of cluster.generate({ promptIds, sampling })) if (event.type === 'done') return event.tokens;
  return [];
}

for (const { target, draft, tp } of [
  { target: 'llama-tiny', draft: 'llama-tiny-bf16', tp: 1 },
  { target: 'llama-tiny', draft: 'llama-tiny-bf16', tp: 2 },
  { target: 'llama3-tiny', draft: 'llama3-tiny', tp: 2 },
]) {
  describe(`greedy with speculation equals ${target}'s own greedy output (draft ${draft}, TP=${tp})`, () => {
    let cluster: Cluster;
    before(async () => {
      cluster = await startCluster({ modelDir: fixtureDir(target), tp, threads: 1, draft: { modelDir: fixtureDir(draft), tp, k: 3 } });
    });
    after(async () => cluster?.close());
    test('tokens equal Hugging Face greedy', async () => {
      const reference = readReference(target);
      for (let i = 0; i < reference.prompts.length; i++)
        assert.deepEqual(await generate(cluster, reference.prompts[i]!, { maxNewTokens: 24, ignoreEos: true }), reference.greedy[i], `prompt ${i}`);
      const stats = cluster.speculationStats()!;
      assert.ok(stats.rounds > 0 && stats.proposed > 0, 'speculative rounds ran');
      if (target === draft) assert.equal(stats.accepted, stats.proposed, 'a draft identical to the target is always accepted');
      else assert.ok(stats.accepted < stats.proposed, 'a different draft gets rejections');
    });
  });
}

test('sampling with speculation follows the target distribution (chi-square, 15 df, p = 0.001)', async () => {
  const prompt = readReference('llama-tiny').prompts[0]!;
  const shape = { temperature: 0.4, topK: 4, topP: 1 };
  const draftDir = flattenedDraft();
  const cluster = await startCluster({ modelDir: fixtureDir('llama-tiny'), threads: 1, kvSlots: 8, draft: { modelDir: draftDir, k: 2 } });
  try {
    // the target's own distribution: p(t1) and p(t2 | t1) from its log-probs, as the sampler shapes them
    const first = samplingDistribution(Float32Array.from((await cluster.score(prompt, { full: true })).full!.at(-1)!), shape);
    const firstTokens = Array.from(first.keys()).filter((t) => first[t]! > 0);
    const expected = new Map<string, number>();
    for (const t1 of firstTokens) {
      const second = samplingDistribution(Float32Array.from((await cluster.score([...prompt, t1], { full: true })).full!.at(-1)!), shape);
      second.forEach((p, t2) => p > 0 && expected.set(`${t1},${t2}`, first[t1]! * p));
    }
    assert.equal(expected.size, 16);
    const runs = 2400;
    const counts = new Map<string, number>();
    const batch = 8;
    for (let seed = 0; seed < runs; seed += batch) {
      const pairs = await Promise.all(Array.from({ length: batch }, (_, j) => generate(cluster, prompt, { ...shape, seed: seed + j, maxNewTokens: 2, ignoreEos: true })));
      for (const [t1, t2] of pairs) counts.set(`${t1},${t2}`, (counts.get(`${t1},${t2}`) ?? 0) + 1);
    }
    let chi = 0;
    for (const [cell, p] of expected) chi += ((counts.get(cell) ?? 0) - runs * p) ** 2 / (runs * p);
    const outside = [...counts.keys()].filter((cell) => !expected.has(cell));
    assert.deepEqual(outside, [], 'no token outside the top-k cells');
    console.log(`# chi-square ${chi.toFixed(1)}`);
    assert.ok(chi < 37.7, `chi-square ${chi.toFixed(1)} over 16 cells`);
    const stats = cluster.speculationStats()!;
    assert.ok(stats.accepted > 0.2 * stats.proposed && stats.accepted < 0.95 * stats.proposed, `acceptance ${stats.accepted}/${stats.proposed}: both paths exercised`);
  } finally {
    await cluster.close();
    rmSync(draftDir, { recursive: true, force: true });
  }
});

test('a killed draft worker: the stream completes with greedy tokens, the draft group re-forms within 30 s and speculation resumes (G3)', async () => {
  const reference = readReference('llama-tiny');
  const cluster = await startCluster({ modelDir: fixtureDir('llama-tiny'), threads: 1, draft: { modelDir: fixtureDir('llama-tiny-bf16'), k: 2 } });
  try {
    const events = cluster.generate({ promptIds: reference.prompts[0]!, sampling: { maxNewTokens: 200, ignoreEos: true } });
    assert.equal((await events.next()).done, false);
    const [, draftPid] = cluster.workerPids(); // target rank 0, then draft rank 0
    const killedAt = performance.now();
    process.kill(draftPid!, 'SIGKILL');
    let tokens: number[] = [];
    for (let e = await events.next(); !e.done; e = await events.next()) if (e.value.type === 'done') tokens = e.value.tokens;
    assert.equal(tokens.length, 200, 'the request in flight finished');
    assert.deepEqual(tokens.slice(0, 24), reference.greedy[0], "the target's greedy output");
    assert.match(cluster.speculationStats()!.draftError ?? '', /draft worker rank 0/, 'the fault was noticed and named');
    assert.ok(await waitFor(() => cluster.speculationStats()!.draftActive, 30_000), 'the draft group is back within 30 s');
    const stats = cluster.speculationStats()!;
    console.log(`# draft group back ${((performance.now() - killedAt) / 1000).toFixed(1)} s after the kill`);
    assert.equal(stats.draftReforms, 1);
    assert.notEqual(cluster.workerPids()[1], draftPid, 'a new draft process');
    const proposedBefore = stats.proposed;
    assert.deepEqual(await generate(cluster, reference.prompts[1]!, { maxNewTokens: 24, ignoreEos: true }), reference.greedy[1], 'greedy after the re-form');
    assert.ok(cluster.speculationStats()!.proposed > proposedBefore, 'the later request speculates again');
  } finally {
    await cluster.close();
  }
});
