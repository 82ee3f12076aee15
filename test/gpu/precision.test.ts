/**
 * Precision on CUDA judged against Hugging Face's own bf16 path: on bf16 checkpoints (make-precision-fixtures.py,
 * its output directory named by WEFT_PRECISION_FIXTURE), weft on CUDA (bf16 weights, the default KV dtype) at
 * TP 1, 2 and 4 may be no further from HF's fp32 forward than HF's bf16 forward is; and its greedy tokens equal
 * HF fp32's wherever HF bf16's equal them. Models: Mixtral with 8 experts, Llamas at head dims 32 and 128, all
 * with GQA groups of 3. A TP degree the heads do not split over (6 query / 2 KV heads over 4 ranks) is skipped,
 * saying so. Prints a table of the numbers at the end. Skips, saying why, without a GPU or the fixtures.
 *
 * The statistic: d = |log p(next prompt token)| of weft minus that of HF fp32, at every position of every prompt
 * (about 230), against the same d of HF bf16. Asserted: weft's mean d <= HF's (the rounding a path adds
 * everywhere) and weft's 95th percentile <= HF's (its tail, without letting a few positions decide). The max is
 * asserted for the dense Llamas only: a Mixtral's router keeps 2 of 8 experts, and where two router logits
 * nearly tie any rounding may flip the choice and move that one position by 0.1 or more; on which side of a
 * tie each path lands is chance, so a Mixtral's max says little about precision (printed, not asserted).
 */
import { describe, test, before, after } from 'node:test';
import assert from 'node:assert/strict';
import { existsSync, readdirSync, readFileSync } from 'node:fs';
import { join } from 'node:path';
import { startCluster, type Cluster } from '../../coordinator/cluster.ts';
import { readModelSpec } from '../../core/model-spec.ts';
import { workingTpSizes } from '../../core/shard-plan.ts';
import { greedy } from './hf-agreement.ts';
import { cudaSkipReason } from './shared-gpu-group.ts';

interface HfRun {
  readonly logprobs: number[][]; // [prompt][position j]: log p(prompts[i][j + 1] | prompts[i][..j])
  readonly greedy: number[][]; // [prompt][16]
}
interface PrecisionReference {
  readonly model: string;
  readonly prompts: number[][];
  readonly fp32: HfRun & { readonly greedyGap: number[][] }; // top-1 minus top-2 log-prob at each greedy step
  readonly bf16: HfRun;
}
interface Deviation {
  readonly mean: number;
  readonly p95: number;
  readonly max: number;
}

const root = process.env.WEFT_PRECISION_FIXTURE;
const skip =
  cudaSkipReason() ||
  (root === undefined ? 'WEFT_PRECISION_FIXTURE is not set (python3 test/gpu/make-precision-fixtures.py DIR makes the fixtures)'
  : !existsSync(root) ? `WEFT_PRECISION_FIXTURE ${root} does not exist`
  : false);
if (skip) console.log(`# precision suite skipped: ${skip}`);
const models = skip ? [] : readdirSync(root!).filter((name) => existsSync(join(root!, name, 'precision.json'))).sort();
if (!skip && models.length === 0) console.log(`# no precision.json under ${root}`);

/** |a - b| at every position of every prompt: mean, 95th percentile (nearest rank) and max. */
function deviation(a: readonly (readonly number[])[], b: readonly (readonly number[])[]): Deviation {
  const d = a.flatMap((row, i) => {
    assert.equal(row.length, b[i]!.length, `prompt ${i}: ${row.length} log-probs against ${b[i]!.length}`);
    return row.map((x, j) => Math.abs(x - b[i]![j]!));
  });
  d.sort((x, y) => x - y);
  return { mean: d.reduce((s, x) => s + x, 0) / d.length, p95: d[Math.ceil(0.95 * d.length) - 1]!, max: d.at(-1)! };
}

/** Tokens at the start of `a` equal to `b`'s. */
function agreeing(a: readonly number[], b: readonly number[]): number {
  const first = a.findIndex((t, j) => t !== b[j]);
  return first < 0 ? Math.min(a.length, b.length) : first;
}

const table: string[] = [];

