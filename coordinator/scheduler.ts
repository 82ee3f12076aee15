/**
 * Continuous batching over the KV cache: `schedule` → `execute` → `update`, one step at a time.
 *
 * - Admission: a request waits in a bounded FIFO queue until the KV allocator (core/kv-block-table.ts) has a
 *   free sequence and blocks for its prompt and the first token after it; a full queue refuses at once with
 *   WEFT_BUSY, so memory stays bounded. Before each step a sequence's blocks grow to cover the positions the
 *   step writes.
 * - Preemption: when the pool cannot grow a sequence, the most recently admitted sequence admitted after it that
 *   no sent or half-built step holds gives its blocks back and returns to the queue's front, to be recomputed
 *   (its prompt and the tokens it drew so far, prefilled again; its random stream goes on where it was, so it draws
 *   the tokens it would have drawn). An older sequence is never preempted for a younger one, so the oldest always
 *   goes on and nothing ping-pongs; when nothing can be preempted the sequence waits, skipping the step.
 * - Prefix caching (`prefixCaching`): a generation admitted shares the computed blocks its tokens begin with and
 *   starts at the first position after them; the full blocks of each step built are registered as it is sent.
 * - Chunked prefill: a step carries at most `maxNumBatchedTokens` tokens (vLLM's max_num_batched_tokens): one
 *   decode token for every running sequence first (the budget is at least `kvSlots`, so they always fit), then
 *   the prompts waiting, in admission order, each whole where it fits, else the chunk that fills the budget (the
 *   rest follows in the next steps, so a long prompt never stalls the running streams). A sequence's last chunk
 *   samples the token after it; a chunk before it asks for no logit row (a step with none asks for one nobody
 *   owns). Scoring runs as its own step between them.
 * - Cancellation (AbortSignal, a closed stream, a cancel message) and the per-request deadline free the blocks at
 *   once: a new sequence overwrites them from position 0, and attention only reads positions it wrote.
 * - A failed step (a worker fault) ends every running sequence with that error; queued requests stay queued
 *   while the cluster re-forms (`pause`/`resume`), each still bounded by its deadline.
 * - Scheduling ahead: while a step runs, the next one is already sent (`scheduleAhead`): each decoding sequence
 *   is fed the token the running step draws for it on the workers (StepBatch.feed), so the devices never wait
 *   for the coordinator between steps. A sequence whose token budget ends with the running step is left out; one
 *   that stops on EOS or a stop token costs the next step's work for its row, whose token is dropped (a finished
 *   sequence takes no more tokens); cancellation frees its blocks at once as before.
 */
import type { StepBatch, StepResult } from '../core/worker-protocol.ts';
import { WeftError } from '../core/errors.ts';
import { tokenLogprobOf, type GenerationEvent, type SequenceState, type TokenLogprob } from './generate.ts';
import type { TokenLogprobs } from '../core/step-batch.ts';
import { toFloat32 } from '../core/wire.ts';
import type { SpeculativeExecutor } from './speculative.ts';
import type { KvBlockTable, KvSequenceId } from '../core/kv-block-table.ts';
import { GREEDY, StepBatchBuilder, sampledWith } from './step-builder.ts';
import { SampleGroups, type SamplePlan } from './sample-group.ts';
import { Channel } from './channel.ts';

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
  /** called when a step fails (the worker group failed); the scheduler has already failed the running sequences */
  readonly onStepFailure?: (err: Error) => void;
  readonly observer?: SchedulerObserver;
}

interface JobBase {
  /** the job's KV blocks while it runs */
  kv: KvSequenceId | null;
  finished: boolean;
  timer: NodeJS.Timeout | null;
  readonly enqueuedAt: number;
}
interface GenerateJob extends JobBase {
  readonly kind: 'generate';
  readonly seq: SequenceState;
  readonly events: Channel<GenerationEvent>;
}
interface ScoreJob extends JobBase {
  readonly kind: 'score';
  readonly ids: readonly number[];
  readonly full: boolean;
  /** alternatives per token to return (ScoreOutput.top); null: none */
  readonly topLogprobs: number | null;
  resolve(result: ScoreOutput): void;
  reject(err: Error): void;
}
type Job = GenerateJob | ScoreJob;

/**
 * One step: rows[i] owns logit row i of the batch (a score job owns them all; null: a row nobody owns, asked for
 * because a step of prompt chunks alone needs one); `chunked`: the sequences it feeds a prompt chunk that samples nothing.
 */
