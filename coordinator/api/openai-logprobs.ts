/**
 * Log-probs in OpenAI's two answer shapes: completions' legacy one (`tokens`, `token_logprobs`, `top_logprobs` as
 * {token text: log-prob}, `text_offset`) and chat's (`content: [{token, logprob, bytes, top_logprobs: [...]}]`).
 * Each choice writes its tokens through one LogprobWriter, so a streamed answer's chunks continue the text
 * offsets where the previous chunk ended. The values are the log-softmax of the model's raw logits (before
 * temperature, top-k and top-p), as vLLM's default; a token's text is its id decoded alone (special tokens kept).
 * Also here: what `echo` puts first (echoesOf) and which samples `best_of` answers (answered).
 */
import type { TokenLogprob } from '../generate.ts';
import type { Cluster } from '../cluster.ts';
import type { Choice } from './openai-request.ts';

/** One token of an answer with its log-probs; null for the prompt's first token (nothing predicts it). */
export interface LoggedToken {
  readonly token: number;
  readonly logprob: TokenLogprob | null;
}

/** The text of one token id. */
export type TokenText = (id: number) => string;

const bytesOf = (text: string): number[] => [...Buffer.from(text, 'utf8')];

export class LogprobWriter {
  /** where the next token's text starts: text_offset runs on from one write to the next (an echo, then the answer) */
  private offset = 0;

  constructor(
    private readonly chat: boolean,
    private readonly text: TokenText,
  ) {}

  /** The `logprobs` object of an answer (or a streamed chunk) holding `tokens`. */
  write(tokens: readonly LoggedToken[]): Record<string, unknown> {
    return this.chat ? { content: tokens.map((t) => this.chatEntry(t)) } : this.legacy(tokens);
  }

  private chatEntry({ token, logprob }: LoggedToken): Record<string, unknown> {
    const text = this.text(token);
    return {
      token: text,
      logprob: logprob?.logprob ?? null,
      bytes: bytesOf(text),
      top_logprobs: (logprob?.top ?? []).map((alt) => ({ token: this.text(alt.token), logprob: alt.logprob, bytes: bytesOf(this.text(alt.token)) })),
    };
  }

  private legacy(tokens: readonly LoggedToken[]): Record<string, unknown> {
    const texts = tokens.map((t) => this.text(t.token));
    const textOffset = texts.map((text) => {
      const at = this.offset;
      this.offset += text.length;
      return at;
    });
    return {
      tokens: texts,
      token_logprobs: tokens.map((t) => t.logprob?.logprob ?? null),
      // alternatives whose ids decode to one text keep the likelier's log-prob (it comes first)
      top_logprobs: tokens.map((t) => (t.logprob ? Object.fromEntries(t.logprob.top.map((alt) => [this.text(alt.token), alt.logprob]).reverse()) : null)),
      text_offset: textOffset,
    };
  }
}

/** Sum of the tokens' log-probs: how best_of ranks its samples. */
export const cumulativeLogprob = (tokens: readonly LoggedToken[]): number => tokens.reduce((sum, t) => sum + (t.logprob?.logprob ?? 0), 0);

/** What echo puts before a prompt's choices: its text, and its tokens with their log-probs when asked. */
export interface Echo {
  readonly text: string;
  readonly tokens: LoggedToken[] | null;
}

/** The echo of each prompt (keyed by the request its choices share), its tokens scored when log-probs are asked. */
export async function echoesOf(cluster: Cluster, choices: readonly Choice[], top: number | null): Promise<Map<Choice['request'], Echo>> {
  const echoes = new Map<Choice['request'], Echo>();
  for (const { request } of choices) {
    if (echoes.has(request)) continue;
    const text = 'prompt' in request ? request.prompt : await cluster.detokenize(request.promptIds);
    if (top === null) {
      echoes.set(request, { text, tokens: null });
      continue;
    }
    const ids = 'prompt' in request ? await cluster.tokenize(request.prompt) : request.promptIds;
    const scored = await cluster.score(ids, { topLogprobs: top });
    echoes.set(request, { text, tokens: ids.map((token, i) => ({ token, logprob: scored.top?.[i] ?? null })) });
  }
  return echoes;
}

/**
 * The choices answered: all of them, or with best_of (more samples per prompt than n) each prompt's n samples of
 * the highest cumulative log-prob, best first, numbered prompt * n + rank as OpenAI numbers them.
 */
export function answered<R extends { readonly tokens: readonly LoggedToken[] }>(choices: readonly Choice[], results: readonly R[], perPrompt: number, n: number): { choice: Choice; result: R; index: number }[] {
  const all = choices.map((choice, i) => ({ choice, result: results[i]!, index: choice.index }));
  if (perPrompt === n) return all;
  const out: { choice: Choice; result: R; index: number }[] = [];
  for (let p = 0; p < all.length / perPrompt; p++) {
    const ranked = all.slice(p * perPrompt, (p + 1) * perPrompt).sort((a, b) => cumulativeLogprob(b.result.tokens) - cumulativeLogprob(a.result.tokens) || a.index - b.index);
    ranked.slice(0, n).forEach((entry, rank) => out.push({ ...entry, index: p * n + rank }));
  }
  return out;
}

/** Two legacy (completions) logprobs objects as one: the echoed prompt's, then the answer's. */
export function mergeLogprobs(first: Record<string, unknown>, second: Record<string, unknown>): Record<string, unknown> {
  return Object.fromEntries(Object.keys(first).map((key) => [key, [...(first[key] as unknown[]), ...(second[key] as unknown[])]]));
}
