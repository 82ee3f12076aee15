/**
 * What a generation streams out, and the state of one sequence between steps: prefill the prompt, then one
 * token per decode step until EOS, a stop token or the token budget. The scheduler (scheduler.ts) puts many
 * sequences into one step; each keeps its own seeded random stream (one uniform per sampled token), so the same
 * seed gives the same tokens on any TP degree, backend and batch mix.
 */
import type { SamplingParams } from './sampling-params.ts';
import type { TokenLogprobs } from '../core/step-batch.ts';
import { SeededRng } from './rng.ts';

export type FinishReason = 'stop' | 'length';

/**
 * A token's log-prob and its most likely alternatives (highest first, ties to the lower id), as the log-softmax
 * of the model's raw logits: before temperature, top-k and top-p, so they rate the model, not the sampler.
 */
export interface TokenLogprob {
  readonly logprob: number;
  readonly top: readonly { readonly token: number; readonly logprob: number }[];
}

/** A step's TokenLogprobs (parallel arrays) as a TokenLogprob; alternatives past the vocabulary (id -1) dropped. */
export function tokenLogprobOf(wire: TokenLogprobs): TokenLogprob {
  const top = wire.topIds.flatMap((token, j) => (token >= 0 ? [{ token, logprob: wire.topLogprobs[j]! }] : []));
  return { logprob: wire.logprob, top };
}

export interface GeneratedToken {
  readonly type: 'token';
  readonly token: number;
  /** text that became final with this token (may be empty while a multi-byte character is incomplete) */
  readonly text: string;
  /** with SamplingParams.logprobs: this token's log-prob and alternatives */
  readonly logprobs?: TokenLogprob;
}

export interface GenerationDone {
  readonly type: 'done';
  readonly tokens: number[];
  readonly text: string;
  readonly finishReason: FinishReason;
  readonly promptTokens: number;
  /** seconds from the request to the first sampled token */
  readonly timeToFirstTokenS: number;
  /** decode tokens per second after the first token */
  readonly decodeTokensPerS: number;
  /** with SamplingParams.logprobs: one per token of `tokens` (the stop token's included) */
  readonly logprobs?: TokenLogprob[];
}

export type GenerationEvent = GeneratedToken | GenerationDone;

/** One sequence's progress: what to feed next, at which position of its KV cache, what came out. */
export class SequenceState {
  private readonly rng: SeededRng;
  private readonly stopIds: Set<number>;
  /** tokens to feed in the next step: the prompt first, then the last sampled token */
  input: readonly number[];
  /** tokens already in the KV cache (the position of input[0]) */
  position = 0;
  readonly generated: number[] = [];
  /** how often each token of `generated` came (the penalties' counts) */
  private readonly drawn = new Map<number, number>();
  /** [generated] with SamplingParams.logprobs, else empty */
  private readonly logprobs: TokenLogprob[] = [];
  private text = '';
  readonly startedAt = performance.now();
  firstTokenAt: number | null = null;

  constructor(
    readonly promptIds: readonly number[],
    readonly params: SamplingParams,
    eosTokenIds: readonly number[],
    private readonly decoder: { push(id: number): string; flush(): string },
  ) {
    this.rng = new SeededRng(params.seed);
    this.stopIds = new Set([...params.stopTokenIds, ...(params.ignoreEos ? [] : eosTokenIds)]);
    this.input = promptIds;
  }

  /** The next uniform of this request's random stream (one per sampled token). */
  nextUniform(): number {
    return this.rng.nextUniform();
  }

  /**
   * The logit bias of the next draw: the request's, plus its penalties on the tokens drawn so far, additive as OpenAI
   * defines them: -(count × frequencyPenalty + (count > 0) × presencePenalty). Undefined when there is none.
   */
  nextLogitBias(): readonly (readonly [number, number])[] | undefined {
    const { logitBias, presencePenalty = 0, frequencyPenalty = 0 } = this.params;
    if (!presencePenalty && !frequencyPenalty) return logitBias;
    const bias = new Map(logitBias);
    for (const [id, count] of this.drawn) bias.set(id, (bias.get(id) ?? 0) - count * frequencyPenalty - presencePenalty);
    return bias.size ? [...bias] : undefined;
  }

  /** Take a sampled token (and its log-probs, when asked for); returns the events it produces (a token, and `done` when the sequence ends). */
  accept(token: number, logprobs: TokenLogprobs | null = null): GenerationEvent[] {
    if (this.firstTokenAt === null) this.firstTokenAt = performance.now();
    this.position += this.input.length;
    this.input = [token];
    this.generated.push(token);
    this.drawn.set(token, (this.drawn.get(token) ?? 0) + 1);
    const logprob = this.params.logprobs !== undefined && logprobs ? tokenLogprobOf(logprobs) : null;
    if (logprob) this.logprobs.push(logprob);
    if (this.stopIds.has(token)) return [this.finish('stop')];
    const piece = this.decoder.push(token);
    this.text += piece;
    const events: GenerationEvent[] = [{ type: 'token', token, text: piece, ...(logprob && { logprobs: logprob }) }];
    if (this.generated.length >= this.params.maxNewTokens) events.push(this.finish('length'));
    return events;
  }

  private finish(finishReason: FinishReason): GenerationDone {
    this.text += this.decoder.flush();
    const firstTokenAt = this.firstTokenAt ?? performance.now();
    const decodeSeconds = (performance.now() - firstTokenAt) / 1000;
    const n = this.generated.length;
    return {
      type: 'done',
      tokens: [...this.generated],
      text: this.text,
      finishReason,
      promptTokens: this.promptIds.length,
      timeToFirstTokenS: (firstTokenAt - this.startedAt) / 1000,
      decodeTokensPerS: n > 1 && decodeSeconds > 0 ? (n - 1) / decodeSeconds : 0,
      ...(this.params.logprobs !== undefined && { logprobs: [...this.logprobs] }),
    };
  }
}
