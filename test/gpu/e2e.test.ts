/**
 * End to end on CUDA: every hf-tiny model against Hugging Face (real worker processes, the CUDA engine,
 * decode through CUDA graphs), NCCL through koffi on a one-rank communicator, and, when the GPU host made
 * it (WEFT_WIDE_FIXTURE=DIR, see make-wide-fixture.py), a wide bf16 model so kernels run at real widths.
 * Skips, saying why, without a CUDA build or a GPU.
 *
 * Tolerances: f32 weights are computed in fp32 throughout (GEMV in fp32, cuBLAS without TF32), so the
 * fixtures' 1e-3 holds. bf16 weights: matrix products over more than 8 tokens round activations to bf16
 * for the tensor cores (relative error ~2^-8 per product), so log-probs get the README's ~0.05. A bf16 KV
 * cache (the default on CUDA) adds its own budget, KV_BF16_BUDGET; every f32 fixture also runs with an f32
 * cache (--kv-dtype f32) at the strict 1e-3.
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync } from 'node:fs';
import { join } from 'node:path';
import { gpuSkipReason } from '../helpers/cluster.ts';
import { startCluster, type Cluster } from '../../coordinator/cluster.ts';
import { spawnSync } from 'node:child_process';
import { fileURLToPath } from 'node:url';
import { DEFAULT_MODEL_DIR } from '../../coordinator/config/options.ts';
import { FIXTURE_MODELS, fixtureDir, readReference } from '../helpers/fixtures.ts';
import { assertGreedyMatches, assertLogprobsMatch, greedy } from './hf-agreement.ts';

const skip = gpuSkipReason();
if (skip) console.log(`# GPU suite skipped: ${skip}`);


/**
 * What a bf16 KV cache adds to the log-prob error, on top of the weights' budget. Each stored k and v is off by
 * up to 2^-9 relative (8 significant bits, round to nearest); every layer's attention output inherits about
 * that relative error, and the log-probs of these models lie in [-9.5, -3.5], so a 2^-9 relative error in
 * what they are made of is up to 9.5 * 2^-9 = 0.019. Measured with the same rounding on the CPU backend
 * (test/integration/kv-dtype.test.ts): 0.0075 to 0.0165 on the hf-tiny models. 0.03 leaves ~2x margin.
 */
const KV_BF16_BUDGET = 0.03;
const wideDir = process.env.WEFT_WIDE_FIXTURE;
const weightsBudget = (name: string): number => (name.endsWith('bf16') ? 0.05 : 1e-3);
/** The built-in default model (bf16 weights) and its reference, what transformers computed on its files. */
const SOTU_REFERENCE = fileURLToPath(new URL('../fixtures/sotu-llama/', import.meta.url));
const models: Array<{ name: string; dir: string; referenceDir: string; kvDtype: 'f32' | 'bf16'; tolerance: number }> = [
  ...FIXTURE_MODELS.flatMap((name) => [
    { name, dir: fixtureDir(name), referenceDir: name, kvDtype: 'bf16' as const, tolerance: weightsBudget(name) + KV_BF16_BUDGET },
    ...(name.endsWith('bf16') ? [] : [{ name, dir: fixtureDir(name), referenceDir: name, kvDtype: 'f32' as const, tolerance: weightsBudget(name) }]),
  ]),
  { name: 'sotu-llama', dir: DEFAULT_MODEL_DIR, referenceDir: SOTU_REFERENCE, kvDtype: 'bf16', tolerance: 0.05 + KV_BF16_BUDGET },
  ...(wideDir && existsSync(join(wideDir, 'config.json')) ? [{ name: 'wide-bf16', dir: wideDir, referenceDir: wideDir, kvDtype: 'bf16' as const, tolerance: 0.05 + KV_BF16_BUDGET }] : []),
];

for (const { name, dir, referenceDir, kvDtype, tolerance } of models) {
  describe(`${name} (KV ${kvDtype}) on CUDA matches Hugging Face`, { skip }, () => {
    let cluster: Cluster;
    before(async () => {
      cluster = await startCluster({ modelDir: dir, tp: 1, device: 'cuda', kvDtype });
    });
    after(async () => cluster?.close());

    test(`log-probs within ${tolerance}`, () => assertLogprobsMatch(cluster, referenceDir, tolerance));

    // fp32 paths must reproduce HF's greedy tokens exactly; bf16 paths may part from HF only at a near-tie
    // (hf-agreement.ts says how that is judged).
    test('greedy tokens (decode through CUDA graphs) equal Hugging Face', () => assertGreedyMatches(cluster, referenceDir, tolerance));
  });
}

describe('speculative decoding on CUDA', { skip }, () => {
  test("greedy with a draft of other weights equals the target's own greedy output", async () => {
    // an f32 KV cache: the target's own greedy output is then HF's exactly (the reference below)
    const cluster = await startCluster({ modelDir: fixtureDir('llama-tiny'), device: 'cuda', kvDtype: 'f32', draft: { modelDir: fixtureDir('llama-tiny-bf16'), k: 3 } });
    try {
      const reference = readReference('llama-tiny');
      for (let i = 0; i < reference.prompts.length; i++) assert.deepEqual(await greedy(cluster, reference.prompts[i]!, 24), reference.greedy[i], `prompt ${i}`);
      assert.ok(cluster.speculationStats()!.proposed > 0);
    } finally {
      await cluster.close();
    }
  });
});

describe('speculative decoding on CUDA with the shipped draft', { skip }, () => {
  test("greedy output equals the default model's own, and over a fifth of the proposals are accepted", async () => {
    const options = { modelDir: DEFAULT_MODEL_DIR, device: 'cuda' as const, kvDtype: 'f32' as const };
    const plain = await startCluster(options);
    const prompts = readReference(SOTU_REFERENCE).prompts;
    const own: number[][] = [];
    try {
      for (const prompt of prompts) own.push(await greedy(plain, prompt, 48));
    } finally {
      await plain.close();
    }
    const cluster = await startCluster({ ...options, draft: { modelDir: fileURLToPath(new URL('../../models/sotu-llama-draft/', import.meta.url)), k: 4 } });
    try {
      for (let i = 0; i < prompts.length; i++) assert.deepEqual(await greedy(cluster, prompts[i]!, 48), own[i], `prompt ${i}`);
      const stats = cluster.speculationStats()!;
      console.log(`# sotu-llama-draft on CUDA: ${stats.accepted} of ${stats.proposed} proposals accepted`);
      assert.ok(stats.accepted / stats.proposed > 0.2, `acceptance ${stats.accepted}/${stats.proposed}`);
    } finally {
      await cluster.close();
    }
  });
});

describe('NCCL through koffi', { skip }, () => {
  test('a one-rank communicator: all-reduce and all-gather on the engine stream (own process)', () => {
    const probe = spawnSync(process.execPath, ['--import', 'tsx', fileURLToPath(new URL('./nccl-probe.ts', import.meta.url))], { encoding: 'utf8', timeout: 60_000 });
    assert.equal(probe.status, 0, `probe exited ${probe.status ?? probe.signal}: ${probe.stderr}`);
    assert.match(probe.stderr, /allReduce ok[\s\S]*allGather ok/);
  });
});

after(() => {
  if (wideDir && !existsSync(join(wideDir, 'config.json'))) console.log(`# wide fixture not found in ${wideDir}`);
});