for (const name of models) {
  const dir = join(root!, name);
  const reference = JSON.parse(readFileSync(join(dir, 'precision.json'), 'utf8')) as PrecisionReference;
  const spec = readModelSpec(dir);
  const moe = spec.nExperts > 0;
  const hf = deviation(reference.bf16.logprobs, reference.fp32.logprobs);
  const splits = workingTpSizes(spec);
  for (const tp of [1, 2, 4]) {
    const tpSkip = !splits.includes(tp) && `${spec.nHeads} query / ${spec.nKvHeads} KV heads do not split over ${tp} ranks (TP ${splits.join(', ')} do)`;
    describe(`${name} at TP ${tp} on CUDA: no further from HF fp32 than HF bf16`, { skip: tpSkip }, () => {
      let cluster: Cluster;
      let ours: Deviation;
      let weftGreedy: number[][];
      before(async () => {
        cluster = await startCluster({ modelDir: dir, tp, device: 'cuda' });
        const scored: number[][] = [];
        for (const prompt of reference.prompts) scored.push((await cluster.score(prompt)).logprobs.slice(1) as number[]);
        ours = deviation(scored, reference.fp32.logprobs);
        weftGreedy = [];
        for (const prompt of reference.prompts) weftGreedy.push(await greedy(cluster, prompt, reference.fp32.greedy[0]!.length));
        const count = (run: number[][]) => run.reduce((s, tokens, i) => s + agreeing(tokens, reference.fp32.greedy[i]!), 0);
        const total = reference.fp32.greedy.flat().length;
        const f = (x: number) => x.toFixed(4);
        table.push(
          `| ${name} | ${tp} | ${f(ours.mean)} / ${f(hf.mean)} | ${f(ours.p95)} / ${f(hf.p95)} | ${f(ours.max)} / ${f(hf.max)} | ${count(weftGreedy)} / ${count(reference.bf16.greedy)} of ${total} |`,
        );
      });
      after(async () => cluster?.close());

      test("mean and 95th percentile of |delta log-prob| within HF bf16's", () => {
        assert.ok(ours.mean <= hf.mean, `mean |delta| ${ours.mean} exceeds HF bf16's ${hf.mean}`);
        assert.ok(ours.p95 <= hf.p95, `95th percentile |delta| ${ours.p95} exceeds HF bf16's ${hf.p95}`);
      });

      test("max |delta log-prob| within HF bf16's (dense models: no router to flip)", { skip: moe && 'a Mixtral: its max is a routing near-tie (printed)' }, () => {
        assert.ok(ours.max <= hf.max, `max |delta| ${ours.max} exceeds HF bf16's ${hf.max}`);
      });

      // A divergence is allowed only at a near tie: where fp32's top-2 log-prob gap is below HF bf16's own largest
      // deviation from fp32 on these prompts, a bf16 forward can land on either side (HF's did elsewhere).
      test('greedy tokens (decode through CUDA graphs) equal HF fp32 wherever HF bf16 equals it, but at near ties', () => {
        reference.prompts.forEach((_, i) => {
          const expected = reference.fp32.greedy[i]!;
          const n = agreeing(reference.bf16.greedy[i]!, expected);
          const j = agreeing(weftGreedy[i]!, expected);
          const gap = reference.fp32.greedyGap[i]![j]!;
          assert.ok(j >= n || gap < hf.max, `prompt ${i} token ${j}: ours ${weftGreedy[i]![j]}, HF fp32 ${expected[j]} (its top-2 log-prob gap there ${gap}, HF bf16's max deviation ${hf.max}), HF bf16 agrees up to token ${n}`);
          if (j < n) console.log(`# ${name} TP ${tp}: prompt ${i} leaves HF fp32 at token ${j}, a near tie (fp32 top-2 gap ${gap.toFixed(4)} < HF bf16's max deviation ${hf.max.toFixed(4)})`);
        });
      });
    });
  }
}

after(() => {
  if (table.length === 0) return;
  console.log('\n| model | TP | mean abs delta, weft / HF bf16 | p95, weft / HF bf16 | max, weft / HF bf16 | greedy tokens = HF fp32, weft / HF bf16 |');
  console.log('| --- | --- | --- | --- | --- | --- |');
  for (const row of table) console.log(row);
});
