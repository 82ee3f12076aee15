/**
 * The worker groups' lifecycle under a cluster. States: loading → ready ⇄ recovering, and failed / closed.
 *
 * With `recover`, a worker fault ends the running requests with the error naming the rank, the group re-forms
 * (every rank restarted and initialised again) and queued requests run once it is ready; after `maxRecoveries`
 * failed attempts in a row the cluster is failed. A configuration error while loading (weights, model) fails at
 * once: it would fail the same way on every attempt.
 *
 * A draft group's fault costs no request: decoding goes on with the target alone while the draft group re-forms
 * in the background (at most `maxRecoveries` attempts), and speculation resumes once it is back.
 */
import { EXIT_CONFIG, WeftError, exitCodeFor } from '../core/errors.ts';
import { KvBlockTable, kvCacheLayout } from '../core/kv-block-table.ts';
import type { WorkerGroup } from './worker-group.ts';
import type { Scheduler } from './scheduler.ts';
import type { SpeculativeExecutor } from './speculative.ts';
import type { ClusterSettings, ClusterState, DraftSide, GroupInitCommand } from './cluster-types.ts';

export class GroupLifecycle {
  /** the target group, once it has started (the cluster's steps go to it) */
  group!: WorkerGroup;
  private stateValue: ClusterState = 'loading';
  private detailValue = 'loading weights';
  private recovering = false;
  private reformCount = 0;
  private draftReforming = false;
  private draftReformCount = 0;
  /** the last draft fault, kept after the draft group is back (speculationStats reports it) */
  private lastDraftFaultValue: Error | null = null;

  /**
   * `readyDetail`: the state's detail once loaded. `speculative` is the executor over `draft` (null without one).
   */
  constructor(
    private initCommandValue: GroupInitCommand,
    private readonly scheduler: Scheduler,
    private readonly draft: DraftSide | null,
    private readonly speculative: SpeculativeExecutor | null,
    private readonly options: Pick<ClusterSettings, 'recover' | 'maxRecoveries' | 'onStateChange'>,
    private readonly readyDetail: string,
  ) {}

  get state(): ClusterState {
    return this.stateValue;
  }
  get detail(): string {
    return this.detailValue;
  }
  /** what the target ranks were initialised with last (a pool sized from gpuMemoryFraction, given in tokens) */
  get initCommand(): GroupInitCommand {
    return this.initCommandValue;
  }
  /** the target group's re-forms, and the draft group's on its own */
  get reforms(): number {
    return this.reformCount;
  }
  get draftReforms(): number {
    return this.draftReformCount;
  }
  get lastDraftFault(): Error | null {
    return this.lastDraftFaultValue;
  }

  private setState(state: ClusterState, detail: string): void {
    if (this.stateValue === 'closed') return;
    this.stateValue = state;
    this.detailValue = detail;
    this.options.onStateChange?.(state, detail);
  }

  /** Join and initialise every rank (and the draft's); resolves when the cluster is ready. */
  async bringUp(groupStarting: Promise<WorkerGroup>): Promise<void> {
    this.group = await groupStarting;
    try {
      if (this.draft) this.draft.group = await this.draft.groupStarting;
      await Promise.all([this.group.join(), this.draft?.group?.join()]);
      await Promise.all([this.initGroup(), this.draft?.group?.init(this.draft.initCommand)]);
    } catch (err) {
      // a configuration error (weights, model) fails the same way on every attempt: no re-form
      if (!this.options.recover || this.stateValue === 'closed' || exitCodeFor(err) === EXIT_CONFIG) {
        this.setState('failed', (err as Error).message);
        this.scheduler.failAll(err as Error);
        throw err;
      }
      // a fault while loading: re-form like any other
      await this.recover(err as Error);
      if (this.stateValue !== 'ready') throw err;
      return;
    }
    this.setState('ready', this.readyDetail);
    this.scheduler.resume();
  }

  /** Closed for good: every request ends with WEFT_CLOSED and the groups stop. */
  async close(): Promise<void> {
    this.setState('closed', 'the cluster was closed');
    this.scheduler.failAll(new WeftError('WEFT_CLOSED', 'the cluster was closed'));
    await Promise.all([this.group?.close(), this.draft?.group?.close()]);
  }

