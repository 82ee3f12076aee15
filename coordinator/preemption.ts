/**
 * Preemption: before a step writes a sequence's positions, its blocks grow to cover them. When the pool cannot
 * grow a sequence, the most recently admitted sequence admitted after it that no sent or half-built step holds
 * gives its blocks back and returns to the queue's front, to be recomputed (its prompt and the tokens it drew so
 * far, prefilled again; its random stream goes on where it was, so it draws the tokens it would have drawn). An
 * older sequence is never preempted for a younger one, so the oldest always goes on and nothing ping-pongs; when
 * nothing can be preempted the sequence waits, skipping the step.
 */
import type { SpeculativeExecutor } from './speculative.ts';
import type { JobQueue } from './job-queue.ts';
import type { GenerateJob, Job, SchedulerObserver } from './scheduler-jobs.ts';

export class Preemption {
  /** sequences preempted (to be recomputed) since the start */
  count = 0;

  constructor(
    private readonly jobs: JobQueue,
    private readonly speculative: SpeculativeExecutor | undefined,
    private readonly observer: SchedulerObserver | undefined,
  ) {}

  /**
   * Grow the job's blocks to hold its first `tokens` positions before a step writes them. When the pool is
   * short, preempt younger generations that `held` (the rows of the step in flight and of the one being built)
   * does not name, the youngest first; when none is left the job waits. Returns whether it may run.
   */
  cover(job: GenerateJob, tokens: number, held: ReadonlySet<Job>): boolean {
    const { kv } = this.jobs;
    while (!kv.canGrow(job.kv!, tokens)) {
      const running = [...this.jobs.running];
      const victim = running
        .slice(running.indexOf(job) + 1)
        .reverse()
        .find((other): other is GenerateJob => other.kind === 'generate' && !held.has(other));
      if (!victim) return false;
      this.preempt(victim);
    }
    kv.grow(job.kv!, tokens);
    return true;
  }

  /**
   * Whether `job` joins the step being built: it still runs (no job before it preempted it) and its blocks cover
   * `tokens` positions (preempting where needed). `held` (jobs a sent step holds) then names it, so a later job
   * cannot preempt it.
   */
  take(job: GenerateJob, tokens: number, held: Set<Job>): boolean {
    if (!this.jobs.running.has(job) || !this.cover(job, tokens, held)) return false;
    held.add(job);
    return true;
  }

  /**
   * Take a generation's blocks back and queue it first, to be recomputed: its prompt becomes what it has so far
   * (prompt and drawn tokens), fed from position 0. Its random stream is untouched: the caller makes sure no step
   * holds a row of it, so every uniform it took went to a token already drawn.
   */
  private preempt(job: GenerateJob): void {
    this.jobs.requeueFirst(job);
    this.speculative?.release(job.seq); // the draft's cache went with the blocks
    job.seq.input = [...job.seq.promptIds, ...job.seq.generated];
    job.seq.position = 0;
    this.count++;
    this.observer?.preempted?.();
  }
}
