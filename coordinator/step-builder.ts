/**
 * Builds StepBatches, the one way the coordinator makes them (the scheduler's steps, speculative draft and
 * verify steps): append each sequence's tokens with its KV blocks, ask for the logit rows wanted, build.
 * Positions are checked against the blocks here, before anything is sent.
 */
import { checkKvPosition, type StepBatch } from '../core/step-batch.ts';
import { WeftError } from '../core/errors.ts';
import { DENSE_TOKEN } from '../core/sparq.ts';
import type { AttentionRequest, SamplingParams } from './sampling-params.ts';

/** How one logit row is sampled: the sequence's sampling parameters and its next uniform. */
export interface RowSampling {
  readonly temperature: number;
  readonly topK: number;
  readonly topP: number;
  readonly uniform: number;
  /** [token id, bias] pairs added to the row's logits before the draw (OpenAI's logit_bias) */
  readonly logitBias?: readonly (readonly [number, number])[];
}

/** A row sampled with a sequence's parameters and the given uniform (and logit bias: the parameters' unless given). */
export function sampledWith(params: Pick<SamplingParams, 'temperature' | 'topK' | 'topP' | 'logitBias'>, uniform: number, logitBias = params.logitBias): RowSampling {
  return { temperature: params.temperature, topK: params.topK, topP: params.topP, uniform, ...(logitBias && { logitBias }) };
}

/** The target's argmax (temperature 0 samples greedily, the uniform is unused). */
export const GREEDY: RowSampling = { temperature: 0, topK: 0, topP: 1, uniform: 0 };

/** What one logit row asks for: a sampled token, the log-prob of one id, or both. */
export interface LogitRequest {
  readonly sample?: RowSampling;
  readonly scoreId?: number;
  /** the log-prob of the row's token and of this many alternatives (StepBatch.topLogprobs); absent or null: none */
  readonly topLogprobs?: number | null;
}

export class StepBatchBuilder {
  private readonly tokens: number[] = []; // [T]
  private readonly positions: number[] = []; // [T]
  private readonly tokenSeq: number[] = []; // [T]
  private readonly kvBlockTable: number[][] = []; // [S][blocks]
  private readonly logitRows: number[] = []; // [R]
  private readonly samples: RowSampling[] = []; // [R] or none
  private readonly scoreIds: number[] = []; // [R] or none
  private readonly feed: number[] = []; // [T]: -1, or the previous step's logit row the token is drawn at
  private readonly topLogprobs: number[] = []; // [R]: -1, or the alternatives a row's log-probs come with
  private readonly sparq = { r: [] as number[], k: [] as number[] }; // [T] each: a request's SparQ r and k, 0: the cluster's

  /** `kvBlockSize`: positions per KV block, as the cluster's layout has it */
  constructor(private readonly kvBlockSize: number) {}

  /** Tokens in the batch so far. */
  get size(): number {
    return this.tokens.length;
  }
  /** Logit rows asked for so far. */
  get logitRowCount(): number {
    return this.logitRows.length;
  }

  /**
   * Append one sequence's `tokens`, fed at positions `position`, `position + 1`...; `blocks` is the sequence's
   * block list. Returns the batch index of its first token. Refuses positions past the blocks.
   */
  append(blocks: readonly number[], tokens: readonly number[], position: number, attention?: AttentionRequest): number {
    const seq = this.kvBlockTable.length;
    const first = this.tokens.length;
    // positions run consecutively, so the last one is the one that can pass the blocks
    if (tokens.length > 0) checkKvPosition(first + tokens.length - 1, position + tokens.length - 1, seq, blocks.length, this.kvBlockSize);
    this.kvBlockTable.push([...blocks]);
    this.tokens.push(...tokens);
    this.positions.push(...tokens.map((_, i) => position + i));
    this.tokenSeq.push(...tokens.map(() => seq));
    this.feed.push(...tokens.map(() => -1));
    const setting = attention === undefined ? { r: 0, k: 0 } : attention.mode === 'dense' ? DENSE_TOKEN : attention;
    this.sparq.r.push(...tokens.map(() => setting.r));
    this.sparq.k.push(...tokens.map(() => setting.k));
    return first;
  }

  /**
   * Append one token of a sequence that is not known yet: the one the previous step draws at its logit row
   * `fromRow` (StepBatch.feed), fed at `position`; and sample the token that follows it.
   */
  appendFed(blocks: readonly number[], fromRow: number, position: number, sample: RowSampling, topLogprobs: number | null = null, attention?: AttentionRequest): void {
    const first = this.append(blocks, [0], position, attention);
    this.feed[first] = fromRow;
    this.logits(first, { sample, topLogprobs });
  }

  /** Append one sequence's tokens and sample the token that follows its last one (with its log-probs when `topLogprobs` is set). */
  appendSampled(blocks: readonly number[], tokens: readonly number[], position: number, sample: RowSampling, topLogprobs: number | null = null, attention?: AttentionRequest): void {
    const first = this.append(blocks, tokens, position, attention);
    this.logits(first + tokens.length - 1, { sample, topLogprobs });
  }

  /** Ask for the logits of batch row `row`; the answer comes in the order rows were asked for. */
  logits(row: number, request: LogitRequest): void {
    if (!Number.isInteger(row) || row < 0 || row >= this.tokens.length) throw new WeftError('WEFT_PROTOCOL', `logit row ${row} is outside the batch's ${this.tokens.length} tokens`);
    this.logitRows.push(row);
    if (request.sample) this.samples.push(request.sample);
    if (request.scoreId !== undefined) this.scoreIds.push(request.scoreId);
    this.topLogprobs.push(request.topLogprobs ?? -1);
  }

  /** The batch. Every logit row is sampled or none is, and likewise scored. */
  build(options: { readonly fullLogprobs?: boolean } = {}): StepBatch {
    const n = this.logitRows.length;
    if (this.tokens.length === 0 || n === 0) throw new WeftError('WEFT_PROTOCOL', `a step needs tokens and logit rows (got ${this.tokens.length} tokens, ${n} logit rows)`);
    for (const [what, count] of [['sampled', this.samples.length], ['scored', this.scoreIds.length]] as const)
      if (count !== 0 && count !== n) throw new WeftError('WEFT_PROTOCOL', `${count} of ${n} logit rows are ${what}: all or none must be`);
    const batch: StepBatch = { tokens: this.tokens, positions: this.positions, tokenSeq: this.tokenSeq, kvBlockTable: this.kvBlockTable, logitRows: this.logitRows };
    if (this.samples.length)
      batch.sample = {
        temperature: this.samples.map((s) => s.temperature),
        topK: this.samples.map((s) => s.topK),
        topP: this.samples.map((s) => s.topP),
        uniform: this.samples.map((s) => s.uniform),
      };
    const biased = this.samples.flatMap((s, row) => (s.logitBias ?? []).map(([id, value]) => ({ row, id, value })));
    if (biased.length) batch.logitBias = { rows: biased.map((b) => b.row), ids: biased.map((b) => b.id), values: biased.map((b) => b.value) };
    if (this.scoreIds.length) batch.scoreIds = this.scoreIds;
    if (options.fullLogprobs) batch.fullLogprobs = true;
    if (this.feed.some((from) => from >= 0)) batch.feed = this.feed;
    if (this.topLogprobs.some((k) => k >= 0)) batch.topLogprobs = this.topLogprobs;
    if (this.sparq.k.some((k) => k !== 0)) batch.sparq = this.sparq; // some request chose its attention
    return batch;
  }
}
