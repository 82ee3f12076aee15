/**
 * Every option weft takes, declared once: its flag, its environment variable (where one makes sense), its kind
 * of value, its default, its help, and where it is used (CLI commands, and `cluster` for startCluster options,
 * `server` for serve() options). The CLI, startCluster, `weft serve`, the pm2 ecosystem of `weft launch` and the
 * README's option table are all made from this table; a new option is one entry here.
 */
import { availableParallelism, homedir } from 'node:os';
import { join } from 'node:path';
import { fileURLToPath } from 'node:url';
import { PACKAGE_ROOT } from '../package-layout.ts';
import { finite, flag, fraction, idList, integer, matching, milliseconds, nameList, oneOf, text, type ValueType } from './values.ts';

export type CommandName = 'generate' | 'score' | 'serve' | 'launch' | 'status' | 'logs' | 'stop' | 'keygen' | 'worker' | 'quantize' | 'doctor';
/** Where options enter in code: startCluster / Cluster.open, and serve(). */
export type ApiContext = 'cluster' | 'server';
export type Context = CommandName | ApiContext;

/** A default computed from the other options (already resolved, in table order). */
export type Resolved = Readonly<Record<string, unknown>>;
export type Derive<T> = (config: Resolved) => T;

export interface OptionDeclaration<T> {
  /** absent: the option is set by environment variable or in code only */
  readonly flag?: `--${string}`;
  /** other spellings of the flag: vLLM's names for the same setting, so that its users' command lines carry over */
  readonly aliases?: readonly `--${string}`[];
  /** the placeholder of its value in help ("N", "DIR"); absent for a switch */
  readonly arg?: string;
  readonly type: ValueType<T>;
  readonly default?: T | Derive<T>;
  /** where a context's default differs from `default` */
  readonly defaultIn?: Partial<Record<Context, T | Derive<T>>>;
  /** how help and README describe a derived default */
  readonly defaultHelp?: string;
  readonly env?: `WEFT_${string}`;
  readonly help: string;
  readonly uses: readonly Context[];
  readonly required?: true;
  /** meaningful only with this other option: left unset without it, refused if given without it */
  readonly needs?: string;
  /** its name in ClusterOptions, where that differs from the key */
  readonly field?: string;
  /** a credential: never printed (serve's config line shows it as set, not its value) */
  readonly secret?: true;
}

/**
 * The model the commands run when no --model is given: an 11 M parameter Llama trained on the State of the Union
 * addresses (models/README.md), shipped in the repository and the package. Code that embeds weft names its model.
 */
export const DEFAULT_MODEL_DIR = fileURLToPath(new URL('models/sotu-llama', PACKAGE_ROOT));

const CLUSTER = ['generate', 'score', 'serve', 'cluster'] as const;
/** where a draft model applies: scoring reads the target's log-probabilities alone */
const SPECULATING = ['generate', 'serve', 'cluster'] as const;
const LAUNCHED = ['launch', 'status', 'logs', 'stop'] as const;
const port = integer(0, 65535);
const threadsFor = (ranks: unknown): number => Math.max(1, Math.floor(availableParallelism() / (ranks as number)));

