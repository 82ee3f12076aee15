/**
 * The generation loop for one sequence: prefill the prompt, then decode one token per step until EOS, a stop
 * token or the token budget. Tokens stream out as they are sampled. The random numbers come from the
 * request's seed, one uniform per sampled token, so the same seed gives the same tokens on any TP degree
 * and backend.
 */
import type { StepBatch, StepResult } from '../worker/protocol.ts';
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

export interface SequenceContext {
  readonly slot: number;
  readonly promptIds: readonly number[];
  readonly params: SamplingParams;
  readonly eosTokenIds: readonly number[];
  readonly step: (batch: StepBatch) => Promise<StepResult>;
  readonly decoder: { push(id: number): string; flush(): string };
}

export async function* generateSequence(ctx: SequenceContext): AsyncGenerator<GenerationEvent> {
  const { params, slot } = ctx;
  const rng = new SeededRng(params.seed);
  const stopIds = new Set([...params.stopTokenIds, ...(params.ignoreEos ? [] : ctx.eosTokenIds)]);
  const sampleOne = (tokens: readonly number[], startPosition: number): Promise<StepResult> =>
    ctx.step({
      tokens: [...tokens],
      slots: tokens.map(() => slot),
      positions: tokens.map((_, i) => startPosition + i),
      logitRows: [tokens.length - 1],
      sample: { temperature: [params.temperature], topK: [params.topK], topP: [params.topP], uniform: [rng.nextUniform()] },
    });

  const started = performance.now();
  let firstTokenAt = started;
  const generated: number[] = [];
  let text = '';
  let input: readonly number[] = ctx.promptIds;
  let position = 0;
  let finishReason: FinishReason = 'length';
  while (generated.length < params.maxNewTokens) {
    const result = await sampleOne(input, position);
    const token = result.tokens?.[0];
    if (token === undefined) throw new Error('step returned no token');
    if (generated.length === 0) firstTokenAt = performance.now();
    position += input.length;
    input = [token];
    generated.push(token);
    if (stopIds.has(token)) {
      finishReason = 'stop';
      break;
    }
    const piece = ctx.decoder.push(token);
    text += piece;
    yield { type: 'token', token, text: piece };
  }
  text += ctx.decoder.flush();
  const decodeSeconds = (performance.now() - firstTokenAt) / 1000;
  yield {
    type: 'done',
    tokens: generated,
    text,
    finishReason,
    promptTokens: ctx.promptIds.length,
    timeToFirstTokenS: (firstTokenAt - started) / 1000,
    decodeTokensPerS: generated.length > 1 && decodeSeconds > 0 ? (generated.length - 1) / decodeSeconds : 0,
  };
}
