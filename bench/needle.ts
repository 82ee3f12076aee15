/**
 * The needle-in-a-haystack case shared by bench/sparq-needle.ts and the retrieval test: a haystack of the default
 * model's held-out text, a needle (a span from far later in the same text, so not in the haystack) inserted at a
 * depth, then the needle's first `key` tokens repeated at the end; the model must continue with the rest of the
 * needle, which it can only do by attending back to it. Scored teacher-forced through `score` with one alternative
 * a token (no full rows, so any length the context allows).
 */
import { readFileSync } from 'node:fs';
import type { Cluster } from '../coordinator/cluster.ts';
import { loadTokenizer } from '../coordinator/tokenizer.ts';
import { HELD_OUT } from './perplexity.ts';

/** The held-out text as one token stream (BOS first). */
export function heldOutStream(modelDir: string): number[] {
  const tokenizer = loadTokenizer(modelDir);
  const out: number[] = [];
  for (const line of readFileSync(HELD_OUT, 'utf8').split('\n').filter(Boolean))
    out.push(...tokenizer.encode((JSON.parse(line) as { text: string }).text, { addBos: out.length === 0 }));
  return out;
}

/**
 * Case j of a `length`-token context from `text`: the needle of `needleTokens` at `depth` (a fraction of the
 * haystack before it), or none (a control: the haystack runs on where the needle would be).
 */
export function needleCase(text: readonly number[], length: number, depth: number | null, j: number, needleTokens: number): { context: number[]; needle: number[] } {
  const haystackLength = length - 2 * needleTokens; // the needle inside, then the key and the continuation at the end
  const needle = text.slice(text.length - (j + 1) * 997 - needleTokens, text.length - (j + 1) * 997);
  const haystack = text.slice(j * 131, j * 131 + haystackLength + (depth === null ? needleTokens : 0));
  if (depth === null) return { context: haystack, needle };
  const at = Math.round(depth * haystackLength);
  return { context: [...haystack.slice(0, at), ...needle, ...haystack.slice(at)], needle };
}

/** Top-1 share and mean NLL of the needle's tokens after its first `key`, given the context. */
export async function retrieve(cluster: Cluster, context: readonly number[], needle: readonly number[], key: number, attention?: unknown): Promise<{ top1: number; nll: number }> {
  const ids = [...context, ...needle];
  const { logprobs, top } = await cluster.score(ids, { topLogprobs: 1, ...(attention !== undefined && { attention }) });
  let top1 = 0;
  let nll = 0;
  for (let i = context.length + key; i < ids.length; i++) {
    top1 += top![i]!.top[0]?.token === ids[i] ? 1 : 0;
    nll -= logprobs[i]!;
  }
  const n = needle.length - key;
  return { top1: top1 / n, nll: nll / n };
}
