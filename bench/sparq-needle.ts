/**
 * Needle in a haystack for approximate attention, built from the default model's own text (it has no instruction
 * following to ask for a fact): the haystack is the held-out State of the Union stream; the needle is a span of
 * NEEDLE tokens from far later in the stream (so not in the haystack), inserted at a depth of the context; at the
 * end the needle's first KEY tokens are repeated, and the model must continue with the rest of the needle, which it
 * can only do by attending back to it (an induction / copy retrieval). Scored teacher-forced: the share of the
 * continuation tokens that are the model's top-1, and their mean NLL. A control row without the needle shows what
 * the model guesses without retrieving. What it measures: whether the attention still finds a handful of positions
 * deep in the context. Its limits: the default model's context is 1024, so this is 4-8x below the lengths SparQ is
 * for, the selection competes with ~1K positions, not 32K; copying is easier than answering a question about a fact.
 * Measured on the default model (CPU, dense, 512 tokens, needle 64, key 16): top-1 0.146 with the needle at depth
 * 0.1, 0.5 or 0.9 and 0.146 without it (NLL 5.26-5.30 against 5.37): the model does not copy, so this test cannot
 * tell SparQ from dense there; it is for a checkpoint that retrieves (on the GPU host).
 *
 *   node --import tsx bench/sparq-needle.ts --set attention=sparq sparqR=16 sparqK=64
 */
import { Command } from 'commander';
import { readFileSync } from 'node:fs';
import { startCluster, type Cluster, type ClusterOptions } from '../coordinator/cluster.ts';
import { loadTokenizer } from '../coordinator/tokenizer.ts';
import { DEFAULT_MODEL_DIR } from '../coordinator/config/options.ts';

const opts = new Command('bench-sparq-needle')
  .option('--model <dir>', 'model directory', DEFAULT_MODEL_DIR)
  .option('--device <d>', 'cpu or cuda', 'cpu')
  .option('--lengths <n...>', 'context lengths (tokens, up to the model context)', ['512', '1000'])
  .option('--depths <f...>', 'needle depths (fraction of the haystack before it)', ['0.1', '0.3', '0.5', '0.7', '0.9'])
  .option('--needles <n>', 'needles (different spans) per cell', '3')
  .option('--needle <n>', 'needle length in tokens', '64')
  .option('--key <n>', 'needle tokens repeated at the end before the scored continuation', '16')
  .option('--set <kv...>', 'ClusterOptions, KEY=VALUE', [])
  .parse()
  .opts<{ model: string; device: 'cpu' | 'cuda'; lengths: string[]; depths: string[]; needles: string; needle: string; key: string; set: string[] }>();
const NEEDLE = Number(opts.needle);
const KEY = Number(opts.key);

const set = Object.fromEntries(opts.set.map((pair) => {
  const [key, value = ''] = pair.split('=', 2) as [string, string?];
  return [key, Number.isFinite(Number(value)) && value !== '' ? Number(value) : value];
}));

function stream(): number[] {
  const tokenizer = loadTokenizer(opts.model);
  const out: number[] = [];
  for (const line of readFileSync(new URL('../models/recipe/heldout.jsonl', import.meta.url), 'utf8').split('\n').filter(Boolean))
    out.push(...tokenizer.encode((JSON.parse(line) as { text: string }).text, { addBos: out.length === 0 }));
  return out;
}

/** Top-1 share and mean NLL of the needle's continuation, given the context. */
async function retrieve(cluster: Cluster, context: number[], needle: number[]): Promise<{ top1: number; nll: number }> {
  const ids = [...context, ...needle];
  const { full } = await cluster.score(ids, { full: true });
  let top1 = 0;
  let nll = 0;
  for (let i = context.length + KEY; i < ids.length; i++) {
    const row = full![i - 1]!; // predicts ids[i]
    let arg = 0;
    for (let v = 1; v < row.length; v++) if (row[v]! > row[arg]!) arg = v;
    top1 += arg === ids[i] ? 1 : 0;
    nll -= row[ids[i]!]!;
  }
  const n = NEEDLE - KEY;
  return { top1: top1 / n, nll: nll / n };
}

const text = stream();
const cluster = await startCluster({ modelDir: opts.model, device: opts.device, ...set } as ClusterOptions);
try {
  console.log(`set ${JSON.stringify(set)}; needle ${NEEDLE} tokens, key ${KEY}; top-1 share / mean NLL of the ${NEEDLE - KEY} continuation tokens`);
  console.log(`${'length'.padStart(6)} ${'depth'.padStart(6)} ${'top1'.padStart(6)} ${'nll'.padStart(6)}`);
  for (const length of opts.lengths.map(Number)) {
    const haystackLength = length - NEEDLE - NEEDLE; // the needle inside, then the key and the continuation at the end
    const rows: { depth: string; top1: number; nll: number }[] = [];
    for (const depth of ['none', ...opts.depths]) {
      let top1 = 0;
      let nll = 0;
      for (let j = 0; j < Number(opts.needles); j++) {
        const needle = text.slice(text.length - (j + 1) * 997 - NEEDLE, text.length - (j + 1) * 997);
        const haystack = text.slice(j * 131, j * 131 + haystackLength + (depth === 'none' ? NEEDLE : 0));
        const at = depth === 'none' ? 0 : Math.round(Number(depth) * haystackLength);
        const context = depth === 'none' ? haystack : [...haystack.slice(0, at), ...needle, ...haystack.slice(at)];
        const r = await retrieve(cluster, context, needle);
        top1 += r.top1;
        nll += r.nll;
      }
      rows.push({ depth, top1: top1 / Number(opts.needles), nll: nll / Number(opts.needles) });
    }
    for (const r of rows) console.log(`${String(length).padStart(6)} ${r.depth.padStart(6)} ${r.top1.toFixed(3).padStart(6)} ${r.nll.toFixed(3).padStart(6)}`);
  }
} finally {
  await cluster.close();
}
