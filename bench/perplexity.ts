/**
 * The held-out perplexity protocol of the default model (models/README.md), shared by bench/quality.ts and the
 * oracle test: the State of the Union addresses after 2010 in order, each as BOS + text + EOS, one stream cut
 * into windows of WINDOW + 1 tokens that overlap by one; every token but a window's first is predicted from the
 * tokens before it in its window.
 */
import { readFileSync } from 'node:fs';
import type { Cluster } from '../coordinator/cluster.ts';
import { loadTokenizer } from '../coordinator/tokenizer.ts';

export const WINDOW = 512;
/** The default model's held-out text, one JSON object ({text}) a line. */
export const HELD_OUT = new URL('../models/recipe/heldout.jsonl', import.meta.url);

/** The held-out stream's windows, tokenized by the model's own tokenizer. */
export function heldOutWindows(modelDir: string): number[][] {
  const tokenizer = loadTokenizer(modelDir);
  const eos = tokenizer.eosTokenIds[0]!;
  const stream: number[] = [];
  for (const line of readFileSync(HELD_OUT, 'utf8').split('\n').filter(Boolean))
    stream.push(...tokenizer.encode((JSON.parse(line) as { text: string }).text, { addBos: true }), eos);
  const windows: number[][] = [];
  for (let start = 0; start < stream.length - 1; start += WINDOW) windows.push(stream.slice(start, start + WINDOW + 1));
  return windows;
}

/** Mean negative log-likelihood over every window's predicted tokens, and how many there were. */
export async function meanNll(cluster: Cluster, windows: readonly (readonly number[])[]): Promise<{ meanNll: number; tokens: number }> {
  let nll = 0;
  let tokens = 0;
  for (const window of windows) {
    const { logprobs } = await cluster.score([...window]);
    for (const lp of logprobs.slice(1)) nll -= lp!;
    tokens += window.length - 1;
  }
  return { meanNll: nll / tokens, tokens };
}
