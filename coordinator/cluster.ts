/**
 * The ready state's detail (`weft serve`'s log, /health): what is served, and what the KV pool holds, as vLLM prints
 * it at start-up (its blocks, and how many sequences fit at the full context), so an operator sees the concurrency
 * the memory allows before sending load.
 */
function servingDetail(model: string, tp: number, kv: KvCacheLayout): string {
  const blocks = kv.kvBlocks - (kv.paddingBlock === null ? 0 : 1);
  const positions = blocks * kv.kvBlockSize;
  return `serving ${model} on ${tp} rank${tp === 1 ? '' : 's'}; KV cache ${positions} positions (${blocks} blocks of ${kv.kvBlockSize}, ${kv.kvDtype}): ${Math.floor(positions / kv.maxContext)} sequences at the full context of ${kv.maxContext}`;
}

/**
 * A running cluster: the model's spec and tokenizer, its shard plan, one worker group, and the scheduler that
 * batches requests onto it. Everything is checked before a worker starts (cluster-plan.ts), so a model that
 * cannot run is refused before any weight byte is read; the groups' states, fault recovery and the draft group's
 * re-forming are group-lifecycle.ts's. This file is the API requests come through.
 *
 * Text work (tokenizing prompts, rendering the chat template, decoding long id lists) runs in the text threads
 * (text-pool.ts), never on the event loop; a text longer than the context could hold is refused before any of
 * it (tokenizer.ts, maxTextChars). Decoding the streamed tokens stays here: a bounded tail per token, tens of µs.
 */
import { basename, resolve } from 'node:path';
import { availableParallelism } from 'node:os';
import type { ModelSpec } from '../core/model-spec.ts';
import type { ShardPlan } from '../core/shard-plan.ts';
import type { DecodeOptions, EncodeOptions, WeftTokenizer } from './tokenizer.ts';
import { TextPool } from './text-pool.ts';
import type { ChatMessage, ChatPrompter } from './chat-template.ts';
import { contextName, parseSamplingParams, parseScoreAttention, validatePromptIds, type AttentionLimits } from './sampling-params.ts';
import { WorkerGroup } from './worker-group.ts';
import { SequenceState, type GenerationEvent } from './generate.ts';
import { Scheduler, type GenerationHandle } from './scheduler.ts';
import { checkFullRows } from './score-step.ts';
import { workerMessageLimit } from '../core/worker-protocol.ts';
import { SpeculativeExecutor, type SpeculationStats } from './speculative.ts';
import { WeftError, listenError } from '../core/errors.ts';
import { MAX_TOP_LOGPROBS } from '../core/step-batch.ts';
import { apiConfig } from './config.ts';
import { KvBlockTable, kvCacheLayout, type KvCacheLayout } from '../core/kv-block-table.ts';
import { GroupLifecycle } from './group-lifecycle.ts';
import { allStarted, planCluster } from './cluster-plan.ts';
import { DEFAULT_PREFILL_ATTENTION_SLOTS } from '../core/prefill-attention.ts';
import type { ClusterOptions, ClusterSettings, ClusterState, ClusterStats, DraftSide, GenerateRequest, GroupInitCommand, ModelInfo, RequestOptions, ScoreResult } from './cluster-types.ts';

export type { ClusterOptions, ClusterState, ClusterStats, GenerateRequest, ModelInfo, RequestOptions, ScoreResult } from './cluster-types.ts';

