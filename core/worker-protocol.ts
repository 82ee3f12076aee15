/**
 * Coordinator ↔ worker control messages: one union per direction, each message type derived from its zod
 * schema, every message validated on receipt on both sides. Every message carries `v` (protocol version) and
 * `type`. The commands (`init`, `step`, `ncclId`, `rejoin`) carry an `id`; the worker answers each with a `reply` holding
 * the same id, the command's name and its typed result, or with an `error` holding the id. Plain data only: no
 * classes, functions or method names travel.
 *
 * A connection opens with the handshake of core/frame-auth.ts: the worker's `hello` (its claim and a nonce), the
 * coordinator's `challenge` (its nonce), the worker's `auth`. Those two first messages are one frame each; every
 * later message, both ways, is [message, MAC] and is read only when the MAC is right.
 */
import { z } from 'zod';
import type { ModelSpec } from './model-spec.ts';
import type { ShardPlan } from './shard-plan.ts';
import { WeftError } from './errors.ts';
import { stepBatchSchema, stepResultSchema } from './step-batch.ts';

export type { StepBatch, StepResult } from './step-batch.ts';

/**
 * The most bytes one worker message may carry: the coordinator's socket cuts off a peer that sends more (ZeroMQ
 * maxMessageSize, coordinator/worker-transport.ts), before anything is allocated for it.
 */
export const WORKER_MESSAGE_MAX_BYTES = 64 << 20;

/** What a message spends beside its step answer's rows: the frame, the MAC, the answer's other fields. */
export const MESSAGE_OVERHEAD_BYTES = 1 << 20;

/** Bytes of a step answer's row with its full log-probs: the f32 row, the token's log-prob, `top` alternatives' ids and log-probs. */
export function fullRowBytes(vocab: number, top = 0): number {
  return 4 * (vocab + 1 + 2 * top);
}

/**
 * The message limit of a group whose step answers may carry `fullRows` full log-prob rows of `vocab` entries (a
 * speculative round's sampled rows: every running sequence's k + 1 on the target, one each on the draft):
 * WORKER_MESSAGE_MAX_BYTES, or what those rows need when that is more.
 */
export function workerMessageLimit(fullRows: number, vocab: number): number {
  return Math.max(WORKER_MESSAGE_MAX_BYTES, fullRows * fullRowBytes(vocab) + MESSAGE_OVERHEAD_BYTES);
}

const int = z.number().int();
const nonNegInt = int.nonnegative();
/** The spec and plan are built and checked on the coordinator (readModelSpec, planShards); here only as objects. */
const checkedObject = <T>() => z.custom<T>((value) => typeof value === 'object' && value !== null && !Array.isArray(value), 'expected an object');
/** ncclUniqueId: 128 opaque bytes */
const ncclIdSchema = z.custom<Uint8Array>((value) => value instanceof Uint8Array, 'expected bytes').refine((id) => id.byteLength === 128, 'an NCCL unique id is 128 bytes');
/** a handshake nonce: NONCE_BYTES (16) random bytes, as hex */
const nonceSchema = z.string().regex(/^[0-9a-f]{32}$/, 'expected 32 hex digits');

const initCommandSchema = z
  .object({
    v: int,
    type: z.literal('init'),
    id: nonNegInt,
    modelDir: z.string().min(1),
    spec: checkedObject<ModelSpec>(),
    plan: checkedObject<ShardPlan>(),
    device: z.enum(['cpu', 'cuda']),
    kvSlots: int.positive(),
    maxContext: int.positive(),
    /** the KV cache's element type, resolved by the coordinator (never 'auto') */
    kvDtype: z.enum(['f32', 'bf16', 'fp8', 'int8']),
    /** a paged KV cache: positions per block and the pool's positions (core/kv-block-table.ts); absent: one block per sequence */
    kvBlockSize: int.positive().optional(),
    kvCacheTokens: int.positive().optional(),
    /** cuda, paged: size the pool (kvCacheTokens absent) from this fraction of the device's memory; the reply names the pool made */
    gpuMemoryFraction: z.number().gt(0).lte(1).optional(),
    threads: int.positive(),
    /** where rank 0's collective hub listens (CPU collectives) */
    collectiveRoot: z.string(),
    /** the group's NCCL communicator (cuda groups of more than one rank): made by rank 0 (`ncclId`), relayed to all */
    ncclId: ncclIdSchema.optional(),
    /** how cuda ranks combine tensors (worker/collectives/choose.ts). Defaults to 'auto'. */
    collectives: z.enum(['auto', 'nccl', 'shared-gpu']).optional(),
    /** CUDA device ordinal this rank uses, among the devices its process sees. Defaults to 0. */
    deviceIndex: nonNegInt.optional(),
    /** --attention sparq: keep SparQ's state and attend with this r and k (core/sparq.ts); absent: dense attention */
    sparq: z.object({ r: int.positive(), k: int.positive() }).strict().optional(),
    /** --prefill-attention int8|fp8: prompt steps attend through sageAttention (core/prefill-attention.ts); absent: exact */
    prefillAttention: z.enum(['int8', 'fp8']).optional(),
    /** with prefillAttention: the Sage state's slots (worker/models/sage-state.ts); absent: 1 */
    prefillAttentionSlots: nonNegInt.optional(),
  })
  .strict();
