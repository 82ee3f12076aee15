/**
 * What a generation streams out, and the state of one sequence between steps: prefill the prompt, then one
 * token per decode step until EOS, a stop token or the token budget. The scheduler (scheduler.ts) puts many
 * sequences into one step; each keeps its own seeded random stream (one uniform per sampled token), so the same
 * seed gives the same tokens on any TP degree, backend and batch mix.
 */
import type { SamplingParams } from './sampling-params.ts';
import { SeededRng } from './rng.ts';

export type FinishReason = 'stop' | 'length';

export interface GeneratedToken {
  readonly type: 'token';
  readonly token: number;
  /** text that became final with this token (may be empty while a multi-byte character is incomplete) */
  readonly text: string;
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

  /** Take a sampled token; returns the events it produces (a token, and `done` when the sequence ends). */
  accept(token: number): GenerationEvent[] {
    if (this.firstTokenAt === null) this.firstTokenAt = performance.now();
    this.position += this.input.length;
    this.input = [token];
    this.generated.push(token);
    if (this.stopIds.has(token)) return [this.finish('stop')];
    const piece = this.decoder.push(token);
    this.text += piece;
    const events: GenerationEvent[] = [{ type: 'token', token, text: piece }];
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
    };
  }
}
