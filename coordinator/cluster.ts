/**
 * A running cluster: the model's spec and tokenizer, its shard plan, one worker group, and the scheduler that
 * batches requests onto it. Everything is checked before a worker starts (the model's config, the split, the
 * tokenizer), so a model that cannot run is refused before any weight byte is read.
 *
 * States: loading → ready ⇄ recovering, and failed / closed. With `recover`, a worker fault ends the running
 * requests with the error naming the rank, the group re-forms (every rank restarted and initialised again) and
 * queued requests run once it is ready; after `maxRecoveries` failed attempts in a row the cluster is failed.
 *
 * Text work (tokenizing prompts, rendering the chat template, decoding long id lists) runs in the text threads
 * (text-pool.ts), never on the event loop; a text longer than the context could hold is refused before any of
 * it (tokenizer.ts, maxTextChars). Decoding the streamed tokens stays here: a bounded tail per token, tens of µs.
 *
 * A draft group's fault costs no request: decoding goes on with the target alone while the draft group re-forms
 * in the background (at most `maxRecoveries` attempts), and speculation resumes once it is back.
 */
import { join, basename, resolve } from 'node:path';
import { availableParallelism } from 'node:os';
import { existsSync } from 'node:fs';
import { readModelSpec, withQuantizeAtLoad, type ModelSpec } from '../core/model-spec.ts';
import { planShards, type ShardPlan } from '../core/shard-plan.ts';
import { loadTokenizer, type DecodeOptions, type EncodeOptions, type WeftTokenizer } from './tokenizer.ts';
import { TextPool } from './text-pool.ts';
import type { ChatMessage, ChatPrompter } from './chat-template.ts';
import { contextName, parseSamplingParams, validatePromptIds } from './sampling-params.ts';
import { WorkerGroup, type RankStatus } from './worker-group.ts';
import { SequenceState, type GenerationEvent, type TokenLogprob } from './generate.ts';
import { Scheduler, checkMaxNumBatchedTokens, type GenerationHandle, type SchedulerObserver } from './scheduler.ts';
import { SpeculativeExecutor, type SpeculationStats } from './speculative.ts';
import { EXIT_CONFIG, WeftError, exitCodeFor, listenError } from '../core/errors.ts';
import { MAX_TOP_LOGPROBS } from '../core/step-batch.ts';
import { checkSparqSetting } from '../core/sparq.ts';
import { checkPrefillAttention, type PrefillAttention } from '../core/prefill-attention.ts';
import { apiConfig, type ConfigOf } from './config.ts';
import type { InitCommand } from '../core/worker-protocol.ts';
import { DEFAULT_KV_CACHE_SEQUENCES, KvBlockTable, kvCacheLayout, resolveKvDtype, type KvDtypeOption } from '../core/kv-block-table.ts';

/**
 * What startCluster takes. Each option's default and check is its declaration in config/options.ts (the README
 * lists them); a value that does not fit is refused with WEFT_BAD_REQUEST naming the field.
 */
