/**
 * Quantized weights on CUDA against the CPU backend (which multiplies by the dequantized fp32 values): hf-tiny
 * models, Mixtral's experts included (int8 per channel takes the vector GEMV; their narrow int4 groups the scalar one) and, when the GPU host made it (WEFT_WIDE_FIXTURE=DIR,
 * make-wide-fixture.py), the wide model at int8 per channel and int4 in groups of 128 (its int4 weights in tiles,
 * quant-tiles.h: the one-token kernel, the 17..64-token tensor-core GEMV, and, for a 100-token prompt added to its
 * reference prompts, the dequantize-then-GEMM path of steps over 64 tokens). f32 KV caches on both, so only the
 * matrix products differ. Skips, saying why, without a CUDA build or a GPU.
 *
 * Tolerance: up to 16 tokens the GEMV runs on f16 tensor cores with x rounded to f16 (gemv-quant-mma.cu, ~3e-4 of
 * the output's scale, fp32 accumulation); a longer prompt's
 * products run on bf16 tensor cores with the weights and activations rounded to bf16, as the dense bf16 path
 * does (test/gpu/e2e.test.ts: 0.05 on log-probs). 0.05 bounds both.
 */
import { test } from 'node:test';
import assert from 'node:assert/strict';
import { startCluster, type ClusterOptions } from '../../coordinator/cluster.ts';
import { gpuSkipReason } from '../helpers/cluster.ts';
import { fixtureDir, maxAbsDiff, readReference } from '../helpers/fixtures.ts';

const skip = gpuSkipReason();
const TOLERANCE = 0.05;

async function scoreAll(options: ClusterOptions, prompts: number[][]): Promise<{ logprobs: Float32Array[][]; greedy: number[][] }> {
  const cluster = await startCluster({ kvDtype: 'f32', ...options });
  try {
    const logprobs: Float32Array[][] = [];
    const greedy: number[][] = [];
    for (const prompt of prompts) {
      logprobs.push((await cluster.score(prompt, { full: true })).full!);
      for await (const event of cluster.generate({ promptIds: prompt, sampling: { maxNewTokens: 24, ignoreEos: true } }))
        if (event.type === 'done') greedy.push(event.tokens);
    }
    return { logprobs, greedy };
  } finally {
    await cluster.close();
  }
}

const wide = process.env.WEFT_WIDE_FIXTURE;
const cases: { name: string; dir: string; quantize: 'int8' | 'int4'; groupSize: string; tp: number; quantizeLmHead?: boolean }[] = [
  { name: 'llama-tiny', dir: fixtureDir('llama-tiny'), quantize: 'int8', groupSize: 'channel', tp: 1 },
  { name: 'llama-tiny', dir: fixtureDir('llama-tiny'), quantize: 'int4', groupSize: '4', tp: 1 },
  { name: 'llama3-tiny', dir: fixtureDir('llama3-tiny'), quantize: 'int4', groupSize: '16', tp: 1 },
  { name: 'llama3-tiny', dir: fixtureDir('llama3-tiny'), quantize: 'int4', groupSize: '16', tp: 1, quantizeLmHead: true },
  { name: 'mixtral-tiny', dir: fixtureDir('mixtral-tiny'), quantize: 'int8', groupSize: 'channel', tp: 1 },
  { name: 'mixtral-tiny', dir: fixtureDir('mixtral-tiny'), quantize: 'int4', groupSize: '8', tp: 1 },
  ...(wide ? ([
    { name: 'wide', dir: wide, quantize: 'int8', groupSize: 'channel', tp: 1 },
    { name: 'wide', dir: wide, quantize: 'int4', groupSize: '128', tp: 1 },
    { name: 'wide', dir: wide, quantize: 'int4', groupSize: '128', tp: 1, quantizeLmHead: true },
  ] as const) : []),
];

for (const c of cases) {
  test(`${c.name} ${c.quantize} (groups of ${c.groupSize}${c.quantizeLmHead ? ', LM head too' : ''}) on CUDA: log-probs within ${TOLERANCE} of the CPU's`, { skip }, async (t) => {
    const prompts = readReference(c.name === 'wide' ? c.dir : c.name).prompts;
    if (c.name === 'wide') prompts.push(Array.from({ length: 100 }, (_, i) => 2 + ((i * 37) % 500)));  // a step over 64 tokens
    const common = { modelDir: c.dir, tp: c.tp, quantize: c.quantize, groupSize: c.groupSize, quantizeLmHead: c.quantizeLmHead ?? false } as const;
    const cpu = await scoreAll({ ...common, device: 'cpu' }, prompts);
    const gpu = await scoreAll({ ...common, device: 'cuda' }, prompts);
    gpu.logprobs.forEach((rows, p) => {
      const worst = Math.max(...rows.map((row, r) => maxAbsDiff(row, cpu.logprobs[p]![r]!)));
      assert.ok(worst <= TOLERANCE, `prompt ${p} (${prompts[p]!.length} tokens): max abs log-prob difference ${worst}`);
      t.diagnostic(`prompt ${p} (${prompts[p]!.length} tokens): max abs log-prob difference ${worst.toExponential(2)}`);
    });
    const agree = gpu.greedy.flat().filter((token, i) => token === cpu.greedy.flat()[i]).length;
    t.diagnostic(`greedy agreement CUDA vs CPU: ${agree}/${gpu.greedy.flat().length} tokens`);
  });
}
