/**
 * Admission: the jobs waiting for KV blocks and the jobs holding them.
 *
 * - A request waits in a bounded FIFO queue until the KV allocator (core/kv-block-table.ts) has a free sequence
 *   and blocks for its prompt and the first token after it; a full queue refuses at once with WEFT_BUSY, so
 *   memory stays bounded. One that does not fit yet holds the line.
 * - Prefix caching (`prefixCaching`): a generation admitted shares the computed blocks its tokens begin with and
 *   starts at the first position after them; the full blocks of each step built are registered as it is sent.
 * - Sample groups (sample-group.ts): a generation whose prompt a running one computes forks its blocks instead.
 */
import { WeftError } from '../core/errors.ts';
import { blocksFor, type KvBlockTable } from '../core/kv-block-table.ts';
import { SampleGroups, type SamplePlan } from './sample-group.ts';
import type { GenerateJob, Job, SchedulerObserver } from './scheduler-jobs.ts';

export interface JobQueueOptions {
  /** requests waiting for the KV cache at most; one more is refused with WEFT_BUSY */
  readonly maxQueue: number;
  /** share the KV blocks of prompt prefixes already computed */
  readonly prefixCaching: boolean;
  /** generations of one prompt prefill it once and share its KV blocks */
  readonly sampleGroups: boolean;
  readonly observer?: SchedulerObserver;
}

/** Positions a job's first step writes. */
function firstStepTokens(job: Job): number {
  return job.kind === 'generate' ? job.seq.position + job.seq.input.length : job.ids.length;
}

export class JobQueue {
  /** jobs waiting for KV blocks, in the order they are admitted (a preempted one goes first) */
  readonly queued: Job[] = [];
  /** jobs holding KV blocks, in the order they were admitted (preemption takes the youngest) */
  readonly running = new Set<Job>();
  private kvTable: KvBlockTable;
  private groups: SampleGroups | null;

  constructor(kvCache: KvBlockTable, private readonly options: JobQueueOptions) {
    this.kvTable = kvCache;
    this.groups = options.sampleGroups ? new SampleGroups(kvCache) : null;
  }

  /** the KV allocator (the scheduler owns it: nothing else allocates) */
  get kv(): KvBlockTable {
    return this.kvTable;
  }
  get sampleGroups(): SampleGroups | null {
    return this.groups;
  }

  /** Take a new KV allocator while no sequence holds blocks (the sample groups' records went with the old one). */
  replaceKvCache(kvCache: KvBlockTable): void {
    this.kvTable = kvCache;
    this.groups = this.options.sampleGroups ? new SampleGroups(kvCache) : null;
  }

  /**
   * Queue `job`, admitting what fits when `admitting` (not paused). Throws WEFT_BUSY when the job would wait and
   * the queue is full.
   */
  enqueue(job: Job, admitting: boolean): void {
    this.kv.checkFits(firstStepTokens(job));
    if (admitting) this.admit();
    // the job would wait (paused, others waiting before it, or no room now) and the queue is full; a sample that
    // waits for its group's prompt to go out (the next step sends it: sample-group.ts) is not refused
    if (this.queued.length >= this.options.maxQueue && this.samplePlan(job) !== 'wait' && (!admitting || this.queued.length > 0 || !this.admissible(job))) {
      this.options.observer?.rejected?.('busy');
      throw new WeftError('WEFT_BUSY', `the server is busy: ${this.running.size} requests running and ${this.queued.length} queued (the queue holds ${this.options.maxQueue}); retry later`);
    }
    this.queued.push(job);
    if (admitting) this.admit();
  }

  /** Give KV blocks to queued jobs, first come first served (one that does not fit yet holds the line). */
  admit(): void {
    while (this.queued.length > 0 && this.admissible(this.queued[0]!)) {
      const job = this.queued.shift()!;
      this.running.add(job);
      const sample = this.samplePlan(job);
      if (job.kind === 'generate' && sample && sample !== 'wait') {
        job.kv = this.groups!.fork(job.seq, sample);
        continue;
      }
      if (job.kind !== 'generate' || !this.options.prefixCaching) {
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

  /** Take a running job's blocks back and put it first in line (preemption.ts). */
  requeueFirst(job: GenerateJob): void {
    this.running.delete(job);
    this.kv.free(job.kv!);
    job.kv = null;
    this.queued.unshift(job);
  }

  /** Take a job out of the queue or the running set, freeing its blocks. */
  remove(job: Job): void {
    const q = this.queued.indexOf(job);
    if (q >= 0) this.queued.splice(q, 1);
    if (this.running.delete(job) && job.kv !== null) {
      this.kv.free(job.kv);
      job.kv = null;
    }
  }

  /** Prefix caching: register the job's full blocks among its first `written` positions, which sent steps write. */
  registerWritten(job: GenerateJob, written: number): void {
    if (this.options.prefixCaching && job.kv !== null) this.kv.registerFull(job.kv, written, () => [...job.seq.promptIds, ...job.seq.generated]);
  }

  /** What admission finds room for: a generation's first step and the token after it (its first decode step). */
  private admissionTokens(job: Job): number {
    return Math.min(this.kv.layout.maxContext, firstStepTokens(job) + (job.kind === 'generate' ? 1 : 0));
  }

  /**
   * Whether the queue's head can be admitted now (a fork of a sample group needs blocks only past the shared ones),
   * leaving a free block for each running generation that will need another (its blocks do not cover its prompt
   * and all it may draw): each will need its next block within a few steps, and a sequence admitted into the last
   * free blocks would be preempted (recomputed) by the first of them to cross a block edge. Without that reserve,
   * 64 streams on a pool of four contexts preempted ~17,000 times in 30 s, ten times a request (bench/RESULTS.md,
   * session 21). Nothing running: no reserve, so any sequence that fits the pool goes on.
   */
  private admissible(job: Job): boolean {
    const sample = this.samplePlan(job);
    if (sample === 'wait') return false;
    const tokens = this.admissionTokens(job) - (sample?.shared ?? 0);
    return this.kv.canAllocate(tokens, this.growingGenerations());
  }

  /** Running generations whose blocks do not yet cover their longest length (prompt and every token they may draw). */
  private growingGenerations(): number {
    const { maxContext, kvBlockSize } = this.kv.layout;
    let growing = 0;
    for (const job of this.running) {
      if (job.kind !== 'generate' || job.kv === null) continue;
      const longest = Math.min(maxContext, job.seq.promptIds.length + job.seq.params.maxNewTokens);
      if (blocksFor(longest, kvBlockSize) > this.kv.blocks(job.kv).length) growing++;
    }
    return growing;
  }

  private samplePlan(job: Job): SamplePlan | null {
    return job.kind === 'generate' && this.groups ? this.groups.plan(job.seq, this.running) : null;
  }
}