export interface ClusterOptions {
  /** Hugging Face model directory (config.json, safetensors, tokenizer.json). */
  readonly modelDir: string;
  /** Tensor-parallel degree: the number of worker processes. */
  readonly tp?: number;
  /** Mixtral: split whole experts across the ranks instead of cutting every expert (see PlanOptions). */
  readonly expertParallel?: boolean;
  readonly device?: 'cpu' | 'cuda';
  /** Sequences that hold KV blocks at once at most (16 on cpu, 64 on cuda by default). */
  readonly kvSlots?: number;
  /** The KV cache's element type; 'auto' (the default) is bf16 on cuda, f32 on cpu. */
  readonly kvDtype?: KvDtypeOption;
  /** Positions per KV block of the paged cache. Defaults to 16. */
  readonly kvBlockSize?: number;
  /** Decode attention: 'dense' (the default) or 'sparq' (approximate, with sparqR columns and sparqK rows; core/sparq.ts). */
  readonly attention?: 'dense' | 'sparq';
  readonly sparqR?: number;
  readonly sparqK?: number;
  /** Attention of prompt steps: 'exact' (the default), or SageAttention-style 'int8' / 'fp8' (core/prefill-attention.ts). */
  readonly prefillAttention?: PrefillAttention;
  /** Positions the paged KV cache holds, shared by every sequence. Defaults to 4 × the context. */
  readonly kvCacheTokens?: number;
  /** cuda: the share of each GPU's memory weft may use; the KV pool is what the weights and step arena leave (unless kvCacheTokens). Defaults to 0.9. */
  readonly gpuMemoryFraction?: number;
  /** Tokens one step carries at most: decode tokens first, then prompt chunks (at least kvSlots). Defaults to 1024, or kvSlots when larger. */
  readonly maxNumBatchedTokens?: number;
  /** Share the KV blocks of prompt prefixes already computed. Defaults to true; off with a draft model. */
  readonly prefixCaching?: boolean;
  /** Weight-only quantization of a dense checkpoint's projections, done by each rank as it loads them. */
  readonly quantize?: 'int8' | 'int4';
  /** With quantize: input columns per scale ('128', or 'channel': one per output row); 128 for int4, channel for int8. */
  readonly groupSize?: string;
  /** Cap on the context length (KV cache size per sequence); the model's own is used when smaller. */
  readonly maxContext?: number;
  /** How cuda ranks combine tensors: 'auto' (the default: NCCL with a GPU per rank, else shared-gpu), 'nccl' or 'shared-gpu' (several ranks on one GPU). */
  readonly collectives?: 'auto' | 'nccl' | 'shared-gpu';
  /** CPU threads per worker. Defaults to the machine's cores divided among the ranks. */
  readonly threads?: number;
  /** A silent worker is declared dead after this long, in ms. */
  readonly heartbeatTimeoutMs?: number;
  /** Every rank must have joined within this, in ms. */
  readonly joinTimeoutMs?: number;
  /** 'spawn': start the workers as child processes; 'external': wait for `weft worker` processes (pm2). */
  readonly workers?: 'spawn' | 'external';
  /** Host and port of the socket workers connect to (port 0: a free one). */
  readonly workerHost?: string;
  readonly workerPort?: number;
  /** Directory (mode 0700) of the workers' ipc:// socket, used on loopback with no fixed port; default: a fresh one, removed on close. */
  readonly workerSocketDir?: string;
  /** Directory of the worker socket's CURVE keys (made when missing); required when workerHost is not loopback. */
  readonly workerCurveDir?: string;
  /** Shared secret (16 characters or more) external workers prove in their handshake; required with external workers. Spawned workers get a random one. */
  readonly workerSecret?: string;
  /** Re-form the worker group after a fault instead of failing for good. */
  readonly recover?: boolean;
  /** Failed re-form attempts in a row before the cluster gives up. */
  readonly maxRecoveries?: number;
  /** Requests waiting for a KV slot at most; more are refused with WEFT_BUSY. */
  readonly maxQueue?: number;
  /** Deadline of every request from submission, in ms; 0 for none. */
  readonly requestTimeoutMs?: number;
  /** Threads that tokenize and render chat templates, off the event loop. */
  readonly textThreads?: number;
  /** Time one tokenization or template render may take, in ms; its thread is then stopped (WEFT_TIMEOUT). */
  readonly textBudgetMs?: number;
  /** Load the model's chat template (`cluster.chatTemplate`); one that breaks or is slow on a probe is refused (WEFT_BAD_MODEL). */
  readonly chatTemplate?: boolean;
  /**
   * Speculative decoding: a draft model sharing the target's vocabulary, run by its own worker group (its own
   * processes and TP degree); it proposes `k` tokens per round, which the target verifies in one forward.
   * `gpus` defaults to the target's first GPUs, `tp` to their count.
   */
  readonly draft?: { readonly modelDir: string; readonly tp?: number; readonly k?: number; readonly gpus?: readonly number[] };
  readonly onProgress?: (rank: number, bytesRead: number, bytesTotal: number) => void;
  readonly onStateChange?: (state: ClusterState, detail: string) => void;
  readonly observer?: SchedulerObserver;
}

export type ClusterState = 'loading' | 'ready' | 'recovering' | 'failed' | 'closed';

/** A cluster's options once checked and resolved, with the caller's hooks. */
type ClusterSettings = ConfigOf<'cluster'> & Pick<ClusterOptions, 'onProgress' | 'onStateChange' | 'observer' | 'chatTemplate'>;

