/**
 * The cluster RPC server: a ZeroMQ ROUTER socket that serves generate (streamed tokens), score, cancel, info,
 * health, stats and tokenize to any number of clients. Every frame is pre-scanned, decoded and validated; a bad
 * one gets an `error` answer (WEFT_PROTOCOL) and never reaches the cluster. Frames over RPC_MAX_MESSAGE_BYTES
 * make ZeroMQ drop the peer before allocating. A send to a client that left, or that stopped reading until its queue
 * reached the high-water mark (10,000 messages beyond the sockets' buffers), fails at once instead of stalling the
 * others, and that client's generations are cancelled.
 *
 * Binding: loopback by default. Anything else needs CURVE keys: the socket then runs as a CURVE server and a ZAP
 * handler admits only the allowed client public keys.
 */
import * as zmq from 'zeromq';
import { encode, SendQueue } from '../../core/wire.ts';
import { WeftError, isWeftError } from '../../core/errors.ts';
import type { Cluster } from '../cluster.ts';
import type { GenerationHandle } from '../scheduler.ts';
import { RPC_MAX_MESSAGE_BYTES, RPC_VERSION, parseRpcRequest, type CurveServerKeys, type RpcRequest, type RpcResponse } from './protocol.ts';

export interface RpcServerOptions {
  /** Defaults to 127.0.0.1. */
  readonly host?: string;
  /** 0 picks a free port. Defaults to 0. */
  readonly port?: number;
  /** required unless host is loopback */
  readonly curve?: CurveServerKeys;
}

export function isLoopback(host: string): boolean {
  return host === '127.0.0.1' || host === 'localhost' || host === '::1' || /^127\.\d+\.\d+\.\d+$/.test(host);
}

const Z85 = '0123456789abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ.-:+=^!/*?&<>()[]{}@%$#';
/** Z85 (ZeroMQ RFC 32) text of a 32-byte key, as zmq.curveKeyPair() writes keys. */
function z85(bytes: Buffer): string {
  let out = '';
  for (let i = 0; i < bytes.length; i += 4) {
    let value = bytes.readUInt32BE(i);
    let chunk = '';
    for (let j = 0; j < 5; j++) {
      chunk = Z85[value % 85]! + chunk;
      value = Math.floor(value / 85);
    }
    out += chunk;
  }
  return out;
}

let zap: zmq.Router | null = null;
let zapUsers = 0;
const zapAllowed = new Set<string>();

function stopZap(): void {
  if (--zapUsers > 0 || !zap) return;
  zap.close();
  zap = null;
  zapAllowed.clear();
}

/** ZAP (RFC 27) handler for this process's ZeroMQ context: CURVE clients whose key is on the list get in. */
async function startZap(keys: readonly string[]): Promise<void> {
  keys.forEach((k) => zapAllowed.add(k));
  zapUsers++;
  if (zap) return;
  const socket = new zmq.Router({ linger: 0 });
  zap = socket;
  await socket.bind('inproc://zeromq.zap.01');
  const queue = new SendQueue(socket);
  void (async () => {
    for await (const [identity, delimiter, version, requestId, , , , mechanism, credential] of socket) {
      const key = mechanism?.toString() === 'CURVE' && credential?.length === 32 ? z85(credential) : undefined;
      const ok = version?.toString() === '1.0' && key !== undefined && zapAllowed.has(key);
      await queue
        .send([identity!, delimiter ?? Buffer.alloc(0), '1.0', requestId ?? Buffer.alloc(0), ok ? '200' : '400', ok ? 'OK' : 'unknown client key', '', Buffer.alloc(0)])
        .catch(() => undefined);
    }
  })().catch(() => undefined);
}

export class RpcServer {
  private readonly outbox: SendQueue;
  /** generations by client identity (hex) and request id: their handle once the prompt is tokenized, and a cancel before that */
  private readonly streams = new Map<string, { handle: GenerationHandle | null; readonly abort: AbortController }>();
  private closed = false;

  private constructor(
    private readonly router: zmq.Router,
    readonly endpoint: string,
    private readonly cluster: Cluster,
    private readonly usesZap: boolean,
  ) {
    this.outbox = new SendQueue(router);
    void this.receiveLoop();
  }

  static async start(cluster: Cluster, options: RpcServerOptions = {}): Promise<RpcServer> {
    const host = options.host ?? '127.0.0.1';
    if (!isLoopback(host) && !options.curve)
      throw new WeftError('WEFT_BAD_REQUEST', `binding the RPC socket to ${host} (not loopback) needs CURVE keys (--curve-dir); refusing to serve unauthenticated`);
    // mandatory: a send to a client that left, or whose queue is at the high-water mark, fails (instead of being
    // dropped without a word, its generation streaming on into nothing) and drops that client; sendTimeout 0: at
    // once, so that one client that stops reading never holds up the sends to the others (they share one queue)
    const router = new zmq.Router({ linger: 0, mandatory: true, maxMessageSize: RPC_MAX_MESSAGE_BYTES, sendTimeout: 0, sendHighWaterMark: 10_000 });
    if (options.curve) {
      if (!zmq.capability.curve) throw new WeftError('WEFT_BAD_REQUEST', 'this ZeroMQ build has no CURVE support');
      await startZap(options.curve.allowedClientKeys);
      router.curveServer = true;
      router.curveSecretKey = options.curve.secretKey;
      router.zapDomain = 'weft';
    }
    await router.bind(`tcp://${host.includes(':') ? `[${host}]` : host}:${options.port || '*'}`);
    return new RpcServer(router, router.lastEndpoint ?? '', cluster, options.curve !== undefined);
  }

