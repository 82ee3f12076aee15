/**
 * Continuous batching over the KV cache: `schedule` → `execute` → `update`, one step at a time.
 *
 * The loop is here; its policies live beside it:
 * - admission (job-queue.ts): a bounded FIFO queue in front of the KV allocator, WEFT_BUSY when full; prefix
 *   caching and sample groups share computed blocks as a generation is admitted;
 * - preemption (preemption.ts): when the pool cannot grow a sequence, a younger one gives its blocks back and
 *   is recomputed later;
 * - step composition (step-composer.ts): decode tokens first, then prompt chunks, under the step's token budget
 *   (chunked prefill); the next step built while one runs (scheduling ahead); speculative rounds;
 * - scoring (score-step.ts): a score job runs as steps of its own, at most the step budget each.
 *
 * - Cancellation (AbortSignal, a closed stream, a cancel message) and the per-request deadline free the blocks at
 *   once: a new sequence overwrites them from position 0, and attention only reads positions it wrote.
 * - A failed step (a worker fault) ends every running sequence with that error; queued requests stay queued
 *   while the cluster re-forms (`pause`/`resume`), each still bounded by its deadline.
 * - Scheduling ahead: while a step runs, the next one is already sent (`scheduleAhead`), its decoding sequences
 *   fed on the workers the tokens the running step draws; a finished sequence takes no more tokens.
 */
import type { StepBatch, StepResult } from '../core/worker-protocol.ts';
import { WeftError } from '../core/errors.ts';
import type { GenerationEvent, SequenceState } from './generate.ts';
import type { TokenLogprobs } from '../core/step-batch.ts';
import type { SpeculativeExecutor } from './speculative.ts';
import type { KvBlockTable } from '../core/kv-block-table.ts';
import { Channel } from './channel.ts';
import { JobQueue } from './job-queue.ts';
import { Preemption } from './preemption.ts';
import { StepComposer, checkMaxNumBatchedTokens, defaultMaxNumBatchedTokens } from './step-composer.ts';
import { scoreOutput, scoreStep, takeScoreStep } from './score-step.ts';
import type { GenerateJob, Job, ScoreJob, ScoreOutput, SchedulerObserver, StepWork, Work } from './scheduler-jobs.ts';
import type { AttentionRequest } from './sampling-params.ts';

export type { ScoreOutput, SchedulerObserver } from './scheduler-jobs.ts';
export { DEFAULT_MAX_NUM_BATCHED_TOKENS, checkMaxNumBatchedTokens, defaultMaxNumBatchedTokens } from './step-composer.ts';

export interface SchedulerOptions {
  /** the KV allocator, sized as the workers' caches are (the scheduler owns it: nothing else allocates) */
  readonly kvCache: KvBlockTable;
  /** requests waiting for the KV cache at most; one more is refused with WEFT_BUSY */
  readonly maxQueue: number;
  /** tokens one step carries at most (decode rows first, then prompt chunks); at least the KV cache's kvSlots. Defaults to defaultMaxNumBatchedTokens. */
  readonly maxNumBatchedTokens?: number;
  readonly step: (batch: StepBatch) => Promise<StepResult>;
  /** send the next step before the running one's tokens are back (fed on the workers). Defaults to true. */
  readonly scheduleAhead?: boolean;
  /** share the KV blocks of prompt prefixes already computed (core/kv-block-table.ts); not with `speculative` */
  readonly prefixCaching?: boolean;
  /** generations of one prompt prefill it once and share its KV blocks (coordinator/sample-group.ts); not with `speculative`. Defaults to true. */
  readonly sampleGroups?: boolean;
  /** speculative decoding: decode steps become draft-and-verify rounds (prefill and scoring are unchanged) */
  readonly speculative?: SpeculativeExecutor;
  /** the cluster keeps SparQ's state: prompts are attended exactly (StepComposerOptions.exactPrompts) */
  readonly exactPrompts?: boolean;
  /** called when a step fails (the worker group failed); the scheduler has already failed the running sequences */
  readonly onStepFailure?: (err: Error) => void;
  readonly observer?: SchedulerObserver;
}

/** A step sent to the workers whose answer is not back yet. */
interface InFlight {
  readonly work: StepWork;
  readonly result: Promise<StepResult>;
}

/** A handle on a submitted generation. */
export interface GenerationHandle {
  readonly promptTokens: number;
  readonly events: AsyncIterable<GenerationEvent>;
  /** `outcome` 'stop': the caller ended it on a stop string (a normal end, not a cancellation) */
  cancel(reason?: Error, outcome?: 'cancelled' | 'stop'): void;
}

export class Scheduler {
  private readonly jobs: JobQueue;
  private readonly preemption: Preemption;
  private readonly composer: StepComposer;
  private looping = false;
  private paused: boolean;
  private fatal: Error | null = null;
  /** tokens one step carries at most */
  private readonly tokenBudget: number;

