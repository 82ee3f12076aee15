/**
 * What one step carries: the running generations' inputs under a token budget.
 *
 * - Chunked prefill: a step carries at most `maxNumBatchedTokens` tokens (vLLM's max_num_batched_tokens): one
 *   decode token for every running sequence first (the budget is at least `kvSlots`, so they always fit), then
 *   the prompts waiting, in admission order, each whole where it fits, else the chunk that fills the budget (the
 *   rest follows in the next steps, so a long prompt never stalls the running streams). A sequence's last chunk
 *   samples the token after it; a chunk before it asks for no logit row (a step with none asks for one nobody
 *   owns). Scoring runs as steps of its own between them (score-step.ts).
 * - Scheduling ahead: while a step runs, the next one is already built (`ahead`): each decoding sequence is fed
 *   the token the running step draws for it on the workers (StepBatch.feed), so the devices never wait for the
 *   coordinator between steps. A sequence whose token budget ends with the running step is left out; one that
 *   stops on EOS or a stop token costs the next step's work for its row, whose token is dropped (a finished
 *   sequence takes no more tokens).
 * - Speculative decoding: once no sequence is prefilling, decoding runs as draft-and-verify rounds instead.
 */
import { WeftError } from '../core/errors.ts';
import type { SpeculativeExecutor } from './speculative.ts';
import { GREEDY, StepBatchBuilder, sampledWith, type RowSampling } from './step-builder.ts';
import type { SequenceState } from './generate.ts';
import type { JobQueue } from './job-queue.ts';
import type { Preemption } from './preemption.ts';
import type { GenerateJob, Job, StepWork, Work } from './scheduler-jobs.ts';
import type { AttentionRequest } from './sampling-params.ts';

/** How a sequence's next token is drawn: its parameters, its next uniform, and its logit bias with its penalties. */
function nextDraw(seq: SequenceState): RowSampling {
  return sampledWith(seq.params, seq.nextUniform(), seq.nextLogitBias());
}

/** Penalties count the tokens drawn so far: the next step waits for the one in flight (no scheduling ahead). */
const penalised = (job: Job): boolean => job.kind === 'generate' && !job.finished && !!(job.seq.params.presencePenalty || job.seq.params.frequencyPenalty);

/** A prompt's attention on a cluster that keeps SparQ's state (StepComposerOptions.exactPrompts). */
const EXACT: AttentionRequest = { mode: 'dense' };

/**
 * The step token budget when none is given: a 1024-token step is one the CUDA worker's step arena holds whole
 * (worker/runner.ts, PREFILL_STEP_TOKENS), large enough that prefill runs at full matrix size, small enough that
 * the running streams wait at most one such step per token; and never below `kvSlots` (every decode row fits).
 */
export const DEFAULT_MAX_NUM_BATCHED_TOKENS = 1024;
export function defaultMaxNumBatchedTokens(kvSlots: number): number {
  return Math.max(DEFAULT_MAX_NUM_BATCHED_TOKENS, kvSlots);
}

/** Refuse a step token budget that cannot carry one decode token for each of `kvSlots` running sequences. */
export function checkMaxNumBatchedTokens(budget: number, kvSlots: number): void {
  if (!Number.isInteger(budget) || budget < 1)
    throw new WeftError('WEFT_BAD_CONFIG', `--max-num-batched-tokens must be a positive integer, got ${budget}`);
  if (budget < kvSlots)
    throw new WeftError('WEFT_BAD_CONFIG', `--max-num-batched-tokens ${budget} is below --kv-slots ${kvSlots}: a step must carry one decode token for every running sequence; give at least ${kvSlots}, or fewer --kv-slots`);
}

/** Decode rows (one token to feed) before prompts and their chunks, each group in its order. */
function decodeFirst(jobs: readonly GenerateJob[]): GenerateJob[] {
  return [...jobs.filter((job) => job.seq.input.length === 1), ...jobs.filter((job) => job.seq.input.length !== 1)];
}

export interface StepComposerOptions {
  /** tokens one step carries at most */
  readonly tokenBudget: number;
  /** build the next step while the running one's tokens are not back yet */
  readonly scheduleAhead: boolean;
  readonly speculative?: SpeculativeExecutor;
  /**
   * The cluster keeps SparQ's state: a sequence's prompt (and an input of several tokens, as a preempted one's) is
   * attended exactly, its generated tokens with its SparQ setting. SparQ is a decode attention (the paper's prefill
   * is dense), and an exact prompt takes the dense kernels (worker/runner.ts), where SparQ would select a token at a
   * time.
   */
  readonly exactPrompts?: boolean;
}

export class StepComposer {
  constructor(
    private readonly jobs: JobQueue,
    private readonly preemption: Preemption,
    private readonly options: StepComposerOptions,
  ) {}