  private send(identity: Buffer, message: RpcResponse): void {
    this.outbox.send([identity, encode(message)]).catch(() => this.dropClient(identity));
  }

  private error(identity: Buffer, id: number | null, err: unknown): void {
    const code = isWeftError(err) ? err.code : 'WEFT_PROTOCOL';
    this.send(identity, { v: RPC_VERSION, type: 'error', id, code, message: (err as Error).message ?? String(err) });
  }

  /** A client we cannot write to: cancel its work, once (the sends already queued for it fail too). */
  private dropClient(identity: Buffer): void {
    const prefix = `${identity.toString('hex')}:`;
    for (const [key, stream] of this.streams)
      if (key.startsWith(prefix)) {
        this.streams.delete(key);
        RpcServer.cancel(stream);
      }
  }

  private async receiveLoop(): Promise<void> {
    try {
      for await (const [identity, frame, ...extra] of this.router) {
        if (!identity) continue;
        let request: RpcRequest;
        try {
          if (!frame || extra.length > 0) throw new WeftError('WEFT_PROTOCOL', `expected one frame per message, got ${frame ? 1 + extra.length : 0}`);
          request = parseRpcRequest(frame);
        } catch (err) {
          this.error(identity, (err as { requestId?: number }).requestId ?? null, err);
          continue;
        }
        try {
          this.handle(identity, request);
        } catch (err) {
          this.error(identity, request.id, err);
        }
      }
    } catch (err) {
      if (!this.closed) process.stderr.write(`weft: RPC socket failed: ${(err as Error).message}\n`);
    }
  }

  private handle(identity: Buffer, request: RpcRequest): void {
    const key = `${identity.toString('hex')}:${request.id}`;
    const reply = (result: unknown): void => this.send(identity, { v: RPC_VERSION, type: 'result', id: request.id, result });
    switch (request.type) {
      case 'generate':
        return this.generate(identity, key, request);
      case 'cancel': {
        const stream = this.streams.get(key);
        if (stream) RpcServer.cancel(stream);
        return reply({ cancelled: stream !== undefined });
      }
      case 'score': {
        this.cluster
          .score(request.ids, { full: request.full === true, ...(request.topLogprobs !== undefined && { topLogprobs: request.topLogprobs }), ...(request.attention !== undefined && { attention: request.attention }) })
          .then((r) => reply({ logprobs: r.logprobs, ...(r.top && { top: r.top }), ...(r.full && { full: r.full.map((row) => new Uint8Array(row.buffer, row.byteOffset, row.byteLength)) }) }))
          .catch((err) => this.error(identity, request.id, err));
        return;
      }
      case 'info':
        return reply(this.cluster.info());
      case 'health': {
        const stats = this.cluster.stats();
        return reply({ ready: stats.state === 'ready', state: stats.state, detail: stats.detail, ranks: stats.ranks });
      }
      case 'stats':
        return reply(this.cluster.stats());
      case 'tokenize':
        this.cluster
          .tokenize(request.text)
          .then((ids) => reply({ ids }))
          .catch((err) => this.error(identity, request.id, err));
        return;
      case 'detokenize':
        this.cluster
          .detokenize(request.ids, { skipSpecial: false })
          .then((text) => reply({ text }))
          .catch((err) => this.error(identity, request.id, err));
        return;
    }
  }

  /** Cancel a generation; one still being tokenized is cancelled as soon as it is submitted. */
  private static cancel(stream: { handle: GenerationHandle | null; abort: AbortController }): void {
    if (stream.handle) stream.handle.cancel();
    else stream.abort.abort();
  }

  private generate(identity: Buffer, key: string, request: Extract<RpcRequest, { type: 'generate' }>): void {
    if (this.streams.has(key)) throw new WeftError('WEFT_BAD_REQUEST', `request id ${request.id} is already running on this connection`);
    const stream = { handle: null as GenerationHandle | null, abort: new AbortController() };
    this.streams.set(key, stream);
    void (async () => {
      try {
        const handle = await this.cluster.submit(
          {
            ...(request.prompt !== undefined && { prompt: request.prompt }),
            ...(request.promptIds !== undefined && { promptIds: request.promptIds }),
            ...(request.sampling !== undefined && { sampling: request.sampling }),
          },
          { signal: stream.abort.signal, ...(request.timeoutMs !== undefined && { timeoutMs: request.timeoutMs }) },
        );
        stream.handle = handle;
        for await (const event of handle.events) {
          if (event.type === 'token') this.send(identity, { v: RPC_VERSION, type: 'token', id: request.id, token: event.token, text: event.text, ...(event.logprobs && { logprobs: event.logprobs }) });
          else {
            const { type: _type, ...result } = event;
            this.send(identity, { v: RPC_VERSION, type: 'done', id: request.id, result });
          }
        }
      } catch (err) {
        this.error(identity, request.id, err);
      } finally {
        if (this.streams.get(key) === stream) this.streams.delete(key); // not if dropClient took it already
      }
    })();
  }

  async close(): Promise<void> {
    if (this.closed) return;
    this.closed = true;
    for (const stream of this.streams.values()) RpcServer.cancel(stream);
    this.router.close();
    if (this.usesZap) stopZap();
  }
}
