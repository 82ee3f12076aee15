/**
 * A cluster's shapes: the options startCluster takes (and what they resolve to), the requests and answers of its
 * API, its state and stats; and the draft side the cluster's parts share.
 */
import type { ModelSpec } from '../core/model-spec.ts';
import type { InitCommand } from '../core/worker-protocol.ts';
import type { KvDtypeOption } from '../core/kv-block-table.ts';
import type { PrefillAttention } from '../core/prefill-attention.ts';
import type { TokenLogprob } from './generate.ts';
import type { RankStatus, WorkerGroup } from './worker-group.ts';
import type { SchedulerObserver } from './scheduler.ts';
import type { ConfigOf } from './config.ts';

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
  /** With a quantized prefillAttention: prompts that keep their quantized blocks across steps at once (worker/models/sage-state.ts). Defaults to 1. */
  readonly prefillAttentionSlots?: number;
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
  /** With quantize: the LM head quantized too, in the projections' format. Defaults to false (dense, as GPTQ/AWQ keep it). */
  readonly quantizeLmHead?: boolean;
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
export type ClusterSettings = ConfigOf<'cluster'> & Pick<ClusterOptions, 'onProgress' | 'onStateChange' | 'observer' | 'chatTemplate'>;

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

/** What every rank of a group is initialised with (the worker group adds the envelope and the collective's root). */
export type GroupInitCommand = Omit<InitCommand, 'v' | 'type' | 'id' | 'collectiveRoot'>;

/** The draft side of speculative decoding: its model, init command and worker group. */
export interface DraftSide {
  readonly spec: ModelSpec;
  readonly initCommand: GroupInitCommand;
  readonly groupStarting: Promise<WorkerGroup>;
  group: WorkerGroup | null;
  readonly k: number;
}

