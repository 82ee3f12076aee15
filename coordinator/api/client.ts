/**
 * WeftClient: the typed TypeScript client of a weft cluster's RPC socket, for Node.js services that embed
 * weft. It needs only zeromq and msgpackr (not pm2, not the engine).
 *
 * @example
 * ```ts
 * import { WeftClient } from '@weft-ai/weft';
 * await using weft = await WeftClient.connect({ endpoint: 'tcp://127.0.0.1:5555' });
 * for await (const event of weft.generate({ prompt: 'Once upon a time', sampling: { maxNewTokens: 32 } }, { signal })) {
 *   if (event.type === 'token') process.stdout.write(event.text);
 * }
 * ```
 */
import * as zmq from 'zeromq';
import { encode, SendQueue } from '../../core/wire.ts';
import { WeftError, type WeftErrorCode } from '../../core/errors.ts';
import { Channel } from '../channel.ts';
import type { GenerationEvent, TokenLogprob } from '../generate.ts';
import type { ClusterStats, GenerateRequest, ModelInfo } from '../cluster.ts';
import { RPC_MAX_MESSAGE_BYTES, RPC_VERSION, parseRpcResponse, type CurveClientKeys, type RpcResponse } from './protocol.ts';

export interface WeftClientOptions {
  /** the coordinator's RPC endpoint, tcp://HOST:PORT */
  readonly endpoint: string;
  /** CURVE keys, when the server runs CURVE (any non-loopback bind) */
  readonly curve?: CurveClientKeys;
  /** how long unary calls (info, health, stats, score, and `connect` itself) wait for an answer. Defaults to 30000 ms. */
  readonly timeoutMs?: number;
}

export interface HealthStatus {
  readonly ready: boolean;
  readonly state: string;
  readonly detail: string;
  readonly ranks: { rank: number; pid: number | null; joined: boolean; bytesRead: number; bytesTotal: number }[];
}

export interface ClientRequestOptions {
  /** aborting ends the stream with WEFT_CANCELLED and cancels the request on the server (its KV slot is freed) */
  readonly signal?: AbortSignal;
  /** server-side deadline in ms */
  readonly timeoutMs?: number;
}

/** A promise that only ever rejects, when `fail` is called: raced against a send the socket may hold forever. */
function failure(): { promise: Promise<never>; fail: (err: Error) => void } {
  let fail!: (err: Error) => void;
  const promise = new Promise<never>((_, reject) => (fail = reject));
  promise.catch(() => undefined);  // (often never awaited)
  return { promise, fail };
}

function toError(message: Extract<RpcResponse, { type: 'error' }>): WeftError {
  const code = (message.code.startsWith('WEFT_') ? message.code : 'WEFT_PROTOCOL') as WeftErrorCode;
  return new WeftError(code, message.message);
}

export class WeftClient {
  private readonly outbox: SendQueue;
  private readonly calls = new Map<number, Channel<RpcResponse>>();
  private nextId = 1;
  private closed = false;

  private constructor(
    private readonly socket: zmq.Dealer,
    private readonly options: WeftClientOptions,
  ) {
    this.outbox = new SendQueue(socket);
    void this.receiveLoop();
  }

  /** Connect and check that the server answers (rejects with WEFT_TIMEOUT when it does not). */
  static async connect(options: WeftClientOptions): Promise<WeftClient> {
    const socket = new zmq.Dealer({ linger: 0, maxMessageSize: RPC_MAX_MESSAGE_BYTES * 16, receiveHighWaterMark: 100_000 });
    if (options.curve) {
      socket.curveServerKey = options.curve.serverKey;
      socket.curvePublicKey = options.curve.publicKey;
      socket.curveSecretKey = options.curve.secretKey;
    }
    socket.connect(options.endpoint);
    const client = new WeftClient(socket, options);
    try {
      await client.health();
    } catch (err) {
      await client.close();
      throw err;
    }
    return client;
  }

  private async receiveLoop(): Promise<void> {
    try {
      for await (const [frame] of this.socket) {
        let message: RpcResponse;
        try {
          message = parseRpcResponse(frame ?? Buffer.alloc(0));
        } catch {
          continue;
        }
        if (message.id === null) continue;
        this.calls.get(message.id)?.push(message);
      }
    } catch {
      // closed
    }
  }

  private open(): { id: number; channel: Channel<RpcResponse> } {
    if (this.closed) throw new WeftError('WEFT_CLOSED', 'the client is closed');
    const id = this.nextId++;
    const channel = new Channel<RpcResponse>();
    this.calls.set(id, channel);
    return { id, channel };
  }

  private async call<T>(message: Record<string, unknown> & { type: string }): Promise<T> {
    const { id, channel } = this.open();
    const timeoutMs = this.options.timeoutMs ?? 30_000;
    const { promise: expired, fail: expire } = failure();
    const timer = setTimeout(() => {
      const what = `no answer to ${message.type} from ${this.options.endpoint} within ${timeoutMs} ms`;
      const err = new WeftError('WEFT_TIMEOUT', what);
      channel.fail(err);
      expire(err);
    }, timeoutMs);
    try {
      // The deadline covers the send too: a DEALER holds a send while it has no live connection (none made yet, or a
      // handshake the server refused), so the send alone may never end.
      await Promise.race([this.outbox.send([encode({ v: RPC_VERSION, id, ...message })]), expired]);
      for await (const answer of channel) {
        if (answer.type === 'error') throw toError(answer);
        if (answer.type === 'result') return answer.result as T;
      }
      throw new WeftError('WEFT_CLOSED', 'the client was closed');
    } finally {
      clearTimeout(timer);
      this.calls.delete(id);
    }
  }