export interface GenerateRequest {
  /** Text prompt, encoded with the model's tokenizer (BOS added). */
  readonly prompt?: string;
  /** Token ids, used as given. */
  readonly promptIds?: readonly number[];
  /** temperature, topK, topP, seed, maxNewTokens, ignoreEos, stopTokenIds (see SamplingParams). */
  readonly sampling?: Record<string, unknown>;
}

export interface RequestOptions {
  /** Cancels the request; its KV slot is freed at once. */
  readonly signal?: AbortSignal;
  /** Deadline in ms from submission. Defaults to the cluster's requestTimeoutMs. */
  readonly timeoutMs?: number;
}

export interface ScoreResult {
  /** entry i (i >= 1) is log p(ids[i] | ids[0..i-1]); entry 0 is null */
  readonly logprobs: (number | null)[];
  /** with `full`: the log-softmax row for every position, [ids.length][vocab] */
  readonly full?: Float32Array[];
  /** with `topLogprobs`: per token (entry 0 null), its log-prob and that many most likely alternatives */
  readonly top?: (TokenLogprob | null)[];
}

export interface ModelInfo {
  readonly name: string;
  readonly architecture: string;
  readonly vocabSize: number;
  readonly maxContext: number;
  readonly tp: number;
  readonly device: 'cpu' | 'cuda';
  readonly kvSlots: number;
  readonly bosTokenId: number | null;
  readonly eosTokenIds: readonly number[];
}

export interface ClusterStats {
  readonly state: ClusterState;
  readonly detail: string;
  readonly waiting: number;
  readonly running: number;
  readonly kvSlotsUsed: number;
  readonly kvSlots: number;
  /** KV blocks held by sequences, of `kvBlocks` (the pool, without the padding block) */
  readonly kvBlocksUsed: number;
  readonly kvBlocks: number;
  readonly reforms: number;
  readonly ranks: RankStatus[];
}

/** The draft side of speculative decoding: its model, init command and worker group. */
interface DraftSide {
  readonly spec: ModelSpec;
  readonly initCommand: Omit<InitCommand, 'v' | 'type' | 'id' | 'collectiveRoot'>;
  readonly groupStarting: Promise<WorkerGroup>;
  group: WorkerGroup | null;
  readonly k: number;
}

export class Cluster {
  private readonly scheduler: Scheduler;
  private group!: WorkerGroup;
  private readonly speculative: SpeculativeExecutor | null;
  private stateValue: ClusterState = 'loading';
  private detail = 'loading weights';
  private recovering = false;
  private reformCount = 0;
  private draftReforming = false;
  private draftReformCount = 0;
  /** the last draft fault, kept after the draft group is back (speculationStats reports it) */
  private lastDraftFault: Error | null = null;
  /** resolves when the cluster first becomes ready; rejects if it never does */
  readonly ready: Promise<void>;
  /** The model's chat template (with the `chatTemplate` option), rendered and tokenized in the text threads; null when there is none. */
  readonly chatTemplate: ChatPrompter | null;

  private constructor(
    readonly spec: ModelSpec,
    readonly plan: ShardPlan,
    readonly tokenizer: WeftTokenizer,
    readonly maxContext: number,
    private readonly options: ClusterSettings,
    private initCommand: Omit<InitCommand, 'v' | 'type' | 'id' | 'collectiveRoot'>,
    groupStarting: Promise<WorkerGroup>,
    private readonly draft: DraftSide | null,
    private readonly text: TextPool,
  ) {
    this.chatTemplate = text.hasChatTemplate ? { promptIds: (messages) => this.chatPromptIds(messages) } : null;
    const kvLayout = kvCacheLayout(initCommand); // the workers derive the same from their init command
    this.speculative = draft ? new SpeculativeExecutor(draft.k, kvLayout, (batch) => draft.group!.step(batch), (batch) => this.group.step(batch)) : null;
    this.scheduler = new Scheduler(
      {
        kvCache: new KvBlockTable(kvLayout),
        prefixCaching: options.prefixCaching && !draft, // a draft would need the prefix in its own cache too
        maxQueue: options.maxQueue,
        maxNumBatchedTokens: options.maxNumBatchedTokens,
        step: (batch) => this.group.step(batch),
        ...(this.speculative && { speculative: this.speculative }),
        onStepFailure: (err) => this.onFault(err),
        ...(options.observer && { observer: options.observer }),
      },
      true,
    );
    this.ready = this.bringUp(groupStarting);
    this.ready.catch(() => undefined);
  }