  constructor(private readonly options: SchedulerOptions, startPaused = false) {
    const kv = options.kvCache;
    this.paused = startPaused;
    this.tokenBudget = options.maxNumBatchedTokens ?? defaultMaxNumBatchedTokens(kv.layout.kvSlots);
    checkMaxNumBatchedTokens(this.tokenBudget, kv.layout.kvSlots);
    const { speculative, observer } = options;
    // a speculative round would take a matched prompt's rest for decode input: no prefix caching or sample groups with it
    this.jobs = new JobQueue(kv, { maxQueue: options.maxQueue, prefixCaching: options.prefixCaching === true && !speculative, sampleGroups: options.sampleGroups !== false && !speculative, ...(observer && { observer }) });
    this.preemption = new Preemption(this.jobs, speculative, observer);
    this.composer = new StepComposer(this.jobs, this.preemption, { tokenBudget: this.tokenBudget, scheduleAhead: options.scheduleAhead !== false, ...(speculative && { speculative }), ...(options.exactPrompts && { exactPrompts: true }) });
  }

  get waiting(): number {
    return this.jobs.queued.length;
  }
  get active(): number {
    return this.jobs.running.size;
  }
  /** sequences holding KV blocks */
  get slotsInUse(): number {
    return this.jobs.kv.sequences;
  }
  /** KV blocks held by sequences, of `kvBlocks` they can hold */
  get kvBlocksInUse(): number {
    return this.jobs.kv.blocksInUse;
  }
  get kvBlocks(): number {
    return this.jobs.kv.blocksInUse + this.jobs.kv.blocksFree;
  }
  /** sequences preempted (to be recomputed) since the start */
  get preemptions(): number {
    return this.preemption.count;
  }

  /** Queue a generation. Throws WEFT_BUSY when the queue is full. */
  submitGenerate(seq: SequenceState, timeoutMs?: number): GenerationHandle {
    const job: GenerateJob = { kind: 'generate', seq, events: new Channel(), kv: null, finished: false, timer: null, enqueuedAt: performance.now() };
    this.enqueue(job, timeoutMs);
    return { promptTokens: seq.promptIds.length, events: job.events, cancel: (reason, outcome) => this.end(job, reason ?? new WeftError('WEFT_CANCELLED', 'the request was cancelled'), outcome ?? 'cancelled') };
  }

  /** Queue a scoring pass (with `topLogprobs` alternatives per token). Throws WEFT_BUSY when the queue is full. */
  submitScore(ids: readonly number[], full: boolean, timeoutMs?: number, topLogprobs: number | null = null, attention?: AttentionRequest): Promise<ScoreOutput> {
    return new Promise((resolve, reject) => {
      const job: ScoreJob = {
        kind: 'score', ids, full, topLogprobs, ...(attention && { attention }), stepped: 0, answered: { logprobs: [], top: [], full: [] },
        resolve, reject, kv: null, finished: false, timer: null, enqueuedAt: performance.now(),
      };
      this.enqueue(job, timeoutMs);
    });
  }

  private enqueue(job: Job, timeoutMs: number | undefined): void {
    if (this.fatal) throw this.fatal;
    this.jobs.enqueue(job, !this.paused);
    if (timeoutMs !== undefined && timeoutMs > 0)
      job.timer = setTimeout(() => this.end(job, new WeftError('WEFT_TIMEOUT', `the request did not finish within its timeout of ${timeoutMs} ms`), 'timeout'), timeoutMs);
    this.kick();
  }

  /**
   * Take a new KV allocator (the workers sized their pool at load, from a memory fraction) while no sequence
   * holds blocks: before the first resume, or once a failed group's sequences have ended.
   */
  replaceKvCache(kvCache: KvBlockTable): void {
    if (this.jobs.running.size > 0 || this.jobs.kv.sequences > 0) throw new WeftError('WEFT_PROTOCOL', `the KV allocator cannot be replaced while ${this.jobs.running.size} sequences run`);
    checkMaxNumBatchedTokens(this.tokenBudget, kvCache.layout.kvSlots);
    this.jobs.replaceKvCache(kvCache);
  }

  /** Stop starting steps (the cluster is loading or re-forming); queued requests wait. */
  pause(): void {
    this.paused = true;
  }
  resume(): void {
    this.paused = false;
    this.kick();
  }

  /** End every running sequence with `err` and free its blocks (their KV is gone with the failed group). */
  failRunning(err: Error): void {
    this.jobs.kv.forgetCached();
    for (const job of [...this.jobs.running]) this.end(job, err, 'error');
  }

  /** Refuse everything from now on: queued and running requests end with `err`. */
  failAll(err: Error): void {
    this.fatal = err;
    for (const job of [...this.jobs.queued, ...this.jobs.running]) this.end(job, err, 'error');
  }

