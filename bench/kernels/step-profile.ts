/**
 * One decode step of a preset model, for a kernel profiler (ncu) to time kernel by kernel:
 *
 *   ncu --csv ... node --import tsx bench/kernels/step-profile.ts --model llama-2-7b --batch 1 --prompt 5
 *
 * Random weights on the device, one prefill per sequence, then two decode steps: the first captures the batch's
 * CUDA graph (an eager warm-up run, then the capture), the second replays it inside a profiler range
 * (Engine.profileRange), so `ncu --profile-from-start off` times the replay's kernels alone.
 */
import { Command } from 'commander';
import { createEngine } from '../../worker/native.ts';
import { planShards } from '../../core/shard-plan.ts';
import { buildRankModel, randomWeights } from '../../worker/models/registry.ts';
import { soloCollectives } from '../../worker/collectives/collectives.ts';
import { StepRunner } from '../../worker/runner.ts';
import { kvCacheLayout } from '../../core/kv-block-table.ts';
import { presetSpec } from '../presets.ts';

const opts = new Command('step-profile')
  .option('--model <name>', 'preset (bench/presets.ts)', 'llama-2-7b')
  .option('--batch <n>', 'sequences in the decode step', '1')
  .option('--prompt <n>', 'prompt tokens per sequence', '5')
  .parse()
  .opts<{ model: string; batch: string; prompt: string }>();
const batch = Number(opts.batch), prompt = Number(opts.prompt);

const engine = createEngine({ backend: 'cuda', arenaBytes: 16 * 2 ** 30 });
const spec = presetSpec(opts.model, {});
const plan = planShards(spec, 1, {});
const kv = kvCacheLayout({ kvSlots: batch, maxContext: prompt + 16, device: 'cuda' });
const model = buildRankModel(engine, spec, plan, 0, randomWeights(engine, 7), kv);
const runner = new StepRunner(engine, soloCollectives(), model, kv);
const greedy = (n: number) => ({ temperature: Array(n).fill(0), topK: Array(n).fill(0), topP: Array(n).fill(1), uniform: Array(n).fill(0) });
const rows = [...Array(batch).keys()];
for (const b of rows)
  await runner.step({ tokens: Array.from({ length: prompt }, (_, i) => (i * 7 + b) % spec.vocabSize), positions: [...Array(prompt).keys()], tokenSeq: Array(prompt).fill(0), kvBlockTable: [[b]], logitRows: [prompt - 1], sample: greedy(1) });
const decode = (position: number) => runner.step({ tokens: rows.map(() => 1), positions: rows.map(() => position), tokenSeq: rows, kvBlockTable: rows.map((b) => [b]), logitRows: rows, sample: greedy(batch) });
await decode(prompt);
engine.profileRange(true);
await decode(prompt + 1);
engine.profileRange(false);
console.log(`step-profile: ${opts.model} batch ${batch} prompt ${prompt}: done`);