  /** The next work over the running generations: every decoding sequence plus the prompt chunks that fit, or a speculative round. */
  compose(): Work | null {
    const gens = [...this.jobs.running].filter((j): j is GenerateJob => j.kind === 'generate');
    if (gens.length === 0) return null;
    // a sequence part way through its prompt's chunks is still prefilling
    const decoding = gens.filter((j) => j.seq.position > 0 && j.seq.input.length === 1);
    const prefilling = gens.filter((j) => !decoding.includes(j));
    const executor = this.options.speculative;
    // after a draft fault (executor.draftError) decoding goes back to plain steps
    if (executor && !executor.draftError && prefilling.length === 0) {
      const maxContext = this.jobs.kv.layout.maxContext;
      const held = new Set<Job>();
      // a round writes up to k proposals past the sequence's input, within its context
      const rows = decoding.filter((job) => this.preemption.take(job, Math.min(maxContext, job.seq.position + job.seq.input.length + executor.k), held));
      // none: the oldest decoding sequence can always preempt the younger ones, so only a full slot list of waiting ones is left
      return rows.length ? { kind: 'speculate', rows, executor } : null;
    }
    const builder = new StepBatchBuilder(this.jobs.kv.layout.kvBlockSize);
    const rows: (Job | null)[] = [];
    const chunked: GenerateJob[] = [];
    this.appendInputs(builder, decodeFirst(gens), new Set(), rows, chunked);
    // nothing in flight and nothing fits: cannot happen with a pool of one full context
    return this.stepWork(builder, rows, chunked);
  }

  /**
   * The step after `prev`, built while `prev` runs: each of its sequences that goes on is fed the token `prev`
   * draws for it (logit row i of prev belongs to prev.rows[i]), and the other sequences join as in compose()
   * (decode rows, then prompt chunks, within the token budget). None while a score job, speculative decoding or a
   * penalised sequence runs (they need the tokens on the host first).
   */
  ahead(prev: StepWork): StepWork | null {
    if (!this.options.scheduleAhead) return null;
    const executor = this.options.speculative;
    if ((executor && !executor.draftError) || [...this.jobs.running].some((job) => job.kind === 'score' || penalised(job))) return null;
    const { kv } = this.jobs;
    const fed = new Set<Job | null>(prev.rows);
    // prev's sequences are in flight: never preempted while it runs
    const held = new Set<Job>([...prev.rows.filter((job): job is Job => job !== null), ...prev.chunked]);
    const builder = new StepBatchBuilder(kv.layout.kvBlockSize);
    const rows: (Job | null)[] = [];
    const chunked: GenerateJob[] = [];
    prev.rows.forEach((job, fromRow) => {
      if (!job || job.kind !== 'generate' || job.finished) return;
      const { seq } = job;
      const position = seq.position + seq.input.length; // where prev's draw goes
      // a sequence whose token budget or context ends with prev's draw gets no further step
      if (seq.generated.length + 1 >= seq.params.maxNewTokens || position >= kv.layout.maxContext) return;
      // one that must wait for blocks gets prev's draw on the host and joins a later step with it
      if (!this.preemption.cover(job, position + 1, held)) return;
      builder.appendFed(kv.blocks(job.kv!), fromRow, position, nextDraw(seq), seq.params.logprobs ?? null, seq.params.attention);
      rows.push(job);
    });
    const waiting = [...this.jobs.running].filter((job): job is GenerateJob => job.kind === 'generate' && !fed.has(job) && !job.finished);
    this.appendInputs(builder, decodeFirst(waiting), held, rows, chunked);
    return this.stepWork(builder, rows, chunked);
  }

  /**
   * Append `jobs`' known inputs, in order, while the step's token budget lasts and their blocks can grow to hold
   * them: a whole input samples the token after it (its job owns the logit row, in `rows`); an input longer than
   * the budget left gives the chunk that fits, taken off its input at once (the step is sent as soon as it is
   * built, and steps run in the order sent), its job listed in `chunked`. `held` grows by each job appended.
   */
  private appendInputs(builder: StepBatchBuilder, jobs: readonly GenerateJob[], held: Set<Job>, rows: (Job | null)[], chunked: GenerateJob[]): void {
    for (const job of jobs) {
      const room = this.options.tokenBudget - builder.size;
      if (room <= 0) return;
      const { seq } = job;
      const take = Math.min(seq.input.length, room);
      // preempted by one before it, or waiting for blocks
      if (!this.preemption.take(job, seq.position + take, held)) continue;
      const written = seq.position + take;
      const blocks = this.jobs.kv.blocks(job.kv!);
      const attention = this.options.exactPrompts && (seq.generated.length === 0 || seq.input.length > 1) ? EXACT : seq.params.attention;
      if (take === seq.input.length) {
        builder.appendSampled(blocks, seq.input, seq.position, nextDraw(seq), seq.params.logprobs ?? null, attention);
        rows.push(job);
      } else {
        builder.append(blocks, seq.input.slice(0, take), seq.position, attention);
        seq.position += take;
        seq.input = seq.input.slice(take);
        chunked.push(job);
      }
      this.jobs.registerWritten(job, written);
      this.jobs.sampleGroups?.wrote(seq, job.kv!, written);
    }
  }

  /** The step built, with a row nobody owns when only prompt chunks are in it; null when it is empty. */
  private stepWork(builder: StepBatchBuilder, rows: (Job | null)[], chunked: readonly GenerateJob[]): StepWork | null {
    if (builder.size === 0) return null;
    if (builder.logitRowCount === 0) {
      builder.logits(builder.size - 1, { sample: GREEDY });
      rows.push(null);
    }
    return { kind: 'step', batch: builder.build(), rows, chunked };
  }
}