  /**
   * Initialise the target group. A pool the ranks sized from gpuMemoryFraction becomes the cluster's: the
   * smallest any rank made (a rank with more leaves the rest unused), given in tokens from then on (re-forms
   * allocate the same), and the scheduler's allocator is made for it.
   */
  private async initGroup(): Promise<void> {
    const kvCacheTokens = await this.group.init(this.initCommandValue);
    if (kvCacheTokens === undefined) return;
    const { gpuMemoryFraction: _sized, ...rest } = this.initCommandValue;
    this.initCommandValue = { ...rest, kvCacheTokens };
    this.scheduler.replaceKvCache(new KvBlockTable(kvCacheLayout(this.initCommandValue)));
  }

  /** A worker fault: fail the running requests, then re-form (with `recover`) or fail for good. */
  onFault(err: Error): void {
    if (this.stateValue === 'closed' || this.stateValue === 'loading' || this.recovering) return;
    this.scheduler.failRunning(err);
    if (!this.options.recover) {
      this.setState('failed', err.message);
      this.scheduler.failAll(err);
      return;
    }
    void this.recover(err);
  }

  private async recover(cause: Error): Promise<void> {
    if (this.recovering) return;
    this.recovering = true;
    this.scheduler.pause();
    this.setState('recovering', `re-forming the worker group after: ${cause.message}`);
    const attempts = this.options.maxRecoveries;
    let last = cause;
    try {
      for (let attempt = 1; attempt <= attempts; attempt++) {
        if (this.stateValue === 'closed') return;
        try {
          await this.group.reform();
          await this.initGroup();
          // a draft re-forming on its own is left to finish; otherwise its cache is stale (or it is dead): rebuild it too
          if (this.draft?.group && !this.draftReforming) {
            await this.draft.group.reform();
            await this.draft.group.init(this.draft.initCommand);
            this.speculative!.enableDraft();
          }
          this.reformCount++;
          this.setState('ready', `serving again after re-forming the group (${cause.message})`);
          this.scheduler.resume();
          const draftFault = this.speculative?.draftError;
          if (draftFault) void this.reformDraft(draftFault); // the draft died while the target re-formed
          return;
        } catch (err) {
          last = err as Error;
          process.stderr.write(`weft: re-forming the worker group failed (attempt ${attempt} of ${attempts}): ${last.message}\n`);
        }
      }
      const fatal = new WeftError('WEFT_WORKER_DIED', `the worker group could not be re-formed after ${attempts} attempts: ${last.message}`);
      this.setState('failed', fatal.message);
      this.scheduler.failAll(fatal);
    } finally {
      this.recovering = false;
    }
  }

  /** A draft fault costs speed, not requests: rounds go on with the target alone while the draft group re-forms. */
  onDraftFault(err: Error): void {
    this.lastDraftFaultValue = err;
    this.speculative?.disableDraft(err);
    // while loading, bringUp fails on it; while recovering, recover() re-forms the draft afterwards
    if (this.stateValue === 'ready') void this.reformDraft(err);
  }

  /** Re-form the draft group in the background, `maxRecoveries` attempts at most; speculation resumes once it is back. */
  private async reformDraft(cause: Error): Promise<void> {
    const draft = this.draft;
    if (!draft?.group || this.draftReforming) return;
    this.draftReforming = true;
    const attempts = this.options.maxRecoveries;
    let last = cause;
    try {
      for (let attempt = 1; attempt <= attempts; attempt++) {
        // closed, or the target group is re-forming: recover() re-forms the draft group with it
        if (this.stateValue === 'closed' || this.recovering) return;
        process.stderr.write(`weft: re-forming the draft group (attempt ${attempt} of ${attempts}) after: ${last.message}\n`);
        try {
          await draft.group.reform();
          await draft.group.init(draft.initCommand);
          this.draftReformCount++;
          this.speculative!.enableDraft();
          process.stderr.write(`weft: the draft group is back; speculative decoding resumes\n`);
          return;
        } catch (err) {
          if (this.state === 'closed') return; // the cluster was closed meanwhile
          last = err as Error;
          process.stderr.write(`weft: re-forming the draft group failed (attempt ${attempt} of ${attempts}): ${last.message}\n`);
        }
        // a fault that repeats at once (memory still held) gets time to clear
        if (attempt < attempts) await new Promise((r) => setTimeout(r, 1000 * attempt));
      }
      process.stderr.write(`weft: speculative decoding stays off: the draft group could not be re-formed after ${attempts} attempts\n`);
    } finally {
      this.draftReforming = false;
    }
  }
}