  /** Check the model and start loading it; `cluster.ready` resolves when every rank has its weights. */
  static async open(given: ClusterOptions): Promise<Cluster> {
    const { onProgress, onStateChange, observer, chatTemplate } = given;
    const options: ClusterSettings = { ...apiConfig('cluster', given), onProgress, onStateChange, observer, chatTemplate };
    const spec = withQuantizeAtLoad(readModelSpec(options.modelDir), options.quantize, options.groupSize);
    const { tp, device, kvSlots, threads } = options;
    const plan = planShards(spec, tp, { expertParallel: options.expertParallel });
    const tokenizer = loadTokenizer(options.modelDir);
    if (!existsSync(join(options.modelDir, 'model.safetensors')) && !existsSync(join(options.modelDir, 'model.safetensors.index.json')))
      throw new WeftError('WEFT_BAD_WEIGHTS', `${options.modelDir} has neither model.safetensors nor model.safetensors.index.json`);
    const draftSpec = options.draftModelDir !== undefined ? readModelSpec(options.draftModelDir) : null;
    if (draftSpec && draftSpec.vocabSize !== spec.vocabSize)
      throw new WeftError('WEFT_BAD_MODEL', `the draft model's vocabulary (${draftSpec.vocabSize} tokens) differs from the target's (${spec.vocabSize}): speculative decoding needs the same vocabulary`);
    // draftTp and speculateK are set whenever draftModelDir is (their declarations need it)
    const draftPlan = draftSpec ? planShards(draftSpec, options.draftTp!) : null;
    const maxContext = Math.min(spec.maxContext, draftSpec?.maxContext ?? Infinity, options.maxContext);
    // cuda: a pool not given is sized by each rank from --gpu-memory-fraction (not beside a draft, which shares the GPUs and needs the same pool)
    const byFraction = device === 'cuda' && options.kvCacheTokens === undefined && options.draftModelDir === undefined;
    const kvCache = byFraction
      ? { kvBlockSize: options.kvBlockSize, gpuMemoryFraction: options.gpuMemoryFraction }
      : { kvBlockSize: options.kvBlockSize, kvCacheTokens: options.kvCacheTokens ?? DEFAULT_KV_CACHE_SEQUENCES * maxContext };
    const initCommand = { modelDir: options.modelDir, spec, plan, device, kvSlots, maxContext, kvDtype: resolveKvDtype(options.kvDtype, device), ...kvCache, threads, collectives: options.collectives };
    kvCacheLayout(initCommand); // a pool too small for one sequence is refused before anything starts
    const sparq = options.attention === 'sparq' ? { r: options.sparqR, k: options.sparqK } : undefined;
    if (sparq) checkSparqSetting(sparq, spec, device, 'WEFT_BAD_CONFIG'); // refused before anything starts
    // SparQ's kernels read f32 and bf16 caches; fp8/int8 codes with their scales are not wired into its passes yet
    if (sparq && (initCommand.kvDtype === 'fp8' || initCommand.kvDtype === 'int8'))
      throw new WeftError('WEFT_BAD_CONFIG', `--attention sparq reads f32 or bf16 KV caches, not --kv-dtype ${initCommand.kvDtype}; use --kv-dtype bf16 with SparQ`);
    const prefillAttention = options.prefillAttention ?? 'exact';
    checkPrefillAttention(prefillAttention, spec, device, options.attention); // refused before anything starts
    checkMaxNumBatchedTokens(options.maxNumBatchedTokens, kvSlots); // and a step budget below the decode rows
    // the text threads load while the workers start; a template they refuse ends the start-up
    const textStarting = TextPool.start({
      modelDir: options.modelDir,
      threads: options.textThreads,
      budgetMs: options.textBudgetMs,
      maxQueue: options.maxQueue,
      chatTemplate: options.chatTemplate === true,
    });
    textStarting.catch(() => undefined);
    let cluster: Cluster | null = null;
    const group = WorkerGroup.bind({
      world: tp,
      spawnLocal: options.workers === 'spawn',
      bindHost: options.workerHost,
      port: options.workerPort,
      ...(options.workerSocketDir !== undefined && { socketDir: options.workerSocketDir }),
      ...(options.workerCurveDir !== undefined && { curveDir: options.workerCurveDir }),
      ...(options.workerSecret !== undefined && { secret: options.workerSecret }),
      heartbeatTimeoutMs: options.heartbeatTimeoutMs,
      joinTimeoutMs: options.joinTimeoutMs,
      ...(onProgress && { onProgress }),
      onFailure: (err) => cluster?.onFault(err),
    });
    // a port already in use fails here, before the cluster exists
    const groupListening = group.catch((err: unknown) => {
      throw listenError(err, `tcp://${options.workerHost}:${options.workerPort}`, 'workers');
    });
    const [text] = await Cluster.allStarted([textStarting, groupListening] as const);
    let draft: DraftSide | null = null;
    if (options.draftModelDir !== undefined && draftSpec && draftPlan) {
      const draftGroup = WorkerGroup.bind({
        world: draftPlan.tp,
        spawnLocal: true,
        label: 'draft worker',
        // by default the draft shares the target's first GPUs, within what memory they have left
        devices: options.draftGpus ?? Array.from({ length: draftPlan.tp }, (_, r) => r),
        heartbeatTimeoutMs: options.heartbeatTimeoutMs,
        joinTimeoutMs: options.joinTimeoutMs,
        onFailure: (err) => cluster?.onDraftFault(err),
      });
      await Cluster.allStarted([draftGroup, group, Promise.resolve(text)] as const);
      const draftInit = { ...initCommand, modelDir: options.draftModelDir, spec: draftSpec, plan: draftPlan, threads: Math.max(1, Math.floor(availableParallelism() / draftPlan.tp)) };
      draft = { spec: draftSpec, initCommand: draftInit, groupStarting: draftGroup, group: null, k: options.speculateK! };
    }
    cluster = new Cluster(spec, plan, tokenizer, maxContext, options, { ...initCommand, ...(sparq && { sparq }), ...(prefillAttention !== 'exact' && { prefillAttention }) }, group, draft, text); // the draft attends densely
    return cluster;
  }

