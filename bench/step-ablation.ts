/**
 * Where a decode step's time goes, as the graph runs it (launch gaps and programmatic launches included, which a
 * kernel profiler's serialised view leaves out): the same decode graph captured with one kind of small op left
 * out, beside the whole step. A left-out op returns a tensor of its output's shape without launching anything,
 * so the tokens are meaningless and only the times count. The difference to the whole step is the most that
 * fusing that op away (or making it free) could save.
 *
 *   node --import tsx bench/step-ablation.ts --model llama-2-7b --batch 1 --prompt 5
 *
 * Variants: whole; without addRmsNorm (the residual adds and norms between the projections); without qkvRope
 * (rope and the KV write); without attention; without all three (the projections, embedding, LM head and sampling
 * alone). Random bf16 weights of the preset's shapes. On the CPU (a smoke run of a cut model) each variant's
 * eager step is timed instead of a graph replay.
 */
import { Command } from 'commander';
import { createEngine, type Engine, type Tensor } from '../worker/native.ts';
import { planShards } from '../core/shard-plan.ts';
import { buildRankModel, disposeRankModel, randomWeights } from '../worker/models/registry.ts';
import { soloCollectives } from '../worker/collectives/collectives.ts';
import { StepRunner } from '../worker/runner.ts';
import { GRAPH_BUCKETS } from '../worker/step-sizes.ts';
import { kvCacheLayout } from '../core/kv-block-table.ts';
import { presetSpec } from './presets.ts';
import { serialStepMs } from './decode-steps.ts';

const opts = new Command('bench-step-ablation')
  .option('--model <name>', 'preset (bench/presets.ts)', 'llama-2-7b')
  .option('--batch <n>', 'sequences in the decode step', '1')
  .option('--prompt <n>', 'prompt tokens per sequence (its prefill runs every op)', '5')
  .option('--layers <n>', 'override the layer count (a cut model that fits)')
  .option('--device <d>', 'cuda, or cpu for a smoke run (eager steps timed, no graphs)', 'cuda')
  .parse()
  .opts<{ model: string; batch: string; prompt: string; layers?: string; device: 'cpu' | 'cuda' }>();
const batch = Number(opts.batch), prompt = Number(opts.prompt);
const cuda = opts.device === 'cuda';
// a decode step's rows: the graph's bucket on CUDA (padding rows included), the batch in eager CPU steps
const decodeRows = cuda ? GRAPH_BUCKETS.find((b) => b >= batch)! : batch;
if (prompt === decodeRows) throw new Error(`--prompt must differ from the decode step's ${decodeRows} rows: steps of that many tokens are the ones the variants leave ops out of`);

type Skipped = 'addRmsNorm' | 'qkvRope' | 'attention';
const VARIANTS: { name: string; skip: readonly Skipped[] }[] = [
  { name: 'whole step', skip: [] },
  { name: 'without addRmsNorm', skip: ['addRmsNorm'] },
  { name: 'without qkvRope', skip: ['qkvRope'] },
  { name: 'without attention', skip: ['attention'] },
  { name: 'projections alone', skip: ['addRmsNorm', 'qkvRope', 'attention'] },
];

/**
 * `engine` with the `skip`ped ops of decode steps (their first operand has `decodeRows` rows) replaced by ones
 * that launch nothing: addRmsNorm hands back x as both outputs, attention its q, qkvRope a persistent tensor of q's
 * shape made before any step. `leftOut` counts the calls left out.
 */
