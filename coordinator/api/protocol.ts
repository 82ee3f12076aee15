/**
 * The cluster RPC protocol: what a client (WeftClient, or any MessagePack speaker on a ZeroMQ DEALER) sends to
 * the coordinator's ROUTER socket, and what comes back. One frame per message, a MessagePack map with `v`
 * (protocol version), `type` and `id` (the client's request id, echoed in every answer).
 *
 * Client → server: generate | score | cancel | info | health | stats | tokenize | detokenize.
 * Server → client: token (streamed) and done, or result, or error {code, message} (id null when the frame could
 * not be read at all). With `sampling.logprobs` k, each token carries its log-prob and k alternatives, and done
 * all of them (`logprobs`); `n` samples are n generate requests (each its own seed). Plain data only; every frame is pre-scanned (msgpack-guard.ts), decoded, then checked
 * against the schemas below.
 */
import { z } from 'zod';
import { WeftError } from '../../core/errors.ts';
import { decode } from '../../core/wire.ts';
import type { TokenLogprob } from '../generate.ts';
import { MAX_TIMER_MS } from '../config/values.ts';
import { MAX_TOP_LOGPROBS } from '../../core/step-batch.ts';

export const RPC_VERSION = 1;
/** Frames larger than this disconnect the peer before anything is allocated (ZeroMQ maxMessageSize). */
export const RPC_MAX_MESSAGE_BYTES = 4 << 20;

const id = z.number().int().nonnegative().max(2 ** 31);
const base = { v: z.number().int(), id };

const generateSchema = z
  .object({
    ...base,
    type: z.literal('generate'),
    prompt: z.string().max(1 << 20).optional(),
    promptIds: z.array(z.number().int().nonnegative()).max(1 << 20).optional(),
    sampling: z.record(z.string(), z.unknown()).optional(),
    timeoutMs: z.number().int().positive().max(MAX_TIMER_MS, `must be at most ${MAX_TIMER_MS} ms (2^31-1, the longest a timer can wait)`).optional(),
  })
  .strict();

const requestSchema = z.discriminatedUnion('type', [
  generateSchema,
  z
    .object({
      ...base,
      type: z.literal('score'),
      ids: z.array(z.number().int().nonnegative()).max(1 << 20),
      full: z.boolean().optional(),
      /** per token, its log-prob and this many most likely alternatives (`top` in the result) */
      topLogprobs: z.number().int().min(0).max(MAX_TOP_LOGPROBS).optional(),
      /** `{ mode: 'dense' }` or `{ mode: 'sparq', r?, k? }`, as generate's sampling parameter (the cluster checks it) */
      attention: z.unknown().optional(),
    })
    .strict(),
  z.object({ ...base, type: z.literal('cancel') }).strict(),
  z.object({ ...base, type: z.literal('info') }).strict(),
  z.object({ ...base, type: z.literal('health') }).strict(),
  z.object({ ...base, type: z.literal('stats') }).strict(),
  z.object({ ...base, type: z.literal('tokenize'), text: z.string().max(1 << 20) }).strict(),
  z.object({ ...base, type: z.literal('detokenize'), ids: z.array(z.number().int().nonnegative()).max(1 << 20) }).strict(),
]);

export type RpcRequest = z.infer<typeof requestSchema>;
export type RpcGenerateRequest = z.infer<typeof generateSchema>;

export type RpcResponse =
  | { v: number; type: 'token'; id: number; token: number; text: string; logprobs?: TokenLogprob }
  | { v: number; type: 'done'; id: number; result: Record<string, unknown> }
  | { v: number; type: 'result'; id: number; result: unknown }
  | { v: number; type: 'error'; id: number | null; code: string; message: string };

/** Read one client frame. On failure the error carries the request id when one could be read. */
export function parseRpcRequest(frame: Buffer): RpcRequest {
  const value = decode(frame); // pre-scanned inside decode
  const version = (value as { v?: unknown } | null)?.v;
  // another version's frame may mean other things by the same fields: refuse it before reading any of them
  if (typeof value === 'object' && value !== null && typeof version === 'number' && version !== RPC_VERSION)
    throw withRequestId(new WeftError('WEFT_PROTOCOL', `protocol version v = ${version} is not supported; this server speaks v = ${RPC_VERSION}`), value);
  const parsed = requestSchema.safeParse(value);
  if (parsed.success) return parsed.data;
  const issue = parsed.error.issues[0];
  const where = issue?.path.length ? ` at ${issue.path.join('.')}` : '';
  throw withRequestId(new WeftError('WEFT_PROTOCOL', `invalid request${where}: ${issue?.message ?? 'unknown problem'}`), value);
}

/** The error, carrying the frame's request id when it has a valid one (so the answer reaches the right request). */
function withRequestId(err: WeftError, value: unknown): WeftError & { requestId?: number } {
  const tagged = err as WeftError & { requestId?: number };
  const maybeId = (value as { id?: unknown } | null)?.id;
  if (typeof value === 'object' && value !== null && id.safeParse(maybeId).success) tagged.requestId = maybeId as number;
  return tagged;
}

const logprob = z.custom<number>((value) => typeof value === 'number', 'expected a number'); // -Infinity included
/** A streamed token's log-prob and alternatives (SamplingParams.logprobs). */
const tokenLogprobSchema = z
  .object({ logprob, top: z.array(z.object({ token: z.number().int(), logprob }).strict()) })
  .strict();

const responseSchema = z.union([
  z.object({ v: z.number(), type: z.literal('token'), id, token: z.number().int(), text: z.string(), logprobs: tokenLogprobSchema.optional() }).strict(),
  z.object({ v: z.number(), type: z.literal('done'), id, result: z.record(z.string(), z.unknown()) }).strict(),
  z.object({ v: z.number(), type: z.literal('result'), id, result: z.unknown() }).strict(),
  z.object({ v: z.number(), type: z.literal('error'), id: id.nullable(), code: z.string(), message: z.string() }).strict(),
]);

/** Read one server frame (the client trusts the server no more than the server trusts it). */
export function parseRpcResponse(frame: Buffer): RpcResponse {
  const parsed = responseSchema.safeParse(decode(frame));
  if (!parsed.success) throw new WeftError('WEFT_PROTOCOL', `invalid response from the server: ${parsed.error.issues[0]?.message ?? 'unknown problem'}`);
  return parsed.data as RpcResponse;
}

/** CURVE keys (Z85, 40 characters), as zmq.curveKeyPair() makes them. */
export interface CurveServerKeys {
  readonly publicKey: string;
  readonly secretKey: string;
  /** public keys of the clients allowed in (a ZAP handler refuses every other key) */
  readonly allowedClientKeys: readonly string[];
}
export interface CurveClientKeys {
  readonly serverKey: string;
  readonly publicKey: string;
  readonly secretKey: string;
}
