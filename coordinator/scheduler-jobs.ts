/**
 * What the scheduler holds: a request as a job (a generation, or a scoring pass), the work one step carries, and
 * the hooks it reports to. Plain types, shared by the scheduler (scheduler.ts) and its policies (job-queue.ts,
 * preemption.ts, step-composer.ts, score-step.ts).
 */
import type { StepBatch } from '../core/worker-protocol.ts';
import type { KvSequenceId } from '../core/kv-block-table.ts';
import type { GenerationEvent, SequenceState, TokenLogprob } from './generate.ts';
import type { SpeculativeExecutor } from './speculative.ts';
import type { Channel } from './channel.ts';
import type { AttentionRequest } from './sampling-params.ts';

export interface ScoreOutput {
  logprobs: (number | null)[];
  full?: Float32Array[];
  /** with `topLogprobs`: per token (entry 0 null), its log-prob and that many most likely alternatives */
  top?: (TokenLogprob | null)[];
}

/** Hooks for metrics; every one optional. */
export interface SchedulerObserver {
  /** a sequence's first token, `seconds` after submission; its prompt of `promptTokens` is then computed */
  firstToken?(seconds: number, promptTokens: number): void;
  /** `sequence` identifies the request (per-token gaps are measured per sequence) */
  tokens?(count: number, sequence: object): void;
  finished?(outcome: 'stop' | 'length' | 'error' | 'cancelled' | 'timeout', seconds: number): void;
  rejected?(reason: 'busy'): void;
  /** a running sequence gave its KV blocks back to be recomputed later (the pool was full) */
  preempted?(): void;
  /** a generation was admitted with prefix caching: `queried` tokens looked up, `hit` of them found computed */
  prefixCache?(queried: number, hit: number): void;
}

interface JobBase {
  /** the job's KV blocks while it runs */
  kv: KvSequenceId | null;
  finished: boolean;
  timer: NodeJS.Timeout | null;
  readonly enqueuedAt: number;
}
export interface GenerateJob extends JobBase {
  readonly kind: 'generate';
  readonly seq: SequenceState;
  readonly events: Channel<GenerationEvent>;
}
export interface ScoreJob extends JobBase {
  readonly kind: 'score';
  readonly ids: readonly number[];
  readonly full: boolean;
  /** alternatives per token to return (ScoreOutput.top); null: none */
  readonly topLogprobs: number | null;
  /** the attention its tokens take (SparQ per request); absent: the cluster's */
  readonly attention?: AttentionRequest;
  /** tokens stepped so far: a score goes out in chunks of at most the step budget, as a prompt does */
  stepped: number;
  /** what its chunks answered, in order: the log-prob of each token after the first, with its alternatives, and full rows */
  readonly answered: { readonly logprobs: number[]; readonly top: (TokenLogprob | null)[]; readonly full: Float32Array[] };
  resolve(result: ScoreOutput): void;
  reject(err: Error): void;
}
export type Job = GenerateJob | ScoreJob;

/**
 * One step: rows[i] owns logit row i of the batch (a score job owns them all; null: a row nobody owns, asked for
 * because a step of prompt chunks alone needs one); `chunked`: the sequences it feeds a prompt chunk that samples nothing.
 */
export type StepWork = { readonly kind: 'step'; readonly batch: StepBatch; readonly rows: (Job | null)[]; readonly chunked: readonly GenerateJob[] };
/** The next thing to run: one step, or a speculative round over decoding sequences. */
export type Work = StepWork | { readonly kind: 'speculate'; readonly rows: GenerateJob[]; readonly executor: SpeculativeExecutor };