  /** Waits for every start; when one fails, closes those that started and throws its error. */
  private static async allStarted<T extends readonly Promise<{ close(): Promise<void> }>[]>(starts: T): Promise<{ -readonly [K in keyof T]: Awaited<T[K]> }> {
    const results = await Promise.allSettled(starts);
    const failed = results.find((r) => r.status === 'rejected');
    if (!failed) return results.map((r) => (r as PromiseFulfilledResult<unknown>).value) as { -readonly [K in keyof T]: Awaited<T[K]> };
    await Promise.all(results.flatMap((r) => (r.status === 'fulfilled' ? [r.value.close()] : [])));
    throw failed.reason;
  }

  /** Check the model, start every worker and load the weights; resolves when the cluster is ready. */
  static async start(options: ClusterOptions): Promise<Cluster> {
    const cluster = await Cluster.open(options);
    try {
      await cluster.ready;
    } catch (err) {
      await cluster.close();
      throw err;
    }
    return cluster;
  }

  get state(): ClusterState {
    return this.stateValue;
  }

  private setState(state: ClusterState, detail: string): void {
    if (this.stateValue === 'closed') return;
    this.stateValue = state;
    this.detail = detail;
    this.options.onStateChange?.(state, detail);
  }

  private async bringUp(groupStarting: Promise<WorkerGroup>): Promise<void> {
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
    this.setState('ready', `serving ${this.info().name} on ${this.plan.tp} ranks`);
    this.scheduler.resume();
  }

  /**
   * Initialise the target group. A pool the ranks sized from gpuMemoryFraction becomes the cluster's: the
   * smallest any rank made (a rank with more leaves the rest unused), given in tokens from then on (re-forms
   * allocate the same), and the scheduler's allocator is made for it.
   */
  private async initGroup(): Promise<void> {
    const kvCacheTokens = await this.group.init(this.initCommand);
    if (kvCacheTokens === undefined) return;
    const { gpuMemoryFraction: _sized, ...rest } = this.initCommand;
    this.initCommand = { ...rest, kvCacheTokens };
    this.scheduler.replaceKvCache(new KvBlockTable(kvCacheLayout(this.initCommand)));
  }