type StepWork = { readonly kind: 'step'; readonly batch: StepBatch; readonly rows: (Job | null)[]; readonly chunked: readonly GenerateJob[] };
/** The next thing to run: one step, or a speculative round over decoding sequences. */
type Work = StepWork | { readonly kind: 'speculate'; readonly rows: GenerateJob[]; readonly executor: SpeculativeExecutor };
/** A step sent to the workers whose answer is not back yet. */
interface InFlight {
  readonly work: StepWork;
  readonly result: Promise<StepResult>;
}

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

/** Positions a job's first step writes. */
function firstStepTokens(job: Job): number {
  return job.kind === 'generate' ? job.seq.position + job.seq.input.length : job.ids.length;
}

/** A handle on a submitted generation. */
export interface GenerationHandle {
  readonly promptTokens: number;
  readonly events: AsyncIterable<GenerationEvent>;
  /** `outcome` 'stop': the caller ended it on a stop string (a normal end, not a cancellation) */
  cancel(reason?: Error, outcome?: 'cancelled' | 'stop'): void;
}

export class Scheduler {
  private readonly queue: Job[] = [];
  private readonly running = new Set<Job>();
  private kv: KvBlockTable;
  private looping = false;
  private paused: boolean;
  private fatal: Error | null = null;
  private preemptionCount = 0;
  private readonly sampleGroups: SampleGroups | null;
  /** tokens one step carries at most */
  private readonly tokenBudget: number;

  constructor(private readonly options: SchedulerOptions, startPaused = false) {
    this.kv = options.kvCache;
    this.paused = startPaused;
    this.sampleGroups = options.sampleGroups !== false && !options.speculative ? new SampleGroups(this.kv) : null;
    this.tokenBudget = options.maxNumBatchedTokens ?? defaultMaxNumBatchedTokens(this.kv.layout.kvSlots);
    checkMaxNumBatchedTokens(this.tokenBudget, this.kv.layout.kvSlots);
  }

  get waiting(): number {
    return this.queue.length;
  }
  get active(): number {
    return this.running.size;
  }
  /** sequences holding KV blocks */
  get slotsInUse(): number {
    return this.kv.sequences;
  }
  /** KV blocks held by sequences, of `kvBlocks` they can hold */
  get kvBlocksInUse(): number {
    return this.kv.blocksInUse;
  }
  get kvBlocks(): number {
    return this.kv.blocksInUse + this.kv.blocksFree;
  }
  /** sequences preempted (to be recomputed) since the start */
  get preemptions(): number {
    return this.preemptionCount;
  }

  /** What admission finds room for: a generation's first step and the token after it (its first decode step). */
  private admissionTokens(job: Job): number {
    return Math.min(this.kv.layout.maxContext, firstStepTokens(job) + (job.kind === 'generate' ? 1 : 0));
  }

  /** Queue a generation. Throws WEFT_BUSY when the queue is full. */
  submitGenerate(seq: SequenceState, timeoutMs?: number): GenerationHandle {
    const job: GenerateJob = { kind: 'generate', seq, events: new Channel(), kv: null, finished: false, timer: null, enqueuedAt: performance.now() };
    this.enqueue(job, timeoutMs);
    return { promptTokens: seq.promptIds.length, events: job.events, cancel: (reason, outcome) => this.end(job, reason ?? new WeftError('WEFT_CANCELLED', 'the request was cancelled'), outcome ?? 'cancelled') };
  }

  /** Queue a scoring pass (with `topLogprobs` alternatives per token). Throws WEFT_BUSY when the queue is full. */
  submitScore(ids: readonly number[], full: boolean, timeoutMs?: number, topLogprobs: number | null = null): Promise<ScoreOutput> {
    return new Promise((resolve, reject) => {
      const job: ScoreJob = { kind: 'score', ids, full, topLogprobs, resolve, reject, kv: null, finished: false, timer: null, enqueuedAt: performance.now() };
      this.enqueue(job, timeoutMs);
    });
  }

  private enqueue(job: Job, timeoutMs: number | undefined): void {
    if (this.fatal) throw this.fatal;
    this.kv.checkFits(firstStepTokens(job));
    if (!this.paused) this.admit();
    // the job would wait (paused, others waiting before it, or no room now) and the queue is full; a sample that
    // waits for its group's prompt to go out (the next step sends it: sample-group.ts) is not refused
    if (this.queue.length >= this.options.maxQueue && this.samplePlan(job) !== 'wait' && (this.paused || this.queue.length > 0 || !this.kv.canAllocate(this.admissionTokens(job)))) {
      this.options.observer?.rejected?.('busy');
      throw new WeftError('WEFT_BUSY', `the server is busy: ${this.running.size} requests running and ${this.queue.length} queued (the queue holds ${this.options.maxQueue}); retry later`);
    }
    if (timeoutMs !== undefined && timeoutMs > 0)
      job.timer = setTimeout(() => this.end(job, new WeftError('WEFT_TIMEOUT', `the request did not finish within its timeout of ${timeoutMs} ms`), 'timeout'), timeoutMs);
    this.queue.push(job);
    if (!this.paused) this.admit();
    this.kick();
  }

