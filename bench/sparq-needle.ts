/**
 * Needle in a haystack for approximate attention (the case: bench/needle.ts): the share of the needle's
 * continuation tokens that are the model's top-1, and their mean NLL, teacher-forced, at each length and depth, with
 * a control row without the needle. The default model does not copy (top-1 0.146 with the needle and
 * without it at 512 tokens), so run it on the model built to retrieve, bench/induction-model.ts (context 32K):
 *
 *   node --import tsx bench/induction-model.ts --out /tmp/induction
 *   node --import tsx bench/sparq-needle.ts --model /tmp/induction --lengths 2048 4096 --set attention=sparq sparqR=16 sparqK=256
 */
import { Command } from 'commander';
import { startCluster, type ClusterOptions } from '../coordinator/cluster.ts';
import { heldOutStream, needleCase, retrieve } from './needle.ts';
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

const text = heldOutStream(opts.model);
const cluster = await startCluster({ modelDir: opts.model, device: opts.device, ...set } as ClusterOptions);
try {
  console.log(`set ${JSON.stringify(set)}; needle ${NEEDLE} tokens, key ${KEY}; top-1 share / mean NLL of the ${NEEDLE - KEY} continuation tokens`);
  console.log(`${'length'.padStart(6)} ${'depth'.padStart(6)} ${'top1'.padStart(6)} ${'nll'.padStart(6)}`);
  for (const length of opts.lengths.map(Number)) {
    const rows: { depth: string; top1: number; nll: number }[] = [];
    for (const depth of ['none', ...opts.depths]) {
      let top1 = 0;
      let nll = 0;
      for (let j = 0; j < Number(opts.needles); j++) {
        const { context, needle } = needleCase(text, length, depth === 'none' ? null : Number(depth), j, NEEDLE);
        const r = await retrieve(cluster, context, needle, KEY);
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
