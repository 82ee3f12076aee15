/**
 * Coordinator ↔ worker control messages: a typed union with a validator per message. Every message carries
 * `v` (protocol version) and `type`; requests carry `id`, and the worker answers each with a `reply` holding
 * the same id. Plain data only: no classes, functions or method names travel.
 */
import { z } from 'zod';
import type { ModelSpec } from './model-spec.ts';
import type { ShardPlan } from './shard-plan.ts';
import { WeftError } from './errors.ts';
import { stepBatchSchema, type StepBatch } from './step-batch.ts';

export type { StepBatch, StepResult } from './step-batch.ts';

const int = z.number().int();
const nonNegInt = int.nonnegative();

export interface InitCommand {
  v: number;
  type: 'init';
  id: number;
  modelDir: string;
  spec: ModelSpec;
  plan: ShardPlan;
  device: 'cpu' | 'cuda';
  kvSlots: number;
  maxContext: number;
  threads: number;
  /** where rank 0's collective hub listens (CPU collectives) */
  collectiveRoot: string;
  /** NCCL unique id (128 bytes) of the group's communicator (cuda groups of more than one rank) */
  ncclId?: Uint8Array;
  /** CUDA device ordinal this rank uses, among the devices its process sees. Defaults to 0. */
  deviceIndex?: number;
}

const initSchema = z
  .object({
    v: int,
    type: z.literal('init'),
    id: nonNegInt,
    modelDir: z.string().min(1),
    spec: z.record(z.string(), z.unknown()),
    plan: z.record(z.string(), z.unknown()),
    device: z.enum(['cpu', 'cuda']),
    kvSlots: int.positive(),
    maxContext: int.positive(),
    threads: int.positive(),
    collectiveRoot: z.string(),
    ncclId: z.instanceof(Uint8Array).optional(),
    deviceIndex: nonNegInt.optional(),
  })
  .strict();

const coordinatorMessageSchema = z.discriminatedUnion('type', [
  initSchema,
  z.object({ v: int, type: z.literal('step'), id: nonNegInt, batch: stepBatchSchema }).strict(),
  /** `session` names the coordinator instance: a worker that sees it change knows its coordinator restarted */
  z.object({ v: int, type: z.literal('ping'), session: z.string().max(64).optional() }).strict(),
  z.object({ v: int, type: z.literal('shutdown') }).strict(),
]);

export type CoordinatorMessage =
  | InitCommand
  | { v: number; type: 'step'; id: number; batch: StepBatch }
  | { v: number; type: 'ping'; session?: string }
  | { v: number; type: 'shutdown' };

export type WorkerMessage =
  /** `secret`: the group's shared secret, when the coordinator has one; `hostname`: lets a coordinator on the same host watch the pid */
  | { v: number; type: 'hello'; rank: number; world: number; pid: number; collectiveEndpoint: string | null; secret?: string; hostname?: string }
  | { v: number; type: 'heartbeat'; rank: number }
  | { v: number; type: 'progress'; rank: number; bytesRead: number; bytesTotal: number }
  | { v: number; type: 'reply'; rank: number; id: number; ok: true; result: unknown }
  | { v: number; type: 'reply'; rank: number; id: number; ok: false; error: { code: string; message: string } };

const workerMessageSchema = z.union([
  z
    .object({
      v: int,
      type: z.literal('hello'),
      rank: nonNegInt,
      world: int.positive(),
      pid: int.positive(),
      collectiveEndpoint: z.string().nullable(),
      secret: z.string().max(256).optional(),
      hostname: z.string().max(256).optional(),
    })
    .strict(),
  z.object({ v: int, type: z.literal('heartbeat'), rank: nonNegInt }).strict(),
  z.object({ v: int, type: z.literal('progress'), rank: nonNegInt, bytesRead: nonNegInt, bytesTotal: nonNegInt }).strict(),
  z.object({ v: int, type: z.literal('reply'), rank: nonNegInt, id: nonNegInt, ok: z.literal(true), result: z.unknown() }).strict(),
  z
    .object({ v: int, type: z.literal('reply'), rank: nonNegInt, id: nonNegInt, ok: z.literal(false), error: z.object({ code: z.string(), message: z.string() }) })
    .strict(),
]);

function validate<T>(schema: z.ZodType, value: unknown, who: string): T {
  const parsed = schema.safeParse(value);
  if (!parsed.success) {
    const issue = parsed.error.issues[0];
    const where = issue?.path.length ? ` at ${issue.path.join('.')}` : '';
    throw new WeftError('WEFT_PROTOCOL', `invalid ${who} message${where}: ${issue?.message ?? 'unknown problem'}`);
  }
  return parsed.data as T;
}

export const parseCoordinatorMessage = (value: unknown): CoordinatorMessage => validate(coordinatorMessageSchema, value, 'coordinator');
export const parseWorkerMessage = (value: unknown): WorkerMessage => validate(workerMessageSchema, value, 'worker');