  /**
   * Take a new KV allocator (the workers sized their pool at load, from a memory fraction) while no sequence
   * holds blocks: before the first resume, or once a failed group's sequences have ended.
   */
  replaceKvCache(kvCache: KvBlockTable): void {
    if (this.running.size > 0 || this.kv.sequences > 0) throw new WeftError('WEFT_PROTOCOL', `the KV allocator cannot be replaced while ${this.running.size} sequences run`);
    checkMaxNumBatchedTokens(this.tokenBudget, kvCache.layout.kvSlots);
    this.kv = kvCache;
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
    this.kv.forgetCached();
    for (const job of [...this.running]) this.end(job, err, 'error');
  }

  /** Refuse everything from now on: queued and running requests end with `err`. */
  failAll(err: Error): void {
    this.fatal = err;
    for (const job of [...this.queue, ...this.running]) this.end(job, err, 'error');
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
    const q = this.queue.indexOf(job);
    if (q >= 0) this.queue.splice(q, 1);
    if (this.running.delete(job) && job.kv !== null) {
      this.kv.free(job.kv);
      job.kv = null;
    }
    if (this.queue.length > 0 && !this.paused) {
      this.admit(); // the freed blocks go to the next in line at once, even while a step runs
      this.kick();
    }
  }

  private kick(): void {
    if (this.looping || this.paused) return;
    this.looping = true;
    // start on the next turn, so requests that arrive together share the first step
    void new Promise((r) => setImmediate(r)).then(() => this.loop()).finally(() => {
      this.looping = false;
      if (!this.paused && this.queue.length + this.running.size > 0) this.kick();
    });
  }