// `satisfies` checks each entry; `any` lets each entry keep its own value type (ConfigOf reads it back).
export const OPTIONS = {
  // the model and its split
  modelDir: {
    flag: '--model', arg: 'DIR', type: text, env: 'WEFT_MODEL', help: 'Hugging Face model directory', uses: [...CLUSTER, 'launch', 'quantize', 'doctor'], required: true,
    defaultIn: { generate: DEFAULT_MODEL_DIR, score: DEFAULT_MODEL_DIR, serve: DEFAULT_MODEL_DIR, launch: DEFAULT_MODEL_DIR, doctor: DEFAULT_MODEL_DIR },
    defaultHelp: 'the built-in models/sotu-llama (required in startCluster and quantize)',
  },
  tp: {
    flag: '--tp', aliases: ['--tensor-parallel-size'], arg: 'N', type: integer(1), env: 'WEFT_TP', default: 1, defaultIn: { launch: (c: Resolved) => (c.gpus as number[] | undefined)?.length ?? 1 }, defaultHelp: '1 (launch: one per --gpus entry)',
    help: 'tensor-parallel degree (worker processes)', uses: [...CLUSTER, 'launch', 'doctor'],
  },
  device: { flag: '--device', arg: 'cpu|cuda', type: oneOf('cpu', 'cuda'), env: 'WEFT_DEVICE', default: 'cpu', defaultIn: { launch: 'cuda' }, defaultHelp: 'cpu (launch: cuda)', help: 'compute backend', uses: [...CLUSTER, 'launch', 'doctor'] },
  gpus: { flag: '--gpus', arg: 'LIST', type: idList, defaultHelp: '0..N-1', help: 'GPU index per rank, e.g. 0,1,2,3', uses: ['launch'] },
  expertParallel: { flag: '--expert-parallel', type: flag, env: 'WEFT_EXPERT_PARALLEL', default: false, help: 'Mixtral: whole experts per rank instead of every expert cut across ranks', uses: CLUSTER },
  maxContext: { flag: '--max-context', aliases: ['--max-model-len'], arg: 'N', type: integer(1), env: 'WEFT_MAX_CONTEXT', default: 4096, help: "cap on the context length (KV cache per sequence); the model's own is used when smaller", uses: [...CLUSTER, 'launch'] },
  kvSlots: {
    flag: '--kv-slots', aliases: ['--max-num-seqs'], arg: 'N', type: integer(1), env: 'WEFT_KV_SLOTS', default: (c: Resolved) => (c.device === 'cuda' ? 256 : 16), defaultHelp: '16 on cpu, 256 on cuda',
    help: 'sequences running at once at most (each costs only a row of block table; the KV pool is --kv-cache-tokens)', uses: [...CLUSTER, 'launch'],
  },
  kvDtype: {
    flag: '--kv-dtype', arg: 'auto|f32|bf16|fp8|int8', type: oneOf('auto', 'f32', 'bf16', 'fp8', 'int8'), env: 'WEFT_KV_DTYPE', default: 'auto', defaultHelp: 'auto: bf16 on cuda, f32 on cpu',
    help: "the KV cache's element type (bf16 halves the bytes decode attention reads, fp8 e4m3 and int8 with a scale per position and kv head halve them again; arithmetic stays fp32)", uses: [...CLUSTER, 'launch'],
  },
  collectives: {
    flag: '--collectives', arg: 'auto|nccl|shared-gpu', type: oneOf('auto', 'nccl', 'shared-gpu'), env: 'WEFT_COLLECTIVES', default: 'auto',
    defaultHelp: 'auto: NCCL when there is a GPU per rank, else shared-gpu', help: 'how cuda ranks combine tensors: NCCL, or shared-gpu for several ranks on one GPU (CUDA IPC, else /dev/shm)', uses: [...CLUSTER, 'launch', 'doctor'],
  },
  attention: {
    flag: '--attention', arg: 'dense|sparq', type: oneOf('dense', 'sparq'), env: 'WEFT_ATTENTION', default: 'dense', uses: [...CLUSTER, 'launch'],
    help: 'decode attention: exact, or SparQ (approximate: r query components pick the key columns that score every position, the k best positions get exact attention; see --sparq-r, --sparq-k)',
  },
  sparqR: { flag: '--sparq-r', arg: 'R', type: integer(1), env: 'WEFT_SPARQ_R', default: 16, help: "with --attention sparq: query components scored per head (1 to the model's head dimension; 1/8 of it moves 1/16 of K)", uses: [...CLUSTER, 'launch'] },
  sparqK: { flag: '--sparq-k', arg: 'K', type: integer(1), env: 'WEFT_SPARQ_K', default: 128, help: 'with --attention sparq: positions attended exactly per head; sequences no longer than K are attended exactly', uses: [...CLUSTER, 'launch'] },
  prefillAttention: {
    flag: '--prefill-attention', arg: 'exact|int8|fp8', type: oneOf('exact', 'int8', 'fp8'), env: 'WEFT_PREFILL_ATTENTION', default: 'exact', uses: [...CLUSTER, 'launch'],
    help: 'attention of prompt steps (more than 64 tokens): exact, or SageAttention-style quantized (approximate: int8 Q K^T with K smoothed by its mean, P V in f16, or in fp8 e4m3 with fp8); decode is unchanged',
  },
  prefillAttentionSlots: {
    flag: '--prefill-attention-slots', arg: 'N', type: integer(0), env: 'WEFT_PREFILL_ATTENTION_SLOTS', default: 1, uses: [...CLUSTER, 'launch'],
    help: "with --prefill-attention int8|fp8: prompts that keep their quantized blocks across their steps at once, each quantized once instead of at every step (each slot: the context's worth of one byte a K and V element per layer; 0: none, every step quantizes its prompt's prefix anew)",
  },
  kvBlockSize: {
    flag: '--kv-block-size', arg: 'N', type: integer(1, 4096), env: 'WEFT_KV_BLOCK_SIZE',
    // SparQ reads R runs of B positions a block and the V sums of every block: blocks of 64 made a 32K decode step
    // of Llama-2-7B 1.20x the dense one's speed on H200, blocks of 16 1.06x (bench/RESULTS.md, session 15)
    default: (c: Resolved) => (c.attention === 'sparq' ? 64 : 16), defaultHelp: '16 (64 with --attention sparq)',
    help: 'positions per block of the paged KV cache', uses: [...CLUSTER, 'launch'] },
  kvCacheTokens: {
    flag: '--kv-cache-tokens', arg: 'N', type: integer(1), env: 'WEFT_KV_CACHE_TOKENS', defaultHelp: '4 × the context (the memory of 4 full-context sequences)',
    help: 'positions the paged KV cache holds, shared by all sequences (its memory: layers × 2 × KV heads × head size × dtype bytes each); at least one full context', uses: [...CLUSTER, 'launch'],
  },
  gpuMemoryFraction: {
    flag: '--gpu-memory-fraction', aliases: ['--gpu-memory-utilization'], arg: 'F', type: fraction, env: 'WEFT_GPU_MEMORY_FRACTION', default: 0.9,
    help: "cuda: of each GPU's memory, what weft may use (vLLM's gpu_memory_utilization); the paged KV pool is what it leaves after the weights and the step arena (at most --kv-slots full contexts; ranks sharing a GPU divide it, and what other processes held before them), unless --kv-cache-tokens is given (not beside a draft model, which shares the GPUs)", uses: [...CLUSTER, 'launch'],
  },
  maxNumBatchedTokens: {
    flag: '--max-num-batched-tokens', arg: 'N', type: integer(1), env: 'WEFT_MAX_NUM_BATCHED_TOKENS', default: (c: Resolved) => Math.max(1024, c.kvSlots as number), defaultHelp: '1024, or --kv-slots when larger',
    help: "tokens one step carries at most: every running sequence's decode token first, then prompt chunks fill the rest (a longer prompt, or text to score, is split across steps); at least --kv-slots", uses: [...CLUSTER, 'launch'],
  },
  prefixCaching: {
    flag: '--prefix-caching', arg: 'true|false', type: flag, env: 'WEFT_PREFIX_CACHING', default: true,
    help: 'share the KV blocks of prompt prefixes already computed (off with a draft model)', uses: [...CLUSTER, 'launch'],
  },
  quantize: {
    flag: '--quantize', arg: 'int8|int4', type: oneOf('int8', 'int4'), env: 'WEFT_QUANTIZE', uses: [...CLUSTER, 'launch'],
    help: "quantize a dense checkpoint's projections as each rank loads them (weight-only; see weft quantize to write one)",
  },
  quantizeLmHead: {
    flag: '--quantize-lm-head', type: flag, env: 'WEFT_QUANTIZE_LM_HEAD', default: false, uses: [...CLUSTER, 'launch', 'quantize'],
    help: "quantize the LM head too, in the projections' format (gpt-fast does; GPTQ/AWQ keep it dense): with --quantize as each rank loads, or in the checkpoint weft quantize writes (a tied head becomes lm_head.weight)",
  },
  format: {
    flag: '--format', arg: 'int8|int4', type: oneOf('int8', 'int4'), uses: ['quantize'],
    help: "weight-only quantization to write (required for a dense checkpoint; a GPTQ/AWQ one converts to int4 if symmetric, else int8)",
  },
  groupSize: {
    flag: '--group-size', arg: '32|64|128|256|channel', type: matching(/^([1-9]\d*[02468]|[2468]|channel)$/, "an even number of columns (32, 64, 128, 256 usual) or 'channel'"), env: 'WEFT_GROUP_SIZE', uses: [...CLUSTER, 'launch', 'quantize'],
    default: (c: Resolved) => (c.quantize === 'int4' || c.format === 'int4' ? '128' : 'channel'), defaultHelp: '128 for int4, channel (one scale per output row) for int8',
    help: 'input columns per quantization scale',
  },
  threads: { flag: '--threads', arg: 'N', type: integer(1), env: 'WEFT_THREADS', default: (c: Resolved) => threadsFor(c.tp), defaultHelp: 'the cores divided among the ranks', help: 'CPU threads per worker', uses: [...CLUSTER, 'launch'] },

  // speculative decoding
  draftModelDir: { flag: '--draft', arg: 'DIR', type: text, env: 'WEFT_DRAFT', help: 'draft model (same vocabulary) for speculative decoding', uses: [...SPECULATING, 'launch'], field: 'draft.modelDir' },
  draftTp: {
    flag: '--draft-tp', arg: 'N', type: integer(1), env: 'WEFT_DRAFT_TP', default: (c: Resolved) => (c.draftGpus as number[] | undefined)?.length ?? 1, defaultHelp: 'one per --draft-gpus entry, else 1',
    help: "the draft model's tensor-parallel degree", uses: SPECULATING, needs: 'draftModelDir', field: 'draft.tp',
  },
  draftGpus: { flag: '--draft-gpus', arg: 'LIST', type: idList, env: 'WEFT_DRAFT_GPUS', defaultHelp: "the target's first GPUs", help: 'GPU of each draft rank', uses: [...SPECULATING, 'launch'], needs: 'draftModelDir', field: 'draft.gpus' },
  speculateK: { flag: '--speculate-k', arg: 'K', type: integer(1, 16), env: 'WEFT_SPECULATE_K', default: 4, help: 'draft tokens proposed per round', uses: SPECULATING, needs: 'draftModelDir', field: 'draft.k' },

  // generate and score
  prompt: { flag: '--prompt', arg: 'TEXT', type: text, help: 'text prompt (encoded with the model tokenizer, BOS added)', uses: ['generate'] },
  promptIds: { flag: '--prompt-ids', arg: 'IDS', type: idList, help: 'comma-separated prompt token ids', uses: ['generate'] },
  maxNewTokens: { flag: '--max-new-tokens', arg: 'N', type: integer(1), default: 16, help: 'tokens to generate at most', uses: ['generate'] },
  temperature: { flag: '--temperature', arg: 'T', type: finite, default: 0, help: 'sampling temperature; 0 is greedy', uses: ['generate'] },
  topK: { flag: '--top-k', arg: 'K', type: integer(0), default: 0, help: 'keep the k most likely tokens (0: off)', uses: ['generate'] },
  topP: { flag: '--top-p', arg: 'P', type: finite, default: 1, help: 'nucleus sampling threshold', uses: ['generate'] },
  seed: { flag: '--seed', arg: 'S', type: integer(0), help: 'random seed (same seed, same tokens)', uses: ['generate'] },
  ignoreEos: { flag: '--ignore-eos', type: flag, default: false, help: 'keep generating past EOS', uses: ['generate'] },
  ids: { flag: '--ids', arg: 'IDS', type: idList, help: 'comma-separated token ids to score', uses: ['score'], required: true },
  json: { flag: '--json', type: flag, default: false, help: 'print one JSON object instead of text', uses: ['generate', 'score', 'status', 'doctor'] },

  // serving
  host: { flag: '--host', arg: 'HOST', type: text, env: 'WEFT_HOST', default: '127.0.0.1', help: 'interface RPC and HTTP bind (non-loopback needs --curve-dir and --api-key)', uses: ['serve', 'launch', 'server'] },
  rpcPort: { flag: '--rpc-port', arg: 'PORT', type: port, env: 'WEFT_RPC_PORT', default: 0, defaultIn: { serve: 5555, launch: 5555 }, defaultHelp: '5555 (0 in serve())', help: 'RPC (ZeroMQ ROUTER) port; 0 picks a free one', uses: ['serve', 'launch', 'server'] },
  httpPort: { flag: '--http-port', arg: 'PORT', type: port, env: 'WEFT_HTTP_PORT', default: 0, defaultIn: { serve: 8000, launch: 8000 }, defaultHelp: '8000 (0 in serve())', help: 'HTTP port; 0 picks a free one', uses: ['serve', 'launch', 'server'] },
  apiKey: { flag: '--api-key', arg: 'TOKEN', type: text, env: 'WEFT_API_KEY', secret: true, help: 'bearer token HTTP clients must send', uses: ['serve', 'server'] },
  allowedHosts: {
    flag: '--allowed-hosts', arg: 'LIST', type: nameList, env: 'WEFT_ALLOWED_HOSTS', defaultHelp: 'localhost, 127.0.0.1, [::1] and the --host address',
    help: 'Host header names HTTP answers besides the default ones (any port); * answers every name (against DNS rebinding)', uses: ['serve', 'server', 'launch'],
  },
  corsOrigins: {
    flag: '--cors-origins', arg: 'LIST', type: nameList, env: 'WEFT_CORS_ORIGINS', defaultHelp: 'none',
    help: 'browser origins (scheme://host:port) allowed to call HTTP, with CORS headers; * allows every origin', uses: ['serve', 'server', 'launch'],
  },
  clientTimeoutMs: {
    flag: '--client-timeout', arg: 'MS', type: milliseconds(100), env: 'WEFT_CLIENT_TIMEOUT', default: 10_000,
    help: "an HTTP request's headers and body must arrive within this; slower clients get 408 and are closed", uses: ['serve', 'server'],
  },
  curveDir: { flag: '--curve-dir', arg: 'DIR', type: text, env: 'WEFT_CURVE_DIR', help: 'CURVE keys for the RPC socket (server.json, clients.txt; see weft keygen)', uses: ['serve'] },
  maxQueue: { flag: '--max-queue', arg: 'N', type: integer(0), env: 'WEFT_MAX_QUEUE', default: 64, help: 'requests waiting for a KV slot at most; more get "busy"', uses: ['serve', 'launch', 'cluster'] },
  requestTimeoutMs: { flag: '--request-timeout', arg: 'MS', type: milliseconds(0), env: 'WEFT_REQUEST_TIMEOUT', default: 0, help: 'deadline of every request (0: none)', uses: ['serve', 'cluster'] },
  textThreads: { flag: '--text-threads', arg: 'N', type: integer(1, 64), env: 'WEFT_TEXT_THREADS', default: 2, help: 'threads that tokenize and render chat templates, off the event loop', uses: ['serve', 'cluster'] },
  textBudgetMs: { flag: '--text-budget', arg: 'MS', type: milliseconds(1), env: 'WEFT_TEXT_BUDGET', default: 10_000, help: 'time one tokenization or chat-template render may take; its thread is then stopped', uses: ['serve', 'cluster'] },
  recover: { type: flag, default: false, defaultIn: { serve: true, server: true }, defaultHelp: 'false (true in serve and serve())', help: 're-form the worker group after a fault instead of failing for good', uses: ['serve', 'cluster', 'server'] },
  maxRecoveries: { type: integer(1), default: 3, help: 'failed re-form attempts in a row before the cluster gives up', uses: ['cluster'] },
  logIntervalSeconds: {
    flag: '--log-interval', arg: 'S', type: integer(0, 86_400), env: 'WEFT_LOG_INTERVAL', default: 10, defaultIn: { server: 0 }, defaultHelp: '10 (0 in serve())',
    help: 'seconds between server log lines (running, waiting, tok/s, KV usage; only after activity) on stderr; 0: none', uses: ['serve', 'server'],
  },
  logFormat: { flag: '--log-format', arg: 'text|json', type: oneOf('text', 'json'), env: 'WEFT_LOG_FORMAT', default: 'text', help: 'server log lines as text, or one JSON object a line', uses: ['serve', 'server'] },

  // the worker group, as the coordinator sees it
  workers: { flag: '--workers', arg: 'spawn|external', type: oneOf('spawn', 'external'), env: 'WEFT_WORKERS', default: 'spawn', help: 'spawn the workers, or wait for external ones (pm2)', uses: ['serve', 'cluster'] },
  workerHost: {
    flag: '--worker-host', arg: 'HOST', type: text, env: 'WEFT_WORKER_HOST', default: '127.0.0.1', uses: ['serve', 'cluster'],
    help: 'host the socket workers connect to binds; one that is not loopback is tcp:// with CURVE and needs --worker-curve-dir',
  },
  workerPort: { flag: '--worker-port', arg: 'PORT', type: port, env: 'WEFT_WORKER_PORT', default: 0, help: 'tcp:// port workers connect to; 0 on loopback: an ipc:// socket instead (a free port elsewhere)', uses: ['serve', 'launch', 'cluster'] },
  workerSocketDir: {
    flag: '--worker-socket-dir', arg: 'DIR', type: text, env: 'WEFT_WORKER_SOCKET_DIR', defaultHelp: 'a fresh weft-XXXXXX in $XDG_RUNTIME_DIR or the temp dir', uses: ['serve', 'cluster'],
    help: "directory (mode 0700, this user's) of the workers' ipc:// socket, whose permissions keep other local users out (a fresh one is removed on close)",
  },
  workerCurveDir: {
    flag: '--worker-curve-dir', arg: 'DIR', type: text, env: 'WEFT_WORKER_CURVE_DIR', uses: ['serve', 'cluster'],
    help: "the worker socket's CURVE keys: coordinator.json and worker.json (made, mode 0600, when missing); required when --worker-host is not loopback",
  },
  workerCurveFile: { flag: '--worker-curve-file', arg: 'PATH', type: text, help: "this worker's CURVE keys (worker.json of the coordinator's --worker-curve-dir, mode 0600); required for a coordinator that is not loopback", uses: ['worker'] },
  workerCurve: { type: text, env: 'WEFT_WORKER_CURVE', secret: true, help: "this worker's CURVE keys as JSON when no --worker-curve-file is given (spawned workers get them here)", uses: ['worker'] },
  workerSecretFile: { flag: '--worker-secret-file', arg: 'PATH', type: text, env: 'WEFT_WORKER_SECRET_FILE', help: "file holding the group's shared secret workers present", uses: ['serve', 'worker'] },
  workerSecret: { type: text, env: 'WEFT_WORKER_SECRET', secret: true, help: "the group's shared secret when no --worker-secret-file is given (spawned workers get it here, never on argv)", uses: ['serve', 'worker', 'cluster'] },
  heartbeatTimeoutMs: { flag: '--heartbeat-timeout', arg: 'MS', type: milliseconds(100), env: 'WEFT_HEARTBEAT_TIMEOUT', default: 30_000, defaultIn: { serve: 4000 }, defaultHelp: '4000 (30000 in startCluster)', help: 'a worker silent this long is declared dead (checked every 250 ms, so within 5 s at the default); a CPU worker on this host is not silent while its CPU time grows (a long step blocks its heartbeats)', uses: ['serve', 'cluster'] },
  joinTimeoutMs: { type: milliseconds(1), default: (c: Resolved) => (c.workers === 'external' ? 120_000 : 60_000), defaultHelp: '60000 (120000 with external workers)', help: 'every rank must have joined within this', uses: ['serve', 'cluster'] },
  workerStderr: { type: oneOf('tail', 'inherit'), env: 'WEFT_WORKER_STDERR', default: 'tail', help: "'inherit' echoes spawned workers' stderr; 'tail' keeps its last lines for error messages", uses: ['generate', 'score', 'serve'] },
  ncclLibrary: { type: text, env: 'WEFT_NCCL_LIBRARY', default: 'libnccl.so.2', help: 'the NCCL library loaded for multi-GPU groups', uses: ['generate', 'score', 'serve', 'worker', 'doctor'] },

  // one worker rank
  coordinator: { flag: '--coordinator', arg: 'ENDPOINT', type: matching(/^(tcp:\/\/.+:\d+|ipc:\/\/\/.+)$/, 'tcp://HOST:PORT or ipc:///PATH'), help: 'coordinator endpoint, tcp://HOST:PORT or ipc:///PATH', uses: ['worker'], required: true },
  rank: { flag: '--rank', arg: 'R', type: integer(0), help: 'this worker rank', uses: ['worker'], required: true },
  world: { flag: '--world', arg: 'N', type: integer(1), help: 'ranks in the group', uses: ['worker'], required: true },
  parentPid: { flag: '--parent-pid', arg: 'PID', type: integer(1), help: 'exit when this process is gone', uses: ['worker'] },
  collectiveHost: { flag: '--collective-host', arg: 'HOST', type: text, default: '127.0.0.1', help: "interface the rank-0 collective hub binds (an ipc:// coordinator: the hub is ipc:// in its directory); not loopback: CURVE keys are required", uses: ['worker'] },
  coordinatorTimeoutMs: { flag: '--coordinator-timeout', arg: 'MS', type: milliseconds(1), default: 15_000, help: 'exit when the coordinator is silent this long', uses: ['worker'] },

  // clusters under pm2
  name: { flag: '--name', arg: 'NAME', type: matching(/^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$/, "letters, digits, '_', '.', '-' (64 at most)"), default: 'default', help: 'cluster name (pm2 namespace weft-<name>); status without it shows the one cluster running', uses: LAUNCHED },
  home: { type: text, env: 'WEFT_HOME', default: () => join(homedir(), '.weft'), defaultHelp: '~/.weft', help: "where launched clusters keep their files (<home>/<name>)", uses: LAUNCHED },
  waitTimeoutMs: { flag: '--wait-timeout', arg: 'MS', type: milliseconds(1), default: 600_000, help: 'give up waiting for readiness after this', uses: ['launch'] },
  lines: { flag: '--lines', arg: 'N', type: integer(1), default: 50, help: 'lines per process', uses: ['logs'] },
  out: { flag: '--out', arg: 'DIR', type: text, help: 'directory to write', uses: ['keygen', 'quantize'], required: true },
} as const satisfies Record<string, OptionDeclaration<any>>;
