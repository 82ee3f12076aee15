/**
 * Speculative decoding benchmark, in one process on one device, random weights of real shapes:
 *
 *   node --import tsx bench/speculative.ts --model llama-2-7b --draft-layers 4 --k 4 --new-tokens 200
 *
 * The draft is a self-draft: the target's first `--draft-layers` layers with its final norm and LM head
 * (shared weights, its own KV cache), so no second checkpoint is needed. With random weights the
 * acceptance rate says nothing about real models; what this measures is the machinery: the round
 * overhead, and whether the measured speedup matches the one the measured acceptance rate a and cost ratio
 * c = draft step / target step predict, (1 - a^(k+1)) / ((1 - a)(k c + 1)). Greedy decoding.
 */
import { Command } from 'commander';
import { createEngine } from '../worker/native.ts';
import { planShards } from '../core/shard-plan.ts';
import { buildRankModel, randomWeights } from '../worker/models/registry.ts';
import { soloCollectives } from '../worker/collectives/collectives.ts';
import { StepRunner } from '../worker/runner.ts';
import { SequenceState } from '../coordinator/generate.ts';
import { SpeculativeExecutor, predictedSpeedup } from '../coordinator/speculative.ts';
import { SeededRng } from '../coordinator/rng.ts';
import { presetSpec } from './presets.ts';
import { kvCacheLayout } from '../core/kv-block-table.ts';

const opts = new Command('bench-speculative')
  .option('--model <name>', 'preset (bench/presets.ts)', 'llama-2-7b')
  .option('--layers <n>', 'override the target layer count')
  .option('--draft-layers <n>', 'layers of the self-draft', '4')
  .option('--k <n>', 'draft tokens per round', '4')
  .option('--prompt <n>', 'prompt length', '5')
  .option('--new-tokens <n>', 'tokens generated', '200')
  .option('--tail-scale <s>', 'scale of the output projections (o, down) of the layers past the draft: small values make the draft agree more often', '1')
  .option('--device <d>', 'cpu or cuda', 'cuda')
  .parse()
  .opts<{ model: string; layers?: string; draftLayers: string; k: string; prompt: string; newTokens: string; tailScale: string; device: 'cpu' | 'cuda' }>();
const k = Number(opts.k);
const newTokens = Number(opts.newTokens);
const promptLength = Number(opts.prompt);

const engine = createEngine({ backend: opts.device });
const spec = presetSpec(opts.model, opts.layers ? { num_hidden_layers: Number(opts.layers) } : {});
const plan = planShards(spec, 1);
const maxContext = promptLength + newTokens + k + 64; // + the 53 positions stepSeconds uses in block 1
// block 0: the sequence, 1: step timing (and on cuda 2: padding rows of the decode graphs)
const kv = kvCacheLayout({ kvSlots: 2, maxContext, device: opts.device });
const built = buildRankModel(engine, spec, plan, 0, randomWeights(engine, 11), kv);
const draftLayers = Number(opts.draftLayers);
// Random weights give a random draft: --tail-scale shrinks what the layers past the draft add to the
// residual stream, which sets the acceptance rate (a synthetic knob for checking the speedup model).
const tailScale = Number(opts.tailScale);
const target =
  tailScale === 1
    ? built
    : {
        ...built,
        model: {
          ...built.model,
          layers: built.model.layers.map((layer, i) => {
            if (i < draftLayers) return layer;
            const l = layer as typeof layer & { w2: { shape: readonly number[] } };
            const shrink = (t: { shape: readonly number[] }, seed: number) => engine.randomUniform(spec.dtype, [...t.shape], seed, tailScale / Math.sqrt(t.shape[1]!));
            return { ...layer, wo: shrink(layer.wo, 1000 + i), w2: shrink(l.w2, 2000 + i) } as typeof layer;
          }),
        },
      };