  private async loop(): Promise<void> {
    let inFlight: InFlight | null = null;
    while (inFlight || !this.paused) {
      if (!inFlight) {
        this.admit();
        const work = this.schedule();
        if (!work) return;
        if (work.kind === 'speculate') {
          try {
            const produced = await work.executor.round(work.rows.map((job) => ({ seq: job.seq, blocks: this.kv.blocks(job.kv!) })));
            work.rows.forEach((job, row) => this.emit(job, produced[row]!));
          } catch (err) {
            this.stepFailed(err as Error);
          }
          continue;
        }
        inFlight = this.send(work);
      }
      if (!this.paused) this.admit();
      const next: StepWork | null = this.paused ? null : this.scheduleAhead(inFlight.work);
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

  /** Give KV blocks to queued jobs, first come first served (one that does not fit yet holds the line). */
  private admit(): void {
    while (this.queue.length > 0 && this.admissible(this.queue[0]!)) {
      const job = this.queue.shift()!;
      this.running.add(job);
      const sample = this.samplePlan(job);
      if (job.kind === 'generate' && sample && sample !== 'wait') {
        job.kv = this.sampleGroups!.fork(job.seq, sample);
        continue;
      }
      // a speculative round would take a matched prompt's rest for decode input: no prefix caching with it
      if (job.kind !== 'generate' || !this.options.prefixCaching || this.options.speculative) {
        job.kv = this.kv.allocate(firstStepTokens(job));
        continue;
      }
      // a queued generation is at position 0 (new, or preempted): its input is all its tokens
      const { id, cached } = this.kv.allocatePrefix(job.seq.input);
      job.kv = id;
      this.options.observer?.prefixCache?.(job.seq.input.length, cached);
      job.seq.position = cached;
      job.seq.input = job.seq.input.slice(cached);
    }
  }

  /** Sample groups: whether the queue's head can be admitted now (a fork needs blocks only past the shared ones). */
  private admissible(job: Job): boolean {
    const sample = this.samplePlan(job);
    return sample !== 'wait' && this.kv.canAllocate(this.admissionTokens(job) - (sample?.shared ?? 0));
  }

  private samplePlan(job: Job): SamplePlan | null {
    return job.kind === 'generate' && this.sampleGroups ? this.sampleGroups.plan(job.seq, this.running) : null;
  }

  /**
   * Grow the job's blocks to hold its first `tokens` positions before a step writes them. When the pool is
   * short, preempt younger generations that `held` (the rows of the step in flight and of the one being built)
   * does not name, the youngest first; when none is left the job waits. Returns whether it may run.
   */
  private cover(job: GenerateJob, tokens: number, held: ReadonlySet<Job>): boolean {
    while (!this.kv.canGrow(job.kv!, tokens)) {
      const running = [...this.running];
      const victim = running
        .slice(running.indexOf(job) + 1)
        .reverse()
        .find((other): other is GenerateJob => other.kind === 'generate' && !held.has(other));
      if (!victim) return false;
      this.preempt(victim);
    }
    this.kv.grow(job.kv!, tokens);
    return true;
  }

  /**
   * Take a generation's blocks back and queue it first, to be recomputed: its prompt becomes what it has so far
   * (prompt and drawn tokens), fed from position 0. Its random stream is untouched: the caller makes sure no step
   * holds a row of it, so every uniform it took went to a token already drawn.
   */
  private preempt(job: GenerateJob): void {
    this.running.delete(job);
    this.kv.free(job.kv!);
    job.kv = null;
    this.options.speculative?.release(job.seq); // the draft's cache went with the blocks
    job.seq.input = [...job.seq.promptIds, ...job.seq.generated];
    job.seq.position = 0;
    this.queue.unshift(job);
    this.preemptionCount++;
    this.options.observer?.preempted?.();
  }

  /** Build the next step: a score job alone, else every decoding sequence plus the prompt chunks that fit. */
  private schedule(): Work | null {
    const score = [...this.running].find((j): j is ScoreJob => j.kind === 'score');
    if (score) return this.scoreStep(score);
    const gens = [...this.running].filter((j): j is GenerateJob => j.kind === 'generate');
    if (gens.length === 0) return null;
    // a sequence part way through its prompt's chunks is still prefilling
    const decoding = gens.filter((j) => j.seq.position > 0 && j.seq.input.length === 1);
    const prefilling = gens.filter((j) => !decoding.includes(j));
    const executor = this.options.speculative;
    // after a draft fault (executor.draftError) decoding goes back to plain steps
    if (executor && !executor.draftError && prefilling.length === 0) {
      // a round writes up to k proposals past the sequence's input, within its context
      const rows = this.covered(decoding, new Set(), (job) => Math.min(this.kv.layout.maxContext, job.seq.position + job.seq.input.length + executor.k));
      // none: the oldest decoding sequence can always preempt the younger ones, so only a full slot list of waiting ones is left
      return rows.length ? { kind: 'speculate', rows, executor } : null;
    }
    const builder = new StepBatchBuilder(this.kv.layout.kvBlockSize);
    const rows: (Job | null)[] = [];
    const chunked: GenerateJob[] = [];
    this.appendInputs(builder, decodeFirst(gens), new Set(), rows, chunked);
    // nothing in flight and nothing fits: cannot happen with a pool of one full context
    return this.stepWork(builder, rows, chunked);
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

  /**
   * Of `jobs`, in order, those still running whose blocks cover `tokens(job)` positions (preempting where
   * needed); `held` (jobs a sent step holds) grows by each one taken, so a later job cannot preempt it.
   */
  private covered(jobs: readonly GenerateJob[], held: Set<Job>, tokens: (job: GenerateJob) => number): GenerateJob[] {
    const taken: GenerateJob[] = [];
    for (const job of jobs) {
      if (!this.running.has(job) || !this.cover(job, tokens(job), held)) continue; // preempted by one before it, or waiting
      held.add(job);
      taken.push(job);
    }
    return taken;
  }

  /**
   * Append `jobs`' known inputs, in order, while the step's token budget lasts and their blocks can grow to hold
   * them: a whole input samples the token after it (its job owns the logit row, in `rows`); an input longer than
   * the budget left gives the chunk that fits, taken off its input at once (the step is sent as soon as it is
   * built, and steps run in the order sent), its job listed in `chunked`. `held` grows by each job appended.
   */
  private appendInputs(builder: StepBatchBuilder, jobs: readonly GenerateJob[], held: Set<Job>, rows: (Job | null)[], chunked: GenerateJob[]): void {
    for (const job of jobs) {
      const room = this.tokenBudget - builder.size;
      if (room <= 0) return;
      const { seq } = job;
      const take = Math.min(seq.input.length, room);
      // preempted by one before it, or waiting for blocks
      if (!this.running.has(job) || !this.cover(job, seq.position + take, held)) continue;
      held.add(job);
      const written = seq.position + take;
      const blocks = this.kv.blocks(job.kv!);
      if (take === seq.input.length) {
        builder.appendSampled(blocks, seq.input, seq.position, sampledWith(seq.params, seq.nextUniform()), seq.params.logprobs ?? null, seq.params.attention);
        rows.push(job);
      } else {
        builder.append(blocks, seq.input.slice(0, take), seq.position, seq.params.attention);
        seq.position += take;
        seq.input = seq.input.slice(take);
        chunked.push(job);
      }
      this.registerWritten(job, written);
      this.sampleGroups?.wrote(seq, job.kv!, written);
    }
  }

  /** Prefix caching: register the job's full blocks among its first `written` positions, which sent steps write. */
  private registerWritten(job: GenerateJob, written: number): void {
    if (this.options.prefixCaching && !this.options.speculative && job.kv !== null) this.kv.registerFull(job.kv, written, () => [...job.seq.promptIds, ...job.seq.generated]);
  }

  /**
   * The step after `prev`, built while `prev` runs: each of its sequences that goes on is fed the token `prev`
   * draws for it (logit row i of prev belongs to prev.rows[i]), and the other sequences join as in schedule()
   * (decode rows, then prompt chunks, within the token budget). None while a score job or speculative decoding
   * runs (they need the tokens on the host first).
   */
  private scheduleAhead(prev: StepWork): StepWork | null {
    if (this.options.scheduleAhead === false) return null;
    const executor = this.options.speculative;
    if ((executor && !executor.draftError) || [...this.running].some((job) => job.kind === 'score')) return null;
    const fed = new Set<Job | null>(prev.rows);
    // prev's sequences are in flight: never preempted while it runs
    const held = new Set<Job>([...prev.rows.filter((job): job is Job => job !== null), ...prev.chunked]);
    const maxContext = this.kv.layout.maxContext;
    const builder = new StepBatchBuilder(this.kv.layout.kvBlockSize);
    const rows: (Job | null)[] = [];
    const chunked: GenerateJob[] = [];
    prev.rows.forEach((job, fromRow) => {
      if (!job || job.kind !== 'generate' || job.finished) return;
      const { seq } = job;
      const position = seq.position + seq.input.length; // where prev's draw goes
      // a sequence whose token budget or context ends with prev's draw gets no further step
      if (seq.generated.length + 1 >= seq.params.maxNewTokens || position >= maxContext) return;
      // one that must wait for blocks gets prev's draw on the host and joins a later step with it
      if (!this.cover(job, position + 1, held)) return;
      builder.appendFed(this.kv.blocks(job.kv!), fromRow, position, sampledWith(seq.params, seq.nextUniform()), seq.params.logprobs ?? null, seq.params.attention);
      rows.push(job);
    });
    const waiting = [...this.running].filter((job): job is GenerateJob => job.kind === 'generate' && !fed.has(job) && !job.finished);
    this.appendInputs(builder, decodeFirst(waiting), held, rows, chunked);
    return this.stepWork(builder, rows, chunked);
  }

  private scoreStep(job: ScoreJob): Work | null {
    const positions = job.ids.map((_, i) => i);
    const rows = job.full ? positions : positions.slice(0, -1);
    if (rows.length === 0) {
      this.release(job);
      job.resolve({ logprobs: [null] });
      return this.schedule();
    }
    const builder = new StepBatchBuilder(this.kv.layout.kvBlockSize);
    const start = builder.append(this.kv.blocks(job.kv!), job.ids, 0);
    for (const r of rows) builder.logits(start + r, { scoreId: job.ids[r + 1] ?? 0, topLogprobs: job.topLogprobs });
    return { kind: 'step', batch: builder.build({ fullLogprobs: job.full }), rows: [job], chunked: [] };
  }

  private update(work: StepWork, result: StepResult): void {
    const first = work.rows[0];
    if (first?.kind === 'score') {
      if (first.finished) return;
      this.release(first);
      const logprobs = [null, ...(result.logprobs ?? []).slice(0, first.ids.length - 1)];
      const top = result.tokenLogprobs && { top: [null, ...result.tokenLogprobs.slice(0, first.ids.length - 1).map((t) => (t ? tokenLogprobOf(t) : null))] };
      if (!first.full || !result.fullLogprobs) return first.resolve({ logprobs, ...top });
      const flat = toFloat32(result.fullLogprobs);
      const n = work.batch.logitRows.length;
      const vocab = flat.length / n;
      return first.resolve({ logprobs, ...top, full: Array.from({ length: n }, (_, r) => flat.slice(r * vocab, (r + 1) * vocab)) });
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
          this.registerWritten(job, job.seq.position); // every position before its last token went out in a step
          this.release(job);
          this.options.speculative?.release(job.seq);
          observer?.finished?.(event.finishReason, (performance.now() - job.enqueuedAt) / 1000);
          job.events.close();
        }
      }
    }
  }
}