  /** A worker fault: fail the running requests, then re-form (with `recover`) or fail for good. */
  private onFault(err: Error): void {
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
  private onDraftFault(err: Error): void {
    this.lastDraftFault = err;
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

  private async promptIds(request: GenerateRequest): Promise<number[]> {
    if ((request.prompt === undefined) === (request.promptIds === undefined))
      throw new WeftError('WEFT_BAD_REQUEST', 'give exactly one of prompt (text) and promptIds (token ids)');
    const ids = request.prompt !== undefined ? await this.tokenizeWithin(request.prompt, 'the prompt', { maxTokens: this.maxContext, contextName: this.contextName }) : request.promptIds;
    return validatePromptIds(ids, this.spec.vocabSize, this.maxContext, this.contextName);
  }

  /** How messages name the context limit: the --max-context cap when it is what binds, else the model's own. */
  private get contextName(): string {
    return contextName(this.maxContext, this.options.maxContext === this.maxContext);
  }

  /** The longest text (prompt, chat) this cluster tokenizes: its context × the most characters one token spells. */
  get maxTextChars(): number {
    return this.tokenizer.maxTextChars(this.maxContext);
  }

  /** A text longer than the context could hold is refused before any tokenizer work. */
  private checkTextLength(what: string, chars: number): void {
    const limit = this.tokenizer.maxTextChars(this.maxContext);
    if (chars > limit)
      throw new WeftError(
        'WEFT_BAD_REQUEST',
        `${what} is ${chars} characters long; the limit is ${limit} characters (a context of ${this.maxContext} tokens × ${this.tokenizer.charsPerToken} characters a token at most)`,
      );
  }

  private async tokenizeWithin(text: string, what: string, options: EncodeOptions & { maxTokens?: number; contextName?: string }): Promise<number[]> {
    if (typeof text !== 'string') throw new WeftError('WEFT_BAD_REQUEST', `text to encode must be a string, got ${typeof text}`);
    this.checkTextLength(what, text.length);
    return this.text.encode(text, options);
  }

  /** Token ids of `text` (BOS added unless `addBos` is false), in a text thread; refused when longer than the context could hold. */
  tokenize(text: string, options: EncodeOptions = {}): Promise<number[]> {
    return this.tokenizeWithin(text, 'the text', options);
  }

  /** The text of `ids` (special tokens dropped unless `skipSpecial` is false), in a text thread. */
  detokenize(ids: readonly number[], options: DecodeOptions = {}): Promise<string> {
    return this.text.decode(ids, options);
  }

  /** The chat template's prompt ids for `messages`; refused before rendering when the messages are longer than the context could hold. */
  private async chatPromptIds(messages: readonly ChatMessage[]): Promise<number[]> {
    this.checkTextLength(`the chat (${messages.length} messages)`, messages.reduce((sum, m) => sum + m.role.length + m.content.length, 0));
    return this.text.chatPromptIds(messages, { maxChars: this.tokenizer.maxTextChars(this.maxContext), maxTokens: this.maxContext, contextName: this.contextName });
  }

  /**
   * Queue a generation once its prompt is tokenized; rejects on a bad request (WEFT_BAD_REQUEST), a full queue
   * (WEFT_BUSY) or a failed cluster. Its events end with `done`, or with an error (worker fault, timeout, cancel).
   */
  async submit(request: GenerateRequest, options: RequestOptions = {}): Promise<GenerationHandle> {
    this.checkOpen();
    const promptIds = await this.promptIds(request);
    this.checkOpen(); // it may have closed while the prompt was tokenized
    const params = parseSamplingParams(request.sampling ?? {}, { maxContext: this.maxContext, contextName: this.contextName, promptLength: promptIds.length, vocabSize: this.spec.vocabSize, attention: { sparq: this.initCommand.sparq ?? null, spec: this.spec, device: this.initCommand.device } });
    // a verify step's log-probs are the draft round's, not one sampled row's: not wired through the round
    if (params.logprobs !== undefined && this.speculative)
      throw new WeftError('WEFT_BAD_REQUEST', 'sampling parameter logprobs is not supported with speculative decoding (--draft); serve without a draft model to get log-probs');
    const seq = new SequenceState(promptIds, params, this.tokenizer.eosTokenIds, this.tokenizer.createStreamDecoder());
    const timeoutMs = options.timeoutMs ?? this.options.requestTimeoutMs;
    const handle = this.scheduler.submitGenerate(seq, timeoutMs || undefined);
    const { signal } = options;
    if (signal) {
      const onAbort = (): void => handle.cancel(new WeftError('WEFT_CANCELLED', 'the request was aborted'));
      if (signal.aborted) onAbort();
      else signal.addEventListener('abort', onAbort, { once: true });
    }
    return handle;
  }

  /** Stream a generation: token events, then one `done` event with the totals. Leaving the loop cancels it. */
  async *generate(request: GenerateRequest, options: RequestOptions = {}): AsyncGenerator<GenerationEvent> {
    const handle = await this.submit(request, options);
    try {
      yield* handle.events;
    } finally {
      handle.cancel();
    }
  }

  private checkOpen(): void {
    if (this.stateValue === 'closed') throw new WeftError('WEFT_CLOSED', 'the cluster is closed');
  }

  /** Log-probabilities of each token of `ids` given the ones before it, in one forward pass. */
  async score(ids: readonly number[], options: { full?: boolean; timeoutMs?: number; topLogprobs?: number } = {}): Promise<ScoreResult> {
    this.checkOpen();
    const promptIds = validatePromptIds(ids, this.spec.vocabSize, this.maxContext, this.contextName);
    const top = options.topLogprobs;
    if (top !== undefined && !(Number.isInteger(top) && top >= 0 && top <= MAX_TOP_LOGPROBS))
      throw new WeftError('WEFT_BAD_REQUEST', `score: topLogprobs must be an integer in [0, ${MAX_TOP_LOGPROBS}], got ${top}`);
    const timeoutMs = options.timeoutMs ?? this.options.requestTimeoutMs;
    return this.scheduler.submitScore(promptIds, options.full === true, timeoutMs || undefined, top ?? null);
  }

  info(): ModelInfo {
    return {
      name: basename(resolve(this.options.modelDir)),
      architecture: this.spec.architecture,
      vocabSize: this.spec.vocabSize,
      maxContext: this.maxContext,
      tp: this.plan.tp,
      device: this.initCommand.device,
      kvSlots: this.initCommand.kvSlots,
      bosTokenId: this.tokenizer.bosTokenId,
      eosTokenIds: this.tokenizer.eosTokenIds,
    };
  }

  stats(): ClusterStats {
    return {
      state: this.stateValue,
      detail: this.detail,
      waiting: this.scheduler.waiting,
      running: this.scheduler.active,
      kvSlotsUsed: this.scheduler.slotsInUse,
      kvSlots: this.initCommand.kvSlots,
      kvBlocksUsed: this.scheduler.kvBlocksInUse,
      kvBlocks: this.scheduler.kvBlocks,
      reforms: this.reformCount,
      ranks: this.group?.status() ?? [],
    };
  }

  /** Process ids of the workers, by rank (the draft group's after the target's). */
  workerPids(): number[] {
    return [...this.group.pids(), ...(this.draft?.group?.pids() ?? [])];
  }

  async close(): Promise<void> {
    if (this.stateValue === 'closed') return;
    this.setState('closed', 'the cluster was closed');
    this.scheduler.failAll(new WeftError('WEFT_CLOSED', 'the cluster was closed'));
    await Promise.all([this.group?.close(), this.draft?.group?.close(), this.text.close()]);
  }

  /**
   * Speculative decoding counters (rounds, proposed and accepted draft tokens, time in each model); whether the
   * draft is proposing now, the last draft fault (kept after the group is back) and how often it re-formed.
   */
  speculationStats(): (SpeculationStats & { draftActive: boolean; draftError: string | null; draftReforms: number }) | null {
    if (!this.speculative) return null;
    const draftError = (this.speculative.draftError ?? this.lastDraftFault)?.message ?? null;
    return { ...this.speculative.stats, draftActive: this.speculative.draftError === null, draftError, draftReforms: this.draftReformCount };
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

export function startCluster(options: ClusterOptions): Promise<Cluster> {
  return Cluster.start(options);
}
