/**
 * What weight-only quantization costs in quality, against the same checkpoint unquantized, one call:
 *   node --import tsx bench/quant-quality.ts --model DIR --text FILE [--device cuda] [--tp N] [--formats int8,int4]
 *     [--group-size 128] [--window 512] [--greedy-tokens 256]
 * Per format: perplexity of the held-out text (windows of --window tokens, every token after the first of a window
 * scored), its ratio to the dense model's, mean next-token KL(dense || quantized) over the same positions, and
 * greedy agreement (tokens equal to the dense model's, position by position, until the first difference and in
 * all) over --greedy-tokens tokens from the first few windows' openings. Quantizes at load (--quantize).
 * Ends with one JSON line.
 */
import { readFileSync } from 'node:fs';
import { Command } from 'commander';
import { startCluster, type Cluster } from '../coordinator/cluster.ts';
import { loadTokenizer } from '../coordinator/tokenizer.ts';

const program = new Command('quant-quality')
  .requiredOption('--model <dir>', 'dense checkpoint')
  .requiredOption('--text <file>', 'held-out text')
  .option('--device <d>', 'cpu or cuda', 'cuda')
  .option('--tp <n>', 'tensor-parallel degree', '1')
  .option('--formats <list>', 'int8, int4 or both', 'int8,int4')
  .option('--group-size <n>', 'int4 columns per scale (int8 is per output channel)', '128')
  .option('--window <n>', 'tokens per scored window', '512')
  .option('--max-windows <n>', 'windows scored at most', '16')
  .option('--greedy-tokens <n>', 'greedy tokens compared per prompt', '256')
  .option('--prompts <n>', 'greedy prompts (the first 32 tokens of the first windows)', '4')
  .parse();
const opts = program.opts<{ model: string; text: string; device: 'cpu' | 'cuda'; tp: string; formats: string; groupSize: string; window: string; maxWindows: string; greedyTokens: string; prompts: string }>();

const tokenizer = loadTokenizer(opts.model);
const ids = tokenizer.encode(readFileSync(opts.text, 'utf8'));
const window = Number(opts.window);
const windows: number[][] = [];
for (let i = 0; i + window <= ids.length && windows.length < Number(opts.maxWindows); i += window) windows.push(ids.slice(i, i + window));
if (windows.length === 0) program.error(`--text has ${ids.length} tokens, fewer than one window of ${window}`);
const prompts = windows.slice(0, Number(opts.prompts)).map((w) => w.slice(0, 32));

interface Measured {
  full: Float32Array[][]; // per window, per position: log-softmax row
  nll: number; // mean negative log-likelihood of the scored tokens
  greedy: number[][];
}

async function measure(quantize: 'int8' | 'int4' | undefined): Promise<Measured> {
  const cluster: Cluster = await startCluster({
    modelDir: opts.model, device: opts.device, tp: Number(opts.tp), maxContext: Math.max(window, 32 + Number(opts.greedyTokens)) + 8,
    ...(quantize ? { quantize, groupSize: quantize === 'int4' ? opts.groupSize : 'channel' } : {}),
  });
  try {
    const full: Float32Array[][] = [];
    let nll = 0;
    let count = 0;
    for (const w of windows) {
      const scored = await cluster.score(w, { full: true });
      full.push(scored.full!);
      for (const lp of scored.logprobs) if (lp !== null) (nll -= lp), count++;
    }
    const greedy: number[][] = [];
    for (const prompt of prompts) {
      for await (const event of cluster.generate({ promptIds: prompt, sampling: { maxNewTokens: Number(opts.greedyTokens), ignoreEos: true } }))
        if (event.type === 'done') greedy.push(event.tokens);
    }
    return { full, nll: nll / count, greedy };
  } finally {
    await cluster.close();
  }
}

/** Mean over positions of KL(p || q) = sum p (log p - log q), rows of log-probabilities. */
function meanKl(p: Float32Array[][], q: Float32Array[][]): number {
  let sum = 0;
  let n = 0;
  p.forEach((rows, w) => rows.forEach((row, r) => {
    if (r === rows.length - 1) return; // the last row predicts past the window: not scored for perplexity either
    const other = q[w]![r]!;
    let kl = 0;
    for (let i = 0; i < row.length; i++) if (row[i]! > -Infinity) kl += Math.exp(row[i]!) * (row[i]! - other[i]!);
    sum += kl;
    n++;
  }));
  return sum / n;
}

const dense = await measure(undefined);
const rows: Record<string, unknown>[] = [{ weights: 'dense', perplexity: Math.exp(dense.nll) }];
console.log(`dense: perplexity ${Math.exp(dense.nll).toFixed(4)} over ${windows.length} windows of ${window} tokens`);
for (const format of opts.formats.split(',').filter(Boolean) as ('int8' | 'int4')[]) {
  const q = await measure(format);
  const kl = meanKl(dense.full, q.full);
  const agreeAll = q.greedy.flat().filter((t, i) => t === dense.greedy.flat()[i]).length;
  const untilFirst = q.greedy.map((g, p) => { const d = dense.greedy[p]!; let i = 0; while (i < g.length && g[i] === d[i]) i++; return i; });
  const label = format === 'int4' ? `int4-g${opts.groupSize}` : 'int8';
  const row = { weights: label, perplexity: Math.exp(q.nll), perplexityRatio: Math.exp(q.nll - dense.nll), meanKl: kl, greedyAgreement: agreeAll / q.greedy.flat().length, greedyUntilFirstDifference: untilFirst };
  rows.push(row);
  console.log(`${label}: perplexity ${row.perplexity.toFixed(4)} (${((row.perplexityRatio - 1) * 100).toFixed(2)}% vs dense), mean KL ${kl.toExponential(3)}, greedy agreement ${(row.greedyAgreement * 100).toFixed(1)}% (equal until ${untilFirst.join(', ')})`);
}
console.log(JSON.stringify({ bench: 'quant-quality', model: opts.model, device: opts.device, tp: Number(opts.tp), window, windows: windows.length, rows }));