  /** Finish a job early (error, cancel, timeout): free its blocks, tell its consumer. Idempotent. */
  private end(job: Job, err: Error, outcome: 'error' | 'cancelled' | 'timeout' | 'stop'): void {
    if (job.finished) return;
    this.release(job);
    this.options.observer?.finished?.(outcome, (performance.now() - job.enqueuedAt) / 1000);
    if (job.kind === 'generate') job.events.fail(err);
    else job.reject(err);
  }

  private release(job: Job): void {
    job.finished = true;
    if (job.timer) clearTimeout(job.timer);
    this.jobs.remove(job);
    if (this.jobs.queued.length > 0 && !this.paused) {
      this.jobs.admit(); // the freed blocks go to the next in line at once, even while a step runs
      this.kick();
    }
  }

  private kick(): void {
    if (this.looping || this.paused) return;
    this.looping = true;
    // start on the next turn, so requests that arrive together share the first step
    void new Promise((r) => setImmediate(r)).then(() => this.loop()).finally(() => {
      this.looping = false;
      if (!this.paused && this.jobs.queued.length + this.jobs.running.size > 0) this.kick();
    });
  }

  private async loop(): Promise<void> {
    let inFlight: InFlight | null = null;
    while (inFlight || !this.paused) {
      if (!inFlight) {
        this.jobs.admit();
        const work = this.schedule();
        if (!work) return;
        if (work.kind === 'speculate') {
          try {
            const produced = await work.executor.round(work.rows.map((job) => ({ seq: job.seq, blocks: this.jobs.kv.blocks(job.kv!) })));
            work.rows.forEach((job, row) => this.emit(job, produced[row]!));
          } catch (err) {
            this.stepFailed(err as Error);
          }
          continue;
        }
        inFlight = this.send(work);
      }
      if (!this.paused) this.jobs.admit();
      const next: StepWork | null = this.paused ? null : this.composer.ahead(inFlight.work);
      const sentNext: InFlight | null = next ? this.send(next) : null;
      try {
        this.update(inFlight.work, await inFlight.result);
      } catch (err) {
        this.stepFailed(err as Error); // the step sent after it fails with the same group; its rows end here too
        inFlight = null;
        continue;
      }
      inFlight = sentNext;
    }
  }

  private send(work: StepWork): InFlight {
    const result = this.options.step(work.batch);
    result.catch(() => {}); // awaited later (a failure is handled there); not an unhandled rejection meanwhile
    return { work, result };
  }

  private stepFailed(err: Error): void {
    this.failRunning(err);
    this.options.onStepFailure?.(err);
  }

  /** The next work: a score job alone, else every decoding sequence plus the prompt chunks that fit (step-composer.ts). */
  private schedule(): Work | null {
    for (;;) {
      const score = [...this.jobs.running].find((j): j is ScoreJob => j.kind === 'score');
      if (!score) return this.composer.compose();
      const work = scoreStep(score, this.jobs.kv, this.tokenBudget);
      if (work) return work;
      this.release(score); // no token left asks for a row (one token, not `full`; or the last, done)
      score.resolve(scoreOutput(score));
    }
  }

  private update(work: StepWork, result: StepResult): void {
    const first = work.rows[0];
    if (first?.kind === 'score') {
      if (first.finished || !takeScoreStep(first, work, result)) return; // cancelled, or more chunks to step
      this.release(first);
      return first.resolve(scoreOutput(first));
    }
    work.rows.forEach((job, row) => {
      if (!job || job.finished || job.kind !== 'generate') return; // nobody's row, or cancelled while the step ran
      const token = result.tokens?.[row];
      if (token === undefined) return this.end(job, new WeftError('WEFT_PROTOCOL', `step returned no token for row ${row}`), 'error');
      this.emit(job, [token], [result.tokenLogprobs?.[row] ?? null]);
    });
  }

  /** Hand a sequence the tokens one step or round produced (with their log-probs, when asked), in order, until it finishes. */
  private emit(job: GenerateJob, tokens: readonly number[], logprobs: readonly (TokenLogprobs | null)[] = []): void {
    const observer = this.options.observer;
    for (const [i, token] of tokens.entries()) {
      if (job.finished) return; // cancelled while the step ran, or done with tokens to spare
      const wasFirst = job.seq.firstTokenAt === null;
      const events = job.seq.accept(token, logprobs[i] ?? null);
      if (wasFirst) observer?.firstToken?.((job.seq.firstTokenAt! - job.enqueuedAt) / 1000, job.seq.promptIds.length);
      observer?.tokens?.(1, job.seq);
      for (const event of events) {
        job.events.push(event);
        if (event.type === 'done') {
          this.jobs.registerWritten(job, job.seq.position); // every position before its last token went out in a step
          this.release(job);
          this.options.speculative?.release(job.seq);
          observer?.finished?.(event.finishReason, (performance.now() - job.enqueuedAt) / 1000);
          job.events.close();
        }
      }
    }
  }
}
