// Quantized hf-tiny models end to end on the CPU backend: a checkpoint `weft quantize` wrote, at TP 1, 2 and 4
// (and Mixtral with expert parallelism), scores every position as the same model with its projections
// dequantized into a dense f32 checkpoint (the reference: w = q * scale in fp32, which is what the CPU kernels
// multiply by). Greedy agreement with the unquantized model is recorded (test diagnostics), not asserted: the tiny
// random models have near-ties that a quantization step flips.
import assert from 'node:assert/strict';
import { mkdirSync, mkdtempSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import { tmpdir } from 'node:os';
import path from 'node:path';
import { after, test } from 'node:test';
import { startCluster, type ClusterOptions } from '../../coordinator/cluster.ts';
import { quantizeCheckpoint } from '../../coordinator/quantize.ts';
import { dequantizeMatrix } from '../../core/weight-quantize.ts';
import { fixtureDir, maxAbsDiff, readReference } from '../helpers/fixtures.ts';
import { readTensors, writeTensors } from '../helpers/safetensors-files.ts';

const tmp = mkdtempSync(path.join(tmpdir(), 'weft-quantized-models-'));
after(() => rmSync(tmp, { recursive: true, force: true }));

/** The quantized checkpoint's projections dequantized into f32, everything else as stored, no quantization block. */
function dequantizedCopy(quantized: string): string {
  const dir = `${quantized}-dequantized`;
  mkdirSync(dir);
  const config = JSON.parse(readFileSync(path.join(quantized, 'config.json'), 'utf8')) as Record<string, unknown> & { quantization: { format: 'int8' | 'int4'; group_size: number } };
  const format = { kind: config.quantization.format, groupSize: config.quantization.group_size === -1 ? ('channel' as const) : config.quantization.group_size };
  const tensors = readTensors(path.join(quantized, 'model.safetensors'));
  const byName = new Map(tensors.map((t) => [t.name, t]));
  const dense = tensors.filter((t) => !t.name.endsWith('.scales')).map((t) => {
    const scales = byName.get(t.name.replace(/\.weight$/, '.scales'));
    if (scales === undefined) return t;
    const [n, stored] = t.shape as [number, number];
    const k = format.kind === 'int4' ? stored * 2 : stored;
    const values = dequantizeMatrix({ data: t.bytes, scales: scales.bytes }, n, k, format);
    return { name: t.name, dtype: 'F32', shape: [n, k], bytes: Buffer.from(values.buffer) };
  });
  writeTensors(path.join(dir, 'model.safetensors'), dense);
  delete (config as Record<string, unknown>).quantization;
  writeFileSync(path.join(dir, 'config.json'), JSON.stringify(config));
  for (const file of ['tokenizer.json', 'tokenizer_config.json']) writeFileSync(path.join(dir, file), readFileSync(path.join(quantized, file)));
  return dir;
}

/** Per prompt of the fixture's reference: every position's log-probs, and 16 greedy tokens. */
async function run(options: ClusterOptions, prompts: number[][]): Promise<{ logprobs: Float32Array[][]; greedy: number[][] }> {
  const cluster = await startCluster({ threads: 1, ...options });
  try {
    const logprobs: Float32Array[][] = [];
    const greedy: number[][] = [];
    for (const prompt of prompts) {
      logprobs.push((await cluster.score(prompt, { full: true })).full!);
      for await (const event of cluster.generate({ promptIds: prompt, sampling: { maxNewTokens: 16, ignoreEos: true } }))
        if (event.type === 'done') greedy.push(event.tokens);
    }
    return { logprobs, greedy };
  } finally {
    await cluster.close();
  }
}

const CASES = [
  { model: 'llama-tiny', format: 'int8', groupSize: 'channel', tps: [1, 2, 4] },
  { model: 'llama-tiny', format: 'int4', groupSize: 4, tps: [1, 2, 4] },
  { model: 'llama3-tiny', format: 'int4', groupSize: 16, tps: [2] },
  { model: 'mixtral-tiny', format: 'int4', groupSize: 8, tps: [1, 2], expertParallel: true },
  { model: 'llama3-tiny', format: 'int4', groupSize: 16, tps: [1, 2], quantizeLmHead: true }, // tied: lm_head.weight written
] as const;

for (const c of CASES) {
  const head = 'quantizeLmHead' in c;
  test(`${c.model} ${c.format} (groups of ${c.groupSize}${head ? ', LM head too' : ''}) at tp ${c.tps.join('/')}: log-probs equal the dequantized dense model's`, async (t) => {
    const quantized = path.join(tmp, `${c.model}-${c.format}-${c.groupSize}${head ? '-head' : ''}`);
    await quantizeCheckpoint({ modelDir: fixtureDir(c.model), out: quantized, format: c.format, groupSize: c.groupSize, quantizeLmHead: head });
    const reference = dequantizedCopy(quantized);
    const prompts = readReference(c.model).prompts.slice(0, 1);
    const original = await run({ modelDir: fixtureDir(c.model), tp: 1 }, prompts);
    for (const tp of c.tps) {
      for (const expertParallel of 'expertParallel' in c && tp > 1 ? [false, true] : [false]) {
        const got = await run({ modelDir: quantized, tp, expertParallel }, prompts);
        const want = await run({ modelDir: reference, tp, expertParallel }, prompts);
        const where = `tp ${tp}${expertParallel ? ' expert-parallel' : ''}`;
        got.logprobs.forEach((rows, p) => {
          // The same fp32 weights, multiplied in the same order: equal up to the last bits (1e-5 of log-probs ~ -6).
          const worst = Math.max(...rows.map((row, r) => maxAbsDiff(row, want.logprobs[p]![r]!)));
          assert.ok(worst <= 1e-5, `${where} prompt ${p}: max abs log-prob difference ${worst}`);
        });
        assert.deepEqual(got.greedy, want.greedy, where);
        const agree = got.greedy.flat().filter((token, i) => token === original.greedy.flat()[i]).length;
        t.diagnostic(`${where}: greedy agreement with the unquantized model ${agree}/${got.greedy.flat().length} tokens`);
      }
    }
  });
}

test('--quantize at load equals the checkpoint weft quantize writes (int4 groups of 4, tp 2)', async () => {
  const quantized = path.join(tmp, 'llama-tiny-at-load');
  await quantizeCheckpoint({ modelDir: fixtureDir('llama-tiny'), out: quantized, format: 'int4', groupSize: 4 });
  const prompts = readReference('llama-tiny').prompts.slice(0, 1);
  const stored = await run({ modelDir: quantized, tp: 2 }, prompts);
  const atLoad = await run({ modelDir: fixtureDir('llama-tiny'), tp: 2, quantize: 'int4', groupSize: '4' }, prompts);
  assert.deepEqual(atLoad.logprobs, stored.logprobs);
});

test('--quantize --quantize-lm-head at load equals the checkpoint weft quantize --quantize-lm-head writes (a tied head, tp 2)', async () => {
  const quantized = path.join(tmp, 'llama3-tiny-head-at-load');
  await quantizeCheckpoint({ modelDir: fixtureDir('llama3-tiny'), out: quantized, format: 'int4', groupSize: 16, quantizeLmHead: true });
  const prompts = readReference('llama3-tiny').prompts.slice(0, 1);
  const stored = await run({ modelDir: quantized, tp: 2 }, prompts);
  const atLoad = await run({ modelDir: fixtureDir('llama3-tiny'), tp: 2, quantize: 'int4', groupSize: '16', quantizeLmHead: true }, prompts);
  const denseHead = await run({ modelDir: fixtureDir('llama3-tiny'), tp: 2, quantize: 'int4', groupSize: '16' }, prompts);
  assert.deepEqual(atLoad.logprobs, stored.logprobs);
  assert.notDeepEqual(atLoad.logprobs, denseHead.logprobs, 'the head quantized changes the log-probs');
});
