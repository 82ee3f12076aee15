/**
 * The quality yardstick of approximate techniques (quantized weights or KV, sparse attention): held-out
 * perplexity of a model on the State of the Union addresses after 2010 (models/recipe/heldout.jsonl, never
 * trained on), and, against a baseline run of the same model, the mean next-token KL divergence and how often
 * the two agree on the most likely next token.
 *
 *   node --import tsx bench/quality.ts                                     # the default model, CPU
 *   node --import tsx bench/quality.ts --device cuda --set kvDtype=bf16 --baseline kvDtype=f32
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
  .option('--json', 'one JSON line')
  .parse()
  .opts<{ model: string; device: 'cpu' | 'cuda'; tp: string; windows: string; klWindows: string; set: string[]; baseline: string[]; json?: boolean }>();

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

const all = heldOutWindows(opts.model);
const windows = Number(opts.windows) > 0 ? all.slice(0, Number(opts.windows)) : all;
const klWindows = all.slice(0, Number(opts.klWindows));
const set = fields(opts.set);
const measuredCluster = await open(set);
let result: Record<string, unknown>;
try {
  const measured = await perplexity(measuredCluster, windows);
  result = { model: opts.model, device: opts.device, tp: Number(opts.tp), set, windows: windows.length, ...measured };
  if (klWindows.length > 0 && opts.baseline.length + opts.set.length > 0) {
    const measuredRows = await distributions(measuredCluster, klWindows);
    await measuredCluster.close();
    const baseline = fields(opts.baseline);
    const baseCluster = await open(baseline);
    try {
      const baseRows = await distributions(baseCluster, klWindows);
      result = { ...result, baseline, baselinePerplexity: (await perplexity(baseCluster, windows)).perplexity, ...compare(baseRows, measuredRows) };
    } finally {
      await baseCluster.close();
    }
  }
} finally {
  await measuredCluster.close();
}
if (opts.json) console.log(JSON.stringify(result));
else for (const [key, value] of Object.entries(result)) console.log(`${key.padEnd(20)} ${typeof value === 'object' ? JSON.stringify(value) : value}`);