const draftModel = {
  ...target,
  model: {
    ...target.model,
    layers: target.model.layers.slice(0, draftLayers),
    kvCache: target.model.kvCache.slice(0, draftLayers).map((c) => ({ k: engine.zeros('f32', [...c.k.shape]), v: engine.zeros('f32', [...c.v.shape]) })),
  },
};
const targetRunner = new StepRunner(engine, soloCollectives(), target, kv);
const draftRunner = new StepRunner(engine, soloCollectives(), draftModel, kv);
const rng = new SeededRng(5);
const prompt = Array.from({ length: promptLength }, () => rng.nextUint32() % spec.vocabSize);
const params = { temperature: 0, topK: 0, topP: 1, seed: 1, maxNewTokens: newTokens, ignoreEos: true, stopTokenIds: [] };
const decoder = { push: () => '', flush: () => '' };
const greedy = { temperature: [0], topK: [0], topP: [1], uniform: [0] };
/** One greedy row: `tokens` of the sequence in `block`, from `position`. */
const step = (tokens: number[], block: number, position: number) =>
  ({ tokens, positions: tokens.map((_, i) => position + i), tokenSeq: tokens.map(() => 0), kvBlockTable: [[block]], logitRows: [tokens.length - 1], sample: greedy });

async function plain(): Promise<{ seconds: number; tokens: number[] }> {
  let last = (await targetRunner.step(step(prompt, 0, 0))).tokens![0]!;
  const tokens = [last];
  const started = performance.now();
  for (let i = 1; i < newTokens; i++) {
    last = (await targetRunner.step(step([last], 0, promptLength + i - 1))).tokens![0]!;
    tokens.push(last);
  }
  return { seconds: (performance.now() - started) / 1000, tokens };
}

/** Decode-step time of a runner alone (graph replay of batch 1), for the cost ratio c. */
async function stepSeconds(runner: StepRunner): Promise<number> {
  for (let i = 0; i < 3; i++) await runner.step(step([1], 1, i));
  const started = performance.now();
  for (let i = 0; i < 50; i++) await runner.step(step([1], 1, 3 + i));
  return (performance.now() - started) / 50 / 1000;
}

async function speculative(): Promise<{ seconds: number; tokens: number[]; executor: SpeculativeExecutor }> {
  const executor = new SpeculativeExecutor(k, kv, (b) => draftRunner.step(b), (b) => targetRunner.step(b));
  const seq = new SequenceState(prompt, params, [], decoder);
  const first = (await targetRunner.step(step(prompt, 0, 0))).tokens![0]!;
  seq.accept(first);
  const started = performance.now();
  while (seq.generated.length < newTokens) {
    const [produced] = await executor.round([{ seq, blocks: [0] }]);
    for (const token of produced!) {
      if (seq.generated.length >= newTokens) break;
      seq.accept(token);
    }
  }
  return { seconds: (performance.now() - started) / 1000, tokens: seq.generated, executor };
}

await plain(); // warm-up: graphs captured, cuBLAS ready
const base = await plain();
const spec0 = await speculative(); // warm-up of the draft's and the verify bucket's graphs
void spec0;
const fast = await speculative();
const same = fast.tokens.every((t, i) => t === base.tokens[i]);
const c = (await stepSeconds(draftRunner)) / (await stepSeconds(targetRunner));
const stats = fast.executor.stats;
const a = stats.proposed ? stats.accepted / stats.proposed : 0;
const measured = base.seconds / fast.seconds;
const predicted = predictedSpeedup(a, k, c);
const result = {
  bench: 'speculative',
  model: opts.model,
  draft: `first ${draftLayers} of ${spec.nLayers} layers (self-draft)`,
  tailScale,
  k,
  plainTokensPerS: (newTokens - 1) / base.seconds,
  speculativeTokensPerS: (newTokens - 1) / fast.seconds,
  acceptanceRate: a,
  tokensPerTargetStep: stats.emitted / stats.rounds,
  costRatio: c,
  measuredSpeedup: measured,
  predictedSpeedup: predicted,
  greedyIdentical: same,
};
console.log(
  `${opts.model}, self-draft ${draftLayers}/${spec.nLayers} layers, k=${k}: plain ${result.plainTokensPerS.toFixed(1)} tok/s, speculative ${result.speculativeTokensPerS.toFixed(1)} tok/s; ` +
    `acceptance ${(a * 100).toFixed(1)}%, ${result.tokensPerTargetStep.toFixed(2)} tokens/target step, c = ${c.toFixed(3)}; speedup ${measured.toFixed(2)}x measured, ${predicted.toFixed(2)}x predicted; greedy output ${same ? 'identical' : 'DIFFERENT'}`,
);
console.log(JSON.stringify(result));
