/**
 * Log-probs in OpenAI's two answer shapes: completions' legacy one (`tokens`, `token_logprobs`, `top_logprobs` as
 * {token text: log-prob}, `text_offset`) and chat's (`content: [{token, logprob, bytes, top_logprobs: [...]}]`).
 * Each choice writes its tokens through one LogprobWriter, so a streamed answer's chunks continue the text
 * offsets where the previous chunk ended. The values are the log-softmax of the model's raw logits (before
 * temperature, top-k and top-p), as vLLM's default; a token's text is its id decoded alone (special tokens kept).
 */
import type { TokenLogprob } from '../generate.ts';

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