export type InitCommand = z.infer<typeof initCommandSchema>;

const coordinatorMessageSchema = z.discriminatedUnion('type', [
  /** the handshake's second message (unauthenticated): the coordinator's nonce for this connection */
  z.object({ v: int, type: z.literal('challenge'), nonce: nonceSchema }).strict(),
  initCommandSchema,
  z.object({ v: int, type: z.literal('step'), id: nonNegInt, batch: stepBatchSchema }).strict(),
  /** asks rank 0 for a fresh NCCL unique id: NCCL's bootstrap root then lives in the rank that joins first */
  z.object({ v: int, type: z.literal('ncclId'), id: nonNegInt }).strict(),
  /** the group re-forms around this rank: it leaves the broken group (collectives closed, model dropped) and keeps its process; `init` follows */
  z.object({ v: int, type: z.literal('rejoin'), id: nonNegInt }).strict(),
  /** `session` names the coordinator instance: a worker that sees it change knows its coordinator restarted */
  z.object({ v: int, type: z.literal('ping'), session: z.string().max(64).optional() }).strict(),
  z.object({ v: int, type: z.literal('shutdown') }).strict(),
]);
export type CoordinatorMessage = z.infer<typeof coordinatorMessageSchema>;

/** What each command answers: the one table both the worker's replies and the coordinator's checks come from. */
const resultSchemas = {
  init: z.object({ bytesLoaded: nonNegInt, /** the paged pool's positions, when gpuMemoryFraction sized it */ kvCacheTokens: int.positive().optional() }).strict(),
  step: stepResultSchema,
  ncclId: z.object({ ncclId: ncclIdSchema }).strict(),
  /** rank 0 binds a new collective hub to rejoin with (its old one closed with its collectives); null on the others */
  rejoin: z.object({ collectiveEndpoint: z.string().max(256).nullable() }).strict(),
};
export type Command = keyof typeof resultSchemas;
export type CommandResult<C extends Command> = z.infer<(typeof resultSchemas)[C]>;
/** Omit over each member of a union (Omit on the union itself keeps only the keys common to all). */
type DistributiveOmit<T, K extends PropertyKey> = T extends unknown ? Omit<T, K> : never;
/** A command as the coordinator sends it, before `v` and `id` are added. */
export type CommandBody<C extends Command = Command> = DistributiveOmit<Extract<CoordinatorMessage, { type: C }>, 'v' | 'id'>;

const replySchema = <C extends Command>(command: C) =>
  z.object({ v: int, type: z.literal('reply'), rank: nonNegInt, id: nonNegInt, command: z.literal(command), result: resultSchemas[command] }).strict();

const workerMessageSchema = z.discriminatedUnion('type', [
  /** a claim, proven only by the `auth` that follows: `nonce` is the worker's for this connection; `hostname` lets a coordinator on the same host watch the pid */
  z
    .object({
      v: int,
      type: z.literal('hello'),
      rank: nonNegInt,
      world: int.positive(),
      pid: int.positive(),
      collectiveEndpoint: z.string().max(256).nullable(),
      nonce: nonceSchema,
      hostname: z.string().max(256).optional(),
    })
    .strict(),
  /** the handshake's third message, the first with a MAC: the worker knows the group secret */
  z.object({ v: int, type: z.literal('auth'), rank: nonNegInt }).strict(),
  z.object({ v: int, type: z.literal('heartbeat'), rank: nonNegInt }).strict(),
  z.object({ v: int, type: z.literal('progress'), rank: nonNegInt, bytesRead: nonNegInt, bytesTotal: nonNegInt }).strict(),
  z.discriminatedUnion('command', [replySchema('init'), replySchema('step'), replySchema('ncclId'), replySchema('rejoin')]),
  z.object({ v: int, type: z.literal('error'), rank: nonNegInt, id: nonNegInt, error: z.object({ code: z.string(), message: z.string() }).strict() }).strict(),
]);
export type WorkerMessage = z.infer<typeof workerMessageSchema>;
export type WorkerReply = Extract<WorkerMessage, { type: 'reply' }>;
export type WorkerHello = Extract<WorkerMessage, { type: 'hello' }>;
/** A reply as the worker builds it, before `v`, `rank` and `id` are added. */
export type ReplyBody = DistributiveOmit<WorkerReply, 'v' | 'type' | 'rank' | 'id'>;

function validate<T>(schema: z.ZodType<T>, value: unknown, who: string): T {
  const parsed = schema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const where = issue?.path.length ? ` at ${issue.path.join('.')}` : '';
    throw new WeftError('WEFT_PROTOCOL', `invalid ${who} message${where}: ${issue?.message ?? 'unknown problem'}`);
  }
  return parsed.data;
}

export const parseCoordinatorMessage = (value: unknown): CoordinatorMessage => validate(coordinatorMessageSchema, value, 'coordinator');
export const parseWorkerMessage = (value: unknown): WorkerMessage => validate(workerMessageSchema, value, 'worker');