  /**
   * Stream a generation: `token` events, then one `done`. Errors (busy, bad request, a worker fault naming the
   * rank, timeout, cancel) are thrown as WeftError with their code. Leaving the loop early cancels the request.
   */
  async *generate(request: GenerateRequest, options: ClientRequestOptions = {}): AsyncGenerator<GenerationEvent> {
    const { id, channel } = this.open();
    const { signal } = options;
    let finished = false;
    const { promise: aborted, fail: abortSend } = failure();
    const onAbort = (): void => {
      const err = new WeftError('WEFT_CANCELLED', 'the request was aborted');
      channel.abort(err);
      abortSend(err);
    };
    try {
      if (signal?.aborted) throw new WeftError('WEFT_CANCELLED', 'the request was aborted');
      signal?.addEventListener('abort', onAbort, { once: true });
      // (an abort ends a send the socket holds, as call's deadline does)
      const deadline = options.timeoutMs !== undefined && { timeoutMs: options.timeoutMs };
      const frame = encode({ v: RPC_VERSION, type: 'generate', id, ...request, ...deadline });
      await Promise.race([this.outbox.send([frame]), aborted]);
      for await (const message of channel) {
        if (message.type === 'token') yield { type: 'token', token: message.token, text: message.text, ...(message.logprobs && { logprobs: message.logprobs }) };
        else if (message.type === 'done') {
          finished = true;
          yield { type: 'done', ...(message.result as Omit<Extract<GenerationEvent, { type: 'done' }>, 'type'>) };
          return;
        } else if (message.type === 'error') {
          finished = true;
          throw toError(message);
        }
      }
    } finally {
      signal?.removeEventListener('abort', onAbort);
      this.calls.delete(id);
      // not awaited: leaving the loop must not wait on a send the socket holds (it ends with the socket at close())
      if (!finished && !this.closed) {
        void this.outbox.send([encode({ v: RPC_VERSION, type: 'cancel', id })]).catch(() => undefined);
      }
    }
  }

  /**
   * Log-probabilities of each token given the ones before it (entry 0 is null); with `topLogprobs` k, `top` holds
   * each token's log-prob and its k most likely alternatives (entry 0 null). `attention`: SparQ or dense for this
   * request, as generate's sampling parameter.
   */
  async score(ids: readonly number[], options: { topLogprobs?: number; attention?: { mode: 'dense' } | { mode: 'sparq'; r?: number; k?: number } } = {}): Promise<{ logprobs: (number | null)[]; top?: (TokenLogprob | null)[] }> {
    return this.call({ type: 'score', ids: [...ids], ...(options.topLogprobs !== undefined && { topLogprobs: options.topLogprobs }), ...(options.attention && { attention: options.attention }) });
  }

  /**
   * `n` independent samples of one request, generated at once (each its own sequence; with a seed, sample j draws
   * from seed + j, as the OpenAI routes do): each sample's done event, in order. Each sample's stream is one
   * generate request, so any of them failing rejects the whole.
   */
  async generateN(request: GenerateRequest, n: number, options: ClientRequestOptions = {}): Promise<Extract<GenerationEvent, { type: 'done' }>[]> {
    if (!Number.isInteger(n) || n < 1) throw new WeftError('WEFT_BAD_REQUEST', `n must be an integer >= 1, got ${n}`);
    const seed = request.sampling?.seed;
    const sample = async (j: number): Promise<Extract<GenerationEvent, { type: 'done' }>> => {
      const sampling = typeof seed === 'number' ? { ...request.sampling, seed: (seed + j) >>> 0 } : request.sampling;
      for await (const event of this.generate({ ...request, ...(sampling && { sampling }) }, options)) if (event.type === 'done') return event;
      throw new WeftError('WEFT_PROTOCOL', 'the generation ended without a done event');
    };
    return Promise.all(Array.from({ length: n }, (_, j) => sample(j)));
  }

  info(): Promise<ModelInfo> {
    return this.call({ type: 'info' });
  }

  health(): Promise<HealthStatus> {
    return this.call({ type: 'health' });
  }

  stats(): Promise<ClusterStats> {
    return this.call({ type: 'stats' });
  }

  tokenize(text: string): Promise<{ ids: number[] }> {
    return this.call({ type: 'tokenize', text });
  }

  /** The text of token ids, special tokens kept (as Hugging Face's decode); an id outside the vocabulary is refused. */
  detokenize(ids: readonly number[]): Promise<{ text: string }> {
    return this.call({ type: 'detokenize', ids: [...ids] });
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const channel of this.calls.values()) channel.fail(new WeftError('WEFT_CLOSED', 'the client was closed'));
    this.socket.close();
  }

  async [Symbol.asyncDispose](): Promise<void> {
    await this.close();
  }
}