function withoutOps(engine: Engine, skip: readonly Skipped[], qOfDecode: Tensor, leftOut: Map<Skipped, number>): Engine {
  const decode = (t: Tensor, op: Skipped) => t.shape[0] === decodeRows && (leftOut.set(op, (leftOut.get(op) ?? 0) + 1), true);
  const replaced: Partial<Record<Skipped, unknown>> = {
    ...(skip.includes('addRmsNorm') && { addRmsNorm: (x: Tensor, y: Tensor, w: Tensor, eps: number) => (decode(x, 'addRmsNorm') ? { sum: x, normed: x } : engine.addRmsNorm(x, y, w, eps)) }),
    ...(skip.includes('attention') && { attention: (q: Tensor, ...rest: unknown[]) => (decode(q, 'attention') ? q : (engine.attention as (...a: unknown[]) => Tensor)(q, ...rest)) }),
    ...(skip.includes('qkvRope') && { qkvRope: (qkv: Tensor, ...rest: unknown[]) => (decode(qkv, 'qkvRope') ? qOfDecode : (engine.qkvRope as (...a: unknown[]) => Tensor)(qkv, ...rest)) }),
  };
  return new Proxy(engine, {
    get: (target, key) => {
      if (typeof key === 'string' && key in replaced) return replaced[key as Skipped];
      const value = Reflect.get(target, key) as unknown;
      return typeof value === 'function' ? value.bind(target) : value;
    },
  });
}

const engine = createEngine({ backend: opts.device, arenaBytes: 16 * 2 ** 30 });
const spec = presetSpec(opts.model, opts.layers ? { num_hidden_layers: Number(opts.layers) } : {});
const plan = planShards(spec, 1);
const kv = kvCacheLayout({ kvSlots: batch, maxContext: prompt + 64, device: opts.device });
const model = buildRankModel(engine, spec, plan, 0, randomWeights(engine, 7), kv);
const qOfDecode = engine.zeros('f32', [decodeRows, plan.nHeadsPerRank * spec.headDim]); // persistent: made outside a step
const greedy = (n: number) => ({ temperature: Array(n).fill(0), topK: Array(n).fill(0), topP: Array(n).fill(1), uniform: Array(n).fill(0) });
const seqs = [...Array(batch).keys()];
const decodeAt = (position: number) => ({ positions: seqs.map(() => position), tokenSeq: seqs, kvBlockTable: seqs.map((b) => [b]), logitRows: seqs, sample: greedy(batch) });

const rows: { variant: string; ms: number; savedMs: number; leftOutPerStep: Record<string, number> }[] = [];
for (const { name, skip } of VARIANTS) {
  const leftOut = new Map<Skipped, number>();
  const runner = new StepRunner(withoutOps(engine, skip, qOfDecode, leftOut), soloCollectives(), model, kv, { arenaBytes: 16 * 2 ** 30 });
  for (const b of seqs)
    await runner.step({ tokens: Array.from({ length: prompt }, (_, i) => (i * 7 + b) % spec.vocabSize), positions: [...Array(prompt).keys()], tokenSeq: Array(prompt).fill(0), kvBlockTable: [[b]], logitRows: [prompt - 1], sample: greedy(1) });
  // a graph is captured from one eager warm-up run and the capture itself; the CPU runs eager steps, all counted
  const warm = await serialStepMs(runner, decodeAt, seqs.map(() => 1), prompt, 1);
  const counted = cuda ? 2 : 1 + 3;
  const ms = cuda ? (await serialStepMs(runner, decodeAt, warm.tokens, prompt + 1, 1), runner.timeGraphReplay(decodeRows, 50)) : (await serialStepMs(runner, decodeAt, warm.tokens, prompt + 1, 3)).ms;
  const leftOutPerStep = Object.fromEntries([...leftOut].map(([op, n]) => [op, n / counted]));
  rows.push({ variant: name, ms, savedMs: (rows[0]?.ms ?? ms) - ms, leftOutPerStep });
}
disposeRankModel(model);

console.log(`${opts.model}${opts.layers ? ` (${opts.layers} layers)` : ''}, batch ${batch}, prompt ${prompt}, ${cuda ? 'decode graph replay' : 'eager step (cpu)'}:`);
console.log('| variant | ms | saved vs whole | ops left out per step |\n|---|---|---|---|');
for (const r of rows) console.log(`| ${r.variant} | ${r.ms.toFixed(3)} | ${r.savedMs.toFixed(3)} | ${Object.entries(r.leftOutPerStep).map(([op, n]) => `${op} x${n}`).join(', ') || '-'} |`);
console.log(JSON.stringify({ bench: 'step-ablation', model: opts.model, batch, prompt, device: opts.device, rows }));