export class Cluster {
  private readonly scheduler: Scheduler;
  private readonly lifecycle: GroupLifecycle;
  private readonly speculative: SpeculativeExecutor | null;
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
    initCommand: GroupInitCommand,
    groupStarting: Promise<WorkerGroup>,
    private readonly draft: DraftSide | null,
    private readonly text: TextPool,
  ) {
    this.chatTemplate = text.hasChatTemplate ? { promptIds: (messages) => this.chatPromptIds(messages) } : null;
    const kvLayout = kvCacheLayout(initCommand); // the workers derive the same from their init command
    this.speculative = draft ? new SpeculativeExecutor(draft.k, kvLayout, (batch) => draft.group!.step(batch), (batch) => this.lifecycle.group.step(batch)) : null;
    this.scheduler = new Scheduler(
      {
        kvCache: new KvBlockTable(kvLayout),
        prefixCaching: options.prefixCaching && !draft, // a draft would need the prefix in its own cache too
        maxQueue: options.maxQueue,
        maxNumBatchedTokens: options.maxNumBatchedTokens,
        step: (batch) => this.lifecycle.group.step(batch),
        ...(this.speculative && { speculative: this.speculative }),
        ...(initCommand.sparq && { exactPrompts: true }),
        onStepFailure: (err) => this.lifecycle.onFault(err),
        ...(options.observer && { observer: options.observer }),
      },
      true,
    );
    this.lifecycle = new GroupLifecycle(initCommand, this.scheduler, draft, this.speculative, options, servingDetail(basename(resolve(options.modelDir)), plan.tp, kvLayout));
    this.ready = this.lifecycle.bringUp(groupStarting);
    this.ready.catch(() => undefined);
  }

  /** Check the model and start loading it; `cluster.ready` resolves when every rank has its weights. */
  static async open(given: ClusterOptions): Promise<Cluster> {
    const { onProgress, onStateChange, observer, chatTemplate } = given;
    const options: ClusterSettings = { ...apiConfig('cluster', given), onProgress, onStateChange, observer, chatTemplate };
    const { spec, plan, tokenizer, maxContext, initCommand, sparq, prefillAttention, draft: draftModel } = planCluster(options);
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
    // a speculative round's sampled rows come back whole: room for every running sequence's k + 1 (one on the draft)
    const speculateK = options.draftModelDir !== undefined && draftModel ? options.speculateK! : null;
    const group = WorkerGroup.bind({
      ...(speculateK !== null && { maxMessageBytes: workerMessageLimit(initCommand.kvSlots * (speculateK + 1), spec.vocabSize) }),
      world: options.tp,
      spawnLocal: options.workers === 'spawn',
      bindHost: options.workerHost,
      port: options.workerPort,
      ...(options.workerSocketDir !== undefined && { socketDir: options.workerSocketDir }),
      ...(options.workerCurveDir !== undefined && { curveDir: options.workerCurveDir }),
      ...(options.workerSecret !== undefined && { secret: options.workerSecret }),
      heartbeatTimeoutMs: options.heartbeatTimeoutMs,
      joinTimeoutMs: options.joinTimeoutMs,
      ...(onProgress && { onProgress }),
      onFailure: (err) => cluster?.lifecycle.onFault(err),
    });
    // a port already in use fails here, before the cluster exists
    const groupListening = group.catch((err: unknown) => {
      throw listenError(err, `tcp://${options.workerHost}:${options.workerPort}`, 'workers');
    });
    const [text] = await allStarted([textStarting, groupListening] as const);
    let draft: DraftSide | null = null;
    if (options.draftModelDir !== undefined && draftModel) {
      const draftGroup = WorkerGroup.bind({
        world: draftModel.plan.tp,
        spawnLocal: true,
        label: 'draft worker',
        maxMessageBytes: workerMessageLimit(initCommand.kvSlots, draftModel.spec.vocabSize),
        // by default the draft shares the target's first GPUs, within what memory they have left
        devices: options.draftGpus ?? Array.from({ length: draftModel.plan.tp }, (_, r) => r),
        heartbeatTimeoutMs: options.heartbeatTimeoutMs,
        joinTimeoutMs: options.joinTimeoutMs,
        onFailure: (err) => cluster?.lifecycle.onDraftFault(err),
      });
      await allStarted([draftGroup, group, Promise.resolve(text)] as const);
      const draftInit = { ...initCommand, modelDir: options.draftModelDir, spec: draftModel.spec, plan: draftModel.plan, threads: Math.max(1, Math.floor(availableParallelism() / draftModel.plan.tp)) };
      draft = { spec: draftModel.spec, initCommand: draftInit, groupStarting: draftGroup, group: null, k: options.speculateK! };
    }
    cluster = new Cluster(spec, plan, tokenizer, maxContext, options, { ...initCommand, ...(sparq && { sparq }), ...(prefillAttention !== 'exact' && { prefillAttention, prefillAttentionSlots: options.prefillAttentionSlots ?? DEFAULT_PREFILL_ATTENTION_SLOTS }) }, group, draft, text); // the draft attends densely and exactly
    return cluster;
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
    return this.lifecycle.state;
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

  /** The text of `ids` (special tokens dropped unless `skipSpecial` is false), in a text thread; ids outside the vocabulary are refused. */
  async detokenize(ids: readonly number[], options: DecodeOptions = {}): Promise<string> {
    const bad = ids.findIndex((id) => !Number.isInteger(id) || id < 0 || id >= this.spec.vocabSize);
    if (bad >= 0) throw new WeftError('WEFT_BAD_REQUEST', `token id at index ${bad} must be an integer in [0, ${this.spec.vocabSize}), got ${ids[bad]}`, { param: 'ids' });
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
    const params = parseSamplingParams(request.sampling ?? {}, { maxContext: this.maxContext, contextName: this.contextName, promptLength: promptIds.length, vocabSize: this.spec.vocabSize, attention: this.attentionLimits() });
    // a verify step's log-probs are the draft round's, not one sampled row's: not wired through the round
    if (params.logprobs !== undefined && this.speculative)
      throw new WeftError('WEFT_BAD_REQUEST', 'sampling parameter logprobs is not supported with speculative decoding (--draft); serve without a draft model to get log-probs');
    // a draft round's draws (and its acceptance rule) are the draft's and the target's own distributions
    for (const [field, param] of [['logitBias', 'logit_bias'], ['presencePenalty', 'presence_penalty'], ['frequencyPenalty', 'frequency_penalty']] as const)
      if (params[field] && this.speculative)
        throw new WeftError('WEFT_BAD_REQUEST', `sampling parameter ${param} is not supported with speculative decoding (--draft); serve without a draft model to bias tokens`, { param });
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
    if (this.lifecycle.state === 'closed') throw new WeftError('WEFT_CLOSED', 'the cluster is closed');
  }

  /**
   * Log-probabilities of each token of `ids` given the ones before it, in one forward pass; `attention`: as
   * generate's sampling parameter (SparQ or dense for this request), else the cluster's.
   */
  async score(ids: readonly number[], options: { full?: boolean; timeoutMs?: number; topLogprobs?: number; attention?: unknown } = {}): Promise<ScoreResult> {
    this.checkOpen();
    const promptIds = validatePromptIds(ids, this.spec.vocabSize, this.maxContext, this.contextName);
    const top = options.topLogprobs;
    if (top !== undefined && !(Number.isInteger(top) && top >= 0 && top <= MAX_TOP_LOGPROBS))
      throw new WeftError('WEFT_BAD_REQUEST', `score: topLogprobs must be an integer in [0, ${MAX_TOP_LOGPROBS}], got ${top}`);
    if (options.full === true) checkFullRows(promptIds.length, this.spec.vocabSize, top);
    const attention = options.attention === undefined ? undefined : parseScoreAttention(options.attention, this.attentionLimits());
    const timeoutMs = options.timeoutMs ?? this.options.requestTimeoutMs;
    return this.scheduler.submitScore(promptIds, options.full === true, timeoutMs || undefined, top ?? null, attention);
  }

  /** What per-request attention this cluster serves (sampling-params.ts AttentionLimits). */
  private attentionLimits(): AttentionLimits {
    return { sparq: this.lifecycle.initCommand.sparq ?? null, spec: this.spec, device: this.lifecycle.initCommand.device };
  }

  info(): ModelInfo {
    return {
      name: basename(resolve(this.options.modelDir)),
      architecture: this.spec.architecture,
      vocabSize: this.spec.vocabSize,
      maxContext: this.maxContext,
      tp: this.plan.tp,
      device: this.lifecycle.initCommand.device,
      kvSlots: this.lifecycle.initCommand.kvSlots,
      bosTokenId: this.tokenizer.bosTokenId,
      eosTokenIds: this.tokenizer.eosTokenIds,
    };
  }

  stats(): ClusterStats {
    return {
      state: this.lifecycle.state,
      detail: this.lifecycle.detail,
      waiting: this.scheduler.waiting,
      running: this.scheduler.active,
      kvSlotsUsed: this.scheduler.slotsInUse,
      kvSlots: this.lifecycle.initCommand.kvSlots,
      kvBlocksUsed: this.scheduler.kvBlocksInUse,
      kvBlocks: this.scheduler.kvBlocks,
      reforms: this.lifecycle.reforms,
      ranks: this.lifecycle.group?.status() ?? [],
    };
  }

  /** Process ids of the workers, by rank (the draft group's after the target's). */
  workerPids(): number[] {
    return [...this.lifecycle.group.pids(), ...(this.draft?.group?.pids() ?? [])];
  }

  async close(): Promise<void> {
    if (this.lifecycle.state === 'closed') return;
    await Promise.all([this.lifecycle.close(), this.text.close()]);
  }

  /**
   * Speculative decoding counters (rounds, proposed and accepted draft tokens, time in each model); whether the
   * draft is proposing now, the last draft fault (kept after the group is back) and how often it re-formed.
   */
  speculationStats(): (SpeculationStats & { draftActive: boolean; draftError: string | null; draftReforms: number }) | null {
    if (!this.speculative) return null;
    const draftError = (this.speculative.draftError ?? this.lifecycle.lastDraftFault)?.message ?? null;
    return { ...this.speculative.stats, draftActive: this.speculative.draftError === null, draftError, draftReforms: this.lifecycle.draftReforms };
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}

export function startCluster(options: ClusterOptions): Promise<Cluster> {
  return Cluster.start(options);
}
