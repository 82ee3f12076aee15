/**
 * The quality yardstick of approximate techniques (quantized weights or KV, sparse attention): held-out
 * perplexity of a model on the State of the Union addresses after 2010 (models/recipe/heldout.jsonl, never
 * trained on), and, against a baseline run of the same model, the mean next-token KL divergence and how often
 * the two agree on the most likely next token, and how many greedy tokens they share from the same prompts.
 *
 *   node --import tsx bench/quality.ts                                     # the default model, CPU
 *   node --import tsx bench/quality.ts --device cuda --set kvDtype=bf16 --baseline kvDtype=f32
 *   node --import tsx bench/quality.ts --device cuda --set quantize=int4   # int4 g128 against bf16 weights
 *
 * The perplexity protocol is models/recipe/train.py's: the addresses in order, each as BOS + text + EOS, one
 * stream cut into windows of 513 tokens that overlap by one; every token but a window's first is predicted from
 * the tokens before it in its window. `--set` and `--baseline` take ClusterOptions fields (KEY=VALUE, numbers
 * and booleans parsed); the KL compares the full next-token distributions on the first `--kl-windows` windows.
 */
import { Command } from 'commander';
import { startCluster, type Cluster, type ClusterOptions } from '../coordinator/cluster.ts';
import { WINDOW, heldOutWindows, meanNll } from './perplexity.ts';
import { DEFAULT_MODEL_DIR } from '../coordinator/config/options.ts';

const opts = new Command('bench-quality')
  .option('--model <dir>', 'model directory', DEFAULT_MODEL_DIR)
  .option('--device <d>', 'cpu or cuda', 'cpu')
  .option('--tp <n>', 'tensor-parallel degree', '1')
  .option('--windows <n>', 'windows scored for perplexity (0: all)', '0')
  .option('--kl-windows <n>', 'windows compared with the baseline, full distributions (0: no baseline run)', '4')
  .option('--set <kv...>', 'ClusterOptions of the measured run, KEY=VALUE', [])
  .option('--baseline <kv...>', 'ClusterOptions of the baseline run, KEY=VALUE', [])
  .option('--greedy-tokens <n>', 'greedy tokens compared with the baseline per prompt', '256')
  .option('--greedy-prompts <n>', 'greedy prompts: the first 32 tokens of the first windows', '4')
  .option('--json', 'one JSON line')
  .parse()
  .opts<{ model: string; device: 'cpu' | 'cuda'; tp: string; windows: string; klWindows: string; set: string[]; baseline: string[]; greedyTokens: string; greedyPrompts: string; json?: boolean }>();

function fields(pairs: readonly string[]): Record<string, unknown> {
  return Object.fromEntries(
    pairs.map((pair) => {
      const [key, value = ''] = pair.split('=', 2) as [string, string?];
      const parsed = value === 'true' ? true : value === 'false' ? false : value !== '' && Number.isFinite(Number(value)) ? Number(value) : value;
      return [key, parsed];
    }),
  );
}

async function open(extra: Record<string, unknown>): Promise<Cluster> {
  const options = { modelDir: opts.model, device: opts.device, tp: Number(opts.tp), maxContext: WINDOW + 1, ...extra } as ClusterOptions;
  return startCluster(options);
}

async function perplexity(cluster: Cluster, windows: readonly number[][]): Promise<{ meanNll: number; perplexity: number; tokens: number; seconds: number }> {
  const started = performance.now();
  const { meanNll: nll, tokens } = await meanNll(cluster, windows);
  return { meanNll: nll, perplexity: Math.exp(nll), tokens, seconds: (performance.now() - started) / 1000 };
}

/** Every position's next-token log-probs for each window (the last position predicts past the window: dropped). */
async function distributions(cluster: Cluster, windows: readonly number[][]): Promise<Float32Array[][]> {
  const out: Float32Array[][] = [];
  for (const window of windows) out.push((await cluster.score(window.slice(0, -1), { full: true })).full!.map((row) => Float32Array.from(row)));
  return out;
}

function compare(base: Float32Array[][], measured: Float32Array[][]): { meanKl: number; top1Agreement: number; positions: number } {
  let kl = 0;
  let agree = 0;
  let positions = 0;
  base.forEach((rows, w) =>
    rows.forEach((p, r) => {
      const q = measured[w]![r]!;
      let sum = 0;
      let argP = 0;
      let argQ = 0;
      for (let i = 0; i < p.length; i++) {
        sum += Math.exp(p[i]!) * (p[i]! - q[i]!);
        if (p[i]! > p[argP]!) argP = i;
        if (q[i]! > q[argQ]!) argQ = i;
      }
      kl += sum;
      agree += argP === argQ ? 1 : 0;
      positions++;
    }),
  );
  return { meanKl: kl / positions, top1Agreement: agree / positions, positions };
}

/** Greedy continuations of each prompt, for agreement with the baseline's. */
async function greedyRuns(cluster: Cluster, prompts: readonly number[][]): Promise<number[][]> {
  const out: number[][] = [];
  for (const prompt of prompts)
    for await (const event of cluster.generate({ promptIds: prompt, sampling: { maxNewTokens: Number(opts.greedyTokens), ignoreEos: true } }))
      if (event.type === 'done') out.push(event.tokens);
  return out;
}

/** Tokens equal position by position, in all and before each prompt's first difference. */
function greedyAgreement(base: number[][], measured: number[][]): { greedyAgreement: number; greedyUntilFirstDifference: number[] } {
  const equal = measured.flat().filter((t, i) => t === base.flat()[i]).length;
  const untilFirst = measured.map((tokens, p) => {
    let i = 0;
    while (i < tokens.length && tokens[i] === base[p]![i]) i++;
    return i;
  });
  return { greedyAgreement: equal / Math.max(1, measured.flat().length), greedyUntilFirstDifference: untilFirst };
}

async function measure(options: Record<string, unknown>, windows: readonly number[][], klWindows: readonly number[][], prompts: readonly number[][]) {
  const cluster = await open(options);
  try {
    return { ...(await perplexity(cluster, windows)), rows: await distributions(cluster, klWindows), greedy: await greedyRuns(cluster, prompts) };
  } finally {
    await cluster.close();
  }
}

const all = heldOutWindows(opts.model);
const windows = Number(opts.windows) > 0 ? all.slice(0, Number(opts.windows)) : all;
const compared = opts.baseline.length + opts.set.length > 0;
const klWindows = compared ? all.slice(0, Number(opts.klWindows)) : [];
const prompts = compared ? all.slice(0, Number(opts.greedyPrompts)).map((w) => w.slice(0, 32)) : [];
const set = fields(opts.set);
const { rows, greedy, ...measured } = await measure(set, windows, klWindows, prompts);
let result: Record<string, unknown> = { model: opts.model, device: opts.device, tp: Number(opts.tp), set, windows: windows.length, ...measured };
if (compared) {
  const baseline = fields(opts.baseline);
  const base = await measure(baseline, windows, klWindows, prompts);
  result = { ...result, baseline, baselinePerplexity: base.perplexity, ...compare(base.rows, rows), ...greedyAgreement(base.greedy, greedy) };
}
if (opts.json) console.log(JSON.stringify(result));
else for (const [key, value] of Object.entries(result)) console.log(`${key.padEnd(20)} ${typeof value === 'object' ? JSON.stringify(value) : value}`);
